//! The web console (`/console`, issue 23 item 5): its files over real HTTP (curl: content
//! types, the Content-Security-Policy, revalidation, no key needed), and the console in a
//! real browser (Debian's headless Chromium driven by Playwright,
//! `tests/it/fixtures/console-browser.cjs`) against the real daemon process and a simulated
//! device (`connectord simulate`): log in, the device appearing live with its registration
//! event, search, the object tree named from the OMA definitions, a read shown decoded, a
//! write and a refused write, a 404 of the device, an observation whose plot gets new
//! points; then a key restricted to the other device and without `resources:write`, which
//! sees only that device and whose write is shown refused (403). Screenshots are kept
//! under `target/test-artifacts/console/`.

use crate::support::{self, Daemon, browser};

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The head and body curl got for `GET|HEAD url` with `headers`, without any key.
fn curl(method: &str, url: &str, headers: &[&str]) -> (u16, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--show-error", "--max-time", "20", "-D", "-"]);
    if method == "HEAD" {
        cmd.arg("--head");
    } else {
        cmd.args(["-X", method]);
    }
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().expect("curl (apt-get install curl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(str::trim)
}

#[test]
fn the_console_files_are_public_typed_cached_and_locked_down() {
    let d = Daemon::in_process();
    let base = d.url("/console");
    for (path, ty) in [
        ("", "text/html; charset=utf-8"),
        ("/", "text/html; charset=utf-8"),
        ("/console.js", "text/javascript; charset=utf-8"),
        ("/console.css", "text/css; charset=utf-8"),
        ("/objects.json", "application/json"),
    ] {
        let (status, head, body) = curl("GET", &format!("{base}{path}"), &[]);
        assert_eq!(status, 200, "/console{path}: {head}");
        assert_eq!(header(&head, "content-type"), Some(ty), "{path}");
        let csp = header(&head, "content-security-policy").unwrap_or_default();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(header(&head, "cache-control"), Some("no-cache"));
        assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
        assert!(!body.is_empty());
        // Revalidation: the same ETag is answered 304 without a body.
        let etag = header(&head, "etag").expect("an ETag").to_string();
        let (status, _, body) = curl(
            "GET",
            &format!("{base}{path}"),
            &[&format!("If-None-Match: {etag}")],
        );
        assert_eq!((status, body.as_str()), (304, ""), "{path}");
    }
    // The page names no inline script or style (the policy would block it).
    let (_, _, page) = curl("GET", &base, &[]);
    assert!(
        !page.contains("<script>") && !page.contains("style="),
        "{page}"
    );
    // HEAD, and what is not a console file.
    assert_eq!(curl("HEAD", &base, &[]).0, 200);
    let (status, head, body) = curl("GET", &format!("{base}/nothing.js"), &[]);
    assert_eq!(status, 404, "{head}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["type"],
        "not_found"
    );
    assert_eq!(curl("GET", &format!("{base}/a/b"), &[]).0, 404);
    assert_eq!(curl("GET", &d.url("/v2/console"), &[]).0, 404);
    let (status, head, _) = curl("POST", &base, &[]);
    assert_eq!(status, 405);
    // (`head` is lower-cased.)
    assert_eq!(header(&head, "allow"), Some("get, head"));
    // Data still needs the key.
    assert_eq!(curl("GET", &d.url("/v2/endpoints"), &[]).0, 401);
}

/// `connectord simulate`, killed on drop.
struct Sim(Child);

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn artifacts() -> PathBuf {
    // target/test-artifacts/console (CARGO_TARGET_TMPDIR is target/tmp).
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../test-artifacts/console");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_console_in_a_browser_reads_observes_and_plots() {
    let chromium = browser::chromium();
    let playwright = browser::playwright();
    let d = Daemon::start();
    // A key of the same domain that may see sim-000001 only, and not write.
    let viewer = serde_json::json!({
        "name": "viewer",
        "scopes": ["endpoints:read", "resources:read", "subscriptions:read",
                   "subscriptions:write", "notifications"],
        "allow": ["sim-000001"],
    });
    let r = d.call(
        "POST",
        "/api/api_tokens",
        Some("application/json"),
        Some(viewer.to_string().as_bytes()),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let viewer = r.json()["access_key"]
        .as_str()
        .expect("access_key")
        .to_string();
    let profile = tempfile::tempdir().unwrap();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/it/fixtures/console-browser.cjs");
    let out_dir = artifacts();
    let ep = "sim-000000";
    // Issue 25 review: resource names that are JavaScript prototype keys broke the tree.
    let mut proto = d.device();
    proto.register(
        &["ep=proto-keys", "lt=600"],
        "</3/0/constructor>,</3/0/__proto__>,</3/0/0>",
    );
    // A fleet bigger than the console's list (500 shown), named to sort after the others.
    const BULK: usize = 520;
    let mut bulk = d.device();
    for i in 0..BULK {
        bulk.register(&[&format!("ep=zz-bulk-{i:04}"), "lt=600"], "</3/0>");
    }
    let mut node = Command::new(browser::node())
        .arg(&script)
        .env("PLAYWRIGHT", &playwright)
        .env("CHROMIUM", &chromium)
        .env("CONSOLE_URL", d.url("/console"))
        .env("CONSOLE_KEY", &d.key)
        .env("CONSOLE_EP", ep)
        .env("CONSOLE_VIEWER_KEY", &viewer)
        .env("CONSOLE_VIEWER_EP", "sim-000001")
        .env("CONSOLE_PROTO_EP", "proto-keys")
        .env("CONSOLE_BULK_COUNT", BULK.to_string())
        .env("CONSOLE_BULK_LAST", format!("zz-bulk-{:04}", BULK - 1))
        .env("ARTIFACTS", &out_dir)
        .env("USER_DATA_DIR", profile.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run node");
    let stdout = node.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut sim = None;
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    let result = loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            let _ = node.kill();
            break None;
        };
        eprintln!("console-browser: {line}");
        if line == "WAITING-FOR-DEVICE" {
            // The console is logged in and its event feed runs: the device registers now,
            // so that its registration reaches the feed live.
            let child = Command::new(support::BIN)
                .args(["simulate", "--devices", "2", "--lifetime", "60"])
                .args(["--notify-interval", "300", "--server"])
                .arg(d.coap.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("connectord simulate");
            sim = Some(Sim(child));
        }
        if let Some(ok) = line.strip_prefix("OK ") {
            break Some(ok.to_string());
        }
        lines.push(line);
    };
    let status = node.wait().expect("node");
    drop(sim);
    let result = result.unwrap_or_else(|| {
        panic!(
            "the browser script failed ({status}); screenshots in {}:\n{}",
            out_dir.display(),
            lines.join("\n")
        )
    });
    assert!(status.success(), "{status}");
    let stats: serde_json::Value = serde_json::from_str(&result).unwrap();
    assert_eq!(stats["manufacturer"], "connectord", "{stats}");
    assert_eq!(stats["feed"], "(WebSocket)", "{stats}");
    assert!(stats["points"].as_u64().unwrap_or(0) >= 4, "{stats}");
    assert!(
        stats["forbidden"]
            .as_str()
            .is_some_and(|s| s.contains("resources:write")),
        "{stats}"
    );
    // The WebSocket channel the console made for the admin key was removed at its
    // log-out: the key's long-poll works as before.
    assert_eq!(d.get("/v2/notification/websocket").status, 404);
    assert_eq!(d.get("/v2/notification/pull?noWait=true").status / 100, 2);
    for shot in ["1-login", "2-tree", "3-plot", "4-restricted-key"] {
        let png = out_dir.join(format!("{shot}.png"));
        let meta = std::fs::metadata(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        assert!(meta.len() > 1000, "{}", png.display());
    }
}
