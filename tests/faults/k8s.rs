//! Scaling and rollouts on Kubernetes under load (scripts/k8s-e2e): the fault suite's load and
//! checker against a deployment of deploy/k8s/overlays/local that this test did not start,
//! through its gateway Service, while `kubectl` scales the gateways 3 → 1 → 3 and restarts the
//! gateways and then the routers. One row per action; every row must lose, duplicate and
//! misorder nothing that was acknowledged.
//!
//! Needs that cluster, so it runs only when asked for (`--ignored`, as scripts/k8s-e2e does):
//! `CHATOY_K8S_URL` (the Service, `http://HOST:PORT`), `CHATOY_KUBECTL` and `KUBECONFIG`.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::suite::{load_duration, report, Fault, Load, MACHINE};
use chatoy_testkit::Api;

/// The namespace of deploy/k8s.
const NAMESPACE: &str = "chatoy";
/// The longest a scale or a rollout may take (a gateway drains for up to 30 s).
const ROLLOUT_LIMIT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the Kubernetes cluster of scripts/k8s-e2e, which runs it"]
async fn k8s_scale_and_rollouts() {
    let _machine = MACHINE.lock().await;
    let url = env("CHATOY_K8S_URL");
    let kubectl = Kubectl {
        path: env("CHATOY_KUBECTL"),
    };
    env("KUBECONFIG");
    let api = Api::new(url.clone(), Vec::new());
    let balanced = format!("ws://{}/ws", url.trim_start_matches("http://"));
    let load = load_duration();
    let mut rows = Vec::new();
    for fault in [
        Fault::ScaleGateways,
        Fault::RolloutGateways,
        Fault::RolloutRouters,
    ] {
        eprintln!("== {}: {}", fault.name(), fault.describe());
        let run = Load::start(api.clone(), &balanced, |_| balanced.clone()).await;
        tokio::time::sleep(load.saturating_sub(run.elapsed())).await;
        let acted = Instant::now();
        match fault {
            Fault::ScaleGateways => {
                kubectl.scale("chatoy-gateway", 1).await;
                kubectl.scale("chatoy-gateway", 3).await;
            }
            Fault::RolloutGateways => kubectl.rollout_restart("chatoy-gateway", 3).await,
            Fault::RolloutRouters => kubectl.rollout_restart("chatoy-router", 2).await,
            other => panic!("{} is not a Kubernetes action", other.name()),
        }
        eprintln!("   done in {:.1} s", acted.elapsed().as_secs_f64());
        let healed = Instant::now();
        let snapshot = run.acked();
        let catch_up = run.caught_up_after(&snapshot, healed).await;
        tokio::time::sleep(load).await;
        rows.push(run.finish(fault, catch_up).await);
    }
    report(&rows, "k8s-table.md");
}

fn env(name: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
        .unwrap_or_else(|| panic!("{name} is not set: run this test through scripts/k8s-e2e"))
}

struct Kubectl {
    path: String,
}

impl Kubectl {
    /// Runs `kubectl -n chatoy ARGS`, failing the test if it fails; returns its output.
    async fn run(&self, args: &[&str]) -> String {
        let mut command = Command::new(&self.path);
        command.arg("-n").arg(NAMESPACE).args(args);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("kubectl task")
            .unwrap_or_else(|err| panic!("kubectl {args:?}: {err}"));
        assert!(
            output.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Scales `deployment` to `replicas` and returns once exactly that many of its pods exist,
    /// all Ready (the removed ones drained and gone).
    async fn scale(&self, deployment: &str, replicas: usize) {
        let count = format!("--replicas={replicas}");
        self.run(&["scale", "deployment", deployment, &count]).await;
        self.settled(deployment, replicas).await;
    }

    /// Restarts every pod of `deployment` (a rolling update) and returns once the rollout is
    /// complete and only its `replicas` new pods exist, all Ready.
    async fn rollout_restart(&self, deployment: &str, replicas: usize) {
        let target = format!("deployment/{deployment}");
        self.run(&["rollout", "restart", &target]).await;
        let limit = format!("--timeout={}s", ROLLOUT_LIMIT.as_secs());
        self.run(&["rollout", "status", &target, &limit]).await;
        self.settled(deployment, replicas).await;
    }

    /// Waits until `deployment`'s pods are exactly `replicas`, none terminating, all Ready.
    async fn settled(&self, deployment: &str, replicas: usize) {
        let component = deployment.trim_start_matches("chatoy-");
        let selector = format!("app.kubernetes.io/name=chatoy,app.kubernetes.io/component={component}");
        let template = "{range .items[*]}{.metadata.name} {.metadata.deletionTimestamp} \
                        {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}";
        let jsonpath = format!("jsonpath={template}");
        let deadline = Instant::now() + ROLLOUT_LIMIT;
        loop {
            let pods = self.run(&["get", "pods", "-l", &selector, "-o", &jsonpath]).await;
            let lines: Vec<&str> = pods.lines().filter(|line| !line.trim().is_empty()).collect();
            // A Ready pod that is not terminating: "NAME True" (no deletion timestamp).
            let ready = lines
                .iter()
                .filter(|line| {
                    line.split_whitespace().collect::<Vec<_>>().len() == 2 && line.ends_with(" True")
                })
                .count();
            if lines.len() == replicas && ready == replicas {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{deployment}: not {replicas} Ready pods within {ROLLOUT_LIMIT:?}:\n{pods}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
