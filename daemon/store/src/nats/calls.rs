//! Calls between the nodes of a cluster (issue 22): NATS request/reply on core NATS (not
//! JetStream: a call is answered or fails, nothing is stored).
//!
//! A node serves the subjects `<p>.node.<node>.<op>` ([`NatsStore::serve_calls`], `<node>`
//! one token as in [`enc`]); another node calls one with [`NatsStore::call_node`] and gets
//! the answer's bytes, or a [`CallError`] that says whether nobody serves that node (it is
//! gone: no responders), the call timed out, or NATS could not be reached. What the bytes
//! mean is the caller's and the server's business (the daemon's `cluster` module: JSON).
//! Each call carries the header `Cd-Node` naming the caller, and `Cd-Deadline`: when the
//! caller stops waiting for the answer (Unix ms). A call that reaches its node after that
//! is dropped unread ([`NodeCalls::next`]): NATS buffers a publish while its client is
//! disconnected and sends it on reconnection, so a forwarded request answered 503 to its
//! REST client was carried out on the device 30–40 s later, under an async id nobody was
//! given (found by an outside review). Decision: a wall-clock deadline, so the nodes'
//! clocks must agree to well within `[cluster] timeout_ms` (NTP does); a node whose clock
//! runs ahead drops calls its caller still waits for (they time out, 503).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::client::RequestErrorKind;
use bytes::Bytes;
use futures_util::StreamExt;

use connectord_model::now_ms;

use super::{NODE_HEADER, NatsStore, enc, unavailable};
use crate::StoreError;

/// The header that says when the caller stops waiting (Unix ms).
pub const DEADLINE_HEADER: &str = "Cd-Deadline";

/// Calls dropped for their deadline are logged at most once per this long.
const DROPPED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why [`NatsStore::call_node`] got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No process serves that node's calls (it stopped, or never ran).
    #[error("cluster node {0} does not answer (no node of that name is connected)")]
    NoNode(String),
    /// The node did not answer within the timeout.
    #[error("cluster node {node} did not answer within {ms} ms")]
    Timeout { node: String, ms: u64 },
    /// NATS itself failed (not connected, the subject refused, ...).
    #[error("calling cluster node {node}: {reason}")]
    Unavailable { node: String, reason: String },
}

/// One call made to this node ([`NodeCalls::next`]).
pub struct NodeCall {
    /// The operation: the last token of the subject.
    pub op: String,
    /// The calling node's name (its `Cd-Node` header), if it gave one.
    pub from: Option<String>,
    pub body: Bytes,
    reply: Option<async_nats::Subject>,
    client: async_nats::Client,
}

impl NodeCall {
    /// Answers the call. A call made without a reply subject (published, not requested)
    /// is answered by nobody; that is not an error.
    pub async fn answer(self, body: Bytes) -> Result<(), StoreError> {
        let Some(reply) = self.reply else {
            return Ok(());
        };
        self.client
            .publish(reply, body)
            .await
            .map_err(unavailable)?;
        // Publishes are buffered; a call waits for its answer, so send it now.
        self.client.flush().await.map_err(unavailable)
    }
}

/// The calls to this node, in arrival order ([`NatsStore::serve_calls`]).
pub struct NodeCalls {
    sub: futures_util::stream::SelectAll<async_nats::Subscriber>,
    client: async_nats::Client,
    /// Calls dropped past their deadline since the last log line, and when that was.
    dropped: u64,
    logged: Option<std::time::Instant>,
}

impl NodeCalls {
    /// The calls of several subscriptions, each in its arrival order.
    pub(super) fn merged(
        sub: futures_util::stream::SelectAll<async_nats::Subscriber>,
        client: async_nats::Client,
    ) -> NodeCalls {
        NodeCalls {
            sub,
            client,
            dropped: 0,
            logged: None,
        }
    }

    /// The next call; `None` once the subscription ended (the store was dropped). A call
    /// whose caller has stopped waiting (past its `Cd-Deadline`) is dropped unread, and
    /// counted in a log line at most every 10 s.
    pub async fn next(&mut self) -> Option<NodeCall> {
        let m = loop {
            let m = self.sub.next().await?;
            let deadline = m
                .headers
                .as_ref()
                .and_then(|h| h.get(DEADLINE_HEADER))
                .and_then(|v| v.as_str().parse::<u64>().ok());
            if deadline.is_none_or(|d| now_ms() <= d) {
                break m;
            }
            self.dropped += 1;
            let now = std::time::Instant::now();
            if self
                .logged
                .is_none_or(|t| now.duration_since(t) >= DROPPED_LOG_INTERVAL)
            {
                tracing::warn!(
                    "dropped {} calls from other nodes that arrived after their callers had \
                     stopped waiting (the last {} ms late: a connection to NATS that came \
                     back, a node that could not keep up, or clocks of the nodes that \
                     disagree: check NTP); they were answered 503 there and are not carried out",
                    self.dropped,
                    deadline.map_or(0, |d| now_ms().saturating_sub(d))
                );
                self.dropped = 0;
                self.logged = Some(now);
            }
        };
        let op = m.subject.rsplit('.').next().unwrap_or_default().to_string();
        let from = m
            .headers
            .as_ref()
            .and_then(|h| h.get(NODE_HEADER))
            .map(|v| v.as_str().to_string());
        Some(NodeCall {
            op,
            from,
            body: m.payload,
            reply: m.reply,
            client: self.client.clone(),
        })
    }
}

impl NatsStore {
    pub(super) fn node_subject(&self, node: &str, op: &str) -> String {
        format!("{}.{}.{op}", self.shared.names.node_subject, enc(node))
    }

    /// Subscribes to this node's calls (`<p>.node.<this node>.*`). Call once per process;
    /// a second subscription would split nothing but receive every call twice.
    pub async fn serve_calls(&self) -> Result<NodeCalls, StoreError> {
        self.serve_subjects(&[self.node_subject(&self.shared.node, "*")])
            .await
    }

    /// The calls on `subjects`, once the server has their subscriptions (so that a caller
    /// told this node serves them finds it).
    pub(super) async fn serve_subjects(
        &self,
        subjects: &[String],
    ) -> Result<NodeCalls, StoreError> {
        let mut subs = futures_util::stream::SelectAll::new();
        for subject in subjects {
            let sub = self
                .shared
                .client
                .subscribe(subject.clone())
                .await
                .map_err(unavailable)?;
            subs.push(sub);
        }
        self.confirm_subscribed().await?;
        Ok(NodeCalls::merged(subs, self.shared.client.clone()))
    }

    /// Returns once the server has every subscription this connection made so far.
    /// `flush` only writes the socket; a request on the same connection, answered by the
    /// server after it read the SUBs before it (one connection's protocol is read in
    /// order), proves it: to a subject nobody serves (3 tokens, so no node's
    /// `<p>.node.<node>.*`), answered "no responders" by the server itself. Without it
    /// another node's call right after a `serve_*` returned could find no responders
    /// (seen under load in `a_node_calls_another_and_gets_its_answer`).
    pub(super) async fn confirm_subscribed(&self) -> Result<(), StoreError> {
        let probe = format!("{}._subscribed", self.shared.names.node_subject);
        let req = async_nats::Request::new().timeout(Some(self.shared.timeout));
        match self.shared.client.send_request(probe, req).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == RequestErrorKind::NoResponders => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Calls `op` on `node` with `body` and waits at most `timeout` for its answer.
    /// `op` is one subject token (`[a-z_]+`, the caller's constant).
    pub async fn call_node(
        &self,
        node: &str,
        op: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        // This node without its server: fails at once, naming this node, rather than
        // waiting out the timeout with the call in the client's buffer and blaming `node`
        // (found by an outside review), as the store's writes do.
        if self.shared.client.connection_state() != async_nats::connection::State::Connected {
            return Err(CallError::Unavailable {
                node: node.to_string(),
                reason: format!(
                    "this node ({}) is not connected to any NATS server",
                    self.shared.node
                ),
            });
        }
        let mut headers = HeaderMap::new();
        headers.insert(NODE_HEADER, self.shared.node.as_str());
        let deadline = now_ms().saturating_add(timeout.as_millis() as u64);
        headers.insert(DEADLINE_HEADER, deadline.to_string().as_str());
        let req = async_nats::Request::new()
            .payload(body)
            .headers(headers)
            .timeout(Some(timeout));
        match self
            .shared
            .client
            .send_request(self.node_subject(node, op), req)
            .await
        {
            Ok(m) => Ok(m.payload),
            Err(e) => Err(match e.kind() {
                RequestErrorKind::NoResponders => CallError::NoNode(node.to_string()),
                RequestErrorKind::TimedOut => CallError::Timeout {
                    node: node.to_string(),
                    ms: timeout.as_millis() as u64,
                },
                _ => CallError::Unavailable {
                    node: node.to_string(),
                    reason: e.to_string(),
                },
            }),
        }
    }
}
