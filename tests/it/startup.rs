//! Start-up checks of the state (issue 19, items 2–4): the daemon refuses to start on a
//! state it cannot use (a corrupt or foreign database, a read-only state directory) or
//! whose files contradict each other (the database gone, keys or CA still there), with a
//! message naming the file and the cause; `run --reinit` is the operator's way past the
//! second. A start that fails leaves the state directory as it was. At run time a failing
//! store is reported (`GET /`, metrics) and answered 503 / 5.03 rather than 500 / 5.00.
//!
//! The read-only and full file system cases mount a small tmpfs over the state directory,
//! which needs root (CI runs as root); they are skipped with a notice otherwise.

use crate::support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coap_lite::{ContentFormat, RequestType, ResponseType};
use support::coap::{Req, code, diag};
use support::{Daemon, Prepared};

const WAIT: Duration = Duration::from_secs(30);

/// Damages a database file (a table case).
type Damage = fn(&Path);

/// Runs `connectord run --config <config> <args>` that is expected to refuse the start:
/// returns its exit code and its standard error (bounded wait; killed past it).
fn run_refused(config: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(support::BIN)
        .args(["run", "--config"])
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("NOTIFY_SOCKET")
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            s.push_str(&l);
            s.push('\n');
        }
        s
    });
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap())
}

/// A daemon started with extra arguments to `run`, until ready: its REST address and log.
struct Started {
    child: std::process::Child,
    logs: Arc<Mutex<Vec<String>>>,
    rest: SocketAddr,
}

impl Started {
    fn new(config: &Path, args: &[&str]) -> Started {
        let ready = config.with_file_name("ready.json");
        let _ = std::fs::remove_file(&ready);
        let (mut child, logs) = support::spawn_logged(
            Command::new(support::BIN)
                .args(["run", "--config"])
                .arg(config)
                .arg("--ready-file")
                .arg(&ready)
                .args(args),
        );
        let deadline = Instant::now() + WAIT;
        loop {
            let lines = logs.lock().unwrap().clone();
            // The address from the ready file; the whole start's log (its last line
            // included) for the tests that read it.
            if ready.exists() && lines.iter().any(|l| l.ends_with(" ready")) {
                let rest = support::Ready::read(&ready).unwrap().rest[0];
                return Started { child, logs, rest };
            }
            if let Some(s) = child.try_wait().unwrap() {
                panic!("exited during start ({s}):\n{}", lines.join("\n"));
            }
            assert!(
                Instant::now() < deadline,
                "not ready:\n{}",
                lines.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        assert!(self.child.wait().unwrap().success(), "{}", self.logs());
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Stops a daemon with SIGTERM and waits for its clean exit.
fn stop(mut d: Daemon) {
    d.signal("TERM");
    assert_eq!(d.wait_exit(Duration::from_secs(15)), Some(0));
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The database gone (or emptied) beside an existing `admin.key` and CA is not a first
/// start: the daemon refuses, names what it found, and overwrites nothing. `--reinit`
/// starts on a new database, keeps the CA and moves the old admin key aside.
#[test]
fn a_missing_or_empty_database_beside_keys_refuses_the_start_unless_reinit() {
    let d = Daemon::start();
    let state = d.state_dir();
    let config = d.config_path.clone();
    let dir = Arc::clone(&d.dir);
    stop(d);
    let key = read(&state.join("admin.key"));
    let ca_key = read(&state.join("ca.key.pem"));
    let ca_cert = read(&state.join("ca.cert.pem"));

    // (how the database is lost, what must be named)
    let cases: [(&str, Damage); 2] = [
        ("missing", |db| std::fs::remove_file(db).unwrap()),
        ("0-byte", |db| std::fs::write(db, b"").unwrap()),
    ];
    for (what, lose) in cases {
        let db = state.join("connectord.db");
        lose(&db);
        let (status, err) = run_refused(&config, &[]);
        assert!(
            matches!(status, Some(c) if c != 0),
            "{what}: {status:?}\n{err}"
        );
        for f in ["admin.key", "ca.key.pem", "ca.cert.pem", "--reinit"] {
            assert!(err.contains(f), "{what}: {f} not named:\n{err}");
        }
        assert!(
            err.contains(&state.join("connectord.db").display().to_string()),
            "{err}"
        );
        assert_eq!(
            read(&state.join("admin.key")),
            key,
            "{what}: admin.key untouched"
        );
        assert_eq!(read(&state.join("ca.key.pem")), ca_key);
        assert_eq!(read(&state.join("ca.cert.pem")), ca_cert);
        // `connectord plugin-call` on the same state refuses too.
        let out = Command::new(support::BIN)
            .args(["plugin-call", "--config"])
            .arg(&config)
            .args(["pelion", "create_user", r#"{"name": "ops"}"#])
            .output()
            .unwrap();
        let perr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: plugin-call: {perr}");
        assert!(perr.contains("--reinit"), "{what}: plugin-call: {perr}");
        // Nothing created by the refused start (the 0-byte file was there already).
        assert_eq!(
            std::fs::metadata(&db).map(|m| m.len()).ok(),
            (what == "0-byte").then_some(0),
            "{what}: the database is as it was"
        );
        let _ = std::fs::remove_file(&db);
    }

    // --reinit: a new database and admin key; the CA kept, the old key moved aside.
    let s = Started::new(&config, &["--reinit"]);
    let new_key = read(&state.join("admin.key"));
    assert_ne!(new_key, key);
    assert_eq!(read(&state.join("ca.key.pem")), ca_key);
    assert_eq!(read(&state.join("ca.cert.pem")), ca_cert);
    let aside: Vec<String> = entries(&state)
        .into_iter()
        .filter(|f| f.starts_with("admin.key.before-reinit-"))
        .collect();
    assert_eq!(aside.len(), 1, "{:?}", entries(&state));
    assert_eq!(read(&state.join(&aside[0])), key);
    assert!(s.logs().contains(&aside[0]), "{}", s.logs());
    let new_key = String::from_utf8(new_key).unwrap();
    let r = support::http_get(&format!("http://{}/v2", s.rest), Some(new_key.trim()), None);
    assert_eq!(r.status, 200, "{r:?}");
    s.stop();
    drop(dir);
}

/// A start that fails (a REST or CoAP port already taken, a plugin named in the
/// configuration that does not exist) creates nothing: no database, no admin key, no CA,
/// no plugin cache.
#[test]
fn a_start_that_fails_leaves_the_state_directory_as_it_was() {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let listen = |section: &str, taken: SocketAddr| {
        (
            format!("[{section}]\nlisten = [\"127.0.0.1:0\"]"),
            format!("[{section}]\nlisten = [\"{taken}\"]"),
            taken.to_string(),
        )
    };
    // (what, replaced in the configuration, by, named in the error)
    let cases = [
        listen("rest", tcp.local_addr().unwrap()),
        listen("coap", udp.local_addr().unwrap()),
        (
            "[lua]".to_string(),
            "[plugins]\nauth = [\"no-such-plugin\"]\n[lua]".to_string(),
            "no-such-plugin".to_string(),
        ),
    ];
    for (from, to, named) in cases {
        let p = Prepared::new("", "");
        let state = p.dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let text = std::fs::read_to_string(&p.config_path).unwrap();
        assert!(text.contains(&from), "{text}");
        std::fs::write(&p.config_path, text.replacen(&from, &to, 1)).unwrap();
        let (status, err) = run_refused(&p.config_path, &[]);
        assert!(
            matches!(status, Some(c) if c != 0),
            "{named}: {status:?}\n{err}"
        );
        assert!(err.contains(&named), "{named}: {err}");
        assert_eq!(entries(&state), Vec::<String>::new(), "{named}: {err}");
    }
}

/// Writes garbage over the pages after the first (the header stays valid, so SQLite opens
/// the file; the tables' pages are junk).
fn corrupt_pages(db: &Path) {
    let mut f = std::fs::OpenOptions::new().write(true).open(db).unwrap();
    let len = f.metadata().unwrap().len();
    assert!(len > 4096 * 3, "a database of several pages ({len})");
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(4096)).unwrap();
    let junk: Vec<u8> = (0..(len - 4096)).map(|i| (i * 7 + 13) as u8).collect();
    f.write_all(&junk).unwrap();
    f.sync_all().unwrap();
}

/// A database that is not one, or whose pages are corrupt, stops the start with a
/// message naming the file and the cause (never READY=1 and then failing writes).
#[test]
fn a_corrupt_or_foreign_database_refuses_the_start_naming_the_file() {
    let cases: [(&str, Damage, &str); 2] = [
        (
            "not a database",
            |db| std::fs::write(db, vec![0x5a; 8192]).unwrap(),
            "not a database",
        ),
        ("corrupt pages", corrupt_pages, "corrupt"),
    ];
    for (what, damage, cause) in cases {
        let mut d = Daemon::start();
        // A few registrations, so the tables have pages of their own.
        for i in 0..20 {
            d.device()
                .register(&[&format!("ep=dev-{i}")], "</3/0>,</3303/0>");
        }
        let state = d.state_dir();
        let config = d.config_path.clone();
        let _dir = Arc::clone(&d.dir);
        d.signal("TERM");
        assert_eq!(d.wait_exit(Duration::from_secs(15)), Some(0));
        let db = state.join("connectord.db");
        // Everything into the database file itself (no WAL left to read pages from).
        let c = rusqlite::Connection::open(&db).unwrap();
        let mode: String = c
            .query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
        drop(c);
        damage(&db);
        let (status, err) = run_refused(&config, &[]);
        assert!(
            matches!(status, Some(c) if c != 0),
            "{what}: {status:?}\n{err}"
        );
        assert!(!err.contains(" ready"), "{what}: {err}");
        assert!(
            err.contains(&db.display().to_string()),
            "{what}: file not named:\n{err}"
        );
        assert!(
            err.to_lowercase().contains(cause),
            "{what}: cause not named:\n{err}"
        );
        // Said once, not repeated by the error chain.
        let first = err.lines().find(|l| l.starts_with("error: ")).unwrap();
        assert_eq!(
            first.matches(&db.display().to_string()).count(),
            1,
            "{first}"
        );
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().unwrap().stdout == b"0\n"
}

/// A tmpfs of `size` mounted over `dir` (root only); unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn new(dir: &Path, size: &str) -> Option<Mount> {
        if !is_root() {
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Mount(dir.to_path_buf()))
    }

    fn remount(&self, opts: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {opts}");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A daemon started on a state directory that is a file system of its own of `size`
/// ([`Mount`]), with that directory; None (the test skipped, saying so) without root and
/// mount, needed to `why`.
fn start_on_own_fs(size: &str, why: &str) -> Option<(Daemon, PathBuf, Mount)> {
    let p = Prepared::new("", "");
    let state = p.dir.path().join("state");
    let Some(mount) = Mount::new(&state, size) else {
        eprintln!("SKIPPED: needs root and mount to {why}");
        return None;
    };
    Some((p.start(), state, mount))
}

/// A state directory on a read-only file system stops the start, naming the database and
/// the cause.
#[test]
fn a_read_only_state_directory_refuses_the_start() {
    let Some((d, state, mount)) =
        start_on_own_fs("16m", "put the state on a read-only file system")
    else {
        return;
    };
    let config = d.config_path.clone();
    let _dir = Arc::clone(&d.dir);
    stop(d);
    mount.remount("ro");
    let (status, err) = run_refused(&config, &[]);
    assert!(matches!(status, Some(c) if c != 0), "{status:?}\n{err}");
    assert!(!err.contains(" ready"), "{err}");
    assert!(
        err.contains(&state.join("connectord.db").display().to_string()),
        "file not named:\n{err}"
    );
    assert!(
        err.to_lowercase().contains("read-only"),
        "cause not named:\n{err}"
    );
}

/// Fills the file system of `dir` with one file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let small = [0u8; 512];
    while f.write_all(&small).is_ok() {}
    path
}

/// A store that fails at run time (its file system full): `GET /` says so (503), the
/// metrics count it, a REST write gets 503 with a JSON message and a registration 5.03;
/// once there is room again the store is healthy again.
#[test]
fn a_failing_store_at_run_time_is_reported_and_answered_503() {
    let Some((d, state, _mount)) = start_on_own_fs("8m", "fill the state's file system") else {
        return;
    };
    assert_eq!(d.get("/").status, 200);
    assert_eq!(d.metric("store_healthy"), 1);
    assert_eq!(d.metric("store_errors_total"), 0);
    let filler = fill(&state);

    // A registration is refused 5.03 (with Max-Age: retry later), never 5.00.
    let mut dev = d.device();
    let mut failed = None;
    for i in 0..50 {
        let mut r = Req::new(RequestType::Post, &["rd"]);
        let q = [format!("ep=full-{i}")];
        let q: Vec<&str> = q.iter().map(String::as_str).collect();
        r.query = &q;
        let links: Vec<String> = (0..40).map(|o| format!("</{}/0>", 3300 + o)).collect();
        let links = links.join(",");
        r.payload = links.as_bytes();
        r.content_format = Some(ContentFormat::ApplicationLinkFormat);
        let resp = dev.request(&r);
        if code(&resp) != ResponseType::Created {
            failed = Some(resp);
            break;
        }
    }
    let resp = failed.expect("a registration fails on a full file system");
    assert_eq!(
        code(&resp),
        ResponseType::ServiceUnavailable,
        "{}",
        diag(&resp)
    );
    assert!(
        support::coap::uint_option(&resp, coap_lite::CoapOption::MaxAge).is_some(),
        "Max-Age says when to retry"
    );

    // Reported by GET / and the metrics.
    let root = d.get("/");
    assert_eq!(root.status, 503, "{root:?}");
    assert!(root.body.starts_with("connectord "), "{}", root.body);
    assert!(root.body.contains("state store"), "{}", root.body);
    assert_eq!(d.metric("store_healthy"), 0);
    assert!(d.metric("store_errors_total") >= 1);

    // A REST write that needs the store: 503 with a JSON message, not 500. And a
    // plugin's route that writes its state (a new access key): 503 too, not the plugin's
    // 500.
    let rules =
        serde_json::json!([{"endpoint-name": "x".repeat(200), "resource-path": ["/3/0/1"]}]);
    let body = serde_json::to_vec(&vec![rules[0].clone(); 300]).unwrap();
    let body_key = serde_json::to_vec(&serde_json::json!({"name": "x".repeat(200)})).unwrap();
    for (method, path, body) in [
        ("PUT", "/v2/subscriptions", &body),
        ("POST", "/api/api_tokens", &body_key),
    ] {
        let r = d.send_json(method, path, body);
        assert_eq!(r.status, 503, "{method} {path}: {r:?}");
        let message = r.json()["message"].as_str().unwrap().to_string();
        assert!(message.contains("state store"), "{method} {path}: {r:?}");
    }

    // Room again: the next write commits and the store is healthy again.
    std::fs::remove_file(&filler).unwrap();
    let r = d.send_json("PUT", "/v2/subscriptions", &body);
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(d.get("/").status, 200);
    assert_eq!(d.metric("store_healthy"), 1);
    let logs = d.logs().join("\n");
    assert!(logs.contains("state store is failing"), "{logs}");
    assert!(logs.contains("state store works again"), "{logs}");
    // One error line for the whole failure (not one per request or batch).
    let errors: Vec<&str> = logs.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert_eq!(errors.len(), 1, "{}", errors.join("\n"));
}

/// `run --ready-file` (what the testkit starts every daemon with): once the daemon serves,
/// the file names the bound addresses (the ports the system chose for port 0), the pid
/// and the version, with no temporary file left beside it; a clean stop removes it.
#[test]
fn the_ready_file_names_the_bound_addresses_and_goes_at_a_clean_stop() {
    let mut d = Daemon::start();
    let ready = d.ready.clone().expect("read at start");
    assert_eq!(ready.pid, d.pid());
    assert_eq!(ready.version, env!("CARGO_PKG_VERSION"));
    assert_eq!((ready.rest.len(), ready.coap.len()), (1, 1));
    assert_ne!(ready.rest[0].port(), 0);
    assert_ne!(ready.coap[0].port(), 0);
    assert_eq!(d.get("/v2/endpoints").status, 200);
    d.device().register(&["ep=ready-file", "lt=300"], "</3/0>");
    assert!(d.get("/v2/endpoints").body.contains("ready-file"));
    let file = d.dir.path().join(connectord_testkit::READY_FILE);
    let beside: Vec<_> = std::fs::read_dir(d.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("ready"))
        .collect();
    assert_eq!(
        beside,
        [connectord_testkit::READY_FILE],
        "only the file itself"
    );
    d.signal("TERM");
    assert_eq!(d.wait_exit(Duration::from_secs(15)), Some(0));
    assert!(!file.exists(), "removed at the clean stop");
}

/// A second daemon on the state directory of a running one (a copied configuration with
/// only its ports changed) refuses to start, naming the directory, and the first serves
/// on; so does `--reinit`, which would move the running daemon's files aside. Found by an
/// outside review: both served one database, each with its own view of the devices.
#[test]
fn a_second_daemon_on_a_state_directory_in_use_refuses_to_start() {
    let d = Daemon::start();
    d.device().register(&["ep=first-one", "lt=300"], "</3/0>");
    for args in [&[][..], &["--reinit"]] {
        let (code, stderr) = run_refused(&d.config_path, args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("another connectord process serves this state directory"),
            "{args:?}: {stderr}"
        );
    }
    assert!(d.get("/v2/endpoints").body.contains("first-one"));
    let state = d.dir.path().join("state");
    assert!(state.join("connectord.db").exists(), "nothing moved aside");
    // Once it is gone (killed: the kernel releases the lock), a new start takes it.
    let d = d.crash_and_restart();
    assert!(d.get("/v2/endpoints").body.contains("first-one"));
}

/// A SIGHUP while the daemon starts neither kills it (found by an outside review: the
/// signal's default action ended the process without a line) nor is lost: the file is
/// re-read once the daemon serves.
#[test]
fn a_sighup_during_the_start_is_taken_once_the_daemon_serves() {
    // A plugin whose `create` never returns holds the start for `start_timeout_s` (then
    // the daemon starts without it): the window the signal is sent in, whatever the
    // machine's speed.
    let hangs = support::build_plugin(
        "example-plugin",
        &[
            ("CONNECTORD_EXAMPLE_HANG", "create"),
            ("CONNECTORD_EXAMPLE_VARIANT", "H"),
        ],
    );
    let plugins = tempfile::tempdir().unwrap();
    let dir = plugins.path().join("plugins");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    support::install_plugin(&hangs, &dir, "libexample_plugin.so");
    let p = Prepared::new(
        "",
        &format!(
            "[plugins]\ndir = \"{}\"\nstart_timeout_s = 3\n",
            dir.display()
        ),
    );
    let ready = p.dir.path().join("hup-ready.json");
    let (mut child, lines) = support::spawn_logged(
        Command::new(support::BIN)
            .args(["run", "--config"])
            .arg(&p.config_path)
            .arg("--ready-file")
            .arg(&ready),
    );
    let pid = child.id().to_string();
    let logged = |needle: &str| lines.lock().unwrap().iter().any(|l| l.contains(needle));
    // The listeners are bound early in the start, before the plugins are made.
    assert!(
        support::eventually(WAIT, || logged("CoAP listening on")),
        "{:?}",
        lines.lock().unwrap()
    );
    assert!(!ready.exists(), "still starting");
    let kill = |sig: &str| {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    kill("HUP");
    assert!(
        support::eventually(WAIT, || logged("SIGHUP: configuration re-read")),
        "{:?}",
        lines.lock().unwrap()
    );
    assert!(ready.exists(), "it serves");
    assert_eq!(child.try_wait().unwrap(), None, "still running");
    kill("TERM");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(Instant::now() < deadline, "did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status, Some(0), "{:?}", lines.lock().unwrap());
}

/// A ready file that cannot be written refuses the start (exit 1, naming it).
#[test]
fn a_ready_file_that_cannot_be_written_refuses_the_start() {
    let p = Prepared::new("", "");
    let path = p.dir.path().join("missing-dir").join("ready.json");
    let (code, err) = run_refused(&p.config_path, &["--ready-file", path.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("--ready-file {}", path.display())),
        "{err}"
    );
    assert!(!err.contains(" ready\n"), "{err}");
}

/// A built-in plugin whose settings it refuses makes the start fail naming its settings
/// and its reason. Before, the start said that no plugin provided `webhook`, at
/// `plugins.sinks`, a key the file did not have (found by an outside review).
#[test]
fn a_built_in_plugin_that_refuses_its_settings_is_named_with_its_reason() {
    let p = Prepared::new("", "[plugins.settings.webhook]\ntimeout_s = \"ten\"\n");
    let (code, err) = run_refused(&p.config_path, &[]);
    assert_eq!(code, Some(1), "{err}");
    // The error line (debug lines of the plugins' stop may follow it).
    let last = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_default();
    assert!(
        last.contains("plugins.settings.webhook")
            && last.contains("the built-in plugin webhook failed to start")
            && last.contains("timeout_s"),
        "{err}"
    );
    assert!(
        !err.contains("no built-in plugin or plugin file provides"),
        "{err}"
    );
}

/// An unusable `[coap]` TLS certificate refuses the start (exit 1) with the key, the
/// file and the cause, each once: a `coap.tls_cert` file that is missing, one that holds
/// no certificate, and a CERTIFICATE block that is not a certificate. In process, the
/// same starts fail with the typed errors (`StartError::CoapTlsFile`,
/// `StartError::CoapTlsCertificate`), their causes as sources.
#[test]
fn an_unusable_coap_tls_certificate_refuses_the_start() {
    use connectord::coap::tls::TlsError;
    use connectord::daemon::StartError as Start;
    use std::error::Error as _;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("server.key");
    crate::support::certs::p256_key(&key);
    let missing = dir.path().join("missing.pem");
    let not_pem = dir.path().join("hello.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let coap = |cert: &Path| {
        format!(
            "listen_tls = [\"127.0.0.1:0\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        )
    };
    for (cert, cause) in [
        (&missing, "No such file or directory"),
        (&not_pem, "no CERTIFICATE block"),
        (&garbage, "with coap.tls_key"),
    ] {
        let named = format!("coap.tls_cert: {}", cert.display());
        let p = Prepared::new(&coap(cert), "");
        let (code, err) = run_refused(&p.config_path, &[]);
        assert_eq!(code, Some(1), "{err}");
        let line = err
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_default();
        assert!(line.contains(&named) && line.contains(cause), "{err}");
        assert_eq!(line.matches(cause).count(), 1, "said once: {line}");

        let e = match connectord_testkit::Launch::new(support::BIN)
            .coap(&coap(cert))
            .in_process()
            .start()
        {
            Err(connectord_testkit::StartError::Daemon(e)) => e,
            Err(e) => panic!("not a daemon start error: {e}"),
            Ok(_) => panic!("{} started", cert.display()),
        };
        match (&e, cause) {
            (Start::CoapTlsFile { key, path, source }, "No such file or directory") => {
                assert_eq!((*key, path), ("tls_cert", cert));
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            (
                Start::CoapTlsCertificate(TlsError::NoCertificate { what }),
                "no CERTIFICATE block",
            ) => {
                assert_eq!(what, &named);
            }
            (Start::CoapTlsCertificate(TlsError::Refused { chain, .. }), "with coap.tls_key") => {
                assert_eq!(chain, &named);
                assert!(e.source().is_some(), "{e:?}: the cause as its source");
            }
            _ => panic!("{}: unexpected {e:?}", cert.display()),
        }
    }
}

/// `coap.tls_cert`/`coap.tls_key` serve the DTLS listeners too: an RSA certificate, fine
/// for TLS, cannot be DTLS's (ECDSA only), and refuses the start naming both files.
#[test]
fn an_rsa_coap_certificate_refuses_a_start_with_dtls() {
    use connectord::daemon::StartError as Start;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("rsa.pem"), dir.path().join("rsa.key"));
    crate::support::certs::openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
    ]);
    let coap = format!(
        "listen_tls = [\"127.0.0.1:0\"]\nlisten_dtls = [\"127.0.0.1:0\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let e = match connectord_testkit::Launch::new(support::BIN)
        .coap(&coap)
        .in_process()
        .start()
    {
        Err(connectord_testkit::StartError::Daemon(e)) => e,
        Err(e) => panic!("not a daemon start error: {e}"),
        Ok(_) => panic!("started with an RSA key for DTLS"),
    };
    let Start::CoapDtlsCertificate {
        cert: c, key: k, ..
    } = &e
    else {
        panic!("unexpected {e:?}");
    };
    assert_eq!((c, k), (&cert, &key));
    let text = e.to_string();
    assert!(
        text.contains(&format!("coap.tls_cert {}", cert.display()))
            && text.contains("for the DTLS listeners"),
        "{text}"
    );
    // `check-config` refuses it too (it called the file valid: a review).
    let file = dir.path().join("c.toml");
    std::fs::write(&file, format!("[coap]\n{coap}")).unwrap();
    let (valid, stderr) = support::check_config(&file);
    assert!(!valid, "{stderr}");
    assert!(stderr.contains("for the DTLS listeners"), "{stderr}");
}
