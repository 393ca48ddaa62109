//! Finding the files a process runs: its mapped executables and libraries (`/proc/PID/maps`),
//! opened through `/proc/PID/root` so processes in other mount namespaces (containers) work,
//! and, for a program not started yet, the libraries the dynamic loader would map.

use std::{
    collections::HashSet,
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
    process::Command,
};

/// Errors of discovery.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// The pid does not exist.
    #[error("no process with pid {pid}: check the pid (e.g. `pgrep -n llama-server`)")]
    NoSuchProcess { pid: u32 },
    /// /proc could not be read for the pid.
    #[error("cannot read /proc/{pid}/maps ({error}): run llamaprobe as root (sudo) or with CAP_SYS_PTRACE")]
    Proc { pid: u32, error: std::io::Error },
    /// The program to run was not found.
    #[error("cannot find program `{program}` (not a path and not on PATH)")]
    ProgramNotFound { program: String },
    /// The dynamic loader could not list the program's libraries.
    #[error("cannot list the libraries of {path}: {reason}")]
    Loader { path: PathBuf, reason: String },
}

/// One file mapped into a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedFile {
    /// Path as the process sees it.
    pub path: PathBuf,
    /// Path to open from here (through `/proc/PID/root`).
    pub host_path: PathBuf,
    pub inode: u64,
}

/// The file-backed mappings of `pid`, one entry per file, in address order.
pub fn mapped_files(pid: u32) -> Result<Vec<MappedFile>, DiscoverError> {
    let maps = match fs::read_to_string(format!("/proc/{pid}/maps")) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(DiscoverError::NoSuchProcess { pid })
        }
        Err(error) => return Err(DiscoverError::Proc { pid, error }),
    };
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode pathname
        let mut it = line.split_whitespace();
        let (Some(_), Some(_), Some(_), Some(_), Some(inode)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let path: String = it.collect::<Vec<_>>().join(" ");
        let inode: u64 = inode.parse().unwrap_or(0);
        if inode == 0 || !path.starts_with('/') || path.ends_with(" (deleted)") {
            continue;
        }
        if !seen.insert((inode, path.clone())) {
            continue;
        }
        let host_path = PathBuf::from(format!("/proc/{pid}/root{path}"));
        out.push(MappedFile {
            path: PathBuf::from(path),
            host_path,
            inode,
        });
    }
    Ok(out)
}

/// True if `pid` exists.
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The command name of `pid`, for messages.
pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Resolves a program name like a shell would (a path if it has a slash, else PATH).
pub fn which(program: &str) -> Result<PathBuf, DiscoverError> {
    let not_found = || DiscoverError::ProgramNotFound {
        program: program.to_string(),
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return if p.is_file() {
            Ok(fs::canonicalize(&p).unwrap_or(p))
        } else {
            Err(not_found())
        };
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(not_found)
}

/// The files a dynamically linked program will map at start: itself and its `DT_NEEDED`
/// libraries as its own loader resolves them (`<interpreter> --list`, which is what `ldd`
/// does, without running the program). A static program maps only itself.
pub fn planned_files(exe: &Path) -> Result<Vec<MappedFile>, DiscoverError> {
    let loader_err = |reason: String| DiscoverError::Loader {
        path: exe.to_path_buf(),
        reason,
    };
    let data = crate::resolve::map_elf(exe)
        .map_err(|e| loader_err(e.to_string()))?
        .ok_or_else(|| loader_err("not an ELF executable".into()))?;
    let interp = crate::resolve::interpreter(&data).map_err(|e| loader_err(e.to_string()))?;
    let mut files = vec![exe.to_path_buf()];
    if let Some(interp) = interp {
        let out = Command::new(&interp)
            .arg("--list")
            .arg(exe)
            .output()
            .map_err(|e| loader_err(format!("{interp}: {e}")))?;
        if !out.status.success() {
            return Err(loader_err(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "\tlibllama.so.0 => /path/libllama.so.0 (0x...)" or "\t/lib64/ld-linux... (0x...)"
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = path.split(" (").next().unwrap_or("").trim();
            if path.starts_with('/') {
                files.push(PathBuf::from(path));
            }
        }
    }
    let mut seen = HashSet::new();
    Ok(files
        .into_iter()
        .filter_map(|p| fs::canonicalize(&p).ok())
        .filter(|p| seen.insert(p.clone()))
        .filter_map(|p| {
            let inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&p).ok()?);
            Some(MappedFile {
                inode,
                host_path: p.clone(),
                path: p,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_maps_include_itself_and_libc() {
        let files = mapped_files(std::process::id()).unwrap();
        let exe = fs::canonicalize("/proc/self/exe").unwrap();
        assert!(files.iter().any(|f| f.path == exe), "{files:?}");
        assert!(files
            .iter()
            .any(|f| f.path.to_string_lossy().contains("libc.so")));
        assert!(files.iter().all(|f| f.host_path.exists()));
    }

    #[test]
    fn missing_pid_is_reported_as_such() {
        // pid_max is at most 2^22 on Linux.
        let err = mapped_files(4_999_999).unwrap_err();
        assert!(matches!(
            err,
            DiscoverError::NoSuchProcess { pid: 4_999_999 }
        ));
    }

    #[test]
    fn planned_files_of_a_dynamic_program_list_libc() {
        let sh = which("sh").unwrap();
        let files = planned_files(&sh).unwrap();
        assert_eq!(files[0].path, fs::canonicalize(&sh).unwrap());
        assert!(files
            .iter()
            .any(|f| f.path.to_string_lossy().contains("libc.so")));
    }
}
