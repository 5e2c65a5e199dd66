//! The Connector access-key auth backend (plugin `connector`, kind [`Kind::Auth`]).
//!
//! Callers present an mbed Device Connector style access key as
//! `Authorization: Bearer <key>`. Keys are 100 random alphanumeric characters from a
//! CSPRNG; the plugin keeps only their SHA-256 digest (lower-case hex), durably in the
//! host's state under `key/<digest>` as JSON `{id, name, domain, scopes, created_ms}`, and
//! in memory as a map digest → record. The secret itself is never stored and is shown
//! exactly once, in the answer that creates it.
//!
//! Operations:
//! - [`OP_BOOTSTRAP`]: when there is no key at all, creates a first key named `admin`
//!   with scope `admin` in the requested domain and returns it.
//! - [`OP_AUTHENTICATE`]: a known bearer key is accepted as its record's principal; any
//!   other request (no header, another scheme, an empty or unknown key) is
//!   [`AuthVerdict::NotMine`], so that another backend may claim it (the host answers 401
//!   when none does).
//! - [`OP_ROUTES`] / [`OP_HTTP`]: `POST /api/api_tokens` (scope `admin`) creates a key in
//!   the caller's domain with every core scope but `admin`, as the Connector API does:
//!   the optional JSON body `{"name": …}` names it (a random 10-character name otherwise),
//!   and the answer is `201 {"access_key": …, "name": …}`. A name has 1 to 256 characters
//!   and no control characters; a body that is not a JSON object is 400 `bad_request`, a
//!   `Content-Type` that is present and not JSON (`application/json`, `+json`) 415
//!   `unsupported_media_type` (an absent one is taken as JSON: the SDKs may send none).
//!
//! Configuration: none yet; `{}` is accepted and any field is refused by name.

use std::collections::HashMap;

use connectord_plugin_sdk::auth::{
    ADMIN, AuthRequest, AuthVerdict, BootstrapRequest, BootstrapResponse, NON_ADMIN_SCOPES,
    OP_AUTHENTICATE, OP_BOOTSTRAP, PrincipalSpec, VerdictCache, bearer_token,
};
use connectord_plugin_sdk::http::{
    HttpRequest, HttpResponse, OP_HTTP, OP_ROUTES, Route, RoutesResponse, refuse_non_json,
};
use connectord_plugin_sdk::names::refuse_control_chars;
use connectord_plugin_sdk::secret::{is_sha256_hex, random_alphanumeric, sha256_hex};
use connectord_plugin_sdk::time::now_ms;
use connectord_plugin_sdk::{Host, Kind, Plugin, declare_plugin, decode_input, encode_answer};
use serde::{Deserialize, Serialize};

/// The plugin name the configuration uses.
pub const NAME: &str = "connector";

/// Prefix of the state keys holding key records (`key/<sha256 hex>`).
const KEY_PREFIX: &str = "key/";
/// Length of an access key, as in the Connector API's examples.
const KEY_LEN: usize = 100;
/// Length of the random display name given when the request names none.
const RANDOM_NAME_LEN: usize = 10;
/// Longest display name accepted, in characters.
const MAX_NAME_CHARS: usize = 256;

/// The route that creates keys. It needs the core scope [`ADMIN`], the one scope a
/// bootstrap key has.
const TOKENS_METHOD: &str = "POST";
const TOKENS_PATH: &str = "/api/api_tokens";

/// The scopes of a key created through `POST /api/api_tokens`: every core scope but
/// `admin` (an access key cannot mint administrators).
const USER_SCOPES: &[&str] = &NON_ADMIN_SCOPES;

/// The plugin's configuration. It has no field yet; `deny_unknown_fields` makes a
/// misspelt or unsupported field an error at load rather than silently ignored. New
/// options go here (with `#[serde(default)]`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {}

/// One access key as stored: everything but the secret (the state key and the in-memory
/// map key are the secret's SHA-256 digest, never the secret). Deriving `Debug` is safe
/// for that reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KeyRecord {
    /// Random 16 hex characters; what the rest of the daemon sees as the key id.
    id: String,
    /// The display name.
    name: String,
    /// The one domain the key's holder sees.
    domain: String,
    /// Core scopes.
    scopes: Vec<String>,
    /// Creation time, milliseconds since the Unix epoch.
    created_ms: u64,
}

/// The plugin instance.
pub struct ConnectorAuth {
    host: Host,
    /// SHA-256 (lower-case hex) of each key's secret → its record.
    keys: HashMap<String, KeyRecord>,
}

/// The display name a `POST /api/api_tokens` body asks for: `Ok(None)` when it asks for
/// none (empty or whitespace body, no `name` field, or `"name": null`), `Err(why)` when
/// the body is not acceptable. Unknown fields are ignored.
fn requested_name(body: &str) -> Result<Option<String>, String> {
    if body.trim().is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
    let serde_json::Value::Object(fields) = value else {
        return Err("body must be a JSON object".to_string());
    };
    match fields.get("name") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(name)) => {
            let chars = name.chars().count();
            if !(1..=MAX_NAME_CHARS).contains(&chars) {
                return Err(format!(
                    "name must be 1 to {MAX_NAME_CHARS} characters long (got {chars})"
                ));
            }
            refuse_control_chars("name", name)?;
            Ok(Some(name.clone()))
        }
        Some(_) => Err("name must be a string".to_string()),
    }
}

impl ConnectorAuth {
    /// Reads every `key/…` record of the host state. A record that cannot be read or
    /// parsed is logged and skipped; failing to list the state fails the load (the
    /// plugin would otherwise believe it has no key and bootstrap a new admin).
    fn load(host: &Host) -> Result<HashMap<String, KeyRecord>, String> {
        let mut keys = HashMap::new();
        for (digest, record) in host.load_json_records::<KeyRecord>(KEY_PREFIX)? {
            if !is_sha256_hex(&digest) {
                host.warn(&format!(
                    "{NAME}: skipping state entry {KEY_PREFIX}{digest}: not a SHA-256 digest"
                ));
                continue;
            }
            keys.insert(digest, record);
        }
        Ok(keys)
    }

    /// Creates a key: a fresh secret, stored (durably, then in memory) only as its
    /// digest. Returns the secret, which the caller shows once.
    fn create_key(
        &mut self,
        name: String,
        domain: String,
        scopes: Vec<String>,
    ) -> Result<String, String> {
        // 100 alphanumeric characters are ~595 bits: a collision is not going to happen,
        // but drawing again costs nothing and keeps the map's invariant obvious.
        let (secret, digest) = loop {
            let secret = random_alphanumeric(KEY_LEN);
            let digest = sha256_hex(&secret);
            if !self.keys.contains_key(&digest) {
                break (secret, digest);
            }
        };
        let id = loop {
            let id = format!("{:016x}", rand::random::<u64>());
            if !self.keys.values().any(|r| r.id == id) {
                break id;
            }
        };
        let record = KeyRecord {
            id,
            name,
            domain,
            scopes,
            created_ms: now_ms(),
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
        self.host
            .state_put(&format!("{KEY_PREFIX}{digest}"), &bytes)?;
        self.host.info(&format!(
            "{NAME}: created access key {} ({:?}) in domain {:?} with scopes {}",
            record.id,
            record.name,
            record.domain,
            record.scopes.join(" ")
        ));
        self.keys.insert(digest, record);
        Ok(secret)
    }

    fn bootstrap(&mut self, req: BootstrapRequest) -> Result<BootstrapResponse, String> {
        if !self.keys.is_empty() {
            return Ok(BootstrapResponse { created: None });
        }
        let secret = self.create_key(ADMIN.to_string(), req.domain, vec![ADMIN.to_string()])?;
        Ok(BootstrapResponse {
            created: Some(secret),
        })
    }

    fn authenticate(&self, req: &AuthRequest) -> AuthVerdict {
        let Some(token) = bearer_token(&req.headers) else {
            return AuthVerdict::NotMine;
        };
        // The lookup is by the SHA-256 of the presented token, never by the token itself:
        // whatever the map's hashing and string comparison leak through timing is about
        // how the *digest* of the attacker's guess relates to stored digests. Since
        // SHA-256 is preimage resistant, learning that a stored digest starts with some
        // bytes does not help build a secret with that digest, so this lookup is as good
        // as a constant-time comparison of secrets.
        match self.keys.get(&sha256_hex(token)) {
            // The verdict depends on the bearer token only (keys do not expire; a key
            // deleted through this plugin's routes makes the host forget it at once).
            Some(record) => AuthVerdict::Accepted {
                principal: PrincipalSpec {
                    key_id: record.id.clone(),
                    domain: record.domain.clone(),
                    scopes: record.scopes.clone(),
                    allow: None,
                },
                cache: Some(VerdictCache {
                    headers: vec!["authorization".into()],
                    ttl_ms: 1000,
                }),
            },
            // Perhaps another backend's credential: let the host ask it.
            None => AuthVerdict::NotMine,
        }
    }

    fn routes() -> RoutesResponse {
        RoutesResponse {
            routes: vec![Route {
                method: TOKENS_METHOD.to_string(),
                path: TOKENS_PATH.to_string(),
                scope: ADMIN.to_string(),
                errors: None,
            }],
        }
    }

    fn http(&mut self, req: HttpRequest) -> HttpResponse {
        if req.method != TOKENS_METHOD || req.path != TOKENS_PATH {
            return HttpResponse::error(
                404,
                "not_found",
                &format!("no route {} {}", req.method, req.path),
            );
        }
        if let Err(m) = refuse_non_json(req.headers.get("content-type").map(String::as_str)) {
            return HttpResponse::error(415, "unsupported_media_type", &m);
        }
        let name = match requested_name(&req.body) {
            Ok(Some(name)) => name,
            Ok(None) => random_alphanumeric(RANDOM_NAME_LEN),
            Err(why) => return HttpResponse::error(400, "bad_request", &why),
        };
        let scopes = USER_SCOPES.iter().map(|s| s.to_string()).collect();
        match self.create_key(name.clone(), req.principal.domain, scopes) {
            Ok(secret) => HttpResponse::json(
                201,
                &serde_json::json!({"access_key": secret, "name": name}),
            ),
            Err(e) => {
                self.host
                    .warn(&format!("{NAME}: could not store a new access key: {e}"));
                HttpResponse::error(500, "internal_error", "could not store the new access key")
            }
        }
    }
}

impl Plugin for ConnectorAuth {
    const NAME: &'static str = NAME;
    const KIND: Kind = Kind::Auth;

    fn create(config: serde_json::Value, host: Host) -> Result<Self, String> {
        let Config {} = serde_json::from_value(config)
            .map_err(|e| format!("{NAME}: invalid configuration: {e}"))?;
        let keys = Self::load(&host)?;
        host.info(&format!("{NAME}: {} access keys loaded", keys.len()));
        Ok(ConnectorAuth { host, keys })
    }

    fn call(&mut self, op: &str, input: &[u8]) -> Result<Vec<u8>, String> {
        match op {
            OP_BOOTSTRAP => {
                let req: BootstrapRequest = decode_input(op, input)?;
                encode_answer(&self.bootstrap(req)?)
            }
            OP_AUTHENTICATE => {
                let req: AuthRequest = decode_input(op, input)?;
                encode_answer(&self.authenticate(&req))
            }
            OP_ROUTES => encode_answer(&Self::routes()),
            OP_HTTP => {
                let req: HttpRequest = decode_input(op, input)?;
                encode_answer(&self.http(req))
            }
            OP_CREATE_KEY => {
                let req: CreateKeyRequest = decode_input(op, input)?;
                for s in &req.scopes {
                    if !USER_SCOPES.contains(&s.as_str()) && s != ADMIN {
                        return Err(format!("{op}: unknown scope {s:?}"));
                    }
                }
                if req.domain.is_empty() || req.name.is_empty() {
                    return Err(format!("{op}: name and domain must not be empty"));
                }
                let scopes = if req.scopes.is_empty() {
                    USER_SCOPES.iter().map(|s| s.to_string()).collect()
                } else {
                    req.scopes
                };
                let secret = self.create_key(req.name.clone(), req.domain, scopes)?;
                encode_answer(&serde_json::json!({"access_key": secret, "name": req.name}))
            }
            other => Err(format!("{NAME}: unknown operation {other:?}")),
        }
    }
}

/// Administrative operation (`connectord plugin-call connector create_key '{…}'`): creates
/// a key in any domain, for example the first key of a new tenant. Scopes default to every
/// non-admin scope.
pub const OP_CREATE_KEY: &str = "create_key";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKeyRequest {
    name: String,
    domain: String,
    #[serde(default)]
    scopes: Vec<String>,
}

declare_plugin!(ConnectorAuth);

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use connectord_plugin_sdk::testing::{
        MemoryHost, assert_bad_input_refused, assert_config_field_refused, auth_request,
        authenticate, call_http, call_json,
    };
    use serde_json::{Value, json};

    use super::*;

    const DOMAIN: &str = "domain-a";

    fn new_plugin(host: &MemoryHost) -> ConnectorAuth {
        ConnectorAuth::create(json!({}), host.host()).expect("create")
    }

    fn bootstrap(p: &mut ConnectorAuth, domain: &str) -> BootstrapResponse {
        let v = call_json(p, OP_BOOTSTRAP, &json!({ "domain": domain }));
        serde_json::from_value(v).expect("BootstrapResponse")
    }

    fn auth_with(p: &mut ConnectorAuth, headers: &[(&str, &str)]) -> AuthVerdict {
        authenticate(p, &auth_request("GET", "/endpoints", headers))
    }

    fn auth_bearer(p: &mut ConnectorAuth, key: &str) -> AuthVerdict {
        auth_with(p, &[("authorization", &format!("Bearer {key}"))])
    }

    fn admin_principal() -> PrincipalSpec {
        PrincipalSpec {
            key_id: "0123456789abcdef".into(),
            domain: DOMAIN.into(),
            scopes: vec!["admin".into()],
            allow: None,
        }
    }

    fn http_req(method: &str, path: &str, body: &str) -> HttpRequest {
        HttpRequest {
            method: method.into(),
            path: path.into(),
            query: None,
            headers: BTreeMap::from([("content-type".into(), "application/json".into())]),
            body: body.into(),
            principal: admin_principal(),
        }
    }

    fn post_tokens(p: &mut ConnectorAuth, body: &str) -> (HttpResponse, Value) {
        call_http(p, &http_req("POST", TOKENS_PATH, body))
    }

    fn is_alnum(s: &str) -> bool {
        s.bytes().all(|b| b.is_ascii_alphanumeric())
    }

    fn user_scopes() -> Vec<String> {
        USER_SCOPES.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn bootstrap_creates_one_admin_key_once() {
        let host = MemoryHost::new();
        let mut p = new_plugin(&host);

        let first = bootstrap(&mut p, DOMAIN);
        let key = first.created.expect("a key is created");
        assert_eq!(key.len(), KEY_LEN);
        assert!(is_alnum(&key));

        let state = host.state();
        assert_eq!(state.len(), 1);
        let (state_key, value) = state.iter().next().unwrap();
        assert_eq!(state_key, &format!("key/{}", sha256_hex(&key)));
        let record: Value = serde_json::from_slice(value).unwrap();
        assert_eq!(record["name"], "admin");
        assert_eq!(record["domain"], DOMAIN);
        assert_eq!(record["scopes"], json!(["admin"]));
        assert_eq!(record["id"].as_str().unwrap().len(), 16);
        assert!(record["created_ms"].as_u64().unwrap() > 0);

        match auth_bearer(&mut p, &key) {
            AuthVerdict::Accepted { principal, .. } => {
                assert_eq!(principal.domain, DOMAIN);
                assert_eq!(principal.scopes, vec!["admin".to_string()]);
                assert_eq!(principal.key_id, record["id"].as_str().unwrap());
            }
            other => panic!("expected Accepted, got {other:?}"),
        }

        // A second bootstrap, on this instance or after a restart, creates nothing.
        assert_eq!(bootstrap(&mut p, DOMAIN).created, None);
        let mut restarted = new_plugin(&host);
        assert_eq!(bootstrap(&mut restarted, "other-domain").created, None);
        assert_eq!(host.state().len(), 1);

        // Only the digest is stored: the secret appears nowhere.
        assert!(!host.state_text().contains(&key));
        assert!(!host.logs().iter().any(|(_, m)| m.contains(&key)));
    }

    #[test]
    fn authenticate_not_mine_cases() {
        let host = MemoryHost::new();
        let mut p = new_plugin(&host);
        let key = bootstrap(&mut p, DOMAIN).created.unwrap();

        let cases: &[(&str, &[(&str, &str)])] = &[
            ("no header", &[]),
            ("other header", &[("x-api-key", "whatever")]),
            ("basic scheme", &[("authorization", "Basic dXNlcjpwYXNz")]),
            (
                "basic scheme, our key",
                &[("authorization", &format!("Basic {key}"))],
            ),
            ("bearer, no token", &[("authorization", "Bearer")]),
            ("bearer, blank token", &[("authorization", "Bearer    ")]),
            ("empty header", &[("authorization", "")]),
            (
                "scheme glued to key",
                &[("authorization", &format!("Bearer{key}"))],
            ),
            ("unknown key", &[("authorization", "Bearer nosuchkey")]),
            (
                "key with a suffix",
                &[("authorization", &format!("Bearer {key}x"))],
            ),
            (
                "key prefix",
                &[("authorization", &format!("Bearer {}", &key[..99]))],
            ),
        ];
        for (what, headers) in cases {
            assert_eq!(auth_with(&mut p, headers), AuthVerdict::NotMine, "{what}");
        }
    }

    #[test]
    fn authenticate_scheme_case_and_spaces() {
        let host = MemoryHost::new();
        let mut p = new_plugin(&host);
        let key = bootstrap(&mut p, DOMAIN).created.unwrap();
        for value in [
            format!("bearer {key}"),
            format!("BEARER {key}"),
            format!("Bearer {key}"),
            format!("  Bearer   {key}  "),
            format!("bEaReR\t{key}"),
        ] {
            assert!(
                matches!(
                    auth_with(&mut p, &[("authorization", &value)]),
                    AuthVerdict::Accepted { .. }
                ),
                "{value:?}"
            );
        }
    }

    #[test]
    fn post_api_tokens_with_name() {
        let host = MemoryHost::new();
        let mut p = new_plugin(&host);
        let (resp, body) = post_tokens(&mut p, r#"{"name": "Access key name #1"}"#);
        assert_eq!(resp.status, 201);
        assert_eq!(body["name"], "Access key name #1");
        let key = body["access_key"].as_str().expect("access_key");
        assert_eq!(key.len(), KEY_LEN);
        assert!(is_alnum(key));
        assert_eq!(body.as_object().unwrap().len(), 2);

        match auth_bearer(&mut p, key) {
            AuthVerdict::Accepted { principal, .. } => {
                assert_eq!(principal.domain, DOMAIN);
                assert_eq!(principal.scopes, user_scopes());
                assert!(!principal.scopes.iter().any(|s| s == "admin"));
                assert_eq!(principal.key_id.len(), 16);
                assert!(principal.key_id.bytes().all(|b| b.is_ascii_hexdigit()));
            }
            other => panic!("expected Accepted, got {other:?}"),
        }
        assert!(!host.state_text().contains(key));
    }

    #[test]
    fn post_api_tokens_without_name_gets_random_name() {
        let host = MemoryHost::new();
        let mut p = new_plugin(&host);
        for body in ["", "   \n", "{}", r#"{"name": null}"#, r#"{"other": 1}"#] {
            let (resp, v) = post_tokens(&mut p, body);
            assert_eq!(resp.status, 201, "{body:?}");
            let name = v["name"].as_str().expect("name");
            assert_eq!(name.len(), RANDOM_NAME_LEN, "{body:?}");
            assert!(is_alnum(name), "{body:?}");
            assert_eq!(v["access_key"].as_str().unwrap().len(), KEY_LEN);
        }
        assert_eq!(host.state().len(), 5);
    }

    #[test]
    fn post_api_tokens_unknown_fields_ignored_and_long_names_allowed() {
        let host = MemoryHost::new();
        let mut p = new_plugin(&host);
        let max = "é".repeat(MAX_NAME_CHARS); // 256 characters, 512 bytes
        let body = json!({"name": max, "extra": [1, 2]}).to_string();
        let (resp, v) = post_tokens(&mut p, &body);
        assert_eq!(resp.status, 201);
        assert_eq!(v["name"], max.as_str());
    }

    #[test]
    fn http_error_cases() {
        let long_body = json!({ "name": "x".repeat(300) }).to_string();
        // Bodies of POST /api/api_tokens refused with 400: (what, body, message fragment).
        let bad_bodies: &[(&str, &str, &str)] = &[
            ("bad json", "{name", "not valid JSON"),
            ("truncated json", r#"{"name": "a""#, "not valid JSON"),
            ("array", "[]", "JSON object"),
            ("string", r#""name""#, "JSON object"),
            ("null", "null", "JSON object"),
            ("number name", r#"{"name": 5}"#, "must be a string"),
            ("object name", r#"{"name": {}}"#, "must be a string"),
            ("empty name", r#"{"name": ""}"#, "1 to 256"),
            ("300-char name", &long_body, "1 to 256"),
            (
                "NUL in name",
                r#"{"name": "a\u0000b"}"#,
                "control characters",
            ),
            (
                "BEL in name",
                r#"{"name": "bell\u0007"}"#,
                "control characters",
            ),
            (
                "newline in name",
                r#"{"name": "two\nlines"}"#,
                "control characters",
            ),
        ];
        // Requests on no route of this plugin, refused with 404: (method, path).
        let no_routes: &[(&str, &str)] = &[
            ("GET", TOKENS_PATH),
            ("post", TOKENS_PATH),
            ("DELETE", TOKENS_PATH),
            ("POST", "/api/other"),
            ("POST", "/api/api_tokens/"),
        ];
        let cases = bad_bodies
            .iter()
            .map(|(what, body, fragment)| {
                (
                    what.to_string(),
                    "POST",
                    TOKENS_PATH,
                    *body,
                    400,
                    "bad_request",
                    *fragment,
                )
            })
            .chain(no_routes.iter().map(|(method, path)| {
                (
                    format!("{method} {path}"),
                    *method,
                    *path,
                    "",
                    404,
                    "not_found",
                    "no route",
                )
            }));

        let host = MemoryHost::new();
        let mut p = new_plugin(&host);
        for (what, method, path, body, status, kind, fragment) in cases {
            let (resp, v) = call_http(&mut p, &http_req(method, path, body));
            assert_eq!(resp.status, status, "{what}");
            assert_eq!(v["type"], kind, "{what}");
            let message = v["message"].as_str().expect("message");
            assert!(message.contains(fragment), "{what}: {message}");
        }
        // No refused request stored anything.
        assert!(host.state().is_empty());
    }

    /// Issue 18: a body sent as something other than JSON is 415; no Content-Type and the
    /// JSON types are accepted.
    #[test]
    fn non_json_content_type_is_415() {
        let host = MemoryHost::new();
        let mut p = new_plugin(&host);
        for ct in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "text/json",
        ] {
            let mut req = http_req("POST", TOKENS_PATH, r#"{"name": "n"}"#);
            req.headers.insert("content-type".into(), ct.into());
            let (resp, v) = call_http(&mut p, &req);
            assert_eq!(resp.status, 415, "{ct}: {v}");
            assert_eq!(v["type"], "unsupported_media_type");
            assert!(v["message"].as_str().unwrap().contains(ct), "{v}");
        }
        assert!(host.state().is_empty());
        for ct in [
            None,
            Some("application/json;charset=utf-8"),
            Some("application/x+json"),
        ] {
            let mut req = http_req("POST", TOKENS_PATH, r#"{"name": "n"}"#);
            req.headers.remove("content-type");
            if let Some(ct) = ct {
                req.headers.insert("content-type".into(), ct.into());
            }
            let (resp, v) = call_http(&mut p, &req);
            assert_eq!(resp.status, 201, "{ct:?}: {v}");
        }
    }

    #[test]
    fn keys_survive_restart() {
        let host = MemoryHost::new();
        let mut p = new_plugin(&host);
        let admin = bootstrap(&mut p, DOMAIN).created.unwrap();
        let (_, v) = post_tokens(&mut p, r#"{"name": "k1"}"#);
        let user = v["access_key"].as_str().unwrap().to_string();
        drop(p);

        let mut p = new_plugin(&host);
        match auth_bearer(&mut p, &user) {
            AuthVerdict::Accepted { principal, .. } => {
                assert_eq!(principal.domain, DOMAIN);
                assert_eq!(principal.scopes, user_scopes());
            }
            other => panic!("expected Accepted, got {other:?}"),
        }
        assert!(matches!(
            auth_bearer(&mut p, &admin),
            AuthVerdict::Accepted { .. }
        ));
        assert!(
            host.logs()
                .iter()
                .any(|(_, m)| m.contains("2 access keys loaded"))
        );
    }

    #[test]
    fn routes_lists_the_post_route() {
        let host = MemoryHost::new();
        let mut p = new_plugin(&host);
        let v = call_json(&mut p, OP_ROUTES, &json!({}));
        let routes: RoutesResponse = serde_json::from_value(v).unwrap();
        assert_eq!(
            routes.routes,
            vec![Route {
                method: "POST".into(),
                path: "/api/api_tokens".into(),
                scope: "admin".into(),
                errors: None,
            }]
        );
        // The host may call it with no input at all.
        assert!(p.call(OP_ROUTES, b"").is_ok());
    }

    #[test]
    fn unknown_op_and_bad_input_are_errors() {
        let host = MemoryHost::new();
        let mut p = new_plugin(&host);
        let ops = [OP_BOOTSTRAP, OP_AUTHENTICATE, OP_HTTP];
        assert_bad_input_refused(&mut p, &ops, &[b"{}"]);
    }

    #[test]
    fn config_empty_accepted_unknown_refused() {
        assert_config_field_refused::<ConnectorAuth>("hash", json!("md5"));
    }

    #[test]
    fn unreadable_records_are_skipped_with_a_warning() {
        let host = MemoryHost::new();
        let mut p = new_plugin(&host);
        let (_, v) = post_tokens(&mut p, r#"{"name": "good"}"#);
        let good = v["access_key"].as_str().unwrap().to_string();
        drop(p);

        let bad_digest = sha256_hex("whatever");
        let h = host.host();
        h.state_put(&format!("key/{bad_digest}"), b"not json")
            .unwrap();
        h.state_put("key/not-a-digest", br#"{"id":"x"}"#).unwrap();

        let mut p = new_plugin(&host);
        assert!(matches!(
            auth_bearer(&mut p, &good),
            AuthVerdict::Accepted { .. }
        ));
        assert_eq!(auth_bearer(&mut p, "whatever"), AuthVerdict::NotMine);
        let warnings: Vec<String> = host.warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings.iter().any(|m| m.contains(&bad_digest)));
        assert!(warnings.iter().any(|m| m.contains("not-a-digest")));
        // The one good key counts: no second admin is bootstrapped.
        assert_eq!(bootstrap(&mut p, DOMAIN).created, None);
    }

    #[test]
    fn bearer_token_parsing() {
        let req = |v: &str| auth_request("GET", "/", &[("authorization", v)]);
        assert_eq!(bearer_token(&req("Bearer abc").headers), Some("abc"));
        assert_eq!(bearer_token(&req(" bearer  abc ").headers), Some("abc"));
        assert_eq!(bearer_token(&req("Bearer").headers), None);
        assert_eq!(bearer_token(&req("Bearer ").headers), None);
        assert_eq!(bearer_token(&req("Token abc").headers), None);
        assert_eq!(bearer_token(&req("").headers), None);
    }

    #[test]
    fn digest_is_lower_case_sha256_hex() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_sha256_hex(&sha256_hex("x")));
        assert!(!is_sha256_hex(&sha256_hex("x").to_uppercase()));
    }
}
