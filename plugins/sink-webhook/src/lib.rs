//! The webhook notification sink: connectord pushes notification batches to HTTP(S) callback
//! URLs through this plugin (name `webhook`, kind `Kind::Sink`).
//!
//! # Operations
//!
//! - `OP_VERIFY` ([`VerifyRequest`] → [`VerifyResponse`]): when a callback is registered,
//!   a `PUT` with an empty body; `ok` on a 2xx answer, else `ok: false` and a reason that can
//!   be shown to the REST client (`callback URL answered 404 Not Found`, `cannot connect to
//!   callback URL: connection refused`, `invalid callback URL ...`, ...).
//! - `OP_DELIVER` ([`DeliverRequest`] → [`DeliverResponse`]): a `PUT` of `body` as is.
//!   2xx is `accepted`; 408, 429, 5xx, connection and TLS failures and the timeout are
//!   `retry`; any other status (redirects are not followed), an invalid URL or header is
//!   `refused`.
//!
//! Both requests carry `Content-Type: application/json` and the target's headers. An input
//! that is not the operation's JSON document (`verify: bad input: …`), or an unknown
//! operation, is an error (`Err`, from the SDK's dispatcher), not an answer. The details of the client are in [`client`].
//!
//! # Configuration
//!
//! The plugin's table, as JSON (unknown keys are refused):
//!
//! - `timeout_s` (default 10, from 1 to [`MAX_TIMEOUT_S`]): bounds each request as a whole,
//!   from connecting to the response headers.
//! - `ca_file` (optional): a PEM file of CA certificates trusted for `https://` URLs in
//!   addition to the system's root certificates. It is read once, by `create`; a missing,
//!   unreadable or certificate-less file makes `create` fail.
//!
//! # Threads and runtime
//!
//! `create` builds a tokio *current-thread* runtime owned by the instance; each call runs
//! its request to completion on it (`block_on`) on the host's thread for this instance.
//! One instance delivers one batch at a time: the host runs several instances when
//! deliveries to different callbacks overlap (up to `[notifications]
//! max_concurrent_deliveries`), each with its own runtime, connection pool and root
//! certificates, so that a receiver that does not answer holds up only its own instance
//! for at most `timeout_s`. The
//! plugin starts no threads of its own: a current-thread runtime has no worker thread. The
//! one exception is tokio's blocking pool, which hyper's resolver uses for the `getaddrinfo`
//! of a callback URL's host *name* (not for IP addresses): such a thread
//! (`sink-webhook-dns`) is started on demand, ends after 10 s idle, and dropping the
//! instance waits for it to end (a lookup still running then is waited for), so that no
//! plugin code runs after `destroy` returns.
//!
//! Connections kept for reuse stay idle between calls (their tasks only run during a call;
//! each call first lets them notice a close by the receiver, see [`WebhookSink`]) and are
//! closed when the instance, and with it the runtime, is dropped. The host must call and drop
//! the instance outside any tokio runtime, as the connectord host does (a call from inside a
//! runtime is refused with an error rather than a panic).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use connectord_plugin_sdk::sink::{DeliverRequest, DeliverResponse, VerifyRequest, VerifyResponse};
use connectord_plugin_sdk::{Host, Plugin, SinkPlugin, declare_plugin};
use serde::Deserialize;
use tokio::runtime::Runtime;

pub mod client;

pub use client::{Delivery, Webhook, WebhookError};

/// Default of `timeout_s`.
pub const DEFAULT_TIMEOUT_S: u64 = 10;
/// Largest `timeout_s` accepted (one hour: a call blocks the host's thread that long at most).
pub const MAX_TIMEOUT_S: u64 = 3600;

/// The plugin's configuration (its TOML table, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Timeout of each request, in seconds.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Extra PEM CA certificates trusted beside the system's roots.
    #[serde(default)]
    pub ca_file: Option<String>,
}

fn default_timeout_s() -> u64 {
    DEFAULT_TIMEOUT_S
}

impl Default for Config {
    fn default() -> Self {
        Config {
            timeout_s: DEFAULT_TIMEOUT_S,
            ca_file: None,
        }
    }
}

impl Config {
    /// Parses and checks the configuration.
    pub fn from_json(value: serde_json::Value) -> Result<Config, String> {
        let invalid = |message: String| format!("invalid webhook configuration: {message}");
        if !value.is_object() {
            return Err(invalid(format!("expected a table, got {value}")));
        }
        let config: Config = connectord_plugin_sdk::settings(value).map_err(invalid)?;
        if config.timeout_s == 0 || config.timeout_s > MAX_TIMEOUT_S {
            return Err(invalid(format!(
                "timeout_s must lie between 1 and {MAX_TIMEOUT_S} (got {})",
                config.timeout_s
            )));
        }
        if config.ca_file.as_deref() == Some("") {
            return Err(invalid("ca_file must not be empty".into()));
        }
        Ok(config)
    }
}

/// How many times a call yields to the runtime before its request (see
/// [`WebhookSink::block_on`]).
const SETTLE_YIELDS: usize = 4;

/// One instance of the plugin: the client and the runtime its requests run on.
///
/// Before each request the runtime first processes the I/O events that arrived since the
/// previous call, so that a pooled connection the receiver closed meanwhile is not reused.
pub struct WebhookSink {
    // Declared before `rt`: dropped first, while the runtime still exists.
    client: Webhook,
    /// Always `Some` until the instance is dropped.
    rt: Option<Runtime>,
}

impl WebhookSink {
    /// Runs a request to completion on the instance's runtime.
    ///
    /// The runtime only runs during a call: between calls, the tasks of the pooled
    /// connections do not see what happened to their sockets. Before the request, the
    /// runtime first processes the pending I/O events (a few yields, each of which polls the
    /// I/O driver and then runs the woken tasks), so that a connection the receiver closed
    /// meanwhile (an idle keep-alive timeout) is dropped from the pool instead of being reused
    /// and failing the request.
    fn block_on<F: Future>(&self, future: F) -> Result<F::Output, String> {
        if tokio::runtime::Handle::try_current().is_ok() {
            // block_on would panic: refuse instead.
            return Err("the webhook sink cannot be called from inside a tokio runtime".into());
        }
        let Some(rt) = &self.rt else {
            return Err("the webhook sink is shut down".into());
        };
        Ok(rt.block_on(async {
            for _ in 0..SETTLE_YIELDS {
                tokio::task::yield_now().await;
            }
            future.await
        }))
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        // Dropping a runtime inside another one panics; the host never does that, but be safe.
        if tokio::runtime::Handle::try_current().is_ok()
            && let Some(rt) = self.rt.take()
        {
            rt.shutdown_background();
        }
    }
}

impl Plugin for WebhookSink {
    const NAME: &'static str = "webhook";

    fn create(config: serde_json::Value, host: Host) -> Result<Self, String> {
        let config = Config::from_json(config)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("sink-webhook-dns")
            .build()
            .map_err(|e| format!("cannot start the webhook runtime: {e}"))?;
        let client = Webhook::new(
            Duration::from_secs(config.timeout_s),
            config.ca_file.as_deref().map(Path::new),
            &host,
        )
        .map_err(|e| e.to_string())?;
        let (system, extra) = client.root_counts();
        let ca = match &config.ca_file {
            Some(path) => format!(" + {extra} from {path}"),
            None => String::new(),
        };
        host.info(&format!(
            "webhook sink ready: timeout {}s, {system} system root certificate(s){ca}",
            config.timeout_s
        ));
        Ok(WebhookSink {
            client,
            rt: Some(rt),
        })
    }
}

impl SinkPlugin for WebhookSink {
    fn verify(&mut self, request: VerifyRequest) -> Result<VerifyResponse, String> {
        Ok(match self.block_on(self.client.verify(&request.target))? {
            Ok(()) => VerifyResponse {
                ok: true,
                reason: None,
            },
            Err(reason) => VerifyResponse {
                ok: false,
                reason: Some(reason),
            },
        })
    }

    fn deliver(&mut self, request: DeliverRequest) -> Result<DeliverResponse, String> {
        let body = Bytes::from(request.body);
        let delivery = self.block_on(self.client.deliver(&request.target, body))?;
        Ok(DeliverResponse::from(delivery))
    }
}

declare_plugin!(WebhookSink: sink);

#[cfg(test)]
mod tests;
