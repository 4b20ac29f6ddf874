//! Binary upgrade without refusing a connection or dropping an agent.
//!
//! SIGUSR2 (or `wazuh-proxy upgrade`, which sends it) makes the running process start its
//! successor: the same command line plus `--takeover SOCKET`. The successor connects to that
//! Unix socket, receives the listening sockets and the operator's state (the managers
//! drained by hand, `wazuh_proxy_core::proxy::OperatorState`) and starts serving on them,
//! with the same managers drained; the old process
//! then stops accepting and hands every agent session over at a frame boundary (see
//! `wazuh_proxy_core::handover`) and the enrollment replies kept for a retry, drains what is
//! left (plain TCP and UDP listeners) and exits. If the successor fails after it said it was
//! ready, the old process takes back the sessions it still holds and accepts again
//! ([`UpgradeError::after_ready`], `Proxy::resume_accepting`).
//! Under systemd the successor tells the service manager its PID (`MAINPID=`), so the
//! service stays up across the upgrade.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use wazuh_proxy_core::handover::{self, HandoverError};
use wazuh_proxy_core::proxy::{Inheritance, Proxy};

/// Why an upgrade did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The hand-over socket could not be created or used.
    #[error("upgrade socket {path}: {source}")]
    Socket {
        /// Its path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The successor could not be started.
    #[error("cannot start the new process: {0}")]
    Spawn(std::io::Error),
    /// The successor did not connect or did not get ready in time.
    #[error("the new process did not take over within {0:?}")]
    Timeout(Duration),
    /// The hand-over protocol failed.
    #[error(transparent)]
    Handover(#[from] HandoverError),
    /// The hand-over failed after the successor said it was ready (it died, or broke the
    /// protocol): the sessions not handed yet were taken back; accept again.
    #[error("the new process failed after it took over the listeners: {0}")]
    AfterReady(HandoverError),
}

impl UpgradeError {
    /// Whether this process had stopped accepting for the successor when the upgrade failed.
    pub fn after_ready(&self) -> bool {
        matches!(self, UpgradeError::AfterReady(_))
    }
}

/// Test only: a successor started with this variable set in its environment says it is
/// ready, then exits at once (its end of the hand-over socket shut for reading first, so the
/// old process's next write fails), as a successor that crashes mid-hand-over would. Used by
/// the tests of a failed upgrade; never set it in production.
pub const TEST_EXIT_AFTER_READY: &str = "WAZUH_PROXY_TEST_EXIT_AFTER_READY";

/// Time allowed to the successor to connect and start serving.
const TAKEOVER_WAIT: Duration = Duration::from_secs(30);

/// Old process: starts the successor and hands it the listeners and the agent sessions.
/// On success the caller drains what is left and exits; on failure it keeps running.
///
/// # Errors
/// [`UpgradeError`]; nothing has been handed over unless the successor said it was ready.
pub async fn hand_over(proxy: &Proxy, socket: &Path) -> Result<usize, UpgradeError> {
    let sock_err = |source| UpgradeError::Socket {
        path: socket.to_owned(),
        source,
    };
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(sock_err)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(sock_err)?;
    let mut child = successor(socket).spawn().map_err(UpgradeError::Spawn)?;
    tracing::info!(pid = child.id(), socket = %socket.display(), "upgrade: new process started; waiting for it to take over");
    let accepted = tokio::time::timeout(TAKEOVER_WAIT, listener.accept()).await;
    let _ = std::fs::remove_file(socket);
    let stream = match accepted {
        Ok(Ok((stream, _))) => stream,
        Ok(Err(e)) => return Err(sock_err(e)),
        Err(_) => {
            let _ = child.kill();
            return Err(UpgradeError::Timeout(TAKEOVER_WAIT));
        }
    };
    match tokio::time::timeout(TAKEOVER_WAIT, proxy.offer_listeners(&stream)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = child.kill();
            return Err(e.into());
        }
        Err(_) => {
            let _ = child.kill();
            return Err(UpgradeError::Timeout(TAKEOVER_WAIT));
        }
    }
    tracing::info!("upgrade: the new process serves the listeners; handing over agent sessions");
    let (handed, replies) = proxy.hand_over(&stream).await.map_err(|e| {
        // The successor holds the listeners too and may be alive; it was not asked to stop.
        tracing::warn!(
            pid = child.id(),
            "upgrade: the new process failed mid-hand-over"
        );
        UpgradeError::AfterReady(e)
    })?;
    tracing::info!(
        sessions = handed,
        enrollment_replies = replies,
        "upgrade: agent sessions handed over (and kept enrollment replies)"
    );
    // The child is now the service; do not wait for it.
    drop(child);
    Ok(handed)
}

/// The successor's command line: this one, plus `--takeover SOCKET`.
fn successor(socket: &Path) -> std::process::Command {
    let mut args = std::env::args_os();
    // argv[0], not /proc/self/exe: after a package upgrade the path holds the new binary.
    let program = args.next().unwrap_or_else(|| "wazuh-proxy".into());
    let mut cmd = std::process::Command::new(program);
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        if a == "--takeover" {
            skip = true;
            continue;
        }
        cmd.arg(a);
    }
    cmd.arg("--takeover").arg(socket);
    cmd
}

/// New process, step 1: connects to the old process and receives its listening sockets and
/// the operator's state.
///
/// # Errors
/// When the old process cannot be reached or the protocol fails.
pub async fn connect(socket: &Path) -> Result<(UnixStream, Inheritance), UpgradeError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| UpgradeError::Socket {
            path: socket.to_owned(),
            source,
        })?;
    let inherited = wazuh_proxy_core::proxy::handover::receive_inheritance(&stream).await?;
    Ok((stream, inherited))
}

/// New process, step 2 (serving on the inherited listeners): adopts the agent sessions,
/// then tells systemd, if it supervises this service, that this process is now the main one.
///
/// # Errors
/// When the protocol fails.
pub async fn adopt(stream: UnixStream, proxy: &Proxy) -> Result<usize, UpgradeError> {
    if std::env::var_os(TEST_EXIT_AFTER_READY).is_some() {
        tracing::warn!("{TEST_EXIT_AFTER_READY} is set (test only): exiting right after Ready");
        if let Ok(std_stream) = stream.into_std() {
            let _ = std_stream.shutdown(std::net::Shutdown::Read);
            if let Ok(stream) = std_stream
                .set_nonblocking(true)
                .and_then(|()| UnixStream::from_std(std_stream))
            {
                let _ = handover::send(&stream, &handover::Message::Ready).await;
            }
        }
        std::process::exit(75);
    }
    let (adopted, replies) = proxy.adopt(&stream).await?;
    if replies > 0 {
        tracing::info!(
            enrollment_replies = replies,
            "upgrade: kept enrollment replies taken over"
        );
    }
    notify_systemd(&format!("MAINPID={}\nREADY=1\n", std::process::id()));
    Ok(adopted)
}

/// Sends a state line to systemd's notification socket, when there is one.
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = PathBuf::from(path);
    if path.as_os_str().as_encoded_bytes().first() == Some(&b'@') {
        tracing::debug!("abstract NOTIFY_SOCKET is not supported; not notifying systemd");
        return;
    }
    match std::os::unix::net::UnixDatagram::unbound()
        .and_then(|s| s.send_to(state.as_bytes(), &path))
    {
        Ok(_) => tracing::debug!("notified systemd"),
        Err(e) => tracing::warn!(error = %e, "cannot notify systemd"),
    }
}
