//! `secretfs.v1.Secrets`: what workloads call, as their own identity. A
//! caller sees only the secrets its groups hold; every read is audited.

use std::sync::Arc;

use secretfs_proto::v1::{self, secrets_server::Secrets};
use tonic::{Request, Response, Status};

use super::convert::all;
use super::peer;
use crate::domain::{watch, Caller, Domain};
use crate::error::Error;
use crate::names::check_secret_name;

pub struct SecretsService {
    domain: Arc<Domain>,
}

impl SecretsService {
    pub fn new(domain: Arc<Domain>) -> Self {
        SecretsService { domain }
    }

    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        Ok(self.domain.authenticate(peer(req)?).await?)
    }
}

#[tonic::async_trait]
impl Secrets for SecretsService {
    type WatchStream = super::watch::EventStream;

    async fn watch(
        &self,
        req: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.caller(&req).await?;
        let known = req.into_inner().known;
        let held = watch::held(
            known
                .into_iter()
                .map(|k| (k.name, k.id, k.version, k.meta_digest)),
        )?;
        let (tx, events) = super::watch::channel();
        tokio::spawn(super::watch::run(self.domain.watch(caller, held), tx));
        Ok(Response::new(events))
    }

    async fn report_refusals(
        &self,
        req: Request<v1::ReportRefusalsRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        let caller = self.caller(&req).await?;
        let refusals = req.into_inner().refusals;
        self.domain
            .report_refusals(&caller, refusals.into_iter().map(Into::into).collect())
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn who_am_i(
        &self,
        req: Request<v1::Empty>,
    ) -> Result<Response<v1::WhoAmIResponse>, Status> {
        let peer = peer(&req)?;
        let caller = self.domain.authenticate(peer.clone()).await?;
        let access = self.domain.my_access(&caller).await?;
        Ok(Response::new(v1::WhoAmIResponse {
            client: caller.client.name,
            admin: caller.client.admin,
            trust_domain: self.domain.trust_domain().to_owned(),
            access: access.into_iter().map(Into::into).collect(),
            cert_serial: peer.identity.serial,
            cert_not_after: peer.identity.not_after,
        }))
    }

    async fn renew_certificate(
        &self,
        req: Request<v1::RenewCertificateRequest>,
    ) -> Result<Response<v1::RenewCertificateResponse>, Status> {
        let presented = peer(&req)?;
        let caller = self.domain.authenticate(presented.clone()).await?;
        let r = req.into_inner();
        let (_, issued) = self
            .domain
            .renew_own(&caller, &presented.identity, r.csr_pem, r.days)
            .await?;
        Ok(Response::new(v1::RenewCertificateResponse {
            cert_pem: issued.cert_pem,
            ca_pem: self.domain.ca_pem().to_owned(),
            serial: issued.serial,
            not_after: issued.not_after,
        }))
    }

    async fn list_my_secrets(
        &self,
        req: Request<v1::Empty>,
    ) -> Result<Response<v1::MySecretsResponse>, Status> {
        let caller = self.caller(&req).await?;
        let secrets = self.domain.my_secrets(&caller).await?;
        Ok(Response::new(v1::MySecretsResponse {
            secrets: all(&secrets),
        }))
    }

    async fn read_secrets(
        &self,
        req: Request<v1::ReadSecretsRequest>,
    ) -> Result<Response<v1::ReadSecretsResponse>, Status> {
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        let after = parse_page_token(&r.page_token)?;
        let page = self.domain.read_secrets(&caller, r.names, after).await?;
        Ok(Response::new(v1::ReadSecretsResponse {
            next_page_token: page
                .next_after
                .map(|name| format!("{PAGE_TOKEN_PREFIX}{name}"))
                .unwrap_or_default(),
            secrets: page.secrets.into_iter().map(Into::into).collect(),
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
