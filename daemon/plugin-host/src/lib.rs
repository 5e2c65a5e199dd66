//! The host side of plugins: loading, calling, hot reload.
//!
//! A plugin is a [`connectord_plugin_sdk::PluginTable`] plus an instance made by its
//! `create`. One load of a plugin is a [`Generation`]: each of its instances has a worker
//! thread that runs `create`, that instance's calls, and `destroy`, one at a time, so a
//! plugin needs no locking and thread-locals it creates die with a thread that is joined
//! before its image is unloaded. A generation has one instance, except a sink plugin's,
//! which grows to several when calls overlap (see [`Generation`]), so that one slow
//! callback receiver does not hold up deliveries to the others.
//!
//! Plugins come from two places: built-ins linked into the binary (`connector`,
//! `pelion`, `losant`, `headerkeys`, `webhook`, `mqtt`), and `lib<crate>.so` files in `[plugins] dir`. A file whose plugin has the
//! name of a built-in replaces it. The directory is watched (changes only,
//! [`crate::dir_watch`]); a changed file is read once it has stopped changing
//! (`STABLE_CHECK`), checked to be a complete ELF shared object of this machine
//! (`elf`: `dlopen` of a file cut short dies of SIGBUS), written to a private copy (a
//! same-path `dlopen` would return the old image, and nobody may change a mapped file),
//! loaded, checked (ABI version, kind, `create`, `routes`), and only then swapped in, on
//! probation (`Probation`): a panic in its first calls rolls the plugin back to the
//! generation it replaced. Callers that hold the previous generation finish their calls
//! on it, and it is destroyed, its thread joined and its image unloaded when the last of
//! them lets go. A file that fails anywhere along the way leaves the previous generation
//! serving, is logged with the reason, and is not tried again until it changes. A
//! directory writable by group or others is refused.
//!
//! Plugins keep their state through the host (`state_get`/`put`/`delete`/`keys`, stored
//! in SQLite), so a reload or a restart loses nothing.

#![deny(unsafe_code)]

// The core's modules under the paths this code was written with.
use connectord_core::{auth, dir_watch, events, metrics, shutdown, store};

pub mod config;
mod elf;
mod loader;
mod sink;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// The cache directory of plugin copies inside a state directory.
pub fn cache_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("plugin-cache")
}

use connectord_plugin_sdk::{Kind, http};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use crate::config::PluginsConfig;
use crate::metrics::Counters;
use crate::shutdown::Shutdown;
use crate::store::Store;
pub use loader::Generation;
pub use sink::PluginSink;

/// The plugin host as the core's auth chain sees it ([`crate::auth::AuthBackends`]).
pub struct HostBackends(pub Arc<PluginHost>);

impl crate::auth::AuthBackends for HostBackends {
    fn epoch(&self) -> u64 {
        self.0.epoch()
    }

    fn call<'a>(
        &'a self,
        name: &'a str,
        op: &'static str,
        input: Vec<u8>,
    ) -> crate::auth::BackendCall<'a> {
        Box::pin(async move {
            self.0
                .call_bytes(name, op, input)
                .await
                .map_err(|e| crate::auth::BackendError(e.to_string()))
        })
    }
}

/// What went wrong with a plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    #[error("plugin {0} is not loaded")]
    NotLoaded(String),
    #[error("cannot load {path}: {message}")]
    Load { path: String, message: String },
    #[error("{path}: built for plugin ABI {found}, this connectord speaks {expected}")]
    WrongAbi {
        path: String,
        found: u32,
        expected: u32,
    },
    #[error("plugin {name} failed to start: {message}")]
    Create { name: String, message: String },
    #[error("plugin {name}: {message}")]
    Call { name: String, message: String },
    /// The call panicked inside the plugin (caught by the SDK at the boundary).
    #[error("plugin {name}: {message}")]
    Panicked { name: String, message: String },
    #[error("plugin {name}: bad answer to {op}: {message}")]
    BadAnswer {
        name: String,
        op: String,
        message: String,
    },
    #[error("plugin {0} has stopped")]
    Stopped(String),
    /// A call the host waits for at most a bounded time (a new instance's `routes`) did
    /// not finish within it; it goes on in its lane.
    #[error("plugin {0} did not answer in time")]
    Timeout(String),
    /// An auth backend not named in `[plugins] auth`, or a sink not named in `[plugins]
    /// sinks`: not started (it would make and announce keys nobody asked for).
    #[error("plugin {name} ({origin}) is not named in [plugins] {key}: not started")]
    NotEnabled {
        name: String,
        origin: String,
        key: &'static str,
    },
}

/// The built-in plugins linked into the binary.
fn builtins() -> Vec<&'static connectord_plugin_sdk::PluginTable> {
    vec![
        auth_connector::plugin_table(),
        auth_pelion::plugin_table(),
        auth_losant::plugin_table(),
        auth_headerkeys::plugin_table(),
        sink_webhook::plugin_table(),
        sink_mqtt::plugin_table(),
    ]
}

/// A plugin a configuration may name: its name, its kind and where it comes from
/// (`built-in` or the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Available {
    pub name: String,
    pub kind: Kind,
    pub origin: String,
}

/// Every plugin a configuration could use without starting anything: the built-ins, then
/// the files of `[plugins] dir` in name order (opened to read the name and kind each
/// declares; a file that cannot be, or a directory the daemon would refuse, provides
/// nothing). For `connectord check-config`; the daemon itself checks against what it
/// loaded ([`PluginHost::loaded`]).
pub fn available(cfg: &PluginsConfig) -> Vec<Available> {
    let mut found: Vec<Available> = builtins()
        .into_iter()
        .map(|t| Available {
            name: Generation::builtin_name(t),
            kind: Kind::from_u32(t.kind).unwrap_or(Kind::Other),
            origin: "built-in".to_string(),
        })
        .collect();
    let Some(dir) = &cfg.dir else { return found };
    if check_not_writable_by_others(dir).is_err() {
        return found;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "so"))
        .collect();
    files.sort();
    for f in files {
        if let Ok((name, kind)) = Generation::declared(&f) {
            // A file replaces the built-in of its name, as the daemon does.
            found.retain(|a| a.name != name);
            found.push(Available {
                name,
                kind,
                origin: f.display().to_string(),
            });
        }
    }
    found
}

/// Checks that the plugins `[plugins] auth` and `sinks` (or `sink`) name are among
/// `available`, and of the kind the key asks for (an auth backend in `auth`, a sink in
/// `sinks`: a plugin of
/// another kind would answer none of the operations asked of it). The error names the
/// key, the name and every plugin of that kind available; the daemon adds the file and
/// where the key is in it.
pub fn check_names(cfg: &PluginsConfig, available: &[Available]) -> Result<(), NameError> {
    let sinks = cfg.sink_names();
    let named = cfg
        .auth
        .iter()
        .map(|n| ("plugins.auth", Kind::Auth, n))
        .chain(sinks.iter().map(|n| (cfg.sinks_key(), Kind::Sink, n)));
    for (key, kind, name) in named {
        let found = available.iter().find(|a| a.name == *name);
        if found.is_some_and(|a| a.kind == kind) {
            continue;
        }
        let list: Vec<String> = available
            .iter()
            .filter(|a| a.kind == kind)
            .map(|a| format!("{} ({})", a.name, a.origin))
            .collect();
        let message = match found {
            Some(a) => format!(
                "`{name}` is a plugin of kind {} ({}), not {}; {} plugins available: {}",
                kind_name(a.kind),
                a.origin,
                kind_name(kind),
                kind_name(kind),
                list.join(", ")
            ),
            None => {
                let dir = match &cfg.dir {
                    Some(d) => format!("lib<crate>.so files in {}", d.display()),
                    None => "no [plugins] dir is set".to_string(),
                };
                format!(
                    "no built-in plugin or plugin file provides `{name}`; {} plugins available: {} ({dir})",
                    kind_name(kind),
                    list.join(", ")
                )
            }
        };
        return Err(NameError { key, message });
    }
    Ok(())
}

/// A plugin name of `[plugins]` that no available plugin answers to (or one of the wrong
/// kind), from [`check_names`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key `{key}`: {message}")]
pub struct NameError {
    /// The dotted key that names it: `plugins.auth`, `plugins.sinks` or `plugins.sink`.
    pub key: &'static str,
    /// What is wrong, with the plugins of that kind available.
    pub message: String,
}

/// One version of a file: what changes when it is written, replaced, or its mode is
/// changed. A file is loaded only once two looks `STABLE_CHECK` apart agree, and a file
/// that failed is tried again only when this changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
    /// The mode: a file refused as writable by others is tried again after a `chmod`.
    mode: u32,
}

impl Fingerprint {
    fn of(path: &Path) -> std::io::Result<Fingerprint> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(Fingerprint {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            modified: m.modified().ok(),
            mode: m.mode(),
        })
    }
}

/// How far apart the two looks at a changed file are that must agree before it is read.
const STABLE_CHECK: Duration = Duration::from_millis(200);
/// How long a reload waits for a changed file to stop changing; one still changing then
/// is left for its next change (a writer that goes on writing makes more events).
const STABLE_MAX: Duration = Duration::from_secs(10);

/// How many calls a new generation answers without a panic before it has proven itself.
const PROBATION_CALLS: u32 = 20;
/// Aborts a task when dropped (the probations' clock ends with the directory's watch).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often the plugin directory's watch looks for probations whose time is up
/// ([`PluginHost::end_due_probations`]).
const PROBATION_CLOCK: Duration = Duration::from_secs(1);

/// A generation on probation and the one it replaced, kept loaded until it has proven
/// itself ([`PROBATION_CALLS`] calls without a panic, or `[plugins] probation_s`).
struct Probation {
    /// The generation on probation.
    id: u64,
    /// The generation it replaced (itself proven): what a rollback goes back to.
    previous: Arc<Generation>,
    since: Instant,
    calls: u32,
}

/// How [`PluginHost::install`] treats the generation it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Install {
    /// A new file version: on probation, the replaced (proven) generation kept.
    OnProbation,
    /// A new instance of the same code (loading everything again): a probation under
    /// way goes on with it.
    SameCode,
    /// Trusted (a built-in, a rollback): any probation of that name ends.
    Trusted,
}

/// One route a plugin serves.
#[derive(Debug, Clone)]
pub struct PluginRoute {
    pub plugin: String,
    pub route: http::Route,
}

/// Every loaded plugin, by name.
pub struct PluginHost {
    store: Arc<dyn Store>,
    settings: HashMap<String, serde_json::Value>,
    /// The names `[plugins] auth` and `sinks` give: only auth backends and sinks named
    /// there are started (plugins of other kinds, which only serve routes, always are).
    enabled: Vec<String>,
    dir: Option<PathBuf>,
    cache_dir: PathBuf,
    counters: Arc<Counters>,
    /// Most instances of a sink plugin at once (`[notifications]
    /// max_concurrent_deliveries`): see [`Generation`].
    sink_lanes: usize,
    /// How long an extra instance of a sink plugin may be idle before it ends, in ms
    /// (`loader::LANE_IDLE`; shorter in unit tests).
    lane_idle_ms: std::sync::atomic::AtomicU64,
    plugins: RwLock<HashMap<String, Arc<Generation>>>,
    /// Each file loaded, with the plugin it declared and the version of the file that was
    /// loaded: a file is read again only when it changes, and a removed file's plugin
    /// falls back to another file of that name, or to the built-in, or to nothing.
    ///
    /// Decision: several files may declare one plugin (a deploy copies the new version
    /// in beside the old one, then removes the old one). The file loaded last serves;
    /// the others are loaded again only when they change, and removing one that does not
    /// serve changes nothing.
    files: Mutex<HashMap<PathBuf, (String, Fingerprint)>>,
    /// Files whose last load failed (or whose generation was rolled back), as the version
    /// that failed: tried again only when the file changes.
    failed: Mutex<HashMap<PathBuf, Fingerprint>>,
    /// Why a built-in plugin did not start, by name (its settings refused, say): the
    /// daemon's start says that, rather than that no plugin provides the name.
    builtin_failures: Mutex<HashMap<String, String>>,
    /// Generations on probation, by plugin name.
    probation: Mutex<HashMap<String, Probation>>,
    /// How many entries `probation` has (written under its lock), so that a call need not
    /// take the lock when none is on probation.
    probations: AtomicUsize,
    /// `[plugins] start_timeout_s`: how long a new generation's `create` and first
    /// `routes` call may take.
    start_timeout: std::time::Duration,
    /// `[plugins] probation_s`: how long a new generation is on probation at most
    /// (whatever its number of calls).
    probation_time: Duration,
    /// Serialises reloads.
    reload_lock: Mutex<()>,
    /// Held (shared) by every state-changing call for its length, and (exclusively, see
    /// [`PluginHost::quiesce`]) by a reload while it makes and installs new instances: a
    /// new instance reads its state with no write of the old one in flight, and every
    /// later call goes to it, so no key made or revoked around a reload is missed.
    state_gate: Arc<tokio::sync::RwLock<()>>,
    /// Moves whenever plugin state may have changed: around every operation other than
    /// authenticate, key_status, verify and deliver, and when a plugin is (re)loaded. Reused auth
    /// verdicts ([`crate::auth::AuthChain`]) are valid only within one epoch.
    epoch: std::sync::atomic::AtomicU64,
}

/// How long a reload waits for state-changing plugin calls to finish.
const QUIESCE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Unix permission bits that must not be set on the plugin directory or a plugin file.
const WRITABLE_BY_OTHERS: u32 = 0o022;

impl PluginHost {
    /// Loads every plugin file of the directory, then the built-ins no file replaced (so
    /// that a packaged file is started once, not after a built-in of its name), skipping
    /// auth backends and sinks the configuration does not name. Failures are logged;
    /// the host always starts (a missing backend shows up as refused requests).
    /// `cache_dir` holds the private copies of loaded files; it is emptied first. A sink
    /// plugin runs up to `sink_lanes` instances at once (one per concurrent call).
    pub fn start(
        cfg: &PluginsConfig,
        store: Arc<dyn Store>,
        cache_dir: PathBuf,
        counters: Arc<Counters>,
        sink_lanes: usize,
    ) -> Arc<PluginHost> {
        let settings = cfg
            .settings
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    serde_json::to_value(v).unwrap_or(serde_json::Value::Null),
                )
            })
            .collect();
        let host = Arc::new(PluginHost {
            store,
            settings,
            enabled: cfg.auth.iter().cloned().chain(cfg.sink_names()).collect(),
            dir: cfg.dir.clone(),
            cache_dir,
            counters,
            sink_lanes,
            lane_idle_ms: std::sync::atomic::AtomicU64::new(
                u64::try_from(loader::LANE_IDLE.as_millis()).unwrap_or(u64::MAX),
            ),
            plugins: RwLock::new(HashMap::new()),
            files: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            builtin_failures: Mutex::new(HashMap::new()),
            probation: Mutex::new(HashMap::new()),
            probations: AtomicUsize::new(0),
            start_timeout: std::time::Duration::from_secs(cfg.start_timeout_s),
            probation_time: Duration::from_secs(cfg.probation_s),
            reload_lock: Mutex::new(()),
            state_gate: Arc::new(tokio::sync::RwLock::new(())),
            epoch: std::sync::atomic::AtomicU64::new(0),
        });
        // Copies from an earlier run are of no use: start clean.
        let _ = std::fs::remove_dir_all(&host.cache_dir);
        host.reload_dir();
        for table in builtins() {
            // A file of that name serves already (it did not fail to load).
            if host.get(&Generation::builtin_name(table)).is_none() {
                host.load_builtin(table);
            }
        }
        host
    }

    /// Whether a plugin of `kind` named `name` is to be started, or the key of
    /// `[plugins]` that would have to name it.
    fn check_enabled(&self, name: &str, kind: Kind) -> Result<(), &'static str> {
        let key = match kind {
            Kind::Auth => "auth",
            Kind::Sink => "sinks",
            _ => return Ok(()),
        };
        if self.enabled.iter().any(|n| n == name) {
            Ok(())
        } else {
            Err(key)
        }
    }

    fn config_for(&self, name: &str) -> Vec<u8> {
        self.settings
            .get(name)
            .map(|v| v.to_string().into_bytes())
            .unwrap_or_else(|| b"{}".to_vec())
    }

    fn install(&self, g: Arc<Generation>, how: Install) {
        self.bump_epoch();
        let name = g.name.clone();
        let id = g.id;
        let sha = g.file_sha256().unwrap_or("").to_string();
        let origin = g.origin.to_string();
        // Installs happen one at a time (under `reload_lock`, or at start-up), so this is
        // what the insert below replaces.
        let old = self.get(&name);
        // The probation is set up before the generation serves, so that its first call
        // finds it.
        let mut probation = self.probation.lock().unwrap_or_else(|p| p.into_inner());
        // A generation replaced while on probation never proved itself: the one kept
        // behind it stays what a rollback goes back to.
        let running = probation.remove(&name);
        let on_probation = match how {
            Install::OnProbation => {
                match running.map(|p| p.previous).or_else(|| old.clone()) {
                    Some(previous) => {
                        probation.insert(
                            name.clone(),
                            Probation {
                                id,
                                previous,
                                since: Instant::now(),
                                calls: 0,
                            },
                        );
                        true
                    }
                    // Nothing to go back to.
                    None => false,
                }
            }
            Install::SameCode => match running {
                Some(p) => {
                    probation.insert(name.clone(), Probation { id, ..p });
                    true
                }
                None => false,
            },
            Install::Trusted => false,
        };
        self.probations.store(probation.len(), Ordering::Relaxed);
        drop(probation);
        let replaced = self
            .plugins
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), g);
        drop(replaced);
        tracing::info!(plugin = %name, origin = %origin, file_sha256 = %sha, generation = id, on_probation, "plugin serving");
        // The previous generation is destroyed when its last in-flight call (or the
        // probation keeping it) lets go.
        drop(old);
    }

    /// How long an idle extra instance of a sink plugin lives.
    fn lane_idle(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.lane_idle_ms.load(std::sync::atomic::Ordering::Acquire),
        )
    }

    /// Probation bookkeeping after a call of `g`: a panic rolls a generation on probation
    /// back (on a blocking thread; the caller gets its error at once), and enough calls
    /// or time without one end its probation.
    fn after_call(self: &Arc<Self>, g: &Arc<Generation>, out: &Result<Vec<u8>, PluginError>) {
        // The common case, without taking the lock: no plugin is on probation. (Set before
        // a generation on probation serves, under the plugins lock its callers take.)
        if self.probations.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut probation = self.probation.lock().unwrap_or_else(|p| p.into_inner());
        let Some(p) = probation.get_mut(&g.name) else {
            return;
        };
        if p.id != g.id {
            return;
        }
        if let Err(PluginError::Panicked { message, .. }) = out {
            let Some(p) = probation.remove(&g.name) else {
                return;
            };
            self.probations.store(probation.len(), Ordering::Relaxed);
            drop(probation);
            let (host, failed, reason) = (Arc::clone(self), Arc::clone(g), message.clone());
            tokio::task::spawn_blocking(move || host.roll_back(&failed, p.previous, &reason));
            return;
        }
        p.calls += 1;
        if p.calls >= PROBATION_CALLS || p.since.elapsed() >= self.probation_time {
            let done = probation.remove(&g.name);
            self.probations.store(probation.len(), Ordering::Relaxed);
            drop(probation);
            if let Some(done) = done {
                tracing::info!(plugin = %g.name, generation = g.id, calls = done.calls, "plugin generation proved itself; generation {} released", done.previous.id);
            }
        }
    }

    /// Ends the probations whose time is up, calls or not (before, one ended only at the
    /// next call, so a plugin seldom called kept the version it replaced loaded, and a
    /// panic hours later still rolled back to it). Run by the directory's watch every
    /// [`PROBATION_CLOCK`], on a blocking thread: the released generations are destroyed.
    fn end_due_probations(&self) {
        let done: Vec<(String, Probation)> = {
            let mut probation = self.probation.lock().unwrap_or_else(|p| p.into_inner());
            let done = probation
                .extract_if(|_, p| p.since.elapsed() >= self.probation_time)
                .collect();
            self.probations.store(probation.len(), Ordering::Relaxed);
            done
        };
        for (name, p) in done {
            tracing::info!(plugin = %name, generation = p.id, calls = p.calls, "plugin generation proved itself ({} s on probation without a panic); generation {} released", self.probation_time.as_secs(), p.previous.id);
        }
    }

    /// Puts `previous` (a new instance of its code, which reads the state anew; or the
    /// instance kept, if that cannot start) back in place of `failed`, if `failed` still
    /// serves; the file `failed` came from is tried again only when it changes.
    fn roll_back(self: &Arc<Self>, failed: &Generation, previous: Arc<Generation>, reason: &str) {
        let _serial = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let _gate = self.quiesce();
        if self.get(&failed.name).is_none_or(|g| g.id != failed.id) {
            return;
        }
        let restored = match Generation::again(self, &previous) {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(plugin = %failed.name, "cannot start generation {} anew ({e}); its running instance serves again", previous.id);
                Arc::clone(&previous)
            }
        };
        if let loader::Origin::File {
            path, fingerprint, ..
        } = &failed.origin
        {
            self.failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(path.clone(), fingerprint.clone());
        }
        Counters::inc(&self.counters.plugin_rollbacks);
        Counters::inc(&self.counters.plugin_errors);
        tracing::error!(
            plugin = %failed.name,
            "plugin generation {} ({}, file_sha256={}) rolled back to the previous code ({}, file_sha256={}, now generation {}): a call panicked while it was on probation: {reason}; its file is tried again when it changes",
            failed.id,
            failed.origin,
            failed.file_sha256().unwrap_or("-"),
            previous.origin,
            previous.file_sha256().unwrap_or("-"),
            restored.id,
        );
        if let loader::Origin::File { path, .. } = &previous.origin
            && !self
                .files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(path)
        {
            tracing::warn!(
                plugin = %failed.name,
                "the version rolled back to came from {}, which was removed: it serves until the plugin's last file is removed or the daemon restarts",
                path.display()
            );
        }
        self.install(restored, Install::Trusted);
    }

    /// The generations serving now, by plugin name.
    fn serving(&self) -> Vec<Arc<Generation>> {
        let mut serving: Vec<Arc<Generation>> = self
            .plugins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        serving.sort_by(|a, b| a.name.cmp(&b.name));
        serving
    }

    /// The `connectord_plugin_generation` gauge of every plugin serving, in the
    /// Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let on_probation: Vec<u64> = self
            .probation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|p| p.id)
            .collect();
        let serving = self.serving();
        let _ = writeln!(
            out,
            "# HELP connectord_plugin_generation The generation serving each plugin (its number), where its code comes from, the SHA-256 of its file (empty for a built-in), and whether it is still on probation."
        );
        let _ = writeln!(out, "# TYPE connectord_plugin_generation gauge");
        for g in serving {
            let _ = writeln!(
                out,
                "connectord_plugin_generation{{plugin=\"{}\",origin=\"{}\",file_sha256=\"{}\",probation=\"{}\"}} {}",
                label(&g.name),
                label(&g.origin.to_string()),
                g.file_sha256().unwrap_or(""),
                on_probation.contains(&g.id),
                g.id
            );
        }
    }

    /// The daemon's counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// See the `epoch` field.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    fn bump_epoch(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// The generation serving `name` now.
    pub fn get(&self, name: &str) -> Option<Arc<Generation>> {
        self.plugins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Names, kinds, origins and generations of the plugins serving now.
    pub fn loaded(&self) -> Vec<(Available, u64)> {
        let mut v: Vec<_> = self
            .plugins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|g| {
                let a = Available {
                    name: g.name.clone(),
                    kind: g.kind,
                    origin: g.origin.to_string(),
                };
                (a, g.id)
            })
            .collect();
        v.sort_by(|a, b| (&a.0.name, a.1).cmp(&(&b.0.name, b.1)));
        v
    }

    /// Calls `op` of plugin `name` with a JSON request and decodes the JSON answer.
    pub async fn call_json<I: Serialize, O: DeserializeOwned>(
        self: &Arc<Self>,
        name: &str,
        op: &str,
        input: &I,
    ) -> Result<O, PluginError> {
        let bytes = serde_json::to_vec(input).map_err(|e| PluginError::Call {
            name: name.to_string(),
            message: e.to_string(),
        })?;
        let out = self.call_bytes(name, op, bytes).await?;
        serde_json::from_slice(&out).map_err(|e| PluginError::BadAnswer {
            name: name.to_string(),
            op: op.to_string(),
            message: e.to_string(),
        })
    }

    /// As [`PluginHost::call_json`], with the input and the answer as JSON text.
    pub async fn call_bytes(
        self: &Arc<Self>,
        name: &str,
        op: &str,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, PluginError> {
        let mutating = !matches!(
            op,
            connectord_plugin_sdk::auth::OP_AUTHENTICATE
                | connectord_plugin_sdk::auth::OP_KEY_STATUS
                | connectord_plugin_sdk::sink::OP_DELIVER
                | connectord_plugin_sdk::sink::OP_VERIFY
                | connectord_plugin_sdk::sink::OP_SCHEMES
        );
        // Taken before the generation is looked up, so the call goes to the instance
        // serving once it is let in; released when the plugin's worker has run the call
        // (not when this future stops waiting: a cancelled caller's call still runs).
        let gate = if mutating {
            Some(Arc::clone(&self.state_gate).read_owned().await)
        } else {
            None
        };
        let g = self
            .get(name)
            .ok_or_else(|| PluginError::NotLoaded(name.to_string()))?;
        // Before and after: a verdict taken while this runs is not reused afterwards.
        if mutating {
            self.bump_epoch();
        }
        let out = g.call_keeping(op, bytes, gate).await;
        if mutating {
            self.bump_epoch();
        }
        self.after_call(&g, &out);
        out.inspect_err(|_| Counters::inc(&self.counters.plugin_errors))
    }

    /// The routes plugins serve, and which plugin serves each.
    pub fn routes(&self) -> Vec<PluginRoute> {
        let map = self.plugins.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<PluginRoute> = map
            .values()
            .flat_map(|g| {
                g.routes.iter().map(|r| PluginRoute {
                    plugin: g.name.clone(),
                    route: r.clone(),
                })
            })
            .collect();
        v.sort_by(|a, b| (&a.route.path, &a.route.method).cmp(&(&b.route.path, &b.route.method)));
        v
    }

    /// The plugin route matching a request, if any (`path` without `/v1`/`/v2`).
    pub fn match_route(&self, method: &str, path: &str) -> Option<PluginRoute> {
        let want: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        self.routes().into_iter().find(|r| {
            let pat: Vec<&str> = r.route.path.split('/').filter(|s| !s.is_empty()).collect();
            r.route.method.eq_ignore_ascii_case(method)
                && pat.len() == want.len()
                && pat
                    .iter()
                    .zip(&want)
                    .all(|(p, w)| (p.starts_with('{') && p.ends_with('}')) || p == w)
        })
    }

    /// Re-reads the plugin directory: loads new and changed files, falls back to the
    /// built-in (or nothing) for removed ones. A changed file is read only once it has
    /// stopped changing (`STABLE_CHECK`, up to `STABLE_MAX`); a file whose last load
    /// failed is left alone until it changes again.
    pub fn reload_dir(self: &Arc<Self>) {
        let _serial = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(dir) = self.dir.clone() else { return };
        // A directory that is gone holds no file: its plugins fall back as each removed
        // file's would (the watcher says it is gone). Any other failure to read it keeps
        // what serves.
        let gone =
            matches!(std::fs::metadata(&dir), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
        if !gone && let Err(why) = check_not_writable_by_others(&dir) {
            Counters::inc(&self.counters.plugin_errors);
            tracing::error!("refusing plugins from {}: {why}", dir.display());
            return;
        }
        let mut present = Vec::new();
        match std::fs::read_dir(&dir) {
            Err(_) if gone => {}
            Ok(entries) => {
                for e in entries.flatten() {
                    let p = e.path();
                    if p.extension().is_some_and(|x| x == "so") {
                        present.push(p);
                    }
                }
            }
            Err(e) => {
                tracing::warn!("plugin directory {}: {e}", dir.display());
                return;
            }
        }
        present.sort();
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|p, _| present.contains(p));
        let changed: Vec<(PathBuf, Fingerprint)> = present
            .iter()
            .filter_map(|path| {
                let now = Fingerprint::of(path).ok()?;
                if self
                    .failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(path)
                    == Some(&now)
                {
                    tracing::debug!("plugin file {} unchanged since it failed", path.display());
                    return None;
                }
                // Compared with what was loaded from this file, not with the version
                // serving: another file of the same plugin may serve.
                let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
                match files.get(path) {
                    Some((_, loaded)) if *loaded == now => None,
                    _ => Some((path.clone(), now)),
                }
            })
            .collect();
        let stable = wait_until_stable(changed);
        // Before the gate: the waits above keep no plugin call out.
        let _gate = self.quiesce();
        for (path, fingerprint) in &stable {
            self.load_file(path, fingerprint);
        }
        // Files that disappeared: a plugin served from one goes back to another file of
        // that name, or to the built-in of that name, or to nothing.
        let gone: Vec<(PathBuf, String)> = {
            let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
            files
                .iter()
                .filter(|(p, _)| !present.contains(p))
                .map(|(p, (n, _))| (p.clone(), n.clone()))
                .collect()
        };
        for (path, name) in gone {
            self.files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&path);
            let serving_from = self.get(&name).and_then(|g| match &g.origin {
                loader::Origin::File { path, .. } => Some(path.clone()),
                loader::Origin::Builtin => None,
            });
            // Served from another file that is still there: nothing changes. (A file
            // removed earlier can serve again after a rollback to its version: then this
            // removal leaves no file of the plugin, and it falls back below.)
            let still_there = serving_from.as_ref().is_some_and(|p| {
                *p != path
                    && self
                        .files
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains_key(p)
            });
            if still_there {
                tracing::info!(
                    plugin = %name,
                    "plugin file {} removed; {} goes on serving it",
                    path.display(),
                    serving_from.as_deref().unwrap_or(&path).display()
                );
                continue;
            }
            tracing::info!(plugin = %name, "plugin file {} removed", path.display());
            if self.load_another_file_of(&name) {
                continue;
            }
            match builtins()
                .into_iter()
                .find(|t| Generation::builtin_name(t) == name)
            {
                Some(t) => self.load_builtin(t),
                None => {
                    let mut probation = self.probation.lock().unwrap_or_else(|p| p.into_inner());
                    probation.remove(&name);
                    self.probations.store(probation.len(), Ordering::Relaxed);
                    drop(probation);
                    self.plugins
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&name);
                }
            }
        }
    }

    /// Starts every plugin again from the code it runs now (a new instance of the same
    /// image, or of the built-in), so that each reads its durable state anew: the store
    /// saw it written by another process (`connectord plugin-call`) or cluster node, which the instances
    /// serving now cannot know of. Files are not read again (the directory watcher does
    /// that). A plugin that fails to start again keeps serving as it was; a probation
    /// under way goes on with the new instance.
    pub fn reload_all(self: &Arc<Self>) {
        let _serial = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let _gate = self.quiesce();
        let serving = self.serving();
        for g in serving {
            match Generation::again(self, &g) {
                Ok(new) => self.install(new, Install::SameCode),
                Err(e) => {
                    Counters::inc(&self.counters.plugin_errors);
                    tracing::error!("{e}; generation {} keeps serving", g.id);
                }
            }
        }
    }

    /// Waits until no state-changing call runs and keeps new ones out while the guard
    /// lives. The wait is queued in the lock, so calls that arrive meanwhile wait behind
    /// it instead of keeping it out. A call still running after [`QUIESCE_WAIT`] (a
    /// plugin that hangs, which a reload may be replacing) is not waited for longer: the
    /// reload goes on without the guard, logged. Blocks the calling thread: reloads run
    /// on blocking threads, or at start-up when nothing calls yet and the lock is free.
    fn quiesce(&self) -> Option<tokio::sync::OwnedRwLockWriteGuard<()>> {
        if let Ok(g) = Arc::clone(&self.state_gate).try_write_owned() {
            return Some(g);
        }
        let got = match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                let gate = Arc::clone(&self.state_gate);
                rt.spawn(async move {
                    let _ = tx.send(
                        tokio::time::timeout(QUIESCE_WAIT, gate.write_owned())
                            .await
                            .ok(),
                    );
                });
                rx.recv().ok().flatten()
            }
            // No runtime, so no call can be running: the lock was taken by nobody.
            Err(_) => None,
        };
        if got.is_none() {
            tracing::warn!(
                "plugins: a state-changing plugin call is still running after {} s; reloading without waiting for it (a change it makes may be missed until the next reload)",
                QUIESCE_WAIT.as_secs()
            );
        }
        got
    }

    /// Starts a built-in and installs it; a failure is logged and counted, and whatever
    /// served that name keeps serving.
    fn load_builtin(self: &Arc<Self>, table: &'static connectord_plugin_sdk::PluginTable) {
        match Generation::builtin(self, table) {
            Ok(g) => {
                self.builtin_failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&Generation::builtin_name(table));
                self.install(g, Install::Trusted)
            }
            Err(e @ PluginError::NotEnabled { .. }) => tracing::debug!("{e}"),
            Err(e) => {
                Counters::inc(&self.counters.plugin_errors);
                tracing::error!(
                    "built-in plugin: {e}; the previous version (if any) keeps serving"
                );
                let why = match e {
                    PluginError::Create { message, .. } => message,
                    other => other.to_string(),
                };
                self.builtin_failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(Generation::builtin_name(table), why);
            }
        }
    }

    /// Why the built-in plugin `name` failed to start, if it did.
    pub fn builtin_failure(&self, name: &str) -> Option<String> {
        self.builtin_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Loads the plugin `name` from another file that declared it and did not fail (the
    /// last one by name), after the file serving it was removed; whether one now serves.
    fn load_another_file_of(self: &Arc<Self>, name: &str) -> bool {
        let mut others: Vec<PathBuf> = {
            let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
            let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            files
                .iter()
                .filter(|(p, (n, _))| n == name && !failed.contains_key(*p))
                .map(|(p, _)| p.clone())
                .collect()
        };
        others.sort();
        while let Some(other) = others.pop() {
            let Ok(fingerprint) = Fingerprint::of(&other) else {
                continue;
            };
            tracing::info!(plugin = %name, "plugin file {} serves it now", other.display());
            if self.load_file(&other, &fingerprint) {
                return true;
            }
        }
        false
    }

    /// Loads the version `fingerprint` of a plugin file and installs it on probation in
    /// place of the version serving its name; whether it loaded. A failure is logged and
    /// counted, and that version is not tried again.
    fn load_file(self: &Arc<Self>, path: &Path, fingerprint: &Fingerprint) -> bool {
        match Generation::from_file(self, path, fingerprint) {
            Ok(g) => {
                Counters::inc(&self.counters.plugin_reloads);
                self.failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(path);
                let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((other, _)) = files
                    .iter()
                    .find(|(p, (n, _))| *n == g.name && p.as_path() != path)
                {
                    tracing::warn!(
                        plugin = %g.name,
                        "plugin {} is declared by {} as well: {} serves it now (the file loaded last)",
                        g.name,
                        other.display(),
                        path.display()
                    );
                }
                files.insert(path.to_path_buf(), (g.name.clone(), fingerprint.clone()));
                drop(files);
                self.install(g, Install::OnProbation);
                true
            }
            Err(e @ PluginError::NotEnabled { .. }) => {
                // Not an error; looked at again when the file changes (or at a restart
                // with a configuration that names it).
                self.failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(path.to_path_buf(), fingerprint.clone());
                tracing::info!("{e}");
                false
            }
            Err(e) => {
                Counters::inc(&self.counters.plugin_errors);
                self.failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(path.to_path_buf(), fingerprint.clone());
                tracing::error!(
                    "{e}; the previous version (if any) keeps serving, and this file is tried again when it changes"
                );
                false
            }
        }
    }

    /// Loads the plugins again ([`PluginHost::reload_all`]) whenever the store sees a
    /// write by another process, until `stop` fires, and then wakes `reloaded` (the
    /// daemon sweeps the channels of keys that other process may have revoked); `None`
    /// if the store cannot tell.
    pub fn follow_store(
        self: &Arc<Self>,
        mut stop: Shutdown,
        reloaded: Arc<tokio::sync::Notify>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let mut changes = self.store.external_changes()?;
        let host = Arc::clone(self);
        Some(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.recv() => return,
                    r = changes.changed() => {
                        if r.is_err() {
                            return;
                        }
                        tracing::info!("the plugin state was written by another process (connectord plugin-call?) or another cluster node: loading the plugins again so that they read it");
                        let h = Arc::clone(&host);
                        let _ = tokio::task::spawn_blocking(move || h.reload_all()).await;
                        reloaded.notify_one();
                    }
                }
            }
        }))
    }

    /// Watches the plugin directory and reloads on change, until `stop` fires.
    pub fn watch(self: &Arc<Self>, mut stop: Shutdown) -> Option<tokio::task::JoinHandle<()>> {
        use notify::RecursiveMode;
        let dir = self.dir.clone()?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let watched = dir.clone();
        let mut debouncer = match notify_debouncer_full::new_debouncer(
            std::time::Duration::from_millis(300),
            None,
            move |res: notify_debouncer_full::DebounceEventResult| {
                // Only changes count: the daemon's own reads of a file (open, close
                // without writing) are no reason to look again. A change of the directory
                // itself counts too (removed whole: one event on the directory).
                let relevant = match res {
                    Ok(events) => events.iter().any(|e| {
                        e.need_rescan()
                            || (crate::dir_watch::is_change(&e.kind)
                                && e.paths.iter().any(|p| {
                                    p.extension().is_some_and(|x| x == "so") || *p == watched
                                }))
                    }),
                    Err(_) => true,
                };
                if relevant {
                    let _ = tx.send(());
                }
            },
        ) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("cannot watch plugin directory {}: {e}", dir.display());
                return None;
            }
        };
        if let Err(e) = debouncer.watch(&dir, RecursiveMode::NonRecursive) {
            tracing::warn!(
                "cannot watch plugin directory {}: {e}; plugins reload at restart only",
                dir.display()
            );
            return None;
        }
        let host = Arc::clone(self);
        // The probations' clock runs on its own task: a reload (which may wait for a file
        // to settle, and for a start-up) does not hold it back.
        let clock = {
            let host = Arc::clone(self);
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let mut clock = tokio::time::interval(PROBATION_CLOCK);
                clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.recv() => return,
                        _ = clock.tick() => {
                            if host.probations.load(Ordering::Relaxed) > 0 {
                                let h = Arc::clone(&host);
                                let _ = tokio::task::spawn_blocking(move || h.end_due_probations()).await;
                            }
                        }
                    }
                }
            })
        };
        // The watch follows the directory, not its path: a directory moved aside and
        // made anew (or removed) is noticed by looking ([`dir_watch::Identity`]).
        let mut identity = dir_watch::Identity::of(&dir);
        Some(tokio::spawn(async move {
            let mut debouncer = debouncer;
            let _clock = AbortOnDrop(clock);
            let mut recheck = tokio::time::interval(dir_watch::RECHECK_EVERY);
            recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.recv() => return,
                    _ = recheck.tick() => {
                        match identity.follow(&mut debouncer) {
                            Ok(dir_watch::Recheck::Same) => continue,
                            Ok(dir_watch::Recheck::Gone) => tracing::warn!(
                                "plugin directory {} is gone: its plugins fall back to the built-in ones (or none); it is watched again when it is made anew",
                                dir.display()
                            ),
                            Ok(dir_watch::Recheck::Replaced) => tracing::info!(
                                "plugin directory {} is another directory now: watching it and loading its plugins",
                                dir.display()
                            ),
                            Err(e) => tracing::warn!(
                                "plugin directory {} is another directory now, which cannot be watched: {e}; its plugins are loaded now and reload at restart only",
                                dir.display()
                            ),
                        }
                        let h = Arc::clone(&host);
                        let _ = tokio::task::spawn_blocking(move || h.reload_dir()).await;
                    }
                    msg = rx.recv() => {
                        if msg.is_none() {
                            return;
                        }
                        let h = Arc::clone(&host);
                        let _ = tokio::task::spawn_blocking(move || h.reload_dir()).await;
                    }
                }
            }
        }))
    }

    /// Stops every plugin (at shutdown): destroys the instances and joins their threads.
    pub fn shutdown(&self) {
        let all: Vec<Arc<Generation>> = self
            .plugins
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, g)| g)
            .collect();
        drop(all);
    }
}

/// Waits until each of `files` has stopped changing: two looks [`STABLE_CHECK`] apart
/// agree (one sleep for all of them). Gives up on those still changing after
/// [`STABLE_MAX`] (logged; their writer's next write is a new change) and on those that
/// vanish. Returns the stable ones with the version seen.
fn wait_until_stable(mut files: Vec<(PathBuf, Fingerprint)>) -> Vec<(PathBuf, Fingerprint)> {
    let started = Instant::now();
    let mut stable = Vec::new();
    while !files.is_empty() {
        std::thread::sleep(STABLE_CHECK);
        let mut still = Vec::new();
        for (path, seen) in files {
            match Fingerprint::of(&path) {
                Ok(now) if now == seen => stable.push((path, now)),
                Ok(now) => still.push((path, now)),
                Err(_) => {}
            }
        }
        if !still.is_empty() && started.elapsed() >= STABLE_MAX {
            for (path, _) in &still {
                tracing::warn!(
                    "plugin file {} is still changing after {} s; loaded once it stops",
                    path.display(),
                    STABLE_MAX.as_secs()
                );
            }
            break;
        }
        files = still;
    }
    stable.sort_by(|a, b| a.0.cmp(&b.0));
    stable
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Refuses a path that group or others may write to (a plugin is code).
fn check_not_writable_by_others(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    let mode = meta.permissions().mode();
    if mode & WRITABLE_BY_OTHERS != 0 {
        return Err(format!(
            "it is writable by group or others (mode {:o}); a plugin is code",
            mode & 0o777
        ));
    }
    Ok(())
}

/// The private copy `file` of a plugin, just written, is loaded by its path: the copy and
/// the directory it is in must be this process's user's, the directory closed to everyone
/// else and not a symbolic link, the copy a regular file. Otherwise another local user who made that
/// directory (in a shared temporary directory, between the removal of an old one and our
/// `mkdir`, which takes an existing directory as it is) could put their own code in place
/// of the copy before `dlopen`, run as the daemon's (or `plugin-call`'s: root's) user.
fn check_private_dir(dir: &Path, file: &Path) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // Our effective user: the owner of `/proc/self` (no `unsafe` for `geteuid` here).
    let me = std::fs::metadata("/proc/self")
        .map_err(|e| format!("cannot tell this process's user (/proc/self: {e})"))?
        .uid();
    let d = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let f = std::fs::symlink_metadata(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mode = d.permissions().mode() & 0o777;
    // Owned by us, not only by the file's owner: a user who made the directory could
    // rename their own file over the copy, and both would be theirs (a review finding).
    if !d.is_dir() || d.uid() != me || mode & 0o077 != 0 || !f.is_file() || f.uid() != me {
        return Err(format!(
            "the directory of its private copy, {}, is not the daemon's own and closed to \
             others, or the copy is not its own file (directory owner {}, mode {mode:o}, a \
             directory: {}; copy owner {}, a file: {}; this process runs as {me}); refusing \
             to load from it",
            dir.display(),
            d.uid(),
            d.is_dir(),
            f.uid(),
            f.is_file()
        ));
    }
    Ok(())
}

impl std::fmt::Display for loader::Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            loader::Origin::Builtin => f.write_str("built-in"),
            loader::Origin::File { path, .. } => write!(f, "{}", path.display()),
        }
    }
}

/// Plugin kinds as the configuration and logs name them.
pub fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Auth => "auth",
        Kind::Sink => "sink",
        Kind::Other => "other",
    }
}

#[cfg(test)]
mod private_dir_tests {
    use super::check_private_dir;
    use std::os::unix::fs::PermissionsExt;

    fn with_file(mode: u32) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cache");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        let file = dir.join("libx-1.so");
        std::fs::write(&file, b"x").unwrap();
        (t, dir, file)
    }

    #[test]
    fn a_private_directory_of_ours_is_taken() {
        let (_t, dir, file) = with_file(0o700);
        assert_eq!(check_private_dir(&dir, &file), Ok(()));
    }

    #[test]
    fn a_directory_open_to_others_is_refused() {
        for mode in [0o777, 0o770, 0o705, 0o1777] {
            let (_t, dir, file) = with_file(mode);
            let e = check_private_dir(&dir, &file).unwrap_err();
            assert!(e.contains("refusing to load"), "{mode:o}: {e}");
        }
    }

    #[test]
    fn a_symbolic_link_in_place_of_the_directory_is_refused() {
        let (t, dir, file) = with_file(0o700);
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(check_private_dir(&link, &file).is_err());
    }

    /// As root (CI runs as root): a directory another user made (the race `plugin-call`
    /// lost before, in /tmp under a name it could foresee) is refused though its mode is
    /// 0700, also when that user's file replaced the copy (so the directory's and the
    /// file's owners agree), and a file of another user in our directory is refused.
    #[test]
    fn a_directory_or_copy_another_user_owns_is_refused() {
        let (_t, dir, file) = with_file(0o700);
        if let Err(e) = std::os::unix::fs::chown(&file, Some(65534), Some(65534)) {
            eprintln!("SKIPPED: needs root to give files to another user ({e})");
            return;
        }
        assert!(
            check_private_dir(&dir, &file).is_err(),
            "their file in our directory"
        );
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        assert!(
            check_private_dir(&dir, &file).is_err(),
            "their file in their directory"
        );
        std::os::unix::fs::chown(&file, Some(0), Some(0)).unwrap();
        assert!(
            check_private_dir(&dir, &file).is_err(),
            "our file in their directory"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use connectord_plugin_sdk::sink::{DeliverRequest, DeliverResponse, OP_DELIVER, Target};
    use std::time::{Duration, Instant};

    /// Polls `f` (bounded) until it holds.
    async fn eventually(mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f()
    }

    /// Calls that overlap get a sink instance each (up to the bound), and the extra ones
    /// end once idle, leaving one that still answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sink_instances_grow_for_overlapping_calls_and_end_when_idle() {
        // A receiver that accepts and never answers: each delivery holds its instance
        // until the webhook's 1 s timeout.
        let tarpit = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/cb", tarpit.local_addr().unwrap());
        let held = std::thread::spawn(move || {
            let mut kept = Vec::new();
            tarpit.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && kept.len() < 4 {
                match tarpit.accept() {
                    Ok((s, _)) => kept.push(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            kept
        });
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let mut cfg = PluginsConfig::default();
        let mut webhook = toml::Table::new();
        webhook.insert("timeout_s".into(), toml::Value::Integer(1));
        cfg.settings.insert("webhook".into(), webhook);
        let host = PluginHost::start(
            &cfg,
            store,
            dir.path().join("cache"),
            Arc::new(Counters::default()),
            3,
        );
        host.lane_idle_ms
            .store(300, std::sync::atomic::Ordering::Release);
        tokio::task::block_in_place(|| host.reload_all());
        let g = host.get("webhook").unwrap();
        assert_eq!(g.instances(), 1);

        let deliver = |host: Arc<PluginHost>, url: String| async move {
            let req = DeliverRequest {
                target: Target {
                    url,
                    headers: Default::default(),
                },
                body: "{}".into(),
                key_id: None,
            };
            host.call_json::<_, DeliverResponse>("webhook", OP_DELIVER, &req)
                .await
        };
        let calls: Vec<_> = (0..4)
            .map(|_| tokio::spawn(deliver(Arc::clone(&host), url.clone())))
            .collect();
        assert!(
            eventually(|| g.instances() == 3).await,
            "three instances for four calls at a bound of three: {}",
            g.instances()
        );
        for c in calls {
            let answer = c.await.unwrap().unwrap();
            assert!(
                matches!(answer, DeliverResponse::Retry { .. }),
                "{answer:?}"
            );
        }
        assert!(
            eventually(|| g.instances() == 1).await,
            "idle instances end but one: {}",
            g.instances()
        );
        // The one left still answers (here: the tarpit's timeout again).
        let answer = deliver(Arc::clone(&host), url.clone()).await.unwrap();
        assert!(
            matches!(answer, DeliverResponse::Retry { .. }),
            "{answer:?}"
        );
        assert_eq!(g.instances(), 1);
        drop(g);
        host.shutdown();
        drop(held.join());
    }
}
