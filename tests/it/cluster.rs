//! Issue 22: the daemon on NATS JetStream (`[cluster] backend = "nats"`). Each test starts
//! its own nats-server on its own loopback ports (`connectord_testkit::nats`, never 4222)
//! and the daemons as processes on temporary state directories.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use connectord_testkit::nats::NatsServer;
use serde_json::json;

use crate::support::{self, Daemon, Prepared, bearer_call};

pub(crate) const LINKS: &str = "</1/0>,</3/0>,</3303/0/5700>;obs,</5/0>";
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// The `[cluster]` section of a node `node` on `servers`.
pub(crate) fn cluster(servers: &[String], node: &str) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("{s:?}")).collect();
    // No bound on failed authentications per address: the tests poll one node with a key
    // made on another until it works there, and its 401s meanwhile (from 127.0.0.1, as
    // every test's) would count towards it (`connections::` tests the bound).
    // `[cluster]` last: callers append keys to it.
    format!(
        "[rest]\nauth_failures_per_minute = 0\n[cluster]\nbackend = \"nats\"\nservers = [{}]\nnode = \"{node}\"\ntimeout_ms = 2000\n",
        servers.join(", ")
    )
}

/// Copies the CA of `from` (a state directory) into `to`, as the operator does
/// (docs/cluster.md).
pub(crate) fn copy_ca(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["ca.key.pem", "ca.cert.pem"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// A second node on `server`, with the CA of `first` copied into its state directory, and
/// `first`'s admin key (it writes none itself: the cluster holds keys already).
pub(crate) fn second_node(server: &NatsServer, first: &Daemon, node: &str, extra: &str) -> Daemon {
    let p = Prepared::new("", &format!("{}{extra}", cluster(&[server.url()], node)));
    copy_ca(&first.state_dir(), &p.0.dir.path().join("state"));
    let mut d = p.start();
    assert!(
        !d.state_dir().join("admin.key").exists(),
        "a later node writes no admin key"
    );
    d.key = first.key.clone();
    d
}

pub(crate) fn members(d: &Daemon) -> Vec<String> {
    let r = d.get("/v2/cluster");
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["node"].as_str().unwrap().to_string())
        .collect()
}

/// A key created through REST on node 1 works on node 2 (the plugin state's watch moves
/// `Feed::external_changes`, and node 2 reloads its auth plugins on it); how long it took
/// is printed. Both nodes list each other in `GET /v2/cluster` and count them in
/// `/metrics`; a clean stop leaves the membership at once.
#[test]
fn a_key_created_on_one_node_works_on_another_within_a_second() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    assert!(!n1.key.is_empty(), "the first node writes admin.key");
    let n2 = second_node(&server, &n1, "n2", "");

    let r = n1.send_json("POST", "/api/api_tokens", json!({"name": "k"}).to_string());
    assert_eq!(r.status, 201, "{}", r.body);
    let key = r.json()["access_key"].as_str().unwrap().to_string();
    let t = Instant::now();
    loop {
        let r = bearer_call(&n2, "GET", "/v2/endpoints", Some(&key), None);
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 401, "{}", r.body);
        assert!(t.elapsed() < WAIT, "the key made on n1 never worked on n2");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("a key made on n1 worked on n2 after {:?}", t.elapsed());
    assert!(n2.wait_log("or another cluster node", WAIT));

    // Membership: both, on both, within two heartbeats.
    let t = Instant::now();
    while members(&n1) != ["n1", "n2"] || members(&n2) != ["n1", "n2"] {
        assert!(t.elapsed() < WAIT, "{:?} {:?}", members(&n1), members(&n2));
        std::thread::sleep(Duration::from_millis(100));
    }
    let body = n2.get("/v2/cluster").json();
    assert_eq!(
        (body["backend"].as_str(), body["node"].as_str()),
        (Some("nats"), Some("n2"))
    );
    let n1_record = &body["members"][0];
    assert_eq!(n1_record["rest"][0], n1.rest.to_string());
    assert_eq!(n1_record["coap"][0], n1.coap.to_string());
    assert_eq!(n2.metric("cluster_members"), 2);
    // Scoped like /metrics: no key, no answer.
    assert_eq!(
        bearer_call(&n2, "GET", "/v2/cluster", None, None).status,
        401
    );

    // A clean stop leaves at once (not after the record's 6 s).
    let mut n2 = n2;
    n2.signal("TERM");
    assert_eq!(n2.wait_exit(WAIT), Some(0));
    let t = Instant::now();
    while members(&n1) != ["n1"] {
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", members(&n1));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SQLite (the default): the cluster is this node.
#[test]
fn a_sqlite_node_is_its_own_cluster() {
    let d = Daemon::start_with("[cluster]\nnode = \"solo\"\n");
    let body = d.get("/v2/cluster").json();
    assert_eq!(body["backend"], "sqlite");
    assert_eq!(body["node"], "solo");
    assert_eq!(body["members"].as_array().unwrap().len(), 1);
    assert_eq!(body["members"][0]["rest"][0], d.rest.to_string());
    assert_eq!(d.metric("cluster_members"), 1);
}

/// No NATS server answers: the start is refused within the timeout with one line naming
/// the servers, and nothing is left in the state directory but what the CA check needs
/// none of (no database, no admin key).
#[test]
fn a_nats_node_refuses_to_start_when_no_server_answers() {
    // A port nobody listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let p = Prepared::new("", &cluster(std::slice::from_ref(&url), "lonely"));
    let t = Instant::now();
    let mut child = Command::new(support::BIN)
        .args(["run", "--config"])
        .arg(&p.0.config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("still starting after 15 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t.elapsed();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("cannot use NATS JetStream"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains(&url) && lines[0].contains("cluster.servers"),
        "{stderr}"
    );
    println!("refused after {took:?}: {}", lines[0]);
    let state = p.0.dir.path().join("state");
    assert!(!state.join("connectord.db").exists());
    assert!(!state.join("admin.key").exists());
}

/// A second process with a node name that a live node has (a copied configuration) is
/// refused at start, naming the name and the live node's REST address. Before, it
/// started, took the first node's devices and channels and expired its live devices
/// (found by an outside review). A node restarted right after `kill -9` (its old record
/// still fresh, but no longer beating) starts.
#[test]
fn a_second_process_with_a_live_nodes_name_is_refused() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let p = Prepared::new("", &cluster(&[server.url()], "n1"));
    copy_ca(&n1.state_dir(), &p.0.dir.path().join("state"));
    let e = match p.0.start() {
        Ok(_) => panic!("a second process named n1 started"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("another process runs as node n1"), "{e}");
    assert!(e.contains(&n1.rest.to_string()), "names the live node: {e}");
    // The live node is unharmed, and a restart of it after kill -9 is not refused.
    assert_eq!(n1.get("/v2/endpoints").status, 200);
    let t = Instant::now();
    let n1 = n1.crash_and_restart();
    println!("restarted after kill -9 in {:?}", t.elapsed());
    assert_eq!(n1.get("/v2/endpoints").status, 200);
}

/// On NATS, a request body must fit one NATS message with its record: one above that is
/// 413 like one above `requests.max_body`, and the store does not fail. Before, a body
/// between about 780 KiB and `requests.max_body` (1 MiB) sent to the owner was answered
/// 503 and logged as a failing store (found by an outside review).
#[test]
fn a_body_too_big_for_one_nats_message_is_413_not_a_failing_store() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    n1.device().register(&["ep=big", "lt=300"], "</1/0/1>");
    let put = |n: usize| {
        n1.call(
            "PUT",
            "/v2/endpoints/big/1/0/1",
            Some("text/plain"),
            Some(&vec![b'x'; n]),
        )
    };
    let r = put(800_000);
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body.contains("NATS message"), "{}", r.body);
    // A body that fits is taken, and the store never failed.
    let r = put(700_000);
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(n1.get("/").status, 200);
    assert!(
        !n1.logs()
            .iter()
            .any(|l| l.contains("state store is failing")),
        "the store failed"
    );
}

/// A node whose CA is not the cluster's is refused, naming both fingerprints and the
/// files to copy; with the CA copied it starts.
#[test]
fn a_node_with_another_ca_is_refused() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let p = Prepared::new("", &cluster(&[server.url()], "n2"));
    let e = match p.0.start() {
        Ok(_) => panic!("a node with its own CA started"),
        Err(e) => e.to_string(),
    };
    let ca = std::fs::read(n1.state_dir().join("ca.cert.pem")).unwrap();
    let der = x509_der(&ca);
    let recorded: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    assert!(e.contains("is not the cluster's"), "{e}");
    assert!(e.contains(&recorded), "the cluster's fingerprint: {e}");
    assert!(
        e.contains("Copy ca.key.pem and ca.cert.pem"),
        "says what to copy: {e}"
    );
    // With the CA copied, the same node starts, and a certificate from /api/cert on n1
    // verifies against n2's CA (the same certificate file).
    let n2 = second_node(&server, &n1, "n2", "");
    let dir = tempfile::tempdir().unwrap();
    support::certs::device_certificate(&n1, dir.path());
    let n2_ca = n2.state_dir().join("ca.cert.pem");
    let ok = support::certs::openssl(&[
        "verify",
        "-CAfile",
        support::certs::path(&n2_ca),
        support::certs::path(&dir.path().join("device.pem")),
    ]);
    assert!(ok.contains(": OK"), "{ok}");
}

/// The DER of the first certificate of a PEM text.
fn x509_der(pem: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let text = String::from_utf8_lossy(pem);
    let b64: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

/// A plugin's state calls on a NATS node do not hang the daemon with one runtime worker
/// (the NATS store answers on a runtime of its own): a key made through REST works, and
/// `connectord plugin-call` against the same cluster makes a key that the running node
/// takes within seconds.
#[test]
fn plugin_calls_on_a_nats_node_with_one_worker_do_not_hang() {
    let server = NatsServer::start().unwrap();
    let extra = format!(
        "{}[runtime]\nworker_threads = 1\n",
        cluster(&[server.url()], "one")
    );
    let d = Daemon::start_with(&extra);
    let r = d.send_json(
        "POST",
        "/api/api_tokens",
        json!({"name": "rest"}).to_string(),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let rest_key = r.json()["access_key"].as_str().unwrap().to_string();
    assert_eq!(
        bearer_call(&d, "GET", "/v2/endpoints", Some(&rest_key), None).status,
        200
    );
    // plugin-call as its own process, on the cluster's state, bounded.
    let body = json!({"name": "cli", "domain": "default", "scopes": ["endpoints:read"]});
    let mut child = Command::new(support::BIN)
        .args(["plugin-call", "--config"])
        .arg(&d.config_path)
        .args(["connector", "create_key", &body.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("plugin-call on NATS hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cli_key = answer["access_key"].as_str().unwrap().to_string();
    let t = Instant::now();
    while bearer_call(&d, "GET", "/v2/endpoints", Some(&cli_key), None).status != 200 {
        assert!(t.elapsed() < WAIT, "the plugin-call key never worked");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Still serving.
    assert_eq!(
        bearer_call(&d, "GET", "/v2/endpoints", Some(&rest_key), None).status,
        200
    );
}

/// A NATS node killed with -9 and restarted finds, in the cluster's state, the device's
/// registration, a subscription and a queued request, and delivers the request.
#[test]
fn a_nats_node_killed_with_9_restarts_on_the_shared_state() {
    let server = NatsServer::start().unwrap();
    let d = Daemon::start_with(&cluster(&[server.url()], "phoenix"));
    let mut dev = d.device();
    let reg = dev.register(&["ep=durable", "lt=300", "b=UQ"], LINKS);
    let r = d.call("PUT", "/v2/subscriptions/durable/3303/0/5700", None, None);
    assert!((200..300).contains(&r.status), "{} {}", r.status, r.body);
    let id = d.async_request("GET", "/v2/endpoints/durable/3/0/0", None, None);
    let d = d.crash_and_restart();
    let logs = d.logs().join("\n");
    assert!(logs.contains("loaded 1 stored registrations"), "{logs}");
    assert!(logs.contains("state in NATS JetStream"), "{logs}");
    let eps = d.get("/v2/endpoints").json();
    assert_eq!(eps[0]["name"], "durable", "{eps}");
    let subs = d.get("/v2/subscriptions/durable").body;
    assert!(subs.contains("/3303/0/5700"), "{subs}");
    // The device wakes (an update from a new socket to the restarted node): the queued
    // request reaches it and its answer the key's channel.
    dev.server = d.coap;
    let mut seen = Vec::new();
    let update = dev.build(&support::coap::Req::new(
        coap_lite::RequestType::Post,
        &["rd", &reg],
    ));
    dev.send_raw(&update.to_bytes().unwrap());
    let deadline = Instant::now() + WAIT;
    while !seen.iter().any(|p: &String| p == "/3/0/0") {
        assert!(
            Instant::now() < deadline,
            "the queued request never came: {seen:?}"
        );
        let Some((req, from)) = dev.recv_request(WAIT) else {
            continue;
        };
        let path = support::coap::path_of(&req);
        dev.reply(
            &req,
            from,
            coap_lite::ResponseType::Content,
            path.as_bytes(),
            None,
            None,
        );
        seen.push(path);
    }
    assert_eq!(
        d.async_response(&id, WAIT)["payload"],
        support::b64(b"/3/0/0")
    );
}

/// `[cluster]` is read at start only: SIGHUP names it as needing a restart, and the node
/// keeps its name.
#[test]
fn sighup_says_the_cluster_section_needs_a_restart() {
    let d = Daemon::start_with("[cluster]\nnode = \"before\"\n");
    let text = std::fs::read_to_string(&d.config_path).unwrap();
    std::fs::write(
        &d.config_path,
        text.replace("node = \"before\"", "node = \"after\""),
    )
    .unwrap();
    d.signal("HUP");
    d.expect_log("take effect after a restart", WAIT);
    assert!(
        d.logs()
            .iter()
            .any(|l| l.contains("take effect after a restart") && l.contains("[cluster]")),
        "{}",
        d.logs().join("\n")
    );
    assert_eq!(d.get("/v2/cluster").json()["node"], "before");
}

/// A node's `admin.key` from an earlier start beside a cluster state that holds no key
/// (here: another prefix) is kept; the new first key goes to `admin.key.<seconds>`, and
/// only it works on this state.
#[test]
fn an_old_admin_key_beside_a_new_cluster_state_is_kept_and_a_new_one_written_beside_it() {
    let server = NatsServer::start().unwrap();
    let d = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let old = d.key.clone();
    let text = std::fs::read_to_string(&d.config_path).unwrap();
    std::fs::write(
        &d.config_path,
        text.replace("[cluster]\n", "[cluster]\nprefix = \"other\"\n"),
    )
    .unwrap();
    let d = d.stop_and_restart();
    assert_eq!(d.key, old, "admin.key is never overwritten");
    let new_file = std::fs::read_dir(d.state_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("admin.key."))
        .expect("a new admin key beside the old one");
    let new = std::fs::read_to_string(d.state_dir().join(&new_file)).unwrap();
    assert!(
        d.logs().iter().any(|l| l.contains("does not work here")),
        "{}",
        d.logs().join("\n")
    );
    assert_eq!(
        bearer_call(&d, "GET", "/v2/endpoints", Some(new.trim()), None).status,
        200
    );
    assert_eq!(
        bearer_call(&d, "GET", "/v2/endpoints", Some(&old), None).status,
        401
    );
}

/// A NATS server brought back without its JetStream store has lost the cluster's state
/// (found by an outside review: the node answered 503 until someone restarted it, and no
/// line said why). The node names the missing streams, stops with exit 1 so that systemd
/// (`Restart=on-failure`) starts it again, and that start works on the empty state: a new
/// first admin key beside the old one, and devices register again.
#[test]
fn a_nats_server_that_lost_the_cluster_state_stops_the_node_for_a_restart() {
    let mut server = NatsServer::start().unwrap();
    let mut d = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let mut dev = d.device();
    dev.register(&["ep=before", "lt=300", "b=U"], LINKS);
    server.restart_empty().unwrap();
    let t = Instant::now();
    // A write meanwhile fails as the store's (not SQLite's: this node has none).
    let r = d.call("PUT", "/v2/subscriptions/before/3/0/0", None, None);
    assert_eq!(r.status, 503, "{}", r.body);
    let code = d.wait_exit(Duration::from_secs(60));
    let logs = d.logs().join("\n");
    assert_eq!(
        code,
        Some(1),
        "the node went on after its state was lost: {logs}"
    );
    println!("stopped {:?} after the server came back empty", t.elapsed());
    assert!(
        logs.contains("lost this cluster's state") && logs.contains("KV_cd_registrations"),
        "{logs}"
    );
    let failing = d
        .logs()
        .into_iter()
        .find(|l| l.contains("state store is failing"))
        .unwrap_or_else(|| panic!("{logs}"));
    assert!(failing.contains("connectord_store::health"), "{failing}");
    assert!(!logs.contains("connectord_store::sqlite"), "{logs}");
    let d = d.crash_and_restart();
    assert!(
        d.logs().iter().any(|l| l.contains("does not work here")),
        "{}",
        d.logs().join("\n")
    );
    let key = std::fs::read_dir(d.state_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("admin.key."))
        .expect("a new admin key beside the old one");
    let key = std::fs::read_to_string(d.state_dir().join(key)).unwrap();
    let mut dev = d.device();
    dev.register(&["ep=after", "lt=300", "b=U"], LINKS);
    let r = bearer_call(&d, "GET", "/v2/endpoints", Some(key.trim()), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("\"after\""), "{}", r.body);
}

/// `GET /` (what a health check reads) turns 503 as soon as the node has lost its NATS
/// connection, naming it, also on an idle node (found by an outside review: it stayed
/// 200 for 7-8 s, until a write failed); it is 200 again once the server is back.
#[test]
fn the_health_check_says_at_once_that_nats_is_gone() {
    let mut server = NatsServer::start().unwrap();
    let d = Daemon::start_with(&cluster(&[server.url()], "n1"));
    assert_eq!(d.get("/").status, 200);
    server.kill();
    let t = Instant::now();
    let r = loop {
        let r = d.get("/");
        if r.status != 200 || t.elapsed() > Duration::from_secs(3) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        r.status,
        503,
        "still {} after {:?}: {}",
        r.status,
        t.elapsed(),
        r.body
    );
    assert!(r.body.contains("NATS"), "{}", r.body);
    println!(
        "GET / was 503 {:?} after the server was killed",
        t.elapsed()
    );
    server.restart().unwrap();
    assert!(
        support::eventually(WAIT, || d.get("/").status == 200),
        "{}",
        d.get("/").body
    );
}

/// `connectord check-config` checks `[cluster]`: a node name that is no NATS token is
/// refused with the file, line and key, and says so.
#[test]
fn check_config_refuses_a_node_name_that_is_no_nats_token() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "[cluster]\nbackend = \"nats\"\nnode = \"host.example\"\n",
    )
    .unwrap();
    let out = Command::new(support::BIN)
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:3:", file.display()))
            && stderr.contains("key `cluster.node`")
            && stderr.contains("not a valid NATS token"),
        "{stderr}"
    );
    std::fs::write(&file, "[cluster]\nbackend = \"nats\"\nnode = \"host-1\"\n").unwrap();
    let out = Command::new(support::BIN)
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The names `d` lists in `GET /v2/endpoints`.
pub(crate) fn endpoint_names(d: &Daemon) -> Vec<String> {
    let r = d.get("/v2/endpoints");
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

/// Waits (at most [`WAIT`]) until `d` lists exactly `names`; returns how long it took.
/// The time is printed by the callers, not asserted: how fast is the bench's and
/// docs/cluster.md's business (a loaded CI machine must not fail a test over it).
pub(crate) fn until_listed(d: &Daemon, names: &[&str]) -> Duration {
    let t = Instant::now();
    while endpoint_names(d) != names {
        assert!(
            t.elapsed() < WAIT,
            "{:?} instead of {names:?}",
            endpoint_names(d)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    t.elapsed()
}

/// Issue 22, the cluster-wide directory: a device registered on node 1 is listed by node 2
/// (`GET /v2/endpoints` and `GET /v2/endpoints/{ep}`), how long it took printed (about
/// 10 ms here; not asserted); its de-registration on node 1 removes it from node 2. The record names its
/// owner node; node 2 publishes no registration event for it (its channel stays empty).
#[test]
fn a_device_registered_on_one_node_is_listed_on_another_within_a_second() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let n2 = second_node(&server, &n1, "n2", "");
    let mut dev = n1.device();
    let t = Instant::now();
    let reg = dev.register(&["ep=roamer", "lt=300"], LINKS);
    let took = until_listed(&n2, &["roamer"]);
    println!(
        "registered on n1, listed on n2 after {:?} ({:?} after the registration's answer)",
        t.elapsed(),
        took
    );
    let r = n2.get("/v2/endpoints/roamer");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("/3303/0/5700"), "{}", r.body);
    // Node 2 expires nothing of node 1's, and counts no registration of its own.
    assert_eq!(n2.metric("registrations_total"), 0);
    assert_eq!(n1.metric("registrations_total"), 1);
    // Ownership: n1 owns it, both list it.
    assert_eq!(n2.metric("registered_endpoints"), 1);
    assert_eq!(n2.metric("cluster_owned_endpoints"), 0);
    assert_eq!(n1.metric("cluster_owned_endpoints"), 1);
    let t = Instant::now();
    while members(&n2) != ["n1", "n2"] {
        assert!(t.elapsed() < WAIT, "{:?}", members(&n2));
        std::thread::sleep(Duration::from_millis(100));
    }
    let body = n2.get("/v2/cluster").json();
    let owned: Vec<_> = body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["node"].clone(), m["owned_endpoints"].clone()))
        .collect();
    assert_eq!(owned, [(json!("n1"), json!(1)), (json!("n2"), json!(0))]);

    assert_eq!(dev.deregister(&reg), coap_lite::ResponseType::Deleted);
    let took = until_listed(&n2, &[]);
    println!("de-registered on n1, gone from n2 after {took:?}");
    assert_eq!(n2.get("/v2/endpoints/roamer").status, 404);
}

/// Issue 22: node 1 killed with -9 leaves its device's registration in the shared store;
/// node 2 (the only live member, so the lowest name) expires it once node 1's heartbeat is
/// stale and the lifetime has passed, counting it as expired and removing it from the store
/// (a node started afterwards lists nothing).
#[test]
fn a_killed_nodes_device_expires_on_a_surviving_node() {
    let server = NatsServer::start().unwrap();
    let mut n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let n2 = second_node(&server, &n1, "n2", "");
    let mut dev = n1.device();
    dev.register(&["ep=orphan", "lt=3"], LINKS);
    until_listed(&n2, &["orphan"]);
    n1.0.kill9();
    let t = Instant::now();
    while !endpoint_names(&n2).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "n1's device is still listed on n2"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "n1 killed; its device (lt=3) expired on n2 after {:?}",
        t.elapsed()
    );
    // Not before the member record aged out (6 s) and the lifetime passed.
    assert!(t.elapsed() > Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(n2.metric("registrations_expired_total"), 1);
    assert!(n2.wait_log("expired the registration of a node that left", WAIT));
    let n3 = second_node(&server, &n2, "n3", "");
    assert!(endpoint_names(&n3).is_empty());
}

/// Issue 22, ownership moves: a queue-mode device registered on node 1, with a request
/// queued for it there, registers again on node 2. Node 2 owns it (its `GET /v2/cluster`
/// counts), node 1 lists it as node 2's and drops its in-memory queue, and node 2 takes
/// the stored request and sends it to the device, which just woke.
#[test]
fn a_device_that_registers_on_another_node_moves_with_its_queued_requests() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let n2 = second_node(&server, &n1, "n2", "");
    let mut dev = n1.device();
    dev.register(&["ep=mover", "lt=300", "b=UQ"], LINKS);
    until_listed(&n2, &["mover"]);
    n1.async_request("GET", "/v2/endpoints/mover/3/0/0", None, None);
    assert_eq!(n1.metric("requests_queued"), 1);

    dev.server = n2.coap;
    dev.register(&["ep=mover", "lt=300", "b=UQ"], LINKS);
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while !seen.iter().any(|p: &String| p == "/3/0/0") {
        assert!(
            Instant::now() < deadline,
            "the request queued on n1 never came from n2: {seen:?}"
        );
        let Some((req, from)) = dev.recv_request(Duration::from_millis(500)) else {
            continue;
        };
        assert_eq!(from, n2.coap, "only n2 talks to the device now");
        let path = support::coap::path_of(&req);
        dev.reply(
            &req,
            from,
            coap_lite::ResponseType::Content,
            path.as_bytes(),
            None,
            None,
        );
        seen.push(path);
    }
    assert_eq!(n2.metric("cluster_owned_endpoints"), 1);
    let t = Instant::now();
    while n1.metric("cluster_owned_endpoints") != 0 || n1.metric("requests_queued") != 0 {
        assert!(t.elapsed() < WAIT, "n1 still holds the device as its own");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(endpoint_names(&n1), ["mover"]);
    assert!(n1.wait_log("which owns it now", WAIT));
    // The answer is n2's to publish; the request is gone from the shared store (a node
    // started now loads none).
    let t = Instant::now();
    loop {
        let n3 = second_node(&server, &n1, "n3", "");
        if n3.metric("requests_queued") == 0 {
            break;
        }
        assert!(t.elapsed() < WAIT, "the delivered request stays stored");
    }
}
