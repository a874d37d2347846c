//! Conversions between protobuf messages and domain types, in one place.

use secretfs_proto::v1;

use crate::domain::reads::Refusal;
use crate::domain::{Delta, Opened};
use crate::store::{
    AccessRecord, AuditEntry, ClientRecord, GroupRecord, SecretRecord, VersionRecord,
};

impl From<&SecretRecord> for v1::SecretMeta {
    fn from(r: &SecretRecord) -> Self {
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
            meta_digest: r.meta_digest(),
        }
    }
}

impl From<&ClientRecord> for v1::ClientInfo {
    fn from(c: &ClientRecord) -> Self {
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
}

impl From<GroupRecord> for v1::GroupInfo {
    fn from(g: GroupRecord) -> Self {
        v1::GroupInfo {
            name: g.name,
            description: g.description,
            created_at: g.created_at,
            clients: g.clients,
            secrets: g.secrets,
        }
    }
}

impl From<AccessRecord> for v1::AccessEntry {
    fn from(a: AccessRecord) -> Self {
        v1::AccessEntry {
            secret: a.secret,
            groups: a.groups,
        }
    }
}

impl From<VersionRecord> for v1::SecretVersion {
    fn from(v: VersionRecord) -> Self {
        v1::SecretVersion {
            version: v.version,
            created_at: v.created_at,
            created_by: v.created_by,
            size: v.size,
            current: v.current,
        }
    }
}

impl From<AuditEntry> for v1::AuditEvent {
    fn from(e: AuditEntry) -> Self {
        v1::AuditEvent {
            id: e.id,
            at_ms: e.at_ms,
            actor: e.actor,
            action: e.action,
            secret: e.secret.unwrap_or_default(),
            client: e.client.unwrap_or_default(),
            group: e.group.unwrap_or_default(),
            version: e.version.unwrap_or_default(),
            allowed: e.allowed,
            detail: e.detail,
        }
    }
}

impl From<Opened> for v1::SecretContent {
    fn from(o: Opened) -> Self {
        v1::SecretContent {
            meta: Some((&o.record).into()),
            content: o.content.into_vec(),
        }
    }
}

impl From<Delta> for v1::WatchEvent {
    fn from(d: Delta) -> Self {
        v1::WatchEvent {
            revision: d.revision,
            initial: d.initial,
            upserts: d.upserts.into_iter().map(Into::into).collect(),
            removals: d.removals,
            continued: false,
            meta_updates: d.meta_updates.iter().map(Into::into).collect(),
        }
    }
}

impl From<v1::Refusal> for Refusal {
    fn from(r: v1::Refusal) -> Self {
        Refusal {
            path: r.path,
            pid: r.pid,
            uid: r.uid,
            cgroup: r.cgroup,
            reason: r.reason,
        }
    }
}

/// Converts each item of a list.
pub fn all<'a, T: 'a, U: From<&'a T>>(items: &'a [T]) -> Vec<U> {
    items.iter().map(U::from).collect()
}
