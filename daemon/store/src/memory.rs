//! An in-memory backend with the SQLite backend's semantics, for unit tests of the
//! services above the store and for trying a change without a file. Nothing survives the
//! process; every write is "durable" at once. [`MemoryStore::fail_writes`] makes every
//! write fail as a failing disk would (`is_unavailable`), to test rollbacks;
//! [`MemoryStore::hold_writes`] keeps writes applied but unanswered, as during a commit,
//! to test what is shown before a write is durable.
//!
//! The same conformance tests run against both backends (`tests` below), so the two
//! cannot drift apart.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use connectord_model::{
    CertificateRecord, ChannelRecord, Event, HourCount, Job, PresubRecord, PskRecord, Registration,
    StoredEvent, SubscriptionRecord,
};

use crate::{
    Appended, CredentialStore, EventLog, Feed, Health, Pending, PluginStateStore, QuotaStore,
    RegistrationStore, RequestStore, StoreError, SubscriptionStore,
};

#[derive(Default)]
struct State {
    /// By id.
    registrations: BTreeMap<String, Registration>,
    channels: BTreeMap<String, ChannelRecord>,
    /// By (key id, sequence).
    events: BTreeMap<(String, u64), StoredEvent>,
    /// The last sequence number given to each key's events.
    last_seq: BTreeMap<String, u64>,
    /// By row number.
    requests: BTreeMap<u64, Job>,
    last_row: u64,
    /// By (key id, endpoint, path).
    subscriptions: BTreeMap<(String, String, String), SubscriptionRecord>,
    presubscriptions: BTreeMap<String, PresubRecord>,
    plugin_state: BTreeMap<(String, String), Vec<u8>>,
    /// By (domain, hour).
    hour_counts: BTreeMap<(String, u64), u64>,
    /// By (domain, endpoint).
    psks: BTreeMap<(String, String), PskRecord>,
    /// By serial.
    certificates: BTreeMap<String, CertificateRecord>,
}

/// The in-memory store.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    failing: AtomicBool,
    errors: std::sync::atomic::AtomicU64,
    /// While writes are held ([`MemoryStore::hold_writes`]): the answers of those made
    /// meanwhile, given when they are released.
    held: Mutex<Option<Vec<Answer>>>,
}

/// A held write's answer ([`MemoryStore::hold_writes`]).
type Answer = Box<dyn FnOnce() + Send>;

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// From now on every write fails (`true`) as on a full disk, or succeeds again.
    pub fn fail_writes(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// From now on (`true`) writes are applied but not answered, as while a commit is in
    /// progress, until they are released (`false`: every held write is answered, in
    /// order, and writes are answered at once again).
    pub fn hold_writes(&self, hold: bool) {
        let released = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            if hold {
                held.get_or_insert_with(Vec::new);
                None
            } else {
                held.take()
            }
        };
        for answer in released.into_iter().flatten() {
            answer();
        }
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> Pending<T> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Pending::ready(f(&state))
    }

    fn write<T: Send + 'static>(&self, f: impl FnOnce(&mut State) -> T) -> Pending<T> {
        if self.failing.load(Ordering::SeqCst) {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return Pending::failed(StoreError::Commit(
                "the in-memory store was told to fail its writes".into(),
            ));
        }
        let value = f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match held.as_mut() {
            Some(answers) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                answers.push(Box::new(move || {
                    let _ = tx.send(Ok(value));
                }));
                Pending::new(rx)
            }
            None => Pending::ready(value),
        }
    }
}

impl RegistrationStore for MemoryStore {
    fn load_registrations(&self) -> Pending<Vec<Registration>> {
        self.read(|s| s.registrations.values().cloned().collect())
    }

    fn put_registration(&self, reg: Registration) -> Pending<()> {
        self.write(|s| {
            s.registrations
                .retain(|id, r| *id == reg.id || r.domain != reg.domain || r.name != reg.name);
            s.registrations.insert(reg.id.clone(), reg);
        })
    }

    fn delete_registration(&self, id: String) -> Pending<()> {
        self.write(|s| {
            s.registrations.remove(&id);
        })
    }
}

impl EventLog for MemoryStore {
    fn load_channels(&self) -> Pending<Vec<ChannelRecord>> {
        self.read(|s| s.channels.values().cloned().collect())
    }

    fn put_channel(&self, channel: ChannelRecord) -> Pending<()> {
        self.write(|s| {
            s.channels.insert(channel.key_id.clone(), channel);
        })
    }

    fn delete_channel(&self, key_id: String) -> Pending<()> {
        self.write(|s| {
            s.channels.remove(&key_id);
            s.events.retain(|(k, _), _| *k != key_id);
        })
    }

    fn load_events(&self) -> Pending<Vec<StoredEvent>> {
        self.read(|s| s.events.values().cloned().collect())
    }

    fn load_events_of(&self, key_id: String) -> Pending<Vec<StoredEvent>> {
        self.read(|s| {
            s.events
                .range((key_id.clone(), 0)..=(key_id, u64::MAX))
                .map(|(_, e)| e.clone())
                .collect()
        })
    }

    fn append_events(&self, events: Vec<(String, Event)>, answered: Option<u64>) -> Appended {
        // Numbered even when the write then fails, as the SQLite backend numbers at
        // submission: a number is never given twice either way.
        let mut seqs = Vec::with_capacity(events.len());
        let mut numbered = Vec::with_capacity(events.len());
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            for (key_id, event) in events {
                let last = state.last_seq.entry(key_id.clone()).or_insert(0);
                *last += 1;
                seqs.push(*last);
                numbered.push(StoredEvent {
                    key_id,
                    seq: *last,
                    event,
                });
            }
        }
        let durable = self.write(|s| {
            for e in numbered {
                s.events.insert((e.key_id.clone(), e.seq), e);
            }
            if let Some(row) = answered {
                s.requests.remove(&row);
            }
        });
        Appended { seqs, durable }
    }

    fn delete_events_through(&self, key_id: String, seq: u64) -> Pending<()> {
        self.write(|s| {
            s.events
                .retain(|(key, event_seq), _| *key != key_id || *event_seq > seq);
        })
    }
}

impl RequestStore for MemoryStore {
    fn load_requests(&self) -> Pending<Vec<Job>> {
        self.read(|s| {
            s.requests
                .iter()
                .map(|(row, job)| Job {
                    row: *row,
                    ..job.clone()
                })
                .collect()
        })
    }

    fn put_request(&self, job: &Job) -> Pending<u64> {
        let job = job.clone();
        self.write(|s| {
            s.last_row += 1;
            let row = s.last_row;
            s.requests.insert(row, job);
            row
        })
    }

    fn delete_request(&self, row: u64) -> Pending<()> {
        self.write(|s| {
            s.requests.remove(&row);
        })
    }
}

impl PluginStateStore for MemoryStore {
    fn plugin_state_get(&self, plugin: String, key: String) -> Pending<Option<Vec<u8>>> {
        self.read(|s| s.plugin_state.get(&(plugin, key)).cloned())
    }

    fn plugin_state_put(&self, plugin: String, key: String, value: Vec<u8>) -> Pending<()> {
        self.write(|s| {
            s.plugin_state.insert((plugin, key), value);
        })
    }

    fn plugin_state_delete(&self, plugin: String, key: String) -> Pending<()> {
        self.write(|s| {
            s.plugin_state.remove(&(plugin, key));
        })
    }

    fn plugin_state_keys(&self, plugin: String, prefix: String) -> Pending<Vec<String>> {
        self.read(|s| {
            s.plugin_state
                .keys()
                .filter(|(p, k)| *p == plugin && k.starts_with(&prefix))
                .map(|(_, k)| k.clone())
                .collect()
        })
    }
}

impl SubscriptionStore for MemoryStore {
    fn load_subscriptions(&self) -> Pending<Vec<SubscriptionRecord>> {
        self.read(|s| s.subscriptions.values().cloned().collect())
    }

    fn put_subscription(&self, sub: SubscriptionRecord) -> Pending<()> {
        self.write(|s| {
            let key = (sub.key_id.clone(), sub.ep.clone(), sub.path.clone());
            s.subscriptions.insert(key, sub);
        })
    }

    fn delete_subscriptions(
        &self,
        key_id: String,
        ep: Option<String>,
        path: Option<String>,
    ) -> Pending<()> {
        self.write(|s| {
            s.subscriptions.retain(|(k, e, p), _| {
                !(*k == key_id
                    && ep.as_ref().is_none_or(|ep| ep == e)
                    && path.as_ref().is_none_or(|path| path == p))
            });
        })
    }

    fn load_presubscriptions(&self) -> Pending<Vec<PresubRecord>> {
        self.read(|s| s.presubscriptions.values().cloned().collect())
    }

    fn replace_presubscriptions(&self, rec: PresubRecord) -> Pending<()> {
        self.write(|s| {
            s.subscriptions.retain(|(k, _, _), _| *k != rec.key_id);
            s.presubscriptions.insert(rec.key_id.clone(), rec);
        })
    }
}

impl QuotaStore for MemoryStore {
    fn load_hour_counts(&self) -> Pending<Vec<HourCount>> {
        self.read(|s| {
            s.hour_counts
                .iter()
                .map(|((domain, hour), count)| HourCount {
                    domain: domain.clone(),
                    hour: *hour,
                    count: *count,
                })
                .collect()
        })
    }

    fn save_hour_counts(&self, counts: Vec<HourCount>, keep_from: u64) -> Pending<()> {
        self.write(|s| {
            for c in counts {
                s.hour_counts.insert((c.domain, c.hour), c.count);
            }
            s.hour_counts.retain(|(_, hour), _| *hour >= keep_from);
        })
    }
}

impl CredentialStore for MemoryStore {
    fn load_psks(&self) -> Pending<Vec<PskRecord>> {
        self.read(|s| s.psks.values().cloned().collect())
    }

    fn load_certificates(&self) -> Pending<Vec<CertificateRecord>> {
        self.read(|s| s.certificates.values().cloned().collect())
    }

    fn put_psk(&self, rec: PskRecord) -> Pending<()> {
        let taken = {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state
                .psks
                .values()
                .any(|r| r.identity == rec.identity && (r.domain != rec.domain || r.ep != rec.ep))
        };
        if taken {
            return Pending::failed(StoreError::Commit(format!(
                "PSK identity {:?} belongs to another endpoint",
                rec.identity
            )));
        }
        self.write(|s| {
            s.psks.insert((rec.domain.clone(), rec.ep.clone()), rec);
        })
    }

    fn put_certificate(&self, rec: CertificateRecord) -> Pending<()> {
        self.write(|s| {
            s.certificates.insert(rec.serial.clone(), rec);
        })
    }

    fn revoke_device(&self, domain: String, ep: String, revoked_ms: u64) -> Pending<()> {
        self.write(|s| {
            s.psks.remove(&(domain.clone(), ep.clone()));
            for c in s.certificates.values_mut() {
                if c.domain == domain && c.ep == ep && c.revoked_ms.is_none() {
                    c.revoked_ms = Some(revoked_ms);
                }
            }
        })
    }
}

impl Feed for MemoryStore {
    fn health(&self) -> Health {
        Health {
            failing: self
                .failing
                .load(Ordering::SeqCst)
                .then(|| "the in-memory store was told to fail its writes".to_string()),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}
