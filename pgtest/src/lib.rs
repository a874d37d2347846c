//! A real PostgreSQL for tests, started by the tests themselves.
//!
//! Debian's `postgresql` package gives `initdb` and `postgres` under
//! `/usr/lib/postgresql/VERSION/bin` (`scripts/test.sh` installs it). The
//! cluster lives in a directory of its own under the system temp dir, on a
//! free loopback port, run as an unprivileged user (`postgres` when the tests
//! run as root: initdb refuses root). Every test asks for a database of its
//! own ([`PgCluster::database`]), so tests never see each other's rows.
//!
//! Connections over TCP use SCRAM passwords, so a wrong password is a real
//! refusal; the role secretfs uses ([`USER`]) owns every test database. The
//! postmaster dies with the process that started it (PR_SET_PDEATHSIG), and
//! clusters of processes that are gone are removed at the next start.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The role secretfs connects as.
pub const USER: &str = "secretfs";
/// Its password (tests only).
pub const PASSWORD: &str = "secretfs-test-password";
/// `url` (one of [`PgCluster::url`]'s) without its password, as an
/// operator gives it in argv.
pub fn url_without_password(url: &str) -> String {
    let without = url.replacen(&format!(":{PASSWORD}@"), "@", 1);
    assert_ne!(url, without, "the test cluster's URL carries its password");
    without
}

/// The superuser's password (tests only).
const SUPER_PASSWORD: &str = "postgres-test-password";

/// How a cluster is started.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `ssl = on` with this server certificate and key (PEM files, which
    /// the cluster copies into its own directory).
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// A test CA and a server certificate it signed, as PEM files in a
/// directory of their own (removed on drop): for [`Options::tls`] and for
/// the client's root CA.
pub struct TlsFiles {
    dir: PathBuf,
    /// The CA's certificate (what `sslrootcert` names).
    pub ca: PathBuf,
    /// The server's certificate and key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// A new CA, and a server certificate for `names` (host names or IP
    /// addresses, e.g. `["localhost", "127.0.0.1"]`).
    pub fn new(names: &[&str]) -> TlsFiles {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        remove_stale_clusters();
        let dir = std::env::temp_dir().join(format!(
            "secretfs-pgtest-{}-{}-tls",
            std::process::id(),
            next_id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "secretfs test PostgreSQL CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        let cert = params.signed_by(&key, &issuer).unwrap();
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            dir,
        };
        std::fs::write(&files.ca, ca_cert.pem()).unwrap();
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    /// [`Options`] for a cluster serving this certificate.
    pub fn options(&self) -> Options {
        Options {
            tls: Some((self.cert.clone(), self.key.clone())),
        }
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One running PostgreSQL server.
pub struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    /// (uid, gid) the server runs as; None: as this process.
    run_as: Option<(u32, u32)>,
    postmaster: Mutex<Option<Child>>,
    next_db: AtomicU64,
}

impl PgCluster {
    /// The cluster shared by every test of this process, started on first use.
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(|| PgCluster::start(Options::default()))
    }

    /// A cluster of its own (a test that stops, restarts or reconfigures
    /// it). Panics with what is missing when PostgreSQL cannot start: the
    /// tests need it, they do not skip.
    pub fn start(opts: Options) -> PgCluster {
        remove_stale_clusters();
        let bin = bin_dir();
        let run_as = run_as();
        let dir = std::env::temp_dir().join(format!(
            "secretfs-pgtest-{}-{}",
            std::process::id(),
            next_id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("data");
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, SUPER_PASSWORD).unwrap();
        if let Some((uid, gid)) = run_as {
            chown(&dir, uid, gid);
            chown(&pwfile, uid, gid);
        }
        let out = as_user(Command::new(bin.join("initdb")), run_as)
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}/initdb: {e}", bin.display()));
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        // Durable as in production (synchronous_commit on, fsync on), small.
        writeln!(
            conf,
            "listen_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             max_connections = 300\nshared_buffers = 32MB\nfsync = on\n\
             synchronous_commit = on\nlog_min_messages = warning\n",
            dir.display()
        )
        .unwrap();
        if let Some((cert, key)) = &opts.tls {
            std::fs::copy(cert, data.join("server.crt")).unwrap();
            std::fs::copy(key, data.join("server.key")).unwrap();
            std::fs::set_permissions(
                data.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            if let Some((uid, gid)) = run_as {
                chown(&data.join("server.crt"), uid, gid);
                chown(&data.join("server.key"), uid, gid);
            }
            writeln!(
                conf,
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'"
            )
            .unwrap();
        }
        drop(conf);
        let cluster = PgCluster {
            dir,
            bin,
            port: free_port(),
            run_as,
            postmaster: Mutex::new(None),
            next_db: AtomicU64::new(1),
        };
        cluster.start_again();
        let mut c = cluster.superuser();
        c.batch_execute(&format!(
            "CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}' CREATEDB"
        ))
        .unwrap();
        cluster
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A fresh, empty database owned by [`USER`]; returns its URL (with the
    /// password: tests only).
    pub fn database(&self) -> String {
        let name = format!("t{}", self.next_db.fetch_add(1, Ordering::SeqCst));
        self.superuser()
            .batch_execute(&format!("CREATE DATABASE {name} OWNER {USER}"))
            .unwrap();
        self.url(&name)
    }

    /// The URL of database `name` as [`USER`], with its password.
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{name}",
            self.port
        )
    }

    /// A superuser connection over the cluster's Unix socket (for tests
    /// that act behind secretfs's back: terminate its connections, edit
    /// rows).
    pub fn superuser(&self) -> postgres::Client {
        self.superuser_on("postgres")
    }

    /// As [`superuser`](Self::superuser), on database `name`.
    pub fn superuser_on(&self, name: &str) -> postgres::Client {
        postgres::Config::new()
            .host_path(&self.dir)
            .port(self.port)
            .user("postgres")
            .dbname(name)
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL as postgres: {e}"))
    }

    /// Stops the server at once (SIGQUIT: what a crash looks like to
    /// clients); `start_again` brings it back on the same port.
    pub fn stop(&self) {
        let mut pm = self.postmaster.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = pm.take() {
            // SAFETY: kill(2) on our own child's pid, which we have not
            // reaped yet (so it cannot have been reused).
            unsafe { libc::kill(child.id() as i32, libc::SIGQUIT) };
            let _ = child.wait();
        }
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn start_again(&self) {
        let mut pm = self.postmaster.lock().unwrap_or_else(|e| e.into_inner());
        assert!(pm.is_none(), "the test PostgreSQL is already running");
        let log = std::fs::File::create(self.dir.join("postgres.log")).unwrap();
        if let Some((uid, gid)) = self.run_as {
            chown(&self.dir.join("postgres.log"), uid, gid);
        }
        let mut cmd = as_user(Command::new(self.bin.join("postgres")), self.run_as);
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl in the child before exec is async-signal-safe; it
        // makes the postmaster die with the test process.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
                Ok(())
            });
        }
        // PR_SET_PDEATHSIG fires when the *thread* that forked exits, and
        // a test's thread ends with the test: fork from a thread that lives
        // as long as the process.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(cmd.spawn());
            loop {
                std::thread::park();
            }
        });
        let child = rx
            .recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("cannot start postgres: {e}"));
        *pm = Some(child);
        drop(pm);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = postgres::Config::new()
                .host_path(&self.dir)
                .port(self.port)
                .user("postgres")
                .dbname("postgres")
                .connect_timeout(Duration::from_secs(2))
                .connect(postgres::NoTls)
                .is_ok();
            if ok {
                return;
            }
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
                panic!("the test PostgreSQL did not start within 30 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ends every connection to database `name` but the caller's (what a
    /// restarted or failed-over database does to its clients).
    pub fn terminate_connections(&self, name: &str) -> u64 {
        let mut c = self.superuser();
        let row = c
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&name],
            )
            .unwrap();
        row.get::<_, i64>(0) as u64
    }

    /// The cluster's directory (data, socket, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn next_id() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// The newest installed PostgreSQL's bin directory.
fn bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<u32> = std::fs::read_dir(root)
        .unwrap_or_else(|_| {
            panic!("PostgreSQL is not installed (no /usr/lib/postgresql): run ./scripts/test.sh, which installs Debian's postgresql package")
        })
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort();
    let v = versions
        .last()
        .expect("no PostgreSQL version under /usr/lib/postgresql");
    root.join(v.to_string()).join("bin")
}

/// As root, run the server as the `postgres` user (initdb refuses root).
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam with a valid C string; the record is read at once,
    // before any other call that could overwrite it.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root, and there is no `postgres` user to run PostgreSQL as: install Debian's postgresql package (./scripts/test.sh does)"
    );
    // SAFETY: pw is non-null and points at getpwnam's static record.
    unsafe { Some(((*pw).pw_uid, (*pw).pw_gid)) }
}

fn as_user(mut cmd: Command, run_as: Option<(u32, u32)>) -> Command {
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid);
        // (std drops root's supplementary groups when it sets the uid.)
        cmd.env("HOME", "/tmp");
    }
    cmd
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Removes the directories of clusters whose test process is gone.
fn remove_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix("secretfs-pgtest-"))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_of_its_own_with_a_password_that_counts() {
        let pg = PgCluster::shared();
        let url = pg.database();
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let one: i32 = c.query_one("SELECT 1", &[]).unwrap().get(0);
        assert_eq!(one, 1);
        let wrong = url.replace(PASSWORD, "wrong");
        let Err(err) = postgres::Client::connect(&wrong, postgres::NoTls) else {
            panic!("a wrong password was accepted");
        };
        // (postgres::Error's Display is only "db error": the cause is in
        // the DbError.)
        let db = err.as_db_error().expect("a refusal from the server");
        assert!(db.message().contains("password"), "{db}");
    }

    #[test]
    fn a_cluster_with_tls_has_ssl_on() {
        let files = TlsFiles::new(&["localhost", "127.0.0.1"]);
        let pg = PgCluster::start(files.options());
        let on: String = pg.superuser().query_one("SHOW ssl", &[]).unwrap().get(0);
        assert_eq!(on, "on");
    }

    #[test]
    fn stop_and_start_again_on_the_same_port() {
        let pg = PgCluster::start(Options::default());
        let url = pg.database();
        pg.stop();
        assert!(postgres::Client::connect(&url, postgres::NoTls).is_err());
        pg.start_again();
        postgres::Client::connect(&url, postgres::NoTls).unwrap();
    }
}
