//! One partition's worker: takes batches from the bus, asks the store what the sequencing core
//! needs, submits each sequenced batch, and answers and publishes batches strictly in order as
//! their writes complete. While batch n is being written, batch n+1 is already sequenced.
//!
//! The partition is claimed in the store (a fence) before the first batch, and again after any
//! failed write: whatever a failed or fenced-off write left behind is settled by the new claim's
//! room seals, so the core starts again from what the store says.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use chatoy_bus::{DynBus, Work, WorkSource};
use chatoy_protocol::bus::{MsgReply, Origin, RoomEvent};
use chatoy_protocol::{Message, SendCode, ServerFrame, Timestamp};
use chatoy_store::{DynStore, Fence, NewMessage, PendingWrite, RoomBatch, StoreError};
use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::core::{Decision, Sequencer};
use crate::metrics::Metrics;
use crate::RouterConfig;

/// A sequenced batch whose write is under way.
struct InFlight {
    /// The write; `None` when nothing of the batch needed writing.
    write: Option<PendingWrite>,
    /// Every message of the batch with what was decided, in order.
    items: Vec<Item>,
    submitted: Instant,
}

struct Item {
    work: Work,
    decision: Decision,
    /// The event to publish once written: a new message, or a stored one published again.
    event: Option<RoomEvent>,
}

/// What woke the worker.
enum Wake {
    Written(Result<(), StoreError>),
    Batch(bool),
    Shutdown,
}

/// See the module documentation.
pub(crate) struct Worker {
    bus: DynBus,
    store: DynStore,
    config: Arc<RouterConfig>,
    metrics: Metrics,
    source: Box<dyn WorkSource>,
    core: Sequencer,
    /// Known (room, user) memberships. Membership is never revoked, so positives stay true.
    members: lru::LruCache<(u64, u64), ()>,
    fence: Option<Fence>,
    in_flight: VecDeque<InFlight>,
}

impl Worker {
    pub(crate) fn new(
        bus: DynBus,
        store: DynStore,
        config: Arc<RouterConfig>,
        metrics: Metrics,
        source: Box<dyn WorkSource>,
    ) -> Worker {
        let members = NonZeroUsize::new(config.remembered_members.max(1)).unwrap_or(NonZeroUsize::MIN);
        Worker {
            core: Sequencer::new(config.remembered_uuids),
            members: lru::LruCache::new(members),
            bus,
            store,
            config,
            metrics,
            source,
            fence: None,
            in_flight: VecDeque::new(),
        }
    }

    /// Works until the bus closes or `shutdown`, then finishes the batches in flight.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut batch = Vec::with_capacity(self.config.max_batch);
        let mut closing = false;
        loop {
            if closing && self.in_flight.is_empty() {
                break;
            }
            let room_for_more = !closing && self.in_flight.len() < self.config.pipeline.max(1);
            let wake = {
                let front = self.in_flight.front_mut();
                tokio::select! {
                    biased;
                    written = written(front) => Wake::Written(written),
                    more = self.source.next_batch(self.config.max_batch, &mut batch), if room_for_more => Wake::Batch(more),
                    _ = shutdown.cancelled(), if !closing => Wake::Shutdown,
                }
            };
            match wake {
                Wake::Written(result) => self.complete(result).await,
                Wake::Batch(more) => {
                    if !batch.is_empty() {
                        self.process(std::mem::take(&mut batch)).await;
                    }
                    closing |= !more;
                }
                Wake::Shutdown => closing = true,
            }
        }
    }

    /// Sequences a batch and submits its write.
    async fn process(&mut self, batch: Vec<Work>) {
        let started = Instant::now();
        self.metrics.batch_size.observe(batch.len() as f64);
        let now = std::time::SystemTime::now();
        for work in &batch {
            if let Some(waited) = work.enqueued.and_then(|at| now.duration_since(at).ok()) {
                self.metrics.queue_wait.observe(waited.as_secs_f64());
            }
        }
        let Some(fence) = self.fence().await else {
            self.push_refused(batch, SendCode::Unavailable);
            return;
        };
        let refusals = self.check_members(&batch).await;
        let requests: Vec<_> = batch.iter().map(|work| &work.request).collect();
        // Rooms first: a room's seal must be done before its uuids are looked up.
        let rooms = self.core.unopened(&requests);
        let opened = join_all(rooms.iter().map(|&room| self.store.open_room(fence, room))).await;
        for (room, opened) in rooms.iter().zip(opened) {
            match opened {
                Ok(last) => self.core.open(*room, last),
                Err(err) => tracing::warn!(cause = %err, room, "cannot open a room"),
            }
        }
        let unknown = self.core.unknown(&requests);
        let lookups = join_all(
            unknown
                .iter()
                .map(|(room, uuids)| self.store.find_messages(*room, uuids)),
        )
        .await;
        let mut found: HashMap<(u64, Uuid), Message> = HashMap::new();
        let mut unanswered: Vec<u64> = Vec::new();
        for ((room, _), lookup) in unknown.iter().zip(lookups) {
            match lookup {
                Ok(messages) => {
                    self.core.learn(&messages);
                    for message in messages {
                        if let Ok(uuid) = Uuid::parse_str(&message.uuid) {
                            found.insert((message.room, uuid), message);
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(cause = %err, room, "cannot look uuids up");
                    unanswered.push(*room);
                }
            }
        }
        let decisions = self.core.sequence(&requests, Timestamp::now(), |request| {
            if unanswered.contains(&request.room) {
                return Some(SendCode::Unavailable);
            }
            refusals.get(&(request.room, request.sender)).copied()
        });
        let mut rooms: Vec<RoomBatch> = Vec::new();
        let mut items = Vec::with_capacity(batch.len());
        for (work, decision) in batch.into_iter().zip(decisions) {
            let request = &work.request;
            let event = match decision {
                Decision::Store { sent, prev } => {
                    let message = NewMessage {
                        uuid: request.uuid,
                        sender: request.sender,
                        room: request.room,
                        content: request.content.clone(),
                        sent,
                    };
                    let event = event(stored_message(&message), Some(prev), request.origin);
                    match rooms.iter_mut().find(|batch| batch.room == request.room) {
                        Some(batch) => batch.messages.push(message),
                        None => rooms.push(RoomBatch {
                            room: request.room,
                            messages: vec![message],
                        }),
                    }
                    Some(event)
                }
                // Stored by another router, which may have died before publishing it: published
                // again without a `prev`, it makes gateways that lack it check the store.
                Decision::Duplicate { republish: true, .. } => found
                    .get(&(request.room, request.uuid))
                    .map(|message| event(message.clone(), None, request.origin)),
                Decision::Duplicate { .. } | Decision::Refuse(_) => None,
            };
            items.push(Item {
                work,
                decision,
                event,
            });
        }
        let write = if rooms.is_empty() {
            None
        } else {
            match self.store.submit(fence, rooms).await {
                Ok(pending) => Some(pending),
                Err(err) => Some(Box::pin(async move { Err(err) }) as PendingWrite),
            }
        };
        self.metrics.sequencing.observe(started.elapsed().as_secs_f64());
        self.in_flight.push_back(InFlight {
            write,
            items,
            submitted: Instant::now(),
        });
    }

    /// The partition's fence, claimed first if this worker holds none.
    async fn fence(&mut self) -> Option<Fence> {
        if self.fence.is_none() {
            match self.store.claim(self.source.partition(), &self.config.name).await {
                Ok(fence) => {
                    tracing::info!(
                        partition = fence.partition,
                        epoch = fence.epoch,
                        "claimed partition"
                    );
                    self.metrics.claims.inc();
                    self.core.reset();
                    self.fence = Some(fence);
                }
                Err(err) => {
                    tracing::warn!(cause = %err, partition = self.source.partition(), "cannot claim partition");
                }
            }
        }
        self.fence
    }

    /// Refusal codes by (room, sender) for senders that are not members (2) or whose membership
    /// the store could not tell (5); members are remembered.
    async fn check_members(&mut self, batch: &[Work]) -> HashMap<(u64, u64), SendCode> {
        let mut asked: Vec<(u64, u64)> = batch
            .iter()
            .map(|work| (work.request.room, work.request.sender))
            .filter(|key| self.members.get(key).is_none())
            .collect();
        asked.sort_unstable();
        asked.dedup();
        let answers = join_all(asked.iter().map(|&(room, user)| self.store.is_member(room, user))).await;
        let mut refusals = HashMap::new();
        for (key, answer) in asked.into_iter().zip(answers) {
            match answer {
                Ok(true) => {
                    self.members.put(key, ());
                }
                Ok(false) => {
                    refusals.insert(key, SendCode::NotMember);
                }
                Err(err) => {
                    tracing::warn!(cause = %err, "membership check failed");
                    refusals.insert(key, SendCode::Unavailable);
                }
            }
        }
        refusals
    }

    /// Queues a batch that is refused as a whole, behind the batches in flight.
    fn push_refused(&mut self, batch: Vec<Work>, code: SendCode) {
        let items = batch
            .into_iter()
            .map(|work| Item {
                work,
                decision: Decision::Refuse(code),
                event: None,
            })
            .collect();
        self.in_flight.push_back(InFlight {
            write: None,
            items,
            submitted: Instant::now(),
        });
    }

    /// Answers the oldest batch in flight once its write completed: on success every answer and
    /// event, in order; on failure code 5 for it and every later batch in flight (their outcome
    /// is unknown too), and the partition is claimed again before the next batch.
    async fn complete(&mut self, result: Result<(), StoreError>) {
        let Some(done) = self.in_flight.pop_front() else {
            return;
        };
        if done.write.is_some() {
            self.metrics.store.observe(done.submitted.elapsed().as_secs_f64());
        }
        match result {
            Ok(()) => {
                let started = Instant::now();
                if done.write.is_some() {
                    self.metrics.batches.inc();
                }
                for item in done.items {
                    self.answer(item, false).await;
                }
                self.metrics.reply.observe(started.elapsed().as_secs_f64());
                if self.in_flight.is_empty() {
                    self.core.trim(self.config.remembered_rooms);
                }
            }
            Err(err) => {
                let deposed = matches!(err, StoreError::Deposed);
                if deposed {
                    tracing::warn!(
                        partition = self.source.partition(),
                        "deposed: another router claimed the partition"
                    );
                    self.metrics.deposed.inc();
                } else {
                    tracing::warn!(cause = %err, "store write failed");
                    self.metrics.store_errors.inc();
                }
                let failed = std::iter::once(done).chain(self.in_flight.drain(..));
                for batch in failed.collect::<Vec<_>>() {
                    for item in batch.items {
                        self.answer(item, true).await;
                    }
                }
                self.fence = None;
                self.core.reset();
                if deposed {
                    // Deliveries pulled before the partition moved are the new owner's now.
                    self.source.release().await;
                }
            }
        }
    }

    /// Answers one message; `failed` when its batch's write did not complete.
    async fn answer(&mut self, item: Item, failed: bool) {
        let Item {
            work,
            decision,
            event,
        } = item;
        let (reply, event) = match decision {
            Decision::Refuse(code) => (refusal(code), None),
            _ if failed => (refusal(SendCode::Unavailable), None),
            Decision::Store { sent, .. } => (accepted(sent), event),
            Decision::Duplicate { sent, .. } => (accepted(sent), event),
        };
        match reply.code {
            SendCode::Ok if matches!(decision, Decision::Store { .. }) => self.metrics.stored.inc(),
            SendCode::Ok => self.metrics.duplicates.inc(),
            SendCode::Unavailable => self.metrics.unavailable.inc(),
            _ => self.metrics.refused.inc(),
        }
        work.respond(reply).await;
        if let Some(event) = event {
            if let Err(err) = self.bus.publish_room(event).await {
                // Stored and acked: members still get it through `since` and history.
                tracing::warn!(cause = %err, "publishing a stored message failed");
            }
        }
    }
}

/// The completion of the oldest write in flight; pending forever when there is none.
async fn written(front: Option<&mut InFlight>) -> Result<(), StoreError> {
    match front {
        Some(InFlight {
            write: Some(write), ..
        }) => write.await,
        Some(InFlight { write: None, .. }) => Ok(()),
        None => std::future::pending().await,
    }
}

fn stored_message(message: &NewMessage) -> Message {
    Message {
        uuid: message.uuid.hyphenated().to_string(),
        sender: message.sender,
        room: message.room,
        data: message.content.clone(),
        sent: message.sent,
        modified: false,
    }
}

/// A room event with its `recv` frame, serialised once here for every gateway and socket.
fn event(message: Message, prev: Option<Timestamp>, origin: Origin) -> RoomEvent {
    RoomEvent {
        room: message.room,
        sent: message.sent,
        prev,
        origin,
        frame: Bytes::from(ServerFrame::Recv { data: message }.to_json()),
    }
}

fn accepted(sent: Timestamp) -> MsgReply {
    MsgReply {
        code: SendCode::Ok,
        msg: String::new(),
        sent,
    }
}

fn refusal(code: SendCode) -> MsgReply {
    MsgReply {
        code,
        msg: code.message().to_owned(),
        sent: Timestamp::now(),
    }
}
