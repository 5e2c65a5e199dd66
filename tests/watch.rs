//! End-to-end tests of the directory watchers (issue 18, item 9): the Lua directory is
//! reloaded when its files change, and only then: the daemon's own reads of a file are no
//! change.

mod support;

use std::time::{Duration, Instant};

use support::Daemon;

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
