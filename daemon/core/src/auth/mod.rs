//! Who is calling the REST API, and what they may do.
//!
//! The core knows [`Principal`]s: a backend's verdict on a credential, with the domain the
//! caller belongs to and the core scopes it holds. Backends are plugins
//! (`[plugins] auth = [...]`, asked in that order by the [`AuthChain`]); the first that
//! recognises the credential decides. A backend that fails (not loaded, panicked, bad
//! answer) fails the request closed with 503: it is never skipped.
//!
//! Architecture invariant: routes never look at headers to authorise; they name the
//! [`Scope`] they need and the router checks it against the principal.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use connectord_plugin_sdk::auth::{
    self as proto, AuthRequest, AuthVerdict, BootstrapRequest, BootstrapResponse, KeyRef, KeyState,
    KeyStatusRequest, KeyStatusResponse, Restriction,
};

use crate::hashing::Map;
use crate::metrics::Counters;

/// The auth backends as the chain asks them: by name, one operation of the SDK's auth
/// protocol (`connectord_plugin_sdk::auth`) at a time, JSON in and JSON out. Implemented
/// by the plugin host (`plugins::HostBackends` in the daemon); the core knows no loader.
pub trait AuthBackends: Send + Sync + 'static {
    /// Moves whenever a backend's state may have changed (a reload, a write through one of
    /// its routes): a verdict reused from another epoch is void.
    fn epoch(&self) -> u64;
    /// Calls `op` of backend `name` with the JSON `input`; the answer's JSON.
    fn call<'a>(&'a self, name: &'a str, op: &'static str, input: Vec<u8>) -> BackendCall<'a>;
}

/// What [`AuthBackends::call`] returns: the boxed future of one backend call.
pub type BackendCall<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, BackendError>> + Send + 'a>>;

/// A backend could not answer (not loaded, failed, panicked, a bad answer); the message
/// names the backend.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

/// File in the state directory that holds the first admin key.
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// What a route needs. A principal with `admin` holds every scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    EndpointsRead,
    ResourcesRead,
    ResourcesWrite,
    SubscriptionsRead,
    SubscriptionsWrite,
    Notifications,
    LimitsRead,
    /// Create keys (`POST /api/api_tokens`) and delete those one created.
    KeysWrite,
    /// Scrape `GET /metrics` (a monitoring system's key), nothing else.
    MetricsRead,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 10] = [
        Scope::EndpointsRead,
        Scope::ResourcesRead,
        Scope::ResourcesWrite,
        Scope::SubscriptionsRead,
        Scope::SubscriptionsWrite,
        Scope::Notifications,
        Scope::LimitsRead,
        Scope::KeysWrite,
        Scope::MetricsRead,
        Scope::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::EndpointsRead => "endpoints:read",
            Scope::ResourcesRead => "resources:read",
            Scope::ResourcesWrite => "resources:write",
            Scope::SubscriptionsRead => "subscriptions:read",
            Scope::SubscriptionsWrite => "subscriptions:write",
            Scope::Notifications => "notifications",
            Scope::LimitsRead => "limits:read",
            Scope::KeysWrite => "keys:write",
            Scope::MetricsRead => "metrics:read",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The backend that recognised the credential.
    pub backend: String,
    /// The backend's id for the credential (never the secret).
    pub key_id: String,
    /// The only domain whose endpoints, subscriptions and events this caller sees.
    pub domain: String,
    /// Core scope names.
    pub scopes: Vec<String>,
    /// Restriction to some endpoints/resources (see the SDK's `PrincipalSpec::allow`).
    pub allow: Option<Vec<String>>,
}

impl Principal {
    /// May this caller touch endpoint `ep` (and, when given, its resource `path`)?
    pub fn may_access(&self, ep: &str, path: Option<&str>) -> bool {
        may_access(self.allow.as_deref(), ep, path)
    }

    /// May this caller act on endpoint `ep` as a whole (de-register it, set its
    /// credentials)? Only a pattern that allows every resource of it does
    /// ([`may_access_whole`]): a key allowed one resource of a device may not remove the
    /// device or replace its PSK.
    pub fn may_access_whole(&self, ep: &str) -> bool {
        may_access_whole(self.allow.as_deref(), ep)
    }

    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes
            .iter()
            .any(|s| s == scope.as_str() || s == Scope::Admin.as_str())
    }
}

/// Does the restriction `allow` (a principal's `allow`: `None` is no restriction) let its
/// key see endpoint `ep` and, when given, its resource `path`? A pattern is
/// `<endpoint glob>[/<resource glob>]`; one without a resource part allows every resource
/// of its endpoints, and an endpoint is visible when any pattern's endpoint glob matches it
/// (its resources then only as far as the patterns allow).
///
/// The REST edge asks it of the caller's verdict; the notification hub asks it of the
/// restriction it recorded for each key's channel, for every event it routes.
pub fn may_access(allow: Option<&[String]>, ep: &str, path: Option<&str>) -> bool {
    use crate::subscriptions::presub::glob;
    let Some(patterns) = allow else {
        return true;
    };
    patterns.iter().any(|p| {
        let (ep_glob, res_glob) = split_pattern(p);
        glob(ep_glob, ep)
            && match (res_glob, path) {
                (Some(r), Some(path)) => glob(r, path),
                _ => true,
            }
    })
}

/// Does the restriction `allow` let its key act on endpoint `ep` as a whole: is there a
/// pattern whose endpoint glob matches `ep` with no resource part, or with the resource
/// part `/*` (which matches every path)?
pub fn may_access_whole(allow: Option<&[String]>, ep: &str) -> bool {
    use crate::subscriptions::presub::glob;
    let Some(patterns) = allow else {
        return true;
    };
    patterns.iter().any(|p| {
        let (ep_glob, res_glob) = split_pattern(p);
        glob(ep_glob, ep) && matches!(res_glob, None | Some("/*"))
    })
}

/// A pattern's endpoint glob and its resource glob (from its first `/` on), if any.
fn split_pattern(p: &str) -> (&str, Option<&str>) {
    match p.split_once('/') {
        Some((e, _)) => (e, Some(&p[e.len()..])),
        None => (p, None),
    }
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// 401: no backend recognised the credential, or one refused it.
    #[error("{0}")]
    Unauthenticated(String),
    /// 503: a backend could not answer.
    #[error("{0}")]
    Unavailable(String),
}

/// The configured auth backends, asked in order.
#[derive(Clone)]
pub struct AuthChain {
    host: Arc<dyn AuthBackends>,
    counters: Arc<Counters>,
    order: Vec<String>,
    reused: Arc<Mutex<Reused>>,
    /// (backend, scope) pairs already logged as unknown: each is logged once.
    unknown_scopes: Arc<Mutex<UnknownScopes>>,
    /// Counts the revocation sweeps ([`crate::revocation::sweep`]): what holds a caller's
    /// credentials for longer than a request (an open WebSocket) checks them again at
    /// each.
    sweeps: Arc<tokio::sync::watch::Sender<u64>>,
}

/// Scope names backends returned that the core does not know ([`Scope::parse`]), so that
/// each (backend, scope) is logged once rather than at every request. Bounded: past
/// [`MAX_UNKNOWN_SCOPES`] pairs nothing new is remembered (or logged), only counted.
#[derive(Default)]
struct UnknownScopes {
    seen: std::collections::HashSet<(String, String)>,
    /// Pairs not remembered because the set was full.
    overflow: u64,
}

/// Most (backend, unknown scope) pairs remembered.
const MAX_UNKNOWN_SCOPES: usize = 256;

impl UnknownScopes {
    /// True the first time `backend` returns the unknown `scope` (and the set has room):
    /// the caller logs it then.
    fn first_seen(&mut self, backend: &str, scope: &str) -> bool {
        if self
            .seen
            .contains(&(backend.to_string(), scope.to_string()))
        {
            return false;
        }
        if self.seen.len() >= MAX_UNKNOWN_SCOPES {
            self.overflow += 1;
            return self.overflow == 1;
        }
        self.seen.insert((backend.to_string(), scope.to_string()))
    }
}

/// Verdicts a backend let the host reuse ([`proto::VerdictCache`]): without them every
/// REST request is a JSON round trip to a plugin's worker thread (about 6 % of the daemon's
/// CPU per proxied read, docs/PERFORMANCE.md).
#[derive(Default)]
struct Reused {
    /// Header-name lists backends asked to be keyed by (few: one per backend at most).
    vary: Vec<Vec<String>>,
    /// Key: the vary list's index, then each header's value (or absence).
    verdicts: Map<String, ReusedVerdict>,
}

struct ReusedVerdict {
    /// Shared with every request it authenticates (cloning a `Principal` allocates).
    principal: Arc<Principal>,
    until: Instant,
    /// [`PluginHost::epoch`] when the backend was asked: any other epoch voids it.
    epoch: u64,
}

/// Longest chain of creators followed ([`AuthChain::check_creators`]); a key minted
/// through more keys than this is refused (it also ends a loop of creators).
pub const MAX_CREATOR_CHAIN: usize = 16;

/// What the backends say of a key id ([`AuthChain::liveness`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// A backend would accept it, and every key up its chain of creators is valid; with
    /// the key's restriction now when the backend says it
    /// (`KeyStatusResponse::restriction`).
    Live(Option<Restriction>),
    /// Revoked, deleted, or one of its creators is: it authenticates no more.
    Dead(String),
    /// A backend could not answer: nothing is concluded.
    CannotTell(String),
}

/// Most reused verdicts kept; past it they are all forgotten (they are cheap to get again).
const MAX_REUSED: usize = 10_000;

/// The key of a request's headers under the vary list `i`; `value` gives a header's
/// value as the backend sees it (see [`header_value`]), by lower-case name.
fn reuse_key<'h>(
    i: usize,
    names: &[String],
    value: impl Fn(&str) -> Option<Cow<'h, str>>,
) -> String {
    let mut k = String::with_capacity(64);
    // `itoa`, not `write!`: this runs for every authenticated request.
    k.push_str(itoa::Buffer::new().format(i));
    for n in names {
        k.push('\0');
        match value(n) {
            Some(v) => {
                k.push('=');
                k.push_str(&v);
            }
            None => k.push('-'),
        }
    }
    k
}

/// The headers as backends get them (`AuthRequest::headers`): by lower-case name, not
/// valid UTF-8 replaced, several values of a name joined with ", " in the order they came.
fn backend_headers(headers: &http::HeaderMap) -> BTreeMap<String, String> {
    let mut hs: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in headers {
        let v = lossy(v.as_bytes()).into_owned();
        hs.entry(k.as_str().to_string())
            .and_modify(|old| {
                old.push_str(", ");
                old.push_str(&v);
            })
            .or_insert(v);
    }
    hs
}

/// A header's value as a backend sees it (the value [`backend_headers`] gives it).
fn header_value<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<Cow<'h, str>> {
    let mut values = headers.get_all(name).iter();
    let first = lossy(values.next()?.as_bytes());
    let mut rest = values.peekable();
    if rest.peek().is_none() {
        return Some(first);
    }
    let mut joined = first.into_owned();
    for v in rest {
        joined.push_str(", ");
        joined.push_str(&lossy(v.as_bytes()));
    }
    Some(Cow::Owned(joined))
}

/// `String::from_utf8_lossy`, with a fast path for valid UTF-8 (nearly every header):
/// the lossy decoder walks a valid value in chunks at several times the cost.
fn lossy(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

impl AuthChain {
    /// Calls `op` of backend `name` with `input` as JSON and reads the answer.
    async fn call_json<I: serde::Serialize, O: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        op: &'static str,
        input: &I,
    ) -> Result<O, BackendError> {
        let bytes =
            serde_json::to_vec(input).map_err(|e| BackendError(format!("plugin {name}: {e}")))?;
        let answer = self.host.call(name, op, bytes).await?;
        serde_json::from_slice(&answer)
            .map_err(|e| BackendError(format!("plugin {name}: bad answer to {op}: {e}")))
    }

    pub fn new(
        host: Arc<dyn AuthBackends>,
        counters: Arc<Counters>,
        order: Vec<String>,
    ) -> AuthChain {
        AuthChain {
            host,
            counters,
            order,
            reused: Arc::default(),
            unknown_scopes: Arc::default(),
            sweeps: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// A revocation sweep ran: the credentials held open are to be checked again.
    pub fn swept(&self) {
        self.sweeps.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Changes at each revocation sweep ([`AuthChain::swept`]).
    pub fn sweeps(&self) -> tokio::sync::watch::Receiver<u64> {
        self.sweeps.subscribe()
    }

    /// Logs (once per backend and scope) the scopes of a verdict the core does not know:
    /// they stay in the principal but match no route, which would otherwise go unseen.
    fn warn_unknown_scopes(&self, backend: &str, scopes: &[String]) {
        if scopes.iter().all(|s| Scope::parse(s).is_some()) {
            return;
        }
        let mut seen = self
            .unknown_scopes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for s in scopes.iter().filter(|s| Scope::parse(s).is_none()) {
            if seen.first_seen(backend, s) {
                if seen.overflow > 0 {
                    tracing::warn!(
                        "auth backend {backend} returned the unknown scope {s:?}; more unknown scopes will not be logged"
                    );
                } else {
                    tracing::warn!(
                        "auth backend {backend} returned the unknown scope {s:?}: it grants nothing (known: {})",
                        Scope::ALL.map(Scope::as_str).join(", ")
                    );
                }
            }
        }
    }

    fn lock_reused(&self) -> std::sync::MutexGuard<'_, Reused> {
        self.reused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A verdict reused for these headers, if one is still valid. Keyed straight from the
    /// request's headers: the map handed to backends is built only when one is asked.
    fn reused(&self, headers: &http::HeaderMap, epoch: u64) -> Option<Arc<Principal>> {
        let r = self.lock_reused();
        let now = Instant::now();
        r.vary.iter().enumerate().find_map(|(i, names)| {
            r.verdicts
                .get(&reuse_key(i, names, |n| header_value(headers, n)))
                .filter(|v| v.epoch == epoch && v.until > now)
                .map(|v| Arc::clone(&v.principal))
        })
    }

    fn keep(
        &self,
        hint: &proto::VerdictCache,
        headers: &BTreeMap<String, String>,
        principal: &Arc<Principal>,
        epoch: u64,
    ) {
        let ttl = hint.ttl_ms.min(proto::MAX_VERDICT_TTL_MS);
        if ttl == 0 || hint.headers.is_empty() {
            return;
        }
        let names: Vec<String> = hint
            .headers
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        let mut r = self.lock_reused();
        let i = match r.vary.iter().position(|v| *v == names) {
            Some(i) => i,
            None => {
                r.vary.push(names.clone());
                r.vary.len() - 1
            }
        };
        if r.verdicts.len() >= MAX_REUSED {
            r.verdicts.clear();
        }
        r.verdicts.insert(
            reuse_key(i, &names, |n| {
                headers.get(n).map(|v| Cow::Borrowed(v.as_str()))
            }),
            ReusedVerdict {
                principal: Arc::clone(principal),
                until: Instant::now() + Duration::from_millis(u64::from(ttl)),
                epoch,
            },
        );
    }

    /// Asks each backend in turn about this request's credentials.
    pub async fn authenticate(
        &self,
        method: &http::Method,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Result<Arc<Principal>, AuthError> {
        // Read before asking: a state change while the backend answers voids the answer.
        let epoch = self.host.epoch();
        if let Some(p) = self.reused(headers, epoch) {
            Counters::inc(&self.counters.auth_reused);
            return Ok(p);
        }
        let hs = backend_headers(headers);
        let req = AuthRequest {
            method: method.to_string(),
            path: path.to_string(),
            headers: hs,
        };
        for (position, name) in self.order.iter().enumerate() {
            let verdict: AuthVerdict = self
                .call_json(name, proto::OP_AUTHENTICATE, &req)
                .await
                .map_err(|e| {
                    tracing::error!("auth backend {name}: {e}");
                    AuthError::Unavailable(format!("auth backend {name} is unavailable"))
                })?;
            match verdict {
                AuthVerdict::NotMine => continue,
                AuthVerdict::Accepted { principal, cache } => {
                    self.warn_unknown_scopes(name, &principal.scopes);
                    if let Some(creator) = principal.creator {
                        self.check_creators(creator).await?;
                    }
                    let p = Arc::new(Principal {
                        backend: name.clone(),
                        key_id: principal.key_id,
                        domain: principal.domain,
                        scopes: principal.scopes,
                        allow: principal.allow,
                    });
                    // Only the first backend's verdicts are reused. A later backend's verdict
                    // is keyed by the headers *it* names, but the backends before it said
                    // not_mine on the strength of other headers: a request with the same
                    // key and, say, an `ApiRdKey` added would be theirs to decide, and a
                    // reused verdict would skip them.
                    if let Some(hint) = cache.as_ref().filter(|_| position == 0) {
                        self.keep(hint, &req.headers, &p, epoch);
                    }
                    return Ok(p);
                }
                AuthVerdict::Refused { reason } => return Err(AuthError::Unauthenticated(reason)),
            }
        }
        Err(AuthError::Unauthenticated(
            "missing or unknown credentials: send Authorization: Bearer <access key>, or the credentials of another configured auth backend".into(),
        ))
    }

    /// Follows a minted key's chain of creators ([`proto::PrincipalSpec::creator`]): each
    /// must be [`KeyState::Active`] in its backend ([`proto::OP_KEY_STATUS`]), else the key
    /// is refused (401) — a key dies with the key that minted it, whichever backend holds
    /// either. Checking here rather than spreading revocations to the minted keys keeps no
    /// second copy of a revocation that a crash or another process could lose, and costs
    /// nothing for most requests: the verdict is reused as any other, and every state
    /// change of any plugin (a revocation included) voids the reused verdicts. A backend
    /// that cannot answer fails the request closed (503).
    async fn check_creators(&self, first: KeyRef) -> Result<(), AuthError> {
        let mut next = Some(first);
        for _ in 0..MAX_CREATOR_CHAIN {
            let Some(creator) = next else {
                return Ok(());
            };
            // A key of a backend no longer in `[plugins] auth` authenticates no more: nor
            // does what it minted.
            if !self.order.contains(&creator.backend) {
                return Err(AuthError::Unauthenticated(format!(
                    "this key was created by key {} of auth backend {}, which is not configured",
                    creator.key_id, creator.backend
                )));
            }
            let status = self.key_status(&creator).await.map_err(|e| {
                tracing::error!(
                    "auth backend {}: cannot check key {}, which minted the presented key: {e}",
                    creator.backend,
                    creator.key_id
                );
                AuthError::Unavailable(format!(
                    "auth backend {} cannot tell whether the key that created this key is still valid",
                    creator.backend
                ))
            })?;
            match status.status {
                KeyState::Active => next = status.creator,
                KeyState::Revoked | KeyState::Unknown => {
                    return Err(AuthError::Unauthenticated(format!(
                        "this key was created by key {} ({}), which is revoked or deleted",
                        creator.key_id, creator.backend
                    )));
                }
            }
        }
        Err(AuthError::Unauthenticated(format!(
            "this key was created through more than {MAX_CREATOR_CHAIN} keys"
        )))
    }

    async fn key_status(&self, key: &KeyRef) -> Result<KeyStatusResponse, BackendError> {
        self.call_json(
            &key.backend,
            proto::OP_KEY_STATUS,
            &KeyStatusRequest {
                key_id: key.key_id.clone(),
            },
        )
        .await
    }

    /// Whether the key `key_id` (of whichever configured backend knows it) still
    /// authenticates, its creators included. For the host's sweep of the notification
    /// channels of revoked keys: channels know their key's id, not its backend.
    pub async fn liveness(&self, key_id: &str) -> Liveness {
        let mut revoked = None;
        let mut failed = None;
        for name in &self.order {
            let key = KeyRef {
                backend: name.clone(),
                key_id: key_id.to_string(),
            };
            match self.key_status(&key).await {
                Ok(s) if s.status == KeyState::Active => {
                    return match s.creator {
                        None => Liveness::Live(s.restriction),
                        Some(c) => match self.check_creators(c).await {
                            Ok(()) => Liveness::Live(s.restriction),
                            Err(AuthError::Unauthenticated(why)) => Liveness::Dead(why),
                            Err(AuthError::Unavailable(why)) => Liveness::CannotTell(why),
                        },
                    };
                }
                Ok(s) if s.status == KeyState::Revoked => {
                    revoked = Some(format!("revoked in auth backend {name}"));
                }
                Ok(_) => {}
                Err(e) => failed = Some(e.to_string()),
            }
        }
        match (revoked, failed) {
            (Some(why), _) => Liveness::Dead(why),
            (None, Some(why)) => Liveness::CannotTell(why),
            (None, None) => Liveness::Dead("no auth backend knows it".into()),
        }
    }

    /// At start: lets each backend create a first admin credential for `domain` if it has
    /// none. The first one created is written to `admin.key` in the state directory,
    /// readable by the daemon's user only; returns that path.
    pub async fn bootstrap(
        &self,
        state_dir: &Path,
        domain: &str,
    ) -> Result<Option<PathBuf>, std::io::Error> {
        self.bootstrap_to(state_dir, ADMIN_KEY_FILE, domain).await
    }

    /// [`AuthChain::bootstrap`], the key written to `file` in `state_dir` (a cluster node
    /// whose `admin.key` belongs to another state, see the daemon's `cluster` module).
    pub async fn bootstrap_to(
        &self,
        state_dir: &Path,
        file: &str,
        domain: &str,
    ) -> Result<Option<PathBuf>, std::io::Error> {
        let req = BootstrapRequest {
            domain: domain.to_string(),
        };
        for name in &self.order {
            let resp: BootstrapResponse =
                match self.call_json(name, proto::OP_BOOTSTRAP, &req).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!("auth backend {name}: no bootstrap ({e})");
                        continue;
                    }
                };
            if let Some(key) = resp.created {
                let path = state_dir.join(file);
                write_private(&path, &format!("{key}\n"))?;
                return Ok(Some(path));
            }
        }
        Ok(None)
    }
}

/// Writes a new file readable by its owner only. Never an existing one: an `admin.key`
/// already there is the operator's (the start-up check refuses the state that used to
/// overwrite it), so finding one here is an error.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "{}: {e} (an existing key is never overwritten)",
                    path.display()
                ),
            )
        })?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The core's scopes are the SDK's, in its canonical order (plugins grant them by name).
    #[test]
    fn core_scopes_are_the_sdks() {
        assert_eq!(
            Scope::ALL.map(Scope::as_str),
            connectord_plugin_sdk::auth::SCOPES
        );
    }

    #[test]
    fn access_patterns() {
        let p = |allow: Option<Vec<&str>>| Principal {
            backend: "t".into(),
            key_id: "k".into(),
            domain: "d".into(),
            scopes: vec![],
            allow: allow.map(|v| v.into_iter().map(String::from).collect()),
        };
        let open = p(None);
        assert!(open.may_access("x", Some("/1/2")));
        let some = p(Some(vec!["sensor-*", "lamp-1/3311/*"]));
        let table = [
            ("sensor-9", None, true),
            ("sensor-9", Some("/3/0/0"), true),
            ("lamp-1", None, true),
            ("lamp-1", Some("/3311/0/5850"), true),
            ("lamp-1", Some("/3/0/0"), false),
            ("lamp-2", None, false),
            ("other", Some("/3311/0/5850"), false),
        ];
        for (ep, path, want) in table {
            assert_eq!(some.may_access(ep, path), want, "{ep} {path:?}");
        }
    }

    #[test]
    fn unknown_scopes_are_reported_once_each_and_boundedly() {
        let mut u = UnknownScopes::default();
        assert!(u.first_seen("a", "things:read"));
        assert!(!u.first_seen("a", "things:read"));
        assert!(u.first_seen("b", "things:read"));
        for i in 2..MAX_UNKNOWN_SCOPES {
            assert!(u.first_seen("a", &format!("s{i}")));
        }
        // Full: the first pair past the bound is reported (to say so), no later one.
        assert!(u.first_seen("a", "one-more"));
        assert!(!u.first_seen("a", "two-more"));
        assert!(!u.first_seen("a", "things:read"));
        assert_eq!(u.seen.len(), MAX_UNKNOWN_SCOPES);
    }

    /// A reused verdict is looked up by a key made from the request's headers directly,
    /// and stored under one made from the headers the backend got: the two must agree,
    /// duplicate, non-UTF-8 and absent headers included.
    #[test]
    fn reuse_keys_from_the_request_and_from_the_backend_headers_agree() {
        use http::header::{HeaderMap, HeaderName, HeaderValue};
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer k1"));
        h.append("x-key", HeaderValue::from_static("a"));
        h.append("x-key", HeaderValue::from_bytes(b"b\xff").unwrap());
        h.append(
            HeaderName::from_static("x-key"),
            HeaderValue::from_static("c"),
        );
        // The last two are not valid header names: absent on both sides.
        let names: Vec<String> = ["authorization", "x-key", "apirdkey", "x key", ""]
            .map(String::from)
            .to_vec();
        let given = backend_headers(&h);
        assert_eq!(given["x-key"], "a, b\u{fffd}, c");
        let stored = reuse_key(3, &names, |n| {
            given.get(n).map(|v| Cow::Borrowed(v.as_str()))
        });
        let looked_up = reuse_key(3, &names, |n| header_value(&h, n));
        assert_eq!(stored, looked_up);
        assert_eq!(looked_up, "3\0=Bearer k1\0=a, b\u{fffd}, c\0-\0-\0-");
        // Another credential is another key.
        h.insert("authorization", HeaderValue::from_static("Bearer k2"));
        assert_ne!(reuse_key(3, &names, |n| header_value(&h, n)), stored);
    }
}
