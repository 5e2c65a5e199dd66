//! Bounded libFuzzer runs of the cargo-fuzz targets in `fuzz/` (`coap_decode`,
//! `link_format`, `presub_json`, `config_toml`, `lwm2m_decode`, `tcp_frame`), as part of
//! `cargo test --workspace`.
//!
//! cargo-fuzz is not needed: the test runs the `cargo build` that `cargo fuzz build` would
//! run (`--release --target <host>`, the same RUSTFLAGS, see [`COVERAGE_FLAGS`]) on
//! `fuzz/Cargo.toml` into `target/fuzz`, then runs each binary for `CONNECTORD_FUZZ_SECONDS`
//! (default 10) seconds, starting from a copy of the committed seed corpus `fuzz/seeds/<target>`
//! in a temporary directory. One test per target, so the test harness runs two of them at
//! a time on two cores (`cargo test -p connectord --test it -- fuzz::coap_decode` runs one). A target fails
//! when libFuzzer exits non-zero, writes any artifact (crash-, leak-, timeout-, oom-,
//! slow-unit-), did not start from every seed, shows no coverage instrumentation, or ran
//! fewer than [`MIN_RUNS`] inputs. The failure names the artifact, prints its bytes, the
//! libFuzzer seed, the command that reproduces it and the tail of libFuzzer's output.
//!
//! Longer runs by hand, e.g. ten minutes per target (two at a time), with AddressSanitizer:
//!
//! ```text
//! CONNECTORD_FUZZ_SECONDS=600 CONNECTORD_FUZZ_ASAN=1 cargo test -p connectord --test it -- fuzz:: --nocapture
//! ```
//!
//! Decisions:
//!
//! - **No AddressSanitizer in CI** (`CONNECTORD_FUZZ_ASAN=1` turns it on, built into
//!   `target/fuzz-asan` with `RUSTC_BOOTSTRAP=1` for `-Zsanitizer=address`). The code under
//!   test is safe Rust (the daemon is `#![deny(unsafe_code)]`, the only `unsafe` module, the
//!   plugin loader, is not reachable from these targets); what ASan adds here is checking
//!   the `unsafe` inside dependencies (coap-lite, toml, serde_json, std), at ~50 % more
//!   build CPU (measured from clean on this 2-core machine: 6 min 35 s of CPU with ASan
//!   against 4 min 24 s without, same flags otherwise) and 2.7 to 6 times fewer executions
//!   per second (coap_decode 20 k/s against 55 k/s, config_toml 8.6 k/s against 53 k/s)
//!   and ~450 MB of RSS per run instead of ~30 MB. Panics, overflow and debug assertions,
//!   which are what these parsers can get wrong, are caught without it. Without `-Z` flags
//!   the build needs no `RUSTC_BOOTSTRAP`, so it is not set (it would also switch
//!   nightly-only code paths on in dependencies that probe for them).
//! - **Only the fuzzed code is optimised** (issue 24's suite-time budget): every package is
//!   built at `opt-level=0` (`--config profile.release.package."*".opt-level=0`) except the
//!   ones the targets exercise, [`FUZZED_PACKAGES`] (our parsers' crates, coap-lite, toml,
//!   serde_json, dimpl, libFuzzer itself), which keep the release profile's `opt-level=3`.
//!   The targets link the daemon crate (`config_toml` needs its parser), so the build
//!   compiled hyper, rustls, tokio, mlua, SQLite, async-nats... at `-O3` with
//!   `-Ccodegen-units=1` and coverage instrumentation: 8 min 44 s of CPU in the clean-clone
//!   CI of 2026-12-05, the largest single cost of the suite. Before that only the C code of
//!   `libsqlite3-sys`, `mlua-sys` and `ring` was at `opt-level=0` (measured then: 6 min 8 s
//!   of CPU with them at `-O3`, 4 min 24 s without). None of the unoptimised code is what a
//!   target fuzzes; it only links.
//! - `-Ccodegen-units=1` (cargo-fuzz's choice, for inlining) is kept: dropping it did not
//!   make the build faster here (4 min 44 s of CPU).
//! - `fuzz/Cargo.toml`'s `[profile.release] debug = 1` is kept as it is: the backtrace of a
//!   panic in a target names file and line.
//! - libFuzzer's seed is random, so every CI run explores a little differently; a failure
//!   prints it (`-seed=N` with the same seed corpus repeats the mutation sequence), and the
//!   artifact alone replays the failing input.
#![cfg(target_os = "linux")]

use std::fmt::Write as _;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The RUSTFLAGS `cargo fuzz build` sets (cargo-fuzz's `FuzzProject::cargo` in
/// `src/project.rs`: Linux, release mode with debug assertions, no sanitizer), plus
/// `-Coverflow-checks` said explicitly (`-Cdebug-assertions` implies it).
const COVERAGE_FLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg fuzzing",
    "-Cllvm-args=-simplifycfg-branch-fold-threshold=0",
    "-Cllvm-args=-sanitizer-coverage-stack-depth",
    "-Cdebug-assertions",
    "-Coverflow-checks",
    "-Ccodegen-units=1",
];

/// The packages whose code the targets fuzz: built at the release profile's `opt-level=3`,
/// every other package at `opt-level=0` ([`profile_overrides`]).
const FUZZED_PACKAGES: &[&str] = &[
    "connectord",
    "connectord-coap",
    "connectord-core",
    "connectord-lwm2m",
    "connectord-model",
    "coap-lite",
    "dimpl",
    "libfuzzer-sys",
    "serde_json",
    "toml",
    "toml_parser",
];

/// The `--config` values of the fuzz build: every package at `opt-level=0` but
/// [`FUZZED_PACKAGES`].
fn profile_overrides() -> Vec<String> {
    std::iter::once(r#"profile.release.package."*".opt-level=0"#.to_string())
        .chain(
            FUZZED_PACKAGES
                .iter()
                .map(|p| format!("profile.release.package.{p}.opt-level=3")),
        )
        .collect()
}

/// Fewer executed inputs than this means the run did not really fuzz.
const MIN_RUNS: u64 = 1000;

/// Per-run seconds when `CONNECTORD_FUZZ_SECONDS` is not set. Decision (issue 22, suite
/// time): 10 rather than 20, as the suite is CPU-bound on CI's 2 cores and each target runs
/// hundreds of thousands of inputs in 10 s (at least [`MIN_RUNS`] is checked); the long
/// runs are the ones by hand above.
const DEFAULT_SECONDS: u64 = 10;

/// One fuzz target and its libFuzzer limits.
struct Target {
    name: &'static str,
    /// Longest input (`-max_len`).
    max_len: usize,
}

/// Every binary of `fuzz/Cargo.toml`. The limits follow what the daemon accepts:
/// `coap.max_datagram`'s default for datagrams, a few KiB for text bodies, device payloads
/// and the configuration file (the shipped one, comments included, is under 6 KiB).
const TARGETS: &[Target] = &[
    Target {
        name: "coap_decode",
        max_len: 1500,
    },
    Target {
        name: "link_format",
        max_len: 4096,
    },
    Target {
        name: "presub_json",
        max_len: 4096,
    },
    Target {
        name: "config_toml",
        max_len: 8192,
    },
    Target {
        name: "lwm2m_decode",
        max_len: 4096,
    },
    Target {
        name: "tcp_frame",
        max_len: 4096,
    },
    Target {
        name: "dtls_input",
        max_len: 1500,
    },
];

/// Memory one run may use (`-rss_limit_mb`; with ASan also the largest single allocation):
/// the targets peak under 50 MB; ASan's quarantine and shadow memory add about 450 MB.
fn rss_limit_mb() -> u32 {
    if asan() { 2048 } else { 1024 }
}

/// Seconds one input may take (`-timeout`); these are parsers of at most a few KiB.
const INPUT_TIMEOUT_S: u32 = 10;
/// Longest the fuzz build may take before the test gives up.
const BUILD_LIMIT: Duration = Duration::from_secs(40 * 60);

#[test]
fn coap_decode() {
    fuzz("coap_decode");
}

#[test]
fn link_format() {
    fuzz("link_format");
}

#[test]
fn presub_json() {
    fuzz("presub_json");
}

#[test]
fn config_toml() {
    fuzz("config_toml");
}

#[test]
fn lwm2m_decode() {
    fuzz("lwm2m_decode");
}

#[test]
fn tcp_frame() {
    fuzz("tcp_frame");
}

#[test]
fn dtls_input() {
    fuzz("dtls_input");
}

/// Every target in `fuzz/fuzz_targets` and `fuzz/Cargo.toml` is run here and has seeds.
#[test]
fn every_fuzz_target_is_run_and_seeded() {
    let mut sources: Vec<String> = std::fs::read_dir(repo().join("fuzz/fuzz_targets"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    sources.sort();
    let mut ours: Vec<String> = TARGETS.iter().map(|t| t.name.to_owned()).collect();
    ours.sort();
    assert_eq!(
        sources, ours,
        "fuzz/fuzz_targets and TARGETS in tests/it/fuzz.rs differ"
    );
    let manifest = std::fs::read_to_string(repo().join("fuzz/Cargo.toml")).unwrap();
    for t in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{}\"", t.name)),
            "{} is not a [[bin]] of fuzz/Cargo.toml",
            t.name
        );
        assert!(
            !seeds(t.name).is_empty(),
            "fuzz/seeds/{} has no seed inputs",
            t.name
        );
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn asan() -> bool {
    std::env::var("CONNECTORD_FUZZ_ASAN").is_ok_and(|v| v == "1")
}

fn seconds() -> u64 {
    match std::env::var("CONNECTORD_FUZZ_SECONDS") {
        Err(_) => DEFAULT_SECONDS,
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if n > 0 => n,
            _ => panic!("CONNECTORD_FUZZ_SECONDS must be a positive number of seconds, not {v:?}"),
        },
    }
}

/// The seed files of a target, sorted.
fn seeds(target: &str) -> Vec<PathBuf> {
    let dir = repo().join("fuzz/seeds").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// The host target triple, as `cargo fuzz` passes it to `--target` (so that RUSTFLAGS do
/// not reach build scripts and proc macros).
fn host_triple() -> Result<String, String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .map_err(|e| format!("running {rustc} -vV: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|h| h.trim().to_owned())
        .ok_or_else(|| format!("no host line in `{rustc} -vV`"))
}

/// Builds the fuzz binaries once per test process; the directory holding them, or the
/// reason the build failed.
fn built() -> &'static Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT.get_or_init(build)
}

fn build() -> Result<PathBuf, String> {
    let repo = repo();
    let triple = host_triple()?;
    let target_dir = repo.join(if asan() {
        "target/fuzz-asan"
    } else {
        "target/fuzz"
    });
    let mut rustflags = COVERAGE_FLAGS.join(" ");
    if asan() {
        rustflags.push_str(" -Zsanitizer=address");
    }
    // Like cargo-fuzz: flags of the caller come last.
    if let Ok(extra) = std::env::var("RUSTFLAGS") {
        rustflags.push(' ');
        rustflags.push_str(&extra);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--release", "--bins", "--manifest-path"])
        .arg(repo.join("fuzz/Cargo.toml"))
        .args(["--target", &triple]);
    for c in profile_overrides() {
        cmd.arg("--config").arg(c);
    }
    cmd.env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", &rustflags)
        // It would win over RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .current_dir(repo.join("fuzz"));
    if asan() {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    } else {
        cmd.env_remove("RUSTC_BOOTSTRAP");
    }
    let shown = format!(
        "{}CARGO_TARGET_DIR={} RUSTFLAGS='{rustflags}' {cargo} build --release --bins \
         --manifest-path fuzz/Cargo.toml --target {triple} {}",
        if asan() { "RUSTC_BOOTSTRAP=1 " } else { "" },
        target_dir.display(),
        profile_overrides()
            .iter()
            .map(|c| format!("--config '{c}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    eprintln!("fuzz: building: {shown}");
    let started = Instant::now();
    let run = run(&mut cmd, BUILD_LIMIT).map_err(|e| format!("{shown}\n{e}"))?;
    let took = started.elapsed();
    if !run.success {
        return Err(format!(
            "the fuzz build failed ({}, after {:.0?}):\n{shown}\n--- cargo output (last 150 \
             lines) ---\n{}",
            run.status,
            took,
            tail(&run.stderr, 150)
        ));
    }
    eprintln!("fuzz: build finished in {took:.1?}");
    let bin_dir = target_dir.join(&triple).join("release");
    for t in TARGETS {
        if !bin_dir.join(t.name).is_file() {
            return Err(format!(
                "the fuzz build succeeded but {} is missing\n{shown}",
                bin_dir.join(t.name).display()
            ));
        }
    }
    Ok(bin_dir)
}

/// A finished process.
struct Run {
    success: bool,
    status: String,
    stderr: String,
}

/// Runs `cmd` to the end (killed after `limit`), collecting stdout and stderr together.
fn run(cmd: &mut Command, limit: Duration) -> Result<Run, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut text = String::from_utf8_lossy(&err.join().unwrap()).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.join().unwrap()));
    match status {
        Some(s) => Ok(Run {
            success: s.success(),
            status: s.to_string(),
            stderr: text,
        }),
        None => Err(format!(
            "killed after {limit:?}; output so far (last 80 lines):\n{}",
            tail(&text, 80)
        )),
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The number in a libFuzzer line `<prefix><number>…`, from the last such line.
fn last_number(log: &str, prefix: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        let rest = l.trim_start().strip_prefix(prefix)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The bytes of an artifact: escaped (readable for the text targets) and in hex.
fn show_bytes(bytes: &[u8]) -> String {
    const MAX: usize = 4096;
    let shown = &bytes[..bytes.len().min(MAX)];
    let escaped: String = shown
        .iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect();
    let hex: String = shown.iter().map(|b| format!("{b:02x}")).collect();
    let more = if bytes.len() > MAX {
        format!(" (first {MAX} of {} bytes)", bytes.len())
    } else {
        String::new()
    };
    format!("  escaped{more}: \"{escaped}\"\n  hex{more}: {hex}")
}

fn fuzz(name: &str) {
    static REPORTED: AtomicBool = AtomicBool::new(false);
    let bin_dir = match built() {
        Ok(d) => d,
        Err(e) if !REPORTED.swap(true, Ordering::SeqCst) => panic!("{e}"),
        Err(_) => panic!("the fuzz build failed (its output is in the first failing test)"),
    };
    let target = TARGETS.iter().find(|t| t.name == name).unwrap();
    let secs = seconds();
    let bin = bin_dir.join(name);

    let work = tempfile::Builder::new()
        .prefix(&format!("fuzz-{name}-"))
        .tempdir()
        .unwrap();
    let corpus = work.path().join("corpus");
    let artifacts = work.path().join("artifacts");
    std::fs::create_dir_all(&corpus).unwrap();
    std::fs::create_dir_all(&artifacts).unwrap();
    let seeds = seeds(name);
    for s in &seeds {
        std::fs::copy(s, corpus.join(s.file_name().unwrap())).unwrap();
    }

    let mut cmd = Command::new(&bin);
    cmd.arg(format!("-max_total_time={secs}"))
        .arg(format!("-max_len={}", target.max_len))
        .arg(format!("-rss_limit_mb={}", rss_limit_mb()))
        .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .arg(&corpus)
        .current_dir(work.path())
        .env("RUST_BACKTRACE", "1");
    if asan() {
        cmd.env("ASAN_OPTIONS", "detect_odr_violation=0");
    }
    let started = Instant::now();
    // libFuzzer stops itself after `secs`; the margin covers start-up, a last slow input
    // and a busy machine.
    let limit = Duration::from_secs(secs + 2 * u64::from(INPUT_TIMEOUT_S) + 120);
    let result = run(&mut cmd, limit);
    let took = started.elapsed();

    let mut problems = Vec::new();
    let log = match result {
        Ok(r) => {
            if !r.success {
                problems.push(format!("libFuzzer exited with {}", r.status));
            }
            r.stderr
        }
        Err(e) => {
            problems.push(format!("libFuzzer did not stop by itself: {e}"));
            String::new()
        }
    };
    let mut found: Vec<PathBuf> = std::fs::read_dir(&artifacts)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    found.sort();
    if !found.is_empty() {
        problems.push(format!("libFuzzer wrote {} artifact(s)", found.len()));
    }
    let runs =
        last_number(&log, "stat::number_of_executed_units:").or_else(|| last_number(&log, "Done "));
    match runs {
        Some(n) if n >= MIN_RUNS => {}
        Some(n) => problems.push(format!(
            "only {n} inputs executed (at least {MIN_RUNS} expected)"
        )),
        None => problems.push("no final run count (`Done N runs`) in libFuzzer's output".into()),
    }
    let loaded = log.lines().find_map(|l| {
        let (count, _) = l.strip_prefix("INFO:")?.split_once(" files found in ")?;
        count.trim().parse::<usize>().ok()
    });
    if loaded != Some(seeds.len()) {
        problems.push(format!(
            "libFuzzer read {loaded:?} seed files, {} were copied",
            seeds.len()
        ));
    }
    let counters = log
        .lines()
        .find(|l| l.starts_with("INFO: Loaded") && l.contains("inline 8-bit counters"))
        .and_then(|l| {
            l.split('(')
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        });
    if counters.unwrap_or(0) == 0 {
        problems.push("no coverage counters: the binary is not instrumented".into());
    }

    if problems.is_empty() {
        eprintln!(
            "fuzz: {name}: {} inputs in {took:.1?} ({} new corpus units, peak RSS {} MB)",
            runs.unwrap(),
            last_number(&log, "stat::new_units_added:").unwrap_or(0),
            last_number(&log, "stat::peak_rss_mb:").unwrap_or(0)
        );
        return;
    }

    // Keep the directory so the artifacts can be replayed.
    let kept = work.keep();
    let mut msg = format!("fuzz target {name} failed after {took:.1?}:\n");
    for p in &problems {
        let _ = writeln!(msg, "- {p}");
    }
    if let Some(seed) = log.lines().find_map(|l| l.strip_prefix("INFO: Seed: ")) {
        let _ = writeln!(
            msg,
            "libFuzzer seed: {seed} (`-seed={seed}` repeats its mutations)"
        );
    }
    for a in &found {
        let a = kept.join("artifacts").join(a.file_name().unwrap());
        let bytes = std::fs::read(&a).unwrap_or_default();
        let _ = writeln!(
            msg,
            "artifact {} ({} bytes):\n{}\nreproduce: {} {}",
            a.display(),
            bytes.len(),
            show_bytes(&bytes),
            bin.display(),
            a.display()
        );
    }
    let _ = writeln!(
        msg,
        "work directory (kept): {}\n--- libFuzzer output (last 80 lines) ---\n{}",
        kept.display(),
        tail(&log, 80)
    );
    panic!("{msg}");
}
