//! The secretfs wire protocol (`secretfs.v1`), generated from `secretfs.proto`.
//!
//! - [`v1`]: messages, the `Admin` and `Secrets` clients and servers.
//! - [`codec`]: the codec of every RPC (wipes content once encoded; bad
//!   bytes are INVALID_ARGUMENT).
//! - [`FILE_DESCRIPTOR_SET`]: the compiled proto, for server reflection.
//! - [`channel`]: a mutual-TLS [`tonic::transport::Channel`] from PEM files,
//!   shared by the CLI and the mount so both connect the same way.
//! - [`servers`]: several servers (`--server A,B`), a name's several
//!   addresses, and where a long-running client goes when one fails.
//! - [`cert`]: a certificate's serial and validity, the one time format
//!   (RFC 3339, UTC) and the one expiry warning, for server, CLI and mount.
//! - [`credentials`]: checks of the client's own CA, certificate and key
//!   files before connecting, naming the file at fault and the fix.
//! - [`files`]: replacing certificate and key files whole (one pair at a
//!   time, the old key put back on failure), for every writer of them.

#![forbid(unsafe_code)]

pub mod cert;
pub mod channel;
pub mod codec;
pub mod credentials;
pub mod files;
#[cfg(test)]
mod prop_support;
pub mod servers;

/// Generated code for package `secretfs.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("secretfs.v1");
}

pub use channel::{
    connect, connect_any, connect_lazy_to, connect_with_call_timeout, ChannelError, ConnectConfig,
};

/// `secretfs.proto` compiled (a `FileDescriptorSet`), for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/secretfs_descriptor.bin"));
