//! The router's side of the bus: one partition's pull stream of requests.

use std::time::Duration;

use async_nats::Client;
use async_trait::async_trait;
use chatoy_protocol::backoff::Backoff;
use chatoy_protocol::bus::MsgRequest;
use futures_util::StreamExt;

use super::{PRIORITY_GROUP, REPLY_HEADER};
use crate::{Responder, Work, WorkSource};

/// One partition's pull stream in the `routers` priority group.
///
/// A task keeps pulling while the router works on a batch: the server keeps a partition pinned
/// to a router only while that router sends pull requests, and a batch that takes longer than
/// the failover timeout (a slow store) must not hand the rooms to a second sequencer meanwhile.
pub(super) struct NatsWork {
    consumer: async_nats::jetstream::consumer::PullConsumer,
    puller: Option<Puller>,
    client: Client,
    expires: Duration,
    partition: u32,
}

/// The pulling task and what it pulled.
struct Puller {
    incoming: tokio::sync::mpsc::Receiver<async_nats::jetstream::Message>,
    task: tokio::task::AbortHandle,
}

impl Drop for NatsWork {
    fn drop(&mut self) {
        // Pulled but never worked on (a router shutting down): hand back at once rather than
        // after the ack wait.
        self.stop_puller();
    }
}

impl NatsWork {
    pub(super) fn new(
        consumer: async_nats::jetstream::consumer::PullConsumer,
        client: Client,
        expires: Duration,
        partition: u32,
    ) -> NatsWork {
        NatsWork {
            consumer,
            puller: None,
            client,
            expires,
            partition,
        }
    }

    /// Stops pulling and hands back (NAK) what was pulled but not taken.
    fn stop_puller(&mut self) {
        let Some(mut puller) = self.puller.take() else {
            return;
        };
        puller.task.abort();
        let mut unworked = Vec::new();
        while let Ok(message) = puller.incoming.try_recv() {
            unworked.push(message);
        }
        if !unworked.is_empty() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    for message in unworked {
                        let _ = message.ack_with(async_nats::jetstream::AckKind::Nak(None)).await;
                    }
                });
            }
        }
    }

    fn start_puller(&self, max: usize) -> Puller {
        let (tx, incoming) = tokio::sync::mpsc::channel(max * 2);
        let consumer = self.consumer.clone();
        let (expires, partition) = (self.expires, self.partition);
        let task = tokio::spawn(async move {
            let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
            loop {
                let opened = consumer
                    .stream()
                    .group(PRIORITY_GROUP)
                    .max_messages_per_batch(max)
                    .expires(expires)
                    .heartbeat(expires / 2)
                    .messages()
                    .await;
                let mut messages = match opened {
                    Ok(messages) => messages,
                    Err(err) => {
                        tracing::warn!(cause = %err, partition, "cannot pull; retrying");
                        tokio::time::sleep(retry.next_delay()).await;
                        continue;
                    }
                };
                retry.reset();
                while let Some(next) = messages.next().await {
                    match next {
                        Ok(message) => {
                            if tx.send(message).await.is_err() {
                                return;
                            }
                        }
                        Err(err) => tracing::debug!(cause = %err, partition, "pull error"),
                    }
                }
            }
        })
        .abort_handle();
        Puller { incoming, task }
    }

    fn work(&self, message: async_nats::jetstream::Message) -> Option<Work> {
        let reply = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(REPLY_HEADER))
            .map(|value| value.as_str().to_owned());
        let enqueued = message
            .info()
            .ok()
            .map(|info| std::time::SystemTime::from(info.published));
        match serde_json::from_slice::<MsgRequest>(&message.payload) {
            Ok(request) => Some(Work {
                request,
                enqueued,
                responder: Responder::Nats {
                    client: self.client.clone(),
                    reply,
                    message: Box::new(message),
                },
            }),
            Err(err) => {
                tracing::warn!(cause = %err, partition = self.partition, "dropping an undecodable msg");
                tokio::spawn(async move {
                    let _ = message.ack().await;
                });
                None
            }
        }
    }
}

#[async_trait]
impl WorkSource for NatsWork {
    fn partition(&self) -> u32 {
        self.partition
    }

    async fn release(&mut self) {
        // The next `next_batch` pulls again; the server gives it work only if this router holds
        // the partition's pin.
        self.stop_puller();
    }

    async fn next_batch(&mut self, max: usize, out: &mut Vec<Work>) -> bool {
        let max = max.max(1);
        if self.puller.is_none() {
            self.puller = Some(self.start_puller(max));
        }
        let Some(puller) = self.puller.as_mut() else {
            return false;
        };
        let Some(first) = puller.incoming.recv().await else {
            return false;
        };
        let mut messages = vec![first];
        // Take whatever else is already here, without waiting.
        while messages.len() < max {
            match puller.incoming.try_recv() {
                Ok(message) => messages.push(message),
                Err(_) => break,
            }
        }
        out.extend(messages.into_iter().filter_map(|message| self.work(message)));
        true
    }
}
