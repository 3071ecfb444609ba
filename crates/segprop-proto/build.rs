//! Compiles `proto/segprop/v1/*.proto` with protox (pure Rust, no `protoc` binary) and generates
//! the tonic clients and servers. The file descriptor set is kept for gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "common.proto",
        "job_service.proto",
        "cluster_service.proto",
        "snapshot_service.proto",
    ]
    .map(|f| root.join("segprop/v1").join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("segprop_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Blob chunks as `bytes::Bytes`: sliced and handed on without copies.
        .bytes(".segprop.v1.PutBlobChunk.data")
        .bytes(".segprop.v1.BlobChunk.data")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
