//! The core auth matrix: for every route, no credential, a wrong one, a revoked one, an
//! expired one, one without the scope and one from another domain are refused with the
//! right status and a JSON error; the allowed ones pass. Keys come from the built-in
//! `connector` (the admin key) and `pelion` backends (users, applications, access keys).

use crate::support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use support::{Daemon, Prepared, http};

/// Every core scope but admin.
const ALL_USER_SCOPES: [&str; 9] = connectord_plugin_sdk::auth::NON_ADMIN_SCOPES;

const PERMISSIONS: [&str; 6] = [
    "view_applications",
    "create_application",
    "revoke_application",
    "view_access_keys_any_application",
    "create_access_keys_any_application",
    "revoke_access_keys_any_application",
];

use support::bearer_call as call;

/// Creates an application of a Pelion user and a key in it.
fn pelion_key(
    d: &Daemon,
    user_token: &str,
    scopes: &[&str],
    expires_at: Option<u64>,
) -> (String, String, String) {
    let mut body = json!({"name": "k", "scopes": scopes});
    if let Some(t) = expires_at {
        body["expires_at"] = json!(t);
    }
    let app = format!("app-{}", scopes.len());
    support::pelion::app_and_key(d, user_token, &app, &body)
}

/// A Pelion user `name` in `domain` with every permission and user scope: its token.
fn pelion_user(p: &Prepared, name: &str, domain: &str) -> String {
    let user = json!({"name": name, "domain": domain, "permissions": PERMISSIONS, "scopes": ALL_USER_SCOPES});
    p.plugin_call_str("pelion", "create_user", &user, "token")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn every_route_refuses_bad_credentials_and_admits_good_ones() {
    let p = Prepared::new("", "[plugins]\nauth = [\"connector\", \"pelion\"]\n");
    // Every route is asked with bad credentials, far more than an address may fail a
    // minute (connections::an_address_that_fails_authentication_too_often_waits).
    let text = std::fs::read_to_string(&p.config_path).unwrap();
    let text = text.replacen("[rest]\n", "[rest]\nauth_failures_per_minute = 0\n", 1);
    std::fs::write(&p.config_path, text).unwrap();
    let user = |domain: &str| pelion_user(&p, &format!("ops-{domain}"), domain);
    let (user_a, user_b) = (user("default"), user("other"));
    let d = p.start_in_process();
    let admin = d.key.clone();

    let (_, _, full) = pelion_key(&d, &user_a, &ALL_USER_SCOPES, None);
    let (_, _, reader) = pelion_key(&d, &user_a, &["endpoints:read"], None);
    let (app, kid, revoked) = pelion_key(&d, &user_a, &["endpoints:read"], None);
    let key = format!("/pelion/v1/applications/{app}/access-keys/{kid}");
    let r = support::pelion::revoke(&d, &user_a, &key);
    assert_eq!(r.status, 200, "{}", r.body);
    let (_, _, expired) = pelion_key(&d, &user_a, &ALL_USER_SCOPES, Some(now_ms() + 1500));
    let (_, _, other) = pelion_key(&d, &user_b, &ALL_USER_SCOPES, None);
    std::thread::sleep(Duration::from_millis(1600));

    d.device().register(
        &["ep=dev", "lt=300"],
        "</1/0>,</3/0>,</3303/0/5700>;obs,</9/0>",
    );
    let cert_body = json!({"domain": "default", "publickey": "not a key"});
    let psk_body = json!({"psk_identity": "dev-id", "psk": "000102030405060708090a0b0c0d0e0f"});
    let presubs = json!([]);
    // (method, path, body, scope it needs)
    let routes: Vec<(&str, &str, Option<&Value>, &str)> = vec![
        ("GET", "/", None, "endpoints:read"),
        ("GET", "/rest-versions", None, "endpoints:read"),
        ("GET", "/v2/endpoints", None, "endpoints:read"),
        ("GET", "/v2/endpoints/dev", None, "endpoints:read"),
        ("GET", "/v2/endpoints/dev/3/0/0", None, "resources:read"),
        ("PUT", "/v2/endpoints/dev/1/0/1", None, "resources:write"),
        ("POST", "/v2/endpoints/dev/3/0/4", None, "resources:write"),
        ("DELETE", "/v2/endpoints/dev/9/0", None, "resources:write"),
        (
            "GET",
            "/v2/notification/pull?noWait=true",
            None,
            "notifications",
        ),
        ("GET", "/v2/notification/callback", None, "notifications"),
        ("DELETE", "/v2/notification/callback", None, "notifications"),
        ("GET", "/v2/subscriptions", None, "subscriptions:read"),
        (
            "PUT",
            "/v2/subscriptions",
            Some(&presubs),
            "subscriptions:write",
        ),
        ("DELETE", "/v2/subscriptions", None, "subscriptions:write"),
        ("GET", "/v2/subscriptions/dev", None, "subscriptions:read"),
        (
            "DELETE",
            "/v2/subscriptions/dev",
            None,
            "subscriptions:write",
        ),
        (
            "GET",
            "/v2/subscriptions/dev/3303/0/5700",
            None,
            "subscriptions:read",
        ),
        (
            "PUT",
            "/v2/subscriptions/dev/3303/0/5700",
            None,
            "subscriptions:write",
        ),
        (
            "DELETE",
            "/v2/subscriptions/dev/3303/0/5700",
            None,
            "subscriptions:write",
        ),
        ("GET", "/v2/limits", None, "limits:read"),
        ("POST", "/api/cert", Some(&cert_body), "resources:write"),
        ("GET", "/v2/device-credentials", None, "endpoints:read"),
        ("GET", "/v2/device-credentials/dev", None, "endpoints:read"),
        (
            "PUT",
            "/v2/device-credentials/dev",
            Some(&psk_body),
            "resources:write",
        ),
        (
            "DELETE",
            "/v2/device-credentials/dev",
            None,
            "resources:write",
        ),
        ("GET", "/metrics", None, "metrics:read"),
        ("GET", "/api/api_tokens", None, "keys:write"),
        ("POST", "/api/api_tokens", None, "keys:write"),
        (
            "DELETE",
            "/api/api_tokens/0000000000000000",
            None,
            "keys:write",
        ),
    ];
    let refused = |r: &support::Http, status: u16, what: &str| {
        assert_eq!(r.status, status, "{what}: {}", r.body);
        assert_eq!(r.content_type, "application/json", "{what}");
        assert!(
            r.json()["type"].is_string() && r.json()["message"].is_string(),
            "{what}: {}",
            r.body
        );
    };
    for (method, path, body, scope) in &routes {
        let what = |who: &str| format!("{method} {path} with {who}");
        refused(
            &call(&d, method, path, None, *body),
            401,
            &what("no credential"),
        );
        refused(
            &call(&d, method, path, Some("wrong-key"), *body),
            401,
            &what("a wrong key"),
        );
        refused(
            &call(&d, method, path, Some(&revoked), *body),
            401,
            &what("a revoked key"),
        );
        refused(
            &call(&d, method, path, Some(&expired), *body),
            401,
            &what("an expired key"),
        );
        refused(
            &call(&d, method, path, Some(&user_a), *body),
            403,
            &what("a user token (no core scope)"),
        );
        if *scope != "endpoints:read" {
            refused(
                &call(&d, method, path, Some(&reader), *body),
                403,
                &what("a key without the scope"),
            );
        }
        let allowed = [&admin, &full];
        for key in allowed {
            let r = call(&d, method, path, Some(key), *body);
            let admin_only = *scope == "admin" && key != &admin;
            if admin_only {
                refused(&r, 403, &what("a key without admin"));
            } else {
                assert!(
                    ![401, 403, 405].contains(&r.status),
                    "{}: {} {}",
                    what("an allowed key"),
                    r.status,
                    r.body
                );
            }
        }
    }
    // Another domain's key: its domain has no endpoint "dev".
    let other_domain: Vec<(&str, &str, u16)> = vec![
        ("GET", "/v2/endpoints/dev", 404),
        ("GET", "/v2/endpoints/dev/3/0/0", 410),
        ("PUT", "/v2/endpoints/dev/1/0/1", 410),
        ("GET", "/v2/subscriptions/dev", 404),
        ("PUT", "/v2/subscriptions/dev/3303/0/5700", 404),
    ];
    for (method, path, status) in other_domain {
        refused(
            &call(&d, method, path, Some(&other), None),
            status,
            &format!("{method} {path} from another domain"),
        );
    }
    assert_eq!(
        call(&d, "GET", "/v2/endpoints", Some(&other), None).json(),
        json!([])
    );
    let r = call(&d, "POST", "/api/cert", Some(&other), Some(&cert_body));
    refused(&r, 401, "a certificate for another domain");
    // That 401 names its scheme, as every 401 must (RFC 9110 §11.6.1).
    let head = raw_head(
        &d,
        "POST",
        "/api/cert",
        &other,
        cert_body.to_string().as_bytes(),
    );
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("\r\nwww-authenticate: bearer\r\n"),
        "{head}"
    );
}

/// The status line and headers of one request on a connection of its own.
fn raw_head(d: &Daemon, method: &str, path: &str, key: &str, body: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(d.rest).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let all = String::from_utf8_lossy(&all).into_owned();
    all.split("\r\n\r\n").next().unwrap_or_default().to_string() + "\r\n"
}

/// A Losant API token deleted by the operator (`connectord plugin-call losant
/// delete_token`, another process) stops authenticating on the running daemon. Before, a
/// token could not be revoked at all.
#[test]
fn a_deleted_losant_token_stops_working_on_the_running_daemon() {
    let p = Prepared::new("", "[plugins]\nauth = [\"connector\", \"losant\"]\n");
    let (app_id, _) = p.losant_app("plant");
    let (id, token) = p.losant_token(&app_id);
    let d = p.start_in_process();
    let keys = format!("/applications/{app_id}/keys");
    assert_eq!(call(&d, "GET", &keys, Some(&token), None).status, 200);
    let answer = support::plugin_call(&d.config_path, "losant", "delete_token", &json!({"id": id}));
    assert_eq!(answer, json!({"deleted": id}));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while call(&d, "GET", &keys, Some(&token), None).status != 401 {
        assert!(
            std::time::Instant::now() < deadline,
            "the deleted token still works"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Losant application keys (Basic key:secret) reach only the endpoints and resources
/// their filters and topics allow; API tokens manage the keys.
#[test]
fn losant_application_keys_are_limited_to_their_devices() {
    let p = Prepared::new("", "[plugins]\nauth = [\"connector\", \"losant\"]\n");
    let app = p.plugin_call(
        "losant",
        "create_application",
        &json!({"name": "plant", "domain": "default"}),
    );
    let app_id = app["id"].as_str().unwrap().to_string();
    let token = p.plugin_call_str(
        "losant",
        "create_token",
        &json!({"application_id": app_id, "scopes": ["all.Application"]}),
        "token",
    );
    let d = p.start_in_process();
    d.device()
        .register(&["ep=sensor-1", "lt=300"], "</3303/0/5700>;obs,</3/0>");
    d.device().register(&["ep=pump-1", "lt=300"], "</3/0>");

    let body = json!({"description": "dashboard", "filterType": "whitelist", "deviceTags": [{"key": "endpoint", "value": "sensor-*"}]});
    let r = call(
        &d,
        "POST",
        &format!("/applications/{app_id}/keys"),
        Some(&token),
        Some(&body),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let (key, secret) = (
        r.json()["key"].as_str().unwrap().to_string(),
        r.json()["secret"].as_str().unwrap().to_string(),
    );
    let listed = call(
        &d,
        "GET",
        &format!("/applications/{app_id}/keys?sortField=key&sortDirection=asc"),
        Some(&token),
        None,
    );
    assert_eq!(listed.status, 200);
    assert_eq!(listed.json()["count"], 1);
    assert!(
        listed.json()["items"][0].get("secret").is_none(),
        "the secret is shown once"
    );
    let r = call(
        &d,
        "GET",
        "/applications/000000000000000000000000/keys",
        Some(&token),
        None,
    );
    assert_eq!(
        (r.status, r.json()),
        (
            404,
            json!({"type": "NotFound", "message": "Application was not found"})
        )
    );

    use base64::Engine;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:{secret}"))
    );
    let get = |path: &str| http("GET", &d.url(path), &[("Authorization", &basic)], None);
    let names: Vec<Value> = get("/v2/endpoints")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].clone())
        .collect();
    assert_eq!(
        names,
        vec![json!("sensor-1")],
        "only the allowed device is listed"
    );
    assert_eq!(get("/v2/endpoints/sensor-1").status, 200);
    assert_eq!(get("/v2/endpoints/pump-1").status, 403);
    assert_eq!(get("/v2/endpoints/pump-1/3/0/0").status, 403);
    let wrong = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:nope"))
    );
    assert_eq!(
        http(
            "GET",
            &d.url("/v2/endpoints"),
            &[("Authorization", &wrong)],
            None
        )
        .status,
        401
    );
}

/// Header key pairs (ApiRdKey/ApiWrKey): read needs the rd key, write both.
#[test]
fn header_key_pairs_guard_their_areas() {
    let p = Prepared::new("", "[plugins]\nauth = [\"headerkeys\", \"connector\"]\n");
    let (erd, _) = p.headerkeys_pair("endpoints");
    let (rrd, rwr) = p.headerkeys_pair("resources");
    let (ard, _) = p.headerkeys_pair("apikeys");
    let d = p.start_in_process();
    d.device().register(&["ep=dev", "lt=300"], "</3/0>");
    let r = http("GET", &d.url("/v2/endpoints"), &[("ApiRdKey", &erd)], None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        http(
            "GET",
            &d.url("/v2/endpoints"),
            &[("ApiRdKey", "wrong")],
            None
        )
        .status,
        401
    );
    // Writing a resource: the write key alone is not enough; both are.
    let put = |h: &[(&str, &str)]| http("PUT", &d.url("/v2/endpoints/dev/3/0/1"), h, Some(b"x"));
    assert_eq!(put(&[("ApiWrKey", &rwr)]).status, 401);
    assert_eq!(
        put(&[("ApiRdKey", &rrd)]).status,
        401,
        "a read key does not write"
    );
    assert_eq!(put(&[("ApiRdKey", &rrd), ("ApiWrKey", &rwr)]).status, 202);
    // The apikeys area guards itself: the admin Bearer key alone does not read it.
    let admin = format!("Bearer {}", d.key);
    assert_eq!(
        http(
            "GET",
            &d.url("/api/v1/apikeys"),
            &[("Authorization", &admin)],
            None
        )
        .status,
        401
    );
    let r = http(
        "GET",
        &d.url("/api/v1/apikeys"),
        &[("ApiRdKey", &ard)],
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["Json+typeName"], "MkcJsonLib.jApiKeys");
}

/// `headerkeys`' own area refuses a caller the core authenticated (any valid key) unless
/// it shows the area's pair: that 401 named no scheme (RFC 9110 §11.6.1 wants one), and it
/// did not count as a failed authentication, so any key opened an unbounded guess at the
/// `apikeys` pair. Now it carries `WWW-Authenticate` and counts toward
/// `rest.auth_failures_per_minute` like the core's 401s.
#[test]
fn a_plugin_routes_own_refusal_names_its_scheme_and_counts_as_a_failure() {
    let p = Prepared::new("", "[plugins]\nauth = [\"headerkeys\", \"connector\"]\n");
    let text = std::fs::read_to_string(&p.config_path).unwrap();
    let text = text.replacen("[rest]\n", "[rest]\nauth_failures_per_minute = 2\n", 1);
    std::fs::write(&p.config_path, text).unwrap();
    let (ard, _) = p.headerkeys_pair("apikeys");
    let d = p.start_in_process();
    for _ in 0..2 {
        let head = raw_head(&d, "GET", "/api/v1/apikeys", &d.key, b"");
        assert!(head.starts_with("HTTP/1.1 401"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("\r\nwww-authenticate: bearer\r\n"),
            "{head}"
        );
    }
    // Two failures a minute: the third request, with the right pair, waits.
    let head = raw_head(&d, "GET", "/api/v1/apikeys", &d.key, b"");
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    let r = http(
        "GET",
        &d.url("/api/v1/apikeys"),
        &[("ApiRdKey", &ard)],
        None,
    );
    assert_eq!(r.status, 429, "{}", r.body);
}

/// The connector backend lets the host reuse its verdicts for a second (no plugin call per
/// request); a state-changing plugin operation (here: creating a key) voids every reused
/// verdict at once, and refusals are never reused. (Reading the metric is itself a request
/// with the admin key, so each read counts in what it reads.)
#[test]
fn reused_verdicts_are_voided_by_a_plugin_state_change() {
    let d = Daemon::in_process();
    let admin = d.key.clone();
    let get = |key: &str| call(&d, "GET", "/v2/endpoints", Some(key), None).status;
    let reused = || d.metric("auth_reused_total");
    let r0 = reused();
    for _ in 0..10 {
        assert_eq!(get(&admin), 200);
    }
    let r1 = reused();
    assert!(r1 >= r0 + 5, "verdicts reused: {} of 11 requests", r1 - r0);

    // Refusals are asked every time (and still refused): only the read itself is reused.
    for _ in 0..3 {
        assert_eq!(get("not-a-key"), 401);
    }
    assert_eq!(reused(), r1 + 1);

    // Creating a key (authenticated by a reused verdict) changes the plugin's state: the
    // next request asks the backend again, the one after is reused again.
    let created = call(
        &d,
        "POST",
        "/api/api_tokens",
        Some(&admin),
        Some(&json!({"name": "second"})),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(reused(), r1 + 2, "a voided verdict was reused");
    assert_eq!(reused(), r1 + 3);
    let new_key = created.json()["access_key"].as_str().unwrap().to_string();
    assert_eq!(get(&new_key), 200);
}

/// A reused verdict never skips a backend listed before the one that answered (issue 18,
/// item 12). `headerkeys` is asked first and says not_mine to a Bearer key alone, so
/// `connector` accepts; the same Bearer key with a wrong `ApiRdKey` added is headerkeys'
/// to refuse, even right after (a reused verdict keyed by `authorization` alone answered 200).
#[test]
fn a_reused_verdict_does_not_skip_an_earlier_backend() {
    let d = Daemon::in_process_with("[plugins]\nauth = [\"headerkeys\", \"connector\"]\n");
    let bearer = format!("Bearer {}", d.key);
    let get = |h: &[(&str, &str)]| http("GET", &d.url("/v2/endpoints"), h, None).status;
    for _ in 0..3 {
        assert_eq!(get(&[("Authorization", &bearer)]), 200);
        assert_eq!(
            get(&[("Authorization", &bearer), ("ApiRdKey", "wrong")]),
            401,
            "headerkeys, listed first, was skipped"
        );
    }
}

/// A request with a raw body and the given Content-Type (none when `None`).
fn send_raw(
    d: &Daemon,
    method: &str,
    path: &str,
    key: &str,
    content_type: Option<&str>,
    body: &str,
) -> support::Http {
    let auth = format!("Bearer {key}");
    let mut h = vec![("Authorization", auth.as_str())];
    if let Some(ct) = content_type {
        h.push(("Content-Type", ct));
    }
    http(method, &d.url(path), &h, Some(body.as_bytes()))
}

/// Issue 18, item 4: a JSON route refuses a body that is JSON but not an object (400), a
/// Content-Type that is present and not JSON (415), and (Connector) names with control
/// characters, each in its API's error shape; no Content-Type and `+json` are accepted.
#[test]
fn json_routes_refuse_non_objects_non_json_types_and_control_characters() {
    let p = Prepared::new(
        "",
        "[plugins]\nauth = [\"connector\", \"pelion\", \"losant\"]\n",
    );
    let user = pelion_user(&p, "ops", "default");
    let (app, token) = p.losant_app("plant");
    let d = p.start_in_process();
    let admin = d.key.clone();
    let (pelion_app, _, _) = pelion_key(&d, &user, &["endpoints:read"], None);
    let pelion_keys = format!("/pelion/v1/applications/{pelion_app}/access-keys");
    let losant_keys = format!("/applications/{app}/keys");

    // An array in the struct's field order was a 201 `admin` key before.
    let r = send_raw(
        &d,
        "POST",
        &pelion_keys,
        &user,
        Some("application/json"),
        r#"["k", "", ["admin"], null]"#,
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["type"], "bad_request");
    assert_eq!(
        r.json()["message"],
        "the request body must be a JSON object"
    );
    let r = send_raw(
        &d,
        "PUT",
        "/notification/callback",
        &admin,
        Some("application/json"),
        r#"["http://127.0.0.1:9/cb", {}]"#,
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["type"], "bad_request");
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("JSON object"),
        "{}",
        r.body
    );
    let r = send_raw(
        &d,
        "POST",
        "/api/api_tokens",
        &admin,
        Some("application/json"),
        "[]",
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["type"], "bad_request");
    let r = send_raw(
        &d,
        "POST",
        &losant_keys,
        &token,
        Some("application/json"),
        "[]",
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["type"], "Validation");

    // Connector key names with NUL, BEL or a newline.
    for name in ["a\u{0}b", "bell\u{7}", "two\nlines"] {
        let r = send_raw(
            &d,
            "POST",
            "/api/api_tokens",
            &admin,
            Some("application/json"),
            &json!({"name": name}).to_string(),
        );
        assert_eq!(r.status, 400, "{name:?}: {}", r.body);
        assert_eq!(r.json()["type"], "bad_request");
        assert!(
            r.json()["message"]
                .as_str()
                .unwrap()
                .contains("control characters"),
            "{}",
            r.body
        );
    }

    // 415 on every JSON route, in each API's spelling.
    let cases: [(&str, &str, &str, &str, &str); 6] = [
        (
            "POST",
            "/api/api_tokens",
            admin.as_str(),
            r#"{"name": "n"}"#,
            "unsupported_media_type",
        ),
        (
            "POST",
            "/pelion/v1/applications",
            user.as_str(),
            r#"{"name": "n"}"#,
            "unsupported_media_type",
        ),
        (
            "POST",
            &pelion_keys,
            user.as_str(),
            r#"{"name": "n", "scopes": ["endpoints:read"]}"#,
            "unsupported_media_type",
        ),
        (
            "POST",
            &losant_keys,
            token.as_str(),
            "{}",
            "UnsupportedMediaType",
        ),
        (
            "PUT",
            "/notification/callback",
            admin.as_str(),
            r#"{"url": "http://127.0.0.1:9/cb"}"#,
            "unsupported_media_type",
        ),
        (
            "PUT",
            "/subscriptions",
            admin.as_str(),
            "[]",
            "unsupported_media_type",
        ),
    ];
    for (method, path, key, body, kind) in cases {
        for ct in ["text/plain", "application/x-www-form-urlencoded"] {
            let r = send_raw(&d, method, path, key, Some(ct), body);
            assert_eq!(r.status, 415, "{method} {path} {ct}: {}", r.body);
            assert_eq!(r.json()["type"], kind, "{method} {path}");
            assert!(r.json()["message"].is_string());
        }
    }
    // No Content-Type, or a JSON one with parameters or a +json suffix: accepted.
    let r = send_raw(
        &d,
        "POST",
        "/api/api_tokens",
        &admin,
        None,
        r#"{"name": "n"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = send_raw(
        &d,
        "POST",
        &losant_keys,
        &token,
        Some("application/json; charset=utf-8"),
        "{}",
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = send_raw(
        &d,
        "PUT",
        "/subscriptions",
        &admin,
        Some("application/merge-patch+json"),
        "[]",
    );
    assert_eq!(r.status, 204, "{}", r.body);
    // Resource routes take any media type.
    let r = send_raw(
        &d,
        "PUT",
        "/endpoints/nobody/3/0/1",
        &admin,
        Some("text/plain"),
        "x",
    );
    assert_ne!(r.status, 415, "{}", r.body);
}

/// Issue 18, item 5: on Losant's routes the daemon's own 401 (before the plugin runs) is
/// spelled as the plugin's, as seed 003's Error schema (`Unauthorized`); Pelion's routes
/// keep the core's `unauthorized`, as Pelion's own errors are snake_case.
#[test]
fn plugin_routes_spell_the_daemons_errors_as_their_api() {
    let p = Prepared::new(
        "",
        "[plugins]\nauth = [\"connector\", \"pelion\", \"losant\"]\n",
    );
    let app = p.plugin_call_str(
        "losant",
        "create_application",
        &json!({"name": "plant", "domain": "default"}),
        "id",
    );
    let d = p.start_in_process();
    let admin = d.key.clone();
    let keys = format!("/applications/{app}/keys");
    // The plugin's own 401: a credential another backend accepted.
    let plugin = call(&d, "GET", &keys, Some(&admin), None);
    assert_eq!(plugin.status, 401, "{}", plugin.body);
    assert_eq!(plugin.json()["type"], "Unauthorized");
    // The daemon's: no credential, an unknown one.
    for key in [None, Some("not-a-key")] {
        let r = call(&d, "GET", &keys, key, None);
        assert_eq!(r.status, 401, "{key:?}: {}", r.body);
        assert_eq!(
            r.json()["type"],
            plugin.json()["type"],
            "{key:?}: {}",
            r.body
        );
        assert_eq!(r.json().as_object().unwrap().len(), 2, "{}", r.body);
    }
    // Pelion and the core: snake_case from the daemon and from the plugin alike.
    let r = call(&d, "GET", "/pelion/v1/me", None, None);
    assert_eq!(
        (r.status, r.json()["type"].clone()),
        (401, json!("unauthorized"))
    );
    let r = call(&d, "GET", "/pelion/v1/me", Some(&admin), None);
    assert_eq!(
        (r.status, r.json()["type"].clone()),
        (403, json!("forbidden"))
    );
    let r = call(&d, "GET", "/endpoints", None, None);
    assert_eq!(
        (r.status, r.json()["type"].clone()),
        (401, json!("unauthorized"))
    );
}

/// An expired key loses its notification channel within
/// `notifications.key_check_interval_s`, as a revoked one does: its callback gets nothing
/// more. Before, only its requests were refused; its channel, callback and WebSocket
/// lived on until a write on a plugin route or a restart swept it.
#[test]
fn an_expired_keys_callback_gets_nothing_more() {
    let p = Prepared::new(
        "",
        "[plugins]\nauth = [\"connector\", \"pelion\"]\n[notifications]\nkey_check_interval_s = 1\n",
    );
    let user = pelion_user(&p, "ops", "default");
    let d = p.start_in_process();
    let rx = support::receiver::Receiver::start(0);
    let expires = now_ms() + 3000;
    let (_, _, key) = pelion_key(&d, &user, &ALL_USER_SCOPES, Some(expires));
    let url = json!({"url": rx.url("/cb")});
    let r = call(
        &d,
        "PUT",
        "/v2/notification/callback",
        Some(&key),
        Some(&url),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    d.device().register(&["ep=before", "lt=300"], "</3/0>");
    let wait = Duration::from_secs(10);
    let got = rx.wait(wait, |r| {
        crate::notifications::pushed(r, "/cb").contains(&"before".to_string())
    });
    assert!(
        crate::notifications::pushed(&got, "/cb").contains(&"before".to_string()),
        "delivered while the key lives"
    );
    // Past its expiry, and past a check after it.
    std::thread::sleep(Duration::from_millis(
        expires.saturating_sub(now_ms()) + 2500,
    ));
    let r = call(&d, "GET", "/v2/endpoints", Some(&key), None);
    assert_eq!(r.status, 401, "expired: {}", r.body);
    d.device().register(&["ep=after", "lt=300"], "</3/0>");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !crate::notifications::pushed(&rx.requests(), "/cb").contains(&"after".to_string()),
        "an expired key's callback got an event"
    );
}

/// A device-request needs the scope its body's method needs: `resources:read` for GET,
/// `resources:write` for the others. Before, the route asked `resources:read` of every
/// one, so a write-only key was refused its writes (while `PUT /endpoints/...` let it).
#[test]
fn a_device_request_needs_the_scope_of_its_method() {
    let p = Prepared::new("", "[plugins]\nauth = [\"connector\", \"pelion\"]\n");
    let user = pelion_user(&p, "ops", "default");
    let d = p.start_in_process();
    let mut dev = d.device();
    dev.register(&["ep=dev", "lt=300", "b=UQ"], "</3/0>"); // queue mode: nothing is sent
    let (_, _, writer) = pelion_key(&d, &user, &["resources:write"], None);
    let (_, _, reader) = pelion_key(&d, &user, &["resources:read", "notifications"], None);
    let get = json!({"method": "GET", "uri": "/3/0/0"});
    let put = json!({"method": "PUT", "uri": "/3/0/1", "payload-b64": "MQ=="});
    for (key, body, status, id) in [
        (&writer, &put, 202, "w-put"),
        (&writer, &get, 403, "w-get"),
        (&reader, &get, 202, "r-get"),
        (&reader, &put, 403, "r-put"),
    ] {
        let path = format!("/v2/device-requests/dev?async-id={id}");
        let r = call(&d, "POST", &path, Some(key), Some(body));
        assert_eq!(r.status, status, "{id}: {}", r.body);
    }
}
