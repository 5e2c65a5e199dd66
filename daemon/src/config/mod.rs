//! The daemon's configuration: one TOML file, parsed strictly, and aggregated here from
//! the sections each crate owns.
//!
//! A section lives with the crate that uses it, with its serde attributes, its defaults
//! and the range checks that concern it alone (`check`): `[coap]` in `connectord-coap`,
//! `[rest]` in `connectord-rest`, `[plugins]` in `connectord-plugin-host`, `[registry]`,
//! `[requests]`, `[notifications]`, `[limits]` and `[lua]` in `connectord-core`
//! (`connectord_core::config`), `[log]`, `[runtime]`, `[state]` and `[cluster]` here. This module holds
//! the whole file ([`Config`]): parsing, the errors with file, line and column
//! ([`ConfigError`]), and the checks that need more than one section (the plugin names,
//! [`check_plugin_names`]). The sections are re-exported here under their old paths.
//!
//! Every section uses `deny_unknown_fields`, so a misspelt key is an error rather than a
//! silently ignored setting. Errors name the file, line, column and the dotted key path
//! (`coap.max_datagram`), see [`ConfigError`].
//!
//! The embedded defaults are the repository's `etc/connectord.toml`, compiled in: running
//! without `--config` is exactly running with that file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use connectord_coap::CoapConfig;
pub use connectord_core::config::{
    Invalid, LimitsConfig, LuaConfig, MAX_CONCURRENT_DELIVERIES, NotificationsConfig,
    RegistryConfig, RequestsConfig,
};
pub use connectord_plugin_host::PluginsConfig;
pub use connectord_rest::RestConfig;

use connectord_plugin_host::Available;

/// The commented default configuration shipped in `etc/` and compiled into the binary.
pub const DEFAULT_TOML: &str = include_str!("../../../etc/connectord.toml");

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

/// Checks the plugin names of `[plugins]` against the plugins `available`
/// ([`connectord_plugin_host::check_names`]); the error names the key and where it is in
/// the configuration `source` (read again to find it).
pub fn check_plugin_names(
    cfg: &PluginsConfig,
    available: &[Available],
    source: &Source,
) -> Result<(), ConfigError> {
    connectord_plugin_host::check_names(cfg, available).map_err(|e| ConfigError::Invalid {
        source_name: source.clone(),
        location: locate(source, e.key),
        key: e.key.into(),
        message: e.message,
    })
}

/// The built-in plugin `name`, which the configuration enables, failed to start (`why`:
/// its settings refused, say): located at `plugins.settings.<name>`, or the nearest
/// table the file has.
pub fn plugin_failed_to_start(source: &Source, name: &str, why: &str) -> ConfigError {
    let key = format!("plugins.settings.{name}");
    ConfigError::Invalid {
        source_name: source.clone(),
        location: locate(source, &key),
        key,
        message: format!("the built-in plugin {name} failed to start: {why}"),
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
fn locate(source: &Source, key: &str) -> Option<(usize, usize)> {
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
    #[serde(default)]
    pub cluster: ClusterConfig,
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
    /// threads of their own besides (the NATS store, `[cluster] backend = "nats"`, a runtime
    /// of one thread, so that no plugin state call waits on these workers: `crate::cluster`). On a 2-core machine, 1 measured about
    /// 15 % less CPU per proxied read (fewer wake-ups across threads), with no clear change
    /// for registrations and notifications (docs/PERFORMANCE.md).
    pub worker_threads: usize,
}

impl RuntimeConfig {
    /// Range checks serde cannot express, as the other sections' (see [`Invalid`]).
    pub fn check(&self) -> Result<(), Invalid> {
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err((
                "worker_threads",
                format!(
                    "{} is more than {MAX_WORKER_THREADS}; 0 means one per CPU",
                    self.worker_threads
                ),
            ));
        }
        Ok(())
    }
}

/// `[cluster]`: where the durable state lives: this node's own SQLite file (the default)
/// or NATS JetStream, shared by the nodes of a cluster (issue 22, docs/cluster.md). Read
/// at start only: a change needs a restart.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `sqlite` (the state directory's `connectord.db`) or `nats`.
    pub backend: Backend,
    /// `nats://host:port` of one or more servers of the NATS cluster (`backend = "nats"`).
    pub servers: Vec<String>,
    /// This node's name, unique in the cluster: a NATS subject token
    /// (`[A-Za-z0-9_-]`, at most [`MAX_NODE_NAME`] characters). When absent, the host name
    /// up to its first dot (see [`ClusterConfig::node_name`]).
    pub node: Option<String>,
    /// Starts every bucket, stream and subject name, so that two fleets can share NATS
    /// servers (`[A-Za-z0-9_-]`).
    pub prefix: String,
    /// Replicas of each bucket and stream: 1 on one server, 3 on a three-server cluster
    /// (1 to 5). A bucket keeps the replicas it was created with.
    pub replicas: usize,
    /// How long connecting, a write's acknowledgement or a read may take before the store
    /// answers "unavailable" (the start is refused when no server answers within it).
    pub timeout_ms: u64,
}

/// `[cluster] backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One node, its state in the state directory's SQLite file.
    #[default]
    Sqlite,
    /// The state in NATS JetStream, shared by every node of the cluster.
    Nats,
}

impl Backend {
    /// The name the configuration and `GET /v2/cluster` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Nats => "nats",
        }
    }
}

/// Longest `[cluster] node` name.
pub const MAX_NODE_NAME: usize = 64;

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            backend: Backend::Sqlite,
            servers: vec!["nats://127.0.0.1:4222".into()],
            node: None,
            prefix: "cd".into(),
            replicas: 1,
            timeout_ms: 5000,
        }
    }
}

/// Whether `s` is a usable node name or prefix: one NATS subject token of
/// `[A-Za-z0-9_-]`, 1 to [`MAX_NODE_NAME`] characters.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NODE_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ClusterConfig {
    /// Range checks serde cannot express, as the other sections' (see [`Invalid`]).
    pub fn check(&self) -> Result<(), Invalid> {
        if !(1..=5).contains(&self.replicas) {
            return Err((
                "replicas",
                format!(
                    "{} is not 1 to 5 (1 on one server, 3 on three)",
                    self.replicas
                ),
            ));
        }
        if !(100..=60_000).contains(&self.timeout_ms) {
            return Err((
                "timeout_ms",
                format!("{} is not 100 to 60000 milliseconds", self.timeout_ms),
            ));
        }
        if !is_token(&self.prefix) {
            return Err((
                "prefix",
                format!(
                    "{:?} is not a valid NATS token: 1 to {MAX_NODE_NAME} characters of A-Z, a-z, 0-9, _ and -",
                    self.prefix
                ),
            ));
        }
        if let Some(node) = &self.node
            && !is_token(node)
        {
            return Err((
                "node",
                format!(
                    "{node:?} is not a valid NATS token: 1 to {MAX_NODE_NAME} characters of A-Z, a-z, 0-9, _ and - (no dots, spaces, * or >)"
                ),
            ));
        }
        if self.backend == Backend::Nats {
            if self.servers.is_empty() {
                return Err((
                    "servers",
                    "is empty; name at least one nats://host:port".into(),
                ));
            }
            if let Some(bad) = self.servers.iter().find(|s| {
                let rest = s
                    .strip_prefix("nats://")
                    .or_else(|| s.strip_prefix("tls://"))
                    .unwrap_or(s);
                // Another scheme (`http://`): `run` refused it, `check-config` did not
                // (an outside review).
                rest.is_empty() || rest.contains(char::is_whitespace) || rest.contains("://")
            }) {
                return Err((
                    "servers",
                    format!("{bad:?} is not a server address; write nats://host:port"),
                ));
            }
        }
        Ok(())
    }

    /// This node's name: `node`, else the host name up to its first dot with every
    /// character that is not `[A-Za-z0-9_-]` made `-` (else `connectord`).
    pub fn node_name(&self) -> String {
        if let Some(n) = &self.node {
            return n.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let first = host.trim().split('.').next().unwrap_or_default();
        let name: String = first
            .chars()
            .take(MAX_NODE_NAME)
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        if name.is_empty() {
            "connectord".into()
        } else {
            name
        }
    }

    /// The timeout as a duration.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms)
    }
}

/// Most worker threads `[runtime] worker_threads` accepts.
pub const MAX_WORKER_THREADS: usize = 1024;
/// Most microseconds `[state] commit_delay_us` accepts (10 ms).
pub const MAX_COMMIT_DELAY_US: u64 = 10_000;

/// `[state]`: where durable state lives.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// The state directory. When absent: `$STATE_DIRECTORY` (set by systemd's
    /// `StateDirectory=`), else `$XDG_STATE_HOME/connectord`, else
    /// `$HOME/.local/state/connectord`, else `./connectord-state`.
    pub dir: Option<PathBuf>,
    /// While the SQLite store is busy (its last commit held several jobs), how long it
    /// waits after a write arrives for others to share the commit and its `fsync`
    /// (`store::sqlite::DEFAULT_COMMIT_DELAY`); 0: never. A lone writer is never delayed.
    /// Up to [`MAX_COMMIT_DELAY_US`]. Not used by the NATS backend.
    pub commit_delay_us: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: None,
            commit_delay_us: connectord_store::sqlite::DEFAULT_COMMIT_DELAY.as_micros() as u64,
        }
    }
}

impl StateConfig {
    /// Range checks serde cannot express, as the other sections' (see [`Invalid`]).
    pub fn check(&self) -> Result<(), Invalid> {
        // An empty path was taken as the working directory without the checks "." gets
        // (its permissions were not tightened): the database, admin.key and the CA's key
        // were written into whatever directory the daemon was started from.
        if self.dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
            return Err((
                "dir",
                "is empty: name a directory (\".\" for the working directory), or leave dir out for the default".into(),
            ));
        }
        if self.commit_delay_us > MAX_COMMIT_DELAY_US {
            return Err((
                "commit_delay_us",
                format!(
                    "{} is more than {MAX_COMMIT_DELAY_US} (10 ms); 0 means no delay",
                    self.commit_delay_us
                ),
            ));
        }
        Ok(())
    }

    /// [`StateConfig::commit_delay_us`] as a duration.
    pub fn commit_delay(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.commit_delay_us)
    }

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

    /// Range checks serde cannot express: each section's own `check`, in the order
    /// below (the first error is the one reported), its key named in full here; also puts
    /// `log.level` in the form the `tracing` filter reads (see [`log_filter`]). Errors are
    /// located by [`Config::parse`].
    fn validate(&mut self, source: &Source) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            source_name: source.clone(),
            location: None,
            key,
            message,
        };
        match log_filter(&self.log.level) {
            Ok(filter) => self.log.level = filter,
            Err(message) => return Err(invalid("log.level".into(), message)),
        }
        let sections: [(&str, Result<(), Invalid>); 11] = [
            ("state", self.state.check()),
            ("rest", self.rest.check()),
            ("coap", self.coap.check()),
            ("runtime", self.runtime.check()),
            ("requests", self.requests.check()),
            ("notifications", self.notifications.check()),
            ("plugins", self.plugins.check()),
            ("limits", self.limits.check()),
            ("lua", self.lua.check()),
            ("registry", self.registry.check()),
            ("cluster", self.cluster.check()),
        ];
        for (section, checked) in sections {
            if let Err((key, message)) = checked {
                return Err(invalid(format!("{section}.{key}"), message));
            }
        }
        if let Err((key, message)) = self.check_addresses() {
            return Err(invalid(key.into(), message));
        }
        if let Err((key, message)) = self.check_paths() {
            return Err(invalid(key.into(), message));
        }
        Ok(())
    }

    /// No path that is empty or starts with `~`. Found by an outside review: `lua.dir =
    /// ""` was taken (the rules looked for in the working directory) and `"~/rules"` was a
    /// directory named `~`, both called valid; only a shell expands `~`. (`state.dir` says
    /// its own empty message first, in [`StateConfig::check`].)
    fn check_paths(&self) -> Result<(), (&'static str, String)> {
        let paths: [(&'static str, Option<&Path>); 7] = [
            ("state.dir", self.state.dir.as_deref()),
            ("lua.dir", Some(&self.lua.dir)),
            ("plugins.dir", self.plugins.dir.as_deref()),
            ("rest.tls_cert", self.rest.tls_cert.as_deref()),
            ("rest.tls_key", self.rest.tls_key.as_deref()),
            ("coap.tls_cert", self.coap.tls_cert.as_deref()),
            ("coap.tls_key", self.coap.tls_key.as_deref()),
        ];
        let trusted = self
            .coap
            .trusted_cas
            .iter()
            .map(|p| ("coap.trusted_cas", Some(p.as_path())));
        for (key, path) in paths.into_iter().chain(trusted) {
            let Some(path) = path else { continue };
            if path.as_os_str().is_empty() {
                return Err((key, "is empty: name a path, or leave the key out".into()));
            }
            if path.as_os_str().as_encoded_bytes().starts_with(b"~") {
                return Err((
                    key,
                    format!(
                        "{} starts with ~, which only a shell expands: write the full path",
                        path.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// No two listeners of one protocol on one address: the same address twice, or an
    /// address and the wildcard of its family on the same port (the system refuses the
    /// second bind either way). Before, `check-config` called such a file valid and `run`
    /// failed to bind, the CoAP error naming no key (found by an outside review). Port 0
    /// (a port the system picks) never clashes.
    fn check_addresses(&self) -> Result<(), (&'static str, String)> {
        #[derive(PartialEq)]
        enum Proto {
            Tcp,
            Udp,
        }
        // The REST sockets are dual-stack (no IPV6_V6ONLY): `[::]` there takes IPv4 too.
        // CoAP's UDP and TLS sockets are IPv6 only.
        type Entry<'a> = (&'static str, &'a Proto, bool, &'a std::net::SocketAddr);
        let lists: [(&'static str, Proto, bool, &[std::net::SocketAddr]); 5] = [
            ("rest.listen", Proto::Tcp, true, &self.rest.listen),
            ("rest.listen_tls", Proto::Tcp, true, &self.rest.listen_tls),
            ("coap.listen", Proto::Udp, false, &self.coap.listen),
            (
                "coap.listen_dtls",
                Proto::Udp,
                false,
                &self.coap.listen_dtls,
            ),
            ("coap.listen_tls", Proto::Tcp, false, &self.coap.listen_tls),
        ];
        let covers_v4 =
            |dual: bool, a: &std::net::SocketAddr| dual && a.is_ipv6() && a.ip().is_unspecified();
        let clash = |da: bool, a: &std::net::SocketAddr, db: bool, b: &std::net::SocketAddr| {
            a.port() != 0
                && a.port() == b.port()
                && ((a.is_ipv4() == b.is_ipv4()
                    && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified()))
                    || covers_v4(da, a)
                    || covers_v4(db, b))
        };
        let mut seen: Vec<Entry<'_>> = Vec::new();
        for (key, proto, dual, addrs) in &lists {
            for a in addrs.iter() {
                if let Some((other, _, _, b)) = seen
                    .iter()
                    .find(|(_, p, d, b)| *p == proto && clash(*dual, a, *d, b))
                {
                    let what = if a == *b { "is also" } else { "overlaps" };
                    let with = if a == *b {
                        String::new()
                    } else {
                        format!(" {b}")
                    };
                    return Err((
                        key,
                        format!(
                            "{a} {what}{with} in {other} (one address and port serves one listener)"
                        ),
                    ));
                }
                seen.push((key, proto, *dual, a));
            }
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
