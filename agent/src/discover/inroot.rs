//! Opening a file a traced process names as the process sees it, never outside it.
//!
//! A container's paths mean something only inside its root: walked from the host
//! (`/proc/PID/root/models/x.gguf`), an absolute symbolic link in them (`x.gguf ->
//! /etc/shadow`) or enough `..` would be resolved against the host's root and reach a host
//! file. So:
//!
//! - a file the process maps or holds open is opened through its magic link
//!   (`/proc/PID/map_files/START-END`, `/proc/PID/fd/N`): the very object, whatever its path
//!   has become ([`open_object`]);
//! - any other path (a model named on the command line, a model-load event's path, the other
//!   shards of a split model) is resolved with `openat2(2)` from the process's root with
//!   `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`: `..` stops at that root, symbolic links are
//!   followed as the process would follow them but resolved inside its root, magic links
//!   (`/proc/…/root`, `/proc/…/fd/…`) are not followed ([`open_in_root`]). A relative path is
//!   resolved from the process's working directory inside its root. Kernels without `openat2`
//!   (before 5.6, or a seccomp filter refusing it) get a refusal, never an unchecked walk.
//!
//! Either way the object is first opened `O_PATH` (opening a FIFO would block and opening a
//! device has effects of its own), checked with `fstat` (a regular file, within the caller's
//! size limit, and for a mapped file the inode its maps name), and only then opened for
//! reading through `/proc/self/fd`.

use std::{
    ffi::{CString, OsStr},
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::{Component, Path, PathBuf},
};

/// Why a process's file was not opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Nothing at that path inside the process's root.
    #[error("{path}: not found inside the process's root{why}")]
    NotFound { path: PathBuf, why: String },
    /// A FIFO, a device, a socket, a directory, a symbolic link.
    #[error("{path}: not a regular file ({kind}): not read")]
    NotRegular { path: PathBuf, kind: &'static str },
    /// Larger than the reader takes.
    #[error("{path}: {size} bytes, more than the {limit} bytes a {what} may have: not read")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
        what: &'static str,
    },
    /// Not the file the process maps (its path leads elsewhere now).
    #[error(
        "{path}: not the file the process maps (inode {found}, its maps say {expected}): not read"
    )]
    NotTheMappedFile {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    /// Too many symbolic links, or a magic link on the way.
    #[error(
        "{path}: too many symbolic links, or a magic link (/proc/…) on the way, which is not \
         followed: not read"
    )]
    Loop { path: PathBuf },
    /// A relative path, and the process's working directory is not inside its root.
    #[error(
        "{path}: relative, and the process's working directory ({cwd}) is not inside its root \
         ({root}): not read"
    )]
    CwdOutsideRoot {
        path: PathBuf,
        cwd: PathBuf,
        root: PathBuf,
    },
    /// The kernel cannot resolve a path inside another root.
    #[error(
        "{path}: this kernel (or a seccomp filter) has no openat2(2), which llamaprobe needs to \
         open a file inside a process's root without leaving it (Linux 5.6+): not read"
    )]
    NoOpenat2 { path: PathBuf },
    /// Anything else (permissions, the process went).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl OpenError {
    /// The OS error behind it, if it is one (`EACCES` and `EPERM` say "try another way").
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            OpenError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// An open regular file of a process.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    /// The path as the process sees it (absolute; for a magic link, the link).
    pub path: PathBuf,
    pub size: u64,
    pub inode: u64,
}

/// What a file is checked against before it is read.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    /// Largest size the reader takes.
    pub max_size: u64,
    /// What the file should be, for messages ("GGUF model", "ELF file").
    pub what: &'static str,
    /// The inode the process's maps name, if it is a mapped file.
    pub inode: Option<u64>,
}

impl Expect {
    pub fn new(what: &'static str, max_size: u64) -> Self {
        Self {
            max_size,
            what,
            inode: None,
        }
    }

    pub fn inode(self, inode: u64) -> Self {
        Self {
            inode: Some(inode),
            ..self
        }
    }
}

/// Opens a magic link of a process (`/proc/PID/map_files/START-END`, `/proc/PID/fd/N`) or a
/// path of llamaprobe's own: the object it names, checked as [`Expect`] says. Reading another
/// user's `map_files` needs CAP_SYS_ADMIN (or CAP_CHECKPOINT_RESTORE): then an
/// [`OpenError::Io`] with `EPERM`.
pub fn open_object(link: &Path, expect: Expect) -> Result<Opened, OpenError> {
    let io_err = |source| OpenError::Io {
        path: link.to_path_buf(),
        source,
    };
    let c = cstring(link).map_err(io_err)?;
    // SAFETY: a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    // SAFETY: a descriptor just returned by open(2), owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    checked(fd, link, expect)
}

/// Opens `path` as process `pid` sees it: resolved from its root (an absolute path) or its
/// working directory (a relative one) without ever leaving its root, checked as [`Expect`]
/// says.
pub fn open_in_root(pid: u32, path: &Path, expect: Expect) -> Result<Opened, OpenError> {
    let abs = absolute(pid, path)?;
    let fd = resolve(pid, &abs, 0)?;
    checked(fd, &abs, expect)
}

/// `path` made absolute as process `pid` sees it: a relative path joined to the process's
/// working directory inside its root (`..` is left to the resolution, which stops at the root).
pub fn absolute(pid: u32, path: &Path) -> Result<PathBuf, OpenError> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    let io_err = |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let root = RootView::of(pid).map_err(io_err)?;
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).map_err(io_err)?;
    match root.strip(&cwd) {
        Some(cwd) => Ok(cwd.join(path)),
        None => Err(OpenError::CwdOutsideRoot {
            path: path.to_path_buf(),
            cwd,
            root: root.0,
        }),
    }
}

/// The root of a process as this process names it (`readlink /proc/PID/root`): the host's path
/// of a chroot's directory; `/` for a process in another mount namespace, whose paths
/// (`/proc/PID/maps`, `/proc/PID/fd`, `/proc/PID/cwd`) read from here are its own already.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootView(pub PathBuf);

impl RootView {
    pub fn of(pid: u32) -> io::Result<Self> {
        std::fs::read_link(format!("/proc/{pid}/root")).map(Self)
    }

    /// A path read from the process's `/proc` entries (as this process names it) as the
    /// process sees it; `None` if it is not inside the process's root.
    pub fn strip(&self, p: &Path) -> Option<PathBuf> {
        if p.as_os_str().as_bytes().ends_with(b" (deleted)") {
            return None;
        }
        p.strip_prefix(&self.0)
            .ok()
            .map(|rest| Path::new("/").join(rest))
    }

    /// [`RootView::strip`], or the path as it is when it is not inside the root (a file
    /// opened before a chroot: opened through its magic link, never by this path).
    pub fn inside(&self, p: &Path) -> PathBuf {
        self.strip(p).unwrap_or_else(|| p.to_path_buf())
    }
}

/// The `O_PATH` descriptor of absolute `path` resolved inside the root of `pid`.
fn resolve(pid: u32, path: &Path, extra: libc::c_int) -> Result<OwnedFd, OpenError> {
    let io_err = |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let root_c = cstring(Path::new(&format!("/proc/{pid}/root"))).map_err(io_err)?;
    // SAFETY: a NUL-terminated path; the result is checked. Following this one magic link is
    // the point: it is the process's root.
    let root = unsafe {
        libc::open(
            root_c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if root < 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    // SAFETY: a descriptor just returned by open(2), owned here.
    let root = unsafe { OwnedFd::from_raw_fd(root) };
    let rel: PathBuf = path
        .components()
        .filter(|c| !matches!(c, Component::RootDir))
        .collect();
    let rel = if rel.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        rel
    };
    let c = cstring(&rel).map_err(io_err)?;
    match openat2(
        root.as_raw_fd(),
        &c,
        libc::O_PATH | libc::O_CLOEXEC | extra,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    ) {
        Ok(fd) => Ok(fd),
        Err(e) => Err(match e.raw_os_error() {
            Some(libc::ENOSYS) => OpenError::NoOpenat2 {
                path: path.to_path_buf(),
            },
            Some(libc::ENOENT) | Some(libc::ENOTDIR) if extra == 0 => OpenError::NotFound {
                path: path.to_path_buf(),
                why: why_not_found(pid, path),
            },
            Some(libc::ELOOP) => OpenError::Loop {
                path: path.to_path_buf(),
            },
            _ => io_err(e),
        }),
    }
}

/// What a path that is not found inside its root is: a symbolic link whose target is not
/// there, or a path climbing out with `..`.
fn why_not_found(pid: u32, path: &Path) -> String {
    if let Ok(fd) = resolve(pid, path, libc::O_NOFOLLOW) {
        if let Some(target) = link_target(&fd) {
            return format!(
                " (a symbolic link to {}, which is resolved inside the process's root and is \
                 not there)",
                target.display()
            );
        }
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return " (`..` stops at the process's root)".into();
    }
    String::new()
}

/// The target of the symbolic link `fd` (opened `O_PATH | O_NOFOLLOW`), if it is one.
fn link_target(fd: &OwnedFd) -> Option<PathBuf> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: an empty path with an O_PATH descriptor reads that link (readlinkat(2));
    // the buffer is valid for its length.
    let n = unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(PathBuf::from(OsStr::from_bytes(&buf)))
}

/// `openat2(2)`, retried on `EAGAIN` (a concurrent rename or mount seen during the walk) and
/// `EINTR`.
fn openat2(dirfd: RawFd, path: &CString, flags: libc::c_int, resolve: u64) -> io::Result<OwnedFd> {
    // SAFETY: open_how is plain data; all zero is "no flags".
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = resolve;
    let mut tries = 0;
    loop {
        // SAFETY: valid descriptor, NUL-terminated path, open_how of the size passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if r >= 0 {
            // SAFETY: a descriptor just returned by openat2(2), owned here.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) });
        }
        let e = io::Error::last_os_error();
        tries += 1;
        match e.raw_os_error() {
            Some(libc::EINTR) | Some(libc::EAGAIN) if tries < 16 => continue,
            _ => return Err(e),
        }
    }
}

/// Checks the object of `fd` (`O_PATH`) and opens it for reading.
fn checked(fd: OwnedFd, path: &Path, expect: Expect) -> Result<Opened, OpenError> {
    let io_err = |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let st = fstat(&fd).map_err(io_err)?;
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => None,
        libc::S_IFIFO => Some("a FIFO"),
        libc::S_IFCHR => Some("a character device"),
        libc::S_IFBLK => Some("a block device"),
        libc::S_IFSOCK => Some("a socket"),
        libc::S_IFDIR => Some("a directory"),
        libc::S_IFLNK => Some("a symbolic link"),
        _ => Some("an unknown kind of file"),
    };
    if let Some(kind) = kind {
        return Err(OpenError::NotRegular {
            path: path.to_path_buf(),
            kind,
        });
    }
    if let Some(expected) = expect.inode {
        if st.st_ino != expected {
            return Err(OpenError::NotTheMappedFile {
                path: path.to_path_buf(),
                found: st.st_ino,
                expected,
            });
        }
    }
    let size = st.st_size as u64;
    if size > expect.max_size {
        return Err(OpenError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit: expect.max_size,
            what: expect.what,
        });
    }
    // Reopened for reading through our own descriptor: the object checked above, no path
    // walked again.
    let c = cstring(Path::new(&format!("/proc/self/fd/{}", fd.as_raw_fd()))).map_err(io_err)?;
    // SAFETY: a NUL-terminated path; the result is checked.
    let r = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK,
        )
    };
    if r < 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    // SAFETY: a descriptor just returned by open(2), owned by the File.
    let file = unsafe { File::from_raw_fd(r) };
    Ok(Opened {
        file,
        path: path.to_path_buf(),
        size,
        inode: st.st_ino,
    })
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data, filled by fstat(2) on a valid descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("llamaprobe-inroot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn own_files_open_in_root_and_non_regular_ones_are_refused() {
        let me = std::process::id();
        let d = dir("own");
        let f = d.join("a.gguf");
        std::fs::write(&f, b"GGUFdata").unwrap();
        let mut o = open_in_root(me, &f, Expect::new("test file", 100)).unwrap();
        let mut s = String::new();
        o.file.read_to_string(&mut s).unwrap();
        assert_eq!(s, "GGUFdata");
        assert_eq!(o.size, 8);

        let err = open_in_root(me, &f, Expect::new("test file", 4)).unwrap_err();
        assert!(matches!(err, OpenError::TooLarge { size: 8, .. }), "{err}");
        let err = open_in_root(me, &d, Expect::new("test file", 100)).unwrap_err();
        assert!(
            err.to_string().contains("not a regular file (a directory)"),
            "{err}"
        );
        let err =
            open_in_root(me, Path::new("/dev/null"), Expect::new("test file", 100)).unwrap_err();
        assert!(
            err.to_string()
                .contains("not a regular file (a character device)"),
            "{err}"
        );
        let fifo = d.join("fifo");
        let c = cstring(&fifo).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = open_in_root(me, &fifo, Expect::new("test file", 100)).unwrap_err();
        assert!(
            err.to_string().contains("not a regular file (a FIFO)"),
            "{err}"
        );
        let err = open_in_root(me, &d.join("missing"), Expect::new("test file", 100)).unwrap_err();
        assert!(matches!(err, OpenError::NotFound { .. }), "{err}");
        // A magic link is not followed.
        let err = open_in_root(
            me,
            Path::new(&format!("/proc/{me}/root{}", f.display())),
            Expect::new("test file", 100),
        )
        .unwrap_err();
        assert!(matches!(err, OpenError::Loop { .. }), "{err}");
        // A symbolic link to a missing file says so.
        std::os::unix::fs::symlink("/nonexistent/x.gguf", d.join("link.gguf")).unwrap();
        let err =
            open_in_root(me, &d.join("link.gguf"), Expect::new("test file", 100)).unwrap_err();
        assert!(
            err.to_string()
                .contains("a symbolic link to /nonexistent/x.gguf"),
            "{err}"
        );
        // The inode of a mapped file is checked.
        let ino = o.inode;
        let err = open_in_root(me, &f, Expect::new("test file", 100).inode(ino + 1)).unwrap_err();
        assert!(matches!(err, OpenError::NotTheMappedFile { .. }), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn relative_paths_start_at_the_working_directory() {
        let me = std::process::id();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(absolute(me, Path::new("x/y")).unwrap(), cwd.join("x/y"));
        assert_eq!(absolute(me, Path::new("/x")).unwrap(), Path::new("/x"));
    }
}
