//! The sidecar of deploy/kubernetes, reproduced with two runc containers:
//! the sidecar runs `secretfs mount /shared/secrets` on a volume shared
//! with bidirectional propagation (Kubernetes' `Bidirectional`: rshared),
//! and the app container, which has the same volume with `HostToContainer`
//! propagation (rslave), reads the secrets through it. The host sees them
//! too. Needs root, /dev/fuse, runc and busybox-static.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;

/// A host directory made a shared mount point (the emptyDir of the pod);
/// unmounted, with whatever propagated into it, on drop.
struct SharedDir {
    path: PathBuf,
}

impl SharedDir {
    fn new(path: PathBuf) -> SharedDir {
        std::fs::create_dir_all(path.join("secrets")).unwrap();
        for args in [
            vec!["--bind", path.to_str().unwrap(), path.to_str().unwrap()],
            vec!["--make-rshared", path.to_str().unwrap()],
        ] {
            let out = Command::new("mount").args(&args).output().unwrap();
            assert!(
                out.status.success(),
                "mount {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        SharedDir { path }
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        for p in [self.path.join("secrets"), self.path.clone()] {
            while is_mounted(&p) {
                if detach(&p).is_err() {
                    break;
                }
            }
        }
    }
}

/// What /proc/self/mountinfo says is mounted at `path`: (fs type, optional
/// fields such as `shared:N`).
fn mount_at(path: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.to_str().unwrap();
    text.lines().rev().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        if fields.get(4) != Some(&p) {
            return None;
        }
        let sep = fields.iter().position(|f| *f == "-")?;
        Some((fields[sep + 1].to_owned(), fields[6..sep].join(" ")))
    })
}

/// The sidecar: the secretfs binary and the host's shared libraries (it
/// is dynamically linked), /dev/fuse, CAP_SYS_ADMIN, the client's
/// certificate read-only, the host network, and the shared directory at
/// /shared with bidirectional propagation.
fn sidecar(s: &TestServer, who: &Identity, shared: &Path) -> OciBundle {
    let mut b = OciBundle::new(
        s.tmp.path(),
        &[
            "/usr/local/bin/secretfs",
            "mount",
            "/shared/secrets",
            "--refresh",
            "1s",
        ],
    );
    let creds = s.tmp.path().join(format!("creds-{}", marker("k")));
    std::fs::create_dir(&creds).unwrap();
    std::fs::copy(s.state.join("ca.pem"), creds.join("ca.pem")).unwrap();
    std::fs::copy(&who.cert, creds.join("tls.crt")).unwrap();
    std::fs::copy(&who.key, creds.join("tls.key")).unwrap();
    b.bind(&bin(), "/usr/local/bin/secretfs", &["ro"])
        .bind(&creds, "/etc/secretfs", &["ro"])
        .bind(shared, "/shared", &["rshared"])
        .host_network();
    for lib in ["/lib", "/lib64", "/usr/lib", "/usr/lib64"] {
        if Path::new(lib).exists() {
            let real = std::fs::canonicalize(lib).unwrap();
            b.bind(&real, lib, &["ro", "nosuid", "nodev"]);
        }
    }
    let c = &mut b.config;
    // Kubernetes (containerd, CRI-O) does the same for a pod with a
    // Bidirectional mount: the container's mounts stay peers of the host's.
    c["linux"]["rootfsPropagation"] = "rshared".into();
    c["process"]["env"] = serde_json::json!([
        "PATH=/usr/local/bin:/bin",
        "SECRETFS_LOG=info",
        format!("SECRETFS_SERVER={}", s.url()),
        "SECRETFS_CA=/etc/secretfs/ca.pem",
        "SECRETFS_CERT=/etc/secretfs/tls.crt",
        "SECRETFS_KEY=/etc/secretfs/tls.key",
    ]);
    let caps = serde_json::json!(["CAP_SYS_ADMIN", "CAP_IPC_LOCK", "CAP_KILL"]);
    for set in ["bounding", "effective", "permitted"] {
        c["process"]["capabilities"][set] = caps.clone();
    }
    c["linux"]["devices"] = serde_json::json!([{
        "path": "/dev/fuse", "type": "c", "major": 10, "minor": 229,
        "fileMode": 0o666, "uid": 0, "gid": 0
    }]);
    c["linux"]["resources"]["devices"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rwm"}));
    b
}

/// The app: the shared directory at /shared, read-only, receiving mounts
/// from the host (HostToContainer: rslave), and a writable /signal to say
/// it has started.
fn app(s: &TestServer, shared: &Path, signal: &Path, script: &str) -> OciBundle {
    let mut b = OciBundle::new(s.tmp.path(), &["/bin/busybox", "sh", "-c", script]);
    b.bind(shared, "/shared", &["rslave", "ro"])
        .bind(signal, "/signal", &["rw"]);
    b
}

#[test]
fn a_sidecar_mount_reaches_the_app_container_through_a_shared_volume() {
    require_fuse();
    require_runc();
    let s = TestServer::start();
    let token = marker("token");
    s.add_secret("app/token", token.as_bytes());
    s.add_secret("db/password", b"sidecar-pw");
    let who = s.add_client("app");
    s.grant("app", &["app"], &["app/token", "db/password"]);

    let shared = SharedDir::new(s.tmp.path().join("shared"));
    let (kind, fields) = mount_at(&shared.path).expect("the shared dir is a mount");
    assert!(fields.contains("shared:"), "{kind} {fields}");
    let signal = s.tmp.path().join("signal");
    std::fs::create_dir(&signal).unwrap();

    // The app starts first, as in a pod where both start together: it
    // sees an empty volume, then the secrets once the sidecar mounts.
    let script = "echo before=$(ls -A /shared/secrets | wc -l); touch /signal/started; \
         i=0; until [ -f /shared/secrets/app/token ]; do \
           i=$((i+1)); [ $i -gt 400 ] && { echo 'no secrets after 40s' >&2; exit 3; }; sleep 0.1; \
         done; \
         cat /shared/secrets/app/token; echo; cat /shared/secrets/db/password";
    let mut app_c = RuncContainer::start(&app(&s, &shared.path, &signal, script), "app");
    assert!(
        eventually(Duration::from_secs(30), || signal.join("started").exists()),
        "the app container did not start"
    );

    let mut side_c = RuncContainer::start(&sidecar(&s, &who, &shared.path), "sidecar");
    let host_file = shared.path.join("secrets/app/token");
    let seen = eventually(Duration::from_secs(40), || {
        std::fs::read(&host_file).is_ok_and(|b| b == token.as_bytes())
    });
    if !seen {
        side_c.kill("KILL");
        let r = side_c.wait(Duration::from_secs(20));
        panic!(
            "the host never saw the sidecar's mount\nsidecar stdout: {}\nstderr: {}",
            r.stdout, r.stderr
        );
    }
    // The host sees a FUSE mount made inside the sidecar.
    let (kind, _) = mount_at(&shared.path.join("secrets")).expect("mounted on the host");
    assert!(kind.starts_with("fuse"), "{kind}");

    let r = app_c.wait(Duration::from_secs(60));
    assert_eq!(r.code, 0, "app container: {r:?}");
    assert_eq!(
        r.stdout,
        format!("before=0\n{token}\nsidecar-pw"),
        "stderr: {}",
        r.stderr
    );

    // An app container started later sees the secrets at once.
    let late = app(
        &s,
        &shared.path,
        &signal,
        "cat /shared/secrets/db/password; echo x > /shared/secrets/new",
    );
    let mut late_c = RuncContainer::start(&late, "late");
    let r = late_c.wait(Duration::from_secs(30));
    assert!(r.stdout.starts_with("sidecar-pw"), "{r:?}");
    assert!(r.stderr.contains("Read-only file system"), "{r:?}");

    // A rotation reaches the app through the sidecar.
    s.cli_in(&["secret", "rotate", "db/password"], b"rotated-pw")
        .ok();
    assert!(
        eventually(Duration::from_secs(10), || {
            let check = app(&s, &shared.path, &signal, "cat /shared/secrets/db/password");
            RuncContainer::start(&check, "check")
                .wait(Duration::from_secs(30))
                .stdout
                == "rotated-pw"
        }),
        "the app never saw the rotated value"
    );

    // Stopping the sidecar unmounts, and the unmount propagates back.
    side_c.kill("TERM");
    let r = side_c.wait(Duration::from_secs(30));
    assert_eq!(r.code, 0, "sidecar exit: {r:?}");
    assert!(
        r.stderr.contains("mounted path=/shared/secrets"),
        "{}",
        r.stderr
    );
    assert!(
        eventually(Duration::from_secs(10), || !is_mounted(
            &shared.path.join("secrets")
        )),
        "the sidecar's mount outlived it on the host"
    );
}
