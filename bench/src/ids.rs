//! Message identities: every `msg` uuid encodes the run, the sending socket and the sequence
//! number, so an ack or a delivery is attributed by decoding 36 bytes, without a map lookup.
//!
//! Layout (a valid version-4, RFC 4122-variant UUID): `RRRRRRRR-SSSS-4SSS-8QQQ-QQQQQQQQQQQQ`,
//! with R the run's random tag (32 bits), S the sending socket's index (28 bits) and Q the
//! message's sequence number (60 bits).

use crate::wire::hex_digit;

/// Which message a uuid names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MsgId {
    /// The run's random tag.
    pub(crate) run: u32,
    /// The sending socket's global index.
    pub(crate) socket: u32,
    /// The sender's sequence number, from 0.
    pub(crate) seq: u64,
}

/// Largest socket index a uuid can carry.
pub(crate) const MAX_SOCKET: u32 = (1 << 28) - 1;

const HEX: &[u8; 16] = b"0123456789abcdef";

fn put_hex(out: &mut [u8], value: u64) {
    let digits = out.len();
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = HEX[(value >> (4 * (digits - 1 - i))) as usize & 0xF];
    }
}

fn get_hex(text: &[u8]) -> Option<u64> {
    text.iter()
        .try_fold(0u64, |n, &d| Some(n << 4 | u64::from(hex_digit(d)?)))
}

impl MsgId {
    /// Writes the uuid into `out`.
    pub(crate) fn write(&self, out: &mut [u8; 36]) {
        let socket = u64::from(self.socket & MAX_SOCKET);
        let seq = self.seq & ((1 << 60) - 1);
        put_hex(&mut out[0..8], u64::from(self.run));
        out[8] = b'-';
        put_hex(&mut out[9..13], socket >> 12);
        out[13] = b'-';
        out[14] = b'4';
        put_hex(&mut out[15..18], socket & 0xFFF);
        out[18] = b'-';
        out[19] = b'8';
        put_hex(&mut out[20..23], seq >> 48);
        out[23] = b'-';
        put_hex(&mut out[24..36], seq & 0xFFFF_FFFF_FFFF);
    }

    /// Decodes a uuid written by [`MsgId::write`]; `None` for any other uuid.
    pub(crate) fn read(text: &[u8]) -> Option<MsgId> {
        if text.len() != 36 || text[8] != b'-' || text[13] != b'-' || text[18] != b'-' || text[23] != b'-' {
            return None;
        }
        if text[14] != b'4' || text[19] != b'8' {
            return None;
        }
        let run = get_hex(&text[0..8])? as u32;
        let socket = (get_hex(&text[9..13])? << 12 | get_hex(&text[15..18])?) as u32;
        let seq = get_hex(&text[20..23])? << 48 | get_hex(&text[24..36])?;
        Some(MsgId { run, socket, seq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_a_v4_uuid() {
        for (run, socket, seq) in [
            (0, 0, 0),
            (0xdead_beef, MAX_SOCKET, (1 << 60) - 1),
            (7, 4097, 123_456),
        ] {
            let id = MsgId { run, socket, seq };
            let mut out = [0u8; 36];
            id.write(&mut out);
            assert_eq!(MsgId::read(&out), Some(id));
            let text = std::str::from_utf8(&out).unwrap_or_default();
            let parsed = uuid_shape(text);
            assert!(parsed, "{text}");
        }
    }

    fn uuid_shape(text: &str) -> bool {
        let groups: Vec<&str> = text.split('-').collect();
        groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
            && groups[2].starts_with('4')
            && groups[3].starts_with('8')
            && text.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
    }

    #[test]
    fn foreign_uuids_are_not_ours() {
        assert_eq!(MsgId::read(b"67e55044-10b1-426f-9247-bb680e5fe0c8"), None);
        assert_eq!(MsgId::read(b"short"), None);
    }
}
