//! The `since` extension of `auth`: after a disconnect a client resumes from the last `sent` it
//! saw and gets exactly what it missed, in order, then live traffic with no gap and no duplicate
//! at the seam, also while messages keep arriving during the reconnect.

use std::time::Duration;

use chrono::{DateTime, FixedOffset, SecondsFormat};
use serde_json::json;

use crate::harness::{assert_send, msg_frame, new_uuid, ts, uuids, within, Server, Ws};

#[tokio::test]
async fn since_replays_what_was_missed_across_rooms() {
    let server = Server::start().await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let first = api.create_room(&alice.token, "first").await;
    let second = api.create_room(&alice.token, "second").await;
    let elsewhere = api.create_room(&alice.token, "not bob's").await;
    api.join(&bob.token, first).await;
    api.join(&bob.token, second).await;

    let mut a = Ws::authed(&server, &alice.token).await;
    let mut b = Ws::authed(&server, &bob.token).await;
    let mut b_other = Ws::authed(&server, &bob.token).await;
    a.send_ok(&new_uuid(), first, "seen 1").await;
    let seen = new_uuid();
    a.send_ok(&seen, second, "seen 2").await;
    let got = b.recv_until(&seen).await;
    assert_eq!(got.len(), 2);
    let last_seen = got[1]["sent"].as_str().expect("sent").to_owned();
    b.close().await;

    // While bob's first socket is away: alice writes in both rooms and in a room bob is not in,
    // and bob himself writes from his other socket.
    let mut missed = Vec::new();
    for (i, room) in [first, second, first, elsewhere, second].into_iter().enumerate() {
        let uuid = new_uuid();
        a.send_ok(&uuid, room, &format!("missed {i}")).await;
        if room != elsewhere {
            missed.push(uuid);
        }
    }
    let own = new_uuid();
    b_other.send_ok(&own, first, "from bob's other socket").await;
    missed.push(own);

    // Resume with the same instant written with another offset.
    let since = DateTime::parse_from_rfc3339(&last_seen)
        .expect("sent")
        .with_timezone(&FixedOffset::east_opt(8 * 3600).expect("offset"))
        .to_rfc3339_opts(SecondsFormat::Nanos, false);
    let mut b = Ws::authed_since(&server, &bob.token, &since).await;
    let mut replayed = Vec::new();
    for _ in 0..missed.len() {
        replayed.push(b.next_recv().await);
    }
    assert_eq!(
        uuids(&replayed),
        missed,
        "exactly the missed messages, in sent order"
    );
    for pair in replayed.windows(2) {
        assert!(ts(pair[0]["sent"].as_str().expect("sent")) < ts(pair[1]["sent"].as_str().expect("sent")));
    }
    // Then live traffic, and nothing else in between.
    let live = new_uuid();
    a.send_ok(&live, second, "live").await;
    assert_eq!(b.next_recv().await["uuid"], json!(live));
}

#[tokio::test]
async fn since_with_nothing_missed_replays_nothing() {
    let server = Server::start().await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let room = api.create_room(&alice.token, "quiet").await;
    api.join(&bob.token, room).await;
    let mut a = Ws::authed(&server, &alice.token).await;
    let last = a.send_ok(&new_uuid(), room, "the only one").await;

    // since = the last message: nothing newer exists, so the first recv is live.
    let mut b = Ws::authed_since(&server, &bob.token, &last).await;
    let live = new_uuid();
    a.send_ok(&live, room, "live").await;
    assert_eq!(b.next_recv().await["uuid"], json!(live));
}

#[tokio::test]
async fn since_limit_keeps_the_newest_per_room() {
    let server = Server::start_with(&["--since-limit", "5"]).await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let busy = api.create_room(&alice.token, "busy").await;
    let calm = api.create_room(&alice.token, "calm").await;
    api.join(&bob.token, busy).await;
    api.join(&bob.token, calm).await;
    let mut a = Ws::authed(&server, &alice.token).await;

    let mut all = Vec::new();
    for i in 0..12 {
        let room = if i % 4 == 3 { calm } else { busy };
        let uuid = new_uuid();
        a.send_ok(&uuid, room, &format!("m{i}")).await;
        all.push((uuid, room));
    }
    // busy has 9 messages (the newest 5 come back), calm has 3 (all come back).
    let busy_all: Vec<&String> = all.iter().filter(|(_, r)| *r == busy).map(|(u, _)| u).collect();
    assert_eq!(busy_all.len(), 9);
    let expected: Vec<String> = all
        .iter()
        .filter(|(uuid, room)| *room == calm || busy_all[4..].contains(&uuid))
        .map(|(uuid, _)| uuid.clone())
        .collect();
    assert_eq!(expected.len(), 8);

    let mut b = Ws::authed_since(&server, &bob.token, "2000-01-01T00:00:00.000000000Z").await;
    let mut replayed = Vec::new();
    for _ in 0..expected.len() {
        replayed.push(b.next_recv().await);
    }
    assert_eq!(uuids(&replayed), expected);
    let live = new_uuid();
    a.send_ok(&live, calm, "live").await;
    assert_eq!(b.next_recv().await["uuid"], json!(live));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_seam_with_a_concurrent_sender() {
    const TOTAL: usize = 1000;
    let server = Server::start_with(&["--msg-rate", "100000", "--msg-burst", "100000"]).await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let room = api.create_room(&alice.token, "seam").await;
    api.join(&bob.token, room).await;

    let mut b = Ws::authed(&server, &bob.token).await;
    let mut a = Ws::authed(&server, &alice.token).await;
    // Alice sends TOTAL messages with up to 8 unacknowledged while bob reconnects.
    let sender = tokio::spawn(async move {
        let mut acked: Vec<(String, i64)> = Vec::new();
        let mut in_flight = 0;
        let mut next = 0;
        while acked.len() < TOTAL {
            while next < TOTAL && in_flight < 8 {
                a.send_text(&msg_frame(&new_uuid(), room, &format!("seam {next}")))
                    .await;
                next += 1;
                in_flight += 1;
            }
            let frame = a.next_json().await;
            let uuid = frame["uuid"].as_str().expect("a send answer").to_owned();
            let sent = assert_send(&frame, 0, &uuid);
            acked.push((uuid, sent));
            in_flight -= 1;
        }
        (a, acked)
    });

    let mut before = Vec::new();
    for _ in 0..200 {
        before.push(b.next_recv().await);
    }
    let last_seen = before[199]["sent"].as_str().expect("sent").to_owned();
    drop(b);
    let mut b = Ws::authed_since(&server, &bob.token, &last_seen).await;

    let (mut a, mut acked) = within(Duration::from_secs(30), "the sender", sender)
        .await
        .expect("sender task");
    acked.sort_by_key(|(_, sent)| *sent);
    let cut = ts(&last_seen);
    let expected: Vec<String> = acked
        .iter()
        .filter(|(_, sent)| *sent > cut)
        .map(|(uuid, _)| uuid.clone())
        .collect();
    assert_eq!(expected.len(), TOTAL - 200);
    let mut after = Vec::new();
    for _ in 0..expected.len() {
        after.push(b.next_recv().await);
    }
    assert_eq!(
        uuids(&before),
        acked[..200].iter().map(|(u, _)| u.clone()).collect::<Vec<_>>(),
        "before the disconnect, in sent order"
    );
    assert_eq!(
        uuids(&after),
        expected,
        "after the reconnect: no gap, no duplicate"
    );
    let live = new_uuid();
    a.send_ok(&live, room, "after the seam").await;
    assert_eq!(b.next_recv().await["uuid"], json!(live), "nothing extra");
}
