//! Messages: idempotent inserts, and reads that walk a room's time buckets.
//!
//! A message lives in `messages ((room_id, bucket), sent …)` with `bucket = sent div width`.
//! `message_buckets ((room_id), bucket)` lists the buckets a room has used, newest first, so
//! reads visit only buckets that may hold messages: `history` walks them backwards from
//! `bucket(before)`, `since` from the newest one down to `bucket(after)`, and both stop at the
//! room's first bucket because the list ends there. A room that never had a message (or does
//! not exist) has no buckets, so its reads are empty. A listed bucket without messages (its
//! writer died after recording it) is just skipped.
//!
//! A batch's messages are written concurrently; `room_heads` then records, per room, the newest
//! `sent` up to which everything is stored, and reads stop at the head. So `since` (the resume
//! seam, a gateway's gap recovery) never sees a later message of a batch without an earlier one,
//! which would make the reader skip the earlier one for good.
//!
//! An insert first claims `(room_id, uuid)` in `message_ids` with `INSERT … IF NOT EXISTS`, so
//! of several concurrent inserts of one uuid exactly one wins; the winner records the bucket and
//! writes the row. A loser reads the winner's row back (at the claimed `sent`) and reports it as
//! the duplicate.
//!
//! Repair: if the claimed row is missing, its writer is between the claim and the row, or died
//! there (the message was never acknowledged: the answer follows both writes). The loser waits
//! up to two seconds for the row; if the claim is younger than five seconds (`WRITETIME`) it
//! gives up with an error (code 5: the client retries), else the writer is dead. By idempotency
//! the request
//! in hand is the same message, so the loser moves the claim to the `sent` its router gives the
//! message now (`UPDATE … IF sent = <claimed>`), deletes any half-written row at the old `sent`
//! and writes the row at the new one: the message is stored as new, after everything already
//! delivered in the room, instead of back-dated among messages members already have. It does
//! so only when the senders agree: another user's content is never stored under a claim, and
//! such a request gets back a duplicate carrying the claim's sender, which callers refuse.

use std::collections::{HashMap, VecDeque};

use chatoy_protocol::{Message, MessageContent, Timestamp};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use scylla::response::PagingState;
use scylla::statement::prepared::PreparedStatement;
use uuid::Uuid;

use super::exec::{collect_rows, lwt, read_all, read_one, write, CqlError, CqlResult};
use super::CqlStore;
use crate::{InsertOutcome, NewMessage};

/// How long an insert that finds a claim without its row waits for the row to appear.
const ROW_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// A claim without its row that was written at least this long ago (microseconds) belongs to
/// a writer that died; a younger one may belong to a writer still between its two writes.
const CLAIM_TAKEOVER_AGE_MICROS: i64 = 5_000_000;

/// How many messages of one batch are written concurrently.
const INSERT_CONCURRENCY: usize = 64;
/// Rooms whose newest recorded bucket is remembered; the memo is cleared beyond this.
const MAX_REMEMBERED_ROOMS: usize = 100_000;

/// A message row as selected (`sent, uuid, sender, content, modified`).
type MessageRow = (i64, Uuid, i64, String, Option<bool>);

fn message_from_row(room: u64, (sent, uuid, sender, content, modified): MessageRow) -> CqlResult<Message> {
    let data: MessageContent = serde_json::from_str(&content)
        .map_err(|err| CqlError::Inconsistent(format!("message {uuid} has unreadable content: {err}")))?;
    Ok(Message {
        uuid: uuid.hyphenated().to_string(),
        sender: sender as u64,
        room,
        data,
        sent: Timestamp(sent),
        modified: modified.unwrap_or(false),
    })
}

/// Converts a `limit` to the CQL `int` a `LIMIT ?` binds.
fn cql_limit(limit: usize) -> i32 {
    i32::try_from(limit).unwrap_or(i32::MAX)
}

/// Walks the buckets a room has used, newest first, fetching the list page by page.
struct BucketWalk<'a> {
    store: &'a CqlStore,
    statement: &'a PreparedStatement,
    values: (i64, i64),
    buffered: VecDeque<i64>,
    state: Option<PagingState>,
}

impl<'a> BucketWalk<'a> {
    /// The room's buckets `<= bucket`.
    fn at_most(store: &'a CqlStore, room: u64, bucket: i64) -> Self {
        Self::new(store, &store.statements.buckets_at_most, (room as i64, bucket))
    }

    fn new(store: &'a CqlStore, statement: &'a PreparedStatement, values: (i64, i64)) -> Self {
        BucketWalk {
            store,
            statement,
            values,
            buffered: VecDeque::new(),
            state: Some(PagingState::start()),
        }
    }

    /// The next older bucket, or `None` once the room's first bucket was passed. Empty pages
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
                .execute_single_page(self.statement, self.values, state)
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
    fn bucket(&self, sent: i64) -> i64 {
        sent.div_euclid(self.bucket_width)
    }

    /// Records that `bucket` of `room` may hold messages, before its first message is written.
    /// The newest recorded bucket per room is remembered so that the hot path writes the list
    /// once per bucket, not once per message; the write is an idempotent upsert either way.
    async fn record_bucket(&self, room: u64, bucket: i64) -> CqlResult<()> {
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
        if recorded.len() >= MAX_REMEMBERED_ROOMS {
            recorded.clear();
        }
        let newest = recorded.entry(room).or_insert(bucket);
        *newest = (*newest).max(bucket);
        Ok(())
    }

    fn recorded_buckets_get(&self, room: u64) -> Option<i64> {
        self.recorded_buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&room)
            .copied()
    }

    /// Stores a batch: distinct (room, uuid) pairs concurrently, repeats within the batch as
    /// duplicates of their first occurrence; one outcome per input, in input order.
    pub(super) async fn insert_batch(&self, batch: Vec<NewMessage>) -> CqlResult<Vec<InsertOutcome>> {
        let mut first_of: HashMap<(u64, Uuid), usize> = HashMap::with_capacity(batch.len());
        let mut leader = Vec::with_capacity(batch.len());
        for (index, message) in batch.iter().enumerate() {
            leader.push(*first_of.entry((message.room, message.uuid)).or_insert(index));
        }
        let firsts: Vec<usize> = (0..batch.len())
            .filter(|index| leader[*index] == *index)
            .collect();
        let inserts: Vec<_> = firsts
            .iter()
            .map(|index| self.insert_one(&batch[*index]))
            .collect();
        let outcomes: Vec<InsertOutcome> = stream::iter(inserts)
            .buffered(INSERT_CONCURRENCY)
            .try_collect()
            .await?;
        // The whole batch is stored: make it visible to readers, room by room.
        let mut heads: HashMap<u64, i64> = HashMap::new();
        for (index, outcome) in firsts.iter().zip(&outcomes) {
            if matches!(outcome, InsertOutcome::Inserted) {
                let message = &batch[*index];
                let head = heads.entry(message.room).or_insert(message.sent.0);
                *head = (*head).max(message.sent.0);
            }
        }
        let advances: Vec<_> = heads
            .into_iter()
            .map(|(room, sent)| self.advance_head(room, sent))
            .collect();
        stream::iter(advances)
            .buffer_unordered(INSERT_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        let by_first: HashMap<usize, InsertOutcome> = firsts.into_iter().zip(outcomes).collect();
        let mut result = Vec::with_capacity(batch.len());
        for (index, message) in batch.iter().enumerate() {
            let first = leader[index];
            let outcome = match by_first.get(&first) {
                Some(outcome) if first == index => outcome.clone(),
                Some(InsertOutcome::Duplicate(existing)) => InsertOutcome::Duplicate(existing.clone()),
                Some(InsertOutcome::Inserted) => {
                    InsertOutcome::Duplicate(new_message_as_stored(&batch[first]))
                }
                None => {
                    return Err(CqlError::Inconsistent(format!(
                        "no outcome for message {} of the batch",
                        message.uuid
                    )))
                }
            };
            result.push(outcome);
        }
        Ok(result)
    }

    async fn insert_one(&self, message: &NewMessage) -> CqlResult<InsertOutcome> {
        let room = message.room as i64;
        let sender = message.sender as i64;
        let content = serde_json::to_string(&message.content)
            .map_err(|err| CqlError::Inconsistent(format!("cannot encode message content: {err}")))?;
        let claim = lwt(
            &self.session,
            &self.statements.message_claim,
            (room, message.uuid, message.sent.0, sender),
        )
        .await?;
        if claim.applied {
            self.write_row(message, content).await?;
            return Ok(InsertOutcome::Inserted);
        }
        // The uuid is taken: find where its row lives, from the refused claim if the database
        // returned the current row with it, else with a serial read.
        let (sent, claimed_sender) = match (claim.bigint("sent"), claim.bigint("sender")) {
            (Some(sent), Some(sender)) => (sent, sender),
            _ => {
                let row: Option<(i64, i64)> = read_one(
                    &self.session,
                    &self.statements.message_claim_read,
                    (room, message.uuid),
                )
                .await?;
                row.ok_or_else(|| {
                    CqlError::Inconsistent(format!(
                        "message {} refused its claim but the claim does not exist",
                        message.uuid
                    ))
                })?
            }
        };
        let bucket = self.bucket(sent);
        if let Some(existing) = self.message_at(message.room, bucket, sent, message.uuid).await? {
            return Ok(InsertOutcome::Duplicate(existing));
        }
        let as_claimed = Message {
            uuid: message.uuid.hyphenated().to_string(),
            sender: claimed_sender as u64,
            room: message.room,
            data: message.content.clone(),
            sent: Timestamp(sent),
            modified: false,
        };
        if claimed_sender != sender {
            // Not the same message after all: report the claim, write nothing.
            return Ok(InsertOutcome::Duplicate(as_claimed));
        }
        // The claim has no row. Its writer may still be between its two writes: give it time.
        let waiting = std::time::Instant::now();
        while waiting.elapsed() < ROW_WAIT {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if let Some(existing) = self.message_at(message.room, bucket, sent, message.uuid).await? {
                return Ok(InsertOutcome::Duplicate(existing));
            }
        }
        // Only a claim written long enough ago is orphaned; a younger one may still get its row
        // (the caller answers code 5, and the client's retry comes back later).
        let claimed: Option<(i64, Option<i64>)> = read_one(
            &self.session,
            &self.statements.message_claim_age,
            (room, message.uuid),
        )
        .await?;
        let written_micros = match claimed {
            Some((now_sent, written)) if now_sent == sent => written.unwrap_or(0),
            _ => {
                return Err(CqlError::Inconsistent(format!(
                    "the claim of message {} changed while it was being checked",
                    message.uuid
                )))
            }
        };
        let now_micros = Timestamp::now().0 / 1_000;
        if now_micros.saturating_sub(written_micros) < CLAIM_TAKEOVER_AGE_MICROS {
            return Err(CqlError::Inconsistent(format!(
                "message {} is claimed but not stored yet",
                message.uuid
            )));
        }
        // The claim has no row: its writer died between its two writes, and never acknowledged
        // the message. Take the claim over at the `sent` the router gives the message now, so
        // that it is stored (and delivered) after everything already delivered in the room.
        tracing::info!(
            room = message.room,
            uuid = %message.uuid,
            claimed = sent,
            sent = message.sent.0,
            "storing a message whose claim has no row"
        );
        let moved = lwt(
            &self.session,
            &self.statements.message_reclaim,
            (message.sent.0, sender, room, message.uuid, sent),
        )
        .await?;
        if !moved.applied {
            return Err(CqlError::Inconsistent(format!(
                "the claim of message {} changed while it was being repaired",
                message.uuid
            )));
        }
        // A row its writer may have half written at the old `sent` must not come back.
        write(
            &self.session,
            &self.statements.message_delete,
            (room, bucket, sent),
        )
        .await?;
        self.write_row(message, content).await?;
        Ok(InsertOutcome::Inserted)
    }

    /// Writes the row of a claimed message at its `sent`, after recording its bucket.
    async fn write_row(&self, message: &NewMessage, content: String) -> CqlResult<()> {
        let bucket = self.bucket(message.sent.0);
        self.record_bucket(message.room, bucket).await?;
        write(
            &self.session,
            &self.statements.message_insert,
            (
                message.room as i64,
                bucket,
                message.sent.0,
                message.uuid,
                message.sender as i64,
                content,
            ),
        )
        .await
    }

    /// The message stored at `sent`, checked to be the one with `uuid`.
    async fn message_at(&self, room: u64, bucket: i64, sent: i64, uuid: Uuid) -> CqlResult<Option<Message>> {
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

    /// The room's head: the newest `sent` up to which every message is completely stored, or
    /// `None` for a room that has none recorded (created before heads existed: unbounded).
    async fn head(&self, room: u64) -> CqlResult<Option<i64>> {
        let head: Option<(Option<i64>,)> =
            read_one(&self.session, &self.statements.head_read, (room as i64,)).await?;
        Ok(head.and_then(|(sent,)| sent))
    }

    /// Records that every message of `room` up to `sent` is stored (after a batch). Written by
    /// the room's one sequencer, so it only grows.
    pub(super) async fn advance_head(&self, room: u64, sent: i64) -> CqlResult<()> {
        write(&self.session, &self.statements.head_write, (sent, room as i64)).await
    }

    /// Up to `limit` messages with `sent < before` (and not past the head), newest first.
    pub(super) async fn history_of(&self, room: u64, before: i64, limit: usize) -> CqlResult<Vec<Message>> {
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
    pub(super) async fn since_of(&self, room: u64, after: i64, limit: usize) -> CqlResult<Vec<Message>> {
        let head = self.head(room).await?.unwrap_or(i64::MAX);
        let mut messages = Vec::new();
        if limit == 0 || head <= after {
            return Ok(messages);
        }
        let mut buckets = BucketWalk::at_most(self, room, self.bucket(head));
        let floor = self.bucket(after);
        while messages.len() < limit {
            let Some(bucket) = buckets.next().await? else {
                break;
            };
            if bucket < floor {
                break;
            }
            let want = cql_limit(limit - messages.len());
            let rows: Vec<MessageRow> = read_all(
                &self.session,
                &self.statements.messages_between,
                (room as i64, bucket, after, head, want),
            )
            .await?;
            for row in rows {
                messages.push(message_from_row(room, row)?);
            }
        }
        messages.truncate(limit);
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
    ) -> CqlResult<Vec<Message>> {
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

    /// The newest `sent` of the room: the first row of the newest bucket that has one.
    pub(super) async fn last_sent_of(&self, room: u64) -> CqlResult<Option<Timestamp>> {
        let mut buckets = BucketWalk::at_most(self, room, i64::MAX);
        while let Some(bucket) = buckets.next().await? {
            let newest: Option<(i64,)> =
                read_one(&self.session, &self.statements.newest_sent, (room as i64, bucket)).await?;
            if let Some((sent,)) = newest {
                return Ok(Some(Timestamp(sent)));
            }
        }
        Ok(None)
    }
}

/// What a freshly inserted message looks like when read back.
fn new_message_as_stored(message: &NewMessage) -> Message {
    Message {
        uuid: message.uuid.hyphenated().to_string(),
        sender: message.sender,
        room: message.room,
        data: message.content.clone(),
        sent: message.sent,
        modified: false,
    }
}
