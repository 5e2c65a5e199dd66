//! A store that fails while the daemon runs (issue 19, item 1: phantom registrations).
//! The state directory is a small ext4 image, loop-mounted, that the test fills to the
//! last block: SQLite's next write (a WAL frame) then fails with "database or disk is
//! full", the real thing. Nothing of a refused change may stay in memory: not listed,
//! not readable, not counted; once the space is given back, the same request succeeds.
//!
//! Needs root and loop devices (CI runs as root); elsewhere the tests say so and pass.

use crate::support;

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use coap_lite::{ContentFormat, RequestType, ResponseType};
use serde_json::json;
use support::coap::{Req, code, diag, location};
use support::receiver::Receiver;
use support::{Daemon, Prepared};

const LINKS: &str = r#"</3/0>,</3303/0/5700>;obs,</3304/0/5700>;obs"#;
const WAIT: Duration = Duration::from_secs(10);

/// A loop-mounted ext4 image on the test's state directory; unmounted when dropped
/// (after the daemon, which is declared after it).
struct Mounted {
    state: PathBuf,
    image: PathBuf,
    /// Keeps the temporary directory (image and mount point) until the unmount.
    _dir: Arc<tempfile::TempDir>,
}

impl Mounted {
    /// Mounts a fresh 16 MiB ext4 image (no blocks reserved for root) on `<dir>/state`;
    /// None when this machine cannot (not root, no loop device).
    fn new(p: &Prepared) -> Option<Mounted> {
        let root = Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&root.stdout).trim() != "0" {
            return None;
        }
        let dir = p.dir.path();
        let image = dir.join("state.img");
        let state = dir.join("state");
        std::fs::create_dir_all(&state).ok()?;
        std::fs::File::create(&image).ok()?.set_len(16 << 20).ok()?;
        let ok = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
        if !ok(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&image))
        {
            return None;
        }
        if !ok(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&state))
        {
            return None;
        }
        Some(Mounted {
            state,
            image,
            _dir: Arc::clone(&p.dir),
        })
    }

    /// Takes every free block of the file system.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.filler()).unwrap();
        for chunk in [1 << 20, 4096, 512] {
            let buf = vec![0u8; chunk];
            while f.write_all(&buf).is_ok() {}
        }
        let _ = f.sync_all();
        // What is still free (a partial block) cannot hold a WAL frame.
        let mut f = std::fs::File::create(self.state.join("fill-tail")).unwrap();
        while f.write_all(&[0u8; 512]).is_ok() {}
    }

    /// Gives the space back.
    fn free(&self) {
        let _ = std::fs::remove_file(self.filler());
        let _ = std::fs::remove_file(self.state.join("fill-tail"));
        let _ = Command::new("sync").arg("-f").arg(&self.state).status();
    }

    fn filler(&self) -> PathBuf {
        self.state.join("filler")
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // Lazy: also when the daemon still has its files open (a test that panicked).
        let _ = Command::new("umount").arg("-l").arg(&self.state).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// The daemon on a loop-mounted state directory, or None (the test is skipped) when the
/// machine cannot mount one because the tests do not run as root. As root (which CI is)
/// a failure to mount fails the test, so that these tests never pass there without running.
fn start() -> Option<(Mounted, Daemon)> {
    let p = Prepared::new("", "");
    let Some(m) = Mounted::new(&p) else {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        assert!(
            !root,
            "running as root, but a small file system could not be loop-mounted (is there a loop device?)"
        );
        eprintln!("skipped: needs root and a loop device to mount a small file system");
        return None;
    };
    let d = p.start();
    Some((m, d))
}

fn register(dev: &mut support::coap::Device, name: &str) -> (ResponseType, String, String) {
    register_lt(dev, name, 300)
}

fn register_lt(
    dev: &mut support::coap::Device,
    name: &str,
    lt: u32,
) -> (ResponseType, String, String) {
    let q = format!("ep={name}");
    let lt = format!("lt={lt}");
    let query = [q.as_str(), lt.as_str()];
    let mut r = Req::new(RequestType::Post, &["rd"]);
    r.query = &query;
    r.payload = LINKS.as_bytes();
    r.content_format = Some(ContentFormat::ApplicationLinkFormat);
    let resp = dev.request(&r);
    let loc = if code(&resp) == ResponseType::Created {
        location(&resp)
    } else {
        String::new()
    };
    (code(&resp), diag(&resp), loc)
}

fn names(d: &Daemon) -> Vec<String> {
    let r = d.get("/v2/endpoints");
    assert_eq!(r.status, 200, "{}", r.body);
    support::strings_of(&r.json(), "name")
}

fn assert_refused_coap(what: &str, c: ResponseType) {
    assert!(
        matches!(
            c,
            ResponseType::InternalServerError | ResponseType::ServiceUnavailable
        ),
        "{what} the store refused was answered {c:?}"
    );
}

/// The daemon with "kept" registered (its registration id), on a full file system.
fn full_with_kept() -> Option<(Mounted, Daemon, support::coap::Device, String)> {
    let (disk, d) = start()?;
    let mut dev = d.device();
    let (c, m, id) = register(&mut dev, "kept");
    assert_eq!(c, ResponseType::Created, "{m}");
    disk.fill();
    Some((disk, d, dev, id))
}

/// Runs `test` on the daemon with "kept" registered (its registration id) on a full file
/// system, then stops the daemon before the file system goes; nothing where no file
/// system can be mounted.
fn on_full_with_kept(test: impl FnOnce(&Mounted, &Daemon, &mut support::coap::Device, &str)) {
    let Some((disk, d, mut dev, id)) = full_with_kept() else {
        return;
    };
    test(&disk, &d, &mut dev, &id);
    drop(d);
    drop(disk);
}

/// A registration the store could not write is not listed, readable or counted; a
/// re-registration of a registered name leaves the registration on disk in force.
#[test]
fn a_registration_the_store_refused_is_not_kept() {
    on_full_with_kept(|disk, d, dev, id| {
        let registered = d.metric("registrations_total");
        let mut other = d.device();
        let (c, m, _) = register(&mut other, "phantom");
        assert_refused_coap(&format!("a registration ({m})"), c);
        assert_eq!(names(d), ["kept"], "a refused registration is listed");
        assert_eq!(d.get("/v2/endpoints/phantom").status, 404);
        assert_eq!(d.metric("registrations_total"), registered);
        assert_eq!(d.metric("registered_endpoints"), 1);
        // A full re-registration of "kept": refused, the stored one (its id) stays.
        let (c, m, _) = register(dev, "kept");
        assert_refused_coap(&format!("a re-registration ({m})"), c);
        assert_eq!(names(d), ["kept"]);

        disk.free();
        assert_eq!(
            dev.update(id, &[], None),
            ResponseType::Changed,
            "the registration on disk was lost by a refused re-registration"
        );
        let (c, m, _) = register(&mut other, "phantom");
        assert_eq!(c, ResponseType::Created, "retry: {m}");
        assert_eq!(names(d), ["kept", "phantom"]);
        assert_eq!(d.metric("registrations_total"), registered + 1);
    });
}

/// An update the store could not write changes nothing: the old object list stays.
#[test]
fn an_update_the_store_refused_is_not_kept() {
    on_full_with_kept(|disk, d, dev, id| {
        let c = dev.update(id, &[], Some(r#"</3/0>,</5/0>"#));
        assert_refused_coap("an update", c);
        let paths = |d: &Daemon| -> Vec<String> {
            support::strings_of(&d.get("/v2/endpoints/kept").json(), "uri")
        };
        let shown = paths(d);
        assert!(
            shown.iter().any(|p| p == "/3303/0/5700") && !shown.iter().any(|p| p == "/5/0"),
            "a refused update's object list is shown: {shown:?}"
        );

        disk.free();
        assert_eq!(
            dev.update(id, &[], Some(r#"</3/0>,</5/0>"#)),
            ResponseType::Changed
        );
        assert!(paths(d).iter().any(|p| p == "/5/0"));
    });
}

/// A de-registration (by the device or `DELETE /endpoints/{ep}`) the store could not
/// write leaves the endpoint registered: it is still on disk.
#[test]
fn a_deregistration_the_store_refused_is_not_kept() {
    on_full_with_kept(|disk, d, dev, id| {
        assert_refused_coap("a de-registration", dev.deregister(id));
        assert_eq!(names(d), ["kept"], "a refused de-registration removed it");
        let r = d.call("DELETE", "/v2/endpoints/kept", None, None);
        assert!(
            r.status == 500 || r.status == 503,
            "DELETE /endpoints answered {}",
            r.status
        );
        assert_eq!(names(d), ["kept"], "a refused DELETE removed the endpoint");

        disk.free();
        assert_eq!(dev.deregister(id), ResponseType::Deleted);
        assert!(names(d).is_empty());
    });
}

/// An expiry the store could not write leaves the endpoint registered (it is on disk,
/// and a restart would load it); it expires once the store can remove it.
#[test]
fn an_expiry_the_store_refused_is_not_kept() {
    let Some((disk, d)) = start() else { return };
    let mut dev = d.device();
    let (c, m, _) = register_lt(&mut dev, "brief", 2);
    assert_eq!(c, ResponseType::Created, "{m}");
    disk.fill();
    d.expect_log(
        "cannot remove an expired registration",
        Duration::from_secs(20),
    );
    assert_eq!(
        names(&d),
        ["brief"],
        "a refused expiry removed the endpoint"
    );
    assert_eq!(d.metric("registrations_expired_total"), 0);

    disk.free();
    assert!(
        support::eventually(Duration::from_secs(20), || names(&d).is_empty()),
        "not expired once the store works again"
    );
    // Counted once the store answered the removal, which may come just after the list
    // stopped showing it.
    assert!(
        support::eventually(Duration::from_secs(5), || {
            d.metric("registrations_expired_total") == 1
        }),
        "expired {} times",
        d.metric("registrations_expired_total")
    );
    drop(d);
    drop(disk);
}

/// A started daemon with device "dev" registered and the admin key's pre-subscription
/// rules set (which makes its channel), on a file system that is then filled.
struct Full {
    /// Before `disk`: the daemon ends before the file system is unmounted.
    d: Daemon,
    disk: Mounted,
    rules: serde_json::Value,
}

impl Full {
    fn new() -> Option<Full> {
        let (disk, d) = start()?;
        let mut dev = d.device();
        let (c, m, _) = register(&mut dev, "dev");
        assert_eq!(c, ResponseType::Created, "{m}");
        let rules = json!([{"endpoint-name": "dev", "resource-path": ["/3304/0/5700"]}]);
        let r = put_json(&d, "/v2/subscriptions", &rules);
        assert_eq!(r.status, 204, "{}", r.body);
        disk.fill();
        Some(Full { disk, d, rules })
    }
}

fn put_json(d: &Daemon, path: &str, body: &serde_json::Value) -> support::Http {
    d.send_json("PUT", path, body.to_string())
}

/// A REST change the store refused is an error (500 until the store's failures become
/// 503 in general), not a success.
fn assert_refused(what: &str, r: &support::Http) {
    assert!(
        r.status == 500 || r.status == 503,
        "{what} the store refused was answered {}: {}",
        r.status,
        r.body
    );
}

#[test]
fn a_subscription_the_store_refused_is_not_kept() {
    let Some(f) = Full::new() else { return };
    let d = &f.d;
    let r = d.call("PUT", "/v2/subscriptions/dev/3303/0/5700", None, None);
    assert_refused("a subscription", &r);
    assert_eq!(d.get("/v2/subscriptions/dev/3303/0/5700").status, 404);
    let listed = d.get("/v2/subscriptions/dev");
    assert!(
        !listed.body.contains("/3303/0/5700"),
        "a refused subscription is listed: {}",
        listed.body
    );

    f.disk.free();
    let r = d.call("PUT", "/v2/subscriptions/dev/3303/0/5700", None, None);
    assert!(r.status == 202 || r.status == 200, "{}", r.body);
    assert_eq!(d.get("/v2/subscriptions/dev/3303/0/5700").status, 200);
}

/// A subscription whose store write fails is not reported to a concurrent call of the
/// same key as existing. The resource is observed already (for another key), so the
/// second call needs no store write of its own: before, it found the first call's
/// subscription in memory and answered 200, and the first call's failed write then took
/// the subscription out again. Now it waits for that write, and then tries its own.
#[test]
fn a_subscription_whose_store_write_fails_is_not_shown_to_a_concurrent_call() {
    let Some((disk, d)) = start() else { return };
    let mut dev = d.device();
    let (c, m, _) = register(&mut dev, "dev");
    assert_eq!(c, ResponseType::Created, "{m}");
    // The admin key observes /3304/0/5700.
    let r = d.call("PUT", "/v2/subscriptions/dev/3304/0/5700", None, None);
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["async-response-id"].as_str().unwrap().to_string();
    support::answer_observe(&dev, WAIT, b"20");
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);
    // A second key, with its channel (made by a first subscription).
    let r = d.send_json("POST", "/api/api_tokens", json!({"name": "k2"}).to_string());
    assert_eq!(r.status, 201, "{}", r.body);
    let auth = format!("Bearer {}", r.json()["access_key"].as_str().unwrap());
    let call = |method: &str, path: &str| {
        support::http(method, &d.url(path), &[("Authorization", &auth)], None)
    };
    let r = call("PUT", "/v2/subscriptions/dev/3303/0/5700");
    assert_eq!(r.status, 202, "{}", r.body);

    disk.fill();
    for round in 0..5 {
        let path = "/v2/subscriptions/dev/3304/0/5700";
        let answers = support::at_once(2, |_| call("PUT", path));
        for r in &answers {
            assert_refused(&format!("round {round}: a subscription"), r);
        }
        let r = call("GET", path);
        assert_eq!(r.status, 404, "round {round}: {}", r.body);
    }
}

#[test]
fn pre_subscriptions_the_store_refused_are_not_kept() {
    let Some(f) = Full::new() else { return };
    let d = &f.d;
    let new_rules = json!([{"endpoint-name": "other"}]);
    let r = put_json(d, "/v2/subscriptions", &new_rules);
    assert_refused("a pre-subscription", &r);
    assert_eq!(
        d.get("/v2/subscriptions").json(),
        f.rules,
        "refused rules replaced the stored ones"
    );

    f.disk.free();
    let r = put_json(d, "/v2/subscriptions", &new_rules);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(d.get("/v2/subscriptions").json(), new_rules);
}

#[test]
fn a_callback_the_store_refused_is_not_kept() {
    let Some(f) = Full::new() else { return };
    let d = &f.d;
    let rx = Receiver::start(0);
    let cb = json!({"url": rx.url("/notify")});
    let r = put_json(d, "/v2/notification/callback", &cb);
    assert_refused("a callback", &r);
    assert_eq!(d.get("/v2/notification/callback").status, 404);
    assert_eq!(
        d.get("/v2/notification/pull?noWait=true").status,
        204,
        "long-poll is off as if a callback were set"
    );

    f.disk.free();
    let r = put_json(d, "/v2/notification/callback", &cb);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(d.get("/v2/notification/callback").json()["url"], cb["url"]);
}

/// Already right before issue 19 (the connector plugin writes its state, then its
/// memory): kept so that it stays so.
#[test]
fn an_access_key_the_store_refused_is_not_kept() {
    let Some(f) = Full::new() else { return };
    let d = &f.d;
    let body = json!({"name": "phantom-key"});
    let r = d.send_json("POST", "/api/api_tokens", body.to_string());
    assert_refused("a new key", &r);
    let listed = d.get("/api/api_tokens");
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert!(
        !listed.body.contains("phantom-key"),
        "a refused key is listed: {}",
        listed.body
    );

    f.disk.free();
    let r = d.send_json("POST", "/api/api_tokens", body.to_string());
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(d.get("/api/api_tokens").body.contains("phantom-key"));
}

/// A key's notification channel whose creation the store refused is not kept: events
/// would be queued for it (and shown) that a restart, which loads no such channel, loses.
/// Its first request that the store accepts makes it, and events are kept from then on.
#[test]
fn a_channel_the_store_refused_is_not_kept() {
    let Some(f) = Full::new() else { return };
    let d = &f.d;
    f.disk.free();
    let made = d.send_json(
        "POST",
        "/api/api_tokens",
        json!({"name": "second", "scopes": ["admin"]}).to_string(),
    );
    assert_eq!(made.status, 201, "{}", made.body);
    let second = made.json()["access_key"].as_str().unwrap().to_string();
    let bearer = format!("Bearer {second}");
    f.disk.fill();
    // The second key's first request that needs a channel: refused.
    let r = support::http(
        "PUT",
        &d.url("/v2/subscriptions/dev/3303/0/5700"),
        &[("Authorization", bearer.as_str())],
        None,
    );
    assert_refused("a subscription (and the channel it makes)", &r);

    f.disk.free();
    // A registration now: the second key has no channel, so nothing is kept for it.
    let mut other = d.device();
    let (c, m, _) = register(&mut other, "later");
    assert_eq!(c, ResponseType::Created, "{m}");
    let pull = support::http(
        "GET",
        &d.url("/v2/notification/pull?noWait=true"),
        &[("Authorization", bearer.as_str())],
        None,
    );
    assert_eq!(
        pull.status, 204,
        "events were queued in a channel the store refused: {}",
        pull.body
    );
    // The pull made the channel: events are kept from now on.
    let mut third = d.device();
    let (c, m, _) = register(&mut third, "third");
    assert_eq!(c, ResponseType::Created, "{m}");
    assert!(support::eventually(Duration::from_secs(10), || {
        let r = support::http(
            "GET",
            &d.url("/v2/notification/pull?noWait=true"),
            &[("Authorization", bearer.as_str())],
            None,
        );
        r.status == 200 && r.body.contains("third")
    }));
}

/// Unsubscribing (one path, an endpoint, everything) when the store cannot delete leaves
/// the subscriptions in force, as they are on disk.
#[test]
fn an_unsubscription_the_store_refused_is_not_kept() {
    let Some(f) = Full::new() else { return };
    let d = &f.d;
    f.disk.free();
    let r = d.call("PUT", "/v2/subscriptions/dev/3303/0/5700", None, None);
    assert!(r.status == 202 || r.status == 200, "{}", r.body);
    f.disk.fill();
    for path in [
        "/v2/subscriptions/dev/3303/0/5700",
        "/v2/subscriptions/dev",
        "/v2/subscriptions",
    ] {
        delete_refused(d, path, "/v2/subscriptions/dev/3303/0/5700");
    }

    f.disk.free();
    delete_works(d, "/v2/subscriptions/dev/3303/0/5700");
}

/// `DELETE path` while the store cannot write: refused, and `shown` is still there.
fn delete_refused(d: &Daemon, path: &str, shown: &str) {
    let r = d.call("DELETE", path, None, None);
    assert_refused(&format!("DELETE {path}"), &r);
    let after = d.get(shown).status;
    assert_eq!(after, 200, "a refused DELETE {path} removed {shown}");
}

/// `DELETE path` once the store writes again: done (204), and it is gone.
fn delete_works(d: &Daemon, path: &str) {
    let r = d.call("DELETE", path, None, None);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(d.get(path).status, 404);
}

/// Removing the callback when the store cannot write leaves it in force.
#[test]
fn a_callback_removal_the_store_refused_is_not_kept() {
    let Some(f) = Full::new() else { return };
    let d = &f.d;
    f.disk.free();
    let rx = Receiver::start(0);
    let cb = json!({"url": rx.url("/notify")});
    let r = put_json(d, "/v2/notification/callback", &cb);
    assert_eq!(r.status, 204, "{}", r.body);
    f.disk.fill();
    delete_refused(d, "/v2/notification/callback", "/v2/notification/callback");

    f.disk.free();
    delete_works(d, "/v2/notification/callback");
}

/// A CON notification the store could not write is not acknowledged (an acknowledged one
/// must never be lost) and not queued; the device's retransmission, once there is room
/// again, is taken as new: acknowledged, and delivered once. Before, it was acknowledged
/// at once, and only memory held it. A NON notification refused the same way stays
/// queued in memory and is delivered: its device will not send it again.
#[test]
fn a_notification_the_store_refused_is_not_acknowledged() {
    use coap_lite::{MessageType, Packet};
    const WAIT: Duration = Duration::from_secs(10);
    let Some((disk, d)) = start() else {
        return;
    };
    let mut dev = d.device();
    let (c, m, _) = register(&mut dev, "obs");
    assert_eq!(c, ResponseType::Created, "{m}");
    let observe = |path: &str| {
        let id = d.async_request("PUT", &format!("/v2/subscriptions/obs{path}"), None, None);
        let (token, from) = support::answer_observe(&dev, WAIT, b"20");
        assert_eq!(d.async_response(&id, WAIT)["status"], 200);
        (token, from)
    };
    let (con_token, from) = observe("/3303/0/5700");
    let (non_token, _) = observe("/3304/0/5700");

    disk.fill();
    let con = support::observe_content(MessageType::Confirmable, 700, &con_token, 2, b"21");
    support::send_packet(&dev, &con, from);
    assert!(
        d.wait_log("notifications: event not stored", WAIT),
        "{}",
        d.logs().join("\n")
    );
    let refused = d
        .logs()
        .iter()
        .filter(|l| l.contains("notifications: event not stored"))
        .count();
    assert!(
        dev.recv_raw(Duration::from_millis(500)).is_none(),
        "a notification the store refused was acknowledged"
    );
    // Its retransmission while the disk is still full is taken anew (the duplicate cache
    // forgot it), refused again, and not acknowledged either.
    support::send_packet(&dev, &con, from);
    assert!(support::eventually(WAIT, || d
        .logs()
        .iter()
        .filter(|l| l.contains("notifications: event not stored"))
        .count()
        > refused));
    assert!(dev.recv_raw(Duration::from_millis(500)).is_none());
    let refused = d
        .logs()
        .iter()
        .filter(|l| l.contains("notifications: event not stored"))
        .count();
    let non = support::observe_content(MessageType::NonConfirmable, 701, &non_token, 2, b"55");
    support::send_packet(&dev, &non, from);
    assert!(
        support::eventually(WAIT, || d
            .logs()
            .iter()
            .filter(|l| l.contains("notifications: event not stored"))
            .count()
            > refused),
        "the NON notification was stored on a full disk"
    );

    disk.free();
    // The device retransmits until it is acknowledged.
    let mut acked = None;
    for _ in 0..20 {
        support::send_packet(&dev, &con, from);
        if let Some(bytes) = dev.recv_raw(Duration::from_millis(500)) {
            acked = Some(Packet::from_bytes(&bytes).unwrap());
            break;
        }
    }
    let ack = acked.expect("the retransmission was never acknowledged");
    assert_eq!(
        (ack.header.get_type(), ack.header.message_id),
        (MessageType::Acknowledgement, 700)
    );
    let events = d.collect_events(Duration::from_secs(3), |_| false);
    let got = events.of("notifications");
    let of = |path: &str| -> Vec<&serde_json::Value> {
        got.iter().filter(|n| n["path"] == path).collect()
    };
    assert_eq!(of("/3303/0/5700").len(), 1, "{got:?}");
    assert_eq!(
        of("/3303/0/5700")[0]["payload"],
        support::b64(b"21"),
        "{got:?}"
    );
    assert_eq!(of("/3304/0/5700").len(), 1, "{got:?}");
    assert_eq!(
        of("/3304/0/5700")[0]["payload"],
        support::b64(b"55"),
        "{got:?}"
    );
    drop(d);
    drop(disk);
}
