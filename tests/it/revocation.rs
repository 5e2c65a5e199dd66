//! Issue 18, items 2 and 3: a key minted by another key (`POST /api/api_tokens`) dies with
//! its creator, in any backend and transitively, also after a restart; Connector keys can
//! be deleted (`DELETE /api/api_tokens/{id}`); keys holding `keys:write` may create keys,
//! never with a scope, domain or restriction beyond their own; a revoked key's callback
//! stops receiving events.

use crate::support;

use std::time::Duration;

use serde_json::{Value, json};
use support::receiver::Receiver;
use support::{Daemon, Prepared};

const WAIT: Duration = Duration::from_secs(10);

const PELION: &str = "[plugins]\nauth = [\"connector\", \"pelion\"]\n";

use support::bearer_call as call;

/// The status of a read with `key`.
fn read(d: &Daemon, key: &str) -> u16 {
    call(d, "GET", "/v2/endpoints", Some(key), None).status
}

/// Creates a Connector key with `key`; returns (id, secret).
fn mint(d: &Daemon, key: &str, body: &Value) -> (String, String) {
    let r = call(d, "POST", "/api/api_tokens", Some(key), Some(body));
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    (
        v["id"].as_str().expect("id").to_string(),
        v["access_key"].as_str().expect("access_key").to_string(),
    )
}

/// A Pelion user (created by the operator), as (id, token).
fn pelion_user(
    p: &Prepared,
    name: &str,
    permissions: &[&str],
    scopes: &[&str],
) -> (String, String) {
    let v = p.plugin_call(
        "pelion",
        "create_user",
        &json!({"name": name, "domain": "default", "permissions": permissions, "scopes": scopes}),
    );
    (
        v["id"].as_str().unwrap().to_string(),
        v["token"].as_str().unwrap().to_string(),
    )
}

/// An application of the user and an access key in it, as (app id, key id, secret).
fn pelion_key(d: &Daemon, user_token: &str, scopes: &[&str]) -> (String, String, String) {
    let app = format!("app-{}", rand_suffix());
    let key = json!({"name": "k", "scopes": scopes});
    support::pelion::app_and_key(d, user_token, &app, &key)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

const KEY_PERMISSIONS: [&str; 5] = [
    "view_applications",
    "create_application",
    "revoke_application",
    "create_access_keys_any_application",
    "revoke_access_keys_any_application",
];

/// The issue's scenario: a Pelion access key with `admin` creates a Connector key; revoking
/// the Pelion key, revoking its application, or deleting its user makes that Connector key
/// (and a key it minted in turn) 401, and a restart does not revive them.
#[test]
fn a_key_minted_by_a_pelion_key_dies_with_the_key_its_application_and_its_user() {
    let p = Prepared::new("", PELION);
    // Deleting a user needs all of its permissions and scopes.
    let mut all = KEY_PERMISSIONS.to_vec();
    all.push("manage_users");
    let (_, manager) = pelion_user(&p, "manager", &all, &["admin"]);
    let (_, owner) = pelion_user(&p, "owner", &KEY_PERMISSIONS, &["admin"]);
    let (doomed_id, doomed) = pelion_user(&p, "doomed", &KEY_PERMISSIONS, &["admin"]);
    let d = p.start();

    // Three Pelion admin keys, each minting a Connector key, which mints another.
    let (app_a, key_a, pelion_a) = pelion_key(&d, &owner, &["admin"]);
    let (app_b, _, pelion_b) = pelion_key(&d, &owner, &["admin"]);
    let (_, _, pelion_c) = pelion_key(&d, &doomed, &["admin"]);
    let mut minted = Vec::new();
    for pelion in [&pelion_a, &pelion_b, &pelion_c] {
        let (_, child) = mint(
            &d,
            pelion,
            &json!({"name": "child", "scopes": ["endpoints:read", "keys:write"]}),
        );
        let (_, grandchild) = mint(&d, &child, &json!({"name": "grandchild"}));
        assert_eq!(read(&d, &child), 200);
        assert_eq!(read(&d, &grandchild), 200);
        minted.push((child, grandchild));
    }
    // A key the bootstrap admin minted, untouched by all of this.
    let (_, bystander) = mint(&d, &d.key, &json!({"name": "bystander"}));

    // 1. Revoke the Pelion key itself.
    let key = format!("/pelion/v1/applications/{app_a}/access-keys/{key_a}");
    let r = support::pelion::revoke(&d, &owner, &key);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(read(&d, &pelion_a), 401);
    assert_eq!(
        read(&d, &minted[0].0),
        401,
        "the key minted by a revoked key"
    );
    assert_eq!(read(&d, &minted[0].1), 401, "a key minted by that one");
    assert_eq!(read(&d, &minted[1].0), 200);

    // 2. Revoke the application of the second Pelion key.
    let r = support::pelion::revoke(&d, &owner, &format!("/pelion/v1/applications/{app_b}"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(read(&d, &pelion_b), 401);
    assert_eq!(read(&d, &minted[1].0), 401);
    assert_eq!(read(&d, &minted[1].1), 401);
    assert_eq!(read(&d, &minted[2].0), 200);

    // 3. Delete the user owning the third Pelion key.
    let doomed_user = call(&d, "GET", "/pelion/v1/me", Some(&doomed), None).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(doomed_user, doomed_id);
    let r = call(
        &d,
        "DELETE",
        &format!("/pelion/v1/users/{doomed_id}"),
        Some(&manager),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(read(&d, &pelion_c), 401);
    assert_eq!(read(&d, &minted[2].0), 401);
    assert_eq!(read(&d, &minted[2].1), 401);
    assert_eq!(read(&d, &bystander), 200);

    // A restart revives none of them.
    let d = d.stop_and_restart();
    for (child, grandchild) in &minted {
        assert_eq!(read(&d, child), 401);
        assert_eq!(read(&d, grandchild), 401);
    }
    assert_eq!(read(&d, &bystander), 200);
}

/// `DELETE /api/api_tokens/{id}`: 204, the key and every key it minted (a chain of 3) stop
/// working, also after a restart; 404 for an unknown id or a key of another domain; a
/// non-admin key deletes only keys it minted (and itself).
#[test]
fn connector_keys_are_deleted_with_everything_they_minted() {
    let p = Prepared::new("", "");
    let admin_of = |domain: &str| {
        p.plugin_call_str(
            "connector",
            "create_key",
            &json!({"name": "admin", "domain": domain, "scopes": ["admin"]}),
            "access_key",
        )
    };
    let (admin, other_admin) = (admin_of("default"), admin_of("other"));
    let d = p.start();
    let manage = json!({"name": "m", "scopes": ["endpoints:read", "keys:write"]});
    let (a_id, a) = mint(&d, &admin, &manage);
    let (b_id, b) = mint(&d, &a, &manage);
    let (c_id, c) = mint(&d, &b, &manage);
    let (sibling_id, sibling) = mint(&d, &admin, &manage);
    for k in [&a, &b, &c, &sibling] {
        assert_eq!(read(&d, k), 200);
    }

    // GET lists the keys the caller may delete: an admin every key of its domain, another
    // key itself and what it minted, directly or not.
    let list = |key: &str| -> Vec<String> {
        let r = call(&d, "GET", "/api/api_tokens", Some(key), None);
        assert_eq!(r.status, 200, "{}", r.body);
        support::strings_of(&r.json(), "id")
    };
    let all = list(&admin);
    for id in [&a_id, &b_id, &c_id, &sibling_id] {
        assert!(all.contains(id), "{all:?}");
    }
    assert_eq!(all.len(), 5, "the admin itself too: {all:?}");
    let mut of_b = list(&b);
    of_b.sort();
    let mut want = vec![b_id.clone(), c_id.clone()];
    want.sort();
    assert_eq!(of_b, want);
    assert_eq!(list(&other_admin).len(), 1, "only its own domain");
    let listed = call(&d, "GET", "/api/api_tokens", Some(&admin), None).json();
    let c_entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == c_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        c_entry["created_by"],
        json!({"backend": "connector", "key_id": b_id})
    );
    assert_eq!(c_entry["scopes"], json!(["endpoints:read", "keys:write"]));
    assert!(c_entry.get("access_key").is_none(), "never the secret");

    let delete = |key: &str, id: &str| {
        call(
            &d,
            "DELETE",
            &format!("/api/api_tokens/{id}"),
            Some(key),
            None,
        )
    };
    // Unknown, and another domain's key: 404 (that domain's admin sees it, though).
    let r = delete(&admin, "0000000000000000");
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["type"], "not_found");
    assert_eq!(delete(&other_admin, &a_id).status, 404);
    // A non-admin key may not delete a key it did not mint.
    let r = delete(&b, &sibling_id);
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(read(&d, &sibling), 200);
    let r = delete(&c, &b_id);
    assert_eq!(r.status, 403, "{}", r.body);
    // A key without keys:write may not delete at all.
    let (_, reader) = mint(
        &d,
        &admin,
        &json!({"name": "r", "scopes": ["endpoints:read"]}),
    );
    assert_eq!(delete(&reader, &c_id).status, 403);

    // The sibling deletes itself.
    assert_eq!(delete(&sibling, &sibling_id).status, 204);
    assert_eq!(read(&d, &sibling), 401);

    // Deleting the head of the chain takes the rest with it.
    let r = delete(&admin, &a_id);
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(r.body.is_empty());
    for k in [&a, &b, &c] {
        assert_eq!(read(&d, k), 401);
    }
    assert_eq!(delete(&admin, &a_id).status, 404, "already gone");
    assert_eq!(delete(&admin, &c_id).status, 404, "gone with its creator");

    let d = d.stop_and_restart();
    for k in [&a, &b, &c, &sibling] {
        assert_eq!(read(&d, k), 401);
    }
    assert_eq!(read(&d, &reader), 200);
    assert_eq!(read(&d, &admin), 200);
}

/// Item 3: a key holding `keys:write` (not admin) creates keys, narrower or equal, never
/// wider: a scope, a domain or an `allow` pattern beyond its own is 403 naming it. A key
/// without `keys:write` creates none; admin keys still create keys as before.
#[test]
fn key_creation_never_grants_more_than_the_creator_holds() {
    let d = Daemon::start();
    let admin = d.key.clone();
    // As before: admin, no body → every data scope (and not keys:write).
    let (_, plain) = mint(&d, &admin, &json!({}));
    assert_eq!(read(&d, &plain), 200);
    let r = call(&d, "POST", "/api/api_tokens", Some(&plain), None);
    assert_eq!(r.status, 403, "{}", r.body);

    let (_, manager) = mint(
        &d,
        &admin,
        &json!({"name": "mgr", "scopes": ["endpoints:read", "resources:read", "keys:write"], "allow": ["sensor-*"]}),
    );
    let refused: [(Value, &str); 5] = [
        (json!({"scopes": ["resources:write"]}), "resources:write"),
        (json!({"scopes": ["admin"]}), "admin"),
        (
            json!({"scopes": ["endpoints:read"], "allow": ["*"]}),
            "refused: \"*\"",
        ),
        (json!({"allow": ["sensor-*", "lamp-*"]}), "lamp-*"),
        (json!({"domain": "other"}), "other"),
    ];
    for (body, named) in refused {
        let r = call(&d, "POST", "/api/api_tokens", Some(&manager), Some(&body));
        assert_eq!(r.status, 403, "{body}: {}", r.body);
        let message = r.json()["message"].as_str().unwrap().to_string();
        assert!(message.contains(named), "{body}: {message}");
    }
    let r = call(
        &d,
        "POST",
        "/api/api_tokens",
        Some(&manager),
        Some(&json!({"scopes": ["nonsense"]})),
    );
    assert_eq!(r.status, 400, "{}", r.body);

    // Narrower: a reader of sensor endpoints only.
    let (_, narrow) = mint(
        &d,
        &manager,
        &json!({"name": "n", "scopes": ["endpoints:read"]}),
    );
    d.device().register(&["ep=sensor-1", "lt=300"], "</3/0>");
    d.device().register(&["ep=lamp-1", "lt=300"], "</3/0>");
    let eps = call(&d, "GET", "/v2/endpoints", Some(&narrow), None);
    assert_eq!(eps.status, 200);
    let names: Vec<String> = support::strings_of(&eps.json(), "name");
    assert_eq!(
        names,
        vec!["sensor-1".to_string()],
        "the creator's allow is inherited"
    );
    assert_eq!(
        call(
            &d,
            "GET",
            "/v2/endpoints/sensor-1/3/0/0",
            Some(&narrow),
            None
        )
        .status,
        403,
        "resources:read was not granted"
    );
    let r = call(&d, "POST", "/api/api_tokens", Some(&narrow), None);
    assert_eq!(r.status, 403, "keys:write was not granted");
    // Equal is fine too.
    let (_, same) = mint(
        &d,
        &manager,
        &json!({"scopes": ["endpoints:read", "resources:read", "keys:write"], "allow": ["sensor-*"]}),
    );
    assert_eq!(read(&d, &same), 200);
}

/// A revoked key's callback receives nothing more: the host drops its channel, callback
/// and subscriptions when a state change revokes it (here: its creator's deletion).
#[test]
fn a_revoked_keys_callback_stops_receiving_events() {
    let d = Daemon::start();
    let admin = d.key.clone();
    let manage = json!({"name": "m", "scopes": ["endpoints:read", "notifications", "keys:write"]});
    let (parent_id, parent) = mint(&d, &admin, &manage);
    let (_, child) = mint(&d, &parent, &json!({"name": "c"}));
    let (gone_rx, kept_rx) = (Receiver::start(0), Receiver::start(0));
    for (key, rx) in [(&child, &gone_rx), (&admin, &kept_rx)] {
        let r = call(
            &d,
            "PUT",
            "/v2/notification/callback",
            Some(key),
            Some(&json!({"url": rx.url("/cb")})),
        );
        assert_eq!(r.status, 204, "{}", r.body);
    }
    d.device().register(&["ep=first", "lt=300"], "</3/0>");
    assert!(
        gone_rx.wait(WAIT, |r| r.len() >= 2).len() >= 2,
        "first delivery"
    );
    assert!(
        kept_rx.wait(WAIT, |r| r.len() >= 2).len() >= 2,
        "first delivery"
    );

    let r = call(
        &d,
        "DELETE",
        &format!("/api/api_tokens/{parent_id}"),
        Some(&admin),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(read(&d, &child), 401);

    d.device().register(&["ep=second", "lt=300"], "</3/0>");
    let kept = kept_rx.wait(WAIT, |r| r.iter().any(|x| x.body.contains("second")));
    assert!(kept.iter().any(|x| x.body.contains("second")), "{kept:?}");
    // The events of one registration reach every channel in one fan-out: had the revoked
    // key's channel been kept, it would have been given them by now too.
    d.device().register(&["ep=third", "lt=300"], "</3/0>");
    let kept = kept_rx.wait(WAIT, |r| r.iter().any(|x| x.body.contains("third")));
    assert!(kept.iter().any(|x| x.body.contains("third")), "{kept:?}");
    let gone = gone_rx.requests();
    assert!(
        !gone
            .iter()
            .any(|x| x.body.contains("second") || x.body.contains("third")),
        "the revoked key's callback got events: {gone:?}"
    );

    // Nor after a restart, while the kept callback still is.
    let d = d.stop_and_restart();
    for ep in ["fourth", "fifth"] {
        d.device()
            .register(&[&format!("ep={ep}"), "lt=300"], "</3/0>");
        let kept = kept_rx.wait(WAIT, |r| r.iter().any(|x| x.body.contains(ep)));
        assert!(kept.iter().any(|x| x.body.contains(ep)), "{kept:?}");
    }
    let gone = gone_rx.requests();
    assert!(
        !gone
            .iter()
            .any(|x| x.body.contains("fourth") || x.body.contains("fifth")),
        "the revoked key's callback got events after a restart: {gone:?}"
    );
}

/// A key deleted by another process (`connectord plugin-call`, writing the state database
/// while the daemon runs) loses its callback at once: the daemon loads the plugins again
/// when the database changes and then sweeps the channels, as it does after a route.
#[test]
fn a_key_revoked_by_another_process_loses_its_callback() {
    let d = Daemon::start();
    let admin = d.key.clone();
    let (child_id, child) = mint(&d, &admin, &json!({"name": "c"}));
    let (gone_rx, kept_rx) = (Receiver::start(0), Receiver::start(0));
    for (key, rx) in [(&child, &gone_rx), (&admin, &kept_rx)] {
        let r = call(
            &d,
            "PUT",
            "/v2/notification/callback",
            Some(key),
            Some(&json!({"url": rx.url("/cb")})),
        );
        assert_eq!(r.status, 204, "{}", r.body);
    }
    d.device().register(&["ep=first", "lt=300"], "</3/0>");
    for rx in [&gone_rx, &kept_rx] {
        let got = rx.wait(WAIT, |r| r.iter().any(|x| x.body.contains("first")));
        assert!(got.iter().any(|x| x.body.contains("first")), "{got:?}");
    }

    // The operator deletes the key through the plugin's own route, from another process.
    let request = json!({
        "method": "DELETE",
        "path": format!("/api/api_tokens/{child_id}"),
        "query": null,
        "headers": {},
        "body": "",
        "principal": {"key_id": "operator", "domain": "default", "scopes": ["admin"]},
        "backend": "connector",
    });
    let answer = support::plugin_call(&d.config_path, "connector", "http", &request);
    assert_eq!(answer["status"], 204, "{answer}");
    // Logins stop at once (the plugins are loaded again within about a second)...
    let deadline = std::time::Instant::now() + WAIT;
    while read(&d, &child) != 401 {
        assert!(
            std::time::Instant::now() < deadline,
            "the deleted key still works"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // ...and so do its deliveries: the sweep that follows the reload drops its channel,
    // and the next registrations reach the kept callback only.
    assert!(
        d.wait_log(
            "dropped the notification channels of 1 keys revoked by another process",
            WAIT
        ),
        "no sweep after the other process's write"
    );
    for ep in ["second", "third"] {
        d.device()
            .register(&[&format!("ep={ep}"), "lt=300"], "</3/0>");
        let kept = kept_rx.wait(WAIT, |r| r.iter().any(|x| x.body.contains(ep)));
        assert!(kept.iter().any(|x| x.body.contains(ep)), "{kept:?}");
    }
    let gone = gone_rx.requests();
    assert!(
        !gone
            .iter()
            .any(|x| x.body.contains("second") || x.body.contains("third")),
        "the deleted key's callback got events: {gone:?}"
    );
}

/// The domain's last admin key cannot delete itself over REST (409, naming what to do),
/// and keeps working with every key it made: found by an outside review, whose first
/// admin key deleted itself and took every key of the domain with it. Once an admin key
/// of its own lineage exists (`plugin-call ... create_key`), it can.
#[test]
fn the_last_admin_key_does_not_delete_itself() {
    let d = Daemon::start();
    let (_, user) = mint(&d, &d.key, &json!({"name": "u"}));
    let list = call(&d, "GET", "/api/api_tokens", Some(&d.key), None);
    let own = list
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "admin")
        .and_then(|k| k["id"].as_str())
        .unwrap_or_else(|| panic!("{}", list.body))
        .to_string();
    let path = format!("/api/api_tokens/{own}");
    let r = call(&d, "DELETE", &path, Some(&d.key), None);
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body.contains("last admin key") && r.body.contains("create_key"),
        "{}",
        r.body
    );
    assert_eq!(read(&d, &d.key), 200);
    assert_eq!(read(&d, &user), 200);
    support::plugin_call(
        &d.config_path,
        "connector",
        "create_key",
        &json!({"name": "admin2", "domain": "default", "scopes": ["admin"]}),
    );
    // The running daemon takes the new key within a second (the plugin state's watch).
    assert!(
        support::eventually(Duration::from_secs(5), || {
            call(&d, "DELETE", &path, Some(&d.key), None).status == 204
        }),
        "the first admin key could not be deleted with another admin key beside it"
    );
    assert_eq!(read(&d, &user), 401, "what it made goes with it");
}
