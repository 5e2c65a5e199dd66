//! `--dtls`: the DTLS listener's handshake rates and memory per session, in this process.
//!
//! The daemon binary knows no PSK identity until the credential store exists (issue 21,
//! another part), so this scenario runs the coap crate's `Transport` with a DTLS listener
//! in this process, with a PSK table of one identity and a server certificate from a
//! throwaway CA (`connectord::certs`), against dimpl clients on their own sockets. The
//! figures are those of the pair (server and clients share the cores).
//!
//! - PSK and ECDSA handshakes/s: `CONCURRENT` clients handshaking in a loop, each on a
//!   fresh socket (a new source port is a new session), for a fixed count.
//! - memory per session: `--dtls-sessions` sessions established one after the other, each
//!   from its own source address (127.x.0.y; each client's socket closed after its
//!   handshake: the server keeps the session until `coap.dtls_idle_s`), the process's RSS
//!   before and after (once the sessions were quiet for `dtls::TRIM_AFTER`), divided.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use connectord::coap::dtls::client::{ClientAuth, ClientConfig, DtlsClient};
use connectord::coap::message::{Handled, Response};
use connectord::coap::{
    CoapConfig, Counters, Credentials, DtlsSetup, Inbound, RequestHandler, Transport,
};

use crate::Row;

const CONCURRENT: usize = 32;
const PSK_KEY: &[u8] = b"bench-key-16byte";

struct Keys;

impl Credentials for Keys {
    fn psk(&self, identity: &[u8]) -> Option<Vec<u8>> {
        (identity == b"bench").then(|| PSK_KEY.to_vec())
    }
}

struct Nothing;

impl RequestHandler for Nothing {
    fn handle(&self, _req: Inbound) -> Pin<Box<dyn Future<Output = Handled> + Send>> {
        Box::pin(async { Response::new(coap_lite::ResponseType::Content).into() })
    }
}

/// The rows of the `--dtls` scenario: `handshakes` per rate, `sessions` for memory.
pub fn run(handshakes: usize, sessions: usize) -> Result<Vec<Row>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let dir = tempfile_dir()?;
        let ca = connectord::certs::CertAuthority::load_or_create(&dir)?;
        let cfg = CoapConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            listen_dtls: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            dtls_max_sessions: sessions.max(handshakes) + 100,
            dtls_max_handshakes: 1000,
            // The clients all handshake from 127.0.0.1.
            dtls_max_handshakes_per_source: 0,
            ..CoapConfig::default()
        };
        let transport = Transport::bind(&cfg, Arc::new(Counters::default()))?;
        let names = ["localhost", "127.0.0.1"].map(String::from);
        let server = ca.issue_server(&names)?;
        transport.set_dtls(&DtlsSetup {
            credentials: Arc::new(Keys),
            certificate: Some((server.leaf_der, server.key_der)),
            trust_anchors: vec![ca.ca_certificate_der()],
        })?;
        let (_stop, stop) = tokio::sync::watch::channel(false);
        transport.start(Arc::new(Nothing), stop);
        let server = transport.local_addrs_of(connectord::coap::ListenerKind::Dtls)[0];

        let psk = ClientConfig::new(ClientAuth::Psk {
            identity: b"bench".to_vec(),
            key: PSK_KEY.to_vec(),
        })?;
        let device = device_certificate(&ca)?;
        // Memory first: the rate runs free what they allocated, which the allocator keeps
        // and would hand to the sessions measured after them.
        let before = crate::vm_rss_kib(std::process::id())?;
        let t0 = Instant::now();
        for i in 0..sessions {
            // One source address each (127.x.0.y): a closed socket's port is reused, and a
            // new handshake from a session's address replaces that session.
            let ip = std::net::Ipv4Addr::new(127, 1 + (i / 250) as u8, 0, 1 + (i % 250) as u8);
            let sock = tokio::net::UdpSocket::bind((ip, 0)).await?;
            DtlsClient::connect(&psk, &sock, server, Duration::from_secs(10)).await?;
        }
        let counts = transport.dtls_counts();
        ensure!(
            counts.sessions == sessions,
            "{} sessions of {sessions}",
            counts.sessions
        );
        // Quiet sessions give back their handshake's memory (`dtls::TRIM_AFTER`): measure
        // them as most of a device population is, quiet.
        tokio::time::sleep(connectord::coap::dtls::TRIM_AFTER + connectord::coap::dtls::TICK * 5)
            .await;
        let after = crate::vm_rss_kib(std::process::id())?;
        let per = (after.saturating_sub(before)) as f64 * 1024.0 / sessions as f64;
        let mut rows = vec![Row {
            scenario: format!("DTLS memory per session ({sessions} PSK sessions)"),
            value: per,
            unit: "B/session",
            target: Some((4096.0, false)),
            detail: format!(
                "VmRSS {before} KiB before, {after} KiB after; established in {:.1} s",
                t0.elapsed().as_secs_f64()
            ),
        }];
        transport.close_sessions(&|_| true);
        for (name, cfg, target) in [
            ("PSK", &psk, Some((5000.0, true))),
            ("ECDSA", &device, None),
        ] {
            let t0 = Instant::now();
            let done = handshake_rate(cfg, server, handshakes).await?;
            let rate = done as f64 / t0.elapsed().as_secs_f64();
            rows.push(Row {
                scenario: format!("DTLS {name} handshakes/s ({CONCURRENT} concurrent clients)"),
                value: rate,
                unit: "hs/s",
                target,
                detail: format!(
                    "{done} handshakes in {:.2} s, clients in the same process",
                    t0.elapsed().as_secs_f64()
                ),
            });
            // A rate run leaves its sessions: the next one starts from none.
            transport.close_sessions(&|_| true);
        }

        let _ = std::fs::remove_dir_all(&dir);
        Ok(rows)
    })
}

/// `n` handshakes by `CONCURRENT` tasks, each on a fresh socket; returns how many finished.
async fn handshake_rate(cfg: &ClientConfig, server: SocketAddr, n: usize) -> Result<usize> {
    let per = n.div_ceil(CONCURRENT);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENT {
        let cfg = cfg.clone();
        tasks.spawn(async move {
            for _ in 0..per {
                let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
                DtlsClient::connect(&cfg, &sock, server, Duration::from_secs(10)).await?;
            }
            Ok::<usize, std::io::Error>(per)
        });
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        done += r.context("handshake task")??;
    }
    Ok(done)
}

/// A device key (rcgen, P-256) and its certificate from the CA (as `POST /api/cert`
/// issues).
fn device_certificate(ca: &connectord::certs::CertAuthority) -> Result<ClientConfig> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let issued = ca.issue("default", &key.public_key_pem())?;
    let cert = pem::parse(&issued.device_certificate)?.into_contents();
    let auth = ClientAuth::Certificate {
        cert,
        key: key.serialize_der(),
    };
    Ok(ClientConfig::new(auth)?)
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "connectord-bench-dtls-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
