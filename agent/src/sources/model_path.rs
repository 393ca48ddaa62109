//! Recovering the model file of a llama.cpp process that loaded it before llamaprobe attached.
//!
//! llama.cpp mmaps the model (`/proc/PID/maps`); with `--no-mmap` it reads it and closes it, so
//! the open files (`/proc/PID/fd`) and finally the command line (`-m`/`--model PATH`) or the
//! environment (`LLAMA_ARG_MODEL`) are looked at too. A file counts as a model if its name ends
//! in `.gguf` or it starts with the GGUF magic (Ollama's blobs have no extension).
//!
//! Files are read as the process sees them, never outside it ([`crate::discover::inroot`]): a
//! mapped model through `/proc/PID/map_files/START-END` and an open one through
//! `/proc/PID/fd/N` (the very object; without the privilege `map_files` needs, the path inside
//! the process's root, checked to be the mapped inode), a named one resolved inside the
//! process's root (a relative path from its working directory there). Only regular files are
//! opened for reading. A file the process names or maps as a model that cannot be opened so is
//! refused with the reason ([`Found::refused`]).

use std::{
    collections::HashSet,
    ffi::OsStr,
    fs,
    io::Read,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use crate::discover::inroot::{self, OpenError, Opened};

/// Errors of looking for the model of a process.
#[derive(Debug, thiserror::Error)]
pub enum ModelPathError {
    /// The process does not exist.
    #[error("no process with pid {pid}")]
    NoSuchProcess { pid: u32 },
    /// Neither the mappings nor the open files of the process could be read.
    #[error("{source}")]
    Proc {
        pid: u32,
        #[source]
        source: crate::discover::DiscoverError,
    },
}

/// Where a model file was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Mapped into the process (`/proc/PID/maps`).
    Mapped,
    /// Open in the process (`/proc/PID/fd`).
    Open,
    /// Named by the command line or the environment.
    Argument,
}

/// A model file of a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelPath {
    /// The process.
    pub pid: u32,
    /// The path as the process sees it (absolute, inside its root).
    pub path: PathBuf,
    /// The object itself, for a mapped or open file: `/proc/PID/map_files/START-END` or
    /// `/proc/PID/fd/N`. `None`: `path` is opened inside the process's root.
    pub object: Option<PathBuf>,
    /// The inode the process's maps name (a mapped file).
    pub inode: Option<u64>,
    pub source: Source,
}

impl ModelPath {
    /// The model label used by llamaprobe's metrics: the file stem.
    pub fn label(&self) -> String {
        label(&self.path)
    }

    /// Opens the file for reading, as the process sees it ([`crate::discover::inroot`]):
    /// a regular file of at most [`super::gguf::MAX_FILE_BYTES`].
    pub fn open(&self) -> Result<Opened, OpenError> {
        open_model(self.pid, &self.path, self.object.as_deref(), self.inode)
    }
}

/// What [`search`] found: the model files, the most likely first, and the files the process
/// maps, holds or names as a model that were refused, with why.
#[derive(Debug, Default)]
pub struct Found {
    pub models: Vec<ModelPath>,
    pub refused: Vec<(PathBuf, OpenError)>,
}

/// The model label of a path: its file stem (`models/qwen2-7b.Q4_K_M.gguf` → `qwen2-7b.Q4_K_M`),
/// [sanitized](super::identity::sanitize_label): the process chose the path.
pub fn label(path: &Path) -> String {
    path.file_stem()
        .map(|s| super::identity::sanitize_label(&s.to_string_lossy()))
        .unwrap_or_default()
}

/// Opens a model file of `pid`: `object` (a magic link) when given, else (or when that needs
/// a privilege llamaprobe lacks) `path` inside the process's root, checked against `inode`.
fn open_model(
    pid: u32,
    path: &Path,
    object: Option<&Path>,
    inode: Option<u64>,
) -> Result<Opened, OpenError> {
    let expect = match inode {
        Some(i) => super::gguf::expect().inode(i),
        None => super::gguf::expect(),
    };
    if let Some(object) = object {
        match inroot::open_object(object, expect) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {}
            r => return r,
        }
    }
    inroot::open_in_root(pid, path, expect)
}

/// The model files of `pid`, the most likely first ([`search`]); empty if none is found.
pub fn find(pid: u32) -> Result<Vec<ModelPath>, ModelPathError> {
    search(pid).map(|f| f.models)
}

/// The model files of `pid`, the most likely first: mapped files in address order, then open
/// files, then the `-m`/`--model` argument or `LLAMA_ARG_MODEL`; later shards of a split model
/// and multimodal projectors (`mmproj*`) after the rest. Beside them, the refused ones.
pub fn search(pid: u32) -> Result<Found, ModelPathError> {
    let mut found = Found::default();
    let mut seen = HashSet::new();
    let root = inroot::RootView::of(pid).unwrap_or(inroot::RootView("/".into()));
    let mut add = |found: &mut Found, c: ModelPath, named: bool| {
        if seen.contains(&c.path) {
            return;
        }
        let gguf_name = is_gguf_name(&c.path);
        match c.open() {
            Ok(mut o) => {
                if named || gguf_name || has_gguf_magic(&mut o.file) {
                    seen.insert(c.path.clone());
                    found.models.push(c);
                }
            }
            Err(e) => {
                if named || gguf_name {
                    seen.insert(c.path.clone());
                    found.refused.push((c.path, e));
                }
            }
        }
    };

    // The process's maps, through discover's one reader of them.
    let maps_err = match crate::discover::mapped_files_via(pid, crate::discover::OpenVia::MapFiles)
    {
        Ok(files) => {
            for f in files {
                let c = ModelPath {
                    pid,
                    path: f.path,
                    object: Some(f.host_path),
                    inode: Some(f.inode),
                    source: Source::Mapped,
                };
                add(&mut found, c, false);
            }
            None
        }
        Err(crate::discover::DiscoverError::NoSuchProcess { .. }) => {
            return Err(ModelPathError::NoSuchProcess { pid })
        }
        Err(e) => Some(e),
    };

    match procfs::process::Process::new(pid as i32).and_then(|p| p.fd()) {
        Ok(fds) => {
            for fd in fds.flatten() {
                if let procfs::process::FDTarget::Path(target) = fd.target {
                    if is_plain_file_path(&target) {
                        let c = ModelPath {
                            pid,
                            path: root.inside(&target),
                            object: Some(PathBuf::from(format!("/proc/{pid}/fd/{}", fd.fd))),
                            inode: None,
                            source: Source::Open,
                        };
                        add(&mut found, c, false);
                    }
                }
            }
        }
        Err(e) => {
            if let Some(source) = maps_err {
                return Err(match e {
                    procfs::ProcError::NotFound(_) => ModelPathError::NoSuchProcess { pid },
                    _ => ModelPathError::Proc { pid, source },
                });
            }
        }
    }

    let mut named = fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .and_then(|c| model_argument(&c));
    if named.is_none() {
        named = fs::read(format!("/proc/{pid}/environ"))
            .ok()
            .and_then(|e| model_env(&e));
    }
    if let Some(p) = named {
        match inroot::absolute(pid, &p) {
            Ok(path) => {
                let c = ModelPath {
                    pid,
                    path,
                    object: None,
                    inode: None,
                    source: Source::Argument,
                };
                add(&mut found, c, true);
            }
            Err(e) => found.refused.push((p, e)),
        }
    }
    // Stable: the order of discovery is kept within each group.
    found.models.sort_by_key(|m| secondary(&m.path));
    Ok(found)
}

fn is_plain_file_path(p: &Path) -> bool {
    let b = p.as_os_str().as_bytes();
    b.starts_with(b"/")
        && !b.ends_with(b" (deleted)")
        && !["/dev/", "/proc/", "/sys/"]
            .iter()
            .any(|d| b.starts_with(d.as_bytes()))
}

fn is_gguf_name(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(OsStr::new("gguf")))
}

/// True if the file (a regular file, opened) starts with `GGUF`.
fn has_gguf_magic(f: &mut fs::File) -> bool {
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic).is_ok() && &magic == b"GGUF"
}

/// True for files less likely to be "the" model: later shards of a split model
/// (`-0000N-of-0000M.gguf`, N > 1) and multimodal projectors.
fn secondary(p: &Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if name.starts_with("mmproj") {
        return true;
    }
    // "...-00002-of-00003.gguf"
    let Some(stem) = name.strip_suffix(".gguf") else {
        return false;
    };
    let Some((head, total)) = stem.rsplit_once("-of-") else {
        return false;
    };
    let Some((_, no)) = head.rsplit_once('-') else {
        return false;
    };
    let five_digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    five_digits(no) && five_digits(total) && no != "00001"
}

/// The value of `-m PATH`, `--model PATH` or `--model=PATH` in a NUL-separated command line.
/// Public as a parsing entry point (fuzzing).
pub fn model_argument(cmdline: &[u8]) -> Option<PathBuf> {
    let args: Vec<&[u8]> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .collect();
    let mut found = None;
    for (i, a) in args.iter().enumerate() {
        if *a == b"-m" || *a == b"--model" {
            if let Some(v) = args.get(i + 1) {
                found = Some(*v);
            }
        } else if let Some(v) = a.strip_prefix(b"--model=") {
            found = Some(v);
        }
    }
    found
        .filter(|v| !v.is_empty())
        .map(|v| PathBuf::from(OsStr::from_bytes(v)))
}

/// `LLAMA_ARG_MODEL` (llama.cpp's environment form of `--model`) in a NUL-separated environment.
/// Public as a parsing entry point (fuzzing).
pub fn model_env(environ: &[u8]) -> Option<PathBuf> {
    environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"LLAMA_ARG_MODEL="))
        .filter(|v| !v.is_empty())
        .map(|v| PathBuf::from(OsStr::from_bytes(v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_arguments_and_environment() {
        let c = |s: &str| s.replace(' ', "\0").into_bytes();
        assert_eq!(
            model_argument(&c("llama-server -c 512 -m models/x.gguf --port 1")),
            Some(PathBuf::from("models/x.gguf"))
        );
        assert_eq!(
            model_argument(&c("llama-cli --model=/m/y.gguf")),
            Some(PathBuf::from("/m/y.gguf"))
        );
        assert_eq!(model_argument(&c("llama-server -m")), None);
        assert_eq!(model_argument(b""), None);
        assert_eq!(
            model_env(b"PATH=/bin\0LLAMA_ARG_MODEL=/m/z.gguf\0"),
            Some(PathBuf::from("/m/z.gguf"))
        );
    }

    /// Found by the proc_maps and cgroup fuzz targets: paths a process chose (a mapped file's,
    /// its `--model` argument) gave labels with control characters.
    #[test]
    fn labels_of_hostile_paths_are_sanitized() {
        let maps = b"7f00-7f10 r--p 00000000 fd:01 7 /m/tiny\x01\x1b.gguf\n\
                     7f10-7f20 r--p 00000000 fd:01 8 /\x7f\n";
        let files = crate::discover::parse_maps(1, maps, crate::discover::OpenVia::Root).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(label(&files[0].path), "tiny");
        assert_eq!(label(&files[1].path), "");
        let path = model_argument(b"--model=\n").unwrap();
        assert_eq!(label(&path), "");
        let path = model_argument(b"-m\0/m/a\x01b\tc.gguf").unwrap();
        assert_eq!(label(&path), "abc");
    }

    #[test]
    fn later_shards_and_projectors_come_last() {
        assert!(secondary(Path::new("/m/x-00002-of-00003.gguf")));
        assert!(!secondary(Path::new("/m/x-00001-of-00003.gguf")));
        assert!(secondary(Path::new("/m/mmproj-model-f16.gguf")));
        assert!(!secondary(Path::new("/m/model.gguf")));
        assert!(!secondary(Path::new("/m/a.gguf")));
    }

    #[test]
    fn labels_are_file_stems() {
        assert_eq!(
            label(Path::new("/m/qwen2-7b.Q4_K_M.gguf")),
            "qwen2-7b.Q4_K_M"
        );
        assert_eq!(label(Path::new("/")), "");
        let hostile = format!("/m/\u{202e}{}\n.gguf", "q".repeat(300));
        let l = label(Path::new(&hostile));
        assert_eq!(l, "q".repeat(crate::sources::identity::LABEL_MAX_CHARS));
    }

    #[test]
    fn missing_pid_is_reported_as_such() {
        assert!(matches!(
            find(4_999_999),
            Err(ModelPathError::NoSuchProcess { pid: 4_999_999 })
        ));
    }
}
