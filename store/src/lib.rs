//! Chatoy's storage: one narrow domain trait, [`Store`], and its backends.
//!
//! Only this crate knows SQL or CQL. Callers hold an `Arc<dyn Store>` and see the store's own
//! types ([`model`]); driver types never leak upward, and the wire's types never reach a column
//! (`wire.rs` converts at the edge).

pub mod cql;
mod model;
mod sqlite;
mod wire;

use std::sync::Arc;

use async_trait::async_trait;
use chatoy_protocol::Timestamp;

pub use cql::{CqlConfig, CqlConsistency, CqlStore};
pub use model::{Content, Room, StoredMessage, User};
pub use sqlite::{SqliteConfig, SqliteStore};

/// A shared handle to whichever backend the process runs on.
pub type DynStore = Arc<dyn Store>;

/// A cause kept inside a store error: the driver's error, or a sentence when there is none.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What can go wrong in the store, in terms callers act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique value is already taken (a username).
    #[error("already exists")]
    Conflict,
    /// The referenced row does not exist (a room).
    #[error("not found")]
    NotFound,
    /// The backend cannot answer now (busy, down, timed out); the caller may retry.
    /// Its cause is shown in the message (logs print the message alone) and kept as the source.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// A fenced write found its partition claimed by a newer writer: this writer is deposed and
    /// must not acknowledge anything of the write (see [`Store::submit`]).
    #[error("the partition was claimed by another writer")]
    Deposed,
}

impl StoreError {
    /// An [`StoreError::Unavailable`] caused by `cause` (a driver error, or a sentence).
    pub fn unavailable(cause: impl Into<BoxError>) -> StoreError {
        StoreError::Unavailable(cause.into())
    }
}

/// Why a store could not be opened, connected or migrated. Each message says what was being
/// done; the driver's error is the source (`{:#}` in the binary prints both).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The configuration is unusable (no contact points, a bad keyspace name, ...).
    #[error("{0}")]
    Config(String),
    /// The SQLite data directory could not be created.
    #[error("cannot create data dir {}", path.display())]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The SQLite database could not be opened or its schema applied.
    #[error("cannot open {}", path.display())]
    Sqlite {
        /// The database file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The SQLite readers' pool could not be started.
    #[error("cannot open readers on {}", path.display())]
    Readers {
        /// The database file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: r2d2::Error,
    },
    /// The SQLite writer thread could not be started.
    #[error("cannot start the writer thread")]
    WriterThread(#[source] std::io::Error),
    /// No CQL session could be opened (with the keyspace, for a store; without, to migrate).
    #[error("cannot connect to {nodes}{}", keyspace.as_ref().map(|k| format!(" with keyspace {k} (was it migrated?)")).unwrap_or_default())]
    Connect {
        /// The contact points, comma-separated.
        nodes: String,
        /// The keyspace the session was to use, if any.
        keyspace: Option<String>,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
    /// The store's CQL statements could not be prepared.
    #[error("cannot prepare the store's statements (was {keyspace} migrated?)")]
    Prepare {
        /// The keyspace.
        keyspace: String,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
    /// A statement of a schema file failed.
    #[error("schema file {file} failed")]
    Schema {
        /// The file's name.
        file: &'static str,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
    /// The record of applied schema files could not be read or written.
    #[error("cannot read or write the record of applied schema files (schema_migrations)")]
    Record(#[source] BoxError),
    /// The SQLite database records more schema files than this build knows: a newer Chatoy
    /// wrote it.
    #[error("{} has {applied} schema files applied but this build knows {known}: it was written by a newer Chatoy", path.display())]
    NewerSchema {
        /// The database file.
        path: std::path::PathBuf,
        /// How many files the database records.
        applied: i64,
        /// How many this build has.
        known: usize,
    },
    /// The keyspace could not be used after it was created.
    #[error("cannot use keyspace {keyspace}")]
    UseKeyspace {
        /// The keyspace.
        keyspace: String,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
}

/// Shorthand for store results.
pub type StoreResult<T> = Result<T, StoreError>;

/// A user row with its password hash, for login only.
#[derive(Debug, Clone)]
pub struct UserWithHash {
    /// The public part.
    pub user: User,
    /// The argon2id PHC string.
    pub password_hash: String,
}

/// A room to create: its name, its description and its creator, who joins it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomDraft<'a> {
    /// The room's name.
    pub name: &'a str,
    /// Free text.
    pub description: &'a str,
    /// Who creates it (and is its first member).
    pub creator: u64,
}

/// A live session, found by the hash of its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Whose session it is.
    pub user_id: u64,
    /// When it stops being valid.
    pub expires: Timestamp,
}

/// A message the router has sequenced and wants stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// Its identity within the room.
    pub uuid: uuid::Uuid,
    /// The sender.
    pub sender: u64,
    /// The room.
    pub room: u64,
    /// The content.
    pub content: Content,
    /// The `sent` the router assigned, strictly greater than every earlier one in the room.
    pub sent: Timestamp,
}

/// A router's exclusive right to write the rooms of one partition, claimed in the store once per
/// takeover ([`Store::claim`]). A newer claim of the partition deposes every older fence: their
/// writes fail with [`StoreError::Deposed`] and never become visible out of order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The partition (see `chatoy_protocol::partition_of`).
    pub partition: u32,
    /// Strictly increasing per partition, one per claim.
    pub epoch: u64,
}

/// One room's share of a sequenced batch: its new messages in `sent` order, every `sent`
/// greater than everything already stored or submitted for the room.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomBatch {
    /// The room.
    pub room: u64,
    /// Its messages, oldest first.
    pub messages: Vec<NewMessage>,
}

/// The outcome of a submitted write, still to come: `Ok` once the whole batch is durable and
/// visible to readers, and the fence still held after the write.
pub type PendingWrite = futures_util::future::BoxFuture<'static, StoreResult<()>>;

/// Everything Chatoy keeps. Every method is safe to call concurrently.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Answers if the backend is reachable (readiness).
    async fn ping(&self) -> StoreResult<()>;

    /// Creates a user with a unique username; [`StoreError::Conflict`] if taken.
    async fn create_user(&self, username: &str, password_hash: &str, now: Timestamp) -> StoreResult<User>;
    /// Looks a user up by username, with the password hash.
    async fn user_by_name(&self, username: &str) -> StoreResult<Option<UserWithHash>>;
    /// Looks a user up by id.
    async fn user(&self, id: u64) -> StoreResult<Option<User>>;

    /// Records a session under the hash of its token.
    async fn create_session(&self, token_hash: &[u8; 32], session: Session) -> StoreResult<()>;
    /// Finds an unexpired session (`now` < expires) by token hash.
    async fn session(&self, token_hash: &[u8; 32], now: Timestamp) -> StoreResult<Option<Session>>;
    /// Deletes a session; returns whether it existed.
    async fn revoke_session(&self, token_hash: &[u8; 32]) -> StoreResult<bool>;

    /// Creates a room; the creator joins it.
    async fn create_room(&self, draft: RoomDraft<'_>, now: Timestamp) -> StoreResult<Room>;
    /// Looks a room up.
    async fn room(&self, id: u64) -> StoreResult<Option<Room>>;
    /// Adds a member (idempotent); [`StoreError::NotFound`] if the room does not exist.
    async fn join_room(&self, room: u64, user: u64, now: Timestamp) -> StoreResult<()>;
    /// Whether the user is a member of the room (false if the room does not exist).
    async fn is_member(&self, room: u64, user: u64) -> StoreResult<bool>;
    /// The rooms the user has joined, in join order.
    async fn user_rooms(&self, user: u64) -> StoreResult<Vec<Room>>;
    /// How many rooms the user has joined.
    async fn room_count(&self, user: u64) -> StoreResult<usize>;

    /// Claims `partition` for a new writer with one lightweight transaction (or transaction):
    /// the returned fence's epoch is greater than every earlier one, and writes under any older
    /// fence of the partition fail from now on. `owner` names the claimant in the store.
    async fn claim(&self, partition: u32, owner: &str) -> StoreResult<Fence>;
    /// Makes `room` ready to be written under `fence` and returns the newest `sent` of its
    /// sequence (`None` for a room without messages). A deposed writer's late writes to the room
    /// can never become visible after this returns: what readers may have seen is kept, the rest
    /// is fenced off. Call it before sequencing a room after every claim.
    async fn open_room(&self, fence: Fence, room: u64) -> StoreResult<Option<Timestamp>>;
    /// The stored messages of `room` whose uuid is among `uuids` (each at most once), in no
    /// particular order: the idempotency lookup for uuids the sequencer does not remember.
    async fn find_messages(&self, room: u64, uuids: &[uuid::Uuid]) -> StoreResult<Vec<StoredMessage>>;
    /// Queues a batch to be written under `fence`. Returns once queued — batches are written in
    /// the order of these calls, and a reader never sees a later batch of a room without an
    /// earlier one — with the wait for the outcome: `Ok` when the whole batch is durable and
    /// visible and the fence still held after the write (only then may it be acknowledged);
    /// [`StoreError::Deposed`] when a newer claim took the partition (nothing of it may be
    /// acknowledged; it may or may not become visible, in order); [`StoreError::Unavailable`]
    /// when the outcome is unknown. After any error the writer must claim again before writing:
    /// the new claim's [`Store::open_room`] settles what the failed batches left behind.
    async fn submit(&self, fence: Fence, batch: Vec<RoomBatch>) -> StoreResult<PendingWrite>;
    /// Up to `limit` messages of the room with `sent < before`, newest first.
    async fn history(&self, room: u64, before: Timestamp, limit: usize) -> StoreResult<Vec<StoredMessage>>;
    /// The newest `limit` messages of the room with `sent > after`, oldest first.
    async fn since(&self, room: u64, after: Timestamp, limit: usize) -> StoreResult<Vec<StoredMessage>>;
    /// Where a replay of the newest `limit` messages with `sent > after` starts: `after` itself
    /// when at most `limit` such messages are stored, else the `sent` of the newest one left
    /// out. Reads only `sent` values, so it costs little memory whatever the messages' size.
    async fn replay_start(&self, room: u64, after: Timestamp, limit: usize) -> StoreResult<Timestamp>;
    /// Up to `limit` messages of the room with `sent > after`, oldest first: a page of a replay.
    async fn page_after(&self, room: u64, after: Timestamp, limit: usize) -> StoreResult<Vec<StoredMessage>>;
}
