//! Compiles `secretfs.proto` with protox, so no system `protoc` is needed;
//! also writes the descriptor set (for server reflection) and the list of
//! messages that hold no secret content (for the wiping codec).

#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use prost::Message;

/// Messages that carry secret content; their `Wipe` is written by hand in
/// src/codec.rs.
const WITH_CONTENT: &[&str] = &[
    "SecretContent",
    "ReadSecretsResponse",
    "WatchEvent",
    "CreateSecretRequest",
    "RotateSecretRequest",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=secretfs.proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = protox::compile(["secretfs.proto"], ["."])?;
    std::fs::write(
        out.join("secretfs_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    let mut none = String::new();
    let mut seen = BTreeSet::new();
    for file in &descriptors.file {
        for m in &file.message_type {
            let name = m.name();
            seen.insert(name.to_owned());
            if !WITH_CONTENT.contains(&name) {
                none.push_str(&format!("impl Wipe for v1::{name} {{}}\n"));
            }
        }
    }
    for name in WITH_CONTENT {
        assert!(
            seen.contains(*name),
            "{name} is no longer in secretfs.proto"
        );
    }
    std::fs::write(out.join("wipe_none.rs"), none)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::SecretfsCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
