//! Requests to devices, as stored until answered.

use serde::{Deserialize, Serialize};

/// The operation on a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    Get,
    Put,
    Post,
    Delete,
    /// GET with Observe=0: establishes an observation for a subscription.
    Observe,
}

/// An accepted request, as stored until it is answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The async-response id.
    pub id: String,
    /// The access key whose channel gets the answer.
    pub key_id: String,
    pub domain: String,
    pub ep: String,
    pub method: Method,
    /// Resource path with a leading slash.
    pub path: String,
    /// Request body, base64.
    pub payload: String,
    pub content_format: Option<u16>,
    /// The CoAP Accept option sent with the request.
    #[serde(default)]
    pub accept: Option<u16>,
    /// `accept` was the daemon's choice, not the application's: a device that answers
    /// it 4.06 (or 4.15) is asked again without it.
    #[serde(default)]
    pub accept_fallback: bool,
    /// The application asked for `application/json`: the answer is decoded into the JSON
    /// value tree of the daemon's `lwm2m_data`.
    #[serde(default)]
    pub as_json: bool,
    pub created_ms: u64,
    /// Made by the daemon itself (a pre-subscription or a re-observe): not stored, and
    /// its outcome is no async response.
    #[serde(default)]
    pub internal: bool,
    /// The store's row number of this request (0 until stored; internal jobs are not).
    /// Not part of the stored record: the store keys the record by it.
    #[serde(skip)]
    pub row: u64,
}
