//! Tests of the TOML reader.

use super::print::toml_str;
use super::*;

const GOOD: &str = r#"
drain_timeout = "5s"

[[listener]]
name = "agents"
listen = "127.0.0.1:1514"
backends = [
  { address = "127.0.0.1:11514" },
  { address = "127.0.0.2:11514", weight = 3, backup = true },
]

[[listener]]
name = "enrollment"
listen = "127.0.0.1:1515"
kind = "tcp"
backends = [{ address = "127.0.0.1:11515" }]
"#;

#[test]
fn a_good_file_and_its_defaults() {
    let c = Config::parse(GOOD, "good.toml").unwrap();
    assert_eq!(c.drain_timeout, Duration::from_secs(5));
    assert_eq!(c.batch_window, DEFAULT_BATCH_WINDOW);
    assert_eq!(c.listeners.len(), 2);
    let a = &c.listeners[0];
    assert_eq!(
        (a.kind(), a.balance),
        (ListenerKind::Agent, Policy::AgentId)
    );
    assert_eq!(a.backends[1].weight, 3);
    assert!(a.backends[1].backup);
    assert_eq!(c.listeners[1].balance, Policy::Source);
    // The printed effective config parses back to the same thing.
    let again = Config::parse(&c.to_toml(), "effective").unwrap();
    assert_eq!(again.to_toml(), c.to_toml());
}

/// What the core runs an agent listener with.
fn agent_settings(l: &Listener) -> wazuh_proxy_core::proxy::AgentSettings {
    l.spec.agent().unwrap().settings(l.source_limits)
}

/// What the core runs an enroll listener with.
fn enroll(l: &Listener) -> wazuh_proxy_core::enroll::EnrollConfig {
    match &l.spec {
        ListenerSpec::Enroll(e) => e.config(l.source_limits),
        other => panic!("not an enroll listener: {other:?}"),
    }
}

/// What the core runs a tcp listener with.
fn tcp(l: &Listener) -> wazuh_proxy_core::tcp::TcpRelayConfig {
    match &l.spec {
        ListenerSpec::Tcp(t) => t.relay(l.source_limits),
        other => panic!("not a tcp listener: {other:?}"),
    }
}

fn err(text: &str) -> String {
    Config::parse(text, "x.toml").unwrap_err().to_string()
}

// Found by the config_toml fuzz target: Rust's `{:?}` wrote U+0590 as `\u{590}`, which
// TOML does not read back.
#[test]
fn printed_strings_are_toml_whatever_they_hold() {
    let odd = "/var\u{590}ssec/etc/cl\tient \"keys\"\u{0}.keys";
    let text = GOOD.replacen(
        "name = \"agents\"",
        &format!(
            "name = {}\nkeys = {}",
            toml_str("a\u{7f}b\u{590}"),
            toml_str(odd)
        ),
        1,
    );
    let c = Config::parse(&text, "x.toml").unwrap();
    let printed = c.to_toml();
    let again = Config::parse(&printed, "printed.toml").unwrap();
    assert_eq!(again.to_toml(), printed);
    assert_eq!(again.listeners[0].name, "a\u{7f}b\u{590}");
    let keys = agent_settings(&again.listeners[0]).keys.unwrap();
    assert_eq!(keys.path, std::path::Path::new(odd));
}

#[test]
fn batch_window_is_bounded() {
    let with = |w: &str| {
        GOOD.replace(
            "drain_timeout = \"5s\"",
            &format!("drain_timeout = \"5s\"\nbatch_window = \"{w}\""),
        )
    };
    let c = Config::parse(&with("0s"), "x.toml").unwrap();
    assert_eq!(c.batch_window, Duration::ZERO);
    let c = Config::parse(&with("1ms"), "x.toml").unwrap();
    assert_eq!(c.batch_window, Duration::from_millis(1));
    let e = err(&with("1s"));
    assert!(
        e.starts_with("x.toml:3:") && e.contains("at most 5ms"),
        "{e}"
    );
}

#[test]
fn unknown_keys_are_errors_with_their_line() {
    let bad = GOOD.replace("weight = 3", "wieght = 3");
    let e = err(&bad);
    assert!(e.starts_with("x.toml:9:"), "{e}");
    assert!(e.contains("wieght"), "{e}");
    let e = err("bogus = 1\n[[listener]]\nlisten = \"127.0.0.1:1\"\nbackends = []\n");
    assert!(e.starts_with("x.toml:1:"), "{e}");
}

#[test]
fn bad_values_name_their_line() {
    let e = err(&GOOD.replace("\"5s\"", "\"5 parsecs\""));
    assert!(e.starts_with("x.toml:2:") && e.contains("duration"), "{e}");
    let e = err(&GOOD.replace("kind = \"tcp\"", "kind = \"http\""));
    assert!(
        e.starts_with("x.toml:15:") && e.contains("unknown listener kind"),
        "{e}"
    );
    let e = err(&GOOD.replace("127.0.0.1:11515", "nowhere"));
    assert!(e.starts_with("x.toml:16:"), "{e}");
    let e = err(&GOOD.replace("[{ address = \"127.0.0.1:11515\" }]", "[]"));
    assert!(e.starts_with("x.toml:16:"), "{e}");
    let e = err(&GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\nbalance = \"agent-id\""));
    assert!(e.contains("agent-id"), "{e}");
    let e = err(&GOOD.replace("1515\"", "1514\""));
    assert!(e.contains("used by two listeners"), "{e}");
    assert!(err("").contains("no [[listener]]"));
}

#[test]
fn admin_settings() {
    let c = Config::parse(GOOD, "good.toml").unwrap();
    assert_eq!(c.admin, AdminSettings::default());
    assert_eq!(c.admin.listen, Some(DEFAULT_ADMIN));
    let text = format!("admin = \"none\"\n{GOOD}");
    let c = Config::parse(&text, "x.toml").unwrap();
    assert_eq!(c.admin.listen, None);
    assert_eq!(Config::parse(&c.to_toml(), "e").unwrap().admin, c.admin);
    let text = format!("admin = \"127.0.0.1:9600\"\nadmin_token_file = \"/etc/t\"\n{GOOD}");
    let c = Config::parse(&text, "x.toml").unwrap();
    assert_eq!(c.admin.listen, Some("127.0.0.1:9600".parse().unwrap()));
    assert_eq!(c.admin.token_file, Some(PathBuf::from("/etc/t")));
    assert_eq!(Config::parse(&c.to_toml(), "e").unwrap().admin, c.admin);
    let e = err(&format!("\nadmin = \"nowhere\"\n{GOOD}"));
    assert!(e.starts_with("x.toml:2:") && e.contains("none"), "{e}");
    let e = err(&format!("admin_token_file = \"\"\n{GOOD}"));
    assert!(e.starts_with("x.toml:1:"), "{e}");
}

#[test]
fn enroll_listeners_need_an_explicit_backend_tls_choice() {
    let base = "[[listener]]\nlisten = \"127.0.0.1:1515\"\nkind = \"enroll\"\nbackends = [{ address = \"127.0.0.1:11515\" }]\n";
    let e = err(base);
    assert!(
        e.contains("backend_ca") && e.contains("backend_verify = false"),
        "{e}"
    );
    let c = Config::parse(
        &format!("{base}backend_verify = false\ntls_dir = \"/tmp/x\"\n"),
        "x.toml",
    )
    .unwrap();
    let l = &c.listeners[0];
    assert_eq!(
        (l.kind(), l.balance),
        (ListenerKind::Enroll, Policy::Source)
    );
    let e = &enroll(l);
    assert!(matches!(
        e.backend_tls,
        wazuh_proxy_core::enroll::BackendTls::NoVerify
    ));
    assert_eq!(e.replay_ttl, Duration::from_secs(600));
    let again = Config::parse(&c.to_toml(), "effective").unwrap();
    assert_eq!(again.to_toml(), c.to_toml());
    let e = err(&format!(
        "{base}tls_cert = \"/a.pem\"\nbackend_verify = false\n"
    ));
    assert!(e.contains("tls_cert and tls_key go together"), "{e}");
    let e = err(&GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\nbackend_ca = \"/ca.pem\""));
    assert!(e.contains("only used by kind = \"enroll\""), "{e}");
}

#[test]
fn backend_client_certificate_is_checked_with_its_line() {
    let dir = std::env::temp_dir().join(format!("wazuh-proxy-cfg-cert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pair = rcgen::generate_simple_self_signed(vec!["proxy".to_owned()]).unwrap();
    let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
    std::fs::write(&cert, pair.cert.pem()).unwrap();
    std::fs::write(&key, pair.key_pair.serialize_pem()).unwrap();
    let base = "[[listener]]\nlisten = \"127.0.0.1:1515\"\nkind = \"enroll\"\nbackend_verify = false\nbackends = [{ address = \"127.0.0.1:11515\" }]\n";
    let good = format!(
        "{base}backend_cert = {:?}\nbackend_key = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    let c = Config::parse(&good, "x.toml").unwrap();
    let e = &enroll(&c.listeners[0]);
    assert_eq!(
        e.backend_client_cert,
        Some(wazuh_proxy_core::enroll::ClientCert {
            cert: cert.clone(),
            key: key.clone()
        })
    );
    let again = Config::parse(&c.to_toml(), "effective").unwrap();
    assert_eq!(again.to_toml(), c.to_toml());

    let e = err(&format!("{base}backend_cert = \"/a.pem\"\n"));
    assert!(e.contains(":6:"), "{e}");
    assert!(
        e.contains("backend_cert and backend_key go together"),
        "{e}"
    );
    let missing = good.replace("k.pem", "missing.pem");
    let e = err(&missing);
    assert!(e.contains(":7:") && e.contains("missing.pem"), "{e}");
    // A key that is not the certificate's.
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(dir.join("other.pem"), other.serialize_pem()).unwrap();
    let e = err(&good.replace("k.pem", "other.pem"));
    assert!(
        e.contains(":6:") && e.contains("backend_cert/backend_key"),
        "{e}"
    );
    let e = err(&GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\nbackend_key = \"/k.pem\""));
    assert!(e.contains("only used by kind = \"enroll\""), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn source_address_mode() {
    let c = Config::parse(GOOD, "good.toml").unwrap();
    assert!(!agent_settings(&c.listeners[0]).relay.transparent);
    assert!(c.to_toml().contains("source = \"proxy\""));
    let text = GOOD.replace(
        "name = \"agents\"",
        "name = \"agents\"\nsource = \"transparent\"",
    );
    let c = Config::parse(&text, "x.toml").unwrap();
    assert!(agent_settings(&c.listeners[0]).relay.transparent);
    let shown = c.to_toml();
    assert!(shown.contains("source = \"transparent\""), "{shown}");
    assert!(
        agent_settings(&Config::parse(&shown, "e").unwrap().listeners[0])
            .relay
            .transparent
    );
    let e = err(&GOOD.replace("name = \"agents\"", "name = \"agents\"\nsource = \"agent\""));
    assert!(
        e.starts_with("x.toml:6:") && e.contains("expected proxy or transparent"),
        "{e}"
    );
    let e = err(&GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\nsource = \"transparent\""));
    assert!(
        e.starts_with("x.toml:16:") && e.contains("only used by kind = \"agent\""),
        "{e}"
    );
}

#[test]
fn health_checks_match_the_listener() {
    use wazuh_proxy_core::health::Probe;
    let udp = "[[listener]]\nlisten = \"127.0.0.1:1514\"\nkind = \"udp\"\nbackends = [{ address = \"127.0.0.1:11514\" }]\n";
    // UDP: no probe unless asked; "agent" is the UDP #ping probe.
    let c = Config::parse(udp, "x.toml").unwrap();
    assert_eq!(c.listeners[0].health, None);
    let c = Config::parse(&format!("{udp}health_check = \"agent\"\n"), "x.toml").unwrap();
    assert_eq!(c.listeners[0].health.unwrap().probe, Probe::AgentUdp);
    let again = Config::parse(&c.to_toml(), "e").unwrap();
    assert_eq!(again.listeners[0].health, c.listeners[0].health);
    // Timing without a probe is refused, with its line and the kind.
    let e = err(&format!("{udp}health_check_fall = 2\n"));
    assert!(
        e.starts_with("x.toml:5:") && e.contains("kind = \"udp\""),
        "{e}"
    );
    // Agent listeners: tcp by default, agent on request.
    let c = Config::parse(GOOD, "x.toml").unwrap();
    assert_eq!(c.listeners[0].health.unwrap().probe, Probe::Connect);
    let text = GOOD.replace(
        "name = \"agents\"",
        "name = \"agents\"\nhealth_check = \"agent\"",
    );
    let c = Config::parse(&text, "x.toml").unwrap();
    assert_eq!(c.listeners[0].health.unwrap().probe, Probe::AgentTcp);
    assert_eq!(
        Config::parse(&c.to_toml(), "e").unwrap().listeners[0].health,
        c.listeners[0].health
    );
    // #ping means nothing to a byte relay or the enrollment port.
    let e = err(&GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\nhealth_check = \"agent\""));
    assert!(
        e.starts_with("x.toml:16:") && e.contains("kind = \"tcp\""),
        "{e}"
    );
    let e = err(&GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\nhealth_check = \"icmp\""));
    assert!(e.contains("expected none, tcp or agent"), "{e}");
    let e = err(&GOOD.replace(
        "kind = \"tcp\"",
        "kind = \"tcp\"\nhealth_check = \"tcp\"\nhealth_check_interval = \"0s\"",
    ));
    assert!(e.contains("turns them off"), "{e}");
    let c = Config::parse(
        &GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\nhealth_check = \"none\""),
        "x",
    )
    .unwrap();
    assert_eq!(c.listeners[1].health, None);
}

#[test]
fn keys_of_other_kinds_are_refused_with_their_line_and_the_kind() {
    let e = err(&GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\nduplicate = \"reject\""));
    assert!(e.starts_with("x.toml:16:"), "{e}");
    assert!(
        e.contains(
            "duplicate is only used by kind = \"agent\" listeners; this listener is kind = \"tcp\""
        ),
        "{e}"
    );
    let udp = "[[listener]]\nlisten = \"127.0.0.1:1514\"\nkind = \"udp\"\n  connect_timeout = \"2s\"\nbackends = [{ address = \"127.0.0.1:11514\" }]\n";
    let e = err(udp);
    assert!(
        e.starts_with("x.toml:4:3:") && e.contains("kind = \"udp\""),
        "{e}"
    );
    // Per-source limits and the first-byte deadline apply to tcp listeners.
    let text = GOOD.replace(
        "kind = \"tcp\"",
        "kind = \"tcp\"\nmax_connections_per_source = 5\nfirst_frame_timeout = \"3s\"",
    );
    let c = Config::parse(&text, "x.toml").unwrap();
    assert_eq!(c.listeners[1].source_limits.max_open, 5);
    assert_eq!(
        tcp(&c.listeners[1]).first_byte_timeout,
        Some(Duration::from_secs(3))
    );
    assert_eq!(
        tcp(&Config::parse(GOOD, "x").unwrap().listeners[1]).first_byte_timeout,
        None
    );
    let again = Config::parse(&c.to_toml(), "e").unwrap();
    assert_eq!(again.to_toml(), c.to_toml());
}

#[test]
fn quick_form() {
    let c = Config::quick(
        "127.0.0.1:1514",
        &["127.0.0.1:1".into(), "127.0.0.1:2".into()],
        Policy::LeastConn,
    )
    .unwrap();
    assert_eq!(c.listeners[0].backends.len(), 2);
    assert!(Config::quick("127.0.0.1:1514", &[], Policy::AgentId).is_err());
}

#[test]
fn srv_backends_and_resolvers_are_checked_with_their_line() {
    let l = "[[listener]]\nlisten = \"127.0.0.1:0\"\n";
    let e = err(&format!(
        "{l}backends = [{{ srv = \"_wazuh._tcp.x.test\" }}]\n"
    ));
    assert!(
        e.contains("srv needs resolve_interval") && e.contains("x.toml:3"),
        "{e}"
    );
    let e = err(&format!(
        "{l}resolve_interval = \"10s\"\nbackends = [{{ srv = \"_a._tcp.x\", address = \"127.0.0.1:1\" }}]\n"
    ));
    assert!(e.contains("address or srv, not both"), "{e}");
    let e = err(&format!("{l}backends = [{{ weight = 2 }}]\n"));
    assert!(e.contains("needs address (host:port) or srv"), "{e}");
    let e = err(&format!(
        "resolvers = [\"10.0.0.1\", \"dns.example\"]\n{l}backends = [{{ address = \"127.0.0.1:1\" }}]\n"
    ));
    assert!(
        e.contains("\"dns.example\" is not an IP address") && e.contains("x.toml:1"),
        "{e}"
    );
    let c = Config::parse(
        &format!("resolvers = [\"10.0.0.1\", \"[::1]:5353\"]\n{l}backends = [{{ address = \"127.0.0.1:1\" }}]\n"),
        "x.toml",
    )
    .unwrap();
    assert_eq!(
        c.resolvers,
        vec![
            "10.0.0.1:53".parse::<SocketAddr>().unwrap(),
            "[::1]:5353".parse().unwrap()
        ]
    );
    let again = Config::parse(&c.to_toml(), "e").unwrap();
    assert_eq!(again.resolvers, c.resolvers);
}

/// For every kind, the effective configuration printed and read again is the same
/// configuration, and prints the same.
#[test]
fn printed_configuration_reads_back_the_same_for_every_kind() {
    let text = r#"
drain_timeout = "7s"
admin = "none"
user = "wazuh"
resolvers = ["127.0.0.1"]

[[listener]]
name = "agents"
listen = "127.0.0.1:1514"
duplicate = "reject"
idle_timeout = "0s"
rebalance_interval = "0s"
keys = "/etc/client.keys"
proxy_protocol = true
proxy_protocol_trusted = ["10.0.0.0/8", "127.0.0.1/32"]
source = "transparent"
resolve_interval = "30s"
backends = [{ address = "127.0.0.1:11514", weight = 2 }, { address = "localhost:11515", backup = true }]

[[listener]]
name = "udp"
listen = "127.0.0.1:1514"
kind = "udp"
idle_timeout = "0s"
max_payload = 4096
health_check = "agent"
backends = [{ address = "127.0.0.1:11514" }]

[[listener]]
name = "api"
listen = "127.0.0.1:55000"
kind = "tcp"
first_frame_timeout = "3s"
tcp_keepalive = "0s"
max_connections_per_source = 3
connection_rate_per_source = 2.5
backends = [{ address = "127.0.0.1:55001", max_fails = 0, fail_timeout = "1m 30s" }]

[[listener]]
name = "enroll"
listen = "127.0.0.1:1515"
kind = "enroll"
tls_cert = "/c.pem"
tls_key = "/k.pem"
backend_ca = "/ca.pem"
backend_server_name = "manager"
replay_ttl = "0s"
health_check = "none"
backends = [{ address = "127.0.0.1:11515" }]

[[listener]]
name = "enroll-self-signed"
listen = "127.0.0.1:1516"
kind = "enroll"
backend_verify = false
tls_dir = "/tmp/x"
backends = [{ address = "127.0.0.1:11515" }]
"#;
    let c = Config::parse(text, "x.toml").unwrap();
    let kinds: Vec<ListenerKind> = c.listeners.iter().map(Listener::kind).collect();
    assert_eq!(
        kinds,
        [
            ListenerKind::Agent,
            ListenerKind::Udp,
            ListenerKind::Tcp,
            ListenerKind::Enroll,
            ListenerKind::Enroll
        ]
    );
    let printed = c.to_toml();
    let again =
        Config::parse(&printed, "printed.toml").unwrap_or_else(|e| panic!("{e}\n{printed}"));
    assert_eq!(again.listeners, c.listeners, "{printed}");
    assert_eq!(again.to_toml(), printed);
    assert_eq!(
        (
            again.drain_timeout,
            again.admin,
            again.user,
            again.resolvers
        ),
        (c.drain_timeout, c.admin, c.user, c.resolvers)
    );
    // Each kind's defaults, written out, read back the same too.
    for kind in ["agent", "udp", "tcp"] {
        let c = Config::parse(
            &format!("[[listener]]\nlisten = \"127.0.0.1:1\"\nkind = \"{kind}\"\nbackends = [{{ address = \"127.0.0.1:9\" }}]\n"),
            "x.toml",
        )
        .unwrap();
        let again = Config::parse(&c.to_toml(), "printed.toml").unwrap();
        assert_eq!(again.listeners, c.listeners, "{kind}");
        let defaults = kind.parse::<ListenerKind>().unwrap().default_spec();
        assert_eq!(Some(again.listeners[0].spec.clone()), defaults, "{kind}");
    }
}

/// A listener's settings are checked against the other settings of its own kind only: tcp,
/// udp and enroll listeners have no agent reply or liveness timeout to bound their idle
/// timeout, nor an idle timeout to bound their first-frame deadline.
#[test]
fn settings_are_checked_against_their_own_kind_only() {
    let listener = |kind: &str, extra: &str| {
        format!("[[listener]]\nlisten = \"127.0.0.1:1\"\nkind = \"{kind}\"\n{extra}\nbackends = [{{ address = \"127.0.0.1:9\" }}]\n")
    };
    for kind in ["tcp", "udp"] {
        let c = Config::parse(&listener(kind, "idle_timeout = \"5s\""), "x.toml").unwrap();
        assert_eq!(
            c.listeners[0].spec.idle_timeout(),
            Some(Duration::from_secs(5))
        );
    }
    let e = err(&listener("agent", "idle_timeout = \"5s\""));
    assert!(
        e.starts_with("x.toml:1:") && e.contains("must be shorter than idle_timeout"),
        "{e}"
    );
    let c = Config::parse(
        &listener(
            "enroll",
            "backend_verify = false\nfirst_frame_timeout = \"20m\"",
        ),
        "x.toml",
    )
    .unwrap();
    assert_eq!(
        enroll(&c.listeners[0]).request_timeout,
        Duration::from_secs(1200)
    );
    // What a tcp listener has is still checked.
    let e = err(&listener("tcp", "first_frame_timeout = \"0s\""));
    assert!(e.contains("first_frame_timeout must be more than 0"), "{e}");
    let e = err(&listener(
        "tcp",
        "first_frame_timeout = \"20s\"\nidle_timeout = \"10s\"",
    ));
    assert!(
        e.contains("idle_timeout (10s) must be longer than first_frame_timeout (20s)"),
        "{e}"
    );
    let e = err(&listener("tcp", "tcp_keepalive = \"99999s\""));
    assert!(e.contains("tcp_keepalive must be 1s..=32767s"), "{e}");
}
