//! The CQL node goes away: while it is down `send` is answered code 5, never 0, and once it is
//! back the same uuids are acknowledged and stored once. This stops the shared Cassandra of the
//! test command (`CHATOY_SERVICES_RUN_DIR`), so it is alone in its binary, and a guard starts the
//! node again even if the test fails.

use std::time::{Duration, Instant};

use serde_json::json;

use chatoy_testkit::minicluster::{Cluster, Spec};
use chatoy_testkit::services::SharedCassandra;
use chatoy_testkit::{alice_and_bob, assert_send, new_uuid, two_sockets_at, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_is_code_5_while_the_cql_node_is_down() {
    let cluster = Cluster::start(Spec::new(1, 2, &["--send-timeout", "2s"])).await;
    // Declared after the cluster, so dropped before it: the node is back when the cluster's
    // keyspace is dropped.
    let mut cassandra = SharedCassandra::new();
    let api = cluster.api();
    let (alice, bob, room) = alice_and_bob(&api, "outage").await;
    let (mut a, mut b) = two_sockets_at(&cluster.ws_url(1), &alice, &cluster.ws_url(2), &bob).await;
    let before = new_uuid();
    a.send_ok(&before, room, "before the outage").await;
    assert_eq!(b.next_recv().await["uuid"], json!(before));

    cassandra.stop().await;
    // While the node is down, from both gateways, new messages and retries alike: code 5 only.
    let mut refused: Vec<(bool, String, String)> = Vec::new();
    let down_since = Instant::now();
    while down_since.elapsed() < Duration::from_secs(8) {
        let from_a = refused.len() % 2 == 0;
        let ws = if from_a { &mut a } else { &mut b };
        let uuid = new_uuid();
        let text = format!("during the outage {}", refused.len());
        assert_send(&ws.send_msg(&uuid, room, &text).await, 5, &uuid);
        if let Some((_, first, first_text)) = refused.iter().find(|(mine, _, _)| *mine == from_a) {
            assert_send(&ws.send_msg(first, room, first_text).await, 5, first);
        }
        refused.push((from_a, uuid, text));
        // Stay far below the rate limit however fast the refusals come.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "{} messages refused with code 5 while the node was down",
        refused.len()
    );

    cassandra.start().await;
    let back = Instant::now();
    // Acks resume: each refused message, resent with its uuid, is acknowledged (code 5 until then).
    within(Duration::from_secs(120), "acks to resume", async {
        for (from_a, uuid, text) in &refused {
            let ws = if *from_a { &mut a } else { &mut b };
            loop {
                let answer = ws.send_msg(uuid, room, text).await;
                if answer["code"] == json!(0) {
                    assert_send(&answer, 0, uuid);
                    break;
                }
                assert_send(&answer, 5, uuid);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    })
    .await;
    eprintln!(
        "acks resumed {:?} after the node was started again",
        back.elapsed()
    );

    cluster.wait_serving().await;
    let history = api.history(&alice.token, room, None, Some(200)).await;
    let mut stored: Vec<&str> = history
        .iter()
        .map(|m| m["uuid"].as_str().expect("uuid"))
        .collect();
    stored.sort_unstable();
    let mut expected: Vec<&str> = refused.iter().map(|(_, uuid, _)| uuid.as_str()).collect();
    expected.push(&before);
    expected.sort_unstable();
    assert_eq!(stored, expected, "every message stored exactly once");
    // Live delivery works again too.
    let after = new_uuid();
    a.send_ok(&after, room, "after the outage").await;
    // Before it, bob's socket got at most alice's refused messages (acknowledged once the node was
    // back), each once.
    let got = b.recv_until(&after).await;
    let from_alice: Vec<&str> = refused
        .iter()
        .filter(|(from_a, _, _)| *from_a)
        .map(|(_, uuid, _)| uuid.as_str())
        .collect();
    let mut seen = std::collections::HashSet::new();
    for data in &got[..got.len() - 1] {
        let uuid = data["uuid"].as_str().expect("uuid");
        assert!(from_alice.contains(&uuid) && seen.insert(uuid), "bob got {data}");
    }
}
