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

use std::time::Duration;

mod agent;
mod set;
mod store;
#[cfg(test)]
mod tests;

pub(crate) use agent::hex32;
pub use agent::{AgentKey, KeyIp};
pub use set::{FileStamp, KeyLineError, KeyProblem, KeySet, KeysError};
pub use store::{KeyStore, ReloadReport};

/// Length of the derived key (`md5hex(KEY) || md5hex(md5hex(NAME) || md5hex(ID))[..15]`).
pub const DERIVED_KEY_LEN: usize = 47;

/// Length of the AES-256 key: the first 32 bytes of the derived key.
pub const AES_KEY_LEN: usize = 32;

/// How often remoted checks `client.keys` for changes (`remoted.keyupdate_interval`).
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);
