//! Simulators of the upstream APIs, for tests, the demo and the benchmarks.
//!
//! Each simulator lives in its own module with its own flags, flattened into
//! [`SimulateArgs`]; [`run`] starts them all and stops them on the shutdown
//! token. Today: the VirusTotal file-behaviour feed ([`vt`]), and, with
//! `--ktip`, the Kaspersky TIP sandbox API ([`ktip`]).

pub mod ktip;
pub mod vt;

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::clock::{SharedClock, SystemClock};

pub use vt::{FeedSimHandle, FeedSimSettings, FeedSimulator};

/// Flags of `sandbox-bridge simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Boxed: the flags are many, and `SimulateArgs` sits in the CLI's command enum.
    #[command(flatten)]
    pub vt: Box<vt::VtFeedArgs>,
    #[command(flatten)]
    pub ktip: Box<ktip::KtipArgs>,
}

/// Serves the simulators until `shutdown` is cancelled. Bound addresses are
/// printed on stdout, one `listening <name> <url>` line each, for scripts and
/// subprocess tests (ports may be 0); the KTIP simulator adds `ktip-ca-cert
/// <path>` and `ktip-client-cert <path>`, the files its clients need.
pub async fn run(args: SimulateArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let clock: SharedClock = Arc::new(SystemClock);
    let vt_args = args.vt;
    let simulator = FeedSimulator::new(vt_args.settings(), clock.clone());

    if let Some(spec) = vt_args.pregenerate {
        let range = spec.resolve(clock.now());
        tracing::info!(range = %range, "pregenerating feed batches");
        match simulator.pregenerate(range, &shutdown).await {
            Ok(report) => {
                tracing::info!(
                    minutes = report.minutes,
                    compressed_bytes = report.compressed_bytes,
                    elapsed = ?report.elapsed,
                    "pregeneration done"
                );
                println!(
                    "pregenerated {} minutes ({} bytes) in {:.1?}",
                    report.minutes, report.compressed_bytes, report.elapsed
                );
            }
            Err(vt::StoreError::Cancelled) => return Ok(()),
            Err(e) => return Err(e).context("pregenerating feed batches"),
        }
        if vt_args.pregenerate_only {
            return Ok(());
        }
    }

    let handle = simulator
        .serve(vt_args.api_listen, vt_args.download_listen)
        .await
        .context("starting the VirusTotal feed simulator")?;
    println!("listening vt-feed-api {}", handle.base_url());
    println!("listening vt-feed-downloads {}", handle.download_base_url());

    let ktip = if args.ktip.ktip {
        let ktip = ktip::KtipSimulator::start(args.ktip.settings(), args.ktip.ktip_listen)
            .await
            .context("starting the KTIP sandbox simulator")?;
        println!("listening ktip-api {}", ktip.base_url());
        println!("ktip-ca-cert {}", ktip.ca_cert_path().display());
        println!("ktip-client-cert {}", ktip.client_cert_path().display());
        Some(ktip)
    } else {
        None
    };

    shutdown.cancelled().await;
    if let Some(ktip) = ktip {
        ktip.shutdown().await;
    }
    handle.shutdown().await;
    Ok(())
}
