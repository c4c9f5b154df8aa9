//! An order-preserving JSON tree and a writer that formats JSON exactly like
//! the real feed (Python's `json.dumps`: `", "` and `": "` separators,
//! non-ASCII escaped as `\u` plus four hex digits, e.g. `\u00e9`).
//!
//! `serde_json::Value` sorts object keys (the crate is built without
//! `preserve_order`), which would make simulated records look unlike the
//! real ones (`id` first, attributes in upstream order); hence this tree.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};

/// A JSON value whose objects keep their key order.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Null,
    Bool(bool),
    Num(serde_json::Number),
    Str(String),
    Arr(Vec<Node>),
    Obj(Vec<(String, Node)>),
}

impl Node {
    pub fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn str(s: impl Into<String>) -> Node {
        Node::Str(s.into())
    }

    pub fn int(n: i64) -> Node {
        Node::Num(n.into())
    }

    pub fn obj<const N: usize>(fields: [(&str, Node); N]) -> Node {
        Node::Obj(
            fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Node, E> {
        Ok(Node::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Node, E> {
        Ok(Node::Num(n.into()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Node, E> {
        Ok(Node::Num(n.into()))
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Node, E> {
        serde_json::Number::from_f64(n)
            .map(Node::Num)
            .ok_or_else(|| E::custom("non-finite number"))
    }
    fn visit_str<E>(self, s: &str) -> Result<Node, E> {
        Ok(Node::Str(s.to_string()))
    }
    fn visit_string<E>(self, s: String) -> Result<Node, E> {
        Ok(Node::Str(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element()? {
            items.push(v);
        }
        Ok(Node::Arr(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut fields = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, Node>()? {
            fields.push((k, v));
        }
        Ok(Node::Obj(fields))
    }
}

/// Rewrites string values while a tree is written (keys are never rewritten).
/// Arguments: the key the string sits under (if directly in an object), the
/// original text, and the buffer to write the replacement into.
pub type Rewrite<'a> = dyn FnMut(Option<&str>, &str, &mut String) + 'a;

/// Writes `node` in the feed's formatting, passing every string value through `rewrite`.
pub fn write_node(out: &mut Vec<u8>, node: &Node, rewrite: &mut Rewrite<'_>) {
    write_inner(out, None, node, rewrite, &mut String::new());
}

fn write_inner(
    out: &mut Vec<u8>,
    key: Option<&str>,
    node: &Node,
    rewrite: &mut Rewrite<'_>,
    scratch: &mut String,
) {
    match node {
        Node::Null => out.extend_from_slice(b"null"),
        Node::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Node::Num(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Node::Str(s) => {
            scratch.clear();
            rewrite(key, s, scratch);
            write_str(out, scratch);
        }
        Node::Arr(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write_inner(out, None, item, rewrite, scratch);
            }
            out.push(b']');
        }
        Node::Obj(fields) => {
            out.push(b'{');
            for (i, (k, v)) in fields.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write_key(out, k);
                write_inner(out, Some(k), v, rewrite, scratch);
            }
            out.push(b'}');
        }
    }
}

/// Writes a tree as is.
pub fn write_plain(out: &mut Vec<u8>, node: &Node) {
    write_node(out, node, &mut |_, s, buf| buf.push_str(s));
}

/// Writes `"key": `.
pub fn write_key(out: &mut Vec<u8>, key: &str) {
    write_str(out, key);
    out.extend_from_slice(b": ");
}

/// Writes a JSON string literal, escaping like Python's `ensure_ascii=True`.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            ' '..='~' => out.push(c as u8),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.extend_from_slice(b"\\u");
                    for shift in [12, 8, 4, 0] {
                        out.push(HEX[usize::from(*u >> shift & 0xf)]);
                    }
                }
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &[u8] = include_bytes!("../../../fixtures/vt-file-behaviour-sample.jsonl");

    #[test]
    fn round_trips_the_real_records_byte_for_byte() {
        for line in FIXTURE.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let node: Node = serde_json::from_slice(line).unwrap();
            let mut out = Vec::new();
            write_plain(&mut out, &node);
            assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn escapes_like_python() {
        let mut out = Vec::new();
        write_str(&mut out, "a\"b\\c\nd\u{1}é中😀/");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#""a\"b\\c\nd\u0001\u00e9\u4e2d\ud83d\ude00/""#
        );
    }

    #[test]
    fn rewrites_values_and_reports_their_key() {
        let node = Node::obj([
            ("id", Node::str("x")),
            ("list", Node::Arr(vec![Node::str("y")])),
        ]);
        let mut seen = Vec::new();
        let mut out = Vec::new();
        write_node(&mut out, &node, &mut |key, s, buf| {
            seen.push((key.map(str::to_string), s.to_string()));
            buf.push_str(&s.to_uppercase());
        });
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"id": "X", "list": ["Y"]}"#
        );
        assert_eq!(
            seen,
            [
                (Some("id".to_string()), "x".to_string()),
                (None, "y".to_string())
            ]
        );
    }
}
