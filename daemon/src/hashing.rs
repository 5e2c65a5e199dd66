//! The hasher of the daemon's in-memory maps.
//!
//! Most keys come from outside: endpoint names and domains a device chooses, CoAP tokens,
//! access keys. std's SipHash resists collision flooding but cost about 5 % of the
//! daemon's CPU per proxied read (about fifty hashes of short strings a read, profiled
//! with callgrind). aHash is keyed as well: every map gets its own random keys from the
//! OS at creation, so collisions cannot be chosen in advance, and it hashes a short
//! string in a fraction of SipHash's time (docs/PERFORMANCE.md).

use std::collections::{HashMap, HashSet};

/// A `HashMap` hashed with per-map random keys (aHash).
pub type Map<K, V> = HashMap<K, V, ahash::RandomState>;

/// A `HashSet` hashed with per-set random keys (aHash).
pub type Set<K> = HashSet<K, ahash::RandomState>;
