//! The header key-pair auth backend (plugin `headerkeys`, kind [`Kind::Auth`]), after the
//! device HTTP API "Access Keys" document (seed 002).
//!
//! The REST API is cut into **API areas**. Each area has one pair of keys: a read key
//! `rd` and a write key `wr`. A caller sends them as the request headers `ApiRdKey` and
//! `ApiWrKey`. The pairs are read and changed through `/api/v1/apikeys`, exactly as the
//! seed shows it (its `Json+typeName` / `Json+typeRevision` fields, the form-encoded
//! `PUT`). The full operator documentation is `docs/auth-headerkeys.md`.
//!
//! # Areas
//!
//! The order is fixed: the `n` of `/api/v1/apikeys/keys/{n}` is the position. Paths are
//! matched the way the core matches them: split on `/`, with empty segments dropped (so a
//! trailing slash does not matter), and each segment percent-decoded. One leading `v1` or
//! `v2` segment is removed first. A request in no area, or with a method the area does not
//! list, is [`AuthVerdict::NotMine`].
//!
//! | n | area | paths | read (needs `ApiRdKey`) | write (needs `ApiRdKey` and `ApiWrKey`) |
//! |---|---|---|---|---|
//! | 0 | `endpoints` | `/`, `/rest-versions`, `/endpoints`, `/endpoints/{ep}` | GET, HEAD → `endpoints:read` | none |
//! | 1 | `resources` | `/endpoints/{ep}/{path…}` | GET, HEAD → `resources:read` | PUT, POST, DELETE → `resources:write` |
//! | 2 | `subscriptions` | `/subscriptions`, `/subscriptions/…` | GET, HEAD → `subscriptions:read` | PUT, DELETE → `subscriptions:write` |
//! | 3 | `notifications` | `/notification/…` (`pull`, `callback`) | GET, HEAD → `notifications` | PUT, DELETE → `notifications` |
//! | 4 | `limits` | `/limits`, `/limits/…` | GET, HEAD → `limits:read` | none |
//! | 5 | `apikeys` | `/api/v1/apikeys`, `/api/v1/apikeys/…` | GET, HEAD → no core scope | PUT → no core scope |
//!
//! `/` and `/rest-versions` belong to `endpoints` because the core gives them the scope
//! `endpoints:read`. `/metrics` (scope `metrics:read`) is in no area: no header key grants
//! it or `admin`. A resource `GET` is asynchronous in the mbed API (its answer comes on the
//! notification channel); it is still a read of `resources`, mapped by method only. The
//! principal holds exactly the scope of the access (a write principal does not also hold
//! the read scope: it is made for this one request). `apikeys` principals hold no core
//! scope at all; the plugin's own routes are declared with the scope `authenticated`.
//!
//! # Authentication (`OP_AUTHENTICATE`)
//!
//! - A read needs `ApiRdKey` equal to the area's `rd`. A write needs `ApiRdKey` equal to
//!   `rd` **and** `ApiWrKey` equal to `wr`: the write key alone is not enough.
//! - An **empty key opens** what it guards: with `rd` empty, reads need no header; for a
//!   write, each key that is empty need not be sent. A header sent for an empty key is
//!   ignored (it cannot be wrong).
//! - The access is open (every key it needs is empty): `Accepted`, unless the request
//!   carries neither key header but an `Authorization` header: then `NotMine`, so that the
//!   backend whose credential that is decides (its principal, not an anonymous area one,
//!   owns the caller's callbacks and subscriptions).
//! - Not open and neither `ApiRdKey` nor `ApiWrKey` is sent: `NotMine` (another backend
//!   may know the request, e.g. a Bearer key).
//! - A key header is sent but a needed key is missing or does not match: `Refused` with a
//!   reason (the host answers 401). A read looks at `ApiRdKey` only.
//! - Header values are compared after trimming surrounding spaces (keys cannot have any).
//! - Secrets are compared in constant time: both sides are hashed with SHA-256 and the
//!   two 32-byte digests are compared with `subtle::ConstantTimeEq`, so neither the
//!   content nor the length of a stored key shows in the timing.
//! - The principal: `key_id` `headerkeys` for every area and access (so that one
//!   application's subscriptions, async answers and long-poll share one notification
//!   channel), the configured `domain`, the scopes of the table above, no `allow`
//!   restriction.
//!
//! # `/api/v1/apikeys` (`OP_ROUTES`, `OP_HTTP`)
//!
//! Routes, all with scope `authenticated`: `GET /api/v1/apikeys` (the whole document),
//! `GET /api/v1/apikeys/keys/{n}` (one pair), `PUT /api/v1/apikeys/keys/{n}` (a body
//! `rd=…&wr=…`, `Content-Type: application/x-www-form-urlencoded`, either field or both,
//! `+` and `%XX` decoded; `name` is not writable and any other field is refused: 400;
//! another content type: 415; `n` out of range or not a canonical number: 404; 200 with
//! the changed pair).
//!
//! The area protects itself. The core authenticates a request through every configured
//! backend first, this one included, and `authenticate` applies the `apikeys` rule to
//! these paths. The `http` handler then **checks the headers again with the same rule and
//! ignores the principal**: a caller that another backend authenticated (even an `admin`
//! Bearer key) reads or changes nothing without the `apikeys` keys. A missing or wrong key
//! there is 401, the status the core answers when `authenticate` refuses, so that the
//! answer does not depend on the order of the backends.
//!
//! **Warning** (from the seed): the `apikeys` read key is enough to read every key,
//! including the `apikeys` write key itself, so it is as powerful as every key together.
//!
//! # Keys and state
//!
//! Keys are stored **in plain text**: the seed's API must show them again, so they cannot
//! be hashed. They live in the host's durable state under `keys` as JSON
//! `{"version": 1, "keys": [{"name", "rd", "wr"}, …]}`, read in `create` and written (and
//! durable) before a `PUT` answers; memory changes only after the write succeeded.
//!
//! On the first `create` (no state) every area gets random keys: 20 alphanumeric
//! characters from the thread CSPRNG (about 119 bits), so nothing ships with the seed's
//! example keys and no area starts open. An area missing from the stored state (a newer
//! plugin with more areas) gets random keys too; an unknown stored area is dropped with a
//! warning; an unreadable state fails the load rather than replacing the keys.
//! `OP_BOOTSTRAP` creates nothing (`created: null`): nobody holds the `apikeys` read key
//! yet, so operation [`OP_SHOW_KEYS`] gives the operator the whole keys document:
//! `connectord plugin-call headerkeys show_keys '{}'`. The plugin never logs a key.
//!
//! Configuration: `{"domain": "…"}` (default `"default"`), the domain of every principal
//! of this backend; any other field is refused by name.

use std::collections::BTreeMap;

/// The `key_id` of every principal of this backend.
pub const KEY_ID: &str = "headerkeys";

use connectord_plugin_sdk::auth::{
    AuthRequest, AuthVerdict, BootstrapRequest, BootstrapResponse, KeyState, KeyStatusRequest,
    KeyStatusResponse, PrincipalSpec,
};
use connectord_plugin_sdk::http::{AUTHENTICATED, HttpRequest, HttpResponse, RoutesResponse};
use connectord_plugin_sdk::secret::random_alphanumeric;
use connectord_plugin_sdk::{AuthPlugin, Host, Plugin, RoutesPlugin, declare_plugin};
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The plugin name the configuration uses.
pub const NAME: &str = "headerkeys";

/// Operation for the daemon CLI: the whole keys document, as `GET /api/v1/apikeys`.
pub const OP_SHOW_KEYS: &str = "show_keys";

/// The state key holding every key pair.
const STATE_KEY: &str = "keys";
/// Version of the stored JSON.
const STATE_VERSION: u32 = 1;
/// Length of a generated key (alphanumeric, ~5.95 bits per character).
const GENERATED_KEY_LEN: usize = 20;
/// Longest key a `PUT` may set, in bytes (a key travels in a header).
const MAX_KEY_LEN: usize = 256;

/// Request header names, lower-case as the host hands them over.
const HDR_RD: &str = "apirdkey";
const HDR_WR: &str = "apiwrkey";
/// The same, as the seed spells them (for messages).
const HDR_RD_NAME: &str = "ApiRdKey";
const HDR_WR_NAME: &str = "ApiWrKey";

/// The seed's route and type names.
const APIKEYS_PATH: &str = "/api/v1/apikeys";
const APIKEY_ONE_PATH: &str = "/api/v1/apikeys/keys/{n}";
const TYPE_NAME_KEY: &str = "MkcJsonLib.jApiKey";
const TYPE_NAME_KEYS: &str = "MkcJsonLib.jApiKeys";
const TYPE_REVISION: u32 = 0;
const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded";

/// The default domain of this backend's principals.
const DEFAULT_DOMAIN: &str = "default";

/// An API area: one key pair each. [`Area::ALL`]'s order is the `keys/{n}` index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Area {
    Endpoints,
    Resources,
    Subscriptions,
    Notifications,
    Limits,
    Apikeys,
}

impl Area {
    const ALL: [Area; 6] = [
        Area::Endpoints,
        Area::Resources,
        Area::Subscriptions,
        Area::Notifications,
        Area::Limits,
        Area::Apikeys,
    ];

    fn name(self) -> &'static str {
        match self {
            Area::Endpoints => "endpoints",
            Area::Resources => "resources",
            Area::Subscriptions => "subscriptions",
            Area::Notifications => "notifications",
            Area::Limits => "limits",
            Area::Apikeys => "apikeys",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The core scopes an access grants (see the module's table).
    fn scopes(self, access: Access) -> &'static [&'static str] {
        match (self, access) {
            (Area::Endpoints, _) => &["endpoints:read"],
            (Area::Resources, Access::Read) => &["resources:read"],
            (Area::Resources, Access::Write) => &["resources:write"],
            (Area::Subscriptions, Access::Read) => &["subscriptions:read"],
            (Area::Subscriptions, Access::Write) => &["subscriptions:write"],
            (Area::Notifications, _) => &["notifications"],
            (Area::Limits, _) => &["limits:read"],
            (Area::Apikeys, _) => &[],
        }
    }
}

/// Reading needs the rd key; writing needs both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

/// Percent-decoded, non-empty path segments (the core's split), or `None` when a segment
/// is not UTF-8 after decoding.
fn segments(path: &str) -> Option<Vec<String>> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_decode_str(s)
                .decode_utf8()
                .ok()
                .map(|c| c.into_owned())
        })
        .collect()
}

/// The area and access of a request, by method and path; `None`: not an area's.
fn classify(method: &str, path: &str) -> Option<(Area, Access)> {
    let segs = segments(path)?;
    let rest: &[String] = match segs.first().map(String::as_str) {
        Some("v1" | "v2") => &segs[1..],
        _ => &segs,
    };
    let parts: Vec<&str> = rest.iter().map(String::as_str).collect();
    let read = matches!(method, "GET" | "HEAD");
    let (area, writes): (Area, &[&str]) = match parts.as_slice() {
        [] | ["rest-versions"] | ["endpoints"] | ["endpoints", _] => (Area::Endpoints, &[]),
        ["endpoints", _, _, ..] => (Area::Resources, &["PUT", "POST", "DELETE"]),
        ["subscriptions", ..] => (Area::Subscriptions, &["PUT", "DELETE"]),
        ["notification", _, ..] => (Area::Notifications, &["PUT", "DELETE"]),
        ["limits", ..] => (Area::Limits, &[]),
        ["api", "v1", "apikeys", ..] => (Area::Apikeys, &["PUT"]),
        _ => return None,
    };
    if read {
        Some((area, Access::Read))
    } else if writes.contains(&method) {
        Some((area, Access::Write))
    } else {
        None
    }
}

/// Constant-time equality of a presented key and a stored one: the SHA-256 digests of
/// both are compared with `subtle`, so the time depends on neither content nor length.
fn secret_eq(presented: &str, stored: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(stored.as_bytes());
    a.as_slice().ct_eq(b.as_slice()).into()
}

/// One area's keys. No `Debug`: it holds secrets.
#[derive(Clone, PartialEq, Eq)]
struct KeyPair {
    rd: String,
    wr: String,
}

impl KeyPair {
    fn random() -> KeyPair {
        KeyPair {
            rd: random_alphanumeric(GENERATED_KEY_LEN),
            wr: random_alphanumeric(GENERATED_KEY_LEN),
        }
    }
}

/// What the header check concludes about one access.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    /// Every key this access needs is empty.
    Open,
    /// Every needed key was sent and matches.
    Granted,
    /// Neither key header was sent (and the access is not open).
    Missing(String),
    /// A key header was sent, but a needed key is missing or wrong.
    Denied(String),
}

/// A header's value, surrounding spaces trimmed.
fn header<'a>(headers: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.trim())
}

/// The rule of the seed, for one area and access: reading needs `ApiRdKey`, writing
/// needs `ApiRdKey` and `ApiWrKey`; an empty key need not be sent.
fn check(area: Area, pair: &KeyPair, access: Access, headers: &BTreeMap<String, String>) -> Check {
    let rd_sent = header(headers, HDR_RD);
    let wr_sent = header(headers, HDR_WR);
    let mut needed: Vec<(&str, &str, Option<&str>)> = vec![(HDR_RD_NAME, &pair.rd, rd_sent)];
    if access == Access::Write {
        needed.push((HDR_WR_NAME, &pair.wr, wr_sent));
    }
    needed.retain(|(_, key, _)| !key.is_empty());
    if needed.is_empty() {
        return Check::Open;
    }
    let what = match access {
        Access::Read => "reading",
        Access::Write => "writing",
    };
    let needs = needed
        .iter()
        .map(|(name, _, _)| *name)
        .collect::<Vec<_>>()
        .join(" and ");
    if rd_sent.is_none() && wr_sent.is_none() {
        return Check::Missing(format!(
            "{what} the {} area needs the header {needs}",
            area.name()
        ));
    }
    // Every needed key is compared, whatever the outcome of the others.
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    for (name, key, sent) in &needed {
        match sent {
            None => missing.push(*name),
            Some(v) if !secret_eq(v, key) => wrong.push(*name),
            Some(_) => {}
        }
    }
    if missing.is_empty() && wrong.is_empty() {
        return Check::Granted;
    }
    let mut why = Vec::new();
    if !wrong.is_empty() {
        why.push(format!("wrong {}", wrong.join(" and ")));
    }
    if !missing.is_empty() {
        why.push(format!("missing {}", missing.join(" and ")));
    }
    let alone = if access == Access::Write && missing == [HDR_RD_NAME] {
        " (the write key alone is not enough)"
    } else {
        ""
    };
    Check::Denied(format!(
        "{what} the {} area needs {needs}: {}{alone}",
        area.name(),
        why.join(", ")
    ))
}

/// One key pair as the seed shows it (field order included).
#[derive(Serialize)]
struct ApiKeyDoc<'a> {
    name: &'a str,
    rd: &'a str,
    wr: &'a str,
    #[serde(rename = "Json+typeName")]
    type_name: &'static str,
    #[serde(rename = "Json+typeRevision")]
    type_revision: u32,
}

/// The whole `/api/v1/apikeys` document.
#[derive(Serialize)]
struct ApiKeysDoc<'a> {
    keys: Vec<ApiKeyDoc<'a>>,
    #[serde(rename = "Json+typeName")]
    type_name: &'static str,
    #[serde(rename = "Json+typeRevision")]
    type_revision: u32,
}

/// One stored pair.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredPair {
    name: String,
    rd: String,
    wr: String,
}

/// The stored state (`keys`).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    version: u32,
    keys: Vec<StoredPair>,
}

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The domain of every principal this backend accepts.
    #[serde(default = "default_domain")]
    domain: String,
}

fn default_domain() -> String {
    DEFAULT_DOMAIN.to_string()
}

/// `show_keys` takes nothing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShowKeysRequest {}

/// The `n` of `keys/{n}`: a canonical decimal number below the number of areas.
fn area_at(n: &str) -> Option<Area> {
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0'))
    {
        return None;
    }
    n.parse::<usize>()
        .ok()
        .and_then(|i| Area::ALL.get(i).copied())
}

/// Is this `Content-Type` form encoding (parameters such as `charset` allowed)?
fn is_form(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case(FORM_CONTENT_TYPE))
    })
}

/// One form value: `+` is a space, then `%XX` is decoded; the result must be UTF-8.
fn form_decode(s: &str) -> Result<String, String> {
    let spaced = s.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| "a form value is not UTF-8 after decoding".to_string())
}

/// A new key value must fit in a header: printable ASCII (inner spaces allowed), no
/// surrounding space, at most [`MAX_KEY_LEN`] bytes. Empty is allowed (it opens).
fn valid_key(field: &str, v: &str) -> Result<(), String> {
    if v.len() > MAX_KEY_LEN {
        return Err(format!("{field} is longer than {MAX_KEY_LEN} characters"));
    }
    if !v.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(format!("{field} may hold printable ASCII characters only"));
    }
    if v.starts_with(' ') || v.ends_with(' ') {
        return Err(format!("{field} may not start or end with a space"));
    }
    Ok(())
}

/// The fields of a `PUT …/keys/{n}` body: `(rd, wr)`, each optional, at least one.
fn parse_form(body: &str) -> Result<(Option<String>, Option<String>), String> {
    let mut rd = None;
    let mut wr = None;
    for piece in body.split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = piece.split_once('=').unwrap_or((piece, ""));
        let name = form_decode(raw_name)?;
        let value = form_decode(raw_value)?;
        let slot = match name.as_str() {
            "rd" => &mut rd,
            "wr" => &mut wr,
            "name" => return Err("name is not writable".to_string()),
            other => {
                return Err(format!(
                    "unknown field {other:?}: only rd and wr can be written"
                ));
            }
        };
        if slot.is_some() {
            return Err(format!("{name} is given twice"));
        }
        valid_key(&name, &value)?;
        *slot = Some(value);
    }
    if rd.is_none() && wr.is_none() {
        return Err(
            "the body must set rd and/or wr (application/x-www-form-urlencoded, e.g. rd=mykey)"
                .to_string(),
        );
    }
    Ok((rd, wr))
}

/// The plugin instance.
pub struct HeaderKeys {
    host: Host,
    domain: String,
    /// One pair per area, in [`Area::ALL`] order.
    pairs: Vec<KeyPair>,
}

impl HeaderKeys {
    fn pair(&self, area: Area) -> &KeyPair {
        &self.pairs[area.index()]
    }

    /// Writes `pairs` to the host state; returns once durable.
    fn store(host: &Host, pairs: &[KeyPair]) -> Result<(), String> {
        let stored = Stored {
            version: STATE_VERSION,
            keys: Area::ALL
                .iter()
                .zip(pairs)
                .map(|(area, p)| StoredPair {
                    name: area.name().to_string(),
                    rd: p.rd.clone(),
                    wr: p.wr.clone(),
                })
                .collect(),
        };
        let bytes = serde_json::to_vec(&stored).map_err(|e| e.to_string())?;
        host.state_put(STATE_KEY, &bytes)
    }

    /// Reads the pairs from the state, or makes random ones (stored before returning).
    fn load(host: &Host) -> Result<Vec<KeyPair>, String> {
        let Some(bytes) = host.state_get(STATE_KEY)? else {
            let pairs: Vec<KeyPair> = Area::ALL.iter().map(|_| KeyPair::random()).collect();
            Self::store(host, &pairs)?;
            host.info(&format!(
                "{NAME}: generated random keys for every API area; read them with \
                 `connectord plugin-call {NAME} {OP_SHOW_KEYS} '{{}}'`"
            ));
            return Ok(pairs);
        };
        let stored: Stored = serde_json::from_slice(&bytes).map_err(|e| {
            format!("{NAME}: the stored keys are unreadable ({e}); refusing to replace them")
        })?;
        if stored.version != STATE_VERSION {
            return Err(format!(
                "{NAME}: the stored keys have version {}, this plugin reads {STATE_VERSION}",
                stored.version
            ));
        }
        // Anything but the areas in their order (missing, unknown, twice, reordered) is
        // written back in canonical form.
        let mut dirty = stored
            .keys
            .iter()
            .map(|p| p.name.as_str())
            .ne(Area::ALL.iter().map(|a| a.name()));
        let mut by_name: BTreeMap<String, StoredPair> = BTreeMap::new();
        for p in stored.keys {
            if Area::ALL.iter().all(|a| a.name() != p.name) {
                host.warn(&format!(
                    "{NAME}: dropping the stored keys of unknown area {:?}",
                    p.name
                ));
                dirty = true;
            } else if by_name.contains_key(&p.name) {
                host.warn(&format!(
                    "{NAME}: area {:?} is stored twice; keeping the first",
                    p.name
                ));
                dirty = true;
            } else {
                by_name.insert(p.name.clone(), p);
            }
        }
        let mut pairs = Vec::with_capacity(Area::ALL.len());
        for area in Area::ALL {
            match by_name.remove(area.name()) {
                Some(p) => pairs.push(KeyPair { rd: p.rd, wr: p.wr }),
                None => {
                    host.info(&format!(
                        "{NAME}: generated random keys for the new area {}",
                        area.name()
                    ));
                    pairs.push(KeyPair::random());
                    dirty = true;
                }
            }
        }
        if dirty {
            Self::store(host, &pairs)?;
        }
        Ok(pairs)
    }

    /// The whole keys document, as `GET /api/v1/apikeys` answers it.
    fn document(&self) -> String {
        let doc = ApiKeysDoc {
            keys: Area::ALL.iter().map(|a| self.pair_doc(*a)).collect(),
            type_name: TYPE_NAME_KEYS,
            type_revision: TYPE_REVISION,
        };
        serde_json::to_string(&doc).unwrap_or_default()
    }

    fn pair_doc(&self, area: Area) -> ApiKeyDoc<'_> {
        let p = self.pair(area);
        ApiKeyDoc {
            name: area.name(),
            rd: &p.rd,
            wr: &p.wr,
            type_name: TYPE_NAME_KEY,
            type_revision: TYPE_REVISION,
        }
    }

    fn pair_json(&self, area: Area) -> String {
        serde_json::to_string(&self.pair_doc(area)).unwrap_or_default()
    }

    fn authenticate(&self, req: &AuthRequest) -> AuthVerdict {
        let Some((area, access)) = classify(&req.method, &req.path) else {
            return AuthVerdict::NotMine;
        };
        let accepted = || AuthVerdict::Accepted {
            principal: PrincipalSpec {
                // One identity for the whole backend: an application's subscriptions,
                // async answers and notification channel must be one channel.
                key_id: KEY_ID.to_string(),
                domain: self.domain.clone(),
                scopes: area.scopes(access).iter().map(|s| s.to_string()).collect(),
                allow: None,
                creator: None,
            },
            cache: None,
        };
        match check(area, self.pair(area), access, &req.headers) {
            Check::Open => {
                let ours = req.headers.contains_key(HDR_RD) || req.headers.contains_key(HDR_WR);
                if !ours && req.headers.contains_key("authorization") {
                    AuthVerdict::NotMine
                } else {
                    accepted()
                }
            }
            Check::Granted => accepted(),
            Check::Missing(_) => AuthVerdict::NotMine,
            Check::Denied(reason) => AuthVerdict::Refused { reason },
        }
    }

    /// `/api/v1/apikeys` and `/api/v1/apikeys/keys/{n}`.
    ///
    /// `GET /api/v1/apikeys` answers every key pair, secrets included. **Warning** (seed
    /// 002): the `apikeys` read key that this needs therefore reveals every key,
    /// including the `apikeys` write key, and so grants everything.
    ///
    /// The principal is ignored: the `apikeys` area's own keys are checked here, whoever
    /// authenticated the request.
    fn http(&mut self, req: HttpRequest) -> HttpResponse {
        let segs: Vec<&str> = req.path.split('/').filter(|s| !s.is_empty()).collect();
        let method = req.method.to_ascii_uppercase();
        let (access, one) = match (method.as_str(), segs.as_slice()) {
            ("GET" | "HEAD", ["api", "v1", "apikeys"]) => (Access::Read, None),
            ("GET" | "HEAD", ["api", "v1", "apikeys", "keys", n]) => (Access::Read, Some(*n)),
            ("PUT", ["api", "v1", "apikeys", "keys", n]) => (Access::Write, Some(*n)),
            _ => {
                return HttpResponse::error(
                    404,
                    "not_found",
                    &format!("no route {} {}", req.method, req.path),
                );
            }
        };
        match check(
            Area::Apikeys,
            self.pair(Area::Apikeys),
            access,
            &req.headers,
        ) {
            Check::Open | Check::Granted => {}
            Check::Missing(why) | Check::Denied(why) => {
                return HttpResponse::error(401, "unauthorized", &why);
            }
        }
        let Some(n) = one else {
            return HttpResponse::json_text(200, self.document());
        };
        let Some(area) = area_at(n) else {
            return HttpResponse::error(
                404,
                "not_found",
                &format!(
                    "no key pair {n:?}: the pairs are numbered 0 to {}",
                    Area::ALL.len() - 1
                ),
            );
        };
        if access == Access::Read {
            return HttpResponse::json_text(200, self.pair_json(area));
        }
        self.put_pair(area, &req)
    }

    /// `PUT /api/v1/apikeys/keys/{n}` with a form body `rd=…` and/or `wr=…`.
    fn put_pair(&mut self, area: Area, req: &HttpRequest) -> HttpResponse {
        if !is_form(req.headers.get("content-type").map(String::as_str)) {
            return HttpResponse::error(
                415,
                "unsupported_media_type",
                &format!("the body must be {FORM_CONTENT_TYPE}, e.g. rd=mykey"),
            );
        }
        let (rd, wr) = match parse_form(&req.body) {
            Ok(f) => f,
            Err(why) => return HttpResponse::error(400, "bad_request", &why),
        };
        let mut pairs = self.pairs.clone();
        let pair = &mut pairs[area.index()];
        let mut changed = Vec::new();
        if let Some(rd) = rd {
            pair.rd = rd;
            changed.push("rd");
        }
        if let Some(wr) = wr {
            pair.wr = wr;
            changed.push("wr");
        }
        if let Err(e) = Self::store(&self.host, &pairs) {
            self.host
                .warn(&format!("{NAME}: could not store the changed keys: {e}"));
            return HttpResponse::error(500, "internal_error", "could not store the keys");
        }
        self.pairs = pairs;
        self.host.info(&format!(
            "{NAME}: the {} key of area {} changed (through {})",
            changed.join(" and "),
            area.name(),
            req.principal.key_id
        ));
        let p = self.pair(area);
        if p.rd.is_empty() {
            let what = if p.wr.is_empty() {
                "reads and writes"
            } else {
                "reads"
            };
            self.host.warn(&format!(
                "{NAME}: area {} is open: {what} need no key",
                area.name()
            ));
        } else if p.wr.is_empty() {
            self.host.warn(&format!(
                "{NAME}: area {}: writes need only the read key",
                area.name()
            ));
        }
        HttpResponse::json_text(200, self.pair_json(area))
    }
}

impl Plugin for HeaderKeys {
    const NAME: &'static str = NAME;

    fn create(config: serde_json::Value, host: Host) -> Result<Self, String> {
        let Config { domain } = connectord_plugin_sdk::settings(config)
            .map_err(|e| format!("{NAME}: invalid configuration: {e}"))?;
        if domain.is_empty() {
            return Err(format!("{NAME}: invalid configuration: domain is empty"));
        }
        let pairs = Self::load(&host)?;
        Ok(HeaderKeys {
            host,
            domain,
            pairs,
        })
    }
}

// The typed operations: the inherent methods of the same names (which take precedence in
// `Type::method` paths) do the work.
impl AuthPlugin for HeaderKeys {
    fn authenticate(&mut self, req: AuthRequest) -> Result<AuthVerdict, String> {
        Ok(HeaderKeys::authenticate(self, &req))
    }

    fn bootstrap(&mut self, _req: BootstrapRequest) -> Result<BootstrapResponse, String> {
        Ok(BootstrapResponse { created: None })
    }

    fn key_status(&mut self, req: KeyStatusRequest) -> Result<KeyStatusResponse, String> {
        // The backend has one identity, [`KEY_ID`], whatever the pairs are: it exists as
        // long as the backend does (a replaced pair changes what a request must carry, not
        // whose it is). Its principals hold neither `keys:write` nor `admin`, so they mint
        // no keys.
        let status = if req.key_id == KEY_ID {
            KeyState::Active
        } else {
            KeyState::Unknown
        };
        Ok(KeyStatusResponse {
            status,
            creator: None,
            restriction: None,
        })
    }
}

impl RoutesPlugin for HeaderKeys {
    fn routes(&mut self) -> Result<RoutesResponse, String> {
        let routes = [
            ("GET", APIKEYS_PATH),
            ("GET", APIKEY_ONE_PATH),
            ("PUT", APIKEY_ONE_PATH),
        ];
        Ok(RoutesResponse::with_scope(AUTHENTICATED, &routes))
    }

    fn http(&mut self, req: HttpRequest) -> Result<HttpResponse, String> {
        Ok(HeaderKeys::http(self, req))
    }
}

impl HeaderKeys {
    /// [`OP_SHOW_KEYS`]: the keys document as JSON text (its input, `{}`, may be left out).
    fn show_keys(
        &mut self,
        _req: Option<ShowKeysRequest>,
    ) -> Result<Box<serde_json::value::RawValue>, String> {
        self.host.info(&format!(
            "{NAME}: the keys document was shown ({OP_SHOW_KEYS})"
        ));
        serde_json::value::RawValue::from_string(self.document()).map_err(|e| e.to_string())
    }
}

declare_plugin!(HeaderKeys: auth + routes, operations {
    OP_SHOW_KEYS => HeaderKeys::show_keys,
});

#[cfg(test)]
mod tests;
