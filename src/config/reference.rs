//! What every setting means and its default, in words, from the registry
//! ([`super::settings::SETTINGS`]): the settings of `proxsmtpd.conf(5)` (`proxsmtpd --man 5`,
//! rendered by `src/man.rs`) and the README's settings table ([`readme_table`]; a unit test
//! fails while the README's copy differs, `UPDATE_README=1` rewrites it).

pub use super::settings::Setting as SettingDoc;
use super::settings::SETTINGS;

/// Every setting's documentation, in the registry's order.
pub const SETTING_DOCS: &[SettingDoc] = SETTINGS;

/// The documentation of a setting, by its `proxsmtpd.conf` name.
pub fn doc(name: &str) -> Option<&'static SettingDoc> {
    SETTING_DOCS.iter().find(|d| d.name == name)
}

/// The line before the README's settings table.
pub const README_BEGIN: &str = "<!-- settings table: generated from the registry in \
    src/config/settings.rs; UPDATE_README=1 cargo test --release --lib readme rewrites it -->";
/// The line after it.
pub const README_END: &str = "<!-- end of settings table -->";

/// The README's settings table (Markdown), one row per setting in the registry's order.
pub fn readme_table() -> String {
    // Markdown: `|` would end the cell, `<` start an HTML tag.
    let cell = |text: &str| text.replace('|', "\\|").replace('<', "&lt;");
    let mut table =
        String::from("| Setting | Environment | Default | Meaning |\n|---|---|---|---|\n");
    for s in SETTINGS {
        table.push_str(&format!(
            "| `{}` | `{}` | {} | {} |\n",
            s.name,
            s.env_var(),
            cell(s.default),
            cell(s.doc)
        ));
    }
    table
}

/// `readme` with the text between [`README_BEGIN`] and [`README_END`] replaced by `table`;
/// `None` when the markers are missing.
pub fn replace_readme_table(readme: &str, table: &str) -> Option<String> {
    let begin = readme.find(README_BEGIN)? + README_BEGIN.len();
    let end = begin + readme[begin..].find(README_END)?;
    Some(format!("{}\n{table}{}", &readme[..begin], &readme[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The README's settings table is the registry's; `UPDATE_README=1` rewrites it.
    #[test]
    fn readme_table_is_the_registry() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(path).expect("README.md");
        let want = replace_readme_table(&readme, &readme_table())
            .expect("README.md has the settings table markers");
        if std::env::var_os("UPDATE_README").is_some_and(|v| v == "1") {
            std::fs::write(path, &want).expect("rewrite README.md");
            return;
        }
        assert!(
            readme == want,
            "README.md's settings table differs from the registry: run \
             UPDATE_README=1 cargo test --release --lib readme"
        );
    }

    #[test]
    fn readme_table_rows() {
        let table = readme_table();
        assert_eq!(table.lines().count(), SETTINGS.len() + 2);
        assert!(table.contains(
            "| `MaxConnections` | `PROXSMTPD_MAX_CONNECTIONS` | 64 | The most concurrent"
        ));
        let readme = format!("a\n{README_BEGIN}\nold\n{README_END}\nb\n");
        assert_eq!(
            replace_readme_table(&readme, "new\n").as_deref(),
            Some(format!("a\n{README_BEGIN}\nnew\n{README_END}\nb\n").as_str())
        );
        assert_eq!(replace_readme_table("no markers", "new\n"), None);
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
