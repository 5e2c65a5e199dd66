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

/// The notification message the release before answered for the fixture's queued events:
/// its stored entries (their text as stored) grouped by type in name order, each type's
/// entries in the order they were queued.
fn old_message() -> String {
    #[derive(serde::Deserialize)]
    struct Row<'a> {
        #[serde(borrow)]
        event: Stored<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Stored<'a> {
        kind: String,
        #[serde(borrow)]
        body: &'a serde_json::value::RawValue,
    }
    // Immutable: SQLite writes nothing beside the fixture (no -shm or -wal file).
    let uri = format!("file:{FIXTURE}/connectord.db?immutable=1");
    let db = rusqlite::Connection::open_with_flags(
        uri,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
    )
    .unwrap();
    let rows: Vec<String> = db
        .prepare("SELECT data FROM events ORDER BY key_id, seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(rows.len(), 4, "the fixture's queued events");
    let mut groups: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for row in &rows {
        let r: Row<'_> = serde_json::from_str(row).unwrap();
        groups
            .entry(r.event.kind)
            .or_default()
            .push(r.event.body.get().to_string());
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|(kind, entries)| format!("\"{kind}\":[{}]", entries.join(",")))
        .collect();
    format!("{{{}}}", parts.join(","))
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
    // The four events the old release had queued for the key, delivered byte for byte as
    // that release delivered them (its stored entries, issue 20 migrated them to typed
    // records and renders them at the edge): one long-poll answer.
    let r = d.get("/v2/notification/pull?noWait=true");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, old_message(), "as the release before answered");
    let mut events = crate::support::Events::default();
    events.add(&r.json());
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

/// A schema-7 database (events stored as their rendered mbed JSON entries) with an event
/// of every kind queued, hand-written as the release before wrote them: this build
/// migrates them to its typed records (schema 8) and answers the key's long-poll with each
/// entry byte for byte as that release would have, in the order queued; the key's events
/// are numbered on after the highest migrated one (acknowledging them takes only them).
#[test]
fn schema_7_events_of_every_kind_are_served_as_before() {
    let d = Daemon::start();
    // The admin key's channel (its key id is in the channels table).
    assert!(d.pull_now().is_none());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let bodies = [
        (
            "notifications",
            r#"{"ct":"text/plain","ep":"e","max-age":60,"path":"/3303/0/5700","payload":"MjEuNw=="}"#,
        ),
        (
            "registrations",
            r#"{"ct":"application/vnd.oma.lwm2m+tlv","ep":"e","ept":"Sensor","lwm2m":"1.1","q":true,"resources":[{"ct":"text/plain","if":"s","obs":true,"path":"/3/0","rf":"oma","rt":"oma","ver":"1.1"},{"obs":false,"path":"/1/0"}]}"#,
        ),
        (
            "reg-updates",
            r#"{"ep":"e","ept":"","q":false,"resources":[]}"#,
        ),
        ("de-registrations", r#""e""#),
        ("registrations-expired", r#""e\"q\u0001""#),
        (
            "async-responses",
            r#"{"ct":"text/plain","id":"1#a","max-age":0,"payload":"MTI=","status":200}"#,
        ),
        (
            "async-responses",
            r#"{"error":"timeout","id":"2#b","location":"/3303/1","payload":"","status":504}"#,
        ),
        (
            "subscription-errors",
            r#"{"ep":"e","error":"no Observe","path":"/3/0/1","status":412}"#,
        ),
        (
            "notifications",
            r#"{"ep":"é \"x\"","max-age":5,"path":"/3/0/0","payload":"AP8="}"#,
        ),
    ];
    let d = d.stop_edit_restart(|state| {
        let db = rusqlite::Connection::open(state.join("connectord.db")).unwrap();
        let key: String = db
            .query_row("SELECT key_id FROM channels", [], |r| r.get(0))
            .unwrap();
        // Schema 8 added a table; a schema-7 database has none of it, and has the tables
        // of requests and events that schema 10 moved into the journal.
        db.execute_batch(&format!(
            "DROP TABLE event_epoch; DELETE FROM journal WHERE kind = 1;
             {}
             PRAGMA user_version = 7;",
            crate::support::TABLES_BEFORE_THE_JOURNAL
        ))
        .unwrap();
        for (i, (kind, body)) in bodies.iter().enumerate() {
            let seq = 10 + i as i64;
            let key_json = serde_json::to_string(&key).unwrap();
            let row = format!(
                r#"{{"key_id":{key_json},"seq":{seq},"event":{{"kind":"{kind}","body":{body},"created_ms":{now}}}}}"#
            );
            db.execute(
                "INSERT INTO events (key_id, seq, data) VALUES (?1, ?2, ?3)",
                rusqlite::params![key, seq, row],
            )
            .unwrap();
        }
    });
    assert!(
        d.wait_log(
            "migrated database schema to version 8",
            Duration::from_secs(5)
        ),
        "{}",
        d.logs().join("\n")
    );
    let mut groups: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for (kind, body) in bodies {
        groups.entry(kind).or_default().push(body);
    }
    let want: Vec<String> = groups
        .iter()
        .map(|(kind, entries)| format!("\"{kind}\":[{}]", entries.join(",")))
        .collect();
    let r = d.get("/v2/notification/pull?noWait=true");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, format!("{{{}}}", want.join(",")));
    // A new event for the key comes after them and the next pull acknowledges only the
    // migrated ones.
    d.device().register(&["ep=after"], "</3/0>");
    let next = d.collect_events(Duration::from_secs(10), |e| {
        e.0.contains_key("registrations")
    });
    assert_eq!(next.0["registrations"][0]["ep"], "after", "{next:?}");
    assert_eq!(
        next.0.len(),
        1,
        "the migrated events were acknowledged: {next:?}"
    );
}

/// Schema 9 (issue 21): the release before's database (the fixture, schema 6) gains the
/// device-credential tables on the way up; credentials provisioned on it are kept across
/// a restart; its endpoint, registered over plain CoAP, ends when its PSK is provisioned
/// (it must register again with the credentials) and stays ended across the restart.
#[test]
fn the_release_before_gains_device_credentials() {
    let d = Daemon::start().stop_edit_restart(install_fixture);
    d.expect_log(
        "migrated database schema to version 9",
        Duration::from_secs(5),
    );
    assert_eq!(
        d.get("/v2/device-credentials").json(),
        serde_json::json!([])
    );
    let r = d.send_json(
        "PUT",
        "/v2/device-credentials/fx-000000",
        r#"{"psk_identity": "fx-id", "psk": "000102030405060708090a0b0c0d0e0f"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(d.get("/v2/endpoints/fx-000000").status, 404);
    let d = d.stop_and_restart();
    assert_eq!(
        d.get("/v2/device-credentials/fx-000000").json()["psk_identity"],
        "fx-id"
    );
    assert_eq!(d.get("/v2/endpoints/fx-000000").status, 404);
    let db = rusqlite::Connection::open_with_flags(
        d.state_dir().join("connectord.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let version: i64 = db
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    // Schema 10 (the journal of requests and events) followed.
    assert_eq!(version, 10);
}
