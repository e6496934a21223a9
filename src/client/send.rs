//! `chatoy client send`: each message is sent and waited for until the server stored it; codes
//! 4 and 5 and a lost connection resend the same uuid after a pause (docs/client-guide.md §3).

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{anyhow, bail};
use chatoy_protocol::{ClientFrame, MessageContent, SendCode, ServerFrame, Timestamp};
use tokio::time::Instant;

use super::connection::{connect, lost, next_frame, write_frame, Backoff, Failure, Socket};
use super::http::Http;

/// What became of one `msg`.
enum Outcome {
    Stored(Timestamp),
    /// Codes 4 and 5: the same uuid again, after a pause.
    Retry(SendCode, String),
}

/// Sends `messages` (uuid, text) in order, each once stored before the next; see the module doc.
pub(super) async fn send(
    http: &Http,
    token: &str,
    room: u64,
    messages: VecDeque<(String, String)>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut queue = messages;
    let mut reconnects = Backoff::default();
    let mut retries = Backoff::default();
    let mut deadline = Instant::now() + timeout;
    let mut socket: Option<Socket> = None;
    while let Some((uuid, text)) = queue.front() {
        if Instant::now() >= deadline {
            bail!(
                "message {uuid} not stored within {}",
                humantime::format_duration(timeout)
            );
        }
        let attempt = async {
            if socket.is_none() {
                socket = Some(connect(http, token, None).await?);
            }
            let Some(ws) = socket.as_mut() else {
                return Err(lost(anyhow!("no connection")));
            };
            deliver(ws, uuid, room, text).await
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Err(_) => continue,
            Ok(Ok(Outcome::Stored(sent))) => {
                println!("{uuid}\t{sent}");
                queue.pop_front();
                reconnects.reset();
                retries.reset();
                deadline = Instant::now() + timeout;
            }
            Ok(Ok(Outcome::Retry(code, msg))) => {
                let pause = retries.next(None);
                eprintln!(
                    "chatoy: {uuid}: code {} ({msg}); resending the same uuid in {pause:.1?}",
                    code as u8
                );
                tokio::time::sleep(pause).await;
            }
            Ok(Err(Failure::Fatal(err))) => return Err(err),
            Ok(Err(Failure::Lost(err, code))) => {
                socket = None;
                let pause = reconnects.next(code);
                eprintln!("chatoy: {err:#}; reconnecting in {pause:.1?}");
                tokio::time::sleep(pause).await;
            }
        }
    }
    if let Some(mut ws) = socket {
        let _ = ws.close(None).await;
    }
    Ok(())
}

/// Sends one `msg` and waits for its `send`.
async fn deliver(socket: &mut Socket, uuid: &str, room: u64, text: &str) -> Result<Outcome, Failure> {
    let frame = ClientFrame::Msg {
        uuid: uuid.to_owned(),
        room,
        data: MessageContent::Text {
            text: text.to_owned(),
        },
    };
    write_frame(socket, &frame).await?;
    loop {
        let ServerFrame::Send {
            code,
            msg,
            uuid: acked,
            sent,
        } = next_frame(socket).await?
        else {
            continue;
        };
        if acked != uuid {
            continue;
        }
        return match code {
            SendCode::Ok => Ok(Outcome::Stored(sent)),
            SendCode::RateLimited | SendCode::Unavailable => Ok(Outcome::Retry(code, msg)),
            // Lost authentication: a new connection authenticates again.
            SendCode::NotAuthenticated => Err(lost(anyhow!("not authenticated: {msg}"))),
            SendCode::NotMember | SendCode::Invalid => Err(Failure::Fatal(anyhow!(
                "message {uuid} refused: code {}: {msg}",
                code as u8
            ))),
        };
    }
}
