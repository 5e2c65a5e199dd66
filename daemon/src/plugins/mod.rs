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
//! `pelion`, `losant`, `headerkeys`, `webhook`), and `lib<crate>.so` files in `[plugins] dir`. A file whose plugin has the
//! name of a built-in replaces it. The directory is watched; a changed file is copied to a
//! fresh path (a same-path `dlopen` would return the old image), loaded, checked (ABI
//! version, kind, `create`), and only then swapped in; callers that hold the previous
//! generation finish their calls on it, and it is destroyed, its thread joined and its
//! image unloaded when the last of them lets go. A file that fails anywhere along the way
//! leaves the previous generation serving and is logged. A directory writable by group or
//! others is refused.
//!
//! Plugins keep their state through the host (`state_get`/`put`/`delete`/`keys`, stored
//! in SQLite), so a reload or a restart loses nothing.

mod loader;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The cache directory of plugin copies inside a state directory.
pub fn cache_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("plugin-cache")
}
use std::sync::{Arc, Mutex, RwLock};

use connectord_plugin_sdk::{Kind, http};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::PluginsConfig;
use crate::metrics::Counters;
use crate::shutdown::Shutdown;
use crate::store::Store;
pub use loader::Generation;

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
    #[error("plugin {name}: bad answer to {op}: {message}")]
    BadAnswer {
        name: String,
        op: String,
        message: String,
    },
    #[error("plugin {0} has stopped")]
    Stopped(String),
}

/// The built-in plugins linked into the binary.
fn builtins() -> Vec<&'static connectord_plugin_sdk::PluginTable> {
    vec![
        auth_connector::plugin_table(),
        auth_pelion::plugin_table(),
        auth_losant::plugin_table(),
        auth_headerkeys::plugin_table(),
        sink_webhook::plugin_table(),
    ]
}

/// Every plugin a configuration could use without starting anything, as (plugin name,
/// where it comes from: `built-in` or the file): the built-ins, then the files of
/// `[plugins] dir` in name order (opened to read the name each declares; a file that
/// cannot be, or a directory the daemon would refuse, provides nothing). For
/// `connectord check-config`; the daemon itself checks against what it loaded
/// ([`PluginHost::loaded`]).
pub fn available(cfg: &PluginsConfig) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = builtins()
        .into_iter()
        .map(|t| (Generation::builtin_name(t), "built-in".to_string()))
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
        if let Ok(name) = Generation::declared_name(&f) {
            found.push((name, f.display().to_string()));
        }
    }
    found
}

/// Checks that the plugins `[plugins] auth` and `sink` name are among `available`
/// (plugin name, origin). The error names the file, the key, the unknown name and every
/// name available.
pub fn check_names(
    cfg: &PluginsConfig,
    available: &[(String, String)],
    source: &crate::config::Source,
) -> Result<(), crate::config::ConfigError> {
    let named = cfg
        .auth
        .iter()
        .map(|n| ("plugins.auth", n))
        .chain(std::iter::once(("plugins.sink", &cfg.sink)));
    for (key, name) in named {
        if available.iter().any(|(n, _)| n == name) {
            continue;
        }
        let list: Vec<String> = available
            .iter()
            .map(|(n, origin)| format!("{n} ({origin})"))
            .collect();
        let dir = match &cfg.dir {
            Some(d) => format!("lib<crate>.so files in {}", d.display()),
            None => "no [plugins] dir is set".to_string(),
        };
        return Err(crate::config::ConfigError::Invalid {
            source_name: source.clone(),
            key: key.into(),
            message: format!(
                "no built-in plugin or plugin file provides `{name}`; available: {} ({dir})",
                list.join(", ")
            ),
        });
    }
    Ok(())
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
    /// Which file each file-loaded plugin came from (to fall back when it is removed).
    files: Mutex<HashMap<PathBuf, String>>,
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
    /// Loads the built-ins, then every plugin file of the directory. Failures are logged;
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
            dir: cfg.dir.clone(),
            cache_dir,
            counters,
            sink_lanes,
            lane_idle_ms: std::sync::atomic::AtomicU64::new(
                u64::try_from(loader::LANE_IDLE.as_millis()).unwrap_or(u64::MAX),
            ),
            plugins: RwLock::new(HashMap::new()),
            files: Mutex::new(HashMap::new()),
            reload_lock: Mutex::new(()),
            state_gate: Arc::new(tokio::sync::RwLock::new(())),
            epoch: std::sync::atomic::AtomicU64::new(0),
        });
        // Copies from an earlier run are of no use: start clean.
        let _ = std::fs::remove_dir_all(&host.cache_dir);
        for table in builtins() {
            host.load_builtin(table);
        }
        host.reload_dir();
        host
    }

    fn config_for(&self, name: &str) -> Vec<u8> {
        self.settings
            .get(name)
            .map(|v| v.to_string().into_bytes())
            .unwrap_or_else(|| b"{}".to_vec())
    }

    fn install(&self, g: Arc<Generation>) {
        self.bump_epoch();
        let name = g.name.clone();
        tracing::info!(plugin = %name, origin = %g.origin, generation = g.id, "plugin serving");
        let old = self
            .plugins
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, g);
        // The previous generation is destroyed when its last in-flight call lets go.
        drop(old);
    }

    /// How long an idle extra instance of a sink plugin lives.
    fn lane_idle(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.lane_idle_ms.load(std::sync::atomic::Ordering::Acquire),
        )
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

    /// Names and origins of the plugins serving now.
    pub fn loaded(&self) -> Vec<(String, String, u64)> {
        let mut v: Vec<_> = self
            .plugins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|g| (g.name.clone(), g.origin.to_string(), g.id))
            .collect();
        v.sort();
        v
    }

    /// Calls `op` of plugin `name` with a JSON request and decodes the JSON answer.
    pub async fn call_json<I: Serialize, O: DeserializeOwned>(
        &self,
        name: &str,
        op: &str,
        input: &I,
    ) -> Result<O, PluginError> {
        let bytes = serde_json::to_vec(input).map_err(|e| PluginError::Call {
            name: name.to_string(),
            message: e.to_string(),
        })?;
        let mutating = !matches!(
            op,
            connectord_plugin_sdk::auth::OP_AUTHENTICATE
                | connectord_plugin_sdk::auth::OP_KEY_STATUS
                | connectord_plugin_sdk::sink::OP_DELIVER
                | connectord_plugin_sdk::sink::OP_VERIFY
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
        let out = out.inspect_err(|_| Counters::inc(&self.counters.plugin_errors))?;
        serde_json::from_slice(&out).map_err(|e| PluginError::BadAnswer {
            name: name.to_string(),
            op: op.to_string(),
            message: e.to_string(),
        })
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
    /// built-in (or nothing) for removed ones.
    pub fn reload_dir(self: &Arc<Self>) {
        let _serial = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let _gate = self.quiesce();
        let Some(dir) = self.dir.clone() else { return };
        if let Err(why) = check_not_writable_by_others(&dir) {
            Counters::inc(&self.counters.plugin_errors);
            tracing::error!("refusing plugins from {}: {why}", dir.display());
            return;
        }
        let mut present = Vec::new();
        match std::fs::read_dir(&dir) {
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
        for path in &present {
            let changed = {
                let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
                match files.get(path).and_then(|name| self.get(name)) {
                    Some(g) => g.file_changed(path),
                    None => true,
                }
            };
            if changed {
                self.load_file(path);
            }
        }
        // Files that disappeared: back to the built-in of that name, or nothing.
        let gone: Vec<(PathBuf, String)> = {
            let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
            files
                .iter()
                .filter(|(p, _)| !present.contains(p))
                .map(|(p, n)| (p.clone(), n.clone()))
                .collect()
        };
        for (path, name) in gone {
            self.files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&path);
            tracing::info!(plugin = %name, "plugin file {} removed", path.display());
            match builtins()
                .into_iter()
                .find(|t| Generation::builtin_name(t) == name)
            {
                Some(t) => self.load_builtin(t),
                None => {
                    self.plugins
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&name);
                }
            }
        }
    }

    /// Loads every plugin again, from its file or as the built-in, so that each reads its
    /// durable state anew: the store saw it written by another process (`connectord
    /// plugin-call`), which the instances serving now cannot know of. A plugin that fails
    /// to load again keeps serving as it was.
    pub fn reload_all(self: &Arc<Self>) {
        let _serial = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let _gate = self.quiesce();
        let mut files: Vec<(PathBuf, String)> = self
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(p, n)| (p.clone(), n.clone()))
            .collect();
        // In the directory reload's order: of two files with one plugin name, the last
        // wins both times.
        files.sort();
        for table in builtins() {
            let name = Generation::builtin_name(table);
            // A file of the same name serves instead of the built-in.
            if self.get(&name).is_none() || files.iter().any(|(_, n)| *n == name) {
                continue;
            }
            self.load_builtin(table);
        }
        for (path, _) in files {
            self.load_file(&path);
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
            Ok(g) => self.install(g),
            Err(e) => {
                Counters::inc(&self.counters.plugin_errors);
                tracing::error!(
                    "built-in plugin: {e}; the previous version (if any) keeps serving"
                );
            }
        }
    }

    fn load_file(self: &Arc<Self>, path: &Path) {
        match Generation::from_file(self, path) {
            Ok(g) => {
                Counters::inc(&self.counters.plugin_reloads);
                self.files
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(path.to_path_buf(), g.name.clone());
                self.install(g);
            }
            Err(e) => {
                Counters::inc(&self.counters.plugin_errors);
                tracing::error!("{e}; the previous version (if any) keeps serving");
            }
        }
    }

    /// Loads the plugins again ([`PluginHost::reload_all`]) whenever the store sees a
    /// write by another process, until `stop` fires; `None` if the store cannot tell.
    pub fn follow_store(
        self: &Arc<Self>,
        mut stop: Shutdown,
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
                        tracing::info!("the state database was written by another process (connectord plugin-call?): loading the plugins again so that they read it");
                        let h = Arc::clone(&host);
                        let _ = tokio::task::spawn_blocking(move || h.reload_all()).await;
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
        let mut debouncer = match notify_debouncer_full::new_debouncer(
            std::time::Duration::from_millis(300),
            None,
            move |res: notify_debouncer_full::DebounceEventResult| {
                let relevant = match res {
                    Ok(events) => events.iter().any(|e| {
                        e.paths
                            .iter()
                            .any(|p| p.extension().is_some_and(|x| x == "so"))
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
        Some(tokio::spawn(async move {
            let _keep = debouncer;
            loop {
                tokio::select! {
                    _ = stop.recv() => return,
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
