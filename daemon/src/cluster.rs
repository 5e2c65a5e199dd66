//! The store a node runs on (`[cluster] backend`), and, on NATS, what makes it a member
//! of a cluster (issue 22, docs/cluster.md): the CA check and the membership heartbeat;
//! [`forward`]: requests forwarded to a device's owner node, and the subscriptions every
//! node follows.
//!
//! Decisions:
//! - **The NATS store runs on a runtime of its own** (one worker thread,
//!   `connectord-nats`), not on the daemon's. A plugin's state call blocks the thread it
//!   runs on until the store answers (`block_on` in the plugin host): the built-in auth
//!   backends' `authenticate` runs on the daemon's async worker itself, and with
//!   `[runtime] worker_threads = 1` that is the only one. The SQLite store answers from
//!   its own thread; NatsStore answers from its tasks (the writer, the acknowledgement
//!   chain), which on the daemon's runtime could then never run: a deadlock. On their own
//!   runtime they always can. The same runtime serves `connectord plugin-call`, whose own
//!   runtime is not driven while it waits for the plugin.
//! - **The CA is the cluster's, copied by the operator.** The first node records the
//!   SHA-256 of its `ca.cert.pem` in `<prefix>_meta` ([`NatsStore::check_ca`]); a node
//!   whose CA differs is refused at start, naming both fingerprints and the files to copy
//!   (a device certificate from `/api/cert` on one node must verify on every other).
//! - **The state directory** still holds the CA, `admin.key` and the plugin cache; its
//!   lost-database check (`state_dir::check_consistent`) concerns the SQLite file only and
//!   is not made on NATS. `admin.key` is written by the node whose start found no key in
//!   the shared state (the first node of a cluster); later nodes write none. If a node's
//!   `admin.key` exists while the cluster's state had no key (another prefix, new
//!   servers, lost state), the new admin key goes to `admin.key.<unix seconds>` beside it,
//!   with a warning: the old file is never overwritten, and holds no key of this state.

pub mod forward;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{Backend, ClusterConfig};
use crate::rest::cluster::{ClusterMember, ClusterView, HEARTBEAT_EVERY};
use crate::shutdown;
use crate::store::Store;
use crate::store::nats::{CaCheck, Member, NatsConfig, NatsStore};

/// Why the store could not be opened or joined.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No NATS server answered (or JetStream did not) within the timeout.
    #[error(
        "cluster: cannot use NATS JetStream at {servers} (cluster.servers) within {timeout_ms} ms: {message}"
    )]
    Unreachable {
        servers: String,
        timeout_ms: u64,
        message: String,
    },
    /// This node's CA is not the cluster's.
    #[error(
        "cluster: this node's CA ({cert}, SHA-256 {ours}) is not the cluster's (SHA-256 {recorded}, recorded in NATS by its first node): every node must sign with the same CA. Copy ca.key.pem and ca.cert.pem from a node of the cluster into {dir} and start again"
    )]
    CaDiffers {
        cert: String,
        dir: String,
        ours: String,
        recorded: String,
    },
    #[error("cannot start the NATS store's runtime: {0}")]
    Runtime(std::io::Error),
    /// Another process runs as this node (`[cluster] node` copied with a configuration).
    #[error(
        "cluster: another process runs as node {node} (its heartbeat goes on; REST {rest}, started at Unix time {started}): every node needs a [cluster] node name of its own"
    )]
    NameTaken {
        node: String,
        rest: String,
        started: u64,
    },
}

/// The runtime the NATS store's tasks run on; shut down when dropped (without waiting,
/// inside another runtime).
pub struct StoreRuntime(Option<tokio::runtime::Runtime>);

impl StoreRuntime {
    fn new() -> Result<StoreRuntime, ClusterError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("connectord-nats")
            .enable_all()
            .build()
            .map(|rt| StoreRuntime(Some(rt)))
            .map_err(ClusterError::Runtime)
    }

    fn handle(&self) -> Option<&tokio::runtime::Runtime> {
        self.0.as_ref()
    }
}

impl Drop for StoreRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                rt.shutdown_background();
            } else {
                rt.shutdown_timeout(Duration::from_secs(2));
            }
        }
    }
}

/// The NATS side of a node: the store and the runtime it runs on.
pub struct Nats {
    pub store: Arc<NatsStore>,
    pub node: String,
    /// Dropped last (after the store's last user).
    pub runtime: StoreRuntime,
}

fn nats_config(c: &ClusterConfig) -> NatsConfig {
    NatsConfig {
        servers: c.servers.clone(),
        prefix: c.prefix.clone(),
        replicas: c.replicas,
        node: c.node_name(),
        timeout: c.timeout(),
    }
}

/// A store error as one clause (the backend's own message, without "database error").
fn said(e: &crate::store::StoreError) -> String {
    match e {
        crate::store::StoreError::Backend { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

fn unreachable(c: &ClusterConfig, message: String) -> ClusterError {
    ClusterError::Unreachable {
        servers: c.servers.join(", "),
        timeout_ms: c.timeout_ms,
        message,
    }
}

/// Connects to NATS on a runtime of its own (see the module doc), from async code; the
/// whole connect bounded by three times the timeout (connect, buckets, the first reads).
pub async fn connect(c: &ClusterConfig) -> Result<Nats, ClusterError> {
    let runtime = StoreRuntime::new()?;
    let rt = runtime
        .handle()
        .ok_or_else(|| unreachable(c, "no runtime".into()))?;
    let task = rt.spawn(NatsStore::connect(nats_config(c)));
    let store = match tokio::time::timeout(c.timeout() * 3, task).await {
        Err(_) => return Err(unreachable(c, "no answer".into())),
        Ok(Err(e)) => return Err(unreachable(c, e.to_string())),
        Ok(Ok(Err(e))) => return Err(unreachable(c, said(&e))),
        Ok(Ok(Ok(s))) => s,
    };
    Ok(Nats {
        store: Arc::new(store),
        node: c.node_name(),
        runtime,
    })
}

/// [`connect`] from a thread that is not async (`connectord plugin-call`). Its writes go
/// out as node `<node>-plugin-call-<pid>`: under the node's own name, the running node
/// would take them for its own and not reload (the plugin-state watch skips a node's own
/// writes).
pub fn connect_blocking(c: &ClusterConfig) -> Result<Nats, ClusterError> {
    let runtime = StoreRuntime::new()?;
    let rt = runtime
        .handle()
        .ok_or_else(|| unreachable(c, "no runtime".into()))?;
    let mut cfg = nats_config(c);
    cfg.node = format!("{}-plugin-call-{}", cfg.node, std::process::id());
    let store = rt
        .block_on(async { tokio::time::timeout(c.timeout() * 3, NatsStore::connect(cfg)).await })
        .map_err(|_| unreachable(c, "no answer".into()))?
        .map_err(|e| unreachable(c, said(&e)))?;
    Ok(Nats {
        store: Arc::new(store),
        node: c.node_name(),
        runtime,
    })
}

impl Nats {
    /// The store as the daemon's services take it.
    pub fn as_store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store) as Arc<dyn Store>
    }
}

/// The largest request body a node on NATS can take: a request's record (and a forwarded
/// request) carries its body in base64 in one NATS message, with some JSON around it, and
/// a message above the server's `max_payload` is refused. Before, a body between about
/// 780 KiB and `requests.max_body` (1 MiB) was taken by the owner and failed in the store,
/// answered 503 and logged as a failing store (found by an outside review).
pub fn max_body_on(max_payload: usize) -> usize {
    // 4 KiB for the record's other fields; base64 is 4 bytes for 3.
    max_payload.saturating_sub(4096) / 4 * 3
}

/// The SHA-256 of `der`, lower-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Refuses the start when another process runs as this node. Two processes of one name
/// took each other's devices, channels and expiries (a copied configuration: found by
/// an outside review). The members bucket holds a record per name for
/// `MEMBER_MAX_AGE` after its last heartbeat, and a node that stops cleanly removes its
/// own, so a record here is a killed run's or a live one's: this waits up to two
/// heartbeats and a second for it to change. It changes only if another process is
/// beating; a killed run's expires or stays as it was. (A restart right after `kill -9`
/// therefore waits those few seconds.)
pub async fn check_name_free(nats: &Nats, c: &ClusterConfig) -> Result<(), ClusterError> {
    let record = || nats.store.member_record(&nats.node);
    let Some((revision, first)) = record().await.map_err(|e| unreachable(c, said(&e)))? else {
        return Ok(());
    };
    let wait = HEARTBEAT_EVERY * 2 + Duration::from_secs(1);
    tracing::info!(
        "cluster: node {} has a record from a run started at Unix time {}: waiting up to {} s to tell a killed run from a live one",
        nats.node,
        first.started,
        wait.as_secs()
    );
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        match record().await {
            Ok(Some((r, m))) if r != revision => {
                return Err(ClusterError::NameTaken {
                    node: nats.node.clone(),
                    rest: m.rest.join(", "),
                    started: m.started,
                });
            }
            Ok(Some(_)) => {}
            // Expired, or removed by a clean stop.
            Ok(None) => return Ok(()),
            Err(e) => return Err(unreachable(c, said(&e))),
        }
    }
    Ok(())
}

/// Checks this node's CA against the cluster's (recording it if it is the first).
pub async fn check_ca(
    nats: &Nats,
    c: &ClusterConfig,
    ca: &crate::certs::CertAuthority,
    state_dir: &Path,
) -> Result<(), ClusterError> {
    let ours = fingerprint(&ca.ca_certificate_der());
    match nats
        .store
        .check_ca(&ours)
        .await
        .map_err(|e| unreachable(c, said(&e)))?
    {
        CaCheck::Recorded => {
            tracing::info!(
                "cluster: recorded this node's CA (SHA-256 {ours}) as the cluster's; copy {} and {} to every other node",
                state_dir.join(crate::certs::CA_KEY_FILE).display(),
                state_dir.join(crate::certs::CA_CERT_FILE).display()
            );
            Ok(())
        }
        CaCheck::Same => Ok(()),
        CaCheck::Differs(recorded) => Err(ClusterError::CaDiffers {
            cert: state_dir
                .join(crate::certs::CA_CERT_FILE)
                .display()
                .to_string(),
            dir: state_dir.display().to_string(),
            ours,
            recorded,
        }),
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn view_member(m: Member) -> ClusterMember {
    ClusterMember {
        node: m.node,
        rest: m.rest,
        coap: m.coap,
        started: m.started,
        version: m.version,
        owned_channels: m.owned_channels,
    }
}

/// This node's record.
pub fn me(node: &str, rest: &[std::net::SocketAddr], coap: &[std::net::SocketAddr]) -> Member {
    Member {
        node: node.to_string(),
        rest: rest.iter().map(ToString::to_string).collect(),
        coap: coap.iter().map(ToString::to_string).collect(),
        started: now_unix(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        owned_channels: 0,
    }
}

/// The view of `GET /v2/cluster`: on SQLite this node alone, for good; on NATS after a
/// first heartbeat (so this node is listed from the start).
pub async fn view(backend: Backend, nats: Option<&Nats>, me: &Member) -> ClusterView {
    let Some(nats) = nats else {
        return ClusterView::new(
            backend.as_str(),
            me.node.clone(),
            vec![view_member(me.clone())],
        );
    };
    if let Err(e) = nats.store.heartbeat(me).await {
        tracing::warn!("cluster: heartbeat failed: {e}");
    }
    let members = match nats.store.members().await {
        Ok(m) => m.into_iter().map(view_member).collect(),
        Err(e) => {
            tracing::warn!("cluster: cannot read the members: {e}");
            vec![view_member(me.clone())]
        }
    };
    ClusterView::new(backend.as_str(), me.node.clone(), members)
}

/// How long the NATS server must go on answering that streams of this cluster's state do
/// not exist before the node takes that state as lost ([`run_heartbeat`]). Longer than a
/// stream leader's election on a NATS cluster; a server restarted with its store loads its
/// streams before it takes clients.
pub const STATE_LOST_AFTER: Duration = Duration::from_secs(10);

/// Every how many beats the streams are looked for while the beats work (a stream deleted
/// alone leaves the members' bucket, and so the beats, working).
const CHECK_STREAMS_EVERY: u32 = 15;

/// Heartbeats every [`HEARTBEAT_EVERY`] and reads the members into `view`, until `stop`;
/// then removes this node's record (a clean stop leaves at once; a killed node drops out
/// when its record expires). Each beat carries the channels this node owns now
/// (`owned_channels`, read from the hub), so every node's `GET /v2/cluster` shows every
/// member's, at most a heartbeat late.
///
/// After a failed beat, every [`CHECK_STREAMS_EVERY`] beats, and at every beat while some
/// were missing, it asks the server for the state's streams ([`NatsStore::missing_streams`]). When the server has gone on answering
/// for [`STATE_LOST_AFTER`] that some do not exist, the state is lost (a server brought back
/// without its JetStream store: found by an outside review, the node answered 503 to
/// every write until it was restarted, and no line said why). Decision: the node then says
/// so and sends the reason on `lost`, and the daemon stops with exit 1, so that systemd
/// (`Restart=on-failure`) starts it again on the empty state, as a first start (a new
/// first admin key beside the old one; devices register again at their next update).
/// Making the streams again in the running node would leave its registry, keys and
/// channels in memory with nothing behind them.
pub async fn run_heartbeat(
    store: Arc<NatsStore>,
    mut me: Member,
    owned_channels: impl Fn() -> u64 + Send,
    view: Arc<ClusterView>,
    lost: tokio::sync::watch::Sender<Option<String>>,
    mut stop: shutdown::Shutdown,
) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let mut beats = 0u32;
    let mut missing_since: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stop.recv() => break,
            _ = tick.tick() => {
                me.owned_channels = owned_channels();
                let beat = store.heartbeat(&me).await;
                let members = match beat {
                    Ok(()) => store.members().await,
                    Err(e) => Err(e),
                };
                let beat_failed = members.is_err();
                match members {
                    Ok(m) => {
                        if failing {
                            tracing::info!("cluster: heartbeat works again");
                            failing = false;
                        }
                        view.set_members(m.into_iter().map(view_member).collect());
                    }
                    Err(e) if !failing => {
                        tracing::warn!("cluster: heartbeat failed: {e}");
                        failing = true;
                    }
                    Err(_) => {}
                }
                beats = beats.wrapping_add(1);
                let look = beat_failed
                    || missing_since.is_some()
                    || beats.is_multiple_of(CHECK_STREAMS_EVERY);
                if lost.borrow().is_some() || !look {
                    continue;
                }
                // A stop is not held up by the question (a server that does not answer).
                let missing = tokio::select! {
                    _ = stop.recv() => break,
                    m = store.missing_streams() => m,
                };
                if missing.is_empty() {
                    if missing_since.take().is_some() {
                        tracing::info!("cluster: the NATS server has this cluster's streams again");
                    }
                    continue;
                }
                let since = *missing_since.get_or_insert_with(|| {
                    tracing::warn!(
                        "cluster: the NATS server says it has no stream {}; if that holds for {} s, this cluster's state is lost and this node stops",
                        missing.join(", "),
                        STATE_LOST_AFTER.as_secs()
                    );
                    std::time::Instant::now()
                });
                if since.elapsed() >= STATE_LOST_AFTER {
                    let reason = format!(
                        "cluster: the NATS server has lost this cluster's state: it has had no stream {} for {} s (a server brought back without its JetStream store, or the streams deleted), and what was stored there is gone; stopping, so that a new start (systemd restarts the service) begins on the empty state, where devices register again at their next update",
                        missing.join(", "),
                        since.elapsed().as_secs()
                    );
                    tracing::error!("{reason}");
                    lost.send_replace(Some(reason));
                }
            }
        }
    }
    if let Err(e) = store.leave(&me.node).await {
        tracing::warn!("cluster: could not remove this node's record at stop: {e}");
    }
}

/// How often a node looks for registrations of nodes that left the cluster.
const ORPHANS_EVERY: Duration = Duration::from_secs(1);

/// Applies the other nodes' registration changes to this node's directory (issue 22),
/// until `stop`: `GET /endpoints` on any node lists every endpoint of the cluster. A lagging
/// receiver (more than the watch's buffer behind) is logged and goes on: the skipped
/// changes are lost to this node's directory until each endpoint's next change.
///
/// Every [`ORPHANS_EVERY`] it also expires the registrations of nodes that are no members
/// now (their heartbeat is older than the store's `MEMBER_MAX_AGE`, as `view` holds it)
/// once their lifetime has passed. Decision: the live member with the lowest name does it,
/// so one node publishes the expiry; every node knows the same members within a heartbeat,
/// and if two disagree briefly, the store's conditional delete lets only one succeed
/// in removing the record (both may still publish an expiry event in that window).
pub async fn run_foreign_registrations(
    mut rx: tokio::sync::broadcast::Receiver<crate::store::nats::RegistrationChange>,
    registry: Arc<crate::registry::Registry>,
    view: Arc<ClusterView>,
    mut stop: shutdown::Shutdown,
) {
    use crate::registry::ForeignChange;
    use crate::store::nats::RegistrationChange;
    use tokio::sync::broadcast::error::RecvError;
    let mut tick = tokio::time::interval(ORPHANS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A full step of orphans was expired: the next step goes at once, still taking turns
    // with the other nodes' changes (`select!` picks among the ready branches at random).
    let mut more = false;
    loop {
        let change = tokio::select! {
            _ = stop.recv() => return,
            _ = tick.tick(), if !more => {
                more = expire_orphans_step(&registry, &view).await;
                continue;
            }
            () = std::future::ready(()), if more => {
                more = expire_orphans_step(&registry, &view).await;
                continue;
            }
            c = rx.recv() => c,
        };
        let change = match change {
            Ok(RegistrationChange::Put(reg)) => ForeignChange::Put(reg),
            Ok(RegistrationChange::Deleted { domain, name }) => {
                ForeignChange::Deleted { domain, name }
            }
            Err(RecvError::Lagged(n)) => {
                // Lost: read them all again, subscribed anew first so that no change
                // falls between the read and the watch (one in both is applied twice,
                // in order, harmlessly).
                tracing::warn!(
                    "cluster: missed {n} registration changes of other nodes; reading their registrations again"
                );
                rx = rx.resubscribe();
                match registry.reload_foreign().await {
                    Ok((read, dropped)) => tracing::info!(
                        "cluster: read {read} registrations of other nodes again; dropped {dropped} they no longer hold"
                    ),
                    Err(e) => tracing::error!(
                        "cluster: cannot read the registrations of other nodes again ({e}); this node lists what it last saw until their next changes"
                    ),
                }
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        registry.apply_foreign(change).await;
    }
}

/// One step of the expiry of the registrations of nodes that left, if this node is the one
/// that does it ([`run_foreign_registrations`]); true when more may be due. Each expired
/// registration is logged within the per-device line budget (`[log] device_lines_per_s`):
/// a node that held a million leaves a bounded log.
async fn expire_orphans_step(registry: &crate::registry::Registry, view: &ClusterView) -> bool {
    let live = view.member_names();
    if live.first().map(String::as_str) != Some(view.node()) {
        return false;
    }
    let now = crate::registry::now_ms();
    let (more, gone) = registry
        .expire_orphans(now, &|n| live.iter().any(|m| m == n))
        .await;
    for ep in gone {
        if crate::log_budget::allow(crate::log_budget::DeviceLine::Expired) {
            tracing::info!(
                ep = %ep.reg.name, domain = %ep.reg.domain,
                owner = ep.reg.node.as_deref().unwrap_or(""),
                "cluster: expired the registration of a node that left"
            );
        }
    }
    more
}

/// The longest the traffic limits wait between two saves on NATS: the other nodes add a
/// node's counts from what it saved, so this bounds (with the watch's delay) how long a
/// node's traffic is unseen by the others' quotas (issue 22, limits cluster-wide).
pub const COUNTS_SAVED_AT_LEAST_EVERY: Duration = Duration::from_secs(1);

/// How often the traffic limits save on this backend: `[limits] save_interval_ms`, at most
/// [`COUNTS_SAVED_AT_LEAST_EVERY`] on NATS. Decision: one KV write per active domain and
/// second per node is cheap next to the traffic it counts, and a quota that other nodes
/// see five seconds late would let a burst spread over the nodes pass it by five seconds
/// of traffic.
pub fn counts_save_interval(backend: Backend, configured: Duration) -> Duration {
    match backend {
        Backend::Nats => configured.min(COUNTS_SAVED_AT_LEAST_EVERY),
        Backend::Sqlite => configured,
    }
}

/// Hands the other nodes' hourly counts to the traffic limits (issue 22), until `stop`:
/// first every current count, then each change. A watch that lagged behind is read again
/// whole.
pub async fn run_other_counts(
    store: Arc<NatsStore>,
    limits: Arc<crate::limits::Limits>,
    mut stop: shutdown::Shutdown,
) {
    use tokio::sync::broadcast::error::RecvError;
    'snapshot: loop {
        let (now, mut rx) = store.watch_hour_counts();
        limits.clear_others();
        for c in now {
            limits.set_other(&c.node, &c.domain, c.hour, c.count);
        }
        loop {
            let c = tokio::select! {
                _ = stop.recv() => return,
                c = rx.recv() => c,
            };
            match c {
                Ok(c) => limits.set_other(&c.node, &c.domain, c.hour, c.count),
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(
                        "cluster: missed {n} changes of other nodes' traffic counts; reading them again"
                    );
                    continue 'snapshot;
                }
                Err(RecvError::Closed) => return,
            }
        }
    }
}

/// Follows the other nodes' device credential changes (issue 22), until `stop`: each time
/// the NATS store says another node wrote a PSK or a certificate record, this node reads
/// every credential again ([`crate::credentials::DeviceCredentials::reload`]) and closes
/// its secure sessions whose credential the change took away, as the node that made the
/// change closes its own. So a PSK made through one node lets its device do a handshake
/// with any node, and a revocation holds on every node, within the watch's delay (about
/// 10 ms on loopback). A failed read is retried at the next change or after a second.
/// It also ends this node's registrations the change disallows, as the node that made
/// the change ends its own (`rest::credentials`): over plain CoAP, of an endpoint given
/// a PSK; over DTLS or TLS, of an endpoint whose credentials were revoked.
pub async fn run_credential_changes(
    store: Arc<NatsStore>,
    credentials: Arc<crate::credentials::DeviceCredentials>,
    transport: Arc<crate::coap::Transport>,
    registry: Arc<crate::registry::Registry>,
    mut stop: shutdown::Shutdown,
) {
    let mut changes = store.credential_changes();
    // A change between the daemon's load and this subscription would be missed: read
    // once now.
    changes.mark_changed();
    let mut failed = false;
    loop {
        if !failed {
            tokio::select! {
                _ = stop.recv() => return,
                c = changes.changed() => if c.is_err() { return },
            }
        } else {
            tokio::select! {
                _ = stop.recv() => return,
                _ = changes.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        changes.borrow_and_update();
        match credentials.reload().await {
            Ok(reloaded) => {
                if failed {
                    tracing::info!("cluster: reading the device credentials works again");
                }
                failed = false;
                for (eps, secure, why) in [
                    (
                        &reloaded.provisioned,
                        false,
                        "another node provisioned a PSK for an endpoint registered here over plain CoAP",
                    ),
                    (
                        &reloaded.withdrawn,
                        true,
                        "another node revoked the device credentials of an endpoint registered here",
                    ),
                ] {
                    for (domain, ep) in eps {
                        registry.end_for_credentials(domain, ep, secure, why).await;
                    }
                }
                let revoked = reloaded.revoked;
                if !revoked.is_empty() {
                    let closed = transport.close_sessions(&|id| revoked.covers(id));
                    tracing::info!(
                        "cluster: another node took device credentials away: closed {closed} secure sessions that used them"
                    );
                }
            }
            Err(e) => {
                if !failed {
                    tracing::warn!(
                        "cluster: cannot read the device credentials another node changed (retried): {e}"
                    );
                }
                failed = true;
            }
        }
    }
}

/// Serves the calls other nodes make to this one until `stop` (or until the calls end,
/// logged with `ended`: what is no longer served): each call is handled by `handle` on a
/// task of its own, at most `max` at once; the next call waits for a slot (each is a task
/// and a call's body in memory), so other nodes cannot make this one hold unbounded work.
/// `handle` is called once the call has its slot.
pub async fn serve_calls<F, Fut>(
    mut calls: crate::store::nats::NodeCalls,
    max: usize,
    mut stop: shutdown::Shutdown,
    ended: &'static str,
    mut handle: F,
) where
    F: FnMut(crate::store::nats::NodeCall) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    loop {
        // A slot first, then the call: a call taken while every slot is busy would wait
        // for one past the deadline that `NodeCalls::next` checked (a review finding).
        let slot = tokio::select! {
            _ = stop.recv() => return,
            s = Arc::clone(&slots).acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let call = tokio::select! {
            _ = stop.recv() => return,
            c = calls.next() => c,
        };
        let Some(call) = call else {
            tracing::error!("cluster: {ended}");
            return;
        };
        let work = handle(call);
        tokio::spawn(async move {
            work.await;
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RegistryConfig;
    use crate::metrics::Counters;
    use crate::registry::{Registration, Registry};
    use crate::store::nats::RegistrationChange;
    use crate::store::sqlite::SqliteStore;

    async fn wait(what: &str, ok: impl Fn() -> bool) {
        let t = std::time::Instant::now();
        while !ok() {
            assert!(t.elapsed() < Duration::from_secs(10), "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn foreign(id: &str, name: &str) -> Registration {
        let peer = "127.0.0.1:1".parse().unwrap();
        Registration {
            id: id.into(),
            domain: "default".into(),
            name: name.into(),
            ept: None,
            lifetime_s: 60,
            binding: "U".into(),
            lwm2m: None,
            queue: false,
            peer: crate::model::PeerRef::udp(peer, peer),
            links: "</3/0>".into(),
            registered_at_ms: 0,
            expires_at_ms: crate::registry::now_ms() + 60_000,
            node: Some("n1".into()),
        }
    }

    /// The watch of the other nodes' registration changes lagged (changes lost): the task
    /// reads their registrations again from the store, and then goes on applying the
    /// changes that come after. Before, it logged the loss and listed a stale view.
    #[tokio::test]
    async fn a_lagging_watch_reads_the_other_nodes_registrations_again() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let registry = Arc::new(
            Registry::new(
                RegistryConfig::default(),
                Arc::clone(&store),
                Arc::new(Counters::default()),
                None,
            )
            .on_node("n2"),
        );
        // Listed here once; its removal is among the changes lost.
        registry
            .apply_foreign(crate::registry::ForeignChange::Put(Box::new(foreign(
                "f0", "gone",
            ))))
            .await;
        // What the other node holds now.
        for (id, name) in [("f1", "a"), ("f2", "b")] {
            store.put_registration(foreign(id, name)).await.unwrap();
        }
        // Four changes into a channel that keeps two: the first receive lags.
        let (tx, rx) = tokio::sync::broadcast::channel(2);
        tx.send(RegistrationChange::Deleted {
            domain: "default".into(),
            name: "gone".into(),
        })
        .unwrap();
        for (id, name) in [("f1", "a"), ("f9", "lost"), ("f2", "b")] {
            tx.send(RegistrationChange::Put(Box::new(foreign(id, name))))
                .unwrap();
        }
        let view = Arc::new(ClusterView::new("nats", "n2".into(), Vec::new()));
        let (stop, stopped) = shutdown::channel();
        let task = tokio::spawn(run_foreign_registrations(
            rx,
            Arc::clone(&registry),
            view,
            stopped,
        ));
        let d = Arc::clone(registry.directory());
        let listed = |name: &str| d.get("default", name).is_some();
        wait("read again", || {
            listed("a") && listed("b") && !listed("gone")
        })
        .await;
        // After the read, the watch goes on.
        tx.send(RegistrationChange::Put(Box::new(foreign("f3", "c"))))
            .unwrap();
        wait("a later change", || listed("c")).await;
        // "lost" was put and is not in the store: the read lists what the store holds.
        assert!(!listed("lost"));
        stop.fire();
        task.await.unwrap();
    }
}
