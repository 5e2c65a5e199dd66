//! The notification hub: one ordered, durable queue per access key.
//!
//! Publishing submits each event to the store under the hub lock, which numbers it in its
//! key's sequence (`EventLog::append_events`), queues it with that number and returns once
//! it is durable. Events are typed ([`Event`]); the REST edge renders a long-poll answer's
//! batch, the sink each callback batch. A long-poll is answered with
//! the oldest events, which stay queued and stored as the key's *answer in flight* until
//! the key's next pull acknowledges them (see [`Hub::pull`]); a callback channel has a
//! delivery task that sends the oldest batch to the [`Sink`] and removes it only when the
//! sink accepted (or refused) it, retrying with exponential backoff otherwise. The delivery
//! tasks of different keys run concurrently, at most
//! `notifications.max_concurrent_deliveries` deliveries at once. Events older
//! than `notifications.discard_after_s` (15 minutes by default, as the seed says) are
//! discarded and counted, wherever they wait.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::{About, ChannelRecord, Delivery, Entry, Event, Sink, StoredEvent, registration_entry};
use crate::auth::Principal;
use crate::config::NotificationsConfig;
use crate::hashing::Map;
use crate::metrics::Counters;
use crate::registry::{RegistryEvent, RegistryListener, now_ms};
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError};

/// Most characters of a callback URL plus its header values (seed 000).
pub const MAX_CALLBACK_LEN: usize = 400;

/// Lets the store's removal of delivered events commit in the background. The delete is
/// queued in order behind every append it covers, but not awaited: waiting for its commit
/// (an fsync) before answering made each long-poll round trip, and each callback batch, as
/// slow as the store's commit cycle under load. It costs nothing in safety: a crash before
/// the commit delivers those events again after the restart (at least once), and never
/// loses one.
fn forget_in_background(key_id: &str, delete: crate::store::Pending<()>) {
    let key = key_id.to_string();
    tokio::spawn(async move {
        if let Err(e) = delete.await {
            tracing::error!(
                key,
                "notifications: delivered events not removed from the store: {e}"
            );
        }
    });
}

/// Which channels an event is queued for.
enum To<'a> {
    Key(&'a str),
    /// Several keys, each once, in one store write.
    Keys(&'a [String]),
    Domain(&'a str),
}

/// The notification queues at one moment ([`Hub::queue_stats`]).
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Notification channels (one per key that pulled or set a callback).
    pub channels: usize,
    /// Events waiting in every channel (not yet acknowledged, so those below included).
    pub queued: usize,
    /// Events answered to a long-poll and not yet acknowledged by the key's next pull.
    pub unacknowledged: usize,
    /// (key id, queued, unacknowledged) of the channels with the most events waiting.
    pub top: Vec<(String, usize, usize)>,
}

/// The batch a long-poll was answered with, until the key's next pull acknowledges it.
#[derive(Debug)]
struct InFlight {
    /// Which answer this is: a [`Ticket`] or [`Answer`] of an older one no longer matches.
    id: u64,
    /// Its events are the first `len` of the queue: kept there, and in the store, until
    /// acknowledged, so that putting them back is forgetting this record.
    len: usize,
    /// When the answer was handed to its connection; `None` while its pull still answers.
    sent: Option<Instant>,
}

struct Channel {
    rec: ChannelRecord,
    queue: VecDeque<StoredEvent>,
    /// Woken when events arrive or the channel changes.
    wake: Arc<Notify>,
    /// A delivery task is running for this channel.
    pusher: bool,
    /// The long-poll answer not yet acknowledged (at most one per key).
    in_flight: Option<InFlight>,
    /// The id of the next long-poll answer.
    next_answer: u64,
    /// The key's restriction as last submitted to the store, and that write's number:
    /// `rec.allow`, which routing obeys, takes it once the write commits (unless a newer
    /// one was submitted meanwhile). Every record written carries it ([`Channel::record`]).
    allow_written: (u64, Option<Vec<String>>),
}

impl Channel {
    fn new(rec: ChannelRecord) -> Channel {
        Channel {
            allow_written: (0, rec.allow.clone()),
            rec,
            queue: VecDeque::new(),
            wake: Arc::new(Notify::new()),
            pusher: false,
            in_flight: None,
            next_answer: 1,
        }
    }

    /// The record to store: the restriction last submitted rather than the one in force,
    /// so that a write of another field never puts an older restriction back.
    fn record(&self) -> ChannelRecord {
        ChannelRecord {
            allow: self.allow_written.1.clone(),
            ..self.rec.clone()
        }
    }

    /// Puts the answer in flight back if it was sent more than `window` ago and no pull
    /// acknowledged it; true when it did.
    fn settle_stale(&mut self, now: Instant, window: Duration) -> bool {
        let stale = self
            .in_flight
            .as_ref()
            .and_then(|f| f.sent)
            .is_some_and(|sent| now >= sent + window);
        if stale {
            self.in_flight = None;
        }
        stale
    }

    /// Drops events past the discard window; returns how many and the last dropped seq.
    /// Nothing is dropped while an answer is in flight: its events are the oldest, and they
    /// are settled (acknowledged or put back) within `notifications.redeliver_after_s`.
    fn drop_expired(&mut self, cutoff_ms: u64) -> Option<(usize, u64)> {
        if self.in_flight.is_some() {
            return None;
        }
        let mut last = None;
        let mut n = 0;
        while self
            .queue
            .front()
            .is_some_and(|e| e.event.created_ms < cutoff_ms)
        {
            last = self.queue.pop_front().map(|e| e.seq);
            n += 1;
        }
        last.map(|s| (n, s))
    }
}

/// What a long-poll got.
#[derive(Debug)]
pub enum Pulled {
    /// A notification message with at least one event.
    Batch(Batch),
    /// Nothing arrived in time.
    Empty,
    /// The client went away while the poll waited; nothing was taken for it.
    Gone,
    /// The key delivers to a callback URL; long-poll is not available.
    CallbackActive,
}

/// A long-poll answer: its events, oldest first (the edge renders the message), and the
/// hold on them.
#[derive(Debug)]
pub struct Batch {
    pub events: Vec<Event>,
    pub ticket: Ticket,
}

/// The hold of a long-poll answer on its batch, until the answer reaches its connection.
/// [`Ticket::sent`] says it did; dropped without that (the client went away first, the
/// handler failed, the answer was a HEAD's), the batch is put back at once.
#[derive(Debug)]
pub struct Ticket {
    hub: Weak<Hub>,
    key_id: String,
    id: u64,
    /// Set by [`Ticket::sent`]: the drop then puts nothing back.
    sent: bool,
}

impl Ticket {
    /// The answer was handed to its connection: its batch now waits for the key's next
    /// pull (or `notifications.redeliver_after_s`). The [`Answer`] lets the connection put
    /// it back if it fails before then.
    pub fn sent(mut self) -> Answer {
        self.sent = true;
        if let Some(hub) = self.hub.upgrade() {
            hub.mark_sent(&self.key_id, self.id);
        }
        Answer {
            hub: self.hub.clone(),
            key_id: std::mem::take(&mut self.key_id),
            id: self.id,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.sent
            && let Some(hub) = self.hub.upgrade()
        {
            hub.put_back(&self.key_id, self.id, "the answer was not written");
        }
    }
}

/// A long-poll answer handed to its connection, not yet acknowledged.
#[derive(Debug)]
pub struct Answer {
    hub: Weak<Hub>,
    key_id: String,
    id: u64,
}

impl Answer {
    /// The connection failed (reset, write error) after the answer was handed to it: the
    /// client may not have read it, so its events are queued again, unless the key has
    /// pulled again since.
    pub fn put_back(self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.put_back(&self.key_id, self.id, "its connection failed");
        }
    }
}

/// Why a callback could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unreachable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The hub.
pub struct Hub {
    store: Arc<dyn Store>,
    sink: Arc<dyn Sink>,
    cfg: NotificationsConfig,
    counters: Arc<Counters>,
    channels: Mutex<Map<String, Channel>>,
    /// One permit per callback delivery in flight, `notifications.max_concurrent_deliveries`
    /// in all. A key's delivery task holds at most one (it sends one batch at a time), and
    /// only while the sink delivers, not while it backs off, so keys whose receivers hang
    /// hold one permit each and the rest go to the others, first come first served.
    deliveries: Semaphore,
    stop: Shutdown,
}

impl Hub {
    /// Loads channels and undelivered events from the store.
    pub async fn load(
        store: Arc<dyn Store>,
        sink: Arc<dyn Sink>,
        cfg: NotificationsConfig,
        counters: Arc<Counters>,
        stop: Shutdown,
    ) -> Result<Arc<Hub>, StoreError> {
        let mut channels: Map<String, Channel> = store
            .load_channels()
            .await?
            .into_iter()
            .map(|r| (r.key_id.clone(), Channel::new(r)))
            .collect();
        for e in store.load_events().await? {
            if let Some(ch) = channels.get_mut(&e.key_id) {
                ch.queue.push_back(e);
            }
        }
        let queued: usize = channels.values().map(|c| c.queue.len()).sum();
        tracing::info!(
            "notifications: {} channels, {queued} undelivered events",
            channels.len()
        );
        let cfg_deliveries = cfg.max_concurrent_deliveries.max(1);
        let hub = Arc::new(Hub {
            store,
            sink,
            cfg,
            counters,
            channels: Mutex::new(channels),
            deliveries: Semaphore::new(cfg_deliveries),
            stop,
        });
        let callback_keys: Vec<String> = hub
            .lock()
            .values()
            .filter(|c| c.rec.callback.is_some())
            .map(|c| c.rec.key_id.clone())
            .collect();
        for k in callback_keys {
            hub.ensure_pusher(&k);
        }
        Ok(hub)
    }

    fn lock(&self) -> MutexGuard<'_, Map<String, Channel>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cutoff(&self) -> u64 {
        now_ms().saturating_sub(self.cfg.discard_after_s * 1000)
    }

    /// Creates the key's channel (long-poll) if it has none; events for the key are kept
    /// from then on. An existing channel takes the principal's restriction
    /// ([`Hub::note_restriction`]).
    pub async fn ensure_channel(&self, p: &Principal) -> Result<(), StoreError> {
        let durable = {
            let mut map = self.lock();
            if !map.contains_key(&p.key_id) {
                let rec = ChannelRecord {
                    key_id: p.key_id.clone(),
                    domain: p.domain.clone(),
                    callback: None,
                    allow: p.allow.clone(),
                };
                map.insert(p.key_id.clone(), Channel::new(rec.clone()));
                Some(self.store.put_channel(rec))
            } else {
                None
            }
        };
        match durable {
            Some(d) => {
                let r = d.await;
                if r.is_err() {
                    self.drop_unstored(&p.key_id);
                }
                r
            }
            None => self.note_restriction(p).await,
        }
    }

    /// Removes a channel whose creation the store refused, if nothing has happened to it
    /// since (no event queued, no callback): memory holds only what the store holds.
    fn drop_unstored(&self, key_id: &str) {
        let mut map = self.lock();
        if map
            .get(key_id)
            .is_some_and(|c| c.queue.is_empty() && c.rec.callback.is_none())
        {
            map.remove(key_id);
        }
    }

    /// Records the restriction of the key's latest verdict (`Principal::allow`) on its
    /// channel, if it has one and the restriction changed (a key edited in its backend):
    /// the newest verdict wins. Called for every authenticated request, so a narrowed key
    /// sees nothing more from its next request on. Durable first; routing obeys it once
    /// the write committed.
    pub async fn note_restriction(&self, p: &Principal) -> Result<(), StoreError> {
        self.restrict(&p.key_id, &p.allow).await
    }

    /// Records `allow` as key `key_id`'s restriction on its channel, if it has one and the
    /// restriction changed: from a request's verdict ([`Hub::note_restriction`]) or from
    /// the backend's answer to the host's sweep of channel keys (`crate::revocation`), so
    /// that a key narrowed in its backend is narrowed here even if it makes no request.
    /// Durable first; routing obeys it once the write committed.
    pub async fn restrict(
        &self,
        key_id: &str,
        allow: &Option<Vec<String>>,
    ) -> Result<(), StoreError> {
        let (n, durable) = {
            let mut map = self.lock();
            let Some(ch) = map.get_mut(key_id) else {
                return Ok(());
            };
            if ch.allow_written.1 == *allow {
                return Ok(());
            }
            let n = ch.allow_written.0 + 1;
            ch.allow_written = (n, allow.clone());
            (n, self.store.put_channel(ch.record()))
        };
        let result = durable.await;
        let mut map = self.lock();
        if let Some(ch) = map.get_mut(key_id)
            && ch.allow_written.0 == n
        {
            match &result {
                Ok(()) => {
                    tracing::info!(key = %key_id, ?allow, "the key's restriction changed");
                    ch.rec.allow = allow.clone();
                }
                // Not stored: the next request of the key, or the next sweep, tries again.
                Err(_) => ch.allow_written.1 = ch.rec.allow.clone(),
            }
        }
        result
    }

    /// May the key see endpoint `ep`'s resource `path`, by the restriction recorded on
    /// its channel? For a key without a channel no restriction is known: true (nothing
    /// reaches such a key, and the channel it gets later records its restriction before
    /// anything is routed to it).
    pub fn may_see(&self, key_id: &str, ep: &str, path: &str) -> bool {
        self.lock()
            .get(key_id)
            .is_none_or(|c| crate::auth::may_access(c.rec.allow.as_deref(), ep, Some(path)))
    }

    /// Queues `event` for one key (a notification or a subscription error of a key's
    /// subscription), if its restriction lets it see what the event is `about`.
    pub async fn publish_to_key(&self, key_id: &str, event: Event, about: About<'_>) {
        self.publish(To::Key(key_id), event, None, about).await;
    }

    /// Queues `event` for each of `keys` (distinct) whose restriction lets it see what it
    /// is `about`, stored in one write: once one key can pull it, every key can.
    pub async fn publish_to_keys(&self, keys: &[String], event: Event, about: About<'_>) {
        self.publish(To::Keys(keys), event, None, about).await;
    }

    /// Queues the async response `event` for the key that asked (if its restriction, which
    /// may have narrowed since it asked, still lets it see what the response is `about`),
    /// and forgets the stored request (row `request_row`) in the same store transaction.
    pub async fn publish_answer(
        &self,
        key_id: &str,
        event: Event,
        request_row: u64,
        about: About<'_>,
    ) {
        self.publish(To::Key(key_id), event, Some(request_row), about)
            .await;
    }

    /// Queues `event` for every channel of a domain whose key may see what it is `about`
    /// (registration events).
    pub async fn publish_to_domain(&self, domain: &str, event: Event, about: About<'_>) {
        self.publish(To::Domain(domain), event, None, about).await;
    }

    /// Routes `event` to the channels `to` names, leaving out those whose key's
    /// restriction does not let it see what the event is `about`; a registration's
    /// resource list is cut to what each restricted key may see (one entry made per
    /// distinct restriction).
    async fn publish(&self, to: To<'_>, event: Event, answered: Option<u64>, about: About<'_>) {
        let mut wakes = Vec::new();
        let mut trims = Vec::new();
        let durable = {
            let mut map = self.lock();
            let mut chosen: Vec<(String, Event)> = Vec::new();
            let mut cut: Vec<(Vec<String>, Event)> = Vec::new();
            let mut choose = |ch: &Channel| {
                if !about.visible_to(ch.rec.allow.as_deref()) {
                    return;
                }
                let event = match (about, &ch.rec.allow) {
                    (About::Registration(ep), Some(allow)) => {
                        match cut.iter().find(|(a, _)| a == allow) {
                            Some((_, e)) => e.clone(),
                            None => {
                                let summary = registration_entry(ep, Some(allow));
                                let entry = match event.entry() {
                                    Entry::RegUpdate(_) => Entry::RegUpdate(summary),
                                    _ => Entry::Registration(summary),
                                };
                                let e = Event::new(entry, event.created_ms);
                                cut.push((allow.clone(), e.clone()));
                                e
                            }
                        }
                    }
                    _ => event.clone(),
                };
                chosen.push((ch.rec.key_id.clone(), event));
            };
            match to {
                To::Key(k) => map.get(k).into_iter().for_each(&mut choose),
                To::Keys(ks) => {
                    for k in ks {
                        map.get(k.as_str()).into_iter().for_each(&mut choose);
                    }
                }
                To::Domain(d) => map
                    .values()
                    .filter(|c| c.rec.domain == d)
                    .for_each(&mut choose),
            }
            if chosen.is_empty() && answered.is_none() {
                None
            } else {
                // The store numbers the events (in submission order: under this lock, so
                // in each queue's order) and they are queued with its numbers.
                let appended = self.store.append_events(chosen.clone(), answered);
                for ((key_id, event), seq) in chosen.into_iter().zip(appended.seqs) {
                    let Some(ch) = map.get_mut(key_id.as_str()) else {
                        continue;
                    };
                    Counters::inc(&self.counters.events_published);
                    ch.queue.push_back(StoredEvent { key_id, seq, event });
                    if ch.queue.len() > self.cfg.max_queued_per_key {
                        // Bounded: the oldest event makes room and is counted as discarded.
                        if let Some(old) = ch.queue.pop_front() {
                            // Even out of an answer in flight: the queue bound holds.
                            if let Some(f) = ch.in_flight.as_mut() {
                                f.len = f.len.saturating_sub(1);
                                if f.len == 0 {
                                    ch.in_flight = None;
                                }
                            }
                            Counters::inc(&self.counters.events_discarded);
                            trims.push(self.store.delete_events_through(old.key_id, old.seq));
                        }
                    }
                    wakes.push(Arc::clone(&ch.wake));
                }
                Some(appended.durable)
            }
        };
        if let Some(d) = durable
            && let Err(e) = d.await
        {
            crate::store::log_failure(format_args!("notifications: event not stored"), &e);
        }
        for t in trims {
            if let Err(e) = t.await {
                crate::store::log_failure(
                    format_args!("notifications: cannot trim a full queue"),
                    &e,
                );
            }
        }
        for w in wakes {
            w.notify_waiters();
        }
    }

    /// Answers a long-poll with the oldest events of a key, waiting up to `wait` for one
    /// to arrive (`None`: answer at once), or until `gone` resolves (the client went away:
    /// nothing is taken for it).
    ///
    /// At least once: the events answered stay queued and stored as the key's answer in
    /// flight. The key's next pull acknowledges it (removes them and counts them
    /// delivered): a long-poll client pulls again only after reading its answer. Put back
    /// instead, to be answered again first: an answer never handed to its connection
    /// ([`Ticket`]), one whose connection failed ([`Answer::put_back`]), and one not
    /// acknowledged within `notifications.redeliver_after_s` of being sent. A key has at
    /// most one answer in flight; a pull that finds one still being answered (a concurrent
    /// pull of the same key) neither acknowledges it nor takes events while it stands: it
    /// waits as if the queue were empty.
    pub async fn pull(
        self: &Arc<Self>,
        p: &Principal,
        wait: Option<Duration>,
        gone: impl Future<Output = ()>,
    ) -> Result<Pulled, StoreError> {
        self.ensure_channel(p).await?;
        self.acknowledge(&p.key_id);
        let deadline = Instant::now() + wait.unwrap_or_default();
        tokio::pin!(gone);
        loop {
            let wake = match self.lock().get(&p.key_id) {
                Some(ch) if ch.rec.callback.is_some() => return Ok(Pulled::CallbackActive),
                Some(ch) => Arc::clone(&ch.wake),
                None => return Ok(Pulled::Empty),
            };
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(batch) = self.take(&p.key_id) {
                return Ok(Pulled::Batch(batch));
            }
            if wait.is_none() {
                return Ok(Pulled::Empty);
            }
            tokio::select! {
                biased;
                () = &mut gone => return Ok(Pulled::Gone),
                r = tokio::time::timeout_at(deadline, notified) => {
                    if r.is_err() {
                        return Ok(Pulled::Empty);
                    }
                }
            }
        }
    }

    /// A pull arrived: the key's answer in flight, if it was sent, has been read. One sent
    /// longer than `notifications.redeliver_after_s` ago is put back instead.
    fn acknowledge(&self, key_id: &str) {
        let window = Duration::from_secs(self.cfg.redeliver_after_s);
        let durable = {
            let mut map = self.lock();
            let Some(ch) = map.get_mut(key_id) else {
                return;
            };
            if ch.settle_stale(Instant::now(), window) {
                self.count_put_back(key_id, "it was not acknowledged in time");
                ch.wake.notify_waiters();
                return;
            }
            let Some(f) = ch.in_flight.take_if(|f| f.sent.is_some()) else {
                return;
            };
            let n = f.len.min(ch.queue.len());
            let Some(last) = n
                .checked_sub(1)
                .and_then(|i| ch.queue.get(i))
                .map(|e| e.seq)
            else {
                return;
            };
            ch.queue.drain(..n);
            for _ in 0..n {
                Counters::inc(&self.counters.events_delivered);
            }
            self.store.delete_events_through(key_id.to_string(), last)
        };
        forget_in_background(key_id, durable);
    }

    /// Makes up to `max_batch` of the oldest events the key's answer in flight and returns
    /// them as a message; `None` when there are none, or an answer is in flight already.
    fn take(self: &Arc<Self>, key_id: &str) -> Option<Batch> {
        let cutoff = self.cutoff();
        let window = Duration::from_secs(self.cfg.redeliver_after_s);
        let (batch, durable) = {
            let mut map = self.lock();
            let ch = map.get_mut(key_id)?;
            if ch.settle_stale(Instant::now(), window) {
                self.count_put_back(key_id, "it was not acknowledged in time");
            }
            if ch.in_flight.is_some() {
                return None;
            }
            let expired = ch.drop_expired(cutoff);
            if let Some((n, _)) = expired {
                self.count_discarded(key_id, n);
            }
            let durable =
                expired.map(|(_, s)| self.store.delete_events_through(key_id.to_string(), s));
            let n = ch.queue.len().min(self.cfg.max_batch);
            let batch = (n > 0).then(|| {
                let id = ch.next_answer;
                ch.next_answer += 1;
                ch.in_flight = Some(InFlight {
                    id,
                    len: n,
                    sent: None,
                });
                Batch {
                    events: ch.queue.iter().take(n).map(|e| e.event.clone()).collect(),
                    ticket: Ticket {
                        hub: Arc::downgrade(self),
                        key_id: key_id.to_string(),
                        id,
                        sent: false,
                    },
                }
            });
            (batch, durable)
        };
        if let Some(d) = durable {
            forget_in_background(key_id, d);
        }
        batch
    }

    /// The answer `id` reached its connection.
    fn mark_sent(&self, key_id: &str, id: u64) {
        if let Some(f) = self
            .lock()
            .get_mut(key_id)
            .and_then(|c| c.in_flight.as_mut())
            .filter(|f| f.id == id)
        {
            f.sent = Some(Instant::now());
        }
    }

    /// Queues the events of answer `id` again (first, in order), if it is still in flight.
    fn put_back(&self, key_id: &str, id: u64, why: &str) {
        let mut map = self.lock();
        let Some(ch) = map.get_mut(key_id) else {
            return;
        };
        if ch.in_flight.take_if(|f| f.id == id).is_some() {
            self.count_put_back(key_id, why);
            ch.wake.notify_waiters();
        }
    }

    fn count_put_back(&self, key_id: &str, why: &str) {
        Counters::inc(&self.counters.long_poll_redeliveries);
        // Per client failure, so not above debug (the counter is the signal).
        tracing::debug!(key = key_id, "long-poll answer queued again: {why}");
    }

    fn count_discarded(&self, key_id: &str, n: usize) {
        for _ in 0..n {
            Counters::inc(&self.counters.events_discarded);
        }
        tracing::warn!(
            key = key_id,
            "discarded {n} notification events older than {} s",
            self.cfg.discard_after_s
        );
    }

    /// `PUT /notification/callback`: checks length, verifies the URL with a PUT, then
    /// switches the key's channel to push.
    pub async fn set_callback(
        self: &Arc<Self>,
        p: &Principal,
        target: super::CallbackTarget,
    ) -> Result<(), CallbackError> {
        let len = target.url.chars().count()
            + target
                .headers
                .values()
                .map(|v| v.chars().count())
                .sum::<usize>();
        if len > MAX_CALLBACK_LEN {
            return Err(CallbackError::Invalid(format!(
                "the URL and header values are {len} characters; at most {MAX_CALLBACK_LEN} are allowed"
            )));
        }
        self.sink
            .verify(&target)
            .await
            .map_err(CallbackError::Unreachable)?;
        let (created, before, durable) = {
            let mut map = self.lock();
            let created = !map.contains_key(&p.key_id);
            let ch = map.entry(p.key_id.clone()).or_insert_with(|| {
                Channel::new(ChannelRecord {
                    key_id: p.key_id.clone(),
                    domain: p.domain.clone(),
                    callback: None,
                    allow: p.allow.clone(),
                })
            });
            let before = ch.rec.callback.replace(target.clone());
            // The callback delivers from the oldest event on, an answer in flight included
            // (at least once).
            ch.in_flight = None;
            ch.wake.notify_waiters();
            (created, before, self.store.put_channel(ch.record()))
        };
        if let Err(e) = durable.await {
            // The stored channel (or its absence) is what memory goes back to, unless a
            // later change replaced our callback meanwhile.
            let mut map = self.lock();
            if let Some(ch) = map.get_mut(&p.key_id)
                && ch.rec.callback.as_ref() == Some(&target)
            {
                ch.rec.callback = before;
                ch.wake.notify_waiters();
                if created && ch.queue.is_empty() && ch.rec.callback.is_none() {
                    map.remove(&p.key_id);
                }
            }
            return Err(e.into());
        }
        self.ensure_pusher(&p.key_id);
        tracing::info!(key = %p.key_id, "notification callback registered");
        Ok(())
    }

    pub fn callback(&self, key_id: &str) -> Option<super::CallbackTarget> {
        self.lock().get(key_id).and_then(|c| c.rec.callback.clone())
    }

    /// `DELETE /notification/callback`: back to long-poll. False when there was none.
    pub async fn delete_callback(self: &Arc<Self>, key_id: &str) -> Result<bool, StoreError> {
        let durable = {
            let mut map = self.lock();
            let Some(ch) = map.get_mut(key_id).filter(|c| c.rec.callback.is_some()) else {
                return Ok(false);
            };
            let before = ch.rec.callback.take();
            ch.wake.notify_waiters();
            (before, self.store.put_channel(ch.record()))
        };
        let (before, durable) = durable;
        if let Err(e) = durable.await {
            // Still stored, so still the key's callback (its pusher may have stopped:
            // it starts again).
            let restored = {
                let mut map = self.lock();
                match map.get_mut(key_id) {
                    Some(ch) if ch.rec.callback.is_none() => {
                        ch.rec.callback = before;
                        true
                    }
                    _ => false,
                }
            };
            if restored {
                self.ensure_pusher(key_id);
            }
            return Err(e);
        }
        tracing::info!(key = key_id, "notification callback removed");
        Ok(true)
    }

    /// The keys that have a channel (for the sweep of revoked keys, `crate::revocation`).
    pub fn key_ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Drops a key's channel because the key no longer authenticates: its queued events
    /// are deleted and nothing more is queued or pushed to its callback (the pusher stops
    /// when it finds no channel). The stored record is kept without its callback, so that
    /// a restart pushes nothing to it either (the sweep at start drops it again). False
    /// when the key had no channel.
    pub async fn forget_key(&self, key_id: &str) -> Result<bool, StoreError> {
        let durable = {
            let mut map = self.lock();
            let Some(mut ch) = map.remove(key_id) else {
                return Ok(false);
            };
            ch.wake.notify_waiters();
            let had_callback = ch.rec.callback.take().is_some();
            let events = self
                .store
                .delete_events_through(key_id.to_string(), i64::MAX as u64);
            let record = had_callback.then(|| self.store.put_channel(ch.rec.clone()));
            (events, record)
        };
        durable.0.await?;
        if let Some(r) = durable.1 {
            r.await?;
        }
        tracing::info!(
            key = key_id,
            "notification channel dropped: the key no longer authenticates"
        );
        Ok(true)
    }

    fn ensure_pusher(self: &Arc<Self>, key_id: &str) {
        let start = {
            let mut map = self.lock();
            match map.get_mut(key_id) {
                Some(ch) if !ch.pusher && ch.rec.callback.is_some() => {
                    ch.pusher = true;
                    true
                }
                _ => false,
            }
        };
        if start {
            tokio::spawn(Arc::clone(self).push_loop(key_id.to_string()));
        }
    }

    /// Delivers a callback channel's events in order, one batch at a time, each under a
    /// permit of [`Hub::deliveries`]. Other keys' tasks run meanwhile: a receiver that
    /// does not answer delays only its own key (the sink plugin runs calls that overlap on
    /// instances of their own, see `plugins::Generation`).
    async fn push_loop(self: Arc<Self>, key_id: String) {
        let mut stop = self.stop.clone();
        let initial = Duration::from_millis(self.cfg.retry_initial_ms);
        let max = Duration::from_millis(self.cfg.retry_max_ms);
        let mut backoff = initial;
        loop {
            if stop.is_fired() {
                break;
            }
            let Some(wake) = self.lock().get(&key_id).map(|c| Arc::clone(&c.wake)) else {
                break;
            };
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let cutoff = self.cutoff();
            let (target, batch, expired) = {
                let mut map = self.lock();
                let Some(ch) = map.get_mut(&key_id) else {
                    break;
                };
                let Some(target) = ch.rec.callback.clone() else {
                    ch.pusher = false;
                    return;
                };
                let expired = ch.drop_expired(cutoff);
                let batch: Vec<(u64, Event)> = ch
                    .queue
                    .iter()
                    .take(self.cfg.max_batch)
                    .map(|e| (e.seq, e.event.clone()))
                    .collect();
                (target, batch, expired)
            };
            if let Some((n, seq)) = expired {
                self.count_discarded(&key_id, n);
                if let Err(e) = self.store.delete_events_through(key_id.clone(), seq).await {
                    crate::store::log_failure(
                        format_args!("notifications: cannot remove discarded events"),
                        &e,
                    );
                }
            }
            let Some(last) = batch.last().map(|e| e.0) else {
                tokio::select! {
                    _ = stop.recv() => break,
                    _ = notified => continue,
                }
            };
            let events: Vec<Event> = batch.into_iter().map(|e| e.1).collect();
            // Waits while `max_concurrent_deliveries` other keys' deliveries are in flight.
            let permit = tokio::select! {
                _ = stop.recv() => break,
                p = self.deliveries.acquire() => match p {
                    Ok(p) => p,
                    // Never closed; if it were, delivering without a bound beats stalling.
                    Err(_) => {
                        tracing::error!("notifications: the delivery bound is closed");
                        break;
                    }
                },
            };
            let outcome = self.sink.deliver(&target, &events).await;
            drop(permit);
            match outcome {
                Delivery::Accepted => {
                    backoff = initial;
                    for _ in 0..events.len() {
                        Counters::inc(&self.counters.events_delivered);
                    }
                    self.remove_through(&key_id, last).await;
                }
                Delivery::Refused(why) => {
                    backoff = initial;
                    tracing::warn!(key = %key_id, url = %target.url, "callback refused {} events, discarding them: {why}", events.len());
                    for _ in 0..events.len() {
                        Counters::inc(&self.counters.events_discarded);
                    }
                    self.remove_through(&key_id, last).await;
                }
                Delivery::Retry(why) => {
                    Counters::inc(&self.counters.delivery_retries);
                    tracing::warn!(key = %key_id, url = %target.url, "callback delivery failed, retrying in {backoff:?}: {why}");
                    tokio::select! {
                        _ = stop.recv() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(max);
                }
            }
        }
        if let Some(ch) = self.lock().get_mut(&key_id) {
            ch.pusher = false;
        }
    }

    async fn remove_through(&self, key_id: &str, seq: u64) {
        let durable = {
            let mut map = self.lock();
            if let Some(ch) = map.get_mut(key_id) {
                while ch.queue.front().is_some_and(|e| e.seq <= seq) {
                    ch.queue.pop_front();
                }
            }
            self.store.delete_events_through(key_id.to_string(), seq)
        };
        forget_in_background(key_id, durable);
    }

    /// Discards expired events of channels nobody reads, once a minute.
    pub async fn run_sweeper(self: Arc<Self>, mut stop: Shutdown) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = stop.recv() => return,
                _ = tick.tick() => {}
            }
            let cutoff = self.cutoff();
            let deletes = {
                let mut map = self.lock();
                let mut deletes = Vec::new();
                let now = Instant::now();
                let window = Duration::from_secs(self.cfg.redeliver_after_s);
                for ch in map.values_mut() {
                    if ch.settle_stale(now, window) {
                        self.count_put_back(&ch.rec.key_id, "it was not acknowledged in time");
                    }
                    if let Some((n, seq)) = ch.drop_expired(cutoff) {
                        self.count_discarded(&ch.rec.key_id, n);
                        deletes.push(self.store.delete_events_through(ch.rec.key_id.clone(), seq));
                    }
                }
                deletes
            };
            for d in deletes {
                if let Err(e) = d.await {
                    crate::store::log_failure(
                        format_args!("notifications: cannot remove discarded events"),
                        &e,
                    );
                }
            }
        }
    }

    /// The keys that have a notification channel in `domain`.
    pub fn channel_keys(&self, domain: &str) -> Vec<String> {
        self.lock()
            .values()
            .filter(|c| c.rec.domain == domain)
            .map(|c| c.rec.key_id.clone())
            .collect()
    }

    /// Undelivered events, all keys.
    pub fn queued(&self) -> usize {
        self.lock().values().map(|c| c.queue.len()).sum()
    }

    /// The notification queues now, for `/metrics`: totals over every channel, and the
    /// `top` channels with the most events waiting (only channels with some), most first.
    pub fn queue_stats(&self, top: usize) -> QueueStats {
        let channels = self.lock();
        let mut stats = QueueStats {
            channels: channels.len(),
            ..QueueStats::default()
        };
        let mut waiting = Vec::new();
        for c in channels.values() {
            let queued = c.queue.len();
            let unacked = c.in_flight.as_ref().map_or(0, |f| f.len);
            stats.queued += queued;
            stats.unacknowledged += unacked;
            if queued > 0 {
                waiting.push((c.rec.key_id.as_str(), queued, unacked));
            }
        }
        waiting.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        stats.top = waiting
            .into_iter()
            .take(top)
            .map(|(k, q, u)| (k.to_string(), q, u))
            .collect();
        stats
    }

    /// Callback deliveries in flight now (permits taken), and the bound.
    pub fn deliveries(&self) -> (usize, usize) {
        let max = self.cfg.max_concurrent_deliveries.max(1);
        (max.saturating_sub(self.deliveries.available_permits()), max)
    }
}

impl RegistryListener for Hub {
    fn on_event<'a>(
        &'a self,
        ev: &'a RegistryEvent,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let ep = ev.endpoint();
            // The whole entry; restricted keys get theirs cut from the endpoint.
            let (entry, about) = match ev {
                RegistryEvent::Registered { .. } => (
                    Entry::Registration(registration_entry(ep, None)),
                    About::Registration(ep),
                ),
                RegistryEvent::Updated { .. } => (
                    Entry::RegUpdate(registration_entry(ep, None)),
                    About::Registration(ep),
                ),
                RegistryEvent::Deregistered(_) => (
                    Entry::DeRegistration(ep.reg.name.clone()),
                    About::Endpoint(&ep.reg.name),
                ),
                RegistryEvent::Expired(_) => (
                    Entry::Expired(ep.reg.name.clone()),
                    About::Endpoint(&ep.reg.name),
                ),
                // The new owner node publishes the registration.
                RegistryEvent::Moved(_) => return,
            };
            let event = Event::new(entry, now_ms());
            self.publish_to_domain(&ep.reg.domain, event, about).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use std::sync::atomic::Ordering;

    struct NoSink;

    impl Sink for NoSink {
        fn verify<'a>(
            &'a self,
            _: &'a super::super::CallbackTarget,
        ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
            Box::pin(async { Ok(()) })
        }
        fn deliver<'a>(
            &'a self,
            _: &'a super::super::CallbackTarget,
            _: &'a [Event],
        ) -> std::pin::Pin<Box<dyn Future<Output = Delivery> + Send + 'a>> {
            Box::pin(async { Delivery::Accepted })
        }
    }

    struct Fixture {
        hub: Arc<Hub>,
        store: Arc<dyn Store>,
        counters: Arc<Counters>,
        key: Principal,
        _stop: crate::shutdown::Trigger,
        _dir: tempfile::TempDir,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let counters = Arc::new(Counters::default());
        let (trigger, stop) = crate::shutdown::channel();
        let hub = Hub::load(
            Arc::clone(&store),
            Arc::new(NoSink),
            NotificationsConfig::default(),
            Arc::clone(&counters),
            stop,
        )
        .await
        .unwrap();
        let key = Principal {
            backend: "test".into(),
            key_id: "k".into(),
            domain: "default".into(),
            scopes: vec!["admin".into()],
            allow: None,
        };
        hub.ensure_channel(&key).await.unwrap();
        Fixture {
            hub,
            store,
            counters,
            key,
            _stop: trigger,
            _dir: dir,
        }
    }

    impl Fixture {
        /// Another hub loaded from this one's store, as at a restart.
        async fn reloaded(&self) -> Arc<Hub> {
            let (_t, stop) = crate::shutdown::channel();
            Hub::load(
                Arc::clone(&self.store),
                Arc::new(NoSink),
                NotificationsConfig::default(),
                Arc::new(Counters::default()),
                stop,
            )
            .await
            .unwrap()
        }

        async fn publish(&self, ep: &str) {
            let event = Event::new(Entry::DeRegistration(ep.into()), now_ms());
            self.hub
                .publish_to_key("k", event, About::Endpoint(ep))
                .await;
        }

        /// A pull that answers at once.
        async fn pull(&self) -> Option<Batch> {
            match self
                .hub
                .pull(&self.key, None, std::future::pending())
                .await
                .unwrap()
            {
                Pulled::Batch(b) => Some(b),
                Pulled::Empty => None,
                other => panic!("{other:?}"),
            }
        }

        /// The `ep`s still stored for the key (a store round trip: earlier deletes are
        /// applied before it).
        async fn stored(&self) -> Vec<String> {
            let events = self.store.load_events().await.unwrap();
            events.iter().map(|e| ep_of(&e.event)).collect()
        }

        fn count(&self, c: &std::sync::atomic::AtomicU64) -> u64 {
            c.load(Ordering::Relaxed)
        }
    }

    /// The endpoint a test event is about.
    fn ep_of(e: &Event) -> String {
        match e.entry() {
            Entry::DeRegistration(ep) => ep.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn eps(b: &Batch) -> Vec<String> {
        b.events.iter().map(ep_of).collect()
    }

    #[tokio::test]
    async fn the_next_pull_acknowledges_an_answer_once_it_was_sent() {
        let f = fixture().await;
        f.publish("a").await;
        f.publish("b").await;
        let b = f.pull().await.unwrap();
        assert_eq!(eps(&b), ["a", "b"]);
        // Still being answered: a concurrent pull neither acknowledges nor takes it.
        f.publish("c").await;
        assert!(f.pull().await.is_none());
        assert_eq!(f.stored().await, ["a", "b", "c"]);
        let _answer = b.ticket.sent();
        assert_eq!(f.count(&f.counters.events_delivered), 0);
        // The client came back: acknowledged, and the next events follow.
        let b = f.pull().await.unwrap();
        assert_eq!(eps(&b), ["c"]);
        assert_eq!(f.stored().await, ["c"]);
        assert_eq!(f.count(&f.counters.events_delivered), 2);
        drop(b.ticket.sent());
        assert!(f.pull().await.is_none());
        assert!(f.stored().await.is_empty());
        assert_eq!(f.count(&f.counters.events_delivered), 3);
        assert_eq!(f.count(&f.counters.long_poll_redeliveries), 0);
    }

    /// The newest verdict's restriction is stored with the channel and routes the events
    /// published after it; events queued before stay queued.
    #[tokio::test]
    async fn the_newest_restriction_is_stored_and_routes_events() {
        let f = fixture().await;
        let mut narrowed = f.key.clone();
        narrowed.allow = Some(vec!["gw-*".into()]);
        f.hub.note_restriction(&narrowed).await.unwrap();
        let stored = f.store.load_channels().await.unwrap();
        assert_eq!(stored[0].allow, narrowed.allow);
        f.publish("pump-1").await;
        f.publish("gw-1").await;
        // The pull's own verdict (no restriction) is the newest from now on.
        let b = f.pull().await.unwrap();
        assert_eq!(eps(&b), ["gw-1"]);
        assert_eq!(f.store.load_channels().await.unwrap()[0].allow, None);
        drop(b.ticket.sent());
        f.publish("pump-1").await;
        assert_eq!(eps(&f.pull().await.unwrap()), ["pump-1"]);
        // A channel reloaded from the store keeps the restriction it was stored with.
        f.hub.note_restriction(&narrowed).await.unwrap();
        let again = f.reloaded().await;
        assert!(again.may_see("k", "gw-1", "/3/0/0"));
        assert!(!again.may_see("k", "pump-1", "/3/0/0"));
        assert!(again.may_see("nobody", "pump-1", "/3/0/0"), "no channel");
    }

    /// The hub queues each event under the number the store gave it: a number is never
    /// given again, not after its event was delivered and the hub restarted, so the
    /// acknowledgement of a new event can never delete another.
    #[tokio::test]
    async fn events_are_queued_under_the_store_s_numbers_across_a_restart() {
        let f = fixture().await;
        f.publish("a").await;
        f.publish("b").await;
        let first: Vec<u64> = f
            .store
            .load_events()
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert!(first[0] < first[1], "{first:?}");
        drop(f.pull().await.unwrap().ticket.sent());
        assert!(f.pull().await.is_none(), "acknowledged");
        assert!(f.stored().await.is_empty());
        let again = f.reloaded().await;
        again
            .publish_to_key(
                "k",
                Event::new(Entry::DeRegistration("c".into()), now_ms()),
                About::Endpoint("c"),
            )
            .await;
        let stored = f.store.load_events().await.unwrap();
        assert_eq!(stored.len(), 1);
        assert!(
            stored[0].seq > first[1],
            "numbered on after the delivered events"
        );
        assert_eq!(
            again.lock()["k"].queue[0].seq,
            stored[0].seq,
            "queued under that number"
        );
    }

    #[tokio::test]
    async fn an_answer_never_written_is_answered_again_first() {
        let f = fixture().await;
        f.publish("a").await;
        let b = f.pull().await.unwrap();
        f.publish("b").await;
        drop(b);
        let b = f.pull().await.unwrap();
        assert_eq!(eps(&b), ["a", "b"], "put back in front, in order");
        assert_eq!(f.count(&f.counters.long_poll_redeliveries), 1);
    }

    #[tokio::test]
    async fn a_failed_connection_puts_its_answer_back_unless_acknowledged() {
        let f = fixture().await;
        f.publish("a").await;
        let answer = f.pull().await.unwrap().ticket.sent();
        answer.put_back();
        let b = f.pull().await.unwrap();
        assert_eq!(eps(&b), ["a"]);
        let answer = b.ticket.sent();
        // Acknowledged first: the connection's late failure changes nothing.
        assert!(f.pull().await.is_none());
        answer.put_back();
        assert!(f.pull().await.is_none());
        assert!(f.stored().await.is_empty());
        assert_eq!(f.count(&f.counters.long_poll_redeliveries), 1);
        assert_eq!(f.count(&f.counters.events_delivered), 1);
    }

    #[tokio::test]
    async fn a_pull_whose_client_left_takes_nothing() {
        let f = fixture().await;
        let (left, gone) = tokio::sync::oneshot::channel::<()>();
        let hub = Arc::clone(&f.hub);
        let key = f.key.clone();
        let poll = tokio::spawn(async move {
            hub.pull(&key, Some(Duration::from_secs(30)), async move {
                let _ = gone.await;
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(left);
        assert!(matches!(poll.await.unwrap().unwrap(), Pulled::Gone));
        f.publish("a").await;
        assert_eq!(eps(&f.pull().await.unwrap()), ["a"]);
    }

    #[tokio::test]
    async fn an_unacknowledged_answer_stays_stored_and_is_loaded_again() {
        let f = fixture().await;
        f.publish("a").await;
        let _answer = f.pull().await.unwrap().ticket.sent();
        assert_eq!(f.stored().await, ["a"]);
        let again = f.reloaded().await;
        let b = again.pull(&f.key, None, std::future::pending()).await;
        match b.unwrap() {
            Pulled::Batch(b) => assert_eq!(eps(&b), ["a"]),
            other => panic!("{other:?}"),
        }
    }
}
