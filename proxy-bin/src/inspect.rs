//! `wazuh-proxy inspect`: decrypt captured 1514 traffic with a `client.keys` file and print one
//! JSON object per message. The decoding itself is `wazuh_proxy_core::inspect`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value};
use wazuh_proxy_core::inspect::{CaptureError, CaptureReader, Direction, Inspected, Inspector};
use wazuh_proxy_core::keys::{KeySet, KeysError};

/// Which way unframed input (base64 lines, raw frames) travelled; pcap input knows by port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DirectionArg {
    /// Agent to manager.
    Agent,
    /// Manager to agent.
    Manager,
}

/// Arguments of `wazuh-proxy inspect`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// The manager's client.keys.
    #[arg(long)]
    pub keys: PathBuf,
    /// Direction of base64 or raw input: messages from the agent or from the manager.
    #[arg(long, value_enum, default_value_t = DirectionArg::Agent)]
    pub direction: DirectionArg,
    /// The manager's TCP port in pcap/pcapng input.
    #[arg(long, default_value_t = 1514)]
    pub port: u16,
    /// Capture to read: base64 lines, raw length-prefixed frames, pcap or pcapng; `-` or
    /// nothing for standard input.
    pub input: Option<PathBuf>,
}

/// Why `inspect` stopped.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The keys file could not be read.
    #[error(transparent)]
    Keys(#[from] KeysError),
    /// The capture could not be read.
    #[error("cannot read {path}: {source}")]
    Input {
        /// The input (`-` for standard input).
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    /// The capture itself is cut short, malformed or unreadable; the messages before the
    /// problem were printed.
    #[error("{path}: {error}")]
    Capture {
        /// The input (`-` for standard input).
        path: String,
        /// What is wrong with it.
        error: CaptureError,
    },
}

/// Runs the subcommand: prints one JSON object per message on standard output, and problems
/// with the keys file on standard error.
///
/// # Errors
/// When the keys file or the input cannot be opened, output fails, or the capture is cut
/// short, malformed or unreadable (after printing every message before the problem).
/// Undecodable messages, holes and unfinished frames are reported in the output, not as
/// errors.
pub fn run(args: &InspectArgs) -> Result<(), InspectError> {
    let (keys, problems) = KeySet::read(&args.keys)?;
    for problem in &problems {
        eprintln!("{}: {problem}", args.keys.display());
    }
    let (name, input) = open_input(args.input.as_ref())?;
    let direction = match args.direction {
        DirectionArg::Agent => Direction::AgentToManager,
        DirectionArg::Manager => Direction::ManagerToAgent,
    };
    let mut inspector = Inspector::new(Arc::new(keys));
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut fatal = None;
    // Read as a stream: a capture still being written (`tcpdump -w - | ...`) prints each
    // message as it completes, in memory bounded whatever the capture's size.
    for captured in CaptureReader::new(input, direction, args.port) {
        let value = match captured {
            Ok(c) => to_json(&inspector.inspect(&c)),
            Err(e) => {
                let line = json!({ "input": name, "error": e.to_string() });
                if is_fatal(&e) {
                    fatal = Some(e);
                }
                line
            }
        };
        writeln!(out, "{value}")?;
        if name == "-" {
            // A live pipe: each line as soon as its message is decoded.
            out.flush()?;
        }
    }
    out.flush()?;
    match fatal {
        Some(error) => Err(InspectError::Capture { path: name, error }),
        None => Ok(()),
    }
}

/// Errors of the capture as a whole (as opposed to one message or one flow).
fn is_fatal(e: &CaptureError) -> bool {
    matches!(
        e,
        CaptureError::Pcap(_) | CaptureError::Truncated { .. } | CaptureError::Read { .. }
    )
}

fn open_input(input: Option<&PathBuf>) -> Result<(String, Box<dyn Read>), InspectError> {
    match input {
        Some(path) if path.as_os_str() != "-" => {
            let name = path.display().to_string();
            let file = std::fs::File::open(path).map_err(|source| InspectError::Input {
                path: name.clone(),
                source,
            })?;
            Ok((name, Box::new(file)))
        }
        _ => Ok(("-".into(), Box::new(std::io::stdin().lock()))),
    }
}

fn to_json(m: &Inspected) -> Value {
    json!({
        "origin": m.origin,
        "direction": m.direction.name(),
        "agent_id": m.agent_id.map(|id| id.to_string()),
        "cipher": m.cipher.map(|c| c.name()),
        "counters": m.counters.map(|c| json!({ "rnd": c.rnd, "global": c.global, "local": c.local })),
        "checksum_ok": m.checksum_ok,
        "kind": m.kind,
        "plaintext": m.plaintext.as_deref().map(String::from_utf8_lossy),
        "error": m.error,
    })
}
