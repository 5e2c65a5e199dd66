//! A real browser for the web console's test: Debian's Chromium, driven by Playwright
//! (`playwright-core` from npm, which downloads no browser of its own).
//!
//! Chromium is installed with apt-get when it is missing and the tests run as root (as CI
//! does); otherwise the test fails with the command to run: a console test that cannot
//! run must fail, never skip. `playwright-core` is installed once into a directory under
//! the cargo target directory, guarded by a file lock so parallel tests share it.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{apt_install, is_root};

/// The Playwright version the console test is written against.
pub const PLAYWRIGHT: &str = "playwright-core@1.65.1";

const CHROMIUM: &str = "/usr/bin/chromium";

/// Debian's Chromium (`/usr/bin/chromium`), installed with `chromium-driver` if missing.
pub fn chromium() -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let lock = std::fs::File::create(base.join("chromium.lock")).unwrap();
    lock.lock().expect("lock");
    if Path::new(CHROMIUM).exists() {
        return CHROMIUM.into();
    }
    assert!(
        is_root(),
        "{CHROMIUM} is missing: run `sudo apt-get install chromium chromium-driver`"
    );
    apt_install(&["chromium", "chromium-driver"]);
    CHROMIUM.into()
}

/// Node.js: `node` on the PATH, installed with apt-get (Debian's `nodejs`, `npm`) if
/// missing and root.
pub fn node() -> PathBuf {
    let works = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !works("node") || !works("npm") {
        assert!(
            is_root(),
            "node and npm are needed: run `sudo apt-get install nodejs npm`"
        );
        apt_install(&["nodejs", "npm"]);
    }
    PathBuf::from("node")
}

/// The directory of the `playwright-core` package, installed from npm on first use.
pub fn playwright() -> PathBuf {
    node();
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let dir = base.join("console-playwright");
    let lock = std::fs::File::create(base.join("console-playwright.lock")).unwrap();
    lock.lock().expect("lock");
    let package = dir.join("node_modules/playwright-core");
    let version = PLAYWRIGHT.rsplit('@').next().unwrap_or_default();
    let installed = std::fs::read_to_string(package.join("package.json"))
        .is_ok_and(|p| p.contains(&format!("\"version\": \"{version}\"")));
    if !installed {
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--no-save",
                "--loglevel=error",
                "--prefix",
            ])
            .arg(&dir)
            .arg(PLAYWRIGHT)
            .status()
            .expect("npm")
            .success();
        assert!(
            ok,
            "npm install {PLAYWRIGHT} failed (the npm registry must be reachable)"
        );
    }
    package
}
