//! Start-up wiring ([`start`], returning a [`Running`] daemon), signals and systemd
//! readiness ([`Running::serve_until_signal`], what `connectord run` adds).
//!
//! Start order: the state files checked for contradictions (nothing created yet), CoAP
//! sockets and REST listeners bound, then the store opened and probed, the CA, endpoint
//! directory (loaded from the store), access keys (the first admin key at first start);
//! so a start that fails on a taken port or an unusable state creates no first-start
//! file. Only when all is ready does `connectord run` tell systemd READY=1. SIGTERM and SIGINT stop
//! gracefully; SIGHUP re-reads the configuration and applies what can change at run time.
//! With `connectord run --ready-file PATH` the daemon also writes its bound addresses to
//! PATH as JSON once it serves (see [`write_ready_file`]), for tests and supervisors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};

use crate::auth::AuthChain;
use crate::coap::Transport;
use crate::config::Config;
use crate::events::Hub;
use crate::metrics::Counters;
use crate::plugins::PluginSink;
use crate::plugins::{PluginHost, kind_name};
use crate::registry::lwm2m::Lwm2mHandler;
use crate::registry::{Registry, RegistryListener};
use crate::requests::{CoapDevices, OBSERVATION_REPORTS, Requests, RequestsDeps, RequestsListener};
use crate::rest::{self, AppState};
use crate::shutdown;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};
use crate::subscriptions::lua::LuaRules;
use crate::subscriptions::{Subscriptions, SubscriptionsListener};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Not a `source`: the message already holds the store's (the file and the cause),
    /// and the binary prints the chain, which would say it twice.
    #[error("state store: {0}")]
    Store(StoreError),
    #[error("certificate authority: {0}")]
    Ca(#[from] crate::certs::CertError),
    #[error("{0}")]
    Dtls(#[from] crate::coap::dtls::DtlsError),
    #[error("cannot write the first admin key: {0}")]
    FirstKey(std::io::Error),
    #[error("{0}")]
    Bind(#[from] std::io::Error),
    /// `rest.tls_cert` / `rest.tls_key` unusable: the message names the file and the cause.
    #[error(transparent)]
    Tls(#[from] crate::rest::tls::TlsError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    StateDir(#[from] crate::state_dir::NotPrivate),
    #[error(transparent)]
    StateLocked(#[from] crate::state_dir::Locked),
    #[error(transparent)]
    Contradiction(#[from] crate::state_dir::Contradiction),
    #[error("--reinit: cannot move the old files aside: {0}")]
    Reinit(std::io::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// While serving, something the daemon cannot serve without is gone (the reason, as
    /// logged: the cluster's state lost on the NATS server, `cluster::run_heartbeat`); it
    /// stopped, and `connectord run` exits 1.
    #[error("{0}")]
    Lost(String),
    /// A `coap.tls_cert` / `coap.tls_key` file that cannot be read (`key`: `tls_cert` or
    /// `tls_key`).
    #[error("coap.{key}: {}: {source}", path.display())]
    CoapTlsFile {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The secure CoAP listeners' certificate or key unusable: not PEM, no certificate,
    /// no key, or refused by rustls (the message names the key and file).
    #[error(transparent)]
    CoapTlsCertificate(#[from] crate::coap::tls::TlsError),
    /// `coap.tls_cert` / `coap.tls_key` read and taken by the TLS listeners, but refused
    /// by the DTLS ones (dimpl takes an ECDSA P-256 or P-384 key only).
    #[error("coap.tls_cert {} / coap.tls_key {} for the DTLS listeners: {source}", cert.display(), key.display())]
    CoapDtlsCertificate {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: crate::coap::dtls::DtlsError,
    },
    /// `[cluster] backend = "nats"`: NATS unreachable, or this node's CA not the cluster's.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("--ready-file {}: {source}", path.display())]
    ReadyFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The DTLS listeners' keys: the secure listeners' server certificate (`server`, the
/// one the TLS listeners present too), the CA (and `coap.trusted_cas`) as the anchors of
/// client certificates, and the device credential store for PSK keys and revoked
/// certificates.
fn dtls_setup(
    trusted_cas: &[Vec<u8>],
    ca: &crate::certs::CertAuthority,
    server: &ServerCert,
    credentials: Arc<dyn crate::coap::Credentials>,
) -> crate::coap::DtlsSetup {
    let mut trust_anchors = vec![ca.ca_certificate_der()];
    trust_anchors.extend_from_slice(trusted_cas);
    crate::coap::DtlsSetup {
        credentials,
        certificate: Some((server.leaf_der.clone(), server.key_der.clone())),
        trust_anchors,
    }
}

impl From<StoreError> for StartError {
    fn from(e: StoreError) -> StartError {
        StartError::Store(e)
    }
}

impl From<StoreError> for PluginCallError {
    fn from(e: StoreError) -> PluginCallError {
        PluginCallError::Store(e)
    }
}

/// Changes the log filter of the running process (given by the binary, which owns the
/// subscriber).
pub type SetLogFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// How [`start`] starts the daemon (what `connectord run` takes from its command line).
#[derive(Default)]
pub struct Options {
    /// The configuration file, re-read on SIGHUP by [`Running::serve_until_signal`] (with
    /// `None`, the embedded defaults are in force and SIGHUP has nothing to re-read).
    pub config_path: Option<PathBuf>,
    /// `connectord run --reinit`: start on state files that contradict each other (see
    /// [`crate::state_dir::check_consistent`]).
    pub reinit: bool,
    /// Changes the log filter on SIGHUP (`None`: a reload cannot change it).
    pub set_log: Option<SetLogFilter>,
    /// Take SIGTERM, SIGINT and SIGHUP from the start on (`connectord run`), so that one
    /// that arrives while the daemon starts is acted on once it serves (a stop, a
    /// re-read) instead of ending the process by the signal's default action (an outside
    /// review: a SIGHUP during a start killed the daemon without a line). False for
    /// daemons started in a test's process, which keeps its own signals; such a daemon's
    /// [`Running::serve_until_signal`] takes them then.
    pub signals_from_start: bool,
}

/// The signals `connectord run` acts on ([`Options::signals_from_start`]).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (inside a runtime's context); signals from then on are kept
    /// for `recv`.
    fn take() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// A daemon started by [`start`], serving, with its own async runtime. It knows its bound
/// addresses (the system's ports where the configuration says 0) and its state directory.
/// [`Running::shutdown`] stops it as SIGTERM does and joins its threads; dropping it does
/// the same. Both block the calling thread until the daemon has stopped (inside another
/// async runtime, the stop runs on a thread of its own, as a runtime cannot be blocked on
/// from within one).
///
/// Process-wide, not per daemon: the budget of device log lines
/// ([`crate::log_budget`], set from `[log] device_lines_per_s` by every start), and the
/// tracing subscriber (the binary's, or none). Signal handlers and systemd notification
/// belong to [`Running::serve_until_signal`] only, so several daemons can run in one
/// process (the tests do).
pub struct Running {
    rest: Vec<SocketAddr>,
    /// The bound `rest.listen_tls` (HTTPS) addresses.
    rest_tls: Vec<SocketAddr>,
    coap: Vec<SocketAddr>,
    /// The bound `coap.listen_tls` addresses.
    coap_tls: Vec<SocketAddr>,
    /// The bound `coap.listen_dtls` addresses.
    coap_dtls: Vec<SocketAddr>,
    state_dir: PathBuf,
    /// The configuration in force (SIGHUP compares the file with it).
    config: Config,
    options: Options,
    /// Taken at the start ([`Options::signals_from_start`]), else by
    /// [`Running::serve_until_signal`].
    signals: Option<Signals>,
    /// `None` once stopped.
    inner: Option<(tokio::runtime::Runtime, Services)>,
}

/// What a stop needs of the running services.
struct Services {
    trigger: shutdown::Trigger,
    stop: shutdown::Shutdown,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    limits: Arc<crate::limits::Limits>,
    store: Arc<dyn Store>,
    plugins: Arc<PluginHost>,
    /// The REST server's certificate, re-read on SIGHUP (`None` without HTTPS).
    rest_tls: Option<Arc<rest::tls::Tls>>,
    coap_tls: Vec<SocketAddr>,
    coap_dtls: Vec<SocketAddr>,
    /// The NATS store's runtime (`[cluster] backend = "nats"`), shut down after the
    /// daemon's.
    nats_runtime: Option<crate::cluster::StoreRuntime>,
    /// Why the daemon must stop, once something it cannot serve without is gone (the
    /// cluster's state lost on the NATS server: `cluster::run_heartbeat`);
    /// [`Running::serve_until_signal`] then stops and fails with it.
    lost: tokio::sync::watch::Receiver<Option<String>>,
    /// The SQLite state directory's lock ([`crate::state_dir::lock`]), released last.
    state_lock: Option<std::fs::File>,
}

/// Starts the daemon: builds its async runtime (`[runtime] worker_threads`), checks the
/// state, binds CoAP and REST, opens the store and starts every service; returns once it
/// serves. `connectord run` is this and [`Running::serve_until_signal`]; tests start
/// daemons in their own process with it.
pub fn start(config: Config, options: Options) -> Result<Running, StartError> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("connectord");
    // Always explicit, so that tokio does not read TOKIO_WORKER_THREADS (it panics on a
    // value that is not a number): the configuration is the one place for this.
    builder.worker_threads(match config.runtime.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    });
    let rt = builder.build().map_err(StartError::Runtime)?;
    tracing::info!(
        "async runtime: {} worker threads",
        rt.metrics().num_workers()
    );
    let signals = if options.signals_from_start {
        let _in_runtime = rt.enter();
        Some(Signals::take().map_err(StartError::Runtime)?)
    } else {
        None
    };
    match rt.block_on(start_services(&config, &options)) {
        Ok((mut services, (rest, rest_tls), coap)) => Ok(Running {
            rest,
            rest_tls,
            coap,
            coap_tls: std::mem::take(&mut services.coap_tls),
            coap_dtls: std::mem::take(&mut services.coap_dtls),
            state_dir: config.state.resolve_dir(),
            config,
            options,
            signals,
            inner: Some((rt, services)),
        }),
        Err(e) => {
            rt.shutdown_timeout(STOP_TIMEOUT);
            Err(e)
        }
    }
}

/// How long a stop waits for the runtime's threads (blocking tasks included) once every
/// service has stopped.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl Running {
    /// Every bound REST address.
    pub fn rest_addrs(&self) -> &[SocketAddr] {
        &self.rest
    }

    /// Every bound HTTPS address of the REST API (`rest.listen_tls`).
    pub fn rest_tls_addrs(&self) -> &[SocketAddr] {
        &self.rest_tls
    }

    /// Every bound CoAP (UDP) address.
    pub fn coap_addrs(&self) -> &[SocketAddr] {
        &self.coap
    }

    /// Every bound CoAP over TLS (`coap.listen_tls`) address.
    pub fn coap_tls_addrs(&self) -> &[SocketAddr] {
        &self.coap_tls
    }

    /// Every bound CoAP over DTLS (`coap.listen_dtls`) address.
    pub fn coap_dtls_addrs(&self) -> &[SocketAddr] {
        &self.coap_dtls
    }

    /// The state directory in use.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The file holding the first admin key (written at first start; it may have been
    /// removed by the operator since).
    pub fn admin_key_file(&self) -> PathBuf {
        self.state_dir.join(crate::auth::ADMIN_KEY_FILE)
    }

    /// The first admin key, read from [`Running::admin_key_file`] (`None` when the file
    /// is gone or was never written: keys made with `plugin-call` before the first start).
    pub fn admin_key(&self) -> Option<String> {
        let key = std::fs::read_to_string(self.admin_key_file()).ok()?;
        Some(key.trim().to_string()).filter(|k| !k.is_empty())
    }

    /// `connectord run`: writes the ready file (`ready_file`), tells systemd READY=1, then
    /// serves until SIGTERM or SIGINT (SIGHUP re-reads the configuration) and stops.
    pub fn serve_until_signal(mut self, ready_file: Option<PathBuf>) -> Result<(), StartError> {
        let Some((rt, mut services)) = self.inner.take() else {
            return Ok(());
        };
        let (rest, coap) = (self.rest.clone(), self.coap.clone());
        let rest_tls = self.rest_tls.clone();
        let coap_tls = self.coap_tls.clone();
        let coap_dtls = self.coap_dtls.clone();
        let config = self.config.clone();
        let options = std::mem::take(&mut self.options);
        let signals = self.signals.take();
        let mut failed: Option<String> = None;
        let announced = rt.block_on(async {
            if let Some(interval) = sd_notify::watchdog_enabled() {
                services
                    .tasks
                    .push(tokio::spawn(watchdog(interval / 2, services.stop.clone())));
            }
            let Signals {
                mut term,
                mut int,
                mut hup,
            } = match signals {
                Some(s) => s,
                None => Signals::take()?,
            };
            let announced = match &ready_file {
                Some(path) => write_ready_file(
                    path,
                    &rest,
                    &coap,
                    &rest_tls,
                    &coap_tls,
                    &coap_dtls,
                ),
                None => Ok(()),
            };
            if announced.is_ok() {
                notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
                tracing::info!("connectord {} ready", env!("CARGO_PKG_VERSION"));
                let mut running = config;
                let mut lost = services.lost.clone();
                loop {
                    tokio::select! {
                        _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
                        _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
                        _ = hup.recv() => {
                            running = reload(running, options.config_path.as_deref(), options.set_log.as_ref(), services.rest_tls.as_deref());
                        }
                        Ok(reason) = lost.wait_for(Option::is_some) => {
                            failed = reason.clone();
                            break;
                        }
                    }
                }
            }
            notify(&[NotifyState::Stopping]);
            Ok::<_, StartError>(announced)
        });
        stop(rt, services);
        announced??;
        if let Some(path) = &ready_file {
            // No longer serving: a stale file would name addresses nobody listens on.
            let _ = std::fs::remove_file(path);
        }
        if let Some(reason) = failed {
            return Err(StartError::Lost(reason));
        }
        tracing::info!("stopped");
        Ok(())
    }

    /// Stops as SIGTERM does: every task stopped and awaited, the traffic counts saved,
    /// the plugins stopped, the runtime's threads joined.
    pub fn shutdown(mut self) {
        if let Some((rt, services)) = self.inner.take() {
            stop(rt, services);
            tracing::info!("stopped");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some((rt, services)) = self.inner.take() {
            stop(rt, services);
        }
    }
}

/// The stop of every service, in order, then the runtime's threads; on a thread of its
/// own when called inside an async runtime.
fn stop(rt: tokio::runtime::Runtime, services: Services) {
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| {
            let _ = s.spawn(|| stop_services(rt, services)).join();
        });
    } else {
        stop_services(rt, services);
    }
}

fn stop_services(rt: tokio::runtime::Runtime, services: Services) {
    let Services {
        trigger,
        stop: _,
        tasks,
        limits,
        store,
        plugins,
        rest_tls: _,
        coap_tls: _,
        coap_dtls: _,
        nats_runtime,
        lost: _,
        state_lock,
    } = services;
    rt.block_on(async {
        trigger.fire();
        for t in tasks {
            let _ = t.await;
        }
        // The listeners and the long-running tasks have stopped. A task spawned for one
        // request or datagram that is still running (past the REST drain timeout, say) may
        // count after this and go unsaved: one transaction each at most.
        limits.save_now(store.as_ref()).await;
    });
    plugins.shutdown();
    drop(store);
    // Tasks still running (one request's, say) are dropped with the runtime.
    rt.shutdown_timeout(STOP_TIMEOUT);
    // The store's last users are gone with the daemon's runtime.
    drop(nats_runtime);
    drop(state_lock);
}

/// The bound REST addresses: plain HTTP (`rest.listen`) and HTTPS (`rest.listen_tls`).
type RestAddrs = (Vec<SocketAddr>, Vec<SocketAddr>);

/// Starts every service on the current runtime; returns them with the bound REST and
/// CoAP addresses.
async fn start_services(
    config: &Config,
    options: &Options,
) -> Result<(Services, RestAddrs, Vec<SocketAddr>), StartError> {
    let config_path = &options.config_path;
    let reinit = options.reinit;
    crate::log_budget::set_per_second(config.log.device_lines_per_s);
    let state_dir = config.state.resolve_dir();
    crate::state_dir::make_private(&state_dir)?;
    let on_nats = config.cluster.backend == crate::config::Backend::Nats;
    // Before anything in the directory is looked at or moved (`--reinit`).
    let mut state_lock = if on_nats {
        None
    } else {
        crate::state_dir::lock(&state_dir)?
    };
    // The lost-database check concerns the SQLite file: a NATS node has none.
    let consistent = if on_nats {
        Ok(())
    } else {
        crate::state_dir::check_consistent(&state_dir)
    };
    let contradiction = match consistent {
        Ok(()) => {
            if reinit {
                tracing::info!("--reinit: the state files agree, nothing to reinitialise");
            }
            None
        }
        Err(c) if reinit => Some(c),
        Err(c) => return Err(c.into()),
    };
    let source = match &config_path {
        Some(p) => crate::config::Source::File(p.clone()),
        None => crate::config::Source::Embedded,
    };
    // The plugin names as check-config checks them, before anything is created in the
    // state directory (the check against what was really loaded follows below).
    crate::config::check_plugin_names(
        &config.plugins,
        &crate::plugins::available(&config.plugins),
        &source,
    )?;
    let counters = Arc::new(Counters::default());
    // Bound before anything is created in the state directory: a taken port leaves it as
    // it was.
    let transport = Transport::bind(&config.coap, counters.clone())?;
    // Read before the state directory is touched too: a missing file changes nothing.
    let trusted_cas = crate::coap::dtls::read_trusted_cas(&config.coap.trusted_cas)?;
    // The HTTPS certificate before the REST sockets: an unusable one refuses the start.
    let rest_tls = match rest::tls::Tls::from_config(&config.rest)? {
        Some((tls, info)) => {
            log_rest_certificate("REST HTTPS certificate", &tls.files().0, &info);
            Some(Arc::new(tls))
        }
        None => None,
    };
    let plain = rest::bind(&config.rest.listen).await?;
    let tls_listeners = rest::bind_tls(&config.rest.listen_tls).await?;
    let addrs = |ls: &[tokio::net::TcpListener]| {
        ls.iter()
            .map(|l| l.local_addr())
            .collect::<std::io::Result<Vec<_>>>()
    };
    let rest_addrs = (addrs(&plain)?, addrs(&tls_listeners)?);
    let listeners: Vec<rest::Listener> = plain
        .into_iter()
        .map(|l| (l, None))
        .chain(tls_listeners.into_iter().map(|l| (l, rest_tls.clone())))
        .collect();
    if let Some(c) = contradiction {
        let moved = crate::state_dir::reinit(&c).map_err(StartError::Reinit)?;
        let moved: Vec<String> = moved.iter().map(|p| p.display().to_string()).collect();
        tracing::warn!(
            "--reinit: {} was {} beside {}; starting on a new database (the CA is kept){}",
            state_dir.join(crate::store::sqlite::DB_FILE).display(),
            c.db_state,
            c.found.join(", "),
            if moved.is_empty() {
                String::new()
            } else {
                format!("; moved aside: {}", moved.join(", "))
            }
        );
    }
    // The SQLite store's start-up check runs beside the loads and is awaited after them
    // (`SqliteStore::startup_check`).
    let mut sqlite: Option<Arc<SqliteStore>> = None;
    let (store, nats): (Arc<dyn Store>, _) = if on_nats {
        let nats = crate::cluster::connect(&config.cluster).await?;
        // Before anything is read or taken: another process of this name would share it.
        crate::cluster::check_name_free(&nats, &config.cluster).await?;
        tracing::info!(
            "state in NATS JetStream at {} (prefix {}, {} replicas), node {}",
            config.cluster.servers.join(", "),
            config.cluster.prefix,
            config.cluster.replicas,
            nats.node
        );
        (nats.as_store(), Some(nats))
    } else {
        let store = SqliteStore::open_with(
            &state_dir,
            counters.store_commit.clone(),
            config.state.commit_delay(),
        )?;
        tracing::info!("state in {}", store.path().display());
        if state_lock.is_none() {
            // The directory did not exist before the store made it.
            state_lock = crate::state_dir::lock(&state_dir)?;
        }
        let store = Arc::new(store);
        sqlite = Some(Arc::clone(&store));
        (store, None)
    };
    // The CA before the admin key: of the first-start files, the one that can fail last
    // leaves the least behind.
    let ca = Arc::new(crate::certs::CertAuthority::load_or_create(&state_dir)?);
    if let Some(nats) = &nats {
        crate::cluster::check_ca(nats, &config.cluster, &ca, &state_dir).await?;
    }

    // Every service is built with what it uses (no setters afterwards): the traffic
    // limits first, since the registry, the request layer and the subscriptions count
    // against them.
    let limits = Arc::new(crate::limits::Limits::new(
        &config.limits,
        config.registry.max_endpoints_per_domain,
        Arc::clone(&counters),
    ));
    let restored = limits.restore(store.load_hour_counts().await?);
    tracing::info!("loaded {restored} hourly transaction counts of the traffic limits");
    let registry = Registry::new(
        config.registry.clone(),
        Arc::clone(&store),
        Arc::clone(&counters),
        Some(Arc::clone(&limits)),
    );
    // On NATS the registrations record their owner node and the directory also lists the
    // other nodes' (issue 22): the watch is subscribed before the load, so no change falls
    // between the two (one delivered twice is applied twice, harmlessly).
    let (registry, foreign_watch) = match &nats {
        Some(n) => (
            registry.on_node(n.node.clone()),
            Some(n.store.watch_registrations()),
        ),
        None => (registry, None),
    };
    let registry = Arc::new(registry);
    let loaded = registry.load().await;
    // The start-up check's verdict before the load's: reading corrupt pages fails the load,
    // and the check names the file and the cause.
    if let Some(s) = sqlite.take() {
        s.startup_check().await?;
    }
    let loaded = loaded?;
    tracing::info!("loaded {loaded} stored registrations");
    // Device credentials (issue 21): asked by the registration interface (identity
    // binding) and served by REST; memory follows the store.
    let credentials = crate::credentials::DeviceCredentials::load(
        Arc::clone(&store),
        &config.registry.default_domain,
    )
    .await?;
    tracing::info!("loaded the credentials of {} devices", credentials.len());
    // One server certificate for the DTLS and the TLS listeners.
    if config.coap.tls_cert.is_some() && !coap_certificate_used(&config.coap) {
        tracing::warn!(
            "coap.tls_cert and coap.tls_key are set, but no coap.listen_tls or coap.listen_dtls listener presents them: they are not read"
        );
    }
    let server_cert = if config.coap.listen_dtls.is_empty() && !transport.has_tls() {
        None
    } else {
        Some(server_certificate(&config.coap, &ca)?)
    };
    if let Some(server) = server_cert
        .as_ref()
        .filter(|_| !config.coap.listen_dtls.is_empty())
    {
        let psk = Arc::clone(&credentials) as Arc<dyn crate::coap::Credentials>;
        let setup = dtls_setup(&trusted_cas, &ca, server, psk);
        transport
            .set_dtls(&setup)
            .map_err(|source| match &server.files {
                Some((cert, key)) => StartError::CoapDtlsCertificate {
                    cert: cert.clone(),
                    key: key.clone(),
                    source,
                },
                None => StartError::Dtls(source),
            })?;
    }
    // The readers (requests, subscriptions, REST) get the read model; the registry
    // itself goes only to the writers (the registration interface, `DELETE
    // /endpoints/{name}`, the expiry task).
    let directory = Arc::clone(registry.directory());

    let plugins = PluginHost::start(
        &config.plugins,
        Arc::clone(&store),
        crate::plugins::cache_dir(&state_dir),
        Arc::clone(&counters),
        config.notifications.max_concurrent_deliveries,
    );
    let loaded = plugins.loaded();
    for (a, generation) in &loaded {
        tracing::info!(
            "{} plugin {} ({}, generation {generation})",
            kind_name(a.kind),
            a.name,
            a.origin
        );
    }
    let mut available: Vec<_> = loaded.into_iter().map(|(a, _)| a).collect();
    let sink_names = config.plugins.sink_names();
    if crate::plugins::check_names(&config.plugins, &available).is_err() {
        // The names the configuration gives are checked against what was loaded; the
        // message also lists the plugins that exist but were not started (not named).
        let named = |n: &str| {
            config.plugins.auth.iter().any(|a| a == n) || sink_names.iter().any(|s| s == n)
        };
        // A named built-in that is not loaded because it failed to start (its settings
        // refused) says so, at its settings' key: before, the start said that no plugin
        // provided the name, at `plugins.sinks`, which the file may not even have (found
        // by an outside review).
        let names = config.plugins.auth.iter().chain(sink_names.iter());
        for name in names {
            if !available.iter().any(|a| a.name == *name)
                && let Some(why) = plugins.builtin_failure(name)
            {
                return Err(crate::config::plugin_failed_to_start(&source, name, &why).into());
            }
        }
        for a in crate::plugins::available(&config.plugins) {
            if !named(&a.name) && !available.iter().any(|b| b.name == a.name) {
                available.push(a);
            }
        }
        available.sort_by(|a, b| a.name.cmp(&b.name));
        crate::config::check_plugin_names(&config.plugins, &available, &source)?;
    }
    let auth = AuthChain::new(
        Arc::new(crate::plugins::HostBackends(Arc::clone(&plugins))),
        Arc::clone(&counters),
        config.plugins.auth.clone(),
    );
    // On NATS, an admin.key of an earlier start beside a cluster state that has no key
    // (another prefix, new servers) is kept; a new first key goes beside it (see
    // `crate::cluster`).
    let key_file = if on_nats && state_dir.join(crate::auth::ADMIN_KEY_FILE).exists() {
        format!(
            "{}.{}",
            crate::auth::ADMIN_KEY_FILE,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        )
    } else {
        crate::auth::ADMIN_KEY_FILE.to_string()
    };
    match auth
        .bootstrap_to(&state_dir, &key_file, &config.registry.default_domain)
        .await
        .map_err(StartError::FirstKey)?
    {
        Some(path) if key_file != crate::auth::ADMIN_KEY_FILE => tracing::warn!(
            "the cluster's state holds no access key, but {} exists from an earlier start (another cluster state?): it does not work here; created an admin access key for domain {} in {} (readable by this user only)",
            state_dir.join(crate::auth::ADMIN_KEY_FILE).display(),
            config.registry.default_domain,
            path.display()
        ),
        Some(path) => tracing::warn!(
            "first start: created an admin access key for domain {}; it is in {} (readable by this user only)",
            config.registry.default_domain,
            path.display()
        ),
        None => tracing::info!(
            "access keys loaded; the first admin key, if kept, is in {}",
            state_dir.join(crate::auth::ADMIN_KEY_FILE).display()
        ),
    }

    let (trigger, stop) = shutdown::channel();
    let n = &config.notifications;
    // Callbacks go to a sink by their URL's scheme: each sink of `[plugins] sinks` says
    // which it takes (`schemes`), the first in the list keeps a scheme two claim, and a
    // scheme none takes is refused at `PUT /notification/callback`.
    let mut sinks = crate::events::SchemeRouter::new();
    for name in &sink_names {
        let sink = PluginSink {
            host: Arc::clone(&plugins),
            name: name.clone(),
            // The plugin is handed the mbed JSON message, rendered by the REST edge.
            render: Arc::new(connectord_rest::wire::Mbed),
        };
        let schemes = sink.schemes().await;
        let sink = Arc::new(sink);
        for scheme in &schemes {
            if !sinks.route(
                scheme,
                name,
                Arc::clone(&sink) as Arc<dyn crate::events::Sink>,
            ) {
                tracing::warn!(
                    "notification sink {name} takes {scheme}:// callbacks, but {} comes first in [plugins] sinks and takes them",
                    sinks.sink_of(scheme).unwrap_or("another sink")
                );
            }
        }
    }
    tracing::info!(
        "notification sinks by callback URL scheme: {}",
        sinks.describe()
    );
    let mut early_tasks = Vec::new();
    // On NATS a key's channel is served by one node at a time, its owner (issue 22,
    // `channels`); the other nodes' channel records are watched from before the load.
    let hub = match &nats {
        None => {
            Hub::load(
                Arc::clone(&store),
                Arc::new(sinks),
                n.clone(),
                Arc::clone(&counters),
                stop.clone(),
            )
            .await?
        }
        Some(nats) => {
            let watch = nats.store.watch_channels();
            let peers = crate::channels::NatsPeers::new(
                Arc::clone(&nats.store),
                nats.node.clone(),
                config.cluster.timeout(),
            );
            let hub = Hub::load_clustered(
                Arc::clone(&store),
                Arc::new(sinks),
                n.clone(),
                Arc::clone(&counters),
                stop.clone(),
                Arc::new(peers),
            )
            .await?;
            early_tasks.push(tokio::spawn(crate::channels::follow(
                watch,
                Arc::clone(&hub),
                stop.clone(),
            )));
            early_tasks
                .push(crate::channels::serve(&nats.store, Arc::clone(&hub), stop.clone()).await?);
            early_tasks.push(tokio::spawn(Arc::clone(&hub).run_leases(stop.clone())));
            hub
        }
    };
    // Queues count their bytes (`notifications.max_queued_bytes_per_key`) by the entries
    // the REST edge renders.
    hub.set_render(Arc::new(connectord_rest::wire::Mbed));
    // A straight line: the request layer before the subscriptions manager, which gets it
    // and the receiving end of the request layer's observation reports (no back-reference).
    let (reporter, reports) = crate::requests::observation_reports(OBSERVATION_REPORTS);
    let requests = Requests::new(
        RequestsDeps {
            directory: Arc::clone(&directory),
            devices: Arc::new(CoapDevices::new(
                Arc::clone(&transport),
                Arc::clone(&credentials),
            )),
            hub: Arc::clone(&hub),
            store: Arc::clone(&store),
            counters: Arc::clone(&counters),
            limits: Some(Arc::clone(&limits)),
            node: nats.as_ref().map(|n| n.node.clone()),
            // Requests for another node's devices go to their owner (issue 22).
            forwarder: nats.as_ref().map(|n| {
                Arc::new(crate::cluster::forward::NatsForwarder {
                    store: Arc::clone(&n.store),
                    timeout: config.cluster.timeout(),
                    counters: Arc::clone(&counters),
                    node: n.node.clone(),
                }) as Arc<dyn crate::forward::Forwarder>
            }),
            registry: Arc::downgrade(&registry),
        },
        config.requests.clone(),
        reporter,
    );
    let lua = LuaRules::load(&config.lua, Arc::clone(&counters));
    // On NATS every node follows the other nodes' subscriptions and pre-subscriptions
    // (issue 22): the watch starts before the load, so no change falls between the two.
    let subscription_watch = match &nats {
        Some(n) => Some(n.store.watch_subscriptions().await?),
        None => None,
    };
    let subscriptions = Subscriptions::load(
        Arc::clone(&directory),
        Arc::clone(&requests),
        Arc::clone(&hub),
        Arc::clone(&store),
        Arc::clone(&lua),
        Arc::clone(&counters),
        Some(Arc::clone(&limits)),
    )
    .await?;
    let mut tasks = vec![tokio::spawn(
        Arc::clone(&subscriptions).run_reports(reports, stop.clone()),
    )];
    tasks.append(&mut early_tasks);
    if let Some(watch) = subscription_watch {
        tasks.push(tokio::spawn(crate::cluster::forward::follow_subscriptions(
            watch,
            Arc::clone(&subscriptions),
            stop.clone(),
        )));
    }
    // Requests other nodes forward to this one's devices (issue 22), served before the
    // CoAP listeners start: a device registered here is reachable from every node.
    if let Some(n) = &nats {
        let calls = n
            .store
            .serve_ops(&[
                crate::cluster::forward::OP_SUBMIT,
                crate::cluster::forward::OP_SUBSCRIBE,
            ])
            .await?;
        tasks.push(tokio::spawn(crate::cluster::forward::serve(
            calls,
            Arc::clone(&requests),
            Arc::clone(&subscriptions),
            Arc::clone(&counters),
            stop.clone(),
        )));
    }
    registry.add_listener(Arc::clone(&hub) as Arc<dyn RegistryListener>);
    registry.add_listener(Arc::new(RequestsListener(Arc::clone(&requests))));
    registry.add_listener(Arc::new(SubscriptionsListener(Arc::clone(&subscriptions))));
    let pending = requests.load().await?;
    tracing::info!("loaded {pending} stored requests to devices");
    subscriptions.resume();
    // Pre-subscriptions whose evaluation a stop or kill cut off are evaluated again; the
    // watermark that says which is kept from now on.
    let node = nats.as_ref().map(|n| n.node.clone());
    let redone = subscriptions.redo_unsettled_presubs(node.as_deref()).await;
    if redone > 0 {
        tracing::info!(
            "evaluating again the pre-subscriptions of {redone} endpoints registered shortly before the last stop"
        );
    }
    tasks.push(tokio::spawn(
        Arc::clone(&subscriptions).run_presub_watermark(node, stop.clone()),
    ));
    if let Some(server) = server_cert.as_ref().filter(|_| transport.has_tls()) {
        let mut setup = tls_setup(server, &ca, &trusted_cas)?;
        // Revoked certificates are refused after the handshake (and their sessions closed
        // by the revocation itself).
        setup.credentials = Some(Arc::clone(&credentials) as Arc<dyn crate::coap::Credentials>);
        transport.configure_tls(&setup);
    }
    tasks.extend(transport.start(
        Arc::new(Lwm2mHandler::new(
            Arc::clone(&registry),
            Arc::clone(&credentials),
            Arc::clone(&counters),
        )),
        stop.receiver(),
    ));
    tasks.push(tokio::spawn(Arc::clone(&registry).run_expiry(stop.clone())));
    tasks.push(tokio::spawn(Arc::clone(&hub).run_sweeper(stop.clone())));
    tasks.push(tokio::spawn(crate::log_budget::run_summaries(stop.clone())));
    tasks.push(tokio::spawn(Arc::clone(&limits).run_saver(
        Arc::clone(&store),
        crate::cluster::counts_save_interval(
            config.cluster.backend,
            Duration::from_millis(config.limits.save_interval_ms),
        ),
        stop.clone(),
    )));
    // Issue 22: the other nodes' traffic counts add to this node's quotas, and their
    // credential changes reach this node's handshakes.
    if let Some(nats) = &nats {
        tasks.push(tokio::spawn(crate::cluster::run_credential_changes(
            Arc::clone(&nats.store),
            Arc::clone(&credentials),
            Arc::clone(&transport),
            Arc::clone(&registry),
            stop.clone(),
        )));
        tasks.push(tokio::spawn(crate::cluster::run_other_counts(
            Arc::clone(&nats.store),
            Arc::clone(&limits),
            stop.clone(),
        )));
    }
    if let Some(t) = lua.watch(stop.clone()) {
        tasks.push(t);
    }
    if let Some(t) = plugins.watch(stop.clone()) {
        tasks.push(t);
    }
    // The keys with a channel are swept by one task: when another process
    // (`connectord plugin-call`) wrote the state, so a key it revoked loses its channel at
    // once too, not only at the next write on a plugin route or the next start; and every
    // `key_check_interval_s`, so a key that stops authenticating with no request to any
    // route (a Pelion access key reaching its `expires_at`) loses it within that time.
    let reloaded = Arc::new(tokio::sync::Notify::new());
    if let Some(t) = plugins.follow_store(stop.clone(), Arc::clone(&reloaded)) {
        tasks.push(t);
    }
    {
        let (auth, hub, subscriptions) =
            (auth.clone(), Arc::clone(&hub), Arc::clone(&subscriptions));
        let every = Duration::from_secs(config.notifications.key_check_interval_s);
        let mut stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let which = tokio::select! {
                    _ = stop.recv() => return,
                    () = reloaded.notified() => "revoked by another process",
                    _ = ticks.tick() => "that no longer authenticate (expired)",
                };
                let dropped = crate::revocation::sweep(&auth, &hub, &subscriptions).await;
                if dropped > 0 {
                    tracing::info!("dropped the notification channels of {dropped} keys {which}");
                }
            }
        }));
    }
    // Keys revoked while the daemon was down (or before a crash cut a sweep short)
    // receive nothing more.
    let dropped = crate::revocation::sweep(&auth, &hub, &subscriptions).await;
    if dropped > 0 {
        tracing::info!("dropped the notification channels of {dropped} revoked keys");
    }
    let me = crate::cluster::me(
        &config.cluster.node_name(),
        &rest_addrs.0,
        &transport.local_addrs(),
    );
    let cluster = Arc::new(crate::cluster::view(config.cluster.backend, nats.as_ref(), &me).await);
    if let Some(rx) = foreign_watch {
        tasks.push(tokio::spawn(crate::cluster::run_foreign_registrations(
            rx,
            Arc::clone(&registry),
            Arc::clone(&cluster),
            stop.clone(),
        )));
    }
    let (lost_tx, lost_rx) = tokio::sync::watch::channel(None);
    if let Some(nats) = &nats {
        let hub = Arc::clone(&hub);
        tasks.push(tokio::spawn(crate::cluster::run_heartbeat(
            Arc::clone(&nats.store),
            me,
            move || hub.owned_channels() as u64,
            Arc::clone(&cluster),
            lost_tx,
            stop.clone(),
        )));
    }
    // On NATS a body must fit one NATS message with its record (413 beyond, as past
    // `requests.max_body`).
    let max_body = match &nats {
        Some(n) => {
            let max_payload = n.store.max_payload();
            let fits = crate::cluster::max_body_on(max_payload);
            if fits < config.requests.max_body {
                tracing::info!(
                    "request bodies are limited to {fits} bytes: what one NATS message (max_payload {max_payload}) carries, below requests.max_body ({})",
                    config.requests.max_body
                );
            }
            fits.min(config.requests.max_body)
        }
        None => config.requests.max_body,
    };
    let state = Arc::new(AppState {
        directory,
        registry: Arc::clone(&registry),
        auth,
        counters: Arc::clone(&counters),
        transport: Arc::clone(&transport),
        requests,
        hub,
        subscriptions,
        plugins: Arc::clone(&plugins),
        limits: Arc::clone(&limits),
        ca,
        credentials,
        store: Arc::clone(&store),
        max_body,
        long_poll: Duration::from_secs(config.notifications.long_poll_s),
        websocket_ping: Duration::from_secs(config.notifications.websocket_ping_interval_s),
        connections: rest::conn::Connections::new(&config.rest),
        cluster,
    });
    tasks.push(tokio::spawn(rest::serve(listeners, state, stop.clone())));
    let coap_addrs = transport.local_addrs();
    let coap_tls = transport.local_addrs_of(crate::coap::ListenerKind::Tls);
    let coap_dtls = transport.local_addrs_of(crate::coap::ListenerKind::Dtls);
    Ok((
        Services {
            trigger,
            stop,
            tasks,
            limits,
            store,
            plugins,
            rest_tls,
            coap_tls,
            coap_dtls,
            nats_runtime: nats.map(|n| n.runtime),
            lost: lost_rx,
            state_lock,
        },
        rest_addrs,
        coap_addrs,
    ))
}

/// Logs the REST server's certificate (`what`, from `path`); a warning when it is not
/// valid now.
fn log_rest_certificate(what: &str, path: &Path, info: &rest::tls::CertInfo) {
    match &info.invalid_now {
        None => tracing::info!("{what} from {}: {info}", path.display()),
        Some(why) => tracing::warn!(
            "{what} from {}: {info}; it is {why}: clients will refuse it",
            path.display()
        ),
    }
}

/// SIGHUP: re-read the file; apply the log filter and the REST HTTPS certificate (`tls`,
/// re-read from the files the new configuration names, so a certificate renewed in place
/// is taken too); name what else changed and needs a restart. A file that does not
/// validate leaves everything as it was; so does a certificate that cannot be used (the
/// one in force stays).
fn reload(
    running: Config,
    path: Option<&std::path::Path>,
    set_log: Option<&SetLogFilter>,
    tls: Option<&rest::tls::Tls>,
) -> Config {
    let Some(path) = path else {
        tracing::info!("SIGHUP: running on embedded defaults, nothing to re-read");
        return running;
    };
    let mono = NotifyState::monotonic_usec_now().ok();
    let mut states = vec![NotifyState::Reloading];
    states.extend(mono);
    notify(&states);
    let next = match validate(path) {
        Ok((c, _)) => c,
        Err(e) => {
            tracing::error!("SIGHUP: configuration not reloaded: {e}");
            notify(&[NotifyState::Ready]);
            return running;
        }
    };
    if next.log.level != running.log.level {
        match set_log.map(|set| set(&next.log.level)) {
            Some(Ok(())) => tracing::info!("SIGHUP: log level is now {:?}", next.log.level),
            Some(Err(e)) => tracing::error!("SIGHUP: cannot apply log level: {e}"),
            None => tracing::error!("SIGHUP: cannot apply log level: no log filter to change"),
        }
    }
    if next.log.device_lines_per_s != running.log.device_lines_per_s {
        crate::log_budget::set_per_second(next.log.device_lines_per_s);
        tracing::info!(
            "SIGHUP: log.device_lines_per_s is now {}",
            next.log.device_lines_per_s
        );
    }
    let mut rest_applied = running.rest.clone();
    if let (Some(tls), Some(cert), Some(key)) = (tls, &next.rest.tls_cert, &next.rest.tls_key) {
        match tls.reload(cert, key) {
            Ok(info) => {
                log_rest_certificate("SIGHUP: REST HTTPS certificate reloaded", cert, &info);
                rest_applied.tls_cert = Some(cert.clone());
                rest_applied.tls_key = Some(key.clone());
            }
            Err(e) => tracing::error!(
                "SIGHUP: REST HTTPS certificate not reloaded, the one in force stays: {e}"
            ),
        }
    }
    // The certificate files are applied above; any other change of [rest] needs a restart.
    let rest_rest_changed = rest::RestConfig {
        tls_cert: running.rest.tls_cert.clone(),
        tls_key: running.rest.tls_key.clone(),
        ..next.rest.clone()
    } != running.rest;
    let needs_restart: Vec<&str> = [
        ("runtime", next.runtime != running.runtime),
        ("state", next.state != running.state),
        ("rest", rest_rest_changed),
        ("coap", next.coap != running.coap),
        ("registry", next.registry != running.registry),
        ("requests", next.requests != running.requests),
        ("notifications", next.notifications != running.notifications),
        ("lua", next.lua != running.lua),
        ("plugins", next.plugins != running.plugins),
        ("limits", next.limits != running.limits),
        ("cluster", next.cluster != running.cluster),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect();
    if needs_restart.is_empty() {
        tracing::info!("SIGHUP: configuration re-read from {}", path.display());
    } else {
        tracing::warn!(
            "SIGHUP: changes to [{}] take effect after a restart; the running values stay in force",
            needs_restart.join("], [")
        );
    }
    notify(&[NotifyState::Ready]);
    // Keep the running values of what was not applied, so a later reload compares
    // against what is really in force.
    Config {
        log: next.log,
        rest: rest_applied,
        ..running
    }
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// Writes `{"pid": …, "version": …, "rest": ["ip:port", …], "coap": ["ip:port", …],
/// "rest_tls": ["ip:port", …], "coap_tls": […], "coap_dtls": […]}` (`rest_tls`: the HTTPS
/// addresses of the REST API; `coap_tls`: the CoAP-over-TLS ones; `coap_dtls`: the
/// CoAP-over-DTLS ones) to
/// `path` atomically (a temporary file beside it, then a rename), so that a reader sees
/// either no file or the whole of it. The addresses are the bound ones: with port 0 in
/// the configuration, the ports the system chose. Removed again at a clean stop.
fn write_ready_file(
    path: &Path,
    rest: &[SocketAddr],
    coap: &[SocketAddr],
    rest_tls: &[SocketAddr],
    coap_tls: &[SocketAddr],
    coap_dtls: &[SocketAddr],
) -> Result<(), StartError> {
    let fail = |source| StartError::ReadyFile {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| fail(std::io::Error::other("not a file name")))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let text = serde_json::json!({
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
        "rest": rest.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "coap": coap.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "rest_tls": rest_tls.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "coap_tls": coap_tls.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "coap_dtls": coap_dtls.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
    .to_string();
    std::fs::write(&tmp, text + "\n")
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(e)
        })
}

async fn watchdog(every: Duration, mut stop: shutdown::Shutdown) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.recv() => return,
            _ = tick.tick() => notify(&[NotifyState::Watchdog]),
        }
    }
}

/// `connectord plugin-call`: runs one operation of a plugin against the state directory
/// of `config`, without starting the daemon (for example to create the first user of an
/// auth backend). Returns the plugin's answer.
pub fn plugin_call(
    config: &Config,
    plugin: &str,
    op: &str,
    input: &[u8],
) -> Result<Vec<u8>, PluginCallError> {
    let state_dir = config.state.resolve_dir();
    // On NATS: the cluster's store, on a runtime of its own (the one below is not driven
    // while this thread waits for the plugin; see `crate::cluster`).
    let nats = match config.cluster.backend {
        crate::config::Backend::Nats => Some(crate::cluster::connect_blocking(&config.cluster)?),
        crate::config::Backend::Sqlite => {
            // A lost database is not made anew behind the daemon's back either.
            crate::state_dir::check_consistent(&state_dir)?;
            None
        }
    };
    let store: Arc<dyn Store> = match &nats {
        Some(n) => n.as_store(),
        None => Arc::new(SqliteStore::open(&state_dir)?),
    };
    // The copies of the plugins are loaded from a directory of this call's own, made at
    // once with a name nobody can foresee and mode 0700 (`tempfile`), and removed with
    // everything in it however the call ends. Before, `temp_dir()/connectord-plugin-call-<pid>`:
    // another local user could make that directory first (the host removes an old one and
    // then takes an existing one as it is) and swap a plugin copy for their own code
    // before `dlopen`, run as root by `sudo connectord plugin-call` (found by an outside
    // review); and an unknown plugin name left it behind.
    let private = tempfile::Builder::new()
        .prefix("connectord-plugin-call-")
        .tempdir()
        .map_err(|e| {
            PluginCallError::Plugin(format!(
                "cannot make a private directory in {}: {e}",
                std::env::temp_dir().display()
            ))
        })?;
    let cache = private.path().join("plugins");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PluginCallError::Plugin(e.to_string()))?;
    let _enter = rt.enter();
    // The plugin asked for is started even when the configuration does not enable it
    // (to create the first Pelion user before enabling the backend, say).
    let mut plugins = config.plugins.clone();
    if !plugins.auth.iter().any(|a| a == plugin) {
        plugins.auth.push(plugin.to_string());
    }
    let host = PluginHost::start(
        &plugins,
        store,
        cache.clone(),
        Arc::new(Counters::default()),
        1,
    );
    let out = match host.get(plugin) {
        Some(g) => g
            .call_blocking(op, input.to_vec())
            .map_err(|e| PluginCallError::Plugin(e.to_string())),
        None => {
            let names: Vec<String> = host.loaded().into_iter().map(|(a, _)| a.name).collect();
            Err(PluginCallError::Plugin(format!(
                "no plugin named {plugin} is loaded (loaded: {})",
                names.join(", ")
            )))
        }
    };
    host.shutdown();
    drop(private);
    drop(rt);
    drop(nats);
    out
}

/// Why `connectord plugin-call` failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginCallError {
    /// Not a `source`, as in [`StartError::Store`].
    #[error("state store: {0}")]
    Store(StoreError),
    #[error(transparent)]
    Contradiction(#[from] crate::state_dir::Contradiction),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("{0}")]
    Plugin(String),
}

/// The server certificate of the secure CoAP listeners: TLS and DTLS present the same
/// one (see [`server_certificate`]).
struct ServerCert {
    /// The chain (leaf first) and the key, PEM, each with its name for messages.
    chain: (String, Vec<u8>),
    key: (String, Vec<u8>),
    /// The leaf and the key, DER: what the DTLS listeners take (they send the leaf only).
    leaf_der: Vec<u8>,
    key_der: Vec<u8>,
    /// `coap.tls_cert` and `coap.tls_key` when they are the source.
    files: Option<(PathBuf, PathBuf)>,
}

/// Reads and checks the configuration file at `path` as a start would: the file itself,
/// the plugins it names (built in or provided by a file of `[plugins] dir`), the HTTPS
/// certificate and the secure CoAP listeners' certificate. `connectord check-config`
/// and SIGHUP both take a file only through this, so a reload never accepts a file the
/// next start refuses (an outside review: a misspelt plugin or a missing certificate was
/// "taken" by SIGHUP with a "needs a restart" warning, and the restart then failed).
/// The flag: whether the CoAP certificate, when set, is used by a listener
/// ([`check_coap_certificate`]).
pub fn validate(path: &Path) -> Result<(Config, bool), String> {
    let c = Config::load(path).map_err(|e| e.to_string())?;
    let available = crate::plugins::available(&c.plugins);
    crate::config::check_plugin_names(
        &c.plugins,
        &available,
        &crate::config::Source::File(path.to_path_buf()),
    )
    .map_err(|e| e.to_string())?;
    rest::tls::Tls::from_config(&c.rest).map_err(|e| e.to_string())?;
    let used = check_coap_certificate(&c.coap).map_err(|e| e.to_string())?;
    Ok((c, used))
}

/// `coap.tls_cert`/`coap.tls_key`, when set, read and checked as a start reads them
/// (`connectord check-config`): PEM, a key that matches, and with DTLS listeners a key
/// they take. `Ok(false)` when no secure CoAP listener would use them: then, as at start,
/// they are not read (the start logs a warning).
pub fn check_coap_certificate(coap: &crate::coap::CoapConfig) -> Result<bool, StartError> {
    let (Some(c), Some(k)) = (&coap.tls_cert, &coap.tls_key) else {
        return Ok(true);
    };
    if !coap_certificate_used(coap) {
        // Not read at start either.
        return Ok(false);
    }
    let (chain, key) = read_coap_certificate(c, k)?;
    let key = crate::coap::tls::check_pair((&chain.0, &chain.1), (&key.0, &key.1))?;
    if !coap.listen_dtls.is_empty() {
        crate::coap::dtls::check_server_key(key.secret_der()).map_err(|source| {
            StartError::CoapDtlsCertificate {
                cert: c.clone(),
                key: k.clone(),
                source,
            }
        })?;
    }
    Ok(true)
}

/// A PEM file's bytes with its name for messages (`coap.tls_cert: <path>`).
type NamedPem = (String, Vec<u8>);

/// The files of `coap.tls_cert` (`cert`) and `coap.tls_key` (`key`), as the start and
/// `check-config` read them.
fn read_coap_certificate(cert: &Path, key: &Path) -> Result<(NamedPem, NamedPem), StartError> {
    let read = |name: &'static str, path: &Path| {
        let bytes = std::fs::read(path).map_err(|source| StartError::CoapTlsFile {
            key: name,
            path: path.to_path_buf(),
            source,
        })?;
        Ok::<_, StartError>((format!("coap.{name}: {}", path.display()), bytes))
    };
    Ok((read("tls_cert", cert)?, read("tls_key", key)?))
}

/// Whether a secure CoAP listener (TLS or DTLS) would present `coap.tls_cert`.
fn coap_certificate_used(coap: &crate::coap::CoapConfig) -> bool {
    !coap.listen_tls.is_empty() || !coap.listen_dtls.is_empty()
}

/// The secure listeners' server certificate: `coap.tls_cert`/`coap.tls_key` when set
/// (read and parsed here), else one the CA issues now for `localhost`, the loopback
/// addresses, the addresses of `coap.listen_tls` and `coap.listen_dtls` (not the
/// wildcards) and this host's name.
fn server_certificate(
    coap: &crate::coap::CoapConfig,
    ca: &crate::certs::CertAuthority,
) -> Result<ServerCert, StartError> {
    if let (Some(c), Some(k)) = (&coap.tls_cert, &coap.tls_key) {
        let (chain, key) = read_coap_certificate(c, k)?;
        let (certs, private) = crate::coap::tls::read_pem((&chain.0, &chain.1), (&key.0, &key.1))?;
        return Ok(ServerCert {
            leaf_der: certs[0].to_vec(),
            key_der: private.secret_der().to_vec(),
            chain,
            key,
            files: Some((c.clone(), k.clone())),
        });
    }
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    for a in coap.listen_tls.iter().chain(&coap.listen_dtls) {
        if !a.ip().is_unspecified() && !names.contains(&a.ip().to_string()) {
            names.push(a.ip().to_string());
        }
    }
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() && !names.iter().any(|n| n == h) {
            names.push(h.to_owned());
        }
    }
    let issued = ca.issue_server(&names)?;
    Ok(ServerCert {
        chain: (
            "issued server certificate".to_owned(),
            issued.chain_pem.into_bytes(),
        ),
        key: ("issued server key".to_owned(), issued.key_pem.into_bytes()),
        leaf_der: issued.leaf_der,
        key_der: issued.key_der,
        files: None,
    })
}

/// The certificates of the CoAP over TLS listeners: the secure listeners' server
/// certificate; client certificates verified against the CA and `coap.trusted_cas`.
fn tls_setup(
    server: &ServerCert,
    ca: &crate::certs::CertAuthority,
    trusted_cas: &[Vec<u8>],
) -> Result<crate::coap::TlsSetup, StartError> {
    let mut cas = vec![ca.ca_certificate_der()];
    cas.extend_from_slice(trusted_cas);
    let (chain, key) = (&server.chain, &server.key);
    let server = crate::coap::tls::server_config((&chain.0, &chain.1), (&key.0, &key.1), &cas)?;
    Ok(crate::coap::TlsSetup {
        server: Arc::new(server),
        credentials: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        let text = format!(
            "[state]\ndir = \"{}\"\n[rest]\nlisten = [\"127.0.0.1:0\"]\n[coap]\nlisten = [\"127.0.0.1:0\"]\n[lua]\ndir = \"{}\"\n[runtime]\nworker_threads = 1\n",
            dir.join("state").display(),
            dir.join("scripts").display()
        );
        Config::parse(&text, crate::config::Source::Embedded).expect("test configuration")
    }

    /// `start` answers the bound addresses and the first admin key; a `Running` dropped
    /// inside another async runtime stops all the same (on a thread of its own) rather
    /// than panicking, and its ports are free again.
    #[test]
    fn a_started_daemon_knows_its_addresses_and_stops_when_dropped_anywhere() {
        let dir = tempfile::tempdir().expect("tempdir");
        let running = start(config(dir.path()), Options::default()).expect("started");
        let rest = running.rest_addrs()[0];
        assert_ne!(rest.port(), 0);
        assert_ne!(running.coap_addrs()[0].port(), 0);
        assert_eq!(running.state_dir(), dir.path().join("state"));
        assert!(running.admin_key().is_some_and(|k| !k.is_empty()));
        assert!(std::net::TcpStream::connect(rest).is_ok(), "serving");
        let outer = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        outer.block_on(async move { drop(running) });
        assert!(
            std::net::TcpListener::bind(rest).is_ok(),
            "the REST port is free"
        );
    }
}
