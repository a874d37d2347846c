//! A big store (100k secrets, 10k clients, 1k groups) against a small one
//! (1k secrets): a client whose view is the same 100 secrets in both should
//! see the same latency, because the cost should follow the client's view,
//! not the store's size.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use secretfs_proto::v1::secrets_client::SecretsClient;
use secretfs_proto::v1::{Empty, ReadSecretsRequest};
use secretfs_server::domain::Action;
use secretfs_server::envelope::Binding;
use secretfs_server::store::{Member, NewClient, NewSecret, StoreError};
use tonic::transport::Channel;

use crate::harness::{filler, init_state, rss_kib, Identity, Server};
use crate::report::{Row, Verdict};
use crate::stats::{mib, ms, ratio, Samples};
use crate::Ctx;

const SIZE: usize = 64;

struct ScaleServer {
    server: Server,
    client: SecretsClient<Channel>,
    populate_s: f64,
}

/// Fills a fresh state directory through the server's own store and
/// envelope code (the CLI would take hours at 100k), on tmpfs so the
/// per-row fsyncs cost nothing, then moves it to disk and starts the real
/// server on it.
fn populate(ctx: &Ctx, (secrets, clients, groups): (usize, usize, usize)) -> Result<ScaleServer> {
    let t = Instant::now();
    let shm = tempfile::tempdir_in("/dev/shm")?;
    let state = init_state(&ctx.env, shm.path())?;
    {
        let (store, keys) =
            secretfs_server::state_dir::open_store(&secretfs_server::StateDir::new(&state))?;
        let keys = keys.get();
        let master = keys.current.master();
        let group = |i: usize| format!("g{:04}", i % groups);
        let by_bench = |action: Action| action.by("bench");
        for g in 0..groups {
            store.create_group(&group(g), "", &by_bench(Action::GroupCreate))?;
        }
        for i in 0..secrets {
            let name = format!("scale/s{i:06}");
            let content = filler(SIZE, i as u64);
            let new = NewSecret {
                name: name.clone(),
                size: SIZE as u64,
                ..Default::default()
            };
            store.create_secret(&new, &by_bench(Action::SecretCreate), &mut |id, version| {
                master
                    .seal(
                        Binding {
                            secret_id: id,
                            name: &name,
                            version,
                        },
                        &content,
                    )
                    .map_err(|e| StoreError::Seal(Box::new(e)))
            })?;
            store.set_group_member(
                &group(i),
                &Member::Secret(name),
                true,
                &by_bench(Action::GroupAddSecret),
            )?;
        }
        for c in 0..clients {
            let name = format!("c{c:05}");
            store.create_client(
                &NewClient {
                    name: name.clone(),
                    admin: false,
                    cert: None,
                },
                &by_bench(Action::ClientCreate),
            )?;
            store.set_group_member(
                &group(c),
                &Member::Client(name),
                true,
                &by_bench(Action::GroupAddClient),
            )?;
        }
    }
    let dir = ctx.env.fresh_dir("scale")?;
    let disk_state = dir.join("state");
    copy_dir(&state, &disk_state)?;
    let server = Server::start_on(&ctx.env, dir, disk_state)?;
    let who: Identity = server.add_client("bench-c")?;
    server.cli(&["group", "add-client", "g0000", "bench-c"])?;
    let client = ctx.rt.block_on(server.secrets_client(&who))?;
    Ok(ScaleServer {
        server,
        client,
        populate_s: t.elapsed().as_secs_f64(),
    })
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    std::fs::set_permissions(to, std::fs::metadata(from)?.permissions())?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

fn db_bytes(state: &Path) -> u64 {
    ["secretfs.db", "secretfs.db-wal"]
        .iter()
        .map(|f| {
            std::fs::metadata(state.join(f))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum()
}

pub fn scale(ctx: &Ctx) -> Result<Vec<Row>> {
    let s = ctx.sizes;
    let (bs, bc, bg) = s.scale_big;
    let (ss, _, _) = s.scale_small;
    eprintln!("[secretfs-bench]   populating {bs} secrets, {bc} clients, {bg} groups ...");
    let mut big = populate(ctx, s.scale_big)?;
    let mut small = populate(ctx, s.scale_small)?;
    let view = bs / bg;
    let (mut lb, mut ls, mut rb, mut rs) = (
        Samples::default(),
        Samples::default(),
        Samples::default(),
        Samples::default(),
    );
    ctx.rt.block_on(async {
        // Warm both, then interleave so noise hits both stores alike.
        for st in [&mut big, &mut small] {
            let n = st
                .client
                .list_my_secrets(Empty {})
                .await?
                .into_inner()
                .secrets
                .len();
            anyhow::ensure!(n == view, "the client sees {n} secrets, expected {view}");
            st.client
                .read_secrets(ReadSecretsRequest::default())
                .await?;
        }
        for _ in 0..s.scale_calls {
            for (st, l, r) in [(&mut big, &mut lb, &mut rb), (&mut small, &mut ls, &mut rs)] {
                let t = Instant::now();
                st.client.list_my_secrets(Empty {}).await?;
                l.push(t.elapsed());
                let t = Instant::now();
                st.client
                    .read_secrets(ReadSecretsRequest::default())
                    .await?;
                r.push(t.elapsed());
            }
        }
        anyhow::Ok(())
    })?;
    let mut rows = Vec::new();
    for (what, b, sm) in [
        ("list (`ListMySecrets`)", &lb, &ls),
        ("read all (`ReadSecrets`)", &rb, &rs),
    ] {
        let mut row = Row::new(
            "scale",
            format!("a client's {what} of its {view} secrets in a store of {bs} secrets, {bc} clients, {bg} groups"),
            "≤ 1.2× the small store",
        );
        let (pb, ps) = (b.pct_ms(50.0), sm.pct_ms(50.0));
        row.secretfs = format!("p50 {} / p99 {} ms", ms(pb), ms(b.pct_ms(99.0)));
        row.baseline = format!(
            "store of {ss} secrets: p50 {} / p99 {} ms",
            ms(ps),
            ms(sm.pct_ms(99.0))
        );
        row.ratio = ratio(pb, ps);
        row.verdict = Verdict::check(pb <= 1.2 * ps);
        row.note = format!(
            "{} sequential calls per store over one connection, interleaved between the two servers; \
             ratio of p50s. Stores filled through `SqliteStore` + `MasterKey` on tmpfs \
             ({:.0} s for the big one), moved to disk, served by `secretfs server run`.",
            s.scale_calls, big.populate_s
        );
        rows.push(row);
    }
    let mut row = Row::new(
        "scale",
        format!("server RSS and database size at {bs} secrets, {bc} clients, {bg} groups"),
        "report",
    );
    let (rss_b, rss_s) = (
        rss_kib(big.server.pid()).unwrap_or(0),
        rss_kib(small.server.pid()).unwrap_or(0),
    );
    let (db_b, db_s) = (db_bytes(&big.server.state), db_bytes(&small.server.state));
    row.secretfs = format!("RSS {}, database {}", mib(rss_b), mib(db_b / 1024));
    row.baseline = format!(
        "{ss} secrets: RSS {}, database {}",
        mib(rss_s),
        mib(db_s / 1024)
    );
    row.ratio = format!(
        "{:.0} bytes of database per secret",
        db_b as f64 / bs as f64
    );
    row.verdict = Verdict::Report;
    row.note = format!(
        "VmRSS of `secretfs server run` after the calls above; database = secretfs.db + WAL \
         ({SIZE}-byte secrets, one version each, with their audit rows)."
    );
    rows.push(row);
    Ok(rows)
}
