//! Server-side rows: `Secrets.ReadSecrets` under load against a bare tonic
//! echo with the same TLS setup, and durable rotate throughput against raw
//! SQLite inserts with the same durability settings.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use prost::Message;
use secretfs_proto::v1::secrets_client::SecretsClient;
use secretfs_proto::v1::{Empty, ReadSecretsRequest};
use secretfs_proto::ConnectConfig;

use crate::harness::{filler, Server};
use crate::report::{Row, Verdict};
use crate::stats::{ms, ratio, Samples};
use crate::Ctx;

pub const PAYLOAD: usize = 4096;
const CONNECTIONS: usize = 8;
const IN_FLIGHT: usize = 64;

pub struct Load {
    pub per_sec: f64,
    pub latencies: Samples,
}

/// `IN_FLIGHT` callers over `CONNECTIONS` connections, each issuing
/// `ReadSecrets` (or, with `list`, `ListMySecrets`: no decryption, no
/// audit) back to back for `seconds`.
pub async fn load(cfg: &ConnectConfig, name: &str, seconds: f64, list: bool) -> Result<Load> {
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        // One `connect` = one TCP + TLS connection.
        let ch = secretfs_proto::connect(cfg).await?;
        clients.push(SecretsClient::new(ch).max_decoding_message_size(usize::MAX));
    }
    let request = ReadSecretsRequest {
        names: vec![name.to_owned()],
        ..Default::default()
    };
    // Warm-up: connections, server caches.
    for c in &mut clients {
        c.read_secrets(request.clone()).await?;
    }
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..IN_FLIGHT {
        let mut c = clients[i % CONNECTIONS].clone();
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                if list {
                    std::hint::black_box(c.list_my_secrets(Empty {}).await?);
                } else {
                    std::hint::black_box(c.read_secrets(request.clone()).await?);
                }
                lat.push(t.elapsed());
            }
            Ok::<_, tonic::Status>(lat)
        }));
    }
    let mut latencies = Samples::default();
    for t in tasks {
        for d in t.await?? {
            latencies.push(d);
        }
    }
    let took = start.elapsed().as_secs_f64();
    Ok(Load {
        per_sec: latencies.len() as f64 / took,
        latencies,
    })
}

struct Echo {
    child: Child,
    addr: String,
}

impl Drop for Echo {
    fn drop(&mut self) {
        // Closing stdin asks it to stop; then make sure.
        drop(self.child.stdin.take());
        std::thread::sleep(Duration::from_millis(50));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_echo(me: &Path, state: &Path, payload: &Path) -> Result<Echo> {
    let mut child = Command::new(me)
        .arg("echo-server")
        .arg("--state")
        .arg(state)
        .arg("--payload")
        .arg(payload)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn the echo server")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    let Some(addr) = line.trim().strip_prefix("addr=") else {
        let _ = child.kill();
        bail!("the echo server did not start: {line:?}");
    };
    Ok(Echo {
        addr: addr.to_owned(),
        child,
    })
}

pub fn read_secrets(ctx: &Ctx) -> Result<Vec<Row>> {
    let mut row = Row::new(
        "rpc",
        "`Secrets.ReadSecrets` of one 4 KiB secret over mTLS, 64 in flight over 8 connections",
        "≥ 0.7× echo",
    );
    let server = Server::start(&ctx.env)?;
    let client = server.add_client("rpc")?;
    let name = "rpc/secret";
    ctx.rt.block_on(server.grant_new_secrets(
        "rpc",
        &["rpc"],
        &[(name.to_owned(), filler(PAYLOAD, 7))],
    ))?;
    let cfg = server.connect_config(&client)?;
    // The echo answers with the very bytes the server returned.
    let reply = ctx.rt.block_on(async {
        let mut c = server.secrets_client(&client).await?;
        let r = c
            .read_secrets(ReadSecretsRequest {
                names: vec![name.to_owned()],
                ..Default::default()
            })
            .await?;
        anyhow::Ok(r.into_inner())
    })?;
    let payload = server.dir.join("echo-payload.bin");
    std::fs::write(&payload, reply.encode_to_vec())?;
    let echo = start_echo(&ctx.me, &server.state, &payload)?;
    let echo_cfg = ConnectConfig {
        server: format!("https://{}", echo.addr),
        ..cfg.clone()
    };
    let seconds = ctx.sizes.rpc_seconds;
    let (mut best_s, mut best_e): (Option<Load>, Option<Load>) = (None, None);
    for _ in 0..2 {
        let s = ctx.rt.block_on(load(&cfg, name, seconds, false))?;
        let e = ctx.rt.block_on(load(&echo_cfg, name, seconds, false))?;
        if best_s.as_ref().is_none_or(|b| s.per_sec > b.per_sec) {
            best_s = Some(s);
        }
        if best_e.as_ref().is_none_or(|b| e.per_sec > b.per_sec) {
            best_e = Some(e);
        }
    }
    let (s, e) = (best_s.unwrap(), best_e.unwrap());
    // Diagnostic: the same load on a call that neither decrypts nor audits.
    let list = ctx.rt.block_on(load(&cfg, name, seconds, true))?;
    row.secretfs = format!(
        "{:.0} req/s, p99 {} ms",
        s.per_sec,
        ms(s.latencies.pct_ms(99.0))
    );
    row.baseline = format!(
        "echo {:.0} req/s, p99 {} ms",
        e.per_sec,
        ms(e.latencies.pct_ms(99.0))
    );
    row.ratio = ratio(s.per_sec, e.per_sec);
    row.verdict = Verdict::check(s.per_sec >= 0.7 * e.per_sec);
    row.note = format!(
        "client in this process (tokio, 2 workers); server and echo are separate processes; \
         {} s per run, best of 2 alternating runs; response {} bytes encoded. \
         The echo (`bench/src/echo.rs`) has the server's TLS setup and returns the server's own reply bytes; \
         it skips authentication against the store, the access check, decryption and the audit write. \
         Diagnostic, same load on `ListMySecrets` (store query, no decryption, no audit): {:.0} req/s, p99 {} ms.",
        seconds,
        reply.encoded_len(),
        list.per_sec,
        ms(list.latencies.pct_ms(99.0))
    );
    drop(echo);
    Ok(vec![row])
}

pub const ROTATE_SIZE: usize = 1024;
pub const ROTATORS: usize = 8;

/// Raw SQLite: one row of the same size per durable transaction.
fn raw_sqlite(dir: &Path, n: usize) -> Result<f64> {
    let path = dir.join("raw.db");
    let _ = std::fs::remove_file(&path);
    let conn = rusqlite::Connection::open(&path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE versions (id INTEGER PRIMARY KEY, secret_id INTEGER NOT NULL, \
         version INTEGER NOT NULL, wrapped_key BLOB NOT NULL, ciphertext BLOB NOT NULL, \
         created_at INTEGER NOT NULL, UNIQUE (secret_id, version))",
    )?;
    // What a sealed version holds: nonce+key+tag, nonce+content+tag.
    let wrapped = vec![7u8; 12 + 32 + 16];
    let ct = vec![9u8; 12 + ROTATE_SIZE + 16];
    let mut stmt = conn.prepare(
        "INSERT INTO versions (secret_id, version, wrapped_key, ciphertext, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let start = Instant::now();
    for i in 0..n {
        stmt.execute(rusqlite::params![
            (i % ROTATORS) as i64,
            i as i64,
            &wrapped,
            &ct,
            i as i64
        ])?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// `ROTATORS` secrets of `ROTATE_SIZE` bytes to rotate, on `server`.
pub fn rotate_setup(ctx: &Ctx, server: &Server) -> Result<Vec<(String, Vec<u8>)>> {
    let names: Vec<(String, Vec<u8>)> = (0..ROTATORS)
        .map(|i| (format!("rot/k{i}"), filler(ROTATE_SIZE, i as u64)))
        .collect();
    ctx.rt
        .block_on(server.grant_new_secrets("rot", &[], &names))?;
    Ok(names)
}

/// `n` `Admin.RotateSecret` calls, `ROTATORS` in flight over one
/// connection, one secret each; rotations per second.
pub fn rotate_load(
    ctx: &Ctx,
    server: &Server,
    names: &[(String, Vec<u8>)],
    n: usize,
) -> Result<f64> {
    ctx.rt.block_on(async {
        let admin = server.admin_client().await?;
        let names = Arc::new(names.to_vec());
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..ROTATORS {
            let mut a = admin.clone();
            let names = names.clone();
            tasks.push(tokio::spawn(async move {
                for j in 0..n / ROTATORS {
                    Server::rotate(
                        &mut a,
                        &names[i].0,
                        filler(ROTATE_SIZE, (j * 100 + i) as u64),
                    )
                    .await?;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        anyhow::Ok((n / ROTATORS * ROTATORS) as f64 / start.elapsed().as_secs_f64())
    })
}

pub fn rotate(ctx: &Ctx) -> Result<Vec<Row>> {
    let n = ctx.sizes.rotations;
    let mut row = Row::new(
        "rotate",
        "rotate throughput (durable), 1 KiB content",
        "≥ 0.5× raw",
    );
    let server = Server::start(&ctx.env)?;
    let names = rotate_setup(ctx, &server)?;
    let raw_before = raw_sqlite(&server.dir, n)?;
    let per_sec = rotate_load(ctx, &server, &names, n)?;
    let raw_after = raw_sqlite(&server.dir, n)?;
    let raw = raw_before.max(raw_after);
    row.secretfs = format!("{per_sec:.0} rotations/s");
    row.baseline = format!("raw SQLite {raw:.0} inserts/s");
    row.ratio = ratio(per_sec, raw);
    row.verdict = Verdict::check(per_sec >= 0.5 * raw);
    row.note = format!(
        "{n} `Admin.RotateSecret` calls, {ROTATORS} in flight over one connection (8 secrets), state dir on disk ({}); \
         baseline: one {}-byte version row per transaction into a fresh WAL database with synchronous=FULL \
         in the same directory, best of a run before and after.",
        ctx.env.work.display(),
        60 + 12 + ROTATE_SIZE + 16
    );
    Ok(vec![row])
}
