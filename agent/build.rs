//! Builds the eBPF programs (`probe-ebpf`) with aya-build and the nightly toolchain, so the
//! agent binary embeds them. Needs `bpf-linker`; `cargo xtask setup` installs it under
//! `~/.cache/llamaprobe/tools/bin`, which is added to PATH here if present.

use std::{env, path::PathBuf};

use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=LLAMAPROBE_CACHE");
    let cache = env::var_os("LLAMAPROBE_CACHE")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/llamaprobe")));
    if let Some(cache) = cache {
        let tools = cache.join("tools/bin");
        if tools.is_dir() {
            let mut paths: Vec<PathBuf> = vec![tools];
            paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
            env::set_var("PATH", env::join_paths(paths)?);
        }
    }
    let found = env::split_paths(&env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join("bpf-linker").is_file());
    if !found {
        return Err(anyhow!(
            "bpf-linker not found: run `cargo xtask setup` once (it installs bpf-linker and the \
             nightly rust-src component), then build again"
        ));
    }
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let pkg = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "probe-ebpf")
        .ok_or_else(|| anyhow!("probe-ebpf package not found in the workspace"))?;
    let root = pkg
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("probe-ebpf manifest has no parent"))?;
    // aya-build watches the eBPF crate; the shared types it is built from change it too.
    println!(
        "cargo:rerun-if-changed={}",
        meta.workspace_root.join("probe-common")
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: pkg.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
