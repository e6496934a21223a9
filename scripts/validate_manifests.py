"""The checks of scripts/validate-manifests, run on the rendered overlays.

Usage: validate_manifests.py WORK CHATOY_BIN KUBECTL KUBECONFIG [--self-test]

WORK holds dev.yaml, prod.yaml and local.yaml (kustomize's output) and help-<role>.txt (`chatoy <role>
--help`). Every object goes to a real kube-apiserver (server-side dry run, strict field
validation, the operators' CRDs installed), then the manifests are checked against the binary
and against themselves. With --self-test, broken copies of the prod overlay must each be
refused with the expected error.
"""
import copy
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

WORK, BINARY, KUBECTL, KUBECONFIG = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
SELF_TEST = "--self-test" in sys.argv[5:]
# Settings every gateway, router and migrate Job of a deployment must agree on.
SHARED_SETTINGS = (
    "CHATOY_PARTITIONS", "CHATOY_NATS_PREFIX", "CHATOY_BUCKET_WIDTH", "CHATOY_KEYSPACE",
    "CHATOY_CONSISTENCY", "CHATOY_DATACENTER", "CHATOY_NATS_REPLICAS", "CHATOY_NATS_URL",
    "CHATOY_CQL_NODES",
)


def seconds(text):
    """A humantime duration as the binary reads it (only the units used here)."""
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text):
        scale = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}.get(unit)
        if scale is None:
            raise ValueError(f"unit {unit!r} in {text!r}")
        total += float(number) * scale
    return total


def read_roles():
    """What the binary reads: per role, its CHATOY_* variables (with defaults), its flags and
    which variable each flag sets."""
    roles = {}
    for role in ("gateway", "router", "migrate"):
        text = (WORK / f"help-{role}.txt").read_text()
        env, flag_env = {}, {}
        for block in re.split(r"\n(?=\s+(?:-\w, )?--\w)", text):
            name = re.search(r"\[env: (CHATOY_[A-Z0-9_]+)", block)
            if name:
                default = re.search(r"\[default: ([^\]]*)\]", block)
                env[name.group(1)] = default.group(1) if default else None
                flag = re.search(r"--[a-z0-9-]+", block)
                if flag:
                    flag_env[flag.group(0)] = name.group(1)
        roles[role] = {"env": env, "flags": set(re.findall(r"--[a-z0-9-]+", text)), "flag_env": flag_env}
    return roles


ROLES = read_roles()
# The production topology as deploy/local/cluster up --ha runs it on one machine: the manifests
# must have the same shape (KEY=VALUE lines).
LOCAL_HA = dict(
    line.strip().split("=", 1) for line in Path("deploy/local/ha.env").read_text().splitlines()
    if line.strip() and not line.lstrip().startswith("#")
)
METRIC_SOURCE = Path("gateway/src/metrics.rs").read_text() + Path("router/src/metrics.rs").read_text()
KNOWN_METRICS = set(re.findall(r'"(chatoy_[a-z_]+)"', METRIC_SOURCE))


def matches(selector, labels):
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        have = labels.get(expr["key"])
        if expr["operator"] == "In" and have not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and have in expr["values"]:
            return False
        if expr["operator"] == "Exists" and have is None:
            return False
    return True


def replicas_needed(level, rf):
    """Replicas a read or write at `level` waits for, with `rf` replicas in the datacenter."""
    if level in ("one", "local-one"):
        return 1
    if level == "all":
        return rf
    return rf // 2 + 1


class Overlay:
    """One rendered overlay under check; `errors` collects what is wrong with it."""

    def __init__(self, name, docs, quiet=False):
        self.name, self.docs, self.quiet, self.errors = name, docs, quiet, []
        self.by_kind = {}
        for doc in docs:
            self.by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
        self.maps = {**self.by_kind.get("ConfigMap", {}), **self.by_kind.get("Secret", {})}
        # (object, pod labels, pod spec) of every workload, and each chatoy container's role and
        # effective configuration (defaults, envFrom, env, flags).
        self.pods, self.chatoy = [], []

    def fail(self, where, what):
        self.errors.append(f"{self.name}: {where}: {what}")

    def say(self, text):
        if not self.quiet:
            print(f"{self.name}: {text}")

    def data_of(self, ref_name):
        obj = self.maps.get(ref_name)
        if obj is None:
            return None
        return {**(obj.get("data") or {}), **(obj.get("stringData") or {})}

    def check(self, server=True):
        if server:
            self.server_dry_run()
        self.check_containers()
        self.check_selectors()
        self.check_monitors()
        self.check_back_end()
        for rule_set in self.by_kind.get("PrometheusRule", {}).values():
            for group in rule_set["spec"]["groups"]:
                for rule in group["rules"]:
                    check_metrics(self, f"PrometheusRule {rule.get('alert')}", rule["expr"])
        return self.errors

    # 1. The real API: built-in objects and custom resources, strict about unknown fields.
    def server_dry_run(self):
        kubectl = [KUBECTL, "--kubeconfig", KUBECONFIG, "--cache-dir", str(Path(KUBECONFIG).parent / "kube-cache"),
                   "--request-timeout", "60s"]
        slug = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        namespaces = [d for d in self.docs if d["kind"] == "Namespace"]
        if namespaces:
            # Objects can only be created (even in a dry run) in a namespace that exists.
            path = WORK / f"{slug}-namespaces.yaml"
            path.write_text(yaml.safe_dump_all(namespaces))
            result = subprocess.run([*kubectl, "apply", "-f", path], capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                self.fail("kubectl apply (namespaces)", result.stderr.strip())
        path = WORK / f"{slug}.yaml"
        path.write_text(yaml.safe_dump_all(self.docs))
        result = subprocess.run(
            [*kubectl, "apply", "--dry-run=server", "--validate=strict", "-f", path],
            capture_output=True, text=True, timeout=300,
        )
        # Errors and warnings (deprecated APIs, ...) alike are failures.
        for line in result.stderr.splitlines():
            if line.strip():
                self.fail("kube-apiserver", re.sub(r'error when [a-z]+ "[^"]*": ', "", line.strip()))
        accepted = [line for line in result.stdout.splitlines() if line.endswith("(server dry run)")]
        if result.returncode != 0 and not result.stderr.strip():
            self.fail("kube-apiserver", f"kubectl apply --dry-run=server exited {result.returncode}")
        if not result.stderr.strip() and len(accepted) != len(self.docs):
            self.fail("kube-apiserver", f"accepted {len(accepted)} of {len(self.docs)} objects")
        groups = {d["kind"]: d["apiVersion"].rpartition("/")[0] for d in self.docs}
        custom = sorted(k for k, g in groups.items() if "." in g and not g.endswith(".k8s.io"))
        self.say(f"{len(accepted)} of {len(self.docs)} objects accepted by kube-apiserver (server-side dry run, "
                 f"strict field validation; custom resources: {', '.join(custom) or 'none'})")

    # 2. Containers against the binary.
    def check_containers(self):
        for kind in ("Deployment", "StatefulSet", "Job"):
            for obj in self.by_kind.get(kind, {}).values():
                template = obj["spec"]["template"]
                self.pods.append((obj, template["metadata"].get("labels", {}), template["spec"]))
        consumers = {}
        for obj, _, spec in self.pods:
            where = f"{obj['kind']}/{obj['metadata']['name']}"
            for container in spec["containers"]:
                if container["image"].split(":")[0].split("/")[-1] != "chatoy":
                    continue
                args = container.get("args") or []
                role = args[0] if args else "gateway"
                if role not in ROLES:
                    self.fail(where, f"runs chatoy {role}, not gateway, router or migrate")
                    continue
                known = ROLES[role]
                for arg in args[1:]:
                    if arg.startswith("--") and arg.split("=")[0] not in known["flags"]:
                        self.fail(where, f"chatoy {role} has no flag {arg}")
                env = {}
                for source in container.get("envFrom") or []:
                    ref = (source.get("configMapRef") or source.get("secretRef"))["name"]
                    data = self.data_of(ref)
                    if data is None:
                        self.fail(where, f"envFrom names {ref}, which is not in the manifests")
                        continue
                    consumers.setdefault(ref, set()).add(role)
                    env.update(data)
                for var in container.get("env") or []:
                    if var["name"].startswith("CHATOY_") and var["name"] not in known["env"]:
                        self.fail(where, f"chatoy {role} does not read {var['name']}")
                    env[var["name"]] = var.get("value", "(from the pod)")
                container_env = {k: v for k, v in env.items() if k in known["env"]}
                effective = {**{k: v for k, v in known["env"].items() if v is not None}, **container_env}
                for flag, value in zip(args[1:], args[2:]):
                    if flag in known["flag_env"]:
                        effective[known["flag_env"][flag]] = value
                self.chatoy.append((obj, role, effective))
                check_values(self, where, role, container_env, args)
                self.check_role(obj, role, spec, container, container_env)
        for ref, users in consumers.items():
            known = set().union(*(ROLES[r]["env"] for r in users))
            for key in self.data_of(ref):
                if key.startswith("CHATOY_") and key not in known:
                    self.fail(ref, f"{key} is read by none of {sorted(users)}")
                elif not key.startswith("CHATOY_"):
                    self.fail(ref, f"{key} is not a CHATOY_* variable")
        for var in SHARED_SETTINGS:
            values = {cfg[var] for _, _, cfg in self.chatoy if var in cfg}
            if len(values) > 1:
                users = sorted({f"{o['kind']}/{o['metadata']['name']}={c.get(var)}" for o, _, c in self.chatoy if var in c})
                self.fail(var, f"gateways, routers and the migrate Job must agree, but: {', '.join(users)}")

    def check_role(self, obj, role, spec, container, env):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}

        def value(var):
            return env.get(var, ROLES[role]["env"].get(var))

        if role not in ("gateway", "router"):
            return
        listen = value("CHATOY_LISTEN") or ""
        host, _, port = listen.rpartition(":")
        if host in ("127.0.0.1", "localhost", "[::1]"):
            self.fail(where, f"CHATOY_LISTEN {listen} is loopback: probes and clients cannot reach it")
        for probe_name, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            probe = (container.get(probe_name) or {}).get("httpGet")
            if not probe:
                self.fail(where, f"no {probe_name} httpGet")
                continue
            if probe["path"] != path:
                self.fail(where, f"{probe_name} path {probe['path']}, expected {path}")
            probe_port = ports.get(probe["port"], probe["port"])
            if str(probe_port) != port:
                self.fail(where, f"{probe_name} port {probe_port} is not the CHATOY_LISTEN port {port}")
            if not serves(role, probe["path"]):
                self.fail(where, f"chatoy {role} does not answer 200 on {probe['path']}")
        try:
            drain = seconds(value("CHATOY_DRAIN_TIMEOUT") or "0s")
        except ValueError as err:
            self.fail(where, f"CHATOY_DRAIN_TIMEOUT: {err}")
            return
        pre_stop = (((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if role == "gateway" and pre_stop < 1:
            self.fail(where, "no preStop sleep: the balancer may still send new connections after SIGTERM")
        if grace < pre_stop + drain + 1:
            self.fail(where, f"terminationGracePeriodSeconds {grace} < preStop {pre_stop} s + CHATOY_DRAIN_TIMEOUT {drain:g} s + 1 s")
        self.say(f"{role}: probes /readyz and /healthz on :{port}; grace {grace} s >= preStop {pre_stop} s + drain {drain:g} s")

    def pods_matching(self, selector):
        return [(obj, spec) for obj, labels, spec in self.pods if matches(selector, labels)]

    # 3. Selectors select something.
    def check_selectors(self):
        where = lambda d: f"{d['kind']}/{d['metadata']['name']}"
        slices = self.by_kind.get("EndpointSlice", {}).values()
        for svc in self.by_kind.get("Service", {}).values():
            if "selector" not in svc["spec"]:
                # A Service for something outside the cluster: its EndpointSlices name it.
                named = [e for e in slices if e["metadata"].get("labels", {}).get("kubernetes.io/service-name") == svc["metadata"]["name"]]
                ports = {p.get("name") for e in named for p in e.get("ports") or []}
                if not named:
                    self.fail(where(svc), "has no selector and no EndpointSlice names it")
                for port in svc["spec"]["ports"]:
                    if named and port.get("name") not in ports:
                        self.fail(where(svc), f"port {port.get('name')} is in none of its EndpointSlices")
            elif not self.pods_matching({"matchLabels": svc["spec"]["selector"]}):
                self.fail(where(svc), "selects no pod")
        for pdb in self.by_kind.get("PodDisruptionBudget", {}).values():
            if not self.pods_matching(pdb["spec"]["selector"]):
                self.fail(where(pdb), "selects no pod")
        for hpa in self.by_kind.get("HorizontalPodAutoscaler", {}).values():
            target = hpa["spec"]["scaleTargetRef"]
            if target["name"] not in self.by_kind.get(target["kind"], {}):
                self.fail(where(hpa), f"scales {target['kind']}/{target['name']}, which is not in the manifests")
        for policy in self.by_kind.get("NetworkPolicy", {}).values():
            selector = policy["spec"]["podSelector"]
            operator_made = "scylla/cluster" in (selector.get("matchLabels") or {})
            if not operator_made and not self.pods_matching(selector):
                self.fail(where(policy), "selects no pod")
            for rule in policy["spec"].get("ingress") or []:
                for peer in rule.get("from") or []:
                    peer_selector = peer.get("podSelector")
                    if peer_selector and "scylla/cluster" not in (peer_selector.get("matchLabels") or {}):
                        if not self.pods_matching(peer_selector):
                            self.fail(where(policy), f"an ingress rule names pods that do not exist: {peer_selector}")

    # 4. Every ServiceMonitor scrapes a chatoy port that serves its path.
    def check_monitors(self):
        for monitor in self.by_kind.get("ServiceMonitor", {}).values():
            where = f"ServiceMonitor/{monitor['metadata']['name']}"
            services = [
                s for s in self.by_kind.get("Service", {}).values()
                if matches(monitor["spec"]["selector"], s["metadata"].get("labels", {}))
            ]
            if not services:
                self.fail(where, "selects no Service")
            for endpoint in monitor["spec"]["endpoints"]:
                path = endpoint.get("path", "/metrics")
                for svc in services:
                    port = next((p for p in svc["spec"]["ports"] if p.get("name") == endpoint["port"]), None)
                    if port is None:
                        self.fail(where, f"Service/{svc['metadata']['name']} has no port named {endpoint['port']}")
                        continue
                    target = port.get("targetPort", port["port"])
                    for obj, spec in self.pods_matching({"matchLabels": svc["spec"]["selector"]}):
                        for container in spec["containers"]:
                            numbers = {p["containerPort"] for p in container.get("ports") or [] if target in (p.get("name"), p["containerPort"])}
                            role = next((r for o, r, _ in self.chatoy if o is obj), None)
                            if numbers and role and not serves(role, path):
                                self.fail(where, f"chatoy {role} does not serve {path}")
                            if numbers:
                                self.say(f"{where} scrapes {path} on :{min(numbers)} of {obj['kind']}/{obj['metadata']['name']}")
                                break
                        else:
                            self.fail(where, f"{obj['kind']}/{obj['metadata']['name']} has no container port {target}")

    # 5. NATS and ScyllaDB agree with the configuration and with each other.
    def check_nats_lame_duck(self, nats, conf):
        """A stopping NATS server hands its stream leaderships over before it goes: preStop puts
        it in lame duck mode, and the grace period outlasts that mode."""
        where = "StatefulSet/nats"
        spec = nats["spec"]["template"]["spec"]
        pre_stop = ((spec["containers"][0].get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}
        pid = re.search(r"^\s*pid_file:\s*(\S+)\s*$", conf, re.M)
        if not pid or f"ldm={pid.group(1)}" not in pre_stop.get("command", []):
            self.fail(where, "no preStop `nats-server --signal ldm=<pid_file>`: a stopping server leaves its streams "
                             "without a leader until an election")
            return
        needed = 1 + nats_seconds(conf, "lame_duck_grace_period", 10) + nats_seconds(conf, "lame_duck_duration", 120) + 5
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if grace < needed:
            self.fail(where, f"terminationGracePeriodSeconds {grace} < lame duck mode's {needed - 5} s + 5 s")

    def check_back_end(self):
        config = {}
        for _, role, cfg in self.chatoy:
            for key, value in cfg.items():
                config.setdefault(key, value)
        services = self.by_kind.get("Service", {})
        nats = self.by_kind.get("StatefulSet", {}).get("nats")
        if nats:
            where = "StatefulSet/nats"
            servers = nats["spec"].get("replicas", 1)
            stream = int(config.get("CHATOY_NATS_REPLICAS", "1"))
            if stream != servers:
                self.fail(where, f"CHATOY_NATS_REPLICAS {stream} but the NATS StatefulSet has {servers} servers")
            conf = (self.data_of("nats-config") or {}).get("nats.conf", "")
            routes = re.findall(r"nats://nats-(\d+)\.nats-headless:6222", conf)
            if sorted(map(int, routes)) != list(range(servers)):
                self.fail("ConfigMap/nats-config", f"routes {routes} do not name the {servers} servers")
            for pdb in self.by_kind.get("PodDisruptionBudget", {}).values():
                if any(o is nats for o, _ in self.pods_matching(pdb["spec"]["selector"])):
                    down = pdb["spec"].get("maxUnavailable", servers - pdb["spec"].get("minAvailable", servers))
                    if not isinstance(down, int) or down > (stream - 1) // 2:
                        self.fail(f"PodDisruptionBudget/{pdb['metadata']['name']}",
                                  f"lets {down} NATS servers go at once; the stream at {stream} replicas keeps its quorum with {(stream - 1) // 2}")
            url = re.match(r"nats://(?:[^@/]*@)?([^:/]+):(\d+)", config.get("CHATOY_NATS_URL", ""))
            if not url or not any(s["metadata"]["name"] == url.group(1) and any(str(p["port"]) == url.group(2) for p in s["spec"]["ports"])
                                  for s in services.values()):
                self.fail("CHATOY_NATS_URL", f"{config.get('CHATOY_NATS_URL')} is not a port of a NATS Service in the manifests")
            local = (int(LOCAL_HA["HA_NATS_SERVERS"]), int(LOCAL_HA["CHATOY_NATS_REPLICAS"]))
            if (servers, stream) != local:
                self.fail(where, f"{servers} servers with the work stream at {stream} replicas, but the local HA topology "
                                 f"(deploy/local/ha.env) runs {local[0]} with {local[1]}")
            self.check_nats_lame_duck(nats, conf)
            self.say(f"NATS: {servers} servers, work stream at {stream} replicas, routes to each, disruption budget within quorum, "
                     "as in deploy/local/ha.env; a stopping server goes into lame duck mode first")
        if not self.by_kind.get("ScyllaCluster"):
            # No operator (the local overlay): the CQL nodes are Services of the manifests.
            for node in config.get("CHATOY_CQL_NODES", "").split(","):
                host, _, port = node.strip().rpartition(":")
                if not any(s["metadata"]["name"] == host and any(str(p["port"]) == port for p in s["spec"]["ports"])
                           for s in services.values()):
                    self.fail("CHATOY_CQL_NODES", f"{node} is not a port of a Service in the manifests")
        for scylla in self.by_kind.get("ScyllaCluster", {}).values():
            where = f"ScyllaCluster/{scylla['metadata']['name']}"
            datacenter = scylla["spec"]["datacenter"]
            if datacenter["name"] != config.get("CHATOY_DATACENTER"):
                self.fail(where, f"datacenter {datacenter['name']} is not CHATOY_DATACENTER {config.get('CHATOY_DATACENTER')}")
            members = sum(rack["members"] for rack in datacenter["racks"])
            client = f"{scylla['metadata']['name']}-client"
            for node in config.get("CHATOY_CQL_NODES", "").split(","):
                if node.strip().rsplit(":", 1)[0] != client:
                    self.fail("CHATOY_CQL_NODES", f"{node} is not the operator's Service {client}")
            migrations = [(o, c) for o, r, c in self.chatoy if r == "migrate"]
            if not migrations:
                self.fail(where, "no migrate Job creates the keyspace")
            for job, cfg in migrations:
                rf = int(cfg["CHATOY_REPLICATION_FACTOR"])
                level = cfg["CHATOY_CONSISTENCY"]
                here = f"{job['kind']}/{job['metadata']['name']}"
                if rf > members:
                    self.fail(here, f"replication factor {rf} but the ScyllaCluster has {members} members")
                need = replicas_needed(level, rf)
                if need > rf:
                    self.fail("CHATOY_CONSISTENCY", f"{level} needs {need} replicas, the replication factor is {rf}")
                if 2 * need <= rf:
                    self.fail("CHATOY_CONSISTENCY", f"{level} with replication factor {rf}: a read of {need} replica(s) may miss an acknowledged write to {need}")
                if rf >= 3 and need > rf - 1:
                    self.fail("CHATOY_CONSISTENCY", f"{level} with replication factor {rf}: one member down stops reads and writes")
                local_rf, local_level = int(LOCAL_HA["CHATOY_REPLICATION_FACTOR"]), LOCAL_HA["CHATOY_CONSISTENCY"]
                local = (int(LOCAL_HA["HA_CQL_NODES"]), local_rf, replicas_needed(local_level, local_rf))
                if (members, rf, need) != local:
                    self.fail(here, f"{members} members, RF {rf}, {level} waiting for {need} replicas, but the local HA topology "
                                    f"(deploy/local/ha.env) runs {local[0]} nodes, RF {local_rf}, {local_level} waiting for {local[2]}")
                self.say(f"ScyllaDB: {members} members in {datacenter['name']}, keyspace RF {rf}, {level} "
                         f"({need} of {rf} replicas: reads see acknowledged writes, one member may be down)")


def nats_seconds(conf, key, default):
    """A nats.conf duration in seconds (`10s`, `2m`), or `default` when the key is absent."""
    found = re.search(rf"^\s*{key}:\s*\"?(\d+)(s|m)\"?\s*$", conf, re.M)
    return default if not found else int(found.group(1)) * (60 if found.group(2) == "m" else 1)


def check_metrics(report, where, text):
    for metric in re.findall(r"\bchatoy_[a-z_]+", text):
        base = re.sub(r"_(bucket|sum|count)$", "", metric)
        if metric not in KNOWN_METRICS and base not in KNOWN_METRICS:
            report.fail(where, f"{metric} is not a metric of gateway/src/metrics.rs or router/src/metrics.rs")


accepted_values = {}


def check_values(report, where, role, env, args):
    """Starts `chatoy <role>` with the manifest's variables and arguments, NATS and ScyllaDB
    pointed at closed local ports: clap parses everything first and exits 2 on a bad value;
    any other outcome (a connection error, or still running) means the values were accepted."""
    env = {k: v for k, v in env.items() if v != "(from the pod)"}
    env.update(CHATOY_NATS_URL="nats://127.0.0.1:9", CHATOY_CQL_NODES="127.0.0.1:9", CHATOY_LISTEN="127.0.0.1:0")
    key = (role, tuple(sorted(env.items())), tuple(args))
    if key not in accepted_values:
        process = subprocess.Popen(
            [BINARY, *args] if args else [BINARY, role],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            _, stderr = process.communicate(timeout=3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            stderr = ""
        accepted_values[key] = stderr.strip() if process.returncode == 2 else None
    if accepted_values[key] is not None:
        report.fail(where, f"chatoy {role} refuses the manifest's configuration: {accepted_values[key]}")


probed = {}


def serves(role, path):
    """Whether chatoy <role> answers 200 on `path`. A real chatoy is asked: standalone serves
    the gateway's HTTP, and a router's probe port answers the same paths from the same code
    (gateway/src/health.rs); a router itself cannot start here without NATS and ScyllaDB."""
    if path not in probed:
        with tempfile.TemporaryDirectory() as data:
            process = subprocess.Popen(
                [BINARY, "standalone", "--listen", "127.0.0.1:0", "--data-dir", data],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={},
            )
            try:
                address = process.stdout.readline().strip().rsplit("http://", 1)[-1]
                for wanted in ("/readyz", "/healthz", "/metrics", path):
                    status = 0
                    for _ in range(50):
                        try:
                            status = urllib.request.urlopen(f"http://{address}{wanted}", timeout=2).status
                            break
                        except Exception:
                            time.sleep(0.1)
                    probed[wanted] = status == 200
            finally:
                process.terminate()
                process.wait(timeout=30)
    return probed[path]


def find(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def rename(mapping, old, new):
    mapping[new] = mapping.pop(old)


# Broken copies of the prod overlay, and the error each must produce. The first three are
# caught only by the API server (its strict decoding names the field).
SELF_TESTS = [
    ("a misspelt field in the ScyllaCluster's spec",
     lambda docs: rename(find(docs, "ScyllaCluster", "scylla")["spec"], "developerMode", "developerMod"),
     'strict decoding error: unknown field "spec.developerMod"'),
    ("a misspelt field in the gateway Deployment's spec",
     lambda docs: rename(find(docs, "Deployment", "chatoy-gateway")["spec"], "revisionHistoryLimit", "revisionHistoryLimt"),
     'strict decoding error: unknown field "spec.revisionHistoryLimt"'),
    ("a misspelt field in a ServiceMonitor's endpoint",
     lambda docs: rename(find(docs, "ServiceMonitor", "chatoy-gateway")["spec"]["endpoints"][0], "interval", "intervall"),
     'strict decoding error: unknown field "spec.endpoints[0].intervall"'),
    ("CHATOY_NATS_REPLICAS not the number of NATS servers",
     lambda docs: find(docs, "ConfigMap", "chatoy")["data"].update(CHATOY_NATS_REPLICAS="1"),
     "CHATOY_NATS_REPLICAS 1 but the NATS StatefulSet has 3 servers"),
    ("a replication factor above the ScyllaCluster's members",
     lambda docs: find(docs, "Job", "chatoy-migrate")["spec"]["template"]["spec"]["containers"][0].update(
         args=["migrate", "--replication-factor", "5"]),
     "replication factor 5 but the ScyllaCluster has 3 members"),
    ("consistency one with replication factor 3",
     lambda docs: find(docs, "ConfigMap", "chatoy")["data"].update(CHATOY_CONSISTENCY="one"),
     "may miss an acknowledged write"),
    ("NATS servers and stream replicas other than the local HA topology's",
     lambda docs: (find(docs, "StatefulSet", "nats")["spec"].update(replicas=5),
                   find(docs, "ConfigMap", "chatoy")["data"].update(CHATOY_NATS_REPLICAS="5")),
     "but the local HA topology (deploy/local/ha.env) runs 3 with 3"),
    ("a replication factor other than the local HA topology's",
     lambda docs: find(docs, "Job", "chatoy-migrate")["spec"]["template"]["spec"]["containers"][0].update(
         args=["migrate", "--replication-factor", "2"]),
     "but the local HA topology (deploy/local/ha.env) runs 3 nodes, RF 3"),
    ("NATS servers stopped without lame duck mode",
     lambda docs: find(docs, "StatefulSet", "nats")["spec"]["template"]["spec"]["containers"][0].pop("lifecycle"),
     "no preStop `nats-server --signal ldm=<pid_file>`"),
    ("the routers' partitions not the gateways'",
     lambda docs: find(docs, "ConfigMap", "chatoy-router")["data"].update(CHATOY_PARTITIONS="8"),
     "CHATOY_PARTITIONS: gateways, routers and the migrate Job must agree"),
]


def self_test(prod_docs):
    def run(case):
        docs = copy.deepcopy(prod_docs)
        case[1](docs)
        # The API server is asked only where the expected error is its own.
        return Overlay(f"self-test: {case[0]}", docs, quiet=True).check(server=case[2].startswith("strict decoding"))

    failures = []
    # The cases are independent (a dry run changes nothing): a few at a time.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, SELF_TESTS))
    for (title, _, expected), errors in zip(SELF_TESTS, results):
        found = [e for e in errors if expected in e]
        if found:
            print(f"self-test: {title}: refused as expected ({found[0].split(': ', 2)[-1]})")
        else:
            failures.append(f"self-test: {title}: not refused with {expected!r}; errors: {errors or 'none'}")
    return failures


def main():
    errors, rendered = [], {}
    for overlay in ("dev", "prod", "local"):
        docs = [d for d in yaml.safe_load_all((WORK / f"{overlay}.yaml").read_text()) if d]
        if not docs:
            errors.append(f"{overlay}: rendered no object")
            continue
        rendered[overlay] = docs
        errors += Overlay(overlay, docs).check()

    dashboard = json.loads(Path("deploy/grafana/chatoy.json").read_text())
    expressions = [t.get("expr", "") for p in dashboard.get("panels", []) for t in p.get("targets", [])]
    board = Overlay("deploy/grafana/chatoy.json", [])
    if not expressions:
        board.fail("panels", "no panel queries")
    for expr in expressions:
        check_metrics(board, "query", expr)
    errors += board.errors
    print(f"deploy/grafana/chatoy.json: {len(expressions)} queries use only existing metrics")

    if SELF_TEST and "prod" in rendered:
        if errors:
            errors.append("self-test: not run, the real overlays fail")
        else:
            errors += self_test(rendered["prod"])
    if errors:
        print("\n".join(["", "FAILED:"] + errors), file=sys.stderr)
        sys.exit(1)


main()
