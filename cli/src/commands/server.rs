//! `secretfs server init|run|admin-cert|reissue-cert|verify`

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use secretfs_server::audit_sink::{SinkOptions, SinkTarget};
use secretfs_server::{InitOptions, RunOptions, Server, StateDir};
use serde_json::json;

use secretfs_server::state_dir::{absolute, DatabaseOptions, TakenEnv};
use zeroize::Zeroizing;

use crate::args::{
    Cli, Command, ConnArgs, DatabaseArgs, Format, OtherCommand, RekeyArgs, ServerCmd, ServerSub,
    VerifyArgs,
};

/// The password's environment variable (a flag would put it in argv).
pub const DATABASE_PASSWORD_ENV: &str = "SECRETFS_DATABASE_PASSWORD";

/// Records whether `--database` came from the command line (where a
/// password is refused) rather than SECRETFS_DATABASE_URL.
pub fn note_database_source(cli: &mut Cli, matches: &clap::ArgMatches) {
    let Command::Other(OtherCommand::Server(ServerCmd { command })) = &mut cli.command else {
        return;
    };
    let db = match command {
        ServerSub::Init(a) => &mut a.database,
        ServerSub::Run(a) => &mut a.database,
        ServerSub::AdminCert(a) => &mut a.database,
        ServerSub::Verify(a) => &mut a.database,
        ServerSub::ReissueCert(_) | ServerSub::Rekey(_) => return,
    };
    // Asked only of the commands that have the flag (clap panics on an
    // id a command does not know).
    let mut leaf = matches;
    while let Some((_, sub)) = leaf.subcommand() {
        leaf = sub;
    }
    // Fails closed: only a URL clap says came from the environment may
    // hold a password.
    db.database_in_argv =
        leaf.value_source("database") != Some(clap::parser::ValueSource::EnvVariable);
}

/// The database flags as the server takes them: the password from
/// `--database-password-file` or SECRETFS_DATABASE_PASSWORD, never from a
/// URL on the command line.
pub fn database_options(a: &DatabaseArgs) -> Result<DatabaseOptions> {
    database_options_from(a, ENV_PASSWORD.get())
}

/// SECRETFS_DATABASE_PASSWORD as it was at start (see [`take_environment`]).
static ENV_PASSWORD: TakenEnv = TakenEnv::new(DATABASE_PASSWORD_ENV);

/// Takes the secrets the environment may hold (the database password, a
/// URL with its password, the PKCS#11 PIN) out of the process
/// environment, so no child process and no later getenv (a C library's
/// too) sees them. (The kernel's copy of the start-up environment in
/// /proc/PID/environ stays, readable by the same user and root only.)
/// Call in `main` after the arguments are parsed (clap has read
/// SECRETFS_DATABASE_URL) and before any thread or runtime starts:
/// changing the environment races other threads' getenv.
pub fn take_environment() {
    ENV_PASSWORD.take();
    std::env::remove_var(DATABASE_URL_ENV);
    secretfs_server::key_provider::take_pin_from_environment();
}

/// The URL's environment variable (clap reads it for --database).
pub const DATABASE_URL_ENV: &str = "SECRETFS_DATABASE_URL";

fn database_options_from(
    a: &DatabaseArgs,
    env_password: Option<Zeroizing<String>>,
) -> Result<DatabaseOptions> {
    if let Some(url) = &a.database {
        // Whether the URL holds a password is the driver's reading of it
        // (`pass%77ord=` is one too), so the URL is parsed here first.
        if a.database_in_argv && secretfs_server::store::is_postgres_url(url) {
            let cfg = secretfs_server::state_dir::parse_url(url, None)?;
            if cfg.password_given() {
                // The URL is not repeated: what a redactor misses of it
                // would be printed here.
                anyhow::bail!(
                    "--database: a password in the URL on the command line is visible to every user of \
                     this host (ps, /proc); give it in --database-password-file FILE (mode 0600), in \
                     {DATABASE_PASSWORD_ENV}, or put the whole URL in SECRETFS_DATABASE_URL instead of --database"
                );
            }
        }
    }
    let password = match (&a.database_password_file, env_password) {
        (Some(file), _) => Some(secretfs_server::state_dir::read_private_file(
            file,
            "database password",
            "--database-password-file",
        )?),
        (None, Some(p)) => Some(p),
        (None, None) => None,
    };
    Ok(DatabaseOptions {
        url: a.database.clone().map(Zeroizing::new),
        password,
    })
}

/// What `server run` needs besides the state directory on PostgreSQL: the
/// database password (never recorded in the state directory).
fn password_hint(on_postgres: bool, a: &DatabaseArgs) -> String {
    if !on_postgres {
        return String::new();
    }
    match &a.database_password_file {
        Some(file) => format!(" --database-password-file {}", absolute(file).display()),
        None => format!(
            " --database-password-file FILE  (or with {DATABASE_PASSWORD_ENV} set; the password \
             is not kept in the state directory)"
        ),
    }
}

/// The lines that point the CLI at a server as the admin in `dir`.
pub fn export_lines(dir: &StateDir, server: &str) -> String {
    format!(
        "export SECRETFS_SERVER=https://{server}\n\
         export SECRETFS_CA={}\n\
         export SECRETFS_CERT={}\n\
         export SECRETFS_KEY={}\n",
        absolute(&dir.ca_cert()).display(),
        absolute(&dir.admin_cert()).display(),
        absolute(&dir.admin_key()).display(),
    )
}

/// Writes `--address-file` whole or not at all (a reader sees the whole
/// file or none). It holds no secret (mode 0644).
fn write_address_file(path: &Path, addr: SocketAddr, health: Option<SocketAddr>) -> Result<()> {
    let text = serde_json::to_string(&json!({
        "addr": addr.to_string(),
        "health_addr": health.map(|a| a.to_string()),
    }))?;
    secretfs_proto::files::replace_file(path, format!("{text}\n").as_bytes(), 0o644).with_context(
        || {
            format!(
                "cannot write the address file {} (--address-file); check that its directory exists and is writable",
                path.display()
            )
        },
    )
}

fn rekey_json(s: &secretfs_proto::v1::RekeyStatus) -> serde_json::Value {
    json!({
        "epoch": s.epoch, "in_progress": s.in_progress, "rewrapped": s.rewrapped,
        "error": (!s.error.is_empty()).then_some(&s.error),
    })
}

/// `server rekey`: start (or only look at) a rekey, and wait for it.
async fn rekey(conn: &ConnArgs, a: RekeyArgs, format: Format) -> Result<()> {
    use secretfs_proto::v1;
    let mut c = crate::connect::admin(conn).await?;
    let mut status = if a.status {
        c.get_rekey_status(v1::Empty {}).await?.into_inner()
    } else {
        let s = c
            .rekey(v1::RekeyRequest {
                new_credential: a.new_credential.unwrap_or_default(),
            })
            .await?
            .into_inner();
        if format == Format::Text {
            eprintln!(
                "rekey to master key epoch {} started; every write now uses the new key",
                s.epoch
            );
        }
        if !a.no_wait {
            let mut s = s;
            while s.in_progress && s.error.is_empty() {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                s = c.get_rekey_status(v1::Empty {}).await?.into_inner();
            }
            s
        } else {
            s
        }
    };
    if !status.error.is_empty() {
        anyhow::bail!(
            "the rekey to epoch {} stopped: {} (the server resumes it at its next start)",
            status.epoch,
            std::mem::take(&mut status.error)
        );
    }
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&rekey_json(&status))?),
        Format::Text => println!(
            "master key epoch {}{}",
            status.epoch,
            if status.in_progress {
                " (rekey in progress: old and new keys both in use)"
            } else {
                "; no rekey in progress (the old key is no longer needed)"
            }
        ),
    }
    Ok(())
}

pub async fn run(conn: &ConnArgs, cmd: ServerCmd, format: Format) -> Result<()> {
    match cmd.command {
        ServerSub::Rekey(a) => rekey(conn, a, format).await,
        ServerSub::Init(a) => {
            let opts = InitOptions {
                state_dir: a.state_dir.clone(),
                trust_domain: a.trust_domain,
                sans: a.sans,
                admin_name: "admin".into(),
                database: database_options(&a.database)?,
                join: a.join.clone(),
            };
            let joined = a.join.is_some();
            let on_postgres = opts
                .database
                .url
                .as_deref()
                .is_some_and(|u| secretfs_server::store::is_postgres_url(u));
            // The new replica's key is where the copied descriptor says;
            // the flags only override it for this host.
            let source = if joined {
                secretfs_server::key_provider::KeySource::File
            } else {
                a.keys.options().for_init()?
            };
            let kept = source.clone();
            let key_options = a.keys.options();
            let dir = tokio::task::spawn_blocking(move || {
                if joined {
                    secretfs_server::state_dir::init_join(&opts, &key_options)
                } else {
                    secretfs_server::init_with(&opts, &source)
                }
            })
            .await??;
            let is_file = dir.master_key().exists();
            if let Some(from) = &a.join {
                // Said in either format (on stderr): the copy holds the
                // master key and the CA key.
                eprintln!(
                    "delete the copy {} now (e.g. `rm -r {}`): it holds the master key and the CA key",
                    absolute(from).display(),
                    absolute(from).display()
                );
            }
            let run_line = format!(
                "secretfs server run --state-dir {}{}",
                absolute(&dir.path).display(),
                password_hint(on_postgres, &a.database)
            );
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "state_dir": absolute(&dir.path),
                        "server": format!("https://{}", a.advertise),
                        "ca": absolute(&dir.ca_cert()),
                        "cert": absolute(&dir.admin_cert()),
                        "key": absolute(&dir.admin_key()),
                        "master_key": is_file.then(|| absolute(&dir.master_key())),
                    }))?
                ),
                Format::Text if joined => {
                    eprintln!(
                        "created state directory {} for a new replica (master key, CA and admin identity copied from {})",
                        absolute(&dir.path).display(),
                        a.join.as_deref().unwrap_or(Path::new("")).display()
                    );
                    eprintln!("start it:  {run_line}");
                }
                Format::Text => {
                    eprintln!("created state directory {}", absolute(&dir.path).display());
                    if is_file {
                        eprintln!(
                            "back up {} apart from the database: without it no secret can be decrypted",
                            absolute(&dir.master_key()).display()
                        );
                    } else {
                        eprintln!(
                            "the master key is kept by {} (recorded in master-key.json); back it up apart from the database",
                            kept.describe(&dir)
                        );
                    }
                    eprintln!("start the server:  {run_line}");
                    eprintln!("then, to use the CLI as the admin:");
                    print!("{}", export_lines(&dir, &a.advertise));
                }
            }
            Ok(())
        }
        ServerSub::AdminCert(a) => {
            // clap refuses --days outside 1..=3650; 0 means the default.
            let days = a.days.unwrap_or(0);
            let keys = a.keys.options();
            let db = database_options(&a.database)?;
            let made = tokio::task::spawn_blocking(move || {
                secretfs_server::host_certs::admin_cert_with(
                    &a.state_dir,
                    &a.out,
                    &a.name,
                    days,
                    &keys,
                    &db,
                )
            })
            .await??;
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "name": made.name, "created": made.created, "cert_serial": made.serial,
                        "cert_not_after": crate::output::time(made.not_after),
                        "cert": absolute(&made.cert), "key": absolute(&made.key), "ca": absolute(&made.ca),
                    }))?
                ),
                Format::Text => {
                    eprintln!(
                        "minted an admin certificate for {}{} (serial {}, valid until {}); audited as local:admin-cert",
                        made.name,
                        if made.created { " (client created)" } else { "" },
                        made.serial,
                        crate::output::time(made.not_after)
                    );
                    eprintln!("to use the CLI as this admin:");
                    println!(
                        "export SECRETFS_CA={}\nexport SECRETFS_CERT={}\nexport SECRETFS_KEY={}",
                        absolute(&made.ca).display(),
                        absolute(&made.cert).display(),
                        absolute(&made.key).display()
                    );
                }
            }
            Ok(())
        }
        ServerSub::Verify(a) => verify(a, format).await,
        ServerSub::ReissueCert(a) => {
            let sans = a.sans.clone();
            let state_dir = a.state_dir.clone();
            let issued = tokio::task::spawn_blocking(move || {
                secretfs_server::host_certs::reissue_server_cert(&state_dir, &sans)
            })
            .await??;
            let dir = StateDir::new(&a.state_dir);
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "sans": a.sans, "serial": issued.serial,
                        "not_after": crate::output::time(issued.not_after),
                        "cert": absolute(&dir.server_cert()), "key": absolute(&dir.server_key()),
                    }))?
                ),
                Format::Text => println!(
                    "issued a new server certificate for {} (valid until {}) in {}; a running server takes it up within a second",
                    a.sans.join(", "),
                    crate::output::time(issued.not_after),
                    absolute(&dir.server_cert()).display()
                ),
            }
            Ok(())
        }
        ServerSub::Run(a) => {
            // Listening before the address file says the server is up.
            let stop = super::shutdown_signal()?;
            let server = Server::open(RunOptions {
                state_dir: a.state_dir,
                listen: a.listen,
                max_secret_size: a.max_secret_size,
                client_ca: a.client_ca,
                health_listen: a.health_listen,
                max_connections: a.max_connections,
                keys: a.keys.options(),
                database: database_options(&a.database)?,
                rekey_batch: a.rekey_batch,
                rekey_pause: a.rekey_pause,
                audit_log: a.audit_log.map(|path| SinkOptions {
                    target: if path.as_os_str() == "-" {
                        SinkTarget::Stdout
                    } else {
                        SinkTarget::File(path)
                    },
                    max_size: a.audit_log_max_size,
                    keep: a.audit_log_keep,
                    stall: std::time::Duration::from_secs(a.audit_log_stall_secs),
                    resume_file: None,
                }),
                integrity_check: std::time::Duration::from_secs(a.integrity_check_secs),
            })
            .await
            .context("the server did not start")?;
            if let Some(path) = &a.address_file {
                write_address_file(path, server.local_addr(), server.health_addr())?;
            }
            server.serve(stop).await?;
            Ok(())
        }
    }
}

/// `server verify`: every bad row and the row set's finding, and exit 1
/// when there is any; with `--accept`, the rows as they are taken as the
/// row set (asked first on a terminal).
async fn verify(a: VerifyArgs, format: Format) -> Result<()> {
    let dir = StateDir::new(&a.state_dir);
    let db = database_options(&a.database)?;
    // The path, or the PostgreSQL URL without its password.
    let database = match secretfs_server::state_dir::choose_database(&dir, &db)? {
        secretfs_server::state_dir::Database::Sqlite(path) => absolute(&path).display().to_string(),
        other => other.describe(),
    };
    let checking = dir.clone();
    let keys = a.keys.options();
    let key_options = keys.clone();
    let checking_db = db.clone();
    let found = tokio::task::spawn_blocking(move || {
        secretfs_server::row_review::verify(&checking, &key_options, &checking_db)
    })
    .await??;
    let (set, bad): (Vec<_>, Vec<_>) = found
        .into_iter()
        .partition(|r| r.table == secretfs_server::store::integrity::ROW_SET);
    let set = set.into_iter().next();
    if a.accept {
        if crate::confirm::wanted(a.yes) {
            let what = match &set {
                Some(f) => f.what.clone(),
                None => "the row set agrees with the rows".to_owned(),
            };
            crate::confirm::ask(&format!(
                "{what}. Take the rows of {} as they are now as the row set (bad rows stay bad)?",
                database
            ))?;
        }
        let revision = tokio::task::spawn_blocking(move || {
            secretfs_server::row_review::accept(&dir, &keys, &db)
        })
        .await??;
        match format {
            Format::Json => println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "database": database, "accepted": true, "revision": revision,
                    "bad_rows": bad,
                }))?
            ),
            Format::Text => println!(
                "the rows of {} as they are at revision {revision} are now the row set (audited as integrity.accept)",
                database
            ),
        }
        if bad.is_empty() {
            return Ok(());
        }
        anyhow::bail!(
            "the row set was accepted, but bad rows remain ({}; `secretfs server verify` lists them): \
             accepting the row set does not make a row good; restore the database from a backup",
            bad.len()
        );
    }
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "database": database, "clean": bad.is_empty() && set.is_none(),
                "bad_rows": bad, "row_set": set.as_ref().map(|f| &f.what),
            }))?
        ),
        Format::Text if bad.is_empty() && set.is_none() => {
            println!("every authenticated row of {} is good, and no row was put back, deleted or added without the key", database)
        }
        Format::Text => {
            for row in bad.iter().chain(&set) {
                println!("{}", crate::output::printable(&row.to_string()));
            }
        }
    }
    let set_text = set.as_ref().map(|f| format!("{} ({})", f.what, database));
    if bad.is_empty() {
        return match set_text {
            Some(text) => Err(anyhow::anyhow!(text)),
            None => Ok(()),
        };
    }
    anyhow::bail!(
        "{} bad row{} in {}: added or edited without the master key, so the server treats {} as absent (not served, no access granted). \
         Restore the database from a backup taken before the edit, and find out who could write it{}",
        bad.len(),
        if bad.len() == 1 { "" } else { "s" },
        database,
        if bad.len() == 1 { "it" } else { "them" },
        set_text.map(|t| format!(". Also: {t}")).unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use clap::{CommandFactory, FromArgMatches};

    use super::*;

    /// Parses like `main` does, with `url_env` as SECRETFS_DATABASE_URL
    /// (a URL on the command line wins over it; no other test sets it).
    fn database_args(argv: &[&str], url_env: Option<&str>) -> DatabaseArgs {
        // clap reads the variable when the command is built.
        if let Some(url) = url_env {
            std::env::set_var("SECRETFS_DATABASE_URL", url);
        }
        let cmd = Cli::command();
        let matches = cmd.try_get_matches_from(argv).unwrap();
        let mut cli = Cli::from_arg_matches(&matches).unwrap();
        note_database_source(&mut cli, &matches);
        match cli.command {
            Command::Other(OtherCommand::Server(ServerCmd {
                command: ServerSub::Run(a),
            })) => a.database,
            _ => unreachable!(),
        }
    }

    const RUN: [&str; 5] = ["secretfs", "server", "run", "--state-dir", "d"];

    #[test]
    fn a_password_in_a_url_on_the_command_line_is_refused_naming_the_ways_that_work() {
        for url in [
            "postgres://u:hunter2@127.0.0.1/db",
            // The driver decodes the parameter's name: a password too.
            "postgres://u@127.0.0.1/db?pass%77ord=hunter2",
        ] {
            let argv = [&RUN[..], &["--database", url]].concat();
            let a = database_args(&argv, None);
            assert!(a.database_in_argv);
            let err = database_options_from(&a, None).err().unwrap().to_string();
            assert!(!err.contains("hunter2"), "{err}");
            for way in [
                "--database-password-file",
                DATABASE_PASSWORD_ENV,
                "SECRETFS_DATABASE_URL",
            ] {
                assert!(err.contains(way), "{err}");
            }
        }
        // Built by hand (no value source known): counted as argv.
        let a = DatabaseArgs {
            database: Some("postgres://u:hunter2@127.0.0.1/db".into()),
            ..DatabaseArgs::default()
        };
        assert!(database_options_from(&a, None).is_err());
        // Without the password, the same URL is taken, password from the
        // environment.
        let argv = [&RUN[..], &["--database", "postgres://u@127.0.0.1/db"]].concat();
        let a = database_args(&argv, None);
        let opts = database_options_from(&a, Some(Zeroizing::new("pw".into()))).unwrap();
        assert_eq!(
            opts.url.as_deref().map(|u| u.as_str()),
            Some("postgres://u@127.0.0.1/db")
        );
        assert_eq!(opts.password.as_deref().map(|p| p.as_str()), Some("pw"));
    }

    #[test]
    fn the_password_variable_is_taken_out_of_the_environment_and_still_used() {
        // No other test reads or sets this variable.
        std::env::set_var(DATABASE_PASSWORD_ENV, "from-env");
        ENV_PASSWORD.take();
        assert!(std::env::var_os(DATABASE_PASSWORD_ENV).is_none());
        let a = DatabaseArgs {
            database: Some("postgres://u@127.0.0.1/db".into()),
            ..DatabaseArgs::default()
        };
        let opts = database_options(&a).unwrap();
        assert_eq!(
            opts.password.as_deref().map(|p| p.as_str()),
            Some("from-env")
        );
    }

    #[test]
    fn a_password_in_the_url_from_the_environment_is_taken() {
        let a = database_args(&RUN, Some("postgres://u:pw@h/db"));
        assert!(!a.database_in_argv);
        let opts = database_options_from(&a, None).unwrap();
        assert_eq!(
            opts.url.as_deref().map(|u| u.as_str()),
            Some("postgres://u:pw@h/db")
        );
        assert!(!format!("{a:?}").contains("pw@"), "{a:?}");
    }

    #[test]
    fn the_password_file_must_be_private_and_wins_over_the_environment() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let a = DatabaseArgs {
            database: Some("postgres://u@127.0.0.1/db".into()),
            database_password_file: Some(file.clone()),
            database_in_argv: true,
        };
        let err = database_options_from(&a, None).err().unwrap().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let opts = database_options_from(&a, Some(Zeroizing::new("from-env".into()))).unwrap();
        assert_eq!(
            opts.password.as_deref().map(|p| p.as_str()),
            Some("from-file")
        );
        let missing = DatabaseArgs {
            database_password_file: Some(tmp.path().join("none")),
            ..a
        };
        let err = database_options_from(&missing, None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--database-password-file"), "{err}");
    }
}
