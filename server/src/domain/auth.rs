//! Who is calling: a certificate's identity, which must name a registered,
//! enabled client, presented with a certificate issued to it.

use std::sync::Arc;

use super::{Action, Domain};
use crate::auth_cache::CertKey;
use crate::error::Error;
use crate::identity::{Issuer, PeerIdentity};
use crate::store::{ClientAuth, ClientRecord};

/// The TLS peer as the listener saw it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub identity: PeerIdentity,
    /// The remote address, for the audit log.
    pub remote: Option<std::net::SocketAddr>,
}

/// An authenticated caller. It may be cached and reused across calls, so
/// it holds only what a change to the client invalidates the cache for.
#[derive(Clone, Debug)]
pub struct Caller {
    pub client: ClientAuth,
}

impl Caller {
    pub fn name(&self) -> &str {
        &self.client.name
    }
}

impl Domain {
    pub async fn authenticate(self: &Arc<Self>, peer: Peer) -> Result<Caller, Error> {
        let key = CertKey {
            name: peer.identity.name.clone(),
            serial: peer.identity.serial.clone(),
            issuer: peer.identity.issuer,
        };
        if let Some(client) = self.auth_cache.get(&key) {
            return Ok(Caller { client });
        }
        let generation = self.auth_cache.generation();
        let caller = self.run(move |d| d.authenticate_now(&peer)).await?;
        self.auth_cache
            .insert(generation, key, caller.client.clone());
        Ok(caller)
    }

    /// As [`Domain::authenticate`], and the caller must hold the admin role
    /// to do `action`.
    pub async fn authenticate_admin(
        self: &Arc<Self>,
        peer: Peer,
        action: Action,
    ) -> Result<Caller, Error> {
        let caller = self.authenticate(peer).await?;
        if caller.client.admin {
            return Ok(caller);
        }
        let name = caller.client.name.clone();
        let entry = action.refused_admin(&name);
        self.audit.append(vec![entry]).await?;
        Err(Error::PermissionDenied(format!(
            "client \"{name}\" is not an admin; operator commands need a client made with `secretfs client add NAME --admin`"
        )))
    }

    fn authenticate_now(&self, peer: &Peer) -> Result<Caller, Error> {
        let id = &peer.identity;
        let deny = |detail: &str, err: Error| -> Result<Caller, Error> {
            let issuer = match id.issuer {
                Issuer::BuiltIn => "built-in CA",
                Issuer::External => "operator CA",
            };
            self.store.append_audit(&[crate::store::AuditEntry {
                client: Some(id.name.clone()),
                ..Action::Auth.refused(
                    &id.name,
                    format!(
                        "{detail} (from {}, {issuer} certificate {})",
                        peer.remote.map(|r| r.to_string()).unwrap_or_default(),
                        id.serial
                    ),
                )
            }])?;
            Err(err)
        };
        let facts = self.store.authenticate(&id.name, &id.serial)?;
        // A removed client's certificates stay refused forever, whatever
        // client of that name exists now.
        if id.issuer == Issuer::BuiltIn && facts.serial_revoked {
            return deny(
                "certificate of a removed client",
                Error::Unauthenticated(format!(
                    "this certificate was issued to a client \"{}\" that was removed; it is refused for good. \
                     Use the certificate from the latest `secretfs client add {}`",
                    id.name, id.name
                )),
            );
        }
        let Some(client) = facts.client else {
            return deny(
                "unknown client",
                Error::Unauthenticated(format!(
                    "client \"{}\" is not registered (or was removed); an operator can add it with `secretfs client add {}`",
                    id.name, id.name
                )),
            );
        };
        if !client.enabled {
            return deny(
                "client disabled",
                Error::PermissionDenied(format!("client \"{}\" is disabled", client.name)),
            );
        }
        // A serial identifies a certificate only together with its issuer:
        // a client made by the built-in CA is authenticated by a
        // built-in-CA certificate recorded for it, and nothing else; an
        // external client only by the operator's CAs.
        match (client.pinned, id.issuer) {
            (true, Issuer::BuiltIn) if !facts.serial_issued => deny(
                "certificate not issued to this client",
                Error::Unauthenticated(format!(
                    "this certificate was not issued to the current client \"{}\" (it may belong to a removed client of the same name); \
                     use the certificate from `secretfs client add`",
                    client.name
                )),
            ),
            (true, Issuer::External) => deny(
                "operator-CA certificate for a built-in-CA client",
                Error::Unauthenticated(format!(
                    "this certificate was not issued to client \"{}\" by this server's CA: it comes from another trusted CA (--client-ca), \
                     and \"{}\" was made by the built-in CA; use the certificate from `secretfs client add`, \
                     or re-add the client with `--external` to identify it by your CA",
                    client.name, client.name
                )),
            ),
            (false, Issuer::BuiltIn) => deny(
                "built-in-CA certificate for an external client",
                Error::Unauthenticated(format!(
                    "client \"{}\" is registered as external: only certificates from your own CA (--client-ca) identify it, \
                     and this one was not issued by your CA (it may belong to a removed client of the same name)",
                    client.name
                )),
            ),
            (true, Issuer::BuiltIn) | (false, Issuer::External) => Ok(Caller { client }),
        }
    }

    /// Whether a watcher's client is still there and enabled: a removed or
    /// disabled client's stream ends at once.
    pub(super) fn still_allowed(&self, caller: &Caller) -> Result<(), Error> {
        match self.store.get_client(&caller.client.name) {
            Ok(c) => still_is(caller, Some(&c)),
            Err(crate::store::StoreError::NotFound { .. }) => still_is(caller, None),
            Err(e) => Err(e.into()),
        }
    }
}

/// [`Domain::still_allowed`] on the client found under the caller's name
/// (`None`: no such client), for watchers that share the lookup.
pub(super) fn still_is(caller: &Caller, found: Option<&ClientRecord>) -> Result<(), Error> {
    let name = &caller.client.name;
    match found {
        Some(c) if c.id == caller.client.id && c.enabled => Ok(()),
        Some(c) if c.id == caller.client.id => Err(Error::PermissionDenied(format!(
            "client \"{name}\" was disabled"
        ))),
        _ => Err(Error::PermissionDenied(format!(
            "client \"{name}\" was removed; an operator can add it again with `secretfs client add {name}`"
        ))),
    }
}
