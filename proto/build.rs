use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos: Vec<PathBuf> = std::fs::read_dir("genai/v1")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    // Watch the directory too, so a newly added .proto triggers a rebuild.
    println!("cargo:rerun-if-changed=genai/v1");
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("genai_v1_descriptor.bin"))
        .compile_protos(&protos, &[PathBuf::from(".")])?;
    Ok(())
}
