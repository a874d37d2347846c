//! The domain against an in-memory store: what each operation writes to
//! the audit log, what it announces, and what a watcher sees.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use super::admin::{CreateSecret, Member, Membership};
use super::*;
use crate::envelope::Plaintext;
use crate::identity::{IdentitySource, Issuer, PeerIdentity};
use crate::store::*;

/// A store that hands out ciphertext altered on its way out of the
/// database (a mock: the real tampering tests run the real server). It
/// also counts the reads watchers make and the audit appends, and can
/// hold the fast path's reads and the view reads at a gate until a test
/// opens it.
struct Tampering {
    inner: SqliteStore,
    tamper: std::sync::atomic::AtomicBool,
    reads_one: std::sync::atomic::AtomicUsize,
    views: std::sync::atomic::AtomicUsize,
    sealed: std::sync::atomic::AtomicUsize,
    appends: std::sync::atomic::AtomicUsize,
    gate_shut: std::sync::atomic::AtomicBool,
    /// Reads that came to the gate while it was shut.
    at_gate: std::sync::atomic::AtomicUsize,
}

impl Tampering {
    /// Holds a read here while a test lets watchers gather (bounded: a
    /// test that fails to open the gate fails, it does not hang).
    fn gate(&self) {
        if self.gate_shut.load(SeqCst) {
            self.at_gate.fetch_add(1, SeqCst);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while self.gate_shut.load(SeqCst) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn spoil(&self, mut s: SealedSecret) -> SealedSecret {
        if self.tamper.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(b) = s.sealed.ciphertext.last_mut() {
                *b ^= 1;
            }
        }
        s
    }
}

macro_rules! delegate {
    ($($name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        $(fn $name(&self $(, $arg: $ty)*) -> $ret { self.inner.$name($($arg),*) })*
    };
}

impl Store for Tampering {
    delegate! {
        concurrency(&self) -> usize;
        feed(&self) -> Arc<dyn ChangeFeed>;
        revision(&self) -> Result<u64>;
        get_meta(&self, key: &str) -> Result<Option<Vec<u8>>>;
        put_meta(&self, key: &str, value: &[u8]) -> Result<()>;
        put_metas(&self, entries: &[(&str, Option<&[u8]>)]) -> Result<()>;
        rewrap_keys(&self, limit: usize) -> Result<usize>;
        versions_not_opening(&self, key: &crate::envelope::MasterKey) -> Result<Vec<(String, u64)>>;
        put_metas_audited(&self, entries: &[(&str, Option<&[u8]>)], audit: &AuditEntry) -> Result<()>;
        create_secret(&self, new: &NewSecret, audit: &AuditEntry, seal: SealFn<'_>) -> Result<Committed<SecretRecord>>;
        rotate_secret(&self, name: &str, size: u64, expires: Option<Option<i64>>, audit: &AuditEntry, seal: SealFn<'_>) -> Result<Committed<SecretRecord>>;
        update_secret(&self, name: &str, update: &SecretUpdate, check: CheckFn<'_>, audit: &AuditEntry) -> Result<Committed<SecretRecord>>;
        rollback_secret(&self, name: &str, version: u64, audit: &AuditEntry) -> Result<Committed<SecretRecord>>;
        delete_secret(&self, name: &str, audit: &AuditEntry) -> Result<Committed<u64>>;
        get_secret(&self, name: &str) -> Result<SecretRecord>;
        list_secrets(&self) -> Result<Vec<SecretRecord>>;
        list_versions(&self, name: &str) -> Result<Vec<VersionRecord>>;
        create_client(&self, new: &NewClient, audit: &AuditEntry) -> Result<Committed<ClientRecord>>;
        get_client(&self, name: &str) -> Result<ClientRecord>;
        list_clients(&self) -> Result<Vec<ClientRecord>>;
        add_client_cert(&self, client_id: u64, name: &str, serial: &str, not_after: i64, audit: &AuditEntry) -> Result<Committed<ClientRecord>>;
        remove_client(&self, name: &str, audit: &AuditEntry) -> Result<Committed<()>>;
        authenticate(&self, name: &str, serial: &str) -> Result<AuthLookup>;
        create_group(&self, name: &str, description: &str, audit: &AuditEntry) -> Result<Committed<GroupRecord>>;
        get_group(&self, name: &str) -> Result<GroupRecord>;
        list_groups(&self) -> Result<Vec<GroupRecord>>;
        remove_group(&self, name: &str, audit: &AuditEntry) -> Result<Committed<()>>;
        set_group_member(&self, group: &str, member: &Member, add: bool, audit: &AuditEntry) -> Result<Committed<MemberChange>>;
        client_access(&self, client: &str) -> Result<Vec<AccessRecord>>;
        query_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>>;
        verify_audit(&self) -> Result<crate::store::audit_chain::AuditVerdict>;
        audit_after(&self, after_id: u64, limit: usize) -> Result<Vec<crate::store::audit_chain::ChainedEntry>>;
        audit_head(&self) -> Result<Option<crate::store::audit_chain::AuditHead>>;
        take_bad_rows(&self) -> Vec<BadRow>;
        verify_rows(&self) -> Result<Vec<BadRow>>;
        reseal_rows(&self, limit: usize) -> Result<usize>;
        check_row_set(&self) -> Result<Option<BadRow>>;
        accept_row_set(&self, audit: &AuditEntry) -> Result<u64>;
    }

    fn read_sealed(
        &self,
        client_id: u64,
        names: &[String],
    ) -> Result<(Vec<SealedSecret>, Vec<String>)> {
        self.sealed.fetch_add(1, SeqCst);
        let (found, denied) = self.inner.read_sealed(client_id, names)?;
        Ok((found.into_iter().map(|s| self.spoil(s)).collect(), denied))
    }

    fn append_audit(&self, entries: &[AuditEntry]) -> Result<()> {
        self.appends.fetch_add(1, SeqCst);
        self.inner.append_audit(entries)
    }

    fn client_view(&self, client_id: u64) -> Result<View> {
        self.gate();
        self.views.fetch_add(1, SeqCst);
        self.inner.client_view(client_id)
    }

    fn read_one_for_client(&self, client_id: u64, secret_id: u64) -> Result<Option<SealedSecret>> {
        self.gate();
        self.reads_one.fetch_add(1, SeqCst);
        Ok(self
            .inner
            .read_one_for_client(client_id, secret_id)?
            .map(|s| self.spoil(s)))
    }
}

struct Fixture {
    domain: Arc<Domain>,
    store: Arc<Tampering>,
    admin: Caller,
    web: Caller,
}

fn peer(name: &str, serial: &str) -> Peer {
    Peer {
        identity: PeerIdentity {
            name: name.into(),
            serial: serial.into(),
            source: IdentitySource::Spiffe,
            issuer: Issuer::BuiltIn,
            not_before: 0,
            not_after: i64::MAX,
        },
        remote: "127.0.0.1:1".parse().ok(),
    }
}

async fn fixture() -> Fixture {
    let store = Arc::new(Tampering {
        inner: SqliteStore::open_in_memory().unwrap(),
        tamper: Default::default(),
        reads_one: Default::default(),
        views: Default::default(),
        sealed: Default::default(),
        appends: Default::default(),
        gate_shut: Default::default(),
        at_gate: Default::default(),
    });
    let (ca, _) = crate::pki::Ca::generate("test.example").unwrap();
    let settings = Settings {
        trust_domain: "test.example".into(),
        max_secret_size: 1024,
    };
    let dyn_store: Arc<dyn Store> = store.clone();
    let (domain, _thread) = Domain::start(
        dyn_store,
        crate::keys::KeyRing::generate().unwrap(),
        ca,
        settings,
    );
    for (name, admin) in [("admin", true), ("web", false)] {
        store
            .create_client(
                &NewClient {
                    name: name.into(),
                    admin,
                    cert: Some((format!("serial-{name}"), i64::MAX)),
                },
                &Action::ClientCreate.by("test"),
            )
            .unwrap();
    }
    let admin = domain
        .authenticate(peer("admin", "serial-admin"))
        .await
        .unwrap();
    let web = domain
        .authenticate(peer("web", "serial-web"))
        .await
        .unwrap();
    Fixture {
        domain,
        store,
        admin,
        web,
    }
}

fn secret(name: &str, content: &[u8]) -> CreateSecret {
    CreateSecret {
        meta: NewSecret {
            name: name.into(),
            ..Default::default()
        },
        content: Plaintext::new(content.to_vec()),
        allow_past_expiry: false,
    }
}

impl Fixture {
    /// Creates secrets and grants them to `web` through group `g`.
    async fn granted(&self, names: &[&str]) {
        let d = &self.domain;
        if d.list_groups().await.unwrap().is_empty() {
            d.create_group(&self.admin, "g".into(), String::new())
                .await
                .unwrap();
            d.set_member(
                &self.admin,
                "g".into(),
                Member::Client("web".into()),
                Membership::Add,
            )
            .await
            .unwrap();
        }
        for n in names {
            d.create_secret(&self.admin, secret(n, n.as_bytes()))
                .await
                .unwrap();
            d.set_member(
                &self.admin,
                "g".into(),
                Member::Secret((*n).into()),
                Membership::Add,
            )
            .await
            .unwrap();
        }
    }

    fn audit(&self, action: Action) -> Vec<AuditEntry> {
        self.store
            .query_audit(&AuditFilter::default())
            .unwrap()
            .into_iter()
            .filter(|e| e.action == action.as_str())
            .collect()
    }
}

fn event(next: Next) -> Delta {
    match next {
        Next::Event(d) => d,
        Next::ShuttingDown => panic!("expected an event, got shutdown"),
        Next::Closed => panic!("expected an event, got the end of the feed"),
    }
}

fn names(d: &Delta) -> Vec<(String, Vec<u8>)> {
    d.upserts
        .iter()
        .map(|o| {
            let bytes = match &o.content {
                Content::Owned(p) => p.as_bytes().to_vec(),
                Content::Shared(p) => p.as_bytes().to_vec(),
            };
            (o.record.name.clone(), bytes)
        })
        .collect()
}

#[tokio::test]
async fn a_rotation_is_announced_with_the_revision_it_committed_at() {
    let f = fixture().await;
    f.granted(&["a"]).await;
    let mut feed = f.store.feed().subscribe();
    let rec = f
        .domain
        .rotate_secret(
            &f.admin,
            "a".into(),
            Plaintext::new(b"two".to_vec()),
            None,
            false,
        )
        .await
        .unwrap();
    assert_eq!(
        feed.recv().await.unwrap(),
        Change::Secret {
            id: rec.id,
            revision: f.store.revision().unwrap()
        }
    );
    let rotations = f.audit(Action::SecretRotate);
    assert_eq!(rotations.len(), 1);
    assert_eq!(
        (
            rotations[0].actor.as_str(),
            rotations[0].secret.as_deref(),
            rotations[0].version
        ),
        ("admin", Some("a"), Some(2))
    );
}

#[tokio::test]
async fn reads_are_audited_and_refusals_do_not_say_which_names_exist() {
    let f = fixture().await;
    f.granted(&["a", "b"]).await;
    f.domain
        .create_secret(&f.admin, secret("hidden", b"x"))
        .await
        .unwrap();
    let page = f
        .domain
        .read_secrets(&f.web, vec!["b".into(), "a".into(), "a".into()], None)
        .await
        .unwrap();
    let read: Vec<_> = page
        .secrets
        .iter()
        .map(|o| o.record.name.as_str())
        .collect();
    assert_eq!(read, ["a", "b"]);
    assert!(page.next_after.is_none());
    assert_eq!(f.audit(Action::SecretRead).len(), 2);
    let refused = f
        .domain
        .read_secrets(&f.web, vec!["hidden".into(), "missing".into()], None)
        .await
        .err()
        .unwrap();
    assert!(matches!(refused, crate::error::Error::PermissionDenied(_)));
    let text = refused.to_string();
    assert!(
        text.contains("no such secret, or no group grants it"),
        "{text}"
    );
    let denied: Vec<_> = f
        .audit(Action::SecretRead)
        .into_iter()
        .filter(|e| !e.allowed)
        .map(|e| e.secret.unwrap())
        .collect();
    assert_eq!(denied, ["hidden", "missing"]);
}

#[tokio::test]
async fn a_page_past_the_last_name_is_empty_and_reads_nothing() {
    let f = fixture().await;
    f.granted(&["a", "b"]).await;
    for names in [vec![], vec!["a".to_string()]] {
        let page = f
            .domain
            .read_secrets(&f.web, names, Some("b".into()))
            .await
            .unwrap();
        assert!(page.secrets.is_empty(), "{:?}", page.next_after);
        assert!(page.next_after.is_none());
    }
    assert!(f.audit(Action::SecretRead).is_empty());
}

#[tokio::test]
async fn a_membership_change_that_changes_nothing_is_not_announced() {
    let f = fixture().await;
    f.granted(&["a"]).await;
    let mut feed = f.store.feed().subscribe();
    for (member, change) in [
        (Member::Client("web".into()), Membership::Add),
        (Member::Secret("a".into()), Membership::Add),
        (Member::Client("admin".into()), Membership::Remove),
    ] {
        f.domain
            .set_member(&f.admin, "g".into(), member, change)
            .await
            .unwrap();
    }
    assert_eq!(
        feed.try_recv(),
        Err(tokio::sync::broadcast::error::TryRecvError::Empty)
    );
    f.domain
        .set_member(
            &f.admin,
            "g".into(),
            Member::Client("web".into()),
            Membership::Remove,
        )
        .await
        .unwrap();
    assert!(matches!(feed.try_recv(), Ok(Change::Access { .. })));
}

#[tokio::test]
async fn a_failed_integrity_check_is_audited_on_every_read_path() {
    let f = fixture().await;
    f.granted(&["a"]).await;
    f.store
        .tamper
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let read = f.domain.read_secrets(&f.web, vec![], None).await;
    assert!(matches!(read, Err(crate::error::Error::Integrity { .. })));
    let mut watcher = f.domain.watch(f.web.clone(), Held::new());
    assert!(matches!(
        watcher.next().await,
        Err(crate::error::Error::Integrity { .. })
    ));
    let failures: Vec<_> = f
        .audit(Action::SecretRead)
        .into_iter()
        .filter(|e| e.detail == "integrity check failed")
        .map(|e| (e.allowed, e.version))
        .collect();
    assert_eq!(failures, [(false, Some(1)), (false, Some(1))]);
}

#[tokio::test]
async fn a_metadata_update_reaches_watchers_without_content() {
    let f = fixture().await;
    f.granted(&["a", "b"]).await;
    let mut w = f.domain.watch(f.web.clone(), Held::new());
    let first = event(w.next().await.unwrap());
    assert_eq!(first.upserts.len(), 2);
    let update = SecretUpdate {
        mode: Some(0o440),
        owner: Some(Some(1234)),
        ..Default::default()
    };
    f.domain
        .update_secret(&f.admin, "b".into(), update, false)
        .await
        .unwrap();
    let changed = event(w.next().await.unwrap());
    assert!(
        changed.upserts.is_empty(),
        "no content for a metadata change"
    );
    assert!(changed.removals.is_empty());
    let metas: Vec<_> = changed
        .meta_updates
        .iter()
        .map(|r| (r.name.as_str(), r.mode, r.owner, r.current_version))
        .collect();
    assert_eq!(metas, [("b", 0o440, Some(1234), 1)]);
    // A reconnect that says it holds the old metadata gets it again; one
    // that holds the new metadata gets nothing.
    let a = f.store.get_secret("a").unwrap();
    let b = f.store.get_secret("b").unwrap();
    let held = |digest_b: u64| {
        watch::held(
            vec![
                ("a".to_owned(), a.id, 1, a.meta_digest()),
                ("b".to_owned(), b.id, 1, digest_b),
            ]
            .into_iter(),
        )
        .unwrap()
    };
    let mut stale = f.domain.watch(f.web.clone(), held(0));
    let again = event(stale.next().await.unwrap());
    assert!(again.upserts.is_empty());
    assert_eq!(again.meta_updates.len(), 1);
    assert_eq!(again.meta_updates[0].name, "b");
    let mut fresh = f.domain.watch(f.web.clone(), held(b.meta_digest()));
    let nothing = event(fresh.next().await.unwrap());
    assert!(nothing.upserts.is_empty() && nothing.meta_updates.is_empty());
    // Only the first sync's content was read.
    assert_eq!(f.audit(Action::SecretRead).len(), 2);
    let updates = f.audit(Action::SecretUpdate);
    assert_eq!(updates.len(), 1);
    assert_eq!(
        updates[0].detail,
        "mode default -> 0440, owner default -> 1234"
    );
    // Nothing to change is refused before the store is asked.
    let empty = f
        .domain
        .update_secret(&f.admin, "b".into(), SecretUpdate::default(), false)
        .await;
    assert!(empty.unwrap_err().to_string().contains("nothing to update"));
}

#[tokio::test]
async fn past_expiries_are_refused_unless_allowed() {
    let f = fixture().await;
    let mut past = secret("old", b"x");
    past.meta.expires_at = Some(1_000_000);
    let err = f
        .domain
        .create_secret(&f.admin, past)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("in the past") && err.contains("--force"),
        "{err}"
    );
    let mut forced = secret("old", b"x");
    forced.meta.expires_at = Some(1_000_000);
    forced.allow_past_expiry = true;
    f.domain.create_secret(&f.admin, forced).await.unwrap();
    let rotate = |expires, allow| {
        f.domain.rotate_secret(
            &f.admin,
            "old".into(),
            Plaintext::new(b"y".to_vec()),
            expires,
            allow,
        )
    };
    assert!(rotate(Some(Some(2_000_000)), false).await.is_err());
    assert_eq!(
        rotate(Some(Some(2_000_000)), true)
            .await
            .unwrap()
            .expires_at,
        Some(2_000_000)
    );
    let update = |t| SecretUpdate {
        expires_at: Some(Some(t)),
        ..Default::default()
    };
    assert!(f
        .domain
        .update_secret(&f.admin, "old".into(), update(5), false)
        .await
        .is_err());
    let future = now_s() + 3600;
    let r = f
        .domain
        .update_secret(&f.admin, "old".into(), update(future), false)
        .await
        .unwrap();
    assert_eq!(r.expires_at, Some(future));
}

#[tokio::test]
async fn a_watcher_gets_its_view_then_exactly_what_changes() {
    let f = fixture().await;
    f.granted(&["a", "b"]).await;
    let mut w = f.domain.watch(f.web.clone(), Held::new());
    let first = event(w.next().await.unwrap());
    assert!(first.initial);
    assert_eq!(
        names(&first),
        [("a".into(), b"a".to_vec()), ("b".into(), b"b".to_vec())]
    );
    // A secret the watcher does not hold changes nothing for it; the next
    // event is the rotation of one it holds.
    f.domain
        .create_secret(&f.admin, secret("other", b"o"))
        .await
        .unwrap();
    f.domain
        .rotate_secret(
            &f.admin,
            "other".into(),
            Plaintext::new(b"o2".to_vec()),
            None,
            false,
        )
        .await
        .unwrap();
    f.domain
        .rotate_secret(
            &f.admin,
            "b".into(),
            Plaintext::new(b"b2".to_vec()),
            None,
            false,
        )
        .await
        .unwrap();
    let rotated = event(w.next().await.unwrap());
    assert!(!rotated.initial);
    assert_eq!(names(&rotated), [("b".into(), b"b2".to_vec())]);
    assert_eq!(rotated.revision, f.store.revision().unwrap());
    // Revoking and deleting remove.
    f.domain
        .set_member(
            &f.admin,
            "g".into(),
            Member::Secret("a".into()),
            Membership::Remove,
        )
        .await
        .unwrap();
    let revoked = event(w.next().await.unwrap());
    assert_eq!(
        (revoked.upserts.len(), revoked.removals.clone()),
        (0, vec!["a".to_owned()])
    );
    f.domain.delete_secret(&f.admin, "b".into()).await.unwrap();
    let deleted = event(w.next().await.unwrap());
    assert_eq!(deleted.removals, ["b"]);
    // Each content handed out was audited as a watch read.
    let reads: Vec<_> = f
        .audit(Action::SecretRead)
        .into_iter()
        .map(|e| (e.secret.unwrap(), e.version.unwrap(), e.detail))
        .collect();
    assert_eq!(
        reads,
        [
            ("a".into(), 1, "watch".into()),
            ("b".into(), 1, "watch".into()),
            ("b".into(), 2, "watch".into())
        ]
    );
    // Shutting down ends the watch.
    f.domain.close();
    assert!(matches!(w.next().await.unwrap(), Next::ShuttingDown));
}

#[tokio::test]
async fn a_removed_client_is_refused_at_once_and_its_watch_ends() {
    let f = fixture().await;
    f.granted(&["a"]).await;
    let mut w = f.domain.watch(f.web.clone(), Held::new());
    event(w.next().await.unwrap());
    // Cached now: the next authentication does not ask the store.
    f.domain
        .authenticate(peer("web", "serial-web"))
        .await
        .unwrap();
    f.domain
        .remove_client(&f.admin, "web".into())
        .await
        .unwrap();
    let refused = f.domain.authenticate(peer("web", "serial-web")).await;
    assert!(matches!(
        refused,
        Err(crate::error::Error::Unauthenticated(_))
    ));
    let ended = w.next().await.err().unwrap();
    assert!(ended.to_string().contains("was removed"), "{ended}");
    let auth = f.audit(Action::Auth);
    assert_eq!(auth.len(), 1);
    assert!(
        auth[0]
            .detail
            .starts_with("certificate of a removed client"),
        "{}",
        auth[0].detail
    );
    // An admin cannot remove itself.
    assert!(f
        .domain
        .remove_client(&f.admin, "admin".into())
        .await
        .is_err());
}

#[tokio::test]
async fn operator_calls_need_the_admin_role_and_refusals_are_audited() {
    let f = fixture().await;
    let refused = f
        .domain
        .authenticate_admin(peer("web", "serial-web"), Action::SecretList)
        .await;
    assert!(matches!(
        refused,
        Err(crate::error::Error::PermissionDenied(_))
    ));
    let all = f.store.query_audit(&AuditFilter::default()).unwrap();
    let last = all.last().unwrap();
    assert_eq!(
        (last.action.as_str(), last.actor.as_str(), last.allowed),
        ("admin.secret.list", "web", false)
    );
    f.domain
        .authenticate_admin(peer("admin", "serial-admin"), Action::SecretList)
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_input_is_refused_before_the_store_is_touched() {
    let f = fixture().await;
    let before = f.store.revision().unwrap();
    let too_big = CreateSecret {
        content: Plaintext::new(vec![0; 2048]),
        ..secret("big", b"")
    };
    assert!(matches!(
        f.domain.create_secret(&f.admin, too_big).await,
        Err(crate::error::Error::TooLarge {
            size: 2048,
            max: 1024
        })
    ));
    let mut bad_mode = secret("m", b"x");
    bad_mode.meta.mode = 0o4755;
    assert!(f.domain.create_secret(&f.admin, bad_mode).await.is_err());
    assert!(f
        .domain
        .create_secret(&f.admin, secret("../etc", b"x"))
        .await
        .is_err());
    assert_eq!(f.store.revision().unwrap(), before);
    // Store errors keep their user-facing text.
    let missing = f.domain.describe_secret("nope".into()).await.err().unwrap();
    assert!(
        missing.to_string().contains("`secretfs secret list`"),
        "{missing}"
    );
}

#[tokio::test]
async fn a_renewal_does_not_pin_a_certificate_to_a_client_removed_and_re_added_since() {
    let f = fixture().await;
    let d = &f.domain;
    // `web` authenticated (f.web); before its renewal runs, an admin
    // removes it and adds a new client of the same name.
    d.remove_client(&f.admin, "web".into()).await.unwrap();
    let (_key, csr) = crate::pki::new_csr("web").unwrap();
    let (added, _) = d
        .create_client(
            &f.admin,
            super::admin::CreateClient {
                name: "web".into(),
                admin: false,
                csr_pem: Some(csr.clone()),
                days: 0,
            },
        )
        .await
        .unwrap();
    let renewed = d.renew_client(&f.web, "web".into(), csr, 0).await;
    assert!(renewed.is_err(), "the old caller's renewal must be refused");
    let new_web = f.store.get_client("web").unwrap();
    assert_eq!(
        new_web.cert_serial, added.cert_serial,
        "no certificate pinned to the new client"
    );
}

#[test]
fn a_presented_lifetime_is_whole_days_rounded_up_without_the_issue_slack() {
    use super::admin::presented_days;
    let slack = crate::pki::NOT_BEFORE_SLACK_S;
    // What pki issues for --days 30: valid from 5 minutes before issue.
    assert_eq!(presented_days(1000 - slack, 1000 + 30 * 86_400), 30);
    assert_eq!(presented_days(0, 30 * 86_400 + slack + 1), 31, "rounded up");
    assert_eq!(presented_days(0, 60), 1, "at least a day");
    assert_eq!(presented_days(100, 0), 1, "even backwards");
    assert_eq!(presented_days(i64::MIN, i64::MAX), u32::MAX);
}

#[tokio::test]
async fn a_bad_row_is_absent_logged_and_audited_once() {
    let f = fixture().await;
    f.granted(&["a", "b"]).await;
    f.store
        .inner
        .execute_raw("UPDATE secrets SET mode = 511 WHERE name = 'b'");
    for _ in 0..3 {
        let mine = f.domain.my_secrets(&f.web).await.unwrap();
        assert_eq!(
            mine.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
    }
    let refused = f
        .domain
        .read_secrets(&f.web, vec!["b".into()], None)
        .await
        .err()
        .unwrap();
    assert!(matches!(refused, crate::error::Error::PermissionDenied(_)));
    let bad = f.audit(Action::IntegrityBadRow);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].actor, "store");
    assert!(!bad[0].allowed);
    assert!(
        bad[0].detail.starts_with("secrets row id="),
        "{}",
        bad[0].detail
    );
    assert!(
        bad[0].detail.contains("Restore the database"),
        "{}",
        bad[0].detail
    );
}

#[tokio::test]
async fn a_row_set_mismatch_is_audited_once_and_serving_goes_on() {
    let f = fixture().await;
    f.granted(&["a", "b"]).await;
    f.domain.check_row_set().await;
    assert!(f.audit(Action::IntegritySetMismatch).is_empty(), "clean");
    // A grant row deleted behind the server's back: no bad row, but the
    // row set no longer agrees.
    f.store.inner.execute_raw("DELETE FROM group_secrets");
    for _ in 0..3 {
        f.domain.check_row_set().await;
    }
    let found = f.audit(Action::IntegritySetMismatch);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].actor, "store");
    assert!(!found[0].allowed);
    assert!(
        found[0]
            .detail
            .contains("put back, deleted or added without the key"),
        "{}",
        found[0].detail
    );
    // Still serving (every row answers for itself).
    assert!(f.domain.my_secrets(&f.web).await.unwrap().is_empty());
    assert!(f.audit(Action::IntegrityBadRow).is_empty());
}

/// Another replica removes a client: the change arrives on the store's
/// feed only (never through this domain's `committed`), and the cached
/// authentication must go with it.
#[tokio::test]
async fn a_change_from_another_replica_reaches_the_auth_cache() {
    let f = fixture().await;
    // Cached now.
    f.domain
        .authenticate(peer("web", "serial-web"))
        .await
        .unwrap();
    let revision = f
        .store
        .remove_client("web", &Action::ClientRemove.by("replica-b"))
        .unwrap()
        .revision;
    f.store.feed().publish(Change::ClientRemoved { revision });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let r = f.domain.authenticate(peer("web", "serial-web")).await;
        if matches!(r, Err(crate::error::Error::Unauthenticated(_))) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still authenticated 5 s after another replica removed the client"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

impl Fixture {
    /// Adds a client without the admin role and authenticates it.
    async fn client(&self, name: &str) -> Caller {
        let serial = format!("serial-{name}");
        self.store
            .create_client(
                &NewClient {
                    name: name.into(),
                    admin: false,
                    cert: Some((serial.clone(), i64::MAX)),
                },
                &Action::ClientCreate.by("test"),
            )
            .unwrap();
        self.domain.authenticate(peer(name, &serial)).await.unwrap()
    }

    async fn rotate(&self, name: &str, content: &[u8]) {
        self.domain
            .rotate_secret(
                &self.admin,
                name.into(),
                Plaintext::new(content.to_vec()),
                None,
                false,
            )
            .await
            .unwrap();
    }

    /// Waits (bounded) until `n` reads came to the shut gate.
    async fn at_gate(&self, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.store.at_gate.load(SeqCst) != n {
            assert!(
                std::time::Instant::now() < deadline,
                "{} reads came to the gate, not {n}",
                self.store.at_gate.load(SeqCst)
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Waits (bounded) until `n` watchers wait on shared reads.
    async fn riders(&self, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.domain.flights.riders() != n {
            assert!(
                std::time::Instant::now() < deadline,
                "{} watchers joined shared reads, not {n}",
                self.domain.flights.riders()
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
}

/// Runs `w.next()` in a task of its own (as each Watch stream does).
fn next_in_task(
    mut w: Watcher,
) -> tokio::task::JoinHandle<(Watcher, std::result::Result<Next, crate::error::Error>)> {
    tokio::spawn(async move {
        let next = w.next().await;
        (w, next)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_of_one_client_share_one_read_and_one_audit_append_per_change() {
    const N: usize = 8;
    let f = fixture().await;
    f.granted(&["a"]).await;
    let mut watchers = Vec::new();
    for _ in 0..N {
        let mut w = f.domain.watch(f.web.clone(), Held::new());
        assert_eq!(names(&event(w.next().await.unwrap())).len(), 1);
        watchers.push(w);
    }
    // Every watcher wakes for the rotation and asks for the new version
    // while the first read is held: all of them join it.
    f.store.gate_shut.store(true, SeqCst);
    f.rotate("a", b"a2").await;
    let tasks: Vec<_> = watchers.into_iter().map(next_in_task).collect();
    f.riders(N).await;
    let (reads, appends) = (f.store.reads_one.load(SeqCst), f.store.appends.load(SeqCst));
    f.store.gate_shut.store(false, SeqCst);
    for t in tasks {
        let (_, next) = t.await.unwrap();
        let delta = event(next.unwrap());
        assert_eq!(names(&delta), [("a".into(), b"a2".to_vec())]);
    }
    assert_eq!(
        f.store.reads_one.load(SeqCst) - reads,
        1,
        "one read for {N} watchers"
    );
    assert_eq!(
        f.store.appends.load(SeqCst) - appends,
        1,
        "one audit append"
    );
    // Still one audit entry per watcher's read, each before its bytes.
    let v2: Vec<_> = f
        .audit(Action::SecretRead)
        .into_iter()
        .filter(|e| e.version == Some(2))
        .map(|e| (e.actor, e.detail))
        .collect();
    assert_eq!(v2, vec![("web".to_owned(), "watch".to_owned()); N]);
    assert_eq!(f.domain.flights.riders(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_whose_grant_went_gets_nothing_while_another_client_reads_the_same_change() {
    let f = fixture().await;
    f.granted(&["a"]).await;
    let other = f.client("other").await;
    // "other" reads "a" through a group of its own.
    let d = &f.domain;
    d.create_group(&f.admin, "g2".into(), String::new())
        .await
        .unwrap();
    for m in [Member::Client("other".into()), Member::Secret("a".into())] {
        d.set_member(&f.admin, "g2".into(), m, Membership::Add)
            .await
            .unwrap();
    }
    let mut web_w = d.watch(f.web.clone(), Held::new());
    let mut other_w = d.watch(other.clone(), Held::new());
    for w in [&mut web_w, &mut other_w] {
        assert_eq!(names(&event(w.next().await.unwrap())).len(), 1);
    }
    // Both wake for the rotation and wait on their reads; then "other"
    // loses its grant before either read is made.
    f.store.gate_shut.store(true, SeqCst);
    f.rotate("a", b"a2").await;
    let web_t = next_in_task(web_w);
    let other_t = next_in_task(other_w);
    f.riders(2).await;
    d.set_member(
        &f.admin,
        "g2".into(),
        Member::Client("other".into()),
        Membership::Remove,
    )
    .await
    .unwrap();
    f.store.gate_shut.store(false, SeqCst);
    let web_delta = event(web_t.await.unwrap().1.unwrap());
    assert_eq!(names(&web_delta), [("a".into(), b"a2".to_vec())]);
    let (mut other_w, next) = other_t.await.unwrap();
    let other_delta = event(next.unwrap());
    assert!(other_delta.upserts.is_empty(), "no content without a grant");
    assert_eq!(other_delta.removals, ["a"]);
    // No read of version 2 was audited for it; a later rotation is none
    // of its business, and its stream goes on until shutdown.
    f.rotate("a", b"a3").await;
    let web_reads: Vec<_> = f
        .audit(Action::SecretRead)
        .into_iter()
        .filter(|e| e.version == Some(2))
        .map(|e| e.actor)
        .collect();
    assert_eq!(web_reads, ["web"]);
    d.close();
    assert!(matches!(other_w.next().await.unwrap(), Next::ShuttingDown));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_gone_mid_read_leaves_the_others_answered_and_is_not_audited() {
    let f = fixture().await;
    f.granted(&["a"]).await;
    let mut watchers = Vec::new();
    for _ in 0..3 {
        let mut w = f.domain.watch(f.web.clone(), Held::new());
        event(w.next().await.unwrap());
        watchers.push(w);
    }
    f.store.gate_shut.store(true, SeqCst);
    f.rotate("a", b"a2").await;
    // The first to ask starts the read, then goes away (its client hung
    // up) before the read is made.
    let mut rest = watchers.into_iter();
    let first = next_in_task(rest.next().unwrap());
    f.riders(1).await;
    let others: Vec<_> = rest.map(next_in_task).collect();
    f.riders(3).await;
    first.abort();
    assert!(first.await.is_err_and(|e| e.is_cancelled()));
    f.store.gate_shut.store(false, SeqCst);
    for t in others {
        let delta = event(t.await.unwrap().1.unwrap());
        assert_eq!(names(&delta), [("a".into(), b"a2".to_vec())]);
    }
    let v2 = f
        .audit(Action::SecretRead)
        .into_iter()
        .filter(|e| e.version == Some(2))
        .count();
    assert_eq!(v2, 2, "a read handed to no one is not audited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_of_one_client_share_the_recompute_after_a_grant_change() {
    const N: usize = 6;
    let f = fixture().await;
    f.granted(&["a"]).await;
    let mut watchers = Vec::new();
    for _ in 0..N {
        let mut w = f.domain.watch(f.web.clone(), Held::new());
        event(w.next().await.unwrap());
        watchers.push(w);
    }
    f.store.gate_shut.store(true, SeqCst);
    f.granted(&["b"]).await;
    let tasks: Vec<_> = watchers.into_iter().map(next_in_task).collect();
    f.riders(N).await;
    let count = |c: &std::sync::atomic::AtomicUsize| c.load(SeqCst);
    let before = [
        count(&f.store.views),
        count(&f.store.sealed),
        count(&f.store.appends),
    ];
    f.store.gate_shut.store(false, SeqCst);
    let mut watchers = Vec::new();
    for t in tasks {
        let (w, next) = t.await.unwrap();
        let delta = event(next.unwrap());
        assert_eq!(names(&delta), [("b".into(), b"b".to_vec())]);
        assert!(delta.removals.is_empty());
        watchers.push(w);
    }
    let after = [
        count(&f.store.views),
        count(&f.store.sealed),
        count(&f.store.appends),
    ];
    assert_eq!(
        after
            .iter()
            .zip(before)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>(),
        [1, 1, 1],
        "one view read, one content read, one audit append for {N} watchers"
    );
    let b_reads = f
        .audit(Action::SecretRead)
        .into_iter()
        .filter(|e| e.secret.as_deref() == Some("b"))
        .count();
    assert_eq!(b_reads, N, "one audit entry per watcher");
    // A removed client's watchers all end, each with its own error.
    f.domain
        .remove_client(&f.admin, "web".into())
        .await
        .unwrap();
    let tasks: Vec<_> = watchers.into_iter().map(next_in_task).collect();
    for t in tasks {
        let (_, next) = t.await.unwrap();
        let Err(e) = next else {
            panic!("the watch of a removed client went on")
        };
        assert!(e.to_string().contains("was removed"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_grant_went_gets_nothing_from_another_clients_shared_recompute() {
    let f = fixture().await;
    f.granted(&["a"]).await;
    let other = f.client("other").await;
    let d = &f.domain;
    d.create_group(&f.admin, "g2".into(), String::new())
        .await
        .unwrap();
    for m in [Member::Client("other".into()), Member::Secret("a".into())] {
        d.set_member(&f.admin, "g2".into(), m, Membership::Add)
            .await
            .unwrap();
    }
    let mut watchers = vec![
        d.watch(f.web.clone(), Held::new()),
        d.watch(f.web.clone(), Held::new()),
        d.watch(other.clone(), Held::new()),
    ];
    for w in &mut watchers {
        assert_eq!(names(&event(w.next().await.unwrap())).len(), 1);
    }
    // "b" is granted to web's group; all three recompute, and "other"
    // loses "a" before any view is read.
    f.store.gate_shut.store(true, SeqCst);
    f.granted(&["b"]).await;
    let tasks: Vec<_> = watchers.into_iter().map(next_in_task).collect();
    f.riders(3).await;
    d.set_member(
        &f.admin,
        "g2".into(),
        Member::Client("other".into()),
        Membership::Remove,
    )
    .await
    .unwrap();
    f.store.gate_shut.store(false, SeqCst);
    let mut deltas: Vec<Delta> = Vec::new();
    for t in tasks {
        deltas.push(event(t.await.unwrap().1.unwrap()));
    }
    for web in &deltas[..2] {
        assert_eq!(names(web), [("b".into(), b"b".to_vec())]);
    }
    assert!(deltas[2].upserts.is_empty(), "no content without a grant");
    assert_eq!(deltas[2].removals, ["a"]);
    let others_reads = f
        .audit(Action::SecretRead)
        .into_iter()
        .filter(|e| e.actor == "other")
        .count();
    assert_eq!(others_reads, 1, "only its first view's \"a\"");
}

/// A Resync's revision is not one change's (a gap, a reconnect, a restored
/// database): a watcher told of one must not be answered by a shared read
/// that began before it, keyed by the same number. It reads alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_told_of_a_resync_reads_alone_not_from_a_read_already_under_way() {
    let f = fixture().await;
    f.granted(&["a"]).await;
    let mut first = f.domain.watch(f.web.clone(), Held::new());
    event(first.next().await.unwrap());
    let mut second = f.domain.watch(f.web.clone(), Held::new());
    event(second.next().await.unwrap());
    f.store.gate_shut.store(true, SeqCst);
    f.granted(&["b"]).await;
    // The first starts the shared recompute, held at the gate.
    let first = next_in_task(first);
    f.riders(1).await;
    f.at_gate(1).await;
    // Something was missed, as the feed says after the grant.
    let revision = f.store.revision().unwrap();
    f.store.feed().publish(Change::Resync { revision });
    let second = next_in_task(second);
    // It reads on its own (a second read at the gate), not as a rider.
    f.at_gate(2).await;
    assert_eq!(f.domain.flights.riders(), 1);
    f.store.gate_shut.store(false, SeqCst);
    for t in [first, second] {
        let delta = event(t.await.unwrap().1.unwrap());
        assert_eq!(names(&delta), [("b".into(), b"b".to_vec())]);
    }
}
