//! The admin HTTP API: health for keepalived, Prometheus metrics, live sessions and backends.
//!
//! | endpoint | answer |
//! | --- | --- |
//! | `GET /live` | 200 `{"status":"live"}` whenever the process serves requests (liveness) |
//! | `GET /health` | 200 `{"status":"ok",...}` when every listener is bound and accepting and every agent-facing listener (agent, udp) has a backend it can use now; 503 with the reason otherwise |
//! | `GET /metrics` | Prometheus (OpenMetrics) text, read from the relays' atomics at scrape time |
//! | `GET /sessions?agent=ID&backend=ADDR` | JSON array of live agent sessions (filters optional) |
//! | `GET /backends` | JSON: per listener, every backend with its state and counters |
//! | `POST /reload`, `POST /upgrade` | raise SIGHUP or SIGUSR2 at the proxy (reload, binary upgrade) |
//!
//! With a token file, every request needs `Authorization: Bearer <token>` (compared in constant
//! time), or gets 401.

mod api;
pub mod client;
mod metrics;
pub(crate) mod process;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use zeroize::Zeroizing;

use wazuh_proxy_core::proxy::{ListenerHandle, ListenerKind, ProxyView};

use crate::config::Config;

/// Admin connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one admin connection (keep-alive included): scrapers simply reconnect.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Why the admin API could not start, or a token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The admin address could not be bound.
    #[error("admin API: cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The token file could not be read.
    #[error("admin token file {path}: {source}")]
    TokenRead {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The token file holds no usable token.
    #[error("admin token file {path}: {why}")]
    TokenInvalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the token itself).
        why: &'static str,
    },
}

/// Reads a bearer token: the file's content without surrounding whitespace. It must be
/// printable ASCII without spaces (it travels in an HTTP header).
///
/// # Errors
/// [`AdminError::TokenRead`] or [`AdminError::TokenInvalid`].
pub fn read_token(path: &Path) -> Result<Zeroizing<String>, AdminError> {
    let raw = Zeroizing::new(std::fs::read(path).map_err(|source| AdminError::TokenRead {
        path: path.to_owned(),
        source,
    })?);
    let token = raw.trim_ascii();
    let invalid = |why| AdminError::TokenInvalid {
        path: path.to_owned(),
        why,
    };
    if token.is_empty() {
        return Err(invalid("it is empty"));
    }
    if !token.iter().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "the token must be printable ASCII without spaces or line breaks",
        ));
    }
    // Checked above: ASCII, so the conversion cannot fail.
    let text = std::str::from_utf8(token).map_err(|_| invalid("not ASCII"))?;
    Ok(Zeroizing::new(text.to_owned()))
}

/// One listener as the admin API sees it.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) name: String,
    pub(crate) listen: SocketAddr,
    pub(crate) relay: ListenerHandle,
}

impl Target {
    pub(crate) fn kind(&self) -> ListenerKind {
        self.relay.kind()
    }

    /// Kinds that carry agents: keepalived must not give the VIP to a node that cannot reach a
    /// manager for them.
    pub(crate) fn is_agent_facing(&self) -> bool {
        self.kind().is_agent_facing()
    }

    pub(crate) fn kind_name(&self) -> &'static str {
        self.kind().name()
    }

    pub(crate) fn balancer(&self) -> Arc<wazuh_proxy_core::balance::Balancer> {
        self.relay.balancer()
    }

    /// Relay counters (`None` for the enrollment front, which has its own outcomes).
    pub(crate) fn stats(&self) -> Option<&wazuh_proxy_core::stats::RelayStats> {
        self.relay.stats()
    }
}

/// What every request handler reads.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) targets: arc_swap::ArcSwap<Vec<Target>>,
    /// The running proxy: operator actions, sessions, and whether it still accepts (a
    /// draining node is unhealthy).
    pub(crate) view: arc_swap::ArcSwap<ProxyView>,
}

impl Shared {
    pub(crate) fn draining(&self) -> bool {
        self.view.load().draining()
    }
}

struct State {
    shared: Arc<Shared>,
    token: Option<Zeroizing<String>>,
    registry: Registry,
}

/// The running admin API.
#[derive(Debug)]
pub struct AdminServer {
    addr: SocketAddr,
    stop: CancellationToken,
    tasks: TaskTracker,
    shared: Arc<Shared>,
}

fn targets_of(proxy: &ProxyView) -> Vec<Target> {
    proxy
        .listeners()
        .iter()
        .map(|l| Target {
            name: l.name.clone(),
            listen: l.listen,
            relay: l.handle.clone(),
        })
        .collect()
}

impl AdminServer {
    /// Starts the admin API of `proxy` as `config.admin` says; `None` when it is disabled.
    ///
    /// # Errors
    /// When the token file is unusable or the address cannot be bound.
    pub(crate) async fn start(
        config: &Config,
        proxy: &ProxyView,
    ) -> Result<Option<AdminServer>, AdminError> {
        let Some(addr) = config.admin.listen else {
            tracing::info!("admin API disabled");
            return Ok(None);
        };
        let token = config
            .admin
            .token_file
            .as_deref()
            .map(read_token)
            .transpose()?;
        if token.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(address = %addr,
                "admin API on a non-loopback address without admin_token_file: anyone who reaches it sees every session");
        }
        let shared = Arc::new(Shared {
            targets: arc_swap::ArcSwap::from_pointee(targets_of(proxy)),
            view: arc_swap::ArcSwap::from_pointee(proxy.clone()),
        });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(metrics::RelayCollector::new(shared.clone())));
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        let addr = listener.local_addr().unwrap_or(addr);
        let state = Arc::new(State {
            shared,
            token,
            registry,
        });
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tracing::info!(address = %addr, token = state.token.is_some(), "admin API listening");
        let shared = state.shared.clone();
        tasks.spawn(accept_loop(listener, state, stop.clone(), tasks.clone()));
        Ok(Some(AdminServer {
            addr,
            stop,
            tasks,
            shared,
        }))
    }

    /// Shows the listeners of `proxy` after a reload (or after it accepts again).
    pub(crate) fn refresh(&self, proxy: &ProxyView) {
        self.shared.targets.store(Arc::new(targets_of(proxy)));
        self.shared.view.store(Arc::new(proxy.clone()));
    }

    /// The bound address.
    #[allow(dead_code)]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and closes open admin connections.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "admin API: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (state, stop) = (state.clone(), stop.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_LIFETIME, conn) => {}
            }
        });
    }
}

type Body = Full<Bytes>;

fn respond(state: &State, req: &Request<Incoming>) -> Response<Body> {
    if let Some(token) = &state.token {
        if !authorized(req.headers(), token.as_bytes()) {
            let mut r = json(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({"error": "missing or wrong bearer token"}),
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    let shared = &state.shared;
    if req.method() == Method::POST {
        if let Some(answer) = signal_self(req.uri().path()) {
            return answer;
        }
        return match api::act(shared, req.uri().path(), req.uri().query()) {
            Ok(body) => json(StatusCode::OK, &body),
            Err((status, e)) => json(status, &serde_json::json!({"error": e})),
        };
    }
    if req.method() != Method::GET {
        let mut r = json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "only GET and POST are served"}),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
        return r;
    }
    match req.uri().path() {
        // Liveness: the process answers; nothing about listeners or backends (that is
        // `/health`), so an orchestrator does not restart a proxy whose managers are down.
        "/live" => json(StatusCode::OK, &serde_json::json!({"status": "live"})),
        "/health" => {
            let (healthy, body) = api::health(shared);
            let status = if healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(status, &body)
        }
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
                Ok(()) => response(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text.into(),
                ),
                Err(_) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": "metrics could not be encoded"}),
                ),
            }
        }
        "/sessions" => match api::SessionFilter::from_query(req.uri().query()) {
            Ok(filter) => json(StatusCode::OK, &api::sessions(shared, &filter)),
            Err(e) => json(StatusCode::BAD_REQUEST, &serde_json::json!({"error": e})),
        },
        "/backends" => json(StatusCode::OK, &api::backends(shared)),
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({
                "error": "no such endpoint",
                "endpoints": ["/live", "/health", "/metrics", "/sessions", "/backends", "POST /rebalance", "POST /drain?backend=ADDR", "POST /undrain?backend=ADDR", "POST /reload", "POST /upgrade"],
            }),
        ),
    }
}

/// `POST /reload` and `POST /upgrade`: the same as SIGHUP and SIGUSR2, raised at this process
/// so that both paths run the one signal loop (and no caller needs the right to signal it).
fn signal_self(path: &str) -> Option<Response<Body>> {
    use nix::sys::signal::{kill, Signal};
    let (sig, what) = match path {
        "/reload" => (Signal::SIGHUP, "reload"),
        "/upgrade" => (Signal::SIGUSR2, "upgrade"),
        _ => return None,
    };
    Some(match kill(nix::unistd::Pid::this(), sig) {
        Ok(()) => json(
            StatusCode::OK,
            &serde_json::json!({"requested": what, "pid": std::process::id(), "see": "the proxy's log for the outcome"}),
        ),
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({"error": format!("cannot signal this process: {e}")}),
        ),
    })
}

/// Whether the request carries `Authorization: Bearer <token>`, compared in constant time.
fn authorized(headers: &hyper::HeaderMap, token: &[u8]) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some(given) = value
        .get(..7)
        .filter(|p| p.eq_ignore_ascii_case(b"bearer "))
        .and_then(|_| value.get(7..))
    else {
        return false;
    };
    given.trim_ascii().ct_eq(token).into()
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut text = serde_json::to_vec_pretty(body).unwrap_or_default();
    text.push(b'\n');
    response(status, "application/json", text.into())
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked() {
        let mut h = hyper::HeaderMap::new();
        assert!(!authorized(&h, b"s3cret"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret"),
        );
        assert!(authorized(&h, b"s3cret"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer s3cret"),
        );
        assert!(authorized(&h, b"s3cret"));
        for wrong in [
            "Bearer s3cre",
            "Bearer s3cretx",
            "Basic s3cret",
            "Bearer",
            "s3cret",
        ] {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(wrong));
            assert!(!authorized(&h, b"s3cret"), "{wrong}");
        }
    }

    #[test]
    fn token_files_are_trimmed_and_checked() {
        let dir = std::env::temp_dir().join(format!("wazuh-proxy-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t");
        std::fs::write(&f, "  abc123\n").unwrap();
        assert_eq!(read_token(&f).unwrap().as_str(), "abc123");
        std::fs::write(&f, "\n").unwrap();
        assert!(read_token(&f).unwrap_err().to_string().contains("empty"));
        std::fs::write(&f, "two words").unwrap();
        let e = read_token(&f).unwrap_err().to_string();
        assert!(e.contains("printable") && !e.contains("two words"), "{e}");
        assert!(read_token(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
