//! Values that must never be printed: secrets and librdkafka passthrough properties.

use std::collections::BTreeMap;
use std::fmt;

use secrecy::{ExposeSecret, SecretString};

/// A secret string. `Debug` and `Display` print `[redacted]`; read it with [`Secret::expose`].
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(SecretString::from(value))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    pub fn is_empty(&self) -> bool {
        self.expose().is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Whether a librdkafka property holds secret material (passwords, keys, JAAS, tokens).
pub fn is_sensitive_property(name: &str) -> bool {
    const MARKERS: &[&str] = &[
        "password",
        "secret",
        "jaas",
        ".pem",
        "token",
        "credential",
        "sasl.oauthbearer.config",
    ];
    let name = name.to_ascii_lowercase();
    MARKERS.iter().any(|m| name.contains(m))
}

/// librdkafka properties from `[kafka.properties]`; printing redacts the sensitive ones.
#[derive(Clone, Default)]
pub struct KafkaProperties(BTreeMap<String, String>);

impl KafkaProperties {
    pub fn new(map: BTreeMap<String, String>) -> KafkaProperties {
        KafkaProperties(map)
    }

    /// The properties as given, for handing to librdkafka only.
    pub fn expose(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (k, v) in &self.0 {
            if is_sensitive_property(k) {
                m.entry(k, &"[redacted]");
            } else {
                m.entry(k, v);
            }
        }
        m.finish()
    }
}
