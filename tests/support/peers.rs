//! CoAP stacks nobody here wrote, installed on demand for the tests that use them.
//!
//! aiocoap comes from PyPI into a virtual environment under the cargo target directory
//! (created once, guarded by a file lock so parallel tests share it).

use std::path::PathBuf;
use std::process::Command;

/// The aiocoap version the peer tests are written against.
pub const AIOCOAP: &str = "aiocoap==0.4.17";

/// Python interpreter of a virtual environment with aiocoap installed.
pub fn aiocoap_python() -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let venv = base.join("pyenv-aiocoap");
    let python = venv.join("bin/python");
    let lock = std::fs::File::create(base.join("pyenv-aiocoap.lock")).unwrap();
    lock.lock().expect("lock the venv");
    let ready = python.exists()
        && Command::new(&python)
            .args(["-c", "import aiocoap"])
            .status()
            .is_ok_and(|s| s.success());
    if !ready {
        let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let ok = Command::new(&py)
            .args(["-m", "venv", "--clear"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv (install python3 and python3-venv)")
            .success();
        assert!(ok, "creating the virtual environment failed");
        let ok = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                AIOCOAP,
            ])
            .status()
            .expect("pip")
            .success();
        assert!(ok, "pip install {AIOCOAP} failed (PyPI must be reachable)");
    }
    python
}

/// Path of a script in tests/peers/.
pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/peers")
        .join(name)
}

/// libcoap's `coap-client-notls` (Debian package `libcoap3-bin`). When it is missing and
/// the tests run as root (as CI does), it is installed with apt-get; otherwise the test
/// fails with the command to run.
pub fn libcoap_client() -> PathBuf {
    const BIN: &str = "/usr/bin/coap-client-notls";
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let lock = std::fs::File::create(base.join("libcoap.lock")).unwrap();
    lock.lock().expect("lock");
    if std::path::Path::new(BIN).exists() {
        return BIN.into();
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    assert!(
        root,
        "{BIN} is missing: run `sudo apt-get install libcoap3-bin`"
    );
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "libcoap3-bin"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        // A fresh machine may have no package lists yet.
        let _ = Command::new("apt-get").args(["update", "-q"]).status();
        assert!(install(), "apt-get install libcoap3-bin failed");
    }
    BIN.into()
}
