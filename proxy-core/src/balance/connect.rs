//! Connecting to a backend with failover across the candidates, optionally from the agent's
//! own address.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::health::ConnGuard;
use super::{BalanceKey, Balancer};

/// A connected backend stream.
#[derive(Debug)]
pub struct Connected {
    /// The stream (TCP_NODELAY set).
    pub stream: TcpStream,
    /// The backend's index in [`Balancer::backends`].
    pub index: usize,
    /// The backend's address.
    pub addr: SocketAddr,
    /// Counts the connection as active until dropped.
    pub guard: ConnGuard,
    /// Connection attempts made, this one included.
    pub attempts: u32,
}

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttemptError {
    /// No answer within the connect timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The connect call failed.
    #[error("{0}")]
    Io(std::io::Error),
    /// The agent's address is of the other family than the backend's (IPv4 and IPv6), so
    /// the manager cannot be reached from it.
    #[error("cannot connect from {from} to an {family} backend", family = if .from.is_ipv4() { "IPv6" } else { "IPv4" })]
    FamilyMismatch {
        /// The source address asked for.
        from: IpAddr,
    },
    /// The socket could not be made to connect from the agent's address (`IP_TRANSPARENT`
    /// needs `CAP_NET_ADMIN` or `CAP_NET_RAW`).
    #[error("cannot connect from {from}: {error}")]
    Source {
        /// The source address asked for.
        from: IpAddr,
        /// What the system said.
        error: std::io::Error,
    },
    /// This host could not open the connection: out of descriptors (`EMFILE`, `ENFILE`), of
    /// local ports (`EADDRNOTAVAIL`) or of kernel memory (`ENOBUFS`, `ENOMEM`). The backend
    /// was never asked, so nothing is held against it.
    #[error("this host could not open a connection: {0}")]
    OutOfSockets(std::io::Error),
}

/// Whether a socket or connect error is this host running out of something rather than an
/// answer from the network.
pub(crate) fn out_of_sockets(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|code| {
        matches!(
            Errno::from_raw(code),
            Errno::EMFILE | Errno::ENFILE | Errno::EADDRNOTAVAIL | Errno::ENOBUFS | Errno::ENOMEM
        )
    })
}

impl From<std::io::Error> for AttemptError {
    fn from(e: std::io::Error) -> Self {
        if out_of_sockets(&e) {
            AttemptError::OutOfSockets(e)
        } else {
            AttemptError::Io(e)
        }
    }
}

impl AttemptError {
    /// Whether this host, not the backend, is at fault (the attempt is not held against the
    /// backend's health).
    fn is_local(&self) -> bool {
        matches!(
            self,
            AttemptError::FamilyMismatch { .. }
                | AttemptError::Source { .. }
                | AttemptError::OutOfSockets(_)
        )
    }
}

/// Opens one connection to `addr`, from `source` when given (see [`Balancer::connect_from`]).
async fn dial(addr: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, AttemptError> {
    let Some(from) = source else {
        // Socket, then connect (what `TcpStream::connect` does), so that each error is
        // classified: running out of descriptors must not count against the manager.
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        return Ok(socket.connect(addr).await?);
    };
    if from.is_ipv4() != addr.is_ipv4() {
        return Err(AttemptError::FamilyMismatch { from });
    }
    let socket = transparent_socket(addr, from).map_err(|error| {
        if out_of_sockets(&error) {
            AttemptError::OutOfSockets(error)
        } else {
            AttemptError::Source { from, error }
        }
    })?;
    Ok(socket.connect(addr).await?)
}

/// A socket bound to the non-local address `from`, ready to connect to `addr`.
#[cfg(target_os = "linux")]
fn transparent_socket(addr: SocketAddr, from: IpAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // IP_TRANSPARENT (SOL_IP) also covers IPv6 sockets on Linux: binding to an address this
    // host does not own, and receiving the replies sent to it.
    socket2::SockRef::from(&socket).set_ip_transparent(true)?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(from, 0))?;
    Ok(socket)
}

#[cfg(not(target_os = "linux"))]
fn transparent_socket(_: SocketAddr, _: IpAddr) -> std::io::Result<tokio::net::TcpSocket> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "transparent source addresses need Linux (IP_TRANSPARENT)",
    ))
}

/// One failed connection attempt.
#[derive(Debug)]
pub struct ConnectAttempt {
    /// The backend's index.
    pub index: usize,
    /// The backend's address.
    pub addr: SocketAddr,
    /// What went wrong.
    pub error: AttemptError,
}

/// Why [`Balancer::connect`] found no backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// There was nothing to try (every server `down`, or none eligible).
    #[error("no backend available")]
    NoBackend,
    /// Every candidate was tried and failed.
    #[error("could not connect to any backend: {}", list_attempts(.0))]
    AllFailed(Vec<ConnectAttempt>),
}

impl ConnectError {
    /// Whether every attempt failed because this host could not open a connection
    /// ([`AttemptError::OutOfSockets`]): no manager was asked, so waiting for one is pointless.
    pub fn is_out_of_sockets(&self) -> bool {
        match self {
            ConnectError::AllFailed(attempts) => attempts
                .iter()
                .all(|a| matches!(a.error, AttemptError::OutOfSockets(_))),
            ConnectError::NoBackend => false,
        }
    }
}

fn list_attempts(attempts: &[ConnectAttempt]) -> String {
    attempts
        .iter()
        .map(|a| format!("{} ({})", a.addr, a.error))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Balancer {
    /// Connects to the first candidate that answers, failing over in candidate order.
    ///
    /// Each attempt is bounded by `connect_timeout` and reported ([`Balancer::report_failure`]
    /// or [`Balancer::report_success`]). When a tier runs out (say every primary failed and
    /// got marked), the candidates are computed again, so backups and then the all-failed
    /// fallback are reached in the same call; no backend is tried twice.
    ///
    /// # Errors
    /// [`ConnectError::AllFailed`] lists every address tried and its error.
    pub async fn connect(
        &self,
        key: &BalanceKey,
        connect_timeout: Duration,
    ) -> Result<Connected, ConnectError> {
        self.connect_from(key, connect_timeout, None).await
    }

    /// Like [`Balancer::connect`], from the address `source` when one is given: the socket is
    /// made IP-transparent (`IP_TRANSPARENT`, which needs `CAP_NET_ADMIN` or `CAP_NET_RAW`)
    /// and bound to `(source, 0)` before it connects, so the manager sees the agent's own
    /// address. Replies reach the socket only if the managers route `source` back through
    /// this host and the host delivers them locally (see docs/configuration.md, "Agent source
    /// addresses"); replies that go elsewhere look like a manager that does not answer.
    ///
    /// A source of the other address family than a backend, or a socket that cannot be set up
    /// (no capability), fails that attempt without counting against the backend: the fault
    /// is not the manager's.
    ///
    /// # Errors
    /// [`ConnectError::AllFailed`] lists every address tried and its error.
    pub async fn connect_from(
        &self,
        key: &BalanceKey,
        connect_timeout: Duration,
        source: Option<IpAddr>,
    ) -> Result<Connected, ConnectError> {
        self.connect_avoiding(key, connect_timeout, source, &[])
            .await
    }

    /// Like [`Balancer::connect_from`], never trying the backends in `avoid` (those that
    /// refused this agent already). Nothing is reported against an avoided backend.
    ///
    /// # Errors
    /// [`ConnectError::AllFailed`] lists every address tried and its error;
    /// [`ConnectError::NoBackend`] when every candidate is avoided.
    pub async fn connect_avoiding(
        &self,
        key: &BalanceKey,
        connect_timeout: Duration,
        source: Option<IpAddr>,
        avoid: &[SocketAddr],
    ) -> Result<Connected, ConnectError> {
        // An IPv4 agent on a dual-stack listener shows as ::ffff:a.b.c.d.
        let source = source.map(|ip| ip.to_canonical());
        let mut tried: Vec<usize> = (0..self.backends.len())
            .filter(|&i| avoid.contains(&self.backends[i].addr()))
            .collect();
        let skipped = tried.len();
        let mut failed: Vec<ConnectAttempt> = Vec::new();
        loop {
            let list = self.candidates_excluding(key, Instant::now(), &tried);
            if list.is_empty() {
                break;
            }
            for idx in list {
                tried.push(idx);
                let addr = self.backends[idx].addr();
                // Only a newly failing backend is worth a warning; retries of one already
                // marked (the all-failed fallback) would repeat it for every agent.
                let was_available = self.is_available(idx, Instant::now());
                let guard = self.open(idx);
                let dialed = Instant::now();
                let error = match tokio::time::timeout(connect_timeout, dial(addr, source)).await {
                    Ok(Ok(stream)) => {
                        crate::timing::UPSTREAM_CONNECT.record(dialed.elapsed());
                        if let Err(e) = stream.set_nodelay(true) {
                            tracing::debug!(backend = %addr, error = %e, "TCP_NODELAY not set");
                        }
                        self.report_success(idx);
                        return Ok(Connected {
                            stream,
                            index: idx,
                            addr,
                            guard,
                            attempts: (tried.len() - skipped) as u32,
                        });
                    }
                    Ok(Err(e)) => e,
                    Err(_) => AttemptError::Timeout(connect_timeout),
                };
                drop(guard);
                if error.is_local() {
                    // Reported once by the caller with the whole list; per attempt it would
                    // repeat for every retry of every such agent.
                    tracing::debug!(backend = %addr, error = %error, "cannot connect to backend from the agent's address");
                    failed.push(ConnectAttempt {
                        index: idx,
                        addr,
                        error,
                    });
                    continue;
                }
                if was_available {
                    tracing::warn!(backend = %addr, error = %error, "connect to backend failed");
                } else {
                    tracing::debug!(backend = %addr, error = %error,
                        "connect to backend marked unavailable failed");
                }
                self.report_failure(idx, Instant::now());
                failed.push(ConnectAttempt {
                    index: idx,
                    addr,
                    error,
                });
            }
        }
        if failed.is_empty() {
            Err(ConnectError::NoBackend)
        } else {
            Err(ConnectError::AllFailed(failed))
        }
    }
}
