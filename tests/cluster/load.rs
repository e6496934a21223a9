//! The message load the cluster tests drive and the checks they share: sockets that send their
//! plan with a window and resend the same uuid after code 5 or no answer (as a client should),
//! while recording every `recv`; one marker per room to flush every socket; and the room's full
//! history to compare what each member got against.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use chatoy_testkit::minicluster::Cluster;
use chatoy_testkit::{assert_send, msg_frame, new_uuid, recv_data, ts, Api, Event, TestUser, Ws, WAIT};

/// One message a socket will send.
#[derive(Debug, Clone)]
pub(crate) struct Planned {
    pub(crate) uuid: String,
    pub(crate) room: u64,
    pub(crate) text: String,
}

/// One `recv` a socket got.
#[derive(Debug, Clone)]
pub(crate) struct Got {
    pub(crate) uuid: String,
    pub(crate) room: u64,
    /// `sent` in nanoseconds.
    pub(crate) sent: i64,
    /// Whether it was read after the run's cut (see [`run_peer`]).
    pub(crate) after_cut: bool,
}

/// One socket of a run: a member of `rooms` that sends `plan` (possibly nothing).
pub(crate) struct Peer {
    /// Names it in failures: "sender 3 (gateway 2)".
    pub(crate) label: String,
    pub(crate) user: TestUser,
    pub(crate) rooms: Vec<u64>,
    /// The gateway its socket is pinned to.
    pub(crate) gateway: usize,
    pub(crate) ws: Ws,
    pub(crate) plan: Vec<Planned>,
    /// uuid → `sent` (ns) of its acknowledged messages.
    pub(crate) acked: HashMap<String, i64>,
    /// Every `recv` in arrival order.
    pub(crate) received: Vec<Got>,
    /// How often it sent a uuid again after code 5 or no answer.
    pub(crate) resends: usize,
    /// From the first send of each message to its code 0, in order of acknowledgement.
    pub(crate) latencies: Vec<Duration>,
}

impl Peer {
    /// A peer with a plan of `count` messages spread over its rooms in turn.
    pub(crate) fn new(
        label: String,
        user: TestUser,
        rooms: Vec<u64>,
        gateway: usize,
        ws: Ws,
        count: usize,
    ) -> Peer {
        let plan = (0..count)
            .map(|i| Planned {
                uuid: new_uuid(),
                room: rooms[i % rooms.len()],
                text: format!("{label} message {i}"),
            })
            .collect();
        Peer {
            label,
            user,
            rooms,
            gateway,
            ws,
            plan,
            acked: HashMap::new(),
            received: Vec::new(),
            resends: 0,
            latencies: Vec::new(),
        }
    }

    fn record(&mut self, frame: &Value, after_cut: bool) {
        let data = recv_data(frame);
        let room = data["room"].as_u64().expect("room");
        assert!(
            self.rooms.contains(&room),
            "{} got a message of room {room}, not one of its rooms: {frame}",
            self.label
        );
        self.received.push(Got {
            uuid: data["uuid"].as_str().expect("uuid").to_owned(),
            room,
            sent: ts(data["sent"].as_str().expect("sent")),
            after_cut,
        });
    }
}

/// Sends the peer's plan with up to `window` messages unanswered, recording every `recv`.
/// A message answered code 5, or not answered within `answer_limit`, is sent again with the same
/// uuid until it gets code 0; any other code fails the test. `acked` counts code-0 answers over
/// all peers; a `recv` read once `cut` is set is marked `after_cut`.
pub(crate) async fn run_peer(
    mut peer: Peer,
    window: usize,
    answer_limit: Duration,
    acked: Arc<AtomicUsize>,
    cut: Arc<AtomicBool>,
) -> Peer {
    assert!(
        answer_limit < WAIT,
        "an answer limit of {answer_limit:?} is not below WAIT"
    );
    // uuid → (plan index, last attempt, first attempt).
    let mut in_flight: HashMap<String, (usize, Instant, Instant)> = HashMap::new();
    let mut next = 0;
    while peer.acked.len() < peer.plan.len() {
        while next < peer.plan.len() && in_flight.len() < window {
            let planned = &peer.plan[next];
            peer.ws
                .send_text(&msg_frame(&planned.uuid, planned.room, &planned.text))
                .await;
            let now = Instant::now();
            in_flight.insert(planned.uuid.clone(), (next, now, now));
            next += 1;
        }
        let now = Instant::now();
        let deadline = in_flight
            .values()
            .map(|(_, last, _)| *last + answer_limit)
            .min()
            .expect("something is in flight");
        // `answer_limit` is below the harness's `WAIT`, after which `next_event` would fail.
        let next = tokio::time::timeout(deadline.saturating_duration_since(now), peer.ws.next_event());
        match next.await.ok() {
            Some(Event::Json(frame)) if frame["type"] == "recv" => {
                let after_cut = cut.load(Ordering::SeqCst);
                peer.record(&frame, after_cut);
            }
            Some(Event::Json(frame)) if frame["type"] == "send" => {
                let uuid = frame["uuid"].as_str().expect("uuid").to_owned();
                let code = frame["code"].as_u64().expect("code");
                if let Some(sent) = peer.acked.get(&uuid) {
                    // A late answer to an earlier attempt of a message already acknowledged.
                    if code == 0 {
                        assert_eq!(
                            assert_send(&frame, 0, &uuid),
                            *sent,
                            "{}: two sent for one uuid",
                            peer.label
                        );
                    } else {
                        assert_send(&frame, 5, &uuid);
                    }
                    continue;
                }
                let Some(&(index, _, first)) = in_flight.get(&uuid) else {
                    panic!("{}: an answer to nothing in flight: {frame}", peer.label);
                };
                match code {
                    0 => {
                        let sent = assert_send(&frame, 0, &uuid);
                        in_flight.remove(&uuid);
                        peer.acked.insert(uuid, sent);
                        peer.latencies.push(first.elapsed());
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    5 => {
                        assert_send(&frame, 5, &uuid);
                        resend(&mut peer, &mut in_flight, index, first).await;
                    }
                    _ => panic!("{}: a refusal other than code 5: {frame}", peer.label),
                }
            }
            Some(other) => panic!("{}: unexpected {other:?}", peer.label),
            None => {
                let now = Instant::now();
                let late: Vec<(usize, Instant)> = in_flight
                    .values()
                    .filter(|(_, last, _)| *last + answer_limit <= now)
                    .map(|(index, _, first)| (*index, *first))
                    .collect();
                for (index, first) in late {
                    resend(&mut peer, &mut in_flight, index, first).await;
                }
            }
        }
    }
    peer
}

async fn resend(
    peer: &mut Peer,
    in_flight: &mut HashMap<String, (usize, Instant, Instant)>,
    index: usize,
    first: Instant,
) {
    let planned = peer.plan[index].clone();
    peer.ws
        .send_text(&msg_frame(&planned.uuid, planned.room, &planned.text))
        .await;
    in_flight.insert(planned.uuid, (index, Instant::now(), first));
    peer.resends += 1;
}

/// Reads the peer's socket until a `recv` whose uuid satisfies `stop` arrives, recording every
/// other `recv` (as after the cut) and skipping late answers to messages already acknowledged;
/// returns the uuid and room of the one that stopped it.
pub(crate) async fn next_recv_of(peer: &mut Peer, stop: impl Fn(&str) -> bool) -> (String, u64) {
    loop {
        let event = peer.ws.next_event().await;
        let Event::Json(frame) = event else {
            panic!("{}: {event:?} while waiting for a recv", peer.label);
        };
        if frame["type"] == "send" {
            let uuid = frame["uuid"].as_str().expect("uuid");
            assert!(
                peer.acked.contains_key(uuid),
                "{}: stray answer {frame}",
                peer.label
            );
            continue;
        }
        let data = recv_data(&frame);
        let uuid = data["uuid"].as_str().expect("uuid");
        if stop(uuid) {
            return (uuid.to_owned(), data["room"].as_u64().expect("room"));
        }
        peer.record(&frame, true);
    }
}

/// Sends one marker per room from `host` (a member of every room) and makes every peer read
/// until it has the markers of all its rooms, recording what came before them. Returns the
/// markers' uuids.
pub(crate) async fn flush_with_markers(host: &mut Ws, rooms: &[u64], peers: &mut [Peer]) -> HashSet<String> {
    let mut markers = HashMap::new();
    for &room in rooms {
        let uuid = new_uuid();
        host.send_ok(&uuid, room, "marker").await;
        markers.insert(uuid, room);
    }
    for peer in peers.iter_mut() {
        let mut want: HashSet<u64> = peer.rooms.iter().copied().collect();
        while !want.is_empty() {
            let (uuid, room) = next_recv_of(peer, |uuid| markers.contains_key(uuid)).await;
            assert_eq!(markers.get(&uuid), Some(&room));
            assert!(want.remove(&room), "{}: marker of room {room} twice", peer.label);
        }
    }
    markers.into_keys().collect()
}

/// A room's whole history, oldest first, without `skip`. Asserts every uuid appears once and
/// `sent` strictly increases.
pub(crate) async fn full_history(
    api: &Api,
    token: &str,
    room: u64,
    skip: &HashSet<String>,
) -> Vec<(String, i64)> {
    let history: Vec<(String, i64)> = api
        .full_history(token, room)
        .await
        .into_iter()
        .filter(|(uuid, _)| !skip.contains(uuid))
        .collect();
    let unique: HashSet<&String> = history.iter().map(|(uuid, _)| uuid).collect();
    assert_eq!(unique.len(), history.len(), "room {room}: a uuid is stored twice");
    for pair in history.windows(2) {
        assert!(
            pair[0].1 < pair[1].1,
            "room {room}: history sent does not strictly increase"
        );
    }
    history
}

/// Every room's history (oldest first, markers left out) after checking that it holds exactly
/// the messages acknowledged to the peers, each once and with its acknowledged `sent`.
pub(crate) async fn checked_histories(
    api: &Api,
    token: &str,
    rooms: &[u64],
    peers: &[Peer],
    markers: &HashSet<String>,
) -> HashMap<u64, Vec<(String, i64)>> {
    let mut acked: HashMap<&str, (u64, i64)> = HashMap::new();
    for peer in peers {
        for planned in &peer.plan {
            let sent = *peer
                .acked
                .get(&planned.uuid)
                .unwrap_or_else(|| panic!("{}: {} was never acknowledged", peer.label, planned.uuid));
            acked.insert(&planned.uuid, (planned.room, sent));
        }
    }
    let mut histories = HashMap::new();
    for &room in rooms {
        let history = full_history(api, token, room, markers).await;
        let want: HashSet<&str> = acked
            .iter()
            .filter(|(_, (r, _))| *r == room)
            .map(|(uuid, _)| *uuid)
            .collect();
        let got: HashSet<&str> = history.iter().map(|(uuid, _)| uuid.as_str()).collect();
        assert_eq!(
            got, want,
            "room {room}: history is not exactly the acknowledged messages"
        );
        for (uuid, sent) in &history {
            assert_eq!(
                acked[uuid.as_str()].1,
                *sent,
                "room {room}: {uuid} stored with another sent than acknowledged"
            );
        }
        histories.insert(room, history);
    }
    histories
}

/// What `peer` got of `room`, in arrival order, optionally only before the cut.
pub(crate) fn got_in(peer: &Peer, room: u64, before_cut_only: bool) -> Vec<(String, i64)> {
    peer.received
        .iter()
        .filter(|got| got.room == room && !(before_cut_only && got.after_cut))
        .map(|got| (got.uuid.clone(), got.sent))
        .collect()
}

/// `history` without the messages `peer` sent itself (a socket gets no `recv` of its own).
pub(crate) fn others_of(peer: &Peer, history: &[(String, i64)]) -> Vec<(String, i64)> {
    history
        .iter()
        .filter(|(uuid, _)| !peer.acked.contains_key(uuid))
        .cloned()
        .collect()
}

/// Asserts `got` is `history` in order with gaps at most: same `sent`, strictly increasing.
pub(crate) fn assert_subsequence(label: &str, room: u64, got: &[(String, i64)], history: &[(String, i64)]) {
    let mut rest = history.iter();
    for (uuid, sent) in got {
        let found = rest.by_ref().find(|(h, _)| h == uuid);
        let Some((_, stored)) = found else {
            panic!("{label}: room {room}: {uuid} arrived out of history order, twice, or is not stored");
        };
        assert_eq!(
            sent, stored,
            "{label}: room {room}: {uuid} arrived with another sent than stored"
        );
    }
}

/// Registers `count` users named `prefix_N`.
pub(crate) async fn users(api: &Api, prefix: &str, count: usize) -> Vec<TestUser> {
    let mut users = Vec::with_capacity(count);
    for i in 0..count {
        users.push(api.new_user(&format!("{prefix}{i}")).await);
    }
    users
}

/// Waits (bounded) until `counter` reaches `target`.
pub(crate) async fn until_count(counter: &AtomicUsize, target: usize, what: &str) {
    chatoy_testkit::within(Duration::from_secs(120), what, async {
        while counter.load(Ordering::SeqCst) < target {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// The `p`-th percentile (0–100) of sorted durations.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    assert!(!sorted.is_empty(), "no samples");
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// How long a socket waits for an answer before it sends the message again: longer than the
/// gateways' `--send-timeout 2s` of these tests, after which they answer code 5 themselves.
pub(crate) const ANSWER_LIMIT: Duration = Duration::from_secs(5);

/// Rooms, their creator and the sockets of a run.
pub(crate) struct Mesh {
    /// Created every room; its sockets are opened only for markers.
    pub(crate) host: TestUser,
    pub(crate) rooms: Vec<u64>,
    pub(crate) peers: Vec<Peer>,
}

/// `rooms` rooms; `senders` users, sender `i` in rooms `i` and `i + 1` (mod `rooms`) with its
/// socket on gateway `i % gateways + 1` and `per_sender` messages to send over its two rooms;
/// and one listener per gateway in every room. With four rooms and eight senders on two
/// gateways every room has two senders on each gateway.
pub(crate) async fn mesh(cluster: &Cluster, rooms: usize, senders: usize, per_sender: usize) -> Mesh {
    let api = cluster.api();
    let gateways = cluster.gateway_count();
    let host = api.new_user("host").await;
    let mut room_ids = Vec::with_capacity(rooms);
    for r in 0..rooms {
        room_ids.push(api.create_room(&host.token, &format!("room {r}")).await);
    }
    let mut peers = Vec::new();
    for (i, user) in users(&api, "sender", senders).await.into_iter().enumerate() {
        let mine = vec![room_ids[i % rooms], room_ids[(i + 1) % rooms]];
        for room in &mine {
            api.join(&user.token, *room).await;
        }
        let gateway = i % gateways + 1;
        let ws = Ws::authed_url(&cluster.ws_url(gateway), &user.token).await;
        peers.push(Peer::new(
            format!("sender {i} (gateway {gateway})"),
            user,
            mine,
            gateway,
            ws,
            per_sender,
        ));
    }
    for (i, user) in users(&api, "listener", gateways).await.into_iter().enumerate() {
        for room in &room_ids {
            api.join(&user.token, *room).await;
        }
        let gateway = i + 1;
        let ws = Ws::authed_url(&cluster.ws_url(gateway), &user.token).await;
        peers.push(Peer::new(
            format!("listener (gateway {gateway})"),
            user,
            room_ids.clone(),
            gateway,
            ws,
            0,
        ));
    }
    Mesh {
        host,
        rooms: room_ids,
        peers,
    }
}

/// Runs every peer in its own task (see [`run_peer`]) and returns them in the same order.
pub(crate) async fn run_all(
    peers: Vec<Peer>,
    window: usize,
    acked: Arc<AtomicUsize>,
    cut: Arc<AtomicBool>,
    limit: Duration,
) -> Vec<Peer> {
    let tasks: Vec<_> = peers
        .into_iter()
        .map(|peer| tokio::spawn(run_peer(peer, window, ANSWER_LIMIT, acked.clone(), cut.clone())))
        .collect();
    let mut done = Vec::with_capacity(tasks.len());
    for task in tasks {
        let peer = chatoy_testkit::within(limit, "a peer to send its plan", task)
            .await
            .expect("peer task panicked");
        done.push(peer);
    }
    done
}

/// Sends the markers from a fresh socket of the host and returns every room's checked
/// history (see [`checked_histories`]) without the markers and without `others`, messages
/// sent outside the peers' plans.
pub(crate) async fn finish(
    cluster: &Cluster,
    mesh_host: &TestUser,
    rooms: &[u64],
    peers: &mut [Peer],
    others: &[String],
) -> HashMap<u64, Vec<(String, i64)>> {
    let mut host = Ws::authed_url(&cluster.ws_url(1), &mesh_host.token).await;
    let mut skip = flush_with_markers(&mut host, rooms, peers).await;
    skip.extend(others.iter().cloned());
    checked_histories(&cluster.api(), &mesh_host.token, rooms, peers, &skip).await
}
