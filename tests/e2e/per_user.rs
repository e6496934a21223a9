//! What one user or one client address can make a gateway hold, and the answers at each limit:
//! sockets per user (close 1008), rooms per user (403, and a socket's memory independent of
//! them), registrations per address (429), password hashes at once (503, bounded memory, no
//! hash for a taken name), a token that expires on an open socket (1008), and timestamps past
//! what nanoseconds hold (clamped).

use std::time::Duration;

use serde_json::json;

use chatoy_testkit::{
    assert_auth, new_uuid, random_hex, rss_kib, within, Event, PeakRss, Server, Ws, PASSWORD, WAIT,
};

/// The user's sockets past `--max-sockets-per-user` are closed with 1008 at `auth`; the others
/// are untouched, and a place freed is taken again.
#[tokio::test]
async fn sockets_per_user_are_capped_with_a_clear_close() {
    let server = Server::start_with(&["--max-sockets-per-user", "2"]).await;
    let api = server.gateway_api(1);
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let room = api.create_room(&alice.token, "two at most").await;
    let url = server.gateway_ws_url(1);
    let first = Ws::authed_url(&url, &alice.token).await;
    let mut second = Ws::authed_url(&url, &alice.token).await;
    let mut third = Ws::connect_url(&url).await;
    third
        .send_text(&json!({"type": "auth", "token": alice.token}).to_string())
        .await;
    match third.next_event().await {
        Event::Close(code, reason) => {
            assert_eq!(code, 1008);
            assert_eq!(reason, "too many connections for this user");
        }
        other => panic!("expected close 1008, got {other:?}"),
    }
    assert_eq!(
        api.metric("chatoy_http_refused_total{reason=\"sockets_per_user\"}")
            .await,
        Some(1.0)
    );
    // Another user is not affected, and the user's sockets still work.
    let mut bob_ws = Ws::authed_url(&url, &bob.token).await;
    api.join(&bob.token, room).await;
    let uuid = new_uuid();
    bob_ws.send_ok(&uuid, room, "hello").await;
    assert_eq!(second.next_recv().await["uuid"], json!(uuid));
    // A closed socket frees its place.
    first.close().await;
    within(WAIT, "a freed place", async {
        loop {
            let mut ws = Ws::connect_url(&url).await;
            let answer = ws.auth(&alice.token, None).await;
            if answer["type"] == "auth" {
                assert_auth(&answer, 0);
                break;
            }
        }
    })
    .await;
}

/// A user may be in `--max-rooms-per-user` rooms: creating or joining one more answers 403;
/// joining again a room the user is in stays fine.
#[tokio::test]
async fn rooms_per_user_are_capped() {
    let server = Server::start_with(&["--max-rooms-per-user", "3"]).await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let mut rooms = Vec::new();
    for n in 0..3 {
        rooms.push(api.create_room(&alice.token, &format!("room {n}")).await);
    }
    let reply = api
        .post("/rooms", Some(&alice.token), &json!({"name": "one too many"}))
        .await;
    reply.assert_error(403);
    assert!(
        reply.body["msg"]
            .as_str()
            .expect("msg")
            .contains("at most 3 rooms"),
        "{reply:?}"
    );
    let bobs = api.create_room(&bob.token, "bob's").await;
    api.post_empty(&format!("/rooms/{bobs}/join"), Some(&alice.token))
        .await
        .assert_error(403);
    api.post_empty(&format!("/rooms/{}/join", rooms[0]), Some(&alice.token))
        .await
        .assert_ok(200);
    assert_eq!(
        api.get("/rooms/me", Some(&alice.token))
            .await
            .body
            .as_array()
            .map(Vec::len),
        Some(3)
    );
}

/// A socket costs the same whatever the number of its user's rooms: membership is held once
/// per user. Before, each socket held its own list of the user's rooms and every room a list of
/// sockets (measured: about 0.7 MiB per socket for a user in 5 000 rooms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_costs_the_same_in_a_thousand_rooms() {
    const ROOMS: usize = 1000;
    const SOCKETS: usize = 100;
    /// About 140 bytes per room per socket before: 13 MiB for these sockets; now a few KiB each.
    const BOUND_MIB: f64 = 4.0;
    let server =
        Server::start_with(&["--max-rooms-per-user", "1000", "--max-sockets-per-user", "1000"]).await;
    let api = server.gateway_api(1);
    let alice = api.new_user("alice").await;
    within(Duration::from_secs(300), "creating the rooms", async {
        for n in 0..ROOMS {
            api.create_room(&alice.token, &format!("room {n}")).await;
        }
    })
    .await;
    let url = server.gateway_ws_url(1);
    // The first socket subscribes the gateway to the rooms: that cost is the user's, not a
    // socket's.
    let _first = Ws::authed_url(&url, &alice.token).await;
    let pid = server.gateway_pid(1);
    let before = rss_kib(pid).expect("the gateway runs");
    let mut sockets = Vec::new();
    for _ in 0..SOCKETS {
        sockets.push(Ws::authed_url(&url, &alice.token).await);
    }
    let after = rss_kib(pid).expect("the gateway runs");
    let grown_mib = after.saturating_sub(before) as f64 / 1024.0;
    println!(
        "gateway VmRSS {} KiB before, {} KiB after {SOCKETS} more sockets of a user in {ROOMS} rooms \
         (+{grown_mib:.2} MiB, {:.0} B per socket)",
        before,
        after,
        after.saturating_sub(before) as f64 * 1024.0 / SOCKETS as f64
    );
    assert!(
        grown_mib < BOUND_MIB,
        "+{grown_mib:.2} MiB for {SOCKETS} sockets (bound {BOUND_MIB} MiB)"
    );
}

/// Registrations per client address are limited (429 with `Retry-After`).
#[tokio::test]
async fn registrations_per_address_are_limited() {
    let server =
        Server::start_with(&["--register-rate-per-ip", "0.001", "--register-burst-per-ip", "3"]).await;
    let api = server.gateway_api(1);
    for n in 0..3 {
        api.register(&format!("user{n}_{}", random_hex(6))).await;
    }
    let reply = api
        .post(
            "/users",
            None,
            &json!({"username": format!("late_{}", random_hex(6)), "password": PASSWORD}),
        )
        .await;
    reply.assert_error(429);
    assert!(reply.retry_after.is_some(), "{reply:?}");
}

/// A taken name is answered 409 without computing a hash, and a flood of registrations holds at
/// most `--max-concurrent-hashes` hashes (19 MiB each) at once: the others wait briefly, then
/// get 503 with `Retry-After`. Before, every registration hashed at once (measured: +567 MiB
/// with 32 keep-alive clients, +1.1 GiB with 64).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_hashes_are_bounded() {
    const CLIENTS: usize = 32;
    const EACH: usize = 4;
    /// Four hashes of 19 MiB at once, plus the server's own: far under 32 × 19 MiB.
    const BOUND_MIB: f64 = 200.0;
    let server = Server::start_with(&[
        "--argon2-memory-kib",
        "19456",
        "--argon2-iterations",
        "2",
        "--max-concurrent-hashes",
        "4",
        "--hash-wait",
        "200ms",
    ])
    .await;
    let api = server.gateway_api(1);
    let taken = format!("taken_{}", random_hex(6));
    api.register(&taken).await;
    let hashes = api.metric("chatoy_password_hashes_total").await;
    for _ in 0..5 {
        api.post(
            "/users",
            None,
            &json!({"username": taken.to_uppercase(), "password": PASSWORD}),
        )
        .await
        .assert_error(409);
    }
    assert_eq!(
        api.metric("chatoy_password_hashes_total").await,
        hashes,
        "no hash for a taken name"
    );

    let pid = server.gateway_pid(1);
    let rss = PeakRss::start(pid, Duration::from_millis(20));
    // Keep-alive clients (one connection each, many requests), all at once.
    let flood: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let api = server.gateway_api(1);
            tokio::spawn(async move {
                let mut codes = Vec::new();
                for n in 0..EACH {
                    let name = format!("flood{c}x{n}_{}", random_hex(4));
                    let reply = api
                        .post("/users", None, &json!({"username": name, "password": PASSWORD}))
                        .await;
                    if reply.status == 503 {
                        assert!(reply.retry_after.is_some(), "{reply:?}");
                    }
                    codes.push(reply.status);
                }
                codes
            })
        })
        .collect();
    let mut codes = Vec::new();
    for client in flood {
        codes.extend(client.await.expect("a flood client"));
    }
    let before = rss.before();
    let grown_mib = rss.stop().await.saturating_sub(before) as f64 / 1024.0;
    let created = codes.iter().filter(|code| **code == 201).count();
    let busy = codes.iter().filter(|code| **code == 503).count();
    println!(
        "gateway VmRSS grew at most {grown_mib:.0} MiB during {} registrations from {CLIENTS} \
         clients: {created} created, {busy} answered 503",
        codes.len()
    );
    assert!(codes.iter().all(|code| *code == 201 || *code == 503), "{codes:?}");
    assert!(created > 0);
    assert!(
        grown_mib < BOUND_MIB,
        "+{grown_mib:.0} MiB (bound {BOUND_MIB} MiB)"
    );
}

/// A token that expires while its socket is open closes that socket (1008), so an expired token
/// never stores anything.
#[tokio::test]
async fn an_expired_token_closes_its_socket() {
    let server = Server::start_with(&["--token-ttl", "2s", "--ping-interval", "1s"]).await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let mut ws = Ws::authed(&server, &alice.token).await;
    let closed = within(Duration::from_secs(30), "the expiry close", async {
        match ws.next_event().await {
            Event::Close(code, reason) => (code, reason),
            other => panic!("expected the expiry close, got {other:?}"),
        }
    })
    .await;
    assert_eq!(closed, (1008, "token expired".to_owned()));
}

/// RFC 3339 times past what nanoseconds hold are clamped, not refused.
#[tokio::test]
async fn far_future_timestamps_are_clamped() {
    let server = Server::start().await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let room = api.create_room(&alice.token, "future").await;
    let mut ws = Ws::authed(&server, &alice.token).await;
    let uuid = new_uuid();
    ws.send_ok(&uuid, room, "now").await;
    let page = api
        .history(&alice.token, room, Some("2999-01-01T00:00:00Z"), None)
        .await;
    assert_eq!(page.len(), 1);
    assert_eq!(page[0]["uuid"], json!(uuid));
    assert!(api
        .history(&alice.token, room, Some("1000-01-01T00:00:00Z"), None)
        .await
        .is_empty());
}
