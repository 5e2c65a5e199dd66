use super::*;
use crate::store::sqlite::SqliteStore;
use std::net::SocketAddr;

/// A device at 127.0.0.1:`peer` talking to the UDP socket on 127.0.0.1:`local`.
fn at(peer: u16, local: u16) -> PeerRef {
    PeerRef::udp(addr(local), addr(peer))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn open(dir: &std::path::Path, cfg: RegistryConfig) -> Registry {
    open_limited(dir, cfg, None)
}

fn open_limited(
    dir: &std::path::Path,
    cfg: RegistryConfig,
    limits: Option<Arc<crate::limits::Limits>>,
) -> Registry {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir).unwrap());
    Registry::new(cfg, store, Arc::new(Counters::default()), limits)
}

fn params(name: &str) -> RegisterParams {
    RegisterParams {
        name: name.into(),
        lifetime_s: Some(60),
        links: r#"</>;rt="oma.lwm2m", </3/0>;obs;rt="oma.device";ct=0, </3303/0/5700>"#.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn register_update_deregister() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path(), RegistryConfig::default());
    let ep = reg
        .register(params("node-1"), at(1000, 5683))
        .await
        .unwrap();
    assert_eq!(ep.reg.domain, "default");
    assert_eq!(
        ep.resources().len(),
        2,
        "the oma.lwm2m root link is not a resource"
    );
    assert_eq!(&*ep.resources()[0].path, "/3/0");
    assert_eq!(ep.resources()[0].ct.as_deref(), Some("text/plain"));
    assert!(ep.resources()[0].obs);
    assert!(!ep.resources()[1].obs);
    assert_eq!(reg.directory().list("default", None).len(), 1);
    assert!(
        reg.directory().list("other", None).is_empty(),
        "domains are separate"
    );

    // NAT rebinding: the update comes from another port; the new address is kept.
    let up = UpdateParams {
        lifetime_s: Some(120),
        binding: Some("UQ".into()),
        links: Some("</4/0>".into()),
        ..Default::default()
    };
    let ep2 = reg.update(&ep.reg.id, up, at(2000, 5683)).await.unwrap();
    assert_eq!(ep2.reg.peer, at(2000, 5683));
    assert_eq!(ep2.reg.lifetime_s, 120);
    assert!(ep2.reg.queue);
    assert_eq!(ep2.resources().len(), 1);
    assert!(ep2.reg.expires_at_ms > ep.reg.expires_at_ms);

    // An update without a body keeps the resources.
    let ep3 = reg
        .update(&ep.reg.id, UpdateParams::default(), at(2000, 5683))
        .await
        .unwrap();
    assert_eq!(ep3.resources(), ep2.resources());

    reg.deregister(&ep.reg.id).await.unwrap();
    assert!(reg.directory().get("default", "node-1").is_none());
    assert!(matches!(
        reg.deregister(&ep.reg.id).await,
        Err(RegistryError::NotFound(_))
    ));
    assert!(matches!(
        reg.update(&ep.reg.id, UpdateParams::default(), at(1, 2))
            .await,
        Err(RegistryError::NotFound(_))
    ));
}

#[tokio::test]
async fn re_registration_replaces_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path(), RegistryConfig::default());
    let a = reg.register(params("n"), at(1, 5683)).await.unwrap();
    let b = reg.register(params("n"), at(2, 5683)).await.unwrap();
    assert_ne!(a.reg.id, b.reg.id);
    assert_eq!(reg.directory().len(), 1);
    assert!(matches!(
        reg.update(&a.reg.id, UpdateParams::default(), at(1, 2))
            .await,
        Err(RegistryError::NotFound(_))
    ));
    // The same name in another domain is another endpoint.
    let mut p = params("n");
    p.domain = Some("tenant-b".into());
    reg.register(p, at(3, 5683)).await.unwrap();
    assert_eq!(reg.directory().len(), 2);
}

#[tokio::test]
async fn invalid_registrations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path(), RegistryConfig::default());
    let long = "x".repeat(MAX_NAME_LEN + 1);
    let cases: Vec<(&str, RegisterParams)> = vec![
        (
            "empty name",
            RegisterParams {
                name: "".into(),
                ..params("")
            },
        ),
        ("slash in name", params("a/b")),
        ("control char", params("a\u{1}b")),
        ("long name", params(&long)),
        (
            "zero lifetime",
            RegisterParams {
                lifetime_s: Some(0),
                ..params("a")
            },
        ),
        (
            "bad domain",
            RegisterParams {
                domain: Some("a b".into()),
                ..params("a")
            },
        ),
        (
            "bad type",
            RegisterParams {
                ept: Some("".into()),
                ..params("a")
            },
        ),
        (
            "bad links",
            RegisterParams {
                links: "</3/0".into(),
                ..params("a")
            },
        ),
        (
            "relative link",
            RegisterParams {
                links: "<3/0>".into(),
                ..params("a")
            },
        ),
    ];
    for (why, p) in cases {
        assert!(
            matches!(
                reg.register(p, at(1, 2)).await,
                Err(RegistryError::Invalid(_))
            ),
            "{why}"
        );
    }
    assert!(reg.directory().is_empty());
}

#[tokio::test]
async fn domain_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RegistryConfig {
        max_endpoints_per_domain: 2,
        ..Default::default()
    };
    let reg = open(dir.path(), cfg);
    reg.register(params("a"), at(1, 2)).await.unwrap();
    reg.register(params("b"), at(1, 2)).await.unwrap();
    assert!(matches!(
        reg.register(params("c"), at(1, 2)).await,
        Err(RegistryError::DomainFull { .. })
    ));
    // Re-registering an existing name does not count twice.
    reg.register(params("a"), at(1, 2)).await.unwrap();
}

/// `max_endpoints` caps the registry over all domains, which `d=` lets a device choose.
#[tokio::test]
async fn total_limit_over_all_domains() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RegistryConfig {
        max_endpoints: 3,
        ..Default::default()
    };
    let limits = Arc::new(crate::limits::Limits::new(
        &Default::default(),
        10,
        Arc::new(Counters::default()),
    ));
    let reg = open_limited(dir.path(), cfg.clone(), Some(Arc::clone(&limits)));
    let in_domain = |d: &str, name: &str| RegisterParams {
        domain: Some(d.into()),
        ..params(name)
    };
    for d in ["d1", "d2", "d3"] {
        reg.register(in_domain(d, "x"), at(1, 2)).await.unwrap();
    }
    let refused = reg.register(in_domain("d4", "x"), at(1, 2)).await;
    assert!(
        matches!(refused, Err(RegistryError::Full { max: 3 })),
        "{refused:?}"
    );
    assert_eq!(reg.directory().len(), 3);
    assert_eq!(
        limits.snapshot("d4", 0).transaction_count,
        0,
        "a refused registration is not counted: refusals naming new domains grow nothing"
    );
    // Re-registering an existing endpoint replaces it, so it is not refused.
    reg.register(in_domain("d2", "x"), at(1, 3)).await.unwrap();
    // A restart with a lower limit keeps every stored registration.
    drop(reg);
    let reg = open(
        dir.path(),
        RegistryConfig {
            max_endpoints: 2,
            ..cfg
        },
    );
    assert_eq!(reg.load().await.unwrap(), 3);
    assert!(matches!(
        reg.register(in_domain("d5", "x"), at(1, 2)).await,
        Err(RegistryError::Full { max: 2 })
    ));
}

/// A refused registration leaves nothing in the limits: junk naming a new domain each
/// must not grow the per-domain counters.
#[tokio::test]
async fn malformed_registrations_are_not_counted() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Arc::new(crate::limits::Limits::new(
        &Default::default(),
        10,
        Arc::new(Counters::default()),
    ));
    let reg = open_limited(
        dir.path(),
        RegistryConfig::default(),
        Some(Arc::clone(&limits)),
    );
    for n in 0..3 {
        let p = RegisterParams {
            domain: Some(format!("junk{n}")),
            links: "<unterminated".into(),
            ..params("x")
        };
        assert!(matches!(
            reg.register(p, at(1, 2)).await,
            Err(RegistryError::Invalid(_))
        ));
        assert_eq!(limits.snapshot(&format!("junk{n}"), 0).transaction_count, 0);
    }
    let p = RegisterParams {
        domain: Some("real".into()),
        ..params("x")
    };
    reg.register(p, at(1, 2)).await.unwrap();
    assert_eq!(limits.snapshot("real", 1).transaction_count, 1);
}

#[tokio::test]
async fn registrations_survive_reopening_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (id, kept) = {
        let reg = open(dir.path(), RegistryConfig::default());
        let a = reg.register(params("a"), at(1, 2)).await.unwrap();
        let b = reg.register(params("b"), at(1, 2)).await.unwrap();
        reg.deregister(&b.reg.id).await.unwrap();
        (a.reg.id.clone(), a)
    };
    let reg = open(dir.path(), RegistryConfig::default());
    assert_eq!(reg.load().await.unwrap(), 1);
    let a = reg.directory().get("default", "a").unwrap();
    assert_eq!(a.reg, kept.reg);
    assert_eq!(a.resources(), kept.resources());
    reg.update(&id, UpdateParams::default(), at(9, 2))
        .await
        .unwrap();
}

#[tokio::test]
async fn expiry_removes_due_registrations_only() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path(), RegistryConfig::default());
    let a = reg
        .register(
            RegisterParams {
                lifetime_s: Some(10),
                ..params("a")
            },
            at(1, 2),
        )
        .await
        .unwrap();
    reg.register(
        RegisterParams {
            lifetime_s: Some(100),
            ..params("b")
        },
        at(1, 2),
    )
    .await
    .unwrap();
    let t = a.reg.expires_at_ms;
    assert!(reg.expire_due(t - 1).await.is_empty());
    let gone = reg.expire_due(t).await;
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].reg.name, "a");
    assert_eq!(reg.directory().len(), 1);
    // And it stays gone after a restart.
    drop(reg);
    let reg = open(dir.path(), RegistryConfig::default());
    assert_eq!(reg.load().await.unwrap(), 1);
}

fn endpoint(lwm2m: Option<&str>, links: &str) -> Endpoint {
    Endpoint::new(Registration {
        id: "r".into(),
        domain: "d".into(),
        name: "n".into(),
        ept: None,
        lifetime_s: 60,
        binding: "U".into(),
        lwm2m: lwm2m.map(Into::into),
        queue: false,
        peer: at(1, 2),
        links: links.into(),
        registered_at_ms: 0,
        expires_at_ms: 0,
        node: None,
    })
    .unwrap()
}

/// An LwM2M client's links carry no `obs`: everything it lists, and everything below,
/// is observable; an mbed-style device says what is with `obs`.
#[test]
fn observability_follows_the_client_kind() {
    let links = r#"</>;rt="oma.lwm2m";ct="112 11542",</3/0>;ver=1.1,</3303/0/5700>;obs"#;
    let lw = endpoint(Some("1.1"), links);
    for (path, want) in [
        ("/3/0", Some(true)),
        ("/3/0/1", Some(true)),
        ("/3/0/7/1", Some(true)),
        ("/3303/0/5700", Some(true)),
        ("/3", None),
        ("/3/01", None),
        ("/4/0", None),
    ] {
        assert_eq!(lw.observable(path), want, "lwm2m {path}");
    }
    assert!(lw.resources().iter().all(|r| r.obs));
    assert!(lw.paths().all(|(_, obs)| obs));
    assert_eq!(lw.resources()[0].ver.as_deref(), Some("1.1"));
    assert_eq!(lw.formats(), vec![112, 11542]);

    let mbed = endpoint(None, links);
    for (path, want) in [
        ("/3/0", Some(false)),
        ("/3/0/1", None),
        ("/3303/0/5700", Some(true)),
    ] {
        assert_eq!(mbed.observable(path), want, "mbed {path}");
    }
    assert!(!mbed.resources()[0].obs);
    assert!(!mbed.observes_freely());
    assert_eq!(mbed.resource_count(), 2);
}

/// A device whose links mark nothing `obs` and that leaves out `lwm2m=` (optional in
/// LwM2M 1.0, whose clients never mark `obs`) observes like an LwM2M client: before, all
/// its resources were "not observable" (412), and pre-subscriptions skipped it.
#[test]
fn a_device_that_marks_nothing_observable_leaves_it_to_the_device() {
    let lw10 = endpoint(None, "</3/0>,</3/0/0>,</3303/0/5700>");
    assert!(lw10.observes_freely());
    for (path, want) in [
        ("/3/0", Some(true)),
        ("/3/0/0", Some(true)),
        ("/3/0/7/1", Some(true)),
        ("/3303/0/5700", Some(true)),
        ("/4/0", None),
    ] {
        assert_eq!(lw10.observable(path), want, "{path}");
    }
    assert!(lw10.resources().iter().all(|r| r.obs));
    assert!(lw10.paths().all(|(_, obs)| obs));
    assert_eq!(lw10.paths().count(), 3);
    assert_eq!(lw10.path_bytes().count(), 3);
    assert_eq!(lw10.resource_count(), 3);
    assert!(
        !lw10.is_lwm2m(),
        "its payloads are still its own (no TLV transcoding)"
    );

    let empty = endpoint(None, "");
    assert_eq!(empty.resource_count(), 0);
    assert_eq!(empty.observable("/3/0"), None);
}

#[test]
fn paths_below_compare_whole_segments() {
    for (path, base, want) in [
        ("/3/0", "/3/0", true),
        ("/3/0/1", "/3/0", true),
        ("/3/0/1", "/3/0/", true),
        ("/3/01", "/3/0", false),
        ("/3", "/3/0", false),
        ("/3/0", "/", false),
        ("/3/0", "", false),
    ] {
        assert_eq!(is_at_or_below(path, base), want, "{path} under {base}");
    }
}

#[test]
fn root_formats_are_read_from_the_root_link() {
    for (links, want) in [
        (r#"</>;rt="oma.lwm2m";ct=110,</3/0>"#, vec![110]),
        (r#"</>;ct="60 110 112",</3/0>"#, vec![60, 110, 112]),
        (r#"</>;rt="oma.lwm2m";ct="x 42",</3/0>"#, vec![42]),
        ("</3/0>;ct=0", vec![]),
        ("<broken", vec![]),
    ] {
        assert_eq!(root_formats(links), want, "{links}");
    }
}

#[tokio::test]
async fn remove_by_name_is_a_deregistration_of_that_name_only() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path(), RegistryConfig::default());
    let a = reg
        .register(params("node-a"), at(1000, 5683))
        .await
        .unwrap();
    reg.register(params("node-b"), at(1001, 5683))
        .await
        .unwrap();
    assert!(matches!(
        reg.remove_by_name("other", "node-a").await,
        Err(RegistryError::NotFound(_))
    ));
    let gone = reg.remove_by_name("default", "node-a").await.unwrap();
    assert_eq!(gone.reg.id, a.reg.id);
    assert!(reg.directory().get("default", "node-a").is_none());
    assert!(reg.directory().get("default", "node-b").is_some());
    assert!(matches!(
        reg.update(&a.reg.id, UpdateParams::default(), at(1000, 5683))
            .await,
        Err(RegistryError::NotFound(_))
    ));
    // And it is gone from the store too.
    drop(reg);
    let reg = open(dir.path(), RegistryConfig::default());
    reg.load().await.unwrap();
    assert!(reg.directory().get("default", "node-a").is_none());
    assert!(reg.directory().get("default", "node-b").is_some());
}

/// Readers hold the directory the registry hands out at construction: it shows every
/// change the store committed, and nothing of one the store refused (rolled back).
#[tokio::test]
async fn the_directory_shows_only_what_the_store_committed() {
    let store = Arc::new(crate::store::memory::MemoryStore::new());
    let reg = Registry::new(
        RegistryConfig::default(),
        Arc::clone(&store) as Arc<dyn Store>,
        Arc::new(Counters::default()),
        None,
    );
    let dir = Arc::clone(reg.directory());
    assert!(dir.is_empty());

    let a = reg.register(params("node-a"), at(1, 2)).await.unwrap();
    let seen = dir
        .get("default", "node-a")
        .expect("a committed registration");
    assert!(Arc::ptr_eq(&seen, &a));
    assert_eq!((dir.len(), dir.count_in("default")), (1, 1));

    store.fail_writes(true);
    let refused = reg.register(params("node-b"), at(3, 2)).await;
    assert!(
        matches!(refused, Err(RegistryError::Store(_))),
        "{refused:?}"
    );
    assert!(
        dir.get("default", "node-b").is_none(),
        "a refused registration"
    );
    let refused = reg.register(params("node-a"), at(4, 2)).await;
    assert!(
        matches!(refused, Err(RegistryError::Store(_))),
        "{refused:?}"
    );
    let update = UpdateParams {
        lifetime_s: Some(120),
        ..Default::default()
    };
    let refused = reg.update(&a.reg.id, update, at(5, 2)).await;
    assert!(
        matches!(refused, Err(RegistryError::Store(_))),
        "{refused:?}"
    );
    let refused = reg.deregister(&a.reg.id).await;
    assert!(
        matches!(refused, Err(RegistryError::Store(_))),
        "{refused:?}"
    );
    assert!(
        reg.expire_due(u64::MAX).await.is_empty(),
        "a refused expiry"
    );
    let seen = dir.get("default", "node-a").expect("still registered");
    assert_eq!(seen.reg, a.reg, "the registration as stored");
    assert_eq!(dir.list("default", None).len(), 1);

    store.fail_writes(false);
    let b = reg.register(params("node-b"), at(3, 2)).await.unwrap();
    let names: Vec<_> = dir
        .list("default", None)
        .iter()
        .map(|e| e.reg.name.clone())
        .collect();
    assert_eq!(names, ["node-a", "node-b"]);
    reg.deregister(&a.reg.id).await.unwrap();
    assert!(dir.get("default", "node-a").is_none());
    assert_eq!(dir.len(), 1);
    assert_eq!(reg.expire_due(u64::MAX).await.len(), 1);
    assert!(dir.get("default", &b.reg.name).is_none() && dir.is_empty());
}

/// Records the kinds of the events it is told.
#[derive(Default)]
struct Told(std::sync::Mutex<Vec<&'static str>>);

impl RegistryListener for Told {
    fn on_event<'a>(
        &'a self,
        ev: &'a RegistryEvent,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        let kind = match ev {
            RegistryEvent::Registered { .. } => "registered",
            RegistryEvent::Updated { .. } => "updated",
            RegistryEvent::Deregistered(_) => "deregistered",
            RegistryEvent::Expired(_) => "expired",
            RegistryEvent::Moved(_) => "moved",
            RegistryEvent::RemovedElsewhere(_) => "removed elsewhere",
        };
        self.0.lock().unwrap().push(kind);
        Box::pin(async {})
    }

    fn on_moved_here<'a>(
        &'a self,
        ep: &'a Arc<Endpoint>,
        from: &'a Arc<Endpoint>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        assert_ne!(ep.reg.node, from.reg.node);
        self.0.lock().unwrap().push("moved here");
        Box::pin(async {})
    }
}

/// Issue 22: an update of another node's registration arriving here is accepted and moves
/// it here: the same id, stored with this node as owner, expired here from now on;
/// `Updated` then `on_moved_here`. A re-registration over another node's registration is
/// `Registered` then `on_moved_here`. An id nobody has is `NotFound`.
#[tokio::test]
async fn an_update_of_another_nodes_registration_moves_it_here() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, told) = node_n2_told(dir.path());
    let far = now_ms() + 60_000;
    reg.apply_foreign(ForeignChange::Put(Box::new(foreign("f1", "a", "n1", far))))
        .await;
    let ep = reg
        .update("f1", UpdateParams::default(), at(7, 2))
        .await
        .unwrap();
    assert_eq!(
        (ep.reg.id.as_str(), ep.reg.node.as_deref()),
        ("f1", Some("n2"))
    );
    assert_eq!(*told.0.lock().unwrap(), ["updated", "moved here"]);
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let stored = store.load_registrations().await.unwrap();
    drop(store);
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].node.as_deref(), Some("n2"), "stored as ours");
    assert_eq!(
        reg.expire_due(u64::MAX).await.len(),
        1,
        "ours to expire now"
    );
    // A second update of ours: no move.
    told.0.lock().unwrap().clear();
    reg.apply_foreign(ForeignChange::Put(Box::new(foreign("f2", "b", "n1", far))))
        .await;
    reg.register(params("b"), at(8, 2)).await.unwrap();
    assert_eq!(*told.0.lock().unwrap(), ["registered", "moved here"]);
    let id = reg.directory().get("default", "b").unwrap().reg.id.clone();
    reg.update(&id, UpdateParams::default(), at(8, 2))
        .await
        .unwrap();
    assert_eq!(
        *told.0.lock().unwrap(),
        ["registered", "moved here", "updated"]
    );
    assert!(matches!(
        reg.update("nobody", UpdateParams::default(), at(8, 2))
            .await,
        Err(RegistryError::NotFound(_))
    ));
}

/// The registry of cluster node `n2`, with a listener that records what it is told.
fn node_n2_told(dir: &std::path::Path) -> (Registry, Arc<Told>) {
    let reg = open(dir, RegistryConfig::default()).on_node("n2");
    let told = Arc::new(Told::default());
    reg.add_listener(Arc::clone(&told) as Arc<dyn RegistryListener>);
    (reg, told)
}

fn foreign(id: &str, name: &str, node: &str, expires_at_ms: u64) -> Registration {
    let mut r = endpoint(None, "</3/0>").reg.clone();
    r.id = id.into();
    r.domain = "default".into();
    r.name = name.into();
    r.node = Some(node.into());
    r.expires_at_ms = expires_at_ms;
    r
}

/// The watch of the other nodes' changes lost some (it lagged): reading the store again
/// lists what the store holds of theirs (a put missed: listed; a removal missed: dropped;
/// a put that displaced ours: ours moved), and leaves ours alone.
#[tokio::test]
async fn foreign_registrations_read_again_match_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, told) = node_n2_told(dir.path());
    let far = now_ms() + 60_000;
    // Listed from a change whose removal was then missed: not in the store.
    reg.apply_foreign(ForeignChange::Put(Box::new(foreign("f1", "a", "n1", far))))
        .await;
    let mine = reg.register(params("mine"), at(1, 2)).await.unwrap();
    let kept = reg.register(params("kept"), at(1, 3)).await.unwrap();
    // Written by other nodes, their changes missed.
    for r in [
        foreign("f2", "b", "n1", far),
        foreign("f4", "mine", "n3", far),
    ] {
        reg.store.put_registration(r).await.unwrap();
    }
    told.0.lock().unwrap().clear();
    assert_eq!(reg.reload_foreign().await.unwrap(), (2, 1));
    let d = reg.directory();
    assert!(d.get("default", "a").is_none());
    assert_eq!(
        d.get("default", "b").unwrap().reg.node.as_deref(),
        Some("n1")
    );
    let moved = d.get("default", "mine").unwrap();
    assert_eq!(
        (moved.reg.id.as_str(), moved.reg.node.as_deref()),
        ("f4", Some("n3"))
    );
    assert_ne!(moved.reg.id, mine.reg.id);
    assert_eq!(d.get("default", "kept").unwrap().reg.id, kept.reg.id);
    assert_eq!(*told.0.lock().unwrap(), ["moved"]);
    // Read again with nothing missed: nothing changes.
    assert_eq!(reg.reload_foreign().await.unwrap(), (2, 0));
    assert_eq!(*told.0.lock().unwrap(), ["moved"]);
}

/// The registrations of a node that left are expired in steps of `registry.expiry_batch`,
/// the earliest first, each step saying whether more may be due; those of a live node and
/// those not due stay.
#[tokio::test]
async fn orphans_expire_in_bounded_steps() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RegistryConfig {
        expiry_batch: 2,
        ..Default::default()
    };
    let reg = open(dir.path(), cfg).on_node("n2");
    let now = now_ms();
    for (i, name) in ["e", "d", "c", "b", "a"].iter().enumerate() {
        let r = foreign(&format!("f{i}"), name, "n1", now - 10 + i as u64);
        assert!(
            reg.apply_foreign(ForeignChange::Put(Box::new(r)))
                .await
                .is_none()
        );
    }
    let live = foreign("g", "live", "n3", now - 100);
    let later = foreign("h", "later", "n1", now + 60_000);
    for r in [live, later] {
        let _ = reg.apply_foreign(ForeignChange::Put(Box::new(r))).await;
    }
    let names = |gone: &[Arc<Endpoint>]| -> Vec<String> {
        gone.iter().map(|e| e.reg.name.clone()).collect()
    };
    let alive = |n: &str| n == "n2" || n == "n3";
    let (more, gone) = reg.expire_orphans(now, &alive).await;
    assert_eq!(
        (more, names(&gone)),
        (true, vec!["e".to_string(), "d".into()])
    );
    let (more, gone) = reg.expire_orphans(now, &alive).await;
    assert_eq!(
        (more, names(&gone)),
        (true, vec!["c".to_string(), "b".into()])
    );
    let (more, gone) = reg.expire_orphans(now, &alive).await;
    assert_eq!((more, names(&gone)), (false, vec!["a".to_string()]));
    let (more, gone) = reg.expire_orphans(now, &alive).await;
    assert_eq!((more, gone.len()), (false, 0));
    let dir_ = reg.directory();
    assert!(dir_.get("default", "live").is_some());
    assert!(dir_.get("default", "later").is_some());
}

/// Issue 22: another node's registration is listed but neither announced nor expired here
/// while its owner lives; once the owner is gone it expires here (stored removal, event);
/// a foreign put over our own registration is a move (`Moved`, not announced otherwise);
/// a foreign delete removes only a foreign registration; `load` counts only ours.
#[tokio::test]
async fn foreign_registrations_are_listed_expired_when_orphaned_and_moved() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, told) = node_n2_told(dir.path());
    let dir_ = Arc::clone(reg.directory());

    assert!(
        reg.apply_foreign(ForeignChange::Put(Box::new(foreign("f1", "a", "n1", 1))))
            .await
            .is_none()
    );
    assert_eq!(
        dir_.get("default", "a").unwrap().reg.node.as_deref(),
        Some("n1")
    );
    assert!(
        reg.expire_due(now_ms()).await.is_empty(),
        "its owner expires it"
    );
    assert!(
        reg.expire_orphans(now_ms(), &|n| n == "n1")
            .await
            .1
            .is_empty()
    );
    assert!(told.0.lock().unwrap().is_empty());
    let (more, gone) = reg.expire_orphans(now_ms(), &|n| n == "n2").await;
    assert_eq!((more, gone.len()), (false, 1));
    assert!(dir_.get("default", "a").is_none());
    assert_eq!(*told.0.lock().unwrap(), ["expired"]);

    // Ours, then registered on n1: moved.
    let mine = reg.register(params("b"), at(1, 2)).await.unwrap();
    assert_eq!(mine.reg.node.as_deref(), Some("n2"));
    let far = now_ms() + 60_000;
    let moved = reg
        .apply_foreign(ForeignChange::Put(Box::new(foreign("f2", "b", "n1", far))))
        .await;
    assert_eq!(moved.unwrap().reg.id, mine.reg.id);
    assert_eq!(*told.0.lock().unwrap(), ["expired", "registered", "moved"]);
    assert_eq!(dir_.get("default", "b").unwrap().reg.id, "f2");
    assert_eq!(dir_.count_by_owner().get(&Some("n1".into())), Some(&1));
    // The counts follow every change: ours (b) went, an owner without endpoints is not
    // listed.
    assert_eq!(dir_.count_by_owner().len(), 1);
    // A foreign delete of it, and of one of ours (c, e): ours go too, told as removed
    // elsewhere (another node de-registered it; before, this node kept it and its next
    // update wrote it back).
    reg.register(params("c"), at(3, 2)).await.unwrap();
    reg.register(params("e"), at(3, 3)).await.unwrap();
    assert_eq!(
        dir_.count_by_owner(),
        [(Some("n1".to_string()), 1), (Some("n2".to_string()), 2)].into()
    );
    for name in ["b", "c"] {
        reg.apply_foreign(ForeignChange::Deleted {
            domain: "default".into(),
            name: name.into(),
        })
        .await;
    }
    assert!(dir_.get("default", "b").is_none());
    assert!(dir_.get("default", "c").is_none());
    assert!(dir_.get("default", "e").is_some());
    assert_eq!(
        told.0.lock().unwrap().last().copied(),
        Some("removed elsewhere")
    );
    assert_eq!(dir_.count_by_owner(), [(Some("n2".to_string()), 1)].into());
    drop(reg);

    // At start: n1's stored registration is listed, not counted as ours.
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
    store
        .put_registration(foreign("f3", "d", "n1", far))
        .await
        .unwrap();
    let reg = Registry::new(
        RegistryConfig::default(),
        store,
        Arc::new(Counters::default()),
        None,
    )
    .on_node("n2");
    // Ours: e, and b and c (a foreign put or delete writes nothing: in a cluster, n1's
    // own put replaced b's record in the shared store and the other node's delete removed
    // c's; this SQLite file still has both).
    assert_eq!(reg.load().await.unwrap(), 3);
    assert_eq!(reg.directory().len(), 4);
    assert_eq!(
        reg.directory()
            .get("default", "d")
            .unwrap()
            .reg
            .node
            .as_deref(),
        Some("n1")
    );
    // The load (all at once) counts them too.
    assert_eq!(
        reg.directory().count_by_owner(),
        [(Some("n1".to_string()), 1), (Some("n2".to_string()), 3)].into()
    );
    // Due for all four (b's, c's and e's 60 s lifetimes ran from their registrations,
    // after `far` was taken: a CI run once registered c more than a millisecond after
    // it), expired only ours.
    let past_all = now_ms() + 60_001;
    assert!(reg.expire_due(past_all).await.len() == 3, "ours only");
}

/// The count of endpoints per owner node that `/metrics` and `/v2/cluster` read is kept
/// as endpoints come and go (issue 24: it was a scan of the whole directory under its
/// lock at every scrape); after every kind of change it equals a count over the endpoints.
#[test]
fn the_count_per_owner_follows_every_change() {
    fn ep(id: &str, name: &str, node: Option<&str>) -> Arc<Endpoint> {
        let mut r = endpoint(None, "</3/0>").reg.clone();
        r.id = id.into();
        r.name = name.into();
        r.node = node.map(Into::into);
        Arc::new(Endpoint::new(r).unwrap())
    }
    let dir = Directory::new();
    let check = |dir: &Directory, what: &str| {
        let maps = dir.lock();
        let mut counted = std::collections::BTreeMap::new();
        for name in ["a", "b", "c", "d", "e", "f"] {
            if let Some(e) = maps.by_name("d", name) {
                *counted.entry(e.reg.node.clone()).or_insert(0) += 1;
            }
        }
        drop(maps);
        assert_eq!(dir.count_by_owner(), counted, "{what}");
    };
    dir.lock().insert_all(vec![
        (ep("1", "a", None), false),
        (ep("2", "b", Some("n1")), true),
        (ep("3", "c", Some("n1")), true),
    ]);
    check(&dir, "loaded");
    dir.lock().insert(ep("4", "d", None));
    dir.lock().insert_foreign(ep("5", "e", Some("n2")));
    check(&dir, "inserted");
    // The same id again from another owner (a move): counted once, under the new owner.
    let moved = ep("2", "b", Some("n2"));
    {
        let mut maps = dir.lock();
        maps.remove("2");
        maps.insert_foreign(moved);
    }
    check(&dir, "moved");
    dir.lock().remove("1");
    dir.lock().remove("5");
    dir.lock().remove("absent");
    check(&dir, "removed");
    for id in ["2", "3", "4"] {
        dir.lock().remove(id);
    }
    assert!(dir.count_by_owner().is_empty());
}

/// Issue 24: ids sort by the time they were made (the store's id index grows at its end),
/// and two made in the same millisecond differ by their random part.
#[test]
fn registration_ids_are_time_ordered_and_unique() {
    let a = registration_id(1_700_000_000_000, u64::MAX);
    let b = registration_id(1_700_000_000_001, 0);
    assert_eq!(a.len(), 26);
    assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(a < b, "{a} then {b}");
    let now: Vec<String> = (0..1000).map(|_| new_registration_id()).collect();
    let mut sorted = now.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 1000, "unique");
    assert!(
        now.windows(2).all(|w| w[0][..10] <= w[1][..10]),
        "the time part never goes back"
    );
}

/// A restart with more registrations than the store reads in one piece (the SQLite
/// store gives them 4 096 at a time): every one is found by id and by name, the
/// endpoints of one list and client kind share its text and paths (an LwM2M client's
/// and an mbed-style device's of the same text do not share paths), and they expire in
/// deadline order across the pieces.
#[tokio::test]
async fn a_restart_in_pieces_indexes_shares_and_orders_every_registration() {
    let dir = tempfile::tempdir().unwrap();
    let n = 9_000;
    let lists = [r#"</3/0>;obs,</3303/0/5700>"#, r#"</3/0>,</5/0>"#];
    // Deadlines a permutation of 1 000 000 .. 1 000 000 + n, unlike the rows' order.
    let deadline = |i: usize| 1_000_000 + ((i * 7_919) % n) as u64;
    {
        use crate::store::RegistrationStore;
        let store = SqliteStore::open(dir.path()).unwrap();
        let puts: Vec<_> = (0..n)
            .map(|i| {
                store.put_registration(Registration {
                    id: format!("id-{i:05}"),
                    domain: if i % 2 == 0 { "default" } else { "other" }.into(),
                    name: format!("n-{i}"),
                    ept: None,
                    lifetime_s: 60,
                    binding: "U".into(),
                    lwm2m: (i % 3 == 0).then(|| "1.1".into()),
                    queue: false,
                    peer: at(1, 2),
                    links: Arc::from(lists[i % 2]),
                    registered_at_ms: 0,
                    expires_at_ms: deadline(i),
                    node: None,
                })
            })
            .collect();
        for p in puts {
            p.await.unwrap();
        }
    }
    let reg = open(dir.path(), RegistryConfig::default());
    assert_eq!(reg.load().await.unwrap(), n);
    let dir_ = reg.directory();
    assert_eq!(dir_.len(), n);
    let eps: Vec<Arc<Endpoint>> = (0..n)
        .map(|i| {
            let domain = if i % 2 == 0 { "default" } else { "other" };
            let ep = dir_.get(domain, &format!("n-{i}")).expect("by name");
            assert_eq!(ep.reg.id, format!("id-{i:05}"));
            assert!(Arc::ptr_eq(&dir_.by_id(&ep.reg.id).expect("by id"), &ep));
            assert_eq!(ep.reg.expires_at_ms, deadline(i));
            ep
        })
        .collect();
    // Same list and kind: one text and one paths index; same list, other kind: other
    // paths.
    for (i, ep) in eps.iter().enumerate() {
        let first = &eps[i % 6];
        assert!(Arc::ptr_eq(&ep.reg.links, &first.reg.links), "{i}");
        assert!(Arc::ptr_eq(&ep.paths, &first.paths), "{i}");
        assert_eq!(ep.resources(), first.resources());
    }
    assert_eq!(eps[0].reg.links, eps[2].reg.links);
    assert_ne!(eps[0].paths, eps[2].paths);
    // /3303/0/5700 has no `obs`: observable for the LwM2M client only.
    assert_eq!(&*eps[0].resources()[1].path, "/3303/0/5700");
    assert!(eps[0].resources()[1].obs && !eps[2].resources()[1].obs);
    // In deadline order, whichever piece an endpoint came in.
    let gone = reg.expire_due(1_000_000 + 4_999).await;
    assert_eq!(gone.len(), 5_000);
    assert!(
        gone.iter()
            .all(|ep| ep.reg.expires_at_ms <= 1_000_000 + 4_999)
    );
    assert_eq!(dir_.len(), n - 5_000);
    assert!(reg.expire_due(1_000_000 + 4_999).await.is_empty());
}

/// Memory changes only after the store commits: while a registration, a re-registration,
/// an update, a de-registration or an expiry waits for its write, readers are shown the
/// endpoint as the store held it before (by name, by id, in lists and counts), and the
/// change once its write is answered.
#[tokio::test]
async fn readers_see_no_change_before_its_write_commits() {
    let store = Arc::new(crate::store::memory::MemoryStore::new());
    let reg = Arc::new(Registry::new(
        RegistryConfig::default(),
        Arc::clone(&store) as Arc<dyn Store>,
        Arc::new(Counters::default()),
        None,
    ));
    let dir = Arc::clone(reg.directory());
    let shown = |name: &str| dir.get("default", name).map(|e| e.reg.clone());
    let counts = || {
        (
            dir.len(),
            dir.count_in("default"),
            dir.list("default", None).len(),
            dir.count_by_owner().values().sum::<usize>(),
        )
    };
    // Runs `write` with the store's answers held: checks what readers are shown while it
    // waits, releases the store, and returns what the write returned.
    async fn held<T: Send + 'static>(
        store: &crate::store::memory::MemoryStore,
        write: impl std::future::Future<Output = T> + Send + 'static,
        meanwhile: impl FnOnce(),
    ) -> T {
        store.hold_writes(true);
        let task = tokio::spawn(write);
        // The write is made (the maps changed, the store written) and waits for its answer.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!task.is_finished(), "the write did not wait for the store");
        meanwhile();
        store.hold_writes(false);
        task.await.unwrap()
    }

    // A new registration: not shown until committed.
    let r = Arc::clone(&reg);
    let a = held(
        &store,
        async move { r.register(params("node-a"), at(1, 2)).await.unwrap() },
        || {
            assert_eq!(shown("node-a"), None, "a registration during its commit");
            assert_eq!(counts(), (0, 0, 0, 0));
        },
    )
    .await;
    assert_eq!(shown("node-a"), Some(a.reg.clone()));
    assert!(dir.by_id(&a.reg.id).is_some());
    assert_eq!(counts(), (1, 1, 1, 1));

    // An update: the registration as stored until the new one is.
    let r = Arc::clone(&reg);
    let id = a.reg.id.clone();
    let up = UpdateParams {
        lifetime_s: Some(120),
        ..Default::default()
    };
    let a2 = held(
        &store,
        async move { r.update(&id, up, at(9, 2)).await.unwrap() },
        || {
            assert_eq!(
                shown("node-a"),
                Some(a.reg.clone()),
                "an update during its commit"
            );
            assert_eq!(dir.by_id(&a.reg.id).unwrap().reg, a.reg);
        },
    )
    .await;
    assert_eq!(shown("node-a").unwrap().lifetime_s, 120);

    // A re-registration of the name: the old one shown (by name and by its id), the new
    // id unknown, until committed.
    let r = Arc::clone(&reg);
    let b = held(
        &store,
        async move { r.register(params("node-a"), at(3, 2)).await.unwrap() },
        || {
            assert_eq!(shown("node-a"), Some(a2.reg.clone()));
            assert!(dir.by_id(&a2.reg.id).is_some());
            assert_eq!(counts(), (1, 1, 1, 1));
        },
    )
    .await;
    assert_eq!(shown("node-a"), Some(b.reg.clone()));
    assert!(dir.by_id(&a2.reg.id).is_none() && dir.by_id(&b.reg.id).is_some());
    assert_eq!(counts(), (1, 1, 1, 1));

    // A de-registration: still shown until committed.
    let r = Arc::clone(&reg);
    let id = b.reg.id.clone();
    held(
        &store,
        async move { r.deregister(&id).await.unwrap() },
        || {
            assert_eq!(
                shown("node-a"),
                Some(b.reg.clone()),
                "a removal during its commit"
            );
            assert_eq!(counts(), (1, 1, 1, 1));
        },
    )
    .await;
    assert_eq!(shown("node-a"), None);
    assert_eq!(counts(), (0, 0, 0, 0));

    // An expiry: the same.
    let c = reg.register(params("node-c"), at(4, 2)).await.unwrap();
    let r = Arc::clone(&reg);
    let expired = held(&store, async move { r.expire_due(u64::MAX).await }, || {
        assert_eq!(
            shown("node-c"),
            Some(c.reg.clone()),
            "an expiry during its commit"
        );
        assert_eq!(counts(), (1, 1, 1, 1));
    })
    .await;
    assert_eq!(expired.len(), 1);
    assert_eq!(shown("node-c"), None);
    assert_eq!(counts(), (0, 0, 0, 0));

    // A refused write is never shown, during its commit or after.
    store.fail_writes(true);
    assert!(reg.register(params("node-d"), at(5, 2)).await.is_err());
    assert_eq!((shown("node-d"), counts()), (None, (0, 0, 0, 0)));
}

/// What a device deleted leaves its registration: the links at or below the path, the
/// others as the device wrote them (attributes and quoting kept), stored (a restart reads
/// them so), and without renewing the lifetime (the device did not update).
#[tokio::test]
async fn forget_links_removes_what_was_deleted_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path(), RegistryConfig::default());
    let mut p = params("node-d");
    p.links = r#"</>;rt="oma.lwm2m";ct="110 11542", </3/0>;obs;rt="oma.device",</5/0>,</5/0/1>;ct=0,</50/0>"#.into();
    let before = reg.register(p, at(1000, 5683)).await.unwrap();
    let after = reg
        .forget_links("default", "node-d", "/5/0")
        .await
        .unwrap()
        .expect("links removed");
    assert_eq!(
        &*after.reg.links,
        r#"</>;rt="oma.lwm2m";ct="110 11542",</3/0>;obs;rt="oma.device",</50/0>"#
    );
    assert_eq!(after.reg.expires_at_ms, before.reg.expires_at_ms);
    assert_eq!(after.formats(), before.formats());
    // Nothing listed there (a resource below a listed instance, an unknown path): no
    // change.
    assert!(
        reg.forget_links("default", "node-d", "/3/0/1")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        reg.forget_links("default", "node-d", "/9")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        reg.forget_links("default", "ghost", "/3/0")
            .await
            .unwrap()
            .is_none()
    );
    drop(reg);
    let reg = open(dir.path(), RegistryConfig::default());
    reg.load().await.unwrap();
    let loaded = reg.directory().get("default", "node-d").unwrap();
    assert_eq!(loaded.reg.links, after.reg.links);
}
