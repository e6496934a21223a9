//! The HTTP API: users, login, rooms, history refusals, the error body and status of every
//! documented failure, token expiry, and the health, readiness and metrics endpoints.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use chatoy_testkit::{
    alice_and_bob, assert_auth, assert_keys, assert_recent, assert_user, new_uuid, padded_registration, ts,
    two_sockets, within, RawHttp, Server, Ws, PASSWORD, WAIT,
};

#[tokio::test]
async fn users_register_login_and_profile() {
    let server = Server::start().await;
    let api = server.api();

    let register = |username: Value, password: Value| {
        let api = api.clone();
        async move {
            api.post(
                "/users",
                None,
                &json!({"username": username, "password": password}),
            )
            .await
        }
    };
    // Valid boundaries: 3 and 32 characters of the allowed set, 8 and 128 byte passwords.
    register(json!("a.b"), json!(PASSWORD)).await.assert_ok(201);
    register(json!("A-z_0.9".repeat(4) + "abcd"), json!("12345678"))
        .await
        .assert_ok(201);
    register(json!("maxpass"), json!("p".repeat(128)))
        .await
        .assert_ok(201);
    // Taken.
    register(json!("a.b"), json!(PASSWORD)).await.assert_error(409);
    // Invalid usernames and passwords.
    for (username, password) in [
        (json!("ab"), json!(PASSWORD)),
        (json!("x".repeat(33)), json!(PASSWORD)),
        (json!("bob smith"), json!(PASSWORD)),
        (json!("bøb"), json!(PASSWORD)),
        (json!(""), json!(PASSWORD)),
        (json!(123), json!(PASSWORD)),
        (json!(null), json!(PASSWORD)),
        (json!("shortpw"), json!("1234567")),
        (json!("longpw"), json!("p".repeat(129))),
        (json!("numpw"), json!(12345678)),
    ] {
        register(username.clone(), password.clone())
            .await
            .assert_error(400);
    }
    for body in [
        &b"not json"[..],
        b"",
        b"[]",
        b"{}",
        br#"{"username":"nopass"}"#,
        br#"{"password":"correct horse battery"}"#,
    ] {
        let reply = api.raw(Method::POST, "/users", None, Some(body.to_vec())).await;
        assert_eq!(
            reply.status,
            400,
            "POST /users {} answered {reply:?}",
            String::from_utf8_lossy(body)
        );
        reply.assert_error(400);
    }

    // Login: success carries the token in msg and the User.
    let (token, user) = api.login("a.b").await;
    assert_eq!(user["username"], json!("a.b"));
    let id = user["id"].as_u64().expect("id");
    let (second, _) = api.login("a.b").await;
    assert_ne!(token, second);

    for (username, password) in [("a.b", "wrong password"), ("nobody", PASSWORD)] {
        let reply = api
            .post(
                "/login",
                None,
                &json!({"username": username, "password": password}),
            )
            .await;
        assert_eq!(reply.status, 401, "{reply:?}");
        assert_keys(&reply.body, &["code", "msg", "user"]);
        assert_eq!(reply.body["code"], json!(401));
        assert!(reply.body["msg"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(reply.body["user"], Value::Null);
    }
    api.raw(Method::POST, "/login", None, Some(b"{".to_vec()))
        .await
        .assert_error(400);

    // Profile: the same User, never a secret.
    let reply = api.get(&format!("/users/{id}"), None).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_user(&reply.body);
    assert_eq!(reply.body, user);
    for key in reply.body.as_object().expect("object").keys() {
        let key = key.to_ascii_lowercase();
        assert!(
            !key.contains("pass") && !key.contains("hash"),
            "User has a secret field {key}"
        );
    }
    assert!(!reply.text.contains(PASSWORD));
    assert_recent(ts(user["registered"].as_str().expect("registered")));
    api.get("/users/999999", None).await.assert_error(404);
    api.get("/users/abc", None).await.assert_error(400);
}

#[tokio::test]
async fn rooms_create_get_join_and_mine() {
    let server = Server::start().await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;

    let create = |token: Option<String>, body: Value| {
        let api = api.clone();
        async move { api.post("/rooms", token.as_deref(), &body).await }
    };
    create(None, json!({"name": "x"})).await.assert_error(401);
    create(Some("f".repeat(64)), json!({"name": "x"}))
        .await
        .assert_error(401);
    for body in [
        json!({"name": ""}),
        json!({"name": "n".repeat(101)}),
        json!({"name": 5}),
        json!({}),
    ] {
        let reply = create(Some(alice.token.clone()), body.clone()).await;
        assert_eq!(reply.status, 400, "POST /rooms {body} answered {reply:?}");
        reply.assert_error(400);
    }

    let plain = api.create_room(&alice.token, "plain").await;
    let long_name = "é".repeat(100);
    let reply = create(
        Some(alice.token.clone()),
        json!({"name": long_name, "description": "about things"}),
    )
    .await;
    assert_eq!(reply.status, 201, "{reply:?}");
    let described = reply.body["id"].as_u64().expect("id");
    assert_ne!(plain, described);

    let room = api.get(&format!("/rooms/{described}"), None).await;
    assert_eq!(room.status, 200, "{room:?}");
    assert_keys(&room.body, &["id", "name", "description", "created"]);
    assert_eq!(room.body["id"], json!(described));
    assert_eq!(room.body["name"], json!(long_name));
    assert_eq!(room.body["description"], json!("about things"));
    ts(room.body["created"].as_str().expect("created"));
    let room = api.get(&format!("/rooms/{plain}"), None).await;
    assert_eq!(room.body["name"], json!("plain"));
    assert_eq!(room.body["description"], json!(""));

    api.get("/rooms/999999", None).await.assert_error(404);
    api.get("/rooms/abc", None).await.assert_error(400);

    // Joining: idempotent, 404 for an absent room, 400 for a malformed id, 401 without a token.
    api.join(&bob.token, plain).await;
    api.join(&bob.token, plain).await;
    api.post_empty("/rooms/999999/join", Some(&bob.token))
        .await
        .assert_error(404);
    api.post_empty("/rooms/abc/join", Some(&bob.token))
        .await
        .assert_error(400);
    api.post_empty(&format!("/rooms/{plain}/join"), None)
        .await
        .assert_error(401);

    let mine = |token: String| {
        let api = api.clone();
        async move {
            let reply = api.get("/rooms/me", Some(&token)).await;
            assert_eq!(reply.status, 200, "{reply:?}");
            let rooms = reply.body.as_array().expect("array").clone();
            for room in &rooms {
                assert_keys(room, &["id", "name", "description", "created"]);
            }
            let mut ids: Vec<u64> = rooms.iter().map(|r| r["id"].as_u64().expect("id")).collect();
            ids.sort_unstable();
            ids
        }
    };
    let mut both = vec![plain, described];
    both.sort_unstable();
    assert_eq!(
        mine(alice.token.clone()).await,
        both,
        "the creator joins automatically"
    );
    assert_eq!(
        mine(bob.token.clone()).await,
        vec![plain],
        "joined once, listed once"
    );
    api.get("/rooms/me", None).await.assert_error(401);
    for authorization in [
        format!("Basic {}", alice.token),
        alice.token.clone(),
        "Bearer".to_owned(),
        "Bearer ".to_owned(),
        format!("Bearer {}", &alice.token[1..]),
    ] {
        api.raw_authorization(Method::GET, "/rooms/me", Some(&authorization), None)
            .await
            .assert_error(401);
    }
}

#[tokio::test]
async fn bodies_must_be_json_objects() {
    // A JSON array holding the right values in field order is still not the documented body.
    let server = Server::start().await;
    let api = server.api();
    let user = api.new_user("arrays").await;
    for (path, token, body) in [
        ("/users", None, json!(["arrayuser", PASSWORD])),
        ("/login", None, json!([user.username, PASSWORD])),
        ("/rooms", Some(user.token.as_str()), json!(["room"])),
        (
            "/rooms",
            Some(user.token.as_str()),
            json!(["room", "description"]),
        ),
    ] {
        let reply = api.post(path, token, &body).await;
        assert_eq!(reply.status, 400, "POST {path} {body} answered {reply:?}");
        reply.assert_error(400);
    }
}

#[tokio::test]
async fn history_refusals() {
    let server = Server::start().await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let eve = api.new_user("eve").await;
    let room = api.create_room(&alice.token, "private").await;

    let reply = api.history_reply(&eve.token, room, None, None).await;
    reply.assert_error(403);
    api.history_reply(&alice.token, 999_999, None, None)
        .await
        .assert_error(404);
    api.get(&format!("/rooms/{room}/messages"), None)
        .await
        .assert_error(401);
    api.get("/rooms/abc/messages", Some(&alice.token))
        .await
        .assert_error(400);
    for limit in ["0", "201", "-1", "abc", "1.5", ""] {
        api.history_reply(&alice.token, room, None, Some(limit))
            .await
            .assert_error(400);
    }
    for limit in ["1", "200"] {
        let reply = api.history_reply(&alice.token, room, None, Some(limit)).await;
        assert_eq!(reply.status, 200, "limit {limit}: {reply:?}");
        assert_eq!(reply.body, json!([]));
    }
    for before in ["yesterday", "2022-12-22", "2022-12-22T14:33:59", "1671719639"] {
        api.history_reply(&alice.token, room, Some(before), None)
            .await
            .assert_error(400);
    }
}

#[tokio::test]
async fn unknown_paths_methods_and_bodies() {
    let server = Server::start().await;
    let api = server.api();
    let user = api.new_user("paths").await;
    let room = api.create_room(&user.token, "paths").await;

    for path in ["/nope", "/rooms/1/nope", "/users/1/rooms", "/ws/extra"] {
        api.get(path, Some(&user.token)).await.assert_error(404);
    }
    for (method, path) in [
        (Method::GET, "/users".to_owned()),
        (Method::GET, "/login".to_owned()),
        (Method::GET, "/logout".to_owned()),
        (Method::DELETE, "/users/1".to_owned()),
        (Method::PUT, format!("/rooms/{room}")),
        (Method::GET, format!("/rooms/{room}/join")),
        (Method::POST, format!("/rooms/{room}/messages")),
        (Method::DELETE, "/rooms/me".to_owned()),
        (Method::POST, "/healthz".to_owned()),
    ] {
        let reply = api.raw(method.clone(), &path, Some(&user.token), None).await;
        reply.assert_error(405);
    }

    // Bodies: exactly 64 KiB is accepted, one byte more is 413.
    let limit = 64 * 1024;
    let reply = api
        .raw(
            Method::POST,
            "/users",
            None,
            Some(padded_registration("exactly64k", limit)),
        )
        .await;
    reply.assert_ok(201);
    let reply = api
        .raw(
            Method::POST,
            "/users",
            None,
            Some(padded_registration("over64k", limit + 1)),
        )
        .await;
    reply.assert_error(413);

    // Request heads: 12 KiB is served, 20 KiB is over the default 16 KiB and gets 431 (the
    // gateway itself: a load balancer in front may have its own, smaller limit).
    for (pad, status) in [(12 * 1024, 200), (20 * 1024, 431)] {
        let mut conn = RawHttp::connect(&server.gateway_addr(1), None).await;
        let header = format!("X-Pad: {}\r\n", "p".repeat(pad));
        let answer = conn.get("/healthz", &header).await.expect("an answer");
        assert_eq!(answer.status, status, "a {pad}-byte header: {answer:?}");
    }
}

#[tokio::test]
async fn expired_token_is_refused() {
    let server = Server::start_with(&["--token-ttl", "1s"]).await;
    let api = server.api();
    let user = api.new_user("brief").await;
    assert_eq!(api.get("/rooms/me", Some(&user.token)).await.status, 200);
    let mut ws = Ws::authed(&server, &user.token).await;
    drop(ws);
    // The token lives one second; wait past it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    api.get("/rooms/me", Some(&user.token)).await.assert_error(401);
    ws = Ws::connect(&server).await;
    let answer = ws.auth(&user.token, None).await;
    assert_auth(&answer, 1);
    // A fresh login works again.
    let (token, _) = api.login(&user.username).await;
    assert_eq!(api.get("/rooms/me", Some(&token)).await.status, 200);
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let server = Server::start().await;
    let api = server.api();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let reply = api.get(path, None).await;
        assert_eq!(reply.status, 200, "{path}: {reply:?}");
    }
    let text = api.get("/metrics", None).await.text;
    for name in [
        "chatoy_sockets_open",
        "chatoy_frames_in_total",
        "chatoy_frames_out_total",
        "chatoy_acks_total",
        "chatoy_ack_latency_seconds",
    ] {
        assert!(
            text.lines()
                .any(|line| line.starts_with(&format!("# TYPE {name} "))),
            "metric {name} is not declared:\n{text}"
        );
    }

    let series = [
        r#"chatoy_frames_in_total{type="auth"}"#,
        r#"chatoy_frames_in_total{type="msg"}"#,
        r#"chatoy_frames_out_total{type="auth"}"#,
        r#"chatoy_frames_out_total{type="send"}"#,
        r#"chatoy_frames_out_total{type="recv"}"#,
        r#"chatoy_acks_total{code="0"}"#,
        r#"chatoy_acks_total{code="3"}"#,
        "chatoy_ack_latency_seconds_count",
    ];
    let mut before = Vec::new();
    for name in series {
        before.push(api.metric(name).await.unwrap_or(0.0));
    }

    let (alice, bob, room) = alice_and_bob(&api, "metrics").await;
    let (mut a, mut b) = two_sockets(&server, &alice, &bob).await;
    assert_eq!(api.metric("chatoy_sockets_open").await, Some(2.0));
    for i in 0..3 {
        let uuid = new_uuid();
        a.send_ok(&uuid, room, &format!("m{i}")).await;
        assert_eq!(b.next_recv().await["uuid"], json!(uuid));
    }
    let bad = new_uuid();
    let answer = a.send_msg(&bad, room, "").await;
    chatoy_testkit::assert_send(&answer, 3, &bad);

    // Exact deltas, except the latency histogram, which may also time refusals.
    let deltas = [2.0, 4.0, 2.0, 4.0, 3.0, 3.0, 1.0, 3.0];
    for ((name, before), delta) in series.iter().zip(&before).zip(deltas) {
        let after = api.metric(name).await.unwrap_or(0.0);
        if name.starts_with("chatoy_ack_latency") {
            assert!(after - before >= delta, "{name} moved from {before} to {after}");
        } else {
            assert_eq!(after - before, delta, "{name} moved from {before} to {after}");
        }
    }

    // Closing a socket brings the gauge down (the server notices the close asynchronously).
    b.close().await;
    within(WAIT, "chatoy_sockets_open to drop to 1", async {
        while api.metric("chatoy_sockets_open").await != Some(1.0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(a);
}
