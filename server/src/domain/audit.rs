//! What the audit log records: one [`Action`] per kind of event, so the
//! names are written once.

use crate::store::AuditEntry;

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
    /// A certificate was refused.
    Auth,
    /// A mount refused a local process (reported by the mount).
    MountRefused,
    /// A TLS handshake was refused (unknown CA, expired, wrong usage, no
    /// certificate), with the peer's address.
    TlsRefused,
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
            Action::Auth => "auth",
            Action::MountRefused => "mount.refused",
            Action::TlsRefused => "tls.refused",
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
