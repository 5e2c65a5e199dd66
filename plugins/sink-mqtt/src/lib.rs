//! The MQTT notification sink: connectord publishes the events of callback URLs
//! `mqtt://` and `mqtts://` to an MQTT broker through this plugin (name `mqtt`, kind
//! `Kind::Sink`), MQTT 3.1.1 with rumqttc, TLS with rustls (ring).
//!
//! # Operations
//!
//! - `OP_SCHEMES`: `mqtt`, `mqtts`.
//! - `OP_VERIFY` ([`VerifyRequest`] → [`VerifyResponse`]): when a callback is registered,
//!   the URL is checked ([`target::parse`]) and the broker connected to: `ok` once it has
//!   accepted the connection (CONNACK), else `ok: false` and a reason shown to the REST
//!   client (`cannot connect to MQTT broker 127.0.0.1:1883: Connection refused`, `MQTT
//!   broker ... refused the connection: bad user name or password`, `invalid MQTT callback
//!   URL ...`). Headers in the callback are refused: MQTT 3.1.1 has no message properties
//!   to carry them, and silently dropping what a client asked for hides a mistake (the
//!   broker's credentials go in the URL).
//! - `OP_DELIVER` ([`DeliverRequest`] → [`DeliverResponse`]): one message per event
//!   ([`target::messages`]: topic `<prefix>/<key id>/<event type>/<endpoint>[/<path>]`,
//!   payload the event's JSON entry), QoS 1, not retained, in the order of the notification
//!   message, on one connection. `accepted` only once the broker has acknowledged every
//!   message (PUBACK), so the hub's retry, backoff and discard window apply as for a
//!   webhook: a broker that cannot be reached, a TLS failure, a connection lost or the
//!   timeout is `retry` (the whole batch is published again: a subscriber may see a
//!   message twice, QoS 1's at-least-once); a broker that refuses the credentials or the
//!   client, an invalid URL or a body that is not a notification message is `refused`.
//!
//! Passwords never appear in a reason (`connectord_plugin_sdk::sink::redact_url`).
//!
//! # Configuration
//!
//! The plugin's table, as JSON (unknown keys are refused):
//!
//! - `timeout_s` (default 10, from 1 to [`MAX_TIMEOUT_S`]): bounds each call as a whole,
//!   from connecting to the last PUBACK.
//! - `ca_file` (optional): a PEM file of CA certificates trusted for `mqtts://` brokers in
//!   addition to the system's root certificates (as the webhook's `ca_file`). Read once,
//!   by `create`; a missing, unreadable or certificate-less file makes `create` fail.
//!
//! # Threads and runtime
//!
//! As the webhook sink: `create` builds a tokio current-thread runtime owned by the
//! instance and each call runs to completion on it (`block_on`); the host runs several
//! instances when deliveries overlap, so a broker that does not answer holds up only its
//! own instance for at most `timeout_s`. A call from inside a tokio runtime is refused.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use connectord_plugin_sdk::sink::{
    DeliverRequest, DeliverResponse, SchemesResponse, VerifyRequest, VerifyResponse,
};
use connectord_plugin_sdk::{Host, Plugin, SinkPlugin, declare_plugin};
use serde::Deserialize;
use tokio::runtime::Runtime;

pub mod client;
pub mod target;

pub use client::{Client, Failure};

/// Default of `timeout_s`.
pub const DEFAULT_TIMEOUT_S: u64 = 10;
/// Largest `timeout_s` accepted.
pub const MAX_TIMEOUT_S: u64 = 3600;
/// The schemes this sink takes.
pub const SCHEMES: [&str; 2] = ["mqtt", "mqtts"];

/// The plugin's configuration (its TOML table, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Timeout of each call, in seconds.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Extra PEM CA certificates trusted beside the system's roots.
    #[serde(default)]
    pub ca_file: Option<String>,
}

fn default_timeout_s() -> u64 {
    DEFAULT_TIMEOUT_S
}

impl Config {
    /// Parses and checks the configuration.
    pub fn from_json(value: serde_json::Value) -> Result<Config, String> {
        let invalid = |message: String| format!("invalid mqtt configuration: {message}");
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

/// One instance of the plugin: the client and the runtime its calls run on.
pub struct MqttSink {
    client: Client,
    /// Always `Some` until the instance is dropped.
    rt: Option<Runtime>,
}

impl MqttSink {
    fn block_on<F: Future>(&self, future: F) -> Result<F::Output, String> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err("the mqtt sink cannot be called from inside a tokio runtime".into());
        }
        let Some(rt) = &self.rt else {
            return Err("the mqtt sink is shut down".into());
        };
        Ok(rt.block_on(future))
    }
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_ok()
            && let Some(rt) = self.rt.take()
        {
            rt.shutdown_background();
        }
    }
}

impl Plugin for MqttSink {
    const NAME: &'static str = "mqtt";

    fn create(config: serde_json::Value, host: Host) -> Result<Self, String> {
        let config = Config::from_json(config)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("sink-mqtt-dns")
            .build()
            .map_err(|e| format!("cannot start the mqtt runtime: {e}"))?;
        let (roots, system, extra) =
            sink_webhook::client::trusted_roots(config.ca_file.as_deref().map(Path::new), &host)
                .map_err(|e| e.to_string())?;
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let ca = match &config.ca_file {
            Some(path) => format!(" + {extra} from {path}"),
            None => String::new(),
        };
        host.info(&format!(
            "mqtt sink ready: timeout {}s, {system} system root certificate(s){ca}",
            config.timeout_s
        ));
        Ok(MqttSink {
            client: Client {
                timeout: Duration::from_secs(config.timeout_s),
                tls: Arc::new(tls),
            },
            rt: Some(rt),
        })
    }
}

impl SinkPlugin for MqttSink {
    fn schemes(&mut self) -> Result<SchemesResponse, String> {
        Ok(SchemesResponse {
            schemes: SCHEMES.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn verify(&mut self, request: VerifyRequest) -> Result<VerifyResponse, String> {
        let refuse = |reason: String| VerifyResponse {
            ok: false,
            reason: Some(reason),
        };
        let broker = match target::parse(&request.target.url) {
            Ok(b) => b,
            Err(reason) => return Ok(refuse(reason)),
        };
        if !request.target.headers.is_empty() {
            return Ok(refuse(
                "MQTT callbacks take no headers (MQTT 3.1.1 messages have no properties to \
                 carry them); the broker's user and password go in the URL: \
                 mqtt://user:password@host:port/prefix"
                    .into(),
            ));
        }
        Ok(match self.block_on(self.client.publish(&broker, &[]))? {
            Ok(()) => VerifyResponse {
                ok: true,
                reason: None,
            },
            Err(f) => refuse(f.reason().to_string()),
        })
    }

    fn deliver(&mut self, request: DeliverRequest) -> Result<DeliverResponse, String> {
        let broker = match target::parse(&request.target.url) {
            Ok(b) => b,
            Err(reason) => return Ok(DeliverResponse::Refused { reason }),
        };
        let key_id = request.key_id.as_deref().unwrap_or("-");
        let messages = match target::messages(&broker.prefix, key_id, &request.body) {
            Ok(m) => m,
            Err(reason) => return Ok(DeliverResponse::Refused { reason }),
        };
        Ok(
            match self.block_on(self.client.publish(&broker, &messages))? {
                Ok(()) => DeliverResponse::Accepted,
                Err(f) => f.into(),
            },
        )
    }
}

declare_plugin!(MqttSink: sink);

#[cfg(test)]
mod tests;
