//! The secretfs server.
//!
//! Read this map first. A request flows through three layers:
//!
//! 1. [`service`](crate::service) (private): the gRPC handlers. Each reads the caller's TLS
//!    identity, turns the protobuf request into domain types, calls the
//!    domain, and turns the answer back (`service/convert.rs` holds every
//!    conversion). No decision is made there.
//! 2. [`domain`]: one [`domain::Domain`] owns the store, master key, CA,
//!    change feed, audit log and caches, and offers every operation:
//!    authentication ([`domain::auth`]), operator changes
//!    ([`domain::admin`]), reads ([`domain::reads`]) and view sync
//!    ([`domain::watch`]). Decrypt-and-audit, cache invalidation and change
//!    publication each happen in one place there. Audit actions are the
//!    [`domain::Action`] enum.
//! 3. [`store`]: the [`store::Store`] trait every backend implements (its
//!    own [`store::StoreError`], audit entries passed in, writes that return
//!    the revision they committed at, a [`store::ChangeFeed`]), the SQLite
//!    backend, and a conformance suite any backend must pass.
//!    [`store::integrity`] says what each row's MAC covers: a row edited
//!    without the master key is absent, and the domain logs and audits it;
//!    a sealed row set digest catches rows put back, deleted or added.
//!
//! Around them:
//! - [`state_dir`]: what `server init` creates (master key, CA, certificates,
//!   database) and the checks `server run` makes on it.
//! - `state_lock`: one `server run` at a time per state directory.
//! - [`server`]: binding, TLS and serving ([`Server`]).
//! - `tls`: the TLS 1.3 mutual-TLS listener that reads each client's identity.
//! - `cert_reload`: the server's certificate, taken up again when
//!   `server reissue-cert` replaces its files.
//! - `limits`: request size and metadata limits answered with a gRPC status.
//! - `identity`: the identity inside a client certificate (SPIFFE id or CN).
//! - `audit_log`: group commit of audit entries (reads are audited before
//!   content leaves the server).
//! - [`audit_sink`]: the external JSON-lines copy of the audit (file with
//!   rotation, or stdout); requests are refused while it cannot write.
//! - `auth_cache`: authenticated certificates, dropped when clients change.
//! - `report_budget`: how much a client may add to the audit log by itself.
//! - `harden`: non-dumpable, memory locked against swap.
//! - [`host_certs`]: `server admin-cert` (break glass) and `server
//!   reissue-cert`, made from the state directory's CA without the server.
//! - [`row_review`]: `server verify` (and `--accept`) without the server.
//! - [`envelope`]: per-version data keys under the master key (AES-256-GCM).
//! - [`keys`]: the keys derived from the master key (row MACs, audit chain)
//!   and the ring the server holds them in, old and new during a rekey.
//! - [`key_provider`]: where the master key lives (file, systemd
//!   credential, PKCS#11 token), recorded in the state directory.
//! - [`rekey`]: online, resumable `server rekey` to a new master key.
//! - [`pki`]: the built-in CA; also makes CSRs for the CLI.
//! - [`names`]: the rules for names and every other client-given field.

#![forbid(unsafe_code)]

mod audit_log;
pub mod audit_sink;
mod auth_cache;
mod cert_reload;
pub mod domain;
pub mod envelope;
mod error;
mod harden;
pub mod host_certs;
mod identity;
pub mod key_provider;
pub mod keys;
mod limits;
pub mod names;
pub mod pki;
#[cfg(test)]
mod prop_support;
pub mod rekey;
mod report_budget;
pub mod row_review;
pub mod server;
mod service;
pub mod state_dir;
mod state_lock;
pub mod store;
mod tls;

pub use error::Error;
pub use identity::{identity_from_der, IdentitySource, Issuer, PeerIdentity};
pub use server::{RunOptions, Server, DEFAULT_LISTEN, DEFAULT_MAX_SECRET_SIZE};
pub use state_dir::{init, init_with, InitOptions, StateDir};
