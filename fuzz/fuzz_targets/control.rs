//! [`control::parse`] on arbitrary decrypted messages, and the builders parsed back.
//!
//! Checked on every input: parsing never panics and the kind agrees with the variant; an event
//! gives back its bytes as `<queue>:<location>:<text>`; a startup text built from a fuzzed
//! version parses back to that version; a keepalive built from fuzzed parts keeps its agent IP,
//! merged.mg sum and labels.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wazuh_proxy_core::control::{
    keepalive_text, parse, startup_text, Control, KeepaliveSpec, Message,
};

fuzz_target!(|data: &[u8]| {
    let m = parse(data);
    let kind = m.kind();
    assert!(!kind.is_empty());
    assert_eq!(m.is_control(), data.starts_with(b"#!-"));
    match &m {
        Message::Event(e) => {
            let mut back = vec![e.queue, b':'];
            back.extend_from_slice(e.location.as_bytes());
            back.push(b':');
            back.extend_from_slice(&e.text);
            if std::str::from_utf8(data).is_ok() {
                assert_eq!(back, data);
            }
        }
        Message::Other(t) => {
            if let Ok(s) = std::str::from_utf8(data) {
                assert_eq!(t, s);
            }
        }
        Message::Control(Control::Unknown(t)) => {
            if let Ok(s) = std::str::from_utf8(data) {
                assert_eq!(t, s);
            }
        }
        Message::Control(_) => {}
    }

    // Builders, from text cut out of the input.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let version = text;
    match parse(startup_text(Some(version)).as_bytes()) {
        Message::Control(Control::Startup(s)) => assert_eq!(s.version.as_deref(), Some(version)),
        other => panic!("startup parsed as {other:?}"),
    }

    let mut parts = text.split('\n');
    let (Some(ip), Some(sum), Some(label)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    // The version is read from the first " - Wazuh " of the uname line: keep that one ours.
    let os = parts.next().unwrap_or("").replace("Wazuh", "_");
    let uname = format!("Linux |h |{os} - Wazuh v4.14.7");
    // Label keys without quotes or '#'/'!' at the start, values not ending like a merged.mg line.
    let key = label.replace(['"', '#', '!'], "_");
    let value = format!("{key}v");
    let labels = [(key.as_str(), value.as_str())];
    let merged = (sum != "x" && !sum.ends_with(" merged.mg")).then_some(sum);
    let ip_ok = !ip.ends_with(" merged.mg");
    let spec = KeepaliveSpec {
        uname: &uname,
        agent_conf_md5: None,
        labels: &labels,
        merged_md5: merged,
        agent_ip: ip_ok.then_some(ip),
    };
    let built = keepalive_text(&spec);
    let Message::Control(Control::Keepalive(ka)) = parse(built.as_bytes()) else {
        panic!("keepalive {built:?} did not parse as one");
    };
    assert_eq!(ka.version.as_deref(), Some("v4.14.7"));
    assert_eq!(ka.merged_md5.as_ref().map(|m| m.as_deref()), Some(merged));
    if ip_ok {
        assert_eq!(ka.agent_ip.as_deref(), Some(ip));
    }
    assert!(ka
        .labels
        .iter()
        .any(|l| l.key == key && l.value == value && !l.hidden && !l.ignored));
});
