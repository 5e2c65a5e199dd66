//! The management API: JSON over the routes below, all under [`PREFIX`] and declared with
//! scope `authenticated` (the plugin checks the caller, see the crate doc).
//!
//! | method | path | needs | answers |
//! |---|---|---|---|
//! | GET | `/pelion/v1/me` | a user token | 200 |
//! | GET | `/pelion/v1/users` | `manage_users` | 200 |
//! | POST | `/pelion/v1/users` | `manage_users` | 201, 400, 403, 409 |
//! | GET | `/pelion/v1/users/{id}` | `manage_users` (or the user itself) | 200, 403, 404 |
//! | DELETE | `/pelion/v1/users/{id}` | `manage_users` | 200, 403, 404, 409 |
//! | GET | `/pelion/v1/applications` | any application permission | 200, 400, 403 |
//! | POST | `/pelion/v1/applications` | `create_application` | 201, 400, 403, 409 |
//! | GET | `/pelion/v1/applications/{id}` | any application permission | 200, 403, 404 |
//! | PATCH | `/pelion/v1/applications/{id}` | `edit_application` (name, description), `revoke_application` (status) | 200, 400, 403, 404, 409 |
//! | GET | `/pelion/v1/applications/{id}/access-keys` | `view_access_keys_*` | 200, 400, 403, 404 |
//! | POST | `/pelion/v1/applications/{id}/access-keys` | `create_access_keys_*` | 201, 400, 403, 404, 409 |
//! | GET | `/pelion/v1/applications/{id}/access-keys/{key_id}` | `view_access_keys_*` | 200, 403, 404 |
//! | PATCH | `/pelion/v1/applications/{id}/access-keys/{key_id}` | `edit_access_keys_*` (name, description), `revoke_access_keys_*` (status) | 200, 400, 403, 404, 409 |
//!
//! `*_any_application` allows the action on every application of the caller's domain,
//! `*_my_applications` only on applications the caller owns (created). Every route also
//! answers 403 to a caller that is not a Pelion user.
//!
//! Bodies:
//! - `POST users`: `{"name", "domain"?, "permissions": [...], "scopes": [...]}`; the domain
//!   defaults to (and must be) the caller's; the caller may grant only permissions and
//!   scopes it holds itself (403 otherwise). 201: the user plus `"token"` (shown once).
//! - `POST applications`: `{"name", "description"?}`. 201: the application. The
//!   [`MAX_ACTIVE_APPLICATIONS`]+1st active application of a user: 409 `limit_exceeded`.
//! - `PATCH applications/{id}`: any of `{"name", "description", "status": "revoked"}`.
//! - `POST …/access-keys`: `{"name", "description"?, "scopes": [...], "expires_at"?}`;
//!   `expires_at` is an RFC 3339 date-time string or unix milliseconds (a number), in the
//!   future; `null` or absent: never. Scopes: at least one, each one the caller holds
//!   (`admin` in the caller's scopes covers all), else 403. 201: the key plus
//!   `"access_key"` (the secret, shown once). The [`MAX_ACTIVE_KEYS`]+1st active key of an
//!   application: 409 `limit_exceeded`; a revoked application: 409 `conflict`.
//! - `PATCH …/access-keys/{key_id}`: any of `{"name", "description", "status": "revoked"}`;
//!   `scopes` or `expires_at` (or any other field): 400.
//!
//! Lists answer `{"data": [...], "count": n}` in creation order; revoked applications and
//! keys are left out unless the query has `include_revoked=true` (expired keys are listed).
//! A revoked application or key cannot be patched (409); revoking is final.
//!
//! Errors: `{"type", "message"}` with type `bad_request` (400; also a body that is JSON
//! but not an object), `forbidden` (403), `not_found` (404), `conflict` or
//! `limit_exceeded` (409), `unsupported_media_type` (415: a POST or PATCH whose
//! `Content-Type` is present and not JSON, i.e. neither `application/json` nor a `+json`
//! type; an absent one is taken as JSON), `internal_error` (500, a state write failed;
//! nothing changed in memory).

use connectord_plugin_sdk::auth::bearer_token;
use connectord_plugin_sdk::http::{
    AUTHENTICATED, HttpRequest, HttpResponse, RoutesResponse, json_object, refuse_non_json,
};
use connectord_plugin_sdk::secret::sha256_hex;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::{
    AppRecord, KeyAction, KeyRecord, KeyStatus, MAX_ACTIVE_APPLICATIONS, MAX_ACTIVE_KEYS, NAME,
    PREFIX, Pelion, Permission, USER_PRINCIPAL_PREFIX, UserRecord, check_description, check_name,
    normalize_scopes, time, unused_id,
};

/// Every route: (method, path).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/pelion/v1/me"),
    ("GET", "/pelion/v1/users"),
    ("POST", "/pelion/v1/users"),
    ("GET", "/pelion/v1/users/{id}"),
    ("DELETE", "/pelion/v1/users/{id}"),
    ("GET", "/pelion/v1/applications"),
    ("POST", "/pelion/v1/applications"),
    ("GET", "/pelion/v1/applications/{id}"),
    ("PATCH", "/pelion/v1/applications/{id}"),
    ("GET", "/pelion/v1/applications/{id}/access-keys"),
    ("POST", "/pelion/v1/applications/{id}/access-keys"),
    ("GET", "/pelion/v1/applications/{id}/access-keys/{key_id}"),
    ("PATCH", "/pelion/v1/applications/{id}/access-keys/{key_id}"),
];

/// The answer to `routes`: every route, scope `authenticated`.
pub fn routes() -> RoutesResponse {
    RoutesResponse::with_scope(AUTHENTICATED, ROUTES)
}

/// A refused request: status, `type` and `message` of the JSON error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }
}

pub fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(400, "bad_request", message)
}

pub fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(403, "forbidden", message)
}

pub fn not_found(message: impl Into<String>) -> ApiError {
    ApiError::new(404, "not_found", message)
}

pub fn conflict(message: impl Into<String>) -> ApiError {
    ApiError::new(409, "conflict", message)
}

pub fn limit_exceeded(message: impl Into<String>) -> ApiError {
    ApiError::new(409, "limit_exceeded", message)
}

type ApiResult = Result<(u16, Value), ApiError>;

/// A parsed route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op<'a> {
    Me,
    ListUsers,
    CreateUser,
    GetUser(&'a str),
    DeleteUser(&'a str),
    ListApps,
    CreateApp,
    GetApp(&'a str),
    PatchApp(&'a str),
    ListKeys(&'a str),
    CreateKey(&'a str),
    GetKey(&'a str, &'a str),
    PatchKey(&'a str, &'a str),
}

fn parse_route<'a>(method: &str, path: &'a str) -> Option<Op<'a>> {
    let segments: Vec<&'a str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let prefix: Vec<&str> = PREFIX.split('/').filter(|s| !s.is_empty()).collect();
    let rest = segments.strip_prefix(prefix.as_slice())?;
    Some(match (method, rest) {
        ("GET", ["me"]) => Op::Me,
        ("GET", ["users"]) => Op::ListUsers,
        ("POST", ["users"]) => Op::CreateUser,
        ("GET", ["users", id]) => Op::GetUser(id),
        ("DELETE", ["users", id]) => Op::DeleteUser(id),
        ("GET", ["applications"]) => Op::ListApps,
        ("POST", ["applications"]) => Op::CreateApp,
        ("GET", ["applications", id]) => Op::GetApp(id),
        ("PATCH", ["applications", id]) => Op::PatchApp(id),
        ("GET", ["applications", id, "access-keys"]) => Op::ListKeys(id),
        ("POST", ["applications", id, "access-keys"]) => Op::CreateKey(id),
        ("GET", ["applications", id, "access-keys", key]) => Op::GetKey(id, key),
        ("PATCH", ["applications", id, "access-keys", key]) => Op::PatchKey(id, key),
        _ => return None,
    })
}

/// A JSON body parsed into `T` (400 with serde's reason otherwise).
fn parse_body<T: DeserializeOwned>(body: &str) -> Result<T, ApiError> {
    // An object first: serde would also fill a struct from an array of its fields.
    let fields = json_object(body, None).map_err(bad_request)?;
    serde_json::from_value(Value::Object(fields))
        .map_err(|e| bad_request(format!("invalid request body: {e}")))
}

/// 415 for a body sent as something other than JSON (an absent `Content-Type` is taken
/// as JSON). Only the routes that read a body (POST, PATCH) check it.
fn check_media_type(req: &HttpRequest) -> Result<(), ApiError> {
    if !matches!(req.method.as_str(), "POST" | "PATCH") {
        return Ok(());
    }
    refuse_non_json(req.headers.get("content-type").map(String::as_str))
        .map_err(|m| ApiError::new(415, "unsupported_media_type", m))
}

/// `include_revoked=true|false` (also `1|0`) of a list's query; default false.
fn include_revoked(query: Option<&str>) -> Result<bool, ApiError> {
    let mut include = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "include_revoked" {
            include = match v {
                "true" | "1" => true,
                "false" | "0" => false,
                other => {
                    return Err(bad_request(format!(
                        "include_revoked must be true or false (got {other:?})"
                    )));
                }
            };
        }
    }
    Ok(include)
}

/// The fields of a PATCH body.
#[derive(Debug, Default, PartialEq, Eq)]
struct Patch {
    name: Option<String>,
    description: Option<String>,
    revoke: bool,
}

impl Patch {
    fn edits(&self) -> bool {
        self.name.is_some() || self.description.is_some()
    }
}

/// Parses a PATCH body of an application or access key: `name`, `description`,
/// `status: "revoked"`. `scopes` and `expires_at` get their own message (fixed at
/// creation); any other field is refused.
fn parse_patch(body: &str) -> Result<Patch, ApiError> {
    let fields = json_object(body, None).map_err(bad_request)?;
    if fields.is_empty() {
        return Err(bad_request(
            "nothing to change: give name, description or status",
        ));
    }
    let text = |fields: &Map<String, Value>, f: &str| -> Result<String, ApiError> {
        fields[f]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| bad_request(format!("{f} must be a string")))
    };
    let mut patch = Patch::default();
    for field in fields.keys() {
        match field.as_str() {
            "name" => {
                let name = text(&fields, field)?;
                check_name("name", &name).map_err(bad_request)?;
                patch.name = Some(name);
            }
            "description" => {
                let description = text(&fields, field)?;
                check_description(&description).map_err(bad_request)?;
                patch.description = Some(description);
            }
            "status" => match text(&fields, field)?.as_str() {
                "revoked" => patch.revoke = true,
                other => {
                    return Err(bad_request(format!(
                        "status can only be changed to \"revoked\" (got {other:?})"
                    )));
                }
            },
            "scopes" => {
                return Err(bad_request(
                    "an access key's scopes are chosen when it is created and cannot be edited",
                ));
            }
            "expires_at" => {
                return Err(bad_request(
                    "an access key's expiry is chosen when it is created and cannot be edited",
                ));
            }
            other => {
                return Err(bad_request(format!(
                    "field {other:?} cannot be changed (editable: name, description, status)"
                )));
            }
        }
    }
    Ok(patch)
}

/// `expires_at` of a new key: RFC 3339 string or unix milliseconds, in the future.
fn parse_expiry(value: &Value, now: u64) -> Result<Option<u64>, ApiError> {
    let ms = match value {
        Value::Null => return Ok(None),
        Value::Number(n) => n.as_u64().filter(|ms| *ms <= time::MAX_MS).ok_or_else(|| {
            bad_request(format!(
                "expires_at as a number must be unix milliseconds, an integer from 0 to {} (got {n})",
                time::MAX_MS
            ))
        })?,
        Value::String(s) => {
            time::parse_rfc3339_ms(s).map_err(|e| bad_request(format!("expires_at: {e}")))?
        }
        _ => {
            return Err(bad_request(
                "expires_at must be an RFC 3339 date-time string or unix milliseconds",
            ));
        }
    };
    if ms <= now {
        return Err(bad_request(format!(
            "expires_at {} is not in the future",
            time::format_ms(ms)
        )));
    }
    Ok(Some(ms))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    permissions: Vec<Permission>,
    #[serde(default)]
    scopes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewApp {
    name: String,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
    #[serde(default)]
    description: String,
    scopes: Vec<String>,
    #[serde(default)]
    expires_at: Value,
}

fn user_view(u: &UserRecord) -> Value {
    json!({
        "id": u.id,
        "name": u.name,
        "domain": u.domain,
        "permissions": u.permissions.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        "scopes": u.scopes,
        "created_at": time::format_ms(u.created_ms),
    })
}

fn key_view(k: &KeyRecord, now: u64) -> Value {
    json!({
        "id": k.id,
        "application_id": k.application_id,
        "name": k.name,
        "description": k.description,
        "scopes": k.scopes,
        "status": k.status(now).as_str(),
        "expires_at": k.expires_ms.map(time::format_ms),
        "created_by": k.created_by,
        "created_at": time::format_ms(k.created_ms),
        "revoked_at": k.revoked_ms.map(time::format_ms),
    })
}

fn list(data: Vec<Value>) -> Value {
    json!({"count": data.len(), "data": data})
}

/// The permission a user lacks, as a 403.
fn lacking(what: &str, permission: Permission) -> ApiError {
    forbidden(format!(
        "{what} needs the permission {}",
        permission.as_str()
    ))
}

fn lacking_keys(action: KeyAction, verb: &str) -> ApiError {
    let (any, mine) = action.permissions();
    forbidden(format!(
        "{verb} access keys needs the permission {} (or {} for applications you created)",
        any.as_str(),
        mine.as_str()
    ))
}

impl Pelion {
    /// Serves one request of the management API.
    pub(crate) fn http(&mut self, req: HttpRequest) -> HttpResponse {
        let result = match parse_route(&req.method, &req.path) {
            None => Err(not_found(format!("no route {} {}", req.method, req.path))),
            Some(op) => self.caller(&req).and_then(|caller| {
                check_media_type(&req)?;
                self.serve(op, &caller, &req)
            }),
        };
        match result {
            Ok((status, body)) => HttpResponse::json(status, &body),
            Err(e) => HttpResponse::error(e.status, e.kind, &e.message),
        }
    }

    /// The Pelion user making the request. The principal must be a user-token principal
    /// (`user:<id>`) and the request's bearer token must be that user's token: a key_id
    /// alone is not trusted, since another backend could use the same form.
    fn caller(&self, req: &HttpRequest) -> Result<UserRecord, ApiError> {
        let digest = bearer_token(&req.headers).map(sha256_hex);
        if let Some(id) = req.principal.key_id.strip_prefix(USER_PRINCIPAL_PREFIX) {
            return match self.users.get(id) {
                Some(user)
                    if digest.as_deref() == Some(user.token_sha256.as_str())
                        && user.domain == req.principal.domain =>
                {
                    Ok(user.clone())
                }
                _ => Err(forbidden(
                    "the caller is not authenticated by a Pelion user token",
                )),
            };
        }
        if digest.is_some_and(|d| self.key_by_digest.contains_key(&d)) {
            return Err(forbidden(
                "Pelion access keys cannot use the management API; use a Pelion user token",
            ));
        }
        Err(forbidden(
            "the Pelion management API needs a Pelion user token (Authorization: Bearer <token>)",
        ))
    }

    fn serve(&mut self, op: Op<'_>, caller: &UserRecord, req: &HttpRequest) -> ApiResult {
        let query = req.query.as_deref();
        let body = req.body.as_str();
        match op {
            Op::Me => Ok((200, user_view(caller))),
            Op::ListUsers => self.list_users(caller),
            Op::CreateUser => self.create_user_rest(caller, body),
            Op::GetUser(id) => self.get_user(caller, id),
            Op::DeleteUser(id) => self.delete_user_rest(caller, id),
            Op::ListApps => self.list_apps(caller, query),
            Op::CreateApp => self.create_app(caller, body),
            Op::GetApp(id) => {
                let app = self.visible_app(caller, id)?;
                Ok((200, self.app_view(app)))
            }
            Op::PatchApp(id) => self.patch_app(caller, id, body),
            Op::ListKeys(app_id) => self.list_keys(caller, app_id, query),
            Op::CreateKey(app_id) => self.create_key(caller, app_id, body),
            Op::GetKey(app_id, key_id) => {
                let app = self.app_for_keys(caller, app_id, KeyAction::View, "viewing")?;
                let key = self.key_of(&app, key_id)?;
                Ok((200, key_view(key, self.now())))
            }
            Op::PatchKey(app_id, key_id) => self.patch_key(caller, app_id, key_id, body),
        }
    }

    fn require(&self, caller: &UserRecord, what: &str, p: Permission) -> Result<(), ApiError> {
        if caller.has(p) {
            Ok(())
        } else {
            Err(lacking(what, p))
        }
    }

    fn list_users(&self, caller: &UserRecord) -> ApiResult {
        self.require(caller, "listing users", Permission::ManageUsers)?;
        let mut users: Vec<&UserRecord> = self
            .users
            .values()
            .filter(|u| u.domain == caller.domain)
            .collect();
        users.sort_by(|a, b| (a.seq, a.created_ms, &a.id).cmp(&(b.seq, b.created_ms, &b.id)));
        Ok((200, list(users.into_iter().map(user_view).collect())))
    }

    fn get_user(&self, caller: &UserRecord, id: &str) -> ApiResult {
        if id != caller.id {
            self.require(caller, "viewing other users", Permission::ManageUsers)?;
        }
        let user = self
            .users
            .get(id)
            .filter(|u| u.domain == caller.domain)
            .ok_or_else(|| not_found(format!("no user {id}")))?;
        Ok((200, user_view(user)))
    }

    fn create_user_rest(&mut self, caller: &UserRecord, body: &str) -> ApiResult {
        self.require(caller, "creating users", Permission::ManageUsers)?;
        let new: NewUser = parse_body(body)?;
        let domain = new.domain.unwrap_or_else(|| caller.domain.clone());
        if domain != caller.domain {
            return Err(forbidden(format!(
                "users can only be created in your own domain {:?}",
                caller.domain
            )));
        }
        if let Some(what) = caller.lacks(&new.permissions, &[]) {
            return Err(forbidden(format!(
                "you cannot grant {what}, which you do not have"
            )));
        }
        let scopes = normalize_scopes(&new.scopes).map_err(bad_request)?;
        if let Some(what) = caller.lacks(&[], &scopes) {
            return Err(forbidden(format!(
                "you cannot grant {what}, which you do not have"
            )));
        }
        let (user, token) = self.create_user(new.name, domain, &new.permissions, &scopes)?;
        let mut view = user_view(&user);
        view["token"] = Value::String(token);
        Ok((201, view))
    }

    fn delete_user_rest(&mut self, caller: &UserRecord, id: &str) -> ApiResult {
        self.require(caller, "deleting users", Permission::ManageUsers)?;
        if self.users.get(id).is_none_or(|u| u.domain != caller.domain) {
            return Err(not_found(format!("no user {id}")));
        }
        if id == caller.id {
            return Err(conflict("you cannot delete yourself"));
        }
        // As for creating one: a user may delete only a user whose permissions and scopes
        // it holds all of itself. Before, a user with `manage_users` alone deleted an
        // administrator, whose applications and keys went with it.
        if let Some(what) = self
            .users
            .get(id)
            .and_then(|target| caller.lacks(&target.permissions, &target.scopes))
        {
            return Err(forbidden(format!(
                "user {id} holds {what}, which you do not have: deleting a user needs all of its permissions and scopes"
            )));
        }
        let (apps, keys) = self.delete_user(id)?;
        Ok((
            200,
            json!({
                "id": id,
                "deleted": true,
                "revoked_applications": apps,
                "revoked_access_keys": keys,
            }),
        ))
    }

    fn app_view(&self, a: &AppRecord) -> Value {
        let now = self.now();
        let active_keys = self.active_keys(&a.id, now);
        json!({
            "id": a.id,
            "name": a.name,
            "description": a.description,
            "status": if a.is_active() { "active" } else { "revoked" },
            "owner": a.owner,
            "active_access_keys": active_keys,
            "created_at": time::format_ms(a.created_ms),
            "revoked_at": a.revoked_ms.map(time::format_ms),
        })
    }

    fn active_keys(&self, app_id: &str, now: u64) -> usize {
        self.keys
            .values()
            .filter(|k| k.application_id == app_id && k.status(now) == KeyStatus::Active)
            .count()
    }

    fn may_view_apps(caller: &UserRecord) -> Result<(), ApiError> {
        if Permission::VIEW_APPLICATIONS.iter().any(|p| caller.has(*p)) {
            Ok(())
        } else {
            Err(forbidden(
                "viewing applications needs one of the permissions view_applications, \
                 create_application, edit_application, revoke_application",
            ))
        }
    }

    /// An application of the caller's domain (404 for any other).
    fn app_in_domain(&self, caller: &UserRecord, id: &str) -> Result<AppRecord, ApiError> {
        self.apps
            .get(id)
            .filter(|a| a.domain == caller.domain)
            .cloned()
            .ok_or_else(|| not_found(format!("no application {id}")))
    }

    fn visible_app(&self, caller: &UserRecord, id: &str) -> Result<&AppRecord, ApiError> {
        Self::may_view_apps(caller)?;
        self.apps
            .get(id)
            .filter(|a| a.domain == caller.domain)
            .ok_or_else(|| not_found(format!("no application {id}")))
    }

    fn list_apps(&self, caller: &UserRecord, query: Option<&str>) -> ApiResult {
        Self::may_view_apps(caller)?;
        let include_revoked = include_revoked(query)?;
        let mut apps: Vec<&AppRecord> = self
            .apps
            .values()
            .filter(|a| a.domain == caller.domain && (include_revoked || a.is_active()))
            .collect();
        apps.sort_by(|a, b| (a.seq, a.created_ms, &a.id).cmp(&(b.seq, b.created_ms, &b.id)));
        Ok((
            200,
            list(apps.into_iter().map(|a| self.app_view(a)).collect()),
        ))
    }

    fn create_app(&mut self, caller: &UserRecord, body: &str) -> ApiResult {
        self.require(
            caller,
            "creating applications",
            Permission::CreateApplication,
        )?;
        let new: NewApp = parse_body(body)?;
        check_name("name", &new.name).map_err(bad_request)?;
        check_description(&new.description).map_err(bad_request)?;
        let active = self
            .apps
            .values()
            .filter(|a| a.owner == caller.id && a.is_active())
            .count();
        if active >= MAX_ACTIVE_APPLICATIONS {
            return Err(limit_exceeded(format!(
                "you already have {active} active applications, the most allowed \
                 ({MAX_ACTIVE_APPLICATIONS}); revoke one first"
            )));
        }
        let id = unused_id("app_", &self.apps);
        let app = AppRecord {
            id,
            domain: caller.domain.clone(),
            owner: caller.id.clone(),
            name: new.name,
            description: new.description,
            created_ms: self.now(),
            seq: self.next_seq(),
            revoked_ms: None,
        };
        self.save_app(app.clone()).map_err(|e| self.internal(e))?;
        self.host.info(&format!(
            "{NAME}: user {} created application {}",
            caller.id, app.id
        ));
        Ok((201, self.app_view(&app)))
    }

    fn patch_app(&mut self, caller: &UserRecord, id: &str, body: &str) -> ApiResult {
        Self::may_view_apps(caller)?;
        let mut app = self.app_in_domain(caller, id)?;
        let patch = parse_patch(body)?;
        if patch.edits() {
            self.require(caller, "editing applications", Permission::EditApplication)?;
        }
        if patch.revoke {
            self.require(
                caller,
                "revoking applications",
                Permission::RevokeApplication,
            )?;
        }
        if !app.is_active() {
            return Err(conflict(format!(
                "application {id} is revoked and cannot be changed"
            )));
        }
        if let Some(name) = patch.name {
            app.name = name;
        }
        if let Some(description) = patch.description {
            app.description = description;
        }
        if patch.revoke {
            app.revoked_ms = Some(self.now());
        }
        self.save_app(app.clone()).map_err(|e| self.internal(e))?;
        if patch.revoke {
            self.host.info(&format!(
                "{NAME}: user {} revoked application {id}",
                caller.id
            ));
        }
        Ok((200, self.app_view(&app)))
    }

    /// The application `app_id` for `action` on its keys: 403 when the caller has
    /// neither permission for it, 404 outside the caller's domain, 403 when it has only
    /// the "my applications" one and the application is someone else's.
    fn app_for_keys(
        &self,
        caller: &UserRecord,
        app_id: &str,
        action: KeyAction,
        verb: &str,
    ) -> Result<AppRecord, ApiError> {
        if !caller.may_on_some_keys(action) {
            return Err(lacking_keys(action, verb));
        }
        let app = self.app_in_domain(caller, app_id)?;
        if !caller.may_on_keys(action, &app.owner) {
            return Err(lacking_keys(action, verb));
        }
        Ok(app)
    }

    fn key_of(&self, app: &AppRecord, key_id: &str) -> Result<&KeyRecord, ApiError> {
        self.keys
            .get(key_id)
            .filter(|k| k.application_id == app.id)
            .ok_or_else(|| not_found(format!("no access key {key_id} in application {}", app.id)))
    }

    fn list_keys(&self, caller: &UserRecord, app_id: &str, query: Option<&str>) -> ApiResult {
        let app = self.app_for_keys(caller, app_id, KeyAction::View, "viewing")?;
        let include_revoked = include_revoked(query)?;
        let now = self.now();
        let mut keys: Vec<&KeyRecord> = self
            .keys
            .values()
            .filter(|k| k.application_id == app.id)
            .filter(|k| include_revoked || k.status(now) != KeyStatus::Revoked)
            .collect();
        keys.sort_by(|a, b| (a.seq, a.created_ms, &a.id).cmp(&(b.seq, b.created_ms, &b.id)));
        Ok((
            200,
            list(keys.into_iter().map(|k| key_view(k, now)).collect()),
        ))
    }

    fn create_key(&mut self, caller: &UserRecord, app_id: &str, body: &str) -> ApiResult {
        let app = self.app_for_keys(caller, app_id, KeyAction::Create, "creating")?;
        let new: NewKey = parse_body(body)?;
        check_name("name", &new.name).map_err(bad_request)?;
        check_description(&new.description).map_err(bad_request)?;
        let scopes = normalize_scopes(&new.scopes).map_err(bad_request)?;
        if scopes.is_empty() {
            return Err(bad_request("an access key needs at least one scope"));
        }
        if let Some(s) = scopes.iter().find(|s| !caller.may_grant(s)) {
            return Err(forbidden(format!(
                "you cannot grant the scope {s}: an access key cannot have a scope its \
                 creator does not have (yours: {})",
                caller.scopes.join(", ")
            )));
        }
        let now = self.now();
        let expires_ms = parse_expiry(&new.expires_at, now)?;
        if !app.is_active() {
            return Err(conflict(format!(
                "application {app_id} is revoked: it cannot get new access keys"
            )));
        }
        let active = self.active_keys(&app.id, now);
        if active >= MAX_ACTIVE_KEYS {
            return Err(limit_exceeded(format!(
                "application {app_id} already has {active} active access keys, the most \
                 allowed ({MAX_ACTIVE_KEYS}); revoke one first"
            )));
        }
        let id = unused_id("ak_", &self.keys);
        let (secret, digest) = self.new_secret();
        let key = KeyRecord {
            id,
            application_id: app.id.clone(),
            created_by: caller.id.clone(),
            name: new.name,
            description: new.description,
            scopes,
            secret_sha256: digest,
            created_ms: now,
            seq: self.next_seq(),
            expires_ms,
            revoked_ms: None,
        };
        self.save_key(key.clone()).map_err(|e| self.internal(e))?;
        self.host.info(&format!(
            "{NAME}: user {} created access key {} in application {} with scopes {}",
            caller.id,
            key.id,
            app.id,
            key.scopes.join(" ")
        ));
        let mut view = key_view(&key, now);
        view["access_key"] = Value::String(secret);
        Ok((201, view))
    }

    fn patch_key(
        &mut self,
        caller: &UserRecord,
        app_id: &str,
        key_id: &str,
        body: &str,
    ) -> ApiResult {
        if !caller.may_on_some_keys(KeyAction::Edit) && !caller.may_on_some_keys(KeyAction::Revoke)
        {
            return Err(lacking_keys(KeyAction::Edit, "editing"));
        }
        let app = self.app_in_domain(caller, app_id)?;
        let mut key = self.key_of(&app, key_id)?.clone();
        let patch = parse_patch(body)?;
        if patch.edits() && !caller.may_on_keys(KeyAction::Edit, &app.owner) {
            return Err(lacking_keys(KeyAction::Edit, "editing"));
        }
        if patch.revoke && !caller.may_on_keys(KeyAction::Revoke, &app.owner) {
            return Err(lacking_keys(KeyAction::Revoke, "revoking"));
        }
        if key.revoked_ms.is_some() {
            return Err(conflict(format!(
                "access key {key_id} is revoked and cannot be changed"
            )));
        }
        let now = self.now();
        if let Some(name) = patch.name {
            key.name = name;
        }
        if let Some(description) = patch.description {
            key.description = description;
        }
        if patch.revoke {
            key.revoked_ms = Some(now);
        }
        self.save_key(key.clone()).map_err(|e| self.internal(e))?;
        if patch.revoke {
            self.host.info(&format!(
                "{NAME}: user {} revoked access key {key_id}",
                caller.id
            ));
        }
        Ok((200, key_view(&key, now)))
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn every_declared_route_parses() {
        for (method, path) in ROUTES {
            let concrete = path.replace("{id}", "x").replace("{key_id}", "y");
            assert!(parse_route(method, &concrete).is_some(), "{method} {path}");
        }
        assert_eq!(
            parse_route("GET", "/pelion/v1/applications/a/access-keys/b"),
            Some(Op::GetKey("a", "b"))
        );
        for (method, path) in [
            ("GET", "/pelion/v2/me"),
            ("get", "/pelion/v1/me"),
            ("PUT", "/pelion/v1/applications/x"),
            ("DELETE", "/pelion/v1/applications/x"),
            ("GET", "/pelion/v1/applications/x/keys"),
            ("GET", "/pelion/v1"),
            ("GET", "/me"),
        ] {
            assert_eq!(parse_route(method, path), None, "{method} {path}");
        }
    }

    #[test]
    fn include_revoked_query() {
        let cases: &[(Option<&str>, Result<bool, ()>)] = &[
            (None, Ok(false)),
            (Some(""), Ok(false)),
            (Some("include_revoked=true"), Ok(true)),
            (Some("a=b&include_revoked=1"), Ok(true)),
            (Some("include_revoked=false"), Ok(false)),
            (Some("include_revoked=yes"), Err(())),
            (Some("include_revoked"), Err(())),
        ];
        for (q, want) in cases {
            assert_eq!(include_revoked(*q).map_err(|_| ()), *want, "{q:?}");
        }
    }

    #[test]
    fn patch_parsing() {
        assert_eq!(
            parse_patch(r#"{"name": "n", "status": "revoked"}"#),
            Ok(Patch {
                name: Some("n".into()),
                description: None,
                revoke: true
            })
        );
        for (body, fragment) in [
            ("", "JSON object"),
            ("{", "not valid JSON"),
            ("[]", "JSON object"),
            ("{}", "nothing to change"),
            (r#"{"name": ""}"#, "name must be"),
            (r#"{"name": 3}"#, "must be a string"),
            (r#"{"status": "active"}"#, "only be changed to"),
            (r#"{"status": "expired"}"#, "only be changed to"),
            (r#"{"scopes": []}"#, "scopes are chosen"),
            (r#"{"expires_at": null}"#, "expiry is chosen"),
            (r#"{"owner": "x"}"#, "cannot be changed"),
        ] {
            let err = parse_patch(body).expect_err(body);
            assert_eq!(err.status, 400, "{body}");
            assert!(err.message.contains(fragment), "{body}: {}", err.message);
        }
    }
}
