//! Deciding what each batch line becomes: a record, a dead letter, or nothing.
//!
//! A record's key is the file's SHA-256: the part of `id` before the first
//! `_` (sandbox names contain spaces and `_`), 64 lowercase hex characters.
//! Lines that are not UTF-8, not a JSON object, have no valid id, or would
//! make a Kafka message larger than `max_message_bytes` are dead letters;
//! empty (or all-whitespace) lines are skipped. Pure: no I/O.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::lines::Line;

/// Bytes a record costs beyond its key, value and headers (record and batch
/// framing), reserved when checking a message against `max_message_bytes`.
pub const RECORD_FRAMING_BYTES: usize = 128;
/// Bytes reserved for a dead letter's headers and framing; its value is cut to
/// `max_message_bytes - DLQ_RESERVED_BYTES`.
pub const DLQ_RESERVED_BYTES: usize = 512;

/// The header names every record carries (sizes count towards the limit).
pub const HEADER_ID: &str = "vt.id";
pub const HEADER_SANDBOX: &str = "vt.sandbox_name";
pub const HEADER_BATCH: &str = "vt.batch";
pub const HEADER_LINE: &str = "vt.line";
pub const HEADER_CONTENT_TYPE: &str = "content-type";
pub const CONTENT_TYPE_JSON: &str = "application/json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DlqReason {
    NotUtf8,
    NotJsonObject,
    BadId,
    TooLarge,
}

impl DlqReason {
    /// The `dlq.reason` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            DlqReason::NotUtf8 => "not_utf8",
            DlqReason::NotJsonObject => "not_json_object",
            DlqReason::BadId => "bad_id",
            DlqReason::TooLarge => "too_large",
        }
    }
}

impl fmt::Display for DlqReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A valid feed record's identity.
#[derive(Debug, PartialEq, Eq)]
pub struct RecordId<'a> {
    /// The full `id`, e.g. `<sha256>_Rising MOVES`.
    pub id: Cow<'a, str>,
    /// Length of the SHA-256 prefix of `id` (always 64).
    sha_len: usize,
}

impl RecordId<'_> {
    pub fn sha256(&self) -> &str {
        &self.id[..self.sha_len]
    }

    pub fn sandbox_name(&self) -> &str {
        &self.id[self.sha_len + 1..]
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    Record(RecordId<'a>),
    Dead(DlqReason),
    Skip,
}

/// Classifies lines against a message-size limit.
#[derive(Debug, Clone, Copy)]
pub struct LineClassifier {
    max_message_bytes: usize,
}

impl LineClassifier {
    pub fn new(max_message_bytes: usize) -> LineClassifier {
        LineClassifier { max_message_bytes }
    }

    /// The longest dead-letter value: lines are cut to this.
    pub fn dlq_value_limit(&self) -> usize {
        self.max_message_bytes.saturating_sub(DLQ_RESERVED_BYTES)
    }

    /// The longest line that can possibly be a record (the splitter's limit).
    pub fn line_limit(&self) -> usize {
        self.max_message_bytes
    }

    pub fn classify<'a>(&self, line: &Line<'a>) -> Verdict<'a> {
        match *line {
            Line::Oversize { .. } => Verdict::Dead(DlqReason::TooLarge),
            Line::Whole { number, bytes } => self.classify_bytes(number, bytes),
        }
    }

    fn classify_bytes<'a>(&self, number: u64, bytes: &'a [u8]) -> Verdict<'a> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Verdict::Skip;
        }
        if bytes.len() + 64 + RECORD_FRAMING_BYTES > self.max_message_bytes {
            return Verdict::Dead(DlqReason::TooLarge);
        }
        let Ok(text) = std::str::from_utf8(bytes) else {
            return Verdict::Dead(DlqReason::NotUtf8);
        };
        let id = match parse_id(text) {
            Err(_) => return Verdict::Dead(DlqReason::NotJsonObject),
            Ok(IdField::Valid(id)) => id,
            Ok(_) => return Verdict::Dead(DlqReason::BadId),
        };
        let Some(record) = record_id(id) else {
            return Verdict::Dead(DlqReason::BadId);
        };
        if self.record_size(bytes.len(), &record, number) > self.max_message_bytes {
            return Verdict::Dead(DlqReason::TooLarge);
        }
        Verdict::Record(record)
    }

    /// Size of the Kafka message a record becomes: key, value, headers, framing.
    fn record_size(&self, value_len: usize, r: &RecordId<'_>, line_number: u64) -> usize {
        let headers = HEADER_ID.len()
            + r.id.len()
            + HEADER_SANDBOX.len()
            + r.sandbox_name().len()
            + HEADER_BATCH.len()
            + 12
            + HEADER_LINE.len()
            + decimal_len(line_number)
            + HEADER_CONTENT_TYPE.len()
            + CONTENT_TYPE_JSON.len();
        value_len + r.sha_len + headers + RECORD_FRAMING_BYTES
    }
}

fn decimal_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

/// Splits a valid id at its first `_`; `None` unless the part before is
/// 64 lowercase hex characters and a sandbox name follows.
pub fn record_id(id: Cow<'_, str>) -> Option<RecordId<'_>> {
    let sep = id.find('_')?;
    let sha = &id[..sep];
    let valid_sha = sha.len() == 64 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let has_sandbox = id.len() > sep + 1;
    (valid_sha && has_sandbox).then_some(RecordId { id, sha_len: sep })
}

/// What the top-level `id` member of a JSON object held.
enum IdField<'a> {
    Valid(Cow<'a, str>),
    Absent,
    NotAString,
    Duplicate,
}

/// Parses `text` as one JSON object (rejecting anything else, including
/// trailing data) and returns its `id` member, ignoring every other member.
fn parse_id(text: &str) -> Result<IdField<'_>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let id = de.deserialize_map(IdVisitor)?;
    de.end()?;
    Ok(id)
}

struct IdVisitor;

impl<'de> Visitor<'de> for IdVisitor {
    type Value = IdField<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = IdField::Absent;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key != "id" {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let value = map.next_value::<MaybeString<'de>>()?;
            found = match (found, value.0) {
                (IdField::Absent, Some(s)) => IdField::Valid(s),
                (IdField::Absent, None) => IdField::NotAString,
                _ => IdField::Duplicate,
            };
        }
        Ok(found)
    }
}

/// A JSON value that is kept only when it is a string.
struct MaybeString<'a>(Option<Cow<'a, str>>);

impl<'de> de::Deserialize<'de> for MaybeString<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeString<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(MaybeString(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(MaybeString(Some(Cow::Owned(v.to_string()))))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(MaybeString(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(MaybeString(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(MaybeString(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(MaybeString(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(MaybeString(None))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybeString(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(MaybeString(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "e5a3ad5be83b814f0826919d607734be22dc408cb491baab0fa27c0f51304f00";

    fn classify(bytes: &[u8]) -> Verdict<'_> {
        LineClassifier::new(1 << 20).classify(&Line::Whole { number: 1, bytes })
    }

    fn line_with_id(id: &str) -> String {
        format!(
            r#"{{"id": "{id}", "type": "file_behaviour", "attributes": {{"x": [1, {{"id": 2}}]}}}}"#
        )
    }

    #[test]
    fn key_is_the_sha256_before_the_first_underscore() {
        for (sandbox, id) in [
            ("Zenbox", format!("{SHA}_Zenbox")),
            ("Rising MOVES", format!("{SHA}_Rising MOVES")),
            ("CAPE_Sandbox v2", format!("{SHA}_CAPE_Sandbox v2")),
            ("_", format!("{SHA}__")),
        ] {
            let line = line_with_id(&id);
            match classify(line.as_bytes()) {
                Verdict::Record(r) => {
                    assert_eq!(r.sha256(), SHA);
                    assert_eq!(r.sandbox_name(), sandbox);
                    assert_eq!(r.id, id);
                }
                other => panic!("{id}: {other:?}"),
            }
        }
    }

    #[test]
    fn escaped_ids_are_decoded() {
        let line = format!(r#"{{"id": "{SHA}_Rising\u0020MOVES"}}"#);
        match classify(line.as_bytes()) {
            Verdict::Record(r) => assert_eq!(r.sandbox_name(), "Rising MOVES"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_ids_are_dead_letters() {
        let upper = SHA.to_uppercase();
        let short = &SHA[..63];
        for id in [
            format!("{upper}_Zenbox"),
            format!("{short}_Zenbox"),
            format!("{SHA}Zenbox"),
            format!("{SHA}_"),
            SHA.to_string(),
            String::new(),
            format!("{}g_Zenbox", &SHA[..63]),
        ] {
            assert_eq!(
                classify(line_with_id(&id).as_bytes()),
                Verdict::Dead(DlqReason::BadId),
                "{id}"
            );
        }
        for line in [
            r#"{"type": "file_behaviour"}"#.to_string(),
            r#"{"id": 42}"#.to_string(),
            r#"{"id": null}"#.to_string(),
            format!(r#"{{"id": ["{SHA}_Zenbox"]}}"#),
            format!(r#"{{"id": "{SHA}_Zenbox", "id": "{SHA}_Zenbox"}}"#),
        ] {
            assert_eq!(
                classify(line.as_bytes()),
                Verdict::Dead(DlqReason::BadId),
                "{line}"
            );
        }
    }

    #[test]
    fn non_objects_and_broken_json_are_dead_letters() {
        for line in [
            "[1,2]",
            "\"str\"",
            "42",
            "null",
            "{",
            "{\"id\": \"x\"",
            "{} {}",
            "{}x",
            "not json",
        ] {
            assert_eq!(
                classify(line.as_bytes()),
                Verdict::Dead(DlqReason::NotJsonObject),
                "{line}"
            );
        }
        let nested_only = format!(r#"{{"attributes": {{"id": "{SHA}_Zenbox"}}}}"#);
        assert_eq!(
            classify(nested_only.as_bytes()),
            Verdict::Dead(DlqReason::BadId)
        );
    }

    #[test]
    fn invalid_utf8_is_a_dead_letter() {
        let mut line = line_with_id(&format!("{SHA}_Zenbox")).into_bytes();
        line.insert(3, 0xff);
        assert_eq!(classify(&line), Verdict::Dead(DlqReason::NotUtf8));
    }

    #[test]
    fn blank_lines_are_skipped() {
        for line in ["", " ", "\r", "\t \r"] {
            assert_eq!(classify(line.as_bytes()), Verdict::Skip);
        }
    }

    #[test]
    fn size_limit_counts_key_headers_and_framing() {
        let id = format!("{SHA}_Zenbox");
        let head = format!(r#"{{"id": "{id}", "pad": ""#);
        let tail = "\"}";
        let limit = 8192;
        let c = LineClassifier::new(limit);
        let overhead = 64
            + RECORD_FRAMING_BYTES
            + HEADER_ID.len()
            + id.len()
            + HEADER_SANDBOX.len()
            + "Zenbox".len()
            + HEADER_BATCH.len()
            + 12
            + HEADER_LINE.len()
            + 1
            + HEADER_CONTENT_TYPE.len()
            + CONTENT_TYPE_JSON.len();
        let fits = limit - overhead;
        let make =
            |len: usize| format!("{head}{}{tail}", "a".repeat(len - head.len() - tail.len()));
        let ok = make(fits);
        assert!(matches!(
            c.classify(&Line::Whole {
                number: 1,
                bytes: ok.as_bytes()
            }),
            Verdict::Record(_)
        ));
        let big = make(fits + 1);
        assert_eq!(
            c.classify(&Line::Whole {
                number: 1,
                bytes: big.as_bytes()
            }),
            Verdict::Dead(DlqReason::TooLarge)
        );
        let oversize = Line::Oversize {
            number: 1,
            size: 1 << 30,
            sha256: [0; 32],
            prefix: b"{",
        };
        assert_eq!(c.classify(&oversize), Verdict::Dead(DlqReason::TooLarge));
        assert_eq!(c.dlq_value_limit(), limit - DLQ_RESERVED_BYTES);
    }

    #[test]
    fn real_fixture_records_are_valid() {
        let fixtures = include_str!("../../fixtures/vt-file-behaviour-sample.jsonl");
        let c = LineClassifier::new(1 << 20);
        let mut n = 0;
        for (i, line) in fixtures.lines().enumerate() {
            let v = c.classify(&Line::Whole {
                number: i as u64 + 1,
                bytes: line.as_bytes(),
            });
            assert!(
                matches!(v, Verdict::Record(_)),
                "fixture line {}: {v:?}",
                i + 1
            );
            n += 1;
        }
        assert_eq!(n, 5);
    }
}
