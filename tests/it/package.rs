//! The Debian package (docs/packaging.md), end to end.
//!
//! - `packaged_config_matches_the_default` and `packaging_files_agree_with_the_code` run
//!   anywhere: the packaged conffile is valid and says what `etc/connectord.toml` says
//!   except the documented differences; the package metadata lists every plugin; the man
//!   page describes every subcommand; the documented build command is the one used here.
//! - `debian_package` needs root (CI runs as root): it builds the package with the
//!   documented command, inspects it, installs it, runs the installed binary with the
//!   installed configuration, plugins and Lua rules and registers a device against it,
//!   verifies the systemd unit, removes the package (the configuration stays) and purges
//!   it, and checks that the system is as it was. As non-root it is skipped with a printed
//!   notice (installing a package needs root); `CONNECTORD_SKIP_PACKAGE_TEST=1` skips it
//!   as root too (also printed).
//!
//! The package build uses its own target directory under `CARGO_TARGET_TMPDIR` (so it
//! does not wait for the lock of the `cargo test` running it), installs cargo-deb into
//! the user's cache directory when it is missing (`cargo_deb_root`), and lowers the release profile's optimisation through
//! `CARGO_PROFILE_RELEASE_*` variables so that it fits in a few minutes on two cores
//! (`CONNECTORD_PACKAGE_TEST_FULL_RELEASE=1` keeps the real release profile).

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The build command of docs/packaging.md, run here exactly (by `sh -c`).
const BUILD_COMMAND: &str = "cargo build --release -p connectord -p auth-connector -p auth-headerkeys \
     -p auth-losant -p auth-pelion -p sink-webhook -p sink-mqtt && cargo deb -p connectord --no-build";

/// The plugin files the package installs (every plugin crate but the example).
const PLUGIN_FILES: [&str; 6] = [
    "libauth_connector.so",
    "libauth_headerkeys.so",
    "libauth_losant.so",
    "libauth_pelion.so",
    "libsink_mqtt.so",
    "libsink_webhook.so",
];

const PLUGIN_DIR: &str = "/usr/lib/connectord/plugins";
const LUA_DIR: &str = "/etc/connectord/scripts";
const CONFIG: &str = "/etc/connectord/connectord.toml";
const UNIT: &str = "/usr/lib/systemd/system/connectord.service";
const BIN: &str = "/usr/bin/connectord";

/// Keys of the packaged configuration whose values differ from etc/connectord.toml
/// (docs/packaging.md, "The configuration"), with their packaged values.
const PACKAGED_VALUES: [(&str, &str); 3] = [
    ("state.dir", STATE_DIR),
    ("lua.dir", LUA_DIR),
    ("plugins.dir", PLUGIN_DIR),
];

/// Keys of the packaged configuration whose values differ from etc/connectord.toml that
/// are not strings (issue 21: secure transports on, plain CoAP for loopback only), with
/// their packaged values as TOML.
const PACKAGED_TOML_VALUES: [(&str, &str); 3] = [
    ("coap.plain", r#""loopback""#),
    ("coap.listen_dtls", r#"["0.0.0.0:5684", "[::]:5684"]"#),
    ("coap.listen_tls", r#"["0.0.0.0:5684", "[::]:5684"]"#),
];

/// The state directory: the unit's `StateDirectory=connectord`, and the packaged
/// configuration's `[state] dir`, so that a start without systemd uses it too.
const STATE_DIR: &str = "/var/lib/connectord";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// Tests that need no root.

/// Every key of a TOML document as a dotted path with its value; tables (also empty
/// ones) appear as their own path with no value, so a section set only in one file shows.
fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, Option<toml::Value>>) {
    for (k, v) in table {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => {
                out.insert(path.clone(), None);
                flatten(&path, t, out);
            }
            other => {
                out.insert(path, Some(other.clone()));
            }
        }
    }
}

fn keys_of(path: &Path) -> BTreeMap<String, Option<toml::Value>> {
    let table: toml::Table = read(path)
        .parse()
        .unwrap_or_else(|e| panic!("{} is not TOML: {e}", path.display()));
    let mut out = BTreeMap::new();
    flatten("", &table, &mut out);
    out
}

#[test]
fn packaged_config_matches_the_default() {
    let packaged = repo().join("packaging/connectord.toml");
    let default = repo().join("etc/connectord.toml");

    support::run_ok(
        Command::new(support::BIN)
            .arg("check-config")
            .arg(&packaged),
        "check-config of packaging/connectord.toml",
    );

    let p = keys_of(&packaged);
    let mut d = keys_of(&default);
    // The documented differences: these keys carry the package layout.
    for (key, value) in PACKAGED_VALUES {
        assert_eq!(
            p.get(key),
            Some(&Some(toml::Value::String(value.into()))),
            "packaging/connectord.toml must set {key} = {value:?}"
        );
        d.insert(key.to_string(), Some(toml::Value::String(value.into())));
    }
    for (key, text) in PACKAGED_TOML_VALUES {
        let value: toml::Table = format!("v = {text}").parse().unwrap();
        let value = value["v"].clone();
        assert_eq!(
            p.get(key),
            Some(&Some(value.clone())),
            "packaging/connectord.toml must set {key} = {text}"
        );
        d.insert(key.to_string(), Some(value));
    }
    let only_packaged: Vec<_> = p.keys().filter(|k| !d.contains_key(*k)).collect();
    let only_default: Vec<_> = d.keys().filter(|k| !p.contains_key(*k)).collect();
    assert!(
        only_packaged.is_empty() && only_default.is_empty(),
        "packaging/connectord.toml and etc/connectord.toml set different keys \
         (only in the packaged one: {only_packaged:?}; only in etc/: {only_default:?}); \
         keep them in step (docs/packaging.md)"
    );
    let differing: Vec<_> = p
        .iter()
        .filter(|(k, v)| d.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}: packaged {v:?}, etc/ {:?}", d[k]))
        .collect();
    assert!(
        differing.is_empty(),
        "packaging/connectord.toml has values that differ from etc/connectord.toml beyond \
         the documented differences; keep them in step (docs/packaging.md):\n{}",
        differing.join("\n")
    );
}

/// The keys of `[cluster]` (issue 22).
const CLUSTER_KEYS: [&str; 6] = [
    "backend",
    "servers",
    "node",
    "prefix",
    "replicas",
    "timeout_ms",
];

/// Issue 22: both shipped configurations show every `[cluster]` key (commented where the
/// default applies) and point to the cluster documentation; with the comment marks taken
/// off those keys (and `backend = "nats"`), the section is a configuration the daemon
/// accepts, so no documented key is one it would refuse.
#[test]
fn the_shipped_configs_document_every_cluster_key() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["etc/connectord.toml", "packaging/connectord.toml"] {
        let text = read(repo().join(file));
        let section = text
            .split("\n[cluster]\n")
            .nth(1)
            .unwrap_or_else(|| panic!("{file} has no [cluster] section"))
            .split("\n[")
            .next()
            .unwrap();
        assert!(
            section.contains("cluster.md"),
            "{file}: [cluster] does not point to the cluster documentation"
        );
        let shown = |line: &str, key: &str| {
            line.trim_start_matches('#')
                .trim_start()
                .starts_with(&format!("{key} ="))
        };
        for key in CLUSTER_KEYS {
            assert!(
                section.lines().any(|l| shown(l, key)),
                "{file}: [cluster] does not show {key}"
            );
        }
        let uncommented: Vec<&str> = section
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if CLUSTER_KEYS.iter().any(|k| shown(rest, k)) => rest,
                _ => l,
            })
            .collect();
        let config = dir.path().join("cluster.toml");
        std::fs::write(
            &config,
            format!("[cluster]\n{}\n", uncommented.join("\n"))
                .replace("backend = \"sqlite\"", "backend = \"nats\""),
        )
        .unwrap();
        let out = Command::new(support::BIN)
            .arg("check-config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: its [cluster] keys, uncommented, are refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn packaging_files_agree_with_the_code() {
    // The package metadata ships every plugin crate of the workspace but the example.
    let manifest: toml::Table = read(repo().join("daemon/Cargo.toml")).parse().unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    let sources: BTreeSet<String> = deb["assets"]
        .as_array()
        .expect("assets")
        .iter()
        .filter_map(|a| a.as_array().and_then(|a| a[0].as_str()).map(String::from))
        .collect();
    let mut plugins = BTreeSet::new();
    for entry in std::fs::read_dir(repo().join("plugins")).unwrap() {
        let path = entry.unwrap().path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let crate_toml: toml::Table = text.parse().unwrap();
        let cdylib = crate_toml
            .get("lib")
            .and_then(|l| l.get("crate-type"))
            .and_then(|t| t.as_array())
            .is_some_and(|t| t.iter().any(|x| x.as_str() == Some("cdylib")));
        let name = crate_toml["package"]["name"].as_str().unwrap().to_string();
        if cdylib && name != "example-plugin" {
            plugins.insert(format!("lib{}.so", name.replace('-', "_")));
        }
    }
    let expected: BTreeSet<String> = PLUGIN_FILES.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        plugins, expected,
        "the plugin crates changed: update [package.metadata.deb] assets in daemon/Cargo.toml, \
         PLUGIN_FILES here and docs/packaging.md"
    );
    for file in &plugins {
        assert!(
            sources.contains(&format!("target/release/{file}")),
            "daemon/Cargo.toml [package.metadata.deb] assets lack target/release/{file}"
        );
    }

    // docs/packaging.md documents the command this test runs.
    let doc = read(repo().join("docs/packaging.md"));
    assert!(
        doc.contains(BUILD_COMMAND),
        "docs/packaging.md must give the build command `{BUILD_COMMAND}`"
    );

    // The man page describes every subcommand of `connectord --help`.
    let help = Command::new(support::BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(!commands.is_empty(), "no commands in --help:\n{help}");
    let man = read(repo().join("packaging/connectord.8"));
    for c in commands {
        let troff = c.replace('-', "\\-");
        let in_synopsis = man.lines().any(|l| l == format!(".B connectord {troff}"));
        // A `.TP` paragraph tagged with the command.
        let described = man.lines().zip(man.lines().skip(1)).any(|(a, b)| {
            a == ".TP"
                && (b == format!(".B {troff}")
                    || b.starts_with(&format!(".BR {troff} "))
                    || b.starts_with(&format!("\\fB{troff}\\fR")))
        });
        assert!(
            in_synopsis && described,
            "packaging/connectord.8 does not describe `connectord {c}` (synopsis: {in_synopsis}, \
             COMMANDS: {described})"
        );
    }

    // The unit runs the packaged paths.
    let unit = read(repo().join("packaging/connectord.service"));
    for line in [
        "Type=notify",
        &format!("ExecStart={BIN} run --config {CONFIG}"),
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=connectord",
        "ConfigurationDirectory=connectord",
        "WatchdogSec=30",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "packaging/connectord.service lacks `{line}`"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The package itself (root).

fn is_root() -> bool {
    // The effective uid is the second field of `Uid:` in /proc/self/status.
    read("/proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap_or(false)
}

/// Whether to run; panics when the test cannot run and was not told to skip.
fn should_run() -> bool {
    if std::env::var("CONNECTORD_SKIP_PACKAGE_TEST").as_deref() == Ok("1") {
        eprintln!(
            "SKIPPED: debian_package (CONNECTORD_SKIP_PACKAGE_TEST=1): the Debian package was \
             not built, installed or tested"
        );
        return false;
    }
    if !is_root() {
        // A developer's `cargo test --workspace` as an ordinary user must not need root;
        // CI runs as root and so always runs this test.
        eprintln!(
            "SKIPPED: debian_package installs a Debian package and runs only as root (CI runs \
             as root); the package was not built, installed or tested"
        );
        return false;
    }
    true
}

/// Progress on stderr with the time since the start.
struct Steps {
    start: Instant,
    logs: PathBuf,
    n: usize,
}

/// What a finished command printed (stdout and stderr together).
struct Ran {
    success: bool,
    code: Option<i32>,
    out: String,
}

impl Steps {
    fn step(&self, what: &str) {
        eprintln!(
            "[package {:>6.1}s] {what}",
            self.start.elapsed().as_secs_f64()
        );
    }

    /// Runs `cmd` with its output in a log file, killing its process group after
    /// `timeout`.
    fn run(&mut self, name: &str, cmd: &mut Command, timeout: Duration) -> Ran {
        self.n += 1;
        let log = self.logs.join(format!("{:02}-{name}.log", self.n));
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {cmd:?}: {e}"));
        let Some(status) = wait_bounded(&mut child, timeout) else {
            panic!(
                "{name} did not finish within {timeout:?}: {cmd:?}\n{}",
                tail(&read(&log), 60)
            );
        };
        let mut out = String::new();
        std::fs::File::open(&log)
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        Ran {
            success: status.success(),
            code: status.code(),
            out,
        }
    }

    /// As [`Steps::run`], asserting success.
    fn run_ok(&mut self, name: &str, cmd: &mut Command, timeout: Duration) -> String {
        let r = self.run(name, cmd, timeout);
        assert!(
            r.success,
            "{name} failed ({:?}): {cmd:?}\n{}",
            r.code,
            tail(&r.out, 60)
        );
        r.out
    }
}

/// Waits for `child` (started with `process_group(0)`) at most `timeout`; past that kills
/// its whole process group and returns None.
fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// dpkg's status of the package (`install ok installed`, `deinstall ok config-files`), or
/// None when dpkg does not know it.
fn dpkg_status() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "connectord"])
        .stderr(Stdio::null())
        .output()
        .expect("run dpkg-query");
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !s.is_empty() && !s.ends_with("not-installed")).then_some(s)
}

/// Paths the package, its maintainer scripts or systemd may create; listed recursively
/// before and after, they must be the same.
const WATCHED: [&str; 7] = [
    "/etc/connectord",
    "/etc/systemd/system",
    "/usr/lib/connectord",
    "/var/lib/connectord",
    "/var/lib/private",
    "/var/lib/systemd",
    "/usr/share/doc/connectord",
];

fn snapshot() -> BTreeSet<PathBuf> {
    fn walk(p: &Path, out: &mut BTreeSet<PathBuf>) {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return;
        };
        out.insert(p.to_path_buf());
        if meta.is_dir() {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                walk(&e.path(), out);
            }
        }
    }
    let mut out = BTreeSet::new();
    for p in WATCHED {
        walk(Path::new(p), &mut out);
    }
    out
}

/// Purges the package and what the test made, on success and on failure alike.
struct Cleanup {
    before: BTreeSet<PathBuf>,
}

impl Cleanup {
    fn run(&self) {
        if dpkg_status().is_some() {
            let status = Command::new("dpkg")
                .args(["--purge", "connectord"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(Stdio::null())
                .process_group(0)
                .spawn()
                .map(|mut c| wait_bounded(&mut c, Duration::from_secs(300)));
            if !matches!(status, Ok(Some(s)) if s.success()) {
                eprintln!("cleanup: dpkg --purge connectord failed ({status:?}); purge it by hand");
            }
        }
        // The test's stand-in for the service's state (see below), should purge have
        // failed to remove it.
        let _ = std::fs::remove_file("/var/lib/connectord");
        let _ = std::fs::remove_dir_all("/var/lib/connectord");
        let _ = std::fs::remove_dir_all("/var/lib/private/connectord");
        // Directories deb-systemd-helper made for its bookkeeping, if empty now.
        for p in snapshot().into_iter().rev() {
            if !self.before.contains(&p) && p.is_dir() {
                let _ = std::fs::remove_dir(&p);
            }
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run();
    }
}

/// Where this test installs cargo-deb when none (3.x) is on `PATH`:
/// `$XDG_CACHE_HOME/connectord-tests/cargo-deb` (`~/.cache/...`), or under the target
/// directory without a home.
///
/// Decision (suite time): a cache of the user's, not the target directory, so that a
/// clean clone (as CI makes) does not build cargo-deb again (41 s of wall time on an idle
/// two-core machine, twice that under the suite's load). It is a tool of the tests, in
/// its own directory, not on `PATH` and not part of the project's build.
fn cargo_deb_root(tmp_base: &Path) -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })
        .map(|c| c.join("connectord-tests").join("cargo-deb"))
        .unwrap_or_else(|| tmp_base.join("cargo-deb"))
}

/// The installed daemon, running in the foreground.
struct Running {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Running {
    fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.logs().into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "connectord exited ({status}) before logging {needle:?}:\n{}",
                    self.logs().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "connectord did not log {needle:?} within {timeout:?}:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} failed");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mode(path: &str) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn debian_package() {
    if !should_run() {
        return;
    }
    let tmp_base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&tmp_base).unwrap();
    let work = tempfile::tempdir().unwrap();
    let logs = work.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut s = Steps {
        start: Instant::now(),
        logs,
        n: 0,
    };

    // One run at a time on this machine: two would install and purge under each other.
    let lock = std::fs::File::create("/tmp/connectord-package-test.lock").unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    while lock.try_lock().is_err() {
        assert!(
            Instant::now() < deadline,
            "another debian_package test held /tmp/connectord-package-test.lock for 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Never touch an installation this test did not make.
    if let Some(status) = dpkg_status() {
        panic!(
            "connectord is already known to dpkg ({status}); this test installs and purges \
             it, so it will not run here. Purge it first (dpkg --purge connectord)."
        );
    }
    for p in [
        "/etc/connectord",
        "/usr/lib/connectord",
        "/var/lib/connectord",
        "/var/lib/private/connectord",
    ] {
        assert!(
            std::fs::symlink_metadata(p).is_err(),
            "{p} exists although connectord is not installed; this test would delete it, \
             so it will not run here"
        );
    }

    // 1. cargo-deb: the one on PATH if it is 3.x, else one installed in the user's cache
    //    directory (see `cargo_deb_root`).
    s.step("cargo-deb");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let cargo_dir = Path::new(&cargo)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let local_root = cargo_deb_root(&tmp_base);
    let path = format!(
        "{}:{cargo_dir}:{}",
        local_root.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let version = Command::new("sh")
        .args(["-c", "cargo deb --version"])
        .env("PATH", &path)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if !version.starts_with("cargo-deb 3.") {
        s.step(&format!(
            "installing cargo-deb 3 (cargo install --locked) into {}",
            local_root.display()
        ));
        s.run_ok(
            "cargo-install-cargo-deb",
            Command::new(&cargo)
                .args([
                    "install",
                    "cargo-deb",
                    "--locked",
                    "--version",
                    "^3",
                    "--root",
                ])
                .arg(&local_root),
            Duration::from_secs(600),
        );
    } else {
        s.step(&format!("using {version}"));
    }

    // 2. The documented build command, in a target directory of its own.
    let target = tmp_base.join("package-build");
    let deb_dir = target.join("debian");
    if deb_dir.exists() {
        for e in std::fs::read_dir(&deb_dir).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "deb") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    }
    s.step(&format!("building: {BUILD_COMMAND}"));
    let mut build = Command::new("sh");
    build
        .args(["-c", BUILD_COMMAND])
        .current_dir(repo())
        .env("PATH", &path)
        .env("CARGO_TARGET_DIR", &target);
    if std::env::var("CONNECTORD_PACKAGE_TEST_FULL_RELEASE").as_deref() != Ok("1") {
        build
            .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "0")
            .env("CARGO_PROFILE_RELEASE_LTO", "off")
            .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "256");
    }
    s.run_ok("build", &mut build, Duration::from_secs(900));
    let debs: Vec<PathBuf> = std::fs::read_dir(&deb_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(
        debs.len(),
        1,
        "expected one .deb in {}: {debs:?}",
        deb_dir.display()
    );
    let deb = debs[0].clone();
    let arch = s.run_ok(
        "arch",
        Command::new("dpkg").arg("--print-architecture"),
        Duration::from_secs(30),
    );
    assert_eq!(
        deb.file_name().unwrap().to_string_lossy(),
        format!(
            "connectord_{}-1_{}.deb",
            env!("CARGO_PKG_VERSION"),
            arch.trim()
        )
    );
    s.step(&format!("built {}", deb.display()));

    // 3. Inspect: control fields, file list and modes, conffiles, maintainer scripts.
    let fields = s.run_ok(
        "dpkg-deb-f",
        Command::new("dpkg-deb").arg("-f").arg(&deb),
        Duration::from_secs(60),
    );
    eprintln!("{fields}");
    let field = |name: &str| -> String {
        fields
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in the control file:\n{fields}"))
            .to_string()
    };
    assert_eq!(field("Package"), "connectord");
    assert_eq!(field("Section"), "net");
    assert!(field("Depends").contains("libc6"), "{}", field("Depends"));
    assert!(
        field("Depends").contains("init-system-helpers"),
        "{}",
        field("Depends")
    );

    let listing = s.run_ok(
        "dpkg-deb-c",
        Command::new("dpkg-deb").arg("-c").arg(&deb),
        Duration::from_secs(60),
    );
    // "-rw-r--r-- root/root  1234 2026-01-01 00:00 ./etc/connectord/connectord.toml"
    let files: BTreeMap<String, (String, String)> = listing
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6).then(|| {
                let path = f[5]
                    .trim_start_matches('.')
                    .trim_end_matches('/')
                    .to_string();
                (path, (f[0].to_string(), f[1].to_string()))
            })
        })
        .collect();
    let expect_file = |path: &str, perms: &str| {
        let (p, owner) = files
            .get(path)
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"));
        assert_eq!(p, perms, "mode of {path}");
        assert!(
            owner == "root/root" || owner == "0/0",
            "owner of {path}: {owner}"
        );
    };
    expect_file(BIN, "-rwxr-xr-x");
    expect_file(PLUGIN_DIR, "drwxr-xr-x");
    for f in PLUGIN_FILES {
        expect_file(&format!("{PLUGIN_DIR}/{f}"), "-rw-r--r--");
    }
    let packaged_plugins: Vec<&String> = files
        .keys()
        .filter(|p| p.starts_with(&format!("{PLUGIN_DIR}/")))
        .collect();
    assert_eq!(
        packaged_plugins.len(),
        PLUGIN_FILES.len(),
        "{packaged_plugins:?}"
    );
    expect_file(CONFIG, "-rw-r--r--");
    let mut lua_files = Vec::new();
    for e in std::fs::read_dir(repo().join("scripts")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".lua") {
            expect_file(&format!("{LUA_DIR}/{name}"), "-rw-r--r--");
            lua_files.push(format!("{LUA_DIR}/{name}"));
        }
    }
    assert!(!lua_files.is_empty(), "scripts/ has no Lua rules to ship");
    expect_file(UNIT, "-rw-r--r--");
    expect_file("/usr/share/man/man8/connectord.8.gz", "-rw-r--r--");
    expect_file("/usr/share/doc/connectord/copyright", "-rw-r--r--");
    expect_file("/usr/share/doc/connectord/packaging.md", "-rw-r--r--");
    for path in files.keys() {
        assert!(
            ["/usr/bin", "/usr/lib", "/usr/share", "/etc"]
                .iter()
                .any(|d| path == d || path.starts_with(&format!("{d}/")))
                || ["", "/usr"].contains(&path.as_str()),
            "unexpected path in the package: {path} (state belongs to systemd's StateDirectory=)"
        );
    }

    let extracted = work.path().join("extracted");
    s.run_ok(
        "dpkg-deb-x",
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted),
        Duration::from_secs(120),
    );
    let inside = |p: &str| extracted.join(p.trim_start_matches('/'));
    assert_eq!(
        read(inside(CONFIG)),
        read(repo().join("packaging/connectord.toml")),
        "the packaged config is packaging/connectord.toml"
    );
    assert_eq!(
        read(inside(UNIT)),
        read(repo().join("packaging/connectord.service")),
        "the packaged unit is packaging/connectord.service"
    );

    let control = work.path().join("control");
    s.run_ok(
        "dpkg-deb-e",
        Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control),
        Duration::from_secs(60),
    );
    let conffiles: BTreeSet<String> = read(control.join("conffiles"))
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let mut want: BTreeSet<String> = lua_files.iter().cloned().collect();
    want.insert(CONFIG.into());
    assert_eq!(conffiles, want, "conffiles");
    for script in ["preinst", "postinst", "prerm", "postrm"] {
        let path = control.join(script);
        if path.exists() {
            assert_eq!(mode(path.to_str().unwrap()), 0o755, "mode of {script}");
            s.run_ok(
                &format!("sh-n-{script}"),
                Command::new("sh").arg("-n").arg(&path),
                Duration::from_secs(30),
            );
            assert!(
                !read(&path).contains("#DEBHELPER#"),
                "{script} kept #DEBHELPER#"
            );
        }
    }
    let postinst = read(control.join("postinst"));
    assert!(
        postinst.contains("deb-systemd-helper enable connectord.service"),
        "postinst does not enable the unit:\n{postinst}"
    );
    assert!(
        postinst.contains("deb-systemd-invoke $_dh_action connectord.service"),
        "postinst does not start the unit:\n{postinst}"
    );
    // Without systemd (a container) nothing starts the service: postinst says so and how
    // to start the daemon.
    for needle in [
        "[ ! -d /run/systemd/system ]",
        "the service was\nnot started",
        &format!("connectord run --config {CONFIG}"),
        &format!("{STATE_DIR}/admin.key"),
    ] {
        assert!(
            postinst.contains(needle),
            "postinst lacks {needle:?}:\n{postinst}"
        );
    }
    let postrm = read(control.join("postrm"));
    assert!(
        postrm.contains("rm -rf /var/lib/private/connectord"),
        "{postrm}"
    );
    assert!(
        postrm.contains("deb-systemd-helper purge connectord.service"),
        "{postrm}"
    );

    // 4. Install. From here on the guard purges whatever happens.
    let cleanup = Cleanup { before: snapshot() };
    s.step("apt-get install");
    let installed_out = s.run_ok(
        "apt-get-install",
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "-o",
                "DPkg::Lock::Timeout=120",
            ])
            .arg(&deb)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        Duration::from_secs(300),
    );
    assert_eq!(dpkg_status().as_deref(), Some("install ok installed"));
    let systemd = Path::new("/run/systemd/system").exists();
    assert_eq!(
        // dpkg passes the maintainer script's lines on with CR LF.
        installed_out
            .replace('\r', "")
            .contains("so the service was\nnot started"),
        !systemd,
        "the not-started notice is printed exactly when systemd is not running ({systemd}):\n{installed_out}"
    );
    assert_eq!(mode(BIN), 0o755);
    assert_eq!(mode(PLUGIN_DIR), 0o755);
    for f in PLUGIN_FILES {
        let p = format!("{PLUGIN_DIR}/{f}");
        assert_eq!(mode(&p), 0o644, "{p}");
        assert_eq!(std::fs::metadata(&p).unwrap().uid(), 0, "{p} is root's");
    }
    let wants = "/etc/systemd/system/multi-user.target.wants/connectord.service";
    let link = std::fs::read_link(wants)
        .unwrap_or_else(|e| panic!("the unit is not enabled ({wants}: {e})"));
    assert!(
        link.ends_with("systemd/system/connectord.service"),
        "{wants} -> {}",
        link.display()
    );
    let help = s.run_ok(
        "help",
        Command::new(BIN).arg("--help"),
        Duration::from_secs(30),
    );
    for c in ["run", "check-config", "default-config", "plugin-call"] {
        assert!(help.contains(c), "--help does not mention {c}:\n{help}");
    }
    if Path::new("/usr/bin/man").exists() {
        let page = s.run_ok(
            "man-w",
            Command::new("man").args(["-w", "8", "connectord"]),
            Duration::from_secs(30),
        );
        assert!(
            page.trim().ends_with("man8/connectord.8.gz"),
            "man -w: {page}"
        );
    }

    // 5. check-config on the installed file (explicitly and as the default path).
    s.step("connectord check-config");
    let out = s.run_ok(
        "check-config",
        Command::new(BIN).args(["check-config", CONFIG]),
        Duration::from_secs(30),
    );
    assert!(out.contains("configuration is valid"), "{out}");
    s.run_ok(
        "check-config-default",
        Command::new(BIN).arg("check-config"),
        Duration::from_secs(30),
    );

    // 6. Run the installed binary on the installed configuration, plugins and Lua rules,
    //    as root and without systemd (no $STATE_DIRECTORY), as the postinst notice says:
    //    only the listen addresses change (ports may be busy); the state goes to the
    //    documented /var/lib/connectord.
    s.step("running the installed daemon");
    let installed = read(CONFIG);
    let rest_line = "listen = [\"127.0.0.1:8080\"]";
    let coap_line = "listen = [\"0.0.0.0:5683\", \"[::]:5683\"]";
    assert_eq!(installed.matches(rest_line).count(), 1, "REST listen line");
    assert_eq!(installed.matches(coap_line).count(), 1, "CoAP listen line");
    let config = work.path().join("connectord.toml");
    std::fs::write(
        &config,
        installed
            .replace(rest_line, "listen = [\"127.0.0.1:0\"]")
            .replace(coap_line, "listen = [\"127.0.0.1:0\"]"),
    )
    .unwrap();
    let state = PathBuf::from(STATE_DIR);
    let ready = work.path().join("ready.json");
    let (child, lines) = support::spawn_logged(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready)
            .current_dir(work.path())
            .env_remove("STATE_DIRECTORY"),
    );
    let mut daemon = Running { child, logs: lines };
    daemon.wait_log(
        &format!("connectord {} ready", env!("CARGO_PKG_VERSION")),
        Duration::from_secs(30),
    );
    // The ready file was written just before that line.
    let ready = support::Ready::read(&ready).unwrap();
    let (rest, coap) = (ready.rest[0], ready.coap[0]);
    // The packaged configuration enables the connector backend and both sinks: those
    // files are started, once (no built-in of their name first); the other backends are
    // not started at all (no keys made or announced for them).
    for f in PLUGIN_FILES {
        if [
            "libauth_connector.so",
            "libsink_mqtt.so",
            "libsink_webhook.so",
        ]
        .contains(&f)
        {
            daemon.wait_log(
                &format!("({PLUGIN_DIR}/{f}, generation"),
                Duration::from_secs(1),
            );
        } else {
            daemon.wait_log(
                &format!("({PLUGIN_DIR}/{f}) is not named in [plugins] auth: not started"),
                Duration::from_secs(1),
            );
        }
    }
    let log = daemon.logs().join("\n");
    assert!(!log.contains("refusing plugins"), "{log}");
    assert!(
        !log.contains("origin=built-in"),
        "a built-in was started: {log}"
    );
    assert!(!log.contains("generated random keys"), "{log}");
    let lua = daemon.wait_log("Lua rules in force", Duration::from_secs(1));
    assert!(lua.contains(LUA_DIR), "{lua}");
    for f in &lua_files {
        let name = Path::new(f)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(lua.contains(&name), "{name} is not in force: {lua}");
    }
    let key_file = state.join("admin.key");
    let first = daemon.wait_log(
        "first start: created an admin access key",
        Duration::from_secs(1),
    );
    assert!(first.contains(&key_file.display().to_string()), "{first}");
    assert_eq!(
        mode(key_file.to_str().unwrap()) & 0o077,
        0,
        "admin.key is private"
    );
    assert_eq!(mode(STATE_DIR) & 0o077, 0, "{STATE_DIR} is private");
    let key = read(&key_file).trim().to_string();

    let mut device = support::coap::Device::new(coap);
    let location = device.register(
        &["ep=package-test-device", "lt=300"],
        "</3/0>,</3303/0/5700>;obs",
    );
    assert!(!location.is_empty());
    // The connector auth backend that checks the key is the plugin file loaded above.
    let url = format!("http://{rest}/v2/endpoints");
    let mut last = None;
    let listed = support::eventually(Duration::from_secs(10), || {
        let r = support::http_get(&url, Some(&key), None);
        let ok = r.status == 200
            && r.json()
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e["name"] == "package-test-device"));
        last = Some(r);
        ok
    });
    assert!(listed, "the device is not listed: {last:?}");

    daemon.signal("HUP");
    daemon.wait_log(
        "SIGHUP: configuration re-read from",
        Duration::from_secs(10),
    );
    daemon.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "connectord did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "connectord exited with {status} on SIGTERM"
    );
    drop(daemon);
    s.step("device registered and listed; reload and stop worked");

    // 7. The unit, as systemd reads it.
    if Path::new("/usr/bin/systemd-analyze").exists() {
        s.step("systemd-analyze verify");
        let man = if Path::new("/usr/bin/man").exists() {
            "--man=yes"
        } else {
            "--man=no"
        };
        let out = s.run_ok(
            "systemd-analyze-verify",
            Command::new("systemd-analyze").args(["verify", man, UNIT]),
            Duration::from_secs(60),
        );
        assert!(
            out.trim().is_empty(),
            "systemd-analyze verify complains:\n{out}"
        );
        let out = s.run_ok(
            "systemd-analyze-security",
            Command::new("systemd-analyze").args([
                "security",
                "--offline=true",
                "--no-pager",
                UNIT,
            ]),
            Duration::from_secs(60),
        );
        let level = out
            .lines()
            .find_map(|l| {
                l.split("Overall exposure level for connectord.service: ")
                    .nth(1)
            })
            .unwrap_or_else(|| panic!("no exposure level:\n{out}"));
        eprintln!("systemd-analyze security: {level}");
        let score: f64 = level.split_whitespace().next().unwrap().parse().unwrap();
        assert!(
            score <= 2.0,
            "the unit's exposure level rose to {level}:\n{out}"
        );
    } else {
        s.step("systemd-analyze not found: unit not verified");
    }

    // 8. Remove: the configuration stays.
    s.step("apt-get remove");
    s.run_ok(
        "apt-get-remove",
        Command::new("apt-get")
            .args([
                "remove",
                "-y",
                "-o",
                "DPkg::Lock::Timeout=120",
                "connectord",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        Duration::from_secs(300),
    );
    assert_eq!(dpkg_status().as_deref(), Some("deinstall ok config-files"));
    assert_eq!(
        read(CONFIG),
        read(repo().join("packaging/connectord.toml")),
        "config kept"
    );
    for f in &lua_files {
        assert!(Path::new(f).exists(), "{f} was removed with the package");
    }
    assert!(!Path::new(BIN).exists(), "{BIN} is still there");
    assert!(
        !Path::new(PLUGIN_DIR).exists(),
        "{PLUGIN_DIR} is still there"
    );

    // 9. Purge: configuration and the service's state go. systemd's StateDirectory= with
    //    DynamicUser=yes would have made /var/lib/private/connectord and the symlink
    //    /var/lib/connectord; stand in for it.
    //    The run of step 6 (no systemd) left a real /var/lib/connectord, which purge
    //    removes as well.
    std::fs::create_dir_all("/var/lib/private/connectord").unwrap();
    std::fs::write("/var/lib/private/connectord/admin.key", "stand-in\n").unwrap();
    assert!(Path::new(STATE_DIR).join("connectord.db").exists());
    s.step("dpkg --purge");
    s.run_ok(
        "dpkg-purge",
        Command::new("dpkg")
            .args(["--purge", "connectord"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        Duration::from_secs(300),
    );
    assert_eq!(dpkg_status(), None, "connectord is still known to dpkg");
    for p in [
        "/etc/connectord",
        "/var/lib/connectord",
        "/var/lib/private/connectord",
        wants,
    ] {
        assert!(
            std::fs::symlink_metadata(p).is_err(),
            "{p} survived the purge"
        );
    }
    cleanup.run();
    let after = snapshot();
    let added: Vec<_> = after.difference(&cleanup.before).collect();
    let removed: Vec<_> = cleanup.before.difference(&after).collect();
    assert!(
        added.is_empty() && removed.is_empty(),
        "the system changed: added {added:?}, removed {removed:?}"
    );
    s.step("done: installed, ran, removed (config kept), purged (system as before)");
}
