//! Starts the real `secretfs` binary: a server on a free loopback port in a
//! fresh state directory, and CLI calls against it as the admin or as any
//! client. Everything is killed and removed on drop.
//!
//! The store is SQLite in the state directory, or with
//! `SECRETFS_TEST_STORE=postgres` a fresh PostgreSQL database of the tests'
//! own cluster per server (`secretfs_pgtest`), given to `server init
//! --database` as an operator would: the URL in argv without its password,
//! the password in SECRETFS_DATABASE_PASSWORD of each command ([`secretfs`]). Tests whose subject is the
//! SQLite file itself say so with [`sqlite_only`].

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use rustix::process::Signal;

/// The workspace's root (for files the tests read: deploy/, docs/, proto/).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A file of the repository, `rel` from the workspace's root, as text.
pub fn repo_file(rel: &str) -> String {
    std::fs::read_to_string(workspace().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// python3 with target/python-deps first on its path: scripts/test.sh
/// installs the pinned Python packages there (grpcio, kubernetes-validate).
pub fn python() -> Command {
    let mut path = std::ffi::OsString::from(workspace().join("target/python-deps"));
    if let Some(old) = std::env::var_os("PYTHONPATH") {
        path.push(":");
        path.push(old);
    }
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", path);
    cmd
}

/// The `secretfs` binary next to this test executable, built on demand.
pub fn bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("current exe");
        // target/<profile>/deps/<test> -> target/<profile>/secretfs
        let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
        let bin = profile_dir.join("secretfs");
        if !bin.exists() {
            let status = Command::new(env!("CARGO"))
                .args(["build", "-p", "secretfs", "--bin", "secretfs"])
                .status()
                .expect("run cargo build");
            assert!(status.success(), "building the secretfs binary failed");
        }
        bin
    })
    .clone()
}

/// A CLI result with its streams as text.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub raw_stdout: Vec<u8>,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            raw_stdout: out.stdout,
        }
    }

    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    /// Asserts failure with `code` and an error naming `needle`.
    #[track_caller]
    pub fn fails(self, code: i32, needle: &str) -> Run {
        assert_eq!(
            self.code, code,
            "expected exit {code}\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "expected stderr to mention {needle:?}\nstderr: {}",
            self.stderr
        );
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Credentials of one identity.
#[derive(Clone, Debug)]
pub struct Identity {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Identity {
    /// `DIR/NAME.pem` and `DIR/NAME.key`, as `client add --out DIR` writes them.
    pub fn in_dir(dir: &Path, name: &str) -> Identity {
        Identity {
            name: name.into(),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }
}

/// The first certificate of a PEM file, read as the server, the CLI and the
/// mount read it (serial in lower-case hex, as `whoami` shows it).
pub fn cert_info(path: &Path) -> secretfs_proto::cert::CertInfo {
    let pem = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    secretfs_proto::cert::CertInfo::parse(&pem)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A copy of `who`'s files in `dir` (made if missing), under the same name:
/// credentials a test can keep, or replace, while the originals change.
pub fn copy_identity(who: &Identity, dir: &Path) -> Identity {
    std::fs::create_dir_all(dir).unwrap();
    let copy = Identity::in_dir(dir, &who.name);
    std::fs::copy(&who.cert, &copy.cert).unwrap();
    std::fs::copy(&who.key, &copy.key).unwrap();
    copy
}

/// The store the suite runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestStore {
    Sqlite,
    Postgres,
}

/// `SECRETFS_TEST_STORE`: `sqlite` (the default) or `postgres`.
pub fn test_store() -> TestStore {
    static STORE: OnceLock<TestStore> = OnceLock::new();
    *STORE.get_or_init(|| match std::env::var("SECRETFS_TEST_STORE").as_deref() {
        Err(_) | Ok("") | Ok("sqlite") => TestStore::Sqlite,
        Ok("postgres") => TestStore::Postgres,
        Ok(other) => panic!("SECRETFS_TEST_STORE={other:?}: use sqlite or postgres"),
    })
}

/// For a test whose subject is the SQLite file itself (edited behind the
/// server's back, its modes, its WAL): true, with a line saying so, when
/// the suite runs on another store; the test then returns at once.
pub fn sqlite_only(why: &str) -> bool {
    let store = test_store();
    if store == TestStore::Sqlite {
        return false;
    }
    eprintln!("not run on {store:?}: {why}");
    true
}

/// A fresh, empty database of the tests' PostgreSQL cluster: its URL
/// without the password, as it goes in argv. The password reaches the
/// server commands in SECRETFS_DATABASE_PASSWORD (see [`secretfs`]).
pub fn fresh_database() -> String {
    secretfs_pgtest::url_without_password(&secretfs_pgtest::PgCluster::shared().database())
}

/// A command running the `secretfs` binary, with the test clusters'
/// password in its SECRETFS_DATABASE_PASSWORD (a server command on SQLite
/// ignores it). Given per command: setting it in this multi-threaded
/// process would race other threads' C getenv.
pub fn secretfs() -> Command {
    let mut cmd = Command::new(bin());
    with_database_password(&mut cmd);
    cmd
}

/// `cmd` with the test clusters' password in SECRETFS_DATABASE_PASSWORD.
pub fn with_database_password(cmd: &mut Command) -> &mut Command {
    cmd.env("SECRETFS_DATABASE_PASSWORD", secretfs_pgtest::PASSWORD)
}

/// `server init` of a state directory `tmp/state` on the suite's store (a
/// fresh database of the tests' cluster on PostgreSQL), with `extra`
/// flags; it must succeed. Every test that runs `server init` itself
/// starts here, so it runs on both stores. Returns the state directory and
/// the database URL (without password) on PostgreSQL.
pub fn init_state(tmp: &Path, extra: &[&str]) -> (PathBuf, Option<String>) {
    let state = tmp.join("state");
    let database = (test_store() == TestStore::Postgres).then(fresh_database);
    init_on(&state, database.as_deref(), |c| {
        c.args(extra);
    })
    .ok();
    (state, database)
}

/// `server init --state-dir STATE [--database URL]`, `configure`d, run.
pub fn init_on(state: &Path, database: Option<&str>, configure: impl FnOnce(&mut Command)) -> Run {
    let mut init = secretfs();
    init.args(["server", "init", "--state-dir"]).arg(state);
    if let Some(url) = database {
        init.args(["--database", url]);
    }
    configure(&mut init);
    run_cmd(init, None)
}

pub struct TestServer {
    pub tmp: tempfile::TempDir,
    /// The PostgreSQL database (URL without password) on that store.
    pub database: Option<String>,
    pub state: PathBuf,
    pub addr: String,
    /// The plain-text health listener's address, with `--health-listen`.
    pub health_addr: Option<String>,
    pub admin: Identity,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    extra_args: Vec<String>,
    /// A command the server runs under (e.g. `prlimit --nofile=...`).
    wrapper: Vec<String>,
}

pub fn run_cmd(mut cmd: Command, stdin: Option<&[u8]>) -> Run {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn secretfs");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input).unwrap();
    }
    Run::from(wait_bounded(child, Duration::from_secs(60)))
}

/// Waits for a child, killing it if it runs past `limit`. Its output is
/// drained while it runs, so a child that prints more than a pipe holds
/// (64 KiB) does not block on a full pipe.
pub fn wait_bounded(mut child: Child, limit: Duration) -> Output {
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "command ran over {limit:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&stdout.join().unwrap_or_default()),
                String::from_utf8_lossy(&stderr.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

impl TestServer {
    pub fn start() -> TestServer {
        Self::start_with(&[])
    }

    /// A started server with `secrets` (name, content) added and a client
    /// `app` whose group `app` holds them all: the usual start of a mount test.
    pub fn start_for_app(secrets: &[(&str, &str)]) -> (TestServer, Identity) {
        let s = Self::start();
        for (name, content) in secrets {
            s.add_secret(name, content.as_bytes());
        }
        let app = s.add_client("app");
        let names: Vec<&str> = secrets.iter().map(|(name, _)| *name).collect();
        s.grant("app", &["app"], &names);
        (s, app)
    }

    /// `server init` in a fresh directory, then `server run` with `args`.
    pub fn start_with(args: &[&str]) -> TestServer {
        Self::start_wrapped(&[], args)
    }

    /// As `start_with`, with the server run under `wrapper` (a command
    /// that runs its arguments, such as `prlimit --nofile=300:300`).
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> TestServer {
        Self::start_custom(tempfile::tempdir().expect("tempdir"), |_| {}, wrapper, args)
    }

    /// As `start_wrapped`, in `tmp`, with `init` adding to the `server
    /// init` command (flags, environment).
    pub fn start_custom(
        tmp: tempfile::TempDir,
        init_with: impl FnOnce(&mut Command),
        wrapper: &[&str],
        args: &[&str],
    ) -> TestServer {
        let state = tmp.path().join("state");
        let database = (test_store() == TestStore::Postgres).then(fresh_database);
        init_on(&state, database.as_deref(), init_with).ok();
        Self::run_state(tmp, state, database, wrapper, args)
    }

    /// `server run` on a state directory `server init` made (in `tmp`,
    /// which the server owns from now on).
    pub fn run_state(
        tmp: tempfile::TempDir,
        state: PathBuf,
        database: Option<String>,
        wrapper: &[&str],
        args: &[&str],
    ) -> TestServer {
        let admin = Identity::in_dir(&state, "admin");
        let mut server = TestServer {
            tmp,
            database,
            state,
            addr: String::new(),
            health_addr: None,
            admin,
            child: None,
            log: Arc::new(Mutex::new(String::new())),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
        };
        server.restart_on("127.0.0.1:0");
        server
    }

    /// Starts `server run` and waits until it listens: the server writes
    /// its bound address to `--address-file` once it does.
    pub fn restart_on(&mut self, listen: &str) {
        assert!(self.child.is_none(), "server already running");
        let address_file = self.tmp.path().join("server-address.json");
        let _ = std::fs::remove_file(&address_file);
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin());
                with_database_password(&mut cmd);
                cmd
            }
            None => secretfs(),
        };
        cmd.args(["server", "run", "--state-dir"])
            .arg(&self.state)
            .args(["--listen", listen])
            .arg("--address-file")
            .arg(&address_file)
            .args(&self.extra_args)
            .env("SECRETFS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn server");
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        // Keep draining, so a full pipe never stalls the server.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let start = Instant::now();
        let addresses: serde_json::Value = loop {
            if let Ok(text) = std::fs::read_to_string(&address_file) {
                break serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("address file is not JSON ({e}): {text}"));
            }
            let exited = child.try_wait().expect("wait").is_some();
            if exited || start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                // Let the log thread take the last lines.
                std::thread::sleep(Duration::from_millis(50));
                panic!("server did not start\nlog: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.addr = addresses["addr"]
            .as_str()
            .expect("addr in the address file")
            .to_owned();
        self.health_addr = addresses["health_addr"].as_str().map(str::to_owned);
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The server process's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> i32 {
        terminate(self.child.take())
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A CLI command as `who`.
    pub fn cmd_as(&self, who: &Identity) -> Command {
        let mut cmd = Command::new(bin());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("SECRETFS_SERVER", self.url())
            .env("SECRETFS_CA", self.state.join("ca.pem"))
            .env("SECRETFS_CERT", &who.cert)
            .env("SECRETFS_KEY", &who.key);
        cmd
    }

    /// Runs the CLI as the admin.
    pub fn cli(&self, args: &[&str]) -> Run {
        self.cli_as(&self.admin.clone(), args, None)
    }

    pub fn cli_in(&self, args: &[&str], stdin: &[u8]) -> Run {
        self.cli_as(&self.admin.clone(), args, Some(stdin))
    }

    pub fn cli_as(&self, who: &Identity, args: &[&str], stdin: Option<&[u8]>) -> Run {
        let mut cmd = self.cmd_as(who);
        cmd.args(args);
        run_cmd(cmd, stdin)
    }

    /// Adds a secret with `content`.
    pub fn add_secret(&self, name: &str, content: &[u8]) {
        self.cli_in(&["secret", "add", name], content).ok();
    }

    /// Registers a client (key made by the CLI) and returns its identity.
    pub fn add_client(&self, name: &str) -> Identity {
        let out = self.tmp.path().join("clients");
        self.cli(&["client", "add", name, "--out", out.to_str().unwrap()])
            .ok();
        Identity::in_dir(&out, name)
    }

    /// A group `group` holding `secrets`, with `clients` in it.
    pub fn grant(&self, group: &str, clients: &[&str], secrets: &[&str]) {
        let r = self.cli(&["group", "add", group]);
        assert!(
            r.code == 0 || r.stderr.contains("already exists"),
            "{}",
            r.stderr
        );
        for c in clients {
            self.cli(&["group", "add-client", group, c]).ok();
        }
        for s in secrets {
            self.cli(&["group", "add-secret", group, s]).ok();
        }
    }

    /// Audit events with `action`, oldest first; `filter` adds CLI flags
    /// (e.g. `["--client", "app"]`).
    pub fn audit_events(&self, action: &str, filter: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec!["audit", "--limit", "100000", "-o", "json"];
        args.extend_from_slice(filter);
        let audit = self.cli(&args).ok().json();
        audit
            .as_array()
            .expect("audit -o json is an array")
            .iter()
            .filter(|e| e["action"] == action)
            .cloned()
            .collect()
    }

    /// The SQLite file (tests that use it are [`sqlite_only`]).
    pub fn db(&self) -> PathBuf {
        self.state.join("secretfs.db")
    }

    /// A client certificate for `name`, valid from `not_before` to
    /// `not_after`, signed with the state directory's CA key as the server
    /// would sign it (client authentication, the client's SPIFFE id), but
    /// with any validity: certificates the CLI cannot make, such as expired
    /// ones. Written to `DIR/NAME.pem` and `DIR/NAME.key` (mode 0600).
    pub fn cert_from_state_ca(
        &self,
        name: &str,
        dir: &Path,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Identity {
        use std::os::unix::fs::PermissionsExt;
        let ca_pem = std::fs::read_to_string(self.state.join("ca.pem")).unwrap();
        let ca_key =
            rcgen::KeyPair::from_pem(&std::fs::read_to_string(self.state.join("ca.key")).unwrap())
                .unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.subject_alt_names = vec![rcgen::SanType::URI(
            format!("spiffe://secretfs.local/client/{name}")
                .try_into()
                .unwrap(),
        )];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let who = Identity::in_dir(dir, name);
        std::fs::write(&who.cert, cert.pem()).unwrap();
        std::fs::write(&who.key, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&who.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        who
    }
}

/// A multi-threaded runtime for tests that call the gRPC API directly.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

impl TestServer {
    /// How `who` connects to this server.
    pub fn connect_config(&self, who: &Identity) -> secretfs_proto::ConnectConfig {
        secretfs_proto::ConnectConfig {
            server: self.url(),
            ca_pem: std::fs::read(self.state.join("ca.pem")).unwrap(),
            cert_pem: std::fs::read(&who.cert).unwrap(),
            key_pem: std::fs::read(&who.key).unwrap().into(),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// A `Secrets` client as `who`.
    pub async fn secrets_client(
        &self,
        who: &Identity,
    ) -> secretfs_proto::v1::secrets_client::SecretsClient<tonic::transport::Channel> {
        let channel = secretfs_proto::connect(&self.connect_config(who)).await;
        secretfs_proto::v1::secrets_client::SecretsClient::new(channel.unwrap())
    }

    /// An `Admin` client as the admin.
    pub async fn admin_client(
        &self,
    ) -> secretfs_proto::v1::admin_client::AdminClient<tonic::transport::Channel> {
        let channel = secretfs_proto::connect(&self.connect_config(&self.admin)).await;
        secretfs_proto::v1::admin_client::AdminClient::new(channel.unwrap())
    }
}

/// SIGTERM `child`, if any, and wait (bounded); returns the exit code.
fn terminate(child: Option<Child>) -> i32 {
    let Some(child) = child else {
        return 0;
    };
    signal(&child, Signal::TERM);
    let out = wait_bounded(child, Duration::from_secs(20));
    out.status.code().unwrap_or(-1)
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Reads a whole file, for scanning.
pub fn read_all(path: &Path) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    buf
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Now, in Unix milliseconds (as the server stamps audit rows).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Now, in Unix seconds (as certificates and the API state times).
pub fn now_s() -> i64 {
    now_ms() / 1000
}

/// `len` bytes from /dev/urandom.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    bytes
}

/// A random marker that cannot appear by chance.
pub fn marker(tag: &str) -> String {
    format!(
        "{tag}-{}",
        random_bytes(12)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// A running `secretfs mount`, unmounted (SIGTERM) on drop.
pub struct Mount {
    pub path: PathBuf,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

/// Fails with a clear message where FUSE cannot work, instead of skipping.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: the mount tests need FUSE (run as root with /dev/fuse; see scripts/test.sh)"
    );
    assert!(
        rustix::process::geteuid().is_root(),
        "the mount tests need root (CAP_SYS_ADMIN) to mount FUSE"
    );
}

/// Sends `sig` to a child that has not been waited for (so its pid is
/// still its own).
pub fn signal(child: &Child, sig: Signal) {
    let pid = rustix::process::Pid::from_child(child);
    let _ = rustix::process::kill_process(pid, sig);
}

/// Detaches whatever is mounted at `path` (umount2 with MNT_DETACH).
pub fn detach(path: &Path) -> rustix::io::Result<()> {
    rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH)
}

pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}

impl TestServer {
    /// Starts `secretfs mount` as `who` on a new directory and waits until
    /// the mount is up.
    pub fn mount_as(&self, who: &Identity, args: &[&str]) -> Mount {
        let path = self
            .tmp
            .path()
            .join(format!("mnt-{}-{}", who.name, marker("m")));
        std::fs::create_dir(&path).unwrap();
        self.mount_at(who, &path, args)
            .unwrap_or_else(|r| panic!("mount should start: {}", r.stderr))
    }

    /// Starts a mount at `path`; Err(Run) if the process exits first.
    pub fn mount_at(&self, who: &Identity, path: &Path, args: &[&str]) -> Result<Mount, Run> {
        self.mount_at_with(who, path, args, |_| {})
    }

    /// As `mount_at`, with a last say on the command (limits, directory).
    pub fn mount_at_with(
        &self,
        who: &Identity,
        path: &Path,
        args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Result<Mount, Run> {
        require_fuse();
        let mut cmd = self.cmd_as(who);
        configure(&mut cmd);
        cmd.arg("mount")
            .arg(path)
            .args(args)
            .env("SECRETFS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn mount");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let start = Instant::now();
        loop {
            // Wait for this process to say it mounted: a dead mount left at
            // the same path may still answer from the kernel's caches.
            // (With --strict-status the host may not even stat the status file.)
            if log.lock().unwrap().contains("mounted path=") {
                return Ok(Mount {
                    path: path.to_path_buf(),
                    child: Some(child),
                    log,
                });
            }
            if let Some(status) = child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                return Err(Run {
                    code: status.code().unwrap_or(-1),
                    stdout: String::new(),
                    stderr: log.lock().unwrap().clone(),
                    raw_stdout: Vec::new(),
                });
            }
            if start.elapsed() > Duration::from_secs(40) {
                let _ = child.kill();
                let _ = child.wait();
                // Leave no dead mount behind for the next test run.
                if is_mounted(path) {
                    let _ = detach(path);
                }
                panic!(
                    "mount did not come up at {}: {}",
                    path.display(),
                    log.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Mount {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn status(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.path.join(".secretfs/status")).unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("status is not JSON ({e}): {text}"))
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> i32 {
        terminate(self.child.take())
    }

    pub fn kill9(&mut self) {
        self.signal_and_wait(Signal::KILL);
    }

    /// Sends `sig` and returns how the process ended.
    pub fn signal_and_wait(&mut self, sig: Signal) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        signal(&child, sig);
        child.wait().ok()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        if is_mounted(&self.path) {
            let _ = detach(&self.path);
        }
    }
}

/// Runs the openssl CLI, for keys and key formats rcgen cannot make.
pub fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("these tests need the openssl CLI ({e}); install it (apt-get install openssl)")
        });
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One hex field (a capability set: `CapEff`, `CapPrm`...) of a
/// `/proc/PID/status` or `/proc/PID/task/TID/status` text.
pub fn status_hex(status: &str, field: &str) -> u64 {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {status}"));
    u64::from_str_radix(line.trim(), 16).unwrap()
}

/// Polls `f` until it returns true or `limit` passes.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// How long a wait for something that must happen may take before it
/// fails: generous, for a shared, noisy machine.
pub const LONG: Duration = Duration::from_secs(30);

/// Waits (up to [`LONG`]) until the mount's `name` holds `want`; fails
/// naming what it shows instead, with the mount's log.
#[track_caller]
pub fn wait_for(m: &Mount, name: &str, want: &[u8]) {
    assert!(
        eventually(LONG, || std::fs::read(m.file(name)).ok().as_deref()
            == Some(want)),
        "{name} never showed {:?} (shows {:?})\nmount log:\n{}",
        String::from_utf8_lossy(&want[..want.len().min(40)]),
        std::fs::read(m.file(name))
            .map(|b| String::from_utf8_lossy(&b[..b.len().min(40)]).into_owned()),
        m.log()
    );
}

/// Reads a mount's file over and over in a thread until told to stop:
/// every read must give non-empty bytes (never ENOENT, never empty) and,
/// given the mount's status file, the status must say connected.
pub struct Reader {
    stop: Arc<AtomicBool>,
    problems: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Reader {
    pub fn start(file: PathBuf, status: Option<PathBuf>) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let problems = Arc::new(Mutex::new(Vec::new()));
        let (halt, record) = (stop.clone(), problems.clone());
        let thread = std::thread::spawn(move || {
            let mut reads = 0;
            while !halt.load(Ordering::Relaxed) {
                match std::fs::read(&file) {
                    Ok(bytes) if !bytes.is_empty() => {}
                    Ok(_) => record.lock().unwrap().push("empty read".into()),
                    Err(e) => record.lock().unwrap().push(format!("read failed: {e}")),
                }
                if let Some(status) = &status {
                    let text = std::fs::read_to_string(status).unwrap_or_default();
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                    if v["connected"] != true {
                        record.lock().unwrap().push(format!("status: {text}"));
                    }
                }
                reads += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            reads
        });
        Reader {
            stop,
            problems,
            thread: Some(thread),
        }
    }

    /// Stops; fails the test if any read (or status) was wrong or none
    /// was made.
    #[track_caller]
    pub fn finish(mut self, m: &Mount) {
        self.stop.store(true, Ordering::Relaxed);
        let reads = self.thread.take().unwrap().join().unwrap();
        let problems = self.problems.lock().unwrap().clone();
        assert!(reads > 0);
        assert!(
            problems.is_empty(),
            "{} of {reads} reads failed, first: {:?}\nmount log:\n{}",
            problems.len(),
            problems.first(),
            m.log()
        );
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Fails with a clear message where runc or busybox-static is missing.
pub fn require_runc() {
    for tool in ["runc", "/bin/busybox"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .unwrap();
        assert!(
            found.status.success(),
            "{tool} is missing: the container tests need runc and busybox-static (scripts/test.sh installs them)"
        );
    }
}

/// An OCI bundle under `dir` with a busybox rootfs and `runc spec`'s
/// config.json, not yet written back: change `config`, then `write()`.
pub struct OciBundle {
    pub path: PathBuf,
    pub config: serde_json::Value,
}

impl OciBundle {
    /// A bundle running `args` as root without a terminal.
    pub fn new(dir: &Path, args: &[&str]) -> OciBundle {
        require_runc();
        let path = dir.join(format!("bundle-{}", marker("b")));
        let rootfs = path.join("rootfs");
        for d in ["bin", "proc", "sys", "dev", "tmp"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
        let spec = Command::new("runc")
            .args(["spec", "--bundle"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            spec.status.success(),
            "runc spec: {}",
            String::from_utf8_lossy(&spec.stderr)
        );
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path.join("config.json")).unwrap()).unwrap();
        config["process"]["terminal"] = false.into();
        config["process"]["args"] = args.iter().map(|a| serde_json::Value::from(*a)).collect();
        OciBundle { path, config }
    }

    /// Adds a bind mount of `source` at `destination` with `options`
    /// (besides "rbind").
    pub fn bind(&mut self, source: &Path, destination: &str, options: &[&str]) -> &mut Self {
        let mut opts = vec!["rbind"];
        opts.extend_from_slice(options);
        self.config["mounts"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "destination": destination,
                "type": "bind",
                "source": source,
                "options": opts,
            }));
        self
    }

    /// Shares the host's network namespace (127.0.0.1 is the host's).
    pub fn host_network(&mut self) -> &mut Self {
        self.config["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|ns| ns["type"] != "network");
        self
    }

    pub fn write(&self) {
        std::fs::write(
            self.path.join("config.json"),
            serde_json::to_vec_pretty(&self.config).unwrap(),
        )
        .unwrap();
    }
}

/// A runc container started in the background (`runc run` as a child);
/// deleted (`runc delete -f`) on drop.
pub struct RuncContainer {
    pub id: String,
    child: Option<Child>,
}

impl RuncContainer {
    pub fn start(bundle: &OciBundle, tag: &str) -> RuncContainer {
        Self::start_named(bundle, format!("secretfs-{tag}-{}", marker("c")))
    }

    /// As `start`, with the container id chosen by the caller.
    pub fn start_named(bundle: &OciBundle, id: String) -> RuncContainer {
        bundle.write();
        let child = Command::new("runc")
            .args(["run", "--bundle"])
            .arg(&bundle.path)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn runc run");
        RuncContainer {
            id,
            child: Some(child),
        }
    }

    /// Sends `signal` (a name runc knows: TERM, KILL) to the container.
    pub fn kill(&self, signal: &str) {
        let _ = Command::new("runc")
            .args(["kill", &self.id, signal])
            .status();
    }

    /// Waits (at most `limit`) for the container's process to end.
    pub fn wait(&mut self, limit: Duration) -> Run {
        let child = self.child.take().expect("already waited");
        Run::from(wait_bounded(child, limit))
    }
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .args(["delete", "-f", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// For a test that always needs PostgreSQL (several replicas on one
/// database), whatever the suite's store: true, with a line saying so, in
/// the sqlite pass (the test then returns at once), so scripts/test.sh's
/// two passes do not run it twice.
pub fn postgres_pass_only(why: &str) -> bool {
    if test_store() == TestStore::Postgres {
        return false;
    }
    eprintln!("run in the postgres pass only (SECRETFS_TEST_STORE=postgres): {why}");
    true
}

/// A copy of `state` (what an operator copies to the new replica's host).
pub fn copy_dir(state: &Path, to: &Path) {
    let out = Command::new("cp")
        .arg("-a")
        .arg(state)
        .arg(to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
