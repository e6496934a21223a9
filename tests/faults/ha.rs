//! The HA pass: the fault suite's load and checker on the production topology, on this machine.
//! `deploy/local/ha` starts, in a run directory of this test's own, three clustered NATS servers
//! and three Cassandra nodes (127.0.0.2-4); every fault's cluster migrates its keyspace at the
//! replication factor of `deploy/local/ha.env`, runs at its consistency, with the work stream at
//! its replicas, and is given every server and node as contact points. Then one server or node
//! (or one of each) goes away under load, and the checker wants 0 lost, 0 duplicates and 0 out
//! of order, as in the fault suite.
//!
//! `CHATOY_HA_FAULTS` picks the faults (comma-separated, or `all`); by default the short pass
//! of the test command: `kill-nats,kill-cql`. `CHATOY_HA_RUN_DIR`, if set, is the run directory
//! to use (it must not exist yet), so that a caller can stop the back end even if this test
//! is killed (`scripts/test` does); otherwise it is a fresh temporary directory.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chatoy_testkit::services::Services;
use chatoy_testkit::{repo_root, run_checked, script, TempDir};

use crate::suite::{report, run_faults, selected, Backend, Fault, DOWN_FOR, MACHINE};

/// The faults of the HA back end, in the order they run.
const HA_FAULTS: [Fault; 5] = [
    Fault::KillNats,
    Fault::KillCql,
    Fault::NatsAndCql,
    Fault::RollingNats,
    Fault::RollingCql,
];

/// The test command's short pass.
const SHORT_PASS: [&str; 2] = ["kill-nats", "kill-cql"];

/// The CQL node the kill faults take away: the first contact point.
const KILLED_CQL: usize = 1;
/// The CQL node that goes with a NATS server (another one, so the driver's first contact
/// point is not always the one that is gone).
const PAIRED_CQL: usize = 2;

/// Longest a `deploy/local/ha` command may take (starting three Cassandra nodes included).
const SCRIPT_LIMIT: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_fault_suite() {
    let _machine = MACHINE.lock().await;
    let wanted: Option<HashSet<String>> = match selected("CHATOY_HA_FAULTS") {
        Some(names) if names.contains("all") => None,
        Some(names) => Some(names),
        None => Some(SHORT_PASS.iter().map(|name| name.to_string()).collect()),
    };
    if let Some(names) = &wanted {
        let known: Vec<&str> = HA_FAULTS.iter().map(|fault| fault.name()).collect();
        let unknown: Vec<&String> = names
            .iter()
            .filter(|name| !known.contains(&name.as_str()))
            .collect();
        assert!(
            unknown.is_empty(),
            "CHATOY_HA_FAULTS names unknown faults {unknown:?}; known: {known:?} or all"
        );
    }
    let started = Instant::now();
    let backend = Backend::Ha(HaBackend::start().await);
    eprintln!("HA back end up in {:.0} s", started.elapsed().as_secs_f64());
    let rows = run_faults(&HA_FAULTS, wanted.as_ref(), &backend).await;
    report(&rows, "ha-fault-table.md");
}

/// The three NATS servers and three CQL nodes, in a private run directory; stopped on drop.
pub(crate) struct HaBackend {
    run_dir: PathBuf,
    /// The run directory when this test made it (removed on drop unless the test failed).
    _temp: Option<TempDir>,
    services: Services,
    /// What the current fault took down and its end brings back: (`deploy/local/ha` start
    /// command, number).
    down: Mutex<Vec<(&'static str, usize)>>,
}

impl HaBackend {
    async fn start() -> HaBackend {
        let (run_dir, temp) = match std::env::var_os("CHATOY_HA_RUN_DIR").filter(|dir| !dir.is_empty()) {
            Some(dir) => {
                let dir = PathBuf::from(dir);
                std::fs::create_dir(&dir).unwrap_or_else(|err| {
                    panic!(
                        "CHATOY_HA_RUN_DIR {} must be a new directory: {err}",
                        dir.display()
                    )
                });
                (dir, None)
            }
            None => {
                let temp = TempDir::new();
                (temp.path().to_owned(), Some(temp))
            }
        };
        let mut backend = HaBackend {
            run_dir,
            _temp: temp,
            services: Services {
                nats_url: String::new(),
                cql_nodes: String::new(),
                replication_factor: 1,
                flags: Vec::new(),
            },
            down: Mutex::default(),
        };
        let output = backend.run(&["up"]).await;
        let field = |name: &str| {
            output
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .unwrap_or_else(|| panic!("deploy/local/ha up printed no {name}:\n{output}"))
                .trim()
                .to_owned()
        };
        let settings = settings();
        let setting = |name: &str| {
            settings
                .get(name)
                .unwrap_or_else(|| panic!("deploy/local/ha.env has no {name}"))
                .clone()
        };
        let replication_factor = setting("CHATOY_REPLICATION_FACTOR")
            .parse()
            .expect("CHATOY_REPLICATION_FACTOR is a number");
        backend.services = Services {
            nats_url: field("NATS_URL="),
            cql_nodes: field("CQL_NODES="),
            replication_factor,
            flags: vec![
                "--consistency".into(),
                setting("CHATOY_CONSISTENCY"),
                "--nats-replicas".into(),
                setting("CHATOY_NATS_REPLICAS"),
            ],
        };
        backend
    }

    /// The services for a fault's cluster.
    pub(crate) fn services(&self) -> Services {
        self.services.clone()
    }

    /// Runs `deploy/local/ha ARGS` on this back end; fails the test if it fails.
    async fn run(&self, args: &[&str]) -> String {
        let mut command = Command::new(script("ha"));
        command.args(args).env("CHATOY_RUN_DIR", &self.run_dir);
        let log = self.run_dir.join(format!("ha-{}.log", args.join("-")));
        let what = format!("deploy/local/ha {}", args.join(" "));
        run_checked(&mut command, &log, SCRIPT_LIMIT, &what).await
    }

    /// `deploy/local/ha ACTION N`.
    async fn act(&self, action: &str, n: usize) {
        self.run(&[action, &n.to_string()]).await;
    }

    /// Takes `n` down with `kill` and remembers to bring it back with `start`.
    async fn kill(&self, kill: &str, start: &'static str, n: usize) {
        self.act(kill, n).await;
        self.down.lock().expect("down").push((start, n));
    }

    /// The NATS server leading the work stream.
    async fn nats_leader(&self) -> usize {
        let output = self.run(&["nats-leader"]).await;
        output
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .next_back()
            .unwrap_or_else(|| panic!("deploy/local/ha nats-leader printed no number:\n{output}"))
    }
}

impl Drop for HaBackend {
    fn drop(&mut self) {
        let stopped = Command::new(script("ha"))
            .arg("down")
            .env("CHATOY_RUN_DIR", &self.run_dir)
            .status();
        if !matches!(stopped, Ok(status) if status.success()) {
            eprintln!(
                "could not stop the HA back end of {}: {stopped:?}",
                self.run_dir.display()
            );
        }
    }
}

/// The KEY=VALUE lines of `deploy/local/ha.env`.
fn settings() -> HashMap<String, String> {
    let path = repo_root().join("deploy/local/ha.env");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

/// Injects an HA fault; returns when it healed: at once for a killed server or node (the
/// others serve), at the end of a rolling restart.
pub(crate) async fn inject(fault: Fault, ha: &HaBackend) -> Instant {
    match fault {
        Fault::KillNats => {
            let leader = ha.nats_leader().await;
            ha.kill("kill-nats", "start-nats", leader).await;
        }
        Fault::KillCql => ha.kill("kill-cql", "start-cql", KILLED_CQL).await,
        Fault::NatsAndCql => {
            let leader = ha.nats_leader().await;
            tokio::join!(
                ha.kill("kill-nats", "start-nats", leader),
                ha.kill("kill-cql", "start-cql", PAIRED_CQL)
            );
        }
        Fault::RollingNats => {
            for n in 1..=3 {
                ha.act("stop-nats", n).await;
                ha.act("start-nats", n).await;
            }
        }
        Fault::RollingCql => {
            for n in 1..=3 {
                ha.act("stop-cql", n).await;
                ha.act("start-cql", n).await;
            }
        }
        other => panic!("{} is not a fault of the HA back end", other.name()),
    }
    Instant::now()
}

/// Starts what the fault killed, [`DOWN_FOR`] after the kill, all at once; returns when each
/// is back (a NATS server current, a CQL node seen up by every node).
pub(crate) async fn make_whole(ha: &HaBackend) {
    let down: Vec<(&str, usize)> = std::mem::take(&mut *ha.down.lock().expect("down"));
    if down.is_empty() {
        return;
    }
    tokio::time::sleep(DOWN_FOR).await;
    futures_util::future::join_all(down.into_iter().map(|(start, n)| ha.act(start, n))).await;
}
