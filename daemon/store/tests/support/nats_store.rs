//! What the NATS store's test binaries (`conformance.rs`, `epoch.rs`) share: a store's
//! configuration on given servers and a connected store, with the `nats-server` processes
//! of `daemon/testkit/src/nats.rs`, included as a module: the store cannot depend on the
//! testkit, which depends on the daemon.

use std::time::Duration;

use connectord_store::nats::{NatsConfig, NatsStore};

#[path = "../../../testkit/src/nats.rs"]
pub mod nats_server;

/// Node `node`'s configuration on `servers`: prefix `cd`, one replica, a 2 s timeout.
pub fn config(servers: Vec<String>, node: &str) -> NatsConfig {
    NatsConfig {
        servers,
        prefix: "cd".into(),
        replicas: 1,
        node: node.into(),
        timeout: Duration::from_secs(2),
    }
}

/// Node `node` connected to `server`.
pub async fn connect(server: &nats_server::NatsServer, node: &str) -> NatsStore {
    NatsStore::connect(config(vec![server.url()], node))
        .await
        .unwrap()
}
