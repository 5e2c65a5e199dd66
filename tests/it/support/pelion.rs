//! The Pelion backend's own API (`/pelion/v1`), for the tests that make its applications
//! and access keys.

use super::{Http, bearer_call};
use serde_json::{Value, json};

/// Creates an application `app_name` of the user with `user_token` and an access key in it
/// (`key`: the key's JSON body); returns (application id, key id, secret).
pub fn app_and_key(
    d: &connectord_testkit::Daemon,
    user_token: &str,
    app_name: &str,
    key: &Value,
) -> (String, String, String) {
    let app = bearer_call(
        d,
        "POST",
        "/pelion/v1/applications",
        Some(user_token),
        Some(&json!({"name": app_name})),
    );
    assert_eq!(app.status, 201, "{}", app.body);
    let app_id = app.json()["id"].as_str().unwrap().to_string();
    let keys = format!("/pelion/v1/applications/{app_id}/access-keys");
    let k = bearer_call(d, "POST", &keys, Some(user_token), Some(key));
    assert_eq!(k.status, 201, "{}", k.body);
    let v = k.json();
    (
        app_id,
        v["id"].as_str().unwrap().to_string(),
        v["access_key"].as_str().unwrap().to_string(),
    )
}

/// `PATCH {path}` `{"status": "revoked"}` (an application, or an access key under it) as
/// the user with `user_token`.
pub fn revoke(d: &connectord_testkit::Daemon, user_token: &str, path: &str) -> Http {
    let revoked = json!({"status": "revoked"});
    bearer_call(d, "PATCH", path, Some(user_token), Some(&revoked))
}
