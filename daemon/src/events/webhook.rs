//! HTTP(S) delivery of notification batches to a callback URL (the webhook sink).
//!
//! A web application registers a callback with `PUT /notification/callback`
//! ([`CallbackTarget`]). The connector first checks that the URL answers ([`Webhook::verify`],
//! the same verifying request the mbed Device Connector sends) and from then on pushes each
//! batch of notifications to it ([`Webhook::deliver`]). Both are a `PUT` of a JSON document
//! (`Content-Type: application/json`) carrying the headers given at registration.
//!
//! `http://` and `https://` URLs are accepted. HTTPS uses rustls (ring) and negotiates HTTP/2
//! or HTTP/1.1 through ALPN. Server certificates are checked against the system's trusted root
//! certificates plus, optionally, the certificates of an extra CA file (for receivers on a
//! private PKI). Every request, from connecting to the end of the response, is bounded by one
//! timeout.

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
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
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Where a key's notifications go: `PUT /notification/callback` body.
///
/// `url` must be an absolute `http://` or `https://` URL with a host. Every entry of `headers`
/// is sent, as given, with each request to the URL (typically an authorization token the
/// receiver checks); the names and values must be valid HTTP header names and values.
/// `Content-Type` is always `application/json` and cannot be overridden, and the framing
/// headers `Content-Length`, `Transfer-Encoding`, `Connection`, `Keep-Alive`, `Upgrade`, `TE`
/// and `Proxy-Connection` cannot be set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackTarget {
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

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
/// Built once ([`Webhook::new`]) and shared: it keeps idle connections to the receivers (for up
/// to 90 s) so that consecutive deliveries to the same URL reuse them.
///
/// Trusted roots, in one root store: the system's root certificates (as found by
/// rustls-native-certs; files or certificates that cannot be loaded are logged and skipped, and
/// having none at all is allowed) plus every certificate of the extra CA file.
pub struct Webhook {
    timeout: Duration,
    client: HttpsClient,
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
    pub fn new(timeout: Duration, extra_ca_file: Option<&Path>) -> Result<Webhook, WebhookError> {
        let extra_roots = extra_ca_file.map(load_ca_file).transpose()?;
        let mut roots = native_roots();
        if let Some(extra) = extra_roots {
            roots.extend(extra.roots);
        }
        if roots.is_empty() {
            tracing::warn!(
                "no system root certificates and no extra CA file: \
                 https callback URLs will fail certificate verification"
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
        })
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
    pub async fn verify(&self, target: &CallbackTarget) -> Result<(), String> {
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
    /// - 408, 429, 5xx, failure to connect, TLS failure, the timeout, a connection lost during
    ///   the exchange: [`Delivery::Retry`] (the receiver may or may not have seen the batch).
    /// - Any other status (1xx, 3xx, other 4xx; redirects are not followed), an invalid URL or
    ///   header: [`Delivery::Refused`].
    ///
    /// The reason is a short sentence like the ones of [`Webhook::verify`].
    pub async fn deliver(&self, target: &CallbackTarget, body: Bytes) -> Delivery {
        match self.put(target, body).await {
            Ok(status) if status.is_success() => Delivery::Accepted,
            Ok(status)
                if status == StatusCode::REQUEST_TIMEOUT
                    || status == StatusCode::TOO_MANY_REQUESTS
                    || status.is_server_error() =>
            {
                Delivery::Retry(format!("callback URL answered {status}"))
            }
            Ok(status) => Delivery::Refused(format!("callback URL answered {status}")),
            Err(Failure::Invalid(reason)) => Delivery::Refused(reason),
            Err(Failure::Transport(reason)) => Delivery::Retry(reason),
        }
    }

    /// `PUT`s `body` to the target and returns the response status; the response body is read
    /// (bounded) and discarded.
    async fn put(&self, target: &CallbackTarget, body: Bytes) -> Result<StatusCode, Failure> {
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

/// The system's trusted root certificates, as found by rustls-native-certs. Load errors and
/// unusable certificates are logged and skipped: having no system root at all is allowed.
fn native_roots() -> RootCertStore {
    let rustls_native_certs::CertificateResult { certs, errors, .. } =
        rustls_native_certs::load_native_certs();
    if !errors.is_empty() {
        let details: Vec<String> = errors.iter().map(ToString::to_string).collect();
        tracing::warn!(
            "{} error(s) while loading the system root certificates (skipped): {}",
            errors.len(),
            details.join("; ")
        );
    }
    let mut roots = RootCertStore::empty();
    let mut unusable = 0usize;
    for cert in certs {
        if let Err(e) = roots.add(cert) {
            unusable += 1;
            tracing::debug!("system root certificate skipped: {e}");
        }
    }
    if unusable > 0 {
        tracing::warn!("{unusable} system root certificate(s) could not be used (skipped)");
    }
    tracing::debug!("{} system root certificate(s) loaded", roots.len());
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

/// Parses and checks a callback URL: absolute, `http` or `https`, with a host.
fn parse_url(url: &str) -> Result<Uri, String> {
    if url.is_empty() {
        return Err("invalid callback URL: empty".into());
    }
    if let Some((_, rest)) = url.split_once("://")
        && (rest.is_empty() || rest.starts_with(['/', '?', '#']))
    {
        return Err(format!("invalid callback URL {url:?}: no host"));
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

#[cfg(test)]
mod tests {
    use super::*;

    use std::convert::Infallible;
    use std::future::Future;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use http::{HeaderMap, Response, Version};
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use hyper_util::server::conn::auto;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;
    use tokio_rustls::TlsAcceptor;
    use tokio_rustls::rustls::ServerConfig;

    const TEST_TIMEOUT: Duration = Duration::from_secs(5);

    /// Runs a test body with an upper bound on its duration.
    async fn bounded<F: Future>(body: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(30), body)
            .await
            .expect("test took too long")
    }

    #[derive(Debug, Clone)]
    struct Recorded {
        method: Method,
        path_and_query: String,
        headers: HeaderMap,
        body: Bytes,
        version: Version,
    }

    /// An HTTP receiver (HTTP/1.1 and, with TLS, HTTP/2 via ALPN) on 127.0.0.1 that records
    /// every request and answers with a fixed status and body.
    struct Receiver {
        addr: SocketAddr,
        requests: Arc<Mutex<Vec<Recorded>>>,
        task: JoinHandle<()>,
    }

    impl Drop for Receiver {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Receiver {
        async fn start(status: u16) -> Receiver {
            Receiver::start_with(status, Bytes::from_static(b"{}"), None).await
        }

        async fn start_with(
            status: u16,
            answer: Bytes,
            tls: Option<Arc<ServerConfig>>,
        ) -> Receiver {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let requests = Arc::new(Mutex::new(Vec::new()));
            let status = StatusCode::from_u16(status).unwrap();
            let recorded = requests.clone();
            let task = tokio::spawn(async move {
                let acceptor = tls.map(TlsAcceptor::from);
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let recorded = recorded.clone();
                    let answer = answer.clone();
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |request: Request<Incoming>| {
                            let recorded = recorded.clone();
                            let answer = answer.clone();
                            async move {
                                let (parts, body) = request.into_parts();
                                let body = body.collect().await.unwrap().to_bytes();
                                recorded.lock().unwrap().push(Recorded {
                                    method: parts.method,
                                    path_and_query: parts
                                        .uri
                                        .path_and_query()
                                        .map(|p| p.to_string())
                                        .unwrap_or_default(),
                                    headers: parts.headers,
                                    body,
                                    version: parts.version,
                                });
                                let response = Response::builder()
                                    .status(status)
                                    .header(CONTENT_TYPE, "application/json")
                                    .body(Full::new(answer))
                                    .unwrap();
                                Ok::<_, Infallible>(response)
                            }
                        });
                        let builder = auto::Builder::new(TokioExecutor::new());
                        match acceptor {
                            Some(acceptor) => {
                                // A failed handshake (untrusted certificate) just ends here.
                                if let Ok(tls) = acceptor.accept(stream).await {
                                    let _ =
                                        builder.serve_connection(TokioIo::new(tls), service).await;
                                }
                            }
                            None => {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                    });
                }
            });
            Receiver {
                addr,
                requests,
                task,
            }
        }

        fn url(&self, scheme: &str, path: &str) -> String {
            format!("{scheme}://{}{path}", self.addr)
        }

        fn requests(&self) -> Vec<Recorded> {
            self.requests.lock().unwrap().clone()
        }
    }

    fn target(url: impl Into<String>, headers: &[(&str, &str)]) -> CallbackTarget {
        CallbackTarget {
            url: url.into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn webhook() -> Webhook {
        Webhook::new(TEST_TIMEOUT, None).unwrap()
    }

    /// A CA (its PEM) and a certificate for `localhost` and 127.0.0.1 signed by it.
    struct Pki {
        ca_pem: String,
        server_cert: CertificateDer<'static>,
        server_key: PrivateKeyDer<'static>,
    }

    fn make_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), Issuer::new(params, key))
    }

    fn make_pki() -> Pki {
        make_pki_for(&["localhost", "127.0.0.1"])
    }

    fn make_pki_for(names: &[&str]) -> Pki {
        let (ca_pem, issuer) = make_ca("connectord webhook test CA");
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer).unwrap();
        Pki {
            ca_pem,
            server_cert: cert.der().clone(),
            server_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    fn server_tls(pki: &Pki, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![pki.server_cert.clone()], pki.server_key.clone_key())
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    fn write_temp(contents: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, contents).unwrap();
        file
    }

    #[tokio::test]
    async fn verify_sends_put_with_headers_and_empty_body() {
        bounded(async {
            let receiver = Receiver::start(200).await;
            let hook = webhook();
            let target = target(
                receiver.url("http", "/hooks/mbed?key=abc"),
                &[("Authorization", "Bearer s3cret"), ("x-custom", "42")],
            );
            assert_eq!(hook.verify(&target).await, Ok(()));

            let requests = receiver.requests();
            assert_eq!(requests.len(), 1);
            let request = &requests[0];
            assert_eq!(request.method, Method::PUT);
            assert_eq!(request.path_and_query, "/hooks/mbed?key=abc");
            assert_eq!(request.headers["authorization"], "Bearer s3cret");
            assert_eq!(request.headers["x-custom"], "42");
            assert_eq!(request.headers[CONTENT_TYPE], "application/json");
            assert!(request.body.is_empty());
        })
        .await;
    }

    #[tokio::test]
    async fn deliver_sends_body_and_content_type() {
        bounded(async {
            let receiver = Receiver::start(204).await;
            let hook = webhook();
            let target = target(
                receiver.url("http", "/notify"),
                &[("X-Token", "t0k3n"), ("Content-Type", "text/plain")],
            );
            let body = Bytes::from_static(br#"{"notifications":[{"ep":"demo","path":"/3/0/0"}]}"#);
            assert_eq!(
                hook.deliver(&target, body.clone()).await,
                Delivery::Accepted
            );
            // A second delivery (on the pooled connection) works as well.
            assert_eq!(
                hook.deliver(&target, body.clone()).await,
                Delivery::Accepted
            );

            let requests = receiver.requests();
            assert_eq!(requests.len(), 2);
            for request in &requests {
                assert_eq!(request.method, Method::PUT);
                assert_eq!(request.path_and_query, "/notify");
                assert_eq!(request.headers["x-token"], "t0k3n");
                // The body is JSON whatever the callback's headers say.
                assert_eq!(request.headers.get_all(CONTENT_TYPE).iter().count(), 1);
                assert_eq!(request.headers[CONTENT_TYPE], "application/json");
                assert_eq!(request.body, body);
                assert_eq!(request.version, Version::HTTP_11);
            }
        })
        .await;
    }

    #[tokio::test]
    async fn statuses_are_classified() {
        bounded(async {
            let hook = webhook();
            for (status, retry) in [
                (500, true),
                (503, true),
                (429, true),
                (408, true),
                (404, false),
                (400, false),
                (410, false),
                (301, false),
            ] {
                let receiver = Receiver::start(status).await;
                let target = target(receiver.url("http", "/"), &[]);
                let outcome = hook.deliver(&target, Bytes::from_static(b"{}")).await;
                match (&outcome, retry) {
                    (Delivery::Retry(reason), true) | (Delivery::Refused(reason), false) => {
                        assert!(reason.contains(&status.to_string()), "{status}: {reason}");
                    }
                    _ => panic!("status {status}: unexpected {outcome:?}"),
                }
                let verified = hook.verify(&target).await;
                let reason = verified.expect_err("verify must fail on a non-2xx status");
                assert!(reason.contains(&status.to_string()), "{reason}");
            }

            let receiver = Receiver::start(404).await;
            let reason = hook
                .verify(&target(receiver.url("http", "/missing"), &[]))
                .await
                .unwrap_err();
            assert_eq!(reason, "callback URL answered 404 Not Found");
        })
        .await;
    }

    #[tokio::test]
    async fn large_response_body_is_discarded() {
        bounded(async {
            let answer = Bytes::from(vec![b'x'; 200 * 1024]);
            let receiver = Receiver::start_with(200, answer, None).await;
            let hook = webhook();
            let target = target(receiver.url("http", "/"), &[]);
            assert_eq!(
                hook.deliver(&target, Bytes::from_static(b"[]")).await,
                Delivery::Accepted
            );
            assert_eq!(
                hook.deliver(&target, Bytes::from_static(b"[]")).await,
                Delivery::Accepted
            );
            assert_eq!(receiver.requests().len(), 2);
        })
        .await;
    }

    #[tokio::test]
    async fn nothing_listening_is_retry() {
        bounded(async {
            let port = {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                listener.local_addr().unwrap().port()
            };
            let hook = webhook();
            let target = target(format!("http://127.0.0.1:{port}/cb"), &[]);
            match hook.deliver(&target, Bytes::from_static(b"{}")).await {
                Delivery::Retry(reason) => {
                    assert_eq!(reason, "cannot connect to callback URL: connection refused")
                }
                other => panic!("unexpected {other:?}"),
            }
            let reason = hook.verify(&target).await.unwrap_err();
            assert!(reason.contains("cannot connect"), "{reason}");
        })
        .await;
    }

    #[tokio::test]
    async fn silent_receiver_times_out() {
        bounded(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            // Accepts connections, reads nothing, answers nothing.
            let silent = tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((stream, _)) = listener.accept().await {
                    held.push(stream);
                }
            });
            let timeout = Duration::from_millis(500);
            let hook = Webhook::new(timeout, None).unwrap();
            let target = target(format!("http://{addr}/cb"), &[]);

            let started = std::time::Instant::now();
            let outcome = hook.deliver(&target, Bytes::from_static(b"{}")).await;
            let elapsed = started.elapsed();
            assert_eq!(
                outcome,
                Delivery::Retry("callback URL did not answer within 500ms".into())
            );
            assert!(elapsed >= Duration::from_millis(450), "{elapsed:?}");
            assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");

            let started = std::time::Instant::now();
            let reason = hook.verify(&target).await.unwrap_err();
            assert!(reason.contains("did not answer"), "{reason}");
            assert!(started.elapsed() < Duration::from_secs(3));
            silent.abort();
        })
        .await;
    }

    #[tokio::test]
    async fn bad_urls_are_rejected_without_network() {
        bounded(async {
            let receiver = Receiver::start(200).await;
            let hook = webhook();
            let port = receiver.addr.port();
            for url in [
                "ftp://x".to_string(),
                "not a url".to_string(),
                "http://".to_string(),
                String::new(),
                "/relative/callback".to_string(),
                "mailto:someone@example.com".to_string(),
                format!("ftp://127.0.0.1:{port}/"),
                format!("ws://127.0.0.1:{port}/"),
            ] {
                let target = target(url.clone(), &[]);
                let reason = hook.verify(&target).await.unwrap_err();
                assert!(
                    reason.starts_with("invalid callback URL"),
                    "{url}: {reason}"
                );
                match hook.deliver(&target, Bytes::from_static(b"{}")).await {
                    Delivery::Refused(reason) => {
                        assert!(
                            reason.starts_with("invalid callback URL"),
                            "{url}: {reason}"
                        )
                    }
                    other => panic!("{url}: unexpected {other:?}"),
                }
            }
            assert!(receiver.requests().is_empty());
        })
        .await;
    }

    #[tokio::test]
    async fn invalid_headers_are_rejected() {
        bounded(async {
            let receiver = Receiver::start(200).await;
            let hook = webhook();
            for (name, value) in [
                ("bad name", "x"),
                ("", "x"),
                ("X-Multi-Line", "a\r\nInjected: yes"),
                ("Content-Length", "3"),
                ("transfer-encoding", "chunked"),
            ] {
                let target = target(receiver.url("http", "/"), &[(name, value)]);
                let reason = hook.verify(&target).await.unwrap_err();
                assert!(reason.contains(&format!("{name:?}")), "{reason}");
                match hook.deliver(&target, Bytes::from_static(b"{}")).await {
                    Delivery::Refused(reason) => {
                        assert!(reason.contains(&format!("{name:?}")), "{reason}")
                    }
                    other => panic!("{name}: unexpected {other:?}"),
                }
            }
            assert!(receiver.requests().is_empty());
        })
        .await;
    }

    #[tokio::test]
    async fn https_with_extra_ca_is_accepted_over_http2() {
        bounded(async {
            let pki = make_pki();
            let tls = server_tls(&pki, &[b"h2", b"http/1.1"]);
            let receiver = Receiver::start_with(200, Bytes::new(), Some(tls)).await;
            let ca = write_temp(pki.ca_pem.as_bytes());
            let hook = Webhook::new(TEST_TIMEOUT, Some(ca.path())).unwrap();

            let target = target(receiver.url("https", "/secure"), &[("Authorization", "k")]);
            assert_eq!(hook.verify(&target).await, Ok(()));
            let body = Bytes::from_static(br#"{"registrations":[]}"#);
            assert_eq!(
                hook.deliver(&target, body.clone()).await,
                Delivery::Accepted
            );
            assert_eq!(
                hook.deliver(&target, body.clone()).await,
                Delivery::Accepted
            );

            let requests = receiver.requests();
            assert_eq!(requests.len(), 3);
            assert!(requests[0].body.is_empty());
            for request in &requests {
                assert_eq!(request.version, Version::HTTP_2);
                assert_eq!(request.method, Method::PUT);
                assert_eq!(request.path_and_query, "/secure");
                assert_eq!(request.headers["authorization"], "k");
                assert_eq!(request.headers[CONTENT_TYPE], "application/json");
            }
            assert_eq!(requests[2].body, body);
        })
        .await;
    }

    #[tokio::test]
    async fn https_http1_with_ca_bundle_is_accepted() {
        bounded(async {
            let pki = make_pki();
            let tls = server_tls(&pki, &[b"http/1.1"]);
            let receiver = Receiver::start_with(201, Bytes::new(), Some(tls)).await;
            // A bundle: an unrelated CA first, then the one that signed the server.
            let (other_ca, _) = make_ca("some other CA");
            let bundle = write_temp(format!("{other_ca}\n{}", pki.ca_pem).as_bytes());
            let hook = Webhook::new(TEST_TIMEOUT, Some(bundle.path())).unwrap();

            let target = target(
                format!("https://localhost:{}/cb", receiver.addr.port()),
                &[],
            );
            let body = Bytes::from_static(b"{}");
            assert_eq!(
                hook.deliver(&target, body.clone()).await,
                Delivery::Accepted
            );
            let requests = receiver.requests();
            assert_eq!(requests.len(), 1);
            assert_eq!(requests[0].version, Version::HTTP_11);
            assert_eq!(requests[0].body, body);
        })
        .await;
    }

    #[tokio::test]
    async fn https_without_ca_fails_on_the_certificate() {
        bounded(async {
            let pki = make_pki();
            let tls = server_tls(&pki, &[b"h2", b"http/1.1"]);
            let receiver = Receiver::start_with(200, Bytes::new(), Some(tls)).await;
            let target = target(receiver.url("https", "/secure"), &[]);

            let hook = webhook();
            match hook.deliver(&target, Bytes::from_static(b"{}")).await {
                Delivery::Retry(reason) => {
                    assert!(reason.starts_with("TLS error"), "{reason}");
                    assert!(reason.contains("certificate"), "{reason}");
                }
                other => panic!("unexpected {other:?}"),
            }
            let reason = hook.verify(&target).await.unwrap_err();
            assert!(reason.contains("certificate"), "{reason}");

            // An extra CA that did not sign the server does not help either.
            let (other_ca, _) = make_ca("some other CA");
            let ca = write_temp(other_ca.as_bytes());
            let hook = Webhook::new(TEST_TIMEOUT, Some(ca.path())).unwrap();
            match hook.deliver(&target, Bytes::from_static(b"{}")).await {
                Delivery::Retry(reason) => {
                    assert!(reason.contains("UnknownIssuer"), "{reason}")
                }
                other => panic!("unexpected {other:?}"),
            }
            assert!(receiver.requests().is_empty());
        })
        .await;
    }

    #[tokio::test]
    async fn https_name_mismatch_is_reported() {
        bounded(async {
            let pki = make_pki_for(&["callbacks.example"]);
            let tls = server_tls(&pki, &[b"http/1.1"]);
            let receiver = Receiver::start_with(200, Bytes::new(), Some(tls)).await;
            let ca = write_temp(pki.ca_pem.as_bytes());
            let hook = Webhook::new(TEST_TIMEOUT, Some(ca.path())).unwrap();
            // The extra CA knows the issuer, so the (more precise) name error is reported.
            let target = target(receiver.url("https", "/"), &[]);
            let reason = hook.verify(&target).await.unwrap_err();
            assert!(reason.starts_with("TLS error"), "{reason}");
            assert!(reason.contains("not valid for name"), "{reason}");
            assert!(receiver.requests().is_empty());
        })
        .await;
    }

    #[tokio::test]
    async fn client_and_futures_can_be_shared_across_tasks() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        fn assert_send<T: Send>(_: &T) {}
        assert_send_sync::<Webhook>();
        let hook = webhook();
        let target = target("http://127.0.0.1:9/", &[]);
        let verify = hook.verify(&target);
        assert_send(&verify);
        let deliver = hook.deliver(&target, Bytes::new());
        assert_send(&deliver);
    }

    #[test]
    fn new_rejects_unusable_ca_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        match Webhook::new(TEST_TIMEOUT, Some(&missing)) {
            Err(WebhookError::Ca { path, message }) => {
                assert_eq!(path, missing.display().to_string());
                assert!(!message.is_empty());
            }
            other => panic!("unexpected {:?}", other.err()),
        }

        let garbage = write_temp(b"this is not a certificate\n\x00\x01\x02");
        assert!(matches!(
            Webhook::new(TEST_TIMEOUT, Some(garbage.path())),
            Err(WebhookError::Ca { .. })
        ));

        let empty = write_temp(b"");
        assert!(matches!(
            Webhook::new(TEST_TIMEOUT, Some(empty.path())),
            Err(WebhookError::Ca { .. })
        ));

        let broken = write_temp(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        assert!(matches!(
            Webhook::new(TEST_TIMEOUT, Some(broken.path())),
            Err(WebhookError::Ca { .. })
        ));

        // A directory is not a CA file either.
        assert!(matches!(
            Webhook::new(TEST_TIMEOUT, Some(dir.path())),
            Err(WebhookError::Ca { .. })
        ));

        let message = Webhook::new(TEST_TIMEOUT, Some(&missing))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.starts_with("cannot read CA file "), "{message}");
        assert!(message.contains("missing.pem"), "{message}");
    }
}
