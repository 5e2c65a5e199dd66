//! The adapter from the core's [`Sink`] trait to one sink plugin of `[plugins] sinks` (one
//! adapter per sink; the hub's `SchemeRouter` picks one by the callback URL's scheme).
//! The plugin is handed the rendered notification message (its protocol is unchanged);
//! the rendering is the [`Render`] given at construction (the REST edge's, wired in
//! `daemon.rs`), so this crate knows no wire format.

use std::future::Future;
use std::pin::Pin;

use connectord_plugin_sdk::sink;

use crate::events::{CallbackTarget, Delivery, Event, Render, Sink};

impl PluginSink {
    /// The callback URL schemes the plugin takes (its `schemes` answer, in lower case). A
    /// plugin that cannot answer (a file built before the operation existed answers
    /// "unknown operation") is taken to deliver HTTP callbacks, as every sink did then;
    /// the error is logged.
    pub async fn schemes(&self) -> Vec<String> {
        match self
            .host
            .call_json::<_, sink::SchemesResponse>(
                &self.name,
                sink::OP_SCHEMES,
                &serde_json::json!({}),
            )
            .await
        {
            Ok(r) => r
                .schemes
                .into_iter()
                .map(|s| s.to_ascii_lowercase())
                .collect(),
            Err(e) => {
                let schemes = sink::SchemesResponse::default().schemes;
                tracing::warn!(
                    "notification sink {}: no answer to `schemes` ({e}); taking it to deliver {}",
                    self.name,
                    schemes.join(", ")
                );
                schemes
            }
        }
    }
}

/// One sink plugin of `[plugins] sinks`.
pub struct PluginSink {
    pub host: std::sync::Arc<super::PluginHost>,
    pub name: String,
    /// Renders each batch into the message the plugin delivers.
    pub render: std::sync::Arc<dyn Render>,
}

fn target(t: &CallbackTarget) -> sink::Target {
    sink::Target {
        url: t.url.clone(),
        headers: t.headers.clone(),
    }
}

impl Sink for PluginSink {
    fn verify<'a>(
        &'a self,
        t: &'a CallbackTarget,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let req = sink::VerifyRequest { target: target(t) };
            match self
                .host
                .call_json::<_, sink::VerifyResponse>(&self.name, sink::OP_VERIFY, &req)
                .await
            {
                Ok(r) if r.ok => Ok(()),
                Ok(r) => Err(r
                    .reason
                    .unwrap_or_else(|| "the callback URL was refused".into())),
                Err(e) => {
                    tracing::error!("notification sink: {e}");
                    Err(format!(
                        "notifications cannot be delivered now: sink plugin {} is unavailable",
                        self.name
                    ))
                }
            }
        })
    }

    fn deliver<'a>(
        &'a self,
        key_id: &'a str,
        t: &'a CallbackTarget,
        events: &'a [Event],
    ) -> Pin<Box<dyn Future<Output = Delivery> + Send + 'a>> {
        Box::pin(async move {
            let req = sink::DeliverRequest {
                target: target(t),
                body: self.render.message(events),
                key_id: Some(key_id.to_string()),
            };
            match self
                .host
                .call_json::<_, sink::DeliverResponse>(&self.name, sink::OP_DELIVER, &req)
                .await
            {
                Ok(sink::DeliverResponse::Accepted) => Delivery::Accepted,
                Ok(sink::DeliverResponse::Retry { reason }) => Delivery::Retry(reason),
                Ok(sink::DeliverResponse::Refused { reason }) => Delivery::Refused(reason),
                // A failing sink plugin is retried like a failing receiver.
                Err(e) => Delivery::Retry(e.to_string()),
            }
        })
    }
}
