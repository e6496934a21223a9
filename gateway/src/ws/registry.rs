//! Which local sockets belong to which room and user, and the one bus subscription per room
//! (and per user) that feeds them.
//!
//! A room's subscription exists while at least one local socket is in the room. Each incoming
//! `recv` is framed once and the same bytes are queued on every member socket except the one
//! that sent it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatoy_bus::{Delivery, DynBus, Subscription};
use chatoy_protocol::bus::{Origin, RoomEvent, UserEvent};
use chatoy_protocol::{ServerFrame, Timestamp};
use chatoy_store::DynStore;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::mailbox::{Mailbox, Outbound, Pushed};
use super::wire::{self, CloseReason};
use crate::metrics::Metrics;

/// Most events of one room fanned out together.
const FAN_OUT_BATCH: usize = 256;

/// What the rest of the gateway knows about one authenticated socket.
pub(crate) struct Peer {
    /// Unique within this gateway.
    pub(crate) id: u64,
    /// The authenticated user.
    pub(crate) user: u64,
    /// The first eight bytes of the token's hash, to find the socket when the token is revoked.
    pub(crate) session: u64,
    /// The token's hash, to check the session again after user events may have been lost.
    token_hash: [u8; 32],
    /// The socket's outbound queue.
    pub(crate) mailbox: Mailbox,
    /// The rooms this socket is registered in.
    rooms: Mutex<Vec<u64>>,
    /// When the client was last heard from, in milliseconds of [`clock`].
    last_seen: AtomicU64,
}

impl Peer {
    pub(crate) fn new(id: u64, user: u64, token_hash: [u8; 32]) -> Peer {
        Peer {
            id,
            user,
            session: crate::accounts::session_key(&token_hash),
            token_hash,
            mailbox: Mailbox::default(),
            rooms: Mutex::new(Vec::new()),
            last_seen: AtomicU64::new(clock()),
        }
    }

    /// Notes that the client was just heard from.
    pub(crate) fn seen(&self) {
        self.last_seen.store(clock(), Ordering::Relaxed);
    }
}

/// Milliseconds since the first call: a cheap clock for idle checks.
fn clock() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
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
    store: DynStore,
    /// Most messages one room's gap recovery replays before giving up and closing its sockets.
    recovery_limit: usize,
    gateway: u64,
    queue_bound: usize,
    metrics: Arc<Metrics>,
    rooms: Mutex<HashMap<u64, Slot>>,
    /// Local authenticated sockets by user, for user events (joins, revoked tokens).
    users: Mutex<HashMap<u64, Vec<Arc<Peer>>>>,
}

impl Registry {
    pub(crate) fn new(
        bus: DynBus,
        store: DynStore,
        gateway: u64,
        queue_bound: usize,
        recovery_limit: usize,
        metrics: Arc<Metrics>,
    ) -> Arc<Registry> {
        Arc::new(Registry {
            bus,
            store,
            recovery_limit,
            gateway,
            queue_bound,
            metrics,
            rooms: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
        })
    }

    /// Registers an authenticated socket for its user's events. Call before reading the
    /// user's rooms from the store, so that a join in between is not missed.
    pub(crate) fn add_user(&self, peer: &Arc<Peer>) {
        self.users.lock().entry(peer.user).or_default().push(peer.clone());
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
    pub(crate) async fn join_local(self: &Arc<Self>, user: u64, room: u64, deadline: Duration) {
        let peers = match self.users.lock().get(&user) {
            Some(peers) => peers.clone(),
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

    /// Every local authenticated socket.
    fn peers(&self) -> Vec<Arc<Peer>> {
        self.users.lock().values().flatten().cloned().collect()
    }

    /// For the gateway's life, every `interval`: closes the sockets not heard from within
    /// `idle_timeout` (1008) and pings the others. One task for all sockets, so that an idle
    /// socket holds no timer of its own.
    pub(crate) async fn keepalive(self: Arc<Self>, interval: Duration, idle_timeout: Duration) {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let idle_ms = idle_timeout.as_millis() as u64;
        loop {
            ticks.tick().await;
            let now = clock();
            for peer in self.peers() {
                if now.saturating_sub(peer.last_seen.load(Ordering::Relaxed)) >= idle_ms {
                    peer.mailbox.close(CloseReason::IDLE);
                } else if peer.mailbox.push(
                    Outbound::control(Bytes::from_static(wire::PING)),
                    self.queue_bound,
                ) == Pushed::Overflowed
                {
                    self.metrics.slow_consumers.inc();
                }
            }
        }
    }

    /// Asks every local authenticated socket to close with `reason` (shutdown: 1001).
    pub(crate) fn close_all(&self, reason: CloseReason) {
        for peer in self.peers() {
            peer.mailbox.close(reason);
        }
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
        let mut users = self.users.lock();
        if let Some(peers) = users.get_mut(&peer.user) {
            peers.retain(|p| p.id != peer.id);
            if peers.is_empty() {
                users.remove(&peer.user);
            }
        }
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
        members: &Members,
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
        members: &Members,
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
                    batch.push(RoomEvent {
                        room,
                        sent: message.sent,
                        prev: None,
                        origin,
                        frame: Bytes::from(ServerFrame::Recv { data: message }.to_json()),
                    });
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
    fn fan_out(&self, members: &Members, batch: &mut Vec<RoomEvent>) {
        if batch.is_empty() {
            return;
        }
        let started = Instant::now();
        let frames: Vec<(Outbound, Origin)> = batch
            .drain(..)
            .map(|event| {
                let item = Outbound {
                    frame: wire::text(&event.frame),
                    room: event.room,
                    sent: event.sent.0,
                };
                (item, event.origin)
            })
            .collect();
        let mut delivered = 0;
        for peer in members.peers.lock().iter() {
            let own = Origin {
                gateway: self.gateway,
                conn: peer.id,
            };
            let items = frames
                .iter()
                .filter(|(_, origin)| *origin != own)
                .map(|(item, _)| item.clone());
            let (queued, pushed) = peer.mailbox.push_all(items, self.queue_bound);
            delivered += queued;
            if pushed == Pushed::Overflowed {
                self.metrics.slow_consumers.inc();
            }
        }
        self.metrics.out_recv.inc_by(delivered);
        self.metrics.fan_out.observe(started.elapsed().as_secs_f64());
    }

    /// Applies every user event to this gateway's sockets of that user, for the gateway's life.
    pub(crate) async fn user_feed(self: Arc<Self>, mut subscription: Subscription<(u64, UserEvent)>) {
        while let Some(delivery) = subscription.next().await {
            match delivery {
                Delivery::Event((user, event)) => {
                    let peers = match self.users.lock().get(&user) {
                        Some(peers) => peers.clone(),
                        None => continue,
                    };
                    match event {
                        UserEvent::Joined { room } => {
                            for peer in &peers {
                                // The subscription becomes active on its own; live traffic follows.
                                let _ = self.join(peer, room);
                            }
                        }
                        UserEvent::Revoked { session } => {
                            for peer in peers.iter().filter(|peer| peer.session == session) {
                                peer.mailbox.close(CloseReason::REVOKED);
                            }
                        }
                    }
                }
                Delivery::Gap => {
                    let registry = self.clone();
                    tokio::spawn(async move { registry.refresh_users().await });
                }
            }
        }
        tracing::warn!("the user-event subscription ended");
    }

    /// After user events may have been lost (a bus reconnect), re-reads from the store what
    /// they would have said: each local user's rooms (joining any new one) and each socket's
    /// session (closing revoked ones).
    async fn refresh_users(self: Arc<Self>) {
        let users: Vec<(u64, Vec<Arc<Peer>>)> = self
            .users
            .lock()
            .iter()
            .map(|(user, peers)| (*user, peers.clone()))
            .collect();
        if users.is_empty() {
            return;
        }
        tracing::info!(users = users.len(), "refreshing user state after a bus gap");
        let now = Timestamp::now();
        for (user, peers) in users {
            match self.store.user_rooms(user).await {
                Ok(rooms) => {
                    for peer in &peers {
                        for room in &rooms {
                            let _ = self.join(peer, room.id);
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(cause = %err, user, "cannot refresh rooms; closing the user's sockets");
                    peers
                        .iter()
                        .for_each(|peer| peer.mailbox.close(CloseReason::UNAVAILABLE));
                    continue;
                }
            }
            for peer in &peers {
                if let Ok(None) = self.store.session(&peer.token_hash, now).await {
                    peer.mailbox.close(CloseReason::REVOKED);
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
