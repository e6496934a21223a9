//! The embedded backend: one SQLite database in WAL mode under the data directory.
//!
//! Writes go to one writer thread that groups whatever is pending into one transaction (group
//! commit: one fsync for many messages); each write runs in its own savepoint so one failure
//! does not undo its neighbours. Reads use a small pool of read-only connections on tokio's
//! blocking threads. Nothing here blocks the async runtime.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use chatoy_protocol::Timestamp;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{params, Connection, OptionalExtension, Row};
use tokio::sync::{mpsc, oneshot};

use crate::{
    Content, Fence, OpenError, PendingWrite, Room, RoomBatch, Session, Store, StoreError, StoreResult,
    StoredMessage, User, UserWithHash,
};

/// The schema files, applied in this order, each once: the database's `user_version` counts the
/// files applied. Add a file at the end; never edit or reorder a released one. A database created
/// before the count was kept has `user_version` 0 and re-runs the first file once, which its
/// `IF NOT EXISTS` statements make harmless.
const SCHEMA: &[(&str, &str)] = &[("sqlite_schema.sql", include_str!("sqlite_schema.sql"))];
/// Most writes grouped into one transaction.
const MAX_GROUP: usize = 1024;

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

    async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let pool = self.readers.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let conn = pool.get().map_err(StoreError::unavailable)?;
            f(&conn).map_err(unavailable)
        })
        .await;
        joined.map_err(StoreError::unavailable)?
    }

    /// Runs a point query (an index lookup touching a few pages) on the calling thread when a
    /// reader is free at once, else like [`SqliteStore::read`]. On a busy machine handing a
    /// query to a blocking thread and back costs more than the query: for the router's uuid
    /// lookups, about 200 µs of every ack and 15 % of the single process's throughput.
    async fn read_now<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        match self.readers.try_get() {
            Some(conn) => f(&conn).map_err(unavailable),
            None => self.read(f).await,
        }
    }

    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        self.enqueue(f).await?.await
    }

    /// Queues a write for the writer thread; returns once it is queued (writes run in the order
    /// they were queued) with the wait for its result.
    async fn enqueue<T, F>(
        &self,
        f: F,
    ) -> StoreResult<futures_util::future::BoxFuture<'static, StoreResult<T>>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job = Box::new(Job {
            f: Some(f),
            result: None,
            tx,
        });
        self.writer
            .send(job)
            .await
            .map_err(|_| StoreError::unavailable("the writer thread stopped"))?;
        Ok(Box::pin(async move {
            rx.await
                .map_err(|_| StoreError::unavailable("the writer thread stopped"))?
        }))
    }
}

fn open_writer(path: &Path, busy_timeout: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy_timeout)?;
    // WAL with synchronous=FULL: a commit returns only after the WAL is on disk, so an ack that
    // follows it survives a power cut.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
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

/// One write waiting for the writer thread.
trait WriteJob: Send {
    /// Runs inside the group's transaction; false means "roll my savepoint back".
    fn run(&mut self, conn: &Connection) -> bool;
    /// Hands the result over once the group committed, or the error if it did not.
    fn complete(self: Box<Self>, committed: Result<(), StoreError>);
}

struct Job<T, F> {
    f: Option<F>,
    result: Option<StoreResult<T>>,
    tx: oneshot::Sender<StoreResult<T>>,
}

impl<T, F> WriteJob for Job<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> StoreResult<T> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(f) = self.f.take() else { return false };
        let result = f(conn);
        let ok = !matches!(result, Err(StoreError::Unavailable(_) | StoreError::Deposed));
        self.result = Some(result);
        ok
    }

    fn complete(self: Box<Self>, committed: Result<(), StoreError>) {
        let outcome = match (committed, self.result) {
            (Ok(()), Some(result)) => result,
            (Ok(()), None) => Err(StoreError::unavailable("write did not run")),
            (Err(err), _) => Err(err),
        };
        // The caller may have given up waiting; that is fine.
        let _ = self.tx.send(outcome);
    }
}

fn writer_loop(conn: Connection, mut rx: mpsc::Receiver<Box<dyn WriteJob>>) {
    let mut jobs: Vec<Box<dyn WriteJob>> = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.blocking_recv() {
        jobs.push(first);
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        // Every job of a failed group gets the group's error as its cause.
        let committed = run_group(&conn, &mut jobs).map_err(std::sync::Arc::new);
        if let Err(err) = &committed {
            tracing::warn!(cause = %err, writes = jobs.len(), "sqlite write group failed");
        }
        for job in jobs.drain(..) {
            let outcome = match &committed {
                Ok(()) => Ok(()),
                Err(err) => Err(StoreError::unavailable(err.clone())),
            };
            job.complete(outcome);
        }
    }
}

fn run_group(conn: &Connection, jobs: &mut [Box<dyn WriteJob>]) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        for job in jobs.iter_mut() {
            conn.execute_batch("SAVEPOINT job")?;
            if job.run(conn) {
                conn.execute_batch("RELEASE job")?;
            } else {
                conn.execute_batch("ROLLBACK TO job; RELEASE job")?;
            }
        }
        conn.execute_batch("COMMIT")
    })();
    if result.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

fn user_from_row(row: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: row.get::<_, i64>("id")? as u64,
        username: row.get("username")?,
        nickname: row.get("nickname")?,
        slogan: row.get("slogan")?,
        status: row.get("status")?,
        registered: Timestamp(row.get("registered")?),
    })
}

fn room_from_row(row: &Row<'_>) -> rusqlite::Result<Room> {
    Ok(Room {
        id: row.get::<_, i64>("id")? as u64,
        name: row.get("name")?,
        description: row.get("description")?,
        created: Timestamp(row.get("created")?),
    })
}

fn message_from_row(row: &Row<'_>) -> rusqlite::Result<StoredMessage> {
    let uuid: [u8; 16] = row.get("uuid")?;
    let content: String = row.get("content")?;
    let content = Content::decode(&content).map_err(|err| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(err))
    })?;
    Ok(StoredMessage {
        uuid: uuid::Uuid::from_bytes(uuid),
        sender: row.get::<_, i64>("sender")? as u64,
        room: row.get::<_, i64>("room_id")? as u64,
        content,
        sent: Timestamp(row.get("sent")?),
        modified: row.get("modified")?,
    })
}

const MESSAGE_COLUMNS: &str = "room_id, sent, uuid, sender, content, modified";

/// Writes one batch under `fence`, in the writer's transaction: nothing if the fence no longer
/// holds.
fn write_batch(conn: &Connection, fence: Fence, batch: &[RoomBatch]) -> StoreResult<()> {
    let epoch: Option<i64> = conn
        .prepare_cached("SELECT epoch FROM partition_owners WHERE partition = ?1")
        .and_then(|mut stmt| {
            stmt.query_row([i64::from(fence.partition)], |row| row.get(0))
                .optional()
        })
        .map_err(unavailable)?;
    if epoch != Some(fence.epoch as i64) {
        return Err(StoreError::Deposed);
    }
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO messages (room_id, sent, uuid, sender, content, modified)
             VALUES (?1, ?2, ?3, ?4, ?5, 0)",
        )
        .map_err(unavailable)?;
    for message in batch.iter().flat_map(|room| &room.messages) {
        let content = message.content.encode();
        insert
            .execute(params![
                message.room as i64,
                message.sent.0,
                message.uuid.as_bytes(),
                message.sender as i64,
                content
            ])
            .map_err(unavailable)?;
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(()))).await
    }

    async fn create_user(&self, username: &str, password_hash: &str, now: Timestamp) -> StoreResult<User> {
        let (username, hash) = (username.to_owned(), password_hash.to_owned());
        self.write(move |conn| {
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO users (username, nickname, password_hash, slogan, status, registered)
                     VALUES (?1, ?1, ?2, '', '', ?3) ON CONFLICT (username) DO NOTHING",
                )
                .and_then(|mut stmt| stmt.execute(params![username, hash, now.0]))
                .map_err(unavailable)?;
            if inserted == 0 {
                return Err(StoreError::Conflict);
            }
            Ok(User {
                id: conn.last_insert_rowid() as u64,
                nickname: username.clone(),
                username,
                slogan: String::new(),
                status: String::new(),
                registered: now,
            })
        })
        .await
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<UserWithHash>> {
        let username = username.to_owned();
        self.read(move |conn| {
            conn.prepare_cached("SELECT * FROM users WHERE username = ?1")?
                .query_row([username], |row| {
                    Ok(UserWithHash {
                        user: user_from_row(row)?,
                        password_hash: row.get("password_hash")?,
                    })
                })
                .optional()
        })
        .await
    }

    async fn user(&self, id: u64) -> StoreResult<Option<User>> {
        self.read(move |conn| {
            conn.prepare_cached("SELECT * FROM users WHERE id = ?1")?
                .query_row([id as i64], user_from_row)
                .optional()
        })
        .await
    }

    async fn create_session(&self, token_hash: &[u8; 32], session: Session) -> StoreResult<()> {
        let hash = *token_hash;
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO sessions (token_hash, user_id, generated, expires) VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    &hash[..],
                    session.user_id as i64,
                    Timestamp::now().0,
                    session.expires.0
                ])
            })
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
    }

    async fn session(&self, token_hash: &[u8; 32], now: Timestamp) -> StoreResult<Option<Session>> {
        let hash = *token_hash;
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT user_id, expires FROM sessions WHERE token_hash = ?1 AND expires > ?2",
            )?
            .query_row(params![&hash[..], now.0], |row| {
                Ok(Session {
                    user_id: row.get::<_, i64>(0)? as u64,
                    expires: Timestamp(row.get(1)?),
                })
            })
            .optional()
        })
        .await
    }

    async fn revoke_session(&self, token_hash: &[u8; 32]) -> StoreResult<bool> {
        let hash = *token_hash;
        self.write(move |conn| {
            conn.prepare_cached("DELETE FROM sessions WHERE token_hash = ?1")
                .and_then(|mut stmt| stmt.execute([&hash[..]]))
                .map(|deleted| deleted > 0)
                .map_err(unavailable)
        })
        .await
    }

    async fn create_room(
        &self,
        name: &str,
        description: &str,
        creator: u64,
        now: Timestamp,
    ) -> StoreResult<Room> {
        let (name, description) = (name.to_owned(), description.to_owned());
        self.write(move |conn| {
            let created = (|| {
                conn.prepare_cached("INSERT INTO rooms (name, description, created) VALUES (?1, ?2, ?3)")?
                    .execute(params![name, description, now.0])?;
                let id = conn.last_insert_rowid();
                conn.prepare_cached(
                    "INSERT INTO room_members (room_id, user_id, joined) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![id, creator as i64, now.0])?;
                Ok(id as u64)
            })();
            let id = created.map_err(unavailable)?;
            Ok(Room {
                id,
                name,
                description,
                created: now,
            })
        })
        .await
    }

    async fn room(&self, id: u64) -> StoreResult<Option<Room>> {
        self.read(move |conn| {
            conn.prepare_cached("SELECT * FROM rooms WHERE id = ?1")?
                .query_row([id as i64], room_from_row)
                .optional()
        })
        .await
    }

    async fn join_room(&self, room: u64, user: u64, now: Timestamp) -> StoreResult<()> {
        self.write(move |conn| {
            let exists = conn
                .prepare_cached("SELECT 1 FROM rooms WHERE id = ?1")
                .and_then(|mut stmt| stmt.exists([room as i64]))
                .map_err(unavailable)?;
            if !exists {
                return Err(StoreError::NotFound);
            }
            conn.prepare_cached(
                "INSERT INTO room_members (room_id, user_id, joined) VALUES (?1, ?2, ?3)
                 ON CONFLICT (room_id, user_id) DO NOTHING",
            )
            .and_then(|mut stmt| stmt.execute(params![room as i64, user as i64, now.0]))
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
    }

    async fn is_member(&self, room: u64, user: u64) -> StoreResult<bool> {
        self.read(move |conn| {
            conn.prepare_cached("SELECT 1 FROM room_members WHERE room_id = ?1 AND user_id = ?2")?
                .exists([room as i64, user as i64])
        })
        .await
    }

    async fn user_rooms(&self, user: u64) -> StoreResult<Vec<Room>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT r.* FROM room_members m JOIN rooms r ON r.id = m.room_id
                 WHERE m.user_id = ?1 ORDER BY m.joined, m.room_id",
            )?;
            let rooms = stmt.query_map([user as i64], room_from_row)?;
            rooms.collect()
        })
        .await
    }

    async fn room_count(&self, user: u64) -> StoreResult<usize> {
        self.read(move |conn| {
            conn.prepare_cached("SELECT count(*) FROM room_members WHERE user_id = ?1")?
                .query_row([user as i64], |row| row.get::<_, i64>(0))
                .map(|count| count as usize)
        })
        .await
    }

    async fn claim(&self, partition: u32, owner: &str) -> StoreResult<Fence> {
        let owner = owner.to_owned();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO partition_owners (partition, epoch, owner, claimed) VALUES (?1, 1, ?2, ?3)
                 ON CONFLICT (partition) DO UPDATE
                 SET epoch = epoch + 1, owner = excluded.owner, claimed = excluded.claimed
                 RETURNING epoch",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![i64::from(partition), owner, Timestamp::now().0], |row| {
                    row.get::<_, i64>(0)
                })
            })
            .map(|epoch| Fence {
                partition,
                epoch: epoch as u64,
            })
            .map_err(unavailable)
        })
        .await
    }

    async fn open_room(&self, _fence: Fence, room: u64) -> StoreResult<Option<Timestamp>> {
        // Every write is one transaction that checks its fence: a deposed writer's write either
        // committed before the claim (and is kept) or fails. Nothing to seal.
        self.read(move |conn| {
            conn.prepare_cached("SELECT max(sent) FROM messages WHERE room_id = ?1")?
                .query_row([room as i64], |row| row.get::<_, Option<i64>>(0))
                .map(|sent| sent.map(Timestamp))
        })
        .await
    }

    async fn find_messages(&self, room: u64, uuids: &[uuid::Uuid]) -> StoreResult<Vec<StoredMessage>> {
        let mut uuids = uuids.to_vec();
        uuids.sort_unstable();
        uuids.dedup();
        self.read_now(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = ?1 AND uuid = ?2"
            ))?;
            let mut found = Vec::new();
            for uuid in uuids {
                if let Some(message) = stmt
                    .query_row(params![room as i64, uuid.as_bytes()], message_from_row)
                    .optional()?
                {
                    found.push(message);
                }
            }
            Ok(found)
        })
        .await
    }

    async fn submit(&self, fence: Fence, batch: Vec<RoomBatch>) -> StoreResult<PendingWrite> {
        self.enqueue(move |conn| write_batch(conn, fence, &batch)).await
    }

    async fn history(&self, room: u64, before: Timestamp, limit: usize) -> StoreResult<Vec<StoredMessage>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = ?1 AND sent < ?2
                 ORDER BY sent DESC LIMIT ?3"
            ))?;
            let rows = stmt.query_map(params![room as i64, before.0, limit as i64], message_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn since(&self, room: u64, after: Timestamp, limit: usize) -> StoreResult<Vec<StoredMessage>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = ?1 AND sent > ?2
                 ORDER BY sent DESC LIMIT ?3"
            ))?;
            let rows = stmt.query_map(params![room as i64, after.0, limit as i64], message_from_row)?;
            let mut messages = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            messages.reverse();
            Ok(messages)
        })
        .await
    }

    async fn replay_start(&self, room: u64, after: Timestamp, limit: usize) -> StoreResult<Timestamp> {
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT sent FROM messages WHERE room_id = ?1 AND sent > ?2
                 ORDER BY sent DESC LIMIT 1 OFFSET ?3",
            )?
            .query_row(params![room as i64, after.0, limit as i64], |row| {
                row.get::<_, i64>(0)
            })
            .optional()
            .map(|left_out| left_out.map_or(after, Timestamp))
        })
        .await
    }

    async fn page_after(&self, room: u64, after: Timestamp, limit: usize) -> StoreResult<Vec<StoredMessage>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = ?1 AND sent > ?2
                 ORDER BY sent LIMIT ?3"
            ))?;
            let rows = stmt.query_map(params![room as i64, after.0, limit as i64], message_from_row)?;
            rows.collect()
        })
        .await
    }
}
