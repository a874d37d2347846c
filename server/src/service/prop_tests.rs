//! Every request message of `proto/secretfs.proto`, built from arbitrary
//! field values, through the real handlers over a real (in-memory SQLite)
//! store: each call gives a valid answer or a clear refusal (a client's
//! error code, a bounded message without raw control characters), never a
//! panic or an internal error; what the server keeps obeys the name and
//! field rules; a page token it hands out is accepted back.
//!
//! The request messages covered (one `Call` each; the test
//! `every_rpc_of_the_proto_is_covered` checks the list against the .proto):
//! Admin: CreateSecretRequest, RotateSecretRequest, UpdateSecretRequest,
//! ListSecretsRequest, SecretRef (DescribeSecret, ListVersions,
//! DeleteSecret), RollbackSecretRequest, CreateClientRequest, Empty
//! (ListClients, ListGroups), ClientRef (DescribeClient, RemoveClient,
//! ClientAccess), RenewClientCertificateRequest, CreateGroupRequest,
//! GroupRef, GroupClientRequest, GroupSecretRequest, AuditQuery.
//! Secrets: Empty (WhoAmI, ListMySecrets), ReadSecretsRequest,
//! WatchRequest (KnownSecret), ReportRefusalsRequest (Refusal),
//! RenewCertificateRequest.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use prost::Message;
use secretfs_proto::v1::{self, admin_server::Admin, secrets_server::Secrets};
use tokio_stream::StreamExt;
use tonic::{Code, Request, Status};

use super::{AdminService, SecretsService};
use crate::domain::{Action, Domain, Settings};
use crate::identity::{IdentitySource, Issuer, PeerIdentity};
use crate::names::{
    check_description, check_entity_name, check_labels, check_mode, check_secret_name,
};
use crate::prop_support::{config, deceptive, pem, text};
use crate::store::{AuditFilter, NewClient, SqliteStore, Store};
use crate::tls::PeerInfo;

const TRUST: &str = "test.example";
/// Small, so that some arbitrary contents are over it.
const MAX_SECRET: usize = 48;

/// One call of each RPC, with its request message.
#[derive(Debug, Clone)]
enum Call {
    CreateSecret(v1::CreateSecretRequest),
    RotateSecret(v1::RotateSecretRequest),
    UpdateSecret(v1::UpdateSecretRequest),
    ListSecrets(v1::ListSecretsRequest),
    DescribeSecret(v1::SecretRef),
    ListVersions(v1::SecretRef),
    RollbackSecret(v1::RollbackSecretRequest),
    DeleteSecret(v1::SecretRef),
    CreateClient(v1::CreateClientRequest),
    ListClients(v1::Empty),
    DescribeClient(v1::ClientRef),
    RemoveClient(v1::ClientRef),
    RenewClientCertificate(v1::RenewClientCertificateRequest),
    CreateGroup(v1::CreateGroupRequest),
    ListGroups(v1::Empty),
    RemoveGroup(v1::GroupRef),
    AddClientToGroup(v1::GroupClientRequest),
    RemoveClientFromGroup(v1::GroupClientRequest),
    AddSecretToGroup(v1::GroupSecretRequest),
    RemoveSecretFromGroup(v1::GroupSecretRequest),
    ClientAccess(v1::ClientRef),
    QueryAudit(v1::AuditQuery),
    WhoAmI(v1::Empty),
    ListMySecrets(v1::Empty),
    ReadSecrets(v1::ReadSecretsRequest),
    Watch(v1::WatchRequest),
    ReportRefusals(v1::ReportRefusalsRequest),
    RenewCertificate(v1::RenewCertificateRequest),
    Rekey(v1::RekeyRequest),
    GetRekeyStatus(v1::Empty),
    VerifyAudit(v1::VerifyAuditRequest),
}

impl Call {
    fn rpc(&self) -> &'static str {
        match self {
            Call::CreateSecret(_) => "CreateSecret",
            Call::RotateSecret(_) => "RotateSecret",
            Call::UpdateSecret(_) => "UpdateSecret",
            Call::ListSecrets(_) => "ListSecrets",
            Call::DescribeSecret(_) => "DescribeSecret",
            Call::ListVersions(_) => "ListVersions",
            Call::RollbackSecret(_) => "RollbackSecret",
            Call::DeleteSecret(_) => "DeleteSecret",
            Call::CreateClient(_) => "CreateClient",
            Call::ListClients(_) => "ListClients",
            Call::DescribeClient(_) => "DescribeClient",
            Call::RemoveClient(_) => "RemoveClient",
            Call::RenewClientCertificate(_) => "RenewClientCertificate",
            Call::CreateGroup(_) => "CreateGroup",
            Call::ListGroups(_) => "ListGroups",
            Call::RemoveGroup(_) => "RemoveGroup",
            Call::AddClientToGroup(_) => "AddClientToGroup",
            Call::RemoveClientFromGroup(_) => "RemoveClientFromGroup",
            Call::AddSecretToGroup(_) => "AddSecretToGroup",
            Call::RemoveSecretFromGroup(_) => "RemoveSecretFromGroup",
            Call::ClientAccess(_) => "ClientAccess",
            Call::QueryAudit(_) => "QueryAudit",
            Call::WhoAmI(_) => "WhoAmI",
            Call::ListMySecrets(_) => "ListMySecrets",
            Call::ReadSecrets(_) => "ReadSecrets",
            Call::Watch(_) => "Watch",
            Call::ReportRefusals(_) => "ReportRefusals",
            Call::RenewCertificate(_) => "RenewCertificate",
            Call::Rekey(_) => "Rekey",
            Call::GetRekeyStatus(_) => "GetRekeyStatus",
            Call::VerifyAudit(_) => "VerifyAudit",
        }
    }

    /// Whether the request message decodes back to itself (prost's wire
    /// format is the one format requests have).
    fn round_trips(&self) -> bool {
        fn same<T: Message + Default + PartialEq>(m: &T) -> bool {
            T::decode(m.encode_to_vec().as_slice()).as_ref() == Ok(m)
        }
        match self {
            Call::CreateSecret(m) => same(m),
            Call::RotateSecret(m) => same(m),
            Call::UpdateSecret(m) => same(m),
            Call::ListSecrets(m) => same(m),
            Call::DescribeSecret(m) | Call::ListVersions(m) | Call::DeleteSecret(m) => same(m),
            Call::RollbackSecret(m) => same(m),
            Call::CreateClient(m) => same(m),
            Call::ListClients(m)
            | Call::ListGroups(m)
            | Call::WhoAmI(m)
            | Call::ListMySecrets(m)
            | Call::GetRekeyStatus(m) => same(m),
            Call::DescribeClient(m) | Call::RemoveClient(m) | Call::ClientAccess(m) => same(m),
            Call::RenewClientCertificate(m) => same(m),
            Call::CreateGroup(m) => same(m),
            Call::RemoveGroup(m) => same(m),
            Call::AddClientToGroup(m) | Call::RemoveClientFromGroup(m) => same(m),
            Call::AddSecretToGroup(m) | Call::RemoveSecretFromGroup(m) => same(m),
            Call::QueryAudit(m) => same(m),
            Call::ReadSecrets(m) => same(m),
            Call::Watch(m) => same(m),
            Call::ReportRefusals(m) => same(m),
            Call::RenewCertificate(m) => same(m),
            Call::Rekey(m) => same(m),
            Call::VerifyAudit(m) => same(m),
        }
    }

    /// A call of `rpc` with an all-default message.
    fn example(rpc: &str) -> Option<Call> {
        Some(match rpc {
            "CreateSecret" => Call::CreateSecret(Default::default()),
            "RotateSecret" => Call::RotateSecret(Default::default()),
            "UpdateSecret" => Call::UpdateSecret(Default::default()),
            "ListSecrets" => Call::ListSecrets(Default::default()),
            "DescribeSecret" => Call::DescribeSecret(Default::default()),
            "ListVersions" => Call::ListVersions(Default::default()),
            "RollbackSecret" => Call::RollbackSecret(Default::default()),
            "DeleteSecret" => Call::DeleteSecret(Default::default()),
            "CreateClient" => Call::CreateClient(Default::default()),
            "ListClients" => Call::ListClients(Default::default()),
            "DescribeClient" => Call::DescribeClient(Default::default()),
            "RemoveClient" => Call::RemoveClient(Default::default()),
            "RenewClientCertificate" => Call::RenewClientCertificate(Default::default()),
            "CreateGroup" => Call::CreateGroup(Default::default()),
            "ListGroups" => Call::ListGroups(Default::default()),
            "RemoveGroup" => Call::RemoveGroup(Default::default()),
            "AddClientToGroup" => Call::AddClientToGroup(Default::default()),
            "RemoveClientFromGroup" => Call::RemoveClientFromGroup(Default::default()),
            "AddSecretToGroup" => Call::AddSecretToGroup(Default::default()),
            "RemoveSecretFromGroup" => Call::RemoveSecretFromGroup(Default::default()),
            "ClientAccess" => Call::ClientAccess(Default::default()),
            "QueryAudit" => Call::QueryAudit(Default::default()),
            "WhoAmI" => Call::WhoAmI(Default::default()),
            "ListMySecrets" => Call::ListMySecrets(Default::default()),
            "ReadSecrets" => Call::ReadSecrets(Default::default()),
            "Watch" => Call::Watch(Default::default()),
            "ReportRefusals" => Call::ReportRefusals(Default::default()),
            "RenewCertificate" => Call::RenewCertificate(Default::default()),
            "Rekey" => Call::Rekey(Default::default()),
            "GetRekeyStatus" => Call::GetRekeyStatus(Default::default()),
            "VerifyAudit" => Call::VerifyAudit(Default::default()),
            _ => return None,
        })
    }
}

// ---- arbitrary field values ----

/// Secret names: the seeded ones (so calls reach existing rows), or any text.
fn secret_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec!["db/password", "db", "tls/key", "db/password/x", "new"])
            .prop_map(str::to_owned),
        2 => text(),
    ]
}

/// Client and group names: the seeded ones, or any text.
fn entity_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec!["admin", "web", "g", "ops", "new-1"]).prop_map(str::to_owned),
        2 => text(),
    ]
}

// Each field is mostly valid, so that a message with many fields is
// accepted often enough for what follows it to be reached too.

fn content() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..MAX_SECRET),
        1 => prop::collection::vec(any::<u8>(), MAX_SECRET..MAX_SECRET + 8),
    ]
}

fn description() -> impl Strategy<Value = String> {
    prop_oneof![3 => "[a-zA-Z0-9 ,.'-]{0,30}", 1 => text()]
}

fn labels() -> impl Strategy<Value = HashMap<String, String>> {
    let key = prop_oneof![3 => "[a-z0-9./_-]{1,20}", 1 => text()];
    let value = prop_oneof![3 => "[a-zA-Z0-9 ]{0,20}", 1 => text()];
    prop_oneof![
        2 => Just(HashMap::new()),
        2 => prop::collection::hash_map(key, value, 1..4),
    ]
}

fn mode() -> impl Strategy<Value = u32> {
    prop_oneof![3 => 0u32..=0o777, 1 => any::<u32>()]
}

fn time() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(crate::names::MAX_TIME),
        1_700_000_000i64..2_100_000_000,
        any::<i64>(),
    ]
}

fn expiry() -> impl Strategy<Value = Option<i64>> {
    prop_oneof![3 => Just(None), 1 => time().prop_map(Some)]
}

fn days() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..5000, any::<u32>()]
}

/// A CSR made here, once (the key stays in the test).
fn good_csr() -> &'static str {
    static CSR: OnceLock<String> = OnceLock::new();
    CSR.get_or_init(|| crate::pki::new_csr("web").unwrap().1)
}

/// CSR text: empty, a good one, a good one with a byte changed or cut
/// short, a PEM wrapping arbitrary DER, or any text.
fn csr_pem() -> impl Strategy<Value = String> {
    let flipped = (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(at, b)| {
        let mut pem = good_csr().as_bytes().to_vec();
        let i = at.index(pem.len());
        pem[i] = b;
        String::from_utf8_lossy(&pem).into_owned()
    });
    let cut = any::<prop::sample::Index>()
        .prop_map(|at| good_csr()[..at.index(good_csr().len())].to_owned());
    let wrapped =
        prop::collection::vec(any::<u8>(), 0..200).prop_map(|der| pem("CERTIFICATE REQUEST", &der));
    prop_oneof![
        1 => Just(String::new()),
        2 => Just(good_csr().to_owned()),
        1 => flipped,
        1 => cut,
        1 => wrapped,
        1 => text(),
    ]
}

fn page_token() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(String::new()),
        1 => secret_name().prop_map(|n| format!("after:{n}")),
        1 => text(),
    ]
}

prop_compose! {
    fn create_secret()(
        name in secret_name(), content in content(), description in description(), labels in labels(),
        mode in mode(), owner in any::<Option<u32>>(), group in any::<Option<u32>>(),
        expires_at in expiry(), allow_past_expiry in any::<bool>(),
    ) -> v1::CreateSecretRequest {
        v1::CreateSecretRequest {
            name, content, description, labels, mode, owner, group, expires_at, allow_past_expiry,
        }
    }
}

prop_compose! {
    fn rotate_secret()(
        name in secret_name(), content in content(), expires_at in expiry(),
        clear_expiry in any::<bool>(), allow_past_expiry in any::<bool>(),
    ) -> v1::RotateSecretRequest {
        v1::RotateSecretRequest { name, content, expires_at, clear_expiry, allow_past_expiry }
    }
}

prop_compose! {
    fn update_secret()(
        name in secret_name(), description in prop::option::of(description()), labels in labels(),
        remove_labels in prop::collection::vec(text(), 0..3), clear_labels in any::<bool>(),
        mode in prop::option::of(mode()),
        owner in any::<Option<u32>>(), clear_owner in prop::bool::weighted(0.2),
        group in any::<Option<u32>>(), clear_group in prop::bool::weighted(0.2),
        expires_at in expiry(), clear_expiry in prop::bool::weighted(0.2),
        allow_past_expiry in any::<bool>(),
    ) -> v1::UpdateSecretRequest {
        v1::UpdateSecretRequest {
            name, description, labels, remove_labels, clear_labels, mode, owner, clear_owner,
            group, clear_group, expires_at, clear_expiry, allow_past_expiry,
        }
    }
}

prop_compose! {
    fn audit_query()(
        client in prop_oneof![Just(String::new()), entity_name()],
        secret in prop_oneof![Just(String::new()), secret_name()],
        since in time(), limit in any::<u32>(),
        action in prop_oneof![Just(String::new()), Just("secret.read".to_owned()), text()],
        allowed in any::<Option<bool>>(), after_id in any::<u64>(),
    ) -> v1::AuditQuery {
        v1::AuditQuery { client, secret, since, limit, action, allowed, after_id }
    }
}

prop_compose! {
    fn refusal()(
        at_ms in any::<i64>(), pid in any::<u32>(), uid in any::<u32>(),
        cgroup in text(), path in secret_name(), reason in text(),
    ) -> v1::Refusal {
        v1::Refusal { at_ms, pid, uid, cgroup, path, reason }
    }
}

prop_compose! {
    fn known()(
        name in secret_name(), id in 0u64..4, version in 0u64..4, meta_digest in any::<u64>(),
    ) -> v1::KnownSecret {
        v1::KnownSecret { name, id, version, meta_digest }
    }
}

fn secret_ref() -> impl Strategy<Value = v1::SecretRef> {
    secret_name().prop_map(|name| v1::SecretRef { name })
}

fn client_ref() -> impl Strategy<Value = v1::ClientRef> {
    entity_name().prop_map(|name| v1::ClientRef { name })
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        create_secret().prop_map(Call::CreateSecret),
        rotate_secret().prop_map(Call::RotateSecret),
        update_secret().prop_map(Call::UpdateSecret),
        Just(Call::ListSecrets(v1::ListSecretsRequest {})),
        secret_ref().prop_map(Call::DescribeSecret),
        secret_ref().prop_map(Call::ListVersions),
        (secret_name(), prop_oneof![0u64..4, any::<u64>()]).prop_map(|(name, version)| {
            Call::RollbackSecret(v1::RollbackSecretRequest { name, version })
        }),
        secret_ref().prop_map(Call::DeleteSecret),
        (entity_name(), csr_pem(), any::<bool>(), days()).prop_map(
            |(name, csr_pem, admin, days)| {
                Call::CreateClient(v1::CreateClientRequest {
                    name,
                    csr_pem,
                    admin,
                    days,
                })
            }
        ),
        Just(Call::ListClients(v1::Empty {})),
        client_ref().prop_map(Call::DescribeClient),
        client_ref().prop_map(Call::RemoveClient),
        (entity_name(), csr_pem(), days()).prop_map(|(name, csr_pem, days)| {
            Call::RenewClientCertificate(v1::RenewClientCertificateRequest {
                name,
                csr_pem,
                days,
            })
        }),
        (entity_name(), description()).prop_map(|(name, description)| Call::CreateGroup(
            v1::CreateGroupRequest { name, description }
        )),
        Just(Call::ListGroups(v1::Empty {})),
        entity_name().prop_map(|name| Call::RemoveGroup(v1::GroupRef { name })),
        (entity_name(), entity_name()).prop_map(|(group, client)| Call::AddClientToGroup(
            v1::GroupClientRequest { group, client }
        )),
        (entity_name(), entity_name()).prop_map(|(group, client)| {
            Call::RemoveClientFromGroup(v1::GroupClientRequest { group, client })
        }),
        (entity_name(), secret_name()).prop_map(|(group, secret)| Call::AddSecretToGroup(
            v1::GroupSecretRequest { group, secret }
        )),
        (entity_name(), secret_name()).prop_map(|(group, secret)| {
            Call::RemoveSecretFromGroup(v1::GroupSecretRequest { group, secret })
        }),
        client_ref().prop_map(Call::ClientAccess),
        audit_query().prop_map(Call::QueryAudit),
        Just(Call::WhoAmI(v1::Empty {})),
        Just(Call::ListMySecrets(v1::Empty {})),
        (prop::collection::vec(secret_name(), 0..3), page_token()).prop_map(
            |(names, page_token)| Call::ReadSecrets(v1::ReadSecretsRequest { names, page_token })
        ),
        (prop::collection::vec(known(), 0..4), any::<u64>()).prop_map(|(known, since_revision)| {
            Call::Watch(v1::WatchRequest {
                known,
                since_revision,
            })
        }),
        prop::collection::vec(refusal(), 0..4)
            .prop_map(|refusals| Call::ReportRefusals(v1::ReportRefusalsRequest { refusals })),
        (csr_pem(), days()).prop_map(|(csr_pem, days)| Call::RenewCertificate(
            v1::RenewCertificateRequest { csr_pem, days }
        )),
        // The fixture's server keeps its key in a file: a credential name
        // is refused, an empty one starts a rekey.
        prop_oneof![Just(String::new()), text()]
            .prop_map(|new_credential| Call::Rekey(v1::RekeyRequest { new_credential })),
        Just(Call::GetRekeyStatus(v1::Empty {})),
        Just(Call::VerifyAudit(v1::VerifyAuditRequest {})),
    ]
}

// ---- the server under test ----

struct Fixture {
    admin: AdminService,
    secrets: SecretsService,
    store: Arc<SqliteStore>,
    /// The state directory a rekey writes the next key into.
    _dir: tempfile::TempDir,
}

/// A request as it arrives from `who`'s TLS connection.
fn request<T>(msg: T, who: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.extensions_mut().insert(PeerInfo {
        remote: None,
        identity: Arc::new(Ok(PeerIdentity {
            name: who.into(),
            serial: format!("serial-{who}"),
            source: IdentitySource::Spiffe,
            issuer: Issuer::BuiltIn,
            not_before: 0,
            not_after: 1_900_000_000,
        })),
    });
    req
}

/// A server with clients `admin` and `web`, group `g` holding `web` and
/// secret `db/password`, and secret `tls/key` in no group.
async fn fixture() -> Fixture {
    let keys = crate::keys::KeyRing::generate().unwrap();
    let store = Arc::new(SqliteStore::open_in_memory_with(keys.clone()).unwrap());
    let (ca, _) = crate::pki::Ca::generate(TRUST).unwrap();
    let settings = Settings {
        trust_domain: TRUST.into(),
        max_secret_size: MAX_SECRET,
    };
    let dyn_store: Arc<dyn Store> = store.clone();
    let dir = tempfile::tempdir().unwrap();
    let rekey = crate::rekey::Rekeyer::new(
        crate::StateDir::new(dir.path()),
        crate::key_provider::KeySource::File,
        dyn_store.clone(),
        keys.clone(),
        crate::rekey::DEFAULT_BATCH,
        std::time::Duration::ZERO,
    );
    let (domain, _thread): (Arc<Domain>, _) = Domain::start(dyn_store, keys, ca, settings);
    for (name, admin) in [("admin", true), ("web", false)] {
        store
            .create_client(
                &NewClient {
                    name: name.into(),
                    admin,
                    cert: Some((format!("serial-{name}"), 1_900_000_000)),
                },
                &Action::ClientCreate.by("test"),
            )
            .unwrap();
    }
    let f = Fixture {
        admin: AdminService::new(domain.clone(), rekey),
        secrets: SecretsService::new(domain),
        store,
        _dir: dir,
    };
    for name in ["db/password", "tls/key"] {
        let msg = v1::CreateSecretRequest {
            name: name.into(),
            content: b"s3cret".to_vec(),
            ..Default::default()
        };
        f.admin.create_secret(request(msg, "admin")).await.unwrap();
    }
    let group = v1::CreateGroupRequest {
        name: "g".into(),
        description: String::new(),
    };
    f.admin.create_group(request(group, "admin")).await.unwrap();
    let web = v1::GroupClientRequest {
        group: "g".into(),
        client: "web".into(),
    };
    f.admin
        .add_client_to_group(request(web, "admin"))
        .await
        .unwrap();
    let db = v1::GroupSecretRequest {
        group: "g".into(),
        secret: "db/password".into(),
    };
    f.admin
        .add_secret_to_group(request(db, "admin"))
        .await
        .unwrap();
    f
}

/// What a call answered, reduced to what the properties look at.
enum Answer {
    Metas(Vec<v1::SecretMeta>),
    Groups(Vec<v1::GroupInfo>),
    Clients(Vec<v1::ClientInfo>),
    Issued {
        client: Option<v1::ClientInfo>,
        cert_pem: String,
    },
    Read(v1::ReadSecretsResponse),
    Watching(Option<Result<v1::WatchEvent, Status>>),
    Other,
}

impl Fixture {
    /// Runs `call` as `who` (Secrets calls) or as `admin` (Admin calls).
    async fn run(&self, call: Call, who: &str) -> Result<Answer, Status> {
        let a = &self.admin;
        let s = &self.secrets;
        let meta = |r: Result<tonic::Response<v1::SecretMeta>, Status>| {
            r.map(|r| Answer::Metas(vec![r.into_inner()]))
        };
        let group = |r: Result<tonic::Response<v1::GroupInfo>, Status>| {
            r.map(|r| Answer::Groups(vec![r.into_inner()]))
        };
        let other = |r: Result<tonic::Response<v1::Empty>, Status>| r.map(|_| Answer::Other);
        match call {
            Call::CreateSecret(m) => meta(a.create_secret(request(m, "admin")).await),
            Call::RotateSecret(m) => meta(a.rotate_secret(request(m, "admin")).await),
            Call::UpdateSecret(m) => meta(a.update_secret(request(m, "admin")).await),
            Call::ListSecrets(m) => a
                .list_secrets(request(m, "admin"))
                .await
                .map(|r| Answer::Metas(r.into_inner().secrets)),
            Call::DescribeSecret(m) => meta(a.describe_secret(request(m, "admin")).await),
            Call::ListVersions(m) => a
                .list_versions(request(m, "admin"))
                .await
                .map(|_| Answer::Other),
            Call::RollbackSecret(m) => meta(a.rollback_secret(request(m, "admin")).await),
            Call::DeleteSecret(m) => other(a.delete_secret(request(m, "admin")).await),
            Call::CreateClient(m) => a.create_client(request(m, "admin")).await.map(|r| {
                let r = r.into_inner();
                Answer::Issued {
                    client: r.client,
                    cert_pem: r.cert_pem,
                }
            }),
            Call::ListClients(m) => a
                .list_clients(request(m, "admin"))
                .await
                .map(|r| Answer::Clients(r.into_inner().clients)),
            Call::DescribeClient(m) => a
                .describe_client(request(m, "admin"))
                .await
                .map(|r| Answer::Clients(vec![r.into_inner()])),
            Call::RemoveClient(m) => other(a.remove_client(request(m, "admin")).await),
            Call::RenewClientCertificate(m) => a
                .renew_client_certificate(request(m, "admin"))
                .await
                .map(|r| {
                    let r = r.into_inner();
                    Answer::Issued {
                        client: r.client,
                        cert_pem: r.cert_pem,
                    }
                }),
            Call::CreateGroup(m) => group(a.create_group(request(m, "admin")).await),
            Call::ListGroups(m) => a
                .list_groups(request(m, "admin"))
                .await
                .map(|r| Answer::Groups(r.into_inner().groups)),
            Call::RemoveGroup(m) => other(a.remove_group(request(m, "admin")).await),
            Call::AddClientToGroup(m) => group(a.add_client_to_group(request(m, "admin")).await),
            Call::RemoveClientFromGroup(m) => {
                group(a.remove_client_from_group(request(m, "admin")).await)
            }
            Call::AddSecretToGroup(m) => group(a.add_secret_to_group(request(m, "admin")).await),
            Call::RemoveSecretFromGroup(m) => {
                group(a.remove_secret_from_group(request(m, "admin")).await)
            }
            Call::ClientAccess(m) => a
                .client_access(request(m, "admin"))
                .await
                .map(|_| Answer::Other),
            Call::QueryAudit(m) => a
                .query_audit(request(m, "admin"))
                .await
                .map(|_| Answer::Other),
            Call::WhoAmI(m) => s.who_am_i(request(m, who)).await.map(|_| Answer::Other),
            Call::ListMySecrets(m) => s
                .list_my_secrets(request(m, who))
                .await
                .map(|r| Answer::Metas(r.into_inner().secrets)),
            Call::ReadSecrets(m) => s
                .read_secrets(request(m, who))
                .await
                .map(|r| Answer::Read(r.into_inner())),
            Call::Watch(m) => {
                let mut events = s.watch(request(m, who)).await?.into_inner();
                // The watch runs in a task of its own: its first event
                // shows that it took the request without failing.
                Ok(Answer::Watching(events.next().await))
            }
            Call::ReportRefusals(m) => other(s.report_refusals(request(m, who)).await),
            Call::RenewCertificate(m) => s
                .renew_certificate(request(m, who))
                .await
                .map(|_| Answer::Other),
            Call::Rekey(m) => a.rekey(request(m, "admin")).await.map(|_| Answer::Other),
            Call::GetRekeyStatus(m) => a
                .get_rekey_status(request(m, "admin"))
                .await
                .map(|_| Answer::Other),
            Call::VerifyAudit(m) => a
                .verify_audit(request(m, "admin"))
                .await
                .map(|_| Answer::Other),
        }
    }
}

// ---- the properties ----

/// A refusal a client can act on: a client's error code, and a bounded
/// message free of raw control characters (messages reach logs, audit
/// details and terminals).
fn check_refusal(call: &str, status: &Status) -> Result<(), TestCaseError> {
    let client_codes = [
        Code::InvalidArgument,
        Code::NotFound,
        Code::AlreadyExists,
        Code::FailedPrecondition,
        Code::PermissionDenied,
        Code::Unauthenticated,
        Code::ResourceExhausted,
        Code::OutOfRange,
    ];
    prop_assert!(client_codes.contains(&status.code()), "{call}: {status:?}");
    let msg = status.message();
    prop_assert!(!msg.is_empty(), "{call}: empty message");
    prop_assert!(
        !msg.chars().any(deceptive),
        "{call}: raw control text in {msg:?}"
    );
    prop_assert!(msg.len() < 4096, "{call}: a {}-byte message", msg.len());
    Ok(())
}

fn check_meta(m: &v1::SecretMeta) -> Result<(), TestCaseError> {
    prop_assert!(check_secret_name(&m.name).is_ok(), "{:?}", m.name);
    prop_assert!(check_mode(m.mode).is_ok(), "{:o}", m.mode);
    prop_assert!(
        check_description(&m.description).is_ok(),
        "{:?}",
        m.description
    );
    let labels: BTreeMap<String, String> = m.labels.clone().into_iter().collect();
    prop_assert!(check_labels(&labels).is_ok(), "{:?}", labels);
    Ok(())
}

fn check_group(g: &v1::GroupInfo) -> Result<(), TestCaseError> {
    prop_assert!(check_entity_name("group", &g.name).is_ok(), "{:?}", g.name);
    prop_assert!(check_description(&g.description).is_ok());
    for c in &g.clients {
        prop_assert!(check_entity_name("client", c).is_ok(), "{:?}", c);
    }
    for s in &g.secrets {
        prop_assert!(check_secret_name(s).is_ok(), "{:?}", s);
    }
    Ok(())
}

fn check_client(c: &v1::ClientInfo) -> Result<(), TestCaseError> {
    prop_assert!(check_entity_name("client", &c.name).is_ok(), "{:?}", c.name);
    for g in &c.groups {
        prop_assert!(check_entity_name("group", g).is_ok(), "{:?}", g);
    }
    Ok(())
}

impl Fixture {
    /// Checks one answer; `call` as it was made, for a follow-up.
    async fn check_answer(
        &self,
        call: &Call,
        who: &str,
        answer: Answer,
    ) -> Result<(), TestCaseError> {
        match answer {
            Answer::Metas(metas) => metas.iter().try_for_each(check_meta)?,
            Answer::Groups(groups) => groups.iter().try_for_each(check_group)?,
            Answer::Clients(clients) => clients.iter().try_for_each(check_client)?,
            Answer::Issued { client, cert_pem } => {
                let client = client.expect("an issued certificate names its client");
                check_client(&client)?;
                if !cert_pem.is_empty() {
                    let der = secretfs_proto::cert::CertInfo::parse(cert_pem.as_bytes());
                    prop_assert!(der.is_ok(), "{:?}", der);
                    let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
                        .map(|d: rustls_pki_types::CertificateDer<'static>| d)
                        .unwrap();
                    let id =
                        crate::identity::identity_from_der(der.as_ref(), TRUST, Issuer::BuiltIn);
                    prop_assert_eq!(id.map(|i| i.name).ok(), Some(client.name));
                }
            }
            Answer::Read(r) => {
                for sc in &r.secrets {
                    let m = sc.meta.as_ref().expect("content comes with its metadata");
                    check_meta(m)?;
                    prop_assert_eq!(sc.content.len() as u64, m.size);
                }
                if !r.next_page_token.is_empty() {
                    // A page token this server handed out is accepted back.
                    let Call::ReadSecrets(m) = call else {
                        unreachable!()
                    };
                    let next = v1::ReadSecretsRequest {
                        names: m.names.clone(),
                        page_token: r.next_page_token.clone(),
                    };
                    let again = self.secrets.read_secrets(request(next, who)).await;
                    prop_assert!(
                        again.as_ref().err().map(Status::code) != Some(Code::InvalidArgument),
                        "its own page token refused: {:?}",
                        again.err()
                    );
                }
            }
            Answer::Watching(first) => match first {
                Some(Ok(event)) => {
                    prop_assert!(event.initial, "the first event is initial");
                    for sc in &event.upserts {
                        check_meta(sc.meta.as_ref().expect("metadata"))?;
                    }
                }
                Some(Err(status)) => check_refusal("Watch (stream)", &status)?,
                None => prop_assert!(false, "the watch ended without an event"),
            },
            Answer::Other => {}
        }
        Ok(())
    }

    /// What the server keeps obeys the rules, and the audit log holds no
    /// raw control text whoever wrote into it.
    async fn check_state(&self) -> Result<(), TestCaseError> {
        for m in self.store.list_secrets().unwrap() {
            prop_assert!(check_secret_name(&m.name).is_ok(), "{:?}", m.name);
            prop_assert!(check_mode(m.mode).is_ok());
            prop_assert!(check_description(&m.description).is_ok());
            prop_assert!(check_labels(&m.labels.clone().into_iter().collect()).is_ok());
        }
        for g in self.store.list_groups().unwrap() {
            prop_assert!(check_entity_name("group", &g.name).is_ok(), "{:?}", g.name);
        }
        for c in self.store.list_clients().unwrap() {
            prop_assert!(check_entity_name("client", &c.name).is_ok(), "{:?}", c.name);
        }
        for e in self.store.query_audit(&AuditFilter::default()).unwrap() {
            let fields = [
                Some(&e.actor),
                Some(&e.detail),
                e.secret.as_ref(),
                e.client.as_ref(),
                e.group.as_ref(),
            ];
            for f in fields.into_iter().flatten() {
                prop_assert!(
                    !f.chars().any(deceptive),
                    "audit {}: raw control text in {:?}",
                    e.action,
                    f
                );
            }
        }
        Ok(())
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prop_every_request_gets_a_valid_answer_or_a_clear_refusal(
        calls in prop::collection::vec(
            (call(), prop::sample::select(vec!["web", "admin", "stranger"])),
            1..8,
        )
    ) {
        runtime().block_on(async {
            let f = fixture().await;
            for (call, who) in calls {
                let rpc = call.rpc();
                match f.run(call.clone(), who).await {
                    Ok(answer) => f.check_answer(&call, who, answer).await?,
                    Err(status) => check_refusal(rpc, &status)?,
                }
            }
            f.check_state().await
        })?;
    }
}

/// Decodes `bytes` as every request message, as the server's codec does
/// before any handler runs.
fn decode_as_every_request(bytes: &[u8]) {
    fn decode<T: Message + Default>(bytes: &[u8]) {
        let _ = T::decode(bytes);
    }
    decode::<v1::CreateSecretRequest>(bytes);
    decode::<v1::RotateSecretRequest>(bytes);
    decode::<v1::UpdateSecretRequest>(bytes);
    decode::<v1::ListSecretsRequest>(bytes);
    decode::<v1::SecretRef>(bytes);
    decode::<v1::RollbackSecretRequest>(bytes);
    decode::<v1::CreateClientRequest>(bytes);
    decode::<v1::Empty>(bytes);
    decode::<v1::ClientRef>(bytes);
    decode::<v1::RenewClientCertificateRequest>(bytes);
    decode::<v1::CreateGroupRequest>(bytes);
    decode::<v1::GroupRef>(bytes);
    decode::<v1::GroupClientRequest>(bytes);
    decode::<v1::GroupSecretRequest>(bytes);
    decode::<v1::AuditQuery>(bytes);
    decode::<v1::ReadSecretsRequest>(bytes);
    decode::<v1::WatchRequest>(bytes);
    decode::<v1::ReportRefusalsRequest>(bytes);
    decode::<v1::RenewCertificateRequest>(bytes);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prop_request_messages_round_trip_and_any_bytes_decode_without_panic(
        call in call(),
        noise in prop::collection::vec(any::<u8>(), 0..256),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    ) {
        prop_assert!(call.round_trips(), "{:?}", call);
        decode_as_every_request(&noise);
        // A real message with bytes changed: closer to a valid one than noise.
        let Some(mut bytes) = encoded(&call) else { return Ok(()) };
        for (at, b) in &flips {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = *b;
            }
        }
        decode_as_every_request(&bytes);
    }
}

/// The call's request message on the wire.
fn encoded(call: &Call) -> Option<Vec<u8>> {
    Some(match call {
        Call::CreateSecret(m) => m.encode_to_vec(),
        Call::UpdateSecret(m) => m.encode_to_vec(),
        Call::ReadSecrets(m) => m.encode_to_vec(),
        Call::Watch(m) => m.encode_to_vec(),
        Call::ReportRefusals(m) => m.encode_to_vec(),
        Call::QueryAudit(m) => m.encode_to_vec(),
        Call::CreateClient(m) => m.encode_to_vec(),
        _ => return None,
    })
}

#[test]
fn every_rpc_of_the_proto_is_covered() {
    let proto = include_str!("../../../proto/secretfs.proto");
    let rpcs: BTreeSet<&str> = proto
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .map(|l| l.split('(').next().unwrap().trim())
        .collect();
    assert!(rpcs.len() >= 28, "{rpcs:?}");
    let rt = runtime();
    let f = rt.block_on(fixture());
    for rpc in rpcs {
        let call = Call::example(rpc)
            .unwrap_or_else(|| panic!("RPC {rpc} has no property test: add it to `Call`"));
        assert_eq!(call.rpc(), rpc);
        // All-default messages too give an answer or a clear refusal.
        let got = rt.block_on(f.run(call, "web"));
        if let Err(status) = got {
            check_refusal(rpc, &status).unwrap();
        }
    }
}
