//! What the end-to-end tests (`tests/it`) and the bench share: a daemon on loopback with
//! a private state directory and configuration, its addresses learnt without parsing the
//! log, and clients for it: HTTP ([`http`]), a CoAP device ([`coap::Device`]), a webhook
//! receiver ([`receiver::Receiver`]).
//!
//! Two ways to start it, the same [`Daemon`] either way:
//! - **as a process** (the default): the real binary, named by the caller
//!   ([`Launch::new`]: a test passes `env!("CARGO_BIN_EXE_connectord")`, the bench its
//!   `--daemon` path), run with `connectord run --ready-file`, its addresses read from that
//!   file. Its log is collected (stderr, line by line) for the tests whose point is the
//!   log. For signals, `kill -9`, exit codes, the log, the environment, and measuring.
//! - **in this process** ([`Launch::in_process`]): `connectord::daemon::start`, the start
//!   path `connectord run` takes too, on a runtime of its own; the addresses come from the
//!   returned handle, a clean stop is [`connectord::daemon::Running::shutdown`]. No process
//!   to spawn, and several daemons can run side by side; but no signals, no `kill -9`, no
//!   log to read (the test process's tracing subscriber, if any, gets the lines), no
//!   environment of its own, and the budget of device log lines is shared by every daemon
//!   of the process.

#![deny(unsafe_code)]

pub mod coap;
pub mod mosquitto;
pub mod nats;
pub mod receiver;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a daemon may take to write its ready file, unless [`Launch::timeout`] says.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The name of the ready file in the daemon's temporary directory (beside the state
/// directory, not in it).
pub const READY_FILE: &str = "ready.json";

/// Why a daemon did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot prepare the state directory and configuration: {0}")]
    Prepare(std::io::Error),
    #[error("in-process start: {0}")]
    InProcess(String),
    #[error("connectord (in process) did not start: {0}")]
    Daemon(#[from] connectord::daemon::StartError),
    #[error("cannot spawn {}: {source}", bin.display())]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("connectord exited during start ({status}):\n{log}")]
    Exited { status: ExitStatus, log: String },
    #[error("connectord did not write {} within {timeout:?}:\n{log}", path.display())]
    Timeout {
        path: PathBuf,
        timeout: Duration,
        log: String,
    },
    #[error("ready file {}: {reason}", path.display())]
    ReadyFile { path: PathBuf, reason: String },
}

/// What `connectord run --ready-file` writes once the daemon serves.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Ready {
    pub pid: u32,
    pub version: String,
    /// Every bound REST address (the system's port where the configuration says 0).
    pub rest: Vec<SocketAddr>,
    /// Every bound CoAP (UDP) address.
    pub coap: Vec<SocketAddr>,
    /// Every bound HTTPS address of the REST API (`rest.listen_tls`).
    #[serde(default)]
    pub rest_tls: Vec<SocketAddr>,
    /// Every bound CoAP over TLS address (`coap.listen_tls`).
    #[serde(default)]
    pub coap_tls: Vec<SocketAddr>,
    /// Every bound CoAP over DTLS address (`coap.listen_dtls`).
    #[serde(default)]
    pub coap_dtls: Vec<SocketAddr>,
}

impl Ready {
    /// Reads and parses a ready file.
    pub fn read(path: &Path) -> Result<Ready, StartError> {
        let fail = |reason: String| StartError::ReadyFile {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let ready: Ready = serde_json::from_str(&text).map_err(|e| fail(format!("{e}: {text}")))?;
        if ready.rest.is_empty() || ready.coap.is_empty() {
            return Err(fail(format!("no REST or no CoAP address: {text}")));
        }
        Ok(ready)
    }
}

/// Which log lines a daemon keeps in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepLogs {
    /// Every line (tests read them). The start waits until the log reader has seen the
    /// start's last line too, so that [`Daemon::logs`] holds the whole start.
    All,
    /// The first 200 lines and every warning or error (a long benchmark at debug level
    /// would otherwise hold millions).
    StartAndWarnings,
}

/// How to start a daemon: the binary, the configuration (see [`test_config`]) and the
/// process's environment, or in this process ([`Launch::in_process`]).
#[derive(Debug, Clone)]
pub struct Launch {
    bin: PathBuf,
    in_process: bool,
    log_level: String,
    coap: String,
    rest: String,
    extra: String,
    env: Vec<(String, String)>,
    keep_logs: KeepLogs,
    timeout: Duration,
}

impl Launch {
    /// The binary `bin`, log level debug, every log line kept, [`START_TIMEOUT`].
    pub fn new(bin: impl Into<PathBuf>) -> Launch {
        Launch {
            bin: bin.into(),
            in_process: false,
            log_level: "debug".into(),
            coap: String::new(),
            rest: String::new(),
            extra: String::new(),
            env: Vec::new(),
            keep_logs: KeepLogs::All,
            timeout: START_TIMEOUT,
        }
    }

    /// Start the daemon in this process (`connectord::daemon::start`) rather than the
    /// binary; the binary is still the one of [`Prepared::plugin_call`]. See the crate
    /// documentation for what it cannot do.
    pub fn in_process(mut self) -> Launch {
        self.in_process = true;
        self
    }

    /// `[log] level`.
    pub fn log_level(mut self, level: &str) -> Launch {
        self.log_level = level.into();
        self
    }

    /// Lines added to the `[coap]` section.
    pub fn coap(mut self, lines: &str) -> Launch {
        self.coap = lines.into();
        self
    }

    /// Lines added to the `[rest]` section (which has `listen = ["127.0.0.1:0"]`).
    pub fn rest(mut self, lines: &str) -> Launch {
        self.rest = lines.into();
        self
    }

    /// Whole sections added to the configuration (see [`test_config`]).
    pub fn extra(mut self, toml: &str) -> Launch {
        self.extra = toml.into();
        self
    }

    /// An environment variable of the daemon process (at every start of it).
    pub fn env(mut self, key: &str, value: &str) -> Launch {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn keep_logs(mut self, keep: KeepLogs) -> Launch {
        self.keep_logs = keep;
        self
    }

    /// How long a start may take.
    pub fn timeout(mut self, timeout: Duration) -> Launch {
        self.timeout = timeout;
        self
    }

    /// Creates the temporary directory (removed when the last [`Daemon`] or [`Prepared`]
    /// of it is dropped) with `scripts/` and `connectord.toml`, without starting.
    pub fn prepare(self) -> Result<Prepared, StartError> {
        let dir = Arc::new(tempfile::tempdir().map_err(StartError::Prepare)?);
        let config_path = dir.path().join("connectord.toml");
        std::fs::create_dir_all(dir.path().join("scripts")).map_err(StartError::Prepare)?;
        let mut text = config_text(dir.path(), &self.log_level, &self.coap, &self.extra);
        if !self.rest.is_empty() {
            text = text.replacen("[rest]\n", &format!("[rest]\n{}\n", self.rest), 1);
        }
        std::fs::write(&config_path, text).map_err(StartError::Prepare)?;
        Ok(Prepared {
            dir,
            config_path,
            launch: self,
        })
    }

    /// [`Launch::prepare`], then [`Prepared::start`].
    pub fn start(self) -> Result<Daemon, StartError> {
        self.prepare()?.start()
    }
}

/// The lines of the section `header` in `toml` (up to the next section), and `toml`
/// without it.
fn take_section(toml: &str, header: &str) -> (String, String) {
    match toml.split_once(header) {
        Some((before, after)) => {
            let end = after.find("\n[").map(|i| i + 1).unwrap_or(after.len());
            (
                after[..end].to_string(),
                format!("{before}{}", &after[end..]),
            )
        }
        None => (String::new(), toml.to_string()),
    }
}

/// The test configuration: loopback only, free ports, state in `dir`; `coap` lines go
/// into the `[coap]` section, `extra` sections follow.
pub fn test_config(dir: &Path, coap: &str, extra: &str) -> String {
    config_text(dir, "debug", coap, extra)
}

fn config_text(dir: &Path, log_level: &str, coap: &str, extra: &str) -> String {
    // Lines of a `[lua]`, `[state]` or `[rest]` section in `extra` join the harness's own
    // section.
    let (lua, extra) = take_section(extra, "[lua]\n");
    let (state, extra) = take_section(&extra, "[state]\n");
    let (rest, extra) = take_section(&extra, "[rest]\n");
    format!(
        "[log]\nlevel = \"{log_level}\"\n[state]\ndir = \"{}\"\n{state}\n[rest]\nlisten = [\"127.0.0.1:0\"]\n{rest}\n[lua]\ndir = \"{}\"\n{lua}\n[coap]\nlisten = [\"127.0.0.1:0\"]\n{coap}\n{extra}",
        dir.join("state").display(),
        dir.join("scripts").display()
    )
}

/// A state directory and configuration, before the daemon starts (to run CLI commands
/// against them first).
pub struct Prepared {
    pub dir: Arc<tempfile::TempDir>,
    pub config_path: PathBuf,
    launch: Launch,
}

impl Prepared {
    /// The binary this will start (and [`Prepared::plugin_call`] runs).
    pub fn bin(&self) -> &Path {
        &self.launch.bin
    }

    /// Start in this process ([`Launch::in_process`]) rather than as a process.
    pub fn in_process(mut self) -> Prepared {
        self.launch.in_process = true;
        self
    }

    /// `connectord plugin-call --config <this> <plugin> <op> <input>`; returns its JSON answer.
    pub fn plugin_call(
        &self,
        plugin: &str,
        op: &str,
        input: &serde_json::Value,
    ) -> serde_json::Value {
        plugin_call(&self.launch.bin, &self.config_path, plugin, op, input)
    }

    pub fn start(self) -> Result<Daemon, StartError> {
        let mut d = Daemon {
            child: None,
            running: None,
            dir: self.dir,
            config_path: self.config_path,
            launch: self.launch,
            rest: SocketAddr::from(([0, 0, 0, 0], 0)),
            coap: SocketAddr::from(([0, 0, 0, 0], 0)),
            ready: None,
            started_in: Duration::ZERO,
            key: String::new(),
            logs: Arc::new(Mutex::new(Vec::new())),
            inbox: Mutex::new(Events::default()),
        };
        d.respawn()?;
        Ok(d)
    }
}

/// A running daemon with its own state directory.
pub struct Daemon {
    child: Option<Child>,
    /// The daemon started in this process ([`Launch::in_process`]).
    running: Option<connectord::daemon::Running>,
    /// Holds the state directory and the config file; removed when the test ends.
    pub dir: Arc<tempfile::TempDir>,
    pub config_path: PathBuf,
    launch: Launch,
    /// The first REST and CoAP addresses of [`Daemon::ready`].
    pub rest: SocketAddr,
    pub coap: SocketAddr,
    /// What the daemon wrote in its ready file at its last start.
    pub ready: Option<Ready>,
    /// From the last spawn to the ready file.
    pub started_in: Duration,
    /// The admin key (empty when keys were made before the first start, see [`Prepared`]).
    pub key: String,
    logs: Arc<Mutex<Vec<String>>>,
    /// Every notification event pulled so far (see [`Daemon::collect_events`]).
    inbox: Mutex<Events>,
}

impl Daemon {
    /// [`Launch::in_process`] on `launch`, then [`Launch::start`].
    pub fn in_process(launch: Launch) -> Result<Daemon, StartError> {
        launch.in_process().start()
    }

    /// Whether this daemon runs in this process ([`Launch::in_process`]).
    pub fn is_in_process(&self) -> bool {
        self.launch.in_process
    }

    /// Starts the daemon in this process on this state directory and configuration.
    fn start_in_process(&mut self) -> Result<(), StartError> {
        if !self.launch.env.is_empty() {
            return Err(StartError::InProcess(
                "environment variables need a daemon process".into(),
            ));
        }
        let config = connectord::config::Config::load(&self.config_path)
            .map_err(|e| StartError::InProcess(e.to_string()))?;
        let t0 = Instant::now();
        let running = connectord::daemon::start(
            config,
            connectord::daemon::Options {
                config_path: Some(self.config_path.clone()),
                ..Default::default()
            },
        )?;
        self.started_in = t0.elapsed();
        let ready = Ready {
            pid: std::process::id(),
            version: connectord::VERSION.to_string(),
            rest: running.rest_addrs().to_vec(),
            coap: running.coap_addrs().to_vec(),
            rest_tls: running.rest_tls_addrs().to_vec(),
            coap_tls: running.coap_tls_addrs().to_vec(),
            coap_dtls: running.coap_dtls_addrs().to_vec(),
        };
        self.rest = ready.rest[0];
        self.coap = ready.coap[0];
        self.ready = Some(ready);
        // Absent when keys were made before the first start (see `Prepared`).
        self.key = running.admin_key().unwrap_or_default();
        self.running = Some(running);
        Ok(())
    }

    /// Starts the daemon (again, after [`Daemon::kill9`] or a clean exit) on this state
    /// directory and configuration: the process, waiting for its ready file, or in this
    /// process ([`Launch::in_process`]).
    pub fn respawn(&mut self) -> Result<(), StartError> {
        self.kill9();
        if self.launch.in_process {
            return self.start_in_process();
        }
        let ready_path = self.dir.path().join(READY_FILE);
        // A file of an earlier run (killed, so it could not remove it) is not this one's.
        match std::fs::remove_file(&ready_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StartError::Prepare(e)),
        }
        let mut cmd = Command::new(&self.launch.bin);
        cmd.args(["run", "--config"])
            .arg(&self.config_path)
            .arg("--ready-file")
            .arg(&ready_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        for (k, v) in &self.launch.env {
            cmd.env(k, v);
        }
        let t0 = Instant::now();
        let mut child = cmd.spawn().map_err(|source| StartError::Spawn {
            bin: self.launch.bin.clone(),
            source,
        })?;
        let stderr = child.stderr.take();
        self.child = Some(child);
        let logs = Arc::new(Mutex::new(Vec::new()));
        self.logs = Arc::clone(&logs);
        let keep = self.launch.keep_logs;
        let echo = std::env::var_os("CONNECTORD_TEST_ECHO").is_some();
        if let Some(stderr) = stderr {
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if echo {
                        eprintln!("[daemon] {line}");
                    }
                    let mut l = lock(&logs);
                    if keep == KeepLogs::All
                        || l.len() < 200
                        || line.contains("WARN")
                        || line.contains("ERROR")
                    {
                        l.push(line);
                    }
                }
            });
        }
        let deadline = t0 + self.launch.timeout;
        loop {
            if ready_path.exists() {
                break;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                // The reader may still be draining the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Err(StartError::Exited {
                    status,
                    log: self.logs().join("\n"),
                });
            }
            if Instant::now() >= deadline {
                return Err(StartError::Timeout {
                    path: ready_path,
                    timeout: self.launch.timeout,
                    log: self.logs().join("\n"),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.started_in = t0.elapsed();
        let ready = Ready::read(&ready_path)?;
        self.rest = ready.rest[0];
        self.coap = ready.coap[0];
        self.ready = Some(ready);
        if keep == KeepLogs::All {
            // Not for the addresses: so that a test reading the log right after the start
            // sees all of it, the start's last line ("connectord <version> ready", logged
            // just after the ready file is written) included.
            let bound = Instant::now() + Duration::from_secs(5);
            while Instant::now() < bound && !self.logs().iter().any(|l| l.ends_with(" ready")) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // Absent when keys were made before the first start (see `Prepared`).
        self.key = std::fs::read_to_string(self.state_dir().join("admin.key"))
            .unwrap_or_default()
            .trim()
            .to_string();
        Ok(())
    }

    /// `kill -9` and reap (nothing when not running). In process there is nothing to
    /// kill: the daemon is stopped cleanly.
    pub fn kill9(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The binary this daemon runs.
    pub fn bin(&self) -> &Path {
        &self.launch.bin
    }

    /// The Lua rules directory of this daemon (watched).
    pub fn scripts_dir(&self) -> PathBuf {
        self.dir.path().join("scripts")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Every log line so far (of the current process).
    pub fn logs(&self) -> Vec<String> {
        lock(&self.logs).clone()
    }

    /// Waits (bounded) for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.logs().iter().any(|l| l.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The process id; panics when the process was reaped or the daemon runs in process.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("a running daemon process (not in process)")
            .id()
    }

    /// The process id, None when the process was reaped.
    pub fn try_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGTERM, a clean exit, then start again on the same state directory and
    /// configuration.
    pub fn stop_and_restart(self) -> Daemon {
        self.stop_edit_restart(|_| {})
    }

    /// SIGTERM, wait for the clean stop, run `edit` on the state directory (as an operator
    /// or a failure between runs would), then start again on it.
    /// In process, the stop is [`connectord::daemon::Running::shutdown`].
    pub fn stop_edit_restart(mut self, edit: impl FnOnce(&Path)) -> Daemon {
        match self.running.take() {
            Some(r) => r.shutdown(),
            None => {
                self.signal("TERM");
                assert_eq!(
                    self.wait_exit(Duration::from_secs(15)),
                    Some(0),
                    "a clean stop on SIGTERM"
                );
            }
        }
        edit(&self.dir.path().join("state"));
        self.restarted()
    }

    /// `kill -9`, then start again on the same state directory and configuration. Panics
    /// in process (there is no process to kill).
    pub fn crash_and_restart(mut self) -> Daemon {
        assert!(!self.launch.in_process, "kill -9 needs a daemon process");
        self.kill9();
        self.restarted()
    }

    /// A new [`Daemon`] (empty inbox) on this one's directory; panics when it does not start.
    fn restarted(self) -> Daemon {
        let p = Prepared {
            dir: Arc::clone(&self.dir),
            config_path: self.config_path.clone(),
            launch: self.launch.clone(),
        };
        drop(self);
        p.start().unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.rest, path)
    }
    /// GET with the admin key.
    pub fn get(&self, path: &str) -> Http {
        http_get(&self.url(path), Some(&self.key), None)
    }

    /// GET with the admin key and an Accept header.
    pub fn get_accept(&self, path: &str, accept: &str) -> Http {
        http_get(&self.url(path), Some(&self.key), Some(accept))
    }

    /// A request with the admin key; `content_type` and `body` are sent when given.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&[u8]>,
    ) -> Http {
        let auth = format!("Bearer {}", self.key);
        let mut headers = vec![("Authorization", auth.as_str())];
        if let Some(ct) = content_type {
            headers.push(("Content-Type", ct));
        }
        http(method, &self.url(path), &headers, body)
    }

    /// One `GET /v2/notification/pull?noWait=true`: the batch, or None on 204.
    pub fn pull_now(&self) -> Option<serde_json::Value> {
        let r = self.get("/v2/notification/pull?noWait=true");
        match r.status {
            200 => Some(r.json()),
            204 => None,
            s => panic!("pull answered {s}: {}", r.body),
        }
    }

    /// Pulls (without waiting) into the inbox until `done` holds for everything received
    /// since the last [`Daemon::clear_inbox`], or the timeout passes; returns the inbox.
    pub fn collect_events(&self, timeout: Duration, done: impl Fn(&Events) -> bool) -> Events {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(batch) = self.pull_now() {
                lock(&self.inbox).add(&batch);
            }
            let all = lock(&self.inbox).clone();
            if done(&all) || Instant::now() >= deadline {
                return all;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Forgets the events pulled so far.
    pub fn clear_inbox(&self) {
        *lock(&self.inbox) = Events::default();
    }

    /// Sends a resource request and returns its async-response id (asserting 202).
    pub fn async_request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&[u8]>,
    ) -> String {
        let r = self.call(method, path, content_type, body);
        assert_eq!(r.status, 202, "{method} {path}: {}", r.body);
        assert_eq!(r.content_type, "application/json");
        r.json()["async-response-id"]
            .as_str()
            .expect("async-response-id")
            .to_string()
    }

    /// Waits for the async response with this id.
    pub fn async_response(&self, id: &str, timeout: Duration) -> serde_json::Value {
        let events = self.collect_events(timeout, |e| e.async_response(id).is_some());
        events
            .async_response(id)
            .unwrap_or_else(|| panic!("no async response {id}; got {events:?}"))
            .clone()
    }

    /// Whether the daemon process is still running (it has not exited or been killed); in
    /// process, whether it has not been stopped.
    pub fn running(&mut self) -> bool {
        self.running.is_some()
            || self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The value of a `connectord_<name>` metric.
    pub fn metric(&self, name: &str) -> u64 {
        let body = self.get("/metrics").body;
        let prefix = format!("connectord_{name} ");
        body.lines()
            .find_map(|l| {
                l.strip_prefix(&prefix)
                    .map(|v| v.trim().parse().expect("metric value"))
            })
            .unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
    }

    /// A device talking to this daemon from a fresh UDP socket.
    pub fn device(&self) -> coap::Device {
        coap::Device::new(self.coap)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Locks, ignoring poisoning (a panicking test thread must not break the others).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request with `Authorization: Bearer <key>` (none without a key) and a JSON body,
/// sent as `Content-Type: application/json` (also on requests without a body).
pub fn bearer_call(
    d: &Daemon,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&serde_json::Value>,
) -> Http {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut h = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        h.push(("Authorization", a.as_str()));
    }
    let bytes = body.map(|b| b.to_string().into_bytes());
    http(method, &d.url(path), &h, bytes.as_deref())
}

/// `<bin> plugin-call --config <config> <plugin> <op> <input>` (its own process,
/// whether a daemon runs on that state or not); returns its JSON answer.
pub fn plugin_call(
    bin: &Path,
    config: &Path,
    plugin: &str,
    op: &str,
    input: &serde_json::Value,
) -> serde_json::Value {
    let out = Command::new(bin)
        .args(["plugin-call", "--config"])
        .arg(config)
        .args([plugin, op, &input.to_string()])
        .output()
        .expect("run connectord plugin-call");
    assert!(
        out.status.success(),
        "plugin-call failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("plugin-call prints JSON")
}

/// An HTTP response, read whole.
#[derive(Debug)]
pub struct Http {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl Http {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(40)))
        .build()
        .into()
}

/// GET `url` with an optional Bearer key and Accept header.
pub fn http_get(url: &str, key: Option<&str>, accept: Option<&str>) -> Http {
    let mut headers = Vec::new();
    let auth = key.map(|k| format!("Bearer {k}"));
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    if let Some(a) = accept {
        headers.push(("Accept", a));
    }
    http("GET", url, &headers, None)
}

/// Any request: `body` is sent (with the given headers) when present.
pub fn http(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Http {
    let mut builder = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let agent = agent();
    let result = match body {
        Some(b) => agent.run(builder.body(b.to_vec()).expect("request")),
        None => agent.run(builder.body(()).expect("request")),
    };
    let mut resp = result.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    Http {
        status,
        content_type,
        body,
    }
}

/// Notification events received so far, by type (`registrations`, `async-responses`, …).
#[derive(Debug, Default, Clone)]
pub struct Events(pub std::collections::BTreeMap<String, Vec<serde_json::Value>>);

impl Events {
    pub fn add(&mut self, batch: &serde_json::Value) {
        let obj = batch
            .as_object()
            .expect("a notification message is an object");
        for (kind, entries) in obj {
            let list = entries.as_array().expect("each event type holds an array");
            self.0
                .entry(kind.clone())
                .or_default()
                .extend(list.iter().cloned());
        }
    }
    pub fn of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.0.get(kind).cloned().unwrap_or_default()
    }
    pub fn async_response(&self, id: &str) -> Option<&serde_json::Value> {
        self.0
            .get("async-responses")?
            .iter()
            .find(|e| e["id"] == id)
    }
    pub fn count(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }
}

/// Base64 of bytes, for comparing payloads.
pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Polls `f` until it is true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Debian packages for the tests' peers (defined with the NATS server, whose file the
/// store's tests include on its own).
pub use nats::apt_install;
