//! The OpenAPI document (`docs/openapi.json`) describes exactly the routes the daemon
//! serves: the core router's table and the built-in plugins' routes; and the daemon
//! serves the document itself.

use crate::support;

use std::collections::BTreeSet;
use std::sync::Arc;

use connectord::config::PluginsConfig;
use connectord::metrics::Counters;
use connectord::plugins::PluginHost;
use connectord::rest::routes::CORE_ROUTES;
use connectord::store::Store;
use connectord::store::sqlite::SqliteStore;
use serde_json::Value;

fn document() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .expect("docs/openapi.json is JSON")
}

/// (method, path) of every route the daemon serves with its built-in plugins.
fn served() -> BTreeSet<(String, String)> {
    let mut all: BTreeSet<(String, String)> = CORE_ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _enter = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
    // Every auth backend enabled: a backend not named in `[plugins] auth` is not started
    // and serves no routes.
    let cfg = PluginsConfig {
        auth: ["connector", "pelion", "losant", "headerkeys"]
            .map(String::from)
            .to_vec(),
        ..PluginsConfig::default()
    };
    let host = PluginHost::start(
        &cfg,
        store,
        dir.path().join("cache"),
        Arc::new(Counters::default()),
        1,
    );
    for r in host.routes() {
        all.insert((r.route.method.to_uppercase(), r.route.path.clone()));
    }
    host.shutdown();
    all
}

#[test]
fn the_document_lists_exactly_the_served_routes() {
    let doc = document();
    assert!(
        doc["openapi"].as_str().unwrap_or("").starts_with("3."),
        "an OpenAPI 3 document"
    );
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "put", "post", "delete", "patch", "head", "options"] {
            if item.get(method).is_some() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let served = served();
    let missing: Vec<_> = served.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "served but not in docs/openapi.json: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "in docs/openapi.json but not served: {stale:?}"
    );
}

#[test]
fn the_daemon_serves_the_document() {
    let d = support::Daemon::in_process();
    let r = d.get("/v2/openapi.json");
    assert_eq!(
        (r.status, r.content_type.as_str()),
        (200, "application/json")
    );
    assert_eq!(r.json(), document());
}
