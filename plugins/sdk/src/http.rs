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
    /// The `type` of the errors the host answers on this route itself, before or instead
    /// of the plugin (no or a refused credential, a missing scope, an unavailable backend,
    /// a body too large, late or not UTF-8), so that they are spelled as the plugin's own
    /// API spells its errors. Absent: the core's spelling, [`ErrorTypes::default`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<ErrorTypes>,
}

impl Route {
    /// A route for `method` on `path` that needs `scope`, with the core's spelling of the
    /// errors the host answers on it (set [`Route::errors`] for the plugin's own).
    pub fn new(method: &str, path: &str, scope: &str) -> Route {
        Route {
            method: method.to_string(),
            path: path.to_string(),
            scope: scope.to_string(),
            errors: None,
        }
    }
}

/// The `type` of each error the host may answer on a plugin's route (the body is always
/// `{"type", "message"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorTypes {
    /// 400: the body is not UTF-8.
    pub bad_request: String,
    /// 401: no credential, or one no backend accepts.
    pub unauthorized: String,
    /// 403: the credential lacks the route's scope.
    pub forbidden: String,
    /// 408: the body did not arrive in time.
    pub request_timeout: String,
    /// 413: the body is larger than `requests.max_body`.
    pub payload_too_large: String,
    /// 503: an auth backend could not answer.
    pub unavailable: String,
    /// 429: the client's address failed authentication too often
    /// (`rest.auth_failures_per_minute`). Absent from a plugin built before it:
    /// `too_many_requests`.
    #[serde(default = "too_many_requests")]
    pub too_many_requests: String,
}

fn too_many_requests() -> String {
    "too_many_requests".into()
}

impl Default for ErrorTypes {
    /// The core REST API's spelling: `unauthorized`, `forbidden`, ….
    fn default() -> ErrorTypes {
        ErrorTypes {
            bad_request: "bad_request".into(),
            unauthorized: "unauthorized".into(),
            forbidden: "forbidden".into(),
            request_timeout: "request_timeout".into(),
            payload_too_large: "payload_too_large".into(),
            unavailable: "unavailable".into(),
            too_many_requests: too_many_requests(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RoutesResponse {
    pub routes: Vec<Route>,
}

impl RoutesResponse {
    /// These `(method, path)` routes, in this order, each needing `scope` ([`Route::new`]).
    pub fn with_scope(scope: &str, routes: &[(&str, &str)]) -> RoutesResponse {
        RoutesResponse {
            routes: routes
                .iter()
                .map(|(method, path)| Route::new(method, path, scope))
                .collect(),
        }
    }
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
    /// The auth backend that accepted the caller (its plugin name): with
    /// `principal.key_id`, what a key minted by this request records as its
    /// [`crate::auth::PrincipalSpec::creator`]. Empty from hosts that predate it.
    #[serde(default)]
    pub backend: String,
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

/// Whether a `Content-Type` value names JSON: `application/json` or any `+json` suffix
/// (`application/merge-patch+json`), with or without parameters, case-insensitive. An
/// absent header counts as JSON: the official SDKs sometimes send none.
pub fn is_json_content_type(content_type: Option<&str>) -> bool {
    let Some(value) = content_type else {
        return true;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind == "application" && (subtype == "json" || subtype.ends_with("+json"))
}

/// A JSON route's check of its `Content-Type` ([`is_json_content_type`]): the message of
/// its 415 when the header is present and not JSON.
pub fn refuse_non_json(content_type: Option<&str>) -> Result<(), String> {
    match content_type {
        Some(ct) if !is_json_content_type(content_type) => Err(format!(
            "the request body must be JSON (Content-Type application/json), not {ct:?}"
        )),
        _ => Ok(()),
    }
}

/// A JSON body that must be an object: its fields, or the message of a 400 (not JSON, or
/// JSON but not an object). `empty` is what an empty (or blank) body counts as: `None`
/// refuses it.
pub fn json_object(
    body: &str,
    empty: Option<serde_json::Map<String, serde_json::Value>>,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    if body.trim().is_empty() {
        return empty.ok_or_else(|| "the request body must be a JSON object".to_string());
    }
    match serde_json::from_str(body) {
        Ok(serde_json::Value::Object(fields)) => Ok(fields),
        Ok(_) => Err("the request body must be a JSON object".to_string()),
        Err(e) => Err(format!("the request body is not valid JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_with_one_scope_keep_their_order() {
        let got = RoutesResponse::with_scope("keys:write", &[("GET", "/a"), ("DELETE", "/a/{id}")]);
        let want = vec![
            Route {
                method: "GET".into(),
                path: "/a".into(),
                scope: "keys:write".into(),
                errors: None,
            },
            Route {
                method: "DELETE".into(),
                path: "/a/{id}".into(),
                scope: "keys:write".into(),
                errors: None,
            },
        ];
        assert_eq!(got.routes, want);
        assert_eq!(Route::new("GET", "/a", "keys:write"), want[0]);
    }

    #[test]
    fn json_content_types() {
        for ok in [
            None,
            Some("application/json"),
            Some("Application/JSON; charset=utf-8"),
            Some("application/merge-patch+json"),
            Some(" application/vnd.api+json ;x=1"),
        ] {
            assert!(is_json_content_type(ok), "{ok:?}");
            assert_eq!(refuse_non_json(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            Some(""),
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("text/json"),
            Some("application/jsonx"),
            Some("json"),
        ] {
            assert!(!is_json_content_type(bad), "{bad:?}");
            let why = refuse_non_json(bad).unwrap_err();
            assert!(why.contains(&format!("{:?}", bad.unwrap())), "{why}");
        }
    }

    #[test]
    fn json_objects_only() {
        assert_eq!(json_object(r#"{"a":1}"#, None).unwrap()["a"], 1);
        assert!(
            json_object(" ", Some(Default::default()))
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            json_object(" ", None),
            Err("the request body must be a JSON object".to_string())
        );
        for not_object in [
            "[]",
            r#"["n", null, ["admin"]]"#,
            "1",
            "\"x\"",
            "null",
            "true",
        ] {
            assert_eq!(
                json_object(not_object, None),
                Err("the request body must be a JSON object".to_string()),
                "{not_object}"
            );
        }
        assert!(
            json_object("{", None)
                .unwrap_err()
                .starts_with("the request body is not valid JSON")
        );
    }

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
