//! [`Config::parse`] (the TOML configuration) on arbitrary text.
//!
//! Checked on every input: parsing never panics; an error names the origin with a line and
//! column inside the text; an accepted configuration prints (`to_toml`) to text that parses
//! again to the same printed form.
//!
//! Host names in a configuration go to the system resolver; inputs that would send one there
//! (a string value `host:port` that is not an IP address, other than `localhost`) are skipped,
//! and so are inputs with an `srv` backend, so that the fuzzer never waits on DNS.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use wazuh_proxy::config::{Config, ConfigError};

fn resolves_a_name(v: &toml::Value) -> bool {
    match v {
        toml::Value::String(s) => {
            s.parse::<SocketAddr>().is_err()
                && s.rsplit_once(':')
                    .is_some_and(|(host, port)| port.parse::<u16>().is_ok() && host != "localhost")
        }
        toml::Value::Array(a) => a.iter().any(resolves_a_name),
        // An SRV record name is looked up in DNS too.
        toml::Value::Table(t) => t.contains_key("srv") || t.values().any(resolves_a_name),
        _ => false,
    }
}

fn lines_of(text: &str) -> usize {
    text.matches('\n').count() + 1
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(v) = toml::from_str::<toml::Value>(text) {
        if resolves_a_name(&v) {
            return;
        }
    }
    match Config::parse(text, "fuzz.toml") {
        Ok(c) => {
            let printed = c.to_toml();
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
            assert_eq!(origin, "fuzz.toml");
            assert!(
                line >= 1 && line <= lines_of(text),
                "line {line}: {message}"
            );
            assert!(column >= 1, "{message}");
        }
        Err(other) => panic!("parsing text gave {other}"),
    }
});
