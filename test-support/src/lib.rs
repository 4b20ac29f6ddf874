//! Helpers shared by the tests of every crate in the wazuh-proxy workspace, so that a test
//! starts agents, relays, the `wazuh-proxy` process or the real Wazuh daemons the same way
//! wherever it lives.
//!
//! - [`agents`]: agent connections on loopback (frames, startups answered by an ACK, agents
//!   streaming beside an attack).
//! - [`relay`]: an agent relay of the core library on loopback.
//! - [`process`]: the `wazuh-proxy` binary as a child process, its CLI, its files.
//! - [`http`]: requests to the admin API.
//! - [`tls`]: the agent side of enrollment (TLS that accepts any certificate, as agents do).
//! - [`logs`], [`wait`], [`files`], [`skip`]: log capture, waiting for a condition, temporary
//!   files and the shared vectors, loud skips that fail in CI.
//! - [`wazuh`]: the real Wazuh 4.x daemons built from source, laid out per test.
//!
//! Everything panics on failure: these are test helpers, and a panic is a test failure with
//! its message.

pub mod agents;
pub mod files;
pub mod http;
pub mod logs;
pub mod process;
pub mod relay;
pub mod skip;
pub mod tls;
pub mod wait;
pub mod wazuh;

pub use agents::*;
pub use files::*;
pub use http::*;
pub use logs::*;
pub use process::*;
pub use relay::*;
pub use skip::*;
pub use tls::*;
pub use wait::*;
