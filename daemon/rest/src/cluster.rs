//! `GET /v2/cluster` (issue 22): which store backend this node runs on, its name, and the
//! members of the cluster as their heartbeats last said.
//!
//! Decision: the answer is the list the daemon's heartbeat task last read (every
//! [`HEARTBEAT_EVERY`], see the daemon's `cluster` wiring), not a read of the store per
//! request, so the route and `/metrics` never wait on NATS; a member may be up to one
//! heartbeat late to appear or to drop out (plus the 6 s a silent node's record lives).
//! On SQLite the only member is this node.

use std::sync::RwLock;
use std::time::Duration;

use serde::Serialize;

/// How often a NATS node heartbeats and reads the members again.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterMember {
    /// `[cluster] node`.
    pub node: String,
    /// Its bound REST addresses.
    pub rest: Vec<String>,
    /// Its bound CoAP (UDP) addresses.
    pub coap: Vec<String>,
    /// When it started, Unix seconds.
    pub started: u64,
    /// Its connectord version.
    pub version: String,
}

/// What `GET /v2/cluster` answers, kept current by the daemon.
#[derive(Debug)]
pub struct ClusterView {
    backend: &'static str,
    node: String,
    members: RwLock<Vec<ClusterMember>>,
}

/// The body of `GET /v2/cluster`.
#[derive(Debug, Serialize)]
struct Body<'a> {
    backend: &'a str,
    node: &'a str,
    members: &'a [ClusterMember],
}

impl ClusterView {
    /// `backend`: `sqlite` or `nats`; `members` as known at start (this node).
    pub fn new(backend: &'static str, node: String, members: Vec<ClusterMember>) -> ClusterView {
        ClusterView {
            backend,
            node,
            members: RwLock::new(members),
        }
    }

    /// Replaces the members (sorted by name by the caller).
    pub fn set_members(&self, members: Vec<ClusterMember>) {
        *self.members.write().unwrap_or_else(|p| p.into_inner()) = members;
    }

    /// How many members are known now.
    pub fn member_count(&self) -> usize {
        self.members.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The JSON body of `GET /v2/cluster`.
    pub fn body(&self) -> serde_json::Value {
        let members = self.members.read().unwrap_or_else(|p| p.into_inner());
        serde_json::to_value(Body {
            backend: self.backend,
            node: &self.node,
            members: &members,
        })
        .unwrap_or_default()
    }
}
