//! `cargo xtask image`: the node agent's OCI image, `llamaprobe:<version>`, built locally with
//! podman from scratch (no registry is pulled from): the release binary, the libraries `ldd`
//! lists for it at their real paths (and the dynamic loader), /etc/llamaprobe/ with the default
//! llamaprobe.toml, /tmp. Entrypoint `/usr/local/bin/llamaprobe`, command `daemon`.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::util::{self, progress};

/// Where the binary lies inside the image.
const BIN_IN_IMAGE: &str = "usr/local/bin/llamaprobe";

/// podman with the runtime and cgroup manager that work on hosts with a hybrid cgroup layout
/// (crun refuses it; cgroupfs needs no systemd).
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    cmd
}

pub fn run(tag: Option<String>) -> Result<()> {
    if !util::command_exists("podman") {
        bail!("podman is not installed (`apt-get install -y podman runc`)");
    }
    let image = format!(
        "llamaprobe:{}",
        tag.unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
    );
    let bin = util::build_llamaprobe()?;
    let root = util::target_dir().join("image-root");
    stage(&bin, &root)?;

    progress!("building image {image} from {}", root.display());
    let containerfile = util::workspace_root().join("deploy/Containerfile");
    let out = util::output(
        podman()
            .args(["build", "--quiet", "-f"])
            .arg(&containerfile)
            .args(["-t", &image])
            .arg(&root),
    )?;
    let id = out.lines().last().unwrap_or_default().trim().to_string();
    if id.is_empty() {
        bail!("podman build printed no image id");
    }
    progress!("image {image}: {id}");
    println!("{id}");
    Ok(())
}

/// Stages the image's root in `root` (emptied first): `bin` at /usr/local/bin/llamaprobe, its
/// libraries and loader at the paths `ldd` names, /etc/llamaprobe/ and /tmp.
pub fn stage(bin: &Path, root: &Path) -> Result<()> {
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
    }
    let dest = root.join(BIN_IN_IMAGE);
    fs::create_dir_all(dest.parent().unwrap())?;
    fs::copy(bin, &dest).with_context(|| format!("copying {}", bin.display()))?;
    for lib in ldd(bin)? {
        place(root, &lib)?;
    }

    let etc = root.join("etc/llamaprobe");
    fs::create_dir_all(&etc)?;
    let config = util::workspace_root().join("deploy/systemd/llamaprobe.toml");
    if config.exists() {
        fs::copy(&config, etc.join("llamaprobe.toml"))
            .with_context(|| format!("copying {}", config.display()))?;
    }
    let tmp = root.join("tmp");
    fs::create_dir_all(&tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))?;
    Ok(())
}

/// The files `ldd` lists for `bin` (its libraries and the dynamic loader).
fn ldd(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = util::output(Command::new("ldd").arg(bin))?;
    let mut files = Vec::new();
    for line in out.lines() {
        if line.contains("not found") {
            bail!("ldd {}: {}", bin.display(), line.trim());
        }
        let file = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(f) = file.filter(|f| f.starts_with('/')) {
            files.push(PathBuf::from(f));
        }
    }
    Ok(files)
}

/// Copies `from` to its real path under `root`; the path asked for, if it differs (the loader
/// in /lib64), becomes an absolute symbolic link to it.
fn place(root: &Path, from: &Path) -> Result<()> {
    let real = fs::canonicalize(from).with_context(|| format!("resolving {}", from.display()))?;
    let under = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let dest = under(&real);
    fs::create_dir_all(dest.parent().unwrap())?;
    if !dest.exists() {
        fs::copy(&real, &dest).with_context(|| format!("copying {}", real.display()))?;
    }
    if real != from {
        let link = under(from);
        fs::create_dir_all(link.parent().unwrap())?;
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(&real, &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
    }
    Ok(())
}
