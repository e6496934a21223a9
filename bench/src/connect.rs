//! Opening authenticated WebSockets: the loopback-only target, the spread over loopback source
//! addresses, tungstenite's client handshake, then `auth` on the bench's own lean wire.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::wire::{self, Frame, ReadBuf, Server, WriteBuf, OP_TEXT};

/// Where the sockets go, and from where.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The server's address (always loopback).
    pub(crate) addr: SocketAddr,
    /// The `ws://` URL of `/ws`.
    pub(crate) ws_url: String,
    /// Source addresses, used round-robin.
    pub(crate) sources: Vec<IpAddr>,
}

/// Resolves `url`, refusing anything that is not loopback.
pub(crate) async fn target(url: &url::Url, source_addrs: u8) -> Result<Target> {
    if url.scheme() != "http" {
        bail!("--url must be http://HOST:PORT (got scheme {:?})", url.scheme());
    }
    let host = url.host_str().ok_or_else(|| anyhow!("--url has no host"))?;
    let port = url.port_or_known_default().unwrap_or(80);
    let host_for_lookup = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host_for_lookup, port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .collect();
    let Some(&addr) = addrs.first() else {
        bail!("{host} resolves to no address");
    };
    if let Some(outside) = addrs.iter().find(|addr| !addr.ip().is_loopback()) {
        bail!("refusing a non-loopback target: {host} resolves to {outside}; this tool only loads servers on this machine");
    }
    let sources = match addr.ip() {
        IpAddr::V4(_) => (1..=source_addrs)
            .map(|last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
            .collect(),
        v6 => vec![v6],
    };
    let ws_url = match addr {
        SocketAddr::V4(v4) => format!("ws://{v4}/ws"),
        SocketAddr::V6(v6) => format!("ws://[{}]:{}/ws", v6.ip(), v6.port()),
    };
    Ok(Target {
        addr,
        ws_url,
        sources,
    })
}

/// An authenticated socket, ready for its task.
#[derive(Debug)]
pub(crate) struct Conn {
    /// The TCP stream (the WebSocket handshake is done).
    pub(crate) stream: TcpStream,
    /// Inbound bytes not yet parsed.
    pub(crate) reader: ReadBuf,
    /// Outbound frames not yet written.
    pub(crate) writer: WriteBuf,
}

/// How one socket is opened.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dial {
    /// Attempts before giving up.
    pub(crate) attempts: u8,
    /// Time limit of one attempt.
    pub(crate) timeout: Duration,
    /// Initial capacity of the socket's read buffer.
    pub(crate) read_buffer: usize,
}

/// Opens socket number `index` and authenticates it with `token`, retrying failed attempts.
pub(crate) async fn open(target: &Target, index: u64, token: &str, dial: Dial) -> Result<Conn> {
    let source = target.sources[index as usize % target.sources.len()];
    let mut last = anyhow!("no attempt made");
    for attempt in 0..dial.attempts {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
        }
        match tokio::time::timeout(dial.timeout, attempt_once(target, source, index, token, dial)).await {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(err)) => last = err,
            Err(_) => last = anyhow!(Step::Timeout(dial.timeout)),
        }
    }
    Err(last.context(format!(
        "socket {index} from {source}: {} attempts failed",
        dial.attempts
    )))
}

/// One attempt at opening socket number `index` (no retry), within `dial.timeout`. A failure's
/// step is readable with [`failure_cause`].
pub(crate) async fn attempt(target: &Target, index: u64, token: &str, dial: Dial) -> Result<Conn> {
    let source = target.sources[index as usize % target.sources.len()];
    match tokio::time::timeout(dial.timeout, attempt_once(target, source, index, token, dial)).await {
        Ok(result) => result,
        Err(_) => Err(anyhow!(Step::Timeout(dial.timeout))),
    }
}

/// The step of opening a socket that failed; attached to the error as its outermost context, so
/// [`failure_cause`] finds it. It prints as the error messages always read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Socket,
    Bind(IpAddr),
    Connect,
    NoDelay,
    Handshake,
    SendAuth,
    ReadAuth,
    AuthFrames,
    AuthRefused(u64),
    AuthClosed(Option<u16>),
    AuthEof,
    Timeout(Duration),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Socket => write!(f, "creating a TCP socket"),
            Step::Bind(source) => write!(f, "binding to {source}"),
            Step::Connect => write!(f, "TCP connect"),
            Step::NoDelay => write!(f, "setting TCP_NODELAY"),
            Step::Handshake => write!(f, "WebSocket handshake"),
            Step::SendAuth => write!(f, "sending auth"),
            Step::ReadAuth => write!(f, "reading auth"),
            Step::AuthFrames => write!(f, "unreadable frames during auth"),
            Step::AuthRefused(code) => write!(f, "auth refused with code {code}"),
            Step::AuthClosed(code) => write!(f, "closed by the server during auth ({code:?})"),
            Step::AuthEof => write!(f, "connection closed during auth"),
            Step::Timeout(limit) => write!(f, "timed out after {limit:?}"),
        }
    }
}

/// A short, stable key for why an attempt failed (`tcp_connect`, `handshake_http_503`,
/// `auth_code_3`, `auth_close_1008`, `timeout`, ...), for counting failures by cause.
pub(crate) fn failure_cause(err: &anyhow::Error) -> String {
    let Some(step) = err.downcast_ref::<Step>() else {
        return "other".to_owned();
    };
    match step {
        Step::Socket => "socket".to_owned(),
        Step::Bind(_) => "bind".to_owned(),
        Step::Connect => "tcp_connect".to_owned(),
        Step::NoDelay => "nodelay".to_owned(),
        Step::Handshake => {
            let status = err.chain().find_map(|cause| {
                match cause.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
                    Some(tokio_tungstenite::tungstenite::Error::Http(response)) => Some(response.status()),
                    _ => None,
                }
            });
            match status {
                Some(status) => format!("handshake_http_{}", status.as_u16()),
                None => "handshake".to_owned(),
            }
        }
        Step::SendAuth | Step::ReadAuth => "auth_io".to_owned(),
        Step::AuthFrames => "auth_bad_frames".to_owned(),
        Step::AuthRefused(code) => format!("auth_code_{code}"),
        Step::AuthClosed(Some(code)) => format!("auth_close_{code}"),
        Step::AuthClosed(None) => "auth_close".to_owned(),
        Step::AuthEof => "auth_eof".to_owned(),
        Step::Timeout(_) => "timeout".to_owned(),
    }
}

async fn attempt_once(target: &Target, source: IpAddr, index: u64, token: &str, dial: Dial) -> Result<Conn> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .context(Step::Socket)?;
    socket
        .bind(SocketAddr::new(source, 0))
        .context(Step::Bind(source))?;
    let stream = socket.connect(target.addr).await.context(Step::Connect)?;
    stream.set_nodelay(true).context(Step::NoDelay)?;
    // The handshake's WebSocket object is dropped right after it: keep its buffers tiny.
    let config = WebSocketConfig::default()
        .read_buffer_size(256)
        .write_buffer_size(0);
    let (ws, _response) =
        tokio_tungstenite::client_async_with_config(target.ws_url.as_str(), stream, Some(config))
            .await
            .context(Step::Handshake)?;
    // The server sends nothing before `auth`, so tungstenite holds no unread bytes here.
    let stream = ws.into_inner();
    let mut conn = Conn {
        stream,
        reader: ReadBuf::new(dial.read_buffer),
        writer: WriteBuf::new(0x9E37_79B9_7F4A_7C15 ^ index.wrapping_mul(0x2545_F491_4F6C_DD1D)),
    };
    authenticate(&mut conn, token).await?;
    Ok(conn)
}

async fn authenticate(conn: &mut Conn, token: &str) -> Result<()> {
    let frame = serde_json::to_vec(&serde_json::json!({ "type": "auth", "token": token }))?;
    conn.writer.frame(OP_TEXT, &frame);
    conn.stream
        .write_all(&conn.writer.buf)
        .await
        .context(Step::SendAuth)?;
    conn.writer.buf.clear();
    loop {
        while let Some(frame) = conn
            .reader
            .next_frame()
            .map_err(|err| anyhow!("{err}").context(Step::AuthFrames))?
        {
            match frame {
                Frame::Text(payload) => match wire::classify(payload) {
                    Server::Auth { code: 0 } => return Ok(()),
                    Server::Auth { code } => bail!(Step::AuthRefused(code)),
                    _ => {}
                },
                Frame::Close(code) => bail!(Step::AuthClosed(code)),
                Frame::Ping(_) | Frame::Pong | Frame::Binary => {}
            }
        }
        let n = conn
            .stream
            .read(conn.reader.spare())
            .await
            .context(Step::ReadAuth)?;
        if n == 0 {
            bail!(Step::AuthEof);
        }
        conn.reader.filled(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_have_a_cause_and_read_as_before() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let err = Err::<(), _>(refused).context(Step::Connect).err();
        let Some(err) = err else { panic!("no error") };
        assert_eq!(failure_cause(&err), "tcp_connect");
        assert!(format!("{err:#}").starts_with("TCP connect: "), "{err:#}");
        let closed = anyhow!(Step::AuthClosed(Some(1008)));
        assert_eq!(failure_cause(&closed), "auth_close_1008");
        assert_eq!(
            closed.to_string(),
            "closed by the server during auth (Some(1008))"
        );
        assert_eq!(failure_cause(&anyhow!(Step::AuthRefused(3))), "auth_code_3");
        assert_eq!(
            failure_cause(&anyhow!(Step::Timeout(Duration::from_secs(1)))),
            "timeout"
        );
        assert_eq!(failure_cause(&anyhow!("something else")), "other");
        let response = tokio_tungstenite::tungstenite::http::Response::builder()
            .status(503)
            .body(None);
        let Ok(response) = response else {
            panic!("bad response")
        };
        let http = tokio_tungstenite::tungstenite::Error::Http(Box::new(response));
        let err = Err::<(), _>(http).context(Step::Handshake).err();
        let Some(err) = err else { panic!("no error") };
        assert_eq!(failure_cause(&err), "handshake_http_503");
    }

    #[tokio::test]
    async fn only_loopback_targets() {
        let ok = |text: &str| url::Url::parse(text).map_err(|err| anyhow!(err));
        let Ok(url) = ok("http://127.0.0.1:8080") else {
            panic!("bad url")
        };
        let target = target(&url, 3).await.map_err(|err| err.to_string());
        let Ok(target) = target else { panic!("{target:?}") };
        assert_eq!(target.ws_url, "ws://127.0.0.1:8080/ws");
        assert_eq!(target.sources.len(), 3);
        assert_eq!(target.sources[2], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
        for refused in ["http://10.0.0.1:8080", "http://8.8.8.8", "https://127.0.0.1:1"] {
            let Ok(url) = ok(refused) else { panic!("bad url") };
            assert!(self::target(&url, 1).await.is_err(), "{refused}");
        }
        let Ok(url) = ok("http://[::1]:9") else {
            panic!("bad url")
        };
        let target = self::target(&url, 4).await.map_err(|err| err.to_string());
        assert!(matches!(target, Ok(t) if t.ws_url == "ws://[::1]:9/ws" && t.sources.len() == 1));
    }
}
