//! Plugin-level tests against [`MemoryHost`].

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use connectord_plugin_sdk::Dispatch;
use connectord_plugin_sdk::auth::{OP_AUTHENTICATE, OP_BOOTSTRAP, OP_KEY_STATUS};
use connectord_plugin_sdk::http::OP_HTTP;
use connectord_plugin_sdk::testing::{
    MemoryHost, assert_auth_routes_operations, assert_bad_input_refused,
    assert_config_field_refused, assert_new_plugin_bootstraps_nothing, auth_request, authenticate,
    call_http, call_json, http_request, http_with_bearer, routes_of,
};
use serde_json::{Value, json};

use super::*;

const DOMAIN: &str = "domain-a";
const OTHER_DOMAIN: &str = "domain-b";

/// A plugin with one application and a token with `all.Application` on it.
struct Fixture {
    host: MemoryHost,
    p: Losant,
    app: String,
    token: String,
}

fn new_plugin(host: &MemoryHost) -> Losant {
    Losant::create(json!({}), host.host()).expect("create")
}

fn create_app(p: &mut Losant, name: &str, domain: &str) -> String {
    let v = call_json(
        p,
        OP_CREATE_APPLICATION,
        &json!({"name": name, "domain": domain}),
    );
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    v["id"].as_str().expect("id").to_string()
}

fn create_token(p: &mut Losant, app: &str, scopes: &[&str]) -> String {
    let v = call_json(
        p,
        OP_CREATE_TOKEN,
        &json!({"application_id": app, "scopes": scopes}),
    );
    v["token"].as_str().expect("token").to_string()
}

fn setup() -> Fixture {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let app = create_app(&mut p, "App", DOMAIN);
    let token = create_token(&mut p, &app, &["all.Application"]);
    Fixture {
        host,
        p,
        app,
        token,
    }
}

fn auth_with(p: &mut Losant, headers: &[(&str, &str)]) -> AuthVerdict {
    authenticate(p, &auth_request("GET", "/v2/endpoints", headers))
}

fn auth_bearer(p: &mut Losant, token: &str) -> AuthVerdict {
    auth_with(p, &[("authorization", &format!("Bearer {token}"))])
}

fn auth_basic(p: &mut Losant, key: &str, secret: &str) -> AuthVerdict {
    let cred = STANDARD.encode(format!("{key}:{secret}"));
    auth_with(p, &[("authorization", &format!("Basic {cred}"))])
}

fn accepted(v: AuthVerdict) -> PrincipalSpec {
    match v {
        AuthVerdict::Accepted { principal, .. } => principal,
        other => panic!("expected Accepted, got {other:?}"),
    }
}

/// The principal the core would hand over with this Authorization header.
fn principal_for(p: &mut Losant, authorization: &str) -> PrincipalSpec {
    match auth_with(p, &[("authorization", authorization)]) {
        AuthVerdict::Accepted { principal, .. } => principal,
        // As if another backend had accepted the credential.
        _ => PrincipalSpec {
            key_id: "0123456789abcdef".into(),
            domain: DOMAIN.into(),
            scopes: vec!["admin".into()],
            allow: None,
            creator: None,
        },
    }
}

fn http_as(
    p: &mut Losant,
    authorization: Option<&str>,
    method: &str,
    path: &str,
    query: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let principal = principal_for(p, authorization.unwrap_or(""));
    let mut pairs = vec![("content-type", "application/json")];
    pairs.extend(authorization.map(|a| ("authorization", a)));
    let mut req = http_request(method, path, &pairs, body, principal);
    req.query = query.map(String::from);
    let (resp, body) = call_http(p, &req);
    (resp.status, body)
}

fn http(
    p: &mut Losant,
    token: &str,
    method: &str,
    path: &str,
    query: Option<&str>,
    body: &str,
) -> (u16, Value) {
    http_as(
        p,
        Some(&format!("Bearer {token}")),
        method,
        path,
        query,
        body,
    )
}

fn keys_path(app: &str) -> String {
    format!("/applications/{app}/keys")
}

fn key_path(app: &str, key: &str) -> String {
    format!("/applications/{app}/keys/{key}")
}

fn post_key(f: &mut Fixture, body: Value) -> Value {
    let (status, v) = http(
        &mut f.p,
        &f.token,
        "POST",
        &keys_path(&f.app),
        None,
        &body.to_string(),
    );
    assert_eq!(status, 201, "{v}");
    v
}

/// Creates an application "Other" in `domain` and, with a token of it holding `scope`, an
/// application key in it; returns the key as created (with its secret).
fn post_key_in_other_app(f: &mut Fixture, domain: &str, scope: &str) -> Value {
    let other = create_app(&mut f.p, "Other", domain);
    let token = create_token(&mut f.p, &other, &[scope]);
    let (status, v) = http(&mut f.p, &token, "POST", &keys_path(&other), None, "{}");
    assert_eq!(status, 201, "{v}");
    v
}

fn list(f: &mut Fixture, query: &str) -> (u16, Value) {
    let q = (!query.is_empty()).then_some(query);
    http(&mut f.p, &f.token, "GET", &keys_path(&f.app), q, "")
}

fn item_ids(v: &Value) -> Vec<String> {
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

/// Percent-encodes everything but unreserved characters.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn assert_error(status: u16, v: &Value, want_status: u16, want_type: &str, what: &str) {
    assert_eq!(status, want_status, "{what}: {v}");
    assert_eq!(v["type"], want_type, "{what}: {v}");
    assert!(v["message"].is_string(), "{what}: {v}");
    assert_eq!(v.as_object().unwrap().len(), 2, "{what}: {v}");
}

// ---------------------------------------------------------------------------------------
// The list dataset: four keys with fixed ids, keys, statuses and dates.

const K1: &str = "a00000000000000000000003";
const K2: &str = "a00000000000000000000001";
const K3: &str = "a00000000000000000000004";
const K4: &str = "a00000000000000000000002";
const D1: &str = "bbbbbbbbbbbbbbbbbbbbbbb1";

/// Replaces a key's id, key string and dates (test-only surgery on the in-memory maps).
fn rewrite(
    p: &mut Losant,
    old_id: &str,
    id: &str,
    key: &str,
    status: Status,
    created: u64,
    updated: u64,
) {
    let mut rec = p.keys.remove(old_id).expect("key");
    p.key_by_key.remove(&rec.key);
    rec.id = id.into();
    rec.key = key.into();
    rec.status = status;
    rec.creation_date = created;
    rec.last_updated = updated;
    p.key_by_key.insert(rec.key.clone(), rec.id.clone());
    p.keys.insert(rec.id.clone(), rec);
}

fn dataset() -> Fixture {
    let mut f = setup();
    let specs: [(Value, &str, &str, Status, u64, u64); 4] = [
        (
            json!({"description": "first"}),
            K1,
            "alpha-key",
            Status::Active,
            1000,
            4000,
        ),
        (
            json!({"description": "my access key"}),
            K2,
            "beta-key",
            Status::Inactive,
            2000,
            3000,
        ),
        (
            json!({"filterType": "whitelist", "deviceIds": [D1],
                   "deviceTags": [{"key": "floor", "value": "8"}],
                   "pubTopics": ["ep/a/1/#"]}),
            K3,
            "gamma",
            Status::Active,
            3000,
            2000,
        ),
        (
            json!({"filterType": "none", "subTopics": ["ep/b/#"],
                   "deviceTags": [{"key": "endpoint", "value": "s-*"}]}),
            K4,
            "delta-key",
            Status::Inactive,
            4000,
            1000,
        ),
    ];
    for (body, id, key, status, created, updated) in specs {
        let v = post_key(&mut f, body);
        let old = v["id"].as_str().unwrap().to_string();
        rewrite(&mut f.p, &old, id, key, status, created, updated);
    }
    f
}

fn ks(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------
// Plugin basics.

#[test]
fn config_empty_accepted_unknown_refused() {
    assert_config_field_refused::<Losant>("hash", json!("md5"));
    assert!(Losant::create(json!([]), MemoryHost::new().host()).is_err());
}

#[test]
fn bootstrap_creates_nothing() {
    assert_new_plugin_bootstraps_nothing::<Losant>(DOMAIN);
}

#[test]
fn routes_are_listed_as_authenticated() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let routes = routes_of(&mut p);
    let got: Vec<(String, String, String)> = routes
        .routes
        .into_iter()
        .map(|r| (r.method, r.path, r.scope))
        .collect();
    let want: Vec<(String, String, String)> = [
        ("GET", "/applications/{APPLICATION_ID}/keys"),
        ("POST", "/applications/{APPLICATION_ID}/keys"),
        (
            "GET",
            "/applications/{APPLICATION_ID}/keys/{APPLICATION_KEY_ID}",
        ),
        (
            "PATCH",
            "/applications/{APPLICATION_ID}/keys/{APPLICATION_KEY_ID}",
        ),
        (
            "DELETE",
            "/applications/{APPLICATION_ID}/keys/{APPLICATION_KEY_ID}",
        ),
    ]
    .iter()
    .map(|(m, path)| (m.to_string(), path.to_string(), "authenticated".to_string()))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn unknown_op_and_bad_input_are_errors() {
    assert_auth_routes_operations::<Losant>(&[
        "create_application",
        "create_token",
        "delete_token",
        "delete_application",
    ]);
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let ops = [
        OP_BOOTSTRAP,
        OP_AUTHENTICATE,
        OP_HTTP,
        OP_CREATE_APPLICATION,
        OP_CREATE_TOKEN,
        OP_DELETE_TOKEN,
        OP_DELETE_APPLICATION,
    ];
    assert_bad_input_refused(&mut p, &ops, &[b"{}"]);
}

#[test]
fn create_application_and_token_validation() {
    let host = MemoryHost::new();
    let mut p = new_plugin(&host);
    let app = create_app(&mut p, "My app", DOMAIN);
    assert!(model::is_object_id(&app));
    assert_eq!(app, app.to_ascii_lowercase());

    let bad_apps = [
        json!({"name": "", "domain": DOMAIN}),
        json!({"name": "   ", "domain": DOMAIN}),
        json!({"name": "x".repeat(256), "domain": DOMAIN}),
        json!({"name": "a\nb", "domain": DOMAIN}),
        json!({"name": "ok", "domain": ""}),
        json!({"name": "ok"}),
        json!({"name": "ok", "domain": DOMAIN, "extra": 1}),
    ];
    for input in bad_apps {
        assert!(
            p.call(OP_CREATE_APPLICATION, input.to_string().as_bytes())
                .is_err(),
            "{input}"
        );
    }

    let v = call_json(
        &mut p,
        OP_CREATE_TOKEN,
        &json!({"application_id": app, "scopes": ["applicationKeys.get", "applicationKeys.get"]}),
    );
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 2);
    assert!(model::is_object_id(v["id"].as_str().unwrap()));
    let token = v["token"].as_str().unwrap();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_alphanumeric()));
    // Stored once, deduplicated, as a digest only.
    let stored: Value =
        serde_json::from_slice(&host.state()[&format!("token/{}", v["id"].as_str().unwrap())])
            .unwrap();
    assert_eq!(stored["scopes"], json!(["applicationKeys.get"]));
    assert_eq!(stored["tokenHash"], sha256_hex(token));
    assert!(!host.state_text().contains(token));
    assert!(!host.logged(token));

    let bad_tokens = [
        json!({"application_id": "575ec8687ae143cd83dc4a97", "scopes": ["all.Application"]}),
        json!({"application_id": app, "scopes": []}),
        json!({"application_id": app, "scopes": ["admin"]}),
        json!({"application_id": app, "scopes": ["applicationKeys.delete"]}),
        json!({"application_id": app}),
        json!({"application_id": app, "scopes": ["all.User"], "name": "x"}),
    ];
    for input in bad_tokens {
        assert!(
            p.call(OP_CREATE_TOKEN, input.to_string().as_bytes())
                .is_err(),
            "{input}"
        );
    }
}

#[test]
fn token_authenticates_with_no_core_scope() {
    let mut f = setup();
    let p = accepted(auth_bearer(&mut f.p, &f.token));
    assert!(p.key_id.starts_with("token:"));
    assert!(model::is_object_id(&p.key_id["token:".len()..]));
    assert_eq!(p.domain, DOMAIN);
    assert!(p.scopes.is_empty());
    assert_eq!(p.allow, Some(vec![]));
    // Scheme case and spaces.
    for h in [
        format!("bearer {}", f.token),
        format!("  BEARER   {}  ", f.token),
    ] {
        assert!(matches!(
            auth_with(&mut f.p, &[("authorization", &h)]),
            AuthVerdict::Accepted { .. }
        ));
    }
    // Unknown tokens and other schemes are somebody else's.
    let not_mine: &[&[(&str, &str)]] = &[
        &[],
        &[("authorization", "Bearer nosuchtoken")],
        &[("authorization", "Bearer")],
        &[("authorization", "")],
        &[("authorization", "Token abc")],
        &[("x-api-key", "abc")],
    ];
    for headers in not_mine {
        assert_eq!(
            auth_with(&mut f.p, headers),
            AuthVerdict::NotMine,
            "{headers:?}"
        );
    }
    assert_eq!(
        auth_with(
            &mut f.p,
            &[("authorization", &format!("Bearer {}x", f.token))]
        ),
        AuthVerdict::NotMine
    );
}

// ---------------------------------------------------------------------------------------
// GET /applications/{APPLICATION_ID}/keys

#[test]
fn list_defaults_and_envelope() {
    let mut f = dataset();
    let (status, v) = list(&mut f, "");
    assert_eq!(status, 200, "{v}");
    let mut fields: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "applicationId",
            "count",
            "items",
            "page",
            "perPage",
            "sortDirection",
            "sortField",
            "totalCount"
        ]
    );
    assert_eq!(v["sortField"], "creationDate");
    assert_eq!(v["sortDirection"], "desc");
    assert_eq!(v["page"], 0);
    assert_eq!(v["perPage"], 100);
    assert_eq!(v["count"], 4);
    assert_eq!(v["totalCount"], 4);
    assert_eq!(v["applicationId"], f.app.as_str());
    assert_eq!(item_ids(&v), ks(&[K4, K3, K2, K1]));
    // The items are the Application Key schema, never the secret.
    let first = &v["items"][3];
    assert_eq!(first["id"], K1);
    assert_eq!(first["applicationKeyId"], K1);
    assert_eq!(first["applicationId"], f.app.as_str());
    assert_eq!(first["key"], "alpha-key");
    assert_eq!(first["status"], "active");
    assert_eq!(first["description"], "first");
    assert_eq!(first["filterType"], "all");
    assert_eq!(first["creationDate"], "1970-01-01T00:00:01.000Z");
    assert_eq!(first["lastUpdated"], "1970-01-01T00:00:04.000Z");
    for item in v["items"].as_array().unwrap() {
        assert!(item.get("secret").is_none());
        assert!(item.get("secretHash").is_none());
    }
    // Blank values are the defaults; unknown parameters are ignored.
    let (_, v2) = list(
        &mut f,
        "sortField=&sortDirection=&page=&perPage=&filterField=&filter=&query=&_links=true",
    );
    assert_eq!(v2, v);
    // Keys of another application are not listed.
    let other = create_app(&mut f.p, "Other", DOMAIN);
    let other_token = create_token(&mut f.p, &other, &["all.Application"]);
    let (s, v3) = http(&mut f.p, &other_token, "GET", &keys_path(&other), None, "");
    assert_eq!(s, 200);
    assert_eq!(v3["totalCount"], 0);
    assert_eq!(v3["items"], json!([]));
}

#[test]
fn list_sort_by_each_field_both_directions() {
    let mut f = dataset();
    let cases: &[(&str, &str, &[&str])] = &[
        ("key", "asc", &[K1, K2, K4, K3]),
        ("key", "desc", &[K3, K4, K2, K1]),
        ("status", "asc", &[K1, K3, K2, K4]),
        ("status", "desc", &[K4, K2, K3, K1]),
        ("id", "asc", &[K2, K4, K1, K3]),
        ("id", "desc", &[K3, K1, K4, K2]),
        ("creationDate", "asc", &[K1, K2, K3, K4]),
        ("creationDate", "desc", &[K4, K3, K2, K1]),
        ("lastUpdated", "asc", &[K4, K3, K2, K1]),
        ("lastUpdated", "desc", &[K1, K2, K3, K4]),
        ("creationDate", "ASC", &[K1, K2, K3, K4]),
        ("key", "DESC", &[K3, K4, K2, K1]),
    ];
    for (field, dir, want) in cases {
        let (status, v) = list(&mut f, &format!("sortField={field}&sortDirection={dir}"));
        assert_eq!(status, 200, "{field} {dir}: {v}");
        assert_eq!(item_ids(&v), ks(want), "{field} {dir}");
        assert_eq!(v["sortField"], *field);
        assert_eq!(v["sortDirection"], dir.to_ascii_lowercase());
    }
    // sortField alone: default direction desc; sortDirection alone: default field.
    let (_, v) = list(&mut f, "sortField=key");
    assert_eq!(item_ids(&v), ks(&[K3, K4, K2, K1]));
    let (_, v) = list(&mut f, "sortDirection=asc");
    assert_eq!(item_ids(&v), ks(&[K1, K2, K3, K4]));
    assert_eq!(v["sortField"], "creationDate");
}

#[test]
fn list_paging() {
    let mut f = dataset();
    let cases: &[(&str, &[&str], u64, u64)] = &[
        ("perPage=2&page=0", &[K1, K2], 2, 0),
        ("perPage=2&page=1", &[K3, K4], 2, 1),
        ("perPage=2&page=2", &[], 2, 2),
        ("perPage=3&page=1", &[K4], 3, 1),
        ("perPage=1&page=3", &[K4], 1, 3),
        ("perPage=1", &[K1], 1, 0),
        ("page=1", &[], 100, 1),
        ("perPage=1000", &[K1, K2, K3, K4], 1000, 0),
        ("perPage=1000&page=4294967295", &[], 1000, 4_294_967_295),
    ];
    for (q, want, per_page, page) in cases {
        let (status, v) = list(&mut f, &format!("sortDirection=asc&{q}"));
        assert_eq!(status, 200, "{q}: {v}");
        assert_eq!(item_ids(&v), ks(want), "{q}");
        assert_eq!(v["count"], want.len(), "{q}");
        assert_eq!(v["totalCount"], 4, "{q}");
        assert_eq!(v["perPage"], *per_page, "{q}");
        assert_eq!(v["page"], *page, "{q}");
    }
}

#[test]
fn list_filter_globbing() {
    let mut f = dataset();
    // (query, expected ids in creation order, echoed filterField, echoed filter)
    type Case<'a> = (&'a str, &'a [&'a str], Option<&'a str>, Option<&'a str>);
    let cases: &[Case] = &[
        (
            "filterField=key&filter=*-key",
            &[K1, K2, K4],
            Some("key"),
            Some("*-key"),
        ),
        (
            "filterField=key&filter=ALPHA*",
            &[K1],
            Some("key"),
            Some("ALPHA*"),
        ),
        (
            "filterField=key&filter=%3Feta-key",
            &[K2],
            Some("key"),
            Some("?eta-key"),
        ),
        (
            "filterField=key&filter=gamma",
            &[K3],
            Some("key"),
            Some("gamma"),
        ),
        ("filterField=key&filter=gam", &[], Some("key"), Some("gam")),
        (
            "filterField=key&filter=*",
            &[K1, K2, K3, K4],
            Some("key"),
            Some("*"),
        ),
        (
            "filterField=key&filter=the*key",
            &[],
            Some("key"),
            Some("the*key"),
        ),
        (
            "filterField=status&filter=inactive",
            &[K2, K4],
            Some("status"),
            Some("inactive"),
        ),
        (
            "filterField=status&filter=act*",
            &[K1, K3],
            Some("status"),
            Some("act*"),
        ),
        (
            "filterField=status&filter=*active",
            &[K1, K2, K3, K4],
            Some("status"),
            Some("*active"),
        ),
        (
            "filterField=status&filter=ACTIVE",
            &[K1, K3],
            Some("status"),
            Some("ACTIVE"),
        ),
        // Either one alone, or blank: no filtering.
        ("filter=alpha*", &[K1, K2, K3, K4], None, Some("alpha*")),
        ("filterField=key", &[K1, K2, K3, K4], Some("key"), None),
        (
            "filterField=key&filter=",
            &[K1, K2, K3, K4],
            Some("key"),
            None,
        ),
        // Form encoding: + is a space.
        (
            "filterField=key&filter=alpha+key",
            &[],
            Some("key"),
            Some("alpha key"),
        ),
    ];
    for (q, want, field, filter) in cases {
        let (status, v) = list(&mut f, &format!("sortDirection=asc&{q}"));
        assert_eq!(status, 200, "{q}: {v}");
        assert_eq!(item_ids(&v), ks(want), "{q}");
        assert_eq!(v["totalCount"], want.len(), "{q}");
        assert_eq!(v.get("filterField").and_then(Value::as_str), *field, "{q}");
        assert_eq!(v.get("filter").and_then(Value::as_str), *filter, "{q}");
    }
}

#[test]
fn list_advanced_query_operators() {
    let mut f = dataset();
    let cases: Vec<(Value, &[&str])> = vec![
        (json!({}), &[K1, K2, K3, K4]),
        // Bare value and $eq, $ne.
        (json!({"key": "gamma"}), &[K3]),
        (json!({"key": {"$eq": "gamma"}}), &[K3]),
        (json!({"key": {"$ne": "gamma"}}), &[K1, K2, K4]),
        // Ordering on text.
        (json!({"key": {"$gt": "beta-key"}}), &[K3, K4]),
        (json!({"key": {"$gte": "beta-key"}}), &[K2, K3, K4]),
        (json!({"key": {"$lt": "beta-key"}}), &[K1]),
        (json!({"key": {"$lte": "beta-key"}}), &[K1, K2]),
        // $in, $nin.
        (
            json!({"status": {"$in": ["inactive", "revoked"]}}),
            &[K2, K4],
        ),
        (json!({"status": {"$nin": ["inactive"]}}), &[K1, K3]),
        (json!({"key": {"$in": []}}), &[]),
        (json!({"key": {"$nin": []}}), &[K1, K2, K3, K4]),
        // $like: the filter glob.
        (json!({"key": {"$like": "*-KEY"}}), &[K1, K2, K4]),
        (json!({"key": {"$like": "?amma"}}), &[K3]),
        (json!({"description": {"$like": "my*"}}), &[K2]),
        // Absent description.
        (json!({"description": null}), &[K3, K4]),
        (json!({"description": {"$ne": null}}), &[K1, K2]),
        (json!({"description": "my access key"}), &[K2]),
        // Dates: epoch milliseconds or ISO 8601.
        (json!({"creationDate": 2000}), &[K2]),
        (json!({"creationDate": {"$lt": 3000}}), &[K1, K2]),
        (json!({"creationDate": {"$gte": 3000}}), &[K3, K4]),
        (
            json!({"creationDate": {"$gt": "1970-01-01T00:00:02.000Z"}}),
            &[K3, K4],
        ),
        (
            json!({"creationDate": {"$lte": "1970-01-01T00:00:02Z"}}),
            &[K1, K2],
        ),
        (json!({"creationDate": {"$in": [1000, 4000]}}), &[K1, K4]),
        (
            json!({"creationDate": {"$nin": [1000, "1970-01-01T00:00:04Z"]}}),
            &[K2, K3],
        ),
        (
            json!({"lastUpdated": {"$lt": 1_612_189_931_000_u64}}),
            &[K1, K2, K3, K4],
        ),
        (
            json!({"lastUpdated": {"$gt": 1000, "$lt": 4000}}),
            &[K2, K3],
        ),
        (json!({"lastUpdated": {"$ne": 1000}}), &[K1, K2, K3]),
        // Ids (normalized to lower case).
        (json!({"id": K3}), &[K3]),
        (
            json!({"id": {"$in": ["A00000000000000000000001", K4]}}),
            &[K2, K4],
        ),
        (json!({"id": {"$nin": [K2, K4]}}), &[K1, K3]),
        (json!({"id": {"$gt": K4}}), &[K1, K3]),
        (json!({"id": {"$lte": K4}}), &[K2, K4]),
        (json!({"id": {"$ne": K1}}), &[K2, K3, K4]),
        (json!({"id": null}), &[]),
        // Lists: some element.
        (json!({"deviceIds": D1}), &[K3]),
        (json!({"deviceIds": {"$ne": D1}}), &[K1, K2, K4]),
        (json!({"deviceIds": null}), &[K1, K2, K4]),
        (json!({"pubTopics": "ep/a/1/#"}), &[K3]),
        (json!({"subTopics": {"$like": "ep/b/*"}}), &[K4]),
        (json!({"subTopics": {"$gte": "ep"}}), &[K4]),
        (
            json!({"filterType": {"$in": ["none", "whitelist"]}}),
            &[K3, K4],
        ),
        (json!({"filterType": "all"}), &[K1, K2]),
        // Device tags.
        (json!({"deviceTags": {"floor": "8"}}), &[K3]),
        (json!({"deviceTags": {"floor": "9"}}), &[]),
        (json!({"deviceTags": {"$tagKey": "endpoint"}}), &[K4]),
        (
            json!({"deviceTags": {"$tagKey": "endpoint", "$tagValue": "s-*"}}),
            &[K4],
        ),
        (
            json!({"deviceTags": {"$tagValue": {"$in": ["8", "9"]}}}),
            &[K3],
        ),
        (
            json!({"deviceTags": {"$tagKey": {"$nin": ["floor"]}}}),
            &[K4],
        ),
        (json!({"deviceTags": {"$eq": {"$tagKey": "floor"}}}), &[K3]),
        (
            json!({"deviceTags": {"$ne": {"$tagKey": "floor"}}}),
            &[K1, K2, K4],
        ),
        // Type mismatches never match (and so always pass $ne).
        (json!({"key": 5}), &[]),
        (json!({"key": true}), &[]),
        (json!({"key": {"$gt": 0}}), &[]),
        (json!({"creationDate": {"$lt": true}}), &[]),
        (json!({"key": {"$ne": 5}}), &[K1, K2, K3, K4]),
        // Several entries in one object: all of them.
        (json!({"key": "gamma", "status": "active"}), &[K3]),
        (json!({"key": "gamma", "status": "inactive"}), &[]),
    ];
    assert_queries_select(&mut f, &cases);
}

/// Lists the keys with each advanced query (ascending): all of them and only them are the
/// wanted keys, and the answer does not echo the query.
fn assert_queries_select(f: &mut Fixture, cases: &[(Value, &[&str])]) {
    for (q, want) in cases {
        let (status, v) = list(
            f,
            &format!("sortDirection=asc&query={}", enc(&q.to_string())),
        );
        assert_eq!(status, 200, "{q}: {v}");
        assert_eq!(item_ids(&v), ks(want), "{q}");
        assert_eq!(v["totalCount"], want.len(), "{q}");
        assert!(v.get("query").is_none());
    }
}

#[test]
fn list_advanced_query_nesting() {
    let mut f = dataset();
    let cases: Vec<(Value, &[&str])> = vec![
        (
            json!({"$and": [{"status": "active"}, {"key": {"$like": "a*"}}]}),
            &[K1],
        ),
        (
            json!({"$or": [{"key": "gamma"}, {"key": "beta-key"}]}),
            &[K2, K3],
        ),
        (
            json!({"$nor": [{"status": "inactive"}, {"key": "gamma"}]}),
            &[K1],
        ),
        // The seed's example: every key was last updated before 2021-02-01.
        (
            json!({"$nor": [{"id": "575ec8687ae143cd83dc4a97"}, {"description": "my access key"},
                            {"lastUpdated": {"$lt": 1_612_189_931_000_u64}}]}),
            &[],
        ),
        (
            json!({"$nor": [{"id": "575ec8687ae143cd83dc4a97"}, {"description": "my access key"},
                            {"lastUpdated": {"$lt": 1500}}]}),
            &[K1, K3],
        ),
        (
            json!({"$or": [
                {"$and": [{"status": "inactive"}, {"creationDate": {"$gt": 3000}}]},
                {"$nor": [{"key": {"$like": "*key"}}]}
            ]}),
            &[K3, K4],
        ),
        (
            json!({"$and": [
                {"$or": [{"key": "alpha-key"}, {"key": "gamma"}]},
                {"$nor": [{"status": "inactive"}]}
            ], "creationDate": {"$gt": 1000}}),
            &[K3],
        ),
        (
            json!({"$nor": [{"$or": [{"$and": [{"status": "active"}, {"filterType": "all"}]},
                                     {"deviceTags": {"$tagKey": "endpoint"}}]}]}),
            &[K2, K3],
        ),
        (json!({"$and": []}), &[K1, K2, K3, K4]),
        (json!({"$or": []}), &[K1, K2, K3, K4]),
        (json!({"$nor": []}), &[]),
        (json!({"$and": [{}]}), &[K1, K2, K3, K4]),
        (json!({"$nor": [{}]}), &[]),
    ];
    assert_queries_select(&mut f, &cases);
}

#[test]
fn list_query_overrides_filter() {
    let mut f = dataset();
    let q = enc(r#"{"key":"gamma"}"#);
    let (status, v) = list(&mut f, &format!("filterField=key&filter=alpha*&query={q}"));
    assert_eq!(status, 200, "{v}");
    assert_eq!(item_ids(&v), ks(&[K3]));
    assert_eq!(v["filterField"], "key");
    assert_eq!(v["filter"], "alpha*");
    // Without the query, the filter applies.
    let (_, v) = list(&mut f, "filterField=key&filter=alpha*");
    assert_eq!(item_ids(&v), ks(&[K1]));
    // The query combines with sorting and paging.
    let q = enc(r#"{"status":"inactive"}"#);
    let (_, v) = list(
        &mut f,
        &format!("query={q}&sortField=key&sortDirection=asc&perPage=1&page=1"),
    );
    assert_eq!(item_ids(&v), ks(&[K4]));
    assert_eq!(v["totalCount"], 2);
}

#[test]
fn list_invalid_parameters_are_400() {
    let mut f = dataset();
    let deep = {
        let mut q = json!({"key": "x"});
        for _ in 0..=query::MAX_DEPTH {
            q = json!({"$and": [q]});
        }
        q
    };
    let many: Vec<Value> = (0..=query::MAX_ITEMS)
        .map(|_| json!({"key": "x"}))
        .collect();
    let many_in: Vec<Value> = (0..=query::MAX_ITEMS).map(|i| json!(i)).collect();
    let raw: Vec<String> = vec![
        "sortField=name".into(),
        "sortField=Key".into(),
        "sortField=description".into(),
        "sortDirection=up".into(),
        "sortDirection=Asc".into(),
        "page=-1".into(),
        "page=abc".into(),
        "page=1.5".into(),
        "page=4294967296".into(),
        "perPage=0".into(),
        "perPage=1001".into(),
        "perPage=x".into(),
        "perPage=%2B5".into(),
        "filterField=description".into(),
        "filterField=id".into(),
        "filter=%zz".into(),
        "page=0&page=1".into(),
        "sortField=key&sortField=id".into(),
        "query=notjson".into(),
    ];
    let queries: Vec<Value> = vec![
        json!([1]),
        json!("key"),
        json!({"name": "x"}),
        json!({"secret": "x"}),
        json!({"key": {"$regex": "x"}}),
        json!({"key": {}}),
        json!({"key": [1]}),
        json!({"key": {"$eq": [1]}}),
        json!({"key": {"$like": 5}}),
        json!({"$and": {}}),
        json!({"$or": [1]}),
        json!({"$nor": "x"}),
        json!({"$not": [{}]}),
        json!({"id": "xyz"}),
        json!({"id": 5}),
        json!({"id": {"$like": "a*"}}),
        json!({"id": {"$eq": null, "$ne": null}}),
        json!({"id": {"$in": ["xyz"]}}),
        json!({"deviceIds": {"$in": "x"}}),
        json!({"creationDate": "yesterday"}),
        json!({"creationDate": {"$like": "2016*"}}),
        json!({"creationDate": {"$gt": "2016-13-01"}}),
        json!({"status": {"$in": "active"}}),
        json!({"status": {"$in": [null]}}),
        json!({"status": {"$in": [[1]]}}),
        json!({"deviceTags": "x"}),
        json!({"deviceTags": {}}),
        json!({"deviceTags": {"$bogus": 1}}),
        json!({"deviceTags": {"bad key": "x"}}),
        json!({"deviceTags": {"$tagKey": 5}}),
        json!({"deviceTags": {"$tagKey": {"$in": [1]}}}),
        json!({"deviceTags": {"$ne": 5}}),
        json!({"$or": many}),
        json!({"status": {"$in": many_in}}),
        deep,
    ];
    let all = raw.into_iter().chain(
        queries
            .iter()
            .map(|q| format!("query={}", enc(&q.to_string()))),
    );
    for q in all {
        let (status, v) = list(&mut f, &q);
        assert_error(status, &v, 400, "Validation", &q);
    }
}

#[test]
fn unknown_application_is_404_with_exact_json() {
    let mut f = dataset();
    let other = create_app(&mut f.p, "Other", OTHER_DOMAIN);
    let want = json!({"type": "NotFound", "message": "Application was not found"});
    let apps = [
        "575ec8687ae143cd83dc4a97".to_string(), // no such application
        other.clone(),                          // exists, but not the token's
        "not-an-id".to_string(),
        f.app.to_ascii_uppercase(),
    ];
    for app in &apps {
        for (method, path, body) in [
            ("GET", keys_path(app), ""),
            ("POST", keys_path(app), "{}"),
            ("GET", key_path(app, K1), ""),
            ("PATCH", key_path(app, K1), "{}"),
            ("DELETE", key_path(app, K1), ""),
        ] {
            let (status, v) = http(&mut f.p, &f.token, method, &path, None, body);
            assert_eq!(status, 404, "{method} {path}");
            assert_eq!(v, want, "{method} {path}");
        }
    }
    // Nothing was created or deleted.
    let (_, v) = list(&mut f, "");
    assert_eq!(v["totalCount"], 4);
}

// ---------------------------------------------------------------------------------------
// POST, GET one, PATCH, DELETE.

#[test]
fn post_creates_key_with_secret_shown_once() {
    let mut f = setup();
    let body = json!({
        "description": "An example new key description",
        "filterType": "all",
        "pubTopics": [],
        "subTopics": []
    });
    let v = post_key(&mut f, body);
    let mut fields: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    fields.sort_unstable();
    // The seed's example answer: 12 keys.
    assert_eq!(
        fields,
        [
            "applicationId",
            "applicationKeyId",
            "creationDate",
            "description",
            "filterType",
            "id",
            "key",
            "lastUpdated",
            "pubTopics",
            "secret",
            "status",
            "subTopics"
        ]
    );
    let id = v["id"].as_str().unwrap().to_string();
    assert!(model::is_object_id(&id));
    assert_eq!(v["applicationKeyId"], id.as_str());
    assert_eq!(v["applicationId"], f.app.as_str());
    assert_eq!(v["status"], "active");
    assert_eq!(v["filterType"], "all");
    assert_eq!(v["description"], "An example new key description");
    assert_eq!(v["pubTopics"], json!([]));
    assert_eq!(v["creationDate"], v["lastUpdated"]);
    assert!(time::parse_iso(v["creationDate"].as_str().unwrap()).is_some());
    let key = v["key"].as_str().unwrap().to_string();
    assert_eq!(key.len(), 36);
    assert_eq!(key.matches('-').count(), 4);
    let secret = v["secret"].as_str().unwrap().to_string();
    assert_eq!(secret.len(), 64);
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));

    // Shown only there: not by GET one, not in the list.
    let (s, one) = http(&mut f.p, &f.token, "GET", &key_path(&f.app, &id), None, "");
    assert_eq!(s, 200);
    let mut without_secret = v.clone();
    without_secret.as_object_mut().unwrap().remove("secret");
    assert_eq!(one, without_secret);
    let (_, l) = list(&mut f, "");
    assert_eq!(l["items"], json!([without_secret]));
    assert!(!l.to_string().contains(&secret));

    // Stored: the digest, never the secret (nor in the logs).
    let state = f.host.state_text();
    assert!(!state.contains(&secret));
    assert!(state.contains(&sha256_hex(&secret)));
    assert!(!f.host.logged(&secret));

    // An empty body is {}: defaults.
    let (s, v) = http(&mut f.p, &f.token, "POST", &keys_path(&f.app), None, "");
    assert_eq!(s, 201);
    assert_eq!(v["filterType"], "all");
    assert!(v.get("description").is_none());
    assert_eq!(v["subTopics"], json!([]));
    // Two keys never share key or secret.
    assert_ne!(v["key"].as_str().unwrap(), key);
    assert_ne!(v["secret"].as_str().unwrap(), secret);
}

#[test]
fn post_full_body_round_trips() {
    let mut f = setup();
    let v = post_key(
        &mut f,
        json!({
            "description": "",
            "filterType": "whitelist",
            "deviceIds": ["ABCDEF0123456789ABCDEF01"],
            "deviceTags": [{"key": "endpoint", "value": "sensor-*"}, {"key": "floor"}],
            "pubTopics": ["ep/gw/3311/0/5850"],
            "subTopics": ["ep/gw/3303/#", "losant/x/state"]
        }),
    );
    assert_eq!(v["description"], "");
    assert_eq!(v["deviceIds"], json!(["abcdef0123456789abcdef01"]));
    assert_eq!(
        v["deviceTags"],
        json!([{"key": "endpoint", "value": "sensor-*"}, {"key": "floor"}])
    );
    assert_eq!(v["subTopics"], json!(["ep/gw/3303/#", "losant/x/state"]));
}

#[test]
fn post_validation_errors_are_400() {
    let mut f = setup();
    let too_long = "x".repeat(model::MAX_DESCRIPTION + 1);
    let many_ids: Vec<String> = (0..=model::MAX_DEVICE_IDS)
        .map(|i| format!("{i:024x}"))
        .collect();
    let many_tags: Vec<Value> = (0..=model::MAX_DEVICE_TAGS)
        .map(|i| json!({"key": format!("k{i}")}))
        .collect();
    let bodies: Vec<String> = vec![
        "{".into(),
        "[]".into(),
        "\"x\"".into(),
        "null".into(),
        json!({"name": "x"}).to_string(),
        json!({"status": "inactive"}).to_string(),
        json!({"key": "mine"}).to_string(),
        json!({"secret": "mine"}).to_string(),
        json!({"id": "575ec8687ae143cd83dc4a97"}).to_string(),
        json!({"description": 5}).to_string(),
        json!({"description": null}).to_string(),
        json!({"description": too_long}).to_string(),
        json!({"filterType": "some"}).to_string(),
        json!({"filterType": "ALL"}).to_string(),
        json!({"deviceIds": "575ec8687ae143cd83dc4a97"}).to_string(),
        json!({"deviceIds": ["xyz"]}).to_string(),
        json!({"deviceIds": [5]}).to_string(),
        json!({"deviceIds": many_ids}).to_string(),
        json!({"deviceTags": {"key": "a"}}).to_string(),
        json!({"deviceTags": ["a"]}).to_string(),
        json!({"deviceTags": [{"value": "a"}]}).to_string(),
        json!({"deviceTags": [{"key": "a b"}]}).to_string(),
        json!({"deviceTags": [{"key": ""}]}).to_string(),
        json!({"deviceTags": [{"key": "a", "value": ""}]}).to_string(),
        json!({"deviceTags": [{"key": "a", "value": 5}]}).to_string(),
        json!({"deviceTags": [{"key": "a", "other": 1}]}).to_string(),
        json!({"deviceTags": [{"key": "endpoint", "value": "a/b"}]}).to_string(),
        json!({"deviceTags": many_tags}).to_string(),
        json!({"pubTopics": "ep/a"}).to_string(),
        json!({"pubTopics": [1]}).to_string(),
        json!({"pubTopics": [""]}).to_string(),
        json!({"subTopics": ["a/#/b"]}).to_string(),
        json!({"subTopics": ["a/b+"]}).to_string(),
        json!({"subTopics": ["ep/s*/3303"]}).to_string(),
        json!({"subTopics": ["x".repeat(model::MAX_TOPIC_LEN + 1)]}).to_string(),
    ];
    let before = f.host.state();
    for body in &bodies {
        let (status, v) = http(&mut f.p, &f.token, "POST", &keys_path(&f.app), None, body);
        let what: String = body.chars().take(80).collect();
        assert_error(status, &v, 400, "Validation", &what);
    }
    assert_eq!(f.host.state(), before, "a refused POST stored nothing");
}

#[test]
fn get_patch_delete_single_key() {
    let mut f = setup();
    let created = post_key(&mut f, json!({"description": "d"}));
    let id = created["id"].as_str().unwrap().to_string();
    let key = created["key"].as_str().unwrap().to_string();
    let secret = created["secret"].as_str().unwrap().to_string();
    let path = key_path(&f.app, &id);

    // Unknown key ids, and keys of other applications, are not found.
    let theirs = post_key_in_other_app(&mut f, DOMAIN, "all.Application");
    let theirs = theirs["id"].as_str().unwrap().to_string();
    let want = json!({"type": "NotFound", "message": "Application key was not found"});
    for k in ["575ec8687ae143cd83dc4a97", "nope", theirs.as_str()] {
        for method in ["GET", "PATCH", "DELETE"] {
            let (s, v) = http(&mut f.p, &f.token, method, &key_path(&f.app, k), None, "{}");
            assert_eq!((s, &v), (404, &want), "{method} {k}");
        }
    }

    // PATCH: status, description, filters; lastUpdated moves, creationDate does not.
    let (s, v) = http(
        &mut f.p,
        &f.token,
        "PATCH",
        &path,
        None,
        &json!({"status": "inactive", "description": "changed", "filterType": "none",
                "subTopics": ["ep/a/#"]})
        .to_string(),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "inactive");
    assert_eq!(v["description"], "changed");
    assert_eq!(v["filterType"], "none");
    assert_eq!(v["subTopics"], json!(["ep/a/#"]));
    assert_eq!(v["key"], key.as_str());
    assert_eq!(v["creationDate"], created["creationDate"]);
    let c = time::parse_iso(v["creationDate"].as_str().unwrap()).unwrap();
    let u = time::parse_iso(v["lastUpdated"].as_str().unwrap()).unwrap();
    assert!(u > c, "{v}");
    assert!(v.get("secret").is_none());
    let (_, got) = http(&mut f.p, &f.token, "GET", &path, None, "");
    assert_eq!(got, v);
    // Stored.
    let stored: Value = serde_json::from_slice(&f.host.state()[&format!("key/{id}")]).unwrap();
    assert_eq!(stored["status"], "inactive");

    // The key and the secret cannot be changed; bad values are refused.
    for body in [
        json!({"key": "mine"}),
        json!({"secret": "mine"}),
        json!({"id": id}),
        json!({"status": "revoked"}),
        json!({"status": null}),
        json!({"filterType": 1}),
        json!({"deviceIds": ["xyz"]}),
    ] {
        let (s, v) = http(&mut f.p, &f.token, "PATCH", &path, None, &body.to_string());
        assert_error(s, &v, 400, "Validation", &body.to_string());
    }
    assert!(matches!(
        auth_basic(&mut f.p, &key, &secret),
        AuthVerdict::Refused { .. }
    ));
    let (s, _) = http(
        &mut f.p,
        &f.token,
        "PATCH",
        &path,
        None,
        r#"{"status":"active","filterType":"all"}"#,
    );
    assert_eq!(s, 200);
    assert!(matches!(
        auth_basic(&mut f.p, &key, &secret),
        AuthVerdict::Accepted { .. }
    ));

    // DELETE: 200 success; gone from the API, the state and authentication.
    let (s, v) = http(&mut f.p, &f.token, "DELETE", &path, None, "");
    assert_eq!((s, v), (200, json!({"success": true})));
    let (s, v) = http(&mut f.p, &f.token, "GET", &path, None, "");
    assert_eq!((s, v), (404, want.clone()));
    assert!(!f.host.state().contains_key(&format!("key/{id}")));
    assert_eq!(auth_basic(&mut f.p, &key, &secret), AuthVerdict::NotMine);
    let (s, v) = http(&mut f.p, &f.token, "DELETE", &path, None, "");
    assert_eq!((s, v), (404, want));
}

#[test]
fn route_mismatch_is_404() {
    let mut f = setup();
    let app = f.app.clone();
    for (method, path) in [
        ("PUT", keys_path(&app)),
        ("DELETE", keys_path(&app)),
        ("POST", key_path(&app, K1)),
        ("GET", format!("/applications/{app}")),
        ("GET", format!("/applications/{app}/keys/{K1}/extra")),
        ("GET", "/api/api_tokens".to_string()),
    ] {
        let (s, v) = http(&mut f.p, &f.token, method, &path, None, "");
        assert_error(s, &v, 404, "NotFound", &format!("{method} {path}"));
    }
    // The core also routes a trailing slash and a lower-case method here.
    let (s, _) = http(
        &mut f.p,
        &f.token,
        "get",
        &format!("{}/", keys_path(&app)),
        None,
        "",
    );
    assert_eq!(s, 200);
}

// ---------------------------------------------------------------------------------------
// Token scopes.

/// The routes each token scope opens (the seed's lists), and the order a route lists its
/// scopes in (a 403 names them).
#[test]
fn each_token_scope_opens_the_seeds_routes() {
    let want: &[(&str, &str)] = &[
        ("all.Application", "list create get patch delete"),
        ("all.Application.read", "list get"),
        ("all.Organization", "list create get patch delete"),
        ("all.Organization.read", "list get"),
        ("all.User", "list create get patch delete"),
        ("all.User.read", "list get"),
        ("applicationKeys.*", "list create"),
        ("applicationKeys.get", "list"),
        ("applicationKeys.post", "create"),
        ("applicationKey.*", "get patch delete"),
        ("applicationKey.get", "get"),
        ("applicationKey.patch", "patch"),
        ("applicationKey.delete", "delete"),
    ];
    let actions = [
        (Action::List, "list"),
        (Action::Create, "create"),
        (Action::Get, "get"),
        (Action::Patch, "patch"),
        (Action::Delete, "delete"),
    ];
    assert_eq!(
        TOKEN_SCOPES,
        want.iter().map(|(s, _)| *s).collect::<Vec<_>>()
    );
    for (scope, opens) in want {
        let got: Vec<&str> = actions
            .iter()
            .filter(|(a, _)| a.scopes().contains(scope))
            .map(|(_, name)| *name)
            .collect();
        assert_eq!(got.join(" "), *opens, "{scope}");
    }
    assert_eq!(
        Action::Create.scopes(),
        [
            "all.Application",
            "all.Organization",
            "all.User",
            "applicationKeys.*",
            "applicationKeys.post"
        ]
    );
    assert!(!Action::Get.opened_by("applicationKeys.get"));
    assert!(!Action::List.opened_by("other.get"));
}

#[test]
fn token_scopes_per_route() {
    let mut f = setup();
    type Case = (&'static str, &'static str, &'static [&'static str], u16);
    let cases: &[Case] = &[
        ("GET", "list", &["applicationKeys.get"], 200),
        ("GET", "list", &["applicationKeys.*"], 200),
        ("GET", "list", &["all.Application.read"], 200),
        ("GET", "list", &["all.Organization.read"], 200),
        ("GET", "list", &["all.User.read"], 200),
        ("GET", "list", &["all.User"], 200),
        ("GET", "list", &["applicationKeys.post"], 403),
        ("GET", "list", &["applicationKey.*"], 403),
        ("GET", "list", &["applicationKey.get"], 403),
        ("POST", "list", &["applicationKeys.post"], 201),
        ("POST", "list", &["applicationKeys.*"], 201),
        ("POST", "list", &["all.Organization"], 201),
        ("POST", "list", &["all.Application"], 201),
        ("POST", "list", &["all.Application.read"], 403),
        ("POST", "list", &["all.User.read"], 403),
        ("POST", "list", &["applicationKeys.get"], 403),
        ("POST", "list", &["applicationKey.*"], 403),
        ("GET", "one", &["applicationKey.get"], 200),
        ("GET", "one", &["applicationKey.*"], 200),
        ("GET", "one", &["all.Organization.read"], 200),
        ("GET", "one", &["applicationKeys.*"], 403),
        ("GET", "one", &["applicationKey.patch"], 403),
        ("PATCH", "one", &["applicationKey.patch"], 200),
        ("PATCH", "one", &["applicationKey.*"], 200),
        ("PATCH", "one", &["all.User"], 200),
        ("PATCH", "one", &["all.User.read"], 403),
        ("PATCH", "one", &["applicationKey.get"], 403),
        ("PATCH", "one", &["applicationKeys.*"], 403),
        ("DELETE", "one", &["applicationKey.delete"], 200),
        ("DELETE", "one", &["applicationKey.*"], 200),
        ("DELETE", "one", &["all.Application"], 200),
        ("DELETE", "one", &["all.Application.read"], 403),
        ("DELETE", "one", &["applicationKey.patch"], 403),
        ("DELETE", "one", &["applicationKeys.*"], 403),
        (
            "GET",
            "list",
            &["applicationKeys.post", "applicationKeys.get"],
            200,
        ),
    ];
    for (method, which, scopes, want) in cases {
        let fresh = post_key(&mut f, json!({}));
        let id = fresh["id"].as_str().unwrap().to_string();
        let token = create_token(&mut f.p, &f.app, scopes);
        let path = if *which == "list" {
            keys_path(&f.app)
        } else {
            key_path(&f.app, &id)
        };
        let body = if *method == "PATCH" {
            r#"{"description":"x"}"#
        } else {
            ""
        };
        let (status, v) = http(&mut f.p, &token, method, &path, None, body);
        let what = format!("{method} {which} with {scopes:?}");
        if *want == 403 {
            assert_error(status, &v, 403, "Forbidden", &what);
        } else {
            assert_eq!(status, *want, "{what}: {v}");
        }
    }
    // Scope is checked before the application: a token without scope gets 403 even for
    // an application that does not exist.
    let token = create_token(&mut f.p, &f.app, &["applicationKeys.get"]);
    let (s, v) = http(
        &mut f.p,
        &token,
        "POST",
        &keys_path("575ec8687ae143cd83dc4a97"),
        None,
        "{}",
    );
    assert_error(s, &v, 403, "Forbidden", "403 before 404");
}

#[test]
fn non_token_callers_are_401() {
    let mut f = setup();
    let created = post_key(&mut f, json!({}));
    let basic = format!(
        "Basic {}",
        STANDARD.encode(format!(
            "{}:{}",
            created["key"].as_str().unwrap(),
            created["secret"].as_str().unwrap()
        ))
    );
    let path = keys_path(&f.app);
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no Authorization (another backend's principal)", None),
        (
            "another backend's bearer key",
            Some("Bearer someone-elses-key".into()),
        ),
        ("an application key", Some(basic)),
        ("another scheme", Some(format!("Token {}", f.token))),
    ];
    for (what, authz) in cases {
        let (s, v) = http_as(&mut f.p, authz.as_deref(), "GET", &path, None, "");
        assert_error(s, &v, 401, "Unauthorized", what);
    }
    // Our token in the header, but the core authenticated someone else (a principal
    // that does not match): refused too.
    let token_principal = principal_for(&mut f.p, &format!("Bearer {}", f.token));
    let authorization = format!("Bearer {}", f.token);
    let principal = PrincipalSpec {
        key_id: "token:ffffffffffffffffffffffff".into(),
        ..token_principal
    };
    let req = http_request(
        "GET",
        &path,
        &[("authorization", &authorization)],
        "",
        principal,
    );
    let v = call_json(&mut f.p, OP_HTTP, &serde_json::to_value(req).unwrap());
    let resp: HttpResponse = serde_json::from_value(v).unwrap();
    assert_eq!(resp.status, 401);
    assert_eq!(
        resp.headers.get("www-authenticate").map(String::as_str),
        Some("Bearer")
    );
}

// ---------------------------------------------------------------------------------------
// Application keys as REST credentials.

fn key_scopes() -> Vec<String> {
    KEY_SCOPES.iter().map(|s| s.to_string()).collect()
}

#[test]
fn key_scopes_are_the_core_ones_but_limits_and_admin() {
    let want = "endpoints:read resources:read resources:write subscriptions:read \
                subscriptions:write notifications";
    assert_eq!(KEY_SCOPES.join(" "), want);
}

#[test]
fn basic_auth_accepted_with_principal_and_allow() {
    let mut f = setup();
    let d = "abcdef0123456789abcdef01";
    // (body, expected allow)
    let cases: Vec<(Value, Option<Vec<&str>>)> = vec![
        (json!({}), None),
        (json!({"filterType": "all", "subTopics": ["ep/x/#"]}), None),
        (json!({"filterType": "blacklist"}), None),
        (
            json!({"filterType": "whitelist", "deviceIds": [d],
                   "deviceTags": [{"key": "endpoint", "value": "sensor-*"}, {"key": "floor", "value": "8"}],
                   "subTopics": ["ep/gw/3303/#"], "pubTopics": ["ep/gw/3311/0/5850", "other/topic"]}),
            Some(vec![
                d,
                "sensor-*",
                "gw/3311/0/5850",
                "gw/3303",
                "gw/3303/*",
            ]),
        ),
        (
            json!({"filterType": "none", "subTopics": ["ep/sensor-1/3303/#", "ep/+/3/0/0"]}),
            Some(vec!["sensor-1/3303", "sensor-1/3303/*", "*/3/0/0"]),
        ),
        (json!({"filterType": "none"}), Some(vec![])),
        (
            json!({"filterType": "whitelist", "deviceTags": [{"key": "endpoint"}]}),
            Some(vec!["*"]),
        ),
    ];
    for (body, want_allow) in cases {
        let v = post_key(&mut f, body.clone());
        let key = v["key"].as_str().unwrap();
        let secret = v["secret"].as_str().unwrap();
        let p = accepted(auth_basic(&mut f.p, key, secret));
        assert_eq!(
            p.key_id,
            format!("appkey:{}", v["id"].as_str().unwrap()),
            "{body}"
        );
        assert_eq!(p.domain, DOMAIN, "{body}");
        assert_eq!(p.scopes, key_scopes(), "{body}");
        let want_allow = want_allow.map(|v| v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(p.allow, want_allow, "{body}");
    }

    // The domain is the key's application's.
    let v = post_key_in_other_app(&mut f, OTHER_DOMAIN, "applicationKeys.post");
    let p = accepted(auth_basic(
        &mut f.p,
        v["key"].as_str().unwrap(),
        v["secret"].as_str().unwrap(),
    ));
    assert_eq!(p.domain, OTHER_DOMAIN);

    // Scheme case, spaces and missing padding are fine.
    let cred = STANDARD.encode(format!(
        "{}:{}",
        v["key"].as_str().unwrap(),
        v["secret"].as_str().unwrap()
    ));
    for h in [
        format!("basic {cred}"),
        format!("  BASIC  {cred} "),
        format!("Basic {}", cred.trim_end_matches('=')),
    ] {
        assert!(
            matches!(
                auth_with(&mut f.p, &[("authorization", &h)]),
                AuthVerdict::Accepted { .. }
            ),
            "{h}"
        );
    }
}

#[test]
fn basic_auth_refusals_and_not_mine() {
    let mut f = setup();
    let v = post_key(&mut f, json!({}));
    let key = v["key"].as_str().unwrap().to_string();
    let secret = v["secret"].as_str().unwrap().to_string();
    let id = v["id"].as_str().unwrap().to_string();

    let refused_reason = |verdict: AuthVerdict| match verdict {
        AuthVerdict::Refused { reason } => reason,
        other => panic!("expected Refused, got {other:?}"),
    };
    // Wrong secrets.
    for wrong in [
        "".to_string(),
        "x".to_string(),
        secret[..63].to_string(),
        format!("{secret}0"),
        secret.to_uppercase(),
    ] {
        let r = refused_reason(auth_basic(&mut f.p, &key, &wrong));
        assert!(r.contains("secret"), "{r}");
    }
    // Inactive: refused; with a wrong secret the status is not revealed.
    let (s, _) = http(
        &mut f.p,
        &f.token,
        "PATCH",
        &key_path(&f.app, &id),
        None,
        r#"{"status":"inactive"}"#,
    );
    assert_eq!(s, 200);
    let r = refused_reason(auth_basic(&mut f.p, &key, &secret));
    assert!(r.contains("inactive"), "{r}");
    let r = refused_reason(auth_basic(&mut f.p, &key, "wrong"));
    assert!(!r.contains("inactive"), "{r}");

    // A non-empty blacklist cannot be enforced: refused.
    let v = post_key(
        &mut f,
        json!({"filterType": "blacklist", "deviceIds": ["abcdef0123456789abcdef01"]}),
    );
    let r = refused_reason(auth_basic(
        &mut f.p,
        v["key"].as_str().unwrap(),
        v["secret"].as_str().unwrap(),
    ));
    assert!(r.contains("blacklist"), "{r}");

    // Not ours: unknown keys, undecodable credentials, other schemes.
    let cases: Vec<String> = vec![
        format!("Basic {}", STANDARD.encode(format!("nosuchkey:{secret}"))),
        format!("Basic {}", STANDARD.encode(format!("{key}{secret}"))),
        format!("Basic {}", STANDARD.encode(":")),
        "Basic !!!notbase64".to_string(),
        "Basic".to_string(),
        format!("Basic {}", STANDARD.encode([0xff, 0xfe, b':', b'x'])),
        format!("Bearer {key}"),
        format!("Digest {}", STANDARD.encode(format!("{key}:{secret}"))),
    ];
    for h in cases {
        assert_eq!(
            auth_with(&mut f.p, &[("authorization", &h)]),
            AuthVerdict::NotMine,
            "{h}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// State.

#[test]
fn state_survives_new_instance() {
    let mut f = setup();
    let created = post_key(
        &mut f,
        json!({"description": "kept", "filterType": "whitelist", "deviceIds": [D1]}),
    );
    let key = created["key"].as_str().unwrap().to_string();
    let secret = created["secret"].as_str().unwrap().to_string();
    let (_, before) = list(&mut f, "");
    let host = f.host.clone();
    drop(f.p);

    let mut p = new_plugin(&host);
    assert!(host.logged("1 applications, 1 API tokens, 1 application keys loaded"));
    let principal = accepted(auth_bearer(&mut p, &f.token));
    assert_eq!(principal.domain, DOMAIN);
    let kp = accepted(auth_basic(&mut p, &key, &secret));
    assert_eq!(kp.allow, Some(vec![D1.to_string()]));
    let (s, after) = http(&mut p, &f.token, "GET", &keys_path(&f.app), None, "");
    assert_eq!(s, 200);
    assert_eq!(after, before);

    // Timestamps keep increasing after the restart.
    let (_, next) = http(&mut p, &f.token, "POST", &keys_path(&f.app), None, "{}");
    let t0 = time::parse_iso(created["creationDate"].as_str().unwrap()).unwrap();
    let t1 = time::parse_iso(next["creationDate"].as_str().unwrap()).unwrap();
    assert!(t1 > t0);
}

#[test]
fn unreadable_records_are_skipped_with_a_warning() {
    let mut f = setup();
    let created = post_key(&mut f, json!({}));
    let host = f.host.clone();
    drop(f.p);
    let h = host.host();
    h.state_put("key/bbbbbbbbbbbbbbbbbbbbbbbb", b"not json")
        .unwrap();
    h.state_put(
        "app/not-an-id",
        br#"{"id":"not-an-id","name":"x","domain":"d","creationDate":1}"#,
    )
    .unwrap();
    // A token of an unknown application.
    h.state_put(
        "token/cccccccccccccccccccccccc",
        &serde_json::to_vec(&json!({"id": "cccccccccccccccccccccccc",
            "applicationId": "dddddddddddddddddddddddd", "scopes": ["all.User"],
            "tokenHash": sha256_hex("t"), "creationDate": 1}))
        .unwrap(),
    )
    .unwrap();

    let mut p = new_plugin(&host);
    let warnings: Vec<String> = host.warnings();
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert_eq!(auth_bearer(&mut p, "t"), AuthVerdict::NotMine);
    assert!(matches!(
        auth_basic(
            &mut p,
            created["key"].as_str().unwrap(),
            created["secret"].as_str().unwrap()
        ),
        AuthVerdict::Accepted { .. }
    ));
}

/// Issue 18: the routes tell the daemon to spell its own errors as the plugin does, so a
/// 401 the daemon answers (no credential) reads like the one the plugin answers.
#[test]
fn routes_declare_the_seeds_error_spelling() {
    let mut f = setup();
    let routes = routes_of(&mut f.p);
    let (status, own) = http_as(&mut f.p, None, "GET", &keys_path(&f.app), None, "");
    assert_eq!(status, 401, "{own}");
    let weak = create_token(&mut f.p, &f.app, &["all.Application.read"]);
    let (status, forbidden) = http(&mut f.p, &weak, "POST", &keys_path(&f.app), None, "{}");
    assert_eq!(status, 403, "{forbidden}");
    let (status, validation) = http(&mut f.p, &f.token, "POST", &keys_path(&f.app), None, "[]");
    assert_eq!(status, 400, "{validation}");
    for r in &routes.routes {
        let errors = r
            .errors
            .as_ref()
            .expect("the route declares its error types");
        assert_eq!(errors.unauthorized, own["type"], "{}", r.path);
        assert_eq!(errors.forbidden, forbidden["type"], "{}", r.path);
        assert_eq!(errors.bad_request, validation["type"], "{}", r.path);
    }
}

/// Issue 18: a key body sent as something other than JSON is 415; no Content-Type and
/// the JSON types are accepted.
#[test]
fn non_json_content_type_is_415() {
    let mut f = setup();
    let key = post_key(&mut f, json!({"description": "k"}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let before = f.host.state();
    let send = |f: &mut Fixture, method: &str, path: &str, ct: Option<&str>| {
        let principal = principal_for(&mut f.p, &format!("Bearer {}", f.token));
        let body = r#"{"description": "x"}"#;
        http_with_bearer(&mut f.p, &f.token, principal, method, path, ct, body)
    };
    let targets = [
        ("POST", keys_path(&f.app)),
        ("PATCH", key_path(&f.app, &key)),
    ];
    for (method, path) in &targets {
        for ct in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "text/json",
        ] {
            let (status, v) = send(&mut f, method, path, Some(ct));
            assert_error(status, &v, 415, "UnsupportedMediaType", ct);
            assert!(v["message"].as_str().unwrap().contains(ct), "{v}");
        }
    }
    assert_eq!(f.host.state(), before, "a refused body changed state");
    let (status, _) = send(&mut f, "GET", &targets[0].1, Some("text/plain"));
    assert_eq!(status, 200);
    for ct in [None, Some("application/json; charset=utf-8")] {
        let (status, v) = send(&mut f, "PATCH", &targets[1].1, ct);
        assert_eq!(status, 200, "{ct:?}: {v}");
    }
}

/// `key_status` follows authentication: an application key is active while it is active;
/// made inactive, it is revoked; unknown ids are unknown.
#[test]
fn key_status_follows_authentication() {
    let mut f = setup();
    let status = |p: &mut Losant, id: &str| -> KeyState {
        let v = call_json(p, OP_KEY_STATUS, &json!({ "key_id": id }));
        let r: KeyStatusResponse = serde_json::from_value(v).expect("KeyStatusResponse");
        r.status
    };
    let v = post_key(&mut f, json!({}));
    let (key, secret) = (v["key"].as_str().unwrap(), v["secret"].as_str().unwrap());
    let principal = accepted(auth_basic(&mut f.p, key, secret));
    let token = accepted(auth_bearer(&mut f.p, &f.token.clone()));
    assert_eq!(status(&mut f.p, &principal.key_id), KeyState::Active);
    assert_eq!(status(&mut f.p, &token.key_id), KeyState::Active);
    // An active key's answer carries the restriction authentication gives it.
    let restriction = |p: &mut Losant, id: &str| -> Option<Restriction> {
        let v = call_json(p, OP_KEY_STATUS, &json!({ "key_id": id }));
        let r: KeyStatusResponse = serde_json::from_value(v).expect("KeyStatusResponse");
        r.restriction
    };
    assert_eq!(
        restriction(&mut f.p, &principal.key_id),
        Some(Restriction {
            allow: principal.allow.clone()
        })
    );
    assert_eq!(
        restriction(&mut f.p, &token.key_id),
        Some(Restriction {
            allow: Some(Vec::new())
        })
    );
    let id = v["id"].as_str().unwrap().to_string();
    let (s, _) = http(
        &mut f.p,
        &f.token.clone(),
        "PATCH",
        &key_path(&f.app.clone(), &id),
        None,
        r#"{"status":"inactive"}"#,
    );
    assert_eq!(s, 200);
    assert_eq!(status(&mut f.p, &principal.key_id), KeyState::Revoked);
    assert_eq!(restriction(&mut f.p, &principal.key_id), None);
    for unknown in ["appkey:nope", "token:nope", "nope", &id] {
        assert_eq!(status(&mut f.p, unknown), KeyState::Unknown, "{unknown}");
    }
}

/// An API token and an application can be deleted (`connectord plugin-call`): the token
/// no longer authenticates and is `unknown`; an application goes with its tokens and keys
/// (`unknown`, and so after a restart, which finds no record of them). Before, neither
/// could be revoked at all.
#[test]
fn tokens_and_applications_can_be_deleted() {
    let mut f = setup();
    let spare = create_token(&mut f.p, &f.app, &["all.Application"]);
    let key = post_key(&mut f, json!({"description": "k"}));
    let spare_id = accepted(auth_bearer(&mut f.p, &spare))
        .key_id
        .strip_prefix("token:")
        .unwrap()
        .to_string();
    let v = call_json(&mut f.p, OP_DELETE_TOKEN, &json!({"id": spare_id}));
    assert_eq!(v, json!({"deleted": spare_id}));
    assert_eq!(auth_bearer(&mut f.p, &spare), AuthVerdict::NotMine);
    assert_eq!(
        f.p.key_status(&format!("token:{spare_id}")).status,
        KeyState::Unknown
    );
    let err =
        f.p.call(
            OP_DELETE_TOKEN,
            json!({"id": spare_id}).to_string().as_bytes(),
        )
        .unwrap_err();
    assert!(err.contains("unknown API token"), "{err}");
    assert!(
        accepted(auth_bearer(&mut f.p, &f.token))
            .key_id
            .starts_with("token:")
    );

    let v = call_json(&mut f.p, OP_DELETE_APPLICATION, &json!({"id": f.app}));
    assert_eq!(v, json!({"deleted": f.app, "tokens": 1, "keys": 1}));
    assert_eq!(auth_bearer(&mut f.p, &f.token), AuthVerdict::NotMine);
    let key_id = format!("appkey:{}", key["id"].as_str().unwrap());
    assert_eq!(f.p.key_status(&key_id).status, KeyState::Unknown);
    assert!(
        !f.host.state_text().contains(&f.app),
        "no record of the application is left"
    );
    let mut again = new_plugin(&f.host);
    assert_eq!(auth_bearer(&mut again, &f.token), AuthVerdict::NotMine);
    assert_eq!(again.key_status(&key_id).status, KeyState::Unknown);
}
