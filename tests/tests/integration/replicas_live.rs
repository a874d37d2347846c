//! Replicas at work: two and three `server run` on one PostgreSQL database
//! (each on its own state directory, joined with `server init --join`),
//! with real mounts and the real CLI, while things go wrong under them: a
//! replica killed, its listener connection killed, PostgreSQL restarted,
//! writers racing through two replicas. Always on PostgreSQL, so they run
//! in the suite's postgres pass only ([`postgres_pass_only`]). Tests that
//! do not stop PostgreSQL share the tests' cluster; the one that does
//! starts its own.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use secretfs_proto::v1;

use crate::common::*;

/// Why these tests skip the sqlite pass.
const WHY: &str = "replicas need PostgreSQL, whatever SECRETFS_TEST_STORE says";

/// The listener connection's application_name (server/src/store/postgres/listen.rs).
const LISTEN_APP: &str = "secretfs-listen";

/// `server init --database URL` in `tmp/NAME` with `extra` flags; must work.
fn init(tmp: &Path, name: &str, url: &str, extra: &[&str]) -> PathBuf {
    let state = tmp.join(name);
    init_on(&state, Some(url), |c| {
        c.args(extra);
    })
    .ok();
    state
}

/// `n` replicas on the (empty) database `url`: the first an ordinary init,
/// each further one `init --join` from a copy of the first's state
/// directory, as the README's operator does it.
fn replicas(url: &str, n: usize) -> Vec<TestServer> {
    let tmp = tempfile::tempdir().unwrap();
    let state = init(tmp.path(), "r0", url, &[]);
    let first = TestServer::run_state(tmp, state, Some(url.to_owned()), &[], &[]);
    let mut all = vec![first];
    for i in 1..n {
        let tmp = tempfile::tempdir().unwrap();
        let copy = tmp.path().join("copy-of-r0");
        copy_dir(&all[0].state, &copy);
        let state = init(
            tmp.path(),
            &format!("r{i}"),
            url,
            &["--join", copy.to_str().unwrap(), "--san", "127.0.0.1"],
        );
        std::fs::remove_dir_all(&copy).unwrap();
        all.push(TestServer::run_state(
            tmp,
            state,
            Some(url.to_owned()),
            &[],
            &[],
        ));
    }
    all
}

/// Two or three replicas on a fresh database of the shared cluster, with
/// `db/password` = `first` readable by client `app`.
fn replicas_for_app(n: usize, first: &str) -> (Vec<TestServer>, Identity) {
    let rs = replicas(&fresh_database(), n);
    rs[0].add_secret("db/password", first.as_bytes());
    let app = rs[0].add_client("app");
    rs[0].grant("app", &["app"], &["db/password"]);
    (rs, app)
}

/// `secret rotate NAME` through `via` with `content` on stdin.
fn rotate(via: &TestServer, name: &str, content: &[u8]) -> Run {
    via.cli_as(
        &via.admin.clone(),
        &["secret", "rotate", name],
        Some(content),
    )
}

/// `secret versions NAME -o json` through `via`: (version, size) pairs.
fn versions(via: &TestServer, name: &str) -> Vec<(u64, u64)> {
    via.cli(&["secret", "versions", name, "-o", "json"])
        .ok()
        .json()
        .as_array()
        .expect("versions -o json is an array")
        .iter()
        .map(|v| (v["version"].as_u64().unwrap(), v["size"].as_u64().unwrap()))
        .collect()
}

/// Content of exactly `size` bytes, starting with `tag`: rotations told
/// apart by their size in `secret versions`.
fn sized(tag: &str, size: usize) -> Vec<u8> {
    let mut v = tag.as_bytes().to_vec();
    assert!(v.len() <= size);
    v.resize(size, b'.');
    v
}

/// A mount on `via` (its address only unless `args` says otherwise) that
/// relies on pushed changes: no periodic resync to hide a missed one.
fn mount(via: &TestServer, app: &Identity, args: &[&str]) -> Mount {
    let mut all = vec!["--refresh", "1h"];
    all.extend_from_slice(args);
    via.mount_as(app, &all)
}

/// (1) A rotation made through one replica reaches mounts on the others;
/// and from another one back.
#[test]
fn a_rotation_through_one_replica_reaches_mounts_on_the_others() {
    if postgres_pass_only(WHY) {
        return;
    }
    let (rs, app) = replicas_for_app(3, "pw-1");
    let (on_b, on_c) = (mount(&rs[1], &app, &[]), mount(&rs[2], &app, &[]));
    wait_for(&on_b, "db/password", b"pw-1");
    wait_for(&on_c, "db/password", b"pw-1");

    let two = marker("through-a");
    rotate(&rs[0], "db/password", two.as_bytes()).ok();
    wait_for(&on_b, "db/password", two.as_bytes());
    wait_for(&on_c, "db/password", two.as_bytes());

    let three = marker("through-c");
    rotate(&rs[2], "db/password", three.as_bytes()).ok();
    wait_for(&on_b, "db/password", three.as_bytes());
    wait_for(&on_c, "db/password", three.as_bytes());
    // A secret added through B appears in the mount on C once granted.
    rs[1].add_secret("api/token", b"tok-1");
    rs[1].grant("app", &[], &["api/token"]);
    wait_for(&on_c, "api/token", b"tok-1");
}

/// (2) A client removed through A is refused through B at once: its next
/// CLI call, its Watch on B, its mount on B.
#[test]
fn a_client_removed_on_one_replica_is_refused_on_the_other_at_once() {
    if postgres_pass_only(WHY) {
        return;
    }
    let (rs, app) = replicas_for_app(2, "pw-1");
    let (a, b) = (&rs[0], &rs[1]);
    // B has authenticated (and cached) the client before the removal.
    let r = b.cli_as(&app, &["read", "db/password"], None).ok();
    assert_eq!(r.stdout, "pw-1");
    let on_b = mount(b, &app, &[]);
    wait_for(&on_b, "db/password", b"pw-1");

    let runtime = rt();
    let mut watch = runtime.block_on(async {
        let mut c = b.secrets_client(&app).await;
        let mut w = c
            .watch(v1::WatchRequest::default())
            .await
            .unwrap()
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), w.message())
            .await
            .expect("a first watch event within 10 s")
            .unwrap()
            .expect("a first watch event");
        assert!(first.initial);
        w
    });

    a.cli(&["client", "remove", "app"]).ok();
    // At once: as soon as the removal's notification reaches B (a
    // millisecond or so; nothing polls). A process started right after
    // the removal can, on a loaded machine, connect before that: allow
    // it a bounded moment rather than a race, and never a read that
    // succeeds after the refusal began.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = b.cli_as(&app, &["read", "db/password"], None);
        if r.code != 0 {
            r.fails(1, "removed");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B still serves a client removed on A 5 s later"
        );
    }
    b.cli_as(&app, &["read", "db/password"], None)
        .fails(1, "removed");
    b.cli_as(&app, &["whoami"], None).fails(1, "removed");

    let end = runtime.block_on(async {
        loop {
            match tokio::time::timeout(LONG, watch.message()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => break tonic::Status::cancelled("stream ended without a status"),
                Ok(Err(status)) => break status,
                Err(_) => panic!("the watch on B did not end within 30 s"),
            }
        }
    });
    assert_eq!(end.code(), tonic::Code::PermissionDenied, "{end:?}");
    assert!(end.message().contains("was removed"), "{end:?}");

    assert!(
        eventually(LONG, || !on_b.file("db/password").exists()),
        "the mount on B keeps the removed client's secret:\n{}",
        on_b.log()
    );
    let st = on_b.status();
    assert_eq!(st["connected"], false, "{st}");
    assert!(
        st["note"].as_str().unwrap_or_default().contains("refused"),
        "{st}"
    );
}

/// (3) The replica a `--server A,B` mount is on is killed (-9): the mount
/// keeps serving, moves to B, and a rotation made through B meanwhile
/// reaches it.
#[test]
fn a_mount_whose_replica_is_killed_moves_to_the_other_and_follows_it() {
    if postgres_pass_only(WHY) {
        return;
    }
    let (mut rs, app) = replicas_for_app(2, "pw-1");
    let list = format!("{},{}", rs[0].url(), rs[1].url());
    let m = mount(&rs[0], &app, &["--server", &list]);
    wait_for(&m, "db/password", b"pw-1");
    assert_eq!(m.status()["server_in_use"], rs[0].url().as_str());

    let reader = Reader::start(m.file("db/password"), None);
    rs[0].kill9();
    let two = marker("through-b");
    rotate(&rs[1], "db/password", two.as_bytes()).ok();
    wait_for(&m, "db/password", two.as_bytes());
    reader.finish(&m);
    let status = m.status();
    assert_eq!(status["server_in_use"], rs[1].url().as_str(), "{status}");
    assert_eq!(status["connected"], true, "{status}");
    assert!(m.log().contains("moved to another server"), "{}", m.log());
    // And it keeps following B.
    let three = marker("still-b");
    rotate(&rs[1], "db/password", three.as_bytes()).ok();
    wait_for(&m, "db/password", three.as_bytes());
}

/// The local ports of `pid`'s TCP connections to `port` on loopback (from
/// its socket inodes and /proc/net/tcp): the client_port PostgreSQL shows.
fn client_ports(pid: u32, port: u16) -> Vec<i32> {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy().into_owned();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                inodes.insert(inode.to_owned());
            }
        }
    }
    let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
    let remote = format!(":{port:04X}");
    tcp.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (local, rem, inode) = (cols.get(1)?, cols.get(2)?, cols.get(9)?);
            (rem.ends_with(&remote) && inodes.contains(*inode))
                .then(|| i32::from_str_radix(local.rsplit(':').next()?, 16).ok())
                .flatten()
        })
        .collect()
}

/// The listener sessions of the server `pid` on the shared cluster.
fn listeners_of(pid: u32) -> Vec<i32> {
    let cluster = secretfs_pgtest::PgCluster::shared();
    let ports = client_ports(pid, cluster.port());
    cluster
        .superuser()
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 \
             AND client_port = ANY($2)",
            &[&LISTEN_APP, &ports],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Whether PostgreSQL session `pid` has ended.
fn session_gone(pid: i32) -> bool {
    let row = secretfs_pgtest::PgCluster::shared()
        .superuser()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .unwrap();
    row.get::<_, i64>(0) == 0
}

/// Terminates the listener session(s) of server `pid`; how many.
fn kill_listener_of(pid: u32) -> usize {
    let sessions = listeners_of(pid);
    let mut c = secretfs_pgtest::PgCluster::shared().superuser();
    for s in &sessions {
        c.execute("SELECT pg_terminate_backend($1)", &[s]).unwrap();
    }
    sessions.len()
}

/// (4) B's listener connection is killed (pg_terminate_backend), twice,
/// while rotations go through A: B's mount ends on the last one once the
/// listener is back, and follows rotations after.
#[test]
fn a_replica_whose_listener_is_killed_catches_up_with_every_rotation() {
    if postgres_pass_only(WHY) {
        return;
    }
    let (rs, app) = replicas_for_app(2, "pw-1");
    let (a, b) = (&rs[0], &rs[1]);
    let on_b = mount(b, &app, &[]);
    wait_for(&on_b, "db/password", b"pw-1");
    let b_pid = b.pid();
    assert!(
        eventually(LONG, || listeners_of(b_pid).len() == 1),
        "B's listener session is found by its client port: {:?}",
        listeners_of(b_pid)
    );
    assert!(
        listeners_of(a.pid()).len() == 1,
        "A's is another session: {:?} {:?}",
        listeners_of(a.pid()),
        listeners_of(b_pid)
    );

    const ROTATIONS: usize = 40;
    let done = AtomicUsize::new(0);
    let last = std::thread::scope(|scope| {
        let rotator = scope.spawn(|| {
            let mut last = Vec::new();
            for i in 0..ROTATIONS {
                let content = format!("v-{i}-{}", marker("r")).into_bytes();
                rotate(a, "db/password", &content).ok();
                last = content;
                done.fetch_add(1, Ordering::SeqCst);
            }
            last
        });
        for after in [5, 20] {
            assert!(eventually(LONG, || done.load(Ordering::SeqCst) >= after));
            assert!(
                eventually(LONG, || listeners_of(b_pid).len() == 1),
                "B's listener is back before the next kill:\n{}",
                b.log()
            );
            assert_eq!(kill_listener_of(b_pid), 1, "one listener session killed");
        }
        rotator.join().unwrap()
    });
    wait_for(&on_b, "db/password", &last);

    // Catch-up proper: a rotation committed while B has no listener at all
    // (the killed session gone, the new one not yet connected) reaches B's
    // mount only by the catch-up after the reconnection. It goes over gRPC
    // from here (milliseconds: inside the listener's reconnect backoff); a
    // round whose reconnection came first is tried again.
    let runtime = rt();
    let mut admin = runtime.block_on(a.admin_client());
    let mut in_gap = None;
    for round in 0..20 {
        assert!(
            eventually(LONG, || listeners_of(b_pid).len() == 1),
            "B's listener is back:\n{}",
            b.log()
        );
        let old = listeners_of(b_pid)[0];
        assert_eq!(kill_listener_of(b_pid), 1, "one listener session killed");
        assert!(
            eventually(LONG, || session_gone(old)),
            "the killed session ends"
        );
        let content = marker(&format!("in-the-gap-{round}"));
        runtime
            .block_on(admin.rotate_secret(v1::RotateSecretRequest {
                name: "db/password".into(),
                content: content.clone().into_bytes(),
                ..Default::default()
            }))
            .unwrap();
        if listeners_of(b_pid).is_empty() {
            in_gap = Some(content);
            break;
        }
        eprintln!("round {round}: B's listener was back before the rotation committed; again");
    }
    let in_gap = in_gap.expect("no rotation committed while B's listener was away in 20 rounds");
    wait_for(&on_b, "db/password", in_gap.as_bytes());
    assert!(
        eventually(LONG, || listeners_of(b_pid).len() == 1),
        "B's listener reconnected:\n{}",
        b.log()
    );
    // Pushed again once it is back.
    let after = marker("after");
    rotate(a, "db/password", after.as_bytes()).ok();
    wait_for(&on_b, "db/password", after.as_bytes());
}

/// (5) PostgreSQL restarted under two replicas with mounts: the mounts
/// serve throughout, writes fail with a clear "unavailable" while it is
/// down, and after it is back writes work through both replicas (not
/// restarted) and reach the mounts on both.
#[test]
fn postgres_restarted_under_two_replicas_and_everything_recovers() {
    if postgres_pass_only(WHY) {
        return;
    }
    let cluster = secretfs_pgtest::PgCluster::start(Default::default());
    let rs = replicas(
        &secretfs_pgtest::url_without_password(&cluster.database()),
        2,
    );
    let (a, b) = (&rs[0], &rs[1]);
    a.add_secret("db/password", b"pw-1");
    let app = a.add_client("app");
    a.grant("app", &["app"], &["db/password"]);
    let (on_a, on_b) = (mount(a, &app, &[]), mount(b, &app, &[]));
    wait_for(&on_a, "db/password", b"pw-1");
    wait_for(&on_b, "db/password", b"pw-1");
    let (read_a, read_b) = (
        Reader::start(on_a.file("db/password"), None),
        Reader::start(on_b.file("db/password"), None),
    );

    cluster.stop();
    for via in [a, b] {
        let r = rotate(via, "db/password", b"during-outage");
        eprintln!("rotate while PostgreSQL is down: {}", r.stderr.trim_end());
        assert_ne!(r.code, 0, "a write with PostgreSQL down must fail");
        assert!(
            r.stderr.contains("the database is unavailable"),
            "says the database is unavailable: {}",
            r.stderr
        );
        // The server answered: no advice to check that it runs.
        assert!(!r.stderr.contains("server run` up"), "{}", r.stderr);
        assert!(
            !r.stderr.contains(secretfs_pgtest::PASSWORD),
            "{}",
            r.stderr
        );
    }
    // The mounts still serve what they hold.
    for m in [&on_a, &on_b] {
        assert_eq!(std::fs::read(m.file("db/password")).unwrap(), b"pw-1");
    }
    cluster.start_again();

    // Recovery by itself: the first writes may still meet a dead
    // connection; within a bounded wait they go through on both replicas.
    let mut acked = 0;
    for (i, via) in [a, b].into_iter().enumerate() {
        let content = marker(&format!("after-{i}"));
        let mut failures = Vec::new();
        let went = eventually(LONG, || {
            let r = rotate(via, "db/password", content.as_bytes());
            if r.code != 0 {
                failures.push(r.stderr);
            }
            r.code == 0
        });
        assert!(
            went,
            "writes never recovered through {}: {failures:?}",
            via.url()
        );
        if !failures.is_empty() {
            eprintln!(
                "{} writes failed after the restart: {failures:?}",
                failures.len()
            );
        }
        acked += 1;
        wait_for(&on_a, "db/password", content.as_bytes());
        wait_for(&on_b, "db/password", content.as_bytes());
    }
    read_a.finish(&on_a);
    read_b.finish(&on_b);
    // Nothing half-done: the refused writes left no version.
    assert_eq!(versions(b, "db/password").len(), 1 + acked);
    assert!(!a.log().contains(secretfs_pgtest::PASSWORD));
    assert!(!b.log().contains(secretfs_pgtest::PASSWORD));
}

/// (6) One secret rotated by two CLI loops at once, one through each
/// replica: every acknowledged rotation is a version of its own.
#[test]
fn concurrent_rotations_through_two_replicas_each_get_a_version() {
    if postgres_pass_only(WHY) {
        return;
    }
    let rs = replicas(&fresh_database(), 2);
    rs[0].add_secret("s", b"0");
    const EACH: usize = 25;
    let acked: Vec<Vec<usize>> = std::thread::scope(|scope| {
        let loops: Vec<_> = rs
            .iter()
            .enumerate()
            .map(|(r, via)| {
                scope.spawn(move || {
                    let mut sizes = Vec::new();
                    for i in 0..EACH {
                        let size = 1000 * (r + 1) + i;
                        let run = rotate(via, "s", &sized(&format!("r{r}-{i}"), size));
                        if run.code == 0 {
                            sizes.push(size);
                        } else {
                            eprintln!("rotation {i} through replica {r} refused: {}", run.stderr);
                        }
                    }
                    sizes
                })
            })
            .collect();
        loops.into_iter().map(|l| l.join().unwrap()).collect()
    });
    let acked: Vec<usize> = acked.concat();
    assert!(
        acked.len() >= EACH,
        "most rotations went through: {acked:?}"
    );
    let listed = versions(&rs[1], "s");
    assert_eq!(
        listed.len(),
        1 + acked.len(),
        "one version per acknowledged rotation (plus the first): {listed:?}"
    );
    let numbers: std::collections::BTreeSet<u64> = listed.iter().map(|v| v.0).collect();
    assert_eq!(numbers.len(), listed.len(), "distinct versions: {listed:?}");
    let sizes: std::collections::BTreeSet<u64> = listed.iter().map(|v| v.1).collect();
    for size in &acked {
        assert!(
            sizes.contains(&(*size as u64)),
            "rotation of size {size} lost: {listed:?}"
        );
    }
    // Both replicas list the same.
    assert_eq!(versions(&rs[0], "s"), listed);
}

/// A number in `range` from /dev/urandom.
fn random_in(range: std::ops::Range<usize>) -> usize {
    let b = random_bytes(8);
    range.start + (u64::from_le_bytes(b.try_into().unwrap()) as usize) % (range.end - range.start)
}

/// (7) 200 rotations through A, A killed (-9) at a random point among them,
/// the rest through B: every acknowledged rotation is in the database, and
/// the last one reaches every mount (on A's and on B's address, each with
/// both addresses).
#[test]
fn every_acknowledged_rotation_survives_a_replica_killed_mid_stream() {
    if postgres_pass_only(WHY) {
        return;
    }
    let (mut rs, app) = replicas_for_app(2, "pw-1");
    let (url_a, url_b) = (rs[0].url(), rs[1].url());
    let on_a = mount(&rs[0], &app, &["--server", &format!("{url_a},{url_b}")]);
    let on_b = mount(&rs[1], &app, &["--server", &format!("{url_b},{url_a}")]);
    let only_b = mount(&rs[1], &app, &[]);
    for m in [&on_a, &on_b, &only_b] {
        wait_for(m, "db/password", b"pw-1");
    }

    const TOTAL: usize = 200;
    let kill_after = random_in(20..180);
    let a_pid = rs[0].pid();
    let progress = AtomicUsize::new(0);
    let (acked, in_flight_at_kill) = std::thread::scope(|scope| {
        let progress = &progress;
        scope.spawn(move || {
            let start = std::time::Instant::now();
            while progress.load(Ordering::SeqCst) < kill_after {
                std::thread::sleep(Duration::from_millis(1));
            }
            // At a random moment of the next rotation (its CLI starting,
            // connecting, the server committing, the reply on its way).
            let one = start.elapsed().as_millis() as usize / kill_after;
            std::thread::sleep(Duration::from_millis(random_in(0..one.max(1)) as u64));
            let pid = rustix::process::Pid::from_raw(a_pid as i32).unwrap();
            // Not yet reaped by TestServer: the pid is still A's.
            rustix::process::kill_process(pid, Signal::KILL).unwrap();
        });
        let (a, b) = (&rs[0], &rs[1]);
        let mut acked = Vec::new();
        let mut failed_on_a = None;
        for i in 0..TOTAL {
            let content = sized(&format!("rotation-{i}-"), 1000 + i);
            let via = if failed_on_a.is_none() { a } else { b };
            let r = rotate(via, "db/password", &content);
            if r.code == 0 {
                acked.push((i, content));
            } else if failed_on_a.is_none() {
                eprintln!(
                    "rotation {i} through A failed (A killed): {}",
                    r.stderr.trim_end()
                );
                failed_on_a = Some(i);
            } else {
                panic!("rotation {i} through B failed: {}", r.stderr);
            }
            progress.fetch_add(1, Ordering::SeqCst);
        }
        (acked, failed_on_a)
    });
    rs[0].kill9();
    let failed_at = in_flight_at_kill.expect("a rotation through A failed once A was killed");
    eprintln!(
        "A killed after {kill_after} rotations; rotation {failed_at} was the first refused; {} acknowledged",
        acked.len()
    );
    assert_eq!(
        acked.len(),
        TOTAL - 1,
        "one rotation only fails: the one A could not take"
    );

    let listed = versions(&rs[1], "db/password");
    let sizes: std::collections::BTreeSet<u64> = listed.iter().map(|v| v.1).collect();
    for (i, content) in &acked {
        assert!(
            sizes.contains(&(content.len() as u64)),
            "acknowledged rotation {i} is missing: {listed:?}"
        );
    }
    // The first version, every acknowledged one, and perhaps the one in
    // flight at the kill (committed, its reply lost).
    let extra = listed.len() - 1 - acked.len();
    assert!(
        extra <= 1,
        "{extra} versions nobody acknowledged: {listed:?}"
    );
    eprintln!(
        "the rotation in flight at the kill was committed: {}",
        extra == 1
    );
    let numbers: std::collections::BTreeSet<u64> = listed.iter().map(|v| v.0).collect();
    assert_eq!(numbers.len(), listed.len(), "distinct versions: {listed:?}");

    let last = &acked.last().unwrap().1;
    for m in [&on_a, &on_b, &only_b] {
        wait_for(m, "db/password", last);
    }
    assert_eq!(on_a.status()["server_in_use"], url_b.as_str());
}
