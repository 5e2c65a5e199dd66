//! Building HTTP responses: JSON bodies, JSON errors, text.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use hyper::body::{Frame, SizeHint};
use serde::Serialize;

use super::conn::Activity;
use crate::events::hub::Ticket;

/// A response under construction.
#[derive(Debug)]
pub struct Reply {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    head: bool,
    /// A long-poll answer's hold on its batch (see [`Body`]).
    ticket: Option<Ticket>,
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
            ticket: None,
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
            ticket: None,
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

    /// The body is a long-poll answer: `ticket` learns whether it reached the connection.
    pub fn holding(mut self, ticket: Ticket) -> Reply {
        self.ticket = Some(ticket);
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

    /// The body as text (unit tests).
    #[cfg(test)]
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn into_response(self) -> Response<Body> {
        let len = self.body.len();
        let body = if self.head { Bytes::new() } else { self.body };
        let mut r = Response::new(Body {
            data: (!body.is_empty()).then_some(body),
            written: false,
            ticket: self.ticket,
            conn: None,
        });
        *r.status_mut() = self.status;
        let h = r.headers_mut();
        for (k, v) in self.headers {
            h.append(k, v);
        }
        if self.head {
            h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        // Decision (issue 25 review of the console): every answer but the console's files
        // (which say `no-cache` with an ETag themselves) is one key's view of the state, so
        // none may be stored by a cache. RFC 9111 §3.5 keeps shared caches from storing
        // answers to requests with credentials already; a proxy set up to cache
        // everything would not. And no content is to be sniffed as another type.
        if !h.contains_key(http::header::CACHE_CONTROL) {
            h.insert(
                http::header::CACHE_CONTROL,
                HeaderValue::from_static("no-store"),
            );
        }
        if !h.contains_key(http::header::X_CONTENT_TYPE_OPTIONS) {
            h.insert(
                http::header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
        }
        r
    }
}

/// A response body: the reply's bytes as one frame (as `http_body_util::Full`).
///
/// A long-poll answer's body carries its [`Ticket`]. When hyper drops the body, the frame
/// was taken or not: taken, the answer was handed to the connection ([`Ticket::sent`]),
/// and the connection ([`Activity::on_failure`]) puts the batch back if it fails before the
/// client asks again; not taken (the connection ended first, a HEAD), the ticket's drop
/// puts the batch back at once.
#[derive(Debug)]
pub struct Body {
    data: Option<Bytes>,
    /// The frame was handed to hyper.
    written: bool,
    ticket: Option<Ticket>,
    /// The connection the body is written to; set only for a body with a ticket.
    conn: Option<Arc<Activity>>,
}

impl Body {
    /// Names the connection this body is written to.
    pub fn on_connection(&mut self, conn: &Arc<Activity>) {
        if self.ticket.is_some() {
            self.conn = Some(Arc::clone(conn));
        }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let frame = this.data.take().map(|d| Ok(Frame::data(d)));
        this.written |= frame.is_some();
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        if !self.written {
            // Never written: dropping the ticket puts the batch back.
            return;
        }
        let answer = ticket.sent();
        if let Some(conn) = &self.conn {
            conn.on_failure(Box::new(move || answer.put_back()));
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

/// The JSON error every route uses: `{"type": kind, "message": message}`.
/// A JSON body that must be an object, read into `T` (serde would also fill a struct from
/// an array of its fields); otherwise a 400 `bad_request`: `not_object` when it is JSON
/// but no object, `invalid` followed by serde's reason when it does not read as `T`.
pub fn json_object_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    not_object: &str,
    invalid: &str,
) -> Result<T, Reply> {
    let fields = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => return Err(error(StatusCode::BAD_REQUEST, "bad_request", not_object)),
        Err(e) => Err(e),
    };
    fields.and_then(serde_json::from_value).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("{invalid}: {e}"),
        )
    })
}

/// The message of a 503 answered because the state store is failing.
pub const STORE_FAILING: &str = "the state store is failing (see GET / and the daemon's log); nothing was changed, try again later";

/// A store error as the answer to a request that needed the store. The storage failing
/// (full, read-only, I/O error, corrupt: [`StoreError::is_unavailable`]) is 503 with
/// kind `store_unavailable`, logged by the store itself (once, not per request); any
/// other store error is 500, logged here with `context`.
///
/// [`StoreError::is_unavailable`]: crate::store::StoreError::is_unavailable
pub fn store_failure(e: &crate::store::StoreError, context: &str) -> Reply {
    // Another node, not this node's store: its own reason (an outside review found a
    // long-poll whose channel owner was killed told "the state store is failing").
    if let crate::store::StoreError::PeerUnreachable(why) = e {
        tracing::debug!("{context}: {why}");
        return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", why);
    }
    if e.is_unavailable() {
        tracing::debug!("{context}: {e}");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            STORE_FAILING,
        );
    }
    tracing::error!("{context}: {e}");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "storage failure",
    )
}

pub fn error(status: StatusCode, kind: &str, message: &str) -> Reply {
    Reply::json(status, &ErrorBody { kind, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 25 review: API answers (errors included) are `Cache-Control: no-store` and
    /// `nosniff`; an answer that says its own caching (the console's files) keeps it.
    #[test]
    fn api_answers_are_not_stored_by_caches() {
        for reply in [
            Reply::json(StatusCode::OK, &serde_json::json!([])),
            error(StatusCode::UNAUTHORIZED, "unauthorized", "no key"),
            Reply::empty(StatusCode::NO_CONTENT),
        ] {
            let r = reply.into_response();
            assert_eq!(r.headers()[http::header::CACHE_CONTROL], "no-store");
            assert_eq!(r.headers()[http::header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
        let own = Reply::text(StatusCode::OK, "x")
            .header(http::header::CACHE_CONTROL, "no-cache")
            .into_response();
        assert_eq!(own.headers()[http::header::CACHE_CONTROL], "no-cache");
        assert_eq!(
            own.headers()
                .get_all(http::header::CACHE_CONTROL)
                .iter()
                .count(),
            1
        );
    }
}
