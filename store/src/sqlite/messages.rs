//! Messages: the partitions' fences, the fenced batch write, the idempotency lookup, history
//! and replays. Each public function is the [`Store`](crate::Store) method of the same name.

use chatoy_protocol::Timestamp;
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{unavailable, SqliteStore};
use crate::{Content, Fence, PendingWrite, RoomBatch, StoreError, StoreResult, StoredMessage};

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

pub(super) async fn claim(store: &SqliteStore, partition: u32, owner: &str) -> StoreResult<Fence> {
    let owner = owner.to_owned();
    store
        .write(move |conn| {
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

pub(super) async fn open_room(
    store: &SqliteStore,
    _fence: Fence,
    room: u64,
) -> StoreResult<Option<Timestamp>> {
    // Every write is one transaction that checks its fence: a deposed writer's write either
    // committed before the claim (and is kept) or fails. Nothing to seal.
    store
        .read(move |conn| {
            conn.prepare_cached("SELECT max(sent) FROM messages WHERE room_id = ?1")?
                .query_row([room as i64], |row| row.get::<_, Option<i64>>(0))
                .map(|sent| sent.map(Timestamp))
        })
        .await
}

pub(super) async fn find_messages(
    store: &SqliteStore,
    room: u64,
    uuids: &[uuid::Uuid],
) -> StoreResult<Vec<StoredMessage>> {
    let mut uuids = uuids.to_vec();
    uuids.sort_unstable();
    uuids.dedup();
    store
        .read_now(move |conn| {
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

pub(super) async fn submit(
    store: &SqliteStore,
    fence: Fence,
    batch: Vec<RoomBatch>,
) -> StoreResult<PendingWrite> {
    store.enqueue(move |conn| write_batch(conn, fence, &batch)).await
}

pub(super) async fn history(
    store: &SqliteStore,
    room: u64,
    before: Timestamp,
    limit: usize,
) -> StoreResult<Vec<StoredMessage>> {
    select(store, "sent < ?2 ORDER BY sent DESC", room, before, limit).await
}

pub(super) async fn since(
    store: &SqliteStore,
    room: u64,
    after: Timestamp,
    limit: usize,
) -> StoreResult<Vec<StoredMessage>> {
    let mut messages = select(store, "sent > ?2 ORDER BY sent DESC", room, after, limit).await?;
    messages.reverse();
    Ok(messages)
}

pub(super) async fn replay_start(
    store: &SqliteStore,
    room: u64,
    after: Timestamp,
    limit: usize,
) -> StoreResult<Timestamp> {
    store
        .read(move |conn| {
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

pub(super) async fn page_after(
    store: &SqliteStore,
    room: u64,
    after: Timestamp,
    limit: usize,
) -> StoreResult<Vec<StoredMessage>> {
    select(store, "sent > ?2 ORDER BY sent", room, after, limit).await
}

/// Up to `limit` messages of `room` that `clause` selects and orders (`?2` is `at`), in its
/// order.
async fn select(
    store: &SqliteStore,
    clause: &'static str,
    room: u64,
    at: Timestamp,
    limit: usize,
) -> StoreResult<Vec<StoredMessage>> {
    store
        .read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = ?1 AND {clause} LIMIT ?3"
            ))?;
            let rows = stmt.query_map(params![room as i64, at.0, limit as i64], message_from_row)?;
            rows.collect()
        })
        .await
}
