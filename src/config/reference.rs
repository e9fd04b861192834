//! What every setting means and its default, in words: the text of `proxsmtpd.conf(5)`
//! (`proxsmtpd --man 5`). One entry per setting of [`super::names::SETTINGS`], in the same
//! order; a unit test keeps the two lists equal, so a new setting cannot be left out of the
//! manual.

/// The documentation of one setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingDoc {
    /// The `proxsmtpd.conf` name, as in [`super::names::SettingName::name`].
    pub name: &'static str,
    /// The default, as an operator would write or read it.
    pub default: &'static str,
    /// What it does (plain text, sentences).
    pub doc: &'static str,
    /// Whether proxsmtpd 1.10 had it (else it is one of the newer settings).
    pub original: bool,
}

const fn o(name: &'static str, default: &'static str, doc: &'static str) -> SettingDoc {
    SettingDoc {
        name,
        default,
        doc,
        original: true,
    }
}

const fn n(name: &'static str, default: &'static str, doc: &'static str) -> SettingDoc {
    SettingDoc {
        name,
        default,
        doc,
        original: false,
    }
}

/// Every setting's documentation, in the order of [`super::names::SETTINGS`].
pub const SETTING_DOCS: &[SettingDoc] = &[
    o(
        "FilterCommand",
        "unset (no filtering)",
        "The command every message is filtered through, run as /bin/sh -c with this value. \
         Specify all the arguments the command needs as on a command line. An empty value \
         runs sh -c \"\", which forwards an empty message.",
    ),
    o(
        "FilterTimeout",
        "30",
        "Seconds of filter inactivity (no output) before it is killed and the message \
         deferred with 451; also how long the filter may take to exit and the grace time \
         between SIGTERM and SIGKILL. Must be greater than 0.",
    ),
    o(
        "FilterType",
        "pipe",
        "pipe: the message on the filter's standard input, the message to deliver on its \
         standard output. file: the message in the file named by $EMAIL, edited in place. \
         reject: no filter; every MAIL, RCPT and DATA is refused with FilterReject.",
    ),
    o(
        "FilterReject",
        "530 Email Rejected",
        "The reply in reject mode; a text without a leading SMTP code becomes \
         550 Content Rejected; <text>.",
    ),
    o(
        "Header",
        "none",
        "A header line added to every filtered message. %i is the client's IP address, %l \
         the local IP address, %d the date, %% a percent sign; \\r, \\n and \\t are escapes. \
         A header starting with Received: goes first, any other at the end of the header \
         block.",
    ),
    o(
        "KeepAlives",
        "0 (off)",
        "Seconds of upstream silence after which a NOOP is sent upstream while the message \
         arrives and while the filter runs, so that the upstream does not time out.",
    ),
    o(
        "Listen",
        "0.0.0.0:10025",
        "Where to accept SMTP connections: address:port, [IPv6]:port, a bare port (all IPv4 \
         addresses) or the path of a unix socket.",
    ),
    o(
        "MaxConnections",
        "64",
        "The most concurrent client connections (2 to 10239); more are told \
         421 Server busy, too many connections.",
    ),
    o(
        "OutAddress",
        "none; required unless TransparentProxy is on",
        "The upstream SMTP server: host:port, 1.2.3.4:25, [::1]:25, a bare port (connect \
         back to the client's own address on that port, see LOOPBACK FEATURE in \
         proxsmtpd(8)) or a unix socket path. The port defaults to 25. Host names are \
         resolved again for every connection.",
    ),
    o(
        "PidFile",
        "none",
        "A file the process id is written to; it overrides the -p option.",
    ),
    o(
        "Skip",
        "none",
        "authenticated: messages of clients that authenticated with the upstream (AUTH \
         answered 235) pass unfiltered. The setting may be repeated.",
    ),
    o(
        "TempDirectory",
        "/tmp/",
        "Where message bodies are spooled (files proxsmtpd.XXXXXX, mode 0600, always \
         removed) when there is a filter, or KeepAlives without one; also the filter's \
         TMPDIR. It should not be world-writable.",
    ),
    o(
        "TimeOut",
        "180",
        "Seconds a client has for each whole command line and the upstream for each whole \
         reply before the connection is closed (421 to the client); also the limit of every \
         write and of connecting upstream.",
    ),
    o(
        "TransparentProxy",
        "off",
        "client (or any true value): connect to the original destination of the \
         intercepted connection; full: also connect from the client's own address \
         (IP_TRANSPARENT). OutAddress is then ignored. See TRANSPARENT PROXY FEATURE in \
         proxsmtpd(8).",
    ),
    o(
        "User",
        "none",
        "The user (name or uid) to switch to once the listening sockets are bound; \
         supplementary groups are dropped.",
    ),
    o(
        "XClient",
        "off",
        "Send XCLIENT ADDR=<client address> upstream when the upstream offers XCLIENT, then \
         greet it again.",
    ),
    n(
        "AdminListen",
        "none (no admin server)",
        "address:port (or a bare port on all IPv4 addresses) of the admin HTTP server: \
         /livez, /readyz, /healthz and /metrics (Prometheus). Never the SMTP port.",
    ),
    n(
        "Container",
        "off",
        "Stay in the foreground without -d and log JSON lines to standard output.",
    ),
    n(
        "DrainTimeout",
        "30",
        "On SIGTERM or SIGINT, the seconds sessions in a transaction may take to finish \
         before they are told 421 and closed.",
    ),
    n(
        "MinDataRate",
        "500",
        "Bytes per second a message body must arrive at, as Postfix's \
         smtpd_min_data_rate: each read earns its bytes / rate seconds, never more than \
         TimeOut ahead; a slower client is told 421 4.4.2. 0 turns it off.",
    ),
    n(
        "ProxyProtocol",
        "off",
        "Expect a PROXY protocol v1 or v2 header from the peers listed in \
         ProxyProtocolTrusted.",
    ),
    n(
        "ProxyProtocolTrusted",
        "none",
        "Comma-separated networks (10.0.0.0/8, 2001:db8::/32; a bare address is one host) \
         allowed to send a PROXY protocol header.",
    ),
    n(
        "ReadinessCheckUpstream",
        "off",
        "Make /readyz also require that the upstream accepts connections (checked at most \
         every 10 seconds).",
    ),
    n(
        "LogFormat",
        "text",
        "text, or json: one JSON object per line on standard output, with the per-message \
         summary as fields.",
    ),
    n(
        "ReloadWatch",
        "on",
        "Watch the configuration file and the filter script and apply changes to new \
         messages, as SIGHUP does.",
    ),
    n(
        "TlsCertificate",
        "none",
        "PEM certificate chain (leaf first) offered to clients. With TlsKey it turns on \
         STARTTLS; without them STARTTLS is hidden and refused with 502, as by proxsmtpd \
         1.10. Reloaded when the file changes.",
    ),
    n(
        "TlsKey",
        "none",
        "The PEM private key of TlsCertificate (PKCS#8, PKCS#1 or SEC1).",
    ),
    n(
        "TlsRequired",
        "off",
        "Refuse MAIL, RCPT, DATA and AUTH before STARTTLS with \
         530 5.7.0 Must issue a STARTTLS command first.",
    ),
    n(
        "TlsListen",
        "none",
        "A second listener, same syntax as Listen (e.g. 0.0.0.0:10465), where clients speak \
         TLS from the first byte (implicit TLS, the port 465 style).",
    ),
    n(
        "UpstreamTls",
        "off",
        "STARTTLS towards the upstream: off, opportunistic (when the upstream offers it) or \
         required (else 421 to the client).",
    ),
    n(
        "UpstreamTlsCa",
        "the system store (/etc/ssl/certs)",
        "PEM bundle of the certificate authorities trusted for the upstream's certificate.",
    ),
    n(
        "UpstreamTlsVerify",
        "on",
        "Check the upstream's certificate and its name (the OutAddress host name or IP \
         address). Turn it off only for an upstream on the same host or pod.",
    ),
];

/// The documentation of a setting, by its `proxsmtpd.conf` name.
pub fn doc(name: &str) -> Option<&'static SettingDoc> {
    SETTING_DOCS.iter().find(|d| d.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::names::SETTINGS;

    /// Every setting is documented, in the same order, and nothing else is.
    #[test]
    fn every_setting_is_documented() {
        let names: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
        let documented: Vec<&str> = SETTING_DOCS.iter().map(|d| d.name).collect();
        assert_eq!(documented, names);
        for d in SETTING_DOCS {
            assert!(!d.default.is_empty() && !d.doc.is_empty(), "{}", d.name);
            assert!(d.doc.ends_with('.'), "{}: a sentence", d.name);
        }
        assert_eq!(doc("OutAddress").map(|d| d.original), Some(true));
        assert_eq!(doc("TlsKey").map(|d| d.original), Some(false));
    }

    /// A documented default that is a value (not "none", "unset ...") is the built-in one:
    /// written in a configuration file it changes nothing.
    #[test]
    fn documented_defaults_are_the_defaults() {
        let defaults = crate::config::Settings::default();
        let mut checked = 0;
        for d in SETTING_DOCS {
            let value = d.default.split(" (").next().unwrap_or("");
            if ["none", "unset", "the system store"]
                .iter()
                .any(|w| value.starts_with(w))
            {
                continue;
            }
            let mut s = crate::config::Settings::default();
            crate::config::apply_setting(&mut s, d.name, value)
                .unwrap_or_else(|e| panic!("{}: default {value:?}: {e}", d.name));
            assert_eq!(s, defaults, "{}: documented default {value:?}", d.name);
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} defaults checked");
    }
}
