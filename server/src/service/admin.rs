//! `secretfs.v1.Admin`: what operators do. Every call needs the admin role
//! and every change is audited by the store in the same transaction.

use std::collections::BTreeMap;
use std::sync::Arc;

use secretfs_proto::v1::{self, admin_server::Admin};
use tonic::{Request, Response, Status};

use super::{access_entries, blocking, client_info, secret_meta, Shared};
use crate::envelope::{Binding, Plaintext};
use crate::error::Error;
use crate::hub::Change;
use crate::names::{check_description, check_entity_name, check_secret_name, check_time};
use crate::store::{AuditFilter, NewClient, NewSecret};

pub struct AdminService {
    shared: Arc<Shared>,
}

impl AdminService {
    /// Tells watchers a secret's version changed.
    async fn publish_secret(&self, id: u64) {
        match self.shared.on_store(move |store| store.revision()).await {
            Ok(revision) => self.shared.hub.publish(Change::Secret { id, revision }),
            // Without a revision, make every watcher recompute its view.
            Err(_) => self.shared.hub.publish(Change::Access),
        }
    }

    pub fn new(shared: Arc<Shared>) -> Self {
        AdminService { shared }
    }

    fn check_size(&self, len: usize) -> Result<(), Error> {
        if len > self.shared.max_secret_size {
            return Err(Error::TooLarge {
                size: len,
                max: self.shared.max_secret_size,
            });
        }
        Ok(())
    }
}

const MAX_LABELS: usize = 64;

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), Error> {
    if labels.len() > MAX_LABELS {
        return Err(Error::InvalidArgument(format!(
            "at most {MAX_LABELS} labels per secret"
        )));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
        if !key_ok {
            return Err(Error::InvalidArgument(format!(
                "label key {:?} is not valid; use 1-63 letters, digits, '.', '_', '-' or '/'",
                k.escape_debug().to_string()
            )));
        }
        if v.len() > 256 || v.chars().any(char::is_control) {
            return Err(Error::InvalidArgument(format!(
                "the value of label {k:?} is over 256 bytes or holds control characters"
            )));
        }
    }
    Ok(())
}

fn check_mode(mode: u32) -> Result<(), Error> {
    if mode > 0o777 {
        return Err(Error::InvalidArgument(format!(
            "file mode {mode:#o} is not allowed; give permission bits only, 0 to 0777 (e.g. 0400)"
        )));
    }
    Ok(())
}

/// Takes the content out of a request, leaving nothing behind in it.
fn take_content(content: &mut Vec<u8>) -> Plaintext {
    Plaintext::new(std::mem::take(content))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_secret(
        &self,
        req: Request<v1::CreateSecretRequest>,
    ) -> Result<Response<v1::SecretMeta>, Status> {
        let caller = self
            .shared
            .authenticate_admin(&req, "secret.create")
            .await?;
        let mut r = req.into_inner();
        let content = take_content(&mut r.content);
        check_secret_name(&r.name)?;
        self.check_size(content.len())?;
        let labels: BTreeMap<String, String> = r.labels.into_iter().collect();
        check_labels(&labels)?;
        check_mode(r.mode)?;
        check_description(&r.description)?;
        if let Some(t) = r.expires_at {
            check_time("expiry", t)?;
        }
        let new = NewSecret {
            name: r.name,
            description: r.description,
            labels,
            mode: r.mode,
            owner: r.owner,
            group: r.group,
            expires_at: r.expires_at,
            size: content.len() as u64,
        };
        let shared = self.shared.clone();
        let rec = blocking(move || {
            let name = new.name.clone();
            shared
                .store
                .create_secret(&new, caller.name(), &mut |id, version| {
                    shared.master.seal(
                        Binding {
                            secret_id: id,
                            name: &name,
                            version,
                        },
                        content.as_bytes(),
                    )
                })
        })
        .await?;
        tracing::info!(secret = %rec.name, "secret created");
        Ok(Response::new(secret_meta(&rec)))
    }

    async fn rotate_secret(
        &self,
        req: Request<v1::RotateSecretRequest>,
    ) -> Result<Response<v1::SecretMeta>, Status> {
        let caller = self
            .shared
            .authenticate_admin(&req, "secret.rotate")
            .await?;
        let mut r = req.into_inner();
        let content = take_content(&mut r.content);
        check_secret_name(&r.name)?;
        self.check_size(content.len())?;
        let shared = self.shared.clone();
        let name = r.name;
        let rec = blocking(move || {
            shared.store.rotate_secret(
                &name,
                content.len() as u64,
                caller.name(),
                &mut |id, version| {
                    shared.master.seal(
                        Binding {
                            secret_id: id,
                            name: &name,
                            version,
                        },
                        content.as_bytes(),
                    )
                },
            )
        })
        .await?;
        self.publish_secret(rec.id).await;
        tracing::info!(secret = %rec.name, version = rec.current_version, "secret rotated");
        Ok(Response::new(secret_meta(&rec)))
    }

    async fn list_secrets(
        &self,
        req: Request<v1::ListSecretsRequest>,
    ) -> Result<Response<v1::ListSecretsResponse>, Status> {
        self.shared.authenticate_admin(&req, "secret.list").await?;
        let all = self
            .shared
            .on_store(move |store| store.list_secrets())
            .await?;
        Ok(Response::new(v1::ListSecretsResponse {
            secrets: all.iter().map(secret_meta).collect(),
        }))
    }

    async fn describe_secret(
        &self,
        req: Request<v1::SecretRef>,
    ) -> Result<Response<v1::SecretMeta>, Status> {
        self.shared
            .authenticate_admin(&req, "secret.describe")
            .await?;
        let name = req.into_inner().name;
        check_secret_name(&name)?;
        let rec = self
            .shared
            .on_store(move |store| store.get_secret(&name))
            .await?;
        Ok(Response::new(secret_meta(&rec)))
    }

    async fn list_versions(
        &self,
        req: Request<v1::SecretRef>,
    ) -> Result<Response<v1::ListVersionsResponse>, Status> {
        self.shared
            .authenticate_admin(&req, "secret.versions")
            .await?;
        let name = req.into_inner().name;
        check_secret_name(&name)?;
        let versions = self
            .shared
            .on_store(move |store| store.list_versions(&name))
            .await?;
        Ok(Response::new(v1::ListVersionsResponse {
            versions: versions
                .into_iter()
                .map(|v| v1::SecretVersion {
                    version: v.version,
                    created_at: v.created_at,
                    created_by: v.created_by,
                    size: v.size,
                    current: v.current,
                })
                .collect(),
        }))
    }

    async fn rollback_secret(
        &self,
        req: Request<v1::RollbackSecretRequest>,
    ) -> Result<Response<v1::SecretMeta>, Status> {
        let caller = self
            .shared
            .authenticate_admin(&req, "secret.rollback")
            .await?;
        let r = req.into_inner();
        check_secret_name(&r.name)?;
        let rec = self
            .shared
            .on_store(move |store| store.rollback_secret(&r.name, r.version, caller.name()))
            .await?;
        self.publish_secret(rec.id).await;
        tracing::info!(secret = %rec.name, version = rec.current_version, "secret rolled back");
        Ok(Response::new(secret_meta(&rec)))
    }

    async fn delete_secret(
        &self,
        req: Request<v1::SecretRef>,
    ) -> Result<Response<v1::Empty>, Status> {
        let caller = self
            .shared
            .authenticate_admin(&req, "secret.delete")
            .await?;
        let name = req.into_inner().name;
        check_secret_name(&name)?;
        let shown = name.clone();
        self.shared
            .on_store(move |store| store.delete_secret(&name, caller.name()))
            .await?;
        // Decrypted versions of it must not outlive it.
        self.shared
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.shared.hub.publish(Change::Access);
        tracing::info!(secret = %shown, "secret deleted");
        Ok(Response::new(v1::Empty {}))
    }

    async fn create_client(
        &self,
        req: Request<v1::CreateClientRequest>,
    ) -> Result<Response<v1::CreateClientResponse>, Status> {
        let caller = self
            .shared
            .authenticate_admin(&req, "client.create")
            .await?;
        let r = req.into_inner();
        check_entity_name("client", &r.name)?;
        let shared = self.shared.clone();
        let (client, cert_pem) = blocking(move || {
            // Refuse a taken name before signing anything.
            match shared.store.get_client(&r.name) {
                Ok(_) => return Err(Error::exists("client", &r.name)),
                Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            let issued = if r.csr_pem.trim().is_empty() {
                None
            } else {
                Some(
                    shared
                        .ca
                        .sign_csr(&shared.trust_domain, &r.name, &r.csr_pem, r.days)?,
                )
            };
            let client = shared.store.create_client(
                &NewClient {
                    name: r.name.clone(),
                    admin: r.admin,
                    cert: issued.as_ref().map(|i| (i.serial.clone(), i.not_after)),
                },
                caller.name(),
            )?;
            Ok((client, issued.map(|i| i.cert_pem).unwrap_or_default()))
        })
        .await?;
        self.shared.clients_changed();
        tracing::info!(client = %client.name, admin = client.admin, "client created");
        Ok(Response::new(v1::CreateClientResponse {
            client: Some(client_info(&client)),
            cert_pem,
            ca_pem: self.shared.ca.cert_pem.clone(),
        }))
    }

    async fn list_clients(
        &self,
        req: Request<v1::Empty>,
    ) -> Result<Response<v1::ListClientsResponse>, Status> {
        self.shared.authenticate_admin(&req, "client.list").await?;
        let all = self
            .shared
            .on_store(move |store| store.list_clients())
            .await?;
        Ok(Response::new(v1::ListClientsResponse {
            clients: all.iter().map(client_info).collect(),
        }))
    }

    async fn describe_client(
        &self,
        req: Request<v1::ClientRef>,
    ) -> Result<Response<v1::ClientInfo>, Status> {
        self.shared
            .authenticate_admin(&req, "client.describe")
            .await?;
        let name = req.into_inner().name;
        check_entity_name("client", &name)?;
        let c = self
            .shared
            .on_store(move |store| store.get_client(&name))
            .await?;
        Ok(Response::new(client_info(&c)))
    }

    async fn remove_client(
        &self,
        req: Request<v1::ClientRef>,
    ) -> Result<Response<v1::Empty>, Status> {
        let caller = self
            .shared
            .authenticate_admin(&req, "client.remove")
            .await?;
        let name = req.into_inner().name;
        check_entity_name("client", &name)?;
        if name == caller.name() {
            return Err(Error::InvalidArgument(format!(
                "client \"{name}\" is the identity making this call; remove it with another admin so you are not locked out"
            ))
            .into());
        }
        let shown = name.clone();
        self.shared
            .on_store(move |store| store.remove_client(&name, caller.name()))
            .await?;
        self.shared.clients_changed();
        self.shared.hub.publish(Change::Access);
        tracing::info!(client = %shown, "client removed");
        Ok(Response::new(v1::Empty {}))
    }

    async fn create_group(
        &self,
        req: Request<v1::CreateGroupRequest>,
    ) -> Result<Response<v1::GroupInfo>, Status> {
        let caller = self.shared.authenticate_admin(&req, "group.create").await?;
        let r = req.into_inner();
        check_entity_name("group", &r.name)?;
        check_description(&r.description)?;
        let g = self
            .shared
            .on_store(move |store| store.create_group(&r.name, &r.description, caller.name()))
            .await?;
        Ok(Response::new(group_info(g)))
    }

    async fn list_groups(
        &self,
        req: Request<v1::Empty>,
    ) -> Result<Response<v1::ListGroupsResponse>, Status> {
        self.shared.authenticate_admin(&req, "group.list").await?;
        let all = self
            .shared
            .on_store(move |store| store.list_groups())
            .await?;
        Ok(Response::new(v1::ListGroupsResponse {
            groups: all.into_iter().map(group_info).collect(),
        }))
    }

    async fn remove_group(
        &self,
        req: Request<v1::GroupRef>,
    ) -> Result<Response<v1::Empty>, Status> {
        let caller = self.shared.authenticate_admin(&req, "group.remove").await?;
        let name = req.into_inner().name;
        check_entity_name("group", &name)?;
        self.shared
            .on_store(move |store| store.remove_group(&name, caller.name()))
            .await?;
        self.shared.hub.publish(Change::Access);
        Ok(Response::new(v1::Empty {}))
    }

    async fn add_client_to_group(
        &self,
        req: Request<v1::GroupClientRequest>,
    ) -> Result<Response<v1::GroupInfo>, Status> {
        self.group_client(req, true).await
    }

    async fn remove_client_from_group(
        &self,
        req: Request<v1::GroupClientRequest>,
    ) -> Result<Response<v1::GroupInfo>, Status> {
        self.group_client(req, false).await
    }

    async fn add_secret_to_group(
        &self,
        req: Request<v1::GroupSecretRequest>,
    ) -> Result<Response<v1::GroupInfo>, Status> {
        self.group_secret(req, true).await
    }

    async fn remove_secret_from_group(
        &self,
        req: Request<v1::GroupSecretRequest>,
    ) -> Result<Response<v1::GroupInfo>, Status> {
        self.group_secret(req, false).await
    }

    async fn client_access(
        &self,
        req: Request<v1::ClientRef>,
    ) -> Result<Response<v1::AccessResponse>, Status> {
        self.shared
            .authenticate_admin(&req, "client.access")
            .await?;
        let name = req.into_inner().name;
        check_entity_name("client", &name)?;
        let client = name.clone();
        let access = self
            .shared
            .on_store(move |store| store.client_access(&name))
            .await?;
        Ok(Response::new(v1::AccessResponse {
            client,
            entries: access_entries(access),
        }))
    }

    async fn query_audit(
        &self,
        req: Request<v1::AuditQuery>,
    ) -> Result<Response<v1::AuditResponse>, Status> {
        self.shared.authenticate_admin(&req, "audit.query").await?;
        let q = req.into_inner();
        check_time("--since", q.since)?;
        let filter = AuditFilter {
            client: (!q.client.is_empty()).then_some(q.client),
            secret: (!q.secret.is_empty()).then_some(q.secret),
            since_ms: (q.since > 0).then(|| q.since.saturating_mul(1000)),
            limit: q.limit,
        };
        let events = self
            .shared
            .on_store(move |store| store.query_audit(&filter))
            .await?;
        Ok(Response::new(v1::AuditResponse {
            events: events
                .into_iter()
                .map(|e| v1::AuditEvent {
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
                })
                .collect(),
        }))
    }
}

impl AdminService {
    async fn group_client(
        &self,
        req: Request<v1::GroupClientRequest>,
        member: bool,
    ) -> Result<Response<v1::GroupInfo>, Status> {
        let action = if member {
            "group.add-client"
        } else {
            "group.remove-client"
        };
        let caller = self.shared.authenticate_admin(&req, action).await?;
        let r = req.into_inner();
        check_entity_name("group", &r.group)?;
        check_entity_name("client", &r.client)?;
        let g = self
            .shared
            .on_store(move |store| {
                store.set_group_client(&r.group, &r.client, member, caller.name())
            })
            .await?;
        self.shared.hub.publish(Change::Access);
        Ok(Response::new(group_info(g)))
    }

    async fn group_secret(
        &self,
        req: Request<v1::GroupSecretRequest>,
        member: bool,
    ) -> Result<Response<v1::GroupInfo>, Status> {
        let action = if member {
            "group.add-secret"
        } else {
            "group.remove-secret"
        };
        let caller = self.shared.authenticate_admin(&req, action).await?;
        let r = req.into_inner();
        check_entity_name("group", &r.group)?;
        check_secret_name(&r.secret)?;
        let g = self
            .shared
            .on_store(move |store| {
                store.set_group_secret(&r.group, &r.secret, member, caller.name())
            })
            .await?;
        self.shared.hub.publish(Change::Access);
        Ok(Response::new(group_info(g)))
    }
}

fn group_info(g: crate::store::GroupRecord) -> v1::GroupInfo {
    v1::GroupInfo {
        name: g.name,
        description: g.description,
        created_at: g.created_at,
        clients: g.clients,
        secrets: g.secrets,
    }
}
