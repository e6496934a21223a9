//! Who receives what: `recv` fan-out to every other socket of every member, join propagation
//! without reconnecting, idempotent retries, membership refusals, history paging and order, and
//! fifty concurrent clients in five rooms.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use chatoy_testkit::{
    assert_send, msg_frame, new_uuid, recv_data, seed, ts, two_sockets, within, Event, Server, Ws,
    UNLIMITED_MSGS,
};

#[tokio::test]
async fn recv_reaches_every_other_socket_of_members() {
    let server = Server::start().await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let carol = api.new_user("carol").await;
    let room = api.create_room(&alice.token, "shared").await;
    api.join(&bob.token, room).await;
    let other = api.create_room(&carol.token, "other").await;
    api.join(&bob.token, other).await;

    let mut a1 = Ws::authed(&server, &alice.token).await;
    let mut a2 = Ws::authed(&server, &alice.token).await;
    let mut b1 = Ws::authed(&server, &bob.token).await;
    let mut c1 = Ws::authed(&server, &carol.token).await;

    let uuid = new_uuid();
    let sent = a1.send_ok(&uuid, room, "to the room").await;
    let expected = json!({
        "uuid": uuid,
        "sender": alice.id,
        "room": room,
        "data": {"type": "Text", "text": "to the room"},
        "modified": false
    });
    for ws in [&mut a2, &mut b1] {
        let mut data = ws.next_recv().await;
        assert_eq!(ts(data["sent"].as_str().expect("sent")), ts(&sent));
        data.as_object_mut().expect("object").remove("sent");
        assert_eq!(data, expected);
    }

    // Markers: the next frame each socket sees proves it saw nothing in between.
    let marker = new_uuid();
    b1.send_ok(&marker, room, "marker").await;
    for ws in [&mut a1, &mut a2] {
        let data = ws.next_recv().await;
        assert_eq!(
            data["uuid"],
            json!(marker),
            "the sending socket gets no recv of its own message"
        );
    }
    let elsewhere = new_uuid();
    b1.send_ok(&elsewhere, other, "other room").await;
    assert_eq!(
        c1.next_recv().await["uuid"],
        json!(elsewhere),
        "a non-member saw nothing of the shared room"
    );
}

#[tokio::test]
async fn join_propagates_to_an_open_socket() {
    let server = Server::start().await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let room = api.create_room(&alice.token, "late joiners").await;

    let (mut a, mut b) = two_sockets(&server, &alice, &bob).await;
    a.send_ok(&new_uuid(), room, "before bob").await;

    api.join(&bob.token, room).await;
    let uuid = new_uuid();
    a.send_ok(&uuid, room, "after bob joined").await;
    let data = b.next_recv().await;
    assert_eq!(
        data["uuid"],
        json!(uuid),
        "the first recv is the first message after the join"
    );
    assert_eq!(data["sender"], json!(alice.id));
    // Bob can now send into the room on the same socket.
    let hi = new_uuid();
    b.send_ok(&hi, room, "hi").await;
    assert_eq!(a.next_recv().await["uuid"], json!(hi));

    // Creating a room joins the creator, and so does it for the creator's open sockets.
    let created = api.create_room(&bob.token, "bob's own").await;
    api.join(&alice.token, created).await;
    let first = new_uuid();
    a.send_ok(&first, created, "first in the new room").await;
    assert_eq!(b.next_recv().await["uuid"], json!(first));
}

#[tokio::test]
async fn idempotent_retry_and_uuid_conflict() {
    let server = Server::start().await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let room = api.create_room(&alice.token, "retry").await;
    let second_room = api.create_room(&alice.token, "retry too").await;
    let (mut first, mut second) = two_sockets(&server, &alice, &alice).await;

    let uuid = new_uuid();
    let sent = first.send_ok(&uuid, room, "hello").await;
    // The same socket retries, and another socket of the same user retries (a reconnect).
    assert_eq!(first.send_ok(&uuid, room, "hello").await, sent);
    let data = second.next_recv().await;
    assert_eq!(data["uuid"], json!(uuid));
    assert_eq!(second.send_ok(&uuid, room, "hello").await, sent);
    // Reusing the uuid for other content in that room is invalid.
    let answer = first.send_msg(&uuid, room, "something else").await;
    assert_send(&answer, 3, &uuid);

    let history = api.history(&alice.token, room, None, None).await;
    assert_eq!(history.len(), 1, "stored exactly once: {history:?}");
    assert_eq!(history[0]["uuid"], json!(uuid));
    assert_eq!(history[0]["data"]["text"], json!("hello"));
    assert_eq!(ts(history[0]["sent"].as_str().expect("sent")), ts(&sent));

    // Another member reusing the uuid in that room, even with the same text, is refused.
    let bob = api.new_user("bob").await;
    api.join(&bob.token, room).await;
    let mut thief = Ws::authed(&server, &bob.token).await;
    let answer = thief.send_msg(&uuid, room, "hello").await;
    assert_send(&answer, 3, &uuid);

    // A uuid identifies a message within its room: another room is another message.
    let elsewhere = first.send_ok(&uuid, second_room, "hello").await;
    assert!(ts(&elsewhere) > ts(&sent));
    assert_eq!(api.history(&alice.token, second_room, None, None).await.len(), 1);
    assert_eq!(api.history(&alice.token, room, None, None).await.len(), 1);
}

#[tokio::test]
async fn non_members_are_refused() {
    let server = Server::start().await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let eve = api.new_user("eve").await;
    let room = api.create_room(&alice.token, "closed").await;
    let (mut a, mut e) = two_sockets(&server, &alice, &eve).await;
    a.send_ok(&new_uuid(), room, "secret").await;

    let uuid = new_uuid();
    let answer = e.send_msg(&uuid, room, "let me in").await;
    assert_send(&answer, 2, &uuid);
    api.history_reply(&eve.token, room, None, None)
        .await
        .assert_error(403);
    for absent in [room + 1_000, 424_242] {
        let uuid = new_uuid();
        let answer = a.send_msg(&uuid, absent, "anyone?").await;
        assert_send(&answer, 2, &uuid);
        api.history_reply(&alice.token, absent, None, None)
            .await
            .assert_error(404);
    }
    let history = api.history(&alice.token, room, None, None).await;
    assert_eq!(history.len(), 1, "refused messages are not stored");
    // Eve received nothing of the room: her next frame is the answer to her own message.
    let probe = new_uuid();
    e.send_text(&msg_frame(&probe, room, "again")).await;
    assert_send(&e.next_json().await, 2, &probe);
}

/// Re-expresses a timestamp with a `+HH:MM` offset so it contains a literal `+`.
fn with_offset(text: &str, hours: i32) -> String {
    let at: DateTime<Utc> = DateTime::parse_from_rfc3339(text)
        .expect("timestamp")
        .with_timezone(&Utc);
    let offset = FixedOffset::east_opt(hours * 3600).expect("offset");
    at.with_timezone(&offset)
        .to_rfc3339_opts(SecondsFormat::Nanos, false)
}

#[tokio::test]
async fn history_pages_newest_first() {
    let server = Server::start_with(&UNLIMITED_MSGS).await;
    let api = server.api();
    let alice = api.new_user("alice").await;
    let room = api.create_room(&alice.token, "archive").await;
    let mut ws = Ws::authed(&server, &alice.token).await;

    let mut sent = Vec::new();
    for i in 0..120 {
        let uuid = new_uuid();
        let at = ws.send_ok(&uuid, room, &format!("message {i}")).await;
        sent.push((uuid, at));
    }
    for pair in sent.windows(2) {
        assert!(
            ts(&pair[0].1) < ts(&pair[1].1),
            "sent strictly increases in a room"
        );
    }
    let newest_first: Vec<&str> = sent.iter().rev().map(|(uuid, _)| uuid.as_str()).collect();
    let uuids = |page: &[Value]| -> Vec<String> {
        page.iter()
            .map(|m| m["uuid"].as_str().expect("uuid").to_owned())
            .collect()
    };

    // Default limit is 50, newest first.
    let first = api.history(&alice.token, room, None, None).await;
    assert_eq!(uuids(&first), newest_first[..50]);

    // Paging with before = the oldest sent of the previous page yields everything exactly once.
    let mut all = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let page = api.history(&alice.token, room, before.as_deref(), Some(50)).await;
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 50);
        before = Some(page[page.len() - 1]["sent"].as_str().expect("sent").to_owned());
        all.extend(page);
        assert!(all.len() <= 120, "paging does not terminate");
    }
    assert_eq!(uuids(&all), newest_first);
    for pair in all.windows(2) {
        let (newer, older) = (&pair[0]["sent"], &pair[1]["sent"]);
        assert!(
            ts(newer.as_str().expect("sent")) > ts(older.as_str().expect("sent")),
            "strictly decreasing sent"
        );
    }
    for (i, message) in all.iter().rev().enumerate() {
        assert_eq!(message["data"]["text"], json!(format!("message {i}")));
        assert_eq!(message["sender"], json!(alice.id));
        assert_eq!(ts(message["sent"].as_str().expect("sent")), ts(&sent[i].1));
    }

    // limit 200 returns all; before is exclusive; before the first message returns nothing.
    let everything = api.history(&alice.token, room, None, Some(200)).await;
    assert_eq!(uuids(&everything), newest_first);
    let below = api.history(&alice.token, room, Some(&sent[60].1), Some(3)).await;
    assert_eq!(
        uuids(&below),
        [sent[59].0.clone(), sent[58].0.clone(), sent[57].0.clone()]
    );
    assert!(api
        .history(&alice.token, room, Some(&sent[0].1), None)
        .await
        .is_empty());

    // Any offset names the same instant; a raw `+` that arrives decoded as a space is accepted.
    let plus_eight = with_offset(&sent[60].1, 8);
    let same = api.history(&alice.token, room, Some(&plus_eight), Some(3)).await;
    assert_eq!(uuids(&same), uuids(&below));
    let plus_zero = with_offset(&sent[60].1, 0);
    assert!(plus_zero.contains('+'));
    let reply = api
        .get(
            &format!("/rooms/{room}/messages?before={plus_zero}&limit=3"),
            Some(&alice.token),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(uuids(reply.body.as_array().expect("array")), uuids(&below));
}

/// One socket's part in the fifty-client run.
struct Client {
    user: usize,
    ws: Ws,
    /// (uuid, room, text) in sending order.
    plan: Vec<(String, u64, String)>,
    /// How many `recv` frames it must get before the markers.
    expected: usize,
}

/// What one socket saw.
struct Seen {
    /// uuid → sent (ns) of its own acknowledged messages.
    acked: HashMap<String, i64>,
    /// Every `recv.data` in arrival order.
    received: Vec<Value>,
}

async fn run_client(mut client: Client, window: usize) -> (Client, Seen) {
    let mut seen = Seen {
        acked: HashMap::new(),
        received: Vec::new(),
    };
    let mut next = 0;
    let mut in_flight = BTreeSet::new();
    while seen.acked.len() < client.plan.len() || seen.received.len() < client.expected {
        while next < client.plan.len() && in_flight.len() < window {
            let (uuid, room, text) = &client.plan[next];
            client.ws.send_text(&msg_frame(uuid, *room, text)).await;
            in_flight.insert(uuid.clone());
            next += 1;
        }
        let frame = client.ws.next_json().await;
        match frame["type"].as_str() {
            Some("send") => {
                let uuid = frame["uuid"].as_str().expect("uuid").to_owned();
                assert!(in_flight.remove(&uuid), "answer to nothing in flight: {frame}");
                let sent = assert_send(&frame, 0, &uuid);
                seen.acked.insert(uuid, sent);
            }
            Some("recv") => seen.received.push(recv_data(&frame)),
            _ => panic!("unexpected frame {frame}"),
        }
        assert!(
            seen.received.len() <= client.expected,
            "user {} socket received more than the {} messages of its rooms",
            client.user,
            client.expected
        );
    }
    (client, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_in_five_rooms() {
    const USERS: usize = 40;
    const DOUBLE_SOCKETS: usize = 10;
    const PER_CLIENT: usize = 20;
    let server = Server::start_with(&UNLIMITED_MSGS).await;
    let api = server.api();
    let mut rng = StdRng::seed_from_u64(seed("fifty_clients_in_five_rooms"));

    let host = api.new_user("host").await;
    let mut rooms = Vec::new();
    for i in 0..5 {
        rooms.push(api.create_room(&host.token, &format!("room {i}")).await);
    }
    let mut users = Vec::new();
    let mut memberships: Vec<Vec<u64>> = Vec::new();
    for i in 0..USERS {
        let user = api.new_user(&format!("u{i}")).await;
        let count = rng.random_range(1..=3);
        let mine: Vec<u64> = rooms.choose_multiple(&mut rng, count).copied().collect();
        for room in &mine {
            api.join(&user.token, *room).await;
        }
        users.push(user);
        memberships.push(mine);
    }

    // Sockets: users below DOUBLE_SOCKETS have two, 50 in all; every plan is drawn up front.
    let mut owners = Vec::new();
    for user in 0..USERS {
        owners.push(user);
        if user < DOUBLE_SOCKETS {
            owners.push(user);
        }
    }
    let mut plans = Vec::new();
    let mut per_room: BTreeMap<u64, usize> = BTreeMap::new();
    for (socket, &user) in owners.iter().enumerate() {
        let plan: Vec<(String, u64, String)> = (0..PER_CLIENT)
            .map(|i| {
                let room = *memberships[user].choose(&mut rng).expect("a room");
                *per_room.entry(room).or_default() += 1;
                (new_uuid(), room, format!("socket {socket} message {i}"))
            })
            .collect();
        plans.push(plan);
    }
    let mut clients = Vec::new();
    for (socket, &user) in owners.iter().enumerate() {
        let in_rooms: usize = memberships[user]
            .iter()
            .map(|r| per_room.get(r).copied().unwrap_or(0))
            .sum();
        clients.push(Client {
            user,
            ws: Ws::authed(&server, &users[user].token).await,
            expected: in_rooms - plans[socket].len(),
            plan: std::mem::take(&mut plans[socket]),
        });
    }

    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| tokio::spawn(run_client(client, 8)))
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        let result = within(Duration::from_secs(60), "a client to finish", task)
            .await
            .expect("client task panicked");
        results.push(result);
    }

    // Every acknowledged message, by uuid.
    let mut sent_by: HashMap<String, (usize, u64, String, i64)> = HashMap::new();
    for (socket, (client, seen)) in results.iter().enumerate() {
        for (uuid, room, text) in &client.plan {
            let at = seen.acked[uuid];
            sent_by.insert(uuid.clone(), (socket, *room, text.clone(), at));
        }
    }
    let mut by_room: HashMap<u64, BTreeSet<i64>> = HashMap::new();
    for (_, room, _, at) in sent_by.values() {
        assert!(
            by_room.entry(*room).or_default().insert(*at),
            "two messages of a room share a sent"
        );
    }

    for (socket, (client, seen)) in results.iter().enumerate() {
        let mine = &memberships[client.user];
        let expected: BTreeSet<&str> = sent_by
            .iter()
            .filter(|(_, (from, room, _, _))| *from != socket && mine.contains(room))
            .map(|(uuid, _)| uuid.as_str())
            .collect();
        let got: Vec<&str> = seen
            .received
            .iter()
            .map(|d| d["uuid"].as_str().expect("uuid"))
            .collect();
        let got_set: BTreeSet<&str> = got.iter().copied().collect();
        assert_eq!(got.len(), got_set.len(), "socket {socket} got a duplicate");
        assert_eq!(got_set, expected, "socket {socket} got the wrong set");
        let mut last: HashMap<u64, i64> = HashMap::new();
        for data in &seen.received {
            let uuid = data["uuid"].as_str().expect("uuid");
            let (from, room, text, at) = &sent_by[uuid];
            assert_eq!(data["room"], json!(room));
            assert_eq!(data["sender"], json!(users[owners[*from]].id));
            assert_eq!(data["data"]["text"], json!(text));
            let sent = ts(data["sent"].as_str().expect("sent"));
            assert_eq!(sent, *at, "recv carries the acknowledged sent");
            let previous = last.insert(*room, sent);
            assert!(
                previous.is_none_or(|p| p < sent),
                "socket {socket}: room {room} out of order"
            );
        }
    }

    // One marker per room: each socket's next frames are exactly its rooms' markers, so nothing
    // else (a duplicate, its own message) is still on the way.
    let mut host_ws = Ws::authed(&server, &host.token).await;
    let mut markers = HashMap::new();
    for &room in &rooms {
        let uuid = new_uuid();
        host_ws.send_ok(&uuid, room, "marker").await;
        markers.insert(uuid, room);
    }
    for (socket, (mut client, _)) in results.into_iter().enumerate() {
        let mine = &memberships[client.user];
        let mut want: BTreeSet<u64> = mine.iter().copied().collect();
        while !want.is_empty() {
            let event = client.ws.next_event().await;
            let Event::Json(frame) = event else {
                panic!("socket {socket}: {event:?}");
            };
            let data = recv_data(&frame);
            let uuid = data["uuid"].as_str().expect("uuid");
            let room = markers
                .get(uuid)
                .unwrap_or_else(|| panic!("socket {socket}: extra frame {frame}"));
            assert!(want.remove(room), "socket {socket}: marker twice");
        }
    }
}
