//! The real server as a stock gRPC client expects it: health checking,
//! server reflection, gzip, gRPC's default 4 MiB receive limit,
//! de-duplication and status codes. The client is not ours: Python grpcio
//! with stubs generated from proto/secretfs.proto at run time
//! (tests/python/conventions.py, one named check per convention).
//! Needs python3 with grpcio in target/python-deps (scripts/test.sh installs
//! it); without it these tests fail, never skip.

use std::fs::File;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;

const MIB: usize = 1 << 20;

/// Fails with a clear message where python3 or grpcio is missing.
fn require_grpcio() {
    let out = python()
        .args([
            "-c",
            "import grpc, grpc_tools, grpc_health.v1, grpc_reflection.v1alpha",
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 is missing ({e}): the gRPC conventions tests need it (scripts/test.sh installs it)")
        });
    assert!(
        out.status.success(),
        "Python grpcio is missing from target/python-deps: the gRPC conventions tests need it \
         (run scripts/test.sh, which installs it)\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server whose client `app` may read exactly `secrets`; the script
/// compares what it receives with their copies in `expect`.
struct Setup {
    server: TestServer,
    app: Identity,
    expect: PathBuf,
    health: Option<String>,
}

/// Starts the server with `args` and adds the data; fails first if
/// grpcio is missing.
fn setup<N: AsRef<str>>(args: &[&str], secrets: &[(N, Vec<u8>)]) -> Setup {
    require_grpcio();
    let server = TestServer::start_with(args);
    let health = server.health_addr.clone();
    let expect = server.tmp.path().join("expect");
    std::fs::create_dir(&expect).unwrap();
    for (name, content) in secrets {
        server.add_secret(name.as_ref(), content);
        std::fs::write(expect.join(name.as_ref()), content).unwrap();
    }
    let app = server.add_client("app");
    let names: Vec<&str> = secrets.iter().map(|(name, _)| name.as_ref()).collect();
    server.grant("apps", &["app"], &names);
    Setup {
        server,
        app,
        expect,
        health,
    }
}

/// Runs the named checks of conventions.py and fails with its report
/// unless each passed.
fn run_checks(s: &Setup, checks: &[&str]) {
    let out_dir = s.server.tmp.path();
    let stdout = out_dir.join("conventions.out");
    let stderr = out_dir.join("conventions.err");
    let mut cmd = python();
    cmd.arg(workspace().join("tests/python/conventions.py"))
        .args(["--addr", &s.server.addr])
        .arg("--ca")
        .arg(s.server.state.join("ca.pem"))
        .arg("--admin-cert")
        .arg(&s.server.admin.cert)
        .arg("--admin-key")
        .arg(&s.server.admin.key)
        .arg("--cert")
        .arg(&s.app.cert)
        .arg("--key")
        .arg(&s.app.key)
        .args(["--workload", &s.app.name])
        .arg("--proto-dir")
        .arg(workspace().join("proto"))
        .arg("--expect-dir")
        .arg(&s.expect);
    if let Some(health) = &s.health {
        cmd.args(["--health-addr", health]);
    }
    // Files, not pipes: a chatty grpc must not block on a full pipe.
    cmd.args(checks)
        .stdin(Stdio::null())
        .stdout(File::create(&stdout).unwrap())
        .stderr(File::create(&stderr).unwrap());
    let status = wait_bounded(
        cmd.spawn().expect("spawn python3"),
        Duration::from_secs(180),
    )
    .status;
    let report = std::fs::read_to_string(&stdout).unwrap_or_default();
    let errors = std::fs::read_to_string(&stderr).unwrap_or_default();
    println!("{report}");
    assert!(
        status.success(),
        "conventions.py failed ({status}); its report is above\nstderr:\n{errors}\nserver log:\n{}",
        s.server.log()
    );
    for check in checks {
        assert!(
            report.contains(&format!("ok   {check}:")),
            "conventions.py did not report {check} as passed\n{report}"
        );
    }
}

#[test]
fn health_and_reflection() {
    let s = setup(
        &["--health-listen", "127.0.0.1:0"],
        &[("hello", b"hello from secretfs".to_vec())],
    );
    assert!(
        s.health.is_some(),
        "the address file names the health listener"
    );
    run_checks(&s, &["whoami", "health", "reflection", "health-plaintext"]);
}

#[test]
fn gzip() {
    // Compressible, so that a compressed reply is visibly smaller.
    let text = b"a line of text that gzip squeezes well\n".repeat(256 * 1024 / 39);
    let s = setup(&[], &[("text", text)]);
    run_checks(&s, &["whoami", "gzip"]);
}

#[test]
fn default_limits_paging() {
    // 6 MiB in all, at the default 1 MiB limit each: more than a stock
    // client's 4 MiB receive limit takes in one message.
    let secrets: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("big-{i}"), random_bytes(MIB)))
        .collect();
    let s = setup(&[], &secrets);
    run_checks(&s, &["whoami", "read-paging", "watch-split"]);
}

#[test]
fn dedup() {
    let s = setup(&[], &[("one", random_bytes(100))]);
    run_checks(&s, &["whoami", "dedup"]);
}

#[test]
fn status_codes() {
    let s = setup(&[], &[("one", random_bytes(100))]);
    run_checks(&s, &["whoami", "too-large", "garbage", "big-metadata"]);
}
