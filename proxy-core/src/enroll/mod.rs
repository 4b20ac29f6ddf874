//! Agent enrollment on 1515 (authd), in terminate mode.
//!
//! Agents enroll over TLS: one request line, one reply, the manager closes. Two failure modes
//! hurt in front of a cluster, and both end with the manager refusing the agent for an hour
//! ("Duplicate agent name", `<force><after_registration_time>`):
//!
//! - **Lost reply.** The manager registers the key once its TLS write succeeds; if the
//!   connection then dies (failover, proxy or network fault), the agent retries without a key
//!   and is refused.
//! - **Concurrent requests** for one name: the manager serialises them and refuses all but one.
//!
//! [`EnrollFront`] terminates the agents' TLS, so it sees each request and reply and can fix
//! both: identical requests from one address in flight at once go upstream once and share the
//! reply (single-flight), and a key reply whose delivery was not confirmed is kept for a short
//! time and replayed to an identical retry from the same address instead of being forwarded.
//! A reply is never shared with another address or another request (another password
//! included), and an error is never replayed.
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

pub use front::{EnrollConfig, EnrollError, EnrollFront, EnrollStats, Outcome};
pub use reply::{error_reply, EnrollReply, IssuedKey};
pub use request::{EnrollRequest, RequestError};
pub use tls::{fingerprint, BackendTls, ServerCert, TlsError};
