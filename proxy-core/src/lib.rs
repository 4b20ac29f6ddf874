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
//! drain or undrain a backend, rebalance), the operator's decisions as one value apart from
//! the configuration ([`proxy::OperatorState`], kept across reloads and handed to a
//! successor) and the hand-over of listeners and live agent sessions to a successor process
//! ([`proxy::handover`]).
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
//! - [`session`] (who is connected where), [`access`] (the access log), [`stats`] and
//!   [`timing`] (counters and latency histograms the binary exports as metrics). Agents are
//!   checked against `client.keys` inside the relay (a private module) when it has `keys`.
//! - [`net`] (listening sockets tuned for fleets), [`pace`] (batching under load: a runtime
//!   that hosts relays should call [`pace::before_park`] from `on_thread_park`).
//! - [`handover`]: the wire format of the hand-over to a successor process.
//! - [`proxy`]: all of the above as one proxy (start, reload, drain, operator actions,
//!   hand-over), behind the [`proxy::Listener`] trait every listener kind implements.
//!
//! **Enrollment**: [`enroll`], the 1515 front that terminates the agents' TLS and forwards
//! their key requests to authd.
//!
//! **Tools**: [`inspect`] decodes captured 1514 traffic with the agents' keys; `sim`
//! holds stand-in managers and agents on real sockets for tests, demos and benchmarks.
//!
//! ## Cargo features
//!
//! | feature | default | what it adds | pulls in |
//! | --- | --- | --- | --- |
//! | `codec` | always | [`frame`], [`envelope`], [`cipher`], [`control`], [`keys`] (the tokio codec of [`frame`] and the key watch need `runtime`) | aes, blowfish, flate2, md-5, bytes |
//! | `runtime` | yes | the relays, balancing, sessions, health checks, hand-over, [`proxy`] | tokio, tokio-util, socket2, nix, dashmap |
//! | `enroll` | yes | [`enroll`] and the `enroll` listener kind (implies `runtime`) | rustls (ring), rcgen |
//! | `inspect` | yes | [`inspect`]: decoding captured traffic | base64 |
//! | `sim` | no | `sim`: stand-in managers and agents (implies `runtime`) | |
//!
//! A user of the codecs alone builds with `default-features = false, features = ["codec"]`
//! and gets neither an async runtime nor TLS.
#![warn(missing_docs, unreachable_pub)]
// One audited exception: taking ownership of descriptors received over SCM_RIGHTS (handover).
#![deny(unsafe_code)]

// codec
pub mod cipher;
pub mod control;
pub mod envelope;
pub mod frame;
pub mod keys;

#[cfg(feature = "runtime")]
pub mod access;
#[cfg(feature = "runtime")]
pub mod balance;
#[cfg(feature = "enroll")]
pub mod enroll;
#[cfg(feature = "runtime")]
pub mod handover;
#[cfg(feature = "runtime")]
pub mod health;
#[cfg(feature = "inspect")]
pub mod inspect;
#[cfg(feature = "runtime")]
pub mod limits;
#[cfg(feature = "runtime")]
pub mod net;
#[cfg(feature = "runtime")]
pub mod pace;
#[cfg(feature = "runtime")]
pub mod proxy;
#[cfg(feature = "runtime")]
pub mod proxy_protocol;
#[cfg(feature = "runtime")]
pub mod relay;
#[cfg(feature = "runtime")]
pub mod session;
#[cfg(feature = "sim")]
pub mod sim;
#[cfg(feature = "runtime")]
pub mod stats;
#[cfg(feature = "runtime")]
pub mod tcp;
#[cfg(feature = "runtime")]
pub mod timing;
#[cfg(feature = "runtime")]
pub mod udp;
// Internal: the relay checks agents against `client.keys` with it.
#[cfg(feature = "runtime")]
mod verify;
