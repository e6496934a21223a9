//! The router: the message pipeline between the bus and the store.
//!
//! Each bus partition is consumed by one worker, in order, so exactly one sequencer owns each
//! room. A worker takes whatever is pending (up to a batch), checks membership, assigns `sent`
//! (strictly increasing per room), stores the batch with one store call, and only then answers
//! each gateway and publishes each new message to its room, serialised once.

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
            last_sent: HashMap::new(),
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
    /// The last `sent` assigned per room; absent until first read from the store.
    last_sent: HashMap<u64, Timestamp>,
    /// Known (room, user) memberships. Membership is never revoked, so positives stay true.
    members: HashSet<(u64, u64)>,
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
                self.last_sent.clear();
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
            let last = match self.last_sent(room).await {
                Ok(last) => last,
                Err(()) => {
                    work.respond(refusal(SendCode::Unavailable, now)).await;
                    continue;
                }
            };
            let sent = Timestamp(now.0.max(last.0.saturating_add(1)));
            self.last_sent.insert(room, sent);
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

    /// The last `sent` of the room: from memory, or from the store when this worker first sees it.
    async fn last_sent(&mut self, room: u64) -> Result<Timestamp, ()> {
        if let Some(last) = self.last_sent.get(&room) {
            return Ok(*last);
        }
        match self.store.last_sent(room).await {
            Ok(last) => Ok(last.unwrap_or_default()),
            Err(err) => {
                tracing::warn!(cause = %err, room, "cannot read the room's last sent");
                Err(())
            }
        }
    }

    async fn finish(&mut self, s: Sequenced, outcome: InsertOutcome) {
        let request = &s.work.request;
        match outcome {
            InsertOutcome::Inserted => {
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
                let reply = if same {
                    MsgReply {
                        code: SendCode::Ok,
                        msg: String::new(),
                        sent: existing.sent,
                    }
                } else {
                    MsgReply {
                        code: SendCode::Invalid,
                        msg: "uuid already used for a different message".into(),
                        sent: Timestamp::now(),
                    }
                };
                s.work.respond(reply).await;
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
