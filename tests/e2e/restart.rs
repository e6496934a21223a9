//! Process lifecycle: SIGTERM drains (sockets get 1001, the process exits 0), and a restart on
//! the same data directory keeps users, tokens, rooms, memberships and history.

use std::time::Duration;

use serde_json::json;

use chatoy_testkit::{alice_and_bob, new_uuid, ts, two_sockets, within, Server, Ws, WAIT};

#[tokio::test]
async fn sigterm_drains_and_data_survives_restart() {
    let mut server = Server::start_with(&["--drain-timeout", "5s"]).await;
    let api = server.api();
    let (alice, bob, room) = alice_and_bob(&api, "durable").await;

    let (mut a, mut b) = two_sockets(&server, &alice, &bob).await;
    let mut sent = Vec::new();
    for i in 0..5 {
        let uuid = new_uuid();
        let at = a.send_ok(&uuid, room, &format!("before restart {i}")).await;
        assert_eq!(b.next_recv().await["uuid"], json!(uuid));
        sent.push((uuid, at));
    }
    let history_before = api.history(&bob.token, room, None, None).await;
    assert_eq!(history_before.len(), 5);

    // SIGTERM: every socket, authenticated or not, is closed with 1001 while the clients keep
    // reading, then the process exits 0.
    let mut unauthed = Ws::connect(&server).await;
    let (status, (a_close, b_close, u_close)) =
        tokio::join!(server.terminate(Duration::from_secs(15)), async {
            tokio::join!(a.expect_close(), b.expect_close(), unauthed.expect_close())
        });
    assert_eq!(a_close.0, 1001, "going away");
    assert_eq!(b_close.0, 1001, "going away");
    assert_eq!(u_close.0, 1001, "going away, before auth");
    assert_eq!(status.code(), Some(0), "exit status after a drain: {status:?}");

    server.restart().await;
    let api = server.api();
    assert_eq!(api.get("/healthz", None).await.status, 200);
    assert_eq!(api.get("/readyz", None).await.status, 200);

    // Old tokens still work, over HTTP and WebSocket; passwords still log in.
    let mine = api.get("/rooms/me", Some(&bob.token)).await;
    assert_eq!(mine.status, 200, "{mine:?}");
    assert_eq!(mine.body.as_array().map(Vec::len), Some(1));
    assert_eq!(mine.body[0]["id"], json!(room));
    let (fresh_token, user) = api.login(&alice.username).await;
    assert_eq!(user["id"], json!(alice.id));
    assert_eq!(
        api.get(&format!("/users/{}", bob.id), None).await.body["username"],
        json!(bob.username)
    );

    // History is exactly as before.
    let history_after = api.history(&bob.token, room, None, None).await;
    assert_eq!(history_after, history_before);

    // Membership and ordering carry on: a new message is newer than every old one.
    let (mut a, mut b) = two_sockets(&server, &alice, &bob).await;
    let uuid = new_uuid();
    let at = a.send_ok(&uuid, room, "after restart").await;
    assert!(ts(&at) > ts(&sent[4].1));
    assert_eq!(b.next_recv().await["uuid"], json!(uuid));
    // An old message retried after the restart is still recognised.
    assert_eq!(a.send_ok(&sent[0].0, room, "before restart 0").await, sent[0].1);

    // New ids do not collide with old ones.
    let carol = api.new_user("carol").await;
    assert!(carol.id != alice.id && carol.id != bob.id);
    let second = api.create_room(&fresh_token, "second").await;
    assert_ne!(second, room);
    let resumed = within(WAIT, "resume after restart", async {
        let mut c = Ws::authed_since(&server, &bob.token, &sent[2].1).await;
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(c.next_recv().await["uuid"].clone());
        }
        got
    })
    .await;
    assert_eq!(
        resumed,
        vec![json!(sent[3].0), json!(sent[4].0), json!(uuid)],
        "since works across a restart"
    );
}
