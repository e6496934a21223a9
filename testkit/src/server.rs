//! The server under test, whatever the mode: a `chatoy standalone` process on a fresh data
//! directory, (`CHATOY_E2E_MODE=cluster`) a private mini-cluster behind HAProxy, or
//! (`CHATOY_E2E_MODE=external`) a deployment at `CHATOY_E2E_URL` that the suite did not start.

use std::collections::BTreeSet;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::Api;
use crate::minicluster::{Cluster, Spec, FAILOVER_TIMEOUT};
use crate::process::{pid_listening_on, Process, TempDir};

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

/// The message rate of a test that sends faster than a client may and is not about that limit:
/// a million a second per socket, a million at once.
pub const UNLIMITED_MSGS: [&str; 4] = ["--msg-rate", "1000000", "--msg-burst", "1000000"];

/// The connection rates of a test that reconnects as fast as the machine allows and is not
/// about those limits: a million a second per process, none per address.
pub const UNLIMITED_CONNS: [&str; 6] = [
    "--conn-rate",
    "1000000",
    "--conn-burst",
    "1000000",
    "--conn-rate-per-ip",
    "0",
];

/// [`TEST_DEFAULTS`] without the flags `extra` gives, then `extra`.
pub fn test_flags(extra: &[&str]) -> Vec<String> {
    let mut flags: Vec<String> = TEST_DEFAULTS
        .chunks(2)
        .filter(|pair| !extra.contains(&pair[0]))
        .flatten()
        .map(|s| s.to_string())
        .collect();
    flags.extend(extra.iter().map(|s| s.to_string()));
    flags
}

/// What `chatoy standalone` prints once it serves.
const LISTENING: &str = "chatoy listening on http://127.0.0.1:";

/// How the suite runs, from `CHATOY_E2E_MODE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Unset or `standalone`: one `chatoy standalone` process per test.
    Standalone,
    /// `cluster`: a private mini-cluster per test on the shared NATS and Cassandra.
    Cluster,
    /// `external`: a deployment the suite does not start, reached at `CHATOY_E2E_URL` (its load
    /// balancer or Service), shared by every test (scripts/k8s-e2e: a Kubernetes cluster).
    External,
}

/// The mode this run tests; an unknown value fails loudly.
pub fn mode() -> Mode {
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
pub struct Server {
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
    /// `--msg-rate 1000000 --msg-burst 1000000`); a test that needs others fails loudly, as does one
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
    pub async fn start() -> Server {
        Server::start_with(&[]).await
    }

    /// Starts a server with extra command-line flags (flags of every process that serves
    /// clients: `chatoy standalone` and `chatoy gateway` take them alike).
    pub async fn start_with(extra: &[&str]) -> Server {
        Server::start_with_sqlite(extra, &[]).await
    }

    /// Starts a server with `extra` flags plus `sqlite` flags that only a standalone server
    /// understands (its SQLite store); a cluster has no use for them.
    pub async fn start_with_sqlite(extra: &[&str], sqlite: &[&str]) -> Server {
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
    pub fn base_url(&self) -> String {
        match &self.backend {
            Backend::Standalone(s) => format!("http://127.0.0.1:{}", s.process.port()),
            Backend::Cluster(c) => c.base_url(),
            Backend::External(e) => e.url.clone(),
        }
    }

    /// Where the next WebSocket connects: `127.0.0.1:PORT` and the request path (`/ws`, or in
    /// cluster mode `/ws?gateway=N` with the gateways taking turns).
    pub fn ws_target(&self) -> (String, String) {
        match &self.backend {
            Backend::Standalone(s) => (format!("127.0.0.1:{}", s.process.port()), "/ws".into()),
            Backend::Cluster(c) => (c.lb_addr(), c.next_ws_path()),
            Backend::External(e) => (e.url.trim_start_matches("http://").to_owned(), "/ws".into()),
        }
    }

    /// `ws://127.0.0.1:PORT/ws` for the next WebSocket (see [`Server::ws_target`]).
    pub fn ws_url(&self) -> String {
        let (addr, path) = self.ws_target();
        format!("ws://{addr}{path}")
    }

    /// Gateway `n` (1-based) itself, `127.0.0.1:PORT`, bypassing any load balancer: for limits
    /// and timeouts of one process. A standalone server is its own only gateway.
    pub fn gateway_addr(&self, n: usize) -> String {
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
    pub fn gateway_api(&self, n: usize) -> Api {
        let base = format!("http://{}", self.gateway_addr(n));
        Api::new(base.clone(), vec![base])
    }

    /// The process id of gateway `n` (the process listening on its port).
    pub fn gateway_pid(&self, n: usize) -> u32 {
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
    pub fn gateway_ws_target(&self, n: usize) -> (String, String) {
        match &self.backend {
            Backend::Standalone(_) => (self.gateway_addr(n), "/ws".into()),
            Backend::Cluster(c) => (c.lb_addr(), c.ws_path(n)),
            Backend::External(_) => (self.gateway_addr(n), "/ws".into()),
        }
    }

    /// The WebSocket URL of gateway `n` (1-based), for limits that hold per process. A
    /// standalone server is its own only gateway.
    pub fn gateway_ws_url(&self, n: usize) -> String {
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
    pub fn stderr(&self) -> String {
        match &self.backend {
            Backend::Standalone(s) => s.process.stderr(),
            Backend::Cluster(c) => c.stderr(),
            Backend::External(e) => e.refuse("the servers' output"),
        }
    }

    /// An HTTP client for this server; its metrics are the sum over every gateway.
    pub fn api(&self) -> Api {
        match &self.backend {
            Backend::Standalone(_) => Api::new(self.base_url(), vec![self.base_url()]),
            Backend::Cluster(c) => c.api(),
            // No metrics: they would be one gateway's (whichever answers), shared with every
            // other test.
            Backend::External(e) => Api::new(e.url.clone(), Vec::new()),
        }
    }

    /// Whether every process is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.backend {
            Backend::Standalone(s) => s.process.is_running(),
            Backend::Cluster(c) => c.is_running(),
            Backend::External(e) => e.refuse("whether the servers run"),
        }
    }

    /// Sends SIGTERM (to every gateway at once, then to the router) and waits (at most `limit`
    /// each) for the processes to exit; returns the first unsuccessful exit status, if any, else
    /// a successful one.
    pub async fn terminate(&mut self, limit: Duration) -> ExitStatus {
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
    pub async fn restart(&mut self) {
        match &mut self.backend {
            Backend::Standalone(s) => s.process.start(LISTENING, Duration::from_secs(30)).await,
            Backend::Cluster(c) => c.restart_stopped().await,
            Backend::External(e) => e.refuse("starting the servers again"),
        }
    }

    /// A connection to a standalone server's SQLite database, beside the server's own.
    pub fn database(&self) -> rusqlite::Connection {
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
    pub async fn block_writes(&mut self) {
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
    pub async fn unblock_writes(&mut self) {
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
