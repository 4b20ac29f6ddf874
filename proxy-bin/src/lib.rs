//! The configuration readers of `wazuh-proxy` (TOML and nginx), as a library so that they can
//! be fuzzed and tested on their own; the binary uses them from here.

pub mod config;
pub mod dns;
pub mod logging;
pub mod nginx;
