//! Notification events and their delivery to applications.
//!
//! Every access key that wants notifications has one [`hub::Channel`]: long-poll (the
//! default) or a callback URL. Each event for a key goes through that key's ordered,
//! durable queue; the hub owns ordering, batching, retry and the discard window, and the
//! [`Sink`] (a sink plugin per callback URL scheme: webhooks, MQTT) only delivers one batch and says whether it was
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
pub use hub::{Forwarding, Hub, Undo};

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
/// `plugins::PluginSink`, which hands each batch to one sink plugin, and by
/// [`SchemeRouter`], which picks a sink by the callback URL's scheme.
pub trait Sink: Send + Sync + 'static {
    /// The check made when a callback is registered (`Err` is shown to the client).
    fn verify<'a>(
        &'a self,
        target: &'a CallbackTarget,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
    /// Delivers one batch of events of the key `key_id` (the auth backend's id of the
    /// key, never its secret), in the order they happened (rendered by the sink, with the
    /// [`Render`] it was given).
    fn deliver<'a>(
        &'a self,
        key_id: &'a str,
        target: &'a CallbackTarget,
        events: &'a [Event],
    ) -> Pin<Box<dyn Future<Output = Delivery> + Send + 'a>>;
}

/// A callback URL as the log shows it, its password left out (the SDK's
/// `sink::redact_url`, which the sinks use in their reasons).
pub use connectord_plugin_sdk::sink::redact_url;

/// The hub's sink: routes each callback to the sink registered for its URL's scheme
/// (`mqtt` in `mqtt://broker/topic`, compared without case). A URL whose scheme no sink
/// takes is refused at registration (`verify`, a 400 that names the schemes taken); a
/// batch for one (its sink was enabled when the callback was registered, and is no
/// more) is retried, so that its events wait, up to the discard window, for the sink to
/// come back rather than being dropped at once. The routes are set at start-up from the
/// schemes each sink of `[plugins] sinks` declares (`daemon.rs`).
pub struct SchemeRouter {
    /// (scheme in lower case, the sink's name, sink), few: searched in order.
    routes: Vec<(String, String, std::sync::Arc<dyn Sink>)>,
}

impl Default for SchemeRouter {
    fn default() -> Self {
        SchemeRouter::new()
    }
}

impl SchemeRouter {
    pub fn new() -> SchemeRouter {
        SchemeRouter { routes: Vec::new() }
    }

    /// Callbacks whose URL has this scheme go to `sink`, named `name` in messages. The
    /// first route of a scheme wins: a later one for the same scheme is not added, and
    /// `false` says so.
    pub fn route(&mut self, scheme: &str, name: &str, sink: std::sync::Arc<dyn Sink>) -> bool {
        let scheme = scheme.to_ascii_lowercase();
        if self.routes.iter().any(|(s, _, _)| *s == scheme) {
            return false;
        }
        self.routes.push((scheme, name.to_string(), sink));
        true
    }

    /// The sink that takes `scheme`, by name, if any.
    pub fn sink_of(&self, scheme: &str) -> Option<&str> {
        self.routes
            .iter()
            .find(|(s, _, _)| s.eq_ignore_ascii_case(scheme))
            .map(|(_, n, _)| n.as_str())
    }

    /// Every route, as `scheme (sink)`, in order.
    pub fn describe(&self) -> String {
        let all: Vec<String> = self
            .routes
            .iter()
            .map(|(s, n, _)| format!("{s} ({n})"))
            .collect();
        all.join(", ")
    }

    fn sink_for(&self, target: &CallbackTarget) -> Result<&dyn Sink, String> {
        let scheme = target
            .url
            .split_once("://")
            .map(|(s, _)| s)
            .filter(|s| !s.is_empty());
        let Some(scheme) = scheme else {
            return Err(format!(
                "invalid callback URL {:?}: no scheme (the schemes taken: {})",
                target.url,
                self.describe()
            ));
        };
        match self
            .routes
            .iter()
            .find(|(r, _, _)| r.eq_ignore_ascii_case(scheme))
        {
            Some((_, _, sink)) => Ok(&**sink),
            None => Err(format!(
                "no notification sink takes callback URLs of scheme {scheme:?}; the schemes taken: {}",
                self.describe()
            )),
        }
    }
}

impl Sink for SchemeRouter {
    fn verify<'a>(
        &'a self,
        target: &'a CallbackTarget,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        match self.sink_for(target) {
            Ok(sink) => sink.verify(target),
            Err(why) => Box::pin(async move { Err(why) }),
        }
    }

    fn deliver<'a>(
        &'a self,
        key_id: &'a str,
        target: &'a CallbackTarget,
        events: &'a [Event],
    ) -> Pin<Box<dyn Future<Output = Delivery> + Send + 'a>> {
        match self.sink_for(target) {
            Ok(sink) => sink.deliver(key_id, target, events),
            Err(why) => Box::pin(async move { Delivery::Retry(why) }),
        }
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
            _: &'a str,
            _: &'a CallbackTarget,
            _: &'a [Event],
        ) -> Pin<Box<dyn Future<Output = Delivery> + Send + 'a>> {
            Box::pin(async move { Delivery::Refused(self.0.to_string()) })
        }
    }

    #[test]
    fn passwords_are_left_out_of_logged_urls() {
        for (url, shown) in [
            ("mqtt://u:pw@h:1/p?q", "mqtt://u:***@h:1/p?q"),
            ("https://u@h/p", "https://u@h/p"),
            ("http://h/a:b@c", "http://h/a:b@c"),
            ("no scheme", "no scheme"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[tokio::test]
    async fn callbacks_go_to_the_sink_of_their_scheme_and_other_schemes_are_refused() {
        let mut router = SchemeRouter::new();
        assert!(router.route("http", "webhook", std::sync::Arc::new(Named("webhook"))));
        assert!(router.route("HTTPS", "webhook", std::sync::Arc::new(Named("webhook"))));
        assert!(router.route("mqtt", "mqtt", std::sync::Arc::new(Named("mqtt"))));
        // The first sink of a scheme keeps it.
        assert!(!router.route("MQTT", "other", std::sync::Arc::new(Named("other"))));
        assert_eq!(router.sink_of("Mqtt"), Some("mqtt"));
        assert_eq!(router.sink_of("ws"), None);
        let to = |url: &str| CallbackTarget {
            url: url.into(),
            headers: Default::default(),
        };
        for (url, want) in [
            ("mqtt://127.0.0.1:1883/t", "mqtt"),
            ("Mqtt://127.0.0.1/t", "mqtt"),
            ("http://127.0.0.1/", "webhook"),
            ("https://127.0.0.1/", "webhook"),
        ] {
            assert_eq!(
                router.verify(&to(url)).await,
                Err(want.to_string()),
                "{url}"
            );
            assert_eq!(
                router.deliver("k", &to(url), &[]).await,
                Delivery::Refused(want.to_string()),
                "{url}"
            );
        }
        let taken = "the schemes taken: http (webhook), https (webhook), mqtt (mqtt)";
        for (url, why) in [
            (
                "mqtts://127.0.0.1/",
                format!("no notification sink takes callback URLs of scheme \"mqtts\"; {taken}"),
            ),
            (
                "no scheme at all",
                format!("invalid callback URL \"no scheme at all\": no scheme ({taken})"),
            ),
        ] {
            assert_eq!(router.verify(&to(url)).await, Err(why.clone()), "{url}");
            // A batch for such a URL waits (retried) rather than being dropped.
            assert_eq!(
                router.deliver("k", &to(url), &[]).await,
                Delivery::Retry(why),
                "{url}"
            );
        }
    }
}
