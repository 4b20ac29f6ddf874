//! The enrollment request line an agent sends on 1515.
//!
//! ```text
//! [ "OSSEC PASS: " PASSWORD " " ] "OSSEC A:'" NAME "'"
//!   [ " V:'" VERSION "'" ] [ " G:'" GROUPS "'" ] [ " IP:'" IP "'" ] [ " K:'" KEYHASH "'" ] LF
//! ```
//!
//! The parser applies the manager's own checks (authd's `w_auth_parse_data` and the group
//! checks of `w_validate_group_name` / `w_auth_validate_groups`) in the manager's order, so a
//! request it refuses gets the text the manager would have sent. Like authd, it stops at the
//! first text that is not the next field it knows: the rest (a field of a newer agent, a field
//! out of order, stray bytes) is kept as it came ([`EnrollRequest::rest`]) and forwarded
//! unchanged, for the manager to ignore or to understand. Checks that need the manager's state (password, duplicate names, group directories,
//! version comparison) stay with the manager.
//!
//! ```
//! use wazuh_proxy_core::enroll::EnrollRequest;
//! let req = EnrollRequest::parse(b"OSSEC PASS: s3cret OSSEC A:'web-01' V:'v4.14.7'\n").unwrap();
//! assert_eq!(req.name(), "web-01");
//! assert_eq!(req.version(), Some("v4.14.7"));
//! assert!(req.has_password());
//! assert!(!format!("{req:?}").contains("s3cret"));
//! assert_eq!(&req.to_line()[..], &b"OSSEC PASS: s3cret OSSEC A:'web-01' V:'v4.14.7'\n"[..]);
//!
//! let err = EnrollRequest::parse(b"OSSEC A:'x'\n").unwrap_err();
//! assert_eq!(err.manager_text(), "ERROR: Invalid agent name: x");
//! ```

use std::collections::HashSet;
use std::fmt;

use zeroize::Zeroizing;

use crate::keys::KeyIp;

/// The largest request the manager reads, line feed included (authd's `MAX_SSL_MSG_SIZE`).
pub const MAX_REQUEST: usize = 69632;
/// The longest agent version (`V:`) the manager scans.
pub const MAX_VERSION: usize = 2048;
/// The longest group list (`G:`) the manager scans.
pub const MAX_GROUPS: usize = 65536;
/// The longest single group name (authd's `MAX_GROUP_NAME`).
pub const MAX_GROUP_NAME: usize = 255;
/// The most groups one agent may join (authd's `MAX_GROUPS_PER_MULTIGROUP`).
pub const MAX_GROUP_COUNT: usize = 128;
/// The longest `IP:` value (`INET6_ADDRSTRLEN`).
pub const MAX_IP: usize = 46;
/// The longest `K:` value (a SHA-1 in hex).
pub const MAX_KEY_HASH: usize = 40;
/// Agent name length bounds (authd's `OS_IsValidName`).
pub const NAME_LEN: std::ops::RangeInclusive<usize> = 2..=128;

const PASS_PREFIX: &str = "OSSEC PASS: ";
const NAME_PREFIX: &str = "OSSEC A:'";

/// Why a request line was refused. [`RequestError::manager_text`] is what authd answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// More than [`MAX_REQUEST`] bytes without a line feed.
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLong,
    /// Not UTF-8, or a NUL byte (authd reads a C string; agents send ASCII).
    #[error("request is not text")]
    NotText,
    /// `OSSEC PASS: ` with an empty password, or without the name field after it.
    #[error("empty password")]
    EmptyPassword,
    /// No `OSSEC A:'` where expected, or the name is not closed.
    #[error("not an enrollment request")]
    InvalidRequest,
    /// The name has bad characters or length.
    #[error("invalid agent name {0:?}")]
    InvalidName(String),
    /// A field's value is not followed by `'` within its limit.
    #[error("unterminated {} field", .0.label())]
    Unterminated(Field),
    /// The group list fails the manager's checks; the text is the manager's.
    #[error("invalid groups: {0}")]
    InvalidGroups(String),
    /// More than [`MAX_GROUP_COUNT`] distinct groups.
    #[error("more than {MAX_GROUP_COUNT} groups")]
    TooManyGroups,
    /// The IP field is not an address, a network, `any` or `src`.
    #[error("invalid IP {0:?}")]
    InvalidIp(String),
}

/// An optional request field, for [`RequestError::Unterminated`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// `V:` (agent version).
    Version,
    /// `G:` (groups).
    Groups,
    /// `IP:`.
    Ip,
    /// `K:` (hash of the key the agent holds).
    KeyHash,
}

impl Field {
    /// The word authd uses in `ERROR: Unterminated <word> field`.
    pub fn label(self) -> &'static str {
        match self {
            Field::Version => "version",
            Field::Groups => "group",
            Field::Ip => "IP",
            Field::KeyHash => "key",
        }
    }
}

impl RequestError {
    /// The error text authd sends for this request (without the `. Unable to add agent`
    /// suffix; see [`super::reply::error_reply`]).
    pub fn manager_text(&self) -> String {
        match self {
            RequestError::TooLong | RequestError::NotText | RequestError::InvalidRequest => {
                "ERROR: Invalid request for new agent".to_owned()
            }
            RequestError::EmptyPassword => "ERROR: Invalid password".to_owned(),
            RequestError::InvalidName(name) => format!("ERROR: Invalid agent name: {name}"),
            RequestError::Unterminated(f) => format!("ERROR: Unterminated {} field", f.label()),
            RequestError::InvalidGroups(text) => text.clone(),
            RequestError::TooManyGroups => {
                format!("ERROR: Maximum multigroup reached: Limit is {MAX_GROUP_COUNT}")
            }
            RequestError::InvalidIp(ip) => format!("ERROR: Invalid IP: {ip}"),
        }
    }
}

/// A parsed enrollment request. The password lives in zeroizing memory and `Debug` never shows
/// it. Field values are kept as sent, so [`EnrollRequest::to_line`] gives back the request
/// byte for byte.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollRequest {
    password: Option<Zeroizing<String>>,
    name: String,
    version: Option<String>,
    groups: Option<String>,
    ip: Option<String>,
    key_hash: Option<String>,
    rest: String,
}

impl fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("name", &self.name)
            .field("version", &self.version)
            .field("groups", &self.groups)
            .field("ip", &self.ip)
            .field("key_hash", &self.key_hash)
            .field("rest", &self.rest)
            .finish()
    }
}

impl EnrollRequest {
    /// Parses one request. `line` may end with its LF (one is stripped) or not; anything after
    /// the first LF is ignored, as authd does.
    ///
    /// # Errors
    /// [`RequestError`], whose [`manager_text`](RequestError::manager_text) is authd's answer.
    pub fn parse(line: &[u8]) -> Result<EnrollRequest, RequestError> {
        let line = match line.iter().position(|&b| b == b'\n') {
            Some(lf) if lf < MAX_REQUEST => &line[..lf],
            Some(_) => return Err(RequestError::TooLong),
            None if line.len() >= MAX_REQUEST => return Err(RequestError::TooLong),
            None => line,
        };
        if line.contains(&0) {
            return Err(RequestError::NotText);
        }
        let text = std::str::from_utf8(line).map_err(|_| RequestError::NotText)?;
        let mut at = 0usize;

        // Password: everything up to the name field. authd compares it with its own, so it may
        // contain spaces; the first " OSSEC A:'" ends it.
        let mut password = None;
        if let Some(rest) = text.strip_prefix(PASS_PREFIX) {
            let end = rest
                .find(" OSSEC A:'")
                .ok_or(RequestError::InvalidRequest)?;
            if end == 0 {
                return Err(RequestError::EmptyPassword);
            }
            password = Some(Zeroizing::new(rest[..end].to_owned()));
            at = PASS_PREFIX.len() + end + 1;
        }

        // Name: up to the next quote.
        let rest = text[at..]
            .strip_prefix(NAME_PREFIX)
            .ok_or(RequestError::InvalidRequest)?;
        at += NAME_PREFIX.len();
        let close = rest.find('\'').ok_or(RequestError::InvalidRequest)?;
        let name = &rest[..close];
        if !valid_name(name) {
            return Err(RequestError::InvalidName(name.to_owned()));
        }
        at += close + 1;

        let mut next = |token: &str, max: usize, field: Field, stop_at_space: bool| {
            let Some(rest) = text[at..].strip_prefix(token) else {
                return Ok(None);
            };
            // The manager scans at most `max` bytes of the value, stopping at a quote (and,
            // for IP, a space); the byte after them must be the closing quote.
            let scanned = rest
                .bytes()
                .take(max)
                .take_while(|&b| b != b'\'' && !(stop_at_space && b == b' '))
                .count();
            if rest.as_bytes().get(scanned) != Some(&b'\'') {
                return Err(RequestError::Unterminated(field));
            }
            let value = rest[..scanned].to_owned();
            at += token.len() + scanned + 1;
            Ok(Some(value))
        };
        let version = next(" V:'", MAX_VERSION, Field::Version, false)?;
        let groups = next(" G:'", MAX_GROUPS, Field::Groups, false)?;
        if let Some(g) = &groups {
            check_group_text(g)?;
        }
        let ip = next(" IP:'", MAX_IP, Field::Ip, true)?;
        if let Some(ip) = &ip {
            // authd takes any value starting with "src" as "use the peer address".
            if !ip.starts_with("src") && KeyIp::parse(ip).is_none() {
                return Err(RequestError::InvalidIp(ip.clone()));
            }
        }
        let key_hash = next(" K:'", MAX_KEY_HASH, Field::KeyHash, false)?;
        // authd reads no further: whatever follows is ignored by it, and forwarded as is.
        let rest = text[at..].to_owned();
        // authd validates each group after parsing the whole line.
        if let Some(g) = &groups {
            check_each_group(g)?;
        }
        Ok(EnrollRequest {
            password,
            name: name.to_owned(),
            version,
            groups,
            ip,
            key_hash,
            rest,
        })
    }

    /// The agent name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the request carries a password.
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    /// The password, if any. Handle with care: never log it.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref().map(String::as_str)
    }

    /// The agent version (`V:`), as sent.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// The group list (`G:`), as sent (comma separated).
    pub fn groups(&self) -> Option<&str> {
        self.groups.as_deref()
    }

    /// The IP field, as sent (an address, a network, `any`, or `src`).
    pub fn ip(&self) -> Option<&str> {
        self.ip.as_deref()
    }

    /// Whether the IP field asks the manager to use the peer address (`src`).
    pub fn ip_is_src(&self) -> bool {
        self.ip.as_deref().is_some_and(|ip| ip.starts_with("src"))
    }

    /// The key hash (`K:`), an opaque token the manager compares with its own hash of the key
    /// it holds for this name.
    pub fn key_hash(&self) -> Option<&str> {
        self.key_hash.as_deref()
    }

    /// Whatever followed the last field the parser knows, as sent (empty for today's agents):
    /// a newer agent's field, a field out of order, stray text. authd ignores it; the proxy
    /// forwards it unchanged.
    pub fn rest(&self) -> &str {
        &self.rest
    }

    /// The request as sent on the wire, line feed included. Zeroized when dropped (it holds
    /// the password).
    pub fn to_line(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(64));
        if let Some(p) = &self.password {
            out.extend_from_slice(PASS_PREFIX.as_bytes());
            out.extend_from_slice(p.as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(NAME_PREFIX.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.push(b'\'');
        for (token, value) in [
            (" V:'", &self.version),
            (" G:'", &self.groups),
            (" IP:'", &self.ip),
            (" K:'", &self.key_hash),
        ] {
            if let Some(v) = value {
                out.extend_from_slice(token.as_bytes());
                out.extend_from_slice(v.as_bytes());
                out.push(b'\'');
            }
        }
        out.extend_from_slice(self.rest.as_bytes());
        out.push(b'\n');
        out
    }
}

/// authd's `OS_IsValidName`: 2 to 128 characters of `[A-Za-z0-9_.-]`, not starting with `.`.
pub fn valid_name(name: &str) -> bool {
    NAME_LEN.contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The checks authd's `w_validate_group_name` makes while parsing, in its order and with its
/// texts (values in the texts are cut at 255 bytes, as authd's `%.255s`).
fn check_group_text(groups: &str) -> Result<(), RequestError> {
    let bad = |what: &str, shown: &str| {
        Err(RequestError::InvalidGroups(format!(
            "ERROR: Invalid group name: {}... {what}",
            cut(shown, 255)
        )))
    };
    if groups.is_empty() {
        return Err(RequestError::InvalidGroups(
            "ERROR: Invalid group name: Empty Group".to_owned(),
        ));
    }
    let multi = groups.contains(',');
    if !multi && groups.len() > MAX_GROUP_NAME {
        return bad("group is too large", groups);
    }
    if multi && groups.len() > MAX_GROUPS - 1 {
        return bad("multigroup is too large", groups);
    }
    if multi {
        for one in groups.split(',').filter(|g| !g.is_empty()) {
            if one.contains(' ') {
                return bad("white spaces are not allowed", groups);
            }
            if one.len() > MAX_GROUP_NAME {
                return bad("group is too large", one);
            }
        }
        if groups.contains(",,") {
            return bad("consecutive ',' are not allowed", groups);
        }
    }
    let prohibited = "characters '\\/:*?\"<>|,' are prohibited";
    if groups.bytes().all(|b| b == b',') {
        return bad(prohibited, groups);
    }
    if groups.starts_with(',') || groups.ends_with(',') {
        return bad("cannot start or end with ','", groups);
    }
    // authd's character set for the whole list; the comma only in a multigroup.
    let allowed =
        |b: u8| b.is_ascii_alphanumeric() || b".:;_-=+!@()".contains(&b) || (multi && b == b',');
    if !groups.bytes().all(allowed) {
        return bad(prohibited, groups);
    }
    Ok(())
}

/// authd's `w_auth_validate_groups` (minus the directory check, which is the manager's): at
/// most [`MAX_GROUP_COUNT`] distinct groups, each `[A-Za-z0-9_.-]+` and not `.` or `..`.
fn check_each_group(groups: &str) -> Result<(), RequestError> {
    let mut seen = HashSet::new();
    for one in groups.split(',').filter(|g| !g.is_empty()) {
        // authd drops repeated groups before it counts them.
        if !seen.insert(one) {
            continue;
        }
        if seen.len() > MAX_GROUP_COUNT {
            return Err(RequestError::TooManyGroups);
        }
        let charset = one
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !charset || one == "." || one == ".." {
            return Err(RequestError::InvalidGroups(format!(
                "ERROR: Invalid group name: {one}"
            )));
        }
    }
    Ok(())
}

/// The longest prefix of `s` within `max` bytes that ends on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(line: &str) -> String {
        EnrollRequest::parse(line.as_bytes())
            .unwrap_err()
            .manager_text()
    }

    #[test]
    fn full_request_round_trips() {
        let line = "OSSEC PASS: Str0ng Passw0rd OSSEC A:'db-2' V:'v4.14.7' G:'linux,webservers' IP:'src' K:'ba6ae8dcb08382d2ebe46959d056e931ad1bbc5d'\n";
        let r = EnrollRequest::parse(line.as_bytes()).unwrap();
        assert_eq!(r.password(), Some("Str0ng Passw0rd"));
        assert_eq!(r.name(), "db-2");
        assert_eq!(r.version(), Some("v4.14.7"));
        assert_eq!(r.groups(), Some("linux,webservers"));
        assert!(r.ip_is_src());
        assert_eq!(
            r.key_hash(),
            Some("ba6ae8dcb08382d2ebe46959d056e931ad1bbc5d")
        );
        assert_eq!(&r.to_line()[..], line.as_bytes());
        let dbg = format!("{r:?}");
        assert!(!dbg.contains("Str0ng"), "{dbg}");
    }

    #[test]
    fn without_lf_and_with_trailing_bytes_after_lf() {
        assert!(EnrollRequest::parse(b"OSSEC A:'web-01'").is_ok());
        assert!(EnrollRequest::parse(b"OSSEC A:'web-01'\nanything").is_ok());
    }

    #[test]
    fn manager_texts() {
        assert_eq!(err("HELLO\n"), "ERROR: Invalid request for new agent");
        assert_eq!(
            err("OSSEC A:'web-01\n"),
            "ERROR: Invalid request for new agent"
        );
        assert_eq!(
            err("OSSEC A:'.hidden'\n"),
            "ERROR: Invalid agent name: .hidden"
        );
        assert_eq!(err("OSSEC A:'we b'\n"), "ERROR: Invalid agent name: we b");
        let long = "a".repeat(129);
        assert_eq!(
            err(&format!("OSSEC A:'{long}'\n")),
            format!("ERROR: Invalid agent name: {long}")
        );
        assert!(EnrollRequest::parse(format!("OSSEC A:'{}'", "a".repeat(128)).as_bytes()).is_ok());
        assert_eq!(
            err("OSSEC A:'web-01' V:'v4\n"),
            "ERROR: Unterminated version field"
        );
        assert_eq!(
            err("OSSEC A:'web-01' G:'linux\n"),
            "ERROR: Unterminated group field"
        );
        assert_eq!(
            err("OSSEC A:'web-01' IP:'10.0.0.1\n"),
            "ERROR: Unterminated IP field"
        );
        assert_eq!(
            err("OSSEC A:'web-01' IP:'10.0 .0.1'\n"),
            "ERROR: Unterminated IP field"
        );
        assert_eq!(
            err("OSSEC A:'web-01' K:'abc\n"),
            "ERROR: Unterminated key field"
        );
        let k41 = "a".repeat(41);
        assert_eq!(
            err(&format!("OSSEC A:'web-01' K:'{k41}'\n")),
            "ERROR: Unterminated key field"
        );
        let v = "v".repeat(2049);
        assert_eq!(
            err(&format!("OSSEC A:'web-01' V:'{v}'\n")),
            "ERROR: Unterminated version field"
        );
        assert_eq!(
            err("OSSEC A:'web-01' IP:'10.0.0.300'\n"),
            "ERROR: Invalid IP: 10.0.0.300"
        );
        assert_eq!(
            err("OSSEC A:'web-01' G:''\n"),
            "ERROR: Invalid group name: Empty Group"
        );
        assert_eq!(
            err("OSSEC A:'web-01' G:'a,,b'\n"),
            "ERROR: Invalid group name: a,,b... consecutive ',' are not allowed"
        );
        assert_eq!(
            err("OSSEC A:'web-01' G:'a,b,'\n"),
            "ERROR: Invalid group name: a,b,... cannot start or end with ','"
        );
        assert_eq!(
            err("OSSEC A:'web-01' G:'a/b'\n"),
            "ERROR: Invalid group name: a/b... characters '\\/:*?\"<>|,' are prohibited"
        );
        assert_eq!(
            err("OSSEC A:'web-01' G:'a,b:c'\n"),
            "ERROR: Invalid group name: b:c"
        );
        assert_eq!(
            err("OSSEC A:'web-01' G:'..'\n"),
            "ERROR: Invalid group name: .."
        );
        let many: Vec<String> = (0..129).map(|i| format!("g{i}")).collect();
        assert_eq!(
            err(&format!("OSSEC A:'web-01' G:'{}'\n", many.join(","))),
            "ERROR: Maximum multigroup reached: Limit is 128"
        );
        let repeated = vec!["g"; 200].join(",");
        assert!(
            EnrollRequest::parse(format!("OSSEC A:'web-01' G:'{repeated}'").as_bytes()).is_ok()
        );
        assert_eq!(
            err("OSSEC PASS:  OSSEC A:'web-01'\n"),
            "ERROR: Invalid password"
        );
        assert_eq!(
            err("OSSEC PASS: pw\n"),
            "ERROR: Invalid request for new agent"
        );
        assert_eq!(
            err("OSSEC A:'we\0b'\n"),
            "ERROR: Invalid request for new agent"
        );
    }

    // authd stops at the first text that is not the next field it knows and ignores the rest:
    // the proxy keeps it and forwards it unchanged.
    #[test]
    fn unknown_trailing_fields_are_kept_and_forwarded() {
        for (line, rest) in [
            (
                "OSSEC A:'web-01' V:'v4.14.7' X:'new field'\n",
                " X:'new field'",
            ),
            ("OSSEC A:'web-01' G:'a' V:'v4.14.7'\n", " V:'v4.14.7'"),
            ("OSSEC A:'web-01' \n", " "),
            ("OSSEC A:'web-01' K:'abc' IP:'any' Z\n", " IP:'any' Z"),
            ("OSSEC A:'web-01'junk\n", "junk"),
        ] {
            let r = EnrollRequest::parse(line.as_bytes()).unwrap();
            assert_eq!(r.rest(), rest, "{line:?}");
            assert_eq!(&r.to_line()[..], line.as_bytes(), "{line:?}");
        }
        // A known field after an unknown one is not read, by authd either.
        let r = EnrollRequest::parse(b"OSSEC A:'web-01' V:'v4.14.7' X:'y' G:'bad/name'\n").unwrap();
        assert_eq!(r.groups(), None);
        // A known field in its place is still checked.
        assert_eq!(
            err("OSSEC A:'web-01' G:'bad/name' X:'y'\n"),
            "ERROR: Invalid group name: bad/name... characters '\\/:*?\"<>|,' are prohibited"
        );
    }

    #[test]
    fn ip_forms() {
        for ip in [
            "any",
            "src",
            "10.0.0.1",
            "10.0.0.0/8",
            "10.0.0.0/255.0.0.0",
            "2001:db8::1",
            "2001:db8::/32",
        ] {
            let line = format!("OSSEC A:'web-01' IP:'{ip}'");
            assert_eq!(
                EnrollRequest::parse(line.as_bytes()).unwrap().ip(),
                Some(ip)
            );
        }
    }

    #[test]
    fn empty_values_are_accepted_like_authd() {
        let r = EnrollRequest::parse(b"OSSEC A:'web-01' V:'' K:''").unwrap();
        assert_eq!(r.version(), Some(""));
        assert_eq!(r.key_hash(), Some(""));
    }

    #[test]
    fn too_long() {
        let mut line = b"OSSEC A:'web-01' V:'".to_vec();
        line.resize(MAX_REQUEST, b'v');
        assert_eq!(EnrollRequest::parse(&line), Err(RequestError::TooLong));
    }
}
