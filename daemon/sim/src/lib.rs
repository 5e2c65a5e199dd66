//! The device simulator: many LwM2M-like devices in one process, to try the daemon
//! without hardware and to load it in benchmarks.
//!
//! Each device has its own UDP socket (bound to [`SimOptions::bind`], port 0) and its own
//! tokio task. The task owns a [`Device`], a sans-IO state machine: datagrams, timer expiries
//! and temperature ticks go in, datagrams to send come out. The task only moves bytes
//! between the socket and the state machine, which is what the unit tests drive directly.
//!
//! What a device does:
//! - Registers (`POST /rd?ep=&lt=&lwm2m=1.0&b=U|UQ[&d=]`, link-format body [`LINKS`]) with
//!   CON retransmission (RFC 7252 timing), sends registration updates at 75–85 % of its
//!   lifetime (re-registering when an update is answered 4.04, or any other 4.xx),
//!   and de-registers when the simulator stops.
//! - Serves the daemon's requests, piggybacked (ACK for CON, NON for NON), with a small
//!   duplicate cache (same peer and message id → the same reply, not handled again):
//!   - `GET /3/0/0` "connectord", `/3/0/1` "simulator", `/3/0/2` the endpoint name,
//!     `/1/0/1` the lifetime; text/plain. `/3/0` and `/1/0` (object instances) in LwM2M
//!     TLV, or with `Accept: text/plain` a one-line summary.
//!   - `GET /3303/0/5700`: the temperature ("21.5"), which moves by ±0.1..0.5 every
//!     notify interval, with Max-Age. With Observe=0 the (peer, token) becomes an observer
//!     and gets a NON notification with an increasing Observe sequence on every change;
//!     Observe=1, or an RST answering one of its notifications, removes it. Every other
//!     readable path is observable too, as the daemon expects of an LwM2M client; of
//!     those only the lifetime changes (below), and its observers and those of `/1/0`
//!     are notified when it does.
//!   - `PUT /1/0/1`: a whole number of seconds (1..) in text/plain, or in any format
//!     `lwm2m_data` reads (TLV, SenML, LwM2M JSON/CBOR) → 2.04, and the device sends a
//!     registration update with the new lifetime (as LwM2M asks) and, for a new value,
//!     a notification to each observer of it; anything else → 4.00.
//!   - `PUT /3303/0/5700` → 4.05: a sensor value is read-only (as in the LwM2M object).
//!   - `POST /3/0/4` (reboot) → 2.04; one second later the device forgets its observers
//!     and registers again, as a rebooted device would. `POST /1/0/8` (registration update
//!     trigger) → 2.04 and an update.
//!   - `DELETE /9/0` (a software package) → 2.02, then 4.04 as it is gone.
//!   - Another method on a known path → 4.05; an unknown path → 4.04; an Accept other
//!     than text/plain → 4.06; Block2 is honoured; a Block1 transfer beyond one block →
//!     4.13 (every writable value is a few bytes).
//!   - A CoAP ping (empty CON) → RST. Malformed datagrams are ignored.
//! - With [`Lwm2mMode::Lwm2m1_1`] (`--lwm2m 1.1`) it behaves as real LwM2M 1.1 clients do:
//!   registers `lwm2m=1.1` with [`LINKS_1_1`] (objects and instances, no `obs`, its
//!   formats on the root link), answers reads in LwM2M TLV unless the Accept option asks
//!   for SenML JSON, SenML CBOR or, for one resource, text/plain (else 4.06), lets any
//!   path be observed (the temperature's resource, instance and object are notified, each
//!   in the format its observe asked for), and takes a lifetime written in any format
//!   `lwm2m_data` reads. Values are encoded with [`connectord_lwm2m`].
//! - `et=` is sent when [`SimOptions::ept`] (`--type`) is set.
//!
//! Scale: one task and one socket per device. 10 000 devices are 10 000 file descriptors
//! (raise `ulimit -n`) and ephemeral ports of the bind address (use other 127.x.y.z
//! addresses beyond ~28 000). All sockets are opened before the first registration, so a
//! shortage is an error before anything is registered. At most [`MAX_IN_FLIGHT`]
//! registrations (and, at stop, de-registrations) are outstanding at a time, so that a
//! burst does not overflow the daemon's receive buffer; `register_rate` paces starts on
//! top of that. Temperature ticks start at a random phase so devices do not tick together.

#![deny(unsafe_code)]

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use coap_lite::{
    CoapOption, ContentFormat, MessageClass, MessageType, Packet, RequestType, ResponseType,
};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use connectord_core::coap::client::Block;
use connectord_core::coap::dtls::client::DtlsClient;
pub use connectord_core::coap::dtls::client::{ClientAuth, ClientConfig as DtlsConfig};
use connectord_core::coap::message::{self, Response, encode_uint, uint_option, uri_path};
use connectord_core::coap::rfc8323::{self, Signal};
pub use connectord_core::coap::tls::client::{
    ClientConfig as TlsConfig, ClientError as TlsConfigError,
};
use connectord_lwm2m as lwm2m_data;

/// The object list each device registers (LwM2M 1.0 mode: `obs` marks what is observed).
pub const LINKS: &str = concat!(
    r#"</>;rt="oma.lwm2m",</1/0>,</1/0/1>,</3/0>;obs,</3/0/0>,</3/0/1>,</3/0/2>,</3/0/4>,"#,
    r#"</3303/0/5700>;obs;rt="temperature";ct=0,</9/0>"#
);

/// The object list of an LwM2M 1.1 client: objects and instances, no `obs` (any path may
/// be observed), its content formats on the root link (TLV, SenML JSON, SenML CBOR).
pub const LINKS_1_1: &str =
    r#"</>;rt="oma.lwm2m";ct="11542 110 112",</1/0>,</3>;ver=1.1,</3/0>,</3303/0>,</9/0>"#;

/// CoAP transmission parameters (RFC 7252 §4.8).
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
const ACK_RANDOM_FACTOR: f64 = 1.5;
const MAX_RETRANSMIT: u32 = 4;
/// The longest a registration goes without an answer before it counts as failed: RFC
/// 7252's MAX_TRANSMIT_WAIT (ACK_TIMEOUT × ACK_RANDOM_FACTOR × (2^(MAX_RETRANSMIT + 1) − 1),
/// 93 s).
const NO_ANSWER_GIVE_UP: Duration = Duration::from_millis(
    ACK_TIMEOUT.as_millis() as u64 * 3 / 2 * ((1 << (MAX_RETRANSMIT + 1)) - 1),
);
/// De-registration at stop gives up sooner: stopping should not take a minute.
const DEREGISTER_RETRANSMIT: u32 = 1;
/// How long to wait for a separate response after an empty ACK.
const SEPARATE_RESPONSE_WAIT: Duration = Duration::from_secs(60);
/// Registrations (and de-registrations at stop) outstanding at once, over all devices.
pub const MAX_IN_FLIGHT: usize = 128;
/// Replies remembered per device for duplicate requests.
const REPLY_CACHE: usize = 8;
/// Notifications remembered per device, to map an RST back to its observer.
const SENT_NOTIFICATIONS: usize = 32;
/// Observers per device; beyond, a GET with Observe=0 is answered without Observe.
const MAX_OBSERVERS: usize = 8;
/// Delay between answering a reboot and registering again.
const REBOOT_DELAY: Duration = Duration::from_secs(1);
/// Bounds of the wait before retrying a failed update or re-registration.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// After stop, how long de-registrations may take before the remaining tasks are dropped.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// Longest a DTLS device waits for its handshake before it counts as failed.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(20);
/// Largest datagram read; anything longer is truncated and then fails to decode.
const MAX_DATAGRAM: usize = 1500;
/// The temperature stays within these bounds (tenths of a degree).
const TEMP_MIN: i32 = 150;
const TEMP_MAX: i32 = 300;

const TEMPERATURE: [&str; 3] = ["3303", "0", "5700"];

/// How a simulated device speaks LwM2M.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lwm2mMode {
    /// `lwm2m=1.0`, the object list [`LINKS`] with `obs` on what it lets be observed,
    /// and text/plain answers only (an Accept of anything else is 4.06).
    #[default]
    Text1_0,
    /// `lwm2m=1.1` as real LwM2M 1.1 clients behave: the object list [`LINKS_1_1`] with
    /// no `obs`, every path observable, answers in LwM2M TLV unless the request's Accept
    /// asks for SenML JSON, SenML CBOR or (one resource) text/plain, and writes taken in
    /// any of those.
    Lwm2m1_1,
}

impl std::str::FromStr for Lwm2mMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Lwm2mMode, String> {
        match s {
            "1.0" => Ok(Lwm2mMode::Text1_0),
            "1.1" => Ok(Lwm2mMode::Lwm2m1_1),
            other => Err(format!("LwM2M version {other:?}: 1.0 or 1.1")),
        }
    }
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// How many devices.
    pub devices: usize,
    /// The daemon's CoAP address.
    pub server: SocketAddr,
    /// Endpoint names are `{prefix}{index:06}`, index from 0.
    pub name_prefix: String,
    /// The endpoint name of the one device (`devices` must be 1), instead of the
    /// prefix's: a device with a credential must register as the endpoint its credential
    /// names (a certificate's CN from `POST /api/cert`, a PSK's record).
    pub endpoint: Option<String>,
    /// Registration lifetime; an update is sent at ~80 % of it.
    pub lifetime_s: u32,
    /// How often observed temperatures change.
    pub notify_interval_ms: u64,
    /// Local address of the device sockets (port 0 each).
    pub bind: IpAddr,
    /// Register with `b=UQ`.
    pub queue_mode: bool,
    /// `d=`.
    pub domain: Option<String>,
    /// Most registrations started per second while starting; 0: as fast as possible.
    pub register_rate: u32,
    /// `et=`: the endpoint type.
    pub ept: Option<String>,
    /// The LwM2M behaviour.
    pub lwm2m: Lwm2mMode,
    /// Speak DTLS to `server` (`coaps://`) with this client configuration (a PSK or a
    /// certificate, see `connectord simulate --psk/--cert`); `None`: plain CoAP.
    pub dtls: Option<DtlsConfig>,
    /// Speak DTLS with a PSK of its own per device: identity = the endpoint name, this
    /// key (16 to 64 bytes) for all; the daemon needs each identity provisioned
    /// (`/v2/device-credentials/{ep}`; the bench does). Takes precedence over `dtls`.
    pub dtls_psk_per_endpoint: Option<Vec<u8>>,
    /// Speak CoAP over TLS (RFC 8323, `coaps+tcp`) to `server`, one connection per
    /// device, with this client configuration (a certificate, the CA the daemon's is
    /// verified against; `connectord simulate --tls`). Takes precedence over the DTLS
    /// options.
    pub tls: Option<TlsConfig>,
}

impl Default for SimOptions {
    fn default() -> SimOptions {
        SimOptions {
            devices: 10,
            server: SocketAddr::from(([127, 0, 0, 1], 5683)),
            name_prefix: "sim-".into(),
            endpoint: None,
            lifetime_s: 300,
            notify_interval_ms: 5000,
            bind: IpAddr::from([127, 0, 0, 1]),
            queue_mode: false,
            domain: None,
            register_rate: 0,
            ept: None,
            lwm2m: Lwm2mMode::default(),
            dtls: None,
            dtls_psk_per_endpoint: None,
            tls: None,
        }
    }
}

impl SimOptions {
    /// The endpoint name of device `index`.
    pub fn endpoint_name(&self, index: usize) -> String {
        match &self.endpoint {
            Some(name) => name.clone(),
            None => format!("{}{index:06}", self.name_prefix),
        }
    }

    fn validate(&self) -> Result<(), SimError> {
        let invalid = |m: String| Err(SimError::Invalid(m));
        if self.devices == 0 {
            return invalid("devices must be at least 1".into());
        }
        if self.endpoint.is_some() && self.devices != 1 {
            return invalid(format!(
                "an endpoint name is for one device; devices is {}",
                self.devices
            ));
        }
        if self.lifetime_s == 0 {
            return invalid("lifetime_s must be at least 1".into());
        }
        if self.notify_interval_ms == 0 {
            return invalid("notify_interval_ms must be at least 1".into());
        }
        if self.bind.is_ipv4() != self.server.is_ipv4() {
            return invalid(format!(
                "bind address {} and server {} are of different IP versions",
                self.bind, self.server
            ));
        }
        let last = self.endpoint_name(self.devices - 1);
        if !connectord_model::valid_name(&last) {
            return invalid(format!("endpoint name {last:?} is not valid"));
        }
        if let Some(d) = &self.domain
            && !connectord_model::valid_domain(d)
        {
            return invalid(format!("domain {d:?} is not valid"));
        }
        if let Some(t) = &self.ept
            && !connectord_model::valid_name(t)
        {
            return invalid(format!("endpoint type {t:?} is not valid"));
        }
        Ok(())
    }
}

/// Why the simulator could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("invalid simulator options: {0}")]
    Invalid(String),
    #[error(
        "too many open files after {opened} device sockets: raise the limit (ulimit -n) or simulate fewer devices"
    )]
    TooManyOpenFiles { opened: usize },
    #[error("cannot open the UDP socket of device {index} on {addr}: {source}")]
    Bind {
        index: usize,
        addr: IpAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What happened during a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimReport {
    /// Devices whose first registration succeeded.
    pub registered: usize,
    /// Devices whose first registration failed (they stop; the others go on).
    pub failed: usize,
    /// Requests from the daemon answered (duplicates not counted).
    pub requests_served: u64,
    /// Notifications sent.
    pub notifications_sent: u64,
}

/// Counters shared by every device of a run.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    notifications: AtomicU64,
    deregistered: AtomicUsize,
}

/// Settings common to every device of a run.
#[derive(Debug)]
struct Shared {
    server: SocketAddr,
    lifetime_s: u32,
    notify_interval: Duration,
    queue_mode: bool,
    domain: Option<String>,
    ept: Option<String>,
    lwm2m: Lwm2mMode,
    counters: Counters,
}

impl Shared {
    fn new(opts: &SimOptions) -> Shared {
        Shared {
            server: opts.server,
            lifetime_s: opts.lifetime_s,
            notify_interval: Duration::from_millis(opts.notify_interval_ms),
            queue_mode: opts.queue_mode,
            domain: opts.domain.clone(),
            ept: opts.ept.clone(),
            lwm2m: opts.lwm2m,
            counters: Counters::default(),
        }
    }

    /// Max-Age of a temperature reading: until the next change, at least 1 s.
    fn max_age(&self) -> u32 {
        let ms = self.notify_interval.as_millis().div_ceil(1000);
        u32::try_from(ms).unwrap_or(u32::MAX).max(1)
    }
}

/// The outcome of a device's first registration.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Registered,
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Register,
    Update,
    Deregister,
}

/// A confirmable request of the device to the daemon, in progress.
#[derive(Debug)]
struct Exchange {
    kind: Kind,
    mid: u16,
    token: Vec<u8>,
    bytes: Vec<u8>,
    timeout: Duration,
    retransmits_left: u32,
    /// When to retransmit (or give up).
    next: Instant,
    /// An empty ACK came: a separate response follows; no more retransmissions.
    acked: bool,
    /// The lifetime this request announces.
    lifetime_s: u32,
}

/// How an exchange ended.
#[derive(Debug)]
enum Ended {
    Response(Packet),
    Timeout,
    Reset,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Observer {
    path: Vec<String>,
    peer: SocketAddr,
    token: Vec<u8>,
    /// The Content-Format its notifications are in (LwM2M 1.1 mode).
    format: u16,
}

/// One simulated device, without I/O: feed it datagrams ([`Device::on_datagram`]), timer
/// expiries ([`Device::on_timer`] at [`Device::next_deadline`]) and temperature ticks
/// ([`Device::on_tick`]); send what [`Device::take_outgoing`] returns.
#[derive(Debug)]
struct Device {
    name: String,
    shared: Arc<Shared>,
    lifetime_s: u32,
    /// The lifetime the daemon knows (from the last successful registration or update);
    /// differs from `lifetime_s` after a write until an update announces it.
    announced_lifetime_s: u32,
    /// `Location-Path` of the registration (`["rd", id]`), when registered.
    location: Option<Vec<String>>,
    exchange: Option<Exchange>,
    register_due: Option<Instant>,
    update_due: Option<Instant>,
    reboot_at: Option<Instant>,
    /// The first registration has not ended yet.
    first: bool,
    outcome: Option<Outcome>,
    stopping: bool,
    finished: bool,
    temp_tenths: i32,
    observe_seq: u32,
    observers: Vec<Observer>,
    sent_notifications: VecDeque<(u16, SocketAddr, Vec<u8>)>,
    replies: VecDeque<(SocketAddr, u16, Vec<u8>)>,
    next_mid: u16,
    next_token: u32,
    package_installed: bool,
    out: Vec<(Vec<u8>, SocketAddr)>,
}

impl Device {
    fn new(name: String, shared: Arc<Shared>) -> Device {
        let mut rng = rand::rng();
        Device {
            name,
            lifetime_s: shared.lifetime_s,
            announced_lifetime_s: shared.lifetime_s,
            shared,
            location: None,
            exchange: None,
            register_due: None,
            update_due: None,
            reboot_at: None,
            first: true,
            outcome: None,
            stopping: false,
            finished: false,
            temp_tenths: rng.random_range(200..=250),
            observe_seq: rng.random_range(0..1000),
            observers: Vec::new(),
            sent_notifications: VecDeque::new(),
            replies: VecDeque::new(),
            next_mid: rng.random(),
            next_token: rng.random(),
            package_installed: true,
            out: Vec::new(),
        }
    }

    fn take_outgoing(&mut self) -> Vec<(Vec<u8>, SocketAddr)> {
        std::mem::take(&mut self.out)
    }

    fn take_outcome(&mut self) -> Option<Outcome> {
        self.outcome.take()
    }

    fn fresh_mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    fn temperature(&self) -> String {
        let t = self.temp_tenths;
        let sign = if t < 0 { "-" } else { "" };
        format!("{sign}{}.{}", t.abs() / 10, t.abs() % 10)
    }

    /// The earliest instant at which [`Device::on_timer`] has something to do.
    fn next_deadline(&self) -> Option<Instant> {
        let mut d = self.reboot_at;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                d = Some(d.map_or(t, |d| d.min(t)));
            }
        };
        match &self.exchange {
            Some(ex) => consider(Some(ex.next)),
            // Scheduled requests wait until the exchange in progress ends.
            None => {
                consider(self.register_due);
                consider(self.update_due);
            }
        }
        d
    }

    // ----- requests of the device -----

    fn start_registration(&mut self, now: Instant) {
        self.register_due = None;
        self.update_due = None;
        let (version, links) = match self.shared.lwm2m {
            Lwm2mMode::Text1_0 => ("1.0", LINKS),
            Lwm2mMode::Lwm2m1_1 => ("1.1", LINKS_1_1),
        };
        let mut query = vec![
            format!("ep={}", self.name),
            format!("lt={}", self.lifetime_s),
            format!("lwm2m={version}"),
            format!("b={}", if self.shared.queue_mode { "UQ" } else { "U" }),
        ];
        if let Some(d) = &self.shared.domain {
            query.push(format!("d={d}"));
        }
        if let Some(t) = &self.shared.ept {
            query.push(format!("et={t}"));
        }
        let path = vec!["rd".to_string()];
        self.send_request(Kind::Register, &path, &query, links.as_bytes(), now);
    }

    fn start_update(&mut self, now: Instant) {
        self.update_due = None;
        let Some(path) = self.location.clone() else {
            return self.start_registration(now);
        };
        let query = if self.lifetime_s != self.announced_lifetime_s {
            vec![format!("lt={}", self.lifetime_s)]
        } else {
            Vec::new()
        };
        self.send_request(Kind::Update, &path, &query, &[], now);
    }

    fn start_deregistration(&mut self, now: Instant) {
        match self.location.clone() {
            Some(path) => self.send_request(Kind::Deregister, &path, &[], &[], now),
            None => self.finished = true,
        }
    }

    fn send_request(
        &mut self,
        kind: Kind,
        path: &[String],
        query: &[String],
        payload: &[u8],
        now: Instant,
    ) {
        let mid = self.fresh_mid();
        self.next_token = self.next_token.wrapping_add(1);
        let token = self.next_token.to_be_bytes().to_vec();
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(match kind {
            Kind::Register | Kind::Update => RequestType::Post,
            Kind::Deregister => RequestType::Delete,
        });
        p.header.message_id = mid;
        p.set_token(token.clone());
        for seg in path {
            p.add_option(CoapOption::UriPath, seg.clone().into_bytes());
        }
        if !payload.is_empty() {
            p.set_content_format(ContentFormat::ApplicationLinkFormat);
        }
        for q in query {
            p.add_option(CoapOption::UriQuery, q.clone().into_bytes());
        }
        p.payload = payload.to_vec();
        let Ok(bytes) = p.to_bytes() else {
            // Only an over-long endpoint name or domain could do this; validated earlier.
            tracing::warn!("{}: cannot encode a {kind:?} request", self.name);
            let lifetime_s = self.lifetime_s;
            return self.end_exchange_kind(kind, lifetime_s, Ended::Timeout, now);
        };
        let factor = rand::rng().random_range(1.0..ACK_RANDOM_FACTOR);
        let timeout = ACK_TIMEOUT.mul_f64(factor);
        self.out.push((bytes.clone(), self.shared.server));
        self.exchange = Some(Exchange {
            kind,
            mid,
            token,
            bytes,
            timeout,
            retransmits_left: if kind == Kind::Deregister {
                DEREGISTER_RETRANSMIT
            } else {
                MAX_RETRANSMIT
            },
            next: now + timeout,
            acked: false,
            lifetime_s: if kind == Kind::Update && !query.iter().any(|q| q.starts_with("lt=")) {
                self.announced_lifetime_s
            } else {
                self.lifetime_s
            },
        });
    }

    /// The next update: at once if a written lifetime is still to be announced, else
    /// after 75–85 % of the lifetime the daemon knows.
    fn schedule_update(&mut self, now: Instant) {
        let delay = if self.lifetime_s != self.announced_lifetime_s {
            Duration::ZERO
        } else {
            let f = rand::rng().random_range(0.75..0.85);
            Duration::from_secs(u64::from(self.announced_lifetime_s)).mul_f64(f)
        };
        self.update_due = Some(now + delay);
    }

    fn retry_delay(&self) -> Duration {
        (Duration::from_secs(u64::from(self.lifetime_s)) / 4).clamp(RETRY_MIN, RETRY_MAX)
    }

    fn end_exchange(&mut self, ended: Ended, now: Instant) {
        if let Some(ex) = self.exchange.take() {
            self.end_exchange_kind(ex.kind, ex.lifetime_s, ended, now);
        }
    }

    fn end_exchange_kind(&mut self, kind: Kind, lifetime_s: u32, ended: Ended, now: Instant) {
        let code = match &ended {
            Ended::Response(p) => match p.header.code {
                MessageClass::Response(c) => Some(c),
                _ => None,
            },
            _ => None,
        };
        match kind {
            Kind::Register => {
                let location = match &ended {
                    Ended::Response(p) if code == Some(ResponseType::Created) => {
                        let segs: Vec<String> = p
                            .get_option(CoapOption::LocationPath)
                            .map(|l| {
                                l.iter()
                                    .map(|v| String::from_utf8_lossy(v).into_owned())
                                    .collect()
                            })
                            .unwrap_or_default();
                        (!segs.is_empty()).then_some(segs)
                    }
                    _ => None,
                };
                match location {
                    Some(segs) => {
                        tracing::debug!("{} registered at /{}", self.name, segs.join("/"));
                        self.location = Some(segs);
                        self.announced_lifetime_s = lifetime_s;
                        if self.first {
                            self.first = false;
                            self.outcome = Some(Outcome::Registered);
                        }
                        if self.stopping {
                            self.start_deregistration(now);
                        } else {
                            self.schedule_update(now);
                        }
                    }
                    None => {
                        let why = describe(&ended, code);
                        tracing::debug!("{}: registration failed: {why}", self.name);
                        if self.first {
                            self.first = false;
                            self.outcome = Some(Outcome::Failed(why));
                            self.finished = true;
                        } else if self.stopping {
                            self.finished = true;
                        } else {
                            self.register_due = Some(now + self.retry_delay());
                        }
                    }
                }
            }
            Kind::Update => match code {
                Some(ResponseType::Changed) => {
                    self.announced_lifetime_s = lifetime_s;
                    self.schedule_update(now);
                }
                // The daemon forgot us (expired, or refuses the update): register anew.
                Some(c) if is_client_error(c) => {
                    tracing::debug!("{}: update answered {c:?}, registering again", self.name);
                    self.location = None;
                    self.observers.clear();
                    self.start_registration(now);
                }
                _ => {
                    tracing::debug!("{}: update failed: {}", self.name, describe(&ended, code));
                    self.update_due = Some(now + self.retry_delay());
                }
            },
            Kind::Deregister => {
                let done = matches!(
                    code,
                    Some(ResponseType::Deleted) | Some(ResponseType::NotFound)
                );
                if done {
                    self.shared
                        .counters
                        .deregistered
                        .fetch_add(1, Ordering::Relaxed);
                } else {
                    tracing::debug!(
                        "{}: de-registration failed: {}",
                        self.name,
                        describe(&ended, code)
                    );
                }
                self.location = None;
                self.finished = true;
            }
        }
    }

    /// Stop: de-register (after a registration in progress ends), then finish.
    fn begin_stop(&mut self, now: Instant) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        self.register_due = None;
        self.update_due = None;
        self.reboot_at = None;
        match self.exchange.as_ref().map(|e| e.kind) {
            Some(Kind::Register) | Some(Kind::Deregister) => {}
            Some(Kind::Update) => {
                self.exchange = None;
                self.start_deregistration(now);
            }
            None => self.start_deregistration(now),
        }
    }

    /// True when stopping needs a de-registration (the caller takes an in-flight permit).
    fn needs_deregistration(&self) -> bool {
        self.location.is_some()
            && !matches!(
                self.exchange.as_ref().map(|e| e.kind),
                Some(Kind::Register) | Some(Kind::Deregister)
            )
    }

    // ----- time -----

    fn on_timer(&mut self, now: Instant) {
        if let Some(ex) = &mut self.exchange
            && ex.next <= now
        {
            if ex.acked || ex.retransmits_left == 0 {
                self.end_exchange(Ended::Timeout, now);
            } else {
                ex.retransmits_left -= 1;
                ex.timeout *= 2;
                ex.next = now + ex.timeout;
                self.out.push((ex.bytes.clone(), self.shared.server));
            }
        }
        if self.reboot_at.is_some_and(|t| t <= now) {
            self.reboot_at = None;
            tracing::debug!("{} reboots", self.name);
            self.observers.clear();
            self.exchange = None;
            self.start_registration(now);
        }
        if self.exchange.is_none() {
            if self.register_due.is_some_and(|t| t <= now) {
                self.start_registration(now);
            } else if self.update_due.is_some_and(|t| t <= now) {
                self.start_update(now);
            }
        }
    }

    /// The temperature changes; observers are notified.
    fn on_tick(&mut self) {
        let mut rng = rand::rng();
        let mut step = rng.random_range(1..=5);
        if rng.random_bool(0.5) {
            step = -step;
        }
        if !(TEMP_MIN..=TEMP_MAX).contains(&(self.temp_tenths + step)) {
            step = -step;
        }
        self.temp_tenths += step;
        self.observe_seq = (self.observe_seq + 1) & 0x00FF_FFFF;
        // What the temperature is part of: the resource, and in LwM2M 1.1 mode its
        // instance and object too.
        let targets = self.observers_of(&TEMPERATURE, self.shared.lwm2m == Lwm2mMode::Lwm2m1_1);
        for (peer, token, path, format) in targets {
            let segs: Vec<&str> = path.iter().map(String::as_str).collect();
            let payload = match self.shared.lwm2m {
                Lwm2mMode::Text1_0 => self.temperature().into_bytes(),
                Lwm2mMode::Lwm2m1_1 => match self.encoded(&segs, format) {
                    Some(Ok(bytes)) => bytes,
                    _ => continue,
                },
            };
            self.send_notification(peer, token, format, payload);
        }
    }

    /// The lifetime (`/1/0/1`) changed: its observers are notified, and those of the
    /// instance it is part of (`/1/0`), each in the format it observes in (text/plain:
    /// the number; else as its reads are encoded). The object `/1` is not readable, so
    /// nobody observes it; an observer of `/1/0` in text/plain (a one-line summary in
    /// LwM2M 1.0 mode) is skipped.
    fn on_lifetime_changed(&mut self) {
        const LIFETIME: [&str; 3] = ["1", "0", "1"];
        self.observe_seq = (self.observe_seq + 1) & 0x00FF_FFFF;
        for (peer, token, path, format) in self.observers_of(&LIFETIME, true) {
            let segs: Vec<&str> = path.iter().map(String::as_str).collect();
            let payload = match format {
                0 if segs.len() == LIFETIME.len() => self.lifetime_s.to_string().into_bytes(),
                0 => continue,
                f => match self.encoded(&segs, f) {
                    Some(Ok(bytes)) => bytes,
                    _ => continue,
                },
            };
            self.send_notification(peer, token, format, payload);
        }
    }

    /// The observers of `path` (peer, token, path, format), and with `with_parents` those
    /// of what it is part of (its instance and object) too.
    fn observers_of(
        &self,
        path: &[&str],
        with_parents: bool,
    ) -> Vec<(SocketAddr, Vec<u8>, Vec<String>, u16)> {
        self.observers
            .iter()
            .filter(|o| {
                o.path == path
                    || (with_parents
                        && o.path.len() <= path.len()
                        && o.path.iter().zip(path).all(|(a, b)| a == b))
            })
            .map(|o| (o.peer, o.token.clone(), o.path.clone(), o.format))
            .collect()
    }

    /// Sends one NON notification with the current Observe sequence number.
    fn send_notification(
        &mut self,
        peer: SocketAddr,
        token: Vec<u8>,
        format: u16,
        payload: Vec<u8>,
    ) {
        let mid = self.fresh_mid();
        let mut p = Packet::new();
        p.header.set_type(MessageType::NonConfirmable);
        p.header.code = MessageClass::Response(ResponseType::Content);
        p.header.message_id = mid;
        p.set_token(token.clone());
        p.add_option(CoapOption::Observe, encode_uint(self.observe_seq));
        p.add_option(CoapOption::ContentFormat, encode_uint(u32::from(format)));
        p.add_option(CoapOption::MaxAge, encode_uint(self.shared.max_age()));
        p.payload = payload;
        if let Ok(bytes) = p.to_bytes() {
            self.out.push((bytes, peer));
            if self.sent_notifications.len() >= SENT_NOTIFICATIONS {
                self.sent_notifications.pop_front();
            }
            self.sent_notifications.push_back((mid, peer, token));
            self.shared
                .counters
                .notifications
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    // ----- datagrams -----

    fn on_datagram(&mut self, buf: &[u8], from: SocketAddr, now: Instant) {
        let Ok(packet) = message::decode(buf) else {
            return;
        };
        let mtype = packet.header.get_type();
        match packet.header.code {
            MessageClass::Empty => match mtype {
                MessageType::Confirmable => self
                    .out
                    .push((message::reset(packet.header.message_id), from)),
                MessageType::Acknowledgement => self.on_ack(packet, from, now),
                MessageType::Reset => self.on_reset(packet.header.message_id, from, now),
                MessageType::NonConfirmable => {}
            },
            MessageClass::Request(_) => match mtype {
                MessageType::Confirmable | MessageType::NonConfirmable => {
                    self.on_request(&packet, from, now)
                }
                _ => {}
            },
            MessageClass::Response(_) => match mtype {
                MessageType::Acknowledgement => self.on_ack(packet, from, now),
                MessageType::Confirmable | MessageType::NonConfirmable => {
                    self.on_separate_response(packet, from, now)
                }
                MessageType::Reset => {}
            },
            MessageClass::Reserved(_) => {}
        }
    }

    fn on_ack(&mut self, packet: Packet, from: SocketAddr, now: Instant) {
        let Some(ex) = &mut self.exchange else {
            return;
        };
        if from != self.shared.server || packet.header.message_id != ex.mid {
            return;
        }
        if packet.header.code == MessageClass::Empty {
            if !ex.acked {
                ex.acked = true;
                ex.next = now + SEPARATE_RESPONSE_WAIT;
            }
            return;
        }
        if packet.get_token() != ex.token.as_slice() {
            return;
        }
        self.end_exchange(Ended::Response(packet), now);
    }

    fn on_separate_response(&mut self, packet: Packet, from: SocketAddr, now: Instant) {
        let ours = self
            .exchange
            .as_ref()
            .is_some_and(|ex| from == self.shared.server && packet.get_token() == ex.token);
        let confirmable = packet.header.get_type() == MessageType::Confirmable;
        if !ours {
            if confirmable {
                self.out
                    .push((message::reset(packet.header.message_id), from));
            }
            return;
        }
        if confirmable {
            self.out
                .push((message::empty_ack(packet.header.message_id), from));
        }
        self.end_exchange(Ended::Response(packet), now);
    }

    fn on_reset(&mut self, mid: u16, from: SocketAddr, now: Instant) {
        if let Some(ex) = &self.exchange
            && from == self.shared.server
            && ex.mid == mid
        {
            return self.end_exchange(Ended::Reset, now);
        }
        // An RST answering a notification: that observer is no longer interested.
        if let Some(i) = self
            .sent_notifications
            .iter()
            .position(|(m, p, _)| *m == mid && *p == from)
            && let Some((_, peer, token)) = self.sent_notifications.remove(i)
        {
            self.observers
                .retain(|o| !(o.peer == peer && o.token == token));
        }
    }

    fn on_request(&mut self, req: &Packet, from: SocketAddr, now: Instant) {
        let mid = req.header.message_id;
        if let Some((_, _, reply)) = self
            .replies
            .iter()
            .find(|(p, m, _)| *p == from && *m == mid)
        {
            // A duplicate: a CON is answered again, a NON is dropped.
            if req.header.get_type() == MessageType::Confirmable {
                self.out.push((reply.clone(), from));
            }
            return;
        }
        let response = self.handle(req, from, now);
        let packet = response.into_packet(req, || self.fresh_mid());
        let Ok(bytes) = packet.to_bytes() else {
            return;
        };
        self.shared
            .counters
            .requests
            .fetch_add(1, Ordering::Relaxed);
        if self.replies.len() >= REPLY_CACHE {
            self.replies.pop_front();
        }
        self.replies.push_back((from, mid, bytes.clone()));
        self.out.push((bytes, from));
    }

    /// The answer to one request.
    fn handle(&mut self, req: &Packet, from: SocketAddr, now: Instant) -> Response {
        let MessageClass::Request(method) = req.header.code else {
            return Response::diagnostic(ResponseType::BadRequest, "not a request");
        };
        if let Some(v) = uint_option(req, CoapOption::Block1) {
            match Block::decode(v) {
                Some(b) if b.num == 0 && !b.more => {}
                _ => {
                    return Response::diagnostic(
                        ResponseType::RequestEntityTooLarge,
                        "the simulator takes single-block writes only",
                    );
                }
            }
        }
        let path = uri_path(req);
        let segs: Vec<&str> = path.iter().map(String::as_str).collect();
        if self.shared.lwm2m == Lwm2mMode::Lwm2m1_1 && method == RequestType::Get {
            return self.get_1_1(req, &path, from);
        }
        // Both modes: a lifetime written in TLV (what the daemon encodes an application's
        // JSON in for an LwM2M 1.0 client) or another format LwM2M names. The 1.0 mode read
        // it as text and refused TLV's bytes as "not a whole number".
        if method == RequestType::Put
            && segs == ["1", "0", "1"]
            && let Some(cf) = uint_option(req, CoapOption::ContentFormat)
            && cf != 0
        {
            return self.write_lifetime_1_1(req, cf, now);
        }
        let readable = self.read(&segs);
        let accept = uint_option(req, CoapOption::Accept);
        // LwM2M 1.0 mode: an object instance is read in TLV (LwM2M 1.0's format for more
        // than one resource) unless text/plain is asked for; its one-line summary only
        // then. It answered the summary to every read, which no LwM2M decoder takes.
        if method == RequestType::Get
            && readable.is_some()
            && segs.len() < 3
            && accept.is_none_or(|a| a == u32::from(lwm2m_data::format::TLV))
        {
            return self.get_1_1(req, &path, from);
        }
        match (method, segs.as_slice()) {
            (RequestType::Get, _) if readable.is_some() => {
                if let Some(accept) = accept
                    && accept != 0
                {
                    return Response::diagnostic(
                        ResponseType::NotAcceptable,
                        "only text/plain (0) for one resource; TLV (11542) for an object instance",
                    );
                }
                let text = readable.unwrap_or_default();
                let mut r = Response::new(ResponseType::Content);
                // Every path it lists may be observed: it registers as an LwM2M client
                // (`lwm2m=1.0`), whose paths the daemon takes as observable whether or not
                // they are marked `obs`. The temperature and the lifetime change, so only
                // their observers are ever notified.
                r = self.observed(req, &path, from, 0, r);
                r = r.with_option(CoapOption::ContentFormat, encode_uint(0));
                if segs == TEMPERATURE {
                    r = r.with_option(CoapOption::MaxAge, encode_uint(self.shared.max_age()));
                }
                r.payload = text.into_bytes();
                block2(req, r)
            }
            (RequestType::Put, ["1", "0", "1"]) => {
                let value = std::str::from_utf8(&req.payload)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok());
                self.set_lifetime(value, now)
            }
            (RequestType::Post, ["3", "0", "4"]) => {
                if !self.stopping {
                    self.reboot_at = Some(now + REBOOT_DELAY);
                }
                Response::new(ResponseType::Changed)
            }
            (RequestType::Post, ["1", "0", "8"]) => {
                if self.location.is_some() && !self.stopping {
                    self.update_due = Some(now);
                }
                Response::new(ResponseType::Changed)
            }
            (RequestType::Delete, ["9", "0"]) if self.package_installed => {
                self.package_installed = false;
                Response::new(ResponseType::Deleted)
            }
            (RequestType::Put, ["3303", "0", "5700"]) => Response::diagnostic(
                ResponseType::MethodNotAllowed,
                "the sensor value is read-only",
            ),
            _ if readable.is_some()
                || matches!(segs.as_slice(), ["3", "0", "4"] | ["1", "0", "8"])
                || (segs == ["9", "0"] && self.package_installed) =>
            {
                Response::diagnostic(ResponseType::MethodNotAllowed, "method not allowed")
            }
            _ => Response::diagnostic(ResponseType::NotFound, "no such resource"),
        }
    }

    /// A written lifetime: a whole number of seconds, at least 1.
    fn set_lifetime(&mut self, value: Option<u32>, now: Instant) -> Response {
        match value.filter(|v| *v > 0) {
            Some(lt) => {
                let changed = lt != self.lifetime_s;
                self.lifetime_s = lt;
                if changed {
                    self.on_lifetime_changed();
                }
                // LwM2M: a new lifetime is announced with an update.
                if self.location.is_some() && !self.stopping {
                    self.update_due = Some(now);
                }
                Response::new(ResponseType::Changed)
            }
            None => Response::diagnostic(
                ResponseType::BadRequest,
                "the lifetime is a whole number of seconds, at least 1",
            ),
        }
    }

    /// LwM2M 1.1 mode: a lifetime written in TLV, SenML or another format it reads.
    fn write_lifetime_1_1(&mut self, req: &Packet, cf: u32, now: Instant) -> Response {
        let Ok(cf) = u16::try_from(cf) else {
            return Response::diagnostic(ResponseType::UnsupportedContentFormat, "unknown format");
        };
        let Ok(path) = "/1/0/1".parse::<lwm2m_data::Path>() else {
            return Response::new(ResponseType::InternalServerError);
        };
        match lwm2m_data::decode(cf, &req.payload, &path) {
            Ok(v) => {
                let lt = v.as_u64().and_then(|v| u32::try_from(v).ok());
                self.set_lifetime(lt, now)
            }
            Err(lwm2m_data::DecodeError::UnsupportedFormat(_)) => Response::diagnostic(
                ResponseType::UnsupportedContentFormat,
                "TLV, SenML JSON/CBOR, LwM2M JSON/CBOR or text/plain",
            ),
            Err(e) => Response::diagnostic(ResponseType::BadRequest, e.to_string()),
        }
    }

    /// LwM2M 1.1 mode: the value tree of a readable path (see [`connectord_lwm2m`]).
    fn tree(&self, path: &[&str]) -> Option<serde_json::Value> {
        use serde_json::json;
        let temperature = f64::from(self.temp_tenths) / 10.0;
        Some(match path {
            ["3", "0"] => json!({"0": "connectord", "1": "simulator", "2": self.name}),
            ["3", "0", "0"] => json!("connectord"),
            ["3", "0", "1"] => json!("simulator"),
            ["3", "0", "2"] => json!(self.name),
            ["1", "0"] => json!({"1": self.lifetime_s}),
            ["1", "0", "1"] => json!(self.lifetime_s),
            ["3303", "0"] => json!({"5700": temperature, "5701": "Cel"}),
            ["3303", "0", "5700"] => json!(temperature),
            ["3303", "0", "5701"] => json!("Cel"),
            _ => return None,
        })
    }

    /// LwM2M 1.1 mode: a readable path encoded in `format`; `None` for an unknown path.
    fn encoded(&self, path: &[&str], format: u16) -> Option<Result<Vec<u8>, String>> {
        let tree = self.tree(path)?;
        let text = format!("/{}", path.join("/"));
        Some(
            text.parse::<lwm2m_data::Path>()
                .map_err(|e| e.to_string())
                .and_then(|p| lwm2m_data::encode(&tree, &p, format).map_err(|e| e.to_string())),
        )
    }

    /// A read's Observe option: 0 makes (peer, token) an observer of `path`, notified in
    /// `format` (the answer `r` then carries the current sequence), 1 removes it; at most
    /// [`MAX_OBSERVERS`], beyond which the read is answered without Observe.
    fn observed(
        &mut self,
        req: &Packet,
        path: &[String],
        from: SocketAddr,
        format: u16,
        mut r: Response,
    ) -> Response {
        if let Some(obs) = uint_option(req, CoapOption::Observe) {
            let who = Observer {
                path: path.to_vec(),
                peer: from,
                token: req.get_token().to_vec(),
                format,
            };
            self.observers
                .retain(|o| !(o.peer == who.peer && o.token == who.token));
            if obs == 0 && self.observers.len() < MAX_OBSERVERS {
                self.observers.push(who);
                r = r.with_option(CoapOption::Observe, encode_uint(self.observe_seq));
            }
        }
        r
    }

    /// LwM2M 1.1 mode: a read or observe. TLV unless the Accept option asks for SenML
    /// JSON, SenML CBOR or (one resource) text/plain; anything else is 4.06. Every path
    /// may be observed; its notifications come in the format of the observe request.
    fn get_1_1(&mut self, req: &Packet, path: &[String], from: SocketAddr) -> Response {
        let segs: Vec<&str> = path.iter().map(String::as_str).collect();
        let format = match uint_option(req, CoapOption::Accept) {
            None => lwm2m_data::format::TLV,
            Some(a) => match u16::try_from(a) {
                Ok(
                    f @ (lwm2m_data::format::TLV
                    | lwm2m_data::format::SENML_JSON
                    | lwm2m_data::format::SENML_CBOR),
                ) => f,
                Ok(lwm2m_data::format::TEXT_PLAIN) if segs.len() >= 3 => {
                    lwm2m_data::format::TEXT_PLAIN
                }
                _ => {
                    return Response::diagnostic(
                        ResponseType::NotAcceptable,
                        "TLV (11542), SenML JSON (110), SenML CBOR (112), or text/plain (0) for one resource",
                    );
                }
            },
        };
        let payload = match self.encoded(&segs, format) {
            None if segs == ["3", "0", "4"] || segs == ["1", "0", "8"] => {
                return Response::diagnostic(ResponseType::MethodNotAllowed, "method not allowed");
            }
            None => return Response::diagnostic(ResponseType::NotFound, "no such resource"),
            Some(Err(e)) => return Response::diagnostic(ResponseType::InternalServerError, &e),
            Some(Ok(p)) => p,
        };
        let mut r = self.observed(
            req,
            path,
            from,
            format,
            Response::new(ResponseType::Content),
        );
        r = r.with_option(CoapOption::ContentFormat, encode_uint(u32::from(format)));
        if TEMPERATURE.starts_with(&segs) {
            r = r.with_option(CoapOption::MaxAge, encode_uint(self.shared.max_age()));
        }
        r.payload = payload;
        block2(req, r)
    }

    /// The text of a readable resource.
    fn read(&self, path: &[&str]) -> Option<String> {
        Some(match path {
            ["3", "0"] => format!("connectord simulator {}", self.name),
            ["3", "0", "0"] => "connectord".into(),
            ["3", "0", "1"] => "simulator".into(),
            ["3", "0", "2"] => self.name.clone(),
            ["1", "0"] => format!("lifetime={}", self.lifetime_s),
            ["1", "0", "1"] => self.lifetime_s.to_string(),
            ["3303", "0", "5700"] => self.temperature(),
            _ => return None,
        })
    }
}

fn is_client_error(c: ResponseType) -> bool {
    matches!(
        c,
        ResponseType::BadRequest
            | ResponseType::Unauthorized
            | ResponseType::BadOption
            | ResponseType::Forbidden
            | ResponseType::NotFound
            | ResponseType::MethodNotAllowed
            | ResponseType::NotAcceptable
            | ResponseType::PreconditionFailed
            | ResponseType::RequestEntityTooLarge
            | ResponseType::UnsupportedContentFormat
    )
}

fn describe(ended: &Ended, code: Option<ResponseType>) -> String {
    match ended {
        Ended::Timeout => "no answer (timeout)".into(),
        Ended::Reset => "reset by the server".into(),
        Ended::Response(p) => {
            let diag = String::from_utf8_lossy(&p.payload);
            match code {
                Some(ResponseType::Created) => "2.01 without a Location-Path".into(),
                Some(c) if diag.is_empty() => format!("answered {c:?}"),
                Some(c) => format!("answered {c:?}: {diag}"),
                None => "not a response".into(),
            }
        }
    }
}

/// Applies a Block2 option of the request to a 2.05 response (RFC 7959).
fn block2(req: &Packet, mut r: Response) -> Response {
    let Some(v) = uint_option(req, CoapOption::Block2) else {
        return r;
    };
    let Some(b) = Block::decode(v) else {
        return Response::diagnostic(ResponseType::BadOption, "reserved block size");
    };
    let size = b.size();
    let start = (b.num as usize).saturating_mul(size);
    if start > 0 && start >= r.payload.len() {
        return Response::diagnostic(ResponseType::BadOption, "block out of range");
    }
    let end = start.saturating_add(size).min(r.payload.len());
    let more = end < r.payload.len();
    r.payload = r.payload[start..end].to_vec();
    r.with_option(
        CoapOption::Block2,
        Block {
            num: b.num,
            more,
            szx: b.szx,
        }
        .encode(),
    )
}

/// Runs `devices` simulated devices until `stop` completes; de-registers every device
/// before returning. Returns early (after a warning) if no device is left running, i.e.
/// every first registration failed.
pub async fn run(
    opts: SimOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<SimReport, SimError> {
    opts.validate()?;
    // A TLS device connects on its task; the UDP ones have their sockets opened first.
    let sockets = match opts.tls {
        Some(_) => Vec::new(),
        None => open_sockets(&opts)?,
    };
    let shared = Arc::new(Shared::new(&opts));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let t0 = Instant::now();
    let pace = (opts.register_rate > 0).then(|| Duration::from_secs(1) / opts.register_rate);
    tracing::info!(
        "simulating {} devices against {} from {}",
        opts.devices,
        opts.server,
        opts.bind
    );
    // One dimpl configuration built (and validated, milliseconds) for all the devices of
    // `dtls_psk_per_endpoint`; each device's is a copy with its own identity.
    let per_endpoint = match &opts.dtls_psk_per_endpoint {
        None => None,
        Some(key) => Some(
            DtlsConfig::new(ClientAuth::Psk {
                identity: opts.endpoint_name(0).into_bytes(),
                key: key.clone(),
            })
            .map_err(|e| SimError::Invalid(format!("dtls_psk_per_endpoint: {e}")))?,
        ),
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut sockets = sockets.into_iter();
    for index in 0..opts.devices {
        let dtls = match (&per_endpoint, &opts.dtls_psk_per_endpoint) {
            (Some(base), Some(key)) => {
                base.with_psk(opts.endpoint_name(index).into_bytes(), key.clone())
            }
            _ => opts.dtls.clone(),
        };
        let dev = Device::new(opts.endpoint_name(index), Arc::clone(&shared));
        let start_at = match pace {
            Some(p) => t0 + p.saturating_mul(u32::try_from(index).unwrap_or(u32::MAX)),
            None => t0,
        };
        let ctx = DeviceCtx {
            dtls,
            server: opts.server,
            stop: stop_rx.clone(),
            start_at,
            permits: Arc::clone(&permits),
            events: ev_tx.clone(),
        };
        match &opts.tls {
            Some(tls) => {
                tasks.spawn(tls_device_task(dev, tls.clone(), opts.bind, ctx));
            }
            None => {
                let Some(sock) = sockets.next() else { break };
                tasks.spawn(device_task(dev, sock, ctx));
            }
        }
    }
    drop(ev_tx);

    let mut report = SimReport::default();
    let mut first_failure: Option<String> = None;
    let mut count = |ev: (String, Outcome), report: &mut SimReport| match ev.1 {
        Outcome::Registered => report.registered += 1,
        Outcome::Failed(why) => {
            report.failed += 1;
            if first_failure.is_none() {
                tracing::warn!("registration of {} failed: {why}", ev.0);
                first_failure = Some(why);
            }
        }
    };
    let mut progress =
        tokio::time::interval_at(t0 + Duration::from_secs(5), Duration::from_secs(5));
    let mut announced = false;
    let mut hinted = false;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            ev = ev_rx.recv() => match ev {
                Some(ev) => {
                    count(ev, &mut report);
                    if !announced && report.registered + report.failed == opts.devices {
                        announced = true;
                        tracing::info!(
                            "{} devices registered ({} failed) in {:.1} s",
                            report.registered,
                            report.failed,
                            t0.elapsed().as_secs_f64()
                        );
                    }
                }
                None => {
                    tracing::warn!("no simulated device is running: every registration failed");
                    break;
                }
            },
            _ = progress.tick(), if !announced => {
                tracing::info!(
                    "{} of {} devices registered ({} failed)",
                    report.registered,
                    opts.devices,
                    report.failed
                );
                // Nothing answered yet: say where it is sent and what to check, once
                // (found by an outside review: a wrong port looked like retrying forever,
                // one progress line after another for the minute and a half that CoAP
                // retransmits before a registration counts as failed).
                if !hinted && report.registered + report.failed == 0 {
                    hinted = true;
                    let (key, wait) = if opts.tls.is_some() {
                        ("coap.listen_tls", String::new())
                    } else if opts.dtls.is_some() {
                        ("coap.listen_dtls", String::new())
                    } else {
                        (
                            "coap.listen",
                            format!(
                                "; each registration is sent again for up to {} s before it counts as failed",
                                NO_ANSWER_GIVE_UP.as_secs()
                            ),
                        )
                    };
                    tracing::warn!(
                        "no answer from {} after {} s: is the daemon listening there (its {key}, or --server)?{wait}",
                        opts.server,
                        t0.elapsed().as_secs(),
                    );
                }
            }
        }
    }

    tracing::info!("simulator stopping: de-registering devices");
    let _ = stop_tx.send(true);
    let all_done = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(STOP_GRACE, all_done).await.is_err() {
        tracing::warn!(
            "{} devices did not finish de-registering within {} s",
            tasks.len(),
            STOP_GRACE.as_secs()
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    while let Ok(ev) = ev_rx.try_recv() {
        count(ev, &mut report);
    }
    report.requests_served = shared.counters.requests.load(Ordering::Relaxed);
    report.notifications_sent = shared.counters.notifications.load(Ordering::Relaxed);
    tracing::info!(
        "simulator stopped: {} devices registered, {} failed, {} de-registered, {} requests served, {} notifications sent",
        report.registered,
        report.failed,
        shared.counters.deregistered.load(Ordering::Relaxed),
        report.requests_served,
        report.notifications_sent
    );
    Ok(report)
}

/// Opens every device socket up front, so that a shortage of descriptors or ports is an
/// error before anything registers.
fn open_sockets(opts: &SimOptions) -> Result<Vec<UdpSocket>, SimError> {
    let mut out = Vec::with_capacity(opts.devices);
    for index in 0..opts.devices {
        let bind_err = |source: std::io::Error| {
            if source.raw_os_error() == Some(24) || source.raw_os_error() == Some(23) {
                // EMFILE / ENFILE.
                SimError::TooManyOpenFiles { opened: index }
            } else {
                SimError::Bind {
                    index,
                    addr: opts.bind,
                    source,
                }
            }
        };
        let std_sock =
            std::net::UdpSocket::bind(SocketAddr::new(opts.bind, 0)).map_err(bind_err)?;
        std_sock.set_nonblocking(true).map_err(bind_err)?;
        out.push(UdpSocket::from_std(std_sock).map_err(bind_err)?);
    }
    Ok(out)
}

struct DeviceCtx {
    /// DTLS to `server`, or plain CoAP.
    dtls: Option<DtlsConfig>,
    server: SocketAddr,
    stop: watch::Receiver<bool>,
    start_at: Instant,
    permits: Arc<Semaphore>,
    events: mpsc::UnboundedSender<(String, Outcome)>,
}

/// Waits for the device's start slot and a registration permit: `Err` when the stop
/// came first.
async fn start_slot(ctx: &mut DeviceCtx) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, ()> {
    tokio::select! {
        biased;
        _ = ctx.stop.changed() => Err(()),
        p = async {
            tokio::time::sleep_until(ctx.start_at).await;
            Arc::clone(&ctx.permits).acquire_owned().await
        } => Ok(p.ok()),
    }
}

/// One device: moves datagrams between its socket and its [`Device`].
async fn device_task(mut dev: Device, sock: UdpSocket, mut ctx: DeviceCtx) {
    // Wait for the start slot and a registration permit (or the stop).
    let Ok(mut permit) = start_slot(&mut ctx).await else {
        return;
    };
    // A DTLS device handshakes first; every message then goes through the session.
    let mut session = match &ctx.dtls {
        None => None,
        Some(cfg) => match DtlsClient::connect(cfg, &sock, ctx.server, HANDSHAKE_LIMIT).await {
            Ok(c) => Some(c),
            Err(e) => {
                let _ = ctx.events.send((
                    dev.name.clone(),
                    Outcome::Failed(format!("DTLS handshake: {e}")),
                ));
                return;
            }
        },
    };
    dev.start_registration(Instant::now());
    let period = dev.shared.notify_interval;
    let phase = period.mul_f64(rand::rng().random_range(0.0..1.0));
    let mut ticker = tokio::time::interval_at(Instant::now() + phase, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        for (bytes, to) in dev.take_outgoing() {
            let records = match session.as_mut() {
                None => vec![bytes],
                Some(c) => c.send(&bytes).unwrap_or_default(),
            };
            for r in records {
                if let Err(e) = sock.send_to(&r, to).await {
                    tracing::trace!("{}: send to {to} failed: {e}", dev.name);
                }
            }
        }
        if let Some(outcome) = dev.take_outcome() {
            let _ = ctx.events.send((dev.name.clone(), outcome));
        }
        if dev.finished {
            break;
        }
        if permit.is_some() && dev.exchange.is_none() {
            permit = None;
        }
        let deadline = dev.next_deadline();
        tokio::select! {
            _ = ctx.stop.changed(), if !dev.stopping => {
                if permit.is_none() && dev.needs_deregistration() {
                    permit = Arc::clone(&ctx.permits).acquire_owned().await.ok();
                }
                dev.begin_stop(Instant::now());
            }
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, from)) => match session.as_mut() {
                    None => dev.on_datagram(&buf[..n], from, Instant::now()),
                    Some(c) => {
                        for r in c.on_datagram(&buf[..n], std::time::Instant::now()).unwrap_or_default() {
                            let _ = sock.send_to(&r, from).await;
                        }
                        while let Some(m) = c.take_message() {
                            dev.on_datagram(&m, from, Instant::now());
                        }
                    }
                },
                Err(e) => {
                    // Unconnected UDP rarely fails here; do not spin if it does.
                    tracing::trace!("{}: receive failed: {e}", dev.name);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = ticker.tick(), if !dev.stopping => dev.on_tick(),
            _ = async {
                if let Some(t) = session.as_ref().and_then(|c| c.next_timer()) {
                    tokio::time::sleep_until(Instant::from_std(t)).await;
                }
            }, if session.as_ref().is_some_and(|c| c.next_timer().is_some()) => {
                if let Some(c) = session.as_mut() {
                    for r in c.on_timer(std::time::Instant::now()).unwrap_or_default() {
                        let _ = sock.send_to(&r, ctx.server).await;
                    }
                }
            }
            _ = async {
                if let Some(d) = deadline {
                    tokio::time::sleep_until(d).await;
                }
            }, if deadline.is_some() => dev.on_timer(Instant::now()),
        }
    }
}

/// Largest message a TLS device takes (its CSM's Max-Message-Size).
const TLS_MAX_MESSAGE: usize = 16 * 1024;
/// Requests of the device awaiting their response on its TLS connection (a device has
/// one exchange at a time; the bound only caps a misbehaving peer).
const TLS_PENDING: usize = 16;

/// The RFC 8323 edge of a TLS device, sans-IO: the [`Device`] speaks RFC 7252, so its
/// messages are framed on the way out (type and message id dropped; empty ACKs and RSTs
/// have no meaning on TCP and are dropped, and so is the retransmission of a request
/// already sent), and frames from the daemon get a type and message id on the way in: a
/// request becomes a CON with a fresh id, the response to one of the device's requests
/// the ACK of that request's id (so its exchange ends as with a piggybacked response),
/// any other response a NON. The daemon's CSM is taken, Ping answered with Pong;
/// Release, Abort or a frame that does not decode end the connection.
#[derive(Debug, Default)]
struct TcpEdge {
    /// The device's requests awaiting a response: token → message id.
    pending: std::collections::HashMap<Vec<u8>, u16>,
    next_mid: u16,
    buf: Vec<u8>,
}

/// What the daemon's bytes gave: messages for the [`Device`], frames to write back.
type Incoming = (Vec<Vec<u8>>, Vec<Vec<u8>>);

impl TcpEdge {
    /// The frame of one RFC 7252 message of the device; `None` when it has nothing to
    /// say on TCP.
    fn outgoing(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        let (mtype, mid, frame) = rfc8323::from_udp(bytes).ok()?;
        if mtype == rfc8323::RST || frame.code == 0 {
            return None;
        }
        if frame.code >> 5 == 0 {
            if self.pending.get(&frame.token) == Some(&mid) {
                return None;
            }
            if self.pending.len() >= TLS_PENDING {
                self.pending.clear();
            }
            self.pending.insert(frame.token.clone(), mid);
        }
        Some(rfc8323::encode(&frame))
    }

    /// Bytes read from the connection; `Err` (why) when the connection is over.
    fn incoming(&mut self, data: &[u8]) -> Result<Incoming, String> {
        self.buf.extend_from_slice(data);
        let (mut msgs, mut replies) = (Vec::new(), Vec::new());
        let mut used = 0;
        loop {
            let frame = match rfc8323::decode(&self.buf[used..], TLS_MAX_MESSAGE) {
                Ok(Some((f, n))) => {
                    used += n;
                    f
                }
                Ok(None) => break,
                Err(e) => return Err(format!("a frame that does not decode: {e}")),
            };
            match Signal::read(&frame).map_err(|e| format!("a bad signal: {e}"))? {
                Some(Signal::Csm { .. } | Signal::Pong) => continue,
                Some(Signal::Ping) => {
                    replies.push(rfc8323::encode(&rfc8323::signal(
                        rfc8323::PONG,
                        &frame.token,
                    )));
                    continue;
                }
                Some(Signal::Release) => return Err("released by the daemon".into()),
                Some(Signal::Abort(why)) => return Err(format!("aborted by the daemon: {why}")),
                None => {}
            }
            let (mtype, mid) = match frame.code >> 5 {
                _ if frame.code == 0 => continue,
                0 => (rfc8323::CON, self.fresh_mid()),
                2 | 4 | 5 => match self.pending.remove(&frame.token) {
                    Some(mid) => (rfc8323::ACK, mid),
                    None => (rfc8323::NON, self.fresh_mid()),
                },
                _ => continue,
            };
            msgs.push(rfc8323::to_udp(&frame, mtype, mid));
        }
        self.buf.drain(..used);
        Ok((msgs, replies))
    }

    fn fresh_mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }
}

/// One device over CoAP over TLS: connects (from `bind`), sends its CSM, then moves
/// messages between its connection and its [`Device`] through a [`TcpEdge`]. A
/// connection that ends (Release, Abort, closed) ends the device: it does not reconnect.
/// At stop it de-registers, sends Release and closes.
async fn tls_device_task(mut dev: Device, tls: TlsConfig, bind: IpAddr, mut ctx: DeviceCtx) {
    let Ok(mut permit) = start_slot(&mut ctx).await else {
        return;
    };
    let fail = |dev: &Device, why: String| {
        let _ = ctx.events.send((dev.name.clone(), Outcome::Failed(why)));
    };
    let stream = match tokio::time::timeout(HANDSHAKE_LIMIT, tls.connect(bind, ctx.server)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail(&dev, format!("TLS connection: {e}")),
        Err(_) => return fail(&dev, "TLS connection: no handshake in time".into()),
    };
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut edge = TcpEdge::default();
    let csm = rfc8323::encode(&rfc8323::csm(TLS_MAX_MESSAGE as u32));
    if let Err(e) = wr.write_all(&csm).await {
        return fail(&dev, format!("TLS connection: {e}"));
    }
    let mut reported = false;
    dev.start_registration(Instant::now());
    let period = dev.shared.notify_interval;
    let phase = period.mul_f64(rand::rng().random_range(0.0..1.0));
    let mut ticker = tokio::time::interval_at(Instant::now() + phase, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut chunk = vec![0u8; TLS_MAX_MESSAGE];
    let ended = loop {
        let mut out = Vec::new();
        for (bytes, _) in dev.take_outgoing() {
            out.extend(edge.outgoing(&bytes).unwrap_or_default());
        }
        if !out.is_empty()
            && let Err(e) = wr.write_all(&out).await
        {
            break Some(format!("write failed: {e}"));
        }
        if let Some(outcome) = dev.take_outcome() {
            reported = true;
            let _ = ctx.events.send((dev.name.clone(), outcome));
        }
        if dev.finished {
            break None;
        }
        if permit.is_some() && dev.exchange.is_none() {
            permit = None;
        }
        let deadline = dev.next_deadline();
        tokio::select! {
            _ = ctx.stop.changed(), if !dev.stopping => {
                if permit.is_none() && dev.needs_deregistration() {
                    permit = Arc::clone(&ctx.permits).acquire_owned().await.ok();
                }
                dev.begin_stop(Instant::now());
            }
            r = rd.read(&mut chunk) => match r {
                Ok(0) => break Some("closed by the daemon".into()),
                Err(e) => break Some(format!("read failed: {e}")),
                Ok(n) => match edge.incoming(&chunk[..n]) {
                    Ok((msgs, replies)) => {
                        if let Err(e) = wr.write_all(&replies.concat()).await {
                            break Some(format!("write failed: {e}"));
                        }
                        for m in msgs {
                            dev.on_datagram(&m, ctx.server, Instant::now());
                        }
                    }
                    Err(why) => break Some(why),
                },
            },
            _ = ticker.tick(), if !dev.stopping => dev.on_tick(),
            _ = async {
                if let Some(d) = deadline {
                    tokio::time::sleep_until(d).await;
                }
            }, if deadline.is_some() => dev.on_timer(Instant::now()),
        }
    };
    match ended {
        None => {
            let release = rfc8323::encode(&rfc8323::signal(rfc8323::RELEASE, &[]));
            let _ = wr.write_all(&release).await;
            let _ = wr.shutdown().await;
        }
        Some(why) if !reported => fail(&dev, format!("TLS connection {why}")),
        Some(why) => tracing::warn!("{}: TLS connection {why}; the device stops", dev.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAEMON: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5683);

    fn device() -> Device {
        let opts = SimOptions {
            server: DAEMON,
            lifetime_s: 60,
            notify_interval_ms: 200,
            ..SimOptions::default()
        };
        Device::new(opts.endpoint_name(7), Arc::new(Shared::new(&opts)))
    }

    fn request(mtype: MessageType, method: RequestType, path: &str, mid: u16) -> Packet {
        let mut p = Packet::new();
        p.header.set_type(mtype);
        p.header.code = MessageClass::Request(method);
        p.header.message_id = mid;
        p.set_token(vec![0xAB, mid as u8]);
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        p
    }

    /// Feeds `p` from the daemon and returns the single datagram sent back.
    fn exchange(dev: &mut Device, p: &Packet) -> Packet {
        dev.on_datagram(&p.to_bytes().unwrap(), DAEMON, Instant::now());
        let mut out = dev.take_outgoing();
        assert_eq!(out.len(), 1, "one reply expected: {out:?}");
        let (bytes, to) = out.remove(0);
        assert_eq!(to, DAEMON);
        Packet::from_bytes(&bytes).unwrap()
    }

    fn get(dev: &mut Device, path: &str, mid: u16) -> Packet {
        exchange(
            dev,
            &request(MessageType::Confirmable, RequestType::Get, path, mid),
        )
    }

    fn code(p: &Packet) -> MessageClass {
        p.header.code
    }

    fn content(r: ResponseType) -> MessageClass {
        MessageClass::Response(r)
    }

    #[test]
    fn reads_are_piggybacked_with_text() {
        let mut dev = device();
        for (path, want) in [
            ("/3/0/0", "connectord"),
            ("/3/0/1", "simulator"),
            ("/3/0/2", "sim-000007"),
            ("/1/0/1", "60"),
        ] {
            let r = get(&mut dev, path, 10);
            assert_eq!(r.header.get_type(), MessageType::Acknowledgement);
            assert_eq!(r.header.message_id, 10);
            assert_eq!(r.get_token(), &[0xAB, 10]);
            assert_eq!(code(&r), content(ResponseType::Content));
            assert_eq!(r.payload, want.as_bytes(), "{path}");
            assert_eq!(uint_option(&r, CoapOption::ContentFormat), Some(0));
            // The same message id again would be a duplicate: vary it per path.
            dev.replies.clear();
        }
        let r = get(&mut dev, "/3303/0/5700", 11);
        let t: f64 = std::str::from_utf8(&r.payload).unwrap().parse().unwrap();
        assert!((15.0..=30.0).contains(&t), "{t}");
        assert_eq!(uint_option(&r, CoapOption::MaxAge), Some(1));
        assert_eq!(uint_option(&r, CoapOption::Observe), None);
    }

    /// LwM2M 1.0 mode as the daemon drives an LwM2M 1.0 client: an object instance read
    /// without Accept comes in TLV (it was a text summary no LwM2M decoder takes, so a
    /// JSON read of `/3/0` ended 502), a lifetime written in TLV is taken (it was 4.00
    /// "not a whole number"), and a listed resource without `obs` may be observed (it was
    /// answered without Observe, so `PUT /subscriptions/…/3/0/0` ended 412).
    #[test]
    fn lwm2m_1_0_mode_reads_instances_in_tlv_takes_tlv_writes_and_observes_any_path() {
        let mut dev = device();
        let r = get(&mut dev, "/3/0", 20);
        assert_eq!(code(&r), content(ResponseType::Content));
        assert_eq!(uint_option(&r, CoapOption::ContentFormat), Some(11542));
        let path: lwm2m_data::Path = "/3/0".parse().unwrap();
        assert_eq!(
            lwm2m_data::decode(lwm2m_data::format::TLV, &r.payload, &path).unwrap(),
            serde_json::json!({"0": "connectord", "1": "simulator", "2": "sim-000007"})
        );
        let mut text = request(MessageType::Confirmable, RequestType::Get, "/3/0", 21);
        text.add_option(CoapOption::Accept, encode_uint(0));
        let r = exchange(&mut dev, &text);
        assert_eq!(r.payload, b"connectord simulator sim-000007");

        let lt: lwm2m_data::Path = "/1/0/1".parse().unwrap();
        let mut put = request(MessageType::Confirmable, RequestType::Put, "/1/0/1", 22);
        put.add_option(CoapOption::ContentFormat, encode_uint(11542));
        put.payload =
            lwm2m_data::encode(&serde_json::json!(300), &lt, lwm2m_data::format::TLV).unwrap();
        let r = exchange(&mut dev, &put);
        assert_eq!(code(&r), content(ResponseType::Changed));
        assert_eq!(dev.lifetime_s, 300);

        let mut obs = request(MessageType::Confirmable, RequestType::Get, "/3/0/0", 23);
        obs.add_option(CoapOption::Observe, encode_uint(0));
        let r = exchange(&mut dev, &obs);
        assert!(uint_option(&r, CoapOption::Observe).is_some(), "observed");
        assert_eq!(r.payload, b"connectord");
        // It never changes: a temperature tick notifies nobody of it.
        dev.on_tick();
        assert!(dev.take_outgoing().is_empty());
    }

    #[test]
    fn non_request_gets_a_non_reply() {
        let mut dev = device();
        let r = exchange(
            &mut dev,
            &request(MessageType::NonConfirmable, RequestType::Get, "/3/0/0", 5),
        );
        assert_eq!(r.header.get_type(), MessageType::NonConfirmable);
        assert_eq!(r.get_token(), &[0xAB, 5]);
        assert_eq!(r.payload, b"connectord");
    }

    #[test]
    fn duplicates_get_the_same_reply_and_are_not_handled_again() {
        let mut dev = device();
        let req = request(MessageType::Confirmable, RequestType::Delete, "/9/0", 42);
        let first = exchange(&mut dev, &req);
        assert_eq!(code(&first), content(ResponseType::Deleted));
        let again = exchange(&mut dev, &req);
        assert_eq!(again.to_bytes().unwrap(), first.to_bytes().unwrap());
        assert_eq!(dev.shared.counters.requests.load(Ordering::Relaxed), 1);
        // A new request (new message id) sees the package gone.
        let req = request(MessageType::Confirmable, RequestType::Delete, "/9/0", 43);
        assert_eq!(
            code(&exchange(&mut dev, &req)),
            content(ResponseType::NotFound)
        );
    }

    #[test]
    fn writes_executes_and_refusals() {
        let mut dev = device();
        // The lifetime is written; a bad value and a read-only resource are refused.
        for (mid, (path, value, want)) in (1..).zip([
            ("/1/0/1", &b"120"[..], ResponseType::Changed),
            ("/1/0/1", b"abc", ResponseType::BadRequest),
            ("/3303/0/5700", b"99", ResponseType::MethodNotAllowed),
        ]) {
            let mut put = request(MessageType::Confirmable, RequestType::Put, path, mid);
            put.payload = value.to_vec();
            assert_eq!(code(&exchange(&mut dev, &put)), content(want), "{path}");
            assert_eq!(dev.lifetime_s, 120);
        }
        let post = request(MessageType::Confirmable, RequestType::Post, "/3/0/4", 4);
        assert_eq!(
            code(&exchange(&mut dev, &post)),
            content(ResponseType::Changed)
        );
        let reboot_at = dev.reboot_at.expect("a reboot is scheduled");
        dev.on_timer(reboot_at);
        let reg = sent_request(&mut dev);
        assert_eq!(message::uri_path(&reg), ["rd"]);
        assert_eq!(message::uri_query(&reg)[1], "lt=120");
        for (mid, (method, path, want)) in (100..).zip([
            (RequestType::Get, "/5/0/1", ResponseType::NotFound),
            (RequestType::Get, "/", ResponseType::NotFound),
            (RequestType::Delete, "/3/0", ResponseType::MethodNotAllowed),
            (RequestType::Get, "/3/0/4", ResponseType::MethodNotAllowed),
            (RequestType::Post, "/3/0/0", ResponseType::MethodNotAllowed),
        ]) {
            let r = exchange(
                &mut dev,
                &request(MessageType::Confirmable, method, path, mid),
            );
            assert_eq!(code(&r), content(want), "{method:?} {path}");
        }
    }

    #[test]
    fn ping_is_reset_and_garbage_ignored() {
        let mut dev = device();
        let mut ping = Packet::new();
        ping.header.set_type(MessageType::Confirmable);
        ping.header.code = MessageClass::Empty;
        ping.header.message_id = 9;
        let r = exchange(&mut dev, &ping);
        assert_eq!(r.header.get_type(), MessageType::Reset);
        for junk in [
            &[][..],
            &[0x40],
            &[0x80, 1, 0, 1],
            &[0x49, 1, 0, 1],
            &[0xFF; 40],
        ] {
            dev.on_datagram(junk, DAEMON, Instant::now());
        }
        assert!(dev.take_outgoing().is_empty());
    }

    #[test]
    fn block2_slices_the_reply() {
        let mut dev = device();
        let mut req = request(MessageType::Confirmable, RequestType::Get, "/3/0", 1);
        req.add_option(CoapOption::Accept, encode_uint(0));
        req.add_option(
            CoapOption::Block2,
            Block {
                num: 1,
                more: false,
                szx: 0,
            }
            .encode(),
        );
        let r = exchange(&mut dev, &req);
        let whole = "connectord simulator sim-000007";
        assert_eq!(r.payload, whole.as_bytes()[16..].to_vec());
        let b = Block::decode(uint_option(&r, CoapOption::Block2).unwrap()).unwrap();
        assert_eq!((b.num, b.more), (1, false));
    }

    /// A lifetime written by the daemon is a change: the observers of `/1/0/1` (text) and
    /// of `/1/0` (TLV) are notified, before the 2.04; the same value written again is none.
    #[test]
    fn a_lifetime_written_notifies_its_observers() {
        let mut dev = device();
        let mut text = request(MessageType::Confirmable, RequestType::Get, "/1/0/1", 1);
        text.add_option(CoapOption::Observe, encode_uint(0));
        let r = exchange(&mut dev, &text);
        assert_eq!(
            (code(&r), r.payload.as_slice()),
            (content(ResponseType::Content), &b"60"[..])
        );
        let mut tlv = request(MessageType::Confirmable, RequestType::Get, "/1/0", 2);
        tlv.add_option(CoapOption::Observe, encode_uint(0));
        let r = exchange(&mut dev, &tlv);
        assert_eq!(code(&r), content(ResponseType::Content));
        assert_eq!(dev.observers.len(), 2);
        let write = |mid: u16, value: &[u8]| {
            let mut put = request(MessageType::Confirmable, RequestType::Put, "/1/0/1", mid);
            put.add_option(CoapOption::ContentFormat, encode_uint(0));
            put.payload = value.to_vec();
            put
        };
        dev.on_datagram(
            &write(3, b"120").to_bytes().unwrap(),
            DAEMON,
            Instant::now(),
        );
        let out: Vec<Packet> = dev
            .take_outgoing()
            .iter()
            .map(|(b, _)| Packet::from_bytes(b).unwrap())
            .collect();
        assert_eq!(out.len(), 3, "{out:?}");
        let to = |token: &[u8]| out.iter().find(|p| p.get_token() == token).unwrap();
        let n = to(text.get_token());
        assert_eq!(n.header.get_type(), MessageType::NonConfirmable);
        assert!(uint_option(n, CoapOption::Observe).is_some());
        assert_eq!(n.payload, b"120");
        let n = to(tlv.get_token());
        assert_eq!(
            uint_option(n, CoapOption::ContentFormat),
            Some(u32::from(lwm2m_data::format::TLV))
        );
        let path: lwm2m_data::Path = "/1/0".parse().unwrap();
        let tree = lwm2m_data::decode(lwm2m_data::format::TLV, &n.payload, &path).unwrap();
        assert_eq!(tree.to_string(), r#"{"1":120}"#);
        assert_eq!(code(&out[2]), content(ResponseType::Changed));
        // The same value again: answered, nobody notified.
        let r = exchange(&mut dev, &write(4, b"120"));
        assert_eq!(code(&r), content(ResponseType::Changed));
    }

    #[test]
    fn observe_notifies_until_cancelled_or_reset() {
        let mut dev = device();
        let mut req = request(
            MessageType::Confirmable,
            RequestType::Get,
            "/3303/0/5700",
            1,
        );
        req.add_option(CoapOption::Observe, encode_uint(0));
        let r = exchange(&mut dev, &req);
        let seq0 = uint_option(&r, CoapOption::Observe).expect("registered");
        let mut last = seq0;
        for _ in 0..3 {
            dev.on_tick();
            let out = dev.take_outgoing();
            assert_eq!(out.len(), 1);
            let n = Packet::from_bytes(&out[0].0).unwrap();
            assert_eq!(n.header.get_type(), MessageType::NonConfirmable);
            assert_eq!(n.get_token(), req.get_token());
            let seq = uint_option(&n, CoapOption::Observe).unwrap();
            assert!(seq > last, "{seq} after {last}");
            last = seq;
            let t: f64 = std::str::from_utf8(&n.payload).unwrap().parse().unwrap();
            assert!((15.0..=30.0).contains(&t));
        }
        assert_eq!(dev.shared.counters.notifications.load(Ordering::Relaxed), 3);

        // An RST to the last notification removes the observer.
        dev.on_tick();
        let n = Packet::from_bytes(&dev.take_outgoing()[0].0).unwrap();
        dev.on_datagram(&message::reset(n.header.message_id), DAEMON, Instant::now());
        dev.on_tick();
        assert!(dev.take_outgoing().is_empty());

        // Observe again, then cancel with Observe=1.
        let mut req = request(
            MessageType::Confirmable,
            RequestType::Get,
            "/3303/0/5700",
            2,
        );
        req.add_option(CoapOption::Observe, encode_uint(0));
        exchange(&mut dev, &req);
        assert_eq!(dev.observers.len(), 1);
        let mut cancel = request(
            MessageType::Confirmable,
            RequestType::Get,
            "/3303/0/5700",
            3,
        );
        cancel.set_token(req.get_token().to_vec());
        cancel.add_option(CoapOption::Observe, encode_uint(1));
        let r = exchange(&mut dev, &cancel);
        assert_eq!(uint_option(&r, CoapOption::Observe), None);
        assert!(dev.observers.is_empty());
    }

    /// The device's request in `out`, decoded.
    fn sent_request(dev: &mut Device) -> Packet {
        let out = dev.take_outgoing();
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].1, DAEMON);
        Packet::from_bytes(&out[0].0).unwrap()
    }

    fn reply(dev: &mut Device, req: &Packet, code: ResponseType, location: &[&str]) {
        let mut r = Packet::new();
        r.header.set_type(MessageType::Acknowledgement);
        r.header.code = MessageClass::Response(code);
        r.header.message_id = req.header.message_id;
        r.set_token(req.get_token().to_vec());
        for seg in location {
            r.add_option(CoapOption::LocationPath, seg.as_bytes().to_vec());
        }
        dev.on_datagram(&r.to_bytes().unwrap(), DAEMON, Instant::now());
    }

    #[test]
    fn registers_updates_reregisters_and_deregisters() {
        let mut dev = device();
        let now = Instant::now();
        dev.start_registration(now);
        let reg = sent_request(&mut dev);
        assert_eq!(reg.header.get_type(), MessageType::Confirmable);
        assert_eq!(message::uri_path(&reg), ["rd"]);
        assert_eq!(
            message::uri_query(&reg),
            ["ep=sim-000007", "lt=60", "lwm2m=1.0", "b=U"]
        );
        assert_eq!(reg.payload, LINKS.as_bytes());
        connectord_core::registry::parse_resources(LINKS).expect("valid links");
        reply(&mut dev, &reg, ResponseType::Created, &["rd", "abc"]);
        assert_eq!(dev.take_outcome(), Some(Outcome::Registered));
        assert!(dev.take_outgoing().is_empty());

        // The update is due at ~80 % of the lifetime.
        let due = dev.next_deadline().unwrap();
        let after = due - now;
        assert!(after >= Duration::from_secs(44) && after <= Duration::from_secs(52));
        dev.on_timer(due);
        let upd = sent_request(&mut dev);
        assert_eq!(message::uri_path(&upd), ["rd", "abc"]);
        assert!(message::uri_query(&upd).is_empty());
        // 4.04: the daemon forgot us; register again.
        reply(&mut dev, &upd, ResponseType::NotFound, &[]);
        let reg = sent_request(&mut dev);
        assert_eq!(message::uri_path(&reg), ["rd"]);
        reply(&mut dev, &reg, ResponseType::Created, &["rd", "def"]);
        assert_eq!(
            dev.take_outcome(),
            None,
            "only the first registration is reported"
        );

        // A written lifetime is announced at once.
        let mut put = request(MessageType::Confirmable, RequestType::Put, "/1/0/1", 77);
        put.payload = b"90".to_vec();
        exchange(&mut dev, &put);
        dev.on_timer(Instant::now());
        let upd = sent_request(&mut dev);
        assert_eq!(message::uri_query(&upd), ["lt=90"]);
        reply(&mut dev, &upd, ResponseType::Changed, &[]);
        assert_eq!(dev.announced_lifetime_s, 90);
        let after = dev.next_deadline().unwrap() - Instant::now();
        assert!(after > Duration::from_secs(60), "{after:?}");

        dev.begin_stop(Instant::now());
        let del = sent_request(&mut dev);
        assert_eq!(del.header.code, MessageClass::Request(RequestType::Delete));
        assert_eq!(message::uri_path(&del), ["rd", "def"]);
        reply(&mut dev, &del, ResponseType::Deleted, &[]);
        assert!(dev.finished);
        assert_eq!(dev.shared.counters.deregistered.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn lifetime_written_during_an_update_is_announced_after_it() {
        let mut dev = device();
        dev.start_registration(Instant::now());
        let reg = sent_request(&mut dev);
        reply(&mut dev, &reg, ResponseType::Created, &["rd", "a"]);
        dev.start_update(Instant::now());
        let upd = sent_request(&mut dev);
        let mut put = request(MessageType::Confirmable, RequestType::Put, "/1/0/1", 5);
        put.payload = b"45".to_vec();
        exchange(&mut dev, &put);
        reply(&mut dev, &upd, ResponseType::Changed, &[]);
        assert_eq!(dev.announced_lifetime_s, 60);
        dev.on_timer(Instant::now());
        let upd = sent_request(&mut dev);
        assert_eq!(message::uri_query(&upd), ["lt=45"]);
        reply(&mut dev, &upd, ResponseType::Changed, &[]);
        assert_eq!(dev.announced_lifetime_s, 45);
    }

    #[test]
    fn queue_mode_and_domain_are_registered() {
        let opts = SimOptions {
            server: DAEMON,
            queue_mode: true,
            domain: Some("lab".into()),
            name_prefix: "q-".into(),
            ..SimOptions::default()
        };
        let mut dev = Device::new(opts.endpoint_name(12), Arc::new(Shared::new(&opts)));
        dev.start_registration(Instant::now());
        let reg = sent_request(&mut dev);
        assert_eq!(
            message::uri_query(&reg),
            ["ep=q-000012", "lt=300", "lwm2m=1.0", "b=UQ", "d=lab"]
        );
        assert_eq!(
            reg.get_content_format(),
            Some(ContentFormat::ApplicationLinkFormat)
        );
    }

    #[test]
    fn registration_is_retransmitted_then_fails() {
        let mut dev = device();
        dev.start_registration(Instant::now());
        let first = dev.take_outgoing();
        let mut sends = 1;
        while !dev.finished {
            let at = dev.next_deadline().expect("a retransmission is due");
            dev.on_timer(at);
            for (bytes, _) in dev.take_outgoing() {
                assert_eq!(bytes, first[0].0, "the same message again");
                sends += 1;
            }
        }
        assert_eq!(sends, 1 + MAX_RETRANSMIT);
        assert!(matches!(dev.take_outcome(), Some(Outcome::Failed(_))));
    }

    #[test]
    fn separate_response_is_acknowledged() {
        let mut dev = device();
        dev.start_registration(Instant::now());
        let reg = sent_request(&mut dev);
        dev.on_datagram(
            &message::empty_ack(reg.header.message_id),
            DAEMON,
            Instant::now(),
        );
        assert!(dev.exchange.as_ref().unwrap().acked);
        let mut r = Packet::new();
        r.header.set_type(MessageType::Confirmable);
        r.header.code = MessageClass::Response(ResponseType::Created);
        r.header.message_id = 999;
        r.set_token(reg.get_token().to_vec());
        r.add_option(CoapOption::LocationPath, b"rd".to_vec());
        r.add_option(CoapOption::LocationPath, b"x".to_vec());
        dev.on_datagram(&r.to_bytes().unwrap(), DAEMON, Instant::now());
        assert_eq!(dev.take_outgoing(), vec![(message::empty_ack(999), DAEMON)]);
        assert_eq!(dev.take_outcome(), Some(Outcome::Registered));
    }

    #[test]
    fn stop_during_registration_deregisters_after_it() {
        let mut dev = device();
        dev.start_registration(Instant::now());
        let reg = sent_request(&mut dev);
        dev.begin_stop(Instant::now());
        assert!(dev.take_outgoing().is_empty());
        reply(&mut dev, &reg, ResponseType::Created, &["rd", "z"]);
        let del = sent_request(&mut dev);
        assert_eq!(message::uri_path(&del), ["rd", "z"]);
    }

    fn device_1_1() -> Device {
        let opts = SimOptions {
            server: DAEMON,
            lifetime_s: 60,
            notify_interval_ms: 200,
            ept: Some("thermo".into()),
            lwm2m: Lwm2mMode::Lwm2m1_1,
            ..SimOptions::default()
        };
        Device::new(opts.endpoint_name(3), Arc::new(Shared::new(&opts)))
    }

    /// A GET with a fresh message id (the device answers a repeated one from its cache).
    fn get_accept(
        dev: &mut Device,
        path: &str,
        accept: Option<u32>,
        observe: Option<u32>,
    ) -> Packet {
        static MID: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1000);
        let mid = MID.fetch_add(1, Ordering::Relaxed);
        let mut p = request(MessageType::Confirmable, RequestType::Get, path, mid);
        if let Some(a) = accept {
            p.add_option(CoapOption::Accept, encode_uint(a));
        }
        if let Some(o) = observe {
            p.add_option(CoapOption::Observe, encode_uint(o));
        }
        exchange(dev, &p)
    }

    fn tree(p: &Packet, path: &str) -> serde_json::Value {
        let cf = uint_option(p, CoapOption::ContentFormat).expect("a Content-Format") as u16;
        lwm2m_data::decode(cf, &p.payload, &path.parse().unwrap()).unwrap()
    }

    #[test]
    fn lwm2m_1_1_registers_without_obs_and_with_its_type() {
        let mut dev = device_1_1();
        dev.start_registration(Instant::now());
        let reg = sent_request(&mut dev);
        assert_eq!(
            message::uri_query(&reg),
            ["ep=sim-000003", "lt=60", "lwm2m=1.1", "b=U", "et=thermo"]
        );
        assert_eq!(reg.payload, LINKS_1_1.as_bytes());
        assert!(!LINKS_1_1.contains("obs"));
    }

    #[test]
    fn lwm2m_1_1_answers_tlv_unless_asked_for_senml_or_text() {
        let mut dev = device_1_1();
        let r = get_accept(&mut dev, "/3/0", None, None);
        assert_eq!(uint_option(&r, CoapOption::ContentFormat), Some(11542));
        assert_eq!(
            tree(&r, "/3/0"),
            serde_json::json!({"0": "connectord", "1": "simulator", "2": "sim-000003"})
        );
        let r = get_accept(&mut dev, "/3303/0", Some(110), None);
        assert_eq!(uint_option(&r, CoapOption::ContentFormat), Some(110));
        assert_eq!(tree(&r, "/3303/0")["5701"], "Cel");
        let r = get_accept(&mut dev, "/3/0/0", Some(0), None);
        assert_eq!(
            (
                r.payload.as_slice(),
                uint_option(&r, CoapOption::ContentFormat)
            ),
            (&b"connectord"[..], Some(0))
        );
        let r = get_accept(&mut dev, "/3/0/0", None, None);
        assert_eq!(
            uint_option(&r, CoapOption::ContentFormat),
            Some(11542),
            "one resource: TLV too"
        );
        for (path, accept, want) in [
            ("/3/0", Some(0), ResponseType::NotAcceptable),
            ("/3/0/0", Some(50), ResponseType::NotAcceptable),
            ("/4/0", None, ResponseType::NotFound),
            ("/3/0/4", None, ResponseType::MethodNotAllowed),
        ] {
            assert_eq!(
                code(&get_accept(&mut dev, path, accept, None)),
                content(want),
                "{path}"
            );
        }
    }

    #[test]
    fn lwm2m_1_1_observes_any_path_in_the_format_asked() {
        let mut dev = device_1_1();
        let r = get_accept(&mut dev, "/3303/0", Some(112), Some(0));
        assert!(uint_option(&r, CoapOption::Observe).is_some());
        assert_eq!(dev.observers.len(), 1);
        dev.on_tick();
        let out = dev.take_outgoing();
        assert_eq!(
            out.len(),
            1,
            "the instance holding the temperature is notified"
        );
        let n = Packet::from_bytes(&out[0].0).unwrap();
        assert_eq!(uint_option(&n, CoapOption::ContentFormat), Some(112));
        let t = tree(&n, "/3303/0");
        assert_eq!(t["5700"].as_f64(), Some(f64::from(dev.temp_tenths) / 10.0));
        // A path the temperature is not part of is observable but never notified.
        let r = get_accept(&mut dev, "/3/0", None, Some(0));
        assert!(uint_option(&r, CoapOption::Observe).is_some());
        dev.on_tick();
        assert_eq!(dev.take_outgoing().len(), 1);
    }

    #[test]
    fn lwm2m_1_1_takes_a_lifetime_in_tlv() {
        let mut dev = device_1_1();
        let path: lwm2m_data::Path = "/1/0/1".parse().unwrap();
        let mut p = request(MessageType::Confirmable, RequestType::Put, "/1/0/1", 5);
        p.add_option(CoapOption::ContentFormat, encode_uint(11542));
        p.payload = lwm2m_data::encode(&serde_json::json!(120), &path, 11542).unwrap();
        assert_eq!(
            code(&exchange(&mut dev, &p)),
            content(ResponseType::Changed)
        );
        assert_eq!(dev.lifetime_s, 120);
        let mut p = request(MessageType::Confirmable, RequestType::Put, "/1/0/1", 6);
        p.add_option(CoapOption::ContentFormat, encode_uint(11542));
        p.payload = vec![0xc8];
        assert_eq!(
            code(&exchange(&mut dev, &p)),
            content(ResponseType::BadRequest)
        );
    }

    #[test]
    fn options_are_checked() {
        let bad = [
            SimOptions {
                devices: 0,
                ..SimOptions::default()
            },
            SimOptions {
                lifetime_s: 0,
                ..SimOptions::default()
            },
            SimOptions {
                notify_interval_ms: 0,
                ..SimOptions::default()
            },
            SimOptions {
                name_prefix: "a/b".into(),
                ..SimOptions::default()
            },
            SimOptions {
                bind: "::1".parse().unwrap(),
                ..SimOptions::default()
            },
            SimOptions {
                domain: Some("not a domain".into()),
                ..SimOptions::default()
            },
            SimOptions {
                ept: Some("a/b".into()),
                ..SimOptions::default()
            },
            SimOptions {
                endpoint: Some("one".into()),
                devices: 2,
                ..SimOptions::default()
            },
            SimOptions {
                endpoint: Some("a/b".into()),
                devices: 1,
                ..SimOptions::default()
            },
        ];
        for o in bad {
            assert!(matches!(o.validate(), Err(SimError::Invalid(_))), "{o:?}");
        }
        assert!(SimOptions::default().validate().is_ok());
        let one = SimOptions {
            endpoint: Some("one".into()),
            devices: 1,
            ..SimOptions::default()
        };
        assert!(one.validate().is_ok());
        assert_eq!(one.endpoint_name(0), "one");
    }

    /// The TLS edge: the device's registration is framed once (its retransmission is
    /// not sent again, its empty ACK and RST not at all); the daemon's response comes
    /// back as the ACK of the registration's message id, the daemon's request as a CON;
    /// Ping is answered with Pong; Release ends the connection.
    #[test]
    fn the_tls_edge_translates_both_ways() {
        let mut edge = TcpEdge::default();
        let mut dev = device();
        dev.start_registration(Instant::now());
        let (reg, _) = dev.take_outgoing().remove(0);
        let reg_packet = Packet::from_bytes(&reg).unwrap();
        let framed = edge.outgoing(&reg).expect("the registration is framed");
        let (frame, n) = rfc8323::decode(&framed, TLS_MAX_MESSAGE).unwrap().unwrap();
        assert_eq!((n, frame.code), (framed.len(), 0x02));
        assert_eq!(frame.token, reg_packet.get_token());
        assert!(
            edge.outgoing(&reg).is_none(),
            "a retransmission is not sent"
        );
        assert!(edge.outgoing(&message::reset(7)).is_none());

        // The daemon's CSM, its 2.01 for the registration, a GET of its own and a Ping.
        let created = rfc8323::Frame {
            code: 0x41,
            token: frame.token.clone(),
            body: rfc8323::body(&[(8, b"rd"), (8, b"abc")], &[]),
        };
        let get = rfc8323::Frame {
            code: 0x01,
            token: vec![9, 9],
            body: rfc8323::body(&[(11, b"3"), (11, b"0"), (11, b"0")], &[]),
        };
        let mut bytes = rfc8323::encode(&rfc8323::csm(1152));
        bytes.extend(rfc8323::encode(&created));
        bytes.extend(rfc8323::encode(&get));
        bytes.extend(rfc8323::encode(&rfc8323::signal(rfc8323::PING, &[5])));
        // Split anywhere: the edge keeps what it cannot decode yet.
        let (a, b) = bytes.split_at(3);
        assert_eq!(edge.incoming(a).unwrap(), (vec![], vec![]));
        let (msgs, replies) = edge.incoming(b).unwrap();
        assert_eq!(
            replies,
            vec![rfc8323::encode(&rfc8323::signal(rfc8323::PONG, &[5]))]
        );
        assert_eq!(msgs.len(), 2);
        let ack = Packet::from_bytes(&msgs[0]).unwrap();
        assert_eq!(ack.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(ack.header.message_id, reg_packet.header.message_id);
        let req = Packet::from_bytes(&msgs[1]).unwrap();
        assert_eq!(req.header.get_type(), MessageType::Confirmable);
        assert_eq!(req.get_token(), &[9, 9]);

        // The device's piggybacked answer goes out as a frame.
        dev.on_datagram(&msgs[0], DAEMON, Instant::now());
        dev.on_datagram(&msgs[1], DAEMON, Instant::now());
        let out = dev.take_outgoing();
        let answer = out
            .iter()
            .find_map(|(b, _)| {
                let p = Packet::from_bytes(b).ok()?;
                (p.get_token() == [9, 9]).then(|| edge.outgoing(b))
            })
            .flatten()
            .expect("the answer is framed");
        let (f, _) = rfc8323::decode(&answer, TLS_MAX_MESSAGE).unwrap().unwrap();
        assert_eq!((f.code, f.token), (0x45, vec![9, 9]));

        let release = rfc8323::encode(&rfc8323::signal(rfc8323::RELEASE, &[]));
        assert!(edge.incoming(&release).is_err());
    }
}
