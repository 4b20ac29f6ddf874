//! docs/metrics.md is the metrics reference: every metric it lists is exported by `/metrics`
//! with the documented type, every exported metric is listed, and the dashboard and alert rules
//! under deploy/ use only listed metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use wazuh_proxy_test_support::{free_addr, http, ProxyProcess};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// (name as scraped, type) from the tables of docs/metrics.md.
fn documented() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(repo().join("docs/metrics.md")).unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `name` | type | labels | meaning |
        if cells.len() < 5 || !cells[1].starts_with('`') {
            continue;
        }
        let name = cells[1].trim_matches('`').to_owned();
        assert!(
            out.insert(name.clone(), cells[2].to_owned()).is_none(),
            "{name} listed twice"
        );
    }
    assert!(out.len() > 20, "the tables were not read: {out:?}");
    out
}

/// (name as scraped, type) from `# TYPE` lines.
fn exported(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            let scraped = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            (scraped, kind.to_owned())
        })
        .collect()
}

#[test]
fn every_documented_metric_is_exported_and_every_exported_one_documented() {
    let manager = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = manager.local_addr().unwrap().to_string();
    let (listen, admin) = (free_addr(), free_addr());
    let (listen_s, admin_s) = (listen.to_string(), admin.to_string());
    let _proxy = ProxyProcess::start(
        &[
            "run",
            "--listen",
            &listen_s,
            "--backend",
            &backend,
            "--admin",
            &admin_s,
        ],
        listen,
    );
    let (status, text) = http("GET", admin, "/metrics");
    assert_eq!(status, 200, "{text}");
    let exported = exported(&text);
    let documented = documented();
    let missing: Vec<_> = documented
        .keys()
        .filter(|n| !exported.contains_key(*n))
        .collect();
    assert!(missing.is_empty(), "documented, not exported: {missing:?}");
    let undocumented: Vec<_> = exported
        .keys()
        .filter(|n| !documented.contains_key(*n))
        .collect();
    assert!(
        undocumented.is_empty(),
        "exported, not in docs/metrics.md: {undocumented:?}"
    );
    for (name, kind) in &documented {
        assert_eq!(&exported[name], kind, "type of {name}");
    }
    // The process metrics have values on Linux.
    for name in [
        "process_open_fds",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no sample of {name}"));
        let v: f64 = line.split(' ').nth(1).unwrap().parse().unwrap();
        assert!(v > 0.0, "{line}");
    }
    assert!(text.contains(&format!(
        "wazuh_proxy_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
}

#[test]
fn the_dashboard_and_alerts_use_documented_metrics_only() {
    let documented = documented();
    let histograms: BTreeSet<&String> = documented
        .iter()
        .filter(|(_, k)| *k == "histogram")
        .map(|(n, _)| n)
        .collect();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/wazuh-proxy.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() > 10));
    for file in [
        "deploy/grafana/wazuh-proxy.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        let mut used = 0;
        for (i, _) in text.match_indices(['w', 'p']) {
            let rest = &text[i..];
            if !(rest.starts_with("wazuh_proxy_") || rest.starts_with("process_")) {
                continue;
            }
            if i > 0 && text.as_bytes()[i - 1].is_ascii_alphanumeric() {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| histograms.contains(&b.to_string()));
            let known = documented.contains_key(&name) || base.is_some();
            assert!(
                known,
                "{file} uses {name}, which docs/metrics.md does not list"
            );
            used += 1;
        }
        assert!(used > 5, "{file}: no metric found");
    }
}
