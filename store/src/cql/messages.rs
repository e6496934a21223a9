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
//! An insert first claims `(room_id, uuid)` in `message_ids` with `INSERT … IF NOT EXISTS`, so
//! of several concurrent inserts of one uuid exactly one wins; the winner records the bucket and
//! writes the row. A loser reads the winner's row back (at the claimed `sent`) and reports it as
//! the duplicate.
//!
//! Repair: if the claimed row is missing, its writer died between the claim and the row (or is
//! still between them). By idempotency the request in hand is the same message, so the loser
//! writes the row itself from the claim (`sent`, `sender`) and its own content, with
//! `IF NOT EXISTS` so that it never overwrites a row the original writer got in first. It does
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

    /// The room's buckets `>= bucket`.
    fn at_least(store: &'a CqlStore, room: u64, bucket: i64) -> Self {
        Self::new(store, &store.statements.buckets_at_least, (room as i64, bucket))
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
            let bucket = self.bucket(message.sent.0);
            self.record_bucket(message.room, bucket).await?;
            write(
                &self.session,
                &self.statements.message_insert,
                (room, bucket, message.sent.0, message.uuid, sender, content),
            )
            .await?;
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
        // The claim has no row: its writer died, or is still between its two writes. Repair it
        // (see the module documentation); in the second case both write the same message.
        tracing::info!(
            room = message.room,
            uuid = %message.uuid,
            sent,
            "writing the row of a claimed message that has none"
        );
        self.record_bucket(message.room, bucket).await?;
        let repaired = lwt(
            &self.session,
            &self.statements.message_repair,
            (room, bucket, sent, message.uuid, sender, content),
        )
        .await?;
        if repaired.applied {
            return Ok(InsertOutcome::Duplicate(as_claimed));
        }
        match self.message_at(message.room, bucket, sent, message.uuid).await? {
            Some(existing) => Ok(InsertOutcome::Duplicate(existing)),
            None => Err(CqlError::Inconsistent(format!(
                "message {} at sent {sent} is neither stored nor writable",
                message.uuid
            ))),
        }
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

    /// Up to `limit` messages with `sent < before`, newest first.
    pub(super) async fn history_of(&self, room: u64, before: i64, limit: usize) -> CqlResult<Vec<Message>> {
        let buckets = BucketWalk::at_most(self, room, self.bucket(before));
        self.newest_first(room, buckets, &self.statements.messages_before, before, limit)
            .await
    }

    /// The newest `limit` messages with `sent > after`, oldest first.
    pub(super) async fn since_of(&self, room: u64, after: i64, limit: usize) -> CqlResult<Vec<Message>> {
        let buckets = BucketWalk::at_least(self, room, self.bucket(after));
        let mut messages = self
            .newest_first(room, buckets, &self.statements.messages_after, after, limit)
            .await?;
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
