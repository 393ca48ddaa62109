//! Small helpers shared by the subcommands: paths, running commands, progress lines.

use std::{
    env,
    ffi::OsString,
    fs, io,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};

/// Prints a progress line on stderr (stdout is kept for machine-readable output).
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!("xtask: {}", format_args!($($arg)*))
    };
}
pub(crate) use progress;

/// The cache directory: `$LLAMAPROBE_CACHE`, else `~/.cache/llamaprobe`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("LLAMAPROBE_CACHE").filter(|d| !d.is_empty()) {
        return Ok(absolute(Path::new(&dir)));
    }
    let home = env::var_os("HOME").context("HOME is not set: set HOME or LLAMAPROBE_CACHE")?;
    Ok(PathBuf::from(home).join(".cache/llamaprobe"))
}

/// `cache_dir()/tools/bin`, where `setup` installs bpf-linker.
pub fn tools_bin_dir() -> Result<PathBuf> {
    Ok(cache_dir()?.join("tools/bin"))
}

/// PATH with the cache's tools directory in front (bpf-linker for the agent's build script).
pub fn path_with_tools() -> Result<OsString> {
    let mut dirs = vec![tools_bin_dir()?];
    dirs.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(dirs).context("PATH contains an invalid entry")
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// The cargo that runs us (`cargo xtask` sets CARGO), else `cargo` from PATH.
pub fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// The workspace's target directory (honours CARGO_TARGET_DIR).
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        env::current_dir().unwrap_or_default().join(path)
    }
}

/// A command line as text, for messages.
pub fn display(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Builds llamaprobe (release, the cache's tools on PATH for bpf-linker); returns the binary.
pub fn build_llamaprobe() -> Result<PathBuf> {
    progress!("building llamaprobe (release)");
    run_inherit(
        cargo()
            .args(["build", "--release", "-p", "llamaprobe"])
            .current_dir(workspace_root())
            .env("PATH", path_with_tools()?),
    )?;
    Ok(target_dir().join("release/llamaprobe"))
}

/// Runs a command with its output on stderr (stdout stays clean) and fails if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .stdout(Stdio::from(io::stderr()))
        .status()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs a command with the terminal's stdout and stderr and fails if it fails.
pub fn run_inherit(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails (with its stderr) if it fails.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a command of that name is on PATH.
pub fn command_exists(name: &str) -> bool {
    env::split_paths(&env::var_os("PATH").unwrap_or_default()).any(|dir| {
        fs::metadata(dir.join(name))
            .map(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
            .unwrap_or(false)
    })
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Writes a file through a temporary file and a rename, so readers never see half of it.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// 64-bit FNV-1a: a stable hash for stamp files (std's hasher may change between releases).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// `12.3 s` or `2 min 05 s`.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1} s")
    } else {
        format!("{} min {:02} s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

/// Sends a signal to a process we started.
pub fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions; a stale pid only yields ESRCH.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}
