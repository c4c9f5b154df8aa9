//! Simulators of the upstream APIs, for tests, the demo and the benchmarks.
//!
//! Each simulator lives in its own module with its own flags, flattened into
//! [`SimulateArgs`]; [`run`] starts them all and stops them on the shutdown
//! token. Today: the VirusTotal file-behaviour feed ([`vt`]).

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
}

/// Serves the simulators until `shutdown` is cancelled. Bound addresses are
/// printed on stdout, one `listening <name> <url>` line each, for scripts and
/// subprocess tests (ports may be 0).
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

    shutdown.cancelled().await;
    handle.shutdown().await;
    Ok(())
}
