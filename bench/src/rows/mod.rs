//! One module per group of rows; `run` maps a row id to its measurement.

pub mod propagation;
pub mod read;
pub mod replicas;
pub mod rpc;
pub mod scale;
pub mod startup;

use anyhow::Result;

use crate::report::Row;
use crate::Ctx;

pub fn run(id: &str, ctx: &Ctx) -> Result<Vec<Row>> {
    match id {
        "read" => read::cached_read(ctx),
        "caller-check" => read::caller_check(ctx),
        "first-read" => propagation::first_read(ctx),
        "readdir" => read::readdir(ctx),
        "rpc" => rpc::read_secrets(ctx),
        "rotate" => rpc::rotate(ctx),
        "propagation" => propagation::propagation(ctx),
        "watch-fanout" => propagation::watch_fanout(ctx),
        "mount-rss" => startup::mount_rss(ctx),
        "mount-start" => startup::mount_start(ctx),
        "scale" => scale::scale(ctx),
        "pg-rotate" => replicas::pg_rotate(ctx),
        "pg-rpc" => replicas::pg_read_secrets(ctx),
        "replica-propagation" => replicas::propagation(ctx),
        "failover" => replicas::failover(ctx),
        other => anyhow::bail!("unknown row {other}"),
    }
}
