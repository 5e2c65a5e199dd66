//! Daemons started in this process (`Launch::in_process`): two at once, each with its
//! own addresses, state and keys; a clean stop and a start again on the same state; and
//! nothing left running once they are dropped. One test in this binary, so that the
//! threads it counts are its daemons' only.

use std::time::Duration;

use connectord_testkit::{Launch, eventually, http_get};

const LINKS: &str = "</3/0>,</3303/0/5700>;obs";

/// The names of this process's threads.
fn thread_names() -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let comm = entry.expect("task").path().join("comm");
        if let Ok(name) = std::fs::read_to_string(comm) {
            names.push(name.trim().to_string());
        }
    }
    names
}

/// The threads a daemon starts: its runtime's workers and blocking threads, the store
/// thread, the Lua rules thread, the plugins' threads.
fn daemon_threads() -> Vec<String> {
    thread_names()
        .into_iter()
        .filter(|n| {
            n.starts_with("connectord") || n == "store" || n == "lua-rules" || n.contains("plugin")
        })
        .collect()
}

#[test]
fn two_daemons_in_one_process_are_independent_and_stop_cleanly() {
    let before = daemon_threads();
    // No binary is run in process; the name is only what `plugin_call` would run.
    let launch = || Launch::new("connectord").in_process();
    let a = launch().start().unwrap_or_else(|e| panic!("{e}"));
    let b = launch().start().unwrap_or_else(|e| panic!("{e}"));
    assert!(a.is_in_process() && b.is_in_process());
    assert_ne!(a.rest, b.rest);
    assert_ne!(a.coap, b.coap);
    assert!(!a.key.is_empty() && !b.key.is_empty() && a.key != b.key);
    let ready = a.ready.as_ref().expect("addresses known");
    assert_eq!((ready.rest[0], ready.coap[0]), (a.rest, a.coap));
    assert_eq!(ready.pid, std::process::id());
    // A thread names itself once it runs: one just spawned may still carry its parent's
    // name (seen under load, the lua-rules thread of the second daemon).
    for name in ["store", "lua-rules"] {
        let count = || daemon_threads().iter().filter(|n| *n == name).count();
        assert!(
            eventually(Duration::from_secs(5), || count() == 2),
            "one {name} thread each: {:?}",
            daemon_threads()
        );
    }

    // Each has its own state: a device registers with one only, and each refuses the
    // other's key.
    let mut dev = a.device();
    dev.register(&["ep=inproc-1", "lt=60", "b=U"], LINKS);
    let names = |d: &connectord_testkit::Daemon| {
        let r = d.get("/endpoints");
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
            .as_array()
            .expect("a list")
            .iter()
            .map(|e| e["name"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&a), ["inproc-1"]);
    assert!(names(&b).is_empty());
    assert_eq!(
        http_get(&a.url("/endpoints"), Some(&b.key), None).status,
        401
    );
    assert_eq!(
        http_get(&b.url("/endpoints"), Some(&a.key), None).status,
        401
    );

    // A clean stop and a start again on the same state, in process: the registration was
    // stored, the store closed and opened again.
    let a = a.stop_and_restart();
    assert!(a.is_in_process());
    assert_eq!(names(&a), ["inproc-1"], "kept across the restart");
    assert_eq!(names(&b), Vec::<String>::new());

    // Dropped: the listeners are closed and every thread of theirs has ended.
    let (rest_a, rest_b) = (a.rest, b.rest);
    drop(a);
    drop(b);
    for addr in [rest_a, rest_b] {
        assert!(
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
            "{addr} still listens"
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || daemon_threads() == before),
        "threads left: {:?} (before: {before:?})",
        daemon_threads()
    );
}
