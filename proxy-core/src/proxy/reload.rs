//! Reload as a diff of the running and the new configuration: which settings change, and for
//! each whether a reload applies it in place or it waits for an upgrade (or restart).
//!
//! Every field of every configuration struct is classified below, by destructuring it
//! without `..`: a field added to one of them and not classified here does not compile.

use super::config::{AgentSettings, ListenerConfig, ListenerSettings, ProxyConfig};
#[cfg(feature = "enroll")]
use crate::enroll::EnrollConfig;
use crate::relay::AgentRelayConfig;
use crate::tcp::TcpRelayConfig;
use crate::udp::UdpRelayConfig;

/// When a changed setting takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applies {
    /// A reload applies it to the running listener (live sessions stay).
    InPlace,
    /// The running listener keeps its old value; a binary upgrade or a restart applies it.
    AfterUpgrade,
}

/// One changed setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The listener it belongs to (`None`: a proxy-wide setting).
    pub listener: Option<String>,
    /// The setting, as a field path of [`ProxyConfig`] (`"health"`, `"relay.idle_timeout"`).
    pub field: &'static str,
    /// When it takes effect.
    pub applies: Applies,
}

/// What a reload changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    /// Listeners bound anew (a new name, address or kind).
    pub added: Vec<String>,
    /// Listeners that stop accepting (their sessions run on).
    pub removed: Vec<String>,
    /// Changed settings of the proxy and of the listeners that stay.
    pub changes: Vec<Change>,
}

impl ReloadPlan {
    /// The changes a reload cannot apply, by listener.
    pub fn after_upgrade(&self) -> impl Iterator<Item = &Change> {
        self.changes
            .iter()
            .filter(|c| c.applies == Applies::AfterUpgrade)
    }
}

/// Whether `old` and `new` are the same listener: same name, address and kind. Any other
/// change to these replaces the listener.
pub(crate) fn same_listener(old: &ListenerConfig, new: &ListenerConfig) -> bool {
    old.name == new.name && old.listen == new.listen && old.kind() == new.kind()
}

/// Pushes a [`Change`] for every field of `$new` (a `$ty`) that differs from `$old`'s, with
/// the class written beside it (`Nested`: compared field by field elsewhere). The pattern has
/// no `..`: every field must be listed.
macro_rules! classify {
    ($out:expr, $listener:expr, $prefix:literal, $old:expr, $new:expr,
     $ty:ident { $($field:ident: $applies:ident),* $(,)? }) => {{
        let $ty { $($field),* } = $new;
        $( classify!(@one $applies, $out, $listener, $prefix, $old, $field); )*
    }};
    (@one Nested, $out:expr, $listener:expr, $prefix:literal, $old:expr, $field:ident) => {
        let _ = $field;
    };
    (@one $applies:ident, $out:expr, $listener:expr, $prefix:literal, $old:expr, $field:ident) => {
        if $old.$field != *$field {
            $out.push(Change {
                listener: $listener.clone(),
                field: concat!($prefix, stringify!($field)),
                applies: Applies::$applies,
            });
        }
    };
}

/// The diff of `old` (running) and `new`.
pub fn diff(old: &ProxyConfig, new: &ProxyConfig) -> ReloadPlan {
    let mut plan = ReloadPlan::default();
    let proxy_wide: Option<String> = None;
    classify!(
        plan.changes,
        proxy_wide,
        "",
        old,
        new,
        ProxyConfig {
            listeners: Nested,
            drain_timeout: InPlace,
            batch_window: InPlace,
        }
    );
    for n in &new.listeners {
        match old.listeners.iter().find(|o| same_listener(o, n)) {
            Some(o) => listener_changes(o, n, &mut plan.changes),
            None => plan.added.push(n.name.clone()),
        }
    }
    for o in &old.listeners {
        if !new.listeners.iter().any(|n| same_listener(o, n)) {
            plan.removed.push(o.name.clone());
        }
    }
    plan
}

/// The changes between two configurations of the same listener.
fn listener_changes(old: &ListenerConfig, new: &ListenerConfig, out: &mut Vec<Change>) {
    let owner = Some(new.name.clone());
    classify!(
        out,
        owner,
        "",
        old,
        new,
        ListenerConfig {
            // Identity: a change replaces the listener (see `same_listener`).
            name: InPlace,
            listen: InPlace,
            // A new balancer, with the passive-health state of the backends that stay.
            balance: InPlace,
            backends: InPlace,
            // The checks run as a task started with the listener.
            health: AfterUpgrade,
            settings: Nested,
        }
    );
    match (&old.settings, &new.settings) {
        (ListenerSettings::Agent(o), ListenerSettings::Agent(n)) => {
            agent_changes(o, n, &owner, out)
        }
        (ListenerSettings::Tcp(o), ListenerSettings::Tcp(n)) => {
            // The relay reads its settings when it is built.
            classify!(
                out,
                owner,
                "tcp.",
                o,
                n,
                TcpRelayConfig {
                    connect_timeout: AfterUpgrade,
                    idle_timeout: AfterUpgrade,
                    tcp_keepalive: AfterUpgrade,
                    buffer_size: AfterUpgrade,
                    proxy_protocol: AfterUpgrade,
                    source_limits: AfterUpgrade,
                    first_byte_timeout: AfterUpgrade,
                }
            );
        }
        (ListenerSettings::Udp(o), ListenerSettings::Udp(n)) => {
            classify!(
                out,
                owner,
                "udp.",
                o,
                n,
                UdpRelayConfig {
                    idle_timeout: AfterUpgrade,
                    max_datagram: AfterUpgrade,
                    max_flows: AfterUpgrade,
                    source_limits: AfterUpgrade,
                }
            );
        }
        #[cfg(feature = "enroll")]
        (ListenerSettings::Enroll(o), ListenerSettings::Enroll(n)) => {
            classify!(
                out,
                owner,
                "enroll.",
                o,
                n,
                EnrollConfig {
                    server_cert: AfterUpgrade,
                    backend_tls: AfterUpgrade,
                    backend_client_cert: AfterUpgrade,
                    request_timeout: AfterUpgrade,
                    connect_timeout: AfterUpgrade,
                    backend_timeout: AfterUpgrade,
                    max_reply: AfterUpgrade,
                    confirm_timeout: AfterUpgrade,
                    replay_ttl: AfterUpgrade,
                    reply_quiet: AfterUpgrade,
                    replay_capacity: AfterUpgrade,
                    max_connections: AfterUpgrade,
                    source_limits: AfterUpgrade,
                    proxy_protocol: AfterUpgrade,
                }
            );
        }
        // Another kind is another listener (`same_listener`): never compared.
        _ => {}
    }
}

fn agent_changes(
    o: &AgentSettings,
    n: &AgentSettings,
    owner: &Option<String>,
    out: &mut Vec<Change>,
) {
    classify!(
        out,
        owner,
        "",
        o,
        n,
        AgentSettings {
            relay: Nested,
            // The watch task and the rebalancing task start with the listener.
            keys: AfterUpgrade,
            rebalance: AfterUpgrade,
        }
    );
    let (o, n) = (&o.relay, &n.relay);
    // The relay reads its settings when it is built.
    classify!(
        out,
        owner,
        "relay.",
        o,
        n,
        AgentRelayConfig {
            first_frame_timeout: AfterUpgrade,
            max_payload: AfterUpgrade,
            connect_timeout: AfterUpgrade,
            idle_timeout: AfterUpgrade,
            read_chunk: AfterUpgrade,
            duplicate_policy: AfterUpgrade,
            tcp_keepalive: AfterUpgrade,
            failover: AfterUpgrade,
            resend_unacknowledged: AfterUpgrade,
            hold_timeout: AfterUpgrade,
            reply_timeout: AfterUpgrade,
            source_limits: AfterUpgrade,
            liveness_timeout: AfterUpgrade,
            manager_user_timeout: AfterUpgrade,
            overtake_time: AfterUpgrade,
            refused_backoff: AfterUpgrade,
            refused_backoff_max: AfterUpgrade,
            transparent: AfterUpgrade,
            proxy_protocol: AfterUpgrade,
        }
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::proxy::config::Rebalance;

    fn base() -> ProxyConfig {
        ProxyConfig::new(vec![ListenerConfig::agent(
            "agents",
            "127.0.0.1:1514".parse().unwrap(),
            &["127.0.0.1:2514".parse().unwrap()],
        )])
    }

    #[test]
    fn the_same_configuration_changes_nothing() {
        assert_eq!(diff(&base(), &base()), ReloadPlan::default());
    }

    #[test]
    fn backends_apply_in_place_and_relay_settings_after_an_upgrade() {
        let mut new = base();
        new.drain_timeout = Duration::from_secs(1);
        let l = &mut new.listeners[0];
        l.backends.push(crate::balance::BackendConfig::new(
            "127.0.0.1:3514".parse().unwrap(),
        ));
        let ListenerSettings::Agent(a) = &mut l.settings else {
            unreachable!()
        };
        a.relay.idle_timeout = None;
        a.rebalance = Some(Rebalance {
            every: Duration::from_secs(9),
            batch: 2,
        });
        let plan = diff(&base(), &new);
        let got: Vec<(&str, Applies)> = plan.changes.iter().map(|c| (c.field, c.applies)).collect();
        assert_eq!(
            got,
            [
                ("drain_timeout", Applies::InPlace),
                ("backends", Applies::InPlace),
                ("rebalance", Applies::AfterUpgrade),
                ("relay.idle_timeout", Applies::AfterUpgrade),
            ]
        );
        assert_eq!(plan.after_upgrade().count(), 2);
        assert!(plan.added.is_empty() && plan.removed.is_empty());
    }

    #[test]
    fn a_new_address_or_kind_replaces_the_listener() {
        let mut new = base();
        new.listeners[0].listen = "127.0.0.1:1515".parse().unwrap();
        new.listeners.push(ListenerConfig::new(
            "udp",
            "127.0.0.1:1514".parse().unwrap(),
            Vec::new(),
            ListenerSettings::Udp(UdpRelayConfig::default()),
        ));
        let plan = diff(&base(), &new);
        assert_eq!(plan.added, ["agents", "udp"]);
        assert_eq!(plan.removed, ["agents"]);
        assert!(plan.changes.is_empty());
    }
}
