//! The flat `[[listener]]` table as written, once its keys are known to apply to its kind,
//! projected onto that kind's settings ([`ListenerSpec`]): each key read into the one place
//! it has, every error with the key's file:line.

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use wazuh_proxy_core::limits::SourceLimits;
use wazuh_proxy_core::session::DuplicatePolicy;

use super::file::FileListener;
use super::spec::{
    AgentSpec, BackendTlsSpec, ClientCertSpec, EnrollSpec, KeysSpec, ListenerSpec,
    ProxyProtocolKeys, RebalanceKeys, ServerCertSpec, SourceAddress, TcpSpec, UdpSpec,
};
use super::{ConfigError, Dur, ListenerKind, Source, DEFAULT_TLS_DIR};

/// `0s` turns an optional timeout off.
fn off(d: Dur) -> Option<Duration> {
    (!d.0.is_zero()).then_some(d.0)
}

/// A key set in the file replaces the kind's default.
fn set<T>(slot: &mut T, from_file: Option<T>) {
    if let Some(v) = from_file {
        *slot = v;
    }
}

/// The per-source limits every kind has.
pub(super) fn source_limits_of(l: &FileListener) -> SourceLimits {
    let mut limits = SourceLimits::default();
    set(&mut limits.max_open, l.max_connections_per_source);
    if let Some(r) = l.connection_rate_per_source {
        limits.rate = r.max(0.0);
    }
    if let Some(b) = l.connection_burst_per_source {
        limits.burst = b.max(1.0);
    }
    limits
}

/// The settings of `kind` from `l`, whose keys all apply to `kind` (checked before).
pub(super) fn spec_of(
    l: &FileListener,
    kind: ListenerKind,
    span: Range<usize>,
    src: &Source<'_>,
) -> Result<ListenerSpec, ConfigError> {
    let max_payload = match &l.max_payload {
        Some(m) => {
            let min = wazuh_proxy_core::relay::MIN_MAX_PAYLOAD;
            let max = wazuh_proxy_core::frame::MAX_PAYLOAD;
            if !(min..=max).contains(m.get_ref()) {
                return Err(src.error(
                    Some(m.span()),
                    format!("max_payload must be {min}..={max} (agents' startup and keepalive messages must fit)"),
                ));
            }
            Some(*m.get_ref())
        }
        None => None,
    };
    Ok(match kind {
        ListenerKind::Agent => ListenerSpec::Agent(agent_of(l, max_payload, src)?),
        ListenerKind::Udp => {
            let mut u = UdpSpec::default();
            set(&mut u.max_payload, max_payload);
            set(&mut u.idle_timeout, l.idle_timeout.map(off));
            ListenerSpec::Udp(u)
        }
        ListenerKind::Tcp => {
            let mut t = TcpSpec::default();
            // Only when asked for: a relayed service may be one where the server speaks first.
            if let Some(Dur(d)) = l.first_frame_timeout {
                t.first_frame_timeout = Some(d);
            }
            set(&mut t.connect_timeout, l.connect_timeout.map(|d| d.0));
            set(&mut t.idle_timeout, l.idle_timeout.map(off));
            set(&mut t.tcp_keepalive, l.tcp_keepalive.map(off));
            t.proxy_protocol = proxy_protocol_of(l, kind, src)?;
            ListenerSpec::Tcp(t)
        }
        ListenerKind::Enroll => ListenerSpec::Enroll(enroll_of(l, span, src)?),
    })
}

fn agent_of(
    l: &FileListener,
    max_payload: Option<u32>,
    src: &Source<'_>,
) -> Result<AgentSpec, ConfigError> {
    let mut a = AgentSpec::default();
    if let Some(d) = &l.duplicate {
        a.duplicate = d
            .get_ref()
            .parse::<DuplicatePolicy>()
            .map_err(|e| src.error(Some(d.span()), e))?;
    }
    set(
        &mut a.first_frame_timeout,
        l.first_frame_timeout.map(|d| d.0),
    );
    set(&mut a.connect_timeout, l.connect_timeout.map(|d| d.0));
    set(&mut a.idle_timeout, l.idle_timeout.map(off));
    set(&mut a.tcp_keepalive, l.tcp_keepalive.map(off));
    set(&mut a.max_payload, max_payload);
    set(&mut a.failover, l.failover);
    set(&mut a.resend_unacknowledged, l.resend_unacknowledged);
    set(&mut a.hold_timeout, l.hold_timeout.map(|d| d.0));
    set(&mut a.reply_timeout, l.reply_timeout.map(off));
    set(&mut a.manager_user_timeout, l.manager_user_timeout.map(off));
    set(&mut a.liveness_timeout, l.liveness_timeout.map(off));
    set(&mut a.overtake_time, l.overtake_time.map(|d| d.0));
    set(&mut a.refused_backoff, l.refused_backoff.map(|d| d.0));
    set(
        &mut a.refused_backoff_max,
        l.refused_backoff_max.map(|d| d.0),
    );
    if let Some(s) = &l.source {
        a.source = match s.get_ref().as_str() {
            "proxy" => SourceAddress::Proxy,
            "transparent" => SourceAddress::Transparent,
            other => {
                return Err(src.error(
                    Some(s.span()),
                    format!("unknown source {other:?} (expected proxy or transparent)"),
                ))
            }
        };
    }
    a.keys = l.keys.as_ref().map(|path| KeysSpec {
        keys: path.get_ref().clone(),
        keys_reload: l
            .keys_reload
            .map_or(wazuh_proxy_core::keys::DEFAULT_RELOAD_INTERVAL, |d| d.0),
    });
    a.rebalance = match (l.rebalance_interval, l.rebalance_batch) {
        (Some(Dur(d)), _) if d.is_zero() => RebalanceKeys(None),
        (_, Some(0)) => RebalanceKeys(None),
        (every, batch) => RebalanceKeys(
            ListenerKind::Agent
                .default_rebalance()
                .map(|(d, n)| (every.map_or(d, |e| e.0), batch.unwrap_or(n))),
        ),
    };
    a.proxy_protocol = proxy_protocol_of(l, ListenerKind::Agent, src)?;
    Ok(a)
}

fn enroll_of(
    l: &FileListener,
    span: Range<usize>,
    src: &Source<'_>,
) -> Result<EnrollSpec, ConfigError> {
    let server_cert = match (&l.tls_cert, &l.tls_key) {
        (Some(c), Some(k)) => ServerCertSpec::Files {
            tls_cert: c.get_ref().clone(),
            tls_key: k.get_ref().clone(),
        },
        (None, None) => ServerCertSpec::SelfSigned {
            tls_dir: l
                .tls_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_TLS_DIR)),
        },
        (Some(s), None) | (None, Some(s)) => {
            return Err(src.error(Some(s.span()), "tls_cert and tls_key go together"));
        }
    };
    let verify = l.backend_verify.as_ref().map(|v| (*v.get_ref(), v.span()));
    let backend_tls = match (&l.backend_ca, verify) {
        (Some(ca), None | Some((true, _))) => BackendTlsSpec::VerifyCa {
            backend_ca: ca.get_ref().clone(),
            backend_server_name: l.backend_server_name.clone(),
        },
        (None, Some((false, _))) => BackendTlsSpec::NoVerify {
            backend_verify: false,
        },
        (Some(_), Some((false, span))) | (None, Some((true, span))) => {
            return Err(src.error(Some(span), "backend_verify = false cannot go with backend_ca; backend_verify = true needs backend_ca"));
        }
        (None, None) => {
            return Err(src.error(
                Some(span),
                "an enroll listener needs backend_ca (the managers' certificate or CA) or an explicit backend_verify = false",
            ));
        }
    };
    let backend_client_cert = match (&l.backend_cert, &l.backend_key) {
        (Some(c), Some(k)) => {
            let cert = wazuh_proxy_core::enroll::ClientCert {
                cert: c.get_ref().clone(),
                key: k.get_ref().clone(),
            };
            // Checked here so that check-config points at the setting.
            if let Err(e) = cert.check() {
                let at = match &e {
                    wazuh_proxy_core::enroll::TlsError::Io { path, .. }
                    | wazuh_proxy_core::enroll::TlsError::Pem { path, .. }
                        if path == k.get_ref() && path != c.get_ref() =>
                    {
                        k.span()
                    }
                    _ => c.span(),
                };
                return Err(src.error(Some(at), format!("backend_cert/backend_key: {e}")));
            }
            Some(ClientCertSpec {
                backend_cert: cert.cert,
                backend_key: cert.key,
            })
        }
        (None, None) => None,
        (Some(s), None) | (None, Some(s)) => {
            return Err(src.error(Some(s.span()), "backend_cert and backend_key go together"));
        }
    };
    let mut e = EnrollSpec::new(backend_tls);
    e.server_cert = server_cert;
    e.backend_client_cert = backend_client_cert;
    set(
        &mut e.first_frame_timeout,
        l.first_frame_timeout.map(|d| d.0),
    );
    set(&mut e.connect_timeout, l.connect_timeout.map(|d| d.0));
    set(&mut e.replay_ttl, l.replay_ttl.map(|d| d.0));
    e.proxy_protocol = proxy_protocol_of(l, ListenerKind::Enroll, src)?;
    Ok(e)
}

/// `proxy_protocol` and `proxy_protocol_trusted`: both or neither; agent, tcp and enroll kinds.
pub(super) fn proxy_protocol_of(
    l: &FileListener,
    kind: ListenerKind,
    src: &Source<'_>,
) -> Result<ProxyProtocolKeys, ConfigError> {
    let on = l.proxy_protocol.as_ref().map(|p| (*p.get_ref(), p.span()));
    match (on, &l.proxy_protocol_trusted) {
        (None | Some((false, _)), None) => Ok(ProxyProtocolKeys(None)),
        (None | Some((false, _)), Some(t)) => Err(src.error(
            Some(t.span()),
            "proxy_protocol_trusted is only used with proxy_protocol = true",
        )),
        (Some((true, span)), None) => Err(src.error(
            Some(span),
            "proxy_protocol = true needs proxy_protocol_trusted = [\"CIDR\", ...]: the load balancers allowed to send the header",
        )),
        (Some((true, span)), Some(t)) => {
            if kind == ListenerKind::Udp {
                // Load balancers in front of Wazuh (nginx stream, HAProxy, cloud NLBs) send
                // PROXY headers on TCP only; over UDP nothing would send the per-datagram v2
                // header this would have to expect.
                return Err(src.error(
                    Some(span),
                    "proxy_protocol is not supported on kind = \"udp\" listeners: load balancers in front of Wazuh send the PROXY header on TCP only (PROXY v2 over UDP, one header per datagram, is not what nginx, HAProxy or cloud load balancers forward to 1514/udp); use it on agent, tcp and enroll listeners",
                ));
            }
            if t.get_ref().is_empty() {
                return Err(src.error(Some(t.span()), "proxy_protocol_trusted is empty"));
            }
            let mut trusted = Vec::new();
            for c in t.get_ref() {
                trusted.push(c.get_ref().parse().map_err(|e| src.error(Some(c.span()), e))?);
            }
            Ok(ProxyProtocolKeys(Some(
                wazuh_proxy_core::proxy_protocol::ProxyProtocol { trusted },
            )))
        }
    }
}
