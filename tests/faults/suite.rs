//! The fault suite: for each fault, a fresh cluster (2 routers, 3 gateways, HAProxy, a private
//! nats-server, the shared Cassandra), members that send at a steady rate across four rooms and
//! reconnect as real clients do, the fault in the middle of the load, then the checker. Prints
//! one table row per fault and fails if any row lost or duplicated anything.
//!
//! `CHATOY_FAULTS=kill-router,restart-nats` runs only those faults; `CHATOY_FAULT_LOAD_SECS`
//! (default 4) is how long the load runs before the fault and again after it heals. The same
//! load and checker run on the HA back end in `ha.rs`.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use chatoy_testkit::minicluster::{Cluster, Spec, FAILOVER_TIMEOUT};
use chatoy_testkit::resilient::{check, Crowd, LoadPlan, Registered, Verdict};
use chatoy_testkit::services::SharedCassandra;
use chatoy_testkit::{run_checked, script, Api, TempDir};

use crate::ha::HaBackend;
use crate::proxy::TcpProxy;

/// Held by each suite while it runs: the two never share the machine.
pub(crate) static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const GATEWAYS: usize = 3;
/// Eight senders across four rooms, 30 messages a second each (240 msg/s in all), and a
/// listener per gateway.
const LOAD: LoadPlan = LoadPlan {
    rooms: 4,
    senders: 8,
    gateways: GATEWAYS,
    rate: 30.0,
    window: 32,
};
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
            Fault::RollingNats => "stop (lame duck mode) and restart each NATS server in turn",
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
    /// Acknowledged messages per second of load.
    rate: f64,
    catch_up: Option<Duration>,
    /// On the HA back end: what the processes saw (`cluster_events`).
    events: Option<String>,
    /// What the checker found.
    verdict: Verdict,
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
        .filter(|row| !row.verdict.passed())
        .map(|row| format!("{}: {:?}", row.fault.name(), row.verdict.violations))
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
            row.verdict.violations.push(format!(
                "no router was deposed in {FREEZE_ATTEMPTS} freezes: the fault did not exercise the fence"
            ));
        }
    }
    if !row.verdict.passed() {
        let path = std::env::temp_dir().join(format!("chatoy-fault-{}.log", fault.name()));
        let _ = std::fs::write(&path, cluster.stderr());
        eprintln!("{} failed; process logs in {}", fault.name(), path.display());
    }
    row
}

/// The suite's load on a running deployment: [`LOAD`]'s senders across its rooms and one
/// listener per gateway, registered through `api`, each a resilient client (testkit's
/// [`Crowd`]) that reconnects through the load balancer. Shared by the fault suite, the HA pass
/// and the Kubernetes checks (`k8s.rs`).
pub(crate) struct Load {
    api: Api,
    host_token: String,
    rooms: Vec<u64>,
    crowd: Crowd,
    began: Instant,
}

impl Load {
    /// Registers the members, connects each (first to `first_url(gateway)`, spreading them over
    /// [`GATEWAYS`] gateways; after any close to `balanced`) and starts sending once all are
    /// connected.
    pub(crate) async fn start(api: Api, balanced: &str, first_url: impl Fn(usize) -> String) -> Load {
        let Registered { host, rooms, specs } = LOAD.register(&api, balanced, first_url).await;
        // Every member connected before the load starts.
        let crowd = Crowd::start(specs).await;
        let began = Instant::now();
        crowd.start_sending().await;
        Load {
            api,
            host_token: host.token,
            rooms,
            crowd,
            began,
        }
    }

    /// How long the members have been sending.
    pub(crate) fn elapsed(&self) -> Duration {
        self.began.elapsed()
    }

    /// Every message acknowledged so far, by room: uuid → sent.
    pub(crate) fn acked(&self) -> chatoy_testkit::resilient::Acked {
        self.crowd.acked_by_room()
    }

    /// How long after `from` every member had every message of `want`.
    pub(crate) async fn caught_up_after(
        &self,
        want: &chatoy_testkit::resilient::Acked,
        from: Instant,
    ) -> Option<Duration> {
        self.crowd.caught_up_after(want, from, SETTLE_LIMIT).await
    }

    /// Stops sending, waits until every message is answered code 0 and every member has
    /// everything, stops the members and checks what they saw against history: `fault`'s row.
    pub(crate) async fn finish(mut self, fault: Fault, catch_up: Option<Duration>) -> Row {
        self.crowd.stop_sending();
        let load_secs = self.began.elapsed().as_secs_f64();
        self.crowd.until_answered(SETTLE_LIMIT).await;
        let all = self.crowd.acked_by_room();
        let _ = self
            .crowd
            .caught_up_after(&all, Instant::now(), SETTLE_LIMIT)
            .await;
        self.crowd.stop().await;
        let verdict = check(&self.api, &self.host_token, &self.rooms, &self.crowd.members).await;
        Row {
            fault,
            rate: verdict.acked as f64 / load_secs,
            catch_up,
            events: None,
            verdict,
        }
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
            cassandra.stop().await;
            tokio::time::sleep(Duration::from_secs(10)).await;
            cassandra.start().await;
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
        "{} / {} / {} / {} / {}",
        gateways
            .metric("chatoy_nats_reconnects_total")
            .await
            .unwrap_or(0.0),
        routers.metric(&event("claim")).await.unwrap_or(0.0),
        routers.metric(&event("deposed")).await.unwrap_or(0.0),
        routers.metric(&event("store_error")).await.unwrap_or(0.0),
        routers
            .metric("chatoy_router_messages_total{outcome=\"unavailable\"}")
            .await
            .unwrap_or(0.0),
    )
}

fn table(rows: &[Row]) -> String {
    let events = rows.iter().any(|row| row.events.is_some());
    let mut out = String::from(
        "| fault | acked | msg/s | stored unacked | lost | duplicates | out of order | caught up after | reconnects | resends | codes seen |",
    );
    let mut rule = String::from("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    if events {
        out.push_str(" gateway NATS reconnects / claims / deposed / store errors / router code 5 |");
        rule.push_str("---|");
    }
    out.push('\n');
    out.push_str(&rule);
    out.push('\n');
    for row in rows {
        let verdict = &row.verdict;
        out.push_str(&format!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.fault.name(),
            verdict.acked,
            row.rate,
            verdict.stored_unacked,
            verdict.lost,
            verdict.duplicates,
            verdict.disorder,
            row.catch_up.map_or("not within 90 s".to_owned(), |d| format!(
                "{:.2} s",
                d.as_secs_f64()
            )),
            verdict.reconnects,
            verdict.resends,
            verdict.codes,
        ));
        if events {
            out.push_str(&format!(" {} |", row.events.as_deref().unwrap_or("")));
        }
        out.push('\n');
    }
    out
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
    let what = format!("deploy/local/nats {action}");
    run_checked(&mut command, &log, Duration::from_secs(300), &what).await
}
