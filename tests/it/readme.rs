//! The README's quick start, run as written (issue 19, item 9): `connectord simulate`
//! starts devices that stay up, and the documented `curl` commands list them, read a
//! resource and pull the answer, whose payload is the base64 the README shows.
//!
//! The commands are taken from the README's "Try it without hardware" block and run with
//! `sh` and `curl` against a daemon of the test harness: only the daemon's addresses
//! (ephemeral ports here) and the key (read from its state directory) are substituted.
//! The secure quick start (a PSK provisioned with `connectord credentials put`, libcoap
//! registering over DTLS) is run the same way.

use crate::support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn readme() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The indented command lines of the quick start block.
fn quick_start(readme: &str) -> Vec<String> {
    let start = readme
        .find("**Try it without hardware.**")
        .expect("the README has a 'Try it without hardware' quick start");
    let end = start
        + readme[start..]
            .find("A simulated device serves")
            .expect("the quick start block ends with what a simulated device serves");
    readme[start..end]
        .lines()
        .filter_map(|l| l.strip_prefix("    "))
        .map(str::to_string)
        .collect()
}

struct Sim(Child);

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a README `curl` line with `sh`, against `rest` instead of 127.0.0.1:8080.
fn run_curl(line: &str, rest: std::net::SocketAddr, key: &str) -> serde_json::Value {
    let line = line.replace("127.0.0.1:8080", &rest.to_string());
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "set -e; KEY='{key}'; {line} --silent --show-error --max-time 40"
        ))
        .stdin(Stdio::null())
        .output()
        .expect("run sh");
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{line}: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{line}: not JSON ({e}): {body:?}"))
}

#[test]
fn the_quick_start_works_as_written() {
    if Command::new("curl").arg("--version").output().is_err() {
        panic!("the README's quick start uses curl; install it (apt-get install curl)");
    }
    let text = readme();
    let lines = quick_start(&text);
    let sim_line = lines
        .iter()
        .find(|l| l.contains(" simulate "))
        .unwrap_or_else(|| panic!("no simulate command in {lines:#?}"));
    assert_eq!(sim_line, "cargo run --release -- simulate --devices 2");
    assert!(
        lines.contains(&"KEY=$(cat ~/.local/state/connectord/admin.key)".to_string()),
        "{lines:#?}"
    );
    let curls: Vec<&String> = lines.iter().filter(|l| l.starts_with("curl ")).collect();
    assert_eq!(curls.len(), 3, "list, read, pull: {curls:#?}");
    for name in ["sim-000000", "sim-000001"] {
        assert!(
            text.contains(&format!("`{name}`")),
            "the README names {name}"
        );
    }
    assert!(text.contains("**base64**") && text.contains("`Y29ubmVjdG9yZA==` is `connectord`"));

    let d = support::Daemon::start();
    // The README's command, on the binary under test and the test daemon's CoAP port.
    let args: Vec<&str> = sim_line
        .strip_prefix("cargo run --release -- ")
        .unwrap()
        .split_whitespace()
        .collect();
    let _sim = Sim(Command::new(support::BIN)
        .args(&args)
        .arg("--server")
        .arg(d.coap.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run connectord simulate"));

    // 1. The list shows both devices.
    let mut listed = serde_json::Value::Null;
    let both = support::eventually(Duration::from_secs(20), || {
        listed = run_curl(curls[0], d.rest, &d.key);
        ["sim-000000", "sim-000001"].iter().all(|n| {
            listed
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e["name"] == *n))
        })
    });
    assert!(both, "the simulated devices are not listed: {listed}");

    // 2. The read answers with an async-response-id.
    assert!(
        curls[1].contains("/v2/endpoints/sim-000000/3/0/0"),
        "{}",
        curls[1]
    );
    let read = run_curl(curls[1], d.rest, &d.key);
    let id = read["async-response-id"]
        .as_str()
        .unwrap_or_else(|| panic!("no async-response-id: {read}"))
        .to_string();

    // 3. The pull brings the answer (after the registration events, maybe in a later pull).
    let mut answer = None;
    let mut pulled = Vec::new();
    let got = support::eventually(Duration::from_secs(60), || {
        let events = run_curl(curls[2], d.rest, &d.key);
        answer = events["async-responses"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["id"] == id.as_str()).cloned());
        pulled.push(events);
        answer.is_some()
    });
    assert!(got, "no async response {id} in {pulled:#?}");
    let answer = answer.unwrap();
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(answer["payload"], "Y29ubmVjdG9yZA==", "{answer}");
}

/// The README's secure quick start, run as written with `sh`: `connectord credentials
/// put` with the key made by `printf | od | tr`, then libcoap's `coap-client-openssl`
/// registering over DTLS without `ep=`. Substituted: the binary under test with the test
/// daemon's configuration and REST address, the DTLS port (the README relies on 5684), and
/// `-B 10` so that a failing handshake ends. Then the claims of the paragraph after it: the
/// endpoint is `demo-secure`, and plain CoAP for it is 4.03 and counted.
#[test]
fn the_secure_quick_start_works_as_written() {
    let text = readme();
    let start = text
        .find("**Secure quick start (DTLS with a pre-shared key).**")
        .expect("the README has a secure quick start");
    let end = start
        + text[start..]
            .find("The device is the endpoint its identity names")
            .expect("the secure quick start ends with what the device is");
    let block: Vec<&str> = text[start..end]
        .lines()
        .filter_map(|l| l.strip_prefix("    "))
        .collect();
    assert_eq!(block.len(), 3, "{block:#?}");
    assert!(
        block[0].starts_with("connectord credentials put demo-secure "),
        "{block:#?}"
    );
    assert!(block[2].starts_with("coap-client-openssl "), "{block:#?}");
    assert!(
        block[2].contains("'coaps://127.0.0.1/rd?lt=300'"),
        "{block:#?}"
    );

    let d = support::Daemon::start_custom("listen_dtls = [\"127.0.0.1:0\"]", "");
    let dtls = d.ready.as_ref().expect("ready file").coap_dtls[0];
    support::peers::libcoap_client();
    let script = block
        .join("\n")
        .replacen(
            "connectord credentials put",
            &format!(
                "'{}' credentials put --config '{}' --url http://{}",
                support::BIN,
                d.config_path.display(),
                d.rest
            ),
            1,
        )
        .replacen("coap-client-openssl ", "coap-client-openssl -B 10 -v 6 ", 1)
        .replacen(
            "coaps://127.0.0.1/",
            &format!("coaps://127.0.0.1:{}/", dtls.port()),
            1,
        );
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("set -e\n{script}"))
        .env_remove("CONNECTORD_API_KEY")
        .stdin(Stdio::null())
        .output()
        .expect("run sh");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script}\n{all}");
    assert!(all.contains("c:2.01"), "{script}\n{all}");
    assert_eq!(d.get("/v2/endpoints/demo-secure").status, 200, "{all}");
    let mut dev = d.device();
    let mut r = support::coap::Req::new(coap_lite::RequestType::Post, &["rd"]);
    r.query = &["ep=demo-secure", "lt=300"];
    r.payload = b"</3/0>";
    assert_eq!(
        support::coap::code(&dev.request(&r)),
        coap_lite::ResponseType::Forbidden
    );
    assert_eq!(d.metric("coap_plain_refused_total"), 1);
}
