//! The auth backend protocol: operation [`OP_AUTHENTICATE`] with an [`AuthRequest`],
//! answered by an [`AuthVerdict`]; and [`OP_BOOTSTRAP`] at start.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Is this request's credential yours, and whose is it?
pub const OP_AUTHENTICATE: &str = "authenticate";
/// Called once at start with a [`BootstrapRequest`]: a backend that has no credential at
/// all may create a first admin credential and return it in a [`BootstrapResponse`]; the
/// host writes it to a file only the daemon's user can read and logs where.
pub const OP_BOOTSTRAP: &str = "bootstrap";

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
    /// Core scopes: `endpoints:read`, `resources:read`, `resources:write`,
    /// `subscriptions:read`, `subscriptions:write`, `notifications`, `limits:read`, `admin`.
    pub scopes: Vec<String>,
    /// Optional restriction to some endpoints and resources: patterns
    /// `<endpoint glob>[/<resource path glob>]` where `*` matches any run of characters,
    /// e.g. `sensor-*` (every resource of matching endpoints) or `sensor-*/3303/*`. None:
    /// no restriction. The core refuses (403) endpoint, resource and subscription routes
    /// outside them and leaves such endpoints out of `GET /endpoints`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
}

/// The backend's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum AuthVerdict {
    /// Not a credential of this backend: the host asks the next one.
    NotMine,
    Accepted {
        principal: PrincipalSpec,
    },
    /// This backend's credential, but not valid (revoked, expired, wrong secret).
    Refused {
        reason: String,
    },
}

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
