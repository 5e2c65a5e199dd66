//! The testkit (`daemon/testkit`) bound to this package's `connectord` binary, plus what
//! only these tests need: plugin builds under the cargo target directory and the device
//! peers of tests/peers/ ([`peers`]).
#![allow(dead_code)]

pub mod browser;
pub mod certs;
pub mod failover;
pub mod peers;
pub mod pelion;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, ResponseType};
pub use connectord_testkit::{
    Events, Http, Ready, b64, bearer_call, coap, eventually, http, http_get, receiver, test_config,
};
use connectord_testkit::{Launch, StartError};

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_connectord");

/// The tables of requests and events as a database before schema 10 had them (schema 10
/// moved their rows into the journal and dropped them), for a test that sets a database's
/// `user_version` back to replay older migrations.
pub const TABLES_BEFORE_THE_JOURNAL: &str = "
    CREATE TABLE events (
        key_id TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL,
        PRIMARY KEY (key_id, seq)) WITHOUT ROWID;
    CREATE TABLE requests (row INTEGER PRIMARY KEY, data TEXT NOT NULL);";

fn started(r: Result<connectord_testkit::Daemon, StartError>) -> Daemon {
    Daemon(r.unwrap_or_else(|e| panic!("{e}")))
}

/// A running daemon of [`BIN`] with its own state directory ([`connectord_testkit::Daemon`],
/// whose methods it has).
pub struct Daemon(pub connectord_testkit::Daemon);

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with("")
    }

    /// Starts with the test configuration plus `extra` TOML (whole sections).
    pub fn start_with(extra: &str) -> Daemon {
        Daemon::start_custom("", extra)
    }

    /// Starts with `rest` lines added to the `[rest]` section.
    pub fn start_with_rest(rest: &str) -> Daemon {
        started(Launch::new(BIN).rest(rest).start())
    }

    /// Starts with `coap` lines added to the `[coap]` section and `extra` sections.
    pub fn start_custom(coap: &str, extra: &str) -> Daemon {
        Daemon::start_env(coap, extra, &[])
    }

    /// As [`Daemon::start_custom`], with extra environment variables.
    pub fn start_env(coap: &str, extra: &str, env: &[(&str, &str)]) -> Daemon {
        let launch = env
            .iter()
            .fold(Launch::new(BIN).coap(coap).extra(extra), |l, (k, v)| {
                l.env(k, v)
            });
        started(launch.start())
    }

    /// Started in this process (`connectord::daemon::start`, see the testkit's
    /// `Launch::in_process`): for areas that need no signals, no `kill -9`, no log and no
    /// environment of the daemon (tests/it/main.rs says which).
    pub fn in_process() -> Daemon {
        Daemon::in_process_with("")
    }

    /// [`Daemon::in_process`] with the test configuration plus `extra` TOML.
    pub fn in_process_with(extra: &str) -> Daemon {
        started(Launch::new(BIN).extra(extra).in_process().start())
    }

    /// SIGTERM, a clean exit, then start again on the same state directory and
    /// configuration.
    pub fn stop_and_restart(self) -> Daemon {
        Daemon(self.0.stop_and_restart())
    }

    /// SIGTERM, wait for the clean stop, run `edit` on the state directory, then start
    /// again on it.
    pub fn stop_edit_restart(self, edit: impl FnOnce(&Path)) -> Daemon {
        Daemon(self.0.stop_edit_restart(edit))
    }

    /// `kill -9`, then start again on the same state directory and configuration.
    pub fn crash_and_restart(self) -> Daemon {
        Daemon(self.0.crash_and_restart())
    }

    /// A request with the admin key and a JSON body (`Content-Type: application/json`).
    pub fn send_json(&self, method: &str, path: &str, body: impl AsRef<[u8]>) -> Http {
        self.call(method, path, Some("application/json"), Some(body.as_ref()))
    }
}

impl Deref for Daemon {
    type Target = connectord_testkit::Daemon;
    fn deref(&self) -> &connectord_testkit::Daemon {
        &self.0
    }
}

impl DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut connectord_testkit::Daemon {
        &mut self.0
    }
}

/// A state directory and configuration for [`BIN`], before the daemon starts (to run CLI
/// commands against them first).
pub struct Prepared(pub connectord_testkit::Prepared);

impl Prepared {
    pub fn new(coap: &str, extra: &str) -> Prepared {
        Prepared(
            Launch::new(BIN)
                .coap(coap)
                .extra(extra)
                .prepare()
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    pub fn start(self) -> Daemon {
        started(self.0.start())
    }

    /// Starts the daemon in this process (see [`Daemon::in_process`]).
    pub fn start_in_process(self) -> Daemon {
        started(self.0.in_process().start())
    }

    /// [`connectord_testkit::Prepared::plugin_call`], returning the string `field` of its
    /// answer.
    pub fn plugin_call_str(
        &self,
        plugin: &str,
        op: &str,
        input: &serde_json::Value,
        field: &str,
    ) -> String {
        let answer = self.plugin_call(plugin, op, input);
        match answer[field].as_str() {
            Some(s) => s.to_string(),
            None => panic!("{plugin} {op}: no string {field:?} in {answer}"),
        }
    }

    /// A Losant application `name` in the default domain and an API token of it with every
    /// application scope (`all.Application`): (application id, token).
    pub fn losant_app(&self, name: &str) -> (String, String) {
        let app = serde_json::json!({"name": name, "domain": "default"});
        let app = self.plugin_call_str("losant", "create_application", &app, "id");
        let (_, token) = self.losant_token(&app);
        (app, token)
    }

    /// An API token of Losant application `app` with every application scope: (its id,
    /// the token).
    pub fn losant_token(&self, app: &str) -> (String, String) {
        let input = serde_json::json!({"application_id": app, "scopes": ["all.Application"]});
        let made = self.plugin_call("losant", "create_token", &input);
        match (made["id"].as_str(), made["token"].as_str()) {
            (Some(id), Some(token)) => (id.to_string(), token.to_string()),
            _ => panic!("losant create_token: no id and token in {made}"),
        }
    }

    /// The `headerkeys` pair of area `name` as bootstrapped: (rd, wr).
    pub fn headerkeys_pair(&self, name: &str) -> (String, String) {
        let doc = self.plugin_call("headerkeys", "show_keys", &serde_json::json!({}));
        let area = doc["keys"]
            .as_array()
            .and_then(|a| a.iter().find(|k| k["name"] == name))
            .unwrap_or_else(|| panic!("no headerkeys area {name:?} in {doc}"));
        match (area["rd"].as_str(), area["wr"].as_str()) {
            (Some(rd), Some(wr)) => (rd.to_string(), wr.to_string()),
            _ => panic!("headerkeys area {name:?} without rd and wr: {area}"),
        }
    }
}

impl Deref for Prepared {
    type Target = connectord_testkit::Prepared;
    fn deref(&self) -> &connectord_testkit::Prepared {
        &self.0
    }
}

/// `connectord check-config FILE`: whether it called the file valid, and its standard
/// error.
pub fn check_config(file: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(file)
        .output()
        .expect("connectord check-config");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `connectord plugin-call --config <config> <plugin> <op> <input>` (its own process,
/// whether a daemon runs on that state or not); returns its JSON answer.
pub fn plugin_call(
    config: &Path,
    plugin: &str,
    op: &str,
    input: &serde_json::Value,
) -> serde_json::Value {
    connectord_testkit::plugin_call(Path::new(BIN), config, plugin, op, input)
}

/// The plugin builds' directories under the cargo target directory (a target directory of
/// their own, so as not to wait for the lock of the `cargo test` that runs us), held
/// locked against other plugin builds while this lives.
struct PluginBuild {
    base: PathBuf,
    target: PathBuf,
    _lock: std::fs::File,
}

impl PluginBuild {
    /// The directory under the cargo target directory that holds the plugin builds.
    fn base() -> PathBuf {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&base).unwrap();
        base
    }

    fn lock() -> PluginBuild {
        let base = PluginBuild::base();
        let lock = std::fs::File::create(base.join("plugin-build.lock")).unwrap();
        lock.lock().expect("lock plugin builds");
        let target = base.join("plugin-build");
        PluginBuild {
            base,
            target,
            _lock: lock,
        }
    }

    /// `cargo build --quiet` in `dir` into the plugin builds' target directory.
    fn cargo_build(&self, dir: &Path) -> Command {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(dir)
            .args(["build", "--quiet"])
            .env("CARGO_TARGET_DIR", &self.target);
        cmd
    }
}

/// Whether the tests run as root (CI does), who may install Debian packages they need.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// `apt-get install` of `packages` ([`connectord_testkit::apt_install`]); fails the test
/// naming them if it fails. For the peers the tests install themselves as root.
pub fn apt_install(packages: &[&str]) {
    assert!(
        connectord_testkit::apt_install(packages),
        "apt-get install {} failed",
        packages.join(" ")
    );
}

/// This workspace's root directory.
fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The environment variables that make a variant of the example plugin.
const EXAMPLE_VARIANT_VARS: [&str; 4] = [
    "CONNECTORD_EXAMPLE_VARIANT",
    "CONNECTORD_EXAMPLE_ABI",
    "CONNECTORD_EXAMPLE_PANIC",
    "CONNECTORD_EXAMPLE_HANG",
];

/// The plugin crates the daemon links (through the plugin host's built-ins): their
/// `cdylib` is built with every build of the test binary. Not the example plugin, which
/// nothing here depends on (a `cargo test -p connectord` would leave its `.so` stale).
const LINKED_PLUGINS: [&str; 6] = [
    "auth-connector",
    "auth-headerkeys",
    "auth-losant",
    "auth-pelion",
    "sink-webhook",
    "sink-mqtt",
];

/// The `.so` of a plugin crate the daemon links, as the `cargo test` that built this test
/// binary built it (next to the binary, in `target/debug/deps`), when no variant is asked
/// for.
fn built_with_the_tests(package: &str, file: &str, env: &[(&str, &str)]) -> Option<PathBuf> {
    if !env.is_empty() || !LINKED_PLUGINS.contains(&package) {
        return None;
    }
    let deps = std::env::current_exe().ok()?.parent()?.to_path_buf();
    let so = deps.join(file);
    so.is_file().then_some(so)
}

/// A plugin crate of this workspace as a `.so`, as a private copy (later builds of other
/// variants overwrite the original).
///
/// Decision (suite time): the plain build of a plugin the daemon links is the one the
/// workspace's `cargo test` made already ([`built_with_the_tests`]); before, every plugin
/// was built again into a target directory of the tests' own, which for `sink-mqtt` and
/// the auth plugins meant a second debug build of their dependencies (tokio, rustls,
/// rumqttc, hyper: about 900 MB and minutes of CPU on CI's two cores). The example plugin
/// and its variants (other environment variables at build time) are built here (see
/// [`PluginBuild`]); their dependencies are few.
pub fn build_plugin(package: &str, env: &[(&str, &str)]) -> PathBuf {
    let file = format!("lib{}.so", package.replace('-', "_"));
    if let Some(so) = built_with_the_tests(package, &file, env) {
        return private_copy(&so, &PluginBuild::base(), &file, "");
    }
    let build = PluginBuild::lock();
    let mut cmd = build.cargo_build(&workspace_root());
    cmd.args(["-p", package]);
    for v in EXAMPLE_VARIANT_VARS {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "building plugin {package} failed");
    let variant: String = env.iter().map(|(k, v)| format!("-{k}={v}")).collect();
    private_copy(
        &build.target.join("debug").join(&file),
        &build.base,
        &file,
        &variant,
    )
}

/// A copy of `so` in a directory of this call's own under `base`, named `file` +
/// `variant`: a copy at a path shared by the tests that build the same variant was
/// overwritten by another test's build (tests run four at a time), whose bytes need not
/// be the same (`plugins::a_generation_whose_calls_panic_is_rolled_back_to_the_previous
/// _one` then saw another SHA-256 than the one it installed).
fn private_copy(so: &Path, base: &Path, file: &str, variant: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = base
        .join("plugin-copies")
        .join(format!("{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join(format!("{file}{variant}"));
    std::fs::copy(so, &copy).expect("copy the built plugin");
    copy
}

/// Builds the crate in `dir` (outside this workspace, with this workspace's `Cargo.lock`
/// copied in so that it builds offline with the versions already fetched) into the
/// plugin build's target directory, and returns its `file` (`lib<crate>.so`).
pub fn build_crate_outside(dir: &Path, file: &str) -> PathBuf {
    let build = PluginBuild::lock();
    std::fs::copy(workspace_root().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    run_ok(
        build.cargo_build(dir).arg("--offline"),
        &format!("building {}", dir.display()),
    );
    build.target.join("debug").join(file)
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

/// Runs `cmd` to its end and returns its output, asserting that it exited successfully
/// (`what` failed, with its stderr, otherwise).
pub fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stderr}",
        out.status
    );
    out
}

/// The lines a child process writes to stderr, collected as they come.
pub type Lines = Arc<Mutex<Vec<String>>>;

/// Spawns `cmd` (stdin and stdout null, no systemd notify or watchdog variables
/// inherited) and collects its stderr lines on a thread of their own.
pub fn spawn_logged(cmd: &mut Command) -> (Child, Lines) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stderr = child.stderr.take().expect("piped stderr");
    let lines = Lines::default();
    let sink = Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    (child, lines)
}

/// The string `field` of each object of a JSON array (the names in an endpoint list, the
/// paths in a resource list, ...), in order.
pub fn strings_of(list: &serde_json::Value, field: &str) -> Vec<String> {
    let items = list
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"));
    items
        .iter()
        .map(|e| match e[field].as_str() {
            Some(s) => s.to_string(),
            None => panic!("no string {field:?} in {e}"),
        })
        .collect()
}

/// A 2.05 Content (text/plain) with an Observe sequence number, of type `mtype`, with this
/// message id and token: the answer to an observe registration, or a notification.
pub fn observe_content(
    mtype: MessageType,
    mid: u16,
    token: &[u8],
    seq: u32,
    value: &[u8],
) -> Packet {
    let mut p = Packet::new();
    p.header.set_type(mtype);
    p.header.code = MessageClass::Response(ResponseType::Content);
    p.header.message_id = mid;
    p.set_token(token.to_vec());
    p.add_option(CoapOption::Observe, coap::uint(seq));
    p.add_option(CoapOption::ContentFormat, coap::uint(0));
    p.payload = value.to_vec();
    p
}

/// Sends `p` from the device `dev` to `to`.
pub fn send_packet(dev: &coap::Device, p: &Packet, to: SocketAddr) {
    dev.sock.send_to(&p.to_bytes().unwrap(), to).unwrap();
}

/// Waits for `n` cancellations of observations (GET with Observe=1, RFC 7641 §3.6: what
/// the daemon sends when nobody is subscribed to a resource any more), answers each 2.05,
/// and returns their paths and tokens, sorted by path.
pub fn accept_cancels(dev: &coap::Device, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let (req, from) = dev
            .recv_request(std::time::Duration::from_secs(10))
            .expect("no cancellation");
        assert_eq!(
            coap::uint_option(&req, CoapOption::Observe),
            Some(1),
            "GET with Observe=1 for {}",
            coap::path_of(&req)
        );
        dev.reply(&req, from, ResponseType::Content, b"", None, None);
        seen.push((coap::path_of(&req), req.get_token().to_vec()));
    }
    seen.sort();
    seen
}

/// Asserts that the daemon sends `dev` no request within `wait` (`why` it should not).
pub fn no_request(dev: &coap::Device, wait: std::time::Duration, why: &str) {
    if let Some((p, from)) = dev.recv_request(wait) {
        let method = p.header.code;
        panic!("{why}: {from} sent {method:?} {}", coap::path_of(&p));
    }
}

impl Daemon {
    /// Asserts that a log line containing `needle` appears within `timeout`.
    pub fn expect_log(&self, needle: &str, timeout: std::time::Duration) {
        assert!(
            self.wait_log(needle, timeout),
            "no log line with {needle:?}:\n{}",
            self.logs().join("\n")
        );
    }
}

/// The paths the daemon asks `dev` to observe until `window` passes without one, sorted;
/// each observe is answered (2.05, Observe 1, `0`).
///
/// A retransmission (a message id the device saw before from the same address, also in
/// an earlier call) is answered again, as a CoAP endpoint does (RFC 7252 §4.5), but not
/// counted: on a loaded machine the daemon can retransmit an observe whose
/// acknowledgement it has not read yet, and that is one request, not a second
/// observation (the likely cause of `["/3303/0/5700", "/3303/0/5700"]` seen once in CI in
/// `lua::a_re_registration_observes_each_subscription_once`: the retransmission of the
/// first step's observe arriving in the second step's window). A cancellation (GET with
/// Observe=1, of an observation the daemon ends) is answered and not counted either.
pub fn observed_paths(dev: &coap::Device, window: std::time::Duration) -> Vec<String> {
    let mut paths = Vec::new();
    while let Some((req, from)) = dev.recv_request(window) {
        let (mid, token) = (req.header.message_id, req.get_token());
        if coap::uint_option(&req, CoapOption::Observe) == Some(1) {
            // The cancellation of an earlier observation, answered as a plain GET.
            dev.reply(&req, from, ResponseType::Content, b"0", None, None);
            continue;
        }
        if dev.first_time(&req, from) {
            paths.push(coap::path_of(&req));
        }
        let p = observe_content(MessageType::Acknowledgement, mid, token, 1, b"0");
        send_packet(dev, &p, from);
    }
    paths.sort();
    paths
}

impl Daemon {
    /// Registers a new device with `query` and `links`; returns it with the paths the
    /// daemon then asks it to observe ([`observed_paths`] until 600 ms pass without one).
    pub fn register_observed(&self, query: &[&str], links: &str) -> (coap::Device, Vec<String>) {
        let mut dev = self.device();
        dev.register(query, links);
        let paths = observed_paths(&dev, std::time::Duration::from_millis(600));
        (dev, paths)
    }
}

impl Daemon {
    /// Writes a Lua rule file into the scripts directory (atomically, as an editor would)
    /// and waits (10 s at most) until the daemon (re)loaded the rules or counted an error.
    pub fn write_rule(&self, file: &str, body: &str) {
        let loads = || self.metric("lua_reloads_total") + self.metric("lua_errors_total");
        let before = loads();
        let tmp = self.scripts_dir().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, self.scripts_dir().join(file)).unwrap();
        assert!(
            eventually(std::time::Duration::from_secs(10), || loads() > before),
            "the rule file was not (re)loaded:\n{}",
            self.logs().join("\n")
        );
    }
}

impl Daemon {
    /// Pulls (10 s at most) until `n` events of `kind` (`registrations`, `notifications`,
    /// ...) arrived since the last `clear_inbox`; returns those events as a JSON array.
    pub fn events_of(&self, kind: &str, n: usize) -> serde_json::Value {
        let wait = std::time::Duration::from_secs(10);
        let events = self.collect_events(wait, |e| e.of(kind).len() >= n);
        serde_json::Value::Array(events.of(kind))
    }
}

/// Sets `[log] device_lines_per_s` in a prepared daemon's configuration.
pub fn set_device_lines_per_s(p: &Prepared, n: u32) {
    let text = std::fs::read_to_string(&p.config_path).unwrap();
    let text = text.replacen("[log]\n", &format!("[log]\ndevice_lines_per_s = {n}\n"), 1);
    std::fs::write(&p.config_path, &text).unwrap();
}

/// How many per-device lines of the kind the log budget's summaries call `label` they
/// left out, over every summary logged so far.
pub fn summarised(d: &Daemon, label: &str) -> usize {
    d.logs()
        .iter()
        .filter_map(|l| l.split_once("device log lines left out"))
        .filter_map(|(_, rest)| rest.split_once("): ").map(|(_, c)| c.to_string()))
        .flat_map(|counts| {
            counts
                .split(", ")
                .filter_map(|c| c.strip_suffix(&format!(" {label}"))?.parse::<usize>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Waits up to `wait` for the daemon's observe request and answers it (a piggybacked
/// 2.05 with Observe 1 and `value`); the observation's token and the daemon's address.
pub fn answer_observe(
    dev: &coap::Device,
    wait: std::time::Duration,
    value: &[u8],
) -> (Vec<u8>, SocketAddr) {
    let (req, from) = dev.recv_request(wait).expect("the observe request");
    let token = req.get_token().to_vec();
    let first = observe_content(
        MessageType::Acknowledgement,
        req.header.message_id,
        &token,
        1,
        value,
    );
    send_packet(dev, &first, from);
    (token, from)
}

/// Runs `f(0)`, ..., `f(n - 1)` at once, each on its own thread, and gives their results
/// in that order (concurrent requests to one daemon).
pub fn at_once<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let f = &f;
    std::thread::scope(|s| {
        let calls: Vec<_> = (0..n).map(|i| s.spawn(move || f(i))).collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    })
}
