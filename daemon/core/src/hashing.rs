//! The hasher of the daemon's in-memory maps keyed by data from outside.
//!
//! Most keys come from outside: endpoint names and domains a device chooses, CoAP tokens
//! and peers, credential headers, access keys. std's SipHash resists collision flooding,
//! but a proxied read hashed about fifty short strings and SipHash was about 5 % of the
//! daemon's user-space instructions per read (callgrind, docs/PERFORMANCE.md). aHash is
//! keyed as well, from OS randomness drawn once per process and varied per map, so
//! colliding keys cannot be chosen in advance (its claim; aHash is not analysed as SipHash
//! is), and it hashes a short string in a fraction of SipHash's time.

use std::collections::HashMap;

/// A `HashMap` hashed with per-map random keys (aHash's `RandomState`).
pub type Map<K, V> = HashMap<K, V, ahash::RandomState>;
