//! A socket's bounded outbound queue: producers (fan-out, acks) push pre-encoded frames, the
//! socket's own task drains everything pending and writes it with one syscall.
//!
//! Overflow is the slow-consumer policy: the queue is dropped and the socket is marked to close
//! with 1008, so a client that cannot keep up costs bounded memory and resumes with `since`.

use std::collections::VecDeque;
use std::num::NonZeroU64;

use bytes::Bytes;
use chatoy_protocol::Timestamp;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::wire::CloseReason;

/// The room and `sent` of a queued `recv` frame, by which the writer drops duplicates at the
/// `since` seam. Room ids are never 0, so an `Option<RecvKey>` is no larger than the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecvKey {
    pub(crate) room: NonZeroU64,
    pub(crate) sent: Timestamp,
}

/// One queued frame.
#[derive(Debug, Clone)]
pub(crate) struct Outbound {
    pub(crate) frame: Bytes,
    /// Set for `recv` frames; `None` for everything else (`send`, `auth`, `error`, pings).
    pub(crate) recv: Option<RecvKey>,
}

impl Outbound {
    /// A frame that is not a room message (`send`, `auth`, `error`, a ping).
    pub(crate) fn control(frame: Bytes) -> Outbound {
        Outbound { frame, recv: None }
    }
}

/// What the writer takes in one go.
pub(crate) struct Drained {
    pub(crate) frames: VecDeque<Outbound>,
    pub(crate) close: Option<CloseReason>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Outbound>,
    close: Option<CloseReason>,
}

/// See the module documentation.
#[derive(Default)]
pub(crate) struct Mailbox {
    state: Mutex<State>,
    wake: Notify,
}

/// The result of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    Queued,
    /// The socket is closing; the frame was dropped.
    Closing,
    /// This push overflowed the queue: the socket is now closing as a slow consumer.
    Overflowed,
}

impl Mailbox {
    /// Queues a frame unless the socket is closing; overflowing `bound` closes it instead.
    pub(crate) fn push(&self, item: Outbound, bound: usize) -> Pushed {
        self.push_all(std::iter::once(item), bound).1
    }

    /// Queues several frames with one lock and at most one wake-up; returns how many were
    /// queued and how the last push went (as [`Mailbox::push`]).
    pub(crate) fn push_all(&self, items: impl Iterator<Item = Outbound>, bound: usize) -> (u64, Pushed) {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return (0, Pushed::Closing);
        }
        let was_empty = state.queue.is_empty();
        let mut queued = 0;
        for item in items {
            if state.queue.len() >= bound {
                state.queue = VecDeque::new();
                state.close = Some(CloseReason::SLOW_CONSUMER);
                drop(state);
                self.wake.notify_one();
                return (queued, Pushed::Overflowed);
            }
            state.queue.push_back(item);
            queued += 1;
        }
        drop(state);
        // The writer always takes the whole queue, so only the first frame needs to wake it.
        if was_empty && queued > 0 {
            self.wake.notify_one();
        }
        (queued, Pushed::Queued)
    }

    /// Asks the socket to close with `reason` after what is already queued.
    pub(crate) fn close(&self, reason: CloseReason) {
        let mut state = self.state.lock();
        if state.close.is_none() {
            state.close = Some(reason);
            drop(state);
            self.wake.notify_one();
        }
    }

    /// Takes everything pending, leaving an empty queue that holds no memory.
    pub(crate) fn drain(&self) -> Drained {
        let mut state = self.state.lock();
        Drained {
            frames: std::mem::take(&mut state.queue),
            close: state.close,
        }
    }

    /// Resolves when something was pushed or a close was requested since the last drain.
    pub(crate) async fn wait(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: u8) -> Outbound {
        Outbound::control(Bytes::from(vec![n]))
    }

    #[test]
    fn a_queued_frame_costs_no_more_for_its_recv_key() {
        // Every queued frame of every socket carries the key: the niche of the room id keeps
        // `None` free.
        assert_eq!(size_of::<Option<RecvKey>>(), size_of::<RecvKey>());
        assert_eq!(size_of::<Outbound>(), size_of::<Bytes>() + 16);
    }

    #[tokio::test]
    async fn drains_everything_and_wakes_once() {
        let mailbox = Mailbox::default();
        assert_eq!(mailbox.push(item(1), 4), Pushed::Queued);
        assert_eq!(mailbox.push(item(2), 4), Pushed::Queued);
        mailbox.wait().await;
        let drained = mailbox.drain();
        assert_eq!(drained.frames.len(), 2);
        assert_eq!(drained.close, None);
        assert_eq!(mailbox.drain().frames.len(), 0);
    }

    #[tokio::test]
    async fn push_all_queues_in_order_and_overflows_like_push() {
        let mailbox = Mailbox::default();
        assert_eq!(mailbox.push_all((1..=3).map(item), 4), (3, Pushed::Queued));
        mailbox.wait().await;
        let frames: Vec<u8> = mailbox.drain().frames.iter().map(|o| o.frame[0]).collect();
        assert_eq!(frames, [1, 2, 3]);
        assert_eq!(mailbox.push_all((1..=5).map(item), 4), (4, Pushed::Overflowed));
        assert_eq!(mailbox.push_all((1..=2).map(item), 4), (0, Pushed::Closing));
        assert_eq!(mailbox.drain().close, Some(CloseReason::SLOW_CONSUMER));
    }

    #[tokio::test]
    async fn overflow_drops_the_queue_and_closes() {
        let mailbox = Mailbox::default();
        for n in 0..3 {
            assert_eq!(mailbox.push(item(n), 3), Pushed::Queued);
        }
        assert_eq!(mailbox.push(item(9), 3), Pushed::Overflowed);
        assert_eq!(mailbox.push(item(10), 3), Pushed::Closing);
        mailbox.wait().await;
        let drained = mailbox.drain();
        assert!(drained.frames.is_empty());
        assert_eq!(drained.close, Some(CloseReason::SLOW_CONSUMER));
    }
}
