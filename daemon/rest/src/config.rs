//! `[rest]`: the REST API's section of the configuration file, with its defaults and range
//! checks. The daemon's configuration (`connectord::config`) embeds it as it is.

use std::net::SocketAddr;
use std::path::PathBuf;

use connectord_core::config::{Invalid, at_least};
use serde::Deserialize;

/// `[rest]`: the HTTP API for applications.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestConfig {
    /// Addresses to serve the REST API on. Port 0 picks a free port (logged at start).
    pub listen: Vec<SocketAddr>,
    /// Connections served at once; at the limit no new connection is accepted (they wait
    /// in the listen backlog) until one closes, but for at most one per listener, accepted
    /// and waiting for a slot.
    pub max_connections: usize,
    /// Connections one client address may have open at once, out of `max_connections`;
    /// more are closed at once (a 503, logged once a minute per address, counted). Below
    /// `max_connections`, so that one address (idle or slowloris connections) cannot take
    /// every slot: the rest stays for other clients. A value over `max_connections`
    /// counts as `max_connections` (no per-address bound), which is what a reverse proxy on
    /// one address needs.
    pub max_connections_per_address: usize,
    /// Failed authentications one client address (an IPv6 address's /64) may have a
    /// minute, in a burst or spread out; past them, its requests that need credentials are
    /// answered 429 with `Retry-After`, unchecked, until a failure's worth (a minute / this)
    /// has passed (`rest::throttle`). 0: no bound (a reverse proxy that throttles itself).
    pub auth_failures_per_minute: u32,
    /// Seconds the daemon waits on a client: for a request's head (request line and
    /// headers), for its body (408 when it does not arrive), for the next request on an idle
    /// connection (HTTP/1 or HTTP/2), and for a client to take a response it is not reading. Then the
    /// connection is closed.
    pub client_timeout_s: u64,
    /// Addresses to serve the REST API on over HTTPS (TLS 1.2 and 1.3; HTTP/1.1 and
    /// HTTP/2 chosen by ALPN), with `tls_cert` and `tls_key`; the addresses of `listen`
    /// stay plain HTTP. Empty (no HTTPS) by default. The connection bounds above apply to
    /// both kinds together.
    pub listen_tls: Vec<SocketAddr>,
    /// PEM file with the server certificate first, then its intermediates. Needed with
    /// `listen_tls`; re-read on SIGHUP (new connections get the new certificate).
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1). Needed with
    /// `listen_tls`; re-read on SIGHUP with `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Seconds a client of `listen_tls` has to complete its TLS handshake (from the
    /// accepted connection); then the connection is closed.
    pub tls_handshake_timeout_s: u64,
}

impl Default for RestConfig {
    fn default() -> Self {
        RestConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 8080))],
            max_connections: 1024,
            max_connections_per_address: 256,
            auth_failures_per_minute: 60,
            client_timeout_s: 30,
            listen_tls: Vec::new(),
            tls_cert: None,
            tls_key: None,
            tls_handshake_timeout_s: 10,
        }
    }
}

impl RestConfig {
    /// Range checks serde cannot express: the first value out of range, its key relative
    /// to the section (see [`Invalid`]).
    pub fn check(&self) -> Result<(), Invalid> {
        if self.listen.is_empty() && self.listen_tls.is_empty() {
            return Err((
                "listen",
                "needs at least one address (here or in rest.listen_tls)".into(),
            ));
        }
        at_least("max_connections", self.max_connections as u64, 1)?;
        at_least(
            "max_connections_per_address",
            self.max_connections_per_address as u64,
            1,
        )?;
        if self.auth_failures_per_minute > 60_000 {
            return Err((
                "auth_failures_per_minute",
                "must lie between 0 (no bound) and 60000".into(),
            ));
        }
        if !(1..=3600).contains(&self.client_timeout_s) {
            return Err(("client_timeout_s", "must lie between 1 and 3600".into()));
        }
        self.check_tls()
    }

    /// The HTTPS keys: certificate and key together with `listen_tls`, and neither
    /// without it (a certificate no listener uses is a mistake, not HTTPS).
    fn check_tls(&self) -> Result<(), Invalid> {
        let paths = [("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key)];
        for (key, path) in paths {
            match (path, self.listen_tls.is_empty()) {
                (None, false) => {
                    return Err((key, "is needed with rest.listen_tls (a PEM file)".into()));
                }
                (Some(_), true) => {
                    return Err((
                        key,
                        "is set but rest.listen_tls is empty: no listener would use it".into(),
                    ));
                }
                (Some(p), false) if p.as_os_str().is_empty() => {
                    return Err((key, "is an empty path".into()));
                }
                _ => {}
            }
        }
        if let Some(a) = self
            .listen_tls
            .iter()
            .find(|a| a.port() != 0 && self.listen.contains(a))
        {
            return Err((
                "listen_tls",
                format!("{a} is also in rest.listen (one address serves HTTP or HTTPS)"),
            ));
        }
        if !(1..=300).contains(&self.tls_handshake_timeout_s) {
            return Err((
                "tls_handshake_timeout_s",
                "must lie between 1 and 300".into(),
            ));
        }
        Ok(())
    }
}
