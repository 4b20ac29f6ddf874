//! Runs a configuration: the core's [`wazuh_proxy_core::proxy::Proxy`] with what only the
//! binary has around it (signals, reload from files, upgrade to a new process, the admin
//! API, the PID file, privileges, systemd), until SIGTERM/SIGINT, then drains.

use std::time::Duration;

use tokio_util::task::TaskTracker;
use wazuh_proxy_core::proxy::{Applies, Inheritance, ProxyError};

use crate::config::{Config, Listener};

/// A running listener, as the binary's tasks (re-resolution, admin API) hold it.
use wazuh_proxy_core::proxy::ListenerHandle;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not start.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// Privileges could not be dropped to the configured user.
    #[error("cannot run as user {user:?}: {why}")]
    Privileges {
        /// The user.
        user: String,
        /// What failed.
        why: String,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signal(std::io::Error),
    /// Taking over from a previous process failed.
    #[error(transparent)]
    Upgrade(#[from] crate::upgrade::UpgradeError),
    /// The PID file could not be written.
    #[error(transparent)]
    PidFile(#[from] crate::pidfile::PidFileError),
    /// The admin API could not start.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
}

/// The core's proxy with the binary's configuration beside it (the re-resolution tasks read
/// the listeners' names as written).
pub(crate) struct Proxy {
    core: wazuh_proxy_core::proxy::Proxy,
    config: Config,
}

impl Proxy {
    /// Binds every listener of `config` (on the sockets `inherited` from a previous process
    /// where they match, with its operator's state) and starts serving.
    async fn start(config: &Config, inherited: Inheritance) -> Result<Proxy, StartError> {
        let typed = crate::settings::proxy_config(config);
        let core = wazuh_proxy_core::proxy::Proxy::start_with(typed, inherited).await?;
        Ok(Proxy {
            core,
            config: config.clone(),
        })
    }

    /// The bound listeners, in configuration order, with their configuration.
    pub(crate) fn listeners(&self) -> Vec<(Listener, ListenerHandle)> {
        self.core
            .listeners()
            .filter_map(|(c, handle)| {
                let spec = self.config.listeners.iter().find(|l| l.name == c.name)?;
                Some((spec.clone(), handle.clone()))
            })
            .collect()
    }

    /// The task tracker every connection runs on.
    pub(crate) fn tracker(&self) -> &TaskTracker {
        self.core.tracker()
    }

    /// Applies `config` (see [`wazuh_proxy_core::proxy::Proxy::reload`]) and says which
    /// changed settings wait for an upgrade.
    async fn reload(&mut self, config: &Config) -> Result<(), StartError> {
        let typed = crate::settings::proxy_config(config);
        let plan = self.core.reload(typed).await?;
        let mut later: Vec<(&str, Vec<&str>)> = Vec::new();
        for c in plan
            .changes
            .iter()
            .filter(|c| c.applies == Applies::AfterUpgrade)
        {
            let listener = c.listener.as_deref().unwrap_or("");
            match later.iter_mut().find(|(l, _)| *l == listener) {
                Some((_, fields)) => fields.push(c.field),
                None => later.push((listener, vec![c.field])),
            }
        }
        for (listener, fields) in later {
            tracing::warn!(listener, settings = %fields.join(","),
                "reload: these settings apply after an upgrade or restart; the listener keeps running with the old ones");
        }
        self.config = config.clone();
        Ok(())
    }
}

/// Switches to `user` (its primary group and supplementary groups) after the listeners are
/// bound, when running as root; a no-op, with a notice, when already running as that user.
fn drop_privileges(user: &str) -> Result<(), StartError> {
    use nix::unistd::{getuid, initgroups, setgid, setuid, User};
    let fail = |why: String| StartError::Privileges {
        user: user.to_owned(),
        why,
    };
    let entry = User::from_name(user)
        .map_err(|e| fail(e.to_string()))?
        .ok_or_else(|| fail("no such user".into()))?;
    if getuid() == entry.uid {
        return Ok(());
    }
    if !getuid().is_root() {
        return Err(fail(
            "only root can switch users; start as root or as that user".into(),
        ));
    }
    let name = std::ffi::CString::new(user).map_err(|_| fail("bad user name".into()))?;
    initgroups(&name, entry.gid).map_err(|e| fail(format!("initgroups: {e}")))?;
    setgid(entry.gid).map_err(|e| fail(format!("setgid: {e}")))?;
    setuid(entry.uid).map_err(|e| fail(format!("setuid: {e}")))?;
    tracing::info!(
        user,
        uid = entry.uid.as_raw(),
        "listeners bound; running as {user}"
    );
    Ok(())
}

/// `source = "transparent"` sets `IP_TRANSPARENT`, which needs `CAP_NET_ADMIN` (or
/// `CAP_NET_RAW`); without it every connect to a manager fails, so say so once, after
/// privileges are dropped (switching users clears the capabilities), rather than once per
/// agent.
fn warn_if_not_transparent_capable(config: &wazuh_proxy_core::proxy::ProxyConfig) {
    let transparent: Vec<&str> = config
        .listeners
        .iter()
        .filter(|l| l.settings.agent().is_some_and(|a| a.relay.transparent))
        .map(|l| l.name.as_str())
        .collect();
    if transparent.is_empty() {
        return;
    }
    match std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| may_set_transparent(&s))
    {
        Some(true) => {}
        Some(false) => tracing::warn!(listeners = ?transparent,
            "source = \"transparent\" needs CAP_NET_ADMIN (or CAP_NET_RAW), which this process lacks: connections to managers will fail (run as root without `user`, or grant the capability, e.g. AmbientCapabilities=CAP_NET_ADMIN)"),
        None => tracing::warn!(listeners = ?transparent,
            "cannot read this process's capabilities; source = \"transparent\" needs CAP_NET_ADMIN (or CAP_NET_RAW)"),
    }
}

/// Whether the effective capabilities in a `/proc/<pid>/status` text allow `IP_TRANSPARENT`:
/// CAP_NET_ADMIN (bit 12) or CAP_NET_RAW (bit 13). `None` when the line is missing or
/// malformed.
fn may_set_transparent(status: &str) -> Option<bool> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_NET_RAW: u32 = 13;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let bits = u64::from_str_radix(hex, 16).ok()?;
    Some(bits & (1 << CAP_NET_ADMIN | 1 << CAP_NET_RAW) != 0)
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// How `run` reloads and upgrades.
pub struct RunOptions {
    /// Where to write this process's ID once it serves.
    pub pid_file: Option<std::path::PathBuf>,
    /// Reads the configuration again (SIGHUP); `None` when it came from the command line.
    pub reload: Option<Box<dyn Fn() -> Result<Config, crate::config::ConfigError> + Send>>,
    /// Set in a successor process: the old process's hand-over socket.
    pub takeover: Option<std::path::PathBuf>,
    /// Where this process offers its sockets to a successor on SIGUSR2.
    pub upgrade_socket: std::path::PathBuf,
}

/// Runs `config` until a shutdown signal, then drains. A second signal closes everything at
/// once. SIGHUP reloads the configuration; SIGUSR2 upgrades to a new process.
///
/// # Errors
/// When a listener cannot start.
pub async fn run(config: Config, options: RunOptions) -> Result<(), StartError> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut proxy, takeover) = match &options.takeover {
        Some(path) => {
            let (stream, inherited) = crate::upgrade::connect(path).await?;
            tracing::info!(
                listeners = inherited.listeners.len(),
                drained_backends = inherited.state.drained().count(),
                "taking over from the previous process"
            );
            (Proxy::start(&config, inherited).await?, Some(stream))
        }
        None => (Proxy::start(&config, Inheritance::default()).await?, None),
    };
    let mut admin = match takeover {
        Some(stream) => {
            match crate::upgrade::adopt(stream, &proxy.core).await {
                Ok(n) => {
                    tracing::info!(sessions = n, "upgrade complete: agent sessions taken over")
                }
                Err(e) => tracing::error!("upgrade: taking over agent sessions failed: {e}"),
            }
            // The previous process releases the admin address once it has handed everything
            // over: wait for it.
            let mut tries = 0;
            loop {
                match crate::admin::AdminServer::start(&config, &proxy.core.view()).await {
                    Ok(a) => break a,
                    Err(e) if tries < 100 => {
                        tries += 1;
                        tracing::debug!("admin API not yet available: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        None => {
            let admin = crate::admin::AdminServer::start(&config, &proxy.core.view()).await?;
            crate::upgrade::notify_systemd("READY=1\n");
            admin
        }
    };
    // Before dropping privileges: the file may live where only root writes (/run).
    let _pid_file = match &options.pid_file {
        Some(path) => Some(crate::pidfile::PidFile::write(path)?),
        None => None,
    };
    if let Some(user) = &config.user {
        drop_privileges(user)?;
    }
    warn_if_not_transparent_capable(&proxy.core.config());
    let mut watchers = crate::resolve::start(&config, &proxy.listeners(), proxy.tracker());
    let mut hup = signal(SignalKind::hangup()).map_err(StartError::Signal)?;
    let mut usr2 = signal(SignalKind::user_defined2()).map_err(StartError::Signal)?;
    loop {
        tokio::select! {
            _ = shutdown_signal() => break,
            _ = hup.recv() => {
                let Some(reload) = &options.reload else {
                    tracing::warn!("SIGHUP: the configuration came from the command line; nothing to reload");
                    continue;
                };
                tracing::info!("SIGHUP: reloading the configuration");
                match reload() {
                    Err(e) => tracing::error!("reload refused, the running configuration stays: {e}"),
                    Ok(new) => match proxy.reload(&new).await {
                        Err(e) => tracing::error!("reload refused, the running configuration stays: {e}"),
                        Ok(()) => {
                            if let Some(admin) = &admin {
                                admin.refresh(&proxy.core.view());
                            }
                            watchers.stop();
                            watchers =
                                crate::resolve::start(&new, &proxy.listeners(), proxy.tracker());
                            warn_if_not_transparent_capable(&proxy.core.config());
                            tracing::info!("reload applied");
                        }
                    },
                }
            }
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: upgrading to a new process");
                match crate::upgrade::hand_over(&proxy.core, &options.upgrade_socket).await {
                    Ok(n) => {
                        tracing::info!(sessions = n, "upgrade: handed over; draining what is left and exiting");
                        // The new process serves the admin API from now on.
                        if let Some(a) = admin.take() {
                            a.stop().await;
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::error!("upgrade failed, this process keeps serving: {e}");
                        if e.after_ready() {
                            // It had stopped accepting for the successor: accept again.
                            proxy.core.resume_accepting();
                            if let Some(admin) = &admin {
                                admin.refresh(&proxy.core.view());
                            }
                        }
                    }
                }
            }
        }
    }
    watchers.stop();
    tokio::select! {
        _ = proxy.core.drain() => {}
        _ = shutdown_signal() => tracing::warn!("second signal: exiting without waiting for sessions"),
    }
    if let Some(admin) = admin {
        admin.stop().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::may_set_transparent;

    #[test]
    fn reads_the_network_capabilities_from_proc_status() {
        let root = "Name:\twazuh-proxy\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n";
        assert_eq!(may_set_transparent(root), Some(true));
        // CAP_NET_BIND_SERVICE (bit 10) alone.
        assert_eq!(
            may_set_transparent("CapEff:\t0000000000000400\n"),
            Some(false)
        );
        assert_eq!(
            may_set_transparent("CapEff:\t0000000000001000\n"),
            Some(true)
        );
        // CAP_NET_RAW alone is enough too.
        assert_eq!(
            may_set_transparent("CapEff:\t0000000000002000\n"),
            Some(true)
        );
        assert_eq!(may_set_transparent("CapEff:\tzz\n"), None);
        assert_eq!(may_set_transparent("Name:\tx\n"), None);
    }
}
