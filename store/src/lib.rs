//! Chatoy's storage: one narrow domain trait, [`Store`], and its backends.
//!
//! Only this crate knows SQL or CQL. Callers hold an `Arc<dyn Store>` and see domain types from
//! `chatoy-protocol`; driver types never leak upward.

pub mod cql;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chatoy_protocol::http::{Room, User};
use chatoy_protocol::{Message, MessageContent, Timestamp};

pub use cql::{CqlConfig, CqlConsistency, CqlStore};
pub use sqlite::{SqliteConfig, SqliteStore};

/// A shared handle to whichever backend the process runs on.
pub type DynStore = Arc<dyn Store>;

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
    #[error("store unavailable: {0}")]
    Unavailable(String),
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
    pub content: MessageContent,
    /// The `sent` the router assigned, strictly greater than every earlier one in the room.
    pub sent: Timestamp,
}

/// What happened to one [`NewMessage`] of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum InsertOutcome {
    /// Stored now.
    Inserted,
    /// A message with the same uuid already exists in that room; nothing was written. The
    /// caller compares sender and content to decide between an idempotent success and a refusal.
    Duplicate(Message),
}

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
    async fn create_room(
        &self,
        name: &str,
        description: &str,
        creator: u64,
        now: Timestamp,
    ) -> StoreResult<Room>;
    /// Looks a room up.
    async fn room(&self, id: u64) -> StoreResult<Option<Room>>;
    /// Adds a member (idempotent); [`StoreError::NotFound`] if the room does not exist.
    async fn join_room(&self, room: u64, user: u64, now: Timestamp) -> StoreResult<()>;
    /// Whether the user is a member of the room (false if the room does not exist).
    async fn is_member(&self, room: u64, user: u64) -> StoreResult<bool>;
    /// The rooms the user has joined, in join order.
    async fn user_rooms(&self, user: u64) -> StoreResult<Vec<Room>>;

    /// Stores a batch atomically per message, de-duplicating by (room, uuid); one outcome per
    /// input, in order. A uuid repeated within the batch is a duplicate of its first occurrence.
    async fn insert_messages(&self, batch: Vec<NewMessage>) -> StoreResult<Vec<InsertOutcome>>;
    /// The greatest `sent` stored in the room, if any.
    async fn last_sent(&self, room: u64) -> StoreResult<Option<Timestamp>>;
    /// Up to `limit` messages of the room with `sent < before`, newest first.
    async fn history(&self, room: u64, before: Timestamp, limit: usize) -> StoreResult<Vec<Message>>;
    /// The newest `limit` messages of the room with `sent > after`, oldest first.
    async fn since(&self, room: u64, after: Timestamp, limit: usize) -> StoreResult<Vec<Message>>;
}
