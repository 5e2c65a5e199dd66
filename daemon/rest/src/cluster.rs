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
    /// The notification channels it delivers (holds the lease of), as its last heartbeat
    /// said; the answering node's own entry shows its current count instead.
    pub owned_channels: u64,
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
    members: Vec<MemberBody<'a>>,
}

/// A member in `GET /v2/cluster`: its record and how many endpoints it owns.
#[derive(Debug, Serialize)]
struct MemberBody<'a> {
    #[serde(flatten)]
    member: &'a ClusterMember,
    /// Endpoints registered with it, as this node's directory lists them (issue 22).
    owned_endpoints: usize,
    /// This node's only: REST requests it forwarded to their device's owner (`out`) and
    /// handled for another node (`in`) since it started.
    #[serde(skip_serializing_if = "Option::is_none")]
    forwarded_requests: Option<ForwardedBody>,
}

/// `forwarded_requests` of this node's member entry.
#[derive(Debug, Serialize)]
struct ForwardedBody {
    out: u64,
    #[serde(rename = "in")]
    in_: u64,
}

/// Endpoints by owner node, as `Directory::count_by_owner` counts them.
pub type Owners = std::collections::BTreeMap<Option<String>, usize>;

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

    /// The names of the members known now, sorted.
    pub fn member_names(&self) -> Vec<String> {
        let members = self.members.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = members.iter().map(|m| m.node.clone()).collect();
        v.sort();
        v
    }

    /// How many members are known now.
    pub fn member_count(&self) -> usize {
        self.members.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// How many endpoints node `node` owns in `owners`: those recording it, and for this
    /// node also those recording no owner (a single node's, or records older than issue 22).
    pub fn owned(&self, owners: &Owners, node: &str) -> usize {
        let mine = if node == self.node {
            owners.get(&None).copied().unwrap_or(0)
        } else {
            0
        };
        mine + owners.get(&Some(node.to_string())).copied().unwrap_or(0)
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The JSON body of `GET /v2/cluster`; `owners` the directory's endpoints by owner,
    /// `forwarded` this node's forwarded requests (out, in), `owned_channels` this node's
    /// channels now.
    pub fn body(
        &self,
        owners: &Owners,
        forwarded: (u64, u64),
        owned_channels: u64,
    ) -> serde_json::Value {
        let members = self.members.read().unwrap_or_else(|p| p.into_inner());
        let current: Vec<ClusterMember> = members
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if m.node == self.node {
                    m.owned_channels = owned_channels;
                }
                m
            })
            .collect();
        let members = current
            .iter()
            .map(|m| MemberBody {
                member: m,
                owned_endpoints: self.owned(owners, &m.node),
                forwarded_requests: (m.node == self.node).then_some(ForwardedBody {
                    out: forwarded.0,
                    in_: forwarded.1,
                }),
            })
            .collect();
        serde_json::to_value(Body {
            backend: self.backend,
            node: &self.node,
            members,
        })
        .unwrap_or_default()
    }
}
