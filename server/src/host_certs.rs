//! Certificates made on the server's host, from the CA key in the state
//! directory, without calling the server: the break-glass admin
//! certificate (`server admin-cert`) and a new server certificate
//! (`server reissue-cert`).
//!
//! Both work while `server run` is up on the same state directory: the
//! database is SQLite in WAL mode (a second writer waits its turn), the
//! running server authenticates each new serial from the database, and it
//! takes up a replaced server certificate by itself (`cert_reload`). Neither
//! takes the lock `server run` holds on the state directory.

use std::path::{Path, PathBuf};

use crate::domain::Action;
use crate::error::Error;
use crate::names::check_entity_name;
use crate::pki::{rfc3339, Issued};
use crate::state_dir::{replace_error, trust_domain, StateDir};
use crate::store::{AuditEntry, NewClient, StoreError};

/// Who the audit log names for changes made this way.
pub const LOCAL_ADMIN_CERT: &str = "local:admin-cert";

/// The state directory, which this process must own: files it writes
/// there (a new server key, SQLite's `-wal` when the server is down) would
/// otherwise belong to another user, and the server could not read them.
fn existing(dir: &Path) -> Result<StateDir, Error> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => m,
        _ => {
            return Err(Error::Config(format!(
                "state directory {} does not exist; give the --state-dir that `secretfs server run` uses",
                dir.display()
            )))
        }
    };
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(Error::Config(format!(
            "state directory {} belongs to uid {}, and this runs as uid {me}: the files written here would not be \
             usable by the server; run it as the server's user (e.g. `sudo -u secretfs secretfs server ...`)",
            dir.display(),
            meta.uid()
        )));
    }
    Ok(StateDir::new(dir))
}

/// What `server admin-cert` made.
pub struct AdminCert {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub serial: String,
    pub not_after: i64,
    /// The admin client did not exist and was created.
    pub created: bool,
}

/// Mints an admin certificate from the CA in `state_dir`, pins its serial
/// in the store (creating the admin client `name` if it is missing), audits
/// it, and writes NAME.pem, NAME.key and ca.pem into `out` (replaced
/// atomically).
pub fn admin_cert(state_dir: &Path, out: &Path, name: &str, days: u32) -> Result<AdminCert, Error> {
    admin_cert_with(
        state_dir,
        out,
        name,
        days,
        &Default::default(),
        &Default::default(),
    )
}

/// [`admin_cert`] with the master key provider flags given.
pub fn admin_cert_with(
    state_dir: &Path,
    out: &Path,
    name: &str,
    days: u32,
    keys: &crate::key_provider::KeyOptions,
    db: &crate::state_dir::DatabaseOptions,
) -> Result<AdminCert, Error> {
    check_entity_name("client", name)?;
    let dir = existing(state_dir)?;
    let store = crate::state_dir::open_store_with(&dir, keys, db, false)?.store;
    let trust_domain = trust_domain(store.as_ref())?;
    let existing = match store.get_client(name) {
        Ok(c) => Some(c),
        Err(StoreError::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(c) = &existing {
        if !c.admin || !c.pinned {
            return Err(Error::FailedPrecondition(format!(
                "client \"{name}\" exists but is {}; pick another --name (a new admin of that name is created)",
                if !c.admin {
                    "not an admin"
                } else {
                    "external (its certificates come from your own CA)"
                }
            )));
        }
    }
    let ca = dir.load_ca()?;
    let issued = ca.issue_client(&trust_domain, name, days)?;
    let audit = AuditEntry {
        client: Some(name.to_owned()),
        detail: format!(
            "certificate {}, admin, valid until {}, minted on the server host from the state directory's CA key",
            issued.serial,
            rfc3339(issued.not_after)
        ),
        ..if existing.is_some() {
            Action::ClientRenew
        } else {
            Action::ClientCreate
        }
        .by(LOCAL_ADMIN_CERT)
    };
    let created = existing.is_none();
    match existing {
        Some(c) => {
            // By id: a client removed (or re-added) since the check is refused.
            store.add_client_cert(c.id, name, &issued.serial, issued.not_after, &audit)?;
        }
        None => {
            let created = store.create_client(
                &NewClient {
                    name: name.to_owned(),
                    admin: true,
                    cert: Some((issued.serial.clone(), issued.not_after)),
                },
                &audit,
            );
            match created {
                // Not found, yet there: its row failed its MAC check.
                Err(StoreError::AlreadyExists { .. }) => {
                    return Err(Error::FailedPrecondition(format!(
                        "the database's row for client \"{name}\" was edited without the master key \
                         (`secretfs server verify` lists it); restore the database from a backup, \
                         or pick another --name"
                    )))
                }
                other => other?,
            };
        }
    }
    drop(store);
    let (cert, key, ca) = write_client_files(out, name, &issued, &ca.cert_pem)?;
    Ok(AdminCert {
        name: name.to_owned(),
        cert,
        key,
        ca,
        serial: issued.serial,
        not_after: issued.not_after,
        created,
    })
}

fn write_client_files(
    out: &Path,
    name: &str,
    issued: &Issued,
    ca_pem: &str,
) -> Result<(PathBuf, PathBuf, PathBuf), Error> {
    let paths = secretfs_proto::files::ClientPaths::in_dir(out, name);
    let key_pem = issued.key_pem.as_ref().map(|k| k.as_bytes());
    secretfs_proto::files::write_client_files(
        &paths,
        issued.cert_pem.as_bytes(),
        key_pem,
        ca_pem.as_bytes(),
    )
    .map_err(replace_error)?;
    let (key, ca) = (paths.key.unwrap_or_default(), paths.ca.unwrap_or_default());
    Ok((paths.cert, key, ca))
}

/// Issues the server a new certificate and key for `sans` and replaces
/// server.pem and server.key atomically (key first); a running server
/// takes them up within a second.
pub fn reissue_server_cert(state_dir: &Path, sans: &[String]) -> Result<Issued, Error> {
    if sans.is_empty() {
        return Err(Error::InvalidArgument(
            "give the names clients reach the server by: --san HOST (repeatable; DNS names or IP addresses, e.g. --san localhost --san 127.0.0.1)"
                .into(),
        ));
    }
    let dir = existing(state_dir)?;
    let ca = dir.load_ca()?;
    let issued = ca.issue_server(sans)?;
    let key_pem = issued
        .key_pem
        .as_ref()
        .map(|k| k.as_bytes())
        .unwrap_or_default();
    // Both files written first, then renamed back to back; the old key is
    // put back if the certificate cannot be, so the server never finds a
    // new key beside its old certificate.
    secretfs_proto::files::replace_pair(
        &dir.server_cert(),
        issued.cert_pem.as_bytes(),
        &dir.server_key(),
        key_pem,
        || true,
    )
    .map_err(replace_error)?;
    Ok(issued)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_dir::{init, InitOptions};

    #[test]
    fn admin_cert_pins_a_new_serial_and_creates_a_missing_admin() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = init(&InitOptions {
            state_dir: tmp.path().join("state"),
            trust_domain: "td".into(),
            sans: vec![],
            admin_name: "admin".into(),
            database: Default::default(),
            join: None,
        })
        .unwrap();
        let out = tmp.path().join("out");
        let again = admin_cert(&sd.path, &out, "admin", 0).unwrap();
        let fresh = admin_cert(&sd.path, &out, "root2", 7).unwrap();
        let (store, _keys) = crate::state_dir::open_store(&sd).unwrap();
        for (name, serial) in [("admin", &again.serial), ("root2", &fresh.serial)] {
            let facts = store.authenticate(name, serial).unwrap();
            assert!(facts.serial_issued, "{name}");
            assert!(facts.client.unwrap().admin, "{name}");
        }
        assert_eq!(
            secretfs_proto::cert::CertInfo::parse(&std::fs::read(&fresh.cert).unwrap())
                .unwrap()
                .serial,
            fresh.serial
        );
        let audit = store
            .query_audit(&crate::store::AuditFilter::default())
            .unwrap();
        assert!(audit
            .iter()
            .any(|e| e.actor == LOCAL_ADMIN_CERT && e.action == "client.renew"));
        assert!(audit
            .iter()
            .any(|e| e.actor == LOCAL_ADMIN_CERT && e.action == "client.create"));
        // A non-admin of that name is not promoted.
        store
            .create_client(
                &NewClient {
                    name: "web".into(),
                    admin: false,
                    cert: Some(("s".into(), 1)),
                },
                &Action::ClientCreate.by("t"),
            )
            .unwrap();
        drop(store);
        let err = admin_cert(&sd.path, &out, "web", 0)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not an admin"), "{err}");
        // An admin row edited without the key is neither renewed nor
        // replaced.
        let conn = rusqlite::Connection::open(sd.database()).unwrap();
        conn.execute("UPDATE clients SET pinned = 0 WHERE name = 'admin'", [])
            .unwrap();
        drop(conn);
        let err = admin_cert(&sd.path, &out, "admin", 0)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("server verify"), "{err}");
        let err = reissue_server_cert(&sd.path, &[])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--san"), "{err}");
    }

    #[test]
    fn a_reissue_whose_certificate_cannot_be_written_keeps_the_old_key() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = init(&InitOptions {
            state_dir: tmp.path().join("state"),
            trust_domain: "td".into(),
            sans: vec![],
            admin_name: "admin".into(),
            database: Default::default(),
            join: None,
        })
        .unwrap();
        let old_key = std::fs::read(sd.server_key()).unwrap();
        // server.pem cannot be replaced: a non-empty directory in its place.
        let old_cert = std::fs::read(sd.server_cert()).unwrap();
        std::fs::remove_file(sd.server_cert()).unwrap();
        std::fs::create_dir(sd.server_cert()).unwrap();
        std::fs::write(sd.server_cert().join("x"), &old_cert).unwrap();
        assert!(reissue_server_cert(&sd.path, &["localhost".into()]).is_err());
        assert_eq!(
            std::fs::read(sd.server_key()).unwrap(),
            old_key,
            "no new key beside the old certificate"
        );
    }
}
