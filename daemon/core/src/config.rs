//! The configuration sections of the core's services: `[registry]`, `[requests]`,
//! `[notifications]`, `[limits]` and `[lua]`, each with its defaults and the range checks
//! that concern it alone.
//!
//! The file they come from, its other sections and its errors (file, line, column) are
//! the daemon's (`connectord::config`), which embeds these structs as they are. Every
//! section uses `deny_unknown_fields`, so a misspelt key is an error rather than a silently
//! ignored setting.
//!
//! Each `check` answers the first value out of range as `(key, message)`, the key relative
//! to the section (`queue_len`); the daemon names it in full (`requests.queue_len`) and
//! locates it in the file.

use std::path::PathBuf;

use serde::Deserialize;

/// A value out of its range: the key within its section, and what is wrong with it.
pub type Invalid = (&'static str, String);

/// `key` must be at least `min` ("must be at least {min}"); the other crates' sections
/// use it too (`rest::RestConfig`).
pub fn at_least(key: &'static str, value: u64, min: u64) -> Result<(), Invalid> {
    if value < min {
        return Err((key, format!("must be at least {min}")));
    }
    Ok(())
}

/// `key` must be within `lo..=hi` ("must be between {lo} and {hi}").
fn between(key: &'static str, value: u64, lo: u64, hi: u64) -> Result<(), Invalid> {
    if !(lo..=hi).contains(&value) {
        return Err((key, format!("must be between {lo} and {hi}")));
    }
    Ok(())
}

/// `[limits]`: traffic limits per domain (seed: "Traffic limits").
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Transactions a domain may make in 24 hours: incoming registrations, updates,
    /// removals and notifications, outgoing resource and subscription requests. The
    /// endpoint quota is `registry.max_endpoints_per_domain`.
    pub transaction_quota: u64,
    /// How often the counts that changed are written to the store. A restart goes on
    /// with the stored day; a crash loses at most this much of counting.
    pub save_interval_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            transaction_quota: 100_000_000,
            save_interval_ms: 5000,
        }
    }
}

impl LimitsConfig {
    /// Range checks serde cannot express.
    pub fn check(&self) -> Result<(), Invalid> {
        at_least("transaction_quota", self.transaction_quota, 1)?;
        between("save_interval_ms", self.save_interval_ms, 10, 3_600_000)
    }
}

/// `[lua]`: pre-subscription rules written in Lua.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LuaConfig {
    /// Directory of rule files (`*.lua`), watched for changes. A relative path is taken
    /// from the daemon's working directory. A missing directory means no Lua rules.
    pub dir: PathBuf,
    /// Memory one rule file's Lua state may use, in KiB.
    pub memory_limit_kb: usize,
    /// Lua VM instructions one call may run before it is stopped (counted in steps of
    /// 1000; the steps of pattern matching in `string.find`, `match`, `gmatch` and `gsub`
    /// count too).
    pub instruction_budget: u64,
    /// Wall-clock time one call may run before it is stopped, in milliseconds (checked
    /// with the instruction count and during pattern matching).
    pub time_limit_ms: u64,
}

impl Default for LuaConfig {
    fn default() -> Self {
        LuaConfig {
            dir: PathBuf::from("scripts"),
            memory_limit_kb: 8192,
            instruction_budget: 1_000_000,
            time_limit_ms: 100,
        }
    }
}

impl LuaConfig {
    /// Range checks serde cannot express.
    pub fn check(&self) -> Result<(), Invalid> {
        at_least(
            "memory_limit_kb",
            u64::try_from(self.memory_limit_kb).unwrap_or(u64::MAX),
            256,
        )?;
        at_least("instruction_budget", self.instruction_budget, 1000)?;
        between("time_limit_ms", self.time_limit_ms, 1, 60_000)
    }
}

/// `[requests]`: requests from applications to devices.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestsConfig {
    /// Requests waiting per endpoint (one is in flight at a time, CoAP NSTART 1); a request
    /// beyond this is answered 429.
    pub queue_len: usize,
    /// Largest request body accepted on the REST API, in bytes (413 beyond).
    pub max_body: usize,
}

impl Default for RequestsConfig {
    fn default() -> Self {
        RequestsConfig {
            queue_len: 20,
            max_body: 1_048_576,
        }
    }
}

/// Smallest `requests.max_body`: room for a callback's or a pre-subscription's JSON. Below
/// it (0 included) the REST API would answer 413 to writes it documents.
pub const MIN_REQUEST_BODY: usize = 1024;

impl RequestsConfig {
    /// Range checks serde cannot express.
    pub fn check(&self) -> Result<(), Invalid> {
        if self.queue_len == 0 {
            return Err(("queue_len", "must be at least 1".into()));
        }
        at_least("max_body", self.max_body as u64, MIN_REQUEST_BODY as u64)
    }
}

/// Largest `notifications.max_concurrent_deliveries`: each may be a thread of the sink
/// plugin's.
pub const MAX_CONCURRENT_DELIVERIES: usize = 1024;

/// What an undelivered event counts against `notifications.max_queued_bytes_per_key`
/// beyond its rendered entry: its share of the store's record (key, sequence number, kind,
/// time) and of the hub's queue. Pelion says only that "reliable storage has some
/// overhead for every stored notification" (50 MB hold more than 160 000 events of 100
/// bytes: about 200 bytes each beyond the event); we count the same.
pub const EVENT_OVERHEAD_BYTES: u64 = 200;

/// Smallest `notifications.max_queued_bytes_per_key`: room for at least one event of a
/// few KiB.
pub const MIN_QUEUED_BYTES_PER_KEY: u64 = 4096;

/// Largest `notifications.idle_channel_removal_s` other than 0: a year.
pub const MAX_IDLE_CHANNEL_S: u64 = 31_536_000;

/// `[notifications]`: delivery of events to applications.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsConfig {
    /// Longest hold of a long-poll request before it is answered 204 (seed: 30 s).
    pub long_poll_s: u64,
    /// Most events in one long-poll answer or callback delivery.
    pub max_batch: usize,
    /// Most bytes in one long-poll answer, callback delivery or WebSocket frame, counted
    /// as the queue bound counts them (entry plus [`EVENT_OVERHEAD_BYTES`]); an event
    /// larger than this goes alone. At least 4096.
    pub max_batch_bytes: u64,
    /// The event lifetime: events not delivered within this many seconds of their
    /// creation are discarded and counted, in every kind of channel (seed: 15 minutes;
    /// Pelion's successor keeps 24 hours).
    pub discard_after_s: u64,
    /// Most undelivered events kept per access key; the oldest make room.
    pub max_queued_per_key: usize,
    /// Most bytes of undelivered events kept per access key, each event counted as its
    /// rendered entry plus [`EVENT_OVERHEAD_BYTES`]; the oldest make room (Pelion: 50 MB).
    pub max_queued_bytes_per_key: u64,
    /// A channel with no event in, no pull and no delivery for this many seconds is
    /// removed (from the store too); its key gets a new one at its next use. 0: never
    /// (Pelion: 48 hours).
    pub idle_channel_removal_s: u64,
    /// First wait before a failed callback delivery is retried; doubled per failure.
    pub retry_initial_ms: u64,
    /// Longest wait between retries.
    pub retry_max_ms: u64,
    /// A long-poll answer counts as received when the same key pulls again within this
    /// many seconds of it; otherwise its events are delivered again (at least once).
    pub redeliver_after_s: u64,
    /// Most callback deliveries in flight at once, over all keys (each key has at most
    /// one): the sink plugin runs up to this many instances. A receiver that does not
    /// answer holds one for the sink's timeout; the others go on with the rest.
    pub max_concurrent_deliveries: usize,
    /// WebSocket channels (issue 23): a ping follows every frame (its pong acknowledges
    /// the frame) and is sent every this many seconds while the socket is idle; a pong
    /// that does not come within this many seconds drops the socket (its unacknowledged
    /// frame is queued again).
    pub websocket_ping_interval_s: u64,
    /// Every this many seconds the keys with a notification channel are checked with
    /// their backends (`revocation::sweep`): a key that expired (a Pelion access key's
    /// `expires_at`) loses its channel, callback, WebSocket and subscriptions within this
    /// time, as a revoked one does at once. (Revocations and edits through the API are
    /// swept right after the request.)
    pub key_check_interval_s: u64,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        NotificationsConfig {
            long_poll_s: 30,
            max_batch: 500,
            max_batch_bytes: 524_288,
            discard_after_s: 900,
            max_queued_per_key: 100_000,
            max_queued_bytes_per_key: 52_428_800,
            idle_channel_removal_s: 172_800,
            retry_initial_ms: 1000,
            retry_max_ms: 60_000,
            redeliver_after_s: 60,
            max_concurrent_deliveries: 64,
            websocket_ping_interval_s: 20,
            key_check_interval_s: 60,
        }
    }
}

impl NotificationsConfig {
    /// Range checks serde cannot express.
    pub fn check(&self) -> Result<(), Invalid> {
        if self.long_poll_s == 0 || self.long_poll_s > 300 {
            return Err(("long_poll_s", "must lie between 1 and 300".into()));
        }
        if self.max_batch == 0
            || self.max_queued_per_key == 0
            || self.discard_after_s == 0
            || self.redeliver_after_s == 0
        {
            let key = if self.max_batch == 0 {
                "max_batch"
            } else if self.max_queued_per_key == 0 {
                "max_queued_per_key"
            } else if self.discard_after_s == 0 {
                "discard_after_s"
            } else {
                "redeliver_after_s"
            };
            return Err((key, "must be at least 1".into()));
        }
        at_least(
            "max_queued_bytes_per_key",
            self.max_queued_bytes_per_key,
            MIN_QUEUED_BYTES_PER_KEY,
        )?;
        at_least("max_batch_bytes", self.max_batch_bytes, 4096)?;
        if self.idle_channel_removal_s > MAX_IDLE_CHANNEL_S {
            return Err((
                "idle_channel_removal_s",
                format!("must be 0 (never) or at most {MAX_IDLE_CHANNEL_S} (a year)"),
            ));
        }
        if self.max_concurrent_deliveries == 0
            || self.max_concurrent_deliveries > MAX_CONCURRENT_DELIVERIES
        {
            return Err((
                "max_concurrent_deliveries",
                format!("must lie between 1 and {MAX_CONCURRENT_DELIVERIES}"),
            ));
        }
        if self.websocket_ping_interval_s == 0 || self.websocket_ping_interval_s > 300 {
            return Err((
                "websocket_ping_interval_s",
                "must lie between 1 and 300".into(),
            ));
        }
        if self.key_check_interval_s == 0 || self.key_check_interval_s > 86_400 {
            return Err((
                "key_check_interval_s",
                "must lie between 1 and 86400 (a day)".into(),
            ));
        }
        if self.retry_initial_ms == 0 || self.retry_max_ms < self.retry_initial_ms {
            return Err((
                "retry_initial_ms",
                "must be at least 1 and at most notifications.retry_max_ms".into(),
            ));
        }
        Ok(())
    }
}

/// `[registry]`: the LwM2M registration interface.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// The domain (tenant) of devices that register without `d=`, and of the first admin key.
    pub default_domain: String,
    /// Lifetime in seconds when a registration has no `lt=` (LwM2M default: 86400).
    pub default_lifetime_s: u32,
    /// Smallest accepted `lt=`; smaller values are answered 4.00.
    pub min_lifetime_s: u32,
    /// Largest accepted `lt=`; larger values are answered 4.00.
    pub max_lifetime_s: u32,
    /// Registered endpoints per domain; a new registration beyond this is answered
    /// 4.03 Forbidden with a diagnostic payload.
    pub max_endpoints_per_domain: usize,
    /// Registered endpoints over all domains: a device picks its domain with `d=`, so the
    /// per-domain quota alone does not bound the registry (nor memory). A new registration
    /// beyond this is answered 5.03 Service Unavailable with a diagnostic payload.
    pub max_endpoints: usize,
    /// Registrations expired per step (one store commit, their events stored together);
    /// the daemon serves REST and devices between two steps (issue 24: a whole fleet due
    /// at once after an outage longer than its lifetime).
    pub expiry_batch: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            default_domain: "default".into(),
            default_lifetime_s: 86_400,
            min_lifetime_s: 1,
            max_lifetime_s: 31_536_000,
            max_endpoints_per_domain: 1_000_000,
            max_endpoints: 2_000_000,
            expiry_batch: 1000,
        }
    }
}

impl RegistryConfig {
    /// Range checks serde cannot express.
    pub fn check(&self) -> Result<(), Invalid> {
        if !connectord_model::valid_domain(&self.default_domain) {
            return Err((
                "default_domain",
                "must be 1 to 64 characters of letters, digits, '-', '_' and '.'".into(),
            ));
        }
        if self.min_lifetime_s == 0 || self.min_lifetime_s > self.max_lifetime_s {
            return Err((
                "min_lifetime_s",
                format!(
                    "must be at least 1 and at most registry.max_lifetime_s ({})",
                    self.max_lifetime_s
                ),
            ));
        }
        if !(self.min_lifetime_s..=self.max_lifetime_s).contains(&self.default_lifetime_s) {
            return Err((
                "default_lifetime_s",
                "must lie between registry.min_lifetime_s and registry.max_lifetime_s".into(),
            ));
        }
        if self.max_endpoints_per_domain == 0 {
            return Err(("max_endpoints_per_domain", "must be at least 1".into()));
        }
        if self.max_endpoints == 0 {
            return Err(("max_endpoints", "must be at least 1".into()));
        }
        if !(1..=100_000).contains(&self.expiry_batch) {
            return Err(("expiry_batch", "must be between 1 and 100000".into()));
        }
        Ok(())
    }
}
