//! The Connector access-key auth backend (plugin `connector`, kind [`Kind::Auth`]).
//!
//! Callers present an mbed Device Connector style access key as
//! `Authorization: Bearer <key>`. Keys are 100 random alphanumeric characters from a
//! CSPRNG; the plugin keeps only their SHA-256 digest (lower-case hex), durably in the
//! host's state under `key/<digest>` as JSON `{id, name, domain, scopes, created_ms,
//! allow?, creator?}`, and in memory as a map digest → record. The secret itself is never
//! stored and is shown exactly once, in the answer that creates it.
//!
//! Operations:
//! - `OP_BOOTSTRAP`: when there is no key at all, creates a first key named `admin`
//!   with scope `admin` in the requested domain and returns it.
//! - `OP_AUTHENTICATE`: a known bearer key is accepted as its record's principal (its
//!   `allow` and `creator` included); any other request (no header, another scheme, an
//!   empty or unknown key) is [`AuthVerdict::NotMine`], so that another backend may claim
//!   it (the host answers 401 when none does).
//! - `OP_KEY_STATUS`: a key that exists is `active` (with its creator), any other id
//!   `unknown`: keys are deleted, never kept revoked.
//! - `OP_ROUTES` / `OP_HTTP`, every route with scope [`KEYS_WRITE`] (which `admin`
//!   implies):
//!   - `POST /api/api_tokens` creates a key in the caller's domain. The optional JSON body
//!     `{"name"?, "scopes"?, "allow"?, "domain"?}` names it (a random 10-character name
//!     otherwise) and narrows it; `grant` refuses (403, naming them) scopes the caller
//!     does not hold, `allow` patterns outside the caller's own, another domain. Without
//!     `scopes` the key gets the data scopes the caller holds (an admin's: all seven, as
//!     the Connector API did before `keys:write` existed). The key records the caller as
//!     its creator (`HttpRequest::backend` and the principal's key id) and authenticates
//!     only while the caller's key does: the host checks the chain of creators at every
//!     authentication it does not reuse. The answer is `201 {"access_key", "name", "id"}`.
//!     A name has 1 to 256 characters and no control characters; a body that is not a
//!     JSON object is 400 `bad_request`, a `Content-Type` that is present and not JSON
//!     (`application/json`, `+json`) 415 `unsupported_media_type` (an absent one is taken
//!     as JSON: the SDKs may send none).
//!   - `GET /api/api_tokens` lists the keys the caller may delete (below), oldest first:
//!     `[{"id", "name", "scopes", "allow"?, "created_by"?: {"backend", "key_id"},
//!     "created_at"}]`, never a secret.
//!   - `DELETE /api/api_tokens/{id}` deletes a key of the caller's domain (404 for any
//!     other) and every key of this plugin it minted, directly or not: 204. An admin
//!     deletes any key; another caller itself and the keys it minted (403 otherwise).
//!     Not the domain's last admin key (counting the admin keys it minted): 409
//!     `conflict`, naming what to do (an admin key of its own first, by `create_key`).
//!     Decision: there is no separate revoke; a deleted key is gone, and what it minted
//!     elsewhere is refused by the host since its creator is `unknown`.
//!
//! Configuration: none yet; `{}` is accepted and any field is refused by name.

use std::collections::{HashMap, HashSet};

use connectord_plugin_sdk::auth::{
    ADMIN, AuthRequest, AuthVerdict, BootstrapRequest, BootstrapResponse, DATA_SCOPES, KEYS_WRITE,
    KeyRef, KeyState, KeyStatusRequest, KeyStatusResponse, PrincipalSpec, SCOPES, VerdictCache,
    bearer_token,
};
use connectord_plugin_sdk::http::{
    HttpRequest, HttpResponse, RoutesResponse, json_object, refuse_non_json,
};
use connectord_plugin_sdk::names::refuse_control_chars;
use connectord_plugin_sdk::secret::{is_sha256_hex, random_alphanumeric, sha256_hex};
use connectord_plugin_sdk::{AuthPlugin, Host, Plugin, RoutesPlugin, declare_plugin};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::macros::format_description;

/// Now, in milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// `created_at` as shown: UTC with milliseconds, `2016-06-13T04:00:00.000Z` (empty for an
/// instant past the year 9999, which `now_ms` does not give).
fn format_ms(ms: u64) -> String {
    let shown =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_or_else(|_| String::new(), |t| t.format(shown).unwrap_or_default())
}

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
/// Most `allow` patterns a key may have, and the longest one, in characters.
const MAX_ALLOW_PATTERNS: usize = 64;
const MAX_ALLOW_CHARS: usize = 256;

/// The route that creates keys, and the one (with the key id appended) that deletes one.
/// Both need the core scope [`KEYS_WRITE`] (which [`ADMIN`] implies).
const TOKENS_PATH: &str = "/api/api_tokens";

/// The scopes a new key gets when the request names none: the data scopes the creator
/// holds (all of them for an admin), never `keys:write` or `admin`, which are granted
/// only when asked for.
const DEFAULT_SCOPES: &[&str] = &DATA_SCOPES;

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
    /// Restriction to some endpoints/resources (as `PrincipalSpec::allow`); records
    /// written before it existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    allow: Option<Vec<String>>,
    /// The key whose `POST /api/api_tokens` created this one (in any backend): this key
    /// authenticates only while that one is valid (the host checks). None for the
    /// bootstrap key and keys made by the `create_key` operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    creator: Option<KeyRef>,
}

/// The plugin instance.
pub struct ConnectorAuth {
    host: Host,
    /// SHA-256 (lower-case hex) of each key's secret → its record.
    keys: HashMap<String, KeyRecord>,
}

/// What a `POST /api/api_tokens` body asks for; `None`: not asked, the default applies.
#[derive(Debug, Default, PartialEq)]
struct KeyAsk {
    name: Option<String>,
    scopes: Option<Vec<String>>,
    allow: Option<Vec<String>>,
    domain: Option<String>,
}

/// Why a request is refused: (status, error type, message).
type Refusal = (u16, &'static str, String);

fn bad_request(why: String) -> Refusal {
    (400, "bad_request", why)
}

fn forbidden(why: String) -> Refusal {
    (403, "forbidden", why)
}

/// A list of strings of a body's field (`Ok(None)` when absent or null).
fn string_list(
    fields: &serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Result<Option<Vec<String>>, String> {
    match fields.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                serde_json::Value::String(s) => Ok(s.clone()),
                _ => Err(format!("{field} must be an array of strings")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(format!("{field} must be an array of strings")),
    }
}

/// Reads a `POST /api/api_tokens` body: `{"name"?, "scopes"?, "allow"?, "domain"?}`, all
/// optional (an empty body asks for nothing). Unknown fields are ignored. Checks the
/// form only (known scope names, pattern lengths); what the caller may grant is
/// [`ConnectorAuth::grant`]'s.
fn requested_key(body: &str) -> Result<KeyAsk, String> {
    let fields = json_object(body, Some(Default::default()))?;
    let name = match fields.get("name") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(name)) => {
            let chars = name.chars().count();
            if !(1..=MAX_NAME_CHARS).contains(&chars) {
                return Err(format!(
                    "name must be 1 to {MAX_NAME_CHARS} characters long (got {chars})"
                ));
            }
            refuse_control_chars("name", name)?;
            Some(name.clone())
        }
        Some(_) => return Err("name must be a string".to_string()),
    };
    let scopes = string_list(&fields, "scopes")?;
    if let Some(unknown) = scopes
        .iter()
        .flatten()
        .find(|s| !SCOPES.contains(&s.as_str()))
    {
        return Err(format!(
            "unknown scope {unknown:?} (known: {})",
            SCOPES.join(", ")
        ));
    }
    let allow = string_list(&fields, "allow")?;
    if let Some(patterns) = &allow {
        if patterns.is_empty() || patterns.len() > MAX_ALLOW_PATTERNS {
            return Err(format!(
                "allow must hold 1 to {MAX_ALLOW_PATTERNS} patterns (got {})",
                patterns.len()
            ));
        }
        for p in patterns {
            let chars = p.chars().count();
            if !(1..=MAX_ALLOW_CHARS).contains(&chars) {
                return Err(format!(
                    "an allow pattern must be 1 to {MAX_ALLOW_CHARS} characters long (got {chars})"
                ));
            }
            refuse_control_chars("allow", p)?;
        }
    }
    let domain = match fields.get("domain") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(d)) => Some(d.clone()),
        Some(_) => return Err("domain must be a string".to_string()),
    };
    Ok(KeyAsk {
        name,
        scopes,
        allow,
        domain,
    })
}

/// The scopes, restriction and domain a key created by `creator` gets for `ask`, or a
/// 403 naming what was asked beyond the creator's own: a scope it does not hold (`admin`
/// holds every scope), an `allow` pattern outside its own patterns (compared as text: a
/// restricted creator may grant any subset of its patterns, nothing else), another
/// domain.
fn grant(
    creator: &PrincipalSpec,
    ask: &KeyAsk,
) -> Result<(Vec<String>, Option<Vec<String>>), Refusal> {
    let is_admin = creator.scopes.iter().any(|s| s == ADMIN);
    let holds = |s: &str| is_admin || creator.scopes.iter().any(|c| c == s);
    if let Some(d) = ask.domain.as_ref().filter(|d| **d != creator.domain) {
        return Err(forbidden(format!(
            "a key cannot be created in domain {d:?}: only in the caller's own domain {:?}",
            creator.domain
        )));
    }
    let scopes: Vec<String> = match &ask.scopes {
        Some(asked) => {
            let beyond: Vec<&str> = asked
                .iter()
                .map(String::as_str)
                .filter(|s| !holds(s))
                .collect();
            if !beyond.is_empty() {
                return Err(forbidden(format!(
                    "scopes refused: {} (a key can grant only scopes it holds)",
                    beyond.join(", ")
                )));
            }
            // In canonical order, once each.
            SCOPES
                .iter()
                .filter(|s| asked.iter().any(|a| a == *s))
                .map(|s| s.to_string())
                .collect()
        }
        None => DEFAULT_SCOPES
            .iter()
            .filter(|s| holds(s))
            .map(|s| s.to_string())
            .collect(),
    };
    let allow = match (&creator.allow, &ask.allow) {
        (None, asked) => asked.clone(),
        (Some(own), None) => Some(own.clone()),
        (Some(own), Some(asked)) => {
            let beyond: Vec<String> = asked
                .iter()
                .filter(|p| !own.contains(p))
                .map(|p| format!("{p:?}"))
                .collect();
            if !beyond.is_empty() {
                return Err(forbidden(format!(
                    "allow patterns refused: {} (a restricted key can grant only its own patterns: {})",
                    beyond.join(", "),
                    own.join(", ")
                )));
            }
            Some(asked.clone())
        }
    };
    Ok((scopes, allow))
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

    /// The digest and record of the key with id `id`.
    fn by_id(&self, id: &str) -> Option<(&String, &KeyRecord)> {
        self.keys.iter().find(|(_, r)| r.id == id)
    }

    /// Whether `key` was minted by `ancestor`, directly or through keys of this backend.
    fn minted_by(&self, key: &KeyRecord, ancestor: &KeyRef) -> bool {
        let mut next = key.creator.as_ref();
        let mut seen = HashSet::new();
        while let Some(c) = next {
            if c == ancestor {
                return true;
            }
            if c.backend != NAME || !seen.insert(c.key_id.clone()) {
                return false;
            }
            next = self.by_id(&c.key_id).and_then(|(_, r)| r.creator.as_ref());
        }
        false
    }

    /// Creates a key: a fresh secret, stored (durably, then in memory) only as its
    /// digest. Returns the secret and the key's id.
    fn create_key(
        &mut self,
        name: String,
        domain: String,
        scopes: Vec<String>,
        allow: Option<Vec<String>>,
        creator: Option<KeyRef>,
    ) -> Result<(String, String), String> {
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
            allow,
            creator,
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
        self.host
            .state_put(&format!("{KEY_PREFIX}{digest}"), &bytes)?;
        let by = match &record.creator {
            Some(c) => format!(", created by key {} ({})", c.key_id, c.backend),
            None => String::new(),
        };
        self.host.info(&format!(
            "{NAME}: created access key {} ({:?}) in domain {:?} with scopes {}{by}",
            record.id,
            record.name,
            record.domain,
            record.scopes.join(" ")
        ));
        let id = record.id.clone();
        self.keys.insert(digest, record);
        Ok((secret, id))
    }

    /// Deletes the key with digest `digest` (durably, then in memory).
    fn delete_key(&mut self, digest: &str) -> Result<(), String> {
        self.host.state_delete(&format!("{KEY_PREFIX}{digest}"))?;
        if let Some(r) = self.keys.remove(digest) {
            self.host.info(&format!(
                "{NAME}: deleted access key {} ({:?}) in domain {:?}",
                r.id, r.name, r.domain
            ));
        }
        Ok(())
    }

    fn bootstrap(&mut self, req: BootstrapRequest) -> Result<BootstrapResponse, String> {
        if !self.keys.is_empty() {
            return Ok(BootstrapResponse { created: None });
        }
        let (secret, _) = self.create_key(
            ADMIN.to_string(),
            req.domain,
            vec![ADMIN.to_string()],
            None,
            None,
        )?;
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
            // deleted through this plugin's routes, or a revocation anywhere of the key
            // that minted it, makes the host forget it at once).
            Some(record) => AuthVerdict::Accepted {
                principal: PrincipalSpec {
                    key_id: record.id.clone(),
                    domain: record.domain.clone(),
                    scopes: record.scopes.clone(),
                    allow: record.allow.clone(),
                    creator: record.creator.clone(),
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

    /// `OP_KEY_STATUS`: a key that exists is active (this backend deletes keys rather
    /// than keeping revoked ones); its creator goes with it for the host to check.
    fn key_status(&self, req: &KeyStatusRequest) -> KeyStatusResponse {
        match self.by_id(&req.key_id) {
            Some((_, r)) => KeyStatusResponse {
                status: KeyState::Active,
                creator: r.creator.clone(),
                restriction: None,
            },
            None => KeyStatusResponse {
                status: KeyState::Unknown,
                creator: None,
                restriction: None,
            },
        }
    }

    fn http(&mut self, req: HttpRequest) -> HttpResponse {
        let rest = req.path.strip_prefix(TOKENS_PATH);
        // `/api/api_tokens/{id}`: one non-empty segment.
        let id = rest
            .and_then(|r| r.strip_prefix('/'))
            .filter(|id| !id.is_empty() && !id.contains('/'));
        let result = match (req.method.as_str(), rest, id) {
            ("POST", Some(""), _) => self.post_token(&req),
            ("GET", Some(""), _) => Ok(self.list_tokens(&req)),
            ("DELETE", _, Some(id)) => self.delete_token(&req, id),
            _ => Err((
                404,
                "not_found",
                format!("no route {} {}", req.method, req.path),
            )),
        };
        match result {
            Ok(r) => r,
            Err((status, kind, message)) => HttpResponse::error(status, kind, &message),
        }
    }

    /// The key the request was authenticated with, as its minted keys record it. None
    /// from a host that does not say which backend accepted the caller.
    fn caller(req: &HttpRequest) -> Option<KeyRef> {
        (!req.backend.is_empty()).then(|| KeyRef {
            backend: req.backend.clone(),
            key_id: req.principal.key_id.clone(),
        })
    }

    /// `POST /api/api_tokens`.
    fn post_token(&mut self, req: &HttpRequest) -> Result<HttpResponse, Refusal> {
        refuse_non_json(req.headers.get("content-type").map(String::as_str))
            .map_err(|m| (415, "unsupported_media_type", m))?;
        let ask = requested_key(&req.body).map_err(bad_request)?;
        let (scopes, allow) = grant(&req.principal, &ask)?;
        let name = ask
            .name
            .unwrap_or_else(|| random_alphanumeric(RANDOM_NAME_LEN));
        let creator = Self::caller(req);
        if creator.is_none() {
            self.host.warn(&format!(
                "{NAME}: the host did not say which backend authenticated key {}: the new key does not record its creator",
                req.principal.key_id
            ));
        }
        match self.create_key(
            name.clone(),
            req.principal.domain.clone(),
            scopes,
            allow,
            creator,
        ) {
            Ok((secret, id)) => {
                #[derive(Serialize)]
                struct Created<'a> {
                    access_key: &'a str,
                    name: &'a str,
                    id: &'a str,
                }
                let body = serde_json::to_string(&Created {
                    access_key: &secret,
                    name: &name,
                    id: &id,
                })
                .map_err(|e| (500, "internal_error", e.to_string()))?;
                Ok(HttpResponse::json_text(201, body))
            }
            Err(e) => {
                self.host
                    .warn(&format!("{NAME}: could not store a new access key: {e}"));
                Err((
                    500,
                    "internal_error",
                    "could not store the new access key".to_string(),
                ))
            }
        }
    }

    /// Whether the caller of `req` may delete `record`: an admin any key of its domain;
    /// another caller itself and the keys it minted, directly or not.
    fn may_manage(&self, req: &HttpRequest, record: &KeyRecord) -> bool {
        let who = &req.principal;
        if record.domain != who.domain {
            return false;
        }
        let is_admin = who.scopes.iter().any(|s| s == ADMIN);
        let is_self = req.backend == NAME && who.key_id == record.id;
        is_admin || is_self || Self::caller(req).is_some_and(|c| self.minted_by(record, &c))
    }

    /// `GET /api/api_tokens`: the keys the caller may delete ([`Self::may_manage`]), oldest
    /// first, never their secrets: `[{"id", "name", "scopes", "allow"?, "created_by"?,
    /// "created_at"}]`.
    fn list_tokens(&self, req: &HttpRequest) -> HttpResponse {
        let mut keys: Vec<&KeyRecord> = self
            .keys
            .values()
            .filter(|r| self.may_manage(req, r))
            .collect();
        keys.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        let list: Vec<serde_json::Value> = keys
            .into_iter()
            .map(|r| {
                let mut v = serde_json::json!({
                    "id": r.id,
                    "name": r.name,
                    "scopes": r.scopes,
                    "created_at": format_ms(r.created_ms),
                });
                if let Some(allow) = &r.allow {
                    v["allow"] = serde_json::json!(allow);
                }
                if let Some(c) = &r.creator {
                    v["created_by"] = serde_json::json!({"backend": c.backend, "key_id": c.key_id});
                }
                v
            })
            .collect();
        HttpResponse::json(200, &serde_json::Value::Array(list))
    }

    /// `DELETE /api/api_tokens/{id}`: the key and every key of this backend it minted,
    /// directly or not (they would be refused anyway, their creator gone). An admin
    /// deletes any key of its domain; another caller (with `keys:write`) itself and the
    /// keys it minted, directly or not. Keys of other domains do not exist for the caller.
    fn delete_token(&mut self, req: &HttpRequest, id: &str) -> Result<HttpResponse, Refusal> {
        let who = &req.principal;
        let not_found = || (404, "not_found", format!("no access key {id}"));
        let (digest, record) = self
            .by_id(id)
            .filter(|(_, r)| r.domain == who.domain)
            .map(|(d, r)| (d.clone(), r.clone()))
            .ok_or_else(not_found)?;
        if !self.may_manage(req, &record) {
            return Err(forbidden(format!(
                "access key {id} was not created by this key: a key without admin deletes only itself and the keys it created"
            )));
        }
        // Not the domain's last admin key (with the keys it minted): an outside review
        // deleted the first admin key with itself, every key it had made went with it,
        // and nothing could manage keys over REST again (`plugin-call` could).
        let gone = KeyRef {
            backend: NAME.to_string(),
            key_id: record.id.clone(),
        };
        let is_admin = |r: &KeyRecord| r.scopes.iter().any(|s| s == ADMIN);
        let goes = |r: &KeyRecord| r.id == record.id || self.minted_by(r, &gone);
        let admins = || {
            self.keys
                .values()
                .filter(|r| r.domain == record.domain && is_admin(r))
        };
        if admins().any(goes) && !admins().any(|r| !goes(r)) {
            return Err((
                409,
                "conflict",
                format!(
                    "access key {id} is the last admin key of domain {:?}: deleting it would delete every key it created, admin keys too, and leave none to manage keys; make an admin key of its own first (`connectord plugin-call --config <file> connector create_key '{{\"name\": \"admin2\", \"domain\": {:?}, \"scopes\": [\"admin\"]}}'`), then delete this one",
                    record.domain, record.domain
                ),
            ));
        }
        self.delete_key(&digest).map_err(|e| {
            self.host
                .warn(&format!("{NAME}: could not delete access key {id}: {e}"));
            (
                500,
                "internal_error",
                "could not delete the access key".to_string(),
            )
        })?;
        // What it minted: refused from now on by the host (their creator is unknown), and
        // deleted here so as not to keep dead records.
        let descendants: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, r)| self.minted_by(r, &gone))
            .map(|(d, _)| d.clone())
            .collect();
        for d in descendants {
            if let Err(e) = self.delete_key(&d) {
                self.host.warn(&format!(
                    "{NAME}: could not delete a key minted by deleted key {id} (it is refused all the same): {e}"
                ));
            }
        }
        Ok(HttpResponse {
            status: 204,
            headers: Default::default(),
            body: String::new(),
        })
    }
}

impl Plugin for ConnectorAuth {
    const NAME: &'static str = NAME;

    fn create(config: serde_json::Value, host: Host) -> Result<Self, String> {
        let Config {} = connectord_plugin_sdk::settings(config)
            .map_err(|e| format!("{NAME}: invalid configuration: {e}"))?;
        let keys = Self::load(&host)?;
        host.info(&format!("{NAME}: {} access keys loaded", keys.len()));
        Ok(ConnectorAuth { host, keys })
    }
}

// The typed operations: the inherent methods of the same names (which take precedence in
// `Type::method` paths) do the work.
impl AuthPlugin for ConnectorAuth {
    fn authenticate(&mut self, req: AuthRequest) -> Result<AuthVerdict, String> {
        Ok(ConnectorAuth::authenticate(self, &req))
    }

    fn bootstrap(&mut self, req: BootstrapRequest) -> Result<BootstrapResponse, String> {
        ConnectorAuth::bootstrap(self, req)
    }

    fn key_status(&mut self, req: KeyStatusRequest) -> Result<KeyStatusResponse, String> {
        Ok(ConnectorAuth::key_status(self, &req))
    }
}

impl RoutesPlugin for ConnectorAuth {
    fn routes(&mut self) -> Result<RoutesResponse, String> {
        let one = format!("{TOKENS_PATH}/{{id}}");
        let routes = [
            ("GET", TOKENS_PATH),
            ("POST", TOKENS_PATH),
            ("DELETE", &one),
        ];
        Ok(RoutesResponse::with_scope(KEYS_WRITE, &routes))
    }

    fn http(&mut self, req: HttpRequest) -> Result<HttpResponse, String> {
        Ok(ConnectorAuth::http(self, req))
    }
}

impl ConnectorAuth {
    /// [`OP_CREATE_KEY`].
    fn create_key_op(&mut self, req: CreateKeyRequest) -> Result<serde_json::Value, String> {
        for s in &req.scopes {
            if !SCOPES.contains(&s.as_str()) {
                return Err(format!("{OP_CREATE_KEY}: unknown scope {s:?}"));
            }
        }
        if req.domain.is_empty() || req.name.is_empty() {
            return Err(format!(
                "{OP_CREATE_KEY}: name and domain must not be empty"
            ));
        }
        let scopes = if req.scopes.is_empty() {
            DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect()
        } else {
            req.scopes
        };
        let (secret, id) = self.create_key(req.name.clone(), req.domain, scopes, None, None)?;
        Ok(serde_json::json!({"access_key": secret, "name": req.name, "id": id}))
    }
}

/// Administrative operation (`connectord plugin-call connector create_key '{…}'`): creates
/// a key in any domain, for example the first key of a new tenant, or a replacement admin
/// key (a key made here has no creator, so it outlives every other key). Scopes default to
/// the data scopes ([`DATA_SCOPES`]).
pub const OP_CREATE_KEY: &str = "create_key";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKeyRequest {
    name: String,
    domain: String,
    #[serde(default)]
    scopes: Vec<String>,
}

declare_plugin!(ConnectorAuth: auth + routes, operations {
    OP_CREATE_KEY => ConnectorAuth::create_key_op,
});

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use connectord_plugin_sdk::auth::{OP_AUTHENTICATE, OP_BOOTSTRAP, OP_KEY_STATUS};
    use connectord_plugin_sdk::http::{OP_HTTP, Route};
    use connectord_plugin_sdk::testing::{
        MemoryHost, assert_auth_routes_operations, assert_bad_input_refused,
        assert_config_field_refused, auth_request, authenticate, call_http, call_json, routes_of,
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
            creator: None,
        }
    }

    fn http_req(method: &str, path: &str, body: &str) -> HttpRequest {
        HttpRequest {
            backend: NAME.into(),
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
        DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect()
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
        assert!(!host.logged(&key));
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
        assert_eq!(body.as_object().unwrap().len(), 3);
        assert_eq!(body["id"].as_str().unwrap().len(), 16);

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
            ("post", TOKENS_PATH),
            ("DELETE", TOKENS_PATH),
            ("POST", "/api/other"),
            ("POST", "/api/api_tokens/"),
            ("DELETE", "/api/api_tokens/"),
            ("DELETE", "/api/api_tokensé"),
            ("DELETE", "/api/api_tokens/a/b"),
            ("GET", "/api/api_tokens/a"),
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
        assert!(host.logged("2 access keys loaded"));
    }

    #[test]
    fn routes_lists_the_post_and_delete_routes() {
        let host = MemoryHost::new();
        let mut p = new_plugin(&host);
        let routes = routes_of(&mut p);
        let route = |method: &str, path: &str| Route::new(method, path, "keys:write");
        assert_eq!(
            routes.routes,
            vec![
                route("GET", "/api/api_tokens"),
                route("POST", "/api/api_tokens"),
                route("DELETE", "/api/api_tokens/{id}")
            ]
        );
    }

    #[test]
    fn unknown_op_and_bad_input_are_errors() {
        assert_auth_routes_operations::<ConnectorAuth>(&["create_key"]);
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

    /// A call of the plugin's routes as `who` (authenticated by `backend`).
    fn as_key(
        p: &mut ConnectorAuth,
        backend: &str,
        who: PrincipalSpec,
        method: &str,
        path: &str,
        body: &str,
    ) -> (HttpResponse, Value) {
        let mut req = http_req(method, path, body);
        req.backend = backend.into();
        req.principal = who;
        // Not call_http: a 204 has no JSON body.
        let resp: HttpResponse =
            serde_json::from_value(call_json(p, OP_HTTP, &serde_json::to_value(&req).unwrap()))
                .expect("HttpResponse");
        let body = serde_json::from_str(&resp.body).unwrap_or(Value::Null);
        (resp, body)
    }

    /// The domain's last admin key is not deleted over REST (409), counting the admin keys
    /// it minted, which would go with it; another admin key of its own lineage (made by
    /// `create_key`, without a creator) lets it go. An outside review deleted the first
    /// admin key with itself: every key it had made went with it, and nothing could
    /// manage keys over REST again.
    #[test]
    fn the_last_admin_key_of_a_domain_is_not_deleted() {
        let host = MemoryHost::new();
        let mut p = new_plugin(&host);
        let first = bootstrap(&mut p, DOMAIN).created.unwrap();
        let AuthVerdict::Accepted { principal: a, .. } = auth_bearer(&mut p, &first) else {
            panic!("the first key refused");
        };
        let delete = |p: &mut ConnectorAuth, who: &PrincipalSpec, id: &str| {
            as_key(
                p,
                NAME,
                who.clone(),
                "DELETE",
                &format!("{TOKENS_PATH}/{id}"),
                "",
            )
        };
        let (r, v) = delete(&mut p, &a, &a.key_id);
        assert_eq!(r.status, 409, "{v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap_or_default()
                .contains("plugin-call"),
            "{v}"
        );
        // An admin key it minted goes with it: still the last.
        let (r, v) = as_key(
            &mut p,
            NAME,
            a.clone(),
            "POST",
            TOKENS_PATH,
            r#"{"scopes":["admin"]}"#,
        );
        assert_eq!(r.status, 201, "{v}");
        let minted = v["id"].as_str().unwrap().to_string();
        assert_eq!(delete(&mut p, &a, &a.key_id).0.status, 409);
        // The minted admin key may go; a key of another lineage lets the first go.
        assert_eq!(delete(&mut p, &a, &minted).0.status, 204);
        call_json(
            &mut p,
            OP_CREATE_KEY,
            &json!({"name": "second", "domain": DOMAIN, "scopes": ["admin"]}),
        );
        assert_eq!(delete(&mut p, &a, &a.key_id).0.status, 204);
        assert!(!matches!(
            auth_bearer(&mut p, &first),
            AuthVerdict::Accepted { .. }
        ));
    }

    fn principal(scopes: &[&str], allow: Option<&[&str]>) -> PrincipalSpec {
        PrincipalSpec {
            key_id: "creator".into(),
            domain: DOMAIN.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            allow: allow.map(|a| a.iter().map(|s| s.to_string()).collect()),
            creator: None,
        }
    }

    /// What a creator may grant (issue 18, item 3): a table of (creator scopes, creator
    /// allow, body, granted scopes and allow, or the text a 403 must name).
    #[test]
    fn grants_never_exceed_the_creator() {
        type Want = Result<(Vec<&'static str>, Option<Vec<&'static str>>), &'static str>;
        let data = || DATA_SCOPES.to_vec();
        type Case = (
            &'static [&'static str],
            Option<&'static [&'static str]>,
            Value,
            Want,
        );
        let cases: Vec<Case> = vec![
            (&["admin"], None, json!({}), Ok((data(), None))),
            (
                &["admin"],
                None,
                json!({"scopes": ["admin"]}),
                Ok((vec!["admin"], None)),
            ),
            (
                &["admin"],
                None,
                json!({"scopes": ["keys:write", "endpoints:read"], "allow": ["a-*"]}),
                Ok((vec!["endpoints:read", "keys:write"], Some(vec!["a-*"]))),
            ),
            (
                &["endpoints:read", "keys:write"],
                None,
                json!({}),
                Ok((vec!["endpoints:read"], None)),
            ),
            (
                &["endpoints:read", "keys:write"],
                Some(&["a-*", "b"]),
                json!({}),
                Ok((vec!["endpoints:read"], Some(vec!["a-*", "b"]))),
            ),
            (
                &["endpoints:read", "keys:write"],
                Some(&["a-*", "b"]),
                json!({"allow": ["b"]}),
                Ok((vec!["endpoints:read"], Some(vec!["b"]))),
            ),
            (
                &["endpoints:read", "keys:write"],
                None,
                json!({"scopes": ["endpoints:read", "resources:write", "admin"]}),
                Err("resources:write, admin"),
            ),
            (
                &["endpoints:read", "keys:write"],
                Some(&["a-*"]),
                json!({"allow": ["a-*", "*"]}),
                Err("\"*\""),
            ),
            (
                &["admin"],
                None,
                json!({"domain": "elsewhere"}),
                Err("elsewhere"),
            ),
            (
                &["admin"],
                None,
                json!({"domain": DOMAIN}),
                Ok((data(), None)),
            ),
        ];
        for (scopes, allow, body, want) in cases {
            let ask = requested_key(&body.to_string()).expect("well-formed");
            let got = grant(&principal(scopes, allow), &ask);
            match (got, want) {
                (Ok((s, a)), Ok((ws, wa))) => {
                    assert_eq!(s, ws, "{body}");
                    assert_eq!(
                        a,
                        wa.map(|v| v.into_iter().map(String::from).collect()),
                        "{body}"
                    );
                }
                (Err((403, "forbidden", m)), Err(named)) => {
                    assert!(m.contains(named), "{body}: {m}")
                }
                (got, want) => panic!("{body}: got {got:?}, want {want:?}"),
            }
        }
        for bad in [
            json!({"scopes": ["nope"]}),
            json!({"scopes": "admin"}),
            json!({"allow": []}),
            json!({"allow": [""]}),
            json!({"allow": [1]}),
            json!({"domain": 5}),
        ] {
            assert!(requested_key(&bad.to_string()).is_err(), "{bad}");
        }
    }

    /// Keys record their creator and allow, keep them across a restart, and answer
    /// key_status; deletion takes what a key minted, within the caller's rights.
    #[test]
    fn minted_keys_record_their_creator_and_go_with_it() {
        let host = MemoryHost::new();
        let mut p = new_plugin(&host);
        let mut pelion_key = principal(&["endpoints:read", "keys:write"], Some(&["s-*"]));
        pelion_key.key_id = "pk1".into();
        let (r, v) = as_key(
            &mut p,
            "pelion",
            pelion_key.clone(),
            "POST",
            TOKENS_PATH,
            r#"{"scopes":["endpoints:read","keys:write"]}"#,
        );
        assert_eq!(r.status, 201, "{v}");
        let child_id = v["id"].as_str().unwrap().to_string();
        let child = v["access_key"].as_str().unwrap().to_string();
        let AuthVerdict::Accepted {
            principal: child_p, ..
        } = auth_bearer(&mut p, &child)
        else {
            panic!("child refused");
        };
        let pelion_ref = KeyRef {
            backend: "pelion".into(),
            key_id: "pk1".into(),
        };
        assert_eq!(child_p.creator, Some(pelion_ref.clone()));
        assert_eq!(child_p.allow, Some(vec!["s-*".to_string()]));
        let (r, v) = as_key(&mut p, NAME, child_p.clone(), "POST", TOKENS_PATH, "");
        assert_eq!(r.status, 201, "{v}");
        let grandchild_id = v["id"].as_str().unwrap().to_string();

        // Across a restart.
        drop(p);
        let mut p = new_plugin(&host);
        let status = |p: &mut ConnectorAuth, id: &str| -> KeyStatusResponse {
            serde_json::from_value(call_json(p, OP_KEY_STATUS, &json!({ "key_id": id }))).unwrap()
        };
        let s = status(&mut p, &grandchild_id);
        assert_eq!(s.status, KeyState::Active);
        assert_eq!(
            s.creator,
            Some(KeyRef {
                backend: NAME.into(),
                key_id: child_id.clone()
            })
        );
        assert_eq!(status(&mut p, &child_id).creator, Some(pelion_ref));
        assert_eq!(status(&mut p, "nope").status, KeyState::Unknown);

        // Another key with keys:write may not delete them; the Pelion key that minted the
        // child may, and the grandchild goes with it.
        let stranger = principal(&["keys:write"], None);
        let (r, _) = as_key(
            &mut p,
            "pelion",
            stranger,
            "DELETE",
            &format!("{TOKENS_PATH}/{grandchild_id}"),
            "",
        );
        assert_eq!(r.status, 403);
        let mut elsewhere = principal(&["admin"], None);
        elsewhere.domain = "other".into();
        let (r, _) = as_key(
            &mut p,
            NAME,
            elsewhere,
            "DELETE",
            &format!("{TOKENS_PATH}/{child_id}"),
            "",
        );
        assert_eq!(r.status, 404);
        let (r, _) = as_key(
            &mut p,
            "pelion",
            pelion_key,
            "DELETE",
            &format!("{TOKENS_PATH}/{child_id}"),
            "",
        );
        assert_eq!(r.status, 204);
        assert_eq!(status(&mut p, &child_id).status, KeyState::Unknown);
        assert_eq!(status(&mut p, &grandchild_id).status, KeyState::Unknown);
        assert!(host.state().is_empty(), "both records deleted");
    }
}
