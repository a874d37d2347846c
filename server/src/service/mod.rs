//! The gRPC services and what they share: the caller's authentication,
//! blocking store calls, and conversions to protocol messages.

mod admin;
mod secrets;
mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use secretfs_proto::v1;
use tonic::{Request, Status};

pub use admin::AdminService;
pub use secrets::{SecretsService, MAX_REPLY_CONTENT};

use crate::audit_log::AuditLog;
use crate::auth_cache::{AuthCache, CertKey};
use crate::envelope::{MasterKey, Plaintext};
use crate::error::Error;
use crate::hub::Hub;
use crate::identity::Issuer;
use crate::pki::Ca;
use crate::report_budget::ReportBudget;
use crate::store::{AccessRecord, AuditEntry, ClientRecord, SecretRecord, Store};
use crate::tls::PeerInfo;

/// Everything a request handler needs, shared by both services.
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub master: MasterKey,
    pub ca: Ca,
    pub trust_domain: String,
    pub max_secret_size: usize,
    pub hub: Hub,
    pub audit: AuditLog,
    /// Recently decrypted versions, shared by Watch streams so a rotation
    /// seen by many watchers is decrypted once.
    pub recent: Mutex<HashMap<(u64, u64), Arc<Plaintext>>>,
    /// Authenticated certificates. Only this server adds or removes
    /// clients, and it invalidates the cache when it does
    /// (`clients_changed`), so a removal still takes effect at once.
    pub auth_cache: AuthCache,
    /// What each client may add to the audit log by reporting refusals.
    pub report_budget: ReportBudget,
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub client: ClientRecord,
}

impl Caller {
    pub fn name(&self) -> &str {
        &self.client.name
    }
}

/// Runs a blocking store call off the async threads.
pub async fn blocking<T, F>(f: F) -> Result<T, Status>
where
    F: FnOnce() -> Result<T, Error> + Send + 'static,
    T: Send + 'static,
{
    // The store has one writer and a few reader connections: more threads
    // than that only queue on their locks. Bounding them keeps a burst (a
    // rotation seen by 1,000 watchers) from spawning hundreds of blocking
    // threads that fight over two cores.
    static STORE_CALLS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(8);
    let _permit = STORE_CALLS
        .acquire()
        .await
        .map_err(|_| Status::internal("the server is shutting down"))?;
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Status::from),
        Err(e) => {
            tracing::error!(error = %e, "a store task failed");
            Err(Status::internal("internal error; see the server log"))
        }
    }
}

impl Shared {
    /// Runs a store call off the async threads.
    pub async fn on_store<T, F>(self: &Arc<Self>, f: F) -> Result<T, Status>
    where
        F: FnOnce(&dyn Store) -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        let this = self.clone();
        blocking(move || f(this.store.as_ref())).await
    }

    /// Who is calling: the certificate's identity, which must name a
    /// registered, enabled client, presenting a certificate issued to it.
    pub async fn authenticate<T>(self: &Arc<Self>, req: &Request<T>) -> Result<Caller, Status> {
        let info = req
            .extensions()
            .get::<PeerInfo>()
            .ok_or_else(|| Status::unauthenticated("no TLS client identity on this connection"))?;
        let peer = match info.identity.as_ref() {
            Ok(p) => p.clone(),
            Err(why) => return Err(Status::unauthenticated(why.clone())),
        };
        let key = CertKey {
            name: peer.name.clone(),
            serial: peer.serial.clone(),
            issuer: peer.issuer,
        };
        if let Some(client) = self.auth_cache.get(&key) {
            return Ok(Caller { client });
        }
        let generation = self.auth_cache.generation();
        let this = self.clone();
        let remote = info.remote.map(|r| r.to_string()).unwrap_or_default();
        let caller = blocking(move || {
            let deny = |detail: &str, err: Error| -> Result<Caller, Error> {
                this.store.append_audit(&[AuditEntry {
                    actor: peer.name.clone(),
                    action: "auth".into(),
                    client: Some(peer.name.clone()),
                    allowed: false,
                    detail: format!(
                        "{detail} (from {remote}, {} certificate {})",
                        match peer.issuer {
                            Issuer::BuiltIn => "built-in CA",
                            Issuer::External => "operator CA",
                        },
                        peer.serial
                    ),
                    ..Default::default()
                }])?;
                Err(err)
            };
            // A removed client's certificates stay refused forever, whatever
            // client of that name exists now.
            if peer.issuer == Issuer::BuiltIn && this.store.serial_revoked(&peer.serial)? {
                return deny(
                    "certificate of a removed client",
                    Error::Unauthenticated(format!(
                        "this certificate was issued to a client \"{}\" that was removed; it is refused for good. \
                         Use the certificate from the latest `secretfs client add {}`",
                        peer.name, peer.name
                    )),
                );
            }
            let client = match this.store.get_client(&peer.name) {
                Ok(c) => c,
                Err(Error::NotFound { .. }) => {
                    return deny(
                        "unknown client",
                        Error::Unauthenticated(format!(
                            "client \"{}\" is not registered (or was removed); an operator can add it with `secretfs client add {}`",
                            peer.name, peer.name
                        )),
                    )
                }
                Err(e) => return Err(e),
            };
            if !client.enabled {
                return deny(
                    "client disabled",
                    Error::PermissionDenied(format!("client \"{}\" is disabled", client.name)),
                );
            }
            // A serial identifies a certificate only together with its
            // issuer: a client made by the built-in CA is authenticated by
            // a built-in-CA certificate recorded for it, and nothing else; an
            // external client only by the operator's CAs.
            match (client.pinned, peer.issuer) {
                (true, Issuer::BuiltIn) => {
                    if !this.store.client_has_cert(client.id, &peer.serial)? {
                        return deny(
                            "certificate not issued to this client",
                            Error::Unauthenticated(format!(
                                "this certificate was not issued to the current client \"{}\" (it may belong to a removed client of the same name); \
                                 use the certificate from `secretfs client add`",
                                client.name
                            )),
                        );
                    }
                }
                (true, Issuer::External) => {
                    return deny(
                        "operator-CA certificate for a built-in-CA client",
                        Error::Unauthenticated(format!(
                            "this certificate was not issued to client \"{}\" by this server's CA: it comes from another trusted CA (--client-ca), \
                             and \"{}\" was made by the built-in CA; use the certificate from `secretfs client add`, \
                             or re-add the client with `--external` to identify it by your CA",
                            client.name, client.name
                        )),
                    );
                }
                (false, Issuer::BuiltIn) => {
                    return deny(
                        "built-in-CA certificate for an external client",
                        Error::Unauthenticated(format!(
                            "client \"{}\" is registered as external: only certificates from your own CA (--client-ca) identify it, \
                             and this one was not issued by your CA (it may belong to a removed client of the same name)",
                            client.name
                        )),
                    );
                }
                (false, Issuer::External) => {}
            }
            Ok(Caller { client })
        })
        .await?;
        self.auth_cache
            .insert(generation, key, caller.client.clone());
        Ok(caller)
    }

    /// Clients were added or removed: forget every cached authentication,
    /// so a removed client is refused on its very next call.
    pub fn clients_changed(&self) {
        self.auth_cache.invalidate();
    }

    /// As `authenticate`, and the caller must hold the admin role.
    pub async fn authenticate_admin<T>(
        self: &Arc<Self>,
        req: &Request<T>,
        action: &str,
    ) -> Result<Caller, Status> {
        let caller = self.authenticate(req).await?;
        if caller.client.admin {
            return Ok(caller);
        }
        let this = self.clone();
        let name = caller.client.name.clone();
        let entry = AuditEntry {
            actor: name.clone(),
            action: format!("admin.{action}"),
            allowed: false,
            detail: "not an admin".into(),
            ..Default::default()
        };
        blocking(move || this.store.append_audit(&[entry])).await?;
        Err(Error::PermissionDenied(format!(
            "client \"{name}\" is not an admin; operator commands need a client made with `secretfs client add NAME --admin`"
        ))
        .into())
    }
}

pub fn secret_meta(r: &SecretRecord) -> v1::SecretMeta {
    v1::SecretMeta {
        id: r.id,
        name: r.name.clone(),
        description: r.description.clone(),
        labels: r
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        mode: r.mode,
        owner: r.owner,
        group: r.group,
        expires_at: r.expires_at,
        current_version: r.current_version,
        version_count: r.version_count,
        created_at: r.created_at,
        updated_at: r.updated_at,
        size: r.size,
        version_created_at: r.version_created_at,
    }
}

pub fn client_info(c: &ClientRecord) -> v1::ClientInfo {
    v1::ClientInfo {
        name: c.name.clone(),
        admin: c.admin,
        enabled: c.enabled,
        created_at: c.created_at,
        cert_serial: c.cert_serial.clone().unwrap_or_default(),
        cert_not_after: c.cert_not_after.unwrap_or_default(),
        groups: c.groups.clone(),
    }
}

pub fn access_entries(a: Vec<AccessRecord>) -> Vec<v1::AccessEntry> {
    a.into_iter()
        .map(|a| v1::AccessEntry {
            secret: a.secret,
            groups: a.groups,
        })
        .collect()
}
