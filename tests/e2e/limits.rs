//! The server's limits and failure answers: rate limiting (code 4), an unavailable store
//! (code 5), frames it refuses with a close (1003, 1007, 1009), the socket cap (HTTP 503), the
//! connection rate per gateway (503) and per client address (429), failed logins (429), slow
//! and oversized HTTP requests (closed, 408, 431, 413), and the slow-consumer cut-off (1008)
//! with bounded gateway memory, followed by a lossless resume.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use chatoy_testkit::{
    alice_and_bob, assert_send, msg_frame, new_uuid, opcode, padded_registration, random_hex, ts, within,
    Event, PeakRss, RawHttp, RawWs, Server, Ws, PASSWORD, UNLIMITED_MSGS, UPGRADE_HEADERS, WAIT,
};

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
    chatoy_testkit::assert_auth(&answer, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_and_resumes_losslessly() {
    const FLOOD: usize = 2500;
    const FLOOD_MIB: usize = FLOOD * 16_000 / (1024 * 1024);
    const MEMORY_BOUND_MIB: usize = 32;
    // A write timeout longer than the flood may take (its guard below): when bob reads again,
    // the server must still be waiting to deliver the frames it had written and its close frame;
    // a large since-limit lets the resume get all.
    let flags = [
        "--outbound-queue",
        "16",
        "--write-timeout",
        "200s",
        "--since-limit",
        "5000",
    ];
    let server = Server::start_with(&[&flags[..], &UNLIMITED_MSGS].concat()).await;
    let api = server.api();
    let (alice, bob, room) = alice_and_bob(&api, "firehose").await;

    let mut a = Ws::authed(&server, &alice.token).await;
    // A small receive buffer makes the server's side back up quickly once bob stops reading.
    // Bob is on gateway 1, whose memory is watched.
    let (addr, path) = server.gateway_ws_target(1);
    let mut slow = RawWs::connect_target(&addr, &path, Some(4096)).await;
    slow.auth_ok(&bob.token, None).await;
    let start = new_uuid();
    let start_sent = a.send_ok(&start, room, "before the flood").await;
    let first = slow.next_json().await;
    assert_eq!(first["data"]["uuid"], json!(start));

    // The gateway's resident memory while bob does not read: sampled until the flood is over.
    let pid = server.gateway_pid(1);
    let rss = PeakRss::start(pid, Duration::from_millis(50));

    // Bob stops reading; alice floods with up to 12 unacknowledged messages (her own queue holds
    // 16 answers) of 4000 four-byte
    // characters: 16 000 bytes each, FLOOD_MIB in all, more than the memory bound below.
    let text = "\u{1F980}".repeat(4000);
    // A guard against a hang, not a timing check: through a cluster the flood takes longer.
    let flood_started = Instant::now();
    let acked = within(
        Duration::from_secs(180),
        "the flood",
        a.send_pipelined(room, FLOOD, 12, |_| text.clone()),
    )
    .await;
    let before = rss.before();
    let peak = rss.stop().await;
    let grown_mib = peak.saturating_sub(before) as f64 / 1024.0;
    println!(
        "gateway VmRSS: {} MiB before the flood, at most {} MiB while bob did not read \
         (+{grown_mib:.1} MiB for a {FLOOD_MIB} MiB flood in {:.1} s)",
        before / 1024,
        peak / 1024,
        flood_started.elapsed().as_secs_f64()
    );
    // Were bob's frames kept instead of dropped with his socket, the gateway would hold the
    // whole flood (measured: +50 MiB with an unbounded queue); a bounded queue costs a few MiB.
    assert!(
        grown_mib < MEMORY_BOUND_MIB as f64,
        "the gateway grew by {grown_mib:.1} MiB (bound {MEMORY_BOUND_MIB} MiB) behind a slow consumer"
    );

    // Bob reads again: some recv frames, then the slow-consumer close.
    let mut seen: Vec<(String, String)> = Vec::new();
    let (code, reason) = loop {
        match slow.next_event(WAIT).await {
            Event::Json(frame) => {
                let data = chatoy_testkit::recv_data(&frame);
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

/// A loopback address of the test's own, so the connection-rate limit per address counts only
/// this test's connections (any 127.x.y.z reaches 127.0.0.1's listeners on Linux).
fn loopback(third: u8, fourth: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, third, fourth))
}

/// `Retry-After` as whole seconds, asserting it is there.
#[track_caller]
fn retry_after(response: &chatoy_testkit::RawResponse) -> u64 {
    response
        .header("retry-after")
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in {response:?}"))
}

#[tokio::test]
async fn connection_rate_per_address_429_and_per_gateway_503() {
    // Slow refills (one connection per 10 s) so the counts below are exact: 3 connections per
    // address, 10 per gateway.
    let server = Server::start_with(&[
        "--conn-rate",
        "0.1",
        "--conn-burst",
        "10",
        "--conn-rate-per-ip",
        "0.1",
        "--conn-burst-per-ip",
        "3",
    ])
    .await;
    // The limits hold per process: every connection goes to gateway 1 itself.
    let gateway = server.gateway_addr(1);
    let api = server.gateway_api(1);
    let requests = |n: usize| format!("/rooms/0?n={n}");

    // Per address: three connections are admitted, and a connection is counted once, however
    // many requests it carries.
    let mut first = RawHttp::connect(&gateway, Some(loopback(2, 1))).await;
    for n in 0..5 {
        let answer = first.get(&requests(n), "").await.expect("an answer");
        assert_eq!(
            answer.status, 400,
            "an admitted request reaches the API: {answer:?}"
        );
    }
    for n in 0..2 {
        let mut conn = RawHttp::connect(&gateway, Some(loopback(2, 1))).await;
        let answer = conn.get(&requests(n), "").await.expect("an answer");
        assert_eq!(answer.status, 400, "{answer:?}");
    }
    // The fourth, a plain request or a WebSocket upgrade alike, is refused with 429 and closed.
    for (path, headers) in [("/rooms/0", ""), ("/ws", UPGRADE_HEADERS)] {
        let mut conn = RawHttp::connect(&gateway, Some(loopback(2, 1))).await;
        let answer = conn.get(path, headers).await.expect("an answer");
        assert_eq!(
            answer.status, 429,
            "GET {path} over the address's rate: {answer:?}"
        );
        assert_eq!(answer.json()["code"], json!(429), "{answer:?}");
        assert!((1..=10).contains(&retry_after(&answer)), "{answer:?}");
        assert!(conn.closed_within(WAIT).await, "a refused connection is closed");
    }
    // The first connection stays admitted.
    let answer = first.get(&requests(9), "").await.expect("an answer");
    assert_eq!(answer.status, 400, "{answer:?}");

    // Per gateway: 3 of its 10 went to that address; 7 more addresses get one each, then 503.
    let mut admitted = 0;
    let refused = loop {
        assert!(admitted <= 10, "the gateway admitted more than --conn-burst 10");
        let mut conn = RawHttp::connect(&gateway, Some(loopback(3, admitted + 1))).await;
        let answer = conn.get("/rooms/0", "").await.expect("an answer");
        if answer.status != 400 {
            break answer;
        }
        admitted += 1;
    };
    assert_eq!(refused.status, 503, "over the gateway's rate: {refused:?}");
    assert_eq!(refused.json()["code"], json!(503), "{refused:?}");
    assert!((1..=10).contains(&retry_after(&refused)), "{refused:?}");
    // One more token may have come back if the machine was slow (one per 10 s).
    assert!((7..=8).contains(&admitted), "admitted {admitted} of the 7 left");
    let mut upgrade = RawHttp::connect(&gateway, Some(loopback(4, 1))).await;
    let answer = upgrade.get("/ws", UPGRADE_HEADERS).await.expect("an answer");
    assert_eq!(
        answer.status, 503,
        "an upgrade over the gateway's rate: {answer:?}"
    );

    // Probes are never refused, so a load balancer keeps the gateway in rotation.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let mut conn = RawHttp::connect(&gateway, Some(loopback(4, 2))).await;
        let answer = conn.get(path, "").await.expect("an answer");
        assert_eq!(answer.status, 200, "{path}: {answer:?}");
    }
    let refusals = |reason: &str| format!("chatoy_http_refused_total{{reason=\"{reason}\"}}");
    assert_eq!(api.metric(&refusals("conn_rate_ip")).await, Some(2.0));
    assert_eq!(api.metric(&refusals("conn_rate")).await, Some(2.0));
}

/// `POST /login` on `base` with an `X-Forwarded-For` (if any): status, `Retry-After`, body.
async fn login_from(
    http: &reqwest::Client,
    base: &str,
    username: &str,
    password: &str,
    forwarded: Option<&str>,
) -> (u16, Option<u64>, Value) {
    let mut request = http
        .post(format!("{base}/login"))
        .json(&json!({"username": username, "password": password}));
    if let Some(forwarded) = forwarded {
        request = request.header("x-forwarded-for", forwarded);
    }
    let response = request.send().await.expect("POST /login");
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = response.json().await.unwrap_or(Value::Null);
    (status, retry, body)
}

#[tokio::test]
async fn failed_logins_lock_the_username_and_the_address() {
    let server = Server::start_with(&[
        "--login-failures-per-user",
        "3",
        "--login-failures-per-ip",
        "5",
        "--login-failures-per-user-all",
        "6",
        "--login-lockout",
        "3s",
        "--client-ip-header",
        "X-Forwarded-For",
    ])
    .await;
    // The counts are per process: every login goes to gateway 1 itself.
    let api = server.gateway_api(1);
    let base = format!("http://{}", server.gateway_addr(1));
    let http = reqwest::Client::builder().timeout(WAIT).build().expect("client");
    let alice = format!("alice_{}", random_hex(6));
    let bob = format!("bob_{}", random_hex(6));
    api.register(&alice).await;
    api.register(&bob).await;
    let login = |username: &str, password: &str, forwarded: Option<&str>| {
        let (http, base) = (http.clone(), base.clone());
        let (username, password) = (username.to_owned(), password.to_owned());
        let forwarded = forwarded.map(str::to_owned);
        async move { login_from(&http, &base, &username, &password, forwarded.as_deref()).await }
    };
    // Alice's usual address: she logs in from it.
    let (status, _, body) = login(&alice, PASSWORD, Some("10.0.0.9")).await;
    assert_eq!(status, 200, "{body}");

    // Three wrong passwords for alice from 10.0.0.1: 401 each; then that address is locked out
    // of alice, even with the right password: 429, no token.
    for _ in 0..3 {
        let (status, _, body) = login(&alice, "wrong password", Some("10.0.0.1")).await;
        assert_eq!(status, 401, "{body}");
    }
    let (status, retry, body) = login(&alice, PASSWORD, Some("10.0.0.1")).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], json!(429));
    assert_eq!(body["user"], Value::Null);
    assert!(!body["msg"].as_str().unwrap_or_default().is_empty(), "{body}");
    assert!(
        retry.is_some_and(|secs| (1..=3).contains(&secs)),
        "Retry-After {retry:?}"
    );
    // The guesser did not lock alice out: from another address she logs in; nor bob from it.
    let (status, _, body) = login(&alice, PASSWORD, Some("10.0.0.3")).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = login(&bob, PASSWORD, Some("10.0.0.1")).await;
    assert_eq!(status, 200, "{body}");

    // A guesser with many addresses reaches the per-username backstop (6 failures over all
    // addresses): alice is locked from unknown addresses, never from those she used.
    for from in ["10.0.1.1", "10.0.1.2", "10.0.1.3"] {
        let (status, _, body) = login(&alice, "wrong password", Some(from)).await;
        assert_eq!(status, 401, "{body}");
    }
    let (status, _, body) = login(&alice, PASSWORD, Some("10.0.1.4")).await;
    assert_eq!(status, 429, "the backstop: {body}");
    let (status, _, body) = login(&alice, PASSWORD, Some("10.0.0.9")).await;
    assert_eq!(status, 200, "alice's usual address: {body}");

    // 10.0.0.1 has 3 failures; 2 more (for names that need not exist) lock the address.
    for name in ["nobody_1", "x"] {
        let (status, _, body) = login(name, "wrong password", Some("10.0.0.1")).await;
        assert_eq!(status, 401, "{body}");
    }
    let (status, retry, body) = login(&bob, PASSWORD, Some("10.0.0.1")).await;
    assert_eq!(status, 429, "the address is locked: {body}");
    assert!(retry.is_some(), "Retry-After on a locked address");
    // The proxy's last entry is the client: an earlier one is whatever the client claimed.
    let (status, _, body) = login(&bob, PASSWORD, Some("10.0.0.7, 10.0.0.1")).await;
    assert_eq!(status, 429, "{body}");
    let (status, _, body) = login(&bob, PASSWORD, Some("10.0.0.1, 10.0.0.7")).await;
    assert_eq!(status, 200, "another address: {body}");
    // Without the header the TCP peer is the address.
    let (status, _, body) = login(&bob, PASSWORD, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        api.metric("chatoy_http_refused_total{reason=\"login_locked\"}")
            .await,
        Some(4.0)
    );

    // The lock ends --login-lockout after the last failure; refused attempts do not extend it.
    let token = within(WAIT, "alice's lock to end", async {
        loop {
            let (status, _, body) = login(&alice, PASSWORD, Some("10.0.0.1")).await;
            if status == 200 {
                break body["msg"].as_str().expect("token").to_owned();
            }
            assert_eq!(status, 429, "{body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert_eq!(api.get("/rooms/me", Some(&token)).await.status, 200);
}

#[tokio::test]
async fn slow_and_oversized_http_requests() {
    let server = Server::start_with(&[
        "--http-timeout",
        "2s",
        "--max-header-size",
        "8192",
        "--max-body-size",
        "2048",
    ])
    .await;
    let gateway = server.gateway_addr(1);

    // Slowloris: request headers at one byte per second are cut off at --http-timeout (2 s, not
    // the default 10 s), without an answer.
    let mut slow = RawHttp::connect(&gateway, None).await;
    let started = Instant::now();
    assert!(
        slow.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            .await
    );
    let closed = loop {
        if slow.closed_within(Duration::from_secs(1)).await {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "headers trickled for 8 s and the connection is still open"
        );
        // A write may fail once the server is gone; the next read then sees the end.
        let _ = slow.send(b"a").await;
    };
    assert!(
        closed >= Duration::from_millis(1500),
        "closed after {closed:?}, before the timeout"
    );
    assert!(
        slow.response(WAIT).await.is_none(),
        "no answer to an incomplete request"
    );

    // A body that trickles is answered 408 at --http-timeout, and the connection is closed.
    let mut trickle = RawHttp::connect(&gateway, None).await;
    let started = Instant::now();
    assert!(
        trickle
            .send(
                b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
                  Content-Length: 100\r\n\r\n{"
            )
            .await
    );
    let answer = within(Duration::from_secs(8), "the 408", async {
        loop {
            let _ = trickle.send(b" ").await;
            if let Ok(answer) = tokio::time::timeout(Duration::from_secs(1), trickle.response(WAIT)).await {
                break answer;
            }
        }
    })
    .await
    .expect("an answer to the trickling body");
    assert_eq!(answer.status, 408, "{answer:?}");
    assert_eq!(answer.json(), json!({"code": 408, "msg": answer.json()["msg"]}));
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "408 before the timeout"
    );
    assert!(trickle.closed_within(WAIT).await, "closed after the 408");

    // Request heads up to --max-header-size (8 KiB) are served; larger ones get 431 and the
    // connection is closed (the default, 16 KiB, is in http_api.rs).
    let mut small = RawHttp::connect(&gateway, None).await;
    let pad = format!("X-Pad: {}\r\n", "p".repeat(7000));
    assert_eq!(small.get("/healthz", &pad).await.expect("an answer").status, 200);
    let mut big = RawHttp::connect(&gateway, None).await;
    let pad = format!("X-Pad: {}\r\n", "p".repeat(9000));
    let answer = big.get("/healthz", &pad).await.expect("an answer");
    assert_eq!(answer.status, 431, "{answer:?}");
    assert!(big.closed_within(WAIT).await, "closed after the 431");
    let mut many = RawHttp::connect(&gateway, None).await;
    let pad: String = (0..200).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let answer = many.get("/healthz", &pad).await.expect("an answer");
    assert_eq!(answer.status, 431, "200 header lines: {answer:?}");

    // Bodies up to --max-body-size (2 KiB here, 64 KiB by default) are read; one byte more is 413.
    let api = server.gateway_api(1);
    let name = format!("fits_{}", random_hex(6));
    api.raw(
        reqwest::Method::POST,
        "/users",
        None,
        Some(padded_registration(&name, 2048)),
    )
    .await
    .assert_ok(201);
    let name = format!("over_{}", random_hex(6));
    api.raw(
        reqwest::Method::POST,
        "/users",
        None,
        Some(padded_registration(&name, 2049)),
    )
    .await
    .assert_error(413);
}
