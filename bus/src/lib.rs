//! The bus: the only way gateways and routers talk to each other.
//!
//! Three kinds of traffic, the same whatever the transport:
//! - **work** (`msg.<room>`): a gateway submits a [`MsgRequest`] and waits, with a timeout, for
//!   the [`MsgReply`]. Rooms are split into partitions; each partition is consumed by exactly one
//!   router worker, in order, so one sequencer owns each room.
//! - **room events** (`room.<room>`): the router publishes each stored message once; every
//!   gateway with local members of the room subscribes.
//! - **user events** (`user.<user>`): the HTTP API tells gateways about joins and revoked tokens.
//!
//! Subscriptions report a [`Delivery::Gap`] when events may have been lost (a lagging
//! subscriber), so the gateway can make its clients resume from the store instead of silently
//! missing messages.

mod inproc;
mod nats;

use std::time::Duration;

use async_trait::async_trait;
use chatoy_protocol::bus::{MsgReply, MsgRequest, RoomEvent, UserEvent};
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::oneshot;

pub use inproc::InProcBus;
pub use nats::{NatsBus, NatsConfig};

/// A shared handle to whichever bus the process runs on.
pub type DynBus = std::sync::Arc<dyn Bus>;

/// What can go wrong on the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// No answer within the deadline; the request may or may not have been processed.
    #[error("no answer in time")]
    Timeout,
    /// The bus is closed or disconnected.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The processes sharing the bus disagree on its layout: retrying cannot help.
    #[error("bus misconfigured: {0}")]
    Misconfigured(String),
}

/// Gateways and routers meet only here.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Hands a message to its room's sequencer and returns the wait for its answer. Messages
    /// submitted one after the other (each `submit` awaited before the next) reach the
    /// sequencer in that order, so one socket's messages are stored in the order it sent them.
    async fn submit(&self, request: MsgRequest) -> Result<PendingReply, BusError>;
    /// Takes this process's share of the work: one source per partition it consumes.
    async fn work(&self) -> Result<Vec<Box<dyn WorkSource>>, BusError>;
    /// Publishes a stored message to the room's subscribers.
    async fn publish_room(&self, event: RoomEvent) -> Result<(), BusError>;
    /// Subscribes to a room's events; active once this returns.
    async fn subscribe_room(&self, room: u64) -> Result<Subscription<RoomEvent>, BusError>;
    /// Publishes an event about a user.
    async fn publish_user(&self, user: u64, event: UserEvent) -> Result<(), BusError>;
    /// Subscribes to every user's events, as `(user, event)`; active once this returns. User
    /// events are rare (joins, logouts), so each gateway takes them all and keeps those of its
    /// own users, instead of holding a subscription per user.
    async fn subscribe_users(&self) -> Result<Subscription<(u64, UserEvent)>, BusError>;
    /// Checks that the bus was laid out for this process's configuration (every gateway and
    /// router must use the same number of partitions): `Misconfigured` if not.
    async fn check_layout(&self) -> Result<(), BusError> {
        Ok(())
    }
    /// Answers if the bus is usable (readiness).
    fn is_ready(&self) -> bool;
    /// Times the connection to the bus was re-established after a loss (a metric).
    fn reconnects(&self) -> u64 {
        0
    }
}

/// The answer to a submitted message, still to come; the caller bounds the wait.
pub type PendingReply = futures_util::future::BoxFuture<'static, Result<MsgReply, BusError>>;

/// Waits for a pending answer at most `timeout`.
pub async fn wait_reply(pending: PendingReply, timeout: Duration) -> Result<MsgReply, BusError> {
    tokio::time::timeout(timeout, pending)
        .await
        .map_err(|_| BusError::Timeout)?
}

/// One partition of the work, consumed in order by one router worker.
#[async_trait]
pub trait WorkSource: Send {
    /// The partition (`chatoy_protocol::partition_of`) this source delivers.
    fn partition(&self) -> u32;
    /// Waits for at least one item, then moves up to `max` into `out`; false once the bus closed.
    /// Cancel-safe: an item is either in `out` or still in the source.
    async fn next_batch(&mut self, max: usize, out: &mut Vec<Work>) -> bool;
    /// Hands back what was received but not yet taken by [`WorkSource::next_batch`], to be
    /// delivered again (to whichever router owns the partition then): a router that lost its
    /// partition calls this so that it does not work on stale deliveries.
    async fn release(&mut self) {}
}

/// One message to sequence, with the way back to the gateway that waits for it.
pub struct Work {
    /// The message.
    pub request: MsgRequest,
    /// When the bus took the message in, if it knows (a metric: the time it waited).
    pub enqueued: Option<std::time::SystemTime>,
    responder: Responder,
}

enum Responder {
    InProc(oneshot::Sender<MsgReply>),
    Nats {
        client: async_nats::Client,
        /// Where the gateway waits for the answer.
        reply: Option<String>,
        /// The stream message, acknowledged once answered.
        message: Box<async_nats::jetstream::Message>,
    },
}

impl Work {
    /// Answers the waiting gateway and releases the message from the bus. Call only after the
    /// message is durably stored (or refused): an unanswered message is delivered again.
    pub async fn respond(self, reply: MsgReply) {
        match self.responder {
            // The gateway may have timed out and gone; then nobody waits, which is fine.
            Responder::InProc(tx) => {
                let _ = tx.send(reply);
            }
            Responder::Nats {
                client,
                reply: to,
                message,
            } => {
                if let Some(to) = to {
                    match serde_json::to_vec(&reply) {
                        Ok(payload) => {
                            if let Err(err) = client.publish(to, payload.into()).await {
                                tracing::warn!(cause = %err, "cannot publish an answer");
                            }
                        }
                        Err(err) => tracing::warn!(cause = %err, "cannot encode an answer"),
                    }
                }
                if let Err(err) = message.ack().await {
                    // Not acknowledged: it comes back and is answered again from the store.
                    tracing::warn!(cause = %err, "cannot acknowledge a stored message");
                }
            }
        }
    }
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Work")
            .field("request", &self.request)
            .finish_non_exhaustive()
    }
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery<T> {
    /// The next event.
    Event(T),
    /// Events may have been lost here; the subscriber must recover from the store.
    Gap,
}

/// A live subscription; dropping it unsubscribes.
pub struct Subscription<T> {
    stream: BoxStream<'static, Delivery<T>>,
}

impl<T> Subscription<T> {
    fn new(stream: BoxStream<'static, Delivery<T>>) -> Self {
        Subscription { stream }
    }

    /// The next delivery, or `None` once the bus closed the subscription.
    pub async fn next(&mut self) -> Option<Delivery<T>> {
        self.stream.next().await
    }

    /// The next delivery if one is ready now, without waiting; `None` when nothing is ready
    /// (or the subscription ended: the next [`Subscription::next`] says which).
    pub fn try_next(&mut self) -> Option<Delivery<T>> {
        self.stream.next().now_or_never().flatten()
    }
}
