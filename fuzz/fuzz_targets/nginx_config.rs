//! [`nginx::parse_str`] (nginx `stream {}` configuration) on arbitrary text, without files.
//!
//! Checked on every input: parsing never panics and never reads a file (an `include` is an
//! error); an error names the origin with a line and column inside the text; an accepted
//! configuration has at least one listener and prints (`to_toml`) to TOML that the TOML parser
//! accepts with the same printed form.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use wazuh_proxy::config::{Config, ConfigError};
use wazuh_proxy::nginx;

/// Names resolve to a loopback address picked from the name, never through DNS; names
/// starting with "none" resolve to nothing, "fail" to an error.
fn resolve(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    if host.starts_with("fail") {
        return Err(std::io::Error::other("no such host"));
    }
    if host.starts_with("none") {
        return Ok(Vec::new());
    }
    let n = host.bytes().fold(0u8, |a, b| a.wrapping_add(b));
    Ok(vec![
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n.max(1))), port),
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 1, n.max(1))), port),
    ])
}

fn lines_of(text: &str) -> usize {
    text.matches('\n').count() + 1
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match nginx::parse_str(text, "fuzz.conf", &resolve) {
        Ok(c) => {
            assert!(!c.listeners.is_empty());
            let printed = c.to_toml();
            // Host names were resolved to addresses, so the printed form resolves nothing.
            let again = Config::parse(&printed, "printed.toml")
                .unwrap_or_else(|e| panic!("printed config does not parse: {e}\n{printed}"));
            assert_eq!(again.to_toml(), printed);
        }
        Err(ConfigError::Invalid {
            origin,
            line,
            column,
            message,
        }) => {
            assert_eq!(origin, "fuzz.conf");
            assert!(
                line >= 1 && line <= lines_of(text),
                "line {line}: {message}"
            );
            assert!(column >= 1, "{message}");
        }
        Err(other) => panic!("parsing text gave {other}"),
    }
});
