//! Starting, controlling and stopping the feed simulator: two listeners
//! (API and downloads, as upstream uses two origins) over one shared core.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::minute::{Minute, MinuteRange};

use super::api::{self, ApiContext};
use super::batch::{GeneratedLine, batch_file, batch_lines};
use super::download::{self, UrlSigner};
use super::settings::FeedSimSettings;
use super::state::{FeedSimStats, MinuteAttempts, SimState};
use super::store::{BatchStore, PregenerateReport, StoreError};

/// How long `shutdown` waits for in-flight requests (a `slow` fault sleeps) before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on {addr} for the {what}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// State shared by both listeners.
pub struct Core {
    pub settings: FeedSimSettings,
    pub clock: SharedClock,
    pub state: Arc<SimState>,
    pub store: Arc<BatchStore>,
    pub signer: UrlSigner,
    /// Cancelled when the simulator stops; ends pregeneration requests too.
    pub shutdown: CancellationToken,
}

/// A simulator not yet listening: build batches ahead with [`FeedSimulator::pregenerate`],
/// then [`FeedSimulator::serve`].
pub struct FeedSimulator {
    core: Arc<Core>,
}

impl FeedSimulator {
    pub fn new(settings: FeedSimSettings, clock: SharedClock) -> FeedSimulator {
        let state = Arc::new(SimState::default());
        let store = Arc::new(BatchStore::new(
            settings.batches.clone(),
            &settings.cache,
            state.clone(),
        ));
        FeedSimulator {
            core: Arc::new(Core {
                settings,
                clock,
                state,
                store,
                signer: UrlSigner::random(),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// `new` + `serve`: what most tests want. Use port 0 for ephemeral ports.
    pub async fn start(
        settings: FeedSimSettings,
        clock: SharedClock,
        api_addr: SocketAddr,
        download_addr: SocketAddr,
    ) -> Result<FeedSimHandle, SimError> {
        FeedSimulator::new(settings, clock)
            .serve(api_addr, download_addr)
            .await
    }

    /// Builds (or reads from the cache dir) the batches of `range`.
    pub async fn pregenerate(
        &self,
        range: MinuteRange,
        cancel: &CancellationToken,
    ) -> Result<PregenerateReport, StoreError> {
        self.core.store.pregenerate(range, cancel).await
    }

    pub fn settings(&self) -> &FeedSimSettings {
        &self.core.settings
    }

    pub async fn serve(
        self,
        api_addr: SocketAddr,
        download_addr: SocketAddr,
    ) -> Result<FeedSimHandle, SimError> {
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| SimError::Bind { what, addr, source })
        };
        let api_listener = bind("feed API", api_addr).await?;
        let download_listener = bind("feed downloads", download_addr).await?;
        let local = |l: &TcpListener, what, addr| {
            l.local_addr()
                .map_err(|source| SimError::Bind { what, addr, source })
        };
        let api_addr = local(&api_listener, "feed API", api_addr)?;
        let download_addr = local(&download_listener, "feed downloads", download_addr)?;
        let download_base = self
            .core
            .settings
            .download_public_url
            .clone()
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_else(|| http_url(download_addr));

        let shutdown = self.core.shutdown.clone();
        let api_router = api::router(Arc::new(ApiContext {
            core: self.core.clone(),
            download_base: download_base.clone(),
        }));
        let download_router = download::router(self.core.clone());
        let tasks = vec![
            spawn_server("feed API", api_listener, api_router, shutdown.clone()),
            spawn_server(
                "feed downloads",
                download_listener,
                download_router,
                shutdown.clone(),
            ),
        ];
        tracing::info!(api = %api_addr, downloads = %download_addr, "VirusTotal feed simulator listening");
        Ok(FeedSimHandle {
            core: self.core,
            api_addr,
            download_addr,
            download_base,
            tasks,
        })
    }
}

fn spawn_server(
    what: &'static str,
    listener: TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(server = what, error = %e, "simulator listener failed");
        }
    })
}

/// `http://ip:port`, with an unspecified bind address (0.0.0.0, ::) replaced by loopback.
fn http_url(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        addr.ip()
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// A running feed simulator. Dropping it stops the listeners; [`FeedSimHandle::shutdown`]
/// also waits for them.
pub struct FeedSimHandle {
    core: Arc<Core>,
    api_addr: SocketAddr,
    download_addr: SocketAddr,
    download_base: String,
    tasks: Vec<JoinHandle<()>>,
}

impl FeedSimHandle {
    /// What the worker's `base_url` is set to, e.g. `http://127.0.0.1:40123`.
    pub fn base_url(&self) -> String {
        http_url(self.api_addr)
    }

    /// The download origin the API redirects to.
    pub fn download_base_url(&self) -> &str {
        &self.download_base
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    pub fn download_addr(&self) -> SocketAddr {
        self.download_addr
    }

    pub fn settings(&self) -> &FeedSimSettings {
        &self.core.settings
    }

    pub fn stats(&self) -> FeedSimStats {
        self.core.state.stats()
    }

    /// API and download requests seen for minute `m`.
    pub fn attempts(&self, m: Minute) -> MinuteAttempts {
        self.core.state.attempts(m)
    }

    /// Makes the minutes of `range` missing (404) or present, overriding the settings.
    pub fn set_missing(&self, range: MinuteRange, missing: bool) {
        tracing::info!(range = %range, missing, "missing minutes changed");
        self.core.state.set_missing(range, missing);
    }

    /// The exact lines of minute `m`'s batch: the expectation for a worker.
    pub fn batch_lines(&self, m: Minute) -> Vec<GeneratedLine> {
        batch_lines(&self.core.settings.batches, m)
    }

    /// The exact file served for minute `m` when no transport fault applies.
    pub fn batch_file(&self, m: Minute) -> Vec<u8> {
        batch_file(&self.core.settings.batches, m)
    }

    pub async fn pregenerate(&self, range: MinuteRange) -> Result<PregenerateReport, StoreError> {
        self.core
            .store
            .pregenerate(range, &self.core.shutdown)
            .await
    }

    /// Stops accepting, lets in-flight requests finish (up to a grace period) and returns.
    pub async fn shutdown(mut self) {
        self.core.shutdown.cancel();
        for task in std::mem::take(&mut self.tasks) {
            let abort = task.abort_handle();
            if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
                abort.abort();
            }
        }
        tracing::info!("VirusTotal feed simulator stopped");
    }
}

impl Drop for FeedSimHandle {
    fn drop(&mut self) {
        self.core.shutdown.cancel();
    }
}
