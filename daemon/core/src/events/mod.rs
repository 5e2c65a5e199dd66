//! Notification events and their delivery to applications.
//!
//! Every access key that wants notifications has one [`hub::Channel`]: long-poll (the
//! default) or a callback URL. Each event for a key goes through that key's ordered,
//! durable queue; the hub owns ordering, batching, retry and the discard window, and the
//! [`Sink`] (today the [`webhook`]) only delivers one batch and says whether it was
//! accepted, should be retried, or is refused. On a cluster, [`peers`] is the seam through
//! which one node at a time serves a key's channel.

pub mod hub;
pub mod peers;

use std::future::Future;
use std::pin::Pin;

pub use connectord_model::{
    AsyncResponse, CallbackTarget, ChannelRecord, EndpointSummary, Entry, Event, Kind,
    Notification, ResourceSummary, StoredEvent, SubscriptionError,
};
pub use hub::Hub;

use crate::registry::Endpoint;

/// What an event tells, so that the hub routes it only to the channels whose key may see
/// it (`auth::may_access` against each channel's recorded restriction).
#[derive(Debug, Clone, Copy)]
pub enum About<'a> {
    /// An endpoint as a whole: a de-registration or an expiry (the entry is its name).
    Endpoint(&'a str),
    /// A resource of an endpoint: a notification, an async response, a subscription
    /// error.
    Resource(&'a str, &'a str),
    /// A registration or a registration update: its entry lists the endpoint's
    /// resources, which the hub cuts, for a restricted key, to those it may see.
    Registration(&'a Endpoint),
}

impl About<'_> {
    /// May a key with the restriction `allow` see this event?
    pub fn visible_to(&self, allow: Option<&[String]>) -> bool {
        match *self {
            About::Endpoint(ep) => crate::auth::may_access(allow, ep, None),
            About::Resource(ep, path) => crate::auth::may_access(allow, ep, Some(path)),
            About::Registration(ep) => crate::auth::may_access(allow, &ep.reg.name, None),
        }
    }
}

/// Renders notification messages for sinks outside the REST edge (the sink plugin's
/// adapter): implemented by `connectord_rest::wire::Mbed` and handed to such a sink at
/// construction (`daemon.rs`), so that core knows no wire format.
pub trait Render: Send + Sync + 'static {
    /// The notification message of a batch of events, in the order they happened.
    fn message(&self, events: &[Event]) -> String;

    /// The size in bytes of the event's entry as rendered: what the event counts against
    /// `notifications.max_queued_bytes_per_key` (beyond `config::EVENT_OVERHEAD_BYTES`).
    /// By default the length of a message of this event alone.
    fn entry_len(&self, event: &Event) -> usize {
        self.message(std::slice::from_ref(event)).len()
    }
}

/// The entry of a `registrations` or `reg-updates` event: the endpoint with only the
/// resources the restriction `allow` lets its key see (`None`: all of them).
pub fn registration_entry(ep: &Endpoint, allow: Option<&[String]>) -> EndpointSummary {
    let resources = ep
        .resources()
        .into_iter()
        .filter(|r| crate::auth::may_access(allow, &ep.reg.name, Some(&r.path)))
        .map(|r| ResourceSummary {
            path: r.path.into(),
            iface: r.iface.map(Into::into),
            rt: r.rt.map(Into::into),
            ct: r.ct.map(Into::into),
            obs: r.obs,
            ver: r.ver.map(Into::into),
        })
        .collect();
    EndpointSummary {
        ep: ep.reg.name.clone(),
        ept: ep.reg.ept.clone().unwrap_or_default(),
        queue: ep.reg.queue,
        resources,
        lwm2m: ep.reg.lwm2m.clone(),
        ct: ep
            .formats()
            .first()
            .map(|ct| crate::coap::content_format::describe(*ct)),
    }
}

/// The outcome of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The receiver took the batch.
    Accepted,
    /// Try again later (connection failure, timeout, 5xx, 408, 429).
    Retry(String),
    /// The receiver refuses this batch for good: it is discarded and counted.
    Refused(String),
}

/// Where events for keys are delivered when a key has a callback. Implemented by
/// `plugins::PluginSink`, which hands each batch to the configured sink plugin, and by
/// [`SchemeRouter`], which picks a sink by the callback URL's scheme.
pub trait Sink: Send + Sync + 'static {
    /// The check made when a callback is registered (`Err` is shown to the client).
    fn verify<'a>(
        &'a self,
        target: &'a CallbackTarget,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
    /// Delivers one batch of events, in the order they happened (rendered by the sink,
    /// with the [`Render`] it was given).
    fn deliver<'a>(
        &'a self,
        target: &'a CallbackTarget,
        events: &'a [Event],
    ) -> Pin<Box<dyn Future<Output = Delivery> + Send + 'a>>;
}

/// The hub's sink: routes each callback to the sink registered for its URL's scheme
/// (`mqtt` in `mqtt://broker/topic`, compared without case), or to the default sink (the
/// `[plugins] sink`, which answers for `http`/`https` and refuses what it does not know).
/// A second kind of sink is one [`Sink`] implementation and one [`SchemeRouter::route`]
/// at start-up (ARCHITECTURE.md, "Extending").
pub struct SchemeRouter {
    /// (scheme in lower case, sink), few: searched in order.
    routes: Vec<(String, std::sync::Arc<dyn Sink>)>,
    default: std::sync::Arc<dyn Sink>,
}

impl SchemeRouter {
    pub fn new(default: std::sync::Arc<dyn Sink>) -> SchemeRouter {
        SchemeRouter {
            routes: Vec::new(),
            default,
        }
    }

    /// Callbacks whose URL has this scheme go to `sink` (a later route for the same scheme
    /// replaces an earlier one).
    pub fn route(mut self, scheme: &str, sink: std::sync::Arc<dyn Sink>) -> SchemeRouter {
        let scheme = scheme.to_ascii_lowercase();
        self.routes.retain(|(s, _)| *s != scheme);
        self.routes.push((scheme, sink));
        self
    }

    fn sink_for(&self, target: &CallbackTarget) -> &dyn Sink {
        let scheme = target.url.split_once(':').map(|(s, _)| s);
        scheme
            .and_then(|s| self.routes.iter().find(|(r, _)| r.eq_ignore_ascii_case(s)))
            .map_or(&*self.default, |(_, sink)| &**sink)
    }
}

impl Sink for SchemeRouter {
    fn verify<'a>(
        &'a self,
        target: &'a CallbackTarget,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        self.sink_for(target).verify(target)
    }

    fn deliver<'a>(
        &'a self,
        target: &'a CallbackTarget,
        events: &'a [Event],
    ) -> Pin<Box<dyn Future<Output = Delivery> + Send + 'a>> {
        self.sink_for(target).deliver(target, events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that answers with its name.
    struct Named(&'static str);

    impl Sink for Named {
        fn verify<'a>(
            &'a self,
            _: &'a CallbackTarget,
        ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
            Box::pin(async move { Err(self.0.to_string()) })
        }

        fn deliver<'a>(
            &'a self,
            _: &'a CallbackTarget,
            _: &'a [Event],
        ) -> Pin<Box<dyn Future<Output = Delivery> + Send + 'a>> {
            Box::pin(async move { Delivery::Refused(self.0.to_string()) })
        }
    }

    #[tokio::test]
    async fn callbacks_go_to_the_sink_of_their_scheme_or_to_the_default() {
        let router = SchemeRouter::new(std::sync::Arc::new(Named("default")))
            .route("mqtt", std::sync::Arc::new(Named("old mqtt")))
            .route("MQTT", std::sync::Arc::new(Named("mqtt")))
            .route("ws", std::sync::Arc::new(Named("ws")));
        let to = |url: &str| CallbackTarget {
            url: url.into(),
            headers: Default::default(),
        };
        for (url, want) in [
            ("mqtt://127.0.0.1:1883/t", "mqtt"),
            ("Mqtt://127.0.0.1/t", "mqtt"),
            ("ws://127.0.0.1/", "ws"),
            ("http://127.0.0.1/", "default"),
            ("https://127.0.0.1/", "default"),
            ("mqtts://127.0.0.1/", "default"),
            ("no scheme at all", "default"),
        ] {
            assert_eq!(
                router.verify(&to(url)).await,
                Err(want.to_string()),
                "{url}"
            );
            assert_eq!(
                router.deliver(&to(url), &[]).await,
                Delivery::Refused(want.to_string()),
                "{url}"
            );
        }
    }
}
