//! Which local sockets belong to which user, which users to which room, and the one bus
//! subscription per room (and the one for all users' events) that feeds them.
//!
//! Membership is held once per user, not per socket: a room's members are the local users in
//! it, each with its authenticated sockets. So a socket costs the same whatever the number of
//! its user's rooms, and a user's second socket joins no room again. A room's subscription
//! exists while at least one local user is in the room; its feed (`feed.rs`) frames each `recv`
//! once and queues the same bytes on every member socket except the one that sent it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatoy_bus::{Delivery, DynBus, Subscription};
use chatoy_protocol::bus::UserEvent;
use chatoy_protocol::Timestamp;
use chatoy_store::DynStore;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::mailbox::{Mailbox, Outbound, Pushed};
use super::wire::{self, CloseReason};
use crate::metrics::Metrics;

/// What the rest of the gateway knows about one authenticated socket.
pub(crate) struct SocketHandle {
    /// Unique within this gateway.
    pub(crate) id: u64,
    /// The authenticated user.
    pub(crate) user: u64,
    /// The first eight bytes of the token's hash, to find the socket when the token is revoked.
    pub(crate) session: u64,
    /// The token's hash, to check the session again after user events may have been lost.
    token_hash: [u8; 32],
    /// When the token stops being valid: the socket is closed then (1008).
    expires: Timestamp,
    /// The socket's outbound queue.
    pub(crate) mailbox: Mailbox,
    /// When the client was last heard from, in milliseconds of [`clock`].
    last_seen: AtomicU64,
}

impl SocketHandle {
    pub(crate) fn new(id: u64, user: u64, token_hash: [u8; 32], expires: Timestamp) -> SocketHandle {
        SocketHandle {
            id,
            user,
            session: crate::accounts::session_key(&token_hash),
            token_hash,
            expires,
            mailbox: Mailbox::default(),
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

/// Whether a user's rooms are known yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rooms {
    /// The first socket is reading them from the store.
    Loading,
    Loaded,
    /// Reading them failed: the sockets waiting for them give up.
    Failed,
}

/// One local user: its sockets and its rooms.
pub(crate) struct Member {
    pub(crate) user: u64,
    pub(crate) sockets: Mutex<Vec<Arc<SocketHandle>>>,
    rooms: Mutex<Vec<u64>>,
    loaded: watch::Sender<Rooms>,
}

impl Member {
    /// The user's rooms on this gateway.
    pub(crate) fn rooms(&self) -> Vec<u64> {
        self.rooms.lock().clone()
    }

    /// Queues `reason`'s close on every socket of the user.
    fn close(&self, reason: CloseReason) {
        for socket in self.sockets.lock().iter() {
            socket.mailbox.close(reason);
        }
    }
}

/// The local members of one room and its feed.
pub(crate) struct Slot {
    pub(crate) members: Arc<Mutex<Vec<Arc<Member>>>>,
    ready: Ready,
    task: AbortHandle,
}

/// A socket's place among its user's sockets, from [`Registry::add`].
pub(crate) enum Added {
    /// The user's first socket here: it must read the user's rooms ([`Registry::load`]).
    First(Arc<Member>),
    /// The user has other sockets here: its rooms are (being) joined already.
    Another(Arc<Member>),
    /// The user has as many sockets here as it may.
    TooMany,
}

/// See the module documentation.
pub(crate) struct Registry {
    pub(crate) bus: DynBus,
    pub(crate) store: DynStore,
    /// Most messages one room's gap recovery replays before giving up and closing its sockets.
    pub(crate) recovery_limit: usize,
    pub(crate) gateway: u64,
    pub(crate) queue_bound: usize,
    pub(crate) metrics: Arc<Metrics>,
    rooms: Mutex<HashMap<u64, Slot>>,
    /// Local users with at least one authenticated socket.
    users: Mutex<HashMap<u64, Arc<Member>>>,
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

    /// Registers an authenticated socket with its user, unless the user has `max` sockets here
    /// already. Call before reading the user's rooms from the store, so that a join in between
    /// is not missed.
    pub(crate) fn add(&self, socket: &Arc<SocketHandle>, max: usize) -> Added {
        let mut users = self.users.lock();
        if let Some(member) = users.get(&socket.user) {
            let mut sockets = member.sockets.lock();
            if sockets.len() >= max {
                return Added::TooMany;
            }
            sockets.push(socket.clone());
            return Added::Another(member.clone());
        }
        let member = Arc::new(Member {
            user: socket.user,
            sockets: Mutex::new(vec![socket.clone()]),
            rooms: Mutex::new(Vec::new()),
            loaded: watch::channel(Rooms::Loading).0,
        });
        users.insert(socket.user, member.clone());
        Added::First(member)
    }

    /// The user's first socket: reads the user's rooms from the store and joins them; returns
    /// the waits for their subscriptions. The user's other sockets wait for this ([`Registry::wait_loaded`]).
    pub(crate) async fn load(self: &Arc<Self>, member: &Arc<Member>) -> Result<Vec<Ready>, String> {
        let rooms = match self.store.user_rooms(member.user).await {
            Ok(rooms) => rooms,
            Err(err) => {
                member.loaded.send_replace(Rooms::Failed);
                return Err(err.to_string());
            }
        };
        let waits = rooms
            .iter()
            .filter_map(|room| self.join(member, room.id))
            .collect();
        member.loaded.send_replace(Rooms::Loaded);
        Ok(waits)
    }

    /// Another socket of a user: waits until the first socket read the user's rooms; returns
    /// the waits for their subscriptions.
    pub(crate) async fn wait_loaded(&self, member: &Arc<Member>) -> Result<Vec<Ready>, String> {
        let mut loaded = member.loaded.subscribe();
        let state = loaded
            .wait_for(|state| *state != Rooms::Loading)
            .await
            .map(|state| *state)
            .unwrap_or(Rooms::Failed);
        if state == Rooms::Failed {
            return Err("the user's rooms could not be read".into());
        }
        let slots = self.rooms.lock();
        Ok(member
            .rooms()
            .iter()
            .filter_map(|room| slots.get(room).map(|slot| slot.ready.clone()))
            .collect())
    }

    /// Adds a user to a room on this gateway; returns the wait for the room's subscription, or
    /// `None` if the user was in it already.
    pub(crate) fn join(self: &Arc<Self>, member: &Arc<Member>, room: u64) -> Option<Ready> {
        {
            let mut rooms = member.rooms.lock();
            if rooms.contains(&room) {
                return None;
            }
            rooms.push(room);
        }
        let mut slots = self.rooms.lock();
        if let Some(slot) = slots.get(&room) {
            slot.members.lock().push(member.clone());
            return Some(slot.ready.clone());
        }
        let members = Arc::new(Mutex::new(vec![member.clone()]));
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

    /// Adds the local user `user` (if it has sockets here) to `room` and waits (bounded) until
    /// the room's subscription is active, so that a join answered by this gateway takes effect
    /// before the answer leaves. Other gateways learn of the join from the user event.
    pub(crate) async fn join_local(self: &Arc<Self>, user: u64, room: u64, deadline: Duration) {
        let Some(member) = self.users.lock().get(&user).cloned() else {
            return;
        };
        if let Some(mut ready) = self.join(&member, room) {
            let _ = tokio::time::timeout(deadline, ready.wait_for(|ready| *ready)).await;
        }
    }

    /// Every local user.
    fn members(&self) -> Vec<Arc<Member>> {
        self.users.lock().values().cloned().collect()
    }

    /// For the gateway's life, every `interval`: closes the sockets not heard from within
    /// `idle_timeout` (1008) or whose token expired (1008), and pings the others. One task for
    /// all sockets, so that an idle socket holds no timer of its own.
    pub(crate) async fn keepalive(self: Arc<Self>, interval: Duration, idle_timeout: Duration) {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let idle_ms = idle_timeout.as_millis() as u64;
        loop {
            ticks.tick().await;
            let (now, wall) = (clock(), Timestamp::now());
            for member in self.members() {
                for socket in member.sockets.lock().iter() {
                    if wall >= socket.expires {
                        socket.mailbox.close(CloseReason::EXPIRED);
                    } else if now.saturating_sub(socket.last_seen.load(Ordering::Relaxed)) >= idle_ms {
                        socket.mailbox.close(CloseReason::IDLE);
                    } else if socket.mailbox.push(
                        Outbound::control(Bytes::from_static(wire::PING)),
                        self.queue_bound,
                    ) == Pushed::Overflowed
                    {
                        self.metrics.slow_consumers.inc();
                    }
                }
            }
        }
    }

    /// Asks every local authenticated socket to close with `reason` (shutdown: 1001).
    pub(crate) fn close_all(&self, reason: CloseReason) {
        for member in self.members() {
            member.close(reason);
        }
    }

    /// Removes a closing socket; a user left without sockets leaves its rooms, and
    /// subscriptions left without members are dropped.
    pub(crate) fn remove(&self, socket: &SocketHandle) {
        let gone = {
            let mut users = self.users.lock();
            let Some(member) = users.get(&socket.user).cloned() else {
                return;
            };
            let mut sockets = member.sockets.lock();
            sockets.retain(|p| p.id != socket.id);
            if sockets.is_empty() {
                users.remove(&socket.user);
                Some(member.clone())
            } else {
                None
            }
        };
        let Some(member) = gone else { return };
        let rooms = std::mem::take(&mut *member.rooms.lock());
        let mut slots = self.rooms.lock();
        for room in rooms {
            let Some(slot) = slots.get(&room) else { continue };
            let empty = {
                let mut members = slot.members.lock();
                if let Some(at) = members.iter().position(|m| Arc::ptr_eq(m, &member)) {
                    members.swap_remove(at);
                }
                members.is_empty()
            };
            if empty {
                if let Some(slot) = slots.remove(&room) {
                    slot.task.abort();
                }
            }
        }
    }

    /// Applies every user event to this gateway's sockets of that user, for the gateway's life.
    pub(crate) async fn user_feed(self: Arc<Self>, mut subscription: Subscription<(u64, UserEvent)>) {
        while let Some(delivery) = subscription.next().await {
            match delivery {
                Delivery::Event((user, event)) => {
                    let Some(member) = self.users.lock().get(&user).cloned() else {
                        continue;
                    };
                    match event {
                        // The subscription becomes active on its own; live traffic follows.
                        UserEvent::Joined { room } => drop(self.join(&member, room)),
                        UserEvent::Revoked { session } => {
                            for socket in member
                                .sockets
                                .lock()
                                .iter()
                                .filter(|socket| socket.session == session)
                            {
                                socket.mailbox.close(CloseReason::REVOKED);
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
        let members = self.members();
        if members.is_empty() {
            return;
        }
        tracing::info!(users = members.len(), "refreshing user state after a bus gap");
        let now = Timestamp::now();
        for member in members {
            match self.store.user_rooms(member.user).await {
                Ok(rooms) => {
                    for room in &rooms {
                        let _ = self.join(&member, room.id);
                    }
                }
                Err(err) => {
                    tracing::warn!(cause = %err, user = member.user, "cannot refresh rooms; closing the user's sockets");
                    member.close(CloseReason::UNAVAILABLE);
                    continue;
                }
            }
            let sockets = member.sockets.lock().clone();
            for socket in sockets {
                if let Ok(None) = self.store.session(&socket.token_hash, now).await {
                    socket.mailbox.close(CloseReason::REVOKED);
                }
            }
        }
    }
}

/// Queues `reason`'s close on every socket of a room's members.
pub(crate) fn close_members(members: &Mutex<Vec<Arc<Member>>>, reason: CloseReason) {
    for member in members.lock().iter() {
        member.close(reason);
    }
}
