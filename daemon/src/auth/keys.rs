//! Connector access keys (seed 000): opaque Bearer tokens, stored only as SHA-256 hashes.
//!
//! A presented key is hashed and looked up by its hash. Comparing digests of a secret
//! leaks nothing useful through timing (an attacker cannot steer the digest), so the lookup
//! itself is the constant-time comparison the design asks for.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{AuthBackend, Principal, Scope, Verdict, bearer};
use crate::store::{Store, StoreError};

/// Length of a generated access key, as in the seed's examples.
pub const KEY_LEN: usize = 100;

/// File in the state directory that holds the first admin key.
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// A stored access key. The key itself is never stored, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKeyRecord {
    pub id: String,
    pub name: String,
    pub domain: String,
    /// Hex SHA-256 of the key.
    pub hash: String,
    pub scopes: Vec<String>,
    pub created_at_ms: u64,
}

/// Hex SHA-256 of a key.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random alphanumeric key.
pub fn generate_key() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), KEY_LEN)
}

/// The access-key backend: keys held in memory by hash, persisted in the store.
pub struct CoreKeys {
    by_hash: RwLock<HashMap<String, AccessKeyRecord>>,
    store: Arc<dyn Store>,
}

impl CoreKeys {
    /// Loads every stored key.
    pub async fn load(store: Arc<dyn Store>) -> Result<CoreKeys, StoreError> {
        let records = store.load_access_keys().await?;
        let by_hash = records.into_iter().map(|r| (r.hash.clone(), r)).collect();
        Ok(CoreKeys {
            by_hash: RwLock::new(by_hash),
            store,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.read().map(|m| m.is_empty()).unwrap_or(true)
    }

    /// Creates a key, stores its hash durably and returns the key (shown once).
    pub async fn create(
        &self,
        name: &str,
        domain: &str,
        scopes: Vec<String>,
    ) -> Result<(String, AccessKeyRecord), StoreError> {
        let key = generate_key();
        let rec = AccessKeyRecord {
            id: hex::encode(rand::random::<[u8; 8]>()),
            name: name.to_string(),
            domain: domain.to_string(),
            hash: hash_key(&key),
            scopes,
            created_at_ms: crate::registry::now_ms(),
        };
        self.store.put_access_key(rec.clone()).await?;
        if let Ok(mut m) = self.by_hash.write() {
            m.insert(rec.hash.clone(), rec.clone());
        }
        Ok((key, rec))
    }

    /// At first start (no key stored at all) creates an admin key for `domain` and writes
    /// it to `admin.key` in the state directory, readable by the owner only. Returns the
    /// file's path when a key was created.
    pub async fn ensure_first_admin(
        &self,
        state_dir: &Path,
        domain: &str,
    ) -> Result<Option<PathBuf>, FirstKeyError> {
        if !self.is_empty() {
            return Ok(None);
        }
        let path = state_dir.join(ADMIN_KEY_FILE);
        let (key, _) = self
            .create("admin", domain, vec![Scope::Admin.as_str().to_string()])
            .await?;
        write_private(&path, &format!("{key}\n")).map_err(|source| FirstKeyError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(Some(path))
    }
}

/// The first admin key could not be made.
#[derive(Debug, thiserror::Error)]
pub enum FirstKeyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the first admin key to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

impl AuthBackend for CoreKeys {
    fn name(&self) -> &str {
        "connector"
    }

    fn authenticate(&self, headers: &http::HeaderMap) -> Verdict {
        let Some(token) = bearer(headers) else {
            return Verdict::NotMine;
        };
        let hash = hash_key(token);
        let Ok(map) = self.by_hash.read() else {
            return Verdict::Refused("access keys unavailable".into());
        };
        match map.get(&hash) {
            Some(rec) => Verdict::Accepted(Principal {
                backend: self.name().to_string(),
                key_id: rec.id.clone(),
                domain: rec.domain.clone(),
                scopes: rec.scopes.clone(),
            }),
            None => Verdict::NotMine,
        }
    }
}
