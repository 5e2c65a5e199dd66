//! `nats-server` processes for tests (issue 22): one server with JetStream, or a cluster of
//! three, each on loopback ports the test picked, with its store in a temporary directory,
//! killed when dropped.
//!
//! Decision: this file uses only `std` and `tempfile`, so that the store crate's tests can
//! include it as a module (`#[path = "../../testkit/src/nats.rs"]`) without depending on
//! this crate, which depends on the daemon and so on the store (a dev-dependency cycle
//! would build the whole daemon for the store's tests). The end-to-end tests use it as
//! `connectord_testkit::nats`.
//!
//! nats-server cannot listen on port 0 and say which port it got, so a port is picked by
//! binding a listener to `127.0.0.1:0`, reading its port and closing it before the server
//! starts; if the server then fails to start (the port was taken meanwhile), it is started
//! again on other ports. Port 4222 (the machine's own server) is never used. The binary is
//! `/usr/sbin/nats-server` (Debian's package `nats-server`, 2.9 on bookworm; installed if
//! missing), or `$NATS_SERVER`.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server (or every server of a cluster) may take to answer healthy.
pub const READY_WITHIN: Duration = Duration::from_secs(30);

/// The nats-server binary. Debian's, when it is missing, is installed once with
/// `apt-get install nats-server` (as the tests do for libcoap; works as root).
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return PathBuf::from(p);
    }
    let path = PathBuf::from("/usr/sbin/nats-server");
    static INSTALL: std::sync::Once = std::sync::Once::new();
    if !path.exists() {
        INSTALL.call_once(|| {
            apt_install(&["nats-server"]);
        });
    }
    path
}

/// A free loopback port, never 4222.
fn free_port() -> std::io::Result<u16> {
    loop {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        if port != 4222 {
            return Ok(port);
        }
    }
}

/// One server's ports and name, kept to start it again on the same ones.
#[derive(Debug, Clone)]
struct Ports {
    client: u16,
    monitor: u16,
    cluster: Option<u16>,
}

/// One nats-server process with JetStream, killed (SIGKILL) when dropped.
pub struct NatsServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    name: String,
    ports: Ports,
    /// The other servers' cluster ports (routes), for a cluster member.
    routes: Vec<u16>,
}

impl NatsServer {
    /// A single server with JetStream on its own ports, ready (healthy) when this returns.
    pub fn start() -> std::io::Result<NatsServer> {
        for attempt in 0..3 {
            let ports = Ports {
                client: free_port()?,
                monitor: free_port()?,
                cluster: None,
            };
            let mut s = NatsServer {
                child: None,
                dir: tempfile::tempdir()?,
                name: "n0".into(),
                ports,
                routes: Vec::new(),
            };
            s.spawn()?;
            match s.wait_ready(READY_WITHIN) {
                Ok(()) => return Ok(s),
                Err(e) if attempt < 2 => eprintln!("nats-server did not start ({e}); again"),
                Err(e) => return Err(e),
            }
        }
        unreachable!()
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let mut cmd = Command::new(binary());
        cmd.arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.ports.client.to_string())
            .arg("-m")
            .arg(self.ports.monitor.to_string())
            .arg("-n")
            .arg(&self.name)
            .arg("-js")
            .arg("-sd")
            .arg(self.dir.path().join("js"));
        if let Some(cluster) = self.ports.cluster {
            let routes: Vec<String> = self
                .routes
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            cmd.arg("--cluster")
                .arg(format!("nats://127.0.0.1:{cluster}"))
                .arg("--cluster_name")
                .arg("connectord-test")
                .arg("--routes")
                .arg(routes.join(","));
        }
        let log = std::fs::File::create(self.dir.path().join("server.log"))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot start {}: {e}", binary().display()),
            )
        })?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the server answers `GET /healthz` with 200 (JetStream ready, and in a
    /// cluster in contact with a meta leader), at most `within`.
    fn wait_ready(&mut self, within: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                return Err(std::io::Error::other(format!(
                    "nats-server exited ({status}): {}",
                    self.log()
                )));
            }
            if healthz(self.ports.monitor).unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("nats-server not healthy within {within:?}: {}", self.log()),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The tail of the server's log (without the lines of a route it retries, which a
    /// killed cluster member makes once a second).
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.contains("Error trying to connect to route"))
            .collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.ports.client)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn port(&self) -> u16 {
        self.ports.client
    }

    /// The server's name (`-n`: `n0`, `n1`, `n2` in a cluster).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The monitoring port (`-m`: `/healthz`, `/jsz`).
    pub fn monitor_port(&self) -> u16 {
        self.ports.monitor
    }

    /// Kills the server with SIGKILL and waits for it to end.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports with the same store, ready when this
    /// returns (a cluster member: once it is healthy again).
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_ready(READY_WITHIN)
    }

    /// Starts the server again on the same ports with an empty JetStream store, as a
    /// server brought back on a new disk or without its store directory: everything it
    /// held is lost. Ready when this returns.
    pub fn restart_empty(&mut self) -> std::io::Result<()> {
        self.kill();
        let store = self.dir.path().join("js");
        if store.exists() {
            std::fs::remove_dir_all(&store)?;
        }
        self.spawn()?;
        self.wait_ready(READY_WITHIN)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The first string value of the field `field` in `json` (no JSON parser here: this file
/// uses only `std`, see the module documentation).
fn value_after(json: &str, field: &str) -> Option<String> {
    let key = format!("\"{field}\"");
    let at = json.find(&key)?;
    let name: String = json[at + key.len()..]
        .trim_start_matches([' ', ':', '"'])
        .chars()
        .take_while(|c| *c != '"')
        .collect();
    (!name.is_empty()).then_some(name)
}

/// The body of `GET <path>` on a monitoring port (HTTP/1.0, so not chunked).
fn get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

/// Whether `GET /healthz` on the monitoring port answers 200.
fn healthz(port: u16) -> std::io::Result<bool> {
    let mut s = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200"))
}

/// Three nats-server processes routed into one JetStream cluster (`connectord-test`),
/// each on its own loopback ports.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts three servers and waits until each is healthy (a meta leader elected).
    pub fn start() -> std::io::Result<NatsCluster> {
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start() {
                Ok(c) => return Ok(c),
                Err(e) => {
                    eprintln!("nats cluster did not start ({e}); again");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no cluster")))
    }

    fn try_start() -> std::io::Result<NatsCluster> {
        let mut ports = Vec::new();
        for _ in 0..3 {
            ports.push(Ports {
                client: free_port()?,
                monitor: free_port()?,
                cluster: Some(free_port()?),
            });
        }
        let cluster_ports: Vec<u16> = ports.iter().filter_map(|p| p.cluster).collect();
        let mut servers = Vec::new();
        for (i, p) in ports.into_iter().enumerate() {
            let routes = cluster_ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| *p)
                .collect();
            let mut s = NatsServer {
                child: None,
                dir: tempfile::tempdir()?,
                name: format!("n{i}"),
                ports: p,
                routes,
            };
            s.spawn()?;
            servers.push(s);
        }
        for s in &mut servers {
            s.wait_ready(READY_WITHIN)?;
        }
        Ok(NatsCluster { servers })
    }

    /// Every server's URL.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// The index in [`NatsCluster::servers`] of the leader of the stream `stream` (a KV
    /// bucket `b` is the stream `KV_b`), as a running server's
    /// `GET /jsz?accounts=true&streams=true` names it; None when no running server does.
    pub fn stream_leader(&mut self, stream: &str) -> Option<usize> {
        let needle = format!("\"{stream}\"");
        let mut leader = None;
        for s in &mut self.servers {
            if !s.is_running() {
                continue;
            }
            let Ok(body) = get(s.ports.monitor, "/jsz?accounts=true&streams=true") else {
                continue;
            };
            let Some(at) = body.find(&needle) else {
                continue;
            };
            if let Some(name) = value_after(&body[at..], "leader") {
                leader = Some(name);
                break;
            }
        }
        let leader = leader?;
        self.servers.iter().position(|s| s.name == leader)
    }

    /// The index in [`NatsCluster::servers`] of the JetStream meta leader, as a running
    /// server's `GET /jsz` names it (`"meta_cluster": {"leader": "n1", ...}`); None when
    /// no running server names one.
    pub fn meta_leader(&mut self) -> Option<usize> {
        let mut leader = None;
        for s in &mut self.servers {
            if !s.is_running() {
                continue;
            }
            let Ok(body) = get(s.ports.monitor, "/jsz") else {
                continue;
            };
            if let Some(name) = value_after(&body, "leader") {
                leader = Some(name);
                break;
            }
        }
        let leader = leader?;
        self.servers.iter().position(|s| s.name == leader)
    }
}

/// `apt-get install -y` of `packages` (noninteractive, as root), once more after
/// `apt-get update` if it fails (a fresh machine may have no package lists yet); false if
/// it still does. Installs are serialized in this process (tests run in parallel and
/// several may need a package at once), and each waits for dpkg's lock up to 10 minutes
/// rather than failing at once when another process (another test binary, the machine's
/// own updates) holds it.
pub fn apt_install(packages: &[&str]) -> bool {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=600"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let install = || apt(&[&["install", "-y", "-q"][..], packages].concat());
    install() || {
        apt(&["update", "-q"]);
        install()
    }
}
