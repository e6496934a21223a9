//! A room's feed: its one bus subscription on this gateway, fanned out to the room's local
//! members. Each event is framed once; the same bytes are queued on every member socket but the
//! sender's. An event that does not follow the last one fanned out (a bus gap, a router that
//! died between storing and publishing) is preceded by what the store holds in between.

use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Instant;

use chatoy_bus::Delivery;
use chatoy_protocol::bus::{Origin, RoomEvent};
use chatoy_protocol::Timestamp;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::mailbox::{Outbound, Pushed, RecvKey};
use super::registry::{close_members, Member, Registry};
use super::wire::{self, CloseReason};

/// Most events of one room fanned out together.
const FAN_OUT_BATCH: usize = 256;

impl Registry {
    pub(crate) async fn room_feed(
        self: Arc<Self>,
        room: u64,
        members: Arc<Mutex<Vec<Arc<Member>>>>,
        ready: watch::Sender<bool>,
    ) {
        let mut subscription = match self.bus.subscribe_room(room).await {
            Ok(subscription) => subscription,
            Err(err) => {
                tracing::warn!(cause = %err, room, "cannot subscribe to room");
                close_members(&members, CloseReason::UNAVAILABLE);
                return;
            }
        };
        // Gap recovery before any event replays from a little before the subscription began
        // (sockets got anything older through `since`); clocks of routers may lag a little.
        let subscribed = Timestamp(Timestamp::now().0.saturating_sub(5_000_000_000));
        let mut last: Option<Timestamp> = None;
        let _ = ready.send(true);
        // Everything the bus has ready is fanned out together: each member's mailbox takes the
        // whole batch with one lock and one wake-up, so its writer sends it with one syscall.
        let mut batch = Vec::new();
        while let Some(mut delivery) = subscription.next().await {
            loop {
                match delivery {
                    Delivery::Event(event) => {
                        last = self.on_event(room, &members, last, event, &mut batch).await;
                    }
                    Delivery::Gap => {
                        self.metrics.bus_gaps.inc();
                        let from = last.unwrap_or(subscribed);
                        last = Some(self.recover(room, &members, from, None, &mut batch).await);
                    }
                }
                match subscription.try_next() {
                    Some(next) if batch.len() < FAN_OUT_BATCH => delivery = next,
                    Some(next) => {
                        self.fan_out(&members, &mut batch);
                        delivery = next;
                    }
                    None => break,
                }
            }
            self.fan_out(&members, &mut batch);
        }
    }

    /// Fans out one event of the room whose last fanned-out `sent` is `last`; returns the new
    /// last (still `None` if nothing was fanned out yet). One sequencer per room publishes in `sent` order, naming the previous message:
    /// anything not newer than `last` was already delivered (by gap recovery), and an event
    /// that does not follow `last` reveals a hole, filled from the store first.
    async fn on_event(
        &self,
        room: u64,
        members: &Mutex<Vec<Arc<Member>>>,
        last: Option<Timestamp>,
        event: RoomEvent,
        batch: &mut Vec<RoomEvent>,
    ) -> Option<Timestamp> {
        match (last, event.prev) {
            (Some(last), _) if event.sent <= last => Some(last),
            // A message published again (a retried uuid) that this feed cannot place: what its
            // sockets have came after it subscribed, or through `since`.
            (None, None) => None,
            (Some(last), prev) if prev != Some(last) => {
                self.metrics.bus_gaps.inc();
                Some(self.recover(room, members, last, Some(event), batch).await)
            }
            _ => {
                let sent = event.sent;
                batch.push(event);
                Some(sent)
            }
        }
    }

    /// After the bus may have lost events (reconnect, lagging subscriber, a router that died
    /// between storing and publishing), replays the room's stored messages newer than the last
    /// one fanned out — up to `event`, the one that revealed the hole, if there is one — then
    /// `event` itself if the store did not have it yet. If that cannot be done completely, the
    /// room's sockets are closed so their clients resume with `since`.
    async fn recover(
        &self,
        room: u64,
        members: &Mutex<Vec<Arc<Member>>>,
        last: Timestamp,
        event: Option<RoomEvent>,
        batch: &mut Vec<RoomEvent>,
    ) -> Timestamp {
        match self.store.since(room, last, self.recovery_limit).await {
            Ok(missed) if missed.len() < self.recovery_limit => {
                tracing::info!(
                    room,
                    replayed = missed.len(),
                    "recovered missed messages from the store"
                );
                // Up to the event that revealed the hole: what follows it comes live, with its
                // sending socket known.
                let upto = event.as_ref().map_or(Timestamp(i64::MAX), |event| event.sent);
                let mut newest = last;
                for message in missed.into_iter().take_while(|message| message.sent <= upto) {
                    newest = message.sent;
                    // The sending socket is known only for the event in hand; others get their
                    // own message back, which clients de-duplicate by uuid.
                    let origin = match &event {
                        Some(event) if event.sent == message.sent => event.origin,
                        _ => Origin { gateway: 0, conn: 0 },
                    };
                    batch.push(RoomEvent::new(message.into(), None, origin));
                }
                match event {
                    Some(event) if event.sent > newest && event.prev.is_some() => {
                        newest = event.sent;
                        batch.push(event);
                    }
                    _ => {}
                }
                newest
            }
            Ok(missed) => {
                tracing::warn!(
                    room,
                    missed = missed.len(),
                    "bus gap too large; closing the room's sockets"
                );
                close_members(members, CloseReason::SLOW_CONSUMER);
                missed.last().map_or(last, |message| message.sent)
            }
            Err(err) => {
                tracing::warn!(cause = %err, room, "cannot recover a bus gap; closing the room's sockets");
                close_members(members, CloseReason::UNAVAILABLE);
                last
            }
        }
    }

    /// Queues the batch's frames, in order, on every member socket but each frame's sender.
    fn fan_out(&self, members: &Mutex<Vec<Arc<Member>>>, batch: &mut Vec<RoomEvent>) {
        if batch.is_empty() {
            return;
        }
        let started = Instant::now();
        let frames: Vec<(Outbound, Origin)> = batch
            .drain(..)
            .map(|event| {
                let item = Outbound {
                    frame: wire::text(&event.frame),
                    recv: NonZeroU64::new(event.room).map(|room| RecvKey {
                        room,
                        sent: event.sent,
                    }),
                };
                (item, event.origin)
            })
            .collect();
        let mut delivered = 0;
        for member in members.lock().iter() {
            for socket in member.sockets.lock().iter() {
                let own = Origin {
                    gateway: self.gateway,
                    conn: socket.id,
                };
                let items = frames
                    .iter()
                    .filter(|(_, origin)| *origin != own)
                    .map(|(item, _)| item.clone());
                let (queued, pushed) = socket.mailbox.push_all(items, self.queue_bound);
                delivered += queued;
                if pushed == Pushed::Overflowed {
                    self.metrics.slow_consumers.inc();
                }
            }
        }
        self.metrics.out_recv.inc_by(delivered);
        self.metrics.fan_out.observe(started.elapsed().as_secs_f64());
    }
}
