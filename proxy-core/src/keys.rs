//! Agent keys: `client.keys` parsing, key derivation and a shared, reloadable key store.
//!
//! ```text
//! <ID> SP <NAME> SP <IP> SP <KEY> LF
//! 001 web-01 any 61f01f714746b01b977d7c65a724409f33ad89c391ad93f918eb27202dca8223
//! ```
//!
//! Lines starting with `#` or a space are comments; a NAME starting with `!` or `#` marks a
//! removed agent. KEY is everything after the third space (a trailing CR is stripped) and is
//! treated as opaque text. A malformed line is reported with its number and skipped: the rest of
//! the file still loads, as it does in the manager.
//!
//! Key material lives in zeroizing memory and never appears in `Debug` output or errors.
//!
//! ```
//! use wazuh_proxy_core::keys::KeySet;
//! use wazuh_proxy_core::envelope::AgentId;
//! let (set, problems) = KeySet::parse(b"001 web-01 any 61f01f71\nbroken line\n");
//! assert_eq!(set.len(), 1);
//! assert_eq!(problems[0].line, 2);
//! let key = set.get(&AgentId::parse(b"001").unwrap()).unwrap();
//! assert_eq!(key.name(), "web-01");
//! assert!(!format!("{key:?}").contains("61f01f71"));
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use blowfish::Blowfish;
use md5::{Digest, Md5};
#[cfg(feature = "runtime")]
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::envelope::AgentId;

/// Length of the derived key (`md5hex(KEY) || md5hex(md5hex(NAME) || md5hex(ID))[..15]`).
pub const DERIVED_KEY_LEN: usize = 47;

/// Length of the AES-256 key: the first 32 bytes of the derived key.
pub const AES_KEY_LEN: usize = 32;

/// How often remoted checks `client.keys` for changes (`remoted.keyupdate_interval`).
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The 32-character lowercase hex MD5 of `data`.
pub(crate) fn md5_hex(data: &[u8]) -> [u8; 32] {
    hex32(&Md5::digest(data).into())
}

/// Lowercase hex of a 16-byte digest.
pub(crate) fn hex32(digest: &[u8; 16]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, b) in digest.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0x0f)];
    }
    out
}

/// The IP column of a key line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyIp {
    /// `any`: the agent may connect from anywhere (the 4.x enrollment default).
    Any,
    /// One address without a prefix length.
    Host(IpAddr),
    /// An address with a prefix length (`10.0.0.0/8`, `2001:db8::/32`, or a dotted IPv4 mask).
    Network {
        /// The address part, as written.
        addr: IpAddr,
        /// The prefix length.
        prefix: u8,
    },
}

impl KeyIp {
    /// Parses the IP column: `any`, an address, or `address/prefix` (prefix as a length or, for
    /// IPv4, a dotted mask).
    pub fn parse(text: &str) -> Option<KeyIp> {
        if text.eq_ignore_ascii_case("any") {
            return Some(KeyIp::Any);
        }
        let Some((addr, prefix)) = text.split_once('/') else {
            return text.parse().ok().map(KeyIp::Host);
        };
        let addr: IpAddr = addr.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix.parse::<u8>() {
            Ok(p) => p,
            Err(_) if addr.is_ipv4() => mask_to_prefix(prefix.parse::<Ipv4Addr>().ok()?)?,
            Err(_) => return None,
        };
        (prefix <= max).then_some(KeyIp::Network { addr, prefix })
    }

    /// The address the manager matches ID-less messages against: the IP column with any CIDR
    /// suffix dropped (`None` for `any`).
    pub fn lookup_addr(&self) -> Option<IpAddr> {
        match *self {
            KeyIp::Any => None,
            KeyIp::Host(a) | KeyIp::Network { addr: a, .. } => Some(a),
        }
    }

    /// Whether an agent with this IP column prefixes its messages with `!ID!`: every form except
    /// a single IPv4 host does.
    pub fn sends_id_prefix(&self) -> bool {
        !matches!(self, KeyIp::Host(IpAddr::V4(_)))
    }

    /// The manager's source-address rule for prefixed messages: `any` matches everything, a
    /// network must contain the source, a host must equal it.
    pub fn allows(&self, source: IpAddr) -> bool {
        let source = source.to_canonical();
        match *self {
            KeyIp::Any => true,
            KeyIp::Host(a) => a == source,
            KeyIp::Network { addr, prefix } => match (addr, source) {
                (IpAddr::V4(n), IpAddr::V4(s)) => {
                    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                    u32::from(n) & mask == u32::from(s) & mask
                }
                (IpAddr::V6(n), IpAddr::V6(s)) => {
                    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                    u128::from(n) & mask == u128::from(s) & mask
                }
                _ => false,
            },
        }
    }
}

impl fmt::Display for KeyIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyIp::Any => f.write_str("any"),
            KeyIp::Host(a) => write!(f, "{a}"),
            KeyIp::Network { addr, prefix } => write!(f, "{addr}/{prefix}"),
        }
    }
}

fn mask_to_prefix(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    // A netmask must be contiguous ones followed by zeros.
    (m.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

/// One agent's identity and key material.
///
/// The raw key and the derived keys are zeroized on drop; `Debug` shows only the ID, name and
/// IP column.
pub struct AgentKey {
    id: AgentId,
    name: Box<str>,
    ip: KeyIp,
    raw: Zeroizing<Box<[u8]>>,
    derived: Zeroizing<[u8; DERIVED_KEY_LEN]>,
    // Blowfish's key schedule costs about 500 block encryptions, so it is built once, on
    // first use: agents that only speak AES never pay its 4 KiB.
    blowfish: OnceLock<Box<Blowfish>>,
}

impl AgentKey {
    /// Builds an agent's key from its `client.keys` fields, deriving the cipher keys as the
    /// manager does.
    pub fn new(id: AgentId, name: &str, ip: KeyIp, key: &[u8]) -> AgentKey {
        AgentKey {
            id,
            name: name.into(),
            ip,
            raw: Zeroizing::new(key.into()),
            derived: derive(id.as_bytes(), name.as_bytes(), key),
            blowfish: OnceLock::new(),
        }
    }

    /// The agent ID.
    pub fn id(&self) -> AgentId {
        self.id
    }

    /// The agent name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The IP column.
    pub fn ip(&self) -> KeyIp {
        self.ip
    }

    /// Whether this agent prefixes its messages with `!ID!` (see [`KeyIp::sends_id_prefix`]).
    pub fn sends_id_prefix(&self) -> bool {
        self.ip.sends_id_prefix()
    }

    /// The KEY column exactly as written (secret).
    pub fn raw_key(&self) -> &[u8] {
        &self.raw
    }

    /// The AES-256 key: the 32 ASCII bytes of `md5hex(KEY)` (secret).
    pub fn aes_key(&self) -> &[u8; AES_KEY_LEN] {
        // The first 32 bytes of a 47-byte array always form a 32-byte array.
        self.derived
            .first_chunk::<AES_KEY_LEN>()
            .unwrap_or(&[0; AES_KEY_LEN])
    }

    /// The Blowfish key: all 47 bytes of the derived key (secret).
    pub fn blowfish_key(&self) -> &[u8; DERIVED_KEY_LEN] {
        &self.derived
    }

    /// The Blowfish cipher for this key, built on first use and kept.
    pub(crate) fn blowfish(&self) -> &Blowfish {
        self.blowfish.get_or_init(|| {
            // 47 bytes is within Blowfish's 4..=56 byte key range, so this cannot fail; the
            // fallback only keeps the function total.
            Box::new(
                <Blowfish as blowfish::cipher::KeyInit>::new_from_slice(&self.derived[..])
                    .unwrap_or_else(|_| {
                        <Blowfish as blowfish::cipher::KeyInit>::new(&[0u8; 56].into())
                    }),
            )
        })
    }
}

impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentKey")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("ip", &self.ip)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The manager's key derivation:
/// `md5hex(KEY) || md5hex(md5hex(NAME) || md5hex(ID))[..15]`.
fn derive(id: &[u8], name: &[u8], key: &[u8]) -> Zeroizing<[u8; DERIVED_KEY_LEN]> {
    let mut out = Zeroizing::new([0u8; DERIVED_KEY_LEN]);
    let mut ni = [0u8; 64];
    ni[..32].copy_from_slice(&md5_hex(name));
    ni[32..].copy_from_slice(&md5_hex(id));
    let h_ni = md5_hex(&ni);
    let h_key = Zeroizing::new(md5_hex(key));
    out[..32].copy_from_slice(&h_key[..]);
    out[32..].copy_from_slice(&h_ni[..15]);
    out
}

/// What is wrong with one line of `client.keys`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyProblem {
    /// Fewer than four space-separated fields.
    #[error("expected 'ID NAME IP KEY'")]
    MissingFields,
    /// The ID is not 1 to 8 ASCII digits.
    #[error("agent ID is not 1 to 8 digits")]
    BadId,
    /// The name is not valid UTF-8.
    #[error("agent name is not valid UTF-8")]
    BadName,
    /// The IP column is neither `any`, an address nor a network.
    #[error("IP column {0:?} is not 'any', an address or a network")]
    BadIp(String),
    /// The key column is empty.
    #[error("empty key")]
    EmptyKey,
    /// The ID already appeared on an earlier line (that line is kept).
    #[error("agent ID {0} already defined on line {1}")]
    DuplicateId(AgentId, usize),
}

/// A malformed line of `client.keys`: its 1-based number and the problem. Never holds key
/// material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct KeyLineError {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong.
    pub problem: KeyProblem,
}

/// Why `client.keys` could not be read at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeysError {
    /// Opening, reading or stat-ing the file failed.
    #[error("cannot read keys file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Identity of a file version: changes when the file is rewritten or replaced by rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    mtime: Option<SystemTime>,
    len: u64,
    dev: u64,
    ino: u64,
}

impl FileStamp {
    /// The stamp of a file's metadata.
    pub fn of(meta: &std::fs::Metadata) -> FileStamp {
        #[cfg(unix)]
        let (dev, ino) = {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino())
        };
        #[cfg(not(unix))]
        let (dev, ino) = (0, 0);
        FileStamp {
            mtime: meta.modified().ok(),
            len: meta.len(),
            dev,
            ino,
        }
    }
}

/// An immutable set of agent keys, indexed by ID and by the address of the IP column.
#[derive(Debug, Default)]
pub struct KeySet {
    by_id: HashMap<AgentId, Arc<AgentKey>>,
    by_ip: HashMap<IpAddr, AgentId>,
    stamp: Option<FileStamp>,
}

impl KeySet {
    /// Parses the contents of a `client.keys` file. Returns the valid entries and one
    /// [`KeyLineError`] per malformed line; removed agents and comments are skipped silently.
    pub fn parse(text: &[u8]) -> (KeySet, Vec<KeyLineError>) {
        let mut set = KeySet::default();
        let mut problems = Vec::new();
        let mut first_line: HashMap<AgentId, usize> = HashMap::new();
        for (i, line) in text.split(|&b| b == b'\n').enumerate() {
            let line_no = i + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match parse_line(line) {
                Ok(None) => {}
                Ok(Some(key)) => {
                    let id = key.id();
                    if let Some(&first) = first_line.get(&id) {
                        problems.push(KeyLineError {
                            line: line_no,
                            problem: KeyProblem::DuplicateId(id, first),
                        });
                        continue;
                    }
                    first_line.insert(id, line_no);
                    if let Some(addr) = key.ip().lookup_addr() {
                        // The first agent with an address keeps it, as in the manager's tree.
                        set.by_ip.entry(addr).or_insert(id);
                    }
                    set.by_id.insert(id, Arc::new(key));
                }
                Err(problem) => problems.push(KeyLineError {
                    line: line_no,
                    problem,
                }),
            }
        }
        (set, problems)
    }

    /// Reads and parses a keys file. The stamp is taken from the opened file itself, so it
    /// always describes the bytes that were read, even if the path is replaced meanwhile.
    ///
    /// # Errors
    /// [`KeysError::Io`] when the file cannot be opened or read.
    pub fn read(path: &Path) -> Result<(KeySet, Vec<KeyLineError>), KeysError> {
        use std::io::Read;
        let io = |source| KeysError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        // The file holds every secret: zeroize the raw text once parsed.
        let mut text = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
        file.read_to_end(&mut text).map_err(io)?;
        let (mut set, problems) = KeySet::parse(&text);
        set.stamp = Some(FileStamp::of(&meta));
        Ok((set, problems))
    }

    /// Builds a set from keys (later duplicates of an ID are ignored).
    pub fn from_keys(keys: impl IntoIterator<Item = AgentKey>) -> KeySet {
        let mut set = KeySet::default();
        for key in keys {
            let id = key.id();
            if set.by_id.contains_key(&id) {
                continue;
            }
            if let Some(addr) = key.ip().lookup_addr() {
                set.by_ip.entry(addr).or_insert(id);
            }
            set.by_id.insert(id, Arc::new(key));
        }
        set
    }

    /// The key of an agent ID.
    pub fn get(&self, id: &AgentId) -> Option<&Arc<AgentKey>> {
        self.by_id.get(id)
    }

    /// The key an ID-less message from `source` belongs to: exact match of the address with a
    /// key's IP column, CIDR suffix dropped (the manager's rule). IPv4-mapped IPv6 sources are
    /// compared as IPv4.
    pub fn by_ip(&self, source: IpAddr) -> Option<&Arc<AgentKey>> {
        let id = self.by_ip.get(&source.to_canonical())?;
        self.by_id.get(id)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// All keys, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<AgentKey>> {
        self.by_id.values()
    }

    /// The stamp of the file this set was read from, if any.
    pub fn stamp(&self) -> Option<FileStamp> {
        self.stamp
    }
}

/// Parses one line (CR already stripped). `Ok(None)` for comments, blank lines and removed
/// agents.
fn parse_line(line: &[u8]) -> Result<Option<AgentKey>, KeyProblem> {
    match line.first() {
        None | Some(b'#') | Some(b' ') => return Ok(None),
        _ => {}
    }
    let mut fields = line.splitn(4, |&b| b == b' ');
    let (Some(id), Some(name), Some(ip), Some(key)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(KeyProblem::MissingFields);
    };
    if matches!(name.first(), Some(b'!') | Some(b'#')) {
        return Ok(None);
    }
    let id = AgentId::parse(id).ok_or(KeyProblem::BadId)?;
    if name.is_empty() {
        return Err(KeyProblem::MissingFields);
    }
    let name = std::str::from_utf8(name).map_err(|_| KeyProblem::BadName)?;
    let ip_text = String::from_utf8_lossy(ip);
    let ip = KeyIp::parse(&ip_text).ok_or_else(|| KeyProblem::BadIp(ip_text.into_owned()))?;
    if key.is_empty() {
        return Err(KeyProblem::EmptyKey);
    }
    Ok(Some(AgentKey::new(id, name, ip, key)))
}

/// The outcome of a (re)load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Keys now loaded.
    pub keys: usize,
    /// Malformed lines of the file just read.
    pub problems: Vec<KeyLineError>,
}

/// A shared, hot-swappable [`KeySet`]. Cloning is cheap (one `Arc`), and lookups never take a
/// lock: a reload builds a new set and swaps it in atomically, so readers see either the old
/// or the new set, never a mix.
#[derive(Clone, Default)]
pub struct KeyStore {
    current: Arc<ArcSwap<KeySet>>,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("keys", &self.current.load().len())
            .finish()
    }
}

impl KeyStore {
    /// A store holding `set`.
    pub fn new(set: KeySet) -> KeyStore {
        KeyStore {
            current: Arc::new(ArcSwap::from_pointee(set)),
        }
    }

    /// Loads a keys file into a new store.
    ///
    /// # Errors
    /// [`KeysError::Io`] when the file cannot be read.
    pub fn open(path: &Path) -> Result<(KeyStore, Vec<KeyLineError>), KeysError> {
        let (set, problems) = KeySet::read(path)?;
        Ok((KeyStore::new(set), problems))
    }

    /// The current set. Holding it keeps that version alive while newer ones are swapped in.
    pub fn snapshot(&self) -> Arc<KeySet> {
        self.current.load_full()
    }

    /// The key of an agent ID in the current set.
    pub fn get(&self, id: &AgentId) -> Option<Arc<AgentKey>> {
        self.current.load().get(id).cloned()
    }

    /// The key an ID-less message from `source` belongs to (see [`KeySet::by_ip`]).
    pub fn by_ip(&self, source: IpAddr) -> Option<Arc<AgentKey>> {
        self.current.load().by_ip(source).cloned()
    }

    /// Number of keys in the current set.
    pub fn len(&self) -> usize {
        self.current.load().len()
    }

    /// Whether the current set is empty.
    pub fn is_empty(&self) -> bool {
        self.current.load().is_empty()
    }

    /// Replaces the current set.
    pub fn replace(&self, set: KeySet) {
        self.current.store(Arc::new(set));
    }

    /// Re-reads `path` unconditionally and swaps the new set in.
    ///
    /// # Errors
    /// [`KeysError::Io`]; the current set is then kept.
    pub fn reload(&self, path: &Path) -> Result<ReloadReport, KeysError> {
        let (set, problems) = KeySet::read(path)?;
        let keys = set.len();
        self.replace(set);
        Ok(ReloadReport { keys, problems })
    }

    /// Re-reads `path` if its mtime, inode, device or size differ from the version loaded
    /// (the manager replaces the file by rename, which changes the inode). Returns `None` when
    /// nothing changed.
    ///
    /// # Errors
    /// [`KeysError::Io`]; the current set is then kept.
    pub fn reload_if_changed(&self, path: &Path) -> Result<Option<ReloadReport>, KeysError> {
        let meta = std::fs::metadata(path).map_err(|source| KeysError::Io {
            path: path.to_owned(),
            source,
        })?;
        if self.current.load().stamp == Some(FileStamp::of(&meta)) {
            return Ok(None);
        }
        self.reload(path).map(Some)
    }

    /// Polls `path` every `interval` (remoted uses [`DEFAULT_RELOAD_INTERVAL`]) and reloads it
    /// when it changes, until `cancel` fires. Logs the number of keys loaded and each malformed
    /// line (number and problem only); read errors keep the current keys and are logged.
    #[cfg(feature = "runtime")]
    pub async fn watch(self, path: PathBuf, interval: Duration, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let store = self.clone();
            let p = path.clone();
            // File I/O and key derivation for many agents would stall a runtime thread.
            let outcome = tokio::task::spawn_blocking(move || store.reload_if_changed(&p)).await;
            match outcome {
                Ok(Ok(Some(report))) => {
                    failing = false;
                    for problem in &report.problems {
                        tracing::warn!(path = %path.display(), %problem, "malformed client.keys line skipped");
                    }
                    tracing::info!(
                        path = %path.display(),
                        keys = report.keys,
                        malformed = report.problems.len(),
                        "agent keys reloaded"
                    );
                }
                Ok(Ok(None)) => failing = false,
                Ok(Err(error)) => {
                    // Log once per failure streak: a missing file would otherwise warn every tick.
                    if !failing {
                        tracing::warn!(%error, "agent keys not reloaded; keeping the current keys");
                    }
                    failing = true;
                }
                Err(error) => tracing::error!(%error, "agent keys reload task failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE_KEY: &str = "61f01f714746b01b977d7c65a724409f33ad89c391ad93f918eb27202dca8223";

    fn id(s: &str) -> AgentId {
        AgentId::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn worked_example_derivation() {
        assert_eq!(&md5_hex(b"web-01"), b"9e795e3c83f0a95aee9e9cd5928adc56");
        assert_eq!(&md5_hex(b"001"), b"dc5c7986daef50c1e02ab09b442ee34f");
        let key = AgentKey::new(id("001"), "web-01", KeyIp::Any, EXAMPLE_KEY.as_bytes());
        assert_eq!(key.aes_key(), b"78595427ed3f37b4e3329b9c32822c72");
        assert_eq!(
            key.blowfish_key(),
            b"78595427ed3f37b4e3329b9c32822c72725a2967a61c602"
        );
    }

    #[test]
    fn debug_hides_keys() {
        let key = AgentKey::new(id("001"), "web-01", KeyIp::Any, EXAMPLE_KEY.as_bytes());
        let text = format!("{key:?} {key:#?}");
        assert!(!text.contains("61f01f71"), "{text}");
        assert!(!text.contains("78595427"), "{text}");
        assert!(text.contains("web-01"));
        let (set, _) = KeySet::parse(format!("001 web-01 any {EXAMPLE_KEY}\n").as_bytes());
        let set_text = format!("{set:?}");
        let text = format!("{set_text} {:?}", KeyStore::new(set));
        assert!(
            !text.contains("61f01f71") && !text.contains("78595427"),
            "{text}"
        );
    }

    #[test]
    fn every_line_form() {
        let text = b"001 web-01 any k1\r\n\
            # comment\n\
            \x20indented comment\n\
            \n\
            002 !removed any k2\n\
            003 #removed any k3\n\
            #004 old any k4\n\
            005 two-fields\n\
            abc name any k6\n\
            007 fixed 127.0.0.1 key with spaces \n\
            008 net 10.0.0.0/8 k8\n\
            009 six 2001:db8::1 k9\n\
            010 bad 300.1.1.1 k10\n\
            011 empty any \n\
            001 again any k12\n\
            013 mask 192.168.0.0/255.255.0.0 k13";
        let (set, problems) = KeySet::parse(text);
        let lines: Vec<_> = problems
            .iter()
            .map(|p| (p.line, p.problem.clone()))
            .collect();
        assert_eq!(
            lines,
            vec![
                (8, KeyProblem::MissingFields),
                (9, KeyProblem::BadId),
                (13, KeyProblem::BadIp("300.1.1.1".into())),
                (14, KeyProblem::EmptyKey),
                (15, KeyProblem::DuplicateId(id("001"), 1)),
            ]
        );
        assert_eq!(set.len(), 5);
        assert_eq!(set.get(&id("001")).unwrap().raw_key(), b"k1");
        assert_eq!(set.get(&id("007")).unwrap().raw_key(), b"key with spaces ");
        assert!(!set.get(&id("007")).unwrap().sends_id_prefix());
        assert!(set.get(&id("008")).unwrap().sends_id_prefix());
        assert!(set.get(&id("009")).unwrap().sends_id_prefix());
        assert_eq!(
            set.get(&id("013")).unwrap().ip(),
            KeyIp::Network {
                addr: "192.168.0.0".parse().unwrap(),
                prefix: 16
            }
        );
        assert_eq!(
            set.by_ip("127.0.0.1".parse().unwrap()).unwrap().id(),
            id("007")
        );
        assert_eq!(
            set.by_ip("::ffff:127.0.0.1".parse().unwrap()).unwrap().id(),
            id("007")
        );
        // CIDR suffix dropped, then exact match: only the network address itself matches.
        assert_eq!(
            set.by_ip("10.0.0.0".parse().unwrap()).unwrap().id(),
            id("008")
        );
        assert!(set.by_ip("10.0.0.1".parse().unwrap()).is_none());
        assert!(set.get(&id("002")).is_none() && set.get(&id("003")).is_none());
    }

    #[test]
    fn source_rules() {
        let net = KeyIp::parse("10.1.0.0/16").unwrap();
        assert!(net.allows("10.1.200.3".parse().unwrap()));
        assert!(!net.allows("10.2.0.1".parse().unwrap()));
        assert!(KeyIp::Any.allows("::1".parse().unwrap()));
        assert!(KeyIp::parse("0.0.0.0/0")
            .unwrap()
            .allows("1.2.3.4".parse().unwrap()));
        assert!(KeyIp::parse("2001:db8::/32")
            .unwrap()
            .allows("2001:db8:1::5".parse().unwrap()));
        assert!(KeyIp::parse("10.0.0.0/33").is_none());
        assert!(KeyIp::parse("10.0.0.0/255.0.255.0").is_none());
        assert_eq!(KeyIp::parse("ANY"), Some(KeyIp::Any));
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "wazuh-proxy-keys-{tag}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Writes a new version next to `path` and renames it over, as the manager does.
    fn replace_by_rename(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn reload_follows_a_rename() {
        let dir = temp_dir("rename");
        let path = dir.join("client.keys");
        std::fs::write(&path, "001 a any k1\n").unwrap();
        let (store, problems) = KeyStore::open(&path).unwrap();
        assert!(problems.is_empty());
        let reader = store.clone();
        assert_eq!(store.reload_if_changed(&path).unwrap(), None);
        // Same size as before: only the inode tells the versions apart.
        replace_by_rename(&path, "002 b any k2\n");
        let report = store.reload_if_changed(&path).unwrap().unwrap();
        assert_eq!(report.keys, 1);
        assert!(reader.get(&id("001")).is_none());
        assert_eq!(reader.get(&id("002")).unwrap().name(), "b");
        assert_eq!(store.reload_if_changed(&path).unwrap(), None);
        // A missing file keeps the current keys.
        std::fs::remove_file(&path).unwrap();
        assert!(store.reload_if_changed(&path).is_err());
        assert_eq!(reader.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn watcher_picks_up_a_replaced_file() {
        let dir = temp_dir("watch");
        let path = dir.join("client.keys");
        std::fs::write(&path, "001 a any k1\n").unwrap();
        let (store, _) = KeyStore::open(&path).unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(store.clone().watch(
            path.clone(),
            Duration::from_millis(20),
            cancel.clone(),
        ));
        replace_by_rename(&path, "001 a any k1\n002 b 10.0.0.2 k2\nbad\n");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while store.len() != 2 {
            assert!(tokio::time::Instant::now() < deadline, "reload not seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            store.by_ip("10.0.0.2".parse().unwrap()).unwrap().id(),
            id("002")
        );
        cancel.cancel();
        task.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn blowfish_schedule_is_cached() {
        let key = AgentKey::new(id("001"), "web-01", KeyIp::Any, b"k");
        assert!(std::ptr::eq(key.blowfish(), key.blowfish()));
    }
}
