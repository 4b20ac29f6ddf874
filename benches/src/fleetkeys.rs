//! The `client.keys` shared by a simulated fleet and its stand-in managers.
//!
//! Generated files hold IDs `001`, `002`, ... (at least three digits, as the manager writes
//! them), names `fleet-001`..., IP `any` (so agents send the `!ID!` prefix the proxy routes on)
//! and 64 random lowercase hex characters per key, like authd's.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use wazuh_proxy_core::keys::{AgentKey, KeySet};

use crate::FleetError;

/// The text of a `client.keys` with `agents` fresh entries.
///
/// # Errors
/// [`FleetError::Keys`] when the system's random source fails.
pub fn generate(agents: usize) -> Result<String, FleetError> {
    let mut out = String::with_capacity(agents * 90);
    let mut raw = vec![0u8; 32 * agents];
    getrandom::getrandom(&mut raw)
        .map_err(|e| FleetError::Keys(format!("random source failed: {e}")))?;
    for (i, key) in raw.chunks_exact(32).enumerate() {
        let id = i + 1;
        out.push_str(&format!("{id:03} fleet-{id:03} any "));
        for b in key {
            out.push_str(&format!("{b:02x}"));
        }
        out.push('\n');
    }
    Ok(out)
}

/// Writes a fresh keys file for `agents` agents at `path`.
///
/// # Errors
/// [`FleetError::Io`] when the file cannot be written.
pub fn write(path: &Path, agents: usize) -> Result<(), FleetError> {
    let text = generate(agents)?;
    let mut f = std::fs::File::create(path)
        .map_err(|e| FleetError::io(format!("creating {}", path.display()), e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| FleetError::io(format!("writing {}", path.display()), e))
}

/// Reads a keys file (a malformed line is an error here: the file is generated).
///
/// # Errors
/// [`FleetError::Io`] or [`FleetError::Keys`].
pub fn read(path: &Path) -> Result<KeySet, FleetError> {
    let (set, problems) = KeySet::read(path).map_err(|e| FleetError::Keys(e.to_string()))?;
    if let Some(p) = problems.first() {
        return Err(FleetError::Keys(format!(
            "{}: line {}: {}",
            path.display(),
            p.line,
            p.problem
        )));
    }
    Ok(set)
}

/// The keys of the first `agents` agents in ID order, writing the file first if it is absent.
///
/// # Errors
/// [`FleetError::Keys`] when the file has fewer than `agents` entries.
pub fn load_or_create(path: &Path, agents: usize) -> Result<Vec<Arc<AgentKey>>, FleetError> {
    if !path.exists() {
        write(path, agents)?;
        eprintln!("wazuh-fleet: wrote {} keys to {}", agents, path.display());
    }
    let set = read(path)?;
    let mut keys: Vec<Arc<AgentKey>> = set.iter().cloned().collect();
    keys.sort_by_key(|k| k.id().as_str().parse::<u64>().unwrap_or(u64::MAX));
    if keys.len() < agents {
        return Err(FleetError::Keys(format!(
            "{} has {} entries, {} agents asked for (remove it to regenerate)",
            path.display(),
            keys.len(),
            agents
        )));
    }
    keys.truncate(agents);
    Ok(keys)
}
