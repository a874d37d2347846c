//! What every [`Store`] must do, as tests that run against any backend:
//! each backend's tests call [`run`] with a way to make an empty store.

use std::sync::Arc;

use super::*;

/// Makes a fresh, empty store.
pub type Make<'a> = &'a dyn Fn() -> Box<dyn Store>;

/// One conformance test, by name.
type Test = (&'static str, fn(&dyn Store));

pub fn run(make: Make<'_>) {
    let tests: [Test; 13] = [
        ("secret_lifecycle", secret_lifecycle),
        ("access_through_groups", access_through_groups),
        ("listing_clients_and_groups", listing_clients_and_groups),
        ("authentication_facts", authentication_facts),
        (
            "audit_is_written_with_changes_and_filtered",
            audit_is_written_with_changes_and_filtered,
        ),
        (
            "every_change_bumps_the_revision_and_returns_it",
            every_change_bumps_the_revision_and_returns_it,
        ),
        ("meta_round_trips", meta_round_trips),
        (
            "metadata_updates_without_a_version",
            metadata_updates_without_a_version,
        ),
        (
            "rotation_sets_or_clears_the_expiry",
            rotation_sets_or_clears_the_expiry,
        ),
        (
            "file_and_directory_names_conflict",
            file_and_directory_names_conflict,
        ),
        (
            "audit_filters_by_action_outcome_and_cursor",
            audit_filters_by_action_outcome_and_cursor,
        ),
        (
            "removals_record_what_was_removed",
            removals_record_what_was_removed,
        ),
        (
            "every_audit_entry_is_chained_and_the_head_follows",
            every_audit_entry_is_chained_and_the_head_follows,
        ),
    ];
    for (name, test) in tests {
        let s = make();
        test(s.as_ref());
        // Every write path kept every row good and the row set right.
        assert_eq!(s.verify_rows().unwrap(), vec![], "{name}: verify_rows");
        assert_eq!(s.check_row_set().unwrap(), None, "{name}: check_row_set");
    }
}

fn sealed(tag: u8) -> Sealed {
    Sealed {
        wrapped_key: vec![tag; 60],
        ciphertext: vec![tag; 40],
    }
}

pub fn entry(action: &str) -> AuditEntry {
    AuditEntry {
        actor: "admin".into(),
        action: action.into(),
        allowed: true,
        ..Default::default()
    }
}

fn add(store: &dyn Store, name: &str) -> SecretRecord {
    let new = NewSecret {
        name: name.into(),
        size: 3,
        ..NewSecret::default()
    };
    store
        .create_secret(
            &new,
            &AuditEntry {
                secret: Some(name.into()),
                ..entry("secret.create")
            },
            &mut |_, _| Ok(sealed(1)),
        )
        .unwrap()
        .value
}

fn client(store: &dyn Store, name: &str) -> ClientRecord {
    store
        .create_client(
            &NewClient {
                name: name.into(),
                admin: false,
                cert: Some((format!("serial-{name}"), 99)),
            },
            &entry("client.create"),
        )
        .unwrap()
        .value
}

fn boom() -> StoreError {
    StoreError::Seal("boom".into())
}

fn secret_lifecycle(s: &dyn Store) {
    let entry = |action: &str| AuditEntry {
        secret: Some("db/pw".into()),
        ..entry(action)
    };
    let rec = add(s, "db/pw");
    assert_eq!(
        (rec.current_version, rec.version_count, rec.size),
        (1, 1, 3)
    );
    assert!(matches!(
        s.create_secret(
            &NewSecret {
                name: "db/pw".into(),
                ..Default::default()
            },
            &entry("secret.create"),
            &mut |_, _| Ok(sealed(1))
        ),
        Err(StoreError::AlreadyExists {
            kind: Entity::Secret,
            ..
        })
    ));
    let mut seen = None;
    let rot = s
        .rotate_secret("db/pw", 5, None, &entry("secret.rotate"), &mut |id, v| {
            seen = Some((id, v));
            Ok(sealed(2))
        })
        .unwrap()
        .value;
    assert_eq!(seen, Some((rec.id, 2)));
    assert_eq!((rot.current_version, rot.size), (2, 5));
    let back = s
        .rollback_secret("db/pw", 1, &entry("secret.rollback"))
        .unwrap()
        .value;
    assert_eq!(
        (back.current_version, back.version_count, back.size),
        (1, 2, 3)
    );
    assert!(matches!(
        s.rollback_secret("db/pw", 9, &entry("secret.rollback")),
        Err(StoreError::NoSuchVersion { version: 9, .. })
    ));
    let versions = s.list_versions("db/pw").unwrap();
    assert_eq!(
        versions
            .iter()
            .map(|v| (v.version, v.current, v.created_by.as_str()))
            .collect::<Vec<_>>(),
        [(1, true, "admin"), (2, false, "admin")]
    );
    // A failed seal writes nothing.
    assert!(matches!(
        s.rotate_secret("db/pw", 1, None, &entry("secret.rotate"), &mut |_, _| Err(
            boom()
        )),
        Err(StoreError::Seal(_))
    ));
    assert_eq!(s.get_secret("db/pw").unwrap().version_count, 2);
    // The audit entries carry the versions the store allocated.
    let audit = s
        .query_audit(&AuditFilter {
            secret: Some("db/pw".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        audit
            .iter()
            .map(|e| (e.action.as_str(), e.version, e.detail.as_str()))
            .collect::<Vec<_>>(),
        [
            ("secret.create", Some(1), ""),
            ("secret.rotate", Some(2), ""),
            ("secret.rollback", Some(1), "from version 2"),
        ]
    );
    let deleted = s.delete_secret("db/pw", &entry("secret.delete")).unwrap();
    assert_eq!(deleted.value, rec.id);
    assert!(matches!(
        s.get_secret("db/pw"),
        Err(StoreError::NotFound {
            kind: Entity::Secret,
            ..
        })
    ));
    assert!(matches!(
        s.delete_secret("db/pw", &entry("secret.delete")),
        Err(StoreError::NotFound { .. })
    ));
    // Ids are not reused after a delete: the id is part of every
    // ciphertext's associated data.
    assert!(add(s, "db/pw").id > rec.id);
}

fn access_through_groups(s: &dyn Store) {
    add(s, "a");
    add(s, "b");
    add(s, "c");
    let web = client(s, "web");
    let other = client(s, "other");
    s.create_group("g1", "", &entry("group.create")).unwrap();
    s.create_group("g2", "", &entry("group.create")).unwrap();
    let e = entry("group.add-client");
    s.set_group_member("g1", &Member::Client("web".to_owned()), true, &e)
        .unwrap();
    s.set_group_member("g2", &Member::Client("web".to_owned()), true, &e)
        .unwrap();
    let e = entry("group.add-secret");
    s.set_group_member("g1", &Member::Secret("a".to_owned()), true, &e)
        .unwrap();
    s.set_group_member("g2", &Member::Secret("a".to_owned()), true, &e)
        .unwrap();
    let g2 = s
        .set_group_member("g2", &Member::Secret("b".to_owned()), true, &e)
        .unwrap()
        .value
        .group;
    assert_eq!(
        (g2.clients, g2.secrets),
        (vec!["web".into()], vec!["a".into(), "b".into()])
    );
    let view = s.client_view(web.id).unwrap();
    assert_eq!(view.revision, s.revision().unwrap());
    let names: Vec<_> = view.secrets.into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(s.client_view(other.id).unwrap().secrets.is_empty());
    let access = s.client_access("web").unwrap();
    assert_eq!(
        access[0],
        AccessRecord {
            secret: "a".into(),
            groups: vec!["g1".into(), "g2".into()]
        }
    );
    assert!(matches!(
        s.client_access("nobody"),
        Err(StoreError::NotFound {
            kind: Entity::Client,
            ..
        })
    ));
    let (ok, denied) = s
        .read_sealed(web.id, &["b".into(), "c".into(), "zz".into()])
        .unwrap();
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].sealed, sealed(1));
    assert_eq!(denied, ["c", "zz"]);
    let (none, denied) = s.read_sealed(web.id, &[]).unwrap();
    assert!(none.is_empty() && denied.is_empty());
    let b = s.get_secret("b").unwrap();
    assert!(s.read_one_for_client(web.id, b.id).unwrap().is_some());
    assert!(s.read_one_for_client(other.id, b.id).unwrap().is_none());
    s.set_group_member(
        "g2",
        &Member::Secret("b".to_owned()),
        false,
        &entry("group.remove-secret"),
    )
    .unwrap();
    assert_eq!(s.client_view(web.id).unwrap().secrets.len(), 1);
    assert!(s.read_one_for_client(web.id, b.id).unwrap().is_none());
    // Unknown members and groups are named.
    assert!(matches!(
        s.set_group_member("g2", &Member::Secret("zz".to_owned()), true, &e),
        Err(StoreError::NotFound {
            kind: Entity::Secret,
            ..
        })
    ));
    assert!(matches!(
        s.set_group_member("nope", &Member::Client("web".to_owned()), true, &e),
        Err(StoreError::NotFound {
            kind: Entity::Group,
            ..
        })
    ));
    s.remove_group("g1", &entry("group.remove")).unwrap();
    s.remove_client("web", &entry("client.remove")).unwrap();
    assert!(matches!(
        s.get_client("web"),
        Err(StoreError::NotFound { .. })
    ));
    assert!(s.client_view(web.id).unwrap().secrets.is_empty());
}

fn listing_clients_and_groups(s: &dyn Store) {
    add(s, "x");
    add(s, "y");
    for c in ["c3", "c1", "c2"] {
        client(s, c);
    }
    s.create_client(
        &NewClient {
            name: "ext".into(),
            admin: true,
            cert: None,
        },
        &entry("client.create"),
    )
    .unwrap();
    for g in ["gb", "ga", "empty"] {
        s.create_group(g, &format!("about {g}"), &entry("group.create"))
            .unwrap();
    }
    assert!(matches!(
        s.create_group("ga", "", &entry("group.create")),
        Err(StoreError::AlreadyExists {
            kind: Entity::Group,
            ..
        })
    ));
    let e = entry("group.add-client");
    s.set_group_member("ga", &Member::Client("c1".to_owned()), true, &e)
        .unwrap();
    s.set_group_member("gb", &Member::Client("c1".to_owned()), true, &e)
        .unwrap();
    assert!(
        s.set_group_member("ga", &Member::Client("c2".to_owned()), true, &e)
            .unwrap()
            .value
            .changed
    );
    s.set_group_member("ga", &Member::Secret("y".to_owned()), true, &e)
        .unwrap();
    s.set_group_member("ga", &Member::Secret("x".to_owned()), true, &e)
        .unwrap();
    // Adding twice changes nothing, and the result and the entry say so.
    assert!(
        !s.set_group_member("ga", &Member::Client("c2".to_owned()), true, &e)
            .unwrap()
            .value
            .changed
    );
    let last = s
        .query_audit(&AuditFilter {
            limit: 1,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(last[0].detail, "no change");
    let clients = s.list_clients().unwrap();
    let summary: Vec<_> = clients
        .iter()
        .map(|c| (c.name.as_str(), c.groups.clone(), c.pinned, c.admin))
        .collect();
    assert_eq!(
        summary,
        [
            ("c1", vec!["ga".to_owned(), "gb".to_owned()], true, false),
            ("c2", vec!["ga".to_owned()], true, false),
            ("c3", vec![], true, false),
            ("ext", vec![], false, true),
        ]
    );
    assert_eq!(clients[0].cert_serial.as_deref(), Some("serial-c1"));
    assert_eq!(clients[0].cert_not_after, Some(99));
    assert_eq!(clients[3].cert_serial, None);
    // The list agrees with the single lookups.
    for c in &clients {
        assert_eq!(&s.get_client(&c.name).unwrap(), c);
    }
    let groups = s.list_groups().unwrap();
    assert_eq!(
        groups
            .iter()
            .map(|g| (g.name.as_str(), g.clients.len(), g.secrets.clone()))
            .collect::<Vec<_>>(),
        [
            ("empty", 0, vec![]),
            ("ga", 2, vec!["x".to_owned(), "y".to_owned()]),
            ("gb", 1, vec![]),
        ]
    );
    for g in &groups {
        assert_eq!(&s.get_group(&g.name).unwrap(), g);
    }
}

fn authentication_facts(s: &dyn Store) {
    let web = client(s, "web");
    let facts = s.authenticate("web", "serial-web").unwrap();
    assert_eq!(facts.client.as_ref().map(|c| c.id), Some(web.id));
    assert!(facts.serial_issued && !facts.serial_revoked);
    let other = s.authenticate("web", "serial-other").unwrap();
    assert!(!other.serial_issued && !other.serial_revoked);
    let nobody = s.authenticate("nobody", "serial-web").unwrap();
    assert!(nobody.client.is_none() && !nobody.serial_issued);
    // A removed client's serials are refused forever, even once a client
    // of the same name exists again.
    s.remove_client("web", &entry("client.remove")).unwrap();
    let gone = s.authenticate("web", "serial-web").unwrap();
    assert!(gone.client.is_none() && gone.serial_revoked);
    s.create_client(
        &NewClient {
            name: "web".into(),
            admin: false,
            cert: Some(("serial-web-2".into(), 99)),
        },
        &entry("client.create"),
    )
    .unwrap();
    let again = s.authenticate("web", "serial-web").unwrap();
    assert!(again.client.is_some() && !again.serial_issued && again.serial_revoked);
    let again_id = again.client.as_ref().map(|c| c.id).unwrap();
    // Renewal pins a second serial beside the first; both work, groups
    // stay, and removal revokes both.
    s.create_group("g", "", &entry("group.create")).unwrap();
    s.set_group_member(
        "g",
        &Member::Client("web".to_owned()),
        true,
        &entry("group.add-client"),
    )
    .unwrap();
    let renewed = s
        .add_client_cert(again_id, "web", "serial-web-3", 100, &entry("client.renew"))
        .unwrap();
    assert_eq!(renewed.value.cert_serial.as_deref(), Some("serial-web-3"));
    assert_eq!(renewed.value.cert_not_after, Some(100));
    assert_eq!(renewed.value.groups, vec!["g".to_owned()]);
    assert!(s.authenticate("web", "serial-web-2").unwrap().serial_issued);
    assert!(s.authenticate("web", "serial-web-3").unwrap().serial_issued);
    assert!(matches!(
        s.add_client_cert(again_id, "nobody", "serial-x", 1, &entry("client.renew")),
        Err(StoreError::NotFound { .. })
    ));
    // Removed and re-added between authenticate and renew: the old id
    // pins nothing to the new client of the same name.
    assert!(matches!(
        s.add_client_cert(web.id, "web", "serial-x", 1, &entry("client.renew")),
        Err(StoreError::NotFound { .. })
    ));
    assert!(!s.authenticate("web", "serial-x").unwrap().serial_issued);
    // A client registered as external gets no certificate of ours.
    let ext = s
        .create_client(
            &NewClient {
                name: "ext".into(),
                admin: false,
                cert: None,
            },
            &entry("client.create"),
        )
        .unwrap()
        .value;
    assert!(matches!(
        s.add_client_cert(ext.id, "ext", "serial-y", 1, &entry("client.renew")),
        Err(StoreError::External { .. })
    ));
    assert!(!s.authenticate("ext", "serial-y").unwrap().serial_issued);
    s.remove_client("web", &entry("client.remove")).unwrap();
    assert!(
        s.authenticate("web", "serial-web-2")
            .unwrap()
            .serial_revoked
    );
    assert!(
        s.authenticate("web", "serial-web-3")
            .unwrap()
            .serial_revoked
    );
    s.create_client(
        &NewClient {
            name: "web".into(),
            admin: false,
            cert: Some(("serial-web-4".into(), 99)),
        },
        &entry("client.create"),
    )
    .unwrap();
    let again = s.authenticate("web", "serial-web").unwrap();
    assert!(again.client.is_some() && !again.serial_issued && again.serial_revoked);
    assert!(s.authenticate("web", "serial-web-4").unwrap().serial_issued);
}

fn audit_is_written_with_changes_and_filtered(s: &dyn Store) {
    add(s, "x");
    s.create_client(
        &NewClient {
            name: "web".into(),
            admin: false,
            cert: None,
        },
        &AuditEntry {
            client: Some("web".into()),
            ..entry("client.create")
        },
    )
    .unwrap();
    s.append_audit(&[AuditEntry {
        actor: "web".into(),
        action: "secret.read".into(),
        secret: Some("x".into()),
        allowed: false,
        ..Default::default()
    }])
    .unwrap();
    let all = s.query_audit(&AuditFilter::default()).unwrap();
    assert_eq!(
        all.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["secret.create", "client.create", "secret.read"]
    );
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    assert!(all.iter().all(|e| e.at_ms > 0));
    let web = s
        .query_audit(&AuditFilter {
            client: Some("web".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(web.len(), 2);
    let future = s
        .query_audit(&AuditFilter {
            since_ms: Some(now_ms() + 60_000),
            ..Default::default()
        })
        .unwrap();
    assert!(future.is_empty());
    let last = s
        .query_audit(&AuditFilter {
            limit: 1,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(last[0].action, "secret.read");
    // A time given by the caller is kept.
    s.append_audit(&[AuditEntry {
        at_ms: 1234,
        ..entry("auth")
    }])
    .unwrap();
    let mut kept = s
        .query_audit(&AuditFilter {
            limit: 1,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(kept.pop().map(|e| e.at_ms), Some(1234));
}

fn every_change_bumps_the_revision_and_returns_it(s: &dyn Store) {
    let r0 = s.revision().unwrap();
    let created = s
        .create_secret(
            &NewSecret {
                name: "x".into(),
                ..Default::default()
            },
            &entry("secret.create"),
            &mut |_, _| Ok(sealed(1)),
        )
        .unwrap();
    assert_eq!(created.revision, r0 + 1);
    assert_eq!(s.revision().unwrap(), r0 + 1);
    let rotated = s
        .rotate_secret("x", 1, None, &entry("secret.rotate"), &mut |_, _| {
            Ok(sealed(3))
        })
        .unwrap();
    assert_eq!(rotated.revision, r0 + 2);
    let web = s
        .create_client(
            &NewClient {
                name: "web".into(),
                admin: false,
                cert: None,
            },
            &entry("client.create"),
        )
        .unwrap();
    assert_eq!(web.revision, r0 + 3);
    assert_eq!(
        s.create_group("g", "", &entry("group.create"))
            .unwrap()
            .revision,
        r0 + 4
    );
    let joined = s
        .set_group_member(
            "g",
            &Member::Client("web".to_owned()),
            true,
            &entry("group.add-client"),
        )
        .unwrap();
    assert_eq!(joined.revision, r0 + 5);
    // Reads, audit of reads and failed changes leave it alone.
    s.read_sealed(web.value.id, &["x".into()]).unwrap();
    s.append_audit(&[entry("secret.read")]).unwrap();
    assert!(s
        .rotate_secret("missing", 1, None, &entry("secret.rotate"), &mut |_, _| Ok(
            sealed(1)
        ))
        .is_err());
    assert!(s
        .rotate_secret("x", 1, None, &entry("secret.rotate"), &mut |_, _| Err(
            boom()
        ))
        .is_err());
    assert_eq!(s.revision().unwrap(), r0 + 5);
    assert_eq!(s.client_view(web.value.id).unwrap().revision, r0 + 5);
}

fn meta_round_trips(s: &dyn Store) {
    assert_eq!(s.get_meta("k").unwrap(), None);
    s.put_meta("k", b"one").unwrap();
    s.put_meta("k", b"two").unwrap();
    assert_eq!(s.get_meta("k").unwrap().as_deref(), Some(&b"two"[..]));
    assert!(s.concurrency() >= 1);
}

fn no_check(_: &SecretRecord) -> Result<()> {
    Ok(())
}

fn last_audit(s: &dyn Store) -> AuditEntry {
    s.query_audit(&AuditFilter {
        limit: 1,
        ..Default::default()
    })
    .unwrap()
    .pop()
    .unwrap()
}

fn metadata_updates_without_a_version(s: &dyn Store) {
    let before = add(s, "db/pw");
    s.rotate_secret("db/pw", 4, None, &entry("secret.rotate"), &mut |_, _| {
        Ok(sealed(2))
    })
    .unwrap();
    let mut labels = BTreeMap::new();
    labels.insert("env".to_owned(), "prod".to_owned());
    labels.insert("team".to_owned(), "a".to_owned());
    let update = SecretUpdate {
        description: Some("the db".into()),
        set_labels: labels,
        mode: Some(0o440),
        owner: Some(Some(1234)),
        group: Some(Some(55)),
        expires_at: Some(Some(4_000_000_000)),
        ..Default::default()
    };
    let r0 = s.revision().unwrap();
    let done = s
        .update_secret("db/pw", &update, &no_check, &entry("secret.update"))
        .unwrap();
    assert_eq!(done.revision, r0 + 1, "an update is a change");
    let r = done.value;
    assert_eq!((r.current_version, r.version_count, r.size), (2, 2, 4));
    assert_eq!(
        (r.mode, r.owner, r.group, r.expires_at),
        (0o440, Some(1234), Some(55), Some(4_000_000_000))
    );
    assert_eq!(r.description, "the db");
    assert_eq!(r.labels.len(), 2);
    assert_ne!(r.meta_digest(), before.meta_digest());
    assert_eq!(s.get_secret("db/pw").unwrap(), r);
    assert_eq!(s.list_versions("db/pw").unwrap().len(), 2, "no new version");
    let audited = last_audit(s);
    assert_eq!(audited.action, "secret.update");
    assert_eq!(audited.version, Some(2));
    for part in [
        "description",
        "labels +env +team",
        "mode default -> 0440",
        "owner default -> 1234",
        "group default -> 55",
        "expiry none -> 2096-10-02T07:06:40Z",
    ] {
        assert!(audited.detail.contains(part), "{part}: {}", audited.detail);
    }
    // Unset fields are kept; clearing goes back to the mount's default.
    let mut set = BTreeMap::new();
    set.insert("team".to_owned(), "b".to_owned());
    let r = s
        .update_secret(
            "db/pw",
            &SecretUpdate {
                owner: Some(None),
                remove_labels: vec!["env".into()],
                set_labels: set,
                expires_at: Some(None),
                ..Default::default()
            },
            &no_check,
            &entry("secret.update"),
        )
        .unwrap()
        .value;
    assert_eq!(
        (r.mode, r.owner, r.group, r.expires_at),
        (0o440, None, Some(55), None)
    );
    assert_eq!(r.labels.get("team").map(String::as_str), Some("b"));
    assert_eq!(r.labels.len(), 1);
    let detail = last_audit(s).detail;
    assert!(detail.contains("labels -env ~team"), "{detail}");
    assert!(detail.contains("owner 1234 -> default"), "{detail}");
    // The same values again: audited as no change, digest unchanged.
    let same = s
        .update_secret(
            "db/pw",
            &SecretUpdate {
                mode: Some(0o440),
                ..Default::default()
            },
            &no_check,
            &entry("secret.update"),
        )
        .unwrap()
        .value;
    assert_eq!(same.meta_digest(), r.meta_digest());
    assert_eq!(last_audit(s).detail, "no change");
    // A refused check writes nothing; a missing secret is NotFound.
    let r1 = s.revision().unwrap();
    let refuse = |_: &SecretRecord| Err(StoreError::Check("too many labels".into()));
    assert!(matches!(
        s.update_secret(
            "db/pw",
            &SecretUpdate {
                clear_labels: true,
                ..Default::default()
            },
            &refuse,
            &entry("secret.update"),
        ),
        Err(StoreError::Check(_))
    ));
    assert_eq!(s.revision().unwrap(), r1);
    assert_eq!(s.get_secret("db/pw").unwrap().labels.len(), 1);
    assert!(matches!(
        s.update_secret(
            "nope",
            &SecretUpdate {
                mode: Some(0o400),
                ..Default::default()
            },
            &no_check,
            &entry("secret.update"),
        ),
        Err(StoreError::NotFound { .. })
    ));
}

fn rotation_sets_or_clears_the_expiry(s: &dyn Store) {
    let created = s
        .create_secret(
            &NewSecret {
                name: "tok".into(),
                expires_at: Some(1_000),
                ..Default::default()
            },
            &entry("secret.create"),
            &mut |_, _| Ok(sealed(1)),
        )
        .unwrap()
        .value;
    assert_eq!(created.expires_at, Some(1_000));
    let rotate = |expires| {
        s.rotate_secret("tok", 1, expires, &entry("secret.rotate"), &mut |_, _| {
            Ok(sealed(2))
        })
        .unwrap()
        .value
    };
    // Kept when not given, unless it has passed: then it goes with the
    // content it described.
    assert_eq!(rotate(None).expires_at, None);
    assert!(last_audit(s)
        .detail
        .contains("expiry 1970-01-01T00:16:40Z had passed: cleared"));
    assert_eq!(
        rotate(Some(Some(5_000_000_000))).expires_at,
        Some(5_000_000_000)
    );
    assert_eq!(
        rotate(None).expires_at,
        Some(5_000_000_000),
        "a future expiry is kept"
    );
    assert_eq!(rotate(Some(None)).expires_at, None);
    assert_eq!(s.get_secret("tok").unwrap().current_version, 5);
}

fn file_and_directory_names_conflict(s: &dyn Store) {
    let create = |name: &str| {
        s.create_secret(
            &NewSecret {
                name: name.into(),
                ..Default::default()
            },
            &entry("secret.create"),
            &mut |_, _| Ok(sealed(1)),
        )
    };
    create("db").unwrap();
    create("app/db_1/password").unwrap();
    let r0 = s.revision().unwrap();
    for (name, existing) in [
        ("db/password", "db"),
        ("db/a/b", "db"),
        ("app", "app/db_1/password"),
        ("app/db_1", "app/db_1/password"),
    ] {
        match create(name) {
            Err(StoreError::NameConflict {
                name: n,
                existing: e,
            }) => {
                assert_eq!((n.as_str(), e.as_str()), (name, existing))
            }
            other => panic!("{name}: expected a conflict, got {other:?}"),
        }
    }
    assert_eq!(s.revision().unwrap(), r0, "a refused add writes nothing");
    // Prefixes that are not whole segments do not conflict; '_' is no
    // wildcard.
    create("dbx/password").unwrap();
    create("app/db/password").unwrap();
    create("app/dbx1").unwrap();
    create("d").unwrap();
}

fn audit_filters_by_action_outcome_and_cursor(s: &dyn Store) {
    let e = |action: &str, allowed: bool| AuditEntry {
        actor: "a".into(),
        action: action.into(),
        allowed,
        ..Default::default()
    };
    s.append_audit(&[
        e("secret.read", true),
        e("secret.read", false),
        e("auth", false),
        e("secret.rotate", true),
        e("secretx.read", true),
    ])
    .unwrap();
    let q = |f: AuditFilter| {
        s.query_audit(&f)
            .unwrap()
            .into_iter()
            .map(|e| (e.action, e.allowed))
            .collect::<Vec<_>>()
    };
    let r = |a: &str, ok: bool| (a.to_owned(), ok);
    assert_eq!(
        q(AuditFilter {
            action: Some("secret.read".into()),
            ..Default::default()
        }),
        [r("secret.read", true), r("secret.read", false)]
    );
    assert_eq!(
        q(AuditFilter {
            action: Some("secret.*".into()),
            ..Default::default()
        }),
        [
            r("secret.read", true),
            r("secret.read", false),
            r("secret.rotate", true)
        ]
    );
    assert_eq!(
        q(AuditFilter {
            allowed: Some(false),
            ..Default::default()
        }),
        [r("secret.read", false), r("auth", false)]
    );
    assert_eq!(
        q(AuditFilter {
            action: Some("secret.read".into()),
            allowed: Some(true),
            ..Default::default()
        }),
        [r("secret.read", true)]
    );
    // The cursor: the oldest `limit` after it, not the newest.
    let all = s.query_audit(&AuditFilter::default()).unwrap();
    let after = s
        .query_audit(&AuditFilter {
            after_id: Some(all[0].id),
            limit: 2,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        after.iter().map(|e| e.id).collect::<Vec<_>>(),
        [all[1].id, all[2].id]
    );
    let end = s
        .query_audit(&AuditFilter {
            after_id: Some(all.last().unwrap().id),
            ..Default::default()
        })
        .unwrap();
    assert!(end.is_empty());
    // A cursor past any id (it comes from the wire) is past every entry,
    // not wrapped round to a negative id before all of them.
    for after in [i64::MAX as u64 + 1, u64::MAX] {
        let past = s
            .query_audit(&AuditFilter {
                after_id: Some(after),
                ..Default::default()
            })
            .unwrap();
        assert!(past.is_empty(), "after {after}: {past:?}");
    }
}

fn removals_record_what_was_removed(s: &dyn Store) {
    for c in ["c1", "c2"] {
        client(s, c);
    }
    for n in ["s1", "s2", "s3"] {
        add(s, n);
    }
    s.create_group("g", "", &entry("group.create")).unwrap();
    s.create_group("h", "", &entry("group.create")).unwrap();
    for c in ["c1", "c2"] {
        s.set_group_member(
            "g",
            &Member::Client(c.to_owned()),
            true,
            &entry("group.add-client"),
        )
        .unwrap();
    }
    s.set_group_member(
        "h",
        &Member::Client("c1".to_owned()),
        true,
        &entry("group.add-client"),
    )
    .unwrap();
    for n in ["s1", "s2", "s3"] {
        s.set_group_member(
            "g",
            &Member::Secret(n.to_owned()),
            true,
            &entry("group.add-secret"),
        )
        .unwrap();
    }
    s.set_group_member(
        "h",
        &Member::Secret("s1".to_owned()),
        true,
        &entry("group.add-secret"),
    )
    .unwrap();
    s.rotate_secret("s1", 1, None, &entry("secret.rotate"), &mut |_, _| {
        Ok(sealed(2))
    })
    .unwrap();
    s.remove_group("g", &entry("group.remove")).unwrap();
    assert_eq!(
        last_audit(s).detail,
        "removed with 2 clients (c1, c2) and 3 secrets (s1, s2, s3)"
    );
    s.remove_client("c1", &entry("client.remove")).unwrap();
    assert_eq!(last_audit(s).detail, "was in groups h");
    s.remove_client("c2", &entry("client.remove")).unwrap();
    assert_eq!(last_audit(s).detail, "was in no group");
    s.delete_secret("s1", &entry("secret.delete")).unwrap();
    assert_eq!(
        last_audit(s).detail,
        "removed 2 versions; granted to groups h"
    );
    s.delete_secret("s2", &entry("secret.delete")).unwrap();
    assert_eq!(
        last_audit(s).detail,
        "removed 1 version; granted to no group"
    );
    s.remove_group("h", &entry("group.remove")).unwrap();
    assert_eq!(
        last_audit(s).detail,
        "removed with no clients and no secrets"
    );
}

/// Four threads rotate, and fail to rotate, at once: every rotation lands
/// once, failures change nothing. For backends with real concurrency.
pub fn concurrent_writes(s: Arc<dyn Store>) {
    for t in 0..4 {
        add(s.as_ref(), &format!("t{t}"));
    }
    let start = s.revision().unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let e = entry("secret.rotate");
                for i in 0..50 {
                    s.rotate_secret(&format!("t{t}"), 1, None, &e, &mut |_, _| Ok(sealed(2)))
                        .unwrap();
                    // Failing jobs in the same bursts change nothing.
                    assert!(s
                        .rotate_secret("missing", 1, None, &e, &mut |_, _| Ok(sealed(1)))
                        .is_err());
                    let failed =
                        s.rotate_secret(&format!("t{t}"), 1, None, &e, &mut |_, _| Err(boom()));
                    assert!(failed.is_err(), "iteration {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for t in 0..4 {
        let rec = s.get_secret(&format!("t{t}")).unwrap();
        assert_eq!((rec.current_version, rec.version_count), (51, 51));
        assert_eq!(s.list_versions(&format!("t{t}")).unwrap().len(), 51);
    }
    assert_eq!(s.revision().unwrap(), start + 200);
    // The row set stayed right through shared commits and failed jobs.
    assert_eq!(s.verify_rows().unwrap(), vec![]);
    assert_eq!(s.check_row_set().unwrap(), None);
}

/// Runs one statement on the store's database behind its back, as someone
/// who can write the database but has no master key. Plain SQL that
/// SQLite and PostgreSQL both take.
pub type RawSql<'a> = &'a dyn Fn(&str);

/// Authenticated rows: every protected column edited and every grant row
/// added without the key is detected (absent, reported once, listed by
/// `verify_rows`); putting the value back makes the row good again;
/// deleting a grant only takes access away; deleting a revocation admits
/// nobody. `raw` edits the
/// database of `s`.
pub fn tampered_rows_are_absent(s: &dyn Store, raw: RawSql<'_>) {
    let app = client(s, "app");
    let other = client(s, "other");
    for g in ["g", "h"] {
        s.create_group(g, "", &entry("group.create")).unwrap();
    }
    let db = add(s, "db");
    s.rotate_secret("db", 3, None, &entry("secret.rotate"), &mut |_, _| {
        Ok(sealed(2))
    })
    .unwrap();
    let hidden = add(s, "hidden");
    for (g, m) in [
        ("g", Member::Client("app".into())),
        ("g", Member::Secret("db".into())),
        ("h", Member::Client("other".into())),
        ("h", Member::Secret("hidden".into())),
    ] {
        s.set_group_member(g, &m, true, &entry("group.add"))
            .unwrap();
    }
    s.put_meta("trust_domain", b"example.org").unwrap();
    assert_eq!(s.verify_rows().unwrap(), vec![], "a fresh store is clean");
    assert!(s.take_bad_rows().is_empty());

    let sees = |client: &ClientRecord, name: &str| {
        s.client_view(client.id)
            .unwrap()
            .secrets
            .iter()
            .any(|r| r.name == name)
    };
    let reads = |client: &ClientRecord, name: &str| {
        let (found, denied) = s.read_sealed(client.id, &[name.to_owned()]).unwrap();
        assert_eq!(found.len() + denied.len(), 1);
        found.len() == 1
    };
    assert!(sees(&app, "db") && reads(&app, "db") && !sees(&app, "hidden"));

    let reported = std::cell::RefCell::new(std::collections::HashSet::new());
    // Edits `sql`, checks what must hold while it stands, undoes it.
    let tampered = |what: &str, table: &str, sql: &str, undo: &str, check: &dyn Fn()| {
        raw(sql);
        check();
        let bad = s.verify_rows().unwrap();
        assert!(
            bad.iter().any(|b| b.table == table),
            "{what}: verify_rows did not list a bad {table} row: {bad:?}"
        );
        // Reported by the reads above, or earlier (once per row).
        let mut seen = reported.borrow_mut();
        seen.extend(s.take_bad_rows().into_iter().map(|b| (b.table, b.key)));
        for b in bad.iter().filter(|b| b.table == table) {
            assert!(
                seen.contains(&(b.table, b.key.clone())),
                "{what}: the reads did not report {b}"
            );
        }
        drop(seen);
        raw(undo);
        assert_eq!(s.verify_rows().unwrap(), vec![], "{what}: undone");
    };

    // clients: every column; a bad row is an unknown client.
    let unknown = || {
        let facts = s.authenticate("app", "serial-app").unwrap();
        assert!(facts.client.is_none() && !facts.serial_issued);
        assert!(s.get_client("app").is_err());
        assert!(s.list_clients().unwrap().iter().all(|c| c.name != "app"));
        assert!(s.get_group("g").unwrap().clients.is_empty());
    };
    for (col, edit, undo) in [
        ("admin", "admin = 1", "admin = 0"),
        ("enabled", "enabled = 0", "enabled = 1"),
        ("pinned", "pinned = 0", "pinned = 1"),
        (
            "created_at",
            "created_at = created_at + 1",
            "created_at = created_at - 1",
        ),
    ] {
        tampered(
            &format!("clients.{col}"),
            "clients",
            &format!("UPDATE clients SET {edit} WHERE name = 'app'"),
            &format!("UPDATE clients SET {undo} WHERE name = 'app'"),
            &unknown,
        );
    }
    tampered(
        "clients.name",
        "clients",
        "UPDATE clients SET name = 'app2' WHERE name = 'app'",
        "UPDATE clients SET name = 'app' WHERE name = 'app2'",
        &|| {
            let facts = s.authenticate("app2", "serial-app").unwrap();
            assert!(facts.client.is_none(), "a renamed client is unknown");
        },
    );
    // A client row added without the key is unknown too.
    tampered(
        "clients inserted",
        "clients",
        "INSERT INTO clients (name, admin, enabled, pinned, created_at) VALUES ('evil', 1, 1, 0, 0)",
        "DELETE FROM clients WHERE name = 'evil'",
        &|| assert!(s.authenticate("evil", "x").unwrap().client.is_none()),
    );

    // client_certs: a certificate bound without the key does not
    // authenticate; nor does an edited one.
    tampered(
        "client_certs inserted",
        "client_certs",
        &format!(
            "INSERT INTO client_certs (client_id, serial, not_after, issued_at) VALUES ({}, 'stolen', 99, 0)",
            app.id
        ),
        "DELETE FROM client_certs WHERE serial = 'stolen'",
        &|| {
            let facts = s.authenticate("app", "stolen").unwrap();
            assert!(facts.client.is_some() && !facts.serial_issued);
        },
    );
    for (col, edit, undo) in [
        ("not_after", "not_after = 12345", "not_after = 99"),
        (
            "issued_at",
            "issued_at = issued_at + 1",
            "issued_at = issued_at - 1",
        ),
    ] {
        tampered(
            &format!("client_certs.{col}"),
            "client_certs",
            &format!("UPDATE client_certs SET {edit} WHERE serial = 'serial-app'"),
            &format!("UPDATE client_certs SET {undo} WHERE serial = 'serial-app'"),
            &|| assert!(!s.authenticate("app", "serial-app").unwrap().serial_issued),
        );
    }
    tampered(
        "client_certs.client_id",
        "client_certs",
        &format!(
            "UPDATE client_certs SET client_id = {} WHERE serial = 'serial-other'",
            app.id
        ),
        &format!(
            "UPDATE client_certs SET client_id = {} WHERE serial = 'serial-other'",
            other.id
        ),
        &|| assert!(!s.authenticate("app", "serial-other").unwrap().serial_issued),
    );

    // group_clients / group_secrets: a membership or grant added without
    // the key grants nothing.
    let no_hidden = || {
        assert!(!sees(&app, "hidden") && !reads(&app, "hidden"));
        assert!(s.read_one_for_client(app.id, hidden.id).unwrap().is_none());
        assert!(s
            .client_access("app")
            .unwrap()
            .iter()
            .all(|a| a.secret != "hidden"));
    };
    tampered(
        "group_clients inserted",
        "group_clients",
        &format!(
            "INSERT INTO group_clients (group_id, client_id) VALUES ((SELECT id FROM groups WHERE name = 'h'), {})",
            app.id
        ),
        &format!("DELETE FROM group_clients WHERE client_id = {} AND group_id = (SELECT id FROM groups WHERE name = 'h')", app.id),
        &|| {
            no_hidden();
            assert_eq!(s.get_group("h").unwrap().clients, vec!["other".to_owned()]);
        },
    );
    tampered(
        "group_secrets inserted",
        "group_secrets",
        &format!(
            "INSERT INTO group_secrets (group_id, secret_id) VALUES ((SELECT id FROM groups WHERE name = 'g'), {})",
            hidden.id
        ),
        &format!("DELETE FROM group_secrets WHERE secret_id = {} AND group_id = (SELECT id FROM groups WHERE name = 'g')", hidden.id),
        &|| {
            no_hidden();
            assert_eq!(s.get_group("g").unwrap().secrets, vec!["db".to_owned()]);
        },
    );
    tampered(
        "group_clients moved",
        "group_clients",
        &format!(
            "UPDATE group_clients SET group_id = (SELECT id FROM groups WHERE name = 'h') WHERE client_id = {}",
            app.id
        ),
        &format!(
            "UPDATE group_clients SET group_id = (SELECT id FROM groups WHERE name = 'g') WHERE client_id = {}",
            app.id
        ),
        &no_hidden,
    );

    // secrets: every column; a bad row is neither served nor listed.
    let db_gone = || {
        assert!(!sees(&app, "db") && !reads(&app, "db"));
        assert!(s.read_one_for_client(app.id, db.id).unwrap().is_none());
        assert!(s.get_secret("db").is_err());
        assert!(s.list_secrets().unwrap().iter().all(|r| r.id != db.id));
        assert!(s.client_access("app").unwrap().is_empty());
        assert!(s.get_group("g").unwrap().secrets.is_empty());
    };
    for (col, edit, undo) in [
        (
            "current_version",
            "current_version = 1",
            "current_version = 2",
        ),
        ("version_count", "version_count = 1", "version_count = 2"),
        ("mode", "mode = 511", "mode = 0"),
        ("owner", "owner = 0", "owner = NULL"),
        ("grp", "grp = 0", "grp = NULL"),
        ("expires_at", "expires_at = 1", "expires_at = NULL"),
        ("description", "description = 'x'", "description = ''"),
        ("labels", "labels = '{\"a\":\"b\"}'", "labels = '{}'"),
        (
            "created_at",
            "created_at = created_at + 1",
            "created_at = created_at - 1",
        ),
        (
            "updated_at",
            "updated_at = updated_at + 1",
            "updated_at = updated_at - 1",
        ),
    ] {
        tampered(
            &format!("secrets.{col}"),
            "secrets",
            &format!("UPDATE secrets SET {edit} WHERE name = 'db'"),
            &format!("UPDATE secrets SET {undo} WHERE name = 'db'"),
            &db_gone,
        );
    }
    tampered(
        "secrets.name",
        "secrets",
        "UPDATE secrets SET name = 'db2' WHERE name = 'db'",
        "UPDATE secrets SET name = 'db' WHERE name = 'db2'",
        &|| {
            assert!(!sees(&app, "db2") && !reads(&app, "db2"));
            assert!(s.get_secret("db2").is_err());
        },
    );

    // groups: a renamed group is gone (and so are the paths through it
    // in what client_access reports).
    tampered(
        "groups.name",
        "groups",
        "UPDATE groups SET name = 'admins' WHERE name = 'g'",
        "UPDATE groups SET name = 'g' WHERE name = 'admins'",
        &|| {
            assert!(s.get_group("admins").is_err());
            assert!(s.list_groups().unwrap().iter().all(|g| g.name != "admins"));
            assert!(s.client_access("app").unwrap().is_empty());
            assert!(s.get_client("app").unwrap().groups.is_empty());
        },
    );

    // meta: an edited trust domain is absent.
    tampered(
        "meta.trust_domain",
        "meta",
        "UPDATE meta SET value = X'6576696c' WHERE key = 'trust_domain'",
        "UPDATE meta SET value = X'6578616d706c652e6f7267' WHERE key = 'trust_domain'",
        &|| assert_eq!(s.get_meta("trust_domain").unwrap(), None),
    );

    // A bad row is reported once per process, however often it is met.
    raw("UPDATE secrets SET mode = 511 WHERE name = 'hidden'");
    assert!(s.get_secret("hidden").is_err());
    assert_eq!(s.take_bad_rows().len(), 1);
    assert!(s.get_secret("hidden").is_err());
    assert!(s.take_bad_rows().is_empty(), "reported again");
    raw("UPDATE secrets SET mode = 0 WHERE name = 'hidden'");

    // An operator's re-add replaces a membership added without the key.
    raw(
        &format!(
            "INSERT INTO group_clients (group_id, client_id) VALUES ((SELECT id FROM groups WHERE name = 'h'), {})",
            app.id
        ),
    );
    let added = s
        .set_group_member(
            "h",
            &Member::Client("app".into()),
            true,
            &entry("group.add"),
        )
        .unwrap();
    assert!(added.value.changed && sees(&app, "hidden"));
    // No bad row, but the row added without the key stays a row set
    // finding (its removal by the server does not make it the server's).
    assert_eq!(only_row_set(s), 1);
    s.set_group_member(
        "h",
        &Member::Client("app".into()),
        false,
        &entry("group.remove"),
    )
    .unwrap();

    // Deleting a grant row only takes access away, and leaves no bad row.
    raw(&format!(
        "DELETE FROM group_secrets WHERE secret_id = {}",
        db.id
    ));
    assert!(!sees(&app, "db") && !reads(&app, "db"));
    assert_eq!(only_row_set(s), 1, "a deletion is a row set finding");

    // Deleting a revocation admits nobody: a new client of the removed
    // one's name does not hold the old serial.
    s.remove_client("other", &entry("client.remove")).unwrap();
    assert!(
        s.authenticate("other", "serial-other")
            .unwrap()
            .serial_revoked
    );
    raw("DELETE FROM revoked_certs");
    s.create_client(
        &NewClient {
            name: "other".into(),
            admin: false,
            cert: Some(("serial-new".into(), 99)),
        },
        &entry("client.create"),
    )
    .unwrap();
    let facts = s.authenticate("other", "serial-other").unwrap();
    assert!(!facts.serial_revoked && !facts.serial_issued, "{facts:?}");
    assert_eq!(only_row_set(s), 1, "revocations are not in the row set");
    // After review, the operator takes the rows as they are.
    s.accept_row_set(&entry("integrity.accept")).unwrap();
    assert_eq!(s.verify_rows().unwrap(), vec![]);
    let _ = s.take_bad_rows();
}

/// The findings of `verify_rows` when the only one expected is the row
/// set's (no bad row): how many (0 or 1).
fn only_row_set(s: &dyn Store) -> usize {
    let found = s.verify_rows().unwrap();
    assert!(
        found.iter().all(|b| b.table == integrity::ROW_SET),
        "{found:?}"
    );
    assert_eq!(s.check_row_set().unwrap(), found.first().cloned());
    found.len()
}

/// Replay: an old copy of a row, good MAC and all, put back after the row
/// was changed or removed (as someone who kept a copy of the database
/// could) is reported by `verify_rows` as a row set finding, for every
/// protected table; taking it away again makes the store clean; writes
/// made meanwhile keep the finding; `accept_row_set` takes the rows as
/// they are. `raw` edits the database of `s` (the copies are kept in
/// tables of its own, outside the row set).
pub fn replayed_rows_are_detected(s: &dyn Store, raw: RawSql<'_>) {
    let app = client(s, "app");
    s.create_group("g", "", &entry("group.create")).unwrap();
    s.create_group("old", "", &entry("group.create")).unwrap();
    let db = add(s, "db");
    for m in [Member::Client("app".into()), Member::Secret("db".into())] {
        s.set_group_member("g", &m, true, &entry("group.add"))
            .unwrap();
    }
    s.put_meta("trust_domain", b"old.example").unwrap();
    let clean = || {
        assert_eq!(s.verify_rows().unwrap(), vec![]);
        assert_eq!(s.check_row_set().unwrap(), None);
    };
    clean();
    let since = s.revision().unwrap();
    for (table, copy) in [
        ("group_clients", "saved_gc"),
        ("group_secrets", "saved_gs"),
        ("secrets", "saved_s"),
        ("clients", "saved_c"),
        ("client_certs", "saved_cc"),
        ("groups", "saved_g"),
        ("meta", "saved_m"),
    ] {
        raw(&format!("CREATE TABLE {copy} AS SELECT * FROM {table}"));
    }
    let replayed = |what: &str| {
        let found = s.verify_rows().unwrap();
        assert_eq!(found.len(), 1, "{what}: {found:?}");
        assert_eq!(found[0].table, integrity::ROW_SET, "{what}: {found:?}");
        assert!(
            found[0]
                .what
                .contains("put back, deleted or added without the key")
                && found[0].what.contains("--accept"),
            "{what}: {}",
            found[0].what
        );
        assert_eq!(
            s.check_row_set().unwrap().as_ref(),
            Some(&found[0]),
            "{what}"
        );
        found[0].clone()
    };
    let sees_db = || {
        s.client_view(app.id)
            .unwrap()
            .secrets
            .iter()
            .any(|r| r.name == "db")
    };

    // A removed membership put back with its MAC: it would grant again.
    s.set_group_member(
        "g",
        &Member::Client("app".into()),
        false,
        &entry("group.remove"),
    )
    .unwrap();
    assert!(!sees_db());
    raw("INSERT INTO group_clients SELECT * FROM saved_gc");
    assert!(sees_db(), "the row's own MAC is good: only the set tells");
    let finding = replayed("group_clients");
    assert!(
        finding.what.contains(&format!("since revision {since}")),
        "{}",
        finding.what
    );
    // Writes meanwhile keep the finding.
    s.create_group("later", "", &entry("group.create")).unwrap();
    replayed("group_clients, after a write");
    raw("DELETE FROM group_clients");
    s.remove_group("later", &entry("group.remove")).unwrap();
    clean();

    // A removed grant put back.
    s.set_group_member(
        "g",
        &Member::Client("app".into()),
        true,
        &entry("group.add"),
    )
    .unwrap();
    s.set_group_member(
        "g",
        &Member::Secret("db".into()),
        false,
        &entry("group.remove"),
    )
    .unwrap();
    raw("INSERT INTO group_secrets SELECT * FROM saved_gs");
    assert!(sees_db());
    replayed("group_secrets");
    raw("DELETE FROM group_secrets");
    clean();
    s.set_group_member("g", &Member::Secret("db".into()), true, &entry("group.add"))
        .unwrap();

    // An old `secrets` row put back over a rotation: the old
    // current_version is served again.
    s.rotate_secret("db", 3, None, &entry("secret.rotate"), &mut |_, _| {
        Ok(sealed(2))
    })
    .unwrap();
    raw("CREATE TABLE saved_s2 AS SELECT * FROM secrets");
    let restore = |from: &str| {
        raw(&format!(
            "UPDATE secrets SET current_version = (SELECT current_version FROM {from}),
                    version_count = (SELECT version_count FROM {from}),
                    updated_at = (SELECT updated_at FROM {from}),
                    mac = (SELECT mac FROM {from}) WHERE id = {}",
            db.id
        ))
    };
    restore("saved_s");
    assert_eq!(
        s.get_secret("db").unwrap().current_version,
        1,
        "rolled back"
    );
    replayed("secrets");
    restore("saved_s2");
    clean();

    // A removed client put back with its certificate (and its
    // revocation deleted): it would authenticate again.
    s.remove_client("app", &entry("client.remove")).unwrap();
    raw("DELETE FROM revoked_certs");
    raw("INSERT INTO clients SELECT * FROM saved_c");
    raw("INSERT INTO client_certs SELECT * FROM saved_cc");
    assert!(s.authenticate("app", "serial-app").unwrap().serial_issued);
    replayed("clients");
    raw("DELETE FROM client_certs");
    raw("DELETE FROM clients");
    clean();

    // A removed group put back.
    s.remove_group("old", &entry("group.remove")).unwrap();
    raw("INSERT INTO groups SELECT * FROM saved_g WHERE name = 'old'");
    assert!(s.get_group("old").is_ok());
    replayed("groups");
    raw("DELETE FROM groups WHERE name = 'old'");
    clean();

    // An old meta value put back.
    s.put_meta("trust_domain", b"new.example").unwrap();
    raw("DELETE FROM meta WHERE key = 'trust_domain'");
    raw("INSERT INTO meta SELECT * FROM saved_m WHERE key = 'trust_domain'");
    assert_eq!(
        s.get_meta("trust_domain").unwrap(),
        Some(b"old.example".to_vec())
    );
    replayed("meta");

    // Accepted after review: the rows as they are, audited with the
    // revision.
    let at = s.accept_row_set(&entry("integrity.accept")).unwrap();
    assert_eq!(at, s.revision().unwrap());
    clean();
    let accepted = last_audit(s);
    assert_eq!(accepted.action, "integrity.accept");
    assert!(
        accepted.detail.contains(&format!("revision {at}")),
        "{accepted:?}"
    );

    // The record itself deleted: a finding, writes go on, accept makes a
    // new one.
    raw("DELETE FROM row_set");
    assert!(replayed("record").what.contains("deleted"));
    s.create_group("after", "", &entry("group.create")).unwrap();
    replayed("record, after a write");
    s.accept_row_set(&entry("integrity.accept")).unwrap();
    clean();
    // Edited: a finding too.
    raw("UPDATE row_set SET sealed = X'00'");
    assert!(replayed("record edited").what.contains("does not open"));
}

/// Changes, failed changes and appended entries all land in one unbroken
/// chain whose head is the last entry; the export gives each entry's chain
/// and the one before it.
fn every_audit_entry_is_chained_and_the_head_follows(s: &dyn Store) {
    assert_eq!(s.verify_audit().unwrap().broken, None, "an empty log");
    s.append_audit(&[entry("secret.read"), entry("secret.read")])
        .unwrap();
    s.create_group("g", "", &entry("group.create")).unwrap();
    assert!(s.create_group("g", "", &entry("group.create")).is_err());
    s.append_audit(&[entry("secret.read")]).unwrap();
    let v = s.verify_audit().unwrap();
    assert_eq!(v.broken, None);
    assert_eq!((v.checked, v.last_id), (4, 4));
    let head = s.audit_head().unwrap().unwrap();
    let all = s.audit_after(0, 100).unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(Some(&head.chain), all[3].chain.as_ref());
    assert_eq!(head.last_id, 4);
    assert_eq!(all[0].prev, crate::store::audit_chain::GENESIS.to_vec());
    for w in all.windows(2) {
        assert_eq!(Some(&w[1].prev), w[0].chain.as_ref());
        assert_eq!(w[1].entry.id, w[0].entry.id + 1);
    }
    assert_eq!(s.audit_after(2, 1).unwrap()[0].entry.id, 3);
    assert_eq!(
        s.audit_after(2, 1).unwrap()[0].prev,
        all[1].chain.clone().unwrap()
    );
}
