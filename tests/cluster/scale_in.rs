//! `deploy/local/cluster scale-gateways` under load: 3 gateways → 1 → 3 behind the HAProxy,
//! while members send and listen as real clients do (they reconnect through the HAProxy after
//! a drop, resume with `since` and resend every unanswered message with the same uuid). No
//! acknowledged message is lost, every member gets every message of its rooms, the drained
//! gateways close their sockets with 1001, and sockets opened after scaling back up go to the
//! new gateways too.
//!
//! The cluster is the script's own (its routers, gateways and HAProxy in a private run
//! directory) on the shared NATS and Cassandra, with a fresh keyspace and NATS prefix.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use chatoy_testkit::minicluster::{delete_streams, drop_keyspace};
use chatoy_testkit::resilient::{check, Crowd, LoadPlan, Registered};
use chatoy_testkit::services::Services;
use chatoy_testkit::{
    assert_auth, chatoy_binary, random_hex, run_checked, script, scrub_env, Api, TempDir, Ws,
};

/// Six senders across three rooms, 20 messages a second each, and a listener per gateway.
const LOAD: LoadPlan = LoadPlan {
    rooms: 3,
    senders: 6,
    gateways: 3,
    rate: 20.0,
    window: 16,
};
/// Sockets opened after scaling back up, to see where the HAProxy puts them.
const NEW_SOCKETS: usize = 12;
/// Longest wait for every message to be answered and delivered.
const SETTLE_LIMIT: Duration = Duration::from_secs(90);

/// A cluster run by `deploy/local/cluster` in a private run directory; `down` on drop, and its
/// keyspace and NATS stream are given back.
struct ScriptCluster {
    services: Services,
    keyspace: String,
    prefix: String,
    run_dir: TempDir,
    /// The HAProxy, `http://127.0.0.1:PORT`.
    url: String,
}

impl ScriptCluster {
    async fn up(gateways: usize) -> ScriptCluster {
        let mut cluster = ScriptCluster {
            services: Services::from_env(),
            keyspace: format!("e2e_{}", random_hex(12)),
            prefix: format!("e2e{}", random_hex(12)),
            run_dir: TempDir::new(),
            url: String::new(),
        };
        cluster.url = cluster
            .run(&["up"], &[("CHATOY_GATEWAYS", &gateways.to_string())])
            .await;
        cluster
    }

    /// Runs the script; fails the test if it fails; returns the URL it printed last.
    async fn run(&self, args: &[&str], extra: &[(&str, &str)]) -> String {
        let mut command = Command::new(script("cluster"));
        command.args(args);
        scrub_env(&mut command);
        command
            .env("CHATOY_RUN_DIR", self.run_dir.path())
            .env("CHATOY_BIN", chatoy_binary())
            .env("CHATOY_NATS_URL", &self.services.nats_url)
            .env("CHATOY_CQL_NODES", &self.services.cql_nodes)
            .env("CHATOY_KEYSPACE", &self.keyspace)
            .env("CHATOY_NATS_PREFIX", &self.prefix)
            .env("CHATOY_ROUTERS", "1")
            .env("CHATOY_FAILOVER_TIMEOUT", "2s")
            .env("CHATOY_DRAIN_TIMEOUT", "5s")
            .env("CHATOY_SEND_TIMEOUT", "2s")
            .env("CHATOY_MSG_RATE", "10000")
            .env("CHATOY_MSG_BURST", "10000")
            .env("CHATOY_ARGON2_MEMORY_KIB", "1024")
            .env("CHATOY_ARGON2_ITERATIONS", "1");
        for (key, value) in extra {
            command.env(key, value);
        }
        let log = self
            .run_dir
            .path()
            .join(format!("cluster-{}.log", args.join("-")));
        let what = format!("deploy/local/cluster {}", args.join(" "));
        let output = run_checked(&mut command, &log, Duration::from_secs(300), &what).await;
        output
            .lines()
            .filter_map(|line| line.strip_prefix("CHATOY_URL="))
            .next_back()
            .unwrap_or_else(|| panic!("{what} printed no CHATOY_URL:\n{output}"))
            .trim()
            .to_owned()
    }

    /// Makes `n` gateways run; returns how long the script took.
    async fn scale(&mut self, n: usize) -> Duration {
        let started = Instant::now();
        let url = self.run(&["scale-gateways", &n.to_string()], &[]).await;
        assert_eq!(url, self.url, "the HAProxy moved");
        started.elapsed()
    }

    /// Gateway `n` itself, bypassing the HAProxy.
    fn gateway_url(&self, n: usize) -> String {
        let file = self.dir(&format!("gateway-{n}")).join("port");
        let port = std::fs::read_to_string(&file).unwrap_or_else(|err| panic!("{}: {err}", file.display()));
        format!("http://127.0.0.1:{}", port.trim())
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.run_dir.path().join(name)
    }

    /// Open sockets on gateway `n`, from its /metrics.
    async fn sockets_on(&self, n: usize) -> usize {
        let url = self.gateway_url(n);
        let api = Api::new(url.clone(), vec![url]);
        api.metric("chatoy_sockets_open").await.unwrap_or(0.0) as usize
    }

    fn ws_url(&self, path: &str) -> String {
        format!("{}{path}", self.url.replacen("http://", "ws://", 1))
    }
}

impl Drop for ScriptCluster {
    fn drop(&mut self) {
        let mut command = Command::new(script("cluster"));
        command.arg("down");
        scrub_env(&mut command);
        let stopped = command
            .env("CHATOY_RUN_DIR", self.run_dir.path())
            .env("CHATOY_NATS_URL", &self.services.nats_url)
            .env("CHATOY_CQL_NODES", &self.services.cql_nodes)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if !matches!(stopped, Ok(status) if status.success()) {
            eprintln!("deploy/local/cluster down failed: {stopped:?}");
        }
        if let Err(err) = drop_keyspace(&self.services.cql_nodes, &self.keyspace) {
            eprintln!("could not drop keyspace {}: {err}", self.keyspace);
        }
        if let Err(err) = delete_streams(&self.services.nats_url, &format!("{}.msg.>", self.prefix)) {
            eprintln!("could not delete the NATS streams of {}: {err}", self.prefix);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_gateways_3_1_3_under_load_loses_nothing() {
    let mut cluster = ScriptCluster::up(3).await;
    let api = Api::new(cluster.url.clone(), Vec::new());
    let balanced = cluster.ws_url("/ws");
    // Spread over the three gateways at first; later connections are balanced.
    let Registered { host, rooms, specs } = LOAD
        .register(&api, &balanced, |gateway| {
            cluster.ws_url(&format!("/ws?gateway={gateway}"))
        })
        .await;
    let mut crowd = Crowd::start(specs).await;
    for n in 1..=3 {
        assert_eq!(cluster.sockets_on(n).await, 3, "gateway {n} before scaling in");
    }

    let load_began = Instant::now();
    crowd.start_sending().await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 3 → 1: gateways 2 and 3 leave the HAProxy and drain; their members move to gateway 1.
    let scale_in = cluster.scale(1).await;
    let acked_at_scale_in = crowd.acked_count();
    let members = crowd.members.len();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut on_one = cluster.sockets_on(1).await;
    while on_one != members {
        assert!(
            Instant::now() < deadline,
            "gateway 1 holds {on_one} sockets 30 s after scaling in, not the {members} members'"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        on_one = cluster.sockets_on(1).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 1 → 3: two new gateways behind the HAProxy; the load goes on.
    let scale_out = cluster.scale(3).await;
    let before = [cluster.sockets_on(2).await, cluster.sockets_on(3).await];
    let newcomer = api.new_user("newcomer").await;
    let mut fresh = Vec::new();
    for _ in 0..NEW_SOCKETS {
        let mut ws = Ws::connect_url(&balanced).await;
        assert_auth(&ws.auth(&newcomer.token, None).await, 0);
        fresh.push(ws);
    }
    let spread = [
        cluster.sockets_on(1).await.saturating_sub(on_one),
        cluster.sockets_on(2).await.saturating_sub(before[0]),
        cluster.sockets_on(3).await.saturating_sub(before[1]),
    ];
    tokio::time::sleep(Duration::from_secs(2)).await;

    crowd.stop_sending();
    let load_secs = load_began.elapsed().as_secs_f64();
    crowd.until_answered(SETTLE_LIMIT).await;
    let acked = crowd.acked_by_room();
    assert!(
        crowd
            .caught_up_after(&acked, Instant::now(), SETTLE_LIMIT)
            .await
            .is_some(),
        "not every member had every acknowledged message within {SETTLE_LIMIT:?}"
    );
    crowd.stop().await;
    drop(fresh);

    // Check: every acknowledged message is stored once with its `sent`, and every member got
    // every stored message of its rooms (its own excepted), in `sent` order.
    let verdict = check(&api, &host.token, &rooms, &crowd.members).await;
    println!(
        "scale 3 → 1 → 3: acked {} ({:.0} msg/s; {acked_at_scale_in} before scaling in), \
         lost {}, reconnects {}, resends {}, codes [{}]; scale-in took {scale_in:.1?}, \
         scale-out {scale_out:.1?}; {NEW_SOCKETS} new sockets on gateways 1/2/3: {}/{}/{}",
        verdict.acked,
        verdict.acked as f64 / load_secs,
        verdict.lost,
        verdict.reconnects,
        verdict.resends,
        verdict.codes,
        spread[0],
        spread[1],
        spread[2],
    );
    assert!(verdict.passed(), "{verdict:#?}");
    assert!(
        verdict.acked > acked_at_scale_in,
        "nothing was acknowledged after scaling in"
    );
    assert!(
        verdict.codes.contains("close 1001"),
        "the drained gateways closed no socket with 1001: {}",
        verdict.codes
    );
    for (n, count) in spread.iter().enumerate().skip(1) {
        assert!(
            *count >= NEW_SOCKETS / 4,
            "gateway {} got {count} of {NEW_SOCKETS} new sockets (1/2/3: {spread:?})",
            n + 1
        );
    }
}
