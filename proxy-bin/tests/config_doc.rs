//! docs/configuration.md lists exactly the keys the configuration parser accepts: a documented
//! key that is not parsed fails, and so does a parsed key that is not documented.

use std::collections::BTreeSet;

/// Keys in the first column of the table under `heading` (up to the next `## `).
fn documented(text: &str, heading: &str) -> BTreeSet<String> {
    let start = text
        .find(heading)
        .unwrap_or_else(|| panic!("no {heading:?} in docs/configuration.md"));
    let section = &text[start + heading.len()..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut keys = BTreeSet::new();
    for line in section.lines() {
        let Some(first) = line.split('|').nth(1) else {
            continue;
        };
        // `a`, `b` in one cell documents both.
        for k in first.split(',') {
            let k = k.trim();
            if k.len() > 2 && k.starts_with('`') && k.ends_with('`') {
                keys.insert(k.trim_matches('`').to_owned());
            }
        }
    }
    keys
}

#[test]
fn every_parsed_key_is_documented_and_every_documented_key_parsed() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md"),
    )
    .unwrap();
    let sections = [
        ("top", "## Top level"),
        ("listener", "## `[[listener]]`"),
        ("backend", "## Backends"),
    ];
    let parsed = wazuh_proxy::config::known_keys();
    assert_eq!(parsed.len(), sections.len());
    for ((name, keys), (section, heading)) in parsed.into_iter().zip(sections) {
        assert_eq!(name, section);
        let keys: BTreeSet<String> = keys.into_iter().collect();
        assert!(
            keys.len() > 3,
            "{name}: the parser's key list was not read: {keys:?}"
        );
        let docs = documented(&text, heading);
        let undocumented: Vec<_> = keys.difference(&docs).collect();
        let unparsed: Vec<_> = docs.difference(&keys).collect();
        assert!(
            undocumented.is_empty() && unparsed.is_empty(),
            "{heading}: parsed but not documented: {undocumented:?}; documented but not parsed: {unparsed:?}"
        );
    }
}

#[test]
fn the_key_list_follows_the_parser() {
    // A key the parser accepts is in the list, one it refuses is not.
    let parsed = wazuh_proxy::config::known_keys();
    let listener = &parsed[1].1;
    assert!(listener.iter().any(|k| k == "hold_timeout"));
    assert!(!listener.iter().any(|k| k == "max_open"));
    let text = "[[listener]]\nlisten = \"127.0.0.1:0\"\nhold_timeout = \"5s\"\nbackends = [{ address = \"127.0.0.1:1\" }]\n";
    assert!(wazuh_proxy::config::Config::parse(text, "t").is_ok());
    let text = text.replace("hold_timeout = \"5s\"", "max_open = 5");
    assert!(wazuh_proxy::config::Config::parse(&text, "t").is_err());
}
