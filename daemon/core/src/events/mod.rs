//! Notification events and their delivery to applications.
//!
//! Every access key that wants notifications has one [`hub::Channel`]: long-poll (the
//! default) or a callback URL. Each event for a key goes through that key's ordered,
//! durable queue; the hub owns ordering, batching, retry and the discard window, and the
//! [`Sink`] (today the [`webhook`]) only delivers one batch and says whether it was
//! accepted, should be retried, or is refused.

pub mod hub;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use base64::Engine;
use bytes::Bytes;
use serde::Serialize;
use serde_json::{Value, json};

pub use connectord_model::{Body, CallbackTarget, ChannelRecord, Event, Kind, StoredEvent};
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

/// The notification message for a batch of events, in order: one array per event type
/// present (types in name order, as a JSON object map writes them), entries in the order
/// they happened. Written from the events' JSON text without building a tree.
pub fn batch_json<'a>(events: impl IntoIterator<Item = &'a Event>) -> String {
    let mut groups: BTreeMap<&'static str, Vec<&'a str>> = BTreeMap::new();
    let mut len = 2;
    for e in events {
        len += e.body.as_str().len() + 1;
        groups
            .entry(e.kind.as_str())
            .or_default()
            .push(e.body.as_str());
    }
    let mut out = String::with_capacity(len + groups.len() * 24);
    out.push('{');
    for (i, (kind, bodies)) in groups.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Event type names are fixed ASCII words: nothing to escape.
        out.push('"');
        out.push_str(kind);
        out.push_str("\":[");
        for (j, b) in bodies.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            out.push_str(b);
        }
        out.push(']');
    }
    out.push('}');
    out
}

/// The entry of a `registrations` or `reg-updates` event: `ep`, `ept`, `q` and the
/// resources. Each resource carries the seed's `rf` for its resource type and also `rt`
/// (the link-format name, which clients written against the real service read);
/// `obs` is a boolean; absent attributes are left out. Only the resources the restriction
/// `allow` lets its key see are listed (`None`: all of them).
pub fn registration_body(ep: &Endpoint, allow: Option<&[String]>) -> Value {
    let resources: Vec<Value> = ep
        .resources()
        .iter()
        .filter(|r| crate::auth::may_access(allow, &ep.reg.name, Some(&r.path)))
        .map(|r| {
            let mut o = serde_json::Map::new();
            o.insert("path".into(), json!(r.path));
            if let Some(i) = &r.iface {
                o.insert("if".into(), json!(i));
            }
            if let Some(rt) = &r.rt {
                o.insert("rf".into(), json!(rt));
                o.insert("rt".into(), json!(rt));
            }
            if let Some(ct) = &r.ct {
                o.insert("ct".into(), json!(ct));
            }
            o.insert("obs".into(), json!(r.obs));
            if let Some(ver) = &r.ver {
                o.insert("ver".into(), json!(ver));
            }
            Value::Object(o)
        })
        .collect();
    let mut entry = json!({
        "ep": ep.reg.name,
        "ept": ep.reg.ept.clone().unwrap_or_default(),
        "q": ep.reg.queue,
        "resources": resources,
    });
    // Extensions: the LwM2M version and the device's preferred content format.
    if let Some(o) = entry.as_object_mut() {
        if let Some(v) = &ep.reg.lwm2m {
            o.insert("lwm2m".into(), json!(v));
        }
        if let Some(ct) = ep.formats().first() {
            o.insert(
                "ct".into(),
                json!(crate::coap::content_format::describe(*ct)),
            );
        }
    }
    entry
}

/// An `async-responses` entry. `error` is present only when there is one: the official
/// Python client treats any `error` key as a failure. `location` (an extension) is the
/// Location-Path the device answered a create with (`/3303/1`).
pub fn async_response_body(
    id: &str,
    status: u16,
    payload: &[u8],
    ct: Option<&str>,
    max_age: Option<u32>,
    error: Option<&str>,
    location: Option<&str>,
) -> Body {
    /// Fields in name order, as the `Value` map this replaced wrote them.
    #[derive(Serialize)]
    struct Entry<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        ct: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a str>,
        id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        location: Option<&'a str>,
        #[serde(rename = "max-age", skip_serializing_if = "Option::is_none")]
        max_age: Option<u32>,
        payload: String,
        status: u16,
    }
    Body::new(&Entry {
        ct,
        error,
        id,
        location,
        max_age,
        payload: base64::engine::general_purpose::STANDARD.encode(payload),
        status,
    })
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
    /// Delivers one batch (a JSON notification message).
    fn deliver<'a>(
        &'a self,
        target: &'a CallbackTarget,
        body: Bytes,
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
        body: Bytes,
    ) -> Pin<Box<dyn Future<Output = Delivery> + Send + 'a>> {
        self.sink_for(target).deliver(target, body)
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
            _: Bytes,
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
                router.deliver(&to(url), Bytes::new()).await,
                Delivery::Refused(want.to_string()),
                "{url}"
            );
        }
    }

    #[test]
    fn batches_group_by_type_in_order() {
        let e = |kind, body: Value| Event {
            kind,
            body: body.into(),
            created_ms: 0,
        };
        let batch = batch_json(&[
            e(Kind::Registrations, json!({"ep": "a"})),
            e(Kind::AsyncResponses, json!({"id": "1"})),
            e(Kind::Registrations, json!({"ep": "b"})),
            e(Kind::DeRegistrations, json!("a")),
        ]);
        assert_eq!(
            serde_json::from_str::<Value>(&batch).unwrap(),
            json!({
                "registrations": [{"ep": "a"}, {"ep": "b"}],
                "async-responses": [{"id": "1"}],
                "de-registrations": ["a"],
            })
        );
    }

    #[test]
    fn async_response_has_error_only_when_failed() {
        let ok = async_response_body("x", 200, b"12", Some("text/plain"), Some(0), None, None);
        assert_eq!(
            serde_json::from_str::<Value>(ok.as_str()).unwrap(),
            json!({"id": "x", "status": 200, "payload": "MTI=", "ct": "text/plain", "max-age": 0})
        );
        let bad = async_response_body("x", 504, b"", None, None, Some("timeout"), None);
        assert_eq!(
            serde_json::from_str::<Value>(bad.as_str()).unwrap(),
            json!({"id": "x", "status": 504, "error": "timeout", "payload": ""})
        );
        // The same text the Value map wrote: keys in name order.
        assert_eq!(
            ok.as_str(),
            r#"{"ct":"text/plain","id":"x","max-age":0,"payload":"MTI=","status":200}"#
        );
    }
}
