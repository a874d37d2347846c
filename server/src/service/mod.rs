//! The gRPC services: each handler reads the caller's TLS identity,
//! converts the request into domain types, calls the [`Domain`], and
//! converts the answer back (`convert`). No decision is made here.

mod admin;
mod convert;
#[cfg(test)]
mod prop_tests;
mod secrets;
mod watch;

use tonic::{Request, Status};

pub use admin::AdminService;
pub use secrets::SecretsService;

use crate::domain::Peer;
use crate::tls::PeerInfo;

/// The caller's certificate identity as the TLS listener read it.
fn peer<T>(req: &Request<T>) -> Result<Peer, Status> {
    let info = req
        .extensions()
        .get::<PeerInfo>()
        .ok_or_else(|| Status::unauthenticated("no TLS client identity on this connection"))?;
    match info.identity.as_ref() {
        Ok(identity) => Ok(Peer {
            identity: identity.clone(),
            remote: info.remote,
        }),
        Err(why) => Err(Status::unauthenticated(why.clone())),
    }
}
