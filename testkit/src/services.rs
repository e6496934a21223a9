//! The services a cluster runs on: by default the shared NATS and Cassandra that the test
//! command started (named by the environment), and the guard of the shared Cassandra node for
//! the tests that stop it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::{run_checked, script, TempDir};

/// The NATS and CQL services a cluster runs on: by default the shared ones of the test command,
/// from the environment.
#[derive(Debug, Clone)]
pub struct Services {
    /// `CHATOY_NATS_URL` (one URL or several, comma-separated).
    pub nats_url: String,
    /// `CHATOY_CQL_NODES` (one node or several, comma-separated).
    pub cql_nodes: String,
    /// The replication factor keyspaces are migrated with (1 on the shared node).
    pub replication_factor: u32,
    /// Flags every router and gateway gets on these services (`--consistency`, ...).
    pub flags: Vec<String>,
}

impl Services {
    /// Reads the services from the environment; a missing one fails the test loudly.
    pub fn from_env() -> Services {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|value| !value.trim().is_empty())
                .unwrap_or_else(|| {
                    panic!(
                        "{name} is not set: cluster tests need the shared NATS and Cassandra that \
                         scripts/test starts (by hand: `CHATOY_RUN_DIR=/tmp/e2e-services \
                         deploy/local/nats start` and `... deploy/local/cassandra start`, then \
                         export CHATOY_NATS_URL=nats://127.0.0.1:PORT and \
                         CHATOY_CQL_NODES=127.0.0.1:PORT)"
                    )
                })
        };
        Services {
            nats_url: var("CHATOY_NATS_URL"),
            cql_nodes: var("CHATOY_CQL_NODES"),
            replication_factor: 1,
            flags: Vec::new(),
        }
    }
}

/// Stops and starts the test command's Cassandra node (`CHATOY_SERVICES_RUN_DIR`) with
/// `deploy/local/cassandra`; if the node is stopped when the guard is dropped, it starts it
/// again (blocking), so the tests after a failed one find it.
pub struct SharedCassandra {
    run_dir: PathBuf,
    logs: TempDir,
    stopped: bool,
}

impl SharedCassandra {
    /// The guard; fails the test if `CHATOY_SERVICES_RUN_DIR` is not set.
    pub fn new() -> SharedCassandra {
        let run_dir = std::env::var("CHATOY_SERVICES_RUN_DIR")
            .ok()
            .filter(|dir| !dir.trim().is_empty())
            .unwrap_or_else(|| {
                panic!(
                    "CHATOY_SERVICES_RUN_DIR is not set: stopping and starting the shared \
                     Cassandra needs the run directory it was started with"
                )
            });
        SharedCassandra {
            run_dir: PathBuf::from(run_dir),
            logs: TempDir::new(),
            stopped: false,
        }
    }

    fn command(&self, action: &str) -> Command {
        let mut command = Command::new(script("cassandra"));
        command.arg(action).env("CHATOY_RUN_DIR", &self.run_dir);
        command
    }

    async fn run(&mut self, action: &str) -> String {
        let log = self.logs.path().join(format!("cassandra-{action}.log"));
        let what = format!("deploy/local/cassandra {action}");
        run_checked(&mut self.command(action), &log, Duration::from_secs(300), &what).await
    }

    /// Stops the node (drains it first).
    pub async fn stop(&mut self) {
        self.stopped = true;
        self.run("stop").await;
    }

    /// Starts the node again and checks it is back on the port the tests know.
    pub async fn start(&mut self) {
        let output = self.run("start").await;
        self.stopped = false;
        let port = output
            .lines()
            .find_map(|line| line.strip_prefix("CQL_PORT="))
            .unwrap_or_else(|| panic!("no CQL_PORT from deploy/local/cassandra start:\n{output}"));
        assert!(
            Services::from_env()
                .cql_nodes
                .ends_with(&format!(":{}", port.trim())),
            "the node came back on another port ({port})"
        );
    }
}

impl Default for SharedCassandra {
    fn default() -> SharedCassandra {
        SharedCassandra::new()
    }
}

impl Drop for SharedCassandra {
    fn drop(&mut self) {
        if self.stopped {
            eprintln!("starting the shared Cassandra again after a failure");
            let started = self
                .command("start")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status();
            if !matches!(started, Ok(status) if status.success()) {
                eprintln!("could not start the shared Cassandra again: {started:?}");
            }
        }
    }
}
