//! Expansion of the `Header` setting: the line added to every delivered message.
//!
//! The template language is the original's: `\r`, `\n`, `\t` give CR, LF and TAB (so a
//! template can produce a folded header), a backslash before any other character gives
//! that character, `%i`, `%l`, `%d` and `%%` give the client IP, the local IP, the date
//! and a percent sign. The caller appends the final CRLF.

/// Longest expansion kept, in bytes (the original's buffer held 1023 bytes and a NUL).
pub(crate) const MAX_HEADER_LEN: usize = 1023;

/// Values the template may refer to.
pub(crate) struct HeaderContext<'a> {
    /// Client IP address, without port (`%i`).
    pub(crate) client_ip: &'a str,
    /// Local IP address the connection was accepted on (`%l`).
    pub(crate) local_ip: &'a str,
    /// Delivery time (`%d`).
    pub(crate) now: &'a jiff::Zoned,
}

/// Expands `template`. Returns the header text (without a final CRLF) and one warning per
/// unknown `%x` sequence, worded like the original's log message.
pub(crate) fn expand(template: &str, ctx: &HeaderContext) -> (String, Vec<String>) {
    let mut out = String::with_capacity(template.len() + 64);
    let mut warnings = Vec::new();
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('r') => out.push('\r'),
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            },
            '%' => match chars.next() {
                Some('i') => out.push_str(ctx.client_ip),
                Some('l') => out.push_str(ctx.local_ip),
                Some('d') => out.push_str(&format_date(ctx.now)),
                Some('%') => out.push('%'),
                Some(other) => warnings.push(format!("invalid header symbol: %{other}")),
                // Like a trailing backslash, a trailing lone `%` is kept as written.
                None => out.push('%'),
            },
            _ => out.push(c),
        }
        if out.len() > MAX_HEADER_LEN {
            break;
        }
    }
    truncate_on_char_boundary(&mut out, MAX_HEADER_LEN);
    (out, warnings)
}

/// A header starting with `Received:` (any case) goes first in the message, as trace
/// headers must; any other header goes at the end of the header block.
pub(crate) fn is_received(expanded: &str) -> bool {
    expanded
        .as_bytes()
        .get(..9)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"Received:"))
}

/// The `%d` date: C `asctime` layout, then the UTC offset and the zone abbreviation, e.g.
/// `Wed Nov  5 15:01:12 2026 +0530 (IST)`.
///
/// The original printed the offset remainder in seconds (`+051800` for India); the offset
/// is written as `+HHMM` here, which is what it meant and what RFC 5322 readers expect.
pub(crate) fn format_date(now: &jiff::Zoned) -> String {
    let mut date = now.strftime("%a %b %e %H:%M:%S %Y").to_string();
    let offset = now.offset().seconds();
    let sign = if offset < 0 { '-' } else { '+' };
    let minutes = offset.unsigned_abs() / 60;
    date.push_str(&format!(" {sign}{:02}{:02}", minutes / 60, minutes % 60));
    let info = now.time_zone().to_offset_info(now.timestamp());
    let abbreviation = info.abbreviation();
    if !abbreviation.is_empty() {
        date.push_str(&format!(" ({abbreviation})"));
    }
    date
}

fn truncate_on_char_boundary(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::tz::TimeZone;

    /// The POSIX rule always, and the IANA zone too when the system has a time zone
    /// database, so the tests also run on machines without tzdata.
    fn zones(iana: &str, posix: &str) -> Vec<TimeZone> {
        let mut zones = vec![TimeZone::posix(posix).unwrap()];
        zones.extend(TimeZone::get(iana).ok());
        zones
    }

    fn at(rfc3339_utc: &str, tz: TimeZone) -> jiff::Zoned {
        let ts: jiff::Timestamp = rfc3339_utc.parse().unwrap();
        ts.to_zoned(tz)
    }

    #[test]
    fn date_formats() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "2026-11-25T15:01:12Z",
                "UTC",
                "UTC0",
                "Wed Nov 25 15:01:12 2026 +0000 (UTC)",
            ),
            (
                "2026-11-05T09:31:12Z",
                "Asia/Kolkata",
                "IST-5:30",
                "Thu Nov  5 15:01:12 2026 +0530 (IST)",
            ),
            (
                "2026-01-15T12:00:00Z",
                "America/St_Johns",
                "NST3:30NDT,M3.2.0,M11.1.0",
                "Thu Jan 15 08:30:00 2026 -0330 (NST)",
            ),
            (
                "2026-07-15T12:00:00Z",
                "America/St_Johns",
                "NST3:30NDT,M3.2.0,M11.1.0",
                "Wed Jul 15 09:30:00 2026 -0230 (NDT)",
            ),
            (
                "2026-07-01T00:00:09Z",
                "Europe/Berlin",
                "CET-1CEST,M3.5.0,M10.5.0/3",
                "Wed Jul  1 02:00:09 2026 +0200 (CEST)",
            ),
            (
                "2026-12-31T23:59:59Z",
                "America/New_York",
                "EST5EDT,M3.2.0,M11.1.0",
                "Thu Dec 31 18:59:59 2026 -0500 (EST)",
            ),
            (
                "2026-06-01T00:00:00Z",
                "Asia/Kathmandu",
                "<+0545>-5:45",
                "Mon Jun  1 05:45:00 2026 +0545 (+0545)",
            ),
        ];
        for (utc, iana, posix, want) in cases {
            for tz in zones(iana, posix) {
                let now = at(utc, tz);
                assert_eq!(format_date(&now), *want, "{iana} / {posix}");
            }
        }
    }

    #[test]
    fn expansion() {
        let now = at("2026-11-25T15:01:12Z", TimeZone::UTC);
        let ctx = HeaderContext {
            client_ip: "192.0.2.7",
            local_ip: "10.0.0.1",
            now: &now,
        };
        let date = "Wed Nov 25 15:01:12 2026 +0000 (UTC)";
        let cases: &[(&str, String, &[&str])] = &[
            ("X-Filtered: yes", "X-Filtered: yes".into(), &[]),
            (
                r"Received: by proxsmtp (client %i);\r\n\t%d",
                format!("Received: by proxsmtp (client 192.0.2.7);\r\n\t{date}"),
                &[],
            ),
            ("X-Local: %l", "X-Local: 10.0.0.1".into(), &[]),
            ("100%% sure", "100% sure".into(), &[]),
            (
                "bad %x here",
                "bad  here".into(),
                &["invalid header symbol: %x"],
            ),
            (
                "%q%i%z",
                "192.0.2.7".into(),
                &["invalid header symbol: %q", "invalid header symbol: %z"],
            ),
            ("%é", "".into(), &["invalid header symbol: %é"]),
            (r"a\\b\%i\x", r"a\b%ix".into(), &[]),
            (r"trailing \", r"trailing \".into(), &[]),
            ("trailing %", "trailing %".into(), &[]),
            (r"\r\n\t", "\r\n\t".into(), &[]),
            ("", "".into(), &[]),
        ];
        for (template, want, warns) in cases {
            let (got, warnings) = expand(template, &ctx);
            assert_eq!(&got, want, "template {template:?}");
            assert_eq!(warnings, *warns, "template {template:?}");
        }
    }

    #[test]
    fn expansion_is_cut_at_1023_bytes_on_a_char_boundary() {
        let now = at("2026-11-25T15:01:12Z", TimeZone::UTC);
        let ctx = HeaderContext {
            client_ip: "1.2.3.4",
            local_ip: "5.6.7.8",
            now: &now,
        };
        let cases: &[(String, usize)] = &[
            ("a".repeat(2000), 1023),
            ("a".repeat(1023), 1023),
            ("a".repeat(1022), 1022),
            // 'é' is two bytes: 1022 + 2 would cross the limit, so it is dropped whole.
            (format!("{}é", "a".repeat(1022)), 1022),
            ("%d".repeat(100), 1023),
        ];
        for (template, want_len) in cases {
            let (got, _) = expand(template, &ctx);
            assert_eq!(got.len(), *want_len);
        }
    }

    #[test]
    fn received_detection() {
        let cases: &[(&str, bool)] = &[
            ("Received: by x", true),
            ("received:by x", true),
            ("RECEIVED: x", true),
            ("Received", false),
            (" Received: x", false),
            ("X-Received: x", false),
            ("Receivéd: x", false),
            ("", false),
        ];
        for (header, want) in cases {
            assert_eq!(is_received(header), *want, "{header:?}");
        }
    }
}
