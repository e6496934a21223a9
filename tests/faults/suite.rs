//! The fault suite: for each fault, a fresh cluster (2 routers, 3 gateways, HAProxy, a private
//! nats-server, the shared Cassandra), members that send at a steady rate across four rooms and
//! reconnect as real clients do, the fault in the middle of the load, then the checker. Prints
//! one table row per fault and fails if any row lost or duplicated anything.
//!
//! `CHATOY_FAULTS=kill-router,restart-nats` runs only those faults; `CHATOY_FAULT_LOAD_SECS`
//! (default 4) is how long the load runs before the fault and again after it heals. The same
//! load and checker run on the HA back end in `ha.rs`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::{self, Control, Member, MemberSpec, Seen};
use crate::ha::HaBackend;
use crate::harness::{run_command, Api, TempDir};
use crate::minicluster::{Cluster, Spec, FAILOVER_TIMEOUT};
use crate::proxy::TcpProxy;

/// Held by each suite while it runs: the two never share the machine.
pub(crate) static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ROOMS: usize = 4;
const SENDERS: usize = 8;
const GATEWAYS: usize = 3;
/// Messages per second per sender: 8 × 30 = 240 msg/s in all.
const RATE: f64 = 30.0;
const WINDOW: usize = 32;
/// The gateway whose NATS connection goes through the proxy.
const CUT_GATEWAY: usize = 3;
/// Longest wait for every message to be answered, and for every member to catch up.
const SETTLE_LIMIT: Duration = Duration::from_secs(90);

const GATEWAY_FLAGS: [&str; 8] = [
    "--send-timeout",
    SEND_TIMEOUT,
    "--msg-rate",
    "10000",
    "--msg-burst",
    "10000",
    "--drain-timeout",
    "5s",
];

/// How long a gateway waits for a router's answer before answering code 5.
const SEND_TIMEOUT: &str = "2s";
/// The same for the freeze: longer than the freeze, so that the answers of the frozen router's
/// writes reach their clients (a fence that let them through would show as lost messages).
const FREEZE_SEND_TIMEOUT: &str = "10s";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    KillGateway,
    KillRouter,
    FreezeRouter,
    CutGatewayNats,
    RollingRestart,
    RestartNats,
    CassandraDown,
    // The HA back end's (`ha.rs`).
    KillNats,
    KillCql,
    RollingCql,
    RollingNats,
    NatsAndCql,
    // The Kubernetes cluster's (`k8s.rs`).
    ScaleGateways,
    RolloutGateways,
    RolloutRouters,
}

const FAULTS: [Fault; 7] = [
    Fault::KillGateway,
    Fault::KillRouter,
    Fault::FreezeRouter,
    Fault::CutGatewayNats,
    Fault::RollingRestart,
    Fault::RestartNats,
    // Last: it stops the shared Cassandra.
    Fault::CassandraDown,
];

impl Fault {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Fault::KillGateway => "kill-gateway",
            Fault::KillRouter => "kill-router",
            Fault::FreezeRouter => "freeze-router",
            Fault::CutGatewayNats => "cut-gateway-nats",
            Fault::RollingRestart => "rolling-restart",
            Fault::RestartNats => "restart-nats",
            Fault::CassandraDown => "cassandra-down",
            Fault::KillNats => "kill-nats",
            Fault::KillCql => "kill-cql",
            Fault::RollingCql => "rolling-cql",
            Fault::RollingNats => "rolling-nats",
            Fault::NatsAndCql => "nats-and-cql",
            Fault::ScaleGateways => "k8s-scale-gateways",
            Fault::RolloutGateways => "k8s-rollout-gateways",
            Fault::RolloutRouters => "k8s-rollout-routers",
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Fault::KillGateway => "SIGKILL gateway 1 (restarted 3 s later)",
            Fault::KillRouter => "SIGKILL router 1 (restarted 3 s later)",
            Fault::FreezeRouter => {
                "SIGSTOP router 1 for 2 failover timeouts, then SIGCONT (then the other, up to 3 times, until one is deposed)"
            }
            Fault::CutGatewayNats => "gateway 3 cut from NATS for 5 s, sockets open",
            Fault::RollingRestart => "SIGTERM and restart each gateway in turn",
            Fault::RestartNats => "restart nats-server",
            Fault::CassandraDown => "stop Cassandra for 10 s, then start it",
            Fault::KillNats => "SIGKILL the NATS server leading the work stream, restart it 3 s later",
            Fault::KillCql => "SIGKILL CQL node 1, restart it 3 s later",
            Fault::RollingCql => "drain, stop and restart each CQL node in turn",
            Fault::RollingNats => "SIGTERM and restart each NATS server in turn",
            Fault::NatsAndCql => {
                "SIGKILL the work stream's NATS leader and CQL node 2 at once, restart both 3 s later"
            }
            Fault::ScaleGateways => "kubectl scale deployment chatoy-gateway 3 → 1 → 3",
            Fault::RolloutGateways => "kubectl rollout restart deployment chatoy-gateway",
            Fault::RolloutRouters => "kubectl rollout restart deployment chatoy-router",
        }
    }
}

/// Where a fault's cluster gets NATS and Cassandra.
pub(crate) enum Backend {
    /// The suite's own nats-server and the test command's Cassandra node.
    Single(PrivateNats),
    /// Three NATS servers and three CQL nodes (`deploy/local/ha`).
    Ha(HaBackend),
}

/// One row of the table.
pub(crate) struct Row {
    fault: Fault,
    acked: usize,
    stored_unacked: usize,
    rate: f64,
    lost: usize,
    duplicates: usize,
    disorder: usize,
    catch_up: Option<Duration>,
    reconnects: usize,
    resends: usize,
    codes: String,
    /// On the HA back end: what the processes saw (`cluster_events`).
    events: Option<String>,
    violations: Vec<String>,
}

impl Row {
    fn passed(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.disorder == 0 && self.violations.is_empty()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_suite() {
    let _machine = MACHINE.lock().await;
    let wanted = selected("CHATOY_FAULTS");
    let backend = Backend::Single(PrivateNats::start().await);
    let rows = run_faults(&FAULTS, wanted.as_ref(), &backend).await;
    assert!(!rows.is_empty(), "CHATOY_FAULTS named no known fault");
    report(&rows, "fault-table.md");
}

/// The faults a variable names (comma-separated); `None` if it is unset or empty.
pub(crate) fn selected(variable: &str) -> Option<HashSet<String>> {
    std::env::var(variable)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
}

/// Runs each of `faults` that `wanted` names (all if `None`), one fresh cluster each.
pub(crate) async fn run_faults(
    faults: &[Fault],
    wanted: Option<&HashSet<String>>,
    backend: &Backend,
) -> Vec<Row> {
    let load = load_duration();
    let mut rows = Vec::new();
    for &fault in faults {
        if wanted.is_some_and(|w| !w.contains(fault.name())) {
            continue;
        }
        eprintln!("== {}: {}", fault.name(), fault.describe());
        let row = run_fault(fault, backend, load).await;
        eprintln!("{}", table(std::slice::from_ref(&row)));
        rows.push(row);
    }
    rows
}

/// How long the load runs before a fault and again after it healed (`CHATOY_FAULT_LOAD_SECS`,
/// default 4).
pub(crate) fn load_duration() -> Duration {
    let secs = std::env::var("CHATOY_FAULT_LOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    Duration::from_secs(secs)
}

/// Prints the table, writes it to `target/tmp/<file>`, and fails if a row lost, duplicated or
/// misordered anything.
pub(crate) fn report(rows: &[Row], file: &str) {
    let table = table(rows);
    println!("\n{table}");
    if let Ok(dir) = std::env::var("CARGO_TARGET_TMPDIR") {
        let _ = std::fs::write(Path::new(&dir).join(file), &table);
    }
    let failed: Vec<String> = rows
        .iter()
        .filter(|row| !row.passed())
        .map(|row| format!("{}: {:?}", row.fault.name(), row.violations))
        .collect();
    assert!(
        failed.is_empty(),
        "faults that lost, duplicated or misordered: {failed:#?}"
    );
}

async fn run_fault(fault: Fault, backend: &Backend, load: Duration) -> Row {
    // One router first: the rooms' partitions get pinned to it once the load begins, and the
    // second, added then, stands by (so killing router 1 interrupts the rooms' sequencer).
    let mut flags = GATEWAY_FLAGS;
    if fault == Fault::FreezeRouter {
        flags[1] = FREEZE_SEND_TIMEOUT;
    }
    let (spec, proxy) = match backend {
        Backend::Single(nats) => {
            let proxy = TcpProxy::start(nats.addr).await;
            let spec = Spec::new(1, GATEWAYS, &flags)
                .nats(&nats.url)
                .gateway_nats(CUT_GATEWAY, &proxy.nats_url());
            (spec, Some(proxy))
        }
        Backend::Ha(ha) => (Spec::new(1, GATEWAYS, &flags).services(ha.services()), None),
    };
    let mut cluster = Cluster::start(spec).await;
    let balanced = format!("ws://{}/ws", cluster.lb_addr());
    let load_run = Load::start(cluster.api(), &balanced, |gateway| cluster.ws_url(gateway)).await;
    cluster.add_router().await;
    tokio::time::sleep(load.saturating_sub(load_run.elapsed())).await;
    let healed = inject(fault, &mut cluster, proxy.as_ref(), backend).await;
    // Everything acknowledged when the fault healed: how long until every member has it
    // (while the cluster is made whole again).
    let snapshot = load_run.acked();
    let (catch_up, ()) = tokio::join!(
        load_run.caught_up_after(&snapshot, healed),
        make_whole(fault, &mut cluster, backend)
    );
    tokio::time::sleep(load).await;
    let mut row = load_run.finish(fault, catch_up).await;
    if matches!(backend, Backend::Ha(_)) {
        row.events = Some(cluster_events(&cluster).await);
    }
    if fault == Fault::FreezeRouter {
        // A frozen router caught with deliveries in hand works on them under its old claim
        // once thawed, and the store must turn every such write down (`inject` freezes until
        // that happened, at most FREEZE_ATTEMPTS times).
        if deposed_total(&cluster).await < 1.0 {
            row.violations.push(format!(
                "no router was deposed in {FREEZE_ATTEMPTS} freezes: the fault did not exercise the fence"
            ));
        }
    }
    if !row.passed() {
        let path = std::env::temp_dir().join(format!("chatoy-fault-{}.log", fault.name()));
        let _ = std::fs::write(&path, cluster.stderr());
        eprintln!("{} failed; process logs in {}", fault.name(), path.display());
    }
    row
}

/// The suite's load on a running deployment: [`SENDERS`] senders across [`ROOMS`] rooms and one
/// listener per gateway, registered through `api`, each a real client ([`client::run`]) that
/// reconnects through the load balancer. Shared by the fault suite, the HA pass and the
/// Kubernetes checks (`k8s.rs`).
pub(crate) struct Load {
    api: Api,
    host_token: String,
    rooms: Vec<u64>,
    members: Vec<Member>,
    control: Arc<Control>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    began: Instant,
}

impl Load {
    /// Registers the members, connects each (first to `first_url(gateway)`, spreading them over
    /// [`GATEWAYS`] gateways; after any close to `balanced`), starts sending once all are
    /// connected and returns at the first acknowledgements.
    pub(crate) async fn start(api: Api, balanced: &str, first_url: impl Fn(usize) -> String) -> Load {
        let host = api.new_user("host").await;
        let mut rooms = Vec::new();
        for r in 0..ROOMS {
            rooms.push(api.create_room(&host.token, &format!("room {r}")).await);
        }
        let start = chatoy_protocol::Timestamp::now().0;
        let mut specs = Vec::new();
        for i in 0..SENDERS {
            let user = api.new_user(&format!("sender{i}")).await;
            let mine = vec![rooms[i % ROOMS], rooms[(i + 1) % ROOMS]];
            for room in &mine {
                api.join(&user.token, *room).await;
            }
            specs.push(MemberSpec {
                label: format!("sender {i}"),
                token: user.token,
                rooms: mine,
                first_url: first_url(i % GATEWAYS + 1),
                url: balanced.to_owned(),
                rate: RATE,
                window: WINDOW,
                start,
            });
        }
        for g in 1..=GATEWAYS {
            let user = api.new_user(&format!("listener{g}")).await;
            for room in &rooms {
                api.join(&user.token, *room).await;
            }
            specs.push(MemberSpec {
                label: format!("listener {g}"),
                token: user.token,
                rooms: rooms.clone(),
                first_url: first_url(g),
                url: balanced.to_owned(),
                rate: 0.0,
                window: 0,
                start,
            });
        }
        let control = Arc::new(Control::default());
        let members: Vec<Member> = specs
            .into_iter()
            .map(|spec| Member {
                spec,
                seen: Arc::new(Mutex::new(Seen::default())),
            })
            .collect();
        let tasks = members
            .iter()
            .map(|m| tokio::spawn(client::run(m.spec.clone(), m.seen.clone(), control.clone())))
            .collect();
        // Every member connected before the load starts.
        wait_until(Duration::from_secs(30), "every member to connect", || {
            members.iter().all(|m| m.seen.lock().expect("seen").connects > 0)
        })
        .await;
        control.sending.store(true, Ordering::SeqCst);
        let began = Instant::now();
        wait_until(Duration::from_secs(30), "the first acknowledgements", || {
            !acked_by_room(&members).is_empty()
        })
        .await;
        Load {
            api,
            host_token: host.token,
            rooms,
            members,
            control,
            tasks,
            began,
        }
    }

    /// How long the members have been sending.
    pub(crate) fn elapsed(&self) -> Duration {
        self.began.elapsed()
    }

    /// Every message acknowledged so far, by room: uuid → sent.
    pub(crate) fn acked(&self) -> HashMap<u64, HashMap<String, i64>> {
        acked_by_room(&self.members)
    }

    /// How long after `from` every member had every message of `want` (see [`caught_up_after`]).
    pub(crate) async fn caught_up_after(
        &self,
        want: &HashMap<u64, HashMap<String, i64>>,
        from: Instant,
    ) -> Option<Duration> {
        caught_up_after(&self.members, want, from).await
    }

    /// Stops sending, waits until every message is answered code 0 and every member has
    /// everything, stops the members and checks what they saw against history: `fault`'s row.
    pub(crate) async fn finish(self, fault: Fault, catch_up: Option<Duration>) -> Row {
        self.control.sending.store(false, Ordering::SeqCst);
        let load_secs = self.began.elapsed().as_secs_f64();
        wait_until(SETTLE_LIMIT, "every message to be answered code 0", || {
            self.members
                .iter()
                .all(|m| m.seen.lock().expect("seen").unanswered == 0)
        })
        .await;
        let all = acked_by_room(&self.members);
        let _ = caught_up_after(&self.members, &all, Instant::now()).await;
        self.control.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        let token = &self.host_token;
        check(
            fault,
            &self.api,
            token,
            &self.rooms,
            &self.members,
            load_secs,
            catch_up,
        )
        .await
    }
}

/// Freezes of the freeze-router fault at most, until a router is caught with work in hand.
const FREEZE_ATTEMPTS: usize = 3;

/// Writes the routers' stores turned down because a newer claim took their partition.
async fn deposed_total(cluster: &Cluster) -> f64 {
    let mut total = 0.0;
    for n in 1..=2 {
        let url = cluster.router_url(n);
        total += Api::new(url.clone(), vec![url])
            .metric("chatoy_router_events_total{event=\"deposed\"}")
            .await
            .unwrap_or(0.0);
    }
    total
}

/// Injects the fault; returns when it healed (the moment clients can be whole again: at
/// once for a killed process, whose clients and rooms move to the others).
async fn inject(fault: Fault, cluster: &mut Cluster, proxy: Option<&TcpProxy>, backend: &Backend) -> Instant {
    let (nats, proxy) = match (backend, proxy) {
        (Backend::Single(nats), Some(proxy)) => (nats, proxy),
        (Backend::Ha(ha), _) => return crate::ha::inject(fault, ha).await,
        (Backend::Single(_), None) => panic!("the single back end always has its proxy"),
    };
    match fault {
        Fault::KillGateway => {
            cluster.kill_gateway(1).await;
            Instant::now()
        }
        Fault::KillRouter => {
            cluster.kill_router(1).await;
            Instant::now()
        }
        Fault::FreezeRouter => {
            // Frozen, not dead: its partitions move to the other router while it may still hold
            // deliveries, writes and answers, which it carries on with once it thaws. Whether
            // it held any depends on where its pull request stood at the SIGSTOP; if it was not
            // deposed, the partitions' new owner is frozen next.
            for attempt in 0..FREEZE_ATTEMPTS {
                let n = 1 + attempt % 2;
                cluster.signal_router(n, "STOP");
                tokio::time::sleep(FAILOVER_TIMEOUT * 2).await;
                cluster.signal_router(n, "CONT");
                let deposed = async {
                    while deposed_total(cluster).await < 1.0 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                };
                // Not a limit on correctness: a late deposition still counts in the check.
                if tokio::time::timeout(Duration::from_secs(5), deposed)
                    .await
                    .is_ok()
                {
                    break;
                }
            }
            Instant::now()
        }
        Fault::CutGatewayNats => {
            proxy.cut();
            tokio::time::sleep(Duration::from_secs(5)).await;
            proxy.restore();
            Instant::now()
        }
        Fault::RollingRestart => {
            for n in 1..=GATEWAYS {
                let status = cluster.terminate_gateway(n, Duration::from_secs(20)).await;
                assert!(status.success(), "gateway {n} did not drain cleanly: {status}");
                cluster.restart_stopped().await;
            }
            Instant::now()
        }
        Fault::RestartNats => {
            nats_script(nats.run_dir.path(), "restart").await;
            Instant::now()
        }
        Fault::CassandraDown => {
            let mut cassandra = SharedCassandra::new();
            cassandra.run("stop").await;
            tokio::time::sleep(Duration::from_secs(10)).await;
            cassandra.run("start").await;
            Instant::now()
        }
        other => panic!("{} needs the HA back end", other.name()),
    }
}

/// How long a killed process stays down.
pub(crate) const DOWN_FOR: Duration = Duration::from_secs(3);

/// Starts a killed process again, [`DOWN_FOR`] after the kill.
async fn make_whole(fault: Fault, cluster: &mut Cluster, backend: &Backend) {
    if matches!(fault, Fault::KillGateway | Fault::KillRouter) {
        tokio::time::sleep(DOWN_FOR).await;
        cluster.restart_stopped().await;
    }
    if let Backend::Ha(ha) = backend {
        crate::ha::make_whole(ha).await;
    }
}

/// What the gateways and routers saw of a fault: the gateways' NATS reconnects, and the
/// routers' partition claims, deposed writes and failed store writes (their counters).
async fn cluster_events(cluster: &Cluster) -> String {
    let gateways = cluster.api();
    let routers: Vec<String> = (1..=cluster.router_count())
        .map(|n| cluster.router_url(n))
        .collect();
    let routers = Api::new(routers[0].clone(), routers);
    let event = |name: &str| format!("chatoy_router_events_total{{event=\"{name}\"}}");
    format!(
        "{} / {} / {} / {}",
        gateways
            .metric("chatoy_nats_reconnects_total")
            .await
            .unwrap_or(0.0),
        routers.metric(&event("claim")).await.unwrap_or(0.0),
        routers.metric(&event("deposed")).await.unwrap_or(0.0),
        routers.metric(&event("store_error")).await.unwrap_or(0.0),
    )
}

/// Every message answered code 0 so far, by room: uuid → sent.
fn acked_by_room(members: &[Member]) -> HashMap<u64, HashMap<String, i64>> {
    let mut rooms: HashMap<u64, HashMap<String, i64>> = HashMap::new();
    for member in members {
        for (uuid, (room, sent)) in &member.seen.lock().expect("seen").acked {
            rooms.entry(*room).or_default().insert(uuid.clone(), *sent);
        }
    }
    rooms
}

/// How long after `from` every member had every message of `want` in its rooms (its own
/// excepted); `None` if that did not happen within the settle limit.
async fn caught_up_after(
    members: &[Member],
    want: &HashMap<u64, HashMap<String, i64>>,
    from: Instant,
) -> Option<Duration> {
    let deadline = Instant::now() + SETTLE_LIMIT;
    loop {
        let done = members.iter().all(|member| {
            let seen = member.seen.lock().expect("seen");
            member.spec.rooms.iter().all(|room| {
                want.get(room).is_none_or(|messages| {
                    messages
                        .keys()
                        .all(|uuid| seen.have.contains(uuid) || seen.acked.contains_key(uuid))
                })
            })
        });
        if done {
            return Some(from.elapsed());
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Compares what every member saw with what the senders saw acknowledged and with history.
async fn check(
    fault: Fault,
    api: &Api,
    token: &str,
    rooms: &[u64],
    members: &[Member],
    load_secs: f64,
    catch_up: Option<Duration>,
) -> Row {
    let mut violations = Vec::new();
    let acked = acked_by_room(members);
    let mut duplicates = 0;
    let mut lost = 0;
    let mut disorder = 0;
    let mut stored_unacked = 0;
    let mut histories: HashMap<u64, Vec<(String, i64)>> = HashMap::new();
    for &room in rooms {
        let history = full_history(api, token, room).await;
        let mut stored: HashMap<&str, i64> = HashMap::new();
        for (uuid, sent) in &history {
            if stored.insert(uuid, *sent).is_some() {
                duplicates += 1;
            }
        }
        for pair in history.windows(2) {
            if pair[0].1 >= pair[1].1 {
                violations.push(format!("room {room}: history sent does not increase"));
            }
        }
        let want = acked.get(&room).cloned().unwrap_or_default();
        for (uuid, sent) in &want {
            match stored.get(uuid.as_str()) {
                None => {
                    lost += 1;
                    violations.push(format!("room {room}: acked {uuid} is not in history"));
                }
                Some(s) if s != sent => violations.push(format!(
                    "room {room}: {uuid} acked and stored with different sent"
                )),
                Some(_) => {}
            }
        }
        stored_unacked += history
            .iter()
            .filter(|(uuid, _)| !want.contains_key(uuid))
            .count();
        histories.insert(room, history);
    }
    let mut reconnects = 0;
    let mut resends = 0;
    let mut codes: HashMap<String, usize> = HashMap::new();
    for member in members {
        let seen = member.seen.lock().expect("seen");
        reconnects += seen.connects.saturating_sub(1);
        resends += seen.resends;
        for (code, n) in &seen.codes {
            *codes.entry(code.clone()).or_default() += n;
        }
        violations.extend(seen.violations.iter().cloned());
        for room in &member.spec.rooms {
            let history = &histories[room];
            let sent_of: HashMap<&str, i64> = history.iter().map(|(u, s)| (u.as_str(), *s)).collect();
            // The member's view: first arrival of each uuid, in arrival order (its own messages
            // it knew of when they were acknowledged, and may get back later through `since`).
            let mut firsts = Vec::new();
            let mut once = HashSet::new();
            for (uuid, r, sent) in &seen.received {
                if r != room || seen.acked.contains_key(uuid) {
                    continue;
                }
                match sent_of.get(uuid.as_str()) {
                    Some(stored) if stored != sent => {
                        duplicates += 1;
                        violations.push(format!(
                            "{}: {uuid} received with another sent",
                            member.spec.label
                        ));
                    }
                    None => violations.push(format!(
                        "{}: received {uuid}, which is not stored",
                        member.spec.label
                    )),
                    _ => {}
                }
                if once.insert(uuid.as_str()) {
                    firsts.push(*sent);
                }
            }
            if firsts.windows(2).any(|pair| pair[0] >= pair[1]) {
                disorder += 1;
                violations.push(format!(
                    "{}: room {room} arrived out of sent order",
                    member.spec.label
                ));
            }
            for (at, (uuid, sent)) in history.iter().enumerate() {
                if !once.contains(uuid.as_str()) && !seen.acked.contains_key(uuid) {
                    lost += 1;
                    if lost <= 20 {
                        // Where the hole is in what the member got: the arrivals around it.
                        let after = seen
                            .received
                            .iter()
                            .position(|(_, r, s)| r == room && s > sent)
                            .map_or("nothing later".to_owned(), |i| {
                                format!(
                                    "the next later one arrived as frame {i} of {}",
                                    seen.received.len()
                                )
                            });
                        violations.push(format!(
                            "{}: room {room}: never got {uuid} (sent {}, {} of {} in the room; {after}; {} connects)",
                            member.spec.label,
                            client::rfc3339(*sent),
                            at + 1,
                            history.len(),
                            seen.connects,
                        ));
                        violations.push(format!(
                            "{}: connections (frames before, since): {:?}",
                            member.spec.label, seen.connected_at
                        ));
                    }
                }
            }
        }
    }
    let acked_count: usize = acked.values().map(HashMap::len).sum();
    let mut codes: Vec<String> = codes.into_iter().map(|(code, n)| format!("{code}×{n}")).collect();
    codes.sort();
    Row {
        fault,
        acked: acked_count,
        stored_unacked,
        rate: acked_count as f64 / load_secs,
        lost,
        duplicates,
        disorder,
        catch_up,
        reconnects,
        resends,
        codes: codes.join(" "),
        events: None,
        violations,
    }
}

/// A room's whole history, oldest first (paged with `before`).
async fn full_history(api: &Api, token: &str, room: u64) -> Vec<(String, i64)> {
    let mut newest_first = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let page = api.history(token, room, before.as_deref(), Some(200)).await;
        let Some(oldest) = page.last() else { break };
        before = Some(oldest["sent"].as_str().expect("sent").to_owned());
        for message in &page {
            newest_first.push((
                message["uuid"].as_str().expect("uuid").to_owned(),
                crate::harness::ts(message["sent"].as_str().expect("sent")),
            ));
        }
    }
    newest_first.reverse();
    newest_first
}

fn table(rows: &[Row]) -> String {
    let events = rows.iter().any(|row| row.events.is_some());
    let mut out = String::from(
        "| fault | acked | msg/s | stored unacked | lost | duplicates | out of order | caught up after | reconnects | resends | codes seen |",
    );
    let mut rule = String::from("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    if events {
        out.push_str(" gateway NATS reconnects / claims / deposed / store errors |");
        rule.push_str("---|");
    }
    out.push('\n');
    out.push_str(&rule);
    out.push('\n');
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.fault.name(),
            row.acked,
            row.rate,
            row.stored_unacked,
            row.lost,
            row.duplicates,
            row.disorder,
            row.catch_up.map_or("not within 90 s".to_owned(), |d| format!(
                "{:.2} s",
                d.as_secs_f64()
            )),
            row.reconnects,
            row.resends,
            row.codes,
        ));
        if events {
            out.push_str(&format!(" {} |", row.events.as_deref().unwrap_or("")));
        }
        out.push('\n');
    }
    out
}

async fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The suite's own nats-server (so restarting it disturbs nothing else), from
/// `deploy/local/nats` in a private run directory; stopped on drop.
pub(crate) struct PrivateNats {
    run_dir: TempDir,
    url: String,
    addr: std::net::SocketAddr,
}

impl PrivateNats {
    async fn start() -> PrivateNats {
        let run_dir = TempDir::new();
        let output = nats_script(run_dir.path(), "start").await;
        let url = output
            .lines()
            .find_map(|line| line.strip_prefix("NATS_URL="))
            .unwrap_or_else(|| panic!("deploy/local/nats start printed no NATS_URL:\n{output}"))
            .trim()
            .to_owned();
        let addr = url
            .trim_start_matches("nats://")
            .parse()
            .unwrap_or_else(|err| panic!("NATS_URL {url}: {err}"));
        PrivateNats { run_dir, url, addr }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        let _ = Command::new(script("nats"))
            .arg("stop")
            .env("CHATOY_RUN_DIR", self.run_dir.path())
            .status();
    }
}

async fn nats_script(run_dir: &Path, action: &str) -> String {
    let mut command = Command::new(script("nats"));
    command.arg(action).env("CHATOY_RUN_DIR", run_dir);
    let log = run_dir.join(format!("nats-{action}.log"));
    let (status, output) =
        run_command(&mut command, &log, Duration::from_secs(300), "deploy/local/nats").await;
    assert!(
        status.success(),
        "deploy/local/nats {action} failed ({status}):\n{output}"
    );
    output
}

pub(crate) fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/local")
        .join(name)
}

/// The test command's Cassandra (`CHATOY_SERVICES_RUN_DIR`); started again on drop if this
/// suite stopped it and did not start it.
struct SharedCassandra {
    run_dir: PathBuf,
    logs: TempDir,
    stopped: bool,
}

impl SharedCassandra {
    fn new() -> SharedCassandra {
        let run_dir = std::env::var("CHATOY_SERVICES_RUN_DIR")
            .ok()
            .filter(|dir| !dir.trim().is_empty())
            .unwrap_or_else(|| {
                panic!(
                    "CHATOY_SERVICES_RUN_DIR is not set: the cassandra-down fault stops and starts \
                     the shared Cassandra and needs the run directory it was started with"
                )
            });
        SharedCassandra {
            run_dir: PathBuf::from(run_dir),
            logs: TempDir::new(),
            stopped: false,
        }
    }

    async fn run(&mut self, action: &str) {
        let mut command = Command::new(script("cassandra"));
        command.arg(action).env("CHATOY_RUN_DIR", &self.run_dir);
        let log = self.logs.path().join(format!("cassandra-{action}.log"));
        let (status, output) = run_command(
            &mut command,
            &log,
            Duration::from_secs(300),
            "deploy/local/cassandra",
        )
        .await;
        assert!(
            status.success(),
            "deploy/local/cassandra {action} failed ({status}):\n{output}"
        );
        self.stopped = action == "stop";
    }
}

impl Drop for SharedCassandra {
    fn drop(&mut self) {
        if self.stopped {
            let _ = Command::new(script("cassandra"))
                .arg("start")
                .env("CHATOY_RUN_DIR", &self.run_dir)
                .status();
        }
    }
}
