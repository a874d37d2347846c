//! Which database a state directory's server uses: SQLite in the state
//! directory (the default), or PostgreSQL named by `--database URL` at
//! `server init` and recorded in `DIR/database.json` (the URL without its
//! password), so the later commands find it without the flag.
//!
//! The password never lives in the state directory: each command gets it
//! from its caller (the CLI reads `--database-password-file`,
//! `SECRETFS_DATABASE_PASSWORD` or a URL in `SECRETFS_DATABASE_URL`).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::StateDir;
use crate::error::Error;
use crate::keys::KeyRing;
use crate::store::{is_postgres_url, PgConfig, PgStore, SqliteStore, Store, StoreError};

/// The state directory's record of its PostgreSQL database.
pub const RECORD: &str = "database.json";

/// What the caller was given: a URL (`--database` or the environment) and
/// a password from where passwords may come from.
#[derive(Clone, Default)]
pub struct DatabaseOptions {
    /// A PostgreSQL URL or a SQLite path; it may hold a password only when
    /// it came from the environment (the CLI refuses one in argv).
    pub url: Option<Zeroizing<String>>,
    pub password: Option<Zeroizing<String>>,
}

// Neither the URL (it may hold a password) nor the password is printed.
impl std::fmt::Debug for DatabaseOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseOptions")
            .field("url", &self.url.as_ref().map(|u| shown(u)))
            .field("password", &self.password.as_ref().map(|_| "(hidden)"))
            .finish()
    }
}

impl DatabaseOptions {
    pub fn postgres(url: &str, password: Option<Zeroizing<String>>) -> Self {
        DatabaseOptions {
            url: Some(Zeroizing::new(url.to_owned())),
            password,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    /// Always "postgres" (a SQLite state directory has no record).
    store: String,
    /// The URL without its password.
    url: String,
}

/// The database a command works on.
pub enum Database {
    /// `DIR/secretfs.db`.
    Sqlite(PathBuf),
    Postgres(Box<PgConfig>),
}

impl Database {
    /// For messages: the path, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite(p) => p.display().to_string(),
            Database::Postgres(cfg) => cfg.redacted().to_owned(),
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Database::Postgres(_))
    }

    /// Whether the database has migrations this version would run.
    pub fn needs_upgrade(&self) -> Result<bool, Error> {
        match self {
            Database::Sqlite(p) => Ok(SqliteStore::needs_upgrade(p)?),
            Database::Postgres(cfg) => PgStore::needs_upgrade(cfg).map_err(|e| self.failed(e)),
        }
    }

    /// Opens (with `create`: makes) the store.
    pub fn open(&self, create: bool, keys: Arc<KeyRing>) -> Result<Arc<dyn Store>, StoreError> {
        Ok(match self {
            Database::Sqlite(p) => Arc::new(SqliteStore::open(p, create, keys)?),
            Database::Postgres(cfg) => Arc::new(PgStore::open(cfg, create, keys)?),
        })
    }

    /// A store error at start, naming the database (the store's own text
    /// says what is wrong with it).
    pub fn failed(&self, e: StoreError) -> Error {
        match (self, e) {
            // At start, "refused until it is back" is not the advice:
            // nothing runs yet.
            (Database::Postgres(cfg), StoreError::Unavailable(why)) => Error::Config(format!(
                "cannot connect to the PostgreSQL database {}: {why}. Check that PostgreSQL runs and \
                 the URL's host and port, and the password given; then start again. Nothing was changed",
                cfg.redacted()
            )),
            (Database::Postgres(cfg), e) => Error::Config(format!(
                "cannot use the PostgreSQL database {}: {e}. Nothing was changed",
                cfg.redacted()
            )),
            (Database::Sqlite(_), e) => e.into(),
        }
    }
}

/// The recorded PostgreSQL URL (without password), if any.
pub fn recorded(dir: &StateDir) -> Result<Option<String>, Error> {
    let path = dir.database_record();
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
    };
    let record: Record = serde_json::from_slice(&bytes)
        .ok()
        .filter(|r: &Record| r.store == "postgres" && is_postgres_url(&r.url))
        .ok_or_else(|| {
            Error::Config(format!(
                "{} is not a secretfs database record; restore it from backup, or write \
                 {{\"store\":\"postgres\",\"url\":\"postgres://USER@HOST/DB\"}}",
                path.display()
            ))
        })?;
    Ok(Some(record.url))
}

/// Records `cfg` (without its password) in a new state directory.
pub fn record(dir: &StateDir, cfg: &PgConfig) -> Result<(), Error> {
    let mut text = serde_json::to_vec_pretty(&Record {
        store: "postgres".into(),
        url: cfg.redacted().to_owned(),
    })
    .map_err(|e| Error::Config(format!("cannot encode the database record: {e}")))?;
    text.push(b'\n');
    super::write_new(&dir.database_record(), &text, 0o644)
}

/// The database `opts` and the state directory's record name together:
/// the record when nothing is given, the given one when nothing is
/// recorded (`server init`), and a refusal when they differ.
pub fn choose(dir: &StateDir, opts: &DatabaseOptions) -> Result<Database, Error> {
    let recorded = recorded(dir)?;
    let parse = |url: &str| parse_url(url, opts.password.clone());
    let given = opts.url.as_deref().map(|u| u.as_str());
    match (given, recorded) {
        (None, None) => Ok(Database::Sqlite(dir.database())),
        (None, Some(url)) => Ok(Database::Postgres(Box::new(parse(&url)?))),
        (Some(url), recorded) if is_postgres_url(url) => {
            let cfg = parse(url)?;
            match recorded {
                Some(r) if r != cfg.redacted() => Err(Error::Config(format!(
                    "--database names {}, but the state directory {} belongs to {r} (recorded in {}); \
                     give that database, or none (the recorded one is used)",
                    cfg.redacted(),
                    dir.path.display(),
                    dir.database_record().display()
                ))),
                None if dir.database().exists() => Err(Error::Config(format!(
                    "--database names {}, but the state directory {} uses its SQLite database {}; \
                     give no --database (moving a store to PostgreSQL is not supported yet)",
                    cfg.redacted(),
                    dir.path.display(),
                    dir.database().display()
                ))),
                _ => Ok(Database::Postgres(Box::new(cfg))),
            }
        }
        (Some(path), recorded) => {
            if let Some(r) = recorded {
                return Err(Error::Config(format!(
                    "--database names the SQLite file {path}, but the state directory {} belongs to {r} \
                     (recorded in {}); give that database, or none",
                    dir.path.display(),
                    dir.database_record().display()
                )));
            }
            if super::absolute(Path::new(path)) != super::absolute(&dir.database()) {
                return Err(Error::InvalidArgument(format!(
                    "--database {path}: a SQLite database lives in the state directory ({}); give no \
                     --database for SQLite, or a postgres://USER@HOST/DBNAME URL for PostgreSQL",
                    dir.database().display()
                )));
            }
            Ok(Database::Sqlite(dir.database()))
        }
    }
}

/// Parses a PostgreSQL URL (see [`PgConfig::parse`]); the error names
/// the URL without its password.
pub fn parse_url(url: &str, password: Option<Zeroizing<String>>) -> Result<PgConfig, Error> {
    PgConfig::parse(url, password).map_err(|e| {
        Error::Config(format!(
            "{e}; the URL is not usable: give postgres://USER@HOST:PORT/DBNAME (libpq's URL \
             form, e.g. ?sslmode=verify-full&sslrootcert=FILE)"
        ))
    })
}

/// `url` for Debug output: a SQLite path as it is, a PostgreSQL URL
/// without its password ([`PgConfig::redacted`]), or nothing of a URL
/// that does not parse (where its password is cannot be told).
pub fn shown(url: &str) -> String {
    if !is_postgres_url(url) {
        return url.to_owned();
    }
    match PgConfig::parse(url, None) {
        Ok(cfg) => cfg.redacted().to_owned(),
        Err(_) => "(a PostgreSQL URL that does not parse; not shown)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_found_in_every_form_the_driver_takes() {
        for url in [
            "postgres://u:pw@127.0.0.1/db",
            "postgresql://u:p%40w@localhost:5432/db?sslmode=disable",
            "postgres://u@127.0.0.1/db?sslmode=disable&password=x",
            // The driver decodes the key: this is a password too.
            "postgres://u@127.0.0.1/db?pass%77ord=x",
            "postgres://u:@127.0.0.1/db",
        ] {
            let cfg = parse_url(url, None).unwrap();
            assert!(cfg.password_given(), "{url}");
        }
        for url in [
            "postgres://u@127.0.0.1/db",
            "postgres://u@localhost:5432/db",
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/etc/ca.pem",
            // '@' and ':' after the authority are not a password.
            "postgres://u@127.0.0.1/db?application_name=a:b@c",
        ] {
            let cfg = parse_url(url, None).unwrap();
            assert!(!cfg.password_given(), "{url}");
            assert_eq!(shown(url), cfg.redacted(), "{url}");
        }
        assert!(!shown("postgres://u:hunter2@h/db?sslmode=bogus").contains("hunter2"));
        assert_eq!(
            shown("/var/lib/secretfs/secretfs.db"),
            "/var/lib/secretfs/secretfs.db"
        );
    }

    #[test]
    fn a_sqlite_state_dir_keeps_sqlite_and_refuses_another_path() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let db = choose(&dir, &DatabaseOptions::default()).unwrap();
        assert!(!db.is_postgres());
        let same = DatabaseOptions {
            url: Some(Zeroizing::new(dir.database().display().to_string())),
            password: None,
        };
        assert!(!choose(&dir, &same).unwrap().is_postgres());
        let other = DatabaseOptions {
            url: Some(Zeroizing::new("/elsewhere/x.db".into())),
            password: None,
        };
        let err = choose(&dir, &other).err().unwrap().to_string();
        assert!(err.contains("state directory"), "{err}");
    }

    #[test]
    fn a_damaged_record_is_refused_and_debug_hides_the_password() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        fs::write(
            dir.database_record(),
            b"{\"store\":\"oracle\",\"url\":\"x\"}",
        )
        .unwrap();
        let err = choose(&dir, &DatabaseOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a secretfs database record"), "{err}");
        let opts = DatabaseOptions::postgres(
            "postgres://u:hunter2@h/db",
            Some(Zeroizing::new("s3cret".into())),
        );
        let shown = format!("{opts:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
