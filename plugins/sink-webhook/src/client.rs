//! The HTTP(S) client behind the webhook sink: delivery of notification batches to a
//! callback URL.
//!
//! A web application registers a callback with `PUT /notification/callback` (a [`Target`]).
//! The connector first checks that the URL answers ([`Webhook::verify`], the same verifying
//! request the mbed Device Connector sends) and from then on pushes each batch of
//! notifications to it ([`Webhook::deliver`]). Both are a `PUT` of a JSON document
//! (`Content-Type: application/json`) carrying the headers given at registration.
//!
//! `target.url` must be an absolute `http://` or `https://` URL with a host. Every entry of
//! `target.headers` is sent, as given, with each request to the URL (typically an
//! authorization token the receiver checks); the names and values must be valid HTTP header
//! names and values. `Content-Type` is always `application/json` and cannot be overridden
//! (a callback naming it is refused when registered; one stored before is sent without it),
//! and the framing headers `Content-Length`, `Transfer-Encoding`, `Connection`,
//! `Keep-Alive`, `Upgrade`, `TE` and `Proxy-Connection` cannot be set.
//!
//! `http://` and `https://` URLs are accepted. HTTPS uses rustls (ring) and negotiates HTTP/2
//! or HTTP/1.1 through ALPN. Server certificates are checked against the system's trusted root
//! certificates plus, optionally, the certificates of an extra CA file (for receivers on a
//! private PKI). Every request, from connecting to the end of the response, is bounded by one
//! timeout.
//!
//! The client has no runtime of its own: its futures run on the caller's tokio runtime (the
//! plugin's current-thread runtime, see the crate documentation), which also runs the
//! connection tasks hyper spawns.

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use connectord_plugin_sdk::Host;
use connectord_plugin_sdk::level;
use connectord_plugin_sdk::sink::{DeliverResponse, Target};
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};
use tokio::time::Instant;

/// The outcome of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The receiver took the batch (2xx).
    Accepted,
    /// Try again later (connection failure, TLS failure, timeout, 5xx, 408, 429).
    Retry(String),
    /// The receiver refuses this batch for good (1xx, 3xx and the other 4xx statuses; redirects
    /// are not followed), or the callback URL or one of its headers is invalid: the batch is
    /// discarded.
    Refused(String),
}

impl From<Delivery> for DeliverResponse {
    fn from(delivery: Delivery) -> DeliverResponse {
        match delivery {
            Delivery::Accepted => DeliverResponse::Accepted,
            Delivery::Retry(reason) => DeliverResponse::Retry { reason },
            Delivery::Refused(reason) => DeliverResponse::Refused { reason },
        }
    }
}

/// Why the webhook client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The extra CA file is missing, unreadable, holds no PEM certificate, or holds a
    /// certificate that cannot be used as a trust anchor.
    #[error("cannot read CA file {path}: {message}")]
    Ca { path: String, message: String },
    /// The TLS library refused the client configuration (should not happen with the built-in
    /// ring provider).
    #[error("cannot set up TLS: {0}")]
    Tls(String),
}

/// Most of a response body that is read (and discarded) so that the connection can be reused;
/// a longer body is dropped, and its connection with it.
const MAX_DRAINED_BODY: usize = 64 * 1024;

/// Headers that describe the message framing or the connection: a callback cannot set them.
const RESERVED_HEADERS: [&str; 7] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "proxy-connection",
];

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTP/1.1 + HTTP/2 client with rustls for `https://` URLs.
///
/// Built once ([`Webhook::new`]) and reused: it keeps idle connections to the receivers (for up
/// to 90 s) so that consecutive deliveries to the same URL reuse them.
///
/// Trusted roots, in one root store: the system's root certificates (as found by
/// rustls-native-certs; files or certificates that cannot be loaded are logged and skipped, and
/// having none at all is allowed) plus every certificate of the extra CA file.
pub struct Webhook {
    timeout: Duration,
    client: HttpsClient,
    /// How many trust anchors came from the system and from the extra CA file (for the log).
    system_roots: usize,
    extra_roots: usize,
}

/// A request that could not get a status from the receiver.
enum Failure {
    /// The target itself is invalid (URL, header): retrying cannot help. Nothing was sent.
    Invalid(String),
    /// Connecting, TLS, the exchange or the timeout failed: may work later.
    Transport(String),
}

impl Webhook {
    /// Builds the client.
    ///
    /// `timeout` bounds each request as a whole: connecting (DNS, TCP, TLS), sending, and
    /// receiving the response status and headers; reading the rest of the response (at most
    /// 64 KiB, discarded) is bounded by what remains of it.
    ///
    /// `extra_ca_file` is a PEM file of one or more CA certificates trusted in addition to the
    /// system's roots. A missing, unreadable or empty file, one without any PEM certificate or
    /// with an unusable certificate is a [`WebhookError::Ca`] naming the file and the reason.
    ///
    /// Problems with the system's roots are logged through `host` (warnings), as is the number
    /// of system roots loaded (debug). Building needs no tokio runtime.
    pub fn new(
        timeout: Duration,
        extra_ca_file: Option<&Path>,
        host: &Host,
    ) -> Result<Webhook, WebhookError> {
        let (roots, system_roots, extra_count) = trusted_roots(extra_ca_file, host)?;
        if roots.is_empty() {
            host.warn(
                "no system root certificates and no extra CA file: \
                 https callback URLs will fail certificate verification",
            );
        }
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| WebhookError::Tls(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();

        Ok(Webhook {
            timeout,
            client: build_client(config, timeout),
            system_roots,
            extra_roots: extra_count,
        })
    }

    /// How many trusted roots came from the system, and how many from the extra CA file.
    pub fn root_counts(&self) -> (usize, usize) {
        (self.system_roots, self.extra_roots)
    }

    /// Checks a callback before it is registered, as the mbed Device Connector does: a `PUT` to
    /// `target.url` with the target's headers, `Content-Type: application/json` and an empty
    /// body.
    ///
    /// `Ok(())` when the receiver answers with a 2xx status. Otherwise `Err` with a short
    /// sentence that can be shown to the REST client, e.g. `callback URL answered 404 Not
    /// Found`, `cannot connect to callback URL: connection refused`, `callback URL did not
    /// answer within 10s`, `TLS error: invalid peer certificate: UnknownIssuer` or `invalid
    /// callback URL: ...`. An invalid URL (not `http`/`https`, no host) or header is reported
    /// without any network activity.
    pub async fn verify(&self, target: &Target) -> Result<(), String> {
        // Refused when a callback is registered, not skipped as at delivery (callbacks
        // stored before keep working): an outside review set `Content-Type: text/plain`,
        // was answered 204 and shown it back, and it was never sent.
        if let Some(name) = target
            .headers
            .keys()
            .find(|n| n.eq_ignore_ascii_case(CONTENT_TYPE.as_str()))
        {
            return Err(format!(
                "callback header {name:?} cannot be set (notifications are always sent as application/json)"
            ));
        }
        match self.put(target, Bytes::new()).await {
            Ok(status) if status.is_success() => Ok(()),
            Ok(status) => Err(format!("callback URL answered {status}")),
            Err(Failure::Invalid(reason) | Failure::Transport(reason)) => Err(reason),
        }
    }

    /// Delivers one batch: a `PUT` of `body` (a JSON document) to `target.url` with the
    /// target's headers and `Content-Type: application/json`.
    ///
    /// - 2xx: [`Delivery::Accepted`].
    /// - 400, 413, 415, 422 (the receiver refuses these bytes: sending them again cannot
    ///   help), an invalid URL or header (it cannot ever be sent): [`Delivery::Refused`].
    /// - Any other status (3xx, other 4xx, 5xx; redirects are not followed), failure to
    ///   connect, TLS failure, the timeout, a connection lost during the exchange:
    ///   [`Delivery::Retry`] (the receiver may or may not have seen the batch). The host
    ///   retries with backoff and discards the events 15 minutes after they were made, as
    ///   seed 000 says ("tries to deliver each notification event for up to 15 minutes").
    ///   Decision: every 4xx but those about the body. They discarded the batch at once,
    ///   and an outside review lost the events of a receiver answering 404 while it was
    ///   being redeployed; a 401, 403 or 404 is a receiver's configuration, fixed in
    ///   minutes. Retrying a refused body would hold up the key's later events behind it
    ///   for the 15 minutes (a review).
    ///
    /// The reason is a short sentence like the ones of [`Webhook::verify`].
    pub async fn deliver(&self, target: &Target, body: Bytes) -> Delivery {
        match self.put(target, body).await {
            Ok(status) if status.is_success() => Delivery::Accepted,
            Ok(
                status @ (StatusCode::BAD_REQUEST
                | StatusCode::PAYLOAD_TOO_LARGE
                | StatusCode::UNSUPPORTED_MEDIA_TYPE
                | StatusCode::UNPROCESSABLE_ENTITY),
            ) => Delivery::Refused(format!("callback URL answered {status}")),
            Ok(status) => Delivery::Retry(format!("callback URL answered {status}")),
            Err(Failure::Invalid(reason)) => Delivery::Refused(reason),
            Err(Failure::Transport(reason)) => Delivery::Retry(reason),
        }
    }

    /// `PUT`s `body` to the target and returns the response status; the response body is read
    /// (bounded) and discarded.
    async fn put(&self, target: &Target, body: Bytes) -> Result<StatusCode, Failure> {
        let uri = parse_url(&target.url).map_err(Failure::Invalid)?;
        let headers = parse_headers(&target.headers).map_err(Failure::Invalid)?;
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::PUT;
        *request.uri_mut() = uri;
        let map = request.headers_mut();
        for (name, value) in headers {
            map.append(name, value);
        }
        map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));

        let deadline = Instant::now() + self.timeout;
        match tokio::time::timeout_at(deadline, send(&self.client, request, deadline)).await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(e)) => Err(Failure::Transport(describe_error(&e))),
            Err(_elapsed) => Err(Failure::Transport(format!(
                "callback URL did not answer within {:?}",
                self.timeout
            ))),
        }
    }
}

/// Sends one request and drains the response body; returns the status.
async fn send(
    client: &HttpsClient,
    request: Request<Full<Bytes>>,
    deadline: Instant,
) -> Result<StatusCode, hyper_util::client::legacy::Error> {
    let response = client.request(request).await?;
    let status = response.status();
    // The status decides the outcome; reading the rest only lets the connection be reused, so
    // a body that fails or does not end in time is just dropped (with its connection).
    let mut body = response.into_body();
    let drain = async {
        let mut seen = 0usize;
        while seen <= MAX_DRAINED_BODY {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        seen += data.len();
                    }
                }
                Some(Err(_)) | None => break,
            }
        }
    };
    let _ = tokio::time::timeout_at(deadline, drain).await;
    Ok(status)
}

fn build_client(tls: ClientConfig, timeout: Duration) -> HttpsClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeout));
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector)
}

/// The trusted roots of a sink: the system's ([`native_roots`]) plus every certificate of
/// `extra_ca_file`, with how many came from each. A missing, unreadable or certificate-less
/// file is a [`WebhookError::Ca`]. Shared with the MQTT sink (`sink-mqtt`), whose `ca_file`
/// means the same.
pub fn trusted_roots(
    extra_ca_file: Option<&Path>,
    host: &Host,
) -> Result<(RootCertStore, usize, usize), WebhookError> {
    let extra_roots = extra_ca_file.map(load_ca_file).transpose()?;
    let mut roots = native_roots(host);
    let system_roots = roots.len();
    let mut extra_count = 0;
    if let Some(extra) = extra_roots {
        extra_count = extra.len();
        roots.extend(extra.roots);
    }
    Ok((roots, system_roots, extra_count))
}

/// The system's trusted root certificates, as found by rustls-native-certs. Load errors and
/// unusable certificates are logged and skipped: having no system root at all is allowed.
fn native_roots(host: &Host) -> RootCertStore {
    let rustls_native_certs::CertificateResult { certs, errors, .. } =
        rustls_native_certs::load_native_certs();
    if !errors.is_empty() {
        let details: Vec<String> = errors.iter().map(ToString::to_string).collect();
        host.warn(&format!(
            "{} error(s) while loading the system root certificates (skipped): {}",
            errors.len(),
            details.join("; ")
        ));
    }
    let mut roots = RootCertStore::empty();
    let mut unusable = 0usize;
    for cert in certs {
        if let Err(e) = roots.add(cert) {
            unusable += 1;
            host.log(
                level::DEBUG,
                &format!("system root certificate skipped: {e}"),
            );
        }
    }
    if unusable > 0 {
        host.warn(&format!(
            "{unusable} system root certificate(s) could not be used (skipped)"
        ));
    }
    host.log(
        level::DEBUG,
        &format!("{} system root certificate(s) loaded", roots.len()),
    );
    roots
}

/// Reads every certificate of a PEM file into a root store.
fn load_ca_file(path: &Path) -> Result<RootCertStore, WebhookError> {
    let fail = |message: String| WebhookError::Ca {
        path: path.display().to_string(),
        message,
    };
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| fail(pem_error(e)))?;
    let mut roots = RootCertStore::empty();
    let mut count = 0usize;
    for item in iter {
        let cert = item.map_err(|e| fail(pem_error(e)))?;
        count += 1;
        roots
            .add(cert)
            .map_err(|e| fail(format!("certificate #{count} cannot be used: {e}")))?;
    }
    if count == 0 {
        return Err(fail(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) found".into(),
        ));
    }
    Ok(roots)
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        other => format!("invalid PEM: {other}"),
    }
}

/// Parses and checks a callback URL: absolute, `http` or `https`, with a host, and no
/// user information.
///
/// Decision: a URL with user information (`http://user:password@host/`) is refused, not
/// turned into Basic authentication: the sink never sent it (it was dropped without a
/// word, so the receiver saw requests without credentials), and the callback has
/// `headers` for credentials, as the Connector's API documents. The message does not
/// repeat the URL, which holds a password.
fn parse_url(url: &str) -> Result<Uri, String> {
    if url.is_empty() {
        return Err("invalid callback URL: empty".into());
    }
    // The authority: what follows "://" up to the path, query or fragment.
    if let Some((_, rest)) = url.split_once("://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.contains('@') {
            return Err("invalid callback URL: it holds user information (user:password@), which webhooks do not send; give the credentials as a header (such as Authorization) in the callback's headers".into());
        }
        if authority.is_empty() {
            return Err(format!("invalid callback URL {url:?}: no host"));
        }
    }
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("invalid callback URL {url:?}: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => {
            return Err(format!(
                "invalid callback URL {url:?}: scheme {other:?} is not supported (use http or https)"
            ));
        }
        None => {
            return Err(format!(
                "invalid callback URL {url:?}: not an absolute http or https URL"
            ));
        }
    }
    match uri.host() {
        Some(host) if !host.is_empty() => Ok(uri),
        _ => Err(format!("invalid callback URL {url:?}: no host")),
    }
}

/// Turns the callback's headers into HTTP headers, naming the first one that is invalid.
fn parse_headers(
    headers: &BTreeMap<String, String>,
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    headers
        .iter()
        .filter_map(|(name, value)| {
            let parsed_name = match HeaderName::from_bytes(name.as_bytes()) {
                Ok(parsed) => parsed,
                Err(_) => return Some(Err(format!("invalid callback header name {name:?}"))),
            };
            if parsed_name == CONTENT_TYPE {
                // Always application/json: the body is JSON whatever the callback says.
                return None;
            }
            if RESERVED_HEADERS.contains(&parsed_name.as_str()) {
                return Some(Err(format!(
                    "callback header {name:?} cannot be set (it is managed by the connector)"
                )));
            }
            match HeaderValue::from_str(value) {
                Ok(parsed_value) => Some(Ok((parsed_name, parsed_value))),
                Err(_) => Some(Err(format!("invalid value for callback header {name:?}"))),
            }
        })
        .collect()
}

/// Every error of a chain, including the errors wrapped in `io::Error`s (whose `source()` skips
/// the wrapped error itself).
fn error_chain<'a>(top: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    let mut chain = Vec::new();
    let mut next = Some(top);
    while let Some(error) = next {
        if chain.len() >= 32 {
            break;
        }
        chain.push(error);
        next = match error
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => error.source(),
        };
    }
    chain
}

fn find_rustls_error(error: &hyper_util::client::legacy::Error) -> Option<&rustls::Error> {
    error_chain(error)
        .into_iter()
        .find_map(|e| e.downcast_ref::<rustls::Error>())
}

/// A short sentence for a failed request.
fn describe_error(error: &hyper_util::client::legacy::Error) -> String {
    if let Some(tls) = find_rustls_error(error) {
        return format!("TLS error: {tls}");
    }
    let chain = error_chain(error);
    let io_kind = chain
        .iter()
        .filter_map(|e| e.downcast_ref::<io::Error>())
        .map(io::Error::kind)
        .find(|kind| *kind != io::ErrorKind::Other);
    let known = match io_kind {
        Some(io::ErrorKind::ConnectionRefused) => Some("connection refused"),
        Some(io::ErrorKind::ConnectionReset) => Some("connection reset"),
        Some(io::ErrorKind::ConnectionAborted) => Some("connection aborted"),
        Some(io::ErrorKind::TimedOut) => Some("connection timed out"),
        Some(io::ErrorKind::HostUnreachable) => Some("host unreachable"),
        Some(io::ErrorKind::NetworkUnreachable) => Some("network unreachable"),
        _ => None,
    };
    // The top error only says "client error (Connect)": describe its causes.
    let detail = match known {
        Some(text) => text.to_string(),
        None => {
            let mut parts: Vec<String> = Vec::new();
            for e in chain.iter().skip(1) {
                let text = e.to_string();
                if !parts.iter().any(|p| p.contains(&text)) {
                    parts.push(text);
                }
            }
            if parts.is_empty() {
                error.to_string()
            } else {
                parts.join(": ")
            }
        }
    };
    if error.is_connect() {
        format!("cannot connect to callback URL: {detail}")
    } else {
        format!("request to callback URL failed: {detail}")
    }
}
