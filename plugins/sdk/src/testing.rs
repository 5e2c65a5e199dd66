//! An in-memory host for plugin unit tests: state in a map, log lines collected.
//!
//! ```ignore
//! let host = MemoryHost::new();
//! let mut p = MyPlugin::create(serde_json::json!({}), host.host()).unwrap();
//! ```

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use crate::{ABI_VERSION, Buf, Host, HostApi};

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

    /// A [`Host`] for one plugin instance.
    pub fn host(&self) -> Host {
        let api = Box::new(HostApi {
            abi_version: ABI_VERSION,
            ctx: Arc::as_ptr(&self.inner) as *mut c_void,
            log,
            state_get,
            state_put,
            state_delete,
            state_keys,
            free,
        });
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
}
