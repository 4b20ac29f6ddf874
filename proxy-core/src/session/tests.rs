use tokio_util::sync::CancellationToken;

use super::*;

fn key(id: &str) -> SessionKey {
    SessionKey::Agent(AgentId::parse(id.as_bytes()).unwrap())
}
fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], port))
}

#[tokio::test]
async fn reject_refuses_while_the_first_lives() {
    let reg = SessionRegistry::new(DuplicatePolicy::Reject);
    let first = reg
        .register(key("001"), addr(1), Claim::Unverified)
        .await
        .unwrap();
    let err = reg
        .register(key("001"), addr(2), Claim::Unverified)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("001"), "{err}");
    drop(first);
    assert!(reg.is_empty());
    reg.register(key("001"), addr(3), Claim::Unverified)
        .await
        .unwrap();
}

#[tokio::test]
async fn allow_keeps_both_and_the_newest_owns_the_key() {
    let reg = SessionRegistry::new(DuplicatePolicy::Allow);
    let a = reg
        .register(key("002"), addr(1), Claim::Unverified)
        .await
        .unwrap();
    let b = reg
        .register(key("002"), addr(2), Claim::Unverified)
        .await
        .unwrap();
    assert_eq!(reg.len(), 2);
    assert_eq!(reg.by_key(&key("002")).unwrap().client(), addr(2));
    drop(b);
    // The older session no longer owns the key, but is still listed.
    assert!(reg.by_key(&key("002")).is_none());
    assert_eq!(reg.len(), 1);
    drop(a);
    assert!(reg.is_empty());
}

#[tokio::test(start_paused = true)]
async fn replace_gives_up_waiting_after_the_deadline() {
    let overtake_time = Duration::from_millis(50);
    let reg = SessionRegistry::new(DuplicatePolicy::Replace).with_overtake_time(overtake_time);
    let stuck = reg
        .register(key("003"), addr(1), Claim::Unverified)
        .await
        .unwrap();
    // Live and heard from: a newcomer that proves nothing is refused, the incumbent kept.
    assert!(matches!(
        reg.register(key("003"), addr(2), Claim::Unverified).await,
        Err(SessionError::Live { .. })
    ));
    assert!(!stuck.session().is_closing());
    // Silent past the overtake time: the newcomer takes its place.
    std::thread::sleep(overtake_time);
    let new = reg
        .register(key("003"), addr(2), Claim::Unverified)
        .await
        .unwrap();
    assert!(stuck.session().is_closing());
    assert_eq!(reg.by_key(&key("003")).unwrap().client(), addr(2));
    // Dropping the stale handle late must not evict the new owner.
    drop(stuck);
    assert_eq!(reg.by_key(&key("003")).unwrap().id(), new.session().id());
}

#[tokio::test]
async fn parent_token_closes_everything() {
    let root = CancellationToken::new();
    let reg = SessionRegistry::with_parent(DuplicatePolicy::Replace, root.clone());
    let a = reg
        .register(key("004"), addr(1), Claim::Unverified)
        .await
        .unwrap();
    let b = reg
        .register(
            SessionKey::Source("192.0.2.9".parse().unwrap()),
            addr(2),
            Claim::Unverified,
        )
        .await
        .unwrap();
    root.cancel();
    assert!(a.session().is_closing() && b.session().is_closing());
}

#[test]
fn stats_and_snapshot() {
    let reg = SessionRegistry::new(DuplicatePolicy::Replace);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let h = rt
        .block_on(reg.register(key("005"), addr(7), Claim::Unverified))
        .unwrap();
    h.session().record(true, 3, 300);
    h.session().record(false, 1, 20);
    h.session().set_backend(Some(addr(1514)));
    let snap = reg.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(
        (
            snap[0].frames_up,
            snap[0].bytes_up,
            snap[0].frames_down,
            snap[0].bytes_down
        ),
        (3, 300, 1, 20)
    );
    assert_eq!(snap[0].backend, Some(addr(1514)));
}

#[test]
fn a_live_agent_is_never_evicted_on_a_newcomers_word() {
    let live = Incumbent {
        heard_ago: Duration::from_secs(5),
        counter: Some(pack_counter(100, 3)),
    };
    let min = Duration::from_secs(60);
    assert_eq!(overtake(live, Claim::Unverified, min), Overtake::Refuse);
    // A replayed frame: verified, but not newer.
    let replay = Claim::Verified {
        startup: true,
        counter: pack_counter(100, 3),
    };
    assert_eq!(overtake(live, replay, min), Overtake::Refuse);
    // A newer message that is not a startup (a captured event): refused.
    let event = Claim::Verified {
        startup: false,
        counter: pack_counter(101, 0),
    };
    assert_eq!(overtake(live, event, min), Overtake::Refuse);
    // The agent reconnecting: its startup is newer than anything seen.
    let startup = Claim::Verified {
        startup: true,
        counter: pack_counter(101, 0),
    };
    assert_eq!(overtake(live, startup, min), Overtake::Replace);
    // An incumbent silent past the overtake time gives way to anyone.
    let silent = Incumbent {
        heard_ago: min,
        counter: None,
    };
    assert_eq!(overtake(silent, Claim::Unverified, min), Overtake::Replace);
    assert_eq!(overtake(live, Claim::HandedOver, min), Overtake::Replace);
    assert!(pack_counter(5, 9999) < pack_counter(6, 0));
}

/// The registry in brief: a live agent is not taken over by a connection that proves nothing;
/// its own newer session asks it to close and takes its place.
#[tokio::test]
async fn a_live_agent_is_replaced_only_by_its_own_newer_session() {
    use crate::envelope::AgentId;
    use crate::session::{Claim, DuplicatePolicy, SessionError, SessionKey, SessionRegistry};

    let registry = SessionRegistry::new(DuplicatePolicy::Replace);
    let key = SessionKey::Agent(AgentId::parse(b"001").unwrap());
    let first = registry
        .register(key, "192.0.2.1:40000".parse().unwrap(), Claim::Unverified)
        .await
        .unwrap();
    assert_eq!(registry.len(), 1);
    // A second connection claiming agent 001 proves nothing while the first is live: refused.
    let refused = registry
        .register(key, "198.51.100.7:5000".parse().unwrap(), Claim::Unverified)
        .await;
    assert!(matches!(refused, Err(SessionError::Live { .. })));
    // One that is the agent's own session (here handed over by a previous process; with keys, a
    // newer startup message) asks the first one to close, then takes its place.
    let waiter = first.session().clone();
    let second = tokio::spawn({
        let registry = registry.clone();
        async move {
            registry
                .register(key, "192.0.2.1:40001".parse().unwrap(), Claim::HandedOver)
                .await
        }
    });
    waiter.closing().await; // the first connection sees the request...
    drop(first); // ...and ends.
    let second = second.await.unwrap().unwrap();
    assert_eq!(registry.len(), 1);
    assert_eq!(second.session().client().port(), 40001);
}
