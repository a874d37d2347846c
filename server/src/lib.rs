//! The secretfs server.
//!
//! - [`state_dir`]: what `server init` creates (master key, CA, certificates,
//!   database) and the checks `server run` makes on it.
//! - [`server`]: binding, TLS and serving ([`Server`]).
//! - `tls`: the TLS 1.3 mutual-TLS listener that reads each client's identity.
//! - `limits`: request size and metadata limits answered with a gRPC status.
//! - `identity`: the identity inside a client certificate (SPIFFE id or CN).
//! - `service`: the `Admin` and `Secrets` gRPC services, authentication and
//!   access checks, audit of reads and denials.
//! - `audit_log`: group commit of audit entries (reads are audited before
//!   content leaves the server).
//! - `auth_cache`: authenticated certificates, dropped when clients change.
//! - `report_budget`: how much a client may add to the audit log by itself.
//! - `harden`: non-dumpable, memory locked against swap.
//! - `hub`: fan-out of change hints to `Secrets.Watch` streams.
//! - [`envelope`]: per-version data keys under the master key (AES-256-GCM).
//! - [`store`]: the storage trait and its SQLite implementation.
//! - [`pki`]: the built-in CA; also makes CSRs for the CLI.
//! - [`names`]: the rules for secret, client and group names.

#![forbid(unsafe_code)]

mod audit_log;
mod auth_cache;
pub mod envelope;
mod error;
mod harden;
mod hub;
mod identity;
mod limits;
pub mod names;
pub mod pki;
mod report_budget;
pub mod server;
mod service;
pub mod state_dir;
pub mod store;
mod tls;

pub use error::Error;
pub use identity::{identity_from_der, IdentitySource, Issuer, PeerIdentity};
pub use server::{RunOptions, Server, DEFAULT_LISTEN, DEFAULT_MAX_SECRET_SIZE};
pub use state_dir::{init, InitOptions, StateDir};
