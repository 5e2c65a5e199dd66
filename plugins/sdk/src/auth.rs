//! The auth backend protocol: operation [`OP_AUTHENTICATE`] with an [`AuthRequest`],
//! answered by an [`AuthVerdict`]; [`OP_BOOTSTRAP`] at start; [`OP_KEY_STATUS`], by which the
//! host checks that the key that minted another is still valid. Also the core scope names
//! ([`SCOPES`]) and the parsing of `Authorization: Bearer` ([`bearer_token`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Is this request's credential yours, and whose is it?
pub const OP_AUTHENTICATE: &str = "authenticate";
/// Called once at start with a [`BootstrapRequest`]: a backend that has no credential at
/// all may create a first admin credential and return it in a [`BootstrapResponse`]; the
/// host writes it to a file only the daemon's user can read and logs where.
pub const OP_BOOTSTRAP: &str = "bootstrap";

/// Is this key still valid? Asked by the host, with a [`KeyStatusRequest`], of the backend
/// a [`PrincipalSpec::creator`] names; answered by a [`KeyStatusResponse`]. It must change
/// nothing. A backend that does not answer it (an error, such as "unknown operation")
/// cannot vouch for its keys: keys they minted are refused (503) rather than trusted.
pub const OP_KEY_STATUS: &str = "key_status";

/// The core scope that stands for every other.
pub const ADMIN: &str = "admin";

/// The core scope that lets a key create keys (`POST /api/api_tokens`) and delete the keys
/// it created, never granting more than it holds itself.
pub const KEYS_WRITE: &str = "keys:write";

/// The core scope that lets a key scrape `GET /metrics` and nothing else (a monitoring
/// system's key); [`ADMIN`] implies it.
pub const METRICS_READ: &str = "metrics:read";

/// The scopes that open the data routes (endpoints, resources, subscriptions,
/// notifications, limits): every core scope but [`KEYS_WRITE`], [`METRICS_READ`] and
/// [`ADMIN`].
pub const DATA_SCOPES: [&str; 7] = [
    "endpoints:read",
    "resources:read",
    "resources:write",
    "subscriptions:read",
    "subscriptions:write",
    "notifications",
    "limits:read",
];

/// Every core scope but [`ADMIN`], in canonical order: [`DATA_SCOPES`], then
/// [`KEYS_WRITE`], then [`METRICS_READ`].
pub const NON_ADMIN_SCOPES: [&str; 9] = concat(&DATA_SCOPES, &[KEYS_WRITE, METRICS_READ]);

/// Every core scope, in canonical order: [`NON_ADMIN_SCOPES`], then [`ADMIN`].
pub const SCOPES: [&str; 10] = concat(&NON_ADMIN_SCOPES, &[ADMIN]);

/// `head` then `tail` as one array, at compile time; a length `N` that is not the sum of
/// theirs fails the build.
const fn concat<const N: usize>(head: &[&'static str], tail: &[&'static str]) -> [&'static str; N] {
    assert!(head.len() + tail.len() == N, "concat: wrong length");
    let mut all = [""; N];
    let mut i = 0;
    while i < N {
        all[i] = if i < head.len() {
            head[i]
        } else {
            tail[i - head.len()]
        };
        i += 1;
    }
    all
}

/// The token of an `Authorization: Bearer <token>` header (`headers` as in
/// [`AuthRequest::headers`], names lower-case): the scheme is matched case-insensitively
/// and surrounding spaces are trimmed. `None` for no header, another scheme, or an empty
/// token.
pub fn bearer_token(headers: &BTreeMap<String, String>) -> Option<&str> {
    let value = headers.get("authorization")?.trim();
    let (scheme, token) = value.split_once(|c: char| c.is_ascii_whitespace())?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

/// What the backend sees of a REST request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthRequest {
    pub method: String,
    pub path: String,
    /// Header names lower-case; a repeated header's values joined with ", ".
    pub headers: BTreeMap<String, String>,
}

/// The caller, when the backend accepts the credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrincipalSpec {
    /// The backend's id of the credential (never the secret).
    pub key_id: String,
    /// The one domain the caller sees.
    pub domain: String,
    /// Core scopes: any of [`SCOPES`] (`endpoints:read`, `resources:read`,
    /// `resources:write`, `subscriptions:read`, `subscriptions:write`, `notifications`,
    /// `limits:read`, `keys:write`, `metrics:read`, `admin`).
    pub scopes: Vec<String>,
    /// Optional restriction to some endpoints and resources: patterns
    /// `<endpoint glob>[/<resource path glob>]` where `*` matches any run of characters,
    /// e.g. `sensor-*` (every resource of matching endpoints) or `sensor-*/3303/*`. None:
    /// no restriction. The core refuses (403) endpoint, resource and subscription routes
    /// outside them, leaves such endpoints and resources out of its lists, and routes to
    /// the key's notification channel only the events about endpoints and resources they
    /// allow (recorded with the channel at each authentication: the newest verdict wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    /// The key that created this one (a key minted through another key, such as
    /// `POST /api/api_tokens`), in whatever backend. The host accepts the verdict only if
    /// that key, and the key that created it in turn, and so on, are still valid
    /// ([`OP_KEY_STATUS`]): a key dies with its creator. None: not minted by a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<KeyRef>,
}

/// A key of some backend: the backend's plugin name and its id for the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyRef {
    pub backend: String,
    pub key_id: String,
}

/// Input of [`OP_KEY_STATUS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatusRequest {
    /// An id the backend gave as [`PrincipalSpec::key_id`].
    pub key_id: String,
}

/// Answer of [`OP_KEY_STATUS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatusResponse {
    pub status: KeyState,
    /// The key's own creator, when it was minted by a key (as [`PrincipalSpec::creator`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<KeyRef>,
    /// The key's restriction now, as [`PrincipalSpec::allow`] would give it, for a backend
    /// whose keys can be restricted and changed: the host records it on the key's
    /// notification channel, so that a key narrowed in its backend gets nothing more
    /// outside its new restriction even if it makes no request of its own (a key that
    /// takes its events through a callback URL). Absent (`None`): the backend does not
    /// say, and the channel keeps the restriction of the key's latest request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restriction: Option<Restriction>,
}

/// A key's current restriction ([`KeyStatusResponse::restriction`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restriction {
    /// As [`PrincipalSpec::allow`]: `None` (JSON `null` or absent) is no restriction.
    #[serde(default)]
    pub allow: Option<Vec<String>>,
}

/// Whether a key would authenticate now (its own creator aside, which the host checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// It would be accepted.
    Active,
    /// The backend knows it, and would refuse it (revoked, expired, its application or
    /// user gone).
    Revoked,
    /// The backend has no such key (never had, or it was deleted).
    Unknown,
}

/// The backend's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum AuthVerdict {
    /// Not a credential of this backend: the host asks the next one.
    NotMine,
    Accepted {
        principal: PrincipalSpec,
        /// Lets the host reuse this verdict for a while (see [`VerdictCache`]); `None`:
        /// ask again for every request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cache: Option<VerdictCache>,
    },
    /// This backend's credential, but not valid (revoked, expired, wrong secret).
    Refused { reason: String },
}

/// A backend's leave to the host to reuse an accepted verdict, so that a REST request
/// need not be a plugin call: for up to `ttl_ms` (the host caps it at
/// [`MAX_VERDICT_TTL_MS`]), a request that carries the same values of `headers`
/// (lower-case names; an absent header is a value too) gets the same principal without the
/// backend, or those before it in the chain, being asked. The host forgets every reused
/// verdict whenever any plugin runs an operation that may change its state (anything but
/// authenticate, key_status, verify and deliver) and whenever a plugin is loaded again. A backend
/// whose verdict depends on the method, the path, or on time within the window (keys that
/// expire) must not give one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictCache {
    pub headers: Vec<String>,
    pub ttl_ms: u32,
}

/// Longest reuse of a verdict the host allows, whatever a backend asks.
pub const MAX_VERDICT_TTL_MS: u32 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapRequest {
    /// The domain a first admin credential belongs to.
    pub domain: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BootstrapResponse {
    /// The secret of a credential created now (shown once), if one was.
    pub created: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_verdicts_with_and_without_a_cache_hint() {
        // Plugins built before the hint existed answer without it.
        let old: AuthVerdict = serde_json::from_str(
            r#"{"verdict":"accepted","principal":{"key_id":"k","domain":"d","scopes":[]}}"#,
        )
        .unwrap();
        assert!(matches!(old, AuthVerdict::Accepted { cache: None, .. }));
        let new: AuthVerdict = serde_json::from_str(
            r#"{"verdict":"accepted","principal":{"key_id":"k","domain":"d","scopes":[]},
                "cache":{"headers":["authorization"],"ttl_ms":1000}}"#,
        )
        .unwrap();
        let AuthVerdict::Accepted { cache: Some(c), .. } = new else {
            panic!("no cache hint: {new:?}");
        };
        assert_eq!(
            (c.headers, c.ttl_ms),
            (vec!["authorization".to_string()], 1000)
        );
        // Without a hint nothing extra is written.
        let v = AuthVerdict::Accepted {
            principal: PrincipalSpec {
                key_id: "k".into(),
                domain: "d".into(),
                scopes: vec![],
                allow: None,
                creator: None,
            },
            cache: None,
        };
        assert!(!serde_json::to_string(&v).unwrap().contains("cache"));
    }

    #[test]
    fn scope_lists() {
        let all = "endpoints:read resources:read resources:write subscriptions:read \
                   subscriptions:write notifications limits:read keys:write metrics:read admin";
        assert_eq!(SCOPES.join(" "), all);
        assert_eq!(SCOPES[..9], NON_ADMIN_SCOPES);
        assert_eq!(NON_ADMIN_SCOPES[..7], DATA_SCOPES);
        assert_eq!(NON_ADMIN_SCOPES[7], KEYS_WRITE);
        assert_eq!(NON_ADMIN_SCOPES[8], METRICS_READ);
        assert_eq!(SCOPES[9], ADMIN);
    }

    #[test]
    fn bearer_token_parsing() {
        let headers = |v: &str| BTreeMap::from([("authorization".to_string(), v.to_string())]);
        assert_eq!(bearer_token(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&headers(" bearer  abc ")), Some("abc"));
        assert_eq!(bearer_token(&headers("BEARER\tabc")), Some("abc"));
        assert_eq!(bearer_token(&headers("Bearer")), None);
        assert_eq!(bearer_token(&headers("Bearer ")), None);
        assert_eq!(bearer_token(&headers("Bearerabc")), None);
        assert_eq!(bearer_token(&headers("Token abc")), None);
        assert_eq!(bearer_token(&headers("")), None);
        assert_eq!(bearer_token(&BTreeMap::new()), None);
    }
}
