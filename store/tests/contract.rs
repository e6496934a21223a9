//! The store contract: one behaviour every backend must have, checked against each backend.
//! Each case gets a fresh store (a new SQLite data directory).

use std::sync::Arc;
use std::time::Duration;

use chatoy_protocol::{MessageContent, Timestamp, MAX_ID};
use chatoy_store::{DynStore, InsertOutcome, NewMessage, Session, SqliteConfig, SqliteStore, StoreError};

/// A fresh SQLite store in its own directory, removed when dropped.
struct Fresh {
    store: DynStore,
    dir: std::path::PathBuf,
}

impl Drop for Fresh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sqlite() -> Fresh {
    let dir = std::env::temp_dir().join(format!("chatoy-contract-{}", uuid::Uuid::new_v4()));
    let store = SqliteStore::open(&SqliteConfig {
        data_dir: dir.clone(),
        busy_timeout: Duration::from_secs(5),
    })
    .expect("open sqlite store");
    Fresh {
        store: Arc::new(store),
        dir,
    }
}

fn text(t: &str) -> MessageContent {
    MessageContent::Text { text: t.into() }
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
        .create_room("lobby", "", alice.id, Timestamp(10))
        .await
        .unwrap();
    let second = store
        .create_room("dev", "code talk", bob.id, Timestamp(20))
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

async fn idempotent_inserts(store: DynStore) {
    let first = message(1, 7, 100, "one");
    let mut again = first.clone();
    again.sent = Timestamp(200);
    let other = message(1, 7, 300, "two");
    let outcomes = store
        .insert_messages(vec![first.clone(), again.clone(), other.clone()])
        .await
        .unwrap();
    assert_eq!(outcomes[0], InsertOutcome::Inserted);
    let InsertOutcome::Duplicate(existing) = &outcomes[1] else {
        panic!("a uuid repeated in the batch is a duplicate: {outcomes:?}");
    };
    assert_eq!(existing.sent, Timestamp(100));
    assert_eq!(existing.uuid, first.uuid.hyphenated().to_string());
    assert_eq!(existing.data, text("one"));
    assert_eq!(outcomes[2], InsertOutcome::Inserted);
    // The same uuid in another room is another message.
    let mut elsewhere = first.clone();
    elsewhere.room = 2;
    assert_eq!(
        store.insert_messages(vec![elsewhere]).await.unwrap(),
        vec![InsertOutcome::Inserted]
    );
    assert_eq!(store.last_sent(1).await.unwrap(), Some(Timestamp(300)));
    assert_eq!(store.last_sent(3).await.unwrap(), None);
    assert_eq!(store.history(1, Timestamp(i64::MAX), 10).await.unwrap().len(), 2);
}

async fn concurrent_inserts_of_one_uuid(store: DynStore) {
    let base = message(5, 1, 1_000, "race");
    let tasks: Vec<_> = (0..8)
        .map(|n| {
            let store = store.clone();
            let mut attempt = base.clone();
            attempt.sent = Timestamp(1_000 + n);
            tokio::spawn(async move { store.insert_messages(vec![attempt]).await })
        })
        .collect();
    let mut inserted = 0;
    let mut sents = Vec::new();
    for task in tasks {
        match task.await.unwrap().unwrap().remove(0) {
            InsertOutcome::Inserted => inserted += 1,
            InsertOutcome::Duplicate(existing) => sents.push(existing.sent),
        }
    }
    assert_eq!(inserted, 1);
    let stored = store.history(5, Timestamp(i64::MAX), 10).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert!(sents.iter().all(|sent| *sent == stored[0].sent));
}

async fn history_and_since(store: DynStore) {
    let rows: Vec<NewMessage> = (1..=120)
        .map(|n| message(9, 1, n * 10, &format!("m{n}")))
        .collect();
    store.insert_messages(rows).await.unwrap();
    store
        .insert_messages(vec![message(8, 1, 55, "other room")])
        .await
        .unwrap();
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
    assert_eq!(store.since(8, Timestamp(0), 10).await.unwrap()[0].room, 8);
}

async fn durable_across_reopen() {
    let fresh = sqlite();
    let user = fresh.store.create_user("alice", "h", Timestamp(1)).await.unwrap();
    let room = fresh
        .store
        .create_room("r", "", user.id, Timestamp(2))
        .await
        .unwrap();
    fresh
        .store
        .insert_messages(vec![message(room.id, user.id, 3, "kept")])
        .await
        .unwrap();
    let reopened = SqliteStore::open(&SqliteConfig {
        data_dir: fresh.dir.clone(),
        busy_timeout: Duration::from_secs(5),
    })
    .unwrap();
    let history = chatoy_store::Store::history(&reopened, room.id, Timestamp(i64::MAX), 10)
        .await
        .unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].data, text("kept"));
}

macro_rules! contract {
    ($backend:ident: $($case:ident),+ $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let fresh = super::$backend();
                    super::$case(fresh.store.clone()).await;
                }
            )+
        }
    };
}

contract!(sqlite: users, sessions, rooms, idempotent_inserts, concurrent_inserts_of_one_uuid, history_and_since);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_is_durable_across_reopen() {
    durable_across_reopen().await;
}
