//! Many nodes of one NATS fleet at once (the event epoch's compare-and-set): in a test
//! binary of its own, since cargo runs test binaries one after the other. 128 stores
//! connecting at once load both cores for seconds, which made the timed waits of
//! `conformance.rs`'s NATS tests, run beside it, time out.

#[path = "support/nats_store.rs"]
mod nats_store;

use std::time::Duration;

use connectord_store::nats::NatsStore;
use connectord_store::prelude::*;
use nats_store::nats_server::NatsServer;
use nats_store::{config, connect};

/// Nodes that count the cluster's event epoch up at the same time (nodes started
/// together, or taking channels over from a node started after them) each take one of
/// their own. Each count is a compare-and-set that one of the nodes racing for it
/// wins; before, a node gave up after 32 lost tries in a row, without a pause, and
/// refused to start or to take the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_counting_the_epoch_up_together_each_take_one_of_their_own() {
    let server = NatsServer::start().unwrap();
    let first = connect(&server, "first").await;
    let distinct = |mut epochs: Vec<u64>| {
        epochs.sort_unstable();
        epochs.dedup();
        epochs.len()
    };
    // A fleet of 128 started at once (the old code refused one of them in each of
    // four runs).
    let nodes: Vec<NatsStore> = futures_util::future::join_all((0..128).map(|i| {
        let mut cfg = config(vec![server.url()], &format!("n{i}"));
        // 128 compare-and-sets in a row, each round trip slow on a loaded machine (with
        // CI's other work beside it: 5 s was seen to run out). The old code failed within
        // 1 s whatever its bound: it gave up after 32 lost tries.
        cfg.timeout = Duration::from_secs(20);
        async move {
            NatsStore::connect(cfg)
                .await
                .unwrap_or_else(|e| panic!("n{i} did not start: {e}"))
        }
    }))
    .await;
    let epochs: Vec<u64> = nodes.iter().map(NatsStore::event_epoch).collect();
    assert!(
        epochs.iter().all(|&e| e > first.event_epoch()),
        "{epochs:?}"
    );
    assert_eq!(distinct(epochs), 128);
    // A node started after them all: each of the fleet, loading a key's
    // events, numbers on from a new epoch above it, all at the same time.
    let last = connect(&server, "last").await;
    let loads =
        futures_util::future::join_all(nodes.iter().map(|n| n.load_events_of("k".into()))).await;
    for (i, l) in loads.into_iter().enumerate() {
        if let Err(e) = l {
            panic!("n{i} could not take the key over: {e}");
        }
    }
    let renewed: Vec<u64> = nodes.iter().map(NatsStore::event_epoch).collect();
    assert!(
        renewed.iter().all(|&e| e > last.event_epoch()),
        "{renewed:?}"
    );
    assert_eq!(distinct(renewed), 128);
}
