//! The registry's read model: the endpoints registered now and the lookups on them.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use hashbrown::HashTable;

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
/// back when the store refuses it. Readers are shown only what the store committed: until
/// a change's write is answered, the endpoints it touched are shown as they were
/// ([`Maps::unsettled`], [`Maps::settle`]), so a reader never sees a change during its
/// commit, nor after a refusal (issue 19, item 1; "memory changes only after the store
/// commits").
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

/// The maps behind a [`Directory`]. This is kept once per registered endpoint, so its
/// size is part of the memory per endpoint (docs/PERFORMANCE.md, issue 24): the indexes
/// hold the endpoint itself (one pointer a slot) and find it by the id or name inside it,
/// rather than keeping a copy of the id or the name as a key; a lookup allocates nothing.
#[derive(Default)]
pub(super) struct Maps {
    /// By registration id.
    by_id: HashTable<Arc<Endpoint>>,
    /// domain → endpoints by name (the same `Arc`s as in `by_id`).
    by_name: Map<Box<str>, HashTable<Arc<Endpoint>>>,
    /// The hasher of the ids and names (aHash, keyed per process: see `crate::hashing`).
    hasher: ahash::RandomState,
    /// By deadline, the next to expire first.
    deadlines: BTreeSet<Deadline>,
    /// The same for the other cluster nodes' registrations (issue 22), which their owners
    /// expire; read for those whose owner left the cluster ([`Maps::orphans_due`]).
    foreign_deadlines: BTreeSet<Deadline>,
    /// The endpoints of `by_id` per owner node (`None`: no owner recorded, as on SQLite),
    /// counted as they come and go: `/metrics` and `/v2/cluster` read it at every scrape,
    /// and counting a million endpoints there held the lock that registrations take for
    /// milliseconds each time (issue 24). A handful of nodes: a list.
    owners: Vec<(Option<Box<str>>, usize)>,
    /// What readers are shown, by id, for the ids that a change not yet committed touched.
    unseen_ids: Map<Box<str>, Shown>,
    /// The same by domain and name.
    unseen_names: Map<Box<str>, Map<Box<str>, Shown>>,
    /// The number of the last change made ([`Change`]).
    changes: u64,
}

/// What readers are shown for an id or name while changes of it await the store: the
/// value of the last change of it that committed (or the value before the first).
struct Shown {
    value: Option<Arc<Endpoint>>,
    /// The number of the change that left `value` (0: the value before any).
    change: u64,
    /// Changes of it not yet answered by the store.
    waiting: usize,
}

/// A change of the maps whose store write is awaited ([`Maps::unsettled`]): the ids and
/// names it touched, with what it left each (`None`: nothing), which readers are shown
/// once it committed. One not settled would leave its keys shown as before it for good:
/// the registry's writers hold it across their store wait only, in futures that run to
/// their end (a CoAP request's task, a REST handler through `rest::finish`, the expiry
/// task), dropped half-way only when the daemon stops.
#[must_use = "a change must be settled, or readers never see its keys change again"]
pub(super) struct Change {
    number: u64,
    ids: Vec<(Box<str>, Left)>,
    /// (domain, name, what it left).
    names: Vec<(Box<str>, Box<str>, Left)>,
}

/// What a change left at one of its keys (`None`: nothing).
type Left = Option<Arc<Endpoint>>;

/// Marks `key` of `map` as awaiting one more change; readers are shown `now` (what the
/// maps hold before the change) if nothing awaited it yet.
fn await_change(map: &mut Map<Box<str>, Shown>, key: &str, now: Option<&Arc<Endpoint>>) {
    match map.get_mut(key) {
        Some(shown) => shown.waiting += 1,
        None => {
            map.insert(
                key.into(),
                Shown {
                    value: now.cloned(),
                    change: 0,
                    waiting: 1,
                },
            );
        }
    }
}

/// One change of `key` in `map` was answered: committed (`Some(value)`, what it left)
/// or refused (`None`).
fn settle_key(
    map: &mut Map<Box<str>, Shown>,
    key: &str,
    number: u64,
    committed: Option<Option<Arc<Endpoint>>>,
) {
    let Some(shown) = map.get_mut(key) else {
        return;
    };
    if let Some(value) = committed
        && number > shown.change
    {
        shown.value = value;
        shown.change = number;
    }
    shown.waiting -= 1;
    if shown.waiting == 0 {
        map.remove(key);
    }
}

/// An entry of the deadline index: the endpoint, ordered by (expires_at_ms, id).
struct Deadline(Arc<Endpoint>);

impl Deadline {
    fn at(&self) -> u64 {
        self.0.reg.expires_at_ms
    }
}

impl PartialEq for Deadline {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Deadline {}

impl PartialOrd for Deadline {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Deadline {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.0.reg.expires_at_ms, self.0.reg.id.as_str())
            .cmp(&(other.0.reg.expires_at_ms, other.0.reg.id.as_str()))
    }
}

/// Puts `ep` in `table` under `key` (its id or its name), replacing an endpoint of the
/// same key; returns the one replaced.
fn put(
    table: &mut HashTable<Arc<Endpoint>>,
    hasher: &ahash::RandomState,
    key: fn(&Endpoint) -> &str,
    ep: Arc<Endpoint>,
) -> Option<Arc<Endpoint>> {
    let hash = hasher.hash_one(key(&ep));
    match table.entry(hash, |e| key(e) == key(&ep), |e| hasher.hash_one(key(e))) {
        hashbrown::hash_table::Entry::Occupied(mut o) => Some(std::mem::replace(o.get_mut(), ep)),
        hashbrown::hash_table::Entry::Vacant(v) => {
            v.insert(ep);
            None
        }
    }
}

/// Adds `by` (1 or -1) to the count of `owner` in `owners`, dropping a count that falls
/// to zero.
fn count_owner(owners: &mut Vec<(Option<Box<str>>, usize)>, owner: Option<&str>, by: isize) {
    match owners.iter().position(|(o, _)| o.as_deref() == owner) {
        Some(i) => {
            let n = owners[i].1.saturating_add_signed(by);
            if n == 0 {
                owners.swap_remove(i);
            } else {
                owners[i].1 = n;
            }
        }
        None if by > 0 => owners.push((owner.map(Box::from), by as usize)),
        None => {}
    }
}

fn id_of(e: &Endpoint) -> &str {
    &e.reg.id
}

fn name_of(e: &Endpoint) -> &str {
    &e.reg.name
}

impl Maps {
    pub(super) fn insert(&mut self, ep: Arc<Endpoint>) {
        self.deadlines.insert(Deadline(Arc::clone(&ep)));
        self.index(ep);
    }

    /// Inserts another cluster node's registration (issue 22): listed like ours, with no
    /// deadline here, since its owner runs its expiry.
    pub(super) fn insert_foreign(&mut self, ep: Arc<Endpoint>) {
        self.foreign_deadlines.insert(Deadline(Arc::clone(&ep)));
        self.index(ep);
    }

    /// Puts the stored registrations in at start (`foreign`: another cluster node's, see
    /// [`Maps::insert_foreign`]). The same as one insertion each, in order, but the
    /// indexes are reserved for all of them, an empty deadline set is built from the
    /// sorted entries in one pass instead of a million tree insertions, and the three
    /// indexes are built on three threads (issue 24: a restart with 1 000 000
    /// registrations within 2 s; this is what is left once the last registration is read,
    /// and one thread doing it left the second core idle). Every `Arc` is cloned here
    /// first, so that the threads do not write the same reference counts.
    pub(super) fn insert_all(&mut self, eps: Vec<(Arc<Endpoint>, bool)>) {
        let Maps {
            by_id,
            by_name,
            hasher,
            deadlines,
            foreign_deadlines,
            owners,
            ..
        } = self;
        let hasher = &*hasher;
        let mut for_ids = Vec::with_capacity(eps.len());
        let mut for_names = Vec::with_capacity(eps.len());
        let (mut own, mut foreign) = (Vec::with_capacity(eps.len()), Vec::new());
        for (ep, is_foreign) in eps {
            let d = (ep.reg.expires_at_ms, Deadline(Arc::clone(&ep)));
            if is_foreign {
                foreign.push(d)
            } else {
                own.push(d)
            }
            for_names.push(Arc::clone(&ep));
            for_ids.push(ep);
        }
        std::thread::scope(|scope| {
            scope.spawn(move || {
                by_id.reserve(for_ids.len(), |e| hasher.hash_one(id_of(e)));
                for ep in for_ids {
                    count_owner(owners, ep.reg.node.as_deref(), 1);
                    if let Some(old) = put(by_id, hasher, id_of, ep) {
                        count_owner(owners, old.reg.node.as_deref(), -1);
                    }
                }
            });
            scope.spawn(move || {
                for (set, mut new) in [(deadlines, own), (foreign_deadlines, foreign)] {
                    // By the deadline kept beside each entry: the ids, behind two
                    // pointers, are compared only for equal deadlines.
                    new.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
                    let new = new.into_iter().map(|(_, d)| d);
                    if set.is_empty() {
                        // std's `FromIterator` sorts again (one pass over sorted
                        // entries) and builds the tree bottom-up.
                        *set = new.collect();
                    } else {
                        set.extend(new);
                    }
                }
            });
            let mut per_domain: Map<&str, usize> = Map::default();
            for ep in &for_names {
                *per_domain.entry(ep.reg.domain.as_str()).or_default() += 1;
            }
            for (domain, n) in per_domain {
                let names = by_name.entry(domain.into()).or_default();
                names.reserve(n, |e| hasher.hash_one(name_of(e)));
            }
            for ep in for_names {
                if let Some(names) = by_name.get_mut(ep.reg.domain.as_str()) {
                    put(names, hasher, name_of, ep);
                }
            }
        });
    }

    /// Puts `ep` in the indexes by name and by id.
    fn index(&mut self, ep: Arc<Endpoint>) {
        let domain = ep.reg.domain.as_str();
        if !self.by_name.contains_key(domain) {
            self.by_name.insert(domain.into(), HashTable::new());
        }
        if let Some(names) = self.by_name.get_mut(domain) {
            put(names, &self.hasher, name_of, Arc::clone(&ep));
        }
        count_owner(&mut self.owners, ep.reg.node.as_deref(), 1);
        if let Some(old) = put(&mut self.by_id, &self.hasher, id_of, ep) {
            count_owner(&mut self.owners, old.reg.node.as_deref(), -1);
        }
    }

    /// The ids of other nodes' registrations due at `now_ms` whose owner is not `live`.
    pub(super) fn orphans_due(
        &self,
        now_ms: u64,
        live: &(dyn Fn(&str) -> bool + Sync),
        limit: usize,
    ) -> Vec<String> {
        self.foreign_deadlines
            .iter()
            .take_while(|d| d.at() <= now_ms)
            .filter(|d| d.0.reg.node.as_deref().is_some_and(|n| !live(n)))
            .take(limit)
            .map(|d| d.0.reg.id.clone())
            .collect()
    }

    /// The id, domain and name of every other node's registration listed here.
    pub(super) fn foreign_names(&self) -> Vec<(String, String, String)> {
        self.foreign_deadlines
            .iter()
            .map(|d| {
                let r = &d.0.reg;
                (r.id.clone(), r.domain.clone(), r.name.clone())
            })
            .collect()
    }

    pub(super) fn remove(&mut self, id: &str) -> Option<Arc<Endpoint>> {
        let hash = self.hasher.hash_one(id);
        let (ep, _) = self
            .by_id
            .find_entry(hash, |e| e.reg.id == id)
            .ok()?
            .remove();
        count_owner(&mut self.owners, ep.reg.node.as_deref(), -1);
        let r = &ep.reg;
        if let Some(names) = self.by_name.get_mut(r.domain.as_str()) {
            let hash = self.hasher.hash_one(r.name.as_str());
            if let Ok(e) = names.find_entry(hash, |e| e.reg.name == r.name) {
                e.remove();
            }
            if names.is_empty() {
                self.by_name.remove(r.domain.as_str());
            }
        }
        let key = Deadline(Arc::clone(&ep));
        if !self.deadlines.remove(&key) {
            self.foreign_deadlines.remove(&key);
        }
        Some(ep)
    }

    /// Whether `ep` (this very registration, not a later one of the same id) is held.
    pub(super) fn holds(&self, ep: &Arc<Endpoint>) -> bool {
        self.by_id(ep.reg.id.as_str())
            .is_some_and(|e| Arc::ptr_eq(e, ep))
    }

    /// Puts back a registration whose removal the store refused, unless its id or its
    /// name was taken meanwhile (a later change, which the store applied after ours).
    pub(super) fn restore(&mut self, ep: &Arc<Endpoint>) {
        if self.by_id(ep.reg.id.as_str()).is_none()
            && self.by_name(&ep.reg.domain, &ep.reg.name).is_none()
        {
            self.insert(Arc::clone(ep));
        }
    }

    /// Before the maps are changed for a store write: readers go on being shown what
    /// `ids` and `names` (domain, name) hold now until the change is settled. Call
    /// [`Maps::made`] right after the change, in the same critical section.
    pub(super) fn unsettled(&mut self, ids: &[&str], names: &[(&str, &str)]) -> Change {
        self.changes += 1;
        for &id in ids {
            let now = self.by_id(id).cloned();
            await_change(&mut self.unseen_ids, id, now.as_ref());
        }
        for &(domain, name) in names {
            let now = self.by_name(domain, name).cloned();
            if !self.unseen_names.contains_key(domain) {
                self.unseen_names.insert(domain.into(), Map::default());
            }
            if let Some(m) = self.unseen_names.get_mut(domain) {
                await_change(m, name, now.as_ref());
            }
        }
        Change {
            number: self.changes,
            ids: ids.iter().map(|&i| (i.into(), None)).collect(),
            names: names
                .iter()
                .map(|&(d, n)| (d.into(), n.into(), None))
                .collect(),
        }
    }

    /// Notes what the change left at each of its keys (right after making it).
    pub(super) fn made(&self, c: &mut Change) {
        for (id, left) in &mut c.ids {
            *left = self.by_id(id).cloned();
        }
        for (domain, name, left) in &mut c.names {
            *left = self.by_name(domain, name).cloned();
        }
    }

    /// The store answered the change: once it `committed`, readers are shown what it left
    /// (unless a later change of the same key committed already); a refused one is never
    /// shown. A key no change awaits any more is shown from the maps again, so a refused
    /// change must be rolled back in the maps in the same critical section.
    pub(super) fn settle(&mut self, c: Change, committed: bool) {
        for (id, left) in c.ids {
            settle_key(
                &mut self.unseen_ids,
                &id,
                c.number,
                committed.then_some(left),
            );
        }
        for (domain, name, left) in c.names {
            if let Some(m) = self.unseen_names.get_mut(&*domain) {
                settle_key(m, &name, c.number, committed.then_some(left));
                if m.is_empty() {
                    self.unseen_names.remove(&*domain);
                }
            }
        }
    }

    /// A change made and committed at once (another node's, read from the store): shown
    /// to readers now, also where earlier changes still await the store.
    pub(super) fn change_committed(
        &mut self,
        ids: &[&str],
        names: &[(&str, &str)],
        change: impl FnOnce(&mut Maps),
    ) {
        let mut c = self.unsettled(ids, names);
        change(self);
        self.made(&mut c);
        self.settle(c, true);
    }

    /// What readers are shown by id: the committed endpoint.
    fn shown_by_id(&self, id: &str) -> Option<&Arc<Endpoint>> {
        match self.unseen_ids.get(id) {
            Some(shown) => shown.value.as_ref(),
            None => self.by_id(id),
        }
    }

    /// What readers are shown by domain and name: the committed endpoint.
    fn shown_by_name(&self, domain: &str, name: &str) -> Option<&Arc<Endpoint>> {
        match self.unseen_names.get(domain).and_then(|m| m.get(name)) {
            Some(shown) => shown.value.as_ref(),
            None => self.by_name(domain, name),
        }
    }

    pub(super) fn by_id(&self, id: &str) -> Option<&Arc<Endpoint>> {
        self.by_id
            .find(self.hasher.hash_one(id), |e| e.reg.id == id)
    }

    pub(super) fn by_name(&self, domain: &str, name: &str) -> Option<&Arc<Endpoint>> {
        self.by_name
            .get(domain)?
            .find(self.hasher.hash_one(name), |e| e.reg.name == name)
    }

    pub(super) fn count_in(&self, domain: &str) -> usize {
        self.by_name.get(domain).map_or(0, HashTable::len)
    }

    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// At most `limit` ids whose deadline is at or before `now_ms`, the earliest first.
    pub(super) fn due(&self, now_ms: u64, limit: usize) -> Vec<String> {
        self.deadlines
            .iter()
            .take_while(|d| d.at() <= now_ms)
            .take(limit)
            .map(|d| d.0.reg.id.clone())
            .collect()
    }

    /// The earliest deadline.
    pub(super) fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(Deadline::at)
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
        self.lock().shown_by_name(domain, name).cloned()
    }

    /// One endpoint by registration id (the registration interface's `/rd/{id}`).
    pub fn by_id(&self, id: &str) -> Option<Arc<Endpoint>> {
        self.lock().shown_by_id(id).cloned()
    }

    /// Endpoints of a domain, sorted by name, optionally only those of one endpoint type.
    pub fn list(&self, domain: &str, ept: Option<&str>) -> Vec<Arc<Endpoint>> {
        let maps = self.lock();
        let unseen = maps.unseen_names.get(domain);
        // Compared as the listing shows the type: an endpoint without one is listed with
        // `"type": ""`, so `?type=` (empty) finds it (it found nothing).
        let wanted =
            |e: &&Arc<Endpoint>| ept.is_none_or(|want| e.reg.ept.as_deref().unwrap_or("") == want);
        let mut v: Vec<_> = maps
            .by_name
            .get(domain)
            .into_iter()
            .flat_map(HashTable::iter)
            .filter(|e| unseen.is_none_or(|u| !u.contains_key(e.reg.name.as_str())))
            .chain(
                unseen
                    .into_iter()
                    .flat_map(|u| u.values())
                    .filter_map(|s| s.value.as_ref()),
            )
            .filter(wanted)
            .cloned()
            .collect();
        drop(maps);
        v.sort_by(|a, b| a.reg.name.cmp(&b.reg.name));
        v
    }

    /// The endpoints owned by `node` (`None`: a single node's, which record none)
    /// registered at or after `since_ms`: a pass over every endpoint, for the start's
    /// second evaluation of pre-subscriptions (`Subscriptions::redo_unsettled_presubs`).
    pub fn registered_since(&self, since_ms: u64, node: Option<&str>) -> Vec<Arc<Endpoint>> {
        let maps = self.lock();
        maps.by_name
            .values()
            .flat_map(HashTable::iter)
            .filter(|e| e.reg.registered_at_ms >= since_ms && e.reg.node.as_deref() == node)
            .cloned()
            .collect()
    }

    /// Registered endpoints in one domain.
    pub fn count_in(&self, domain: &str) -> usize {
        let maps = self.lock();
        let mut n = maps.count_in(domain);
        for (name, shown) in maps.unseen_names.get(domain).into_iter().flatten() {
            n -= usize::from(maps.by_name(domain, name).is_some());
            n += usize::from(shown.value.is_some());
        }
        n
    }

    /// Registered endpoints by owner node (issue 22: `Registration::node`; `None` for
    /// those recording none, a single node's), counted as they come and go (not a pass
    /// over every endpoint), the changes not yet committed left out.
    pub fn count_by_owner(&self) -> std::collections::BTreeMap<Option<String>, usize> {
        let maps = self.lock();
        let mut owners = maps.owners.clone();
        for (id, shown) in &maps.unseen_ids {
            if let Some(e) = maps.by_id(id) {
                count_owner(&mut owners, e.reg.node.as_deref(), -1);
            }
            if let Some(e) = &shown.value {
                count_owner(&mut owners, e.reg.node.as_deref(), 1);
            }
        }
        owners
            .iter()
            .map(|(o, n)| (o.as_deref().map(String::from), *n))
            .collect()
    }

    /// Registered endpoints in all domains.
    pub fn len(&self) -> usize {
        let maps = self.lock();
        let mut n = maps.len();
        for (id, shown) in &maps.unseen_ids {
            n -= usize::from(maps.by_id(id).is_some());
            n += usize::from(shown.value.is_some());
        }
        n
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
