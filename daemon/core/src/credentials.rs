//! Device credentials (issue 21): each endpoint's PSK and the certificates the CA issued,
//! and what a secure session's identity binds a device to.
//!
//! [`DeviceCredentials`] keeps every record in memory, loaded at start; a change is
//! written to the store first and applied to memory only once the store has committed it
//! (one change at a time, so memory follows the store's order). The secure listeners ask
//! it during handshakes through [`connectord_coap::Credentials`] and the registration
//! interface asks it for identity binding ([`DeviceCredentials::bound`]); both answer from
//! memory.
//!
//! A change that takes a credential away (a PSK replaced or removed, an endpoint's
//! certificates revoked) returns a [`Revoked`]; the caller closes the open secure sessions
//! it covers (`Transport::close_sessions`), so that nothing already connected keeps
//! the access the credential gave.
//!
//! Decisions:
//! - A key is a secret: it is never logged (`PskRecord`'s `Debug` leaves it out), never
//!   answered by a read ([`PskInfo`] has no key), and kept in clear in the database (a
//!   PSK handshake needs the key itself; the database is 0600).
//! - A key is 16 to 64 bytes: at least the 128 bits of the LwM2M suite's AES-128, and at
//!   most what DTLS stacks of small devices take (tinydtls, mbedTLS default to 32/64).
//!   An identity is 1 to 128 bytes of UTF-8 without control characters, unique across
//!   every domain (a handshake names no domain).
//! - Certificates are revoked by serial ([`connectord_store::CredentialStore`]); a
//!   certificate issued before the daemon recorded them (schema 8 and earlier) is
//!   unknown here: it stays valid and does not make its endpoint "have credentials".

use std::sync::{Arc, RwLock};

use connectord_coap::PeerIdentity;
use connectord_model::{CertificateRecord, PskRecord, normal_serial, now_ms, valid_name};

use crate::hashing::Map;
use crate::store::{Store, StoreError};

/// Fewest bytes of a PSK.
pub const MIN_KEY_LEN: usize = 16;
/// Most bytes of a PSK.
pub const MAX_KEY_LEN: usize = 64;
/// Most bytes of a PSK identity.
pub const MAX_IDENTITY_LEN: usize = 128;

/// Why a credential change was refused.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// A bad value from the caller (REST 400); the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// The PSK identity is another endpoint's (REST 409).
    #[error("the PSK identity {identity:?} belongs to another endpoint")]
    IdentityTaken { identity: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a read shows of an endpoint's PSK: never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PskInfo {
    pub identity: String,
    pub created_ms: u64,
}

/// What is known of one endpoint's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub domain: String,
    pub ep: String,
    pub psk: Option<PskInfo>,
    /// The certificates issued to it, revoked ones included, oldest first.
    pub certificates: Vec<CertificateRecord>,
}

/// The secure sessions a change took the credential of: close them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revoked {
    pub psk_identities: Vec<String>,
    pub serials: Vec<String>,
}

impl Revoked {
    /// Whether a session that proved `identity` lost its credential.
    pub fn covers(&self, identity: &PeerIdentity) -> bool {
        match identity {
            PeerIdentity::Psk(id) => self.psk_identities.iter().any(|i| **i == **id),
            PeerIdentity::Certificate { serial, .. } => {
                let serial = normal_serial(serial);
                self.serials.contains(&serial)
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.psk_identities.is_empty() && self.serials.is_empty()
    }
}

/// What [`DeviceCredentials::reload`] found another node changed.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// The credentials taken away: the caller closes the sessions they cover.
    pub revoked: Revoked,
    /// (domain, endpoint) given a PSK, or a new key: a registration of theirs over plain
    /// CoAP ends, as when the PSK is provisioned through this node.
    pub provisioned: Vec<(String, String)>,
    /// (domain, endpoint) that had credentials in force and have none now (revoked): a
    /// registration of theirs over DTLS or TLS ends, as when revoked through this node.
    pub withdrawn: Vec<(String, String)>,
}

/// One endpoint's credentials in memory.
#[derive(Default)]
struct Held {
    psk: Option<PskRecord>,
    /// Serials ([`normal_serial`]) of its certificates, revoked ones included.
    serials: Vec<String>,
}

/// Indexed so that the registration path (one lookup per plain registration) neither
/// allocates nor scans: domain → endpoint → credentials.
#[derive(Default)]
struct State {
    by_ep: Map<String, Map<String, Held>>,
    /// PSK identity → (domain, endpoint).
    by_identity: Map<String, (String, String)>,
    /// By serial ([`normal_serial`]).
    certificates: Map<String, CertificateRecord>,
}

impl State {
    fn held(&self, domain: &str, ep: &str) -> Option<&Held> {
        self.by_ep.get(domain)?.get(ep)
    }

    fn held_mut(&mut self, domain: &str, ep: &str) -> &mut Held {
        self.by_ep
            .entry(domain.to_string())
            .or_default()
            .entry(ep.to_string())
            .or_default()
    }

    /// Whether (`domain`, `ep`) has a PSK or a certificate in force at `now`.
    fn holds_in_force(&self, domain: &str, ep: &str, now: u64) -> bool {
        let Some(held) = self.held(domain, ep) else {
            return false;
        };
        held.psk.is_some()
            || held
                .serials
                .iter()
                .filter_map(|serial| self.certificates.get(serial))
                .any(|c| c.in_force(now))
    }

    fn add_certificate(&mut self, c: CertificateRecord) {
        let serial = normal_serial(&c.serial);
        let held = self.held_mut(&c.domain, &c.ep);
        if !held.serials.contains(&serial) {
            held.serials.push(serial.clone());
        }
        self.certificates.insert(serial, c);
    }
}

/// The device credentials, in memory, written through to the store.
pub struct DeviceCredentials {
    store: Arc<dyn Store>,
    /// The domain of a certificate without an OU (`registry.default_domain`).
    default_domain: String,
    state: RwLock<State>,
    /// One change at a time, from its store write to its memory update.
    writes: tokio::sync::Mutex<()>,
}

impl DeviceCredentials {
    /// Loads every stored credential (at start).
    pub async fn load(
        store: Arc<dyn Store>,
        default_domain: &str,
    ) -> Result<Arc<DeviceCredentials>, StoreError> {
        let state = read_state(store.as_ref()).await?;
        Ok(Arc::new(DeviceCredentials {
            store,
            default_domain: default_domain.to_string(),
            state: RwLock::new(state),
            writes: tokio::sync::Mutex::new(()),
        }))
    }

    /// Reads every credential from the store again and takes it as the truth (issue 22:
    /// another cluster node changed some; the daemon calls this when the NATS store says
    /// so). Returns what the new records take away compared with memory (a PSK identity
    /// removed or given another key or endpoint, a certificate now revoked): the caller
    /// closes the sessions it covers, as after a change made here. Runs under the lock of
    /// this node's own changes, so none of them is lost between the read and the swap.
    pub async fn reload(&self) -> Result<Reloaded, StoreError> {
        let _one = self.writes.lock().await;
        let new = read_state(self.store.as_ref()).await?;
        let mut s = self.write();
        let mut revoked = Revoked::default();
        for (identity, (domain, ep)) in &s.by_identity {
            let old_key = s.held(domain, ep).and_then(|h| h.psk.as_ref());
            let new_key = new
                .by_identity
                .get(identity)
                .filter(|(d, e)| d == domain && e == ep)
                .and_then(|(d, e)| new.held(d, e))
                .and_then(|h| h.psk.as_ref());
            let same = matches!((old_key, new_key), (Some(o), Some(n)) if o.key == n.key);
            if !same {
                revoked.psk_identities.push(identity.clone());
            }
        }
        for (serial, c) in &new.certificates {
            let was_revoked = s
                .certificates
                .get(serial)
                .is_some_and(|old| old.revoked_ms.is_some());
            if c.revoked_ms.is_some() && !was_revoked {
                revoked.serials.push(serial.clone());
            }
        }
        revoked.psk_identities.sort();
        revoked.serials.sort();
        let now = now_ms();
        let mut provisioned = Vec::new();
        for (domain, eps) in &new.by_ep {
            for (ep, held) in eps {
                let Some(key) = held.psk.as_ref().map(|p| &p.key) else {
                    continue;
                };
                let old = s.held(domain, ep).and_then(|h| h.psk.as_ref());
                if old.is_none_or(|o| o.key != *key) {
                    provisioned.push((domain.clone(), ep.clone()));
                }
            }
        }
        let mut withdrawn = Vec::new();
        for (domain, eps) in &s.by_ep {
            for ep in eps.keys() {
                if s.holds_in_force(domain, ep, now) && !new.holds_in_force(domain, ep, now) {
                    withdrawn.push((domain.clone(), ep.clone()));
                }
            }
        }
        provisioned.sort();
        withdrawn.sort();
        *s = new;
        Ok(Reloaded {
            revoked,
            provisioned,
            withdrawn,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // Each change is applied whole under the write lock: a poisoned lock is consistent.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Endpoints with a PSK or an issued certificate.
    pub fn len(&self) -> usize {
        self.read().by_ep.values().map(|eps| eps.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What is known of (`domain`, `ep`); `None` when it has neither a PSK nor a
    /// recorded certificate.
    pub fn get(&self, domain: &str, ep: &str) -> Option<DeviceInfo> {
        let s = self.read();
        info_of(&s, domain, ep)
    }

    /// Every endpoint of `domain` with credentials, by name.
    pub fn list(&self, domain: &str) -> Vec<DeviceInfo> {
        let s = self.read();
        let Some(eps) = s.by_ep.get(domain) else {
            return Vec::new();
        };
        let mut names: Vec<&String> = eps.keys().collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|ep| info_of(&s, domain, ep))
            .collect()
    }

    /// Whether (`domain`, `ep`) can prove itself on a secure transport now: it has a PSK,
    /// or a recorded certificate neither revoked nor expired. Such an endpoint may not
    /// register over plain CoAP.
    pub fn has_credentials(&self, domain: &str, ep: &str) -> bool {
        self.read().holds_in_force(domain, ep, now_ms())
    }

    /// The (domain, endpoint) a secure session's identity proves: a PSK identity's record,
    /// or a certificate's OU and CN (the default domain when it has no OU). `None` for a
    /// PSK identity with no record (removed since the handshake).
    pub fn bound(&self, identity: &PeerIdentity) -> Option<(String, String)> {
        match identity {
            PeerIdentity::Psk(id) => self.read().by_identity.get(&**id).cloned(),
            PeerIdentity::Certificate { cn, ou, .. } => Some((
                ou.as_deref().unwrap_or(&self.default_domain).to_string(),
                cn.to_string(),
            )),
        }
    }

    /// Provisions (or replaces) the PSK of (`domain`, `ep`). Returns the sessions of the
    /// key it replaced (an endpoint's earlier identity, or the same identity with its old
    /// key): they are to be closed.
    pub async fn put_psk(
        &self,
        domain: &str,
        ep: &str,
        identity: &str,
        key: Vec<u8>,
    ) -> Result<Revoked, CredentialError> {
        check_ep(ep)?;
        check_identity(identity)?;
        check_key(&key)?;
        let _one = self.writes.lock().await;
        let old = {
            let s = self.read();
            if let Some((d, e)) = s.by_identity.get(identity)
                && (d != domain || e != ep)
            {
                return Err(CredentialError::IdentityTaken {
                    identity: identity.to_string(),
                });
            }
            s.held(domain, ep)
                .and_then(|h| h.psk.as_ref())
                .map(|p| p.identity.clone())
        };
        let rec = PskRecord {
            domain: domain.to_string(),
            ep: ep.to_string(),
            identity: identity.to_string(),
            key,
            created_ms: now_ms(),
        };
        self.store.put_psk(rec.clone()).await?;
        let mut s = self.write();
        if let Some(old) = &old {
            s.by_identity.remove(old);
        }
        s.by_identity
            .insert(rec.identity.clone(), (rec.domain.clone(), rec.ep.clone()));
        s.held_mut(domain, ep).psk = Some(rec);
        Ok(Revoked {
            psk_identities: old.into_iter().collect(),
            serials: Vec::new(),
        })
    }

    /// Takes every credential of (`domain`, `ep`) away: its PSK is removed and its
    /// certificates revoked. `None` when it had none (nothing changed).
    pub async fn revoke(&self, domain: &str, ep: &str) -> Result<Option<Revoked>, CredentialError> {
        let _one = self.writes.lock().await;
        let Some(info) = self.get(domain, ep) else {
            return Ok(None);
        };
        let now = now_ms();
        self.store
            .revoke_device(domain.to_string(), ep.to_string(), now)
            .await?;
        let mut guard = self.write();
        let s = &mut *guard;
        let held = s.held_mut(domain, ep);
        let psk = held.psk.take();
        let of_ep = held.serials.clone();
        if of_ep.is_empty()
            && let Some(eps) = s.by_ep.get_mut(domain)
        {
            // Nothing left to show: the endpoint has no credentials at all.
            eps.remove(ep);
            if eps.is_empty() {
                s.by_ep.remove(domain);
            }
        }
        if let Some(p) = psk {
            s.by_identity.remove(&p.identity);
        }
        let mut serials = Vec::new();
        for serial in of_ep {
            if let Some(c) = s.certificates.get_mut(&serial)
                && c.revoked_ms.is_none()
            {
                c.revoked_ms = Some(now);
                serials.push(serial);
            }
        }
        serials.sort();
        Ok(Some(Revoked {
            psk_identities: info.psk.map(|p| p.identity).into_iter().collect(),
            serials,
        }))
    }

    /// Records a certificate the CA issued (`POST /api/cert`), before it is handed out.
    pub async fn record_certificate(&self, mut rec: CertificateRecord) -> Result<(), StoreError> {
        rec.serial = normal_serial(&rec.serial);
        let _one = self.writes.lock().await;
        self.store.put_certificate(rec.clone()).await?;
        self.write().add_certificate(rec);
        Ok(())
    }
}

/// Every stored credential, indexed.
async fn read_state(store: &dyn Store) -> Result<State, StoreError> {
    let psks = store.load_psks().await?;
    let certificates = store.load_certificates().await?;
    let mut state = State::default();
    for p in psks {
        state
            .by_identity
            .insert(p.identity.clone(), (p.domain.clone(), p.ep.clone()));
        let (domain, ep) = (p.domain.clone(), p.ep.clone());
        state.held_mut(&domain, &ep).psk = Some(p);
    }
    for c in certificates {
        state.add_certificate(c);
    }
    Ok(state)
}

fn info_of(s: &State, domain: &str, ep: &str) -> Option<DeviceInfo> {
    let held = s.held(domain, ep)?;
    let psk = held.psk.as_ref().map(|p| PskInfo {
        identity: p.identity.clone(),
        created_ms: p.created_ms,
    });
    let mut certificates: Vec<CertificateRecord> = held
        .serials
        .iter()
        .filter_map(|serial| s.certificates.get(serial).cloned())
        .collect();
    if psk.is_none() && certificates.is_empty() {
        return None;
    }
    certificates.sort_by(|a, b| (a.issued_ms, &a.serial).cmp(&(b.issued_ms, &b.serial)));
    Some(DeviceInfo {
        domain: domain.to_string(),
        ep: ep.to_string(),
        psk,
        certificates,
    })
}

fn check_ep(ep: &str) -> Result<(), CredentialError> {
    if valid_name(ep) {
        Ok(())
    } else {
        Err(CredentialError::Invalid(format!(
            "the endpoint name must be 1 to {} bytes without control characters, '/', '?' or '#'",
            connectord_model::MAX_NAME_LEN
        )))
    }
}

fn check_identity(identity: &str) -> Result<(), CredentialError> {
    if identity.is_empty() || identity.len() > MAX_IDENTITY_LEN {
        return Err(CredentialError::Invalid(format!(
            "psk_identity must be 1 to {MAX_IDENTITY_LEN} bytes (it has {})",
            identity.len()
        )));
    }
    if identity.chars().any(char::is_control) {
        return Err(CredentialError::Invalid(
            "psk_identity may not hold control characters".into(),
        ));
    }
    Ok(())
}

fn check_key(key: &[u8]) -> Result<(), CredentialError> {
    if (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&key.len()) {
        Ok(())
    } else {
        Err(CredentialError::Invalid(format!(
            "psk must be {MIN_KEY_LEN} to {MAX_KEY_LEN} bytes ({} to {} hex digits); it has {} bytes",
            MIN_KEY_LEN * 2,
            MAX_KEY_LEN * 2,
            key.len()
        )))
    }
}

/// A PSK written as hex (either case, an even count of digits), as the REST API and the
/// CLI take it; the error names the field.
pub fn parse_hex_key(hex_key: &str) -> Result<Vec<u8>, CredentialError> {
    let key = hex::decode(hex_key.trim()).map_err(|e| {
        CredentialError::Invalid(format!("psk must be hex digits (two per byte): {e}"))
    })?;
    check_key(&key)?;
    Ok(key)
}

/// The secure listeners' questions, answered from memory.
impl connectord_coap::Credentials for DeviceCredentials {
    fn psk(&self, identity: &[u8]) -> Option<Vec<u8>> {
        let identity = std::str::from_utf8(identity).ok()?;
        let s = self.read();
        let (domain, ep) = s.by_identity.get(identity)?;
        s.held(domain, ep)?.psk.as_ref().map(|p| p.key.clone())
    }

    fn certificate_valid(&self, _cn: &str, serial: &str) -> bool {
        // Unknown serials (issued before certificates were recorded) stay valid; the
        // listener has already checked the chain and the validity period.
        self.read()
            .certificates
            .get(&normal_serial(serial))
            .is_none_or(|c| c.revoked_ms.is_none())
    }
}

/// What the registration interface does with a request, given how it came (a secure
/// session's identity, bound to an endpoint by [`DeviceCredentials::bound`], or plain
/// CoAP) and the endpoint it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on, as (domain, endpoint) when the credential named them.
    Accept {
        domain: Option<String>,
        ep: Option<String>,
    },
    /// 4.03 with this diagnostic.
    Forbidden(String),
    /// 4.03 with this diagnostic, counted as a plain-CoAP request refused for an
    /// endpoint that has credentials (`connectord_coap_plain_refused_total`).
    PlainRefused(String),
}

/// How a request to the registration interface arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// Plain CoAP (UDP): no proof of who sent it.
    Plain,
    /// A secure session whose identity binds to (domain, endpoint).
    Bound { domain: String, ep: String },
    /// A secure session whose identity binds to nothing (a PSK removed since the
    /// handshake).
    Unbound,
}

/// The decision for `POST /rd`: `ep`/`d` are the query's (if given), `default_domain` the
/// registry's; `has_credentials` answers for (domain, endpoint); `secure_now` says whether
/// the endpoint's current registration, if any, came over a secure transport.
///
/// Decision: on a secure transport a missing `ep=` (or `d=`) takes the credential's name
/// (or domain): the server knows who the device is from its credential (LwM2M 1.1 lets
/// a client leave `ep` out when the server can tell it otherwise).
pub fn on_register(
    arrival: &Arrival,
    ep: Option<&str>,
    domain: Option<&str>,
    default_domain: &str,
    has_credentials: impl Fn(&str, &str) -> bool,
    secure_now: impl Fn(&str, &str) -> bool,
) -> Verdict {
    match arrival {
        Arrival::Unbound => Verdict::Forbidden("the session's credential has been revoked".into()),
        Arrival::Bound {
            domain: bound_domain,
            ep: bound_ep,
        } => {
            if let Some(ep) = ep
                && ep != bound_ep
            {
                return Verdict::Forbidden(format!(
                    "ep={ep} contradicts the credential, which is endpoint {bound_ep}"
                ));
            }
            if let Some(d) = domain
                && d != bound_domain
            {
                return Verdict::Forbidden(format!(
                    "d={d} contradicts the credential, which is of domain {bound_domain}"
                ));
            }
            Verdict::Accept {
                domain: Some(bound_domain.clone()),
                ep: Some(bound_ep.clone()),
            }
        }
        Arrival::Plain => {
            let Some(ep) = ep else {
                return Verdict::Accept {
                    domain: None,
                    ep: None,
                };
            };
            let d = domain.unwrap_or(default_domain);
            if has_credentials(d, ep) {
                return Verdict::PlainRefused(format!(
                    "endpoint {ep} has credentials: it registers over DTLS or TLS only"
                ));
            }
            if secure_now(d, ep) {
                return Verdict::PlainRefused(format!(
                    "endpoint {ep} is registered over a secure transport: plain CoAP cannot replace it"
                ));
            }
            Verdict::Accept {
                domain: None,
                ep: None,
            }
        }
    }
}

/// The decision for `POST /rd/{id}` and `DELETE /rd/{id}` of the registration of
/// (`domain`, `ep`), made over a secure transport or not (`reg_secure`): they must come
/// from the same credential as the registration (a plain update of a DTLS registration
/// is refused), and plain ones not for an endpoint that has credentials now.
pub fn on_update(
    arrival: &Arrival,
    domain: &str,
    ep: &str,
    reg_secure: bool,
    has_credentials: bool,
) -> Verdict {
    let accept = Verdict::Accept {
        domain: None,
        ep: None,
    };
    match arrival {
        Arrival::Unbound => Verdict::Forbidden("the session's credential has been revoked".into()),
        Arrival::Bound { domain: d, ep: e } => {
            if d == domain && e == ep {
                accept
            } else {
                Verdict::Forbidden(format!(
                    "this registration is endpoint {ep} of domain {domain}; the session's credential is endpoint {e} of domain {d}"
                ))
            }
        }
        Arrival::Plain if reg_secure => Verdict::PlainRefused(format!(
            "endpoint {ep} registered over a secure transport: its updates and de-registration must come over it"
        )),
        Arrival::Plain if has_credentials => Verdict::PlainRefused(format!(
            "endpoint {ep} has credentials: it registers over DTLS or TLS only"
        )),
        Arrival::Plain => accept,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use connectord_coap::Credentials as _;
    use connectord_store::memory::MemoryStore;

    fn bound(d: &str, e: &str) -> Arrival {
        Arrival::Bound {
            domain: d.into(),
            ep: e.into(),
        }
    }

    const NONE: fn(&str, &str) -> bool = |_, _| false;

    #[test]
    fn a_secure_registration_takes_its_name_and_domain_from_the_credential() {
        let a = bound("dom", "dev-1");
        let accept = Verdict::Accept {
            domain: Some("dom".into()),
            ep: Some("dev-1".into()),
        };
        // Matching, or left out: the credential's.
        assert_eq!(
            on_register(&a, Some("dev-1"), Some("dom"), "default", NONE, NONE),
            accept
        );
        assert_eq!(on_register(&a, None, None, "default", NONE, NONE), accept);
        assert_eq!(
            on_register(&a, Some("dev-1"), None, "default", NONE, NONE),
            accept
        );
        // Contradicting: refused, naming both.
        let Verdict::Forbidden(m) = on_register(&a, Some("dev-2"), None, "default", NONE, NONE)
        else {
            panic!()
        };
        assert!(m.contains("ep=dev-2") && m.contains("dev-1"), "{m}");
        let Verdict::Forbidden(m) =
            on_register(&a, Some("dev-1"), Some("other"), "default", NONE, NONE)
        else {
            panic!()
        };
        assert!(m.contains("d=other") && m.contains("dom"), "{m}");
        assert!(matches!(
            on_register(
                &Arrival::Unbound,
                Some("dev-1"),
                None,
                "default",
                NONE,
                NONE
            ),
            Verdict::Forbidden(_)
        ));
    }

    #[test]
    fn plain_registration_of_an_endpoint_with_credentials_is_refused() {
        let has = |d: &str, e: &str| d == "default" && e == "kept";
        assert!(matches!(
            on_register(&Arrival::Plain, Some("kept"), None, "default", has, NONE),
            Verdict::PlainRefused(_)
        ));
        // The same name in another domain is another endpoint.
        assert_eq!(
            on_register(
                &Arrival::Plain,
                Some("kept"),
                Some("x"),
                "default",
                has,
                NONE
            ),
            Verdict::Accept {
                domain: None,
                ep: None
            }
        );
        // A live secure registration is not replaced over plain CoAP either.
        assert!(matches!(
            on_register(
                &Arrival::Plain,
                Some("free"),
                None,
                "default",
                NONE,
                |_, e| e == "free"
            ),
            Verdict::PlainRefused(_)
        ));
        assert!(matches!(
            on_register(&Arrival::Plain, Some("free"), None, "default", NONE, NONE),
            Verdict::Accept { .. }
        ));
    }

    #[test]
    fn updates_come_from_the_registrations_credential() {
        let a = bound("d", "e");
        assert!(matches!(
            on_update(&a, "d", "e", true, true),
            Verdict::Accept { .. }
        ));
        assert!(matches!(
            on_update(&bound("d", "x"), "d", "e", true, true),
            Verdict::Forbidden(_)
        ));
        assert!(matches!(
            on_update(&bound("y", "e"), "d", "e", true, true),
            Verdict::Forbidden(_)
        ));
        assert!(matches!(
            on_update(&Arrival::Plain, "d", "e", true, false),
            Verdict::PlainRefused(_)
        ));
        assert!(matches!(
            on_update(&Arrival::Plain, "d", "e", false, true),
            Verdict::PlainRefused(_)
        ));
        assert!(matches!(
            on_update(&Arrival::Plain, "d", "e", false, false),
            Verdict::Accept { .. }
        ));
        assert!(matches!(
            on_update(&Arrival::Unbound, "d", "e", true, true),
            Verdict::Forbidden(_)
        ));
    }

    fn cert(serial: &str, ep: &str) -> CertificateRecord {
        CertificateRecord {
            serial: serial.into(),
            domain: "d".into(),
            ep: ep.into(),
            issued_ms: 1,
            not_after_ms: u64::MAX,
            revoked_ms: None,
        }
    }

    #[tokio::test]
    async fn changes_reach_memory_only_after_the_store_commits() {
        let store = Arc::new(MemoryStore::new());
        let creds = DeviceCredentials::load(store.clone(), "default")
            .await
            .unwrap();
        let key = vec![7u8; 16];
        store.fail_writes(true);
        assert!(matches!(
            creds.put_psk("d", "e", "id-1", key.clone()).await,
            Err(CredentialError::Store(_))
        ));
        assert_eq!(creds.psk(b"id-1"), None);
        assert!(!creds.has_credentials("d", "e"));
        store.fail_writes(false);
        let revoked = creds.put_psk("d", "e", "id-1", key.clone()).await.unwrap();
        assert!(revoked.is_empty());
        assert_eq!(creds.psk(b"id-1"), Some(key.clone()));
        assert_eq!(
            creds.bound(&PeerIdentity::Psk("id-1".into())),
            Some(("d".into(), "e".into()))
        );
        assert!(creds.has_credentials("d", "e"));
        // Another endpoint cannot take the identity.
        assert!(matches!(
            creds.put_psk("d", "other", "id-1", key.clone()).await,
            Err(CredentialError::IdentityTaken { .. })
        ));
        // A new identity replaces the old one, whose sessions are to close.
        let revoked = creds
            .put_psk("d", "e", "id-2", vec![8u8; 32])
            .await
            .unwrap();
        assert!(revoked.covers(&PeerIdentity::Psk("id-1".into())));
        assert!(!revoked.covers(&PeerIdentity::Psk("id-2".into())));
        assert_eq!(creds.psk(b"id-1"), None);
        // What a reload from the store gives is what memory holds.
        let again = DeviceCredentials::load(store.clone(), "default")
            .await
            .unwrap();
        assert_eq!(again.psk(b"id-2"), Some(vec![8u8; 32]));
        assert_eq!(again.get("d", "e"), creds.get("d", "e"));
    }

    /// Issue 22: two nodes' credentials on one store; what one changes, the other takes
    /// at its reload, which names what was taken away (to close its sessions).
    #[tokio::test]
    async fn a_reload_takes_another_nodes_changes_and_names_what_they_took_away() {
        let store = Arc::new(MemoryStore::new());
        let a = DeviceCredentials::load(store.clone(), "default")
            .await
            .unwrap();
        let b = DeviceCredentials::load(store.clone(), "default")
            .await
            .unwrap();
        a.put_psk("d", "e", "id-1", vec![1u8; 16]).await.unwrap();
        a.put_psk("d", "f", "id-f", vec![3u8; 16]).await.unwrap();
        a.record_certificate(cert("0a", "g")).await.unwrap();
        assert_eq!(b.psk(b"id-1"), None, "not before the reload");
        let r = b.reload().await.unwrap();
        assert!(r.revoked.is_empty(), "{r:?}");
        let de = |e: &str| ("d".to_string(), e.to_string());
        assert_eq!(r.provisioned, [de("e"), de("f")], "new PSKs");
        assert!(r.withdrawn.is_empty());
        assert_eq!(b.psk(b"id-1"), Some(vec![1u8; 16]));
        assert!(b.has_credentials("d", "g"));
        // a gives e a new key (same identity), revokes g and f: b's reload names them.
        a.put_psk("d", "e", "id-1", vec![2u8; 16]).await.unwrap();
        a.revoke("d", "g").await.unwrap();
        a.revoke("d", "f").await.unwrap();
        let r = b.reload().await.unwrap();
        assert_eq!(r.revoked.psk_identities, ["id-1", "id-f"]);
        assert_eq!(r.revoked.serials, [normal_serial("0a")]);
        // e's new key is a provisioning (its plain registration ends); f and g have no
        // credentials left (their secure registrations end).
        assert_eq!(r.provisioned, [de("e")]);
        assert_eq!(r.withdrawn, [de("f"), de("g")]);
        assert_eq!(b.psk(b"id-1"), Some(vec![2u8; 16]));
        assert_eq!(b.psk(b"id-f"), None);
        assert!(!b.certificate_valid("g", "0a"));
        let r = b.reload().await.unwrap();
        assert!(
            r.revoked.is_empty() && r.provisioned.is_empty() && r.withdrawn.is_empty(),
            "nothing new: {r:?}"
        );
    }

    #[tokio::test]
    async fn revocation_removes_the_key_and_revokes_the_certificates() {
        let store = Arc::new(MemoryStore::new());
        let creds = DeviceCredentials::load(store.clone(), "default")
            .await
            .unwrap();
        creds.put_psk("d", "e", "id", vec![1u8; 16]).await.unwrap();
        creds.record_certificate(cert("4A:01", "e")).await.unwrap();
        creds.record_certificate(cert("4b02", "f")).await.unwrap();
        assert!(creds.certificate_valid("e", "4a01"));
        assert_eq!(creds.list("d").len(), 2);
        let cert_identity = PeerIdentity::Certificate {
            cn: "e".into(),
            ou: Some("d".into()),
            serial: "004a01".into(),
        };
        // Failing store: nothing changes.
        store.fail_writes(true);
        assert!(creds.revoke("d", "e").await.is_err());
        assert_eq!(creds.psk(b"id"), Some(vec![1u8; 16]));
        store.fail_writes(false);
        let revoked = creds.revoke("d", "e").await.unwrap().unwrap();
        assert!(revoked.covers(&PeerIdentity::Psk("id".into())));
        assert!(revoked.covers(&cert_identity));
        assert_eq!(creds.psk(b"id"), None);
        assert!(!creds.certificate_valid("e", "4a01"));
        assert!(creds.certificate_valid("f", "4b02"));
        // Unknown serials (issued before they were recorded) stay valid.
        assert!(creds.certificate_valid("g", "99"));
        assert!(!creds.has_credentials("d", "e"));
        assert!(creds.has_credentials("d", "f"));
        // The record stays, showing the revoked certificate.
        let info = creds.get("d", "e").unwrap();
        assert!(info.psk.is_none() && info.certificates[0].revoked_ms.is_some());
        assert_eq!(creds.revoke("d", "nobody").await.unwrap(), None);
        // A PSK-only endpoint, revoked, is gone from the lists and the count.
        creds
            .put_psk("d", "only-psk", "op", vec![2u8; 16])
            .await
            .unwrap();
        assert_eq!(creds.len(), 3);
        creds.revoke("d", "only-psk").await.unwrap().unwrap();
        assert_eq!(creds.len(), 2);
        assert_eq!(creds.get("d", "only-psk"), None);
        // A certificate's identity binds by its OU and CN; without OU, the default domain.
        assert_eq!(creds.bound(&cert_identity), Some(("d".into(), "e".into())));
        let no_ou = PeerIdentity::Certificate {
            cn: "e".into(),
            ou: None,
            serial: "1".into(),
        };
        assert_eq!(creds.bound(&no_ou), Some(("default".into(), "e".into())));
    }

    #[test]
    fn bad_keys_and_identities_are_named() {
        let e = parse_hex_key("zz").unwrap_err().to_string();
        assert!(e.contains("psk") && e.contains("hex"), "{e}");
        let e = parse_hex_key("00112233").unwrap_err().to_string();
        assert!(e.contains("16 to 64 bytes") && e.contains("4 bytes"), "{e}");
        assert!(parse_hex_key(&"ab".repeat(65)).is_err());
        assert_eq!(parse_hex_key(&"AB".repeat(16)).unwrap(), vec![0xab; 16]);
        assert!(check_identity("").is_err());
        assert!(check_identity(&"x".repeat(129)).is_err());
        assert!(check_identity("a\nb").is_err());
        assert!(check_identity("device-1@example").is_ok());
    }
}
