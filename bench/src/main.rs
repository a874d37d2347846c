//! `secretfs-bench`: runs every benchmark against the real `secretfs` binary
//! (server, mounts, CLI) and writes BENCHMARKS.md, each figure beside a
//! baseline measured in the same run.
//!
//! - `harness`: starts the real server and mounts, CLI and gRPC helpers.
//! - `readpath`: raw system-call loops (open+read+close, readdir+stat).
//! - `echo`: the bare tonic echo service with the server's TLS setup.
//! - `rows`: one module per group of rows.
//! - `report`, `stats`: the table and the percentiles.

#![forbid(unsafe_code)]

mod echo;
mod harness;
mod readpath;
mod report;
mod rows;
mod stats;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use secretfs_pgtest::PgCluster;

use crate::harness::Env;
use crate::report::{Header, Row};

/// Runs every secretfs benchmark and writes BENCHMARKS.md.
#[derive(Parser, Debug)]
#[command(name = "secretfs-bench")]
struct Cli {
    /// Tiny sizes: checks every benchmark still works (CI); the figures
    /// mean little.
    #[arg(long)]
    quick: bool,
    /// The secretfs binary to measure (default: next to this executable).
    #[arg(long)]
    secretfs: Option<PathBuf>,
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Run only these rows (repeatable): read, caller-check, first-read,
    /// readdir, rpc, rotate, propagation, watch-fanout, mount-rss,
    /// mount-start, scale, pg-rotate, pg-rpc, replica-propagation,
    /// failover (the last four start a PostgreSQL of their own: Debian's
    /// postgresql package must be installed).
    #[arg(long)]
    only: Vec<String>,
    /// Scratch space for state directories and mountpoints (on disk, not
    /// tmpfs: the durable rows need a real fsync).
    #[arg(long, default_value = "/var/tmp")]
    work_dir: PathBuf,
    #[command(subcommand)]
    helper: Option<Helper>,
}

#[derive(Subcommand, Debug)]
enum Helper {
    /// (internal) The echo baseline server.
    #[command(hide = true)]
    EchoServer {
        #[arg(long)]
        state: PathBuf,
        #[arg(long)]
        payload: PathBuf,
        #[arg(long, default_value = "secretfs.local")]
        trust_domain: String,
    },
    /// (internal) The read loop, run in a child placed in a container's
    /// cgroup for the caller-check row.
    #[command(hide = true)]
    ReadLoop {
        #[arg(long)]
        fuse: PathBuf,
        #[arg(long)]
        tmpfs: PathBuf,
        #[arg(long)]
        iterations: u32,
        #[arg(long)]
        rounds: u32,
        #[arg(long)]
        expect: usize,
        /// Move this process into the cgroup of each `cgroup.procs` file
        /// first (the caller-check row runs the loop as a container's process).
        #[arg(long)]
        join_cgroup: Vec<PathBuf>,
    },
}

pub const ALL_ROWS: &[&str] = &[
    "read",
    "caller-check",
    "first-read",
    "readdir",
    "rpc",
    "rotate",
    "propagation",
    "watch-fanout",
    "mount-rss",
    "mount-start",
    "scale",
    "pg-rotate",
    "pg-rpc",
    "replica-propagation",
    "failover",
];

/// Sizes for a full or a quick run.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub quick: bool,
    pub read_iterations: u32,
    pub read_rounds: u32,
    pub readdir_iterations: u32,
    pub rpc_seconds: f64,
    pub rotations: usize,
    pub propagation_rotations: usize,
    pub propagation_mounts: usize,
    pub watch_streams: usize,
    pub rss_counts: [usize; 2],
    pub start_runs: usize,
    pub scale_big: (usize, usize, usize),
    pub scale_small: (usize, usize, usize),
    pub scale_calls: usize,
    /// Replicas killed under a mount, one failover sample each.
    pub failover_kills: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                quick,
                read_iterations: 2_000,
                read_rounds: 2,
                readdir_iterations: 200,
                rpc_seconds: 0.5,
                rotations: 50,
                propagation_rotations: 10,
                propagation_mounts: 3,
                watch_streams: 20,
                rss_counts: [10, 50],
                start_runs: 2,
                // (secrets, clients, groups)
                scale_big: (500, 50, 5),
                scale_small: (100, 10, 1),
                scale_calls: 30,
                failover_kills: 2,
            }
        } else {
            Sizes {
                quick,
                read_iterations: 100_000,
                read_rounds: 3,
                readdir_iterations: 5_000,
                rpc_seconds: 5.0,
                rotations: 2_000,
                propagation_rotations: 1_000,
                propagation_mounts: 100,
                watch_streams: 1_000,
                rss_counts: [100, 1_000],
                start_runs: 10,
                scale_big: (100_000, 10_000, 1_000),
                scale_small: (1_000, 100, 10),
                scale_calls: 500,
                failover_kills: 10,
            }
        }
    }
}

/// What every row gets.
pub struct Ctx {
    pub env: Env,
    pub sizes: Sizes,
    pub rt: tokio::runtime::Runtime,
    /// This executable, for helper subprocesses.
    pub me: PathBuf,
    /// The PostgreSQL of this run, started by the first row that needs it
    /// (each such row takes a database of its own), or why it could not.
    pg: OnceLock<std::result::Result<PgCluster, String>>,
}

impl Ctx {
    /// This run's PostgreSQL cluster, started on first use.
    pub fn pg(&self) -> Result<&PgCluster> {
        match self.pg.get_or_init(start_pg) {
            Ok(c) => Ok(c),
            Err(e) => anyhow::bail!("{e}"),
        }
    }
}

fn start_pg() -> std::result::Result<PgCluster, String> {
    const HOW: &str = "the PostgreSQL rows need Debian's postgresql package \
                       (`apt-get install postgresql`, as scripts/test.sh does)";
    if !std::path::Path::new("/usr/lib/postgresql").is_dir() {
        return Err(format!(
            "PostgreSQL is not installed (no /usr/lib/postgresql): {HOW}"
        ));
    }
    // pgtest panics with what is missing; the bench reports it as this
    // row's error instead.
    std::panic::catch_unwind(|| PgCluster::start(Default::default())).map_err(|p| {
        let why = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("PostgreSQL could not start ({why}): {HOW}")
    })
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn raise_nofile() {
    // 1,000 watchers and 100 mounts need more descriptors than the usual
    // soft limit; children inherit it.
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    // rustix says `None` for RLIM_INFINITY.
    let lim = getrlimit(Resource::Nofile);
    let want = lim.maximum.unwrap_or(u64::MAX).min(65_536);
    if lim.current.unwrap_or(u64::MAX) < want {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(want),
                maximum: lim.maximum,
            },
        );
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.helper {
        Some(Helper::EchoServer {
            state,
            payload,
            trust_domain,
        }) => return echo::run(&state, &payload, &trust_domain),
        Some(Helper::ReadLoop {
            fuse,
            tmpfs,
            iterations,
            rounds,
            expect,
            join_cgroup,
        }) => {
            // Writing 0 to cgroup.procs moves the writer; a hierarchy
            // that refuses leaves the loop where it is, as before.
            for procs in &join_cgroup {
                let _ = std::fs::write(procs, b"0");
            }
            return rows::read::read_loop_child(&fuse, &tmpfs, iterations, rounds, expect);
        }
        None => {}
    }
    for o in &cli.only {
        anyhow::ensure!(
            ALL_ROWS.contains(&o.as_str()),
            "unknown row {o:?}; rows: {}",
            ALL_ROWS.join(", ")
        );
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    raise_nofile();
    let me = std::env::current_exe()?;
    let bin = match cli.secretfs {
        Some(p) => p,
        None => me.with_file_name("secretfs"),
    };
    anyhow::ensure!(
        bin.exists(),
        "no secretfs binary at {}: build it (`cargo build --release -p secretfs`) or pass --secretfs PATH",
        bin.display()
    );
    let scratch = tempfile::Builder::new()
        .prefix("secretfs-bench-")
        .tempdir_in(&cli.work_dir)
        .with_context(|| format!("scratch dir in {}", cli.work_dir.display()))?;
    let sizes = Sizes::new(cli.quick);
    let ctx = Ctx {
        env: Env {
            bin: bin.clone(),
            work: scratch.path().to_owned(),
        },
        sizes,
        rt: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
        me,
        pg: OnceLock::new(),
    };
    let started = sh("date -u +%Y-%m-%dT%H:%M:%SZ");
    let load_before = sh("uptime");
    let t0 = Instant::now();
    let want = |id: &str| cli.only.is_empty() || cli.only.iter().any(|o| o == id);
    let mut rows: Vec<Row> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    for id in ALL_ROWS {
        if !want(id) {
            continue;
        }
        eprintln!("[secretfs-bench] {id} ...");
        let t = Instant::now();
        let produced = rows::run(id, &ctx).unwrap_or_else(|e| {
            failed.push(format!("{id}: {e:#}"));
            vec![Row::new(id, *id, "—").not_run(format!("error: {e:#}"))]
        });
        for r in &produced {
            eprintln!(
                "[secretfs-bench]   {}: {} | baseline {} | {} | floor {} ({:.1} s)",
                r.what,
                r.secretfs,
                r.baseline,
                r.ratio,
                r.floor,
                t.elapsed().as_secs_f64()
            );
        }
        rows.extend(produced);
    }
    let mut command = String::from(
        "cargo build --release -p secretfs -p secretfs-bench\ntarget/release/secretfs-bench",
    );
    if cli.quick {
        command.push_str(" --quick");
    }
    let header = Header {
        mode: if cli.quick {
            "--quick (tiny sizes: checks that every benchmark works; figures are not meaningful)"
        } else {
            "full"
        },
        started,
        load_before,
        load_after: sh("uptime"),
        machine: format!(
            "{} CPUs, {}, kernel {}",
            sh("nproc"),
            sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
            sh("uname -r")
        ),
        commit: {
            format!(
                "{}{} (binary {})",
                sh("git rev-parse --short HEAD 2>/dev/null"),
                if sh("git status --porcelain 2>/dev/null | grep -v '^??' | head -1").is_empty() {
                    ""
                } else {
                    " + uncommitted changes"
                },
                bin.display()
            )
        },
        command,
        seconds: t0.elapsed().as_secs_f64(),
    };
    // The notes as they are in the source tree now (they are edited after
    // a run), else as they were at build time.
    let notes = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/NOTES.md"))
        .unwrap_or_else(|_| include_str!("../NOTES.md").to_owned());
    let text = report::render(&header, &rows, &notes);
    std::fs::write(&cli.out, text).with_context(|| format!("write {}", cli.out.display()))?;
    eprintln!("[secretfs-bench] wrote {}", cli.out.display());
    // A benchmark that broke fails the run (CI runs --quick for this); a
    // missed floor does not: it is a finding, written in the report.
    anyhow::ensure!(
        failed.is_empty(),
        "{} benchmark(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    Ok(())
}
