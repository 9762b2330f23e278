//! Generates the protocol code from proto/ at build time (needs `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .compile_protos(&["proto/prestop/observer/v1/observer.proto"], &["proto"])?;
    Ok(())
}
