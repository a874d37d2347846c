//! `secretfs dev`: one command to a working local system. Creates (or
//! reuses) a state directory, runs the server on loopback, registers a demo
//! client with a group and two secrets, mounts the demo client's secrets,
//! and prints what to try. Ctrl-C unmounts and stops everything.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use secretfs_proto::files::ClientPaths;
use secretfs_proto::v1;
use secretfs_server::{InitOptions, RunOptions, Server, StateDir};
use tonic::Code;

use crate::args::{ClientAddArgs, ConnArgs, DevArgs};
use crate::connect;

const DEMO_CLIENT: &str = "demo";
const DEMO_GROUP: &str = "demo";

fn ignore_exists<T>(r: Result<T, tonic::Status>) -> Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::AlreadyExists => Ok(()),
        Err(s) => Err(s.into()),
    }
}

fn conn_for(server: &str, ca: PathBuf, cert: PathBuf, key: PathBuf) -> ConnArgs {
    ConnArgs {
        server: vec![server.to_owned()],
        ca: Some(ca),
        cert: Some(cert),
        key: Some(key),
        timeout: crate::args::DEFAULT_TIMEOUT,
    }
}

fn random_password() -> String {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 18];
    let _ = SystemRandom::new().fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn seed(admin: &ConnArgs, clients_dir: &Path) -> Result<ConnArgs> {
    let mut c = connect::admin(admin).await?;
    let files = ClientPaths::in_dir(clients_dir, DEMO_CLIENT);
    let have_files = files.cert.exists() && files.key.as_ref().is_some_and(|k| k.exists());
    let registered = match c
        .describe_client(v1::ClientRef {
            name: DEMO_CLIENT.into(),
        })
        .await
    {
        Ok(_) => true,
        Err(s) if s.code() == Code::NotFound => false,
        Err(s) => return Err(s.into()),
    };
    if !(registered && have_files) {
        if registered {
            c.remove_client(v1::ClientRef {
                name: DEMO_CLIENT.into(),
            })
            .await?;
        }
        for path in std::iter::once(&files.cert).chain(&files.key) {
            let _ = std::fs::remove_file(path);
        }
        super::client::add(
            admin,
            &ClientAddArgs {
                name: DEMO_CLIENT.into(),
                out: clients_dir.to_path_buf(),
                admin: false,
                days: None,
                csr: None,
                external: false,
            },
        )
        .await?;
    }
    ignore_exists(
        c.create_group(v1::CreateGroupRequest {
            name: DEMO_GROUP.into(),
            description: "secrets for the demo client".into(),
        })
        .await,
    )?;
    let demo_secrets: [(&str, Vec<u8>, &str); 2] = [
        (
            "demo/greeting",
            b"hello from secretfs\n".to_vec(),
            "a greeting to cat",
        ),
        (
            "demo/db/password",
            random_password().into_bytes(),
            "a random demo password",
        ),
    ];
    for (name, content, description) in demo_secrets {
        ignore_exists(
            c.create_secret(v1::CreateSecretRequest {
                name: name.into(),
                content,
                description: description.into(),
                ..Default::default()
            })
            .await,
        )?;
        c.add_secret_to_group(v1::GroupSecretRequest {
            group: DEMO_GROUP.into(),
            secret: name.into(),
        })
        .await?;
    }
    c.add_client_to_group(v1::GroupClientRequest {
        group: DEMO_GROUP.into(),
        client: DEMO_CLIENT.into(),
    })
    .await?;
    Ok(ConnArgs {
        server: admin.server.clone(),
        ca: files.ca,
        cert: Some(files.cert),
        key: files.key,
        timeout: crate::args::DEFAULT_TIMEOUT,
    })
}

pub async fn run(args: DevArgs) -> Result<()> {
    let dir = std::path::absolute(&args.dir).unwrap_or(args.dir.clone());
    let state = StateDir::new(dir.join("state"));
    if !state.path.exists() {
        let opts = InitOptions {
            state_dir: state.path.clone(),
            trust_domain: "secretfs.local".into(),
            sans: secretfs_server::state_dir::default_sans(),
            admin_name: "admin".into(),
            // `secretfs dev` keeps SQLite: one server, nothing to set up.
            database: Default::default(),
            join: None,
        };
        tokio::task::spawn_blocking(move || secretfs_server::init(&opts)).await??;
        eprintln!("created {}", state.path.display());
    } else {
        eprintln!("reusing {}", state.path.display());
    }
    let server = Server::open(RunOptions {
        state_dir: state.path.clone(),
        listen: args.listen,
        max_secret_size: secretfs_server::DEFAULT_MAX_SECRET_SIZE,
        health_listen: None,
        max_connections: None,
        client_ca: Vec::new(),
        keys: Default::default(),
        database: Default::default(),
        rekey_batch: secretfs_server::rekey::DEFAULT_BATCH,
        rekey_pause: std::time::Duration::ZERO,
        audit_log: None,
        integrity_check: std::time::Duration::from_secs(3600),
    })
    .await
    .context("the dev server did not start (is another `secretfs dev` running? try --listen 127.0.0.1:0)")?;
    let addr = server.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async {
        let _ = stop_rx.await;
    }));

    let server_url = format!("https://{addr}");
    let admin = conn_for(
        &server_url,
        state.ca_cert(),
        state.admin_cert(),
        state.admin_key(),
    );
    let demo = match seed(&admin, &dir.join("clients")).await {
        Ok(demo) => demo,
        Err(e) => {
            let _ = stop_tx.send(());
            let _ = serving.await;
            return Err(e.context("setting up the demo client and secrets failed"));
        }
    };

    let mountpoint = dir.join("mnt");
    let mount = if args.no_mount {
        None
    } else {
        Some(super::mount::start_dev_mount(&demo, &mountpoint).await)
    };

    // Listen for Ctrl-C before saying it works: a signal that came between
    // the message and the listener would kill the process and leave the
    // mount behind.
    let stop = super::shutdown_signal()?;
    println!(
        "secretfs dev is running: server {server_url}, state in {}",
        state.path.display()
    );
    println!();
    println!("# use the CLI as the admin (in another shell):");
    if let Ok(exe) = std::env::current_exe() {
        println!("alias secretfs={}", exe.display());
    }
    print!("{}", super::server::export_lines(&state, &addr.to_string()));
    println!("secretfs secret list");
    println!("echo -n s3cret | secretfs secret rotate demo/greeting");
    println!();
    println!("# read as the demo client:");
    println!(
        "SECRETFS_CERT={} SECRETFS_KEY={} secretfs read demo/greeting",
        demo.cert
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        demo.key
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    match &mount {
        Some(Ok(_)) => {
            println!();
            println!("# the demo client's mount:");
            println!("cat {}/demo/greeting", mountpoint.display());
            println!("cat {}/demo/db/password", mountpoint.display());
            println!("cat {}/.secretfs/status", mountpoint.display());
        }
        Some(Err(e)) => {
            println!();
            println!("# the mount did not start: {e:#}");
            println!("# (it needs root or CAP_SYS_ADMIN and /dev/fuse; --no-mount skips it)");
        }
        None => {}
    }
    println!();
    if matches!(mount, Some(Ok(_))) {
        println!("Ctrl-C unmounts and stops the server.");
    } else {
        // --no-mount, or the mount did not start: there is nothing to unmount.
        println!("Ctrl-C stops the server.");
    }

    stop.await;
    eprintln!("stopping");
    if let Some(Ok(m)) = mount {
        m.stop().await;
    }
    let _ = stop_tx.send(());
    serving.await.context("the server task failed")??;
    Ok(())
}
