//! Command line: one binary, one subcommand per job.
//!
//! `feed` runs the feed worker, `rescan` the rescan consumer, `run` every
//! enabled pipeline in one process, `check` reports whether a configuration
//! is ready to run, and `simulate` the upstream simulators.
//! Exit status: 0 after a clean shutdown (including SIGINT/SIGTERM), 1 on a
//! runtime error, 2 for invalid usage or configuration, 3 when fenced by a
//! newer instance with the same transactional id (do not restart blindly).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::clock::SystemClock;
use crate::config::Config;
use crate::feed::{FeedError, FeedWorker};
use crate::http::Readiness;
use crate::metrics::Metrics;
use crate::rescan::worker::{RescanError, RescanWorker};

/// How long a shutdown may take before the process gives up waiting.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Parser)]
#[command(
    name = "sandbox-bridge",
    version,
    about = "Bridges malware-sandbox services and Apache Kafka"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish the VirusTotal file-behaviour feed to Kafka.
    Feed(ConfigArgs),
    /// Consume rescan requests and call the KTIP sandbox.
    Rescan(ConfigArgs),
    /// Run every enabled pipeline ([feed] and [rescan]) in one process.
    Run(ConfigArgs),
    /// Check the configuration, Kafka and the upstream APIs; print a report (changes nothing).
    Check(ConfigArgs),
    /// Serve simulators of the upstream APIs (for tests, demos and benchmarks).
    Simulate(crate::sim::SimulateArgs),
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The TOML configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    Ok = 0,
    Failed = 1,
    Usage = 2,
    Fenced = 3,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone());
        match cli.command {
            Command::Feed(args) => run_pipelines(args, Pipelines::Feed, shutdown).await,
            Command::Rescan(args) => run_pipelines(args, Pipelines::Rescan, shutdown).await,
            Command::Run(args) => run_pipelines(args, Pipelines::Enabled, shutdown).await,
            Command::Check(args) => check(args, shutdown).await,
            Command::Simulate(args) => {
                crate::logging::init(&crate::config::LogConfig::default());
                match crate::sim::run(args, shutdown).await {
                    Ok(()) => Exit::Ok,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        Exit::Failed
                    }
                }
            }
        }
    });
    // Everything that must finish (the producer's flush) has finished; idle
    // background tasks (HTTP server, fetches) are not waited for.
    runtime.shutdown_background();
    ExitCode::from(code as u8)
}

fn load_config(path: &std::path::Path) -> Result<Config, Exit> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        Exit::Usage
    })
}

/// `check`: 0 when nothing is wrong, 1 when a check failed, 2 for invalid configuration.
async fn check(args: ConfigArgs, shutdown: CancellationToken) -> Exit {
    let config = match load_config(&args.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if !config.feed.enabled && !config.rescan.enabled {
        eprintln!("error: no pipeline is enabled: enable [feed] or [rescan]");
        return Exit::Usage;
    }
    // The report is the output; the log (librdkafka's connection errors
    // above all) would bury it, so it is shown only when RUST_LOG asks.
    crate::logging::init(&crate::config::LogConfig {
        level: "off".into(),
        ..config.log.clone()
    });
    tokio::select! {
        report = crate::check::run(&config, &args.config, std::io::stdout()) => {
            if report.passed() { Exit::Ok } else { Exit::Failed }
        }
        _ = shutdown.cancelled() => {
            eprintln!("error: check interrupted");
            Exit::Failed
        }
    }
}

/// Which pipelines a command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pipelines {
    Feed,
    Rescan,
    /// Every pipeline the configuration enables.
    Enabled,
}

/// A pipeline's way of ending.
enum Ended {
    Feed(Result<(), FeedError>),
    Rescan(Result<(), RescanError>),
}

async fn run_pipelines(args: ConfigArgs, which: Pipelines, shutdown: CancellationToken) -> Exit {
    let config = match load_config(&args.config) {
        Ok(c) => Arc::new(c),
        Err(code) => return code,
    };
    crate::logging::init(&config.log);
    let (feed, rescan) = match which {
        Pipelines::Feed => (true, false),
        Pipelines::Rescan => (false, true),
        Pipelines::Enabled => (config.feed.enabled, config.rescan.enabled),
    };
    if feed && !config.feed.enabled {
        eprintln!("error: feed.enabled is false: nothing to run");
        return Exit::Usage;
    }
    if rescan && !config.rescan.enabled {
        eprintln!(
            "error: the rescan consumer is not enabled: add a [rescan] section (or rescan.enabled = true)"
        );
        return Exit::Usage;
    }
    if !feed && !rescan {
        eprintln!("error: no pipeline is enabled: enable [feed] or [rescan]");
        return Exit::Usage;
    }
    let metrics = Metrics::new();
    let readiness = Readiness::default();
    if let Some(addr) = config.metrics.listen
        && let Err(e) =
            crate::http::serve(addr, metrics.clone(), readiness.clone(), shutdown.clone()).await
    {
        error!("cannot serve metrics on {addr}: {e}");
        return Exit::Failed;
    }
    info!(
        version = env!("CARGO_PKG_VERSION"),
        feed, rescan, "sandbox-bridge starting"
    );
    // One pipeline failing for good stops the others too.
    let stop_all = shutdown.child_token();
    tokio::spawn(crate::kafka::watch_reachability(
        config.kafka.clone(),
        readiness.clone(),
        stop_all.clone(),
    ));
    let mut tasks = tokio::task::JoinSet::new();
    if feed {
        let worker = FeedWorker::new(config.clone(), Arc::new(SystemClock), metrics.feed.clone())
            .with_readiness(readiness.clone())
            .with_kafka_metrics(metrics.kafka.clone());
        let token = stop_all.clone();
        tasks.spawn(async move { Ended::Feed(worker.run(token).await) });
    }
    if rescan {
        let worker = RescanWorker::new(config.clone(), metrics.rescan.clone())
            .with_readiness(readiness.clone())
            .with_kafka_metrics(metrics.kafka.clone());
        let token = stop_all.clone();
        tasks.spawn(async move { Ended::Rescan(worker.run(token).await) });
    }
    let mut exit = Exit::Ok;
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_TIMEOUT).await;
    };
    tokio::pin!(deadline);
    loop {
        let next = tokio::select! {
            n = tasks.join_next() => n,
            _ = &mut deadline => {
                error!("shutdown did not finish within {SHUTDOWN_TIMEOUT:?}; exiting");
                return Exit::Failed;
            }
        };
        let Some(ended) = next else { break };
        let code = match ended {
            Ok(Ended::Feed(Ok(()))) => {
                info!("feed worker stopped");
                Exit::Ok
            }
            Ok(Ended::Rescan(Ok(()))) => {
                info!("rescan consumer stopped");
                Exit::Ok
            }
            Ok(Ended::Feed(Err(e @ FeedError::Fenced(_)))) => {
                error!("{e}");
                Exit::Fenced
            }
            Ok(Ended::Feed(Err(e))) => failed(&e),
            Ok(Ended::Rescan(Err(e))) => failed(&e),
            Err(e) => {
                error!("a pipeline crashed: {e}");
                Exit::Failed
            }
        };
        if code != Exit::Ok {
            exit = code;
            stop_all.cancel();
        }
    }
    exit
}

fn failed(e: &dyn std::fmt::Display) -> Exit {
    error!("{e}");
    eprintln!("error: {e}");
    Exit::Failed
}

/// Cancels `token` on SIGINT or SIGTERM.
fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("warning: cannot listen for SIGTERM: {e}");
                    let _ = tokio::signal::ctrl_c().await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        token.cancel();
    });
}
