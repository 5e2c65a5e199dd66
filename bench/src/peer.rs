//! `--peer`: the registration workload against a peer LwM2M server from a public
//! registry, lwm2m-node-lib (npm, Node.js; `bench/peer/`), and against connectord, in the
//! same run, as a ratio.
//!
//! Both sides get exactly the same load: the simulator started by [`Sims::start`] (the
//! registration scenario's code path: same device count, `register_rate` 0, at most
//! `simulate::MAX_IN_FLIGHT` registrations outstanding per bind address, the same
//! `--per-address` split over 127.0.0.x). lwm2m-node-lib has no metrics endpoint, so both
//! are timed by the simulator itself, on the bench's clock: from the first simulator's
//! "simulating N devices" (its sockets are open, the first registrations go out) to the
//! last 2.01 a device received. The rate is the devices registered over that time. The
//! times by which 50 % and 99 % of the devices were registered, and the moment the last
//! simulator concluded (every device registered or gave up after its retransmissions),
//! are reported too: a registration the server loses shows up as a failure and a late
//! conclusion, not as a slower rate. Neither server is polled while it registers. Each
//! side runs on a fresh server, one after the other (connectord first), never both at
//! once; each server's datagram counter shows the retransmissions it received.
//!
//! The simulator reports these moments only in its log, so the bench installs a
//! `tracing` subscriber that records the `connectord_sim` events it needs (and
//! nothing else) with the instant they happen: one debug event per registered device.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;
use tracing::level_filters::LevelFilter;
use tracing::span;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};

use super::{Args, Daemon, Row, Sims};

/// Where `bench/peer` is when the bench is built from this checkout.
const DEFAULT_PEER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/peer");
/// The script in the peer directory that runs lwm2m-node-lib's server.
const PEER_SCRIPT: &str = "lwm2m-node-server.js";
/// The simulator's module, the target of the events recorded.
const SIM_TARGET: &str = "connectord_sim";

/// Options of the peer comparison (flattened into the bench's arguments).
#[derive(Debug, clap::Args)]
pub struct PeerArgs {
    /// Compare registrations/s with a peer LwM2M server, lwm2m-node-lib (needs `node`;
    /// part of the default run when `node` is found).
    #[arg(long)]
    pub peer: bool,
    /// Devices registered on each side of the peer comparison (default: --devices).
    #[arg(long)]
    pub peer_devices: Option<usize>,
    /// Directory of the peer server (package.json, package-lock.json, lwm2m-node-server.js).
    #[arg(long, default_value = DEFAULT_PEER_DIR)]
    pub peer_dir: PathBuf,
}

/// Runs the comparison if asked (`--peer`) or if every scenario runs and `node` is there;
/// pushes its rows or a skipped row, or a failure.
pub(crate) fn scenario(args: &Args, all: bool, rows: &mut Vec<Row>, failures: &mut Vec<String>) {
    if !(all || args.peer.peer) {
        return;
    }
    let n = args.peer.peer_devices.unwrap_or(args.devices).max(1);
    let node = match node_version() {
        Ok(v) => v,
        Err(why) if !args.peer.peer => {
            eprintln!("peer comparison skipped: {why}");
            rows.push(Row {
                scenario: "registrations/s vs lwm2m-node-lib (skipped)".into(),
                value: f64::NAN,
                unit: "",
                target: None,
                detail: format!("skipped: {why}"),
            });
            return;
        }
        Err(why) => {
            failures.push(format!("peer comparison: {why}"));
            return;
        }
    };
    eprintln!(
        "peer comparison: {n} devices against connectord, then lwm2m-node-lib (node {node}) …"
    );
    match run(args, n) {
        Ok(r) => rows.extend(r.rows(&node)),
        Err(e) => failures.push(format!("peer comparison with {n} devices: {e:#}")),
    }
}

// ----------------------------------------------------------------------------------------
// The comparison
// ----------------------------------------------------------------------------------------

/// One server's result under the simulator clock.
#[derive(Debug, Default)]
struct Side {
    /// First simulator start → last 2.01 received (the registration time).
    elapsed: Duration,
    /// First simulator start → last simulator concluded (its last device registered or
    /// gave up after its retransmissions).
    concluded: Duration,
    /// First simulator start → half, and 99 %, of the devices registered.
    p50: Option<Duration>,
    p99: Option<Duration>,
    /// From the simulators' "devices registered" lines.
    registered: usize,
    failed: usize,
    first_failure: Option<String>,
    /// CoAP datagrams the server received while the devices registered.
    datagrams: Option<u64>,
    /// Registrations the server says it accepted, and how it counts them.
    accepted: Option<u64>,
    /// The simulators' own report at stop (after de-registering), and the de-registrations.
    report: Option<(usize, usize)>,
    deregistered: Option<usize>,
    /// What the server counted after the devices de-registered.
    after_stop: String,
    /// Anything else worth a note (connectord: duplicates and busy drops).
    note: String,
}

impl Side {
    fn rate(&self) -> f64 {
        self.registered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn retransmissions(&self, n: usize) -> String {
        match self.datagrams {
            Some(d) => format!(
                "{d} datagrams received ({} beyond one per device)",
                d as i64 - n as i64
            ),
            None => "datagrams received: ?".into(),
        }
    }
}

struct PeerRun {
    devices: usize,
    version: String,
    installed_now: bool,
    connectord: Side,
    peer: Side,
}

impl PeerRun {
    fn rows(&self, node: &str) -> Vec<Row> {
        let n = self.devices;
        let (c, p) = (&self.connectord, &self.peer);
        let secs =
            |d: Option<Duration>| d.map_or("?".into(), |d| format!("{:.2} s", d.as_secs_f64()));
        let side_detail = |s: &Side, accepted_what: &str| {
            format!(
                "simulator: {} registered, {} failed{}; first simulator start → last 2.01 {:.2} s \
                 (50 % registered {}, 99 % {}, last device concluded {:.2} s); server accepted {}{}; \
                 {}; {}; at stop: {} de-registered (simulator report: {}); {}",
                s.registered,
                s.failed,
                s.first_failure
                    .as_ref()
                    .map_or(String::new(), |w| format!(" (first failure: {w})")),
                s.elapsed.as_secs_f64(),
                secs(s.p50),
                secs(s.p99),
                s.concluded.as_secs_f64(),
                s.accepted.map_or("?".into(), |a| a.to_string()),
                accepted_what,
                s.retransmissions(n),
                s.note,
                s.deregistered.map_or("?".into(), |d| d.to_string()),
                s.report
                    .map_or("none, stop timed out".into(), |(r, f)| format!(
                        "{r} registered, {f} failed"
                    )),
                s.after_stop,
            )
        };
        let p99_ratio = match (c.p99, p.p99) {
            (Some(a), Some(b)) => format!("{:.1}", b.as_secs_f64() / a.as_secs_f64().max(1e-9)),
            _ => "?".into(),
        };
        vec![
            Row {
                scenario: format!("registrations/s connectord ÷ lwm2m-node-lib ({n} devices)"),
                value: c.rate() / p.rate().max(1e-9),
                unit: "×",
                target: None,
                detail: format!(
                    "connectord {:.0}/s ({} registered in {:.2} s), lwm2m-node-lib {} {:.0}/s ({} \
                     registered in {:.2} s); same simulator workload and clock, one server after \
                     the other; time to 99 % registered: ratio {p99_ratio}{}",
                    c.rate(),
                    c.registered,
                    c.elapsed.as_secs_f64(),
                    self.version,
                    p.rate(),
                    p.registered,
                    p.elapsed.as_secs_f64(),
                    if c.failed + p.failed > 0 {
                        "; SOME REGISTRATIONS FAILED: the rates count the successful ones"
                    } else {
                        ""
                    }
                ),
            },
            Row {
                scenario: format!("registrations/s connectord, simulator clock ({n} devices)"),
                value: c.rate(),
                unit: "reg/s",
                target: None,
                detail: side_detail(c, " (registrations_total)"),
            },
            Row {
                scenario: format!(
                    "registrations/s lwm2m-node-lib {} ({n} devices)",
                    self.version
                ),
                value: p.rate(),
                unit: "reg/s",
                target: None,
                detail: format!(
                    "{}; node {node}, in-memory registry{}",
                    side_detail(p, " (registration handler calls)"),
                    if self.installed_now {
                        ", installed by npm ci in this run"
                    } else {
                        ""
                    }
                ),
            },
        ]
    }
}

fn run(args: &Args, n: usize) -> Result<PeerRun> {
    let capture = capture()?;
    let dir = std::fs::canonicalize(&args.peer.peer_dir)
        .with_context(|| format!("peer directory {}", args.peer.peer_dir.display()))?;
    let installed_now = install(&dir)?;
    let timeout = Duration::from_secs(args.timeout_s);

    // connectord: the same daemon configuration as the registration scenario.
    let connectord = {
        let daemon = Daemon::start(&args.daemon, args)?;
        let api = daemon.api();
        std::thread::sleep(Duration::from_secs(1));
        let (mut side, sims) =
            register(args, n, daemon.coap, capture, timeout).inspect_err(|_| {
                for w in daemon.warnings() {
                    eprintln!("daemon: {w}");
                }
            })?;
        let m = api.metrics()?;
        let get = |k: &str| m.get(k).copied().unwrap_or(0);
        side.datagrams = Some(get("coap_datagrams_total"));
        side.accepted = Some(get("registrations_total"));
        side.note = format!(
            "duplicates {}, busy drops {}",
            get("coap_duplicates_total"),
            get("coap_busy_drops_total")
        );
        stop(&mut side, capture, sims);
        let m = api.metrics()?;
        side.after_stop = format!(
            "connectord counted {} de-registrations, {} endpoints left",
            m.get("deregistrations_total").copied().unwrap_or(0),
            m.get("registered_endpoints").copied().unwrap_or(0)
        );
        side
    };

    // lwm2m-node-lib.
    let mut peer = NodePeer::start(&dir, timeout)?;
    let version = peer.version.clone();
    std::thread::sleep(Duration::from_secs(1));
    let peer_side = {
        let (mut side, sims) = match register(args, n, peer.addr, capture, timeout) {
            Ok(s) => s,
            Err(e) => {
                let tail = peer.stderr_tail();
                bail!(
                    "{e:#}{}",
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!("\nlwm2m-node-lib stderr:\n{tail}")
                    }
                );
            }
        };
        let s = peer.stats()?;
        side.datagrams = s["datagrams"].as_u64();
        side.accepted = s["registrations"].as_u64();
        side.note = format!(
            "registry size {}",
            s["devices"].as_u64().map_or("?".into(), |d| d.to_string())
        );
        stop(&mut side, capture, sims);
        let s = peer.stats()?;
        side.after_stop = format!(
            "lwm2m-node-lib counted {} de-registrations, {} devices left",
            s["unregistrations"].as_u64().unwrap_or(0),
            s["devices"].as_u64().map_or("?".into(), |d| d.to_string())
        );
        side
    };
    drop(peer);

    Ok(PeerRun {
        devices: n,
        version,
        installed_now,
        connectord,
        peer: peer_side,
    })
}

/// Starts the simulators against `server` and waits until every one has reported all its
/// devices registered (or failed); the simulators keep running.
fn register(
    args: &Args,
    n: usize,
    server: SocketAddr,
    capture: &Capture,
    timeout: Duration,
) -> Result<(Side, Sims)> {
    let groups = n.div_ceil(args.per_address.max(1));
    capture.reset();
    let mut sims = Sims::start(args, server, n, "r", 60_000, false)?;
    let deadline = Instant::now() + timeout;
    loop {
        {
            let st = capture.state.lock().unwrap();
            if st.done.len() >= groups {
                let start = st.started.context("no simulator start seen")?;
                let end = st.done.iter().map(|d| d.0).max().unwrap_or(start);
                let mut at: Vec<Duration> = st
                    .registered_at
                    .iter()
                    .map(|t| t.saturating_duration_since(start))
                    .collect();
                at.sort();
                // The k-th registration of n, if there were that many.
                let kth = |frac: f64| {
                    let k = ((n as f64 * frac).ceil() as usize).max(1);
                    at.get(k - 1).copied()
                };
                let side = Side {
                    elapsed: at.last().copied().unwrap_or_default(),
                    concluded: end.saturating_duration_since(start),
                    p50: kth(0.5),
                    p99: kth(0.99),
                    registered: st.done.iter().map(|d| d.1).sum(),
                    failed: st.done.iter().map(|d| d.2).sum(),
                    first_failure: st.first_failure.clone(),
                    ..Side::default()
                };
                return Ok((side, sims));
            }
        }
        if let Err(e) = sims.check() {
            sims.abandon();
            return Err(e);
        }
        if Instant::now() >= deadline {
            let st = capture.state.lock().unwrap();
            let msg = format!(
                "{} of {groups} simulators done within {} s ({} of {n} devices registered); \
                 last progress: {}",
                st.done.len(),
                timeout.as_secs(),
                st.registered_at.len(),
                st.progress.as_deref().unwrap_or("none")
            );
            drop(st);
            sims.abandon();
            bail!(msg);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Stops the simulators (devices de-register, bounded) and records their report.
fn stop(side: &mut Side, capture: &Capture, sims: Sims) {
    let report = sims.stop(Duration::from_secs(40));
    side.report = report.map(|r| (r.registered, r.failed));
    let st = capture.state.lock().unwrap();
    side.deregistered = (!st.stopped.is_empty()).then(|| st.stopped.iter().sum());
}

// ----------------------------------------------------------------------------------------
// Node.js and the peer process
// ----------------------------------------------------------------------------------------

/// `node --version`, or why there is no usable node.
fn node_version() -> std::result::Result<String, String> {
    match Command::new("node").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(format!("`node --version` exited with {}", o.status)),
        Err(e) => Err(format!("no `node` on PATH ({e})")),
    }
}

/// Runs `npm ci` in the peer directory if lwm2m-node-lib is not installed; true if it ran.
fn install(dir: &Path) -> Result<bool> {
    if dir
        .join("node_modules/lwm2m-node-lib/package.json")
        .exists()
    {
        return Ok(false);
    }
    eprintln!(
        "peer comparison: {}/node_modules is missing: running `npm ci` (downloads the pinned \
         packages of package-lock.json from the npm registry) …",
        dir.display()
    );
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::inherit())
        .status()
        .context("run npm ci (is npm installed?)")?;
    ensure!(
        status.success(),
        "npm ci in {} failed ({status})",
        dir.display()
    );
    Ok(true)
}

/// lwm2m-node-lib's server in a node process on 127.0.0.1 (killed on drop).
struct NodePeer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Value>,
    stderr: Arc<Mutex<Vec<String>>>,
    addr: SocketAddr,
    version: String,
}

impl NodePeer {
    fn start(dir: &Path, timeout: Duration) -> Result<NodePeer> {
        let mut child = Command::new("node")
            .arg(dir.join(PEER_SCRIPT))
            .args(["--host", "127.0.0.1", "--port", "0"])
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn node")?;
        let stdout = child.stdout.take().context("node stdout")?;
        let stderr = child.stderr.take().context("node stderr")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        let tail: Arc<Mutex<Vec<String>>> = Arc::default();
        let tail_w = Arc::clone(&tail);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut t = tail_w.lock().unwrap();
                if t.len() >= 40 {
                    t.remove(0);
                }
                t.push(line);
            }
        });
        let mut peer = NodePeer {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr: tail,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            version: String::new(),
        };
        let ready = peer
            .next_line(|v| v["ready"] == true, timeout)
            .context("lwm2m-node-lib server did not get ready")?;
        let ip: std::net::IpAddr = ready["address"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .context("ready line without address")?;
        let port = ready["port"].as_u64().context("ready line without port")?;
        peer.addr = SocketAddr::new(ip, u16::try_from(port)?);
        ensure!(
            peer.addr.ip().is_loopback(),
            "the peer listens on {}: refusing to go on",
            peer.addr
        );
        peer.version = ready["version"].as_str().unwrap_or("?").to_string();
        eprintln!(
            "peer comparison: lwm2m-node-lib {} listening on udp://{}",
            peer.version, peer.addr
        );
        Ok(peer)
    }

    /// The next stdout JSON line that `want`s, within `timeout`.
    fn next_line(&mut self, want: impl Fn(&Value) -> bool, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(v) if want(&v) => return Ok(v),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(st) = self.child.try_wait()? {
                        bail!("node exited ({st}):\n{}", self.stderr_tail());
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "timed out:\n{}",
                        self.stderr_tail()
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = self.child.wait()?;
                    bail!("node exited ({st}):\n{}", self.stderr_tail());
                }
            }
        }
    }

    /// The server's counters: datagrams, registrations, updates, unregistrations, devices.
    fn stats(&mut self) -> Result<Value> {
        let stdin = self.stdin.as_mut().context("node stdin closed")?;
        stdin.write_all(b"stats\n")?;
        stdin.flush()?;
        let v = self.next_line(|v| v.get("stats").is_some(), Duration::from_secs(20))?;
        Ok(v["stats"].clone())
    }

    fn stderr_tail(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

impl Drop for NodePeer {
    fn drop(&mut self) {
        // Closing stdin ends the script; kill in case it does not.
        drop(self.stdin.take());
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(2) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ----------------------------------------------------------------------------------------
// The simulator's events
// ----------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct CaptureState {
    /// The first "simulating N devices against …" (sockets open, registrations start).
    started: Option<Instant>,
    /// Each "R devices registered (F failed) in S s": (when, R, F).
    done: Vec<(Instant, usize, usize)>,
    /// Each device's "… registered at /…" (debug level): when its 2.01 arrived.
    registered_at: Vec<Instant>,
    /// The last "R of N devices registered (F failed)" line.
    progress: Option<String>,
    /// The first "registration of … failed: …" warning.
    first_failure: Option<String>,
    /// Each "simulator stopped: … D de-registered …": D.
    stopped: Vec<usize>,
}

/// A `tracing` subscriber that records the simulator's progress events, with their instant.
#[derive(Debug, Default)]
struct Capture {
    state: Mutex<CaptureState>,
}

impl Capture {
    fn reset(&self) {
        *self.state.lock().unwrap() = CaptureState::default();
    }

    fn wants(meta: &Metadata<'_>) -> bool {
        meta.is_event() && meta.target() == SIM_TARGET && *meta.level() <= Level::DEBUG
    }

    fn record_message(&self, at: Instant, msg: &str) {
        let mut st = self.state.lock().unwrap();
        let nums = numbers(msg);
        if msg.contains(" registered at /") {
            st.registered_at.push(at);
        } else if msg.starts_with("simulating ") {
            st.started = Some(st.started.map_or(at, |s| s.min(at)));
        } else if let Some(rest) = msg.strip_prefix("simulator stopped:") {
            // "R devices registered, F failed, D de-registered, …"
            if let Some(&d) = numbers(rest).get(2) {
                st.stopped.push(d as usize);
            }
        } else if msg.contains(" devices registered (") && msg.contains(" failed) in ") {
            // "R devices registered (F failed) in S s"
            if let [r, f, ..] = nums[..] {
                st.done.push((at, r as usize, f as usize));
            }
        } else if msg.contains(" devices registered (") {
            st.progress = Some(msg.to_string());
        } else if msg.starts_with("registration of ") && st.first_failure.is_none() {
            st.first_failure = Some(msg.to_string());
        }
    }
}

/// The unsigned integers in `s`, in order ("1.5" gives 1 and 5).
fn numbers(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .filter_map(|t| t.parse().ok())
        .collect()
}

/// Installed once for the process (the bench has no other subscriber).
fn capture() -> Result<&'static Capture> {
    static CAPTURE: OnceLock<std::result::Result<&'static Capture, String>> = OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let c: &'static Capture = Box::leak(Box::default());
            tracing::subscriber::set_global_default(Forward(c))
                .map(|()| c)
                .map_err(|e| format!("cannot observe the simulator (tracing subscriber): {e}"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The global subscriber: forwards the wanted events to the capture.
struct Forward(&'static Capture);

struct MessageVisitor(Option<String>);

impl tracing::field::Visit for MessageVisitor {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl Subscriber for Forward {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if Capture::wants(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        Capture::wants(meta)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::DEBUG)
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let at = Instant::now();
        let mut v = MessageVisitor(None);
        event.record(&mut v);
        if let Some(msg) = v.0 {
            self.0.record_message(at, &msg);
        }
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_order() {
        assert_eq!(
            numbers("10000 devices registered (3 failed) in 1.2 s"),
            [10000, 3, 1, 2]
        );
        assert_eq!(
            numbers(" 9 devices registered, 1 failed, 8 de-registered, 0 requests"),
            [9, 1, 8, 0]
        );
    }

    /// A minimal CoAP registrar: ACK 2.01 with Location-Path rd/x to every POST, 2.02 to
    /// every DELETE.
    async fn fake_server(sock: tokio::net::UdpSocket) {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((len, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let m = &buf[..len];
            if len < 4 || m[0] >> 6 != 1 {
                continue;
            }
            let tkl = (m[0] & 0x0f) as usize;
            let token = &m[4..4 + tkl];
            let mut r = vec![0x60 | tkl as u8, 0, m[2], m[3]];
            r.extend_from_slice(token);
            match m[1] {
                0x02 => {
                    r[1] = 0x41; // 2.01
                    r.extend_from_slice(&[0x82, b'r', b'd', 0x01, b'x']);
                }
                0x04 => r[1] = 0x42, // 2.02
                _ => continue,
            }
            let _ = sock.send_to(&r, from).await;
        }
    }

    /// The simulator's log lines are what the comparison is timed by: check that the
    /// capture still understands them, against the real simulator.
    #[test]
    fn capture_follows_the_real_simulator() {
        let capture = capture().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let sock = rt
            .block_on(tokio::net::UdpSocket::bind("127.0.0.1:0"))
            .unwrap();
        let server = sock.local_addr().unwrap();
        rt.spawn(fake_server(sock));
        let t0 = Instant::now();
        let args = <crate::Args as clap::Parser>::parse_from([
            "connectord-bench",
            "--per-address",
            "20",
            "--sim-threads",
            "0",
        ]);
        let mut sims = Sims::start(&args, server, 30, "t", 60_000, false).unwrap();
        loop {
            if capture.state.lock().unwrap().done.len() >= 2 {
                break;
            }
            sims.check().unwrap();
            assert!(t0.elapsed() < Duration::from_secs(20), "no completion seen");
            std::thread::sleep(Duration::from_millis(2));
        }
        let report = sims.stop(Duration::from_secs(20)).expect("stopped");
        assert_eq!((report.registered, report.failed), (30, 0));
        let st = capture.state.lock().unwrap();
        assert!(st.started.is_some());
        let mut done: Vec<_> = st.done.iter().map(|d| (d.1, d.2)).collect();
        done.sort();
        assert_eq!(done, [(10, 0), (20, 0)]);
        assert_eq!(st.registered_at.len(), 30);
        assert_eq!(st.stopped.iter().sum::<usize>(), 30);
        drop(rt);
    }
}
