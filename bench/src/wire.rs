//! The WebSocket wire after the handshake, done by hand for speed: masked client frames out,
//! unmasked server frames in, and a lean look at the few JSON fields the bench needs.
//!
//! The receive path is the bench's hot path (a 100-member room at 10 k msg/s is 1 M frames/s):
//! frames are parsed in place in one reusable buffer, nothing is allocated per frame, and a
//! server frame's JSON is never fully parsed: the `type` tag and the `code`, `uuid`, `text`
//! and `sent` values are found by substring search. This relies only on JSON itself: a quote
//! inside a string value is always escaped, so `"uuid":"` can only occur as a real key.

use std::sync::LazyLock;

use memchr::memmem::Finder;

/// Largest server frame accepted; the server itself never sends more than its 64 KiB limit.
pub(crate) const MAX_FRAME: usize = 16 << 20;

const OP_CONTINUATION: u8 = 0x0;
/// Text frame opcode.
pub(crate) const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
/// Close frame opcode.
pub(crate) const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
/// Pong frame opcode.
pub(crate) const OP_PONG: u8 = 0xA;

/// Why the server's byte stream cannot be read as WebSocket frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WireError {
    /// A reserved bit or opcode, or a masked server frame.
    Protocol(&'static str),
    /// Fragmented messages are not supported (the server never fragments).
    Fragmented,
    /// A frame larger than [`MAX_FRAME`].
    TooLarge,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Protocol(why) => write!(f, "protocol error: {why}"),
            WireError::Fragmented => f.write_str("fragmented frame (unsupported)"),
            WireError::TooLarge => f.write_str("frame too large"),
        }
    }
}

/// One complete server frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame<'a> {
    /// A text frame's payload.
    Text(&'a [u8]),
    /// A ping; its payload must be echoed in a pong.
    Ping(&'a [u8]),
    /// A pong (ignored).
    Pong,
    /// A close frame with its status code, if any.
    Close(Option<u16>),
    /// A binary frame (the server never sends one).
    Binary,
}

/// The result of looking at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// A frame: opcode, payload start, payload end (relative to the buffer start).
    Complete { opcode: u8, start: usize, end: usize },
    /// At least this many bytes are needed in total.
    Need(usize),
}

fn head(buf: &[u8]) -> Result<Head, WireError> {
    if buf.len() < 2 {
        return Ok(Head::Need(2));
    }
    let (first, second) = (buf[0], buf[1]);
    if first & 0x70 != 0 {
        return Err(WireError::Protocol("reserved bits set"));
    }
    if second & 0x80 != 0 {
        return Err(WireError::Protocol("masked server frame"));
    }
    let opcode = first & 0x0F;
    let fin = first & 0x80 != 0;
    if !fin || opcode == OP_CONTINUATION {
        return Err(WireError::Fragmented);
    }
    let (len, header) = match second & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(Head::Need(4));
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(Head::Need(10));
            }
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(bytes), 10)
        }
        short => (short as u64, 2),
    };
    if len > MAX_FRAME as u64 {
        return Err(WireError::TooLarge);
    }
    let end = header + len as usize;
    if buf.len() < end {
        return Ok(Head::Need(end));
    }
    Ok(Head::Complete {
        opcode,
        start: header,
        end,
    })
}

/// The inbound buffer of one socket: bytes are read into its spare tail and frames parsed in
/// place; consumed bytes are reclaimed by moving the unparsed rest to the front.
#[derive(Debug)]
pub(crate) struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    /// A buffer of `capacity` bytes; it grows only to hold a frame larger than that.
    pub(crate) fn new(capacity: usize) -> ReadBuf {
        ReadBuf {
            buf: vec![0; capacity.max(16)],
            start: 0,
            end: 0,
        }
    }

    /// Where the next read goes (never empty).
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() || self.start > self.buf.len() / 2 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let len = self.buf.len() * 2;
            self.buf.resize(len, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Marks `n` bytes of [`ReadBuf::spare`] as filled.
    pub(crate) fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The next complete frame, if the buffer holds one.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame<'_>>, WireError> {
        let (opcode, start, end) = match head(&self.buf[self.start..self.end])? {
            Head::Complete { opcode, start, end } => (opcode, self.start + start, self.start + end),
            Head::Need(total) => {
                if total > self.buf.len() {
                    // Make room for the whole frame; `spare` moves the partial frame first.
                    self.buf.resize(total.next_power_of_two(), 0);
                }
                return Ok(None);
            }
        };
        self.start = end;
        let payload = &self.buf[start..end];
        Ok(Some(match opcode {
            OP_TEXT => Frame::Text(payload),
            OP_BINARY => Frame::Binary,
            OP_PING => Frame::Ping(payload),
            OP_PONG => Frame::Pong,
            OP_CLOSE => {
                Frame::Close((payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])))
            }
            _ => return Err(WireError::Protocol("unknown opcode")),
        }))
    }
}

/// The outbound buffer of one socket: frames are appended masked, then written in one go.
#[derive(Debug)]
pub(crate) struct WriteBuf {
    /// Encoded frames not yet written.
    pub(crate) buf: Vec<u8>,
    rng: u64,
}

impl WriteBuf {
    /// An empty buffer whose mask keys come from a generator seeded with `seed`.
    pub(crate) fn new(seed: u64) -> WriteBuf {
        WriteBuf {
            buf: Vec::new(),
            rng: seed | 1,
        }
    }

    fn mask_key(&mut self) -> [u8; 4] {
        // xorshift64: masking only has to be unpredictable to intermediaries, not secure.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng as u32).to_ne_bytes()
    }

    /// Appends one final, masked frame.
    pub(crate) fn frame(&mut self, opcode: u8, payload: &[u8]) {
        let mask = self.mask_key();
        let out = &mut self.buf;
        out.push(0x80 | opcode);
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= u16::MAX as usize {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        let at = out.len();
        out.extend_from_slice(payload);
        for (i, byte) in out[at..].iter_mut().enumerate() {
            *byte ^= mask[i & 3];
        }
    }

    /// A close frame with status `code`.
    pub(crate) fn close(&mut self, code: u16) {
        self.frame(OP_CLOSE, &code.to_be_bytes());
    }
}

/// The kind of a server frame, as far as the bench cares.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Server<'a> {
    /// `auth` with its code.
    Auth { code: u64 },
    /// `send`: the ack of one `msg`.
    Send { code: u64, uuid: &'a [u8] },
    /// `recv`: a room message; `text` is the first 16 bytes of the text (the send instant).
    Recv {
        uuid: &'a [u8],
        text: &'a [u8],
        sent: &'a [u8],
    },
    /// `error` or anything else.
    Other,
    /// Not a frame the bench can read.
    Malformed,
}

static TYPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"type\":\""));
static CODE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"code\":"));
static UUID: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"uuid\":\""));
static TEXT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"text\":\""));
static SENT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"sent\":\""));

/// The bytes of a string value starting at `at`, up to the closing quote.
fn string_at(payload: &[u8], at: usize) -> Option<&[u8]> {
    let rest = payload.get(at..)?;
    let len = memchr::memchr(b'"', rest)?;
    Some(&rest[..len])
}

fn uuid_of(payload: &[u8]) -> Option<&[u8]> {
    let at = UUID.find(payload)? + 8;
    let uuid = payload.get(at..at + 36)?;
    (payload.get(at + 36) == Some(&b'"')).then_some(uuid)
}

fn code_of(payload: &[u8]) -> Option<u64> {
    let at = CODE.find(payload)? + 7;
    let digits = payload.get(at..)?;
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    if len == 0 || len > 6 {
        return None;
    }
    Some(digits[..len].iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// How the server's serialiser starts every `recv`: the uuid follows at a fixed offset.
const RECV_PREFIX: &[u8] = b"{\"type\":\"recv\",\"data\":{\"uuid\":\"";

/// A `recv` as the server writes it, read without searching for the tag and the uuid (the hot
/// path: most frames are these); `None` sends the frame down the general path.
fn fast_recv(payload: &[u8]) -> Option<Server<'_>> {
    let rest = payload.strip_prefix(RECV_PREFIX)?;
    let uuid = rest.get(..36)?;
    if rest.get(36) != Some(&b'"') {
        return None;
    }
    let rest = &rest[37..];
    let text_at = TEXT.find(rest)? + 8;
    let text = rest.get(text_at..text_at + 16)?;
    let rest = &rest[text_at + 16..];
    let sent = string_at(rest, SENT.find(rest)? + 8)?;
    Some(Server::Recv { uuid, text, sent })
}

/// Classifies a server text frame and picks out the fields the bench needs.
pub(crate) fn classify(payload: &[u8]) -> Server<'_> {
    if let Some(recv) = fast_recv(payload) {
        return recv;
    }
    // serde writes the tag first, so the first `"type":"` is the frame's own (a recv's content
    // also has a `type`, but later).
    let Some(at) = TYPE.find(payload) else {
        return Server::Malformed;
    };
    let tag = payload.get(at + 8..at + 13).unwrap_or_default();
    let parsed = match tag {
        b"recv\"" => (|| {
            let uuid = uuid_of(payload)?;
            let text_at = TEXT.find(payload)? + 8;
            let text = payload.get(text_at..text_at + 16)?;
            let sent_at = SENT.find(payload)? + 8;
            let sent = string_at(payload, sent_at)?;
            Some(Server::Recv { uuid, text, sent })
        })(),
        b"send\"" => (|| {
            Some(Server::Send {
                code: code_of(payload)?,
                uuid: uuid_of(payload)?,
            })
        })(),
        b"auth\"" => code_of(payload).map(|code| Server::Auth { code }),
        _ => Some(Server::Other),
    };
    parsed.unwrap_or(Server::Malformed)
}

/// Parses exactly 16 lower- or upper-case hex digits.
pub(crate) fn hex_u64(digits: &[u8]) -> Option<u64> {
    if digits.len() != 16 {
        return None;
    }
    digits
        .iter()
        .try_fold(0u64, |n, &d| Some(n << 4 | u64::from(hex_digit(d)?)))
}

/// Hex digit values by byte; 0xFF for bytes that are not hex digits.
static HEX_VALUE: [u8; 256] = {
    let mut table = [0xFF; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// The value of one hex digit.
#[inline]
pub(crate) fn hex_digit(d: u8) -> Option<u8> {
    let value = HEX_VALUE[usize::from(d)];
    (value != 0xFF).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        if payload.len() < 126 {
            out.push(payload.len() as u8);
        } else if payload.len() <= 65535 {
            out.push(126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        } else {
            out.push(127);
            out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    fn feed(buf: &mut ReadBuf, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let spare = buf.spare();
            let n = spare.len().min(rest.len());
            spare[..n].copy_from_slice(&rest[..n]);
            buf.filled(n);
            rest = &rest[n..];
        }
    }

    #[test]
    fn parses_frames_of_every_length_class_split_anywhere() {
        let big = vec![b'y'; 70_000];
        let medium = vec![b'x'; 300];
        let mut stream = server_frame(OP_TEXT, b"hi");
        stream.extend(server_frame(OP_PING, b""));
        stream.extend(server_frame(OP_TEXT, &medium));
        stream.extend(server_frame(OP_TEXT, &big));
        stream.extend(server_frame(OP_CLOSE, &[0x03, 0xF0, b'b', b'y', b'e']));
        for chunk in [1, 3, 7, 64, 100_000] {
            let mut buf = ReadBuf::new(64);
            let mut seen = Vec::new();
            for piece in stream.chunks(chunk) {
                feed(&mut buf, piece);
                while let Ok(Some(frame)) = buf.next_frame() {
                    seen.push(match frame {
                        Frame::Text(p) => format!("text {}", p.len()),
                        Frame::Ping(p) => format!("ping {}", p.len()),
                        Frame::Close(code) => format!("close {code:?}"),
                        other => format!("{other:?}"),
                    });
                }
            }
            assert_eq!(
                seen,
                ["text 2", "ping 0", "text 300", "text 70000", "close Some(1008)"],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn refuses_masked_and_fragmented_frames() {
        let mut buf = ReadBuf::new(64);
        feed(&mut buf, &[0x81, 0x82, 1, 2, 3, 4, 5, 6]);
        assert!(matches!(buf.next_frame(), Err(WireError::Protocol(_))));
        let mut buf = ReadBuf::new(64);
        feed(&mut buf, &[0x01, 0x01, b'a']);
        assert_eq!(buf.next_frame(), Err(WireError::Fragmented));
    }

    #[test]
    fn client_frames_are_masked_and_decodable() {
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut out = WriteBuf::new(42);
            out.frame(OP_TEXT, &payload);
            let frame = &out.buf;
            assert_eq!(frame[0], 0x81);
            assert_eq!(frame[1] & 0x80, 0x80);
            let (len_field, at) = match frame[1] & 0x7F {
                126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(frame[2..10].try_into().unwrap_or_default()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            assert_eq!(len_field, len);
            let mask = &frame[at..at + 4];
            let decoded: Vec<u8> = frame[at + 4..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i & 3])
                .collect();
            assert_eq!(decoded, payload);
        }
    }

    #[test]
    fn picks_fields_out_of_server_frames() {
        let recv = br#"{"type":"recv","data":{"uuid":"67e55044-10b1-426f-9247-bb680e5fe0c8","sender":1,"room":1,"data":{"type":"Text","text":"00000000000004d2 hello"},"sent":"2022-12-22T14:33:59.579746716+00:00","modified":false}}"#;
        assert_eq!(
            classify(recv),
            Server::Recv {
                uuid: b"67e55044-10b1-426f-9247-bb680e5fe0c8",
                text: b"00000000000004d2",
                sent: b"2022-12-22T14:33:59.579746716+00:00",
            }
        );
        let send = br#"{"type":"send","code":4,"msg":"slow down","uuid":"67e55044-10b1-426f-9247-bb680e5fe0c8","sent":"2022-12-22T14:33:59.579746716+00:00"}"#;
        assert_eq!(
            classify(send),
            Server::Send {
                code: 4,
                uuid: b"67e55044-10b1-426f-9247-bb680e5fe0c8"
            }
        );
        assert_eq!(
            classify(br#"{"type":"auth","code":0,"msg":""}"#),
            Server::Auth { code: 0 }
        );
        assert_eq!(classify(br#"{"type":"error","code":3,"msg":"x"}"#), Server::Other);
        assert_eq!(classify(br#"{"type":"recv","data":{}}"#), Server::Malformed);
        assert_eq!(classify(b"garbage"), Server::Malformed);
        assert_eq!(hex_u64(b"00000000000004d2"), Some(1234));
        assert_eq!(hex_u64(b"0000000000000xyz"), None);
        assert_eq!(hex_u64(b"ABCDEF0123456789"), Some(0xABCD_EF01_2345_6789));
        assert_eq!(hex_u64(b"abcdef0123456789"), Some(0xABCD_EF01_2345_6789));
    }
}
