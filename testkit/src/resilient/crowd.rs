//! Many resilient members at once: started together, told when to send and when to leave, and
//! waited on until everything they made is answered and every member has every message.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::{run, Control, Member, MemberSpec, Seen};
use crate::util::wait_until;

/// How long every member may take to connect, and the first message to be answered.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long a member may take to leave once told to.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// Messages answered code 0, by room: uuid → `sent` (ns).
pub type Acked = HashMap<u64, HashMap<String, i64>>;

/// Members running as tasks, and what tells them to send and to leave.
pub struct Crowd {
    /// Each member's spec and what it saw.
    pub members: Vec<Member>,
    control: Arc<Control>,
    tasks: Vec<JoinHandle<()>>,
}

impl Crowd {
    /// Runs a member for each spec and waits until every one has connected once.
    pub async fn start(specs: Vec<MemberSpec>) -> Crowd {
        let control = Arc::new(Control::default());
        let members: Vec<Member> = specs
            .into_iter()
            .map(|spec| Member {
                spec,
                seen: Arc::new(Mutex::new(Seen::default())),
            })
            .collect();
        let tasks = members
            .iter()
            .map(|m| tokio::spawn(run(m.spec.clone(), m.seen.clone(), control.clone())))
            .collect();
        let crowd = Crowd {
            members,
            control,
            tasks,
        };
        wait_until(START_LIMIT, "every member to connect", || {
            crowd
                .members
                .iter()
                .all(|m| m.seen.lock().expect("seen").connects > 0)
        })
        .await;
        crowd
    }

    /// Lets the senders make new messages, and waits until the first one is answered code 0.
    pub async fn start_sending(&self) {
        self.control.sending.store(true, Ordering::SeqCst);
        wait_until(START_LIMIT, "the first acknowledgements", || {
            self.acked_count() > 0
        })
        .await;
    }

    /// Stops the senders making new messages (they keep resending what is unanswered).
    pub fn stop_sending(&self) {
        self.control.sending.store(false, Ordering::SeqCst);
    }

    /// How many messages were answered code 0 so far.
    pub fn acked_count(&self) -> usize {
        self.members
            .iter()
            .map(|m| m.seen.lock().expect("seen").acked.len())
            .sum()
    }

    /// Every message answered code 0 so far, by room.
    pub fn acked_by_room(&self) -> Acked {
        acked_by_room(&self.members)
    }

    /// Waits (at most `limit`) until every message made was answered code 0.
    pub async fn until_answered(&self, limit: Duration) {
        wait_until(limit, "every message to be answered code 0", || {
            self.members
                .iter()
                .all(|m| m.seen.lock().expect("seen").unanswered == 0)
        })
        .await;
    }

    /// How long after `from` every member had every message of `want` in its rooms (its own
    /// excepted); `None` if that did not happen within `limit`.
    pub async fn caught_up_after(&self, want: &Acked, from: Instant, limit: Duration) -> Option<Duration> {
        let deadline = Instant::now() + limit;
        loop {
            if self.have_all(want) {
                return Some(from.elapsed());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether every member has every message of `want` in its rooms (its own excepted).
    fn have_all(&self, want: &Acked) -> bool {
        self.members.iter().all(|member| {
            let seen = member.seen.lock().expect("seen");
            member.spec.rooms.iter().all(|room| {
                want.get(room).is_none_or(|messages| {
                    messages
                        .keys()
                        .all(|uuid| seen.have.contains(uuid) || seen.acked.contains_key(uuid))
                })
            })
        })
    }

    /// Tells every member to leave (a sender once everything it made is answered) and waits
    /// for each, a bounded time.
    pub async fn stop(&mut self) {
        self.control.stop.store(true, Ordering::SeqCst);
        for task in self.tasks.drain(..) {
            let _ = tokio::time::timeout(STOP_LIMIT, task).await;
        }
    }
}

/// Every message the members saw answered code 0, by room.
pub(super) fn acked_by_room(members: &[Member]) -> Acked {
    let mut rooms: Acked = HashMap::new();
    for member in members {
        for (uuid, (room, sent)) in &member.seen.lock().expect("seen").acked {
            rooms.entry(*room).or_default().insert(uuid.clone(), *sent);
        }
    }
    rooms
}
