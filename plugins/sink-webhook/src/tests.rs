//! Tests of the plugin, driven through its operations ([`Plugin::create`] with a
//! [`MemoryHost`], then [`Dispatch::call`] with JSON) against real receivers.
//!
//! `call` blocks on the instance's own runtime, so the tests are plain `#[test]`s, outside
//! any runtime, and every receiver runs on a runtime (and worker thread) of its own.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use connectord_plugin_sdk::sink::{
    DeliverRequest, DeliverResponse, OP_DELIVER, OP_SCHEMES, OP_VERIFY, Target, VerifyRequest,
    VerifyResponse,
};
use connectord_plugin_sdk::testing::MemoryHost;
use connectord_plugin_sdk::{ABI_VERSION, Dispatch, Kind, Plugin, level};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;

use super::*;

/// The request timeout of the tests' plugin instances (only reached when something is wrong).
const TEST_TIMEOUT_S: u64 = 5;
/// Upper bound of a whole test.
const TEST_BOUND: Duration = Duration::from_secs(10);

/// Runs a test body on a thread of its own and fails if it takes longer than [`TEST_BOUND`].
fn bounded<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(body());
    });
    match rx.recv_timeout(TEST_BOUND) {
        Ok(value) => {
            let _ = handle.join();
            value
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test took longer than {TEST_BOUND:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the body ended without an answer"),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// The plugin, through its interface.

/// A plugin instance and the host it logs to.
struct Sink {
    plugin: WebhookSink,
    host: MemoryHost,
}

impl Sink {
    fn create(config: Value) -> Result<Sink, String> {
        let host = MemoryHost::new();
        let plugin = WebhookSink::create(config, host.host())?;
        Ok(Sink { plugin, host })
    }

    /// An instance with the test timeout and, optionally, an extra CA file.
    fn new(ca_file: Option<&std::path::Path>) -> Sink {
        let mut config = json!({ "timeout_s": TEST_TIMEOUT_S });
        if let Some(path) = ca_file {
            config["ca_file"] = json!(path.to_str().unwrap());
        }
        Sink::create(config).unwrap()
    }

    fn call(&mut self, op: &str, input: &[u8]) -> Result<Vec<u8>, String> {
        self.plugin.call(op, input)
    }

    fn verify(&mut self, target: &Target) -> VerifyResponse {
        let input = serde_json::to_vec(&VerifyRequest {
            target: target.clone(),
        })
        .unwrap();
        let answer = self.call(OP_VERIFY, &input).unwrap();
        serde_json::from_slice(&answer).unwrap()
    }

    /// `Ok(())` or the reason, like the old `Webhook::verify`.
    fn verify_result(&mut self, target: &Target) -> Result<(), String> {
        match self.verify(target) {
            VerifyResponse {
                ok: true,
                reason: None,
            } => Ok(()),
            VerifyResponse {
                ok: false,
                reason: Some(reason),
            } => Err(reason),
            other => panic!("inconsistent answer {other:?}"),
        }
    }

    fn deliver(&mut self, target: &Target, body: &str) -> DeliverResponse {
        let input = serde_json::to_vec(&DeliverRequest {
            target: target.clone(),
            body: body.to_string(),
            key_id: Some("k1".into()),
        })
        .unwrap();
        let answer = self.call(OP_DELIVER, &input).unwrap();
        serde_json::from_slice(&answer).unwrap()
    }
}

fn target(url: impl Into<String>, headers: &[(&str, &str)]) -> Target {
    Target {
        url: url.into(),
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
    }
}

fn retry(reason: &str) -> DeliverResponse {
    DeliverResponse::Retry {
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Receivers.

#[derive(Debug, Clone)]
struct Recorded {
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
    body: Bytes,
    version: Version,
}

/// A runtime with one worker thread, for a receiver.
fn receiver_runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// An HTTP receiver (HTTP/1.1 and, with TLS, HTTP/2 via ALPN) on 127.0.0.1 that records every
/// request and answers with a fixed status and body. It runs on a runtime of its own, stopped
/// when it is dropped.
struct Receiver {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    rt: Option<Runtime>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Receiver {
    fn start(status: u16) -> Receiver {
        Receiver::start_with(status, Bytes::from_static(b"{}"), None)
    }

    fn start_with(status: u16, answer: Bytes, tls: Option<Arc<ServerConfig>>) -> Receiver {
        Receiver::start_full(status, answer, tls, None)
    }

    /// With `life`, every connection is cut (without notice: no `Connection: close`, no
    /// GOAWAY, no TLS close_notify) that long after it was accepted, like a receiver that
    /// closes idle keep-alive connections.
    fn start_full(
        status: u16,
        answer: Bytes,
        tls: Option<Arc<ServerConfig>>,
        life: Option<Duration>,
    ) -> Receiver {
        let rt = receiver_runtime();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let status = StatusCode::from_u16(status).unwrap();
        let recorded = requests.clone();
        rt.spawn(async move {
            let acceptor = tls.map(TlsAcceptor::from);
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let recorded = recorded.clone();
                let answer = answer.clone();
                let acceptor = acceptor.clone();
                let connection = tokio::spawn(async move {
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
                                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
                if let Some(life) = life {
                    tokio::spawn(async move {
                        tokio::time::sleep(life).await;
                        connection.abort();
                    });
                }
            }
        });
        Receiver {
            addr,
            requests,
            rt: Some(rt),
        }
    }

    fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://{}{path}", self.addr)
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------------------------
// A private PKI.

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
    file.write_all(contents).unwrap();
    file
}

// ---------------------------------------------------------------------------------------------
// The plugin's identity, configuration and protocol.

#[test]
fn plugin_table_announces_the_webhook_sink() {
    let table = plugin_table();
    assert_eq!(table.abi_version, ABI_VERSION);
    // SAFETY: the table of this very image.
    assert_eq!(unsafe { table.name() }, "webhook");
    assert_eq!(Kind::from_u32(table.kind), Some(Kind::Sink));
}

#[test]
fn config_defaults_and_checks() {
    assert_eq!(Config::from_json(json!({})), Ok(Config::default()));
    assert_eq!(Config::default().timeout_s, 10);
    assert_eq!(
        Config::from_json(json!({"timeout_s": 1, "ca_file": "/etc/ca.pem"})),
        Ok(Config {
            timeout_s: 1,
            ca_file: Some("/etc/ca.pem".into()),
        })
    );
    assert_eq!(
        Config::from_json(json!({"timeout_s": MAX_TIMEOUT_S}))
            .unwrap()
            .timeout_s,
        MAX_TIMEOUT_S
    );
    for (config, expected) in [
        (
            json!({"timeout_s": 0}),
            "timeout_s must lie between 1 and 3600 (got 0)",
        ),
        (
            json!({"timeout_s": 3601}),
            "timeout_s must lie between 1 and 3600",
        ),
        (
            json!({"timeout_s": u64::MAX}),
            "timeout_s must lie between 1 and 3600",
        ),
        (json!({"timeout_s": -1}), "invalid value"),
        (json!({"timeout_s": "10"}), "invalid type"),
        (json!({"timeout": 10}), "unknown field `timeout`"),
        (json!({"ca_file": ""}), "ca_file must not be empty"),
        (json!({"ca_file": 7}), "invalid type"),
        (json!([]), "expected a table, got []"),
        (json!([5]), "expected a table"),
        (Value::Null, "expected a table, got null"),
        (json!("timeout_s = 5"), "expected a table"),
    ] {
        let message = Config::from_json(config.clone()).unwrap_err();
        assert!(
            message.starts_with("invalid webhook configuration: "),
            "{config}: {message}"
        );
        assert!(message.contains(expected), "{config}: {message}");
        // create refuses it with the same message.
        assert_eq!(Sink::create(config).err(), Some(message));
    }
}

#[test]
fn create_logs_its_setup() {
    let sink = Sink::create(json!({})).unwrap();
    let logs = sink.host.logs();
    let ready: Vec<&String> = logs
        .iter()
        .filter(|(lvl, _)| *lvl == level::INFO)
        .map(|(_, m)| m)
        .collect();
    assert_eq!(ready.len(), 1, "{logs:?}");
    assert!(
        ready[0].starts_with("webhook sink ready: timeout 10s, "),
        "{}",
        ready[0]
    );
    assert!(
        ready[0].ends_with("system root certificate(s)"),
        "{}",
        ready[0]
    );
    assert!(
        logs.iter().any(
            |(lvl, m)| *lvl == level::DEBUG && m.ends_with("system root certificate(s) loaded")
        ),
        "{logs:?}"
    );

    let pki = make_pki();
    let (other_ca, _) = make_ca("some other CA");
    let bundle = write_temp(format!("{other_ca}\n{}", pki.ca_pem).as_bytes());
    let sink = Sink::new(Some(bundle.path()));
    let path = bundle.path().display().to_string();
    assert!(
        sink.host.logs().iter().any(|(lvl, m)| *lvl == level::INFO
            && m.starts_with("webhook sink ready: timeout 5s, ")
            && m.ends_with(&format!(" + 2 from {path}"))),
        "{:?}",
        sink.host.logs()
    );
}

#[test]
fn bad_input_and_unknown_operations_are_errors() {
    assert_eq!(<WebhookSink as Dispatch>::KIND, Kind::Sink);
    assert_eq!(WebhookSink::operations(), ["verify", "deliver", "schemes"]);
    // The default schemes of a sink: HTTP callbacks.
    let mut sink = Sink::new(None);
    assert_eq!(
        sink.call(OP_SCHEMES, b"").unwrap(),
        br#"{"schemes":["http","https"]}"#
    );
    bounded(|| {
        let receiver = Receiver::start(200);
        let mut sink = Sink::new(None);
        let url = receiver.url("http", "/");
        for (op, input) in [
            (OP_VERIFY, b"".to_vec()),
            (OP_VERIFY, b"not json".to_vec()),
            (OP_VERIFY, b"{}".to_vec()),
            (OP_VERIFY, br#"{"target": {"url": 7}}"#.to_vec()),
            (OP_VERIFY, json!({"url": url}).to_string().into_bytes()),
            (OP_DELIVER, b"[]".to_vec()),
            // No body.
            (
                OP_DELIVER,
                json!({"target": {"url": url}}).to_string().into_bytes(),
            ),
            // A body that is not a string.
            (
                OP_DELIVER,
                json!({"target": {"url": url}, "body": {"a": 1}})
                    .to_string()
                    .into_bytes(),
            ),
            (OP_DELIVER, vec![0xff, 0xfe, 0x00]),
        ] {
            let message = sink.call(op, &input).unwrap_err();
            assert!(
                message.starts_with(&format!("{op}: bad input: ")),
                "{op} {:?}: {message}",
                String::from_utf8_lossy(&input)
            );
        }
        let valid = json!({"target": {"url": url}}).to_string().into_bytes();
        for op in ["", "Verify", "authenticate", "deliver "] {
            let message = sink.call(op, &valid).unwrap_err();
            assert_eq!(
                message,
                format!(
                    "webhook: unknown operation {op:?}; it answers \"verify\", \"deliver\", \"schemes\""
                )
            );
        }
        assert!(receiver.requests().is_empty());

        // The instance still works, and `headers` may be left out.
        let answer = sink.call(OP_VERIFY, &valid).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&answer).unwrap(),
            json!({"ok": true})
        );
        let input = json!({"target": {"url": url}, "body": "{}"}).to_string();
        let answer = sink.call(OP_DELIVER, input.as_bytes()).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&answer).unwrap(),
            json!({"result": "accepted"})
        );
        assert_eq!(receiver.requests().len(), 2);
    });
}

#[tokio::test]
async fn calls_and_drop_inside_a_runtime_do_not_panic() {
    // The host never does this; the plugin refuses instead of panicking.
    let mut sink = Sink::new(None);
    let input = serde_json::to_vec(&VerifyRequest {
        target: target("http://127.0.0.1:9/", &[]),
    })
    .unwrap();
    assert_eq!(
        sink.call(OP_VERIFY, &input).unwrap_err(),
        "the webhook sink cannot be called from inside a tokio runtime"
    );
    drop(sink);
}

#[test]
fn client_and_futures_can_be_shared_across_tasks() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    fn assert_send<T: Send>(_: &T) {}
    assert_send_sync::<Webhook>();
    // The host moves the instance to its thread for the plugin.
    fn assert_sendable<T: Send + 'static>() {}
    assert_sendable::<WebhookSink>();
    let host = MemoryHost::new();
    let hook = Webhook::new(Duration::from_secs(TEST_TIMEOUT_S), None, &host.host()).unwrap();
    let target = target("http://127.0.0.1:9/", &[]);
    let verify = hook.verify(&target);
    assert_send(&verify);
    let deliver = hook.deliver(&target, Bytes::new());
    assert_send(&deliver);
}

// ---------------------------------------------------------------------------------------------
// Delivery over HTTP.

#[test]
fn verify_sends_put_with_headers_and_empty_body() {
    bounded(|| {
        let receiver = Receiver::start(200);
        let mut sink = Sink::new(None);
        let target = target(
            receiver.url("http", "/hooks/mbed?key=abc"),
            &[("Authorization", "Bearer s3cret"), ("x-custom", "42")],
        );
        assert_eq!(
            sink.verify(&target),
            VerifyResponse {
                ok: true,
                reason: None
            }
        );

        let requests = receiver.requests();
        assert_eq!(requests.len(), 1);
        let request = &requests[0];
        assert_eq!(request.method, Method::PUT);
        assert_eq!(request.path_and_query, "/hooks/mbed?key=abc");
        assert_eq!(request.headers["authorization"], "Bearer s3cret");
        assert_eq!(request.headers["x-custom"], "42");
        assert_eq!(request.headers[CONTENT_TYPE], "application/json");
        assert!(request.body.is_empty());
    });
}

#[test]
fn deliver_sends_body_and_content_type() {
    bounded(|| {
        let receiver = Receiver::start(204);
        let mut sink = Sink::new(None);
        let target = target(
            receiver.url("http", "/notify"),
            &[("X-Token", "t0k3n"), ("Content-Type", "text/plain")],
        );
        let body = r#"{"notifications":[{"ep":"demo","path":"/3/0/0"}]}"#;
        assert_eq!(sink.deliver(&target, body), DeliverResponse::Accepted);
        // A second delivery (on the pooled connection) works as well.
        assert_eq!(sink.deliver(&target, body), DeliverResponse::Accepted);

        let requests = receiver.requests();
        assert_eq!(requests.len(), 2);
        for request in &requests {
            assert_eq!(request.method, Method::PUT);
            assert_eq!(request.path_and_query, "/notify");
            assert_eq!(request.headers["x-token"], "t0k3n");
            // The body is JSON whatever the callback's headers say.
            assert_eq!(request.headers.get_all(CONTENT_TYPE).iter().count(), 1);
            assert_eq!(request.headers[CONTENT_TYPE], "application/json");
            assert_eq!(request.body, body.as_bytes());
            assert_eq!(request.version, Version::HTTP_11);
        }
    });
}

#[test]
fn statuses_are_classified() {
    bounded(|| {
        let mut sink = Sink::new(None);
        // Every answer but 2xx and those refusing the body is retried (within the host's 15
        // minutes): a 404, 401 or 3xx was refused, and the batch discarded at once.
        for (status, retry) in [
            (500, true),
            (503, true),
            (429, true),
            (408, true),
            (404, true),
            (401, true),
            (410, true),
            (301, true),
            (400, false),
            (413, false),
            (415, false),
            (422, false),
        ] {
            let receiver = Receiver::start(status);
            let target = target(receiver.url("http", "/"), &[]);
            let outcome = sink.deliver(&target, "{}");
            match (&outcome, retry) {
                (DeliverResponse::Retry { reason }, true)
                | (DeliverResponse::Refused { reason }, false) => {
                    assert!(reason.contains(&status.to_string()), "{status}: {reason}");
                }
                _ => panic!("status {status}: unexpected {outcome:?}"),
            }
            let verified = sink.verify_result(&target);
            let reason = verified.expect_err("verify must fail on a non-2xx status");
            assert!(reason.contains(&status.to_string()), "{reason}");
        }

        let receiver = Receiver::start(404);
        let reason = sink
            .verify_result(&target(receiver.url("http", "/missing"), &[]))
            .unwrap_err();
        assert_eq!(reason, "callback URL answered 404 Not Found");
        let later = sink.deliver(&target(receiver.url("http", "/missing"), &[]), "{}");
        assert_eq!(later, retry("callback URL answered 404 Not Found"));

        let receiver = Receiver::start(503);
        let outcome = sink.deliver(&target(receiver.url("http", "/"), &[]), "{}");
        assert_eq!(
            outcome,
            retry("callback URL answered 503 Service Unavailable")
        );
    });
}

#[test]
fn large_response_body_is_discarded() {
    bounded(|| {
        let answer = Bytes::from(vec![b'x'; 200 * 1024]);
        let receiver = Receiver::start_with(200, answer, None);
        let mut sink = Sink::new(None);
        let target = target(receiver.url("http", "/"), &[]);
        assert_eq!(sink.deliver(&target, "[]"), DeliverResponse::Accepted);
        assert_eq!(sink.deliver(&target, "[]"), DeliverResponse::Accepted);
        assert_eq!(receiver.requests().len(), 2);
    });
}

#[test]
fn nothing_listening_is_retry() {
    bounded(|| {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let mut sink = Sink::new(None);
        let target = target(format!("http://127.0.0.1:{port}/cb"), &[]);
        assert_eq!(
            sink.deliver(&target, "{}"),
            retry("cannot connect to callback URL: connection refused")
        );
        let reason = sink.verify_result(&target).unwrap_err();
        assert_eq!(reason, "cannot connect to callback URL: connection refused");
    });
}

#[test]
fn silent_receiver_times_out() {
    bounded(|| {
        // Connections complete in the kernel's backlog; nothing is ever read or answered.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut sink = Sink::create(json!({"timeout_s": 1})).unwrap();
        let target = target(format!("http://{addr}/cb"), &[]);

        let started = Instant::now();
        let outcome = sink.deliver(&target, "{}");
        let elapsed = started.elapsed();
        assert_eq!(outcome, retry("callback URL did not answer within 1s"));
        assert!(elapsed >= Duration::from_millis(950), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");

        let started = Instant::now();
        let reason = sink.verify_result(&target).unwrap_err();
        assert_eq!(reason, "callback URL did not answer within 1s");
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(listener);
    });
}

#[test]
fn receiver_closing_idle_connections_is_harmless() {
    bounded(|| {
        // The plugin's runtime only runs during a call, so the client learns that a pooled
        // connection was closed by the receiver only at the next call: it must notice it
        // before reusing the connection.
        let life = Duration::from_millis(300);
        let receiver = Receiver::start_full(204, Bytes::new(), None, Some(life));
        let mut sink = Sink::new(None);
        let target = target(receiver.url("http", "/cb"), &[]);
        for _ in 0..3 {
            assert_eq!(sink.deliver(&target, "{}"), DeliverResponse::Accepted);
            std::thread::sleep(2 * life);
        }
        assert_eq!(receiver.requests().len(), 3);
    });
}

#[test]
fn receiver_closing_idle_http2_connections_is_harmless() {
    bounded(|| {
        let pki = make_pki();
        let tls = server_tls(&pki, &[b"h2"]);
        let life = Duration::from_millis(300);
        let receiver = Receiver::start_full(200, Bytes::new(), Some(tls), Some(life));
        let ca = write_temp(pki.ca_pem.as_bytes());
        let mut sink = Sink::new(Some(ca.path()));
        let target = target(receiver.url("https", "/cb"), &[]);
        for _ in 0..3 {
            assert_eq!(sink.deliver(&target, "{}"), DeliverResponse::Accepted);
            std::thread::sleep(2 * life);
        }
        let requests = receiver.requests();
        assert_eq!(requests.len(), 3);
        assert!(requests.iter().all(|r| r.version == Version::HTTP_2));
    });
}

/// The reason `url` is refused, asserting that verifying and delivering to it both
/// refuse it, for the same reason.
fn refused(sink: &mut Sink, url: &str) -> String {
    let target = target(url.to_string(), &[]);
    let reason = sink.verify_result(&target).unwrap_err();
    match sink.deliver(&target, "{}") {
        DeliverResponse::Refused { reason: r } => assert_eq!(r, reason, "{url}"),
        other => panic!("{url}: unexpected {other:?}"),
    }
    reason
}

#[test]
fn bad_urls_are_rejected_without_network() {
    bounded(|| {
        let receiver = Receiver::start(200);
        let mut sink = Sink::new(None);
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
            let reason = refused(&mut sink, &url);
            assert!(
                reason.starts_with("invalid callback URL"),
                "{url}: {reason}"
            );
        }
        assert_eq!(
            sink.verify_result(&target("ftp://x", &[])),
            Err(
                "invalid callback URL \"ftp://x\": scheme \"ftp\" is not supported (use http or https)"
                    .into()
            )
        );
        assert!(receiver.requests().is_empty());
    });
}

/// A URL with user information was accepted and its credentials dropped: every request
/// reached the receiver without them. It is refused, and the reason does not repeat the
/// password.
#[test]
fn a_url_with_user_information_is_refused_without_repeating_it() {
    bounded(|| {
        let receiver = Receiver::start(200);
        let mut sink = Sink::new(None);
        let port = receiver.addr.port();
        for url in [
            format!("http://user:s3cret@127.0.0.1:{port}/cb"),
            format!("http://s3cret@127.0.0.1:{port}"),
            format!("https://user:s3cret@127.0.0.1:{port}?q=1"),
        ] {
            let reason = refused(&mut sink, &url);
            assert!(reason.contains("user information"), "{url}: {reason}");
            assert!(!reason.contains("s3cret"), "{url}: {reason}");
        }
        // An '@' after the authority (in the path or query) is not user information.
        let plain = format!("http://127.0.0.1:{port}/cb/a@b?to=x@y");
        assert_eq!(sink.verify_result(&target(plain, &[])), Ok(()));
        assert_eq!(
            receiver.requests().len(),
            1,
            "only the plain URL was verified"
        );
    });
}

#[test]
fn invalid_headers_are_rejected() {
    bounded(|| {
        let receiver = Receiver::start(200);
        let mut sink = Sink::new(None);
        for (name, value) in [
            ("bad name", "x"),
            ("", "x"),
            ("X-Multi-Line", "a\r\nInjected: yes"),
            ("Content-Length", "3"),
            ("transfer-encoding", "chunked"),
        ] {
            let target = target(receiver.url("http", "/"), &[(name, value)]);
            let reason = sink.verify_result(&target).unwrap_err();
            assert!(reason.contains(&format!("{name:?}")), "{reason}");
            match sink.deliver(&target, "{}") {
                DeliverResponse::Refused { reason } => {
                    assert!(reason.contains(&format!("{name:?}")), "{reason}")
                }
                other => panic!("{name}: unexpected {other:?}"),
            }
        }
        let headers: BTreeMap<String, String> =
            [("Connection".to_string(), "close".to_string())].into();
        let reason = sink
            .verify_result(&Target {
                url: receiver.url("http", "/"),
                headers,
            })
            .unwrap_err();
        assert_eq!(
            reason,
            "callback header \"Connection\" cannot be set (it is managed by the connector)"
        );
        // Content-Type is refused when a callback is registered (it was taken and never
        // sent), and skipped at delivery for a callback stored before.
        let typed = target(receiver.url("http", "/"), &[("content-TYPE", "text/plain")]);
        let reason = sink.verify_result(&typed).unwrap_err();
        assert!(
            reason.contains("\"content-TYPE\"") && reason.contains("application/json"),
            "{reason}"
        );
        assert!(receiver.requests().is_empty());
        assert_eq!(sink.deliver(&typed, "{}"), DeliverResponse::Accepted);
        assert_eq!(
            receiver.requests()[0].headers[CONTENT_TYPE],
            "application/json"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Delivery over HTTPS.

#[test]
fn https_with_extra_ca_is_accepted_over_http2() {
    bounded(|| {
        let pki = make_pki();
        let tls = server_tls(&pki, &[b"h2", b"http/1.1"]);
        let receiver = Receiver::start_with(200, Bytes::new(), Some(tls));
        let ca = write_temp(pki.ca_pem.as_bytes());
        let mut sink = Sink::new(Some(ca.path()));

        let target = target(receiver.url("https", "/secure"), &[("Authorization", "k")]);
        assert_eq!(sink.verify_result(&target), Ok(()));
        let body = r#"{"registrations":[]}"#;
        assert_eq!(sink.deliver(&target, body), DeliverResponse::Accepted);
        assert_eq!(sink.deliver(&target, body), DeliverResponse::Accepted);

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
        assert_eq!(requests[2].body, body.as_bytes());
    });
}

#[test]
fn https_http1_with_ca_bundle_is_accepted() {
    bounded(|| {
        let pki = make_pki();
        let tls = server_tls(&pki, &[b"http/1.1"]);
        let receiver = Receiver::start_with(201, Bytes::new(), Some(tls));
        // A bundle: an unrelated CA first, then the one that signed the server.
        let (other_ca, _) = make_ca("some other CA");
        let bundle = write_temp(format!("{other_ca}\n{}", pki.ca_pem).as_bytes());
        let mut sink = Sink::new(Some(bundle.path()));

        let target = target(
            format!("https://localhost:{}/cb", receiver.addr.port()),
            &[],
        );
        assert_eq!(sink.deliver(&target, "{}"), DeliverResponse::Accepted);
        let requests = receiver.requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].version, Version::HTTP_11);
        assert_eq!(requests[0].body, &b"{}"[..]);
    });
}

#[test]
fn https_without_ca_fails_on_the_certificate() {
    bounded(|| {
        let pki = make_pki();
        let tls = server_tls(&pki, &[b"h2", b"http/1.1"]);
        let receiver = Receiver::start_with(200, Bytes::new(), Some(tls));
        let target = target(receiver.url("https", "/secure"), &[]);

        let mut sink = Sink::new(None);
        match sink.deliver(&target, "{}") {
            DeliverResponse::Retry { reason } => {
                assert!(reason.starts_with("TLS error"), "{reason}");
                assert!(reason.contains("certificate"), "{reason}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let reason = sink.verify_result(&target).unwrap_err();
        assert!(reason.contains("certificate"), "{reason}");

        // An extra CA that did not sign the server does not help either.
        let (other_ca, _) = make_ca("some other CA");
        let ca = write_temp(other_ca.as_bytes());
        let mut sink = Sink::new(Some(ca.path()));
        match sink.deliver(&target, "{}") {
            DeliverResponse::Retry { reason } => {
                assert!(reason.contains("UnknownIssuer"), "{reason}")
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(receiver.requests().is_empty());
    });
}

#[test]
fn https_name_mismatch_is_reported() {
    bounded(|| {
        let pki = make_pki_for(&["callbacks.example"]);
        let tls = server_tls(&pki, &[b"http/1.1"]);
        let receiver = Receiver::start_with(200, Bytes::new(), Some(tls));
        let ca = write_temp(pki.ca_pem.as_bytes());
        let mut sink = Sink::new(Some(ca.path()));
        // The extra CA knows the issuer, so the (more precise) name error is reported.
        let target = target(receiver.url("https", "/"), &[]);
        let reason = sink.verify_result(&target).unwrap_err();
        assert!(reason.starts_with("TLS error"), "{reason}");
        assert!(reason.contains("not valid for name"), "{reason}");
        assert!(receiver.requests().is_empty());
    });
}

#[test]
fn create_rejects_unusable_ca_files() {
    let dir = tempfile::tempdir().unwrap();
    let create = |path: &std::path::Path| {
        Sink::create(json!({"ca_file": path.to_str().unwrap()}))
            .err()
            .expect("create must fail")
    };

    let missing = dir.path().join("missing.pem");
    let message = create(&missing);
    let prefix = format!("cannot read CA file {}: ", missing.display());
    assert!(message.starts_with(&prefix), "{message}");
    assert!(message.len() > prefix.len(), "{message}");
    // The client says which kind of error it is.
    let host = MemoryHost::new();
    match Webhook::new(Duration::from_secs(1), Some(&missing), &host.host()) {
        Err(WebhookError::Ca { path, message }) => {
            assert_eq!(path, missing.display().to_string());
            assert!(!message.is_empty());
        }
        other => panic!("unexpected {:?}", other.err()),
    }

    let garbage = write_temp(b"this is not a certificate\n\x00\x01\x02");
    let message = create(garbage.path());
    assert!(
        message.ends_with("no PEM certificate (-----BEGIN CERTIFICATE-----) found"),
        "{message}"
    );

    let empty = write_temp(b"");
    let message = create(empty.path());
    assert!(message.starts_with("cannot read CA file "), "{message}");
    assert!(message.ends_with("found"), "{message}");

    let broken = write_temp(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
    let message = create(broken.path());
    assert!(message.starts_with("cannot read CA file "), "{message}");

    // A directory is not a CA file either.
    let message = create(dir.path());
    assert!(
        message.starts_with(&format!("cannot read CA file {}: ", dir.path().display())),
        "{message}"
    );
}
