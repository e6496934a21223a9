//! A hand-rolled WebSocket client over a plain TCP stream, for what a well-behaved library never
//! sends: invalid UTF-8, oversized, binary or fragmented frames, unanswered pings, a tiny
//! receive buffer.

use std::time::Duration;

use rand::Rng;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::server::Server;
use crate::shape::{assert_auth, auth_frame};
use crate::util::{within, WAIT};
use crate::ws::Event;

/// WebSocket opcodes used by [`RawWs`].
pub mod opcode {
    /// Continuation frame.
    pub const CONTINUATION: u8 = 0x0;
    /// Text frame.
    pub const TEXT: u8 = 0x1;
    /// Binary frame.
    pub const BINARY: u8 = 0x2;
    /// Close frame.
    pub const CLOSE: u8 = 0x8;
    /// Ping frame.
    pub const PING: u8 = 0x9;
    /// Pong frame.
    pub const PONG: u8 = 0xA;
}

/// One frame as [`RawWs`] reads it.
#[derive(Debug)]
pub struct RawFrame {
    /// The opcode.
    pub opcode: u8,
    /// The unmasked payload.
    pub payload: Vec<u8>,
}

/// A hand-rolled WebSocket client over a plain TCP stream: it sends any bytes (invalid UTF-8,
/// oversized or binary frames), never answers pings unless told to, and can shrink its receive
/// buffer so a client that stops reading backs the server up quickly.
pub struct RawWs {
    reader: tokio::io::BufReader<TcpStream>,
}

impl RawWs {
    /// Connects and performs the HTTP upgrade by hand.
    pub async fn connect(server: &Server) -> RawWs {
        RawWs::connect_with(server, None).await
    }

    /// Connects with an optional `SO_RCVBUF`, then upgrades.
    pub async fn connect_with(server: &Server, recv_buffer: Option<u32>) -> RawWs {
        let (addr, path) = server.ws_target();
        RawWs::connect_target(&addr, &path, recv_buffer).await
    }

    /// Connects to `addr` with an optional `SO_RCVBUF`, then upgrades on `path`.
    pub async fn connect_target(addr: &str, path: &str, recv_buffer: Option<u32>) -> RawWs {
        let addr: std::net::SocketAddr = addr.parse().expect("addr");
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
        let stream = within(WAIT, "TCP connect", socket.connect(addr))
            .await
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut reader = tokio::io::BufReader::new(stream);
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        within(
            WAIT,
            "writing the upgrade",
            reader.get_mut().write_all(request.as_bytes()),
        )
        .await
        .expect("write upgrade");
        let mut head = Vec::new();
        within(WAIT, "the upgrade response", async {
            while !head.ends_with(b"\r\n\r\n") {
                let byte = reader.read_u8().await.expect("read upgrade response");
                head.push(byte);
            }
        })
        .await;
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "bad accept key: {head}"
        );
        RawWs { reader }
    }

    /// Sends one masked frame with FIN set.
    pub async fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        self.send_fragment(true, opcode, payload).await;
    }

    /// Sends one masked frame; `fin` false starts or continues a fragmented message.
    pub async fn send_fragment(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(if fin { 0x80 | opcode } else { opcode });
        let len = payload.len();
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else if len <= usize::from(u16::MAX) {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let mask: [u8; 4] = rand::rng().random();
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        // The server may already have closed (e.g. after an oversized frame); a failed write
        // then shows up as the close or end the caller reads next.
        let _ = within(WAIT, "writing a frame", self.reader.get_mut().write_all(&frame)).await;
    }

    /// Sends a text frame (the bytes need not be UTF-8).
    pub async fn send_text(&mut self, payload: &[u8]) {
        self.send_frame(opcode::TEXT, payload).await;
    }

    /// Reads the next frame of any kind; `None` when the connection ended.
    pub async fn read_frame(&mut self, limit: Duration) -> Option<RawFrame> {
        within(limit, "a raw frame", self.read_frame_inner()).await
    }

    async fn read_frame_inner(&mut self) -> Option<RawFrame> {
        let mut message: Option<RawFrame> = None;
        loop {
            let first = self.reader.read_u8().await.ok()?;
            let second = self.reader.read_u8().await.ok()?;
            assert_eq!(second & 0x80, 0, "server frames must not be masked");
            let len = match second & 0x7f {
                126 => u64::from(self.reader.read_u16().await.ok()?),
                127 => self.reader.read_u64().await.ok()?,
                n => u64::from(n),
            };
            let mut payload = vec![0; usize::try_from(len).expect("frame length")];
            self.reader.read_exact(&mut payload).await.ok()?;
            let fin = first & 0x80 != 0;
            let code = first & 0x0f;
            if code == opcode::CONTINUATION {
                let partial = message.as_mut().expect("continuation without a start");
                partial.payload.extend_from_slice(&payload);
            } else {
                message = Some(RawFrame {
                    opcode: code,
                    payload,
                });
            }
            if fin {
                return message;
            }
        }
    }

    /// The next text frame as JSON, answering pings; panics on anything else.
    pub async fn next_json(&mut self) -> Value {
        match self.next_event(WAIT).await {
            Event::Json(value) => value,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The next text or close frame, answering pings on the way.
    pub async fn next_event(&mut self, limit: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(frame) = self.read_frame(left).await else {
                return Event::Ended("connection ended".into());
            };
            match frame.opcode {
                opcode::TEXT => {
                    let value = serde_json::from_slice(&frame.payload).unwrap_or_else(|err| {
                        panic!(
                            "server sent non-JSON {:?}: {err}",
                            String::from_utf8_lossy(&frame.payload)
                        )
                    });
                    return Event::Json(value);
                }
                opcode::CLOSE => {
                    return Event::Close(close_code(&frame.payload), close_reason(&frame.payload))
                }
                opcode::PING => self.send_frame(opcode::PONG, &frame.payload).await,
                opcode::PONG => {}
                other => panic!("unexpected opcode {other} from server"),
            }
        }
    }

    /// Authenticates, asserting code 0.
    pub async fn auth_ok(&mut self, token: &str, since: Option<&str>) {
        self.send_text(auth_frame(token, since).as_bytes()).await;
        let answer = self.next_json().await;
        assert_auth(&answer, 0);
    }
}

/// The status code of a close payload (1005 when absent).
pub fn close_code(payload: &[u8]) -> u16 {
    match payload {
        [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
        _ => 1005,
    }
}

/// The reason of a close payload.
pub fn close_reason(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned()
}
