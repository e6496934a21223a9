//! A socket's live loop: wake-ups on its mailbox or a read, queued frames flushed in order,
//! the seam after a `since` replay, and the end of the socket.

use super::*;

/// What woke an idle socket.
pub(super) enum Wake {
    Mailbox,
    Read(Option<Result<Message, WsError>>),
}

/// The socket's state between wake-ups.
pub(super) struct SocketState {
    seam: Seam,
    /// The `msg` rate limit.
    limit: Bucket,
}

impl SocketState {
    pub(super) fn new(config: &crate::config::GatewayConfig, seam: Seam) -> SocketState {
        SocketState {
            seam,
            limit: Bucket::full(config.msg_burst, Instant::now()),
        }
    }
}

pub(super) async fn run(
    shared: &Arc<Gateway>,
    ws: &mut Socket,
    socket: &Arc<SocketHandle>,
    live: &mut SocketState,
) {
    // The idle state is only this `select!`: pings, the idle timeout and shutdown reach the
    // socket through its mailbox (see `Registry::keepalive` and `Registry::close_all`), and the
    // work after a wake-up runs in a boxed future, so none of it is part of every idle
    // socket's task.
    loop {
        let wake = tokio::select! {
            _ = socket.mailbox.wait() => Wake::Mailbox,
            item = ws.next() => Wake::Read(item),
        };
        if Box::pin(on_wake(shared, ws, socket, live, wake)).await {
            return;
        }
    }
}

/// Handles one wake-up; returns whether the socket is done.
pub(super) async fn on_wake(
    shared: &Arc<Gateway>,
    ws: &mut Socket,
    socket: &Arc<SocketHandle>,
    live: &mut SocketState,
    wake: Wake,
) -> bool {
    let timeout = shared.config.write_timeout;
    match wake {
        Wake::Mailbox => !matches!(flush(ws, socket, &mut live.seam, timeout).await, Ok(false)),
        Wake::Read(item) => {
            socket.seen();
            match classify_read(item) {
                ReadOutcome::Text(text) => {
                    handle_text(shared, socket, &mut live.limit, text.as_bytes()).await;
                    false
                }
                ReadOutcome::Nothing => false,
                ReadOutcome::Closed(reason) => {
                    close_socket(ws, reason, timeout).await;
                    true
                }
            }
        }
    }
}

/// Writes everything queued, then the close frame if one was requested. Returns whether the
/// socket is done.
pub(super) async fn flush(
    ws: &mut Socket,
    socket: &SocketHandle,
    seam: &mut Seam,
    timeout: Duration,
) -> Result<bool, ()> {
    let drained = socket.mailbox.drain();
    let mut frames = drained.frames;
    if let Some(filter) = seam.as_mut() {
        frames.retain(|item| item.recv.is_none_or(|key| keep_after_seam(filter, key)));
        if filter.is_empty() {
            *seam = None;
        }
    }
    let closing = drained.close.map(wire::close);
    let single = frames.len() == 1 && closing.is_none();
    if single {
        if let Some(item) = frames.pop_front() {
            write_raw(ws, &item.frame, timeout).await?;
        }
    } else if !frames.is_empty() || closing.is_some() {
        let size = frames.iter().map(|item| item.frame.len()).sum::<usize>()
            + closing.as_ref().map_or(0, Bytes::len);
        let mut buffer = Vec::with_capacity(size);
        for item in &frames {
            buffer.extend_from_slice(&item.frame);
        }
        drop(frames);
        if let Some(close) = &closing {
            buffer.extend_from_slice(close);
        }
        write_raw(ws, &buffer, timeout).await?;
    }
    Ok(closing.is_some())
}

/// Whether a live frame is new after the `since` replay: frames up to the replayed `sent` of
/// their room were already sent. Once a room passes its seam it is forgotten.
pub(super) fn keep_after_seam(filter: &mut HashMap<u64, Timestamp>, key: RecvKey) -> bool {
    let room = key.room.get();
    match filter.get(&room) {
        Some(&last) if key.sent <= last => false,
        Some(_) => {
            filter.remove(&room);
            true
        }
        None => true,
    }
}

/// Ends a socket whose read side ended: with our close frame for a violation, or by sending the
/// close reply tungstenite queued when the client closed first.
pub(super) async fn close_socket(ws: &mut Socket, reason: Option<CloseReason>, timeout: Duration) {
    match reason {
        Some(reason) => {
            let _ = write_raw(ws, &wire::close(reason), timeout).await;
            // Half-close, then read and drop what the client still sends (the rest of an
            // oversized frame): closing with unread input makes the kernel answer with a reset,
            // which a proxy in between may deliver before our close frame.
            let io = ws.get_mut();
            let _ = io.shutdown().await;
            let mut sink = vec![0u8; 4096];
            let mut drained = 0usize;
            let drain = async {
                while let Ok(read) = io.read(&mut sink).await {
                    drained += read;
                    if read == 0 || drained > 1 << 20 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
        }
        None => {
            let _ = tokio::time::timeout(timeout, ws.flush()).await;
        }
    }
}

/// Writes pre-encoded frames straight to the socket, after whatever tungstenite itself still
/// holds (a pong or a close reply), so frames never interleave.
pub(super) async fn write_raw(ws: &mut Socket, bytes: &[u8], timeout: Duration) -> Result<(), ()> {
    let write = async {
        ws.flush().await.map_err(|_| ())?;
        let io = ws.get_mut();
        io.write_all(bytes).await.map_err(|_| ())?;
        io.flush().await.map_err(|_| ())
    };
    tokio::time::timeout(timeout, write).await.map_err(|_| ())?
}
