//! CycloneDX SBOMs from Cargo.lock (cargo-cyclonedx): one per image, for the
//! package whose binary the image carries.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context, Result};

use super::Metadata;
use crate::cmd;

/// Writes the SBOM of each `(package, destination)`. cargo-cyclonedx
/// writes `NAME.cdx.json` beside every workspace member's Cargo.toml; the
/// wanted ones are moved out and the rest removed, so the checkout is left
/// as it was.
pub fn write(meta: &Metadata, wanted: &[(&str, PathBuf)]) -> Result<()> {
    let result = cmd::run(
        Command::new(env!("CARGO"))
            .current_dir(cmd::workspace_root())
            .args(["cyclonedx", "--format", "json", "--spec-version", "1.5"])
            // Only the dependencies built for the images' platform.
            .args([
                "--target",
                &format!("{}-unknown-linux-gnu", std::env::consts::ARCH),
            ]),
    );
    for (package, manifest) in meta.members() {
        let written = manifest.with_file_name(format!("{package}.cdx.json"));
        match wanted.iter().find(|(p, _)| *p == package) {
            Some((_, dest)) if result.is_ok() => fs::rename(&written, dest).with_context(|| {
                format!(
                    "moving the SBOM {} to {}",
                    written.display(),
                    dest.display()
                )
            })?,
            _ => {
                let _ = fs::remove_file(&written);
            }
        }
    }
    result.context("cargo cyclonedx (`cargo xtask setup` installs cargo-cyclonedx)")
}
