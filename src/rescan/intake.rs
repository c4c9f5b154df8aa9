//! What one request message becomes before any call: a finished result
//! (invalid, not JSON, reply topic refused) or a call to make.
//!
//! Headers: `kafka_correlationId` is copied to the result byte for byte; a
//! `kafka_replyTopic` sends the result there only when the topic is in
//! `reply_topic_allowlist`, otherwise the request is refused (no call) and
//! its result, on the results topic, says why. A message that is not JSON at
//! all also goes, raw, to the dead-letter topic. Pure: no I/O, no clock.

use std::collections::HashSet;
use std::time::SystemTime;

use reqwest::Url;

use super::request::{AllowedValues, Rejection, RescanRequest, RescanUrl};
use super::result::{ErrorKind, MessageOrigin, RescanResult, Timing};

pub const HEADER_CORRELATION_ID: &str = "kafka_correlationId";
pub const HEADER_REPLY_TOPIC: &str = "kafka_replyTopic";

/// A record to produce when the request's outcome is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// One consumed request message.
#[derive(Debug, Clone)]
pub struct RequestMessage {
    pub origin: MessageOrigin,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub received_at: SystemTime,
}

impl RequestMessage {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// Where and how a result is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultRoute {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl ResultRoute {
    pub fn record(&self, result: &RescanResult) -> OutRecord {
        OutRecord {
            topic: self.topic.clone(),
            key: self.key.clone(),
            value: result.to_bytes(),
            headers: self.headers.clone(),
        }
    }
}

/// The outcome of intake.
#[derive(Debug)]
pub enum Intake {
    /// Finished without a call: publish `records` (the result first).
    Done {
        result: RescanResult,
        records: Vec<OutRecord>,
    },
    /// A valid request: call the API.
    Call {
        request: Box<RescanRequest>,
        url: RescanUrl,
        delivery: ResultRoute,
    },
}

/// Topics and rules intake needs.
#[derive(Debug, Clone)]
pub struct IntakeRules {
    pub results_topic: String,
    pub dlq_topic: String,
    pub reply_topic_allowlist: HashSet<String>,
    pub base_url: Url,
}

pub fn intake(
    msg: &RequestMessage,
    allowed: &AllowedValues,
    rules: &IntakeRules,
    now: SystemTime,
) -> Intake {
    let timing = Timing {
        received_at: msg.received_at,
        completed_at: now,
    };
    let mut headers = vec![("content-type".to_string(), b"application/json".to_vec())];
    if let Some(id) = msg.header(HEADER_CORRELATION_ID) {
        headers.push((HEADER_CORRELATION_ID.to_string(), id.to_vec()));
    }
    let to_results = ResultRoute {
        topic: rules.results_topic.clone(),
        key: msg.key.clone(),
        headers,
    };
    let request = match RescanRequest::parse(&msg.payload, allowed) {
        Ok(r) => r,
        Err(rejection) => {
            let result = RescanResult::invalid(&msg.origin, &rejection, timing);
            let mut records = vec![to_results.record(&result)];
            if let Rejection::NotJson { reason } = &rejection {
                records.push(dead_letter(msg, &rules.dlq_topic, reason));
            }
            return Intake::Done { result, records };
        }
    };
    let mut delivery = to_results;
    if let Some(reply) = msg.header(HEADER_REPLY_TOPIC) {
        let name = String::from_utf8_lossy(reply);
        if rules.reply_topic_allowlist.contains(name.as_ref()) {
            delivery.topic = name.into_owned();
        } else {
            let why = format!(
                "reply topic `{}` is not in rescan.reply_topic_allowlist; the request was not sent",
                printable(&name)
            );
            let result = RescanResult::refused(
                &msg.origin,
                &request,
                ErrorKind::ReplyTopicNotAllowed,
                &why,
                timing,
            );
            let records = vec![delivery.record(&result)];
            return Intake::Done { result, records };
        }
    }
    match request.rescan_url(&rules.base_url) {
        Ok(url) => Intake::Call {
            request: Box::new(request),
            url,
            delivery,
        },
        Err(e) => {
            let result = RescanResult::refused(
                &msg.origin,
                &request,
                ErrorKind::Validation,
                &e.to_string(),
                timing,
            );
            let records = vec![delivery.record(&result)];
            Intake::Done { result, records }
        }
    }
}

/// A topic name fit for a message: control characters dropped, at most 249 characters.
fn printable(name: &str) -> String {
    name.chars().filter(|c| !c.is_control()).take(249).collect()
}

/// The raw message for the dead-letter topic, with where it came from.
fn dead_letter(msg: &RequestMessage, topic: &str, reason: &str) -> OutRecord {
    let mut headers = vec![
        ("dlq.reason".to_string(), b"not_json".to_vec()),
        ("dlq.detail".to_string(), reason.as_bytes().to_vec()),
        (
            "source.topic".to_string(),
            msg.origin.topic.as_bytes().to_vec(),
        ),
        (
            "source.partition".to_string(),
            msg.origin.partition.to_string().into_bytes(),
        ),
        (
            "source.offset".to_string(),
            msg.origin.offset.to_string().into_bytes(),
        ),
    ];
    if let Some(id) = msg.header(HEADER_CORRELATION_ID) {
        headers.push((HEADER_CORRELATION_ID.to_string(), id.to_vec()));
    }
    OutRecord {
        topic: topic.to_string(),
        key: msg.key.clone(),
        value: msg.payload.clone(),
        headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rescan::result::Status;

    fn rules() -> IntakeRules {
        IntakeRules {
            results_topic: "results".into(),
            dlq_topic: "dlq".into(),
            reply_topic_allowlist: ["team-a.replies".to_string()].into_iter().collect(),
            base_url: Url::parse("https://tip.example/").unwrap(),
        }
    }

    fn message(payload: &[u8], headers: &[(&str, &[u8])]) -> RequestMessage {
        RequestMessage {
            origin: MessageOrigin {
                topic: "requests".into(),
                partition: 2,
                offset: 41,
            },
            key: Some(b"k1".to_vec()),
            payload: payload.to_vec(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
            received_at: SystemTime::UNIX_EPOCH,
        }
    }

    const VALID: &[u8] = br#"{"task_id": "t-1", "url": "https://files.example/a.exe"}"#;

    #[test]
    fn not_json_gets_an_invalid_result_and_a_dead_letter() {
        let corr: &[u8] = &[0, 159, 146, 150];
        let Intake::Done { result, records } = intake(
            &message(b"\xff not json", &[(HEADER_CORRELATION_ID, corr)]),
            &AllowedValues::default(),
            &rules(),
            SystemTime::UNIX_EPOCH,
        ) else {
            panic!("expected a finished intake")
        };
        assert_eq!(result.status(), Status::Invalid);
        assert_eq!(result.request_id(), "requests-2-41");
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].topic, "results");
        assert_eq!(records[0].key.as_deref(), Some(&b"k1"[..]));
        assert!(
            records[0]
                .headers
                .contains(&(HEADER_CORRELATION_ID.into(), corr.to_vec()))
        );
        let dlq = &records[1];
        assert_eq!(
            (dlq.topic.as_str(), dlq.value.as_slice()),
            ("dlq", &b"\xff not json"[..])
        );
        let h = |n: &str| {
            dlq.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(h("dlq.reason"), Some(b"not_json".to_vec()));
        assert_eq!(h("source.topic"), Some(b"requests".to_vec()));
        assert_eq!(h("source.partition"), Some(b"2".to_vec()));
        assert_eq!(h("source.offset"), Some(b"41".to_vec()));
    }

    #[test]
    fn allowed_reply_topics_receive_the_result() {
        let Intake::Call { delivery, .. } = intake(
            &message(VALID, &[(HEADER_REPLY_TOPIC, b"team-a.replies")]),
            &AllowedValues::default(),
            &rules(),
            SystemTime::UNIX_EPOCH,
        ) else {
            panic!("expected a call")
        };
        assert_eq!(delivery.topic, "team-a.replies");
    }

    #[test]
    fn other_reply_topics_are_refused_on_the_results_topic() {
        let Intake::Done { result, records } = intake(
            &message(VALID, &[(HEADER_REPLY_TOPIC, b"elsewhere")]),
            &AllowedValues::default(),
            &rules(),
            SystemTime::UNIX_EPOCH,
        ) else {
            panic!("expected a refusal")
        };
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].topic, "results");
        let e = result.error().unwrap();
        assert_eq!(e.kind, ErrorKind::ReplyTopicNotAllowed);
        assert!(e.message.contains("elsewhere"));
    }

    #[test]
    fn valid_requests_become_calls_keyed_like_the_request() {
        let Intake::Call { url, delivery, .. } = intake(
            &message(VALID, &[]),
            &AllowedValues::default(),
            &rules(),
            SystemTime::UNIX_EPOCH,
        ) else {
            panic!("expected a call")
        };
        assert_eq!(delivery.key.as_deref(), Some(&b"k1"[..]));
        assert!(
            url.expose()
                .path()
                .ends_with("/api/sandbox/tasks/file_from_url/t-1")
        );
    }
}
