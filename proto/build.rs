//! Compiles `secretfs.proto` with protox, so no system `protoc` is needed;
//! also writes the descriptor set (for server reflection) and, from it, the
//! `Wipe` impl of every message (for the wiping codec): each `bytes` field
//! is zeroized and each message field wiped in turn, so a message that
//! gains content is wiped without anyone remembering to list it.

#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use prost::Message;

/// The `Wipe` impl of one message, from its descriptor.
fn wipe_impl(m: &prost_types::DescriptorProto, package: &str) -> String {
    use prost_types::field_descriptor_proto::{Label, Type};
    let maps: BTreeSet<String> = m
        .nested_type
        .iter()
        .filter(|n| n.options.as_ref().is_some_and(|o| o.map_entry()))
        .map(|n| format!(".{package}.{}.{}", m.name(), n.name()))
        .collect();
    let mut body = String::new();
    for f in &m.field {
        let name = match f.name() {
            n @ ("type" | "match" | "ref" | "move" | "fn" | "impl" | "mod" | "use") => {
                format!("r#{n}")
            }
            n => n.to_owned(),
        };
        let repeated = f.label() == Label::Repeated;
        let optional = f.proto3_optional();
        let each = match f.r#type() {
            Type::Bytes => "zeroize()",
            Type::Message if !maps.contains(f.type_name()) => "wipe()",
            _ => continue,
        };
        body.push_str(&if repeated {
            format!("        self.{name}.iter_mut().for_each(|x| x.{each});\n")
        } else if optional || f.r#type() == Type::Message {
            format!("        if let Some(x) = &mut self.{name} {{ x.{each}; }}\n")
        } else {
            format!("        self.{name}.{each};\n")
        });
    }
    let name = m.name();
    if body.is_empty() {
        format!("impl Wipe for v1::{name} {{}}\n")
    } else {
        format!("impl Wipe for v1::{name} {{\n    fn wipe(&mut self) {{\n{body}    }}\n}}\n")
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=secretfs.proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = protox::compile(["secretfs.proto"], ["."])?;
    std::fs::write(
        out.join("secretfs_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    let mut impls = String::new();
    for file in &descriptors.file {
        for m in &file.message_type {
            impls.push_str(&wipe_impl(m, file.package()));
        }
    }
    std::fs::write(out.join("wipe.rs"), impls)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::SecretfsCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
