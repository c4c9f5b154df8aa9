//! HTTP Basic authentication: decoding the header and judging it. Pure.
//!
//! Neither the header nor the password is ever logged; only the user name
//! reaches the request record.

use super::state::{AuthOutcome, SimState};

/// The user name and password of an `Authorization: Basic ...` header.
pub struct BasicCredentials {
    pub username: String,
    pub password: String,
}

/// Parses a `Basic` header value; `None` when absent or malformed.
pub fn parse_basic(header: Option<&[u8]>) -> Option<BasicCredentials> {
    let value = std::str::from_utf8(header?).ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(decode_base64(encoded.trim())?).ok()?;
    let (username, password) = decoded.split_once(':')?;
    Some(BasicCredentials {
        username: username.to_string(),
        password: password.to_string(),
    })
}

/// Judges `credentials` against the accepted user, the current password and the forbidden users.
pub fn judge(
    credentials: Option<&BasicCredentials>,
    username: &str,
    forbidden: &[String],
    state: &SimState,
) -> AuthOutcome {
    let Some(c) = credentials else {
        return AuthOutcome::Missing;
    };
    let known = c.username == username || forbidden.contains(&c.username);
    if !known || !state.password_ok(&c.password) {
        AuthOutcome::Invalid
    } else if c.username != username {
        AuthOutcome::Forbidden
    } else {
        AuthOutcome::Ok
    }
}

/// Standard base64 with padding (RFC 4648 §4), as Basic auth uses.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = s.as_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let chunks = bytes.len() / 4;
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && i + 1 != chunks) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_basic_headers() {
        // "demo:demo-password", "a:", "Aladdin:open sesame" (RFC 7617's example).
        let c = parse_basic(Some(b"Basic ZGVtbzpkZW1vLXBhc3N3b3Jk")).unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("demo", "demo-password")
        );
        let c = parse_basic(Some(b"basic YTo=")).unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("a", ""));
        let c = parse_basic(Some(b"Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==")).unwrap();
        assert_eq!(c.password, "open sesame");
        for bad in [
            &b"Bearer ZGVtbzpkZW1v"[..],
            b"Basic",
            b"Basic ZGVtbw==",
            b"Basic ZGV=bzpk",
            b"Basic !!!!",
        ] {
            assert!(parse_basic(Some(bad)).is_none(), "{bad:?}");
        }
        assert!(parse_basic(None).is_none());
    }
}
