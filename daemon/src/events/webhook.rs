//! HTTP(S) delivery of notification batches to a callback URL (the webhook sink).
//! (Interface fixed; implementation in progress.)

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Where a key's notifications go: `PUT /notification/callback` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackTarget {
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// The outcome of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The receiver took the batch (2xx).
    Accepted,
    /// Try again later (connection failure, timeout, 5xx, 408, 429).
    Retry(String),
    /// The receiver refuses this batch for good (other 4xx): it is discarded.
    Refused(String),
}

/// Why the webhook client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot read CA file {path}: {message}")]
    Ca { path: String, message: String },
}

/// An HTTP/1.1 + HTTP/2 client with rustls for `https://` URLs.
pub struct Webhook {
    _timeout: Duration,
}

impl Webhook {
    pub fn new(timeout: Duration, _extra_ca_file: Option<&Path>) -> Result<Webhook, WebhookError> {
        Ok(Webhook { _timeout: timeout })
    }

    pub async fn verify(&self, _target: &CallbackTarget) -> Result<(), String> {
        Err("webhook client not implemented yet".into())
    }

    pub async fn deliver(&self, _target: &CallbackTarget, _body: Bytes) -> Delivery {
        Delivery::Retry("webhook client not implemented yet".into())
    }
}
