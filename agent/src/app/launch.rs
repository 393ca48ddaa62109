//! `llamaprobe run`: starts the program held before `exec`, so the probes are attached before
//! its first instruction, then lets it go.
//!
//! `std::process::Command::spawn` returns only after the child has exec'd, so the hold is done
//! with a plain fork: the child blocks reading a pipe, the agent attaches (uprobes filter by
//! process, and the pid survives exec), then writes one byte and the child execs.

use std::{
    ffi::{CString, OsString},
    os::unix::ffi::OsStrExt,
    path::Path,
};

/// A started, held program.
pub struct Held {
    pub pid: u32,
    /// File name of the program.
    pub name: String,
    release_fd: libc::c_int,
}

fn cstring(s: &[u8]) -> anyhow::Result<CString> {
    CString::new(s).map_err(|_| anyhow::anyhow!("argument contains a NUL byte"))
}

/// Forks a child that will exec `exe` with `args` (argv\[0\] included) once released.
pub fn spawn_held(exe: &Path, args: &[OsString]) -> anyhow::Result<Held> {
    let path = cstring(exe.as_os_str().as_bytes())?;
    let argv: Vec<CString> = args
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<anyhow::Result<_>>()?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let (read_fd, write_fd) = (fds[0], fds[1]);
    // SAFETY: the child only calls async-signal-safe functions (close, read, execv, _exit)
    // on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if pid == 0 {
        unsafe {
            libc::close(write_fd);
            let mut b = 0u8;
            let n = libc::read(read_fd, (&mut b as *mut u8).cast(), 1);
            if n != 1 {
                // The agent gave up (attach failed): never run the program unprobed.
                libc::_exit(126);
            }
            libc::execv(path.as_ptr(), argv_ptrs.as_ptr());
            libc::_exit(127);
        }
    }
    // SAFETY: closing our copy of the read end.
    unsafe { libc::close(read_fd) };
    Ok(Held {
        pid: pid as u32,
        name: exe
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        release_fd: write_fd,
    })
}

impl Held {
    /// Lets the child exec.
    pub fn release(&mut self) {
        if self.release_fd >= 0 {
            // SAFETY: writing one byte to our pipe end, then closing it.
            unsafe {
                libc::write(self.release_fd, b"g".as_ptr().cast(), 1);
                libc::close(self.release_fd);
            }
            self.release_fd = -1;
        }
    }

    /// Asks the child to stop (SIGTERM).
    pub fn terminate(&self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
    }

    /// Waits for the child and returns its exit code (128 + signal if killed).
    pub fn wait(&self) -> i32 {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(self.pid as i32, &mut status, 0) };
        if r < 0 {
            return 1;
        }
        if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else if libc::WIFSIGNALED(status) {
            128 + libc::WTERMSIG(status)
        } else {
            1
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.release_fd >= 0 {
            // Not released: closing the pipe makes the child exit without running anything.
            // SAFETY: closing our pipe end.
            unsafe { libc::close(self.release_fd) };
            self.release_fd = -1;
            let _ = self.wait();
        }
    }
}
