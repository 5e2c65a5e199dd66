//! Tests of the plugin: URLs and topics as data, then the plugin driven through its
//! operations ([`Plugin::create`] with a [`MemoryHost`], then [`Dispatch::call`] with JSON)
//! against a real broker, Debian's `mosquitto`, started by the test on a free port of
//! 127.0.0.1, and a subscriber nobody here wrote either (`mosquitto_sub`).
//!
//! `call` blocks on the instance's own runtime, so the tests are plain `#[test]`s.

use std::net::TcpListener;
use std::path::Path;

use connectord_plugin_sdk::sink::{
    DeliverRequest, DeliverResponse, OP_DELIVER, OP_SCHEMES, OP_VERIFY, Target, VerifyRequest,
    VerifyResponse,
};
use connectord_plugin_sdk::testing::MemoryHost;
use connectord_plugin_sdk::{Dispatch, Kind, Plugin};
use serde_json::{Value, json};

use super::target::{Broker, Message, messages, parse};
use super::*;
use connectord_plugin_sdk::sink::redact_url as redact;

// ---------------------------------------------------------------------------------------------
// URLs and topics.

#[test]
fn urls_give_the_broker_the_credentials_and_the_topic_prefix() {
    let b =
        |tls, host: &str, port, user: Option<&str>, password: Option<&str>, prefix: &str| Broker {
            tls,
            host: host.into(),
            port,
            user: user.map(Into::into),
            password: password.map(Into::into),
            prefix: prefix.into(),
        };
    for (url, want) in [
        (
            "mqtt://127.0.0.1",
            b(false, "127.0.0.1", 1883, None, None, "connectord"),
        ),
        (
            "MQTTS://broker.example:9000/",
            b(true, "broker.example", 9000, None, None, "connectord"),
        ),
        (
            "mqtts://broker.example/a/b/",
            b(true, "broker.example", 8883, None, None, "a/b"),
        ),
        (
            "mqtt://u%40x:p%3Aw@[::1]:1884/tenant%20one",
            b(false, "::1", 1884, Some("u@x"), Some("p:w"), "tenant one"),
        ),
        (
            "mqtt://user@h",
            b(false, "h", 1883, Some("user"), None, "connectord"),
        ),
    ] {
        assert_eq!(parse(url), Ok(want), "{url}");
    }
    for (url, why) in [
        ("http://h/", "the scheme must be mqtt or mqtts"),
        ("mqtt:///x", "invalid MQTT callback URL"),
        ("mqtt://h:0/", "port 0"),
        ("mqtt://h/x?y=1", "a query or fragment is not used"),
        ("mqtt://h/a/+/b", "must not hold the wildcards"),
        ("mqtt://h/a/%23", "must not hold the wildcards"),
        ("", "invalid MQTT callback URL"),
    ] {
        let err = parse(url).unwrap_err();
        assert!(err.contains(why), "{url}: {err}");
    }
    // A password is never shown.
    let err = parse("ftp://me:s3cret@h/").unwrap_err();
    assert!(!err.contains("s3cret") && err.contains("me:***@h"), "{err}");
    assert_eq!(redact("mqtt://a:b@h:1/p"), "mqtt://a:***@h:1/p");
    assert_eq!(redact("mqtt://a@h/p"), "mqtt://a@h/p");
    assert_eq!(redact("mqtt://h/p:q@r"), "mqtt://h/p:q@r");
}

#[test]
fn each_event_gets_its_topic_and_its_entry_as_payload() {
    let body = r#"{"async-responses":[{"id":"1#2","status":200,"payload":""}],"de-registrations":["ep/1"],"notifications":[{"ep":"ep1","path":"/3/0/1","payload":"MQ=="},{"ep":"ep+2","path":"/a b/%","payload":"Mg=="}],"registrations":[{"ep":"ep1","ept":"t","q":false,"resources":[]}],"subscription-errors":[{"ep":"ep1","path":"/3/0/2","status":404}],"unknown":[{"x":1}]}"#;
    let got = messages("pre/fix", "key/1", body).unwrap();
    let want = [
        (
            "pre/fix/key%2F1/async-responses/1%232",
            r#"{"id":"1#2","status":200,"payload":""}"#,
        ),
        ("pre/fix/key%2F1/de-registrations/ep%2F1", r#""ep/1""#),
        (
            "pre/fix/key%2F1/notifications/ep1/3/0/1",
            r#"{"ep":"ep1","path":"/3/0/1","payload":"MQ=="}"#,
        ),
        (
            "pre/fix/key%2F1/notifications/ep%2B2/a b/%25",
            r#"{"ep":"ep+2","path":"/a b/%","payload":"Mg=="}"#,
        ),
        (
            "pre/fix/key%2F1/registrations/ep1",
            r#"{"ep":"ep1","ept":"t","q":false,"resources":[]}"#,
        ),
        (
            "pre/fix/key%2F1/subscription-errors/ep1/3/0/2",
            r#"{"ep":"ep1","path":"/3/0/2","status":404}"#,
        ),
        ("pre/fix/key%2F1/unknown", r#"{"x":1}"#),
    ];
    let want: Vec<Message> = want
        .iter()
        .map(|(t, p)| Message {
            topic: t.to_string(),
            payload: p.to_string(),
        })
        .collect();
    assert_eq!(got, want);
    for bad in ["", "[]", r#"{"notifications":{}}"#, "not json"] {
        assert!(messages("p", "k", bad).is_err(), "{bad}");
    }
}

#[test]
fn configuration_is_checked() {
    assert_eq!(
        Config::from_json(json!({})).unwrap(),
        Config {
            timeout_s: DEFAULT_TIMEOUT_S,
            ca_file: None
        }
    );
    for (bad, why) in [
        (json!([]), "expected a table"),
        (json!({"timeout_s": 0}), "timeout_s must lie between"),
        (json!({"timeout_s": 3601}), "timeout_s must lie between"),
        (json!({"ca_file": ""}), "ca_file must not be empty"),
        (json!({"nope": 1}), "unknown field"),
    ] {
        let err = Config::from_json(bad.clone()).unwrap_err();
        assert!(err.contains(why), "{bad}: {err}");
    }
    let host = MemoryHost::new();
    let err = MqttSink::create(json!({"ca_file": "/nonexistent/ca.pem"}), host.host())
        .err()
        .unwrap();
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Against mosquitto.

const TEST_TIMEOUT_S: u64 = 3;

// The test broker, subscriber and certificates the end-to-end tests use too (the testkit's
// module; this crate cannot depend on the testkit, which links this sink).
// Not every helper of the shared file is used here (`Mosquitto::stop`).
#[allow(dead_code)]
#[path = "../../../daemon/testkit/src/mosquitto.rs"]
mod mosquitto;
use mosquitto::{Mosquitto, Subscriber, free_port, pki};

fn sink(ca_file: Option<&Path>) -> MqttSink {
    let mut config = json!({ "timeout_s": TEST_TIMEOUT_S });
    if let Some(p) = ca_file {
        config["ca_file"] = json!(p.to_str().unwrap());
    }
    MqttSink::create(config, MemoryHost::new().host()).unwrap()
}

fn target(url: &str) -> Target {
    Target {
        url: url.into(),
        headers: Default::default(),
    }
}

fn verify(s: &mut MqttSink, t: &Target) -> VerifyResponse {
    let input = serde_json::to_vec(&VerifyRequest { target: t.clone() }).unwrap();
    serde_json::from_slice(&s.call(OP_VERIFY, &input).unwrap()).unwrap()
}

fn deliver(s: &mut MqttSink, t: &Target, key: &str, body: &str) -> DeliverResponse {
    let input = serde_json::to_vec(&DeliverRequest {
        target: t.clone(),
        body: body.into(),
        key_id: Some(key.into()),
    })
    .unwrap();
    serde_json::from_slice(&s.call(OP_DELIVER, &input).unwrap()).unwrap()
}

#[test]
fn the_plugin_answers_the_sink_operations_and_takes_mqtt_schemes() {
    assert_eq!(<MqttSink as Dispatch>::KIND, Kind::Sink);
    assert_eq!(MqttSink::operations(), ["verify", "deliver", "schemes"]);
    let mut s = sink(None);
    let answer: Value = serde_json::from_slice(&s.call(OP_SCHEMES, b"").unwrap()).unwrap();
    assert_eq!(answer, json!({"schemes": ["mqtt", "mqtts"]}));
    assert!(s.call(OP_VERIFY, b"not json").is_err());
    assert!(
        s.call("nope", b"{}")
            .unwrap_err()
            .contains("unknown operation")
    );
}

#[test]
fn a_batch_is_published_in_order_at_qos_1_and_accepted() {
    let broker = Mosquitto::start(None);
    let sub = Subscriber::start(broker.port, "t1/#");
    let mut s = sink(None);
    let t = target(&format!("mqtt://127.0.0.1:{}/t1", broker.port));
    assert_eq!(
        verify(&mut s, &t),
        VerifyResponse {
            ok: true,
            reason: None
        }
    );
    let body = r#"{"notifications":[{"ep":"ep1","path":"/3/0/1","payload":"MQ=="},{"ep":"ep1","path":"/3/0/1","payload":"Mg=="},{"ep":"ep2","path":"/5/0","payload":"Mw=="}],"registrations":[{"ep":"ep3","ept":"t","q":false,"resources":[]}]}"#;
    assert_eq!(deliver(&mut s, &t, "k1", body), DeliverResponse::Accepted);
    assert_eq!(
        sub.take(4),
        [
            r#"t1/k1/notifications/ep1/3/0/1 {"ep":"ep1","path":"/3/0/1","payload":"MQ=="}"#,
            r#"t1/k1/notifications/ep1/3/0/1 {"ep":"ep1","path":"/3/0/1","payload":"Mg=="}"#,
            r#"t1/k1/notifications/ep2/5/0 {"ep":"ep2","path":"/5/0","payload":"Mw=="}"#,
            r#"t1/k1/registrations/ep3 {"ep":"ep3","ept":"t","q":false,"resources":[]}"#,
        ]
    );
    // A batch bigger than rumqttc's in-flight window (100) is all acknowledged.
    let many: Vec<String> = (0..250)
        .map(|i| format!(r#"{{"ep":"e","path":"/1/0/{i}","payload":""}}"#))
        .collect();
    let body = format!(r#"{{"notifications":[{}]}}"#, many.join(","));
    assert_eq!(deliver(&mut s, &t, "k1", &body), DeliverResponse::Accepted);
    let got = sub.take(250);
    for (i, line) in got.iter().enumerate() {
        assert!(
            line.starts_with(&format!("t1/k1/notifications/e/1/0/{i} ")),
            "{i}: {line}"
        );
    }
    sub.nothing_more();
}

#[test]
fn a_broker_that_cannot_be_reached_or_does_not_answer_is_retried() {
    let mut s = sink(None);
    // Nothing listens.
    let port = free_port();
    let t = target(&format!("mqtt://127.0.0.1:{port}/x"));
    let v = verify(&mut s, &t);
    assert!(!v.ok);
    let reason = v.reason.unwrap();
    assert!(
        reason.contains(&format!("cannot connect to MQTT broker 127.0.0.1:{port}")),
        "{reason}"
    );
    match deliver(&mut s, &t, "k", r#"{"notifications":[]}"#) {
        DeliverResponse::Retry { reason } => {
            assert!(reason.contains("cannot connect"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Something listens but never answers: the timeout, then retry.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let t = target(&format!("mqtt://u:secret@127.0.0.1:{port}/x"));
    match deliver(
        &mut s,
        &t,
        "k",
        r#"{"notifications":[{"ep":"e","path":"/1","payload":""}]}"#,
    ) {
        DeliverResponse::Retry { reason } => {
            assert!(reason.contains("within 3s"), "{reason}");
            assert!(!reason.contains("secret"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_targets_and_bodies_are_refused() {
    let broker = Mosquitto::start(None);
    let mut s = sink(None);
    let url = format!("mqtt://127.0.0.1:{}/x", broker.port);
    let mut with_headers = target(&url);
    with_headers
        .headers
        .insert("Authorization".into(), "Bearer x".into());
    let v = verify(&mut s, &with_headers);
    assert!(!v.ok && v.reason.unwrap().contains("take no headers"));
    let v = verify(&mut s, &target("mqtt://127.0.0.1:1883/a/+"));
    assert!(!v.ok && v.reason.unwrap().contains("wildcards"));
    assert!(matches!(
        deliver(&mut s, &target(&url), "k", "[1]"),
        DeliverResponse::Refused { .. }
    ));
    assert!(matches!(
        deliver(&mut s, &target("mqtt://h/+"), "k", "{}"),
        DeliverResponse::Refused { .. }
    ));
}

#[test]
fn mqtts_brokers_are_trusted_through_ca_file_only() {
    let pki = pki();
    let broker = Mosquitto::start(Some(&pki));
    let tls_port = broker.tls_port.unwrap();
    let t = target(&format!("mqtts://127.0.0.1:{tls_port}/sec"));
    // Without the CA: the broker's certificate is not trusted (retried, not refused: the
    // operator may add the CA).
    let mut plain = sink(None);
    let v = verify(&mut plain, &t);
    assert!(!v.ok);
    assert!(v.reason.as_deref().unwrap().contains("TLS"), "{v:?}");
    assert!(matches!(
        deliver(&mut plain, &t, "k", r#"{"notifications":[]}"#),
        DeliverResponse::Retry { .. }
    ));
    // With it: connected, published, and the subscriber (on the plain listener) gets it.
    let sub = Subscriber::start(broker.port, "sec/#");
    let mut s = sink(Some(&pki.ca));
    assert_eq!(
        verify(&mut s, &t),
        VerifyResponse {
            ok: true,
            reason: None
        }
    );
    let body = r#"{"notifications":[{"ep":"ep1","path":"/3/0/1","payload":"MQ=="}]}"#;
    assert_eq!(deliver(&mut s, &t, "k9", body), DeliverResponse::Accepted);
    assert_eq!(
        sub.take(1),
        [r#"sec/k9/notifications/ep1/3/0/1 {"ep":"ep1","path":"/3/0/1","payload":"MQ=="}"#]
    );
}
