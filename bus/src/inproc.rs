//! The in-process bus of the single-process default: bounded channels for work, one broadcast
//! channel per subscribed room or user for events. Same semantics as the NATS bus.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use chatoy_protocol::bus::{MsgRequest, RoomEvent, UserEvent};
use futures_util::stream;
use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::{Bus, BusError, Delivery, PendingReply, Responder, Subscription, Work, WorkSource};

/// Room events buffered per subscriber before it counts as lagging and gets a
/// [`Delivery::Gap`]. The queue allocates as it fills, so an idle room costs little.
const EVENT_BUFFER: usize = 4096;
/// User events buffered for the (single) user-event subscriber of a gateway.
const USER_EVENT_BUFFER: usize = 1024;
/// Work items queued per partition before submitters wait.
const WORK_BUFFER: usize = 4096;

/// The in-process [`Bus`].
#[derive(Clone)]
pub struct InProcBus {
    inner: Arc<Inner>,
}

struct Inner {
    partitions: Vec<mpsc::Sender<Work>>,
    receivers: Mutex<Option<Vec<mpsc::Receiver<Work>>>>,
    rooms: Topics<u64, RoomEvent>,
    users: broadcast::Sender<(u64, UserEvent)>,
}

impl InProcBus {
    /// A bus whose rooms are split over `partitions` ordered work queues.
    pub fn new(partitions: usize) -> InProcBus {
        let (senders, receivers) = (0..partitions.max(1)).map(|_| mpsc::channel(WORK_BUFFER)).unzip();
        InProcBus {
            inner: Arc::new(Inner {
                partitions: senders,
                receivers: Mutex::new(Some(receivers)),
                rooms: Topics::default(),
                users: broadcast::channel(USER_EVENT_BUFFER).0,
            }),
        }
    }
}

#[async_trait]
impl Bus for InProcBus {
    async fn submit(&self, request: MsgRequest) -> Result<PendingReply, BusError> {
        let partitions = &self.inner.partitions;
        let partition = chatoy_protocol::partition_of(request.room, partitions.len() as u32);
        let queue = &partitions[partition as usize];
        let (tx, rx) = oneshot::channel();
        let work = Work {
            request,
            enqueued: Some(std::time::SystemTime::now()),
            responder: Responder::InProc(tx),
        };
        queue
            .send(work)
            .await
            .map_err(|_| BusError::Unavailable("no router is consuming".into()))?;
        Ok(Box::pin(async move {
            rx.await
                .map_err(|_| BusError::Unavailable("the router dropped the request".into()))
        }))
    }

    async fn work(&self) -> Result<Vec<Box<dyn WorkSource>>, BusError> {
        let receivers =
            self.inner.receivers.lock().take().ok_or_else(|| {
                BusError::Unavailable("the in-process work queues are already taken".into())
            })?;
        Ok(receivers
            .into_iter()
            .enumerate()
            .map(|(partition, rx)| {
                Box::new(InProcWork {
                    rx,
                    partition: partition as u32,
                }) as Box<dyn WorkSource>
            })
            .collect())
    }

    async fn publish_room(&self, event: RoomEvent) -> Result<(), BusError> {
        self.inner.rooms.publish(&event.room.clone(), event);
        Ok(())
    }

    async fn subscribe_room(&self, room: u64) -> Result<Subscription<RoomEvent>, BusError> {
        Ok(self.inner.rooms.subscribe(room))
    }

    async fn publish_user(&self, user: u64, event: UserEvent) -> Result<(), BusError> {
        // No receiver means no gateway runs right now: nothing to tell.
        let _ = self.inner.users.send((user, event));
        Ok(())
    }

    async fn subscribe_users(&self) -> Result<Subscription<(u64, UserEvent)>, BusError> {
        let receiver = self.inner.users.subscribe();
        let events = stream::unfold(receiver, |mut receiver| async move {
            let delivery = match receiver.recv().await {
                Ok(event) => Delivery::Event(event),
                Err(broadcast::error::RecvError::Lagged(_)) => Delivery::Gap,
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((delivery, receiver))
        });
        Ok(Subscription::new(Box::pin(events)))
    }

    fn is_ready(&self) -> bool {
        true
    }
}

struct InProcWork {
    rx: mpsc::Receiver<Work>,
    partition: u32,
}

#[async_trait]
impl WorkSource for InProcWork {
    fn partition(&self) -> u32 {
        self.partition
    }

    async fn next_batch(&mut self, max: usize, out: &mut Vec<Work>) -> bool {
        self.rx.recv_many(out, max).await > 0
    }
}

/// Subscribers by key, each with its own bounded queue; a subscriber whose queue is full when
/// an event comes is marked lagging and sees a [`Delivery::Gap`].
struct Topics<K, T> {
    channels: Arc<Mutex<HashMap<K, Vec<Subscriber<T>>>>>,
    next_id: AtomicU64,
}

struct Subscriber<T> {
    id: u64,
    queue: mpsc::Sender<T>,
    lagged: Arc<AtomicBool>,
}

impl<K, T> Default for Topics<K, T> {
    fn default() -> Self {
        Topics {
            channels: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(1),
        }
    }
}

impl<K, T> Topics<K, T>
where
    K: Hash + Eq + Copy + Send + Sync + 'static,
    T: Clone + Send + 'static,
{
    fn publish(&self, key: &K, event: T) {
        let channels = self.channels.lock();
        for subscriber in channels.get(key).into_iter().flatten() {
            if let Err(mpsc::error::TrySendError::Full(_)) = subscriber.queue.try_send(event.clone()) {
                subscriber.lagged.store(true, Ordering::Release);
            }
        }
    }

    fn subscribe(&self, key: K) -> Subscription<T> {
        let (queue, receiver) = mpsc::channel(EVENT_BUFFER);
        let lagged = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.channels.lock().entry(key).or_default().push(Subscriber {
            id,
            queue,
            lagged: lagged.clone(),
        });
        let guard = Unsubscribe {
            channels: self.channels.clone(),
            key,
            id,
        };
        let events = stream::unfold(
            (receiver, lagged, guard),
            |(mut receiver, lagged, guard)| async move {
                if lagged.swap(false, Ordering::AcqRel) {
                    return Some((Delivery::Gap, (receiver, lagged, guard)));
                }
                let event = receiver.recv().await?;
                Some((Delivery::Event(event), (receiver, lagged, guard)))
            },
        );
        Subscription::new(Box::pin(events))
    }
}

/// Removes a subscriber from its topic, and the topic with its last subscriber.
struct Unsubscribe<K: Hash + Eq, T> {
    channels: Arc<Mutex<HashMap<K, Vec<Subscriber<T>>>>>,
    key: K,
    id: u64,
}

impl<K: Hash + Eq, T> Drop for Unsubscribe<K, T> {
    fn drop(&mut self) {
        let mut channels = self.channels.lock();
        if let Some(subscribers) = channels.get_mut(&self.key) {
            subscribers.retain(|subscriber| subscriber.id != self.id);
            if subscribers.is_empty() {
                channels.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use chatoy_protocol::bus::{MsgReply, Origin};
    use chatoy_protocol::{MessageContent, SendCode, Timestamp};
    use std::time::Duration;

    fn event(room: u64, n: i64) -> RoomEvent {
        RoomEvent {
            room,
            sent: Timestamp(n),
            prev: Some(Timestamp(n - 1)),
            origin: Origin { gateway: 1, conn: 1 },
            frame: Bytes::from_static(b"{}"),
        }
    }

    #[tokio::test]
    async fn room_events_reach_subscribers_of_that_room_only() {
        let bus = InProcBus::new(4);
        let mut one = bus.subscribe_room(1).await.unwrap();
        let mut two = bus.subscribe_room(2).await.unwrap();
        bus.publish_room(event(1, 10)).await.unwrap();
        bus.publish_room(event(2, 20)).await.unwrap();
        assert_eq!(one.next().await, Some(Delivery::Event(event(1, 10))));
        assert_eq!(two.next().await, Some(Delivery::Event(event(2, 20))));
        let mut another = bus.subscribe_room(1).await.unwrap();
        drop(one);
        assert!(bus.inner.rooms.channels.lock().contains_key(&1));
        bus.publish_room(event(1, 11)).await.unwrap();
        assert_eq!(another.next().await, Some(Delivery::Event(event(1, 11))));
        drop(another);
        assert!(!bus.inner.rooms.channels.lock().contains_key(&1));
        assert!(bus.inner.rooms.channels.lock().contains_key(&2));
    }

    #[tokio::test]
    async fn lagging_subscriber_sees_a_gap() {
        let bus = InProcBus::new(1);
        let mut sub = bus.subscribe_room(1).await.unwrap();
        for n in 0..(EVENT_BUFFER as i64 + 10) {
            bus.publish_room(event(1, n)).await.unwrap();
        }
        assert_eq!(sub.next().await, Some(Delivery::Gap));
    }

    #[tokio::test]
    async fn requests_are_answered_by_the_partition_consumer() {
        let bus = InProcBus::new(2);
        let mut sources = bus.work().await.unwrap();
        assert_eq!(sources.len(), 2);
        assert!(bus.work().await.is_err(), "work is taken once");
        let mut source = sources.remove(1);
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while source.next_batch(8, &mut batch).await {
                for work in batch.drain(..) {
                    assert_eq!(work.request.room % 2, 1);
                    work.respond(MsgReply {
                        code: SendCode::Ok,
                        msg: String::new(),
                        sent: Timestamp(7),
                    })
                    .await;
                }
            }
        });
        let request = MsgRequest {
            uuid: uuid::Uuid::new_v4(),
            sender: 1,
            room: 3,
            content: MessageContent::Text { text: "hi".into() },
            origin: Origin { gateway: 1, conn: 1 },
        };
        let pending = bus.submit(request.clone()).await.unwrap();
        let reply = crate::wait_reply(pending, Duration::from_secs(5)).await.unwrap();
        assert_eq!(reply.sent, Timestamp(7));
        // Room 2 lands in partition 0, which nobody consumes: the wait times out.
        let stuck = bus.submit(MsgRequest { room: 2, ..request }).await.unwrap();
        let err = crate::wait_reply(stuck, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, BusError::Timeout));
    }
}
