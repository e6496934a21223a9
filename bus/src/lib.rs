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

use std::time::Duration;

use async_trait::async_trait;
use chatoy_protocol::bus::{MsgReply, MsgRequest, RoomEvent, UserEvent};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio::sync::oneshot;

pub use inproc::InProcBus;

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
}

/// Gateways and routers meet only here.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Submits a message to its room's sequencer and waits up to `timeout` for the answer.
    async fn request(&self, request: MsgRequest, timeout: Duration) -> Result<MsgReply, BusError>;
    /// Takes this process's share of the work: one source per partition it consumes.
    async fn work(&self) -> Result<Vec<Box<dyn WorkSource>>, BusError>;
    /// Publishes a stored message to the room's subscribers.
    async fn publish_room(&self, event: RoomEvent) -> Result<(), BusError>;
    /// Subscribes to a room's events; active once this returns.
    async fn subscribe_room(&self, room: u64) -> Result<Subscription<RoomEvent>, BusError>;
    /// Publishes an event about a user.
    async fn publish_user(&self, user: u64, event: UserEvent) -> Result<(), BusError>;
    /// Subscribes to a user's events; active once this returns.
    async fn subscribe_user(&self, user: u64) -> Result<Subscription<UserEvent>, BusError>;
    /// Answers if the bus is usable (readiness).
    fn is_ready(&self) -> bool;
}

/// One partition of the work, consumed in order by one router worker.
#[async_trait]
pub trait WorkSource: Send {
    /// Waits for at least one item, then moves up to `max` into `out`; false once the bus closed.
    async fn next_batch(&mut self, max: usize, out: &mut Vec<Work>) -> bool;
}

/// One message to sequence, with the way back to the gateway that waits for it.
#[derive(Debug)]
pub struct Work {
    /// The message.
    pub request: MsgRequest,
    responder: Responder,
}

#[derive(Debug)]
enum Responder {
    InProc(oneshot::Sender<MsgReply>),
}

impl Work {
    /// Answers the waiting gateway. Call only after the message is durably stored (or refused).
    pub fn respond(self, reply: MsgReply) {
        match self.responder {
            // The gateway may have timed out and gone; then nobody waits, which is fine.
            Responder::InProc(tx) => {
                let _ = tx.send(reply);
            }
        }
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
}
