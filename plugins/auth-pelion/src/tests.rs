//! Unit tests against the in-memory host. Requests on the management routes go through
//! `authenticate` first, as the core does, and the resulting principal is handed to `http`.

use connectord_plugin_sdk::Dispatch;
use connectord_plugin_sdk::auth::{AuthVerdict, OP_AUTHENTICATE, OP_KEY_STATUS};
use connectord_plugin_sdk::http::{AUTHENTICATED, OP_HTTP};
use connectord_plugin_sdk::testing::{
    MemoryHost, assert_auth_routes_operations, assert_bad_input_refused,
    assert_config_field_refused, assert_new_plugin_bootstraps_nothing, auth_request, authenticate,
    call_http, call_json, http_request, http_with_bearer, routes_of,
};
use serde_json::{Value, json};

use super::*;

const DOMAIN: &str = "tenant-a";
const OTHER_DOMAIN: &str = "tenant-b";
const ALL_SCOPES: &[&str] = &["admin"];

fn new_plugin(host: &MemoryHost) -> Pelion {
    Pelion::create(json!({}), host.host()).expect("create")
}

struct User {
    id: String,
    token: String,
}

fn make_user(
    p: &mut Pelion,
    name: &str,
    domain: &str,
    permissions: &[Permission],
    scopes: &[&str],
) -> User {
    let v = call_json(
        p,
        OP_CREATE_USER,
        &json!({"name": name, "domain": domain, "permissions": permissions, "scopes": scopes}),
    );
    assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
    User {
        id: v["id"].as_str().expect("id").to_string(),
        token: v["token"].as_str().expect("token").to_string(),
    }
}

/// A user with every permission and every scope.
fn admin_user(p: &mut Pelion, name: &str) -> User {
    make_user(p, name, DOMAIN, &Permission::ALL, ALL_SCOPES)
}

fn auth_with(p: &mut Pelion, headers: &[(&str, &str)]) -> AuthVerdict {
    authenticate(p, &auth_request("GET", "/v2/endpoints", headers))
}

fn auth(p: &mut Pelion, secret: &str) -> AuthVerdict {
    auth_with(p, &[("authorization", &format!("Bearer {secret}"))])
}

fn accepted(p: &mut Pelion, secret: &str) -> PrincipalSpec {
    match auth(p, secret) {
        AuthVerdict::Accepted { principal, .. } => principal,
        other => panic!("expected Accepted, got {other:?}"),
    }
}

/// Asserts a `Refused` whose reason contains `fragment`.
fn assert_refused(p: &mut Pelion, secret: &str, fragment: &str) {
    match auth(p, secret) {
        AuthVerdict::Refused { reason } => {
            assert!(
                reason.contains(fragment),
                "reason {reason:?} lacks {fragment:?}"
            )
        }
        other => panic!("expected Refused ({fragment}), got {other:?}"),
    }
}

/// One request by an explicit principal and bearer token; `path` may carry `?query`.
fn api_as(
    p: &mut Pelion,
    principal: PrincipalSpec,
    bearer: Option<&str>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, Value) {
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (path, None),
    };
    let authorization = bearer.map(|b| format!("Bearer {b}"));
    let mut pairs = vec![("content-type", "application/json")];
    pairs.extend(authorization.as_deref().map(|a| ("authorization", a)));
    let mut req = http_request(method, path, &pairs, body, principal);
    req.query = query;
    let (resp, body) = call_http(p, &req);
    if resp.status >= 400 {
        assert!(body["type"].is_string(), "{body}");
        assert!(body["message"].is_string(), "{body}");
    }
    (resp.status, body)
}

/// One request with a user token, authenticated first as the core does.
fn api(p: &mut Pelion, token: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    let principal = accepted(p, token);
    api_as(p, principal, Some(token), method, path, body)
}

fn create_app(p: &mut Pelion, u: &User, name: &str) -> String {
    let (status, v) = api(
        p,
        &u.token,
        "POST",
        "/pelion/v1/applications",
        &json!({"name": name}).to_string(),
    );
    assert_eq!(status, 201, "{v}");
    v["id"].as_str().unwrap().to_string()
}

fn keys_path(app: &str) -> String {
    format!("/pelion/v1/applications/{app}/access-keys")
}

fn key_path(app: &str, key: &str) -> String {
    format!("/pelion/v1/applications/{app}/access-keys/{key}")
}

fn try_create_key(p: &mut Pelion, u: &User, app: &str, body: Value) -> (u16, Value) {
    api(p, &u.token, "POST", &keys_path(app), &body.to_string())
}

/// Creates a key with `scopes`; returns (id, secret).
fn create_key(p: &mut Pelion, u: &User, app: &str, scopes: &[&str]) -> (String, String) {
    let (status, v) = try_create_key(p, u, app, json!({"name": "k", "scopes": scopes}));
    assert_eq!(status, 201, "{v}");
    (
        v["id"].as_str().unwrap().to_string(),
        v["access_key"].as_str().unwrap().to_string(),
    )
}

fn revoke_key(p: &mut Pelion, u: &User, app: &str, key: &str) {
    let (status, v) = api(
        p,
        &u.token,
        "PATCH",
        &key_path(app, key),
        r#"{"status": "revoked"}"#,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "revoked");
}

fn revoke_app(p: &mut Pelion, u: &User, app: &str) {
    let (status, v) = api(
        p,
        &u.token,
        "PATCH",
        &format!("/pelion/v1/applications/{app}"),
        r#"{"status": "revoked"}"#,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "revoked");
}

fn ids(list: &Value) -> Vec<String> {
    assert_eq!(
        list["count"].as_u64().unwrap() as usize,
        list["data"].as_array().unwrap().len()
    );
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect()
}

// ---- operations, configuration ----

#[test]
fn routes_are_all_authenticated_under_the_prefix() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let routes = routes_of(&mut p);
    assert_eq!(routes.routes.len(), api::ROUTES.len());
    for r in &routes.routes {
        assert_eq!(r.scope, AUTHENTICATED, "{r:?}");
        assert!(r.path.starts_with("/pelion/v1/"), "{r:?}");
    }
}

#[test]
fn bootstrap_creates_nothing() {
    let host = assert_new_plugin_bootstraps_nothing::<Pelion>(DOMAIN);
    assert!(host.logged("create_user"));
}

#[test]
fn create_user_op_returns_id_and_token() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = make_user(
        &mut p,
        "ops",
        DOMAIN,
        &[Permission::ManageUsers, Permission::ManageUsers],
        &["resources:read", "endpoints:read", "endpoints:read"],
    );
    assert!(u.id.starts_with("usr_"));
    assert_eq!(u.token.len(), 48);
    let (status, me) = api(&mut p, &u.token, "GET", "/pelion/v1/me", "");
    assert_eq!(status, 200);
    assert_eq!(me["id"], u.id.as_str());
    assert_eq!(me["domain"], DOMAIN);
    assert_eq!(me["permissions"], json!(["manage_users"]));
    // Canonical order, no duplicates.
    assert_eq!(me["scopes"], json!(["endpoints:read", "resources:read"]));
    assert!(me.get("token").is_none());
}

#[test]
fn create_user_op_refusals() {
    let cases: &[(&str, Value, &str)] = &[
        ("no name", json!({"domain": DOMAIN}), "name"),
        ("no domain", json!({"name": "a"}), "domain"),
        (
            "blank name",
            json!({"name": " ", "domain": DOMAIN}),
            "name must be",
        ),
        (
            "blank domain",
            json!({"name": "a", "domain": ""}),
            "domain must be",
        ),
        (
            "unknown permission",
            json!({"name": "a", "domain": DOMAIN, "permissions": ["fly"]}),
            "fly",
        ),
        (
            "unknown scope",
            json!({"name": "a", "domain": DOMAIN, "scopes": ["root"]}),
            "root",
        ),
        (
            "unknown field",
            json!({"name": "a", "domain": DOMAIN, "password": "x"}),
            "password",
        ),
        ("not an object", json!([1]), "bad input"),
        (
            "duplicate",
            json!({"name": "taken", "domain": DOMAIN}),
            "already exists",
        ),
    ];
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    make_user(&mut p, "taken", DOMAIN, &[], &[]);
    let before = host.state();
    for (what, input, fragment) in cases {
        let err = p
            .call(OP_CREATE_USER, input.to_string().as_bytes())
            .expect_err(what);
        assert!(err.contains(fragment), "{what}: {err}");
    }
    assert_eq!(host.state(), before);
    // The same name in another domain is fine.
    make_user(&mut p, "taken", OTHER_DOMAIN, &[], &[]);
}

#[test]
fn permission_names_match_serde() {
    for p in Permission::ALL {
        assert_eq!(serde_json::to_value(p).unwrap(), json!(p.as_str()));
    }
}

#[test]
fn config_empty_accepted_unknown_refused() {
    assert_config_field_refused::<Pelion>("max_applications", json!(20));
}

#[test]
fn unknown_op_and_bad_input_are_errors() {
    assert_auth_routes_operations::<Pelion>(&["create_user"]);
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let ops = [OP_AUTHENTICATE, OP_HTTP, OP_CREATE_USER];
    assert_bad_input_refused(&mut p, &ops, &[b"{}"]);
}

// ---- authentication ----

#[test]
fn user_token_principal_has_no_scopes() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "root");
    let principal = accepted(&mut p, &u.token);
    assert_eq!(principal.key_id, format!("user:{}", u.id));
    assert_eq!(principal.domain, DOMAIN);
    // No core scope at all: it opens only routes declared `authenticated` (this plugin's).
    assert!(principal.scopes.is_empty());
    assert_eq!(principal.allow, None);
    // ...where it works.
    let (status, _) = api(&mut p, &u.token, "GET", "/pelion/v1/applications", "");
    assert_eq!(status, 200);
}

#[test]
fn access_key_principal() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "root");
    let app = create_app(&mut p, &u, "a");
    let (id, secret) = create_key(
        &mut p,
        &u,
        &app,
        &["subscriptions:write", "endpoints:read", "notifications"],
    );
    assert!(id.starts_with("ak_"));
    assert_eq!(secret.len(), 48);
    let principal = accepted(&mut p, &secret);
    assert_eq!(principal.key_id, id);
    assert_eq!(principal.domain, DOMAIN);
    assert_eq!(
        principal.scopes,
        vec!["endpoints:read", "subscriptions:write", "notifications"]
    );
    // Scheme is case-insensitive, spaces trimmed.
    assert!(matches!(
        auth_with(
            &mut p,
            &[("authorization", &format!("  bEaReR   {secret} "))]
        ),
        AuthVerdict::Accepted { .. }
    ));
}

#[test]
fn unknown_bearer_is_not_mine() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "root");
    let app = create_app(&mut p, &u, "a");
    let (_, secret) = create_key(&mut p, &u, &app, &["endpoints:read"]);
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("no header", &[]),
        ("other header", &[("x-api-key", &secret)]),
        ("basic", &[("authorization", "Basic dXNlcjpwYXNz")]),
        (
            "basic with our key",
            &[("authorization", &format!("Basic {secret}"))],
        ),
        ("bearer alone", &[("authorization", "Bearer")]),
        ("blank token", &[("authorization", "Bearer   ")]),
        (
            "unknown",
            &[("authorization", "Bearer d567fde24865df35defff57862dw2r42")],
        ),
        (
            "key prefix",
            &[("authorization", &format!("Bearer {}", &secret[..47]))],
        ),
        (
            "key suffix",
            &[("authorization", &format!("Bearer {secret}x"))],
        ),
        (
            "token prefix",
            &[("authorization", &format!("Bearer {}", &u.token[..47]))],
        ),
    ];
    for (what, headers) in cases {
        assert_eq!(auth_with(&mut p, headers), AuthVerdict::NotMine, "{what}");
    }
}

// ---- limits ----

#[test]
fn ten_active_applications_per_user() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "u");
    let other = admin_user(&mut p, "other");
    let apps: Vec<String> = (0..MAX_ACTIVE_APPLICATIONS)
        .map(|i| create_app(&mut p, &u, &format!("app {i}")))
        .collect();
    let body = json!({"name": "eleventh"}).to_string();
    let (status, v) = api(&mut p, &u.token, "POST", "/pelion/v1/applications", &body);
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["type"], "limit_exceeded");
    assert!(v["message"].as_str().unwrap().contains("10"), "{v}");
    // The limit is per user: another user still may.
    create_app(&mut p, &other, "theirs");
    // A revoked application frees a slot, exactly one.
    revoke_app(&mut p, &u, &apps[3]);
    create_app(&mut p, &u, "replacement");
    let (status, v) = api(&mut p, &u.token, "POST", "/pelion/v1/applications", &body);
    assert_eq!((status, v["type"].as_str()), (409, Some("limit_exceeded")));
    // Still so after a restart.
    let mut p = new_plugin(&host);
    let (status, _) = api(&mut p, &u.token, "POST", "/pelion/v1/applications", &body);
    assert_eq!(status, 409);
}

#[test]
fn ten_active_keys_per_application() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let now = now_ms();
    p.fake_now = Some(now);
    let u = admin_user(&mut p, "u");
    let app = create_app(&mut p, &u, "a");
    let second_app = create_app(&mut p, &u, "b");
    let mut keys = Vec::new();
    for i in 0..MAX_ACTIVE_KEYS - 1 {
        keys.push(create_key(&mut p, &u, &app, &["endpoints:read"]).0);
        assert_eq!(keys.len(), i + 1);
    }
    // The tenth expires in a second.
    let (status, v) = try_create_key(
        &mut p,
        &u,
        &app,
        json!({"name": "short", "scopes": ["endpoints:read"], "expires_at": now + 1000}),
    );
    assert_eq!(status, 201, "{v}");
    let short = v["id"].as_str().unwrap().to_string();

    let eleventh = json!({"name": "eleventh", "scopes": ["endpoints:read"]});
    let (status, v) = try_create_key(&mut p, &u, &app, eleventh.clone());
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["type"], "limit_exceeded");
    // Per application: the other one still may.
    create_key(&mut p, &u, &second_app, &["endpoints:read"]);

    // A revoked key frees a slot.
    revoke_key(&mut p, &u, &app, &keys[0]);
    create_key(&mut p, &u, &app, &["endpoints:read"]);
    assert_eq!(try_create_key(&mut p, &u, &app, eleventh.clone()).0, 409);

    // An expired key frees a slot.
    p.fake_now = Some(now + 1000);
    let (_, v) = api(&mut p, &u.token, "GET", &key_path(&app, &short), "");
    assert_eq!(v["status"], "expired");
    create_key(&mut p, &u, &app, &["endpoints:read"]);
    assert_eq!(try_create_key(&mut p, &u, &app, eleventh).0, 409);
    let (_, v) = api(
        &mut p,
        &u.token,
        "GET",
        &format!("/pelion/v1/applications/{app}"),
        "",
    );
    assert_eq!(v["active_access_keys"], 10);
}

// ---- scopes ----

#[test]
fn key_scopes_never_above_the_creators() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let limited = make_user(
        &mut p,
        "limited",
        DOMAIN,
        &Permission::ALL,
        &["endpoints:read", "resources:read"],
    );
    let admin = admin_user(&mut p, "admin");
    let app = create_app(&mut p, &limited, "a");
    // (who, scopes, status, error type)
    let cases: &[(&User, Value, u16, &str)] = &[
        (&limited, json!(["endpoints:read"]), 201, ""),
        (
            &limited,
            json!(["endpoints:read", "resources:read"]),
            201,
            "",
        ),
        (&limited, json!(["resources:write"]), 403, "forbidden"),
        (
            &limited,
            json!(["endpoints:read", "resources:write"]),
            403,
            "forbidden",
        ),
        (&limited, json!(["admin"]), 403, "forbidden"),
        (&limited, json!([]), 400, "bad_request"),
        (&limited, json!(["endpoints:write"]), 400, "bad_request"),
        (&limited, json!("endpoints:read"), 400, "bad_request"),
        // `admin` in a user's scopes lets it grant any scope (its keys go to any app).
        (&admin, json!(["admin"]), 201, ""),
        (&admin, json!(["resources:write", "limits:read"]), 201, ""),
    ];
    for (who, scopes, status, kind) in cases {
        let (got, v) = try_create_key(&mut p, who, &app, json!({"name": "k", "scopes": scopes}));
        assert_eq!(got, *status, "{scopes}: {v}");
        if *status == 201 {
            let principal = accepted(&mut p, v["access_key"].as_str().unwrap());
            assert_eq!(json!(principal.scopes), v["scopes"]);
        } else {
            assert_eq!(v["type"], *kind, "{scopes}");
        }
    }
}

#[test]
fn key_scopes_and_expiry_are_not_editable() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "u");
    let app = create_app(&mut p, &u, "a");
    let (key, secret) = create_key(&mut p, &u, &app, &["endpoints:read"]);
    let path = key_path(&app, &key);
    for body in [
        json!({"scopes": ["admin"]}),
        json!({"scopes": ["endpoints:read"]}),
        json!({"name": "renamed", "scopes": ["resources:write"]}),
        json!({"expires_at": null}),
        json!({"expires_at": "2099-01-01T00:00:00Z"}),
        json!({"application_id": "app_x"}),
    ] {
        let (status, v) = api(&mut p, &u.token, "PATCH", &path, &body.to_string());
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["type"], "bad_request");
    }
    // Nothing changed, not even the name sent alongside.
    let (_, v) = api(&mut p, &u.token, "GET", &path, "");
    assert_eq!(v["name"], "k");
    assert_eq!(v["scopes"], json!(["endpoints:read"]));
    assert_eq!(accepted(&mut p, &secret).scopes, vec!["endpoints:read"]);
    // Name and description are editable.
    let (status, v) = api(
        &mut p,
        &u.token,
        "PATCH",
        &path,
        r#"{"name": "renamed", "description": "for the dashboard"}"#,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["name"], "renamed");
    assert_eq!(v["description"], "for the dashboard");
    assert_eq!(v["scopes"], json!(["endpoints:read"]));
    assert!(matches!(
        auth(&mut p, &secret),
        AuthVerdict::Accepted { .. }
    ));
}

// ---- statuses ----

#[test]
fn revoked_key_is_refused() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "u");
    let app = create_app(&mut p, &u, "a");
    let (key, secret) = create_key(&mut p, &u, &app, &["endpoints:read"]);
    let (_, other) = create_key(&mut p, &u, &app, &["endpoints:read"]);
    revoke_key(&mut p, &u, &app, &key);
    assert_refused(&mut p, &secret, "revoked");
    assert!(matches!(auth(&mut p, &other), AuthVerdict::Accepted { .. }));
    // Revoking is final.
    let path = key_path(&app, &key);
    for body in [r#"{"status": "revoked"}"#, r#"{"name": "again"}"#] {
        let (status, v) = api(&mut p, &u.token, "PATCH", &path, body);
        assert_eq!(
            (status, v["type"].as_str()),
            (409, Some("conflict")),
            "{body}"
        );
    }
    let (status, v) = api(&mut p, &u.token, "PATCH", &path, r#"{"status": "active"}"#);
    assert_eq!(status, 400, "{v}");
    // Still refused after a restart.
    let mut p = new_plugin(&host);
    assert_refused(&mut p, &secret, "revoked");
}

#[test]
fn expired_key_is_refused() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let now = now_ms();
    p.fake_now = Some(now);
    let u = admin_user(&mut p, "u");
    let app = create_app(&mut p, &u, "a");
    let expiry = time::format_ms(now + 60_000);
    let (status, v) = try_create_key(
        &mut p,
        &u,
        &app,
        json!({"name": "k", "scopes": ["endpoints:read"], "expires_at": expiry}),
    );
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["expires_at"], expiry.as_str());
    assert_eq!(v["status"], "active");
    let secret = v["access_key"].as_str().unwrap().to_string();
    let key = v["id"].as_str().unwrap().to_string();
    assert!(matches!(
        auth(&mut p, &secret),
        AuthVerdict::Accepted { .. }
    ));
    p.fake_now = Some(now + 59_999);
    assert!(matches!(
        auth(&mut p, &secret),
        AuthVerdict::Accepted { .. }
    ));
    p.fake_now = Some(now + 60_000);
    assert_refused(&mut p, &secret, "expired");
    // Listed (unlike revoked keys) with status expired; can still be renamed or revoked.
    let (_, list) = api(&mut p, &u.token, "GET", &keys_path(&app), "");
    assert_eq!(list["data"][0]["status"], "expired");
    let path = key_path(&app, &key);
    let (status, _) = api(&mut p, &u.token, "PATCH", &path, r#"{"name": "old"}"#);
    assert_eq!(status, 200);
    revoke_key(&mut p, &u, &app, &key);
    assert_refused(&mut p, &secret, "revoked");
}

#[test]
fn expired_key_is_refused_real_clock() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "u");
    let app = create_app(&mut p, &u, "a");
    let (status, v) = try_create_key(
        &mut p,
        &u,
        &app,
        json!({"name": "k", "scopes": ["endpoints:read"], "expires_at": now_ms() + 300}),
    );
    assert_eq!(status, 201, "{v}");
    let secret = v["access_key"].as_str().unwrap().to_string();
    assert!(matches!(
        auth(&mut p, &secret),
        AuthVerdict::Accepted { .. }
    ));
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_refused(&mut p, &secret, "expired");
}

#[test]
fn expiry_formats() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "u");
    let app = create_app(&mut p, &u, "a");
    let future_ms = now_ms() + 86_400_000;
    // (expires_at, status, echoed expires_at)
    let cases: &[(Value, u16, Value)] = &[
        (Value::Null, 201, Value::Null),
        (
            json!("2099-06-30T12:00:00+02:00"),
            201,
            json!("2099-06-30T10:00:00.000Z"),
        ),
        (json!(future_ms), 201, json!(time::format_ms(future_ms))),
        (json!("2001-01-01T00:00:00Z"), 400, Value::Null),
        (json!(1_000), 400, Value::Null),
        (json!(-5), 400, Value::Null),
        (json!(1.5e12), 400, Value::Null),
        (json!("tomorrow"), 400, Value::Null),
        (json!("2099-02-30T00:00:00Z"), 400, Value::Null),
        (json!(true), 400, Value::Null),
        (json!(u64::MAX), 400, Value::Null),
    ];
    for (expires_at, status, echoed) in cases {
        let (got, v) = try_create_key(
            &mut p,
            &u,
            &app,
            json!({"name": "k", "scopes": ["endpoints:read"], "expires_at": expires_at}),
        );
        assert_eq!(got, *status, "{expires_at}: {v}");
        if got == 201 {
            assert_eq!(v["expires_at"], *echoed, "{expires_at}");
        } else {
            assert!(v["message"].as_str().unwrap().contains("expires_at"), "{v}");
        }
    }
}

#[test]
fn revoked_application_keys_are_refused() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "u");
    let app = create_app(&mut p, &u, "a");
    let other_app = create_app(&mut p, &u, "b");
    let (_, k1) = create_key(&mut p, &u, &app, &["endpoints:read"]);
    let (_, k2) = create_key(&mut p, &u, &app, &["resources:read"]);
    let (_, k3) = create_key(&mut p, &u, &other_app, &["resources:read"]);
    revoke_app(&mut p, &u, &app);
    assert_refused(&mut p, &k1, "application");
    assert_refused(&mut p, &k2, "revoked");
    assert!(matches!(auth(&mut p, &k3), AuthVerdict::Accepted { .. }));
    // No new keys there, and no further change to the application.
    let (status, v) = try_create_key(
        &mut p,
        &u,
        &app,
        json!({"name": "k", "scopes": ["endpoints:read"]}),
    );
    assert_eq!((status, v["type"].as_str()), (409, Some("conflict")), "{v}");
    let (status, _) = api(
        &mut p,
        &u.token,
        "PATCH",
        &format!("/pelion/v1/applications/{app}"),
        r#"{"name": "x"}"#,
    );
    assert_eq!(status, 409);
    let mut p = new_plugin(&host);
    assert_refused(&mut p, &k1, "revoked");
}

/// A user deletes only users whose permissions and scopes it holds all of (as for
/// creating one): one with `manage_users` alone gets 403 for an administrator, and may
/// delete a user like itself. Before, it deleted the administrator.
#[test]
fn a_user_deletes_only_users_no_more_powerful_than_itself() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let admin = admin_user(&mut p, "admin");
    let clerk = make_user(&mut p, "clerk", DOMAIN, &[Permission::ManageUsers], &[]);
    let peer = make_user(&mut p, "peer", DOMAIN, &[Permission::ManageUsers], &[]);
    let scoped = make_user(
        &mut p,
        "scoped",
        DOMAIN,
        &[Permission::ManageUsers],
        &["endpoints:read"],
    );
    for (target, what) in [(&admin, "permission"), (&scoped, "scope endpoints:read")] {
        let (status, v) = api(
            &mut p,
            &clerk.token,
            "DELETE",
            &format!("/pelion/v1/users/{}", target.id),
            "",
        );
        assert_eq!(status, 403, "{v}");
        assert!(
            v["message"].as_str().unwrap_or_default().contains(what),
            "{v}"
        );
    }
    assert!(matches!(
        auth(&mut p, &admin.token),
        AuthVerdict::Accepted { .. }
    ));
    let (status, v) = api(
        &mut p,
        &clerk.token,
        "DELETE",
        &format!("/pelion/v1/users/{}", peer.id),
        "",
    );
    assert_eq!(status, 200, "{v}");
    let (status, v) = api(
        &mut p,
        &admin.token,
        "DELETE",
        &format!("/pelion/v1/users/{}", clerk.id),
        "",
    );
    assert_eq!(status, 200, "{v}");
}

#[test]
fn deleted_users_keys_are_refused() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let admin = admin_user(&mut p, "admin");
    let doomed = admin_user(&mut p, "doomed");
    let doomed_app = create_app(&mut p, &doomed, "doomed's");
    let admin_app = create_app(&mut p, &admin, "admin's");
    // Keys in the doomed user's application, by it and by someone else;
    let (_, own) = create_key(&mut p, &doomed, &doomed_app, &["endpoints:read"]);
    let (_, by_admin) = create_key(&mut p, &admin, &doomed_app, &["endpoints:read"]);
    // a key the doomed user created in someone else's application;
    let (_, elsewhere) = create_key(&mut p, &doomed, &admin_app, &["endpoints:read"]);
    // and one that has nothing to do with it.
    let (_, unrelated) = create_key(&mut p, &admin, &admin_app, &["endpoints:read"]);

    let (status, v) = api(
        &mut p,
        &admin.token,
        "DELETE",
        &format!("/pelion/v1/users/{}", doomed.id),
        "",
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["revoked_applications"], 1);
    assert_eq!(v["revoked_access_keys"], 3);

    for secret in [&own, &by_admin, &elsewhere] {
        assert!(
            matches!(auth(&mut p, secret), AuthVerdict::Refused { .. }),
            "{secret}"
        );
    }
    assert!(matches!(
        auth(&mut p, &unrelated),
        AuthVerdict::Accepted { .. }
    ));
    // The user's own token is gone.
    assert_eq!(auth(&mut p, &doomed.token), AuthVerdict::NotMine);
    let (status, _) = api(
        &mut p,
        &admin.token,
        "GET",
        &format!("/pelion/v1/users/{}", doomed.id),
        "",
    );
    assert_eq!(status, 404);
    // The admin's application lost the key the deleted user made there.
    let (_, v) = api(
        &mut p,
        &admin.token,
        "GET",
        &format!("/pelion/v1/applications/{admin_app}"),
        "",
    );
    assert_eq!(v["active_access_keys"], 1);
    // And after a restart.
    let mut p = new_plugin(&host);
    assert!(matches!(auth(&mut p, &own), AuthVerdict::Refused { .. }));
    assert!(matches!(
        auth(&mut p, &unrelated),
        AuthVerdict::Accepted { .. }
    ));
}

#[test]
fn keys_stop_working_when_the_user_record_is_missing() {
    // Even without the revocations (a user record removed some other way), a key whose
    // application owner or creator is gone is refused.
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let admin = admin_user(&mut p, "admin");
    let gone = admin_user(&mut p, "gone");
    let gone_app = create_app(&mut p, &gone, "a");
    let admin_app = create_app(&mut p, &admin, "b");
    let (_, in_gone_app) = create_key(&mut p, &admin, &gone_app, &["endpoints:read"]);
    let (_, made_by_gone) = create_key(&mut p, &gone, &admin_app, &["endpoints:read"]);
    drop(p);
    host.host()
        .state_delete(&format!("user/{}", gone.id))
        .unwrap();
    let mut p = new_plugin(&host);
    assert_refused(&mut p, &in_gone_app, "deleted");
    assert_refused(&mut p, &made_by_gone, "deleted");
}

#[test]
fn user_admin_rules() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let admin = make_user(
        &mut p,
        "admin",
        DOMAIN,
        &[Permission::ManageUsers, Permission::ViewApplications],
        &["endpoints:read", "resources:read"],
    );
    let outsider = admin_user(&mut p, "outsider-admin");
    let foreign = make_user(
        &mut p,
        "foreign",
        OTHER_DOMAIN,
        &Permission::ALL,
        ALL_SCOPES,
    );
    let path = "/pelion/v1/users";
    // (body, status, type)
    let cases: &[(Value, u16, &str)] = &[
        (
            json!({"name": "viewer", "permissions": ["view_applications"], "scopes": ["endpoints:read"]}),
            201,
            "",
        ),
        (json!({"name": "nobody"}), 201, ""),
        (
            json!({"name": "n2", "domain": DOMAIN, "permissions": ["manage_users"]}),
            201,
            "",
        ),
        (
            json!({"name": "n3", "permissions": ["create_application"]}),
            403,
            "forbidden",
        ),
        (
            json!({"name": "n4", "scopes": ["resources:write"]}),
            403,
            "forbidden",
        ),
        (json!({"name": "n5", "scopes": ["admin"]}), 403, "forbidden"),
        (
            json!({"name": "n6", "domain": OTHER_DOMAIN}),
            403,
            "forbidden",
        ),
        (json!({"name": "viewer"}), 409, "conflict"),
        (
            json!({"name": "n7", "scopes": ["bogus"]}),
            400,
            "bad_request",
        ),
        (
            json!({"name": "n8", "permissions": ["bogus"]}),
            400,
            "bad_request",
        ),
        (json!({"name": ""}), 400, "bad_request"),
    ];
    for (body, status, kind) in cases {
        let (got, v) = api(&mut p, &admin.token, "POST", path, &body.to_string());
        assert_eq!(got, *status, "{body}: {v}");
        if got == 201 {
            assert_eq!(v["domain"], DOMAIN);
            let token = v["token"].as_str().unwrap();
            let principal = accepted(&mut p, token);
            assert_eq!(
                principal.key_id,
                format!("user:{}", v["id"].as_str().unwrap())
            );
        } else {
            assert_eq!(v["type"], *kind, "{body}");
        }
    }
    // The list: this domain's users only, without tokens.
    let (status, v) = api(&mut p, &admin.token, "GET", path, "");
    assert_eq!(status, 200);
    assert_eq!(v["count"], 5);
    assert!(!ids(&v).contains(&foreign.id));
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u.get("token").is_none())
    );
    // Other domains do not exist for it.
    let foreign_path = format!("/pelion/v1/users/{}", foreign.id);
    assert_eq!(api(&mut p, &admin.token, "GET", &foreign_path, "").0, 404);
    assert_eq!(
        api(&mut p, &admin.token, "DELETE", &foreign_path, "").0,
        404
    );
    assert_eq!(
        api(
            &mut p,
            &admin.token,
            "DELETE",
            "/pelion/v1/users/usr_nope",
            ""
        )
        .0,
        404
    );
    // Nobody deletes themselves.
    let own = format!("/pelion/v1/users/{}", admin.id);
    let (status, v) = api(&mut p, &admin.token, "DELETE", &own, "");
    assert_eq!((status, v["type"].as_str()), (409, Some("conflict")));
    // A user admin may not delete a user holding more than it does (a full
    // administrator), but may delete another user admin like itself.
    let (status, v) = api(
        &mut p,
        &admin.token,
        "DELETE",
        &format!("/pelion/v1/users/{}", outsider.id),
        "",
    );
    assert_eq!(
        (status, v["type"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    let like = make_user(
        &mut p,
        "like-admin",
        DOMAIN,
        &[Permission::ManageUsers, Permission::ViewApplications],
        &["endpoints:read"],
    );
    let (status, _) = api(
        &mut p,
        &admin.token,
        "DELETE",
        &format!("/pelion/v1/users/{}", like.id),
        "",
    );
    assert_eq!(status, 200);
    assert_eq!(auth(&mut p, &like.token), AuthVerdict::NotMine);
}

// ---- permissions ----

#[test]
fn users_without_permission_are_refused() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let owner = admin_user(&mut p, "owner");
    let app = create_app(&mut p, &owner, "a");
    let (key, _) = create_key(&mut p, &owner, &app, &["endpoints:read"]);
    let app_path = format!("/pelion/v1/applications/{app}");
    let new_key = json!({"name": "k", "scopes": ["endpoints:read"]}).to_string();
    // (permissions of the caller, method, path, body)
    let cases: Vec<(Vec<Permission>, &str, String, String)> = vec![
        (
            vec![],
            "GET",
            "/pelion/v1/applications".into(),
            String::new(),
        ),
        (vec![], "GET", app_path.clone(), String::new()),
        (
            vec![Permission::ViewApplications],
            "POST",
            "/pelion/v1/applications".into(),
            r#"{"name": "x"}"#.into(),
        ),
        (
            vec![Permission::ViewApplications],
            "PATCH",
            app_path.clone(),
            r#"{"name": "x"}"#.into(),
        ),
        (
            vec![Permission::EditApplication],
            "PATCH",
            app_path.clone(),
            r#"{"status": "revoked"}"#.into(),
        ),
        (
            vec![Permission::RevokeApplication],
            "PATCH",
            app_path.clone(),
            r#"{"description": "x"}"#.into(),
        ),
        (
            vec![Permission::ViewAccessKeysAnyApplication],
            "POST",
            keys_path(&app),
            new_key.clone(),
        ),
        (
            vec![
                Permission::CreateApplication,
                Permission::EditAccessKeysAnyApplication,
            ],
            "POST",
            keys_path(&app),
            new_key.clone(),
        ),
        (
            vec![Permission::CreateAccessKeysAnyApplication],
            "GET",
            keys_path(&app),
            String::new(),
        ),
        (
            vec![Permission::EditAccessKeysAnyApplication],
            "PATCH",
            key_path(&app, &key),
            r#"{"status": "revoked"}"#.into(),
        ),
        (
            vec![Permission::RevokeAccessKeysAnyApplication],
            "PATCH",
            key_path(&app, &key),
            r#"{"name": "x"}"#.into(),
        ),
        (
            vec![Permission::ViewApplications],
            "GET",
            "/pelion/v1/users".into(),
            String::new(),
        ),
        (
            vec![Permission::ViewApplications],
            "POST",
            "/pelion/v1/users".into(),
            r#"{"name": "x"}"#.into(),
        ),
        (
            vec![Permission::ViewApplications],
            "GET",
            format!("/pelion/v1/users/{}", owner.id),
            String::new(),
        ),
        (
            vec![Permission::ViewApplications],
            "DELETE",
            format!("/pelion/v1/users/{}", owner.id),
            String::new(),
        ),
    ];
    for (i, (permissions, method, path, body)) in cases.iter().enumerate() {
        let u = make_user(
            &mut p,
            &format!("user {i}"),
            DOMAIN,
            permissions,
            ALL_SCOPES,
        );
        let before = host.state();
        let (status, v) = api(&mut p, &u.token, method, path, body);
        assert_eq!(status, 403, "{permissions:?} {method} {path}: {v}");
        assert_eq!(v["type"], "forbidden");
        assert_eq!(host.state(), before, "{method} {path} changed state");
    }
    // Each user may see itself.
    let u = make_user(&mut p, "plain", DOMAIN, &[], &[]);
    let (status, v) = api(
        &mut p,
        &u.token,
        "GET",
        &format!("/pelion/v1/users/{}", u.id),
        "",
    );
    assert_eq!(status, 200);
    assert_eq!(v["name"], "plain");
}

#[test]
fn my_versus_any_application_key_permissions() {
    #[derive(Debug, Clone, Copy)]
    enum Grant {
        None,
        Mine,
        Any,
    }
    let actions = [
        KeyAction::View,
        KeyAction::Create,
        KeyAction::Edit,
        KeyAction::Revoke,
    ];
    for action in actions {
        for grant in [Grant::None, Grant::Mine, Grant::Any] {
            let host = MemoryHost::new();
            let mut p = new_plugin(&host);
            let (any, mine) = action.permissions();
            let mut permissions = vec![Permission::CreateApplication];
            match grant {
                Grant::None => {}
                Grant::Mine => permissions.push(mine),
                Grant::Any => permissions.push(any),
            }
            let actor = make_user(&mut p, "actor", DOMAIN, &permissions, ALL_SCOPES);
            let other = admin_user(&mut p, "other");
            let own_app = create_app(&mut p, &actor, "mine");
            let other_app = create_app(&mut p, &other, "theirs");
            for (is_own, app) in [(true, &own_app), (false, &other_app)] {
                // The key acted on is made by the other user (who may do anything).
                let (key, _) = create_key(&mut p, &other, app, &["endpoints:read"]);
                let (method, path, body) = match action {
                    KeyAction::View => ("GET", keys_path(app), String::new()),
                    KeyAction::Create => (
                        "POST",
                        keys_path(app),
                        json!({"name": "n", "scopes": ["endpoints:read"]}).to_string(),
                    ),
                    KeyAction::Edit => (
                        "PATCH",
                        key_path(app, &key),
                        r#"{"name": "renamed"}"#.to_string(),
                    ),
                    KeyAction::Revoke => (
                        "PATCH",
                        key_path(app, &key),
                        r#"{"status": "revoked"}"#.to_string(),
                    ),
                };
                let allowed = match grant {
                    Grant::None => false,
                    Grant::Mine => is_own,
                    Grant::Any => true,
                };
                let (status, v) = api(&mut p, &actor.token, method, &path, &body);
                let what = format!("{action:?} {grant:?} own={is_own}");
                if allowed {
                    let want = if action == KeyAction::Create {
                        201
                    } else {
                        200
                    };
                    assert_eq!(status, want, "{what}: {v}");
                } else {
                    assert_eq!(status, 403, "{what}: {v}");
                    assert_eq!(v["type"], "forbidden", "{what}");
                }
                if action == KeyAction::View {
                    let (status, _) = api(&mut p, &actor.token, "GET", &key_path(app, &key), "");
                    assert_eq!(status == 200, allowed, "{what} (one key)");
                    if allowed {
                        assert!(ids(&v).contains(&key), "{what}");
                    }
                }
            }
        }
    }
}

#[test]
fn application_permissions_and_status() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let owner = admin_user(&mut p, "owner");
    let editor = make_user(
        &mut p,
        "editor",
        DOMAIN,
        &[Permission::EditApplication],
        &[],
    );
    let revoker = make_user(
        &mut p,
        "revoker",
        DOMAIN,
        &[Permission::RevokeApplication],
        &[],
    );
    let viewer = make_user(
        &mut p,
        "viewer",
        DOMAIN,
        &[Permission::ViewApplications],
        &[],
    );
    let a = create_app(&mut p, &owner, "a");
    let b = create_app(&mut p, &owner, "b");
    // Application permissions work on every application of the domain.
    for u in [&editor, &revoker, &viewer] {
        let (status, v) = api(&mut p, &u.token, "GET", "/pelion/v1/applications", "");
        assert_eq!(status, 200);
        assert_eq!(ids(&v), vec![a.clone(), b.clone()]);
    }
    let a_path = format!("/pelion/v1/applications/{a}");
    let (status, v) = api(
        &mut p,
        &editor.token,
        "PATCH",
        &a_path,
        r#"{"name": "A", "description": "first"}"#,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["name"].as_str(), v["description"].as_str()),
        (Some("A"), Some("first"))
    );
    assert_eq!(v["owner"], owner.id.as_str());
    let (status, _) = api(
        &mut p,
        &editor.token,
        "PATCH",
        &a_path,
        r#"{"status": "revoked"}"#,
    );
    assert_eq!(status, 403);
    for body in [r#"{"status": "active"}"#, r#"{"owner": "x"}"#, "{}"] {
        let (status, _) = api(&mut p, &owner.token, "PATCH", &a_path, body);
        assert_eq!(status, 400, "{body}");
    }
    revoke_app(&mut p, &revoker, &a);
    // Revoked: left out of the list unless asked for, still readable, final.
    let (_, v) = api(&mut p, &viewer.token, "GET", "/pelion/v1/applications", "");
    assert_eq!(ids(&v), vec![b.clone()]);
    let (_, v) = api(
        &mut p,
        &viewer.token,
        "GET",
        "/pelion/v1/applications?include_revoked=true",
        "",
    );
    assert_eq!(ids(&v), vec![a.clone(), b.clone()]);
    let (status, _) = api(
        &mut p,
        &viewer.token,
        "GET",
        "/pelion/v1/applications?include_revoked=maybe",
        "",
    );
    assert_eq!(status, 400);
    let (status, v) = api(&mut p, &viewer.token, "GET", &a_path, "");
    assert_eq!(status, 200);
    assert_eq!(v["status"], "revoked");
    assert!(v["revoked_at"].is_string());
    let (status, _) = api(
        &mut p,
        &revoker.token,
        "PATCH",
        &a_path,
        r#"{"status": "revoked"}"#,
    );
    assert_eq!(status, 409);
    assert_eq!(
        api(
            &mut p,
            &viewer.token,
            "GET",
            "/pelion/v1/applications/app_nope",
            ""
        )
        .0,
        404
    );
}

#[test]
fn revoked_keys_hidden_from_lists_by_default() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "u");
    let app = create_app(&mut p, &u, "a");
    let (k1, _) = create_key(&mut p, &u, &app, &["endpoints:read"]);
    let (k2, _) = create_key(&mut p, &u, &app, &["endpoints:read"]);
    revoke_key(&mut p, &u, &app, &k1);
    let (_, v) = api(&mut p, &u.token, "GET", &keys_path(&app), "");
    assert_eq!(ids(&v), vec![k2.clone()]);
    assert!(v["data"][0].get("access_key").is_none());
    let (_, v) = api(
        &mut p,
        &u.token,
        "GET",
        &format!("{}?include_revoked=true", keys_path(&app)),
        "",
    );
    assert_eq!(ids(&v), vec![k1.clone(), k2]);
    // A revoked key is still readable by id.
    let (status, v) = api(&mut p, &u.token, "GET", &key_path(&app, &k1), "");
    assert_eq!((status, v["status"].as_str()), (200, Some("revoked")));
    // A key is reached only through its own application.
    let other_app = create_app(&mut p, &u, "b");
    assert_eq!(
        api(&mut p, &u.token, "GET", &key_path(&other_app, &k1), "").0,
        404
    );
    assert_eq!(
        api(&mut p, &u.token, "GET", &key_path(&app, "ak_nope"), "").0,
        404
    );
}

#[test]
fn domains_are_isolated() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let a = admin_user(&mut p, "a");
    let b = make_user(&mut p, "b", OTHER_DOMAIN, &Permission::ALL, ALL_SCOPES);
    let app = create_app(&mut p, &a, "a's");
    let (key, secret) = create_key(&mut p, &a, &app, &["endpoints:read"]);
    let b_app = create_app(&mut p, &b, "b's");
    let (_, b_secret) = create_key(&mut p, &b, &b_app, &["endpoints:read"]);
    assert_eq!(accepted(&mut p, &secret).domain, DOMAIN);
    assert_eq!(accepted(&mut p, &b_secret).domain, OTHER_DOMAIN);
    let (_, v) = api(&mut p, &b.token, "GET", "/pelion/v1/applications", "");
    assert_eq!(ids(&v), vec![b_app]);
    let new_key = json!({"name": "x", "scopes": ["endpoints:read"]}).to_string();
    for (method, path, body) in [
        ("GET", format!("/pelion/v1/applications/{app}"), ""),
        (
            "PATCH",
            format!("/pelion/v1/applications/{app}"),
            r#"{"status": "revoked"}"#,
        ),
        ("GET", keys_path(&app), ""),
        ("POST", keys_path(&app), new_key.as_str()),
        ("GET", key_path(&app, &key), ""),
        ("PATCH", key_path(&app, &key), r#"{"status": "revoked"}"#),
        ("GET", format!("/pelion/v1/users/{}", a.id), ""),
        ("DELETE", format!("/pelion/v1/users/{}", a.id), ""),
    ] {
        let (status, v) = api(&mut p, &b.token, method, &path, body);
        assert_eq!(status, 404, "{method} {path}: {v}");
    }
    assert!(matches!(
        auth(&mut p, &secret),
        AuthVerdict::Accepted { .. }
    ));
}

// ---- who may use the management API ----

#[test]
fn only_user_tokens_manage() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "u");
    let app = create_app(&mut p, &u, "a");
    let (_, secret) = create_key(&mut p, &u, &app, &["admin"]);
    let user_principal = accepted(&mut p, &u.token);
    let other_backend = PrincipalSpec {
        key_id: "0123456789abcdef".into(),
        domain: DOMAIN.into(),
        scopes: vec!["admin".into()],
        allow: None,
        creator: None,
    };
    // (what, principal, bearer, message fragment)
    let cases: Vec<(&str, PrincipalSpec, Option<&str>, &str)> = vec![
        (
            "another backend's admin",
            other_backend.clone(),
            Some("connector-key"),
            "user token",
        ),
        (
            "another backend, no header",
            other_backend,
            None,
            "user token",
        ),
        (
            "a Pelion access key",
            accepted(&mut p, &secret),
            Some(&secret),
            "access keys",
        ),
        (
            "user principal, another token",
            user_principal.clone(),
            Some("forged"),
            "not authenticated",
        ),
        (
            "user principal, no header",
            user_principal.clone(),
            None,
            "not authenticated",
        ),
        (
            "user principal, a key's token",
            user_principal.clone(),
            Some(&secret),
            "not authenticated",
        ),
        (
            "unknown user",
            PrincipalSpec {
                key_id: "user:usr_nope".into(),
                ..user_principal.clone()
            },
            Some(&u.token),
            "not authenticated",
        ),
        (
            "user in the wrong domain",
            PrincipalSpec {
                domain: OTHER_DOMAIN.into(),
                ..user_principal.clone()
            },
            Some(&u.token),
            "not authenticated",
        ),
    ];
    for (what, principal, bearer, fragment) in cases {
        let (status, v) = api_as(
            &mut p,
            principal,
            bearer,
            "GET",
            "/pelion/v1/applications",
            "",
        );
        assert_eq!(status, 403, "{what}: {v}");
        assert_eq!(v["type"], "forbidden", "{what}");
        assert!(
            v["message"].as_str().unwrap().contains(fragment),
            "{what}: {v}"
        );
    }
    let (status, _) = api_as(
        &mut p,
        user_principal,
        Some(&u.token),
        "GET",
        "/pelion/v1/applications",
        "",
    );
    assert_eq!(status, 200);
}

#[test]
fn unknown_routes_are_404() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "u");
    for (method, path) in [
        ("PUT", "/pelion/v1/applications"),
        ("DELETE", "/pelion/v1/applications/x"),
        ("GET", "/pelion/v2/applications"),
        ("GET", "/api/api_tokens"),
    ] {
        let (status, v) = api(&mut p, &u.token, method, path, "");
        assert_eq!(
            (status, v["type"].as_str()),
            (404, Some("not_found")),
            "{method} {path}"
        );
    }
}

// ---- bodies ----

#[test]
fn bad_bodies_are_400() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "u");
    let app = create_app(&mut p, &u, "a");
    let (key, _) = create_key(&mut p, &u, &app, &["endpoints:read"]);
    let long = "x".repeat(257);
    let long_description = "d".repeat(1025);
    let targets: Vec<(&str, String)> = vec![
        ("POST", "/pelion/v1/users".into()),
        ("POST", "/pelion/v1/applications".into()),
        ("PATCH", format!("/pelion/v1/applications/{app}")),
        ("POST", keys_path(&app)),
        ("PATCH", key_path(&app, &key)),
    ];
    let common = [
        "",
        "   ",
        "{",
        "not json",
        "[]",
        "null",
        "42",
        r#""name""#,
        r#"{"name": 5}"#,
        r#"{"name": null}"#,
        r#"{"name": ""}"#,
        r#"{"name": "  "}"#,
    ];
    let long_name = json!({"name": long}).to_string();
    let long_desc = json!({"name": "n", "description": long_description}).to_string();
    let control = json!({"name": "a\u{7}b"}).to_string();
    let before = host.state();
    for (method, path) in &targets {
        for body in
            common
                .iter()
                .copied()
                .chain([long_name.as_str(), long_desc.as_str(), control.as_str()])
        {
            let (status, v) = api(&mut p, &u.token, method, path, body);
            assert_eq!(status, 400, "{method} {path} {body:?}: {v}");
            assert_eq!(v["type"], "bad_request");
        }
    }
    // Body-specific ones.
    let specific: &[(&str, String, &str)] = &[
        (
            "POST",
            "/pelion/v1/users".into(),
            r#"{"name": "x", "token": "t"}"#,
        ),
        (
            "POST",
            "/pelion/v1/users".into(),
            r#"{"name": "x", "permissions": "manage_users"}"#,
        ),
        (
            "POST",
            "/pelion/v1/applications".into(),
            r#"{"name": "x", "status": "revoked"}"#,
        ),
        (
            "POST",
            "/pelion/v1/applications".into(),
            r#"{"name": "x", "description": 3}"#,
        ),
        ("POST", keys_path(&app), r#"{"name": "x"}"#),
        (
            "POST",
            keys_path(&app),
            r#"{"name": "x", "scopes": ["endpoints:read"], "id": "ak_1"}"#,
        ),
        ("PATCH", key_path(&app, &key), r#"{"description": ["x"]}"#),
        ("PATCH", key_path(&app, &key), r#"{"status": 1}"#),
    ];
    for (method, path, body) in specific {
        let (status, v) = api(&mut p, &u.token, method, path, body);
        assert_eq!(status, 400, "{method} {path} {body}: {v}");
    }
    assert_eq!(host.state(), before, "a refused body changed state");
}

/// Issue 18: serde fills a struct from an array of its fields in order, so these were 201
/// (an `admin` key from `["k", "", ["admin"], null]`) before the body had to be an object.
#[test]
fn arrays_in_field_order_are_400() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "u");
    let app = create_app(&mut p, &u, "a");
    let before = host.state();
    let cases: Vec<(String, &str)> = vec![
        ("/pelion/v1/users".into(), r#"["x", null, [], ["admin"]]"#),
        ("/pelion/v1/applications".into(), r#"["x", ""]"#),
        (keys_path(&app), r#"["k", "", ["admin"], null]"#),
    ];
    for (path, body) in &cases {
        let (status, v) = api(&mut p, &u.token, "POST", path, body);
        assert_eq!(status, 400, "POST {path} {body}: {v}");
        assert_eq!(v["type"], "bad_request");
        assert_eq!(v["message"], "the request body must be a JSON object");
    }
    assert_eq!(host.state(), before, "a refused body changed state");
}

/// Issue 18: a body sent as something other than JSON is 415 on every POST and PATCH; an
/// absent Content-Type and the `+json` types are taken as JSON.
#[test]
fn non_json_content_types_are_415() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "u");
    let app = create_app(&mut p, &u, "a");
    let (key, _) = create_key(&mut p, &u, &app, &["endpoints:read"]);
    let send = |p: &mut Pelion, method: &str, path: &str, ct: Option<&str>, body: &str| {
        let principal = accepted(p, &u.token);
        http_with_bearer(p, &u.token, principal, method, path, ct, body)
    };
    let before = host.state();
    let targets: Vec<(&str, String)> = vec![
        ("POST", "/pelion/v1/users".into()),
        ("POST", "/pelion/v1/applications".into()),
        ("PATCH", format!("/pelion/v1/applications/{app}")),
        ("POST", keys_path(&app)),
        ("PATCH", key_path(&app, &key)),
    ];
    for (method, path) in &targets {
        for ct in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "text/json",
        ] {
            let (status, v) = send(&mut p, method, path, Some(ct), r#"{"name": "n"}"#);
            assert_eq!(status, 415, "{method} {path} {ct}: {v}");
            assert_eq!(v["type"], "unsupported_media_type");
            assert!(v["message"].as_str().unwrap().contains(ct), "{v}");
        }
    }
    assert_eq!(host.state(), before, "a refused body changed state");
    // GET ignores it; JSON types and no Content-Type are accepted.
    let (status, _) = send(
        &mut p,
        "GET",
        "/pelion/v1/applications",
        Some("text/plain"),
        "",
    );
    assert_eq!(status, 200);
    for ct in [
        None,
        Some("application/json; charset=utf-8"),
        Some("application/merge-patch+json"),
    ] {
        let (status, v) = send(
            &mut p,
            "PATCH",
            &format!("/pelion/v1/applications/{app}"),
            ct,
            r#"{"name": "n"}"#,
        );
        assert_eq!(status, 200, "{ct:?}: {v}");
    }
}

// ---- state ----

#[test]
fn state_survives_a_new_instance() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "u");
    let app = create_app(&mut p, &u, "a");
    let revoked_app = create_app(&mut p, &u, "r");
    let (key, secret) = create_key(&mut p, &u, &app, &["endpoints:read", "resources:write"]);
    let (revoked, revoked_secret) = create_key(&mut p, &u, &app, &["endpoints:read"]);
    let (_, in_revoked_app) = create_key(&mut p, &u, &revoked_app, &["endpoints:read"]);
    revoke_key(&mut p, &u, &app, &revoked);
    revoke_app(&mut p, &u, &revoked_app);
    let (_, before_keys) = api(&mut p, &u.token, "GET", &keys_path(&app), "");
    let (_, before_apps) = api(
        &mut p,
        &u.token,
        "GET",
        "/pelion/v1/applications?include_revoked=true",
        "",
    );
    drop(p);

    let mut p = new_plugin(&host);
    let principal = accepted(&mut p, &secret);
    assert_eq!(principal.key_id, key);
    assert_eq!(principal.scopes, vec!["endpoints:read", "resources:write"]);
    assert_refused(&mut p, &revoked_secret, "revoked");
    assert_refused(&mut p, &in_revoked_app, "revoked");
    assert_eq!(accepted(&mut p, &u.token).key_id, format!("user:{}", u.id));
    assert_eq!(
        api(&mut p, &u.token, "GET", &keys_path(&app), "").1,
        before_keys
    );
    assert_eq!(
        api(
            &mut p,
            &u.token,
            "GET",
            "/pelion/v1/applications?include_revoked=true",
            ""
        )
        .1,
        before_apps
    );
    assert!(host.logged("1 users, 2 applications, 3 access keys loaded"));
}

#[test]
fn secrets_are_stored_only_hashed() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "u");
    let app = create_app(&mut p, &u, "a");
    let (key, secret) = create_key(&mut p, &u, &app, &["endpoints:read"]);
    let state = host.state_text();
    let logs: String = host.logs().into_iter().map(|(_, m)| m + "\n").collect();
    for s in [&secret, &u.token] {
        assert!(!state.contains(s.as_str()));
        assert!(!logs.contains(s.as_str()));
    }
    assert!(state.contains(&sha256_hex(&secret)));
    assert!(state.contains(&sha256_hex(&u.token)));
    let state = host.state();
    assert!(state.contains_key(&format!("user/{}", u.id)));
    assert!(state.contains_key(&format!("app/{app}")));
    assert!(state.contains_key(&format!("key/{key}")));
    // Shown once: no later answer carries it.
    let (_, v) = api(&mut p, &u.token, "GET", &key_path(&app, &key), "");
    assert!(!v.to_string().contains(&secret));
}

#[test]
fn unreadable_records_are_skipped() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let u = admin_user(&mut p, "u");
    let app = create_app(&mut p, &u, "a");
    let (_, secret) = create_key(&mut p, &u, &app, &["endpoints:read"]);
    drop(p);
    let h = host.host();
    h.state_put("user/usr_bad", b"not json").unwrap();
    h.state_put("app/app_mismatch", &host.state()[&format!("app/{app}")])
        .unwrap();
    let mut p = new_plugin(&host);
    assert!(matches!(
        auth(&mut p, &secret),
        AuthVerdict::Accepted { .. }
    ));
    let warnings: Vec<String> = host.warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
}

/// `key_status` follows authentication: a key is active until it, its application or its
/// owner goes; a user token while its user exists; anything else is unknown.
#[test]
fn key_status_follows_authentication() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let status = |p: &mut Pelion, id: &str| -> KeyState {
        let v = call_json(p, OP_KEY_STATUS, &json!({ "key_id": id }));
        let r: KeyStatusResponse = serde_json::from_value(v).expect("KeyStatusResponse");
        assert_eq!(r.creator, None);
        r.status
    };
    let u = admin_user(&mut p, "u");
    let app = create_app(&mut p, &u, "a");
    let (k1, _) = create_key(&mut p, &u, &app, &["endpoints:read"]);
    let (k2, _) = create_key(&mut p, &u, &app, &["endpoints:read"]);
    let user_key = format!("{USER_PRINCIPAL_PREFIX}{}", u.id);
    assert_eq!(status(&mut p, &k1), KeyState::Active);
    assert_eq!(status(&mut p, &user_key), KeyState::Active);
    revoke_key(&mut p, &u, &app, &k1);
    assert_eq!(status(&mut p, &k1), KeyState::Revoked);
    assert_eq!(status(&mut p, &k2), KeyState::Active);
    revoke_app(&mut p, &u, &app);
    assert_eq!(status(&mut p, &k2), KeyState::Revoked);
    for unknown in ["ak_nope", "user:usr_nope", ""] {
        assert_eq!(status(&mut p, unknown), KeyState::Unknown, "{unknown:?}");
    }
    // A restart keeps it so.
    drop(p);
    let mut p = new_plugin(&host);
    assert_eq!(status(&mut p, &k1), KeyState::Revoked);
    assert_eq!(status(&mut p, &k2), KeyState::Revoked);
}
