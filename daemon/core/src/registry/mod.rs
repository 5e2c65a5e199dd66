//! The endpoint directory: who is registered, with which resources, until when.
//!
//! Two parts: the read model, [`Directory`] (what is registered now, the lookups), which
//! readers get at construction, and the write service, [`Registry`] (the registration
//! interface, the store, the listeners, the expiry), its only writer. The directory's maps
//! are the truth for reads; every change is submitted to the store under the directory's
//! lock (so the store sees changes in memory order), rolled back if the store refuses it,
//! and acknowledged to the device only after the store reports it durable. Lifetimes are
//! wall-clock deadlines so that they survive a restart; one task expires them.

mod directory;
pub mod lwm2m;

pub use directory::Directory;
use directory::{Change, Maps};

/// An endpoint taken out of the maps, its removal from the store, and the change readers
/// are shown once that is answered.
type Removal = (Arc<Endpoint>, crate::store::Pending<()>, Change);

use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::coap::link_format;
use crate::config::RegistryConfig;
use crate::log_budget::{self, DeviceLine};
use crate::metrics::Counters;
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError};
pub use connectord_model::{MAX_NAME_LEN, Registration, now_ms, valid_domain, valid_name};
use connectord_model::{PeerRef, is_dot_segment};

/// A resource from the registration's link-format.
///
/// Boxed strings rather than `String`s: every registered endpoint keeps one of these per
/// resource, and the spare capacity and length words of `String` were a measurable part
/// of the memory per endpoint (docs/PERFORMANCE.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// Path with a leading slash: `/3/0/1`.
    pub path: Box<str>,
    /// `rt=`: resource type.
    pub rt: Option<Box<str>>,
    /// `ct=` turned into a media type where known (`0` → `text/plain`), else as given.
    pub ct: Option<Box<str>>,
    /// `if=`: interface description.
    pub iface: Option<Box<str>>,
    /// `obs`: observable.
    pub obs: bool,
    /// `ver=`: the object's version (LwM2M 1.1 puts it on object links).
    pub ver: Option<Box<str>>,
}

/// A registered endpoint: its registration and an index of its resources.
///
/// One of these stays in memory per registered endpoint, so it keeps only what the hot
/// paths need: the resource paths with their `obs` flag, in one allocation (each path
/// prefixed with `*` when observable, NUL-separated; paths start with `/` and may not
/// contain NUL). Everything else about the resources (`rt`, `ct`, `if`) is read again from
/// `reg.links` by [`Endpoint::resources`] when it is listed, which is rare. A parsed
/// `Vec<Resource>` per endpoint was about half of the memory per endpoint.
///
/// Issue 24: both the object list (`reg.links`) and the paths are shared between the
/// endpoints that registered the same object list ([`ObjectLists`]): the devices of one
/// firmware send the same links, and at a million endpoints one copy each was a quarter
/// of the memory per endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub reg: Registration,
    paths: Arc<str>,
}

impl Endpoint {
    /// Parses the registration's object list.
    pub fn new(reg: Registration) -> Result<Endpoint, RegistryError> {
        let resources = parse_resources(&reg.links)?;
        Ok(Endpoint::with_resources(reg, &resources))
    }

    /// An OMA LwM2M client (the registration carried `lwm2m=`): any object, instance or
    /// resource may be observed (LwM2M's Information Reporting interface), so its links
    /// carry no `obs` and every listed path and everything below it is observable. A
    /// device without `lwm2m=` (mbed Client style) says what is observable with `obs`.
    pub fn is_lwm2m(&self) -> bool {
        self.reg.lwm2m.is_some()
    }

    /// Whether the registration leaves observability to the device for everything it
    /// lists and everything below: an LwM2M client (`lwm2m=`), or a device whose links
    /// mark nothing `obs`. The second is what an LwM2M 1.0 client looks like that leaves
    /// out `lwm2m=`, which LwM2M 1.0 makes optional (its version is then 1.0): before,
    /// such a client could not be subscribed to at all (412), and pre-subscriptions
    /// skipped it without a word. A device that marks some links `obs` (mbed Client
    /// style) keeps the seed's rule: observable is what it marked. Decision: a device
    /// that marks nothing and observes nothing is asked, and its refusal (an answer
    /// without Observe) ends the subscription visibly, as the seed's "whether or not a
    /// resource is observable is determined by mbed Client" has it.
    pub fn observes_freely(&self) -> bool {
        self.paths.starts_with('\0')
    }

    /// Whether `path` may be observed: `Some(true)` for a path listed by a device that
    /// observes freely ([`Endpoint::observes_freely`]) or one below it, `Some(obs)` for a
    /// path an mbed-style device listed, `None` when the registration does not say (the
    /// device decides when asked).
    pub fn observable(&self, path: &str) -> Option<bool> {
        if self.observes_freely() {
            return self
                .paths()
                .any(|(have, _)| is_at_or_below(path, have))
                .then_some(true);
        }
        self.paths().find(|(p, _)| *p == path).map(|(_, obs)| obs)
    }

    fn with_resources(reg: Registration, resources: &[Resource]) -> Endpoint {
        let paths = paths_of(resources, reg.lwm2m.is_some()).into();
        Endpoint { reg, paths }
    }

    /// The resources with all their attributes (parsed from `reg.links` on each call);
    /// `obs` is true for everything a device that observes freely lists
    /// ([`Endpoint::observable`]).
    pub fn resources(&self) -> Vec<Resource> {
        let mut resources = parse_resources(&self.reg.links).unwrap_or_default();
        if self.observes_freely() {
            for r in &mut resources {
                r.obs = true;
            }
        }
        resources
    }

    /// Each resource's path and whether it is observable, in registration order.
    pub fn paths(&self) -> impl Iterator<Item = (&str, bool)> {
        self.paths
            .split('\0')
            .filter(|p| !p.is_empty())
            .map(|p| match p.strip_prefix('*') {
                Some(p) => (p, true),
                None => (p, false),
            })
    }

    /// [`Endpoint::paths`] as bytes, without the observable mark: split as bytes, for
    /// [`crate::requests::resource_known`] on every request (`str::split` with a `char`
    /// pattern set up a searcher for each short path, several times the cost).
    pub fn path_bytes(&self) -> impl Iterator<Item = &[u8]> {
        self.paths
            .as_bytes()
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .map(|p| p.strip_prefix(b"*").unwrap_or(p))
    }

    /// The Content-Formats the device lists on its root link, preferred first.
    pub fn formats(&self) -> Vec<u16> {
        root_formats(&self.reg.links)
    }

    /// How many resources the endpoint registered.
    pub fn resource_count(&self) -> usize {
        self.paths.bytes().filter(|b| *b == 0).count() - usize::from(self.observes_freely())
    }
}

/// The paths index of an endpoint ([`Endpoint::paths`]): each path prefixed with `*` when
/// observable, NUL-separated; led by a NUL (an empty path, which [`Endpoint::paths`]
/// skips) when the device observes freely ([`Endpoint::observes_freely`]).
fn paths_of(resources: &[Resource], lwm2m: bool) -> String {
    let free = lwm2m || !resources.iter().any(|r| r.obs);
    let mut paths = String::new();
    if free {
        paths.push('\0');
    }
    for r in resources {
        if r.obs || free {
            paths.push('*');
        }
        paths.push_str(&r.path);
        paths.push('\0');
    }
    paths
}

/// The object lists registered now, each kept once with its paths index (issue 24):
/// the endpoints that registered the same links share one `Arc<str>` of the text and
/// one of the paths, and a registration or a restart with a known list skips parsing it.
///
/// Keyed by the text and by whether the device is an LwM2M client (its paths index
/// differs). An entry no endpoint uses any more is dropped by a sweep when the table has
/// doubled since the last one (so at most twice the lists in use plus a constant are
/// kept, and a sweep costs amortised O(1) per new list). A fleet whose lists all differ
/// pays one entry per endpoint (measured in docs/PERFORMANCE.md, issue 24).
#[derive(Default)]
pub(crate) struct ObjectLists {
    /// `[mbed-style, LwM2M]`: links → paths.
    lists: [crate::hashing::Map<Arc<str>, Arc<str>>; 2],
    sweep_at: usize,
    /// The last list given to [`ObjectLists::get_shared`] (that very `Arc`, held so that
    /// its address is not another's), whether the device was an LwM2M client, and what
    /// it got: the store gives the registrations of one list the same `Arc` at start, so
    /// a restart hashes each list once, not once per endpoint (issue 24).
    last: Option<LastList>,
}

/// [`ObjectLists::last`]: the `Arc` given, LwM2M or not, the shared text and paths.
type LastList = (Arc<str>, bool, Arc<str>, Arc<str>);

impl ObjectLists {
    /// The shared text and paths of `links` (parsed and checked when new).
    pub(crate) fn get(
        &mut self,
        links: &str,
        lwm2m: bool,
    ) -> Result<(Arc<str>, Arc<str>), RegistryError> {
        let map = &mut self.lists[usize::from(lwm2m)];
        if let Some((text, paths)) = map.get_key_value(links) {
            return Ok((Arc::clone(text), Arc::clone(paths)));
        }
        let resources = parse_resources(links)?;
        let text: Arc<str> = links.into();
        let paths: Arc<str> = paths_of(&resources, lwm2m).into();
        if self.len() >= self.sweep_at {
            // Holds its list in use: forgotten, so that a list no endpoint uses goes.
            self.last = None;
            for m in &mut self.lists {
                // In use: held by an endpoint (or a registration on its way to the store).
                m.retain(|text, _| Arc::strong_count(text) > 1);
            }
            self.sweep_at = (2 * self.len()).max(1024);
        }
        self.lists[usize::from(lwm2m)].insert(Arc::clone(&text), Arc::clone(&paths));
        Ok((text, paths))
    }

    /// As [`ObjectLists::get`], for a list already shared.
    pub(crate) fn get_shared(
        &mut self,
        links: &Arc<str>,
        lwm2m: bool,
    ) -> Result<(Arc<str>, Arc<str>), RegistryError> {
        if let Some((given, l, text, paths)) = &self.last
            && Arc::ptr_eq(given, links)
            && *l == lwm2m
        {
            return Ok((Arc::clone(text), Arc::clone(paths)));
        }
        let (text, paths) = self.get(links, lwm2m)?;
        self.last = Some((
            Arc::clone(links),
            lwm2m,
            Arc::clone(&text),
            Arc::clone(&paths),
        ));
        Ok((text, paths))
    }

    /// Distinct object lists held (in use or not yet swept).
    pub(crate) fn len(&self) -> usize {
        self.lists.iter().map(|m| m.len()).sum()
    }
}

/// An endpoint of a stored or watched registration, its object list shared; a list that
/// does not parse gives the registration's id back with the error (for the log).
fn endpoint_of(
    lists: &mut ObjectLists,
    mut reg: Registration,
) -> Result<Endpoint, (String, RegistryError)> {
    match lists.get_shared(&reg.links, reg.lwm2m.is_some()) {
        Ok((links, paths)) => {
            reg.links = links;
            Ok(Endpoint { reg, paths })
        }
        Err(e) => Err((reg.id, e)),
    }
}

/// A change to the directory, told to every [`RegistryListener`] after it is durable.
#[derive(Debug, Clone)]
pub enum RegistryEvent {
    /// A full registration; `replaced` is the earlier registration of the same name.
    Registered {
        ep: Arc<Endpoint>,
        replaced: Option<Arc<Endpoint>>,
    },
    Updated {
        ep: Arc<Endpoint>,
    },
    Deregistered(Arc<Endpoint>),
    Expired(Arc<Endpoint>),
    /// Our registration was replaced by another cluster node's (issue 22: the device
    /// registered there): local state only goes (observations, the in-memory request
    /// queue); no event is published and the store's records stay (the new owner's).
    Moved(Arc<Endpoint>),
    /// Our registration was removed by another cluster node (a REST `DELETE
    /// /endpoints/{name}`, a CoAP de-registration or an expiry that reached that node):
    /// local state goes as for a de-registration (queued requests answered, observations
    /// ended), but no event is published and the store is not written: that node did both.
    RemovedElsewhere(Arc<Endpoint>),
}

impl RegistryEvent {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        match self {
            RegistryEvent::Registered { ep, .. } | RegistryEvent::Updated { ep } => ep,
            RegistryEvent::Deregistered(ep)
            | RegistryEvent::Expired(ep)
            | RegistryEvent::Moved(ep)
            | RegistryEvent::RemovedElsewhere(ep) => ep,
        }
    }
}

/// Something that reacts to directory changes (the notification hub, the request queues).
/// The registry awaits each listener before it answers the device, so what a listener
/// makes durable is durable before the device hears back.
pub trait RegistryListener: Send + Sync + 'static {
    fn on_event<'a>(
        &'a self,
        ev: &'a RegistryEvent,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

    /// Work that must wait until the device has its answer (sending it requests: a device
    /// may not take requests before its registration is acknowledged), or must not delay
    /// it (running Lua rules). Called for
    /// `Registered` and `Updated` once the response is sent.
    fn after_reply(&self, _ev: &RegistryEvent) {}

    /// Issue 22: `ep` is this node's now, taken over from another cluster node's
    /// registration `from` (the device registered here, or its update arrived here).
    /// Told after the `Registered` or `Updated` event and before the device's answer, so
    /// what a listener takes over (stored requests, subscriptions) is in memory when
    /// [`RegistryListener::after_reply`] sends requests and observes.
    fn on_moved_here<'a>(
        &'a self,
        _ep: &'a Arc<Endpoint>,
        _from: &'a Arc<Endpoint>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(std::future::ready(()))
    }
}

/// Why a registration interface operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Invalid(String),
    #[error("no registration {0}")]
    NotFound(String),
    #[error("domain {domain} already has {max} registered endpoints")]
    DomainFull { domain: String, max: usize },
    /// `registry.max_endpoints` is reached (CoAP 5.03).
    #[error("the server already has {max} registered endpoints (registry.max_endpoints)")]
    Full { max: usize },
    /// The domain's transaction quota is used up (CoAP 4.29).
    #[error("{0}")]
    OverQuota(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a device asked for in `POST /rd`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegisterParams {
    pub name: String,
    pub domain: Option<String>,
    pub ept: Option<String>,
    pub lifetime_s: Option<u32>,
    pub binding: Option<String>,
    pub lwm2m: Option<String>,
    pub queue_flag: bool,
    pub links: String,
}

/// What a device asked for in `POST /rd/{id}`: only what it sends changes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpdateParams {
    pub lifetime_s: Option<u32>,
    pub binding: Option<String>,
    pub queue_flag: bool,
    pub links: Option<String>,
}

/// The registry's write service: registrations, updates, de-registrations and expiry.
///
/// It owns the store, the listeners and the expiry task, and is the only writer of its
/// [`Directory`] (the read model, handed to readers by [`Registry::directory`]).
pub struct Registry {
    /// What is registered now; changed only here, as the store commits (see [`Directory`]).
    directory: Arc<Directory>,
    store: Arc<dyn Store>,
    cfg: RegistryConfig,
    counters: Arc<Counters>,
    /// Woken when a deadline earlier than the one the expiry task sleeps on may exist.
    expiry_wake: Notify,
    /// Told about every change, in order, after it is durable.
    listeners: std::sync::RwLock<Vec<Arc<dyn RegistryListener>>>,
    /// Transaction quotas (none in unit tests).
    limits: Option<Arc<crate::limits::Limits>>,
    /// This node's name in a cluster (issue 22), recorded as the owner of the
    /// registrations made here; `None` on a single node.
    node: Option<String>,
    /// The object lists in use, each kept once (issue 24).
    lists: std::sync::Mutex<ObjectLists>,
}

/// Another cluster node's change of a registration (issue 22), as the store's watch
/// delivers it; given to [`Registry::apply_foreign`].
#[derive(Debug, Clone)]
pub enum ForeignChange {
    /// Stored or replaced by another node.
    Put(Box<Registration>),
    /// The endpoint's registration was removed by another node.
    Deleted { domain: String, name: String },
}

/// True when `path` is `base` or below it, compared by whole segments (`/3/0/1` is below
/// `/3/0`, `/3/01` is not).
pub fn is_at_or_below(path: &str, base: &str) -> bool {
    let base = base.trim_end_matches('/');
    match path.strip_prefix(base) {
        Some(rest) => !base.is_empty() && (rest.is_empty() || rest.starts_with('/')),
        None => false,
    }
}

/// Media type for a link-format `ct=` value (a Content-Format number), as the REST API
/// reports it; an unknown or non-numeric value is passed through as given.
pub fn media_type(ct: &str) -> String {
    ct.parse::<u16>()
        .ok()
        .and_then(crate::coap::content_format::media_type)
        .map(str::to_owned)
        .unwrap_or_else(|| ct.to_string())
}

/// The LwM2M root link (`rt="oma.lwm2m"`): the server's object tree, not a resource.
fn is_root_link(l: &link_format::Link) -> bool {
    l.attr("rt") == Some(Some("oma.lwm2m"))
}

/// The object list `links` without its links at or below `path`, the others as the
/// device wrote them; `None` when no link is there (or the list cannot be parsed, which a
/// stored list always can).
fn links_without(links: &str, path: &str) -> Option<String> {
    let parsed = link_format::parse_spans(links).ok()?;
    let mut kept = String::with_capacity(links.len());
    let mut removed = false;
    for (span, l) in parsed {
        if is_at_or_below(&l.uri, path) && !is_root_link(&l) {
            removed = true;
            continue;
        }
        if !kept.is_empty() {
            kept.push(',');
        }
        kept.push_str(links.get(span)?);
    }
    removed.then_some(kept)
}

/// Parses a registration body into resources. The LwM2M root link (`rt="oma.lwm2m"`)
/// describes the server's object tree, not a resource, and is left out.
///
/// Decision (issue 25 review of the console): a device's resource path with a `.` or `..`
/// segment ([`is_dot_segment`]), or with `?` or `#`, is refused. The REST API refuses such
/// paths in requests already, so the resource could not be used; but a page or client
/// that appends the listed path to a URL (the console's Read, Write, Execute and Observe)
/// had it resolved into another route: `</../../notification/websocket>` made an Observe
/// click a `PUT /v2/notification/websocket` with the operator's key.
pub fn parse_resources(links: &str) -> Result<Vec<Resource>, RegistryError> {
    let parsed = link_format::parse(links)
        .map_err(|e| RegistryError::Invalid(format!("bad object list: {e}")))?;
    let mut out = Vec::with_capacity(parsed.len());
    for l in parsed {
        if is_root_link(&l) {
            continue;
        }
        if !l.uri.starts_with('/') || l.uri.contains('\0') {
            return Err(RegistryError::Invalid(format!(
                "bad object list: link <{}> is not an absolute path",
                l.uri.escape_debug()
            )));
        }
        if l.uri.contains(['?', '#']) || l.uri.split('/').any(is_dot_segment) {
            return Err(RegistryError::Invalid(format!(
                "bad object list: link <{}> has a \".\" or \"..\" segment, a query or a fragment",
                l.uri.escape_debug()
            )));
        }
        let text = |k: &str| l.attr(k).flatten().map(Box::<str>::from);
        out.push(Resource {
            path: l.uri.as_str().into(),
            rt: text("rt"),
            ct: l.attr("ct").flatten().map(|ct| media_type(ct).into()),
            iface: text("if"),
            obs: l.attr("obs").is_some(),
            ver: text("ver"),
        });
    }
    out.shrink_to_fit();
    Ok(out)
}

/// The Content-Formats the device gives on its root link (`</>;rt="oma.lwm2m";ct=110` or
/// `ct="110 11542"`), in its order: the first is the one it prefers. Values that are not
/// numbers are left out; an unparsable object list has none.
pub fn root_formats(links: &str) -> Vec<u16> {
    let Ok(parsed) = link_format::parse(links) else {
        return Vec::new();
    };
    parsed
        .iter()
        .find(|l| l.uri == "/" || is_root_link(l))
        .and_then(|l| l.attr("ct").flatten())
        .map(|ct| {
            ct.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A new registration id (the device's handle, `/rd/{id}`): 10 hex digits of the
/// milliseconds since the Unix epoch (modulo 2^40, about 35 years), then 16 random hex
/// digits. Decision (issue 24): time first, so that the ids of a storm are close in
/// order and the store's index on the id grows at its right-hand end, a page or two per
/// commit, instead of taking one insert on a random page per registration (a WAL page
/// written for each); the 64 random bits keep ids unique across restarts and cluster
/// nodes, as the 64 random bits of the earlier 16-digit ids did. The id is no secret (it
/// travels in clear on plain CoAP); a device is bound to its credentials, not to it.
fn new_registration_id() -> String {
    registration_id(now_ms(), rand::random())
}

fn registration_id(ms: u64, random: u64) -> String {
    format!("{:010x}{random:016x}", ms & ((1 << 40) - 1))
}

impl Registry {
    /// `limits` counts registrations, updates and removals against the domains' quotas.
    pub fn new(
        cfg: RegistryConfig,
        store: Arc<dyn Store>,
        counters: Arc<Counters>,
        limits: Option<Arc<crate::limits::Limits>>,
    ) -> Registry {
        Registry {
            directory: Arc::new(Directory::new()),
            store,
            cfg,
            counters,
            expiry_wake: Notify::new(),
            listeners: std::sync::RwLock::new(Vec::new()),
            limits,
            node: None,
            lists: std::sync::Mutex::new(ObjectLists::default()),
        }
    }

    /// The registry of cluster node `node` (issue 22): the registrations made here record
    /// it as their owner, and stored or watched registrations of other nodes are foreign
    /// (listed, never expired or announced here). Part of the construction.
    pub fn on_node(mut self, node: impl Into<String>) -> Registry {
        self.node = Some(node.into());
        self
    }

    /// Whether `reg` belongs to another cluster node. Registrations recording no owner
    /// (single node, older records) are this node's.
    fn is_foreign(&self, reg: &Registration) -> bool {
        match (&reg.node, &self.node) {
            (Some(owner), Some(me)) => owner != me,
            (Some(_), None) => false,
            (None, _) => false,
        }
    }

    /// Ends this node's registration of (`domain`, `ep`) if it came over plain CoAP
    /// (`secure` false) or over DTLS or TLS (`secure` true), as a de-registration
    /// (`DELETE /endpoints/{ep}`: a `de-registrations` event, its queued and in-flight
    /// requests 410); logged with `why`. Called when the endpoint's credentials change:
    /// through REST on this node (`rest::credentials`), and through another node
    /// (`cluster::run_credential_changes`).
    ///
    /// Decisions: provisioning a PSK ends a plain-CoAP registration, and revoking the
    /// credentials ends a secure one, at once. Before, the plain registration stayed
    /// listed and was served over plain CoAP until its lifetime ran out (whoever had
    /// registered the name without credentials kept it meanwhile), and a revoked device
    /// stayed listed as ACTIVE, every request to it answered 502 (its session closed), for
    /// as long as its lifetime (a day by default): in both cases only its updates were
    /// refused, 4.03. Removed by its id, so a registration made in between by a device
    /// the change allows is not touched. A registration another cluster node owns is left
    /// to that node, which ends it when it reads the change.
    pub async fn end_for_credentials(&self, domain: &str, ep: &str, secure: bool, why: &str) {
        let Some(e) = self.directory.get(domain, ep) else {
            return;
        };
        if e.reg.peer.listener.kind.secure() != secure || self.is_foreign(&e.reg) {
            return;
        }
        match self.deregister(&e.reg.id).await {
            Ok(_) => tracing::info!(ep, domain, "{why}: the endpoint's registration ended"),
            Err(RegistryError::NotFound(_)) => {}
            Err(err) => tracing::warn!(
                ep,
                domain,
                "{why}, but the endpoint's registration could not be ended: {err}"
            ),
        }
    }

    /// Applies another node's registration change (the store's watch of the
    /// registrations, issue 22) to the read model only: no store write, no listener is
    /// told (the owner publishes the events and talks to the device). A put replaces
    /// whatever held the endpoint's name; if that was ours, the device moved to the other
    /// node and our registration is dropped from memory (its record is already replaced in
    /// the store). A removal drops the endpoint only if it is still foreign.
    /// Returns the registration of ours that the put displaced, if any, after logging the
    /// move and telling the listeners [`RegistryEvent::Moved`].
    pub async fn apply_foreign(&self, change: ForeignChange) -> Option<Arc<Endpoint>> {
        match change {
            ForeignChange::Put(reg) => {
                if !self.is_foreign(&reg) {
                    return None;
                }
                let made = {
                    let mut lists = self.lists.lock().unwrap_or_else(|p| p.into_inner());
                    endpoint_of(&mut lists, *reg)
                };
                let ep = match made {
                    Ok(ep) => Arc::new(ep),
                    Err((id, e)) => {
                        tracing::warn!(%id, "cluster: skipping another node's registration: {e}");
                        return None;
                    }
                };
                let replaced = {
                    let mut inner = self.lock();
                    let old = inner
                        .by_name(&ep.reg.domain, &ep.reg.name)
                        .map(|e| e.reg.id.clone());
                    // The endpoint that held the id, under whatever name.
                    let held = inner
                        .by_id(&ep.reg.id)
                        .map(|e| (e.reg.domain.clone(), e.reg.name.clone()));
                    let mut ids = vec![ep.reg.id.as_str()];
                    ids.extend(old.as_deref());
                    let mut names = vec![(ep.reg.domain.as_str(), ep.reg.name.as_str())];
                    names.extend(held.as_ref().map(|(d, n)| (d.as_str(), n.as_str())));
                    let mut replaced = None;
                    // Committed already (read from the store): shown at once.
                    inner.change_committed(&ids, &names, |inner| {
                        replaced = old.as_deref().and_then(|old| inner.remove(old));
                        inner.remove(&ep.reg.id);
                        inner.insert_foreign(Arc::clone(&ep));
                    });
                    replaced
                };
                let moved = replaced.filter(|r| !self.is_foreign(&r.reg))?;
                tracing::info!(
                    ep = %moved.reg.name, domain = %moved.reg.domain,
                    "cluster: the device registered with another node, which owns it now"
                );
                self.tell(RegistryEvent::Moved(Arc::clone(&moved))).await;
                Some(moved)
            }
            ForeignChange::Deleted { domain, name } => {
                let ours = {
                    let mut inner = self.lock();
                    let held = inner
                        .by_name(&domain, &name)
                        .map(|e| (e.reg.id.clone(), !self.is_foreign(&e.reg)));
                    let (id, ours) = held?;
                    let mut removed = None;
                    inner.change_committed(&[&id], &[(&domain, &name)], |inner| {
                        removed = inner.remove(&id);
                    });
                    removed.filter(|_| ours)
                };
                // Ours, removed by another node (a REST DELETE or a CoAP de-registration
                // that reached it): gone here too. Before, this node kept it in memory and
                // the device's next update wrote it back, a ghost registration after the
                // de-registration the applications were told of (found by an outside
                // review). That node published the event and removed the subscriptions.
                // Not counted against the domain's quota here: the node that removed it
                // counted it (a review finding).
                let ep = ours?;
                tracing::info!(
                    ep = %ep.reg.name, domain = %ep.reg.domain,
                    "cluster: another node removed this node's registration of the device"
                );
                self.tell(RegistryEvent::RemovedElsewhere(Arc::clone(&ep)))
                    .await;
                None
            }
        }
    }

    /// Reads the other nodes' registrations again from the store, for when the watch of
    /// their changes fell behind and lost some (issue 22): each is applied as a put (a
    /// registration of ours it displaces is told [`RegistryEvent::Moved`], as by the
    /// watch), and the other nodes' endpoints listed here that the store no longer holds
    /// are dropped. Returns how many were read and how many dropped. The caller
    /// subscribes to the changes again before calling, so none falls between the two.
    pub async fn reload_foreign(&self) -> Result<(usize, usize), StoreError> {
        let mut chunks = self.store.stream_registrations();
        let mut seen = std::collections::HashSet::new();
        while let Some(regs) = chunks.next().await {
            for reg in regs? {
                if !self.is_foreign(&reg) {
                    continue;
                }
                seen.insert(reg.id.clone());
                self.apply_foreign(ForeignChange::Put(Box::new(reg))).await;
            }
        }
        let gone: Vec<_> = self
            .lock()
            .foreign_names()
            .into_iter()
            .filter(|(id, ..)| !seen.contains(id))
            .collect();
        for (_, domain, name) in &gone {
            self.apply_foreign(ForeignChange::Deleted {
                domain: domain.clone(),
                name: name.clone(),
            })
            .await;
        }
        Ok((seen.len(), gone.len()))
    }

    fn take_transaction(&self, domain: &str) -> Result<(), RegistryError> {
        match self.limits.as_ref() {
            Some(l) => l
                .take(domain)
                .map_err(|e| RegistryError::OverQuota(e.to_string())),
            None => Ok(()),
        }
    }

    /// Adds a listener (at start-up, before devices are served).
    pub fn add_listener(&self, l: Arc<dyn RegistryListener>) {
        if let Ok(mut v) = self.listeners.write() {
            v.push(l);
        }
    }

    /// Runs every listener's after-reply work for `ev` (see [`RegistryListener::after_reply`]).
    pub fn after_reply(&self, ev: &RegistryEvent) {
        let listeners: Vec<_> = self.listeners.read().map(|v| v.clone()).unwrap_or_default();
        for l in listeners {
            l.after_reply(ev);
        }
    }

    async fn tell(&self, ev: RegistryEvent) {
        let listeners: Vec<_> = self.listeners.read().map(|v| v.clone()).unwrap_or_default();
        for l in listeners {
            l.on_event(&ev).await;
        }
    }

    /// Tells the listeners that `ep` moved here from another node's `from` (issue 22).
    async fn tell_moved_here(&self, ep: &Arc<Endpoint>, from: &Arc<Endpoint>) {
        tracing::info!(
            ep = %ep.reg.name, domain = %ep.reg.domain,
            from = from.reg.node.as_deref().unwrap_or(""),
            "cluster: the device came from another node; this node owns it now"
        );
        let listeners: Vec<_> = self.listeners.read().map(|v| v.clone()).unwrap_or_default();
        for l in listeners {
            l.on_moved_here(ep, from).await;
        }
    }

    /// Whether `from` (the registration `to` replaced) was another node's: the device
    /// moved here.
    fn moved_from(to: &Endpoint, from: &Endpoint) -> bool {
        from.reg.node.is_some() && from.reg.node != to.reg.node
    }

    /// The domain of a device that names none (`registry.default_domain`).
    pub fn default_domain(&self) -> &str {
        &self.cfg.default_domain
    }

    /// The read model: what is registered now. Readers get this rather than the registry.
    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    fn lock(&self) -> MutexGuard<'_, Maps> {
        self.directory.lock()
    }

    /// The shared text and paths index of an object list ([`ObjectLists`]).
    fn object_list(&self, links: &str, lwm2m: bool) -> Result<(Arc<str>, Arc<str>), RegistryError> {
        self.lists
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(links, lwm2m)
    }

    /// Loads stored registrations (at start). Those already past their deadline are
    /// expired by the expiry task as soon as it runs.
    pub async fn load(&self) -> Result<usize, StoreError> {
        // In pieces as the store reads them: the endpoints of one are built while the
        // store reads and parses the next (issue 24).
        let mut chunks = self.store.stream_registrations();
        let mut eps = Vec::new();
        let mut n = 0;
        while let Some(regs) = chunks.next().await {
            let regs = regs?;
            let mut lists = self.lists.lock().unwrap_or_else(|p| p.into_inner());
            eps.reserve(regs.len());
            for reg in regs {
                let foreign = self.is_foreign(&reg);
                match endpoint_of(&mut lists, reg) {
                    Ok(ep) => {
                        n += usize::from(!foreign);
                        eps.push((Arc::new(ep), foreign));
                    }
                    Err((id, e)) => tracing::error!(%id, "skipping stored registration: {e}"),
                }
            }
        }
        self.lock().insert_all(eps);
        // Stored registrations are all kept (dropping them would lose devices that did
        // nothing wrong); new ones are refused until enough expire or leave.
        if n > self.cfg.max_endpoints {
            tracing::warn!(
                "{n} stored registrations exceed registry.max_endpoints ({}); new registrations are refused until the count falls below it",
                self.cfg.max_endpoints
            );
        }
        self.expiry_wake.notify_one();
        Ok(n)
    }

    /// Whether a new endpoint (not a re-registration) fits in `domain` and in the registry.
    fn room_for_new(&self, inner: &Maps, domain: &str) -> Result<(), RegistryError> {
        if inner.count_in(domain) >= self.cfg.max_endpoints_per_domain {
            return Err(RegistryError::DomainFull {
                domain: domain.to_string(),
                max: self.cfg.max_endpoints_per_domain,
            });
        }
        if inner.len() >= self.cfg.max_endpoints {
            return Err(RegistryError::Full {
                max: self.cfg.max_endpoints,
            });
        }
        Ok(())
    }

    fn check_lifetime(&self, lt: u32) -> Result<u32, RegistryError> {
        let (min, max) = (self.cfg.min_lifetime_s, self.cfg.max_lifetime_s);
        if (min..=max).contains(&lt) {
            Ok(lt)
        } else {
            Err(RegistryError::Invalid(format!(
                "lifetime {lt} is outside {min}..={max} seconds"
            )))
        }
    }

    /// Handles `POST /rd`: a new registration, replacing any earlier one of the same
    /// endpoint name in the same domain.
    pub async fn register(
        &self,
        p: RegisterParams,
        peer: PeerRef,
    ) -> Result<Arc<Endpoint>, RegistryError> {
        if !valid_name(&p.name) {
            return Err(RegistryError::Invalid(format!(
                "endpoint name must be 1 to {MAX_NAME_LEN} bytes without control characters, '/', '?' or '#'"
            )));
        }
        if let Some(t) = &p.ept
            && !valid_name(t)
        {
            return Err(RegistryError::Invalid(format!(
                "endpoint type must be 1 to {MAX_NAME_LEN} bytes without control characters, '/', '?' or '#'"
            )));
        }
        let domain = p.domain.unwrap_or_else(|| self.cfg.default_domain.clone());
        if !valid_domain(&domain) {
            return Err(RegistryError::Invalid(
                "domain must be 1 to 64 letters, digits, '-', '_' or '.'".into(),
            ));
        }
        let lifetime_s =
            self.check_lifetime(p.lifetime_s.unwrap_or(self.cfg.default_lifetime_s))?;
        let binding = p.binding.unwrap_or_else(|| "U".into());
        let (links, paths) = self.object_list(&p.links, p.lwm2m.is_some())?;
        // Only a valid registration that there is room for counts (and makes the domain's
        // counter): a flood of malformed or refused ones, each naming a new domain, must
        // not grow the limits map. (Checked again under the lock that inserts.)
        {
            let inner = self.lock();
            if inner.by_name(&domain, &p.name).is_none() {
                self.room_for_new(&inner, &domain)?;
            }
        }
        self.take_transaction(&domain)?;
        let now = now_ms();
        let reg = Registration {
            id: new_registration_id(),
            queue: p.queue_flag || binding.contains('Q'),
            domain,
            name: p.name,
            ept: p.ept,
            lifetime_s,
            binding,
            lwm2m: p.lwm2m,
            peer,
            links,
            registered_at_ms: now,
            expires_at_ms: now + u64::from(lifetime_s) * 1000,
            node: self.node.clone(),
        };
        let ep = Arc::new(Endpoint { reg, paths });
        let durable = {
            let mut inner = self.lock();
            let old = inner
                .by_name(&ep.reg.domain, &ep.reg.name)
                .map(|e| e.reg.id.clone());
            if old.is_none() {
                self.room_for_new(&inner, &ep.reg.domain)?;
            }
            let mut ids = vec![ep.reg.id.as_str()];
            ids.extend(old.as_deref());
            let mut change =
                inner.unsettled(&ids, &[(ep.reg.domain.as_str(), ep.reg.name.as_str())]);
            let replaced = old.as_ref().and_then(|old| inner.remove(old));
            inner.insert(Arc::clone(&ep));
            inner.made(&mut change);
            (
                self.store.put_registration(ep.reg.clone()),
                replaced,
                change,
            )
        };
        let (durable, replaced, change) = durable;
        self.expiry_wake.notify_one();
        self.answered(change, durable.await, |inner| {
            // Memory holds only what the store holds: the new registration goes, the one
            // it replaced (still on disk) comes back.
            if inner.holds(&ep) {
                inner.remove(&ep.reg.id);
                if let Some(old) = &replaced {
                    inner.restore(old);
                }
            }
        })?;
        Counters::inc(&self.counters.registrations);
        if log_budget::allow(DeviceLine::Registered) {
            tracing::info!(
                ep = %ep.reg.name, domain = %ep.reg.domain, id = %ep.reg.id, peer = %peer.session,
                lifetime = ep.reg.lifetime_s, resources = ep.resource_count(), "registered"
            );
        }
        let moved = replaced
            .as_ref()
            .filter(|old| Registry::moved_from(&ep, old))
            .cloned();
        self.tell(RegistryEvent::Registered {
            ep: Arc::clone(&ep),
            replaced,
        })
        .await;
        if let Some(from) = moved {
            self.tell_moved_here(&ep, &from).await;
        }
        Ok(ep)
    }

    /// Handles `POST /rd/{id}`: refreshes the lifetime and applies what the device sent.
    /// A new source address (NAT rebinding) replaces the old one.
    ///
    /// Issue 22: the id may be another cluster node's registration (listed here from the
    /// registrations watch): the device's update came to this node (a UDP load balancer
    /// whose mapping changed, or a device given another node's address). Decision: it is
    /// accepted (2.04) and the registration moves here, as at a re-registration: it is
    /// stored with this node as its owner (the old owner's watch sees its registration
    /// displaced and forgets the device, `RegistryEvent::Moved`), the listeners hear
    /// `Updated` (the event of an update, as the application sees one) and then
    /// [`RegistryListener::on_moved_here`] (stored requests adopted, subscriptions
    /// observed anew after the answer). An id no node has is 4.04 as before.
    pub async fn update(
        &self,
        id: &str,
        p: UpdateParams,
        peer: PeerRef,
    ) -> Result<Arc<Endpoint>, RegistryError> {
        if let Some(lt) = p.lifetime_s {
            self.check_lifetime(lt)?;
        }
        // The paths index depends on whether the device is an LwM2M client, which an
        // update does not change (an unknown id is refused below).
        let (domain, lwm2m) = {
            let inner = self.lock();
            let ep = inner.by_id(id);
            (
                ep.map(|e| e.reg.domain.clone()),
                ep.is_some_and(|e| e.is_lwm2m()),
            )
        };
        let list = p
            .links
            .as_deref()
            .map(|l| self.object_list(l, lwm2m))
            .transpose()?;
        if let Some(d) = &domain {
            self.take_transaction(d)?;
        }
        let (ep, durable) = {
            let mut inner = self.lock();
            let old = inner
                .by_id(id)
                .cloned()
                .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
            let mut reg = old.reg.clone();
            let foreign = self.is_foreign(&reg);
            if foreign {
                reg.node = self.node.clone();
            }
            if let Some(lt) = p.lifetime_s {
                reg.lifetime_s = lt;
            }
            if let Some(b) = p.binding {
                reg.queue = p.queue_flag || b.contains('Q');
                reg.binding = b;
            } else if p.queue_flag {
                reg.queue = true;
            }
            if reg.peer.session != peer.session && log_budget::allow(DeviceLine::AddressChanged) {
                tracing::info!(ep = %reg.name, from = %reg.peer.session, to = %peer.session, "device address changed");
            }
            reg.peer = peer;
            reg.expires_at_ms = now_ms() + u64::from(reg.lifetime_s) * 1000;
            let ep = match list {
                Some((links, paths)) if reg.lwm2m.is_some() == lwm2m => {
                    reg.links = links;
                    Endpoint { reg, paths }
                }
                // Another registration took the id meanwhile (with another kind of
                // client): its paths are built for it.
                Some((links, _)) => {
                    reg.links = links;
                    let resources = parse_resources(&reg.links)?;
                    Endpoint::with_resources(reg, &resources)
                }
                None => Endpoint {
                    reg,
                    paths: Arc::clone(&old.paths),
                },
            };
            let ep = Arc::new(ep);
            let change = Self::swap_in(&mut inner, &ep);
            let durable = self.store.put_registration(ep.reg.clone());
            (ep, (old, durable, foreign, change))
        };
        let (old, durable, foreign, change) = durable;
        self.expiry_wake.notify_one();
        self.answered(change, durable.await, |inner| {
            // The registration as stored comes back (unless a later change replaced ours).
            if inner.holds(&ep) {
                inner.remove(id);
                if foreign {
                    inner.insert_foreign(Arc::clone(&old));
                } else {
                    inner.insert(Arc::clone(&old));
                }
            }
        })?;
        Counters::inc(&self.counters.registration_updates);
        tracing::debug!(ep = %ep.reg.name, id, "registration updated");
        self.tell(RegistryEvent::Updated {
            ep: Arc::clone(&ep),
        })
        .await;
        if foreign {
            self.tell_moved_here(&ep, &old).await;
        }
        Ok(ep)
    }

    /// A resource the device deleted (it answered a `DELETE` 2.02 Deleted). Seed 000: "The
    /// resource is not deleted from mbed Device Connector until the delete is handled by
    /// mbed Client"; once it is, it goes. The registration's links at or below `path`
    /// are removed, stored, and told as an update (`reg-updates` to the applications);
    /// unlike an update by the device, the lifetime is not renewed and no transaction is
    /// counted. `None` when no link was at or below `path` (an LwM2M client lists objects
    /// and instances, so deleting a resource below them changes no link), or the endpoint
    /// is gone or registered with another node.
    pub async fn forget_links(
        &self,
        domain: &str,
        name: &str,
        path: &str,
    ) -> Result<Option<Arc<Endpoint>>, RegistryError> {
        let (ep, old, durable, change) = {
            let mut inner = self.lock();
            let Some(old) = inner.by_name(domain, name).cloned() else {
                return Ok(None);
            };
            if self.is_foreign(&old.reg) {
                return Ok(None);
            }
            let Some(links) = links_without(&old.reg.links, path) else {
                return Ok(None);
            };
            let (links, paths) = self.object_list(&links, old.is_lwm2m())?;
            let mut reg = old.reg.clone();
            reg.links = links;
            let ep = Arc::new(Endpoint { reg, paths });
            let change = Self::swap_in(&mut inner, &ep);
            let durable = self.store.put_registration(ep.reg.clone());
            (ep, old, durable, change)
        };
        self.answered(change, durable.await, |inner| {
            if inner.holds(&ep) {
                inner.remove(&ep.reg.id);
                inner.insert(Arc::clone(&old));
            }
        })?;
        tracing::debug!(ep = %name, %path, "deleted by the device: its links there are removed");
        self.tell(RegistryEvent::Updated {
            ep: Arc::clone(&ep),
        })
        .await;
        Ok(Some(ep))
    }

    /// Handles `DELETE /rd/{id}`.
    pub async fn deregister(&self, id: &str) -> Result<Arc<Endpoint>, RegistryError> {
        self.remove_where(id, |inner| inner.by_id(id).map(|e| e.reg.id.clone()))
            .await
    }

    /// `DELETE /endpoints/{name}`: the registration of `name` in `domain` ends as if the
    /// device had de-registered (its next update gets 4.04).
    pub async fn remove_by_name(
        &self,
        domain: &str,
        name: &str,
    ) -> Result<Arc<Endpoint>, RegistryError> {
        self.remove_where(name, |inner| {
            inner.by_name(domain, name).map(|e| e.reg.id.clone())
        })
        .await
    }

    /// Removes the endpoint whose id `find` names (`what` names it in the error),
    /// durably, and tells the listeners of the de-registration.
    async fn remove_where(
        &self,
        what: &str,
        find: impl FnOnce(&Maps) -> Option<String>,
    ) -> Result<Arc<Endpoint>, RegistryError> {
        let (ep, durable, change) = {
            let mut inner = self.lock();
            let (ep, change) = find(&inner)
                .and_then(|id| Registry::take_out(&mut inner, &id))
                .ok_or_else(|| RegistryError::NotFound(what.to_string()))?;
            let durable = self.store.delete_registration(ep.reg.id.clone());
            (ep, durable, change)
        };
        let id = ep.reg.id.as_str();
        // Still on disk if refused, so still registered.
        self.answered(change, durable.await, |inner| inner.restore(&ep))?;
        if let Some(l) = self.limits.as_ref() {
            l.count(&ep.reg.domain);
        }
        Counters::inc(&self.counters.deregistrations);
        if log_budget::allow(DeviceLine::Deregistered) {
            tracing::info!(ep = %ep.reg.name, domain = %ep.reg.domain, id, "de-registered");
        }
        self.tell(RegistryEvent::Deregistered(Arc::clone(&ep)))
            .await;
        Ok(ep)
    }

    /// Removes every registration whose deadline is at or before `now_ms`, in batches of
    /// `registry.expiry_batch` ([`Registry::expire_batch`]); returns them.
    pub async fn expire_due(&self, now_ms: u64) -> Vec<Arc<Endpoint>> {
        let mut all = Vec::new();
        loop {
            let (taken, expired) = self.expire_batch(now_ms).await;
            let done = taken < self.cfg.expiry_batch || expired.len() < taken;
            all.extend(expired);
            if done {
                return all;
            }
        }
    }

    /// One step of the expiry (issue 24): removes at most `registry.expiry_batch` of the
    /// registrations due at `now_ms`, the earliest first, waits for the store's removal
    /// of each (one group commit) and tells the listeners (their events stored together).
    /// Returns how many were due and taken, and those the store removed. After an outage
    /// longer than the fleet's lifetime, a million registrations are due at once: in one
    /// step, the directory's lock was held for all their removals (every REST lookup and
    /// every device waited) and a million store jobs and events were queued at once.
    pub async fn expire_batch(&self, now_ms: u64) -> (usize, Vec<Arc<Endpoint>>) {
        let removed = {
            let mut inner = self.lock();
            let due = inner.due(now_ms, self.cfg.expiry_batch);
            self.remove_for_expiry(&mut inner, due)
        };
        if removed.is_empty() {
            return (0, Vec::new());
        }
        let taken = removed.len();
        Counters::inc(&self.counters.registration_expiry_batches);
        (taken, self.finish_expiry(removed).await)
    }

    /// Takes the registrations `ids` out of memory and submits their removal from the
    /// store (under the lock, so the store applies them in memory's order).
    fn remove_for_expiry(&self, inner: &mut Maps, ids: Vec<String>) -> Vec<Removal> {
        let mut removed = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some((ep, change)) = Registry::take_out(inner, &id) {
                let d = self.store.delete_registration(id);
                removed.push((ep, d, change));
            }
        }
        removed
    }

    /// The store answered the write of `change`: if it refused, `undo` rolls the change
    /// back in the maps; then, in the same critical section, readers are shown the change
    /// (or, refused, go on being shown what the store holds).
    fn answered(
        &self,
        change: Change,
        durable: Result<(), StoreError>,
        undo: impl FnOnce(&mut Maps),
    ) -> Result<(), RegistryError> {
        let mut inner = self.lock();
        if durable.is_err() {
            undo(&mut inner);
        }
        inner.settle(change, durable.is_ok());
        Ok(durable?)
    }

    /// Puts `ep` in the place of the endpoint with its id (an update of it), readers
    /// still shown the old one until the returned change settles.
    fn swap_in(inner: &mut Maps, ep: &Arc<Endpoint>) -> Change {
        let id = ep.reg.id.as_str();
        let mut change = inner.unsettled(&[id], &[(&ep.reg.domain, &ep.reg.name)]);
        inner.remove(id);
        inner.insert(Arc::clone(ep));
        inner.made(&mut change);
        change
    }

    /// Takes the endpoint of `id` out of the maps, readers still shown it until the
    /// returned change settles.
    fn take_out(inner: &mut Maps, id: &str) -> Option<(Arc<Endpoint>, Change)> {
        let ep = Arc::clone(inner.by_id(id)?);
        let mut change = inner.unsettled(&[id], &[(&ep.reg.domain, &ep.reg.name)]);
        inner.remove(id);
        inner.made(&mut change);
        Some((ep, change))
    }

    /// Waits for the store's removal of each expired endpoint (putting back those it
    /// refused), then counts, logs and tells the listeners.
    async fn finish_expiry(&self, removed: Vec<Removal>) -> Vec<Arc<Endpoint>> {
        let mut expired = Vec::with_capacity(removed.len());
        let mut answered = Vec::with_capacity(removed.len());
        for (ep, d, change) in removed {
            let d = d.await;
            answered.push((change, d.is_ok()));
            match d {
                Ok(()) => expired.push(ep),
                Err(e) => {
                    // Still on disk: it stays registered (and due) until the store
                    // can remove it; the expiry task tries again a second later.
                    crate::store::log_failure(
                        format_args!(
                            "store: cannot remove an expired registration ({})",
                            ep.reg.name
                        ),
                        &e,
                    );
                    let mut inner = self.lock();
                    if self.is_foreign(&ep.reg) {
                        if inner.by_id(&ep.reg.id).is_none()
                            && inner.by_name(&ep.reg.domain, &ep.reg.name).is_none()
                        {
                            inner.insert_foreign(Arc::clone(&ep));
                        }
                    } else {
                        inner.restore(&ep);
                    }
                }
            }
        }
        // Readers are shown the removals now (one lock for the batch), each refused one
        // put back above first.
        {
            let mut inner = self.lock();
            for (change, committed) in answered {
                inner.settle(change, committed);
            }
        }
        for ep in &expired {
            Counters::inc(&self.counters.registrations_expired);
            if log_budget::allow(DeviceLine::Expired) {
                tracing::info!(ep = %ep.reg.name, domain = %ep.reg.domain, id = %ep.reg.id, "registration expired");
            }
        }
        // Told together, each endpoint's listeners in order: the events are queued in
        // the batch's order (each listener queues before it awaits the store) and made
        // durable by one group commit rather than one commit after another.
        futures_util::future::join_all(
            expired
                .iter()
                .map(|ep| self.tell(RegistryEvent::Expired(Arc::clone(ep)))),
        )
        .await;
        expired
    }

    /// Expires the registrations of nodes that left the cluster (issue 22): those of
    /// another node that `live` says is no member now and whose lifetime has passed at
    /// `now_ms`, as their owner would have; removed from the store and told to the
    /// listeners (the expiry event goes to the channels of this node). The caller decides
    /// that this node is the one survivor that does it (`cluster::run_foreign_registrations`:
    /// the live member with the lowest name), so one expiry event is published.
    ///
    /// One step, as [`Registry::expire_batch`]: at most `registry.expiry_batch`, the
    /// earliest first, so that the registrations of a node that held a million are
    /// expired in bounded steps with the daemon serving in between. Returns whether the
    /// step was full and every removal stored (more may be due: the caller goes on at
    /// once), and what it expired.
    pub async fn expire_orphans(
        &self,
        now_ms: u64,
        live: &(dyn Fn(&str) -> bool + Sync),
    ) -> (bool, Vec<Arc<Endpoint>>) {
        let removed = {
            let mut inner = self.lock();
            let due = inner.orphans_due(now_ms, live, self.cfg.expiry_batch);
            self.remove_for_expiry(&mut inner, due)
        };
        let taken = removed.len();
        if taken == 0 {
            return (false, Vec::new());
        }
        let expired = self.finish_expiry(removed).await;
        (
            taken >= self.cfg.expiry_batch && expired.len() == taken,
            expired,
        )
    }

    /// The expiry task: sleeps until the next deadline (or until woken by a change), then
    /// expires what is due in batches of `registry.expiry_batch`, yielding to the other
    /// tasks between two (issue 24: REST and the devices are served meanwhile).
    pub async fn run_expiry(self: Arc<Self>, mut shutdown: Shutdown) {
        loop {
            let next = self.lock().next_deadline();
            let sleep = match next {
                Some(t) => Duration::from_millis(t.saturating_sub(now_ms())),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = shutdown.recv() => return,
                _ = self.expiry_wake.notified() => continue,
                _ = tokio::time::sleep(sleep) => {}
            }
            let now = now_ms();
            loop {
                let (taken, expired) = self.expire_batch(now).await;
                if taken < self.cfg.expiry_batch || expired.len() < taken {
                    break;
                }
                drop(expired);
                tokio::select! {
                    _ = shutdown.recv() => return,
                    _ = tokio::task::yield_now() => {}
                }
            }
            // A removal the store refused left its endpoint due: wait before the next try
            // rather than spin on a failing store.
            let stuck = self.lock().next_deadline().is_some_and(|t| t <= now);
            if stuck {
                tokio::select! {
                    _ = shutdown.recv() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
