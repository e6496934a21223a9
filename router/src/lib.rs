//! The router: the message pipeline between the bus and the store.
//!
//! Each bus partition is consumed by one worker (`worker.rs`), in order, and its rooms are
//! written under a fence claimed in the store, so exactly one sequencer owns each room even
//! when a partition moves between routers. A worker takes whatever is pending (up to a batch),
//! asks the store what the sequencing core (`core.rs`) needs — membership, rooms opened under
//! the fence, stored messages whose uuids it does not remember — lets the core assign `sent`
//! (strictly increasing per room) and recognise retries, and submits the batch's write. While
//! that write is under way the next batch is sequenced; answers and events leave strictly in
//! order, each batch only after its write completed and the fence still held. Each published
//! event names the `sent` of the one published before it in the room, so a gateway notices a
//! message stored by a router that died before publishing it and reads it from the store.

mod answer;
mod core;
mod metrics;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use chatoy_bus::DynBus;
use chatoy_protocol::backoff::Backoff;
use chatoy_store::DynStore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use metrics::Metrics;

/// Router settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Most messages one worker takes in one batch.
    pub max_batch: usize,
    /// Batches one worker may have being written at once (1: no pipelining).
    pub pipeline: usize,
    /// uuids one worker remembers, to answer retries without asking the store.
    pub remembered_uuids: usize,
    /// Rooms one worker remembers; beyond this, the least recently used are forgotten (and
    /// opened again when next used).
    pub remembered_rooms: usize,
    /// (room, user) memberships one worker remembers.
    pub remembered_members: usize,
    /// This router's name in partition claims (`partition_owners.owner`).
    pub name: String,
    /// How long shutdown waits for the batches in hand to be answered.
    pub drain_timeout: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            max_batch: 256,
            pipeline: 4,
            remembered_uuids: 100_000,
            remembered_rooms: 100_000,
            remembered_members: 100_000,
            name: "router".into(),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the router could not run.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The bus never handed out its work before shutdown.
    #[error("cannot consume work: {0}")]
    Bus(#[from] chatoy_bus::BusError),
}

/// A running router: one worker per partition this process consumes.
pub struct Router {
    workers: TaskTracker,
    stop_work: CancellationToken,
    drain_timeout: Duration,
}

impl Router {
    /// Takes the bus's work (retrying, with capped exponential backoff, while the bus cannot
    /// hand it out yet) and starts the workers; `Err` if `shutdown` came first or the bus is
    /// laid out for another number of partitions.
    pub async fn start(
        config: RouterConfig,
        bus: DynBus,
        store: DynStore,
        metrics: Metrics,
        shutdown: &CancellationToken,
    ) -> Result<Router, RouterError> {
        let config = Arc::new(config);
        let stop_work = CancellationToken::new();
        let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let sources = loop {
            match bus.work().await {
                Ok(sources) => break sources,
                Err(err @ chatoy_bus::BusError::Misconfigured(_)) => return Err(RouterError::Bus(err)),
                Err(err) => {
                    tracing::warn!(cause = %err, "cannot consume work yet; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(retry.next_delay()) => {}
                        _ = shutdown.cancelled() => return Err(RouterError::Bus(err)),
                    }
                }
            }
        };
        tracing::info!(partitions = sources.len(), "router consuming");
        let workers = TaskTracker::new();
        for source in sources {
            let worker = worker::Worker::new(
                bus.clone(),
                store.clone(),
                config.clone(),
                metrics.clone(),
                source,
            );
            workers.spawn(worker.run(stop_work.clone()));
        }
        workers.close();
        Ok(Router {
            workers,
            stop_work,
            drain_timeout: config.drain_timeout,
        })
    }

    /// Waits for `shutdown`, then lets the workers answer what they hold for up to the drain
    /// timeout; what is left unanswered is delivered again by the bus.
    pub async fn run_until(self, shutdown: CancellationToken) {
        shutdown.cancelled().await;
        self.stop_work.cancel();
        if tokio::time::timeout(self.drain_timeout, self.workers.wait())
            .await
            .is_err()
        {
            tracing::warn!("drain timeout passed with work in hand; it will be delivered again");
        }
    }
}

/// Runs a router until `shutdown` ([`Router::start`], then [`Router::run_until`]).
pub async fn run(
    config: RouterConfig,
    bus: DynBus,
    store: DynStore,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), RouterError> {
    let router = Router::start(config, bus, store, metrics, &shutdown).await?;
    router.run_until(shutdown).await;
    Ok(())
}
