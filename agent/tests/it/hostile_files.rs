//! Files of a process in a container are read as the container sees them, never outside it.
//!
//! Each test builds a fake container: a directory used as the root of a real process
//! (`chroot DIR /target …`, and `unshare --mount` for the one that mounts over its model), the
//! process a small static C program (`tests/hostile/target.c`) that only looks like llama.cpp
//! as far as finding its model goes (`-m PATH`, optionally the file mapped). Beside the root
//! lies a host-only GGUF file whose architecture is `hostonlyarch`: a model path of the
//! container that is a symbolic link to it, or climbs to it with `..`, must be refused with the
//! reason, and that file must never be opened (an inotify watch on it sees no open and no
//! read) nor its architecture appear in any result. A FIFO, a device node and a directory at
//! the model path are refused as not regular files (the FIFO without blocking), a 100 GB
//! sparse file claiming a 2^40-byte string is refused at once, and the real tiny model inside
//! the root is read.
//!
//! The tests call the library's functions that take a pid (`sources::recover_model`,
//! `sources::model_from_load`, `sources::model_path::search`, `resolve::resolve_file`) on
//! that process: `llamaprobe attach --pid` would stop earlier, at "not a llama.cpp process",
//! since no libllama is mapped in such a root (a container holding a real llama.cpp is what
//! the host agent's container tests run).

use std::{
    ffi::CString,
    io::{BufRead, BufReader},
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use crate::common::{fixture_or_skip, root_or_skip, scratch};
use llamaprobe::{
    discover,
    sources::{
        self,
        gguf::{self, writer::Writer},
        model_path::{self, Source},
        ResourceError,
    },
};

/// The architecture of the host-only file: never to be seen.
const HOST_ONLY: &str = "hostonlyarch";

/// The target program, built once per test binary.
fn target() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hostile-target");
        std::fs::create_dir_all(&dir).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile/target.c");
        let tmp = dir.join(format!("target.{}", std::process::id()));
        let out = Command::new("gcc")
            .args(["-static", "-O1", "-Wall", "-o"])
            .arg(&tmp)
            .arg(&src)
            .output()
            .expect("run gcc");
        assert!(
            out.status.success(),
            "gcc -static {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = dir.join("target");
        std::fs::rename(&tmp, &bin).unwrap();
        bin
    })
}

/// A fake container: `root` (with `/target` and `/models`) and, beside it, `host` holding the
/// host-only model.
struct Container {
    root: PathBuf,
    host_only: PathBuf,
}

impl Container {
    fn new(name: &str) -> Self {
        let dir = scratch(&format!("hostile/{name}"));
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("models")).unwrap();
        std::fs::copy(target(), root.join("target")).unwrap();
        std::fs::create_dir_all(dir.join("host")).unwrap();
        let host_only = dir.join("host/host-only.gguf");
        let mut w = Writer::new();
        w.string("general.architecture", HOST_ONLY)
            .string("general.name", "host only, never to be read")
            .u32(&format!("{HOST_ONLY}.context_length"), 777)
            .tensor("secret.weight", &[3, 3]);
        std::fs::write(&host_only, w.bytes(w.data_len())).unwrap();
        Self { root, host_only }
    }

    /// `path` inside the root, from here.
    fn at(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Runs `/target ARGS` chrooted into the root (under `unshare --mount` when `own_mounts`)
    /// and waits until it says it is ready.
    fn run(&self, args: &[&str], own_mounts: bool) -> Kid {
        let mut cmd = if own_mounts {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "chroot"]);
            c
        } else {
            Command::new("chroot")
        };
        cmd.arg(&self.root)
            .arg("/target")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut kid = Kid(cmd.spawn().expect("run chroot"));
        let mut out = BufReader::new(kid.0.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the target did not start: {args:?}");
        kid
    }
}

/// A child process (killed on drop).
struct Kid(Child);

impl Kid {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An inotify watch on a file: was it opened or read?
struct Watch(std::os::fd::OwnedFd);

impl Watch {
    fn new(path: &Path) -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscalls; results checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a descriptor just returned, owned here.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid descriptor and NUL-terminated path.
        let wd = unsafe {
            libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_OPEN | libc::IN_ACCESS)
        };
        assert!(
            wd >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
        Self(fd)
    }

    /// The events since the watch began (IN_OPEN, IN_ACCESS masks).
    fn events(&self) -> Vec<u32> {
        let mut buf = [0u8; 4096];
        // SAFETY: valid descriptor and buffer.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let mut out = Vec::new();
        let mut at = 0usize;
        let head = std::mem::size_of::<libc::inotify_event>();
        while n > 0 && at + head <= n as usize {
            // SAFETY: the kernel wrote whole inotify_event records; read unaligned.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
            out.push(ev.mask);
            at += head + ev.len as usize;
        }
        out
    }

    /// Fails if the file was opened or read.
    fn assert_untouched(&self, what: &str) {
        let ev = self.events();
        assert!(
            ev.is_empty(),
            "{what}: the host-only file was opened or read (inotify masks {ev:x?})"
        );
    }
}

/// An error and its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// Everything the library says about the model of `pid`: the files it found and refused,
/// the recovered model (or why not), and `model_from_load` of `path`; all of it is checked not
/// to mention the host-only file's content.
fn everything(pid: u32, path: &str) -> (model_path::Found, String, String) {
    let found = model_path::search(pid).unwrap();
    let recovered = match sources::recover_model(pid) {
        Ok(r) => format!("{r:?}"),
        Err(e) => chain(&e),
    };
    let loaded = match sources::model_from_load(pid, Path::new(path)) {
        Ok(info) => format!("{info:?}"),
        Err(e) => chain(&e),
    };
    for said in [&format!("{found:?}"), &recovered, &loaded] {
        assert!(
            !said.contains(HOST_ONLY) && !said.contains("never to be read"),
            "the host-only file's content appears: {said}"
        );
    }
    (found, recovered, loaded)
}

/// `path` named with `-m` is refused, with `reason` in every answer, and the host-only file is
/// never touched.
fn refused(c: &Container, path: &str, reason: &str) {
    let watch = Watch::new(&c.host_only);
    let kid = c.run(&["-m", path], false);
    let started = Instant::now();
    // On a thread: a FIFO opened for reading would block it forever.
    let (tx, rx) = std::sync::mpsc::channel();
    let (pid, p) = (kid.pid(), path.to_string());
    std::thread::spawn(move || {
        let _ = tx.send(everything(pid, &p));
    });
    let (found, recovered, loaded) = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{path}: no answer in 20 s (blocked on the file?)"));
    let took = started.elapsed();
    assert!(found.models.is_empty(), "{path}: {found:?}");
    assert_eq!(found.refused.len(), 1, "{path}: {found:?}");
    let why = found.refused[0].1.to_string();
    assert!(why.contains(reason), "{path}: {why}");
    assert!(
        recovered.starts_with("model ") && recovered.contains(reason),
        "{path}: {recovered}"
    );
    assert!(loaded.contains(reason), "{path}: {loaded}");
    assert!(took < Duration::from_secs(5), "{path}: took {took:?}");
    watch.assert_untouched(path);
}

#[test]
fn a_real_model_inside_the_root_is_read() {
    if !root_or_skip("a_real_model_inside_the_root_is_read") {
        return;
    }
    let Some(model) = fixture_or_skip("a_real_model_inside_the_root_is_read", "LLAMAPROBE_MODEL")
    else {
        return;
    };
    let want = gguf::read(&model).unwrap();
    let c = Container::new("real");
    std::fs::copy(&model, c.at("/models/real.gguf")).unwrap();
    let watch = Watch::new(&c.host_only);

    // Named, absolute and relative (the working directory is the root's /).
    for (arg, mapped) in [
        ("/models/real.gguf", false),
        ("models/real.gguf", false),
        ("/models/real.gguf", true),
    ] {
        let args: &[&str] = if mapped {
            &["-m", arg, "--map"]
        } else {
            &["-m", arg]
        };
        let kid = c.run(args, false);
        let pid = kid.pid();
        let (found, _, _) = everything(pid, arg);
        assert!(found.refused.is_empty(), "{arg}: {found:?}");
        assert_eq!(found.models.len(), 1, "{arg}: {found:?}");
        let m = &found.models[0];
        assert_eq!(m.path, Path::new("/models/real.gguf"), "{arg}");
        if mapped {
            assert_eq!(m.source, Source::Mapped);
            // The object mapped, through map_files.
            let object = m.object.as_ref().unwrap().to_string_lossy().into_owned();
            assert!(
                object.starts_with(&format!("/proc/{pid}/map_files/")),
                "{object}"
            );
        } else {
            assert_eq!(m.source, Source::Argument);
            assert_eq!(m.object, None);
        }
        let (_, info) = sources::recover_model(pid).unwrap().unwrap();
        assert_eq!(info.path, Path::new("/models/real.gguf"));
        assert_eq!(info.architecture, want.architecture, "{arg}");
        assert_eq!(info.parameters, want.parameters, "{arg}");
        assert_eq!(info.size_bytes, want.size_bytes, "{arg}");
        let loaded = sources::model_from_load(pid, Path::new(arg)).unwrap();
        assert_eq!(loaded.path, Path::new("/models/real.gguf"));
        assert_eq!(loaded.architecture, want.architecture);
    }
    watch.assert_untouched("the real model");
}

#[test]
fn a_model_path_that_is_a_symlink_to_a_host_file_is_refused() {
    if !root_or_skip("a_model_path_that_is_a_symlink_to_a_host_file_is_refused") {
        return;
    }
    let c = Container::new("symlink");
    // Absolute: from the host's root it is the host-only file.
    std::os::unix::fs::symlink(&c.host_only, c.at("/models/x.gguf")).unwrap();
    refused(
        &c,
        "/models/x.gguf",
        &format!(
            "/models/x.gguf: not found inside the process's root (a symbolic link to {}",
            c.host_only.display()
        ),
    );
    // Relative, climbing out of the root.
    std::os::unix::fs::symlink("../../host/host-only.gguf", c.at("/models/y.gguf")).unwrap();
    refused(&c, "/models/y.gguf", "not found inside the process's root");
}

#[test]
fn a_dotdot_path_stops_at_the_root() {
    if !root_or_skip("a_dotdot_path_stops_at_the_root") {
        return;
    }
    let c = Container::new("dotdot");
    // From the root's / (the process's working directory), one `..` from the host's view is
    // the directory holding `host/`.
    for path in [
        "../host/host-only.gguf",
        "../../../../../../../../host/host-only.gguf",
        "/../host/host-only.gguf",
        "/models/../../host/host-only.gguf",
    ] {
        refused(
            &c,
            path,
            "not found inside the process's root (`..` stops at the process's root)",
        );
    }
}

#[test]
fn a_fifo_at_the_model_path_is_refused_without_blocking() {
    if !root_or_skip("a_fifo_at_the_model_path_is_refused_without_blocking") {
        return;
    }
    let c = Container::new("fifo");
    let st = Command::new("mkfifo")
        .arg(c.at("/models/fifo.gguf"))
        .status()
        .unwrap();
    assert!(st.success());
    refused(&c, "/models/fifo.gguf", "not a regular file (a FIFO)");
}

#[test]
fn a_device_node_or_a_directory_at_the_model_path_is_refused() {
    if !root_or_skip("a_device_node_or_a_directory_at_the_model_path_is_refused") {
        return;
    }
    let c = Container::new("device");
    // /dev/null's numbers: opening it would succeed and read nothing, silently.
    let st = Command::new("mknod")
        .arg(c.at("/models/dev.gguf"))
        .args(["c", "1", "3"])
        .status()
        .unwrap();
    assert!(st.success());
    refused(
        &c,
        "/models/dev.gguf",
        "not a regular file (a character device)",
    );
    std::fs::create_dir(c.at("/models/dir.gguf")).unwrap();
    refused(&c, "/models/dir.gguf", "not a regular file (a directory)");
}

#[test]
fn a_100_gb_sparse_model_claiming_a_huge_string_is_refused_at_once() {
    if !root_or_skip("a_100_gb_sparse_model_claiming_a_huge_string_is_refused_at_once") {
        return;
    }
    let c = Container::new("sparse");
    let mut w = Writer::new();
    w.string("general.architecture", "llama");
    let mut head = w.bytes(0);
    // header 24 + key (8 + 20) + type 4 = 56: the value's length, 2^40 bytes.
    head[56..64].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let path = c.at("/models/huge.gguf");
    std::fs::write(&path, &head).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(100 << 30)
        .unwrap();
    let kid = c.run(&["-m", "/models/huge.gguf"], false);
    let started = Instant::now();
    let (found, recovered, loaded) = everything(kid.pid(), "/models/huge.gguf");
    let took = started.elapsed();
    // Found (it is a regular file named as a model), and its metadata refused.
    assert_eq!(found.models.len(), 1, "{found:?}");
    let reason = "implausible GGUF: string value is 1099511627776 (limit 67108864)";
    for said in [&recovered, &loaded] {
        assert!(
            said.starts_with("model /models/huge.gguf") && said.contains(reason),
            "{said}"
        );
    }
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn a_mapped_model_whose_path_now_leads_to_a_host_file_is_read_as_mapped() {
    let test = "a_mapped_model_whose_path_now_leads_to_a_host_file_is_read_as_mapped";
    if !root_or_skip(test) {
        return;
    }
    let Some(model) = fixture_or_skip(test, "LLAMAPROBE_MODEL") else {
        return;
    };
    let want = gguf::read(&model).unwrap();
    let c = Container::new("covered");
    std::fs::copy(&model, c.at("/models/real.gguf")).unwrap();
    let watch = Watch::new(&c.host_only);
    // The target maps /models/real.gguf, then mounts a tmpfs over /models (in its own mount
    // namespace) holding /models/real.gguf -> the host-only file's host path: walked from the
    // host through /proc/PID/root, the mapped file's path now reaches the host file.
    let host_only = c.host_only.to_string_lossy().into_owned();
    let kid = c.run(
        &["-m", "/models/real.gguf", "--map", "--cover", &host_only],
        true,
    );
    let pid = kid.pid();
    let (found, recovered, _) = everything(pid, "/models/real.gguf");
    assert_eq!(found.models.len(), 1, "{found:?}");
    assert_eq!(found.models[0].source, Source::Mapped);
    assert_eq!(found.models[0].path, Path::new("/models/real.gguf"));
    assert!(recovered.contains(&format!("{:?}", want.architecture.as_deref().unwrap())));
    let (_, info) = sources::recover_model(pid).unwrap().unwrap();
    assert_eq!(info.architecture, want.architecture);
    assert_eq!(info.parameters, want.parameters);
    // The path itself, as a model-load event would name it, is refused inside the root.
    match sources::model_from_load(pid, Path::new("/models/real.gguf")) {
        Err(ResourceError::Refused(e)) => assert!(
            e.to_string()
                .contains("not found inside the process's root"),
            "{e}"
        ),
        r => panic!("{r:?}"),
    }
    watch.assert_untouched("the covered model");
    // The mapped file opened as a program would be through /proc/PID/root (discover's
    // default): its inode is not the mapped one, so nothing of it is read.
    let f = discover::mapped_files(pid)
        .unwrap()
        .into_iter()
        .find(|f| f.path == Path::new("/models/real.gguf"))
        .expect("the mapped model in the maps");
    let err = llamaprobe::resolve::resolve_file(&f, None).unwrap_err();
    assert!(
        chain(&err).contains("not the file the process maps"),
        "{}",
        chain(&err)
    );
    // (Walked from the host, the path reached the host-only file: opened O_PATH, which
    // inotify does not see, and never read.)
    watch.assert_untouched("the mapped file opened as a program");
}
