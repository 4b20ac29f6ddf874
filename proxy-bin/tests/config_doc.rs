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

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path),
    )
    .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// README.md, SECURITY.md and docs/*.md.
fn prose() -> Vec<(String, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec!["README.md".to_owned(), "SECURITY.md".to_owned()];
    let mut docs: Vec<String> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    docs.sort();
    files.extend(docs);
    files.into_iter().map(|f| (repo_file(&f), f)).collect()
}

#[test]
fn settings_named_in_the_prose_exist() {
    let parsed = wazuh_proxy::config::known_keys();
    let all: BTreeSet<&str> = parsed
        .iter()
        .flat_map(|(_, keys)| keys.iter().map(String::as_str))
        .collect();
    let of = |section: &str| -> BTreeSet<&str> {
        parsed
            .iter()
            .find(|(s, _)| *s == section)
            .map(|(_, k)| k.iter().map(String::as_str).collect())
            .unwrap_or_default()
    };
    let (top, listener, backend) = (of("top"), of("listener"), of("backend"));
    let mut checked = 0;
    for (text, file) in prose() {
        // `key = value` in running text, and names after "key"/"keys" ("the listener keys
        // `a`, `b` and `c`").
        let pieces: Vec<&str> = text.split('`').collect();
        let mut in_list = false;
        for (i, span) in pieces.iter().enumerate().skip(1).step_by(2) {
            let before = pieces[i - 1].trim_end();
            let named = before.ends_with(" key")
                || before.ends_with(" keys")
                || (in_list && matches!(before, "," | ", and" | "and" | "or" | ", or" | "/"));
            in_list = false;
            let key = match span.split_once(" = ") {
                Some((key, _)) => key,
                None if named => span,
                None => continue,
            };
            if !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                assert!(all.contains(key), "{file}: `{span}` names no setting");
                in_list = true;
                checked += 1;
            }
        }
        // Every ```toml example: keys where they stand (a fragment may be one listener's).
        for block in text.split("```toml\n").skip(1) {
            let block = &block[..block.find("```").unwrap_or(block.len())];
            let table: toml::Table = toml::from_str(block)
                .unwrap_or_else(|e| panic!("{file}: a toml example does not parse: {e}"));
            for (key, value) in &table {
                assert!(
                    top.contains(key.as_str()) || listener.contains(key.as_str()),
                    "{file}: example key {key:?} is not a setting"
                );
                let listeners = match (key.as_str(), value) {
                    ("listener", toml::Value::Array(a)) => a.clone(),
                    _ => vec![],
                };
                for l in listeners.iter().filter_map(|l| l.as_table()) {
                    for (k, v) in l {
                        assert!(listener.contains(k.as_str()), "{file}: listener key {k:?}");
                        if k == "backends" {
                            for b in v.as_array().into_iter().flatten() {
                                for bk in b.as_table().into_iter().flat_map(|t| t.keys()) {
                                    assert!(
                                        backend.contains(bk.as_str()),
                                        "{file}: backend key {bk:?}"
                                    );
                                }
                            }
                        }
                    }
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 10, "only {checked} settings found in the prose");
}

#[test]
fn the_readme_stays_short_with_its_two_commands_first() {
    let readme = repo_file("README.md");
    let words = readme.split_whitespace().count();
    assert!(
        words <= 1500,
        "README.md has {words} words; the rest belongs in docs/"
    );
    let first = readme.find("\n## ").unwrap_or(readme.len());
    let second = readme[first + 1..]
        .find("\n## ")
        .map_or(readme.len(), |i| first + 1 + i);
    let try_it = &readme[first..second];
    for command in [
        "cargo run --release -p wazuh-proxy -- demo",
        "cargo test --workspace",
    ] {
        assert!(
            try_it.contains(command),
            "README's first section does not show `{command}`"
        );
    }
}
