"""The one-node Kubernetes cluster of scripts/k8s-e2e, run from inside its namespaces.

Usage (scripts/k8s-e2e runs it under `unshare --net --mount --pid --fork`):
    k8s_e2e.py RUN_DIR [--until node|deploy|e2e]

PID 1 of the namespace reaps every orphan (the daemons the scripts start, containerd's shims)
and its child does the work; when it exits the kernel ends whatever is left. The child mounts
tmpfs over the host paths the node's components write to no matter their flags, starts the
control plane, the node and the local Cassandra, deploys the add-ons and
deploy/k8s/overlays/local, waits until NATS, routers and gateways are Ready, runs the
end-to-end suite through the gateway Service, checks the HPA, runs the scale and rollout
checks under load, and tears everything down.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN = Path(sys.argv[1]).resolve()
UNTIL = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--until" else None
NODE_IP = "10.244.0.1"
CQL_PORT = "9042"
# Host paths the node's components write to whatever their flags (containerd's shim sockets
# and runc state, the CRI's pod network namespaces, the kubelet's device-plugin socket and
# /var/log/containers links, libcni's cache): a tmpfs each, private to this mount namespace.
PRIVATE_PATHS = ["/run/containerd", "/run/netns", "/var/lib/kubelet", "/var/log/containers", "/var/lib/cni"]
KUBECTL = str(Path(os.environ.get("CHATOY_CACHE_DIR", Path.home() / ".cache/chatoy")) / "kubernetes-v1.33.0/kubectl")
STARTED = time.monotonic()


def log(text):
    elapsed = time.monotonic() - STARTED
    print(f"[k8s-e2e {int(elapsed) // 60:2d}:{int(elapsed) % 60:02d}] {text}", file=sys.stderr, flush=True)


def run(*args, env=None, check=True, capture=False, timeout=None):
    """Runs a command; its output goes to ours unless captured."""
    result = subprocess.run(
        [str(a) for a in args], env={**os.environ, **(env or {})}, text=True, timeout=timeout,
        stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None,
    )
    if check and result.returncode != 0:
        detail = f"\n{result.stderr.strip()}" if capture else ""
        raise SystemExit(f"k8s-e2e: {' '.join(map(str, args))} exited {result.returncode}{detail}")
    return result


def kubectl(*args, **kwargs):
    return run(KUBECTL, "--kubeconfig", RUN / "kubeconfig", *args, **kwargs)


def kubectl_json(*args):
    return json.loads(kubectl(*args, "-o", "json", capture=True).stdout)


def become_init():
    """As PID 1 of a new PID namespace: forks the worker and reaps every process until the
    worker exits, then exits with its status (which ends the namespace's other processes)."""
    if os.getpid() != 1:
        return
    worker = os.fork()
    if worker == 0:
        return
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: os.kill(worker, signum))
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(1)
        except InterruptedError:
            continue
        if pid == worker:
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def private_mounts():
    run("mount", "--make-rslave", "/")
    for path in PRIVATE_PATHS:
        if not Path(path).is_dir():
            raise SystemExit(f"k8s-e2e: {path} is missing (scripts/k8s-e2e creates it)")
        run("mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "tmpfs", path)


def wait(what, predicate, limit, every=1.0):
    deadline = time.monotonic() + limit
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"k8s-e2e: {what}: not within {limit} s")
        time.sleep(every)


class Cluster:
    """What this run started, in start order, for the teardown."""

    def __init__(self):
        self.started = []

    def up(self):
        run(REPO / "scripts/k8s-node", "network")
        env = {"CHATOY_RUN_DIR": str(RUN), "CHATOY_CASSANDRA_ADDRESS": NODE_IP, "CHATOY_CQL_PORT": CQL_PORT}
        # Cassandra takes a minute: it starts while the control plane and the node come up.
        cassandra = subprocess.Popen([REPO / "deploy/local/cassandra", "start"], env={**os.environ, **env},
                                     stdout=subprocess.DEVNULL)
        self.started.append("cassandra")
        self.started.append("control-plane")
        run(REPO / "scripts/k8s-control-plane", "start", RUN, env={"CHATOY_K8S_ADDRESS": NODE_IP}, capture=True)
        run(REPO / "scripts/k8s-control-plane", "controllers", RUN)
        self.started.append("node")
        run(REPO / "scripts/k8s-node", "start", RUN)
        if cassandra.wait() != 0:
            raise SystemExit("k8s-e2e: deploy/local/cassandra start failed")
        log(f"Cassandra on {NODE_IP}:{CQL_PORT}")

    def down(self):
        """Stops what `up` started, last first; pods go with the node (their namespace)."""
        clean = True
        if "node" in self.started:
            # An aggregated API that does not answer would hold up the namespace's deletion.
            kubectl("delete", "apiservice", "v1beta1.metrics.k8s.io", "--ignore-not-found", check=False, capture=True)
            # The gateways and routers stop as on any cluster: SIGTERM, drain, exit.
            deleted = kubectl("delete", "namespace", "chatoy", "--ignore-not-found", "--timeout", "120s",
                              check=False, capture=True)
            if deleted.returncode != 0:
                clean = False
                log(f"the namespace chatoy was not deleted within 120 s: {deleted.stderr.strip()}")
                kubectl("get", "namespace", "chatoy", "-o", "jsonpath={.status}", check=False)
                kubectl("get", "all,pvc,endpointslices", "-n", "chatoy", "-o", "wide", check=False)
            # The add-ons too: their watches would keep the API server from stopping.
            kubectl("delete", "-f", REPO / "deploy/k8s/local-cluster", "--ignore-not-found", "--wait",
                    "--timeout", "60s", check=False, capture=True)
            run(REPO / "scripts/k8s-node", "stop", RUN, check=False)
        if "control-plane" in self.started:
            run(REPO / "scripts/k8s-control-plane", "stop", RUN, check=False)
        if "cassandra" in self.started:
            run(REPO / "deploy/local/cassandra", "stop", env={"CHATOY_RUN_DIR": str(RUN)}, check=False)
        return clean


def pod_ready(namespace, selector, count):
    pods = kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]
    ready = [
        p for p in pods
        if p["metadata"].get("deletionTimestamp") is None
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    ]
    return len(ready) == count


def node_smoke():
    """A pod of the pause image, Ready: the node runs containers in pod network namespaces."""
    kubectl("run", "smoke", "--image", "registry.k8s.io/pause:local", "--image-pull-policy", "Never",
            "--restart", "Never", capture=True)
    wait("the smoke pod Ready", lambda: pod_ready("default", "run=smoke", 1), 60)
    ip = kubectl("get", "pod", "smoke", "-o", "jsonpath={.status.podIP}", capture=True).stdout
    log(f"smoke pod Ready at {ip}")
    kubectl("delete", "pod", "smoke", "--wait", "--timeout", "60s", capture=True)


def nats_volumes():
    """A hostPath PersistentVolume under the run directory for each NATS server's claim (no
    storage provisioner here), bound to it in advance, owned by NATS's user."""
    volumes = []
    for n in range(3):
        path = RUN / "volumes" / f"nats-{n}"
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, 1000, 1000)
        volumes.append({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"chatoy-nats-{n}"},
            "spec": {
                "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "",
                "claimRef": {"namespace": "chatoy", "name": f"data-nats-{n}"},
                "hostPath": {"path": str(path), "type": "Directory"},
            },
        })
    path = RUN / "nats-volumes.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": volumes}))
    kubectl("apply", "-f", path, capture=True)


def rollout(kind, name, namespace, limit=300):
    kubectl("rollout", "status", f"{kind}/{name}", "-n", namespace, f"--timeout={limit}s")


def deploy():
    """The add-ons, then deploy/k8s/overlays/local; returns once NATS, the routers and the
    gateways are Ready and the keyspace is migrated."""
    kubectl("apply", "-f", REPO / "deploy/k8s/local-cluster", capture=True)
    nats_volumes()
    kubectl("apply", "-k", REPO / "deploy/k8s/overlays/local", capture=True)
    log("applied deploy/k8s/overlays/local")
    rollout("deployment", "coredns", "kube-system")
    rollout("statefulset", "nats", "chatoy")
    kubectl("wait", "-n", "chatoy", "--for=condition=Complete", "job/chatoy-migrate", "--timeout=300s", capture=True)
    rollout("deployment", "chatoy-router", "chatoy")
    # The Deployment starts with one gateway; the HPA (minReplicas 3) makes it three.
    wait("3 gateways Ready", lambda: pod_ready("chatoy", "app.kubernetes.io/component=gateway", 3), 300)
    rollout("deployment", "chatoy-gateway", "chatoy")
    log("NATS (3), routers (2) and gateways (3) Ready")


def service_url():
    """The gateway Service's node port on the node: what a cloud load balancer would send to."""
    service = kubectl_json("get", "service", "chatoy-gateway", "-n", "chatoy")
    port = next(p["nodePort"] for p in service["spec"]["ports"] if p["name"] == "http")
    return f"http://{NODE_IP}:{port}"


# The end-to-end tests that need a server of their own: other settings than the deployment's
# (CHATOY_E2E_EXTERNAL_FLAGS), its processes (stop, restart, pid, output), its metrics alone,
# or an empty store.
# They run in the cluster mode of scripts/test; here the harness fails them loudly, so a new
# test of that kind must be named here.
E2E_OWN_SERVER = {
    "flags": [
        "delivery::fifty_clients_in_five_rooms",
        "http_api::expired_token_is_refused",
        "limits::rate_limit_code_4_then_retry",
        "limits::socket_cap_answers_503",
        "limits::slow_consumer_is_closed_and_resumes_losslessly",
        "limits::connection_rate_per_address_429_and_per_gateway_503",
        "limits::failed_logins_lock_the_username_and_the_address",
        "limits::slow_and_oversized_http_requests",
        "malformed::ten_thousand_malformed_frames",
        "per_user::sockets_per_user_are_capped_with_a_clear_close",
        "per_user::rooms_per_user_are_capped",
        "per_user::a_socket_costs_the_same_in_a_thousand_rooms",
        "per_user::registrations_per_address_are_limited",
        "per_user::password_hashes_are_bounded",
        "per_user::an_expired_token_closes_its_socket",
        "resume::since_limit_keeps_the_newest_per_room",
        "resume::since_seam_with_a_concurrent_sender",
        "resume::a_slow_resuming_socket_holds_about_one_page",
        "security::listed_origins_get_cors_and_others_403",
        "security::any_origin_with_star",
        "security::tokens_and_passwords_never_reach_logs_or_other_answers",
        "websocket::max_auth_failures_is_configurable",
        "websocket::auth_deadline_closes_1008",
        "websocket::idle_peer_is_closed_but_a_reading_peer_is_kept",
    ],
    "processes": [
        "clients::terminal_client_resends_the_same_uuid_after_codes_4_and_5",
        "clients::terminal_client_tail_resumes_across_a_restart",
        "limits::store_unavailable_code_5_then_retry",
        "restart::sigterm_drains_and_data_survives_restart",
    ],
    "metrics": ["http_api::health_ready_and_metrics"],
    # The protocol's seed frames name user 1 and room 1: a fresh server's.
    "fresh": ["websocket::seed_examples_verbatim"],
}
# What every gateway of deploy/k8s/overlays/local runs with, as the harness's flags.
E2E_EXTERNAL_FLAGS = (
    "--argon2-memory-kib 1024 --argon2-iterations 1 --register-rate-per-ip 0 "
    "--msg-rate 1000000 --msg-burst 1000000 --send-timeout 2s"
)


def cargo_test(*args, env):
    # Built before the namespaces were made (scripts/k8s-e2e): nothing to fetch.
    run("cargo", "test", "--locked", "-p", "chatoy", *args, env={"CARGO_NET_OFFLINE": "true", **env})


def run_e2e(url):
    skip = [arg for names in E2E_OWN_SERVER.values() for name in names for arg in ("--skip", name)]
    log(f"end-to-end suite through the gateway Service ({len(skip) // 2} tests that need their own server left out)")
    cargo_test("--test", "e2e", "--", "--test-threads=4", *skip, env={
        "CHATOY_E2E_MODE": "external", "CHATOY_E2E_URL": url, "CHATOY_E2E_EXTERNAL_FLAGS": E2E_EXTERNAL_FLAGS,
    })


def check_hpa():
    """The gateways' HPA reads their CPU from metrics-server (the resource metrics API through
    the API server's aggregation layer); then it goes, so kubectl can scale by hand."""
    def reading():
        hpa = kubectl_json("get", "hpa", "chatoy-gateway", "-n", "chatoy")
        status = hpa.get("status", {})
        active = any(c["type"] == "ScalingActive" and c["status"] == "True" for c in status.get("conditions", []))
        metrics = [m["resource"]["current"].get("averageUtilization") for m in status.get("currentMetrics") or []
                   if m.get("type") == "Resource"]
        if active and metrics and metrics[0] is not None:
            return status, metrics[0]
        return None

    wait("the HPA reading the gateways' CPU", lambda: reading() is not None, 180, every=2)
    status, utilization = reading()
    top = kubectl("top", "pods", "-n", "chatoy", "-l", "app.kubernetes.io/component=gateway", capture=True).stdout
    log(f"HPA: {status['currentReplicas']} gateways, CPU at {utilization}% of requests (ScalingActive)\n{top.rstrip()}")
    kubectl("delete", "hpa", "chatoy-gateway", "-n", "chatoy", capture=True)


def run_load_checks(url):
    log("scale and rollouts under load (tests/faults/k8s.rs)")
    cargo_test("--test", "faults", "--", "--ignored", "--exact", "k8s::k8s_scale_and_rollouts", "--nocapture", env={
        "CHATOY_K8S_URL": url, "CHATOY_KUBECTL": KUBECTL, "KUBECONFIG": str(RUN / "kubeconfig"),
    })


def hold():
    """Keeps the cluster up for CHATOY_K8S_HOLD seconds (or until interrupted), to look at it."""
    seconds = int(os.environ.get("CHATOY_K8S_HOLD", "0"))
    if not seconds:
        return
    log(f"holding the cluster for {seconds} s (CHATOY_K8S_HOLD; Ctrl-C ends it): from another shell, "
        f"nsenter --net=/proc/$(pgrep -f 'kubelet --config {RUN}')/ns/net {KUBECTL} --kubeconfig {RUN / 'kubeconfig'} ...")
    try:
        time.sleep(seconds)
    except KeyboardInterrupt:
        pass


def main():
    become_init()
    # SIGTERM ends the run like Ctrl-C: through the teardown.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    private_mounts()
    cluster = Cluster()
    try:
        cluster.up()
        node_smoke()
        if UNTIL == "node":
            return
        deploy()
        url = service_url()
        log(f"gateway Service at {url}")
        if UNTIL == "deploy":
            return
        run_e2e(url)
        if UNTIL == "e2e":
            return
        check_hpa()
        run_load_checks(url)
    finally:
        hold()
        log("teardown")
        if not cluster.down():
            raise SystemExit("k8s-e2e: the teardown was not clean (above)")
    log("done")


main()
