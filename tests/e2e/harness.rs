//! The fixtures every end-to-end test stands on: the server under test (a `chatoy standalone`
//! process on a fresh data directory, or with `CHATOY_E2E_MODE=cluster` a private mini-cluster of
//! a router and two gateways behind HAProxy on the shared NATS and Cassandra, or with
//! `CHATOY_E2E_MODE=external` a deployment at `CHATOY_E2E_URL` that the suite did not start), an HTTP client
//! for its API, a tungstenite WebSocket client and a raw one that can put any bytes on the wire,
//! and the exact-shape assertions shared by all tests.

use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::minicluster::{scrub_env, Cluster, Spec, FAILOVER_TIMEOUT};

/// How long any single expected event may take before the test fails instead of hanging.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// Flags every test server gets: cheap password hashing keeps logins fast.
/// Flags every test server gets unless the test sets them itself: cheap password hashing, and
/// no registration limit (tests register users as fast as the machine allows).
const TEST_DEFAULTS: [&str; 6] = [
    "--argon2-memory-kib",
    "1024",
    "--argon2-iterations",
    "1",
    "--register-rate-per-ip",
    "0",
];

/// [`TEST_DEFAULTS`] without the flags `extra` gives, then `extra`.
pub(crate) fn test_flags(extra: &[&str]) -> Vec<String> {
    let mut flags: Vec<String> = TEST_DEFAULTS
        .chunks(2)
        .filter(|pair| !extra.contains(&pair[0]))
        .flatten()
        .map(|s| s.to_string())
        .collect();
    flags.extend(extra.iter().map(|s| s.to_string()));
    flags
}

/// A password that satisfies the 8–128 byte rule.
pub(crate) const PASSWORD: &str = "correct horse battery";

/// What `chatoy standalone` prints once it serves.
const LISTENING: &str = "chatoy listening on http://127.0.0.1:";

/// Awaits `fut`, failing the test with `what` if it takes longer than `limit`.
pub(crate) async fn within<T>(limit: Duration, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// A random lower-case hex string of `len` characters.
pub(crate) fn random_hex(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
        .collect()
}

/// A fresh v4 uuid in the canonical hyphenated form.
pub(crate) fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A directory under the system temp dir, removed with everything in it on drop, unless the
/// test is failing: then it is kept (and named on stderr) for its logs.
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a directory with a random name.
    pub(crate) fn new() -> TempDir {
        let path = std::env::temp_dir().join(format!("chatoy-e2e-{}", random_hex(16)));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("logs and data of the failed test kept in {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Waits (at most `limit`) for `child` to exit, without blocking the runtime; past the limit it
/// kills the child and fails the test.
pub(crate) async fn wait_exit(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {limit:?} (killed)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a command to its end (at most `limit`) with stdout and stderr written to `log`;
/// returns its exit status and everything it wrote.
pub(crate) async fn run_command(
    command: &mut Command,
    log: &Path,
    limit: Duration,
    what: &str,
) -> (ExitStatus, String) {
    let out = fs::File::create(log).expect("create command log");
    let err = out.try_clone().expect("clone command log");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {what}: {err}"));
    let status = wait_exit(&mut child, limit, what).await;
    let output = fs::read(log)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    (status, output)
}

/// One `chatoy` process (`standalone`, `gateway` or `router`) that can be stopped and started
/// again with the same arguments; it listens on `--listen 127.0.0.1:PORT` and its stderr goes
/// to a log file that every incarnation appends to.
pub(crate) struct Process {
    name: String,
    /// Every argument but `--listen`, subcommand first.
    args: Vec<String>,
    /// The port of the last start (0 before the first).
    port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// A process that is not started yet.
    pub(crate) fn new(name: &str, args: Vec<String>, log: PathBuf) -> Process {
        Process {
            name: name.to_owned(),
            args,
            port: 0,
            child: None,
            log,
        }
    }

    /// Starts the process and waits (at most `limit`) for its first stdout line, which must be
    /// `ready` followed by the port. It listens on its previous port if that is still free, so a
    /// restart keeps its address; otherwise on a new one.
    pub(crate) async fn start(&mut self, ready: &str, limit: Duration) {
        // A process that died by itself is started again like a stopped one.
        if let Some(child) = self.child.as_mut() {
            let exited = child.try_wait().expect("try_wait").is_some();
            assert!(exited, "{} is already running", self.name);
            self.child = None;
        }
        if self.port != 0 && self.try_start(self.port, ready, limit).await.is_ok() {
            return;
        }
        if let Err(why) = self.try_start(0, ready, limit).await {
            panic!("{why}; stderr of {}:\n{}", self.name, self.stderr());
        }
    }

    async fn try_start(&mut self, port: u16, ready: &str, limit: Duration) -> Result<(), String> {
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open stderr log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_chatoy"));
        command
            .args(&self.args)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        scrub_env(&mut command);
        let mut child = command.spawn().expect("spawn chatoy");
        let stdout = child.stdout.take().expect("piped stdout");
        let (ready_tx, ready_rx) = oneshot::channel::<String>();
        // Every stdout line also goes to the log, so the log is the process's whole output.
        let mut tee = fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .expect("open stderr log");
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(tee, "{line}");
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match tokio::time::timeout(limit, ready_rx).await {
            Ok(Ok(line)) => line,
            Ok(Err(_)) => {
                let _ = wait_exit(&mut child, WAIT, &self.name).await;
                return Err(format!(
                    "{} exited before printing its ready line (on port {port})",
                    self.name
                ));
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} printed no ready line within {limit:?}", self.name));
            }
        };
        self.child = Some(child);
        self.port = line
            .strip_prefix(ready)
            .and_then(|port| port.trim().parse::<u16>().ok())
            .unwrap_or_else(|| panic!("unexpected first stdout line of {}: {line:?}", self.name));
        Ok(())
    }

    /// The name used in logs and errors (`gateway-2`).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The port it listens on (or last listened on).
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Whether it was started and not stopped through this handle since.
    pub(crate) fn is_started(&self) -> bool {
        self.child.is_some()
    }

    /// Whether it is still running.
    pub(crate) fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Everything every incarnation wrote to stderr (and to stdout).
    pub(crate) fn stderr(&self) -> String {
        fs::read(&self.log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Sends SIGTERM and waits (at most `limit`) for the process to exit.
    pub(crate) async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let child = self
            .child
            .as_mut()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.name);
        let what = format!("{} after SIGTERM", self.name);
        let status = wait_exit(child, limit, &what).await;
        self.child = None;
        status
    }

    /// Sends a signal (`STOP`, `CONT`, …) to the running process.
    pub(crate) fn signal(&self, signal: &str) {
        let child = self
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    /// Sends SIGKILL and waits for the process to be gone.
    pub(crate) async fn kill(&mut self) {
        let child = self
            .child
            .as_mut()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        child.kill().expect("SIGKILL");
        wait_exit(child, WAIT, &self.name).await;
        self.child = None;
    }

    /// Kills the process if it runs, blocking (for `Drop`).
    pub(crate) fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// How the suite runs, from `CHATOY_E2E_MODE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Unset or `standalone`: one `chatoy standalone` process per test.
    Standalone,
    /// `cluster`: a private mini-cluster per test on the shared NATS and Cassandra.
    Cluster,
    /// `external`: a deployment the suite does not start, reached at `CHATOY_E2E_URL` (its load
    /// balancer or Service), shared by every test (scripts/k8s-e2e: a Kubernetes cluster).
    External,
}

/// The mode this run tests; an unknown value fails loudly.
pub(crate) fn mode() -> Mode {
    match std::env::var("CHATOY_E2E_MODE").as_deref() {
        Err(std::env::VarError::NotPresent) | Ok("" | "standalone") => Mode::Standalone,
        Ok("cluster") => Mode::Cluster,
        Ok("external") => Mode::External,
        other => panic!("CHATOY_E2E_MODE must be `standalone`, `cluster` or `external`, not {other:?}"),
    }
}

/// How many mini-clusters may run at once (`CHATOY_E2E_CLUSTER_JOBS`, default 2): each is three
/// processes besides the shared Cassandra, so more tests in parallel than this only slow every
/// one of them down on a small machine.
fn cluster_slots() -> Arc<Semaphore> {
    static SLOTS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    SLOTS
        .get_or_init(|| {
            let jobs = std::env::var("CHATOY_E2E_CLUSTER_JOBS")
                .ok()
                .map(|jobs| {
                    jobs.parse::<usize>().ok().filter(|n| *n > 0).unwrap_or_else(|| {
                        panic!("CHATOY_E2E_CLUSTER_JOBS={jobs:?} is not a positive number")
                    })
                })
                .unwrap_or(2);
            Arc::new(Semaphore::new(jobs))
        })
        .clone()
}

/// The server under test, whatever the mode: one `chatoy standalone` process on its own data
/// directory, or a mini-cluster (one router, two gateways, HAProxy) on a fresh keyspace and NATS
/// prefix. Its base URL is the process or the HAProxy; in cluster mode successive WebSockets
/// alternate between the two gateways, so every room spans both and every fan-out and `since`
/// crosses NATS.
///
/// Dropping it kills every process (and removes the data directory); [`Server::terminate`]
/// stops it the way an orchestrator does (SIGTERM) and [`Server::restart`] starts it again on
/// the same data.
pub(crate) struct Server {
    backend: Backend,
    /// When [`Server::block_writes`] stopped a cluster's router.
    writes_blocked_at: Option<tokio::time::Instant>,
    /// Held while a mini-cluster runs (see [`cluster_slots`]).
    _slot: Option<OwnedSemaphorePermit>,
}

enum Backend {
    Standalone(Box<Standalone>),
    Cluster(Box<Cluster>),
    External(External),
}

/// A deployment the suite did not start: only its entry point is known, and only its own
/// configuration runs there.
struct External {
    /// `http://HOST:PORT`, from `CHATOY_E2E_URL`.
    url: String,
}

impl External {
    /// The deployment at `CHATOY_E2E_URL`, if the test's flags are among the ones it runs with
    /// (`CHATOY_E2E_EXTERNAL_FLAGS`, flag-value pairs separated by spaces, say
    /// `--msg-rate 10000 --msg-burst 10000`); a test that needs others fails loudly, as does one
    /// that controls processes ([`External::refuse`]). scripts/k8s-e2e leaves those out by name.
    fn connect(extra: &[&str], sqlite: &[&str]) -> External {
        let url = std::env::var("CHATOY_E2E_URL")
            .ok()
            .filter(|url| url.starts_with("http://"))
            .unwrap_or_else(|| panic!("CHATOY_E2E_MODE=external needs CHATOY_E2E_URL=http://HOST:PORT"));
        let runs_with: Vec<String> = std::env::var("CHATOY_E2E_EXTERNAL_FLAGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let pairs: BTreeSet<(&str, &str)> = runs_with
            .chunks(2)
            .filter(|pair| pair.len() == 2)
            .map(|pair| (pair[0].as_str(), pair[1].as_str()))
            .collect();
        let wanted = test_flags(extra);
        let missing: Vec<String> = wanted
            .chunks(2)
            .filter(|pair| pair.len() != 2 || !pairs.contains(&(pair[0].as_str(), pair[1].as_str())))
            .map(|pair| pair.join(" "))
            .collect();
        assert!(
            missing.is_empty() && sqlite.is_empty(),
            "this test needs a server started with {missing:?} {sqlite:?}; the external deployment at \
             {url} runs with {runs_with:?} (CHATOY_E2E_EXTERNAL_FLAGS): leave the test out there"
        );
        External { url }
    }

    /// Fails the test: `what` needs processes the suite started.
    fn refuse(&self, what: &str) -> ! {
        panic!(
            "{what} needs processes the suite started; {} is an external deployment",
            self.url
        )
    }
}

struct Standalone {
    process: Process,
    /// The SQLite write lock held by [`Server::block_writes`].
    lock: Mutex<Option<rusqlite::Connection>>,
    /// Declared last: removed after the process is gone.
    dir: TempDir,
}

impl Server {
    /// Starts a server with the default configuration (plus cheap password hashing).
    pub(crate) async fn start() -> Server {
        Server::start_with(&[]).await
    }

    /// Starts a server with extra command-line flags (flags of every process that serves
    /// clients: `chatoy standalone` and `chatoy gateway` take them alike).
    pub(crate) async fn start_with(extra: &[&str]) -> Server {
        Server::start_with_sqlite(extra, &[]).await
    }

    /// Starts a server with `extra` flags plus `sqlite` flags that only a standalone server
    /// understands (its SQLite store); a cluster has no use for them.
    pub(crate) async fn start_with_sqlite(extra: &[&str], sqlite: &[&str]) -> Server {
        match mode() {
            Mode::Standalone => {
                let dir = TempDir::new();
                let mut args: Vec<String> = vec!["standalone".into(), "--data-dir".into()];
                args.push(dir.path().display().to_string());
                args.extend(test_flags(extra));
                args.extend(sqlite.iter().map(|s| s.to_string()));
                let mut process = Process::new("chatoy", args, dir.path().join("stderr.log"));
                process.start(LISTENING, Duration::from_secs(30)).await;
                Server {
                    backend: Backend::Standalone(Box::new(Standalone {
                        process,
                        lock: Mutex::new(None),
                        dir,
                    })),
                    writes_blocked_at: None,
                    _slot: None,
                }
            }
            Mode::External => Server {
                backend: Backend::External(External::connect(extra, sqlite)),
                writes_blocked_at: None,
                _slot: None,
            },
            Mode::Cluster => {
                let slot = cluster_slots().acquire_owned().await.expect("semaphore open");
                let cluster = Cluster::start(Spec::new(1, 2, extra)).await;
                Server {
                    backend: Backend::Cluster(Box::new(cluster)),
                    writes_blocked_at: None,
                    _slot: Some(slot),
                }
            }
        }
    }

    /// `http://127.0.0.1:PORT`: the process, or the HAProxy.
    pub(crate) fn base_url(&self) -> String {
        match &self.backend {
            Backend::Standalone(s) => format!("http://127.0.0.1:{}", s.process.port()),
            Backend::Cluster(c) => c.base_url(),
            Backend::External(e) => e.url.clone(),
        }
    }

    /// Where the next WebSocket connects: `127.0.0.1:PORT` and the request path (`/ws`, or in
    /// cluster mode `/ws?gateway=N` with the gateways taking turns).
    pub(crate) fn ws_target(&self) -> (String, String) {
        match &self.backend {
            Backend::Standalone(s) => (format!("127.0.0.1:{}", s.process.port()), "/ws".into()),
            Backend::Cluster(c) => (c.lb_addr(), c.next_ws_path()),
            Backend::External(e) => (e.url.trim_start_matches("http://").to_owned(), "/ws".into()),
        }
    }

    /// `ws://127.0.0.1:PORT/ws` for the next WebSocket (see [`Server::ws_target`]).
    pub(crate) fn ws_url(&self) -> String {
        let (addr, path) = self.ws_target();
        format!("ws://{addr}{path}")
    }

    /// Gateway `n` (1-based) itself, `127.0.0.1:PORT`, bypassing any load balancer: for limits
    /// and timeouts of one process. A standalone server is its own only gateway.
    pub(crate) fn gateway_addr(&self, n: usize) -> String {
        match &self.backend {
            Backend::Standalone(s) => {
                assert_eq!(n, 1, "a standalone server is one gateway");
                format!("127.0.0.1:{}", s.process.port())
            }
            Backend::Cluster(c) => c.gateway_url(n).trim_start_matches("http://").to_owned(),
            // Only the entry point is known: gateway 1 is whichever one it leads to.
            Backend::External(e) => {
                assert_eq!(
                    n, 1,
                    "an external deployment is reached only through its entry point"
                );
                e.url.trim_start_matches("http://").to_owned()
            }
        }
    }

    /// An HTTP client of gateway `n` itself (see [`Server::gateway_addr`]).
    pub(crate) fn gateway_api(&self, n: usize) -> Api {
        let base = format!("http://{}", self.gateway_addr(n));
        Api::new(base.clone(), vec![base])
    }

    /// The process id of gateway `n` (the process listening on its port).
    pub(crate) fn gateway_pid(&self, n: usize) -> u32 {
        if let Backend::External(e) = &self.backend {
            e.refuse("a gateway's process id");
        }
        let addr = self.gateway_addr(n);
        let port: u16 = addr
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("gateway port");
        pid_listening_on(port).unwrap_or_else(|| panic!("no process listens on {addr}"))
    }

    /// Where a WebSocket to gateway `n` connects (`127.0.0.1:PORT` and the path), through the
    /// load balancer in cluster mode like every client's.
    pub(crate) fn gateway_ws_target(&self, n: usize) -> (String, String) {
        match &self.backend {
            Backend::Standalone(_) => (self.gateway_addr(n), "/ws".into()),
            Backend::Cluster(c) => (c.lb_addr(), c.ws_path(n)),
            Backend::External(_) => (self.gateway_addr(n), "/ws".into()),
        }
    }

    /// The WebSocket URL of gateway `n` (1-based), for limits that hold per process. A
    /// standalone server is its own only gateway.
    pub(crate) fn gateway_ws_url(&self, n: usize) -> String {
        match &self.backend {
            Backend::Standalone(s) => {
                assert_eq!(n, 1, "a standalone server is one gateway");
                format!("ws://127.0.0.1:{}/ws", s.process.port())
            }
            Backend::Cluster(c) => c.ws_url(n),
            Backend::External(_) => format!("ws://{}/ws", self.gateway_addr(n)),
        }
    }

    /// Everything every process (and earlier incarnations) wrote to stderr.
    pub(crate) fn stderr(&self) -> String {
        match &self.backend {
            Backend::Standalone(s) => s.process.stderr(),
            Backend::Cluster(c) => c.stderr(),
            Backend::External(e) => e.refuse("the servers' output"),
        }
    }

    /// An HTTP client for this server; its metrics are the sum over every gateway.
    pub(crate) fn api(&self) -> Api {
        match &self.backend {
            Backend::Standalone(_) => Api::new(self.base_url(), vec![self.base_url()]),
            Backend::Cluster(c) => c.api(),
            // No metrics: they would be one gateway's (whichever answers), shared with every
            // other test.
            Backend::External(e) => Api::new(e.url.clone(), Vec::new()),
        }
    }

    /// Whether every process is still running.
    pub(crate) fn is_running(&mut self) -> bool {
        match &mut self.backend {
            Backend::Standalone(s) => s.process.is_running(),
            Backend::Cluster(c) => c.is_running(),
            Backend::External(e) => e.refuse("whether the servers run"),
        }
    }

    /// Sends SIGTERM (to every gateway at once, then to the router) and waits (at most `limit`
    /// each) for the processes to exit; returns the first unsuccessful exit status, if any, else
    /// a successful one.
    pub(crate) async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        match &mut self.backend {
            Backend::External(e) => e.refuse("stopping the servers"),
            Backend::Standalone(s) => s.process.terminate(limit).await,
            Backend::Cluster(c) => {
                let statuses = c.terminate_all(limit).await;
                assert!(!statuses.is_empty(), "nothing was running");
                for (name, status) in &statuses {
                    if !status.success() {
                        eprintln!("{name} exited with {status}");
                    }
                }
                statuses
                    .iter()
                    .find(|(_, status)| !status.success())
                    .unwrap_or(&statuses[0])
                    .1
            }
        }
    }

    /// Starts the stopped processes again on the same data, each on its old port if it is
    /// still free (the cluster keeps its HAProxy address in any case).
    pub(crate) async fn restart(&mut self) {
        match &mut self.backend {
            Backend::Standalone(s) => s.process.start(LISTENING, Duration::from_secs(30)).await,
            Backend::Cluster(c) => c.restart_stopped().await,
            Backend::External(e) => e.refuse("starting the servers again"),
        }
    }

    /// A connection to a standalone server's SQLite database, beside the server's own.
    pub(crate) fn database(&self) -> rusqlite::Connection {
        let Backend::Standalone(s) = &self.backend else {
            panic!("only a standalone server has a database file");
        };
        let db = rusqlite::Connection::open(s.dir.path().join("chatoy.db")).expect("open chatoy.db");
        db.busy_timeout(Duration::from_secs(5)).expect("busy timeout");
        db
    }

    /// Makes the store unwritable for the server until [`Server::unblock_writes`]: a standalone
    /// server finds SQLite's write lock held by another process (start it with
    /// `--sqlite-busy-timeout` shorter than `--send-timeout` so it answers code 5 itself); a
    /// cluster loses its router (SIGTERM), so its gateways answer code 5 at `--send-timeout`.
    pub(crate) async fn block_writes(&mut self) {
        match &mut self.backend {
            Backend::Standalone(_) => {
                let db = self.database();
                db.execute_batch("BEGIN EXCLUSIVE").expect("take the write lock");
                if let Backend::Standalone(s) = &self.backend {
                    *s.lock.lock().expect("lock") = Some(db);
                }
            }
            Backend::External(e) => e.refuse("blocking the store's writes"),
            Backend::Cluster(c) => {
                for (name, status) in c.terminate_routers(Duration::from_secs(15)).await {
                    assert!(status.success(), "{name} exited with {status} after SIGTERM");
                }
                self.writes_blocked_at = Some(tokio::time::Instant::now());
            }
        }
    }

    /// Undoes [`Server::block_writes`]: releases the lock, or starts the router again (once the
    /// stopped one's partitions are free) and waits until it consumes.
    pub(crate) async fn unblock_writes(&mut self) {
        match &mut self.backend {
            Backend::Standalone(s) => {
                let db = s.lock.lock().expect("lock").take().expect("writes are blocked");
                db.execute_batch("COMMIT").expect("release the write lock");
            }
            Backend::External(e) => e.refuse("unblocking the store's writes"),
            Backend::Cluster(c) => {
                // NATS keeps a stopped router's partitions pinned to it for the failover
                // timeout: a router started sooner would get no work until then.
                let stopped = self.writes_blocked_at.take().expect("writes are blocked");
                tokio::time::sleep_until(stopped + FAILOVER_TIMEOUT).await;
                c.restart_stopped().await;
            }
        }
    }
}
/// One HTTP answer: status, body as JSON (`Value::Null` if it was not JSON) and raw text.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) content_type: String,
    /// `Retry-After`, if the answer had one.
    pub(crate) retry_after: Option<String>,
    pub(crate) body: Value,
    pub(crate) text: String,
}

impl Reply {
    /// Asserts the documented error shape: `status`, body exactly `{"code": status, "msg": "..."}`.
    #[track_caller]
    pub(crate) fn assert_error(&self, status: u16) {
        assert_eq!(self.status, status, "status of {self:?}");
        self.assert_json();
        assert_keys(&self.body, &["code", "msg"]);
        assert_eq!(self.body["code"], json!(status), "code of {self:?}");
        assert!(
            self.body["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "msg must be a non-empty string: {self:?}"
        );
    }

    /// Asserts `status` and the body `{"code":0,"msg":""}`.
    #[track_caller]
    pub(crate) fn assert_ok(&self, status: u16) {
        assert_eq!(self.status, status, "status of {self:?}");
        self.assert_json();
        assert_eq!(self.body, json!({"code": 0, "msg": ""}), "body of {self:?}");
    }

    /// Asserts the `Content-Type` is `application/json`.
    #[track_caller]
    pub(crate) fn assert_json(&self) {
        assert!(
            self.content_type.starts_with("application/json"),
            "Content-Type of {self:?}"
        );
    }
}

/// A user registered and logged in for a test.
#[derive(Debug, Clone)]
pub(crate) struct TestUser {
    pub(crate) id: u64,
    pub(crate) username: String,
    pub(crate) token: String,
}

/// A thin client for the HTTP API.
#[derive(Clone)]
pub(crate) struct Api {
    base: String,
    /// The base URLs whose `/metrics` are summed: every gateway.
    metrics: Vec<String>,
    http: reqwest::Client,
}

impl Api {
    /// A client of `base` whose metrics are the sum of those of `metrics`.
    pub(crate) fn new(base: String, metrics: Vec<String>) -> Api {
        let http = reqwest::Client::builder()
            .timeout(WAIT)
            .build()
            .expect("build reqwest client");
        Api { base, metrics, http }
    }

    /// Sends a request with an optional bearer token and optional raw body.
    pub(crate) async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Reply {
        let authorization = token.map(|token| format!("Bearer {token}"));
        self.raw_authorization(method, path, authorization.as_deref(), body)
            .await
    }

    /// Sends a request with an optional literal `Authorization` header and optional raw body.
    pub(crate) async fn raw_authorization(
        &self,
        method: reqwest::Method,
        path: &str,
        authorization: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Reply {
        let mut request = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body);
        }
        let response = request.send().await.unwrap_or_else(|err| panic!("{path}: {err}"));
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = response.text().await.expect("read body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            content_type,
            retry_after,
            body,
            text,
        }
    }

    /// `GET path`.
    pub(crate) async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.raw(reqwest::Method::GET, path, token, None).await
    }

    /// `POST path` with a JSON body.
    pub(crate) async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Reply {
        let bytes = serde_json::to_vec(body).expect("encode body");
        self.raw(reqwest::Method::POST, path, token, Some(bytes)).await
    }

    /// `POST path` without a body.
    pub(crate) async fn post_empty(&self, path: &str, token: Option<&str>) -> Reply {
        self.raw(reqwest::Method::POST, path, token, None).await
    }

    /// Registers `username`, asserting 201.
    pub(crate) async fn register(&self, username: &str) {
        let reply = self
            .post(
                "/users",
                None,
                &json!({"username": username, "password": PASSWORD}),
            )
            .await;
        reply.assert_ok(201);
    }

    /// Logs in, asserting success; returns the token and the `user` object.
    pub(crate) async fn login(&self, username: &str) -> (String, Value) {
        let reply = self
            .post(
                "/login",
                None,
                &json!({"username": username, "password": PASSWORD}),
            )
            .await;
        assert_eq!(reply.status, 200, "login: {reply:?}");
        reply.assert_json();
        assert_keys(&reply.body, &["code", "msg", "user"]);
        assert_eq!(reply.body["code"], json!(0));
        let token = reply.body["msg"].as_str().expect("token").to_owned();
        assert_token(&token);
        assert_user(&reply.body["user"]);
        assert_eq!(reply.body["user"]["username"], json!(username));
        (token, reply.body["user"].clone())
    }

    /// Registers and logs in a user with a random name starting with `prefix`.
    pub(crate) async fn new_user(&self, prefix: &str) -> TestUser {
        let username = format!("{prefix}_{}", random_hex(8));
        self.register(&username).await;
        let (token, user) = self.login(&username).await;
        TestUser {
            id: user["id"].as_u64().expect("user id"),
            username,
            token,
        }
    }

    /// Creates a room, asserting 201 `{"id":N}`; returns N.
    pub(crate) async fn create_room(&self, token: &str, name: &str) -> u64 {
        let reply = self.post("/rooms", Some(token), &json!({"name": name})).await;
        assert_eq!(reply.status, 201, "create room: {reply:?}");
        reply.assert_json();
        assert_keys(&reply.body, &["id"]);
        let id = reply.body["id"].as_u64().expect("room id");
        assert_id(id);
        id
    }

    /// Joins a room, asserting 200 `{"code":0,"msg":""}`.
    pub(crate) async fn join(&self, token: &str, room: u64) {
        self.post_empty(&format!("/rooms/{room}/join"), Some(token))
            .await
            .assert_ok(200);
    }

    /// `GET /rooms/{room}/messages` with optional `before` (percent-encoded) and `limit`.
    pub(crate) async fn history_reply(
        &self,
        token: &str,
        room: u64,
        before: Option<&str>,
        limit: Option<&str>,
    ) -> Reply {
        let mut query = Vec::new();
        if let Some(before) = before {
            query.push(format!("before={}", percent_encode(before)));
        }
        if let Some(limit) = limit {
            query.push(format!("limit={}", percent_encode(limit)));
        }
        let mut path = format!("/rooms/{room}/messages");
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query.join("&"));
        }
        self.get(&path, Some(token)).await
    }

    /// History that must succeed; each element is checked to be a well-formed `Message`.
    pub(crate) async fn history(
        &self,
        token: &str,
        room: u64,
        before: Option<&str>,
        limit: Option<u32>,
    ) -> Vec<Value> {
        let limit = limit.map(|l| l.to_string());
        let reply = self.history_reply(token, room, before, limit.as_deref()).await;
        assert_eq!(reply.status, 200, "history: {reply:?}");
        reply.assert_json();
        let messages = reply.body.as_array().expect("history is an array").clone();
        for message in &messages {
            assert_message(message);
            assert_eq!(message["room"], json!(room));
        }
        messages
    }

    /// Reads one sample of a Prometheus metric (exact series name with labels), summed over
    /// every gateway that has it; `None` if none has. An external deployment's client has no
    /// gateways to read: asking fails the test.
    pub(crate) async fn metric(&self, series: &str) -> Option<f64> {
        assert!(
            !self.metrics.is_empty(),
            "{series}: the metrics of an external deployment are not this test's own"
        );
        let mut sum = None;
        for base in &self.metrics {
            let url = format!("{base}/metrics");
            let response = self
                .http
                .get(&url)
                .send()
                .await
                .unwrap_or_else(|err| panic!("{url}: {err}"));
            assert_eq!(response.status().as_u16(), 200, "{url}");
            let text = response.text().await.expect("read metrics");
            if let Some(value) = metric_value(&text, series) {
                sum = Some(sum.unwrap_or(0.0) + value);
            }
        }
        sum
    }
}

/// Percent-encodes everything outside the URL-unreserved set.
pub(crate) fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The value of one series in Prometheus text exposition.
pub(crate) fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name.trim() == series).then(|| value.trim().parse().ok())?
        })
}

/// Asserts the object has exactly these keys.
#[track_caller]
pub(crate) fn assert_keys(value: &Value, keys: &[&str]) {
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("expected an object, got {value}"));
    let got: BTreeSet<&str> = object.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = keys.iter().copied().collect();
    assert_eq!(got, want, "keys of {value}");
}

/// Asserts an id is a JSON integer in 1..=2^53-1.
#[track_caller]
pub(crate) fn assert_id(id: u64) {
    assert!((1..=(1u64 << 53) - 1).contains(&id), "id {id} out of range");
}

/// Asserts a token is 64 hex characters.
#[track_caller]
pub(crate) fn assert_token(token: &str) {
    assert_eq!(token.len(), 64, "token {token:?}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "token {token:?}");
}

/// The uuids of `recv.data` values, in order.
/// The uuids of messages per room, each room in arrival order (a `since` replay orders each room
/// by `sent` and sends the rooms one after another).
pub(crate) fn uuids_by_room(messages: &[Value]) -> std::collections::BTreeMap<u64, Vec<String>> {
    let mut rooms: std::collections::BTreeMap<u64, Vec<String>> = std::collections::BTreeMap::new();
    for message in messages {
        let room = message["room"].as_u64().expect("room");
        let uuid = message["uuid"].as_str().expect("uuid").to_owned();
        rooms.entry(room).or_default().push(uuid);
    }
    rooms
}

pub(crate) fn uuids(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["uuid"].as_str().expect("uuid").to_owned())
        .collect()
}

/// Asserts `text` is RFC 3339 with exactly nine fractional digits and returns it as
/// nanoseconds since the epoch.
#[track_caller]
pub(crate) fn ts(text: &str) -> i64 {
    parse_ts(text).unwrap_or_else(|| panic!("{text:?} is not RFC 3339 with nine fractional digits"))
}

/// `text` as nanoseconds since the epoch if it is RFC 3339 with exactly nine fractional digits.
pub(crate) fn parse_ts(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let digits =
        |range: std::ops::Range<usize>| range.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    let offset_ok = match b.get(29) {
        Some(b'Z') => b.len() == 30,
        Some(b'+' | b'-') => b.len() == 35 && digits(30..32) && b[32] == b':' && digits(33..35),
        _ => false,
    };
    let shape_ok = b.len() >= 30
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..29)
        && offset_ok;
    if !shape_ok {
        return None;
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()?
        .timestamp_nanos_opt()
}

/// Asserts a `User` object: exact keys, no secret.
#[track_caller]
pub(crate) fn assert_user(user: &Value) {
    assert_keys(
        user,
        &["id", "username", "nickname", "slogan", "status", "registered"],
    );
    assert_id(user["id"].as_u64().expect("user id is an integer"));
    for key in ["username", "nickname", "slogan", "status"] {
        assert!(user[key].is_string(), "{key} of {user}");
    }
    ts(user["registered"].as_str().expect("registered"));
    assert!(
        !user.to_string().contains("$argon2"),
        "a password hash leaked: {user}"
    );
}

/// Asserts a `Message` object (history element, `recv.data`) has exactly the documented shape.
#[track_caller]
pub(crate) fn assert_message(message: &Value) {
    assert_keys(message, &["uuid", "sender", "room", "data", "sent", "modified"]);
    assert!(message["uuid"].is_string(), "uuid of {message}");
    assert_id(message["sender"].as_u64().expect("sender is an integer"));
    assert_id(message["room"].as_u64().expect("room is an integer"));
    assert_keys(&message["data"], &["type", "text"]);
    assert_eq!(message["data"]["type"], json!("Text"));
    assert!(message["data"]["text"].is_string());
    ts(message["sent"].as_str().expect("sent is a string"));
    assert_eq!(message["modified"], json!(false));
}

/// Asserts a `send` frame with this code and uuid; returns its `sent` in nanoseconds.
#[track_caller]
pub(crate) fn assert_send(frame: &Value, code: u64, uuid: &str) -> i64 {
    assert_keys(frame, &["type", "code", "msg", "uuid", "sent"]);
    assert_eq!(frame["type"], json!("send"), "{frame}");
    assert_eq!(frame["code"], json!(code), "{frame}");
    assert_eq!(frame["uuid"], json!(uuid), "{frame}");
    let msg = frame["msg"].as_str().expect("msg is a string");
    if code == 0 {
        assert_eq!(msg, "", "{frame}");
    } else {
        assert!(!msg.is_empty(), "a refusal explains itself: {frame}");
    }
    if code == 1 {
        assert_eq!(msg, "Please login first!", "{frame}");
    }
    let sent = ts(frame["sent"].as_str().expect("sent is a string"));
    assert_recent(sent);
    sent
}

/// Asserts a server timestamp (ns) is within five minutes of this machine's clock: the server
/// stamps with the real time, in UTC or with a correct offset.
#[track_caller]
pub(crate) fn assert_recent(nanos: i64) {
    let now = chrono::Utc::now().timestamp_nanos_opt().expect("now in range");
    let skew = (now - nanos).abs();
    assert!(
        skew < 300 * 1_000_000_000,
        "timestamp is {} s away from now",
        skew / 1_000_000_000
    );
}

/// Asserts an `auth` answer with this code and its documented message.
#[track_caller]
pub(crate) fn assert_auth(frame: &Value, code: u64) {
    let msg = match code {
        0 => "",
        1 => "Login status expired!",
        2 => "Already authenticated!",
        _ => panic!("no auth code {code}"),
    };
    assert_eq!(
        frame,
        &json!({"type": "auth", "code": code, "msg": msg}),
        "auth answer"
    );
}

/// Asserts an `error` frame with code 3.
#[track_caller]
pub(crate) fn assert_error_frame(frame: &Value) {
    assert_keys(frame, &["type", "code", "msg"]);
    assert_eq!(frame["type"], json!("error"), "{frame}");
    assert_eq!(frame["code"], json!(3), "{frame}");
    assert!(frame["msg"].as_str().is_some_and(|m| !m.is_empty()), "{frame}");
}

/// Asserts a `recv` frame and returns its `data`.
#[track_caller]
pub(crate) fn recv_data(frame: &Value) -> Value {
    assert_keys(frame, &["type", "data"]);
    assert_eq!(frame["type"], json!("recv"), "{frame}");
    assert_message(&frame["data"]);
    frame["data"].clone()
}

/// A `msg` frame with Text content.
pub(crate) fn msg_frame(uuid: &str, room: u64, text: &str) -> String {
    json!({"type": "msg", "uuid": uuid, "room": room, "data": {"type": "Text", "text": text}}).to_string()
}

/// An `auth` frame, optionally with `since`.
pub(crate) fn auth_frame(token: &str, since: Option<&str>) -> String {
    match since {
        Some(since) => json!({"type": "auth", "token": token, "since": since}).to_string(),
        None => json!({"type": "auth", "token": token}).to_string(),
    }
}

/// What a WebSocket client observed next.
#[derive(Debug)]
pub(crate) enum Event {
    /// A text frame, parsed as JSON.
    Json(Value),
    /// A close frame: code and reason.
    Close(u16, String),
    /// The connection ended without (further) frames.
    Ended(String),
}

type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A tungstenite client: answers pings while it reads, keeps frames it skipped for later.
pub(crate) struct Ws {
    inner: Stream,
    pending: VecDeque<Value>,
}

impl Ws {
    /// Opens a WebSocket to the server.
    pub(crate) async fn connect(server: &Server) -> Ws {
        Ws::connect_url(&server.ws_url()).await
    }

    /// Opens a WebSocket to a URL and authenticates, asserting auth code 0.
    pub(crate) async fn authed_url(url: &str, token: &str) -> Ws {
        let mut ws = Ws::connect_url(url).await;
        let answer = ws.auth(token, None).await;
        assert_auth(&answer, 0);
        ws
    }

    /// Wraps a WebSocket the caller upgraded itself (e.g. with extra request headers).
    pub(crate) fn from_stream(inner: Stream) -> Ws {
        Ws {
            inner,
            pending: VecDeque::new(),
        }
    }

    /// Opens a WebSocket to a URL.
    pub(crate) async fn connect_url(url: &str) -> Ws {
        let (inner, response) = within(WAIT, "the upgrade", tokio_tungstenite::connect_async(url))
            .await
            .unwrap_or_else(|err| panic!("connect {url}: {err}"));
        assert_eq!(response.status().as_u16(), 101);
        Ws {
            inner,
            pending: VecDeque::new(),
        }
    }

    /// Connects and authenticates, asserting auth code 0.
    pub(crate) async fn authed(server: &Server, token: &str) -> Ws {
        let mut ws = Ws::connect(server).await;
        let answer = ws.auth(token, None).await;
        assert_auth(&answer, 0);
        ws
    }

    /// Connects and authenticates with `since`, asserting auth code 0.
    pub(crate) async fn authed_since(server: &Server, token: &str, since: &str) -> Ws {
        let mut ws = Ws::connect(server).await;
        let answer = ws.auth(token, Some(since)).await;
        assert_auth(&answer, 0);
        ws
    }

    /// Connects and authenticates with a per-room `since` (`{"<room>": "<ts>"}`), asserting
    /// auth code 0.
    pub(crate) async fn authed_rooms(server: &Server, token: &str, since: &[(u64, &str)]) -> Ws {
        let mut ws = Ws::connect(server).await;
        let answer = ws.auth_rooms(token, since).await;
        assert_auth(&answer, 0);
        ws
    }

    /// Sends `auth` with a per-room `since` and returns the answer.
    pub(crate) async fn auth_rooms(&mut self, token: &str, since: &[(u64, &str)]) -> Value {
        let since: serde_json::Map<String, Value> = since
            .iter()
            .map(|(room, at)| (room.to_string(), Value::from(*at)))
            .collect();
        self.send_text(&json!({"type": "auth", "token": token, "since": since}).to_string())
            .await;
        self.next_json().await
    }

    /// Sends a text frame.
    pub(crate) async fn send_text(&mut self, text: &str) {
        within(WAIT, "sending a frame", self.inner.send(WsMessage::text(text)))
            .await
            .unwrap_or_else(|err| panic!("send: {err}"));
    }

    /// Sends `auth` and returns the next frame (the answer).
    pub(crate) async fn auth(&mut self, token: &str, since: Option<&str>) -> Value {
        self.send_text(&auth_frame(token, since)).await;
        self.next_json().await
    }

    /// Sends a Text `msg` and returns its `send` answer; frames that arrive before it are kept.
    pub(crate) async fn send_msg(&mut self, uuid: &str, room: u64, text: &str) -> Value {
        self.send_text(&msg_frame(uuid, room, text)).await;
        self.answer_to(uuid).await
    }

    /// Sends a Text `msg`, asserts code 0 and returns `sent` as text.
    pub(crate) async fn send_ok(&mut self, uuid: &str, room: u64, text: &str) -> String {
        let answer = self.send_msg(uuid, room, text).await;
        assert_send(&answer, 0, uuid);
        answer["sent"].as_str().expect("sent").to_owned()
    }

    /// Waits for the `send` frame for `uuid`, keeping every other frame for later reads.
    pub(crate) async fn answer_to(&mut self, uuid: &str) -> Value {
        // Answers may come in any order: one may already be among the frames kept earlier.
        let kept = self
            .pending
            .iter()
            .position(|frame| frame["type"] == "send" && frame["uuid"] == uuid);
        if let Some(answer) = kept.and_then(|at| self.pending.remove(at)) {
            return answer;
        }
        let mut skipped = VecDeque::new();
        let answer = loop {
            let frame = self.read_json().await;
            if frame["type"] == "send" && frame["uuid"] == uuid {
                break frame;
            }
            skipped.push_back(frame);
        };
        // Frames read before the answer come before frames still queued from earlier.
        skipped.extend(self.pending.drain(..));
        self.pending = skipped;
        answer
    }

    /// The next event from the wire (after frames kept by [`Ws::answer_to`]).
    pub(crate) async fn next_event(&mut self) -> Event {
        if let Some(frame) = self.pending.pop_front() {
            return Event::Json(frame);
        }
        self.read_event(WAIT).await
    }

    async fn read_event(&mut self, limit: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.inner.next()).await {
                Ok(next) => next,
                Err(_) => panic!("timed out after {limit:?} waiting for a frame"),
            };
            match next {
                None => return Event::Ended("stream ended".into()),
                Some(Err(err)) => return Event::Ended(err.to_string()),
                Some(Ok(WsMessage::Text(text))) => {
                    let value = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|err| panic!("server sent non-JSON {text:?}: {err}"));
                    return Event::Json(value);
                }
                Some(Ok(WsMessage::Close(frame))) => {
                    return match frame {
                        Some(frame) => Event::Close(u16::from(frame.code), frame.reason.to_string()),
                        None => Event::Close(1005, String::new()),
                    }
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                Some(Ok(other)) => panic!("unexpected frame from server: {other:?}"),
            }
        }
    }

    async fn read_json(&mut self) -> Value {
        match self.read_event(WAIT).await {
            Event::Json(value) => value,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The next frame, which must be a JSON text frame.
    pub(crate) async fn next_json(&mut self) -> Value {
        match self.next_event().await {
            Event::Json(value) => value,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The next frame, which must be `recv`; returns its `data`.
    pub(crate) async fn next_recv(&mut self) -> Value {
        let frame = self.next_json().await;
        recv_data(&frame)
    }

    /// Reads `recv` frames until the one with `uuid` arrives; returns all of them in order.
    pub(crate) async fn recv_until(&mut self, uuid: &str) -> Vec<Value> {
        let mut got = Vec::new();
        loop {
            let data = self.next_recv().await;
            let done = data["uuid"] == uuid;
            got.push(data);
            if done {
                return got;
            }
        }
    }

    /// The next event must be a close frame; returns code and reason.
    pub(crate) async fn expect_close(&mut self) -> (u16, String) {
        match self.next_event().await {
            Event::Close(code, reason) => (code, reason),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    /// Asserts nothing but pings arrives for `quiet`, answering pings meanwhile.
    pub(crate) async fn expect_quiet(&mut self, quiet: Duration) {
        if let Some(frame) = self.pending.pop_front() {
            panic!("expected no frame, got {frame}");
        }
        if let Ok(next) = tokio::time::timeout(quiet, self.read_event(quiet + WAIT)).await {
            panic!("expected no frame for {quiet:?}, got {next:?}");
        }
    }

    /// Starts a clean close and waits for the server's close (bounded).
    pub(crate) async fn close(mut self) {
        let _ = within(WAIT, "closing", self.inner.close(None)).await;
        let _ =
            tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = self.inner.next().await {} }).await;
    }
}

/// WebSocket opcodes used by [`RawWs`].
pub(crate) mod opcode {
    /// Continuation frame.
    pub(crate) const CONTINUATION: u8 = 0x0;
    /// Text frame.
    pub(crate) const TEXT: u8 = 0x1;
    /// Binary frame.
    pub(crate) const BINARY: u8 = 0x2;
    /// Close frame.
    pub(crate) const CLOSE: u8 = 0x8;
    /// Ping frame.
    pub(crate) const PING: u8 = 0x9;
    /// Pong frame.
    pub(crate) const PONG: u8 = 0xA;
}

/// One frame as [`RawWs`] reads it.
#[derive(Debug)]
pub(crate) struct RawFrame {
    /// The opcode.
    pub(crate) opcode: u8,
    /// The unmasked payload.
    pub(crate) payload: Vec<u8>,
}

/// A hand-rolled WebSocket client over a plain TCP stream: it sends any bytes (invalid UTF-8,
/// oversized or binary frames), never answers pings unless told to, and can shrink its receive
/// buffer so a client that stops reading backs the server up quickly.
pub(crate) struct RawWs {
    reader: tokio::io::BufReader<TcpStream>,
}

impl RawWs {
    /// Connects and performs the HTTP upgrade by hand.
    pub(crate) async fn connect(server: &Server) -> RawWs {
        RawWs::connect_with(server, None).await
    }

    /// Connects with an optional `SO_RCVBUF`, then upgrades.
    pub(crate) async fn connect_with(server: &Server, recv_buffer: Option<u32>) -> RawWs {
        let (addr, path) = server.ws_target();
        RawWs::connect_target(&addr, &path, recv_buffer).await
    }

    /// Connects to `addr` with an optional `SO_RCVBUF`, then upgrades on `path`.
    pub(crate) async fn connect_target(addr: &str, path: &str, recv_buffer: Option<u32>) -> RawWs {
        let addr: std::net::SocketAddr = addr.parse().expect("addr");
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
        let stream = within(WAIT, "TCP connect", socket.connect(addr))
            .await
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut reader = tokio::io::BufReader::new(stream);
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        within(
            WAIT,
            "writing the upgrade",
            reader.get_mut().write_all(request.as_bytes()),
        )
        .await
        .expect("write upgrade");
        let mut head = Vec::new();
        within(WAIT, "the upgrade response", async {
            while !head.ends_with(b"\r\n\r\n") {
                let byte = reader.read_u8().await.expect("read upgrade response");
                head.push(byte);
            }
        })
        .await;
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "bad accept key: {head}"
        );
        RawWs { reader }
    }

    /// Sends one masked frame with FIN set.
    pub(crate) async fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        self.send_fragment(true, opcode, payload).await;
    }

    /// Sends one masked frame; `fin` false starts or continues a fragmented message.
    pub(crate) async fn send_fragment(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(if fin { 0x80 | opcode } else { opcode });
        let len = payload.len();
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else if len <= usize::from(u16::MAX) {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let mask: [u8; 4] = rand::rng().random();
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        // The server may already have closed (e.g. after an oversized frame); a failed write
        // then shows up as the close or end the caller reads next.
        let _ = within(WAIT, "writing a frame", self.reader.get_mut().write_all(&frame)).await;
    }

    /// Sends a text frame (the bytes need not be UTF-8).
    pub(crate) async fn send_text(&mut self, payload: &[u8]) {
        self.send_frame(opcode::TEXT, payload).await;
    }

    /// Reads the next frame of any kind; `None` when the connection ended.
    pub(crate) async fn read_frame(&mut self, limit: Duration) -> Option<RawFrame> {
        within(limit, "a raw frame", self.read_frame_inner()).await
    }

    async fn read_frame_inner(&mut self) -> Option<RawFrame> {
        let mut message: Option<RawFrame> = None;
        loop {
            let first = self.reader.read_u8().await.ok()?;
            let second = self.reader.read_u8().await.ok()?;
            assert_eq!(second & 0x80, 0, "server frames must not be masked");
            let len = match second & 0x7f {
                126 => u64::from(self.reader.read_u16().await.ok()?),
                127 => self.reader.read_u64().await.ok()?,
                n => u64::from(n),
            };
            let mut payload = vec![0; usize::try_from(len).expect("frame length")];
            self.reader.read_exact(&mut payload).await.ok()?;
            let fin = first & 0x80 != 0;
            let code = first & 0x0f;
            if code == opcode::CONTINUATION {
                let partial = message.as_mut().expect("continuation without a start");
                partial.payload.extend_from_slice(&payload);
            } else {
                message = Some(RawFrame {
                    opcode: code,
                    payload,
                });
            }
            if fin {
                return message;
            }
        }
    }

    /// The next text frame as JSON, answering pings; panics on anything else.
    pub(crate) async fn next_json(&mut self) -> Value {
        match self.next_event(WAIT).await {
            Event::Json(value) => value,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The next text or close frame, answering pings on the way.
    pub(crate) async fn next_event(&mut self, limit: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(frame) = self.read_frame(left).await else {
                return Event::Ended("connection ended".into());
            };
            match frame.opcode {
                opcode::TEXT => {
                    let value = serde_json::from_slice(&frame.payload).unwrap_or_else(|err| {
                        panic!(
                            "server sent non-JSON {:?}: {err}",
                            String::from_utf8_lossy(&frame.payload)
                        )
                    });
                    return Event::Json(value);
                }
                opcode::CLOSE => {
                    return Event::Close(close_code(&frame.payload), close_reason(&frame.payload))
                }
                opcode::PING => self.send_frame(opcode::PONG, &frame.payload).await,
                opcode::PONG => {}
                other => panic!("unexpected opcode {other} from server"),
            }
        }
    }

    /// Authenticates, asserting code 0.
    pub(crate) async fn auth_ok(&mut self, token: &str, since: Option<&str>) {
        self.send_text(auth_frame(token, since).as_bytes()).await;
        let answer = self.next_json().await;
        assert_auth(&answer, 0);
    }
}

/// The status code of a close payload (1005 when absent).
pub(crate) fn close_code(payload: &[u8]) -> u16 {
    match payload {
        [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
        _ => 1005,
    }
}

/// The reason of a close payload.
pub(crate) fn close_reason(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned()
}

/// The seed for a randomised test: `CHATOY_E2E_SEED` if set, else random; printed so a failure
/// can be replayed.
pub(crate) fn seed(test: &str) -> u64 {
    let seed = std::env::var("CHATOY_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("{test}: seed {seed} (replay with CHATOY_E2E_SEED={seed})");
    seed
}

/// The process listening on TCP `port` of 127.0.0.1 (from `/proc/net/tcp` and the processes'
/// socket descriptors).
pub(crate) fn pid_listening_on(port: u16) -> Option<u32> {
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    let wanted = format!(":{port:04X}");
    let inode = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // local_address, st (0A = LISTEN), inode.
        let listening = fields.get(3) == Some(&"0A");
        (listening && fields.get(1)?.ends_with(&wanted)).then(|| fields.get(9).map(|s| s.to_string()))?
    })?;
    let target = format!("socket:[{inode}]");
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str()) {
                return Some(pid);
            }
        }
    }
    None
}

/// A process's resident set size in KiB (`VmRSS` of `/proc/<pid>/status`); `None` once the
/// process is gone.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok());
    Some(rss.unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status")))
}

/// A plain TCP client that speaks HTTP/1.1 by hand: it can send a request a byte at a time, from
/// a chosen loopback source address, and see exactly what the server answers or when it hangs up.
pub(crate) struct RawHttp {
    stream: TcpStream,
    /// Bytes read but not consumed yet.
    buffer: Vec<u8>,
}

/// One HTTP response as [`RawHttp`] reads it.
#[derive(Debug)]
pub(crate) struct RawResponse {
    /// The status code.
    pub(crate) status: u16,
    /// Header names (lower case) and values, in order.
    pub(crate) headers: Vec<(String, String)>,
    /// The body (by `Content-Length`).
    pub(crate) body: Vec<u8>,
}

impl RawResponse {
    /// The first value of a header, by lower-case name.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The body as JSON (`Value::Null` if it is not JSON).
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

impl RawHttp {
    /// Connects to `addr` (`127.0.0.1:PORT`), from `source` if given (any 127.x.y.z works on
    /// Linux, so a test can be a client address of its own).
    pub(crate) async fn connect(addr: &str, source: Option<std::net::IpAddr>) -> RawHttp {
        let addr: std::net::SocketAddr = addr.parse().expect("addr");
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(ip) = source {
            socket
                .bind(std::net::SocketAddr::new(ip, 0))
                .unwrap_or_else(|err| panic!("bind {ip}: {err}"));
        }
        let stream = within(WAIT, "TCP connect", socket.connect(addr))
            .await
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        RawHttp {
            stream,
            buffer: Vec::new(),
        }
    }

    /// Writes bytes; `false` if the server already closed the connection.
    pub(crate) async fn send(&mut self, bytes: &[u8]) -> bool {
        matches!(
            tokio::time::timeout(WAIT, self.stream.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

    /// Reads more bytes into the buffer; `false` at the end of the connection (or a reset).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buffer.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Reads one response (waiting at most `limit`); `None` if the connection ended first.
    pub(crate) async fn response(&mut self, limit: Duration) -> Option<RawResponse> {
        within(limit, "an HTTP response", async {
            let end = loop {
                if let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                    break end;
                }
                if !self.fill().await {
                    return None;
                }
            };
            let head = String::from_utf8_lossy(&self.buffer[..end]).into_owned();
            self.buffer.drain(..end + 4);
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or_default();
            let status = status_line
                .split_whitespace()
                .nth(1)
                .and_then(|code| code.parse().ok())
                .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
            let headers: Vec<(String, String)> = lines
                .filter_map(|line| line.split_once(':'))
                .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
                .collect();
            let length = headers
                .iter()
                .find(|(name, _)| name == "content-length")
                .and_then(|(_, value)| value.parse::<usize>().ok())
                .unwrap_or(0);
            while self.buffer.len() < length {
                if !self.fill().await {
                    break;
                }
            }
            let body = self.buffer.drain(..length.min(self.buffer.len())).collect();
            Some(RawResponse {
                status,
                headers,
                body,
            })
        })
        .await
    }

    /// Whether the server has closed the connection (reading nothing more), waiting at most
    /// `limit`; bytes that arrive meanwhile are kept for [`RawHttp::response`].
    pub(crate) async fn closed_within(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, async { while self.fill().await {} })
            .await
            .is_ok()
    }

    /// Sends a complete `GET path` request with extra header lines (each ending in CRLF) and
    /// reads the answer.
    pub(crate) async fn get(&mut self, path: &str, headers: &str) -> Option<RawResponse> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n");
        if !self.send(request.as_bytes()).await {
            return None;
        }
        self.response(WAIT).await
    }
}

/// The header lines of a WebSocket upgrade request (for [`RawHttp::get`]).
pub(crate) const UPGRADE_HEADERS: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
