//! `secretfs mount MOUNTPOINT`

use std::path::Path;

use anyhow::Result;

use crate::args::{ConnArgs, MountArgs};

pub async fn run(_conn: &ConnArgs, _args: MountArgs) -> Result<()> {
    anyhow::bail!("the mount is not wired in yet")
}

/// A mount running in the background of `secretfs dev`.
pub struct DevMount {}

impl DevMount {
    pub async fn stop(self) {}
}

pub async fn start_dev_mount(_conn: &ConnArgs, _mountpoint: &Path) -> Result<DevMount> {
    anyhow::bail!("the mount is not wired in yet")
}
