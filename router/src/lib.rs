//! The router: the message pipeline between the bus and the store.
//!
//! Each bus partition is consumed by one worker, in order, so exactly one sequencer owns each
//! room. A worker takes whatever is pending (up to a batch), checks membership, assigns `sent`
//! (strictly increasing per room), stores the batch with one store call, and only then answers
//! each gateway and publishes each new message to its room, serialised once. Each published
//! event names the `sent` of the one published before it in the room, so a gateway notices a
//! message stored by a router that died before publishing it and reads it from the store.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use chatoy_bus::{DynBus, Work, WorkSource};
use chatoy_protocol::bus::{MsgReply, RoomEvent};
use chatoy_protocol::{Message, SendCode, ServerFrame, Timestamp};
use chatoy_store::{DynStore, InsertOutcome, NewMessage};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Router settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Most messages one worker stores with one store call.
    pub max_batch: usize,
    /// When other routers may take a partition over (cluster mode): a worker idle this long may
    /// have lost and regained its partition, so it re-reads each room's last `sent` from the
    /// store instead of trusting its memory. `None` when this process is the only router.
    pub ownership_timeout: Option<std::time::Duration>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            max_batch: 256,
            ownership_timeout: None,
        }
    }
}

/// Remembered memberships per worker before the cache is cleared.
const MEMBER_CACHE_LIMIT: usize = 100_000;

/// Starts one worker per partition this process consumes. Workers stop after `shutdown` once
/// the batch in hand is answered; wait for them on the returned tracker.
pub async fn start(
    bus: DynBus,
    store: DynStore,
    config: RouterConfig,
    shutdown: CancellationToken,
) -> Result<TaskTracker, chatoy_bus::BusError> {
    let sources = bus.work().await?;
    let tracker = TaskTracker::new();
    tracing::info!(partitions = sources.len(), "router consuming");
    for source in sources {
        let worker = Worker {
            bus: bus.clone(),
            store: store.clone(),
            max_batch: config.max_batch.max(1),
            ownership_timeout: config.ownership_timeout,
            rooms: HashMap::new(),
            members: HashSet::new(),
        };
        tracker.spawn(worker.run(source, shutdown.clone()));
    }
    tracker.close();
    Ok(tracker)
}

/// The sequencer of one partition's rooms.
struct Worker {
    bus: DynBus,
    store: DynStore,
    max_batch: usize,
    ownership_timeout: Option<std::time::Duration>,
    /// Per room: the sequence as this worker knows it; absent until read from the store.
    rooms: HashMap<u64, RoomSeq>,
    /// Known (room, user) memberships. Membership is never revoked, so positives stay true.
    members: HashSet<(u64, u64)>,
}

/// One room's sequence.
#[derive(Debug, Clone, Copy)]
struct RoomSeq {
    /// The last `sent` assigned (possibly to a message that turned out to be a duplicate).
    assigned: Timestamp,
    /// The `sent` of the last message stored: the next event's `prev`.
    stored: Timestamp,
}

/// A message of the batch that passed the checks and got its `sent`.
struct Sequenced {
    work: Work,
    sent: Timestamp,
}

impl Worker {
    async fn run(mut self, mut source: Box<dyn WorkSource>, shutdown: CancellationToken) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut last_batch = std::time::Instant::now();
        loop {
            let more = tokio::select! {
                more = source.next_batch(self.max_batch, &mut batch) => more,
                _ = shutdown.cancelled() => false,
            };
            if self
                .ownership_timeout
                .is_some_and(|timeout| last_batch.elapsed() >= timeout / 2)
            {
                // Another router may have sequenced these rooms meanwhile.
                self.rooms.clear();
            }
            last_batch = std::time::Instant::now();
            if !batch.is_empty() {
                self.process(&mut batch).await;
            }
            if !more {
                break;
            }
        }
    }

    async fn process(&mut self, batch: &mut Vec<Work>) {
        let now = Timestamp::now();
        let mut accepted: Vec<Sequenced> = Vec::with_capacity(batch.len());
        for work in batch.drain(..) {
            match self.check(&work).await {
                Ok(()) => {}
                Err(code) => {
                    work.respond(refusal(code, now)).await;
                    continue;
                }
            }
            let room = work.request.room;
            let seq = match self.sequence(room).await {
                Ok(seq) => seq,
                Err(()) => {
                    work.respond(refusal(SendCode::Unavailable, now)).await;
                    continue;
                }
            };
            let sent = Timestamp(now.0.max(seq.assigned.0.saturating_add(1)));
            seq.assigned = sent;
            accepted.push(Sequenced { work, sent });
        }
        if accepted.is_empty() {
            return;
        }
        let rows = accepted
            .iter()
            .map(|s| NewMessage {
                uuid: s.work.request.uuid,
                sender: s.work.request.sender,
                room: s.work.request.room,
                content: s.work.request.content.clone(),
                sent: s.sent,
            })
            .collect();
        let outcomes = match self.store.insert_messages(rows).await {
            Ok(outcomes) => outcomes,
            Err(err) => {
                tracing::warn!(cause = %err, messages = accepted.len(), "store write failed");
                for s in accepted {
                    // Part of the batch may be stored: read these rooms' sequences again.
                    self.rooms.remove(&s.work.request.room);
                    s.work.respond(refusal(SendCode::Unavailable, now)).await;
                }
                return;
            }
        };
        for (s, outcome) in accepted.into_iter().zip(outcomes) {
            self.finish(s, outcome).await;
        }
    }

    async fn check(&mut self, work: &Work) -> Result<(), SendCode> {
        let key = (work.request.room, work.request.sender);
        if self.members.contains(&key) {
            return Ok(());
        }
        match self.store.is_member(key.0, key.1).await {
            Ok(true) => {
                if self.members.len() >= MEMBER_CACHE_LIMIT {
                    self.members.clear();
                }
                self.members.insert(key);
                Ok(())
            }
            Ok(false) => Err(SendCode::NotMember),
            Err(err) => {
                tracing::warn!(cause = %err, "membership check failed");
                Err(SendCode::Unavailable)
            }
        }
    }

    /// The room's sequence: from memory, or from the store's last `sent` when this worker
    /// first sees the room (or may have lost it to another router meanwhile).
    async fn sequence(&mut self, room: u64) -> Result<&mut RoomSeq, ()> {
        if !self.rooms.contains_key(&room) {
            let last = match self.store.last_sent(room).await {
                Ok(last) => last.unwrap_or_default(),
                Err(err) => {
                    tracing::warn!(cause = %err, room, "cannot read the room's last sent");
                    return Err(());
                }
            };
            let seq = RoomSeq {
                assigned: last,
                stored: last,
            };
            self.rooms.insert(room, seq);
        }
        Ok(self.rooms.get_mut(&room).expect("inserted above"))
    }

    async fn finish(&mut self, s: Sequenced, outcome: InsertOutcome) {
        let request = &s.work.request;
        match outcome {
            InsertOutcome::Inserted => {
                let prev = self.rooms.get_mut(&request.room).map(|seq| {
                    let prev = seq.stored;
                    seq.stored = s.sent;
                    prev
                });
                let message = Message {
                    uuid: request.uuid.hyphenated().to_string(),
                    sender: request.sender,
                    room: request.room,
                    data: request.content.clone(),
                    sent: s.sent,
                    modified: false,
                };
                let event = RoomEvent {
                    room: request.room,
                    sent: s.sent,
                    prev,
                    origin: request.origin,
                    frame: Bytes::from(ServerFrame::Recv { data: message }.to_json()),
                };
                s.work
                    .respond(MsgReply {
                        code: SendCode::Ok,
                        msg: String::new(),
                        sent: s.sent,
                    })
                    .await;
                if let Err(err) = self.bus.publish_room(event).await {
                    // Stored and acked: members still get it through `since` and history.
                    tracing::warn!(cause = %err, "publishing a stored message failed");
                }
            }
            InsertOutcome::Duplicate(existing) => {
                let same = existing.sender == request.sender && existing.data == request.content;
                let origin = request.origin;
                if !same {
                    let reply = MsgReply {
                        code: SendCode::Invalid,
                        msg: "uuid already used for a different message".into(),
                        sent: Timestamp::now(),
                    };
                    s.work.respond(reply).await;
                    return;
                }
                s.work
                    .respond(MsgReply {
                        code: SendCode::Ok,
                        msg: String::new(),
                        sent: existing.sent,
                    })
                    .await;
                // A retry: the first attempt may have been stored by a router that died before
                // publishing it. Published again without a `prev`, it makes gateways that have
                // delivered anything older check the store; the rest drop it.
                let event = RoomEvent {
                    room: existing.room,
                    sent: existing.sent,
                    prev: None,
                    origin,
                    frame: Bytes::from(ServerFrame::Recv { data: existing }.to_json()),
                };
                if let Err(err) = self.bus.publish_room(event).await {
                    tracing::warn!(cause = %err, "publishing a retried message failed");
                }
            }
        }
    }
}

fn refusal(code: SendCode, at: Timestamp) -> MsgReply {
    MsgReply {
        code,
        msg: code.message().to_owned(),
        sent: at,
    }
}
