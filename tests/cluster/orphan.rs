//! A message a router stored but never published (it died in between) reaches the members
//! whose sockets are open as soon as the next router publishes the room's next message: each
//! event names the previous message, and the gateways fill the hole from the store, in order.

use chatoy_protocol::Timestamp;
use chatoy_testkit::minicluster::{Cluster, Spec};
use chatoy_testkit::{assert_send, new_uuid, ts, Ws};
use serde_json::json;

use crate::direct::RoomWriter;

#[tokio::test]
async fn a_stored_but_unpublished_message_is_delivered_before_the_next() {
    let cluster = Cluster::start(Spec::new(1, 2, &[])).await;
    let api = cluster.api();
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let carol = api.new_user("carol").await;
    let room = api.create_room(&alice.token, "holes").await;
    api.join(&bob.token, room).await;
    api.join(&carol.token, room).await;
    let mut alice_1 = Ws::authed_url(&cluster.ws_url(1), &alice.token).await;
    let mut bob_1 = Ws::authed_url(&cluster.ws_url(1), &bob.token).await;
    let mut bob_2 = Ws::authed_url(&cluster.ws_url(2), &bob.token).await;

    let first = new_uuid();
    alice_1.send_ok(&first, room, "first").await;
    for ws in [&mut bob_1, &mut bob_2] {
        assert_eq!(ws.next_recv().await["uuid"], json!(first));
    }

    // What a router that died between storing and publishing leaves: a stored message (from
    // carol, who has no socket) that no gateway was told about.
    // The orphan is written the way a router writes: under a claim of the room's partition.
    // That claim deposes the running router, as a takeover does.
    let orphan = uuid::Uuid::new_v4();
    let orphan_sent = Timestamp::now();
    let writer = RoomWriter::claim(&cluster, room, "orphan-writer").await;
    writer
        .store(orphan, carol.id, "stored, never published", orphan_sent)
        .await;

    // The deposed router's next write fails (code 5: outcome unknown); the resend, like a
    // client's, is sequenced under a new claim, after the orphan.
    let next = new_uuid();
    let next_sent = loop {
        let answer = alice_1.send_msg(&next, room, "next").await;
        if answer["code"] == json!(5) {
            continue;
        }
        assert_send(&answer, 0, &next);
        break answer["sent"].as_str().expect("sent").to_owned();
    };
    assert!(ts(&next_sent) > orphan_sent.0);
    let orphan = orphan.hyphenated().to_string();
    for ws in [&mut bob_1, &mut bob_2] {
        let got = ws.next_recv().await;
        assert_eq!(got["uuid"], json!(orphan), "the hole is filled first");
        assert_eq!(ts(got["sent"].as_str().expect("sent")), orphan_sent.0);
        assert_eq!(ws.next_recv().await["uuid"], json!(next));
    }
    // The sender's socket gets the orphan (not its own message).
    assert_eq!(alice_1.next_recv().await["uuid"], json!(orphan));
}
