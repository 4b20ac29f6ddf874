//! Agent enrollment on 1515 (authd), in terminate mode.
//!
//! Agents enroll over TLS: one request line, one reply. Two failure modes hurt in front of a
//! cluster, and both end with the manager refusing the agent for an hour ("Duplicate agent
//! name", `<force><after_registration_time>`):
//!
//! - **Lost reply.** The manager registers the key once its TLS write succeeds; if the
//!   connection then dies (failover, proxy or network fault), the agent retries without a key
//!   and is refused.
//! - **Slow or unusual managers.** A reply is taken as whole when it is whole: a key at its
//!   closing quote, a refusal at the manager's close or after a short quiet period (4.0-4.12
//!   write it in two parts), so managers that keep the connection open (the QA simulators)
//!   work too.
//!
//! [`EnrollFront`] terminates the agents' TLS, so it sees each request and reply. A reply is
//! *delivered* when the agent's TCP acknowledged every byte of it
//! (`crate::net::unacked_bytes`), whatever the agent does next (close_notify, FIN, reset).
//! A key reply that was not acknowledged is kept for a short time, and given **once** to a
//! connection that is indistinguishable from that agent's retry: same source address,
//! byte-identical request (password included), arriving after the first connection ended.
//! Every other connection goes to a manager on its own, concurrent identical ones included,
//! so where the manager would refuse a second agent of the same name, the second agent gets
//! that refusal. An error is never kept. See `docs/enrollment.md` for the exact guarantee
//! and the residual risk (two hosts behind one NAT address sending byte-identical requests).
//!
//! The price: the proxy then holds enrollment passwords and issued keys in memory (zeroized
//! when dropped, never logged), and agents talk TLS with the proxy's certificate. Passthrough
//! (a plain TCP relay of 1515, no keys seen) is the alternative when that is not acceptable.
//!
//! - [`request`]: the request grammar, with authd's own error texts.
//! - [`reply`]: key replies and refusals.
//! - [`tls`]: the certificate agents see and how backends are verified.
//! - [`EnrollFront`]: the listener.
//!
//! ```no_run
//! use std::sync::Arc;
//! use wazuh_proxy_core::balance::{BackendConfig, Balancer, Policy};
//! use wazuh_proxy_core::enroll::{BackendTls, EnrollConfig, EnrollFront, ServerCert};
//! use tokio_util::sync::CancellationToken;
//! use tokio_util::task::TaskTracker;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let managers = vec![BackendConfig::new("10.0.0.11:1515".parse()?)];
//! let balancer = Balancer::new(Policy::Source, managers)?;
//! let config = EnrollConfig::new(
//!     ServerCert::self_signed("/var/lib/wazuh-proxy/enroll.crt", "/var/lib/wazuh-proxy/enroll.key"),
//!     BackendTls::VerifyCa { ca_file: "/etc/wazuh-proxy/sslmanager.cert".into(), server_name: None },
//! );
//! let front = Arc::new(EnrollFront::new(config, balancer)?);
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:1515").await?;
//! front.serve(listener, CancellationToken::new(), TaskTracker::new()).await;
//! # Ok(()) }
//! ```

mod cache;
mod front;
pub mod reply;
pub mod request;
pub mod tls;

pub use front::{EnrollConfig, EnrollError, EnrollFront, EnrollStats, KeptReply, Outcome};
pub use reply::{error_reply, EnrollReply, IssuedKey};
pub use request::{EnrollRequest, RequestError};
pub use tls::{fingerprint, BackendTls, ClientCert, ServerCert, TlsError};
