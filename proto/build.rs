//! Compiles `ferry/**/*.proto` with protox (pure Rust: no system `protoc` needed) and
//! generates tonic clients and servers plus one descriptor set for server reflection.
use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "ferry/common/v1/common.proto",
    "ferry/registry/v1/registry.proto",
    "ferry/scheduler/v1/scheduler.proto",
    "ferry/ingest/v1/ingest.proto",
    "ferry/storage/v1/storage.proto",
    "ferry/failover/v1/failover.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds_path = out.join("ferry_descriptor.bin");
    std::fs::write(&fds_path, fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .skip_protoc_run()
        .file_descriptor_set_path(&fds_path)
        .compile_protos(PROTOS, &["."])?;
    Ok(())
}
