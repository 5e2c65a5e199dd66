//! The Pelion Connectivity Management auth backend (plugin `pelion`, kind [`Kind::Auth`]):
//! users with permissions, applications, and access keys (seed 001). The operator's guide
//! is `docs/auth-pelion.md`; this is the reference.
//!
//! # Model
//!
//! - A **user** has a name (unique in its domain), a domain, [`Permission`]s, and the
//!   core scopes it holds: the ceiling for the access keys it creates (`admin` in a user's
//!   scopes lets it grant any scope). Each user has a **user token**, shown once when the
//!   user is created, for the management API.
//! - An **application** belongs to the user who created it (its `owner`) and to that user's
//!   domain; it has a name and a description, and is `active` or `revoked`. A user may own
//!   at most [`MAX_ACTIVE_APPLICATIONS`] active applications; revoked ones do not count.
//!   Revoking is final (there is no way back to `active`).
//! - An **access key** belongs to an application and records who created it. Its scopes and
//!   optional expiry are chosen at creation and never change; its name and description may
//!   be edited. Status: `revoked` (final), else `expired` once the clock reaches its expiry,
//!   else `active`. An application holds at most [`MAX_ACTIVE_KEYS`] active keys; revoked and
//!   expired ones do not count.
//!
//! # Credentials
//!
//! Both access keys and user tokens are sent as `Authorization: Bearer <secret>`. Secrets
//! are 48 random alphanumeric characters from a CSPRNG; only their SHA-256 digest
//! (lower-case hex) is stored, and they are looked up by that digest (never compared as
//! plain text). `OP_AUTHENTICATE` answers:
//!
//! - an access key: `Refused` when the key is revoked or expired, its application is
//!   revoked or gone, or the user who owns the application or created the key no longer
//!   exists; else `Accepted` with key_id = the key's id, domain = the owning user's
//!   domain, scopes = the key's scopes;
//! - a user token: `Accepted` with key_id `user:<user id>`, the user's domain and no scope
//!   at all, so that it opens only this plugin's routes (declared with scope
//!   `authenticated`);
//! - anything else (no header, another scheme, an unknown secret, including the token of a
//!   deleted user): `NotMine`, so that another backend may claim it.
//!
//! # Management API
//!
//! Routes under [`PREFIX`] (`/pelion/v1`), all declared with scope `authenticated`; the
//! plugin checks the caller itself. Only a caller authenticated with a Pelion user token is
//! let through: the principal's key_id must be `user:<id>` *and* the request's bearer
//! token must be that user's token (so a principal of another backend that happens to
//! use a `user:` key_id is not trusted). Anyone else (another backend's principal, a
//! Pelion access key) gets 403. Objects of other domains do not exist for the caller
//! (404). See [`api`] for the routes and the permission each needs.
//!
//! Deleting a user revokes the applications it owns, every key of those applications,
//! and every key it created in other users' applications, then deletes the user; keys
//! are also refused at authentication whenever their application's owner or their creator
//! is missing, so they stop working even if a revocation could not be written.
//!
//! # Operations
//!
//! - `OP_BOOTSTRAP` creates nothing (it logs how to create the first user when there is
//!   none).
//! - [`OP_CREATE_USER`] (`connectord plugin-call pelion create_user '<json>'`): input
//!   `{"name", "domain", "permissions": [...], "scopes": [...]}` (unknown fields refused;
//!   permissions and scopes default to none), answer `{"id", "token"}`. It is not limited by
//!   any caller's permissions: it is the operator's way in.
//! - `OP_ROUTES` / `OP_HTTP`: the management API.
//! - `OP_KEY_STATUS`: for the host's check of a key minted by a Pelion key (a Connector
//!   key created with `POST /api/api_tokens`): an access key is `active` when
//!   authentication would accept it, `revoked` when it exists but would be refused (so
//!   revoking a key, its application or deleting its user revokes what it minted too), a
//!   user token `active` while its user exists; anything else `unknown`.
//!
//! # State
//!
//! Host state, JSON values: `user/<id>`, `app/<id>`, `key/<id>` (see the record types).
//! Everything is loaded in [`Plugin::create`]; every change is written (and durable) before
//! the in-memory copy changes and before the answer. A record that cannot be parsed is
//! logged and skipped.
//!
//! Configuration: none; `{}` is accepted and any field is refused by name.

use std::collections::{BTreeMap, HashMap};

use crate::time::now_ms;
use connectord_plugin_sdk::auth::{
    ADMIN, AuthRequest, AuthVerdict, BootstrapRequest, BootstrapResponse, KeyState,
    KeyStatusRequest, KeyStatusResponse, PrincipalSpec, SCOPES, bearer_token,
};
use connectord_plugin_sdk::http::{HttpRequest, HttpResponse, RoutesResponse};
use connectord_plugin_sdk::secret::{is_sha256_hex, random_alphanumeric, sha256_hex};
use connectord_plugin_sdk::{AuthPlugin, Host, Plugin, RoutesPlugin, declare_plugin};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub mod api;
mod time;

#[cfg(test)]
mod tests;

/// The plugin name the configuration uses.
pub const NAME: &str = "pelion";
/// The operation that creates a user (the operator's way to create the first one).
pub const OP_CREATE_USER: &str = "create_user";
/// Where the management routes live.
pub const PREFIX: &str = "/pelion/v1";
/// At most this many active applications per user.
pub const MAX_ACTIVE_APPLICATIONS: usize = 10;
/// At most this many active access keys per application.
pub const MAX_ACTIVE_KEYS: usize = 10;
/// The key_id of a user-token principal is this followed by the user id.
pub const USER_PRINCIPAL_PREFIX: &str = "user:";

const USER_STATE: &str = "user/";
const APP_STATE: &str = "app/";
const KEY_STATE: &str = "key/";

/// Length of access keys and user tokens (alphanumeric: ~285 bits).
const SECRET_LEN: usize = 48;
/// Random bytes in an id (hex-encoded after a prefix such as `app_`).
const ID_BYTES: usize = 12;
/// Longest name and description accepted, in characters.
const MAX_NAME_CHARS: usize = 256;
const MAX_DESCRIPTION_CHARS: usize = 1024;

/// A user's permissions: the seed's permission table, plus [`Permission::ManageUsers`].
/// Names are the snake_case strings below (`view_applications`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// See applications (every application of the user's domain).
    ViewApplications,
    /// Create applications (and see them).
    CreateApplication,
    /// Edit an application's name and description (and see applications).
    EditApplication,
    /// Change an application's status to revoked (and see applications).
    RevokeApplication,
    /// See the access keys of any application of the domain.
    ViewAccessKeysAnyApplication,
    /// See the access keys of applications the user created.
    ViewAccessKeysMyApplications,
    CreateAccessKeysAnyApplication,
    CreateAccessKeysMyApplications,
    /// Edit an access key's name and description.
    EditAccessKeysAnyApplication,
    EditAccessKeysMyApplications,
    /// Change an access key's status to revoked.
    RevokeAccessKeysAnyApplication,
    RevokeAccessKeysMyApplications,
    /// Create, list, see and delete the users of the domain (not in the seed).
    ManageUsers,
}

impl Permission {
    pub const ALL: [Permission; 13] = [
        Permission::ViewApplications,
        Permission::CreateApplication,
        Permission::EditApplication,
        Permission::RevokeApplication,
        Permission::ViewAccessKeysAnyApplication,
        Permission::ViewAccessKeysMyApplications,
        Permission::CreateAccessKeysAnyApplication,
        Permission::CreateAccessKeysMyApplications,
        Permission::EditAccessKeysAnyApplication,
        Permission::EditAccessKeysMyApplications,
        Permission::RevokeAccessKeysAnyApplication,
        Permission::RevokeAccessKeysMyApplications,
        Permission::ManageUsers,
    ];

    /// The name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::ViewApplications => "view_applications",
            Permission::CreateApplication => "create_application",
            Permission::EditApplication => "edit_application",
            Permission::RevokeApplication => "revoke_application",
            Permission::ViewAccessKeysAnyApplication => "view_access_keys_any_application",
            Permission::ViewAccessKeysMyApplications => "view_access_keys_my_applications",
            Permission::CreateAccessKeysAnyApplication => "create_access_keys_any_application",
            Permission::CreateAccessKeysMyApplications => "create_access_keys_my_applications",
            Permission::EditAccessKeysAnyApplication => "edit_access_keys_any_application",
            Permission::EditAccessKeysMyApplications => "edit_access_keys_my_applications",
            Permission::RevokeAccessKeysAnyApplication => "revoke_access_keys_any_application",
            Permission::RevokeAccessKeysMyApplications => "revoke_access_keys_my_applications",
            Permission::ManageUsers => "manage_users",
        }
    }

    /// The permissions that let a user see applications (the seed: each application
    /// permission "allows you to view the Applications feature").
    pub const VIEW_APPLICATIONS: [Permission; 4] = [
        Permission::ViewApplications,
        Permission::CreateApplication,
        Permission::EditApplication,
        Permission::RevokeApplication,
    ];
}

/// What is done to access keys; each action has an "any application" and a "my
/// applications" permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAction {
    View,
    Create,
    Edit,
    Revoke,
}

impl KeyAction {
    /// (for any application, for my applications)
    pub fn permissions(self) -> (Permission, Permission) {
        match self {
            KeyAction::View => (
                Permission::ViewAccessKeysAnyApplication,
                Permission::ViewAccessKeysMyApplications,
            ),
            KeyAction::Create => (
                Permission::CreateAccessKeysAnyApplication,
                Permission::CreateAccessKeysMyApplications,
            ),
            KeyAction::Edit => (
                Permission::EditAccessKeysAnyApplication,
                Permission::EditAccessKeysMyApplications,
            ),
            KeyAction::Revoke => (
                Permission::RevokeAccessKeysAnyApplication,
                Permission::RevokeAccessKeysMyApplications,
            ),
        }
    }
}

/// A user as stored under `user/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct UserRecord {
    /// `usr_` and 24 hex characters.
    id: String,
    name: String,
    domain: String,
    /// Sorted, no duplicates.
    permissions: Vec<Permission>,
    /// Core scopes in [`SCOPES`] order.
    scopes: Vec<String>,
    /// SHA-256 (lower-case hex) of the user token.
    token_sha256: String,
    created_ms: u64,
    /// Creation order (lists are sorted by it).
    #[serde(default)]
    seq: u64,
}

impl UserRecord {
    fn has(&self, p: Permission) -> bool {
        self.permissions.contains(&p)
    }

    /// May this user grant `scope` to an access key?
    fn may_grant(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == ADMIN || s == scope)
    }

    /// The first of `permissions` and `scopes` this user does not hold (worded "the
    /// permission …" or "the scope …"): what it may not grant to a user it creates, nor
    /// take from one it deletes.
    fn lacks(&self, permissions: &[Permission], scopes: &[String]) -> Option<String> {
        if let Some(p) = permissions.iter().find(|p| !self.has(**p)) {
            return Some(format!("the permission {}", p.as_str()));
        }
        scopes
            .iter()
            .find(|s| !self.may_grant(s))
            .map(|s| format!("the scope {s}"))
    }

    /// May this user do `action` on the keys of an application owned by `owner`?
    fn may_on_keys(&self, action: KeyAction, owner: &str) -> bool {
        let (any, mine) = action.permissions();
        self.has(any) || (self.has(mine) && owner == self.id)
    }

    /// Has this user either permission for `action`?
    fn may_on_some_keys(&self, action: KeyAction) -> bool {
        let (any, mine) = action.permissions();
        self.has(any) || self.has(mine)
    }
}

/// An application as stored under `app/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct AppRecord {
    /// `app_` and 24 hex characters.
    id: String,
    /// The owner's domain (fixed at creation).
    domain: String,
    /// The id of the user who created it.
    owner: String,
    name: String,
    description: String,
    created_ms: u64,
    /// Creation order (lists are sorted by it).
    #[serde(default)]
    seq: u64,
    /// Set when revoked (then final).
    revoked_ms: Option<u64>,
}

impl AppRecord {
    fn is_active(&self) -> bool {
        self.revoked_ms.is_none()
    }
}

/// An access key as stored under `key/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KeyRecord {
    /// `ak_` and 24 hex characters; the principal's key_id.
    id: String,
    application_id: String,
    /// The id of the user who created it.
    created_by: String,
    name: String,
    description: String,
    /// Core scopes in [`SCOPES`] order; never changed.
    scopes: Vec<String>,
    /// SHA-256 (lower-case hex) of the secret.
    secret_sha256: String,
    created_ms: u64,
    /// Creation order (lists are sorted by it).
    #[serde(default)]
    seq: u64,
    /// Never changed; the key is expired from this instant on.
    expires_ms: Option<u64>,
    /// Set when revoked (then final).
    revoked_ms: Option<u64>,
}

/// An access key's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Revoked,
    Expired,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Expired => "expired",
        }
    }
}

impl KeyRecord {
    fn status(&self, now: u64) -> KeyStatus {
        if self.revoked_ms.is_some() {
            KeyStatus::Revoked
        } else if self.expires_ms.is_some_and(|e| now >= e) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }
}

/// The plugin's configuration: no field; unknown ones are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {}

/// Input of [`OP_CREATE_USER`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateUserInput {
    name: String,
    domain: String,
    #[serde(default)]
    permissions: Vec<Permission>,
    #[serde(default)]
    scopes: Vec<String>,
}

/// The plugin instance.
pub struct Pelion {
    host: Host,
    users: BTreeMap<String, UserRecord>,
    apps: BTreeMap<String, AppRecord>,
    keys: BTreeMap<String, KeyRecord>,
    /// Token digest → user id.
    user_by_digest: HashMap<String, String>,
    /// Secret digest → key id.
    key_by_digest: HashMap<String, String>,
    /// The last creation sequence number given to any record.
    last_seq: u64,
    /// Tests move the clock with this.
    #[cfg(test)]
    fake_now: Option<u64>,
}

/// A name: 1 to [`MAX_NAME_CHARS`] characters, not blank, no control characters.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    let chars = name.chars().count();
    if name.trim().is_empty() || chars > MAX_NAME_CHARS {
        return Err(format!(
            "{what} must be 1 to {MAX_NAME_CHARS} characters and not blank"
        ));
    }
    connectord_plugin_sdk::names::refuse_control_chars(what, name)
}

fn check_description(description: &str) -> Result<(), String> {
    if description.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(format!(
            "description must be at most {MAX_DESCRIPTION_CHARS} characters"
        ));
    }
    Ok(())
}

/// Checks scope names and puts them in canonical order without duplicates.
fn normalize_scopes(scopes: &[String]) -> Result<Vec<String>, String> {
    if let Some(bad) = scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
        return Err(format!(
            "unknown scope {bad:?}; the scopes are {}",
            SCOPES.join(", ")
        ));
    }
    Ok(SCOPES
        .iter()
        .filter(|c| scopes.iter().any(|s| s == *c))
        .map(|c| c.to_string())
        .collect())
}

fn normalize_permissions(permissions: &[Permission]) -> Vec<Permission> {
    let mut p = permissions.to_vec();
    p.sort();
    p.dedup();
    p
}

/// `prefix` followed by 24 random hex characters, drawn again until no record of `taken`
/// has it.
fn unused_id<T>(prefix: &str, taken: &BTreeMap<String, T>) -> String {
    loop {
        let id = format!("{prefix}{}", hex::encode(rand::random::<[u8; ID_BYTES]>()));
        if !taken.contains_key(&id) {
            return id;
        }
    }
}

/// Writes `record` durably under `prefix` + `id`, then (only then) puts it in `map` and,
/// when given one, the digest of its secret in `index`, naming `id`.
fn save_record<T: Serialize>(
    host: &Host,
    prefix: &str,
    id: &str,
    record: T,
    map: &mut BTreeMap<String, T>,
    index: Option<(&mut HashMap<String, String>, String)>,
) -> Result<(), String> {
    let bytes = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
    host.state_put(&format!("{prefix}{id}"), &bytes)?;
    if let Some((index, digest)) = index {
        index.insert(digest, id.to_string());
    }
    map.insert(id.to_string(), record);
    Ok(())
}

/// Reads every record under `prefix`; unreadable ones are logged and skipped. Failing to
/// list the state fails the load.
fn load_records<T: DeserializeOwned>(
    host: &Host,
    prefix: &str,
    id_of: fn(&T) -> &str,
) -> Result<BTreeMap<String, T>, String> {
    let mut out = BTreeMap::new();
    for (id, record) in host.load_json_records::<T>(prefix)? {
        if id_of(&record) == id {
            out.insert(id, record);
        } else {
            host.warn(&format!(
                "{NAME}: skipping {prefix}{id}: its id does not match its key"
            ));
        }
    }
    Ok(out)
}

impl Pelion {
    fn now(&self) -> u64 {
        #[cfg(test)]
        if let Some(t) = self.fake_now {
            return t;
        }
        now_ms()
    }

    fn load(host: Host) -> Result<Pelion, String> {
        let mut users: BTreeMap<String, UserRecord> =
            load_records(&host, USER_STATE, |u: &UserRecord| &u.id)?;
        let apps = load_records(&host, APP_STATE, |a: &AppRecord| &a.id)?;
        let mut keys: BTreeMap<String, KeyRecord> =
            load_records(&host, KEY_STATE, |k: &KeyRecord| &k.id)?;
        users.retain(|id, u| {
            let ok = is_sha256_hex(&u.token_sha256);
            if !ok {
                host.warn(&format!("{NAME}: skipping user {id}: bad token digest"));
            }
            ok
        });
        keys.retain(|id, k| {
            let ok = is_sha256_hex(&k.secret_sha256);
            if !ok {
                host.warn(&format!(
                    "{NAME}: skipping access key {id}: bad secret digest"
                ));
            }
            ok
        });
        let user_by_digest = users
            .values()
            .map(|u| (u.token_sha256.clone(), u.id.clone()))
            .collect();
        let key_by_digest = keys
            .values()
            .map(|k| (k.secret_sha256.clone(), k.id.clone()))
            .collect();
        let last_seq = users
            .values()
            .map(|u| u.seq)
            .chain(apps.values().map(|a| a.seq))
            .chain(keys.values().map(|k| k.seq))
            .max()
            .unwrap_or(0);
        host.info(&format!(
            "{NAME}: {} users, {} applications, {} access keys loaded",
            users.len(),
            apps.len(),
            keys.len()
        ));
        Ok(Pelion {
            host,
            users,
            apps,
            keys,
            user_by_digest,
            key_by_digest,
            last_seq,
            #[cfg(test)]
            fake_now: None,
        })
    }

    /// The next creation sequence number.
    fn next_seq(&mut self) -> u64 {
        self.last_seq += 1;
        self.last_seq
    }

    /// A fresh secret and its digest, unused by any key or user.
    fn new_secret(&self) -> (String, String) {
        loop {
            let secret = random_alphanumeric(SECRET_LEN);
            let digest = sha256_hex(&secret);
            if !self.user_by_digest.contains_key(&digest)
                && !self.key_by_digest.contains_key(&digest)
            {
                return (secret, digest);
            }
        }
    }

    /// Writes a user durably, then updates memory.
    fn save_user(&mut self, user: UserRecord) -> Result<(), String> {
        let (id, digest) = (user.id.clone(), user.token_sha256.clone());
        let index = Some((&mut self.user_by_digest, digest));
        save_record(&self.host, USER_STATE, &id, user, &mut self.users, index)
    }

    fn save_app(&mut self, app: AppRecord) -> Result<(), String> {
        let id = app.id.clone();
        save_record(&self.host, APP_STATE, &id, app, &mut self.apps, None)
    }

    fn save_key(&mut self, key: KeyRecord) -> Result<(), String> {
        let (id, digest) = (key.id.clone(), key.secret_sha256.clone());
        let index = Some((&mut self.key_by_digest, digest));
        save_record(&self.host, KEY_STATE, &id, key, &mut self.keys, index)
    }

    /// Creates a user (validated here; permission checks are the caller's). Returns the
    /// record and its token, shown once.
    fn create_user(
        &mut self,
        name: String,
        domain: String,
        permissions: &[Permission],
        scopes: &[String],
    ) -> Result<(UserRecord, String), api::ApiError> {
        check_name("name", &name).map_err(api::bad_request)?;
        check_name("domain", &domain).map_err(api::bad_request)?;
        let scopes = normalize_scopes(scopes).map_err(api::bad_request)?;
        if self
            .users
            .values()
            .any(|u| u.domain == domain && u.name == name)
        {
            return Err(api::conflict(format!(
                "a user named {name:?} already exists in domain {domain:?}"
            )));
        }
        let id = unused_id("usr_", &self.users);
        let (token, digest) = self.new_secret();
        let user = UserRecord {
            id,
            name,
            domain,
            permissions: normalize_permissions(permissions),
            scopes,
            token_sha256: digest,
            created_ms: self.now(),
            seq: self.next_seq(),
        };
        self.save_user(user.clone()).map_err(|e| self.internal(e))?;
        self.host.info(&format!(
            "{NAME}: created user {} ({:?}) in domain {:?}",
            user.id, user.name, user.domain
        ));
        Ok((user, token))
    }

    /// Deletes a user: revokes its applications, their keys, and the keys it created
    /// elsewhere (each written durably), then deletes the user record. Returns how many
    /// applications and keys were revoked. Safe to repeat after a failure.
    fn delete_user(&mut self, id: &str) -> Result<(usize, usize), api::ApiError> {
        let now = self.now();
        let owned: Vec<String> = self
            .apps
            .values()
            .filter(|a| a.owner == id && a.is_active())
            .map(|a| a.id.clone())
            .collect();
        let keys: Vec<String> = self
            .keys
            .values()
            .filter(|k| k.revoked_ms.is_none())
            .filter(|k| {
                k.created_by == id
                    || self
                        .apps
                        .get(&k.application_id)
                        .is_some_and(|a| a.owner == id)
            })
            .map(|k| k.id.clone())
            .collect();
        for app_id in &owned {
            let mut app = self.apps[app_id].clone();
            app.revoked_ms = Some(now);
            self.save_app(app).map_err(|e| self.internal(e))?;
        }
        for key_id in &keys {
            let mut key = self.keys[key_id].clone();
            key.revoked_ms = Some(now);
            self.save_key(key).map_err(|e| self.internal(e))?;
        }
        self.host
            .state_delete(&format!("{USER_STATE}{id}"))
            .map_err(|e| self.internal(e))?;
        if let Some(user) = self.users.remove(id) {
            self.user_by_digest.remove(&user.token_sha256);
        }
        self.host.info(&format!(
            "{NAME}: deleted user {id}; revoked {} applications and {} access keys",
            owned.len(),
            keys.len()
        ));
        Ok((owned.len(), keys.len()))
    }

    /// Logs a state failure and makes it a 500.
    fn internal(&self, e: String) -> api::ApiError {
        self.host.warn(&format!("{NAME}: state write failed: {e}"));
        api::ApiError::new(500, "internal_error", "could not store the change")
    }

    fn authenticate(&self, req: &AuthRequest) -> AuthVerdict {
        let Some(token) = bearer_token(&req.headers) else {
            return AuthVerdict::NotMine;
        };
        // Looked up by the SHA-256 of the presented token: what timing could leak is how
        // the digest of a guess relates to stored digests, which does not help find a
        // secret (SHA-256 is preimage resistant).
        let digest = sha256_hex(token);
        if let Some(key_id) = self.key_by_digest.get(&digest) {
            return match self.check_key(key_id) {
                Ok(principal) => AuthVerdict::Accepted {
                    principal,
                    cache: None,
                },
                Err(reason) => AuthVerdict::Refused { reason },
            };
        }
        if let Some(user) = self
            .user_by_digest
            .get(&digest)
            .and_then(|id| self.users.get(id))
        {
            return AuthVerdict::Accepted {
                principal: PrincipalSpec {
                    key_id: format!("{USER_PRINCIPAL_PREFIX}{}", user.id),
                    domain: user.domain.clone(),
                    scopes: Vec::new(),
                    allow: None,
                    creator: None,
                },
                cache: None,
            };
        }
        AuthVerdict::NotMine
    }

    /// `OP_KEY_STATUS`: an access key is active when `OP_AUTHENTICATE` would accept it
    /// (not revoked or expired, its application active, its owner and creator present),
    /// revoked when it exists but would be refused; a user token (`user:<id>`) is active
    /// while the user exists. Anything else is unknown.
    fn key_status(&self, key_id: &str) -> KeyStatusResponse {
        let status = if let Some(user) = key_id.strip_prefix(USER_PRINCIPAL_PREFIX) {
            if self.users.contains_key(user) {
                KeyState::Active
            } else {
                KeyState::Unknown
            }
        } else if !self.keys.contains_key(key_id) {
            KeyState::Unknown
        } else if self.check_key(key_id).is_ok() {
            KeyState::Active
        } else {
            KeyState::Revoked
        };
        KeyStatusResponse {
            status,
            creator: None,
            restriction: None,
        }
    }

    /// The principal of an access key, or why it is refused.
    fn check_key(&self, key_id: &str) -> Result<PrincipalSpec, String> {
        let key = self
            .keys
            .get(key_id)
            .ok_or_else(|| format!("access key {key_id} no longer exists"))?;
        match key.status(self.now()) {
            KeyStatus::Active => {}
            KeyStatus::Revoked => return Err(format!("access key {key_id} is revoked")),
            KeyStatus::Expired => {
                return Err(format!(
                    "access key {key_id} expired at {}",
                    time::format_ms(key.expires_ms.unwrap_or(0))
                ));
            }
        }
        let app_id = &key.application_id;
        let app = self.apps.get(app_id).ok_or_else(|| {
            format!("the application {app_id} of access key {key_id} no longer exists")
        })?;
        if !app.is_active() {
            return Err(format!(
                "the application {app_id} of access key {key_id} is revoked"
            ));
        }
        let owner = self
            .users
            .get(&app.owner)
            .ok_or_else(|| format!("the user who created application {app_id} has been deleted"))?;
        if !self.users.contains_key(&key.created_by) {
            return Err(format!(
                "the user who created access key {key_id} has been deleted"
            ));
        }
        Ok(PrincipalSpec {
            key_id: key.id.clone(),
            domain: owner.domain.clone(),
            scopes: key.scopes.clone(),
            allow: None,
            creator: None,
        })
    }

    fn bootstrap(&self) -> BootstrapResponse {
        if self.users.is_empty() {
            self.host.info(&format!(
                "{NAME}: no user yet; create the first with `connectord plugin-call {NAME} \
                 {OP_CREATE_USER} '{{\"name\": \"admin\", \"domain\": \"…\", \
                 \"permissions\": [\"manage_users\", …], \"scopes\": [\"admin\"]}}'`"
            ));
        }
        BootstrapResponse { created: None }
    }

    fn op_create_user(&mut self, input: CreateUserInput) -> Result<serde_json::Value, String> {
        let (user, token) = self
            .create_user(input.name, input.domain, &input.permissions, &input.scopes)
            .map_err(|e| format!("{NAME}: {OP_CREATE_USER}: {}", e.message))?;
        Ok(serde_json::json!({"id": user.id, "token": token}))
    }
}

impl Plugin for Pelion {
    const NAME: &'static str = NAME;

    fn create(config: serde_json::Value, host: Host) -> Result<Self, String> {
        let Config {} = connectord_plugin_sdk::settings(config)
            .map_err(|e| format!("{NAME}: invalid configuration: {e}"))?;
        Pelion::load(host)
    }
}

// The typed operations: the inherent methods of the same names (which take precedence in
// `Type::method` paths) do the work.
impl AuthPlugin for Pelion {
    fn authenticate(&mut self, req: AuthRequest) -> Result<AuthVerdict, String> {
        Ok(Pelion::authenticate(self, &req))
    }

    fn bootstrap(&mut self, _req: BootstrapRequest) -> Result<BootstrapResponse, String> {
        Ok(Pelion::bootstrap(self))
    }

    fn key_status(&mut self, req: KeyStatusRequest) -> Result<KeyStatusResponse, String> {
        Ok(Pelion::key_status(self, &req.key_id))
    }
}

impl RoutesPlugin for Pelion {
    fn routes(&mut self) -> Result<RoutesResponse, String> {
        Ok(api::routes())
    }

    fn http(&mut self, req: HttpRequest) -> Result<HttpResponse, String> {
        Ok(Pelion::http(self, req))
    }
}

declare_plugin!(Pelion: auth + routes, operations {
    OP_CREATE_USER => Pelion::op_create_user,
});
