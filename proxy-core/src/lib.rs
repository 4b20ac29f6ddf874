//! # wazuh-proxy-core
//!
//! The protocol-aware parts of wazuh-proxy, usable on their own: codecs for the Wazuh agent
//! protocol, the relays that carry it frame by frame, and a [`proxy::Proxy`] that runs a
//! whole configuration of listeners. The `wazuh-proxy` binary is this crate plus
//! configuration files, signals, an admin HTTP API and systemd glue.
//!
//! ## Embedding a proxy
//!
//! A [`proxy::ProxyConfig`] lists listeners, each with its kind's settings
//! ([`proxy::ListenerSettings`]) and its backends. [`proxy::Proxy::start`] binds them and
//! serves; [`proxy::Proxy::drain`] stops accepting and lets sessions end:
//!
//! ```no_run
//! use wazuh_proxy_core::proxy::{ListenerConfig, Proxy, ProxyConfig};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let managers = ["10.0.0.11:1514".parse()?, "10.0.0.12:1514".parse()?];
//! let agents = ListenerConfig::agent("agents", "0.0.0.0:1514".parse()?, &managers);
//! let mut proxy = Proxy::start(ProxyConfig::new(vec![agents])).await?;
//! tokio::signal::ctrl_c().await?;
//! proxy.drain().await;
//! # Ok(()) }
//! ```
//!
//! `examples/embed.rs` is that program, runnable. The running proxy also offers
//! [`proxy::Proxy::reload`] (a diff of the old and new configuration, every setting
//! classified as applied in place or after an upgrade, see [`proxy::reload`]),
//! [`proxy::Proxy::view`] (the listeners, sessions and backends, and the operator's actions:
//! drain or undrain a backend, rebalance) and the hand-over of listeners and live agent
//! sessions to a successor process ([`proxy::handover`]).
//!
//! ## The modules, from the wire up
//!
//! **Codecs** (sans-IO: bytes in, values out; no sockets, no clock reads):
//! - [`frame`]: the 1514/TCP framing (a 4-byte little-endian length, then the payload).
//! - [`envelope`]: the secure envelope's clear-text header (agent ID, cipher), read without
//!   decrypting.
//! - [`cipher`]: the AES and Blowfish layers and compression under the envelope.
//! - [`control`]: decrypted `#!-` control messages and events.
//! - [`keys`]: `client.keys` parsing, key derivation and a reloadable key store.
//!
//! **Runtime** (tokio):
//! - [`relay`]: the frame-aware relay for agents on 1514/TCP: routing by agent, failover at
//!   a frame boundary, replay of the frames a failed manager did not acknowledge.
//! - [`udp`], [`tcp`]: the UDP agent relay and the plain TCP relay (enrollment passthrough,
//!   the manager API).
//! - [`balance`] (backend choice and passive health), [`health`] (active checks),
//!   [`limits`] (per-source admission), [`proxy_protocol`] (the PROXY header of a load
//!   balancer in front).
//! - [`session`] (who is connected where), [`verify`] (agents checked against
//!   `client.keys`), [`access`] (the access log), [`stats`] and [`timing`] (counters and
//!   latency histograms the binary exports as metrics).
//! - [`net`] (listening sockets tuned for fleets), [`pace`] (batching under load: a runtime
//!   that hosts relays should call [`pace::before_park`] from `on_thread_park`).
//! - [`handover`]: the wire format of the hand-over to a successor process.
//! - [`proxy`]: all of the above as one proxy (start, reload, drain, operator actions,
//!   hand-over), behind the [`proxy::Listener`] trait every listener kind implements.
//!
//! **Enrollment**: [`enroll`], the 1515 front that terminates the agents' TLS and forwards
//! their key requests to authd.
//!
//! **Tools**: [`inspect`] decodes captured 1514 traffic with the agents' keys; [`sim`]
//! holds stand-in managers and agents on real sockets for tests, demos and benchmarks.
#![warn(missing_docs, unreachable_pub)]
// One audited exception: taking ownership of descriptors received over SCM_RIGHTS (handover).
#![deny(unsafe_code)]

pub mod access;
pub mod balance;
pub mod cipher;
pub mod control;
pub mod enroll;
pub mod envelope;
pub mod frame;
pub mod handover;
pub mod health;
pub mod inspect;
pub mod keys;
pub mod limits;
pub mod net;
pub mod pace;
pub mod proxy;
pub mod proxy_protocol;
pub mod relay;
pub mod session;
pub mod sim;
pub mod stats;
pub mod tcp;
pub mod timing;
pub mod udp;
pub mod verify;
