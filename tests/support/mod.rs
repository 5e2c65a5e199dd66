//! Test harness for end-to-end tests: runs the real `connectord` binary on loopback with a
//! private state directory, talks to it over real HTTP and real UDP, and reads its log.
#![allow(dead_code)]

pub mod coap;
pub mod peers;
pub mod receiver;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_connectord");

/// How long a daemon may take to report its listening addresses.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running daemon with its own state directory.
pub struct Daemon {
    child: Option<Child>,
    /// Holds the state directory and the config file; removed when the test ends.
    pub dir: Arc<tempfile::TempDir>,
    pub config_path: PathBuf,
    pub rest: SocketAddr,
    pub coap: SocketAddr,
    pub key: String,
    logs: Arc<Mutex<Vec<String>>>,
    /// Every notification event pulled so far (see [`Daemon::collect_events`]).
    inbox: Mutex<Events>,
}

/// The test configuration: loopback only, free ports, state in `dir`; `coap` lines go
/// into the `[coap]` section, `extra` sections follow.
pub fn test_config(dir: &Path, coap: &str, extra: &str) -> String {
    // Lines of a `[lua]` section in `extra` join the harness's own `[lua]` section.
    let (lua, extra) = match extra.split_once("[lua]\n") {
        Some((before, after)) => {
            let end = after.find("\n[").map(|i| i + 1).unwrap_or(after.len());
            (
                after[..end].to_string(),
                format!("{before}{}", &after[end..]),
            )
        }
        None => (String::new(), extra.to_string()),
    };
    format!(
        "[log]\nlevel = \"debug\"\n[state]\ndir = \"{}\"\n[rest]\nlisten = [\"127.0.0.1:0\"]\n[lua]\ndir = \"{}\"\n{lua}\n[coap]\nlisten = [\"127.0.0.1:0\"]\n{coap}\n{extra}",
        dir.join("state").display(),
        dir.join("scripts").display()
    )
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with("")
    }

    /// Starts with the test configuration plus `extra` TOML (whole sections).
    pub fn start_with(extra: &str) -> Daemon {
        Daemon::start_custom("", extra)
    }

    /// Starts with `coap` lines added to the `[coap]` section and `extra` sections.
    pub fn start_custom(coap: &str, extra: &str) -> Daemon {
        Daemon::start_env(coap, extra, &[])
    }

    /// As [`Daemon::start_custom`], with extra environment variables.
    pub fn start_env(coap: &str, extra: &str, env: &[(&str, &str)]) -> Daemon {
        let p = Prepared::new(coap, extra);
        Daemon::spawn(p.dir, p.config_path, env)
    }

    fn spawn(dir: Arc<tempfile::TempDir>, config_path: PathBuf, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn connectord");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("CONNECTORD_TEST_ECHO").is_some() {
                    eprintln!("[daemon] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut d = Daemon {
            child: Some(child),
            dir,
            config_path,
            rest: SocketAddr::from(([0, 0, 0, 0], 0)),
            coap: SocketAddr::from(([0, 0, 0, 0], 0)),
            key: String::new(),
            logs,
            inbox: Mutex::new(Events::default()),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ready = d
                .logs()
                .iter()
                .any(|l| l.contains("connectord::daemon") && l.ends_with(" ready"));
            if ready {
                break;
            }
            if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "connectord exited during start ({status}):\n{}",
                    d.logs().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "connectord did not start:\n{}",
                d.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d.rest = d.logged_addr("REST API listening on http://");
        d.coap = d.logged_addr("CoAP listening on udp://");
        // Absent when keys were made before the first start (see `Prepared`).
        d.key = std::fs::read_to_string(d.state_dir().join("admin.key"))
            .unwrap_or_default()
            .trim()
            .to_string();
        d
    }

    fn logged_addr(&self, prefix: &str) -> SocketAddr {
        self.logs()
            .iter()
            .rev()
            .find_map(|l| {
                l.split(prefix)
                    .nth(1)
                    .map(|a| a.trim().parse().expect("address"))
            })
            .unwrap_or_else(|| panic!("no '{prefix}' in the log"))
    }

    /// The Lua rules directory of this daemon (watched).
    pub fn scripts_dir(&self) -> PathBuf {
        self.dir.path().join("scripts")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
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

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
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
    pub fn stop_and_restart(mut self) -> Daemon {
        self.signal("TERM");
        assert_eq!(
            self.wait_exit(Duration::from_secs(15)),
            Some(0),
            "a clean stop on SIGTERM"
        );
        Daemon::spawn(Arc::clone(&self.dir), self.config_path.clone(), &[])
    }

    /// SIGTERM, wait for the clean stop, run `edit` on the state directory (as an operator
    /// or a failure between runs would), then start again on it.
    pub fn stop_edit_restart(mut self, edit: impl FnOnce(&Path)) -> Daemon {
        self.signal("TERM");
        assert_eq!(
            self.wait_exit(Duration::from_secs(15)),
            Some(0),
            "a clean stop on SIGTERM"
        );
        edit(&self.dir.path().join("state"));
        Daemon::spawn(Arc::clone(&self.dir), self.config_path.clone(), &[])
    }

    /// `kill -9`, then start again on the same state directory and configuration.
    pub fn crash_and_restart(mut self) -> Daemon {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Daemon::spawn(Arc::clone(&self.dir), self.config_path.clone(), &[])
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
                self.inbox.lock().unwrap().add(&batch);
            }
            let all = self.inbox.lock().unwrap().clone();
            if done(&all) || Instant::now() >= deadline {
                return all;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Forgets the events pulled so far.
    pub fn clear_inbox(&self) {
        *self.inbox.lock().unwrap() = Events::default();
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

    /// Whether the daemon process is still running (it has not exited or been killed).
    pub fn running(&mut self) -> bool {
        self.child
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

/// A state directory and configuration, before the daemon starts (to run CLI commands
/// against them first).
pub struct Prepared {
    pub dir: Arc<tempfile::TempDir>,
    pub config_path: PathBuf,
}

impl Prepared {
    pub fn new(coap: &str, extra: &str) -> Prepared {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let config_path = dir.path().join("connectord.toml");
        std::fs::create_dir_all(dir.path().join("scripts")).expect("scripts dir");
        std::fs::write(&config_path, test_config(dir.path(), coap, extra)).expect("write config");
        Prepared { dir, config_path }
    }

    /// `connectord plugin-call --config <this> <plugin> <op> <input>`; returns its JSON answer.
    pub fn plugin_call(
        &self,
        plugin: &str,
        op: &str,
        input: &serde_json::Value,
    ) -> serde_json::Value {
        plugin_call(&self.config_path, plugin, op, input)
    }

    pub fn start(self) -> Daemon {
        Daemon::spawn(self.dir, self.config_path, &[])
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
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

/// `connectord plugin-call --config <config> <plugin> <op> <input>` (its own process,
/// whether a daemon runs on that state or not); returns its JSON answer.
pub fn plugin_call(
    config: &Path,
    plugin: &str,
    op: &str,
    input: &serde_json::Value,
) -> serde_json::Value {
    let out = Command::new(BIN)
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

/// Builds a plugin crate of this workspace as a `.so` (in a target directory of its own,
/// so as not to wait for the lock of the `cargo test` that runs us) and returns a private
/// copy of it: later builds of other variants overwrite the original.
pub fn build_plugin(package: &str, env: &[(&str, &str)]) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let lock = std::fs::File::create(base.join("plugin-build.lock")).unwrap();
    lock.lock().expect("lock plugin builds");
    let target = base.join("plugin-build");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--quiet", "-p", package])
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("CONNECTORD_EXAMPLE_VARIANT")
        .env_remove("CONNECTORD_EXAMPLE_ABI")
        .env_remove("CONNECTORD_EXAMPLE_PANIC");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "building plugin {package} failed");
    let file = format!("lib{}.so", package.replace('-', "_"));
    let variant: String = env.iter().map(|(k, v)| format!("-{k}={v}")).collect();
    let copy = base.join(format!("{file}{variant}"));
    std::fs::copy(target.join("debug").join(&file), &copy).expect("copy the built plugin");
    copy
}

/// Builds the crate in `dir` (outside this workspace, with this workspace's `Cargo.lock`
/// copied in so that it builds offline with the versions already fetched) into the
/// plugin build's target directory, and returns its `file` (`lib<crate>.so`).
pub fn build_crate_outside(dir: &Path, file: &str) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let lock = std::fs::File::create(base.join("plugin-build.lock")).unwrap();
    lock.lock().expect("lock plugin builds");
    let target = base.join("plugin-build");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(dir)
        .args(["build", "--quiet", "--offline"])
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("run cargo build");
    assert!(
        out.status.success(),
        "building {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("debug").join(file)
}

/// Puts a plugin file into `dir` under its proper name, atomically (write a hidden
/// temporary file, then rename), as a package upgrade would.
pub fn install_plugin(built: &Path, dir: &Path, file_name: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = dir.join(format!(".{file_name}.tmp"));
    std::fs::copy(built, &tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::rename(&tmp, dir.join(file_name)).unwrap();
}
