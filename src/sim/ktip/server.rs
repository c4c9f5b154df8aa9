//! Starting, controlling and stopping the KTIP simulator: one HTTPS listener
//! requiring a client certificate, an accept loop, one task per connection.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use secrecy::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::api::{self, ConnInfo, Core};
use super::certs::{PkiError, PkiFiles, TestPki, subject_of};
use super::settings::{KtipSimSettings, TaskRule};
use super::state::{KtipSimStats, RecordedRequest, SimState};

/// How long `shutdown` waits for in-flight requests (delays sleep) before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// A client that stalls in the handshake must not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused client gets to read the alert and close its side.
const CLOSE_DRAIN: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum KtipSimError {
    #[error("cannot listen on {addr} for the KTIP simulator")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the KTIP simulator's certificates")]
    Pki(#[from] PkiError),
    #[error("creating a temporary directory for the KTIP simulator's certificates")]
    TempDir(#[source] std::io::Error),
}

/// The KTIP sandbox simulator. See [`KtipSimulator::start`].
pub struct KtipSimulator;

impl KtipSimulator {
    /// Generates a fresh PKI, writes its PEM files (to `settings.pki_dir` or a
    /// temporary directory owned by the handle), and serves HTTPS on `addr`
    /// (port 0 picks a free port).
    pub async fn start(
        settings: KtipSimSettings,
        addr: SocketAddr,
    ) -> Result<KtipSimHandle, KtipSimError> {
        let pki = TestPki::generate(settings.client_cert_valid_for)?;
        let (files, temp_dir) = match &settings.pki_dir {
            Some(dir) => (pki.write_pem_files(dir)?, None),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("ktip-sim-pki-")
                    .tempdir()
                    .map_err(KtipSimError::TempDir)?;
                (pki.write_pem_files(dir.path())?, Some(dir))
            }
        };
        let acceptor = TlsAcceptor::from(Arc::new(pki.server_config()?));

        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| KtipSimError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| KtipSimError::Bind { addr, source })?;

        let core = Arc::new(Core {
            state: SimState::new(&settings),
            settings,
            shutdown: CancellationToken::new(),
        });
        let task = tokio::spawn(accept_loop(listener, acceptor, core.clone()));
        tracing::info!(
            address = %addr,
            pki_dir = %files.dir.display(),
            username = %core.settings.username,
            latency = ?core.settings.latency,
            rules = core.settings.rules.len(),
            "KTIP sandbox simulator listening"
        );
        Ok(KtipSimHandle {
            core,
            addr,
            pki,
            files,
            _temp_dir: temp_dir,
            task: Some(task),
        })
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, core: Arc<Core>) {
    let mut connections = JoinSet::new();
    loop {
        // Reap finished connections so the set does not grow with every one.
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = core.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                connections.spawn(serve_connection(tcp, peer, acceptor.clone(), core.clone()));
            }
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "KTIP simulator cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.abort_all();
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    core: Arc<Core>,
) {
    let accept = acceptor.accept(tcp).into_fallible();
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err((e, tcp))) => {
            // The usual cause: no client certificate, or one the CA did not sign.
            tracing::debug!(peer = %peer, error = %e, "KTIP simulator refused a TLS handshake");
            core.state.count_refused_handshake();
            close_gently(tcp).await;
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %peer, "KTIP simulator TLS handshake timed out");
            core.state.count_refused_handshake();
            return;
        }
    };
    let client_subject = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|cert| subject_of(cert));
    let conn = Arc::new(ConnInfo { client_subject });
    let service_core = core.clone();
    let service =
        hyper::service::service_fn(move |req| api::handle(service_core.clone(), conn.clone(), req));
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service);
    tokio::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        _ = core.shutdown.cancelled() => {
            // Finish the request in flight, then close.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = served {
        tracing::debug!(peer = %peer, error = %e, "KTIP simulator connection ended with an error");
    }
}

/// Closes a connection whose handshake failed without resetting it.
///
/// With TLS 1.3 the client sends its certificate, then at once its first
/// request; closing with that request unread would make the kernel send RST,
/// and the client could see "connection reset" instead of the TLS alert the
/// server sent. Half-closing and draining first ends with FIN, so the client
/// reads the alert: the refusal is a TLS error every time.
async fn close_gently(mut tcp: TcpStream) {
    let _ = tcp.shutdown().await;
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(CLOSE_DRAIN, async {
        while let Ok(1..) = tcp.read(&mut buf).await {}
    })
    .await;
}

/// A running KTIP simulator. Dropping it stops the listener (and removes a
/// temporary PKI directory); [`KtipSimHandle::shutdown`] also waits for it.
pub struct KtipSimHandle {
    core: Arc<Core>,
    addr: SocketAddr,
    pki: TestPki,
    files: PkiFiles,
    /// Removed on drop, after the listener has been told to stop.
    _temp_dir: Option<tempfile::TempDir>,
    task: Option<JoinHandle<()>>,
}

impl KtipSimHandle {
    /// What the consumer's `base_url` is set to, e.g. `https://127.0.0.1:40123`.
    pub fn base_url(&self) -> String {
        let ip = if self.addr.ip().is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            self.addr.ip()
        };
        format!("https://{}", SocketAddr::new(ip, self.addr.port()))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn settings(&self) -> &KtipSimSettings {
        &self.core.settings
    }

    /// The CA certificate file: the consumer's `ca_cert`.
    pub fn ca_cert_path(&self) -> &Path {
        &self.files.ca_cert
    }

    /// The client certificate and key in one file: the consumer's `client_cert`.
    pub fn client_cert_path(&self) -> &Path {
        &self.files.client_cert
    }

    /// Every file written, including an expired and a foreign client certificate.
    pub fn pki_files(&self) -> &PkiFiles {
        &self.files
    }

    /// The PKI itself, to issue more client certificates.
    pub fn pki(&self) -> &TestPki {
        &self.pki
    }

    /// When the valid client certificate expires.
    pub fn client_cert_not_after(&self) -> SystemTime {
        self.pki.client().not_after()
    }

    /// Every API request answered, oldest first (up to the settings' record limit).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.core.state.requests()
    }

    /// The recorded requests for `task_id`.
    pub fn requests_for(&self, task_id: &str) -> Vec<RecordedRequest> {
        self.core.state.requests_for(task_id)
    }

    /// How many rescans (`PUT`s) of `task_id` arrived, whatever their outcome.
    pub fn calls_for(&self, task_id: &str) -> u32 {
        self.core.state.rescans_of(task_id)
    }

    pub fn stats(&self) -> KtipSimStats {
        self.core.state.stats()
    }

    /// `false` makes every API call 401, as after a credential rotation the
    /// consumer has not caught up with; `true` restores them.
    pub fn set_credentials_valid(&self, valid: bool) {
        tracing::info!(valid, "KTIP simulator credentials switched");
        self.core.state.set_credentials_valid(valid);
    }

    /// Changes the accepted password.
    pub fn set_password(&self, password: SecretString) {
        tracing::info!("KTIP simulator password changed");
        self.core.state.set_password(password);
    }

    /// Adds a rule (replacing one with the same pattern), checked before the others.
    pub fn set_rule(&self, rule: TaskRule) {
        tracing::info!(rule = %rule, "KTIP simulator rule set");
        self.core.state.set_rule(rule);
    }

    pub fn clear_rules(&self) {
        self.core.state.clear_rules();
    }

    /// Stops accepting, lets in-flight requests finish (up to a grace period) and returns.
    pub async fn shutdown(mut self) {
        self.core.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(SHUTDOWN_GRACE * 2, task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        tracing::info!("KTIP sandbox simulator stopped");
    }
}

impl Drop for KtipSimHandle {
    fn drop(&mut self) {
        self.core.shutdown.cancel();
    }
}
