//! Arbitrary byte chunks through the relay's frame pipes, both ways, with writes of arbitrary
//! sizes, kernel acknowledgements, moves and failovers at arbitrary points; then the session
//! state machine through an arbitrary event sequence.
//!
//! Input layout:
//!
//! ```text
//! byte 0        bit 0: agent 001 (else an ID-less agent); bits 1-2: payload limit (LIMITS)
//! then ops      one op byte (low 3 bits: what; high 5 bits: a size), then for the two
//!               "bytes" ops a length byte and that many bytes of stream
//! ```
//!
//! Checked on every input (by `wazuh_proxy_core::relay::harness`): no panic; the agent only
//! ever receives whole, valid manager frames (a move or a failover never splices one); each
//! manager receives whole frames that pass the agent check, except a partial last frame of a
//! manager that died mid-frame; what is re-sent after a failover is exactly the tail of what
//! the dead manager was sent; without frames let go over the copy's bound, every frame
//! accepted from the agent is processed by exactly one manager, in order; buffers stay
//! bounded. The state machine: every end of a manager connection yields one replay decision,
//! one upstream close, one partial-frame drop and a next step, and an agent refused by every
//! manager is given up within the bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wazuh_proxy_core::envelope::AgentId;
use wazuh_proxy_core::frame::MAX_PAYLOAD;
use wazuh_proxy_core::relay::harness::{machine_events, Event, Pipes, Switch};

const LIMITS: [u32; 4] = [MAX_PAYLOAD, 1024, 64, 16];

fuzz_target!(|data: &[u8]| {
    let Some((&head, mut rest)) = data.split_first() else {
        return;
    };
    let id = (head & 1 == 1).then(|| AgentId::parse(b"001")).flatten();
    let mut pipes = Pipes::new(id, LIMITS[usize::from((head >> 1) & 3)]);
    let mut events = Vec::new();
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        let size = usize::from(op >> 3);
        match op & 7 {
            0 | 1 => {
                let Some((&len, tail)) = rest.split_first() else {
                    break;
                };
                let n = usize::from(len).min(tail.len());
                let (chunk, tail) = tail.split_at(n);
                rest = tail;
                if op & 7 == 0 {
                    pipes.agent_bytes(chunk);
                } else {
                    pipes.manager_bytes(chunk);
                }
            }
            2 => pipes.write_up(size * 7 + 1),
            3 => pipes.write_down(size * 7 + 1),
            4 => pipes.kernel_reports(size * 13),
            5 => pipes.switch(match size % 3 {
                0 => Switch::Move,
                1 => Switch::Failover(size * 11),
                _ => Switch::Refused,
            }),
            6 => events.push(Event::Connected(op >> 3)),
            _ => events.push(Event::StintEnded {
                cause: op >> 3,
                answered: op & 0x80 != 0,
                secs: op >> 2,
            }),
        }
    }
    pipes.finish();
    machine_events(&events, head >> 3);
});
