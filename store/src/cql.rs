//! The cluster backend: ScyllaDB (or any CQL database speaking protocol v4, such as Cassandra)
//! through the `scylla` driver.
//!
//! The schema lives in `store/schema/*.cql` and is applied by [`migrate`]; [`CqlStore::connect`]
//! prepares every statement once and refuses to start on a missing schema. The CQL is portable:
//! no ScyllaDB-only or Cassandra-only syntax, and lightweight-transaction results are read by
//! column name because their shape differs between the two (see `exec.rs`).
//!
//! Uniqueness that SQLite gets from constraints comes from lightweight transactions here:
//! usernames (`users_by_name`), message uuids per room (`message_ids`), id blocks
//! (`id_blocks`) and session revocation. Everything else is plain idempotent upserts.

mod config;
mod exec;
mod fenced;
mod ids;
mod messages;
mod migrate;
mod statements;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chatoy_protocol::Timestamp;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use scylla::client::session::Session;

use crate::{
    Fence, OpenError, PendingWrite, Room, RoomBatch, RoomDraft, Session as StoreSession, Store, StoreError,
    StoreResult, StoredMessage, User, UserWithHash,
};
use exec::{lwt, read_all, read_one, write, CqlResult};
use ids::IdAllocator;

pub use config::{CqlConfig, CqlConsistency, DEFAULT_BUCKET_WIDTH_NANOS};
pub use migrate::migrate;
use statements::Statements;

/// The longest TTL CQL accepts (20 years, in seconds).
const MAX_TTL_SECS: i64 = 630_720_000;
/// How long a session row outlives its `expires`, so that clock skew between processes never
/// deletes a session that a reader still considers valid. Reads check `expires` anyway.
const SESSION_TTL_GRACE_SECS: i64 = 3600;
/// How many rooms of a user are read concurrently.
const ROOM_READ_CONCURRENCY: usize = 16;

/// The CQL [`Store`]. Cloning it is cheap: clones share the session and all state.
#[derive(Clone)]
pub struct CqlStore {
    session: Arc<Session>,
    statements: Arc<Statements>,
    user_ids: Arc<IdAllocator>,
    room_ids: Arc<IdAllocator>,
    /// The bucket width in nanoseconds, > 0.
    bucket_width: i64,
    /// The newest bucket this process recorded in `message_buckets`, per room.
    recorded_buckets: Arc<Mutex<lru::LruCache<u64, i64>>>,
    /// The partitions this process writes under a fence (`fenced.rs`).
    lanes: Arc<parking_lot::Mutex<fenced::Lanes>>,
}

impl CqlStore {
    /// Connects to the cluster and prepares every statement; fails if the keyspace or its
    /// tables are missing (run [`migrate`] first).
    pub async fn connect(config: &CqlConfig) -> Result<CqlStore, OpenError> {
        config.validate().map_err(OpenError::Config)?;
        let session = config
            .session_builder()
            .use_keyspace(&config.keyspace, false)
            .build()
            .await
            .map_err(|err| OpenError::Connect {
                nodes: config.nodes.join(","),
                keyspace: Some(config.keyspace.clone()),
                source: Box::new(err),
            })?;
        let statements = Statements::prepare(&session, config.consistency.serial())
            .await
            .map_err(|err| OpenError::Prepare {
                keyspace: config.keyspace.clone(),
                source: Box::new(err),
            })?;
        Ok(CqlStore {
            session: Arc::new(session),
            statements: Arc::new(statements),
            user_ids: Arc::new(IdAllocator::new("users")),
            room_ids: Arc::new(IdAllocator::new("rooms")),
            bucket_width: config.bucket_width_nanos,
            recorded_buckets: Arc::new(Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(messages::MAX_REMEMBERED_ROOMS).expect("not zero"),
            ))),
            lanes: Arc::default(),
        })
    }

    async fn room_of(&self, id: u64) -> CqlResult<Option<Room>> {
        let row: Option<(i64, String, String, i64)> =
            read_one(&self.session, &self.statements.room_read, (id as i64,)).await?;
        Ok(row.map(|(id, name, description, created)| Room {
            id: id as u64,
            name,
            description,
            created: Timestamp(created),
        }))
    }

    async fn user_of(&self, id: u64) -> CqlResult<Option<UserWithHash>> {
        type UserRow = (i64, String, String, String, String, i64, String);
        let row: Option<UserRow> = read_one(&self.session, &self.statements.user_read, (id as i64,)).await?;
        Ok(row.map(
            |(id, username, nickname, slogan, status, registered, password_hash)| UserWithHash {
                user: User {
                    id: id as u64,
                    username,
                    nickname,
                    slogan,
                    status,
                    registered: Timestamp(registered),
                },
                password_hash,
            },
        ))
    }

    /// Writes both membership rows with `joined` (upserts, so a retry repairs a half-done join).
    async fn write_membership(&self, room: u64, user: u64, joined: Timestamp) -> CqlResult<()> {
        let values = (room as i64, user as i64, joined.0);
        let user_room = (user as i64, room as i64, joined.0);
        futures_util::try_join!(
            write(&self.session, &self.statements.member_insert, values),
            write(&self.session, &self.statements.user_room_insert, user_room),
        )?;
        Ok(())
    }
}

/// The TTL of a session row: until `expires` plus a grace period, at least one second (a TTL of
/// zero would mean "forever") and at most what CQL accepts.
fn session_ttl(expires: Timestamp, now: Timestamp) -> i32 {
    let remaining = expires.0.saturating_sub(now.0).max(0);
    let secs = (remaining / 1_000_000_000 + i64::from(remaining % 1_000_000_000 != 0))
        .saturating_add(SESSION_TTL_GRACE_SECS);
    i32::try_from(secs.clamp(1, MAX_TTL_SECS)).unwrap_or(i32::MAX)
}

#[async_trait]
impl Store for CqlStore {
    async fn ping(&self) -> StoreResult<()> {
        let _: Option<(Option<String>,)> = read_one(&self.session, &self.statements.ping, ()).await?;
        Ok(())
    }

    async fn create_user(&self, username: &str, password_hash: &str, now: Timestamp) -> StoreResult<User> {
        let id = self.user_ids.next(&self.session, &self.statements).await?;
        // The row first, then the name: a name claimed always leads to a user row. A row whose
        // claim loses is deleted again; if this process dies in between, it stays an orphan
        // nobody can reach, which is harmless because its id is never handed out again.
        write(
            &self.session,
            &self.statements.user_insert,
            (id as i64, username, username, password_hash, "", "", now.0),
        )
        .await?;
        let claim = lwt(
            &self.session,
            &self.statements.name_claim,
            (username.to_ascii_lowercase(), id as i64),
        )
        .await?;
        if !claim.applied {
            if let Err(err) = write(&self.session, &self.statements.user_delete, (id as i64,)).await {
                tracing::warn!(cause = %err, id, "cannot delete the row of a refused username");
            }
            return Err(StoreError::Conflict);
        }
        Ok(User {
            id,
            username: username.to_owned(),
            nickname: username.to_owned(),
            slogan: String::new(),
            status: String::new(),
            registered: now,
        })
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<UserWithHash>> {
        let claim: Option<(i64,)> = read_one(
            &self.session,
            &self.statements.name_read,
            (username.to_ascii_lowercase(),),
        )
        .await?;
        match claim {
            Some((id,)) => Ok(self.user_of(id as u64).await?),
            None => Ok(None),
        }
    }

    async fn user(&self, id: u64) -> StoreResult<Option<User>> {
        Ok(self.user_of(id).await?.map(|found| found.user))
    }

    async fn create_session(&self, token_hash: &[u8; 32], session: StoreSession) -> StoreResult<()> {
        let now = Timestamp::now();
        write(
            &self.session,
            &self.statements.session_insert,
            (
                &token_hash[..],
                session.user_id as i64,
                now.0,
                session.expires.0,
                session_ttl(session.expires, now),
            ),
        )
        .await?;
        Ok(())
    }

    async fn session(&self, token_hash: &[u8; 32], now: Timestamp) -> StoreResult<Option<StoreSession>> {
        let row: Option<(i64, i64)> =
            read_one(&self.session, &self.statements.session_read, (&token_hash[..],)).await?;
        Ok(row
            .filter(|(_, expires)| *expires > now.0)
            .map(|(user_id, expires)| StoreSession {
                user_id: user_id as u64,
                expires: Timestamp(expires),
            }))
    }

    async fn revoke_session(&self, token_hash: &[u8; 32]) -> StoreResult<bool> {
        let deleted = lwt(&self.session, &self.statements.session_delete, (&token_hash[..],)).await?;
        Ok(deleted.applied)
    }

    async fn create_room(&self, draft: RoomDraft<'_>, now: Timestamp) -> StoreResult<Room> {
        let id = self.room_ids.next(&self.session, &self.statements).await?;
        write(
            &self.session,
            &self.statements.room_insert,
            (id as i64, draft.name, draft.description, now.0),
        )
        .await?;
        self.write_membership(id, draft.creator, now).await?;
        Ok(Room {
            id,
            name: draft.name.to_owned(),
            description: draft.description.to_owned(),
            created: now,
        })
    }

    async fn room(&self, id: u64) -> StoreResult<Option<Room>> {
        Ok(self.room_of(id).await?)
    }

    async fn join_room(&self, room: u64, user: u64, now: Timestamp) -> StoreResult<()> {
        let (exists, member) = futures_util::try_join!(
            self.room_of(room),
            read_one::<(i64,)>(
                &self.session,
                &self.statements.member_read,
                (room as i64, user as i64)
            ),
        )?;
        if exists.is_none() {
            return Err(StoreError::NotFound);
        }
        // A member keeps the time of the first join; rewriting both rows with it is what makes
        // a retried, half-done join whole.
        let joined = member.map_or(now, |(joined,)| Timestamp(joined));
        self.write_membership(room, user, joined).await?;
        Ok(())
    }

    async fn is_member(&self, room: u64, user: u64) -> StoreResult<bool> {
        let member: Option<(i64,)> = read_one(
            &self.session,
            &self.statements.member_read,
            (room as i64, user as i64),
        )
        .await?;
        Ok(member.is_some())
    }

    async fn user_rooms(&self, user: u64) -> StoreResult<Vec<Room>> {
        let mut joined: Vec<(i64, i64)> =
            read_all(&self.session, &self.statements.user_rooms_read, (user as i64,)).await?;
        // Join order, ties broken by room id, as SQLite sorts them.
        joined.sort_by_key(|(room, joined)| (*joined, *room));
        let reads: Vec<_> = joined
            .into_iter()
            .map(|(room, _)| self.room_of(room as u64))
            .collect();
        let rooms: Vec<Option<Room>> = stream::iter(reads)
            .buffered(ROOM_READ_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(rooms.into_iter().flatten().collect())
    }

    async fn room_count(&self, user: u64) -> StoreResult<usize> {
        let count: Option<(i64,)> =
            read_one(&self.session, &self.statements.user_room_count, (user as i64,)).await?;
        Ok(count.map_or(0, |(count,)| count.max(0) as usize))
    }

    async fn claim(&self, partition: u32, owner: &str) -> StoreResult<Fence> {
        Ok(self.claim_partition(partition, owner).await?)
    }

    async fn open_room(&self, fence: Fence, room: u64) -> StoreResult<Option<Timestamp>> {
        self.open_fenced(fence, room).await
    }

    async fn find_messages(&self, room: u64, uuids: &[uuid::Uuid]) -> StoreResult<Vec<StoredMessage>> {
        Ok(self.find_fenced(room, uuids).await?)
    }

    async fn submit(&self, fence: Fence, batch: Vec<RoomBatch>) -> StoreResult<PendingWrite> {
        self.submit_fenced(fence, batch)
    }

    async fn history(&self, room: u64, before: Timestamp, limit: usize) -> StoreResult<Vec<StoredMessage>> {
        Ok(self.history_of(room, before.0, limit).await?)
    }

    async fn since(&self, room: u64, after: Timestamp, limit: usize) -> StoreResult<Vec<StoredMessage>> {
        Ok(self.since_of(room, after.0, limit).await?)
    }

    async fn replay_start(&self, room: u64, after: Timestamp, limit: usize) -> StoreResult<Timestamp> {
        Ok(Timestamp(self.replay_start_of(room, after.0, limit).await?))
    }

    async fn page_after(&self, room: u64, after: Timestamp, limit: usize) -> StoreResult<Vec<StoredMessage>> {
        Ok(self.page_after_of(room, after.0, limit).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ttls_stay_in_range() {
        let now = Timestamp(1_000_000_000_000);
        assert_eq!(session_ttl(Timestamp(0), now), SESSION_TTL_GRACE_SECS as i32);
        assert_eq!(
            session_ttl(Timestamp(now.0 + 1), now),
            SESSION_TTL_GRACE_SECS as i32 + 1
        );
        assert_eq!(session_ttl(Timestamp(i64::MAX), now), MAX_TTL_SECS as i32);
    }
}
