//! One WebSocket connection: connect and `auth` (with `since`, to resume), read and write
//! frames, and the backoff between connection attempts and resends.

use std::time::Duration;

use anyhow::anyhow;
use chatoy_protocol::{AuthCode, ClientFrame, ServerFrame, Since};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::http::Http;
use super::NETWORK_TIMEOUT;

pub(super) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a connection attempt or a connection ended.
#[derive(Debug)]
pub(super) enum Failure {
    /// Retrying cannot help (the token is refused): give up.
    Fatal(anyhow::Error),
    /// The connection failed or was closed (with this close code, if any): reconnect.
    Lost(anyhow::Error, Option<u16>),
}

pub(super) fn lost(err: impl Into<anyhow::Error>) -> Failure {
    Failure::Lost(err.into(), None)
}

/// Connects, authenticates (with `since`, if any) and returns the socket, ready for traffic.
pub(super) async fn connect(http: &Http, token: &str, since: Option<Since>) -> Result<Socket, Failure> {
    let connecting = tokio_tungstenite::connect_async(http.ws_url.as_str());
    let (mut socket, _) = tokio::time::timeout(NETWORK_TIMEOUT, connecting)
        .await
        .map_err(|_| lost(anyhow!("connecting to {} timed out", http.ws_url)))?
        .map_err(|err| lost(anyhow!("cannot connect to {}: {err}", http.ws_url)))?;
    let auth = ClientFrame::Auth {
        token: token.to_owned(),
        since,
    };
    write_frame(&mut socket, &auth).await?;
    let answer = tokio::time::timeout(NETWORK_TIMEOUT, async {
        loop {
            if let ServerFrame::Auth { code, msg } = next_frame(&mut socket).await? {
                return Ok((code, msg));
            }
        }
    })
    .await
    .map_err(|_| lost(anyhow!("no auth answer in time")))??;
    match answer {
        (AuthCode::Ok, _) => Ok(socket),
        (AuthCode::Expired, msg) => Err(Failure::Fatal(anyhow!(
            "the token was refused ({msg}): log in again"
        ))),
        (code, msg) => Err(Failure::Fatal(anyhow!(
            "auth refused: code {}: {msg}",
            code as u8
        ))),
    }
}

pub(super) async fn write_frame(socket: &mut Socket, frame: &ClientFrame) -> Result<(), Failure> {
    let text = serde_json::to_string(frame).map_err(|err| Failure::Fatal(err.into()))?;
    socket.send(WsMessage::text(text)).await.map_err(lost)
}

/// The next frame the server sends; pings are answered by tungstenite as it reads.
pub(super) async fn next_frame(socket: &mut Socket) -> Result<ServerFrame, Failure> {
    loop {
        match socket.next().await {
            None => return Err(lost(anyhow!("the connection ended"))),
            Some(Err(err)) => return Err(lost(err)),
            Some(Ok(WsMessage::Text(text))) => match serde_json::from_str::<ServerFrame>(&text) {
                Ok(frame) => return Ok(frame),
                // A frame of a newer protocol: a client ignores what it does not know.
                Err(_) => continue,
            },
            Some(Ok(WsMessage::Close(close))) => {
                let code = close.as_ref().map(|close| u16::from(close.code));
                let reason = close.map(|close| close.reason.to_string()).unwrap_or_default();
                return Err(Failure::Lost(
                    anyhow!(
                        "the server closed the connection ({}: {reason})",
                        code.unwrap_or(1005)
                    ),
                    code,
                ));
            }
            Some(Ok(_)) => continue,
        }
    }
}

/// The client guide's reconnect and resend delays: the shared capped exponential backoff with
/// equal jitter (0.5 s doubling to 30 s), so clients dropped together do not come back together;
/// a 1001 (the gateway is draining; another one is ready) is retried almost at once.
#[derive(Debug)]
pub(super) struct Backoff(chatoy_protocol::backoff::Backoff);

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff(chatoy_protocol::backoff::Backoff::new(
            Duration::from_millis(500),
            Duration::from_secs(30),
        ))
    }
}

impl Backoff {
    pub(super) fn next(&mut self, close_code: Option<u16>) -> Duration {
        let delay = self.0.next_delay();
        if close_code == Some(u16::from(CloseCode::Away)) {
            delay.min(Duration::from_millis(250))
        } else {
            delay
        }
    }

    pub(super) fn reset(&mut self) {
        self.0.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let mut backoff = Backoff::default();
        let first = backoff.next(None);
        assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(500));
        for _ in 0..10 {
            backoff.next(None);
        }
        let late = backoff.next(None);
        assert!(
            late >= Duration::from_secs(15) && late <= Duration::from_secs(30),
            "{late:?}"
        );
        let away = backoff.next(Some(1001));
        assert!(
            away <= Duration::from_millis(250),
            "a drain is retried at once: {away:?}"
        );
        backoff.reset();
        assert!(backoff.next(None) <= Duration::from_millis(500));
    }
}
