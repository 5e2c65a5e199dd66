//! The daemon's REST API as a command-line client sees it (`connectord credentials`):
//! where it listens and the key to use, from the configuration, and one request.
//!
//! Decision: the CLI talks to the running daemon over its REST API with an access key
//! (by default the first admin key, `admin.key` in the state directory), rather than
//! writing the database as `plugin-call` does: a credential change must reach the
//! running daemon's memory at once and close the sessions it revokes, which only the
//! daemon can do.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;

/// Why a request to the daemon did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("the configuration has no rest.listen address to reach the daemon at; give --url")]
    NoAddress,
    #[error("cannot read the access key from {}: {source} (give --key-file, or set CONNECTORD_API_KEY)", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the access key file {} is empty", .0.display())]
    EmptyKey(PathBuf),
    #[error("{method} {url}: {message}")]
    Http {
        method: String,
        url: String,
        message: String,
    },
}

/// The base URL of the REST API of the daemon `config` describes: its first
/// `rest.listen` address, a wildcard replaced by the loopback address of its family.
pub fn base_url(config: &Config) -> Result<String, RemoteError> {
    let addr = config.rest.listen.first().ok_or(RemoteError::NoAddress)?;
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(format!("http://{}", SocketAddr::new(ip, addr.port())))
}

/// The access key: `CONNECTORD_API_KEY` if set, else the first line of `key_file`, else of
/// `admin.key` in the state directory of `config`.
pub fn access_key(config: &Config, key_file: Option<&Path>) -> Result<String, RemoteError> {
    if key_file.is_none()
        && let Ok(k) = std::env::var("CONNECTORD_API_KEY")
        && !k.trim().is_empty()
    {
        return Ok(k.trim().to_string());
    }
    let path = match key_file {
        Some(p) => p.to_path_buf(),
        None => config.state.resolve_dir().join(crate::auth::ADMIN_KEY_FILE),
    };
    let text = std::fs::read_to_string(&path).map_err(|source| RemoteError::Key {
        path: path.clone(),
        source,
    })?;
    let key = text.lines().next().unwrap_or("").trim().to_string();
    if key.is_empty() {
        return Err(RemoteError::EmptyKey(path));
    }
    Ok(key)
}

/// One request with the key as Bearer token; the status and the body as text. Any
/// status is an answer; only a request that got none is an error.
pub fn call(
    base: &str,
    key: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, String), RemoteError> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let fail = |message: String| RemoteError::Http {
        method: method.to_string(),
        url: url.clone(),
        message,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let builder = ureq::http::Request::builder()
        .method(method)
        .uri(&url)
        .header("Authorization", format!("Bearer {key}"));
    let result = match body {
        Some(b) => {
            let request = builder
                .header("Content-Type", "application/json")
                .body(b.to_string().into_bytes())
                .map_err(|e| fail(e.to_string()))?;
            agent.run(request)
        }
        None => agent.run(builder.body(()).map_err(|e| fail(e.to_string()))?),
    };
    let mut resp = result.map_err(|e| fail(e.to_string()))?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    Ok((status, text))
}

/// Percent-encodes one path segment (an endpoint name may hold any character but `/`;
/// `/` is encoded too, and refused by the daemon as a name).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_reaches_a_wildcard_listener_on_loopback() {
        let mut c = Config::embedded().unwrap();
        c.rest.listen = vec!["0.0.0.0:8080".parse().unwrap()];
        assert_eq!(base_url(&c).unwrap(), "http://127.0.0.1:8080");
        c.rest.listen = vec!["[::]:9".parse().unwrap()];
        assert_eq!(base_url(&c).unwrap(), "http://[::1]:9");
        c.rest.listen = vec!["10.1.2.3:80".parse().unwrap()];
        assert_eq!(base_url(&c).unwrap(), "http://10.1.2.3:80");
        c.rest.listen.clear();
        assert!(matches!(base_url(&c), Err(RemoteError::NoAddress)));
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(segment("dev-1"), "dev-1");
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
        assert_eq!(segment("é"), "%C3%A9");
    }
}
