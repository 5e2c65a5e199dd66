//! Which route a method and path are, and the scope each needs.
//!
//! Paths are taken at `/v2/…`, `/v1/…` and unprefixed alike. Path segments are
//! percent-decoded; an endpoint name may therefore hold any character but `/`.

use std::borrow::Cow;

use http::{Method, StatusCode};
use percent_encoding::percent_decode_str;

use super::reply::{Reply, error};
use crate::auth::Scope;

/// A resolved route, with its decoded path parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /`: version text.
    Root,
    /// `GET /rest-versions`.
    RestVersions,
    /// `GET /endpoints`.
    Endpoints,
    /// `GET|DELETE /endpoints/{endpoint-name}`.
    Endpoint(String),
    /// `GET|PUT|POST|DELETE /endpoints/{endpoint-name}/{resource-path}`.
    Resource { ep: String, path: String },
    /// `GET /notification/pull`.
    NotificationPull,
    /// `PUT|GET|DELETE /notification/callback`.
    NotificationCallback,
    /// `PUT|GET|DELETE /notification/websocket` (Pelion's WebSocket channel, issue 23).
    NotificationWebsocket,
    /// `GET /notification/websocket-connect`: the channel's socket.
    NotificationWebsocketConnect,
    /// `PUT|GET /subscriptions` (pre-subscriptions), `DELETE /subscriptions` (all).
    Subscriptions,
    /// `GET|DELETE /subscriptions/{endpoint-name}`.
    EndpointSubscriptions(String),
    /// `PUT|GET|DELETE /subscriptions/{endpoint-name}/{resource-path}`.
    Subscription { ep: String, path: String },
    /// `GET /metrics` (Prometheus).
    Metrics,
    /// `GET /limits`.
    Limits,
    /// `GET /cluster`: the store backend, this node, the members.
    Cluster,
    /// `GET /openapi.json`: the OpenAPI document of the REST API.
    OpenApi,
    /// `POST /api/cert`.
    Cert,
    /// `GET /device-credentials`.
    DeviceCredentials,
    /// `GET|PUT|DELETE /device-credentials/{endpoint-name}`.
    DeviceCredential(String),
    /// `POST /device-requests/{device-id}` (Pelion's Connect API, issue 23).
    DeviceRequest(String),
    /// A route served by a plugin (`path` without the version prefix).
    Plugin { plugin: String, path: String },
    /// `GET /console` (`""`) and `GET /console/{asset}`: the web console's files, which
    /// need no key (see `console`). Served unprefixed only.
    Console(String),
}

/// The percent-decoded path without its `/v1` or `/v2` prefix (`/` for the root).
pub fn unversioned(path: &str) -> Option<String> {
    Some(slash_joined(unprefixed(&split(path)?)))
}

/// `/a/b/c` of the segments `a`, `b`, `c`; `/` of none.
fn slash_joined<S: AsRef<str>>(segments: &[S]) -> String {
    if segments.is_empty() {
        return "/".into();
    }
    let mut path = String::with_capacity(segments.iter().map(|s| s.as_ref().len() + 1).sum());
    for s in segments {
        path.push('/');
        path.push_str(s.as_ref());
    }
    path
}

/// The segments after a `v1` or `v2` prefix (all of them without one).
fn unprefixed<'a, 'p>(segments: &'a [Cow<'p, str>]) -> &'a [Cow<'p, str>] {
    match segments.first().map(|s| &**s) {
        Some("v1" | "v2") => &segments[1..],
        _ => segments,
    }
}

/// Every core route as (method, path template), the templates as the OpenAPI document
/// (`docs/openapi.json`) writes them, under `/v2` (each is also served at `/v1` and
/// unprefixed). Plugin routes come from the plugins (`PluginHost::routes`). A test keeps
/// this table, the router and the OpenAPI document in step.
pub const CORE_ROUTES: &[(&str, &str)] = &[
    ("GET", "/v2"),
    ("GET", "/v2/rest-versions"),
    ("GET", "/v2/endpoints"),
    ("GET", "/v2/endpoints/{endpoint-name}"),
    ("DELETE", "/v2/endpoints/{endpoint-name}"),
    ("GET", "/v2/endpoints/{endpoint-name}/{resource-path}"),
    ("PUT", "/v2/endpoints/{endpoint-name}/{resource-path}"),
    ("POST", "/v2/endpoints/{endpoint-name}/{resource-path}"),
    ("DELETE", "/v2/endpoints/{endpoint-name}/{resource-path}"),
    ("GET", "/v2/notification/pull"),
    ("GET", "/v2/notification/callback"),
    ("PUT", "/v2/notification/callback"),
    ("DELETE", "/v2/notification/callback"),
    ("GET", "/v2/notification/websocket"),
    ("PUT", "/v2/notification/websocket"),
    ("DELETE", "/v2/notification/websocket"),
    ("GET", "/v2/notification/websocket-connect"),
    ("GET", "/v2/subscriptions"),
    ("PUT", "/v2/subscriptions"),
    ("DELETE", "/v2/subscriptions"),
    ("GET", "/v2/subscriptions/{endpoint-name}"),
    ("DELETE", "/v2/subscriptions/{endpoint-name}"),
    ("GET", "/v2/subscriptions/{endpoint-name}/{resource-path}"),
    ("PUT", "/v2/subscriptions/{endpoint-name}/{resource-path}"),
    (
        "DELETE",
        "/v2/subscriptions/{endpoint-name}/{resource-path}",
    ),
    ("GET", "/v2/limits"),
    ("GET", "/v2/cluster"),
    ("POST", "/v2/api/cert"),
    ("GET", "/v2/metrics"),
    ("GET", "/v2/openapi.json"),
    ("GET", "/v2/device-credentials"),
    ("GET", "/v2/device-credentials/{endpoint-name}"),
    ("PUT", "/v2/device-credentials/{endpoint-name}"),
    ("DELETE", "/v2/device-credentials/{endpoint-name}"),
    ("POST", "/v2/device-requests/{device-id}"),
    // The web console: no key needed, not under /v1 or /v2.
    ("GET", "/console"),
    ("GET", "/console/{asset}"),
];

/// Resolves a request to a route and the scope it needs, or a ready 404/405 reply.
pub fn resolve(method: &Method, path: &str) -> Result<(Route, Scope), Reply> {
    let segments = match split(path) {
        Some(s) => s,
        None => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "path is not valid UTF-8 after percent-decoding",
            ));
        }
    };
    // The console's files: before the version prefix is stripped (it has none).
    if segments.first().map(|s| &**s) == Some("console") {
        return match (
            *method == Method::GET || *method == Method::HEAD,
            &segments[1..],
        ) {
            (false, _) => Err(super::console::secured(method_not_allowed("GET, HEAD"))),
            (true, []) => Ok((Route::Console(String::new()), Scope::EndpointsRead)),
            (true, [asset]) => Ok((Route::Console(asset.to_string()), Scope::EndpointsRead)),
            (true, _) => Err(super::console::no_such_file()),
        };
    }
    let parts: Vec<&str> = unprefixed(&segments).iter().map(|s| &**s).collect();
    let read = |route: Route, scope: Scope| {
        if *method == Method::GET || *method == Method::HEAD {
            Ok((route, scope))
        } else {
            Err(method_not_allowed("GET, HEAD"))
        }
    };
    match parts.as_slice() {
        [] => read(Route::Root, Scope::EndpointsRead),
        ["rest-versions"] => read(Route::RestVersions, Scope::EndpointsRead),
        ["endpoints"] => read(Route::Endpoints, Scope::EndpointsRead),
        ["endpoints", name] => {
            let route = Route::Endpoint((*name).to_string());
            match *method {
                Method::GET | Method::HEAD => Ok((route, Scope::EndpointsRead)),
                // Removing a registration is a write on the device's resources.
                Method::DELETE => Ok((route, Scope::ResourcesWrite)),
                _ => Err(method_not_allowed("GET, HEAD, DELETE")),
            }
        }
        ["endpoints", name, rest @ ..] => {
            let route = Route::Resource {
                ep: (*name).to_string(),
                path: slash_joined(rest),
            };
            match *method {
                Method::GET => Ok((route, Scope::ResourcesRead)),
                Method::PUT | Method::POST | Method::DELETE => Ok((route, Scope::ResourcesWrite)),
                _ => Err(method_not_allowed("GET, PUT, POST, DELETE")),
            }
        }
        ["notification", "pull"] => read(Route::NotificationPull, Scope::Notifications),
        ["notification", "callback"] => match *method {
            Method::GET | Method::PUT | Method::DELETE => {
                Ok((Route::NotificationCallback, Scope::Notifications))
            }
            _ => Err(method_not_allowed("GET, PUT, DELETE")),
        },
        ["notification", "websocket"] => match *method {
            Method::GET | Method::PUT | Method::DELETE => {
                Ok((Route::NotificationWebsocket, Scope::Notifications))
            }
            _ => Err(method_not_allowed("GET, PUT, DELETE")),
        },
        ["notification", "websocket-connect"] => match *method {
            Method::GET => Ok((Route::NotificationWebsocketConnect, Scope::Notifications)),
            _ => Err(method_not_allowed("GET")),
        },
        ["subscriptions"] => match *method {
            Method::GET => Ok((Route::Subscriptions, Scope::SubscriptionsRead)),
            Method::PUT | Method::DELETE => Ok((Route::Subscriptions, Scope::SubscriptionsWrite)),
            _ => Err(method_not_allowed("GET, PUT, DELETE")),
        },
        ["subscriptions", ep] => {
            let route = Route::EndpointSubscriptions((*ep).to_string());
            match *method {
                Method::GET => Ok((route, Scope::SubscriptionsRead)),
                Method::DELETE => Ok((route, Scope::SubscriptionsWrite)),
                _ => Err(method_not_allowed("GET, DELETE")),
            }
        }
        ["subscriptions", ep, rest @ ..] => {
            let route = Route::Subscription {
                ep: (*ep).to_string(),
                path: slash_joined(rest),
            };
            match *method {
                Method::GET => Ok((route, Scope::SubscriptionsRead)),
                Method::PUT | Method::DELETE => Ok((route, Scope::SubscriptionsWrite)),
                _ => Err(method_not_allowed("GET, PUT, DELETE")),
            }
        }
        ["metrics"] => read(Route::Metrics, Scope::MetricsRead),
        ["limits"] => read(Route::Limits, Scope::LimitsRead),
        // An operator's route, as `/metrics` (a monitoring key, or admin).
        ["cluster"] => read(Route::Cluster, Scope::MetricsRead),
        ["openapi.json"] => read(Route::OpenApi, Scope::EndpointsRead),
        ["api", "cert"] => match *method {
            Method::POST => Ok((Route::Cert, Scope::ResourcesWrite)),
            _ => Err(method_not_allowed("POST")),
        },
        ["device-credentials"] => read(Route::DeviceCredentials, Scope::EndpointsRead),
        ["device-credentials", ep] => {
            let route = Route::DeviceCredential((*ep).to_string());
            match *method {
                Method::GET | Method::HEAD => Ok((route, Scope::EndpointsRead)),
                // Provisioning a device, as POST /api/cert.
                Method::PUT | Method::DELETE => Ok((route, Scope::ResourcesWrite)),
                _ => Err(method_not_allowed("GET, HEAD, PUT, DELETE")),
            }
        }
        // The body says read or write: `dispatch` lets in `resources:read` or
        // `resources:write`, and the handler asks for the one the body's method needs.
        ["device-requests", ep] => match *method {
            Method::POST => Ok((
                Route::DeviceRequest((*ep).to_string()),
                Scope::ResourcesRead,
            )),
            _ => Err(method_not_allowed("POST")),
        },
        _ => Err(error(StatusCode::NOT_FOUND, "not_found", "no such route")),
    }
}

fn method_not_allowed(allow: &str) -> Reply {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("allowed methods: {allow}"),
    )
    .header(http::header::ALLOW, allow)
}

/// Non-empty, percent-decoded segments (borrowed from `path` unless one holds an escape);
/// a trailing slash is ignored.
fn split(path: &str) -> Option<Vec<Cow<'_, str>>> {
    let segments = segments(path);
    if !path.contains('%') {
        // Nothing to decode (nearly every request): skip the decoder's scan and UTF-8
        // check of each segment. Sized once (a collected `filter` starts small and grows).
        // At most 16 up front: a path of many slashes has few segments.
        let slashes = path.bytes().filter(|b| *b == b'/').count();
        let mut out = Vec::with_capacity(slashes.min(16) + 1);
        out.extend(segments.map(Cow::Borrowed));
        return Some(out);
    }
    segments
        .map(|s| percent_decode_str(s).decode_utf8().ok())
        .collect()
}

/// The non-empty segments between `/`s. Searched byte by byte: `str::split('/')` runs a
/// char searcher (memchr) per segment, several times the cost for these short segments
/// (about 850 instructions per request, callgrind, issue 24). `/` is one byte in UTF-8,
/// so every slice ends on a char boundary.
fn segments(path: &str) -> impl Iterator<Item = &str> {
    let mut rest = path;
    std::iter::from_fn(move || {
        loop {
            if rest.is_empty() {
                return None;
            }
            let end = rest.bytes().position(|b| b == b'/').unwrap_or(rest.len());
            let (seg, after) = rest.split_at(end);
            rest = after.get(1..).unwrap_or("");
            if !seg.is_empty() {
                return Some(seg);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_those_of_str_split() {
        for path in [
            "",
            "/",
            "//",
            "a",
            "/a",
            "a/",
            "/v2/endpoints/x/3/0/1",
            "//a//b///c//",
            "/é/日本/\u{10ffff}/",
            "/a%2Fb/%2F/",
            "no-slash-at-all",
        ] {
            let want: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            assert_eq!(segments(path).collect::<Vec<_>>(), want, "{path:?}");
        }
    }

    #[test]
    fn prefixes_and_routes() {
        let table: &[(&str, Route)] = &[
            ("/", Route::Root),
            ("/v2", Route::Root),
            ("/rest-versions", Route::RestVersions),
            ("/v1/rest-versions", Route::RestVersions),
            ("/v2/endpoints", Route::Endpoints),
            ("/endpoints/", Route::Endpoints),
            ("/v2/endpoints/node-001", Route::Endpoint("node-001".into())),
            ("/endpoints/a%20b", Route::Endpoint("a b".into())),
            ("/v1/endpoints/x", Route::Endpoint("x".into())),
            (
                "/v2/endpoints/x/3/0/1",
                Route::Resource {
                    ep: "x".into(),
                    path: "/3/0/1".into(),
                },
            ),
            (
                "/endpoints/x/a%2Fb",
                Route::Resource {
                    ep: "x".into(),
                    path: "/a/b".into(),
                },
            ),
            ("/v2/notification/pull", Route::NotificationPull),
            ("/console", Route::Console(String::new())),
            ("/console/", Route::Console(String::new())),
            ("/console/console.js", Route::Console("console.js".into())),
            ("/notification/callback", Route::NotificationCallback),
            ("/v2/subscriptions", Route::Subscriptions),
            ("/v2/subscriptions/", Route::Subscriptions),
            (
                "/subscriptions/node-1",
                Route::EndpointSubscriptions("node-1".into()),
            ),
            (
                "/v2/subscriptions/node-1/3/0/1",
                Route::Subscription {
                    ep: "node-1".into(),
                    path: "/3/0/1".into(),
                },
            ),
        ];
        for (path, route) in table {
            assert_eq!(
                resolve(&Method::GET, path).map(|r| r.0).ok(),
                Some(route.clone()),
                "{path}"
            );
        }
    }

    /// Every entry of the route table reaches a route of the router (with sample values
    /// for its parameters), and only the table's methods do.
    #[test]
    fn the_route_table_is_what_the_router_serves() {
        let concrete = |t: &str| {
            t.replace("{endpoint-name}", "node-1")
                .replace("{device-id}", "node-1")
                .replace("{resource-path}", "3/0/1")
        };
        for (method, template) in CORE_ROUTES {
            let m: Method = method.parse().unwrap();
            let r = resolve(&m, &concrete(template));
            assert!(r.is_ok(), "{method} {template} is not served");
        }
        let templates: std::collections::BTreeSet<&str> =
            CORE_ROUTES.iter().map(|(_, t)| *t).collect();
        for t in templates {
            for m in ["GET", "PUT", "POST", "DELETE"] {
                let listed = CORE_ROUTES.contains(&(m, t));
                let served = resolve(&m.parse().unwrap(), &concrete(t)).is_ok();
                assert_eq!(listed, served, "{m} {t}: listed {listed}, served {served}");
            }
        }
    }

    #[test]
    fn unknown_paths_and_methods() {
        assert_eq!(
            resolve(&Method::GET, "/v3/endpoints").unwrap_err().status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            resolve(&Method::GET, "/nothing").unwrap_err().status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            resolve(&Method::POST, "/v2/endpoints")
                .unwrap_err()
                .status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        // The console is not part of the versioned API.
        assert_eq!(
            resolve(&Method::GET, "/v2/console").unwrap_err().status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            resolve(&Method::GET, "/console/a/b").unwrap_err().status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            resolve(&Method::POST, "/console").unwrap_err().status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            resolve(&Method::GET, "/endpoints/%FF")
                .unwrap_err()
                .status(),
            StatusCode::BAD_REQUEST
        );
    }
}
