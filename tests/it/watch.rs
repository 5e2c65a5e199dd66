//! End-to-end tests of the directory watchers (issue 18, item 9): the plugin and Lua
//! directories are reloaded when their files change, and only then: the daemon's own
//! reads of a file are no change, and a plugin file that failed is tried again only when
//! it changes again.

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use support::{Daemon, build_plugin, install_plugin};

const WAIT: Duration = Duration::from_secs(20);
/// How long a count of log lines is watched for repeats.
const QUIET: Duration = Duration::from_secs(3);

fn count(d: &Daemon, f: impl Fn(&str) -> bool) -> usize {
    d.logs().iter().filter(|l| f(l)).count()
}

/// Waits until `f` counts `n` lines (bounded), then watches the count for [`QUIET`]:
/// returns the highest count seen (`n` if nothing repeats).
fn settles_at(d: &Daemon, n: usize, f: impl Fn(&str) -> bool) -> usize {
    assert!(
        support::eventually(WAIT, || count(d, &f) >= n),
        "never reached {n} lines:\n{}",
        d.logs().join("\n")
    );
    let end = Instant::now() + QUIET;
    let mut seen = count(d, &f);
    while Instant::now() < end && seen == n {
        std::thread::sleep(Duration::from_millis(100));
        seen = count(d, &f);
    }
    seen
}

/// A plugin whose `create` panics is tried once, and again only when its file changes:
/// not several times a second because the daemon's own read of the file looked like a
/// change. The panic, with `RUST_BACKTRACE=1`, is reported in the failure's log line
/// and prints no backtrace (whose symbol cache each retry leaked).
#[test]
fn a_plugin_file_that_fails_is_tried_again_only_when_it_changes() {
    let panics = build_plugin("example-plugin", &[("CONNECTORD_EXAMPLE_PANIC", "create")]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start_env(
        "",
        &format!("[plugins]\ndir = \"{}\"\n", dir.display()),
        &[("RUST_BACKTRACE", "1")],
    );
    let attempt = |l: &str| l.contains("failed to start") && l.contains("built to panic in create");

    install_plugin(&panics, &dir, "libexample_plugin.so");
    assert_eq!(
        settles_at(&d, 1, attempt),
        1,
        "tried again without a change:\n{}",
        d.logs().join("\n")
    );
    assert!(
        !d.logs().iter().any(|l| l.contains("stack backtrace")),
        "{}",
        d.logs().join("\n")
    );

    // A change (a new copy of the same file) is tried once more.
    install_plugin(&panics, &dir, "libexample_plugin.so");
    assert_eq!(settles_at(&d, 2, attempt), 2, "{}", d.logs().join("\n"));
    assert_eq!(d.get("/api/example/hello").status, 404);
}

/// After a Lua rule file is edited, the directory is reloaded once, not over and over
/// (its own read of the file is no change).
#[test]
fn editing_a_lua_rule_file_reloads_the_directory_once() {
    let d = Daemon::start();
    let reloads = |l: &str| l.contains("Lua rules in force");
    let at_start = count(&d, reloads);
    let rule = |body: &str| std::fs::write(d.scripts_dir().join("10-rule.lua"), body).unwrap();
    let write = |n: usize, body: &str| {
        rule(body);
        settles_at(&d, n, reloads)
    };
    assert_eq!(
        write(
            at_start + 1,
            "function presubscribe(ep, res, key) return nil end\n"
        ),
        at_start + 1,
        "{}",
        d.logs().join("\n")
    );
    assert_eq!(
        write(
            at_start + 2,
            "function presubscribe(ep, res, key) return true end\n"
        ),
        at_start + 2,
        "{}",
        d.logs().join("\n")
    );
}

/// The Lua rules directory moved aside and made anew is watched in its place: a rule file
/// written into the new directory is loaded (before, the watch stayed on the moved
/// directory, and the warning said to restart: an outside review).
#[test]
fn a_lua_rules_directory_replaced_is_watched_in_its_place() {
    let d = Daemon::start();
    let dir = d.scripts_dir();
    std::fs::write(
        dir.join("10-old.lua"),
        "function presubscribe() return nil end\n",
    )
    .unwrap();
    d.expect_log("10-old.lua", Duration::from_secs(10));
    std::fs::rename(&dir, dir.with_file_name("scripts.aside")).unwrap();
    d.expect_log("the Lua rules directory is gone", Duration::from_secs(10));
    std::fs::create_dir(&dir).unwrap();
    d.expect_log(
        "the Lua rules directory is another directory now: watching it",
        Duration::from_secs(10),
    );
    std::fs::write(
        dir.join("20-new.lua"),
        "function presubscribe() return true end\n",
    )
    .unwrap();
    assert!(
        support::eventually(Duration::from_secs(10), || d
            .logs()
            .iter()
            .any(|l| l.contains("Lua rules in force") && l.contains("20-new.lua"))),
        "{}",
        d.logs().join("\n")
    );
}
