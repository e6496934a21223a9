//! The sequencing core: every decision the router makes about a batch, with no I/O.
//!
//! The worker (`worker.rs`) learns from the store what the core needs — rooms opened under the
//! partition's fence, stored messages whose uuids the core does not remember — and feeds it in;
//! the core answers each request of a batch with a [`Decision`]. It assigns `sent` (strictly
//! increasing per room, `max(now, last + 1)`), names each new message's predecessor (`prev`),
//! recognises retried uuids (in memory: the recent ones and everything in flight; older ones
//! through the store lookup), and forgets everything on [`Sequencer::reset`] when the partition
//! may have changed hands.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};

use chatoy_protocol::bus::MsgRequest;
use chatoy_protocol::{MessageContent, SendCode, Timestamp};
use chatoy_store::{Content, StoredMessage};
use uuid::Uuid;

/// What the core decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// A new message: store it at `sent`; its event names `prev`, the `sent` before it in the
    /// room (0 before the room's first message).
    Store { sent: Timestamp, prev: Timestamp },
    /// The uuid is already stored (or being stored) with the same sender and content: answer
    /// code 0 with its original `sent`. `republish` when it came from the store, so its writer
    /// may have died before publishing it.
    Duplicate { sent: Timestamp, republish: bool },
    /// Refuse with this code.
    Refuse(SendCode),
}

/// A uuid the core knows in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Known {
    sent: Timestamp,
    sender: u64,
    digest: u64,
    /// Learnt from the store rather than sequenced here.
    from_store: bool,
}

/// One room as the core knows it.
#[derive(Debug, Default)]
struct Room {
    /// The newest `sent` of the room: stored, or assigned to a message being stored.
    last: Timestamp,
    /// The uuids the core remembers in the room.
    known: HashMap<Uuid, Known>,
}

/// The sequencer of one partition's rooms; see the module documentation.
#[derive(Debug)]
pub(crate) struct Sequencer {
    /// The opened rooms, least recently used first out when trimmed (unbounded in between: a
    /// room is forgotten only with nothing in flight, see [`Sequencer::trim`]).
    rooms: lru::LruCache<u64, Room>,
    /// Every remembered uuid, oldest first, so that the oldest are forgotten first.
    order: VecDeque<(u64, Uuid)>,
    /// Most uuids remembered (in memory) across the partition's rooms.
    capacity: usize,
}

impl Sequencer {
    /// A sequencer that remembers up to `capacity` uuids (at least one).
    pub(crate) fn new(capacity: usize) -> Sequencer {
        Sequencer {
            rooms: lru::LruCache::unbounded(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// The rooms of `batch` that must be opened in the store before it can be sequenced.
    pub(crate) fn unopened(&self, batch: &[&MsgRequest]) -> Vec<u64> {
        let mut rooms: Vec<u64> = batch
            .iter()
            .map(|request| request.room)
            .filter(|room| !self.rooms.contains(room))
            .collect();
        rooms.sort_unstable();
        rooms.dedup();
        rooms
    }

    /// Records a room opened in the store, with its newest `sent`.
    pub(crate) fn open(&mut self, room: u64, last: Option<Timestamp>) {
        self.rooms.put(
            room,
            Room {
                last: last.unwrap_or_default(),
                known: HashMap::new(),
            },
        );
    }

    /// Per room, the uuids of `batch` the core does not remember: those the store must be asked
    /// about. Rooms not opened yet are left out.
    pub(crate) fn unknown(&self, batch: &[&MsgRequest]) -> Vec<(u64, Vec<Uuid>)> {
        let mut unknown: Vec<(u64, Vec<Uuid>)> = Vec::new();
        for request in batch {
            let Some(room) = self.rooms.peek(&request.room) else {
                continue;
            };
            if room.known.contains_key(&request.uuid) {
                continue;
            }
            match unknown.iter_mut().find(|(id, _)| *id == request.room) {
                Some((_, uuids)) if uuids.contains(&request.uuid) => {}
                Some((_, uuids)) => uuids.push(request.uuid),
                None => unknown.push((request.room, vec![request.uuid])),
            }
        }
        unknown
    }

    /// Remembers messages found in the store.
    pub(crate) fn learn(&mut self, found: &[StoredMessage]) {
        for message in found {
            let known = Known {
                sent: message.sent,
                sender: message.sender,
                digest: stored_digest(&message.content),
                from_store: true,
            };
            self.remember(message.room, message.uuid, known);
        }
    }

    /// Decides every request of a batch, in order, at time `now`. `refused` gives the code of a
    /// request refused before sequencing (its sender is not a member: 2; the store could not
    /// say: 5). Every other request's room must have been opened and its unknown uuids looked
    /// up; a request whose room was not opened is refused with code 5.
    pub(crate) fn sequence(
        &mut self,
        batch: &[&MsgRequest],
        now: Timestamp,
        refused: impl Fn(&MsgRequest) -> Option<SendCode>,
    ) -> Vec<Decision> {
        batch
            .iter()
            .map(|request| self.decide(request, now, &refused))
            .collect()
    }

    fn decide(
        &mut self,
        request: &MsgRequest,
        now: Timestamp,
        refused: impl Fn(&MsgRequest) -> Option<SendCode>,
    ) -> Decision {
        if let Some(code) = refused(request) {
            return Decision::Refuse(code);
        }
        let Some(room) = self.rooms.get_mut(&request.room) else {
            return Decision::Refuse(SendCode::Unavailable);
        };
        let digest = digest(&request.content);
        if let Some(known) = room.known.get(&request.uuid) {
            return if known.sender == request.sender && known.digest == digest {
                Decision::Duplicate {
                    sent: known.sent,
                    republish: known.from_store,
                }
            } else {
                Decision::Refuse(SendCode::Invalid)
            };
        }
        let prev = room.last;
        let sent = Timestamp(now.0.max(prev.0.saturating_add(1)));
        room.last = sent;
        let known = Known {
            sent,
            sender: request.sender,
            digest,
            from_store: false,
        };
        self.remember(request.room, request.uuid, known);
        Decision::Store { sent, prev }
    }

    fn remember(&mut self, room: u64, uuid: Uuid, known: Known) {
        let Some(entry) = self.rooms.get_mut(&room) else {
            return;
        };
        if entry.known.insert(uuid, known).is_none() {
            self.order.push_back((room, uuid));
        }
        while self.order.len() > self.capacity {
            let Some((room, uuid)) = self.order.pop_front() else {
                break;
            };
            if let Some(entry) = self.rooms.peek_mut(&room) {
                entry.known.remove(&uuid);
            }
        }
    }

    /// Forgets everything: after a failed or fenced-off write, the partition's rooms are opened
    /// again (under a new claim) before anything more is sequenced.
    pub(crate) fn reset(&mut self) {
        self.rooms.clear();
        self.order.clear();
    }

    /// Forgets the least recently used rooms beyond `max_rooms` (with their remembered uuids:
    /// a retry of one is then recognised through the store lookup). Only call this with nothing
    /// in flight: a room opened again must not miss a `sent` still being written.
    pub(crate) fn trim(&mut self, max_rooms: usize) {
        if self.rooms.len() <= max_rooms {
            return;
        }
        let mut forgotten = HashSet::new();
        while self.rooms.len() > max_rooms {
            let Some((room, _)) = self.rooms.pop_lru() else {
                break;
            };
            forgotten.insert(room);
        }
        self.order.retain(|(room, _)| !forgotten.contains(room));
    }
}

/// A digest of a request's content, to tell a retry from a different message under one uuid.
fn digest(content: &MessageContent) -> u64 {
    match content {
        MessageContent::Text { text } => text_digest(text),
    }
}

/// The digest of stored content: equal to [`digest`] of the same content as a request.
fn stored_digest(content: &Content) -> u64 {
    match content {
        Content::Text(text) => text_digest(text),
    }
}

fn text_digest(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    ("Text", text).hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatoy_protocol::bus::Origin;

    fn request(room: u64, sender: u64, uuid: u128, text: &str) -> MsgRequest {
        MsgRequest {
            uuid: Uuid::from_u128(uuid),
            sender,
            room,
            content: MessageContent::Text { text: text.into() },
            origin: Origin { gateway: 1, conn: 1 },
        }
    }

    fn run(core: &mut Sequencer, batch: &[MsgRequest], now: i64) -> Vec<Decision> {
        let refs: Vec<&MsgRequest> = batch.iter().collect();
        core.sequence(&refs, Timestamp(now), |request| {
            (request.sender == 99).then_some(SendCode::NotMember)
        })
    }

    fn store(sent: i64, prev: i64) -> Decision {
        Decision::Store {
            sent: Timestamp(sent),
            prev: Timestamp(prev),
        }
    }

    #[test]
    fn sent_is_strictly_increasing_per_room_and_names_its_predecessor() {
        let mut core = Sequencer::new(100);
        core.open(1, Some(Timestamp(1_000)));
        core.open(2, None);
        let batch = [
            request(1, 7, 1, "a"),
            request(1, 7, 2, "b"),
            request(2, 7, 3, "c"),
            request(1, 8, 4, "d"),
        ];
        // The clock is behind the room's last `sent`: each message still gets a later one.
        assert_eq!(
            run(&mut core, &batch, 500),
            vec![
                store(1_001, 1_000),
                store(1_002, 1_001),
                store(500, 0),
                store(1_003, 1_002)
            ]
        );
        // The clock is ahead: `sent` follows it.
        assert_eq!(
            run(&mut core, &[request(1, 7, 5, "e")], 9_000),
            vec![store(9_000, 1_003)]
        );
        assert_eq!(
            run(&mut core, &[request(1, 7, 6, "f")], 9_000),
            vec![store(9_001, 9_000)]
        );
    }

    #[test]
    fn a_retried_uuid_gets_its_original_sent_and_a_different_message_is_refused() {
        let mut core = Sequencer::new(100);
        core.open(1, None);
        let decisions = run(
            &mut core,
            &[
                request(1, 7, 1, "a"),
                request(1, 7, 1, "a"),
                request(1, 7, 1, "other text"),
                request(1, 8, 1, "a"),
            ],
            100,
        );
        let original = Decision::Duplicate {
            sent: Timestamp(100),
            republish: false,
        };
        assert_eq!(
            decisions,
            vec![
                store(100, 0),
                original,
                Decision::Refuse(SendCode::Invalid),
                Decision::Refuse(SendCode::Invalid)
            ]
        );
        // In a later batch too; the same uuid in another room is another message.
        core.open(2, None);
        assert_eq!(
            run(&mut core, &[request(1, 7, 1, "a"), request(2, 7, 1, "a")], 200),
            vec![original, store(200, 0)]
        );
    }

    #[test]
    fn non_members_and_unopened_rooms_are_refused_without_using_a_sent() {
        let mut core = Sequencer::new(100);
        core.open(1, None);
        let decisions = run(
            &mut core,
            &[
                request(1, 99, 1, "a"),
                request(3, 7, 2, "b"),
                request(1, 7, 3, "c"),
            ],
            100,
        );
        assert_eq!(
            decisions,
            vec![
                Decision::Refuse(SendCode::NotMember),
                Decision::Refuse(SendCode::Unavailable),
                store(100, 0)
            ]
        );
    }

    #[test]
    fn the_store_is_asked_only_about_uuids_not_remembered() {
        let mut core = Sequencer::new(100);
        let batch = [
            request(1, 7, 1, "a"),
            request(1, 7, 2, "b"),
            request(1, 7, 2, "b"),
        ];
        let refs: Vec<&MsgRequest> = batch.iter().collect();
        assert_eq!(core.unopened(&refs), vec![1]);
        assert!(core.unknown(&refs).is_empty(), "rooms are opened first");
        core.open(1, Some(Timestamp(50)));
        assert!(core.unopened(&refs).is_empty());
        assert_eq!(
            core.unknown(&refs),
            vec![(1, vec![Uuid::from_u128(1), Uuid::from_u128(2)])]
        );
        // The store had the first one (stored by another router, maybe never published).
        core.learn(&[StoredMessage {
            uuid: Uuid::from_u128(1),
            sender: 7,
            room: 1,
            content: Content::Text("a".into()),
            sent: Timestamp(40),
            modified: false,
        }]);
        assert_eq!(core.unknown(&refs), vec![(1, vec![Uuid::from_u128(2)])]);
        let decisions = core.sequence(&refs, Timestamp(10), |_| None);
        assert_eq!(
            decisions,
            vec![
                Decision::Duplicate {
                    sent: Timestamp(40),
                    republish: true
                },
                store(51, 50),
                Decision::Duplicate {
                    sent: Timestamp(51),
                    republish: false
                },
            ]
        );
        assert!(core.unknown(&refs).is_empty());
    }

    #[test]
    fn the_oldest_uuids_are_forgotten_first() {
        let mut core = Sequencer::new(2);
        core.open(1, None);
        run(
            &mut core,
            &[
                request(1, 7, 1, "a"),
                request(1, 7, 2, "b"),
                request(1, 7, 3, "c"),
            ],
            100,
        );
        let probe = [request(1, 7, 1, "a"), request(1, 7, 3, "c")];
        let refs: Vec<&MsgRequest> = probe.iter().collect();
        assert_eq!(core.unknown(&refs), vec![(1, vec![Uuid::from_u128(1)])]);
    }

    #[test]
    fn reset_forgets_rooms_and_uuids() {
        let mut core = Sequencer::new(100);
        core.open(1, None);
        run(&mut core, &[request(1, 7, 1, "a")], 100);
        core.reset();
        let probe = [request(1, 7, 1, "a")];
        let refs: Vec<&MsgRequest> = probe.iter().collect();
        assert_eq!(core.unopened(&refs), vec![1]);
        assert_eq!(
            run(&mut core, &probe, 200),
            vec![Decision::Refuse(SendCode::Unavailable)]
        );
        // Reopened with what the store says, sequencing continues after it.
        core.open(1, Some(Timestamp(100)));
        assert_eq!(
            run(&mut core, &[request(1, 7, 2, "b")], 50),
            vec![store(101, 100)]
        );
    }

    #[test]
    fn trim_forgets_the_least_recently_used_rooms_only() {
        let mut core = Sequencer::new(100);
        for room in 1..=4 {
            core.open(room, None);
        }
        // Rooms 1 and 3 are used after being opened; 2, then 4, are the least recently used.
        run(&mut core, &[request(1, 7, 1, "a"), request(3, 7, 2, "b")], 100);
        core.trim(3);
        let probe = [
            request(1, 7, 3, "c"),
            request(2, 7, 4, "d"),
            request(3, 7, 5, "e"),
            request(4, 7, 6, "f"),
        ];
        let refs: Vec<&MsgRequest> = probe.iter().collect();
        assert_eq!(core.unopened(&refs), vec![2]);
        core.trim(2);
        assert_eq!(core.unopened(&refs), vec![2, 4]);
        // The rooms kept keep their uuids: a retry is still a duplicate.
        assert_eq!(
            run(&mut core, &[request(1, 7, 1, "a")], 200),
            vec![Decision::Duplicate {
                sent: Timestamp(100),
                republish: false
            }]
        );
    }
}
