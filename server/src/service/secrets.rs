//! `secretfs.v1.Secrets`: what workloads call, as their own identity. A
//! caller sees only the secrets its groups hold; every read is audited.

use std::collections::BTreeSet;
use std::sync::Arc;

use secretfs_proto::v1::{self, secrets_server::Secrets};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{access_entries, blocking, secret_meta, Shared};
use crate::envelope::Binding;
use crate::error::Error;
use crate::names::{check_secret_name, printable};
use crate::store::AuditEntry;

pub struct SecretsService {
    shared: Arc<Shared>,
}

impl SecretsService {
    pub fn new(shared: Arc<Shared>) -> Self {
        SecretsService { shared }
    }
}

/// The most refusals one report may carry.
const MAX_REFUSALS: usize = 1000;

/// The most names one ReadSecrets call may list.
const MAX_NAMES: usize = 1_000;

/// The most content one reply (ReadSecrets page, Watch message) carries:
/// under gRPC's default 4 MiB receive limit, with room for metadata, so a
/// client with default settings can read whatever it may read.
pub const MAX_REPLY_CONTENT: usize = 3 << 20;

#[tonic::async_trait]
impl Secrets for SecretsService {
    type WatchStream = ReceiverStream<Result<v1::WatchEvent, Status>>;

    async fn watch(
        &self,
        req: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.shared.authenticate(&req).await?;
        let held = super::watch::parse_known(req.into_inner().known)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(super::watch::run(self.shared.clone(), caller, held, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report_refusals(
        &self,
        req: Request<v1::ReportRefusalsRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        let caller = self.shared.authenticate(&req).await?;
        let refusals = req.into_inner().refusals;
        if refusals.len() > MAX_REFUSALS {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_REFUSALS} refusals per report"
            ))
            .into());
        }
        let name = caller.client.name.clone();
        let grant = self.shared.report_budget.take(&name, refusals.len());
        // The entries are the caller's own: actor and client are its
        // identity, and the time is ours (a client-chosen time could bury
        // entries in 1970 or hold the log's tail in the year 3000).
        let entry = |secret: Option<String>, detail: String| AuditEntry {
            actor: name.clone(),
            action: "mount.refused".into(),
            client: Some(name.clone()),
            secret,
            allowed: false,
            detail,
            ..Default::default()
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
        self.shared.audit.append(entries).await?;
        if grant.accept < refusals.len() {
            return Err(Status::resource_exhausted(format!(
                "{} of {} refusals recorded: client \"{name}\" is over its audit budget for refusal reports \
                 ({} a minute, {} an hour); the rest are counted and the count is recorded later",
                grant.accept,
                refusals.len(),
                crate::report_budget::PER_MINUTE,
                crate::report_budget::PER_HOUR,
            )));
        }
        Ok(Response::new(v1::Empty {}))
    }

    async fn who_am_i(
        &self,
        req: Request<v1::Empty>,
    ) -> Result<Response<v1::WhoAmIResponse>, Status> {
        let caller = self.shared.authenticate(&req).await?;
        let name = caller.client.name.clone();
        let access = self
            .shared
            .on_store(move |store| store.client_access(&name))
            .await?;
        Ok(Response::new(v1::WhoAmIResponse {
            client: caller.client.name,
            admin: caller.client.admin,
            trust_domain: self.shared.trust_domain.clone(),
            access: access_entries(access),
        }))
    }

    async fn list_my_secrets(
        &self,
        req: Request<v1::Empty>,
    ) -> Result<Response<v1::MySecretsResponse>, Status> {
        let caller = self.shared.authenticate(&req).await?;
        let id = caller.client.id;
        let all = self
            .shared
            .on_store(move |store| store.readable_secrets(id))
            .await?;
        Ok(Response::new(v1::MySecretsResponse {
            secrets: all.iter().map(secret_meta).collect(),
        }))
    }

    async fn read_secrets(
        &self,
        req: Request<v1::ReadSecretsRequest>,
    ) -> Result<Response<v1::ReadSecretsResponse>, Status> {
        let caller = self.shared.authenticate(&req).await?;
        let r = req.into_inner();
        if r.names.len() > MAX_NAMES {
            return Err(
                Error::InvalidArgument(format!("at most {MAX_NAMES} names per read")).into(),
            );
        }
        for n in &r.names {
            check_secret_name(n)?;
        }
        let after = parse_page_token(&r.page_token)?;
        // Each name is read, and audited, once however often it is listed.
        let names: BTreeSet<String> = r.names.into_iter().collect();
        let shared = self.shared.clone();
        let (secrets, audit, next_page_token) =
            blocking(move || read_page(&shared, &caller, &names, after.as_deref())).await?;
        // Audited (group commit) before the content leaves the server.
        self.shared.audit.append(audit).await?;
        Ok(Response::new(v1::ReadSecretsResponse {
            secrets,
            next_page_token,
        }))
    }
}

const PAGE_TOKEN_PREFIX: &str = "after:";

/// The name a page token continues after; empty = the first page.
fn parse_page_token(token: &str) -> Result<Option<String>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    match token.strip_prefix(PAGE_TOKEN_PREFIX) {
        Some(name) if check_secret_name(name).is_ok() => Ok(Some(name.to_owned())),
        _ => Err(Error::InvalidArgument(
            "page_token is not one this server issued; pass the previous reply's next_page_token unchanged, or none for the first page".into(),
        )),
    }
}

type Page = (Vec<v1::SecretContent>, Vec<AuditEntry>, String);

/// One page of a read: whole secrets in name order after `after`, up to
/// [`MAX_REPLY_CONTENT`] of content (at least one secret), decrypted and
/// with their audit entries. Names the caller may not read refuse the whole
/// call (all or nothing), whatever page it asks for.
fn read_page(
    shared: &Shared,
    caller: &super::Caller,
    names: &BTreeSet<String>,
    after: Option<&str>,
) -> Result<Page, Error> {
    let actor = caller.client.name.clone();
    let view = shared.store.readable_secrets(caller.client.id)?;
    let refuse = |denied: Vec<String>| -> Result<Page, Error> {
        let entries: Vec<AuditEntry> = denied
            .iter()
            .map(|n| AuditEntry {
                actor: actor.clone(),
                action: "secret.read".into(),
                secret: Some(n.clone()),
                allowed: false,
                detail: "no grant".into(),
                ..Default::default()
            })
            .collect();
        shared.store.append_audit(&entries)?;
        // Do not say which of "missing" or "not granted": that would let a
        // client probe for names it has no business knowing.
        Err(Error::PermissionDenied(format!(
            "client \"{actor}\" may not read {}: no such secret, or no group grants it; \
             `secretfs whoami` lists what this identity can read",
            denied
                .iter()
                .map(|d| format!("\"{d}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    };
    if !names.is_empty() {
        let readable: BTreeSet<&str> = view.iter().map(|s| s.name.as_str()).collect();
        let denied: Vec<String> = names
            .iter()
            .filter(|n| !readable.contains(n.as_str()))
            .cloned()
            .collect();
        if !denied.is_empty() {
            return refuse(denied);
        }
    }
    let mut rest: Vec<_> = view
        .iter()
        .filter(|s| names.is_empty() || names.contains(&s.name))
        .filter(|s| after.is_none_or(|a| s.name.as_str() > a))
        .collect();
    rest.sort_by(|a, b| a.name.cmp(&b.name));
    let mut page = Vec::new();
    let mut planned = 0u64;
    for s in &rest {
        if !page.is_empty() && planned + s.size > MAX_REPLY_CONTENT as u64 {
            break;
        }
        planned += s.size;
        page.push(s.name.clone());
    }
    let mut more = page.len() < rest.len();
    let (mut found, gone) = shared.store.read_sealed(caller.client.id, &page)?;
    if !gone.is_empty() {
        // Deleted or revoked since the view was read.
        return refuse(gone);
    }
    found.sort_by(|a, b| a.record.name.cmp(&b.record.name));
    let mut out = Vec::with_capacity(found.len());
    let mut audit = Vec::with_capacity(found.len());
    let mut sent = 0usize;
    for s in found {
        // A rotation since the view was read may have grown a secret: the
        // page still stays within the limit, the rest comes next time.
        if !out.is_empty() && sent + s.record.size as usize > MAX_REPLY_CONTENT {
            more = true;
            break;
        }
        let version = s.record.current_version;
        let binding = Binding {
            secret_id: s.record.id,
            name: &s.record.name,
            version,
        };
        let plain = match shared.master.open(binding, &s.sealed) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(secret = %s.record.name, version, "integrity check failed");
                audit.push(AuditEntry {
                    actor: actor.clone(),
                    action: "secret.read".into(),
                    secret: Some(s.record.name.clone()),
                    version: Some(version),
                    allowed: false,
                    detail: "integrity check failed".into(),
                    ..Default::default()
                });
                shared.store.append_audit(&audit)?;
                return Err(e);
            }
        };
        sent += plain.len();
        audit.push(AuditEntry {
            actor: actor.clone(),
            action: "secret.read".into(),
            secret: Some(s.record.name.clone()),
            version: Some(version),
            allowed: true,
            ..Default::default()
        });
        out.push(v1::SecretContent {
            meta: Some(secret_meta(&s.record)),
            content: plain.into_vec(),
        });
    }
    let next = match (more, out.last()) {
        (true, Some(last)) => format!(
            "{PAGE_TOKEN_PREFIX}{}",
            last.meta
                .as_ref()
                .map(|m| m.name.as_str())
                .unwrap_or_default()
        ),
        _ => String::new(),
    };
    Ok((out, audit, next))
}
