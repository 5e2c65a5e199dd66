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
    s.put_registration(reg("4", "d", "a")).await.unwrap();
    s.delete_registration("2".into()).await.unwrap();
    s.delete_registration("absent".into()).await.unwrap();
    let ids = sorted(
        s.load_registrations()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect(),
    );
    assert_eq!(ids, ["3", "4"]);

    // Channels by key id.
    let mut ch = ChannelRecord {
        key_id: "k".into(),
        domain: "d".into(),
        callback: None,
        allow: None,
    };
    s.put_channel(ch.clone()).await.unwrap();
    ch.callback = Some(CallbackTarget {
        url: "http://127.0.0.1:1/".into(),
        headers: Default::default(),
    });
    ch.allow = Some(vec!["ep".into()]);
    s.put_channel(ch.clone()).await.unwrap();
    assert_eq!(s.load_channels().await.unwrap(), vec![ch]);

    // Requests by row, in order; an answer's events remove their request in one write.
    let r1 = s.put_request(job("a")).await.unwrap();
    let r2 = s.put_request(job("b")).await.unwrap();
    let r3 = s.put_request(job("c")).await.unwrap();
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
