//! `secretfs.v1.Admin`: what operators do. Every call needs the admin role.

use std::sync::Arc;

use secretfs_proto::v1::{self, admin_server::Admin};
use tonic::{Request, Response, Status};

use super::convert::all;
use super::peer;
use crate::domain::admin::{AuditQuery, CreateClient, CreateSecret, Member, Membership};
use crate::domain::{Action, Caller, Domain};
use crate::envelope::Plaintext;
use crate::store::{NewSecret, SecretUpdate};

pub struct AdminService {
    domain: Arc<Domain>,
    /// Serves `Rekey` and `GetRekeyStatus`.
    rekey: Arc<crate::rekey::Rekeyer>,
}

impl AdminService {
    pub fn new(domain: Arc<Domain>, rekey: Arc<crate::rekey::Rekeyer>) -> Self {
        AdminService { domain, rekey }
    }

    async fn admin<T>(&self, req: &Request<T>, action: Action) -> Result<Caller, Status> {
        Ok(self.domain.authenticate_admin(peer(req)?, action).await?)
    }
}

/// Takes the content out of a request, leaving nothing behind in it.
fn take_content(content: &mut Vec<u8>) -> Plaintext {
    Plaintext::new(std::mem::take(content))
}

/// A request's value and clear flag for one field as a change: set,
/// clear, or keep (`None`). `what` names the field and its flags
/// (`expiry (--expires or --no-expires)`).
fn change<T>(value: Option<T>, clear: bool, what: &str) -> Result<Option<Option<T>>, Status> {
    match (value, clear) {
        (Some(_), true) => Err(Status::invalid_argument(format!(
            "give either a new {what} or clear it, not both"
        ))),
        (Some(v), false) => Ok(Some(Some(v))),
        (None, true) => Ok(Some(None)),
        (None, false) => Ok(None),
    }
}

const EXPIRY: &str = "expiry (--expires or --no-expires)";

fn membership(add: bool) -> Membership {
    if add {
        Membership::Add
    } else {
        Membership::Remove
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_secret(
        &self,
        req: Request<v1::CreateSecretRequest>,
    ) -> Result<Response<v1::SecretMeta>, Status> {
        // The content is taken (wiped on drop) before anything can refuse.
        let peer = peer(&req);
        let mut r = req.into_inner();
        let content = take_content(&mut r.content);
        let caller = self
            .domain
            .authenticate_admin(peer?, Action::SecretCreate)
            .await?;
        let new = CreateSecret {
            meta: NewSecret {
                name: r.name,
                description: r.description,
                labels: r.labels.into_iter().collect(),
                mode: r.mode,
                owner: r.owner,
                group: r.group,
                expires_at: r.expires_at,
                size: 0,
            },
            content,
            allow_past_expiry: r.allow_past_expiry,
        };
        let rec = self.domain.create_secret(&caller, new).await?;
        Ok(Response::new((&rec).into()))
    }

    async fn rotate_secret(
        &self,
        req: Request<v1::RotateSecretRequest>,
    ) -> Result<Response<v1::SecretMeta>, Status> {
        // The content is taken (wiped on drop) before anything can refuse.
        let peer = peer(&req);
        let mut r = req.into_inner();
        let content = take_content(&mut r.content);
        let caller = self
            .domain
            .authenticate_admin(peer?, Action::SecretRotate)
            .await?;
        let expires = change(r.expires_at, r.clear_expiry, EXPIRY)?;
        let rec = self
            .domain
            .rotate_secret(&caller, r.name, content, expires, r.allow_past_expiry)
            .await?;
        Ok(Response::new((&rec).into()))
    }

    async fn update_secret(
        &self,
        req: Request<v1::UpdateSecretRequest>,
    ) -> Result<Response<v1::SecretMeta>, Status> {
        let caller = self.admin(&req, Action::SecretUpdate).await?;
        let r = req.into_inner();
        let update = SecretUpdate {
            description: r.description,
            clear_labels: r.clear_labels,
            remove_labels: r.remove_labels,
            set_labels: r.labels.into_iter().collect(),
            mode: r.mode,
            owner: change(r.owner, r.clear_owner, "owner")?,
            group: change(r.group, r.clear_group, "group")?,
            expires_at: change(r.expires_at, r.clear_expiry, EXPIRY)?,
        };
        let rec = self
            .domain
            .update_secret(&caller, r.name, update, r.allow_past_expiry)
            .await?;
        Ok(Response::new((&rec).into()))
    }

    async fn list_secrets(
        &self,
        req: Request<v1::ListSecretsRequest>,
    ) -> Result<Response<v1::ListSecretsResponse>, Status> {
        self.admin(&req, Action::SecretList).await?;
        let secrets = self.domain.list_secrets().await?;
        Ok(Response::new(v1::ListSecretsResponse {
            secrets: all(&secrets),
        }))
    }

    async fn describe_secret(
        &self,
        req: Request<v1::SecretRef>,
    ) -> Result<Response<v1::SecretMeta>, Status> {
        self.admin(&req, Action::SecretDescribe).await?;
        let rec = self.domain.describe_secret(req.into_inner().name).await?;
        Ok(Response::new((&rec).into()))
    }

    async fn list_versions(
        &self,
        req: Request<v1::SecretRef>,
    ) -> Result<Response<v1::ListVersionsResponse>, Status> {
        self.admin(&req, Action::SecretVersions).await?;
        let versions = self.domain.list_versions(req.into_inner().name).await?;
        Ok(Response::new(v1::ListVersionsResponse {
            versions: versions.into_iter().map(Into::into).collect(),
        }))
    }

    async fn rollback_secret(
        &self,
        req: Request<v1::RollbackSecretRequest>,
    ) -> Result<Response<v1::SecretMeta>, Status> {
        let caller = self.admin(&req, Action::SecretRollback).await?;
        let r = req.into_inner();
        let rec = self
            .domain
            .rollback_secret(&caller, r.name, r.version)
            .await?;
        Ok(Response::new((&rec).into()))
    }

    async fn delete_secret(
        &self,
        req: Request<v1::SecretRef>,
    ) -> Result<Response<v1::Empty>, Status> {
        let caller = self.admin(&req, Action::SecretDelete).await?;
        self.domain
            .delete_secret(&caller, req.into_inner().name)
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn create_client(
        &self,
        req: Request<v1::CreateClientRequest>,
    ) -> Result<Response<v1::CreateClientResponse>, Status> {
        let caller = self.admin(&req, Action::ClientCreate).await?;
        let r = req.into_inner();
        let new = CreateClient {
            name: r.name,
            admin: r.admin,
            csr_pem: (!r.csr_pem.trim().is_empty()).then_some(r.csr_pem),
            days: r.days,
        };
        let (client, cert_pem) = self.domain.create_client(&caller, new).await?;
        Ok(Response::new(v1::CreateClientResponse {
            client: Some((&client).into()),
            cert_pem,
            ca_pem: self.domain.ca_pem().to_owned(),
        }))
    }

    async fn list_clients(
        &self,
        req: Request<v1::Empty>,
    ) -> Result<Response<v1::ListClientsResponse>, Status> {
        self.admin(&req, Action::ClientList).await?;
        let clients = self.domain.list_clients().await?;
        Ok(Response::new(v1::ListClientsResponse {
            clients: all(&clients),
        }))
    }

    async fn describe_client(
        &self,
        req: Request<v1::ClientRef>,
    ) -> Result<Response<v1::ClientInfo>, Status> {
        self.admin(&req, Action::ClientDescribe).await?;
        let c = self.domain.describe_client(req.into_inner().name).await?;
        Ok(Response::new((&c).into()))
    }

    async fn remove_client(
        &self,
        req: Request<v1::ClientRef>,
    ) -> Result<Response<v1::Empty>, Status> {
        let caller = self.admin(&req, Action::ClientRemove).await?;
        self.domain
            .remove_client(&caller, req.into_inner().name)
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn renew_client_certificate(
        &self,
        req: Request<v1::RenewClientCertificateRequest>,
    ) -> Result<Response<v1::CreateClientResponse>, Status> {
        let caller = self.admin(&req, Action::ClientRenew).await?;
        let r = req.into_inner();
        let (client, issued) = self
            .domain
            .renew_client(&caller, r.name, r.csr_pem, r.days)
            .await?;
        Ok(Response::new(v1::CreateClientResponse {
            client: Some((&client).into()),
            cert_pem: issued.cert_pem,
            ca_pem: self.domain.ca_pem().to_owned(),
        }))
    }

    async fn create_group(
        &self,
        req: Request<v1::CreateGroupRequest>,
    ) -> Result<Response<v1::GroupInfo>, Status> {
        let caller = self.admin(&req, Action::GroupCreate).await?;
        let r = req.into_inner();
        let g = self
            .domain
            .create_group(&caller, r.name, r.description)
            .await?;
        Ok(Response::new(g.into()))
    }

    async fn list_groups(
        &self,
        req: Request<v1::Empty>,
    ) -> Result<Response<v1::ListGroupsResponse>, Status> {
        self.admin(&req, Action::GroupList).await?;
        let groups = self.domain.list_groups().await?;
        Ok(Response::new(v1::ListGroupsResponse {
            groups: groups.into_iter().map(Into::into).collect(),
        }))
    }

    async fn remove_group(
        &self,
        req: Request<v1::GroupRef>,
    ) -> Result<Response<v1::Empty>, Status> {
        let caller = self.admin(&req, Action::GroupRemove).await?;
        self.domain
            .remove_group(&caller, req.into_inner().name)
            .await?;
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
        self.admin(&req, Action::ClientAccess).await?;
        let client = req.into_inner().name;
        let access = self.domain.client_access(client.clone()).await?;
        Ok(Response::new(v1::AccessResponse {
            client,
            entries: access.into_iter().map(Into::into).collect(),
        }))
    }

    async fn rekey(
        &self,
        req: Request<v1::RekeyRequest>,
    ) -> Result<Response<v1::RekeyStatus>, Status> {
        let caller = self.admin(&req, Action::ServerRekey).await?;
        let rekey = self.rekey.clone();
        let credential = req.into_inner().new_credential;
        let actor = caller.name().to_owned();
        tokio::task::spawn_blocking(move || {
            rekey
                .start(
                    &actor,
                    (!credential.is_empty()).then_some(credential.as_str()),
                )
                .map(|_| rekey.status())
        })
        .await
        .map_err(|_| Status::internal("the rekey did not start"))?
        .map(|s| Response::new(rekey_status(s)))
        .map_err(Into::into)
    }

    async fn get_rekey_status(
        &self,
        req: Request<v1::Empty>,
    ) -> Result<Response<v1::RekeyStatus>, Status> {
        self.admin(&req, Action::ServerRekey).await?;
        Ok(Response::new(rekey_status(self.rekey.status())))
    }

    async fn query_audit(
        &self,
        req: Request<v1::AuditQuery>,
    ) -> Result<Response<v1::AuditResponse>, Status> {
        self.admin(&req, Action::AuditQuery).await?;
        let q = req.into_inner();
        let events = self
            .domain
            .query_audit(AuditQuery {
                client: (!q.client.is_empty()).then_some(q.client),
                secret: (!q.secret.is_empty()).then_some(q.secret),
                since: q.since,
                action: (!q.action.is_empty()).then_some(q.action),
                allowed: q.allowed,
                after_id: (q.after_id > 0).then_some(q.after_id),
                limit: q.limit,
            })
            .await?;
        Ok(Response::new(v1::AuditResponse {
            events: events.into_iter().map(Into::into).collect(),
        }))
    }

    async fn verify_audit(
        &self,
        req: Request<v1::VerifyAuditRequest>,
    ) -> Result<Response<v1::VerifyAuditResponse>, Status> {
        self.admin(&req, Action::AuditVerify).await?;
        let r = self.domain.verify_audit().await?;
        let v = r.verdict;
        let (head_id, head_chain) = v.head.unwrap_or_default();
        let (sink, sink_last_id) = r.sink.unwrap_or_default();
        Ok(Response::new(v1::VerifyAuditResponse {
            checked: v.checked,
            last_id: v.last_id,
            head_id,
            head_chain: hex::encode(head_chain),
            first_break: v.broken.map(|b| v1::AuditChainBreak {
                kind: b.kind.as_str().to_owned(),
                id: b.id,
                detail: b.detail,
            }),
            sink,
            sink_last_id,
        }))
    }
}

impl AdminService {
    async fn group_client(
        &self,
        req: Request<v1::GroupClientRequest>,
        add: bool,
    ) -> Result<Response<v1::GroupInfo>, Status> {
        let member = Member::Client(req.get_ref().client.clone());
        self.set_member(req, |r| r.group, member, add).await
    }

    async fn group_secret(
        &self,
        req: Request<v1::GroupSecretRequest>,
        add: bool,
    ) -> Result<Response<v1::GroupInfo>, Status> {
        let member = Member::Secret(req.get_ref().secret.clone());
        self.set_member(req, |r| r.group, member, add).await
    }

    async fn set_member<T>(
        &self,
        req: Request<T>,
        group: impl FnOnce(T) -> String,
        member: Member,
        add: bool,
    ) -> Result<Response<v1::GroupInfo>, Status> {
        let change = membership(add);
        let caller = self.admin(&req, member.action(change)).await?;
        let g = self
            .domain
            .set_member(&caller, group(req.into_inner()), member, change)
            .await?;
        Ok(Response::new(g.into()))
    }
}

fn rekey_status(s: crate::rekey::RekeyStatus) -> v1::RekeyStatus {
    v1::RekeyStatus {
        epoch: s.epoch,
        in_progress: s.in_progress,
        rewrapped: s.rewrapped,
        error: s.error.unwrap_or_default(),
    }
}
