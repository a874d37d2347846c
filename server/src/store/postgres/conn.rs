//! Connecting to PostgreSQL: the URL and its TLS policy, the password,
//! and what a driver error means to the rest of the server.

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use postgres::config::Host;
use postgres::error::SqlState;
use zeroize::Zeroizing;

use super::session::{self, Pipelined, Session};
use crate::store::{Result, StoreError};

/// How long a connection attempt may take when the URL does not say.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The session settings every connection starts with (PostgreSQL's
/// startup `options`; an `options=-c NAME=VALUE` of the URL comes after
/// them and wins). Why these values: docs/decisions.md, "The PostgreSQL
/// store: review fixes".
///
/// - `lock_timeout`: how long a write waits for a lock (the revision
///   row's, held by another writer) before it fails as Unavailable; it
///   bounds how long writers, and the reads queued behind them for a
///   connection of the pool, stall behind a writer that hangs.
/// - `idle_in_transaction_session_timeout`: PostgreSQL ends a session of
///   ours idle in a transaction this long (a replica that died or was cut
///   off while holding the revision row's lock), which frees that lock.
///   No transaction of ours waits on anything but the database.
/// - `statement_timeout`: a runaway statement is cancelled.
pub(super) const SESSION_TIMEOUTS: &str = "-c lock_timeout=5s \
     -c idle_in_transaction_session_timeout=15s -c statement_timeout=60s";

/// How a dead peer is noticed on an open connection (TCP keepalives, and
/// data left unacknowledged), instead of the kernel's hours.
const KEEPALIVES_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVES_RETRIES: u32 = 3;
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

fn set_timeouts(config: &mut tokio_postgres::Config) {
    let options = match config.get_options() {
        Some(given) => format!("{SESSION_TIMEOUTS} {given}"),
        None => SESSION_TIMEOUTS.to_owned(),
    };
    config
        .options(&options)
        .keepalives(true)
        .keepalives_idle(KEEPALIVES_IDLE)
        .keepalives_interval(KEEPALIVES_INTERVAL)
        .keepalives_retries(KEEPALIVES_RETRIES)
        .tcp_user_timeout(TCP_USER_TIMEOUT);
}

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
    pub(super) config: tokio_postgres::Config,
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

/// What a URL that cannot be parsed is shown as: its scheme only (where
/// its password ends is unknown).
fn redact_unparsed(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, _))
            if scheme.len() <= 16 && scheme.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            format!("{scheme}://... (the rest not shown: it may hold the password)")
        }
        _ => "(not shown: it may hold the password)".to_owned(),
    }
}

/// `s` percent-encoded but for the characters a URL never needs to escape.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The URL of `config` without its password, rebuilt from what the
/// driver parsed (so nothing the driver reads as the password, wherever
/// the URL put it, can be shown): the user, the hosts and ports, the
/// database and the options that are not secret. It connects as the URL
/// did when the password is given apart.
fn redacted_url(
    config: &tokio_postgres::Config,
    connect_timeout: Option<Duration>,
    sslmode: Option<&str>,
    rootcert: Option<&std::path::Path>,
) -> String {
    let mut out = String::from("postgres://");
    if let Some(user) = config.get_user() {
        out.push_str(&encode(user));
        out.push('@');
    }
    let hosts = config.get_hosts();
    let ports = config.get_ports();
    let port_of = |i: usize| match ports.len() {
        0 => None,
        1 => Some(ports[0]),
        _ => ports.get(i).copied(),
    };
    let mut query: Vec<String> = Vec::new();
    let all_tcp = hosts.iter().all(|h| matches!(h, Host::Tcp(_)));
    if all_tcp {
        let mut first = true;
        for (i, host) in hosts.iter().enumerate() {
            let Host::Tcp(name) = host else { continue };
            if !first {
                out.push(',');
            }
            first = false;
            if name.parse::<std::net::Ipv6Addr>().is_ok() {
                out.push_str(&format!("[{name}]"));
            } else {
                out.push_str(&encode(name));
            }
            if let Some(p) = port_of(i) {
                out.push_str(&format!(":{p}"));
            }
        }
    } else {
        let names: Vec<String> = hosts
            .iter()
            .map(|h| match h {
                Host::Tcp(name) => encode(name),
                Host::Unix(path) => encode(&path.to_string_lossy()),
            })
            .collect();
        query.push(format!("host={}", names.join(",")));
        if !ports.is_empty() {
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            query.push(format!("port={}", ports.join(",")));
        }
    }
    out.push('/');
    if let Some(db) = config.get_dbname() {
        out.push_str(&encode(db));
    }
    let addrs = config.get_hostaddrs();
    if !addrs.is_empty() {
        let addrs: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
        query.push(format!("hostaddr={}", encode(&addrs.join(","))));
    }
    if let Some(t) = connect_timeout {
        query.push(format!("connect_timeout={}", t.as_secs()));
    }
    if let Some(options) = config.get_options() {
        query.push(format!("options={}", encode(options)));
    }
    if config.get_target_session_attrs() == postgres::config::TargetSessionAttrs::ReadWrite {
        query.push("target_session_attrs=read-write".into());
    }
    if let Some(mode) = sslmode {
        query.push(format!("sslmode={}", encode(mode)));
    }
    if let Some(ca) = rootcert {
        query.push(format!("sslrootcert={}", encode(&ca.to_string_lossy())));
    }
    if !query.is_empty() {
        out.push('?');
        out.push_str(&query.join("&"));
    }
    out
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
        // Until the driver has parsed it, nothing of the URL is shown.
        let redacted = redact_unparsed(url);
        if !is_postgres_url(url) {
            return Err(bad_url(
                &redacted,
                "is not a PostgreSQL URL (postgres://USER@HOST:PORT/DATABASE)",
            ));
        }
        // sslmode and sslrootcert are ours: the driver knows only
        // disable/prefer/require.
        // The query starts at the first '?' after the credentials, which
        // the driver takes up to the first '@' (a password may hold '?').
        let authority = url.find("://").map_or(0, |i| i + 3);
        let after_creds = url[authority..]
            .find('@')
            .map_or(authority, |i| authority + i + 1);
        let (base, query) = match url[after_creds..].find('?') {
            Some(i) => (&url[..after_creds + i], &url[after_creds + i + 1..]),
            None => (url, ""),
        };
        let mut sslmode = None;
        let mut rootcert = None;
        let mut rest = Vec::new();
        for param in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = param.split_once('=').unwrap_or((param, ""));
            match decode(k).as_str() {
                "sslmode" => sslmode = Some(decode(v)),
                "sslrootcert" => rootcert = Some(PathBuf::from(decode(v))),
                _ => rest.push(param),
            }
        }
        // It may hold the password: wiped when dropped.
        let driver_url = Zeroizing::new(if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", rest.join("&"))
        });
        let mut config = tokio_postgres::Config::from_str(driver_url.as_str())
            .map_err(|e| bad_url(&redacted, format_args!("cannot be parsed: {e}")))?;
        if let Some(pw) = password {
            config.password(pw.as_bytes());
        }
        // The driver takes the credentials up to the first '@': a second
        // one means a password with an '@' not percent-encoded, and the
        // rest of it taken for the host (which would then be shown).
        let at_in_host = config.get_hosts().iter().any(|h| match h {
            Host::Tcp(name) => name.contains('@'),
            Host::Unix(_) => false,
        });
        if at_in_host {
            return Err(bad_url(
                &redact_unparsed(url),
                "has an '@' after its user and password: write an '@' in the password as %40 \
                 (and '/', '?', '#', ':' as %2F, %3F, %23, %3A), or give the password apart",
            ));
        }
        if config.get_user().is_none() {
            return Err(bad_url(
                &redacted,
                "names no user: give one as postgres://USER@HOST/DATABASE",
            ));
        }
        let redacted = redacted_url(
            &config,
            config.get_connect_timeout().copied(),
            sslmode.as_deref(),
            rootcert.as_deref(),
        );
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("secretfs");
        set_timeouts(&mut config);
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
                // `hostaddr` is where the driver connects (the host
                // names only the server's name then).
                let addrs = config.get_hostaddrs();
                let loopback = if addrs.is_empty() {
                    config.get_hosts().iter().all(is_loopback)
                } else {
                    addrs.iter().all(IpAddr::is_loopback)
                };
                if loopback {
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
    let mut client = match &cfg.tls {
        Tls::Off => postgres::Config::from(cfg.config.clone())
            .connect(postgres::NoTls)
            .map_err(|e| connect_error(cfg, &e))?,
        Tls::VerifyFull(ca) => {
            super::tls::connect(&cfg.config, ca).map_err(|e| tls_connect_error(cfg, e))?
        }
    };
    client
        .batch_execute(SESSION_SETUP)
        .map_err(|e| connect_error(cfg, &e))?;
    Ok(client)
}

/// As [`connect`], a session that pipelines (the writer's).
pub(super) fn connect_pipelined(cfg: &PgConfig) -> Result<Pipelined> {
    let rt = session::runtime()?;
    let mut session = match &cfg.tls {
        Tls::Off => Pipelined::connect(rt, cfg.config.connect(tokio_postgres::NoTls))
            .map_err(|e| connect_error(cfg, &e))?,
        Tls::VerifyFull(ca) => super::tls::connect_pipelined(&cfg.config, ca, rt)
            .map_err(|e| tls_connect_error(cfg, e))?,
    };
    session
        .batch_execute(SESSION_SETUP)
        .map_err(|e| connect_error(cfg, &e))?;
    Ok(session)
}

/// The server's own refusal (password, database) is told the same way
/// with TLS as without.
fn tls_connect_error(cfg: &PgConfig, e: StoreError) -> StoreError {
    match e {
        StoreError::Backend(source) => match source.downcast_ref::<postgres::Error>() {
            Some(pg) => connect_error(cfg, pg),
            None => StoreError::Backend(source),
        },
        other => other,
    }
}

/// The search path is pinned to the schema the tables are in (the first
/// of the login's search path that exists), then the catalog and the
/// session's temporary schema last: a table or function someone makes in
/// another schema is never taken for ours or the catalog's. And the row
/// set's pending table (see `row_set`).
const SESSION_SETUP: &str = "SELECT pg_catalog.set_config('search_path', \
     pg_catalog.concat_ws(', ', pg_catalog.quote_ident(pg_catalog.current_schema()), \
     'pg_catalog', 'pg_temp'), false); \
     CREATE TEMP TABLE IF NOT EXISTS row_set_pending (kind TEXT NOT NULL, mac BYTEA)";

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

/// What a database error that means "not now" (nothing was written,
/// worth trying again later) says to the operator; None for the rest.
fn unavailable_because(code: &SqlState) -> Option<&'static str> {
    Some(if *code == SqlState::LOCK_NOT_AVAILABLE {
        "another writer held the database's write lock longer than lock_timeout (a \
         replica that stopped while writing: PostgreSQL ends its session within \
         idle_in_transaction_session_timeout); nothing was written, try again"
    } else if *code == SqlState::QUERY_CANCELED {
        "the statement ran longer than statement_timeout and was cancelled; nothing was \
         written"
    } else if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
        "the database is read only (a standby, e.g. after a failover): nothing was \
         written; point --database at the primary"
    } else if *code == SqlState::ADMIN_SHUTDOWN || *code == SqlState::CRASH_SHUTDOWN {
        "PostgreSQL is shutting down or restarting"
    } else if *code == SqlState::CANNOT_CONNECT_NOW {
        "PostgreSQL is not accepting connections yet (starting up or recovering)"
    } else {
        return None;
    })
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> StoreError {
        if let Some(why) = e.code().and_then(unavailable_because) {
            return StoreError::Unavailable(format!("PostgreSQL: {why}: {}", describe(&e)));
        }
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
