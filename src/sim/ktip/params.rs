//! The rescan request's query string: decoding and the portal's documented
//! checks. Pure: no I/O, tested without a server.
//!
//! Beyond the documented limits the simulator is strict where a lenient
//! server would hide a consumer bug: unknown, repeated and empty parameters
//! are refused (a parameter the requester did not set must not be sent at all).

use std::fmt::Write;

/// Every query parameter of `PUT /api/sandbox/tasks/file_from_url/{task_id}`.
/// `channel`, `doc_password` and `cmd_line` are names the public help does not
/// confirm: correct them here.
pub const PARAM_NAMES: [&str; 11] = [
    "url",
    "exec_env",
    "exec_time",
    "file_ext",
    "processing_type",
    "unzip_password",
    "decrypt_https",
    "click_on_links",
    "channel",
    "doc_password",
    "cmd_line",
];

/// Parameters whose values are secrets: recorded for tests, never logged.
pub const SECRET_PARAMS: [&str; 2] = ["unzip_password", "doc_password"];

pub const EXEC_TIME_SECS: std::ops::RangeInclusive<u32> = 30..=500;
pub const MAX_FILE_EXT_CHARS: usize = 10;
pub const MAX_CMD_LINE_CHARS: usize = 1024;
pub const PROCESSING_TYPES: [&str; 2] = ["exec-only", "unzip-and-exec"];

/// Decodes `application/x-www-form-urlencoded` pairs (`+` is a space), in order.
/// A name without `=` gets an empty value.
pub fn parse_query(raw: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    raw.split('&')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (name, value) = part.split_once('=').unwrap_or((part, ""));
            Ok((percent_decode(name)?, percent_decode(value)?))
        })
        .collect()
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent-encoding in `{s}`"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` does not decode to UTF-8"))
}

/// Percent-decodes one path segment (no `+` rule there).
pub fn decode_path_segment(s: &str) -> Result<String, String> {
    if s.contains('+') {
        // `+` is literal in a path: decode the rest, keep it.
        return s
            .split('+')
            .map(percent_decode)
            .collect::<Result<Vec<_>, _>>()
            .map(|parts| parts.join("+"));
    }
    percent_decode(s)
}

/// The rescan parameters, checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RescanParams {
    pub url: String,
    pub exec_env: Option<String>,
    pub exec_time: Option<u32>,
    pub file_ext: Option<String>,
    pub processing_type: Option<String>,
    pub decrypt_https: Option<bool>,
    pub click_on_links: Option<bool>,
    pub channel: Option<String>,
    pub cmd_line: Option<String>,
    /// Whether the secrets were given (their values stay in the request record).
    pub has_unzip_password: bool,
    pub has_doc_password: bool,
}

/// The lookup lists the portal serves, which bound `exec_env` and `channel`.
pub struct Allowed<'a> {
    pub exec_envs: &'a [String],
    pub channels: &'a [String],
}

/// Checks `pairs` as the portal documents; `Err` holds the 400's description.
pub fn validate(pairs: &[(String, String)], allowed: &Allowed<'_>) -> Result<RescanParams, String> {
    let mut p = RescanParams::default();
    let mut url = None;
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in pairs {
        let name = name.as_str();
        if !PARAM_NAMES.contains(&name) {
            return Err(format!(
                "unknown parameter `{}`; known: {}",
                printable(name),
                PARAM_NAMES.join(", ")
            ));
        }
        if seen.contains(&name) {
            return Err(format!("parameter `{name}` given more than once"));
        }
        seen.push(name);
        if value.is_empty() {
            return Err(format!("parameter `{name}` is empty"));
        }
        let shown = || {
            if SECRET_PARAMS.contains(&name) {
                "***".to_string()
            } else {
                printable(value)
            }
        };
        match name {
            "url" => {
                check_url(value)?;
                url = Some(value.clone());
            }
            "exec_env" => {
                one_of(name, value, allowed.exec_envs)?;
                p.exec_env = Some(value.clone());
            }
            "exec_time" => {
                let secs = value
                    .parse::<u32>()
                    .ok()
                    .filter(|s| EXEC_TIME_SECS.contains(s))
                    .ok_or_else(|| {
                        format!(
                            "exec_time `{}` is not a whole number of seconds from {} to {}",
                            shown(),
                            EXEC_TIME_SECS.start(),
                            EXEC_TIME_SECS.end()
                        )
                    })?;
                p.exec_time = Some(secs);
            }
            "file_ext" => {
                if value.contains('.') || value.chars().count() > MAX_FILE_EXT_CHARS {
                    return Err(format!(
                        "file_ext `{}` must have no dot and at most {MAX_FILE_EXT_CHARS} characters",
                        shown()
                    ));
                }
                p.file_ext = Some(value.clone());
            }
            "processing_type" => {
                if !PROCESSING_TYPES.contains(&value.as_str()) {
                    return Err(format!(
                        "processing_type `{}` is not one of {}",
                        shown(),
                        PROCESSING_TYPES.join(", ")
                    ));
                }
                p.processing_type = Some(value.clone());
            }
            "decrypt_https" => p.decrypt_https = Some(boolean(name, value)?),
            "click_on_links" => p.click_on_links = Some(boolean(name, value)?),
            "channel" => {
                one_of(name, value, allowed.channels)?;
                p.channel = Some(value.clone());
            }
            "cmd_line" => {
                let n = value.chars().count();
                if n > MAX_CMD_LINE_CHARS {
                    return Err(format!(
                        "cmd_line has {n} characters, more than {MAX_CMD_LINE_CHARS}"
                    ));
                }
                p.cmd_line = Some(value.clone());
            }
            "unzip_password" => p.has_unzip_password = true,
            "doc_password" => p.has_doc_password = true,
            _ => unreachable!("every name of PARAM_NAMES is handled"),
        }
    }
    if p.has_unzip_password && p.processing_type.as_deref() != Some("unzip-and-exec") {
        return Err("unzip_password is allowed only with processing_type=unzip-and-exec".into());
    }
    p.url = url.ok_or("parameter `url` is required")?;
    Ok(p)
}

fn check_url(value: &str) -> Result<(), String> {
    let lower = value.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"));
    let host = rest.and_then(|r| r.split(['/', '?', '#']).next());
    match host {
        Some(h) if !h.is_empty() && !h.contains(char::is_whitespace) => Ok(()),
        _ => Err(format!(
            "url `{}` is not an http or https address",
            printable(value)
        )),
    }
}

fn one_of(name: &str, value: &str, allowed: &[String]) -> Result<(), String> {
    if allowed.iter().any(|a| a == value) {
        Ok(())
    } else {
        Err(format!(
            "{name} `{}` is not one of {} (case-sensitive)",
            printable(value),
            allowed.join(", ")
        ))
    }
}

fn boolean(name: &str, value: &str) -> Result<bool, String> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!(
            "{name} `{}` is neither true nor false",
            printable(value)
        )),
    }
}

/// At most 80 characters of `s`, control characters escaped: safe in a body or a log.
fn printable(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == 80 {
            out.push('…');
            break;
        }
        if c.is_control() {
            let _ = write!(out, "{}", c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed_lists() -> (Vec<String>, Vec<String>) {
        (
            vec!["Windows 10 x64".into(), "Ubuntu 22.04".into()],
            vec!["TOR".into(), "Tarpit".into(), "RU".into()],
        )
    }

    fn check(query: &str) -> Result<RescanParams, String> {
        let (envs, channels) = allowed_lists();
        let pairs = parse_query(Some(query))?;
        validate(
            &pairs,
            &Allowed {
                exec_envs: &envs,
                channels: &channels,
            },
        )
    }

    #[test]
    fn decodes_pairs_in_order() {
        let pairs = parse_query(Some(
            "url=https%3A%2F%2Fx.test%2Fa%3Fb%3D1&exec_env=Windows+10%20x64&e",
        ))
        .unwrap();
        assert_eq!(
            pairs,
            [
                ("url".to_string(), "https://x.test/a?b=1".to_string()),
                ("exec_env".to_string(), "Windows 10 x64".to_string()),
                ("e".to_string(), String::new()),
            ]
        );
        assert!(parse_query(Some("a=%zz")).is_err());
        assert!(parse_query(Some("a=%ff")).is_err(), "not UTF-8");
        assert_eq!(parse_query(None).unwrap(), []);
        assert_eq!(decode_path_segment("a%2Fb+c").unwrap(), "a/b+c");
    }

    #[test]
    fn accepts_a_full_valid_request() {
        let p = check(
            "url=http://x.test/f.zip&exec_env=Ubuntu+22.04&exec_time=30&file_ext=zip\
             &processing_type=unzip-and-exec&unzip_password=infected&decrypt_https=false\
             &click_on_links=true&channel=RU&doc_password=pw&cmd_line=%25%25SYSTEMROOT%25%25+%24sample",
        )
        .unwrap();
        assert_eq!(p.url, "http://x.test/f.zip");
        assert_eq!(p.exec_time, Some(30));
        assert_eq!(p.decrypt_https, Some(false));
        assert_eq!(p.cmd_line.as_deref(), Some("%%SYSTEMROOT%% $sample"));
        assert!(p.has_unzip_password && p.has_doc_password);
        assert_eq!(check("url=HTTPS://x.test").unwrap().exec_env, None);
    }

    #[test]
    fn refuses_each_kind_of_bad_parameter() {
        let long_cmd = format!("url=http://x.test&cmd_line={}", "a".repeat(1025));
        let cases: &[(&str, &str)] = &[
            ("exec_env=Ubuntu+22.04", "`url` is required"),
            ("url=ftp://x.test/f", "not an http"),
            ("url=https://", "not an http"),
            ("url=http://x.test&exec_time=29", "exec_time"),
            ("url=http://x.test&exec_time=501", "exec_time"),
            ("url=http://x.test&exec_time=1e2", "exec_time"),
            ("url=http://x.test&file_ext=.exe", "file_ext"),
            ("url=http://x.test&file_ext=abcdefghijk", "file_ext"),
            ("url=http://x.test&processing_type=exec", "processing_type"),
            (
                "url=http://x.test&unzip_password=pw",
                "only with processing_type",
            ),
            (
                "url=http://x.test&processing_type=exec-only&unzip_password=pw",
                "only with processing_type",
            ),
            ("url=http://x.test&decrypt_https=True", "decrypt_https"),
            ("url=http://x.test&click_on_links=1", "click_on_links"),
            ("url=http://x.test&channel=tor", "channel"),
            ("url=http://x.test&channel=FR", "channel"),
            ("url=http://x.test&exec_env=Windows+XP", "exec_env"),
            (&long_cmd, "cmd_line"),
            ("url=http://x.test&verbose=1", "unknown parameter `verbose`"),
            ("url=http://x.test&url=http://y.test", "more than once"),
            ("url=http://x.test&file_ext=", "is empty"),
        ];
        for (query, expected) in cases {
            let err = check(query).expect_err(query);
            assert!(err.contains(expected), "{query}: {err}");
        }
        assert!(
            check(&format!("url=http://x.test&cmd_line={}", "é".repeat(1024))).is_ok(),
            "the limit counts characters"
        );
    }

    #[test]
    fn secrets_stay_out_of_descriptions() {
        let err = check("url=http://x.test&unzip_password=hunter2").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
