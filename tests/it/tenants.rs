//! End-to-end tests of domains (tenants) and traffic limits.

use crate::support;

use std::time::Duration;

use coap_lite::{RequestType, ResponseType};
use serde_json::{Value, json};
use support::certs::{openssl, path};
use support::coap::{Req, code};
use support::{Prepared, http};

const WAIT: Duration = Duration::from_secs(10);

fn get(d: &support::Daemon, key: &str, path: &str) -> support::Http {
    http(
        "GET",
        &d.url(path),
        &[("Authorization", &format!("Bearer {key}"))],
        None,
    )
}

/// The default domain's first admin key (`connector` `bootstrap`), before the start.
fn bootstrap(p: &Prepared) -> String {
    let a = p.plugin_call("connector", "bootstrap", &json!({"domain": "default"}));
    a["created"].as_str().expect("created").to_string()
}

/// A `connector` key made by `create_key` with `spec`, before the start: its secret.
fn create_key(p: &Prepared, spec: Value) -> String {
    let k = p.plugin_call("connector", "create_key", &spec);
    k["access_key"].as_str().expect("access_key").to_string()
}

#[test]
fn every_key_sees_only_its_own_domain() {
    let p = Prepared::new("", "");
    let key_a = bootstrap(&p);
    let key_b = create_key(&p, json!({"name": "tenant-b ops", "domain": "tenant-b"}));
    let mut d = p.start();
    d.key = key_a.clone();
    // Both keys open a channel before the devices register.
    assert_eq!(
        get(&d, &key_a, "/v2/notification/pull?noWait=true").status,
        204
    );
    assert_eq!(
        get(&d, &key_b, "/v2/notification/pull?noWait=true").status,
        204
    );

    d.device().register(&["ep=dev-a", "lt=300"], "</3/0>;obs");
    d.device()
        .register(&["ep=dev-b", "lt=300", "d=tenant-b"], "</3/0>;obs");
    // The same name in both domains is two endpoints.
    d.device().register(&["ep=same", "lt=300"], "</3/0>");
    d.device()
        .register(&["ep=same", "lt=300", "d=tenant-b"], "</4/0>");

    let names = |key: &str| -> Vec<String> {
        support::strings_of(&get(&d, key, "/v2/endpoints").json(), "name")
    };
    assert_eq!(names(&key_a), vec!["dev-a", "same"]);
    assert_eq!(names(&key_b), vec!["dev-b", "same"]);
    assert_eq!(
        get(&d, &key_a, "/v2/endpoints/same").json()[0]["uri"],
        "/3/0"
    );
    assert_eq!(
        get(&d, &key_b, "/v2/endpoints/same").json()[0]["uri"],
        "/4/0"
    );

    // Another domain's endpoint does not exist for a key.
    assert_eq!(get(&d, &key_b, "/v2/endpoints/dev-a").status, 404);
    for (method, path, status) in [
        ("GET", "/v2/endpoints/dev-a/3/0/0", 410),
        ("PUT", "/v2/subscriptions/dev-a/3/0", 404),
    ] {
        let auth = format!("Bearer {key_b}");
        let r = http(method, &d.url(path), &[("Authorization", &auth)], None);
        assert_eq!(r.status, status, "{method} {path}");
    }

    // Registration events reach only the channels of the device's domain.
    let events = |key: &str| -> Vec<String> {
        let r = get(&d, key, "/v2/notification/pull?noWait=true");
        assert_eq!(r.status, 200, "{}", r.body);
        support::strings_of(&r.json()["registrations"], "ep")
    };
    assert_eq!(events(&key_a), vec!["dev-a", "same"]);
    assert_eq!(events(&key_b), vec!["dev-b", "same"]);
    // Each key's limits are its domain's.
    assert_eq!(get(&d, &key_b, "/v2/limits").json()["endpoint-count"], 2);
}

/// The transaction quota counts requests that go out (seed 000): it is taken last, so a
/// request refused with 409 (here: noResp to a queue-mode endpoint; also 503 and a full
/// queue's 429) counts nothing, and a client retrying it does not use up its domain's
/// quota.
#[test]
fn refused_requests_count_no_transaction() {
    let d = Prepared::new("", "[limits]\ntransaction_quota = 5\n").start();
    let mut dev = d.device();
    dev.register(&["ep=queued", "lt=300", "b=UQ"], "</3/0>"); // 1
    assert_eq!(d.get("/v2/limits").json()["transaction-count"], 1);
    for _ in 0..8 {
        let r = d.call("GET", "/v2/endpoints/queued/3/0/0?noResp=true", None, None);
        assert_eq!(r.status, 409, "{}", r.body);
    }
    assert_eq!(d.get("/v2/limits").json()["transaction-count"], 1);
    // A request that goes out still counts.
    let r = d.call("GET", "/v2/endpoints/queued/3/0/0", None, None);
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(d.get("/v2/limits").json()["transaction-count"], 2);
}

/// A subscription whose observe the quota refuses (429) is not kept: the client was told
/// it is not subscribed, so it is not listed, and the device is not observed later.
#[test]
fn a_subscription_refused_over_the_quota_is_not_kept() {
    let d = Prepared::new("", "[limits]\ntransaction_quota = 1\n").start();
    let mut dev = d.device();
    dev.register(&["ep=sub", "lt=300"], "</3/0/0>;obs"); // 1: the quota is used up
    let r = d.call("PUT", "/v2/subscriptions/sub/3/0/0", None, None);
    assert_eq!(r.status, 429, "{}", r.body);
    let r = d.call("GET", "/v2/subscriptions/sub/3/0/0", None, None);
    assert_eq!(r.status, 404, "{}", r.body);
    let r = d.call("GET", "/v2/subscriptions/sub", None, None);
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(
        dev.recv_request(Duration::from_millis(500)).is_none(),
        "observed"
    );
}

/// Two concurrent `PUT`s of one subscription by one key, whose observes the endpoint's
/// queue (room for one) accepts and refuses: the subscription stays, whichever call
/// stored it. Before, the call that stored it took it away when its own observe was the
/// refused one (the other call finds it stored, does not wait for the store write and
/// queues its observe first), though the other call's client was answered 202.
#[test]
fn a_subscription_stays_when_one_of_two_concurrent_calls_is_accepted() {
    let d = Prepared::new("", "[requests]\nqueue_len = 1\n").start();
    for round in 0..12 {
        let mut dev = d.device();
        let ep = format!("race{round}");
        dev.register(&[&format!("ep={ep}"), "lt=300"], "</3/0/0>;obs,</3/0/1>");
        // A read the device leaves unanswered is in flight: the queue has room for one.
        let r = d.call("GET", &format!("/v2/endpoints/{ep}/3/0/1"), None, None);
        assert_eq!(r.status, 202, "{}", r.body);
        assert!(
            dev.recv_request(WAIT).is_some(),
            "the read reached the device"
        );
        let path = format!("/v2/subscriptions/{ep}/3/0/0");
        let mut statuses = support::at_once(2, |_| d.call("PUT", &path, None, None).status);
        statuses.sort();
        assert_eq!(statuses, [202, 429], "round {round}");
        let r = d.call("GET", &path, None, None);
        assert_eq!(
            r.status, 200,
            "round {round}: the subscription answered 202 is gone: {}",
            r.body
        );
    }
}

#[test]
fn limits_count_transactions_and_refuse_over_the_quota() {
    let d = Prepared::new(
        "",
        "[limits]\ntransaction_quota = 4\n[registry]\nmax_endpoints_per_domain = 10\n",
    )
    .start();
    let fresh = d.get("/v2/limits").json();
    for (field, want) in [
        ("transaction-quota", 4),
        ("transaction-count", 0),
        ("endpoint-quota", 10),
        ("endpoint-count", 0),
    ] {
        assert_eq!(fresh[field], want, "{field} in {fresh}");
    }
    // The key has no notification channel yet (issue 23: the channel's limits, and the
    // key's own channel once it has one).
    assert_eq!(
        fresh["notification-channel"]["channel"],
        Value::Null,
        "{fresh}"
    );
    let mut dev = d.device();
    let id = dev.register(&["ep=counted", "lt=300"], "</3/0>"); // 1
    assert_eq!(dev.update(&id, &[], None), ResponseType::Changed); // 2
    let rid = d.async_request("GET", "/v2/endpoints/counted/3/0/0", None, None); // 3
    let (req, from) = dev.recv_request(WAIT).unwrap();
    dev.reply(&req, from, ResponseType::Content, b"x", None, None);
    d.async_response(&rid, WAIT);
    assert_eq!(dev.update(&id, &[], None), ResponseType::Changed); // 4
    assert_eq!(d.get("/v2/limits").json()["transaction-count"], 4);
    assert_eq!(d.get("/v2/limits").json()["endpoint-count"], 1);

    // Over the quota: REST 429, registration and update 4.29.
    let r = d.call("GET", "/v2/endpoints/counted/3/0/0", None, None);
    assert_eq!(
        (r.status, r.json()["type"].as_str()),
        (429, Some("too_many_requests"))
    );
    assert!(r.json()["message"].as_str().unwrap().contains("quota"));
    assert_eq!(dev.update(&id, &[], None), ResponseType::TooManyRequests);
    let mut other = d.device();
    let mut reg = Req::new(RequestType::Post, &["rd"]);
    reg.query = &["ep=refused", "lt=300"];
    let resp = other.request(&reg);
    assert_eq!(code(&resp), ResponseType::TooManyRequests);
    // A removal is never refused.
    assert_eq!(dev.deregister(&id), ResponseType::Deleted);
    assert!(d.metric("limits_refused_total") >= 3);
}

/// A key made by `connectord plugin-call` (another process, writing the state directly)
/// works in the daemon already running on that state, without a restart: the daemon sees
/// the foreign write and loads its plugins again.
#[test]
fn a_key_made_by_plugin_call_works_in_the_running_daemon() {
    let d = Prepared::new("", "").start();
    let made = support::plugin_call(
        &d.config_path,
        "connector",
        "create_key",
        &json!({"name": "late tenant", "domain": "tenant-late"}),
    );
    let key = made["access_key"].as_str().unwrap().to_string();
    assert!(
        support::eventually(Duration::from_secs(10), || get(&d, &key, "/v2/endpoints")
            .status
            == 200),
        "the new key was not accepted: {:?}",
        get(&d, &key, "/v2/endpoints")
    );
    assert!(d.wait_log("written by another process", Duration::from_secs(1)));
    // The daemon's own admin key still works after the plugins were loaded again.
    assert_eq!(d.get("/v2/endpoints").status, 200);
}

/// The last 24 hours' counts outlive the process: saved at a clean stop, and every
/// `save_interval_ms` against a crash. A restart is no way round the quota.
#[test]
fn limits_counts_survive_a_restart_and_a_crash() {
    // An hour between saves: what the first daemon counted is stored only by its save at
    // the clean stop.
    let d = Prepared::new(
        "",
        "[limits]\ntransaction_quota = 4\nsave_interval_ms = 3600000\n",
    )
    .start();
    let mut dev = d.device();
    let id = dev.register(&["ep=kept", "lt=300"], "</3/0>"); // 1
    assert_eq!(dev.update(&id, &[], None), ResponseType::Changed); // 2
    let text = std::fs::read_to_string(&d.config_path).unwrap();
    std::fs::write(
        &d.config_path,
        text.replace("save_interval_ms = 3600000", "save_interval_ms = 50"),
    )
    .unwrap();
    let d = d.stop_and_restart();
    assert_eq!(d.get("/v2/limits").json()["transaction-count"], 2);
    // The daemon came back on another port; the device follows it.
    dev.server = d.coap;
    assert_eq!(dev.update(&id, &[], None), ResponseType::Changed); // 3
    // Twenty save intervals: the count is stored before the crash.
    std::thread::sleep(Duration::from_secs(1));
    let d = d.crash_and_restart();
    assert_eq!(d.get("/v2/limits").json()["transaction-count"], 3);
    dev.server = d.coap;
    assert_eq!(dev.update(&id, &[], None), ResponseType::Changed); // 4
    assert_eq!(
        dev.update(&id, &[], None),
        ResponseType::TooManyRequests,
        "the quota counts across restarts"
    );
}

/// `POST /api/cert`: a device certificate for a P-256 public key, signed by the daemon's
/// CA (checked with openssl).
#[test]
fn developer_tools_issue_device_certificates() {
    let d = support::Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("device.key");
    let public = support::certs::p256_key(&key);
    let body = json!({"domain": "default", "publickey": public});
    let r = d.send_json("POST", "/api/cert", body.to_string());
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    assert_eq!(v["domain"], "default");
    let endpoint = v["endpoint"].as_str().unwrap();
    let (ca, cert) = (dir.path().join("ca.pem"), dir.path().join("device.pem"));
    std::fs::write(&ca, v["server_certificate"].as_str().unwrap()).unwrap();
    std::fs::write(&cert, v["device_certificate"].as_str().unwrap()).unwrap();
    let verified = openssl(&["verify", "-CAfile", path(&ca), path(&cert)]);
    assert!(verified.contains(": OK"), "{verified}");
    let subject = openssl(&["x509", "-noout", "-subject", "-in", path(&cert)]);
    assert!(subject.contains(endpoint), "{subject}");

    let bad = [
        (b"{not json".to_vec(), 400),
        (json!({"domain": "default"}).to_string().into_bytes(), 400),
        (json!({"domain": "default", "publickey": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"}).to_string().into_bytes(), 400),
        (json!({"domain": "elsewhere", "publickey": public}).to_string().into_bytes(), 401),
    ];
    for (body, status) in bad {
        let r = d.send_json("POST", "/api/cert", &body);
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&body));
        assert!(r.json()["message"].is_string());
    }
    // Seed 000's "other 256 bit curves" are refused with the reason: the device transports
    // could not verify a certificate for them (docs/openapi.json, certs module docs).
    for curve in ["secp256k1", "brainpoolP256r1", "brainpoolP256t1"] {
        let other = dir.path().join(format!("{curve}.key"));
        let opt = format!("ec_paramgen_curve:{curve}");
        let key = path(&other);
        openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", &opt, "-out", key]);
        let public = openssl(&["pkey", "-in", key, "-pubout"]);
        let body = json!({"domain": "default", "publickey": public}).to_string();
        let r = d.send_json("POST", "/api/cert", body.as_bytes());
        assert_eq!(r.status, 400, "{curve}: {}", r.body);
        let message = r.json()["message"].as_str().unwrap().to_string();
        assert!(
            message.contains(&format!("EC keys on {curve} are not supported"))
                && message.contains("could not be verified by the device transports")
                && message.contains("secp256r1"),
            "{curve}: {message}"
        );
    }
    // The CA is kept: a restart signs with the same one.
    let d = d.crash_and_restart();
    let r = d.send_json(
        "POST",
        "/api/cert",
        json!({"domain": "default", "publickey": public}).to_string(),
    );
    assert_eq!(r.json()["server_certificate"], v["server_certificate"]);
}

/// `registry.max_endpoints` bounds the registry over all domains: a device names its own
/// domain with `d=`, so the per-domain quota alone bounds nothing. Past it: 5.03 with a
/// diagnostic; room made by a de-registration is usable at once.
#[test]
fn the_total_endpoint_limit_holds_across_domains() {
    let d = Prepared::new("", "[registry]\nmax_endpoints = 3\n").start();
    let mut devs: Vec<_> = (0..4).map(|_| d.device()).collect();
    let mut ids = Vec::new();
    for (i, dev) in devs.iter_mut().take(3).enumerate() {
        let domain = format!("d=tenant-{i}");
        ids.push(dev.register(&["ep=dev", &domain, "lt=300"], "</3/0>"));
    }
    let mut reg = Req::new(RequestType::Post, &["rd"]);
    reg.query = &["ep=dev", "d=tenant-3", "lt=300"];
    reg.payload = b"</3/0>";
    let refused = devs[3].request(&reg);
    assert_eq!(code(&refused), ResponseType::ServiceUnavailable);
    let why = String::from_utf8_lossy(&refused.payload).to_string();
    assert!(why.contains("registry.max_endpoints"), "{why}");
    assert_eq!(d.metric("registered_endpoints"), 3);

    // A re-registration of a registered endpoint is not refused.
    let again = devs[0].register(&["ep=dev", "d=tenant-0", "lt=300"], "</3/0>");
    assert_ne!(again, ids[0]);
    assert_eq!(devs[1].deregister(&ids[1]), ResponseType::Deleted);
    devs[3].register(&["ep=dev", "d=tenant-3", "lt=300"], "</3/0>");
    assert_eq!(d.metric("registered_endpoints"), 3);
}

/// `/metrics` and `/v2/cluster` cover every domain (per-key series name every domain's
/// keys), so only keys of the default domain read them: another domain's key, even an
/// admin one (which implies `metrics:read`), gets 403. It read the other tenants' key ids
/// and counts.
#[test]
fn daemon_wide_metrics_are_for_keys_of_the_default_domain_only() {
    let p = Prepared::new("", "");
    let key_a = bootstrap(&p);
    let key_b = create_key(
        &p,
        json!({"name": "tenant-b admin", "domain": "tenant-b", "scopes": ["admin"]}),
    );
    let key_scraper = create_key(
        &p,
        json!({"name": "prometheus", "domain": "default", "scopes": ["metrics:read"]}),
    );
    let mut d = p.start();
    d.key = key_a.clone();
    // Both keys have a channel, so /metrics has a series for each.
    for key in [&key_a, &key_b] {
        assert_eq!(
            get(&d, key, "/v2/notification/pull?noWait=true").status,
            204
        );
    }
    for path in ["/metrics", "/v2/cluster"] {
        let r = get(&d, &key_b, path);
        assert_eq!(r.status, 403, "{path}: {}", r.body);
        assert_eq!(r.json()["type"], "forbidden");
        assert!(r.body.contains("default domain"), "{}", r.body);
        assert_eq!(get(&d, &key_a, path).status, 200, "{path}");
        assert_eq!(get(&d, &key_scraper, path).status, 200, "{path}");
    }
    // The tenant's admin key still does what its domain allows.
    assert_eq!(get(&d, &key_b, "/v2/endpoints").status, 200);
    assert_eq!(get(&d, &key_b, "/v2/limits").status, 200);
}
