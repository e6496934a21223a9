//! `chatoy migrate` is idempotent: run twice on the same keyspace it exits 0 both times, and
//! what was written in between is still there and still works.

use serde_json::json;

use chatoy_testkit::minicluster::{migrate, Cluster, Spec};
use chatoy_testkit::services::Services;
use chatoy_testkit::{alice_and_bob, new_uuid, random_hex, two_sockets_at, TempDir};

#[tokio::test]
async fn migrate_twice_is_harmless() {
    let services = Services::from_env();
    let keyspace = format!("e2e_{}", random_hex(12));
    let logs = TempDir::new();
    let (status, output) = migrate(&services, &keyspace, &logs.path().join("first.log")).await;
    assert!(status.success(), "first migrate: {status}\n{output}");
    assert!(
        output.contains(&format!("migrated keyspace {keyspace}")),
        "{output}"
    );

    let cluster = Cluster::start_on(&keyspace, Spec::new(1, 2, &[])).await;
    let api = cluster.api();
    let (alice, bob, room) = alice_and_bob(&api, "kept").await;
    let (mut a, mut b) = two_sockets_at(&cluster.ws_url(1), &alice, &cluster.ws_url(2), &bob).await;
    for i in 0..3 {
        let uuid = new_uuid();
        a.send_ok(&uuid, room, &format!("before the second migrate {i}"))
            .await;
        assert_eq!(b.next_recv().await["uuid"], json!(uuid));
    }
    let before = api.history(&bob.token, room, None, None).await;
    assert_eq!(before.len(), 3);

    // The second run, against the live cluster.
    let (status, output) = migrate(&services, &keyspace, &logs.path().join("second.log")).await;
    assert!(status.success(), "second migrate: {status}\n{output}");

    // Everything is still there: history, tokens, passwords, rooms and memberships.
    assert_eq!(api.history(&bob.token, room, None, None).await, before);
    let mine = api.get("/rooms/me", Some(&bob.token)).await;
    assert_eq!(mine.status, 200, "{mine:?}");
    assert_eq!(mine.body[0]["id"], json!(room));
    let (token, user) = api.login(&alice.username).await;
    assert_eq!(user["id"], json!(alice.id));
    // And keeps working: new messages, new users and rooms with new ids.
    let uuid = new_uuid();
    a.send_ok(&uuid, room, "after the second migrate").await;
    assert_eq!(b.next_recv().await["uuid"], json!(uuid));
    let carol = api.new_user("carol").await;
    assert!(carol.id != alice.id && carol.id != bob.id);
    assert_ne!(api.create_room(&token, "new").await, room);
    assert_eq!(api.history(&alice.token, room, None, None).await.len(), 4);
}
