//! A private Chatoy cluster for one test, on the shared NATS and Cassandra the test command
//! started (`CHATOY_NATS_URL`, `CHATOY_CQL_NODES`) or on other services the test names (the
//! fault suite's HA back end): a fresh keyspace migrated with the services' replication factor
//! (RF 1 on the shared node), a fresh NATS prefix, routers and gateways as real `chatoy` processes, and a private HAProxy in front
//! of the gateways (`deploy/local/haproxy` with its own `CHATOY_RUN_DIR`). Every process is
//! started with explicit flags and with no inherited `CHATOY_*` variable but `CHATOY_LOG`.
//! Dropping the cluster kills them all, stops the HAProxy and gives back what it took of the
//! shared services: its keyspace is dropped and its NATS stream deleted.

mod cleanup;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub use cleanup::{delete_streams, drop_keyspace};

use crate::api::Api;
use crate::process::{chatoy_binary, run_command, script, scrub_env, Process, TempDir};
use crate::server::test_flags;
use crate::services::Services;
use crate::util::random_hex;
use cleanup::on_any;

/// What a gateway prints once it serves.
const GATEWAY_READY: &str = "chatoy listening on http://127.0.0.1:";

/// What a router prints once it consumes its partitions.
const ROUTER_READY: &str = "chatoy router health on http://127.0.0.1:";

/// How long a dead router keeps its partitions: short, so tests that stop routers move on.
pub const FAILOVER_TIMEOUT: Duration = Duration::from_secs(2);

/// The partitions of every cluster's work stream.
pub const PARTITIONS: u32 = 16;
/// How long any process may take to start (Cassandra answers slowly on a busy machine).
const START_LIMIT: Duration = Duration::from_secs(60);

/// The shape of a mini-cluster.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Routers to start.
    pub routers: usize,
    /// Gateways to start (each behind the HAProxy).
    pub gateways: usize,
    /// Extra flags of every gateway (the test's flags).
    pub gateway_flags: Vec<String>,
    /// Another NATS than the shared one, for every process.
    pub nats_url: Option<String>,
    /// Gateways (1-based) that reach NATS at another URL (a proxy a test can cut).
    pub gateway_nats: Vec<(usize, String)>,
    /// Other services than the shared ones.
    pub services: Option<Services>,
}

impl Spec {
    /// `routers` routers and `gateways` gateways with `flags`.
    pub fn new(routers: usize, gateways: usize, flags: &[&str]) -> Spec {
        Spec {
            routers,
            gateways,
            gateway_flags: flags.iter().map(|flag| flag.to_string()).collect(),
            nats_url: None,
            gateway_nats: Vec::new(),
            services: None,
        }
    }

    /// Runs on `services` instead of the shared ones.
    pub fn services(mut self, services: Services) -> Spec {
        self.services = Some(services);
        self
    }

    /// Every process uses the NATS at `url` instead of the shared one.
    pub fn nats(mut self, url: &str) -> Spec {
        self.nats_url = Some(url.to_owned());
        self
    }

    /// Gateway `n` reaches NATS at `url` (which leads to the cluster's NATS).
    pub fn gateway_nats(mut self, n: usize, url: &str) -> Spec {
        self.gateway_nats.push((n, url.to_owned()));
        self
    }
}

/// Runs `chatoy migrate` for `keyspace` with the services' replication factor; returns its exit
/// status and output.
pub async fn migrate(services: &Services, keyspace: &str, log: &Path) -> (ExitStatus, String) {
    let mut command = Command::new(chatoy_binary());
    command.args([
        "migrate",
        "--keyspace",
        keyspace,
        "--replication-factor",
        &services.replication_factor.to_string(),
        "--cql-nodes",
        &services.cql_nodes,
    ]);
    scrub_env(&mut command);
    run_command(&mut command, log, Duration::from_secs(180), "chatoy migrate").await
}

/// Gives `flag` (already among `args`) another value.
fn set_flag(args: &mut [String], flag: &str, value: &str) {
    let at = args.iter().position(|arg| arg == flag).expect(flag) + 1;
    args[at] = value.to_owned();
}

/// A running mini-cluster. Gateway and router numbers are 1-based, in start order; gateway `n`
/// is also `/ws?gateway=n` on the HAProxy.
pub struct Cluster {
    services: Services,
    keyspace: String,
    prefix: String,
    gateway_flags: Vec<String>,
    gateway_nats: Vec<(usize, String)>,
    routers: Vec<Process>,
    gateways: Vec<Process>,
    /// The HAProxy's port (fixed for the cluster's life).
    lb_port: u16,
    /// Which gateway the next alternating WebSocket goes to.
    next_socket: AtomicUsize,
    /// Logs of every process and the HAProxy's run directory; kept if the test fails.
    dir: TempDir,
}

impl Cluster {
    /// Migrates a fresh keyspace, then starts the routers, the gateways and the HAProxy, and
    /// returns once every gateway answers through it.
    pub async fn start(spec: Spec) -> Cluster {
        let services = spec.services.clone().unwrap_or_else(Services::from_env);
        let keyspace = format!("e2e_{}", random_hex(12));
        let log = std::env::temp_dir().join(format!("chatoy-migrate-{keyspace}.log"));
        let (status, output) = migrate(&services, &keyspace, &log).await;
        let _ = std::fs::remove_file(&log);
        if !status.success() {
            let _ = drop_keyspace(&services.cql_nodes, &keyspace);
        }
        assert!(
            status.success(),
            "chatoy migrate {keyspace} failed ({status}):\n{output}"
        );
        Cluster::start_on(&keyspace, spec).await
    }

    /// Starts the processes of `spec` on an already migrated keyspace, with a fresh NATS
    /// prefix. The keyspace is dropped with the cluster.
    pub async fn start_on(keyspace: &str, spec: Spec) -> Cluster {
        let mut services = spec.services.unwrap_or_else(Services::from_env);
        if let Some(url) = &spec.nats_url {
            services.nats_url = url.clone();
        }
        let mut cluster = Cluster {
            services,
            gateway_nats: spec.gateway_nats,
            keyspace: keyspace.to_owned(),
            prefix: format!("e2e{}", random_hex(12)),
            gateway_flags: spec.gateway_flags,
            routers: Vec::new(),
            gateways: Vec::new(),
            lb_port: 0,
            next_socket: AtomicUsize::new(0),
            dir: TempDir::new(),
        };
        for _ in 0..spec.routers {
            let router = cluster.router_process();
            cluster.routers.push(router);
        }
        for _ in 0..spec.gateways {
            let gateway = cluster.gateway_process();
            cluster.gateways.push(gateway);
        }
        let starts = cluster
            .routers
            .iter_mut()
            .map(|p| (p, ROUTER_READY))
            .chain(cluster.gateways.iter_mut().map(|p| (p, GATEWAY_READY)))
            .map(|(process, ready)| process.start(ready, START_LIMIT));
        futures_util::future::join_all(starts).await;
        for n in 1..=cluster.routers.len() {
            cluster.wait_router_ready(n).await;
        }
        cluster.balance().await;
        cluster
    }

    fn common_args(&self, role: &str, name: &str) -> Vec<String> {
        [
            role,
            "--keyspace",
            &self.keyspace,
            "--nats-prefix",
            &self.prefix,
            "--nats-url",
            &self.services.nats_url,
            "--cql-nodes",
            &self.services.cql_nodes,
            "--partitions",
            &PARTITIONS.to_string(),
            "--failover-timeout",
            &format!("{}s", FAILOVER_TIMEOUT.as_secs()),
            "--node-id",
            name,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(self.services.flags.iter().cloned())
        .collect()
    }

    fn router_process(&self) -> Process {
        let name = format!("router-{}", self.routers.len() + 1);
        let mut args = self.common_args("router", &name);
        args.extend(["--drain-timeout", "10s"].map(String::from));
        Process::new(&name, args, self.dir.path().join(format!("{name}.log")))
    }

    fn gateway_process(&self) -> Process {
        let n = self.gateways.len() + 1;
        let name = format!("gateway-{n}");
        let mut args = self.common_args("gateway", &name);
        if let Some((_, url)) = self.gateway_nats.iter().find(|(gateway, _)| *gateway == n) {
            set_flag(&mut args, "--nats-url", url);
        }
        let extra: Vec<&str> = self.gateway_flags.iter().map(String::as_str).collect();
        args.extend(test_flags(&extra));
        Process::new(&name, args, self.dir.path().join(format!("{name}.log")))
    }

    /// Points the HAProxy at every gateway (in number order, running or not) and waits until
    /// each running one answers `/readyz` through it, pinned and balanced.
    async fn balance(&mut self) {
        let mut command = Command::new(script("haproxy"));
        command.arg("start");
        command.args(self.gateways.iter().map(|g| format!("127.0.0.1:{}", g.port())));
        scrub_env(&mut command);
        command.env("CHATOY_RUN_DIR", self.lb_run_dir());
        let (status, output) = run_command(
            &mut command,
            &self.dir.path().join("haproxy-start.log"),
            Duration::from_secs(30),
            "deploy/local/haproxy start",
        )
        .await;
        assert!(
            status.success(),
            "deploy/local/haproxy start failed ({status}):\n{output}"
        );
        let port = output
            .lines()
            .filter_map(|line| line.strip_prefix("CHATOY_URL=http://127.0.0.1:"))
            .next_back()
            .and_then(|port| port.trim().parse::<u16>().ok())
            .unwrap_or_else(|| panic!("deploy/local/haproxy printed no CHATOY_URL:\n{output}"));
        assert!(
            self.lb_port == 0 || self.lb_port == port,
            "the HAProxy moved from port {} to {port}",
            self.lb_port
        );
        self.lb_port = port;
        for n in 1..=self.gateways.len() {
            if self.gateways[n - 1].is_running() {
                self.wait_routable(n).await;
            }
        }
        let base = self.base_url();
        wait_ok(&format!("{base}/readyz"), "the balanced gateways").await;
    }

    fn lb_run_dir(&self) -> PathBuf {
        self.dir.path().join("haproxy-run")
    }

    /// Waits until `/readyz?gateway=n` answers 200 through the HAProxy.
    async fn wait_routable(&self, n: usize) {
        let url = format!("{}/readyz?gateway={n}", self.base_url());
        wait_ok(&url, &format!("gateway {n} through the HAProxy")).await;
    }

    /// Waits until every started gateway answers `/readyz` through the HAProxy again, pinned and
    /// balanced (after an outage of what they depend on).
    pub async fn wait_serving(&self) {
        for n in 1..=self.gateways.len() {
            if self.gateways[n - 1].is_started() {
                self.wait_routable(n).await;
            }
        }
        wait_ok(&format!("{}/readyz", self.base_url()), "the balanced gateways").await;
    }

    async fn wait_router_ready(&self, n: usize) {
        let url = format!("http://127.0.0.1:{}/readyz", self.routers[n - 1].port());
        wait_ok(&url, &format!("router {n}")).await;
    }

    /// The cluster's keyspace and the CQL nodes it lives on.
    pub fn keyspace(&self) -> (&str, &str) {
        (&self.keyspace, &self.services.cql_nodes)
    }

    /// The HAProxy: `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.lb_port)
    }

    /// The HAProxy's address, `127.0.0.1:PORT`.
    pub fn lb_addr(&self) -> String {
        format!("127.0.0.1:{}", self.lb_port)
    }

    /// The path of a WebSocket pinned to gateway `n`.
    pub fn ws_path(&self, n: usize) -> String {
        assert!((1..=self.gateways.len()).contains(&n), "no gateway {n}");
        format!("/ws?gateway={n}")
    }

    /// The path of the next WebSocket: gateways take turns, so every room's sockets are spread
    /// over all of them.
    pub fn next_ws_path(&self) -> String {
        let turn = self.next_socket.fetch_add(1, Ordering::Relaxed);
        self.ws_path(turn % self.gateways.len() + 1)
    }

    /// `ws://` through the HAProxy, pinned to gateway `n`.
    pub fn ws_url(&self, n: usize) -> String {
        format!("ws://{}{}", self.lb_addr(), self.ws_path(n))
    }

    /// Router `n`'s probes and metrics.
    pub fn router_url(&self, n: usize) -> String {
        format!("http://127.0.0.1:{}", self.routers[n - 1].port())
    }

    /// Gateway `n` itself, bypassing the HAProxy.
    pub fn gateway_url(&self, n: usize) -> String {
        format!("http://127.0.0.1:{}", self.gateways[n - 1].port())
    }

    /// How many routers the cluster has (running or not).
    pub fn router_count(&self) -> usize {
        self.routers.len()
    }

    /// How many gateways the cluster has (running or not).
    pub fn gateway_count(&self) -> usize {
        self.gateways.len()
    }

    /// An HTTP client through the HAProxy; metrics are summed over every running gateway.
    pub fn api(&self) -> Api {
        let metrics = (1..=self.gateways.len())
            .filter(|n| self.gateways[n - 1].is_started())
            .map(|n| self.gateway_url(n))
            .collect();
        Api::new(self.base_url(), metrics)
    }

    /// Whether every router and gateway still runs.
    pub fn is_running(&mut self) -> bool {
        self.routers
            .iter_mut()
            .chain(self.gateways.iter_mut())
            .all(Process::is_running)
    }

    /// Everything every process wrote to stderr, each under a header.
    pub fn stderr(&self) -> String {
        self.routers
            .iter()
            .chain(&self.gateways)
            .map(|p| format!("==== {} ====\n{}", p.name(), p.stderr()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGTERMs every running gateway at once and then every router, waiting (at most `limit`
    /// each) for them to exit; returns every exit status, gateways first.
    pub async fn terminate_all(&mut self, limit: Duration) -> Vec<(String, ExitStatus)> {
        let mut statuses = self.terminate_gateways(limit).await;
        statuses.extend(self.terminate_routers(limit).await);
        statuses
    }

    /// SIGTERMs every running gateway at once and waits for them.
    pub async fn terminate_gateways(&mut self, limit: Duration) -> Vec<(String, ExitStatus)> {
        terminate_each(&mut self.gateways, limit).await
    }

    /// SIGTERMs every running router at once and waits for them.
    pub async fn terminate_routers(&mut self, limit: Duration) -> Vec<(String, ExitStatus)> {
        terminate_each(&mut self.routers, limit).await
    }

    /// SIGKILLs gateway `n`.
    pub async fn kill_gateway(&mut self, n: usize) {
        self.gateways[n - 1].kill().await;
    }

    /// SIGTERMs gateway `n` and waits (at most `limit`) for it to drain and exit.
    pub async fn terminate_gateway(&mut self, n: usize, limit: Duration) -> ExitStatus {
        self.gateways[n - 1].terminate(limit).await
    }

    /// Sends a signal (`STOP`, `CONT`, …) to router `n`.
    pub fn signal_router(&self, n: usize, signal: &str) {
        self.routers[n - 1].signal(signal);
    }

    /// SIGKILLs router `n`.
    pub async fn kill_router(&mut self, n: usize) {
        self.routers[n - 1].kill().await;
    }

    /// Starts every stopped router and gateway again (gateways on their old ports when free)
    /// and waits until all serve.
    pub async fn restart_stopped(&mut self) {
        let mut moved = false;
        for n in 1..=self.routers.len() {
            if !self.routers[n - 1].is_running() {
                self.routers[n - 1].start(ROUTER_READY, START_LIMIT).await;
                self.wait_router_ready(n).await;
            }
        }
        for gateway in &mut self.gateways {
            if !gateway.is_running() {
                let before = gateway.port();
                gateway.start(GATEWAY_READY, START_LIMIT).await;
                moved |= gateway.port() != before;
            }
        }
        if moved {
            self.balance().await;
        } else {
            for n in 1..=self.gateways.len() {
                self.wait_routable(n).await;
            }
            wait_ok(&format!("{}/readyz", self.base_url()), "the balanced gateways").await;
        }
    }

    /// Runs one more `role` process (`gateway` or `router`) with the cluster's flags but
    /// `--partitions partitions`, until it exits by itself (at most [`START_LIMIT`]); returns how
    /// it exited and its output.
    pub async fn run_with_partitions(&self, role: &str, partitions: u32) -> (ExitStatus, String) {
        let name = format!("{role}-partitions-{partitions}");
        let mut args = self.common_args(role, &name);
        set_flag(&mut args, "--partitions", &partitions.to_string());
        args.extend(["--listen", "127.0.0.1:0"].map(String::from));
        let mut command = Command::new(chatoy_binary());
        command.args(&args);
        scrub_env(&mut command);
        let log = self.dir.path().join(format!("{name}.log"));
        run_command(&mut command, &log, START_LIMIT, &name).await
    }

    /// Starts one more router; returns its number.
    pub async fn add_router(&mut self) -> usize {
        let mut router = self.router_process();
        router.start(ROUTER_READY, START_LIMIT).await;
        self.routers.push(router);
        let n = self.routers.len();
        self.wait_router_ready(n).await;
        n
    }

    /// Starts one more gateway with the cluster's gateway flags, adds it to the HAProxy (a soft
    /// reload: open sockets stay) and waits until it answers through it; returns its number.
    pub async fn add_gateway(&mut self) -> usize {
        let mut gateway = self.gateway_process();
        gateway.start(GATEWAY_READY, START_LIMIT).await;
        self.gateways.push(gateway);
        self.balance().await;
        self.gateways.len()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for process in self.gateways.iter_mut().chain(self.routers.iter_mut()) {
            process.kill_now();
        }
        if self.lb_port != 0 {
            let mut command = Command::new(script("haproxy"));
            command.arg("stop");
            scrub_env(&mut command);
            command.env("CHATOY_RUN_DIR", self.lb_run_dir());
            let stopped = command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if !matches!(stopped, Ok(status) if status.success()) {
                eprintln!(
                    "could not stop the HAProxy of {}: {stopped:?}",
                    self.lb_run_dir().display()
                );
            }
        }
        // The shared services outlive the test: give back what it took there. A keyspace costs
        // the single Cassandra node heap for as long as it exists (a few dozen exhaust 1 GB).
        // Any node or server will do (one of several may be down after a fault).
        let subject = format!("{}.msg.>", self.prefix);
        if let Err(err) = on_any(&self.services.cql_nodes, |node| {
            drop_keyspace(node, &self.keyspace)
        }) {
            eprintln!("could not drop keyspace {}: {err}", self.keyspace);
        }
        if let Err(err) = on_any(&self.services.nats_url, |url| delete_streams(url, &subject)) {
            eprintln!("could not delete the NATS streams of {}: {err}", self.prefix);
        }
    }
}

async fn terminate_each(processes: &mut [Process], limit: Duration) -> Vec<(String, ExitStatus)> {
    let running: Vec<&mut Process> = processes.iter_mut().filter(|p| p.is_started()).collect();
    let names: Vec<String> = running.iter().map(|p| p.name().to_owned()).collect();
    let statuses = futures_util::future::join_all(running.into_iter().map(|p| p.terminate(limit))).await;
    names.into_iter().zip(statuses).collect()
}

/// Polls `url` until it answers 200 (at most 30 s).
pub async fn wait_ok(url: &str, what: &str) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("build reqwest client");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let last = match http.get(url).send().await {
            Ok(response) if response.status().as_u16() == 200 => return,
            Ok(response) => format!("status {}", response.status()),
            Err(err) => err.to_string(),
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not become ready at {url} within 30 s (last answer: {last})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
