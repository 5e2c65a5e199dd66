//! Management routes served by a plugin (for example `POST /api/api_tokens`).
//!
//! At load the host calls [`OP_ROUTES`]; the answer lists the routes the plugin serves and
//! the core scope each needs. A request on such a route is authenticated by the core like
//! any other and then handed to the plugin as [`OP_HTTP`]. JSON answers are built with
//! [`HttpResponse::json`] and [`HttpResponse::error`].

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

impl HttpResponse {
    /// A JSON answer: the header `content-type: application/json` (and no other; add any
    /// after construction) and `body` as compact JSON text.
    pub fn json(status: u16, body: &serde_json::Value) -> HttpResponse {
        HttpResponse::json_text(status, body.to_string())
    }

    /// A JSON answer whose body is JSON text already, such as a struct serialized in its
    /// field order (a [`serde_json::Value`] would sort the fields): as
    /// [`HttpResponse::json`], with `body` as is.
    pub fn json_text(status: u16, body: String) -> HttpResponse {
        HttpResponse {
            status,
            headers: [("content-type".to_string(), "application/json".to_string())].into(),
            body,
        }
    }

    /// A JSON error answer: `{"type": kind, "message": message}`, as [`HttpResponse::json`].
    pub fn error(status: u16, kind: &str, message: &str) -> HttpResponse {
        HttpResponse::json(
            status,
            &serde_json::json!({"type": kind, "message": message}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_answers() {
        let r = HttpResponse::json(201, &serde_json::json!({"b": 1, "a": [true, null]}));
        assert_eq!(r.status, 201);
        assert_eq!(
            r.headers,
            BTreeMap::from([("content-type".to_string(), "application/json".to_string())])
        );
        assert_eq!(r.body, r#"{"a":[true,null],"b":1}"#);

        let r = HttpResponse::json_text(200, r#"{"z":1,"a":2}"#.to_string());
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.body, r#"{"z":1,"a":2}"#);

        let r = HttpResponse::error(404, "not_found", "no \"such\" thing");
        assert_eq!(r.status, 404);
        assert_eq!(r.headers.len(), 1);
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(
            r.body,
            r#"{"message":"no \"such\" thing","type":"not_found"}"#
        );
    }
}
