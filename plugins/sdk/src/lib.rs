//! The plugin SDK: the C ABI between connectord and its plugins, and a safe Rust API on
//! top of it.
//!
//! A plugin is a `cdylib` (and, to be linked into the daemon as a built-in, also an `rlib`)
//! that implements [`Plugin`] and the typed trait of its kind ([`AuthPlugin`], with
//! [`RoutesPlugin`] if it serves routes; [`SinkPlugin`]; [`RoutesPlugin`] alone for
//! [`Kind::Other`]), and invokes [`declare_plugin!`] once. The macro generates the
//! dispatcher ([`Dispatch`], [`dispatch`]: operation name → typed method, JSON decoded and
//! encoded, an unknown operation answered with the list of those it answers) and exports one
//! symbol, `connectord_plugin_<crate name>`, returning a [`PluginTable`]: the ABI version,
//! the plugin's name and kind, and `extern "C"` functions to create an instance (given its
//! configuration as JSON and the [`HostApi`]), call it (an operation name and a JSON
//! request, bytes out), free what it returned, and destroy it. Data crosses as bytes,
//! never as Rust types; each side frees only what it allocated. Every export catches
//! panics: a panicking plugin returns an error (`plugin panicked at file:line:col: …`),
//! it never unwinds into the host. Those panics are not printed by std's hook and capture
//! no backtrace (a hook the SDK installs once, which passes any other panic on).
//!
//! The host runs all calls of one loaded instance on one thread of its own, one at a
//! time (only the daemon's built-in auth backends, linked into it, have their
//! `authenticate` and `key_status` called on the caller's thread, still one call at a
//! time); a plugin needs no locking of its own and should start no threads (if it must,
//! it stops them in `Drop`). A sink plugin may run as several instances at once (the host
//! creates another when deliveries overlap, so that one slow receiver does not hold up
//! the others): each is still called one call at a time, and they share the plugin's
//! durable state.
//!
//! The requests and answers of each kind's operations are typed in [`auth`], [`sink`] and
//! [`http`]; [`decode_input`] and [`encode_answer`] carry them as JSON. Helpers that several plugins
//! share: [`names`] (checks on client-given names) and [`secret`] (random secrets and their
//! SHA-256 digests); [`testing`] is an in-memory host and call helpers for unit tests. Dates
//! and UUIDs are not the SDK's business: a plugin uses the `time` and `uuid` crates itself.

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

pub mod auth;
pub mod dispatch;
pub mod http;
pub mod names;
pub mod secret;
pub mod sink;

/// A plugin's `[plugins.settings.<name>]` table as `T`; a refused value names its key
/// (`timeout_s: invalid type: string "ten", expected u64`), which `serde_json` alone
/// does not.
pub fn settings<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.into_inner().to_string()
        } else {
            format!("{path}: {}", e.into_inner())
        }
    })
}

/// Version of the ABI below. A plugin built for another version is refused at load.
/// Bump it on any change to [`PluginTable`] or [`HostApi`].
pub const ABI_VERSION: u32 = 1;

/// Prefix of the exported entry symbol; the crate name (with `-` as `_`) follows.
pub const ENTRY_PREFIX: &str = "connectord_plugin_";

/// What a plugin is for.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An auth backend: answers [`auth::OP_AUTHENTICATE`], may serve [`http`] routes.
    Auth = 1,
    /// A notification sink: answers [`sink::OP_VERIFY`] and [`sink::OP_DELIVER`].
    Sink = 2,
    /// Anything else (may serve [`http`] routes).
    Other = 3,
}

impl Kind {
    pub fn from_u32(v: u32) -> Option<Kind> {
        match v {
            1 => Some(Kind::Auth),
            2 => Some(Kind::Sink),
            3 => Some(Kind::Other),
            _ => None,
        }
    }
}

/// A byte buffer handed across the boundary. Whoever allocated it frees it: buffers from
/// a plugin go back through [`PluginTable::free`], buffers from the host through
/// [`HostApi::free`].
#[repr(C)]
#[derive(Debug)]
pub struct Buf {
    pub ptr: *mut u8,
    pub len: usize,
    pub cap: usize,
}

impl Buf {
    pub const EMPTY: Buf = Buf {
        ptr: std::ptr::null_mut(),
        len: 0,
        cap: 0,
    };

    /// Hands a vector over (its memory now belongs to the receiver until freed).
    pub fn from_vec(v: Vec<u8>) -> Buf {
        let mut v = std::mem::ManuallyDrop::new(v);
        Buf {
            ptr: v.as_mut_ptr(),
            len: v.len(),
            cap: v.capacity(),
        }
    }

    /// Takes back a buffer made by [`Buf::from_vec`] in this same image.
    ///
    /// # Safety
    /// `self` must come from `Buf::from_vec` of this image and not be freed yet.
    pub unsafe fn into_vec(self) -> Vec<u8> {
        if self.ptr.is_null() {
            return Vec::new();
        }
        // SAFETY: per the contract, ptr/len/cap describe a live Vec<u8> of this allocator.
        unsafe { Vec::from_raw_parts(self.ptr, self.len, self.cap) }
    }

    /// Copies the bytes out without taking ownership.
    ///
    /// # Safety
    /// `ptr` must point at `len` readable bytes (or be null with `len` 0).
    pub unsafe fn to_vec(&self) -> Vec<u8> {
        if self.ptr.is_null() || self.len == 0 {
            return Vec::new();
        }
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec()
    }
}

/// Log levels for [`HostApi::log`].
pub mod level {
    pub const ERROR: u32 = 1;
    pub const WARN: u32 = 2;
    pub const INFO: u32 = 3;
    pub const DEBUG: u32 = 4;
}

/// Functions the host gives a plugin instance. `ctx` is the host's and goes back as the
/// first argument of every function. Status codes: 0 ok, 1 not found (state_get), negative
/// an error (the host logs why).
#[repr(C)]
pub struct HostApi {
    pub abi_version: u32,
    pub ctx: *mut c_void,
    pub log: unsafe extern "C" fn(ctx: *mut c_void, level: u32, msg: *const u8, len: usize),
    /// Reads a value of the plugin's durable key-value state into `out` (host-allocated).
    pub state_get: unsafe extern "C" fn(
        ctx: *mut c_void,
        key: *const u8,
        key_len: usize,
        out: *mut Buf,
    ) -> i32,
    /// Writes a value; returns once it is durable.
    pub state_put: unsafe extern "C" fn(
        ctx: *mut c_void,
        key: *const u8,
        key_len: usize,
        value: *const u8,
        value_len: usize,
    ) -> i32,
    pub state_delete: unsafe extern "C" fn(ctx: *mut c_void, key: *const u8, key_len: usize) -> i32,
    /// The keys starting with `prefix`, as a JSON array of strings, into `out`.
    pub state_keys: unsafe extern "C" fn(
        ctx: *mut c_void,
        prefix: *const u8,
        prefix_len: usize,
        out: *mut Buf,
    ) -> i32,
    /// Frees a buffer the host filled.
    pub free: unsafe extern "C" fn(ctx: *mut c_void, buf: Buf),
}

/// What the entry symbol returns. Static for the life of the image.
#[repr(C)]
pub struct PluginTable {
    pub abi_version: u32,
    /// The plugin name (what the configuration calls it), UTF-8, static.
    pub name: *const u8,
    pub name_len: usize,
    /// A [`Kind`] as u32.
    pub kind: u32,
    /// Creates an instance. 0: `*instance` is set. Else: `*err` holds a UTF-8 message.
    pub create: unsafe extern "C" fn(
        config: *const u8,
        config_len: usize,
        host: *const HostApi,
        instance: *mut *mut c_void,
        err: *mut Buf,
    ) -> i32,
    /// Calls an operation. 0: `*out` holds the answer. Else: `*out` holds an error message;
    /// 2 when the plugin panicked (caught by the SDK's shim), 1 for any other error. The
    /// host rolls a new generation back when a call of it panics on probation.
    pub call: unsafe extern "C" fn(
        instance: *mut c_void,
        op: *const u8,
        op_len: usize,
        input: *const u8,
        input_len: usize,
        out: *mut Buf,
    ) -> i32,
    /// Frees a buffer the plugin filled.
    pub free: unsafe extern "C" fn(buf: Buf),
    /// Destroys an instance (stop anything it started).
    pub destroy: unsafe extern "C" fn(instance: *mut c_void),
}

// SAFETY: the table is immutable static data (function pointers and a static string).
unsafe impl Sync for PluginTable {}
unsafe impl Send for PluginTable {}

/// The host as a plugin sees it: logging and durable key-value state.
pub struct Host {
    api: *const HostApi,
}

// SAFETY: the host promises that its functions may be called from the plugin's worker
// thread; a Host is only used there.
unsafe impl Send for Host {}

impl Host {
    /// # Safety
    /// `api` must stay valid for the life of the instance (the host guarantees it).
    pub unsafe fn from_raw(api: *const HostApi) -> Host {
        Host { api }
    }

    fn api(&self) -> &HostApi {
        // SAFETY: from_raw's contract.
        unsafe { &*self.api }
    }

    pub fn log(&self, level: u32, msg: &str) {
        let a = self.api();
        // SAFETY: a valid host function with a valid slice.
        unsafe { (a.log)(a.ctx, level, msg.as_ptr(), msg.len()) }
    }

    pub fn info(&self, msg: &str) {
        self.log(level::INFO, msg);
    }

    pub fn warn(&self, msg: &str) {
        self.log(level::WARN, msg);
    }

    fn take(&self, buf: Buf) -> Vec<u8> {
        let a = self.api();
        // SAFETY: the host filled `buf`; we copy it and hand it back to be freed.
        let v = unsafe { buf.to_vec() };
        unsafe { (a.free)(a.ctx, buf) };
        v
    }

    /// A value of the plugin's state.
    pub fn state_get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        let a = self.api();
        let mut out = Buf::EMPTY;
        // SAFETY: valid function, slices and out pointer.
        let rc = unsafe { (a.state_get)(a.ctx, key.as_ptr(), key.len(), &mut out) };
        match rc {
            0 => Ok(Some(self.take(out))),
            1 => Ok(None),
            _ => Err(format!("state_get({key}) failed ({rc})")),
        }
    }

    /// Stores a value durably (returns once it is on disk).
    pub fn state_put(&self, key: &str, value: &[u8]) -> Result<(), String> {
        let a = self.api();
        // SAFETY: valid function and slices.
        let rc =
            unsafe { (a.state_put)(a.ctx, key.as_ptr(), key.len(), value.as_ptr(), value.len()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("state_put({key}) failed ({rc})"))
        }
    }

    pub fn state_delete(&self, key: &str) -> Result<(), String> {
        let a = self.api();
        // SAFETY: valid function and slice.
        let rc = unsafe { (a.state_delete)(a.ctx, key.as_ptr(), key.len()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("state_delete({key}) failed ({rc})"))
        }
    }

    /// The state keys that start with `prefix`.
    pub fn state_keys(&self, prefix: &str) -> Result<Vec<String>, String> {
        let a = self.api();
        let mut out = Buf::EMPTY;
        // SAFETY: valid function, slice and out pointer.
        let rc = unsafe { (a.state_keys)(a.ctx, prefix.as_ptr(), prefix.len(), &mut out) };
        if rc != 0 {
            return Err(format!("state_keys({prefix}) failed ({rc})"));
        }
        let bytes = self.take(out);
        serde_json::from_slice(&bytes).map_err(|e| format!("state_keys: {e}"))
    }

    /// Every record stored under `prefix`, decoded from JSON, in key order, as (the rest
    /// of the key after `prefix`, the record). A record that cannot be read or decoded is
    /// logged with its key and skipped; failing to list the state is an error (a plugin
    /// would otherwise believe it has no records).
    pub fn load_json_records<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, String> {
        let mut out = Vec::new();
        for state_key in self.state_keys(prefix)? {
            let Some(rest) = state_key.strip_prefix(prefix) else {
                continue;
            };
            let bytes = match self.state_get(&state_key) {
                Ok(Some(b)) => b,
                Ok(None) => continue,
                Err(e) => {
                    self.warn(&format!("skipping unreadable record {state_key}: {e}"));
                    continue;
                }
            };
            match serde_json::from_slice::<T>(&bytes) {
                Ok(record) => out.push((rest.to_string(), record)),
                Err(e) => self.warn(&format!("skipping unreadable record {state_key}: {e}")),
            }
        }
        Ok(out)
    }
}

/// What every plugin implements: its name and how an instance is made. What it answers is
/// said by the typed trait of its kind ([`AuthPlugin`], [`SinkPlugin`], [`RoutesPlugin`])
/// and by [`declare_plugin!`], which generates the dispatcher ([`Dispatch`]) from them.
pub trait Plugin: Sized + 'static {
    /// The name the configuration uses (`[plugins] auth = ["connector"]`).
    const NAME: &'static str;
    /// The ABI version the table announces. Leave it: overriding it only serves to test
    /// that the host refuses a plugin built for another version.
    const ABI: u32 = ABI_VERSION;
    /// Builds an instance from its configuration (the plugin's TOML table as JSON, `{}`
    /// when it has none).
    fn create(config: serde_json::Value, host: Host) -> Result<Self, String>;
}

/// An auth backend ([`Kind::Auth`]): the operations of [`auth`]. Most also serve routes
/// ([`RoutesPlugin`], `declare_plugin!(P: auth + routes)`).
pub trait AuthPlugin: Plugin {
    /// [`auth::OP_AUTHENTICATE`]: is this request's credential yours, and whose is it?
    fn authenticate(&mut self, req: auth::AuthRequest) -> Result<auth::AuthVerdict, String>;
    /// [`auth::OP_BOOTSTRAP`], once at start. By default nothing is created.
    fn bootstrap(
        &mut self,
        req: auth::BootstrapRequest,
    ) -> Result<auth::BootstrapResponse, String> {
        let _ = req;
        Ok(auth::BootstrapResponse::default())
    }
    /// [`auth::OP_KEY_STATUS`]. By default an error: a backend that does not answer it
    /// cannot vouch for its keys, and keys minted through its principals are refused.
    fn key_status(
        &mut self,
        req: auth::KeyStatusRequest,
    ) -> Result<auth::KeyStatusResponse, String> {
        let _ = req;
        Err(format!(
            "{}: {} is not answered: this backend cannot vouch for its keys",
            Self::NAME,
            auth::OP_KEY_STATUS
        ))
    }
}

/// A plugin that serves REST routes ([`http`]): an auth backend's management API, or a
/// plugin of [`Kind::Other`], whose only business routes are.
pub trait RoutesPlugin: Plugin {
    /// [`http::OP_ROUTES`], at every load: the routes served and the scope each needs.
    fn routes(&mut self) -> Result<http::RoutesResponse, String>;
    /// [`http::OP_HTTP`]: a request on one of those routes, its caller authenticated.
    fn http(&mut self, req: http::HttpRequest) -> Result<http::HttpResponse, String>;
}

/// A notification sink ([`Kind::Sink`]): the operations of [`sink`].
pub trait SinkPlugin: Plugin {
    /// [`sink::OP_VERIFY`], when a callback is registered.
    fn verify(&mut self, req: sink::VerifyRequest) -> Result<sink::VerifyResponse, String>;
    /// [`sink::OP_DELIVER`]: one batch to one target.
    fn deliver(&mut self, req: sink::DeliverRequest) -> Result<sink::DeliverResponse, String>;
    /// [`sink::OP_SCHEMES`], once at start: the callback URL schemes this sink takes. The
    /// default is [`sink::DEFAULT_SCHEMES`] (`http`, `https`).
    fn schemes(&mut self) -> Result<sink::SchemesResponse, String> {
        Ok(sink::SchemesResponse::default())
    }
}

/// The generated side of a plugin: its kind and the dispatcher that maps an operation name
/// to the typed method, decodes its input and encodes its answer. Implemented by
/// [`declare_plugin!`]; never by hand. Unit tests call plugins through it
/// ([`Dispatch::call`], [`testing`]) as the host does.
pub trait Dispatch: Plugin {
    const KIND: Kind;
    /// Every operation this plugin answers, in the order the dispatcher tries them: its
    /// kind's, then its own (administrative operations such as `create_key`).
    fn operations() -> Vec<&'static str>;
    /// Answers one operation: `input` and the answer are JSON. An unknown operation is an
    /// error that lists [`Dispatch::operations`].
    fn call(&mut self, op: &str, input: &[u8]) -> Result<Vec<u8>, String>;
}

/// Decodes the JSON input of operation `op`; the error reads `<op>: bad input: <why>`. A
/// blank input (empty, or only white space) is read as JSON `null`, so an operation whose
/// input type is an `Option` may be called with nothing; for any other type it is refused
/// as "no input".
pub fn decode_input<'a, T: serde::Deserialize<'a>>(op: &str, input: &'a [u8]) -> Result<T, String> {
    if input.iter().all(u8::is_ascii_whitespace) {
        return serde_json::from_slice(b"null")
            .map_err(|_| format!("{op}: bad input: no input (a JSON document is expected)"));
    }
    serde_json::from_slice(input).map_err(|e| format!("{op}: bad input: {e}"))
}

/// Encodes an answer of [`Dispatch::call`] as JSON.
pub fn encode_answer<T: serde::Serialize>(answer: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(answer).map_err(|e| e.to_string())
}

fn panic_message(p: Box<dyn std::any::Any + Send>, at: String) -> String {
    describe_panic("plugin", &*p, &at)
}

/// `<who> panicked at <at>: <message>` for a caught panic's payload `p` (without ` at …`
/// when `at` is empty, without `: …` when the panic gave no text). For the SDK's shims and
/// the daemon's host functions.
#[doc(hidden)]
pub fn describe_panic(who: &str, p: &(dyn std::any::Any + Send), at: &str) -> String {
    let at = if at.is_empty() {
        String::new()
    } else {
        format!(" at {at}")
    };
    let text = p
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str));
    match text {
        Some(s) => format!("{who} panicked{at}: {s}"),
        None => format!("{who} panicked{at}"),
    }
}

std::thread_local! {
    /// True while this thread runs plugin code under [`guarded`].
    static IN_PLUGIN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Where the last panic under [`guarded`] happened (`file:line:column`).
    static PANIC_AT: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Installs (once per image) a panic hook that stays quiet for panics inside [`guarded`]
/// and hands every other panic to the hook that was there before. A caught plugin panic
/// becomes the call's error, with its location: it is not printed, and no backtrace is
/// captured for it (std's default hook would, with `RUST_BACKTRACE` set, and the symbol
/// cache it builds belongs to the plugin's image: a leak at every unload).
fn quiet_plugin_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_PLUGIN.with(|c| c.get()) {
                let at = info
                    .location()
                    .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                    .unwrap_or_default();
                PANIC_AT.with(|p| *p.borrow_mut() = at);
            } else {
                previous(info);
            }
        }));
    });
}

/// Where the last panic on this thread happened while plugin code of this image ran
/// (`file:line:column`), and forgets it; empty if none did. For the daemon's host
/// functions: a built-in plugin shares the daemon's image, so a host function that
/// panics under its call is recorded here, quietly, and the host logs it with this.
#[doc(hidden)]
pub fn take_panic_location() -> String {
    PANIC_AT.with(|at| at.take())
}

/// Runs plugin code, catching a panic as its message (with where it happened).
fn guarded<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    quiet_plugin_panics();
    let was = IN_PLUGIN.with(|c| c.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    IN_PLUGIN.with(|c| c.set(was));
    result.map_err(|p| panic_message(p, PANIC_AT.with(|at| at.take())))
}

/// The shims behind [`declare_plugin!`]. Not for direct use.
#[doc(hidden)]
pub mod shim {
    use super::*;

    /// # Safety
    /// Called by the host per the [`PluginTable::create`] contract.
    pub unsafe fn create<P: Dispatch>(
        config: *const u8,
        config_len: usize,
        host: *const HostApi,
        instance: *mut *mut c_void,
        err: *mut Buf,
    ) -> i32 {
        let result = guarded(|| {
            // SAFETY: the host passes a readable config slice and a valid host table.
            let bytes = if config.is_null() {
                &[][..]
            } else {
                unsafe { std::slice::from_raw_parts(config, config_len) }
            };
            let cfg: serde_json::Value = if bytes.is_empty() {
                serde_json::Value::Object(Default::default())
            } else {
                serde_json::from_slice(bytes)
                    .map_err(|e| format!("plugin configuration is not JSON: {e}"))?
            };
            // SAFETY: host outlives the instance (host contract).
            let h = unsafe { Host::from_raw(host) };
            P::create(cfg, h)
        });
        let outcome = result.and_then(|r| r);
        match outcome {
            Ok(p) => {
                // SAFETY: instance is a valid out pointer.
                unsafe { *instance = Box::into_raw(Box::new(p)) as *mut c_void };
                0
            }
            Err(e) => {
                // SAFETY: err is a valid out pointer.
                unsafe { *err = Buf::from_vec(e.into_bytes()) };
                1
            }
        }
    }

    /// # Safety
    /// Called by the host per the [`PluginTable::call`] contract.
    pub unsafe fn call<P: Dispatch>(
        instance: *mut c_void,
        op: *const u8,
        op_len: usize,
        input: *const u8,
        input_len: usize,
        out: *mut Buf,
    ) -> i32 {
        let result = guarded(|| {
            // SAFETY: the host passes the instance create returned and readable slices.
            let p = unsafe { &mut *(instance as *mut P) };
            let op = unsafe { std::slice::from_raw_parts(op, op_len) };
            let input = if input.is_null() {
                &[][..]
            } else {
                unsafe { std::slice::from_raw_parts(input, input_len) }
            };
            let op =
                std::str::from_utf8(op).map_err(|_| "operation name is not UTF-8".to_string())?;
            p.call(op, input)
        });
        let (rc, bytes) = match result {
            Ok(Ok(v)) => (0, v),
            Ok(Err(e)) => (1, e.into_bytes()),
            Err(panicked) => (2, panicked.into_bytes()),
        };
        // SAFETY: out is a valid out pointer.
        unsafe { *out = Buf::from_vec(bytes) };
        rc
    }

    /// # Safety
    /// `buf` must have been filled by this image.
    pub unsafe fn free(buf: Buf) {
        let _ = guarded(|| {
            // SAFETY: per the contract.
            drop(unsafe { buf.into_vec() });
        });
    }

    /// # Safety
    /// `instance` must come from `create` of this image and not be destroyed yet.
    pub unsafe fn destroy<P: Dispatch>(instance: *mut c_void) {
        let _ = guarded(|| {
            if !instance.is_null() {
                // SAFETY: per the contract.
                drop(unsafe { Box::from_raw(instance as *mut P) });
            }
        });
    }
}

/// Exports a plugin: once per crate, naming the parts it implements, which give its kind:
///
/// - `declare_plugin!(P: auth)` or `declare_plugin!(P: auth + routes)`: an auth backend
///   ([`AuthPlugin`], and [`RoutesPlugin`] for one that serves routes);
/// - `declare_plugin!(P: sink)`: a notification sink ([`SinkPlugin`]);
/// - `declare_plugin!(P: routes)`: a plugin of [`Kind::Other`] ([`RoutesPlugin`]).
///
/// A plugin's own operations (administrative ones, run with `connectord plugin-call`)
/// follow as `name => function` pairs, each function
/// `fn(&mut P, Input) -> Result<Answer, String>` (see [`dispatch::operation`]):
///
/// ```ignore
/// declare_plugin!(ConnectorAuth: auth + routes, operations {
///     OP_CREATE_KEY => ConnectorAuth::create_key_op,
/// });
/// ```
///
/// It implements [`Dispatch`] (the kind, and the dispatcher from operation names to those
/// methods), defines `pub fn plugin_table() -> &'static PluginTable` (used when the crate
/// is linked into the daemon as a built-in) and exports the table as the C symbol
/// `connectord_plugin_<crate name>` (used when it is loaded from a `.so`; the loader
/// derives the symbol from the file name `lib<crate name>.so`).
#[macro_export]
macro_rules! declare_plugin {
    ($plugin:ty : auth + routes $(, operations { $($op:expr => $f:expr),* $(,)? })? $(,)?) => {
        $crate::__declare_plugin!($plugin, $crate::Kind::Auth, [auth routes], [$($($op => $f),*)?]);
    };
    ($plugin:ty : auth $(, operations { $($op:expr => $f:expr),* $(,)? })? $(,)?) => {
        $crate::__declare_plugin!($plugin, $crate::Kind::Auth, [auth], [$($($op => $f),*)?]);
    };
    ($plugin:ty : sink $(, operations { $($op:expr => $f:expr),* $(,)? })? $(,)?) => {
        $crate::__declare_plugin!($plugin, $crate::Kind::Sink, [sink], [$($($op => $f),*)?]);
    };
    ($plugin:ty : routes $(, operations { $($op:expr => $f:expr),* $(,)? })? $(,)?) => {
        $crate::__declare_plugin!($plugin, $crate::Kind::Other, [routes], [$($($op => $f),*)?]);
    };
}

/// The body of [`declare_plugin!`]. Not for direct use.
#[doc(hidden)]
#[macro_export]
macro_rules! __declare_plugin {
    ($plugin:ty, $kind:expr, [$($part:ident)+], [$($op:expr => $f:expr),*]) => {
        impl $crate::Dispatch for $plugin {
            const KIND: $crate::Kind = $kind;
            fn operations() -> ::std::vec::Vec<&'static str> {
                let mut ops: ::std::vec::Vec<&'static str> = ::std::vec::Vec::new();
                $( ops.extend_from_slice($crate::dispatch::$part::OPERATIONS); )+
                $( ops.push($op); )*
                ops
            }
            fn call(
                &mut self,
                op: &str,
                input: &[u8],
            ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                $(
                    if let ::std::option::Option::Some(answer) =
                        $crate::dispatch::$part::call(self, op, input)
                    {
                        return answer;
                    }
                )+
                $(
                    if op == $op {
                        return $crate::dispatch::operation(self, op, input, $f);
                    }
                )*
                ::std::result::Result::Err($crate::dispatch::unknown::<Self>(op))
            }
        }
        #[allow(unsafe_code)]
        unsafe extern "C" fn __connectord_create(
            config: *const u8,
            config_len: usize,
            host: *const $crate::HostApi,
            instance: *mut *mut ::std::ffi::c_void,
            err: *mut $crate::Buf,
        ) -> i32 {
            // SAFETY: forwarded contract.
            unsafe { $crate::shim::create::<$plugin>(config, config_len, host, instance, err) }
        }
        #[allow(unsafe_code)]
        unsafe extern "C" fn __connectord_call(
            instance: *mut ::std::ffi::c_void,
            op: *const u8,
            op_len: usize,
            input: *const u8,
            input_len: usize,
            out: *mut $crate::Buf,
        ) -> i32 {
            // SAFETY: forwarded contract.
            unsafe { $crate::shim::call::<$plugin>(instance, op, op_len, input, input_len, out) }
        }
        #[allow(unsafe_code)]
        unsafe extern "C" fn __connectord_free(buf: $crate::Buf) {
            // SAFETY: forwarded contract.
            unsafe { $crate::shim::free(buf) }
        }
        #[allow(unsafe_code)]
        unsafe extern "C" fn __connectord_destroy(instance: *mut ::std::ffi::c_void) {
            // SAFETY: forwarded contract.
            unsafe { $crate::shim::destroy::<$plugin>(instance) }
        }
        static __CONNECTORD_TABLE: $crate::PluginTable = $crate::PluginTable {
            abi_version: <$plugin as $crate::Plugin>::ABI,
            name: <$plugin as $crate::Plugin>::NAME.as_ptr(),
            name_len: <$plugin as $crate::Plugin>::NAME.len(),
            kind: <$plugin as $crate::Dispatch>::KIND as u32,
            create: __connectord_create,
            call: __connectord_call,
            free: __connectord_free,
            destroy: __connectord_destroy,
        };
        /// This plugin's table (for linking it into the daemon as a built-in).
        pub fn plugin_table() -> &'static $crate::PluginTable {
            &__CONNECTORD_TABLE
        }
        #[allow(unsafe_code)]
        #[unsafe(export_name = concat!("connectord_plugin_", env!("CARGO_CRATE_NAME")))]
        pub extern "C" fn __connectord_plugin_entry() -> *const $crate::PluginTable {
            &__CONNECTORD_TABLE
        }
    };
}

impl PluginTable {
    /// The plugin's name.
    ///
    /// # Safety
    /// The table must come from a loaded plugin image that is still loaded.
    pub unsafe fn name(&self) -> String {
        if self.name.is_null() {
            return String::new();
        }
        // SAFETY: per the contract, name/name_len describe static UTF-8 in the image.
        String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(self.name, self.name_len) })
            .into_owned()
    }

    /// Calls operation `op` of `instance` with `input` through [`PluginTable::call`]:
    /// the return code (0 an answer, 1 an error, 2 a caught panic) and the answer or
    /// message, copied out of the plugin's buffer, which the plugin then frees.
    ///
    /// # Safety
    /// The table must come from a loaded plugin image that is still loaded, and
    /// `instance` from its `create`, not yet destroyed; no other call of `instance` may
    /// run at the same time.
    pub unsafe fn call_instance(
        &self,
        instance: *mut c_void,
        op: &str,
        input: &[u8],
    ) -> (i32, Vec<u8>) {
        let mut out = Buf::EMPTY;
        // SAFETY: per the contract above; the slices are valid for the call.
        let rc = unsafe {
            (self.call)(
                instance,
                op.as_ptr(),
                op.len(),
                input.as_ptr(),
                input.len(),
                &mut out,
            )
        };
        // SAFETY: the plugin filled `out`; copied, then freed by the plugin.
        let bytes = unsafe { out.to_vec() };
        unsafe { (self.free)(out) };
        (rc, bytes)
    }
}

pub mod testing;
