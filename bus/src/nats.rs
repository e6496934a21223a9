//! The NATS bus of cluster mode.
//!
//! - Work: gateways publish each `msg` to the JetStream stream on `<prefix>.msg.<partition>.<room>`
//!   (the partition is `room % partitions`, computed by the gateway so no server-side mapping is
//!   needed) with the subject to answer on in the `Chatoy-Reply` header. Each partition is one
//!   durable pull consumer with a `pinned_client` priority group: every router pulls every
//!   partition, the server pins each partition to one of them, and moves the pin when that
//!   router stops pulling. So each room has exactly one sequencer, and failover needs no code
//!   here. Messages are acknowledged to the stream only after they are stored and answered.
//! - Answers: `<prefix>.reply.<gateway>.<request>`, one wildcard subscription per gateway.
//! - Events: core NATS on `<prefix>.room.<room>` (binary `RoomEvent`) and `<prefix>.user.<user>`
//!   (JSON `UserEvent`). A reconnect or a slow-consumer report turns into [`Delivery::Gap`] on
//!   every subscription, so gateways backfill from the store.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::{AckPolicy, PriorityPolicy};
use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
use async_nats::{Client, Event, HeaderMap, ServerAddr};
use async_trait::async_trait;
use bytes::Bytes;
use chatoy_protocol::bus::{MsgReply, MsgRequest, RoomEvent, UserEvent};
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{broadcast, oneshot};

use crate::{Bus, BusError, Delivery, PendingReply, Subscription, WorkSource};

mod work;
use work::NatsWork;

/// The work stream's metadata key holding the number of partitions it was laid out for.
const PARTITIONS_KEY: &str = "chatoy_partitions";
const REPLY_HEADER: &str = "Chatoy-Reply";
const PRIORITY_GROUP: &str = "routers";

/// How the NATS bus is set up; every process of a cluster must agree on all but `name`.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URLs, comma-separated (`nats://127.0.0.1:4222`).
    pub url: String,
    /// Subject prefix, so several deployments can share one NATS (`chatoy`).
    pub prefix: String,
    /// Partitions the rooms are spread over; each is one sequencer. Fixed for a deployment.
    pub partitions: u32,
    /// Replicas of the work stream (1 for one NATS server, 3 for a cluster).
    pub replicas: usize,
    /// A router that stops pulling loses its partitions after this long.
    pub failover_timeout: Duration,
    /// Messages a partition may have delivered but not yet acknowledged.
    pub max_in_flight: i64,
    /// The client name NATS shows for this process.
    pub name: String,
}

/// The NATS [`Bus`].
pub struct NatsBus {
    client: Client,
    jetstream: async_nats::jetstream::Context,
    config: NatsConfig,
    gateway: u64,
    next_request: AtomicU64,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<MsgReply>>>>,
    gaps: broadcast::Sender<()>,
    reply_task: tokio::task::JoinHandle<()>,
}

impl Drop for NatsBus {
    fn drop(&mut self) {
        self.reply_task.abort();
    }
}

impl NatsBus {
    /// Connects (retrying in the background if NATS is not up yet) and starts the answer listener.
    ///
    /// `config.url` may list several servers, comma-separated: the client picks one at random
    /// and, when it loses it, reconnects to any other (besides those the cluster announces).
    pub async fn connect(config: NatsConfig) -> Result<NatsBus, BusError> {
        let servers = server_urls(&config.url)?;
        let (gaps, _) = broadcast::channel(16);
        let signal = gaps.clone();
        let client = async_nats::ConnectOptions::new()
            .name(config.name.clone())
            .retry_on_initial_connect()
            .max_reconnects(None)
            .subscription_capacity(16 * 1024)
            .event_callback(move |event| {
                let signal = signal.clone();
                async move {
                    match event {
                        Event::Connected => {
                            tracing::info!("nats connected");
                            let _ = signal.send(());
                        }
                        Event::SlowConsumer(sid) => {
                            tracing::warn!(sid, "nats dropped messages for a slow subscription");
                            let _ = signal.send(());
                        }
                        Event::Disconnected => tracing::warn!("nats disconnected"),
                        other => tracing::info!(event = %other, "nats event"),
                    }
                }
            })
            .connect(servers.as_slice())
            .await
            .map_err(|err| {
                BusError::Unavailable(format!("cannot connect to NATS at {}: {err}", redacted(&servers)))
            })?;
        let gateway = rand::random::<u64>();
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<MsgReply>>>> = Arc::default();
        let replies = client
            .subscribe(format!("{}.reply.{gateway}.*", config.prefix))
            .await
            .map_err(unavailable)?;
        let reply_task = tokio::spawn(route_replies(replies, pending.clone()));
        Ok(NatsBus {
            jetstream: async_nats::jetstream::new(client.clone()),
            client,
            config,
            gateway,
            next_request: AtomicU64::new(1),
            pending,
            gaps,
            reply_task,
        })
    }

    /// The work stream, created if missing, once it is known to be laid out for this process's
    /// number of partitions (recorded in the stream's metadata by whoever created it).
    async fn work_stream(&self) -> Result<async_nats::jetstream::stream::Stream, BusError> {
        let prefix = &self.config.prefix;
        let partitions = self.config.partitions.max(1).to_string();
        let mut stream = self
            .jetstream
            .get_or_create_stream(async_nats::jetstream::stream::Config {
                name: self.stream_name(),
                subjects: vec![format!("{prefix}.msg.>")],
                retention: RetentionPolicy::WorkQueue,
                storage: StorageType::File,
                num_replicas: self.config.replicas.max(1),
                max_age: Duration::from_secs(24 * 3600),
                metadata: HashMap::from([(PARTITIONS_KEY.to_owned(), partitions.clone())]),
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let info = stream.info().await.map_err(unavailable)?.clone();
        match info.config.metadata.get(PARTITIONS_KEY) {
            Some(theirs) if *theirs == partitions => {}
            Some(theirs) => {
                return Err(BusError::Misconfigured(format!(
                    "this process uses {partitions} partitions (--partitions), but the work \
                     stream {} was laid out for {theirs}: every gateway and router must use the \
                     same number (docs/operations.md, \"Changing the number of partitions\")",
                    info.config.name
                )))
            }
            None => {
                // Made by a version that did not record it: record this process's.
                let mut config = info.config;
                config.metadata.insert(PARTITIONS_KEY.to_owned(), partitions);
                self.jetstream.update_stream(config).await.map_err(unavailable)?;
            }
        }
        Ok(stream)
    }

    fn stream_name(&self) -> String {
        format!(
            "{}_MSG",
            self.config.prefix.to_uppercase().replace(['.', '-'], "_")
        )
    }

    async fn subscribe<T, F>(&self, subject: String, decode: F) -> Result<Subscription<T>, BusError>
    where
        T: Send + 'static,
        F: Fn(&str, Bytes) -> Option<T> + Send + 'static,
    {
        let subscriber = self.client.subscribe(subject).await.map_err(unavailable)?;
        // The subscription is active once the server has processed it. A flush only writes it,
        // so make a round trip on the same connection: a request to a subject nobody serves
        // comes back "no responders" once the server has read everything sent before it.
        let barrier = self
            .client
            .request(format!("{}.barrier", self.config.prefix), Bytes::new());
        match tokio::time::timeout(BARRIER_TIMEOUT, barrier).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) if err.kind() == async_nats::RequestErrorKind::NoResponders => {}
            Ok(Err(err)) => return Err(unavailable(err)),
            Err(_) => return Err(unavailable("no round trip to NATS in time")),
        }
        let gaps = self.gaps.subscribe();
        let events = futures_util::stream::unfold(
            (subscriber, gaps, decode),
            |(mut subscriber, mut gaps, decode)| async move {
                loop {
                    tokio::select! {
                        message = subscriber.next() => {
                            let message = message?;
                            match decode(message.subject.as_str(), message.payload) {
                                Some(event) => return Some((Delivery::Event(event), (subscriber, gaps, decode))),
                                None => tracing::warn!(subject = %message.subject, "undecodable bus event"),
                            }
                        }
                        gap = gaps.recv() => match gap {
                            Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => {
                                return Some((Delivery::Gap, (subscriber, gaps, decode)));
                            }
                            Err(broadcast::error::RecvError::Closed) => return None,
                        },
                    }
                }
            },
        );
        Ok(Subscription::new(Box::pin(events)))
    }
}

/// The servers of a `--nats-url` value: URLs separated by commas, blanks around them allowed.
/// Errors name an entry by its position, never by its text (a URL may hold credentials).
fn server_urls(urls: &str) -> Result<Vec<ServerAddr>, BusError> {
    urls.split(',')
        .map(str::trim)
        .enumerate()
        .map(|(at, url)| {
            if url.is_empty() {
                return Err(BusError::Unavailable(format!(
                    "NATS server URL {} of the list is empty",
                    at + 1
                )));
            }
            url.parse::<ServerAddr>().map_err(|err| {
                BusError::Unavailable(format!("NATS server URL {} of the list: {err}", at + 1))
            })
        })
        .collect()
}

/// The servers as `host:port`, for messages (without any credentials).
fn redacted(servers: &[ServerAddr]) -> String {
    let hosts: Vec<String> = servers
        .iter()
        .map(|server| format!("{}:{}", server.host(), server.port()))
        .collect();
    hosts.join(",")
}

/// A request as published, to publish again when its acknowledgement or its answer was lost.
///
/// Safe because the sequencer owns idempotency: a uuid it already stored is answered with its
/// first `sent`, exactly as when a client resends it (which is what this spares the client).
struct Republish {
    jetstream: async_nats::jetstream::Context,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

type AckWait = futures_util::future::BoxFuture<
    'static,
    Result<async_nats::jetstream::publish::PublishAck, async_nats::jetstream::context::PublishError>,
>;

impl Republish {
    async fn publish(&self) -> Result<AckWait, BusError> {
        let stored = self
            .jetstream
            .publish_with_headers(self.subject.clone(), self.headers.clone(), self.payload.clone())
            .await
            .map_err(unavailable)?;
        Ok(Box::pin(stored.into_future()))
    }

    /// Waits for the answer (the caller bounds the wait). The stream's acknowledgement means
    /// the bus holds the request durably; without it (the server went away, the stream is
    /// electing a leader) the request is published again after a pause. A reconnect may have
    /// lost the answer, so it is published again then too.
    async fn answer(
        &self,
        stored: async_nats::jetstream::context::PublishAckFuture,
        mut rx: oneshot::Receiver<MsgReply>,
        mut gaps: broadcast::Receiver<()>,
    ) -> Result<MsgReply, BusError> {
        let mut ack: Option<AckWait> = Some(Box::pin(stored.into_future()));
        let mut pause = REPUBLISH_PAUSE;
        let mut watching = true;
        loop {
            let waiting = async {
                match ack.as_mut() {
                    Some(wait) => Some(wait.await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                answer = &mut rx => {
                    return answer.map_err(|_| BusError::Unavailable("answer channel closed".into()));
                }
                acked = waiting => match acked {
                    Some(Ok(_)) | None => ack = None,
                    Some(Err(err)) => {
                        tracing::debug!(cause = %err, "no stream acknowledgement: publishing again");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(REPUBLISH_PAUSE_MAX);
                        ack = Some(self.publish().await?);
                    }
                },
                gap = gaps.recv(), if watching => match gap {
                    Err(broadcast::error::RecvError::Closed) => watching = false,
                    Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => ack = Some(self.publish().await?),
                },
            }
        }
    }
}

/// The first pause before publishing a request again; it doubles up to the maximum.
const REPUBLISH_PAUSE: Duration = Duration::from_millis(50);
const REPUBLISH_PAUSE_MAX: Duration = Duration::from_millis(800);

/// Longest wait for the round trip that makes a new subscription certain.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

fn unavailable(err: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(err.to_string())
}

async fn route_replies(
    mut replies: async_nats::Subscriber,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<MsgReply>>>>,
) {
    while let Some(message) = replies.next().await {
        let id = message
            .subject
            .rsplit('.')
            .next()
            .and_then(|id| id.parse::<u64>().ok());
        let reply = serde_json::from_slice::<MsgReply>(&message.payload);
        match (id, reply) {
            (Some(id), Ok(reply)) => {
                if let Some(waiter) = pending.lock().remove(&id) {
                    let _ = waiter.send(reply);
                }
            }
            _ => tracing::warn!(subject = %message.subject, "undecodable answer"),
        }
    }
}

/// Removes a request's waiter however the request ends.
struct PendingGuard {
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<MsgReply>>>>,
    id: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.pending.lock().remove(&self.id);
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn submit(&self, request: MsgRequest) -> Result<PendingReply, BusError> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        let guard = PendingGuard {
            pending: self.pending.clone(),
            id,
        };
        let prefix = &self.config.prefix;
        let partition = chatoy_protocol::partition_of(request.room, self.config.partitions);
        let subject = format!("{prefix}.msg.{partition}.{}", request.room);
        let mut headers = HeaderMap::new();
        headers.insert(
            REPLY_HEADER,
            format!("{prefix}.reply.{}.{id}", self.gateway).as_str(),
        );
        let payload = Bytes::from(serde_json::to_vec(&request).map_err(unavailable)?);
        // Returns once the message is queued on this connection, so submissions keep their order.
        let stored = self
            .jetstream
            .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
            .await
            .map_err(unavailable)?;
        let again = Republish {
            jetstream: self.jetstream.clone(),
            subject,
            headers,
            payload,
        };
        let gaps = self.gaps.subscribe();
        Ok(Box::pin(async move {
            let _guard = guard;
            again.answer(stored, rx, gaps).await
        }))
    }

    async fn work(&self) -> Result<Vec<Box<dyn WorkSource>>, BusError> {
        let prefix = &self.config.prefix;
        let stream = self.work_stream().await?;
        let mut sources: Vec<Box<dyn WorkSource>> = Vec::new();
        for partition in 0..self.config.partitions.max(1) {
            let name = format!("{}-part-{partition}", prefix.replace('.', "-"));
            let consumer: async_nats::jetstream::consumer::PullConsumer = stream
                .get_or_create_consumer(
                    &name,
                    pull::Config {
                        durable_name: Some(name.clone()),
                        filter_subject: format!("{prefix}.msg.{partition}.*"),
                        ack_policy: AckPolicy::Explicit,
                        ack_wait: Duration::from_secs(30),
                        max_ack_pending: self.config.max_in_flight,
                        priority_policy: PriorityPolicy::PinnedClient,
                        priority_groups: vec![PRIORITY_GROUP.to_owned()],
                        priority_timeout: self.config.failover_timeout,
                        ..Default::default()
                    },
                )
                .await
                .map_err(unavailable)?;
            let expires = (self.config.failover_timeout / 3).max(Duration::from_millis(500));
            sources.push(Box::new(NatsWork::new(
                consumer,
                self.client.clone(),
                expires,
                partition,
            )));
        }
        Ok(sources)
    }

    async fn check_layout(&self) -> Result<(), BusError> {
        self.work_stream().await.map(drop)
    }

    async fn publish_room(&self, event: RoomEvent) -> Result<(), BusError> {
        let subject = format!("{}.room.{}", self.config.prefix, event.room);
        self.client
            .publish(subject, event.encode())
            .await
            .map_err(unavailable)
    }

    async fn subscribe_room(&self, room: u64) -> Result<Subscription<RoomEvent>, BusError> {
        self.subscribe(format!("{}.room.{room}", self.config.prefix), |_, payload| {
            RoomEvent::decode(payload)
        })
        .await
    }

    async fn publish_user(&self, user: u64, event: UserEvent) -> Result<(), BusError> {
        let payload = Bytes::from(serde_json::to_vec(&event).map_err(unavailable)?);
        self.client
            .publish(format!("{}.user.{user}", self.config.prefix), payload)
            .await
            .map_err(unavailable)
    }

    async fn subscribe_users(&self) -> Result<Subscription<(u64, UserEvent)>, BusError> {
        self.subscribe(format!("{}.user.*", self.config.prefix), |subject, payload| {
            let user = subject.rsplit('.').next()?.parse::<u64>().ok()?;
            Some((user, serde_json::from_slice(&payload).ok()?))
        })
        .await
    }

    fn is_ready(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn reconnects(&self) -> u64 {
        // The client counts its first connection too.
        let connects = self
            .client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        connects.saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_list_is_every_server() {
        let servers =
            server_urls("nats://127.0.0.1:4222, nats://127.0.0.1:4223,127.0.0.1:4224").expect("parses");
        assert_eq!(redacted(&servers), "127.0.0.1:4222,127.0.0.1:4223,127.0.0.1:4224");
        let one = server_urls("nats://user:secret@nats:4222").expect("parses");
        assert_eq!(redacted(&one), "nats:4222", "credentials stay out of messages");
    }

    #[test]
    fn a_bad_entry_is_named_by_position() {
        let err = server_urls("nats://a:4222,,nats://b:4222")
            .map(|_| ())
            .unwrap_err();
        assert!(err.to_string().contains("URL 2 of the list is empty"), "{err}");
        let err = server_urls("nats://user:secret@a:4222,nats://b:notaport")
            .map(|_| ())
            .unwrap_err();
        assert!(err.to_string().contains("URL 2 of the list"), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
