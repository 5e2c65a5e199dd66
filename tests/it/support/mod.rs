//! The testkit (`daemon/testkit`) bound to this package's `connectord` binary, plus what
//! only these tests need: plugin builds under the cargo target directory and the device
//! peers of tests/peers/ ([`peers`]).
#![allow(dead_code)]

pub mod peers;

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Command;

pub use connectord_testkit::{
    Events, Http, Ready, b64, bearer_call, coap, eventually, http, http_get, receiver, test_config,
};
use connectord_testkit::{Launch, StartError};

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_connectord");

fn started(r: Result<connectord_testkit::Daemon, StartError>) -> Daemon {
    Daemon(r.unwrap_or_else(|e| panic!("{e}")))
}

/// A running daemon of [`BIN`] with its own state directory ([`connectord_testkit::Daemon`],
/// whose methods it has).
pub struct Daemon(pub connectord_testkit::Daemon);

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with("")
    }

    /// Starts with the test configuration plus `extra` TOML (whole sections).
    pub fn start_with(extra: &str) -> Daemon {
        Daemon::start_custom("", extra)
    }

    /// Starts with `coap` lines added to the `[coap]` section and `extra` sections.
    pub fn start_custom(coap: &str, extra: &str) -> Daemon {
        Daemon::start_env(coap, extra, &[])
    }

    /// As [`Daemon::start_custom`], with extra environment variables.
    pub fn start_env(coap: &str, extra: &str, env: &[(&str, &str)]) -> Daemon {
        let launch = env
            .iter()
            .fold(Launch::new(BIN).coap(coap).extra(extra), |l, (k, v)| {
                l.env(k, v)
            });
        started(launch.start())
    }

    /// Started in this process (`connectord::daemon::start`, see the testkit's
    /// `Launch::in_process`): for areas that need no signals, no `kill -9`, no log and no
    /// environment of the daemon (tests/it/main.rs says which).
    pub fn in_process() -> Daemon {
        Daemon::in_process_with("")
    }

    /// [`Daemon::in_process`] with the test configuration plus `extra` TOML.
    pub fn in_process_with(extra: &str) -> Daemon {
        started(Launch::new(BIN).extra(extra).in_process().start())
    }

    /// SIGTERM, a clean exit, then start again on the same state directory and
    /// configuration.
    pub fn stop_and_restart(self) -> Daemon {
        Daemon(self.0.stop_and_restart())
    }

    /// SIGTERM, wait for the clean stop, run `edit` on the state directory, then start
    /// again on it.
    pub fn stop_edit_restart(self, edit: impl FnOnce(&Path)) -> Daemon {
        Daemon(self.0.stop_edit_restart(edit))
    }

    /// `kill -9`, then start again on the same state directory and configuration.
    pub fn crash_and_restart(self) -> Daemon {
        Daemon(self.0.crash_and_restart())
    }
}

impl Deref for Daemon {
    type Target = connectord_testkit::Daemon;
    fn deref(&self) -> &connectord_testkit::Daemon {
        &self.0
    }
}

impl DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut connectord_testkit::Daemon {
        &mut self.0
    }
}

/// A state directory and configuration for [`BIN`], before the daemon starts (to run CLI
/// commands against them first).
pub struct Prepared(pub connectord_testkit::Prepared);

impl Prepared {
    pub fn new(coap: &str, extra: &str) -> Prepared {
        Prepared(
            Launch::new(BIN)
                .coap(coap)
                .extra(extra)
                .prepare()
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    pub fn start(self) -> Daemon {
        started(self.0.start())
    }

    /// Starts the daemon in this process (see [`Daemon::in_process`]).
    pub fn start_in_process(self) -> Daemon {
        started(self.0.in_process().start())
    }
}

impl Deref for Prepared {
    type Target = connectord_testkit::Prepared;
    fn deref(&self) -> &connectord_testkit::Prepared {
        &self.0
    }
}

/// `connectord plugin-call --config <config> <plugin> <op> <input>` (its own process,
/// whether a daemon runs on that state or not); returns its JSON answer.
pub fn plugin_call(
    config: &Path,
    plugin: &str,
    op: &str,
    input: &serde_json::Value,
) -> serde_json::Value {
    connectord_testkit::plugin_call(Path::new(BIN), config, plugin, op, input)
}

/// Builds a plugin crate of this workspace as a `.so` (in a target directory of its own,
/// so as not to wait for the lock of the `cargo test` that runs us) and returns a private
/// copy of it: later builds of other variants overwrite the original.
pub fn build_plugin(package: &str, env: &[(&str, &str)]) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let lock = std::fs::File::create(base.join("plugin-build.lock")).unwrap();
    lock.lock().expect("lock plugin builds");
    let target = base.join("plugin-build");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--quiet", "-p", package])
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("CONNECTORD_EXAMPLE_VARIANT")
        .env_remove("CONNECTORD_EXAMPLE_ABI")
        .env_remove("CONNECTORD_EXAMPLE_PANIC");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "building plugin {package} failed");
    let file = format!("lib{}.so", package.replace('-', "_"));
    let variant: String = env.iter().map(|(k, v)| format!("-{k}={v}")).collect();
    let copy = base.join(format!("{file}{variant}"));
    std::fs::copy(target.join("debug").join(&file), &copy).expect("copy the built plugin");
    copy
}

/// Builds the crate in `dir` (outside this workspace, with this workspace's `Cargo.lock`
/// copied in so that it builds offline with the versions already fetched) into the
/// plugin build's target directory, and returns its `file` (`lib<crate>.so`).
pub fn build_crate_outside(dir: &Path, file: &str) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let lock = std::fs::File::create(base.join("plugin-build.lock")).unwrap();
    lock.lock().expect("lock plugin builds");
    let target = base.join("plugin-build");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(dir)
        .args(["build", "--quiet", "--offline"])
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("run cargo build");
    assert!(
        out.status.success(),
        "building {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("debug").join(file)
}

/// Puts a plugin file into `dir` under its proper name, atomically (write a hidden
/// temporary file, then rename), as a package upgrade would.
pub fn install_plugin(built: &Path, dir: &Path, file_name: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = dir.join(format!(".{file_name}.tmp"));
    std::fs::copy(built, &tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::rename(&tmp, dir.join(file_name)).unwrap();
}
