//! `--cluster` (issue 22): the cost of running on NATS JetStream, side by side in one run.
//!
//! Configurations, each on fresh daemons (and a fresh `nats-server` of the bench's own on
//! free loopback ports, never 4222: `connectord_testkit::nats::NatsServer`):
//! SQLite (one node, the default backend), then NATS with each node count of `--nodes`
//! (default 1, 2 and 3), every node a `connectord` process with `[cluster] backend =
//! "nats"` on that one server, the CA of the first copied to the others (as
//! docs/cluster.md tells operators).
//!
//! Scenarios of each configuration, each on its own fresh cluster:
//! - **registrations/s**: `--cluster-devices` simulated devices spread evenly over the
//!   nodes (each node's share registers with its CoAP listener), counted from the nodes'
//!   `registrations_total`; also how long until every node lists every device, the
//!   nodes' RSS growth and the JetStream bytes of the streams (from the server's
//!   monitoring port, `/jsz?streams=1`).
//! - **notifications/s**: `--notify-devices` bulk-notifier endpoints spread over the nodes,
//!   pre-subscribed on every node; one long-poll on each node for the same key counts what
//!   arrives (`--cluster-one-poll`: on node 1 only, the node that opens the key's channel
//!   first and so owns it; with shared channels the others' long-polls are forwarded to
//!   the owner).
//! - **proxied reads/s through the owner**: `--read-devices` simulated devices on node 1,
//!   `--cluster-read-count` reads of `/3/0/0` sent to node 1.
//! - **proxied reads/s through a non-owner** (2 nodes or more): the same devices on node 1,
//!   the reads sent to the other nodes. Until requests are forwarded between nodes, a
//!   non-owner refuses them with 503: the bench then prints the scenario as unmeasured,
//!   with the node's answer, and no rate. The async responses are pulled from every
//!   node's long-poll, wherever they arrive.
//!
//! Every rate comes with the daemons' CPU per operation (user + system from
//! `/proc/<pid>/stat`, summed over the nodes) and the nats-server's CPU per operation,
//! separately. The simulator and the HTTP clients run in this process on the same cores.
//! `--cluster-runs` repeats the whole set, configurations interleaved, and the summary
//! gives each figure's spread (min–max over the runs).

use std::collections::BTreeMap;

use connectord_testkit::nats::NatsServer;

use super::*;

/// A configuration: SQLite (one node) or `n` nodes on one NATS server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Sqlite,
    Nats(usize),
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::Sqlite => write!(f, "SQLite, 1 node"),
            Kind::Nats(1) => write!(f, "NATS, 1 node"),
            Kind::Nats(n) => write!(f, "NATS, {n} nodes"),
        }
    }
}

/// The daemons of one configuration and the nats-server they share.
struct Cluster {
    nodes: Vec<Daemon>,
    nats: Option<NatsServer>,
}

impl Cluster {
    fn start(args: &Args, kind: Kind) -> Result<Cluster> {
        match kind {
            Kind::Sqlite => Ok(Cluster {
                nodes: vec![Daemon::start(&args.daemon, args)?],
                nats: None,
            }),
            Kind::Nats(n) => {
                ensure!(n >= 1, "--nodes: a configuration needs at least one node");
                let nats = NatsServer::start().context("starting nats-server")?;
                ensure!(nats.port() != 4222, "never the machine's own NATS port");
                let mut nodes: Vec<Daemon> = Vec::new();
                for i in 1..=n {
                    let d = start_node(args, &nats.url(), &format!("n{i}"), nodes.first())
                        .with_context(|| format!("starting node n{i}"))?;
                    nodes.push(d);
                }
                let c = Cluster {
                    nodes,
                    nats: Some(nats),
                };
                c.wait_members(Duration::from_secs(args.timeout_s))?;
                Ok(c)
            }
        }
    }

    /// Waits until every node lists every node in `GET /v2/cluster`.
    fn wait_members(&self, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        for d in &self.nodes {
            loop {
                let (s, b) = d.api().get("/v2/cluster")?;
                ensure!(s == 200, "GET /v2/cluster answered {s}: {b}");
                let v: Value = serde_json::from_str(&b)?;
                let members = v["members"].as_array().map_or(0, Vec::len);
                if members >= self.nodes.len() {
                    break;
                }
                ensure!(
                    t.elapsed() < timeout,
                    "a node lists {members} of {} members",
                    self.nodes.len()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// The nodes the bench long-polls the key on: every node, or node 1 only with
    /// `--cluster-one-poll`.
    fn pollers<'a>(&'a self, args: &Args) -> &'a [Daemon] {
        if args.cluster_one_poll {
            &self.nodes[..1]
        } else {
            &self.nodes
        }
    }

    /// CPU time of every node's process, summed.
    fn daemon_cpu(&self) -> Result<Duration> {
        self.nodes.iter().map(|d| cpu_time(d.pid())).sum()
    }

    /// CPU time of the nats-server (zero without one).
    fn nats_cpu(&self) -> Result<Duration> {
        match self.nats.as_ref().and_then(NatsServer::pid) {
            Some(pid) => cpu_time(pid),
            None => Ok(Duration::ZERO),
        }
    }

    fn nats_rss_kib(&self) -> Option<u64> {
        let pid = self.nats.as_ref().and_then(NatsServer::pid)?;
        vm_rss_kib(pid).ok()
    }

    /// Sum of a metric over the nodes.
    fn metric_sum(&self, name: &str) -> Result<u64> {
        self.nodes.iter().map(|d| d.api().metric(name)).sum()
    }

    /// JetStream's streams (name → (messages, bytes)) from the monitoring port's
    /// `/jsz?streams=1`; empty without a NATS server.
    fn streams(&self) -> Result<BTreeMap<String, (u64, u64)>> {
        let Some(nats) = &self.nats else {
            return Ok(BTreeMap::new());
        };
        let url = format!("http://127.0.0.1:{}/jsz?streams=1", nats.monitor_port());
        let body = ureq::get(&url)
            .call()
            .with_context(|| format!("GET {url}"))?
            .body_mut()
            .read_to_string()?;
        let v: Value = serde_json::from_str(&body).context("/jsz answer")?;
        let mut out = BTreeMap::new();
        for account in v["account_details"].as_array().into_iter().flatten() {
            for s in account["stream_detail"].as_array().into_iter().flatten() {
                if let Some(name) = s["name"].as_str() {
                    out.insert(
                        name.to_string(),
                        (
                            s["state"]["messages"].as_u64().unwrap_or(0),
                            s["state"]["bytes"].as_u64().unwrap_or(0),
                        ),
                    );
                }
            }
        }
        Ok(out)
    }
}

/// The `[cluster]` section of node `node` on the server at `url`.
fn cluster_section(url: &str, node: &str) -> String {
    format!("[cluster]\nbackend = \"nats\"\nservers = [{url:?}]\nnode = \"{node}\"\n")
}

/// A NATS node: the bench's daemon configuration with `[cluster]`; for a later node the
/// first node's CA is copied into its state directory before it starts (every node must
/// sign with the cluster's CA) and the first node's admin key is used (a later node
/// writes none).
fn start_node(args: &Args, url: &str, node: &str, first: Option<&Daemon>) -> Result<Daemon> {
    let bin = std::fs::canonicalize(&args.daemon).with_context(|| {
        format!(
            "daemon binary {} (build it: cargo build --release -p connectord)",
            args.daemon.display()
        )
    })?;
    let prepared = connectord_testkit::Launch::new(bin)
        .log_level(&args.log_level)
        .extra(&format!(
            "[notifications]\nmax_batch = {}\n[runtime]\nworker_threads = {}\n{}",
            args.max_batch,
            args.worker_threads,
            cluster_section(url, node)
        ))
        .keep_logs(connectord_testkit::KeepLogs::StartAndWarnings)
        .timeout(Duration::from_secs(args.timeout_s))
        .prepare()?;
    if let Some(first) = first {
        let to = prepared.dir.path().join("state");
        std::fs::create_dir_all(&to)?;
        for f in ["ca.key.pem", "ca.cert.pem"] {
            std::fs::copy(first.state_dir().join(f), to.join(f))
                .with_context(|| format!("copying {f} to node {node}"))?;
        }
    }
    let mut d = prepared.start()?;
    if let Some(first) = first {
        d.key = first.0.key.clone();
    }
    let d = Daemon(d);
    d.check()?;
    Ok(d)
}

// ----------------------------------------------------------------------------------------
// Registrations
// ----------------------------------------------------------------------------------------

struct RegFig {
    devices: usize,
    rate: f64,
    /// From the last registration counted to every node listing every device.
    listed_everywhere_after: Duration,
    daemon_cpu: Duration,
    nats_cpu: Duration,
    /// VmRSS growth of each node, KiB.
    rss_growth_kib: Vec<u64>,
    nats_rss_growth_kib: Option<u64>,
    /// Growth of each JetStream stream over the run: name → (messages, bytes).
    streams: BTreeMap<String, (u64, u64)>,
}

fn registrations(args: &Args, kind: Kind) -> Result<RegFig> {
    let timeout = Duration::from_secs(args.timeout_s);
    let c = Cluster::start(args, kind)?;
    let n = args.cluster_devices.max(1);
    let k = c.nodes.len();
    check_fds(n)?;
    std::thread::sleep(Duration::from_secs(1));
    let rss0: Vec<u64> = c
        .nodes
        .iter()
        .map(|d| vm_rss_kib(d.pid()))
        .collect::<Result<_>>()?;
    let nats_rss0 = c.nats_rss_kib();
    let streams0 = c.streams()?;
    let (cpu0, ncpu0) = (c.daemon_cpu()?, c.nats_cpu()?);
    let t0 = Instant::now();
    let mut sims = Vec::new();
    for (i, d) in c.nodes.iter().enumerate() {
        let share = n / k + usize::from(i < n % k);
        if share > 0 {
            sims.push(Sims::start(
                args,
                d.coap,
                share,
                &format!("r{i}-"),
                60_000,
                false,
            )?);
        }
    }
    let apis: Vec<Api> = c.nodes.iter().map(|d| d.api()).collect();
    let mut first = None;
    let waited = (|| -> Result<Duration> {
        loop {
            let mut count = 0;
            for a in &apis {
                count += a.metric("registrations_total")?;
            }
            let now = t0.elapsed();
            if count > 0 && first.is_none() {
                first = Some(now);
            }
            if count as usize >= n {
                return Ok(now);
            }
            for s in sims.iter_mut() {
                s.check()?;
            }
            ensure!(
                t0.elapsed() < timeout,
                "only {count} of {n} devices registered within {} s",
                timeout.as_secs()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    })();
    let last = match waited {
        Ok(l) => l,
        Err(e) => {
            sims.into_iter().for_each(Sims::abandon);
            for d in &c.nodes {
                for w in d.warnings() {
                    eprintln!("daemon: {w}");
                }
            }
            return Err(e);
        }
    };
    // Every node lists every device (the directory follows the registrations bucket);
    // the CPU is read after that, so that it includes the other nodes applying each
    // registration to their directory.
    let t = Instant::now();
    for a in &apis {
        while (a.metric("registered_endpoints")? as usize) < n {
            ensure!(
                t.elapsed() < timeout,
                "a node lists {} of {n} devices",
                a.metric("registered_endpoints")?
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let listed_everywhere_after = t.elapsed();
    let (cpu, ncpu) = (
        c.daemon_cpu()?.saturating_sub(cpu0),
        c.nats_cpu()?.saturating_sub(ncpu0),
    );
    std::thread::sleep(Duration::from_secs(2));
    let rss1: Vec<u64> = c
        .nodes
        .iter()
        .map(|d| vm_rss_kib(d.pid()))
        .collect::<Result<_>>()?;
    let nats_rss1 = c.nats_rss_kib();
    let streams1 = c.streams()?;
    sims.into_iter().for_each(Sims::abandon);
    let first = first.unwrap_or(last);
    let streams = growth(&streams0, streams1);
    Ok(RegFig {
        devices: n,
        rate: n.saturating_sub(1) as f64 / (last - first).as_secs_f64().max(1e-9),
        listed_everywhere_after,
        daemon_cpu: cpu,
        nats_cpu: ncpu,
        rss_growth_kib: rss1
            .iter()
            .zip(&rss0)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect(),
        nats_rss_growth_kib: nats_rss0.zip(nats_rss1).map(|(a, b)| b.saturating_sub(a)),
        streams,
    })
}

// ----------------------------------------------------------------------------------------
// Notifications
// ----------------------------------------------------------------------------------------

struct NotifFig {
    devices: usize,
    delivered: u64,
    accepted: u64,
    discarded: u64,
    dropped: u64,
    window: Duration,
    daemon_cpu: Duration,
    nats_cpu: Duration,
    /// Growth of each JetStream stream over the counted window: name → (messages, bytes).
    streams: BTreeMap<String, (u64, u64)>,
}

/// `after - before`, stream by stream.
fn growth(
    before: &BTreeMap<String, (u64, u64)>,
    after: BTreeMap<String, (u64, u64)>,
) -> BTreeMap<String, (u64, u64)> {
    after
        .into_iter()
        .map(|(name, (m, b))| {
            let (m0, b0) = before.get(&name).copied().unwrap_or((0, 0));
            (name, (m.saturating_sub(m0), b.saturating_sub(b0)))
        })
        .collect()
}

/// `name +messages msgs +bytes B (bytes per operation)` of the streams that grew.
fn describe(streams: &BTreeMap<String, (u64, u64)>, ops: f64, op: &str) -> String {
    let v: Vec<String> = streams
        .iter()
        .filter(|(_, (m, _))| *m > 0)
        .map(|(name, (m, b))| {
            format!(
                "{name} +{m} msgs +{b} B ({:.0} B/{op})",
                *b as f64 / ops.max(1.0)
            )
        })
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join("; ")
    }
}

fn notifications(args: &Args, kind: Kind) -> Result<NotifFig> {
    let timeout = Duration::from_secs(args.timeout_s);
    let c = Cluster::start(args, kind)?;
    let n = args.notify_devices.max(1);
    let k = c.nodes.len();
    for d in c.pollers(args) {
        d.api().open_channel()?;
    }
    for d in &c.nodes {
        let api = d.api();
        let (s, b) = api.put_json("/v2/subscriptions", r#"[{"resource-path": ["/3303/*"]}]"#)?;
        ensure!(
            (200..300).contains(&s),
            "PUT /v2/subscriptions answered {s}: {b}"
        );
    }
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let pullers: Vec<_> = c
        .pollers(args)
        .iter()
        .map(|d| {
            let api = d.api();
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
        })
        .collect();
    let interval = Duration::from_millis(args.notify_interval_ms.max(1));
    let sockets = (args.notify_sockets / k).max(1);
    let mut notifiers = Vec::new();
    let mut result = (|| -> Result<()> {
        for (i, d) in c.nodes.iter().enumerate() {
            let share = n / k + usize::from(i < n % k);
            if share > 0 {
                let prefix = format!("nb{i}x");
                notifiers.push((
                    share,
                    bulk::Notifier::start_named(
                        &prefix, d.coap, share, sockets, interval, timeout,
                    )?,
                ));
            }
        }
        let t = Instant::now();
        for (share, notifier) in &notifiers {
            while (notifier.counters.observed.load(Ordering::Relaxed) as usize) < *share {
                ensure!(
                    t.elapsed() < timeout,
                    "bulk notifier: {} registered, {} observations of {share} within {} s",
                    notifier.counters.registered.load(Ordering::Relaxed),
                    notifier.counters.observed.load(Ordering::Relaxed),
                    timeout.as_secs()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    })();
    let mut fig = None;
    if result.is_ok() {
        result = (|| -> Result<()> {
            std::thread::sleep(Duration::from_secs(args.notify_warmup_s));
            let sum = |name: &str| c.metric_sum(name);
            let (a0, d0, x0) = (
                sum("observe_notifications_total")?,
                sum("events_discarded_total")?,
                sum("coap_responses_dropped_total").unwrap_or(0),
            );
            let streams0 = c.streams()?;
            let (cpu0, ncpu0) = (c.daemon_cpu()?, c.nats_cpu()?);
            let c0 = count.load(Ordering::Relaxed);
            let t0 = Instant::now();
            std::thread::sleep(Duration::from_secs(args.notify_window_s.max(1)));
            let c1 = count.load(Ordering::Relaxed);
            let window = t0.elapsed();
            let (cpu, ncpu) = (
                c.daemon_cpu()?.saturating_sub(cpu0),
                c.nats_cpu()?.saturating_sub(ncpu0),
            );
            let streams = growth(&streams0, c.streams()?);
            fig = Some(NotifFig {
                devices: n,
                delivered: c1 - c0,
                accepted: sum("observe_notifications_total")?.saturating_sub(a0),
                discarded: sum("events_discarded_total")?.saturating_sub(d0),
                dropped: sum("coap_responses_dropped_total")
                    .unwrap_or(0)
                    .saturating_sub(x0),
                window,
                daemon_cpu: cpu,
                nats_cpu: ncpu,
                streams,
            });
            Ok(())
        })();
    }
    stop.store(true, Ordering::Release);
    for (_, notifier) in notifiers {
        let _ = notifier.stop();
    }
    // The pullers end when their daemons are killed (a long-poll in flight fails).
    drop(c);
    for p in pullers {
        let _ = p.join();
    }
    result?;
    fig.context("no figures")
}

// ----------------------------------------------------------------------------------------
// Proxied reads
// ----------------------------------------------------------------------------------------

struct ReadFig {
    completed: usize,
    ok: usize,
    rejected: HashMap<u16, usize>,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    daemon_cpu: Duration,
    nats_cpu: Duration,
    /// Async responses pulled from each node.
    pulled_per_node: Vec<usize>,
}

enum ReadOutcome {
    Measured(ReadFig),
    /// The node asked refused the read (no forwarding yet): its answer.
    Unmeasured(String),
}

/// `--cluster-read-count` reads of `/3/0/0` over `--read-devices` simulated devices on node
/// 1, sent to node 1 (`through_owner`) or to the other nodes, one connection after the other
/// round-robin; async responses pulled from every node.
fn reads(args: &Args, kind: Kind, through_owner: bool) -> Result<ReadOutcome> {
    let timeout = Duration::from_secs(args.timeout_s);
    let c = Cluster::start(args, kind)?;
    ensure!(
        through_owner || c.nodes.len() >= 2,
        "reads through a non-owner need two nodes"
    );
    for d in c.pollers(args) {
        d.api().open_channel()?;
    }
    let owner = &c.nodes[0];
    let targets: Vec<&Daemon> = if through_owner {
        vec![owner]
    } else {
        c.nodes[1..].iter().collect()
    };
    let k = args.read_devices.max(1);
    let mut sims = Sims::start(args, owner.coap, k, "p", 60_000, false)?;
    if let Err(e) = wait_registered(&owner.api(), &mut sims, k, Instant::now(), timeout) {
        sims.abandon();
        return Err(e);
    }
    let names: Arc<Vec<String>> = Arc::new(Sims::names(args, k, "p"));
    let outcome = (|| -> Result<ReadOutcome> {
        // The nodes asked list every device.
        let t = Instant::now();
        for d in &targets {
            let api = d.api();
            while (api.metric("registered_endpoints")? as usize) < k {
                ensure!(t.elapsed() < timeout, "a node never listed the devices");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // A first read, outside the count: refused (no forwarding), or answered somewhere.
        let probe = format!("/v2/endpoints/{}/3/0/0", names[0]);
        let (s, b) = targets[0].api().get(&probe)?;
        if s == 503 {
            return Ok(ReadOutcome::Unmeasured(format!(
                "GET {probe} on node n{} answered 503: {}",
                if through_owner { 1 } else { 2 },
                b.trim()
            )));
        }
        ensure!(s == 202, "GET {probe} answered {s}: {b}");
        let id = serde_json::from_str::<Value>(&b)?["async-response-id"]
            .as_str()
            .context("async-response-id")?
            .to_string();
        let t = Instant::now();
        'found: loop {
            for d in c.pollers(args) {
                let (s, body) = d.api().get("/v2/notification/pull?noWait=true")?;
                if s == 200 && body.contains(&id) {
                    break 'found;
                }
            }
            if t.elapsed() > Duration::from_secs(10) {
                return Ok(ReadOutcome::Unmeasured(format!(
                    "GET {probe} answered 202 but its async response came to no node's long-poll within 10 s"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        read_load(args, &c, &targets, names.clone()).map(ReadOutcome::Measured)
    })();
    sims.abandon();
    outcome
}

fn read_load(
    args: &Args,
    c: &Cluster,
    targets: &[&Daemon],
    names: Arc<Vec<String>>,
) -> Result<ReadFig> {
    let timeout = Duration::from_secs(args.timeout_s);
    let slots: Arc<Mutex<HashMap<String, Slot>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let window = Arc::new(tokio::sync::Semaphore::new(args.read_window.max(1)));
    let next = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let got = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let last = Arc::new(Mutex::new(None::<Instant>));
    let stop = Arc::new(AtomicBool::new(false));
    let rejected: Arc<Mutex<HashMap<u16, usize>>> = Arc::default();
    let m = args.cluster_read_count;
    let (cpu0, ncpu0) = (c.daemon_cpu()?, c.nats_cpu()?);
    let t0 = Instant::now();
    let deadline = t0 + timeout;

    let pulled: Vec<Arc<AtomicUsize>> = c.pollers(args).iter().map(|_| Arc::default()).collect();
    let pullers: Vec<_> = c
        .pollers(args)
        .iter()
        .zip(&pulled)
        .map(|(d, mine)| {
            let api = d.api();
            let (slots, latencies, window) = (
                Arc::clone(&slots),
                Arc::clone(&latencies),
                Arc::clone(&window),
            );
            let (got, ok, last, stop, mine) = (
                Arc::clone(&got),
                Arc::clone(&ok),
                Arc::clone(&last),
                Arc::clone(&stop),
                Arc::clone(mine),
            );
            std::thread::spawn(move || -> Result<()> {
                let _close = CloseOnDrop(Arc::clone(&window));
                while !stop.load(Ordering::Acquire) {
                    let (status, body) = api.get("/v2/notification/pull")?;
                    if status == 204 {
                        continue;
                    }
                    ensure!(status == 200, "pull answered {status}: {body}");
                    let batch: PullBatch<'_> = serde_json::from_str(&body)?;
                    let now = Instant::now();
                    for e in batch.async_responses {
                        if e.status == 200 {
                            ok.fetch_add(1, Ordering::AcqRel);
                        }
                        got.fetch_add(1, Ordering::AcqRel);
                        mine.fetch_add(1, Ordering::Relaxed);
                        *last.lock().unwrap() = Some(now);
                        window.add_permits(1);
                        record(&slots, &latencies, e.id.to_string(), Slot::Arrived(now));
                    }
                }
                Ok(())
            })
        })
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.read_client_threads.max(1))
        .enable_all()
        .build()?;
    let auth: Arc<str> = c.nodes[0].api().auth.into();
    let rests: Vec<SocketAddr> = targets.iter().map(|d| d.rest).collect();
    let sent = rt.block_on(async {
        let mut senders = Vec::new();
        for i in 0..args.read_connections.max(1) {
            senders.push(ReadSender {
                http2: None,
                rest: rests[i % rests.len()],
                tls: None,
                auth: Arc::clone(&auth),
                names: Arc::clone(&names),
                next: Arc::clone(&next),
                count: m,
                window: Arc::clone(&window),
                slots: Arc::clone(&slots),
                latencies: Arc::clone(&latencies),
                accepted: Arc::clone(&accepted),
                rejected: Arc::clone(&rejected),
                pace: None,
            });
        }
        run_read_senders(senders, deadline).await
    });
    rt.shutdown_background();
    // Every accepted read's answer pulled (or the time is up).
    while got.load(Ordering::Acquire) < accepted.load(Ordering::Acquire)
        && Instant::now() < deadline
        && !pullers.iter().any(|p| p.is_finished())
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (cpu, ncpu) = (
        c.daemon_cpu()?.saturating_sub(cpu0),
        c.nats_cpu()?.saturating_sub(ncpu0),
    );
    stop.store(true, Ordering::Release);
    sent?;
    // A puller that ended early failed: its error. The others are left to end with their
    // daemons (a long-poll in flight).
    for p in pullers {
        if p.is_finished() {
            p.join().map_err(|_| anyhow!("puller panicked"))??;
        }
    }
    let completed = got.load(Ordering::Acquire);
    ensure!(
        completed >= accepted.load(Ordering::Acquire),
        "{} of {} accepted reads answered within {} s",
        completed,
        accepted.load(Ordering::Acquire),
        timeout.as_secs()
    );
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap());
    lat.sort();
    let end = last.lock().unwrap().unwrap_or_else(Instant::now);
    let rejected = rejected.lock().unwrap().clone();
    Ok(ReadFig {
        completed,
        ok: ok.load(Ordering::Acquire),
        rejected,
        elapsed: end.saturating_duration_since(t0),
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        daemon_cpu: cpu,
        nats_cpu: ncpu,
        pulled_per_node: pulled.iter().map(|p| p.load(Ordering::Relaxed)).collect(),
    })
}

// ----------------------------------------------------------------------------------------
// The run and its report
// ----------------------------------------------------------------------------------------

/// The figures of one scenario of one configuration, over the runs.
#[derive(Default)]
struct Series {
    rate: Vec<f64>,
    daemon_us: Vec<f64>,
    nats_us: Vec<f64>,
    unmeasured: Option<String>,
    failed: Vec<String>,
}

impl Series {
    fn push(&mut self, rate: f64, daemon_us: f64, nats_us: f64) {
        self.rate.push(rate);
        self.daemon_us.push(daemon_us);
        self.nats_us.push(nats_us);
    }
}

/// `median (min–max)` of the runs.
fn spread(v: &[f64], decimals: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let med = s[s.len() / 2];
    if s.len() == 1 {
        format!("{med:.decimals$}")
    } else {
        format!(
            "{med:.decimals$} ({:.decimals$}–{:.decimals$})",
            s[0],
            s[s.len() - 1]
        )
    }
}

fn us_per(d: Duration, n: f64) -> f64 {
    d.as_secs_f64() * 1e6 / n.max(1.0)
}

/// Runs `--cluster`: prints every run's figures as they come, then the side-by-side
/// summary; `Err` if any scenario failed (an unmeasured scenario is no failure).
pub fn run(args: &Args) -> Result<()> {
    let mut kinds = vec![Kind::Sqlite];
    for &n in &args.nodes {
        ensure!(
            (1..=9).contains(&n),
            "--nodes: 1 to 9 nodes per configuration, not {n}"
        );
        kinds.push(Kind::Nats(n));
    }
    let runs = args.cluster_runs.max(1);
    eprintln!(
        "cluster: {runs} run(s) of {} configurations; registrations: {} devices; reads: {} over {} devices; notifications: {} devices every {} ms, {} s counted",
        kinds.len(),
        args.cluster_devices,
        args.cluster_read_count,
        args.read_devices,
        args.notify_devices,
        args.notify_interval_ms,
        args.notify_window_s
    );
    let scenarios = [
        "registrations/s",
        "notifications/s",
        "reads/s via owner",
        "reads/s via non-owner",
    ];
    let mut table: BTreeMap<(Kind, usize), Series> = BTreeMap::new();
    let mut storage: BTreeMap<Kind, Vec<String>> = BTreeMap::new();
    for r in 1..=runs {
        for &kind in &kinds {
            eprintln!("run {r}, {kind}: registrations …");
            let s = table.entry((kind, 0)).or_default();
            match registrations(args, kind) {
                Ok(f) => {
                    let n = f.devices as f64;
                    let (d_us, n_us) = (us_per(f.daemon_cpu, n), us_per(f.nats_cpu, n));
                    s.push(f.rate, d_us, n_us);
                    let rss: Vec<String> = f
                        .rss_growth_kib
                        .iter()
                        .map(|kib| format!("{:.2}", *kib as f64 / n))
                        .collect();
                    let streams = describe(&f.streams, n, "registration");
                    println!(
                        "run {r} {kind}: registrations/s {:.0} ({} devices); daemon CPU {d_us:.1} µs/registration (all nodes), nats-server {n_us:.1} µs; every node listed every device {:.3} s after the last; RSS growth per registration per node [{}] KiB; nats-server RSS growth {}; JetStream: {}",
                        f.rate,
                        f.devices,
                        f.listed_everywhere_after.as_secs_f64(),
                        rss.join(", "),
                        f.nats_rss_growth_kib.map_or("-".into(), |k| format!(
                            "{:.2} KiB/registration",
                            k as f64 / n
                        )),
                        streams,
                    );
                    storage.entry(kind).or_default().push(format!(
                        "run {r}: RSS/registration per node [{}] KiB; {streams}",
                        rss.join(", "),
                    ));
                }
                Err(e) => s.failed.push(format!("run {r}: {e:#}")),
            }

            eprintln!("run {r}, {kind}: notifications …");
            let s = table.entry((kind, 1)).or_default();
            match notifications(args, kind) {
                Ok(f) => {
                    let secs = f.window.as_secs_f64();
                    let acc = f.accepted as f64;
                    let (d_us, n_us) = (us_per(f.daemon_cpu, acc), us_per(f.nats_cpu, acc));
                    s.push(f.delivered as f64 / secs, d_us, n_us);
                    let streams = describe(&f.streams, acc, "notification");
                    println!(
                        "run {r} {kind}: notifications/s to long-polls {:.0} ({} devices, {} ms; {} delivered in {secs:.1} s; accepted {:.0}/s from devices; {} events discarded; {} dropped at full observation queues); daemon CPU {d_us:.1} µs per accepted notification (all nodes), nats-server {n_us:.1} µs; JetStream: {streams}",
                        f.delivered as f64 / secs,
                        f.devices,
                        args.notify_interval_ms,
                        f.delivered,
                        acc / secs,
                        f.discarded,
                        f.dropped,
                    );
                    if kind != Kind::Sqlite {
                        storage
                            .entry(kind)
                            .or_default()
                            .push(format!("run {r}, notifications: {streams}"));
                    }
                }
                Err(e) => s.failed.push(format!("run {r}: {e:#}")),
            }

            for through_owner in [true, false] {
                if !through_owner && !matches!(kind, Kind::Nats(n) if n >= 2) {
                    continue;
                }
                let via = if through_owner { "owner" } else { "non-owner" };
                eprintln!("run {r}, {kind}: proxied reads via the {via} …");
                let s = table
                    .entry((kind, if through_owner { 2 } else { 3 }))
                    .or_default();
                match reads(args, kind, through_owner) {
                    Ok(ReadOutcome::Measured(f)) => {
                        let secs = f.elapsed.as_secs_f64().max(1e-9);
                        let done = f.completed as f64;
                        let (d_us, n_us) = (us_per(f.daemon_cpu, done), us_per(f.nats_cpu, done));
                        s.push(done / secs, d_us, n_us);
                        println!(
                            "run {r} {kind}: proxied reads/s via the {via} {:.0} ({} answered, {} status 200, in {secs:.2} s; pulled per node {:?}; refused {:?}; p50 {:.1} ms, p99 {:.1} ms); daemon CPU {d_us:.1} µs/read (all nodes), nats-server {n_us:.1} µs",
                            done / secs,
                            f.completed,
                            f.ok,
                            f.pulled_per_node,
                            f.rejected,
                            f.p50.as_secs_f64() * 1e3,
                            f.p99.as_secs_f64() * 1e3,
                        );
                    }
                    Ok(ReadOutcome::Unmeasured(why)) => {
                        println!("run {r} {kind}: proxied reads via the {via}: UNMEASURED: {why}");
                        s.unmeasured = Some(why);
                    }
                    Err(e) => s.failed.push(format!("run {r}: {e:#}")),
                }
            }
        }
    }

    println!();
    println!(
        "Issue 22, side by side: median (min–max) over {runs} run(s); CPU per operation: daemons summed over the nodes, nats-server separately"
    );
    println!(
        "{:<16} {:<22} {:>26} {:>26} {:>24}",
        "configuration", "scenario", "rate /s", "daemon CPU µs/op", "nats-server CPU µs/op"
    );
    let mut failures = Vec::new();
    for (&(kind, sc), s) in &table {
        let name = scenarios[sc];
        if !s.rate.is_empty() {
            println!(
                "{:<16} {:<22} {:>26} {:>26} {:>24}",
                kind.to_string(),
                name,
                spread(&s.rate, 0),
                spread(&s.daemon_us, 1),
                if kind == Kind::Sqlite {
                    "-".into()
                } else {
                    spread(&s.nats_us, 1)
                }
            );
        } else if let Some(why) = &s.unmeasured {
            println!(
                "{:<16} {:<22} UNMEASURED (forwarding between nodes not built): {why}",
                kind.to_string(),
                name
            );
        }
        for f in &s.failed {
            failures.push(format!("{kind}, {name}: {f}"));
        }
    }
    println!();
    for (kind, lines) in &storage {
        for l in lines {
            println!("memory and storage, {kind}: {l}");
        }
    }
    for f in &failures {
        println!("FAILED: {f}");
    }
    ensure!(
        failures.is_empty(),
        "{} scenario run(s) failed",
        failures.len()
    );
    Ok(())
}
