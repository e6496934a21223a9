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

mod exec;
mod fenced;
mod ids;
mod messages;
mod statements;

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chatoy_protocol::http::{Room, User};
use chatoy_protocol::{Message, Timestamp};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::statement::{Consistency, SerialConsistency};

use crate::{
    Fence, PendingWrite, RoomBatch, Session as StoreSession, Store, StoreError, StoreResult, UserWithHash,
};
use exec::{lwt, read_all, read_one, write, CqlResult};
use ids::IdAllocator;
use statements::Statements;

/// The schema files, applied in this order by [`migrate`]. The first creates the keyspace and
/// has `${keyspace}`, `${datacenter}` and `${replication_factor}` substituted; the others run
/// inside the keyspace.
const SCHEMA: &[(&str, &str)] = &[
    ("001_keyspace.cql", include_str!("../schema/001_keyspace.cql")),
    ("002_users.cql", include_str!("../schema/002_users.cql")),
    ("003_sessions.cql", include_str!("../schema/003_sessions.cql")),
    ("004_rooms.cql", include_str!("../schema/004_rooms.cql")),
    ("005_messages.cql", include_str!("../schema/005_messages.cql")),
    ("006_id_blocks.cql", include_str!("../schema/006_id_blocks.cql")),
    ("007_room_heads.cql", include_str!("../schema/007_room_heads.cql")),
    (
        "008_fenced_sequencer.cql",
        include_str!("../schema/008_fenced_sequencer.cql"),
    ),
];

/// Ten days, the default width of a message bucket.
pub const DEFAULT_BUCKET_WIDTH_NANOS: i64 = 10 * 24 * 3600 * 1_000_000_000;
/// The longest TTL CQL accepts (20 years, in seconds).
const MAX_TTL_SECS: i64 = 630_720_000;
/// How long a session row outlives its `expires`, so that clock skew between processes never
/// deletes a session that a reader still considers valid. Reads check `expires` anyway.
const SESSION_TTL_GRACE_SECS: i64 = 3600;
/// How many rooms of a user are read concurrently.
const ROOM_READ_CONCURRENCY: usize = 16;

/// The consistency level of ordinary reads and writes.
///
/// Lightweight transactions use `LOCAL_SERIAL` when this is a local level and `SERIAL`
/// otherwise, except claims that must be unique across the whole cluster (usernames and id
/// blocks), which always use `SERIAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CqlConsistency {
    /// `ONE`.
    One,
    /// `LOCAL_ONE`.
    LocalOne,
    /// `QUORUM`.
    Quorum,
    /// `LOCAL_QUORUM`, the default.
    #[default]
    LocalQuorum,
    /// `EACH_QUORUM`.
    EachQuorum,
    /// `ALL`.
    All,
}

impl CqlConsistency {
    fn driver(self) -> Consistency {
        match self {
            CqlConsistency::One => Consistency::One,
            CqlConsistency::LocalOne => Consistency::LocalOne,
            CqlConsistency::Quorum => Consistency::Quorum,
            CqlConsistency::LocalQuorum => Consistency::LocalQuorum,
            CqlConsistency::EachQuorum => Consistency::EachQuorum,
            CqlConsistency::All => Consistency::All,
        }
    }

    fn serial(self) -> SerialConsistency {
        match self {
            CqlConsistency::LocalOne | CqlConsistency::LocalQuorum => SerialConsistency::LocalSerial,
            _ => SerialConsistency::Serial,
        }
    }

    const NAMES: [(&'static str, CqlConsistency); 6] = [
        ("one", CqlConsistency::One),
        ("local_one", CqlConsistency::LocalOne),
        ("quorum", CqlConsistency::Quorum),
        ("local_quorum", CqlConsistency::LocalQuorum),
        ("each_quorum", CqlConsistency::EachQuorum),
        ("all", CqlConsistency::All),
    ];
}

impl FromStr for CqlConsistency {
    type Err = String;

    /// Parses `local_quorum`, `LOCAL_QUORUM`, `local-quorum` and the like.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let wanted = text.trim().to_ascii_lowercase().replace('-', "_");
        CqlConsistency::NAMES
            .iter()
            .find(|(name, _)| *name == wanted)
            .map(|(_, level)| *level)
            .ok_or_else(|| {
                let names: Vec<&str> = CqlConsistency::NAMES.iter().map(|(name, _)| *name).collect();
                format!(
                    "unknown consistency {text:?} (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

impl fmt::Display for CqlConsistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = CqlConsistency::NAMES
            .iter()
            .find(|(_, level)| level == self)
            .map_or("local_quorum", |(name, _)| *name);
        f.write_str(name)
    }
}

/// Where the cluster is and how to use it.
#[derive(Debug, Clone)]
pub struct CqlConfig {
    /// Contact points, `host:port` (at least one).
    pub nodes: Vec<String>,
    /// The keyspace; letters, digits and `_`, at most 48 characters.
    pub keyspace: String,
    /// The consistency of ordinary reads and writes.
    pub consistency: CqlConsistency,
    /// Replicas per datacenter when [`migrate`] creates the keyspace.
    pub replication_factor: u32,
    /// The local datacenter: the keyspace's replication names it, and requests prefer its nodes.
    pub datacenter: String,
    /// The width of a message bucket in nanoseconds (> 0). It is part of the data layout: every
    /// process of a cluster must use the same width, and changing it orphans stored messages.
    pub bucket_width_nanos: i64,
}

impl Default for CqlConfig {
    /// One local node (`127.0.0.1:9042`), keyspace `chatoy`, `LOCAL_QUORUM`, RF 1 in
    /// `datacenter1`, ten-day buckets: what a laptop runs. Production raises the RF.
    fn default() -> Self {
        CqlConfig {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "chatoy".into(),
            consistency: CqlConsistency::LocalQuorum,
            replication_factor: 1,
            datacenter: "datacenter1".into(),
            bucket_width_nanos: DEFAULT_BUCKET_WIDTH_NANOS,
        }
    }
}

impl CqlConfig {
    /// Checks what is substituted into CQL text or divides.
    fn validate(&self) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err("no CQL contact points given".into());
        }
        let identifier = |text: &str| {
            !text.is_empty()
                && text.len() <= 48
                && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        if !identifier(&self.keyspace) {
            return Err(format!(
                "invalid keyspace {:?}: use 1 to 48 letters, digits or underscores",
                self.keyspace
            ));
        }
        if self.datacenter.is_empty() || self.datacenter.contains('\'') {
            return Err(format!("invalid datacenter name {:?}", self.datacenter));
        }
        if self.replication_factor == 0 {
            return Err("the replication factor must be at least 1".into());
        }
        if self.bucket_width_nanos <= 0 {
            return Err(format!(
                "the bucket width must be positive, not {}",
                self.bucket_width_nanos
            ));
        }
        Ok(())
    }

    /// A session builder with the contact points, consistency and datacenter preference.
    fn session_builder(&self) -> SessionBuilder {
        let policy = DefaultPolicy::builder()
            .prefer_datacenter(self.datacenter.clone())
            .token_aware(true)
            .build();
        let profile = ExecutionProfile::builder()
            .consistency(self.consistency.driver())
            .serial_consistency(Some(self.consistency.serial()))
            .load_balancing_policy(policy)
            .build();
        SessionBuilder::new()
            .known_nodes(&self.nodes)
            .default_execution_profile_handle(profile.into_handle())
    }
}

/// Splits a schema file into statements: `--` comments dropped, `;` separated.
fn statements_of(file: &str) -> Vec<String> {
    let text: String = file
        .lines()
        .map(|line| line.split_once("--").map_or(line, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(str::trim)
        .filter(|statement| !statement.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Creates the keyspace and applies every schema file in order. Every statement is
/// `IF NOT EXISTS`, so running it again is harmless; an existing keyspace keeps its replication
/// settings. Run it from one process at a time (a deploy step, `chatoy migrate`): Cassandra can
/// end up with conflicting table ids when two nodes create the same table concurrently.
pub async fn migrate(config: &CqlConfig) -> Result<(), String> {
    config.validate()?;
    // Schema changes wait for schema agreement after each statement; poll for it often, and
    // skip refreshing this short-lived session's metadata after every change.
    let session = config
        .session_builder()
        .schema_agreement_interval(Duration::from_millis(20))
        .refresh_metadata_on_auto_schema_agreement(false)
        .build()
        .await
        .map_err(|err| format!("cannot connect to {}: {err}", config.nodes.join(",")))?;
    for (index, (file, text)) in SCHEMA.iter().enumerate() {
        let text = text
            .replace("${keyspace}", &config.keyspace)
            .replace("${datacenter}", &config.datacenter)
            .replace("${replication_factor}", &config.replication_factor.to_string());
        for statement in statements_of(&text) {
            session
                .query_unpaged(statement, ())
                .await
                .map_err(|err| format!("schema file {file} failed: {err}"))?;
        }
        if index == 0 {
            session
                .use_keyspace(&config.keyspace, false)
                .await
                .map_err(|err| format!("cannot use keyspace {}: {err}", config.keyspace))?;
        }
    }
    Ok(())
}

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
    pub async fn connect(config: &CqlConfig) -> Result<CqlStore, String> {
        config.validate()?;
        let session = config
            .session_builder()
            .use_keyspace(&config.keyspace, false)
            .build()
            .await
            .map_err(|err| {
                format!(
                    "cannot connect to {} with keyspace {} (was it migrated?): {err}",
                    config.nodes.join(","),
                    config.keyspace
                )
            })?;
        let statements = Statements::prepare(&session, config.consistency.serial())
            .await
            .map_err(|err| {
                format!(
                    "cannot prepare the store's statements (was {} migrated?): {err}",
                    config.keyspace
                )
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

    async fn create_room(
        &self,
        name: &str,
        description: &str,
        creator: u64,
        now: Timestamp,
    ) -> StoreResult<Room> {
        let id = self.room_ids.next(&self.session, &self.statements).await?;
        write(
            &self.session,
            &self.statements.room_insert,
            (id as i64, name, description, now.0),
        )
        .await?;
        self.write_membership(id, creator, now).await?;
        Ok(Room {
            id,
            name: name.to_owned(),
            description: description.to_owned(),
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

    async fn find_messages(&self, room: u64, uuids: &[uuid::Uuid]) -> StoreResult<Vec<Message>> {
        Ok(self.find_fenced(room, uuids).await?)
    }

    async fn submit(&self, fence: Fence, batch: Vec<RoomBatch>) -> StoreResult<PendingWrite> {
        self.submit_fenced(fence, batch)
    }

    async fn history(&self, room: u64, before: Timestamp, limit: usize) -> StoreResult<Vec<Message>> {
        Ok(self.history_of(room, before.0, limit).await?)
    }

    async fn since(&self, room: u64, after: Timestamp, limit: usize) -> StoreResult<Vec<Message>> {
        Ok(self.since_of(room, after.0, limit).await?)
    }

    async fn replay_start(&self, room: u64, after: Timestamp, limit: usize) -> StoreResult<Timestamp> {
        Ok(Timestamp(self.replay_start_of(room, after.0, limit).await?))
    }

    async fn page_after(&self, room: u64, after: Timestamp, limit: usize) -> StoreResult<Vec<Message>> {
        Ok(self.page_after_of(room, after.0, limit).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_files_split_into_statements() {
        let statements =
            statements_of("-- a; comment\nCREATE TABLE a (x int); -- trailing\n\nCREATE TABLE b (y int);\n");
        assert_eq!(
            statements,
            vec!["CREATE TABLE a (x int)", "CREATE TABLE b (y int)"]
        );
        for (file, text) in SCHEMA {
            assert!(!statements_of(text).is_empty(), "{file} has no statement");
            for statement in statements_of(text) {
                assert!(
                    statement.contains("IF NOT EXISTS"),
                    "{file}: not idempotent: {statement}"
                );
            }
        }
    }

    #[test]
    fn consistency_names_round_trip() {
        for (name, level) in CqlConsistency::NAMES {
            assert_eq!(name.parse::<CqlConsistency>(), Ok(level));
            assert_eq!(level.to_string(), name);
        }
        assert_eq!("LOCAL-QUORUM".parse(), Ok(CqlConsistency::LocalQuorum));
        assert!("twice".parse::<CqlConsistency>().is_err());
    }

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

    #[test]
    fn config_is_checked() {
        assert!(CqlConfig::default().validate().is_ok());
        let bad_keyspace = CqlConfig {
            keyspace: "x; DROP".into(),
            ..CqlConfig::default()
        };
        assert!(bad_keyspace.validate().is_err());
        let bad_width = CqlConfig {
            bucket_width_nanos: 0,
            ..CqlConfig::default()
        };
        assert!(bad_width.validate().is_err());
    }
}
