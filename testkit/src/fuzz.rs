//! What the two fuzzers share (the frame parser's, `protocol/tests/fuzz_frames`, and the live
//! connection's, `tests/fuzz`): the JSON tree and its mutations (`json`), the byte mutations'
//! and string edits' strategies, the number of cases, and two checks of what a server writes.

pub mod json;

use proptest::prelude::*;
use serde_json::Value;

use json::{ByteMutation, StringEdit};

/// Invalid UTF-8 sequences: bad bytes, overlong forms, surrogates, truncated sequences,
/// code points past U+10FFFF.
pub const BAD_UTF8: &[&[u8]] = &[
    b"\xff",
    b"\xfe",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xe2\x82",
    b"\x80",
    b"\xf4\x90\x80\x80",
];

/// `CHATOY_FUZZ_CASES` (a positive number), else `default`: how many cases or sequences a
/// fuzzer runs.
pub fn cases(default: u32) -> u32 {
    match std::env::var("CHATOY_FUZZ_CASES") {
        Ok(n) => n
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("CHATOY_FUZZ_CASES={n:?} is not a positive number")),
        Err(_) => default,
    }
}

/// Any [`ByteMutation`], positions and lengths as drawn (the mutation bounds them).
pub fn byte_mutation() -> impl Strategy<Value = ByteMutation> {
    prop_oneof![
        any::<usize>().prop_map(ByteMutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| ByteMutation::FlipBit(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| ByteMutation::Insert(i, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(i, n)| ByteMutation::Delete(i, n)),
        (any::<usize>(), any::<usize>(), any::<usize>()).prop_map(|(i, o, f)| ByteMutation::Splice(i, o, f)),
        (any::<usize>(), any::<usize>()).prop_map(|(i, n)| ByteMutation::Repeat(i, n)),
    ]
}

/// Any [`StringEdit`], with the fuzzer's own pools: what an edit appends and prepends, how many
/// times it repeats the string, and the raw text that replaces a literal.
pub fn string_edit(
    append: impl Strategy<Value = String>,
    prepend: impl Strategy<Value = String>,
    repeats: Vec<usize>,
    raw_literals: Vec<&'static str>,
) -> impl Strategy<Value = StringEdit> {
    prop_oneof![
        Just(StringEdit::Upper),
        Just(StringEdit::Lower),
        Just(StringEdit::Empty),
        any::<usize>().prop_map(StringEdit::Truncate),
        append.prop_map(StringEdit::Append),
        prepend.prop_map(StringEdit::Prepend),
        prop::sample::select(repeats).prop_map(StringEdit::Repeat),
        prop::sample::select(raw_literals).prop_map(|s| StringEdit::RawLiteral(s.into())),
    ]
}

/// The keys of a JSON object, sorted (none for anything else).
pub fn sorted_keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k.as_str())
        .collect();
    keys.sort_unstable();
    keys
}

/// Whether `text` is a 36-character hyphenated UUID (hex digits in any case).
pub fn is_hyphenated_uuid(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}
