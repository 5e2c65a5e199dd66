//! Who is calling the REST API, and what they may do.
//!
//! The core knows [`Principal`]s: a backend's verdict on a credential, with the domain the
//! caller belongs to and the core scopes it holds. Backends are asked in order by the
//! [`AuthChain`]; the first that recognises the credential decides. Today the one backend
//! is [`keys::CoreKeys`] (Bearer access keys); the plugin issue turns backends into plugins
//! behind this same [`AuthBackend`] seam.
//!
//! Architecture invariant: routes never look at headers to authorise; they name the
//! [`Scope`] they need and the router checks it against the principal.

pub mod keys;

use std::sync::Arc;

pub use keys::{AccessKeyRecord, CoreKeys};

/// What a route needs. A principal with `admin` holds every scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    EndpointsRead,
    ResourcesRead,
    ResourcesWrite,
    SubscriptionsRead,
    SubscriptionsWrite,
    Notifications,
    LimitsRead,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::EndpointsRead => "endpoints:read",
            Scope::ResourcesRead => "resources:read",
            Scope::ResourcesWrite => "resources:write",
            Scope::SubscriptionsRead => "subscriptions:read",
            Scope::SubscriptionsWrite => "subscriptions:write",
            Scope::Notifications => "notifications",
            Scope::LimitsRead => "limits:read",
            Scope::Admin => "admin",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The backend that recognised the credential.
    pub backend: String,
    /// The backend's id for the credential (never the secret).
    pub key_id: String,
    /// The only domain whose endpoints, subscriptions and events this caller sees.
    pub domain: String,
    /// Core scope names.
    pub scopes: Vec<String>,
}

impl Principal {
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes
            .iter()
            .any(|s| s == scope.as_str() || s == Scope::Admin.as_str())
    }
}

/// A backend's answer about one request's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not a credential this backend knows: ask the next one.
    NotMine,
    Accepted(Principal),
    /// This backend's credential, but not valid (revoked, expired, wrong secret).
    Refused(String),
}

/// One way of recognising callers.
pub trait AuthBackend: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn authenticate(&self, headers: &http::HeaderMap) -> Verdict;
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unauthenticated(pub String);

/// The configured backends, asked in order.
#[derive(Clone, Default)]
pub struct AuthChain {
    backends: Vec<Arc<dyn AuthBackend>>,
}

impl AuthChain {
    pub fn new(backends: Vec<Arc<dyn AuthBackend>>) -> AuthChain {
        AuthChain { backends }
    }

    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<Principal, Unauthenticated> {
        for b in &self.backends {
            match b.authenticate(headers) {
                Verdict::NotMine => continue,
                Verdict::Accepted(p) => return Ok(p),
                Verdict::Refused(why) => return Err(Unauthenticated(why)),
            }
        }
        Err(Unauthenticated(
            "missing or unknown credentials: send Authorization: Bearer <access key>".into(),
        ))
    }
}

/// The token of an `Authorization: Bearer <token>` header, if there is one.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}
