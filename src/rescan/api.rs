//! HTTP access to the KTIP sandbox: the rescan call and the lookup methods.
//!
//! Every call carries HTTP Basic credentials and presents the client
//! certificate (mutual TLS); extra trusted roots come from `ca_cert`. Errors
//! never carry the request URL: its query may hold the archive or document
//! password. Transport failures are classified once, here: a TLS handshake
//! failure (`Tls`) cannot be fixed by retrying the same call, timeouts and
//! connection failures can.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use reqwest::{Certificate, Identity, Url, header};
use serde_json::Value;

use crate::config::{RescanConfig, Secret};

/// An HTTP answer from the API.
#[derive(Debug, Clone)]
pub struct ApiAnswer {
    pub status: u16,
    /// The body as received.
    pub body: bytes::Bytes,
    /// `Retry-After`, when the server sent one.
    pub retry_after: Option<Duration>,
}

/// A call that got no HTTP answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error(
        "TLS handshake with the KTIP API failed: {0} (is the client certificate valid and issued for this portal?)"
    )]
    Tls(String),
    #[error("the KTIP API did not answer in time")]
    Timeout,
    #[error("cannot connect to the KTIP API: {0}")]
    Connect(String),
    #[error("request to the KTIP API failed: {0}")]
    Other(String),
}

impl CallError {
    pub fn is_tls(&self) -> bool {
        matches!(self, CallError::Tls(_))
    }
}

/// Problems building the client from configuration.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("rescan.client_cert: cannot read {path}: {source}")]
    ReadCert {
        path: String,
        source: std::io::Error,
    },
    #[error("rescan.client_cert: {0} must hold a PEM certificate and its private key")]
    Identity(String),
    #[error("rescan.ca_cert: {path} holds no usable PEM certificate")]
    Ca { path: String },
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
}

pub struct KtipClient {
    http: reqwest::Client,
    base_url: Url,
    username: Secret,
    password: Secret,
    exec_env_path: String,
    channels_path: String,
}

impl KtipClient {
    pub fn new(cfg: &RescanConfig) -> Result<KtipClient, ClientError> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.request_timeout)
            .pool_max_idle_per_host(cfg.max_in_flight)
            .user_agent(concat!("sandbox-bridge/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &cfg.client_cert {
            let pem = read(path)?;
            let identity = Identity::from_pem(&pem)
                .map_err(|_| ClientError::Identity(path.display().to_string()))?;
            builder = builder.identity(identity);
        }
        if let Some(path) = &cfg.ca_cert {
            let pem = read(path)?;
            let roots = Certificate::from_pem_bundle(&pem).map_err(|_| ClientError::Ca {
                path: path.display().to_string(),
            })?;
            if roots.is_empty() {
                return Err(ClientError::Ca {
                    path: path.display().to_string(),
                });
            }
            for root in roots {
                builder = builder.add_root_certificate(root);
            }
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Build(e.without_url().to_string()))?;
        let base_url = Url::parse(&format!("{}/", cfg.base_url))
            .map_err(|e| ClientError::Build(e.to_string()))?;
        Ok(KtipClient {
            http,
            base_url,
            username: cfg.username.clone(),
            password: cfg.password.clone(),
            exec_env_path: cfg.exec_env_path.clone(),
            channels_path: cfg.channels_path.clone(),
        })
    }

    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    /// `PUT` with an empty body (the rescan call); `url` is built by the request module.
    pub async fn put_empty(&self, url: Url) -> Result<ApiAnswer, CallError> {
        let request = self
            .http
            .put(url)
            .header(header::CONTENT_LENGTH, "0")
            .basic_auth(self.username.expose(), Some(self.password.expose()));
        answer(request).await
    }

    /// `GET` of a lookup method, relative to the base URL.
    pub async fn get(&self, path: &str) -> Result<ApiAnswer, CallError> {
        let url = self
            .base_url
            .join(path.trim_start_matches('/'))
            .map_err(|e| CallError::Other(format!("bad lookup path {path}: {e}")))?;
        let request = self
            .http
            .get(url)
            .header(header::ACCEPT, "application/json")
            .basic_auth(self.username.expose(), Some(self.password.expose()));
        answer(request).await
    }

    /// The allowed `exec_env` values, or why they are unknown.
    pub async fn exec_envs(&self) -> Result<BTreeSet<String>, String> {
        self.name_list(&self.exec_env_path).await
    }

    /// The allowed internet channels, or why they are unknown.
    pub async fn channels(&self) -> Result<BTreeSet<String>, String> {
        self.name_list(&self.channels_path).await
    }

    async fn name_list(&self, path: &str) -> Result<BTreeSet<String>, String> {
        let a = self.get(path).await.map_err(|e| e.to_string())?;
        if a.status != 200 {
            return Err(format!("GET {path} answered HTTP {}", a.status));
        }
        serde_json::from_slice::<Value>(&a.body)
            .ok()
            .and_then(|v| parse_name_list(&v))
            .ok_or_else(|| format!("GET {path} answered an unexpected shape"))
    }

    /// A side-effect-free authenticated call: `Ok(status)` when the API answered.
    pub async fn probe(&self) -> Result<u16, CallError> {
        self.get(&self.channels_path).await.map(|a| a.status)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::ReadCert {
        path: path.display().to_string(),
        source,
    })
}

async fn answer(request: reqwest::RequestBuilder) -> Result<ApiAnswer, CallError> {
    let response = request.send().await.map_err(classify_error)?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = response.bytes().await.map_err(classify_error)?;
    Ok(ApiAnswer {
        status,
        body,
        retry_after,
    })
}

/// Classifies a transport error, without its URL.
fn classify_error(e: reqwest::Error) -> CallError {
    if e.is_timeout() {
        return CallError::Timeout;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if let Some(tls) = s.downcast_ref::<rustls::Error>() {
            return CallError::Tls(tls.to_string());
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(tls) = inner.downcast_ref::<rustls::Error>()
        {
            return CallError::Tls(tls.to_string());
        }
        source = s.source();
    }
    let connect = e.is_connect();
    let detail = e.without_url().to_string();
    if connect {
        CallError::Connect(detail)
    } else {
        CallError::Other(detail)
    }
}

/// Reads a list of names defensively: `["a", ...]`, `[{"name": "a"}, ...]`
/// (or `id`/`value`/`code`), or an object holding such a list.
pub fn parse_name_list(v: &Value) -> Option<BTreeSet<String>> {
    match v {
        Value::Array(items) => {
            let mut out = BTreeSet::new();
            for item in items {
                let name = match item {
                    Value::String(s) => Some(s.clone()),
                    Value::Object(o) => ["name", "id", "value", "code"]
                        .iter()
                        .find_map(|k| o.get(*k).and_then(Value::as_str).map(str::to_string)),
                    _ => None,
                };
                out.insert(name?);
            }
            Some(out)
        }
        Value::Object(o) => o.values().find_map(|v| match v {
            Value::Array(_) => parse_name_list(v),
            _ => None,
        }),
        _ => None,
    }
}

/// When the first certificate in a PEM file expires.
pub fn certificate_not_after(pem: &[u8]) -> Option<SystemTime> {
    for item in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let Ok(item) = item else { continue };
        if item.label != "CERTIFICATE" {
            continue;
        }
        let Ok(cert) = item.parse_x509() else {
            continue;
        };
        let secs = cert.validity().not_after.timestamp();
        return Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn name_lists_are_read_in_every_plausible_shape() {
        let want: BTreeSet<String> = ["TOR", "Tarpit", "RU"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            parse_name_list(&json!(["TOR", "Tarpit", "RU"])),
            Some(want.clone())
        );
        assert_eq!(
            parse_name_list(&json!([{"name": "TOR"}, {"name": "Tarpit"}, {"id": "RU"}])),
            Some(want.clone())
        );
        assert_eq!(
            parse_name_list(&json!({"channels": ["TOR", "Tarpit", "RU"]})),
            Some(want)
        );
        assert_eq!(parse_name_list(&json!([1, 2])), None);
        assert_eq!(parse_name_list(&json!("TOR")), None);
    }

    #[test]
    fn certificate_expiry_is_read_from_pem() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["client".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let cert = params.self_signed(&key).unwrap();
        let pem = format!("{}{}", key.serialize_pem(), cert.pem());
        let t = certificate_not_after(pem.as_bytes()).unwrap();
        let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs, 1_936_742_400, "2031-05-17T00:00:00Z");
        assert!(certificate_not_after(b"no pem here").is_none());
    }
}
