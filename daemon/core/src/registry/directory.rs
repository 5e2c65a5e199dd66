//! The registry's read model: the endpoints registered now and the lookups on them.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use super::Endpoint;
use crate::hashing::Map;

/// What is registered now: the read model of the registry.
///
/// Readers (the request layer, the subscriptions, the REST API) get an `Arc<Directory>` at
/// construction and only look things up; the directory holds no store and has no method
/// that changes it outside the `registry` module. The write service,
/// [`Registry`](super::Registry), owns the store, the listeners and the expiry, and is the
/// only writer: it changes the maps under this directory's lock while it submits the same
/// change to the store (so the store applies changes in memory order) and rolls a change
/// back when the store refuses it, so the directory holds only what the store committed
/// (issue 19, item 1; a reader may see a change during its commit, never after a refusal).
///
/// A read is one lock, the map lookups and an `Arc` clone, as before the split: the
/// proxied-read path does a [`Directory::get`] per request.
///
/// Multi-node (issue 22): the directory also holds the other nodes' registrations, put and
/// removed by [`Registry::apply_foreign`](super::Registry::apply_foreign) from the store's
/// watch of the registrations bucket, in the store's order. A foreign registration has no
/// deadline here (`Maps::insert_foreign`): its owner runs its expiry. The deadline index is
/// kept here (one lock with the maps it indexes) so that the expiry task reads what is due
/// and removes it atomically.
pub struct Directory {
    maps: Mutex<Maps>,
}

/// The maps behind a [`Directory`]. Keys are boxed strings and the name index holds the
/// endpoint itself (not its id): this is kept once per registered endpoint, so its size is
/// the memory per endpoint (docs/PERFORMANCE.md), and a lookup by name allocates nothing.
#[derive(Default)]
pub(super) struct Maps {
    by_id: Map<Box<str>, Arc<Endpoint>>,
    /// domain → name → endpoint (the same `Arc` as in `by_id`).
    by_name: Map<Box<str>, Map<Box<str>, Arc<Endpoint>>>,
    /// (expires_at_ms, id), the next to expire first.
    deadlines: BTreeSet<(u64, Box<str>)>,
    /// The same for the other cluster nodes' registrations (issue 22), which their owners
    /// expire; read for those whose owner left the cluster ([`Maps::orphans_due`]).
    foreign_deadlines: BTreeSet<(u64, Box<str>)>,
}

impl Maps {
    pub(super) fn insert(&mut self, ep: Arc<Endpoint>) {
        let r = &ep.reg;
        self.by_name
            .entry(r.domain.as_str().into())
            .or_default()
            .insert(r.name.as_str().into(), Arc::clone(&ep));
        self.deadlines
            .insert((r.expires_at_ms, r.id.as_str().into()));
        self.by_id.insert(r.id.as_str().into(), ep);
    }

    /// Inserts another cluster node's registration (issue 22): listed like ours, with no
    /// deadline here, since its owner runs its expiry.
    pub(super) fn insert_foreign(&mut self, ep: Arc<Endpoint>) {
        let r = &ep.reg;
        self.by_name
            .entry(r.domain.as_str().into())
            .or_default()
            .insert(r.name.as_str().into(), Arc::clone(&ep));
        self.foreign_deadlines
            .insert((r.expires_at_ms, r.id.as_str().into()));
        self.by_id.insert(r.id.as_str().into(), ep);
    }

    /// The ids of other nodes' registrations due at `now_ms` whose owner is not `live`.
    pub(super) fn orphans_due(
        &self,
        now_ms: u64,
        live: &(dyn Fn(&str) -> bool + Sync),
    ) -> Vec<String> {
        self.foreign_deadlines
            .iter()
            .take_while(|(t, _)| *t <= now_ms)
            .filter(|(_, id)| {
                self.by_id
                    .get(id)
                    .and_then(|e| e.reg.node.as_deref())
                    .is_some_and(|n| !live(n))
            })
            .map(|(_, id)| id.to_string())
            .collect()
    }

    pub(super) fn remove(&mut self, id: &str) -> Option<Arc<Endpoint>> {
        let ep = self.by_id.remove(id)?;
        let r = &ep.reg;
        if let Some(names) = self.by_name.get_mut(r.domain.as_str()) {
            names.remove(r.name.as_str());
            if names.is_empty() {
                self.by_name.remove(r.domain.as_str());
            }
        }
        let key = (r.expires_at_ms, r.id.as_str().into());
        if !self.deadlines.remove(&key) {
            self.foreign_deadlines.remove(&key);
        }
        Some(ep)
    }

    /// Whether `ep` (this very registration, not a later one of the same id) is held.
    pub(super) fn holds(&self, ep: &Arc<Endpoint>) -> bool {
        self.by_id
            .get(ep.reg.id.as_str())
            .is_some_and(|e| Arc::ptr_eq(e, ep))
    }

    /// Puts back a registration whose removal the store refused, unless its id or its
    /// name was taken meanwhile (a later change, which the store applied after ours).
    pub(super) fn restore(&mut self, ep: &Arc<Endpoint>) {
        if !self.by_id.contains_key(ep.reg.id.as_str())
            && self.by_name(&ep.reg.domain, &ep.reg.name).is_none()
        {
            self.insert(Arc::clone(ep));
        }
    }

    pub(super) fn by_id(&self, id: &str) -> Option<&Arc<Endpoint>> {
        self.by_id.get(id)
    }

    pub(super) fn by_name(&self, domain: &str, name: &str) -> Option<&Arc<Endpoint>> {
        self.by_name.get(domain)?.get(name)
    }

    pub(super) fn count_in(&self, domain: &str) -> usize {
        self.by_name.get(domain).map_or(0, Map::len)
    }

    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// The ids whose deadline is at or before `now_ms`, the earliest first.
    pub(super) fn due(&self, now_ms: u64) -> Vec<String> {
        self.deadlines
            .iter()
            .take_while(|(t, _)| *t <= now_ms)
            .map(|(_, id)| id.to_string())
            .collect()
    }

    /// The earliest deadline.
    pub(super) fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|(t, _)| *t)
    }
}

impl Directory {
    /// An empty directory (its writer, the registry, loads it).
    pub(super) fn new() -> Directory {
        Directory {
            maps: Mutex::new(Maps::default()),
        }
    }

    /// The maps, for the registry's changes and for the reads below.
    pub(super) fn lock(&self) -> MutexGuard<'_, Maps> {
        // Every critical section leaves the maps consistent before anything can panic.
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One endpoint by domain and exact name.
    pub fn get(&self, domain: &str, name: &str) -> Option<Arc<Endpoint>> {
        self.lock().by_name(domain, name).cloned()
    }

    /// One endpoint by registration id (the registration interface's `/rd/{id}`).
    pub fn by_id(&self, id: &str) -> Option<Arc<Endpoint>> {
        self.lock().by_id(id).cloned()
    }

    /// Endpoints of a domain, sorted by name, optionally only those of one endpoint type.
    pub fn list(&self, domain: &str, ept: Option<&str>) -> Vec<Arc<Endpoint>> {
        let maps = self.lock();
        let mut v: Vec<_> = maps
            .by_name
            .get(domain)
            .into_iter()
            .flat_map(Map::values)
            .filter(|e| ept.is_none() || e.reg.ept.as_deref() == ept)
            .cloned()
            .collect();
        drop(maps);
        v.sort_by(|a, b| a.reg.name.cmp(&b.reg.name));
        v
    }

    /// Registered endpoints in one domain.
    pub fn count_in(&self, domain: &str) -> usize {
        self.lock().count_in(domain)
    }

    /// Registered endpoints by owner node (issue 22: `Registration::node`; `None` for
    /// those recording none, a single node's). One pass over every endpoint under the
    /// lock: for `GET /v2/cluster` and `/metrics`, not for a device's path.
    pub fn count_by_owner(&self) -> std::collections::BTreeMap<Option<String>, usize> {
        let maps = self.lock();
        let mut out = std::collections::BTreeMap::new();
        for ep in maps.by_id.values() {
            *out.entry(ep.reg.node.clone()).or_insert(0) += 1;
        }
        out
    }

    /// Registered endpoints in all domains.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
