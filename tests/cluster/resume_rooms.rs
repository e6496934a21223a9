//! Why `since` is per room, shown deterministically: a message of room A becomes visible after
//! a message of room B that carries a later `sent`. A client that resumes from the newest `sent`
//! it saw in any room never gets it; one that resumes each room from that room's newest `sent`
//! does.
//!
//! Room A's sequencer is played by the test itself, through the store's fenced write path as a
//! router writes (claim A's partition, open the room, take `sent` = now), with its write held
//! back until the real router of room B has sequenced, stored and delivered a later message.
//! Nothing here depends on timing: the order of events is the test's own.

use std::collections::BTreeMap;

use chatoy_protocol::{partition_of, Timestamp};
use chatoy_testkit::minicluster::{Cluster, Spec, PARTITIONS};
use chatoy_testkit::{new_uuid, ts, two_sockets_at, uuids_by_room, Ws};
use serde_json::json;

use crate::direct::RoomWriter;

#[tokio::test]
async fn a_room_sequenced_behind_another_is_resumed_only_per_room() {
    let cluster = Cluster::start(Spec::new(1, 1, &[])).await;
    let api = cluster.api();
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let carol = api.new_user("carol").await;
    let a = api.create_room(&alice.token, "a").await;
    let b = api.create_room(&alice.token, "b").await;
    assert_ne!(
        partition_of(a, PARTITIONS),
        partition_of(b, PARTITIONS),
        "two sequencers"
    );
    for room in [a, b] {
        api.join(&bob.token, room).await;
        api.join(&carol.token, room).await;
    }
    let (mut alice_ws, mut bob_ws) =
        two_sockets_at(&cluster.ws_url(1), &alice, &cluster.ws_url(1), &bob).await;
    let a0 = new_uuid();
    let a0_sent = alice_ws.send_ok(&a0, a, "a0").await;
    assert_eq!(bob_ws.next_recv().await["uuid"], json!(a0));

    // Room A's sequencer assigns `sent` to a1 now, and its write is still on its way...
    let writer = RoomWriter::claim(&cluster, a, "room-a-sequencer").await;
    let a1 = uuid::Uuid::new_v4();
    let a1_sent = Timestamp::now();

    // ...while room B's sequencer stores and delivers b1, with a later `sent`.
    let b1 = new_uuid();
    let b1_sent = alice_ws.send_ok(&b1, b, "b1").await;
    assert_eq!(bob_ws.next_recv().await["uuid"], json!(b1));
    assert!(ts(&b1_sent) > a1_sent.0, "b1 is sequenced after a1");

    // Now a1 becomes visible: after b1, with an earlier `sent`.
    writer.store(a1, carol.id, "a1", a1_sent).await;
    let a1 = a1.hyphenated().to_string();
    let history = api.history(&bob.token, a, None, Some(10)).await;
    assert!(
        history.iter().any(|m| m["uuid"] == json!(a1)),
        "a1 is stored: {history:?}"
    );
    bob_ws.close().await;

    // The greatest `sent` seen in any room: b1's. a1 is older, so it is never replayed.
    let mut single = Ws::connect_url(&cluster.ws_url(1)).await;
    let answer = single.auth(&bob.token, Some(&b1_sent)).await;
    assert_eq!(answer["code"], json!(0));
    let marker_1 = new_uuid();
    alice_ws.send_ok(&marker_1, b, "marker 1").await;
    assert_eq!(
        single.next_recv().await["uuid"],
        json!(marker_1),
        "resuming from the newest sent of any room loses a1"
    );
    single.close().await;

    // Per room: each room from its own newest `sent` seen. a1 comes back.
    let since = [(a, a0_sent.as_str()), (b, b1_sent.as_str())];
    let mut per_room = Ws::connect_url(&cluster.ws_url(1)).await;
    assert_eq!(per_room.auth_rooms(&bob.token, &since).await["code"], json!(0));
    let replayed = vec![per_room.next_recv().await, per_room.next_recv().await];
    let marker_2 = new_uuid();
    alice_ws.send_ok(&marker_2, b, "marker 2").await;
    assert_eq!(per_room.next_recv().await["uuid"], json!(marker_2));
    let expected = BTreeMap::from([(a, vec![a1]), (b, vec![marker_1])]);
    assert_eq!(uuids_by_room(&replayed), expected, "nothing lost per room");
}
