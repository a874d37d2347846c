//! Every command, flag and environment variable of `secretfs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "secretfs",
    version,
    about = "Secrets for containers: an encrypted store, mutual-TLS identity, and read-only in-memory mounts",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnArgs,

    /// Output format for commands that print data.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Text)]
    pub output: Format,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    pub fn is_long_running(&self) -> bool {
        matches!(
            self.command,
            Command::Mount(_)
                | Command::Other(
                    OtherCommand::Server(ServerCmd {
                        command: ServerSub::Run(_)
                    }) | OtherCommand::Dev(_)
                )
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// How to reach the server and as whom.
#[derive(Clone, Debug, Args)]
pub struct ConnArgs {
    /// Server address, https://HOST:PORT. Several servers (replicas): repeat the flag
    /// or give a comma list, in order of preference; a name with several addresses
    /// counts as several. A connection that fails moves on to the next.
    #[arg(
        long,
        global = true,
        env = "SECRETFS_SERVER",
        value_name = "ADDRESS[,ADDRESS...]"
    )]
    pub server: Vec<String>,
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long, global = true, env = "SECRETFS_CA")]
    pub ca: Option<PathBuf>,
    /// This identity's client certificate (PEM).
    #[arg(long, global = true, env = "SECRETFS_CERT")]
    pub cert: Option<PathBuf>,
    /// This identity's private key (PEM).
    #[arg(long, global = true, env = "SECRETFS_KEY")]
    pub key: Option<PathBuf>,
    /// Give up on an unanswering server after this long: connecting, and each call
    /// of a command (a mount uses it to connect, and waits 20 s for each of its own
    /// calls; open streams such as a mount's or a follow's are not cut off).
    #[arg(long, global = true, env = "SECRETFS_TIMEOUT", default_value = "10s",
          value_parser = parse_timeout, value_name = "DURATION")]
    pub timeout: Duration,
}

/// `--timeout`'s default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// `mount` apart from the rest: it alone drops privileges before the
/// async runtime starts (see `commands::prepare`), so the rest is a type
/// of its own that cannot hold a mount.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount this identity's secrets as read-only in-memory files.
    // Help lists `server` (0), then `mount`, then the rest in order.
    #[command(display_order = 1)]
    Mount(MountArgs),
    #[command(flatten)]
    Other(OtherCommand),
}

/// Every command but `mount`.
#[derive(Debug, Subcommand)]
// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum OtherCommand {
    /// Create or run the server.
    #[command(display_order = 0)]
    Server(ServerCmd),
    /// One command to a working local system: server, demo client, secret and mount.
    Dev(DevArgs),
    /// Add, rotate, inspect and delete secrets.
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Register and remove clients (identities).
    #[command(subcommand)]
    Client(ClientCmd),
    /// Groups link clients to secrets.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Which secrets a client can read, and through which groups.
    Access {
        /// The client's name.
        client: String,
    },
    /// Who the server sees this identity as, and what it may read.
    Whoami,
    /// Print a secret's content to stdout, read as this identity.
    Read {
        /// The secret's name (e.g. db/password).
        name: String,
    },
    /// Show the audit log.
    Audit(AuditArgs),
}

#[derive(Debug, Args)]
pub struct ServerCmd {
    #[command(subcommand)]
    pub command: ServerSub,
}

#[derive(Debug, Subcommand)]
pub enum ServerSub {
    /// Create a state directory: master key, CA, server and admin certificates, database.
    Init(InitArgs),
    /// Serve gRPC over mutual TLS until SIGINT/SIGTERM.
    Run(Box<RunArgs>),
    /// Break glass: mint an admin certificate on the server's host from the
    /// CA key in the state directory (works while the server runs; audited).
    AdminCert(AdminCertArgs),
    /// Issue the server a new certificate and key for these names; a running
    /// server takes them up within a second, without a restart.
    ReissueCert(ReissueCertArgs),
    /// Move the running server to a new master key, online: every data key
    /// is re-wrapped (content is not re-encrypted); a restart resumes it.
    /// Connects as an admin, like the other admin commands.
    Rekey(RekeyArgs),
    /// Check every authenticated row of the database against the master key
    /// (read beside a running server); exit 1 and list them if any is bad.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The state directory `server run` uses.
    #[arg(long, env = "SECRETFS_STATE_DIR")]
    pub state_dir: PathBuf,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// After review, take the rows as they are now as the row set (when
    /// rows were put back, deleted or added without the key); the server
    /// must be stopped. Bad rows stay bad. Audited as integrity.accept.
    #[arg(long)]
    pub accept: bool,
    /// With --accept: do not ask for confirmation (for scripts; without a terminal on stdin nothing is asked anyway).
    #[arg(long, short = 'y', requires = "accept")]
    pub yes: bool,
    #[command(flatten)]
    pub keys: KeyArgs,
}

/// Which master key provider (see the operator guide).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KeyProvider {
    /// DIR/master.key, mode 0600.
    File,
    /// A systemd credential (LoadCredentialEncrypted=), read from $CREDENTIALS_DIRECTORY.
    Systemd,
    /// A PKCS#11 token's AES key wraps the master key (DIR/master.key.wrapped).
    Pkcs11,
}

/// Where the master key lives: `server init` records it in the state
/// directory (master-key.json); the other server commands read that, and
/// these flags override its fields.
#[derive(Clone, Debug, Default, Args)]
pub struct KeyArgs {
    /// Where the master key lives (init default: file, or what the other key
    /// flags imply; later commands: what init recorded).
    #[arg(long, value_enum, env = "SECRETFS_MASTER_KEY_PROVIDER")]
    pub master_key_provider: Option<KeyProvider>,
    /// systemd provider: the credential holding the key, 64 hex digits or 32
    /// raw bytes, read from $CREDENTIALS_DIRECTORY (default secretfs-master-key).
    #[arg(long, value_name = "NAME", env = "SECRETFS_MASTER_KEY_CREDENTIAL")]
    pub master_key_credential: Option<String>,
    /// pkcs11 provider: the module (e.g. /usr/lib/softhsm/libsofthsm2.so).
    #[arg(long, value_name = "PATH", env = "SECRETFS_PKCS11_MODULE")]
    pub pkcs11_module: Option<PathBuf>,
    /// pkcs11 provider: the label of the token holding the wrapping key.
    #[arg(long, value_name = "LABEL", env = "SECRETFS_PKCS11_TOKEN")]
    pub pkcs11_token: Option<String>,
    /// pkcs11 provider: the label of the token's AES wrapping key (`server
    /// init` creates it, non-extractable, if the token has none).
    #[arg(long, value_name = "LABEL", env = "SECRETFS_PKCS11_KEY")]
    pub pkcs11_key: Option<String>,
    /// pkcs11 provider: a file holding the token's user PIN (or set
    /// SECRETFS_PKCS11_PIN; the PIN is never taken as a flag).
    #[arg(long, value_name = "FILE", env = "SECRETFS_PKCS11_PIN_FILE")]
    pub pkcs11_pin_file: Option<PathBuf>,
}

impl KeyArgs {
    pub fn options(&self) -> secretfs_server::key_provider::KeyOptions {
        use secretfs_server::key_provider::ProviderKind;
        secretfs_server::key_provider::KeyOptions {
            provider: self.master_key_provider.map(|p| match p {
                KeyProvider::File => ProviderKind::File,
                KeyProvider::Systemd => ProviderKind::Systemd,
                KeyProvider::Pkcs11 => ProviderKind::Pkcs11,
            }),
            credential: self.master_key_credential.clone(),
            pkcs11_module: self.pkcs11_module.clone(),
            pkcs11_token: self.pkcs11_token.clone(),
            pkcs11_key: self.pkcs11_key.clone(),
            pkcs11_pin_file: self.pkcs11_pin_file.clone(),
        }
    }
}

/// Which database (PostgreSQL) and its password; see the operator guide.
#[derive(Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL database, postgres://USER@HOST:PORT/DBNAME (libpq's URL
    /// form, e.g. ?sslmode=verify-full&sslrootcert=FILE). Default: SQLite in
    /// the state directory; after `server init` recorded one, that one. No
    /// password here (argv is visible to every user): see
    /// --database-password-file.
    #[arg(
        long,
        value_name = "URL",
        env = "SECRETFS_DATABASE_URL",
        hide_env_values = true
    )]
    pub database: Option<String>,
    /// A file (mode 0600) holding the database password (or set
    /// SECRETFS_DATABASE_PASSWORD, or put the URL with its password in
    /// SECRETFS_DATABASE_URL).
    #[arg(long, value_name = "FILE", env = "SECRETFS_DATABASE_PASSWORD_FILE")]
    pub database_password_file: Option<PathBuf>,
    /// --database may have come from the command line: true unless clap
    /// says it came from SECRETFS_DATABASE_URL (set from the matches after
    /// parsing; fails closed).
    #[arg(skip = true)]
    pub database_in_argv: bool,
}

impl Default for DatabaseArgs {
    fn default() -> Self {
        DatabaseArgs {
            database: None,
            database_password_file: None,
            database_in_argv: true,
        }
    }
}

// The URL may hold a password (from the environment): never printed.
impl std::fmt::Debug for DatabaseArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseArgs")
            .field(
                "database",
                &self
                    .database
                    .as_deref()
                    .map(secretfs_server::state_dir::shown),
            )
            .field("database_password_file", &self.database_password_file)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Args)]
pub struct RekeyArgs {
    /// systemd provider only: the credential holding the new key (load it
    /// with a second LoadCredentialEncrypted= line and restart first).
    #[arg(long, value_name = "NAME")]
    pub new_credential: Option<String>,
    /// Only show where a rekey stands (epoch, in progress); start nothing.
    #[arg(long)]
    pub status: bool,
    /// Start the rekey and return; do not wait for it to complete.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Args)]
pub struct AdminCertArgs {
    /// The state directory `server run` uses.
    #[arg(long, env = "SECRETFS_STATE_DIR")]
    pub state_dir: PathBuf,
    /// Where to write NAME.pem, NAME.key and ca.pem (replaced atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// The admin client to issue for (created, with the admin role, if missing).
    #[arg(long, default_value = "admin")]
    pub name: String,
    /// Certificate lifetime in days, 1 to 3650 (default 365).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub days: Option<u32>,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Args)]
pub struct ReissueCertArgs {
    /// The state directory `server run` uses.
    #[arg(long, env = "SECRETFS_STATE_DIR")]
    pub state_dir: PathBuf,
    /// DNS name or IP address clients reach the server by (repeatable; give every one: the old names are replaced).
    #[arg(long = "san", required = true)]
    pub sans: Vec<String>,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The state directory to create (new or empty); `server run` takes the same.
    #[arg(long, env = "SECRETFS_STATE_DIR")]
    pub state_dir: PathBuf,
    /// SPIFFE trust domain of the client identities.
    #[arg(long, default_value = "secretfs.local", env = "SECRETFS_TRUST_DOMAIN")]
    pub trust_domain: String,
    /// DNS name or IP address for the server certificate (repeatable, or
    /// comma-separated in the variable; default localhost, 127.0.0.1, ::1).
    #[arg(long = "san", env = "SECRETFS_SAN", value_delimiter = ',')]
    pub sans: Vec<String>,
    /// The address the printed SECRETFS_SERVER line points at.
    #[arg(long, default_value = "127.0.0.1:7443", env = "SECRETFS_ADVERTISE")]
    pub advertise: String,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Add a replica on a PostgreSQL database other servers already use:
    /// DIR is a copy of one replica's state directory (its master key, CA
    /// and admin identity are shared; this server gets its own certificate).
    #[arg(long, value_name = "DIR", env = "SECRETFS_JOIN")]
    pub join: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The state directory `server init` made; one server at a time uses it
    /// (it holds the lock file DIR/lock while it runs).
    #[arg(long, env = "SECRETFS_STATE_DIR")]
    pub state_dir: PathBuf,
    /// Address to serve mutual-TLS gRPC on, HOST:PORT (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7443", env = "SECRETFS_LISTEN")]
    pub listen: SocketAddr,
    /// Largest secret accepted, in bytes.
    #[arg(long, default_value_t = 1024 * 1024, env = "SECRETFS_MAX_SECRET_SIZE",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_secret_size: usize,
    /// Also accept client certificates from this CA bundle (bring your own
    /// PKI; repeatable, or comma-separated in the variable).
    #[arg(long, env = "SECRETFS_CLIENT_CA", value_delimiter = ',')]
    pub client_ca: Vec<PathBuf>,
    /// Also serve the standard gRPC health service, and nothing else, in
    /// plain text on this address (for Kubernetes gRPC probes, which speak
    /// no TLS). Off by default.
    #[arg(long, env = "SECRETFS_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Open client connections at most (default: what the file descriptor
    /// limit allows). At the cap, the oldest connection still in its TLS
    /// handshake is dropped for the newcomer.
    #[arg(long, env = "SECRETFS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Once listening, write the bound addresses as JSON to this file,
    /// {"addr":"HOST:PORT","health_addr":"HOST:PORT"|null} (for scripts and
    /// supervisors that start the server on port 0). Replaced atomically.
    #[arg(long, value_name = "PATH", env = "SECRETFS_ADDRESS_FILE")]
    pub address_file: Option<PathBuf>,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// During a rekey: secret versions re-wrapped per transaction.
    #[arg(long, default_value_t = 500, env = "SECRETFS_REKEY_BATCH",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub rekey_batch: usize,
    /// During a rekey: pause between batches (e.g. 10ms, to spare a busy disk).
    #[arg(long, default_value = "0s", env = "SECRETFS_REKEY_PAUSE", value_parser = parse_duration)]
    pub rekey_pause: Duration,
    /// Also write every audit entry, with its chain value, as JSON lines to
    /// this file (created 0600, rotated by size), or `-` for stdout (for
    /// journald and log shippers). While it cannot be written, every
    /// request is refused and health says NOT_SERVING.
    #[arg(long, value_name = "PATH|-", env = "SECRETFS_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Rotate the --audit-log file before it grows past this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 100 * 1024 * 1024,
          env = "SECRETFS_AUDIT_LOG_MAX_SIZE",
          value_parser = clap::value_parser!(u64).range(4096..))]
    pub audit_log_max_size: u64,
    /// Rotated --audit-log files kept: PATH.1 (newest) to PATH.N (at least 1:
    /// the file is renamed, never removed, so a crash mid-rotation loses no
    /// line).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 5,
        env = "SECRETFS_AUDIT_LOG_KEEP",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub audit_log_keep: u32,
    /// Seconds a write to --audit-log may block (a stalled reader of
    /// stdout, a hung filesystem) before requests are refused; for tests.
    #[arg(long, hide = true, default_value_t = 10, env = "SECRETFS_AUDIT_LOG_STALL_SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_log_stall_secs: u64,
    /// Seconds between checks of the row set while running (default one
    /// hour); for tests.
    #[arg(long, hide = true, default_value_t = 3600, env = "SECRETFS_INTEGRITY_CHECK_SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub integrity_check_secs: u64,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// An empty directory to mount on.
    pub mountpoint: PathBuf,
    /// Owner of files whose secret sets none.
    #[arg(long, default_value_t = 0)]
    pub uid: u32,
    /// Group of files whose secret sets none.
    #[arg(long, default_value_t = 0)]
    pub gid: u32,
    /// Mode of files whose secret sets none (octal).
    #[arg(long, default_value = "0400", value_parser = parse_mode)]
    pub mode: u32,
    /// Full resync interval, a safety net: changes arrive as they commit over a Watch stream (at least 1s).
    #[arg(long, default_value = "10m", value_parser = parse_refresh)]
    pub refresh: Duration,
    /// Give up if the first sync has not succeeded by then.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub start_timeout: Duration,
    /// Fail closed: once cut off from the server longer than this, reads fail with EIO (off by default).
    #[arg(long, value_parser = parse_duration)]
    pub max_stale: Option<Duration>,
    /// Only processes of this container may use the mount (its id as runc,
    /// Docker, containerd, CRI-O or Kubernetes write it; repeatable).
    #[arg(long = "container", value_name = "ID")]
    pub containers: Vec<String>,
    /// Also allow processes in this cgroup (a path prefix; repeatable).
    #[arg(long = "allow-cgroup", value_name = "PATH")]
    pub allow_cgroups: Vec<String>,
    /// With the caller check, let anyone read .secretfs/status (it names the secrets; by default it is checked too).
    #[arg(long, conflicts_with = "strict_status")]
    pub public_status: bool,
    /// The default with the caller check (kept for old command lines): .secretfs/status is checked too.
    #[arg(long, hide = true)]
    pub strict_status: bool,
    /// Owner of every secret file, whatever the secret sets (for images that run as a fixed uid).
    #[arg(long, value_name = "UID")]
    pub force_uid: Option<u32>,
    /// Group of every secret file, whatever the secret sets.
    #[arg(long, value_name = "GID")]
    pub force_gid: Option<u32>,
    /// Mode of every secret file (octal, 0001 to 0777), whatever the secret sets.
    #[arg(long, value_name = "MODE", value_parser = parse_force_mode)]
    pub force_mode: Option<u32>,
    /// Create the mountpoint (mode 0755, with missing parents) when it does not exist.
    #[arg(long)]
    pub create_mountpoint: bool,
    /// Return once the mount is ready (exit 0, printing its pid) or has failed (non-zero,
    /// with the reason); the mount keeps running in the background.
    #[arg(long)]
    pub background: bool,
    /// With --background: append the mount's log to this file (default: the terminal
    /// when stderr is one, else nowhere).
    #[arg(long, value_name = "PATH", requires = "background")]
    pub log_file: Option<PathBuf>,
    /// Never renew the client certificate (by default the mount renews it at about
    /// 2/3 of its life and replaces the --cert/--key files); renew it yourself then.
    #[arg(long)]
    pub no_renew: bool,
    /// The first certificate renewal this long after start instead of at 2/3 of its
    /// life (for tests).
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub renew_after: Option<Duration>,
    /// Set by --background on the process it starts: detach from the terminal's session.
    #[arg(long, hide = true, conflicts_with = "background")]
    pub background_child: bool,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// State, certificates and the mount live here (reused when it exists).
    #[arg(long, default_value = "secretfs-dev")]
    pub dir: PathBuf,
    /// Address the dev server listens on.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// Do not mount (for machines without FUSE).
    #[arg(long)]
    pub no_mount: bool,
}

#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Add a secret; content from stdin or --from-file, never from the command line.
    Add(SecretAddArgs),
    /// Add a new version; content from stdin or --from-file.
    Rotate {
        /// The secret's name.
        name: String,
        /// Read the content from this file instead of stdin.
        #[arg(long)]
        from_file: Option<PathBuf>,
        /// Accept empty content.
        #[arg(long)]
        allow_empty: bool,
        /// The new version's expiry, RFC 3339. Without --expires or
        /// --no-expires the expiry is kept, unless it has passed: then it
        /// is cleared.
        #[arg(long, value_parser = parse_rfc3339, conflicts_with = "no_expires")]
        expires: Option<i64>,
        /// The new version never expires.
        #[arg(long)]
        no_expires: bool,
        /// Accept an --expires time in the past.
        #[arg(long)]
        force: bool,
    },
    /// Change metadata (mode, owner, group, description, labels, expiry)
    /// without a new version; live mounts apply it.
    Update(SecretUpdateArgs),
    /// List all secrets (metadata only).
    List,
    /// Show one secret's metadata.
    Describe {
        /// The secret's name.
        name: String,
    },
    /// List a secret's versions.
    Versions {
        /// The secret's name.
        name: String,
    },
    /// Make an earlier version current again.
    Rollback {
        /// The secret's name.
        name: String,
        /// The version to make current (`secret versions NAME` lists them).
        #[arg(long)]
        to: u64,
    },
    /// Delete a secret and all its versions; it leaves every mount.
    /// On a terminal, asks first.
    Delete {
        /// The secret's name.
        name: String,
        /// Do not ask for confirmation (for scripts; without a terminal on stdin nothing is asked anyway).
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

#[derive(Debug, Args)]
pub struct SecretAddArgs {
    /// The secret's name: segments of A-Z a-z 0-9 . _ - joined by / (a segment becomes a directory in the mount).
    pub name: String,
    /// Read the content from this file instead of stdin.
    #[arg(long)]
    pub from_file: Option<PathBuf>,
    /// Accept empty content.
    #[arg(long)]
    pub allow_empty: bool,
    /// File mode in the mount (octal); default: the mount's (0400).
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<u32>,
    /// Owner uid of the mounted file.
    #[arg(long)]
    pub owner: Option<u32>,
    /// Group gid of the mounted file.
    #[arg(long)]
    pub group: Option<u32>,
    /// A description for operators (stored as plain text).
    #[arg(long, default_value = "")]
    pub description: String,
    /// KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Expiry time, RFC 3339 (e.g. 2027-01-31T00:00:00Z).
    #[arg(long, value_parser = parse_rfc3339)]
    pub expires: Option<i64>,
    /// Accept an --expires time in the past.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct SecretUpdateArgs {
    /// The secret's name.
    pub name: String,
    /// File mode in the mount (octal); 0 = the mount's default.
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<u32>,
    /// Owner uid of the mounted file, or "none" for the mount's default.
    #[arg(long, value_parser = parse_id_or_none)]
    pub owner: Option<IdOrNone>,
    /// Group gid of the mounted file, or "none" for the mount's default.
    #[arg(long, value_parser = parse_id_or_none)]
    pub group: Option<IdOrNone>,
    /// New description ("" clears it).
    #[arg(long)]
    pub description: Option<String>,
    /// Set a label, KEY=VALUE (repeatable); other labels are kept.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Remove a label by key (repeatable).
    #[arg(long = "remove-label")]
    pub remove_labels: Vec<String>,
    /// Remove every label first (with --label: replace the set).
    #[arg(long)]
    pub clear_labels: bool,
    /// Expiry time, RFC 3339 (e.g. 2027-01-31T00:00:00Z).
    #[arg(long, value_parser = parse_rfc3339, conflicts_with = "no_expires")]
    pub expires: Option<i64>,
    /// Remove the expiry.
    #[arg(long)]
    pub no_expires: bool,
    /// Accept an --expires time in the past.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum ClientCmd {
    /// Register a client and issue its certificate (the key is made here and never sent).
    Add(ClientAddArgs),
    /// List clients.
    List,
    /// Show one client.
    Describe {
        /// The client's name.
        name: String,
    },
    /// Remove a client; it is locked out at once. On a terminal, asks first.
    Remove {
        /// The client's name.
        name: String,
        /// Do not ask for confirmation (for scripts; without a terminal on stdin nothing is asked anyway).
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Issue a new certificate: without NAME for this identity (a new key is
    /// made here and never sent; the files given by --cert/--key are replaced
    /// in place), with NAME an admin issues one for that client. Same
    /// identity and groups; the old certificate stays valid until it expires.
    Renew(ClientRenewArgs),
}

#[derive(Debug, Args)]
pub struct ClientRenewArgs {
    /// The client to issue for (needs the admin role); default: this identity.
    pub name: Option<String>,
    /// Sign this CSR (PEM) instead of making a key here (no key is written).
    #[arg(long)]
    pub csr: Option<PathBuf>,
    /// Certificate lifetime in days, 1 to 3650 (default 365). Renewing your own: at most, and by default, your current certificate's lifetime.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub days: Option<u32>,
    /// Write NAME.pem, NAME.key and ca.pem here (replaced atomically).
    /// Default: for this identity without --csr, the files of --cert and
    /// --key themselves; otherwise the current directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ClientAddArgs {
    /// The client's name (letters, digits, '.', '_', '-').
    pub name: String,
    /// Where to write NAME.pem, NAME.key and ca.pem.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Give the client the admin role.
    #[arg(long)]
    pub admin: bool,
    /// Certificate lifetime in days, 1 to 3650 (default 365).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub days: Option<u32>,
    /// Sign this CSR (PEM) instead of making a key here.
    #[arg(long, conflicts_with = "external")]
    pub csr: Option<PathBuf>,
    /// Register only: the client's certificate comes from your own CA (see `server run --client-ca`).
    #[arg(long)]
    pub external: bool,
}

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Create a group.
    Add {
        /// The group's name.
        name: String,
        /// A description for operators (stored as plain text).
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List groups with their clients and secrets.
    List,
    /// Remove a group (its grants go with it). On a terminal, asks first.
    Remove {
        /// The group's name.
        name: String,
        /// Do not ask for confirmation (for scripts; without a terminal on stdin nothing is asked anyway).
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Let a client read the group's secrets.
    AddClient {
        /// The group's name.
        group: String,
        /// The client's name.
        client: String,
    },
    /// Take a client out of the group; it loses the group's secrets.
    RemoveClient {
        /// The group's name.
        group: String,
        /// The client's name.
        client: String,
    },
    /// Grant the group's clients a secret.
    AddSecret {
        /// The group's name.
        group: String,
        /// The secret's name.
        secret: String,
    },
    /// Take a secret out of the group; its clients lose it (unless another group grants it).
    RemoveSecret {
        /// The group's name.
        group: String,
        /// The secret's name.
        secret: String,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: Option<AuditSub>,
    /// Events by or about this client.
    #[arg(long)]
    pub client: Option<String>,
    /// Events about this secret.
    #[arg(long)]
    pub secret: Option<String>,
    /// From this time: RFC 3339, or a duration ago (e.g. 1h, 30m).
    #[arg(long, value_parser = parse_since)]
    pub since: Option<i64>,
    /// At most this many (newest) events, 1 to 100000.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub limit: u32,
    /// Only this action (e.g. secret.read), or a family (secret.*).
    #[arg(long)]
    pub action: Option<String>,
    /// Only allowed or only refused events.
    #[arg(long, value_enum)]
    pub outcome: Option<Outcome>,
    /// Keep printing new events as they are written (Ctrl-C ends).
    #[arg(long)]
    pub follow: bool,
}

#[derive(Debug, Subcommand)]
pub enum AuditSub {
    /// Check the audit hash chain end to end: every entry's MAC, the links
    /// between them, the head row and the external sink. Exit 0 when whole,
    /// 1 naming the first break (edited, deleted, inserted, reordered,
    /// truncated tail, head row edited).
    Verify,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Outcome {
    Allowed,
    Refused,
}

pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let mode = u32::from_str_radix(digits, 8)
        .map_err(|_| format!("{s:?} is not an octal mode (e.g. 0400)"))?;
    if mode > 0o777 {
        return Err(format!("{s}: give permission bits only, 0 to 0777"));
    }
    Ok(mode)
}

/// `--force-mode`: 0 would make every file unreadable (0000), while
/// `--mode 0` and `secret update --mode 0` mean "the default": refused.
fn parse_force_mode(s: &str) -> Result<u32, String> {
    match parse_mode(s)? {
        0 => Err(format!(
            "{s:?} would make every secret file mode 0000, readable by nobody; give the mode the files \
             must have (e.g. 0440), or leave --force-mode out to keep each secret's own"
        )),
        m => Ok(m),
    }
}

/// A duration over zero: a zero timeout would fail every call.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!(
            "{s:?} would fail every call at once; give the longest wait that is acceptable, e.g. 10s"
        )),
        d => Ok(d),
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); e.g. 500ms, 30s, 5m"))
}

/// A uid/gid, or none (the mount's default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdOrNone(pub Option<u32>);

impl IdOrNone {
    /// A flag as an update's (value, clear) pair: an id sets it, "none"
    /// clears it, no flag leaves it.
    pub fn update(given: Option<IdOrNone>) -> (Option<u32>, bool) {
        match given {
            Some(IdOrNone(None)) => (None, true),
            Some(IdOrNone(id)) => (id, false),
            None => (None, false),
        }
    }
}

fn parse_id_or_none(s: &str) -> Result<IdOrNone, String> {
    if s == "none" {
        return Ok(IdOrNone(None));
    }
    s.parse()
        .map(|id| IdOrNone(Some(id)))
        .map_err(|_| format!("{s:?} is neither a numeric id nor \"none\" (the mount's default)"))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    Ok((k.to_owned(), v.to_owned()))
}

fn parse_rfc3339(s: &str) -> Result<i64, String> {
    let t = humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time ({e}); e.g. 2027-01-31T00:00:00Z"))?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0))
}

fn parse_since(s: &str) -> Result<i64, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        let now = std::time::SystemTime::now();
        let t = now.checked_sub(d).unwrap_or(std::time::UNIX_EPOCH);
        return Ok(t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0));
    }
    parse_rfc3339(s)
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a duration like 1h"))
}

/// The lower bound of `--refresh`: each full resync reads (and audits)
/// every secret of the client; `0s` made ~1,750 audit rows a second.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);

fn parse_refresh(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < MIN_REFRESH {
        return Err(format!(
            "{s} is too short: the full resync is only a safety net (changes arrive over the \
             Watch stream as they commit) and each one reads and audits every secret; give 1s \
             or more (default 10m)"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0400"), Ok(0o400));
        assert_eq!(parse_mode("640"), Ok(0o640));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("4755").is_err());
    }

    #[test]
    fn refresh_has_a_lower_bound() {
        assert_eq!(parse_refresh("1s"), Ok(Duration::from_secs(1)));
        assert!(parse_refresh("0s").unwrap_err().contains("give 1s or more"));
        assert!(parse_refresh("999ms").is_err());
    }

    #[test]
    fn since_takes_durations_and_times() {
        let an_hour_ago = parse_since("1h").unwrap();
        let now = parse_since("0s").unwrap();
        assert!((3599..=3601).contains(&(now - an_hour_ago)));
        assert_eq!(parse_since("1970-01-01T00:01:00Z"), Ok(60));
        assert!(parse_since("yesterday").is_err());
    }

    #[test]
    fn owner_and_group_take_an_id_or_none() {
        assert_eq!(parse_id_or_none("1234"), Ok(IdOrNone(Some(1234))));
        assert_eq!(parse_id_or_none("none"), Ok(IdOrNone(None)));
        assert_eq!(IdOrNone::update(Some(IdOrNone(Some(7)))), (Some(7), false));
        assert_eq!(IdOrNone::update(Some(IdOrNone(None))), (None, true));
        assert_eq!(IdOrNone::update(None), (None, false));
        assert!(parse_id_or_none("root").unwrap_err().contains("none"));
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// Every flag and positional of every command, by its path
    /// (`secretfs secret delete --yes`), with what `f` says of it.
    fn every_arg(f: impl Fn(&clap::Arg) -> bool) -> Vec<String> {
        fn walk(
            cmd: &clap::Command,
            path: &str,
            f: &dyn Fn(&clap::Arg) -> bool,
            out: &mut Vec<String>,
        ) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                // clap's own --help and --version.
                if matches!(id, "help" | "version") {
                    continue;
                }
                if !f(arg) {
                    out.push(format!("{path} <{id}>"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), f, out);
            }
        }
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        cmd.build();
        let mut out = Vec::new();
        walk(&cmd, "secretfs", &f, &mut out);
        out
    }

    #[test]
    fn every_flag_and_positional_has_help() {
        let missing = every_arg(|a| a.get_help().is_some() || a.get_long_help().is_some());
        assert!(
            missing.is_empty(),
            "arguments without help text: {missing:#?}"
        );
    }

    /// The systemd unit sets the server's settings through the
    /// environment: every `server init`/`server run` flag has a
    /// `SECRETFS_*` form. (`admin-cert` and `reissue-cert` are one-off
    /// commands an operator types; only their --state-dir is shared.)
    #[test]
    fn every_server_flag_has_an_environment_form() {
        let missing = every_arg(|a| {
            a.is_global_set()
                || a.get_env()
                    .is_some_and(|e| e.to_string_lossy().starts_with("SECRETFS_"))
        });
        let missing: Vec<_> = missing
            .into_iter()
            .filter(|p| {
                p.starts_with("secretfs server init ") || p.starts_with("secretfs server run ")
            })
            .collect();
        assert!(
            missing.is_empty(),
            "server flags without SECRETFS_*: {missing:#?}"
        );
    }

    #[test]
    fn zero_is_refused_where_it_would_mean_nothing_or_forever() {
        use clap::Parser;
        let parse = |args: &[&str]| {
            Cli::try_parse_from(args)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let err = parse(&["secretfs", "client", "add", "x", "--days", "0"]).unwrap_err();
        assert!(err.contains("1..=3650"), "{err}");
        parse(&["secretfs", "client", "add", "x", "--days", "1"]).unwrap();
        let err = parse(&["secretfs", "audit", "--limit", "0"]).unwrap_err();
        assert!(err.contains("1..=100000"), "{err}");
        let err = parse(&["secretfs", "--timeout", "0s", "whoami"]).unwrap_err();
        assert!(err.contains("every call"), "{err}");
        let err = parse(&["secretfs", "mount", "/m", "--force-mode", "0"]).unwrap_err();
        assert!(err.contains("readable by nobody"), "{err}");
        parse(&["secretfs", "mount", "/m", "--force-mode", "0440"]).unwrap();
        let err = parse(&[
            "secretfs",
            "server",
            "run",
            "--state-dir",
            "d",
            "--max-secret-size",
            "0",
        ])
        .unwrap_err();
        assert!(err.contains("--max-secret-size"), "{err}");
    }
}
