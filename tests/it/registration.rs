//! End-to-end tests of the LwM2M registration interface and the endpoint directory,
//! against the real binary over real UDP and HTTP, with a real SQLite state file.

use crate::support;

use std::process::Command;
use std::time::Duration;

use coap_lite::{ContentFormat, MessageType, Packet, RequestType, ResponseType};
use support::coap::{Req, code, diag};
use support::{Daemon, eventually, http_get};

const LINKS: &str =
    r#"</>;rt="oma.lwm2m",</3/0>;obs;rt="oma.device",</3303/0/5700>;obs;rt="5700";ct=0,</5/0>"#;

#[test]
fn register_list_update_deregister() {
    let d = Daemon::start();
    let mut dev = d.device();
    let id = dev.register(
        &["ep=node-001", "lt=60", "lwm2m=1.0", "b=U", "et=Light"],
        LINKS,
    );

    for prefix in ["/v2", "/v1", ""] {
        let r = d.get(&format!("{prefix}/endpoints"));
        assert_eq!(r.status, 200, "{prefix}");
        assert_eq!(r.content_type, "application/json");
        assert_eq!(
            r.json(),
            serde_json::json!([{"name": "node-001", "type": "Light", "status": "ACTIVE", "q": false, "lwm2m": "1.0"}])
        );
        let r = d.get(&format!("{prefix}/endpoints/node-001"));
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json(),
            serde_json::json!([
                {"uri": "/3/0", "rt": "oma.device", "obs": "true"},
                {"uri": "/3303/0/5700", "rt": "5700", "obs": "true", "type": "text/plain"},
                // An LwM2M client (lwm2m=): every listed path is observable.
                {"uri": "/5/0", "obs": "true"}
            ])
        );
    }
    let r = d.get("/v2/endpoints?type=Light");
    assert_eq!(r.json().as_array().unwrap().len(), 1);
    let r = d.get("/v2/endpoints?type=Other");
    assert_eq!(r.json(), serde_json::json!([]));

    // link-format representations.
    let r = d.get_accept("/v2/endpoints", "application/link-format");
    assert_eq!(
        (r.status, r.content_type.as_str()),
        (200, "application/link-format")
    );
    assert_eq!(
        r.body,
        r#"<node-001>;type="Light";status="ACTIVE";q="false""#
    );
    let r = d.get_accept("/v2/endpoints/node-001", "application/link-format");
    assert_eq!(
        r.body,
        r#"</3/0>;rt="oma.device";obs,</3303/0/5700>;rt="5700";obs;type="text/plain",</5/0>;obs"#
    );
    let r = d.get_accept("/v2/endpoints", "text/html");
    assert_eq!(r.status, 406);
    assert_eq!(r.json()["type"], "not_acceptable");

    let r = d.get("/v2/endpoints/nobody");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["type"], "not_found");

    // Update into queue mode with a new object list.
    assert_eq!(
        dev.update(&id, &["lt=120", "b=UQ"], Some("</3/0>")),
        ResponseType::Changed
    );
    let r = d.get("/v2/endpoints");
    assert_eq!(r.json()[0]["q"], true);
    assert_eq!(
        d.get("/v2/endpoints/node-001")
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );

    assert_eq!(dev.deregister(&id), ResponseType::Deleted);
    assert_eq!(d.get("/v2/endpoints").json(), serde_json::json!([]));
    assert_eq!(d.get("/v2/endpoints/node-001").status, 404);
    assert_eq!(dev.update(&id, &[], None), ResponseType::NotFound);
    assert_eq!(dev.deregister(&id), ResponseType::NotFound);
    assert_eq!(d.metric("registrations_total"), 1);
    assert_eq!(d.metric("deregistrations_total"), 1);
}

#[test]
fn rest_refuses_requests_without_a_valid_key() {
    let d = Daemon::start();
    for path in [
        "/v2/endpoints",
        "/endpoints/x",
        "/",
        "/rest-versions",
        "/metrics",
    ] {
        for key in [None, Some("wrong"), Some("")] {
            let r = http_get(&d.url(path), key, None);
            assert_eq!(r.status, 401, "{path} {key:?}");
            assert_eq!(r.content_type, "application/json");
            assert_eq!(r.json()["type"], "unauthorized");
        }
    }
    let r = d.get("/rest-versions");
    assert_eq!(r.json(), serde_json::json!(["v1", "v2"]));
    let r = d.get("/");
    assert_eq!(r.status, 200);
    assert!(r.body.starts_with("connectord "), "{}", r.body);
    let metrics = d.get("/metrics").body;
    assert!(
        metrics.contains("connectord_rest_responses_total{status=\"401\"} 15"),
        "{metrics}"
    );
    let r = d.get("/v2/nothing-here");
    assert_eq!(
        (r.status, r.json()["type"].as_str()),
        (404, Some("not_found"))
    );
}

#[test]
fn lifetime_expiry_removes_the_endpoint() {
    let d = Daemon::start();
    let mut dev = d.device();
    dev.register(&["ep=short", "lt=1"], "</3/0>");
    let mut keep = d.device();
    keep.register(&["ep=long", "lt=300"], "</3/0>");
    assert_eq!(d.get("/v2/endpoints").json().as_array().unwrap().len(), 2);
    assert!(
        eventually(Duration::from_secs(10), || d
            .get("/v2/endpoints")
            .json()
            .as_array()
            .unwrap()
            .len()
            == 1),
        "the 1 s registration did not expire"
    );
    assert_eq!(d.get("/v2/endpoints").json()[0]["name"], "long");
    // The directory drops it at once; the counter and the log line follow the store's
    // commit of the removal.
    assert!(eventually(Duration::from_secs(5), || d
        .metric("registrations_expired_total")
        == 1));
    assert!(d.wait_log("registration expired", Duration::from_secs(1)));
}

#[test]
fn an_update_keeps_a_short_lifetime_registration_alive() {
    let d = Daemon::start();
    let mut dev = d.device();
    let id = dev.register(&["ep=kept", "lt=2"], "</3/0>");
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(dev.update(&id, &[], None), ResponseType::Changed);
    }
    assert_eq!(d.get("/v2/endpoints").json().as_array().unwrap().len(), 1);
    assert_eq!(d.metric("registrations_expired_total"), 0);
}

#[test]
fn nat_rebinding_moves_the_registration_to_the_new_address() {
    let d = Daemon::start();
    let mut before = d.device();
    let id = before.register(&["ep=behind-nat", "lt=60"], "</3/0>");
    // The same device, after its NAT mapping changed: a new source port.
    let mut after = d.device();
    assert_eq!(after.update(&id, &[], None), ResponseType::Changed);
    let from = format!("from={}", before.local_addr());
    let to = format!("to={}", after.local_addr());
    d.expect_log(&to, Duration::from_secs(2));
    assert!(
        d.logs()
            .iter()
            .any(|l| l.contains("device address changed") && l.contains(&from))
    );
}

#[test]
fn a_retransmitted_registration_gets_the_cached_reply() {
    let d = Daemon::start();
    let mut dev = d.device();
    let mut r = Req::new(RequestType::Post, &["rd"]);
    r.query = &["ep=dup", "lt=60"];
    r.payload = b"</3/0>";
    let bytes = dev.build(&r).to_bytes().unwrap();
    dev.send_raw(&bytes);
    let first = dev.recv_raw(Duration::from_secs(5)).expect("first reply");
    dev.send_raw(&bytes);
    let second = dev
        .recv_raw(Duration::from_secs(5))
        .expect("reply to the duplicate");
    assert_eq!(
        first, second,
        "the duplicate must be answered with the same reply"
    );
    let p = Packet::from_bytes(&first).unwrap();
    assert_eq!(p.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(code(&p), ResponseType::Created);
    assert_eq!(d.metric("registrations_total"), 1, "handled once");
    assert_eq!(d.metric("coap_duplicates_total"), 1);
    assert_eq!(d.get("/v2/endpoints").json().as_array().unwrap().len(), 1);
}

#[test]
fn a_non_confirmable_registration_gets_a_non_reply() {
    let d = Daemon::start();
    let mut dev = d.device();
    let mut r = Req::new(RequestType::Post, &["rd"]);
    r.query = &["ep=non", "lt=60"];
    r.confirmable = false;
    let resp = dev.request(&r);
    assert_eq!(resp.header.get_type(), MessageType::NonConfirmable);
    assert_eq!(code(&resp), ResponseType::Created);
}

/// A registration request (`POST /rd`) with this query and payload.
fn rd<'a>(query: &'a [&'a str], payload: &'a [u8]) -> Req<'a> {
    Req {
        query,
        payload,
        ..Req::new(RequestType::Post, &["rd"])
    }
}

/// Every bad request gets a CoAP error code and a diagnostic payload; nothing is registered.
#[test]
fn bad_registration_requests_are_answered_with_errors() {
    let d = Daemon::start();
    let mut dev = d.device();
    let cases: Vec<(Req, ResponseType, &str)> = vec![
        (rd(&["lt=60"], b""), ResponseType::BadRequest, "ep"),
        (rd(&["ep=a", "lt=x"], b""), ResponseType::BadRequest, "lt"),
        (
            rd(&["ep=a", "lt=0"], b""),
            ResponseType::BadRequest,
            "lifetime",
        ),
        (rd(&["ep=a/b"], b""), ResponseType::BadRequest, "name"),
        (
            rd(&["ep=a", "d=no spaces"], b""),
            ResponseType::BadRequest,
            "domain",
        ),
        (
            rd(&["ep=a"], b"</3/0"),
            ResponseType::BadRequest,
            "object list",
        ),
        (
            rd(&["ep=a"], &[0xFF, 0xFE]),
            ResponseType::BadRequest,
            "UTF-8",
        ),
        (
            Req {
                content_format: Some(ContentFormat::ApplicationJSON),
                ..rd(&["ep=a"], b"{}")
            },
            ResponseType::UnsupportedContentFormat,
            "link-format",
        ),
        (
            Req::new(RequestType::Get, &["rd"]),
            ResponseType::MethodNotAllowed,
            "POST",
        ),
        (
            Req::new(RequestType::Put, &["rd", "x"]),
            ResponseType::MethodNotAllowed,
            "POST",
        ),
        (
            Req::new(RequestType::Get, &["elsewhere"]),
            ResponseType::NotFound,
            "",
        ),
        (
            Req::new(RequestType::Post, &["rd", "unknown-id"]),
            ResponseType::NotFound,
            "registration",
        ),
    ];
    for (req, want, text) in &cases {
        let resp = dev.request(req);
        assert_eq!(
            code(&resp),
            *want,
            "{:?} {:?}: {}",
            req.path,
            req.query,
            diag(&resp)
        );
        assert!(
            diag(&resp).contains(text),
            "diagnostic {:?} lacks {text:?}",
            diag(&resp)
        );
    }
    assert_eq!(d.get("/v2/endpoints").json(), serde_json::json!([]));
    assert_eq!(d.metric("coap_error_responses_total"), cases.len() as u64);
}

/// Garbage never crashes the daemon: a malformed CON is rejected with RST, anything else
/// malformed is dropped; all of it is counted.
#[test]
fn malformed_datagrams_are_rejected_or_dropped_and_counted() {
    let d = Daemon::start_custom("max_datagram = 256", "");
    let dev = d.device();
    // (datagram, RST expected with this message id)
    let cases: &[(&[u8], Option<u16>)] = &[
        (&[0x40, 0x02, 0x12, 0x34, 0xF0], Some(0x1234)), // CON, option delta 15
        (&[0x49, 0x02, 0x00, 0x07], Some(7)),            // CON, token length 9
        (&[0x40, 0x02, 0x00, 0x08, 0xFF], Some(8)),      // CON, marker without payload
        (&[0x50, 0x02, 0x00, 0x09, 0xF0], None),         // NON: dropped silently
        (&[0x80, 0x02, 0x00, 0x0A], None),               // version 2: dropped
        (&[0x01], None),                                 // too short
        (b"GET / HTTP/1.1\r\n\r\n", Some(0x5420)), // text: 0x47 reads as a CON with a bad body
        (b"\xC7junk", None),                       // version 3: dropped
    ];
    for (bytes, rst) in cases {
        dev.send_raw(bytes);
        let reply = dev.recv_raw(Duration::from_millis(if rst.is_some() {
            3000
        } else {
            300
        }));
        match rst {
            Some(mid) => {
                let p =
                    Packet::from_bytes(&reply.unwrap_or_else(|| panic!("no RST for {bytes:?}")))
                        .unwrap();
                assert_eq!(p.header.get_type(), MessageType::Reset, "{bytes:?}");
                assert_eq!(p.header.message_id, *mid);
            }
            None => assert!(reply.is_none(), "unexpected reply to {bytes:?}: {reply:?}"),
        }
    }
    // Oversize datagram: dropped and counted separately.
    dev.send_raw(&[0x50; 300]);
    // A CoAP ping is answered with RST.
    dev.send_raw(&[0x40, 0x00, 0xAB, 0xCD]);
    let p = Packet::from_bytes(&dev.recv_raw(Duration::from_secs(3)).expect("ping RST")).unwrap();
    assert_eq!(
        (p.header.get_type(), p.header.message_id),
        (MessageType::Reset, 0xABCD)
    );

    assert!(eventually(Duration::from_secs(3), || d
        .metric("coap_malformed_total")
        == cases.len() as u64));
    assert_eq!(d.metric("coap_oversize_total"), 1);
    // Still serving.
    d.device().register(&["ep=after-garbage"], "</3/0>");
}

#[test]
fn registrations_survive_kill_9() {
    let d = Daemon::start();
    let mut a = d.device();
    let mut b = d.device();
    let id_a = a.register(&["ep=dev-a", "lt=300", "et=Sensor"], LINKS);
    b.register(&["ep=dev-b", "lt=300", "b=UQ"], "</3/0>");
    let key = d.key.clone();
    let before = d.get("/v2/endpoints").json();

    let d = d.crash_and_restart();
    assert_eq!(d.key, key, "the admin key is kept, not created again");
    assert_eq!(d.get("/v2/endpoints").json(), before);
    assert_eq!(
        d.get("/v2/endpoints/dev-a")
            .json()
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert!(
        d.logs()
            .iter()
            .any(|l| l.contains("loaded 2 stored registrations"))
    );
    // The device's next update (from the socket it registered with) succeeds; the daemon
    // came back on another port, as a server that moved would.
    a.server = d.coap;
    assert_eq!(a.update(&id_a, &[], None), ResponseType::Changed);
}

/// A state directory of release 0.1.0 (schema 6: a registration stored the device's
/// address and our socket's as `peer` and `local`) opens with this build, which migrates
/// the row to a peer reference, and serves: the endpoint is listed, and a read reaches
/// the device at its stored address from the socket it registered to.
#[test]
fn a_state_directory_from_before_peer_refs_opens_and_serves() {
    // A first start makes the state directory (keys, CA, database); its CoAP port is then
    // fixed in the configuration so that the stored socket is bound again.
    let d = Daemon::start();
    let coap = d.coap;
    let dev = d.device();
    let at = dev.local_addr();
    let config = d.config_path.clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let d = d.stop_edit_restart(|state| {
        let text = std::fs::read_to_string(&config).unwrap();
        let fixed = text.replacen(
            "[coap]\nlisten = [\"127.0.0.1:0\"]",
            &format!("[coap]\nlisten = [\"{coap}\"]"),
            1,
        );
        assert_ne!(fixed, text, "the test configuration's [coap] listen line");
        std::fs::write(&config, fixed).unwrap();
        // The row as 0.1.0 wrote it, in a database at its schema version (6; version 7
        // changed no table, only the rows' JSON; version 8 added `event_epoch`, dropped
        // here, and changed the events' JSON, none stored here; version 10 replaced the
        // tables of requests and events by the journal: they are made again).
        let old = format!(
            r#"{{"id":"0f3c9a7d2b","domain":"default","name":"old-dev","ept":"Sensor","lifetime_s":86400,"binding":"U","lwm2m":"1.0","queue":false,"peer":"{at}","local":"{coap}","links":"</3/0>,</3303/0/5700>;obs","registered_at_ms":{now},"expires_at_ms":{}}}"#,
            now + 86_400_000
        );
        let db = rusqlite::Connection::open(state.join("connectord.db")).unwrap();
        db.execute_batch(&format!(
            "DELETE FROM registrations; DROP TABLE event_epoch; {} PRAGMA user_version = 6;",
            support::TABLES_BEFORE_THE_JOURNAL
        ))
        .unwrap();
        db.execute(
            "INSERT INTO registrations (id, domain, name, data) VALUES ('0f3c9a7d2b', 'default', 'old-dev', ?1)",
            [old],
        )
        .unwrap();
    });
    assert_eq!(d.coap, coap);
    assert!(
        d.logs()
            .iter()
            .any(|l| l.contains("migrated database schema to version 7")),
        "{:?}",
        d.logs()
    );
    assert_eq!(
        d.get("/v2/endpoints").json(),
        serde_json::json!([{"name": "old-dev", "type": "Sensor", "status": "ACTIVE", "q": false, "lwm2m": "1.0"}])
    );
    let id = d.async_request("GET", "/v2/endpoints/old-dev/3303/0/5700", None, None);
    let (req, from) = dev
        .recv_request(Duration::from_secs(10))
        .expect("the daemon sent no request to the stored address");
    assert_eq!(from, coap, "from the socket the device registered to");
    assert_eq!(support::coap::path_of(&req), "/3303/0/5700");
    dev.reply(&req, from, ResponseType::Content, b"7", Some(0), None);
    let r = d.async_response(&id, Duration::from_secs(10));
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["payload"], support::b64(b"7"));
}

#[test]
fn sigterm_stops_gracefully() {
    let mut d = Daemon::start();
    d.device().register(&["ep=x"], "</3/0>");
    d.signal("TERM");
    assert_eq!(d.wait_exit(Duration::from_secs(15)), Some(0));
    assert!(d.logs().iter().any(|l| l.contains("SIGTERM: stopping")));
    assert!(d.logs().iter().any(|l| l.ends_with(" stopped")));
}

#[test]
fn sighup_applies_the_log_level_and_names_what_needs_a_restart() {
    let d = Daemon::start();
    let text = std::fs::read_to_string(&d.config_path).unwrap();
    // A broken file: the running configuration stays.
    std::fs::write(&d.config_path, "[log]\nlevel = \"info\"\nbogus = 1\n").unwrap();
    d.signal("HUP");
    d.expect_log("configuration not reloaded", Duration::from_secs(5));
    assert!(
        d.logs()
            .iter()
            .any(|l| l.contains(":3:1: unknown field `bogus`"))
    );
    // A good file with a new log level and a new registry setting.
    let changed = text.replace("level = \"debug\"", "level = \"warn\"")
        + "[registry]\ndefault_lifetime_s = 600\n";
    std::fs::write(&d.config_path, changed).unwrap();
    d.signal("HUP");
    d.expect_log("take effect after a restart", Duration::from_secs(5));
    assert!(d.logs().iter().any(|l| l.contains("[registry]")));
    // At warn level, a registration no longer logs its info line.
    let lines = d.logs().len();
    d.device().register(&["ep=quiet"], "</3/0>");
    assert_eq!(d.get("/v2/endpoints").json().as_array().unwrap().len(), 1);
    assert!(!d.logs()[lines..].iter().any(|l| l.contains("registered")));
}

/// Per-device lines ("registered", ...) past `log.device_lines_per_s` in a second are
/// left out and summarised once a second, so that the counts still add up; SIGHUP changes
/// the budget (0: every line).
#[test]
fn device_log_lines_are_budgeted_and_summarised() {
    let p = support::Prepared::new("", "");
    support::set_device_lines_per_s(&p, 3);
    let d = p.start();
    // One line per registration, whose message is "registered" (not "de-registered").
    let one_by_one = |d: &Daemon, prefix: &str| {
        d.logs()
            .iter()
            .filter(|l| l.contains(&format!(": registered ep={prefix}")))
            .count()
    };
    // "registered" counts of the summary lines.
    let summarised = |d: &Daemon| support::summarised(d, "registered");
    const N: usize = 60;
    for i in 0..N {
        d.device().register(&[&format!("ep=budget-{i}")], "</3/0>");
    }
    assert!(
        eventually(Duration::from_secs(5), || one_by_one(&d, "budget-")
            + summarised(&d)
            == N),
        "{} logged one by one, {} summarised:\n{}",
        one_by_one(&d, "budget-"),
        summarised(&d),
        d.logs().join("\n")
    );
    // 60 registrations take far less than the 20 s it would take to stay within 3 a second.
    assert!(summarised(&d) > 0, "{}", d.logs().join("\n"));
    assert!(
        d.logs()
            .iter()
            .any(|l| l.contains("(more than log.device_lines_per_s = 3)"))
    );

    // No limit after a reload.
    let text = std::fs::read_to_string(&d.config_path).unwrap();
    std::fs::write(
        &d.config_path,
        text.replace("device_lines_per_s = 3", "device_lines_per_s = 0"),
    )
    .unwrap();
    d.signal("HUP");
    d.expect_log("log.device_lines_per_s is now 0", Duration::from_secs(5));
    for i in 0..20 {
        d.device()
            .register(&[&format!("ep=unlimited-{i}")], "</3/0>");
    }
    assert!(
        eventually(Duration::from_secs(5), || one_by_one(&d, "unlimited-")
            == 20),
        "{}",
        d.logs().join("\n")
    );
}

/// Threads of a process, other than its main thread, whose name is `name`.
fn threads_named(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| t.ok())
        .filter(|t| t.file_name().to_string_lossy() != pid.to_string())
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|comm| comm.trim() == name)
        .count()
}

#[test]
fn runtime_worker_threads_sets_the_async_workers() {
    // The configuration decides; TOKIO_WORKER_THREADS is not read.
    let d = Daemon::start_env(
        "",
        "[runtime]\nworker_threads = 3\n",
        &[("TOKIO_WORKER_THREADS", "2")],
    );
    assert_eq!(d.get("/v2/endpoints").status, 200);
    assert!(d.wait_log("async runtime: 3 worker threads", Duration::from_secs(5)));
    // The workers are named after the daemon (so is the blocking pool, if it has started).
    assert!(threads_named(d.pid(), "connectord") >= 3);

    let d1 = Daemon::start_with("[runtime]\nworker_threads = 1\n");
    assert!(d1.wait_log("async runtime: 1 worker threads", Duration::from_secs(5)));
    d1.device().register(&["ep=one-worker"], "</3/0>");
    assert_eq!(d1.get("/v2/endpoints").json().as_array().unwrap().len(), 1);

    // 0: one per CPU (and a TOKIO_WORKER_THREADS tokio would panic on is ignored).
    let d0 = Daemon::start_env("", "", &[("TOKIO_WORKER_THREADS", "")]);
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert!(d0.wait_log(
        &format!("async runtime: {cpus} worker threads"),
        Duration::from_secs(5)
    ));
}

#[test]
fn check_config_reports_file_line_column_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[coap]\nmax_datagram = 1500\nmax_dgram = 5\n").unwrap();
    let out = Command::new(support::BIN)
        .args(["check-config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:3:1:", bad.display())), "{err}");
    assert!(err.contains("coap.max_dgram"), "{err}");

    std::fs::write(&bad, "[rest]\nlisten = [\"localhost\"]\n").unwrap();
    let out = Command::new(support::BIN)
        .args(["check-config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":2:11:") && err.contains("rest.listen"),
        "{err}"
    );

    // `run` refuses the same file with the same message, before binding anything.
    let out = Command::new(support::BIN)
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rest.listen"));

    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../etc/connectord.toml");
    support::run_ok(
        Command::new(support::BIN).args(["check-config", shipped]),
        "check-config of etc/connectord.toml",
    );

    let out = Command::new(support::BIN)
        .args(["check-config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

/// aiocoap (PyPI) registers, updates and de-registers: a CoAP stack nobody here wrote.
#[test]
fn aiocoap_client_registers_updates_and_deregisters() {
    let d = Daemon::start();
    let python = support::peers::aiocoap_python();
    let script = support::peers::script("aiocoap_device.py");
    let run = |args: &[&str]| -> String {
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .arg(d.coap.ip().to_string())
            .arg(d.coap.port().to_string())
            .args(args);
        let out = support::run_ok(&mut cmd, "aiocoap");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let out = run(&["register", "aiocoap-1"]);
    let (code, location) = out.split_once(' ').expect("code and location");
    assert_eq!(code, "2.01");
    assert!(location.starts_with("rd/"), "{location}");
    assert_eq!(
        d.get("/v2/endpoints").json(),
        serde_json::json!([{"name": "aiocoap-1", "type": "aiocoap-sensor", "status": "ACTIVE", "q": false, "lwm2m": "1.0"}])
    );
    assert_eq!(
        d.get("/v2/endpoints/aiocoap-1").json(),
        serde_json::json!([
            {"uri": "/3/0", "obs": "true"},
            {"uri": "/3303/0/5700", "rt": "temperature", "obs": "true", "type": "text/plain"}
        ])
    );
    assert_eq!(run(&["update", location]), "2.04");
    assert_eq!(run(&["deregister", location]), "2.02");
    assert_eq!(d.get("/v2/endpoints").json(), serde_json::json!([]));
    assert_eq!(run(&["deregister", location]), "4.04");
}

/// libcoap's command-line client (Debian libcoap3-bin) registers and de-registers.
#[test]
fn libcoap_client_registers_and_deregisters() {
    let d = Daemon::start();
    let base = format!("coap://{}", d.coap);
    let run = support::peers::libcoap_ack;
    let ack = run(&[
        "-m",
        "post",
        "-t",
        "40",
        "-e",
        "</3/0>;obs,</1/0>",
        &format!("{base}/rd?ep=libcoap-1&lt=300&b=UQ"),
    ]);
    assert!(ack.contains("c:2.01"), "{ack}");
    let id = ack
        .split("Location-Path:")
        .nth(2)
        .map(|s| s.split([',', ' ', ']']).next().unwrap().to_string())
        .unwrap_or_else(|| panic!("no Location-Path in {ack}"));
    assert_eq!(
        d.get("/v2/endpoints").json(),
        serde_json::json!([{"name": "libcoap-1", "type": "", "status": "ACTIVE", "q": true}])
    );
    assert!(run(&["-m", "delete", &format!("{base}/rd/{id}")]).contains("c:2.02"));
    assert_eq!(d.get("/v2/endpoints").json(), serde_json::json!([]));
}

/// An object list too long for one datagram, as a device sends it: block-wise (Block1,
/// RFC 7959), each block answered 2.31 Continue, the registration handled once with the
/// whole list. Our own client checks the exchange block by block; libcoap's (a stack
/// nobody here wrote) registers with 64-byte blocks and a Request-Tag (RFC 9175), which
/// is part of the transfer's identity.
#[test]
fn a_registration_sent_block_wise_is_assembled() {
    use coap_lite::CoapOption;
    let d = Daemon::start();
    let links: String = (0..80)
        .map(|i| format!("</{}/0>", 3300 + i))
        .collect::<Vec<_>>()
        .join(",");
    assert!(links.len() > 600);
    let block_option = |num: u32, more: bool| {
        let v = (num << 4) | (u32::from(more) << 3) | 1; // 32-byte blocks (szx 1)
        v.to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect::<Vec<u8>>()
    };
    let echoed = |p: &Packet| {
        p.get_first_option(CoapOption::Block1)
            .map(|v| v.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
    };
    let mut dev = d.device();
    let chunks: Vec<&[u8]> = links.as_bytes().chunks(32).collect();
    let mut last = None;
    for (num, chunk) in chunks.iter().enumerate() {
        let more = num + 1 < chunks.len();
        let mut req = Req::new(RequestType::Post, &["rd"]);
        req.query = &["ep=blocky", "lt=300"];
        req.payload = chunk;
        req.content_format = Some(ContentFormat::ApplicationLinkFormat);
        let mut p = dev.build(&req);
        p.add_option(CoapOption::Block1, block_option(num as u32, more));
        dev.send_raw(&p.to_bytes().unwrap());
        let reply =
            Packet::from_bytes(&dev.recv_raw(Duration::from_secs(5)).expect("answered")).unwrap();
        assert_eq!(reply.header.message_id, p.header.message_id);
        let want = if more {
            ResponseType::Continue
        } else {
            ResponseType::Created
        };
        assert_eq!(code(&reply), want, "block {num}: {}", diag(&reply));
        // Every answer echoes the block it answers (§2.3).
        let num = num as u32;
        assert_eq!(
            echoed(&reply),
            Some((num << 4) | (u32::from(more) << 3) | 1)
        );
        last = Some(reply);
    }
    assert!(last.is_some());
    let resources = d.get("/v2/endpoints/blocky").json();
    assert_eq!(resources.as_array().unwrap().len(), 80, "{resources}");
    assert_eq!(
        d.metric("coap_block_transfers"),
        0,
        "nothing left assembling"
    );

    // A block of a transfer that never started: 4.08.
    let mut req = Req::new(RequestType::Post, &["rd"]);
    req.query = &["ep=stray"];
    req.payload = b"</3/0>";
    let mut p = dev.build(&req);
    p.add_option(CoapOption::Block1, block_option(3, false));
    dev.send_raw(&p.to_bytes().unwrap());
    let reply =
        Packet::from_bytes(&dev.recv_raw(Duration::from_secs(5)).expect("answered")).unwrap();
    assert_eq!(code(&reply), ResponseType::RequestEntityIncomplete);

    // libcoap, 64-byte blocks.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &links).unwrap();
    let all = support::peers::libcoap_log(&[
        "-m",
        "post",
        "-t",
        "40",
        "-b",
        "64",
        "-f",
        file.path().to_str().unwrap(),
        &format!("coap://{}/rd?ep=libcoap-blocks&lt=300", d.coap),
    ]);
    // The answer to the last of the 13 blocks (799 bytes in 64-byte blocks, numbered from
    // 0) echoes it; libcoap logs only that one and the first request at this verbosity.
    let last_block = format!("Block1:{}/_/64", links.len() / 64);
    assert!(
        all.lines()
            .any(|l| l.contains("t:ACK") && l.contains("c:2.01") && l.contains(&last_block)),
        "{all}"
    );
    let resources = d.get("/v2/endpoints/libcoap-blocks").json();
    assert_eq!(resources.as_array().unwrap().len(), 80, "{resources}");
}

/// RFC 9175 §3.3: two block-wise registrations of one device to one URI, interleaved
/// under different Request-Tags, are assembled apart; each ends as the whole body it sent.
#[test]
fn request_tags_keep_interleaved_block_wise_transfers_apart() {
    use coap_lite::CoapOption;
    let d = Daemon::start();
    let mut dev = d.device();
    // Two 64-byte halves each (szx 2), starting with different objects.
    let body = |first: u16| {
        let mut links: String = (0..20)
            .map(|i| format!("</{}/0>", first + i))
            .collect::<Vec<_>>()
            .join(",");
        links.truncate(128);
        links.truncate(links.rfind(',').unwrap());
        links
    };
    let (a, b) = (body(3300), body(4400));
    assert!(a.len() > 64 && b.len() > 64);
    let mut send = |tag: &[u8], links: &str, num: u32| {
        let more = num == 0;
        let chunk = if more { &links[..64] } else { &links[64..] };
        let mut req = Req::new(RequestType::Post, &["rd"]);
        req.query = &["ep=tagged", "lt=300"];
        req.payload = chunk.as_bytes();
        req.content_format = Some(ContentFormat::ApplicationLinkFormat);
        let mut p = dev.build(&req);
        let block = (num << 4) | (u32::from(more) << 3) | 2;
        p.add_option(CoapOption::Block1, vec![block as u8]);
        p.add_option(CoapOption::Unknown(292), tag.to_vec());
        dev.send_raw(&p.to_bytes().unwrap());
        let reply =
            Packet::from_bytes(&dev.recv_raw(Duration::from_secs(5)).expect("answered")).unwrap();
        code(&reply)
    };
    assert_eq!(send(b"A", &a, 0), ResponseType::Continue);
    assert_eq!(send(b"B", &b, 0), ResponseType::Continue);
    assert_eq!(d.metric("coap_block_transfers"), 2);
    let paths = || -> Vec<String> {
        let mut p: Vec<String> = support::strings_of(&d.get("/v2/endpoints/tagged").json(), "uri");
        p.sort();
        p
    };
    let objects = |links: &str| -> Vec<String> {
        let mut p: Vec<String> = links
            .split(',')
            .map(|l| l.trim_matches(|c| c == '<' || c == '>').to_string())
            .collect();
        p.sort();
        p
    };
    assert_eq!(send(b"A", &a, 1), ResponseType::Created);
    assert_eq!(paths(), objects(&a), "tag A's blocks only");
    assert_eq!(send(b"B", &b, 1), ResponseType::Created);
    assert_eq!(paths(), objects(&b), "tag B's, registered again");
    assert_eq!(d.metric("coap_block_transfers"), 0);
}

/// Under systemd: READY=1 once serving, watchdog pings, STOPPING=1 on SIGTERM.
#[test]
fn tells_systemd_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut d = Daemon::start_env(
        "",
        "",
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut seen = String::new();
    let mut buf = [0u8; 512];
    let mut recv_until = |want: &str, seen: &mut String| {
        while !seen.contains(want) {
            let n = sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("waiting for {want}: {e}; got {seen:?}"));
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    };
    recv_until("READY=1", &mut seen);
    // The REST API answers by the time READY=1 was sent.
    assert_eq!(d.get("/v2/endpoints").status, 200);
    recv_until("WATCHDOG=1", &mut seen);
    d.signal("TERM");
    recv_until("STOPPING=1", &mut seen);
    assert_eq!(d.wait_exit(Duration::from_secs(15)), Some(0));
}

/// `check-config` on `text`: (exit code, stderr).
fn check_config(dir: &std::path::Path, text: &str) -> (Option<i32>, String, std::path::PathBuf) {
    let file = dir.join("check.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(support::BIN)
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        file,
    )
}

/// `log.level` takes level names (any case, "warning" for warn) or directives that each
/// carry one; a word that is no level ("verbose", which the tracing filter would take as
/// a target and so silence every line) is refused with file:line:column and key, by
/// check-config and at start.
#[test]
fn log_level_must_name_a_level() {
    let dir = tempfile::tempdir().unwrap();
    let good = [
        "warning",
        "WARN",
        "Info",
        "off",
        "trace",
        "info,connectord=debug",
        "connectord::coap=trace,warning",
        "connectord=Warning",
    ];
    for level in good {
        let (code, err, _) = check_config(dir.path(), &format!("[log]\nlevel = \"{level}\"\n"));
        assert_eq!(code, Some(0), "{level}: {err}");
    }
    let bad = [
        "verbose",
        "warnings",
        "",
        "info,connectord=loud",
        "connectord",
        "info,",
        "=info",
        "3",
    ];
    for level in bad {
        let (code, err, file) = check_config(dir.path(), &format!("[log]\nlevel = \"{level}\"\n"));
        assert_eq!(code, Some(1), "{level:?} was accepted");
        assert!(
            err.contains(&format!("{}:2:9: key `log.level`", file.display())),
            "{level:?}: {err}"
        );
        if level == "verbose" {
            assert!(
                err.contains("off, error, warn (or warning), info, debug, trace"),
                "the message lists the levels: {err}"
            );
        }
    }
    // `run` refuses it too, with the same message.
    let file = dir.path().join("check.toml");
    std::fs::write(&file, "[log]\nlevel = \"verbose\"\n").unwrap();
    let out = Command::new(support::BIN)
        .args(["run", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(":2:9: key `log.level`"));
}

/// SIGHUP with a `log.level` that is no level keeps the running level and says why;
/// "warning" is applied as warn.
#[test]
fn sighup_refuses_a_log_level_that_is_no_level() {
    let d = Daemon::start();
    let text = std::fs::read_to_string(&d.config_path).unwrap();
    std::fs::write(
        &d.config_path,
        text.replace("level = \"debug\"", "level = \"verbose\""),
    )
    .unwrap();
    d.signal("HUP");
    d.expect_log("configuration not reloaded", Duration::from_secs(5));
    assert!(d.logs().iter().any(|l| l.contains("key `log.level`")));
    // The running level (debug) still logs a registration.
    d.device().register(&["ep=still-logged"], "</3/0>");
    d.expect_log("still-logged", Duration::from_secs(5));
    // "warning" is warn: the warning about a change that needs a restart is logged.
    let changed = text.replace("level = \"debug\"", "level = \"warning\"")
        + "[registry]\ndefault_lifetime_s = 600\n";
    std::fs::write(&d.config_path, changed).unwrap();
    d.signal("HUP");
    d.expect_log("take effect after a restart", Duration::from_secs(5));
}

/// SIGHUP takes a file only if a start would: a plugin no file or built-in provides, or
/// a certificate that cannot be read, is refused with the reason as `check-config` gives
/// it, not taken with a "needs a restart" warning the next start then contradicts (found
/// by an outside review).
#[test]
fn sighup_refuses_a_file_the_next_start_would_refuse() {
    let d = Daemon::start();
    let text = std::fs::read_to_string(&d.config_path).unwrap();
    let cases = [
        (
            format!("{text}\n[plugins]\nauth = [\"conector\"]\n"),
            "no built-in plugin or plugin file provides `conector`",
        ),
        (
            text.replacen(
                "[rest]\n",
                "[rest]\nlisten_tls = [\"127.0.0.1:0\"]\ntls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"\n",
                1,
            ),
            "/nonexistent/cert.pem",
        ),
    ];
    for (bad, why) in cases {
        assert_ne!(bad, text);
        std::fs::write(&d.config_path, &bad).unwrap();
        let before = d.logs().len();
        d.signal("HUP");
        assert!(
            support::eventually(Duration::from_secs(5), || d.logs()[before..]
                .iter()
                .any(|l| l.contains("configuration not reloaded") && l.contains(why))),
            "{why}:\n{}",
            d.logs()[before..].join("\n")
        );
        assert!(
            !d.logs()[before..]
                .iter()
                .any(|l| l.contains("take effect after a restart")),
            "{}",
            d.logs()[before..].join("\n")
        );
    }
}

/// Range errors found after parsing (`Config::validate`) locate their key in the file as
/// parse errors do: file:line:column, then the key.
#[test]
fn check_config_locates_range_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[coap]\nblock_size = 100\n", "2:14", "coap.block_size"),
        (
            "[coap]\nack_timeout_ms = 10\nack_random_factor = 0.5\n",
            "3:21",
            "coap.ack_random_factor",
        ),
        ("[rest]\nlisten = []\n", "2:10", "rest.listen"),
        ("[coap]\nlisten = []\n", "2:10", "coap.listen"),
        (
            "# limits\n[limits]\n  save_interval_ms = 5\n",
            "3:22",
            "limits.save_interval_ms",
        ),
        (
            "registry = { max_endpoints = 0 }\n",
            "1:30",
            "registry.max_endpoints",
        ),
    ];
    for (text, at, key) in cases {
        let (code, err, file) = check_config(dir.path(), text);
        assert_eq!(code, Some(1), "{text:?}: {err}");
        assert!(
            err.contains(&format!("{}:{at}: key `{key}`", file.display())),
            "{text:?}: {err}"
        );
    }
}

/// The link-format endpoint list percent-encodes each name as its link's URI segment:
/// names may hold `<`, `>`, `"`, `,`, `;`, spaces, `\`, `%` and non-ASCII characters
/// (registration refuses only control characters and `/ ? #`), which were written raw:
/// `<q"uo>te,x>` is not link-format, and `ünï-%41` read back as `ünï-A`. Each link's
/// target, percent-decoded, is the name again.
#[test]
fn link_format_endpoint_list_encodes_names_that_are_not_uri_characters() {
    let d = Daemon::in_process();
    let names = [
        "q\"uo>te,x",
        "sp ace;b",
        "back\\slash",
        "ünï-%41",
        "<lt",
        "plain-name_1.2~x:y@z",
    ];
    for name in names {
        let mut dev = d.device();
        dev.register(&[&format!("ep={name}"), "lt=300"], "</3/0>");
    }
    let r = d.get_accept("/v2/endpoints", "application/link-format");
    assert_eq!(r.status, 200, "{}", r.body);
    // Every link is `<target>;type="";status="ACTIVE";q="false"` and no target holds a
    // character that ends it or splits the list.
    let links: Vec<&str> = r.body.split(',').collect();
    assert_eq!(links.len(), names.len(), "{}", r.body);
    let mut got: Vec<String> = links
        .iter()
        .map(|l| {
            let target = l
                .strip_prefix('<')
                .and_then(|l| l.split_once('>'))
                .map(|(t, rest)| {
                    assert_eq!(rest, r#";type="";status="ACTIVE";q="false""#, "{l}");
                    t
                })
                .unwrap_or_else(|| panic!("not a link: {l}"));
            assert!(
                target
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"<>\"\\,;".contains(&b)),
                "{target}"
            );
            percent_encoding::percent_decode_str(target)
                .decode_utf8()
                .unwrap()
                .into_owned()
        })
        .collect();
    got.sort();
    let mut want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    want.sort();
    assert_eq!(got, want);
    // Unreserved characters and `:` `@` stay as they are.
    assert!(r.body.contains("<plain-name_1.2~x:y@z>"), "{}", r.body);
}

/// An endpoint without a type is listed with `"type": ""` and found by an empty `type=`
/// filter, which found nothing; one with a type is not.
#[test]
fn an_empty_type_filter_finds_the_endpoints_listed_without_a_type() {
    let d = Daemon::in_process();
    let mut typed = d.device();
    typed.register(&["ep=node-typed", "lt=60", "et=Light"], "</3/0>");
    let mut untyped = d.device();
    untyped.register(&["ep=node-untyped", "lt=60"], "</3/0>");
    let r = d.get("/v2/endpoints?type=");
    assert_eq!(
        support::strings_of(&r.json(), "name"),
        ["node-untyped"],
        "{}",
        r.body
    );
    assert_eq!(r.json()[0]["type"], "");
    let r = d.get("/v2/endpoints?type=Light");
    assert_eq!(
        support::strings_of(&r.json(), "name"),
        ["node-typed"],
        "{}",
        r.body
    );
    assert_eq!(d.get("/v2/endpoints").json().as_array().unwrap().len(), 2);
}
