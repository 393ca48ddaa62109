//! Finding the files a process runs: its mapped executables and libraries (`/proc/PID/maps`),
//! opened through `/proc/PID/root` or `/proc/PID/map_files` so processes in other mount
//! namespaces (containers) work, and, for a program not started yet, the libraries the dynamic
//! loader would map. [`inroot`] opens any other file a process names as the process sees it.
//!
//! A mapped file opened through `/proc/PID/root/PATH` is walked from here, so a path changed
//! since it was mapped (a directory mounted over, a symbolic link put in its place) could lead
//! elsewhere: its inode is checked against the maps' before anything of it is read
//! ([`elf::map_elf_checked`]); through `/proc/PID/map_files` it is the mapped object itself.

pub mod elf;
pub mod inroot;

use std::{
    collections::HashSet,
    ffi::OsStr,
    fs,
    io::{self, BufRead},
    os::unix::ffi::OsStrExt,
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
    /// A line of `/proc/PID/maps` is not `START-END PERMS OFFSET MAJOR:MINOR INODE [PATH]`.
    #[error("cannot parse line {line} of /proc/{pid}/maps: {text:?}")]
    MapsLine { pid: u32, line: usize, text: String },
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

/// The file-backed mappings of `pid` (`/proc/PID/maps`), one entry per file, in address order.
/// The one reader of a process's maps in llamaprobe.
pub fn mapped_files(pid: u32) -> Result<Vec<MappedFile>, DiscoverError> {
    mapped_files_via(pid, OpenVia::Root)
}

/// [`mapped_files`], opened `via`.
pub fn mapped_files_via(pid: u32, via: OpenVia) -> Result<Vec<MappedFile>, DiscoverError> {
    let path = PathBuf::from(format!("/proc/{pid}/maps"));
    let file = fs::File::open(&path).map_err(|e| io_error(pid, &path, e))?;
    let root = inroot::RootView::of(pid).unwrap_or(inroot::RootView("/".into()));
    files(pid, io::BufReader::new(file), via, &root).map_err(|e| match e {
        MapsError::Io(e) => io_error(pid, &path, e),
        MapsError::Line(e) => e,
    })
}

/// The files named by the text of a `/proc/PID/maps` (what [`mapped_files_via`] reads): the
/// parsing entry point, for fuzzing and tests. The paths in it are the traced process's to
/// choose (any bytes but NUL; the kernel escapes a newline), so malformed text is an error,
/// never a panic.
pub fn parse_maps(pid: u32, text: &[u8], via: OpenVia) -> Result<Vec<MappedFile>, DiscoverError> {
    files(pid, text, via, &inroot::RootView("/".into())).map_err(|e| match e {
        MapsError::Io(e) => io_error(pid, Path::new("maps text"), e),
        MapsError::Line(e) => e,
    })
}

/// The error of a read of `/proc/PID/...` at `path`.
fn io_error(pid: u32, path: &Path, e: io::Error) -> DiscoverError {
    if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
        return DiscoverError::NoSuchProcess { pid };
    }
    let path = Some(path.to_path_buf());
    DiscoverError::Proc {
        pid,
        error: if e.kind() == io::ErrorKind::PermissionDenied {
            procfs::ProcError::PermissionDenied(path)
        } else {
            procfs::ProcError::Io(e, path)
        },
    }
}

enum MapsError {
    Io(io::Error),
    Line(DiscoverError),
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, PartialEq, Eq)]
struct Mapping<'a> {
    start: u64,
    end: u64,
    major: u32,
    minor: u32,
    inode: u64,
    /// Mapped executable (`--x-`): code.
    exec: bool,
    /// The pathname as the kernel shows it (empty for an anonymous mapping, `[heap]` and the
    /// like for the kernel's own, ` (deleted)` appended to a file that is gone).
    path: &'a [u8],
}

/// The next space-separated field of `rest`, or what is left if there is no space.
fn field<'a>(rest: &mut &'a [u8]) -> &'a [u8] {
    let (f, r) = match rest.iter().position(|&b| b == b' ') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (*rest, &[][..]),
    };
    *rest = r;
    f
}

fn hex<T: TryFrom<u64>>(f: &[u8]) -> Option<T> {
    let s = std::str::from_utf8(f).ok()?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    T::try_from(u64::from_str_radix(s, 16).ok()?).ok()
}

/// Parses one line: `START-END PERMS OFFSET MAJOR:MINOR INODE [PATH]` (see proc_pid_maps(5);
/// the path starts after the padding spaces and runs to the end of the line).
fn parse_line(line: &[u8]) -> Option<Mapping<'_>> {
    let mut rest = line;
    let range = field(&mut rest);
    let dash = range.iter().position(|&b| b == b'-')?;
    let (start, end) = (hex(&range[..dash])?, hex(&range[dash + 1..])?);
    let perms = field(&mut rest);
    let _offset: u64 = hex(field(&mut rest))?;
    let dev = field(&mut rest);
    let colon = dev.iter().position(|&b| b == b':')?;
    let (major, minor) = (hex(&dev[..colon])?, hex(&dev[colon + 1..])?);
    let inode = std::str::from_utf8(field(&mut rest)).ok()?;
    if perms.len() != 4 || inode.is_empty() || !inode.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let inode = inode.parse().ok()?;
    let first = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
    Some(Mapping {
        start,
        end,
        major,
        minor,
        inode,
        exec: perms[2] == b'x',
        path: &rest[first..],
    })
}

/// The files of the maps read from `r`, each once (by inode and path), deleted files left out;
/// paths as the process sees them (inside its `root`, for a chrooted process).
fn files(
    pid: u32,
    r: impl BufRead,
    via: OpenVia,
    root: &inroot::RootView,
) -> Result<Vec<MappedFile>, MapsError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    each_mapping(pid, r, |m| {
        if m.inode == 0 || !m.path.starts_with(b"/") || m.path.ends_with(b" (deleted)") {
            return;
        }
        let path = PathBuf::from(OsStr::from_bytes(m.path));
        if !seen.insert((m.inode, path.clone())) {
            return;
        }
        let path = root.inside(&path);
        let host_path = match via {
            OpenVia::Root => Path::new(&format!("/proc/{pid}/root"))
                .join(path.strip_prefix("/").unwrap_or(&path)),
            OpenVia::MapFiles => {
                PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
            }
        };
        out.push(MappedFile {
            path,
            host_path,
            dev: libc::makedev(m.major, m.minor),
            inode: m.inode,
        });
    })?;
    Ok(out)
}

/// The address ranges `pid` maps executable (`/proc/PID/maps`, in address order): where
/// its code is. An address outside them (a CPU sample's "return address" read from a frame
/// register that held a data pointer) names no function.
pub fn code_ranges(pid: u32) -> Result<Vec<std::ops::Range<u64>>, DiscoverError> {
    let path = PathBuf::from(format!("/proc/{pid}/maps"));
    let file = fs::File::open(&path).map_err(|e| io_error(pid, &path, e))?;
    code_ranges_of(pid, io::BufReader::new(file)).map_err(|e| match e {
        MapsError::Io(e) => io_error(pid, &path, e),
        MapsError::Line(e) => e,
    })
}

fn code_ranges_of(pid: u32, r: impl BufRead) -> Result<Vec<std::ops::Range<u64>>, MapsError> {
    let mut out = Vec::new();
    each_mapping(pid, r, |m| {
        if m.exec {
            out.push(m.start..m.end);
        }
    })?;
    Ok(out)
}

/// Calls `f` with each line of the maps read from `r`, line by line: a process can have tens
/// of thousands of mappings. A line that does not parse is an error.
fn each_mapping(
    pid: u32,
    mut r: impl BufRead,
    mut f: impl FnMut(Mapping<'_>),
) -> Result<(), MapsError> {
    let mut line = Vec::new();
    for n in 1.. {
        line.clear();
        if r.read_until(b'\n', &mut line).map_err(MapsError::Io)? == 0 {
            break;
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        if text.is_empty() {
            continue;
        }
        let m = parse_line(text).ok_or_else(|| {
            MapsError::Line(DiscoverError::MapsLine {
                pid,
                line: n,
                text: String::from_utf8_lossy(&text[..text.len().min(200)]).into_owned(),
            })
        })?;
        f(m);
    }
    Ok(())
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

/// The size of everything `pid` maps, in pages (the first field of `/proc/PID/statm`): a
/// cheap sign that its maps changed (any new mapping changes it, a library loaded later too)
/// without the kernel writing them out. None if the process is gone.
pub fn mapped_pages(pid: u32) -> Option<u64> {
    use io::Read as _;
    // One read of a few bytes: the first field is at most 20 digits.
    let mut buf = [0u8; 32];
    let n = fs::File::open(format!("/proc/{pid}/statm"))
        .ok()?
        .read(&mut buf)
        .ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    text.split_ascii_whitespace().next()?.parse().ok()
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
            parse_maps(1, maps, OpenVia::Root)
                .unwrap()
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
    fn code_ranges_are_the_executable_mappings() {
        let maps = b"7f00-7f10 r--s 00000000 fd:01 1234    /models/my model.gguf\n\
            7f30-7f40 r-xp 00000000 fd:01 99 /usr/lib/libc.so.6\n\
            7f40-7f50 r--p 00010000 fd:01 99 /usr/lib/libc.so.6\n\
            7f60-7f70 rwxp 00000000 00:00 0 \n";
        assert_eq!(
            code_ranges_of(1, &maps[..]).ok().unwrap(),
            [0x7f30..0x7f40, 0x7f60..0x7f70]
        );
        assert!(code_ranges_of(1, &b"7f00 r-xp 0 fd:01 1 /x\n"[..]).is_err());
        let own = code_ranges(std::process::id()).unwrap();
        let here = code_ranges_are_the_executable_mappings as *const () as u64;
        assert!(own.iter().any(|r| r.contains(&here)), "{own:x?}");
    }

    /// Found by the proc_maps fuzz target: the `procfs` crate (0.18) panics on a mapped file
    /// whose path starts with `/SYSV` and is short or not ASCII (`&path[5..13]`), which any
    /// process that can create such a file (root in its container) can map; and it refuses
    /// maps whose paths are not UTF-8. llamaprobe reads the maps itself.
    #[test]
    fn hostile_paths_do_not_break_the_maps() {
        let maps = b"ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  /SYSVcall]\n\
            7f00-7f10 r--s 00000000 fd:01 12 /SYSVcall]\n\
            7f10-7f20 r--p 00000000 fd:01 13 /SYSV\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\n\
            7f20-7f30 r--p 00000000 fd:01 14 /m/\xff\xfe.gguf\n\
            7f30-7f40 r--p 00000000 103:2 15     /m/ two  spaces \n\
            7f40-7f50 rw-p 00000000 00:00 0";
        let files = parse_maps(9, maps, OpenVia::MapFiles).unwrap();
        let paths: Vec<&[u8]> = files
            .iter()
            .map(|f| f.path.as_os_str().as_bytes())
            .collect();
        assert_eq!(
            paths,
            [
                &b"/SYSVcall]"[..],
                b"/SYSV\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9",
                b"/m/\xff\xfe.gguf",
                b"/m/ two  spaces ",
            ]
        );
        assert_eq!(files[0].host_path, Path::new("/proc/9/map_files/7f00-7f10"));
        assert_eq!(files[3].dev, libc::makedev(0x103, 2));
        assert_eq!(files[3].inode, 15);
    }

    #[test]
    fn malformed_maps_lines_are_errors() {
        for bad in [
            &b"garbage"[..],
            b"7f00 r--p 00000000 fd:01 12 /x",
            b"7f00-7f10 r--p 00000000 fd01 12 /x",
            b"7f00-7f10 r--p 00000000 fd:01 -12 /x",
            b"7f00-7f10 r--p zz fd:01 12 /x",
            b"7f00-7f10 rp 00000000 fd:01 12 /x",
            b"7f00-7f10-7f20 r--p 00000000 fd:01 12 /x",
            b"7f00-7f10 r--p 00000000 fd:1ffffffff 12 /x",
            b"17f00000000000000-7f10 r--p 00000000 fd:01 12 /x",
            b"3-0  0 e:0 7 /\0",
        ] {
            let mut text = b"7f00-7f10 r--p 00000000 fd:01 12 /ok\n".to_vec();
            text.extend(bad);
            let err = parse_maps(1, &text, OpenVia::Root).unwrap_err();
            assert!(
                matches!(
                    err,
                    DiscoverError::MapsLine {
                        pid: 1,
                        line: 2,
                        ..
                    }
                ),
                "{}: {err}",
                String::from_utf8_lossy(bad)
            );
        }
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
