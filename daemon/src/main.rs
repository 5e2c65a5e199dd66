//! The `connectord` binary: command line, logging, runtime. Everything else is the library.

mod allocator;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use connectord::config::{Config, Source};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

/// mimalloc rather than the system allocator: the daemon makes many small, short-lived
/// allocations on several threads (JSON, CoAP packets, events), and glibc's per-thread
/// arenas kept freed memory resident. Measured in docs/PERFORMANCE.md. Plugins keep
/// their own allocator: each side of the plugin ABI frees only what it allocated.
/// Through [`allocator::Mimalloc`], not `mimalloc::MiMalloc`: the crate's type asks for
/// every block by mimalloc's aligned calls, which in mimalloc v3 over-allocate most
/// blocks above 1 KiB (the module doc has why and the figures).
#[global_allocator]
static GLOBAL: allocator::Mimalloc = allocator::Mimalloc;

/// mimalloc's purge delay for the daemon, milliseconds: how long pages it freed stay
/// resident before they are returned to the system (a purge happens on later allocator
/// activity, once the delay passed). mimalloc v3's default is 1 000 ms; the DTLS
/// listener trims a quiet session's handshake memory after `coap::dtls::TRIM_AFTER` (1 s),
/// and with the default what a burst of handshakes freed was still resident 2 s after the
/// burst in some runs and not in others (RSS per idle DTLS session 2.6-5.3 KB at 10 000
/// sessions). 100 ms returned it in every run (2.7-3.3 KB) with no daemon CPU per proxied
/// read or registration that the bench could tell from the default; 0 (at once) cost
/// 14-19 % more CPU per proxied read (a decommit per freed page, refaulted when reused).
/// docs/PERFORMANCE.md (issue 21 part G) has the runs; ARCHITECTURE.md the decision.
/// `MIMALLOC_PURGE_DELAY` in the environment wins, as for every mimalloc option.
const PURGE_DELAY_MS: std::ffi::c_long = 100;

/// `mi_option_purge_delay` in the `mi_option_e` of mimalloc v3's `mimalloc.h` (the
/// version libmimalloc-sys 0.1.49 builds, pinned in Cargo.toml): its Rust bindings do not
/// name this option. The unit test below checks the index by its default value.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets [`PURGE_DELAY_MS`] unless the environment sets mimalloc's purge delay.
fn set_purge_delay() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: an option index of this mimalloc and a value; mimalloc reads its options
        // atomically, so setting one while other threads allocate is allowed.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) }
    }
}

/// Default location of the configuration file in a system installation.
const SYSTEM_CONFIG: &str = "/etc/connectord/connectord.toml";

/// connectord: a self-hosted device connector.
///
/// LwM2M devices register over CoAP (UDP 5683); web applications reach them through an
/// mbed Device Connector v2 compatible REST API (HTTP 8080 on 127.0.0.1 by default).
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground (systemd runs it this way).
    ///
    /// Without --config the embedded defaults are used (the repository's
    /// etc/connectord.toml): REST on 127.0.0.1:8080, CoAP on UDP 5683, state in
    /// $STATE_DIRECTORY or ~/.local/state/connectord. At first start an admin access key
    /// is written to admin.key in the state directory. SIGHUP re-reads the configuration,
    /// SIGTERM stops gracefully.
    ///
    /// The start is refused (exit 1, with the file and the cause) when the state cannot be
    /// used (read-only, corrupt, not a database) or when connectord.db is missing or empty
    /// while admin.key or the CA exist (a lost database, not a first start).
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Start on a new, empty database although connectord.db is missing or empty while
        /// admin.key or the CA exist: the CA is kept, admin.key is renamed
        /// admin.key.before-reinit-<time> and a new admin key is written. Every
        /// registration, access key and subscription of the lost database is gone. Only
        /// for one start: do not leave it in a service file.
        #[arg(long)]
        reinit: bool,
        /// Once the daemon serves, write its bound addresses to this file as JSON
        /// (`{"pid": 1234, "version": "0.1.0", "rest": ["127.0.0.1:8080"], "coap":
        /// ["127.0.0.1:5683"]}`), atomically (a temporary file beside it, then a rename);
        /// with port 0 in the configuration these are the ports the system chose. Removed
        /// at a clean stop. For tests and supervisors that must not parse the log.
        #[arg(long, value_name = "PATH")]
        ready_file: Option<PathBuf>,
    },
    /// Validate a configuration file without starting anything; exits 1 with
    /// file:line:column and the key on the first error. The plugins named in
    /// `[plugins] auth` and `sink` must be built in or provided by a file of
    /// `[plugins] dir` (each file is opened to read the name and kind it declares), auth
    /// backends in `auth` and a sink in `sink`.
    CheckConfig {
        /// The file to check.
        #[arg(default_value = SYSTEM_CONFIG)]
        path: PathBuf,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// Simulate LwM2M devices against a running daemon (to try it without hardware, and
    /// for benchmarks): each device has its own UDP socket, registers, keeps its
    /// registration alive, and serves /3/0 (device), /3303/0/5700 (an observable
    /// temperature), /1/0/1 (writable lifetime) and /3/0/4 (executable reboot).
    /// Ctrl-C de-registers them all.
    Simulate {
        /// How many devices (10; 1 with --endpoint).
        #[arg(long)]
        devices: Option<usize>,
        /// The daemon's CoAP address.
        #[arg(long, default_value = "127.0.0.1:5683")]
        server: std::net::SocketAddr,
        /// Endpoint names are <prefix><index, 6 digits>.
        #[arg(long, default_value = "sim-")]
        prefix: String,
        /// One device (--devices 1) with this endpoint name instead of the prefix's: with
        /// --psk or --cert, the endpoint the credential names (a registration naming
        /// another is refused 4.03).
        #[arg(long, conflicts_with = "prefix")]
        endpoint: Option<String>,
        /// Registration lifetime in seconds (updates at about 80 % of it).
        #[arg(long, default_value_t = 300)]
        lifetime: u32,
        /// Milliseconds between changes of the observable temperature.
        #[arg(long, default_value_t = 5000)]
        notify_interval: u64,
        /// Local address for the device sockets.
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
        /// Register in queue mode (b=UQ).
        #[arg(long)]
        queue: bool,
        /// Domain (d=).
        #[arg(long)]
        domain: Option<String>,
        /// Most registrations per second while starting (0: unlimited).
        #[arg(long, default_value_t = 0)]
        rate: u32,
        /// Endpoint type (et=).
        #[arg(long = "type")]
        ept: Option<String>,
        /// LwM2M behaviour: 1.0 (obs on links, text/plain answers) or 1.1 (as real LwM2M
        /// 1.1 clients: no obs, every path observable, TLV unless SenML or text is asked).
        #[arg(long, default_value = "1.0")]
        lwm2m: connectord::simulate::Lwm2mMode,
        /// Speak DTLS (coaps://, --server is then the daemon's DTLS address, port 5684 by
        /// convention) with this PSK identity and key (hex), the same for every device.
        #[arg(long, value_name = "IDENTITY:HEXKEY", conflicts_with = "cert")]
        psk: Option<String>,
        /// Speak DTLS with a PSK per device: its endpoint name as the identity, this key
        /// (hex) for all (each identity provisioned: `connectord credentials put`).
        #[arg(long, value_name = "HEXKEY", conflicts_with_all = ["cert", "psk"])]
        psk_per_endpoint: Option<String>,
        /// Speak DTLS with this device certificate (PEM, e.g. from POST /api/cert), the
        /// same for every device; needs --key. With --tls, over TLS instead.
        #[arg(long, value_name = "CERT.pem", requires = "key")]
        cert: Option<std::path::PathBuf>,
        /// The private key (PEM) of --cert.
        #[arg(long, value_name = "KEY.pem", requires = "cert")]
        key: Option<std::path::PathBuf>,
        /// Speak CoAP over TLS (RFC 8323, coaps+tcp; --server is then the daemon's
        /// `coap.listen_tls` address), one connection per device, with --cert/--key,
        /// verifying the daemon's certificate against --ca.
        #[arg(long, requires_all = ["cert", "ca"], conflicts_with_all = ["psk", "psk_per_endpoint"])]
        tls: bool,
        /// With --tls: the CA certificate (PEM) the daemon's certificate must chain to
        /// (`server_certificate` of POST /api/cert, or the issuer of coap.tls_cert).
        #[arg(long, value_name = "CA.pem", requires = "tls")]
        ca: Option<std::path::PathBuf>,
    },
    /// Provision, show and revoke device credentials (DTLS pre-shared keys) through the
    /// running daemon's REST API (/v2/device-credentials), with the first admin key
    /// (admin.key in the state directory) unless told otherwise.
    ///
    /// An endpoint with credentials registers only over DTLS or TLS; plain-CoAP
    /// registrations for it are refused. Keys are never shown back.
    Credentials {
        #[command(subcommand)]
        action: CredentialsAction,
    },
    /// Run one operation of a plugin against the state directory, without starting the
    /// daemon, and print its answer: for example
    /// `connectord plugin-call pelion create_user '{"name": "ops", ...}'` to create the
    /// first user of an auth backend. A daemon running on the same state sees the change
    /// within about a second.
    PluginCall {
        /// Configuration file (TOML); without it, the embedded defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The plugin's name (`connector`, `pelion`, `losant`, `headerkeys`, ...).
        plugin: String,
        /// The operation.
        op: String,
        /// The request, JSON.
        #[arg(default_value = "{}")]
        input: String,
    },
}

/// How `connectord credentials` reaches the daemon.
#[derive(clap::Args)]
struct ApiArgs {
    /// The daemon's configuration file (TOML): where its REST API listens and its state
    /// directory (for admin.key); without it, the embedded defaults.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The REST API's base URL (default: http:// and the first rest.listen address, a
    /// wildcard taken as loopback).
    #[arg(long)]
    url: Option<String>,
    /// A file whose first line is the access key to use (default: admin.key in the
    /// state directory, unless CONNECTORD_API_KEY is set). The key needs the scope
    /// resources:write to change credentials, endpoints:read to show them.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CredentialsAction {
    /// Set (or replace) an endpoint's pre-shared key, for example
    /// `connectord credentials put dev-1 --psk-identity dev-1 --psk 6465762d312d7365637265742d6b6579`.
    /// Replacing a key closes the device's open secure sessions.
    Put {
        /// The endpoint name the device registers as.
        endpoint: String,
        /// The PSK identity the device sends in its DTLS handshake (unique).
        #[arg(long)]
        psk_identity: String,
        /// The key, hex (16 to 64 bytes); `-` reads it from standard input, so that it
        /// does not show in the process list.
        #[arg(long, value_name = "HEX")]
        psk: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show an endpoint's credentials (identity, when set, issued certificates; never
    /// the key).
    Get {
        endpoint: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke an endpoint's credentials: its key is removed, its certificates revoked
    /// and its secure sessions closed.
    Delete {
        endpoint: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the endpoints with credentials in the key's domain.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
}

fn main() -> ExitCode {
    set_purge_delay();
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { path } => match connectord::daemon::validate(&path) {
            Ok((_, used)) => {
                if !used {
                    eprintln!(
                        "note: coap.tls_cert and coap.tls_key are set, but no coap.listen_tls or coap.listen_dtls listener presents them"
                    );
                }
                println!("{}: configuration is valid", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::PluginCall {
            config,
            plugin,
            op,
            input,
        } => match plugin_call(config, &plugin, &op, &input) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {}", error_text(&e));
                ExitCode::FAILURE
            }
        },
        Command::Simulate {
            devices,
            server,
            prefix,
            endpoint,
            lifetime,
            notify_interval,
            bind,
            queue,
            domain,
            rate,
            ept,
            lwm2m,
            psk,
            psk_per_endpoint,
            cert,
            key,
            tls,
            ca,
        } => {
            let psk_per_endpoint = match psk_per_endpoint
                .as_deref()
                .map(|hex| connectord::simulate::ClientAuth::psk_from_arg(&format!("ep:{hex}")))
            {
                None => None,
                Some(Ok(connectord::simulate::ClientAuth::Psk { key, .. })) => Some(key),
                Some(Ok(_)) => None,
                Some(Err(e)) => {
                    eprintln!("error: --psk-per-endpoint: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let secure = match (tls, &cert, &key, &ca) {
                (true, Some(cert), Some(key), Some(ca)) => {
                    connectord::simulate::TlsConfig::from_files(cert, key, ca)
                        .map(|t| (None, Some(t)))
                        .map_err(|e| format!("--tls: {e}"))
                }
                _ => sim_dtls(psk.as_deref(), cert.as_deref(), key.as_deref()).map(|d| (d, None)),
            };
            let (dtls, tls) = match secure {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let opts = connectord::simulate::SimOptions {
                devices: devices.unwrap_or(if endpoint.is_some() { 1 } else { 10 }),
                server,
                name_prefix: prefix,
                endpoint,
                lifetime_s: lifetime,
                notify_interval_ms: notify_interval,
                bind,
                queue_mode: queue,
                domain,
                register_rate: rate,
                ept,
                lwm2m,
                dtls,
                dtls_psk_per_endpoint: psk_per_endpoint,
                tls,
            };
            match simulate(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {}", error_text(&e));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Credentials { action } => match credentials(action) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {}", error_text(&e));
                ExitCode::FAILURE
            }
        },
        Command::DefaultConfig => {
            print!("{}", connectord::config::DEFAULT_TOML);
            ExitCode::SUCCESS
        }
        Command::Run {
            config,
            reinit,
            ready_file,
        } => match run(config, reinit, ready_file) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // Once, as a plain line on stderr (where the log goes too, so journald
                // has it): it used to be logged a second time through the log.
                eprintln!("error: {}", error_text(&e));
                ExitCode::FAILURE
            }
        },
    }
}

/// An error and its causes, each once: `{e:#}` appends every source's text, but many of
/// the library's errors already include their source's text in their own (`state store:
/// {0}`), which printed the same cause two or three times. A cause whose text is already
/// in the message is left out.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.is_empty() {
            text = part;
        } else if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
    }
    text
}

/// The DTLS client configuration of `simulate --psk` / `--cert --key`, if any.
fn sim_dtls(
    psk: Option<&str>,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> Result<Option<connectord::simulate::DtlsConfig>, String> {
    use connectord::simulate::ClientAuth;
    let auth = match (psk, cert, key) {
        (Some(p), _, _) => ClientAuth::psk_from_arg(p).map_err(|e| format!("--psk: {e}"))?,
        (None, Some(c), Some(k)) => {
            ClientAuth::certificate_from_files(c, k).map_err(|e| format!("--cert/--key: {e}"))?
        }
        _ => return Ok(None),
    };
    connectord::simulate::DtlsConfig::new(auth)
        .map(Some)
        .map_err(|e| e.to_string())
}

fn simulate(opts: connectord::simulate::SimOptions) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a pipe or a file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = rt.block_on(connectord::simulate::run(opts, async {
        let _ = tokio::signal::ctrl_c().await;
    }))?;
    eprintln!(
        "{} devices registered, {} failed, {} requests served, {} notifications sent",
        report.registered, report.failed, report.requests_served, report.notifications_sent
    );
    Ok(())
}

/// `connectord credentials …`: one request to the daemon's REST API; what it printed on
/// success.
fn credentials(action: CredentialsAction) -> anyhow::Result<String> {
    use connectord::remote;
    let (method, ep, body, api) = match action {
        CredentialsAction::Put {
            endpoint,
            psk_identity,
            psk,
            api,
        } => {
            let psk = if psk == "-" {
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .context("cannot read the key from standard input")?;
                line.trim().to_string()
            } else {
                psk
            };
            let body = serde_json::json!({"psk_identity": psk_identity, "psk": psk});
            ("PUT", Some(endpoint), Some(body), api)
        }
        CredentialsAction::Get { endpoint, api } => ("GET", Some(endpoint), None, api),
        CredentialsAction::Delete { endpoint, api } => ("DELETE", Some(endpoint), None, api),
        CredentialsAction::List { api } => ("GET", None, None, api),
    };
    let config = match &api.config {
        Some(p) => Config::load(p)?,
        None => embedded_noted("credentials")?,
    };
    let base = match api.url {
        Some(u) => u,
        None => remote::base_url(&config)?,
    };
    let key = remote::access_key(&config, api.key_file.as_deref())?;
    let path = match &ep {
        Some(ep) => format!("/v2/device-credentials/{}", remote::segment(ep)),
        None => "/v2/device-credentials".to_string(),
    };
    let (status, text) = remote::call(&base, &key, method, &path, body.as_ref())?;
    if !(200..300).contains(&status) {
        // The API's errors are {"type", "message"}: the message is what to say.
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or(text);
        anyhow::bail!("{method} {path}: HTTP {status}: {message}");
    }
    if method == "DELETE" {
        return Ok(format!(
            "revoked the credentials of {}",
            ep.unwrap_or_default()
        ));
    }
    Ok(match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => serde_json::to_string_pretty(&v)?,
        Err(_) => text,
    })
}

/// The embedded defaults, for a command given no `--config`, with a note on standard
/// error of the state directory they mean: an operator of the packaged daemon
/// (`/etc/connectord/connectord.toml`, state in `/var/lib/connectord`) who left out
/// `--config` made a key in a state of its own, which the daemon never saw, and was told
/// nothing (found by an outside review).
fn embedded_noted(command: &str) -> anyhow::Result<Config> {
    let config = Config::embedded()?;
    eprintln!(
        "note: {command} without --config uses the embedded defaults (state in {}); the packaged daemon's is --config {SYSTEM_CONFIG}",
        config.state.resolve_dir().display()
    );
    Ok(config)
}

fn plugin_call(
    path: Option<PathBuf>,
    plugin: &str,
    op: &str,
    input: &str,
) -> anyhow::Result<String> {
    let config = match &path {
        Some(p) => Config::load(p)?,
        None => embedded_noted("plugin-call")?,
    };
    serde_json::from_str::<serde_json::Value>(input).context("the input must be JSON")?;
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let out = connectord::daemon::plugin_call(&config, plugin, op, input.as_bytes())?;
    Ok(match serde_json::from_slice::<serde_json::Value>(&out) {
        Ok(v) => serde_json::to_string_pretty(&v)?,
        Err(_) => String::from_utf8_lossy(&out).into_owned(),
    })
}

fn run(path: Option<PathBuf>, reinit: bool, ready_file: Option<PathBuf>) -> anyhow::Result<()> {
    // Absolute, so that the log (and SIGHUP's re-read) names the file whatever the
    // working directory: `--config c.toml` is logged as `/etc/connectord/c.toml`.
    let path = match path {
        Some(p) => Some(std::path::absolute(&p).with_context(|| {
            format!(
                "configuration file {}: cannot make the path absolute",
                p.display()
            )
        })?),
        None => None,
    };
    let config = match &path {
        Some(p) => Config::load(p)?,
        None => Config::parse(connectord::config::DEFAULT_TOML, Source::Embedded)?,
    };
    let (filter, handle) =
        tracing_subscriber::reload::Layer::new(EnvFilter::new(&config.log.level));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colours only on a terminal: journald and log files get plain text.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    tracing::info!(
        "configuration: {}",
        path.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "embedded defaults".into())
    );
    let set_log: connectord::daemon::SetLogFilter = Box::new(move |level: &str| {
        let f = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(f).map_err(|e| e.to_string())
    });
    let running = connectord::daemon::start(
        config,
        connectord::daemon::Options {
            config_path: path,
            reinit,
            set_log: Some(set_log),
            signals_from_start: true,
        },
    )?;
    running.serve_until_signal(ready_file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index names the purge delay: mimalloc v3's default for it is 1 000 ms (no
    /// other option of its list defaults to 1 000), and setting it reads back.
    #[test]
    fn purge_delay_option_index() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: as in `set_purge_delay`.
        let default = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(default, 1000, "not mimalloc v3's purge_delay");
        set_purge_delay();
        // SAFETY: as above.
        let now = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(now, PURGE_DELAY_MS);
    }
}
