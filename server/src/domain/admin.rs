//! What operators do: secrets, clients, groups, the audit log. Every
//! change is validated here, audited by the store in its transaction, and
//! announced through `Domain::committed`.

use std::sync::Arc;

use super::{Action, Caller, Domain};
use crate::envelope::{Binding, Plaintext};
use crate::error::Error;
use crate::identity::PeerIdentity;
use crate::names::{
    check_description, check_entity_name, check_labels, check_mode, check_secret_name, check_time,
};
use crate::pki::Issued;
use crate::report_budget::Take;
use crate::store::{
    now_s, AccessRecord, AuditEntry, AuditFilter, Change, ClientRecord, GroupRecord, NewClient,
    NewSecret, SecretRecord, SecretUpdate, StoreError, VersionRecord,
};

/// A secret to create: its metadata (`size` is taken from the content)
/// and first version.
pub struct CreateSecret {
    pub meta: NewSecret,
    pub content: Plaintext,
    /// Accept an expiry already past (see [`check_expiry`]).
    pub allow_past_expiry: bool,
}

/// An audit query: which events, and how many.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    pub client: Option<String>,
    pub secret: Option<String>,
    /// Unix seconds; 0 = from the beginning.
    pub since: i64,
    /// An exact action, or `PREFIX.*`.
    pub action: Option<String>,
    pub allowed: Option<bool>,
    /// Events after this id, oldest first.
    pub after_id: Option<u64>,
    pub limit: u32,
}

/// A refused renewal of client `name` by `actor`, and why.
fn renew_refused(actor: &str, name: &str, why: &str) -> AuditEntry {
    AuditEntry {
        client: Some(name.to_owned()),
        ..Action::ClientRenew.refused(actor, why)
    }
}

/// How long a renewed certificate may be asked to last.
#[derive(Clone, Copy, Debug)]
enum Lifetime {
    /// By an admin: what was asked (0 = the default; pki caps it).
    Asked(u32),
    /// By the client itself: at most `most` days, 0 = `most`.
    AtMost { asked: u32, most: u32 },
}

/// The lifetime of a certificate of ours, valid from `not_before` to
/// `not_after` (unix seconds), in whole days rounded up, at least 1: the
/// issue-time slack before `now` is not part of it, so renewing for the
/// same lifetime over and over does not grow it.
pub fn presented_days(not_before: i64, not_after: i64) -> u32 {
    let secs = not_after
        .saturating_sub(not_before)
        .saturating_sub(crate::pki::NOT_BEFORE_SLACK_S)
        .max(1);
    let days = secs.saturating_add(86_399) / 86_400;
    u32::try_from(days).unwrap_or(u32::MAX).max(1)
}

/// Checks an expiry an operator gives. One already past is refused unless
/// `allow_past` (the CLI's `--force`): a wrong year would otherwise mark
/// the secret expired from its first day, silently.
pub fn check_expiry(t: i64, allow_past: bool) -> Result<(), Error> {
    check_time("expiry", t)?;
    if t <= now_s() && !allow_past {
        return Err(Error::InvalidArgument(format!(
            "the expiry {} is in the past; give a future time, or --force (allow_past_expiry) to record a past one",
            crate::pki::rfc3339(t)
        )));
    }
    Ok(())
}

/// Checks an audit query's action filter: an action name, or `PREFIX.*`.
fn check_action(action: &str) -> Result<(), Error> {
    let body = action.strip_suffix(".*").unwrap_or(action);
    let ok = !body.is_empty()
        && action.len() <= 64
        && body
            .bytes()
            .all(|b| b.is_ascii_lowercase() || matches!(b, b'.' | b'-' | b'_'));
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "{:?} is not an audit action; give one like secret.read, or secret.* for every secret action",
            crate::names::printable(action, 80)
        )));
    }
    Ok(())
}

/// A client to register, with the CSR to sign for it (none for a client
/// whose certificates come from the operator's own CA).
pub struct CreateClient {
    pub name: String,
    pub admin: bool,
    pub csr_pem: Option<String>,
    pub days: u32,
}

/// A group membership change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    Add,
    Remove,
}

pub use crate::store::Member;

impl Member {
    /// The audited action of adding or removing this member.
    pub fn action(&self, change: Membership) -> Action {
        match (self, change) {
            (Member::Client(_), Membership::Add) => Action::GroupAddClient,
            (Member::Client(_), Membership::Remove) => Action::GroupRemoveClient,
            (Member::Secret(_), Membership::Add) => Action::GroupAddSecret,
            (Member::Secret(_), Membership::Remove) => Action::GroupRemoveSecret,
        }
    }
}

impl Domain {
    fn check_size(&self, len: usize) -> Result<(), Error> {
        if len > self.max_secret_size {
            return Err(Error::TooLarge {
                size: len,
                max: self.max_secret_size,
            });
        }
        Ok(())
    }

    /// Seals `content` as version `version` of secret `id` named `name`.
    fn seal(
        &self,
        id: u64,
        name: &str,
        version: u64,
        content: &Plaintext,
    ) -> Result<crate::envelope::Sealed, StoreError> {
        let binding = Binding {
            secret_id: id,
            name,
            version,
        };
        self.keys
            .get()
            .current
            .master()
            .seal(binding, content.as_bytes())
            .map_err(|e| StoreError::Seal(Box::new(e)))
    }

    pub async fn create_secret(
        self: &Arc<Self>,
        caller: &Caller,
        req: CreateSecret,
    ) -> Result<SecretRecord, Error> {
        let CreateSecret {
            meta: mut new,
            content,
            allow_past_expiry,
        } = req;
        check_secret_name(&new.name)?;
        self.check_size(content.len())?;
        check_labels(&new.labels)?;
        check_mode(new.mode)?;
        check_description(&new.description)?;
        if let Some(t) = new.expires_at {
            check_expiry(t, allow_past_expiry)?;
        }
        new.size = content.len() as u64;
        let audit = AuditEntry {
            secret: Some(new.name.clone()),
            ..Action::SecretCreate.by(caller.name())
        };
        let done = self
            .run(move |d| {
                Ok(d.store.create_secret(&new, &audit, &mut |id, version| {
                    d.seal(id, &new.name, version, &content)
                })?)
            })
            .await?;
        // No view holds it yet (no grant names it): watchers look and pass.
        self.committed(Change::Secret {
            id: done.value.id,
            revision: done.revision,
        });
        tracing::info!(secret = %done.value.name, "secret created");
        Ok(done.value)
    }

    /// A new version. `expires`: `Some` sets the new version's expiry
    /// (`Some(None)`: none); `None` keeps it unless it has passed, then it
    /// is cleared, so rotating an expired secret makes it current again.
    pub async fn rotate_secret(
        self: &Arc<Self>,
        caller: &Caller,
        name: String,
        content: Plaintext,
        expires: Option<Option<i64>>,
        allow_past_expiry: bool,
    ) -> Result<SecretRecord, Error> {
        check_secret_name(&name)?;
        self.check_size(content.len())?;
        if let Some(Some(t)) = expires {
            check_expiry(t, allow_past_expiry)?;
        }
        let audit = AuditEntry {
            secret: Some(name.clone()),
            ..Action::SecretRotate.by(caller.name())
        };
        let done = self
            .run(move |d| {
                Ok(d.store.rotate_secret(
                    &name,
                    content.len() as u64,
                    expires,
                    &audit,
                    &mut |id, version| d.seal(id, &name, version, &content),
                )?)
            })
            .await?;
        self.committed(Change::Secret {
            id: done.value.id,
            revision: done.revision,
        });
        tracing::info!(secret = %done.value.name, version = done.value.current_version, "secret rotated");
        Ok(done.value)
    }

    /// Changes a secret's metadata without a new version; watchers that
    /// hold it get the new metadata (no content).
    pub async fn update_secret(
        self: &Arc<Self>,
        caller: &Caller,
        name: String,
        update: SecretUpdate,
        allow_past_expiry: bool,
    ) -> Result<SecretRecord, Error> {
        check_secret_name(&name)?;
        if update.is_empty() {
            return Err(Error::InvalidArgument(
                "nothing to update: give at least one of --mode, --owner, --group, --description, --label, --remove-label, --clear-labels, --expires, --no-expires".into(),
            ));
        }
        if let Some(d) = &update.description {
            check_description(d)?;
        }
        check_labels(&update.set_labels)?;
        if let Some(m) = update.mode {
            check_mode(m)?;
        }
        if let Some(Some(t)) = update.expires_at {
            check_expiry(t, allow_past_expiry)?;
        }
        let audit = AuditEntry {
            secret: Some(name.clone()),
            ..Action::SecretUpdate.by(caller.name())
        };
        let done = self
            .run(move |d| {
                // The merged label set must keep the limits too.
                let check = |r: &SecretRecord| {
                    check_labels(&r.labels).map_err(|e| StoreError::Check(Box::new(e)))
                };
                Ok(d.store.update_secret(&name, &update, &check, &audit)?)
            })
            .await?;
        self.committed(Change::Secret {
            id: done.value.id,
            revision: done.revision,
        });
        tracing::info!(secret = %done.value.name, "secret metadata updated");
        Ok(done.value)
    }

    pub async fn rollback_secret(
        self: &Arc<Self>,
        caller: &Caller,
        name: String,
        version: u64,
    ) -> Result<SecretRecord, Error> {
        check_secret_name(&name)?;
        let audit = AuditEntry {
            secret: Some(name.clone()),
            ..Action::SecretRollback.by(caller.name())
        };
        let done = self
            .run(move |d| Ok(d.store.rollback_secret(&name, version, &audit)?))
            .await?;
        self.committed(Change::Secret {
            id: done.value.id,
            revision: done.revision,
        });
        tracing::info!(secret = %done.value.name, version = done.value.current_version, "secret rolled back");
        Ok(done.value)
    }

    pub async fn delete_secret(
        self: &Arc<Self>,
        caller: &Caller,
        name: String,
    ) -> Result<(), Error> {
        check_secret_name(&name)?;
        let audit = AuditEntry {
            secret: Some(name.clone()),
            ..Action::SecretDelete.by(caller.name())
        };
        let shown = name.clone();
        let done = self
            .run(move |d| Ok(d.store.delete_secret(&name, &audit)?))
            .await?;
        self.committed(Change::SecretDeleted {
            id: done.value,
            revision: done.revision,
        });
        tracing::info!(secret = %shown, "secret deleted");
        Ok(())
    }

    pub async fn list_secrets(self: &Arc<Self>) -> Result<Vec<SecretRecord>, Error> {
        self.run(|d| Ok(d.store.list_secrets()?)).await
    }

    pub async fn describe_secret(self: &Arc<Self>, name: String) -> Result<SecretRecord, Error> {
        check_secret_name(&name)?;
        self.run(move |d| Ok(d.store.get_secret(&name)?)).await
    }

    pub async fn list_versions(
        self: &Arc<Self>,
        name: String,
    ) -> Result<Vec<VersionRecord>, Error> {
        check_secret_name(&name)?;
        self.run(move |d| Ok(d.store.list_versions(&name)?)).await
    }

    /// Registers a client; returns it and the certificate signed for it (PEM,
    /// empty for an external client).
    pub async fn create_client(
        self: &Arc<Self>,
        caller: &Caller,
        req: CreateClient,
    ) -> Result<(ClientRecord, String), Error> {
        check_entity_name("client", &req.name)?;
        let actor = caller.name().to_owned();
        let done = self
            .run(move |d| {
                // Refuse a taken name before signing anything.
                match d.store.get_client(&req.name) {
                    Ok(_) => return Err(Error::exists("client", &req.name)),
                    Err(StoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                let issued = match &req.csr_pem {
                    Some(csr) => Some(d.ca.sign_csr(&d.trust_domain, &req.name, csr, req.days)?),
                    None => None,
                };
                let admin = if req.admin { ", admin" } else { "" };
                let audit = AuditEntry {
                    client: Some(req.name.clone()),
                    detail: match &issued {
                        Some(i) => format!("certificate {}{admin}", i.serial),
                        None => format!("external certificate{admin}"),
                    },
                    ..Action::ClientCreate.by(&actor)
                };
                let new = NewClient {
                    name: req.name.clone(),
                    admin: req.admin,
                    cert: issued.as_ref().map(|i| (i.serial.clone(), i.not_after)),
                };
                let done = d.store.create_client(&new, &audit)?;
                Ok((done, issued.map(|i| i.cert_pem).unwrap_or_default()))
            })
            .await?;
        let (client, cert_pem) = done;
        self.committed(Change::ClientAdded {
            revision: client.revision,
        });
        tracing::info!(client = %client.value.name, admin = client.value.admin, "client created");
        Ok((client.value, cert_pem))
    }

    /// Issues client `name` a new certificate for the key in `csr_pem`,
    /// pinned beside its others (same identity, same groups); the old ones
    /// stay valid until they expire or the client is removed. `actor` is an
    /// admin (`days`: 1..=3650, 0 = the default); a client renewing itself
    /// goes through [`Domain::renew_own`].
    pub async fn renew_client(
        self: &Arc<Self>,
        actor: &Caller,
        name: String,
        csr_pem: String,
        days: u32,
    ) -> Result<(ClientRecord, Issued), Error> {
        self.renew(actor, name, csr_pem, Lifetime::Asked(days))
            .await
    }

    /// The caller renews its own certificate, `presented` being the one it
    /// authenticated with. The new one lasts at most as long as that one
    /// (`days` = 0: as long), so a client cannot stretch its own lifetime.
    pub async fn renew_own(
        self: &Arc<Self>,
        caller: &Caller,
        presented: &PeerIdentity,
        csr_pem: String,
        days: u32,
    ) -> Result<(ClientRecord, Issued), Error> {
        let most = presented_days(presented.not_before, presented.not_after);
        let name = caller.name().to_owned();
        self.renew(
            caller,
            name,
            csr_pem,
            Lifetime::AtMost { asked: days, most },
        )
        .await
    }

    async fn renew(
        self: &Arc<Self>,
        actor: &Caller,
        name: String,
        csr_pem: String,
        lifetime: Lifetime,
    ) -> Result<(ClientRecord, Issued), Error> {
        check_entity_name("client", &name)?;
        // A client renewing itself may renew only the client it
        // authenticated as: that id, not merely that name.
        let own_id = (actor.name() == name).then_some(actor.client.id);
        let actor = actor.name().to_owned();
        // A refusal is audited once it has taken from the client's budget
        // (and the first over-budget refusal of a window once), so a
        // client cannot flood the log with them.
        if own_id.is_some() {
            match self.renew_budget.take(&name) {
                Take::Granted => {}
                over => {
                    if over == Take::RefusedFirst {
                        let entry = renew_refused(&actor, &name, "over the hourly renewal budget");
                        self.audit.append(vec![entry]).await?;
                    }
                    return Err(Error::OverBudget(format!(
                        "client \"{name}\" has renewed its certificate {} times in the last hour, the most allowed; \
                         its current certificate still works: try again later, or an admin can issue one with `secretfs client renew {name}`",
                        crate::report_budget::RENEW_PER_HOUR
                    )));
                }
            }
        }
        let days = match lifetime {
            Lifetime::Asked(days) => days,
            Lifetime::AtMost { asked: 0, most } => most,
            Lifetime::AtMost { asked, most } if asked <= most => asked,
            Lifetime::AtMost { asked, most } => {
                let entry = renew_refused(
                    &actor,
                    &name,
                    &format!("asked for {asked} days, at most {most} allowed"),
                );
                self.audit.append(vec![entry]).await?;
                return Err(Error::InvalidArgument(format!(
                    "a renewed certificate lasts at most as long as the one presented ({most} days); \
                     ask for {most} or fewer (0 = the same), or an admin can issue a longer one with \
                     `secretfs client renew {name} --days N`"
                )));
            }
        };
        let (client, issued) = self
            .run(move |d| {
                let audited = |e: Error, why: &str| -> Error {
                    match d.store.append_audit(&[renew_refused(&actor, &name, why)]) {
                        Ok(()) => e,
                        Err(store) => store.into(),
                    }
                };
                let client = d.store.get_client(&name)?;
                if own_id.is_some_and(|id| id != client.id) {
                    let e = Error::Unauthenticated(format!(
                        "client \"{name}\" was removed since this call was authenticated; \
                         the certificate presented belongs to a client that no longer exists"
                    ));
                    return Err(audited(e, "client removed since authenticated"));
                }
                if !client.pinned {
                    let e = Error::FailedPrecondition(format!(
                        "client \"{name}\" is registered as external: its certificates come from your own CA \
                         (`server run --client-ca`), which this server cannot sign for; renew it with that CA"
                    ));
                    return Err(audited(e, "external client"));
                }
                let issued = match d.ca.sign_csr(&d.trust_domain, &name, &csr_pem, days) {
                    Ok(i) => i,
                    Err(e) => {
                        // A refusal of the request is audited (the reason
                        // without the advice the message adds); a failure
                        // of ours is not.
                        let why = match &e {
                            Error::BadCsr { why } => format!("the CSR cannot be signed: {why}"),
                            Error::InvalidArgument(text) => text.clone(),
                            _ => return Err(e),
                        };
                        let why = crate::names::printable(&why, 200);
                        return Err(audited(e, &why));
                    }
                };
                let by = if own_id.is_some() { "renewed by itself" } else { "issued by an admin" };
                let audit = AuditEntry {
                    client: Some(name.clone()),
                    detail: format!("certificate {} ({by}), valid until {}", issued.serial, crate::pki::rfc3339(issued.not_after)),
                    ..Action::ClientRenew.by(&actor)
                };
                let done = d
                    .store
                    .add_client_cert(client.id, &name, &issued.serial, issued.not_after, &audit)?;
                Ok((done, issued))
            })
            .await?;
        // No view changes; cached authentications are dropped all the same
        // (cheap, and the revision is announced in order).
        self.committed(Change::ClientAdded {
            revision: client.revision,
        });
        tracing::info!(client = %client.value.name, serial = %issued.serial, "client certificate issued");
        Ok((client.value, issued))
    }

    pub async fn list_clients(self: &Arc<Self>) -> Result<Vec<ClientRecord>, Error> {
        self.run(|d| Ok(d.store.list_clients()?)).await
    }

    pub async fn describe_client(self: &Arc<Self>, name: String) -> Result<ClientRecord, Error> {
        check_entity_name("client", &name)?;
        self.run(move |d| Ok(d.store.get_client(&name)?)).await
    }

    pub async fn remove_client(
        self: &Arc<Self>,
        caller: &Caller,
        name: String,
    ) -> Result<(), Error> {
        check_entity_name("client", &name)?;
        if name == caller.name() {
            return Err(Error::InvalidArgument(format!(
                "client \"{name}\" is the identity making this call; remove it with another admin so you are not locked out"
            )));
        }
        let audit = AuditEntry {
            client: Some(name.clone()),
            ..Action::ClientRemove.by(caller.name())
        };
        let shown = name.clone();
        let done = self
            .run(move |d| Ok(d.store.remove_client(&name, &audit)?))
            .await?;
        self.committed(Change::ClientRemoved {
            revision: done.revision,
        });
        tracing::info!(client = %shown, "client removed");
        Ok(())
    }

    pub async fn client_access(self: &Arc<Self>, name: String) -> Result<Vec<AccessRecord>, Error> {
        check_entity_name("client", &name)?;
        self.run(move |d| Ok(d.store.client_access(&name)?)).await
    }

    pub async fn create_group(
        self: &Arc<Self>,
        caller: &Caller,
        name: String,
        description: String,
    ) -> Result<GroupRecord, Error> {
        check_entity_name("group", &name)?;
        check_description(&description)?;
        let audit = AuditEntry {
            group: Some(name.clone()),
            ..Action::GroupCreate.by(caller.name())
        };
        let done = self
            .run(move |d| Ok(d.store.create_group(&name, &description, &audit)?))
            .await?;
        // An empty group changes no view.
        Ok(done.value)
    }

    pub async fn list_groups(self: &Arc<Self>) -> Result<Vec<GroupRecord>, Error> {
        self.run(|d| Ok(d.store.list_groups()?)).await
    }

    pub async fn remove_group(
        self: &Arc<Self>,
        caller: &Caller,
        name: String,
    ) -> Result<(), Error> {
        check_entity_name("group", &name)?;
        let audit = AuditEntry {
            group: Some(name.clone()),
            ..Action::GroupRemove.by(caller.name())
        };
        let done = self
            .run(move |d| Ok(d.store.remove_group(&name, &audit)?))
            .await?;
        self.committed(Change::Access {
            revision: done.revision,
        });
        Ok(())
    }

    /// Adds a client or a secret to a group, or takes it out.
    pub async fn set_member(
        self: &Arc<Self>,
        caller: &Caller,
        group: String,
        member: Member,
        change: Membership,
    ) -> Result<GroupRecord, Error> {
        check_entity_name("group", &group)?;
        let mut audit = AuditEntry {
            group: Some(group.clone()),
            ..member.action(change).by(caller.name())
        };
        match &member {
            Member::Client(name) => {
                check_entity_name("client", name)?;
                audit.client = Some(name.clone());
            }
            Member::Secret(name) => {
                check_secret_name(name)?;
                audit.secret = Some(name.clone());
            }
        }
        let add = change == Membership::Add;
        let done = self
            .run(move |d| Ok(d.store.set_group_member(&group, &member, add, &audit)?))
            .await?;
        // Audited either way, but a change that changed nothing changes no
        // view: watchers are not made to recompute theirs.
        if done.value.changed {
            self.committed(Change::Access {
                revision: done.revision,
            });
        }
        Ok(done.value.group)
    }

    /// Audit events, newest `limit` (oldest first), or the first `limit`
    /// after a cursor; `since` in seconds.
    pub async fn query_audit(self: &Arc<Self>, q: AuditQuery) -> Result<Vec<AuditEntry>, Error> {
        check_time("--since", q.since)?;
        if let Some(a) = &q.action {
            check_action(a)?;
        }
        let filter = AuditFilter {
            client: q.client,
            secret: q.secret,
            since_ms: (q.since > 0).then(|| q.since.saturating_mul(1000)),
            action: q.action,
            allowed: q.allowed,
            after_id: q.after_id,
            limit: q.limit,
        };
        self.run(move |d| Ok(d.store.query_audit(&filter)?)).await
    }
}
