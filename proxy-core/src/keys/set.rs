//! Parsing `client.keys` into an immutable, indexed [`KeySet`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use zeroize::Zeroizing;

use crate::envelope::AgentId;

use super::{AgentKey, KeyIp};

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
    pub(super) stamp: Option<FileStamp>,
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
