//! Server-to-client WebSocket frames, encoded once and written as raw bytes.
//!
//! Server frames are never masked, so one encoding serves every recipient: a `recv` is turned
//! into header + payload once per gateway and each socket's writer copies the same bytes.

use bytes::{BufMut, Bytes, BytesMut};

const FIN_TEXT: u8 = 0x81;
const FIN_CLOSE: u8 = 0x88;

/// A ping with an empty payload.
pub(crate) const PING: &[u8] = &[0x89, 0x00];

/// Close codes the gateway uses (RFC 6455 section 7.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CloseReason {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
}

impl CloseReason {
    pub(crate) const GOING_AWAY: CloseReason = CloseReason {
        code: 1001,
        reason: "server shutting down",
    };
    pub(crate) const UNSUPPORTED: CloseReason = CloseReason {
        code: 1003,
        reason: "binary frames are not supported",
    };
    pub(crate) const BAD_UTF8: CloseReason = CloseReason {
        code: 1007,
        reason: "invalid UTF-8",
    };
    pub(crate) const AUTH_TIMEOUT: CloseReason = CloseReason {
        code: 1008,
        reason: "authentication timeout",
    };
    pub(crate) const AUTH_FAILURES: CloseReason = CloseReason {
        code: 1008,
        reason: "too many failed auth attempts",
    };
    pub(crate) const REVOKED: CloseReason = CloseReason {
        code: 1008,
        reason: "token revoked",
    };
    pub(crate) const EXPIRED: CloseReason = CloseReason {
        code: 1008,
        reason: "token expired",
    };
    pub(crate) const TOO_MANY_SOCKETS: CloseReason = CloseReason {
        code: 1008,
        reason: "too many connections for this user",
    };
    pub(crate) const SLOW_CONSUMER: CloseReason = CloseReason {
        code: 1008,
        reason: "slow consumer",
    };
    pub(crate) const IDLE: CloseReason = CloseReason {
        code: 1008,
        reason: "idle timeout",
    };
    pub(crate) const TOO_BIG: CloseReason = CloseReason {
        code: 1009,
        reason: "frame too large",
    };
    pub(crate) const PROTOCOL: CloseReason = CloseReason {
        code: 1002,
        reason: "protocol error",
    };
    pub(crate) const UNAVAILABLE: CloseReason = CloseReason {
        code: 1013,
        reason: "try again later",
    };
}

fn header(out: &mut BytesMut, first: u8, len: usize) {
    out.put_u8(first);
    if len < 126 {
        out.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        out.put_u8(126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
}

/// A complete text frame carrying `payload`.
pub(crate) fn text(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    header(&mut out, FIN_TEXT, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// A complete close frame.
pub(crate) fn close(reason: CloseReason) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + reason.reason.len());
    header(&mut out, FIN_CLOSE, 2 + reason.reason.len());
    out.put_u16(reason.code);
    out.put_slice(reason.reason.as_bytes());
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_use_the_right_header() {
        assert_eq!(&text(b"hi")[..], &[0x81, 2, b'h', b'i']);
        let medium = text(&[b'x'; 300]);
        assert_eq!(&medium[..4], &[0x81, 126, 1, 44]);
        assert_eq!(medium.len(), 304);
        let large = text(&vec![b'x'; 70_000]);
        assert_eq!(&large[..2], &[0x81, 127]);
        assert_eq!(large.len(), 70_010);
    }

    #[test]
    fn close_carries_code_and_reason() {
        let frame = close(CloseReason::SLOW_CONSUMER);
        assert_eq!(frame[0], 0x88);
        assert_eq!(frame[1] as usize, 2 + "slow consumer".len());
        assert_eq!(u16::from_be_bytes([frame[2], frame[3]]), 1008);
        assert_eq!(&frame[4..], b"slow consumer");
    }
}
