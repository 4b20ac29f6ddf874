//! The real `wazuh-proxy` between real Wazuh 4.14.7 agents and managers on loopback
//! (`../shared/peers`, built by `build-wazuh.sh`; see `wazuh_proxy_test_support::wazuh`): events, a removed
//! agent, a manager killed or blackholed, an upgrade, and enrollment in both modes.
//!
//! Every test lays out its own daemons with their own ports, so they run in parallel. Without
//! the built daemons each test says SKIPPED loudly and returns, except under `CI=true`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use wazuh_proxy_test_support::wait_until;
use wazuh_proxy_test_support::wazuh::{
    event_numbers, free_loopback, Agent, Blackhole, Build, Delivery, Key, Lab, Manager,
};
use wazuh_proxy_test_support::*;

const SEC: Duration = Duration::from_secs(1);

/// The proxy in front of the managers: one agent listener, plus `extra` listeners (TOML).
struct Proxy {
    process: ProxyProcess,
    listen: SocketAddr,
    admin: SocketAddr,
}

fn agent_listener(listen: SocketAddr, managers: &[&Manager]) -> String {
    let backends: Vec<String> = managers
        .iter()
        .map(|m| format!("{{ address = \"{}\" }}", m.remoted_addr()))
        .collect();
    format!(
        "[[listener]]\nname = \"agents\"\nlisten = \"{listen}\"\nbackends = [{}]\n",
        backends.join(", ")
    )
}

fn start_proxy(lab: &Lab, managers: &[&Manager], extra: &str) -> Proxy {
    let listen = free_loopback();
    let admin = free_loopback();
    let file = lab.dir.join("proxy.toml");
    let text = format!(
        "drain_timeout = \"5s\"\n{}{extra}",
        agent_listener(listen, managers)
    );
    std::fs::write(&file, text).unwrap();
    let sock = lab.dir.join("upgrade.sock");
    let admin_arg = admin.to_string();
    let process = ProxyProcess::start(
        &[
            "run",
            "--config",
            file.to_str().unwrap(),
            "--upgrade-socket",
            sock.to_str().unwrap(),
            "--admin",
            &admin_arg,
        ],
        listen,
    );
    Proxy {
        process,
        listen,
        admin,
    }
}

impl Proxy {
    fn get(&self, path: &str) -> (u16, Value) {
        let (status, body) = http_get(self.admin, path).unwrap();
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// Which manager (remoted address) serves each agent ID, from `/sessions`.
    fn placement(&self) -> BTreeMap<String, String> {
        let (_, sessions) = self.get("/sessions");
        sessions
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                Some((
                    s["agent"].as_str()?.to_owned(),
                    s["backend"].as_str()?.to_owned(),
                ))
            })
            .collect()
    }

    /// Backends not `available` in `/backends`, as "address state".
    fn unavailable_backends(&self) -> Vec<String> {
        let (_, doc) = self.get("/backends");
        doc.as_array()
            .into_iter()
            .flatten()
            .flat_map(|l| l["backends"].as_array().cloned().unwrap_or_default())
            .filter(|b| b["state"] != "available")
            .map(|b| format!("{} {}", b["address"], b["state"]))
            .collect()
    }
}

/// Waits until the managers' mq.out stop changing (2 s quiet), at most `timeout`.
fn settle(managers: &[&Manager], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = (0, Instant::now());
    while Instant::now() < deadline {
        let len: usize = managers.iter().map(|m| m.events().len()).sum();
        if len != last.0 {
            last = (len, Instant::now());
        } else if last.1.elapsed() >= 2 * SEC {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn all_events(managers: &[&Manager]) -> Vec<String> {
    managers.iter().map(|m| m.events()).collect()
}

fn keys(n: usize, prefix: &str) -> Vec<Key> {
    (1..=n)
        .map(|i| Key::new(&format!("{i:03}"), &format!("{prefix}{i}")))
        .collect()
}

#[test]
fn real_agent_events_reach_real_remoted_through_the_proxy_each_once() {
    let Some(build) = Build::find("real agent events through the proxy") else {
        return;
    };
    let lab = Lab::new(&build);
    let key = Key::new("001", "agent-a");
    let mut m = Manager::new(&lab, "m1", std::slice::from_ref(&key));
    m.start();
    let proxy = start_proxy(&lab, &[&m], "");
    let mut a = Agent::new(&lab, "a1", Some(&key), proxy.listen.port(), None);
    a.start();
    a.wait_connected(1, 30 * SEC);
    const N: usize = 1000;
    a.inject(N, 250, "flow").wait(60 * SEC);
    wait_until(30 * SEC, || {
        Delivery::count(&[m.events()], "001", "flow", N).lost == 0
    });
    settle(&[&m], 10 * SEC);
    let d = Delivery::count(&[m.events()], "001", "flow", N);
    println!("real agent -> proxy -> real remoted: {d}");
    assert_eq!((d.lost, d.duplicated), (0, 0), "{d}");
    assert!(
        m.events()
            .contains("[001] (agent-a) any->wazuh-agent:ossec: Agent started"),
        "remoted did not see the agent's startup:\n{}",
        m.events()
    );
    // It went through the proxy: the proxy holds the session, toward this remoted.
    assert_eq!(
        proxy.placement().get("001"),
        Some(&m.remoted_addr()),
        "{}",
        proxy.process.logs()
    );
    assert_eq!((a.connections(), a.disconnections()), (1, 0), "{}", a.log());
}

#[test]
fn agent_removed_on_the_managers_leaves_them_available_and_others_streaming() {
    let Some(build) = Build::find("agent removed on the managers") else {
        return;
    };
    let lab = Lab::new(&build);
    let ks = keys(2, "agent-r");
    // Two managers of one cluster: they share client.keys, and the removal reaches both.
    let mut m1 = Manager::new(&lab, "m1", &ks);
    let mut m2 = Manager::new(&lab, "m2", &ks);
    m1.start();
    m2.start();
    let proxy = start_proxy(&lab, &[&m1, &m2], "");
    let mut removed = Agent::new(&lab, "a1", Some(&ks[0]), proxy.listen.port(), None);
    let mut other = Agent::new(&lab, "a2", Some(&ks[1]), proxy.listen.port(), None);
    removed.start();
    other.start();
    removed.wait_connected(1, 30 * SEC);
    other.wait_connected(1, 30 * SEC);
    assert_eq!(proxy.get("/health").0, 200, "{}", proxy.process.logs());

    // The other agent streams for the whole test.
    // 30 s of events: longer than the key reload plus the 10 s observed after the refusal.
    const N: usize = 1200;
    let streaming = other.inject(N, 40, "steady");
    let reloads = (m1.key_reloads(), m2.key_reloads());
    m1.remove_agent("001");
    m2.remove_agent("001");
    // remoted re-reads client.keys a few seconds after it changes.
    assert!(
        wait_until(30 * SEC, || m1.key_reloads() > reloads.0
            && m2.key_reloads() > reloads.1),
        "remoted did not reload client.keys"
    );
    // The removed agent's next messages are refused: (1408) and the connection closed.
    let trigger = removed.inject(5, 5, "refused");
    let refused_at = Instant::now();
    let refused = wait_until(30 * SEC, || {
        m1.remoted_log().contains("(1408): Invalid ID 001")
            || m2.remoted_log().contains("(1408): Invalid ID 001")
    });
    assert!(refused, "no manager refused agent 001");
    // What an operator's keepalived and dashboards see meanwhile.
    let mut bad_health = Vec::new();
    let mut failed = Vec::new();
    let mut polls = 0;
    // The other agent's longest pause in delivery meanwhile (it sends 40 events a second).
    let delivered = || Delivery::count(&all_events(&[&m1, &m2]), "002", "steady", N).delivered;
    let (mut last_count, mut last_change, mut longest_pause) =
        (delivered(), Instant::now(), 0.0f64);
    while refused_at.elapsed() < 10 * SEC {
        polls += 1;
        // Time between two observed deliveries (to the precision of this loop's pace).
        let now = delivered();
        if now != last_count {
            longest_pause = longest_pause.max(last_change.elapsed().as_secs_f64());
            last_count = now;
            last_change = Instant::now();
        }
        let (status, doc) = proxy.get("/health");
        if status != 200 {
            bad_health.push(format!(
                "{:.1}s: {status} {}",
                refused_at.elapsed().as_secs_f64(),
                doc["reason"]
            ));
        }
        for b in proxy.unavailable_backends() {
            failed.push(format!("{:.1}s: {b}", refused_at.elapsed().as_secs_f64()));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    drop(trigger);
    streaming.wait(60 * SEC);
    settle(&[&m1, &m2], 15 * SEC);
    let d = Delivery::count(&all_events(&[&m1, &m2]), "002", "steady", N);
    let refusals = m1.remoted_log().matches("(1408): Invalid ID 001").count()
        + m2.remoted_log().matches("(1408): Invalid ID 001").count();
    println!(
        "removed agent: {refusals} refusals by remoted, {} reconnects by the removed agent; \
         /health not 200: {} of {polls} polls; backends not available: {} observations; \
         the other agent: {d}, reconnects {}, longest pause in its delivery {longest_pause:.2} s",
        removed.disconnections(),
        bad_health.len(),
        failed.len(),
        other.disconnections()
    );
    for line in bad_health.iter().chain(&failed).take(12) {
        println!("  {line}");
    }
    // The other agent is untouched: no reconnect, nothing lost or repeated.
    assert_eq!((d.lost, d.duplicated), (0, 0), "{d}");
    assert_eq!(
        (other.connections(), other.disconnections()),
        (1, 0),
        "{}",
        other.log()
    );
    // An agent-scoped refusal is not a manager failure.
    assert!(
        bad_health.is_empty() && failed.is_empty(),
        "/health: {bad_health:?}\nbackends: {failed:?}\nproxy log:\n{}",
        proxy.process.logs()
    );
}

/// What a manager fault did to streaming agents.
struct FaultReport {
    /// Seconds from the fault until each moved agent's events reached the other manager.
    resumed: BTreeMap<String, Option<f64>>,
    deliveries: BTreeMap<String, Delivery>,
}

/// Two managers, four agents streaming through the proxy; `fault` is applied to the manager
/// serving the most agents 3 s into the stream.
/// `lossless`: the fault leaves the manager's process alive (a blackhole), so every event its
/// TCP never acknowledged is re-sent by the proxy and none may be lost. A killed manager takes
/// with it what its kernel acknowledged and remoted had not read yet: counted, not asserted.
fn manager_fault(
    what: &str,
    fault: impl FnOnce(&mut Manager) -> Option<Blackhole>,
    events: usize,
    resume_limit: Duration,
    lossless: bool,
) -> Option<FaultReport> {
    let build = Build::find(what)?;
    let lab = Lab::new(&build);
    let ks = keys(4, "agent-f");
    let mut managers = [Manager::new(&lab, "m1", &ks), Manager::new(&lab, "m2", &ks)];
    for m in &mut managers {
        m.start();
    }
    let proxy = start_proxy(&lab, &[&managers[0], &managers[1]], "");
    let mut agents: Vec<Agent> = ks
        .iter()
        .enumerate()
        .map(|(i, k)| {
            Agent::new(
                &lab,
                &format!("a{}", i + 1),
                Some(k),
                proxy.listen.port(),
                None,
            )
        })
        .collect();
    for a in &mut agents {
        a.start();
    }
    for a in &agents {
        a.wait_connected(1, 30 * SEC);
    }
    let placement = proxy.placement();
    assert_eq!(placement.len(), ks.len(), "{placement:?}");
    let victim = if placement
        .values()
        .filter(|b| **b == managers[0].remoted_addr())
        .count()
        >= 2
    {
        0
    } else {
        1
    };
    let survivor = 1 - victim;
    let moved: Vec<String> = placement
        .iter()
        .filter(|(_, b)| **b == managers[victim].remoted_addr())
        .map(|(a, _)| a.clone())
        .collect();
    println!(
        "{what}: placement {placement:?}; fault on {} ({}), moving {moved:?}",
        managers[victim].name,
        managers[victim].remoted_addr()
    );

    let n = events;
    const EPS: u32 = 40;
    let tag = "fault";
    let injections: Vec<_> = agents.iter().map(|a| a.inject(n, EPS, tag)).collect();
    std::thread::sleep(3 * SEC);
    let before: BTreeMap<String, usize> = moved
        .iter()
        .map(|id| {
            let n = event_numbers(&managers[survivor].events(), id, tag).len();
            (id.clone(), n)
        })
        .collect();
    let t0 = Instant::now();
    let blackhole = fault(&mut managers[victim]);
    let mut resumed: BTreeMap<String, Option<f64>> =
        moved.iter().map(|id| (id.clone(), None)).collect();
    while t0.elapsed() < resume_limit && resumed.values().any(Option::is_none) {
        let events = managers[survivor].events();
        for (id, at) in resumed.iter_mut().filter(|(_, at)| at.is_none()) {
            if event_numbers(&events, id, tag).len() > before[id] {
                *at = Some(t0.elapsed().as_secs_f64());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in injections {
        i.wait(120 * SEC);
    }
    settle(&[&managers[0], &managers[1]], 30 * SEC);
    let events = all_events(&[&managers[0], &managers[1]]);
    let mut deliveries = BTreeMap::new();
    for k in &ks {
        let d = Delivery::count(&events, &k.id, tag, n);
        println!(
            "{what}: agent {} ({}): {d}",
            k.id,
            if moved.contains(&k.id) {
                "moved"
            } else {
                "stayed"
            }
        );
        deliveries.insert(k.id.clone(), d);
    }
    println!("{what}: time to resume on the other manager (s): {resumed:?}");
    let logs = proxy.process.logs();
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains("moved"))
        .collect();
    println!(
        "{what}: the proxy's warnings and moves ({}):",
        warnings.len()
    );
    for l in warnings.iter().take(10) {
        println!("  {l}");
    }
    // Losses, if any, are the frames in flight at the fault: one window per moved agent,
    // after what the faulty manager received and before what the survivor received.
    for id in &moved {
        let on_victim = event_numbers(&managers[victim].events(), id, tag);
        let on_survivor = event_numbers(&managers[survivor].events(), id, tag);
        let last_before = on_victim.keys().next_back().copied().unwrap_or(0);
        let first_after = on_survivor
            .keys()
            .find(|n| **n > last_before)
            .copied()
            .unwrap_or(n as u64 + 1);
        let outside: Vec<u64> = (1..=n as u64)
            .filter(|n| !on_victim.contains_key(n) && !on_survivor.contains_key(n))
            .filter(|n| *n <= last_before || *n >= first_after)
            .collect();
        println!(
            "{what}: agent {id}: last on {} #{last_before}, first after on {} #{first_after}",
            managers[victim].name, managers[survivor].name
        );
        assert!(
            outside.is_empty(),
            "agent {id} lost events outside the fault window: {outside:?}"
        );
        if lossless {
            let d = &deliveries[id];
            assert_eq!(d.lost, 0, "{what}: agent {id} lost events: {d}");
        }
    }
    for (id, d) in &deliveries {
        if !moved.contains(id) {
            assert_eq!((d.lost, d.duplicated), (0, 0), "agent {id} stayed: {d}");
        }
    }
    // The proxy kept every agent's connection.
    for a in &agents {
        assert_eq!(
            (a.connections(), a.disconnections()),
            (1, 0),
            "{} reconnected:\n{}",
            a.name,
            a.log()
        );
    }
    assert!(
        resumed.values().all(Option::is_some),
        "{what}: agents did not resume within {resume_limit:?}: {resumed:?}\nproxy log:\n{}",
        proxy.process.logs()
    );
    drop(blackhole);
    Some(FaultReport {
        resumed,
        deliveries,
    })
}

fn summary(what: &str, r: &FaultReport) {
    let lost: usize = r.deliveries.values().map(|d| d.lost).sum();
    let dup: usize = r.deliveries.values().map(|d| d.duplicated).sum();
    let injected: usize = r.deliveries.values().map(|d| d.injected).sum();
    let worst = r.resumed.values().flatten().fold(0.0f64, |a, b| a.max(*b));
    println!(
        "{what}: {injected} events injected, {lost} lost, {dup} duplicated; agents resumed \
         within {worst:.2} s"
    );
}

#[test]
fn a_real_manager_killed_under_real_agents_they_continue_on_the_other() {
    let what = "real manager SIGKILLed";
    if let Some(r) = manager_fault(
        what,
        |m| {
            m.kill();
            None
        },
        800,
        60 * SEC,
        false,
    ) {
        summary(what, &r);
    }
}

#[test]
fn a_real_manager_blackholed_under_real_agents_they_resume_on_the_other() {
    let what = "real manager blackholed";
    if let Err(why) = Blackhole::available() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{what}: {why}; CI=true installs iptables, so this is a failure");
        }
        wazuh_proxy_test_support::skipped(&format!("{what}: {why}"));
        return;
    }
    if let Some(r) = manager_fault(
        what,
        |m| Some(Blackhole::port(m.remoted_port)),
        1600,
        90 * SEC,
        true,
    ) {
        summary(what, &r);
    }
}

#[test]
fn upgrade_under_a_streaming_real_agent_keeps_its_connection_and_every_event() {
    let Some(build) = Build::find("upgrade under a real agent") else {
        return;
    };
    let lab = Lab::new(&build);
    let key = Key::new("001", "agent-u");
    let mut m = Manager::new(&lab, "m1", std::slice::from_ref(&key));
    m.start();
    let mut proxy = start_proxy(&lab, &[&m], "");
    let mut a = Agent::new(&lab, "a1", Some(&key), proxy.listen.port(), None);
    a.start();
    a.wait_connected(1, 30 * SEC);
    const N: usize = 600;
    let streaming = a.inject(N, 60, "upgrade");
    std::thread::sleep(2 * SEC);
    let pid = proxy.process.child.id().to_string();
    let sent = bin().args(["upgrade", "--pid", &pid]).status().unwrap();
    assert!(sent.success());
    let status = proxy
        .process
        .wait_exit(30)
        .expect("the old process did not exit after the upgrade");
    let logs = proxy.process.logs();
    assert!(status.success(), "{status:?}\n{logs}");
    let new_pid: u32 = logs
        .lines()
        .find(|l| l.contains("new process started"))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in the log:\n{logs}"));
    let _new = KillOnDrop(new_pid);
    streaming.wait(60 * SEC);
    settle(&[&m], 15 * SEC);
    let d = Delivery::count(&[m.events()], "001", "upgrade", N);
    println!(
        "upgrade under a real agent: {d}; agent reconnects {}",
        a.disconnections()
    );
    assert_eq!((d.lost, d.duplicated), (0, 0), "{d}");
    assert_eq!((a.connections(), a.disconnections()), (1, 0), "{}", a.log());
    // The new process serves the session and answers the admin API.
    assert_eq!(proxy.get("/health").0, 200);
    assert_eq!(proxy.placement().get("001"), Some(&m.remoted_addr()));
    assert!(
        logs.contains("sessions handed over") || logs.contains("agent sessions handed over"),
        "{logs}"
    );
}

/// How an agent enrolls through the proxy.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// `kind = "enroll"`: TLS terminated by the proxy.
    Terminate,
    /// `kind = "tcp"`: TLS relayed untouched to authd.
    Passthrough,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Client {
    /// The `agent-auth` tool.
    AgentAuth,
    /// `wazuh-agentd` enrolling by itself (empty client.keys, enrollment enabled).
    Agentd,
}

fn enrollment(mode: Mode, client: Client) {
    let what = format!("enrollment through the proxy ({mode:?}, {client:?})");
    let Some(build) = Build::find(&what) else {
        return;
    };
    let lab = Lab::new(&build);
    let mut m = Manager::new(&lab, "m1", &[]).with_authd();
    m.start();
    let enroll = free_loopback();
    let listener = match mode {
        Mode::Terminate => format!(
            "[[listener]]\nname = \"enrollment\"\nlisten = \"{enroll}\"\nkind = \"enroll\"\n\
             backend_verify = false\ntls_dir = \"{}\"\nbackends = [{{ address = \"{}\" }}]\n",
            lab.dir.join("tls").display(),
            m.authd_addr()
        ),
        Mode::Passthrough => format!(
            "[[listener]]\nname = \"enrollment\"\nlisten = \"{enroll}\"\nkind = \"tcp\"\n\
             backends = [{{ address = \"{}\" }}]\n",
            m.authd_addr()
        ),
    };
    std::fs::create_dir_all(lab.dir.join("tls")).unwrap();
    let proxy = start_proxy(&lab, &[&m], &listener);
    let name = "agent-enrolled";
    let mut a = Agent::new(
        &lab,
        name,
        None,
        proxy.listen.port(),
        (client == Client::Agentd).then_some(enroll.port()),
    );
    let started = Instant::now();
    match client {
        Client::AgentAuth => {
            let (ok, out) = a.agent_auth(enroll.port());
            assert!(
                ok,
                "{what}: agent-auth failed:\n{out}\nauthd:\n{}\nproxy:\n{}",
                m.authd_log(),
                proxy.process.logs()
            );
        }
        Client::Agentd => a.start(),
    }
    let enrolled = wait_until(60 * SEC, || !a.client_keys().is_empty());
    assert!(
        enrolled,
        "{what}: no key in the agent's client.keys\nagent:\n{}\nauthd:\n{}\nproxy:\n{}",
        a.log(),
        m.authd_log(),
        proxy.process.logs()
    );
    let enroll_time = started.elapsed();
    let agent_keys = a.client_keys();
    assert_eq!(agent_keys.len(), 1, "{agent_keys:?}");
    assert!(
        agent_keys[0].split_whitespace().nth(1) == Some(name),
        "{agent_keys:?}"
    );
    // authd writes client.keys shortly after answering.
    let matched = wait_until(15 * SEC, || m.client_keys().contains(&agent_keys[0]));
    assert!(
        matched,
        "{what}: the agent's key {:?} is not the manager's {:?}",
        agent_keys[0].split_whitespace().take(2).collect::<Vec<_>>(),
        m.client_keys()
            .iter()
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
    if client == Client::Agentd {
        // With the key it enrolled for, the agent connects through the proxy's 1514 listener
        // (remoted may refuse it once until it has re-read client.keys; the agent retries).
        a.wait_connected(1, 90 * SEC);
        // How it got there: its attempts, and what the proxy made of remoted's refusals.
        for l in a.log().lines().filter(|l| {
            [
                "(4102)",
                "(1137)",
                "Trying to connect",
                "Requesting a key",
                "Valid key",
            ]
            .iter()
            .any(|w| l.contains(w))
        }) {
            println!("  agent: {l}");
        }
        for l in proxy
            .process
            .logs()
            .lines()
            .filter(|l| l.contains(" WARN "))
            .take(6)
        {
            println!("  proxy: {l}");
        }
        let id = agent_keys[0].split_whitespace().next().unwrap().to_owned();
        assert!(
            wait_until(30 * SEC, || m.events().contains(&format!(
                "[{id}] ({name}) any->wazuh-agent:ossec: Agent started"
            ))),
            "no startup event from {id}:\n{}",
            m.events()
        );
    }
    println!(
        "{what}: enrolled in {:.2} s, keys match; total {:.2} s",
        enroll_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn agent_auth_enrolls_through_the_terminating_enroll_listener() {
    enrollment(Mode::Terminate, Client::AgentAuth);
}

#[test]
fn agent_auth_enrolls_through_a_passthrough_listener() {
    enrollment(Mode::Passthrough, Client::AgentAuth);
}

#[test]
fn agentd_enrolls_by_itself_through_the_terminating_enroll_listener_then_connects() {
    enrollment(Mode::Terminate, Client::Agentd);
}

#[test]
fn agentd_enrolls_by_itself_through_a_passthrough_listener_then_connects() {
    enrollment(Mode::Passthrough, Client::Agentd);
}

/// The agent-protocol health probe against the real remoted: it answers `#ping` with `#pong`
/// on TCP (framed) and on UDP (a datagram), so both probes keep `/health` at 200; once
/// remoted is stopped, both fail and `/health` goes to 503.
#[test]
fn agent_probes_over_tcp_and_udp_pass_against_real_remoted_and_fail_without_it() {
    let Some(build) = Build::find("agent-protocol health probes against real remoted") else {
        return;
    };
    let lab = Lab::new(&build);
    let mut m = Manager::new(&lab, "m1", &[]).with_protocol("tcp,udp");
    m.start();
    let probes = "health_check = \"agent\"\nhealth_check_interval = \"100ms\"\nhealth_check_timeout = \"500ms\"\nhealth_check_fall = 2\nhealth_check_rise = 1\n";
    let extra = format!(
        "[[listener]]\nname = \"agents-ping\"\nlisten = \"{}\"\n{probes}backends = [{{ address = \"{}\" }}]\n\
         [[listener]]\nname = \"agents-udp\"\nlisten = \"{}\"\nkind = \"udp\"\n{probes}backends = [{{ address = \"{}\" }}]\n",
        free_loopback(),
        m.remoted_addr(),
        free_loopback(),
        m.remoted_addr()
    );
    let proxy = start_proxy(&lab, &[&m], &extra);
    // Many probe rounds, every one answered.
    for _ in 0..30 {
        let (status, body) = proxy.get("/health");
        assert_eq!(status, 200, "{body}\n{}", proxy.process.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        proxy.unavailable_backends().is_empty(),
        "{:?}",
        proxy.unavailable_backends()
    );
    m.stop();
    assert!(
        wait_until(20 * SEC, || proxy.get("/health").0 == 503),
        "{}",
        proxy.process.logs()
    );
}
