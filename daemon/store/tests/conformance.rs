//! The same behaviour, checked on every backend: what one port promises, the SQLite file
//! and the in-memory maps both keep (and the SQLite file keeps it across a reopen).

use connectord_model::{
    CallbackTarget, ChannelRecord, Entry, Event, HourCount, Job, Method, Notification, PreSub,
    PresubRecord, Registration, StoredEvent, SubscriptionRecord,
};
use connectord_store::memory::MemoryStore;
use connectord_store::prelude::*;
use connectord_store::sqlite::SqliteStore;

fn reg(id: &str, domain: &str, name: &str) -> Registration {
    Registration {
        id: id.into(),
        domain: domain.into(),
        name: name.into(),
        ept: None,
        lifetime_s: 60,
        binding: "U".into(),
        lwm2m: Some("1.0".into()),
        queue: false,
        peer: connectord_model::PeerRef::udp(
            "127.0.0.1:5683".parse().unwrap(),
            "127.0.0.1:5000".parse().unwrap(),
        ),
        links: "</3/0>".into(),
        registered_at_ms: 1,
        expires_at_ms: 60_001,
        node: None,
    }
}

fn job(id: &str) -> Job {
    Job {
        id: id.into(),
        key_id: "k".into(),
        domain: "d".into(),
        ep: "ep".into(),
        method: Method::Put,
        path: "/3/0/1".into(),
        payload: "MTI=".into(),
        content_format: Some(0),
        accept: None,
        accept_fallback: false,
        as_json: false,
        created_ms: 7,
        internal: false,
        device_request: None,
        attempts: 0,
        row: 0,
    }
}

/// The `n`th event (its payload and creation time say which).
fn entry(n: u64) -> Event {
    Event::new(
        Entry::Notification(Notification {
            ep: "ep".into(),
            path: "/3/0/1".into(),
            ct: Some("text/plain".into()),
            payload: n.to_string().into_bytes(),
            max_age: 60,
        }),
        n,
    )
}

/// The `n`th event to append for `key`.
fn new(key: &str, n: u64) -> (String, Event) {
    (key.into(), entry(n))
}

/// The `n`th event as stored for `key` with sequence number `seq`.
fn event(key: &str, n: u64, seq: u64) -> StoredEvent {
    StoredEvent {
        key_id: key.into(),
        seq,
        event: entry(n),
    }
}

/// Appends and waits until durable; the sequence numbers the store gave.
async fn append(s: &dyn Store, events: Vec<(String, Event)>, answered: Option<u64>) -> Vec<u64> {
    let a = s.append_events(events, answered);
    a.durable.await.unwrap();
    a.seqs
}

fn sub(key: &str, ep: &str, path: &str) -> SubscriptionRecord {
    SubscriptionRecord {
        key_id: key.into(),
        domain: "d".into(),
        ep: ep.into(),
        path: path.into(),
    }
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

/// Writes through every port and checks what each load gives back.
async fn writes_and_loads(s: &dyn Store) -> Seqs {
    // Registrations: replaced by id; a new id for the same (domain, name) replaces the old.
    s.put_registration(reg("1", "d", "a")).await.unwrap();
    s.put_registration(reg("2", "d", "b")).await.unwrap();
    s.put_registration(reg("3", "other", "a")).await.unwrap();
    // Issue 22: the owner node is kept (and `None` stays `None`).
    let mut owned = reg("4", "d", "a");
    owned.node = Some("n1".into());
    s.put_registration(owned).await.unwrap();
    s.delete_registration("2".into()).await.unwrap();
    s.delete_registration("absent".into()).await.unwrap();
    let mut loaded: Vec<_> = s
        .load_registrations()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.id, r.node))
        .collect();
    loaded.sort();
    assert_eq!(
        loaded,
        [("3".into(), None), ("4".into(), Some("n1".to_string()))]
    );
    // A put whose id and whose (domain, name) are held by two other rows replaces both:
    // 5 takes y from 6, and its own row (x) goes.
    s.put_registration(reg("5", "e", "x")).await.unwrap();
    s.put_registration(reg("6", "e", "y")).await.unwrap();
    s.put_registration(reg("5", "e", "y")).await.unwrap();
    let in_e: Vec<_> = s
        .load_registrations()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.domain == "e")
        .map(|r| (r.id, r.name))
        .collect();
    assert_eq!(in_e, [("5".to_string(), "y".to_string())]);
    s.delete_registration("5".into()).await.unwrap();

    // Channels by key id.
    let mut ch = ChannelRecord {
        key_id: "k".into(),
        domain: "d".into(),
        callback: None,
        allow: None,
        websocket: false,
    };
    s.put_channel(ch.clone()).await.unwrap();
    ch.callback = Some(CallbackTarget {
        url: "http://127.0.0.1:1/".into(),
        headers: Default::default(),
    });
    ch.allow = Some(vec!["ep".into()]);
    s.put_channel(ch.clone()).await.unwrap();
    assert_eq!(s.load_channels().await.unwrap(), vec![ch.clone()]);
    // A WebSocket channel (issue 23) is kept across a restart too.
    ch.callback = None;
    ch.websocket = true;
    s.put_channel(ch.clone()).await.unwrap();
    assert_eq!(s.load_channels().await.unwrap(), vec![ch]);

    // Requests by row, in order; an answer's events remove their request in one write.
    let r1 = s.put_request(&job("a")).await.unwrap();
    let r2 = s.put_request(&job("b")).await.unwrap();
    let r3 = s.put_request(&job("c")).await.unwrap();
    assert!(r1 < r2 && r2 < r3);
    s.delete_request(r1).await.unwrap();
    let k12 = append(s, vec![new("k", 1), new("k", 2)], Some(r2)).await;
    assert!(k12[0] < k12[1], "{k12:?}");
    let j1 = append(s, vec![new("j", 1)], None).await[0];
    let left = s.load_requests().await.unwrap();
    assert_eq!(
        left.iter()
            .map(|j| (j.id.as_str(), j.row))
            .collect::<Vec<_>>(),
        [("c", r3)]
    );
    assert_eq!(
        left[0],
        Job {
            row: r3,
            ..job("c")
        }
    );
    // A device-request (issue 23) keeps its client-given id and its terms.
    let terms = Job {
        id: "client chosen/async id".into(),
        device_request: Some(connectord_model::DeviceRequestTerms {
            expires_ms: 1_800_000_000_000,
            retry: 2,
        }),
        ..job("d")
    };
    let r4 = s.put_request(&terms).await.unwrap();
    let with_terms = s.load_requests().await.unwrap();
    assert_eq!(with_terms.last(), Some(&Job { row: r4, ..terms }));
    // Answered before "c", queued earlier for the same endpoint (an expiry does that):
    // "c" is still there (NATS 2.9 then finds no last message of the subject).
    s.delete_request(r4).await.unwrap();
    assert_eq!(
        s.load_requests()
            .await
            .unwrap()
            .iter()
            .map(|j| j.id.as_str())
            .collect::<Vec<_>>(),
        ["c"]
    );

    // Events in (key, seq) order; deleting through a sequence number takes the oldest.
    let k3 = append(s, vec![new("k", 3)], None).await[0];
    assert!(k3 > k12[1]);
    s.delete_events_through("k".into(), k12[1]).await.unwrap();
    let events = s.load_events().await.unwrap();
    assert_eq!(events, vec![event("j", 1, j1), event("k", 3, k3)]);

    // The store numbers each key's events on, in the order submitted (not awaited in
    // between), one number per event: never one given before, not after a delete.
    let a = s.append_events(vec![new("m", 1), new("k", 4), new("m", 2)], None);
    let b = s.append_events(vec![new("k", 5)], None);
    let (m1, k4, m2, k5) = (a.seqs[0], a.seqs[1], a.seqs[2], b.seqs[0]);
    assert!(k3 < k4 && k4 < k5 && m1 < m2, "{:?} {:?}", a.seqs, b.seqs);
    a.durable.await.unwrap();
    b.durable.await.unwrap();
    s.delete_events_through("k".into(), k5).await.unwrap();
    s.delete_events_through("m".into(), m2).await.unwrap();
    let after = append(s, vec![new("k", 6), new("m", 3)], None).await;
    assert!(after[0] > k5 && after[1] > m2, "{after:?}");
    s.delete_events_through("k".into(), after[0]).await.unwrap();
    s.delete_events_through("m".into(), after[1]).await.unwrap();
    assert_eq!(s.load_events().await.unwrap(), vec![event("j", 1, j1)]);
    let seqs = Seqs {
        k: after[0],
        m: after[1],
        j: j1,
    };

    // Plugin state: per plugin, keys by prefix, sorted.
    for k in ["b/2", "a/1", "b/1"] {
        s.plugin_state_put("p".into(), k.into(), k.as_bytes().to_vec())
            .await
            .unwrap();
    }
    s.plugin_state_put("q".into(), "b/9".into(), vec![1])
        .await
        .unwrap();
    s.plugin_state_delete("p".into(), "a/1".into())
        .await
        .unwrap();
    assert_eq!(
        s.plugin_state_keys("p".into(), "b/".into()).await.unwrap(),
        ["b/1", "b/2"]
    );
    assert_eq!(
        s.plugin_state_get("p".into(), "b/2".into()).await.unwrap(),
        Some(b"b/2".to_vec())
    );
    assert_eq!(
        s.plugin_state_get("p".into(), "a/1".into()).await.unwrap(),
        None
    );

    // Subscriptions: idempotent puts; deleting one, one endpoint's, or all of a key's.
    for (k, ep, p) in [
        ("k", "e1", "/3/0/1"),
        ("k", "e1", "/3/0/2"),
        ("k", "e2", "/3/0/1"),
        ("k", "e3", "/3/0/1"),
        ("j", "e1", "/3/0/1"),
    ] {
        s.put_subscription(sub(k, ep, p)).await.unwrap();
    }
    s.put_subscription(sub("k", "e1", "/3/0/1")).await.unwrap();
    s.delete_subscriptions("k".into(), Some("e1".into()), Some("/3/0/2".into()))
        .await
        .unwrap();
    s.delete_subscriptions("k".into(), Some("e2".into()), None)
        .await
        .unwrap();
    assert_eq!(
        sorted(
            s.load_subscriptions()
                .await
                .unwrap()
                .into_iter()
                .map(|r| (r.key_id, r.ep, r.path))
                .collect()
        ),
        [
            ("j".into(), "e1".into(), "/3/0/1".into()),
            ("k".into(), "e1".into(), "/3/0/1".into()),
            ("k".into(), "e3".into(), "/3/0/1".into()),
        ] as [(String, String, String); 3]
    );
    // Replacing pre-subscriptions removes that key's subscriptions, in the same write.
    let rules = PresubRecord {
        key_id: "k".into(),
        domain: "d".into(),
        rules: vec![PreSub {
            endpoint_name: Some("e*".into()),
            endpoint_type: None,
            resource_path: Some(vec!["/3/0/1".into()]),
        }],
    };
    s.replace_presubscriptions(rules.clone()).await.unwrap();
    assert_eq!(s.load_presubscriptions().await.unwrap(), vec![rules]);
    let subs = s.load_subscriptions().await.unwrap();
    assert_eq!(subs, vec![sub("j", "e1", "/3/0/1")]);
    s.delete_subscriptions("j".into(), None, None)
        .await
        .unwrap();
    assert!(s.load_subscriptions().await.unwrap().is_empty());

    // Hour counts: replaced by (domain, hour); hours before `keep_from` go.
    let hc = |d: &str, hour, count| HourCount {
        domain: d.into(),
        hour,
        count,
    };
    s.save_hour_counts(vec![hc("d", 10, 1), hc("d", 11, 2), hc("e", 11, 3)], 0)
        .await
        .unwrap();
    s.save_hour_counts(vec![hc("d", 11, 5)], 11).await.unwrap();
    let mut counts: Vec<_> = s
        .load_hour_counts()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.domain, c.hour, c.count))
        .collect();
    counts.sort();
    assert_eq!(counts, [("d".into(), 11, 5), ("e".into(), 11, 3)]);

    assert_eq!(s.health().failing, None);
    seqs
}

/// The last sequence numbers [`writes_and_loads`] was given for keys `k`, `m` and `j`.
struct Seqs {
    k: u64,
    m: u64,
    j: u64,
}

#[tokio::test]
async fn memory_backend_keeps_what_each_port_promises() {
    writes_and_loads(&MemoryStore::new()).await;
}

#[tokio::test]
async fn sqlite_backend_keeps_what_each_port_promises_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let s = SqliteStore::open(dir.path()).unwrap();
        writes_and_loads(&s).await
    };
    let s = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(s.load_registrations().await.unwrap().len(), 2);
    assert_eq!(
        s.load_events().await.unwrap(),
        vec![event("j", 1, before.j)]
    );
    // Numbering goes on after a restart, for keys whose events were all deleted too.
    let after = append(&s, vec![new("k", 7), new("m", 4), new("j", 2)], None).await;
    assert!(
        after[0] > before.k && after[1] > before.m && after[2] > before.j,
        "{after:?}"
    );
    assert_eq!(s.load_requests().await.unwrap().len(), 1);
    assert_eq!(s.load_presubscriptions().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_memory_store_told_to_fail_refuses_writes_as_unavailable_and_keeps_nothing() {
    let s = MemoryStore::new();
    s.fail_writes(true);
    let e = s.put_registration(reg("1", "d", "a")).await.unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    assert!(s.health().failing.is_some());
    assert_eq!(s.health().errors, 1);
    s.fail_writes(false);
    assert!(s.load_registrations().await.unwrap().is_empty());
    s.put_registration(reg("1", "d", "a")).await.unwrap();
    assert_eq!(s.health().failing, None);
}

fn psk(domain: &str, ep: &str, identity: &str, key: &[u8]) -> connectord_model::PskRecord {
    connectord_model::PskRecord {
        domain: domain.into(),
        ep: ep.into(),
        identity: identity.into(),
        key: key.to_vec(),
        created_ms: 5,
    }
}

fn cert(serial: &str, domain: &str, ep: &str) -> connectord_model::CertificateRecord {
    connectord_model::CertificateRecord {
        serial: serial.into(),
        domain: domain.into(),
        ep: ep.into(),
        issued_ms: 10,
        not_after_ms: 1_000_000,
        revoked_ms: None,
    }
}

/// The credential port: a PSK per endpoint (replaced by a second put, its identity unique
/// across endpoints), certificates by serial, and a device's revocation removing its PSK
/// and revoking its certificates (not those already revoked, not another device's).
async fn credentials_written_and_loaded(s: &dyn Store) {
    s.put_psk(psk("d", "a", "id-a", b"0123456789abcdef"))
        .await
        .unwrap();
    s.put_psk(psk("d", "b", "id-b", b"bbbbbbbbbbbbbbbb"))
        .await
        .unwrap();
    // Same endpoint: replaced, new identity and key.
    s.put_psk(psk("d", "a", "id-a2", b"fedcba9876543210"))
        .await
        .unwrap();
    // Another endpoint cannot take an identity in use.
    assert!(
        s.put_psk(psk("e", "c", "id-b", b"cccccccccccccccc"))
            .await
            .is_err()
    );
    let mut psks = s.load_psks().await.unwrap();
    psks.sort_by(|x, y| x.ep.cmp(&y.ep));
    assert_eq!(
        psks,
        vec![
            psk("d", "a", "id-a2", b"fedcba9876543210"),
            psk("d", "b", "id-b", b"bbbbbbbbbbbbbbbb")
        ]
    );
    s.put_certificate(cert("4a01", "d", "a")).await.unwrap();
    s.put_certificate(cert("4a02", "d", "a")).await.unwrap();
    s.put_certificate(cert("4b01", "d", "b")).await.unwrap();
    let mut earlier = cert("4a00", "d", "a");
    earlier.revoked_ms = Some(3);
    s.put_certificate(earlier.clone()).await.unwrap();
    s.revoke_device("d".into(), "a".into(), 99).await.unwrap();
    // Revoking a device without credentials is no error.
    s.revoke_device("d".into(), "nobody".into(), 99)
        .await
        .unwrap();
    assert_eq!(
        s.load_psks().await.unwrap(),
        vec![psk("d", "b", "id-b", b"bbbbbbbbbbbbbbbb")]
    );
    let mut certs = s.load_certificates().await.unwrap();
    certs.sort_by(|x, y| x.serial.cmp(&y.serial));
    let revoked = |serial| {
        let mut c = cert(serial, "d", "a");
        c.revoked_ms = Some(99);
        c
    };
    assert_eq!(
        certs,
        vec![
            earlier,
            revoked("4a01"),
            revoked("4a02"),
            cert("4b01", "d", "b")
        ]
    );
    // The identity of a removed PSK is free again.
    s.put_psk(psk("e", "c", "id-a2", b"cccccccccccccccc"))
        .await
        .unwrap();
}

#[tokio::test]
async fn memory_backend_keeps_device_credentials() {
    credentials_written_and_loaded(&MemoryStore::new()).await;
}

#[tokio::test]
async fn sqlite_backend_keeps_device_credentials_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SqliteStore::open(dir.path()).unwrap();
        credentials_written_and_loaded(&s).await;
    }
    let s = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(s.load_psks().await.unwrap().len(), 2);
    assert_eq!(s.load_certificates().await.unwrap().len(), 4);
}

/// One key's events, as a key's new channel owner loads them: in order, only that key's,
/// and the store numbers the key's next events above them.
async fn events_of_one_key(s: &dyn Store) {
    let a = append(s, vec![new("x", 1), new("y", 1), new("x", 2)], None).await;
    assert_eq!(
        s.load_events_of("x".into()).await.unwrap(),
        vec![event("x", 1, a[0]), event("x", 2, a[2])]
    );
    assert!(s.load_events_of("none".into()).await.unwrap().is_empty());
    s.delete_events_through("x".into(), a[0]).await.unwrap();
    assert_eq!(
        s.load_events_of("x".into()).await.unwrap(),
        vec![event("x", 2, a[2])]
    );
    let next = append(s, vec![new("x", 3)], None).await;
    assert!(next[0] > a[2], "{next:?} {a:?}");
}

#[tokio::test]
async fn memory_backend_loads_one_keys_events() {
    events_of_one_key(&MemoryStore::new()).await;
}

/// A channel removed (idle, issue 23) takes its events with it, leaves the other keys'
/// alone, and its key's next events are numbered above the removed ones.
async fn a_removed_channel_takes_its_events(s: &dyn Store) {
    let ch = |key: &str| ChannelRecord {
        key_id: key.into(),
        domain: "d".into(),
        callback: None,
        allow: None,
        websocket: false,
    };
    s.put_channel(ch("gone")).await.unwrap();
    s.put_channel(ch("kept")).await.unwrap();
    let a = append(
        s,
        vec![new("gone", 1), new("kept", 1), new("gone", 2)],
        None,
    )
    .await;
    s.delete_channel("gone".into()).await.unwrap();
    s.delete_channel("never".into()).await.unwrap();
    assert_eq!(s.load_channels().await.unwrap(), vec![ch("kept")]);
    assert_eq!(s.load_events().await.unwrap(), vec![event("kept", 1, a[1])]);
    let next = append(s, vec![new("gone", 3)], None).await;
    assert!(next[0] > a[2], "{next:?} {a:?}");
}

#[tokio::test]
async fn memory_backend_removes_a_channel_with_its_events() {
    a_removed_channel_takes_its_events(&MemoryStore::new()).await;
}

#[tokio::test]
async fn sqlite_backend_removes_a_channel_with_its_events_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    a_removed_channel_takes_its_events(&SqliteStore::open(dir.path()).unwrap()).await;
    let s = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(s.load_channels().await.unwrap().len(), 1);
    assert_eq!(
        s.load_events().await.unwrap().len(),
        2,
        "kept's and gone's new one"
    );
}

#[tokio::test]
async fn sqlite_backend_loads_one_keys_events() {
    let dir = tempfile::tempdir().unwrap();
    events_of_one_key(&SqliteStore::open(dir.path()).unwrap()).await;
}

/// The NATS JetStream backend (issue 22), each test on nats-server processes of its own
/// (`daemon/testkit/src/nats.rs`, included as a module: the store cannot depend on the
/// testkit, which depends on the daemon).
#[path = "support/nats_store.rs"]
mod nats_store;
use nats_store::nats_server;

mod nats {
    use super::nats_server::{NatsCluster, NatsServer};
    use super::nats_store::{config, connect};
    use super::*;
    use connectord_store::nats::{ChannelChange, NatsStore, RegistrationChange};
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn nats_backend_keeps_what_each_port_promises_across_a_reconnect() {
        let server = NatsServer::start().unwrap();
        let before = {
            let s = connect(&server, "a").await;
            writes_and_loads(&s).await
        };
        // A new store on the same server (a restarted node) finds everything.
        let s = connect(&server, "a").await;
        assert_eq!(s.load_registrations().await.unwrap().len(), 2);
        assert_eq!(
            s.load_events().await.unwrap(),
            vec![event("j", 1, before.j)]
        );
        let after = append(&s, vec![new("k", 7), new("m", 4), new("j", 2)], None).await;
        assert!(
            after[0] > before.k && after[1] > before.m && after[2] > before.j,
            "{after:?}"
        );
        assert_eq!(s.load_requests().await.unwrap().len(), 1);
        assert_eq!(s.load_presubscriptions().await.unwrap().len(), 1);
        assert_eq!(
            s.plugin_state_keys("p".into(), "".into()).await.unwrap(),
            ["b/1", "b/2"]
        );
        // The registration index is rebuilt at connect: a delete by id still finds it.
        s.delete_registration("4".into()).await.unwrap();
        let ids: Vec<_> = s
            .load_registrations()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["3"]);
    }

    /// The cluster's CA fingerprint: the first node records it, a node with the same CA
    /// finds it, one with another CA is told the recorded one; kept across a reconnect.
    /// Two nodes racing with different CAs: exactly one records.
    #[tokio::test]
    async fn nats_backend_records_the_cluster_ca_once() {
        use connectord_store::nats::CaCheck;
        let server = NatsServer::start().unwrap();
        let a = connect(&server, "a").await;
        assert_eq!(a.check_ca("aa11").await.unwrap(), CaCheck::Recorded);
        assert_eq!(a.check_ca("aa11").await.unwrap(), CaCheck::Same);
        let b = connect(&server, "b").await;
        assert_eq!(b.check_ca("aa11").await.unwrap(), CaCheck::Same);
        assert_eq!(
            b.check_ca("bb22").await.unwrap(),
            CaCheck::Differs("aa11".into())
        );
        drop((a, b));
        let c = connect(&server, "c").await;
        assert_eq!(
            c.check_ca("cc33").await.unwrap(),
            CaCheck::Differs("aa11".into())
        );
        // Another prefix is another cluster: its own CA.
        let mut other = config(vec![server.url()], "x");
        other.prefix = "other".into();
        let x = NatsStore::connect(other.clone()).await.unwrap();
        other.node = "y".into();
        let y = NatsStore::connect(other).await.unwrap();
        let (rx, ry) = tokio::join!(x.check_ca("1111"), y.check_ca("2222"));
        let (rx, ry) = (rx.unwrap(), ry.unwrap());
        let recorded = [&rx, &ry]
            .iter()
            .filter(|r| ***r == CaCheck::Recorded)
            .count();
        assert_eq!(recorded, 1, "{rx:?} {ry:?}");
    }

    /// Membership: heartbeats listed by node name, a leave removes the entry at once, an
    /// entry not renewed expires after `MEMBER_MAX_AGE`.
    #[tokio::test]
    async fn nats_backend_lists_members_by_heartbeat() {
        use connectord_store::nats::{MEMBER_MAX_AGE, Member};
        let server = NatsServer::start().unwrap();
        let a = connect(&server, "a").await;
        let b = connect(&server, "b").await;
        let member = |n: &str| Member {
            node: n.into(),
            rest: vec!["127.0.0.1:1".into()],
            coap: vec!["127.0.0.1:2".into()],
            started: 1,
            version: "0".into(),
            owned_channels: n.len() as u64,
        };
        assert!(a.members().await.unwrap().is_empty());
        b.heartbeat(&member("b")).await.unwrap();
        a.heartbeat(&member("a")).await.unwrap();
        a.heartbeat(&member("a")).await.unwrap();
        assert_eq!(b.members().await.unwrap(), [member("a"), member("b")]);
        b.leave("b").await.unwrap();
        assert_eq!(a.members().await.unwrap(), [member("a")]);
        let t = Instant::now();
        while !a.members().await.unwrap().is_empty() {
            assert!(t.elapsed() < MEMBER_MAX_AGE * 3, "a's entry never expired");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!("a heartbeat expired after {:?}", t.elapsed());
    }

    /// Channel leases: one node at a time holds a key's lease (create-if-absent), its
    /// holder renews it, another node is told the holder; a release frees it for the
    /// other; a lease not renewed lapses within `CHANNEL_LEASE_MAX_AGE` and the next claim
    /// takes it. Other nodes' channel records come through `watch_channels`, ours do not.
    #[tokio::test]
    async fn nats_channel_leases_are_held_by_one_node_at_a_time() {
        use connectord_store::nats::{CHANNEL_LEASE_MAX_AGE, Lease};
        let server = NatsServer::start().unwrap();
        let a = connect(&server, "a").await;
        let b = connect(&server, "b").await;
        let key = "key *.> 1";
        assert_eq!(a.channel_owner(key).await.unwrap(), None);
        // Both at once: exactly one takes it.
        let (ra, rb) = tokio::join!(a.claim_channel(key), b.claim_channel(key));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        let winner = match (&ra, &rb) {
            (Lease::Ours { fresh: true }, Lease::Theirs(n)) if n == "a" => "a",
            (Lease::Theirs(n), Lease::Ours { fresh: true }) if n == "b" => "b",
            other => panic!("not one owner: {other:?}"),
        };
        let (owner, other) = if winner == "a" { (&a, &b) } else { (&b, &a) };
        assert_eq!(
            owner.claim_channel(key).await.unwrap(),
            Lease::Ours { fresh: false }
        );
        assert_eq!(
            other.claim_channel(key).await.unwrap(),
            Lease::Theirs(winner.into())
        );
        assert_eq!(
            other.channel_owner(key).await.unwrap().as_deref(),
            Some(winner)
        );
        // A release by the non-holder changes nothing; the holder's frees it.
        other.release_channel(key).await.unwrap();
        assert_eq!(
            owner.channel_owner(key).await.unwrap().as_deref(),
            Some(winner)
        );
        owner.release_channel(key).await.unwrap();
        assert_eq!(other.channel_owner(key).await.unwrap(), None);
        assert_eq!(
            other.claim_channel(key).await.unwrap(),
            Lease::Ours { fresh: true }
        );
        // Not renewed: it lapses, and the next claim takes it.
        let t = Instant::now();
        loop {
            match owner.claim_channel(key).await.unwrap() {
                Lease::Ours { fresh } => {
                    assert!(fresh, "taken as a fresh lease");
                    break;
                }
                Lease::Theirs(_) => {}
            }
            assert!(
                t.elapsed() < CHANNEL_LEASE_MAX_AGE * 3,
                "the lease never lapsed"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!(
            "an unrenewed channel lease was taken after {:?}",
            t.elapsed()
        );
        // Channel records: b sees a's write, a does not see its own.
        let mut seen_by_b = b.watch_channels();
        let mut seen_by_a = a.watch_channels();
        let rec = ChannelRecord {
            key_id: key.into(),
            domain: "d".into(),
            callback: None,
            allow: None,
            websocket: false,
        };
        a.put_channel(rec.clone()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), seen_by_b.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, ChannelChange::Put(rec));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            seen_by_a.try_recv().is_err(),
            "a node's own write came back"
        );
        // A removal (idle, issue 23) reaches the other node as one.
        a.delete_channel(key.into()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), seen_by_b.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, ChannelChange::Removed(key.into()));
        assert!(b.load_channels().await.unwrap().is_empty());
    }

    /// The fence of a lapsed owner's appends: a node whose channel lease lapsed (paused)
    /// while another node took the channel over stores none of the key's events any more
    /// (they would sit behind the new owner's load, numbered below its events, and a purge
    /// through them would take the new owner's undelivered events). Before, the stale
    /// append was acknowledged, and its purge removed the new owner's acknowledged event.
    #[tokio::test]
    async fn a_node_whose_channel_lease_lapsed_stores_no_more_of_its_events() {
        use connectord_store::nats::{CHANNEL_LEASE_MAX_AGE, Lease};
        let server = NatsServer::start().unwrap();
        let a = connect(&server, "a").await;
        let b = connect(&server, "b").await;
        assert_eq!(
            a.claim_channel("k").await.unwrap(),
            Lease::Ours { fresh: true }
        );
        let e1 = append(&a, vec![new("k", 1)], None).await;
        // a stops renewing (paused): b takes the channel over once the lease lapsed.
        let t = Instant::now();
        while b.claim_channel("k").await.unwrap() != (Lease::Ours { fresh: true }) {
            assert!(t.elapsed() < CHANNEL_LEASE_MAX_AGE * 3, "never lapsed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            b.load_events_of("k".into()).await.unwrap(),
            vec![event("k", 1, e1[0])]
        );
        let e2 = append(&b, vec![new("k", 2)], None).await;

        // a resumes, still taking itself for the owner.
        // The keys a write's refusal names as lost.
        async fn lost_keys(durable: connectord_store::Pending<()>) -> Vec<String> {
            match durable.await {
                Err(connectord_store::StoreError::LeaseLost(keys)) => keys,
                other => panic!("not refused for a lost lease: {other:?}"),
            }
        }
        let stale = a.append_events(vec![new("k", 3)], None);
        assert_eq!(lost_keys(stale.durable).await, ["k"]);
        // Its next one is not written at all; another key's in the same write is stored.
        let again = a.append_events(vec![new("k", 4), new("other", 4)], None);
        assert_eq!(lost_keys(again.durable).await, ["k"]);
        assert_eq!(
            a.load_events_of("other".into()).await.unwrap(),
            vec![event("other", 4, again.seqs[1])]
        );
        // A purge through what a had does not reach b's event.
        a.delete_events_through("k".into(), stale.seqs[0])
            .await
            .unwrap();
        assert_eq!(
            b.load_events_of("k".into()).await.unwrap(),
            vec![event("k", 2, e2[0])],
            "b's undelivered event, and nothing of a's after the take-over"
        );
        // a learns of the holder; the lease back with a (b releases), it appends again.
        assert_eq!(
            a.claim_channel("k").await.unwrap(),
            Lease::Theirs("b".into())
        );
        b.release_channel("k").await.unwrap();
        assert_eq!(
            a.claim_channel("k").await.unwrap(),
            Lease::Ours { fresh: true }
        );
        a.load_events_of("k".into()).await.unwrap();
        append(&a, vec![new("k", 5)], None).await;
        // b, having released it, stores none.
        assert_eq!(
            lost_keys(b.append_events(vec![new("k", 6)], None).durable).await,
            ["k"]
        );
        let left: Vec<u64> = a
            .load_events_of("k".into())
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event.created_ms)
            .collect();
        assert_eq!(left, [2, 5]);
    }

    #[tokio::test]
    async fn nats_backend_keeps_device_credentials_across_a_reconnect() {
        let server = NatsServer::start().unwrap();
        {
            let s = connect(&server, "a").await;
            credentials_written_and_loaded(&s).await;
        }
        let s = connect(&server, "a").await;
        assert_eq!(s.load_psks().await.unwrap().len(), 2);
        assert_eq!(s.load_certificates().await.unwrap().len(), 4);
    }

    #[tokio::test]
    async fn nats_backend_loads_one_keys_events() {
        let server = NatsServer::start().unwrap();
        events_of_one_key(&connect(&server, "a").await).await;
    }

    #[tokio::test]
    async fn nats_backend_removes_a_channel_with_its_events() {
        let server = NatsServer::start().unwrap();
        a_removed_channel_takes_its_events(&connect(&server, "a").await).await;
    }

    /// Names a subject or KV key could not hold (dots, wildcards, spaces, the empty
    /// string) are stored and read back as given.
    #[tokio::test]
    async fn nats_backend_stores_names_that_are_no_subject_tokens() {
        let server = NatsServer::start().unwrap();
        let s = connect(&server, "a").await;
        let odd = ["", "a.b", "*", ">", "with space", "é/ü"];
        for (i, name) in odd.iter().enumerate() {
            s.put_registration(reg(&i.to_string(), name, name))
                .await
                .unwrap();
            s.plugin_state_put("p.*".into(), format!("{name}/k"), vec![i as u8])
                .await
                .unwrap();
            s.put_subscription(sub(name, name, name)).await.unwrap();
        }
        let mut names: Vec<_> = s
            .load_registrations()
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.domain, r.name))
            .collect();
        names.sort();
        let mut want: Vec<_> = odd.iter().map(|n| (n.to_string(), n.to_string())).collect();
        want.sort();
        assert_eq!(names, want);
        assert_eq!(
            s.plugin_state_keys("p.*".into(), "a.".into())
                .await
                .unwrap(),
            ["a.b/k"]
        );
        assert_eq!(
            s.plugin_state_get("p.*".into(), "*/k".into())
                .await
                .unwrap(),
            Some(vec![2])
        );
        s.delete_subscriptions("*".into(), None, None)
            .await
            .unwrap();
        assert_eq!(s.load_subscriptions().await.unwrap().len(), odd.len() - 1);
    }

    /// Calls between nodes: `b` serves its calls, `a` calls one and gets its answer; a
    /// call to a node nobody serves fails at once as `NoNode`, one that is never answered
    /// as `Timeout`; names that are no subject tokens still reach the right node.
    #[tokio::test]
    async fn a_node_calls_another_and_gets_its_answer() {
        use connectord_store::nats::CallError;
        let server = NatsServer::start().unwrap();
        let a = connect(&server, "a").await;
        let b = connect(&server, "node b.*>").await;
        let mut calls = b.serve_calls().await.unwrap();
        let served = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(call) = calls.next().await {
                seen.push((call.op.clone(), call.from.clone()));
                if call.op == "silent" {
                    continue;
                }
                let mut answer = call.body.to_vec();
                answer.reverse();
                call.answer(answer.into()).await.unwrap();
                if seen.len() == 3 {
                    return seen;
                }
            }
            seen
        });
        // Generous: a loaded 2-core machine can take a second or two to answer.
        let t = Duration::from_secs(10);
        let got = a
            .call_node("node b.*>", "echo", bytes::Bytes::from_static(b"abc"), t)
            .await
            .unwrap();
        assert_eq!(&got[..], b"cba");
        let started = Instant::now();
        let gone = a
            .call_node("nobody", "echo", bytes::Bytes::new(), t)
            .await
            .unwrap_err();
        assert_eq!(gone, CallError::NoNode("nobody".into()));
        assert!(started.elapsed() < t, "no responders is answered at once");
        let silent = a
            .call_node(
                "node b.*>",
                "silent",
                bytes::Bytes::new(),
                Duration::from_millis(300),
            )
            .await
            .unwrap_err();
        assert!(matches!(silent, CallError::Timeout { .. }), "{silent:?}");
        let got = a
            .call_node("node b.*>", "echo", bytes::Bytes::from_static(b"xy"), t)
            .await
            .unwrap();
        assert_eq!(&got[..], b"yx");
        let seen = served.await.unwrap();
        assert_eq!(
            seen,
            vec![
                ("echo".to_string(), Some("a".to_string())),
                ("silent".to_string(), Some("a".to_string())),
                ("echo".to_string(), Some("a".to_string())),
            ]
        );
    }

    /// A node that has lost its NATS server fails a call at once, naming itself, rather
    /// than waiting out the timeout and blaming the node it called (found by an outside
    /// review; the call also stayed in the client's buffer, to be sent on reconnection).
    #[tokio::test]
    async fn a_call_from_a_node_without_its_server_fails_at_once_naming_it() {
        use connectord_store::nats::CallError;
        let mut server = NatsServer::start().unwrap();
        let a = connect(&server, "a").await;
        server.kill();
        // The client notices the lost connection within moments.
        let t = Instant::now();
        let e = loop {
            let started = Instant::now();
            let e = a
                .call_node("b", "op", bytes::Bytes::new(), Duration::from_secs(5))
                .await
                .unwrap_err();
            if matches!(e, CallError::Unavailable { .. }) {
                assert!(started.elapsed() < Duration::from_secs(1), "at once");
                break e;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "never noticed: {e:?}"
            );
        };
        assert!(
            e.to_string().contains("this node (a) is not connected"),
            "{e}"
        );
    }

    /// A call that reaches its node after its caller stopped waiting is dropped unread:
    /// here `b` takes its calls only after `a`'s first one timed out. Before, it was
    /// handled: NATS buffers a publish while a client is disconnected, and a forwarded
    /// request answered 503 was carried out on the device 30–40 s later (an outside
    /// review).
    #[tokio::test]
    async fn a_call_whose_caller_stopped_waiting_is_not_handled() {
        use connectord_store::nats::CallError;
        let server = NatsServer::start().unwrap();
        let a = connect(&server, "a").await;
        let b = connect(&server, "b").await;
        let mut calls = b.serve_calls().await.unwrap();
        let late = a
            .call_node("b", "late", bytes::Bytes::new(), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(late, CallError::Timeout { .. }), "{late:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let served = tokio::spawn(async move {
            let call = calls.next().await.unwrap();
            let op = call.op.clone();
            call.answer(bytes::Bytes::from_static(b"ok")).await.unwrap();
            op
        });
        let got = a
            .call_node("b", "in_time", bytes::Bytes::new(), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(&got[..], b"ok");
        assert_eq!(
            served.await.unwrap(),
            "in_time",
            "the late call was handled"
        );
    }

    /// The subscriptions watch (issue 22): `b` gets `a`'s subscription puts and deletes and
    /// its pre-subscription replacement, the replacement after the deletes it made (also
    /// of subscriptions with names that are no subject tokens); none of `b`'s own writes.
    #[tokio::test]
    async fn a_node_follows_another_nodes_subscriptions_and_presubscriptions() {
        use connectord_store::SubscriptionChange as C;
        use connectord_store::nats::Followed;
        let server = NatsServer::start().unwrap();
        let a = connect(&server, "a").await;
        let b = connect(&server, "b").await;
        let mut watch = b.watch_subscriptions().await.unwrap();
        let next =
            async |w: &mut connectord_store::nats::SubscriptionWatch| match tokio::time::timeout(
                Duration::from_secs(5),
                w.next(),
            )
            .await
            {
                Ok(Some(Followed::Change(c))) => c,
                other => panic!("{other:?}"),
            };
        b.put_subscription(sub("own", "e1", "/1")).await.unwrap();
        a.put_subscription(sub("k", "e.1 *>", "/3/0/1"))
            .await
            .unwrap();
        a.put_subscription(sub("k", "e2", "/3/0/1")).await.unwrap();
        assert_eq!(next(&mut watch).await, C::Put(sub("k", "e.1 *>", "/3/0/1")));
        assert_eq!(next(&mut watch).await, C::Put(sub("k", "e2", "/3/0/1")));
        a.delete_subscriptions("k".into(), Some("e2".into()), None)
            .await
            .unwrap();
        assert_eq!(
            next(&mut watch).await,
            C::Deleted {
                key_id: "k".into(),
                ep: "e2".into(),
                path: "/3/0/1".into()
            }
        );
        let rules = PresubRecord {
            key_id: "k".into(),
            domain: "d".into(),
            rules: vec![PreSub {
                endpoint_name: Some("e*".into()),
                endpoint_type: None,
                resource_path: None,
            }],
        };
        a.replace_presubscriptions(rules.clone()).await.unwrap();
        assert_eq!(
            next(&mut watch).await,
            C::Deleted {
                key_id: "k".into(),
                ep: "e.1 *>".into(),
                path: "/3/0/1".into()
            },
            "the deletes first"
        );
        assert_eq!(next(&mut watch).await, C::Presubscriptions(rules));
        b.delete_subscriptions("own".into(), None, None)
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), watch.next())
                .await
                .is_err(),
            "b's own writes are not reported"
        );
    }

    /// Two nodes on one server: each sees the other's writes (a key created on one works
    /// on the other), the plugin-state feed moves for the other's writes only, and the
    /// registration watch reports the other's puts and deletes.
    #[tokio::test]
    async fn two_nodes_share_the_state_and_see_each_others_writes() {
        let server = NatsServer::start().unwrap();
        let a = connect(&server, "a").await;
        let b = connect(&server, "b").await;
        let mut b_changes = b.external_changes().unwrap();
        let mut b_regs = b.watch_registrations();
        let mut a_regs = a.watch_registrations();

        b.plugin_state_put("auth".into(), "own".into(), vec![0])
            .await
            .unwrap();
        a.plugin_state_put("auth".into(), "key1".into(), vec![1])
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), b_changes.changed())
            .await
            .expect("b sees a's plugin-state write")
            .unwrap();
        // Only a's write moved it (b's own came first and did not).
        assert_eq!(*b_changes.borrow_and_update(), 1);
        assert_eq!(
            b.plugin_state_get("auth".into(), "key1".into())
                .await
                .unwrap(),
            Some(vec![1])
        );

        a.put_registration(reg("r1", "d", "ep")).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), b_regs.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, RegistrationChange::Put(Box::new(reg("r1", "d", "ep"))));
        // The endpoint re-registers on b: one registration of (d, ep) remains, and a's
        // later delete of its old id does not remove b's.
        b.put_registration(reg("r2", "d", "ep")).await.unwrap();
        a.delete_registration("r1".into()).await.unwrap();
        // a learns of r2 through its watch; give it the time to.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let regs = a.load_registrations().await.unwrap();
            assert_eq!(regs.len(), 1, "{regs:?}");
            if regs[0].id == "r2" {
                break;
            }
            assert!(Instant::now() < deadline, "{regs:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        b.delete_registration("r2".into()).await.unwrap();
        b.put_registration(reg("r3", "d", "other")).await.unwrap();
        b.delete_registration("r3".into()).await.unwrap();
        // a's watch told of b's writes only, in order (a's delete of r1 found r2 there
        // and wrote nothing).
        let mut seen = Vec::new();
        while seen.len() < 4 {
            let got = tokio::time::timeout(Duration::from_secs(5), a_regs.recv())
                .await
                .expect("a's watch tells of b's writes")
                .unwrap();
            seen.push(got);
        }
        let deleted = |name: &str| RegistrationChange::Deleted {
            domain: "d".into(),
            name: name.into(),
        };
        assert_eq!(
            seen,
            [
                RegistrationChange::Put(Box::new(reg("r2", "d", "ep"))),
                deleted("ep"),
                RegistrationChange::Put(Box::new(reg("r3", "d", "other"))),
                deleted("other"),
            ]
        );
        assert!(a.load_registrations().await.unwrap().is_empty());
    }

    /// Issue 22, limits cluster-wide: each node stores its own hourly counts; a node loads
    /// its own back, and follows the others' through `watch_hour_counts` (a snapshot first,
    /// then each change, a removed hour as 0); the cluster's sum adds them up.
    #[tokio::test]
    async fn two_nodes_keep_their_own_hourly_counts_and_see_each_others() {
        use connectord_store::nats::NodeHourCount;
        let server = NatsServer::start().unwrap();
        let a = connect(&server, "a").await;
        let b = connect(&server, "b").await;
        let hc = |d: &str, hour, count| HourCount {
            domain: d.into(),
            hour,
            count,
        };
        a.save_hour_counts(vec![hc("d", 100, 3), hc("e", 100, 1)], 90)
            .await
            .unwrap();
        b.save_hour_counts(vec![hc("d", 100, 4)], 90).await.unwrap();
        // Saved again: replaced, not added (each node writes its running count).
        b.save_hour_counts(vec![hc("d", 100, 5), hc("d", 99, 2)], 90)
            .await
            .unwrap();
        let sorted = |mut v: Vec<HourCount>| {
            v.sort_by(|x, y| (&x.domain, x.hour).cmp(&(&y.domain, y.hour)));
            v.into_iter()
                .map(|c| (c.domain, c.hour, c.count))
                .collect::<Vec<_>>()
        };
        let own = |v: &[(&str, u64, u64)]| {
            v.iter()
                .map(|(d, h, c)| (d.to_string(), *h, *c))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            sorted(a.load_hour_counts().await.unwrap()),
            own(&[("d", 100, 3), ("e", 100, 1)]),
            "a loads its own counts only"
        );
        assert_eq!(
            sorted(b.load_hour_counts().await.unwrap()),
            own(&[("d", 99, 2), ("d", 100, 5)])
        );
        assert_eq!(
            sorted(a.load_cluster_hour_counts().await.unwrap()),
            own(&[("d", 99, 2), ("d", 100, 8), ("e", 100, 1)]),
            "the cluster's counts are the nodes' summed"
        );
        // a's watch: b's current counts (the watch may still be catching up: bounded).
        let nhc = |node: &str, d: &str, hour, count| NodeHourCount {
            node: node.into(),
            domain: d.into(),
            hour,
            count,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut rx, snapshot) = loop {
            let (mut now, rx) = a.watch_hour_counts();
            now.sort_by(|x, y| (&x.domain, x.hour).cmp(&(&y.domain, y.hour)));
            if now.len() == 2 && now[1].count == 5 {
                break (rx, now);
            }
            assert!(Instant::now() < deadline, "a never saw b's counts: {now:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(snapshot, [nhc("b", "d", 99, 2), nhc("b", "d", 100, 5)]);
        assert!(
            b.watch_hour_counts().0.iter().all(|c| c.node == "a"),
            "b's watch holds a's counts, never its own"
        );
        // b counts on, then prunes hour 99 away: a hears both, in order.
        b.save_hour_counts(vec![hc("d", 100, 6)], 100)
            .await
            .unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let c = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("a's watch tells of b's save")
                .unwrap();
            seen.push(c);
        }
        seen.sort_by_key(|c| c.hour);
        assert_eq!(seen, [nhc("b", "d", 99, 0), nhc("b", "d", 100, 6)]);
        // b's prune removed every node's old hours: a has none before hour 100 either.
        assert_eq!(
            sorted(a.load_cluster_hour_counts().await.unwrap()),
            own(&[("d", 100, 9), ("e", 100, 1)])
        );
    }

    /// Issue 22, credentials followed by every node: `credential_changes` moves when
    /// another node writes a PSK, a certificate or a revocation, never for the node's own
    /// writes; what moved it is in the store for the other node to load.
    #[tokio::test]
    async fn a_node_hears_of_another_nodes_credential_changes_only() {
        let server = NatsServer::start().unwrap();
        let a = connect(&server, "a").await;
        let b = connect(&server, "b").await;
        let mut b_changes = b.credential_changes();
        let mut a_changes = a.credential_changes();
        let moved = async |rx: &mut tokio::sync::watch::Receiver<u64>| {
            tokio::time::timeout(Duration::from_secs(5), rx.changed())
                .await
                .is_ok()
        };
        b.put_psk(psk("d", "own", "id-own", &[1; 16]))
            .await
            .unwrap();
        assert!(moved(&mut a_changes).await, "a hears of b's PSK");
        // (A PSK is two KV writes: the endpoint's record and its identity's.)
        tokio::time::sleep(Duration::from_millis(200)).await;
        a_changes.borrow_and_update();
        a.put_psk(psk("d", "ep", "id-1", &[2; 16])).await.unwrap();
        assert!(moved(&mut b_changes).await, "b hears of a's PSK");
        assert!(
            b.load_psks()
                .await
                .unwrap()
                .iter()
                .any(|p| p.identity == "id-1")
        );
        b_changes.borrow_and_update();
        a.put_certificate(cert("0a", "d", "ep")).await.unwrap();
        assert!(moved(&mut b_changes).await, "b hears of a's certificate");
        b_changes.borrow_and_update();
        a.revoke_device("d".into(), "ep".into(), 9).await.unwrap();
        assert!(moved(&mut b_changes).await, "b hears of a's revocation");
        let certs = b.load_certificates().await.unwrap();
        assert_eq!(certs[0].revoked_ms, Some(9));
        // a's own three writes moved nothing on a.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !a_changes.has_changed().unwrap(),
            "its own writes move nothing"
        );
    }

    /// A key's channel moving to a node that connected before the key's last owner: the
    /// new owner, once it loaded the key's events, numbers them above the old owner's,
    /// also when the old owner had deleted them all.
    #[tokio::test]
    async fn a_keys_new_owner_numbers_its_events_above_the_old_owners() {
        let server = NatsServer::start().unwrap();
        let early = connect(&server, "early").await;
        let late = connect(&server, "late").await;
        assert!(late.event_epoch() > early.event_epoch());
        let by_late = append(&late, vec![new("k", 1), new("k", 2)], None).await;
        let loaded = early.load_events_of("k".into()).await.unwrap();
        assert_eq!(loaded.len(), 2);
        let by_early = append(&early, vec![new("k", 3)], None).await;
        assert!(by_early[0] > by_late[1], "{by_early:?} {by_late:?}");
        // Back to `late`, which deletes them all; then to `early` again.
        late.load_events_of("k".into()).await.unwrap();
        let again = append(&late, vec![new("k", 4)], None).await;
        assert!(again[0] > by_early[0]);
        late.delete_events_through("k".into(), again[0])
            .await
            .unwrap();
        assert!(early.load_events_of("k".into()).await.unwrap().is_empty());
        let last = append(&early, vec![new("k", 5)], None).await;
        assert!(last[0] > again[0], "{last:?} {again:?}");
        // Deleting through a number known only from the stream (appended by the other).
        early
            .delete_events_through("k".into(), last[0])
            .await
            .unwrap();
        let more = append(&late, vec![new("k", 6)], None).await;
        late.load_events_of("k".into()).await.unwrap();
        assert_eq!(early.load_events().await.unwrap().len(), 1);
        early
            .delete_events_through("k".into(), more[0])
            .await
            .unwrap();
        assert!(late.load_events().await.unwrap().is_empty());
    }

    /// Writes submitted without waiting in between apply in submission order, a deletion
    /// of a registration whose put is not acknowledged yet included; removing an absent
    /// request is no error.
    #[tokio::test]
    async fn writes_submitted_together_apply_in_submission_order() {
        let server = NatsServer::start().unwrap();
        let s = connect(&server, "a").await;
        let put = s.put_registration(reg("1", "d", "a"));
        let delete = s.delete_registration("1".into());
        let put2 = s.put_registration(reg("2", "d", "b"));
        let delete2 = s.delete_registration("2".into());
        let again = s.put_registration(reg("2", "d", "b"));
        let loaded = s.load_registrations();
        for p in [put, delete, put2, delete2, again] {
            p.await.unwrap();
        }
        let ids: Vec<_> = loaded.await.unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["2"]);
        let row = s.put_request(&job("x")).await.unwrap();
        s.delete_request(row).await.unwrap();
        s.delete_request(row).await.unwrap();
        s.delete_request(row + 100).await.unwrap();
        assert!(s.load_requests().await.unwrap().is_empty());
        // Many at once: every one acknowledged, in order, one number each.
        let pending: Vec<_> = (0..500)
            .map(|i| s.put_request(&job(&i.to_string())))
            .collect();
        let mut rows = Vec::new();
        for p in pending {
            rows.push(p.await.unwrap());
        }
        assert!(rows.windows(2).all(|w| w[0] < w[1]));
        let jobs = s.load_requests().await.unwrap();
        assert_eq!(jobs.len(), 500);
        assert!(jobs.iter().zip(&rows).all(|(j, r)| j.row == *r));
        assert_eq!(jobs[499].id, "499");
    }

    /// Two fleets on one server, told apart by their prefixes.
    #[tokio::test]
    async fn two_prefixes_on_one_server_are_two_fleets() {
        let server = NatsServer::start().unwrap();
        let a = connect(&server, "a").await;
        let mut other = config(vec![server.url()], "a");
        other.prefix = "fleet2".into();
        let b = NatsStore::connect(other).await.unwrap();
        a.put_registration(reg("1", "d", "ep")).await.unwrap();
        a.put_request(&job("x")).await.unwrap();
        assert!(b.load_registrations().await.unwrap().is_empty());
        assert!(b.load_requests().await.unwrap().is_empty());
        assert_eq!(a.load_requests().await.unwrap().len(), 1);
    }

    /// Writes while the only server is down fail as unavailable within the timeout (not
    /// hang), the store says it is failing, and it works again once the server is back.
    #[tokio::test]
    async fn a_write_while_the_server_is_down_fails_as_unavailable_in_bounded_time() {
        let mut server = NatsServer::start().unwrap();
        let s = connect(&server, "a").await;
        s.put_registration(reg("1", "d", "a")).await.unwrap();
        server.kill();
        let started = Instant::now();
        let e = s.put_registration(reg("2", "d", "b")).await.unwrap_err();
        let took = started.elapsed();
        assert!(e.is_unavailable(), "{e}");
        // The timeout is 2 s: one send and one acknowledgement wait at most.
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert!(s.health().failing.is_some());
        // Once the client knows the server is gone, writes fail at once: not after the
        // timeout (2 s) in the client's buffer, nor one timeout after the other.
        let started = Instant::now();
        let queued: Vec<_> = (0..200)
            .map(|i| s.put_registration(reg(&format!("q{i}"), "d", &format!("q{i}"))))
            .collect();
        for p in queued {
            assert!(p.await.unwrap_err().is_unavailable());
        }
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "{took:?}");
        let e = s.load_registrations().await.unwrap_err();
        assert!(e.is_unavailable(), "{e}");

        // Nothing answers on a fresh connect either.
        let e = NatsStore::connect(config(vec![server.url()], "b"))
            .await
            .err()
            .expect("no server");
        assert!(e.is_unavailable(), "{e}");

        server.restart().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while s.put_registration(reg("3", "d", "c")).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "no write succeeded after the restart"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(s.health().failing, None);
        let mut ids: Vec<_> = s
            .load_registrations()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        ids.sort();
        assert!(
            ids.contains(&"1".to_string()) && ids.contains(&"3".to_string()),
            "{ids:?}"
        );
    }

    /// Three servers, every bucket and stream with three replicas: one server killed
    /// (SIGKILL), writes and loads go on through the others and nothing acknowledged is
    /// lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_r3_cluster_loses_nothing_acknowledged_when_a_server_is_killed() {
        let mut cluster = NatsCluster::start().unwrap();
        let mut cfg = config(cluster.urls(), "a");
        cfg.replicas = 3;
        cfg.timeout = Duration::from_secs(5);
        let s = NatsStore::connect(cfg).await.unwrap();
        let mut acked = Vec::new();
        for i in 0..50 {
            s.put_registration(reg(&i.to_string(), "d", &format!("ep{i}")))
                .await
                .unwrap();
            acked.push(i.to_string());
        }
        let seqs = append(&s, vec![new("k", 1), new("k", 2)], None).await;
        let row = s.put_request(&job("r")).await.unwrap();

        // Kill the server this client is connected to, or any: the first.
        cluster.servers[0].kill();
        let killed = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut i = 50;
        let mut after = 0;
        while after < 20 {
            assert!(Instant::now() < deadline, "writes did not resume");
            let r = s
                .put_registration(reg(&i.to_string(), "d", &format!("ep{i}")))
                .await;
            match r {
                Ok(()) => {
                    acked.push(i.to_string());
                    after += 1;
                }
                Err(e) => {
                    assert!(e.is_unavailable(), "{e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            i += 1;
        }
        // A read makes a consumer, which needs the meta leader: for a few seconds after
        // a server is lost, it may answer unavailable.
        eprintln!("writes resumed {:?} after the kill", killed.elapsed());
        // The read-modify-write writes and the plugin keys read each message from the
        // stream's leader, not through a consumer: no wait for a meta leader.
        // Each bucket is a stream with its own leader: one whose leader was on the killed
        // server answers unavailable until it has a new one.
        eventually(|| s.put_subscription(sub("k", "e1", "/1"))).await;
        eventually(|| s.put_subscription(sub("k", "e2", "/1"))).await;
        eventually(|| s.delete_subscriptions("k".into(), Some("e1".into()), None)).await;
        eventually(|| s.plugin_state_put("p".into(), "a/1".into(), vec![1])).await;
        assert_eq!(
            eventually(|| s.plugin_state_keys("p".into(), "a/".into())).await,
            ["a/1"]
        );
        eprintln!("listings answered {:?} after the kill", killed.elapsed());
        let mut ids: Vec<_> = eventually(|| s.load_registrations())
            .await
            .into_iter()
            .map(|r| r.id)
            .collect();
        eprintln!("reads resumed {:?} after the kill", killed.elapsed());
        ids.sort();
        acked.sort();
        // Every acknowledged write is there; one that failed may or may not be.
        for id in &acked {
            assert!(ids.contains(id), "lost {id}");
        }
        assert_eq!(
            eventually(|| s.load_events()).await,
            vec![event("k", 1, seqs[0]), event("k", 2, seqs[1])]
        );
        assert_eq!(eventually(|| s.load_requests()).await[0].row, row);
        assert_eq!(
            eventually(|| s.load_subscriptions()).await,
            vec![sub("k", "e2", "/1")]
        );
        // Another node connecting to the two left sees the same.
        let mut cfg = config(cluster.urls()[1..].to_vec(), "b");
        cfg.replicas = 3;
        cfg.timeout = Duration::from_secs(5);
        let deadline = Instant::now() + Duration::from_secs(30);
        let b = loop {
            match NatsStore::connect(cfg.clone()).await {
                Ok(b) => break b,
                Err(e) => {
                    eprintln!("connect {:?} after the kill: {e}", killed.elapsed());
                    if std::env::var_os("NATS_TEST_LOGS").is_some() {
                        for srv in &cluster.servers[1..] {
                            eprintln!("---- {}\n{}", srv.url(), srv.log());
                        }
                    }
                    assert!(e.is_unavailable(), "{e}");
                    assert!(Instant::now() < deadline, "cannot connect: {e}");
                }
            }
        };
        eprintln!(
            "another node connected {:?} after the kill",
            killed.elapsed()
        );
        assert_eq!(eventually(|| b.load_registrations()).await.len(), ids.len());
    }

    /// Issue 22, watches survive a server's death: three servers, R3, two nodes. The
    /// server leading the registrations bucket is killed; the writes the other node makes
    /// afterwards still reach this node's registrations, plugin-state, credential,
    /// channels and subscriptions watches (each within 60 s, the time printed), and loads made afterwards, on this
    /// node and on a node connecting to the two servers left, see every registration.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watches_and_loads_go_on_after_the_watched_buckets_leader_dies() {
        let t0 = Instant::now();
        let mut cluster = NatsCluster::start().unwrap();
        let cfg = |urls: Vec<String>, node: &str| {
            let mut c = config(urls, node);
            c.replicas = 3;
            c.timeout = Duration::from_secs(5);
            c
        };
        let a = NatsStore::connect(cfg(cluster.urls(), "a")).await.unwrap();
        let b = NatsStore::connect(cfg(cluster.urls(), "b")).await.unwrap();
        let mut a_regs = a.watch_registrations();
        let mut a_plugin = a.external_changes().unwrap();
        let mut a_creds = a.credential_changes();
        let mut a_channels = a.watch_channels();
        let mut a_subs = a.watch_subscriptions().await.unwrap();
        let mut written = vec!["r0".to_string()];
        b.put_registration(reg("r0", "d", "ep0")).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), a_regs.recv())
            .await
            .expect("a's watch tells of b's write before the kill")
            .unwrap();
        assert_eq!(
            got,
            RegistrationChange::Put(Box::new(reg("r0", "d", "ep0")))
        );

        let leader = cluster
            .stream_leader("KV_cd_registrations")
            .expect("a leader of the registrations bucket");
        cluster.servers[leader].kill();
        let killed = Instant::now();
        eprintln!(
            "killed {} (leading KV_cd_registrations) {:?} after the start",
            cluster.servers[leader].name(),
            t0.elapsed()
        );
        for i in 1..=10 {
            let id = format!("r{i}");
            eventually(|| b.put_registration(reg(&id, "d", &format!("ep{i}")))).await;
            written.push(id);
        }
        eprintln!(
            "b wrote 10 registrations {:?} after the kill",
            killed.elapsed()
        );
        eventually(|| b.plugin_state_put("p".into(), "k".into(), vec![1])).await;
        eventually(|| b.put_psk(psk("d", "ep1", "id1", b"k1"))).await;
        let channel = ChannelRecord {
            key_id: "k".into(),
            domain: "d".into(),
            callback: None,
            allow: None,
            websocket: false,
        };
        eventually(|| b.put_channel(channel.clone())).await;
        eventually(|| b.put_subscription(sub("k", "ep1", "/3/0/0"))).await;
        eprintln!(
            "b wrote plugin state, a PSK, a channel and a subscription {:?} after the kill",
            killed.elapsed()
        );

        // a's registrations watch tells of each (a put of r0 may come again: no).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        while seen.len() < 10 {
            let got = tokio::time::timeout_at(deadline, a_regs.recv())
                .await
                .unwrap_or_else(|_| panic!("a's watch told of {seen:?} only, 60 s after the kill"))
                .unwrap();
            match got {
                RegistrationChange::Put(r) => seen.push(r.id),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seen, written[1..]);
        eprintln!(
            "a's registrations watch told of all 10 {:?} after the kill",
            killed.elapsed()
        );
        tokio::time::timeout_at(deadline, a_plugin.changed())
            .await
            .expect("a's plugin-state watch tells of b's write")
            .unwrap();
        tokio::time::timeout_at(deadline, a_creds.changed())
            .await
            .expect("a's credentials watch tells of b's PSK")
            .unwrap();
        let got = tokio::time::timeout_at(deadline, a_channels.recv())
            .await
            .expect("a's channels watch tells of b's channel")
            .unwrap();
        assert_eq!(got, ChannelChange::Put(channel));
        let got = tokio::time::timeout_at(deadline, a_subs.next())
            .await
            .expect("a's subscriptions watch tells of b's subscription");
        assert_eq!(
            got,
            Some(connectord_store::nats::Followed::Change(
                connectord_store::SubscriptionChange::Put(sub("k", "ep1", "/3/0/0"))
            ))
        );
        eprintln!(
            "a's plugin-state, credential, channels and subscriptions watches moved {:?} after the kill",
            killed.elapsed()
        );

        // Loads after the kill see everything, on a and on a node connecting now.
        let ids = |regs: Vec<connectord_model::Registration>| {
            let mut ids: Vec<String> = regs.into_iter().map(|r| r.id).collect();
            ids.sort();
            ids
        };
        written.sort();
        assert_eq!(ids(eventually(|| a.load_registrations()).await), written);
        let urls: Vec<String> = (0..3)
            .filter(|&i| i != leader)
            .map(|i| cluster.servers[i].url())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        let c = loop {
            match NatsStore::connect(cfg(urls.clone(), "c")).await {
                Ok(c) => break c,
                Err(e) => {
                    assert!(e.is_unavailable(), "{e}");
                    assert!(Instant::now() < deadline, "cannot connect: {e}");
                }
            }
        };
        assert_eq!(ids(eventually(|| c.load_registrations()).await), written);
        eprintln!(
            "loads on a and on a new node c saw all 11 {:?} after the kill; the test took {:?}",
            killed.elapsed(),
            t0.elapsed()
        );
    }

    /// The read's answer once it succeeds, within 30 s; failures meanwhile must be
    /// "unavailable".
    async fn eventually<T>(read: impl Fn() -> connectord_store::Pending<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match read().await {
                Ok(v) => return v,
                Err(e) => {
                    assert!(e.is_unavailable(), "{e}");
                    assert!(Instant::now() < deadline, "still failing: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}
