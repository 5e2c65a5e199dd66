//! Building HTTP responses: JSON bodies, JSON errors, text.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

/// A response under construction.
#[derive(Debug)]
pub struct Reply {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    head: bool,
}

impl Reply {
    pub fn with_type(
        status: StatusCode,
        content_type: &'static str,
        body: impl Into<Bytes>,
    ) -> Reply {
        Reply {
            status,
            headers: vec![(CONTENT_TYPE, HeaderValue::from_static(content_type))],
            body: body.into(),
            head: false,
        }
    }

    pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Reply {
        match serde_json::to_vec(value) {
            Ok(b) => Reply::with_type(status, "application/json", b),
            Err(e) => {
                tracing::error!("cannot serialise a JSON reply: {e}");
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "internal error",
                )
            }
        }
    }

    pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
        Reply::with_type(status, "text/plain; charset=utf-8", body)
    }

    /// A reply with headers given as strings (a plugin's answer); invalid names or values
    /// are left out and logged.
    pub fn raw(
        status: StatusCode,
        headers: &std::collections::BTreeMap<String, String>,
        body: String,
    ) -> Reply {
        let mut r = Reply::empty(status);
        r.body = body.into();
        for (k, v) in headers {
            match (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                (Ok(k), Ok(v)) => r.headers.push((k, v)),
                _ => tracing::warn!("dropping invalid header {k:?} from a plugin's answer"),
            }
        }
        r
    }

    pub fn empty(status: StatusCode) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            head: false,
        }
    }

    /// Adds a header; a value that is not a valid header value is left out and logged.
    pub fn header(mut self, name: HeaderName, value: &str) -> Reply {
        match HeaderValue::from_str(value) {
            Ok(v) => self.headers.push((name, v)),
            Err(_) => tracing::error!("invalid value for header {name}"),
        }
        self
    }

    /// For HEAD requests: keep the headers, send no body.
    pub fn method_is_head(mut self, head: bool) -> Reply {
        self.head = head;
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let len = self.body.len();
        let body = if self.head { Bytes::new() } else { self.body };
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = self.status;
        let h = r.headers_mut();
        for (k, v) in self.headers {
            h.append(k, v);
        }
        if self.head {
            h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        r
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

/// The JSON error every route uses: `{"type": kind, "message": message}`.
pub fn error(status: StatusCode, kind: &str, message: &str) -> Reply {
    Reply::json(status, &ErrorBody { kind, message })
}
