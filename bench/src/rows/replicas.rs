//! Rows on PostgreSQL (issue 13): durable rotate throughput against raw
//! inserts into the same database, `ReadSecrets` against the SQLite store,
//! a rotation on one replica reaching mounts on the others, and a mount
//! moving to the other replica when the one it is on is killed.
//!
//! Every row takes a database of its own on this run's cluster
//! (`Ctx::pg`, pgtest: fsync and synchronous_commit on).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use secretfs_proto::v1::ReadSecretsRequest;

use crate::harness::{filler, Mount, Server};
use crate::readpath::{c_path, read_once};
use crate::report::{Row, Verdict};
use crate::rows::propagation::{self, content, measure_on, SECRET};
use crate::rows::rpc::{self, load, rotate_load, rotate_setup, PAYLOAD, ROTATE_SIZE, ROTATORS};
use crate::stats::{ms, ratio, Samples};
use crate::Ctx;

/// Raw PostgreSQL: `conns` connections, each making single-row INSERT
/// transactions (autocommit) of a sealed version's size into a table of
/// database `url`, `n` in all; inserts per second.
fn raw_postgres(url: &str, n: usize, conns: usize) -> Result<f64> {
    let mut setup = postgres::Client::connect(url, postgres::NoTls)?;
    setup.batch_execute(
        "DROP TABLE IF EXISTS bench_raw_versions; \
         CREATE TABLE bench_raw_versions (id BIGSERIAL PRIMARY KEY, secret_id BIGINT NOT NULL, \
         version BIGINT NOT NULL, wrapped_key BYTEA NOT NULL, ciphertext BYTEA NOT NULL, \
         created_at BIGINT NOT NULL, UNIQUE (secret_id, version))",
    )?;
    let mut clients = (0..conns)
        .map(|_| postgres::Client::connect(url, postgres::NoTls))
        .collect::<Result<Vec<_>, _>>()?;
    // What a sealed version holds: nonce+key+tag, nonce+content+tag.
    let wrapped = vec![7u8; 12 + 32 + 16];
    let ct = vec![9u8; 12 + ROTATE_SIZE + 16];
    let per = n / conns;
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter_mut()
            .enumerate()
            .map(|(i, c)| {
                let (wrapped, ct) = (&wrapped, &ct);
                s.spawn(move || {
                    let stmt = c.prepare(
                        "INSERT INTO bench_raw_versions (secret_id, version, wrapped_key, ciphertext, created_at) \
                         VALUES ($1, $2, $3, $4, $5)",
                    )?;
                    for j in 0..per {
                        c.execute(&stmt, &[&(i as i64), &(j as i64), wrapped, ct, &(j as i64)])?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("insert thread"))
    })?;
    let per_sec = (per * conns) as f64 / start.elapsed().as_secs_f64();
    setup.batch_execute("DROP TABLE bench_raw_versions")?;
    Ok(per_sec)
}

pub fn pg_rotate(ctx: &Ctx) -> Result<Vec<Row>> {
    let n = ctx.sizes.rotations;
    let mut row = Row::new(
        "pg-rotate",
        "rotate throughput (durable) on PostgreSQL, 1 KiB content",
        "≥ 0.5× raw",
    );
    let url = ctx.pg()?.database();
    let server = Server::start_pg(&ctx.env, &url)?;
    let names = rotate_setup(ctx, &server)?;
    let raw_before = raw_postgres(&url, n, ROTATORS)?;
    let per_sec = rotate_load(ctx, &server, &names, n)?;
    let raw_after = raw_postgres(&url, n, ROTATORS)?;
    let raw = raw_before.max(raw_after);
    // For scale, not the verdict: the baseline's shape in the SQLite row
    // (one writer, one row a transaction).
    let serial = raw_postgres(&url, n / 4, 1)?;
    row.secretfs = format!("{per_sec:.0} rotations/s");
    row.baseline = format!("raw PostgreSQL {raw:.0} inserts/s");
    row.ratio = ratio(per_sec, raw);
    row.verdict = Verdict::check(per_sec >= 0.5 * raw);
    row.note = format!(
        "{n} `Admin.RotateSecret` calls, {ROTATORS} in flight over one connection (8 secrets), one server \
         on a PostgreSQL of this run (local, loopback TCP, fsync and synchronous_commit on, data under {}); \
         baseline: {ROTATORS} connections (the same concurrency) each making single-row INSERT transactions \
         of a {}-byte version row into a table of the same database, through the `postgres` crate, \
         {n} in all, best of a run before and after. For scale (not the verdict): one connection making \
         the same transactions one after another, as the SQLite row's baseline does, {serial:.0} inserts/s \
         (rotations {:.2}× that). Every change on every replica takes the revision row's lock to COMMIT \
         (one gapless revision, commit order = revision order), so rotations are one writer's, in \
         transactions of up to 8.",
        std::env::temp_dir().display(),
        60 + 12 + ROTATE_SIZE + 16,
        per_sec / serial,
    );
    Ok(vec![row])
}

pub fn pg_read_secrets(ctx: &Ctx) -> Result<Vec<Row>> {
    let mut row = Row::new(
        "pg-rpc",
        "`Secrets.ReadSecrets` of one 4 KiB secret on PostgreSQL, 64 in flight over 8 connections",
        "report",
    );
    let url = ctx.pg()?.database();
    let pg = Server::start_pg(&ctx.env, &url)?;
    let lite = Server::start(&ctx.env)?;
    let name = "rpc/secret";
    let mut cfgs = Vec::new();
    for s in [&pg, &lite] {
        let client = s.add_client("rpc")?;
        ctx.rt.block_on(s.grant_new_secrets(
            "rpc",
            &["rpc"],
            &[(name.to_owned(), filler(PAYLOAD, 7))],
        ))?;
        // The content is what it should be on both.
        let got = ctx.rt.block_on(async {
            let mut c = s.secrets_client(&client).await?;
            let r = c
                .read_secrets(ReadSecretsRequest {
                    names: vec![name.to_owned()],
                    ..Default::default()
                })
                .await?;
            anyhow::Ok(r.into_inner())
        })?;
        anyhow::ensure!(
            got.secrets.first().map(|s| s.content.len()) == Some(PAYLOAD),
            "ReadSecrets did not return the {PAYLOAD}-byte secret"
        );
        cfgs.push(s.connect_config(&client)?);
    }
    let seconds = ctx.sizes.rpc_seconds;
    let (mut best_p, mut best_l): (Option<rpc::Load>, Option<rpc::Load>) = (None, None);
    for _ in 0..2 {
        let p = ctx.rt.block_on(load(&cfgs[0], name, seconds, false))?;
        let l = ctx.rt.block_on(load(&cfgs[1], name, seconds, false))?;
        if best_p.as_ref().is_none_or(|b| p.per_sec > b.per_sec) {
            best_p = Some(p);
        }
        if best_l.as_ref().is_none_or(|b| l.per_sec > b.per_sec) {
            best_l = Some(l);
        }
    }
    let (p, l) = (best_p.unwrap(), best_l.unwrap());
    row.secretfs = format!(
        "{:.0} req/s, p99 {} ms",
        p.per_sec,
        ms(p.latencies.pct_ms(99.0))
    );
    row.baseline = format!(
        "SQLite store {:.0} req/s, p99 {} ms",
        l.per_sec,
        ms(l.latencies.pct_ms(99.0))
    );
    row.ratio = ratio(p.per_sec, l.per_sec);
    row.note = format!(
        "one replica on a PostgreSQL of this run (loopback TCP, synchronous_commit on) against a server \
         on the SQLite store, same load (the `rpc` row's), {seconds} s per run, best of 2 alternating runs; \
         each read's audit entry is durable before its reply on both."
    );
    Ok(vec![row])
}

/// A durable commit of a small row on database `url`, p50 in ms.
fn pg_commit_ms(url: &str) -> Result<f64> {
    let mut c = postgres::Client::connect(url, postgres::NoTls)?;
    // An ordinary table: a temporary one is not WAL-logged, so its commit
    // would not wait for the disk.
    c.batch_execute(
        "DROP TABLE IF EXISTS bench_commit; \
         CREATE TABLE bench_commit (id BIGSERIAL PRIMARY KEY, v BYTEA)",
    )?;
    let stmt = c.prepare("INSERT INTO bench_commit (v) VALUES ($1)")?;
    let mut s = Samples::default();
    for i in 0..200 {
        let v = content(i);
        let t = Instant::now();
        c.execute(&stmt, &[&v])?;
        s.push(t.elapsed());
    }
    c.batch_execute("DROP TABLE bench_commit")?;
    Ok(s.pct_ms(50.0))
}

/// Replica A (`server init --database`) and replica B (`--join` A) on a
/// fresh database of this run's cluster.
fn two_replicas(ctx: &Ctx) -> Result<(String, Server, Server)> {
    let url = ctx.pg()?.database();
    let a = Server::start_pg(&ctx.env, &url)?;
    let b = Server::start_replica(&a)?;
    Ok((url, a, b))
}

pub fn propagation(ctx: &Ctx) -> Result<Vec<Row>> {
    let mode = propagation::mode(ctx);
    anyhow::ensure!(
        mode.watch,
        "this build's mount has no Watch: cross-replica propagation needs live rotation"
    );
    let n = ctx.sizes.propagation_rotations;
    let (url, a, b) = two_replicas(ctx)?;
    let who = propagation::setup_on(ctx, &a)?;
    let baseline = pg_commit_ms(&url)?;
    let mut rows = Vec::new();
    let many = ctx.sizes.propagation_mounts;
    for (mounts, on, floor, place) in [
        (1, vec![&b], 10.0, "on replica B"),
        (many, vec![&a, &b], 50.0, "split across replicas A and B"),
    ] {
        let mut row = Row::new(
            "replica-propagation",
            format!("cross-replica propagation: rotate on replica A, {mounts} mount(s) {place}"),
            format!("p99 ≤ {floor} ms"),
        );
        let p = measure_on(ctx, &a, &on, &who, mounts, n, &mode)?;
        let p99 = p.visible.pct_ms(99.0);
        row.secretfs = p.visible.summary_ms();
        row.baseline = format!("durable PostgreSQL commit {} ms (p50)", ms(baseline));
        row.ratio = format!("p99 = {:.0}× a commit", p99 / baseline);
        row.verdict = if p.lost > 0 {
            Verdict::Missed
        } else {
            Verdict::check(p99 <= floor)
        };
        row.note = format!(
            "two `secretfs server run` on one PostgreSQL database (B joined with `server init --join`); \
             {} rotations made through A × {} `secretfs mount` processes ({place}) = {} samples, each from \
             A's `RotateSecret` reply to the first open+read+close through that mount returning the new \
             bytes (B hears of it through LISTEN/NOTIFY). Lost (not seen in {:?}): {}. CPU per rotation: \
             both servers {:.2} ms, all mounts together {:.2} ms. Baseline: a single-row INSERT transaction \
             on the same database (synchronous_commit on).",
            p.rotations,
            p.mounts,
            p.visible.len(),
            propagation::GIVE_UP,
            p.lost,
            p.server_cpu_ms,
            p.mounts_cpu_ms,
        );
        rows.push(row);
    }
    Ok(rows)
}

/// The mount's `.secretfs/status`: (the server it is on, connected).
fn mount_status(m: &Mount) -> Option<(String, bool)> {
    let text = std::fs::read_to_string(m.path.join(".secretfs/status")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some((v["server"].as_str()?.to_owned(), v["connected"].as_bool()?))
}

/// Which of `servers` the mount is connected to, waiting up to `limit`.
fn connected_to(m: &Mount, servers: &[Server], limit: Duration) -> Result<usize> {
    let start = Instant::now();
    loop {
        if let Some((on, true)) = mount_status(m) {
            if let Some(i) = servers.iter().position(|s| on.contains(&s.addr)) {
                return Ok(i);
            }
        }
        anyhow::ensure!(
            start.elapsed() < limit,
            "the mount is not connected to a replica after {limit:?}: status {:?}",
            mount_status(m)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn failover(ctx: &Ctx) -> Result<Vec<Row>> {
    let kills = ctx.sizes.failover_kills;
    let mut row = Row::new(
        "failover",
        "failover: the mount's replica killed (SIGKILL) → the mount synced from the other",
        "p99 ≤ 1 s",
    );
    let (_url, a, b) = two_replicas(ctx)?;
    let who = propagation::setup_on(ctx, &a)?;
    let list = format!("{},{}", a.url(), b.url());
    // Baseline: what a mount started from nothing on that replica takes
    // to its first sync (spawn to `.secretfs/status` showing).
    let mut fresh = Samples::default();
    for _ in 0..3 {
        let t = Instant::now();
        let m = Mount::start(&b, &who, &[])?;
        fresh.push(t.elapsed());
        drop(m);
    }
    let mut servers = [a, b];
    let mount = Mount::start_to(&servers[0], &list, &who, &[])?;
    let file = c_path(&mount.path.join(SECRET));
    let limit = Duration::from_secs(30);
    let mut samples = Samples::default();
    let mut lost = 0;
    let mut buf = vec![0u8; 256];
    for k in 1..=kills {
        let on = connected_to(&mount, &servers, limit)?;
        let other = 1 - on;
        let other_addr = servers[other].addr.clone();
        let mut admin = ctx.rt.block_on(servers[other].admin_client())?;
        let want = content(1_000 + k);
        let t0 = Instant::now();
        servers[on].kill_hard();
        // A rotation made meanwhile, through the surviving replica.
        ctx.rt
            .block_on(Server::rotate(&mut admin, SECRET, want.clone()))
            .context("rotate on the surviving replica")?;
        let synced = loop {
            let moved = matches!(mount_status(&mount), Some((s, true)) if s.contains(&other_addr));
            if moved && read_once(&file, &mut buf).is_some_and(|n| buf[..n] == want[..]) {
                break Some(t0.elapsed());
            }
            if t0.elapsed() > limit {
                break None;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        match synced {
            Some(d) => samples.push(d),
            None => lost += 1,
        }
        // Back on its old address, for the next kill (of the other one).
        servers[on].restart()?;
    }
    let p99 = samples.pct_ms(99.0);
    row.secretfs = samples.summary_ms();
    let fresh_ms = fresh.pct_ms(50.0);
    row.baseline = format!("a new mount's first sync {} ms (p50 of 3)", ms(fresh_ms));
    row.ratio = format!("p99 = {:.1}× a new mount", p99 / fresh_ms);
    row.verdict = if lost > 0 {
        Verdict::Missed
    } else {
        Verdict::check(p99 <= 1_000.0)
    };
    row.note = format!(
        "two replicas on one PostgreSQL database, one `secretfs mount --server A,B`; {kills} kills, \
         alternating (the killed replica restarts on its address before the next kill, of the one the \
         mount is then on); each sample from the SIGKILL to the first poll (every 1 ms) where the mount's \
         `.secretfs/status` shows it connected to the other replica and a rotation made through that \
         replica right after the kill reads back through the mount. Not synced within {limit:?}: {lost}. \
         Baseline: `secretfs mount` started against the replica that survives, from spawn to its status \
         file (the mount appears after its first sync)."
    );
    Ok(vec![row])
}
