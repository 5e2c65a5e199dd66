//! Requests from applications to devices (seed 000, "Resources"): read, write, execute,
//! delete, answered with an async-response id and delivered later as an
//! `async-responses` event on the asking key's channel.
//!
//! One request is in flight per endpoint (CoAP NSTART 1); others wait in a bounded
//! per-endpoint queue (`requests.queue_len`, 429 beyond). Every accepted request is stored
//! before its id is returned and removed once its answer is an event, so a crash loses
//! none: on start, stored requests are queued again. Queue-mode endpoints (`b=UQ`) get
//! their requests when they next send a registration update; a full registration, a
//! de-registration or an expiry cancels what is queued with a 410 async response.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine;
use coap_lite::{RequestType, ResponseType};

use crate::auth::Principal;
use crate::coap::client::{ClientError, CoapReply, ObserveStream, OutRequest};
use crate::coap::content_format;
use crate::config::RequestsConfig;
use crate::events::{AsyncResponse, Entry, Event, Hub};
use crate::hashing::Map;
use crate::log_budget::{self, DeviceLine};
use crate::metrics::Counters;
use crate::registry::{Directory, Endpoint, RegistryEvent, RegistryListener, now_ms};
use crate::store::{Store, StoreError};
use connectord_model::ListenerKind;
pub use connectord_model::{DeviceRequestTerms, Job, Method};
pub use device::{CoapDevices, DeviceClient};

mod device;

/// CoAP's default Max-Age when a response carries none (RFC 7252 §5.10.5).
pub const DEFAULT_MAX_AGE: u32 = 60;

/// A device-request's terms: its options with Pelion's defaults for an endpoint in queue
/// mode or not, the expiry counted from `now_ms`.
fn terms(o: &DeviceRequestOpts, queue_mode: bool, now_ms: u64) -> DeviceRequestTerms {
    let (retry, expiry_s) = if queue_mode {
        (DEFAULT_RETRY_QUEUE_MODE, DEFAULT_EXPIRY_S_QUEUE_MODE)
    } else {
        (DEFAULT_RETRY, DEFAULT_EXPIRY_S)
    };
    DeviceRequestTerms {
        expires_ms: now_ms.saturating_add(o.expiry_s.unwrap_or(expiry_s).saturating_mul(1000)),
        retry: o.retry.unwrap_or(retry),
    }
}

/// The refusal of a device-request whose async-id is in use (409).
fn async_id_conflict(id: &str) -> RequestError {
    RequestError::Conflict(format!(
        "async-id {id:?} is already in use by a request not yet answered"
    ))
}

/// The CoAP method of a request.
fn coap_method(m: Method) -> RequestType {
    {
        match m {
            Method::Get | Method::Observe => RequestType::Get,
            Method::Put => RequestType::Put,
            Method::Post => RequestType::Post,
            Method::Delete => RequestType::Delete,
        }
    }
}

/// How many observation reports may wait for the subscriptions manager (see
/// [`observation_reports`]). Each report is awaited by the request worker that made it
/// (one per endpoint at a time), so this bounds the endpoints waiting at once, not the
/// work.
pub const OBSERVATION_REPORTS: usize = 256;

/// What the request layer reports to the subscriptions manager about an observe request
/// it executed, through the channel of [`observation_reports`]. The request worker waits
/// for `done` before it publishes the job's async response, so the manager has taken the
/// observation (or ended the subscriptions to it) by then, as when it was called directly.
pub enum ObservationReport {
    /// An observation of `job.path` on `ep` is established; `first` is the device's first
    /// response. Dropping `stream` cancels it. For a job with an async response (not
    /// internal), the manager holds the stream's notifications until that response is
    /// published: it sends, before `done`, what to run then ([`AfterAnswer`]), so that no
    /// newer value reaches a channel before the first.
    Established {
        job: Job,
        ep: Endpoint,
        first: CoapReply,
        stream: ObserveStream,
        after_answer: tokio::sync::oneshot::Sender<AfterAnswer>,
        done: tokio::sync::oneshot::Sender<()>,
    },
    /// The device answered the observe of `job.path` with an error, or without Observe:
    /// the subscriptions to it end, visibly.
    Refused {
        job: Job,
        ep: Endpoint,
        status: u16,
        reason: String,
        done: tokio::sync::oneshot::Sender<()>,
    },
}

/// What the subscriptions manager runs once an observe job's async response is published
/// (or the job ends without one): it hands the held notifications of the observation to
/// the feed. Run when dropped, so that an outcome dropped on any path still hands them
/// over.
pub struct AfterAnswer(Option<Box<dyn FnOnce() + Send>>);

impl AfterAnswer {
    pub fn new(f: impl FnOnce() + Send + 'static) -> AfterAnswer {
        AfterAnswer(Some(Box::new(f)))
    }
}

impl Drop for AfterAnswer {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// The sending side of the observation reports, held by the request layer.
#[derive(Clone)]
pub struct ObservationReporter {
    tx: tokio::sync::mpsc::Sender<ObservationReport>,
}

/// The receiving side, handed to the subscriptions manager, whose task owns it
/// (`Subscriptions::run_reports`).
pub struct ObservationReports(pub tokio::sync::mpsc::Receiver<ObservationReport>);

/// The channel from the request layer to the subscriptions manager: the request layer is
/// built first with the sender, the manager after it with the receiver, so neither refers
/// back to the other. Bounded ([`OBSERVATION_REPORTS`]); when it is full the reporting
/// request worker waits for room (only that endpoint's queue waits; counted in
/// `observation_reports_waited`). Decision: wait rather than drop, since a dropped report
/// would lose an observation (its stream cancelled, the subscription silent until the next
/// registration) or a subscription error without anyone learning of it.
pub fn observation_reports(capacity: usize) -> (ObservationReporter, ObservationReports) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
    (ObservationReporter { tx }, ObservationReports(rx))
}

impl ObservationReporter {
    /// Sends a report (waiting for room when the channel is full) and waits until the
    /// manager has handled it. Without a manager (its task stopped: shutdown) the report is
    /// dropped, which cancels an established observation; false then.
    async fn report(
        &self,
        counters: &Counters,
        make: impl FnOnce(tokio::sync::oneshot::Sender<()>) -> ObservationReport,
    ) -> bool {
        let (done, handled) = tokio::sync::oneshot::channel();
        let report = make(done);
        let sent = match self.tx.try_send(report) {
            Ok(()) => true,
            Err(tokio::sync::mpsc::error::TrySendError::Full(report)) => {
                Counters::inc(&counters.observation_reports_waited);
                self.tx.send(report).await.is_ok()
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
        };
        sent && handled.await.is_ok()
    }
}

/// The representation an application wants a read answered in (its `Accept` header).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Want {
    /// No preference: the device's answer as it comes, except that a single-resource
    /// read of an LwM2M client asks for `text/plain` (what mbed applications expect),
    /// falling back to what the device gives.
    #[default]
    Any,
    /// This CoAP Content-Format, asked of the device with the Accept option.
    Format(u16),
    /// `application/json`: the answer decoded into a JSON value tree, whatever the device
    /// sent (see [`crate::lwm2m_data`]).
    Json,
}

/// What the application asked for.
#[derive(Debug, Clone, Default)]
pub struct Submit {
    pub method: Option<Method>,
    pub path: String,
    pub payload: Vec<u8>,
    pub content_format: Option<u16>,
    /// The representation wanted for a read.
    pub want: Want,
    /// `noResp=true`: a NON request, nothing comes back.
    pub no_resp: bool,
    /// `cacheOnly=true`: answer from the cache or not at all.
    pub cache_only: bool,
    /// Made through `POST /v2/device-requests/{device-id}` (issue 23).
    pub device_request: Option<DeviceRequestOpts>,
}

/// The query parameters of `POST /v2/device-requests/{device-id}` (Pelion's Connect API),
/// checked by the REST layer; the defaults are applied at [`Requests::submit`], where the
/// endpoint's queue mode is known.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceRequestOpts {
    /// The client's `async-id`: the id of the request and of its async response.
    pub async_id: String,
    /// `retry`; default [`DEFAULT_RETRY`] or, for a queue-mode endpoint,
    /// [`DEFAULT_RETRY_QUEUE_MODE`].
    pub retry: Option<u32>,
    /// `expiry-seconds`; default [`DEFAULT_EXPIRY_S`] or, for a queue-mode endpoint,
    /// [`DEFAULT_EXPIRY_S_QUEUE_MODE`].
    pub expiry_s: Option<u64>,
}

/// Pelion's defaults for `retry` and `expiry-seconds`: no retry and 2 hours for an endpoint
/// that is always reachable, 2 retries and 3 days for one in queue mode.
pub const DEFAULT_RETRY: u32 = 0;
pub const DEFAULT_RETRY_QUEUE_MODE: u32 = 2;
pub const DEFAULT_EXPIRY_S: u64 = 2 * 3600;
pub const DEFAULT_EXPIRY_S_QUEUE_MODE: u64 = 3 * 24 * 3600;

/// The `error` of the async response of a device-request whose `expiry-seconds` passed
/// before the device answered (status 504), as Pelion names it.
pub const REQUEST_EXPIRED: &str = "REQUEST_EXPIRED";

/// The synchronous answer to a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Submitted {
    /// 202 with this async-response id.
    Accepted(String),
    /// 204: a NON request was sent.
    Sent,
    /// 200 from the cache.
    Cached {
        payload: Vec<u8>,
        content_format: Option<u16>,
    },
}

/// Why a request was refused at once (each maps to a status of the seed's table).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// 410: no such endpoint registered.
    #[error("endpoint not found")]
    Gone,
    /// 404: the endpoint does not list the resource.
    #[error("resource {0} is not found on the endpoint")]
    NotFound(String),
    /// 409: queue-mode endpoint and `noResp=true`.
    #[error("{0}")]
    Conflict(String),
    /// 429: the endpoint's request queue is full.
    #[error("the endpoint already has {0} requests waiting")]
    TooMany(usize),
    /// 503: the endpoint cannot be reached now.
    #[error("{0}")]
    Unavailable(String),
    /// 429: the domain's transaction quota is used up.
    #[error("{0}")]
    OverQuota(String),
    /// 205: `cacheOnly=true` and nothing fresh is cached.
    #[error("no cached value")]
    NoCache,
    /// 502: the cached value cannot be decoded into the JSON asked for.
    #[error("{0}")]
    Undecodable(String),
    /// 400: a JSON body that cannot be encoded for the device.
    #[error("{0}")]
    BadBody(String),
    /// 400: a resource path that does not fit a CoAP request ([`MAX_PATH_BYTES`]).
    #[error("{0}")]
    BadPath(String),
    /// 503: another cluster node owns the endpoint and the request could not be handed to
    /// it here (no forwarder, or a forwarded request reached a node that no longer owns
    /// the endpoint).
    #[error("endpoint {ep} is served by cluster node {owner}")]
    Elsewhere { ep: String, owner: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone)]
struct Cached {
    payload: Vec<u8>,
    content_format: Option<u16>,
    until: Instant,
}

/// One resource's place in the value cache, shared with the observation that fills it
/// (issue 24: a notification puts its value without looking the resource up in three
/// maps, which was about 7 % of the daemon's CPU under a stream of notifications from
/// 1200 devices: cold memory for each). Detached when its endpoint's values are
/// forgotten: whoever holds it looks the resource up again ([`Requests::cache_put_at`]).
#[derive(Debug, Default)]
pub struct CacheSlot(Mutex<SlotState>);

#[derive(Debug, Default)]
struct SlotState {
    value: Option<Cached>,
    detached: bool,
}

impl CacheSlot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts the value; false (nothing put) when the slot is detached.
    fn put(&self, payload: &[u8], content_format: Option<u16>, until: Instant) -> bool {
        let mut st = self.lock();
        if st.detached {
            return false;
        }
        match st.value.as_mut() {
            Some(c) => {
                c.payload.clear();
                c.payload.extend_from_slice(payload);
                c.content_format = content_format;
                c.until = until;
            }
            None => {
                st.value = Some(Cached {
                    payload: payload.to_vec(),
                    content_format,
                    until,
                })
            }
        }
        true
    }
}

/// The last value read or notified of each resource: domain → endpoint → path, so that
/// the lookup and the update made for every read borrow their strings (keys are only
/// allocated for a resource's first value) and an endpoint's values go at once.
#[derive(Default)]
struct ValueCache(Map<String, Map<String, Map<String, Arc<CacheSlot>>>>);

impl ValueCache {
    fn get(&self, domain: &str, ep: &str, path: &str) -> Option<Cached> {
        self.0.get(domain)?.get(ep)?.get(path)?.lock().value.clone()
    }

    /// `f` of the resource's slot, made (empty) if it has none.
    fn with_slot<R>(
        &mut self,
        (domain, ep, path): (&str, &str, &str),
        f: impl FnOnce(&Arc<CacheSlot>) -> R,
    ) -> R {
        let eps = match self.0.get_mut(domain) {
            Some(eps) => eps,
            None => self.0.entry(domain.to_string()).or_default(),
        };
        let paths = match eps.get_mut(ep) {
            Some(paths) => paths,
            None => eps.entry(ep.to_string()).or_default(),
        };
        match paths.get(path) {
            Some(slot) => f(slot),
            None => f(paths.entry(path.to_string()).or_default()),
        }
    }

    /// The resource's slot, made (empty) if it has none.
    fn slot(&mut self, domain: &str, ep: &str, path: &str) -> Arc<CacheSlot> {
        self.with_slot((domain, ep, path), Arc::clone)
    }

    fn put(
        &mut self,
        domain: &str,
        ep: &str,
        path: &str,
        payload: &[u8],
        content_format: Option<u16>,
        until: Instant,
    ) {
        // A slot in the map is never detached: detaching takes it out.
        self.with_slot((domain, ep, path), |slot| {
            slot.put(payload, content_format, until)
        });
    }

    /// Clears the values at or below `path` (a resource the device deleted); the slots
    /// stay, so an observation holding one keeps its place.
    fn forget_below(&self, domain: &str, ep: &str, path: &str) {
        let Some(paths) = self.0.get(domain).and_then(|eps| eps.get(ep)) else {
            return;
        };
        for (p, slot) in paths {
            if crate::registry::is_at_or_below(p, path) {
                slot.lock().value = None;
            }
        }
    }

    fn forget_endpoint(&mut self, domain: &str, ep: &str) {
        if let Some(eps) = self.0.get_mut(domain) {
            if let Some(paths) = eps.remove(ep) {
                for slot in paths.values() {
                    let mut st = slot.lock();
                    st.detached = true;
                    st.value = None;
                }
            }
            if eps.is_empty() {
                self.0.remove(domain);
            }
        }
    }
}

/// See [`Requests::cache_put_at`].
fn put_at(
    cache: &Mutex<ValueCache>,
    slot: &mut Arc<CacheSlot>,
    (domain, ep, path): (&str, &str, &str),
    payload: &[u8],
    ct: Option<u16>,
    until: Instant,
) -> bool {
    if slot.put(payload, ct, until) {
        return false;
    }
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    let fresh = cache.slot(domain, ep, path);
    fresh.put(payload, ct, until);
    *slot = fresh;
    true
}

#[derive(Default)]
struct EpQueue {
    /// A worker is running for this endpoint.
    busy: bool,
    jobs: VecDeque<Job>,
    /// Places in `jobs` held by submits between their queue check and their queueing
    /// ([`Place`]): they count against `requests.queue_len` as queued jobs do.
    reserved: usize,
    /// Ends the request in flight (its worker answers it 410 with the reason sent).
    in_flight: Option<tokio::sync::oneshot::Sender<String>>,
    /// The path of the observe request in flight, if the request in flight is one, and
    /// where it went: until its worker is done with it (the subscriptions manager has
    /// taken its outcome by then), the resource counts as being observed, and the daemon's
    /// own observe of it ([`Requests::observe_internal`]) is not queued a second time,
    /// unless the device has since spoken from another address (the one in flight goes
    /// where the device no longer is).
    observing: Option<(String, crate::peer::PeerRef)>,
}

type EpKey = (String, String);

/// A submit's place in its endpoint's queue ([`EpQueue::reserved`]), and the
/// device-request async-id it took, both given back when it is dropped without being
/// taken (the request was refused, its store write failed, or the submit was cancelled:
/// before, a cancelled device-request kept its async-id, refused with 409 until restart).
/// It owns the endpoint's key, which the submit takes back once the job is queued.
struct Place<'a> {
    requests: &'a Requests,
    key: EpKey,
    held: bool,
    /// (domain, async-id) of a device-request, tracked in `Requests::pending_ids`.
    tracked: Option<(String, String)>,
}

impl Place<'_> {
    /// Holds a place in `key`'s queue unless `requests.queue_len` are waiting (or hold
    /// theirs); the count waiting otherwise. One lookup and no copy of the key when the
    /// endpoint has a queue entry (an endpoint with requests in progress).
    fn hold(requests: &Requests, key: EpKey) -> Result<Place<'_>, usize> {
        let limit = requests.cfg.queue_len;
        let mut q = requests.lock();
        match q.get_mut(&key) {
            Some(e) => {
                let waiting = e.jobs.len() + e.reserved;
                if waiting >= limit {
                    return Err(waiting);
                }
                e.reserved += 1;
            }
            None => {
                if limit == 0 {
                    return Err(0);
                }
                let e = EpQueue {
                    reserved: 1,
                    ..EpQueue::default()
                };
                q.insert(key.clone(), e);
            }
        }
        Ok(Place {
            requests,
            key,
            held: true,
            tracked: None,
        })
    }

    /// The job is queued in `e` (under the lock): its place is its own now, and the key
    /// is the caller's.
    fn taken(mut self, e: &mut EpQueue) -> EpKey {
        self.tracked = None;
        if std::mem::take(&mut self.held) {
            e.reserved = e.reserved.saturating_sub(1);
        }
        std::mem::take(&mut self.key)
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.tracked.take() {
            self.requests.give_back_id(&id);
        }
        if !std::mem::take(&mut self.held) {
            return;
        }
        let mut q = self.requests.lock();
        if let Some(e) = q.get_mut(&self.key) {
            e.reserved = e.reserved.saturating_sub(1);
            // An entry made only to hold the place goes, as a worker's empty one does.
            if e.reserved == 0 && e.jobs.is_empty() && !e.busy && e.in_flight.is_none() {
                q.remove(&self.key);
            }
        }
    }
}

/// The request queues and the resource value cache.
pub struct Requests {
    directory: Arc<Directory>,
    devices: Arc<dyn DeviceClient>,
    hub: Arc<Hub>,
    store: Arc<dyn Store>,
    cfg: RequestsConfig,
    counters: Arc<Counters>,
    queues: Mutex<Map<EpKey, EpQueue>>,
    cache: Mutex<ValueCache>,
    /// Where the outcomes of observe requests go: the subscriptions manager's channel
    /// (see [`observation_reports`]).
    observations: ObservationReporter,
    /// Counts outgoing requests against the domains' quotas (none in unit tests).
    limits: Option<Arc<crate::limits::Limits>>,
    /// See [`RequestsDeps::node`].
    node: Option<String>,
    /// See [`RequestsDeps::forwarder`].
    forwarder: Option<Arc<dyn crate::forward::Forwarder>>,
    /// See [`RequestsDeps::registry`].
    registry: std::sync::Weak<crate::registry::Registry>,
    /// The `async-id`s of the device-requests (issue 23) this node holds unanswered, by
    /// domain: a second request with one of them is refused (409) until the first is
    /// answered. Each with its expiry's timer ([`Requests::schedule_expiry`]) once it
    /// has one, stopped when the id is given back: an id used again once answered has
    /// its own expiry (an outside review found the first request's timer, still
    /// running, expiring the second at the first's deadline), and an answered request's
    /// timer does not stay for the rest of its expiry (2 h, 3 days in queue mode).
    pending_ids: Mutex<Map<(String, String), Option<tokio::task::AbortHandle>>>,
}

/// A fresh async-response id: a number and a random (version 4) UUID, as the seed's
/// examples show.
fn new_async_id() -> String {
    async_id_from(uuid::Builder::from_random_bytes(rand::random()).into_uuid())
}

/// The async-response id of a UUID: `{its first four bytes as a number >> 1}#{the UUID,
/// lower-case and hyphenated}`. One allocation: `format!` made it about 3 500
/// instructions, once for every request (callgrind).
fn async_id_from(u: uuid::Uuid) -> String {
    let b = u.as_bytes();
    // At most 10 digits, '#', 36 of the UUID.
    let mut id = String::with_capacity(47);
    id.push_str(itoa::Buffer::new().format(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) >> 1));
    id.push('#');
    id.push_str(
        u.hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer()),
    );
    id
}

/// Whether `id` has the form of the ids [`new_async_id`] makes: 1 to 10 digits, `#`, a
/// lower-case hyphenated UUID. A device-request's client-chosen id of this form is
/// refused, since only device-requests' ids are checked for uniqueness.
pub fn is_made_async_id(id: &str) -> bool {
    let Some((n, u)) = id.split_once('#') else {
        return false;
    };
    (1..=10).contains(&n.len())
        && n.bytes().all(|b| b.is_ascii_digit())
        && u.len() == 36
        && uuid::Uuid::try_parse(u).is_ok_and(|p| p.hyphenated().to_string() == u)
}

/// True when the endpoint's registration lists `path`, one of its parents, or one of its
/// children (LwM2M devices register objects and instances, not every resource).
pub fn resource_known(ep: &Endpoint, path: &str) -> bool {
    let want = path.as_bytes();
    ep.path_bytes().any(|have| related(want, have))
}

/// True when both paths have segments and the shorter one's are the first of the other's
/// (`/3/0` and `/3/0/1`, `//3` and `/3`): empty segments are none. One pass over the
/// bytes with no iterator state: this runs for each link of the endpoint on every request
/// (with the `char` split of the links it replaced, `resource_known` cost about 1 100
/// instructions a request of the bench's; about 550 now, callgrind).
fn related(want: &[u8], have: &[u8]) -> bool {
    let (mut i, mut j, mut seen) = (0, 0, false);
    loop {
        while want.get(i) == Some(&b'/') {
            i += 1;
        }
        while have.get(j) == Some(&b'/') {
            j += 1;
        }
        if i == want.len() || j == have.len() {
            return seen;
        }
        let (wi, hj) = (i, j);
        while i < want.len() && want[i] != b'/' {
            i += 1;
        }
        while j < have.len() && have[j] != b'/' {
            j += 1;
        }
        if want[wi..i] != have[hj..j] {
            return false;
        }
        seen = true;
    }
}

/// The non-empty segments of a resource path. Split as bytes ('/' is one byte in UTF-8):
/// `str::split` searches each short segment with a char searcher at several times the
/// cost, and these run for every REST request on a resource.
fn segments(path: &str) -> impl Iterator<Item = &[u8]> {
    path.as_bytes()
        .split(|b| *b == b'/')
        .filter(|s| !s.is_empty())
}

/// The most bytes a request's Uri-Path options may take: each segment's bytes and its
/// option header (one byte, two from 13 bytes on).
///
/// Decision: a request goes out in one datagram of at most 1 280 bytes (coap-lite's
/// `Packet::MAX_SIZE`; RFC 7252 §4.6), or block-wise with blocks of up to 1 024 bytes
/// (`coap.block_size`). With the header (4), the token (8), the payload marker (1), a
/// full block and the other options a request carries (Observe, Content-Format, Accept,
/// Block1: at most 14 bytes), 229 bytes are left for the path; 224 keeps a margin. A
/// longer path was accepted (202) and then answered 502 "cannot encode the request"
/// (or, with a segment of 256 to about 1 200 bytes, sent as a Uri-Path option longer than
/// the 255 bytes RFC 7252 §5.10 allows). LwM2M and mbed Client paths take a few dozen.
pub const MAX_PATH_BYTES: usize = 224;

/// [`RequestError::BadPath`] for a path whose Uri-Path options exceed [`MAX_PATH_BYTES`].
pub(crate) fn check_path(path: &str) -> Result<(), RequestError> {
    // RFC 3986 §5.2.4 dot-segments: a client resolves them before it splits a URI into
    // Uri-Path options (RFC 7252 §6.4), so none may reach a device; and `/3311/../3/0/0`
    // would pass a key's allow pattern `lamp-1/3311/*` while naming `/3/0/0`.
    if segments(path).any(|seg| seg == b"." || seg == b"..") {
        return Err(RequestError::BadPath(
            "the resource path has a \".\" or \"..\" segment; name the resource itself".into(),
        ));
    }
    let bytes: usize = segments(path)
        .map(|seg| seg.len() + if seg.len() < 13 { 1 } else { 2 })
        .sum();
    if bytes > MAX_PATH_BYTES {
        return Err(RequestError::BadPath(format!(
            "the resource path is too long for a CoAP request: its Uri-Path options take {bytes} bytes, at most {MAX_PATH_BYTES}"
        )));
    }
    Ok(())
}

/// True for a path that names one resource (`/3/0/1`) or resource instance (`/3/0/7/1`).
fn single_resource(path: &str) -> bool {
    let n = segments(path).count();
    n == 3 || n == 4
}

/// Formats that carry their own value types, in the order the daemon asks an LwM2M
/// client for them when an application wants JSON.
const TYPED_FORMATS: [u16; 4] = [110, 112, 11544, 11543];

/// The CoAP Accept option of a read, whether it is the daemon's own choice (dropped if
/// the device refuses it), and whether the answer is decoded into JSON.
fn plan_accept(ep: &Endpoint, method: Method, path: &str, want: Want) -> (Option<u16>, bool, bool) {
    if !matches!(method, Method::Get | Method::Observe) {
        return (None, false, false);
    }
    let text_default = ep.is_lwm2m() && single_resource(path);
    match want {
        Want::Format(cf) => (Some(cf), false, false),
        Want::Any if text_default => (Some(0), true, false),
        Want::Any => (None, false, false),
        Want::Json => {
            let listed = ep.formats();
            match TYPED_FORMATS.iter().find(|f| listed.contains(f)) {
                Some(cf) if ep.is_lwm2m() => (Some(*cf), true, true),
                _ if text_default => (Some(0), true, true),
                _ => (None, false, true),
            }
        }
    }
}

/// The HTTP status an async response reports for a device's CoAP response code.
pub fn http_status(code: ResponseType) -> u16 {
    use ResponseType::*;
    match code {
        Created => 201,
        Deleted | Valid | Changed | Content | Continue => 200,
        BadRequest | BadOption | RequestEntityIncomplete => 400,
        Unauthorized => 401,
        Forbidden => 403,
        NotFound => 404,
        MethodNotAllowed => 405,
        NotAcceptable => 406,
        Conflict => 409,
        PreconditionFailed => 412,
        RequestEntityTooLarge => 413,
        UnsupportedContentFormat => 415,
        UnprocessableEntity => 422,
        TooManyRequests => 429,
        InternalServerError => 500,
        NotImplemented => 501,
        BadGateway | ProxyingNotSupported | HopLimitReached | UnKnown => 502,
        ServiceUnavailable => 503,
        GatewayTimeout => 504,
    }
}

/// A device's CoAP response code as an async response's `error` names it: the code and
/// its RFC name (`4.05 Method Not Allowed`), not the Rust variant (`MethodNotAllowed`)
/// it was written as before.
pub fn coap_code(code: ResponseType) -> &'static str {
    use ResponseType::*;
    match code {
        Created => "2.01 Created",
        Deleted => "2.02 Deleted",
        Valid => "2.03 Valid",
        Changed => "2.04 Changed",
        Content => "2.05 Content",
        Continue => "2.31 Continue",
        BadRequest => "4.00 Bad Request",
        Unauthorized => "4.01 Unauthorized",
        BadOption => "4.02 Bad Option",
        Forbidden => "4.03 Forbidden",
        NotFound => "4.04 Not Found",
        MethodNotAllowed => "4.05 Method Not Allowed",
        NotAcceptable => "4.06 Not Acceptable",
        RequestEntityIncomplete => "4.08 Request Entity Incomplete",
        Conflict => "4.09 Conflict",
        PreconditionFailed => "4.12 Precondition Failed",
        RequestEntityTooLarge => "4.13 Request Entity Too Large",
        UnsupportedContentFormat => "4.15 Unsupported Content-Format",
        UnprocessableEntity => "4.22 Unprocessable Entity",
        TooManyRequests => "4.29 Too Many Requests",
        InternalServerError => "5.00 Internal Server Error",
        NotImplemented => "5.01 Not Implemented",
        BadGateway => "5.02 Bad Gateway",
        ServiceUnavailable => "5.03 Service Unavailable",
        GatewayTimeout => "5.04 Gateway Timeout",
        ProxyingNotSupported => "5.05 Proxying Not Supported",
        HopLimitReached => "5.08 Hop Limit Reached",
        UnKnown => "a response code this daemon does not know",
    }
}

/// The answer to a job, before it becomes an event.
struct Outcome {
    status: u16,
    payload: Vec<u8>,
    content_format: Option<u16>,
    max_age: Option<u32>,
    error: Option<String>,
    /// The Location-Path of a created resource.
    location: Option<String>,
    /// The device was not reached or did not answer (no answer, the socket gone, RST, a
    /// broken transfer): a device-request with retries left is sent again.
    undelivered: bool,
    /// An established observation's held notifications, handed over once this outcome's
    /// async response is published ([`ObservationReport::Established`]).
    after_answer: Option<AfterAnswer>,
}

impl Outcome {
    fn failed(status: u16, error: impl Into<String>) -> Outcome {
        Outcome {
            status,
            payload: Vec::new(),
            content_format: None,
            max_age: None,
            error: Some(error.into()),
            location: None,
            undelivered: false,
            after_answer: None,
        }
    }

    fn undelivered(status: u16, error: impl Into<String>) -> Outcome {
        Outcome {
            undelivered: true,
            ..Outcome::failed(status, error)
        }
    }
}

/// What the request layer is built on.
pub struct RequestsDeps {
    pub directory: Arc<Directory>,
    /// How requests reach devices (the CoAP transport in the daemon).
    pub devices: Arc<dyn DeviceClient>,
    pub hub: Arc<Hub>,
    pub store: Arc<dyn Store>,
    pub counters: Arc<Counters>,
    /// Counts outgoing requests against the domains' quotas (none in unit tests).
    pub limits: Option<Arc<crate::limits::Limits>>,
    /// This cluster node's name (issue 22; `None` on a single node): a request for an
    /// endpoint another node owns goes to `forwarder` (see [`Requests::owner_elsewhere`]).
    pub node: Option<String>,
    /// Hands requests for another node's endpoints to that node (issue 22; `None` on a
    /// single node, where it is never asked, and in unit tests, where such a request is
    /// refused with [`RequestError::Elsewhere`]).
    pub forwarder: Option<Arc<dyn crate::forward::Forwarder>>,
    /// The registry's write service, which removes the links of what a device deleted
    /// ([`crate::registry::Registry::forget_links`]); weak, since the registry's
    /// listeners hold the request layer (`Weak::new()` where there is none).
    pub registry: std::sync::Weak<crate::registry::Registry>,
}

impl Requests {
    pub fn new(
        deps: RequestsDeps,
        cfg: RequestsConfig,
        observations: ObservationReporter,
    ) -> Arc<Requests> {
        let RequestsDeps {
            directory,
            devices,
            hub,
            store,
            counters,
            limits,
            node,
            forwarder,
            registry,
        } = deps;
        Arc::new(Requests {
            directory,
            devices,
            hub,
            store,
            cfg,
            counters,
            queues: Mutex::new(Map::default()),
            cache: Mutex::new(ValueCache::default()),
            observations,
            limits,
            node,
            forwarder,
            registry,
            pending_ids: Mutex::new(Default::default()),
        })
    }

    /// The node that owns `ep` when it is another cluster node (issue 22): the directory
    /// is the cluster's, but only the owner has a session with the device.
    pub fn owner_elsewhere<'e>(&self, ep: &'e Endpoint) -> Option<&'e str> {
        match (&ep.reg.node, &self.node) {
            (Some(owner), Some(me)) if owner != me => Some(owner),
            _ => None,
        }
    }

    /// The forwarder requests for another node's endpoints go to, if any.
    pub fn forwarder(&self) -> Option<&Arc<dyn crate::forward::Forwarder>> {
        self.forwarder.as_ref()
    }

    /// Queues an observe request made by the daemon itself (pre-subscriptions,
    /// re-observing after a re-registration). `awake`: the endpoint has just been heard
    /// from, so even a queue-mode endpoint can be sent to now.
    pub fn observe_internal(self: &Arc<Self>, domain: &str, ep: &str, path: &str, awake: bool) {
        let registered = self.directory.get(domain, ep);
        // Another cluster node's device is observed by its owner (issue 22): this node has
        // no session with it.
        if registered
            .as_ref()
            .is_some_and(|e| self.owner_elsewhere(e).is_some())
        {
            return;
        }
        let queue_mode = registered.as_ref().is_some_and(|e| e.reg.queue);
        let mut job = Job {
            id: new_async_id(),
            key_id: String::new(),
            domain: domain.to_string(),
            ep: ep.to_string(),
            method: Method::Observe,
            path: path.to_string(),
            payload: String::new(),
            content_format: None,
            accept: None,
            accept_fallback: false,
            as_json: false,
            created_ms: now_ms(),
            internal: true,
            device_request: None,
            attempts: 0,
            row: 0,
        };
        if let Some(e) = &registered {
            (job.accept, job.accept_fallback, job.as_json) =
                plan_accept(e, Method::Observe, path, Want::Any);
        }
        let key = (domain.to_string(), ep.to_string());
        {
            let mut q = self.lock();
            let e = q.entry(key.clone()).or_default();
            // The same observation already waiting, or on its way: nothing to add.
            let on_its_way = e.observing.as_ref().is_some_and(|(p, to)| {
                p == path && registered.as_ref().is_some_and(|r| r.reg.peer == *to)
            });
            if on_its_way
                || e.jobs
                    .iter()
                    .any(|j| j.method == Method::Observe && j.path == path)
            {
                return;
            }
            e.jobs.push_back(job);
        }
        if awake || !queue_mode {
            self.kick(&key);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Map<EpKey, EpQueue>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_cache(&self) -> MutexGuard<'_, ValueCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the stored requests again (at start). Those of endpoints that are not in
    /// queue mode are sent at once.
    pub async fn load(self: &Arc<Self>) -> Result<usize, StoreError> {
        // In row order: the order they were accepted in.
        let jobs = self.store.load_requests().await?;
        // On a cluster, the requests of endpoints another node owns are that node's to send
        // (it loads them too); those of unregistered endpoints wait here as on one node.
        let jobs: Vec<Job> = jobs
            .into_iter()
            .filter(|j| {
                self.directory
                    .get(&j.domain, &j.ep)
                    .is_none_or(|e| self.owner_elsewhere(&e).is_none())
            })
            .collect();
        let n = jobs.len();
        let mut keys = Vec::new();
        for j in &jobs {
            self.track_device_request(j);
            if let Some(t) = j.device_request {
                self.schedule_expiry((j.domain.clone(), j.ep.clone()), j.id.clone(), t.expires_ms);
            }
        }
        {
            let mut q = self.lock();
            for j in jobs {
                let key = (j.domain.clone(), j.ep.clone());
                q.entry(key.clone()).or_default().jobs.push_back(j);
                keys.push(key);
            }
        }
        for key in keys {
            if self
                .directory
                .get(&key.0, &key.1)
                .is_some_and(|e| !e.reg.queue)
            {
                self.kick(&key);
            }
        }
        Ok(n)
    }

    /// Handles one REST request on a resource. For an endpoint another cluster node
    /// owns, the request is forwarded to that node (see [`crate::forward`]).
    pub async fn submit(
        self: &Arc<Self>,
        who: &Principal,
        ep_name: &str,
        s: Submit,
    ) -> Result<Submitted, RequestError> {
        self.submit_inner(who, ep_name, s, true).await
    }

    /// [`Requests::submit`] for a request another node forwarded here: never forwarded
    /// again; an endpoint this node does not own (it moved meanwhile) is
    /// [`RequestError::Elsewhere`], naming its owner now.
    pub async fn submit_here(
        self: &Arc<Self>,
        who: &Principal,
        ep_name: &str,
        s: Submit,
    ) -> Result<Submitted, RequestError> {
        self.submit_inner(who, ep_name, s, false).await
    }

    async fn submit_inner(
        self: &Arc<Self>,
        who: &Principal,
        ep_name: &str,
        s: Submit,
        may_forward: bool,
    ) -> Result<Submitted, RequestError> {
        let method = s.method.unwrap_or(Method::Get);
        check_path(&s.path)?;
        let ep = self
            .directory
            .get(&who.domain, ep_name)
            .ok_or(RequestError::Gone)?;
        if let Some(owner) = self.owner_elsewhere(&ep) {
            return match self.forwarder.as_ref().filter(|_| may_forward) {
                Some(f) => f.submit(owner, who, ep_name, s).await,
                None => Err(RequestError::Elsewhere {
                    ep: ep_name.to_string(),
                    owner: owner.to_string(),
                }),
            };
        }
        // A write may create a resource; the others need one the device listed.
        if method != Method::Put && !resource_known(&ep, &s.path) {
            return Err(RequestError::NotFound(s.path));
        }
        // A device-request's async-id in use: refused before anything else is looked at
        // (the id is taken for good further down, once the other checks passed).
        if let Some(o) = &s.device_request
            && self.async_id_taken(&who.domain, &o.async_id)
        {
            return Err(async_id_conflict(&o.async_id));
        }
        let mut s = s;
        if s.content_format == Some(content_format::JSON)
            && let Some((body, cf)) = encode_write(&ep, method, &s.path, &s.payload)?
        {
            s.payload = body;
            s.content_format = Some(cf);
        }
        if s.cache_only && method == Method::Get {
            let cached = match self.lock_cache().get(&who.domain, ep_name, &s.path) {
                Some(c) if c.until > Instant::now() => (c.payload, c.content_format),
                _ => return Err(RequestError::NoCache),
            };
            // A cached value in another format than the one asked for is not what was
            // asked for: 205, so the application asks the device.
            if let Want::Format(cf) = s.want
                && cached.1 != Some(cf)
            {
                return Err(RequestError::NoCache);
            }
            if s.want == Want::Json {
                let payload = to_json_tree(cached.1, &cached.0, &s.path)
                    .map_err(RequestError::Undecodable)?;
                return Ok(Submitted::Cached {
                    payload,
                    content_format: Some(content_format::JSON),
                });
            }
            return Ok(Submitted::Cached {
                payload: cached.0,
                content_format: cached.1,
            });
        }
        // The transaction quota counts requests that go out (seed 000): it is taken only
        // once nothing else refuses this one (503, 409, 429 for a full queue below).
        if !self.devices.reaches(&ep.reg.peer) {
            return Err(RequestError::Unavailable(format!(
                "the endpoint registered through {}, which is no longer bound; it must register again",
                ep.reg.peer.listener.local
            )));
        }
        if s.no_resp {
            if ep.reg.queue {
                return Err(RequestError::Conflict(
                    "noResp=true is not supported for an endpoint in queue mode".into(),
                ));
            }
            if ep.reg.peer.listener.kind == ListenerKind::Tls {
                // Seed 000: "If the underlying protocol does not support non-confirmable
                // requests ... 409 Conflict"; CoAP over TCP/TLS (RFC 8323) has no
                // message types.
                return Err(RequestError::Conflict(
                    "noResp=true is not supported for an endpoint registered over CoAP over TLS (RFC 8323 has no non-confirmable requests)".into(),
                ));
            }
            self.take_quota(who)?;
            let mut req = OutRequest::new(coap_method(method), &s.path);
            req.payload = s.payload;
            req.content_format = s.content_format;
            Counters::inc(&self.counters.device_requests);
            self.devices
                .send_non(&ep.reg, &req)
                .await
                .map_err(|e| RequestError::Unavailable(e.to_string()))?;
            return Ok(Submitted::Sent);
        }
        let (accept, accept_fallback, as_json) = plan_accept(&ep, method, &s.path, s.want);
        let mut job = Job {
            id: new_async_id(),
            key_id: who.key_id.clone(),
            domain: who.domain.clone(),
            ep: ep_name.to_string(),
            method,
            path: s.path,
            payload: base64::engine::general_purpose::STANDARD.encode(&s.payload),
            content_format: s.content_format,
            accept,
            accept_fallback,
            as_json,
            created_ms: now_ms(),
            internal: false,
            device_request: None,
            attempts: 0,
            row: 0,
        };
        if let Some(o) = &s.device_request {
            job.id.clone_from(&o.async_id);
            job.device_request = Some(terms(o, ep.reg.queue, job.created_ms));
        }
        // The queue's place is held from here until the job is queued (or refused below),
        // so that requests submitted at once cannot all pass the bound while each waits
        // for its store write.
        let mut place = Place::hold(self, (job.domain.clone(), job.ep.clone()))
            .map_err(RequestError::TooMany)?;
        // The async-id is taken before anything is stored, so that two concurrent
        // requests with one id cannot both be accepted; given back (by `place`) if the
        // request is refused, its storing fails or the submit is cancelled.
        if job.device_request.is_some() {
            if !self.track_device_request(&job) {
                return Err(async_id_conflict(&job.id));
            }
            place.tracked = Some((job.domain.clone(), job.id.clone()));
        }
        self.take_quota(who)?;
        let stored = match self.hub.ensure_channel(who).await {
            Ok(()) => self.store.put_request(&job).await,
            Err(e) => Err(e),
        };
        job.row = stored?;
        let id = job.id.clone();
        let expiry = job.device_request.map(|t| t.expires_ms);
        // Queued, and the worker claimed as `kick` would, in one critical section.
        let (start, key) = {
            let mut q = self.lock();
            let e = q.entry(place.key.clone()).or_default();
            e.jobs.push_back(job);
            let key = place.taken(e);
            let start = !ep.reg.queue && !e.busy;
            e.busy |= start;
            (start, key)
        };
        if let Some(at) = expiry {
            self.schedule_expiry(key.clone(), id.clone(), at);
        }
        if start {
            self.spawn_worker(key);
        }
        Ok(Submitted::Accepted(id))
    }

    /// Counts one outgoing request against the domain's transaction quota (429 past it).
    /// Taken last before the request is stored or sent; a store that then fails keeps
    /// the count (a rare failure, answered 503).
    fn take_quota(&self, who: &Principal) -> Result<(), RequestError> {
        match self.limits.as_ref() {
            Some(l) => l
                .take(&who.domain)
                .map_err(|e| RequestError::OverQuota(e.to_string())),
            None => Ok(()),
        }
    }

    /// Takes a device-request's async-id for its domain (at submit and when stored ones
    /// are loaded or adopted); false when it is taken already. Other requests: true.
    fn track_device_request(&self, job: &Job) -> bool {
        if job.device_request.is_none() {
            return true;
        }
        match self
            .lock_pending_ids()
            .entry((job.domain.clone(), job.id.clone()))
        {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(None);
                true
            }
        }
    }

    fn lock_pending_ids(
        &self,
    ) -> MutexGuard<'_, Map<(String, String), Option<tokio::task::AbortHandle>>> {
        self.pending_ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a device-request with this async-id waits unanswered in `domain`.
    fn async_id_taken(&self, domain: &str, id: &str) -> bool {
        self.lock_pending_ids()
            .contains_key(&(domain.to_string(), id.to_string()))
    }

    /// Gives a device-request's async-id back (answered, or not stored).
    fn untrack_device_request(&self, job: &Job) {
        if job.device_request.is_some() {
            self.give_back_id(&(job.domain.clone(), job.id.clone()));
        }
    }

    /// Gives the async-id (domain, id) of a device-request back, and stops its expiry's
    /// timer.
    fn give_back_id(&self, id: &(String, String)) {
        if let Some(Some(timer)) = self.lock_pending_ids().remove(id) {
            timer.abort();
        }
    }

    /// Answers the device-request `id` of `key` with [`REQUEST_EXPIRED`] at `expires_ms`
    /// if it still waits in the queue then (one in flight is ended by its worker). Holds
    /// the request layer weakly: a stopped daemon's timers do nothing. The timer is kept
    /// with the id in `pending_ids` and stopped when the id is given back (answered);
    /// an id given back already (answered meanwhile) gets none.
    fn schedule_expiry(self: &Arc<Self>, key: EpKey, id: String, expires_ms: u64) {
        let pending = (key.0.clone(), id.clone());
        let weak = Arc::downgrade(self);
        let wait = Duration::from_millis(expires_ms.saturating_sub(now_ms()));
        let timer = tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if let Some(r) = weak.upgrade() {
                r.expire(&key, &id, expires_ms).await;
            }
        })
        .abort_handle();
        match self.lock_pending_ids().get_mut(&pending) {
            Some(slot) => {
                if let Some(old) = slot.replace(timer) {
                    old.abort();
                }
            }
            None => timer.abort(),
        }
    }

    /// Expires the queued device-request `id` of `key` whose expiry is `expires_ms`
    /// (the one its timer was set for, not a later request with the same id).
    async fn expire(&self, key: &EpKey, id: &str, expires_ms: u64) {
        let job = {
            let mut q = self.lock();
            q.get_mut(key).and_then(|e| {
                let i = e.jobs.iter().position(|j| {
                    j.id == id && j.device_request.is_some_and(|t| t.expires_ms == expires_ms)
                })?;
                e.jobs.remove(i)
            })
        };
        if let Some(job) = job {
            // Debug: one line per request (a client's flood must not flood the log); the
            // answer on the channel is what tells.
            tracing::debug!(ep = %job.ep, path = %job.path, id = %job.id, attempts = job.attempts, "device-request expired before the device answered");
            self.finish(&job, Outcome::failed(504, REQUEST_EXPIRED))
                .await;
        }
    }

    /// The device of a queue-mode endpoint spoke without updating (a notification from
    /// `from`): what waits for it is sent now, if it spoke from its registration's
    /// address. From another (a NAT's new port, which its next update will bring), the
    /// requests would go to the old address: they wait for the update.
    pub fn device_spoke(self: &Arc<Self>, domain: &str, ep: &str, from: std::net::SocketAddr) {
        let awake_here = self
            .directory
            .get(domain, ep)
            .is_some_and(|e| e.reg.queue && e.reg.peer.session == from);
        if awake_here {
            self.kick(&(domain.to_string(), ep.to_string()));
        }
    }

    /// Starts the endpoint's worker unless one runs or nothing waits.
    fn kick(self: &Arc<Self>, key: &EpKey) {
        let start = {
            let mut q = self.lock();
            match q.get_mut(key) {
                Some(e) if !e.busy && !e.jobs.is_empty() => {
                    e.busy = true;
                    true
                }
                _ => false,
            }
        };
        if start {
            self.spawn_worker(key.clone());
        }
    }

    /// Runs the endpoint's worker (its queue entry was marked busy by the caller).
    fn spawn_worker(self: &Arc<Self>, key: EpKey) {
        // Boxed: a large future, moved by value while spawning otherwise.
        tokio::spawn(Box::pin(Arc::clone(self).work(key)));
    }

    /// Sends the endpoint's requests one at a time until its queue is empty.
    async fn work(self: Arc<Self>, key: EpKey) {
        loop {
            let (job, cancelled) = {
                let mut q = self.lock();
                let Some(e) = q.get_mut(&key) else { return };
                match e.jobs.pop_front() {
                    Some(j) => {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        e.in_flight = Some(tx);
                        e.observing = (j.method == Method::Observe)
                            .then(|| self.directory.get(&j.domain, &j.ep))
                            .flatten()
                            .map(|ep| (j.path.clone(), ep.reg.peer));
                        (j, rx)
                    }
                    None => {
                        // A submit holding a place starts a worker when it queues.
                        if e.reserved > 0 {
                            e.busy = false;
                            e.in_flight = None;
                            e.observing = None;
                        } else {
                            q.remove(&key);
                        }
                        return;
                    }
                }
            };
            // The endpoint going away ends the exchange at once (dropping it forgets its
            // token and message id) instead of retransmitting to a device that left.
            let mut job = job;
            job.attempts += 1;
            let expiry = async {
                match job.device_request {
                    Some(t) => {
                        let left = t.expires_ms.saturating_sub(now_ms());
                        tokio::time::sleep(Duration::from_millis(left)).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let outcome = tokio::select! {
                o = self.execute(&job) => o,
                Ok(why) = cancelled => Outcome::failed(410, why),
                () = expiry => Outcome::failed(504, REQUEST_EXPIRED),
            };
            // A device-request whose delivery failed goes back to the head of the queue
            // while it has retries left and time: it is sent again when the device next
            // speaks (Pelion's semantics), and what is queued behind it waits.
            let retry = outcome.undelivered
                && job
                    .device_request
                    .is_some_and(|t| job.attempts <= t.retry && t.expires_ms > now_ms());
            let job = {
                let mut q = self.lock();
                match q.get_mut(&key) {
                    Some(e) if retry => {
                        tracing::debug!(ep = %job.ep, path = %job.path, id = %job.id, attempt = job.attempts, status = outcome.status, "device-request not delivered; retried when the device next speaks");
                        e.in_flight = None;
                        e.observing = None;
                        e.jobs.push_front(job);
                        e.busy = false;
                        None
                    }
                    Some(e) => {
                        e.in_flight = None;
                        e.observing = None;
                        Some(job)
                    }
                    None => Some(job),
                }
            };
            let Some(job) = job else { return };
            self.finish(&job, outcome).await;
        }
    }

    async fn execute(&self, job: &Job) -> Outcome {
        let Some(ep) = self.directory.get(&job.domain, &job.ep) else {
            return Outcome::failed(410, "the endpoint is no longer registered");
        };
        let mut req = OutRequest::new(coap_method(job.method), &job.path);
        req.payload = base64::engine::general_purpose::STANDARD
            .decode(&job.payload)
            .unwrap_or_default();
        req.content_format = job.content_format;
        req.accept = job.accept;
        Counters::inc(&self.counters.device_requests);
        if job.method == Method::Observe {
            return self.execute_observe(job, &ep, &mut req).await;
        }
        let mut answer = self.devices.request(&ep.reg, &req).await;
        if job.accept_fallback && answer.as_ref().is_ok_and(refuses_accept) {
            req.accept = None;
            Counters::inc(&self.counters.device_requests);
            answer = self.devices.request(&ep.reg, &req).await;
        }
        match answer {
            Ok(reply) => {
                let status = http_status(reply.code);
                if job.method == Method::Get {
                    self.cache_reply(job, &reply);
                }
                if job.method == Method::Delete && reply.code == ResponseType::Deleted {
                    // Before the answer: once the application reads 200, the resource
                    // list no longer has what was deleted.
                    self.forget_deleted(job).await;
                }
                let error = (status >= 400).then(|| {
                    let diag = String::from_utf8_lossy(&reply.payload);
                    format!(
                        "the device answered {}{}{}",
                        coap_code(reply.code),
                        if diag.is_empty() { "" } else { ": " },
                        diag
                    )
                });
                let mut o = Outcome {
                    status,
                    payload: if error.is_some() {
                        Vec::new()
                    } else {
                        reply.payload
                    },
                    content_format: reply.content_format,
                    max_age: Some(reply.max_age.unwrap_or(DEFAULT_MAX_AGE)),
                    error,
                    location: reply.location,
                    undelivered: false,
                    after_answer: None,
                };
                if job.as_json && o.error.is_none() && !o.payload.is_empty() {
                    o = as_json(o, &job.path);
                }
                o
            }
            Err(e) => self.exchange_failed(e),
        }
    }

    /// The async response for a request the device did not answer: 504 no answer, 503 the
    /// socket is gone, 502 anything else (RST, a broken block transfer, a session of the
    /// address that is no longer the device's).
    fn exchange_failed(&self, e: ClientError) -> Outcome {
        match e {
            ClientError::Timeout => {
                Counters::inc(&self.counters.device_timeouts);
                Outcome::undelivered(504, "timeout: the device did not answer")
            }
            e @ ClientError::NoSocket(_) => Outcome::undelivered(503, e.to_string()),
            e => Outcome::undelivered(502, e.to_string()),
        }
    }

    async fn execute_observe(&self, job: &Job, ep: &Endpoint, req: &mut OutRequest) -> Outcome {
        let mut answer = self.devices.observe(&ep.reg, req).await;
        if job.accept_fallback && answer.as_ref().is_ok_and(|(r, _)| refuses_accept(r)) {
            req.accept = None;
            Counters::inc(&self.counters.device_requests);
            answer = self.devices.observe(&ep.reg, req).await;
        }
        match answer {
            Ok((reply, stream)) => {
                let status = http_status(reply.code);
                self.cache_reply(job, &reply);
                let refusal = if status >= 400 {
                    Some((
                        status,
                        format!("the device answered {}", coap_code(reply.code)),
                    ))
                } else if reply.observe.is_none() {
                    Some((
                        412,
                        "the device does not let this resource be observed (it answered without Observe)".to_string(),
                    ))
                } else {
                    None
                };
                if let Some((status, reason)) = refusal {
                    self.observations
                        .report(&self.counters, |done| ObservationReport::Refused {
                            job: job.clone(),
                            ep: ep.clone(),
                            status,
                            reason: reason.clone(),
                            done,
                        })
                        .await;
                    return Outcome::failed(status, reason);
                }
                let first = reply.clone();
                let (give, mut after_answer) = tokio::sync::oneshot::channel();
                let taken = self
                    .observations
                    .report(&self.counters, |done| ObservationReport::Established {
                        job: job.clone(),
                        ep: ep.clone(),
                        first,
                        stream,
                        after_answer: give,
                        done,
                    })
                    .await;
                if !taken {
                    // The subscriptions manager stopped taking reports (shutdown): the
                    // stream was dropped with the report, which cancelled it.
                    tracing::debug!(
                        "observation established after the subscriptions stopped: cancelled"
                    );
                }
                Outcome {
                    status,
                    payload: reply.payload,
                    content_format: reply.content_format,
                    max_age: Some(reply.max_age.unwrap_or(DEFAULT_MAX_AGE)),
                    error: None,
                    location: None,
                    undelivered: false,
                    // Sent before `done`, if the manager holds the notifications.
                    after_answer: after_answer.try_recv().ok(),
                }
            }
            Err(e) => self.exchange_failed(e),
        }
    }

    /// The device deleted `job.path`: its links there leave the registration (seed 000),
    /// and its cached values go.
    async fn forget_deleted(&self, job: &Job) {
        self.lock_cache()
            .forget_below(&job.domain, &job.ep, &job.path);
        let Some(registry) = self.registry.upgrade() else {
            return;
        };
        if let Err(e) = registry.forget_links(&job.domain, &job.ep, &job.path).await {
            tracing::warn!(ep = %job.ep, path = %job.path, "the links of a deleted resource stay listed: {e}");
        }
    }

    /// Publishes the async response (durably) and then forgets the request; then an
    /// observation's held notifications go on ([`AfterAnswer`]).
    async fn finish(&self, job: &Job, mut o: Outcome) {
        let after_answer = o.after_answer.take();
        if job.internal {
            if o.status >= 400 && log_budget::allow(DeviceLine::ObservationNotEstablished) {
                tracing::info!(ep = %job.ep, path = %job.path, status = o.status, "observation not established: {}", o.error.unwrap_or_default());
            }
            return;
        }
        self.untrack_device_request(job);
        let entry = Entry::AsyncResponse(AsyncResponse {
            id: job.id.clone(),
            status: o.status,
            payload: o.payload,
            ct: o.content_format.map(content_format::describe),
            max_age: o.max_age,
            error: o.error,
            location: o.location,
        });
        // One transaction: the answer is stored and the request forgotten together.
        self.hub
            .publish_answer(
                &job.key_id,
                Event::new(entry, now_ms()),
                job.row,
                crate::events::About::Resource(&job.ep, &job.path),
            )
            .await;
        drop(after_answer);
        tracing::debug!(id = %job.id, ep = %job.ep, path = %job.path, status = o.status, "async response");
    }

    /// Keeps a device's 2.05 Content answer to a read or an observe of `job.path` as the
    /// resource's last value (other answers are not values).
    fn cache_reply(&self, job: &Job, reply: &CoapReply) {
        if reply.code == ResponseType::Content {
            self.cache_put(
                &job.domain,
                &job.ep,
                &job.path,
                &reply.payload,
                reply.content_format,
                reply.max_age,
            );
        }
    }

    /// Remembers a resource value for `cacheOnly` reads (from reads and notifications).
    pub fn cache_put(
        &self,
        domain: &str,
        ep: &str,
        path: &str,
        payload: &[u8],
        ct: Option<u16>,
        max_age: Option<u32>,
    ) {
        let age = Duration::from_secs(u64::from(max_age.unwrap_or(DEFAULT_MAX_AGE)));
        self.lock_cache()
            .put(domain, ep, path, payload, ct, Instant::now() + age);
    }

    /// The value cache's slot for a resource, for [`Requests::cache_put_at`].
    pub fn cache_slot(&self, domain: &str, ep: &str, path: &str) -> Arc<CacheSlot> {
        self.lock_cache().slot(domain, ep, path)
    }

    /// [`Requests::cache_put`] through the resource's `slot` (an observation's): looked up
    /// again (and `slot` replaced: true) only if its endpoint's values were forgotten
    /// since.
    pub fn cache_put_at(
        &self,
        slot: &mut Arc<CacheSlot>,
        (domain, ep, path): (&str, &str, &str),
        payload: &[u8],
        ct: Option<u16>,
        max_age: Option<u32>,
    ) -> bool {
        let age = Duration::from_secs(u64::from(max_age.unwrap_or(DEFAULT_MAX_AGE)));
        put_at(
            &self.cache,
            slot,
            (domain, ep, path),
            payload,
            ct,
            Instant::now() + age,
        )
    }

    /// Takes the stored requests of an endpoint that registered here after registering
    /// with another cluster node (issue 22), behind any already queued here (by id, none
    /// twice); the registration's after-reply kick sends them. Decision: it filters
    /// `RequestStore::load_requests` (every stored request is read, once per device that
    /// moves) rather than adding a per-endpoint load to every backend: moves are rare
    /// (a node stopping or a device roaming), and the stored requests are the waiting
    /// ones only.
    async fn adopt(self: &Arc<Self>, domain: &str, ep: &str) {
        let jobs = match self.store.load_requests().await {
            Ok(jobs) => jobs,
            Err(e) => {
                crate::store::log_failure(
                    format_args!("store: cannot load the requests of {ep}, which moved here"),
                    &e,
                );
                return;
            }
        };
        let key = (domain.to_string(), ep.to_string());
        let mut expiries = Vec::new();
        {
            let mut q = self.lock();
            let e = q.entry(key.clone()).or_default();
            for j in jobs {
                if j.domain == domain && j.ep == ep && !e.jobs.iter().any(|k| k.id == j.id) {
                    self.track_device_request(&j);
                    if let Some(t) = j.device_request {
                        expiries.push((j.id.clone(), t.expires_ms));
                    }
                    e.jobs.push_back(j);
                }
            }
        }
        for (id, at) in expiries {
            self.schedule_expiry(key.clone(), id, at);
        }
    }

    /// Forgets an endpoint that another cluster node owns now (issue 22): its queued
    /// requests leave this node's memory (they stay in the store, for the new owner; one in
    /// flight finishes here) and its cached values go.
    fn drop_local(&self, domain: &str, ep: &str) {
        let key = (domain.to_string(), ep.to_string());
        let dropped: Vec<Job> = match self.lock().get_mut(&key) {
            Some(e) => e.jobs.drain(..).collect(),
            None => Vec::new(),
        };
        for j in &dropped {
            self.untrack_device_request(j);
        }
        self.lock_cache().forget_endpoint(domain, ep);
    }

    /// Answers every queued request of an endpoint with 410, ends the one in flight the
    /// same way (its worker answers it), and forgets the endpoint's cache.
    async fn cancel(&self, domain: &str, ep: &str, why: &str) {
        let key = (domain.to_string(), ep.to_string());
        let jobs: Vec<Job> = {
            let mut q = self.lock();
            match q.get_mut(&key) {
                Some(e) => {
                    if let Some(tx) = e.in_flight.take() {
                        let _ = tx.send(why.to_string());
                    }
                    // Ended: an observe asked for from now on is a new one.
                    e.observing = None;
                    e.jobs.drain(..).collect()
                }
                None => Vec::new(),
            }
        };
        self.lock_cache().forget_endpoint(domain, ep);
        for j in jobs {
            self.finish(&j, Outcome::failed(410, why)).await;
        }
    }

    /// For `/metrics`: requests waiting (not in flight) over all endpoints, the longest
    /// queue of one endpoint, and the endpoints with a request in flight.
    pub fn queue_depths(&self) -> (usize, usize, usize) {
        let queues = self.lock();
        let (mut total, mut deepest, mut busy) = (0, 0, 0);
        for q in queues.values() {
            total += q.jobs.len();
            deepest = deepest.max(q.jobs.len());
            busy += usize::from(q.in_flight.is_some());
        }
        (total, deepest, busy)
    }

    /// Requests waiting (not in flight), all endpoints.
    pub fn queued(&self) -> usize {
        self.lock().values().map(|e| e.jobs.len()).sum()
    }
}

/// A device's refusal of the Accept option it was sent.
fn refuses_accept(reply: &CoapReply) -> bool {
    matches!(
        reply.code,
        ResponseType::NotAcceptable | ResponseType::UnsupportedContentFormat
    )
}

/// The JSON value tree of a device's answer (see [`crate::lwm2m_data`]). An answer in
/// `application/json` is the device's own JSON, passed on once checked. An answer without
/// Content-Format is read as text/plain when it is UTF-8, else as opaque. A path that is
/// not an LwM2M path (an mbed Client resource such as `/dev/temp`) has no object model:
/// its text is a JSON string, anything else `{"base64": …}`.
fn to_json_tree(ct: Option<u16>, payload: &[u8], path: &str) -> Result<Vec<u8>, String> {
    use crate::lwm2m_data::{self, Path, format};
    if ct == Some(content_format::JSON) {
        return match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(_) => Ok(payload.to_vec()),
            Err(e) => Err(format!("it is not valid JSON: {e}")),
        };
    }
    let text = std::str::from_utf8(payload).ok();
    let cf = ct.unwrap_or(if text.is_some() {
        format::TEXT_PLAIN
    } else {
        format::OCTET_STREAM
    });
    let tree = match path.parse::<Path>() {
        Ok(p) => lwm2m_data::decode(cf, payload, &p).map_err(|e| e.to_string())?,
        Err(_) => match (cf, text) {
            (format::TEXT_PLAIN, Some(t)) => serde_json::Value::String(t.to_string()),
            (format::TEXT_PLAIN | format::OCTET_STREAM, _) => serde_json::json!({
                "base64": base64::engine::general_purpose::STANDARD.encode(payload)
            }),
            _ => {
                return Err(format!(
                    "{path} is not an LwM2M path, so there is no object model to read it by"
                ));
            }
        },
    };
    serde_json::to_vec(&tree).map_err(|e| e.to_string())
}

/// A write's body in the JSON value tree (`Content-Type: application/json`) encoded for an
/// LwM2M client in a format it registered support for
/// ([`crate::lwm2m_data::choose_write_format`]): the new body and its Content-Format.
/// Writes (`PUT`) and creates or partial updates (`POST` on an object or instance) are
/// encoded; an execute (`POST` on a resource) and every request to a device without
/// `lwm2m=` carry the JSON as it is.
fn encode_write(
    ep: &Endpoint,
    method: Method,
    path: &str,
    body: &[u8],
) -> Result<Option<(Vec<u8>, u16)>, RequestError> {
    use crate::lwm2m_data::{self, Path};
    let depth = path.split('/').filter(|s| !s.is_empty()).count();
    let transcoded =
        ep.is_lwm2m() && (method == Method::Put || (method == Method::Post && depth <= 2));
    if !transcoded {
        return Ok(None);
    }
    let bad = |m: String| RequestError::BadBody(m);
    let p: Path = path.parse().map_err(|e| bad(format!("{e}")))?;
    let tree: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    let cf = lwm2m_data::choose_write_format(ep.reg.lwm2m.as_deref(), &ep.formats());
    let bytes = lwm2m_data::encode(&tree, &p, cf).map_err(|e| {
        bad(format!(
            "the JSON value tree cannot be written to {path} as {}: {e}",
            content_format::describe(cf)
        ))
    })?;
    Ok(Some((bytes, cf)))
}

/// A successful answer turned into `application/json`; one that cannot be decoded is a
/// 502 naming why.
fn as_json(o: Outcome, path: &str) -> Outcome {
    match to_json_tree(o.content_format, &o.payload, path) {
        Ok(payload) => Outcome {
            payload,
            content_format: Some(content_format::JSON),
            ..o
        },
        Err(e) => Outcome {
            location: o.location,
            ..Outcome::failed(
                502,
                format!(
                    "the device's answer ({}) cannot be decoded into JSON: {e}",
                    o.content_format
                        .map_or_else(|| "no Content-Format".into(), content_format::describe)
                ),
            )
        },
    }
}

/// Listens to the registry for the request layer. Strong: the request layer refers to
/// the registry's read model only (`Directory`), not to the registry, so the registry
/// holding it makes no cycle.
pub struct RequestsListener(pub Arc<Requests>);

impl RegistryListener for RequestsListener {
    /// The device just spoke (and has its answer): send what waits for it.
    fn after_reply(&self, ev: &RegistryEvent) {
        let ep = ev.endpoint();
        self.0.kick(&(ep.reg.domain.clone(), ep.reg.name.clone()));
    }

    /// Issue 22: the device came from another node (registered or updated here): what was
    /// queued for it there is in the store and is ours to send now (after the answer).
    fn on_moved_here<'a>(
        &'a self,
        ep: &'a Arc<Endpoint>,
        _from: &'a Arc<Endpoint>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(self.0.adopt(&ep.reg.domain, &ep.reg.name))
    }

    fn on_event<'a>(
        &'a self,
        ev: &'a RegistryEvent,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let r = &self.0;
            let ep = ev.endpoint();
            let (domain, name) = (ep.reg.domain.as_str(), ep.reg.name.as_str());
            match ev {
                // Issue 22: the device came from another node (it registered here after
                // registering there): nothing is cancelled; what was queued for it there
                // is in the store and is taken in `on_moved_here`.
                RegistryEvent::Registered {
                    replaced: Some(old),
                    ..
                } if old.reg.node.is_some() && old.reg.node != ep.reg.node => {}
                RegistryEvent::Moved(_) => r.drop_local(domain, name),
                RegistryEvent::Registered {
                    replaced: Some(_), ..
                } => {
                    r.cancel(domain, name, "cancelled: the endpoint registered again")
                        .await;
                }
                RegistryEvent::Registered { replaced: None, .. }
                | RegistryEvent::Updated { .. } => {}
                RegistryEvent::Deregistered(_) | RegistryEvent::RemovedElsewhere(_) => {
                    r.cancel(domain, name, "cancelled: the endpoint de-registered")
                        .await
                }
                RegistryEvent::Expired(_) => {
                    r.cancel(
                        domain,
                        name,
                        "cancelled: the endpoint's registration expired",
                    )
                    .await
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An observe refused by the device, reported; true when the manager handled it.
    async fn report_refusal(counters: Arc<Counters>, reporter: ObservationReporter) -> bool {
        let job = Job {
            id: "1#x".into(),
            key_id: String::new(),
            domain: "d".into(),
            ep: "n".into(),
            method: Method::Observe,
            path: "/3/0/1".into(),
            payload: String::new(),
            content_format: None,
            accept: None,
            accept_fallback: false,
            as_json: false,
            created_ms: 0,
            internal: true,
            device_request: None,
            attempts: 0,
            row: 0,
        };
        let e = ep(None, "</3/0>");
        reporter
            .report(&counters, |done| ObservationReport::Refused {
                job,
                ep: e,
                status: 404,
                reason: "gone".into(),
                done,
            })
            .await
    }

    /// The channel to the subscriptions manager: a report waits until it is handled; when
    /// the channel is full the reporter waits for room (counted), nothing is dropped; with
    /// the receiver gone the report is not taken.
    #[tokio::test]
    async fn observation_reports_wait_when_full_and_are_counted() {
        let counters = Arc::new(Counters::default());
        let (reporter, mut reports) = observation_reports(1);
        let first = tokio::spawn(report_refusal(Arc::clone(&counters), reporter.clone()));
        let second = tokio::spawn(report_refusal(Arc::clone(&counters), reporter.clone()));
        // The first fills the channel; the second waits for room.
        let waited = || {
            counters
                .observation_reports_waited
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while waited() == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(waited(), 1, "the second report waited for room");
        assert!(
            !first.is_finished() && !second.is_finished(),
            "not handled yet"
        );
        for _ in 0..2 {
            match reports.0.recv().await {
                Some(ObservationReport::Refused {
                    status,
                    reason,
                    done,
                    ..
                }) => {
                    assert_eq!((status, reason.as_str()), (404, "gone"));
                    let _ = done.send(());
                }
                _ => panic!("a refusal"),
            }
        }
        assert!(
            first.await.unwrap() && second.await.unwrap(),
            "both handled"
        );
        // A report the manager drops unhandled (its task stopped) is not taken.
        let third = tokio::spawn(report_refusal(Arc::clone(&counters), reporter.clone()));
        drop(reports.0.recv().await);
        assert!(!third.await.unwrap());
        drop(reports);
        assert!(!report_refusal(Arc::clone(&counters), reporter).await);
    }

    #[test]
    fn async_ids_are_unique_and_shaped_like_the_seed() {
        let a = new_async_id();
        let b = new_async_id();
        assert_ne!(a, b);
        let (n, uuid) = a.split_once('#').unwrap();
        assert!(n.parse::<u32>().is_ok());
        assert_eq!(uuid.len(), 36);
        assert_eq!(uuid.matches('-').count(), 4);
    }

    #[test]
    fn resource_matching_by_segments() {
        let ep = ep(None, "</3/0>,</3303/0/5700>");
        for (path, known) in [
            ("/3/0", true),
            ("/3/0/1", true),
            ("/3", true),
            ("/3303/0/5700", true),
            ("/3303/0/5701", false),
            ("/4/0", false),
            ("/30/0", false),
            ("/", false),
            ("", false),
            ("//3//0//", true),
            ("3/0", true),
            ("/3/", true),
            ("/3/00", false),
            ("/3/0/1/2/3", true),
        ] {
            assert_eq!(resource_known(&ep, path), known, "{path}");
        }
        // Observable links (`obs`, and every link of an LwM2M device) are stored marked:
        // matched without the mark.
        for marked in [
            self::ep(None, "</3/0>;obs,</3303/0/5700>;obs"),
            self::ep(Some("1.1"), "</3/0>,</3303/0/5700>"),
        ] {
            assert!(marked.paths().all(|(_, obs)| obs));
            for (path, known) in [("/3/0/1", true), ("/3303", true), ("/4", false)] {
                assert_eq!(resource_known(&marked, path), known, "{path}");
            }
        }
        // A link with no segments matches nothing; neither does an empty path.
        for (want, have, related_) in [
            ("/3", "/", false),
            ("/3", "", false),
            ("", "/3", false),
            ("/3", "/3", true),
            ("/3/0", "/3", true),
            ("/3", "/3/0", true),
            ("/3/1", "/3/0", false),
            ("/a/b", "a//b/", true),
            ("/ab", "/a", false),
            ("/a", "/ab", false),
        ] {
            assert_eq!(
                related(want.as_bytes(), have.as_bytes()),
                related_,
                "{want} {have}"
            );
        }
    }

    /// The id has the seed's shape, and the same text the `hex` + `format!` version made.
    #[test]
    fn async_ids_are_a_number_and_a_uuid() {
        for b in [
            [0u8; 16],
            [0xff; 16],
            std::array::from_fn(|i| (i as u8).wrapping_mul(17).wrapping_add(3)),
        ] {
            let h = hex::encode(b);
            let before = format!(
                "{}#{}-{}-{}-{}-{}",
                u32::from_be_bytes([b[0], b[1], b[2], b[3]]) >> 1,
                &h[0..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..32]
            );
            assert_eq!(async_id_from(uuid::Uuid::from_bytes(b)), before);
        }
        assert_eq!(
            async_id_from(uuid::Uuid::from_bytes([0xff; 16])),
            "2147483647#ffffffff-ffff-ffff-ffff-ffffffffffff"
        );
        let a = new_async_id();
        assert_ne!(a, new_async_id());
        let (n, uuid) = a.split_once('#').unwrap();
        assert!(n.parse::<u32>().is_ok(), "{a}");
        let groups: Vec<&str> = uuid.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{a}"
        );
        assert_eq!(&groups[2][..1], "4", "version 4: {a}");
    }

    #[test]
    fn the_form_of_made_async_ids_is_recognised() {
        for _ in 0..100 {
            let a = new_async_id();
            assert!(is_made_async_id(&a), "{a}");
        }
        assert!(is_made_async_id(&async_id_from(uuid::Uuid::from_bytes(
            [0; 16]
        ))));
        for other in [
            "",
            "reuse1",
            "#",
            "12#",
            "12#0f0f9a29",
            "x12#0f0f9a29-0000-4000-8000-000000000000",
            "12#0F0F9A29-0000-4000-8000-000000000000",
            "12345678901#0f0f9a29-0000-4000-8000-000000000000",
            "12#0f0f9a29000040008000000000000000",
            "12#0f0f9a29-0000-4000-8000-000000000000#",
        ] {
            assert!(!is_made_async_id(other), "{other:?}");
        }
    }

    #[test]
    fn the_value_cache_keeps_the_last_value_per_resource_and_forgets_endpoints() {
        let mut c = ValueCache::default();
        let t = Instant::now();
        c.put("d", "e1", "/3/0/0", b"one", Some(0), t);
        c.put("d", "e1", "/3/0/0", b"two!", None, t);
        c.put("d", "e2", "/3/0/0", b"other", Some(0), t);
        c.put("d2", "e1", "/3/0/0", b"other domain", Some(0), t);
        let v = c.get("d", "e1", "/3/0/0").unwrap();
        assert_eq!(
            (v.payload.as_slice(), v.content_format),
            (&b"two!"[..], None)
        );
        assert!(c.get("d", "e1", "/3/0/1").is_none());
        c.forget_endpoint("d", "e1");
        assert!(c.get("d", "e1", "/3/0/0").is_none());
        assert!(
            c.get("d", "e2", "/3/0/0").is_some(),
            "another endpoint is kept"
        );
        assert!(
            c.get("d2", "e1", "/3/0/0").is_some(),
            "another domain is kept"
        );
        c.forget_endpoint("d", "e2");
        assert!(!c.0.contains_key("d"), "an empty domain is dropped");
    }

    /// Issue 24: an observation's slot puts its values where reads find them; once the
    /// endpoint's values are forgotten the old slot is detached (what it held is gone
    /// too), and a put through it looks the resource up again and keeps the new slot.
    #[test]
    fn an_observations_cache_slot_follows_the_endpoints_values() {
        let cache = Mutex::new(ValueCache::default());
        let t = Instant::now();
        let lock = || cache.lock().unwrap();
        let value = || {
            lock()
                .get("d", "e", "/3/0/0")
                .map(|c| (c.payload, c.content_format))
        };
        let mut slot = lock().slot("d", "e", "/3/0/0");
        assert_eq!(value(), None, "an empty slot is no value");
        let first = Arc::clone(&slot);
        assert!(!put_at(
            &cache,
            &mut slot,
            ("d", "e", "/3/0/0"),
            b"1",
            Some(0),
            t
        ));
        assert_eq!(value(), Some((b"1".to_vec(), Some(0))));
        assert!(Arc::ptr_eq(&slot, &first), "not looked up again");
        // A read's value lands in the same slot.
        lock().put("d", "e", "/3/0/0", b"2", None, t);
        let held = |s: &CacheSlot| s.lock().value.as_ref().map(|c| c.payload.clone());
        assert_eq!(held(&first), Some(b"2".to_vec()));
        lock().forget_endpoint("d", "e");
        assert_eq!(value(), None);
        assert_eq!(held(&first), None, "the detached slot holds nothing");
        assert!(put_at(
            &cache,
            &mut slot,
            ("d", "e", "/3/0/0"),
            b"3",
            Some(0),
            t
        ));
        assert!(!Arc::ptr_eq(&slot, &first), "looked up again");
        assert_eq!(value(), Some((b"3".to_vec(), Some(0))));
        assert_eq!(held(&first), None, "not put into the detached slot");
    }

    #[test]
    fn coap_codes_map_to_http_statuses() {
        assert_eq!(http_status(ResponseType::Content), 200);
        assert_eq!(http_status(ResponseType::Changed), 200);
        assert_eq!(http_status(ResponseType::Created), 201);
        assert_eq!(http_status(ResponseType::NotFound), 404);
        assert_eq!(http_status(ResponseType::MethodNotAllowed), 405);
        assert_eq!(http_status(ResponseType::UnsupportedContentFormat), 415);
        assert_eq!(http_status(ResponseType::ServiceUnavailable), 503);
    }

    fn ep(lwm2m: Option<&str>, links: &str) -> Endpoint {
        Endpoint::new(crate::registry::Registration {
            id: "x".into(),
            domain: "d".into(),
            name: "n".into(),
            ept: None,
            lifetime_s: 1,
            binding: "U".into(),
            lwm2m: lwm2m.map(Into::into),
            queue: false,
            peer: crate::peer::PeerRef::udp(
                "127.0.0.1:2".parse().unwrap(),
                "127.0.0.1:1".parse().unwrap(),
            ),
            links: links.into(),
            registered_at_ms: 0,
            expires_at_ms: 0,
            node: None,
        })
        .unwrap()
    }

    #[test]
    fn the_accept_sent_depends_on_the_client_the_path_and_the_wish() {
        let lw = ep(Some("1.0"), "</3/0>");
        let lw_senml = ep(Some("1.1"), r#"</>;rt="oma.lwm2m";ct="11542 110",</3/0>"#);
        let mbed = ep(None, "</3/0>");
        use Method::*;
        for (e, method, path, want, plan) in [
            // No Accept: text/plain for one resource of an LwM2M client, with fallback.
            (&lw, Get, "/3/0/0", Want::Any, (Some(0), true, false)),
            (&lw, Get, "/3/0/7/1", Want::Any, (Some(0), true, false)),
            (&lw, Observe, "/3/0/0", Want::Any, (Some(0), true, false)),
            (&lw, Get, "/3/0", Want::Any, (None, false, false)),
            (&mbed, Get, "/3/0/0", Want::Any, (None, false, false)),
            // The application's own choice is sent as it is, without fallback.
            (
                &lw,
                Get,
                "/3/0",
                Want::Format(11542),
                (Some(11542), false, false),
            ),
            (
                &mbed,
                Get,
                "/3/0/0",
                Want::Format(0),
                (Some(0), false, false),
            ),
            // JSON: a typed format the device lists, else text for one resource.
            (&lw_senml, Get, "/3/0", Want::Json, (Some(110), true, true)),
            (&lw, Get, "/3/0/0", Want::Json, (Some(0), true, true)),
            (&lw, Get, "/3/0", Want::Json, (None, false, true)),
            (&mbed, Get, "/3/0", Want::Json, (None, false, true)),
            // Writes carry no Accept.
            (&lw, Put, "/3/0/0", Want::Json, (None, false, false)),
        ] {
            assert_eq!(
                plan_accept(e, method, path, want),
                plan,
                "{method:?} {path} {want:?}"
            );
        }
    }
}
