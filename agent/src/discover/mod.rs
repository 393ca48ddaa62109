//! Finding the files a process runs: its mapped executables and libraries (`/proc/PID/maps`),
//! opened through `/proc/PID/root` so processes in other mount namespaces (containers) work,
//! and, for a program not started yet, the libraries the dynamic loader would map.

pub mod elf;

use std::{
    collections::HashSet,
    fs,
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
    #[error(
        "cannot read /proc/{pid} ({error}): run llamaprobe as root (sudo) or with CAP_SYS_PTRACE"
    )]
    Proc { pid: u32, error: procfs::ProcError },
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
    /// Path to open from here (through `/proc/PID/root`, or `/proc/PID/map_files`).
    pub host_path: PathBuf,
    /// Device (`makedev(major, minor)`) and inode: which file it is, whatever its path.
    pub dev: u64,
    pub inode: u64,
}

impl MappedFile {
    /// The file's identity: two containers' `/usr/bin/llama-server` are two files.
    pub fn key(&self) -> FileKey {
        FileKey {
            dev: self.dev,
            inode: self.inode,
        }
    }
}

/// A file by device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey {
    pub dev: u64,
    pub inode: u64,
}

/// How a process's files are opened from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenVia {
    /// `/proc/PID/root` + the path: the process's view of its mount namespace.
    Root,
    /// `/proc/PID/map_files/START-END`: the very file mapped, whatever has become of its path
    /// (needs CAP_SYS_ADMIN; the host agent's way).
    MapFiles,
}

/// The process `pid` (procfs), or why it cannot be read.
fn process(pid: u32) -> Result<procfs::process::Process, DiscoverError> {
    procfs::process::Process::new(pid as i32).map_err(|e| proc_error(pid, e))
}

fn proc_error(pid: u32, e: procfs::ProcError) -> DiscoverError {
    match e {
        procfs::ProcError::NotFound(_) => DiscoverError::NoSuchProcess { pid },
        error => DiscoverError::Proc { pid, error },
    }
}

/// The file-backed mappings of `pid` (`/proc/PID/maps`, through the `procfs` crate), one entry
/// per file, in address order. The one reader of a process's maps in llamaprobe.
pub fn mapped_files(pid: u32) -> Result<Vec<MappedFile>, DiscoverError> {
    mapped_files_via(pid, OpenVia::Root)
}

/// [`mapped_files`], opened `via`.
pub fn mapped_files_via(pid: u32, via: OpenVia) -> Result<Vec<MappedFile>, DiscoverError> {
    let maps = process(pid)?.maps().map_err(|e| proc_error(pid, e))?;
    Ok(files(pid, maps, via))
}

/// The files named by the text of a `/proc/PID/maps` (what [`mapped_files_via`] reads): the
/// parsing entry point, for fuzzing and tests. The text is the traced process's to shape (its
/// mapped paths), so malformed text is an error, never a panic.
pub fn parse_maps(pid: u32, text: &[u8], via: OpenVia) -> Result<Vec<MappedFile>, DiscoverError> {
    let maps = procfs::FromRead::from_read(text).map_err(|e| proc_error(pid, e))?;
    Ok(files(pid, maps, via))
}

/// The files of parsed maps, each once (by inode and path), deleted files left out.
fn files(pid: u32, maps: procfs::process::MemoryMaps, via: OpenVia) -> Vec<MappedFile> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for m in maps {
        let procfs::process::MMapPath::Path(path) = m.pathname else {
            continue;
        };
        if m.inode == 0
            || !path.is_absolute()
            || path.to_string_lossy().ends_with(" (deleted)")
            || !seen.insert((m.inode, path.clone()))
        {
            continue;
        }
        let host_path = match via {
            OpenVia::Root => Path::new(&format!("/proc/{pid}/root"))
                .join(path.strip_prefix("/").unwrap_or(&path)),
            OpenVia::MapFiles => PathBuf::from(format!(
                "/proc/{pid}/map_files/{:x}-{:x}",
                m.address.0, m.address.1
            )),
        };
        let (major, minor) = m.dev;
        out.push(MappedFile {
            path,
            host_path,
            dev: libc::makedev(major as u32, minor as u32),
            inode: m.inode,
        });
    }
    out
}

/// True if `pid` exists.
pub fn process_exists(pid: u32) -> bool {
    procfs::process::Process::new(pid as i32).is_ok()
}

/// The command name of `pid`, for messages ("?" if it cannot be read).
pub fn comm(pid: u32) -> String {
    process(pid)
        .ok()
        .and_then(|p| p.stat().ok())
        .map(|s| s.comm)
        .unwrap_or_else(|| "?".into())
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
    let data = elf::map_elf(exe)
        .map_err(|e| loader_err(e.to_string()))?
        .ok_or_else(|| loader_err("not an ELF executable".into()))?;
    let interp = elf::interpreter(&data).map_err(|e| loader_err(e.to_string()))?;
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
            let meta = fs::metadata(&p).ok()?;
            Some(MappedFile {
                dev: std::os::unix::fs::MetadataExt::dev(&meta),
                inode: std::os::unix::fs::MetadataExt::ino(&meta),
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
    fn maps_lines_give_their_paths_once() {
        let maps = b"7f00-7f10 r--s 00000000 fd:01 1234    /models/my model.gguf\n\
            7f10-7f20 r--s 00001000 fd:01 1234    /models/my model.gguf\n\
            7f20-7f30 rw-p 00000000 00:00 0 \n\
            7f30-7f40 r-xp 00000000 fd:01 99 /usr/lib/libc.so.6\n\
            7f40-7f50 r--s 00000000 fd:01 98 /tmp/old.gguf (deleted)\n\
            7ffd-7ffe rw-p 00000000 00:00 0                          [stack]\n";
        assert_eq!(
            files(
                1,
                procfs::FromRead::from_read(&maps[..]).unwrap(),
                OpenVia::Root
            )
            .into_iter()
            .map(|f| f.path)
            .collect::<Vec<_>>(),
            [
                PathBuf::from("/models/my model.gguf"),
                PathBuf::from("/usr/lib/libc.so.6")
            ]
        );
    }

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
