use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

use crate::envelope::AgentId;

use super::agent::md5_hex;
use super::*;

const EXAMPLE_KEY: &str = "61f01f714746b01b977d7c65a724409f33ad89c391ad93f918eb27202dca8223";

fn id(s: &str) -> AgentId {
    AgentId::parse(s.as_bytes()).unwrap()
}

#[test]
fn worked_example_derivation() {
    assert_eq!(&md5_hex(b"web-01"), b"9e795e3c83f0a95aee9e9cd5928adc56");
    assert_eq!(&md5_hex(b"001"), b"dc5c7986daef50c1e02ab09b442ee34f");
    let key = AgentKey::new(id("001"), "web-01", KeyIp::Any, EXAMPLE_KEY.as_bytes());
    assert_eq!(key.aes_key(), b"78595427ed3f37b4e3329b9c32822c72");
    assert_eq!(
        key.blowfish_key(),
        b"78595427ed3f37b4e3329b9c32822c72725a2967a61c602"
    );
}

#[test]
fn debug_hides_keys() {
    let key = AgentKey::new(id("001"), "web-01", KeyIp::Any, EXAMPLE_KEY.as_bytes());
    let text = format!("{key:?} {key:#?}");
    assert!(!text.contains("61f01f71"), "{text}");
    assert!(!text.contains("78595427"), "{text}");
    assert!(text.contains("web-01"));
    let (set, _) = KeySet::parse(format!("001 web-01 any {EXAMPLE_KEY}\n").as_bytes());
    let set_text = format!("{set:?}");
    let text = format!("{set_text} {:?}", KeyStore::new(set));
    assert!(
        !text.contains("61f01f71") && !text.contains("78595427"),
        "{text}"
    );
}

#[test]
fn every_line_form() {
    let text = b"001 web-01 any k1\r\n\
        # comment\n\
        \x20indented comment\n\
        \n\
        002 !removed any k2\n\
        003 #removed any k3\n\
        #004 old any k4\n\
        005 two-fields\n\
        abc name any k6\n\
        007 fixed 127.0.0.1 key with spaces \n\
        008 net 10.0.0.0/8 k8\n\
        009 six 2001:db8::1 k9\n\
        010 bad 300.1.1.1 k10\n\
        011 empty any \n\
        001 again any k12\n\
        013 mask 192.168.0.0/255.255.0.0 k13";
    let (set, problems) = KeySet::parse(text);
    let lines: Vec<_> = problems
        .iter()
        .map(|p| (p.line, p.problem.clone()))
        .collect();
    assert_eq!(
        lines,
        vec![
            (8, KeyProblem::MissingFields),
            (9, KeyProblem::BadId),
            (13, KeyProblem::BadIp("300.1.1.1".into())),
            (14, KeyProblem::EmptyKey),
            (15, KeyProblem::DuplicateId(id("001"), 1)),
        ]
    );
    assert_eq!(set.len(), 5);
    // The KEY column as read (spaces included) is what the cipher keys are derived from.
    for (agent, key) in [("001", &b"k1"[..]), ("007", &b"key with spaces "[..])] {
        let got = set.get(&id(agent)).unwrap();
        let want = AgentKey::new(id(agent), got.name(), got.ip(), key);
        assert_eq!(got.aes_key(), want.aes_key(), "agent {agent}");
    }
    assert!(!set.get(&id("007")).unwrap().sends_id_prefix());
    assert!(set.get(&id("008")).unwrap().sends_id_prefix());
    assert!(set.get(&id("009")).unwrap().sends_id_prefix());
    assert_eq!(
        set.get(&id("013")).unwrap().ip(),
        KeyIp::Network {
            addr: "192.168.0.0".parse().unwrap(),
            prefix: 16
        }
    );
    assert_eq!(
        set.by_ip("127.0.0.1".parse().unwrap()).unwrap().id(),
        id("007")
    );
    assert_eq!(
        set.by_ip("::ffff:127.0.0.1".parse().unwrap()).unwrap().id(),
        id("007")
    );
    // CIDR suffix dropped, then exact match: only the network address itself matches.
    assert_eq!(
        set.by_ip("10.0.0.0".parse().unwrap()).unwrap().id(),
        id("008")
    );
    assert!(set.by_ip("10.0.0.1".parse().unwrap()).is_none());
    assert!(set.get(&id("002")).is_none() && set.get(&id("003")).is_none());
}

#[test]
fn source_rules() {
    let net = KeyIp::parse("10.1.0.0/16").unwrap();
    assert!(net.allows("10.1.200.3".parse().unwrap()));
    assert!(!net.allows("10.2.0.1".parse().unwrap()));
    assert!(KeyIp::Any.allows("::1".parse().unwrap()));
    assert!(KeyIp::parse("0.0.0.0/0")
        .unwrap()
        .allows("1.2.3.4".parse().unwrap()));
    assert!(KeyIp::parse("2001:db8::/32")
        .unwrap()
        .allows("2001:db8:1::5".parse().unwrap()));
    assert!(KeyIp::parse("10.0.0.0/33").is_none());
    assert!(KeyIp::parse("10.0.0.0/255.0.255.0").is_none());
    assert_eq!(KeyIp::parse("ANY"), Some(KeyIp::Any));
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "wazuh-proxy-keys-{tag}-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a new version next to `path` and renames it over, as the manager does.
fn replace_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn reload_follows_a_rename() {
    let dir = temp_dir("rename");
    let path = dir.join("client.keys");
    std::fs::write(&path, "001 a any k1\n").unwrap();
    let (store, problems) = KeyStore::open(&path).unwrap();
    assert!(problems.is_empty());
    let reader = store.clone();
    assert_eq!(store.reload_if_changed(&path).unwrap(), None);
    // Same size as before: only the inode tells the versions apart.
    replace_by_rename(&path, "002 b any k2\n");
    let report = store.reload_if_changed(&path).unwrap().unwrap();
    assert_eq!(report.keys, 1);
    assert!(reader.get(&id("001")).is_none());
    assert_eq!(reader.get(&id("002")).unwrap().name(), "b");
    assert_eq!(store.reload_if_changed(&path).unwrap(), None);
    // A missing file keeps the current keys.
    std::fs::remove_file(&path).unwrap();
    assert!(store.reload_if_changed(&path).is_err());
    assert_eq!(reader.len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn watcher_picks_up_a_replaced_file() {
    let dir = temp_dir("watch");
    let path = dir.join("client.keys");
    std::fs::write(&path, "001 a any k1\n").unwrap();
    let (store, _) = KeyStore::open(&path).unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(store.clone().watch(
        path.clone(),
        Duration::from_millis(20),
        cancel.clone(),
    ));
    replace_by_rename(&path, "001 a any k1\n002 b 10.0.0.2 k2\nbad\n");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while store.len() != 2 {
        assert!(tokio::time::Instant::now() < deadline, "reload not seen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        store.by_ip("10.0.0.2".parse().unwrap()).unwrap().id(),
        id("002")
    );
    cancel.cancel();
    task.await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn blowfish_schedule_is_cached() {
    let key = AgentKey::new(id("001"), "web-01", KeyIp::Any, b"k");
    assert!(std::ptr::eq(key.blowfish(), key.blowfish()));
}
