//! The router's workers in process: the real in-process bus and a real SQLite store in a
//! temporary directory, driven through the bus as a gateway drives them.

use std::sync::Arc;
use std::time::Duration;

use chatoy_bus::{Delivery, DynBus, InProcBus, Subscription};
use chatoy_protocol::bus::{MsgReply, MsgRequest, Origin, RoomEvent};
use chatoy_protocol::{MessageContent, SendCode, Timestamp};
use chatoy_router::{Metrics, RouterConfig};
use chatoy_store::{DynStore, RoomDraft, SqliteConfig, SqliteStore};
use tokio_util::sync::CancellationToken;

/// Partitions of the test bus: rooms 1 and 3 share partition 1, room 2 is on partition 0.
const PARTITIONS: usize = 2;

struct Router {
    bus: DynBus,
    store: DynStore,
    dir: std::path::PathBuf,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    registry: prometheus::Registry,
}

impl Router {
    /// A router on a fresh store with one user (id 1) in rooms 1, 2 and 3, and user 2 in none.
    async fn start() -> Router {
        let dir = std::env::temp_dir().join(format!("chatoy-router-{}", uuid::Uuid::new_v4()));
        Router::start_in(dir, true).await
    }

    async fn start_in(dir: std::path::PathBuf, fresh: bool) -> Router {
        let store: DynStore = Arc::new(
            SqliteStore::open(&SqliteConfig {
                data_dir: dir.clone(),
                busy_timeout: Duration::from_millis(20),
            })
            .expect("open the store"),
        );
        if fresh {
            let alice = store.create_user("alice", "h", Timestamp(1)).await.unwrap();
            store.create_user("bob", "h", Timestamp(1)).await.unwrap();
            for name in ["one", "two", "three"] {
                store
                    .create_room(
                        RoomDraft {
                            name,
                            description: "",
                            creator: alice.id,
                        },
                        Timestamp(2),
                    )
                    .await
                    .unwrap();
            }
        }
        let bus: DynBus = Arc::new(InProcBus::new(PARTITIONS));
        let stop = CancellationToken::new();
        let registry = prometheus::Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let config = RouterConfig {
            name: "test".into(),
            ..RouterConfig::default()
        };
        let task = tokio::spawn({
            let (bus, store, stop) = (bus.clone(), store.clone(), stop.clone());
            async move {
                chatoy_router::run(config, bus, store, metrics, stop)
                    .await
                    .unwrap()
            }
        });
        Router {
            bus,
            store,
            dir,
            stop,
            task,
            registry,
        }
    }

    async fn stop(self) -> std::path::PathBuf {
        self.stop.cancel();
        self.task.await.unwrap();
        self.dir
    }

    /// Submits messages one after the other (as one socket does) without waiting for answers,
    /// then waits for every answer.
    async fn send(&self, messages: &[(u64, u64, u128, &str)]) -> Vec<MsgReply> {
        let mut pending = Vec::new();
        for &(room, sender, uuid, text) in messages {
            pending.push(self.bus.submit(request(room, sender, uuid, text)).await.unwrap());
        }
        let mut replies = Vec::new();
        for reply in pending {
            replies.push(reply.await.unwrap());
        }
        replies
    }

    /// A series' value in the Prometheus text exposition (`name_count` for a histogram).
    fn metric(&self, series: &str) -> f64 {
        let mut text = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &self.registry.gather(),
            &mut text,
        )
        .unwrap();
        let text = String::from_utf8(text).unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    }
}

fn request(room: u64, sender: u64, uuid: u128, text: &str) -> MsgRequest {
    MsgRequest {
        uuid: uuid::Uuid::from_u128(uuid),
        sender,
        room,
        content: MessageContent::Text { text: text.into() },
        origin: Origin { gateway: 9, conn: 9 },
    }
}

fn codes(replies: &[MsgReply]) -> Vec<SendCode> {
    replies.iter().map(|reply| reply.code).collect()
}

async fn next_event(events: &mut Subscription<RoomEvent>) -> RoomEvent {
    match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
        Ok(Some(Delivery::Event(event))) => event,
        other => panic!("expected a room event, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn messages_are_sequenced_answered_and_published_in_order() {
    let router = Router::start().await;
    let mut room_1 = router.bus.subscribe_room(1).await.unwrap();
    let mut room_2 = router.bus.subscribe_room(2).await.unwrap();
    let replies = router
        .send(&[
            (1, 1, 1, "a"),
            (2, 1, 2, "b"),
            (1, 1, 3, "c"),
            (1, 2, 4, "not a member"),
            (1, 1, 5, "d"),
        ])
        .await;
    assert_eq!(
        codes(&replies),
        vec![
            SendCode::Ok,
            SendCode::Ok,
            SendCode::Ok,
            SendCode::NotMember,
            SendCode::Ok
        ]
    );
    let sents: Vec<Timestamp> = [0, 2, 4].iter().map(|&n| replies[n].sent).collect();
    assert!(sents.windows(2).all(|pair| pair[0] < pair[1]), "{sents:?}");
    // Each event names the one before it in its room; the first names 0.
    let mut prev = Timestamp(0);
    for sent in sents {
        let event = next_event(&mut room_1).await;
        assert_eq!((event.sent, event.prev), (sent, Some(prev)));
        prev = sent;
    }
    let event = next_event(&mut room_2).await;
    assert_eq!((event.sent, event.prev), (replies[1].sent, Some(Timestamp(0))));
    assert!(
        room_1.try_next().is_none(),
        "published once, and not the refused one"
    );
    let stored = router.store.history(1, Timestamp(i64::MAX), 10).await.unwrap();
    assert_eq!(stored.len(), 3);
    router.stop().await;
}

#[tokio::test(start_paused = true)]
async fn pending_messages_are_taken_as_one_batch() {
    let router = Router::start().await;
    // Warm up: the partition is claimed and the room opened.
    router.send(&[(1, 1, 1, "a")]).await;
    let batches = router.metric("chatoy_router_batch_messages_count");
    // Queued while the worker is not scheduled (paused time, current-thread runtime): it finds
    // all of them at once.
    let messages: Vec<(u64, u64, u128, &str)> = (10..50).map(|n| (1, 1, n, "m")).collect();
    let replies = router.send(&messages).await;
    assert!(codes(&replies).iter().all(|code| *code == SendCode::Ok));
    assert_eq!(router.metric("chatoy_router_batch_messages_count"), batches + 1.0);
    assert_eq!(
        router.metric("chatoy_router_messages_total{outcome=\"stored\"}"),
        41.0
    );
    router.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_retried_uuid_gets_its_original_sent_also_after_a_restart() {
    let router = Router::start().await;
    let first = router.send(&[(1, 1, 7, "hello")]).await[0].clone();
    assert_eq!(first.code, SendCode::Ok);
    let again = router.send(&[(1, 1, 7, "hello"), (1, 1, 7, "changed")]).await;
    assert_eq!(again[0], MsgReply { ..first.clone() });
    assert_eq!(again[1].code, SendCode::Invalid);
    // A new router remembers nothing: it finds the uuid in the store, answers with the original
    // `sent`, and publishes the message again without a `prev` (its first writer may have died
    // before publishing it).
    let dir = router.stop().await;
    let router = Router::start_in(dir, false).await;
    let mut events = router.bus.subscribe_room(1).await.unwrap();
    let retry = router.send(&[(1, 1, 7, "hello")]).await;
    assert_eq!((retry[0].code, retry[0].sent), (SendCode::Ok, first.sent));
    let event = next_event(&mut events).await;
    assert_eq!((event.sent, event.prev), (first.sent, None));
    assert_eq!(
        router
            .store
            .history(1, Timestamp(i64::MAX), 10)
            .await
            .unwrap()
            .len(),
        1
    );
    router.stop().await;
}

#[tokio::test]
async fn a_failed_write_answers_code_5_for_the_whole_batch_and_resends_are_stored_once() {
    let router = Router::start().await;
    router.send(&[(1, 1, 1, "a")]).await;
    // Another connection holds SQLite's write lock: the writer gives up after its 20 ms.
    let lock = rusqlite::Connection::open(router.dir.join("chatoy.db")).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let messages = [(1, 1, 2, "b"), (3, 1, 3, "c"), (1, 1, 1, "a")];
    let failed = router.send(&messages).await;
    assert_eq!(codes(&failed), vec![SendCode::Unavailable; 3]);
    lock.execute_batch("COMMIT").unwrap();
    let resent = router.send(&messages).await;
    assert_eq!(codes(&resent), vec![SendCode::Ok; 3]);
    let room_1 = router.store.history(1, Timestamp(i64::MAX), 10).await.unwrap();
    assert_eq!(room_1.len(), 2, "each message stored once: {room_1:?}");
    assert_eq!(
        router.metric("chatoy_router_events_total{event=\"store_error\"}"),
        1.0
    );
    router.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_deposed_worker_answers_code_5_then_claims_the_partition_again() {
    let router = Router::start().await;
    let first = router.send(&[(1, 1, 1, "a")]).await;
    assert_eq!(first[0].code, SendCode::Ok);
    let claims = router.metric("chatoy_router_events_total{event=\"claim\"}");
    // Another router claims partition 1 (rooms 1 and 3) and writes to room 3.
    let other = router.store.claim(1, "other").await.unwrap();
    let late = router.store.open_room(other, 3).await.unwrap();
    assert_eq!(late, None);
    let deposed = router.send(&[(1, 1, 2, "b")]).await;
    assert_eq!(deposed[0].code, SendCode::Unavailable);
    assert_eq!(
        router.metric("chatoy_router_events_total{event=\"deposed\"}"),
        1.0
    );
    // The resend is sequenced under a new claim, after everything stored.
    let resent = router.send(&[(1, 1, 2, "b")]).await;
    assert_eq!(resent[0].code, SendCode::Ok);
    assert!(resent[0].sent > first[0].sent);
    assert_eq!(
        router.metric("chatoy_router_events_total{event=\"claim\"}"),
        claims + 1.0
    );
    // Partition 0 (room 2) was never disturbed.
    assert_eq!(router.send(&[(2, 1, 3, "c")]).await[0].code, SendCode::Ok);
    router.stop().await;
}
