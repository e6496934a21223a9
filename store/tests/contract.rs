//! The store contract: one behaviour every backend must have, checked against each backend.
//! Each case gets a fresh store: a new SQLite data directory, or a new CQL keyspace on the node
//! named by `CHATOY_CQL_NODES` (dropped when the case ends).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chatoy_protocol::{Timestamp, MAX_ID};
use chatoy_store::cql::migrate;
use chatoy_store::{
    Content, CqlConfig, CqlStore, DynStore, Fence, NewMessage, OpenError, RoomBatch, RoomDraft, Session,
    SqliteConfig, SqliteStore, StoreError, StoreResult, StoredMessage,
};
use futures_util::FutureExt;
use scylla::client::session::Session as CqlSession;
use scylla::client::session_builder::SessionBuilder;

/// The CQL bucket width of the tests: 100 ns, so that the shared cases (sent 10 ..= 1200) span
/// many buckets and every page of history crosses bucket boundaries.
const TEST_BUCKET_WIDTH: i64 = 100;

/// A fresh store, cleaned up by [`Fresh::cleanup`] (or, for SQLite, when dropped).
struct Fresh {
    store: DynStore,
    dir: Option<std::path::PathBuf>,
    cql: Option<Arc<FreshCql>>,
}

/// What a CQL case needs beyond the store: its configuration and an admin session.
struct FreshCql {
    config: CqlConfig,
    admin: CqlSession,
}

impl Fresh {
    /// The CQL side of a CQL store.
    fn cql(&self) -> Arc<FreshCql> {
        self.cql.clone().expect("a CQL store")
    }

    async fn cleanup(mut self) {
        if let Some(cql) = self.cql.take() {
            let drop = format!("DROP KEYSPACE IF EXISTS {}", cql.config.keyspace);
            if let Err(err) = cql.admin.query_unpaged(drop, ()).await {
                eprintln!("cannot drop keyspace {}: {err}", cql.config.keyspace);
            }
        }
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The room `name` with `description`, created by `creator`.
fn draft<'a>(name: &'a str, description: &'a str, creator: u64) -> RoomDraft<'a> {
    RoomDraft {
        name,
        description,
        creator,
    }
}

fn sqlite_config(dir: &std::path::Path) -> SqliteConfig {
    SqliteConfig {
        data_dir: dir.to_path_buf(),
        busy_timeout: Duration::from_secs(5),
    }
}

async fn sqlite() -> Fresh {
    let dir = std::env::temp_dir().join(format!("chatoy-contract-{}", uuid::Uuid::new_v4()));
    let store = SqliteStore::open(&sqlite_config(&dir)).expect("open sqlite store");
    Fresh {
        store: Arc::new(store),
        dir: Some(dir),
        cql: None,
    }
}

/// The contact points of the test's CQL node. Without them the CQL cases fail: they never skip.
fn cql_nodes() -> Vec<String> {
    let nodes = std::env::var("CHATOY_CQL_NODES").unwrap_or_default();
    let nodes: Vec<String> = nodes
        .split(',')
        .map(str::trim)
        .filter(|node| !node.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(
        !nodes.is_empty(),
        "CHATOY_CQL_NODES is not set: the CQL contract cases need a CQL node. Run ./scripts/test, \
         or start one with `deploy/local/cassandra start` and export CHATOY_CQL_NODES=127.0.0.1:<CQL_PORT>"
    );
    nodes
}

/// A fresh keyspace `chatoy_test_<random>` (RF 1, tiny buckets), migrated, and a store on it.
async fn cql() -> Fresh {
    let config = CqlConfig {
        nodes: cql_nodes(),
        keyspace: format!("chatoy_test_{}", uuid::Uuid::new_v4().simple()),
        replication_factor: 1,
        bucket_width_nanos: TEST_BUCKET_WIDTH,
        ..CqlConfig::default()
    };
    let admin = SessionBuilder::new()
        .known_nodes(&config.nodes)
        .schema_agreement_interval(Duration::from_millis(20))
        .refresh_metadata_on_auto_schema_agreement(false)
        .build()
        .await
        .unwrap_or_else(|err| panic!("cannot connect to CQL node {:?}: {err}", config.nodes));
    migrate(&config).await.expect("migrate a fresh keyspace");
    let store = CqlStore::connect(&config)
        .await
        .expect("connect to the fresh keyspace");
    Fresh {
        store: Arc::new(store),
        dir: None,
        cql: Some(Arc::new(FreshCql { config, admin })),
    }
}

/// Runs one case on its fresh store and cleans up after it, whether it passed or panicked.
async fn guarded(fresh: Fresh, case: impl Future<Output = ()>) {
    let outcome = AssertUnwindSafe(case).catch_unwind().await;
    fresh.cleanup().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn text(t: &str) -> Content {
    Content::Text(t.into())
}

fn message(room: u64, sender: u64, sent: i64, body: &str) -> NewMessage {
    NewMessage {
        uuid: uuid::Uuid::new_v4(),
        sender,
        room,
        content: text(body),
        sent: Timestamp(sent),
    }
}

async fn users(store: DynStore) {
    let now = Timestamp(1_000);
    let alice = store.create_user("alice", "hash-a", now).await.unwrap();
    assert!(alice.id >= 1 && alice.id <= MAX_ID);
    assert_eq!(alice.username, "alice");
    assert_eq!(alice.nickname, "alice");
    assert_eq!(alice.registered, now);
    let bob = store.create_user("bob", "hash-b", now).await.unwrap();
    assert_ne!(alice.id, bob.id);
    assert!(matches!(
        store.create_user("alice", "other", now).await,
        Err(StoreError::Conflict)
    ));
    assert!(matches!(
        store.create_user("ALICE", "other", now).await,
        Err(StoreError::Conflict)
    ));
    let found = store.user_by_name("alice").await.unwrap().unwrap();
    assert_eq!(found.user, alice);
    assert_eq!(found.password_hash, "hash-a");
    assert!(store.user_by_name("carol").await.unwrap().is_none());
    assert_eq!(store.user(bob.id).await.unwrap(), Some(bob));
    assert_eq!(store.user(MAX_ID).await.unwrap(), None);
}

async fn sessions(store: DynStore) {
    let user = store.create_user("alice", "h", Timestamp(1)).await.unwrap();
    let live = [1u8; 32];
    let expired = [2u8; 32];
    let session = Session {
        user_id: user.id,
        expires: Timestamp(10_000),
    };
    store.create_session(&live, session).await.unwrap();
    store
        .create_session(
            &expired,
            Session {
                expires: Timestamp(500),
                ..session
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store.session(&live, Timestamp(1_000)).await.unwrap(),
        Some(session)
    );
    assert_eq!(store.session(&expired, Timestamp(1_000)).await.unwrap(), None);
    assert_eq!(store.session(&[3u8; 32], Timestamp(1_000)).await.unwrap(), None);
    assert!(store.revoke_session(&live).await.unwrap());
    assert!(!store.revoke_session(&live).await.unwrap());
    assert_eq!(store.session(&live, Timestamp(1_000)).await.unwrap(), None);
}

async fn rooms(store: DynStore) {
    let alice = store.create_user("alice", "h", Timestamp(1)).await.unwrap();
    let bob = store.create_user("bob", "h", Timestamp(1)).await.unwrap();
    let first = store
        .create_room(draft("lobby", "", alice.id), Timestamp(10))
        .await
        .unwrap();
    let second = store
        .create_room(draft("dev", "code talk", bob.id), Timestamp(20))
        .await
        .unwrap();
    assert!(first.id >= 1 && first.id <= MAX_ID && first.id != second.id);
    assert_eq!(store.room(second.id).await.unwrap(), Some(second.clone()));
    assert_eq!(store.room(MAX_ID).await.unwrap(), None);
    assert!(store.is_member(first.id, alice.id).await.unwrap());
    assert!(!store.is_member(first.id, bob.id).await.unwrap());
    assert!(!store.is_member(MAX_ID, bob.id).await.unwrap());
    store.join_room(first.id, bob.id, Timestamp(30)).await.unwrap();
    store.join_room(first.id, bob.id, Timestamp(40)).await.unwrap();
    assert!(store.is_member(first.id, bob.id).await.unwrap());
    assert!(matches!(
        store.join_room(MAX_ID, bob.id, Timestamp(50)).await,
        Err(StoreError::NotFound)
    ));
    let bobs: Vec<u64> = store
        .user_rooms(bob.id)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(bobs, vec![second.id, first.id], "join order");
    assert_eq!(store.user_rooms(alice.id).await.unwrap(), vec![first]);
}

/// Writes `rows` under `fence` the way a router does: opens each room, then submits one batch
/// with the rooms in order of first appearance.
async fn write_under(store: &DynStore, fence: Fence, rows: Vec<NewMessage>) -> StoreResult<()> {
    let mut batch: Vec<RoomBatch> = Vec::new();
    for row in rows {
        match batch.iter_mut().find(|room| room.room == row.room) {
            Some(room) => room.messages.push(row),
            None => batch.push(RoomBatch {
                room: row.room,
                messages: vec![row],
            }),
        }
    }
    for room in &batch {
        store.open_room(fence, room.room).await?;
    }
    store.submit(fence, batch).await?.await
}

/// Stores `rows` as a newly started router would: a fresh claim of partition 0, then one batch.
async fn store_messages(store: &DynStore, rows: Vec<NewMessage>) {
    let fence = store.claim(0, "contract").await.expect("claim");
    write_under(store, fence, rows).await.expect("write");
}

fn sents(messages: &[StoredMessage]) -> Vec<i64> {
    messages.iter().map(|m| m.sent.0).collect()
}

/// Claims raise the epoch per partition; a room's head and its stored uuids are found again.
async fn fenced_writes(store: DynStore) {
    let first = store.claim(3, "a").await.unwrap();
    let second = store.claim(3, "b").await.unwrap();
    let other = store.claim(4, "b").await.unwrap();
    assert_eq!((first.partition, second.partition, other.partition), (3, 3, 4));
    assert!(second.epoch > first.epoch);
    assert_eq!(
        store.open_room(second, 1).await.unwrap(),
        None,
        "a room without messages"
    );
    let one = message(1, 7, 100, "one");
    let two = message(1, 7, 300, "two");
    let mut elsewhere = one.clone();
    elsewhere.room = 2;
    elsewhere.sent = Timestamp(150);
    write_under(&store, second, vec![one.clone(), two.clone(), elsewhere.clone()])
        .await
        .unwrap();
    assert_eq!(store.open_room(second, 1).await.unwrap(), Some(Timestamp(300)));
    assert_eq!(store.open_room(second, 2).await.unwrap(), Some(Timestamp(150)));
    let mut found = store
        .find_messages(1, &[two.uuid, uuid::Uuid::new_v4(), one.uuid, one.uuid])
        .await
        .unwrap();
    found.sort_by_key(|m| m.sent);
    assert_eq!(sents(&found), vec![100, 300]);
    assert_eq!(found[0].uuid, one.uuid);
    assert_eq!((found[0].sender, &found[0].content), (7, &text("one")));
    // The same uuid in another room is another message.
    assert_eq!(
        sents(&store.find_messages(2, &[one.uuid]).await.unwrap()),
        vec![150]
    );
    assert!(store.find_messages(3, &[one.uuid]).await.unwrap().is_empty());
    // A newer claim of the partition deposes the older one; others are untouched.
    let third = store.claim(3, "c").await.unwrap();
    assert!(third.epoch > second.epoch);
    let late = write_under(&store, second, vec![message(1, 7, 400, "late")]).await;
    assert!(matches!(late, Err(StoreError::Deposed)), "{late:?}");
    assert_eq!(store.open_room(third, 1).await.unwrap(), Some(Timestamp(300)));
    write_under(&store, other, vec![message(5, 7, 10, "p4")])
        .await
        .unwrap();
}

/// A deposed writer's late batch is never acknowledged and never becomes visible among the new
/// owner's messages, whether it lands before or after the new owner opens the room.
async fn deposed_writer_late_batch(store: DynStore) {
    let base = Timestamp::now().0;
    let at = |offset: i64| base + offset;
    let old = store.claim(6, "old").await.unwrap();
    store.open_room(old, 6).await.unwrap();
    store.open_room(old, 16).await.unwrap();
    store
        .submit(
            old,
            vec![RoomBatch {
                room: 6,
                messages: vec![message(6, 1, at(10), "a")],
            }],
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // Room 6: the new owner opens the room, then the old owner's batch lands.
    let new = store.claim(6, "new").await.unwrap();
    assert_eq!(store.open_room(new, 6).await.unwrap(), Some(Timestamp(at(10))));
    let late = vec![message(6, 1, at(20), "late 1"), message(6, 1, at(30), "late 2")];
    let late_uuids: Vec<uuid::Uuid> = late.iter().map(|m| m.uuid).collect();
    let outcome = match store
        .submit(
            old,
            vec![RoomBatch {
                room: 6,
                messages: late,
            }],
        )
        .await
    {
        Ok(pending) => pending.await,
        Err(err) => Err(err),
    };
    assert!(matches!(outcome, Err(StoreError::Deposed)), "{outcome:?}");
    write_under(
        &store,
        new,
        vec![message(6, 2, at(25), "c"), message(6, 2, at(40), "d")],
    )
    .await
    .unwrap();
    let history = store.history(6, Timestamp(i64::MAX), 10).await.unwrap();
    assert_eq!(
        sents(&history),
        vec![at(40), at(25), at(10)],
        "the late batch stays invisible"
    );
    assert_eq!(
        sents(&store.since(6, Timestamp(at(10)), 10).await.unwrap()),
        vec![at(25), at(40)]
    );
    assert!(store.find_messages(6, &late_uuids).await.unwrap().is_empty());
    // Room 16: the old owner's late batch lands before the new owner opens the room. It is not
    // acknowledged; if readers ever see it, they see it before everything the new owner writes.
    let late = vec![message(16, 1, at(50), "late 3")];
    let late_uuid = late[0].uuid;
    let outcome = match store
        .submit(
            old,
            vec![RoomBatch {
                room: 16,
                messages: late,
            }],
        )
        .await
    {
        Ok(pending) => pending.await,
        Err(err) => Err(err),
    };
    assert!(matches!(outcome, Err(StoreError::Deposed)), "{outcome:?}");
    let head = store.open_room(new, 16).await.unwrap();
    write_under(&store, new, vec![message(16, 2, at(60), "e")])
        .await
        .unwrap();
    let history = store.history(16, Timestamp(i64::MAX), 10).await.unwrap();
    let kept = store.find_messages(16, &[late_uuid]).await.unwrap();
    match head {
        None => {
            assert_eq!(sents(&history), vec![at(60)]);
            assert!(kept.is_empty());
        }
        Some(head) => {
            assert_eq!(head, Timestamp(at(50)));
            assert_eq!(sents(&history), vec![at(60), at(50)]);
            assert_eq!(sents(&kept), vec![at(50)]);
        }
    }
}

/// Batches submitted one after the other without waiting are all written, in order.
async fn pipelined_batches(store: DynStore) {
    let fence = store.claim(2, "pipeline").await.unwrap();
    store.open_room(fence, 2).await.unwrap();
    let mut pending = Vec::new();
    for n in 1..=20 {
        let batch = vec![RoomBatch {
            room: 2,
            messages: vec![message(2, 1, n * 10, "a"), message(2, 1, n * 10 + 5, "b")],
        }];
        pending.push(store.submit(fence, batch).await.unwrap());
    }
    for write in pending {
        write.await.unwrap();
    }
    let all = store.since(2, Timestamp(0), 100).await.unwrap();
    let expected: Vec<i64> = (1..=20).flat_map(|n| [n * 10, n * 10 + 5]).collect();
    assert_eq!(sents(&all), expected);
}

async fn history_and_since(store: DynStore) {
    let rows: Vec<NewMessage> = (1..=120)
        .map(|n| message(9, 1, n * 10, &format!("m{n}")))
        .collect();
    store_messages(&store, rows).await;
    store_messages(&store, vec![message(8, 1, 55, "other room")]).await;
    // Page backwards through everything, 50 at a time.
    let mut seen = Vec::new();
    let mut before = Timestamp(i64::MAX);
    loop {
        let page = store.history(9, before, 50).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.windows(2).all(|w| w[0].sent > w[1].sent), "newest first");
        before = page.last().unwrap().sent;
        seen.extend(page.into_iter().map(|m| m.sent.0));
    }
    assert_eq!(seen, (1..=120).rev().map(|n| n * 10).collect::<Vec<_>>());
    // `before` is exclusive.
    let page = store.history(9, Timestamp(100), 3).await.unwrap();
    assert_eq!(
        page.iter().map(|m| m.sent.0).collect::<Vec<_>>(),
        vec![90, 80, 70]
    );
    // `since` is exclusive, oldest first, and keeps the newest `limit`.
    let after = store.since(9, Timestamp(1_150), 100).await.unwrap();
    assert_eq!(
        after.iter().map(|m| m.sent.0).collect::<Vec<_>>(),
        vec![1_160, 1_170, 1_180, 1_190, 1_200]
    );
    let newest = store.since(9, Timestamp(0), 3).await.unwrap();
    assert_eq!(
        newest.iter().map(|m| m.sent.0).collect::<Vec<_>>(),
        vec![1_180, 1_190, 1_200]
    );
    assert!(store.since(9, Timestamp(1_200), 10).await.unwrap().is_empty());
    // A replay's start keeps at most `limit` newer messages; pages go oldest first.
    assert_eq!(
        store.replay_start(9, Timestamp(1_150), 100).await.unwrap(),
        Timestamp(1_150)
    );
    assert_eq!(
        store.replay_start(9, Timestamp(0), 3).await.unwrap(),
        Timestamp(1_170)
    );
    assert_eq!(
        store.replay_start(9, Timestamp(1_175), 3).await.unwrap(),
        Timestamp(1_175)
    );
    assert_eq!(
        store.replay_start(9, Timestamp(1_175), 2).await.unwrap(),
        Timestamp(1_180)
    );
    assert_eq!(
        store.replay_start(9, Timestamp(1_175), 1).await.unwrap(),
        Timestamp(1_190)
    );
    assert_eq!(
        store.replay_start(7, Timestamp(0), 5).await.unwrap(),
        Timestamp(0)
    );
    let page = store.page_after(9, Timestamp(1_170), 2).await.unwrap();
    assert_eq!(sents(&page), vec![1_180, 1_190]);
    let page = store.page_after(9, Timestamp(1_190), 5).await.unwrap();
    assert_eq!(sents(&page), vec![1_200]);
    let mut walked = Vec::new();
    let mut cursor = Timestamp(0);
    loop {
        let page = store.page_after(9, cursor, 7).await.unwrap();
        let Some(last) = page.last() else { break };
        cursor = last.sent;
        walked.extend(sents(&page));
    }
    assert_eq!(
        walked,
        (1..=120).map(|n| n * 10).collect::<Vec<_>>(),
        "pages across buckets"
    );
    assert!(store.page_after(9, Timestamp(1_200), 5).await.unwrap().is_empty());
    assert_eq!(store.since(8, Timestamp(0), 10).await.unwrap()[0].room, 8);
}

async fn durable_across_reopen() {
    let fresh = sqlite().await;
    let user = fresh.store.create_user("alice", "h", Timestamp(1)).await.unwrap();
    let room = fresh
        .store
        .create_room(draft("r", "", user.id), Timestamp(2))
        .await
        .unwrap();
    store_messages(&fresh.store, vec![message(room.id, user.id, 3, "kept")]).await;
    let dir = fresh.dir.as_deref().unwrap();
    let db = rusqlite::Connection::open(dir.join("chatoy.db")).unwrap();
    let user_version = |db: &rusqlite::Connection| -> i64 {
        db.pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap()
    };
    assert_eq!(user_version(&db), 1, "the schema file applied is recorded");
    // A database written by a newer Chatoy is refused, not half-read.
    db.pragma_update(None, "user_version", 99).unwrap();
    match SqliteStore::open(&sqlite_config(dir)) {
        Err(OpenError::NewerSchema { applied: 99, .. }) => {}
        Err(other) => panic!("a newer database refused for the wrong reason: {other}"),
        Ok(_) => panic!("a database with more schema files than this build knows was opened"),
    }
    // A database created before the record (no user_version) re-runs its schema once.
    db.pragma_update(None, "user_version", 0).unwrap();
    let reopened = SqliteStore::open(&sqlite_config(dir)).unwrap();
    assert_eq!(user_version(&db), 1, "the upgrade is recorded");
    let history = chatoy_store::Store::history(&reopened, room.id, Timestamp(i64::MAX), 10)
        .await
        .unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].content, text("kept"));
}

/// The CQL equivalent of reopening: a second store on the same keyspace (another process) sees
/// the data, running `migrate` again is harmless, and the two never hand out the same id.
async fn cql_durable_across_reconnect(fresh: Arc<FreshCql>, store: DynStore) {
    let user = store.create_user("alice", "h", Timestamp(1)).await.unwrap();
    let room = store
        .create_room(draft("r", "", user.id), Timestamp(2))
        .await
        .unwrap();
    store_messages(&store, vec![message(room.id, user.id, 3, "kept")]).await;
    let keyspace = &fresh.config.keyspace;
    let recorded = || async {
        fresh
            .admin
            .query_unpaged(format!("SELECT file FROM {keyspace}.schema_migrations"), ())
            .await
            .unwrap()
            .into_rows_result()
            .unwrap()
            .rows::<(String,)>()
            .unwrap()
            .map(|row| row.unwrap().0)
            .collect::<Vec<_>>()
    };
    let files = recorded().await;
    assert!(
        files.len() >= 8 && files.iter().any(|file| file == "001_keyspace.cql"),
        "{files:?}"
    );
    migrate(&fresh.config).await.expect("migrate twice");
    assert_eq!(
        recorded().await.len(),
        files.len(),
        "a second migrate applies nothing new"
    );
    // A keyspace migrated before files were recorded has no record: migrate seeds it.
    fresh
        .admin
        .query_unpaged(format!("DROP TABLE {keyspace}.schema_migrations"), ())
        .await
        .unwrap();
    migrate(&fresh.config)
        .await
        .expect("migrate a keyspace without a record");
    assert_eq!(recorded().await.len(), files.len(), "the record is seeded");
    let other: DynStore = Arc::new(CqlStore::connect(&fresh.config).await.unwrap());
    let history = other.history(room.id, Timestamp(i64::MAX), 10).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].content, text("kept"));
    assert_eq!(other.user_by_name("ALICE").await.unwrap().unwrap().user, user);
    assert!(other.is_member(room.id, user.id).await.unwrap());
    // Both "processes" create users and rooms at once; every id is distinct.
    let creations: Vec<_> = (0..60)
        .map(|n| {
            let store = if n % 2 == 0 { store.clone() } else { other.clone() };
            tokio::spawn(async move {
                let user = store
                    .create_user(&format!("user{n}"), "h", Timestamp(n))
                    .await
                    .unwrap();
                let room = store
                    .create_room(draft("r", "", user.id), Timestamp(n))
                    .await
                    .unwrap();
                (user.id, room.id)
            })
        })
        .collect();
    let mut user_ids = vec![user.id];
    let mut room_ids = vec![room.id];
    for creation in creations {
        let (user, room) = creation.await.unwrap();
        user_ids.push(user);
        room_ids.push(room);
    }
    for ids in [&mut user_ids, &mut room_ids] {
        assert!(ids.iter().all(|id| (1..=MAX_ID).contains(id)));
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 61, "ids are unique across stores");
    }
}

/// Paging at and across bucket edges (width 100 ns), over empty buckets and a long gap.
async fn cql_pages_across_buckets(store: DynStore) {
    let sents = [0, 99, 100, 101, 199, 350, 999, 1_000, 5_000_000, 5_000_001];
    let rows: Vec<NewMessage> = sents
        .iter()
        .map(|sent| message(4, 1, *sent, &format!("at {sent}")))
        .collect();
    store_messages(&store, rows).await;
    let newest_first: Vec<i64> = sents.iter().rev().copied().collect();
    for limit in 1..=sents.len() + 1 {
        let mut seen = Vec::new();
        let mut before = Timestamp(i64::MAX);
        loop {
            let page = store.history(4, before, limit).await.unwrap();
            assert!(page.len() <= limit);
            let Some(last) = page.last() else { break };
            before = last.sent;
            seen.extend(page.iter().map(|m| m.sent.0));
        }
        assert_eq!(seen, newest_first, "history in pages of {limit}");
    }
    let sents_of = |page: Vec<StoredMessage>| page.iter().map(|m| m.sent.0).collect::<Vec<_>>();
    // `before` on a bucket edge excludes the edge and continues in the previous bucket.
    assert_eq!(
        sents_of(store.history(4, Timestamp(100), 5).await.unwrap()),
        vec![99, 0]
    );
    assert_eq!(
        sents_of(store.history(4, Timestamp(1_000), 2).await.unwrap()),
        vec![999, 350]
    );
    assert_eq!(
        sents_of(store.history(4, Timestamp(0), 5).await.unwrap()),
        Vec::<i64>::new()
    );
    // `since` on a bucket edge, across the gap, and limited to the newest.
    assert_eq!(
        sents_of(store.since(4, Timestamp(99), 3).await.unwrap()),
        vec![1_000, 5_000_000, 5_000_001]
    );
    assert_eq!(
        sents_of(store.since(4, Timestamp(99), 100).await.unwrap()),
        vec![100, 101, 199, 350, 999, 1_000, 5_000_000, 5_000_001]
    );
    assert_eq!(
        sents_of(store.since(4, Timestamp(150), 100).await.unwrap()),
        vec![199, 350, 999, 1_000, 5_000_000, 5_000_001]
    );
    assert_eq!(sents_of(store.since(4, Timestamp(0), 100).await.unwrap())[0], 99);
    assert_eq!(
        sents_of(store.since(4, Timestamp(1_000), 1).await.unwrap()),
        vec![5_000_001]
    );
    assert_eq!(sents_of(store.since(4, Timestamp(-1), 1).await.unwrap()).len(), 1);
    // A room that never had a message, created or not.
    let user = store.create_user("alice", "h", Timestamp(1)).await.unwrap();
    let room = store
        .create_room(draft("empty", "", user.id), Timestamp(2))
        .await
        .unwrap();
    for room in [room.id, MAX_ID] {
        assert!(store
            .history(room, Timestamp(i64::MAX), 10)
            .await
            .unwrap()
            .is_empty());
        assert!(store.since(room, Timestamp(0), 10).await.unwrap().is_empty());
    }
}

macro_rules! contract {
    ($backend:ident: $($case:ident),+ $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let fresh = super::$backend().await;
                    let store = fresh.store.clone();
                    super::guarded(fresh, super::$case(store)).await;
                }
            )+
        }
    };
}

contract!(sqlite: users, sessions, rooms, fenced_writes, deposed_writer_late_batch, pipelined_batches, history_and_since);
contract!(cql: users, sessions, rooms, fenced_writes, deposed_writer_late_batch, pipelined_batches, history_and_since);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_is_durable_across_reopen() {
    durable_across_reopen().await;
}

/// The CQL-only cases, which also need the keyspace's configuration or raw CQL.
mod cql_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pages_across_buckets() {
        let fresh = cql().await;
        let store = fresh.store.clone();
        guarded(fresh, cql_pages_across_buckets(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durable_across_reconnect() {
        let fresh = cql().await;
        let (cql, store) = (fresh.cql(), fresh.store.clone());
        guarded(fresh, cql_durable_across_reconnect(cql, store)).await;
    }
}
