//! The router's Prometheus metrics: what its workers decided and where an ack's time goes
//! (waiting on the bus, sequencing, the store write, answering and publishing).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

/// Latency buckets in seconds, from 100 µs to 10 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// Handles to every router metric.
#[derive(Clone)]
pub struct Metrics {
    /// Messages by what became of them.
    pub(crate) stored: IntCounter,
    pub(crate) duplicates: IntCounter,
    pub(crate) refused: IntCounter,
    pub(crate) unavailable: IntCounter,
    /// Batches written.
    pub(crate) batches: IntCounter,
    /// Partition claims made, and writes refused because a newer claim deposed this router.
    pub(crate) claims: IntCounter,
    pub(crate) deposed: IntCounter,
    /// Batches whose write failed (outcome unknown: answered code 5).
    pub(crate) store_errors: IntCounter,
    /// Messages per batch.
    pub(crate) batch_size: Histogram,
    /// From the bus taking a message in to a worker taking it.
    pub(crate) queue_wait: Histogram,
    /// From taking a batch to submitting its write: membership, room opening and uuid lookups
    /// in the store, and the sequencing itself.
    pub(crate) sequencing: Histogram,
    /// From submitting a batch's write to its completion (pipelined: batches overlap).
    pub(crate) store: Histogram,
    /// From a batch's completion to every answer sent and every event published.
    pub(crate) reply: Histogram,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let messages = IntCounterVec::new(
            Opts::new(
                "chatoy_router_messages_total",
                "Messages a router answered, by outcome.",
            ),
            &["outcome"],
        )?;
        let events = IntCounterVec::new(
            Opts::new(
                "chatoy_router_events_total",
                "Router events: batches written, partition claims, deposed writes, failed writes.",
            ),
            &["event"],
        )?;
        let histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
        };
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("chatoy_router_batch_messages", "Messages per router batch.")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0]),
        )?;
        let queue_wait = histogram(
            "chatoy_router_queue_wait_seconds",
            "Time a message waited on the bus before a router worker took it.",
        )?;
        let sequencing = histogram(
            "chatoy_router_sequence_seconds",
            "Time from taking a batch to submitting its write (membership, room opening, uuid lookups).",
        )?;
        let store = histogram(
            "chatoy_router_store_seconds",
            "Time from submitting a batch's write to its completion, fence check included.",
        )?;
        let reply = histogram(
            "chatoy_router_reply_seconds",
            "Time to answer a written batch's messages and publish its events.",
        )?;
        for collector in [
            Box::new(messages.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(events.clone()),
            Box::new(batch_size.clone()),
            Box::new(queue_wait.clone()),
            Box::new(sequencing.clone()),
            Box::new(store.clone()),
            Box::new(reply.clone()),
        ] {
            registry.register(collector)?;
        }
        Ok(Metrics {
            stored: messages.with_label_values(&["stored"]),
            duplicates: messages.with_label_values(&["duplicate"]),
            refused: messages.with_label_values(&["refused"]),
            unavailable: messages.with_label_values(&["unavailable"]),
            batches: events.with_label_values(&["batch"]),
            claims: events.with_label_values(&["claim"]),
            deposed: events.with_label_values(&["deposed"]),
            store_errors: events.with_label_values(&["store_error"]),
            batch_size,
            queue_wait,
            sequencing,
            store,
            reply,
        })
    }
}
