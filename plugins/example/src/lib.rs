//! A minimal connectord plugin, the one `docs/plugins.md` walks through.
//!
//! It serves `GET /api/example/hello` (scope `endpoints:read`): `{"variant": …, "calls": n}`
//! where `calls` counts every call ever made, kept in the host's durable state (so it
//! survives a reload and a restart), and `variant` is fixed at build time by the
//! `CONNECTORD_EXAMPLE_VARIANT` environment variable (default `A`), so that a test can
//! tell one build from another. `GET /api/example/panic` panics, to show that a panic stays
//! inside the plugin. Built with `CONNECTORD_EXAMPLE_ABI` set, it announces a wrong ABI
//! version, to show that the host refuses it. Built with `CONNECTORD_EXAMPLE_PANIC` set to
//! `create`, `routes` or `http`, it panics in `create`, in every `routes` call or in every
//! `http` call, to show how the host refuses or rolls back a generation that fails. Built
//! with `CONNECTORD_EXAMPLE_HANG` set to `create` or `routes`, it never returns from that
//! call, to show that the host gives up on it (`[plugins] start_timeout_s`).

use connectord_plugin_sdk::http::{HttpRequest, HttpResponse, RoutesResponse};
use connectord_plugin_sdk::{ABI_VERSION, Host, Plugin, RoutesPlugin, declare_plugin};

const VARIANT: &str = match option_env!("CONNECTORD_EXAMPLE_VARIANT") {
    Some(v) => v,
    None => "A",
};

/// Where this build panics on purpose (see the crate documentation).
const PANIC: &str = match option_env!("CONNECTORD_EXAMPLE_PANIC") {
    Some(v) => v,
    None => "",
};

/// Where this build never returns on purpose (see the crate documentation).
const HANG: &str = match option_env!("CONNECTORD_EXAMPLE_HANG") {
    Some(v) => v,
    None => "",
};

fn hang_if(at: &str) {
    if HANG == at {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

pub struct Example {
    host: Host,
    calls: u64,
}

impl Plugin for Example {
    const NAME: &'static str = "example";
    const ABI: u32 = match option_env!("CONNECTORD_EXAMPLE_ABI") {
        Some(_) => ABI_VERSION + 98,
        None => ABI_VERSION,
    };

    fn create(_config: serde_json::Value, host: Host) -> Result<Self, String> {
        if PANIC == "create" {
            panic!("built to panic in create");
        }
        hang_if("create");
        let calls = match host.state_get("calls")? {
            Some(v) => String::from_utf8_lossy(&v).parse().unwrap_or(0),
            None => 0,
        };
        host.info(&format!(
            "example plugin, variant {VARIANT}, {calls} calls so far"
        ));
        Ok(Example { host, calls })
    }
}

impl RoutesPlugin for Example {
    fn routes(&mut self) -> Result<RoutesResponse, String> {
        if PANIC == "routes" {
            panic!("built to panic in routes");
        }
        hang_if("routes");
        let routes = [("GET", "/api/example/hello"), ("GET", "/api/example/panic")];
        Ok(RoutesResponse::with_scope("endpoints:read", &routes))
    }

    fn http(&mut self, req: HttpRequest) -> Result<HttpResponse, String> {
        if PANIC == "http" {
            panic!("built to panic in every http call");
        }
        if req.path.ends_with("/panic") {
            panic!("asked to panic");
        }
        self.calls += 1;
        self.host
            .state_put("calls", self.calls.to_string().as_bytes())?;
        let body = serde_json::json!({"variant": VARIANT, "calls": self.calls});
        Ok(HttpResponse::json(200, &body))
    }
}

declare_plugin!(Example: routes);
