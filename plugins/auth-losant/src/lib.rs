//! The Losant auth backend (plugin `losant`, kind [`Kind::Auth`]): Losant-style
//! applications, API access tokens and application keys, with the Application Keys API of
//! seed 003 (`docs/auth-losant.md` is the operator's version of this text).
//!
//! # Objects
//!
//! - **Applications**: `{id, name, domain, creationDate}`; the id is 24 lower-case hex
//!   characters (a MongoDB-style ObjectId: 8 hex of creation seconds, 16 random). Each
//!   belongs to one connectord domain. Created only by the operation
//!   `create_application`.
//! - **API access tokens** (`Authorization: Bearer <token>`): 64 random alphanumeric
//!   characters, bound to exactly one application, carrying Losant scopes (see below).
//!   Created only by the operation `create_token`; the token is shown once, in that answer.
//! - **Application keys** (`Authorization: Basic base64(<key>:<secret>)`): created through
//!   `POST /applications/{APPLICATION_ID}/keys`. The key is a random UUID-shaped string,
//!   the secret 64 random hex characters, shown once in the 201 answer.
//!
//! Secrets (tokens and key secrets) are stored only as their SHA-256 (lower-case hex): both
//! are ≥ 256-bit random strings, so a plain digest cannot be reversed; key secrets are
//! compared digest against digest in constant time, tokens are looked up by digest.
//!
//! # Operations (`connectord plugin-call losant <op> '<json>'`)
//!
//! - `create_application` `{"name": "…", "domain": "…"}` → `{"id": "<24 hex>"}`. The name
//!   and the domain are 1 to 255 characters without control characters.
//! - `create_token` `{"application_id": "…", "scopes": ["…", …]}` →
//!   `{"id": "<24 hex>", "token": "<64 characters>"}`. At least one scope, each one of
//!   [`TOKEN_SCOPES`].
//! - `bootstrap` creates nothing (`{"created": null}`): the first application and token
//!   can only come from the two operations above.
//! - `authenticate`, `routes`, `http`: the auth backend protocol of the SDK.
//! - `key_status` (the host's): `token:<id>` is `active` while the token and its
//!   application exist, `appkey:<id>` while `authenticate` would accept the key (its status,
//!   application and filter; the secret aside); a record that would be refused is
//!   `revoked`, anything else `unknown`.
//!
//! Unknown fields in any operation input, and in the plugin configuration (which takes
//! none: `{}`), are refused.
//!
//! # Authentication (`authenticate`)
//!
//! - `Bearer <token>` of a known token → `Accepted`, key_id `token:<token id>`, domain =
//!   the application's, scopes `[]` and `allow: Some([])`: a token reaches no core route,
//!   only this plugin's routes (declared `authenticated`), where the plugin checks its
//!   Losant scopes. An unknown bearer token → `NotMine` (another backend's, perhaps).
//! - `Basic base64(key:secret)` (scheme case-insensitive, padding optional):
//!   unknown key, undecodable credentials or no `:` → `NotMine`; known key with a wrong
//!   secret → `Refused` (checked first, so that the key's status is not revealed without
//!   its secret); `inactive` key → `Refused`; a key whose filter cannot be enforced (a
//!   non-empty `blacklist`) → `Refused`; otherwise `Accepted` with key_id `appkey:<id>`,
//!   domain = the application's, scopes [`KEY_SCOPES`] (the same for every key) and
//!   `allow` derived from the key as below.
//! - Anything else → `NotMine`.
//!
//! ## Application key → `allow`
//!
//! connectord endpoints are read as Losant devices as follows: an endpoint's Losant
//! device id is its endpoint name, and it carries exactly one device tag,
//! `endpoint = <endpoint name>`. Topics name resources under the root `ep`:
//! `ep/<endpoint name>/<object>/<instance>/<resource>…`.
//!
//! - `filterType` `all` → `allow: None` (no restriction; topics add nothing).
//! - `blacklist` with no device ids or tags → `None`; with some → not enforceable (the
//!   core's patterns cannot exclude) → `Refused` at authentication.
//! - `whitelist` → one pattern per device id (the id itself: the endpoint of that name),
//!   one per tag `{"key": "endpoint", "value": v}` (`v`, an endpoint-name glob where `*`
//!   matches any run; without a value, `*`); tags with other keys match no endpoint.
//! - `none` → no device pattern.
//! - For `whitelist` and `none`, every topic of `pubTopics` and `subTopics` (treated
//!   alike) adds patterns: a topic not under `ep/` adds nothing; otherwise level 2 is the
//!   endpoint (`+` → `*`, `#` → every endpoint: `*`), the remaining levels the resource
//!   path with `+` → `*`; a final `#` stands for its parent level and everything below:
//!   `ep/sensor-1/3303/#` → `sensor-1/3303` and `sensor-1/3303/*`; `ep/sensor-1` and
//!   `ep/sensor-1/#` → `sensor-1` (every resource of it). `*` in the core's globs spans
//!   `/`, so a `+` widens to any run of levels (`ep/s/+/0/5700` also allows
//!   `s/3303/1/0/5700`). `*` is refused in topics under `ep/` (it would be a glob).
//! - The result is `Some(patterns)`, deduplicated, possibly empty (the key then reaches
//!   no endpoint).
//!
//! # Routes (all declared with scope `authenticated`; paths without `/v1`/`/v2`)
//!
//! | Method | Path | Token scopes (any one) | Success |
//! | --- | --- | --- | --- |
//! | GET | `/applications/{APPLICATION_ID}/keys` | `applicationKeys.get`, `applicationKeys.*`, `all.*`, `all.*.read` | 200 Application Keys |
//! | POST | `/applications/{APPLICATION_ID}/keys` | `applicationKeys.post`, `applicationKeys.*`, `all.*` | 201 key + `secret` |
//! | GET | `/applications/{APPLICATION_ID}/keys/{APPLICATION_KEY_ID}` | `applicationKey.get`, `applicationKey.*`, `all.*`, `all.*.read` | 200 key |
//! | PATCH | `/applications/{APPLICATION_ID}/keys/{APPLICATION_KEY_ID}` | `applicationKey.patch`, `applicationKey.*`, `all.*` | 200 key |
//! | DELETE | `/applications/{APPLICATION_ID}/keys/{APPLICATION_KEY_ID}` | `applicationKey.delete`, `applicationKey.*`, `all.*` | 200 `{"success": true}` |
//!
//! (`all.*` is any of `all.Application`, `all.Organization`, `all.User`; `all.*.read` their
//! `.read` forms.)
//!
//! Every error body is the seed's Error schema, `{"type": …, "message": …}`, checked in
//! this order (the routes declare [`error_types`], so the daemon's own 401, 403, 503, 400,
//! 408 and 413 on them are spelled the same way: `Unauthorized`, `Forbidden`, …):
//! 1. 401 `Unauthorized`: the request's `Authorization` is not a Bearer token of this
//!    plugin matching the principal (e.g. a caller authenticated by another backend, or
//!    with an application key). Carries `www-authenticate: Bearer`.
//! 2. 403 `Forbidden`: the token has none of the route's scopes.
//! 3. 404 `NotFound` `"Application was not found"`: no such application, or not the
//!    token's application (other applications' existence is not revealed).
//! 4. 404 `NotFound` `"Application key was not found"` (single-key routes; also a key of
//!    another application).
//! 5. 415 `UnsupportedMediaType`: a POST or PATCH whose `Content-Type` is present and not
//!    JSON (`application/json` or a `+json` type; an absent one is taken as JSON).
//! 6. 400 `Validation`: a bad query parameter or body (also JSON that is not an object).
//! 7. 500 `ServerError`: the state could not be written (nothing changed).
//!
//! ## `GET …/keys` parameters
//!
//! `sortField` (key, status, id, creationDate, lastUpdated; default creationDate),
//! `sortDirection` (asc, desc, also ASC/DESC; default desc; ties broken by id in the same
//! direction), `page` (0 to 2³²−1; default 0), `perPage` (1 to 1000; default 100),
//! `filterField` (key, status) with `filter` (glob: `*` any run, `?` one character,
//! case-insensitive, whole value; filtering only when both are given), and `query`
//! (advanced JSON; when given it replaces filterField/filter, which are still validated
//! and echoed). A blank value counts as not given; a known parameter given twice is a
//! 400; unknown parameters (e.g. `_links`) are ignored. The answer:
//! `{items, count, totalCount, perPage, page, sortField, sortDirection, applicationId}` plus
//! `filterField` and `filter` when given.
//!
//! ## Advanced query
//!
//! An object whose entries all must hold. `$and`, `$or`, `$nor`: arrays of at most 100
//! queries (`$and: []` and `$or: []` match everything, `$nor: []` nothing; at most 16
//! levels deep). Fields: `id`, `deviceIds` (24-hex ids or null; exactly one of `$eq $ne
//! $gt $lt $gte $lte $in $nin`); `key`, `status`, `description`, `filterType`,
//! `pubTopics`, `subTopics` (any scalar; `$eq $ne $gt $lt $gte $lte $in $nin $like`, several
//! in one object all hold); `creationDate`, `lastUpdated` (numbers are epoch milliseconds,
//! strings ISO 8601; no `$like`); `deviceTags` (`{"$tagKey": …, "$tagValue": …}` or
//! `{"<tag key>": …}`, each a string, null, `{"$in": […]}` or `{"$nin": […]}`, optionally
//! wrapped in `$eq`/`$ne`). A bare scalar means `$eq`. `$like` is the `filter` glob.
//! Comparisons are by type (a string never equals a number; strings compare by bytes);
//! on list fields an operator holds when it holds for some element (`$ne`/`$nin`: for
//! none), and `null` matches an absent description or an empty list.
//!
//! ## Key bodies
//!
//! POST takes the seed's Application Key Post: `description` (≤ 32767 characters),
//! `deviceIds` (≤ 1000 ids of 24 hex, stored lower-case), `deviceTags` (≤ 100 of
//! `{"key": [0-9a-zA-Z_-]{1,255}, "value"?: 1–255 characters}`; an `endpoint` tag's value
//! may not contain `/`), `filterType` (all, whitelist, blacklist, none; default all),
//! `pubTopics`/`subTopics` (MQTT topic filters of 1–1024 characters; default `[]`). Any
//! other field (`status`, `key`, `secret`, …) is a 400. New keys are `active`. PATCH takes
//! the same fields plus `status` (active, inactive); the key and secret never change.
//!
//! # State (through the host, written before answering)
//!
//! `app/<id>` → `{id, name, domain, creationDate}`; `token/<id>` → `{id, applicationId,
//! scopes, tokenHash, creationDate}`; `key/<id>` → [`model::KeyRecord`] (with
//! `secretHash`). Loaded in `create`; unreadable records are skipped with a warning.
//! Timestamps are epoch milliseconds, strictly increasing across the records one
//! instance writes (so creation order is also creationDate order).

use std::collections::{BTreeMap, HashMap};

use crate::time::now_ms;
use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use connectord_plugin_sdk::auth::{
    AuthRequest, AuthVerdict, BootstrapRequest, BootstrapResponse, KeyState, KeyStatusRequest,
    KeyStatusResponse, NON_ADMIN_SCOPES, PrincipalSpec, Restriction,
};
use connectord_plugin_sdk::http::{
    AUTHENTICATED, ErrorTypes, HttpRequest, HttpResponse, RoutesResponse, refuse_non_json,
};
use connectord_plugin_sdk::secret::{random_alphanumeric, sha256_hex};
use connectord_plugin_sdk::{AuthPlugin, Host, Plugin, RoutesPlugin, declare_plugin};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub mod model;
pub mod query;
pub mod time;

use model::{FilterType, KeyRecord, PATCH_FIELDS, POST_FIELDS, Status, allow_patterns, parse_body};
use query::parse_list_params;

/// The plugin name the configuration uses.
pub const NAME: &str = "losant";

/// Operation: create an application.
pub const OP_CREATE_APPLICATION: &str = "create_application";
/// Operation: create an API access token.
pub const OP_CREATE_TOKEN: &str = "create_token";
/// Operation: delete an API access token (it stops authenticating at once).
pub const OP_DELETE_TOKEN: &str = "delete_token";
/// Operation: delete an application with its tokens and keys.
pub const OP_DELETE_APPLICATION: &str = "delete_application";

const APP_PREFIX: &str = "app/";
const TOKEN_PREFIX: &str = "token/";
const KEY_PREFIX: &str = "key/";

/// Length of an API access token.
const TOKEN_LEN: usize = 64;
/// Longest application name or domain, in characters.
const MAX_NAME: usize = 255;

/// The Losant scopes a token may carry.
pub const TOKEN_SCOPES: &[&str] = &[
    "all.Application",
    "all.Application.read",
    "all.Organization",
    "all.Organization.read",
    "all.User",
    "all.User.read",
    "applicationKeys.*",
    "applicationKeys.get",
    "applicationKeys.post",
    "applicationKey.*",
    "applicationKey.get",
    "applicationKey.patch",
    "applicationKey.delete",
];

/// The core scopes of every application key principal: the first six of
/// [`NON_ADMIN_SCOPES`], every data scope but `limits:read` (never `keys:write`,
/// `metrics:read` or `admin`).
pub const KEY_SCOPES: &[&str] = NON_ADMIN_SCOPES.split_at(6).0;

const KEYS_ROUTE: &str = "/applications/{APPLICATION_ID}/keys";
const KEY_ROUTE: &str = "/applications/{APPLICATION_ID}/keys/{APPLICATION_KEY_ID}";

const APP_NOT_FOUND: &str = "Application was not found";
const KEY_NOT_FOUND: &str = "Application key was not found";

/// No option yet: `{}` only.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AppRecord {
    id: String,
    name: String,
    domain: String,
    creation_date: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenRecord {
    id: String,
    application_id: String,
    scopes: Vec<String>,
    /// SHA-256 of the token, lower-case hex.
    token_hash: String,
    creation_date: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateApplication {
    name: String,
    domain: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    application_id: String,
    scopes: Vec<String>,
}

/// [`OP_DELETE_TOKEN`] and [`OP_DELETE_APPLICATION`]: the object's id.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteById {
    id: String,
}

/// What a request on one of the routes asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    List,
    Create,
    Get,
    Patch,
    Delete,
}

impl Action {
    /// The resource and verb of this route's own scopes (`applicationKeys.get` for the list).
    fn resource_verb(self) -> (&'static str, &'static str) {
        match self {
            Action::List => ("applicationKeys", "get"),
            Action::Create => ("applicationKeys", "post"),
            Action::Get => ("applicationKey", "get"),
            Action::Patch => ("applicationKey", "patch"),
            Action::Delete => ("applicationKey", "delete"),
        }
    }

    /// Whether a token with `scope` may take this action (the seed's rule): its resource's
    /// scope for the verb or `*`; or an `all.` scope, its `.read` form only for the GETs.
    fn opened_by(self, scope: &str) -> bool {
        let (resource, verb) = self.resource_verb();
        match scope.strip_prefix("all.") {
            Some(level) => !level.ends_with(".read") || verb == "get",
            None => scope
                .split_once('.')
                .is_some_and(|(r, v)| r == resource && (v == "*" || v == verb)),
        }
    }

    /// The token scopes that open this route, in [`TOKEN_SCOPES`] order (as a 403 lists
    /// them).
    fn scopes(self) -> Vec<&'static str> {
        TOKEN_SCOPES
            .iter()
            .copied()
            .filter(|s| self.opened_by(s))
            .collect()
    }
}

/// The plugin instance.
pub struct Losant {
    host: Host,
    apps: BTreeMap<String, AppRecord>,
    /// Token id → record.
    tokens: BTreeMap<String, TokenRecord>,
    /// Token digest → token id.
    token_by_hash: HashMap<String, String>,
    /// Key id → record.
    keys: BTreeMap<String, KeyRecord>,
    /// Key (the public half) → key id.
    key_by_key: HashMap<String, String>,
    /// The last timestamp handed out (see [`Losant::tick`]).
    last_ms: u64,
}

// Errors follow the seed's Error schema, `{"type": …, "message": …}`: what
// `HttpResponse::error` writes.

fn validation(message: &str) -> HttpResponse {
    HttpResponse::error(400, "Validation", message)
}

fn unauthorized(message: &str) -> HttpResponse {
    let mut r = HttpResponse::error(401, "Unauthorized", message);
    r.headers
        .insert("www-authenticate".to_string(), "Bearer".to_string());
    r
}

fn not_found(message: &str) -> HttpResponse {
    HttpResponse::error(404, "NotFound", message)
}

/// The host's own errors on these routes, spelled as the seed's (`Unauthorized`, …), so
/// that a 401 reads the same whether the daemon or the plugin refuses the credential.
pub fn error_types() -> ErrorTypes {
    ErrorTypes {
        bad_request: "Validation".into(),
        unauthorized: "Unauthorized".into(),
        forbidden: "Forbidden".into(),
        request_timeout: "RequestTimeout".into(),
        payload_too_large: "PayloadTooLarge".into(),
        unavailable: "ServiceUnavailable".into(),
        too_many_requests: "TooManyRequests".into(),
    }
}

/// 415 for a POST or PATCH body sent as something other than JSON (an absent
/// `Content-Type` is taken as JSON).
fn check_media_type(req: &HttpRequest) -> Result<(), HttpResponse> {
    refuse_non_json(req.headers.get("content-type").map(String::as_str))
        .map_err(|m| HttpResponse::error(415, "UnsupportedMediaType", &m))
}

/// The scheme and the credentials of an `Authorization` header (scheme lower-cased).
fn authorization(headers: &BTreeMap<String, String>) -> Option<(String, &str)> {
    let value = headers.get("authorization")?.trim();
    let (scheme, cred) = value.split_once(|c: char| c.is_ascii_whitespace())?;
    let cred = cred.trim();
    (!cred.is_empty()).then(|| (scheme.to_ascii_lowercase(), cred))
}

/// `key:secret` of Basic credentials, when they decode.
fn basic_credentials(cred: &str) -> Option<(String, String)> {
    let engine = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let bytes = engine.decode(cred).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (key, secret) = text.split_once(':')?;
    Some((key.to_string(), secret.to_string()))
}

/// 24 lower-case hex: 8 of the creation seconds, 16 random (a MongoDB-style ObjectId).
fn object_id(now_ms: u64) -> String {
    let secs = u32::try_from(now_ms / 1000).unwrap_or(u32::MAX);
    format!("{secs:08x}{}", hex::encode(rand::random::<[u8; 8]>()))
}

/// The first value `draw` makes that is not `taken`.
fn draw_unused<T>(mut draw: impl FnMut() -> T, taken: impl Fn(&T) -> bool) -> T {
    loop {
        let v = draw();
        if !taken(&v) {
            return v;
        }
    }
}

fn check_name(what: &str, s: &str) -> Result<(), String> {
    let n = s.chars().count();
    if n == 0 || n > MAX_NAME || s.trim().is_empty() {
        return Err(format!("{what} must be 1 to {MAX_NAME} characters long"));
    }
    connectord_plugin_sdk::names::refuse_control_chars(what, s)
}

impl Losant {
    /// Reads every record of one kind: `prefix<id>` → `T`, whose id must equal `<id>`.
    fn load_records<T: for<'de> Deserialize<'de>>(
        host: &Host,
        prefix: &str,
        id_of: impl Fn(&T) -> &str,
    ) -> Result<Vec<T>, String> {
        let mut out = Vec::new();
        for (id, rec) in host.load_json_records::<T>(prefix)? {
            if id_of(&rec) == id && model::is_object_id(&id) {
                out.push(rec);
            } else {
                host.warn(&format!(
                    "{NAME}: skipping record {prefix}{id}: its id does not match its name"
                ));
            }
        }
        Ok(out)
    }

    fn load(host: Host) -> Result<Losant, String> {
        let mut p = Losant {
            host,
            apps: BTreeMap::new(),
            tokens: BTreeMap::new(),
            token_by_hash: HashMap::new(),
            keys: BTreeMap::new(),
            key_by_key: HashMap::new(),
            last_ms: 0,
        };
        for app in Self::load_records::<AppRecord>(&p.host, APP_PREFIX, |a| &a.id)? {
            p.last_ms = p.last_ms.max(app.creation_date);
            p.apps.insert(app.id.clone(), app);
        }
        for tok in Self::load_records::<TokenRecord>(&p.host, TOKEN_PREFIX, |t| &t.id)? {
            if p.knows_app("token", &tok.id, &tok.application_id) {
                p.last_ms = p.last_ms.max(tok.creation_date);
                p.remember_token(tok);
            }
        }
        for key in Self::load_records::<KeyRecord>(&p.host, KEY_PREFIX, |k| &k.id)? {
            if !p.knows_app("application key", &key.id, &key.application_id) {
                continue;
            }
            if p.key_by_key.contains_key(&key.key) {
                p.host.warn(&format!(
                    "{NAME}: skipping application key {}: its key is already used",
                    key.id
                ));
                continue;
            }
            p.last_ms = p.last_ms.max(key.creation_date).max(key.last_updated);
            p.remember_key(key);
        }
        Ok(p)
    }

    /// Whether `app_id` names a known application; when not, warns that the `what` `id`
    /// (a record being loaded) is skipped.
    fn knows_app(&self, what: &str, id: &str, app_id: &str) -> bool {
        let known = self.apps.contains_key(app_id);
        if !known {
            self.host.warn(&format!(
                "{NAME}: skipping {what} {id}: its application {app_id} is unknown"
            ));
        }
        known
    }

    /// Puts a stored token in memory, indexed by its digest.
    fn remember_token(&mut self, rec: TokenRecord) {
        self.token_by_hash
            .insert(rec.token_hash.clone(), rec.id.clone());
        self.tokens.insert(rec.id.clone(), rec);
    }

    /// Puts a stored application key in memory, indexed by its key.
    fn remember_key(&mut self, rec: KeyRecord) {
        self.key_by_key.insert(rec.key.clone(), rec.id.clone());
        self.keys.insert(rec.id.clone(), rec);
    }

    /// Now in epoch milliseconds, but always after the previous timestamp handed out.
    fn tick(&mut self) -> u64 {
        self.last_ms = now_ms().max(self.last_ms.saturating_add(1));
        self.last_ms
    }

    /// A fresh id, unused by any record.
    fn fresh_id(&self, now: u64) -> String {
        draw_unused(
            || object_id(now),
            |id| {
                self.apps.contains_key(id)
                    || self.tokens.contains_key(id)
                    || self.keys.contains_key(id)
            },
        )
    }

    fn put<T: Serialize>(&self, state_key: &str, rec: &T) -> Result<(), String> {
        let bytes = serde_json::to_vec(rec).map_err(|e| e.to_string())?;
        self.host.state_put(state_key, &bytes)
    }

    fn create_application(&mut self, req: CreateApplication) -> Result<Value, String> {
        check_name("name", &req.name)?;
        check_name("domain", &req.domain)?;
        let now = self.tick();
        let app = AppRecord {
            id: self.fresh_id(now),
            name: req.name,
            domain: req.domain,
            creation_date: now,
        };
        self.put(&format!("{APP_PREFIX}{}", app.id), &app)?;
        self.host.info(&format!(
            "{NAME}: created application {} ({:?}) in domain {:?}",
            app.id, app.name, app.domain
        ));
        let answer = json!({"id": app.id});
        self.apps.insert(app.id.clone(), app);
        Ok(answer)
    }

    fn create_token(&mut self, req: CreateToken) -> Result<Value, String> {
        if !self.apps.contains_key(&req.application_id) {
            return Err(format!("unknown application {:?}", req.application_id));
        }
        if req.scopes.is_empty() {
            return Err("a token needs at least one scope".into());
        }
        let mut scopes: Vec<String> = Vec::new();
        for s in req.scopes {
            if !TOKEN_SCOPES.contains(&s.as_str()) {
                return Err(format!(
                    "unknown scope {s:?} (scopes: {})",
                    TOKEN_SCOPES.join(", ")
                ));
            }
            if !scopes.contains(&s) {
                scopes.push(s);
            }
        }
        let (token, token_hash) = draw_unused(
            || {
                let token = random_alphanumeric(TOKEN_LEN);
                let hash = sha256_hex(&token);
                (token, hash)
            },
            |(_, hash)| self.token_by_hash.contains_key(hash),
        );
        let now = self.tick();
        let rec = TokenRecord {
            id: self.fresh_id(now),
            application_id: req.application_id,
            scopes,
            token_hash,
            creation_date: now,
        };
        self.put(&format!("{TOKEN_PREFIX}{}", rec.id), &rec)?;
        self.host.info(&format!(
            "{NAME}: created API token {} for application {} with scopes {}",
            rec.id,
            rec.application_id,
            rec.scopes.join(" ")
        ));
        let answer = json!({"id": rec.id, "token": token});
        self.remember_token(rec);
        Ok(answer)
    }

    /// Deletes a token: it authenticates no more (`unknown` to `key_status`, so the host
    /// drops its notification channel at its next sweep). Before, a token could not be
    /// revoked at all short of editing the state database.
    fn delete_token(&mut self, req: DeleteById) -> Result<Value, String> {
        if !self.tokens.contains_key(&req.id) {
            return Err(format!("unknown API token {:?}", req.id));
        }
        self.forget_token(&req.id)?;
        self.host
            .info(&format!("{NAME}: deleted API token {}", req.id));
        Ok(json!({"deleted": req.id}))
    }

    /// Deletes token `id`'s record, then forgets it (and its digest).
    fn forget_token(&mut self, id: &str) -> Result<(), String> {
        self.host.state_delete(&format!("{TOKEN_PREFIX}{id}"))?;
        if let Some(t) = self.tokens.remove(id) {
            self.token_by_hash.remove(&t.token_hash);
        }
        Ok(())
    }

    /// Deletes application key `id`'s record, then forgets it; the key it was, if any.
    fn forget_key(&mut self, id: &str) -> Result<Option<KeyRecord>, String> {
        self.host.state_delete(&format!("{KEY_PREFIX}{id}"))?;
        let rec = self.keys.remove(id);
        if let Some(rec) = &rec {
            self.key_by_key.remove(&rec.key);
        }
        Ok(rec)
    }

    /// Deletes an application with its API tokens and application keys: none of them
    /// authenticates any more (`unknown` to `key_status`, so the host drops their
    /// notification channels at its next sweep). Deleted with it rather than kept: a load
    /// skips the records of an unknown application (with a warning at every load).
    fn delete_application(&mut self, req: DeleteById) -> Result<Value, String> {
        if !self.apps.contains_key(&req.id) {
            return Err(format!("unknown application {:?}", req.id));
        }
        let tokens: Vec<String> = self
            .tokens
            .values()
            .filter(|t| t.application_id == req.id)
            .map(|t| t.id.clone())
            .collect();
        let keys: Vec<String> = self
            .keys
            .values()
            .filter(|k| k.application_id == req.id)
            .map(|k| k.id.clone())
            .collect();
        // The application last: a failure on the way leaves it, and the call can be
        // made again.
        for id in &tokens {
            self.forget_token(id)?;
        }
        for id in &keys {
            self.forget_key(id)?;
        }
        self.host.state_delete(&format!("{APP_PREFIX}{}", req.id))?;
        self.apps.remove(&req.id);
        self.host.info(&format!(
            "{NAME}: deleted application {} with its {} API tokens and {} application keys",
            req.id,
            tokens.len(),
            keys.len()
        ));
        Ok(json!({"deleted": req.id, "tokens": tokens.len(), "keys": keys.len()}))
    }

    fn token_by_secret(&self, token: &str) -> Option<&TokenRecord> {
        // Looked up by digest, never by the token itself (see auth-connector on why this
        // is as good as a constant-time comparison).
        let id = self.token_by_hash.get(&sha256_hex(token))?;
        self.tokens.get(id)
    }

    fn authenticate(&self, req: &AuthRequest) -> AuthVerdict {
        let Some((scheme, cred)) = authorization(&req.headers) else {
            return AuthVerdict::NotMine;
        };
        match scheme.as_str() {
            "bearer" => self.authenticate_token(cred),
            "basic" => self.authenticate_key(cred),
            _ => AuthVerdict::NotMine,
        }
    }

    fn authenticate_token(&self, token: &str) -> AuthVerdict {
        let Some(rec) = self.token_by_secret(token) else {
            return AuthVerdict::NotMine;
        };
        let Some(app) = self.apps.get(&rec.application_id) else {
            return AuthVerdict::Refused {
                reason: "the token's application no longer exists".into(),
            };
        };
        AuthVerdict::Accepted {
            principal: PrincipalSpec {
                key_id: format!("token:{}", rec.id),
                domain: app.domain.clone(),
                scopes: Vec::new(),
                allow: Some(Vec::new()),
                creator: None,
            },
            cache: None,
        }
    }

    fn authenticate_key(&self, cred: &str) -> AuthVerdict {
        let Some((key, secret)) = basic_credentials(cred) else {
            return AuthVerdict::NotMine;
        };
        let Some(rec) = self.key_by_key.get(&key).and_then(|id| self.keys.get(id)) else {
            return AuthVerdict::NotMine;
        };
        let given = Sha256::digest(secret.as_bytes());
        let stored = hex::decode(&rec.secret_hash).unwrap_or_default();
        if !bool::from(given.as_slice().ct_eq(&stored)) {
            return AuthVerdict::Refused {
                reason: "invalid application key secret".into(),
            };
        }
        if rec.status != Status::Active {
            return AuthVerdict::Refused {
                reason: "this application key is inactive".into(),
            };
        }
        let Some(app) = self.apps.get(&rec.application_id) else {
            return AuthVerdict::Refused {
                reason: "the application key's application no longer exists".into(),
            };
        };
        match allow_patterns(rec) {
            Ok(allow) => AuthVerdict::Accepted {
                principal: PrincipalSpec {
                    key_id: format!("appkey:{}", rec.id),
                    domain: app.domain.clone(),
                    scopes: KEY_SCOPES.iter().map(|s| s.to_string()).collect(),
                    allow,
                    creator: None,
                },
                cache: None,
            },
            Err(reason) => AuthVerdict::Refused { reason },
        }
    }

    /// `OP_KEY_STATUS` for the key ids `OP_AUTHENTICATE` gives: `token:<id>` is active
    /// while the token and its application exist; `appkey:<id>` while the key is active,
    /// its application exists and its filter is usable. A record that exists but would be
    /// refused is revoked; anything else is unknown. An active key's answer carries its
    /// restriction now (`restriction`), so that the host narrows the channel of a key
    /// whose filter was changed through the routes.
    fn key_status(&self, key_id: &str) -> KeyStatusResponse {
        // What authentication would give as `allow`, for an active key.
        let (status, allow) = if let Some(id) = key_id.strip_prefix("token:") {
            match self.tokens.get(id) {
                None => (KeyState::Unknown, None),
                Some(t) if self.apps.contains_key(&t.application_id) => {
                    (KeyState::Active, Some(Some(Vec::new())))
                }
                Some(_) => (KeyState::Revoked, None),
            }
        } else if let Some(id) = key_id.strip_prefix("appkey:") {
            match self.keys.get(id) {
                None => (KeyState::Unknown, None),
                Some(k)
                    if k.status == Status::Active && self.apps.contains_key(&k.application_id) =>
                {
                    match allow_patterns(k) {
                        Ok(allow) => (KeyState::Active, Some(allow)),
                        Err(_) => (KeyState::Revoked, None),
                    }
                }
                Some(_) => (KeyState::Revoked, None),
            }
        } else {
            (KeyState::Unknown, None)
        };
        KeyStatusResponse {
            status,
            creator: None,
            restriction: allow.map(|allow| Restriction { allow }),
        }
    }

    /// The token a route request carries, checked against the principal.
    fn request_token(&self, req: &HttpRequest) -> Result<&TokenRecord, HttpResponse> {
        let refuse =
            || unauthorized("A valid API access token is required (Authorization: Bearer <token>)");
        let Some((scheme, cred)) = authorization(&req.headers) else {
            return Err(refuse());
        };
        if scheme != "bearer" {
            return Err(refuse());
        }
        let rec = self.token_by_secret(cred).ok_or_else(refuse)?;
        if req.principal.key_id != format!("token:{}", rec.id) {
            return Err(refuse());
        }
        Ok(rec)
    }

    fn http(&mut self, req: HttpRequest) -> HttpResponse {
        let segments: Vec<&str> = req.path.split('/').filter(|s| !s.is_empty()).collect();
        let (app_id, key_id) = match segments.as_slice() {
            ["applications", app, "keys"] => (app.to_string(), None),
            ["applications", app, "keys", key] => (app.to_string(), Some(key.to_string())),
            _ => return not_found("Route was not found"),
        };
        let method = req.method.to_ascii_uppercase();
        let action = match (method.as_str(), key_id.is_some()) {
            ("GET", false) => Action::List,
            ("POST", false) => Action::Create,
            ("GET", true) => Action::Get,
            ("PATCH", true) => Action::Patch,
            ("DELETE", true) => Action::Delete,
            _ => return not_found("Route was not found"),
        };
        let token = match self.request_token(&req) {
            Ok(t) => t,
            Err(resp) => return resp,
        };
        let scopes = action.scopes();
        if !token.scopes.iter().any(|s| scopes.contains(&s.as_str())) {
            return HttpResponse::error(
                403,
                "Forbidden",
                &format!(
                    "The API access token needs one of the scopes: {}",
                    scopes.join(", ")
                ),
            );
        }
        if token.application_id != app_id || !self.apps.contains_key(&app_id) {
            return not_found(APP_NOT_FOUND);
        }
        let key_id = match key_id {
            None => None,
            Some(k) => match self.keys.get(&k) {
                Some(rec) if rec.application_id == app_id => Some(k),
                _ => return not_found(KEY_NOT_FOUND),
            },
        };
        if matches!(action, Action::Create | Action::Patch)
            && let Err(resp) = check_media_type(&req)
        {
            return resp;
        }
        match (action, key_id) {
            (Action::List, _) => self.list(&app_id, req.query.as_deref()),
            (Action::Create, _) => self.create_key(&app_id, &req.body),
            (Action::Get, Some(k)) => HttpResponse::json(200, &self.keys[&k].to_json()),
            (Action::Patch, Some(k)) => self.patch_key(&k, &req.body),
            (Action::Delete, Some(k)) => self.delete_key(&k),
            _ => not_found("Route was not found"),
        }
    }

    fn list(&self, app_id: &str, raw_query: Option<&str>) -> HttpResponse {
        let params = match parse_list_params(raw_query) {
            Ok(p) => p,
            Err(why) => return validation(&why),
        };
        let mut items: Vec<&KeyRecord> = self
            .keys
            .values()
            .filter(|k| k.application_id == app_id && params.matches(k))
            .collect();
        params.sort(&mut items);
        let page: Vec<Value> = params.page_of(&items).iter().map(|k| k.to_json()).collect();
        let mut body = json!({
            "items": page,
            "count": page.len(),
            "totalCount": items.len(),
            "perPage": params.per_page,
            "page": params.page,
            "sortField": params.sort_field.as_str(),
            "sortDirection": params.sort_direction(),
            "applicationId": app_id,
        });
        if let Some(f) = &params.filter_field {
            body["filterField"] = json!(f);
        }
        if let Some(f) = &params.filter {
            body["filter"] = json!(f);
        }
        HttpResponse::json(200, &body)
    }

    fn store_failed(&self, what: &str, e: &str) -> HttpResponse {
        self.host
            .warn(&format!("{NAME}: could not store {what}: {e}"));
        HttpResponse::error(500, "ServerError", &format!("could not store {what}"))
    }

    fn create_key(&mut self, app_id: &str, body: &str) -> HttpResponse {
        let fields = match parse_body(body, POST_FIELDS) {
            Ok(f) => f,
            Err(why) => return validation(&why),
        };
        let key = draw_unused(
            || {
                uuid::Builder::from_random_bytes(rand::random())
                    .into_uuid()
                    .to_string()
            },
            |k| self.key_by_key.contains_key(k),
        );
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let now = self.tick();
        let mut rec = KeyRecord {
            id: self.fresh_id(now),
            application_id: app_id.to_string(),
            key,
            secret_hash: sha256_hex(&secret),
            status: Status::Active,
            description: None,
            device_ids: Vec::new(),
            device_tags: Vec::new(),
            filter_type: FilterType::All,
            pub_topics: Vec::new(),
            sub_topics: Vec::new(),
            creation_date: now,
            last_updated: now,
        };
        rec.apply(fields);
        if let Err(e) = self.put(&format!("{KEY_PREFIX}{}", rec.id), &rec) {
            return self.store_failed("the new application key", &e);
        }
        self.host.info(&format!(
            "{NAME}: created application key {} (key {}) in application {}",
            rec.id, rec.key, rec.application_id
        ));
        let mut answer = rec.to_json();
        answer["secret"] = json!(secret);
        self.remember_key(rec);
        HttpResponse::json(201, &answer)
    }

    fn patch_key(&mut self, id: &str, body: &str) -> HttpResponse {
        let fields = match parse_body(body, PATCH_FIELDS) {
            Ok(f) => f,
            Err(why) => return validation(&why),
        };
        let mut rec = self.keys[id].clone();
        rec.apply(fields);
        rec.last_updated = self.tick();
        if let Err(e) = self.put(&format!("{KEY_PREFIX}{id}"), &rec) {
            return self.store_failed("the application key", &e);
        }
        let answer = rec.to_json();
        self.keys.insert(id.to_string(), rec);
        HttpResponse::json(200, &answer)
    }

    fn delete_key(&mut self, id: &str) -> HttpResponse {
        let removed = match self.forget_key(id) {
            Ok(rec) => rec,
            Err(e) => return self.store_failed("the deletion of the application key", &e),
        };
        if let Some(rec) = removed {
            self.host.info(&format!(
                "{NAME}: deleted application key {id} of application {}",
                rec.application_id
            ));
        }
        HttpResponse::json(200, &json!({"success": true}))
    }
}

impl Plugin for Losant {
    const NAME: &'static str = NAME;

    fn create(config: serde_json::Value, host: Host) -> Result<Self, String> {
        if !config.is_object() {
            return Err(format!("{NAME}: invalid configuration: expected a table"));
        }
        let Config {} = connectord_plugin_sdk::settings(config)
            .map_err(|e| format!("{NAME}: invalid configuration: {e}"))?;
        let p = Self::load(host)?;
        p.host.info(&format!(
            "{NAME}: {} applications, {} API tokens, {} application keys loaded",
            p.apps.len(),
            p.tokens.len(),
            p.keys.len()
        ));
        Ok(p)
    }
}

// The typed operations: the inherent methods of the same names (which take precedence in
// `Type::method` paths) do the work.
impl AuthPlugin for Losant {
    fn authenticate(&mut self, req: AuthRequest) -> Result<AuthVerdict, String> {
        Ok(Losant::authenticate(self, &req))
    }

    fn bootstrap(&mut self, _req: BootstrapRequest) -> Result<BootstrapResponse, String> {
        Ok(BootstrapResponse { created: None })
    }

    fn key_status(&mut self, req: KeyStatusRequest) -> Result<KeyStatusResponse, String> {
        Ok(Losant::key_status(self, &req.key_id))
    }
}

impl RoutesPlugin for Losant {
    fn routes(&mut self) -> Result<RoutesResponse, String> {
        let mut answer = RoutesResponse::with_scope(
            AUTHENTICATED,
            &[
                ("GET", KEYS_ROUTE),
                ("POST", KEYS_ROUTE),
                ("GET", KEY_ROUTE),
                ("PATCH", KEY_ROUTE),
                ("DELETE", KEY_ROUTE),
            ],
        );
        for route in &mut answer.routes {
            route.errors = Some(error_types());
        }
        Ok(answer)
    }

    fn http(&mut self, req: HttpRequest) -> Result<HttpResponse, String> {
        Ok(Losant::http(self, req))
    }
}

impl Losant {
    /// [`OP_CREATE_APPLICATION`]; its errors name the operation.
    fn create_application_op(&mut self, req: CreateApplication) -> Result<Value, String> {
        self.create_application(req)
            .map_err(|e| format!("{OP_CREATE_APPLICATION}: {e}"))
    }

    /// [`OP_CREATE_TOKEN`]; its errors name the operation.
    fn create_token_op(&mut self, req: CreateToken) -> Result<Value, String> {
        self.create_token(req)
            .map_err(|e| format!("{OP_CREATE_TOKEN}: {e}"))
    }

    /// [`OP_DELETE_TOKEN`]; its errors name the operation.
    fn delete_token_op(&mut self, req: DeleteById) -> Result<Value, String> {
        self.delete_token(req)
            .map_err(|e| format!("{OP_DELETE_TOKEN}: {e}"))
    }

    /// [`OP_DELETE_APPLICATION`]; its errors name the operation.
    fn delete_application_op(&mut self, req: DeleteById) -> Result<Value, String> {
        self.delete_application(req)
            .map_err(|e| format!("{OP_DELETE_APPLICATION}: {e}"))
    }
}

declare_plugin!(Losant: auth + routes, operations {
    OP_CREATE_APPLICATION => Losant::create_application_op,
    OP_CREATE_TOKEN => Losant::create_token_op,
    OP_DELETE_TOKEN => Losant::delete_token_op,
    OP_DELETE_APPLICATION => Losant::delete_application_op,
});

#[cfg(test)]
mod tests;
