//! Command-line flags of the KTIP simulator (`sandbox-bridge simulate --ktip ...`).
//!
//! Every value is parsed by clap into a checked type, so a bad flag is a
//! usage error and [`KtipArgs::settings`] cannot fail. The simulator is
//! opt-in (`--ktip`), so runs that only need the VirusTotal feed do not bind
//! port 8443 or write certificates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

use super::settings::{
    DEFAULT_CHANNELS, DEFAULT_CLIENT_CERT_DAYS, DEFAULT_EXEC_ENVS, DEFAULT_MAX_RECORDED_REQUESTS,
    KtipSimSettings, TaskRule,
};

#[derive(Debug, Clone, clap::Args)]
#[command(
    next_help_heading = "Kaspersky TIP sandbox simulator (HTTPS, client certificate + Basic auth)"
)]
pub struct KtipArgs {
    /// Also start the KTIP sandbox simulator (off by default). Prints
    /// `listening ktip-api URL`, `ktip-ca-cert PATH` (the consumer's `ca_cert`)
    /// and `ktip-client-cert PATH` (its `client_cert`: certificate and key in one PEM).
    #[arg(long)]
    pub ktip: bool,

    /// Address of the HTTPS listener (the consumer's `base_url`). Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8443", requires = "ktip")]
    pub ktip_listen: SocketAddr,

    /// The Basic-auth user name accepted.
    #[arg(long, default_value = super::settings::DEFAULT_USERNAME, requires = "ktip")]
    pub ktip_username: String,

    /// Its password.
    #[arg(
        long,
        env = "SANDBOX_BRIDGE_SIM_KTIP_PASSWORD",
        default_value = super::settings::DEFAULT_PASSWORD,
        hide_env_values = true
    )]
    pub ktip_password: String,

    /// A user that authenticates with the password but has no API access (403). Repeatable.
    #[arg(
        long = "ktip-forbidden-user",
        value_name = "USER",
        default_value = super::settings::DEFAULT_FORBIDDEN_USERNAME,
        requires = "ktip"
    )]
    pub ktip_forbidden_users: Vec<String>,

    /// Delay before every answer (the benchmark uses 50ms).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration, requires = "ktip")]
    pub ktip_latency: Duration,

    /// Directory the PEM files are written to (`ca.pem`, `client.pem`,
    /// `client-expired.pem`, `client-foreign.pem`); default: a temporary
    /// directory, removed on exit.
    #[arg(long, value_name = "DIR", requires = "ktip")]
    pub ktip_pki_dir: Option<PathBuf>,

    /// Days until the client certificate expires (the consumer reports them).
    #[arg(long, default_value_t = DEFAULT_CLIENT_CERT_DAYS, value_name = "DAYS", requires = "ktip")]
    pub ktip_client_cert_days: u64,

    /// An execution environment served by `GET /api/sandbox/exec_env` (and
    /// accepted as `exec_env`). Repeatable; replaces the default list.
    #[arg(
        long = "ktip-exec-env",
        value_name = "NAME",
        default_values = DEFAULT_EXEC_ENVS,
        requires = "ktip"
    )]
    pub ktip_exec_envs: Vec<String>,

    /// An internet channel served by `GET /api/sandbox/channels` (and accepted
    /// as `channel`, case-sensitive). Repeatable; replaces the default list.
    #[arg(
        long = "ktip-channel",
        value_name = "NAME",
        default_values = DEFAULT_CHANNELS,
        requires = "ktip"
    )]
    pub ktip_channels: Vec<String>,

    /// Serve channels as `[{"name": "TOR"}, ...]` instead of `["TOR", ...]`.
    #[arg(long, requires = "ktip")]
    pub ktip_channels_as_objects: bool,

    /// A failure injected into rescans: PATTERN=ACTION[/K]. PATTERN is a task id
    /// or a prefix ending in `*`; ACTION one of 400 (too-large-file), 401, 403,
    /// 404, 429[:RETRY_AFTER], 451, 500, 503, delay:DURATION; `/K` limits it to
    /// the first K attempts at each task id. E.g. `flaky-*=503/2`. Repeatable;
    /// the first matching rule wins.
    #[arg(
        long = "ktip-rule",
        value_name = "PATTERN=ACTION[/K]",
        requires = "ktip"
    )]
    pub ktip_rules: Vec<TaskRule>,

    /// Requests kept in detail for assertions (older ones are dropped; counters keep counting).
    #[arg(
        long,
        default_value_t = DEFAULT_MAX_RECORDED_REQUESTS,
        value_name = "N",
        requires = "ktip"
    )]
    pub ktip_max_recorded_requests: usize,
}

impl KtipArgs {
    pub fn settings(&self) -> KtipSimSettings {
        KtipSimSettings {
            username: self.ktip_username.clone(),
            password: SecretString::from(self.ktip_password.clone()),
            forbidden_usernames: self.ktip_forbidden_users.clone(),
            exec_envs: self.ktip_exec_envs.clone(),
            channels: self.ktip_channels.clone(),
            channels_as_objects: self.ktip_channels_as_objects,
            latency: self.ktip_latency,
            rules: self.ktip_rules.clone(),
            pki_dir: self.ktip_pki_dir.clone(),
            client_cert_valid_for: Duration::from_secs(
                self.ktip_client_cert_days.saturating_mul(24 * 3600),
            ),
            max_recorded_requests: self.ktip_max_recorded_requests,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use secrecy::ExposeSecret;

    use super::*;
    use crate::sim::ktip::settings::{TaskAction, TaskPattern};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        ktip: KtipArgs,
    }

    fn parse(args: &[&str]) -> Result<KtipArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("sim").chain(args.iter().copied())).map(|c| c.ktip)
    }

    #[test]
    fn off_by_default_with_demo_defaults() {
        let args = parse(&[]).unwrap();
        assert!(!args.ktip);
        let s = args.settings();
        assert_eq!(args.ktip_listen.port(), 8443);
        assert_eq!(s.username, "demo");
        assert_eq!(s.password.expose_secret(), "demo-password");
        assert_eq!(s.exec_envs.len(), 5);
        assert_eq!(s.channels[..2], ["TOR", "Tarpit"]);
        assert!(s.rules.is_empty() && s.latency.is_zero() && s.pki_dir.is_none());
    }

    #[test]
    fn flags_build_settings() {
        let args = parse(&[
            "--ktip",
            "--ktip-listen",
            "127.0.0.1:0",
            "--ktip-latency",
            "50ms",
            "--ktip-rule",
            "flaky-*=503/2",
            "--ktip-rule",
            "t-1=429:3s",
            "--ktip-channel",
            "TOR",
            "--ktip-channel",
            "US",
            "--ktip-channels-as-objects",
            "--ktip-client-cert-days",
            "7",
        ])
        .unwrap();
        let s = args.settings();
        assert_eq!(args.ktip_listen.port(), 0);
        assert_eq!(s.latency, Duration::from_millis(50));
        assert_eq!(s.rules[0].tasks, TaskPattern::Prefix("flaky-".into()));
        assert_eq!(s.rules[0].first_attempts, Some(2));
        assert_eq!(
            s.rules[1].action,
            TaskAction::TooManyRequests {
                retry_after: Duration::from_secs(3)
            }
        );
        assert_eq!(s.channels, ["TOR", "US"]);
        assert!(s.channels_as_objects);
        assert_eq!(s.client_cert_valid_for, Duration::from_secs(7 * 86_400));
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for bad in [
            &["--ktip", "--ktip-rule", "x=418"][..],
            &["--ktip", "--ktip-latency", "soon"],
            &["--ktip-latency", "50ms"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
