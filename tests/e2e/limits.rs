//! The server's limits and failure answers: rate limiting (code 4), an unavailable store
//! (code 5), frames it refuses with a close (1003, 1007, 1009), the socket cap (HTTP 503) and
//! the slow-consumer cut-off (1008) followed by a lossless resume.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{assert_send, msg_frame, new_uuid, opcode, ts, within, Event, RawWs, Server, Ws, WAIT};

#[tokio::test]
async fn rate_limit_code_4_then_retry() {
    let server = Server::start_with(&["--msg-rate", "1", "--msg-burst", "2"]).await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let room = api.create_room(&alice.token, "slow down").await;
    let foreign = api.create_room(&bob.token, "theirs").await;
    let mut ws = Ws::authed(&server, &alice.token).await;

    ws.send_ok(&new_uuid(), room, "one").await;
    ws.send_ok(&new_uuid(), room, "two").await;
    let third = new_uuid();
    let answer = ws.send_msg(&third, room, "three").await;
    assert_send(&answer, 4, &third);
    // Validation comes before the rate limit, membership after it.
    let invalid = new_uuid();
    let answer = ws.send_msg(&invalid, room, "").await;
    assert_send(&answer, 3, &invalid);
    let stranger = new_uuid();
    let answer = ws.send_msg(&stranger, foreign, "knock").await;
    assert_send(&answer, 4, &stranger);
    assert_eq!(api.history(&alice.token, room, None, None).await.len(), 2);

    // The limit is per socket: another socket of the same user is not limited.
    let mut other = Ws::authed(&server, &alice.token).await;
    other.send_ok(&new_uuid(), room, "other socket").await;

    // At one message per second the bucket has a token again after a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ws.send_ok(&third, room, "three").await;
    let history = api.history(&alice.token, room, None, None).await;
    assert_eq!(history.len(), 4);
    assert_eq!(history[0]["uuid"], json!(third));
}

#[tokio::test]
async fn store_unavailable_code_5_then_retry() {
    // Standalone: SQLite's write lock is held by another process and the store gives up after
    // 100 ms. Cluster: the router is down and the gateway gives up at the send timeout.
    let mut server =
        Server::start_with_sqlite(&["--send-timeout", "2s"], &["--sqlite-busy-timeout", "100ms"]).await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let room = api.create_room(&alice.token, "locked").await;
    let mut ws = Ws::authed(&server, &alice.token).await;
    ws.send_ok(&new_uuid(), room, "before the lock").await;

    server.block_writes().await;
    let uuid = new_uuid();
    let answer = ws.send_msg(&uuid, room, "while locked").await;
    assert_send(&answer, 5, &uuid);
    server.unblock_writes().await;

    // The client resends the same uuid, as it should after code 5: acknowledged now.
    let resent = ts(&ws.send_ok(&uuid, room, "while locked").await);
    let history = api.history(&alice.token, room, None, None).await;
    assert_eq!(history.len(), 2, "stored exactly once: {history:?}");
    assert_eq!(history[0]["uuid"], json!(uuid));
    assert_eq!(history[0]["data"]["text"], json!("while locked"));
    assert_eq!(ts(history[0]["sent"].as_str().expect("sent")), resent);
}

/// A valid `msg` frame padded with trailing whitespace to exactly `len` bytes.
fn padded_msg(uuid: &str, room: u64, len: usize) -> Vec<u8> {
    let mut frame = msg_frame(uuid, room, "padded").into_bytes();
    assert!(frame.len() <= len);
    frame.resize(len, b' ');
    frame
}

#[tokio::test]
async fn refused_frames_close_with_1003_1007_1009() {
    let server = Server::start().await;
    let api = server.api();
    let user = api.new_user("frames").await;
    let room = api.create_room(&user.token, "frames").await;
    let limit = 64 * 1024;

    // Exactly 64 KiB is a frame like any other.
    let mut ws = RawWs::connect(&server).await;
    ws.auth_ok(&user.token, None).await;
    let uuid = new_uuid();
    ws.send_text(&padded_msg(&uuid, room, limit)).await;
    assert_send(&ws.next_json().await, 0, &uuid);

    let cases: Vec<(&str, bool, u8, Vec<u8>, u16)> = vec![
        (
            "binary, authed",
            true,
            opcode::BINARY,
            msg_frame(&new_uuid(), room, "x").into_bytes(),
            1003,
        ),
        ("binary, not authed", false, opcode::BINARY, vec![0, 1, 2], 1003),
        ("empty binary", true, opcode::BINARY, Vec::new(), 1003),
        (
            "invalid UTF-8, authed",
            true,
            opcode::TEXT,
            b"{\"type\":\"msg\",\"uuid\":\"\xff\"}".to_vec(),
            1007,
        ),
        (
            "invalid UTF-8, not authed",
            false,
            opcode::TEXT,
            vec![0xc0, 0x80],
            1007,
        ),
        (
            "surrogate in UTF-8",
            true,
            opcode::TEXT,
            b"\"\xed\xa0\x80\"".to_vec(),
            1007,
        ),
        (
            "64 KiB + 1, authed",
            true,
            opcode::TEXT,
            padded_msg(&new_uuid(), room, limit + 1),
            1009,
        ),
        (
            "64 KiB + 1, not authed",
            false,
            opcode::TEXT,
            vec![b' '; limit + 1],
            1009,
        ),
    ];
    for (what, authed, code, payload, close) in cases {
        let mut ws = RawWs::connect(&server).await;
        if authed {
            ws.auth_ok(&user.token, None).await;
        }
        ws.send_frame(code, &payload).await;
        match ws.next_event(WAIT).await {
            Event::Close(got, _) => assert_eq!(got, close, "{what}"),
            other => panic!("{what}: expected close {close}, got {other:?}"),
        }
    }

    // A message may arrive in fragments; the 64 KiB limit applies to the whole message.
    let mut ws = RawWs::connect(&server).await;
    ws.auth_ok(&user.token, None).await;
    let fragmented = new_uuid();
    let frame = msg_frame(&fragmented, room, "in three parts").into_bytes();
    let (first, rest) = frame.split_at(10);
    let (middle, last) = rest.split_at(20);
    ws.send_fragment(false, opcode::TEXT, first).await;
    ws.send_fragment(false, opcode::CONTINUATION, middle).await;
    ws.send_fragment(true, opcode::CONTINUATION, last).await;
    assert_send(&ws.next_json().await, 0, &fragmented);
    let big = padded_msg(&new_uuid(), room, limit + 1);
    let (first, last) = big.split_at(limit / 2);
    ws.send_fragment(false, opcode::TEXT, first).await;
    ws.send_fragment(true, opcode::CONTINUATION, last).await;
    match ws.next_event(WAIT).await {
        Event::Close(code, _) => assert_eq!(code, 1009, "a fragmented message over 64 KiB"),
        other => panic!("a fragmented message over 64 KiB: expected close 1009, got {other:?}"),
    }

    // Only the 64 KiB message and the fragmented one were stored.
    let history = api.history(&user.token, room, None, None).await;
    let stored: Vec<&Value> = history.iter().map(|m| &m["uuid"]).collect();
    assert_eq!(stored, [&json!(fragmented), &json!(uuid)]);
}

#[tokio::test]
async fn socket_cap_answers_503() {
    let server = Server::start_with(&["--max-sockets", "2"]).await;
    let api = server.api();
    let user = api.new_user("crowd").await;
    // The cap holds per process: every socket goes to the same gateway.
    let url = server.gateway_ws_url(1);
    let first = Ws::authed_url(&url, &user.token).await;
    let mut second = Ws::connect_url(&url).await;

    let refused = within(WAIT, "the third upgrade", tokio_tungstenite::connect_async(&url)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503);
        }
        Err(other) => panic!("expected HTTP 503, got {other}"),
        Ok(_) => panic!("a third socket was accepted over --max-sockets 2"),
    }
    // Plain HTTP is not affected by the socket cap.
    assert_eq!(api.get("/healthz", None).await.status, 200);

    // A freed slot can be taken again.
    first.close().await;
    within(WAIT, "the freed socket to be counted", async {
        while api.metric("chatoy_sockets_open").await != Some(1.0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut third = Ws::authed_url(&url, &user.token).await;
    let room = api.create_room(&user.token, "cap").await;
    third.send_ok(&new_uuid(), room, "made it").await;
    let answer = second.auth(&user.token, None).await;
    crate::harness::assert_auth(&answer, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_and_resumes_losslessly() {
    const FLOOD: usize = 3000;
    // A long write timeout: when bob reads again, the server must still be waiting to deliver the
    // frames it had written and its close frame; a large since-limit lets the resume get all.
    let server = Server::start_with(&[
        "--outbound-queue",
        "16",
        "--write-timeout",
        "30s",
        "--since-limit",
        "5000",
        "--msg-rate",
        "100000",
        "--msg-burst",
        "100000",
    ])
    .await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let room = api.create_room(&alice.token, "firehose").await;
    api.join(&bob.token, room).await;

    let mut a = Ws::authed(&server, &alice.token).await;
    // A small receive buffer makes the server's side back up quickly once bob stops reading.
    let mut slow = RawWs::connect_with(&server, Some(4096)).await;
    slow.auth_ok(&bob.token, None).await;
    let start = new_uuid();
    let start_sent = a.send_ok(&start, room, "before the flood").await;
    let first = slow.next_json().await;
    assert_eq!(first["data"]["uuid"], json!(start));

    // Bob stops reading; alice floods with up to 8 unacknowledged messages.
    let text = "x".repeat(3500);
    let mut acked: Vec<(String, i64)> = Vec::new();
    let mut in_flight = 0;
    let mut next = 0;
    // A guard against a hang, not a timing check: through a cluster the flood takes longer.
    within(Duration::from_secs(180), "the flood", async {
        while acked.len() < FLOOD {
            while next < FLOOD && in_flight < 8 {
                a.send_text(&msg_frame(&new_uuid(), room, &text)).await;
                next += 1;
                in_flight += 1;
            }
            let frame = a.next_json().await;
            let uuid = frame["uuid"].as_str().expect("a send answer").to_owned();
            let sent = assert_send(&frame, 0, &uuid);
            acked.push((uuid, sent));
            in_flight -= 1;
        }
    })
    .await;
    acked.sort_by_key(|(_, sent)| *sent);

    // Bob reads again: some recv frames, then the slow-consumer close.
    let mut seen: Vec<(String, String)> = Vec::new();
    let (code, reason) = loop {
        match slow.next_event(WAIT).await {
            Event::Json(frame) => {
                let data = crate::harness::recv_data(&frame);
                seen.push((
                    data["uuid"].as_str().expect("uuid").to_owned(),
                    data["sent"].as_str().expect("sent").to_owned(),
                ));
            }
            Event::Close(code, reason) => break (code, reason),
            Event::Ended(why) => panic!("connection ended without a close frame: {why}"),
        }
    };
    assert_eq!((code, reason.as_str()), (1008, "slow consumer"));
    assert!(seen.len() < FLOOD, "bob was never cut off");
    let seen_uuids: Vec<&str> = seen.iter().map(|(u, _)| u.as_str()).collect();
    let prefix: Vec<&str> = acked[..seen.len()].iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(
        seen_uuids, prefix,
        "what bob saw is a prefix of the room, in order"
    );

    // Resume from the last message seen: everything after it, exactly once.
    let since = seen.last().map_or(start_sent, |(_, sent)| sent.clone());
    let mut resumed = Ws::authed_since(&server, &bob.token, &since).await;
    let cut = ts(&since);
    let rest: Vec<&str> = acked
        .iter()
        .filter(|(_, sent)| *sent > cut)
        .map(|(u, _)| u.as_str())
        .collect();
    assert_eq!(rest.len(), FLOOD - seen.len());
    let mut got = Vec::new();
    for _ in 0..rest.len() {
        got.push(
            resumed.next_recv().await["uuid"]
                .as_str()
                .expect("uuid")
                .to_owned(),
        );
    }
    assert_eq!(got, rest);
    let live = new_uuid();
    a.send_ok(&live, room, "live").await;
    assert_eq!(resumed.next_recv().await["uuid"], json!(live));
}
