//! The notification sink protocol: [`OP_SCHEMES`] once at start (the callback URL schemes
//! the sink takes), [`OP_VERIFY`] when a callback is registered, [`OP_DELIVER`] for each
//! batch. The host owns ordering, retry and the durable queue; a sink only delivers one
//! batch and says how it went.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const OP_VERIFY: &str = "verify";
pub const OP_DELIVER: &str = "deliver";
pub const OP_SCHEMES: &str = "schemes";

/// What a sink that does not answer [`OP_SCHEMES`] takes (the SDK's default, and the
/// host's for a plugin file built before the operation existed): HTTP callbacks.
pub const DEFAULT_SCHEMES: &[&str] = &["http", "https"];

/// [`OP_SCHEMES`] answer (no input): the URL schemes (`https`, `mqtt`, lower case, without
/// `://`) of the callbacks this sink delivers. The host sends a callback to the first sink
/// of `[plugins] sinks` that lists its URL's scheme.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemesResponse {
    pub schemes: Vec<String>,
}

impl Default for SchemesResponse {
    fn default() -> Self {
        SchemesResponse {
            schemes: DEFAULT_SCHEMES.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Where a key's notifications go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// [`OP_VERIFY`] input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRequest {
    pub target: Target,
}

/// [`OP_VERIFY`] answer: `ok`, or the reason shown to the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// [`OP_DELIVER`] input: one notification message (a JSON document, as text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverRequest {
    pub target: Target,
    pub body: String,
    /// The id of the access key whose events these are, as its auth backend names it
    /// (never the secret): a sink may use it to keep keys apart (the MQTT sink's topics).
    /// `None` from a host older than the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

/// [`OP_DELIVER`] answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum DeliverResponse {
    Accepted,
    /// Try again later.
    Retry {
        reason: String,
    },
    /// Refused for good: the batch is discarded and counted.
    Refused {
        reason: String,
    },
}

/// A callback URL as a log line or a reason may show it: the password of its user
/// information (`user:pw@`, which an `mqtt://` URL carries the broker's credentials in)
/// replaced by `***`.
pub fn redact_url(url: &str) -> std::borrow::Cow<'_, str> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.into();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority
        .rsplit_once('@')
        .and_then(|(info, host)| Some((info.split_once(':')?.0, host)))
    {
        Some((user, host)) => format!("{scheme}://{user}:***@{host}{tail}").into(),
        None => url.into(),
    }
}
