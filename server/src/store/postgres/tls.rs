//! TLS to PostgreSQL (`sslmode=verify-full`).
//!
//! STUB: the replicas stream writes this module; the coordinator takes
//! their version at merge.

use std::path::Path;

use crate::store::{Result, StoreError};

pub(super) fn connect(config: &postgres::Config, root_ca: &Path) -> Result<postgres::Client> {
    let _ = (config, root_ca);
    Err(StoreError::Unavailable(
        "TLS to PostgreSQL is not built yet".into(),
    ))
}
