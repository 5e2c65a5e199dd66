//! A registration as stored.

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::peer::PeerRef;

/// A registration as it is stored: everything needed to rebuild the endpoint after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    /// The registration id, the last segment of the `Location-Path` (`rd/{id}`).
    pub id: String,
    pub domain: String,
    /// The endpoint name (`ep=`), unique within the domain.
    pub name: String,
    /// The endpoint type (`et=`).
    pub ept: Option<String>,
    pub lifetime_s: u32,
    /// The binding mode (`b=`), `U` when absent.
    pub binding: String,
    /// The LwM2M version (`lwm2m=`).
    pub lwm2m: Option<String>,
    /// Queue mode: `b=UQ` (LwM2M 1.0) or the bare `Q` parameter (LwM2M 1.1).
    pub queue: bool,
    /// Where the device's last message came from (the listener that received it and the
    /// device's session there): requests to it go back the same way.
    pub peer: PeerRef,
    /// The link-format body as registered (or last updated). Shared: the devices of one
    /// firmware register the same object list, and the registry keeps one copy of each
    /// (issue 24, memory per endpoint). Stored as a JSON string like any other.
    #[serde(serialize_with = "links_out", deserialize_with = "links_in")]
    pub links: Arc<str>,
    pub registered_at_ms: u64,
    pub expires_at_ms: u64,
    /// The cluster node that owns this registration (`[cluster] node`, issue 22): the one
    /// the device registered with, which runs its expiry and publishes its events. `None`
    /// on a single node (SQLite) and in records stored before ownership existed; absent
    /// from the JSON form when `None`, so older records read unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

fn links_out<S: Serializer>(links: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(links)
}

fn links_in<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    Ok(Arc::from(&*s))
}
