//! The daemon's configuration: one TOML file, parsed strictly.
//!
//! Every section uses `deny_unknown_fields`, so a misspelt key is an error rather than a
//! silently ignored setting. Errors name the file, line, column and the dotted key path
//! (`coap.max_datagram`), see [`ConfigError`].
//!
//! The embedded defaults are the repository's `etc/connectord.toml`, compiled in: running
//! without `--config` is exactly running with that file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The commented default configuration shipped in `etc/` and compiled into the binary.
pub const DEFAULT_TOML: &str = include_str!("../../../../etc/connectord.toml");

/// Where the configuration came from, for error messages and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The defaults compiled into the binary.
    Embedded,
    /// A file on disk.
    File(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Embedded => f.write_str("<embedded defaults>"),
            Source::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A configuration that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{path}: cannot read configuration: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key is unknown, or a value has the wrong type.
    #[error("{source_name}:{line}:{column}: {message}{}", key_suffix(.key))]
    Parse {
        source_name: Source,
        line: usize,
        column: usize,
        /// Dotted path of the offending key, when known (`rest.listen`).
        key: Option<String>,
        message: String,
    },
    /// The file parsed, but a value is out of its allowed range.
    #[error("{source_name}{}: key `{key}`: {message}", at(.location))]
    Invalid {
        source_name: Source,
        /// Line and column of the key's value in the file (or of its section when the key
        /// is not in the file: a default that conflicts with a value given); `None` when
        /// neither is in the file.
        location: Option<(usize, usize)>,
        key: String,
        message: String,
    },
}

fn at(location: &Option<(usize, usize)>) -> String {
    match location {
        Some((line, column)) => format!(":{line}:{column}"),
        None => String::new(),
    }
}

impl ConfigError {
    /// An `Invalid` error found after parsing, located in the file's `text`.
    fn located(self, text: &str) -> ConfigError {
        match self {
            ConfigError::Invalid {
                source_name,
                location: None,
                key,
                message,
            } => ConfigError::Invalid {
                location: locate_key(text, &key),
                source_name,
                key,
                message,
            },
            other => other,
        }
    }
}

/// Line and column of the value of the dotted `key` in `text`; when the file does not
/// have the key, of the nearest table on its path that it has.
fn locate_key(text: &str, key: &str) -> Option<(usize, usize)> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut found = None;
    for segment in key.split('.') {
        let Some(value) = table.get(segment) else {
            break;
        };
        found = Some(value.span().start);
        match value.get_ref().as_table() {
            Some(t) => table = t,
            None => break,
        }
    }
    found.map(|offset| line_col(text, offset))
}

/// Where a key of the configuration `source` is: for a file, read again to find it.
/// For errors found outside [`Config::parse`] (the plugin names, say).
pub fn locate(source: &Source, key: &str) -> Option<(usize, usize)> {
    match source {
        Source::Embedded => locate_key(DEFAULT_TOML, key),
        Source::File(path) => locate_key(&std::fs::read_to_string(path).ok()?, key),
    }
}

/// The level names `log.level` accepts (in any case), and the level each means.
/// `warning` is an alias of `warn` (the word syslog and Python use).
pub const LOG_LEVELS: &[(&str, &str)] = &[
    ("off", "off"),
    ("error", "error"),
    ("warn", "warn"),
    ("warning", "warn"),
    ("info", "info"),
    ("debug", "debug"),
    ("trace", "trace"),
];

fn level_name(word: &str) -> Option<&'static str> {
    LOG_LEVELS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(word.trim()))
        .map(|(_, level)| *level)
}

/// Checks a `log.level` value and returns it as the `tracing` filter reads it.
///
/// The value is a comma-separated list of directives, each a level (`info`) or a target
/// with a level (`connectord::coap=debug`); every level is one of [`LOG_LEVELS`]. The
/// `tracing` filter itself would take a lone word that is no level (`verbose`) as a
/// target at `trace`, silencing every other line; here it is an error. Numbers (which the
/// filter reads as levels) and empty directives are refused too.
pub fn log_filter(text: &str) -> Result<String, String> {
    const LEVELS: &str = "off, error, warn (or warning), info, debug, trace";
    let mut directives = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!(
                "{text:?} has an empty directive; give a level ({LEVELS}) or target=level"
            ));
        }
        // A span filter (`target[span{field=1}]=debug`) may hold `=`; the level's `=`
        // is the last one, after any `]`.
        let (target, word) = match part.rfind('=') {
            Some(i) if !part[i..].contains(']') => (Some(part[..i].trim()), &part[i + 1..]),
            _ => (None, part),
        };
        let Some(level) = level_name(word) else {
            return Err(match target {
                None => format!(
                    "`{part}` is not a log level ({LEVELS}); a target needs one: `{part}=debug`"
                ),
                Some(_) => format!(
                    "`{}` in `{part}` is not a log level ({LEVELS})",
                    word.trim()
                ),
            });
        };
        let directive = match target {
            None => level.to_string(),
            Some("") => return Err(format!("`{part}` names no target before `=`")),
            Some(t) => format!("{t}={level}"),
        };
        directive
            .parse::<tracing_subscriber::filter::Directive>()
            .map_err(|e| format!("`{part}`: {e}"))?;
        directives.push(directive);
    }
    let filter = directives.join(",");
    tracing_subscriber::EnvFilter::try_new(&filter).map_err(|e| e.to_string())?;
    Ok(filter)
}

fn key_suffix(key: &Option<String>) -> String {
    match key {
        Some(k) if !k.is_empty() => format!(" (key `{k}`)"),
        _ => String::new(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub rest: RestConfig,
    #[serde(default)]
    pub coap: CoapConfig,
    #[serde(default)]
    pub registry: RegistryConfig,
    #[serde(default)]
    pub requests: RequestsConfig,
    #[serde(default)]
    pub notifications: NotificationsConfig,
    #[serde(default)]
    pub lua: LuaConfig,
    #[serde(default)]
    pub plugins: PluginsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
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

/// `[plugins]`: auth backends and notification sinks.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Directory of plugin files (`lib<crate>.so`), watched: a changed file is loaded
    /// again and swapped in without a restart. Unset: only the built-in plugins
    /// (`connector`, `webhook`). The directory must not be writable by group or others.
    pub dir: Option<PathBuf>,
    /// Auth backends by plugin name, asked in this order; the first that recognises a
    /// credential decides.
    pub auth: Vec<String>,
    /// The plugin that delivers notifications to callback URLs.
    pub sink: String,
    /// Each plugin's own settings, by plugin name: `[plugins.settings.webhook]`.
    pub settings: std::collections::BTreeMap<String, toml::Table>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: None,
            auth: vec!["connector".into()],
            sink: "webhook".into(),
            settings: Default::default(),
        }
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

/// `[notifications]`: delivery of events to applications.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsConfig {
    /// Longest hold of a long-poll request before it is answered 204 (seed: 30 s).
    pub long_poll_s: u64,
    /// Most events in one long-poll answer or callback delivery.
    pub max_batch: usize,
    /// Events not delivered within this many seconds are discarded (seed: 15 minutes).
    pub discard_after_s: u64,
    /// Most undelivered events kept per access key; the oldest make room.
    pub max_queued_per_key: usize,
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
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        NotificationsConfig {
            long_poll_s: 30,
            max_batch: 500,
            discard_after_s: 900,
            max_queued_per_key: 100_000,
            retry_initial_ms: 1000,
            retry_max_ms: 60_000,
            redeliver_after_s: 60,
            max_concurrent_deliveries: 64,
        }
    }
}

/// `[log]`: what the daemon writes to standard error (journald under systemd).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A level (`off`, `error`, `warn` or `warning`, `info`, `debug`, `trace`, any case)
    /// or directives that each name one: `connectord::coap=trace,info`. Anything else
    /// (`verbose`, a bare target) is refused, at start and at SIGHUP. Reloaded on SIGHUP.
    pub level: String,
    /// Lines caused by single devices ("registered", "de-registered", "registration
    /// expired", ...) logged per second; past it they are counted and summarised once a
    /// second (see `log_budget`). 0: no limit. Reloaded on SIGHUP.
    pub device_lines_per_s: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            device_lines_per_s: crate::log_budget::DEFAULT_PER_SECOND,
        }
    }
}

/// `[runtime]`: the async runtime's threads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Worker threads of the async runtime (REST, CoAP, requests, notifications). 0: one
    /// per CPU. `TOKIO_WORKER_THREADS` is not read. The SQLite store and each plugin have
    /// threads of their own besides. On a 2-core machine, 1 measured about
    /// 15 % less CPU per proxied read (fewer wake-ups across threads), with no clear change
    /// for registrations and notifications (docs/PERFORMANCE.md).
    pub worker_threads: usize,
}

/// Most worker threads `[runtime] worker_threads` accepts.
pub const MAX_WORKER_THREADS: usize = 1024;

/// Largest `notifications.max_concurrent_deliveries`: each may be a thread of the sink
/// plugin's.
pub const MAX_CONCURRENT_DELIVERIES: usize = 1024;

/// `[state]`: where durable state lives.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// The state directory. When absent: `$STATE_DIRECTORY` (set by systemd's
    /// `StateDirectory=`), else `$XDG_STATE_HOME/connectord`, else
    /// `$HOME/.local/state/connectord`, else `./connectord-state`.
    pub dir: Option<PathBuf>,
}

impl StateConfig {
    /// The state directory this configuration resolves to in the current environment.
    pub fn resolve_dir(&self) -> PathBuf {
        if let Some(d) = &self.dir {
            return d.clone();
        }
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        if let Some(d) = env("STATE_DIRECTORY") {
            // systemd may pass several colon-separated directories; the first is ours.
            let s = d.to_string_lossy();
            return PathBuf::from(s.split(':').next().unwrap_or_default());
        }
        if let Some(d) = env("XDG_STATE_HOME") {
            return PathBuf::from(d).join("connectord");
        }
        if let Some(h) = env("HOME") {
            return PathBuf::from(h).join(".local/state/connectord");
        }
        PathBuf::from("connectord-state")
    }
}

/// `[rest]`: the HTTP API for applications.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestConfig {
    /// Addresses to serve the REST API on. Port 0 picks a free port (logged at start).
    pub listen: Vec<SocketAddr>,
    /// Connections served at once; at the limit no new connection is accepted (they wait
    /// in the listen backlog) until one closes.
    pub max_connections: usize,
    /// Connections one client address may have open at once, out of `max_connections`;
    /// more are closed at once (a 503, logged once a minute per address, counted). Below
    /// `max_connections`, so that one address (idle or slowloris connections) cannot take
    /// every slot: the rest stays for other clients. A value over `max_connections`
    /// counts as `max_connections` (no per-address bound), which is what a reverse proxy on
    /// one address needs.
    pub max_connections_per_address: usize,
    /// Seconds the daemon waits on a client: for a request's head (request line and
    /// headers), for its body (408 when it does not arrive), for the next request on an idle
    /// connection (HTTP/1 or HTTP/2), and for a client to take a response it is not reading. Then the
    /// connection is closed.
    pub client_timeout_s: u64,
}

impl Default for RestConfig {
    fn default() -> Self {
        RestConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 8080))],
            max_connections: 1024,
            max_connections_per_address: 256,
            client_timeout_s: 30,
        }
    }
}

pub use connectord_coap::CoapConfig;

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
        }
    }
}

impl Config {
    /// The embedded defaults (`etc/connectord.toml`).
    pub fn embedded() -> Result<Config, ConfigError> {
        Config::parse(DEFAULT_TOML, Source::Embedded)
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, Source::File(path.to_path_buf()))
    }

    /// Parses and validates TOML text; `source` names it in errors.
    pub fn parse(text: &str, source: Source) -> Result<Config, ConfigError> {
        let parse_err = |err: toml::de::Error, key: Option<String>| {
            let (line, column) = err
                .span()
                .map(|s| line_col(text, s.start))
                .unwrap_or((1, 1));
            ConfigError::Parse {
                source_name: source.clone(),
                line,
                column,
                key,
                message: err.message().to_string(),
            }
        };
        let de = toml::Deserializer::parse(text).map_err(|e| parse_err(e, None))?;
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = (key != ".").then_some(key);
            parse_err(e.into_inner(), key)
        })?;
        config.validate(&source).map_err(|e| e.located(text))?;
        Ok(config)
    }

    /// Range checks serde cannot express; also puts `log.level` in the form the
    /// `tracing` filter reads (see [`log_filter`]). Errors are located by [`Config::parse`].
    fn validate(&mut self, source: &Source) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            source_name: source.clone(),
            location: None,
            key: key.into(),
            message,
        };
        match log_filter(&self.log.level) {
            Ok(filter) => self.log.level = filter,
            Err(message) => return Err(invalid("log.level", message)),
        }
        if self.rest.listen.is_empty() {
            return Err(invalid("rest.listen", "needs at least one address".into()));
        }
        if self.rest.max_connections == 0 {
            return Err(invalid("rest.max_connections", "must be at least 1".into()));
        }
        if self.rest.max_connections_per_address == 0 {
            return Err(invalid(
                "rest.max_connections_per_address",
                "must be at least 1".into(),
            ));
        }
        if !(1..=3600).contains(&self.rest.client_timeout_s) {
            return Err(invalid(
                "rest.client_timeout_s",
                "must lie between 1 and 3600".into(),
            ));
        }
        if self.coap.listen.is_empty() {
            return Err(invalid("coap.listen", "needs at least one address".into()));
        }
        if !(64..=65_507).contains(&self.coap.max_datagram) {
            return Err(invalid(
                "coap.max_datagram",
                format!("{} is outside 64..=65507", self.coap.max_datagram),
            ));
        }
        if self.coap.dedup_capacity == 0 {
            return Err(invalid("coap.dedup_capacity", "must be at least 1".into()));
        }
        let c = &self.coap;
        if c.ack_timeout_ms == 0 {
            return Err(invalid("coap.ack_timeout_ms", "must be at least 1".into()));
        }
        if !(1.0..=10.0).contains(&c.ack_random_factor) {
            return Err(invalid(
                "coap.ack_random_factor",
                "must lie between 1.0 and 10.0".into(),
            ));
        }
        if c.max_retransmit > 20 {
            return Err(invalid("coap.max_retransmit", "must be at most 20".into()));
        }
        if c.separate_response_timeout_s == 0 {
            return Err(invalid(
                "coap.separate_response_timeout_s",
                "must be at least 1".into(),
            ));
        }
        if !c.block_size.is_power_of_two() || !(16..=1024).contains(&c.block_size) {
            return Err(invalid(
                "coap.block_size",
                "must be one of 16, 32, 64, 128, 256, 512, 1024".into(),
            ));
        }
        if c.max_body < 1024 {
            return Err(invalid("coap.max_body", "must be at least 1024".into()));
        }
        if self.coap.max_in_flight == 0 {
            return Err(invalid("coap.max_in_flight", "must be at least 1".into()));
        }
        if self.runtime.worker_threads > MAX_WORKER_THREADS {
            return Err(invalid(
                "runtime.worker_threads",
                format!(
                    "{} is more than {MAX_WORKER_THREADS}; 0 means one per CPU",
                    self.runtime.worker_threads
                ),
            ));
        }
        if self.requests.queue_len == 0 {
            return Err(invalid("requests.queue_len", "must be at least 1".into()));
        }
        let n = &self.notifications;
        if n.long_poll_s == 0 || n.long_poll_s > 300 {
            return Err(invalid(
                "notifications.long_poll_s",
                "must lie between 1 and 300".into(),
            ));
        }
        if n.max_batch == 0
            || n.max_queued_per_key == 0
            || n.discard_after_s == 0
            || n.redeliver_after_s == 0
        {
            let key = if n.max_batch == 0 {
                "notifications.max_batch"
            } else if n.max_queued_per_key == 0 {
                "notifications.max_queued_per_key"
            } else if n.discard_after_s == 0 {
                "notifications.discard_after_s"
            } else {
                "notifications.redeliver_after_s"
            };
            return Err(invalid(key, "must be at least 1".into()));
        }
        if n.max_concurrent_deliveries == 0
            || n.max_concurrent_deliveries > MAX_CONCURRENT_DELIVERIES
        {
            return Err(invalid(
                "notifications.max_concurrent_deliveries",
                format!("must lie between 1 and {MAX_CONCURRENT_DELIVERIES}"),
            ));
        }
        if self.plugins.auth.is_empty() {
            return Err(invalid(
                "plugins.auth",
                "needs at least one auth backend".into(),
            ));
        }
        if n.retry_initial_ms == 0 || n.retry_max_ms < n.retry_initial_ms {
            return Err(invalid(
                "notifications.retry_initial_ms",
                "must be at least 1 and at most notifications.retry_max_ms".into(),
            ));
        }
        if self.limits.transaction_quota == 0 {
            return Err(invalid(
                "limits.transaction_quota",
                "must be at least 1".into(),
            ));
        }
        if !(10..=3_600_000).contains(&self.limits.save_interval_ms) {
            return Err(invalid(
                "limits.save_interval_ms",
                "must be between 10 and 3600000".into(),
            ));
        }
        if self.lua.memory_limit_kb < 256 {
            return Err(invalid(
                "lua.memory_limit_kb",
                "must be at least 256".into(),
            ));
        }
        if self.lua.instruction_budget < 1000 {
            return Err(invalid(
                "lua.instruction_budget",
                "must be at least 1000".into(),
            ));
        }
        if !(1..=60_000).contains(&self.lua.time_limit_ms) {
            return Err(invalid(
                "lua.time_limit_ms",
                "must be between 1 and 60000".into(),
            ));
        }
        let r = &self.registry;
        if !connectord_model::valid_domain(&r.default_domain) {
            return Err(invalid(
                "registry.default_domain",
                "must be 1 to 64 characters of letters, digits, '-', '_' and '.'".into(),
            ));
        }
        if r.min_lifetime_s == 0 || r.min_lifetime_s > r.max_lifetime_s {
            return Err(invalid(
                "registry.min_lifetime_s",
                format!(
                    "must be at least 1 and at most registry.max_lifetime_s ({})",
                    r.max_lifetime_s
                ),
            ));
        }
        if !(r.min_lifetime_s..=r.max_lifetime_s).contains(&r.default_lifetime_s) {
            return Err(invalid(
                "registry.default_lifetime_s",
                "must lie between registry.min_lifetime_s and registry.max_lifetime_s".into(),
            ));
        }
        if r.max_endpoints_per_domain == 0 {
            return Err(invalid(
                "registry.max_endpoints_per_domain",
                "must be at least 1".into(),
            ));
        }
        if r.max_endpoints == 0 {
            return Err(invalid(
                "registry.max_endpoints",
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests;
