//! Connecting to PostgreSQL: the URL, TLS, the password.
//!
//! SKELETON (issue 13): the interface; the parsing and TLS come with the
//! connection layer.

use zeroize::Zeroizing;

use crate::store::{Result, StoreError};

/// True for the URLs that choose PostgreSQL (`postgres://`,
/// `postgresql://`); anything else given as `--database` is a SQLite path.
pub fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// Where and how to connect, parsed and checked once at start.
#[derive(Clone)]
pub struct PgConfig {
    redacted: String,
}

// The password must never be printed.
impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &self.redacted)
            .finish_non_exhaustive()
    }
}

impl PgConfig {
    /// Parses `url` (libpq's URL form and its parameters, e.g.
    /// `sslmode=verify-full&sslrootcert=/etc/secretfs/pg-ca.pem`). The
    /// password is `password` when given, else the URL's.
    pub fn parse(url: &str, password: Option<Zeroizing<String>>) -> Result<PgConfig> {
        let _ = password;
        if !is_postgres_url(url) {
            return Err(StoreError::Backend(
                format!("not a PostgreSQL URL: {url:?}").into(),
            ));
        }
        Err(StoreError::Unavailable(
            "the PostgreSQL store is not built yet".into(),
        ))
    }

    /// The URL without its password: for logs, errors and the state
    /// directory.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}
