//! Listening sockets tuned for agent fleets.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Default accept backlog: large enough that a storm of reconnecting agents (thousands at
/// once after a failover) waits in the kernel instead of being refused. The kernel caps it at
/// `net.core.somaxconn`.
pub const DEFAULT_BACKLOG: i32 = 65535;

/// Binds a TCP listener with `SO_REUSEADDR` (a restarted proxy can bind while old connections
/// linger in TIME_WAIT) and the given backlog.
///
/// # Errors
/// When the address cannot be bound.
pub fn bind_tcp(addr: SocketAddr, backlog: i32) -> io::Result<tokio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // Same behaviour whatever the host's default: [::] means IPv6 only, as with nginx.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Binds a UDP socket for an agent listener.
///
/// # Errors
/// When the address cannot be bound.
pub(crate) fn bind_udp(addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// Accepts connections until `stop` is cancelled and hands each to `on_accept`.
///
/// An accept error (typically EMFILE: out of descriptors) is logged and retried with a
/// backoff (5 ms doubling to 1 s) instead of spinning, and the listener is kept.
pub async fn accept_loop(
    listener: &tokio::net::TcpListener,
    name: &str,
    stop: &tokio_util::sync::CancellationToken,
    mut on_accept: impl FnMut(tokio::net::TcpStream, SocketAddr),
) {
    let mut backoff = std::time::Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = std::time::Duration::from_millis(5);
                on_accept(stream, peer);
            }
            Err(e) => {
                tracing::warn!(listener = %name, error = %e, "accept failed; retrying in {backoff:?}");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }
    tracing::info!(listener = %name, "stopped accepting");
}

/// Sets TCP_NODELAY (data leaves in whole batches or as soon as it is read, so Nagle would only
/// add latency) and, when `keepalive` is given, TCP keepalive with that idle time (then every
/// 10 s, 3 probes), so that a dead peer is noticed.
pub(crate) fn tune(stream: &tokio::net::TcpStream, keepalive: Option<std::time::Duration>) {
    let _ = stream.set_nodelay(true);
    set_keepalive(socket2::SockRef::from(stream), keepalive);
}

/// Gives a listening socket the settings of [`tune`]: Linux copies them to every connection
/// it accepts (as nginx's `listen ... so_keepalive=` relies on), which saves five system
/// calls per connection in a reconnect storm.
pub(crate) fn tune_listener(
    listener: &tokio::net::TcpListener,
    keepalive: Option<std::time::Duration>,
) {
    let sock = socket2::SockRef::from(listener);
    if let Err(e) = sock.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY on the listener");
    }
    set_keepalive(sock, keepalive);
}

/// TCP keepalive with `idle` time, then every 10 s, 3 probes (nothing when `None`).
pub(crate) fn set_keepalive(sock: socket2::SockRef<'_>, idle: Option<std::time::Duration>) {
    set_keepalive_probes(sock, idle, true);
}

fn set_keepalive_probes(
    sock: socket2::SockRef<'_>,
    idle: Option<std::time::Duration>,
    with_count: bool,
) {
    if let Some(idle) = idle {
        let mut ka = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(std::time::Duration::from_secs(10));
        if with_count {
            ka = ka.with_retries(3);
        }
        if let Err(e) = sock.set_tcp_keepalive(&ka) {
            tracing::debug!(error = %e, "could not set TCP keepalive");
        }
    }
}

/// Settings of a connection to a manager: keepalive as [`set_keepalive`] and
/// `TCP_USER_TIMEOUT` (data left unacknowledged this long, or keepalive probes unanswered
/// this long, fail the connection with `ETIMEDOUT`; `None` leaves the kernel's default).
///
/// With a user timeout the kernel ignores the keepalive probe count (`tcp_keepalive_timer`
/// gives up on the user timeout alone), so the count is not set: one system call fewer
/// per manager connection, which a reconnect storm makes once per agent.
pub(crate) fn tune_manager(
    sock: socket2::SockRef<'_>,
    keepalive: Option<std::time::Duration>,
    user_timeout: Option<std::time::Duration>,
) {
    set_keepalive_probes(
        socket2::SockRef::from(&*sock),
        keepalive,
        user_timeout.is_none(),
    );
    if let Some(t) = user_timeout {
        if let Err(e) = sock.set_tcp_user_timeout(Some(t)) {
            tracing::debug!(error = %e, "could not set TCP_USER_TIMEOUT");
        }
    }
}

/// Bytes written to `stream` that the peer's TCP has not acknowledged yet (`SIOCOUTQ`: sent
/// and unsent alike). Zero once every byte written was acknowledged by the peer's kernel,
/// which is what "delivered" can mean for a connection that is about to close. The count
/// survives the peer's reset: a peer that reset before acknowledging leaves it above zero.
///
/// # Errors
/// When the socket cannot be queried (or, off Linux, always: `Unsupported`).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn unacked_bytes(stream: &tokio::net::TcpStream) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut queued: nix::libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ on Linux) writes one int through the pointer, which points
    // to a live c_int; the descriptor is borrowed from `stream` for the call.
    let rc = unsafe {
        nix::libc::ioctl(
            stream.as_raw_fd(),
            nix::libc::TIOCOUTQ,
            &mut queued as *mut nix::libc::c_int,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::try_from(queued).unwrap_or(0))
}

/// Off Linux the count is not available.
///
/// # Errors
/// Always `Unsupported`.
#[cfg(not(target_os = "linux"))]
pub(crate) fn unacked_bytes(_stream: &tokio::net::TcpStream) -> io::Result<u32> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    // The relay sets no TCP option per accepted agent: it relies on Linux copying the
    // listener's to each accepted socket. This checks that it does.
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_tcp_settings() {
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        tune_listener(&listener, Some(Duration::from_secs(37)));
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let sock = socket2::SockRef::from(&accepted);
        assert!(accepted.nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(37));
        assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(10));
        assert_eq!(sock.keepalive_retries().unwrap(), 3);
    }

    // A manager connection gets keepalive and the user timeout; the probe count only when
    // there is no user timeout (with one, the kernel does not read the count).
    #[tokio::test]
    async fn manager_connections_get_keepalive_and_the_user_timeout() {
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        let with = tokio::net::TcpStream::connect(addr).await.unwrap();
        let without = tokio::net::TcpStream::connect(addr).await.unwrap();
        let default_count = socket2::SockRef::from(&with).keepalive_retries().unwrap();
        tune_manager(
            socket2::SockRef::from(&with),
            Some(Duration::from_secs(41)),
            Some(Duration::from_secs(7)),
        );
        tune_manager(
            socket2::SockRef::from(&without),
            Some(Duration::from_secs(41)),
            None,
        );
        for stream in [&with, &without] {
            let sock = socket2::SockRef::from(stream);
            assert!(sock.keepalive().unwrap());
            assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(41));
            assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(10));
        }
        let with = socket2::SockRef::from(&with);
        assert_eq!(
            with.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(7))
        );
        assert_eq!(with.keepalive_retries().unwrap(), default_count);
        let without = socket2::SockRef::from(&without);
        assert_eq!(without.tcp_user_timeout().unwrap(), None);
        assert_eq!(without.keepalive_retries().unwrap(), 3);
    }

    // Acknowledged bytes leave the count; bytes the peer reset before acknowledging stay.
    #[tokio::test]
    async fn unacked_bytes_counts_what_the_peer_did_not_acknowledge() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        assert_eq!(unacked_bytes(&server).unwrap(), 0);
        server.write_all(&[7u8; 100]).await.unwrap();
        let mut buf = [0u8; 100];
        client.read_exact(&mut buf).await.unwrap();
        let mut acked = false;
        for _ in 0..200 {
            if unacked_bytes(&server).unwrap() == 0 {
                acked = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(acked, "the peer's kernel acknowledges what it received");

        // The peer closes before more comes: its kernel answers the new bytes with a reset,
        // not an acknowledgement, and the count stays.
        drop(client);
        tokio::time::sleep(Duration::from_millis(50)).await;
        server.write_all(&[7u8; 100]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(unacked_bytes(&server).unwrap(), 100);
        assert!(server.take_error().unwrap().is_some(), "reset by the peer");
    }
}
