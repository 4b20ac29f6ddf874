//! The settings of an agent listener and their checks against each other.

use std::time::Duration;

use crate::frame::MAX_PAYLOAD;
use crate::session::DuplicatePolicy;

/// Settings of an agent listener. Defaults suit Wazuh 4.x agents and managers.
#[derive(Debug, Clone)]
pub struct AgentRelayConfig {
    /// Time allowed for the first whole frame (default 10 s; agents send their startup
    /// message right after connecting).
    pub first_frame_timeout: Duration,
    /// Largest payload accepted either way (default 65536, the manager's own limit).
    pub max_payload: u32,
    /// Time allowed to connect to one manager before trying the next (default 5 s).
    pub connect_timeout: Duration,
    /// Close a session with no frame either way for this long (default 10 min, as nginx's
    /// `proxy_timeout`; agents send a keepalive every 10-20 s). `None` disables it.
    pub idle_timeout: Option<Duration>,
    /// Bytes asked of the kernel per read (default 32 KiB).
    pub read_chunk: usize,
    /// What to do with a second live connection of one agent (default replace).
    pub duplicate_policy: DuplicatePolicy,
    /// TCP keepalive idle time on both sockets, so dead peers are noticed (default 60 s).
    pub tcp_keepalive: Option<Duration>,
    /// When a manager fails (closes, resets, refuses the agent, or does not answer), keep the
    /// agent's connection and continue its stream on another manager at the next frame
    /// boundary (default on). Off: the agent is disconnected, as with any TCP proxy.
    pub failover: bool,
    /// Keep a copy of what was written to the manager until its TCP acknowledges it, and
    /// re-send to the next manager what a failed one never acknowledged (default on: a manager
    /// that dies silently loses nothing). Off: no copy is kept (about 40 ns less CPU per
    /// 256-byte event at saturation), and the frames in flight when a manager fails are
    /// counted at risk instead.
    pub resend_unacknowledged: bool,
    /// How long an agent is held while no manager can be reached, before it is disconnected
    /// (default 30 s; an agent waits 60 s for the answer to its startup message).
    pub hold_timeout: Duration,
    /// A manager that sends nothing back for this long after being handed an agent's startup
    /// (or replayed keepalive) is treated as failed (default 20 s). `None` disables it.
    pub reply_timeout: Option<Duration>,
    /// Per-source limits on open connections and on how fast new ones come.
    pub source_limits: crate::limits::SourceLimits,
    /// A manager that sends an agent nothing for this long while the agent keeps sending is
    /// taken for hung, and the agent continues elsewhere (default 45 s: remoted answers every
    /// keepalive, which agents send every 10 s, and agents themselves reconnect after 60 s
    /// without an answer). Judged by `super::decide::judge`: if the manager's TCP left data
    /// unacknowledged it is marked failed, otherwise only this agent moves. `None` disables it.
    pub liveness_timeout: Option<Duration>,
    /// `TCP_USER_TIMEOUT` on manager connections: a manager whose TCP leaves sent data
    /// unacknowledged this long is taken for dead, and its agents continue elsewhere
    /// (default 10 s; a blackholed manager is noticed within about this time once data is
    /// in flight, and agents send a keepalive every 10 s). `None`: the kernel's default
    /// (about 15 minutes of retransmissions).
    pub manager_user_timeout: Option<Duration>,
    /// A second connection claiming an agent that has a live session is refused while that
    /// session has heard from its agent within this time (default 60 s, remoted's
    /// `connection_overtake_time`), unless it proves with the agent's key that it is the agent
    /// reconnecting (see `crate::session::overtake`).
    pub overtake_time: Duration,
    /// How long an agent that every manager refused is first kept away (default 2 s, doubling
    /// per refusal in a row up to [`AgentRelayConfig::refused_backoff_max`]).
    pub refused_backoff: Duration,
    /// The longest an agent that every manager refused is kept away (default 60 s).
    pub refused_backoff_max: Duration,
    /// Connect to managers from the agent's own address (`IP_TRANSPARENT`; default false:
    /// from the proxy's address). Managers then check and log the agent's real address,
    /// which keys bound to an IP or a network need. Needs `CAP_NET_ADMIN`, and replies to the
    /// agents' addresses routed back through this host (see [`crate::balance::Balancer::connect_from`]).
    pub transparent: bool,
    /// Read a PROXY protocol header (v1 or v2) first, from trusted senders only, and take the
    /// client's address from it (default off).
    pub proxy_protocol: Option<crate::proxy_protocol::ProxyProtocol>,
}

/// A setting of [`AgentRelayConfig`] that cannot work, alone or with another one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value out of its range.
    #[error("{name} must be {range} (got {value})")]
    OutOfRange {
        /// The setting.
        name: &'static str,
        /// What it may be.
        range: String,
        /// What it was.
        value: String,
    },
    /// Two settings that contradict each other.
    #[error("{0}")]
    Conflict(String),
}

/// The smallest `max_payload` accepted: an agent's startup and keepalive messages must fit.
pub const MIN_MAX_PAYLOAD: u32 = 1024;

impl AgentRelayConfig {
    /// Checks every setting against its range and against the settings it works with, so
    /// that a configuration accepted here never fails at run time.
    ///
    /// # Errors
    /// The first setting (or pair of settings) that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let range = |name: &'static str, ok: bool, range: &str, value: String| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::OutOfRange {
                    name,
                    range: range.to_owned(),
                    value,
                })
            }
        };
        range(
            "max_payload",
            (MIN_MAX_PAYLOAD..=MAX_PAYLOAD).contains(&self.max_payload),
            &format!("{MIN_MAX_PAYLOAD}..={MAX_PAYLOAD}"),
            self.max_payload.to_string(),
        )?;
        range(
            "read_chunk",
            (1024..=1 << 20).contains(&self.read_chunk),
            "1024..=1048576",
            self.read_chunk.to_string(),
        )?;
        let secs = |d: Duration| format!("{d:?}");
        let positive = |name, d: Duration| range(name, !d.is_zero(), "more than 0", secs(d));
        positive("first_frame_timeout", self.first_frame_timeout)?;
        positive("connect_timeout", self.connect_timeout)?;
        positive("hold_timeout", self.hold_timeout)?;
        positive("refused_backoff", self.refused_backoff)?;
        if self.refused_backoff_max < self.refused_backoff {
            return Err(ConfigError::Conflict(format!(
                "refused_backoff_max ({:?}) is shorter than refused_backoff ({:?})",
                self.refused_backoff_max, self.refused_backoff
            )));
        }
        if let Some(t) = self.manager_user_timeout {
            range(
                "manager_user_timeout",
                t >= Duration::from_secs(1) && t.as_millis() <= u128::from(u32::MAX),
                "1s or more (0 to leave the kernel's default)",
                secs(t),
            )?;
        }
        if let Some(k) = self.tcp_keepalive {
            range(
                "tcp_keepalive",
                k >= Duration::from_secs(1) && k.as_secs() <= 32_767,
                "1s..=32767s (0 to disable)",
                secs(k),
            )?;
        }
        for (name, t) in [
            ("reply_timeout", self.reply_timeout),
            ("liveness_timeout", self.liveness_timeout),
        ] {
            let (Some(idle), Some(reply)) = (self.idle_timeout, t) else {
                continue;
            };
            if reply >= idle {
                return Err(ConfigError::Conflict(format!(
                    "{name} ({reply:?}) must be shorter than idle_timeout ({idle:?}): the idle timeout would close every session a silent manager holds before the failover could move it"
                )));
            }
        }
        if let Some(idle) = self.idle_timeout {
            if idle <= self.first_frame_timeout {
                return Err(ConfigError::Conflict(format!(
                    "idle_timeout ({idle:?}) must be longer than first_frame_timeout ({:?})",
                    self.first_frame_timeout
                )));
            }
        }
        if self.source_limits.rate.is_nan() || self.source_limits.burst.is_nan() {
            return Err(ConfigError::Conflict(
                "per-source rate and burst must be numbers".into(),
            ));
        }
        Ok(())
    }
}

impl Default for AgentRelayConfig {
    fn default() -> Self {
        AgentRelayConfig {
            first_frame_timeout: Duration::from_secs(10),
            max_payload: MAX_PAYLOAD,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(600)),
            read_chunk: 32 * 1024,
            duplicate_policy: DuplicatePolicy::Replace,
            tcp_keepalive: Some(Duration::from_secs(60)),
            failover: true,
            resend_unacknowledged: true,
            hold_timeout: Duration::from_secs(30),
            reply_timeout: Some(Duration::from_secs(20)),
            source_limits: crate::limits::SourceLimits::default(),
            transparent: false,
            manager_user_timeout: Some(Duration::from_secs(10)),
            liveness_timeout: Some(Duration::from_secs(45)),
            overtake_time: Duration::from_secs(60),
            refused_backoff: Duration::from_secs(2),
            refused_backoff_max: Duration::from_secs(60),
            proxy_protocol: None,
        }
    }
}
