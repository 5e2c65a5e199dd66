//! What the failover and load-balancer tests (`tests/it/cluster_failover.rs`, issue 22)
//! share: nodes on a three-server NATS cluster, CoAP and HTTP calls that report a missing
//! answer instead of panicking (a killed node answers nothing, and the tests count that),
//! and nginx with the stream module.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use coap_lite::{ContentFormat, MessageClass, Packet, RequestType, ResponseType};

use super::{Daemon, Prepared, coap};

/// The objects of every test device (one observable resource).
pub const LINKS: &str = "</1/0>,</3/0>,</3303/0/5700>;obs,</5/0>";

/// The `[cluster]` section of node `node` on the servers `urls`, with three replicas on
/// three servers (one on one), and the default 5 s timeout (the first start creates every
/// bucket with three replicas: on a loaded machine that took longer than the 2 s of
/// `tests/it/cluster.rs`); long-polls are held 2 s at most.
pub fn node_config(urls: &[String], node: &str) -> String {
    let section =
        crate::cluster::cluster(urls, node).replace("timeout_ms = 2000", "timeout_ms = 5000");
    let replicas = if urls.len() >= 3 { 3 } else { 1 };
    // Long-polls held 2 s at most, so that a test's waits for events stay bounded.
    format!("{section}replicas = {replicas}\n[notifications]\nlong_poll_s = 2\n")
}

/// Starts the nodes `names` on `urls`: the first alone (it writes `admin.key`), the others
/// at once with its CA copied into their state directories and its admin key.
pub fn start_nodes(urls: &[String], names: &[&str]) -> Vec<Daemon> {
    // The first start creates every bucket and stream with three replicas; right after
    // the servers elected their meta leader that can time out on a loaded machine (seen:
    // "bucket cd_registrations: jetstream request timed out"), which refuses the start as
    // it should.
    let first = start_retrying(urls, names[0], None);
    let ca = first.state_dir();
    let key = first.key.clone();
    let others: Vec<Daemon> = std::thread::scope(|s| {
        let handles: Vec<_> = names[1..]
            .iter()
            .map(|name| {
                let ca = ca.clone();
                let key = key.clone();
                s.spawn(move || {
                    let p = Prepared::new("", &node_config(urls, name));
                    crate::cluster::copy_ca(&ca, &p.0.dir.path().join("state"));
                    let mut d = p.start();
                    d.key = key;
                    d
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all = vec![first];
    all.extend(others);
    all
}

/// Starts node `name` on `urls` (with the CA of the state directory `ca`, if given),
/// trying again at most three times, printing why, when the start is refused: a node
/// that cannot use JetStream within its cluster timeout refuses to start, as it should,
/// and on a loaded machine that happens right after the servers elected a leader (the
/// first start) or lost one of them (seen in CI: a node started after a nats-server was
/// killed, "watching cd_registrations: timed out").
pub fn start_retrying(urls: &[String], name: &str, ca: Option<&std::path::Path>) -> Daemon {
    let mut tries = 0;
    loop {
        tries += 1;
        let p = Prepared::new("", &node_config(urls, name));
        if let Some(ca) = ca {
            crate::cluster::copy_ca(ca, &p.0.dir.path().join("state"));
        }
        match p.0.start() {
            Ok(d) => return Daemon(d),
            Err(e) if tries < 3 => println!("node {name} did not start ({e}); again"),
            Err(e) => panic!("node {name} did not start in three tries: {e}"),
        }
    }
}

/// One HTTP/1.0 request (the answer is never chunked) with a Bearer key; the status and
/// the body, or why there was none (connection refused, timeout). Unlike the testkit's
/// `http`, which panics, a failure here is a value the failover tests count.
pub fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    wait: Duration,
) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, wait).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(wait)).map_err(|e| e.to_string())?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Length: 0\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer: {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Sends `r` from `dev` and waits at most `wait` for the answer with its token; None when
/// none came (a killed node).
pub fn try_request(dev: &mut coap::Device, r: &coap::Req, wait: Duration) -> Option<Packet> {
    let p = dev.build(r);
    dev.send_raw(&p.to_bytes().unwrap());
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let bytes = dev.recv_raw(left.max(Duration::from_millis(1)))?;
        if let Ok(resp) = Packet::from_bytes(&bytes)
            && resp.get_token() == p.get_token()
            && matches!(resp.header.code, MessageClass::Response(_))
        {
            return Some(resp);
        }
    }
}

/// The response code of an answer.
pub fn code_of(p: &Packet) -> Option<ResponseType> {
    match p.header.code {
        MessageClass::Response(r) => Some(r),
        _ => None,
    }
}

/// Registers `dev` as `ep` (queue mode when `queue`, lifetime `lt` s); the registration
/// id when the answer was 2.01 Created within `wait`, else the answer's code or "no
/// answer".
pub fn try_register(
    dev: &mut coap::Device,
    ep: &str,
    lt: u32,
    queue: bool,
    wait: Duration,
) -> Result<String, String> {
    let ep = format!("ep={ep}");
    let lt = format!("lt={lt}");
    let mut query = vec![ep.as_str(), lt.as_str()];
    if queue {
        query.push("b=UQ");
    }
    let mut r = coap::Req::new(RequestType::Post, &["rd"]);
    r.query = &query;
    r.payload = LINKS.as_bytes();
    r.content_format = Some(ContentFormat::ApplicationLinkFormat);
    let resp = try_request(dev, &r, wait).ok_or_else(|| format!("no answer within {wait:?}"))?;
    match code_of(&resp) {
        Some(ResponseType::Created) => Ok(coap::location(&resp)),
        other => Err(format!("{other:?} {}", coap::diag(&resp))),
    }
}

/// An update (`POST /rd/{reg}`, no payload): answered 2.04 Changed within `wait`, or the
/// answer's code or "no answer".
pub fn try_update(dev: &mut coap::Device, reg: &str, wait: Duration) -> Result<(), String> {
    let path = ["rd", reg];
    let r = coap::Req::new(RequestType::Post, &path);
    let resp = try_request(dev, &r, wait).ok_or_else(|| format!("no answer within {wait:?}"))?;
    match code_of(&resp) {
        Some(ResponseType::Changed) => Ok(()),
        other => Err(format!("{other:?} {}", coap::diag(&resp))),
    }
}

/// The nginx configuration of docs/cluster.md: `etc/nginx/connectord-coap-udp.conf`.
pub const NGINX_CONF: &str = include_str!("../../../etc/nginx/connectord-coap-udp.conf");

/// nginx running the configuration `stream` (a top-level `stream { }` block) in a
/// temporary directory of its own, in the foreground, killed when dropped.
pub struct Nginx {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts [`nginx`] with `stream` included by a minimal `nginx.conf` (the stream
    /// module loaded, pid and logs in its directory, one process); fails the test when it
    /// does not start, with its error log, except for a port another test took since it
    /// was chosen (`Err` with the log: the caller chooses another).
    pub fn start(stream: &str) -> Result<Nginx, String> {
        let bin = nginx();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(p.join("connectord-coap-udp.conf"), stream).unwrap();
        std::fs::write(
            p.join("nginx.conf"),
            format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                 daemon off;\nmaster_process off;\npid {pid};\n\
                 error_log {log} info;\nevents {{ worker_connections 1024; }}\n\
                 include {conf};\n",
                pid = p.join("nginx.pid").display(),
                log = p.join("error.log").display(),
                conf = p.join("connectord-coap-udp.conf").display(),
            ),
        )
        .unwrap();
        let out = Command::new(&bin)
            .arg("-t")
            .arg("-e")
            .arg(p.join("error.log"))
            .arg("-p")
            .arg(p)
            .arg("-c")
            .arg(p.join("nginx.conf"))
            .output()
            .expect("run nginx -t");
        assert!(
            out.status.success(),
            "nginx -t refuses the configuration: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let child = Command::new(&bin)
            .arg("-e")
            .arg(p.join("error.log"))
            .arg("-p")
            .arg(p)
            .arg("-c")
            .arg(p.join("nginx.conf"))
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start nginx");
        let mut n = Nginx { child, dir };
        let t = Instant::now();
        while !n.log().contains("start worker process") && !n.log().contains("using the ") {
            if let Ok(Some(status)) = n.child.try_wait() {
                let log = n.log();
                if log.contains("Address already in use") {
                    return Err(log);
                }
                panic!("nginx exited ({status}): {log}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "nginx did not start: {}",
                n.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(n)
    }

    /// nginx's error log (at level info: sessions, upstream errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's nginx with the stream module (`nginx`, `libnginx-mod-stream`): installed with
/// apt-get when missing, as the tests install libcoap (root, as CI runs; otherwise the
/// test fails naming the command). Returns the binary. Never skips: a test that needs
/// nginx fails without it.
pub fn nginx() -> PathBuf {
    const BIN: &str = "/usr/sbin/nginx";
    const MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let lock = std::fs::File::create(base.join("nginx.lock")).unwrap();
    lock.lock().expect("lock");
    let present = || std::path::Path::new(BIN).exists() && std::path::Path::new(MODULE).exists();
    if present() {
        return BIN.into();
    }
    let root = super::is_root();
    assert!(
        root,
        "{BIN} or {MODULE} is missing: run `sudo apt-get install nginx libnginx-mod-stream`"
    );
    super::apt_install(&["nginx", "libnginx-mod-stream"]);
    assert!(
        present(),
        "nginx installed, but {BIN} or {MODULE} is missing"
    );
    BIN.into()
}
