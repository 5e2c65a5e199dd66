//! The notification sink protocol: [`OP_VERIFY`] when a callback is registered,
//! [`OP_DELIVER`] for each batch. The host owns ordering, retry and the durable queue; a
//! sink only delivers one batch and says how it went.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const OP_VERIFY: &str = "verify";
pub const OP_DELIVER: &str = "deliver";

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
