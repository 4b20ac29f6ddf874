//! Address resolution of the values written in the file (`host:port`).

use std::net::{SocketAddr, ToSocketAddrs};

pub(super) fn resolve_all(text: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    let mut addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {text:?} (expected host:port): {e}"))?
        .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!("{text:?} resolves to no address"));
    }
    Ok(addrs)
}

pub(super) fn resolve_one(text: &str) -> Result<SocketAddr, String> {
    let all = resolve_all(text)?;
    match all.as_slice() {
        [one] => Ok(*one),
        _ => Err(format!(
            "{text:?} resolves to {} addresses; give one",
            all.len()
        )),
    }
}
