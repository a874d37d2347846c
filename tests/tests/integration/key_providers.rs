//! Master key providers (file, systemd credentials, PKCS#11 with SoftHSM2)
//! and the online, resumable `server rekey` (issue 12, items 3 and 4).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use secretfs_proto::v1;

use crate::common::*;

const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "5678";

/// Every file under `dir`, and whether any holds `needle`.
fn dir_holds(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            hits.extend(dir_holds(&p, needle));
        } else if contains(&read_all(&p), needle) {
            hits.push(p);
        }
    }
    hits
}

/// Adds `n` secrets (every third rotated once, so it has two versions),
/// all granted to a client `app`; returns the identity and the contents.
fn fill(s: &TestServer, n: usize) -> (Identity, BTreeMap<String, Vec<u8>>) {
    let app = s.add_client("app");
    let mut want = BTreeMap::new();
    rt().block_on(async {
        let mut c = s.admin_client().await;
        c.create_group(v1::CreateGroupRequest {
            name: "all".into(),
            description: String::new(),
        })
        .await
        .unwrap();
        for i in 0..n {
            let name = format!("k/s{i:03}");
            let mut content = random_bytes(24);
            c.create_secret(v1::CreateSecretRequest {
                name: name.clone(),
                content: content.clone(),
                mode: 0o400,
                ..Default::default()
            })
            .await
            .unwrap();
            if i % 3 == 0 {
                content = random_bytes(24);
                c.rotate_secret(v1::RotateSecretRequest {
                    name: name.clone(),
                    content: content.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
            c.add_secret_to_group(v1::GroupSecretRequest {
                group: "all".into(),
                secret: name.clone(),
            })
            .await
            .unwrap();
            want.insert(name, content);
        }
        c.add_client_to_group(v1::GroupClientRequest {
            group: "all".into(),
            client: "app".into(),
        })
        .await
        .unwrap();
    });
    (app, want)
}

/// Every secret `who` can read, by name, in one paged call.
fn read_everything(s: &TestServer, who: &Identity) -> BTreeMap<String, Vec<u8>> {
    rt().block_on(async {
        let mut c = s.secrets_client(who).await;
        let mut out = BTreeMap::new();
        let mut token = String::new();
        loop {
            let r = c
                .read_secrets(v1::ReadSecretsRequest {
                    names: vec![],
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            for sc in r.secrets {
                out.insert(sc.meta.unwrap().name, sc.content);
            }
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
        }
        out
    })
}

fn rekey_status(s: &TestServer) -> serde_json::Value {
    s.cli(&["server", "rekey", "--status", "-o", "json"])
        .ok()
        .json()
}

/// Waits (bounded) until no rekey is in progress; returns the epoch.
fn wait_rekeyed(s: &TestServer) -> u64 {
    let start = Instant::now();
    loop {
        let st = rekey_status(s);
        assert!(st["error"].is_null(), "the rekey failed: {st}\n{}", s.log());
        if st["in_progress"] == false {
            return st["epoch"].as_u64().unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the rekey did not complete: {st}\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `server run` on `state` with `args` and `env`, expected to fail at
/// start; returns its stderr.
fn run_fails(state: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "run", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state)
        .args(args)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("SECRETFS_PKCS11_PIN")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = wait_bounded(cmd.spawn().unwrap(), Duration::from_secs(60));
    assert!(!out.status.success(), "the server started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A PIN file: the server refuses one others can read.
fn write_0600(path: &Path, content: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn seed() -> u64 {
    let seed = std::env::var("SECRETFS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_ms() as u64);
    println!("rekey kill test seed {seed} (repeat with SECRETFS_TEST_SEED={seed})");
    seed
}

/// xorshift64*: enough to vary kill delays reproducibly.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

#[test]
fn rekey_survives_kill_9_at_random_points_and_the_old_key_is_then_not_needed() {
    let mut rng = Rng(seed() | 1);
    // Small batches with a pause, so kills land mid-way.
    let mut s = TestServer::start_with(&["--rekey-batch", "2", "--rekey-pause", "10ms"]);
    let (app, want) = fill(&s, 60);
    assert_eq!(read_everything(&s, &app), want);
    let first_key = std::fs::read(s.state.join("master.key")).unwrap();
    let mut epoch = rekey_status(&s)["epoch"].as_u64().unwrap();
    assert_eq!(epoch, 1);
    for run in 0..20 {
        let delay = rng.below(700);
        let mut rekey = s.cmd_as(&s.admin.clone());
        rekey
            .args(["server", "rekey", "--no-wait"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = rekey.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        s.kill9();
        let _ = child.kill();
        let _ = child.wait();
        s.restart_on("127.0.0.1:0");
        let now = wait_rekeyed(&s);
        assert!(
            now == epoch || now == epoch + 1,
            "run {run} (kill after {delay} ms): epoch {epoch} became {now}"
        );
        epoch = now;
        assert_eq!(
            read_everything(&s, &app),
            want,
            "run {run} (kill after {delay} ms): a secret reads wrong"
        );
        assert!(
            !s.state.join("master.key.next").exists(),
            "run {run}: master.key.next left after the rekey completed"
        );
    }
    let resumed = s.log().matches("resuming the master key rekey").count();
    println!("{resumed} of 20 kills landed mid-rekey; now at epoch {epoch}");
    assert!(resumed > 0, "no kill landed during a rekey\n{}", s.log());
    // One more, not interrupted, so the old key is surely replaced.
    s.cli(&["server", "rekey"]).ok();
    let done = rekey_status(&s);
    assert_eq!(done["epoch"].as_u64().unwrap(), epoch + 1, "{done}");
    let completed = s.audit_events("server.rekey", &[]);
    assert!(
        completed
            .iter()
            .any(|e| e["detail"].as_str().unwrap_or("").contains("completed")),
        "{completed:?}"
    );

    // The old key is not needed: it is gone from the state directory, the
    // server starts and reads without it, and refuses it if put back.
    s.stop();
    let key_now = std::fs::read(s.state.join("master.key")).unwrap();
    assert_ne!(key_now, first_key);
    assert!(dir_holds(&s.state, first_key.trim_ascii()).is_empty());
    s.restart_on("127.0.0.1:0");
    assert_eq!(read_everything(&s, &app), want);
    s.stop();
    std::fs::write(s.state.join("master.key"), &first_key).unwrap();
    let err = run_fails(&s.state, &[], &[]);
    assert!(err.contains("does not match this database"), "{err}");
    assert!(err.contains("Nothing was changed"), "{err}");
    std::fs::write(s.state.join("master.key"), &key_now).unwrap();
    s.restart_on("127.0.0.1:0");
    assert_eq!(read_everything(&s, &app), want);
}

#[test]
fn systemd_credential_provider() {
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    let key_raw = random_bytes(32);
    let key_hex = to_hex(&key_raw);
    std::fs::write(creds.join("secretfs-master-key"), format!("{key_hex}\n")).unwrap();
    let creds_env = format!("CREDENTIALS_DIRECTORY={}", creds.display());
    let mut s = TestServer::start_custom(
        tmp,
        |init| {
            init.args(["--master-key-provider", "systemd"])
                .env("CREDENTIALS_DIRECTORY", &creds);
        },
        &["env", &creds_env],
        &[],
    );
    assert!(!s.state.join("master.key").exists());
    let (app, want) = fill(&s, 3);
    assert_eq!(read_everything(&s, &app), want);
    s.stop();
    assert!(
        dir_holds(&s.state, key_hex.as_bytes()).is_empty(),
        "the state directory holds the key"
    );
    assert!(dir_holds(&s.state, &key_raw).is_empty());

    // No $CREDENTIALS_DIRECTORY: a sentence naming LoadCredentialEncrypted=.
    let err = run_fails(&s.state, &[], &[]);
    assert!(err.contains("LoadCredentialEncrypted="), "{err}");
    // Another key under the name: refused, nothing changed.
    let other = s.tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("secretfs-master-key"), to_hex(&random_bytes(32))).unwrap();
    let err = run_fails(
        &s.state,
        &[],
        &[("CREDENTIALS_DIRECTORY", other.to_str().unwrap())],
    );
    assert!(err.contains("does not match this database"), "{err}");
    // A credential that is not a key.
    std::fs::write(other.join("secretfs-master-key"), "nonsense").unwrap();
    let err = run_fails(
        &s.state,
        &[],
        &[("CREDENTIALS_DIRECTORY", other.to_str().unwrap())],
    );
    assert!(err.contains("64 hex digits or 32 raw bytes"), "{err}");

    // Rekey to a second credential the operator made (32 raw bytes); only
    // an admin may ask.
    s.restart_on("127.0.0.1:0");
    let r = s.cli_as(&app, &["server", "rekey", "--status"], None);
    assert_ne!(
        r.code, 0,
        "a client that is not an admin saw the rekey status"
    );
    s.cli(&["server", "rekey"]).fails(1, "--new-credential");
    let next = random_bytes(32);
    std::fs::write(creds.join("secretfs-master-key-2"), &next).unwrap();
    s.cli(&[
        "server",
        "rekey",
        "--new-credential",
        "secretfs-master-key-2",
    ])
    .ok();
    assert_eq!(wait_rekeyed(&s), 2);
    s.stop();
    std::fs::remove_file(creds.join("secretfs-master-key")).unwrap();
    let desc = std::fs::read_to_string(s.state.join("master-key.json")).unwrap();
    assert!(desc.contains("secretfs-master-key-2"), "{desc}");
    s.restart_on("127.0.0.1:0");
    assert_eq!(read_everything(&s, &app), want);

    // The unit's override still naming the old credential (which the
    // operator may still load) is refused, naming the descriptor.
    s.stop();
    std::fs::write(creds.join("secretfs-master-key"), format!("{key_hex}\n")).unwrap();
    let creds_s = creds.to_str().unwrap();
    let err = run_fails(
        &s.state,
        &[],
        &[
            ("CREDENTIALS_DIRECTORY", creds_s),
            ("SECRETFS_MASTER_KEY_CREDENTIAL", "secretfs-master-key"),
        ],
    );
    assert!(
        err.contains("master-key.json") && err.contains("Drop the override"),
        "{err}"
    );
    s.restart_on("127.0.0.1:0");
    assert_eq!(read_everything(&s, &app), want);
}

/// A SoftHSM2 token of its own in `dir`; returns SOFTHSM2_CONF's value.
fn softhsm_token(dir: &Path, label: &str) -> PathBuf {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("softhsm2-util");
    cmd.env("SOFTHSM2_CONF", &conf).args([
        "--init-token",
        "--free",
        "--label",
        label,
        "--so-pin",
        "1234",
        "--pin",
        PIN,
    ]);
    run_cmd(cmd, None).ok();
    conf
}

#[test]
fn pkcs11_provider_with_softhsm2() {
    assert!(
        Path::new(SOFTHSM).exists(),
        "SoftHSM2 is not installed (scripts/test.sh installs the softhsm2 package)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let conf = softhsm_token(tmp.path(), "secretfs");
    let pin_file = tmp.path().join("pin");
    write_0600(&pin_file, format!("{PIN}\n").as_bytes());
    let conf_env = format!("SOFTHSM2_CONF={}", conf.display());
    let pkcs11 = [
        "--pkcs11-module",
        SOFTHSM,
        "--pkcs11-token",
        "secretfs",
        "--pkcs11-key",
        "master-wrap",
    ];
    let mut s = TestServer::start_custom(
        tmp,
        |init| {
            init.args(pkcs11)
                .arg("--pkcs11-pin-file")
                .arg(&pin_file)
                .env("SOFTHSM2_CONF", &conf);
        },
        &["env", &conf_env],
        &[],
    );
    assert!(!s.state.join("master.key").exists());
    let wrapped = std::fs::read(s.state.join("master.key.wrapped")).unwrap();
    assert_eq!(wrapped.len(), 4 + 12 + 32 + 16, "magic, IV, AES-GCM(key)");
    let (app, want) = fill(&s, 3);
    assert_eq!(read_everything(&s, &app), want);

    // A rekey wraps the new key with the token too.
    s.cli(&["server", "rekey"]).ok();
    assert_eq!(wait_rekeyed(&s), 2);
    s.stop();
    assert!(!s.state.join("master.key.wrapped.next").exists());
    assert_ne!(
        std::fs::read(s.state.join("master.key.wrapped")).unwrap(),
        wrapped
    );
    assert!(!s.state.join("master.key").exists());
    // A refused start must leave the SQLite file as it was (looked at on
    // SQLite only; on PostgreSQL the store's own tests say it).
    let db_before = s.database.is_none().then(|| read_all(&s.db()));

    let conf_s = conf.to_str().unwrap();
    let env = [("SOFTHSM2_CONF", conf_s)];
    // The PIN file is recorded in master-key.json; override it.
    let bad_pin = s.tmp.path().join("bad-pin");
    write_0600(&bad_pin, b"0000");
    let err = run_fails(
        &s.state,
        &["--pkcs11-pin-file", bad_pin.to_str().unwrap()],
        &env,
    );
    assert!(err.contains("PIN is wrong"), "{err}");
    let err = run_fails(&s.state, &["--pkcs11-token", "nope"], &env);
    assert!(err.contains("no PKCS#11 token labelled \"nope\""), "{err}");
    assert!(err.contains("--pkcs11-token"), "{err}");
    let err = run_fails(&s.state, &["--pkcs11-key", "other"], &env);
    assert!(
        err.contains("wrapping key is not in the PKCS#11 token"),
        "{err}"
    );
    let err = run_fails(&s.state, &["--pkcs11-module", "/nonexistent.so"], &env);
    assert!(err.contains("cannot load the PKCS#11 module"), "{err}");
    // Another token's key cannot unwrap it.
    let other = tempfile::tempdir().unwrap();
    let other_conf = softhsm_token(other.path(), "secretfs");
    let mut init = crate::common::secretfs();
    init.args(["server", "init", "--state-dir"])
        .arg(other.path().join("state"))
        .args(pkcs11)
        .env("SOFTHSM2_CONF", &other_conf)
        .env("SECRETFS_PKCS11_PIN", PIN);
    run_cmd(init, None).ok();
    let err = run_fails(
        &s.state,
        &[],
        &[("SOFTHSM2_CONF", other_conf.to_str().unwrap())],
    );
    assert!(err.contains("cannot unwrap"), "{err}");
    if let Some(before) = db_before {
        assert_eq!(
            read_all(&s.db()),
            before,
            "a refused start changed the database"
        );
    }

    s.restart_on("127.0.0.1:0");
    assert_eq!(read_everything(&s, &app), want);
}

#[test]
fn provider_flags_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let mut init = crate::common::secretfs();
    init.args(["server", "init", "--state-dir"])
        .arg(tmp.path().join("s"))
        .args(["--master-key-provider", "pkcs11"]);
    run_cmd(init, None).fails(1, "--pkcs11-module");
    assert!(!tmp.path().join("s").exists());
    let mut init = crate::common::secretfs();
    init.args(["server", "init", "--state-dir"])
        .arg(tmp.path().join("s"))
        .args(["--master-key-provider", "systemd"])
        .env_remove("CREDENTIALS_DIRECTORY");
    run_cmd(init, None).fails(1, "LoadCredentialEncrypted=");
    assert!(
        !tmp.path().join("s").exists(),
        "a failed init leaves nothing"
    );
}

/// A module that stays loaded in the process (here preloaded) answers a
/// second C_Initialize with CKR_CRYPTOKI_ALREADY_INITIALIZED: the server
/// initializes each module once, so start, rekey and restart all work.
#[test]
fn pkcs11_with_the_module_preloaded() {
    assert!(
        Path::new(SOFTHSM).exists(),
        "SoftHSM2 is not installed (scripts/test.sh installs the softhsm2 package)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let conf = softhsm_token(tmp.path(), "secretfs");
    let pin_file = tmp.path().join("pin");
    write_0600(&pin_file, format!("{PIN}\n").as_bytes());
    let conf_env = format!("SOFTHSM2_CONF={}", conf.display());
    let preload = format!("LD_PRELOAD={SOFTHSM}");
    let mut s = TestServer::start_custom(
        tmp,
        |init| {
            init.args([
                "--pkcs11-module",
                SOFTHSM,
                "--pkcs11-token",
                "secretfs",
                "--pkcs11-key",
                "master-wrap",
            ])
            .arg("--pkcs11-pin-file")
            .arg(&pin_file)
            .env("SOFTHSM2_CONF", &conf)
            .env("LD_PRELOAD", SOFTHSM);
        },
        &["env", &conf_env, &preload],
        &[],
    );
    let (app, want) = fill(&s, 3);
    s.cli(&["server", "rekey"]).ok();
    assert_eq!(wait_rekeyed(&s), 2);
    s.stop();
    s.restart_on("127.0.0.1:0");
    assert_eq!(read_everything(&s, &app), want);
}

/// The meta rows `keys`, as they are (key, value, mac).
type MetaRow = (String, Vec<u8>, Option<Vec<u8>>);

fn meta_rows(db: &Path, keys: &[&str]) -> Vec<MetaRow> {
    let conn = rusqlite::Connection::open(db).unwrap();
    keys.iter()
        .map(|k| {
            conn.query_row(
                "SELECT key, value, mac FROM meta WHERE key = ?1",
                [k],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap_or_else(|e| panic!("meta row {k}: {e}"))
        })
        .collect()
}

fn put_back(db: &Path, rows: &[MetaRow]) {
    let conn = rusqlite::Connection::open(db).unwrap();
    for (k, v, m) in rows {
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value, mac) VALUES (?1, ?2, ?3)",
            rusqlite::params![k, v, m],
        )
        .unwrap();
    }
}

/// Start-up repairs act on the provider's key files only when the store
/// proves them right: rows of a stopped rekey deleted or a key check
/// copied (edits without the key) make the start refuse with nothing
/// changed, key files intact; undone, the rekey resumes and every secret
/// reads.
#[test]
fn edited_rekey_rows_never_cost_a_key_file() {
    if crate::common::sqlite_only("edits the rekey rows in the SQLite file") {
        return;
    }
    // Batches of one with a pause: the rekey is surely mid-way when killed.
    let mut s = TestServer::start_with(&["--rekey-batch", "1", "--rekey-pause", "1s"]);
    let (app, want) = fill(&s, 6);
    s.cli(&["server", "rekey", "--no-wait"]).ok();
    s.kill9();
    let db = s.db();
    let key = std::fs::read(s.state.join("master.key")).unwrap();
    let next = std::fs::read(s.state.join("master.key.next")).unwrap();
    let rows = meta_rows(&db, &["rekey_to", "rekey_key_check", "master_key_check"]);
    let keys_intact = |when: &str| {
        assert_eq!(
            std::fs::read(s.state.join("master.key")).unwrap(),
            key,
            "{when}: master.key changed"
        );
        assert_eq!(
            std::fs::read(s.state.join("master.key.next")).unwrap(),
            next,
            "{when}: master.key.next changed or went"
        );
        let names: Vec<String> = std::fs::read_dir(&s.state)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".unused-"))
            .collect();
        assert!(names.is_empty(), "{when}: {names:?}");
    };

    // The rekey's record deleted: the next key looks like a stray.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("DELETE FROM meta WHERE key = 'rekey_to'", [])
        .unwrap();
    drop(conn);
    let err = run_fails(&s.state, &[], &[]);
    assert!(
        err.contains("row set") && err.contains("secretfs server verify"),
        "{err}"
    );
    keys_intact("rekey_to deleted");
    put_back(&db, &rows);

    // The new key's check copied over the (unsigned) key check and the
    // rekey rows deleted: looks like a finished rekey, but most versions
    // still need the old key.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "UPDATE meta SET value = (SELECT value FROM meta WHERE key = 'rekey_key_check')
           WHERE key = 'master_key_check';
         DELETE FROM meta WHERE key IN ('rekey_to', 'rekey_key_check');",
    )
    .unwrap();
    drop(conn);
    let err = run_fails(&s.state, &[], &[]);
    assert!(
        err.contains("do not open under the new key") && err.contains("secretfs server verify"),
        "{err}"
    );
    keys_intact("key check copied");
    put_back(&db, &rows);

    // Undone: the rekey resumes and completes; everything reads.
    s.restart_on("127.0.0.1:0");
    assert_eq!(wait_rekeyed(&s), 2);
    assert_eq!(read_everything(&s, &app), want);
    assert_eq!(std::fs::read(s.state.join("master.key")).unwrap(), next);
}
