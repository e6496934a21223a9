//! A JSON tree that keeps what `serde_json::Value` loses (duplicate keys, key order, number
//! spelling), its writer, and the structured mutations the fuzzer applies to corpus frames.

use std::fmt::Write as _;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A JSON document as written: object keys in order and possibly repeated; `Raw` is written
/// verbatim, so a tree can also hold what is not JSON at all (huge numbers, bad escapes).
#[derive(Debug, Clone, PartialEq)]
pub enum Tree {
    Null,
    Bool(bool),
    Num(serde_json::Number),
    Str(String),
    Arr(Vec<Tree>),
    Obj(Vec<(String, Tree)>),
    /// Written as is; a tree holding one is read back only if the text happens to be JSON.
    Raw(String),
}

impl Tree {
    /// The value of the last `key` of an object (what `serde_json::Value` keeps).
    pub fn last(&self, key: &str) -> Option<&Tree> {
        match self {
            Tree::Obj(pairs) => pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// How many times `key` occurs in an object.
    pub fn count(&self, key: &str) -> usize {
        match self {
            Tree::Obj(pairs) => pairs.iter().filter(|(k, _)| k == key).count(),
            _ => 0,
        }
    }

    /// The value of `key` if it occurs exactly once.
    pub fn unique(&self, key: &str) -> Option<&Tree> {
        (self.count(key) == 1).then(|| self.last(key)).flatten()
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Tree::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Compact JSON text.
    pub fn compact(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, None, 0);
        out
    }

    /// Pretty JSON text, indented by `indent` spaces per level.
    pub fn pretty(&self, indent: usize) -> String {
        let mut out = String::new();
        self.write(&mut out, Some(indent), 0);
        out
    }

    fn write(&self, out: &mut String, indent: Option<usize>, depth: usize) {
        let newline = |out: &mut String, depth: usize| {
            if let Some(width) = indent {
                out.push('\n');
                out.extend(std::iter::repeat_n(' ', width * depth));
            }
        };
        match self {
            Tree::Null => out.push_str("null"),
            Tree::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Tree::Num(n) => {
                let _ = write!(out, "{n}");
            }
            Tree::Str(s) => out.push_str(&quote(s)),
            Tree::Raw(raw) => out.push_str(raw),
            Tree::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(out, depth + 1);
                    item.write(out, indent, depth + 1);
                }
                if !items.is_empty() {
                    newline(out, depth);
                }
                out.push(']');
            }
            Tree::Obj(pairs) => {
                out.push('{');
                for (i, (key, value)) in pairs.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(out, depth + 1);
                    out.push_str(&quote(key));
                    out.push(':');
                    if indent.is_some() {
                        out.push(' ');
                    }
                    value.write(out, indent, depth + 1);
                }
                if !pairs.is_empty() {
                    newline(out, depth);
                }
                out.push('}');
            }
        }
    }

    /// Every node in pre-order, as paths of child indexes.
    fn paths(&self) -> Vec<Vec<usize>> {
        fn walk(tree: &Tree, path: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
            out.push(path.clone());
            let children: Vec<&Tree> = match tree {
                Tree::Arr(items) => items.iter().collect(),
                Tree::Obj(pairs) => pairs.iter().map(|(_, v)| v).collect(),
                _ => Vec::new(),
            };
            for (i, child) in children.into_iter().enumerate() {
                path.push(i);
                walk(child, path, out);
                path.pop();
            }
        }
        let mut out = Vec::new();
        walk(self, &mut Vec::new(), &mut out);
        out
    }

    fn at(&self, path: &[usize]) -> Option<&Tree> {
        let Some((first, rest)) = path.split_first() else {
            return Some(self);
        };
        let child = match self {
            Tree::Arr(items) => items.get(*first)?,
            Tree::Obj(pairs) => &pairs.get(*first)?.1,
            _ => return None,
        };
        child.at(rest)
    }

    fn at_mut(&mut self, path: &[usize]) -> Option<&mut Tree> {
        let Some((first, rest)) = path.split_first() else {
            return Some(self);
        };
        let child = match self {
            Tree::Arr(items) => items.get_mut(*first)?,
            Tree::Obj(pairs) => &mut pairs.get_mut(*first)?.1,
            _ => return None,
        };
        child.at_mut(rest)
    }

    /// The node picked by `selector` among all nodes (modulo their number).
    fn pick(&mut self, selector: usize) -> Option<&mut Tree> {
        let paths = self.paths();
        let path = paths.get(selector % paths.len().max(1))?.clone();
        self.at_mut(&path)
    }

    /// The object picked by `selector` among all non-empty objects.
    fn pick_object(&mut self, selector: usize) -> Option<&mut Vec<(String, Tree)>> {
        let paths: Vec<Vec<usize>> = self
            .paths()
            .into_iter()
            .filter(|p| matches!(self.at(p), Some(Tree::Obj(pairs)) if !pairs.is_empty()))
            .collect();
        if paths.is_empty() {
            return None;
        }
        let path = paths[selector % paths.len()].clone();
        match self.at_mut(&path) {
            Some(Tree::Obj(pairs)) => Some(pairs),
            _ => None,
        }
    }

    /// Applies one structured mutation; a mutation with nothing to act on does nothing.
    pub fn mutate(&mut self, mutation: &TreeMutation) {
        match mutation {
            TreeMutation::DeleteField(at, field) => {
                if let Some(pairs) = self.pick_object(*at) {
                    pairs.remove(field % pairs.len());
                }
            }
            TreeMutation::DuplicateField(at, field, value) => {
                if let Some(pairs) = self.pick_object(*at) {
                    let i = field % pairs.len();
                    let key = pairs[i].0.clone();
                    let value = value.clone().unwrap_or_else(|| pairs[i].1.clone());
                    pairs.insert((i + 1).min(pairs.len()), (key, value));
                }
            }
            TreeMutation::AddField(at, key, value) => {
                if let Some(pairs) = self.pick_object(*at) {
                    pairs.push((key.clone(), value.clone()));
                }
            }
            TreeMutation::RenameField(at, field, how) => {
                if let Some(pairs) = self.pick_object(*at) {
                    let i = field % pairs.len();
                    pairs[i].0 = how.apply(&pairs[i].0);
                }
            }
            TreeMutation::Replace(at, value) => {
                if let Some(node) = self.pick(*at) {
                    *node = value.clone();
                }
            }
            TreeMutation::Nest(at, depth, arrays) => {
                if let Some(node) = self.pick(*at) {
                    let mut inner = std::mem::replace(node, Tree::Null);
                    for _ in 0..*depth {
                        inner = if *arrays {
                            Tree::Arr(vec![inner])
                        } else {
                            Tree::Obj(vec![("a".into(), inner)])
                        };
                    }
                    *node = inner;
                }
            }
            TreeMutation::EditString(at, how) => {
                let paths = self.paths();
                let strings: Vec<Vec<usize>> = paths
                    .into_iter()
                    .filter(|p| matches!(self.at(p), Some(Tree::Str(_))))
                    .collect();
                if strings.is_empty() {
                    return;
                }
                let path = strings[at % strings.len()].clone();
                if let Some(node) = self.at_mut(&path) {
                    if let Tree::Str(s) = node {
                        *node = how.apply_string(s);
                    }
                }
            }
            TreeMutation::Shuffle(at, rotate) => {
                if let Some(pairs) = self.pick_object(*at) {
                    let n = pairs.len();
                    pairs.rotate_left(rotate % n);
                }
            }
        }
    }
}

/// A string as a JSON string literal.
pub fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// One structured change to a JSON tree. Indexes select among the candidates modulo their
/// number, so every generated mutation applies to every tree.
#[derive(Debug, Clone)]
pub enum TreeMutation {
    /// Removes a field of an object.
    DeleteField(usize, usize),
    /// Repeats a field right after itself, with its value or another one.
    DuplicateField(usize, usize, Option<Tree>),
    /// Appends a field (known or unknown key).
    AddField(usize, String, Tree),
    /// Changes a key's spelling.
    RenameField(usize, usize, StringEdit),
    /// Replaces any node (a type change, a huge number, a bad literal).
    Replace(usize, Tree),
    /// Wraps a node in this many arrays (true) or objects (false).
    Nest(usize, usize, bool),
    /// Edits a string value.
    EditString(usize, StringEdit),
    /// Rotates an object's keys.
    Shuffle(usize, usize),
}

/// An edit of a string: case, unicode edge cases, truncation, growth.
#[derive(Debug, Clone)]
pub enum StringEdit {
    Upper,
    Lower,
    Empty,
    Truncate(usize),
    Append(String),
    Prepend(String),
    Repeat(usize),
    /// Replaces the string literal by raw text (bad escapes, lone surrogates).
    RawLiteral(String),
}

impl StringEdit {
    /// The edited string.
    pub fn apply(&self, s: &str) -> String {
        match self {
            StringEdit::Upper => s.to_uppercase(),
            StringEdit::Lower => s.to_lowercase(),
            StringEdit::Empty => String::new(),
            StringEdit::Truncate(n) => s.chars().take(n % (s.chars().count() + 1)).collect(),
            StringEdit::Append(extra) => format!("{s}{extra}"),
            StringEdit::Prepend(extra) => format!("{extra}{s}"),
            StringEdit::Repeat(n) => s.repeat(*n),
            StringEdit::RawLiteral(raw) => format!("{s}{raw}"),
        }
    }

    fn apply_string(&self, s: &str) -> Tree {
        match self {
            StringEdit::RawLiteral(raw) => Tree::Raw(format!("\"{raw}\"")),
            other => Tree::Str(other.apply(s)),
        }
    }
}

/// A change to the bytes of a frame, after any structured mutation.
#[derive(Debug, Clone)]
pub enum ByteMutation {
    /// Keeps the first bytes only.
    Truncate(usize),
    /// Flips one bit of one byte.
    FlipBit(usize, u8),
    /// Inserts a byte.
    Insert(usize, u8),
    /// Removes a range.
    Delete(usize, usize),
    /// Replaces the tail from one position with the tail of another frame from another position.
    Splice(usize, usize, usize),
    /// Repeats a range in place.
    Repeat(usize, usize),
}

impl ByteMutation {
    /// Applies the mutation; `others` are the frames a splice may take from.
    pub fn apply(&self, bytes: &mut Vec<u8>, others: &[Vec<u8>]) {
        let len = bytes.len();
        let at = |i: usize| if len == 0 { 0 } else { i % (len + 1) };
        match self {
            ByteMutation::Truncate(i) => bytes.truncate(at(*i)),
            ByteMutation::FlipBit(i, bit) => {
                if len > 0 {
                    bytes[i % len] ^= 1 << (bit % 8);
                }
            }
            ByteMutation::Insert(i, byte) => bytes.insert(at(*i), *byte),
            ByteMutation::Delete(i, n) => {
                let start = at(*i);
                let end = (start + n % 16).min(len);
                bytes.drain(start..end);
            }
            ByteMutation::Splice(i, other, from) => {
                if let Some(other) = others.get(other % others.len().max(1)) {
                    let from = if other.is_empty() {
                        0
                    } else {
                        from % (other.len() + 1)
                    };
                    bytes.truncate(at(*i));
                    bytes.extend_from_slice(&other[from..]);
                }
            }
            ByteMutation::Repeat(i, n) => {
                let start = at(*i);
                let end = (start + n % 32).min(len);
                let copy = bytes[start..end].to_vec();
                let mut tail = bytes.split_off(end);
                bytes.extend_from_slice(&copy);
                bytes.append(&mut tail);
            }
        }
    }
}

impl<'de> Deserialize<'de> for Tree {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Tree, D::Error> {
        deserializer.deserialize_any(TreeVisitor)
    }
}

struct TreeVisitor;

impl<'de> Visitor<'de> for TreeVisitor {
    type Value = Tree;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Tree, E> {
        Ok(Tree::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Tree, E> {
        Ok(Tree::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Tree, E> {
        Ok(Tree::Bool(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Tree, E> {
        Ok(Tree::Num(v.into()))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Tree, E> {
        Ok(Tree::Num(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Tree, E> {
        serde_json::Number::from_f64(v)
            .map(Tree::Num)
            .ok_or_else(|| E::custom("not a finite number"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Tree, E> {
        Ok(Tree::Str(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Tree, E> {
        Ok(Tree::Str(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tree, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Tree::Arr(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tree, A::Error> {
        let mut pairs = Vec::new();
        while let Some((key, value)) = map.next_entry::<String, Tree>()? {
            pairs.push((key, value));
        }
        Ok(Tree::Obj(pairs))
    }
}
