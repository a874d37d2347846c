//! Connection settings (flags or `SECRETFS_*`) into clients: the files
//! are read and checked here, before anything goes over the network, and
//! every connection and call is bounded by `--timeout`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use secretfs_proto::channel::{ChannelError, ConnectFailure};
use secretfs_proto::credentials::{self, ClientFiles, FileContents, FileWarning};
use secretfs_proto::servers::ServerList;
use secretfs_proto::v1::admin_client::AdminClient;
use secretfs_proto::v1::secrets_client::SecretsClient;
use secretfs_proto::ConnectConfig;
use tonic::transport::Channel;

use crate::args::ConnArgs;
use crate::fail::UsageError;

/// Replies can carry many secrets at once (a mount's first sync).
const MAX_REPLY: usize = 256 * 1024 * 1024;

/// The server (the list until one answered) and `--timeout` of this
/// process's connection, for the message when a call runs out of time
/// (`fail` reads it).
static BOUND: Mutex<Option<(String, Duration)>> = Mutex::new(None);

fn bound(server: String, limit: Duration) {
    *BOUND.lock().unwrap_or_else(PoisonError::into_inner) = Some((server, limit));
}

/// `--server` (repeated, or comma lists, or `SECRETFS_SERVER`) as one
/// comma list, checked: an empty item or a bad address is a usage error
/// naming it.
fn servers(args: &ConnArgs) -> Result<String> {
    if args.server.is_empty() {
        return Err(missing("--server", "SECRETFS_SERVER"));
    }
    let joined = args.server.join(",");
    // Checked here (a usage error); `connect_any` reads the same text.
    ServerList::parse(&joined).map_err(|e| UsageError(format!("--server/SECRETFS_SERVER: {e}")))?;
    Ok(joined)
}

fn missing(flag: &str, env: &str) -> anyhow::Error {
    UsageError(format!(
        "no {flag} given: pass {flag} or set {env} (`secretfs server init` and `secretfs dev` print the export lines)"
    ))
    .into()
}

fn need<'a, T>(value: &'a Option<T>, flag: &str, env: &str) -> Result<&'a T> {
    value.as_ref().ok_or_else(|| missing(flag, env))
}

fn read_file(path: &Path, what: &str, flag: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| {
        format!(
            "cannot read the {what} {} (given by {flag})",
            path.display()
        )
    })
}

/// Reads and checks the CA, certificate and key of a mount, so a wrong file
/// is named before it connects. Warnings are logged, but not that the
/// certificate expires soon: the mount renews it itself and warns when its
/// planned renewal has not happened.
pub fn config(args: &ConnArgs) -> Result<ConnectConfig> {
    checked_config(args, false)
}

/// The CA, certificate and key, read and checked; what is worth saying
/// about them is logged. A certificate that expires soon is said on stderr
/// with `expiring_on_stderr`, else not at all.
fn checked_config(args: &ConnArgs, expiring_on_stderr: bool) -> Result<ConnectConfig> {
    let server = servers(args)?;
    let ca: &PathBuf = need(&args.ca, "--ca", "SECRETFS_CA")?;
    let cert: &PathBuf = need(&args.cert, "--cert", "SECRETFS_CERT")?;
    let key: &PathBuf = need(&args.key, "--key", "SECRETFS_KEY")?;
    let config = ConnectConfig {
        server,
        ca_pem: read_file(ca, "CA certificate", "--ca/SECRETFS_CA")?,
        cert_pem: read_file(cert, "client certificate", "--cert/SECRETFS_CERT")?,
        key_pem: zeroize::Zeroizing::new(read_file(key, "client key", "--key/SECRETFS_KEY")?),
        connect_timeout: args.timeout,
    };
    let files = ClientFiles {
        ca: FileContents {
            path: ca,
            pem: &config.ca_pem,
        },
        cert: FileContents {
            path: cert,
            pem: &config.cert_pem,
        },
        key: FileContents {
            path: key,
            pem: &config.key_pem,
        },
    };
    // Said even when the check below refuses the files.
    if let Some(warning) = credentials::key_permissions(key) {
        tracing::warn!("{warning}");
    }
    let warnings = credentials::check_client_files(&files, SystemTime::now())
        .map_err(|e| anyhow::anyhow!(e.explain()))?;
    for warning in warnings {
        match warning {
            // On stderr, so an operator hears of it while the certificate
            // can still renew itself.
            FileWarning::Expiring { .. } if expiring_on_stderr => eprintln!("warning: {warning}"),
            FileWarning::Expiring { .. } => {}
            _ => tracing::warn!("{warning}"),
        }
    }
    Ok(config)
}

/// Why a call or connection ran out of time, naming the bound and the fix;
/// `None` before any connection was configured.
pub fn timed_out(detail: Option<&str>) -> Option<String> {
    let (server, limit) = BOUND
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()?;
    Some(format!(
        "no answer from {server} within {} (--timeout/SECRETFS_TIMEOUT){}: the server may be stopped, stuck or \
         overloaded, or unreachable; check that `secretfs server run` is up and answering at that address, \
         or allow longer with --timeout DURATION",
        humantime::format_duration(limit),
        detail.map(|d| format!(" ({d})")).unwrap_or_default()
    ))
}

/// Connects to the first address of `--server` that answers, in order:
/// each name's lookup and each address's attempt is bounded by `--timeout`
/// (a timeout is that address's failure, named with the others when none
/// answers), so a list costs at most one `--timeout` per address. Each
/// call on the channel is bounded by it too (until the server begins its
/// answer, so a stream may stay open). A call stays on the server that
/// answered: a command is never sent twice.
pub async fn channel(args: &ConnArgs) -> Result<Channel> {
    let config = checked_config(args, true)?;
    let limit = args.timeout;
    bound(config.server.clone(), limit);
    match secretfs_proto::connect_any(&config, Some(limit)).await {
        Ok((channel, connected)) => {
            for e in &connected.passed_over {
                tracing::debug!(error = %e, "passed over a server");
            }
            bound(connected.target().to_string(), limit);
            Ok(channel)
        }
        Err(ChannelError::Connect {
            failure: ConnectFailure::Timeout,
            ..
        }) => Err(anyhow::anyhow!(
            timed_out(None).unwrap_or_else(|| "timed out".into())
        )),
        Err(e) => Err(e.into()),
    }
}

pub async fn admin(args: &ConnArgs) -> Result<AdminClient<Channel>> {
    Ok(AdminClient::new(channel(args).await?).max_decoding_message_size(MAX_REPLY))
}

pub async fn secrets(args: &ConnArgs) -> Result<SecretsClient<Channel>> {
    Ok(SecretsClient::new(channel(args).await?).max_decoding_message_size(MAX_REPLY))
}
