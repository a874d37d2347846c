//! What workloads read, as their own identity: their view, secret content,
//! and the refusals their mounts report. Every content that leaves the
//! server is decrypted and audited by [`Domain::open`], and its audit entry
//! is durable before the content is handed back.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use super::{Action, Caller, Domain};
use crate::envelope::{Binding, Plaintext};
use crate::error::Error;
use crate::names::{check_secret_name, printable};
use crate::report_budget::{PER_HOUR, PER_MINUTE};
use crate::store::{AccessRecord, AuditEntry, SealedSecret, SecretRecord};

/// The most content one reply (ReadSecrets page, Watch message) carries:
/// under gRPC's default 4 MiB receive limit, with room for metadata, so a
/// client with default settings can read whatever it may read.
pub const MAX_REPLY_CONTENT: usize = 3 << 20;

/// The most names one read may list.
pub const MAX_NAMES: usize = 1_000;

/// The most refusals one report may carry.
pub const MAX_REFUSALS: usize = 1000;

/// Decrypted content on its way out: owned by this reply, or shared with
/// other watchers of the same version.
pub enum Content {
    Owned(Plaintext),
    Shared(Arc<Plaintext>),
}

impl Content {
    pub fn len(&self) -> usize {
        match self {
            Content::Owned(p) => p.len(),
            Content::Shared(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes for the reply (moved when owned, copied when shared).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Content::Owned(p) => p.into_vec(),
            Content::Shared(p) => p.as_bytes().to_vec(),
        }
    }
}

/// A secret's metadata and its decrypted current version.
pub struct Opened {
    pub record: SecretRecord,
    pub content: Content,
}

/// One page of a read and where the next one starts.
pub struct ReadPage {
    pub secrets: Vec<Opened>,
    /// The last name of this page when more follow.
    pub next_after: Option<String>,
}

/// One refusal a mount reports.
pub struct Refusal {
    pub path: String,
    pub pid: u32,
    pub uid: u32,
    pub cgroup: String,
    pub reason: String,
}

/// How many decrypted versions the shared cache keeps.
const PLAIN_MAX: usize = 64;

/// Recently decrypted versions by (secret id, version).
#[derive(Default)]
pub(super) struct PlainCache(Mutex<HashMap<(u64, u64), Arc<Plaintext>>>);

impl PlainCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u64), Arc<Plaintext>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops every copy (dropping wipes them: Plaintext zeroizes).
    pub(super) fn clear(&self) {
        self.lock().clear();
    }
}

impl Domain {
    /// Decrypts a secret's current version for `actor`: the one place
    /// content is opened. Returns the content and the read's audit entry,
    /// which the caller makes durable before the content leaves. A failed
    /// integrity check is logged and audited here, and never yields bytes.
    /// `shared` keeps the version for other watchers of it.
    pub(super) fn open(
        &self,
        actor: &str,
        s: &SealedSecret,
        shared: bool,
        detail: &str,
    ) -> Result<(Content, AuditEntry), Error> {
        let version = s.record.current_version;
        let key = (s.record.id, version);
        let entry = AuditEntry {
            secret: Some(s.record.name.clone()),
            version: Some(version),
            detail: detail.to_owned(),
            ..Action::SecretRead.by(actor)
        };
        if shared {
            if let Some(p) = self.plain.lock().get(&key) {
                return Ok((Content::Shared(p.clone()), entry));
            }
        }
        let binding = Binding {
            secret_id: s.record.id,
            name: &s.record.name,
            version,
        };
        let plain = match self.keys.get().open(binding, &s.sealed) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(secret = %s.record.name, version, "integrity check failed");
                self.store.append_audit(&[AuditEntry {
                    allowed: false,
                    detail: "integrity check failed".into(),
                    ..entry
                }])?;
                return Err(e);
            }
        };
        if !shared {
            return Ok((Content::Owned(plain), entry));
        }
        let plain = Arc::new(plain);
        let mut cache = self.plain.lock();
        if cache.len() >= PLAIN_MAX {
            cache.clear();
        }
        cache.insert(key, plain.clone());
        Ok((Content::Shared(plain), entry))
    }

    /// Refuses a read of `denied` (audited): the error does not say which
    /// of "missing" or "not granted", which would let a client probe for
    /// names it has no business knowing.
    fn refuse_read(&self, actor: &str, denied: &[String]) -> Error {
        let entries: Vec<AuditEntry> = denied
            .iter()
            .map(|n| AuditEntry {
                secret: Some(n.clone()),
                ..Action::SecretRead.refused(actor, "no grant")
            })
            .collect();
        if let Err(e) = self.store.append_audit(&entries) {
            return e.into();
        }
        Error::PermissionDenied(format!(
            "client \"{actor}\" may not read {}: no such secret, or no group grants it; \
             `secretfs whoami` lists what this identity can read",
            denied
                .iter()
                .map(|d| format!("\"{d}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    /// Reads secrets: the named ones (all the caller may read when none
    /// are named), in name order after `after`, one page of at most
    /// [`MAX_REPLY_CONTENT`] at a time. Names the caller may not read refuse
    /// the whole call, whatever page it asks for. Each name is read, and
    /// audited, once however often it is listed.
    pub async fn read_secrets(
        self: &Arc<Self>,
        caller: &Caller,
        names: Vec<String>,
        after: Option<String>,
    ) -> Result<ReadPage, Error> {
        if names.len() > MAX_NAMES {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_NAMES} names per read"
            )));
        }
        for n in &names {
            check_secret_name(n)?;
        }
        let names: BTreeSet<String> = names.into_iter().collect();
        let caller = caller.clone();
        let (page, audit) = self
            .run(move |d| d.read_page(&caller, &names, after.as_deref()))
            .await?;
        // Audited (group commit) before the content leaves the server.
        self.audit.append(audit).await?;
        Ok(page)
    }

    fn read_page(
        &self,
        caller: &Caller,
        names: &BTreeSet<String>,
        after: Option<&str>,
    ) -> Result<(ReadPage, Vec<AuditEntry>), Error> {
        let actor = caller.name();
        // The page is chosen from metadata before anything is decrypted,
        // so the work per call is bounded.
        let view = self.store.client_view(caller.client.id)?.secrets;
        if !names.is_empty() {
            let readable: BTreeSet<&str> = view.iter().map(|s| s.name.as_str()).collect();
            let denied: Vec<String> = names
                .iter()
                .filter(|n| !readable.contains(n.as_str()))
                .cloned()
                .collect();
            if !denied.is_empty() {
                return Err(self.refuse_read(actor, &denied));
            }
        }
        let rest: Vec<_> = view
            .iter()
            .filter(|s| names.is_empty() || names.contains(&s.name))
            .filter(|s| after.is_none_or(|a| s.name.as_str() > a))
            .collect();
        let mut page = Vec::new();
        let mut planned = 0u64;
        for s in &rest {
            if !page.is_empty() && planned + s.size > MAX_REPLY_CONTENT as u64 {
                break;
            }
            planned += s.size;
            page.push(s.name.clone());
        }
        if page.is_empty() {
            // Past the last name, or the rest deleted between pages.
            let empty = ReadPage {
                secrets: Vec::new(),
                next_after: None,
            };
            return Ok((empty, Vec::new()));
        }
        let mut more = page.len() < rest.len();
        let (mut found, gone) = self.store.read_sealed(caller.client.id, &page)?;
        if !gone.is_empty() {
            // Deleted or revoked since the view was read.
            return Err(self.refuse_read(actor, &gone));
        }
        found.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        let mut out: Vec<Opened> = Vec::with_capacity(found.len());
        let mut audit = Vec::with_capacity(found.len());
        let mut sent = 0usize;
        for s in found {
            // A rotation since the view was read may have grown a secret:
            // the page still stays within the limit, the rest comes next.
            if !out.is_empty() && sent + s.record.size as usize > MAX_REPLY_CONTENT {
                more = true;
                break;
            }
            let (content, entry) = self.open(actor, &s, false, "")?;
            sent += content.len();
            audit.push(entry);
            out.push(Opened {
                record: s.record,
                content,
            });
        }
        let next_after = if more {
            out.last().map(|o| o.record.name.clone())
        } else {
            None
        };
        Ok((
            ReadPage {
                secrets: out,
                next_after,
            },
            audit,
        ))
    }

    /// What the caller can read and through which groups.
    pub async fn my_access(self: &Arc<Self>, caller: &Caller) -> Result<Vec<AccessRecord>, Error> {
        let name = caller.name().to_owned();
        self.run(move |d| Ok(d.store.client_access(&name)?)).await
    }

    /// Metadata of every secret the caller can read.
    pub async fn my_secrets(self: &Arc<Self>, caller: &Caller) -> Result<Vec<SecretRecord>, Error> {
        let id = caller.client.id;
        self.run(move |d| Ok(d.store.client_view(id)?.secrets))
            .await
    }

    /// Records the refusals a caller's mount reports, within its budget.
    /// The entries are the caller's own: actor and client are its identity,
    /// and the time is ours (a client-chosen time could bury entries in
    /// 1970 or hold the log's tail in the year 3000).
    pub async fn report_refusals(
        self: &Arc<Self>,
        caller: &Caller,
        refusals: Vec<Refusal>,
    ) -> Result<(), Error> {
        if refusals.len() > MAX_REFUSALS {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_REFUSALS} refusals per report"
            )));
        }
        let name = caller.name();
        let grant = self.report_budget.take(name, refusals.len());
        let entry = |secret: Option<String>, detail: String| AuditEntry {
            client: Some(name.to_owned()),
            secret,
            ..Action::MountRefused.refused(name, detail)
        };
        let mut entries: Vec<AuditEntry> = Vec::with_capacity(grant.accept + 1);
        if grant.dropped_before > 0 {
            entries.push(entry(
                None,
                format!(
                    "{} earlier refusal reports of this mount were over its audit budget and not recorded",
                    grant.dropped_before
                ),
            ));
        }
        entries.extend(refusals.iter().take(grant.accept).map(|r| {
            // Only a valid secret name goes in the secret column, so
            // `audit --secret` stays meaningful.
            let named = check_secret_name(&r.path).is_ok();
            let mut detail = format!(
                "pid {} uid {} cgroup {}",
                r.pid,
                r.uid,
                printable(&r.cgroup, 384)
            );
            if !named {
                detail.push_str(" path ");
                detail.push_str(&printable(&r.path, 256));
            }
            detail.push_str(": ");
            detail.push_str(&printable(&r.reason, 256));
            entry(named.then(|| r.path.clone()), detail)
        }));
        self.audit.append(entries).await?;
        if grant.accept < refusals.len() {
            return Err(Error::OverBudget(format!(
                "{} of {} refusals recorded: client \"{name}\" is over its audit budget for refusal reports \
                 ({PER_MINUTE} a minute, {PER_HOUR} an hour); the rest are counted and the count is recorded later",
                grant.accept,
                refusals.len(),
            )));
        }
        Ok(())
    }
}
