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
    python_venv("aiocoap", AIOCOAP, "aiocoap")
}

/// The schemathesis version the API fuzzing test runs.
pub const SCHEMATHESIS: &str = "schemathesis==4.32.5";

/// A virtual environment under the cargo target directory named `name`, with
/// `requirement` installed from PyPI (once; guarded by a file lock so parallel tests share
/// it); `module` is imported to check it is there. Returns its Python interpreter.
pub fn python_venv(name: &str, requirement: &str, module: &str) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let venv = base.join(format!("pyenv-{name}"));
    let python = venv.join("bin/python");
    let lock = std::fs::File::create(base.join(format!("pyenv-{name}.lock"))).unwrap();
    lock.lock().expect("lock the venv");
    let ready = python.exists()
        && Command::new(&python)
            .args(["-c", &format!("import {module}")])
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
                requirement,
            ])
            .status()
            .expect("pip")
            .success();
        assert!(
            ok,
            "pip install {requirement} failed (PyPI must be reachable)"
        );
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
    let root = super::is_root();
    assert!(
        root,
        "{BIN} is missing: run `sudo apt-get install libcoap3-bin`"
    );
    super::apt_install(&["libcoap3-bin"]);
    BIN.into()
}

/// Runs libcoap's client ([`libcoap_client`]) with `args`; returns how it exited and all it
/// printed (stdout, then stderr: libcoap logs the messages it sends and receives there).
pub fn libcoap_run(args: &[&str]) -> (std::process::ExitStatus, String) {
    let out = Command::new(libcoap_client())
        .args(args)
        .output()
        .expect("run coap-client");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, all)
}

/// Runs libcoap's client with `-v 6 -B 10` (logging its messages, giving up after 10 s)
/// and `args`, asserting that it succeeded; returns all it logged.
pub fn libcoap_log(args: &[&str]) -> String {
    let (status, all) = libcoap_run(&[&["-v", "6", "-B", "10"], args].concat());
    assert!(status.success(), "coap-client failed: {all}");
    all
}

/// As [`libcoap_log`], returning the line of the answer it logged (`t:ACK`).
pub fn libcoap_ack(args: &[&str]) -> String {
    let all = libcoap_log(args);
    all.lines()
        .find(|l| l.contains("t:ACK"))
        .unwrap_or_else(|| panic!("no ACK in:\n{all}"))
        .to_string()
}

/// The aiocoap LwM2M device (tests/peers/aiocoap_lwm2m_device.py), running, with its
/// stdout JSON lines collected.
pub struct Lwm2mDevice {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    pub location: String,
}

impl Lwm2mDevice {
    /// Starts the device against `server` with endpoint name `ep` and extra arguments, and
    /// waits until it registered.
    pub fn start(server: std::net::SocketAddr, ep: &str, extra: &[&str]) -> Lwm2mDevice {
        use std::io::BufRead;
        let python = aiocoap_python();
        let mut child = Command::new(python)
            .arg(script("aiocoap_lwm2m_device.py"))
            .args(["--server", &server.to_string(), "--ep", ep])
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start the aiocoap device");
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(v) = serde_json::from_str(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        let mut d = Lwm2mDevice {
            child,
            stdin,
            lines,
            location: String::new(),
        };
        let reg = d.wait_event(std::time::Duration::from_secs(30), |e| {
            e["event"] == "registered" || e["event"] == "error"
        });
        assert_eq!(reg["event"], "registered", "{reg}");
        d.location = reg["location"].as_str().unwrap().to_string();
        d
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for an output line matching `f`.
    pub fn wait_event(
        &self,
        timeout: std::time::Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(e) = self.events().into_iter().find(|e| f(e)) {
                return e;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "device events so far: {:?}",
                self.events()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Sends a stdin command (`update`, `notify`, `deregister`, ...).
    pub fn command(&mut self, cmd: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{cmd}").expect("write command");
        stdin.flush().unwrap();
    }
}

impl Drop for Lwm2mDevice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// wolfSSL's DTLS 1.2 client with RFC 9146 Connection ID (tests/peers/wolfssl-cid/client.c),
/// built once under the cargo target directory (guarded by a file lock). wolfSSL's source
/// comes from crates.io inside the crate `wolfssl-sys` (`cargo fetch --locked` on
/// tests/peers/wolfssl-cid/Cargo.toml, the same version every time); it is compiled with
/// gcc and that folder's `user_settings.h`, which turns the Connection ID on (neither the
/// crate's own build nor Debian's libwolfssl has it). Needs crates.io (or the cargo
/// cache) and gcc; fails otherwise.
pub fn wolfssl_cid_client() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/peers/wolfssl-cid");
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let out = base.join("wolfssl-cid");
    std::fs::create_dir_all(&out).unwrap();
    let lock = std::fs::File::create(base.join("wolfssl-cid.lock")).unwrap();
    lock.lock().expect("lock");
    let bin = out.join("wolfssl-cid-client");
    // Rebuilt when an input of ours is newer than the binary.
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let built = modified(&bin);
    if built.is_some()
        && ["client.c", "user_settings.h", "Cargo.lock"]
            .iter()
            .all(|f| modified(&dir.join(f)) <= built)
    {
        return bin;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = dir.join("Cargo.toml");
    let ok = Command::new(&cargo)
        .args(["fetch", "--locked", "--manifest-path"])
        .arg(&manifest)
        .status()
        .expect("cargo fetch")
        .success();
    assert!(
        ok,
        "cargo fetch of wolfssl-sys failed (crates.io must be reachable)"
    );
    let meta = Command::new(&cargo)
        .args([
            "metadata",
            "--locked",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(&manifest)
        .output()
        .expect("cargo metadata");
    assert!(
        meta.status.success(),
        "cargo metadata of {}",
        manifest.display()
    );
    let meta: serde_json::Value = serde_json::from_slice(&meta.stdout).expect("metadata JSON");
    let src = meta["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "wolfssl-sys"))
        .and_then(|p| p["manifest_path"].as_str())
        .map(|m| PathBuf::from(m).with_file_name("wolfssl-src"))
        .expect("wolfssl-sys in cargo metadata");
    let mut sources: Vec<PathBuf> = ["src", "wolfcrypt/src"]
        .iter()
        .flat_map(|d| std::fs::read_dir(src.join(d)).expect("wolfSSL source"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "c"))
        .collect();
    sources.sort();
    let include = |c: &mut Command| {
        c.arg("-O1")
            .arg("-DWOLFSSL_USER_SETTINGS")
            .arg("-I")
            .arg(&dir)
            .arg("-I")
            .arg(&src);
    };
    // Compiled two at a time (the machines have few cores); files of features that are
    // off compile to nothing.
    let mut objects = Vec::new();
    for chunk in sources.chunks(2) {
        let children: Vec<_> = chunk
            .iter()
            .map(|c| {
                let o = out.join(c.file_stem().unwrap()).with_extension("o");
                let mut cmd = Command::new("gcc");
                include(&mut cmd);
                let child = cmd
                    .arg("-w")
                    .arg("-c")
                    .arg(c)
                    .arg("-o")
                    .arg(&o)
                    .spawn()
                    .expect("gcc (install gcc)");
                objects.push(o);
                (c, child)
            })
            .collect();
        for (c, mut child) in children {
            assert!(child.wait().unwrap().success(), "gcc {}", c.display());
        }
    }
    let mut link = Command::new("gcc");
    include(&mut link);
    let ok = link
        .arg("-Wall")
        .arg(dir.join("client.c"))
        .args(&objects)
        .args(["-lm", "-o"])
        .arg(&bin)
        .status()
        .expect("gcc")
        .success();
    assert!(ok, "linking the wolfSSL client failed");
    bin
}
