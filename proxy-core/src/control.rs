//! Decrypted messages: `#!-` control messages in both directions, and events.
//!
//! [`parse`] never fails: a control message it does not know is kept as
//! [`Control::Unknown`], and text that is neither a control message nor a well-formed
//! `<queue>:<location>:<text>` event is [`Message::Other`]. Fields borrow the message; text is
//! decoded as UTF-8 where valid and lossily otherwise (agents send Latin-1 now and then).
//!
//! ```
//! use wazuh_proxy_core::control::{parse, Control, Message};
//! match parse(b"#!-agent startup {\"version\":\"v4.14.7\"}") {
//!     Message::Control(Control::Startup(s)) => assert_eq!(s.version.as_deref(), Some("v4.14.7")),
//!     other => panic!("{other:?}"),
//! }
//! assert_eq!(parse(b"1:/var/log/syslog:hello").kind(), "event");
//! assert_eq!(parse(b"#!-agent ack ").kind(), "ack");
//! ```

use std::borrow::Cow;
use std::fmt::Write as _;

/// The prefix of every control message.
pub const CONTROL_PREFIX: &[u8] = b"#!-";

/// `#!-agent startup ` (HC_STARTUP).
pub const STARTUP: &str = "#!-agent startup ";
/// `#!-agent shutdown ` (HC_SHUTDOWN).
pub const SHUTDOWN: &str = "#!-agent shutdown ";
/// `#!-agent ack ` (HC_ACK).
pub const ACK: &str = "#!-agent ack ";
/// `#!-force_reconnect`.
pub const FORCE_RECONNECT: &str = "#!-force_reconnect";

/// A decrypted MESSAGE, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// A `#!-` control message.
    Control(Control<'a>),
    /// An event `<queue>:<location>:<text>`.
    Event(Event<'a>),
    /// Anything else (kept as text).
    Other(Cow<'a, str>),
}

impl Message<'_> {
    /// A short static name: the control kind (`startup`, `keepalive`, `shutdown`, `ack`,
    /// `request`, `up_file`, `close_file`, `err`, `execd`, `force_reconnect`, `control`), or
    /// `event`, or `other`.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Control(c) => c.kind(),
            Message::Event(_) => "event",
            Message::Other(_) => "other",
        }
    }

    /// Whether this is a control message.
    pub fn is_control(&self) -> bool {
        matches!(self, Message::Control(_))
    }
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Control<'a> {
    /// `#!-agent startup ` with, since 4.6, `{"version":"vX.Y.Z"}` (agent -> manager).
    Startup(Startup<'a>),
    /// A keepalive (agent -> manager): uname, sums, labels.
    Keepalive(Keepalive<'a>),
    /// `#!-agent shutdown ` (agent -> manager; also echoed by some managers).
    Shutdown,
    /// `#!-agent ack ` (manager -> agent).
    Ack,
    /// `#!-req <counter> <body>`: a manager request, an agent's answer, or (UDP) `ack`.
    Request(Request<'a>),
    /// `#!-up file <md5> <name>`: start of a shared-file push.
    UpFile {
        /// MD5 of the whole file.
        md5: Cow<'a, str>,
        /// File name (`merged.mg`).
        name: Cow<'a, str>,
    },
    /// `#!-close file `: end of a shared-file push.
    CloseFile,
    /// `#!-err <json>`: startup refused.
    Err {
        /// The JSON's `message` field, when present.
        message: Option<String>,
        /// The text after `#!-err `.
        raw: Cow<'a, str>,
    },
    /// `#!-execd <command>`: active response (JSON for 4.2+ agents).
    Execd {
        /// The text after `#!-execd `.
        command: Cow<'a, str>,
    },
    /// `#!-force_reconnect`.
    ForceReconnect,
    /// Any other `#!-` message (module commands, sync replies...), kept whole.
    Unknown(Cow<'a, str>),
}

impl Control<'_> {
    /// See [`Message::kind`].
    pub fn kind(&self) -> &'static str {
        match self {
            Control::Startup(_) => "startup",
            Control::Keepalive(_) => "keepalive",
            Control::Shutdown => "shutdown",
            Control::Ack => "ack",
            Control::Request(_) => "request",
            Control::UpFile { .. } => "up_file",
            Control::CloseFile => "close_file",
            Control::Err { .. } => "err",
            Control::Execd { .. } => "execd",
            Control::ForceReconnect => "force_reconnect",
            Control::Unknown(_) => "control",
        }
    }
}

/// A startup message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup<'a> {
    /// The `version` field of the JSON (4.6+ agents), e.g. `v4.14.7`.
    pub version: Option<String>,
    /// The text after `#!-agent startup ` when not empty (normally JSON).
    pub json: Option<Cow<'a, str>>,
}

/// A keepalive.
///
/// ```text
/// "#!-" UNAME [" / " md5hex(agent.conf)] LF
/// ( ["#"]["!"] "\"" key "\":" value LF )*
/// ( md5hex(merged.mg) | "x" ) " merged.mg" LF
/// [ "#\"_agent_ip\":" address LF ]
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keepalive<'a> {
    /// The uname line, without `#!-` and without the agent.conf sum.
    pub uname: Cow<'a, str>,
    /// The agent version from `- Wazuh vX.Y.Z` in the uname, e.g. `v4.14.5`.
    pub version: Option<Cow<'a, str>>,
    /// MD5 of the agent's agent.conf, when it has one.
    pub agent_conf_md5: Option<Cow<'a, str>>,
    /// Labels, in order (the `_agent_ip` label included).
    pub labels: Vec<Label<'a>>,
    /// The merged.mg line: `Some(Some(md5))`, `Some(None)` for `x` (no file), `None` when
    /// absent.
    pub merged_md5: Option<Option<Cow<'a, str>>>,
    /// The `_agent_ip` label: the agent's own view of its address.
    pub agent_ip: Option<Cow<'a, str>>,
}

/// One keepalive label line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label<'a> {
    /// Key (between the quotes).
    pub key: Cow<'a, str>,
    /// Value (after `":`).
    pub value: Cow<'a, str>,
    /// Leading `#`: hidden label.
    pub hidden: bool,
    /// Leading `!` (after an optional `#`).
    pub ignored: bool,
}

/// A `#!-req` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// The request counter (random 32-bit hex from the manager).
    pub counter: Cow<'a, str>,
    /// Everything after the counter: `<target> <payload>`, a response, or `ack`.
    pub body: Cow<'a, str>,
}

impl Request<'_> {
    /// The first word of the body (the target of a manager request, e.g. `agent`).
    pub fn target(&self) -> &str {
        self.body.split(' ').next().unwrap_or("")
    }

    /// The body after the first word.
    pub fn payload(&self) -> &str {
        self.body.split_once(' ').map_or("", |(_, p)| p)
    }

    /// Whether this is the UDP receipt `#!-req <counter> ack`.
    pub fn is_ack(&self) -> bool {
        self.body == "ack"
    }
}

/// An event `<queue>:<location>:<text>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    /// The queue character (`1` localfile, `8` syscheck, `d` syscollector, ...).
    pub queue: u8,
    /// The location (log file, module name).
    pub location: Cow<'a, str>,
    /// The event text (opaque).
    pub text: Cow<'a, [u8]>,
}

fn text(b: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(b)
}

/// Classifies one decrypted MESSAGE. Never fails.
pub fn parse(message: &[u8]) -> Message<'_> {
    match message.strip_prefix(CONTROL_PREFIX) {
        Some(rest) => Message::Control(parse_control(message, rest)),
        None => parse_event(message).map_or_else(|| Message::Other(text(message)), Message::Event),
    }
}

fn parse_control<'a>(whole: &'a [u8], rest: &'a [u8]) -> Control<'a> {
    if let Some(json) = rest.strip_prefix(b"agent startup") {
        let json = json.strip_prefix(b" ").unwrap_or(json);
        let json = (!json.is_empty()).then(|| text(json));
        let version = json
            .as_deref()
            .and_then(|j| json_string_field(j, "version"));
        return Control::Startup(Startup { version, json });
    }
    // The manager matches these by prefix, trailing space or not.
    if rest.starts_with(b"agent shutdown") {
        return Control::Shutdown;
    }
    if rest.starts_with(b"agent ack") {
        return Control::Ack;
    }
    if let Some(req) = rest.strip_prefix(b"req ") {
        let (counter, body) = split_word(req);
        return Control::Request(Request {
            counter: text(counter),
            body: text(body),
        });
    }
    if let Some(up) = rest.strip_prefix(b"up file ") {
        let line = up.split(|&b| b == b'\n').next().unwrap_or(up);
        let (md5, name) = split_word(line);
        return Control::UpFile {
            md5: text(md5),
            name: text(name.trim_ascii()),
        };
    }
    if rest.starts_with(b"close file") {
        return Control::CloseFile;
    }
    if let Some(raw) = rest
        .strip_prefix(b"err ")
        .or_else(|| (rest == b"err").then_some(&[][..]))
    {
        let raw = text(raw);
        let message = json_string_field(&raw, "message");
        return Control::Err { message, raw };
    }
    if let Some(cmd) = rest.strip_prefix(b"execd ") {
        return Control::Execd { command: text(cmd) };
    }
    if rest.starts_with(b"force_reconnect") {
        return Control::ForceReconnect;
    }
    // Anything else from an agent that carries a line feed is a keepalive, as remoted decides.
    if rest.contains(&b'\n') {
        return Control::Keepalive(parse_keepalive(rest));
    }
    Control::Unknown(text(whole))
}

fn split_word(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&c| c == b' ') {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, &[]),
    }
}

fn parse_keepalive(rest: &[u8]) -> Keepalive<'_> {
    let mut lines = rest.split(|&b| b == b'\n');
    let first = lines.next().unwrap_or_default();
    // " / <32 hex>" at the end of the uname line is the agent.conf sum.
    let (uname, agent_conf_md5) = match first.len().checked_sub(35) {
        Some(at)
            if first[at..].starts_with(b" / ")
                && first[at + 3..].iter().all(u8::is_ascii_hexdigit) =>
        {
            (&first[..at], Some(text(&first[at + 3..])))
        }
        _ => (first, None),
    };
    let version = find(uname, b" - Wazuh ").map(|i| {
        let v = &uname[i + 9..];
        text(v.split(|&b| b == b' ').next().unwrap_or(v))
    });
    let mut ka = Keepalive {
        uname: text(uname),
        version,
        agent_conf_md5,
        labels: Vec::new(),
        merged_md5: None,
        agent_ip: None,
    };
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if let Some(sum) = line.strip_suffix(b" merged.mg") {
            ka.merged_md5 = Some((sum != b"x").then(|| text(sum)));
            continue;
        }
        let (hidden, l) = match line.strip_prefix(b"#") {
            Some(l) => (true, l),
            None => (false, line),
        };
        let (ignored, l) = match l.strip_prefix(b"!") {
            Some(l) => (true, l),
            None => (false, l),
        };
        let Some(l) = l.strip_prefix(b"\"") else {
            continue;
        };
        let Some(end) = find(l, b"\":") else {
            continue;
        };
        let label = Label {
            key: text(&l[..end]),
            value: text(&l[end + 2..]),
            hidden,
            ignored,
        };
        if label.key == "_agent_ip" {
            ka.agent_ip = Some(label.value.clone());
        }
        ka.labels.push(label);
    }
    ka
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The string value of a top-level field of a JSON object, if the text is one.
fn json_string_field(json: &str, field: &str) -> Option<String> {
    match serde_json::from_str::<serde_json::Value>(json).ok()? {
        serde_json::Value::Object(map) => map.get(field)?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn parse_event(message: &[u8]) -> Option<Event<'_>> {
    let (&queue, rest) = message.split_first()?;
    let rest = rest.strip_prefix(b":")?;
    if !queue.is_ascii_graphic() || queue == b':' {
        return None;
    }
    let end = rest.iter().position(|&b| b == b':')?;
    Some(Event {
        queue,
        location: text(&rest[..end]),
        text: Cow::Borrowed(&rest[end + 1..]),
    })
}

/// Startup text; with a version (4.6+ form) it carries `{"version":"<version>"}`.
///
/// ```
/// use wazuh_proxy_core::control::startup_text;
/// assert_eq!(startup_text(None), "#!-agent startup ");
/// assert_eq!(startup_text(Some("v4.14.7")), "#!-agent startup {\"version\":\"v4.14.7\"}");
/// ```
pub fn startup_text(version: Option<&str>) -> String {
    match version {
        None => STARTUP.to_owned(),
        Some(v) => format!("{STARTUP}{}", serde_json::json!({ "version": v })),
    }
}

/// Shutdown text.
pub fn shutdown_text() -> &'static str {
    SHUTDOWN
}

/// ACK text.
pub fn ack_text() -> &'static str {
    ACK
}

/// The parts of a keepalive to build.
#[derive(Debug, Clone, Default)]
pub struct KeepaliveSpec<'a> {
    /// The uname line, e.g. `Linux |host |6.1.0 |#1 SMP |x86_64 [Debian GNU/Linux|debian: 12] - Wazuh v4.14.7`.
    pub uname: &'a str,
    /// MD5 of agent.conf, if any.
    pub agent_conf_md5: Option<&'a str>,
    /// Labels as (key, value); written visible.
    pub labels: &'a [(&'a str, &'a str)],
    /// MD5 of merged.mg, or `None` for `x`.
    pub merged_md5: Option<&'a str>,
    /// The `_agent_ip` label, if any.
    pub agent_ip: Option<&'a str>,
}

/// Builds a keepalive text in the agent's layout.
///
/// ```
/// use wazuh_proxy_core::control::{keepalive_text, parse, KeepaliveSpec, Control, Message};
/// let text = keepalive_text(&KeepaliveSpec {
///     uname: "Linux |h |6.1 |#1 |x86_64 [Debian|debian: 12] - Wazuh v4.14.7",
///     agent_ip: Some("10.0.0.5"),
///     ..Default::default()
/// });
/// let Message::Control(Control::Keepalive(ka)) = parse(text.as_bytes()) else { panic!() };
/// assert_eq!(ka.version.as_deref(), Some("v4.14.7"));
/// assert_eq!(ka.agent_ip.as_deref(), Some("10.0.0.5"));
/// assert_eq!(ka.merged_md5, Some(None));
/// ```
pub fn keepalive_text(spec: &KeepaliveSpec<'_>) -> String {
    let mut out = String::with_capacity(256);
    out.push_str("#!-");
    out.push_str(spec.uname);
    if let Some(sum) = spec.agent_conf_md5 {
        let _ = write!(out, " / {sum}");
    }
    out.push('\n');
    for (k, v) in spec.labels {
        let _ = writeln!(out, "\"{k}\":{v}");
    }
    let _ = writeln!(out, "{} merged.mg", spec.merged_md5.unwrap_or("x"));
    if let Some(ip) = spec.agent_ip {
        let _ = writeln!(out, "#\"_agent_ip\":{ip}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(m: &[u8]) -> Control<'_> {
        match parse(m) {
            Message::Control(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn startup_forms() {
        let Control::Startup(s) = control(b"#!-agent startup ") else {
            panic!()
        };
        assert_eq!(
            s,
            Startup {
                version: None,
                json: None
            }
        );
        let Control::Startup(s) = control(b"#!-agent startup {\"version\":\"v4.14.7\"}") else {
            panic!()
        };
        assert_eq!(s.version.as_deref(), Some("v4.14.7"));
        let Control::Startup(s) = control(b"#!-agent startup {\"other\":1}") else {
            panic!()
        };
        assert_eq!(s.version, None);
        assert!(s.json.is_some());
        let Control::Startup(s) = control(b"#!-agent startup {broken") else {
            panic!()
        };
        assert_eq!(s.version, None);
        let text = startup_text(Some("v4.\"x"));
        let Control::Startup(s) = control(text.as_bytes()) else {
            panic!()
        };
        assert_eq!(s.version.as_deref(), Some("v4.\"x"));
    }

    #[test]
    fn keepalive_from_the_protocol_document() {
        let text = b"#!-Linux |agent-debian10 |4.9.0-12-amd64 |#1 SMP Debian 4.9.210-1 (2020-01-20) |x86_64 [Debian GNU/Linux|debian: 10 (buster)] - Wazuh v4.14.5 / ab73af41699f13fdd81903b5f23d8d00\n\"env\":prod\n#!\"secret\":s\nd6e3ac3e75ca0319af3e7c262776f331 merged.mg\n#\"_agent_ip\":10.0.2.15\n";
        let Control::Keepalive(ka) = control(text) else {
            panic!()
        };
        assert!(ka.uname.starts_with("Linux |agent-debian10"));
        assert!(ka.uname.ends_with("- Wazuh v4.14.5"));
        assert_eq!(ka.version.as_deref(), Some("v4.14.5"));
        assert_eq!(
            ka.agent_conf_md5.as_deref(),
            Some("ab73af41699f13fdd81903b5f23d8d00")
        );
        assert_eq!(
            ka.merged_md5,
            Some(Some(Cow::Borrowed("d6e3ac3e75ca0319af3e7c262776f331")))
        );
        assert_eq!(ka.agent_ip.as_deref(), Some("10.0.2.15"));
        assert_eq!(ka.labels.len(), 3);
        assert_eq!(ka.labels[0].key, "env");
        assert_eq!(ka.labels[0].value, "prod");
        assert!(ka.labels[1].hidden && ka.labels[1].ignored);
        // Windows, no agent.conf, no labels.
        let Control::Keepalive(ka) =
            control(b"#!-Microsoft Windows 10 Pro [Ver: 10.0.19045] - Wazuh v4.7.0\nx merged.mg\n")
        else {
            panic!()
        };
        assert_eq!(ka.version.as_deref(), Some("v4.7.0"));
        assert_eq!(ka.agent_conf_md5, None);
        assert_eq!(ka.merged_md5, Some(None));
    }

    #[test]
    fn manager_messages() {
        assert_eq!(control(b"#!-agent ack "), Control::Ack);
        assert_eq!(control(b"#!-agent shutdown "), Control::Shutdown);
        let Control::Request(r) = control(b"#!-req 111 agent getconfig client") else {
            panic!()
        };
        assert_eq!(
            (&*r.counter, r.target(), r.payload()),
            ("111", "agent", "getconfig client")
        );
        assert!(!r.is_ack());
        let Control::Request(r) = control(b"#!-req 5f3a ack") else {
            panic!()
        };
        assert!(r.is_ack());
        assert_eq!(
            control(b"#!-up file 0123456789abcdef0123456789abcdef merged.mg\n"),
            Control::UpFile {
                md5: "0123456789abcdef0123456789abcdef".into(),
                name: "merged.mg".into()
            }
        );
        assert_eq!(control(b"#!-close file "), Control::CloseFile);
        let Control::Err { message, .. } =
            control(br#"#!-err {"message":"Couldn't retrieve version"}"#)
        else {
            panic!()
        };
        assert_eq!(message.as_deref(), Some("Couldn't retrieve version"));
        let Control::Execd { command } = control(br#"#!-execd {"version":1}"#) else {
            panic!()
        };
        assert_eq!(command, r#"{"version":1}"#);
        assert_eq!(control(b"#!-force_reconnect"), Control::ForceReconnect);
        assert_eq!(
            control(b"#!-syscheck restart"),
            Control::Unknown("#!-syscheck restart".into())
        );
        assert_eq!(control(b"#!-").kind(), "control");
    }

    #[test]
    fn events_and_others() {
        let Message::Event(e) = parse(b"8:(001) any->syscheck:{\"a\":1}") else {
            panic!()
        };
        assert_eq!(e.queue, b'8');
        assert_eq!(e.location, "(001) any->syscheck");
        assert_eq!(&*e.text, b"{\"a\":1}");
        let Message::Event(e) = parse(b"x:syslog:") else {
            panic!()
        };
        assert_eq!(&*e.text, b"");
        assert_eq!(parse(b"").kind(), "other");
        assert_eq!(parse(b"1:no-second-colon").kind(), "other");
        assert_eq!(parse(b"\xff\xfe").kind(), "other");
        assert_eq!(parse(b"#ping").kind(), "other");
    }

    #[test]
    fn builders_round_trip() {
        assert_eq!(parse(shutdown_text().as_bytes()).kind(), "shutdown");
        assert_eq!(parse(ack_text().as_bytes()).kind(), "ack");
        let text = keepalive_text(&KeepaliveSpec {
            uname: "Linux |h |6.1 |#1 |x86_64 [Debian|debian: 12] - Wazuh v4.14.7",
            agent_conf_md5: Some("ab73af41699f13fdd81903b5f23d8d00"),
            labels: &[("k", "v")],
            merged_md5: Some("d6e3ac3e75ca0319af3e7c262776f331"),
            agent_ip: Some("10.0.0.5"),
        });
        let Control::Keepalive(ka) = control(text.as_bytes()) else {
            panic!()
        };
        assert_eq!(
            ka.agent_conf_md5.as_deref(),
            Some("ab73af41699f13fdd81903b5f23d8d00")
        );
        assert_eq!(ka.labels.len(), 2);
        assert_eq!(ka.agent_ip.as_deref(), Some("10.0.0.5"));
    }
}
