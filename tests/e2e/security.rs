//! Security properties seen from outside: which browser origins may call the API and open
//! WebSockets (`--allowed-origins`, CORS and its preflight), and log hygiene: with the most
//! verbose logging no token or password ever reaches the process's output, and no answer but
//! the login's carries a token.

use reqwest::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use chatoy_testkit::{
    assert_auth, assert_send, new_uuid, random_hex, within, Event, Server, Ws, PASSWORD, WAIT,
};

/// An answer to a request with an `Origin`: status and the headers that matter here.
#[derive(Debug)]
struct Answer {
    status: u16,
    allow_origin: Option<String>,
    allow_methods: Option<String>,
    allow_headers: Option<String>,
    vary: Option<String>,
    body: Value,
}

/// Sends `method path` to the server with an optional `Origin`, bearer token and JSON body;
/// a preflight adds `Access-Control-Request-Method: POST`.
async fn request(
    server: &Server,
    method: Method,
    path: &str,
    origin: Option<&str>,
    token: Option<&str>,
    body: Option<Value>,
) -> Answer {
    let http = reqwest::Client::builder().timeout(WAIT).build().expect("client");
    let preflight = method == Method::OPTIONS;
    let mut request = http.request(method, format!("{}{path}", server.base_url()));
    if let Some(origin) = origin {
        request = request.header("origin", origin);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    if preflight {
        request = request
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization,content-type");
    }
    let response = request.send().await.expect("request");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Answer {
        status: response.status().as_u16(),
        allow_origin: header("access-control-allow-origin"),
        allow_methods: header("access-control-allow-methods"),
        allow_headers: header("access-control-allow-headers"),
        vary: header("vary"),
        body: response.json().await.unwrap_or(Value::Null),
    }
}

/// Asserts a page of `origin` can neither preflight a request nor open a WebSocket (403).
async fn assert_preflight_and_upgrade_refused(server: &Server, token: &str, origin: &str) {
    let answer = request(server, Method::OPTIONS, "/rooms", Some(origin), None, None).await;
    assert_eq!(answer.status, 403, "{origin}: preflight {answer:?}");
    assert_eq!(upgrade_with_origin(server, token, origin).await, 403, "{origin}");
}

/// `GET /rooms/me` with `token`, from a page of `origin` (none: not a browser).
async fn my_rooms(server: &Server, origin: Option<&str>, token: &str) -> Answer {
    request(server, Method::GET, "/rooms/me", origin, Some(token), None).await
}

/// `POST /login` of `username` (password [`PASSWORD`]), from a page of `origin`.
async fn login_from(server: &Server, origin: Option<&str>, username: &str) -> Answer {
    let body = json!({"username": username, "password": PASSWORD});
    request(server, Method::POST, "/login", origin, None, Some(body)).await
}

/// Opens a WebSocket with an `Origin`; returns the HTTP status of the upgrade (101 if accepted,
/// after checking that the socket works).
async fn upgrade_with_origin(server: &Server, token: &str, origin: &str) -> u16 {
    let mut request = server.ws_url().into_client_request().expect("request");
    request
        .headers_mut()
        .insert("origin", HeaderValue::from_str(origin).expect("origin header"));
    match within(WAIT, "the upgrade", tokio_tungstenite::connect_async(request)).await {
        Ok((stream, response)) => {
            let mut ws = Ws::from_stream(stream);
            assert_auth(&ws.auth(token, None).await, 0);
            response.status().as_u16()
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("upgrade with Origin {origin}: {other}"),
    }
}

/// The server's own origin, as a page it served would send it.
fn own_origin(server: &Server) -> String {
    server.base_url()
}

#[tokio::test]
async fn default_origins_allow_only_the_own_host_and_no_origin() {
    let server = Server::start().await;
    let api = server.api();
    let user = api.new_user("origin").await;
    let own = own_origin(&server);

    // Non-browser clients send no Origin; a page of the server's own host sends its own: both
    // are served, and no CORS headers are ever sent by default.
    for origin in [None, Some(own.as_str())] {
        let answer = my_rooms(&server, origin, &user.token).await;
        assert_eq!(answer.status, 200, "Origin {origin:?}: {answer:?}");
        assert_eq!(answer.allow_origin, None, "{answer:?}");
        let answer = login_from(&server, origin, &user.username).await;
        assert_eq!(answer.status, 200, "Origin {origin:?}: {answer:?}");
        assert_eq!(answer.allow_origin, None, "{answer:?}");
    }
    assert_eq!(upgrade_with_origin(&server, &user.token, &own).await, 101);

    // Any other origin: 403 on every request and on the WebSocket upgrade.
    for origin in ["https://evil.example", "http://127.0.0.1:1", "null"] {
        let answer = my_rooms(&server, Some(origin), &user.token).await;
        assert_eq!(answer.status, 403, "{origin}: {answer:?}");
        assert_eq!(answer.body["code"], json!(403), "{answer:?}");
        assert_eq!(answer.allow_origin, None, "{answer:?}");
        let answer = login_from(&server, Some(origin), &user.username).await;
        assert_eq!(
            answer.status, 403,
            "{origin}: a foreign page cannot log in: {answer:?}"
        );
        assert_preflight_and_upgrade_refused(&server, &user.token, origin).await;
    }
    // A same-origin page never preflights; an OPTIONS that is not a CORS preflight is 405.
    let answer = request(&server, Method::OPTIONS, "/rooms", None, None, None).await;
    assert_eq!(answer.status, 405, "{answer:?}");
}

#[tokio::test]
async fn listed_origins_get_cors_and_others_403() {
    let listed = "https://app.example.com";
    let server = Server::start_with(&[
        "--allowed-origins",
        "https://app.example.com/, http://localhost:3000",
    ])
    .await;
    let api = server.api();
    let user = api.new_user("cors").await;

    // A listed origin: served, with CORS headers on successes and errors alike.
    for origin in [listed, "http://localhost:3000"] {
        let answer = my_rooms(&server, Some(origin), &user.token).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.allow_origin.as_deref(), Some(origin), "{answer:?}");
        assert!(
            answer
                .vary
                .as_deref()
                .is_some_and(|v| v.to_ascii_lowercase().contains("origin")),
            "{answer:?}"
        );
    }
    let answer = my_rooms(&server, Some(listed), "f00d").await;
    assert_eq!(answer.status, 401, "{answer:?}");
    assert_eq!(
        answer.allow_origin.as_deref(),
        Some(listed),
        "a browser can read the error"
    );
    let answer = login_from(&server, Some(listed), &user.username).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.allow_origin.as_deref(), Some(listed));

    // Its preflight is answered 204 with the methods and headers the API uses.
    let answer = request(&server, Method::OPTIONS, "/rooms", Some(listed), None, None).await;
    assert_eq!(answer.status, 204, "{answer:?}");
    assert_eq!(answer.allow_origin.as_deref(), Some(listed));
    let methods = answer.allow_methods.clone().unwrap_or_default();
    assert!(methods.contains("GET") && methods.contains("POST"), "{answer:?}");
    let headers = answer
        .allow_headers
        .clone()
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        headers.contains("authorization") && headers.contains("content-type"),
        "{answer:?}"
    );
    let answer = request(&server, Method::OPTIONS, "/nope", Some(listed), None, None).await;
    assert_eq!(answer.status, 404, "preflight of an unknown path: {answer:?}");
    assert_eq!(upgrade_with_origin(&server, &user.token, listed).await, 101);

    // The own host is still served (without CORS headers); an unlisted origin is refused.
    let own = own_origin(&server);
    let answer = my_rooms(&server, Some(&own), &user.token).await;
    assert_eq!((answer.status, answer.allow_origin), (200, None));
    for origin in [
        "https://evil.example",
        "https://app.example.com:8443",
        "http://app.example.com",
    ] {
        let answer = my_rooms(&server, Some(origin), &user.token).await;
        assert_eq!(answer.status, 403, "{origin}: {answer:?}");
        assert_preflight_and_upgrade_refused(&server, &user.token, origin).await;
    }
    assert!(
        api.metric("chatoy_http_refused_total{reason=\"origin\"}")
            .await
            .is_some_and(|n| n >= 9.0),
        "refusals are counted"
    );
}

#[tokio::test]
async fn any_origin_with_star() {
    let server = Server::start_with(&["--allowed-origins", "*"]).await;
    let api = server.api();
    let user = api.new_user("star").await;
    for origin in ["https://evil.example", "null"] {
        let answer = my_rooms(&server, Some(origin), &user.token).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.allow_origin.as_deref(), Some(origin), "{answer:?}");
        let answer = request(&server, Method::OPTIONS, "/login", Some(origin), None, None).await;
        assert_eq!(answer.status, 204, "{answer:?}");
        assert_eq!(upgrade_with_origin(&server, &user.token, origin).await, 101);
    }
}

#[tokio::test]
async fn tokens_and_passwords_never_reach_logs_or_other_answers() {
    let server = Server::start_with(&["--log", "trace"]).await;
    let api = server.api();
    // Every answer but the token-bearing login answers, as text.
    let mut answers: Vec<String> = Vec::new();
    let alice = format!("alice_{}", random_hex(6));
    let bob = format!("bob_{}", random_hex(6));
    let alice_password = format!("alice-password-{}", random_hex(16));
    let bob_password = format!("bob-password-{}", random_hex(16));
    let wrong_password = format!("wrong-guess-{}", random_hex(16));
    let short_password = random_hex(7);

    for (name, password) in [(&alice, &alice_password), (&bob, &bob_password)] {
        let reply = api
            .post("/users", None, &json!({"username": name, "password": password}))
            .await;
        reply.assert_ok(201);
        answers.push(reply.text);
    }
    // Refused registrations: a taken name, a too-short password.
    for (name, password) in [
        (&alice, &bob_password),
        (&format!("c_{}", random_hex(6)), &short_password),
    ] {
        let reply = api
            .post("/users", None, &json!({"username": name, "password": password}))
            .await;
        assert!(reply.status == 409 || reply.status == 400, "{reply:?}");
        answers.push(reply.text);
    }
    let login = |name: &String, password: &String| {
        let (api, body) = (api.clone(), json!({"username": name, "password": password}));
        async move {
            let reply = api.post("/login", None, &body).await;
            assert_eq!(reply.status, 200, "{reply:?}");
            reply.body["msg"].as_str().expect("token").to_owned()
        }
    };
    let alice_token = login(&alice, &alice_password).await;
    let bob_token = login(&bob, &bob_password).await;
    let second_token = login(&alice, &alice_password).await;
    let reply = api
        .post(
            "/login",
            None,
            &json!({"username": alice, "password": wrong_password}),
        )
        .await;
    assert_eq!(reply.status, 401, "{reply:?}");
    answers.push(reply.text);

    // The API with tokens, including in the wrong places.
    let room = {
        let reply = api
            .post("/rooms", Some(&alice_token), &json!({"name": "secrets"}))
            .await;
        assert_eq!(reply.status, 201, "{reply:?}");
        answers.push(reply.text.clone());
        reply.body["id"].as_u64().expect("room id")
    };
    for reply in [
        api.post_empty(&format!("/rooms/{room}/join"), Some(&bob_token))
            .await,
        api.get("/rooms/me", Some(&bob_token)).await,
        api.get(&format!("/rooms/{room}/messages"), Some(&alice_token))
            .await,
        api.raw_authorization(
            Method::GET,
            "/rooms/me",
            Some(&format!("Basic {alice_token}")),
            None,
        )
        .await,
        api.raw_authorization(Method::GET, "/rooms/me", Some(&alice_token), None)
            .await,
        api.get("/rooms/me", Some(&format!("{bob_token}0"))).await,
    ] {
        answers.push(reply.text);
    }

    // WebSockets: auth (one with since), messages both ways, a wrong token.
    let mut a = Ws::connect(&server).await;
    let frame = a.auth(&alice_token, None).await;
    answers.push(frame.to_string());
    let mut b = Ws::connect(&server).await;
    let frame = b.auth(&bob_token, Some("2020-01-01T00:00:00.000000000Z")).await;
    answers.push(frame.to_string());
    let mut stranger = Ws::connect(&server).await;
    let frame = stranger.auth(&format!("{alice_token}00"), None).await;
    assert_auth(&frame, 1);
    answers.push(frame.to_string());
    let mut doomed = Ws::authed(&server, &second_token).await;
    for to_bob in [true, false] {
        let (ws, other) = if to_bob {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        let uuid = new_uuid();
        let answer = ws.send_msg(&uuid, room, "hello").await;
        assert_send(&answer, 0, &uuid);
        answers.push(answer.to_string());
        let recv = other.next_json().await;
        answers.push(recv.to_string());
    }
    let frame = a.auth(&alice_token, None).await;
    assert_auth(&frame, 2);
    answers.push(frame.to_string());

    // Logout of the second token closes its socket; the token no longer works.
    let reply = api.post_empty("/logout", Some(&second_token)).await;
    reply.assert_ok(200);
    answers.push(reply.text);
    // It got alice's room traffic until then.
    loop {
        match doomed.next_event().await {
            Event::Json(frame) => answers.push(frame.to_string()),
            Event::Close(code, reason) => {
                assert_eq!(code, 1008, "{reason}");
                answers.push(reason);
                break;
            }
            Event::Ended(why) => panic!("the revoked socket ended without a close: {why}"),
        }
    }
    let reply = api.get("/rooms/me", Some(&second_token)).await;
    reply.assert_error(401);
    answers.push(reply.text);
    let mut retry = Ws::connect(&server).await;
    let frame = retry.auth(&second_token, None).await;
    assert_auth(&frame, 1);
    answers.push(frame.to_string());
    a.close().await;
    b.close().await;

    let tokens = [&alice_token, &bob_token, &second_token];
    let passwords = [&alice_password, &bob_password, &wrong_password, &short_password];
    for answer in &answers {
        for secret in tokens.iter().chain(&passwords) {
            assert!(
                !answer.contains(secret.as_str()),
                "an answer carries a secret: {answer}"
            );
        }
    }
    // The whole output of every process, at the most verbose level.
    let output = server.stderr();
    let verbose = output
        .lines()
        .filter(|line| line.contains(" DEBUG ") || line.contains(" TRACE "))
        .count();
    let requests = output
        .lines()
        .filter(|line| line.contains("http request"))
        .count();
    assert!(
        requests >= 10,
        "the log is not verbose ({requests} requests logged):\n{output}"
    );
    for secret in tokens.iter().chain(&passwords) {
        let found: Vec<&str> = output
            .lines()
            .filter(|line| line.contains(secret.as_str()))
            .collect();
        assert!(found.is_empty(), "a secret is in the log:\n{}", found.join("\n"));
    }
    println!(
        "scanned {} lines ({verbose} debug or trace) of output",
        output.lines().count()
    );
}
