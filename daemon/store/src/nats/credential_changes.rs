//! Device credentials followed by every node (issue 22): the daemon keeps the PSKs and
//! the issued certificates in memory for its handshakes (`DeviceCredentials`), so a node
//! must learn of another node's changes. [`NatsStore::credential_changes`] moves when
//! another node (another `Cd-Node`) writes to `<p>_psks` or `<p>_certificates`; this
//! node's own writes do not move it (its memory follows them already).
//!
//! Decision: a signal, not the changed records: the daemon reads every credential again
//! ([`CredentialStore::load_psks`](crate::CredentialStore),
//! `load_certificates`) and compares, which also finds what it takes away (a replaced or
//! removed PSK, a revoked certificate) to close the sessions that used it. One read per
//! burst of changes (the watch coalesces them while a read runs): provisioning many
//! devices through one node costs the other nodes a few whole reads, not one per device.

use std::sync::Arc;

use async_nats::jetstream::consumer;
use futures_util::StreamExt;
use tokio::sync::watch;

use super::{NODE_HEADER, NatsStore, Shared};
use crate::StoreError;

impl Shared {
    /// Follows other nodes' writes to `bucket` into `changes` (headers only).
    pub(super) async fn watch_credential_bucket(
        self: Arc<Self>,
        bucket: String,
        changes: Arc<watch::Sender<u64>>,
    ) -> Result<tokio::task::JoinHandle<()>, StoreError> {
        let (mut messages, _) = self
            .ordered(&bucket, consumer::DeliverPolicy::New, true)
            .await?;
        Ok(tokio::spawn(async move {
            while let Some(m) = messages.next().await {
                let Ok(m) = m else { continue };
                let other = m
                    .message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(NODE_HEADER))
                    .is_none_or(|n| n.as_str() != self.node);
                if other {
                    changes.send_modify(|n| *n += 1);
                }
            }
            tracing::error!(
                "store: the {bucket} watch ended; other nodes' credential changes are no longer followed"
            );
        }))
    }
}

impl NatsStore {
    /// Moves (a counter) each time another node changes a PSK or a certificate record:
    /// read the credentials again. Never moves for this node's own writes.
    pub fn credential_changes(&self) -> watch::Receiver<u64> {
        self.credentials.subscribe()
    }
}
