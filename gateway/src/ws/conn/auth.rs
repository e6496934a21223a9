//! The `auth` phase of a socket: the token checked, the socket registered in its user's and
//! rooms' subscriptions, the answer, and the `since` replay.

use super::*;

pub(super) async fn authenticate(
    shared: &Arc<Gateway>,
    ws: &mut Socket,
    conn: u64,
) -> Option<(Arc<SocketHandle>, SocketState)> {
    let deadline = tokio::time::sleep(shared.config.auth_timeout);
    tokio::pin!(deadline);
    let mut failures = 0;
    let timeout = shared.config.write_timeout;
    loop {
        let item = tokio::select! {
            _ = &mut deadline => {
                let _ = write_raw(ws, &wire::close(CloseReason::AUTH_TIMEOUT), timeout).await;
                return None;
            }
            _ = shared.shutdown.cancelled() => {
                let _ = write_raw(ws, &wire::close(CloseReason::GOING_AWAY), timeout).await;
                return None;
            }
            item = ws.next() => item,
        };
        let text = match classify_read(item) {
            ReadOutcome::Text(text) => text,
            ReadOutcome::Nothing => continue,
            ReadOutcome::Closed(reason) => {
                close_socket(ws, reason, timeout).await;
                return None;
            }
        };
        let reply = match ClientFrame::parse(text.as_bytes()) {
            Ok(ClientFrame::Auth { token, since }) => {
                shared.metrics.in_auth.inc();
                match shared.accounts.authenticate(&shared.store, &token).await {
                    Ok(Some((session, token_hash))) => {
                        return admit(shared, ws, conn, session, token_hash, since).await;
                    }
                    Ok(None) => None,
                    Err(err) => {
                        tracing::warn!(cause = %err, "session lookup failed");
                        let _ = write_raw(ws, &wire::close(CloseReason::UNAVAILABLE), timeout).await;
                        return None;
                    }
                }
            }
            Err(FrameError::BadAuth) => {
                shared.metrics.in_auth.inc();
                None
            }
            // Not a failed authentication: the client may send a corrected `auth`.
            Err(FrameError::BadSince(why)) => {
                shared.metrics.in_auth.inc();
                shared.metrics.out_error.inc();
                Some(error_frame(why))
            }
            Ok(ClientFrame::Msg { uuid, .. }) | Err(FrameError::BadMsg { uuid }) => {
                shared.metrics.in_msg.inc();
                shared.metrics.ack(SendCode::NotAuthenticated);
                Some(send_refusal(SendCode::NotAuthenticated, uuid))
            }
            Err(FrameError::Unreadable(msg)) => {
                shared.metrics.in_invalid.inc();
                shared.metrics.out_error.inc();
                Some(error_frame(msg))
            }
        };
        let frame = match reply {
            Some(frame) => frame,
            None => {
                failures += 1;
                shared.metrics.out_auth.inc();
                let answer = encode(&ServerFrame::auth(AuthCode::Expired));
                if write_raw(ws, &answer, timeout).await.is_err() {
                    return None;
                }
                if failures >= shared.config.max_auth_failures {
                    let _ = write_raw(ws, &wire::close(CloseReason::AUTH_FAILURES), timeout).await;
                    return None;
                }
                continue;
            }
        };
        if write_raw(ws, &frame, timeout).await.is_err() {
            return None;
        }
    }
}

/// Registers an authenticated socket in its user's and rooms' subscriptions, answers `auth`, and
/// replays `since`. Live frames queue in the mailbox meanwhile and are de-duplicated at the seam.
pub(super) async fn admit(
    shared: &Arc<Gateway>,
    ws: &mut Socket,
    conn: u64,
    session: Session,
    token_hash: [u8; 32],
    since: Option<Since>,
) -> Option<(Arc<SocketHandle>, SocketState)> {
    let timeout = shared.config.write_timeout;
    let user = session.user_id;
    let socket = Arc::new(SocketHandle::new(conn, user, token_hash, session.expires));
    let member = match shared.registry.add(&socket, shared.config.max_sockets_per_user) {
        Added::TooMany => {
            shared.metrics.refused_sockets_per_user.inc();
            let _ = write_raw(ws, &wire::close(CloseReason::TOO_MANY_SOCKETS), timeout).await;
            return None;
        }
        added => added,
    };
    let registered = register(shared, &socket, member).await;
    let rooms = match registered {
        Ok(rooms) => rooms,
        Err(err) => {
            tracing::warn!(cause = %err, user, "cannot register socket");
            shared.registry.remove(&socket);
            let _ = write_raw(ws, &wire::close(CloseReason::UNAVAILABLE), timeout).await;
            return None;
        }
    };
    shared.metrics.out_auth.inc();
    if write_raw(ws, &encode(&ServerFrame::auth(AuthCode::Ok)), timeout)
        .await
        .is_err()
    {
        shared.registry.remove(&socket);
        return None;
    }
    let Some(since) = since else {
        return Some((socket, SocketState::new(&shared.config, None)));
    };
    match replay(shared, ws, &rooms, &since).await {
        Ok(seam) => Some((socket, SocketState::new(&shared.config, Some(seam)))),
        Err(()) => {
            shared.registry.remove(&socket);
            let _ = write_raw(ws, &wire::close(CloseReason::UNAVAILABLE), timeout).await;
            None
        }
    }
}

/// Subscribes the socket's user to its rooms (the user's first socket here reads them; the
/// others find them) and waits until every room's subscription is active; returns the rooms.
pub(super) async fn register(
    shared: &Arc<Gateway>,
    socket: &Arc<SocketHandle>,
    added: Added,
) -> Result<Vec<u64>, String> {
    // A shutdown that began before `add` did not find this socket in `close_all`.
    if shared.shutdown.is_cancelled() {
        socket.mailbox.close(CloseReason::GOING_AWAY);
    }
    let (member, waits) = match added {
        Added::First(member) => {
            let waits = shared.registry.load(&member).await?;
            (member, waits)
        }
        Added::Another(member) => {
            let waits =
                tokio::time::timeout(shared.config.send_timeout, shared.registry.wait_loaded(&member))
                    .await
                    .map_err(|_| "the user's rooms were not read in time".to_owned())??;
            (member, waits)
        }
        Added::TooMany => return Err("too many sockets".into()),
    };
    let all_ready = async {
        for mut ready in waits {
            ready
                .wait_for(|ready| *ready)
                .await
                .map_err(|_| "subscription failed".to_owned())?;
        }
        Ok::<(), String>(())
    };
    tokio::time::timeout(shared.config.send_timeout, all_ready)
        .await
        .map_err(|_| "subscriptions not ready in time".to_owned())??;
    Ok(member.rooms())
}

/// Messages read from the store per page of a `since` replay: what a socket holds at most
/// while it replays, besides its outbound queue.
pub(super) const REPLAY_PAGE: usize = 64;

/// Sends, room after room, the newest `--since-limit` stored messages newer than where `since`
/// says the client left off in that room, oldest first, a page at a time. Returns, per room that
/// got any, the `sent` of the last one sent: the seam for live frames queued meanwhile.
pub(super) async fn replay(
    shared: &Arc<Gateway>,
    ws: &mut Socket,
    rooms: &[u64],
    since: &Since,
) -> Result<HashMap<u64, Timestamp>, ()> {
    let store = &shared.store;
    let limit = shared.config.since_limit;
    let mut seam = HashMap::new();
    let mut total = 0u64;
    let mut out = Vec::new();
    for &room in rooms {
        let Some(after) = since.for_room(room) else {
            continue;
        };
        let failed =
            |err: chatoy_store::StoreError| tracing::warn!(cause = %err, room, "since replay failed");
        let mut cursor = store.replay_start(room, after, limit).await.map_err(failed)?;
        let mut left = limit;
        while left > 0 {
            let want = REPLAY_PAGE.min(left);
            let page = store.page_after(room, cursor, want).await.map_err(failed)?;
            let got = page.len();
            for message in page {
                cursor = message.sent;
                out.extend_from_slice(&wire::text(&recv_frame(message.into())));
                if out.len() >= 64 * 1024 {
                    write_raw(ws, &out, shared.config.write_timeout).await?;
                    out.clear();
                }
            }
            total += got as u64;
            left -= got;
            if got < want {
                break;
            }
        }
        if cursor > after {
            seam.insert(room, cursor);
        }
    }
    if !out.is_empty() {
        write_raw(ws, &out, shared.config.write_timeout).await?;
    }
    shared.metrics.out_recv.inc_by(total);
    Ok(seam)
}
