//! Whether a second connection for an agent may take the live session's place.

use std::time::Duration;

/// remoted's default `connection_overtake_time`.
pub(crate) const DEFAULT_OVERTAKE: Duration = Duration::from_secs(60);

/// What a new connection proved about the agent it claims to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Nothing: its first frame was not verified (no `keys`, or an ID-less probe).
    Unverified,
    /// Its first frame decrypted with the agent's key.
    Verified {
        /// It is the agent's startup message (what an agent sends first on every connection).
        startup: bool,
        /// The message's counters, ordered (see [`pack_counter`]).
        counter: u64,
    },
    /// A session handed over by the previous process of this proxy (it is the same session).
    HandedOver,
}

/// What is known of the live session of the agent a newcomer claims to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Incumbent {
    /// Time since the agent last sent a frame on it (since it started if none).
    pub heard_ago: Duration,
    /// The newest counter decrypted on it, if any (see [`pack_counter`]).
    pub counter: Option<u64>,
}

/// The outcome of a second connection for an agent that has a live session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overtake {
    /// Keep the live session; refuse the newcomer.
    Refuse,
    /// Close the live session and let the newcomer take its place.
    Replace,
}

/// Decides whether a newcomer may take a live session's place (duplicate policy `replace`).
///
/// As remoted 4.6+ does with `connection_overtake_time`, the incumbent is kept while it has been
/// heard from within `overtake`; a connection cannot evict an agent on its word alone. With
/// keys the newcomer can prove more: its startup message, decrypted with the agent's key, with a
/// counter newer than anything seen on the incumbent, is the agent reconnecting (a captured
/// frame replayed carries an old counter and proves nothing).
pub(crate) fn overtake(incumbent: Incumbent, claim: Claim, overtake: Duration) -> Overtake {
    if incumbent.heard_ago >= overtake {
        return Overtake::Replace;
    }
    match claim {
        Claim::HandedOver => Overtake::Replace,
        Claim::Verified {
            startup: true,
            counter,
        } if incumbent.counter.is_some_and(|c| counter > c) => Overtake::Replace,
        _ => Overtake::Refuse,
    }
}

/// Orders a message's counters: the global counter, then the local one (`global:local` in the
/// message header; the global counter is persisted by the agent across restarts).
pub(crate) fn pack_counter(global: u64, local: u32) -> u64 {
    global
        .saturating_mul(10_000)
        .saturating_add(u64::from(local % 10_000))
        .max(1)
}
