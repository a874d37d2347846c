//! Connecting to PostgreSQL: the URL and its TLS policy, the password,
//! and what a driver error means to the rest of the server.

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use postgres::config::Host;
use postgres::error::SqlState;
use zeroize::Zeroizing;

use crate::store::{Result, StoreError};

/// How long a connection attempt may take when the URL does not say.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// True for the URLs that choose PostgreSQL (`postgres://`,
/// `postgresql://`); anything else given as `--database` is a SQLite path.
pub fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// How the connection is protected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Tls {
    /// In clear: `sslmode=disable`, or no sslmode to a loopback address
    /// or a Unix socket.
    Off,
    /// `sslmode=verify-full`: TLS, the server's certificate checked
    /// against this CA and its name against the host.
    VerifyFull(PathBuf),
}

/// Where and how to connect, parsed and checked once at start.
#[derive(Clone)]
pub struct PgConfig {
    pub(super) config: postgres::Config,
    pub(super) tls: Tls,
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

fn bad_url(redacted: &str, why: impl std::fmt::Display) -> StoreError {
    StoreError::Check(format!("the database URL {redacted} {why}").into())
}

/// `url` without its password (in the authority or as a parameter).
fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{user}@{hosts}")
        }
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|p| !p.to_ascii_lowercase().starts_with("password="))
                .collect();
            if kept.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{}", kept.join("&"))
            }
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// A URL's query value, percent-decoded.
fn decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_loopback(host: &Host) -> bool {
    match host {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    }
}

impl PgConfig {
    /// Parses `url` (libpq's URL form and its parameters, e.g.
    /// `sslmode=verify-full&sslrootcert=/etc/secretfs/pg-ca.pem`). The
    /// password is `password` when given, else the URL's.
    ///
    /// TLS policy: `sslmode=verify-full` (with `sslrootcert`) is TLS with
    /// the server's certificate and name checked; `sslmode=disable` is in
    /// clear; no sslmode is in clear to a loopback address or a Unix
    /// socket only; the modes that do not check the server (`allow`,
    /// `prefer`, `require`, `verify-ca`) are refused.
    pub fn parse(url: &str, password: Option<Zeroizing<String>>) -> Result<PgConfig> {
        let redacted = redact(url);
        if !is_postgres_url(url) {
            return Err(bad_url(
                &redacted,
                "is not a PostgreSQL URL (postgres://USER@HOST:PORT/DATABASE)",
            ));
        }
        // sslmode and sslrootcert are ours: the driver knows only
        // disable/prefer/require.
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut sslmode = None;
        let mut rootcert = None;
        let mut rest = Vec::new();
        for param in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = param.split_once('=').unwrap_or((param, ""));
            match k {
                "sslmode" => sslmode = Some(decode(v)),
                "sslrootcert" => rootcert = Some(PathBuf::from(decode(v))),
                _ => rest.push(param),
            }
        }
        let driver_url = if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let mut config = postgres::Config::from_str(&driver_url)
            .map_err(|e| bad_url(&redacted, format_args!("cannot be parsed: {e}")))?;
        if let Some(pw) = password {
            config.password(pw.as_bytes());
        }
        if config.get_user().is_none() {
            return Err(bad_url(
                &redacted,
                "names no user: give one as postgres://USER@HOST/DATABASE",
            ));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("secretfs");
        let tls = match sslmode.as_deref() {
            Some("verify-full") => match rootcert {
                Some(ca) => Tls::VerifyFull(ca),
                None => {
                    return Err(bad_url(
                        &redacted,
                        "asks for sslmode=verify-full without the CA that signed the \
                         server's certificate: add sslrootcert=/path/to/ca.pem",
                    ))
                }
            },
            Some("disable") => Tls::Off,
            None => {
                if config.get_hosts().iter().all(is_loopback) {
                    Tls::Off
                } else {
                    return Err(bad_url(
                        &redacted,
                        "would send the database password and every sealed secret in clear \
                         to another host: add sslmode=verify-full&sslrootcert=CA.pem, or \
                         sslmode=disable to send it in clear",
                    ));
                }
            }
            Some(mode @ ("allow" | "prefer" | "require" | "verify-ca")) => {
                return Err(bad_url(
                    &redacted,
                    format_args!(
                        "asks for sslmode={mode}, which does not check who the server is: use \
                         sslmode=verify-full&sslrootcert=CA.pem (or sslmode=disable)"
                    ),
                ))
            }
            Some(other) => {
                return Err(bad_url(
                    &redacted,
                    format_args!(
                        "has an unknown sslmode {other:?}: use verify-full (with sslrootcert) \
                         or disable"
                    ),
                ))
            }
        };
        Ok(PgConfig {
            config,
            tls,
            redacted,
        })
    }

    /// The URL without its password: for logs, errors and the state
    /// directory.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// Whether a password is set: on a config parsed with no password
    /// given (`parse(url, None)`), whether the URL itself carried one, in
    /// any form the driver takes (`user:PW@`, `password=`, a
    /// percent-encoded key such as `pass%77ord=`).
    pub fn password_given(&self) -> bool {
        self.config.get_password().is_some()
    }
}

/// A new connection, with what every connection of the store needs (the
/// row set's pending table, see `row_set`).
pub(super) fn connect(cfg: &PgConfig) -> Result<postgres::Client> {
    let client = match &cfg.tls {
        Tls::Off => cfg.config.connect(postgres::NoTls),
        Tls::VerifyFull(ca) => {
            let client = super::tls::connect(&cfg.config, ca).map_err(|e| match e {
                // The server's own refusal (password, database) is told
                // the same way with TLS as without.
                StoreError::Backend(source) => match source.downcast_ref::<postgres::Error>() {
                    Some(pg) => connect_error(cfg, pg),
                    None => StoreError::Backend(source),
                },
                other => other,
            })?;
            return finish(cfg, client);
        }
    };
    finish(cfg, client.map_err(|e| connect_error(cfg, &e))?)
}

fn finish(cfg: &PgConfig, mut client: postgres::Client) -> Result<postgres::Client> {
    client
        .batch_execute(
            "CREATE TEMP TABLE IF NOT EXISTS row_set_pending (kind TEXT NOT NULL, mac BYTEA)",
        )
        .map_err(|e| connect_error(cfg, &e))?;
    Ok(client)
}

/// Why a connection could not be made, with the fix; never the password.
pub(super) fn connect_error(cfg: &PgConfig, e: &postgres::Error) -> StoreError {
    let at = cfg.redacted();
    let user = cfg.config.get_user().unwrap_or("?");
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            return StoreError::Check(
                format!(
                    "PostgreSQL at {at} refused the login of user {user:?} ({}): check the user \
                     and the database password given to secretfs",
                    db.message()
                )
                .into(),
            );
        }
        if *code == SqlState::INVALID_CATALOG_NAME {
            return StoreError::Check(
                format!(
                    "{} (at {at}): create it (`createdb -O {user} NAME`) or fix the database name \
                     in the URL",
                    db.message()
                )
                .into(),
            );
        }
    }
    StoreError::Unavailable(format!(
        "cannot connect to PostgreSQL at {at}: {}",
        describe(e)
    ))
}

/// What went wrong, in words: the server's message for a database error
/// (the driver's Display says only "db error"), else the source chain.
pub(super) fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        source = s.source();
    }
    out
}

/// A database error with its SQLSTATE, kept so a write can tell a
/// serialization failure (retried) from the rest.
#[derive(Debug)]
pub(super) struct PgError {
    pub code: Option<SqlState>,
    pub message: String,
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PgError {}

/// Whether `e` says the connection itself failed (nothing is known about
/// the database: worth another connection).
pub(super) fn is_connection_error(e: &postgres::Error) -> bool {
    match e.code() {
        Some(code) => {
            code.code().starts_with("08")
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
        }
        // Not a database error: the connection closed, or an I/O error
        // under it (a type conversion is neither).
        None => {
            if e.is_closed() {
                return true;
            }
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                if s.is::<std::io::Error>() {
                    return true;
                }
                source = s.source();
            }
            false
        }
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> StoreError {
        if is_connection_error(&e) {
            return StoreError::Unavailable(format!("PostgreSQL: {}", describe(&e)));
        }
        StoreError::Backend(Box::new(PgError {
            code: e.code().cloned(),
            message: describe(&e),
        }))
    }
}

/// The SQLSTATE of a store error made from a database error.
pub(super) fn code_of(e: &StoreError) -> Option<&SqlState> {
    match e {
        StoreError::Backend(b) => b.downcast_ref::<PgError>().and_then(|p| p.code.as_ref()),
        _ => None,
    }
}
