//! Requests to the admin API over plain HTTP/1.1, blocking or from a runtime.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

/// A plain HTTP/1.0 GET (or POST) to the admin API: (status, body).
pub fn http(method: &str, addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(method, addr, path).unwrap()
}

/// A plain HTTP/1.1 GET (the admin API); the status code and the body, or the error.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    http_request("GET", addr, path)
}

/// One HTTP/1.1 request with an empty body to the admin API: the status code and the body.
pub fn http_request(method: &str, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    http_request_as(method, addr, path, None)
}

/// [`http_request`] with `Authorization: Bearer TOKEN` when a token is given.
pub fn http_request_as(
    method: &str,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// A GET from inside a runtime (the request runs on a blocking thread), with a bearer token
/// when given: the status and the body.
pub async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let (path, token) = (path.to_owned(), token.map(str::to_owned));
    tokio::task::spawn_blocking(move || http_request_as("GET", addr, &path, token.as_deref()))
        .await
        .unwrap()
        .unwrap()
}

/// [`get`] without a token, the body parsed as JSON (`null` when it is not JSON).
pub async fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = get(addr, path, None).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// The value of the first `/metrics` sample line starting with `line_start` (the metric name
/// and its labels, in the order the proxy writes them); panics when there is none.
pub async fn metric(admin: SocketAddr, line_start: &str) -> f64 {
    let (_, text) = get(admin, "/metrics", None).await;
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in /metrics"))
}
