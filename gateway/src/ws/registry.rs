//! Which local sockets belong to which room and user, and the one bus subscription per room
//! (and per user) that feeds them.
//!
//! A room's subscription exists while at least one local socket is in the room. Each incoming
//! `recv` is framed once and the same bytes are queued on every member socket except the one
//! that sent it.

use std::collections::HashMap;
use std::sync::Arc;

use chatoy_bus::{Delivery, DynBus};
use chatoy_protocol::bus::{RoomEvent, UserEvent};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::mailbox::{Mailbox, Outbound, Pushed};
use super::wire::{self, CloseReason};
use crate::metrics::Metrics;

/// What the rest of the gateway knows about one authenticated socket.
pub(crate) struct Peer {
    /// Unique within this gateway.
    pub(crate) id: u64,
    /// The authenticated user.
    pub(crate) user: u64,
    /// The first eight bytes of the token's hash, to find the socket when the token is revoked.
    pub(crate) session: u64,
    /// The socket's outbound queue.
    pub(crate) mailbox: Mailbox,
    /// The rooms this socket is registered in.
    rooms: Mutex<Vec<u64>>,
}

impl Peer {
    pub(crate) fn new(id: u64, user: u64, session: u64) -> Peer {
        Peer {
            id,
            user,
            session,
            mailbox: Mailbox::default(),
            rooms: Mutex::new(Vec::new()),
        }
    }
}

/// Resolves once a subscription is active.
pub(crate) type Ready = watch::Receiver<bool>;

struct Members {
    peers: Mutex<Vec<Arc<Peer>>>,
}

struct Slot {
    members: Arc<Members>,
    ready: Ready,
    task: AbortHandle,
}

/// See the module documentation.
pub(crate) struct Registry {
    bus: DynBus,
    gateway: u64,
    queue_bound: usize,
    metrics: Arc<Metrics>,
    rooms: Mutex<HashMap<u64, Slot>>,
    users: Mutex<HashMap<u64, Slot>>,
}

impl Registry {
    pub(crate) fn new(bus: DynBus, gateway: u64, queue_bound: usize, metrics: Arc<Metrics>) -> Arc<Registry> {
        Arc::new(Registry {
            bus,
            gateway,
            queue_bound,
            metrics,
            rooms: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
        })
    }

    /// Registers an authenticated socket for its user's events.
    pub(crate) fn add_user(self: &Arc<Self>, peer: &Arc<Peer>) -> Ready {
        let mut users = self.users.lock();
        if let Some(slot) = users.get(&peer.user) {
            slot.members.peers.lock().push(peer.clone());
            return slot.ready.clone();
        }
        let members = Arc::new(Members {
            peers: Mutex::new(vec![peer.clone()]),
        });
        let (tx, ready) = watch::channel(false);
        let task = tokio::spawn(self.clone().user_feed(peer.user, members.clone(), tx)).abort_handle();
        users.insert(
            peer.user,
            Slot {
                members,
                ready: ready.clone(),
                task,
            },
        );
        ready
    }

    /// Adds a socket to a room; returns `None` if it already was in it.
    pub(crate) fn join(self: &Arc<Self>, peer: &Arc<Peer>, room: u64) -> Option<Ready> {
        {
            let mut rooms = peer.rooms.lock();
            if rooms.contains(&room) {
                return None;
            }
            rooms.push(room);
        }
        let mut slots = self.rooms.lock();
        if let Some(slot) = slots.get(&room) {
            slot.members.peers.lock().push(peer.clone());
            return Some(slot.ready.clone());
        }
        let members = Arc::new(Members {
            peers: Mutex::new(vec![peer.clone()]),
        });
        let (tx, ready) = watch::channel(false);
        let task = tokio::spawn(self.clone().room_feed(room, members.clone(), tx)).abort_handle();
        slots.insert(
            room,
            Slot {
                members,
                ready: ready.clone(),
                task,
            },
        );
        Some(ready)
    }

    /// Adds every local socket of `user` to `room` and waits (bounded) until the room's
    /// subscription is active, so that a join answered by this gateway takes effect before the
    /// answer leaves. Other gateways learn of the join from the user event.
    pub(crate) async fn join_local(self: &Arc<Self>, user: u64, room: u64, deadline: std::time::Duration) {
        let peers = match self.users.lock().get(&user) {
            Some(slot) => slot.members.peers.lock().clone(),
            None => return,
        };
        let waits: Vec<Ready> = peers.iter().filter_map(|peer| self.join(peer, room)).collect();
        let all_ready = async {
            for mut ready in waits {
                let _ = ready.wait_for(|ready| *ready).await;
            }
        };
        let _ = tokio::time::timeout(deadline, all_ready).await;
    }

    /// Removes a closing socket from its rooms and its user; drops subscriptions left empty.
    pub(crate) fn remove(&self, peer: &Peer) {
        let rooms = std::mem::take(&mut *peer.rooms.lock());
        {
            let mut slots = self.rooms.lock();
            for room in rooms {
                remove_from(&mut slots, room, peer.id);
            }
        }
        remove_from(&mut self.users.lock(), peer.user, peer.id);
    }

    async fn room_feed(self: Arc<Self>, room: u64, members: Arc<Members>, ready: watch::Sender<bool>) {
        let mut subscription = match self.bus.subscribe_room(room).await {
            Ok(subscription) => subscription,
            Err(err) => {
                tracing::warn!(cause = %err, room, "cannot subscribe to room");
                close_members(&members, CloseReason::UNAVAILABLE);
                return;
            }
        };
        let _ = ready.send(true);
        while let Some(delivery) = subscription.next().await {
            match delivery {
                Delivery::Event(event) => self.fan_out(&members, event),
                Delivery::Gap => {
                    // Events were lost: make every member resume from the store with `since`.
                    tracing::warn!(room, "room subscription lost events; closing its sockets");
                    self.metrics.bus_gaps.inc();
                    close_members(&members, CloseReason::SLOW_CONSUMER);
                }
            }
        }
    }

    fn fan_out(&self, members: &Members, event: RoomEvent) {
        let frame = wire::text(&event.frame);
        let from_here = event.origin.gateway == self.gateway;
        let mut delivered = 0;
        for peer in members.peers.lock().iter() {
            if from_here && peer.id == event.origin.conn {
                continue;
            }
            let item = Outbound {
                frame: frame.clone(),
                room: event.room,
                sent: event.sent.0,
            };
            match peer.mailbox.push(item, self.queue_bound) {
                Pushed::Queued => delivered += 1,
                Pushed::Overflowed => self.metrics.slow_consumers.inc(),
                Pushed::Closing => {}
            }
        }
        self.metrics.out_recv.inc_by(delivered);
    }

    async fn user_feed(self: Arc<Self>, user: u64, members: Arc<Members>, ready: watch::Sender<bool>) {
        let mut subscription = match self.bus.subscribe_user(user).await {
            Ok(subscription) => subscription,
            Err(err) => {
                tracing::warn!(cause = %err, user, "cannot subscribe to user events");
                close_members(&members, CloseReason::UNAVAILABLE);
                return;
            }
        };
        let _ = ready.send(true);
        while let Some(delivery) = subscription.next().await {
            let peers = members.peers.lock().clone();
            match delivery {
                Delivery::Event(UserEvent::Joined { room }) => {
                    for peer in &peers {
                        // The subscription becomes active on its own; live traffic follows.
                        let _ = self.join(peer, room);
                    }
                }
                Delivery::Event(UserEvent::Revoked { session }) => {
                    for peer in peers.iter().filter(|peer| peer.session == session) {
                        peer.mailbox.close(CloseReason::REVOKED);
                    }
                }
                Delivery::Gap => {
                    // A lost join or revocation cannot be reconstructed: reconnecting re-reads both.
                    close_members(&members, CloseReason::UNAVAILABLE);
                }
            }
        }
    }
}

fn remove_from(slots: &mut HashMap<u64, Slot>, key: u64, peer: u64) {
    let Some(slot) = slots.get(&key) else { return };
    let empty = {
        let mut peers = slot.members.peers.lock();
        if let Some(at) = peers.iter().position(|p| p.id == peer) {
            peers.swap_remove(at);
        }
        peers.is_empty()
    };
    if empty {
        if let Some(slot) = slots.remove(&key) {
            slot.task.abort();
        }
    }
}

fn close_members(members: &Members, reason: CloseReason) {
    for peer in members.peers.lock().iter() {
        peer.mailbox.close(reason);
    }
}
