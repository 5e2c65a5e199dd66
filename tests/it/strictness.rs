//! Strictness at the protocol edges (issue 19, item 10): CoAP requests the daemon cannot
//! process as sent are refused with the code RFC 7252 names and a diagnostic payload, never
//! half-understood; and the HTTP errors hyper answers on its own (a request it cannot parse,
//! a head too large) carry the documented JSON error body like every other REST error.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use coap_lite::{CoapOption, ContentFormat, MessageType, Packet, RequestType, ResponseType};
use support::Daemon;
use support::coap::{Device, Req, code, diag};

const LINKS: &str = "</3/0>,</3303/0>";

/// A registration request (`POST /rd?ep=…`) with `extra` options and `query` items as raw
/// bytes, sent as CON or NON.
fn registration(dev: &mut Device, query: &[&[u8]], extra: &[(u16, &[u8])], con: bool) -> Packet {
    let mut r = Req::new(RequestType::Post, &["rd"]);
    r.payload = LINKS.as_bytes();
    r.content_format = Some(ContentFormat::ApplicationLinkFormat);
    r.confirmable = con;
    let mut p = dev.build(&r);
    for q in query {
        p.add_option(CoapOption::UriQuery, q.to_vec());
    }
    for (n, v) in extra {
        p.add_option(CoapOption::from(*n), v.to_vec());
    }
    p
}

/// Sends a CON registration with the query item `ep` and the `option`, asserts that it is
/// answered `want` and returns the answer's diagnostic.
fn answered(dev: &mut Device, ep: &str, option: (u16, &[u8]), want: ResponseType) -> String {
    let p = registration(dev, &[ep.as_bytes()], &[option], true);
    let r = exchange(dev, &p);
    assert_eq!(code(&r), want, "option {}: {}", option.0, diag(&r));
    diag(&r)
}

/// Sends `p` and returns the datagram that answers it (same message id or token).
fn exchange(dev: &Device, p: &Packet) -> Packet {
    dev.send_and_wait(p, |r| {
        r.header.message_id == p.header.message_id || r.get_token() == p.get_token()
    })
}

fn names(d: &Daemon) -> Vec<String> {
    let r = d.get("/endpoints");
    assert_eq!(r.status, 200, "{}", r.body);
    support::strings_of(&r.json(), "name")
}

#[test]
fn unknown_critical_options_are_4_02_and_proxying_5_05() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    // Odd numbers are critical (RFC 7252 §5.4.1); 65001 and 9 (OSCORE) mean nothing here.
    for (n, name) in [(65001u16, "crit1"), (9, "crit2"), (19, "crit3")] {
        let ep = format!("ep={name}");
        let why = answered(&mut dev, &ep, (n, b"x"), ResponseType::BadOption);
        assert!(why.contains(&n.to_string()), "names the option: {why}");
        // A NON request with it is rejected (§4.3): RST, nothing processed.
        let p = registration(&mut dev, &[ep.as_bytes()], &[(n, b"x")], false);
        let r = exchange(&dev, &p);
        assert_eq!(
            r.header.get_type(),
            MessageType::Reset,
            "NON with option {n}"
        );
    }
    // Proxy-Uri (35) and Proxy-Scheme (39): this is no proxy.
    for (n, name) in [(35u16, "proxy1"), (39, "proxy2")] {
        let ep = format!("ep={name}");
        let why = answered(
            &mut dev,
            &ep,
            (n, b"coap://h/rd"),
            ResponseType::ProxyingNotSupported,
        );
        assert!(!why.is_empty());
    }
    // Known critical options (Uri-Host, Uri-Port, Accept) and unknown elective ones (even)
    // are fine.
    let p = registration(
        &mut dev,
        &[b"ep=fine"],
        &[(3, b"localhost"), (7, &[0x16, 0x33]), (65000, b"x")],
        true,
    );
    let r = exchange(&dev, &p);
    assert_eq!(code(&r), ResponseType::Created, "{}", diag(&r));
    assert_eq!(names(&d), vec!["fine".to_string()]);
}

/// The same case through a CoAP stack nobody here wrote: libcoap's client.
#[test]
fn libcoap_client_sees_4_02_for_an_unknown_critical_option() {
    let d = Daemon::in_process();
    let url = format!("coap://{}/rd?ep=libcoap", d.coap);
    let (_, text) = support::peers::libcoap_run(&["-m", "post", "-B", "5", "-O", "65001,x", &url]);
    assert!(text.contains("4.02"), "libcoap printed: {text}");
    assert!(names(&d).is_empty());
}

#[test]
fn an_invalid_binding_is_4_00_with_a_diagnostic() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    for b in ["X", "UU", "Q", "u", "U Q", "UQX"] {
        let q = format!("b={b}");
        let p = registration(&mut dev, &[b"ep=bind", q.as_bytes()], &[], true);
        let r = exchange(&dev, &p);
        assert_eq!(code(&r), ResponseType::BadRequest, "b={b}: {}", diag(&r));
        assert!(diag(&r).contains("b="), "b={b}: {}", diag(&r));
    }
    assert!(names(&d).is_empty());
    // The LwM2M 1.0 and 1.1 bindings register.
    for (i, b) in ["U", "UQ", "S", "SQ", "US", "UQS", "T", "N", "UT"]
        .iter()
        .enumerate()
    {
        let id = dev.register(&[&format!("ep=ok{i}"), &format!("b={b}")], LINKS);
        // An update with a bad binding is refused too, and the registration keeps its own.
        assert_eq!(
            dev.update(&id, &["b=XYZ"], None),
            ResponseType::BadRequest,
            "update b=XYZ"
        );
        assert_eq!(dev.update(&id, &["b=UQ"], None), ResponseType::Changed);
    }
}

/// `lwm2m=` is a version, `MAJOR.MINOR`: anything else is refused with a diagnostic naming
/// it, and never stored or shown as the endpoint's version.
#[test]
fn an_invalid_lwm2m_version_is_4_00_with_a_diagnostic() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    for l in [
        "", "1", "1.", ".1", "1.0.2", "v1.1", "1.1 ", "1,1", "1234.0", "１.０",
    ] {
        let q = format!("lwm2m={l}");
        let p = registration(&mut dev, &[b"ep=ver", q.as_bytes()], &[], true);
        let r = exchange(&dev, &p);
        assert_eq!(
            code(&r),
            ResponseType::BadRequest,
            "lwm2m={l}: {}",
            diag(&r)
        );
        assert!(diag(&r).contains("lwm2m"), "lwm2m={l}: {}", diag(&r));
    }
    assert!(names(&d).is_empty());
    let versions = ["1.0", "1.1", "1.2", "10.15", "2.0"]; // sorted as strings
    for (i, l) in versions.iter().enumerate() {
        dev.register(&[&format!("ep=ver{i}"), &format!("lwm2m={l}")], LINKS);
    }
    let r = d.get("/endpoints");
    assert_eq!(r.status, 200, "{}", r.body);
    let mut shown = support::strings_of(&r.json(), "lwm2m");
    shown.sort();
    assert_eq!(shown, versions, "{}", r.body);
}

/// Issue 25 review: a resource path with a `.` or `..` segment (also percent-encoded),
/// a query or a fragment is refused at registration, 4.00 naming the link; so are the
/// endpoint names `.` and `..`. Before, such links were listed, and a client that put the
/// listed path into a URL (the console) had it resolved into another route.
#[test]
fn dot_segment_paths_and_names_are_4_00() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    for links in [
        "</../../notification/websocket>;obs",
        "</3/0/4/../../../../victim/3/0/5>",
        "</3303/%2e%2e/3/0>",
        "</3303/./0/5700>",
        "</3303/0/5700?x=1>",
        "</3303/0/5700#f>",
    ] {
        let mut r = Req::new(RequestType::Post, &["rd"]);
        r.payload = links.as_bytes();
        r.content_format = Some(ContentFormat::ApplicationLinkFormat);
        r.confirmable = true;
        let mut p = dev.build(&r);
        p.add_option(CoapOption::UriQuery, b"ep=dots".to_vec());
        let a = exchange(&dev, &p);
        assert_eq!(code(&a), ResponseType::BadRequest, "{links}: {}", diag(&a));
        assert!(diag(&a).contains("segment"), "{links}: {}", diag(&a));
    }
    for ep in ["ep=..", "ep=.", "ep=%2e%2e"] {
        let p = registration(&mut dev, &[ep.as_bytes()], &[], true);
        let a = exchange(&dev, &p);
        assert_eq!(code(&a), ResponseType::BadRequest, "{ep}: {}", diag(&a));
    }
    assert!(names(&d).is_empty());
    // Dots inside a segment are fine.
    dev.register(&["ep=dots.ok"], "</3303/0/5700>,</x.y/0/1>");
    assert_eq!(names(&d), ["dots.ok"]);
}

/// A diagnostic that repeats what the device sent is cut to size: a refusal of a 1 200-byte
/// value (or link) is still answered, 4.00 with a short diagnostic, where the whole of it
/// used to outgrow the datagram and leave the device without an answer.
#[test]
fn a_refusal_that_repeats_a_long_value_is_still_answered() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    let long = "X".repeat(1_200);
    let q = format!("b={long}");
    let p = registration(&mut dev, &[b"ep=long", q.as_bytes()], &[], true);
    let r = exchange(&dev, &p);
    assert_eq!(code(&r), ResponseType::BadRequest, "{}", diag(&r));
    assert!(diag(&r).starts_with("b=\"XXX"), "{}", diag(&r));
    assert!(diag(&r).ends_with('…'), "{}", diag(&r));
    assert!(r.payload.len() <= 256, "{}", diag(&r));
    // A link the registry refuses, repeated in its diagnostic.
    let mut req = Req::new(RequestType::Post, &["rd"]);
    let links = format!("</3/0>,<{}", "a".repeat(1_150));
    req.payload = links.as_bytes();
    req.content_format = Some(ContentFormat::ApplicationLinkFormat);
    req.confirmable = true;
    let mut p = dev.build(&req);
    p.add_option(CoapOption::UriQuery, b"ep=long".to_vec());
    let r = exchange(&dev, &p);
    assert_eq!(code(&r), ResponseType::BadRequest, "{}", diag(&r));
    assert!(r.payload.len() <= 256, "{}", diag(&r));
    assert!(names(&d).is_empty());
}

#[test]
fn non_utf8_names_paths_and_queries_are_4_00_never_lossy() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    // Two names that a lossy conversion would both turn into "dev\u{FFFD}".
    for raw in [&b"ep=dev\xff"[..], &b"ep=dev\xfe"[..]] {
        let p = registration(&mut dev, &[raw], &[], true);
        let r = exchange(&dev, &p);
        assert_eq!(code(&r), ResponseType::BadRequest, "{}", diag(&r));
        assert!(diag(&r).contains("UTF-8"), "{}", diag(&r));
    }
    // A bad byte in another query item or in the path.
    let p = registration(&mut dev, &[b"ep=good", b"et=\xc3"], &[], true);
    assert_eq!(code(&exchange(&dev, &p)), ResponseType::BadRequest);
    let id = dev.register(&["ep=good"], LINKS);
    let mut r = Req::new(RequestType::Post, &["rd"]);
    r.confirmable = true;
    let mut p = dev.build(&r);
    p.clear_option(CoapOption::UriPath);
    p.add_option(CoapOption::UriPath, b"rd".to_vec());
    let mut bad = id.clone().into_bytes();
    bad.push(0xff);
    p.add_option(CoapOption::UriPath, bad);
    let resp = exchange(&dev, &p);
    assert_eq!(code(&resp), ResponseType::BadRequest, "{}", diag(&resp));
    assert_eq!(names(&d), vec!["good".to_string()]);
}

/// Raw bytes on a fresh connection; the whole answer (the daemon closes after an error).
fn raw_http(d: &Daemon, bytes: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(d.rest).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

#[test]
fn http_parse_errors_carry_the_json_error_body() {
    let d = Daemon::in_process();
    let long_header = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    // (request, the statuses that fit it)
    let cases: [(&[u8], &[u16]); 5] = [
        (b"GARBAGE\r\n\r\n", &[400]),
        (b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n", &[400]),
        (b"GET / HTTP/9.9\r\n\r\n", &[400, 505]),
        (long_header.as_bytes(), &[431]),
        (long_uri.as_bytes(), &[414, 431]),
    ];
    for (bytes, want) in cases {
        let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned();
        let (status, head, body) = raw_http(&d, bytes);
        assert!(want.contains(&status), "{shown:?}: {head}");
        assert!(
            head.contains("content-type: application/json"),
            "{shown:?}: {head}"
        );
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{shown:?}: body {body:?} is not JSON: {e}"));
        assert!(v["type"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    // The daemon is still serving, and counted them.
    assert_eq!(d.get("/endpoints").status, 200);
    let metrics = d.get("/metrics").body;
    for status in [400, 431] {
        let line = format!("connectord_rest_responses_total{{status=\"{status}\"}} ");
        assert!(metrics.contains(&line), "{status} not counted: {metrics}");
    }
}
