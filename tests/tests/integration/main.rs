//! The end-to-end tests, one binary (as ripgrep's `tests/integration.rs`):
//! every module below compiles and links `common` once instead of once per
//! file. Each module is one area of the product, run against the real
//! `secretfs` binary, a real TLS server and real mounts.

#![deny(unsafe_code)]

mod common;

mod audit;
mod audit_chain;
mod audit_sink_review;
mod caller;
mod certs;
mod container;
mod deploy;
mod dev;
mod dockerfile;
mod docs;
mod failover;
mod grpc_conventions;
mod integrity;
mod key_providers;
mod kubernetes;
mod metadata;
mod mount;
mod mount_lifecycle;
mod rails;
mod replicas;
mod replicas_live;
mod review;
mod server_cli;
mod sidecar;
mod watch;
mod watch_api;
