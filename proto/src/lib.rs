//! The secretfs wire protocol (`secretfs.v1`), generated from `secretfs.proto`.
//!
//! - [`v1`]: messages, the `Admin` and `Secrets` clients and servers.
//! - [`channel`]: a mutual-TLS [`tonic::transport::Channel`] from PEM files,
//!   shared by the CLI and the mount so both connect the same way.

pub mod channel;

/// Generated code for package `secretfs.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("secretfs.v1");
}

pub use channel::{connect, connect_lazy, ChannelError, ConnectConfig};
