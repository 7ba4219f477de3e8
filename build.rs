//! Compiles `proto/` into Rust with a vendored `protoc`, so building needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe {
        std::env::set_var("PROTOC", protoc);
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tether_descriptor.bin"))
        .extern_path(".google.rpc", "::tonic_types::pb")
        // Ordered maps encode deterministically, so a request's bytes (and the
        // fingerprint that guards request_id retries) do not depend on hashing.
        .btree_map(".")
        // prost's codec, but a request that does not decode is INVALID_ARGUMENT.
        .codec_path("crate::pb::StrictCodec")
        .compile_protos(
            &[
                std::path::PathBuf::from("proto/tether/v1/connection.proto"),
                std::path::PathBuf::from("proto/tether/v1/connection_service.proto"),
                std::path::PathBuf::from("proto/tether/v1/definition.proto"),
                std::path::PathBuf::from("proto/tether/v1/credential.proto"),
                std::path::PathBuf::from("proto/google/rpc/error_details.proto"),
            ],
            &[std::path::PathBuf::from("proto"), include],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
