//! Property-based fuzzing of the REST API from its OpenAPI document with schemathesis
//! (PyPI), against the real daemon with a few registered devices: no generated request may
//! get a 5xx answer. Bounded: a fixed seed, a fixed number of examples per operation, and
//! a time limit.

use crate::support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::peers::{SCHEMATHESIS, python_venv};

const LIMIT: Duration = Duration::from_secs(300);

#[test]
fn no_generated_request_gets_a_server_error() {
    let python = python_venv("schemathesis", SCHEMATHESIS, "schemathesis");
    let st = python.with_file_name("st");
    let d = support::Daemon::start();
    for i in 0..3 {
        d.device().register(
            &[&format!("ep=node-{i}"), "lt=600"],
            "</3/0>,</3303/0/5700>;obs",
        );
    }
    let doc = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let out_path = d.dir.path().join("schemathesis.log");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = Command::new(&st)
        .args(["run", doc, "--url", &format!("http://{}", d.rest)])
        .args(["-H", &format!("Authorization: Bearer {}", d.key)])
        .args([
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "15",
            "--seed",
            "20261125",
        ])
        .args(["--request-timeout", "10", "--workers", "1"])
        // Long-poll holds for up to 30 s by design; it is exercised by its own tests.
        .args(["--exclude-path-regex", "notification/pull"])
        .env("SCHEMATHESIS_HOOKS", "")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("run schemathesis");
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("schemathesis did not finish within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(status.success(), "schemathesis found failures:\n{log}");
    assert!(log.contains("passed"), "no test case ran:\n{log}");
    // The daemon is still serving.
    assert_eq!(d.get("/v2/endpoints").status, 200);
}
