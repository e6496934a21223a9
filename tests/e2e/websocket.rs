//! The WebSocket conversation itself: the seed document's frames byte for byte, every `auth`
//! code, the `send` codes of validation and membership, `error` frames, logout and the
//! connection-management closes (auth deadline, failed auths, idle peer).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use chatoy_testkit::seed::{SEED_AUTH, SEED_MSG};
use chatoy_testkit::{
    alice_and_bob, assert_auth, assert_error_frame, assert_send, msg_frame, new_uuid, opcode, random_hex, ts,
    within, Event, RawWs, Server, Ws, WAIT,
};

const SEED_UUID: &str = "67e55044-10b1-426f-9247-bb680e5fe0c8";

#[tokio::test]
async fn seed_examples_verbatim() {
    let server = Server::start().await;
    let api = server.api();
    // On a fresh server the first user is 1 and the first room is 1, so the seed's frames
    // (room 1, sender 1) can go on the wire unchanged.
    let (alice, bob, room) = alice_and_bob(&api, "seed").await;
    assert_eq!(alice.id, 1, "the first user of a fresh server");
    assert_eq!(room, 1, "the first room of a fresh server");

    let mut a = Ws::connect(&server).await;
    a.send_text(SEED_AUTH).await;
    assert_eq!(
        a.next_json().await,
        json!({"type": "auth", "code": 1, "msg": "Login status expired!"})
    );
    a.send_text(&format!(r#"{{"type":"auth","token":"{}"}}"#, alice.token))
        .await;
    assert_eq!(a.next_json().await, json!({"type": "auth", "code": 0, "msg": ""}));
    let mut b = Ws::authed(&server, &bob.token).await;

    a.send_text(SEED_MSG).await;
    let send = a.next_json().await;
    let sent = assert_send(&send, 0, SEED_UUID);
    let sent_text = send["sent"].as_str().expect("sent").to_owned();

    let recv = b.next_json().await;
    let recv_sent = ts(recv["data"]["sent"].as_str().expect("recv sent"));
    assert_eq!(recv_sent, sent, "recv carries the send's timestamp");
    let mut expected = json!({
        "type": "recv",
        "data": {
            "uuid": SEED_UUID,
            "sender": 1,
            "room": 1,
            "data": {"type": "Text", "text": "Hello, Chatoy!"},
            "sent": recv["data"]["sent"],
            "modified": false
        }
    });
    assert_eq!(recv, expected);

    // History returns the same object as recv.data.
    let history = api.history(&bob.token, room, None, None).await;
    assert_eq!(history.len(), 1);
    assert_eq!(ts(history[0]["sent"].as_str().expect("sent")), sent);
    expected["data"]["sent"] = history[0]["sent"].clone();
    assert_eq!(history[0], expected["data"]);

    // The sending socket got no recv of its own message: its next frame is the answer to a
    // retry, which carries the original sent.
    a.send_text(SEED_MSG).await;
    let again = a.next_json().await;
    assert_send(&again, 0, SEED_UUID);
    assert_eq!(
        again["sent"],
        json!(sent_text),
        "a retry returns the original sent"
    );
}

#[tokio::test]
async fn auth_codes_and_retries() {
    let server = Server::start().await;
    let api = server.api();
    let user = api.new_user("auth").await;
    let room = api.create_room(&user.token, "auth").await;

    let mut ws = Ws::connect(&server).await;
    // Four failures of different kinds leave the socket open.
    let failures = [
        json!({"type": "auth", "token": random_hex(64)}).to_string(),
        r#"{"type":"auth","token":5}"#.to_owned(),
        r#"{"type":"auth"}"#.to_owned(),
        r#"{"type":"auth","token":null,"since":"yesterday"}"#.to_owned(),
    ];
    for frame in &failures {
        ws.send_text(frame).await;
        let answer = ws.next_json().await;
        assert_auth(&answer, 1);
    }
    let answer = ws.auth(&user.token, None).await;
    assert_auth(&answer, 0);
    // Any auth frame on an authenticated socket, well-formed or not, is code 2.
    let again = [
        json!({"type": "auth", "token": user.token}).to_string(),
        json!({"type": "auth", "token": random_hex(64)}).to_string(),
        r#"{"type":"auth","token":5}"#.to_owned(),
        r#"{"type":"auth"}"#.to_owned(),
        json!({"type": "auth", "token": user.token, "since": "yesterday"}).to_string(),
    ];
    for frame in &again {
        ws.send_text(frame).await;
        let answer = ws.next_json().await;
        assert_auth(&answer, 2);
    }
    ws.send_ok(&new_uuid(), room, "still here").await;
}

#[tokio::test]
async fn five_failed_auths_close_1008() {
    let server = Server::start().await;
    let mut ws = Ws::connect(&server).await;
    for _ in 0..4 {
        let answer = ws.auth(&random_hex(64), None).await;
        assert_auth(&answer, 1);
    }
    ws.send_text(r#"{"type":"auth","token":5}"#).await;
    // The fifth failure may still be answered before the close.
    expect_close_after_failed_auths(&mut ws, "five").await;
}

#[tokio::test]
async fn max_auth_failures_is_configurable() {
    let server = Server::start_with(&["--max-auth-failures", "2"]).await;
    let mut ws = Ws::connect(&server).await;
    let answer = ws.auth(&random_hex(64), None).await;
    assert_auth(&answer, 1);
    ws.send_text(&chatoy_testkit::auth_frame(&random_hex(64), None))
        .await;
    expect_close_after_failed_auths(&mut ws, "two").await;
}

#[tokio::test]
async fn msg_before_auth_is_code_1_and_not_a_failure() {
    let server = Server::start().await;
    let api = server.api();
    let user = api.new_user("early").await;
    let room = api.create_room(&user.token, "early").await;

    let mut ws = Ws::connect(&server).await;
    for _ in 0..6 {
        let uuid = new_uuid();
        let answer = ws.send_msg(&uuid, room, "too early").await;
        assert_send(&answer, 1, &uuid);
    }
    // Six refused messages and four failed auths: still under the limit of five failures.
    for _ in 0..4 {
        let answer = ws.auth(&random_hex(64), None).await;
        assert_auth(&answer, 1);
    }
    let answer = ws.auth(&user.token, None).await;
    assert_auth(&answer, 0);
    ws.send_ok(&new_uuid(), room, "now").await;
    assert_eq!(
        api.history(&user.token, room, None, None).await.len(),
        1,
        "refused messages are not stored"
    );
}

#[tokio::test]
async fn auth_deadline_closes_1008() {
    let server = Server::start_with(&["--auth-timeout", "1s"]).await;
    let api = server.api();
    let user = api.new_user("late").await;
    let room = api.create_room(&user.token, "late").await;

    let started = Instant::now();
    let mut idle = Ws::connect(&server).await;
    let mut authed = Ws::authed(&server, &user.token).await;
    let (code, _) = idle.expect_close().await;
    assert_eq!(code, 1008, "no auth within --auth-timeout");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}, before the 1 s deadline"
    );
    // The flag set the deadline: the default is 10 s.
    assert!(
        waited < Duration::from_secs(6),
        "closed after {waited:?}: not the --auth-timeout of 1 s"
    );
    // The deadline does not apply to a socket that authenticated in time.
    authed.send_ok(&new_uuid(), room, "in time").await;
}

#[tokio::test]
async fn send_codes_for_invalid_messages_and_rooms() {
    let server = Server::start().await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let room = api.create_room(&alice.token, "mine").await;
    let foreign = api.create_room(&bob.token, "theirs").await;
    let mut ws = Ws::authed(&server, &alice.token).await;

    let good = new_uuid();
    let text = |t: &str| json!({"type": "Text", "text": t});
    let msg = |uuid: Value, room: Value, data: Value| {
        json!({"type": "msg", "uuid": uuid, "room": room, "data": data}).to_string()
    };
    // (frame, uuid echoed in the answer)
    let invalid: Vec<(String, String)> = vec![
        (
            msg(json!("not-a-uuid"), json!(room), text("x")),
            "not-a-uuid".into(),
        ),
        (
            msg(json!(good.replace('-', "")), json!(room), text("x")),
            good.replace('-', ""),
        ),
        (
            msg(json!(format!("{{{good}}}")), json!(room), text("x")),
            format!("{{{good}}}"),
        ),
        (
            msg(json!(format!("urn:uuid:{good}")), json!(room), text("x")),
            format!("urn:uuid:{good}"),
        ),
        (
            msg(json!(format!("g{}", &good[1..])), json!(room), text("x")),
            format!("g{}", &good[1..]),
        ),
        (msg(json!(""), json!(room), text("x")), String::new()),
        (msg(json!(7), json!(room), text("x")), String::new()),
        (msg(json!(null), json!(room), text("x")), String::new()),
        (
            json!({"type": "msg", "room": room, "data": text("x")}).to_string(),
            String::new(),
        ),
        (
            msg(json!(good), json!(room), json!({"type": "Image", "url": "x"})),
            good.clone(),
        ),
        (
            msg(json!(good), json!(room), json!({"type": "text", "text": "x"})),
            good.clone(),
        ),
        (
            msg(json!(good), json!(room), json!({"type": "Text"})),
            good.clone(),
        ),
        (
            msg(json!(good), json!(room), json!({"type": "Text", "text": 5})),
            good.clone(),
        ),
        (msg(json!(good), json!(room), json!("x")), good.clone()),
        (
            json!({"type": "msg", "uuid": good, "room": room}).to_string(),
            good.clone(),
        ),
        (msg(json!(good), json!(room), text("")), good.clone()),
        (
            msg(json!(good), json!(room), text(&"x".repeat(4001))),
            good.clone(),
        ),
        (
            msg(json!(good), json!(room), text(&"é".repeat(4001))),
            good.clone(),
        ),
        (msg(json!(good), json!(0), text("x")), good.clone()),
        (msg(json!(good), json!(-1), text("x")), good.clone()),
        (msg(json!(good), json!(1.5), text("x")), good.clone()),
        (msg(json!(good), json!(room.to_string()), text("x")), good.clone()),
        (msg(json!(good), json!(null), text("x")), good.clone()),
        (
            msg(json!(good), json!(9_007_199_254_740_992u64), text("x")),
            good.clone(),
        ),
        (
            format!(
                r#"{{"type":"msg","uuid":"{good}","room":18446744073709551616,"data":{{"type":"Text","text":"x"}}}}"#
            ),
            good.clone(),
        ),
        (
            format!(r#"{{"type":"msg","uuid":"{good}","room":1e308,"data":{{"type":"Text","text":"x"}}}}"#),
            good.clone(),
        ),
        (
            json!({"type": "msg", "uuid": good, "data": text("x")}).to_string(),
            good.clone(),
        ),
    ];
    for (frame, uuid) in &invalid {
        ws.send_text(frame).await;
        let answer = ws.next_json().await;
        let shown: String = frame.chars().take(200).collect();
        assert_eq!(answer["code"], json!(3), "{shown} answered {answer}");
        assert_send(&answer, 3, uuid);
    }
    assert!(api.history(&alice.token, room, None, None).await.is_empty());

    // Boundaries that are valid: 4000 characters of two-byte text, an upper-case uuid.
    let long = new_uuid();
    ws.send_ok(&long, room, &"é".repeat(4000)).await;
    let upper = new_uuid().to_uppercase();
    ws.send_ok(&upper, room, "upper-case uuid").await;

    // Membership: a room of somebody else, an absent room, the largest valid id.
    for target in [foreign, 999_999, (1u64 << 53) - 1] {
        let uuid = new_uuid();
        let answer = ws.send_msg(&uuid, target, "knock knock").await;
        assert_send(&answer, 2, &uuid);
    }
    assert!(api.history(&bob.token, foreign, None, None).await.is_empty());
    let stored = api.history(&alice.token, room, None, None).await;
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[1]["uuid"], json!(long));
    assert_eq!(stored[1]["data"]["text"], json!("é".repeat(4000)));
}

#[tokio::test]
async fn error_frames_keep_the_socket_open() {
    let server = Server::start().await;
    let api = server.api();
    let user = api.new_user("err").await;
    let room = api.create_room(&user.token, "err").await;

    let unreadable = [
        "not json",
        "",
        " ",
        "{",
        "[1,2]",
        "\"auth\"",
        "42",
        "null",
        "true",
        "{}",
        r#"{"token":"x"}"#,
        r#"{"type":"nope"}"#,
        r#"{"type":""}"#,
        r#"{"type":5}"#,
        r#"{"type":null}"#,
        r#"{"type":"AUTH","token":"x"}"#,
        r#"{"type":"recv","data":{}}"#,
        r#"{"type":"send","code":0}"#,
        r#"{"type":"error","code":3,"msg":""}"#,
    ];
    let mut ws = Ws::connect(&server).await;
    // Before auth: these are not auth attempts, so they do not count towards the five failures.
    for frame in unreadable {
        ws.send_text(frame).await;
        let answer = ws.next_json().await;
        assert_error_frame(&answer);
    }
    let answer = ws.auth(&user.token, None).await;
    assert_auth(&answer, 0);
    for frame in unreadable {
        ws.send_text(frame).await;
        let answer = ws.next_json().await;
        assert_error_frame(&answer);
    }
    ws.send_ok(&new_uuid(), room, "still open").await;
}

#[tokio::test]
async fn logout_revokes_the_token_and_closes_its_sockets() {
    let server = Server::start().await;
    let api = server.api();
    let user = api.new_user("leaver").await;
    let (other_token, _) = api.login(&user.username).await;
    assert_ne!(other_token, user.token, "each login issues a new token");
    let room = api.create_room(&user.token, "exit").await;

    let mut first = Ws::authed(&server, &user.token).await;
    let mut second = Ws::authed(&server, &user.token).await;
    let mut kept = Ws::authed(&server, &other_token).await;

    api.post_empty("/logout", Some(&user.token)).await.assert_ok(200);
    for ws in [&mut first, &mut second] {
        let (code, _) = ws.expect_close().await;
        assert_eq!(code, 1008, "a revoked token's socket is closed");
    }
    // The other token of the same user keeps working, on its socket and over HTTP.
    kept.send_ok(&new_uuid(), room, "still logged in").await;
    assert_eq!(api.get("/rooms/me", Some(&other_token)).await.status, 200);

    api.get("/rooms/me", Some(&user.token)).await.assert_error(401);
    api.post_empty("/logout", Some(&user.token))
        .await
        .assert_error(401);
    api.post_empty("/logout", None).await.assert_error(401);
    let mut retry = Ws::connect(&server).await;
    let answer = retry.auth(&user.token, None).await;
    assert_auth(&answer, 1);
}

#[tokio::test]
async fn idle_peer_is_closed_but_a_reading_peer_is_kept() {
    let server = Server::start_with(&["--ping-interval", "300ms", "--idle-timeout", "1s"]).await;
    let api = server.api();
    let user = api.new_user("idle").await;
    let room = api.create_room(&user.token, "idle").await;

    // A raw client that authenticates and then never sends another byte, not even a pong.
    let mut silent = RawWs::connect(&server).await;
    silent.auth_ok(&user.token, None).await;
    let silent_since = Instant::now();
    // A tungstenite client that keeps reading answers every ping by itself.
    let mut reader = Ws::authed(&server, &user.token).await;

    let watch_silent = async {
        let mut pings = 0;
        loop {
            let frame = silent
                .read_frame(WAIT)
                .await
                .expect("the server closes with a close frame before ending the connection");
            match frame.opcode {
                opcode::PING => pings += 1,
                opcode::CLOSE => {
                    let code = chatoy_testkit::close_code(&frame.payload);
                    return (code, pings, silent_since.elapsed());
                }
                other => panic!("unexpected opcode {other} on a silent socket"),
            }
        }
    };
    // A raw client that never answers the server's pings but pings the server itself: any
    // frame counts as a sign of life.
    let mut pinger = RawWs::connect(&server).await;
    pinger.auth_ok(&user.token, None).await;
    let keep_pinging = async {
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(2500) {
            pinger.send_frame(opcode::PING, b"are you there").await;
            loop {
                let frame = pinger
                    .read_frame(WAIT)
                    .await
                    .expect("the pinger was disconnected");
                match frame.opcode {
                    opcode::PONG => {
                        assert_eq!(frame.payload, b"are you there", "a pong echoes the ping");
                        break;
                    }
                    opcode::PING => {}
                    opcode::CLOSE => panic!(
                        "a peer that pings was closed with {}",
                        chatoy_testkit::close_code(&frame.payload)
                    ),
                    other => panic!("unexpected opcode {other}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let ((code, pings, after), (), ()) = tokio::join!(
        watch_silent,
        reader.expect_quiet(Duration::from_millis(2500)),
        keep_pinging
    );
    assert_eq!(code, 1008, "a silent peer is closed with 1008");
    assert!(
        pings >= 1,
        "the server pings (saw {pings} pings before the close)"
    );
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}, before the 1 s idle timeout"
    );
    // Both kept peers are still open (the pinger first: the reader's message would reach it).
    let uuid = new_uuid();
    pinger.send_text(msg_frame(&uuid, room, "alive").as_bytes()).await;
    assert_send(&pinger.next_json().await, 0, &uuid);
    reader.send_ok(&new_uuid(), room, "me too").await;
}

#[tokio::test]
async fn interleaved_frames_each_get_one_answer() {
    // msg, error and auth answers interleave on one socket; each gets exactly one answer.
    let server = Server::start().await;
    let api = server.api();
    let user = api.new_user("mixed").await;
    let room = api.create_room(&user.token, "mixed").await;
    let mut ws = Ws::authed(&server, &user.token).await;
    for i in 0..20 {
        let uuid = new_uuid();
        ws.send_text(&msg_frame(&uuid, room, &format!("m{i}"))).await;
        ws.send_text("nope").await;
        let (x, y) = within(WAIT, "two answers", async {
            (ws.next_json().await, ws.next_json().await)
        })
        .await;
        let (send, error) = if x["type"] == "send" { (&x, &y) } else { (&y, &x) };
        assert_send(send, 0, &uuid);
        assert_error_frame(error);
    }
    assert_eq!(api.history(&user.token, room, None, None).await.len(), 20);
}

/// After the last failed `auth` a socket may still get its answer (code 1), then the close,
/// which must be 1008.
async fn expect_close_after_failed_auths(ws: &mut Ws, failures: &str) {
    let mut event = ws.next_event().await;
    if let Event::Json(answer) = &event {
        assert_auth(answer, 1);
        event = ws.next_event().await;
    }
    match event {
        Event::Close(code, _) => assert_eq!(code, 1008),
        other => panic!("expected close 1008 after {failures} failed auths, got {other:?}"),
    }
}
