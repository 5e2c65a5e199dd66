//! Developer tools (seed 000, "Developer tools"): `POST /api/cert`.
//! (`POST /api/api_tokens` is served by the connector auth plugin.)
//!
//! `POST /api/cert` takes `{"domain", "publickey"}` (an EC P-256 public key, PEM) and
//! answers 201 `{"domain", "endpoint", "server_certificate", "device_certificate"}`: a new
//! endpoint name and a device certificate signed by the daemon's CA (created at first
//! start in the state directory); `server_certificate` is that CA's certificate, which the
//! device uses to verify the server. 400 for bad JSON, a missing field or a key that is not
//! an EC P-256 public key; 401 when the domain is not the access key's. Needs the scope
//! `resources:write` (provisioning devices).

use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;

use super::reply::{Reply, error, json_object_body};
use crate::auth::Principal;
use crate::certs::CertAuthority;
use connectord_core::credentials::DeviceCredentials;
use connectord_core::model::CertificateRecord;

#[derive(Deserialize)]
struct CertRequest {
    domain: String,
    publickey: String,
}

/// Issues the certificate and records it (issue 21: its endpoint then has credentials and
/// registers over a secure transport only; `DELETE /device-credentials/{ep}` revokes it)
/// before handing it out: a certificate whose record failed is not answered (503/500).
pub async fn create_cert(
    ca: &CertAuthority,
    credentials: &DeviceCredentials,
    who: &Principal,
    body: Bytes,
) -> Reply {
    let req: CertRequest = match json_object_body(
        &body,
        "the body must be a JSON object {\"domain\": \"…\", \"publickey\": \"…\"}",
        "the body must be JSON {\"domain\": \"…\", \"publickey\": \"-----BEGIN PUBLIC KEY-----…\"}",
    ) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    if req.domain != who.domain {
        // A 401 names its scheme (RFC 9110 §11.6.1), as the core's do.
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the access key is not valid for this domain",
        )
        .header(http::header::WWW_AUTHENTICATE, "Bearer");
    }
    match ca.issue(&req.domain, &req.publickey) {
        Ok(issued) => {
            let record = CertificateRecord {
                serial: issued.serial.clone(),
                domain: req.domain.clone(),
                ep: issued.endpoint.clone(),
                issued_ms: connectord_core::model::now_ms(),
                not_after_ms: issued.not_after_ms,
                revoked_ms: None,
            };
            if let Err(e) = credentials.record_certificate(record).await {
                return super::reply::store_failure(&e, "issued certificate not recorded");
            }
            Reply::json(
                StatusCode::CREATED,
                &serde_json::json!({
                    "domain": req.domain,
                    "endpoint": issued.endpoint,
                    "server_certificate": issued.server_certificate,
                    "device_certificate": issued.device_certificate,
                }),
            )
        }
        Err(e) if e.is_bad_request() => {
            error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string())
        }
        Err(e) => {
            tracing::error!("certificate not issued: {e}");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the certificate could not be issued",
            )
        }
    }
}
