//! Message reads: walking a room's time buckets, bounded by what is completely stored.
//!
//! A message lives in `messages ((room_id, bucket), sent …)` with `bucket = sent div width`.
//! `message_buckets ((room_id), bucket)` lists the buckets a room has used, newest first, so
//! reads visit only buckets that may hold messages: `history` walks them backwards from
//! `bucket(before)`, `since` from the newest one down to `bucket(after)`, and both stop at the
//! room's first bucket because the list ends there. A room that never had a message (or does
//! not exist) has no buckets, so its reads are empty. A listed bucket without messages (its
//! writer died after recording it) is just skipped.
//!
//! Reads stop at the room's head (`room_sequences.sent`, see `fenced.rs`): the sequencer writes
//! a batch's rows first and its head after, so a reader never sees a later message of a batch
//! without an earlier one, nor anything a deposed writer wrote after its partition was claimed.
//! While a new owner seals the room (its `epoch` is written after `sent`) a reader waits briefly.

use std::collections::VecDeque;

use chatoy_protocol::Timestamp;
use scylla::response::PagingState;
use scylla::statement::prepared::PreparedStatement;
use uuid::Uuid;

use super::exec::{collect_rows, read_all, read_one, write, CqlError, CqlResult};
use super::CqlStore;
use crate::{Content, StoredMessage};

/// How often, and how long each time, a reader waits for a room's seal to complete.
const SEAL_WAIT_ROUNDS: u32 = 50;
const SEAL_WAIT_STEP: std::time::Duration = std::time::Duration::from_millis(20);
/// Rooms whose newest recorded bucket is remembered (the least recently used are forgotten).
pub(super) const MAX_REMEMBERED_ROOMS: usize = 100_000;

/// A `room_sequences` row as selected: `sent`, `epoch`, `WRITETIME(sent)`, `WRITETIME(epoch)`.
pub(super) type SequenceRow = (Option<i64>, Option<i64>, Option<i64>, Option<i64>);

/// A message row as selected (`sent, uuid, sender, content, modified`).
type MessageRow = (i64, Uuid, i64, String, Option<bool>);

fn message_from_row(
    room: u64,
    (sent, uuid, sender, content, modified): MessageRow,
) -> CqlResult<StoredMessage> {
    let content = Content::decode(&content)
        .map_err(|err| CqlError::Inconsistent(format!("message {uuid} has unreadable content: {err}")))?;
    Ok(StoredMessage {
        uuid,
        sender: sender as u64,
        room,
        content,
        sent: Timestamp(sent),
        modified: modified.unwrap_or(false),
    })
}

/// Converts a `limit` to the CQL `int` a `LIMIT ?` binds.
fn cql_limit(limit: usize) -> i32 {
    i32::try_from(limit).unwrap_or(i32::MAX)
}

/// Which end of a range of a room's messages to read from.
#[derive(Clone, Copy)]
enum Walk {
    NewestFirst,
    OldestFirst,
}

/// Walks the buckets a room has used, newest first, fetching the list page by page.
struct BucketWalk<'a> {
    store: &'a CqlStore,
    statement: &'a PreparedStatement,
    values: Vec<i64>,
    buffered: VecDeque<i64>,
    state: Option<PagingState>,
}

impl<'a> BucketWalk<'a> {
    /// The room's buckets `<= bucket`.
    fn at_most(store: &'a CqlStore, room: u64, bucket: i64) -> Self {
        Self::new(
            store,
            &store.statements.buckets_at_most,
            vec![room as i64, bucket],
        )
    }

    /// The room's buckets in `first..=last`, oldest first.
    fn between(store: &'a CqlStore, room: u64, first: i64, last: i64) -> Self {
        Self::new(
            store,
            &store.statements.buckets_between,
            vec![room as i64, first, last],
        )
    }

    fn new(store: &'a CqlStore, statement: &'a PreparedStatement, values: Vec<i64>) -> Self {
        BucketWalk {
            store,
            statement,
            values,
            buffered: VecDeque::new(),
            state: Some(PagingState::start()),
        }
    }

    /// The next bucket (older, or newer for [`BucketWalk::between`]), or `None` at the end. Empty pages
    /// are skipped: only the paging state ends the walk.
    async fn next(&mut self) -> CqlResult<Option<i64>> {
        loop {
            if let Some(bucket) = self.buffered.pop_front() {
                return Ok(Some(bucket));
            }
            let Some(state) = self.state.take() else {
                return Ok(None);
            };
            let (result, next) = self
                .store
                .session
                .execute_single_page(self.statement, &self.values, state)
                .await?;
            let mut page: Vec<(i64,)> = Vec::new();
            collect_rows(result, &mut page)?;
            self.buffered.extend(page.into_iter().map(|(bucket,)| bucket));
            self.state = match next.into_paging_control_flow() {
                std::ops::ControlFlow::Break(()) => None,
                std::ops::ControlFlow::Continue(more) => Some(more),
            };
        }
    }
}

impl CqlStore {
    pub(super) fn bucket(&self, sent: i64) -> i64 {
        sent.div_euclid(self.bucket_width)
    }

    /// Records that `bucket` of `room` may hold messages, before its first message is written.
    /// The newest recorded bucket per room is remembered so that the hot path writes the list
    /// once per bucket, not once per message; the write is an idempotent upsert either way.
    pub(super) async fn record_bucket(&self, room: u64, bucket: i64) -> CqlResult<()> {
        if self.recorded_buckets_get(room) == Some(bucket) {
            return Ok(());
        }
        write(
            &self.session,
            &self.statements.bucket_insert,
            (room as i64, bucket),
        )
        .await?;
        let mut recorded = self
            .recorded_buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let newest = recorded.get(&room).map_or(bucket, |&known| known.max(bucket));
        recorded.put(room, newest);
        Ok(())
    }

    fn recorded_buckets_get(&self, room: u64) -> Option<i64> {
        self.recorded_buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&room)
            .copied()
    }

    /// The message stored at `sent`, checked to be the one with `uuid`.
    pub(super) async fn message_at(
        &self,
        room: u64,
        bucket: i64,
        sent: i64,
        uuid: Uuid,
    ) -> CqlResult<Option<StoredMessage>> {
        let row: Option<MessageRow> = read_one(
            &self.session,
            &self.statements.message_at,
            (room as i64, bucket, sent),
        )
        .await?;
        match row {
            None => Ok(None),
            Some(row) if row.1 == uuid => message_from_row(room, row).map(Some),
            Some(row) => Err(CqlError::Inconsistent(format!(
                "room {room} holds message {} at sent {sent}, where {uuid} was claimed",
                row.1
            ))),
        }
    }

    /// The room's `room_sequences` row: `sent`, `epoch` and when each was written.
    pub(super) async fn sequence_of(&self, room: u64) -> CqlResult<Option<SequenceRow>> {
        read_one(&self.session, &self.statements.sequence_read, (room as i64,)).await
    }

    /// The newest `sent` readers may see in the room, `None` for unbounded (a room written
    /// before heads existed). A room being sealed by a new owner (`epoch` written after `sent`)
    /// is waited for, a little; past that its `sent` is used as it is (the sealing owner died).
    pub(super) async fn head(&self, room: u64) -> CqlResult<Option<i64>> {
        let mut waited = 0;
        loop {
            let Some((sent, _epoch, sent_written, epoch_written)) = self.sequence_of(room).await? else {
                // No fenced writer ever wrote this room: an older head, if any.
                let legacy: Option<(Option<i64>,)> =
                    read_one(&self.session, &self.statements.head_read, (room as i64,)).await?;
                return Ok(legacy.and_then(|(sent,)| sent));
            };
            let sealing = epoch_written > sent_written;
            if !sealing || waited >= SEAL_WAIT_ROUNDS {
                if sealing {
                    tracing::warn!(
                        room,
                        "a room's seal did not complete; reading up to its last head"
                    );
                }
                return Ok(Some(sent.unwrap_or(0)));
            }
            waited += 1;
            tokio::time::sleep(SEAL_WAIT_STEP).await;
        }
    }

    /// Up to `limit` messages with `sent < before` (and not past the head), newest first.
    pub(super) async fn history_of(
        &self,
        room: u64,
        before: i64,
        limit: usize,
    ) -> CqlResult<Vec<StoredMessage>> {
        let before = match self.head(room).await? {
            Some(head) => before.min(head.saturating_add(1)),
            None => before,
        };
        let buckets = BucketWalk::at_most(self, room, self.bucket(before));
        self.newest_first(room, buckets, &self.statements.messages_before, before, limit)
            .await
    }

    /// The newest `limit` messages with `sent > after` and not past the head, oldest first. A
    /// batch being written becomes visible at once, when its head is recorded: a reader never
    /// sees a later message of a batch without an earlier one.
    pub(super) async fn since_of(
        &self,
        room: u64,
        after: i64,
        limit: usize,
    ) -> CqlResult<Vec<StoredMessage>> {
        let mut messages = self.past(room, after, limit, Walk::NewestFirst).await?;
        messages.reverse();
        Ok(messages)
    }

    /// Up to `limit` messages newest first, reading `statement` (bound to room, bucket, `bound`
    /// and a row limit) bucket by bucket along `buckets`.
    async fn newest_first(
        &self,
        room: u64,
        mut buckets: BucketWalk<'_>,
        statement: &PreparedStatement,
        bound: i64,
        limit: usize,
    ) -> CqlResult<Vec<StoredMessage>> {
        let mut messages = Vec::new();
        if limit == 0 {
            return Ok(messages);
        }
        while messages.len() < limit {
            let Some(bucket) = buckets.next().await? else {
                break;
            };
            let want = cql_limit(limit - messages.len());
            let rows: Vec<MessageRow> =
                read_all(&self.session, statement, (room as i64, bucket, bound, want)).await?;
            for row in rows {
                messages.push(message_from_row(room, row)?);
            }
        }
        messages.truncate(limit);
        Ok(messages)
    }

    /// The newest `sent` of a room that no fenced writer has sealed yet: its old head if it has
    /// one, else its newest row.
    pub(super) async fn legacy_newest(&self, room: u64) -> CqlResult<Option<i64>> {
        let legacy: Option<(Option<i64>,)> =
            read_one(&self.session, &self.statements.head_read, (room as i64,)).await?;
        if let Some((Some(sent),)) = legacy {
            return Ok(Some(sent));
        }
        let mut buckets = BucketWalk::at_most(self, room, i64::MAX);
        while let Some(bucket) = buckets.next().await? {
            let newest: Option<(i64,)> =
                read_one(&self.session, &self.statements.newest_sent, (room as i64, bucket)).await?;
            if let Some((sent,)) = newest {
                return Ok(Some(sent));
            }
        }
        Ok(None)
    }

    /// See [`crate::Store::replay_start`]: walks the room's buckets newest first reading only
    /// `sent`, up to `limit + 1` of them.
    pub(super) async fn replay_start_of(&self, room: u64, after: i64, limit: usize) -> CqlResult<i64> {
        let head = self.head(room).await?.unwrap_or(i64::MAX);
        if head <= after {
            return Ok(after);
        }
        let mut buckets = BucketWalk::at_most(self, room, self.bucket(head));
        let floor = self.bucket(after);
        let mut seen = 0usize;
        while let Some(bucket) = buckets.next().await? {
            if bucket < floor {
                break;
            }
            let want = cql_limit(limit + 1 - seen);
            let sents: Vec<(i64,)> = read_all(
                &self.session,
                &self.statements.sents_between,
                (room as i64, bucket, after, head, want),
            )
            .await?;
            for (sent,) in sents {
                seen += 1;
                if seen > limit {
                    return Ok(sent);
                }
            }
        }
        Ok(after)
    }

    /// See [`crate::Store::page_after`]: walks the room's buckets oldest first from `after`'s,
    /// up to the head.
    pub(super) async fn page_after_of(
        &self,
        room: u64,
        after: i64,
        limit: usize,
    ) -> CqlResult<Vec<StoredMessage>> {
        self.past(room, after, limit, Walk::OldestFirst).await
    }

    /// Up to `limit` messages with `sent > after` and not past the head: the newest of them,
    /// newest first, or the oldest, oldest first.
    async fn past(&self, room: u64, after: i64, limit: usize, walk: Walk) -> CqlResult<Vec<StoredMessage>> {
        let head = self.head(room).await?.unwrap_or(i64::MAX);
        if limit == 0 || head <= after {
            return Ok(Vec::new());
        }
        let (buckets, statement) = match walk {
            Walk::NewestFirst => (
                BucketWalk::at_most(self, room, self.bucket(head)),
                &self.statements.messages_between,
            ),
            Walk::OldestFirst => (
                BucketWalk::between(self, room, self.bucket(after), self.bucket(head)),
                &self.statements.messages_after_ascending,
            ),
        };
        self.read_range(room, buckets, statement, (after, head), limit)
            .await
    }

    /// Up to `limit` messages with `after < sent <= head`, read bucket by bucket along `buckets`
    /// (in its order, down to or up from `after`'s bucket) with `statement` (bound to room,
    /// bucket, after, head and a row limit); within a bucket in the statement's order.
    async fn read_range(
        &self,
        room: u64,
        mut buckets: BucketWalk<'_>,
        statement: &PreparedStatement,
        (after, head): (i64, i64),
        limit: usize,
    ) -> CqlResult<Vec<StoredMessage>> {
        let mut messages = Vec::new();
        let floor = self.bucket(after);
        while messages.len() < limit {
            let Some(bucket) = buckets.next().await? else {
                break;
            };
            if bucket < floor {
                break;
            }
            let want = cql_limit(limit - messages.len());
            let rows: Vec<MessageRow> =
                read_all(&self.session, statement, (room as i64, bucket, after, head, want)).await?;
            for row in rows {
                messages.push(message_from_row(room, row)?);
            }
        }
        messages.truncate(limit);
        Ok(messages)
    }
}
