//! deploy/kubernetes: every manifest validates against the Kubernetes API's
//! OpenAPI schemas (the `kubernetes-validate` package, which bundles them,
//! in strict mode: an unknown or misspelt field fails), for the oldest
//! Kubernetes the example supports (1.29: native sidecars) and the newest
//! the package knows; and the manifests agree with each other (the pod
//! reaches the server by a name its certificate carries, on the Service's
//! port; the probes ask the health port the server listens on). The init
//! container's script runs for real, as the pod's user on a volume as the
//! kubelet prepares it: it initialises once, a restart keeps the state, and
//! the server started from the manifest's environment serves the admin by
//! the names its certificate carries.
//! Needs python3 with kubernetes-validate in target/python-deps
//! (scripts/test.sh installs it); without it these tests fail, never skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;

/// The versions validated against: the oldest the README promises, the newest pinned.
const VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

fn manifests() -> Vec<PathBuf> {
    let dir = workspace().join("deploy/kubernetes");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    out.sort();
    out
}

/// `kubernetes-validate --strict` for every version in VERSIONS; fails
/// with a clear message where the package is missing.
fn kubernetes_validate() -> Command {
    let out = python()
        .args(["-c", "import kubernetes_validate"])
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 is missing ({e}): the manifest tests need it (scripts/test.sh installs it)")
        });
    assert!(
        out.status.success(),
        "kubernetes-validate is missing from target/python-deps: the manifest tests need it \
         (run scripts/test.sh, which installs it)\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cmd = python();
    cmd.args(["-m", "kubernetes_validate", "--strict"]);
    for v in VERSIONS {
        cmd.args(["-k", v]);
    }
    cmd
}

/// Validates one file: every resource in it passes for every version, and
/// nothing is only warned about (an unknown kind or apiVersion is a warning
/// to kubernetes-validate, and must fail here).
fn validate(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).unwrap();
    let resources = text.lines().filter(|l| l.starts_with("kind:")).count();
    let out = kubernetes_validate().arg(path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let passed = stdout
        .lines()
        .filter(|l| l.contains(" passed for "))
        .count();
    if !out.status.success()
        || report.contains("WARN")
        || report.contains("ERROR")
        || resources == 0
        || passed != resources * VERSIONS.len()
    {
        return Err(format!(
            "{} ({resources} resources, {passed} passes for {} versions):\n{report}",
            path.display(),
            VERSIONS.len()
        ));
    }
    Ok(())
}

#[test]
fn every_manifest_passes_strict_schema_validation() {
    let files = manifests();
    let names: Vec<_> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["pod.yaml", "server.yaml"] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    let failures: Vec<String> = files.iter().filter_map(|p| validate(p).err()).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn validation_fails_a_misspelt_field_a_missing_one_a_wrong_type_and_an_unknown_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let pod = repo_file("deploy/kubernetes/pod.yaml");
    let server = repo_file("deploy/kubernetes/server.yaml");
    let broken = [
        (
            "misspelt field",
            pod.replace(
                "terminationGracePeriodSeconds:",
                "terminationGracePeriodSecond:",
            ),
        ),
        (
            "misspelt nested field",
            pod.replace(
                "mountPropagation: Bidirectional",
                "mountPropagaton: Bidirectional",
            ),
        ),
        (
            "missing required field",
            server.replace("  serviceName: secretfs\n", ""),
        ),
        ("wrong type", server.replace("replicas: 1", "replicas: one")),
        (
            "unknown kind",
            server.replace("kind: StatefulSet", "kind: StatefulSett"),
        ),
        (
            "unknown apiVersion",
            server.replace("apiVersion: apps/v1", "apiVersion: apps/v9"),
        ),
    ];
    for (what, text) in broken {
        assert!(
            text != pod && text != server,
            "{what}: the replacement did not apply"
        );
        let path = tmp.path().join("broken.yaml");
        std::fs::write(&path, &text).unwrap();
        assert!(validate(&path).is_err(), "{what} passed validation");
    }
}

/// The values of `--flag VALUE` in `text`.
fn flag_values<'a>(text: &'a str, flag: &str) -> Vec<&'a str> {
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1])
        .collect()
}

/// The value of the env var `name` (`- name: NAME` then `value: ...`).
fn env_value<'a>(text: &'a str, name: &str) -> &'a str {
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() == format!("- name: {name}") {
            let next = lines.next().unwrap().trim();
            return next
                .strip_prefix("value: ")
                .unwrap_or_else(|| panic!("{name}: {next}"));
        }
    }
    panic!("no env {name}")
}

#[test]
fn the_manifests_agree_with_each_other() {
    let pod = repo_file("deploy/kubernetes/pod.yaml");
    let server = repo_file("deploy/kubernetes/server.yaml");

    // The pod reaches the server by a name in its certificate, on the
    // Service's port, and the server listens there.
    let url = env_value(&pod, "SECRETFS_SERVER");
    let (host, port) = url
        .strip_prefix("https://")
        .and_then(|a| a.rsplit_once(':'))
        .unwrap_or_else(|| panic!("SECRETFS_SERVER {url}"));
    let script = init_script(&server);
    let sans = flag_values(&script, "--san");
    assert!(sans.contains(&host), "{host} not among the SANs {sans:?}");
    assert!(
        sans.contains(&"localhost"),
        "port-forward needs localhost: {sans:?}"
    );
    assert!(
        server.contains(&format!("    - name: grpc\n      port: {port}\n")),
        "the Service does not offer port {port}"
    );
    let listen = env_value(&server, "SECRETFS_LISTEN");
    assert_eq!(listen, format!("0.0.0.0:{port}"));
    let advertise = flag_values(&script, "--advertise");
    assert_eq!(advertise, [format!("{host}:{port}").as_str()]);

    // The probes ask the plain-text health port the server opens.
    let health = env_value(&server, "SECRETFS_HEALTH_LISTEN");
    let health_port = health.rsplit_once(':').unwrap().1;
    let probes = server.matches("grpc:\n              port: ").count();
    assert_eq!(probes, 3, "startup, readiness and liveness probes");
    assert_eq!(
        server
            .matches(&format!("grpc:\n              port: {health_port}\n"))
            .count(),
        3,
        "every gRPC probe on the health port {health_port}"
    );

    // One state dir for init and run; the sidecar makes its mountpoint in
    // the fresh emptyDir.
    assert_eq!(server.matches("value: /var/lib/secretfs/server").count(), 2);
    assert!(pod.contains("\"--create-mountpoint\""));
}

/// The init container's shell script, as the kubelet hands it to
/// `/bin/sh -c` (the folded `>-` block joined by spaces).
fn init_script(server_yaml: &str) -> String {
    let mut lines = server_yaml.lines().skip_while(|l| l.trim() != "- >-");
    let first = lines.next().expect("the init container's `- >-` script");
    let indent = first.len() - first.trim_start().len();
    lines
        .take_while(|l| l.len() - l.trim_start().len() > indent)
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The DNS and IP names of a PEM certificate.
fn sans(pem: &str) -> Vec<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let ext = cert
        .subject_alternative_name()
        .unwrap()
        .expect("a SAN extension");
    ext.value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
            x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).unwrap()).to_string(),
                _ => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).unwrap()).to_string(),
            },
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn the_init_container_initialises_the_volume_once_and_the_server_runs_on_it() {
    use std::os::unix::fs::PermissionsExt;

    let server_yaml = repo_file("deploy/kubernetes/server.yaml");
    let script = init_script(&server_yaml);
    assert!(script.contains("server init"), "{script}");
    let state_dir = env_value(&server_yaml, "SECRETFS_STATE_DIR");
    let volume_mount = "/var/lib/secretfs";
    let relative = state_dir
        .strip_prefix(volume_mount)
        .expect("the state dir is on the volume");

    // A fresh volume as the kubelet hands it over with fsGroup 10001, and
    // the image's binary as `secretfs` on PATH; everything runs as the
    // pod's user, 10001.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let volume = tmp.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    rustix::fs::chown(&volume, None, Some(rustix::fs::Gid::from_raw(10001))).unwrap();
    std::fs::set_permissions(&volume, std::fs::Permissions::from_mode(0o2770)).unwrap();
    let bin_dir = tmp.path().join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    std::fs::copy(bin(), bin_dir.join("secretfs")).unwrap();
    std::fs::set_permissions(&bin_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = volume.join(relative.trim_start_matches('/'));
    let as_pod_user = |program: &str| {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid",
            "10001",
            "--regid",
            "10001",
            "--clear-groups",
            program,
        ])
        .env("PATH", format!("{}:/usr/bin:/bin", bin_dir.display()))
        .env("SECRETFS_STATE_DIR", &state);
        cmd
    };

    // First start: init runs; a restart: it does not, and changes nothing.
    for round in 0..2 {
        let mut cmd = as_pod_user("/bin/sh");
        cmd.args(["-c", &script]);
        let r = run_cmd(cmd, None);
        assert_eq!(r.code, 0, "round {round}: {r:?}");
        assert_eq!(
            r.stdout.contains("export SECRETFS_SERVER="),
            round == 0,
            "round {round}: {r:?}"
        );
    }
    let master = state.join("master.key");
    let mode = std::fs::metadata(&master).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The server certificate carries every name the pod and the operator use.
    let names = sans(&std::fs::read_to_string(state.join("server.pem")).unwrap());
    for want in flag_values(&script, "--san") {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    let pod_yaml = repo_file("deploy/kubernetes/pod.yaml");
    let pod_url = env_value(&pod_yaml, "SECRETFS_SERVER");
    let pod_host = pod_url[8..].rsplit_once(':').unwrap().0;
    assert!(
        names.iter().any(|n| n == pod_host),
        "{pod_host} not in {names:?}"
    );

    // The server runs on it as the pod's user, from the manifest's
    // environment (on free loopback ports here), and the admin reaches it
    // by `localhost` as through `kubectl port-forward`.
    let address_file = tmp.path().join("volume/address.json");
    let mut cmd = as_pod_user("secretfs");
    cmd.args(["server", "run", "--address-file"])
        .arg(&address_file)
        .env("SECRETFS_LISTEN", "127.0.0.1:0")
        .env("SECRETFS_HEALTH_LISTEN", "127.0.0.1:0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let up = eventually(Duration::from_secs(30), || address_file.exists());
    if !up {
        signal(&child, Signal::TERM);
        let out = wait_bounded(child, Duration::from_secs(10));
        panic!(
            "the server did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let addresses: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&address_file).unwrap()).unwrap();
    let port = addresses["addr"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1;
    assert!(addresses["health_addr"].is_string(), "{addresses}");
    let mut whoami = Command::new(bin());
    whoami
        .args(["whoami", "-o", "json"])
        .env("SECRETFS_SERVER", format!("https://localhost:{port}"))
        .env("SECRETFS_CA", state.join("ca.pem"))
        .env("SECRETFS_CERT", state.join("admin.pem"))
        .env("SECRETFS_KEY", state.join("admin.key"));
    let me = run_cmd(whoami, None);
    signal(&child, Signal::TERM);
    let out = wait_bounded(child, Duration::from_secs(30));
    let me = me.ok().json();
    assert_eq!(me["client"], "admin");
    assert_eq!(me["admin"], true);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
