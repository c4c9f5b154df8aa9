//! The published JSON Schema of rescan requests and the Rust validator agree.
//!
//! Every input of a corpus (valid requests, each rule broken, combinations,
//! wrong types, unknown fields, non-objects) is judged by both, with the
//! API's dynamic lists unknown (static rules only), and both must give the
//! expected verdict. Where the schema cannot say as much as the code (URL
//! parsing, duplicate members), the code is stricter, never looser: see
//! `the_validator_is_stricter_only_where_the_schema_cannot_express_a_rule`.

use serde_json::{Value, json};

use sandbox_bridge::rescan::request::{AllowedValues, Field, RescanRequest};

const SCHEMA: &str = include_str!("../schemas/rescan-request.schema.json");

fn schema() -> Value {
    serde_json::from_str(SCHEMA).expect("the schema is JSON")
}

fn validator() -> jsonschema::Validator {
    jsonschema::draft202012::new(&schema()).expect("the schema compiles as draft 2020-12")
}

fn rust_accepts(v: &Value) -> bool {
    RescanRequest::parse(v.to_string().as_bytes(), &AllowedValues::default()).is_ok()
}

/// A valid request with `extra` members added or replaced.
fn with(extra: Value) -> Value {
    let mut base = json!({"task_id": "b2c3d4e5f6a7b8c9", "url": "https://files.example.com/x.zip"});
    for (k, v) in extra.as_object().expect("an object") {
        base[k] = v.clone();
    }
    base
}

fn without(field: &str) -> Value {
    let mut base = with(json!({}));
    base.as_object_mut().unwrap().remove(field);
    base
}

fn unzip(password: Value) -> Value {
    with(json!({"processing_type": "unzip-and-exec", "unzip_password": password}))
}

/// `(label, input, valid?)`.
fn corpus() -> Vec<(&'static str, Value, bool)> {
    let s = |n: usize, c: &str| c.repeat(n);
    vec![
        // Valid.
        ("minimal", with(json!({})), true),
        (
            "request_id 256 chars",
            with(json!({"request_id": s(256, "r")})),
            true,
        ),
        (
            "request_id non-ASCII",
            with(json!({"request_id": "заявка 1"})),
            true,
        ),
        (
            "task_id 128 chars",
            with(json!({"task_id": s(128, "a")})),
            true,
        ),
        (
            "task_id all classes",
            with(json!({"task_id": "A-z_09"})),
            true,
        ),
        (
            "url with port",
            with(json!({"url": "http://192.0.2.1:8080/a.exe"})),
            true,
        ),
        (
            "url IPv6",
            with(json!({"url": "http://[2001:db8::1]/"})),
            true,
        ),
        (
            "url IDN",
            with(json!({"url": "https://bücher.example/файл.zip"})),
            true,
        ),
        (
            "url scheme case",
            with(json!({"url": "HTTPS://Example.com"})),
            true,
        ),
        (
            "url query and fragment",
            with(json!({"url": "https://e.example/?a=1&b=%20#f"})),
            true,
        ),
        (
            "url percent text",
            with(json!({"url": "http://e.example/%SYSTEMROOT%"})),
            true,
        ),
        ("exec_env", with(json!({"exec_env": "Win10x64"})), true),
        (
            "exec_env with spaces",
            with(json!({"exec_env": "Windows 10 (64-bit)"})),
            true,
        ),
        ("exec_time 30", with(json!({"exec_time": 30})), true),
        ("exec_time 500", with(json!({"exec_time": 500})), true),
        ("exec_time 60.0", with(json!({"exec_time": 60.0})), true),
        ("file_ext", with(json!({"file_ext": "exe"})), true),
        (
            "file_ext 10 chars",
            with(json!({"file_ext": "abcdefghij"})),
            true,
        ),
        (
            "file_ext 10 code points",
            with(json!({"file_ext": "ééééééééé😀"})),
            true,
        ),
        (
            "exec-only",
            with(json!({"processing_type": "exec-only"})),
            true,
        ),
        (
            "unzip-and-exec",
            with(json!({"processing_type": "unzip-and-exec"})),
            true,
        ),
        ("unzip with password", unzip(json!("infected")), true),
        (
            "booleans true",
            with(json!({"decrypt_https": true, "click_on_links": true})),
            true,
        ),
        (
            "booleans false",
            with(json!({"decrypt_https": false, "click_on_links": false})),
            true,
        ),
        ("channel TOR", with(json!({"channel": "TOR"})), true),
        ("channel Tarpit", with(json!({"channel": "Tarpit"})), true),
        ("channel GB", with(json!({"channel": "GB"})), true),
        (
            "doc_password 256",
            with(json!({"doc_password": s(256, "p")})),
            true,
        ),
        (
            "doc_password any chars",
            with(json!({"doc_password": "a\tb\"c"})),
            true,
        ),
        (
            "cmd_line 1024 code points",
            with(json!({"cmd_line": s(1024, "😀")})),
            true,
        ),
        (
            "cmd_line variables",
            with(json!({"cmd_line": "%%SYSTEMROOT%%\\notepad.exe /A $sample"})),
            true,
        ),
        // task_id.
        ("task_id missing", without("task_id"), false),
        ("task_id empty", with(json!({"task_id": ""})), false),
        ("task_id ../x", with(json!({"task_id": "../x"})), false),
        ("task_id a/b", with(json!({"task_id": "a/b"})), false),
        ("task_id %2e%2e", with(json!({"task_id": "%2e%2e"})), false),
        ("task_id space", with(json!({"task_id": "a b"})), false),
        (
            "task_id 129 chars",
            with(json!({"task_id": s(129, "a")})),
            false,
        ),
        ("task_id non-ASCII", with(json!({"task_id": "é"})), false),
        (
            "task_id trailing newline",
            with(json!({"task_id": "abc\n"})),
            false,
        ),
        ("task_id number", with(json!({"task_id": 12345})), false),
        ("task_id null", with(json!({"task_id": null})), false),
        // url.
        ("url missing", without("url"), false),
        ("url empty", with(json!({"url": ""})), false),
        ("url ftp", with(json!({"url": "ftp://e.example/x"})), false),
        (
            "url file",
            with(json!({"url": "file:///etc/passwd"})),
            false,
        ),
        ("url no scheme", with(json!({"url": "e.example/x"})), false),
        ("url no host", with(json!({"url": "http://"})), false),
        ("url empty host", with(json!({"url": "http:///x"})), false),
        ("url port only", with(json!({"url": "http://:80/"})), false),
        (
            "url userinfo",
            with(json!({"url": "http://u:p@e.example/"})),
            false,
        ),
        (
            "url space",
            with(json!({"url": "http://e.example/a b"})),
            false,
        ),
        (
            "url tab",
            with(json!({"url": "http://e.example/\t"})),
            false,
        ),
        (
            "url backslash",
            with(json!({"url": "http://e.example\\evil.example/"})),
            false,
        ),
        (
            "url empty port",
            with(json!({"url": "http://e.example:/"})),
            false,
        ),
        (
            "url 6-digit port",
            with(json!({"url": "http://e.example:123456/"})),
            false,
        ),
        ("url bad IPv6", with(json!({"url": "http://[::g]/"})), false),
        (
            "url percent host",
            with(json!({"url": "http://e%41.example/"})),
            false,
        ),
        (
            "url too long",
            with(json!({"url": format!("https://e.example/{}", s(2040, "a"))})),
            false,
        ),
        ("url number", with(json!({"url": 80})), false),
        // request_id.
        ("request_id empty", with(json!({"request_id": ""})), false),
        (
            "request_id 257",
            with(json!({"request_id": s(257, "r")})),
            false,
        ),
        (
            "request_id control",
            with(json!({"request_id": "a\u{7f}"})),
            false,
        ),
        ("request_id number", with(json!({"request_id": 1})), false),
        ("request_id null", with(json!({"request_id": null})), false),
        // exec_env.
        ("exec_env empty", with(json!({"exec_env": ""})), false),
        (
            "exec_env 129",
            with(json!({"exec_env": s(129, "w")})),
            false,
        ),
        (
            "exec_env control",
            with(json!({"exec_env": "Win\u{0}"})),
            false,
        ),
        (
            "exec_env array",
            with(json!({"exec_env": ["Win10x64"]})),
            false,
        ),
        // exec_time.
        ("exec_time 29", with(json!({"exec_time": 29})), false),
        ("exec_time 501", with(json!({"exec_time": 501})), false),
        ("exec_time negative", with(json!({"exec_time": -60})), false),
        (
            "exec_time fraction",
            with(json!({"exec_time": 60.5})),
            false,
        ),
        ("exec_time huge", with(json!({"exec_time": 1e300})), false),
        ("exec_time string", with(json!({"exec_time": "60"})), false),
        ("exec_time null", with(json!({"exec_time": null})), false),
        ("exec_time bool", with(json!({"exec_time": true})), false),
        // file_ext.
        ("file_ext dot", with(json!({"file_ext": ".exe"})), false),
        (
            "file_ext inner dot",
            with(json!({"file_ext": "tar.gz"})),
            false,
        ),
        (
            "file_ext 11 chars",
            with(json!({"file_ext": "abcdefghijk"})),
            false,
        ),
        ("file_ext empty", with(json!({"file_ext": ""})), false),
        ("file_ext space", with(json!({"file_ext": "e xe"})), false),
        ("file_ext number", with(json!({"file_ext": 7})), false),
        // processing_type and unzip_password.
        (
            "processing_type case",
            with(json!({"processing_type": "EXEC-ONLY"})),
            false,
        ),
        (
            "processing_type unknown",
            with(json!({"processing_type": "zip"})),
            false,
        ),
        (
            "processing_type number",
            with(json!({"processing_type": 1})),
            false,
        ),
        (
            "unzip_password alone",
            with(json!({"unzip_password": "x"})),
            false,
        ),
        (
            "unzip_password exec-only",
            with(json!({"processing_type": "exec-only", "unzip_password": "x"})),
            false,
        ),
        ("unzip_password empty", unzip(json!("")), false),
        ("unzip_password 257", unzip(json!(s(257, "p"))), false),
        ("unzip_password number", unzip(json!(1234)), false),
        ("unzip_password null", unzip(json!(null)), false),
        // Booleans.
        (
            "decrypt_https string",
            with(json!({"decrypt_https": "true"})),
            false,
        ),
        (
            "decrypt_https number",
            with(json!({"decrypt_https": 1})),
            false,
        ),
        (
            "decrypt_https null",
            with(json!({"decrypt_https": null})),
            false,
        ),
        (
            "click_on_links string",
            with(json!({"click_on_links": "false"})),
            false,
        ),
        (
            "click_on_links number",
            with(json!({"click_on_links": 0})),
            false,
        ),
        // channel.
        ("channel tor", with(json!({"channel": "tor"})), false),
        ("channel Tor", with(json!({"channel": "Tor"})), false),
        ("channel TARPIT", with(json!({"channel": "TARPIT"})), false),
        ("channel ru", with(json!({"channel": "ru"})), false),
        ("channel RUS", with(json!({"channel": "RUS"})), false),
        ("channel R", with(json!({"channel": "R"})), false),
        ("channel empty", with(json!({"channel": ""})), false),
        ("channel digit", with(json!({"channel": "R1"})), false),
        ("channel number", with(json!({"channel": 7})), false),
        // doc_password and cmd_line.
        (
            "doc_password empty",
            with(json!({"doc_password": ""})),
            false,
        ),
        (
            "doc_password 257",
            with(json!({"doc_password": s(257, "p")})),
            false,
        ),
        (
            "doc_password bool",
            with(json!({"doc_password": false})),
            false,
        ),
        (
            "cmd_line 1025",
            with(json!({"cmd_line": s(1025, "c")})),
            false,
        ),
        (
            "cmd_line 1025 code points",
            with(json!({"cmd_line": s(1025, "😀")})),
            false,
        ),
        ("cmd_line empty", with(json!({"cmd_line": ""})), false),
        ("cmd_line newline", with(json!({"cmd_line": "a\nb"})), false),
        ("cmd_line array", with(json!({"cmd_line": ["a"]})), false),
        // Unknown members.
        ("unknown field", with(json!({"priority": 1})), false),
        ("unknown null field", with(json!({"comment": null})), false),
        (
            "typo of a field",
            with(json!({"unzip_pasword": "x"})),
            false,
        ),
        (
            "plural of a field",
            with(json!({"exec_envs": "Win10x64"})),
            false,
        ),
        // Combinations.
        ("empty object", json!({}), false),
        (
            "only optional fields",
            json!({"exec_time": 60, "channel": "RU"}),
            false,
        ),
        (
            "several rules broken",
            json!({"task_id": "../x", "url": "ftp://x", "exec_time": "60", "channel": "ru"}),
            false,
        ),
        (
            "valid fields and one unknown",
            with(json!({"exec_time": 60, "x": 1})),
            false,
        ),
        (
            "valid but one wrong type",
            with(json!({"exec_time": 60, "decrypt_https": "no"})),
            false,
        ),
        // Not objects.
        ("array", json!([]), false),
        ("array of a request", json!([with(json!({}))]), false),
        ("string", json!("task_id"), false),
        ("number", json!(1), false),
        ("null", json!(null), false),
        ("boolean", json!(true), false),
    ]
}

#[test]
fn schema_and_validator_agree_on_the_corpus() {
    let schema = validator();
    let corpus = corpus();
    assert!(corpus.len() >= 60, "corpus of {}", corpus.len());
    let mut disagreements = Vec::new();
    for (label, input, valid) in &corpus {
        let by_schema = schema.is_valid(input);
        let by_rust = rust_accepts(input);
        if by_schema != *valid || by_rust != *valid {
            disagreements.push(format!(
                "{label}: expected {valid}, schema {by_schema}, validator {by_rust}"
            ));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
    let valid = corpus.iter().filter(|(_, _, v)| *v).count();
    assert!(
        valid >= 20 && corpus.len() - valid >= 40,
        "{valid} valid inputs"
    );
}

#[test]
fn the_validator_is_stricter_only_where_the_schema_cannot_express_a_rule() {
    let schema = validator();
    // The schema's URL pattern cannot parse ports, IP addresses or IDNA.
    for url in [
        "http://e.example:99999/",
        "http://1.2.3.256/",
        "http://[1:2]/",
    ] {
        let input = with(json!({ "url": url }));
        assert!(schema.is_valid(&input), "{url}");
        assert!(!rust_accepts(&input), "{url}");
    }
    // A repeated member cannot be seen once the JSON is parsed.
    let text = r#"{"task_id": "t", "url": "https://a.example/", "url": "https://b.example/"}"#;
    assert!(schema.is_valid(&serde_json::from_str(text).unwrap()));
    assert!(RescanRequest::parse(text.as_bytes(), &AllowedValues::default()).is_err());
    // The API's lists apply only in the validator.
    let allowed = AllowedValues {
        exec_envs: Some(["Win10x64".to_string()].into()),
        channels: Some(["RU".to_string()].into()),
    };
    for input in [
        with(json!({"exec_env": "Win7x64"})),
        with(json!({"channel": "US"})),
    ] {
        assert!(schema.is_valid(&input));
        assert!(RescanRequest::parse(input.to_string().as_bytes(), &allowed).is_err());
    }
}

#[test]
fn the_schema_is_draft_2020_12_and_lists_exactly_the_request_fields() {
    let schema = schema();
    assert!(jsonschema::meta::is_valid(&schema));
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert_eq!(schema["type"], "object");
    assert_eq!(schema["additionalProperties"], false);
    assert_eq!(schema["required"], json!(["task_id", "url"]));
    let names: Vec<&str> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected: Vec<&str> = Field::ALL.iter().map(|f| f.json_name()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    expected.sort_unstable();
    assert_eq!(sorted, expected);
    for (name, property) in schema["properties"].as_object().unwrap() {
        assert!(
            property["description"].is_string(),
            "{name} has no description"
        );
    }
}

#[test]
fn the_schema_examples_are_valid_for_both() {
    let validator = validator();
    let examples = schema()["examples"].as_array().cloned().unwrap();
    assert!(!examples.is_empty());
    for example in &examples {
        assert!(validator.is_valid(example), "{example}");
        assert!(rust_accepts(example), "{example}");
    }
}
