//! A state directory of the release before issue 20 (`fixtures/state-5e38896`, written by
//! that build's binary: database schema 6) opens with this build and serves what it held:
//! the registration (migrated to a peer reference), the admin key the old release created,
//! the subscription and pre-subscription, and the events it had queued for the key.

use std::path::Path;
use std::time::Duration;

use crate::support::Daemon;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/it/fixtures/state-5e38896"
);

/// Puts the fixture in place of `state` (a stopped daemon's state directory). The fixture
/// was written on 2026-12-04: its registration's lifetime and its events' creation times
/// are moved to now, so that neither has expired (86 400 s) or left the 15-minute window
/// when the test runs; nothing else of the old rows is touched.
fn install_fixture(state: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(state).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::remove_file(&path).unwrap();
        }
    }
    for f in ["admin.key", "ca.cert.pem", "ca.key.pem", "connectord.db"] {
        let to = state.join(f);
        std::fs::copy(Path::new(FIXTURE).join(f), &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let db = rusqlite::Connection::open(state.join("connectord.db")).unwrap();
    let version: i64 = db
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 6, "the fixture is a schema-6 database");
    db.execute(
        "UPDATE registrations SET data = json_set(data, '$.registered_at_ms', ?1, '$.expires_at_ms', ?1 + 86400000)",
        [now],
    )
    .unwrap();
    db.execute(
        "UPDATE events SET data = json_set(data, '$.event.created_ms', ?1)",
        [now],
    )
    .unwrap();
}

#[test]
fn a_state_directory_of_the_release_before_opens_and_serves_what_it_held() {
    let d = Daemon::start().stop_edit_restart(install_fixture);
    d.expect_log(
        "migrated database schema to version 7",
        Duration::from_secs(5),
    );
    // The old release's admin key authenticates (the testkit read it from admin.key).
    assert_eq!(
        d.get("/v2/endpoints").json(),
        serde_json::json!([{"name": "fx-000000", "type": "Sensor", "status": "ACTIVE", "q": false, "lwm2m": "1.0"}])
    );
    let resources = d.get("/v2/endpoints/fx-000000").json();
    let paths: Vec<&str> = resources
        .as_array()
        .expect("a resource list")
        .iter()
        .filter_map(|r| r["uri"].as_str())
        .collect();
    assert!(paths.contains(&"/3303/0/5700"), "{resources}");
    assert_eq!(
        d.get("/v2/subscriptions").json(),
        serde_json::json!([{"endpoint-name": "fx-*", "resource-path": ["/3/0/1"]}])
    );
    let subs = d.get("/v2/subscriptions/fx-000000");
    assert_eq!(subs.status, 200, "{}", subs.body);
    assert!(
        subs.body.contains("/subscriptions/fx-000000/3303/0/5700"),
        "{}",
        subs.body
    );
    // The four events the old release had queued for the key, delivered.
    let events = d.collect_events(Duration::from_secs(10), |e| {
        e.0.values().map(Vec::len).sum::<usize>() >= 4
    });
    let ids: Vec<&str> = events.0["async-responses"]
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        [
            "514181457#3d4b92a2-c00f-8280-b0af-74115eff96c1",
            "1704486417#cb30cc23-d036-7cc2-78dd-905ad9e03bae"
        ],
        "{events:?}"
    );
    assert_eq!(
        events.0["notifications"][0]["payload"], "MjEuNw==",
        "{events:?}"
    );
    assert_eq!(events.0["subscription-errors"].len(), 1, "{events:?}");
}
