//! Management routes served by a plugin (for example `POST /api/api_tokens`).
//!
//! At load the host calls [`OP_ROUTES`]; the answer lists the routes the plugin serves and
//! the core scope each needs. A request on such a route is authenticated by the core like
//! any other and then handed to the plugin as [`OP_HTTP`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const OP_ROUTES: &str = "routes";
pub const OP_HTTP: &str = "http";

/// A route "scope" that lets any authenticated caller through to the plugin.
pub const AUTHENTICATED: &str = "authenticated";

/// One route: an exact method and a path pattern whose `{name}` segments match any one
/// segment (the path is matched after the optional `/v1` or `/v2` prefix is removed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub method: String,
    pub path: String,
    /// The core scope the caller needs (`admin`, `endpoints:read`, ...), or
    /// [`AUTHENTICATED`]: any authenticated caller, the plugin checks permissions itself.
    pub scope: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RoutesResponse {
    pub routes: Vec<Route>,
}

/// A request on one of the plugin's routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRequest {
    pub method: String,
    /// Without the `/v1` or `/v2` prefix.
    pub path: String,
    pub query: Option<String>,
    /// Header names lower-case.
    pub headers: BTreeMap<String, String>,
    /// The body as text (UTF-8; a body that is not is refused with 400 by the host).
    pub body: String,
    /// The authenticated caller.
    pub principal: crate::auth::PrincipalSpec,
}

/// The plugin's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpResponse {
    pub status: u16,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: String,
}
