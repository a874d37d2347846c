//! What the audit log records: one [`Action`] per kind of event, so the
//! names are written once; and `audit verify`: the chain walked and the
//! external sink compared with it.

use std::sync::Arc;

use super::Domain;
use crate::audit_sink::{compare_with_store, SinkAgreement, SinkStatus};
use crate::error::Error;
use crate::store::audit_chain::{AuditVerdict, BreakKind, ChainBreak};
use crate::store::AuditEntry;

/// What `audit verify` found: the database's chain and, with a sink
/// configured, the sink's last entry compared with it.
#[derive(Clone, Debug)]
pub struct AuditReport {
    pub verdict: AuditVerdict,
    /// The sink's name and the last id it holds.
    pub sink: Option<(String, u64)>,
}

/// At start: a cheap look at the head row (its MAC, nothing after it).
/// A broken head stops every audited write, so say why at once; the whole
/// walk is `audit verify`'s.
pub fn check_audit_head(store: &dyn crate::store::Store, keys: &crate::keys::Keys) {
    let fix = "run `secretfs audit verify` to see what was edited, and restore the database from a backup";
    match store.audit_head() {
        Ok(None) => tracing::error!("the audit head row is missing: the database was edited; {fix}"),
        Ok(Some(h)) if !h.is_authentic(keys) => {
            tracing::error!("the audit head row's MAC does not match: the database was edited; {fix}")
        }
        Ok(Some(h)) => match store.audit_after(h.last_id, 1) {
            Ok(after) if !after.is_empty() => tracing::error!(
                "the audit log holds entries after its head (entry {}): the database was edited; {fix}",
                h.last_id
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the audit log at start"),
        },
        Err(e) => tracing::warn!(error = %e, "cannot read the audit head at start"),
    }
}

impl Domain {
    /// Tells the domain about the external sink (once, at start).
    pub fn set_audit_sink(&self, sink: Arc<SinkStatus>) {
        let _ = self.audit_sink.set(sink);
    }

    /// Walks the whole chain (off the async threads) and compares the
    /// sink's last entry with the database's.
    pub async fn verify_audit(self: &Arc<Self>) -> Result<AuditReport, Error> {
        let sink = self.audit_sink.get().cloned();
        self.run(move |d| {
            // The sink's position first: everything it holds was committed
            // before the walk's snapshot.
            let exported = sink.as_ref().and_then(|s| s.exported());
            let mut verdict = d.store.verify_audit()?;
            let Some(sink) = sink else {
                return Ok(AuditReport {
                    verdict,
                    sink: None,
                });
            };
            let (id, chain) = exported.unwrap_or_default();
            if verdict.broken.is_none() && id > 0 {
                let name = sink.name();
                if id > verdict.last_id {
                    verdict.broken = Some(ChainBreak {
                        kind: BreakKind::TruncatedTail,
                        id: verdict.last_id + 1,
                        detail: format!(
                            "the tail was deleted: {name} holds entries up to {id}, the database ends at {} \
                             (and its head row was rolled back to match)",
                            verdict.last_id
                        ),
                    });
                } else {
                    let agreement = compare_with_store(d.store.as_ref(), id, &chain)?;
                    if agreement != SinkAgreement::Same {
                        verdict.broken = Some(ChainBreak {
                            kind: BreakKind::Edited,
                            id,
                            detail: format!(
                                "entry {id}'s chain value differs from the one {name} holds: the database's log was rewritten"
                            ),
                        });
                    }
                }
            }
            Ok(AuditReport {
                verdict,
                sink: Some((sink.name().to_owned(), id)),
            })
        })
        .await
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    SecretCreate,
    SecretRotate,
    SecretRollback,
    /// Metadata changed without a new version.
    SecretUpdate,
    SecretDelete,
    SecretList,
    SecretDescribe,
    SecretVersions,
    /// Content left the server (ReadSecrets, Watch), or a read was refused.
    SecretRead,
    ClientCreate,
    ClientRemove,
    /// A new certificate for an existing client (its own renewal, an
    /// admin's, or `server admin-cert`).
    ClientRenew,
    ClientList,
    ClientDescribe,
    ClientAccess,
    GroupCreate,
    GroupRemove,
    GroupList,
    GroupAddClient,
    GroupRemoveClient,
    GroupAddSecret,
    GroupRemoveSecret,
    AuditQuery,
    /// `audit verify`: the chain walked.
    AuditVerify,
    /// A certificate was refused.
    Auth,
    /// A mount refused a local process (reported by the mount).
    MountRefused,
    /// A TLS handshake was refused (unknown CA, expired, wrong usage, no
    /// certificate), with the peer's address.
    TlsRefused,
    /// A master key rekey started or completed (stream "keys").
    ServerRekey,
    /// A database row failed its MAC check (edited or added without the
    /// master key) and was treated as absent; actor "store".
    IntegrityBadRow,
    /// The row set did not agree with the rows (put back, deleted or added
    /// without the master key) while the server ran; actor "store".
    IntegritySetMismatch,
    /// An operator took the rows as they are as the row set
    /// (`server verify --accept`); actor "local:verify".
    IntegrityAccept,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::SecretCreate => "secret.create",
            Action::SecretRotate => "secret.rotate",
            Action::SecretRollback => "secret.rollback",
            Action::SecretUpdate => "secret.update",
            Action::SecretDelete => "secret.delete",
            Action::SecretList => "secret.list",
            Action::SecretDescribe => "secret.describe",
            Action::SecretVersions => "secret.versions",
            Action::SecretRead => "secret.read",
            Action::ClientCreate => "client.create",
            Action::ClientRemove => "client.remove",
            Action::ClientRenew => "client.renew",
            Action::ClientList => "client.list",
            Action::ClientDescribe => "client.describe",
            Action::ClientAccess => "client.access",
            Action::GroupCreate => "group.create",
            Action::GroupRemove => "group.remove",
            Action::GroupList => "group.list",
            Action::GroupAddClient => "group.add-client",
            Action::GroupRemoveClient => "group.remove-client",
            Action::GroupAddSecret => "group.add-secret",
            Action::GroupRemoveSecret => "group.remove-secret",
            Action::AuditQuery => "audit.query",
            Action::AuditVerify => "audit.verify",
            Action::Auth => "auth",
            Action::MountRefused => "mount.refused",
            Action::TlsRefused => "tls.refused",
            Action::ServerRekey => "server.rekey",
            Action::IntegrityBadRow => "integrity.bad_row",
            Action::IntegritySetMismatch => "integrity.set_mismatch",
            Action::IntegrityAccept => "integrity.accept",
        }
    }

    /// An allowed event by `actor`.
    pub fn by(self, actor: &str) -> AuditEntry {
        AuditEntry {
            actor: actor.to_owned(),
            action: self.as_str().to_owned(),
            allowed: true,
            ..AuditEntry::default()
        }
    }

    /// A refused event by `actor`, and why.
    pub fn refused(self, actor: &str, detail: impl Into<String>) -> AuditEntry {
        AuditEntry {
            allowed: false,
            detail: detail.into(),
            ..self.by(actor)
        }
    }

    /// An operator call refused for want of the admin role.
    pub fn refused_admin(self, actor: &str) -> AuditEntry {
        AuditEntry {
            action: format!("admin.{}", self.as_str()),
            ..self.refused(actor, "not an admin")
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
