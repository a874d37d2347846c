//! The real `secretfs` binary as users run it: `server init` + `server run`
//! on a free loopback port, `secretfs mount` processes, CLI calls, and gRPC
//! channels as any identity. Everything started here is stopped on drop.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use secretfs_proto::v1::admin_client::AdminClient;
use secretfs_proto::v1::secrets_client::SecretsClient;
use secretfs_proto::v1::{CreateGroupRequest, CreateSecretRequest, GroupClientRequest};
use secretfs_proto::v1::{GroupSecretRequest, RotateSecretRequest};
use secretfs_proto::ConnectConfig;
use tonic::transport::Channel;

/// Where the binary is and where scratch state goes.
#[derive(Clone, Debug)]
pub struct Env {
    pub bin: PathBuf,
    pub work: PathBuf,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Env {
    /// A fresh directory under the work dir.
    pub fn fresh_dir(&self, tag: &str) -> Result<PathBuf> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = self.work.join(format!("{tag}-{n}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(dir)
    }

    /// `secretfs mount --help` mentions `flag`.
    pub fn mount_has_flag(&self, flag: &str) -> bool {
        Command::new(&self.bin)
            .args(["mount", "--help"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
            .unwrap_or(false)
    }
}

/// One identity's credentials.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Server {
    pub env: Env,
    pub dir: PathBuf,
    pub state: PathBuf,
    pub addr: String,
    pub admin: Identity,
    /// The PostgreSQL URL (with its password) it runs on; None: SQLite.
    pub database: Option<String>,
    child: Option<Child>,
}

/// Runs `secretfs server init` into `dir/state`.
pub fn init_state(env: &Env, dir: &Path) -> Result<PathBuf> {
    init_state_with(env, dir, None, None)
}

/// `server init` into `dir/state`, on PostgreSQL `database` (a URL with
/// its password, passed as `SECRETFS_DATABASE_URL` so it is never in
/// argv) when given, joining the replica whose state directory is `join`.
pub fn init_state_with(
    env: &Env,
    dir: &Path,
    database: Option<&str>,
    join: Option<&Path>,
) -> Result<PathBuf> {
    let state = dir.join("state");
    let mut cmd = Command::new(&env.bin);
    cmd.args(["server", "init", "--state-dir"]).arg(&state);
    if let Some(url) = database {
        cmd.env("SECRETFS_DATABASE_URL", url);
    }
    if let Some(j) = join {
        cmd.arg("--join").arg(j);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("run secretfs server init")?;
    if !out.status.success() {
        bail!(
            "server init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(state)
}

impl Server {
    /// A new state directory and a server on it.
    pub fn start(env: &Env) -> Result<Server> {
        let dir = env.fresh_dir("server")?;
        let state = init_state(env, &dir)?;
        Server::start_on(env, dir, state)
    }

    /// A new state directory on PostgreSQL database `url` (with its
    /// password) and a server on it.
    pub fn start_pg(env: &Env, url: &str) -> Result<Server> {
        let dir = env.fresh_dir("server")?;
        let state = init_state_with(env, &dir, Some(url), None)?;
        Server::start_with(env, dir, state, Some(url.to_owned()), "127.0.0.1:0")
    }

    /// A second replica of `first` (on PostgreSQL): `server init --join`
    /// from `first`'s state directory, then `server run`.
    pub fn start_replica(first: &Server) -> Result<Server> {
        let url = first
            .database
            .as_deref()
            .context("replicas need a PostgreSQL server")?;
        let env = &first.env;
        let dir = env.fresh_dir("replica")?;
        let state = init_state_with(env, &dir, Some(url), Some(&first.state))?;
        Server::start_with(env, dir, state, Some(url.to_owned()), "127.0.0.1:0")
    }

    /// A server on an existing state directory (made by `init_state`).
    pub fn start_on(env: &Env, dir: PathBuf, state: PathBuf) -> Result<Server> {
        Server::start_with(env, dir, state, None, "127.0.0.1:0")
    }

    /// This server again, on the same state directory, database and
    /// address, after it stopped or was killed.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let again = Server::start_with(
            &self.env,
            self.dir.clone(),
            self.state.clone(),
            self.database.clone(),
            &self.addr,
        )?;
        *self = again;
        Ok(())
    }

    /// A server on an existing state directory, on PostgreSQL `database`
    /// when given (the URL in the environment, never in argv), listening
    /// on `listen`.
    pub fn start_with(
        env: &Env,
        dir: PathBuf,
        state: PathBuf,
        database: Option<String>,
        listen: &str,
    ) -> Result<Server> {
        // The server writes its bound address here once it listens.
        let address_file = dir.join("server-address.json");
        let _ = std::fs::remove_file(&address_file);
        let mut cmd = Command::new(&env.bin);
        if let Some(url) = &database {
            cmd.env("SECRETFS_DATABASE_URL", url);
        }
        let mut child = cmd
            .args(["server", "run", "--state-dir"])
            .arg(&state)
            .args(["--listen", listen, "--address-file"])
            .arg(&address_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn secretfs server run")?;
        let stderr = child.stderr.take().expect("piped");
        let log_path = dir.join("server.log");
        // Keep draining, so a full pipe never stalls the server.
        std::thread::spawn(move || {
            let mut log = File::create(log_path).ok();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(f) = log.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
            }
        });
        let start = Instant::now();
        let addr = loop {
            if let Ok(text) = std::fs::read_to_string(&address_file) {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("the server's address file is not JSON: {text}"))?;
                match v["addr"].as_str() {
                    Some(a) => break a.to_owned(),
                    None => bail!("the server's address file has no addr: {text}"),
                }
            }
            let exited = child.try_wait()?.is_some();
            if exited || start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(50));
                bail!(
                    "the server did not start; log: {}",
                    std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let admin = Identity {
            cert: state.join("admin.pem"),
            key: state.join("admin.key"),
        };
        Ok(Server {
            env: env.clone(),
            dir,
            state,
            addr,
            admin,
            database,
            child: Some(child),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn connect_config(&self, who: &Identity) -> Result<ConnectConfig> {
        Ok(ConnectConfig {
            server: self.url(),
            ca_pem: std::fs::read(self.state.join("ca.pem"))?,
            cert_pem: std::fs::read(&who.cert)?,
            key_pem: std::fs::read(&who.key)?.into(),
            connect_timeout: Duration::from_secs(20),
        })
    }

    /// A new connection (its own TCP + TLS session) as `who`.
    pub async fn channel(&self, who: &Identity) -> Result<Channel> {
        let cfg = self.connect_config(who)?;
        Ok(secretfs_proto::connect(&cfg).await?)
    }

    pub async fn admin_client(&self) -> Result<AdminClient<Channel>> {
        Ok(
            AdminClient::new(self.channel(&self.admin).await?)
                .max_decoding_message_size(usize::MAX),
        )
    }

    pub async fn secrets_client(&self, who: &Identity) -> Result<SecretsClient<Channel>> {
        Ok(SecretsClient::new(self.channel(who).await?).max_decoding_message_size(usize::MAX))
    }

    /// The CLI as the admin.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.env.bin)
            .env("SECRETFS_SERVER", self.url())
            .env("SECRETFS_CA", self.state.join("ca.pem"))
            .env("SECRETFS_CERT", &self.admin.cert)
            .env("SECRETFS_KEY", &self.admin.key)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("run secretfs")?;
        if !out.status.success() {
            bail!(
                "secretfs {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Registers a client with the CLI (key made locally, CSR signed).
    pub fn add_client(&self, name: &str) -> Result<Identity> {
        let out = self.dir.join("clients");
        self.cli(&["client", "add", name, "--out", out.to_str().unwrap()])?;
        Ok(Identity {
            cert: out.join(format!("{name}.pem")),
            key: out.join(format!("{name}.key")),
        })
    }

    /// A group holding `secrets` (created with `content`) with `clients` in it,
    /// through the Admin API, `parallel` calls at a time.
    pub async fn grant_new_secrets(
        &self,
        group: &str,
        clients: &[&str],
        secrets: &[(String, Vec<u8>)],
    ) -> Result<()> {
        let admin = self.admin_client().await?;
        admin
            .clone()
            .create_group(CreateGroupRequest {
                name: group.into(),
                description: String::new(),
            })
            .await?;
        for c in clients {
            admin
                .clone()
                .add_client_to_group(GroupClientRequest {
                    group: group.into(),
                    client: (*c).into(),
                })
                .await?;
        }
        let parallel = 16;
        for chunk in secrets.chunks(parallel) {
            let mut tasks = Vec::new();
            for (name, content) in chunk {
                let mut a = admin.clone();
                let (name, content, group) = (name.clone(), content.clone(), group.to_owned());
                tasks.push(tokio::spawn(async move {
                    a.create_secret(CreateSecretRequest {
                        name: name.clone(),
                        content,
                        ..Default::default()
                    })
                    .await?;
                    a.add_secret_to_group(GroupSecretRequest {
                        group,
                        secret: name,
                    })
                    .await?;
                    Ok::<_, tonic::Status>(())
                }));
            }
            for t in tasks {
                t.await??;
            }
        }
        Ok(())
    }

    pub async fn rotate(
        admin: &mut AdminClient<Channel>,
        name: &str,
        content: Vec<u8>,
    ) -> Result<u64> {
        let meta = admin
            .rotate_secret(RotateSecretRequest {
                name: name.into(),
                content,
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(meta.current_version)
    }

    /// SIGKILL at once (a crashed replica): returns when it is gone.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL if it lingers.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, Duration::from_secs(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stop_child(mut child: Child, grace: Duration) {
    // Our own child, not yet reaped: its pid cannot have been reused.
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    );
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A running `secretfs mount`.
pub struct Mount {
    pub path: PathBuf,
    child: Option<Child>,
}

impl Mount {
    /// Spawns `secretfs mount` as `who` at a new directory; returns without
    /// waiting (see `wait_ready`).
    pub fn spawn(server: &Server, who: &Identity, extra: &[String]) -> Result<Mount> {
        Mount::spawn_to(server, &server.url(), who, extra)
    }

    /// As `spawn`, with `SECRETFS_SERVER` set to `servers` (e.g. a comma
    /// list of replicas); `server` gives the CA and the scratch space.
    pub fn spawn_to(
        server: &Server,
        servers: &str,
        who: &Identity,
        extra: &[String],
    ) -> Result<Mount> {
        let dir = server.env.fresh_dir("mnt")?;
        let path = dir.join("m");
        std::fs::create_dir(&path)?;
        let log = File::create(dir.join("mount.log"))?;
        let child = Command::new(&server.env.bin)
            .env("SECRETFS_SERVER", servers)
            .env("SECRETFS_CA", server.state.join("ca.pem"))
            .env("SECRETFS_CERT", &who.cert)
            .env("SECRETFS_KEY", &who.key)
            .arg("mount")
            .arg(&path)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn secretfs mount")?;
        Ok(Mount {
            path,
            child: Some(child),
        })
    }

    /// Waits until `.secretfs/status` shows (the mount appears only after
    /// its first sync).
    pub fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let status = self.path.join(".secretfs/status");
        let start = Instant::now();
        loop {
            if status.exists() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(code)) = c.try_wait() {
                    let log = self.path.parent().unwrap().join("mount.log");
                    bail!(
                        "the mount exited ({code}): {}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    );
                }
            }
            if start.elapsed() > limit {
                bail!(
                    "the mount at {} did not appear in {limit:?}",
                    self.path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn start(server: &Server, who: &Identity, extra: &[String]) -> Result<Mount> {
        let mut m = Mount::spawn(server, who, extra)?;
        m.wait_ready(Duration::from_secs(60))?;
        Ok(m)
    }

    /// As `start`, with `SECRETFS_SERVER` set to `servers`.
    pub fn start_to(
        server: &Server,
        servers: &str,
        who: &Identity,
        extra: &[String],
    ) -> Result<Mount> {
        let mut m = Mount::spawn_to(server, servers, who, extra)?;
        m.wait_ready(Duration::from_secs(60))?;
        Ok(m)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, Duration::from_secs(10));
        }
        if is_mounted(&self.path) {
            let _ = rustix::mount::unmount(&self.path, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}

/// A `Key:   123 kB` field of a /proc file, in KiB.
fn proc_kib(pid: u32, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_kib(pid, "status", "VmRSS:")
}

/// Where a process's resident memory is: (anonymous, proportional set
/// size, locked), in KiB. File-backed pages of the binary are shared by
/// every process running it.
pub fn rss_detail_kib(pid: u32) -> (u64, u64, u64) {
    (
        proc_kib(pid, "status", "RssAnon:").unwrap_or(0),
        proc_kib(pid, "smaps_rollup", "Pss:").unwrap_or(0),
        proc_kib(pid, "status", "VmLck:").unwrap_or(0),
    )
}

/// CPU time (user + system) a process has used so far, in ms.
pub fn cpu_ms(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The fields after the command name (which may hold spaces).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<f64>().ok())
        .sum();
    let hz = rustix::param::clock_ticks_per_second().max(1) as f64;
    ticks * 1e3 / hz
}

/// Secrets `prefix/sNNNN` of `size` bytes each.
pub fn secrets(prefix: &str, n: usize, size: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| (format!("{prefix}/s{i:05}"), filler(size, i as u64)))
        .collect()
}

/// `size` bytes that differ per `seed`.
pub fn filler(size: usize, seed: u64) -> Vec<u8> {
    let tag = format!("{seed:016x}");
    tag.bytes().cycle().take(size).collect()
}
