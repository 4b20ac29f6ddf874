//! # wazuh-proxy-core
//!
//! The protocol-aware parts of wazuh-proxy, usable on their own: the 1514 frame codec
//! ([`frame`]), the secure envelope's clear-text header ([`envelope`]), backend selection and
//! passive health ([`balance`]), the registry of live agent sessions ([`session`]), and the
//! frame-by-frame relay that ties them to sockets ([`relay`]). A runtime that hosts relays
//! should call [`pace::before_park`] from `on_thread_park` to batch under load.
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
