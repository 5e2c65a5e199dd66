//! Subscriptions (observe), pre-subscriptions and Lua rules (seed 000, "Subscriptions").
//!
//! Subscriptions belong to an access key: its notification channel gets the resource's
//! `notifications` events. One CoAP observation serves every key subscribed to the same
//! resource (domain, endpoint, path). Subscriptions and pre-subscriptions are stored; the
//! observations are not (their tokens die with the process): they are established again
//! at start (endpoints that are not in queue mode), at every full registration, and at a
//! registration update for any subscription that has none.
//!
//! Pre-subscriptions: after the reply to a registration and a registration update (never
//! before it: the reply does not wait on rules), every observable resource (`obs` in the
//! registration) of the endpoint is offered, for every key with a notification channel in
//! the endpoint's domain, to the Lua rules (`presubscribe`, on the rules thread), and if
//! they have no opinion to the key's JSON pre-subscription rules; a match becomes a
//! subscription of that key, unless the registration has ended meanwhile. Setting pre-subscriptions removes the key's subscriptions (as
//! the seed says) and applies the new rules to the endpoints registered now.

pub mod lua;
pub mod presub;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::auth::Principal;
use crate::coap::client::{
    CoapReply, FedObservation, FeedItem, FeedSender, ObservationFeed, ObserveStream,
};
use crate::coap::content_format;
use crate::events::{Entry, Event, Hub, Notification, SubscriptionError};
use crate::hashing::Map;
use crate::log_budget::{self, DeviceLine};
use crate::metrics::Counters;
use crate::registry::{Directory, Endpoint, RegistryEvent, RegistryListener, now_ms};
use crate::requests::{
    AfterAnswer, DEFAULT_MAX_AGE, Job, Method, ObservationReport, ObservationReports, RequestError,
    Requests, Submit, Submitted, resource_known,
};
use crate::store::{CORE_STATE_OWNER, Store, StoreError};
pub use connectord_model::{PresubRecord, SubscriptionRecord};
use lua::{LuaRules, Question, Subject};
pub use presub::PreSub;
use presub::RuleMatch;

/// Why a subscription call was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubError {
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 412: the device says the resource cannot be observed.
    #[error("cannot subscribe to a resource that is not observable")]
    NotObservable,
    /// The request layer refused (429, 503, ...).
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a subscription call achieved.
#[derive(Debug, PartialEq)]
pub enum Subscribed {
    /// 200: the resource is observed already; the subscription is in force.
    Active,
    /// 202: the observe request is on its way; its answer comes as this async response.
    Pending(String),
}

type ResKey = (String, String, String);

#[derive(Default)]
struct KeySubs {
    domain: String,
    resources: ResourceSet,
    presubs: Vec<PreSub>,
}

/// A key's subscribed resources: endpoint name → paths, so that the lookup made for every
/// notification borrows its `&str`s instead of building a `(String, String)` to compare
/// against. Endpoints are hashed (with a tree, the lookup cost ~2 % of the daemon's CPU per
/// notification in string comparisons with 1 200 endpoints); an endpoint's paths stay
/// sorted, which is the order `GET /subscriptions/{ep}` lists them in. Endpoints iterate in
/// no particular order.
#[derive(Default)]
struct ResourceSet(Map<String, BTreeSet<String>>);

impl ResourceSet {
    fn contains(&self, ep: &str, path: &str) -> bool {
        self.0.get(ep).is_some_and(|paths| paths.contains(path))
    }

    /// False when it was there already.
    fn insert(&mut self, ep: &str, path: &str) -> bool {
        match self.0.get_mut(ep) {
            Some(paths) if paths.contains(path) => false,
            Some(paths) => paths.insert(path.to_string()),
            None => {
                self.0
                    .insert(ep.to_string(), BTreeSet::from([path.to_string()]));
                true
            }
        }
    }

    /// False when it was not there.
    fn remove(&mut self, ep: &str, path: &str) -> bool {
        let Some(paths) = self.0.get_mut(ep) else {
            return false;
        };
        let removed = paths.remove(path);
        if paths.is_empty() {
            self.0.remove(ep);
        }
        removed
    }

    /// Removes every path of `ep`; false when there was none.
    fn remove_endpoint(&mut self, ep: &str) -> bool {
        self.0.remove(ep).is_some()
    }

    /// Adds back what a removal the store refused took out (see [`Subscriptions`]).
    fn restore(&mut self, taken: ResourceSet) {
        for (ep, paths) in taken.0 {
            self.0.entry(ep).or_default().extend(paths);
        }
    }

    fn paths_of(&self, ep: &str) -> impl Iterator<Item = &String> {
        self.0.get(ep).into_iter().flatten()
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0
            .iter()
            .flat_map(|(ep, paths)| paths.iter().map(move |p| (ep, p)))
    }
}

struct Observation {
    key: ResKey,
    /// The observation's notifications go to the manager's feed; dropping it forgets
    /// the token (the device's next notification gets RST, which cancels it).
    fed: Option<FedObservation>,
    /// Or, until the async response of the observe that made it is published, they wait
    /// in the observation's own stream ([`Subscriptions::hand_over`]); dropping it cancels
    /// the observation too.
    held: Option<ObserveStream>,
    /// The newest notification taken: its Observe number and when (RFC 7641 §3.4).
    last: (u32, Instant),
    endpoint: Endpoint,
    /// The keys subscribed to the resource (issue 24: looked up again only when a
    /// subscription changed, not for every notification).
    subscribers: Subscribers,
    /// The resource's place in the value cache.
    cache: Arc<crate::requests::CacheSlot>,
}

/// The keys subscribed to one resource as of a [`Keys::generation`].
#[derive(Default)]
struct Subscribers(Option<(u64, Arc<[String]>)>);

impl Subscribers {
    /// The keys subscribed to `(domain, ep, path)` now.
    fn of(&mut self, keys: &Keys, (domain, ep, path): (&str, &str, &str)) -> Arc<[String]> {
        match &self.0 {
            Some((generation, list)) if *generation == keys.generation => Arc::clone(list),
            _ => {
                let list: Arc<[String]> = keys.subscribers(domain, ep, path).into();
                self.0 = Some((keys.generation, Arc::clone(&list)));
                list
            }
        }
    }
}

/// The keys' subscriptions, with a number that changes at every change of them (any
/// mutable use counts as one), so that an observation keeps the list of its subscribers
/// until then ([`Observation::subscribers`]).
#[derive(Default)]
struct Keys {
    map: Map<String, KeySubs>,
    generation: u64,
}

impl std::ops::Deref for Keys {
    type Target = Map<String, KeySubs>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl std::ops::DerefMut for Keys {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.generation = self.generation.wrapping_add(1);
        &mut self.map
    }
}

impl Keys {
    fn subscribers(&self, domain: &str, ep: &str, path: &str) -> Vec<String> {
        self.map
            .iter()
            .filter(|(_, k)| k.domain == domain && k.resources.contains(ep, path))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

#[derive(Default)]
struct State {
    keys: Keys,
    /// The observation of each observed resource, by its number in [`State::observing`].
    observations: Map<ResKey, u64>,
    /// The observations by number: the number their notifications come with from the
    /// feed ([`Subscriptions::take_notifications`]).
    observing: Map<u64, Observation>,
    /// (domain, endpoint) → (registration id, paths whose observe the device refused in
    /// that registration): pre-subscriptions do not ask for them again until the device
    /// registers anew, so a refusal is reported once, not at every update.
    refused: Map<(String, String), (String, BTreeSet<String>)>,
    /// Resources a subscription call is about to observe (with how many calls), from
    /// before it records the subscription until its observe request is queued: the
    /// daemon's own "observe what is missing" (after a registration or update reply) leaves
    /// them alone, as it leaves a queued or in-flight observe alone
    /// ([`Requests::observe_internal`]), so the device is not asked twice.
    asking: Map<ResKey, usize>,
    /// One key's subscription calls in progress for one resource (key id, endpoint, path):
    /// a call that made the subscription and whose observe was then refused does not take
    /// it away while another call of the same key is deciding, or after one succeeded.
    claims: Map<ResKey, Claim>,
    /// Subscriptions (key id, endpoint, path) in memory whose store write has not ended
    /// ([`Subscriptions::add_if`]); `Subscriptions::written` is notified as each ends.
    unwritten: Map<ResKey, ()>,
}

/// A subscription's mark in [`State::unwritten`] while its store write is awaited; taken
/// away by [`Writing::end`] or, when the call is cancelled, on drop (the write goes on in
/// the store, and the subscription stays in memory, as a cancelled call always left it).
/// Dropped, it wakes the calls waiting for the write (after the state lock is released).
struct Writing<'a> {
    subs: &'a Subscriptions,
    key: Option<ResKey>,
}

impl Writing<'_> {
    fn end(&mut self, st: &mut State) {
        if let Some(key) = self.key.take() {
            st.unwritten.remove(&key);
        }
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let subs = self.subs;
        if self.key.is_some() {
            self.end(&mut subs.lock());
        }
        subs.written.notify_waiters();
    }
}

/// The subscription calls of one key to one resource that are in progress
/// ([`State::claims`]). The last call to finish removes the subscription if one of them
/// made it and none of them succeeded: two concurrent `PUT`s of one subscription, the
/// first storing it and the second finding it stored, may have their observes refused and
/// accepted in either order (the second does not wait for the first's store write), and
/// the client answered 202 must find its subscription.
#[derive(Default)]
struct Claim {
    calls: usize,
    /// A call of these stored the subscription (it did not exist before).
    made: bool,
    /// A call of these succeeded (or was cancelled, its answer unknown): the subscription
    /// stays.
    kept: bool,
}

/// A subscription call's part in [`State::claims`]. [`Subscriptions::settle`] ends it
/// with the call's outcome; dropped without (the call was cancelled: an HTTP client that
/// went away), it counts as kept, as a cancelled call always left its subscription.
struct Claiming<'a> {
    subs: &'a Subscriptions,
    key: Option<ResKey>,
}

impl Claiming<'_> {
    /// Ends the call's part: true when the subscription is to be removed (this was the
    /// last call, one made it, none kept it), decided under the state lock `st`.
    fn finish(&mut self, st: &mut State, kept: bool) -> bool {
        let Some(key) = self.key.take() else {
            return false;
        };
        let Some(c) = st.claims.get_mut(&key) else {
            return false;
        };
        c.calls -= 1;
        c.kept |= kept;
        if c.calls > 0 {
            return false;
        }
        let remove = c.made && !c.kept;
        st.claims.remove(&key);
        remove
    }
}

impl Drop for Claiming<'_> {
    fn drop(&mut self) {
        if self.key.is_some() {
            let subs = self.subs;
            self.finish(&mut subs.lock(), true);
        }
    }
}

/// A subscription call's mark in [`State::asking`], taken away when it is dropped (also
/// when the call is: an HTTP client that went away).
struct Asking<'a> {
    subs: &'a Subscriptions,
    key: ResKey,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        let mut st = self.subs.lock();
        if let Some(n) = st.asking.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                st.asking.remove(&self.key);
            }
        }
    }
}

impl State {
    fn subscribers(&self, domain: &str, ep: &str, path: &str) -> Vec<String> {
        self.keys.subscribers(domain, ep, path)
    }

    /// Forgets the resource's observation (its token), for a device that left or refused
    /// it: nothing is sent.
    fn stop_observation(&mut self, key: &ResKey) {
        if let Some(id) = self.observations.remove(key) {
            self.observing.remove(&id);
        }
    }

    /// Ends the resource's observation on its device too, for one nobody is subscribed
    /// to any more: a GET with Observe = 1
    /// (`coap::client::FedObservation::cancel`), so that the device frees its observer
    /// slot (an outside review filled a device's slots by subscribing and unsubscribing
    /// one resource: it then refused every observe). Not to a queue-mode device, which
    /// sleeps: it learns of it by the RST to its next notification, as before.
    fn cancel_observation(&mut self, key: &ResKey) {
        let Some(id) = self.observations.remove(key) else {
            return;
        };
        let Some(o) = self.observing.remove(&id) else {
            return;
        };
        if o.endpoint.reg.queue {
            return;
        }
        if let Some(fed) = o.fed {
            fed.cancel();
        } else if let Some(held) = o.held {
            held.cancel();
        }
    }

    /// Forgets observation `id` (it ended), if it is still the resource's observation.
    fn remove_observation(&mut self, id: u64) -> Option<Observation> {
        let o = self.observing.remove(&id)?;
        if self.observations.get(&o.key) == Some(&id) {
            self.observations.remove(&o.key);
        }
        Some(o)
    }
}

/// What becomes of one of an endpoint's observations
/// ([`Subscriptions::end_observations`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// It stays.
    Keep,
    /// Its token is forgotten: the device's next notification gets RST.
    Forget,
    /// It is cancelled on the device too ([`State::cancel_observation`]).
    Cancel,
}

/// The subscriptions manager.
pub struct Subscriptions {
    directory: Arc<Directory>,
    requests: Arc<Requests>,
    hub: Arc<Hub>,
    store: Arc<dyn Store>,
    lua: Arc<LuaRules>,
    counters: Arc<Counters>,
    state: Mutex<State>,
    /// Counts notifications against the domains' quotas (none in unit tests).
    limits: Option<Arc<crate::limits::Limits>>,
    /// Endpoints whose pre-subscriptions are due (their registration or update was
    /// answered), with the newest registration of each: one evaluation task per endpoint
    /// at a time, which takes the newest one when it is done with the last, so waiting
    /// evaluations are bounded by the registered endpoints however often they update.
    /// Each with the time it became due (Unix ms; the first time, while it stays due): the
    /// oldest is what the store's watermark says is not settled yet
    /// ([`Subscriptions::run_presub_watermark`]).
    due: Mutex<Map<(String, String), Due>>,
    /// Where every observation's notifications go (issue 24): one task takes them in
    /// batches ([`Subscriptions::take_notifications`]).
    feed: FeedSender,
    /// The number of the next observation.
    next_observation: std::sync::atomic::AtomicU64,
    /// Notified whenever a subscription's store write ends ([`State::unwritten`]).
    written: tokio::sync::Notify,
}

/// How long after another node's removal of a subscription its observation may still
/// run here ([`Subscriptions::follow`]): the changes that follow it within this time are
/// applied first.
pub const FOLLOWED_PRUNE_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

/// How often the pre-subscriptions' watermark is written when it changed.
pub const PRESUB_WATERMARK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

fn presub_watermark_key(node: Option<&str>) -> String {
    match node {
        Some(n) => format!("presubs-settled-ms.{n}"),
        None => "presubs-settled-ms".to_string(),
    }
}

/// An endpoint whose pre-subscriptions are due: its newest registration, and since when
/// (Unix ms) it has been due.
type Due = (Arc<Endpoint>, u64);

fn lock_map<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The most notifications taken from the feed and stored in one write (issue 24): a
/// batch is what arrived, from every observation, while the one before was being stored.
const FEED_BATCH: usize = 4096;

/// RFC 7641 §3.4: is notification `v2` (received at `t2`) newer than `v1` (at `t1`)?
pub fn is_fresh(v1: u32, t1: Instant, v2: u32, t2: Instant) -> bool {
    const HALF: u32 = 1 << 23;
    (v1 < v2 && v2 - v1 < HALF) || (v1 > v2 && v1 - v2 > HALF) || t2 > t1 + Duration::from_secs(128)
}

impl Subscriptions {
    /// Loads stored subscriptions and pre-subscriptions. `requests` is the request layer
    /// this manager observes through, built before it; it reports the outcomes of observe
    /// requests into a channel whose receiver [`Subscriptions::run_reports`] drains, so
    /// the request layer holds no reference back to this manager.
    #[allow(clippy::too_many_arguments)]
    pub async fn load(
        directory: Arc<Directory>,
        requests: Arc<Requests>,
        hub: Arc<Hub>,
        store: Arc<dyn Store>,
        lua: Arc<LuaRules>,
        counters: Arc<Counters>,
        limits: Option<Arc<crate::limits::Limits>>,
    ) -> Result<Arc<Subscriptions>, StoreError> {
        let mut state = State::default();
        let subs = store.load_subscriptions().await?;
        // Subscriptions end with their endpoint's registration. A row whose endpoint is
        // not registered was left behind (its removal failed, or the process stopped
        // between the two writes): it is not loaded, and removed from the store, so that
        // the endpoint registering anew is not observed for a key that lost it.
        let (subs, stale): (Vec<_>, Vec<_>) = subs
            .into_iter()
            .partition(|s| directory.get(&s.domain, &s.ep).is_some());
        if !stale.is_empty() {
            let gone: BTreeSet<(String, String)> =
                stale.into_iter().map(|s| (s.key_id, s.ep)).collect();
            let mut removed = 0;
            for (key_id, ep) in gone {
                match store.delete_subscriptions(key_id, Some(ep), None).await {
                    Ok(()) => removed += 1,
                    // Not loaded all the same; the next start tries again.
                    Err(e) => crate::store::log_failure(
                        format_args!(
                            "store: cannot remove the subscriptions of an endpoint that is not registered"
                        ),
                        &e,
                    ),
                }
            }
            tracing::info!(
                "dropped the subscriptions of endpoints that are not registered ({removed} key/endpoint pairs)"
            );
        }
        let n = subs.len();
        for s in subs {
            let k = state.keys.entry(s.key_id).or_default();
            k.domain = s.domain;
            k.resources.insert(&s.ep, &s.path);
        }
        for p in store.load_presubscriptions().await? {
            let k = state.keys.entry(p.key_id).or_default();
            k.domain = p.domain;
            k.presubs = p.rules;
        }
        tracing::info!("loaded {n} subscriptions");
        let (feed, notifications) = crate::coap::client::observation_feed();
        let me = Arc::new(Subscriptions {
            directory,
            requests,
            hub,
            store,
            lua,
            counters,
            state: Mutex::new(state),
            limits,
            due: Mutex::new(Map::default()),
            feed,
            next_observation: std::sync::atomic::AtomicU64::new(1),
            written: tokio::sync::Notify::new(),
        });
        // Weak: the task ends when the manager is dropped (its observations, which hold
        // the feed's senders, with it).
        tokio::spawn(Subscriptions::take_notifications(
            Arc::downgrade(&me),
            notifications,
        ));
        Ok(me)
    }

    /// Takes the request layer's observation reports (see
    /// [`crate::requests::observation_reports`]) until `stop` fires or the request layer is
    /// gone. An established observation is taken at once (handed to the feed);
    /// a refusal ends the subscriptions in a task of its own (it writes to the store), so
    /// one slow write holds up no other endpoint's report. At stop the channel is closed
    /// and what was already in it is still handled; a report sent after that is dropped
    /// (an observation established during shutdown is cancelled).
    pub async fn run_reports(
        self: Arc<Self>,
        mut reports: ObservationReports,
        mut stop: crate::shutdown::Shutdown,
    ) {
        loop {
            tokio::select! {
                _ = stop.recv() => break,
                report = reports.0.recv() => match report {
                    Some(r) => self.take_report(r),
                    None => return,
                },
            }
        }
        reports.0.close();
        while let Some(r) = reports.0.recv().await {
            self.take_report(r);
        }
    }

    fn take_report(self: &Arc<Self>, report: ObservationReport) {
        match report {
            ObservationReport::Established {
                job,
                ep,
                first,
                stream,
                after_answer,
                done,
            } => {
                // Sent (or, the worker gone, run) outside the manager's lock.
                if let Some(a) = self.established(&job, &ep, first, stream) {
                    let _ = after_answer.send(a);
                }
                let _ = done.send(());
            }
            ObservationReport::Refused {
                job,
                ep,
                status,
                reason,
                done,
            } => {
                let me = Arc::clone(self);
                tokio::spawn(async move {
                    me.observation_refused(&job.domain, &ep, &job.path, status, &reason)
                        .await;
                    let _ = done.send(());
                });
            }
        }
    }

    /// The request layer this manager observes through.
    pub fn requests(&self) -> &Arc<Requests> {
        &self.requests
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps in the store (as plugin state of [`CORE_STATE_OWNER`], no plugin's) the time before
    /// which every endpoint's pre-subscriptions were evaluated: the oldest time an endpoint
    /// now due became due, or, once none is, the time that was seen; written at most every
    /// [`PRESUB_WATERMARK_EVERY`] and only when it changed (an idle daemon writes nothing).
    /// `node` names this node in a cluster (each node evaluates its own devices').
    ///
    /// Why: an endpoint's evaluation runs after its registration is answered, from memory;
    /// a daemon stopped or killed before it ran lost it for good, until the device's next
    /// update, hours away (found by an outside review: 25 of 100 subscriptions made after a
    /// restart). [`Subscriptions::redo_unsettled_presubs`] evaluates again, at start, the
    /// endpoints registered since the watermark. Decision: a watermark, not a record per
    /// endpoint, so a registration costs no store write more; an evaluation made twice adds
    /// nothing (what exists is not added again).
    pub async fn run_presub_watermark(
        self: Arc<Self>,
        node: Option<String>,
        mut stop: crate::shutdown::Shutdown,
    ) {
        let key = presub_watermark_key(node.as_deref());
        let mut tick = tokio::time::interval(PRESUB_WATERMARK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // What was last written: `Some(t)` while some were due, `None` once none was.
        let mut written: Option<Option<u64>> = None;
        loop {
            let stopping = tokio::select! {
                _ = stop.recv() => true,
                _ = tick.tick() => false,
            };
            let oldest = lock_map(&self.due).values().map(|(_, since)| *since).min();
            if written != Some(oldest) {
                let at = oldest.unwrap_or_else(now_ms);
                match self
                    .store
                    .plugin_state_put(
                        CORE_STATE_OWNER.into(),
                        key.clone(),
                        at.to_string().into_bytes(),
                    )
                    .await
                {
                    Ok(()) => written = Some(oldest),
                    Err(e) => crate::store::log_failure(
                        format_args!("store: the pre-subscriptions' watermark not written"),
                        &e,
                    ),
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// At start: evaluates again the pre-subscriptions of this node's endpoints registered
    /// since the stored watermark ([`Subscriptions::run_presub_watermark`]), whose
    /// evaluation a stop or a kill may have cut off. Returns how many were due again.
    pub async fn redo_unsettled_presubs(self: &Arc<Self>, node: Option<&str>) -> usize {
        let stored = self
            .store
            .plugin_state_get(CORE_STATE_OWNER.into(), presub_watermark_key(node))
            .await;
        let since = match stored {
            Ok(Some(v)) => match std::str::from_utf8(&v)
                .ok()
                .and_then(|t| t.parse::<u64>().ok())
            {
                Some(t) => t,
                None => return 0,
            },
            Ok(None) => return 0,
            Err(e) => {
                crate::store::log_failure(
                    format_args!("store: the pre-subscriptions' watermark not read"),
                    &e,
                );
                return 0;
            }
        };
        let eps = self.directory.registered_since(since, node);
        for ep in &eps {
            // Due since its registration: killed again before this evaluation ends, the
            // next start takes it again.
            self.presubs_due_at(ep, ep.reg.registered_at_ms);
        }
        eps.len()
    }

    /// Establishes the observations of stored subscriptions (at start), for endpoints that
    /// are registered and not in queue mode.
    pub fn resume(&self) {
        let wanted: BTreeSet<ResKey> = {
            let st = self.lock();
            st.keys
                .iter()
                .flat_map(|(id, k)| {
                    k.resources
                        .iter()
                        .filter(|(e, p)| self.hub.may_see(id, e, p))
                        .map(move |(e, p)| (k.domain.clone(), e.clone(), p.clone()))
                })
                .collect()
        };
        for (domain, ep, path) in wanted {
            if self
                .directory
                .get(&domain, &ep)
                .is_some_and(|e| !e.reg.queue)
            {
                self.requests.observe_internal(&domain, &ep, &path, false);
            }
        }
    }

    /// `PUT /subscriptions/{ep}/{path}`. For an endpoint another cluster node owns, the
    /// subscription is forwarded to that node (which stores it and observes the device,
    /// see [`crate::forward`]), and listed here once it answered.
    pub async fn subscribe(
        &self,
        who: &Principal,
        ep_name: &str,
        path: &str,
    ) -> Result<Subscribed, SubError> {
        self.subscribe_inner(who, ep_name, path, true).await
    }

    /// [`Subscriptions::subscribe`] forwarded here by another node: never forwarded
    /// again (an endpoint this node does not own is `RequestError::Elsewhere`).
    pub async fn subscribe_here(
        &self,
        who: &Principal,
        ep_name: &str,
        path: &str,
    ) -> Result<Subscribed, SubError> {
        self.subscribe_inner(who, ep_name, path, false).await
    }

    async fn subscribe_inner(
        &self,
        who: &Principal,
        ep_name: &str,
        path: &str,
        may_forward: bool,
    ) -> Result<Subscribed, SubError> {
        // Before the subscription is stored: its observe could never be sent.
        crate::requests::check_path(path)?;
        let ep = self
            .directory
            .get(&who.domain, ep_name)
            .ok_or_else(|| SubError::NotFound("endpoint not found".into()))?;
        // Before anything is stored here: the owner stores it (issue 22).
        if let Some(owner) = self.requests.owner_elsewhere(&ep) {
            let Some(f) = self.requests.forwarder().filter(|_| may_forward) else {
                return Err(SubError::Request(RequestError::Elsewhere {
                    ep: ep_name.to_string(),
                    owner: owner.to_string(),
                }));
            };
            let answer = f.subscribe(owner, who, ep_name, path).await?;
            // Stored by the owner: listed here at once (the watch brings it too).
            self.note(who, ep_name, path);
            return Ok(answer);
        }
        match ep.observable(path) {
            Some(true) => {}
            Some(false) => return Err(SubError::NotObservable),
            // Not said by the registration (a parent or child of a listed path): the
            // device decides when asked.
            None if resource_known(&ep, path) => {}
            None => {
                return Err(SubError::NotFound(format!(
                    "resource {path} is not found on the endpoint"
                )));
            }
        }
        let key: ResKey = (who.domain.clone(), ep_name.to_string(), path.to_string());
        *self.lock().asking.entry(key.clone()).or_default() += 1;
        let asking = Asking { subs: self, key };
        // The key's channel gets the notifications (and holds its restriction), also
        // when the resource is observed already and no request is made for the key.
        self.hub.ensure_channel(who).await?;
        let mut claim = self.claim(who, ep_name, path);
        let new = match self.add_if(who, ep_name, path, || true).await {
            Ok(new) => new,
            Err(e) => {
                self.settle(&mut claim, who, ep_name, path, false).await;
                return Err(e.into());
            }
        };
        let observed = {
            let mut st = self.lock();
            if new && let Some(c) = claim.key.as_ref().and_then(|k| st.claims.get_mut(k)) {
                c.made = true;
            }
            st.observations.contains_key(&asking.key)
        };
        if observed {
            self.settle(&mut claim, who, ep_name, path, true).await;
            return Ok(Subscribed::Active);
        }
        let submit = Submit {
            method: Some(Method::Observe),
            path: path.to_string(),
            ..Submit::default()
        };
        let submitted = self.requests.submit(who, ep_name, submit).await;
        drop(asking);
        // Refused (429, 503, ...): the client is told it is not subscribed, so a
        // subscription this call made is not kept either (it would be observed at the
        // device's next message), unless another call of the key kept it ([`Claim`]).
        // One that existed before stays.
        self.settle(&mut claim, who, ep_name, path, submitted.is_ok())
            .await;
        match submitted {
            Ok(Submitted::Accepted(id)) => Ok(Subscribed::Pending(id)),
            Ok(other) => {
                tracing::error!("unexpected answer to an observe request: {other:?}");
                Ok(Subscribed::Active)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Takes a part in the key's [`Claim`] on the resource, before the call stores the
    /// subscription.
    fn claim(&self, who: &Principal, ep: &str, path: &str) -> Claiming<'_> {
        let key: ResKey = (who.key_id.clone(), ep.to_string(), path.to_string());
        self.lock().claims.entry(key.clone()).or_default().calls += 1;
        Claiming {
            subs: self,
            key: Some(key),
        }
    }

    /// Ends a call's part in its [`Claim`] with its outcome (`kept`: it succeeded), and
    /// removes the subscription when the claim says so. The decision and the removal from
    /// memory are made under one lock, so a call that claims after it finds the
    /// subscription gone and stores it anew.
    async fn settle(
        &self,
        claim: &mut Claiming<'_>,
        who: &Principal,
        ep: &str,
        path: &str,
        kept: bool,
    ) {
        let durable = {
            let mut st = self.lock();
            if !claim.finish(&mut st, kept) {
                return;
            }
            match self.take_subscription(&mut st, who, ep, path) {
                Some(durable) => durable,
                None => return,
            }
        };
        if let Err(u) = self.removed(durable, who, ep, path).await {
            crate::store::log_failure(
                format_args!("a refused subscription to {ep}{path} is not removed"),
                &u,
            );
        }
    }

    /// Lists a subscription another node stored (no store write).
    fn note(&self, who: &Principal, ep: &str, path: &str) {
        let mut st = self.lock();
        let k = st.keys.entry(who.key_id.clone()).or_default();
        k.domain = who.domain.clone();
        k.resources.insert(ep, path);
    }

    /// Records a subscription (durably) if `still` holds under the state lock (so that
    /// a pre-subscription decided after its endpoint left is not recorded: the removal
    /// of a departed endpoint's subscriptions takes the same lock). True when the
    /// subscription is new.
    ///
    /// A subscription another call is storing is waited for (`State::unwritten`): found in
    /// memory before its store write ended, it would be reported as existing (and its
    /// client answered 202) although the write could still fail and take it out again.
    async fn add_if(
        &self,
        who: &Principal,
        ep: &str,
        path: &str,
        still: impl Fn() -> bool,
    ) -> Result<bool, StoreError> {
        let (durable, mut writing) = loop {
            // Made before the look, so that the end of the write it waits for wakes it.
            let written = self.written.notified();
            {
                let mut st = self.lock();
                if !still() {
                    return Ok(false);
                }
                let k = st.keys.entry(who.key_id.clone()).or_default();
                k.domain = who.domain.clone();
                if k.resources.insert(ep, path) {
                    let key: ResKey = (who.key_id.clone(), ep.to_string(), path.to_string());
                    st.unwritten.insert(key.clone(), ());
                    let durable = self.store.put_subscription(SubscriptionRecord {
                        key_id: who.key_id.clone(),
                        domain: who.domain.clone(),
                        ep: ep.to_string(),
                        path: path.to_string(),
                    });
                    break (
                        durable,
                        Writing {
                            subs: self,
                            key: Some(key),
                        },
                    );
                }
                let being_written = !st.unwritten.is_empty()
                    && st.unwritten.contains_key(&(
                        who.key_id.clone(),
                        ep.to_string(),
                        path.to_string(),
                    ));
                if !being_written {
                    return Ok(false);
                }
            }
            written.await;
        };
        let stored = durable.await;
        {
            let mut st = self.lock();
            writing.end(&mut st);
            if stored.is_err() {
                // Not stored, so not subscribed.
                if let Some(k) = st.keys.get_mut(&who.key_id) {
                    k.resources.remove(ep, path);
                }
                self.prune(&mut st);
            }
        }
        drop(writing);
        stored.map(|()| true)
    }

    /// Stops observations nobody is subscribed to any more.
    fn prune(&self, st: &mut State) {
        let orphans: Vec<ResKey> = st
            .observations
            .keys()
            .filter(|(d, e, p)| st.subscribers(d, e, p).is_empty())
            .cloned()
            .collect();
        for k in orphans {
            st.cancel_observation(&k);
        }
    }

    /// `DELETE /subscriptions/{ep}/{path}`: false when there was no such subscription.
    pub async fn unsubscribe(
        &self,
        who: &Principal,
        ep: &str,
        path: &str,
    ) -> Result<bool, StoreError> {
        let durable = {
            let mut st = self.lock();
            match self.take_subscription(&mut st, who, ep, path) {
                Some(durable) => durable,
                None => return Ok(false),
            }
        };
        self.removed(durable, who, ep, path).await?;
        Ok(true)
    }

    /// Takes the key's subscription to `path` out of memory (under the state lock `st`)
    /// and starts its delete in the store; `None` when there was none. The caller
    /// awaits [`Subscriptions::removed`].
    fn take_subscription(
        &self,
        st: &mut State,
        who: &Principal,
        ep: &str,
        path: &str,
    ) -> Option<crate::store::Pending<()>> {
        let removed = st
            .keys
            .get_mut(&who.key_id)
            .is_some_and(|k| k.resources.remove(ep, path));
        if !removed {
            return None;
        }
        self.prune(st);
        Some(self.store.delete_subscriptions(
            who.key_id.clone(),
            Some(ep.to_string()),
            Some(path.to_string()),
        ))
    }

    /// Awaits a delete [`Subscriptions::take_subscription`] started: if the store refused
    /// it, the subscription is still stored, so it is put back (and observed again).
    async fn removed(
        &self,
        durable: crate::store::Pending<()>,
        who: &Principal,
        ep: &str,
        path: &str,
    ) -> Result<(), StoreError> {
        if let Err(e) = durable.await {
            if let Some(k) = self.lock().keys.get_mut(&who.key_id) {
                k.resources.insert(ep, path);
            }
            if let Some(e) = self.directory.get(&who.domain, ep) {
                self.observe_missing(&e, false);
            }
            return Err(e);
        }
        Ok(())
    }

    /// `GET /subscriptions/{ep}`: the key's subscribed paths of an endpoint, those its
    /// restriction lets it see (a subscription made before the key was narrowed stays,
    /// unseen and undelivered, until the key is widened again or unsubscribes).
    pub fn list(&self, who: &Principal, ep: &str) -> Vec<String> {
        let st = self.lock();
        st.keys
            .get(&who.key_id)
            .map(|k| {
                k.resources
                    .paths_of(ep)
                    .filter(|p| who.may_access(ep, Some(p)))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `GET /subscriptions/{ep}/{path}`.
    pub fn is_subscribed(&self, who: &Principal, ep: &str, path: &str) -> bool {
        who.may_access(ep, Some(path))
            && self
                .lock()
                .keys
                .get(&who.key_id)
                .is_some_and(|k| k.resources.contains(ep, path))
    }

    /// `DELETE /subscriptions/{ep}`: false when the key had none there.
    pub async fn unsubscribe_endpoint(
        &self,
        who: &Principal,
        ep: &str,
    ) -> Result<bool, StoreError> {
        let durable = {
            let mut st = self.lock();
            let Some(k) = st.keys.get_mut(&who.key_id) else {
                return Ok(false);
            };
            let Some(paths) = k.resources.0.remove(ep) else {
                return Ok(false);
            };
            self.prune(&mut st);
            let taken = ResourceSet(Map::from_iter([(ep.to_string(), paths)]));
            let d = self
                .store
                .delete_subscriptions(who.key_id.clone(), Some(ep.to_string()), None);
            (taken, d)
        };
        let (taken, durable) = durable;
        if let Err(e) = durable.await {
            if let Some(k) = self.lock().keys.get_mut(&who.key_id) {
                k.resources.restore(taken);
            }
            if let Some(e) = self.directory.get(&who.domain, ep) {
                self.observe_missing(&e, false);
            }
            return Err(e);
        }
        Ok(true)
    }

    /// `DELETE /subscriptions` (and `DELETE /notification/callback`): every subscription
    /// of the key.
    pub async fn unsubscribe_all(&self, key_id: &str) -> Result<(), StoreError> {
        let (taken, durable) = {
            let mut st = self.lock();
            let taken = st
                .keys
                .get_mut(key_id)
                .map(|k| std::mem::take(&mut k.resources));
            self.prune(&mut st);
            let d = self
                .store
                .delete_subscriptions(key_id.to_string(), None, None);
            (taken, d)
        };
        if let Err(e) = durable.await {
            if let (Some(taken), Some(k)) = (taken, self.lock().keys.get_mut(key_id)) {
                k.resources.restore(taken);
            }
            return Err(e);
        }
        Ok(())
    }

    /// `GET /subscriptions`: the key's pre-subscription rules.
    pub fn presubscriptions(&self, key_id: &str) -> Vec<PreSub> {
        self.lock()
            .keys
            .get(key_id)
            .map(|k| k.presubs.clone())
            .unwrap_or_default()
    }

    /// `PUT /subscriptions`: replaces the rules, removes the key's subscriptions, and
    /// applies the new rules to the endpoints registered now.
    pub async fn set_presubscriptions(
        &self,
        who: &Principal,
        rules: Vec<PreSub>,
    ) -> Result<(), SubError> {
        self.hub.ensure_channel(who).await?;
        let (before, durable) = {
            let mut st = self.lock();
            let k = st.keys.entry(who.key_id.clone()).or_default();
            k.domain = who.domain.clone();
            let before = (
                std::mem::replace(&mut k.presubs, rules.clone()),
                std::mem::take(&mut k.resources),
            );
            // No prune here: see `settle_presubs`.
            let d = self.store.replace_presubscriptions(PresubRecord {
                key_id: who.key_id.clone(),
                domain: who.domain.clone(),
                rules: rules.clone(),
            });
            (before, d)
        };
        if let Err(e) = durable.await {
            // The stored rules and subscriptions are still the old ones: so is memory
            // (unless a later replacement already changed the rules).
            let mut st = self.lock();
            if let Some(k) = st.keys.get_mut(&who.key_id) {
                if k.presubs == rules {
                    k.presubs = before.0;
                }
                k.resources.restore(before.1);
            }
            drop(st);
            for ep in self.own_endpoints(&who.domain) {
                self.observe_missing(&ep, false);
            }
            return Err(e.into());
        }
        self.settle_presubs(&who.domain, &who.key_id).await;
        Ok(())
    }

    /// After a key's pre-subscription rules were replaced (its subscriptions taken out of
    /// memory): applies the new rules to this node's endpoints, then ends the observations
    /// nobody is subscribed to any more. Decision: the prune comes after the rules are
    /// applied, not before, so that a resource the new rules subscribe to again keeps its
    /// observation (a client that PUTs the same rules at every start made every matching
    /// device cancel and observe each resource again, and delivered its unchanged value
    /// once more). Meanwhile a notification of such a resource reaches nobody, as it
    /// would between the removal and the new observation.
    async fn settle_presubs(&self, domain: &str, key_id: &str) {
        self.apply_new_presubs(domain, key_id).await;
        self.prune_unsubscribed();
    }

    /// The endpoints of `domain` this node serves (on a cluster, those registered with
    /// it: the owner applies pre-subscriptions and observes, the other nodes only list).
    fn own_endpoints(&self, domain: &str) -> Vec<Arc<Endpoint>> {
        let mut eps = self.directory.list(domain, None);
        eps.retain(|e| self.requests.owner_elsewhere(e).is_none());
        eps
    }

    /// Applies a key's new pre-subscription rules to this node's endpoints of `domain`.
    async fn apply_new_presubs(&self, domain: &str, key_id: &str) {
        for ep in self.own_endpoints(domain) {
            self.apply_presubs(&ep, Some(key_id)).await;
            self.observe_missing(&ep, false);
        }
    }

    /// Applies a change another cluster node made to the subscriptions or
    /// pre-subscriptions (issue 22, the store's subscriptions watch) to memory, without
    /// writing to the store: a subscription is listed (and observed if this node owns
    /// the device and nobody observes it yet), a removed one is no longer listed, and new
    /// pre-subscription rules are applied to this node's endpoints, as the node that took
    /// them applies them to its own.
    ///
    /// True when a subscription was removed: the caller then calls
    /// [`Subscriptions::prune_unsubscribed`] soon (within [`FOLLOWED_PRUNE_AFTER`]), once the changes
    /// that follow it were applied, to end the observations nobody is subscribed to any
    /// more. Decision: not at once, because a key's pre-subscriptions replaced on another
    /// node arrive here as the deletes of its subscriptions first and the new rules after
    /// them; pruned at each delete, every resource the new rules subscribe to again was
    /// cancelled on its device and observed anew (as [`Subscriptions::settle_presubs`]
    /// avoids on the node that took the change).
    pub async fn follow(&self, change: crate::store::SubscriptionChange) -> bool {
        use crate::store::SubscriptionChange as C;
        match change {
            C::Put(rec) => {
                {
                    let mut st = self.lock();
                    let k = st.keys.entry(rec.key_id.clone()).or_default();
                    k.domain = rec.domain.clone();
                    if !k.resources.insert(&rec.ep, &rec.path) {
                        return false;
                    }
                }
                if let Some(ep) = self.directory.get(&rec.domain, &rec.ep)
                    && self.requests.owner_elsewhere(&ep).is_none()
                {
                    let only = BTreeSet::from([rec.path]);
                    self.observe_missing_among(&ep, Some(&only), false);
                }
            }
            C::Deleted { key_id, ep, path } => {
                return self
                    .lock()
                    .keys
                    .get_mut(&key_id)
                    .is_some_and(|k| k.resources.remove(&ep, &path));
            }
            C::Presubscriptions(rec) => {
                {
                    let mut st = self.lock();
                    let k = st.keys.entry(rec.key_id.clone()).or_default();
                    k.domain = rec.domain.clone();
                    k.presubs = rec.rules;
                    // The key's subscriptions were removed with the replacement (their
                    // deletes came first); whatever is left of them here goes too.
                    k.resources = ResourceSet::default();
                }
                self.settle_presubs(&rec.domain, &rec.key_id).await;
            }
            C::PresubscriptionsDeleted { key_id } => {
                if let Some(k) = self.lock().keys.get_mut(&key_id) {
                    k.presubs.clear();
                }
            }
        }
        false
    }

    /// Ends the observations nobody is subscribed to any more (after
    /// [`Subscriptions::follow`] removed a subscription).
    pub fn prune_unsubscribed(&self) {
        let mut st = self.lock();
        self.prune(&mut st);
    }

    /// Loads the subscriptions and pre-subscriptions from the store again and puts them
    /// in place of memory's (after the watch of other nodes' changes lagged), then
    /// observes what this node's endpoints lack. Stored rows of endpoints that are not
    /// registered are left out, not removed (the load at start removes them).
    pub async fn reload(&self) -> Result<(), StoreError> {
        let subs = self.store.load_subscriptions().await?;
        let presubs = self.store.load_presubscriptions().await?;
        let mut keys: Map<String, KeySubs> = Map::default();
        for s in subs {
            if self.directory.get(&s.domain, &s.ep).is_none() {
                continue;
            }
            let k = keys.entry(s.key_id).or_default();
            k.domain = s.domain;
            k.resources.insert(&s.ep, &s.path);
        }
        for p in presubs {
            let k = keys.entry(p.key_id).or_default();
            k.domain = p.domain;
            k.presubs = p.rules;
        }
        let domains: BTreeSet<String> = keys.values().map(|k| k.domain.clone()).collect();
        {
            let mut st = self.lock();
            *st.keys = keys;
            self.prune(&mut st);
        }
        for d in domains {
            for ep in self.own_endpoints(&d) {
                self.observe_missing(&ep, false);
            }
        }
        Ok(())
    }

    /// Offers the endpoint's observable resources to the rules of every key with a
    /// channel in its domain (or only `only_key`) and adds the subscriptions they ask for;
    /// returns the paths that got a new subscription. Observing them is the caller's next
    /// step ([`Subscriptions::observe_missing`]).
    async fn apply_presubs(&self, ep: &Endpoint, only_key: Option<&str>) -> BTreeSet<String> {
        let domain = &ep.reg.domain;
        let keys: Vec<(String, Vec<PreSub>)> = {
            let st = self.lock();
            let mut keys: Vec<(String, Vec<PreSub>)> = st
                .keys
                .iter()
                .filter(|(_, k)| &k.domain == domain)
                .map(|(id, k)| (id.clone(), k.presubs.clone()))
                .collect();
            for id in self.hub.channel_keys(domain) {
                if !keys.iter().any(|(k, _)| *k == id) {
                    keys.push((id, Vec::new()));
                }
            }
            keys
        };
        let mut added = BTreeSet::new();
        if keys.is_empty() {
            return added;
        }
        let subject = Subject {
            name: ep.reg.name.clone(),
            ept: ep.reg.ept.clone(),
            domain: domain.clone(),
            queue: ep.reg.queue,
            lifetime: ep.reg.lifetime_s,
            lwm2m: ep.reg.lwm2m.clone(),
        };
        let resources = ep.resources();
        let refused: BTreeSet<String> = {
            let st = self.lock();
            match st.refused.get(&(domain.clone(), ep.reg.name.clone())) {
                Some((id, paths)) if *id == ep.reg.id => paths.clone(),
                _ => BTreeSet::new(),
            }
        };
        // Every (key, resource) question first, so that the rules thread gets them in one
        // job; then the answers, the key's JSON rules where Lua has no opinion.
        let mut questions: Vec<Question> = Vec::new();
        let mut rules_of: Vec<(usize, usize)> = Vec::new();
        for (i, (key_id, rules)) in keys.iter().enumerate() {
            if only_key.is_some_and(|k| k != key_id) {
                continue;
            }
            let below = lwm2m_rule_paths(ep, rules);
            let candidates = resources
                .iter()
                .filter(|r| r.obs)
                .map(|r| Question {
                    key_id: key_id.clone(),
                    path: r.path.to_string(),
                    rt: r.rt.as_deref().map(str::to_string),
                    ct: r.ct.as_deref().map(str::to_string),
                    iface: r.iface.as_deref().map(str::to_string),
                    obs: r.obs,
                })
                .chain(below.into_iter().map(|path| Question {
                    key_id: key_id.clone(),
                    path,
                    rt: None,
                    ct: None,
                    iface: None,
                    obs: true,
                }))
                // Never on behalf of a key that may not see the resource: its rules are
                // kept as given, and applied within its restriction.
                .filter(|q| {
                    !refused.contains(&q.path) && self.hub.may_see(key_id, &ep.reg.name, &q.path)
                });
            for q in candidates {
                rules_of.push((i, questions.len()));
                questions.push(q);
            }
        }
        let answers = self.lua.evaluate(subject, questions.clone()).await;
        for ((i, q), answer) in rules_of.into_iter().zip(answers) {
            let (key_id, rules) = &keys[i];
            let q = &questions[q];
            let wanted = match answer {
                Some(answer) => answer,
                None => presub::any_match(rules, &ep.reg.name, ep.reg.ept.as_deref(), &q.path),
            };
            if !wanted {
                continue;
            }
            let who = Principal {
                backend: String::new(),
                key_id: key_id.clone(),
                domain: domain.clone(),
                scopes: Vec::new(),
                allow: None,
            };
            let current = || {
                self.directory
                    .get(domain, &ep.reg.name)
                    .is_some_and(|now| now.reg.id == ep.reg.id)
            };
            match self.add_if(&who, &ep.reg.name, &q.path, current).await {
                Ok(true) => {
                    added.insert(q.path.clone());
                }
                Ok(false) => {}
                Err(e) => {
                    crate::store::log_failure(format_args!("pre-subscription not stored"), &e)
                }
            }
        }
        added
    }

    /// After the reply to a registration or update: the endpoint's pre-subscriptions are
    /// evaluated (Lua rules run on their own thread, so this may wait) and what they ask
    /// for is observed. See [`Subscriptions::due`].
    fn presubs_due(self: &Arc<Self>, ep: &Arc<Endpoint>) {
        self.presubs_due_at(ep, now_ms());
    }

    /// [`Subscriptions::presubs_due`], due since `at` (Unix ms) for the watermark.
    fn presubs_due_at(self: &Arc<Self>, ep: &Arc<Endpoint>, at: u64) {
        // Decision: no task for a domain with no key that has pre-subscriptions,
        // subscriptions or a channel (what `apply_presubs` would look at, finding nothing
        // to do): most registrations of a fleet nobody subscribed to. Rules set later are
        // applied to the endpoints registered then (`set_presubscriptions`).
        let keys_here = {
            let st = self.lock();
            st.keys.values().any(|k| k.domain == ep.reg.domain)
        };
        if !keys_here && !self.hub.has_channel_in(&ep.reg.domain) {
            return;
        }
        let key = (ep.reg.domain.clone(), ep.reg.name.clone());
        let first = match lock_map(&self.due).entry(key.clone()) {
            // Due since it first was: only the endpoint is the newer one.
            std::collections::hash_map::Entry::Occupied(mut e) => {
                e.get_mut().0 = Arc::clone(ep);
                false
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert((Arc::clone(ep), at));
                true
            }
        };
        if !first {
            return;
        }
        let me = Arc::clone(self);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            lock_map(&self.due).remove(&key);
            tracing::error!("pre-subscriptions need a tokio runtime; not evaluated");
            return;
        };
        runtime.spawn(async move {
            loop {
                let Some(ep) = lock_map(&me.due).get(&key).map(|(ep, _)| Arc::clone(ep)) else {
                    return;
                };
                // Only the new ones: `after_reply` asked for the others already, and an
                // observe in flight is not yet an observation (it would go out twice).
                let added = me.apply_presubs(&ep, None).await;
                me.observe_missing_among(&ep, Some(&added), true);
                let mut due = lock_map(&me.due);
                if due.get(&key).is_some_and(|(e, _)| Arc::ptr_eq(e, &ep)) {
                    due.remove(&key);
                    return;
                }
            }
        });
    }

    /// Issue 22: `ep` moved to this node from another. Its subscriptions (made through any
    /// node) and every key's pre-subscriptions are read from the store and replace what
    /// memory held of them (this node loaded them at its start; other nodes changed them
    /// since), so that the observe requests after the device's answer
    /// ([`RegistryListener::after_reply`]: `observe_missing`, `presubs_due`) cover them.
    /// Decision: two whole reads per device that moves, as `Requests::adopt` (moves are
    /// rare); a failed read keeps memory as it was, logged.
    async fn adopt(&self, domain: &str, ep: &str) {
        let read = async {
            let subs = self.store.load_subscriptions().await?;
            let presubs = self.store.load_presubscriptions().await?;
            Ok::<_, StoreError>((subs, presubs))
        };
        let (subs, presubs) = match read.await {
            Ok(r) => r,
            Err(e) => {
                crate::store::log_failure(
                    format_args!("store: cannot load the subscriptions of {ep}, which moved here"),
                    &e,
                );
                return;
            }
        };
        let mut st = self.lock();
        for k in st.keys.values_mut().filter(|k| k.domain == domain) {
            k.resources.remove_endpoint(ep);
        }
        for s in subs
            .into_iter()
            .filter(|s| s.domain == domain && s.ep == ep)
        {
            let k = st.keys.entry(s.key_id).or_default();
            k.domain = s.domain;
            k.resources.insert(&s.ep, &s.path);
        }
        let stored: BTreeSet<String> = presubs.iter().map(|p| p.key_id.clone()).collect();
        for (id, k) in st.keys.iter_mut() {
            if !stored.contains(id) {
                k.presubs.clear();
            }
        }
        for p in presubs {
            let k = st.keys.entry(p.key_id).or_default();
            k.domain = p.domain;
            k.presubs = p.rules;
        }
    }

    /// Queues an observe for every subscribed resource of `ep` that has no observation.
    fn observe_missing(&self, ep: &Endpoint, awake: bool) {
        self.observe_missing_among(ep, None, awake);
    }

    /// [`Subscriptions::observe_missing`], for the paths in `only` when given.
    fn observe_missing_among(&self, ep: &Endpoint, only: Option<&BTreeSet<String>>, awake: bool) {
        if only.is_some_and(BTreeSet::is_empty) {
            return;
        }
        // The state stays locked until the observes are queued: an observe in flight is
        // seen either as an observation here (its outcome taken, which needs this lock)
        // or as in flight by `observe_internal` (the request layer clears that only after
        // the manager took the outcome). Checked one after the other with the lock
        // released between, an observe that was established and finished in between was
        // seen as neither, and a second one was sent (CI, issue 24:
        // `subscriptions::an_update_while_the_observe_is_in_flight_observes_once`).
        let st = self.lock();
        let missing: Vec<String> = {
            let mut paths: BTreeSet<String> = BTreeSet::new();
            for (id, k) in st.keys.iter().filter(|(_, k)| k.domain == ep.reg.domain) {
                paths.extend(
                    k.resources
                        .paths_of(&ep.reg.name)
                        .filter(|p| self.hub.may_see(id, &ep.reg.name, p))
                        .cloned(),
                );
            }
            paths
                .into_iter()
                .filter(|p| only.is_none_or(|only| only.contains(p)))
                .filter(|p| {
                    let key = (ep.reg.domain.clone(), ep.reg.name.clone(), p.clone());
                    !st.observations.contains_key(&key) && !st.asking.contains_key(&key)
                })
                .collect()
        };
        for p in missing {
            self.requests
                .observe_internal(&ep.reg.domain, &ep.reg.name, &p, awake);
        }
        drop(st);
    }

    /// Removes every key's subscriptions of an endpoint that de-registered or expired.
    async fn remove_endpoint_everywhere(&self, domain: &str, ep: &str) {
        let (_, durable) = {
            let mut st = self.lock();
            st.refused.remove(&(domain.to_string(), ep.to_string()));
            self.remove_everywhere(&mut st, domain, ep, None)
        };
        for d in durable {
            if let Err(e) = d.await {
                crate::store::log_failure(
                    format_args!("subscriptions of a departed endpoint {ep} not removed"),
                    &e,
                );
            }
        }
    }

    /// Removes `ep`'s subscription to `path` (all of `ep`'s with `None`) from every key of
    /// `domain`; the store deletes are submitted under the lock, so the store applies them
    /// in memory's order. Returns the keys that had one and the deletes to await.
    fn remove_everywhere(
        &self,
        st: &mut State,
        domain: &str,
        ep: &str,
        path: Option<&str>,
    ) -> (Vec<String>, Vec<crate::store::Pending<()>>) {
        let keys: Vec<String> = st
            .keys
            .iter_mut()
            .filter(|(_, k)| k.domain == domain)
            .filter_map(|(id, k)| {
                let had = match path {
                    Some(p) => k.resources.remove(ep, p),
                    None => k.resources.remove_endpoint(ep),
                };
                had.then(|| id.clone())
            })
            .collect();
        let durable = keys
            .iter()
            .map(|k| {
                self.store.delete_subscriptions(
                    k.clone(),
                    Some(ep.to_string()),
                    path.map(str::to_string),
                )
            })
            .collect();
        (keys, durable)
    }

    /// The device refused to be observed at `path` (an error code, or an answer without
    /// Observe), or ended an observation: every key's subscription to it is removed and
    /// each such key's channel gets a `subscription-errors` entry, so the failure is
    /// never silent. Pre-subscriptions do not ask for the path again until the device
    /// registers anew.
    async fn observation_refused(
        &self,
        domain: &str,
        ep: &Endpoint,
        path: &str,
        status: u16,
        reason: &str,
    ) {
        let ep_name = ep.reg.name.as_str();
        let (keys, durable) = {
            let mut st = self.lock();
            let refused = st
                .refused
                .entry((domain.to_string(), ep_name.to_string()))
                .or_default();
            if refused.0 != ep.reg.id {
                *refused = (ep.reg.id.clone(), BTreeSet::new());
            }
            refused.1.insert(path.to_string());
            st.stop_observation(&(domain.to_string(), ep_name.to_string(), path.to_string()));
            self.remove_everywhere(&mut st, domain, ep_name, Some(path))
        };
        for d in durable {
            if let Err(e) = d.await {
                crate::store::log_failure(
                    format_args!("refused subscription {ep_name} {path} not removed"),
                    &e,
                );
            }
        }
        if log_budget::allow(DeviceLine::ObservationNotEstablished) {
            tracing::info!(ep = %ep_name, %path, status, subscribers = keys.len(), "subscription ended: {reason}");
        }
        let entry = Entry::SubscriptionError(SubscriptionError {
            ep: ep_name.to_string(),
            path: path.to_string(),
            status,
            error: reason.to_string(),
        });
        self.publish_to(keys, entry, (ep_name, path)).await;
    }

    /// Publishes one event entry about `ep`'s `path` to each of `keys`, in one store write
    /// (the hub leaves out the keys whose restriction does not let them see it).
    async fn publish_to(&self, keys: Vec<String>, entry: Entry, (ep, path): (&str, &str)) {
        let event = Event::new(entry, now_ms());
        self.hub
            .publish_to_keys(&keys, event, crate::events::About::Resource(ep, path))
            .await;
    }

    /// Stops the observations of `ep` made at another address than the one it updated
    /// its registration from (a NAT that gave it a new port, a new DTLS session): their
    /// notifications may now come from where the observe did not go, which the message
    /// layer rejects (RFC 7252 §5.3.2). `after_reply` then observes the resources again
    /// at the new address, and the device's old observations end at their next
    /// notification (RST).
    fn forget_moved_observations(&self, ep: &Endpoint) {
        let (domain, name) = (&ep.reg.domain, &ep.reg.name);
        let moved = |o: Option<&Observation>| match o {
            Some(o) if o.endpoint.reg.peer != ep.reg.peer => Ending::Forget,
            _ => Ending::Keep,
        };
        for (_, _, path) in self.end_observations(domain, name, moved) {
            tracing::debug!(ep = %name, %path, to = %ep.reg.peer, "observing again at the device's new address");
        }
    }

    /// Drops the endpoint's observations (it expired, or another node took it).
    fn forget_observations(&self, domain: &str, ep: &str) {
        self.end_observations(domain, ep, |_| Ending::Forget);
    }

    /// Ends the endpoint's observations as `decide` says for each (given the
    /// observation, if its number still names one); returns the keys of those ended.
    /// [`Ending::Cancel`] ends one on the device too ([`State::cancel_observation`]): for
    /// a device that registered again from the address they went to, or whose
    /// registration was removed (`DELETE /endpoints/{name}`, or its own de-registration):
    /// found by an outside review with aiocoap, which keeps an observer per token as RFC
    /// 7641 §2 describes, so that each re-registration without a reboot (after a
    /// `DELETE`, whose update is then 4.04) left one more observer, until a resource that
    /// never changes could not be observed (412). The new observes wait for these
    /// cancellations (`coap::client`'s `after_cancels`), so clients that remove observers
    /// by path lose nothing. A device that de-registered itself and went away costs its
    /// cancellations' retransmissions, within `MAX_CANCELS`.
    fn end_observations(
        &self,
        domain: &str,
        ep: &str,
        decide: impl Fn(Option<&Observation>) -> Ending,
    ) -> Vec<ResKey> {
        let mut st = self.lock();
        let ended: Vec<(ResKey, Ending)> = st
            .observations
            .iter()
            .filter(|((d, e, _), _)| d == domain && e == ep)
            .map(|(k, id)| (k.clone(), decide(st.observing.get(id))))
            .filter(|(_, how)| *how != Ending::Keep)
            .collect();
        for (k, how) in &ended {
            if *how == Ending::Cancel {
                st.cancel_observation(k);
            } else {
                st.stop_observation(k);
            }
        }
        ended.into_iter().map(|(k, _)| k).collect()
    }

    /// Leaves out the `replies` over the domain's transaction quota (counted as refused);
    /// false when none is left.
    fn within_quota(
        &self,
        domain: &str,
        ep: &str,
        path: &str,
        replies: &mut Vec<CoapReply>,
    ) -> bool {
        if let Some(l) = self.limits.as_ref() {
            replies.retain(|_| l.take(domain).is_ok());
            if replies.is_empty() {
                tracing::debug!(%ep, %path, "notification dropped: the domain's transaction quota is used up");
            }
        }
        !replies.is_empty()
    }

    /// The `notifications` events of `replies`.
    fn events(&self, ep: &str, path: &str, replies: Vec<CoapReply>, created: u64) -> Vec<Event> {
        replies
            .into_iter()
            .map(|r| Event::new(Entry::Notification(notification(ep, path, &r)), created))
            .collect()
    }

    /// Takes the notifications of every observation from the feed until the manager is
    /// gone: what arrived while the last batch was being stored is taken at once (at
    /// most [`FEED_BATCH`]) and stored in one write (issue 24: a task per observation
    /// made a wake-up, a store job and a wait for every notification).
    async fn take_notifications(me: std::sync::Weak<Subscriptions>, mut feed: ObservationFeed) {
        let mut items = Vec::with_capacity(FEED_BATCH);
        while feed.recv_many(&mut items, FEED_BATCH).await > 0 {
            let Some(me) = me.upgrade() else { return };
            me.notify_batch(&mut items).await;
            items.clear();
        }
    }

    /// Publishes a batch from the feed: each observation's fresh notifications in order
    /// to its subscribers, all in one store write; then acknowledges the CON ones, and
    /// ends the observations the device ended (an error, or a response without Observe:
    /// what follows it in the batch is dropped). Items of observations that were stopped
    /// meanwhile are dropped (their held ACKs forgotten).
    async fn notify_batch(self: &Arc<Self>, items: &mut Vec<FeedItem>) {
        struct Taken {
            id: u64,
            key: ResKey,
            replies: Vec<CoapReply>,
            ended: Option<CoapReply>,
            subscribers: Arc<[String]>,
            cache: Arc<crate::requests::CacheSlot>,
            /// The observation's last number before this batch (put back if the batch
            /// is not stored, so that the device's retransmissions are fresh).
            last_before: (u32, Instant),
            /// Some of its notifications wait for their ACKs (CON over UDP or DTLS): if
            /// the batch is not stored, they are taken out again and sent anew by the
            /// device ([`crate::events::Undo::Unqueue`]); the others stay queued.
            held: bool,
            /// Where a notification of the batch came from (the device is awake there).
            woke_from: Option<std::net::SocketAddr>,
        }
        let mut taken: Vec<Taken> = Vec::new();
        let mut index: Map<u64, usize> = Map::default();
        let mut acks = Vec::new();
        {
            let mut st = self.lock();
            let State {
                observing, keys, ..
            } = &mut *st;
            let now = Instant::now();
            for item in items.iter_mut() {
                let id = item.observation();
                let Some(o) = observing.get_mut(&id) else {
                    continue;
                };
                let t = *index.entry(id).or_insert_with(|| {
                    taken.push(Taken {
                        id,
                        key: o.key.clone(),
                        replies: Vec::new(),
                        ended: None,
                        subscribers: o.subscribers.of(keys, (&o.key.0, &o.key.1, &o.key.2)),
                        cache: Arc::clone(&o.cache),
                        last_before: o.last,
                        held: false,
                        woke_from: None,
                    });
                    taken.len() - 1
                });
                let t = &mut taken[t];
                if t.ended.is_some() {
                    continue;
                }
                if let Some(ack) = item.take_ack() {
                    t.held = true;
                    acks.push((id, ack));
                }
                if let Some(from) = item.from() {
                    t.woke_from = Some(from);
                }
                let reply = item.take_reply();
                if reply.code.is_error() || reply.observe.is_none() {
                    t.ended = Some(reply);
                    continue;
                }
                let seq = reply.observe.unwrap_or(0);
                if item.is_first() {
                    // An internal observe's first value: its number is `last` already.
                    t.replies.push(reply);
                } else if is_fresh(o.last.0, o.last.1, seq, now) {
                    o.last = (seq, now);
                    Counters::inc(&self.counters.observe_notifications);
                    t.replies.push(reply);
                } else {
                    Counters::inc(&self.counters.observe_stale);
                }
            }
        }
        // Dropped here: the items not taken (their ACKs forgotten).
        items.clear();
        let created = now_ms();
        let mut published: Vec<(Vec<Event>, usize)> = Vec::new();
        let mut moved_slots = Vec::new();
        for (i, t) in taken.iter_mut().enumerate() {
            let (domain, ep, path) = &t.key;
            let mut replies = std::mem::take(&mut t.replies);
            if replies.is_empty() || !self.within_quota(domain, ep, path, &mut replies) {
                continue;
            }
            if let Some(newest) = replies.last()
                && self.requests.cache_put_at(
                    &mut t.cache,
                    (domain, ep, path),
                    &newest.payload,
                    newest.content_format,
                    newest.max_age,
                )
            {
                moved_slots.push((t.id, Arc::clone(&t.cache)));
            }
            published.push((self.events(ep, path, replies, created), i));
        }
        if !moved_slots.is_empty() {
            // The endpoint's values were forgotten and the resource was looked up again:
            // its observation keeps the new place.
            let mut st = self.lock();
            for (id, slot) in moved_slots {
                if let Some(o) = st.observing.get_mut(&id) {
                    o.cache = slot;
                }
            }
        }
        let mut forwarding = crate::events::Forwarding::default();
        if !published.is_empty() {
            use crate::events::{About, Undo};
            let batch: Vec<(&[String], &[Event], About<'_>, Undo)> = published
                .iter()
                .map(|(events, i)| {
                    let t = &taken[*i];
                    let (_, ep, path) = &t.key;
                    (
                        &*t.subscribers,
                        events.as_slice(),
                        About::Resource(ep, path),
                        if t.held { Undo::Unqueue } else { Undo::Keep },
                    )
                })
                .collect();
            forwarding = self.hub.publish_batch(&batch).await;
        }
        // Stored: the devices' CON notifications are acknowledged now; in a cluster, once
        // the nodes that own the other keys' channels stored theirs too, waited for
        // beside the feed so that a slow or lost peer holds up no other batch.
        if forwarding.failed_here() {
            // Not stored: nothing is acknowledged (the held ACKs are dropped, so the
            // duplicate cache forgets them), and the observations that waited for ACKs
            // (their notifications taken out of the queues again) get their number back,
            // so that the device's retransmissions are taken as new. The others' stay
            // queued in memory: their devices will not send them again.
            drop(acks);
            let mut st = self.lock();
            for (_, i) in &published {
                let t = &taken[*i];
                if t.held
                    && let Some(o) = st.observing.get_mut(&t.id)
                {
                    o.last = t.last_before;
                }
            }
        } else if forwarding.is_empty() {
            for (_, a) in acks {
                a.send().await;
            }
        } else if !acks.is_empty() {
            // Forwarded to other nodes' channels: the observations whose notifications
            // went (also) to another node's channel are acknowledged once every owner
            // stored its events; the others at once (stored here, their keys' channels are
            // here). If an owner did not store them (no answer within the forwarding
            // bound, or its store refused), the forwarded ones are not acknowledged, as
            // when this node's store refuses: they get their number back (unless a newer
            // notification moved it since), so that the device's retransmissions are
            // taken as new and forwarded again. Decision: at least once; the keys whose
            // channels stored the first copy get the retransmission too.
            let elsewhere: Vec<u64> = published
                .iter()
                .enumerate()
                .filter(|(g, _)| forwarding.went_elsewhere(*g))
                .map(|(_, (_, i))| taken[*i].id)
                .collect();
            let (acks, now): (Vec<_>, Vec<_>) =
                acks.into_iter().partition(|(id, _)| elsewhere.contains(id));
            for (_, a) in now {
                a.send().await;
            }
            // (observation, its number before the batch, its number after it)
            type Restore = (u64, (u32, Instant), (u32, Instant));
            let restore: Vec<Restore> = {
                let st = self.lock();
                published
                    .iter()
                    .map(|(_, i)| &taken[*i])
                    .filter(|t| t.held && elsewhere.contains(&t.id))
                    .filter_map(|t| {
                        let o = st.observing.get(&t.id)?;
                        Some((t.id, t.last_before, o.last))
                    })
                    .collect()
            };
            let me = Arc::downgrade(self);
            tokio::spawn(async move {
                if forwarding.wait().await {
                    for (_, a) in acks {
                        a.send().await;
                    }
                    return;
                }
                drop(acks);
                if let Some(me) = me.upgrade() {
                    let mut st = me.lock();
                    for (id, before, after) in restore {
                        if let Some(o) = st.observing.get_mut(&id)
                            && o.last == after
                        {
                            o.last = before;
                        }
                    }
                }
            });
        }
        // A queue-mode device that wakes with a notification is sent what waits for it,
        // as after an update (OMA LwM2M 1.0, queue mode: the server checks its queue on
        // any message from the client). Before, only its next update did.
        let mut woke: Vec<&ResKey> = Vec::new();
        for t in &taken {
            let Some(from) = t.woke_from else { continue };
            if !woke.iter().any(|k| k.0 == t.key.0 && k.1 == t.key.1) {
                woke.push(&t.key);
                self.requests.device_spoke(&t.key.0, &t.key.1, from);
            }
        }
        for t in taken {
            let Some(reply) = t.ended else { continue };
            self.observation_ended(t.id, reply);
        }
    }

    /// The device ended observation `id` (an error code, or a response without
    /// Observe): it is forgotten and its subscribers are told, as for a refused observe.
    fn observation_ended(self: &Arc<Self>, id: u64, reply: CoapReply) {
        let Some(o) = self.lock().remove_observation(id) else {
            return;
        };
        let (domain, ep_name, path) = &o.key;
        if log_budget::allow(DeviceLine::ObservationEnded) {
            tracing::info!(ep = %ep_name, %path, code = ?reply.code, "the device ended the observation");
        }
        let (status, reason) = if reply.code.is_error() {
            (
                crate::requests::http_status(reply.code),
                format!("the device ended the observation with {:?}", reply.code),
            )
        } else {
            (
                412,
                "the device ended the observation (a response without Observe)".into(),
            )
        };
        let me = Arc::clone(self);
        let (domain, path, endpoint) = (domain.clone(), path.clone(), o.endpoint.clone());
        // The token goes now (the device's next notification gets RST); telling the
        // subscribers writes to the store, so it does not hold up the feed.
        drop(o);
        tokio::spawn(async move {
            me.observation_refused(&domain, &endpoint, &path, status, &reason)
                .await;
        });
    }
}

/// For a device that observes freely (an LwM2M client: [`Endpoint::observes_freely`]),
/// the concrete paths (no `*`) of `rules` that lie below a path it listed without being
/// listed themselves: an LwM2M client lists objects and instances, and everything below
/// them is observable, so a rule naming `/3303/0/5700` applies to a device that listed
/// `</3303/0>`.
fn lwm2m_rule_paths(ep: &Endpoint, rules: &[PreSub]) -> BTreeSet<String> {
    if !ep.observes_freely() {
        return BTreeSet::new();
    }
    rules
        .iter()
        .filter(|r| r.matches_endpoint(&ep.reg.name, ep.reg.ept.as_deref()))
        .flat_map(|r| r.resource_path.iter().flatten())
        .filter(|p| !p.contains('*'))
        .filter(|p| {
            ep.paths().all(|(have, _)| have != p.as_str())
                && ep
                    .paths()
                    .any(|(have, _)| crate::registry::is_at_or_below(p, have))
        })
        .cloned()
        .collect()
}

/// A `notifications` entry: `ep`, `path`, `ct` (described), the payload, `max-age` (the
/// device's, else [`DEFAULT_MAX_AGE`]).
pub fn notification(ep: &str, path: &str, reply: &CoapReply) -> Notification {
    Notification {
        ep: ep.to_string(),
        path: path.to_string(),
        ct: reply.content_format.map(content_format::describe),
        payload: reply.payload.to_vec(),
        max_age: reply.max_age.unwrap_or(DEFAULT_MAX_AGE),
    }
}

impl Subscriptions {
    /// An observation of `job.path` on `ep` is established (reported by the request
    /// layer); `first` is the device's first response. Its notifications go to the feed
    /// ([`Subscriptions::take_notifications`]); an internal observe's first value (it has
    /// no async response to carry it) is published before them.
    /// Takes an established observation. An internal observe's first value (it has no
    /// async response to carry it) is published by the feed, before the notifications
    /// that follow it. Otherwise the first value is the job's async response: the
    /// notifications wait in the observation's stream until it is published, and the
    /// returned [`AfterAnswer`] (run by the request worker then) hands them to the feed,
    /// so that no channel gets a newer value before the first (the observation is in
    /// the map meanwhile, so an unsubscription finds it).
    fn established(
        self: &Arc<Self>,
        job: &Job,
        ep: &Endpoint,
        first: CoapReply,
        stream: ObserveStream,
    ) -> Option<AfterAnswer> {
        let key: ResKey = (job.domain.clone(), job.ep.clone(), job.path.clone());
        let mut st = self.lock();
        if st.subscribers(&key.0, &key.1, &key.2).is_empty() {
            // Unsubscribed while the observe was on its way: the device observes for
            // nobody. It has just answered, so it is awake in queue mode too.
            stream.cancel();
            return None;
        }
        // An observation of the resource made before (observed again) is only forgotten:
        // the device replaced its entry with this one (RFC 7641 §4.1, same client and
        // resource), and a cancellation could end this one on a client that removes
        // observers by path (Wakaama; found by a review). A device that kept both learns
        // of the old one by the RST to its next notification.
        st.stop_observation(&key);
        let id = self
            .next_observation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let last = (first.observe.unwrap_or(0), Instant::now());
        let (fed, held, after_answer) = if job.internal {
            (
                Some(stream.into_feed(id, &self.feed, Some(first))),
                None,
                None,
            )
        } else {
            let me = Arc::downgrade(self);
            let after = AfterAnswer::new(move || {
                if let Some(me) = me.upgrade() {
                    me.hand_over(id);
                }
            });
            (None, Some(stream), Some(after))
        };
        tracing::debug!(ep = %key.1, path = %key.2, registration = %ep.reg.id, "observing");
        let cache = self.requests.cache_slot(&key.0, &key.1, &key.2);
        st.observations.insert(key.clone(), id);
        st.observing.insert(
            id,
            Observation {
                key,
                fed,
                held,
                last,
                endpoint: ep.clone(),
                subscribers: Subscribers::default(),
                cache,
            },
        );
        after_answer
    }

    /// The async response of the observe that made observation `id` is published (or
    /// the job ended without one): its held notifications go to the feed, the first
    /// value before them. Nothing if the observation ended meanwhile.
    fn hand_over(&self, id: u64) {
        let mut st = self.lock();
        if let Some(o) = st.observing.get_mut(&id)
            && let Some(stream) = o.held.take()
        {
            o.fed = Some(stream.into_feed(id, &self.feed, None));
        }
    }
}

/// Listens to the registry for the subscriptions manager (which spawns the evaluation of
/// pre-subscriptions, hence the `Arc`). Strong: the manager refers to the registry's read
/// model only, so the registry holding it makes no cycle.
pub struct SubscriptionsListener(pub Arc<Subscriptions>);

impl RegistryListener for SubscriptionsListener {
    /// Observe requests go out once the device has its registration answer; so do
    /// pre-subscriptions (the registration reply never waits on rules).
    fn after_reply(&self, ev: &RegistryEvent) {
        self.0.observe_missing(ev.endpoint(), true);
        self.0.presubs_due(ev.endpoint());
    }

    /// Issue 22: the device came from another node: its subscriptions and the
    /// pre-subscriptions are read again, and `after_reply` observes them from here.
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
        let subs = &self.0;
        Box::pin(async move {
            let ep = ev.endpoint();
            match ev {
                RegistryEvent::Registered { .. } => {
                    // A full registration: a device that rebooted forgot its observations,
                    // one that registered again without (after a DELETE) kept them.
                    subs.end_observations(&ep.reg.domain, &ep.reg.name, |o| match o {
                        Some(o) if o.endpoint.reg.peer == ep.reg.peer => Ending::Cancel,
                        _ => Ending::Forget,
                    });
                }
                // Pre-subscriptions are applied after the reply (`after_reply`), and so
                // are the observations made again of a device whose address changed.
                RegistryEvent::Updated { .. } => subs.forget_moved_observations(ep),
                // Another node owns the device now and observes it; the subscriptions
                // (shared in the store) stay.
                RegistryEvent::Moved(_) => subs.forget_observations(&ep.reg.domain, &ep.reg.name),
                // The node that removed it removed its subscriptions from the store.
                RegistryEvent::RemovedElsewhere(_) => {
                    subs.forget_observations(&ep.reg.domain, &ep.reg.name)
                }
                RegistryEvent::Deregistered(_) | RegistryEvent::Expired(_) => {
                    // Decision: an endpoint that leaves takes its subscriptions with it
                    // (seed 000: `GET /subscriptions/{ep}` is 404 for an endpoint that is
                    // not found); pre-subscriptions make them again when it registers.
                    // A removed one may be there still (cancelled on it); an expired one
                    // has not been heard of for its lifetime (forgotten).
                    let removed = matches!(ev, RegistryEvent::Deregistered(_));
                    let how = |o: Option<&Observation>| match o {
                        Some(_) if removed => Ending::Cancel,
                        _ => Ending::Forget,
                    };
                    subs.end_observations(&ep.reg.domain, &ep.reg.name, how);
                    subs.remove_endpoint_everywhere(&ep.reg.domain, &ep.reg.name)
                        .await;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 24: an observation's list of subscribers is kept until the keys change: any
    /// change (a key subscribing, one unsubscribing) makes it look them up again.
    #[test]
    fn an_observations_subscribers_follow_every_change_of_the_keys() {
        let res = ("d", "ep", "/3/0/0");
        let mut keys = Keys::default();
        let subscribe = |keys: &mut Keys, id: &str| {
            let k = keys.entry(id.to_string()).or_default();
            k.domain = "d".into();
            k.resources.insert("ep", "/3/0/0");
        };
        subscribe(&mut keys, "k1");
        let mut subs = Subscribers::default();
        let first = subs.of(&keys, res);
        assert_eq!(&*first, ["k1".to_string()]);
        assert!(
            Arc::ptr_eq(&first, &subs.of(&keys, res)),
            "kept while nothing changed"
        );
        subscribe(&mut keys, "k2");
        let mut now = subs.of(&keys, res).to_vec();
        now.sort();
        assert_eq!(now, ["k1", "k2"]);
        keys.get_mut("k1").unwrap().resources.remove("ep", "/3/0/0");
        assert_eq!(&*subs.of(&keys, res), ["k2".to_string()]);
        keys.remove("k2");
        assert!(subs.of(&keys, res).is_empty());
    }

    #[test]
    fn resource_sets_answer_by_endpoint_and_path() {
        let mut r = ResourceSet::default();
        assert!(r.insert("b", "/3/0/1"));
        assert!(r.insert("a", "/3303/0/5700"));
        assert!(r.insert("b", "/3/0/0"));
        assert!(!r.insert("b", "/3/0/0"), "already there");
        assert!(r.contains("b", "/3/0/0"));
        assert!(!r.contains("b", "/3303/0/5700"));
        assert!(!r.contains("c", "/3/0/0"));
        let mut all: Vec<String> = r.iter().map(|(e, p)| format!("{e}{p}")).collect();
        all.sort();
        assert_eq!(all, vec!["a/3303/0/5700", "b/3/0/0", "b/3/0/1"]);
        assert_eq!(
            r.paths_of("b").collect::<Vec<_>>(),
            vec!["/3/0/0", "/3/0/1"],
            "an endpoint's paths in order"
        );
        assert!(r.remove("a", "/3303/0/5700"));
        assert!(!r.remove("a", "/3303/0/5700"));
        assert_eq!(
            r.paths_of("a").count(),
            0,
            "an endpoint with no path left is gone"
        );
        assert!(r.remove_endpoint("b"));
        assert!(!r.remove_endpoint("b"));
        assert_eq!(r.iter().count(), 0);
    }

    #[test]
    fn notification_entries_carry_the_reply_and_the_default_max_age() {
        let mut reply = CoapReply {
            code: coap_lite::ResponseType::Content,
            payload: b"21.5".to_vec(),
            content_format: Some(0),
            max_age: None,
            observe: Some(3),
            location: None,
            token: vec![1],
        };
        assert_eq!(
            notification("ep1", "/3303/0/5700", &reply),
            Notification {
                ep: "ep1".into(),
                path: "/3303/0/5700".into(),
                ct: Some("text/plain".into()),
                payload: b"21.5".to_vec(),
                max_age: 60,
            }
        );
        reply.content_format = None;
        reply.max_age = Some(5);
        let n = notification("ep1", "/3/0/0", &reply);
        assert_eq!((n.ct, n.max_age), (None, 5));
    }
}
