//! The mount process: its memory holding many secrets, and how soon after
//! it starts the first file can be read.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::harness::{filler, rss_detail_kib, rss_kib, secrets, Mount, Server};
use crate::readpath::{c_path, read_once};
use crate::report::{Row, Verdict};
use crate::stats::{mib, ms, ratio, Samples};
use crate::Ctx;

fn read_tree(root: &std::path::Path) -> Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(root)? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            n += read_tree(&p)?;
        } else {
            std::fs::read(&p)?;
            n += 1;
        }
    }
    Ok(n)
}

pub fn mount_rss(ctx: &Ctx) -> Result<Vec<Row>> {
    let server = Server::start(&ctx.env)?;
    // The reference: the same mount holding a single secret.
    let one = server.add_client("rss-1")?;
    ctx.rt.block_on(server.grant_new_secrets(
        "rss-1",
        &["rss-1"],
        &[("one/s".to_owned(), filler(1024, 0))],
    ))?;
    let m = Mount::start(&server, &one, &[])?;
    read_tree(&m.path)?;
    std::thread::sleep(Duration::from_millis(300));
    let base = rss_kib(m.pid()).unwrap_or(0);
    let (base_anon, _, _) = rss_detail_kib(m.pid());
    drop(m);
    let mut rows = Vec::new();
    for (count, floor_mib) in ctx.sizes.rss_counts.into_iter().zip([8u64, 12]) {
        let name = format!("rss-{count}");
        let mut row = Row::new(
            "mount-rss",
            format!("mount RSS holding {count} secrets of 1 KiB"),
            format!("≤ {floor_mib} MiB"),
        );
        let who = server.add_client(&name)?;
        ctx.rt.block_on(server.grant_new_secrets(
            &name,
            &[&name],
            &secrets(&format!("r{count}"), count, 1024),
        ))?;
        let m = Mount::start(&server, &who, &[])?;
        let files = read_tree(&m.path.join(format!("r{count}")))?;
        if files != count {
            bail!("the mount shows {files} files, expected {count}");
        }
        std::thread::sleep(Duration::from_millis(300));
        let rss = rss_kib(m.pid()).unwrap_or(0);
        let (anon, pss, locked) = rss_detail_kib(m.pid());
        row.secretfs = format!(
            "VmRSS {} (anonymous {}, of it mlocked {}; PSS {})",
            mib(rss),
            mib(anon),
            mib(locked),
            mib(pss)
        );
        row.baseline = format!(
            "same mount holding 1 secret: VmRSS {} (anonymous {})",
            mib(base),
            mib(base_anon)
        );
        row.ratio = ratio(rss as f64, base as f64);
        row.verdict = Verdict::check(rss <= floor_mib * 1024);
        row.note = format!(
            "VmRSS of the `secretfs mount` process after its first sync and one read of every file; \
             {:.1} KiB of VmRSS and {:.1} KiB of anonymous memory per extra secret over the 1-secret mount. \
             PSS splits the binary's shared pages among the processes running it (the server runs the same binary here).",
            (rss as f64 - base as f64) / (count as f64 - 1.0),
            (anon as f64 - base_anon as f64) / (count as f64 - 1.0)
        );
        rows.push(row);
    }
    Ok(rows)
}

pub fn mount_start(ctx: &Ctx) -> Result<Vec<Row>> {
    let mut row = Row::new(
        "mount-start",
        "mount start to first readable file, server reachable",
        "≤ 100 ms",
    );
    let server = Server::start(&ctx.env)?;
    let who = server.add_client("starter")?;
    let content = filler(64, 3);
    ctx.rt.block_on(server.grant_new_secrets(
        "starter",
        &["starter"],
        &[("start/s".to_owned(), content.clone())],
    ))?;
    let mut starts = Samples::default();
    let mut buf = vec![0u8; 256];
    for _ in 0..ctx.sizes.start_runs {
        let t0 = Instant::now();
        let mut m = Mount::spawn(&server, &who, &[])?;
        let file = c_path(&m.path.join("start/s"));
        loop {
            if read_once(&file, &mut buf).is_some_and(|n| buf[..n] == content[..]) {
                starts.push(t0.elapsed());
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the mount did not show its file in 30 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        m.stop();
    }
    // Reference: a CLI process that starts, connects with mTLS and makes one call.
    let mut whoami = Samples::default();
    for _ in 0..ctx.sizes.start_runs {
        let t0 = Instant::now();
        let ok = Command::new(&ctx.env.bin)
            .env("SECRETFS_SERVER", server.url())
            .env("SECRETFS_CA", server.state.join("ca.pem"))
            .env("SECRETFS_CERT", &who.cert)
            .env("SECRETFS_KEY", &who.key)
            .arg("whoami")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success();
        anyhow::ensure!(ok, "secretfs whoami failed");
        whoami.push(t0.elapsed());
    }
    let p50 = starts.pct_ms(50.0);
    row.secretfs = format!("p50 {} / max {} ms", ms(p50), ms(starts.max_ms()));
    row.baseline = format!(
        "`secretfs whoami` (start, mTLS connect, 1 call) p50 {} ms",
        ms(whoami.pct_ms(50.0))
    );
    row.ratio = ratio(p50, whoami.pct_ms(50.0));
    row.verdict = Verdict::check(starts.max_ms() <= 100.0);
    row.note = format!(
        "{} runs: from spawning `secretfs mount` to the first open+read of the file returning its bytes \
         (polled every 200 µs); the floor is checked against the slowest run.",
        ctx.sizes.start_runs
    );
    Ok(vec![row])
}
