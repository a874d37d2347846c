//! The codec every secretfs RPC uses: prost, with two differences that
//! matter for a secrets store.
//!
//! - A message is wiped once it is encoded: content that was copied into a
//!   reply (or a request) does not linger in freed heap memory.
//! - Bytes that do not decode are the caller's mistake (`INVALID_ARGUMENT`),
//!   not a server fault (`INTERNAL`, which is what prost's codec says).
//!
//! The frame tonic encodes into is tonic's own buffer and is not wiped here;
//! see docs/decisions.md ("Memory hygiene").

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;
use zeroize::Zeroize;

use crate::v1;

/// Clears what a message holds of secret content, in place.
pub trait Wipe {
    fn wipe(&mut self) {}
}

// Every message's impl, generated from its descriptor by build.rs: each
// `bytes` field zeroized, each message field wiped.
include!(concat!(env!("OUT_DIR"), "/wipe.rs"));

#[derive(Debug, Clone)]
pub struct SecretfsCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SecretfsCodec<T, U> {
    fn default() -> Self {
        SecretfsCodec(PhantomData)
    }
}

impl<T, U> Codec for SecretfsCodec<T, U>
where
    T: Message + Wipe + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = WipingEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        WipingEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(PhantomData)
    }
}

#[derive(Debug)]
pub struct WipingEncoder<T>(PhantomData<T>);

impl<T: Message + Wipe> Encoder for WipingEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, mut item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let encoded = item.encode(buf);
        item.wipe();
        encoded.map_err(|e| Status::internal(format!("cannot encode a reply: {e}")))
    }
}

#[derive(Debug)]
pub struct StrictDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            Status::invalid_argument(format!(
                "the message does not decode as {}: {e}; check that the client uses secretfs.proto of this server",
                std::any::type_name::<U>().rsplit("::").next().unwrap_or("the request")
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_wipes_content() {
        let mut event = v1::WatchEvent {
            upserts: vec![v1::SecretContent {
                meta: None,
                content: b"s3cret".to_vec(),
            }],
            ..Default::default()
        };
        let bytes = event.encode_to_vec();
        event.wipe();
        assert!(event.upserts[0].content.is_empty());
        assert!(bytes.windows(6).any(|w| w == b"s3cret"));
    }

    #[test]
    fn every_message_with_content_is_wiped_however_deep() {
        let content = || b"s3cret".to_vec();
        let secret = || v1::SecretContent {
            meta: None,
            content: content(),
        };
        let mut read = v1::ReadSecretsResponse {
            secrets: vec![secret(), secret()],
            ..Default::default()
        };
        read.wipe();
        assert!(read.secrets.iter().all(|s| s.content.is_empty()));
        let mut create = v1::CreateSecretRequest {
            content: content(),
            ..Default::default()
        };
        create.wipe();
        assert!(create.content.is_empty());
        let mut rotate = v1::RotateSecretRequest {
            content: content(),
            ..Default::default()
        };
        rotate.wipe();
        assert!(rotate.content.is_empty());
    }
}
