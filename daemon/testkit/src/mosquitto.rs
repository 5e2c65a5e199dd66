//! A Mosquitto broker of a test's own, a `mosquitto_sub` reading what it gets, and a CA
//! with a server certificate for its TLS listener (issue 23, the MQTT sink's tests).
//!
//! Shared by the end-to-end tests (`connectord_testkit::mosquitto`) and the MQTT sink's unit
//! tests, which include this file with `#[path]` (the sink crate cannot depend on the
//! testkit, which depends on the daemon that links the sink). So it uses only `std`,
//! `tempfile` and `rcgen`. Needs Debian's `mosquitto` and `mosquitto-clients`, installed
//! with apt-get when missing and the tests run as root (as CI does; as another user a
//! missing one fails the test, naming the packages); every listener is on 127.0.0.1 on a
//! free port, never 1883.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Installs Debian's `mosquitto` and `mosquitto-clients` once if a program is missing
/// and this is root; else a missing program fails where it is started.
fn ensure_installed() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        let have = |p: &str| {
            Command::new("sh")
                .args(["-c", &format!("command -v {p}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if ["mosquitto", "mosquitto_sub", "mosquitto_pub"]
            .iter()
            .all(|p| have(p))
        {
            return;
        }
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        if !root {
            return;
        }
        let install = || {
            Command::new("apt-get")
                // Waits for dpkg's lock (another test binary may be installing).
                .args(["-o", "DPkg::Lock::Timeout=600"])
                .args(["install", "-y", "-q", "mosquitto", "mosquitto-clients"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !install() {
            let _ = Command::new("apt-get").args(["update", "-q"]).status();
            assert!(
                install(),
                "apt-get install mosquitto mosquitto-clients failed"
            );
        }
    });
}

/// A free TCP port on 127.0.0.1 (free when asked).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits up to 10 s until something accepts on 127.0.0.1:`port`.
pub fn wait_listening(port: u16) {
    let until = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A mosquitto of the test's own: an anonymous plain listener, optionally a TLS one, and
/// persistence in its directory (so that a restart keeps a subscriber's session and the
/// messages queued for it). Killed when dropped.
pub struct Mosquitto {
    child: Option<Child>,
    conf: PathBuf,
    /// The plain listener's port.
    pub port: u16,
    /// The TLS listener's port, when started with a [`Pki`].
    pub tls_port: Option<u16>,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts it and waits until every listener accepts.
    pub fn start(tls: Option<&Pki>) -> Mosquitto {
        ensure_installed();
        let dir = tempfile::tempdir().unwrap();
        // Started as root, mosquitto runs as the user `mosquitto`: its database directory
        // must be writable by it.
        let db = dir.path().join("db");
        std::fs::create_dir(&db).unwrap();
        std::fs::set_permissions(&db, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let port = free_port();
        let mut conf = format!(
            "persistence true\npersistence_location {}/\nallow_anonymous true\nlistener {port} 127.0.0.1\n",
            db.display()
        );
        let tls_port = tls.map(|pki| {
            let p = free_port();
            conf.push_str(&format!(
                "listener {p} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
                pki.cert.display(),
                pki.key.display()
            ));
            p
        });
        let path = dir.path().join("mosquitto.conf");
        std::fs::write(&path, conf).unwrap();
        let mut m = Mosquitto {
            child: None,
            conf: path,
            port,
            tls_port,
            _dir: dir,
        };
        m.run();
        m
    }

    /// Starts it (again, after [`Mosquitto::stop`]) on the same ports and database.
    pub fn run(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (Debian package mosquitto) must be installed");
        self.child = Some(child);
        for p in std::iter::once(self.port).chain(self.tls_port) {
            wait_listening(p);
        }
    }

    /// Stops it as an operator would (SIGTERM: it saves its sessions), and waits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `mosquitto_sub -v` at QoS 1 with a session that outlives its connection (`-c -i`, a
/// client id of its own): each message a `topic payload` line. Killed when dropped.
pub struct Subscriber {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Subscriber {
    /// Subscribes to `topic` (ending in `/#`) and returns once a message published to it
    /// now arrives (its probe, which [`Subscriber::next`] leaves out).
    pub fn start(port: u16, topic: &str) -> Subscriber {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = format!(
            "test-sub-{}-{port}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-v"])
            .args(["-c", "-i", &id, "-t", topic])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub (Debian package mosquitto-clients) must be installed");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let s = Subscriber { child, lines };
        let probe = format!("{}/probe", topic.trim_end_matches("/#"));
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let _ = Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
                .args(["-t", &probe, "-m", "probe"])
                .status();
            if s.lines.recv_timeout(Duration::from_millis(300)).is_ok() {
                break;
            }
            assert!(Instant::now() < until, "mosquitto_sub never subscribed");
        }
        s
    }

    /// The next line that is not a probe, waiting up to `wait`.
    pub fn next(&self, wait: Duration) -> Option<String> {
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            if !line.ends_with("/probe probe") {
                return Some(line);
            }
        }
    }

    /// The next `n` lines (probes left out), within 20 s in all.
    pub fn take(&self, n: usize) -> Vec<String> {
        let until = Instant::now() + Duration::from_secs(20);
        let mut got = Vec::new();
        while got.len() < n {
            let left = until.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(line) => got.push(line),
                None => panic!("{} of {n} messages came: {got:?}", got.len()),
            }
        }
        got
    }

    /// Asserts that no message comes within 300 ms.
    pub fn nothing_more(&self) {
        assert_eq!(self.next(Duration::from_millis(300)), None);
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA and a server certificate for `localhost` and 127.0.0.1 signed by it (rcgen), as
/// PEM files in a directory of its own.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

/// Makes a [`Pki`].
pub fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "connectord mqtt test CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer).unwrap();
    let p = Pki {
        ca: dir.path().join("ca.pem"),
        cert: dir.path().join("server.pem"),
        key: dir.path().join("server.key"),
        _dir: dir,
    };
    std::fs::write(&p.ca, ca_cert.pem()).unwrap();
    std::fs::write(&p.cert, cert.pem()).unwrap();
    std::fs::write(&p.key, key.serialize_pem()).unwrap();
    p
}
