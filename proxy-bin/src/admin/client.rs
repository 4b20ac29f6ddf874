//! The CLI over the admin API: `wazuh-proxy health | sessions | backends`.
//!
//! A plain HTTP/1.1 GET over loopback, so a keepalived `vrrp_script` needs nothing but the
//! binary. `health` exits 0 when the node is healthy and 1 otherwise (unhealthy, unreachable,
//! refused), printing the reason on one line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::{read_token, AdminError};

/// Where the admin API is and how to talk to it.
#[derive(Debug, clap::Args)]
pub struct Connection {
    /// Admin API address (host:port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9514")]
    admin: String,
    /// File holding the bearer token, when the proxy requires one.
    #[arg(long, value_name = "PATH")]
    admin_token_file: Option<PathBuf>,
    /// Give up after this long (connect and answer together).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// `wazuh-proxy health`.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    #[command(flatten)]
    conn: Connection,
}

/// `wazuh-proxy sessions`.
#[derive(Debug, clap::Args)]
pub struct SessionsArgs {
    #[command(flatten)]
    conn: Connection,
    /// Only this agent (its ID, or `ip:ADDR` for ID-less agents).
    #[arg(long, value_name = "ID")]
    agent: Option<String>,
    /// Only sessions carried by this backend (host:port as configured).
    #[arg(long, value_name = "ADDR")]
    backend: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `wazuh-proxy backends`.
#[derive(Debug, clap::Args)]
pub struct BackendsArgs {
    #[command(flatten)]
    conn: Connection,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `wazuh-proxy rebalance`.
#[derive(Debug, clap::Args)]
pub struct RebalanceArgs {
    #[command(flatten)]
    conn: Connection,
    /// Move at most this many agents (default: every agent not on its preferred manager).
    #[arg(long)]
    limit: Option<usize>,
}

/// `wazuh-proxy drain`.
#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    #[command(flatten)]
    conn: Connection,
    /// The manager to empty (host:port as configured).
    backend: String,
    /// Put the manager back into rotation instead (its agents return with `rebalance`).
    #[arg(long)]
    undo: bool,
}

/// Why a request to the admin API did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The token file is unusable.
    #[error(transparent)]
    Token(#[from] AdminError),
    /// No connection.
    #[error("cannot connect to the admin API at {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("admin API at {addr}: {source}")]
    Http {
        /// The address.
        addr: String,
        /// The cause.
        source: hyper::Error,
    },
    /// The request could not be built (a bad address or token).
    #[error("admin API at {addr}: {why}")]
    Request {
        /// The address.
        addr: String,
        /// What was wrong.
        why: String,
    },
    /// No answer in time.
    #[error("admin API at {addr}: no answer within {timeout:?}")]
    Timeout {
        /// The address.
        addr: String,
        /// The limit.
        timeout: Duration,
    },
    /// The local runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

/// Sends `GET path` and returns the status and body.
///
/// # Errors
/// [`ClientError`] when no HTTP answer arrived.
pub fn get(conn: &Connection, path: &str) -> Result<(StatusCode, String), ClientError> {
    request(conn, hyper::Method::GET, path)
}

/// Sends `method path` and returns the status and body.
///
/// # Errors
/// [`ClientError`] when no HTTP answer arrived.
pub fn request(
    conn: &Connection,
    method: hyper::Method,
    path: &str,
) -> Result<(StatusCode, String), ClientError> {
    let token = conn
        .admin_token_file
        .as_deref()
        .map(read_token)
        .transpose()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?;
    let addr = conn.admin.clone();
    rt.block_on(async {
        match tokio::time::timeout(
            conn.timeout,
            exchange(&addr, method, path, token.as_ref().map(|t| t.as_str())),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                addr,
                timeout: conn.timeout,
            }),
        }
    })
}

async fn exchange(
    addr: &str,
    method: hyper::Method,
    path: &str,
    token: Option<&str>,
) -> Result<(StatusCode, String), ClientError> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    let http = |source| ClientError::Http {
        addr: addr.to_owned(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    let driver = tokio::spawn(connection);
    let bad = |why: String| ClientError::Request {
        addr: addr.to_owned(),
        why,
    };
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr)
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| bad(e.to_string()))?;
    if let Some(t) = token {
        let mut value = HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|_| bad("the token is not a valid header value".into()))?;
        value.set_sensitive(true);
        req.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
    driver.abort();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `wazuh-proxy health`: exit 0 when healthy, 1 otherwise; one line either way.
pub fn health(args: &HealthArgs) -> ExitCode {
    match get(&args.conn, "/health") {
        Ok((StatusCode::OK, body)) => {
            println!("healthy: {}", health_summary(&body));
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            let reason = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| {
                    v.get("reason")
                        .or_else(|| v.get("error"))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| format!("HTTP {status}"));
            println!("unhealthy: {}", one_line(&reason));
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("unhealthy: {}", one_line(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn health_summary(body: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return "ok".into();
    };
    let parts: Vec<String> = v["listeners"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .map(|l| {
                    format!(
                        "{} ({}) {}/{} backends available",
                        l["name"].as_str().unwrap_or("?"),
                        l["kind"].as_str().unwrap_or("?"),
                        l["backends_available"],
                        l["backends_total"]
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if parts.is_empty() {
        "ok".into()
    } else {
        parts.join(", ")
    }
}

/// Percent-encodes a query value.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Fetches `path` and prints it (JSON or a table); exit 1 on any error.
fn list(
    conn: &Connection,
    path: &str,
    raw: bool,
    table: impl Fn(&Value) -> Vec<Vec<String>>,
) -> ExitCode {
    match get(conn, path) {
        Ok((StatusCode::OK, body)) if raw => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((StatusCode::OK, body)) => match serde_json::from_str::<Value>(&body) {
            Ok(v) => {
                print!("{}", render(&table(&v)));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("wazuh-proxy: the admin API answered something that is not JSON: {e}");
                ExitCode::FAILURE
            }
        },
        Ok((status, body)) => {
            let why = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_default();
            eprintln!("wazuh-proxy: admin API answered {status}: {why}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("wazuh-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `wazuh-proxy sessions`.
pub fn sessions(args: &SessionsArgs) -> ExitCode {
    let mut query = Vec::new();
    if let Some(a) = &args.agent {
        query.push(format!("agent={}", encode(a)));
    }
    if let Some(b) = &args.backend {
        query.push(format!("backend={}", encode(b)));
    }
    let path = if query.is_empty() {
        "/sessions".to_owned()
    } else {
        format!("/sessions?{}", query.join("&"))
    };
    list(&args.conn, &path, args.json, sessions_table)
}

/// `wazuh-proxy backends`.
pub fn backends(args: &BackendsArgs) -> ExitCode {
    list(&args.conn, "/backends", args.json, backends_table)
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn age(v: &Value) -> String {
    let Some(s) = v.as_f64() else {
        return "-".into();
    };
    humantime::format_duration(Duration::from_secs(s.max(0.0) as u64)).to_string()
}

fn sessions_table(v: &Value) -> Vec<Vec<String>> {
    let mut rows = vec![[
        "LISTENER",
        "AGENT",
        "NAME",
        "CLIENT",
        "BACKEND",
        "AGE",
        "IDLE",
        "FRAMES_UP",
        "FRAMES_DOWN",
        "BYTES_UP",
        "BYTES_DOWN",
        "VERSION",
    ]
    .map(str::to_owned)
    .to_vec()];
    for s in v.as_array().into_iter().flatten() {
        rows.push(vec![
            text(&s["listener"]),
            text(&s["agent"]),
            text(&s["name"]),
            text(&s["client"]),
            text(&s["backend"]),
            age(&s["age_s"]),
            age(&s["idle_s"]),
            text(&s["frames_up"]),
            text(&s["frames_down"]),
            text(&s["bytes_up"]),
            text(&s["bytes_down"]),
            text(&s["version"]),
        ]);
    }
    rows
}

fn backends_table(v: &Value) -> Vec<Vec<String>> {
    let mut rows = vec![[
        "LISTENER",
        "BACKEND",
        "STATE",
        "WEIGHT",
        "BACKUP",
        "ACTIVE",
        "FAILS",
        "OPENED",
        "SUCCESSES",
        "FAILURES",
    ]
    .map(str::to_owned)
    .to_vec()];
    for l in v.as_array().into_iter().flatten() {
        for b in l["backends"].as_array().into_iter().flatten() {
            let mut state = text(&b["state"]);
            if let Some(s) = b["failed_for_s"].as_f64() {
                state = format!("{state} ({s:.0}s)");
            }
            rows.push(vec![
                text(&l["listener"]),
                text(&b["address"]),
                state,
                text(&b["weight"]),
                if b["backup"].as_bool() == Some(true) {
                    "yes".into()
                } else {
                    "no".into()
                },
                text(&b["active"]),
                text(&b["fails"]),
                text(&b["opened_total"]),
                text(&b["successes_total"]),
                text(&b["failures_total"]),
            ]);
        }
    }
    rows
}

/// Left-aligned columns separated by two spaces.
fn render(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn act(conn: &Connection, path: &str) -> ExitCode {
    match request(conn, hyper::Method::POST, path) {
        Ok((StatusCode::OK, body)) => {
            println!("{body}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!("wazuh-proxy: {status}: {body}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("wazuh-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `wazuh-proxy rebalance`: moves agents back to their preferred managers, without
/// disconnecting them.
pub fn rebalance(args: &RebalanceArgs) -> ExitCode {
    match args.limit {
        Some(n) => act(&args.conn, &format!("/rebalance?limit={n}")),
        None => act(&args.conn, "/rebalance"),
    }
}

/// `wazuh-proxy drain BACKEND [--undo]`: moves every agent off a manager (or puts it back).
pub fn drain(args: &DrainArgs) -> ExitCode {
    let verb = if args.undo { "undrain" } else { "drain" };
    act(
        &args.conn,
        &format!("/{verb}?backend={}", args.backend.replace(':', "%3A")),
    )
}

/// `wazuh-proxy reload|upgrade --admin ADDR`: asks the proxy behind the admin API to re-read
/// its configuration (`/reload`) or to upgrade to the installed binary (`/upgrade`).
pub fn control(
    admin: &str,
    token_file: Option<PathBuf>,
    timeout: Duration,
    path: &str,
) -> ExitCode {
    let conn = Connection {
        admin: admin.to_owned(),
        admin_token_file: token_file,
        timeout,
    };
    act(&conn, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("001"), "001");
        assert_eq!(encode("ip:10.0.0.1"), "ip%3A10.0.0.1");
        assert_eq!(encode("[::1]:1514"), "%5B%3A%3A1%5D%3A1514");
    }

    #[test]
    fn tables_align() {
        let rows = vec![
            vec!["A".into(), "BB".into()],
            vec!["long".into(), "x".into()],
        ];
        assert_eq!(render(&rows), "A     BB\nlong  x\n");
    }
}
