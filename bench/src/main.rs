//! `connectord-bench`: drives the real `connectord` binary over loopback and measures
//! registrations/s, proxied reads/s with latency, notifications/s delivered to a
//! long-poll, RSS per registered endpoint and restart time with stored registrations.
//!
//! Every scenario starts its own daemon (fresh state directory in the temp dir, REST and
//! CoAP on `127.0.0.1:0`), drives it with the in-process device simulator
//! (`connectord::simulate`) and plain HTTP/1.1 keep-alive clients, and is bounded in
//! count and time. Only 127.0.0.0/8 addresses are ever used.
//!
//! The simulator runs in this process, on the same cores as the daemon: the figures are
//! those of the pair, not of the daemon alone.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Parser;
use connectord::simulate::{SimOptions, SimReport};

mod bulk;
mod cluster;
mod dtls;
mod expiry;
mod floor;
mod https;
mod storm;
mod webhook;
use serde_json::{Value, json};

mod peer;

/// The daemon's allocator in the load generator too: its simulated devices, HTTP clients
/// and long-poll reader allocate per message on several threads, as the daemon does, and
/// the generator's CPU shares the cores with the daemon's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The daemon's mimalloc purge delay (daemon/src/main.rs `PURGE_DELAY_MS`, which has the
/// reasons and the option's index), so that the in-process `--dtls` memory figure is the
/// daemon's. `MIMALLOC_PURGE_DELAY` in the environment wins here too, and reaches the
/// daemons the bench starts.
fn set_purge_delay() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mimalloc v3's `mi_option_purge_delay` (15), 100 ms; options may be set
        // while other threads allocate.
        unsafe { libmimalloc_sys::mi_option_set(15, 100) }
    }
}

/// Benchmarks of the real connectord daemon over loopback.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The daemon binary to run.
    #[arg(long, default_value = "target/release/connectord")]
    daemon: PathBuf,
    /// Run the registrations/s scenario (without any scenario flag: all of them).
    #[arg(long)]
    registrations: bool,
    /// Run the proxied reads scenario.
    #[arg(long)]
    reads: bool,
    /// Run the notifications/s scenario.
    #[arg(long)]
    notifications: bool,
    /// Run the REST auth cost scenario (only when asked for): sequential authenticated
    /// `GET /endpoints` with the default backend (its verdicts reused: no plugin call) and
    /// with `[plugins] auth = ["pelion", "connector"]` (no reuse: two plugin calls, each a
    /// hop to the plugin's lane, per request).
    #[arg(long)]
    auth_cost: bool,
    /// Requests of each run of `--auth-cost` (after a tenth as many to warm up).
    #[arg(long, default_value_t = 20_000)]
    auth_requests: usize,
    /// Run the RSS per endpoint scenario.
    #[arg(long)]
    rss: bool,
    /// Run the restart time scenario.
    #[arg(long)]
    restart: bool,
    /// Also measure RSS and restart with `--big-devices` registrations (registered by the
    /// bulk loader, many endpoints per socket, so `ulimit -n` does not limit it).
    #[arg(long)]
    big: bool,
    /// Devices registered for registrations/s, RSS and restart.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Endpoints of the `--big` run (registered by the bulk loader: many per socket).
    #[arg(long, default_value_t = 100_000)]
    big_devices: usize,
    /// UDP sockets the bulk loader of `--big` and `--storm` registers from.
    #[arg(long, default_value_t = 1000)]
    bulk_sockets: usize,
    /// Run the registration storm (issue 24; only when asked for): `--big-devices`
    /// endpoints registering at once from `--bulk-sockets` sockets (bulk loader,
    /// `--storm-window` outstanding per socket), against a fresh daemon; reports
    /// registered/failed, the rate over the storm and per 10 % slice (from
    /// `connectord_registrations_total`, polled every 100 ms), daemon CPU per
    /// registration, 5.03s answered, retransmissions and the kernel's drops at the
    /// daemon's UDP socket (`/proc/net/udp`).
    #[arg(long)]
    storm: bool,
    /// Run the expiry of a whole fleet (issue 24; only when asked for): `--big-devices`
    /// endpoints registered by the bulk loader, the daemon killed, the stored deadlines
    /// moved into the past (an outage longer than the lifetime), the daemon started again;
    /// reports the time until none is left, the steps, the events queued, the daemon CPU
    /// and the latency of a REST request every 20 ms meanwhile (`src/expiry.rs`).
    #[arg(long)]
    expiry: bool,
    /// Measure what a proxied read's system calls alone cost on this machine (issue 24;
    /// only when asked for; no daemon): a "null daemon" that does a read's TCP and UDP
    /// I/O and nothing else, and the UDP send by `sendto` and by `sendmmsg`
    /// (`src/floor.rs`).
    #[arg(long)]
    io_floor: bool,
    /// Requests of `--io-floor`'s null daemon.
    #[arg(long, default_value_t = 200_000)]
    floor_requests: usize,
    /// Datagrams of each of `--io-floor`'s UDP send runs.
    #[arg(long, default_value_t = 200_000)]
    floor_datagrams: usize,
    /// Registrations outstanding at once per socket in `--storm`.
    #[arg(long, default_value_t = 8)]
    storm_window: usize,
    /// Most simulated devices per 127.0.0.x bind address (ephemeral ports per address).
    #[arg(long, default_value_t = 20_000)]
    per_address: usize,
    /// Devices answering the proxied reads.
    #[arg(long, default_value_t = 100)]
    read_devices: usize,
    /// Proxied reads issued.
    #[arg(long, default_value_t = 40_000)]
    read_count: usize,
    /// Keep-alive HTTP/1.1 connections issuing reads, each one request at a time (with few
    /// of them the figure is their round-trip time, not the daemon's throughput, since
    /// every 202 waits for a durable write).
    #[arg(long, default_value_t = 64)]
    read_connections: usize,
    /// Threads of the runtime driving those connections.
    #[arg(long, default_value_t = 1)]
    read_client_threads: usize,
    /// Threads of the runtime driving the simulated devices (0: one per CPU, tokio's
    /// default).
    #[arg(long, default_value_t = 0)]
    sim_threads: usize,
    /// Issue the reads over HTTP/2 (prior knowledge, cleartext): the `--read-connections`
    /// requests at a time become concurrent streams over `--read-h2-connections`
    /// connections.
    #[arg(long)]
    read_http2: bool,
    /// Issue the reads over HTTPS (`rest.listen_tls`, a certificate the bench makes with
    /// rcgen): HTTP/1.1, or HTTP/2 by ALPN with `--read-http2`. The long-poll stays on
    /// plain HTTP, so the daemon CPU per read compares with a plain run.
    #[arg(long)]
    read_https: bool,
    /// HTTP/2 connections of `--read-http2`.
    #[arg(long, default_value_t = 2)]
    read_h2_connections: usize,
    /// Most reads outstanding (sent, async response not yet pulled) at once.
    #[arg(long, default_value_t = 1000)]
    read_window: usize,
    /// Pace the reads at this many per second (read i is sent no earlier than i / rate
    /// seconds after the start, and still only within `--read-window`); 0: as fast as the
    /// connections and the window allow (saturation). For the latency at a given load.
    #[arg(long, default_value_t = 0.0)]
    read_rate: f64,
    /// Answer the proxied reads with the bulk responder (the bulk notifier's endpoints on
    /// `--read-sockets` sockets) instead of the device simulator (one task and socket per
    /// device). It did not measurably lower the load generator's CPU per read.
    #[arg(long)]
    read_bulk: bool,
    /// Sockets of the bulk responder of `--read-bulk`.
    #[arg(long, default_value_t = 4)]
    read_sockets: usize,
    /// Drive the notifications scenario with the device simulator (one task and socket
    /// per device) instead of the bulk notifier (few sockets, cheap to run).
    #[arg(long)]
    notify_sim: bool,
    /// Sockets of the bulk notifier.
    #[arg(long, default_value_t = 100)]
    notify_sockets: usize,
    /// Devices sending notifications (1200 × every 10 ms: 120 000/s offered; more
    /// overloads these 2 shared cores and the excess is dropped at the observations'
    /// queues, see docs/PERFORMANCE.md).
    #[arg(long, default_value_t = 1200)]
    notify_devices: usize,
    /// Interval between a device's notifications, in ms.
    #[arg(long, default_value_t = 10)]
    notify_interval_ms: u64,
    /// Seconds of notifications counted (after the warm-up).
    #[arg(long, default_value_t = 10)]
    notify_window_s: u64,
    /// Seconds between the last registration and the counting window.
    #[arg(long, default_value_t = 3)]
    notify_warmup_s: u64,
    /// `[notifications] max_batch` of the daemon (events per long-poll answer).
    #[arg(long, default_value_t = 500)]
    max_batch: usize,
    /// `[state] commit_delay_us` of the daemon (absent: its default).
    #[arg(long)]
    commit_delay_us: Option<u64>,
    /// `[runtime] worker_threads` of the daemon (0: one per CPU, its default).
    #[arg(long, default_value_t = 0)]
    worker_threads: usize,
    /// `[log] level` of the daemon (its default is info: one line per registration).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Time limit of each phase (registering, reading, restarting), in seconds.
    #[arg(long, default_value_t = 180)]
    timeout_s: u64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    peer: peer::PeerArgs,
    /// Run the DTLS scenario (only when asked for): PSK and ECDSA handshakes/s and memory
    /// per DTLS session, against the DTLS listener in this process (see `src/dtls.rs`).
    #[arg(long)]
    dtls: bool,
    /// Handshakes of each `--dtls` rate run.
    #[arg(long, default_value_t = 5000)]
    dtls_handshakes: usize,
    /// Sessions held for `--dtls`'s memory per session.
    #[arg(long, default_value_t = 10_000)]
    dtls_sessions: usize,
    /// Run the registrations and the proxied reads a second time over CoAP over DTLS
    /// (the daemon's `coap.listen_dtls`; each simulated device with its own PSK,
    /// provisioned through `/v2/device-credentials/{ep}` before the clock starts), and
    /// print both side by side with the ratio of the daemon's CPU per operation.
    #[arg(long)]
    coap_dtls: bool,
    /// Run the cluster scenarios only (issue 22, `src/cluster.rs`): registrations/s,
    /// notifications/s and proxied reads/s (through the owner, and through a non-owner),
    /// on SQLite and on NATS JetStream with each node count of `--nodes`, side by side,
    /// against a nats-server the bench starts on free loopback ports.
    #[arg(long)]
    cluster: bool,
    /// Node counts of `--cluster`'s NATS configurations.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    nodes: Vec<usize>,
    /// Devices registered by `--cluster`'s registrations/s, spread over the nodes.
    #[arg(long, default_value_t = 6000)]
    cluster_devices: usize,
    /// Proxied reads of each `--cluster` read run (over `--read-devices` devices).
    #[arg(long, default_value_t = 10_000)]
    cluster_read_count: usize,
    /// Runs of the whole `--cluster` set (configurations interleaved); the summary gives
    /// the median and the spread.
    #[arg(long, default_value_t = 1)]
    cluster_runs: usize,
    /// Long-poll the key on node 1 only (the channel's owner: it opens it first), instead
    /// of on every node at once.
    #[arg(long)]
    cluster_one_poll: bool,
}

/// The key of every simulated device's PSK in `--coap-dtls` runs (identity: its endpoint
/// name); 16 bytes, the least the daemon takes.
const BENCH_PSK: &[u8] = b"bench-psk-16byte";

/// One line of the results table.
#[derive(Debug, Clone)]
struct Row {
    scenario: String,
    value: f64,
    unit: &'static str,
    target: Option<(f64, bool)>, // (target, higher is better)
    detail: String,
}

impl Row {
    fn met(&self) -> Option<bool> {
        self.target.map(|(t, higher)| {
            if higher {
                self.value >= t
            } else {
                self.value <= t
            }
        })
    }
}

// ----------------------------------------------------------------------------------------
// The daemon process
// ----------------------------------------------------------------------------------------

/// A running daemon with its own state directory (removed on drop): the testkit's
/// launcher (`daemon/testkit`, shared with the end-to-end tests), which learns the
/// addresses from the daemon's ready file, keeping the start's log lines and warnings.
struct Daemon(connectord_testkit::Daemon);

impl Daemon {
    fn start(bin: &Path, args: &Args) -> Result<Daemon> {
        Daemon::start_with(bin, args, "")
    }

    /// As [`Daemon::start`], with more configuration (whole sections) after the bench's.
    fn start_with(bin: &Path, args: &Args, more: &str) -> Result<Daemon> {
        Daemon::start_rest(bin, args, "", more)
    }

    /// As [`Daemon::start_with`], with `rest` lines in the `[rest]` section.
    fn start_rest(bin: &Path, args: &Args, rest: &str, more: &str) -> Result<Daemon> {
        Daemon::start_full(bin, args, "", rest, more)
    }

    /// As [`Daemon::start_rest`], with `coap` lines in the `[coap]` section.
    fn start_full(bin: &Path, args: &Args, coap: &str, rest: &str, more: &str) -> Result<Daemon> {
        let bin = std::fs::canonicalize(bin).with_context(|| {
            format!(
                "daemon binary {} (build it: cargo build --release -p connectord)",
                bin.display()
            )
        })?;
        let d = connectord_testkit::Launch::new(bin)
            .log_level(&args.log_level)
            .coap(coap)
            .rest(rest)
            .extra(&format!(
                "[notifications]\nmax_batch = {}\n[runtime]\nworker_threads = {}\n{}{more}",
                args.max_batch,
                args.worker_threads,
                args.commit_delay_us
                    .map(|us| format!("[state]\ncommit_delay_us = {us}\n"))
                    .unwrap_or_default()
            ))
            .keep_logs(connectord_testkit::KeepLogs::StartAndWarnings)
            .timeout(Duration::from_secs(args.timeout_s))
            .start()?;
        let d = Daemon(d);
        d.check()?;
        Ok(d)
    }

    /// Starts the process again on the same state (after [`Daemon::kill9`]) and waits for
    /// its ready file.
    fn spawn(&mut self) -> Result<()> {
        self.0.respawn()?;
        self.check()
    }

    fn check(&self) -> Result<()> {
        ensure!(
            self.rest.ip().is_loopback() && self.coap.ip().is_loopback(),
            "the daemon listens on a non-loopback address ({} / {}): refusing to go on",
            self.rest,
            self.coap
        );
        ensure!(
            !self.0.key.is_empty(),
            "no admin.key in the state directory"
        );
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.0.try_pid().unwrap_or(0)
    }

    /// A daemon for a `--coap-dtls` run: `coap.listen_dtls` on 127.0.0.1:0 besides the
    /// UDP listener, with `rest` lines in `[rest]`.
    fn start_dtls(bin: &Path, args: &Args, rest: &str) -> Result<Daemon> {
        // Every simulated device handshakes from 127.0.0.1: no per-source bound, which
        // would count them as one source. A build before that key refuses it: started
        // again without it (it has no such bound).
        let dtls = "listen_dtls = [\"127.0.0.1:0\"]";
        match Daemon::start_full(
            bin,
            args,
            &format!("{dtls}\ndtls_max_handshakes_per_source = 0"),
            rest,
            "",
        ) {
            Err(e) if format!("{e:#}").contains("dtls_max_handshakes_per_source") => {
                Daemon::start_full(bin, args, dtls, rest, "")
            }
            started => started,
        }
    }

    /// The CoAP address devices use: the DTLS listener's (`coap_dtls` in the ready file)
    /// when `dtls`, else the UDP one.
    fn coap_addr(&self, dtls: bool) -> Result<SocketAddr> {
        if !dtls {
            return Ok(self.coap);
        }
        let ready = self.ready.as_ref().context("ready file")?;
        let addr = *ready
            .coap_dtls
            .first()
            .context("no DTLS address in the ready file")?;
        ensure!(
            addr.ip().is_loopback(),
            "DTLS listener on {addr}: loopback only"
        );
        Ok(addr)
    }

    /// Gives every endpoint of `names` a PSK (identity: its name, key [`BENCH_PSK`]),
    /// `PUT /v2/device-credentials/{ep}` from 4 threads.
    fn provision_psks(&self, names: &[String]) -> Result<()> {
        let hex: String = BENCH_PSK.iter().map(|b| format!("{b:02x}")).collect();
        let chunk = names.len().div_ceil(4).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = names
                .chunks(chunk)
                .map(|part| {
                    let api = self.api();
                    let hex = &hex;
                    scope.spawn(move || -> Result<()> {
                        for ep in part {
                            let body = json!({"psk_identity": ep, "psk": hex}).to_string();
                            let (status, answer) =
                                api.put_json(&format!("/v2/device-credentials/{ep}"), &body)?;
                            ensure!(
                                status == 200 || status == 201 || status == 204,
                                "PUT /v2/device-credentials/{ep} answered {status}: {answer}"
                            );
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .map_err(|_| anyhow!("provisioning thread panicked"))?
            })
        })
    }

    /// `kill -9` and reap.
    fn kill9(&mut self) {
        self.0.kill9();
    }

    fn api(&self) -> Api {
        Api::new(self.rest, &self.0.key, Duration::from_secs(40))
    }

    fn warnings(&self) -> Vec<String> {
        self.0
            .logs()
            .into_iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(5)
            .collect()
    }
}

impl std::ops::Deref for Daemon {
    type Target = connectord_testkit::Daemon;
    fn deref(&self) -> &connectord_testkit::Daemon {
        &self.0
    }
}

/// Resident set size of a process, in KiB.
fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc/<pid>/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Clock ticks of USER_HZ, which is 100 on Linux (x86_64, aarch64).
    Ok(Duration::from_millis(ticks * 10))
}

/// The soft limit of open files of this process.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn check_fds(devices: usize) -> Result<()> {
    if let Some(limit) = open_files_limit() {
        let need = devices as u64 + 256;
        ensure!(
            limit >= need,
            "{devices} simulated devices need about {need} open files but ulimit -n is {limit}: \
             raise it (ulimit -n {need}, or LimitNOFILE) or simulate fewer devices"
        );
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------
// HTTP
// ----------------------------------------------------------------------------------------

/// A keep-alive HTTP/1.1 client of one daemon.
/// Resolves the IP literals the bench's URLs carry without a lookup. ureq's default
/// resolver, given a timeout, starts a thread per request to bound the lookup: one per
/// long-poll, which showed up as thread creation in the generator's profile.
#[derive(Debug)]
struct LiteralResolver;

impl ureq::unversioned::resolver::Resolver for LiteralResolver {
    fn resolve(
        &self,
        uri: &http::Uri,
        _config: &ureq::config::Config,
        _timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let host = uri.host().ok_or(ureq::Error::HostNotFound)?;
        let ip: std::net::IpAddr = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| ureq::Error::HostNotFound)?;
        let mut addrs = self.empty();
        addrs.push(SocketAddr::new(ip, uri.port_u16().unwrap_or(80)));
        Ok(addrs)
    }
}

struct Api {
    base: String,
    auth: String,
    agent: ureq::Agent,
}

impl Api {
    fn new(rest: SocketAddr, key: &str, timeout: Duration) -> Api {
        assert!(rest.ip().is_loopback(), "loopback only");
        Api {
            base: format!("http://{rest}"),
            auth: format!("Bearer {key}"),
            agent: ureq::Agent::with_parts(
                ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(timeout))
                    .build(),
                ureq::unversioned::transport::DefaultConnector::new(),
                LiteralResolver,
            ),
        }
    }

    fn get(&self, path: &str) -> Result<(u16, String)> {
        let mut r = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", &self.auth)
            .call()
            .with_context(|| format!("GET {path}"))?;
        let status = r.status().as_u16();
        let body = r
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()?;
        Ok((status, body))
    }

    fn put_json(&self, path: &str, body: &str) -> Result<(u16, String)> {
        let mut r = self
            .agent
            .put(format!("{}{path}", self.base))
            .header("Authorization", &self.auth)
            .header("Content-Type", "application/json")
            .send(body)
            .with_context(|| format!("PUT {path}"))?;
        let status = r.status().as_u16();
        Ok((status, r.body_mut().read_to_string()?))
    }

    /// Values of `connectord_*` metrics, by name without the prefix.
    fn metrics(&self) -> Result<HashMap<String, u64>> {
        let (status, body) = self.get("/metrics")?;
        ensure!(status == 200, "/metrics answered {status}");
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((
                    k.strip_prefix("connectord_")?.to_string(),
                    v.trim().parse().ok()?,
                ))
            })
            .collect())
    }

    fn metric(&self, name: &str) -> Result<u64> {
        self.metrics()?
            .get(name)
            .copied()
            .ok_or_else(|| anyhow!("no metric {name}"))
    }

    /// Creates the key's notification channel (events before it are not kept for it).
    fn open_channel(&self) -> Result<()> {
        let (s, b) = self.get("/v2/notification/pull?noWait=true")?;
        ensure!(s == 200 || s == 204, "pull answered {s}: {b}");
        Ok(())
    }
}

// ----------------------------------------------------------------------------------------
// The simulator
// ----------------------------------------------------------------------------------------

/// Simulated devices in this process, spread over 127.0.0.x bind addresses.
struct Sims {
    rt: tokio::runtime::Runtime,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    handles: Vec<tokio::task::JoinHandle<Result<SimReport, connectord::simulate::SimError>>>,
}

impl Sims {
    /// `devices` simulated devices named `{prefix}{group}-{index:06}`, notifying every
    /// `notify_interval_ms` once observed; `--per-address` and `--sim-threads` from `args`.
    fn start(
        args: &Args,
        server: SocketAddr,
        devices: usize,
        prefix: &str,
        notify_interval_ms: u64,
        dtls: bool,
    ) -> Result<Sims> {
        ensure!(server.ip().is_loopback(), "loopback only");
        check_fds(devices)?;
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        if args.sim_threads > 0 {
            rt.worker_threads(args.sim_threads);
        }
        let rt = rt.enable_all().build()?;
        let per = args.per_address.max(1);
        let groups = devices.div_ceil(per);
        ensure!(groups <= 250, "too many bind addresses ({groups})");
        let mut stops = Vec::new();
        let mut handles = Vec::new();
        for g in 0..groups {
            let n = per.min(devices - g * per);
            let bind = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + g as u8));
            assert!(bind.is_loopback());
            let opts = SimOptions {
                devices: n,
                server,
                name_prefix: format!("{prefix}{g}-"),
                lifetime_s: 86_400,
                notify_interval_ms,
                bind,
                queue_mode: false,
                domain: None,
                register_rate: 0,
                dtls_psk_per_endpoint: dtls.then(|| BENCH_PSK.to_vec()),
                ..SimOptions::default()
            };
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            stops.push(tx);
            handles.push(rt.spawn(connectord::simulate::run(opts, async move {
                let _ = rx.await;
            })));
        }
        Ok(Sims { rt, stops, handles })
    }

    /// The endpoint names [`Sims::start`] gives `devices` devices:
    /// `{prefix}{group}-{index:06}`, `--per-address` to a group.
    fn names(args: &Args, devices: usize, prefix: &str) -> Vec<String> {
        let per = args.per_address.max(1);
        (0..devices)
            .map(|i| format!("{prefix}{}-{:06}", i / per, i % per))
            .collect()
    }

    /// An error if a simulator has ended (they only end early on failure).
    fn check(&mut self) -> Result<()> {
        if let Some(i) = self.handles.iter().position(|h| h.is_finished()) {
            let h = self.handles.remove(i);
            match self.rt.block_on(h) {
                Ok(Err(e)) => {
                    if matches!(e, connectord::simulate::SimError::TooManyOpenFiles { .. }) {
                        eprintln!("hint: raise the open files limit (ulimit -n)");
                    }
                    bail!("simulator failed: {e}")
                }
                Ok(Ok(r)) => bail!("simulator ended early: {r:?}"),
                Err(e) => bail!("simulator task failed: {e}"),
            }
        }
        Ok(())
    }

    /// Stops gracefully (devices de-register), bounded; returns the summed report.
    fn stop(mut self, timeout: Duration) -> Option<SimReport> {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        let handles = std::mem::take(&mut self.handles);
        let all = async {
            let mut sum = SimReport::default();
            for h in handles {
                if let Ok(Ok(r)) = h.await {
                    sum.registered += r.registered;
                    sum.failed += r.failed;
                    sum.requests_served += r.requests_served;
                    sum.notifications_sent += r.notifications_sent;
                }
            }
            sum
        };
        let r = self
            .rt
            .block_on(async { tokio::time::timeout(timeout, all).await });
        self.abandon();
        r.ok()
    }

    /// Drops every device without de-registering (the daemon keeps the registrations).
    fn abandon(self) {
        self.rt.shutdown_background();
    }
}

/// Polls `registrations_total` until it reaches `n`: (first seen, last seen) from `t0`.
fn wait_registered(
    api: &Api,
    sims: &mut Sims,
    n: usize,
    t0: Instant,
    timeout: Duration,
) -> Result<(Duration, Duration, u64)> {
    let mut first = None;
    let deadline = t0 + timeout;
    loop {
        let count = api.metric("registrations_total")?;
        let now = t0.elapsed();
        if count > 0 && first.is_none() {
            first = Some(now);
        }
        if count as usize >= n {
            return Ok((first.unwrap_or(now), now, count));
        }
        sims.check()?;
        ensure!(
            Instant::now() < deadline,
            "only {count} of {n} devices registered within {} s",
            timeout.as_secs()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ----------------------------------------------------------------------------------------
// Scenarios
// ----------------------------------------------------------------------------------------

struct RegRun {
    devices: usize,
    first_to_last: Duration,
    start_to_last: Duration,
    rss_before_kib: u64,
    rss_after_kib: u64,
    /// Daemon CPU time from before the first registration to the last one seen.
    cpu: Duration,
    /// The load generator's (this process's) CPU time over the same span: the simulator
    /// and the metrics poller (or the bulk loader).
    gen_cpu: Duration,
    restart_ready: Option<Duration>,
    restart_rest: Option<Duration>,
    restored: Option<u64>,
}

/// Registers `n` devices against a fresh daemon (registrations/s and RSS), then
/// `kill -9`s it and starts it again on the same state (restart time).
///
/// With `bulk`, the endpoints are registered by [`bulk::register`] (many endpoints per
/// socket, registrations only) instead of the simulator (one socket per device).
///
/// With `dtls` (simulator only), the devices speak DTLS with a PSK each (provisioned
/// before the clock and the CPU count start), so each registration includes a handshake.
fn registration_run(
    args: &Args,
    n: usize,
    restart: bool,
    bulk: bool,
    dtls: bool,
) -> Result<RegRun> {
    let timeout = Duration::from_secs(args.timeout_s);
    let mut daemon = if dtls {
        let d = Daemon::start_dtls(&args.daemon, args, "")?;
        d.provision_psks(&Sims::names(args, n, "r"))?;
        d
    } else {
        Daemon::start(&args.daemon, args)?
    };
    let api = daemon.api();
    std::thread::sleep(Duration::from_secs(1));
    let rss_before_kib = vm_rss_kib(daemon.pid())?;
    let cpu0 = cpu_time(daemon.pid())?;
    let gen0 = cpu_time(std::process::id())?;
    let t0 = Instant::now();
    let mut sims = if bulk {
        None
    } else {
        Some(Sims::start(
            args,
            daemon.coap_addr(dtls)?,
            n,
            "r",
            60_000,
            dtls,
        )?)
    };
    let waited = match sims.as_mut() {
        Some(sims) => wait_registered(&api, sims, n, t0, timeout),
        None => bulk::register(daemon.coap, n, args.bulk_sockets, 8, "b", timeout).and_then(|r| {
            // Issue 24: at a million, a few may fail after their retransmissions while
            // the daemon is saturated (the storm is issue 24's other part); the memory
            // and restart figures are then per endpoint actually registered, and say so.
            ensure!(
                r.registered == n,
                "bulk registration: {} of {n} registered, {} failed, {} unfinished at the deadline, {} retransmissions",
                r.registered,
                r.failed,
                r.unfinished,
                r.retransmissions
            );
            if r.registered < n {
                eprintln!(
                    "bulk registration: {} of {n} registered, {} failed, {} retransmissions; figures per registered endpoint",
                    r.registered, r.failed, r.retransmissions
                );
            }
            let count = api.metric("registrations_total")?;
            ensure!(
                count as usize >= r.registered,
                "the daemon counted {count} of {} registrations",
                r.registered
            );
            Ok((Duration::ZERO, r.elapsed, api.metric("registered_endpoints")?))
        }),
    };
    let n = match waited {
        Ok((_, _, count)) if bulk => count as usize,
        _ => n,
    };
    let (first, last, _) = match waited {
        Ok(v) => v,
        Err(e) => {
            if let Some(s) = sims.take() {
                s.abandon();
            }
            for w in daemon.warnings() {
                eprintln!("daemon: {w}");
            }
            return Err(e);
        }
    };
    let cpu = cpu_time(daemon.pid())?.saturating_sub(cpu0);
    let gen_cpu = cpu_time(std::process::id())?.saturating_sub(gen0);
    std::thread::sleep(Duration::from_secs(2));
    let rss_after_kib = vm_rss_kib(daemon.pid())?;
    let mut run = RegRun {
        devices: n,
        first_to_last: last - first,
        start_to_last: last,
        rss_before_kib,
        rss_after_kib,
        cpu,
        gen_cpu,
        restart_ready: None,
        restart_rest: None,
        restored: None,
    };
    if restart {
        // Let the group commit of the last registrations settle: they were acknowledged,
        // so they are durable already; the sleep above covers the rest.
        daemon.kill9();
        if let Some(s) = sims.take() {
            s.abandon();
        }
        let t = Instant::now();
        daemon.spawn()?;
        let ready = t.elapsed();
        let api = daemon.api();
        let restored = loop {
            if let Ok(m) = api.metrics() {
                break m.get("registered_endpoints").copied().unwrap_or(0);
            }
            ensure!(t.elapsed() < timeout, "REST did not answer after restart");
            std::thread::sleep(Duration::from_millis(1));
        };
        run.restart_ready = Some(ready);
        run.restart_rest = Some(t.elapsed());
        run.restored = Some(restored);
    } else if let Some(s) = sims.take() {
        s.abandon();
    }
    Ok(run)
}

/// The part of a long-poll answer the read scenario looks at.
#[derive(serde::Deserialize)]
struct PullBatch<'a> {
    #[serde(rename = "async-responses", default, borrow)]
    async_responses: Vec<PulledAnswer<'a>>,
}

#[derive(serde::Deserialize)]
struct PulledAnswer<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    status: u16,
}

/// Pairs the two halves of a read's latency (its 202 and its async response, which may
/// arrive in either order) by async-response id.
fn record(
    slots: &Mutex<HashMap<String, Slot>>,
    lat: &Mutex<Vec<Duration>>,
    id: String,
    slot: Slot,
) {
    let mut s = slots.lock().unwrap();
    match (s.remove(&id), slot) {
        (Some(Slot::Sent(t)), Slot::Arrived(a)) | (Some(Slot::Arrived(a)), Slot::Sent(t)) => {
            lat.lock().unwrap().push(a.saturating_duration_since(t));
        }
        (_, slot) => {
            s.insert(id, slot);
        }
    }
}

/// Closes the read window when the puller stops, so that no sender waits for permits
/// that will never come back.
struct CloseOnDrop(Arc<tokio::sync::Semaphore>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// One keep-alive HTTP/1.1 connection issuing proxied reads one at a time.
/// A request sender on a shared HTTP/2 connection.
type Http2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// A client connection's byte stream: TCP, or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// A connection to the daemon's REST listener (loopback only), without Nagle; over TLS
/// with `tls` (`--read-https`).
async fn rest_stream(
    rest: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<hyper_util::rt::TokioIo<Box<dyn Io>>> {
    assert!(rest.ip().is_loopback(), "loopback only");
    let stream = tokio::net::TcpStream::connect(rest).await?;
    stream.set_nodelay(true)?;
    let io: Box<dyn Io> = match tls {
        None => Box::new(stream),
        Some(c) => {
            let name = tokio_rustls::rustls::pki_types::ServerName::from(rest.ip());
            Box::new(c.connect(name, stream).await?)
        }
    };
    Ok(hyper_util::rt::TokioIo::new(io))
}

/// Opens an HTTP/2 connection to the daemon (prior knowledge, or ALPN over TLS).
async fn http2_connect(
    rest: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<Http2Sender> {
    let (conn, driver) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        rest_stream(rest, tls).await?,
    )
    .await?;
    tokio::spawn(driver);
    Ok(conn)
}

/// Runs each sender on a task of its own until it is done or `deadline` passes (a sender
/// cut off by the deadline is not an error); the first error of any.
async fn run_read_senders(senders: Vec<ReadSender>, deadline: Instant) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for s in senders {
        tasks.spawn(async move {
            match tokio::time::timeout_at(deadline.into(), s.run()).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        });
    }
    let mut first_err = None;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(anyhow!("sender task: {e}"));
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

struct ReadSender {
    /// A stream of this shared HTTP/2 connection, or (None) an HTTP/1.1 connection of
    /// its own to `rest`.
    http2: Option<Http2Sender>,
    rest: SocketAddr,
    /// `--read-https`: TLS to `rest`.
    tls: Option<tokio_rustls::TlsConnector>,
    auth: Arc<str>,
    names: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    count: usize,
    window: Arc<tokio::sync::Semaphore>,
    slots: Arc<Mutex<HashMap<String, Slot>>>,
    latencies: Arc<Mutex<Vec<Duration>>>,
    accepted: Arc<AtomicUsize>,
    rejected: Arc<Mutex<HashMap<u16, usize>>>,
    /// `--read-rate`: the start and the reads per second; read i waits until
    /// start + i / rate.
    pace: Option<(Instant, f64)>,
}

impl ReadSender {
    async fn run(self) -> Result<()> {
        use http_body_util::{BodyExt, Empty};
        enum Conn {
            H1(hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>),
            H2(hyper::client::conn::http2::SendRequest<Empty<bytes::Bytes>>),
        }
        let mut conn = match &self.http2 {
            Some(c) => Conn::H2(c.clone()),
            None => {
                let (conn, driver) = hyper::client::conn::http1::handshake(
                    rest_stream(self.rest, self.tls.as_ref()).await?,
                )
                .await?;
                tokio::spawn(driver);
                Conn::H1(conn)
            }
        };
        let host = self.rest.to_string();
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.count {
                return Ok(());
            }
            if let Some((start, rate)) = self.pace {
                let at = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
            }
            // Closed: the puller stopped (its error is reported by its join).
            let Ok(permit) = self.window.acquire().await else {
                return Ok(());
            };
            // Given back by the puller when the async response arrives.
            permit.forget();
            let ep = &self.names[i % self.names.len()];
            let uri = match conn {
                Conn::H1(_) => format!("/v2/endpoints/{ep}/3/0/0"),
                Conn::H2(_) => format!("{scheme}://{host}/v2/endpoints/{ep}/3/0/0"),
            };
            let req = http::Request::get(uri)
                .header(http::header::HOST, &host)
                .header(http::header::AUTHORIZATION, &*self.auth)
                .body(Empty::<bytes::Bytes>::new())?;
            let t = Instant::now();
            let resp = match &mut conn {
                Conn::H1(c) => {
                    c.ready().await?;
                    c.send_request(req).await?
                }
                Conn::H2(c) => {
                    c.ready().await?;
                    c.send_request(req).await?
                }
            };
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            if status == 202 {
                let v: Value = serde_json::from_slice(&body)?;
                let id = v["async-response-id"]
                    .as_str()
                    .context("async-response-id")?
                    .to_string();
                self.accepted.fetch_add(1, Ordering::AcqRel);
                record(&self.slots, &self.latencies, id, Slot::Sent(t));
            } else {
                self.window.add_permits(1);
                *self.rejected.lock().unwrap().entry(status).or_default() += 1;
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

enum Slot {
    Sent(Instant),
    Arrived(Instant),
}

struct ReadRun {
    completed: usize,
    ok: usize,
    rejected: HashMap<u16, usize>,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    cpu: Duration,
    /// CPU of the load generator (this process) over the same run.
    bench_cpu: Duration,
    /// The store's commits over the run (`store_commit_duration_seconds_count`), when
    /// the daemon reports them.
    commits: Option<u64>,
}

/// M proxied reads of /3/0/0 over K devices; answers pulled by long-poll.
///
/// With `dtls`, the simulated devices speak DTLS with a PSK each (provisioned and
/// registered before the clock starts), so a read costs the record layer, no handshake.
fn reads_run(args: &Args, dtls: bool) -> Result<ReadRun> {
    let timeout = Duration::from_secs(args.timeout_s);
    let https = if args.read_https {
        Some(https::Https::new(args.read_http2)?)
    } else {
        None
    };
    let rest_lines = https.as_ref().map(|h| h.rest_lines()).unwrap_or_default();
    let daemon = if dtls {
        ensure!(!args.read_bulk, "--read-bulk has no DTLS devices");
        Daemon::start_dtls(&args.daemon, args, &rest_lines)?
    } else {
        Daemon::start_rest(&args.daemon, args, &rest_lines, "")?
    };
    let api = daemon.api();
    api.open_channel()?;
    let k = args.read_devices.max(1);
    let (load, names) = if !args.read_bulk {
        if dtls {
            daemon.provision_psks(&Sims::names(args, k, "p"))?;
        }
        let mut sims = Sims::start(args, daemon.coap_addr(dtls)?, k, "p", 60_000, dtls)?;
        if let Err(e) = wait_registered(&api, &mut sims, k, Instant::now(), timeout) {
            sims.abandon();
            return Err(e);
        }
        (Load::Sim(sims), Sims::names(args, k, "p"))
    } else {
        // Never notifies (nothing observes); answers every GET.
        let responder = bulk::Notifier::start(
            daemon.coap,
            k,
            args.read_sockets,
            Duration::from_secs(3600),
            timeout,
        )?;
        let t = Instant::now();
        while (responder.counters.registered.load(Ordering::Relaxed) as usize) < k {
            ensure!(
                t.elapsed() < timeout,
                "bulk responder: {} of {k} registered within {} s",
                responder.counters.registered.load(Ordering::Relaxed),
                timeout.as_secs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let names = (0..k)
            .map(|i| bulk::Notifier::endpoint_name(i, k, args.read_sockets))
            .collect();
        (Load::Bulk(responder), names)
    };
    let names: Arc<Vec<String>> = Arc::new(names);

    let slots: Arc<Mutex<HashMap<String, Slot>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let window = Arc::new(tokio::sync::Semaphore::new(args.read_window.max(1)));
    let next = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let senders_done = Arc::new(AtomicBool::new(false));
    let rejected: Arc<Mutex<HashMap<u16, usize>>> = Arc::default();
    let m = args.read_count;
    let commits0 = api.metric("store_commit_duration_seconds_count").ok();
    let cpu0 = cpu_time(daemon.pid())?;
    let own_cpu0 = cpu_time(std::process::id())?;
    let t0 = Instant::now();
    let deadline = t0 + timeout;

    // The long-poll puller.
    let puller = {
        let api = daemon.api();
        let (slots, latencies, window) = (
            Arc::clone(&slots),
            Arc::clone(&latencies),
            Arc::clone(&window),
        );
        let (accepted, senders_done) = (Arc::clone(&accepted), Arc::clone(&senders_done));
        std::thread::spawn(move || -> Result<(usize, usize, Instant)> {
            // However it ends, senders waiting for the window stop waiting.
            let _close = CloseOnDrop(Arc::clone(&window));
            let (mut got, mut ok, mut last) = (0usize, 0usize, Instant::now());
            while !(senders_done.load(Ordering::Acquire) && got >= accepted.load(Ordering::Acquire))
            {
                if Instant::now() >= deadline {
                    break;
                }
                let (status, body) = api.get("/v2/notification/pull")?;
                if status == 204 {
                    continue;
                }
                ensure!(status == 200, "pull answered {status}: {body}");
                // Typed and borrowed: only the id and status of each answer are read,
                // instead of building a `Value` tree of the whole batch.
                let batch: PullBatch<'_> = serde_json::from_str(&body)?;
                let now = Instant::now();
                for e in batch.async_responses {
                    let id = e.id.to_string();
                    if e.status == 200 {
                        ok += 1;
                    }
                    got += 1;
                    last = now;
                    window.add_permits(1);
                    record(&slots, &latencies, id, Slot::Arrived(now));
                }
            }
            Ok((got, ok, last))
        })
    };

    // The senders: `read_connections` keep-alive HTTP/1.1 connections, each one request
    // at a time, driven by a small tokio runtime (no thread per connection, no polling:
    // the window is a semaphore the puller gives permits back to).
    let senders = {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.read_client_threads.max(1))
            .enable_all()
            .build()?;
        let auth: Arc<str> = api.auth.clone().into();
        let (rest, tls) = match &https {
            None => (daemon.rest, None),
            Some(h) => {
                let ready = daemon.ready.as_ref().context("ready file")?;
                let addr = *ready.rest_tls.first().context("no HTTPS address")?;
                (addr, Some(h.connector.clone()))
            }
        };
        let result = rt.block_on(async {
            let mut h2 = Vec::new();
            if args.read_http2 {
                for _ in 0..args.read_h2_connections.max(1) {
                    h2.push(http2_connect(rest, tls.as_ref()).await?);
                }
            }
            let mut senders = Vec::new();
            for i in 0..args.read_connections.max(1) {
                senders.push(ReadSender {
                    http2: h2.get(i % h2.len().max(1)).cloned(),
                    rest,
                    tls: tls.clone(),
                    auth: Arc::clone(&auth),
                    names: Arc::clone(&names),
                    next: Arc::clone(&next),
                    count: m,
                    window: Arc::clone(&window),
                    slots: Arc::clone(&slots),
                    latencies: Arc::clone(&latencies),
                    accepted: Arc::clone(&accepted),
                    rejected: Arc::clone(&rejected),
                    pace: (args.read_rate > 0.0).then_some((t0, args.read_rate)),
                });
            }
            run_read_senders(senders, deadline).await
        });
        rt.shutdown_background();
        result
    };
    if let Err(e) = senders {
        senders_done.store(true, Ordering::Release);
        load.abandon();
        return Err(e);
    }
    senders_done.store(true, Ordering::Release);
    let (completed, ok, last) = puller.join().map_err(|_| anyhow!("puller panicked"))??;
    let cpu = cpu_time(daemon.pid())?.saturating_sub(cpu0);
    // This process: the HTTP clients, the puller and the simulated devices.
    let bench_cpu = cpu_time(std::process::id())?.saturating_sub(own_cpu0);
    let commits = commits0.and_then(|c0| {
        let c1 = api.metric("store_commit_duration_seconds_count").ok()?;
        Some(c1.saturating_sub(c0))
    });
    load.abandon();
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap());
    lat.sort();
    let rejected = rejected.lock().unwrap().clone();
    Ok(ReadRun {
        completed,
        ok,
        rejected,
        elapsed: last.saturating_duration_since(t0),
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        max: lat.last().copied().unwrap_or_default(),
        cpu,
        bench_cpu,
        commits,
    })
}

struct NotifyRun {
    devices: usize,
    delivered: u64,
    accepted: u64,
    discarded: u64,
    window: Duration,
    sim_sent_total: Option<u64>,
    cpu: Duration,
    /// Notifications dropped at an observation's full queue.
    dropped: u64,
    /// The store's commits in the window.
    commits: u64,
}

/// What offers the notifications.
enum Load {
    Sim(Sims),
    Bulk(bulk::Notifier),
}

impl Load {
    /// Stops the devices without de-registering them.
    fn abandon(self) {
        match self {
            Load::Sim(s) => s.abandon(),
            Load::Bulk(n) => drop(n.stop()),
        }
    }
}

/// Devices with a short notify interval, pre-subscribed; notifications counted on the
/// long-poll over a fixed window.
///
/// With `webhook`, the key's channel is a callback to [`webhook::Receiver`] instead of a
/// long-poll, and the receiver counts what arrives.
fn notifications_run(args: &Args, webhook: bool) -> Result<NotifyRun> {
    let timeout = Duration::from_secs(args.timeout_s);
    let mut daemon = Daemon::start(&args.daemon, args)?;
    let api = daemon.api();
    api.open_channel()?;
    let receiver = if webhook {
        let r = webhook::start()?;
        let (s, b) = api.put_json(
            "/v2/notification/callback",
            &json!({ "url": format!("http://{}/notify", r.addr) }).to_string(),
        )?;
        ensure!(
            (200..300).contains(&s),
            "PUT /v2/notification/callback answered {s}: {b}"
        );
        Some(r)
    } else {
        None
    };
    let (s, b) = api.put_json("/v2/subscriptions", r#"[{"resource-path": ["/3303/*"]}]"#)?;
    ensure!(
        (200..300).contains(&s),
        "PUT /v2/subscriptions answered {s}: {b}"
    );
    let n = args.notify_devices.max(1);

    let count = match &receiver {
        Some(r) => Arc::clone(&r.count),
        None => Arc::new(AtomicU64::new(0)),
    };
    let stop = Arc::new(AtomicBool::new(receiver.is_some()));
    let puller = {
        let api = daemon.api();
        let (count, stop) = (Arc::clone(&count), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let Ok((status, body)) = api.get("/v2/notification/pull") else {
                    return;
                };
                if status != 200 {
                    continue;
                }
                if let Some(k) = webhook::count_notifications(body.as_bytes()) {
                    count.fetch_add(k as u64, Ordering::Relaxed);
                }
            }
        })
    };

    let interval = Duration::from_millis(args.notify_interval_ms.max(1));
    let load = if args.notify_sim {
        let mut sims = Sims::start(
            args,
            daemon.coap,
            n,
            "n",
            args.notify_interval_ms.max(1),
            false,
        )?;
        if let Err(e) = wait_registered(&api, &mut sims, n, Instant::now(), timeout) {
            sims.abandon();
            stop.store(true, Ordering::Release);
            return Err(e);
        }
        Load::Sim(sims)
    } else {
        let notifier =
            bulk::Notifier::start(daemon.coap, n, args.notify_sockets, interval, timeout)?;
        let t = Instant::now();
        while (notifier.counters.observed.load(Ordering::Relaxed) as usize) < n {
            if t.elapsed() > timeout {
                stop.store(true, Ordering::Release);
                bail!(
                    "bulk notifier: {} registered, {} observations of {n} within {} s",
                    notifier.counters.registered.load(Ordering::Relaxed),
                    notifier.counters.observed.load(Ordering::Relaxed),
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Load::Bulk(notifier)
    };
    std::thread::sleep(Duration::from_secs(args.notify_warmup_s));
    let m0 = api.metrics()?;
    let cpu0 = cpu_time(daemon.pid())?;
    let c0 = count.load(Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(args.notify_window_s.max(1)));
    let c1 = count.load(Ordering::Relaxed);
    let window = t0.elapsed();
    let cpu = cpu_time(daemon.pid())?.saturating_sub(cpu0);
    let m1 = api.metrics()?;
    let delta = |k: &str| m1.get(k).unwrap_or(&0) - m0.get(k).unwrap_or(&0);
    stop.store(true, Ordering::Release);
    let sent_total = match load {
        Load::Sim(sims) => sims
            .stop(Duration::from_secs(20))
            .map(|r| r.notifications_sent),
        Load::Bulk(notifier) => {
            let sent = notifier.counters.sent.load(Ordering::Relaxed);
            notifier.stop()?;
            Some(sent)
        }
    };
    daemon.kill9();
    let _ = puller.join();
    Ok(NotifyRun {
        devices: n,
        delivered: c1 - c0,
        accepted: delta("observe_notifications_total"),
        discarded: delta("events_discarded_total"),
        dropped: delta("coap_responses_dropped_total"),
        commits: delta("store_commit_duration_seconds_count"),
        window,
        sim_sent_total: sent_total,
        cpu,
    })
}

// ----------------------------------------------------------------------------------------
// Main
// ----------------------------------------------------------------------------------------

fn main() -> Result<()> {
    set_purge_delay();
    let args = Args::parse();
    if args.cluster {
        eprintln!(
            "connectord-bench --cluster: daemon {}, {} CPUs",
            args.daemon.display(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
        );
        return cluster::run(&args);
    }
    let all = !(args.registrations
        || args.auth_cost
        || args.reads
        || args.notifications
        || args.rss
        || args.restart
        || args.dtls
        || args.storm
        || args.expiry
        || args.io_floor
        || args.peer.peer);
    let (reg, reads, notif, rss, restart) = (
        all || args.registrations,
        all || args.reads,
        all || args.notifications,
        all || args.rss,
        all || args.restart,
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    eprintln!(
        "connectord-bench: daemon {}, {} CPUs, open files limit {}",
        args.daemon.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        open_files_limit().map_or("?".into(), |l| l.to_string())
    );

    if args.dtls {
        eprintln!("DTLS handshakes and sessions (in this process) …");
        match dtls::run(args.dtls_handshakes, args.dtls_sessions) {
            Ok(r) => rows.extend(r),
            Err(e) => failures.push(format!("DTLS scenario: {e:#}")),
        }
    }
    if args.storm {
        eprintln!(
            "registration storm: {} endpoints from {} sockets, {} outstanding per socket …",
            args.big_devices, args.bulk_sockets, args.storm_window
        );
        match storm::run(&args) {
            Ok(r) => rows.extend(r),
            Err(e) => failures.push(format!("registration storm: {e:#}")),
        }
    }
    if args.io_floor {
        eprintln!("I/O floor: a read's system calls without a daemon …");
        match floor::run(args.floor_requests, args.floor_datagrams) {
            Ok(r) => rows.extend(r),
            Err(e) => failures.push(format!("I/O floor: {e:#}")),
        }
    }
    if args.expiry {
        eprintln!(
            "expiry: {} endpoints from {} sockets, then an outage longer than their lifetime …",
            args.big_devices, args.bulk_sockets
        );
        match expiry::run(&args) {
            Ok(r) => rows.extend(r),
            Err(e) => failures.push(format!("expiry: {e:#}")),
        }
    }
    let mut reg_runs = Vec::new();
    if reg || rss || restart {
        let mut sizes = vec![(args.devices, false)];
        if args.big && (rss || restart) {
            sizes.push((args.big_devices, true));
        }
        for (n, bulk) in sizes {
            if bulk {
                eprintln!(
                    "registering {n} endpoints from {} sockets (bulk, registrations only) …",
                    args.bulk_sockets
                );
            } else {
                eprintln!("registering {n} devices …");
            }
            match registration_run(&args, n, restart, bulk, false) {
                Ok(r) => reg_runs.push(r),
                Err(e) => failures.push(format!("registration run with {n} devices: {e:#}")),
            }
        }
    }
    // The same registrations over DTLS (PSK), after the plain run of the same size.
    let mut dtls_reg = None;
    if reg && args.coap_dtls {
        let n = args.devices;
        eprintln!("registering {n} devices over DTLS (PSK each) …");
        match registration_run(&args, n, false, false, true) {
            Ok(r) => dtls_reg = Some(r),
            Err(e) => failures.push(format!("DTLS registration run with {n} devices: {e:#}")),
        }
    }
    for (i, r) in reg_runs.iter().enumerate() {
        let n = r.devices;
        if reg && i == 0 {
            let rate = (n.saturating_sub(1)) as f64 / r.first_to_last.as_secs_f64().max(1e-9);
            rows.push(Row {
                scenario: format!("registrations/s ({n} devices)"),
                value: rate,
                unit: "reg/s",
                target: Some((20_000.0, true)),
                detail: format!(
                    "first→last {:.2} s; simulator start→last {:.2} s; daemon CPU {:.1} µs per registration, load generator {:.1} µs (10 ms clock ticks)",
                    r.first_to_last.as_secs_f64(),
                    r.start_to_last.as_secs_f64(),
                    r.cpu.as_secs_f64() * 1e6 / n as f64,
                    r.gen_cpu.as_secs_f64() * 1e6 / n as f64
                ),
            });
        }
        if rss {
            let per = (r.rss_after_kib.saturating_sub(r.rss_before_kib)) as f64 * 1024.0
                / n as f64
                / 1024.0;
            rows.push(Row {
                scenario: format!("RSS per endpoint ({n} endpoints)"),
                value: per,
                unit: "KiB",
                target: Some((2.0, false)),
                detail: format!(
                    "VmRSS {} KiB before, {} KiB after",
                    r.rss_before_kib, r.rss_after_kib
                ),
            });
        }
        if restart && let (Some(ready), Some(rest)) = (r.restart_ready, r.restart_rest) {
            rows.push(Row {
                scenario: format!("restart after kill -9 ({n} stored)"),
                value: rest.as_secs_f64(),
                unit: "s",
                target: Some((2.0, false)),
                detail: format!(
                    "spawn→ready file {:.3} s, spawn→REST answer {:.3} s, {} registrations restored",
                    ready.as_secs_f64(),
                    rest.as_secs_f64(),
                    r.restored.unwrap_or(0)
                ),
            });
        }
    }
    if let Some(r) = &dtls_reg {
        let n = r.devices;
        let rate = (n.saturating_sub(1)) as f64 / r.first_to_last.as_secs_f64().max(1e-9);
        let cpu_us = r.cpu.as_secs_f64() * 1e6 / n as f64;
        rows.push(Row {
            scenario: format!("registrations/s over DTLS ({n} devices, PSK each)"),
            value: rate,
            unit: "reg/s",
            target: None,
            detail: format!(
                "handshake included; first→last {:.2} s; simulator start→last {:.2} s; daemon CPU {cpu_us:.1} µs per registration",
                r.first_to_last.as_secs_f64(),
                r.start_to_last.as_secs_f64(),
            ),
        });
        let per = (r.rss_after_kib.saturating_sub(r.rss_before_kib)) as f64 / n as f64;
        rows.push(Row {
            scenario: format!("RSS per endpoint over DTLS ({n} endpoints and sessions)"),
            value: per,
            unit: "KiB",
            target: None,
            detail: format!(
                "VmRSS {} KiB before, {} KiB after (the PSKs provisioned before)",
                r.rss_before_kib, r.rss_after_kib
            ),
        });
        if let Some(plain) = reg_runs.first().filter(|p| p.devices == n) {
            let plain_us = plain.cpu.as_secs_f64() * 1e6 / n as f64;
            rows.push(Row {
                scenario: "daemon CPU per registration, DTLS / plain".into(),
                value: cpu_us / plain_us.max(1e-9),
                unit: "x",
                target: None,
                detail: format!("{cpu_us:.1} µs over DTLS, {plain_us:.1} µs plain"),
            });
        }
    }
    if args.big && (rss || restart) && reg_runs.len() < 2 && failures.is_empty() {
        failures.push("--big run not done".into());
    }

    if reads {
        eprintln!(
            "proxied reads: {} reads over {} devices …",
            args.read_count, args.read_devices
        );
        let modes: &[bool] = if args.coap_dtls {
            &[false, true]
        } else {
            &[false]
        };
        let mut cpu_per_read = Vec::new();
        for &dtls in modes {
            match reads_run(&args, dtls) {
                Ok(r) => {
                    let secs = r.elapsed.as_secs_f64().max(1e-9);
                    let cpu_us = r.cpu.as_secs_f64() * 1e6 / r.completed.max(1) as f64;
                    cpu_per_read.push(cpu_us);
                    rows.push(Row {
                        scenario: format!(
                            "proxied reads/s{} ({} reads, {} devices, {}{})",
                            if dtls { " over DTLS" } else { "" },
                            args.read_count,
                            args.read_devices,
                            if args.read_rate > 0.0 {
                                format!("paced at {}/s, ", args.read_rate)
                            } else {
                                String::new()
                            },
                            if args.read_http2 {
                                format!(
                                    "HTTP/2{}, {} streams over {} connections",
                                    if args.read_https { " over TLS" } else { "" },
                                    args.read_connections,
                                    args.read_h2_connections
                                )
                            } else {
                                format!(
                                    "HTTP/1.1{}, {} connections",
                                    if args.read_https { " over TLS" } else { "" },
                                    args.read_connections
                                )
                            }
                        ),
                        value: r.completed as f64 / secs,
                        unit: "reads/s",
                        target: (!dtls && args.read_rate <= 0.0).then_some((30_000.0, true)),
                        detail: format!(
                            "{} answered ({} status 200) in {:.2} s; REST→async response p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; refused {:?}; daemon CPU {cpu_us:.1} µs per read, load generator {:.1} µs; {} store commits per 100 reads",
                            r.completed,
                            r.ok,
                            secs,
                            r.p50.as_secs_f64() * 1e3,
                            r.p99.as_secs_f64() * 1e3,
                            r.max.as_secs_f64() * 1e3,
                            r.rejected,
                            r.bench_cpu.as_secs_f64() * 1e6 / r.completed.max(1) as f64,
                            r.commits.map_or("?".to_string(), |c| format!(
                                "{:.1}",
                                c as f64 * 100.0 / r.completed.max(1) as f64
                            ))
                        ),
                    });
                }
                Err(e) => failures.push(format!(
                    "proxied reads{}: {e:#}",
                    if dtls { " over DTLS" } else { "" }
                )),
            }
        }
        if let [plain, dtls] = cpu_per_read[..] {
            rows.push(Row {
                scenario: "daemon CPU per proxied read, DTLS / plain".into(),
                value: dtls / plain.max(1e-9),
                unit: "x",
                target: Some((1.3, false)),
                detail: format!("{dtls:.1} µs over DTLS, {plain:.1} µs plain"),
            });
        }
    }

    if notif {
        eprintln!(
            "notifications: {} devices every {} ms …",
            args.notify_devices, args.notify_interval_ms
        );
        for webhook in [false, true] {
            match notifications_run(&args, webhook) {
                Ok(r) => {
                    let secs = r.window.as_secs_f64();
                    let offered = r.devices as f64 * 1000.0 / args.notify_interval_ms.max(1) as f64;
                    rows.push(Row {
                    scenario: format!(
                        "notifications/s to {} ({} devices, {} ms)",
                        if webhook { "webhook" } else { "long-poll" },
                        r.devices, args.notify_interval_ms
                    ),
                    value: r.delivered as f64 / secs,
                    unit: "notif/s",
                    target: Some((100_000.0, true)),
                    detail: format!(
                        "{} delivered in {:.1} s; daemon accepted {:.0}/s from devices; offered ≤ {:.0}/s; {} events discarded; {} dropped at full observation queues; devices sent {} in the whole run; daemon CPU {:.1} µs per accepted notification ({:.0} % of a core); {:.1} store commits per 1000 notifications",
                        r.delivered,
                        secs,
                        r.accepted as f64 / secs,
                        offered,
                        r.discarded,
                        r.dropped,
                        r.sim_sent_total.map_or("?".into(), |s| s.to_string()),
                        r.cpu.as_secs_f64() * 1e6 / r.accepted.max(1) as f64,
                        r.cpu.as_secs_f64() * 100.0 / secs,
                        r.commits as f64 * 1000.0 / r.accepted.max(1) as f64
                    ),
                });
                }
                Err(e) => failures.push(format!(
                    "notifications to {}: {e:#}",
                    if webhook { "webhook" } else { "long-poll" }
                )),
            }
        }
    }

    if args.auth_cost {
        for (what, more) in [
            ("connector, verdicts reused", ""),
            (
                "pelion + connector, no reuse",
                "[plugins]\nauth = [\"pelion\", \"connector\"]\n",
            ),
        ] {
            eprintln!("REST auth cost ({what}): {} requests …", args.auth_requests);
            match auth_cost_run(&args, more) {
                Ok((rate, cpu_us)) => rows.push(Row {
                    scenario: format!("authenticated GET /endpoints/s ({what})"),
                    value: rate,
                    unit: "req/s",
                    target: None,
                    detail: format!(
                        "{} requests one at a time on one connection; daemon CPU {cpu_us:.1} µs per request",
                        args.auth_requests
                    ),
                }),
                Err(e) => failures.push(format!("REST auth cost ({what}): {e:#}")),
            }
        }
    }

    peer::scenario(&args, all, &mut rows, &mut failures);

    println!();
    println!(
        "{:<52} {:>14} {:>9} {:>8}  detail",
        "scenario", "measured", "target", "met"
    );
    for r in &rows {
        let target = r.target.map_or("-".into(), |(t, higher)| {
            format!("{}{}", if higher { "≥" } else { "≤" }, t)
        });
        let met = match r.met() {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!(
            "{:<52} {:>10.3} {:<7} {:>7} {:>5}  {}",
            r.scenario, r.value, r.unit, target, met, r.detail
        );
    }
    for f in &failures {
        println!("FAILED: {f}");
    }
    if let Some(path) = &args.json {
        let out = json!({
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "results": rows.iter().map(|r| json!({
                "scenario": r.scenario,
                "value": r.value,
                "unit": r.unit,
                "target": r.target.map(|t| t.0),
                "met": r.met(),
                "detail": r.detail,
            })).collect::<Vec<_>>(),
            "failures": failures,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    if failures.is_empty() {
        Ok(())
    } else {
        bail!("{} scenario(s) failed", failures.len())
    }
}

/// One run of `--auth-cost`: a daemon with `more` configuration; `GET /endpoints` with the
/// admin key, one request at a time on one keep-alive connection. Requests per second and
/// the daemon's CPU (user + system) per request.
fn auth_cost_run(args: &Args, more: &str) -> Result<(f64, f64)> {
    let d = Daemon::start_with(&args.daemon, args, more)?;
    let api = d.api();
    let get = || -> Result<()> {
        let (status, body) = api.get("/endpoints")?;
        ensure!(status == 200, "GET /endpoints answered {status}: {body}");
        Ok(())
    };
    for _ in 0..args.auth_requests / 10 {
        get()?;
    }
    let pid = d.pid();
    let (t0, c0) = (Instant::now(), cpu_time(pid)?);
    for _ in 0..args.auth_requests {
        get()?;
    }
    let (wall, cpu) = (t0.elapsed(), cpu_time(pid)? - c0);
    let n = args.auth_requests.max(1) as f64;
    Ok((n / wall.as_secs_f64(), cpu.as_secs_f64() * 1e6 / n))
}
