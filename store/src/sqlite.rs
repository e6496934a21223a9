//! The embedded backend: one SQLite database in WAL mode under the data directory.
//!
//! Writes go to one writer thread that groups whatever is pending into one transaction (group
//! commit: one fsync for many messages); each write runs in its own savepoint so one failure
//! does not undo its neighbours (`writer.rs`). Reads use a small pool of read-only connections
//! on tokio's blocking threads, or on the calling thread for a point query when a reader is free
//! (`readers.rs`). Nothing here blocks the async runtime for long. The SQL itself is in
//! `accounts.rs` (users, sessions, rooms, members) and `messages.rs` (fences, the batch write,
//! history and replays); this file opens the database and maps the [`Store`] trait onto them.

mod accounts;
mod messages;
mod readers;
mod writer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use chatoy_protocol::Timestamp;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::Connection;
use tokio::sync::mpsc;

use crate::{
    Fence, OpenError, PendingWrite, Room, RoomBatch, RoomDraft, Session, Store, StoreError, StoreResult,
    StoredMessage, User, UserWithHash,
};
use writer::{open_writer, writer_loop, WriteJob, MAX_GROUP};

/// The schema files, applied in this order, each once: the database's `user_version` counts the
/// files applied. Add a file at the end; never edit or reorder a released one. A database created
/// before the count was kept has `user_version` 0 and re-runs the first file once, which its
/// `IF NOT EXISTS` statements make harmless.
const SCHEMA: &[(&str, &str)] = &[("sqlite_schema.sql", include_str!("sqlite_schema.sql"))];

/// Where and how to open the database.
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// The directory that holds `chatoy.db`; created if missing.
    pub data_dir: PathBuf,
    /// How long a statement waits for a lock held by another process before failing.
    pub busy_timeout: Duration,
}

/// The SQLite [`Store`].
pub struct SqliteStore {
    readers: r2d2::Pool<SqliteConnectionManager>,
    writer: mpsc::Sender<Box<dyn WriteJob>>,
}

impl SqliteStore {
    /// Opens (creating if needed) `chatoy.db` in the data directory and starts the writer thread.
    pub fn open(config: &SqliteConfig) -> Result<SqliteStore, OpenError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| OpenError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let path = config.data_dir.join("chatoy.db");
        let mut writer_conn =
            open_writer(&path, config.busy_timeout).map_err(|source| OpenError::Sqlite {
                path: path.clone(),
                source,
            })?;
        migrate(&mut writer_conn, &path)?;
        let busy_ms = config.busy_timeout.as_millis() as u64;
        let manager = SqliteConnectionManager::file(&path).with_init(move |conn| {
            conn.busy_timeout(Duration::from_millis(busy_ms))?;
            conn.execute_batch("PRAGMA query_only = ON;")
        });
        let readers = r2d2::Pool::builder()
            .max_size(8)
            .min_idle(Some(1))
            .build(manager)
            .map_err(|source| OpenError::Readers {
                path: path.clone(),
                source,
            })?;
        let (tx, rx) = mpsc::channel(4 * MAX_GROUP);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(writer_conn, rx))
            .map_err(OpenError::WriterThread)?;
        Ok(SqliteStore { readers, writer: tx })
    }
}

/// Applies the files of [`SCHEMA`] the database has not recorded, each in a transaction with
/// its record.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), OpenError> {
    let sqlite = |source| OpenError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let applied: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(sqlite)?;
    if applied < 0 || applied as usize > SCHEMA.len() {
        return Err(OpenError::NewerSchema {
            path: path.to_owned(),
            applied,
            known: SCHEMA.len(),
        });
    }
    for (index, (_, text)) in SCHEMA.iter().enumerate().skip(applied as usize) {
        let tx = conn.transaction().map_err(sqlite)?;
        tx.execute_batch(text).map_err(sqlite)?;
        tx.pragma_update(None, "user_version", (index + 1) as i64)
            .map_err(sqlite)?;
        tx.commit().map_err(sqlite)?;
    }
    Ok(())
}

fn unavailable(err: rusqlite::Error) -> StoreError {
    StoreError::unavailable(err)
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(()))).await
    }

    async fn create_user(&self, username: &str, password_hash: &str, now: Timestamp) -> StoreResult<User> {
        accounts::create_user(self, username, password_hash, now).await
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<UserWithHash>> {
        accounts::user_by_name(self, username).await
    }

    async fn user(&self, id: u64) -> StoreResult<Option<User>> {
        accounts::user(self, id).await
    }

    async fn create_session(&self, token_hash: &[u8; 32], session: Session) -> StoreResult<()> {
        accounts::create_session(self, token_hash, session).await
    }

    async fn session(&self, token_hash: &[u8; 32], now: Timestamp) -> StoreResult<Option<Session>> {
        accounts::session(self, token_hash, now).await
    }

    async fn revoke_session(&self, token_hash: &[u8; 32]) -> StoreResult<bool> {
        accounts::revoke_session(self, token_hash).await
    }

    async fn create_room(&self, draft: RoomDraft<'_>, now: Timestamp) -> StoreResult<Room> {
        accounts::create_room(self, draft, now).await
    }

    async fn room(&self, id: u64) -> StoreResult<Option<Room>> {
        accounts::room(self, id).await
    }

    async fn join_room(&self, room: u64, user: u64, now: Timestamp) -> StoreResult<()> {
        accounts::join_room(self, room, user, now).await
    }

    async fn is_member(&self, room: u64, user: u64) -> StoreResult<bool> {
        accounts::is_member(self, room, user).await
    }

    async fn user_rooms(&self, user: u64) -> StoreResult<Vec<Room>> {
        accounts::user_rooms(self, user).await
    }

    async fn room_count(&self, user: u64) -> StoreResult<usize> {
        accounts::room_count(self, user).await
    }

    async fn claim(&self, partition: u32, owner: &str) -> StoreResult<Fence> {
        messages::claim(self, partition, owner).await
    }

    async fn open_room(&self, fence: Fence, room: u64) -> StoreResult<Option<Timestamp>> {
        messages::open_room(self, fence, room).await
    }

    async fn find_messages(&self, room: u64, uuids: &[uuid::Uuid]) -> StoreResult<Vec<StoredMessage>> {
        messages::find_messages(self, room, uuids).await
    }

    async fn submit(&self, fence: Fence, batch: Vec<RoomBatch>) -> StoreResult<PendingWrite> {
        messages::submit(self, fence, batch).await
    }

    async fn history(&self, room: u64, before: Timestamp, limit: usize) -> StoreResult<Vec<StoredMessage>> {
        messages::history(self, room, before, limit).await
    }

    async fn since(&self, room: u64, after: Timestamp, limit: usize) -> StoreResult<Vec<StoredMessage>> {
        messages::since(self, room, after, limit).await
    }

    async fn replay_start(&self, room: u64, after: Timestamp, limit: usize) -> StoreResult<Timestamp> {
        messages::replay_start(self, room, after, limit).await
    }

    async fn page_after(&self, room: u64, after: Timestamp, limit: usize) -> StoreResult<Vec<StoredMessage>> {
        messages::page_after(self, room, after, limit).await
    }
}
