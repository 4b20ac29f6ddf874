//! No import circle between the top-level modules of either crate: a module that names
//! `crate::other` depends on it, and no chain of such dependencies comes back to where it
//! started (comments and `#[cfg(test)] mod tests` blocks apart). A circle means two modules
//! can only be understood, changed or embedded together.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module -> the top-level modules its code names through `crate::`.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if !path.extension().is_some_and(|e| e == "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let first = rel.components().next().unwrap().as_os_str();
            let top = first.to_string_lossy().trim_end_matches(".rs").to_owned();
            if top == "lib" || top == "main" || rel.ends_with("tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let name: String = line[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != top {
                        g.entry(top.clone()).or_default().insert(name);
                    }
                }
            }
        }
    }
    g
}

/// Every module from which a chain of dependencies leads back to it, with one such chain.
fn circles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for start in g.keys() {
        let mut seen = BTreeSet::new();
        let mut todo = vec![vec![start.clone()]];
        while let Some(path) = todo.pop() {
            let last = path.last().unwrap();
            for next in g.get(last).into_iter().flatten() {
                if next == start {
                    let mut c = path.clone();
                    c.push(start.clone());
                    found.push(c);
                } else if seen.insert(next.clone()) {
                    let mut p = path.clone();
                    p.push(next.clone());
                    todo.push(p);
                }
            }
        }
    }
    found
}

#[test]
fn no_module_imports_its_way_back_to_itself() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for krate in ["proxy-core/src", "proxy-bin/src"] {
        let g = graph(&root.join(krate));
        assert!(g.len() > 5, "{krate}: the module graph was not read");
        let found = circles(&g);
        assert!(
            found.is_empty(),
            "{krate}: import circles:\n{}",
            found
                .iter()
                .map(|c| c.join(" -> "))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn a_circle_is_found() {
    let mut g = BTreeMap::new();
    g.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    g.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    g.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    g.insert("d".to_owned(), BTreeSet::from(["a".to_owned()]));
    let found = circles(&g);
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found.contains(&vec!["a".into(), "b".into(), "c".into(), "a".into()]));
}
