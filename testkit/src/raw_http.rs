//! A plain TCP client that speaks HTTP/1.1 by hand, for slow, partial or odd requests.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::util::{within, WAIT};

/// A plain TCP client that speaks HTTP/1.1 by hand: it can send a request a byte at a time, from
/// a chosen loopback source address, and see exactly what the server answers or when it hangs up.
pub struct RawHttp {
    stream: TcpStream,
    /// Bytes read but not consumed yet.
    buffer: Vec<u8>,
}

/// One HTTP response as [`RawHttp`] reads it.
#[derive(Debug)]
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// Header names (lower case) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body (by `Content-Length`).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of a header, by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The body as JSON (`Value::Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

impl RawHttp {
    /// Connects to `addr` (`127.0.0.1:PORT`), from `source` if given (any 127.x.y.z works on
    /// Linux, so a test can be a client address of its own).
    pub async fn connect(addr: &str, source: Option<std::net::IpAddr>) -> RawHttp {
        let addr: std::net::SocketAddr = addr.parse().expect("addr");
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(ip) = source {
            socket
                .bind(std::net::SocketAddr::new(ip, 0))
                .unwrap_or_else(|err| panic!("bind {ip}: {err}"));
        }
        let stream = within(WAIT, "TCP connect", socket.connect(addr))
            .await
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        RawHttp {
            stream,
            buffer: Vec::new(),
        }
    }

    /// Writes bytes; `false` if the server already closed the connection.
    pub async fn send(&mut self, bytes: &[u8]) -> bool {
        matches!(
            tokio::time::timeout(WAIT, self.stream.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

    /// Reads more bytes into the buffer; `false` at the end of the connection (or a reset).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buffer.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Reads one response (waiting at most `limit`); `None` if the connection ended first.
    pub async fn response(&mut self, limit: Duration) -> Option<RawResponse> {
        within(limit, "an HTTP response", async {
            let end = loop {
                if let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                    break end;
                }
                if !self.fill().await {
                    return None;
                }
            };
            let head = String::from_utf8_lossy(&self.buffer[..end]).into_owned();
            self.buffer.drain(..end + 4);
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or_default();
            let status = status_line
                .split_whitespace()
                .nth(1)
                .and_then(|code| code.parse().ok())
                .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
            let headers: Vec<(String, String)> = lines
                .filter_map(|line| line.split_once(':'))
                .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
                .collect();
            let length = headers
                .iter()
                .find(|(name, _)| name == "content-length")
                .and_then(|(_, value)| value.parse::<usize>().ok())
                .unwrap_or(0);
            while self.buffer.len() < length {
                if !self.fill().await {
                    break;
                }
            }
            let body = self.buffer.drain(..length.min(self.buffer.len())).collect();
            Some(RawResponse {
                status,
                headers,
                body,
            })
        })
        .await
    }

    /// Whether the server has closed the connection (reading nothing more), waiting at most
    /// `limit`; bytes that arrive meanwhile are kept for [`RawHttp::response`].
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, async { while self.fill().await {} })
            .await
            .is_ok()
    }

    /// Sends a complete `GET path` request with extra header lines (each ending in CRLF) and
    /// reads the answer.
    pub async fn get(&mut self, path: &str, headers: &str) -> Option<RawResponse> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n");
        if !self.send(request.as_bytes()).await {
            return None;
        }
        self.response(WAIT).await
    }
}

/// The header lines of a WebSocket upgrade request (for [`RawHttp::get`]).
pub const UPGRADE_HEADERS: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
