//! The web console (issue 23, item 5): `GET /console` and `GET /console/{asset}`.
//!
//! Static files compiled into the binary (`daemon/rest/console/`): the page, its script and
//! style sheet, and the LwM2M object definitions it names resources with. The page holds
//! no data, so these routes need no key: every data call the page makes goes to the REST
//! API with the access key the user typed, which the page keeps in the browser's
//! `sessionStorage` only. What a key may see is what the API answers it.
//!
//! Headers: each asset's content type; a strict `Content-Security-Policy` (only this
//! origin's script, style and connections; no inline script or style, no frames, no
//! forms posting elsewhere); `X-Content-Type-Options: nosniff`; `Referrer-Policy:
//! no-referrer`. Caching: `Cache-Control: no-cache` with an `ETag` of the asset's bytes,
//! answered 304 to a matching `If-None-Match`, so a browser revalidates on every load
//! (cheap: no body) and never runs a script older than the daemon serving it (asset names
//! carry no version, hence no long `max-age`).

use http::header::{CACHE_CONTROL, ETAG, HeaderName};
use http::{HeaderMap, StatusCode};

use super::reply::{Reply, error};

/// The console's policy: nothing but this origin, no inline code (the page has none).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// Every file the console serves; `""` is the page itself (`/console`, `/console/`).
const ASSETS: &[Asset] = &[
    Asset {
        name: "",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../console/index.html"),
    },
    Asset {
        name: "console.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../console/console.js"),
    },
    Asset {
        name: "console.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../console/console.css"),
    },
    Asset {
        name: "objects.json",
        content_type: "application/json",
        body: include_bytes!("../console/objects.json"),
    },
];

/// The ETag of `body`: FNV-1a 64 of its bytes (stable across builds of the same bytes).
fn etag(body: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{h:016x}\"")
}

/// Whether `If-None-Match` names `tag` (or is `*`).
fn not_modified(headers: &HeaderMap, tag: &str) -> bool {
    headers
        .get_all(http::header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == tag || t == "*")
}

/// The answer to `GET|HEAD /console/{asset}` (`asset` empty for the page): the file, 304
/// when the client has it, a JSON 404 for a name the console does not have.
pub fn serve(asset: &str, headers: &HeaderMap) -> Reply {
    let Some(a) = ASSETS.iter().find(|a| a.name == asset) else {
        return no_such_file();
    };
    let tag = etag(a.body);
    let reply = if not_modified(headers, &tag) {
        Reply::empty(StatusCode::NOT_MODIFIED)
    } else {
        Reply::with_type(StatusCode::OK, a.content_type, a.body)
    };
    secured(reply.header(ETAG, &tag).header(CACHE_CONTROL, "no-cache"))
}

/// The 404 of a path under `/console` that names no file of it, with the policy.
pub fn no_such_file() -> Reply {
    secured(error(
        StatusCode::NOT_FOUND,
        "not_found",
        "the console has no such file",
    ))
}

/// `reply` with the console's security headers: every answer under `/console` carries
/// them, its errors too (a 404 or 405 there went out without them).
pub fn secured(reply: Reply) -> Reply {
    reply
        .header(
            HeaderName::from_static("content-security-policy"),
            CONTENT_SECURITY_POLICY,
        )
        .header(HeaderName::from_static("x-content-type-options"), "nosniff")
        .header(HeaderName::from_static("referrer-policy"), "no-referrer")
        .header(HeaderName::from_static("x-frame-options"), "DENY")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every answer under `/console` carries the policy, its 404s and 405s too (they
    /// carried none).
    #[test]
    fn console_errors_carry_the_policy_too() {
        for (method, path) in [
            (http::Method::GET, "/console/nonexist.js"),
            (http::Method::GET, "/console/a/b"),
            (http::Method::POST, "/console"),
        ] {
            let reply = match super::super::routes::resolve(&method, path) {
                Ok((super::super::routes::Route::Console(asset), _)) => {
                    serve(&asset, &HeaderMap::new())
                }
                Ok(_) => panic!("{path}: not a console route"),
                Err(reply) => reply,
            };
            let r = reply.into_response();
            assert!(
                r.status().is_client_error(),
                "{method} {path}: {}",
                r.status()
            );
            let h = r.headers();
            assert_eq!(
                h["content-security-policy"], CONTENT_SECURITY_POLICY,
                "{path}"
            );
            assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
            assert_eq!(h["x-frame-options"], "DENY", "{path}");
        }
    }

    #[test]
    fn every_asset_is_served_with_its_type_and_the_policy() {
        for a in ASSETS {
            let r = serve(a.name, &HeaderMap::new()).into_response();
            assert_eq!(r.status(), StatusCode::OK, "{}", a.name);
            let h = r.headers();
            assert_eq!(h[http::header::CONTENT_TYPE], a.content_type);
            assert_eq!(h["content-security-policy"], CONTENT_SECURITY_POLICY);
            assert_eq!(h[CACHE_CONTROL], "no-cache");
            assert!(h.contains_key(ETAG));
        }
    }

    #[test]
    fn a_known_etag_is_not_sent_again_and_an_unknown_file_is_a_json_404() {
        let tag = etag(ASSETS[1].body);
        let mut h = HeaderMap::new();
        h.insert(
            http::header::IF_NONE_MATCH,
            format!("\"x\", {tag}").parse().unwrap(),
        );
        assert_eq!(serve("console.js", &h).status(), StatusCode::NOT_MODIFIED);
        assert_eq!(
            serve("console.js", &HeaderMap::new()).status(),
            StatusCode::OK
        );
        let r = serve("../Cargo.toml", &HeaderMap::new());
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }

    /// The object definitions are JSON of the shape the script reads.
    #[test]
    fn the_object_definitions_are_well_formed() {
        let a = ASSETS.iter().find(|a| a.name == "objects.json").unwrap();
        let v: serde_json::Value = serde_json::from_slice(a.body).unwrap();
        for id in ["0", "1", "2", "3", "4", "5", "6", "7", "3303"] {
            let o = &v["objects"][id];
            assert!(o["name"].is_string(), "object {id}");
            for (rid, r) in o["resources"].as_object().unwrap() {
                let r = r.as_array().unwrap();
                assert!(rid.parse::<u16>().is_ok());
                assert_eq!(r.len(), 5, "{id}/{rid}");
                let ops = r[1].as_str().unwrap();
                assert!(ops.chars().all(|c| "RWE".contains(c)), "{id}/{rid}");
            }
        }
        assert_eq!(v["objects"]["3"]["resources"]["0"][0], "Manufacturer");
    }
}
