//! Where the registry's bytes go per endpoint (issue 24), and how long its load takes.
//!
//!     cargo run --release -p connectord-core --example registry_memory -- 1000000 [distinct]
//!
//! Stores N registrations like the bench's bulk loader's (`ep=b{s}-{i:07}`, `lwm2m=1.0`,
//! `b=U`, the simulator's ten-link object list) in a SQLite store in a temporary
//! directory, then loads them into a `Registry` as the daemon does at start, and prints
//! the heap bytes the registry holds per endpoint (counted by a wrapper around mimalloc,
//! the daemon's allocator), split into the parts it can name, and the process RSS growth.
//! With `distinct`, every endpoint's object list differs (one more link, `</9/{i}>`), so
//! nothing is shared: the worst case of the object-list table.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use connectord_core::config::RegistryConfig;
use connectord_core::metrics::Counters;
use connectord_core::registry::{Endpoint, Registration, Registry};
use connectord_core::store::Store;
use connectord_core::store::sqlite::SqliteStore;
use connectord_model::PeerRef;

/// Live heap bytes as requested (not as the allocator rounds them).
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call is passed to mimalloc unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: as the caller's.
        unsafe { mimalloc::MiMalloc.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: as the caller's.
        unsafe { mimalloc::MiMalloc.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: as the caller's.
        unsafe { mimalloc::MiMalloc.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: as the caller's.
        unsafe { mimalloc::MiMalloc.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The simulator's object list (`connectord_sim::LINKS`, which depends on this crate).
const LINKS: &str = concat!(
    r#"</>;rt="oma.lwm2m",</1/0>,</1/0/1>,</3/0>;obs,</3/0/0>,</3/0/1>,</3/0/2>,</3/0/4>,"#,
    r#"</3303/0/5700>;obs;rt="temperature";ct=0,</9/0>"#
);

fn vm_rss_kib() -> i64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn registration(i: usize, distinct: bool) -> Registration {
    let links = if distinct {
        format!("{LINKS},</9/{i}>")
    } else {
        LINKS.to_string()
    };
    let port = 1024 + (i % 1000) as u16;
    Registration {
        id: format!("{:016x}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        domain: "default".into(),
        name: format!("b{}-{i:07}", i % 1000),
        ept: None,
        lifetime_s: 86_400,
        binding: "U".into(),
        lwm2m: Some("1.0".into()),
        queue: false,
        peer: PeerRef::udp(
            "127.0.0.1:5683".parse().expect("an address"),
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        ),
        links: links.into(),
        registered_at_ms: 1,
        expires_at_ms: 4_000_000_000_000 + i as u64,
        node: None,
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(100_000), |a| a.parse())?;
    let distinct = args.next().as_deref() == Some("distinct");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    rt.block_on(async {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path())?);
        let t = Instant::now();
        for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
            let pending: Vec<_> = chunk
                .iter()
                .map(|&i| store.put_registration(registration(i, distinct)))
                .collect();
            for p in pending {
                p.await?;
            }
        }
        eprintln!("stored {n} in {:.1} s", t.elapsed().as_secs_f64());

        // What the store hands the registry: the records, each with its own strings.
        let t = Instant::now();
        let live = LIVE.load(Ordering::SeqCst);
        let regs = store.load_registrations().await?;
        let load_store = t.elapsed();
        let records = LIVE.load(Ordering::SeqCst) - live;
        let one = &regs[0];
        let strings = one.id.capacity()
            + one.domain.capacity()
            + one.name.capacity()
            + one.binding.capacity()
            + one.lwm2m.as_ref().map_or(0, String::capacity);
        drop(regs);

        let registry = Registry::new(
            RegistryConfig::default(),
            Arc::clone(&store),
            Arc::new(Counters::default()),
            None,
        );
        let (live0, rss0) = (LIVE.load(Ordering::SeqCst), vm_rss_kib());
        let t = Instant::now();
        let loaded = registry.load().await?;
        let load_all = t.elapsed();
        let (live1, rss1) = (LIVE.load(Ordering::SeqCst), vm_rss_kib());
        anyhow::ensure!(loaded == n, "loaded {loaded} of {n}");
        let ep = registry.directory().by_id(&registration(0, distinct).id);
        let ep = ep.ok_or_else(|| anyhow::anyhow!("endpoint 0 not loaded"))?;
        let per = |b: i64| b as f64 / n as f64;
        let total = per((live1 - live0) as i64);
        let endpoint = (16 + std::mem::size_of::<Endpoint>()) as f64;
        let links = if distinct {
            (16 + ep.reg.links.len()) as f64
        } else {
            0.0
        };
        let paths = if distinct {
            (16 + ep.paths().map(|(p, _)| p.len() + 2).sum::<usize>()) as f64
        } else {
            0.0
        };
        println!(
            "{n} endpoints, object lists {}",
            if distinct {
                "all different"
            } else {
                "all the same"
            }
        );
        println!(
            "store load (SQLite rows to records): {:.3} s, {:.0} B per record on the heap",
            load_store.as_secs_f64(),
            per(records as i64)
        );
        println!(
            "Registry::load (store load included): {:.3} s",
            load_all.as_secs_f64()
        );
        println!("registry heap per endpoint (requested bytes): {total:.0} B");
        println!(
            "  Endpoint (Registration inline, paths pointer) in its Arc: {endpoint:.0} B (Registration {} B, PeerRef {} B)",
            std::mem::size_of::<Registration>(),
            std::mem::size_of::<PeerRef>()
        );
        println!("  id, domain, name, binding, lwm2m strings: {strings} B");
        println!("  object list text (shared when equal): {links:.0} B");
        println!("  paths index (shared when equal): {paths:.0} B");
        println!(
            "  indexes (by id, by name, deadlines) and the object-list table: {:.0} B",
            total - endpoint - strings as f64 - links - paths
        );
        println!(
            "process RSS growth per endpoint (allocator pages included): {:.0} B",
            (rss1 - rss0) as f64 * 1024.0 / n as f64
        );
        drop(registry);
        anyhow::Ok(())
    })?;
    Ok(())
}
