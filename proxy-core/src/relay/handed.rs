//! Sessions passed between processes on a binary upgrade: the agent's socket handed to the
//! next process, and a handed session taken over here.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::pipe::Pipe;
use super::shell::Conn;
use super::AgentRelay;
use crate::handover::AgentInTransit;
use crate::net::tune;
use crate::session::{Claim, SessionKey};
use crate::verify::KeepaliveWatch;

impl AgentRelay {
    pub(super) fn hand_over(&self, conn: Box<Conn>) {
        let Conn {
            agent,
            handle,
            up,
            replay,
            ..
        } = *conn;
        let key = handle.session().key();
        let peer = handle.session().client();
        let sink = self
            .handover_to
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let socket = agent.into_std();
        match (sink, socket) {
            (Some(sink), Ok(socket)) => {
                let handed = AgentInTransit {
                    listener: self.name.clone(),
                    client: peer,
                    key,
                    pending: up.buf.to_vec(),
                    replay,
                    socket: socket.into(),
                };
                if sink.send(handed).is_err() {
                    tracing::warn!(listener = %self.name, agent = %key, client = %peer,
                        "hand-over channel closed; closing the agent connection");
                } else {
                    tracing::debug!(listener = %self.name, agent = %key, client = %peer, "agent handed over");
                }
            }
            (_, Err(e)) => {
                tracing::warn!(listener = %self.name, agent = %key, client = %peer, error = %e,
                    "cannot detach the agent socket for the hand-over; closing it");
            }
            (None, _) => {}
        }
        drop(handle);
    }

    /// Takes over a session handed over by a previous process: reconnects the agent to a
    /// manager (the startup or keepalive frame first, then the bytes the previous process had
    /// not forwarded) and relays it as if it had connected here.
    pub async fn adopt(self: Arc<Self>, handed: AgentInTransit) {
        if handed.listener != self.name {
            tracing::warn!(listener = %self.name, other = %handed.listener, "adopting a session of another listener");
        }
        let std_socket = std::net::TcpStream::from(handed.socket);
        let agent = match std_socket
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(std_socket))
        {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(listener = %self.name, agent = %handed.key, client = %handed.client, error = %e,
                    "cannot adopt the agent socket");
                return;
            }
        };
        self.start_sweeper();
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        let handle = match self
            .sessions
            .register(handed.key, handed.client, Claim::HandedOver)
            .await
        {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(listener = %self.name, agent = %handed.key, "cannot adopt: {e}");
                self.stats.active.fetch_sub(1, Ordering::Relaxed);
                return;
            }
        };
        let keepalives = match (&self.keys, handed.key) {
            (Some(keys), SessionKey::Agent(id)) => {
                keys.get(&id).map(|k| Box::new(KeepaliveWatch::new(k)))
            }
            _ => None,
        };
        let mut up = Pipe::default();
        up.buf.extend_from_slice(&handed.pending);
        tune(&agent, self.config.tcp_keepalive);
        let conn = Box::new(Conn::new(
            agent,
            handle,
            up,
            handed.replay,
            keepalives,
            None,
        ));
        self.run_session(conn, true).await;
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}
