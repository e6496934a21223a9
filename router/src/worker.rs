//! One partition's worker: takes batches from the bus, asks the store what the sequencing core
//! needs, and submits each sequenced batch's write; its answerer (`answer.rs`, a task of its
//! own) answers and publishes the batches strictly in order as their writes complete. While
//! batch n is being written, batch n+1 is already sequenced.
//!
//! The partition is claimed in the store (a fence) before the first batch, and again after any
//! failed write: whatever a failed or fenced-off write left behind is settled by the new claim's
//! room seals, so the core starts again from what the store says.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Instant;

use chatoy_bus::{DynBus, Work, WorkSource};
use chatoy_protocol::bus::{MsgRequest, RoomEvent};
use chatoy_protocol::{Message, SendCode, Timestamp};
use chatoy_store::{DynStore, Fence, NewMessage, PendingWrite, RoomBatch, StoredMessage};
use futures_util::future::join_all;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::answer::{self, InFlight, Item, Progress};
use crate::core::{Decision, Sequencer};
use crate::metrics::Metrics;
use crate::RouterConfig;

/// See the module documentation.
pub(crate) struct Worker {
    store: DynStore,
    config: Arc<RouterConfig>,
    metrics: Metrics,
    source: Box<dyn WorkSource>,
    core: Sequencer,
    /// Known (room, user) memberships. Membership is never revoked, so positives stay true.
    members: lru::LruCache<(u64, u64), ()>,
    fence: Option<Fence>,
    /// Sequenced batches on their way to the answerer (bounded: the pipeline's depth).
    answers: mpsc::Sender<InFlight>,
    answerer: Option<tokio::task::JoinHandle<()>>,
    /// What the answerer reports: failed writes, batches not answered yet.
    progress: Arc<Progress>,
    /// Counts this worker's sequencing states: a failure of any batch of the current
    /// generation ends it (the core starts again, under a new claim).
    generation: u64,
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
        let progress = Arc::new(Progress::default());
        let (answers, queue) = mpsc::channel(config.pipeline.max(1));
        let answerer = tokio::spawn(answer::run(queue, bus, metrics.clone(), progress.clone()));
        Worker {
            core: Sequencer::new(config.remembered_uuids),
            members: lru::LruCache::new(members),
            store,
            config,
            metrics,
            source,
            fence: None,
            answers,
            answerer: Some(answerer),
            progress,
            generation: 1,
        }
    }

    /// Works until the bus closes or `shutdown`, then lets the answerer finish the batches in
    /// flight.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut batch = Vec::with_capacity(self.config.max_batch);
        loop {
            let more = tokio::select! {
                more = self.source.next_batch(self.config.max_batch, &mut batch) => more,
                _ = shutdown.cancelled() => false,
            };
            if !batch.is_empty() {
                self.after_progress().await;
                self.process(std::mem::take(&mut batch)).await;
            }
            if !more {
                break;
            }
        }
        let Worker {
            answers, answerer, ..
        } = self;
        drop(answers);
        if let Some(answerer) = answerer {
            let _ = answerer.await;
        }
    }

    /// Starts over if a write of this generation failed: the core forgets everything and the
    /// partition is claimed again before the next batch.
    async fn after_progress(&mut self) {
        let Some(deposed) = self.progress.since(self.generation) else {
            if self.progress.idle() {
                // Nothing is being written: forgetting rooms cannot lose a `sent` in flight.
                self.core.trim(self.config.remembered_rooms);
            }
            return;
        };
        self.generation += 1;
        self.fence = None;
        self.core.reset();
        if deposed {
            // Deliveries pulled before the partition moved are the new owner's now.
            self.source.release().await;
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
            self.refuse(batch, SendCode::Unavailable).await;
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
        let mut found: HashMap<(u64, Uuid), StoredMessage> = HashMap::new();
        let mut unanswered: Vec<u64> = Vec::new();
        for ((room, _), lookup) in unknown.iter().zip(lookups) {
            match lookup {
                Ok(messages) => {
                    self.core.learn(&messages);
                    for message in messages {
                        found.insert((message.room, message.uuid), message);
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
                        content: request.content.clone().into(),
                        sent,
                    };
                    let event = RoomEvent::new(sequenced(request, sent), Some(prev), request.origin);
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
                    .map(|message| RoomEvent::new(message.clone().into(), None, request.origin)),
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
        self.send(InFlight {
            generation: self.generation,
            write,
            items,
            submitted: Instant::now(),
        })
        .await;
    }

    /// Hands a batch to the answerer, waiting while the pipeline is full.
    async fn send(&mut self, batch: InFlight) {
        self.progress.handed_over();
        if let Err(mpsc::error::SendError(batch)) = self.answers.send(batch).await {
            // The answerer is gone (it only stops once this worker drops its sender).
            tracing::error!(messages = batch.items.len(), "the router's answerer stopped");
        }
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

    /// Answers a whole batch with `code`, behind the batches in flight.
    async fn refuse(&mut self, batch: Vec<Work>, code: SendCode) {
        let items = batch
            .into_iter()
            .map(|work| Item {
                work,
                decision: Decision::Refuse(code),
                event: None,
            })
            .collect();
        self.send(InFlight {
            generation: self.generation,
            write: None,
            items,
            submitted: Instant::now(),
        })
        .await;
    }
}

/// The message a request becomes once sequenced at `sent`, as readers will see it.
fn sequenced(request: &MsgRequest, sent: Timestamp) -> Message {
    Message {
        uuid: request.uuid.hyphenated().to_string(),
        sender: request.sender,
        room: request.room,
        data: request.content.clone(),
        sent,
        modified: false,
    }
}
