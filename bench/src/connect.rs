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
            Err(_) => last = anyhow!("timed out after {:?}", dial.timeout),
        }
    }
    Err(last.context(format!(
        "socket {index} from {source}: {} attempts failed",
        dial.attempts
    )))
}

async fn attempt_once(target: &Target, source: IpAddr, index: u64, token: &str, dial: Dial) -> Result<Conn> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .context("creating a TCP socket")?;
    socket
        .bind(SocketAddr::new(source, 0))
        .with_context(|| format!("binding to {source}"))?;
    let stream = socket.connect(target.addr).await.context("TCP connect")?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    // The handshake's WebSocket object is dropped right after it: keep its buffers tiny.
    let config = WebSocketConfig::default()
        .read_buffer_size(256)
        .write_buffer_size(0);
    let (ws, _response) =
        tokio_tungstenite::client_async_with_config(target.ws_url.as_str(), stream, Some(config))
            .await
            .context("WebSocket handshake")?;
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
        .context("sending auth")?;
    conn.writer.buf.clear();
    loop {
        while let Some(frame) = conn.reader.next_frame().map_err(|err| anyhow!("{err}"))? {
            match frame {
                Frame::Text(payload) => match wire::classify(payload) {
                    Server::Auth { code: 0 } => return Ok(()),
                    Server::Auth { code } => bail!("auth refused with code {code}"),
                    _ => {}
                },
                Frame::Close(code) => bail!("closed by the server during auth ({code:?})"),
                Frame::Ping(_) | Frame::Pong | Frame::Binary => {}
            }
        }
        let n = conn
            .stream
            .read(conn.reader.spare())
            .await
            .context("reading auth")?;
        if n == 0 {
            bail!("connection closed during auth");
        }
        conn.reader.filled(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
