//! A message acknowledged through one gateway reaches the members whose sockets are on the
//! other, in both directions, including the sender's own other socket.

use serde_json::json;

use chatoy_testkit::minicluster::{Cluster, Spec};
use chatoy_testkit::{alice_and_bob, new_uuid, ts, Ws};

#[tokio::test]
async fn acked_on_one_gateway_reaches_members_on_the_other() {
    let cluster = Cluster::start(Spec::new(1, 2, &[])).await;
    let api = cluster.api();
    let (alice, bob, room) = alice_and_bob(&api, "across").await;

    let mut alice_1 = Ws::authed_url(&cluster.ws_url(1), &alice.token).await;
    let mut alice_2 = Ws::authed_url(&cluster.ws_url(2), &alice.token).await;
    let mut bob_2 = Ws::authed_url(&cluster.ws_url(2), &bob.token).await;
    let mut bob_1 = Ws::authed_url(&cluster.ws_url(1), &bob.token).await;
    // The sockets really are where they were pinned.
    for n in [1, 2] {
        let on = chatoy_testkit::Api::new(cluster.gateway_url(n), vec![cluster.gateway_url(n)]);
        assert_eq!(on.metric("chatoy_sockets_open").await, Some(2.0), "gateway {n}");
    }

    // Gateway 1 to gateway 2: bob's socket there and alice's own other socket get it.
    let uuid = new_uuid();
    let sent = alice_1.send_ok(&uuid, room, "from gateway 1").await;
    for ws in [&mut bob_2, &mut alice_2, &mut bob_1] {
        let data = ws.next_recv().await;
        assert_eq!(data["uuid"], json!(uuid));
        assert_eq!(data["sender"], json!(alice.id));
        assert_eq!(data["data"]["text"], json!("from gateway 1"));
        assert_eq!(ts(data["sent"].as_str().expect("sent")), ts(&sent));
    }

    // And back: bob on gateway 2 to alice on gateway 1.
    let back = new_uuid();
    let sent_back = bob_2.send_ok(&back, room, "from gateway 2").await;
    assert!(ts(&sent_back) > ts(&sent));
    for ws in [&mut alice_1, &mut alice_2, &mut bob_1] {
        let data = ws.next_recv().await;
        assert_eq!(data["uuid"], json!(back));
        assert_eq!(data["sender"], json!(bob.id));
        assert_eq!(ts(data["sent"].as_str().expect("sent")), ts(&sent_back));
    }

    // Nothing else is on the way: a last message from gateway 1 is the next frame everywhere.
    let last = new_uuid();
    bob_1.send_ok(&last, room, "last").await;
    for ws in [&mut alice_1, &mut alice_2, &mut bob_2] {
        assert_eq!(ws.next_recv().await["uuid"], json!(last));
    }
}
