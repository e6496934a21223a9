//! The gateway's Prometheus metrics. Label children are resolved once so that the hot path only
//! touches atomics.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};

use chatoy_bus::DynBus;
use chatoy_protocol::SendCode;

/// Handles to every metric the gateway exports on `/metrics`.
pub(crate) struct Metrics {
    registry: prometheus::Registry,
    /// Open authenticated or not-yet-authenticated WebSockets.
    pub(crate) sockets_open: IntGauge,
    pub(crate) in_auth: IntCounter,
    pub(crate) in_msg: IntCounter,
    pub(crate) in_invalid: IntCounter,
    pub(crate) out_auth: IntCounter,
    pub(crate) out_send: IntCounter,
    pub(crate) out_recv: IntCounter,
    pub(crate) out_error: IntCounter,
    acks: Vec<IntCounter>,
    /// Time from receiving a `msg` to queueing its `send`.
    pub(crate) ack_latency: Histogram,
    /// Time to hand a `msg` to the bus (NATS: until the publish to the work stream is queued).
    pub(crate) bus_submit: Histogram,
    /// Time to queue one batch of a room's events on every member socket.
    pub(crate) fan_out: Histogram,
    /// Sockets closed because their outbound queue overflowed.
    pub(crate) slow_consumers: IntCounter,
    /// Room subscriptions that may have lost events and were backfilled.
    pub(crate) bus_gaps: IntCounter,
    /// Connections refused over the gateway's connection rate (503).
    pub(crate) refused_conn_rate: IntCounter,
    /// Connections refused over a client address's connection rate (429).
    pub(crate) refused_conn_rate_ip: IntCounter,
    /// Logins refused because the username or the address is locked (429).
    pub(crate) refused_login: IntCounter,
    /// Requests refused for their `Origin` (403).
    pub(crate) refused_origin: IntCounter,
    /// Registrations refused over a client address's registration rate (429).
    pub(crate) refused_registration: IntCounter,
    /// Logins and registrations refused because no password hash could start in time (503).
    pub(crate) refused_hashing: IntCounter,
    /// Room creations and joins refused at the rooms-per-user limit (403).
    pub(crate) refused_rooms: IntCounter,
    /// Authentications refused at the sockets-per-user limit (close 1008).
    pub(crate) refused_sockets_per_user: IntCounter,
    /// Password hashes computed (argon2id: registrations and logins).
    pub(crate) password_hashes: IntCounter,
    /// The bus's reconnects, brought up to date from `bus` at each scrape; `reconnects_seen` is
    /// the bus's count already added, so concurrent scrapes add each reconnect once.
    bus_reconnects: IntCounter,
    reconnects_seen: AtomicU64,
    bus: DynBus,
}

impl Metrics {
    /// The gateway's metrics, registered in `registry` (which may hold other metrics of the
    /// process too: `/metrics` shows everything it holds).
    pub(crate) fn new(bus: DynBus, registry: prometheus::Registry) -> Result<Metrics, prometheus::Error> {
        let sockets_open = IntGauge::new("chatoy_sockets_open", "Open WebSocket connections.")?;
        let frames_in = IntCounterVec::new(
            Opts::new("chatoy_frames_in_total", "WebSocket frames received, by type."),
            &["type"],
        )?;
        let frames_out = IntCounterVec::new(
            Opts::new("chatoy_frames_out_total", "WebSocket frames sent, by type."),
            &["type"],
        )?;
        let acks = IntCounterVec::new(
            Opts::new("chatoy_acks_total", "send answers, by code."),
            &["code"],
        )?;
        let ack_latency = Histogram::with_opts(
            HistogramOpts::new(
                "chatoy_ack_latency_seconds",
                "Time from receiving a msg frame to queueing its send answer.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        let stage = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(vec![
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 1.0,
            ]))
        };
        let bus_submit = stage(
            "chatoy_bus_submit_seconds",
            "Time to hand a msg to the bus (NATS: until its publish to the work stream is queued).",
        )?;
        let fan_out = stage(
            "chatoy_fanout_seconds",
            "Time to queue one batch of a room's events on every member socket of the gateway.",
        )?;
        let slow_consumers = IntCounter::new(
            "chatoy_slow_consumer_closes_total",
            "Sockets closed with 1008 because their outbound queue overflowed.",
        )?;
        let bus_gaps = IntCounter::new(
            "chatoy_bus_gaps_total",
            "Times a room subscription may have lost events and was backfilled from the store.",
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "chatoy_http_refused_total",
                "HTTP requests refused by a limit or a check, by reason.",
            ),
            &["reason"],
        )?;
        let password_hashes = IntCounter::new(
            "chatoy_password_hashes_total",
            "Password hashes computed (argon2id), for registrations and logins.",
        )?;
        let bus_reconnects = IntCounter::new(
            "chatoy_nats_reconnects_total",
            "Times the gateway's NATS connection was re-established after a loss.",
        )?;
        for collector in [
            Box::new(sockets_open.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(frames_in.clone()),
            Box::new(frames_out.clone()),
            Box::new(acks.clone()),
            Box::new(ack_latency.clone()),
            Box::new(bus_submit.clone()),
            Box::new(fan_out.clone()),
            Box::new(slow_consumers.clone()),
            Box::new(bus_gaps.clone()),
            Box::new(refused.clone()),
            Box::new(bus_reconnects.clone()),
            Box::new(password_hashes.clone()),
        ] {
            registry.register(collector)?;
        }
        Ok(Metrics {
            sockets_open,
            in_auth: frames_in.with_label_values(&["auth"]),
            in_msg: frames_in.with_label_values(&["msg"]),
            in_invalid: frames_in.with_label_values(&["invalid"]),
            out_auth: frames_out.with_label_values(&["auth"]),
            out_send: frames_out.with_label_values(&["send"]),
            out_recv: frames_out.with_label_values(&["recv"]),
            out_error: frames_out.with_label_values(&["error"]),
            acks: SendCode::ALL
                .iter()
                .map(|code| acks.with_label_values(&[code.label()]))
                .collect(),
            ack_latency,
            bus_submit,
            fan_out,
            slow_consumers,
            bus_gaps,
            refused_conn_rate: refused.with_label_values(&["conn_rate"]),
            refused_conn_rate_ip: refused.with_label_values(&["conn_rate_ip"]),
            refused_login: refused.with_label_values(&["login_locked"]),
            refused_origin: refused.with_label_values(&["origin"]),
            refused_registration: refused.with_label_values(&["register_rate_ip"]),
            refused_hashing: refused.with_label_values(&["hashing_busy"]),
            refused_rooms: refused.with_label_values(&["rooms_per_user"]),
            refused_sockets_per_user: refused.with_label_values(&["sockets_per_user"]),
            password_hashes,
            bus_reconnects,
            reconnects_seen: AtomicU64::new(0),
            bus,
            registry,
        })
    }

    /// Counts one `send` answer.
    pub(crate) fn ack(&self, code: SendCode) {
        self.acks[code as usize].inc();
        self.out_send.inc();
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> Vec<u8> {
        let reconnects = self.bus.reconnects();
        let before = self.reconnects_seen.fetch_max(reconnects, Ordering::Relaxed);
        self.bus_reconnects.inc_by(reconnects.saturating_sub(before));
        crate::health::render(&self.registry)
    }
}
