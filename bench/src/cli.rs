//! Command-line flags and `CHATOY_*` environment variables of `chatoy-bench`.
//!
//! Every run is bounded: socket and message counts have hard caps here, and every phase has a
//! time limit, so a mistyped flag cannot turn the tool into an unbounded load.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Most sockets one bench process opens (its file-descriptor limit is the practical bound).
pub(crate) const MAX_SOCKETS: u64 = 100_000;
/// Most messages one run sends in total.
pub(crate) const MAX_TOTAL_MESSAGES: u64 = 100_000_000;
/// Longest any single phase may last.
const MAX_PHASE: Duration = Duration::from_secs(3600);

/// A load generator for Chatoy that speaks only the public protocol (HTTP API + WebSocket).
///
/// It registers its own users (a random prefix per run, so runs repeat on one server), logs in,
/// creates rooms, opens WebSockets spread over several loopback source addresses, then runs one
/// scenario and prints a summary (and, with --json, a machine-readable report).
///
/// Only loopback targets are accepted. With --pid the server's RSS (VmRSS in /proc/PID/status)
/// and CPU time (/proc/PID/stat) are reported next to the bench's own CPU time, so a reader can
/// see whether the generator was the bottleneck.
///
/// Examples:
///
///   chatoy-bench --url http://127.0.0.1:8080 --pid 1234 idle --sockets 10000 --users 100
///
///   chatoy-bench --pid 1234 fanout --rooms 1 --members 100 --senders 10 --window 8 --messages 2000
///
///   chatoy-bench --pid 1234 churn --sockets 1000 --rate 200 --seconds 30 --rooms 10 --msg-rate 50
#[derive(Debug, Parser)]
#[command(name = "chatoy-bench", version, verbatim_doc_comment, after_long_help = AFTER_HELP)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) common: Common,
    #[command(subcommand)]
    pub(crate) scenario: Scenario,
}

const AFTER_HELP: &str = "\
Output: a progress line on stderr every second (elapsed, phase, open sockets, sent, acked,
recv/s), a summary on stdout at the end, and with --json the full report (every figure of the
summary, acks by code, socket end reasons, CPU time of bench and server, and a list of problems).

Sockets: file descriptors limit how many sockets one process holds; raise the limit with
`ulimit -n` in the shell that starts the bench (and the server). The bench refuses to start a run
it cannot hold.

Exit status: 0 = the run completed and found nothing wrong; 2 = it completed but found problems
(listed under PROBLEM in the summary and in the report's `problems`); 1 = it could not run.";

/// Flags shared by every scenario (accepted before or after the scenario name).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Common options")]
pub(crate) struct Common {
    /// The server's base URL; must resolve to a loopback address.
    #[arg(
        long,
        global = true,
        env = "CHATOY_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub(crate) url: url::Url,
    /// The server's process id: its RSS and CPU time are reported (Linux /proc).
    #[arg(long, global = true, env = "CHATOY_PID")]
    pub(crate) pid: Option<u32>,
    /// Hard limit on the measured phase (idle: connect + settle + hold; fanout: sending + drain;
    /// churn: connect + churn + drain).
    #[arg(long, global = true, default_value = "120s", value_parser = phase_duration)]
    pub(crate) duration: Duration,
    /// Write the report as JSON to this file.
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) json: Option<PathBuf>,
    /// Worker threads of the bench's runtime.
    #[arg(long, global = true, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) threads: u16,
    /// Loopback source addresses to spread sockets over (127.0.0.1, 127.0.0.2, ...); each allows
    /// about 28 000 sockets to one server port.
    #[arg(long, global = true, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=250))]
    pub(crate) source_addrs: u8,
    /// WebSocket connections (TCP connect + upgrade + auth) in flight at once.
    #[arg(long, global = true, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub(crate) connect_concurrency: u16,
    /// Attempts per WebSocket connection before the run fails.
    #[arg(long, global = true, default_value_t = 5, value_parser = clap::value_parser!(u8).range(1..=20))]
    pub(crate) connect_attempts: u8,
    /// Time limit of one connection attempt (connect + upgrade + auth).
    #[arg(long, global = true, default_value = "10s", value_parser = phase_duration)]
    pub(crate) connect_timeout: Duration,
    /// HTTP setup calls (register, login, create, join) in flight at once.
    #[arg(long, global = true, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=512))]
    pub(crate) setup_concurrency: u16,
    /// Time limit of the whole setup phase (users, logins, rooms, joins).
    #[arg(long, global = true, default_value = "300s", value_parser = phase_duration)]
    pub(crate) setup_timeout: Duration,
    /// No progress line on stderr.
    #[arg(long, global = true)]
    pub(crate) quiet: bool,
}

/// What to measure.
#[derive(Debug, Clone, Subcommand)]
pub(crate) enum Scenario {
    /// Server memory per idle authenticated socket.
    ///
    /// Opens --sockets authenticated WebSockets shared round-robin by --users users, waits until
    /// the server's RSS is stable (samples every 500 ms until two agree within 1%), reports RSS
    /// before, after and (after - before) / sockets, keeps the sockets answering pings for --hold,
    /// then closes them and reports the RSS once it settles again. Needs --pid.
    ///
    /// Measure against a freshly started server: its allocator keeps memory freed by earlier
    /// runs, so on a warm server "before" already includes it and the figure comes out too low.
    /// Each user with an open socket may cost the server memory of its own (a subscription), so
    /// --users changes the figure: compare runs with the same --users.
    Idle(IdleArgs),
    /// Fan-out throughput, `send` ack latency and end-to-end delivery latency.
    ///
    /// --rooms rooms of --members sockets each; the first --senders sockets of every room send
    /// --messages messages each, keeping at most --window unacknowledged. Every text starts with
    /// the send instant (16 hex digits of nanoseconds since the run's epoch), so each receiver
    /// computes the delivery latency itself. Every (receiver, uuid) is counted: lost = expected -
    /// unique received, plus duplicates, unexpected messages and errors by `send` code.
    Fanout(FanoutArgs),
    /// Connection churn: connect latency and failures while sockets come and go.
    ///
    /// Opens --sockets authenticated sockets (the population, shared round-robin by --users
    /// users), then for --seconds closes one and opens a new one in its place (TCP connect +
    /// upgrade + auth) --rate times per second, at most --connect-concurrency at a time; a
    /// reconnect due while that many are in flight is skipped and counted. Reports the rate
    /// achieved, connect latency (TCP connect to `auth` code 0), failures by cause, and, with
    /// --pid, the server's RSS once settled before and after the churn (the population is open
    /// both times, so growth hints at memory kept per closed socket).
    ///
    /// With --rooms R, the users are spread over R rooms and one extra socket per room sends
    /// --msg-rate messages per second throughout. Every socket open at the end is checked: each
    /// message acked with code 0 whose send was scheduled after that socket's `auth` answer must
    /// have arrived exactly once.
    Churn(ChurnArgs),
}

/// Flags of `idle`.
#[derive(Debug, Clone, Args)]
pub(crate) struct IdleArgs {
    /// Authenticated sockets to open.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_SOCKETS))]
    pub(crate) sockets: u64,
    /// Users the sockets are spread over (one login each; several sockets share a token).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=MAX_SOCKETS))]
    pub(crate) users: u64,
    /// Rooms the users are spread over (each user joins one); 0 = no room membership.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=MAX_SOCKETS))]
    pub(crate) rooms: u64,
    /// How long to keep the sockets open (answering pings) after the RSS settled.
    #[arg(long, default_value = "0s", value_parser = hold_duration)]
    pub(crate) hold: Duration,
    /// Give up waiting for a stable RSS after this long (the last sample is reported).
    #[arg(long, default_value = "30s", value_parser = phase_duration)]
    pub(crate) settle_timeout: Duration,
}

/// Flags of `fanout`.
#[derive(Debug, Clone, Args)]
pub(crate) struct FanoutArgs {
    /// Rooms; each gets its own members and senders.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=MAX_SOCKETS))]
    pub(crate) rooms: u64,
    /// Member sockets per room (senders included).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=MAX_SOCKETS))]
    pub(crate) members: u64,
    /// Sockets per room that send (the first ones of the room).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=MAX_SOCKETS))]
    pub(crate) senders: u64,
    /// Unacknowledged messages each sender keeps in flight at most.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) window: u32,
    /// Messages each sender sends.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub(crate) messages: u64,
    /// Text size in bytes (at least 16: the embedded send instant).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(16..=4000))]
    pub(crate) size: u32,
    /// Messages per second per sender (paced; the window still applies). Unpaced if absent.
    /// Paced senders start at different offsets within the period, spread evenly, so the total
    /// load is steady rather than one burst of every sender per period.
    #[arg(long, value_parser = positive_rate)]
    pub(crate) rate: Option<f64>,
    /// Sockets per user: a room's members are ceil(members / this) users, each with this many
    /// sockets (all of a user's sockets receive the room's messages, except the sending one).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub(crate) sockets_per_user: u64,
    /// After the last ack, how long to wait for missing deliveries before counting them lost.
    #[arg(long, default_value = "5s", value_parser = phase_duration)]
    pub(crate) drain: Duration,
    /// How long a sender waits for an ack before giving up on its remaining messages.
    #[arg(long, default_value = "10s", value_parser = phase_duration)]
    pub(crate) ack_timeout: Duration,
}

/// Flags of `churn`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ChurnArgs {
    /// Authenticated sockets kept open (the population churned through).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_SOCKETS))]
    pub(crate) sockets: u64,
    /// Users the sockets are spread over (one login each; several sockets share a token).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=MAX_SOCKETS))]
    pub(crate) users: u64,
    /// Sockets closed and reopened per second.
    #[arg(long, default_value_t = 100.0, value_parser = churn_rate)]
    pub(crate) rate: f64,
    /// How long to churn, in seconds (--duration, 120 s by default, bounds the whole run).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) seconds: u64,
    /// Which socket to close next: each in turn, or one at random.
    #[arg(long, value_enum, default_value_t = Pick::RoundRobin)]
    pub(crate) pick: Pick,
    /// Rooms with a sender each (an extra socket); 0 = no messages, only connects.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=MAX_SOCKETS))]
    pub(crate) rooms: u64,
    /// Messages per second each room's sender sends (paced, at most 64 unacknowledged).
    #[arg(long, default_value_t = 10.0, value_parser = positive_rate)]
    pub(crate) msg_rate: f64,
    /// After the churn, how long at most to wait for the last deliveries (the wait ends sooner
    /// once nothing arrived for 250 ms).
    #[arg(long, default_value = "2s", value_parser = phase_duration)]
    pub(crate) drain: Duration,
    /// How long a sender waits for an ack before giving up on its remaining messages.
    #[arg(long, default_value = "10s", value_parser = phase_duration)]
    pub(crate) ack_timeout: Duration,
    /// Give up waiting for a stable server RSS after this long (the last sample is reported).
    #[arg(long, default_value = "10s", value_parser = phase_duration)]
    pub(crate) settle_timeout: Duration,
}

/// How `churn` picks the socket to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Pick {
    /// Socket 0, 1, 2, ... in turn.
    RoundRobin,
    /// A socket at random.
    Random,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|err| format!("{err} (examples: 500ms, 10s, 5m)"))
}

fn hold_duration(text: &str) -> Result<Duration, String> {
    let value = parse_duration(text)?;
    if value > MAX_PHASE {
        return Err("must be at most 1h".into());
    }
    Ok(value)
}

fn phase_duration(text: &str) -> Result<Duration, String> {
    let value = hold_duration(text)?;
    if value.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(value)
}

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 && value <= 1e7 => Ok(value),
        _ => Err("must be a number in (0, 10000000]".into()),
    }
}

fn churn_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 && value <= 100_000.0 => Ok(value),
        _ => Err("must be a number in (0, 100000]".into()),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn common_flags_go_anywhere() {
        let cli = Cli::try_parse_from([
            "chatoy-bench",
            "fanout",
            "--members",
            "3",
            "--url",
            "http://127.0.0.1:9",
            "--window",
            "8",
        ])
        .map_err(|err| err.to_string());
        let Ok(cli) = cli else {
            panic!("{cli:?}");
        };
        assert_eq!(cli.common.url.port(), Some(9));
        let Scenario::Fanout(args) = cli.scenario else {
            panic!("not fanout");
        };
        assert_eq!((args.members, args.window), (3, 8));
    }

    #[test]
    fn churn_flags() {
        let cli = Cli::try_parse_from([
            "chatoy-bench",
            "churn",
            "--sockets",
            "50",
            "--rate",
            "20",
            "--seconds",
            "3",
            "--pick",
            "random",
            "--rooms",
            "2",
        ])
        .map_err(|err| err.to_string());
        let Ok(cli) = cli else {
            panic!("{cli:?}");
        };
        let Scenario::Churn(args) = cli.scenario else {
            panic!("not churn");
        };
        assert_eq!(
            (args.sockets, args.users, args.seconds, args.rooms),
            (50, 100, 3, 2)
        );
        assert_eq!((args.rate, args.pick), (20.0, Pick::Random));
        for bad in ["0", "-1", "100001", "nan"] {
            assert!(churn_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn zero_durations_are_refused() {
        assert!(phase_duration("0s").is_err());
        assert!(hold_duration("0s").is_ok());
        assert!(phase_duration("2h").is_err());
    }
}
