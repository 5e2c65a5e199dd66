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
    /// Made through `POST /v2/device-requests/{device-id}` (issue 23): `id` is the
    /// client's `async-id`, and these are its retry and expiry terms. `None` for the
    /// `/endpoints/{ep}/{path}` requests (and left out of their stored record, which
    /// stays as it was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_request: Option<DeviceRequestTerms>,
    /// Delivery attempts made so far (in memory only; see [`DeviceRequestTerms::retry`]).
    #[serde(skip)]
    pub attempts: u32,
    /// The store's row number of this request (0 until stored; internal jobs are not).
    /// Not part of the stored record: the store keys the record by it.
    #[serde(skip)]
    pub row: u64,
}

/// The delivery terms of a request made through `POST /v2/device-requests/{device-id}`
/// (Pelion's Connect API, issue 23), stored with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRequestTerms {
    /// When the request is discarded unanswered (answered `504 REQUEST_EXPIRED` on the
    /// channel), in milliseconds since the Unix epoch: absolute, so a restart does not
    /// extend it.
    pub expires_ms: u64,
    /// Delivery attempts allowed after the first failed one (`retry`). The attempts made
    /// are counted in memory only: a restart gives a stored request its retries again
    /// (its expiry still bounds it).
    pub retry: u32,
}
