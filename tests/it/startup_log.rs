//! What the daemon says when it starts (issue 19, item 11): the configuration file named
//! by its absolute path, plugin files that replace built-ins started once, and a start
//! that fails saying each cause once. Also: no colour codes from `connectord simulate`
//! when its output is not a terminal (item 9).

use crate::support;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A daemon started by hand (the harness always passes an absolute path); its stderr
/// lines are collected.
struct Started {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Started {
    fn spawn(cwd: &Path, config_arg: &str) -> Started {
        let (child, lines) = support::spawn_logged(
            Command::new(support::BIN)
                .args(["run", "--config", config_arg])
                .current_dir(cwd),
        );
        Started { child, lines }
    }

    fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits (bounded) for the `ready` line.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.log().iter().any(|l| l.ends_with(" ready")) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("connectord exited ({status}):\n{}", self.log().join("\n"));
            }
            assert!(
                Instant::now() < deadline,
                "connectord did not start:\n{}",
                self.log().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_relative_config_path_is_logged_absolute() {
    let p = support::Prepared::new("", "");
    let dir = p.dir.path().to_path_buf();
    let mut d = Started::spawn(&dir, "connectord.toml");
    d.wait_ready();
    let log = d.log();
    let line = log
        .iter()
        .find(|l| l.contains("configuration: "))
        .unwrap_or_else(|| panic!("no configuration line:\n{}", log.join("\n")));
    let want = format!("configuration: {}", dir.join("connectord.toml").display());
    assert!(line.ends_with(&want), "{line:?} should end with {want:?}");
}

#[test]
fn a_failing_start_says_each_cause_once() {
    // The REST port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let p = support::Prepared::new("", "");
    let text = std::fs::read_to_string(&p.config_path).unwrap().replacen(
        "listen = [\"127.0.0.1:0\"]",
        &format!("listen = [\"127.0.0.1:{port}\"]"),
        1,
    );
    std::fs::write(&p.config_path, text).unwrap();
    let mut child = Command::new(support::BIN)
        .args(["run", "--config"])
        .arg(&p.config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    let cause = format!("cannot bind the REST API on 127.0.0.1:{port}");
    assert_eq!(err.matches(&cause).count(), 1, "said once:\n{err}");
    assert_eq!(
        err.matches("Address already in use").count(),
        1,
        "said once:\n{err}"
    );
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_default();
    assert!(line.contains(&cause), "{err}");
}

#[test]
fn a_plugin_file_that_replaces_a_built_in_is_started_once() {
    let built = support::build_plugin("auth-connector", &[]);
    let p = support::Prepared::new("", "");
    let plugins = p.dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::set_permissions(
        &plugins,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    support::install_plugin(&built, &plugins, "libauth_connector.so");
    let mut text = std::fs::read_to_string(&p.config_path).unwrap();
    text.push_str(&format!(
        "\n[plugins]\ndir = \"{}\"\nauth = [\"connector\"]\n",
        plugins.display()
    ));
    std::fs::write(&p.config_path, text).unwrap();
    let d = p.start();
    let log = d.logs();
    let started: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("plugin serving") && l.contains("plugin=connector"))
        .collect();
    assert_eq!(started.len(), 1, "started once:\n{}", log.join("\n"));
    assert!(
        started[0].contains(&plugins.join("libauth_connector.so").display().to_string()),
        "from the file: {}",
        started[0]
    );
    let loads = log
        .iter()
        .filter(|l| l.contains("connector: 0 access keys loaded"))
        .count();
    assert_eq!(loads, 1, "created once:\n{}", log.join("\n"));
    // The file serves: the admin key works.
    assert_eq!(d.get("/v2/endpoints").status, 200);
}

#[test]
fn simulate_writes_no_colour_codes_to_a_pipe() {
    let d = support::Daemon::start();
    let mut sim = Command::new(support::BIN)
        .args(["simulate", "--devices", "2", "--server"])
        .arg(d.coap.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "debug")
        .spawn()
        .unwrap();
    let listed = support::eventually(Duration::from_secs(20), || {
        d.get("/v2/endpoints").json().as_array().is_some_and(|a| {
            a.iter()
                .filter(|e| e["name"].as_str().is_some_and(|n| n.starts_with("sim-")))
                .count()
                == 2
        })
    });
    assert!(listed, "the simulated devices did not register");
    // Ctrl-C: de-registers and prints its report.
    let ok = Command::new("kill")
        .args(["-INT", &sim.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok);
    let mut out = Vec::new();
    sim.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    sim.stderr.take().unwrap().read_to_end(&mut out).unwrap();
    sim.wait().unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("devices registered"), "{text}");
    assert!(
        !out.contains(&0x1b),
        "ESC in the output of simulate on a pipe:\n{text:?}"
    );
}

#[test]
fn an_auth_backend_not_enabled_is_not_started_and_makes_no_keys() {
    // The harness's configuration leaves `[plugins] auth` at its default, ["connector"].
    let d = support::Daemon::start();
    let log = d.logs();
    for other in ["pelion", "losant", "headerkeys"] {
        let started: Vec<&String> = log
            .iter()
            .filter(|l| {
                l.contains(&format!("plugin={other}"))
                    || l.contains(&format!("auth plugin {other} "))
            })
            .collect();
        assert!(started.is_empty(), "{other} was started: {started:#?}");
    }
    assert!(
        !log.iter().any(|l| l.contains("generated random keys")),
        "{}",
        log.join("\n")
    );
    // Its routes are not served either (the Pelion key routes, the header keys' areas).
    assert_eq!(d.get("/v2/endpoints").status, 200);
    let r = d.get("/pelion/v1/users");
    assert_eq!(r.status, 404, "{}", r.body);
    // `connectord plugin-call` still reaches it: the operator asks for it by name.
    let keys = support::plugin_call(
        &d.config_path,
        "headerkeys",
        "show_keys",
        &serde_json::json!({}),
    );
    assert!(keys.is_object(), "{keys}");
}
