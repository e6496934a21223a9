//! A worker's answerer: takes the worker's sequenced batches in order, waits for each batch's
//! write, then answers its messages and publishes its events, so answers and events leave
//! strictly in `sent` order while the worker already sequences the next batches.
//!
//! A failed write fails its batch and every later batch of the same generation (they were
//! sequenced on top of it: their outcome is unknown too, code 5), and is reported to the worker
//! through [`Progress`], which then starts a new generation under a new claim.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use chatoy_bus::{DynBus, Work};
use chatoy_protocol::bus::{MsgReply, RoomEvent};
use chatoy_protocol::{SendCode, Timestamp};
use chatoy_store::{PendingWrite, StoreError};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::core::Decision;
use crate::metrics::Metrics;

/// A sequenced batch on its way to be answered.
pub(crate) struct InFlight {
    /// The worker's generation when the batch was sequenced.
    pub(crate) generation: u64,
    /// The write; `None` when nothing of the batch needed writing.
    pub(crate) write: Option<PendingWrite>,
    /// Every message of the batch with what was decided, in order.
    pub(crate) items: Vec<Item>,
    pub(crate) submitted: Instant,
}

/// One message of a batch.
pub(crate) struct Item {
    pub(crate) work: Work,
    pub(crate) decision: Decision,
    /// The event to publish once written: a new message, or a stored one published again.
    pub(crate) event: Option<RoomEvent>,
}

/// What the answerer tells its worker: the newest generation whose write failed (and whether
/// it failed because the partition was claimed by another router), and how many batches are
/// handed over but not answered yet.
#[derive(Default)]
pub(crate) struct Progress {
    failed: Mutex<Option<(u64, bool)>>,
    unanswered: AtomicUsize,
}

impl Progress {
    /// Counts a batch handed to the answerer.
    pub(crate) fn handed_over(&self) {
        self.unanswered.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether every batch handed over is answered.
    pub(crate) fn idle(&self) -> bool {
        self.unanswered.load(Ordering::Acquire) == 0
    }

    /// Whether a write of `generation` (or a later one) failed; `Some(deposed)` if so.
    pub(crate) fn since(&self, generation: u64) -> Option<bool> {
        self.failed
            .lock()
            .filter(|(failed, _)| *failed >= generation)
            .map(|(_, deposed)| deposed)
    }

    fn record(&self, generation: u64, deposed: bool) {
        let mut failed = self.failed.lock();
        if failed.is_none_or(|(known, _)| known < generation) {
            *failed = Some((generation, deposed));
        }
    }
}

/// Answers the worker's batches until the worker drops its sender.
pub(crate) async fn run(
    mut queue: mpsc::Receiver<InFlight>,
    bus: DynBus,
    metrics: Metrics,
    progress: Arc<Progress>,
) {
    while let Some(batch) = queue.recv().await {
        let InFlight {
            generation,
            write,
            items,
            submitted,
        } = batch;
        let written = if progress.since(generation).is_some() {
            Err(StoreError::unavailable(
                "an earlier write of this batch's generation failed",
            ))
        } else {
            match write {
                Some(write) => {
                    let outcome = write.await;
                    metrics.store.observe(submitted.elapsed().as_secs_f64());
                    match &outcome {
                        Ok(()) => metrics.batches.inc(),
                        Err(StoreError::Deposed) => {
                            tracing::warn!("deposed: another router claimed the partition");
                            metrics.deposed.inc();
                            progress.record(generation, true);
                        }
                        Err(err) => {
                            tracing::warn!(cause = %err, "store write failed");
                            metrics.store_errors.inc();
                            progress.record(generation, false);
                        }
                    }
                    outcome
                }
                None => Ok(()),
            }
        };
        let started = Instant::now();
        let failed = written.is_err();
        for item in items {
            answer(&bus, &metrics, item, failed).await;
        }
        metrics.reply.observe(started.elapsed().as_secs_f64());
        progress.unanswered.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers one message; `failed` when its batch's write did not complete.
async fn answer(bus: &DynBus, metrics: &Metrics, item: Item, failed: bool) {
    let Item {
        work,
        decision,
        event,
    } = item;
    let (reply, event) = match decision {
        Decision::Refuse(code) => (refused_reply(code), None),
        _ if failed => (refused_reply(SendCode::Unavailable), None),
        Decision::Store { sent, .. } | Decision::Duplicate { sent, .. } => (accepted(sent), event),
    };
    match reply.code {
        SendCode::Ok if matches!(decision, Decision::Store { .. }) => metrics.stored.inc(),
        SendCode::Ok => metrics.duplicates.inc(),
        SendCode::Unavailable => metrics.unavailable.inc(),
        _ => metrics.refused.inc(),
    }
    work.respond(reply).await;
    if let Some(event) = event {
        if let Err(err) = bus.publish_room(event).await {
            // Stored and acked: members still get it through `since` and history.
            tracing::warn!(cause = %err, "publishing a stored message failed");
        }
    }
}

fn accepted(sent: Timestamp) -> MsgReply {
    MsgReply {
        code: SendCode::Ok,
        msg: String::new(),
        sent,
    }
}

fn refused_reply(code: SendCode) -> MsgReply {
    MsgReply {
        code,
        msg: code.message().to_owned(),
        sent: Timestamp::now(),
    }
}
