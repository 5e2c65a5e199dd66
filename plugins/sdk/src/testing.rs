//! For plugin unit tests: an in-memory host ([`MemoryHost`]: state in a map, log lines
//! collected); helpers that call a plugin with JSON and decode its answer ([`call_json`],
//! [`authenticate`] with an [`auth_request`], [`call_http`]); and checks of what a plugin
//! refuses ([`assert_bad_input_refused`], [`assert_config_field_refused`]) and answers
//! ([`assert_auth_routes_operations`], [`assert_bootstrap_creates_nothing`],
//! [`assert_new_plugin_bootstraps_nothing`]).
//!
//! ```ignore
//! let host = MemoryHost::new();
//! let mut p = MyPlugin::create(serde_json::json!({}), host.host()).unwrap();
//! let verdict = authenticate(&mut p, &auth_request("GET", "/endpoints", &[("x-key", "k")]));
//! ```

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::auth::{AuthRequest, AuthVerdict, OP_AUTHENTICATE, OP_BOOTSTRAP, PrincipalSpec};
use crate::http::{HttpRequest, HttpResponse, OP_HTTP, OP_ROUTES, RoutesResponse};
use crate::{ABI_VERSION, Buf, Dispatch, Host, HostApi, Kind, Plugin, level};

#[derive(Default)]
struct Inner {
    state: BTreeMap<String, Vec<u8>>,
    logs: Vec<(u32, String)>,
}

/// A host whose state lives in memory. Cloning shares the state; `host()` can be called
/// again to "restart" a plugin against the same state.
#[derive(Clone, Default)]
pub struct MemoryHost {
    inner: Arc<Mutex<Inner>>,
    /// Keeps every HostApi handed out alive as long as this host. Boxed so that each one
    /// keeps its address while the vector grows (the `Host`s point at them).
    #[allow(clippy::vec_box)]
    apis: Arc<Mutex<Vec<Box<HostApi>>>>,
}

fn with<R>(ctx: *mut c_void, f: impl FnOnce(&mut Inner) -> R) -> R {
    // SAFETY: ctx is the Arc<Mutex<Inner>> pointer made in `host()`, alive while the
    // MemoryHost is.
    let inner = unsafe { &*(ctx as *const Mutex<Inner>) };
    let mut g = inner.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut g)
}

unsafe fn text(p: *const u8, len: usize) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the caller passes a readable slice.
    String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(p, len) }).into_owned()
}

unsafe extern "C" fn log(ctx: *mut c_void, level: u32, msg: *const u8, len: usize) {
    // SAFETY: forwarded contract.
    let m = unsafe { text(msg, len) };
    with(ctx, |i| i.logs.push((level, m)));
}

unsafe extern "C" fn state_get(
    ctx: *mut c_void,
    key: *const u8,
    key_len: usize,
    out: *mut Buf,
) -> i32 {
    // SAFETY: forwarded contract.
    let k = unsafe { text(key, key_len) };
    match with(ctx, |i| i.state.get(&k).cloned()) {
        Some(v) => {
            // SAFETY: out is a valid pointer.
            unsafe { *out = Buf::from_vec(v) };
            0
        }
        None => 1,
    }
}

unsafe extern "C" fn state_put(
    ctx: *mut c_void,
    key: *const u8,
    key_len: usize,
    value: *const u8,
    value_len: usize,
) -> i32 {
    // SAFETY: forwarded contract.
    let k = unsafe { text(key, key_len) };
    let v = if value.is_null() {
        Vec::new()
    } else {
        unsafe { std::slice::from_raw_parts(value, value_len) }.to_vec()
    };
    with(ctx, |i| i.state.insert(k, v));
    0
}

unsafe extern "C" fn state_delete(ctx: *mut c_void, key: *const u8, key_len: usize) -> i32 {
    // SAFETY: forwarded contract.
    let k = unsafe { text(key, key_len) };
    with(ctx, |i| i.state.remove(&k));
    0
}

unsafe extern "C" fn state_keys(
    ctx: *mut c_void,
    prefix: *const u8,
    prefix_len: usize,
    out: *mut Buf,
) -> i32 {
    // SAFETY: forwarded contract.
    let p = unsafe { text(prefix, prefix_len) };
    let keys: Vec<String> = with(ctx, |i| {
        i.state
            .keys()
            .filter(|k| k.starts_with(&p))
            .cloned()
            .collect()
    });
    let bytes = serde_json::to_vec(&keys).unwrap_or_else(|_| b"[]".to_vec());
    // SAFETY: out is a valid pointer.
    unsafe { *out = Buf::from_vec(bytes) };
    0
}

unsafe extern "C" fn free(_ctx: *mut c_void, buf: Buf) {
    // SAFETY: the buffer was made by Buf::from_vec in this image.
    drop(unsafe { buf.into_vec() });
}

impl MemoryHost {
    pub fn new() -> MemoryHost {
        MemoryHost::default()
    }

    /// The raw host API over this state, as a host hands it to `create`; the [`Host`]s
    /// of [`MemoryHost::host`] and the SDK's own ABI test are built from it.
    fn api(&self) -> Box<HostApi> {
        Box::new(HostApi {
            abi_version: ABI_VERSION,
            ctx: Arc::as_ptr(&self.inner) as *mut c_void,
            log,
            state_get,
            state_put,
            state_delete,
            state_keys,
            free,
        })
    }

    /// A [`Host`] for one plugin instance.
    pub fn host(&self) -> Host {
        let api = self.api();
        let ptr: *const HostApi = &*api;
        self.apis
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(api);
        // SAFETY: the HostApi box is kept alive by self.apis.
        unsafe { Host::from_raw(ptr) }
    }

    /// A copy of the state.
    pub fn state(&self) -> BTreeMap<String, Vec<u8>> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state
            .clone()
    }

    /// The log lines so far, with their level.
    pub fn logs(&self) -> Vec<(u32, String)> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .logs
            .clone()
    }

    /// Whether some log line so far, of any level, contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.logs().iter().any(|(_, m)| m.contains(text))
    }

    /// The log lines of level [`level::WARN`] so far.
    pub fn warnings(&self) -> Vec<String> {
        self.logs()
            .into_iter()
            .filter(|(l, _)| *l == level::WARN)
            .map(|(_, m)| m)
            .collect()
    }

    /// Every stored key and value (UTF-8, lossily), as `key\nvalue\n` one after the other:
    /// to check that some text (a secret) is stored nowhere.
    pub fn state_text(&self) -> String {
        self.state()
            .iter()
            .map(|(k, v)| format!("{k}\n{}\n", String::from_utf8_lossy(v)))
            .collect()
    }
}

/// Header pairs as a header map (names taken as given: the host hands them over
/// lower-case).
pub fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// An [`AuthRequest`] with these header pairs (see [`headers`]).
pub fn auth_request(method: &str, path: &str, header_pairs: &[(&str, &str)]) -> AuthRequest {
    AuthRequest {
        method: method.into(),
        path: path.into(),
        headers: headers(header_pairs),
    }
}

/// An [`HttpRequest`] for a plugin's routes as the host hands it over, by `principal` (whom
/// the core authenticated), with these header pairs (see [`headers`]); no query, no backend
/// name (set them on the result where a test needs them).
pub fn http_request(
    method: &str,
    path: &str,
    header_pairs: &[(&str, &str)],
    body: &str,
    principal: PrincipalSpec,
) -> HttpRequest {
    HttpRequest {
        backend: String::new(),
        method: method.into(),
        path: path.into(),
        query: None,
        headers: headers(header_pairs),
        body: body.into(),
        principal,
    }
}

/// Hands `p` an [`http_request`] sent with `Authorization: Bearer <token>` and, when given,
/// that `content-type`; returns the status and the JSON body ([`call_http`]).
pub fn http_with_bearer<P: Dispatch>(
    p: &mut P,
    token: &str,
    principal: PrincipalSpec,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let authorization = format!("Bearer {token}");
    let mut pairs = vec![("authorization", authorization.as_str())];
    pairs.extend(content_type.map(|ct| ("content-type", ct)));
    let (resp, body) = call_http(p, &http_request(method, path, &pairs, body, principal));
    (resp.status, body)
}

/// Calls `op` with `input` as JSON and decodes the answer as JSON; panics if the call fails
/// or the answer is not JSON.
pub fn call_json<P: Dispatch>(p: &mut P, op: &str, input: &Value) -> Value {
    let out = p
        .call(op, input.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("{op} failed: {e}"));
    serde_json::from_slice(&out).expect("answer is JSON")
}

/// Asks `p` to authenticate `req` ([`OP_AUTHENTICATE`]); panics unless the answer is an
/// [`AuthVerdict`].
pub fn authenticate<P: Dispatch>(p: &mut P, req: &AuthRequest) -> AuthVerdict {
    let input = serde_json::to_value(req).expect("AuthRequest as JSON");
    serde_json::from_value(call_json(p, OP_AUTHENTICATE, &input)).expect("AuthVerdict")
}

/// Hands `req` to `p` ([`OP_HTTP`]) and returns the response with its body decoded; panics
/// unless the answer is an [`HttpResponse`] with `content-type: application/json` and a
/// JSON body.
pub fn call_http<P: Dispatch>(p: &mut P, req: &HttpRequest) -> (HttpResponse, Value) {
    let input = serde_json::to_value(req).expect("HttpRequest as JSON");
    let resp: HttpResponse =
        serde_json::from_value(call_json(p, OP_HTTP, &input)).expect("HttpResponse");
    assert_eq!(
        resp.headers.get("content-type").map(String::as_str),
        Some("application/json"),
        "{} {}",
        req.method,
        req.path
    );
    let body: Value = serde_json::from_str(&resp.body).expect("body is JSON");
    (resp, body)
}

/// Asserts that `P` is an auth backend that serves routes ([`Kind::Auth`]) and answers
/// exactly the auth operations, then the routes ones, then `own` (its own operations, in
/// the order it declares them) ([`Dispatch::operations`]).
pub fn assert_auth_routes_operations<P: Dispatch>(own: &[&str]) {
    assert_eq!(P::KIND, Kind::Auth, "{}", P::NAME);
    let mut want = vec!["authenticate", "bootstrap", "key_status", "routes", "http"];
    want.extend_from_slice(own);
    assert_eq!(P::operations(), want, "{}", P::NAME);
}

/// Asks `p` for its routes ([`OP_ROUTES`]); panics unless it answers a [`RoutesResponse`],
/// and answers the same with no input at all (as the host may call it).
pub fn routes_of<P: Dispatch>(p: &mut P) -> RoutesResponse {
    let v = call_json(p, OP_ROUTES, &serde_json::json!({}));
    let bare = p
        .call(OP_ROUTES, b"")
        .unwrap_or_else(|e| panic!("routes with no input failed: {e}"));
    let bare: Value = serde_json::from_slice(&bare).expect("answer is JSON");
    assert_eq!(bare, v, "routes with no input");
    serde_json::from_value(v).expect("RoutesResponse")
}

/// Asserts that `p` answers [`OP_BOOTSTRAP`] for `domain` with no credential created, and
/// leaves `host`'s state as it was.
pub fn assert_bootstrap_creates_nothing<P: Dispatch>(p: &mut P, host: &MemoryHost, domain: &str) {
    let before = host.state();
    let v = call_json(p, OP_BOOTSTRAP, &serde_json::json!({ "domain": domain }));
    assert_eq!(v, serde_json::json!({ "created": null }));
    assert_eq!(host.state(), before, "bootstrap changed the state");
}

/// Asserts that a new instance of `P` (settings `{}`, an empty host) stores nothing, and
/// that its [`OP_BOOTSTRAP`] for `domain` creates nothing either
/// ([`assert_bootstrap_creates_nothing`]); returns the host, for checks of the log.
pub fn assert_new_plugin_bootstraps_nothing<P: Plugin + Dispatch>(domain: &str) -> MemoryHost {
    let host = MemoryHost::new();
    let mut p = P::create(serde_json::json!({}), host.host()).expect("create");
    assert!(host.state().is_empty(), "a new plugin stored state");
    assert_bootstrap_creates_nothing(&mut p, &host, domain);
    host
}

/// Inputs that are no operation's JSON document: empty, truncated, an array, not UTF-8.
pub const BAD_INPUTS: [&[u8]; 4] = [b"", b"{", b"[]", b"\xff\xfe"];

/// Asserts that `p` answers an unknown operation (`nope`) with an error that names it and
/// lists every operation it answers ([`Dispatch::operations`]), and each of
/// `ops` with an error for each of [`BAD_INPUTS`] and of `also` (say `{}` for operations
/// whose input has required fields).
pub fn assert_bad_input_refused<P: Dispatch>(p: &mut P, ops: &[&str], also: &[&[u8]]) {
    let unknown = p.call("nope", b"{}").unwrap_err();
    assert!(unknown.contains("nope"), "{unknown}");
    for op in P::operations() {
        assert!(
            unknown.contains(&format!("{op:?}")),
            "{op} not listed: {unknown}"
        );
    }
    for op in ops {
        for input in BAD_INPUTS.iter().chain(also) {
            assert!(p.call(op, input).is_err(), "{op} {input:?}");
        }
    }
}

/// Asserts that `P` accepts the configuration `{}` and refuses `{field: value}` with an
/// error that names `field` (an unknown field, say).
pub fn assert_config_field_refused<P: Dispatch>(field: &str, value: Value) {
    let host = MemoryHost::new();
    assert!(P::create(Value::Object(Default::default()), host.host()).is_ok());
    let config = Value::Object([(field.to_string(), value)].into_iter().collect());
    let err = P::create(config, host.host())
        .err()
        .expect("unknown field refused");
    assert!(err.contains(field), "{err}");
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::auth::KeyStatusRequest;
    use crate::{AuthPlugin, Buf, RoutesPlugin};

    /// Accepts a request whose `x-key` header is `k`; answers every route with its path
    /// (and panics on `/panic`); its own operation `echo` answers its input.
    struct Echo {
        host: Host,
    }

    impl Plugin for Echo {
        const NAME: &'static str = "echo";

        fn create(config: Value, host: Host) -> Result<Self, String> {
            match config.as_object().and_then(|o| o.keys().next()) {
                Some(field) => Err(format!("unknown field {field}")),
                None => Ok(Echo { host }),
            }
        }
    }

    impl AuthPlugin for Echo {
        fn authenticate(&mut self, req: AuthRequest) -> Result<AuthVerdict, String> {
            Ok(match req.headers.get("x-key").map(String::as_str) {
                Some("k") => AuthVerdict::Accepted {
                    principal: PrincipalSpec {
                        key_id: req.method,
                        domain: req.path,
                        scopes: Vec::new(),
                        allow: None,
                        creator: None,
                    },
                    cache: None,
                },
                _ => AuthVerdict::NotMine,
            })
        }
    }

    impl RoutesPlugin for Echo {
        fn routes(&mut self) -> Result<RoutesResponse, String> {
            Ok(RoutesResponse::default())
        }

        fn http(&mut self, req: HttpRequest) -> Result<HttpResponse, String> {
            if req.path == "/panic" {
                panic!("asked to panic");
            }
            self.host.warn(&format!("served {}", req.path));
            self.host.info("info line");
            self.host.state_put("k\u{e9}y", b"v\xffalue")?;
            Ok(HttpResponse::json(200, &json!({"path": req.path})))
        }
    }

    #[derive(serde::Deserialize, serde::Serialize)]
    #[serde(deny_unknown_fields)]
    struct Said {
        said: String,
    }

    impl Echo {
        fn echo(&mut self, req: Option<Said>) -> Result<Said, String> {
            match req {
                Some(s) if s.said == "fail" => Err("echo: asked to fail".into()),
                Some(s) => Ok(s),
                None => Ok(Said {
                    said: "nothing".into(),
                }),
            }
        }
    }

    crate::declare_plugin!(Echo: auth + routes, operations { "echo" => Echo::echo });

    #[test]
    fn helpers_call_the_plugin_with_json() {
        let host = MemoryHost::new();
        let mut p = Echo::create(json!({}), host.host()).unwrap();

        let req = auth_request("GET", "/endpoints", &[("x-key", "k"), ("other", "v")]);
        assert_eq!(req.headers, headers(&[("other", "v"), ("x-key", "k")]));
        match authenticate(&mut p, &req) {
            AuthVerdict::Accepted { principal, .. } => {
                assert_eq!(
                    (principal.key_id.as_str(), principal.domain.as_str()),
                    ("GET", "/endpoints")
                );
            }
            other => panic!("expected Accepted, got {other:?}"),
        }
        let req = auth_request("GET", "/endpoints", &[]);
        assert_eq!(authenticate(&mut p, &req), AuthVerdict::NotMine);

        let req = request("/x");
        let (resp, body) = call_http(&mut p, &req);
        assert_eq!(resp.status, 200);
        assert_eq!(body, json!({"path": "/x"}));
        assert_eq!(host.warnings(), vec!["served /x".to_string()]);
        assert_eq!(host.logs().len(), 2);
        assert!(host.logged("ved /x"));
        assert!(!host.logged("/y"));
        assert_eq!(host.state_text(), "k\u{e9}y\nv\u{fffd}alue\n");

        assert_bad_input_refused(&mut p, &[OP_AUTHENTICATE, OP_HTTP], &[b"{}"]);
        assert_config_field_refused::<Echo>("hash", json!("md5"));
        assert!(
            p.call(OP_HTTP, b"[]")
                .unwrap_err()
                .starts_with("http: bad input: ")
        );
    }

    fn request(path: &str) -> HttpRequest {
        let principal = PrincipalSpec {
            key_id: "id".into(),
            domain: "d".into(),
            scopes: Vec::new(),
            allow: None,
            creator: None,
        };
        http_request("GET", path, &[], "", principal)
    }

    #[test]
    fn routes_of_and_the_bootstrap_check_read_the_plugin() {
        let host = MemoryHost::new();
        let mut p = Echo::create(json!({}), host.host()).unwrap();
        assert!(routes_of(&mut p).routes.is_empty());
        assert_bootstrap_creates_nothing(&mut p, &host, "d");
        host.host().state_put("k", b"v").unwrap();
        assert_bootstrap_creates_nothing(&mut p, &host, "d");
        assert!(
            assert_new_plugin_bootstraps_nothing::<Echo>("d")
                .logs()
                .is_empty()
        );
    }

    #[test]
    #[should_panic(expected = "echo")]
    fn assert_auth_routes_operations_refuses_another_list() {
        assert_auth_routes_operations::<Echo>(&["echo", "more"]);
    }

    #[test]
    fn the_dispatcher_lists_what_it_answers() {
        assert_eq!(<Echo as Dispatch>::KIND, Kind::Auth);
        assert_eq!(
            Echo::operations(),
            [
                "authenticate",
                "bootstrap",
                "key_status",
                "routes",
                "http",
                "echo"
            ]
        );
        assert_auth_routes_operations::<Echo>(&["echo"]);
        let host = MemoryHost::new();
        let mut p = Echo::create(json!({}), host.host()).unwrap();
        assert_eq!(
            p.call("nope", b"{}").unwrap_err(),
            "echo: unknown operation \"nope\"; it answers \"authenticate\", \"bootstrap\", \
             \"key_status\", \"routes\", \"http\", \"echo\""
        );
        // Operation names are matched exactly.
        assert!(
            p.call("Authenticate", b"{}")
                .unwrap_err()
                .contains("unknown operation")
        );
        assert!(
            p.call("", b"{}")
                .unwrap_err()
                .contains("unknown operation \"\"")
        );
    }

    #[test]
    fn the_dispatcher_decodes_inputs_and_encodes_answers() {
        let host = MemoryHost::new();
        let mut p = Echo::create(json!({}), host.host()).unwrap();
        // The defaults of the auth trait: bootstrap creates nothing; key_status is an
        // error (the backend cannot vouch for its keys).
        assert_eq!(
            call_json(&mut p, "bootstrap", &json!({"domain": "d"})),
            json!({"created": null})
        );
        let input = serde_json::to_vec(&KeyStatusRequest { key_id: "k".into() }).unwrap();
        let why = p.call("key_status", &input).unwrap_err();
        assert!(why.starts_with("echo: key_status is not answered"), "{why}");
        // `routes` reads no input.
        for input in [&b""[..], b"{}", b"not json"] {
            assert_eq!(p.call(OP_ROUTES, input).unwrap(), br#"{"routes":[]}"#);
        }
        // A plugin's own operation: typed input and answer; an `Option` input may be
        // left out; the method's error is the call's.
        assert_eq!(
            call_json(&mut p, "echo", &json!({"said": "hi"})),
            json!({"said": "hi"})
        );
        for blank in [&b""[..], b" \n", b"null"] {
            assert_eq!(p.call("echo", blank).unwrap(), br#"{"said":"nothing"}"#);
        }
        assert_eq!(
            p.call("echo", br#"{"said":"fail"}"#).unwrap_err(),
            "echo: asked to fail"
        );
        assert!(
            p.call("echo", br#"{"said":"x","more":1}"#)
                .unwrap_err()
                .starts_with("echo: bad input: unknown field `more`")
        );
        // A required input left out is "no input", not a parse error at column 0.
        assert_eq!(
            p.call("authenticate", b"").unwrap_err(),
            "authenticate: bad input: no input (a JSON document is expected)"
        );
        assert_bad_input_refused(
            &mut p,
            &["authenticate", "bootstrap", "key_status", "http"],
            &[b"{}"],
        );
    }

    #[test]
    fn panics_in_typed_methods_are_caught_at_the_boundary() {
        let table = plugin_table();
        assert_eq!(table.kind, Kind::Auth as u32);
        assert_eq!(table.abi_version, crate::ABI_VERSION);
        // SAFETY: the table of this image; the name is static.
        assert_eq!(unsafe { table.name() }, "echo");
        let host = MemoryHost::new();
        let api = host.api();
        let mut instance = std::ptr::null_mut();
        let mut err = Buf::EMPTY;
        // SAFETY: the ABI contract, as the host keeps it: valid slices and out pointers,
        // `api` alive until the instance is destroyed.
        let rc = unsafe { (table.create)(b"{}".as_ptr(), 2, &*api, &mut instance, &mut err) };
        assert_eq!(rc, 0);
        let call = |op: &str, input: &[u8]| {
            // SAFETY: as above; one call at a time.
            let (rc, bytes) = unsafe { table.call_instance(instance, op, input) };
            (rc, String::from_utf8(bytes).unwrap())
        };
        let input = serde_json::to_string(&request("/panic")).unwrap();
        let (rc, message) = call("http", input.as_bytes());
        assert_eq!(rc, 2, "{message}");
        assert!(
            message.starts_with("plugin panicked at ") && message.ends_with(": asked to panic"),
            "{message}"
        );
        // The instance serves on; an error is rc 1, an answer rc 0.
        let (rc, message) = call("nope", b"{}");
        assert_eq!(rc, 1);
        assert!(
            message.starts_with("echo: unknown operation \"nope\""),
            "{message}"
        );
        let (rc, message) = call("http", b"[");
        assert_eq!(rc, 1);
        assert!(message.starts_with("http: bad input: "), "{message}");
        let input = serde_json::to_string(&request("/x")).unwrap();
        let (rc, message) = call("http", input.as_bytes());
        assert_eq!(rc, 0, "{message}");
        assert!(message.contains(r#"\"path\":\"/x\""#), "{message}");
        // SAFETY: created above, destroyed once.
        unsafe { (table.destroy)(instance) };
        drop(api);
    }
}
