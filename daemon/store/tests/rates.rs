//! Write rates of the NATS JetStream store beside the SQLite store (issue 22), printed, not
//! asserted (speed is measured, never a test's verdict): run in release,
//!
//! ```text
//! cargo test --release -p connectord-store --test rates -- --ignored --nocapture
//! ```
//!
//! Each scenario submits `N` writes keeping `IN_FLIGHT` unresolved at a time (as many
//! devices registering at once do), and prints writes/s and CPU time per write of this
//! process (the store's side: the SQLite thread, or the NATS client and writer) and of the
//! nats-server processes (summed over the three of the R3 cluster). docs/PERFORMANCE.md keeps what it printed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use connectord_model::{Entry, Event, Notification, Registration};
use connectord_store::nats::{NatsConfig, NatsStore};
use connectord_store::prelude::*;
use connectord_store::sqlite::SqliteStore;
use connectord_store::{Pending, StoreError};

#[path = "../../testkit/src/nats.rs"]
mod nats_server;

const N: usize = 20_000;

/// CPU time (user + system) of a process so far, from `/proc/<pid>/stat`.
fn cpu(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after ')'. USER_HZ 100.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn reg(i: usize) -> Registration {
    Registration {
        id: format!("id{i}"),
        domain: "d".into(),
        name: format!("ep-{i}"),
        ept: Some("sensor".into()),
        lifetime_s: 86_400,
        binding: "U".into(),
        lwm2m: Some("1.1".into()),
        queue: false,
        peer: connectord_model::PeerRef::udp(
            "127.0.0.1:5683".parse().unwrap(),
            "127.0.0.1:40000".parse().unwrap(),
        ),
        links: "</1/0>,</3/0>,</3303/0>,</3303/1>".into(),
        registered_at_ms: 1,
        expires_at_ms: 86_400_001,
        node: None,
    }
}

fn notification(i: usize) -> Event {
    Event::new(
        Entry::Notification(Notification {
            ep: format!("ep-{}", i % 1000),
            path: "/3303/0/5700".into(),
            ct: Some("text/plain".into()),
            payload: format!("{}.5", i % 40).into_bytes(),
            max_age: 60,
        }),
        i as u64,
    )
}

/// Submits `n` writes from `submit`, at most `in_flight` unresolved; the rate and the
/// CPU per write of this process and of `server` (a pid), printed under `name`.
async fn measure(
    name: &str,
    in_flight: usize,
    servers: &[u32],
    mut submit: impl FnMut(usize) -> Pending<()>,
) {
    let me = "self".to_string();
    let servers_cpu = || -> Duration { servers.iter().map(|p| cpu(&p.to_string())).sum() };
    let (c0, s0) = (cpu(&me), servers_cpu());
    let started = Instant::now();
    let mut pending: VecDeque<Pending<()>> = VecDeque::new();
    for i in 0..N {
        if pending.len() >= in_flight
            && let Some(p) = pending.pop_front()
        {
            p.await.unwrap();
        }
        pending.push_back(submit(i));
    }
    for p in pending {
        p.await.unwrap();
    }
    let took = started.elapsed();
    let own = cpu(&me) - c0;
    let per = |d: Duration| d.as_secs_f64() * 1e6 / N as f64;
    let server_cpu = if servers.is_empty() {
        "-".to_string()
    } else {
        format!("{:.1} µs", per(servers_cpu() - s0))
    };
    println!(
        "{name:<58} in flight {in_flight:>4}: {:>8.0} writes/s, store process CPU {:>6.1} µs/write, nats-server CPU {server_cpu}/write",
        N as f64 / took.as_secs_f64(),
        per(own),
    );
}

async fn scenarios(label: &str, s: &dyn Store, servers: &[u32]) {
    for in_flight in [1, 256] {
        measure(
            &format!("{label} put_registration"),
            in_flight,
            servers,
            |i| s.put_registration(reg(i + in_flight * N)),
        )
        .await;
        measure(
            &format!("{label} append_events (1 event, 100 keys)"),
            in_flight,
            servers,
            |i| {
                s.append_events(vec![(format!("key{}", i % 100), notification(i))], None)
                    .durable
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run in release with --ignored --nocapture"]
async fn write_rates_of_nats_and_sqlite() -> Result<(), StoreError> {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SqliteStore::open(dir.path())?;
        scenarios("sqlite", &s, &[]).await;
    }
    {
        let server = nats_server::NatsServer::start().unwrap();
        let s = NatsStore::connect(NatsConfig::new(server.url(), "bench")).await?;
        scenarios("nats R1", &s, &[server.pid().unwrap_or(0)]).await;
    }
    let cluster = nats_server::NatsCluster::start().unwrap();
    let mut cfg = NatsConfig::new(cluster.urls()[0].clone(), "bench");
    cfg.servers = cluster.urls();
    cfg.replicas = 3;
    let s = NatsStore::connect(cfg).await?;
    let pids: Vec<u32> = cluster.servers.iter().filter_map(|s| s.pid()).collect();
    scenarios("nats R3 (3 servers, one machine)", &s, &pids).await;
    Ok(())
}
