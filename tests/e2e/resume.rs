//! The `since` extension of `auth`: after a disconnect a client resumes from the last `sent` it
//! saw and gets exactly what it missed, in order, then live traffic with no gap and no duplicate
//! at the seam, also while messages keep arriving during the reconnect.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, SecondsFormat};
use serde_json::json;

use chatoy_testkit::{
    alice_and_bob, assert_send, msg_frame, new_uuid, rss_kib, ts, two_sockets, uuids, uuids_by_room, within,
    RawWs, Server, Ws, UNLIMITED_MSGS,
};

#[tokio::test]
async fn since_replays_what_was_missed_across_rooms() {
    let server = Server::start().await;
    let api = server.api();
    let (alice, bob, first) = alice_and_bob(&api, "first").await;
    let second = api.create_room(&alice.token, "second").await;
    let elsewhere = api.create_room(&alice.token, "not bob's").await;
    api.join(&bob.token, second).await;

    let (mut a, mut b) = two_sockets(&server, &alice, &bob).await;
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
            missed.push((room, uuid));
        }
    }
    let own = new_uuid();
    b_other.send_ok(&own, first, "from bob's other socket").await;
    missed.push((first, own));
    let mut expected: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (room, uuid) in &missed {
        expected.entry(*room).or_default().push(uuid.clone());
    }

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
        uuids_by_room(&replayed),
        expected,
        "exactly the missed messages, each room in sent order"
    );
    for room in [first, second] {
        let sents: Vec<i64> = replayed
            .iter()
            .filter(|m| m["room"] == json!(room))
            .map(|m| ts(m["sent"].as_str().expect("sent")))
            .collect();
        assert!(
            sents.windows(2).all(|pair| pair[0] < pair[1]),
            "room {room}: {sents:?}"
        );
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
    let (alice, bob, room) = alice_and_bob(&api, "quiet").await;
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
    let (alice, bob, busy) = alice_and_bob(&api, "busy").await;
    let calm = api.create_room(&alice.token, "calm").await;
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
    let mut expected: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (uuid, room) in all
        .iter()
        .filter(|(uuid, room)| *room == calm || busy_all[4..].contains(&uuid))
    {
        expected.entry(*room).or_default().push(uuid.clone());
    }
    assert_eq!(expected.values().map(Vec::len).sum::<usize>(), 8);

    let mut b = Ws::authed_since(&server, &bob.token, "2000-01-01T00:00:00.000000000Z").await;
    let mut replayed = Vec::new();
    for _ in 0..8 {
        replayed.push(b.next_recv().await);
    }
    assert_eq!(uuids_by_room(&replayed), expected);
    let live = new_uuid();
    a.send_ok(&live, calm, "live").await;
    assert_eq!(b.next_recv().await["uuid"], json!(live));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_seam_with_a_concurrent_sender() {
    const TOTAL: usize = 1000;
    let server = Server::start_with(&UNLIMITED_MSGS).await;
    let api = server.api();
    let (alice, bob, room) = alice_and_bob(&api, "seam").await;

    let (mut b, mut a) = two_sockets(&server, &bob, &alice).await;
    // Alice sends TOTAL messages with up to 8 unacknowledged while bob reconnects.
    let sender = tokio::spawn(async move {
        let acked = a.send_pipelined(room, TOTAL, 8, |i| format!("seam {i}")).await;
        (a, acked)
    });

    let mut before = Vec::new();
    for _ in 0..200 {
        before.push(b.next_recv().await);
    }
    let last_seen = before[199]["sent"].as_str().expect("sent").to_owned();
    drop(b);
    let mut b = Ws::authed_since(&server, &bob.token, &last_seen).await;

    let (mut a, acked) = within(Duration::from_secs(30), "the sender", sender)
        .await
        .expect("sender task");
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

/// The per-room form: each listed room replays what is newer than its own timestamp; rooms not
/// listed replay nothing; listed rooms the user is not in are ignored.
#[tokio::test]
async fn per_room_since_replays_each_room_from_its_own_point() {
    let server = Server::start().await;
    let api = server.api();
    let (alice, bob, first) = alice_and_bob(&api, "first").await;
    let second = api.create_room(&alice.token, "second").await;
    let unlisted = api.create_room(&alice.token, "unlisted").await;
    let not_bobs = api.create_room(&alice.token, "not bob's").await;
    for room in [second, unlisted] {
        api.join(&bob.token, room).await;
    }
    let mut a = Ws::authed(&server, &alice.token).await;
    // What bob saw before he went away: first up to f1, second up to s1 (later than f1). In
    // between, f_between in first, which he did not see: a server that used the newest of
    // the map's timestamps for every room would skip it, one that used the oldest would replay
    // s1 again.
    let f1 = a.send_ok(&new_uuid(), first, "f1").await;
    let f_between = new_uuid();
    a.send_ok(&f_between, first, "between").await;
    let s1 = a.send_ok(&new_uuid(), second, "s1").await;
    // While he was away.
    let f2 = new_uuid();
    a.send_ok(&f2, first, "f2").await;
    let s2 = new_uuid();
    a.send_ok(&s2, second, "s2").await;
    let f3 = new_uuid();
    a.send_ok(&f3, first, "f3").await;
    a.send_ok(&new_uuid(), unlisted, "u1").await;
    let hidden = a.send_ok(&new_uuid(), not_bobs, "n1").await;

    let since = [
        (first, f1.as_str()),
        (second, s1.as_str()),
        (not_bobs, "1970-01-01T00:00:00Z"),
    ];
    let mut b = Ws::authed_rooms(&server, &bob.token, &since).await;
    // Then a live message marks the end of the replay: nothing else may come before it.
    let mut replayed = Vec::new();
    for _ in 0..4 {
        replayed.push(b.next_recv().await);
    }
    let live = new_uuid();
    a.send_ok(&live, unlisted, "live").await;
    assert_eq!(
        b.next_recv().await["uuid"],
        json!(live),
        "the unlisted room replays nothing"
    );
    let of = |room: u64| -> Vec<String> {
        replayed
            .iter()
            .filter(|m| m["room"] == json!(room))
            .map(|m| m["uuid"].as_str().expect("uuid").to_owned())
            .collect()
    };
    assert_eq!(of(first), vec![f_between, f2, f3], "first, in sent order");
    assert_eq!(of(second), vec![s2]);
    assert!(ts(&hidden) > 0, "a room bob is not in is ignored");
}

/// A malformed `since` is answered with an `error` frame and is not a failed authentication:
/// six of them in a row (the fifth failed `auth` closes a socket) leave the socket open, and a
/// correct `auth` then succeeds.
#[tokio::test]
async fn a_malformed_since_is_an_error_not_an_auth_failure() {
    let server = Server::start().await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let mut ws = Ws::connect(&server).await;
    let many: serde_json::Map<String, serde_json::Value> = (1..=1001)
        .map(|room| (room.to_string(), json!("2022-01-01T00:00:00Z")))
        .collect();
    let bad = [
        json!("yesterday"),
        json!(5),
        json!({"lobby": "2022-01-01T00:00:00Z"}),
        json!({"0": "2022-01-01T00:00:00Z"}),
        json!({"7": "soon"}),
        serde_json::Value::Object(many),
    ];
    for since in bad {
        ws.send_text(&json!({"type": "auth", "token": alice.token, "since": since}).to_string())
            .await;
        let answer = ws.next_json().await;
        assert_eq!(answer["type"], json!("error"), "{since}: {answer}");
        assert_eq!(answer["code"], json!(3));
        assert!(answer["msg"].as_str().expect("msg").contains("since"), "{answer}");
    }
    let answer = ws.auth(&alice.token, Some("2999-01-01T00:00:00Z")).await;
    assert_eq!(
        answer["code"],
        json!(0),
        "a far-future since is valid (clamped): {answer}"
    );
    // On an authenticated socket, any auth answers code 2.
    ws.send_text(&json!({"type": "auth", "token": alice.token, "since": 5}).to_string())
        .await;
    assert_eq!(ws.next_json().await["code"], json!(2));
}

/// A resuming socket holds about one page of its replay, not the whole replay: ten sockets of
/// one user resume ten rooms of 16 KB messages and read only the first frame. Before the replay
/// was streamed from the store in pages, each socket loaded every room's replay (up to
/// `--since-limit` each) before writing anything, so by the time each had its first frame the
/// server held ten copies of everything (measured: +315 MiB for the case).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_resuming_socket_holds_about_one_page() {
    const ROOMS: usize = 10;
    const PER_ROOM: usize = 40;
    const SOCKETS: usize = 10;
    /// Ten copies of the 6.1 MiB replay would be over 60 MiB; ten pages of 64 messages, 10 MiB.
    const BOUND_MIB: f64 = 30.0;
    let server = Server::start_with(&[&["--write-timeout", "200s"][..], &UNLIMITED_MSGS].concat()).await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let mut a = Ws::authed(&server, &alice.token).await;
    let text = "\u{1F980}".repeat(4000);
    let mut rooms = Vec::new();
    for r in 0..ROOMS {
        let room = api.create_room(&alice.token, &format!("room {r}")).await;
        api.join(&bob.token, room).await;
        rooms.push(room);
    }
    within(Duration::from_secs(300), "filling the rooms", async {
        for &room in &rooms {
            let mut in_flight = Vec::new();
            for _ in 0..PER_ROOM {
                let uuid = new_uuid();
                a.send_text(&msg_frame(&uuid, room, &text)).await;
                in_flight.push(uuid);
            }
            for uuid in in_flight {
                let answer = a.answer_to(&uuid).await;
                assert_send(&answer, 0, &uuid);
            }
        }
    })
    .await;
    let pid = server.gateway_pid(1);
    let before = rss_kib(pid).expect("the gateway runs");
    let since: Vec<(u64, &str)> = rooms.iter().map(|room| (*room, "1970-01-01T00:00:00Z")).collect();
    let (addr, path) = server.gateway_ws_target(1);
    let mut sockets = Vec::new();
    for _ in 0..SOCKETS {
        // A small receive buffer: the server's writes block soon after the first frames.
        let mut ws = RawWs::connect_target(&addr, &path, Some(4096)).await;
        let map: serde_json::Map<String, serde_json::Value> = since
            .iter()
            .map(|(room, at)| (room.to_string(), json!(at)))
            .collect();
        ws.send_text(
            json!({"type": "auth", "token": bob.token, "since": map})
                .to_string()
                .as_bytes(),
        )
        .await;
        assert_eq!(ws.next_json().await["code"], json!(0));
        // The first replayed frame: the server has begun writing this socket's replay.
        assert_eq!(ws.next_json().await["type"], json!("recv"));
        sockets.push(ws);
    }
    let during = rss_kib(pid).expect("the gateway runs");
    let grown_mib = during.saturating_sub(before) as f64 / 1024.0;
    println!(
        "gateway VmRSS {} MiB before, {} MiB with {SOCKETS} sockets replaying {ROOMS} rooms of \
         {PER_ROOM} 16 KB messages and not reading (+{grown_mib:.1} MiB)",
        before / 1024,
        during / 1024
    );
    assert!(
        grown_mib < BOUND_MIB,
        "+{grown_mib:.1} MiB (bound {BOUND_MIB} MiB)"
    );
    drop(sockets);
}
