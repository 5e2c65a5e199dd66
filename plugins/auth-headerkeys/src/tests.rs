//! Unit tests of the `headerkeys` backend, against the SDK's in-memory host.

use connectord_plugin_sdk::auth::{OP_AUTHENTICATE, OP_BOOTSTRAP};
use connectord_plugin_sdk::http::{OP_HTTP, Route};
use connectord_plugin_sdk::testing::{
    MemoryHost, assert_auth_routes_operations, assert_bad_input_refused,
    assert_bootstrap_creates_nothing, auth_request, authenticate, call_http, headers, routes_of,
};
use connectord_plugin_sdk::{Dispatch, level};
use serde_json::{Value, json};

use super::*;

/// Known keys for the tests, in area order.
const PAIRS: [(&str, &str); 6] = [
    ("rd0-endpoints", "wr0-endpoints"),
    ("rd1-resources", "wr1-resources"),
    ("rd2-subscriptions", "wr2-subscriptions"),
    ("rd3-notifications", "wr3-notifications"),
    ("rd4-limits", "wr4-limits"),
    ("rd5-apikeys", "wr5-apikeys"),
];
const NAMES: [&str; 6] = [
    "endpoints",
    "resources",
    "subscriptions",
    "notifications",
    "limits",
    "apikeys",
];
const APIKEYS: usize = 5;

/// Request headers: (lower-case name, value).
type Hs<'a> = Vec<(&'a str, &'a str)>;
/// Sample requests: (method, path).
type Reqs<'a> = &'a [(&'a str, &'a str)];

/// A plugin whose state holds `pairs` before it starts.
fn seeded(host: &MemoryHost, pairs: &[(&str, &str); 6]) -> HeaderKeys {
    let stored = json!({
        "version": 1,
        "keys": NAMES.iter().zip(pairs).map(|(name, (rd, wr))| {
            json!({"name": name, "rd": rd, "wr": wr})
        }).collect::<Vec<_>>(),
    });
    host.host()
        .state_put(STATE_KEY, stored.to_string().as_bytes())
        .unwrap();
    HeaderKeys::create(json!({}), host.host()).expect("create")
}

fn known() -> (MemoryHost, HeaderKeys) {
    let host = MemoryHost::new();
    let p = seeded(&host, &PAIRS);
    (host, p)
}

fn auth(p: &mut HeaderKeys, method: &str, path: &str, hs: &[(&str, &str)]) -> AuthVerdict {
    authenticate(p, &auth_request(method, path, hs))
}

fn principal(key_id: &str, scopes: &[&str]) -> PrincipalSpec {
    PrincipalSpec {
        key_id: key_id.into(),
        domain: "default".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        allow: None,
        creator: None,
    }
}

/// What a request should get from `authenticate`.
#[derive(Debug, Clone)]
enum Want {
    NotMine,
    /// key_id and scopes.
    Accept(String, Vec<&'static str>),
    /// A fragment of the reason.
    Refuse(&'static str),
}

fn assert_verdict(what: &str, got: &AuthVerdict, want: &Want) {
    match (want, got) {
        (Want::NotMine, AuthVerdict::NotMine) => {}
        (Want::Accept(id, scopes), AuthVerdict::Accepted { principal: p, .. }) => {
            assert_eq!(&p.key_id, id, "{what}");
            assert_eq!(p.scopes, *scopes, "{what}");
            assert_eq!(p.domain, "default", "{what}");
            assert_eq!(p.allow, None, "{what}");
        }
        (Want::Refuse(fragment), AuthVerdict::Refused { reason }) => {
            assert!(
                reason.contains(fragment),
                "{what}: {reason:?} lacks {fragment:?}"
            );
        }
        _ => panic!("{what}: expected {want:?}, got {got:?}"),
    }
}

fn admin() -> PrincipalSpec {
    principal("0123456789abcdef", &["admin"])
}

/// Calls `http`; returns the status and the body.
fn http(
    p: &mut HeaderKeys,
    method: &str,
    path: &str,
    hs: &[(&str, &str)],
    body: &str,
    who: PrincipalSpec,
) -> (u16, String) {
    let req = HttpRequest {
        backend: String::new(),
        method: method.into(),
        path: path.into(),
        query: None,
        headers: headers(hs),
        body: body.into(),
        principal: who,
    };
    let (resp, _) = call_http(p, &req);
    (resp.status, resp.body)
}

/// The apikeys area's own keys, as headers.
fn ak_rd() -> (&'static str, &'static str) {
    ("apirdkey", PAIRS[APIKEYS].0)
}
fn ak_wr() -> (&'static str, &'static str) {
    ("apiwrkey", PAIRS[APIKEYS].1)
}

fn get_doc(p: &mut HeaderKeys) -> Value {
    let (status, body) = http(p, "GET", APIKEYS_PATH, &[ak_rd()], "", admin());
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The stored pairs, read back from the host state: (name, rd, wr).
fn stored(host: &MemoryHost) -> Vec<(String, String, String)> {
    let bytes = host.state().get(STATE_KEY).cloned().expect("keys stored");
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["version"], 1);
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["name"].as_str().unwrap().to_string(),
                k["rd"].as_str().unwrap().to_string(),
                k["wr"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn put_form(p: &mut HeaderKeys, n: &str, hs: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut all = hs.to_vec();
    all.push(("content-type", FORM_CONTENT_TYPE));
    http(
        p,
        "PUT",
        &format!("{APIKEYS_PATH}/keys/{n}"),
        &all,
        body,
        admin(),
    )
}

#[test]
fn authenticate_matrix_every_area_read_and_write() {
    // Per area: sample read requests and write requests (method, path).
    let areas: [(usize, Reqs, Reqs); 6] = [
        (
            0,
            &[
                ("GET", "/v2/endpoints"),
                ("GET", "/endpoints/node-1"),
                ("GET", "/v1/endpoints/"),
                ("HEAD", "/endpoints"),
                ("GET", "/"),
                ("GET", "/v2/rest-versions"),
            ],
            &[],
        ),
        (
            1,
            &[
                ("GET", "/v2/endpoints/x/3/0/0"),
                ("GET", "/endpoints/x/3303/0/5700"),
            ],
            &[
                ("PUT", "/v2/endpoints/x/3/0/0"),
                ("POST", "/endpoints/x/3/0/4"),
                ("DELETE", "/v1/endpoints/x/3/0"),
            ],
        ),
        (
            2,
            &[
                ("GET", "/v2/subscriptions"),
                ("GET", "/subscriptions/x"),
                ("GET", "/subscriptions/x/3/0/0"),
            ],
            &[
                ("PUT", "/v2/subscriptions"),
                ("DELETE", "/subscriptions/x"),
                ("PUT", "/subscriptions/x/3/0/0"),
            ],
        ),
        (
            3,
            &[
                ("GET", "/v2/notification/pull"),
                ("GET", "/notification/callback"),
            ],
            &[
                ("PUT", "/v2/notification/callback"),
                ("DELETE", "/notification/callback"),
            ],
        ),
        (4, &[("GET", "/v2/limits"), ("GET", "/limits")], &[]),
        (
            5,
            &[
                ("GET", "/api/v1/apikeys"),
                ("GET", "/api/v1/apikeys/keys/3"),
                ("GET", "/v2/api/v1/apikeys"),
            ],
            &[("PUT", "/api/v1/apikeys/keys/3")],
        ),
    ];
    let (_host, mut p) = known();
    for (i, reads, writes) in areas {
        let (rd, wr) = PAIRS[i];
        let other = PAIRS[(i + 1) % 6];
        let name = NAMES[i];
        let read_scopes = Area::ALL[i].scopes(Access::Read).to_vec();
        let write_scopes = Area::ALL[i].scopes(Access::Write).to_vec();
        let rd_ok = Want::Accept("headerkeys".to_string(), read_scopes);
        let wr_ok = Want::Accept("headerkeys".to_string(), write_scopes);
        // (what, headers, verdict) for a read.
        let read_table: Vec<(&str, Hs, Want)> = vec![
            ("rd key", vec![("apirdkey", rd)], rd_ok.clone()),
            (
                "rd key with spaces",
                vec![("apirdkey", &*format!(" {rd} ").leak())],
                rd_ok.clone(),
            ),
            (
                "rd and wrong wr (ignored)",
                vec![("apirdkey", rd), ("apiwrkey", "x")],
                rd_ok.clone(),
            ),
            ("no headers", vec![], Want::NotMine),
            (
                "bearer only",
                vec![("authorization", "Bearer abc")],
                Want::NotMine,
            ),
            (
                "wrong rd",
                vec![("apirdkey", "nope")],
                Want::Refuse("wrong ApiRdKey"),
            ),
            (
                "empty rd header",
                vec![("apirdkey", "")],
                Want::Refuse("wrong ApiRdKey"),
            ),
            (
                "rd prefix",
                vec![("apirdkey", &rd[..rd.len() - 1])],
                Want::Refuse("wrong ApiRdKey"),
            ),
            (
                "another area's rd",
                vec![("apirdkey", other.0)],
                Want::Refuse("wrong ApiRdKey"),
            ),
            (
                "wr key as rd",
                vec![("apirdkey", wr)],
                Want::Refuse("wrong ApiRdKey"),
            ),
            (
                "wr only",
                vec![("apiwrkey", wr)],
                Want::Refuse("missing ApiRdKey"),
            ),
        ];
        let write_table: Vec<(&str, Hs, Want)> = vec![
            (
                "rd and wr",
                vec![("apirdkey", rd), ("apiwrkey", wr)],
                wr_ok.clone(),
            ),
            (
                "rd only",
                vec![("apirdkey", rd)],
                Want::Refuse("missing ApiWrKey"),
            ),
            (
                "wr only",
                vec![("apiwrkey", wr)],
                Want::Refuse("the write key alone is not enough"),
            ),
            (
                "wrong rd, right wr",
                vec![("apirdkey", "nope"), ("apiwrkey", wr)],
                Want::Refuse("wrong ApiRdKey"),
            ),
            (
                "right rd, wrong wr",
                vec![("apirdkey", rd), ("apiwrkey", "nope")],
                Want::Refuse("wrong ApiWrKey"),
            ),
            (
                "both swapped",
                vec![("apirdkey", wr), ("apiwrkey", rd)],
                Want::Refuse("wrong ApiRdKey and ApiWrKey"),
            ),
            (
                "another area's pair",
                vec![("apirdkey", other.0), ("apiwrkey", other.1)],
                Want::Refuse("wrong"),
            ),
            ("no headers", vec![], Want::NotMine),
            (
                "bearer only",
                vec![("authorization", "Bearer abc")],
                Want::NotMine,
            ),
        ];
        for (method, path) in reads {
            for (what, hs, want) in &read_table {
                let got = auth(&mut p, method, path, hs);
                assert_verdict(&format!("{name} read {method} {path}: {what}"), &got, want);
            }
        }
        for (method, path) in writes {
            for (what, hs, want) in &write_table {
                let got = auth(&mut p, method, path, hs);
                assert_verdict(&format!("{name} write {method} {path}: {what}"), &got, want);
            }
        }
    }
}

#[test]
fn authenticate_paths_outside_the_areas_are_not_mine() {
    let (_host, mut p) = known();
    // Every key we know, so that only the classification decides.
    let all_keys = [("apirdkey", PAIRS[0].0), ("apiwrkey", PAIRS[0].1)];
    let cases: &[(&str, &str)] = &[
        ("GET", "/metrics"),
        ("GET", "/v2/metrics"),
        ("GET", "/api/api_tokens"),
        ("POST", "/api/api_tokens"),
        ("GET", "/applications/x/keys"),
        ("GET", "/v3/endpoints"),
        ("GET", "/api/v2/apikeys"),
        ("GET", "/notification"),
        ("POST", "/endpoints"),
        ("PUT", "/endpoints/x"),
        ("POST", "/subscriptions"),
        ("PATCH", "/endpoints/x/3/0/0"),
        ("OPTIONS", "/endpoints"),
        ("PUT", "/limits"),
        ("POST", "/notification/callback"),
        ("DELETE", "/api/v1/apikeys/keys/1"),
        ("get", "/endpoints"),
        ("GET", "/endpoints%2Fx/3"),
        ("GET", "/%FF"),
    ];
    for (method, path) in cases {
        assert_eq!(
            auth(&mut p, method, path, &all_keys),
            AuthVerdict::NotMine,
            "{method} {path}"
        );
    }
}

#[test]
fn authenticate_classifies_like_the_core() {
    let (_host, mut p) = known();
    // (method, path, area index, access tag): prefixes, percent-encoding, slashes.
    let cases: &[(&str, &str, usize, &str)] = &[
        ("GET", "/v1/endpoints", 0, "rd"),
        ("GET", "//endpoints//", 0, "rd"),
        ("GET", "/%65ndpoints", 0, "rd"),
        ("GET", "/endpoints/a%20b", 0, "rd"),
        ("GET", "/endpoints/x/a%2Fb", 1, "rd"),
        ("DELETE", "/v2/endpoints/x/3", 1, "wr"),
        ("DELETE", "/v2/subscriptions/", 2, "wr"),
        ("HEAD", "/v2/notification/pull", 3, "rd"),
        ("GET", "/v1/api/v1/apikeys/", 5, "rd"),
        ("PUT", "/api/v1/apikeys/keys/0", 5, "wr"),
    ];
    for (method, path, i, tag) in cases {
        let (rd, wr) = PAIRS[*i];
        let got = auth(&mut p, method, path, &[("apirdkey", rd), ("apiwrkey", wr)]);
        let access = if *tag == "rd" {
            Access::Read
        } else {
            Access::Write
        };
        assert_verdict(
            &format!("{method} {path}"),
            &got,
            &Want::Accept(
                "headerkeys".to_string(),
                Area::ALL[*i].scopes(access).to_vec(),
            ),
        );
    }
}

#[test]
fn authenticate_empty_keys_open_their_area() {
    let host = MemoryHost::new();
    let mut p = seeded(
        &host,
        &[
            ("", "wr0"), // endpoints: reads open
            ("", ""),    // resources: reads and writes open
            ("", "wr2"), // subscriptions: reads open, writes need ApiWrKey only
            ("rd3", ""), // notifications: writes need ApiRdKey only
            ("rd4", "wr4"),
            ("rd5", "wr5"),
        ],
    );
    let acc = |id: &str, scopes: &[&'static str]| Want::Accept(id.to_string(), scopes.to_vec());
    let cases: Vec<(&str, &str, &str, Hs, Want)> = vec![
        (
            "empty rd opens reads",
            "GET",
            "/v2/endpoints",
            vec![],
            acc("headerkeys", &["endpoints:read"]),
        ),
        (
            "open: a sent rd key is ignored",
            "GET",
            "/endpoints",
            vec![("apirdkey", "whatever")],
            acc("headerkeys", &["endpoints:read"]),
        ),
        (
            "open, but a bearer key: its backend decides",
            "GET",
            "/endpoints",
            vec![("authorization", "Bearer k")],
            Want::NotMine,
        ),
        (
            "open, bearer and our header: ours",
            "GET",
            "/endpoints",
            vec![("authorization", "Bearer k"), ("apirdkey", "")],
            acc("headerkeys", &["endpoints:read"]),
        ),
        (
            "empty rd+wr opens writes",
            "PUT",
            "/v2/endpoints/x/3/0/0",
            vec![],
            acc("headerkeys", &["resources:write"]),
        ),
        (
            "empty rd+wr opens reads",
            "GET",
            "/endpoints/x/3/0/0",
            vec![],
            acc("headerkeys", &["resources:read"]),
        ),
        (
            "open writes, bearer key",
            "POST",
            "/endpoints/x/3/0/4",
            vec![("authorization", "Bearer k")],
            Want::NotMine,
        ),
        (
            "empty rd: reads open",
            "GET",
            "/subscriptions",
            vec![],
            acc("headerkeys", &["subscriptions:read"]),
        ),
        (
            "empty rd: write needs wr, none sent",
            "PUT",
            "/subscriptions",
            vec![],
            Want::NotMine,
        ),
        (
            "empty rd: wr alone suffices",
            "PUT",
            "/subscriptions",
            vec![("apiwrkey", "wr2")],
            acc("headerkeys", &["subscriptions:write"]),
        ),
        (
            "empty rd: wrong wr",
            "PUT",
            "/subscriptions",
            vec![("apiwrkey", "wr0")],
            Want::Refuse("wrong ApiWrKey"),
        ),
        (
            "empty rd: rd sent, wr missing",
            "DELETE",
            "/subscriptions",
            vec![("apirdkey", "x")],
            Want::Refuse("missing ApiWrKey"),
        ),
        (
            "empty wr: rd alone suffices to write",
            "PUT",
            "/notification/callback",
            vec![("apirdkey", "rd3")],
            acc("headerkeys", &["notifications"]),
        ),
        (
            "empty wr: wr header only",
            "PUT",
            "/notification/callback",
            vec![("apiwrkey", "")],
            Want::Refuse("missing ApiRdKey"),
        ),
        (
            "empty wr: reads still need rd",
            "GET",
            "/notification/pull",
            vec![],
            Want::NotMine,
        ),
        (
            "closed area unaffected",
            "GET",
            "/limits",
            vec![],
            Want::NotMine,
        ),
    ];
    for (what, method, path, hs, want) in cases {
        let got = auth(&mut p, method, path, &hs);
        assert_verdict(what, &got, &want);
    }
}

#[test]
fn configured_domain_is_the_principals() {
    let host = MemoryHost::new();
    seeded(&host, &PAIRS);
    let mut p = HeaderKeys::create(json!({"domain": "plant-7"}), host.host()).unwrap();
    match auth(&mut p, "GET", "/endpoints", &[("apirdkey", PAIRS[0].0)]) {
        AuthVerdict::Accepted { principal, .. } => assert_eq!(principal.domain, "plant-7"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn get_apikeys_is_exactly_the_seed_document() {
    let (host, mut p) = known();
    let (status, body) = http(&mut p, "GET", APIKEYS_PATH, &[ak_rd()], "", admin());
    assert_eq!(status, 200);
    let pair = |name: &str, rd: &str, wr: &str| {
        json!({"name": name, "rd": rd, "wr": wr,
               "Json+typeName": "MkcJsonLib.jApiKey", "Json+typeRevision": 0})
    };
    // A literal document with the known keys...
    let literal = json!({
        "keys": [
            pair("endpoints", "rd0-endpoints", "wr0-endpoints"),
            pair("resources", "rd1-resources", "wr1-resources"),
            pair("subscriptions", "rd2-subscriptions", "wr2-subscriptions"),
            pair("notifications", "rd3-notifications", "wr3-notifications"),
            pair("limits", "rd4-limits", "wr4-limits"),
            pair("apikeys", "rd5-apikeys", "wr5-apikeys"),
        ],
        "Json+typeName": "MkcJsonLib.jApiKeys",
        "Json+typeRevision": 0
    });
    let got: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(got, literal);
    // ...and one built from the stored state.
    let from_state = json!({
        "keys": stored(&host).iter().map(|(n, rd, wr)| pair(n, rd, wr)).collect::<Vec<_>>(),
        "Json+typeName": "MkcJsonLib.jApiKeys",
        "Json+typeRevision": 0
    });
    assert_eq!(got, from_state);
    // The field order of the seed, too.
    let first = r#"{"name":"endpoints","rd":"rd0-endpoints","wr":"wr0-endpoints","Json+typeName":"MkcJsonLib.jApiKey","Json+typeRevision":0}"#;
    assert!(
        body.starts_with(&format!(r#"{{"keys":[{first},"#)),
        "{body}"
    );
    assert!(
        body.ends_with(r#"],"Json+typeName":"MkcJsonLib.jApiKeys","Json+typeRevision":0}"#),
        "{body}"
    );
}

#[test]
fn get_one_pair_is_exactly_the_seed_structure() {
    let (_host, mut p) = known();
    for (n, (name, (rd, wr))) in NAMES.iter().zip(PAIRS).enumerate() {
        let (status, body) = http(
            &mut p,
            "GET",
            &format!("{APIKEYS_PATH}/keys/{n}"),
            &[ak_rd()],
            "",
            admin(),
        );
        assert_eq!(status, 200, "{n}");
        assert_eq!(
            body,
            format!(
                r#"{{"name":"{name}","rd":"{rd}","wr":"{wr}","Json+typeName":"MkcJsonLib.jApiKey","Json+typeRevision":0}}"#
            )
        );
    }
}

#[test]
fn put_form_table() {
    // (what, n, content type, body, status, message fragment, pair n afterwards).
    type Row = (
        &'static str,
        &'static str,
        &'static str,
        String,
        u16,
        &'static str,
        Option<(&'static str, &'static str)>,
    );
    let form = FORM_CONTENT_TYPE;
    let long = format!("rd={}", "k".repeat(MAX_KEY_LEN + 1));
    let longest = format!("rd={}", "k".repeat(MAX_KEY_LEN));
    let rows: Vec<Row> = vec![
        (
            "seed example: rd=mykey",
            "1",
            form,
            "rd=mykey".into(),
            200,
            "",
            Some(("mykey", PAIRS[1].1)),
        ),
        (
            "wr only",
            "2",
            form,
            "wr=w2".into(),
            200,
            "",
            Some((PAIRS[2].0, "w2")),
        ),
        (
            "rd and wr",
            "3",
            form,
            "rd=a&wr=b".into(),
            200,
            "",
            Some(("a", "b")),
        ),
        (
            "wr then rd",
            "3",
            form,
            "wr=b&rd=a".into(),
            200,
            "",
            Some(("a", "b")),
        ),
        (
            "%2B is a plus",
            "0",
            form,
            "rd=a%2Bb".into(),
            200,
            "",
            Some(("a+b", PAIRS[0].1)),
        ),
        (
            "+ is a space",
            "0",
            form,
            "wr=a+b".into(),
            200,
            "",
            Some((PAIRS[0].0, "a b")),
        ),
        (
            "other escapes",
            "0",
            form,
            "rd=x%21%3D%26y".into(),
            200,
            "",
            Some(("x!=&y", PAIRS[0].1)),
        ),
        (
            "encoded field name",
            "0",
            form,
            "%72d=z".into(),
            200,
            "",
            Some(("z", PAIRS[0].1)),
        ),
        (
            "empty rd opens",
            "4",
            form,
            "rd=".into(),
            200,
            "",
            Some(("", PAIRS[4].1)),
        ),
        (
            "bare rd is empty",
            "4",
            form,
            "rd".into(),
            200,
            "",
            Some(("", PAIRS[4].1)),
        ),
        (
            "both empty",
            "4",
            form,
            "rd=&wr=".into(),
            200,
            "",
            Some(("", "")),
        ),
        (
            "stray &",
            "4",
            form,
            "&rd=q&".into(),
            200,
            "",
            Some(("q", PAIRS[4].1)),
        ),
        (
            "charset parameter",
            "1",
            "application/x-www-form-urlencoded; charset=UTF-8",
            "rd=c".into(),
            200,
            "",
            Some(("c", PAIRS[1].1)),
        ),
        (
            "longest key",
            "1",
            form,
            longest.clone(),
            200,
            "",
            Some((&*longest[3..].to_string().leak(), PAIRS[1].1)),
        ),
        (
            "name is not writable",
            "1",
            form,
            "name=x".into(),
            400,
            "not writable",
            None,
        ),
        (
            "name beside rd",
            "1",
            form,
            "rd=a&name=x".into(),
            400,
            "not writable",
            None,
        ),
        (
            "unknown field",
            "1",
            form,
            "foo=1".into(),
            400,
            "unknown field",
            None,
        ),
        (
            "unknown beside wr",
            "1",
            form,
            "wr=1&key=2".into(),
            400,
            "unknown field",
            None,
        ),
        (
            "rd twice",
            "1",
            form,
            "rd=1&rd=2".into(),
            400,
            "twice",
            None,
        ),
        ("empty body", "1", form, "".into(), 400, "must set rd", None),
        (
            "leading space",
            "1",
            form,
            "rd=%20x".into(),
            400,
            "space",
            None,
        ),
        (
            "trailing space",
            "1",
            form,
            "rd=x+".into(),
            400,
            "space",
            None,
        ),
        (
            "non-ASCII",
            "1",
            form,
            "rd=%C3%A9".into(),
            400,
            "ASCII",
            None,
        ),
        (
            "control character",
            "1",
            form,
            "rd=a%0Ab".into(),
            400,
            "ASCII",
            None,
        ),
        ("not UTF-8", "1", form, "rd=%FF".into(), 400, "UTF-8", None),
        ("too long", "1", form, long, 400, "longer than", None),
        (
            "JSON body",
            "1",
            "application/json",
            r#"{"rd":"x"}"#.into(),
            415,
            "x-www-form-urlencoded",
            None,
        ),
        (
            "no content type",
            "1",
            "",
            "rd=x".into(),
            415,
            "x-www-form-urlencoded",
            None,
        ),
        (
            "n past the end",
            "6",
            form,
            "rd=x".into(),
            404,
            "0 to 5",
            None,
        ),
        (
            "n not a number",
            "abc",
            form,
            "rd=x".into(),
            404,
            "no key pair",
            None,
        ),
        (
            "n with a leading zero",
            "01",
            form,
            "rd=x".into(),
            404,
            "no key pair",
            None,
        ),
        (
            "negative n",
            "-1",
            form,
            "rd=x".into(),
            404,
            "no key pair",
            None,
        ),
        (
            "huge n",
            "99999999999999999999999",
            form,
            "rd=x".into(),
            404,
            "no key pair",
            None,
        ),
    ];
    for (what, n, ct, body, status, fragment, after) in rows {
        let (host, mut p) = known();
        let mut hs = vec![ak_rd(), ak_wr()];
        if !ct.is_empty() {
            hs.push(("content-type", ct));
        }
        let path = format!("{APIKEYS_PATH}/keys/{n}");
        let (got, answer) = http(&mut p, "PUT", &path, &hs, &body, admin());
        assert_eq!(got, status, "{what}: {answer}");
        let v: Value = serde_json::from_str(&answer).unwrap();
        let now = stored(&host);
        match after {
            Some((rd, wr)) => {
                let i: usize = n.parse().unwrap();
                // The answer is the changed pair.
                assert_eq!(v["name"], NAMES[i], "{what}");
                assert_eq!(v["rd"], rd, "{what}");
                assert_eq!(v["wr"], wr, "{what}");
                assert_eq!(v["Json+typeName"], "MkcJsonLib.jApiKey", "{what}");
                // Durable before the answer, and nothing else changed.
                for (j, (name, srd, swr)) in now.iter().enumerate() {
                    assert_eq!(name, NAMES[j]);
                    let want = if j == i { (rd, wr) } else { PAIRS[j] };
                    assert_eq!((srd.as_str(), swr.as_str()), want, "{what}: pair {j}");
                }
                // The document shows the change.
                assert_eq!(get_doc(&mut p)["keys"][i]["rd"], rd, "{what}");
            }
            None => {
                assert!(
                    v["message"].as_str().unwrap().contains(fragment),
                    "{what}: {answer}"
                );
                assert!(v["type"].is_string(), "{what}");
                // Nothing changed.
                for (j, (_, srd, swr)) in now.iter().enumerate() {
                    assert_eq!((srd.as_str(), swr.as_str()), PAIRS[j], "{what}: pair {j}");
                }
            }
        }
    }
}

#[test]
fn apikeys_routes_check_their_own_keys() {
    let (_host, mut p) = known();
    let bearer = ("authorization", "Bearer admin-key");
    let form = ("content-type", FORM_CONTENT_TYPE);
    let doc = APIKEYS_PATH;
    let one = "/api/v1/apikeys/keys/1";
    // (what, method, path, headers, principal, status, message fragment).
    let cases: Vec<(&str, &str, &str, Hs, PrincipalSpec, u16, &str)> = vec![
        (
            "GET doc without keys",
            "GET",
            doc,
            vec![],
            principal("headerkeys", &[]),
            401,
            "needs the header ApiRdKey",
        ),
        (
            "GET doc, wrong rd",
            "GET",
            doc,
            vec![("apirdkey", "nope")],
            principal("x", &[]),
            401,
            "wrong ApiRdKey",
        ),
        (
            "GET doc, wr only",
            "GET",
            doc,
            vec![ak_wr()],
            principal("x", &[]),
            401,
            "missing ApiRdKey",
        ),
        (
            "GET doc, another area's rd",
            "GET",
            doc,
            vec![("apirdkey", PAIRS[1].0)],
            principal("x", &[]),
            401,
            "wrong ApiRdKey",
        ),
        (
            "GET doc, admin bearer, no keys",
            "GET",
            doc,
            vec![bearer],
            admin(),
            401,
            "ApiRdKey",
        ),
        (
            "PUT, admin bearer, no keys",
            "PUT",
            one,
            vec![bearer, form],
            admin(),
            401,
            "ApiRdKey and ApiWrKey",
        ),
        (
            "GET doc, rd",
            "GET",
            doc,
            vec![ak_rd()],
            principal("headerkeys", &[]),
            200,
            "",
        ),
        (
            "GET doc, admin bearer and rd",
            "GET",
            doc,
            vec![bearer, ak_rd()],
            admin(),
            200,
            "",
        ),
        (
            "GET one, rd",
            "GET",
            one,
            vec![ak_rd()],
            principal("x", &[]),
            200,
            "",
        ),
        (
            "GET one, no keys",
            "GET",
            one,
            vec![],
            admin(),
            401,
            "ApiRdKey",
        ),
        (
            "PUT, rd only",
            "PUT",
            one,
            vec![ak_rd(), form],
            admin(),
            401,
            "missing ApiWrKey",
        ),
        (
            "PUT, wr only",
            "PUT",
            one,
            vec![ak_wr(), form],
            admin(),
            401,
            "the write key alone is not enough",
        ),
        (
            "PUT, rd and wrong wr",
            "PUT",
            one,
            vec![ak_rd(), ("apiwrkey", "nope"), form],
            admin(),
            401,
            "wrong ApiWrKey",
        ),
        (
            "PUT, the resources pair",
            "PUT",
            one,
            vec![("apirdkey", PAIRS[1].0), ("apiwrkey", PAIRS[1].1), form],
            admin(),
            401,
            "wrong",
        ),
        (
            "PUT, both",
            "PUT",
            one,
            vec![ak_rd(), ak_wr(), form],
            principal("headerkeys", &[]),
            200,
            "",
        ),
        (
            "no such route: DELETE",
            "DELETE",
            one,
            vec![ak_rd(), ak_wr()],
            admin(),
            404,
            "no route",
        ),
        (
            "no such route: PUT doc",
            "PUT",
            doc,
            vec![ak_rd(), ak_wr(), form],
            admin(),
            404,
            "no route",
        ),
        (
            "no such route: keys",
            "GET",
            "/api/v1/apikeys/keys",
            vec![ak_rd()],
            admin(),
            404,
            "no route",
        ),
        (
            "no such route: other",
            "GET",
            "/api/v1/other",
            vec![ak_rd()],
            admin(),
            404,
            "no route",
        ),
    ];
    for (what, method, path, hs, who, status, fragment) in cases {
        let body = if method == "PUT" {
            "wr=changed-wr1"
        } else {
            ""
        };
        let (got, answer) = http(&mut p, method, path, &hs, body, who);
        assert_eq!(got, status, "{what}: {answer}");
        if status != 200 {
            let v: Value = serde_json::from_str(&answer).unwrap();
            let message = v["message"].as_str().unwrap();
            assert!(message.contains(fragment), "{what}: {message}");
        }
    }
    // authenticate agrees for the same requests (401 through the core).
    assert_eq!(auth(&mut p, "GET", doc, &[]), AuthVerdict::NotMine);
    assert!(matches!(
        auth(&mut p, "GET", doc, &[("apirdkey", "nope")]),
        AuthVerdict::Refused { .. }
    ));
    assert!(matches!(
        auth(&mut p, "PUT", one, &[ak_wr()]),
        AuthVerdict::Refused { .. }
    ));
}

#[test]
fn open_apikeys_area_needs_no_key() {
    let host = MemoryHost::new();
    let mut pairs = PAIRS;
    pairs[APIKEYS] = ("", "w");
    let mut p = seeded(&host, &pairs);
    let form = ("content-type", FORM_CONTENT_TYPE);
    assert_eq!(http(&mut p, "GET", APIKEYS_PATH, &[], "", admin()).0, 200);
    assert_eq!(
        http(
            &mut p,
            "PUT",
            "/api/v1/apikeys/keys/0",
            &[form],
            "rd=x",
            admin()
        )
        .0,
        401
    );
    assert_eq!(
        http(
            &mut p,
            "PUT",
            "/api/v1/apikeys/keys/0",
            &[form, ("apiwrkey", "w")],
            "rd=x",
            admin()
        )
        .0,
        200
    );
}

#[test]
fn changing_the_apikeys_keys_retires_the_old_ones() {
    let (host, mut p) = known();
    let (old_rd, old_wr) = PAIRS[APIKEYS];
    let (status, _) = put_form(&mut p, "5", &[ak_rd(), ak_wr()], "rd=new-rd5");
    assert_eq!(status, 200);
    // The old rd key stops working, for authenticate and for the route.
    assert!(matches!(
        auth(&mut p, "GET", APIKEYS_PATH, &[("apirdkey", old_rd)]),
        AuthVerdict::Refused { .. }
    ));
    let (status, _) = http(
        &mut p,
        "GET",
        APIKEYS_PATH,
        &[("apirdkey", old_rd)],
        "",
        admin(),
    );
    assert_eq!(status, 401);
    // The new one works.
    let (status, _) = http(
        &mut p,
        "GET",
        APIKEYS_PATH,
        &[("apirdkey", "new-rd5")],
        "",
        admin(),
    );
    assert_eq!(status, 200);
    assert!(matches!(
        auth(&mut p, "GET", APIKEYS_PATH, &[("apirdkey", "new-rd5")]),
        AuthVerdict::Accepted { .. }
    ));
    // Writing needs the new rd with the (unchanged) wr.
    let (status, _) = put_form(&mut p, "5", &[ak_rd(), ak_wr()], "wr=new-wr5");
    assert_eq!(status, 401);
    let (status, _) = put_form(
        &mut p,
        "5",
        &[("apirdkey", "new-rd5"), ("apiwrkey", old_wr)],
        "wr=new-wr5",
    );
    assert_eq!(status, 200);
    assert_eq!(
        stored(&host)[APIKEYS],
        ("apikeys".into(), "new-rd5".into(), "new-wr5".into())
    );
    // Other areas' keys are as they were.
    assert!(matches!(
        auth(&mut p, "GET", "/endpoints", &[("apirdkey", PAIRS[0].0)]),
        AuthVerdict::Accepted { .. }
    ));
}

#[test]
fn state_survives_a_new_instance() {
    let (host, mut p) = known();
    assert_eq!(
        put_form(&mut p, "1", &[ak_rd(), ak_wr()], "rd=r1&wr=w1").0,
        200
    );
    assert_eq!(put_form(&mut p, "5", &[ak_rd(), ak_wr()], "rd=r5").0, 200);
    let before = serde_json::from_str::<Value>(&p.document()).unwrap();
    drop(p);

    let mut p = HeaderKeys::create(json!({}), host.host()).unwrap();
    let after = serde_json::from_str::<Value>(&p.document()).unwrap();
    assert_eq!(before, after);
    assert_eq!(after["keys"][1]["rd"], "r1");
    assert_eq!(after["keys"][1]["wr"], "w1");
    assert!(matches!(
        auth(
            &mut p,
            "PUT",
            "/endpoints/x/3/0/0",
            &[("apirdkey", "r1"), ("apiwrkey", "w1")]
        ),
        AuthVerdict::Accepted { .. }
    ));
    assert!(matches!(
        auth(
            &mut p,
            "GET",
            "/endpoints/x/3/0/0",
            &[("apirdkey", PAIRS[1].0)]
        ),
        AuthVerdict::Refused { .. }
    ));
    let (status, _) = http(
        &mut p,
        "GET",
        APIKEYS_PATH,
        &[("apirdkey", "r5")],
        "",
        admin(),
    );
    assert_eq!(status, 200);
}

/// Every key of a fresh instance's document, in order (rd, wr per area).
fn all_keys(p: &HeaderKeys) -> Vec<String> {
    let doc: Value = serde_json::from_str(&p.document()).unwrap();
    doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|k| {
            [
                k["rd"].as_str().unwrap().to_string(),
                k["wr"].as_str().unwrap().to_string(),
            ]
        })
        .collect()
}

#[test]
fn default_keys_are_random_and_differ_between_hosts() {
    let host_a = MemoryHost::new();
    let host_b = MemoryHost::new();
    let mut a = HeaderKeys::create(json!({}), host_a.host()).unwrap();
    let b = HeaderKeys::create(json!({}), host_b.host()).unwrap();
    let (ka, kb) = (all_keys(&a), all_keys(&b));
    assert_eq!(ka.len(), 12);
    for k in ka.iter().chain(&kb) {
        assert_eq!(k.len(), GENERATED_KEY_LEN, "{k}");
        assert!(k.bytes().all(|c| c.is_ascii_alphanumeric()), "{k}");
        assert!(!k.starts_with("rdKey") && !k.starts_with("wrKey"), "{k}");
    }
    let distinct: std::collections::BTreeSet<&String> = ka.iter().chain(&kb).collect();
    assert_eq!(distinct.len(), 24, "every key differs from every other");
    // Stored at once, in the seed's order of names, and nothing is open.
    assert_eq!(
        stored(&host_a)
            .iter()
            .map(|(n, _, _)| n.as_str())
            .collect::<Vec<_>>(),
        NAMES
    );
    for (method, path) in [
        ("GET", "/endpoints"),
        ("PUT", "/endpoints/x/3/0/0"),
        ("PUT", "/subscriptions"),
        ("GET", "/notification/pull"),
        ("GET", "/limits"),
        ("GET", "/api/v1/apikeys"),
    ] {
        assert_eq!(
            auth(&mut a, method, path, &[]),
            AuthVerdict::NotMine,
            "{path}"
        );
    }
    assert_eq!(http(&mut a, "GET", APIKEYS_PATH, &[], "", admin()).0, 401);
    // The operator is told how to read them; no key is ever logged.
    let logs = host_a.logs();
    assert!(
        logs.iter()
            .any(|(l, m)| *l == level::INFO && m.contains("show_keys"))
    );
    for k in &ka {
        assert!(
            !logs.iter().any(|(_, m)| m.contains(k.as_str())),
            "{k} logged"
        );
    }
    // A new instance on the same host keeps them.
    drop(a);
    let again = HeaderKeys::create(json!({}), host_a.host()).unwrap();
    assert_eq!(all_keys(&again), ka);
}

#[test]
fn show_keys_gives_the_whole_document() {
    let (_host, mut p) = known();
    let from_route = get_doc(&mut p);
    for input in [&b"{}"[..], b"", b" \n"] {
        let out = p.call(OP_SHOW_KEYS, input).expect("show_keys");
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, from_route);
    }
    assert!(p.call(OP_SHOW_KEYS, br#"{"area": 1}"#).is_err());
    assert!(p.call(OP_SHOW_KEYS, b"[").is_err());
}

#[test]
fn bootstrap_creates_nothing() {
    let (host, mut p) = known();
    assert_bootstrap_creates_nothing(&mut p, &host, "default");
}

#[test]
fn routes_are_the_seed_routes_for_any_authenticated_caller() {
    let (_host, mut p) = known();
    let routes = routes_of(&mut p);
    let want: Vec<Route> = [
        ("GET", "/api/v1/apikeys"),
        ("GET", "/api/v1/apikeys/keys/{n}"),
        ("PUT", "/api/v1/apikeys/keys/{n}"),
    ]
    .iter()
    .map(|(m, path)| Route::new(m, path, "authenticated"))
    .collect();
    assert_eq!(routes.routes, want);
}

#[test]
fn config_table() {
    // (config, accepted, error fragment).
    let cases: &[(Value, bool, &str)] = &[
        (json!({}), true, ""),
        (json!({"domain": "default"}), true, ""),
        (json!({"domain": "x"}), true, ""),
        (json!({"domain": ""}), false, "domain is empty"),
        (json!({"domain": 5}), false, "invalid configuration"),
        (json!({"keys": []}), false, "keys"),
        (json!({"domain": "x", "open": true}), false, "open"),
    ];
    for (cfg, ok, fragment) in cases {
        let host = MemoryHost::new();
        match HeaderKeys::create(cfg.clone(), host.host()) {
            Ok(_) => assert!(ok, "{cfg}"),
            Err(e) => {
                assert!(!ok, "{cfg}: {e}");
                assert!(e.contains(fragment), "{cfg}: {e}");
                assert!(host.state().is_empty(), "{cfg}: nothing stored");
            }
        }
    }
}

#[test]
fn stored_state_table() {
    let h = |name: &str, rd: &str, wr: &str| json!({"name": name, "rd": rd, "wr": wr});
    let full: Vec<Value> = NAMES
        .iter()
        .zip(PAIRS)
        .map(|(n, (rd, wr))| h(n, rd, wr))
        .collect();
    let mut missing_limits = full.clone();
    missing_limits.remove(4);
    let mut unknown_area = full.clone();
    unknown_area.push(h("properties", "rdKey1", "wrKey1"));
    let mut reordered = full.clone();
    reordered.reverse();
    // (what, stored bytes, loads, warnings expected).
    let cases: Vec<(&str, Vec<u8>, bool, usize)> = vec![
        ("not JSON", b"nope".to_vec(), false, 0),
        (
            "wrong version",
            json!({"version": 2, "keys": full}).to_string().into_bytes(),
            false,
            0,
        ),
        (
            "unknown field",
            json!({"version": 1, "keys": full, "x": 1})
                .to_string()
                .into_bytes(),
            false,
            0,
        ),
        (
            "complete",
            json!({"version": 1, "keys": full}).to_string().into_bytes(),
            true,
            0,
        ),
        (
            "reordered",
            json!({"version": 1, "keys": reordered})
                .to_string()
                .into_bytes(),
            true,
            0,
        ),
        (
            "an area missing",
            json!({"version": 1, "keys": missing_limits})
                .to_string()
                .into_bytes(),
            true,
            0,
        ),
        (
            "an unknown area",
            json!({"version": 1, "keys": unknown_area})
                .to_string()
                .into_bytes(),
            true,
            1,
        ),
    ];
    for (what, bytes, loads, warnings) in cases {
        let host = MemoryHost::new();
        host.host().state_put(STATE_KEY, &bytes).unwrap();
        match HeaderKeys::create(json!({}), host.host()) {
            Err(e) => {
                assert!(!loads, "{what}: {e}");
                // The unreadable state is left alone.
                assert_eq!(host.state().get(STATE_KEY), Some(&bytes), "{what}");
            }
            Ok(p) => {
                assert!(loads, "{what}");
                let keys = all_keys(&p);
                for (i, (rd, wr)) in PAIRS.iter().enumerate() {
                    if what == "an area missing" && i == 4 {
                        assert_eq!(keys[2 * i].len(), GENERATED_KEY_LEN, "{what}");
                        assert_eq!(keys[2 * i + 1].len(), GENERATED_KEY_LEN, "{what}");
                    } else {
                        assert_eq!(
                            (&*keys[2 * i], &*keys[2 * i + 1]),
                            (*rd, *wr),
                            "{what}: {i}"
                        );
                    }
                }
                // What is stored now is what is served.
                let now = stored(&host);
                assert_eq!(now.len(), 6, "{what}");
                for (j, (name, rd, wr)) in now.iter().enumerate() {
                    assert_eq!(name, NAMES[j], "{what}");
                    assert_eq!((rd, wr), (&keys[2 * j], &keys[2 * j + 1]), "{what}");
                }
                let warned = host
                    .logs()
                    .iter()
                    .filter(|(l, _)| *l == level::WARN)
                    .count();
                assert_eq!(warned, warnings, "{what}");
            }
        }
    }
}

#[test]
fn secrets_compare_in_full() {
    let cases: &[(&str, &str, bool)] = &[
        ("abc", "abc", true),
        ("", "", true),
        ("abc", "abd", false),
        ("abc", "ab", false),
        ("ab", "abc", false),
        ("", "a", false),
        ("ABC", "abc", false),
    ];
    for (a, b, eq) in cases {
        assert_eq!(secret_eq(a, b), *eq, "{a:?} {b:?}");
    }
}

#[test]
fn unknown_op_and_bad_input_are_errors() {
    assert_auth_routes_operations::<HeaderKeys>(&["show_keys"]);
    let (_host, mut p) = known();
    assert_bad_input_refused(&mut p, &[OP_BOOTSTRAP, OP_AUTHENTICATE, OP_HTTP], &[]);
}

#[test]
fn keys_never_reach_the_log() {
    let (host, mut p) = known();
    assert_eq!(
        put_form(&mut p, "1", &[ak_rd(), ak_wr()], "rd=secret-r1&wr=").0,
        200
    );
    let _ = auth(&mut p, "GET", "/endpoints", &[("apirdkey", "guess")]);
    let _ = p.call(OP_SHOW_KEYS, b"{}").unwrap();
    let logs = host.logs();
    for k in PAIRS
        .iter()
        .flat_map(|(r, w)| [*r, *w])
        .chain(["secret-r1"])
    {
        assert!(!logs.iter().any(|(_, m)| m.contains(k)), "{k} logged");
    }
    // Opening a key is worth a warning.
    assert!(logs.iter().any(|(l, m)| *l == level::WARN
        && m.contains("resources")
        && m.contains("only the read key")));
}
