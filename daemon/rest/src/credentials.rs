//! Device credentials (issue 21): `GET /device-credentials`, `GET|PUT|DELETE
//! /device-credentials/{endpoint-name}`.
//!
//! The caller's domain is its key's (as for endpoints); a key restricted to some endpoints
//! (`allow`) sees and changes only theirs. Reading needs `endpoints:read`, changing needs
//! `resources:write` (provisioning devices, as `POST /api/cert`). `PUT` takes
//! `{"psk_identity": "…", "psk": "<hex>"}` and optionally `"domain"`, which must be the
//! key's (403 otherwise). The key is never answered: a read shows the identity,
//! `has_key`, when it was created, and the certificates `/api/cert` issued to the
//! endpoint. A `PUT` that replaces a key and a `DELETE` (which also revokes the endpoint's
//! certificates) close the open secure sessions that used the old credential.

use bytes::Bytes;
use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::reply::{Reply, error, json_object_body, store_failure};
use crate::auth::Principal;
use crate::coap::Transport;
use crate::registry::Registry;
use connectord_core::credentials::{
    CredentialError, DeviceCredentials, DeviceInfo, Revoked, parse_hex_key,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    psk_identity: String,
    psk: String,
    #[serde(default)]
    domain: Option<String>,
}

#[derive(Serialize)]
struct CertificateJson<'a> {
    serial: &'a str,
    issued: String,
    expires: String,
    revoked: Option<String>,
}

#[derive(Serialize)]
struct DeviceJson<'a> {
    endpoint: &'a str,
    domain: &'a str,
    psk_identity: Option<&'a str>,
    has_key: bool,
    created: Option<String>,
    certificates: Vec<CertificateJson<'a>>,
}

/// RFC 3339 in UTC with milliseconds (`2026-12-05T03:30:00.000Z`).
fn date(ms: u64) -> String {
    let t = time::OffsetDateTime::UNIX_EPOCH
        + time::Duration::milliseconds(i64::try_from(ms).unwrap_or(i64::MAX / 2));
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&f).unwrap_or_default()
}

fn json(info: &DeviceInfo) -> DeviceJson<'_> {
    DeviceJson {
        endpoint: &info.ep,
        domain: &info.domain,
        psk_identity: info.psk.as_ref().map(|p| p.identity.as_str()),
        has_key: info.psk.is_some(),
        created: info.psk.as_ref().map(|p| date(p.created_ms)),
        certificates: info
            .certificates
            .iter()
            .map(|c| CertificateJson {
                serial: &c.serial,
                issued: date(c.issued_ms),
                expires: date(c.not_after_ms),
                revoked: c.revoked_ms.map(date),
            })
            .collect(),
    }
}

fn not_found() -> Reply {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "this endpoint has no device credentials",
    )
}

/// `GET /device-credentials`: every endpoint of the key's domain with credentials that
/// the key may see, by name: as `GET /device-credentials/{ep}`, only those it may access
/// as a whole (before, a key allowed one resource of a device was refused the device's
/// record (403) and shown it in the list).
pub fn list(creds: &DeviceCredentials, who: &Principal) -> Reply {
    let all = creds.list(&who.domain);
    let shown: Vec<DeviceJson<'_>> = all
        .iter()
        .filter(|i| who.may_access_whole(&i.ep))
        .map(json)
        .collect();
    Reply::json(StatusCode::OK, &shown)
}

/// `GET /device-credentials/{ep}`.
pub fn get(creds: &DeviceCredentials, who: &Principal, ep: &str) -> Reply {
    match creds.get(&who.domain, ep) {
        Some(info) => Reply::json(StatusCode::OK, &json(&info)),
        None => not_found(),
    }
}

/// Closes the secure sessions a change took the credential of.
fn close(transport: &Transport, who: &Principal, ep: &str, revoked: &Revoked) {
    if revoked.is_empty() {
        return;
    }
    let closed = transport.close_sessions(&|id| revoked.covers(id));
    tracing::info!(
        ep,
        domain = %who.domain,
        "device credentials changed: closed {closed} secure sessions that used the old ones"
    );
}

fn refused(e: CredentialError, ep: &str) -> Reply {
    match e {
        CredentialError::Invalid(m) => error(StatusCode::BAD_REQUEST, "bad_request", &m),
        e @ CredentialError::IdentityTaken { .. } => {
            error(StatusCode::CONFLICT, "conflict", &e.to_string())
        }
        CredentialError::Store(e) => {
            store_failure(&e, &format!("device credentials of {ep} not changed"))
        }
    }
}

/// `PUT /device-credentials/{ep}`: 201 for a new PSK, 200 for a replaced one, with the
/// record (without the key). A plain-CoAP registration of `ep` ends
/// ([`Registry::end_for_credentials`]).
pub async fn put(
    creds: &DeviceCredentials,
    transport: &Transport,
    registry: &Registry,
    who: &Principal,
    ep: &str,
    body: Bytes,
) -> Reply {
    let req: PutBody = match json_object_body(
        &body,
        "the body must be a JSON object {\"psk_identity\": \"…\", \"psk\": \"<hex>\"}",
        "the body must be JSON {\"psk_identity\": \"…\", \"psk\": \"<hex>\"} (optionally \"domain\")",
    ) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    if let Some(d) = &req.domain
        && *d != who.domain
    {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("the access key is not valid for domain {d}"),
        );
    }
    let key = match parse_hex_key(&req.psk) {
        Ok(k) => k,
        Err(e) => return refused(e, ep),
    };
    let existed = creds.get(&who.domain, ep).is_some_and(|i| i.psk.is_some());
    match creds.put_psk(&who.domain, ep, &req.psk_identity, key).await {
        Ok(revoked) => {
            close(transport, who, ep, &revoked);
            tracing::info!(ep, domain = %who.domain, key = %who.key_id, "PSK provisioned");
            registry
                .end_for_credentials(
                    &who.domain,
                    ep,
                    false,
                    "a PSK was provisioned for an endpoint registered over plain CoAP",
                )
                .await;
            let status = if existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            match creds.get(&who.domain, ep) {
                Some(info) => Reply::json(status, &json(&info)),
                None => Reply::empty(status),
            }
        }
        Err(e) => refused(e, ep),
    }
}

/// `DELETE /device-credentials/{ep}`: removes the PSK and revokes the certificates; 204,
/// or 404 when the endpoint had no credentials. A registration of `ep` over DTLS or TLS
/// ends ([`Registry::end_for_credentials`]).
pub async fn delete(
    creds: &DeviceCredentials,
    transport: &Transport,
    registry: &Registry,
    who: &Principal,
    ep: &str,
) -> Reply {
    match creds.revoke(&who.domain, ep).await {
        Ok(Some(revoked)) => {
            tracing::info!(ep, domain = %who.domain, key = %who.key_id, "device credentials revoked");
            close(transport, who, ep, &revoked);
            registry
                .end_for_credentials(&who.domain, ep, true, "device credentials revoked")
                .await;
            Reply::empty(StatusCode::NO_CONTENT)
        }
        Ok(None) => not_found(),
        Err(e) => refused(e, ep),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(super::date(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::date(1_764_905_400_123), "2025-12-05T03:30:00.123Z");
    }
}
