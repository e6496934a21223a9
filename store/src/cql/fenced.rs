//! The fenced write path: partition claims, room seals, idempotency lookups and ordered batches.
//!
//! One router at a time owns a partition's rooms. It claims the partition with one lightweight
//! transaction (`partition_owners.epoch + 1`); every write it makes afterwards carries the client
//! timestamp `T(epoch, k) = 2^60 + epoch·2^36 + k`, `k` counting its batches from 1. So whatever
//! a newer owner writes or deletes wins over a deposed owner's writes, whenever these arrive.
//!
//! - **Seal** (`open`, before a room is sequenced under an epoch): write the room's
//!   `room_sequences.epoch` alone at `T(epoch, 0)`, read the room's head `sent`, write it back at
//!   `T(epoch, 0)`, and delete (range tombstones at `T(epoch, 0)`) every row after it in every
//!   bucket from the head's up to now's. From then on nothing a deposed owner writes to the room
//!   can become visible: its head writes lose, its rows are shadowed. Readers that find `epoch`
//!   written after `sent` (a seal under way) wait for it.
//! - **Batch** (`submit`): per room, one unlogged batch with its rows and their uuids (plus
//!   tombstones for buckets the epoch enters for the first time); then, once this batch's rows
//!   and every earlier batch's rows are stored, the rooms' heads; then the partition's epoch is
//!   read back. Only if it still holds is the batch acknowledged: a claim that completed before
//!   that read happens-before the new owner's seal, which then reads this batch's heads.
//! - **Lookup** (`find`): `message_uuids` says where a uuid's row is; a row that is not there
//!   (shadowed by a seal) means the message was never stored for readers.

use std::collections::HashMap;

use chatoy_protocol::Timestamp;
use futures_util::future::try_join_all;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use tokio::sync::watch;
use uuid::Uuid;

use super::exec::{lwt, read_all, read_one, write, CqlError, CqlResult};
use super::CqlStore;
use crate::{Fence, NewMessage, PendingWrite, RoomBatch, StoreError, StoreResult, StoredMessage};

/// The lowest client timestamp a fenced write carries: above any wall-clock microsecond value.
const TIMESTAMP_BASE: i64 = 1 << 60;
/// Bits of the per-epoch batch counter in a write timestamp.
const COUNTER_BITS: u32 = 36;
/// The most batches one claim writes; the writer then claims again.
const MAX_BATCHES: u64 = (1 << COUNTER_BITS) - 1;
/// The most claims a partition can ever have.
const MAX_EPOCH: u64 = (1 << 24) - 1;
/// Attempts to claim a partition that others keep claiming at the same moment.
const CLAIM_ATTEMPTS: usize = 10;
/// Most buckets one seal fences off (a room idle for about 27 years with ten-day buckets).
const MAX_SEAL_BUCKETS: i64 = 1000;

/// The client timestamp of a fenced write: batch `k` of `epoch` (`k = 0` is the seal).
fn write_time(epoch: u64, k: u64) -> i64 {
    TIMESTAMP_BASE + ((epoch as i64) << COUNTER_BITS) + k.min(MAX_BATCHES) as i64
}

/// What this process remembers of the partitions it writes.
#[derive(Default)]
pub(crate) struct Lanes {
    lanes: HashMap<u32, Lane>,
}

/// One partition's writer in this process.
struct Lane {
    epoch: u64,
    /// Batches submitted under the epoch: the counter of their write timestamps.
    batches: u64,
    /// Per opened room, the newest bucket fenced off under the epoch.
    fenced_through: HashMap<u64, i64>,
    /// Set to `Some(ok)` once the last submitted batch's rows, and every earlier batch's, are
    /// stored (`true`) or one of them failed (`false`).
    rows_done: Option<watch::Receiver<Option<bool>>>,
}

/// One room's part of a submitted batch, ready to write.
struct RoomPlan {
    room: u64,
    messages: Vec<NewMessage>,
    /// Buckets entered for the first time under this epoch: fenced off in the same batch.
    fence_buckets: Vec<i64>,
}

impl CqlStore {
    /// Claims `partition`: one lightweight transaction raising its epoch.
    pub(super) async fn claim_partition(&self, partition: u32, owner: &str) -> CqlResult<Fence> {
        let key = partition as i32;
        for _ in 0..CLAIM_ATTEMPTS {
            let current: Option<(Option<i64>,)> =
                read_one(&self.session, &self.statements.owner_serial_read, (key,)).await?;
            let now = Timestamp::now().0;
            let (claimed, epoch) = match current.and_then(|(epoch,)| epoch) {
                None => {
                    let created =
                        lwt(&self.session, &self.statements.owner_create, (key, owner, now)).await?;
                    (created.applied, 1)
                }
                Some(epoch) if epoch as u64 >= MAX_EPOCH => {
                    return Err(CqlError::Inconsistent(format!(
                        "partition {partition} was claimed {epoch} times, the most it can be"
                    )))
                }
                Some(epoch) => {
                    let next = epoch + 1;
                    let taken = lwt(
                        &self.session,
                        &self.statements.owner_take,
                        (next, owner, now, key, epoch),
                    )
                    .await?;
                    (taken.applied, next as u64)
                }
            };
            if claimed {
                let lane = Lane {
                    epoch,
                    batches: 0,
                    fenced_through: HashMap::new(),
                    rows_done: None,
                };
                self.lanes.lock().lanes.insert(partition, lane);
                return Ok(Fence { partition, epoch });
            }
        }
        Err(CqlError::Inconsistent(format!(
            "partition {partition} is being claimed by others: gave up after {CLAIM_ATTEMPTS} attempts"
        )))
    }

    /// Seals `room` for `fence` (see the module documentation); returns its head.
    pub(super) async fn open_fenced(&self, fence: Fence, room: u64) -> StoreResult<Option<Timestamp>> {
        self.check_lane(fence)?;
        let seal = write_time(fence.epoch, 0);
        let key = room as i64;
        let epoch = fence.epoch as i64;
        write(
            &self.session,
            &self.statements.sequence_epoch_write,
            (seal, epoch, key),
        )
        .await?;
        let head = match self.sequence_of(room).await?.and_then(|(sent, ..)| sent) {
            Some(sent) => sent,
            // Never sealed: the room is new, or its messages predate the fenced sequencer.
            None => self.legacy_newest(room).await?.unwrap_or(0),
        };
        let now = Timestamp::now().0;
        let start = if head > 0 {
            head
        } else {
            // Nothing stored: a deposed owner's first rows may be anywhere since the room's start.
            self.room_of(room).await?.map_or(now, |room| room.created.0)
        };
        let (first, last) = (self.bucket(start), self.bucket(now).max(self.bucket(start)));
        let first = first.max(last - MAX_SEAL_BUCKETS);
        let deletes = (first..=last).map(|bucket| {
            write(
                &self.session,
                &self.statements.messages_after_delete,
                (seal, key, bucket, head),
            )
        });
        try_join_all(deletes).await?;
        write(
            &self.session,
            &self.statements.sequence_write,
            (seal, head, epoch, key),
        )
        .await?;
        let mut lanes = self.lanes.lock();
        let lane = lanes
            .lanes
            .get_mut(&fence.partition)
            .filter(|lane| lane.epoch == fence.epoch)
            .ok_or(StoreError::Deposed)?;
        lane.fenced_through.insert(room, last);
        Ok((head > 0).then_some(Timestamp(head)))
    }

    /// Fails unless this process holds `fence` as the newest claim it made of its partition.
    fn check_lane(&self, fence: Fence) -> StoreResult<()> {
        match self.lanes.lock().lanes.get(&fence.partition) {
            Some(lane) if lane.epoch == fence.epoch => Ok(()),
            Some(_) => Err(StoreError::Deposed),
            None => Err(StoreError::unavailable(format!(
                "partition {} was not claimed by this process",
                fence.partition
            ))),
        }
    }

    /// Queues a batch under `fence`; see the module documentation.
    pub(super) fn submit_fenced(&self, fence: Fence, batch: Vec<RoomBatch>) -> StoreResult<PendingWrite> {
        let (k, plans, previous, done) = {
            let mut lanes = self.lanes.lock();
            let lane = match lanes.lanes.get_mut(&fence.partition) {
                Some(lane) if lane.epoch == fence.epoch => lane,
                Some(_) => return Err(StoreError::Deposed),
                None => {
                    return Err(StoreError::unavailable(format!(
                        "partition {} was not claimed by this process",
                        fence.partition
                    )))
                }
            };
            let mut plans = Vec::with_capacity(batch.len());
            for RoomBatch { room, messages } in batch {
                let Some(newest) = messages.iter().map(|message| self.bucket(message.sent.0)).max() else {
                    continue;
                };
                let through = lane.fenced_through.get_mut(&room).ok_or_else(|| {
                    StoreError::unavailable(format!("room {room} was not opened under this fence"))
                })?;
                let fence_buckets = (*through + 1..=newest).collect();
                *through = (*through).max(newest);
                plans.push(RoomPlan {
                    room,
                    messages,
                    fence_buckets,
                });
            }
            if lane.batches >= MAX_BATCHES {
                return Err(StoreError::unavailable(
                    "this claim wrote all the batches it can: claim again",
                ));
            }
            lane.batches += 1;
            let (done, rows_done) = watch::channel(None);
            let previous = lane.rows_done.replace(rows_done);
            (lane.batches, plans, previous, done)
        };
        let store = self.clone();
        let task = tokio::spawn(async move { store.write_batch(fence, k, plans, previous, done).await });
        Ok(Box::pin(async move {
            task.await
                .map_err(|err| StoreError::unavailable(format!("the write task failed: {err}")))?
        }))
    }

    /// Writes one submitted batch: rows, then (in submission order) heads, then the fence check.
    async fn write_batch(
        self,
        fence: Fence,
        k: u64,
        plans: Vec<RoomPlan>,
        previous: Option<watch::Receiver<Option<bool>>>,
        done: watch::Sender<Option<bool>>,
    ) -> StoreResult<()> {
        let at = write_time(fence.epoch, k);
        let rows = self.write_rows(fence, at, &plans).await;
        let earlier = match previous {
            None => true,
            Some(mut previous) => previous
                .wait_for(Option::is_some)
                .await
                .map(|done| *done == Some(true))
                .unwrap_or(false),
        };
        let _ = done.send(Some(rows.is_ok() && earlier));
        rows?;
        if !earlier {
            return Err(StoreError::unavailable(
                "an earlier batch of this partition failed",
            ));
        }
        let epoch = fence.epoch as i64;
        let mut heads = Packer::default();
        for plan in &plans {
            if let Some(head) = plan.messages.last() {
                let values = (at, head.sent.0, epoch, plan.room as i64);
                heads.push(&self.statements.sequence_write, Box::new(values), 32);
            }
        }
        heads.run(&self.session).await?;
        let owner: Option<(Option<i64>,)> = read_one(
            &self.session,
            &self.statements.owner_read,
            (fence.partition as i32,),
        )
        .await?;
        match owner.and_then(|(epoch,)| epoch) {
            Some(current) if current == epoch => Ok(()),
            _ => Err(StoreError::Deposed),
        }
    }

    /// Every room's rows and uuids (and the buckets it enters fenced off), packed into a few
    /// unlogged batches, after recording the buckets.
    async fn write_rows(&self, fence: Fence, at: i64, plans: &[RoomPlan]) -> CqlResult<()> {
        let seal = write_time(fence.epoch, 0);
        let mut packer = Packer::default();
        for plan in plans {
            let room = plan.room as i64;
            let mut recorded = Vec::new();
            for message in &plan.messages {
                let bucket = self.bucket(message.sent.0);
                if !recorded.contains(&bucket) {
                    self.record_bucket(plan.room, bucket).await?;
                    recorded.push(bucket);
                }
            }
            for &bucket in &plan.fence_buckets {
                let values = (seal, room, bucket, 0i64);
                packer.push(&self.statements.messages_after_delete, Box::new(values), 32);
            }
            for message in &plan.messages {
                let content = message.content.encode();
                let size = content.len() + 64;
                let bucket = self.bucket(message.sent.0);
                let row = (
                    room,
                    bucket,
                    message.sent.0,
                    message.uuid,
                    message.sender as i64,
                    content,
                    at,
                );
                packer.push(&self.statements.message_insert, Box::new(row), size);
                let id = (room, message.uuid, message.sent.0, at);
                packer.push(&self.statements.uuid_insert, Box::new(id), 48);
            }
        }
        packer.run(&self.session).await
    }

    /// The stored messages of `room` among `uuids`.
    pub(super) async fn find_fenced(&self, room: u64, uuids: &[Uuid]) -> CqlResult<Vec<StoredMessage>> {
        let mut wanted = uuids.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let located: Vec<(Uuid, i64)> =
            read_all(&self.session, &self.statements.uuids_read, (room as i64, wanted)).await?;
        let rows = located.into_iter().map(|(uuid, sent)| async move {
            match self.message_at(room, self.bucket(sent), sent, uuid).await {
                Ok(found) => Ok(found),
                // Another message at that `sent`: this uuid's row was shadowed by a seal.
                Err(CqlError::Inconsistent(_)) => Ok(None),
                Err(err) => Err(err),
            }
        });
        Ok(try_join_all(rows).await?.into_iter().flatten().collect())
    }
}

/// Most bytes of values in one unlogged batch: well under the 50 KiB that Cassandra and
/// ScyllaDB refuse for a batch over several partitions by default.
const BATCH_BYTES: usize = 32 * 1024;

/// One statement's values, whatever their shape.
type Values = Box<dyn SerializeRow + Send + Sync>;

/// Statements packed into unlogged batches of at most [`BATCH_BYTES`], written concurrently:
/// one request for many rows instead of one each.
#[derive(Default)]
struct Packer {
    /// The batches, each with its values and their size so far.
    batches: Vec<(Batch, Vec<Values>, usize)>,
}

impl Packer {
    fn push(
        &mut self,
        statement: &PreparedStatement,
        values: Box<dyn SerializeRow + Send + Sync>,
        size: usize,
    ) {
        let fits = self
            .batches
            .last()
            .is_some_and(|(_, _, bytes)| bytes + size <= BATCH_BYTES);
        if !fits {
            let mut batch = Batch::new(BatchType::Unlogged);
            batch.set_is_idempotent(true);
            self.batches.push((batch, Vec::new(), 0));
        }
        if let Some((batch, all, bytes)) = self.batches.last_mut() {
            batch.append_statement(statement.clone());
            all.push(values);
            *bytes += size;
        }
    }

    async fn run(self, session: &scylla::client::session::Session) -> CqlResult<()> {
        let writes = self
            .batches
            .into_iter()
            .map(|(batch, values, _)| async move { session.batch(&batch, values).await });
        try_join_all(writes).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_times_order_epochs_then_batches() {
        assert!(
            write_time(1, 0) > 1_000_000_000_000_000 * 1000,
            "above wall-clock microseconds"
        );
        assert!(write_time(1, 0) < write_time(1, 1));
        assert!(write_time(1, MAX_BATCHES) < write_time(2, 0));
        assert!(write_time(1, MAX_BATCHES + 5) == write_time(1, MAX_BATCHES));
        assert!(write_time(MAX_EPOCH, MAX_BATCHES) > 0, "no overflow");
    }
}
