//! The enrollment replies kept for a retry survive `wazuh-proxy upgrade` (SIGUSR2): a key
//! issued while its agent was gone is given to the agent's retry by the new process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use wazuh_proxy_test_support::{enroll, free_addr, provider, wait_for, ProxyProcess};

/// A stand-in authd: the first request for a name gets a key, later ones "Duplicate agent
/// name" (authd's default within an hour of registration); it closes after each reply.
struct Authd {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    issued: Arc<Mutex<HashMap<String, String>>>,
}

impl Authd {
    async fn start() -> Authd {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let key =
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(generated.key_pair.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![generated.cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authd = Authd {
            addr: listener.local_addr().unwrap(),
            requests: Arc::default(),
            issued: Arc::default(),
        };
        let (requests, issued) = (authd.requests.clone(), authd.issued.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, requests, issued) =
                    (acceptor.clone(), requests.clone(), issued.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut line = Vec::new();
                    let mut byte = [0u8; 1];
                    while tls.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
                        line.push(byte[0]);
                    }
                    let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
                    let line = String::from_utf8_lossy(&line).into_owned();
                    let name = line
                        .split("OSSEC A:'")
                        .nth(1)
                        .and_then(|r| r.split('\'').next())
                        .unwrap_or("")
                        .to_owned();
                    let reply = {
                        let mut issued = issued.lock().unwrap();
                        match issued.entry(name) {
                            std::collections::hash_map::Entry::Occupied(e) => format!(
                                "ERROR: Duplicate agent name: {}. Unable to add agent",
                                e.key()
                            ),
                            std::collections::hash_map::Entry::Vacant(e) => {
                                let reply =
                                    format!("OSSEC K:'{n:03} {} any {:064x}'", e.key(), n * 7919);
                                e.insert(reply.clone());
                                reply
                            }
                        }
                    };
                    let _ = tls.write_all(reply.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        authd
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_enrollment_replies_survive_an_upgrade() {
    let authd = Authd::start().await;
    let listen = free_addr();
    let dir =
        std::env::temp_dir().join(format!("wazuh-proxy-enroll-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("proxy.toml");
    let sock = dir.join("upgrade.sock");
    std::fs::write(
        &file,
        format!(
            "[[listener]]\nname = \"enrollment\"\nlisten = \"{listen}\"\nkind = \"enroll\"\n\
             backend_verify = false\ntls_dir = {:?}\nbackends = [{{ address = \"{}\" }}]\n",
            dir.join("tls").display().to_string(),
            authd.addr
        ),
    )
    .unwrap();
    let mut old = ProxyProcess::start(
        &[
            "run",
            "--config",
            file.to_str().unwrap(),
            "--upgrade-socket",
            sock.to_str().unwrap(),
        ],
        listen,
    );
    // The agent goes away before its key comes: the proxy keeps it for the retry.
    let line = "OSSEC A:'upgraded-01' V:'v4.14.7'\n";
    enroll(listen, line, false).await;
    wait_for("the key kept", 10, || {
        old.logs().contains("kept_for_replay=true")
    })
    .await;
    let issued = authd.issued.lock().unwrap()["upgraded-01"].clone();

    old.signal("USR2");
    let status = old
        .wait_exit(30)
        .expect("the old process did not exit after the upgrade");
    let logs = old.logs();
    assert!(status.success(), "{status:?}\n{logs}");
    assert!(logs.contains("enrollment_replies=1"), "{logs}");
    let new_pid: u32 = logs
        .lines()
        .find(|l| l.contains("new process started"))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in the log:\n{logs}"));
    let _kill_new = Kill(new_pid);
    assert!(
        logs.contains("kept enrollment replies taken over"),
        "{logs}"
    );

    // The retry reaches the new process and gets the kept key, without a second request
    // to the manager; it is given once.
    assert_eq!(enroll(listen, line, true).await, issued);
    assert_eq!(authd.requests.load(Ordering::SeqCst), 1);
    assert_eq!(
        enroll(listen, line, true).await,
        "ERROR: Duplicate agent name: upgraded-01. Unable to add agent"
    );
    assert!(!logs.contains(issued.rsplit(' ').next().unwrap().trim_end_matches('\'')));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Kills the new process when the test ends, however it ends.
struct Kill(u32);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(self.0.to_string())
            .status();
    }
}
