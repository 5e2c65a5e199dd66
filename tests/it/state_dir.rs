//! The state directory's permissions (issue 18, item 6): secrets are created private
//! whatever the umask, and a directory or secret open to group or others is tightened at
//! start, with a warning naming each path and its old mode.

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRETS: [&str; 3] = ["connectord.db", "admin.key", "ca.key.pem"];

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

/// The daemon started through `sh` with `umask 000` (the worst case), until it is ready.
struct Started {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Started {
    fn new(config: &Path) -> Started {
        let (child, logs) = support::spawn_logged(
            Command::new("sh")
                .arg("-c")
                .arg("umask 000; exec \"$0\" run --config \"$1\"")
                .arg(support::BIN)
                .arg(config),
        );
        let s = Started { child, logs };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !s.logs().iter().any(|l| l.ends_with(" ready")) {
            assert!(
                Instant::now() < deadline,
                "not ready:\n{}",
                s.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        assert!(self.child.wait().unwrap().success());
    }
}

#[test]
fn secrets_are_created_private_and_open_modes_are_tightened_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("connectord.toml");
    std::fs::create_dir(tmp.path().join("scripts")).unwrap();
    std::fs::write(&config, support::test_config(tmp.path(), "", "")).unwrap();
    let state = tmp.path().join("state");

    // First start under umask 000: the directory and every secret are private.
    let d = Started::new(&config);
    assert_eq!(mode(&state), 0o700);
    for f in SECRETS
        .iter()
        .chain(&["connectord.db-wal", "connectord.db-shm"])
    {
        assert_eq!(mode(&state.join(f)) & 0o077, 0, "{f} is private");
    }
    d.stop();

    // Opened up (as a restored backup or a hand-made directory might be): tightened at
    // the next start, each path named with its old mode in one warning line.
    chmod(&state, 0o755);
    for f in SECRETS {
        chmod(&state.join(f), 0o644);
    }
    let d = Started::new(&config);
    assert_eq!(mode(&state), 0o700);
    for f in SECRETS {
        assert_eq!(mode(&state.join(f)), 0o600, "{f}");
    }
    let logs = d.logs();
    let line = logs
        .iter()
        .find(|l| l.contains("WARN") && l.contains("took group and others' access away"))
        .unwrap_or_else(|| panic!("no warning:\n{}", logs.join("\n")));
    assert!(
        line.contains(&format!("{} (was 755)", state.display())),
        "{line}"
    );
    for f in SECRETS {
        assert!(
            line.contains(&format!("{} (was 644)", state.join(f).display())),
            "{line}"
        );
    }
    d.stop();
}

/// A state directory the daemon's user cannot make private (here: root's, mode 0755, the
/// daemon run as `nobody`) stops the start with one clear message naming it and its mode.
/// Needs root (to run as another user); skipped with a notice otherwise.
#[test]
fn a_state_directory_that_cannot_be_made_private_refuses_the_start() {
    let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    if !root || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIPPED: needs root and setpriv to run the daemon as another user");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    chmod(tmp.path(), 0o755);
    let config = tmp.path().join("connectord.toml");
    std::fs::create_dir(tmp.path().join("scripts")).unwrap();
    std::fs::write(&config, support::test_config(tmp.path(), "", "")).unwrap();
    chmod(&config, 0o644);
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o755);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(support::BIN)
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_default();
    assert!(
        line.contains(&format!(
            "state directory: {}: accessible to group or others (mode 755) and cannot be made private",
            state.display()
        )),
        "{err}"
    );
    assert_eq!(line.matches("mode 755").count(), 1, "said once: {line}");
    assert_eq!(mode(&state), 0o755);
    assert!(!state.join("connectord.db").exists(), "nothing was created");
}
