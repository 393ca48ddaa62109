//! `cargo xtask setup`: installs what building and testing need, skipping what is there.
//!
//! - Debian packages for missing commands (cmake, a C/C++ compiler, binutils, make, curl,
//!   python3, podman and runc);
//! - the nightly toolchain's `rust-src` component (`-Z build-std=core` for the BPF target);
//! - `bpf-linker`, linked against the nightly toolchain's own libLLVM, under the cache's `tools/`.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::util::{self, progress};

/// (command that must exist, Debian package that provides it).
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("cmake", "cmake"),
    ("make", "make"),
    ("gcc", "gcc"),
    ("g++", "g++"),
    // strip and readelf, for the stripped fixtures.
    ("strip", "binutils"),
    ("readelf", "binutils"),
    ("curl", "curl"),
    ("python3", "python3"),
    // The daemon's container test: podman with runc (crun refuses this hybrid cgroup layout).
    ("podman", "podman"),
    ("runc", "runc"),
    // The dashboards' and rules' tests: a real Prometheus and promtool; the compose stack is
    // validated offline by docker-compose.
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    ("docker-compose", "docker-compose"),
];

pub fn run() -> Result<()> {
    install_debian_packages()?;
    install_rust_src()?;
    install_bpf_linker()?;
    progress!("setup: done");
    Ok(())
}

fn install_debian_packages() -> Result<()> {
    let mut missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(command, _)| !util::command_exists(command))
        .map(|(_, package)| *package)
        .collect();
    missing.dedup(); // binutils provides two of the commands
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !util::command_exists("apt-get") {
        bail!("missing commands; install these packages with your package manager: {list}");
    }
    if !util::is_root() {
        bail!("missing Debian packages: run `apt-get install {list}` as root, or run `cargo xtask setup` as root");
    }
    progress!("setup: installing Debian packages: {list}");
    util::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = util::output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("no nightly Rust toolchain: install it with `rustup toolchain install nightly`")?;
    Ok(PathBuf::from(out.trim()))
}

fn install_rust_src() -> Result<()> {
    let library = nightly_sysroot()?.join("lib/rustlib/src/rust/library");
    if library.is_dir() {
        return Ok(());
    }
    progress!("setup: adding the rust-src component to the nightly toolchain");
    util::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

/// The LLVM major version of the nightly rustc ("LLVM version: 22.1.4" gives 22).
fn nightly_llvm_major() -> Result<u32> {
    let out = util::output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    out.lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))
        .and_then(|version| version.trim().split('.').next())
        .and_then(|major| major.parse().ok())
        .context("`rustc +nightly -vV` printed no `LLVM version: N.N.N` line")
}

/// The nightly toolchain's shared libLLVM (`lib/libLLVM.so.<version>`).
fn nightly_libllvm() -> Result<PathBuf> {
    let lib = nightly_sysroot()?.join("lib");
    let mut found = Vec::new();
    for entry in fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let path = entry?.path();
        let is_libllvm = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("libLLVM.so."));
        if is_libllvm {
            found.push(path);
        }
    }
    found.sort();
    found.pop().with_context(|| {
        format!(
            "no libLLVM.so.* in {}: the nightly toolchain should ship one; \
             try `rustup toolchain install nightly --force`",
            lib.display()
        )
    })
}

/// Points `cache/llvm/lib/libLLVM.so` (for bpf-linker's build) and `cache/llvm/lib/<soname>`
/// (for running it: its RUNPATH is that directory) at the nightly toolchain's libLLVM.
fn link_libllvm(prefix: &Path) -> Result<()> {
    let target = nightly_libllvm()?;
    let soname = target
        .file_name()
        .context("libLLVM path has no file name")?;
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for link in [lib.join("libLLVM.so"), lib.join(soname)] {
        if fs::read_link(&link).ok().as_deref() == Some(target.as_path()) {
            continue;
        }
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        symlink(&target, &link).with_context(|| format!("linking {}", link.display()))?;
        progress!("setup: {} -> {}", link.display(), target.display());
    }
    Ok(())
}

fn install_bpf_linker() -> Result<()> {
    let cache = util::cache_dir()?;
    let prefix = cache.join("llvm");
    // Refreshed every time: a nightly update renames the libLLVM file the binary needs.
    link_libllvm(&prefix)?;

    let bin = util::tools_bin_dir()?.join("bpf-linker");
    if bin.is_file()
        && Command::new(&bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    let major = nightly_llvm_major()?;
    progress!(
        "setup: building bpf-linker against the nightly toolchain's LLVM {major} (about a minute)"
    );
    util::run(
        util::cargo()
            .args(["install", "bpf-linker", "--root"])
            .arg(cache.join("tools"))
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix)
            // `cargo xtask` runs inside the workspace: keep its settings out of the install.
            .current_dir(env::temp_dir()),
    )
    .context("installing bpf-linker failed; see the cargo output above")?;
    Ok(())
}
