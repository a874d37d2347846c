//! The read path through a real mount of a real server's client: cached
//! open+read+close of a 4 KiB secret, the same with the caller check on,
//! and readdir+stat of a 100-secret folder; each against tmpfs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::harness::{filler, secrets, Identity, Mount, Server};
use crate::readpath::{best_alternating, list_and_stat, open_read_close};
use crate::report::{Row, Verdict};
use crate::stats::ratio;
use crate::Ctx;

const READ_SIZE: usize = 4096;
const FOLDER: usize = 100;

/// A server with one client `reader` holding `bench/read` (4 KiB) and
/// `dir/s00000..s00099`.
fn setup(ctx: &Ctx) -> Result<(Server, Identity)> {
    let server = Server::start(&ctx.env)?;
    let reader = server.add_client("reader")?;
    let mut all = vec![("bench/read".to_owned(), filler(READ_SIZE, 1))];
    all.extend(secrets("dir", FOLDER, 64));
    ctx.rt
        .block_on(server.grant_new_secrets("readers", &["reader"], &all))?;
    Ok((server, reader))
}

/// The same 4 KiB on tmpfs.
fn tmpfs_copy() -> Result<(tempfile::TempDir, PathBuf)> {
    let shm = tempfile::tempdir_in("/dev/shm")?;
    let file = shm.path().join("read");
    std::fs::write(&file, filler(READ_SIZE, 1))?;
    Ok((shm, file))
}

pub fn cached_read(ctx: &Ctx) -> Result<Vec<Row>> {
    let s = ctx.sizes;
    let mut row = Row::new(
        "read",
        "cached read of a 4 KiB secret (open+read+close loop, one process)",
        "≤ 1.5× tmpfs",
    );
    let (server, reader) = setup(ctx)?;
    let mount = Mount::start(&server, &reader, &[])?;
    let (_shm, shm_file) = tmpfs_copy()?;
    let fuse_file = mount.path.join("bench/read");
    let (f, t) = best_alternating(
        s.read_rounds,
        s.read_iterations,
        |n| open_read_close(&fuse_file, n, READ_SIZE),
        |n| open_read_close(&shm_file, n, READ_SIZE),
    )?;
    row.secretfs = format!("{f:.2} µs");
    row.baseline = format!("tmpfs {t:.2} µs");
    row.ratio = ratio(f, t);
    row.verdict = Verdict::check(f <= 1.5 * t);
    row.note = format!(
        "`secretfs mount` of client `reader` against `secretfs server run` (both the release binary); \
         best of {} alternating runs of {} iterations each, after a warm-up; open/read/close system calls.",
        s.read_rounds, s.read_iterations
    );
    Ok(vec![row])
}

/// Cgroups named after the container, as runc makes them, so the reader's
/// /proc/PID/cgroup names the container.
fn container_cgroups(id: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for ctl in ["pids", "memory", "cpu", "systemd", "unified"] {
        let root = Path::new("/sys/fs/cgroup").join(ctl);
        if !root.join("cgroup.procs").exists() {
            continue;
        }
        let dir = root.join("secretfs-bench").join(id);
        if std::fs::create_dir_all(&dir).is_ok() {
            dirs.push(dir);
        }
    }
    if dirs.is_empty() && Path::new("/sys/fs/cgroup/cgroup.procs").exists() {
        // A pure cgroup v2 host.
        let dir = Path::new("/sys/fs/cgroup/secretfs-bench").join(id);
        if std::fs::create_dir_all(&dir).is_ok() {
            dirs.push(dir);
        }
    }
    dirs
}

pub fn caller_check(ctx: &Ctx) -> Result<Vec<Row>> {
    let s = ctx.sizes;
    let mut row = Row::new(
        "caller-check",
        "the same with the caller check on (`mount --container ID`)",
        "report (one round trip per open at most)",
    );
    if !ctx.env.mount_has_flag("--container") {
        return Ok(vec![row.not_run(
            "not available yet: `secretfs mount --help` has no `--container` (re-run when the caller check lands)",
        )]);
    }
    // Every open goes to the daemon here (~150× a cached one): fewer
    // iterations give the same precision in the same time.
    let iterations = (s.read_iterations / 10).max(500);
    let (server, reader) = setup(ctx)?;
    let id = format!("secretfs-bench-{}", std::process::id());
    // The harness waits on the status file: keep it readable by the host.
    let mount = Mount::start(
        &server,
        &reader,
        &["--container".into(), id.clone(), "--public-status".into()],
    )?;
    let (_shm, shm_file) = tmpfs_copy()?;
    let cgroups = container_cgroups(&id);
    let mut cmd = Command::new(&ctx.me);
    cmd.arg("read-loop")
        .arg("--fuse")
        .arg(mount.path.join("bench/read"))
        .arg("--tmpfs")
        .arg(&shm_file)
        .args(["--iterations", &iterations.to_string()])
        .args(["--rounds", &s.read_rounds.to_string()])
        .args(["--expect", &READ_SIZE.to_string()])
        .stdin(Stdio::null());
    // The loop joins the container's cgroups itself, before it reads.
    for d in &cgroups {
        cmd.arg("--join-cgroup").arg(d.join("cgroup.procs"));
    }
    let out = cmd.output().context("run the read loop")?;
    for d in &cgroups {
        // The reader has exited, so both are empty; a parent another run
        // still uses stays.
        let _ = std::fs::remove_dir(d);
        let _ = d.parent().map(std::fs::remove_dir);
    }
    if !out.status.success() {
        return Ok(vec![row.not_run(format!(
            "the reader inside cgroup …/secretfs-bench/{id} could not read: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))]);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>());
    let (Some(Ok(f)), Some(Ok(t))) = (it.next(), it.next()) else {
        bail!("unexpected read-loop output {text:?}");
    };
    row.secretfs = format!("{f:.2} µs");
    row.baseline = format!("tmpfs {t:.2} µs");
    row.ratio = ratio(f, t);
    row.note = format!(
        "mount started with `--container {id}`; the reading process runs in cgroups \
         `secretfs-bench/{id}` (as runc names a container's), best of {} runs of {} iterations. \
         One FUSE round trip costs ~50 µs here, so ≤ ~55 µs means at most one per open.",
        s.read_rounds, iterations
    );
    Ok(vec![row])
}

/// The child side of the caller-check row: prints "FUSE_US TMPFS_US".
pub fn read_loop_child(
    fuse: &Path,
    tmpfs: &Path,
    iterations: u32,
    rounds: u32,
    expect: usize,
) -> Result<()> {
    let (f, t) = best_alternating(
        rounds,
        iterations,
        |n| open_read_close(fuse, n, expect),
        |n| open_read_close(tmpfs, n, expect),
    )?;
    println!("{f} {t}");
    Ok(())
}

pub fn readdir(ctx: &Ctx) -> Result<Vec<Row>> {
    let s = ctx.sizes;
    let mut row = Row::new(
        "readdir",
        "readdir + stat of a 100-secret folder",
        "≤ 2× tmpfs",
    );
    let (server, reader) = setup(ctx)?;
    let mount = Mount::start(&server, &reader, &[])?;
    let shm = tempfile::tempdir_in("/dev/shm")?;
    for (name, content) in secrets("dir", FOLDER, 64) {
        std::fs::write(shm.path().join(name.trim_start_matches("dir/")), content)?;
    }
    let fuse_dir = mount.path.join("dir");
    let (f, t) = best_alternating(
        s.read_rounds,
        s.readdir_iterations,
        |n| list_and_stat(&fuse_dir, n, FOLDER),
        |n| list_and_stat(shm.path(), n, FOLDER),
    )?;
    row.secretfs = format!("{f:.1} µs");
    row.baseline = format!("tmpfs {t:.1} µs");
    row.ratio = ratio(f, t);
    row.verdict = Verdict::check(f <= 2.0 * t);
    row.note = format!(
        "opendir, readdir to the end, fstatat of each of the {FOLDER} entries, closedir; best of {} runs of {} passes.",
        s.read_rounds, s.readdir_iterations
    );
    Ok(vec![row])
}
