//! Who a traced process is: its executable, the container and Kubernetes pod it runs in, and
//! the service name it gives itself, read from `/proc/PID/{exe,comm,cgroup,environ}`.
//!
//! The container and pod come from the process's cgroup path, where every runtime names the
//! container (`docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
//! `libpod-<id>`, a bare id under `/docker/` or `/kubepods/…/pod<uid>/`) and the kubelet names
//! the pod (`kubepods-burstable-pod<uid>.slice`, with `_` for `-` under the systemd driver;
//! `pod<uid>` under cgroupfs). Everything read from `/proc/PID/*` is the traced process's to
//! choose (its environment, its command name) or its runtime's: reads are bounded, bytes are
//! decoded lossily, and values that become labels are [sanitized](sanitize_label).

use std::{fs, io::Read, path::Path};

/// At most this much of `/proc/PID/environ` is read.
const ENVIRON_LIMIT: u64 = 1 << 20;
/// At most this much of `/proc/PID/cgroup` is read.
const CGROUP_LIMIT: u64 = 64 << 10;
/// At most this much of `/proc/PID/comm` is read (the kernel writes at most 16 bytes).
const COMM_LIMIT: u64 = 256;
/// A label value is cut to this many characters.
pub const LABEL_MAX_CHARS: usize = 128;
/// The executable name when neither `/proc/PID/exe` nor `/proc/PID/comm` can be read.
pub const UNKNOWN_EXE: &str = "unknown";

/// Who a process is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub pid: u32,
    /// The executable's file name (of `/proc/PID/exe`'s target, without a ` (deleted)` mark),
    /// else the command name (`/proc/PID/comm`), else [`UNKNOWN_EXE`]. Sanitized.
    pub exe: String,
    /// The container's id as its runtime names it in the cgroup path (64 hex digits for
    /// Docker, containerd, CRI-O and Podman), lower case. `None` for a host process.
    pub container_id: Option<String>,
    /// The Kubernetes pod's UID (`8-4-4-4-12` hex digits with dashes, or the 32 hex digits of
    /// a static pod's config hash), lower case. `None` outside Kubernetes.
    pub pod_uid: Option<String>,
    /// The process's `OTEL_SERVICE_NAME` (from its environment at start) if set and not
    /// empty, else [`Self::exe`]. Sanitized.
    pub service_name: String,
}

/// The identity of `pid`. Never fails: a file of `/proc/PID` that cannot be read (the process
/// is gone, or is not ours to read) leaves its fields at their defaults.
pub fn identify(pid: u32) -> Identity {
    let proc = format!("/proc/{pid}");
    let exe = fs::read_link(format!("{proc}/exe"))
        .ok()
        .and_then(|target| exe_name(&target))
        .or_else(|| {
            let comm = read_bounded(Path::new(&format!("{proc}/comm")), COMM_LIMIT).ok()?;
            let comm = sanitize_label(&String::from_utf8_lossy(&comm));
            (!comm.is_empty()).then_some(comm)
        })
        .unwrap_or_else(|| UNKNOWN_EXE.to_string());
    let (container_id, pod_uid) = read_bounded(Path::new(&format!("{proc}/cgroup")), CGROUP_LIMIT)
        .map(|bytes| container_of_cgroup(&String::from_utf8_lossy(&bytes)))
        .unwrap_or_default();
    let service_name = read_bounded(Path::new(&format!("{proc}/environ")), ENVIRON_LIMIT)
        .ok()
        .and_then(|environ| {
            let truncated = environ.len() as u64 >= ENVIRON_LIMIT;
            env_var(&environ, "OTEL_SERVICE_NAME", truncated)
        })
        .map(|name| sanitize_label(&name))
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| exe.clone());
    Identity {
        pid,
        exe,
        container_id,
        pod_uid,
        service_name,
    }
}

/// The executable name of a `/proc/PID/exe` target: its file name, without the ` (deleted)`
/// the kernel appends when the file was replaced (an upgrade under a running server).
fn exe_name(target: &Path) -> Option<String> {
    let name = target.file_name()?.to_string_lossy();
    let name = sanitize_label(name.strip_suffix(" (deleted)").unwrap_or(&name));
    (!name.is_empty()).then_some(name)
}

/// At most `limit` bytes of `path`.
fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    fs::File::open(path)?.take(limit).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The value of `name` in the NUL-separated `NAME=value` entries of `/proc/PID/environ`
/// (the first entry of that name, as `getenv` finds it). With `truncated`, the read stopped
/// at its limit and the last entry, likely cut, is not looked at. Public as a parsing entry
/// point (fuzzing).
pub fn env_var(environ: &[u8], name: &str, truncated: bool) -> Option<String> {
    let mut entries: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
    if truncated {
        entries.pop();
    }
    entries.into_iter().find_map(|entry| {
        let value = entry.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
        Some(String::from_utf8_lossy(value).into_owned())
    })
}

/// `value` made fit for a label: control characters and invisible formatting characters
/// (bidirectional overrides, zero-width spaces and joiners, byte-order marks: text that would
/// show differently from what it is) removed, surrounding white space trimmed, cut to
/// [`LABEL_MAX_CHARS`] characters. For every label value taken from a file or a traced process:
/// executable and model file names, GGUF architectures and names, paths, environment values.
pub fn sanitize_label(value: &str) -> String {
    clean(value)
        .chars()
        .take(LABEL_MAX_CHARS)
        .collect::<String>()
        .trim_end()
        .to_string()
}

/// A path made fit for a label as [`sanitize_label`] does, but a path longer than
/// [`LABEL_MAX_CHARS`] keeps its end (the file name) behind a leading `…`.
pub fn sanitize_path_label(path: &str) -> String {
    let clean = clean(path);
    let n = clean.chars().count();
    if n <= LABEL_MAX_CHARS {
        return clean;
    }
    let tail: String = clean.chars().skip(n - (LABEL_MAX_CHARS - 1)).collect();
    format!("…{}", tail.trim_start())
}

/// `value` without control and invisible formatting characters, trimmed.
fn clean(value: &str) -> String {
    let kept: String = value.chars().filter(|&c| !is_hidden(c)).collect();
    kept.trim().to_string()
}

/// Control characters (Unicode `Cc`) and the format characters (`Cf`) that change how text
/// around them shows or hide in it.
fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00ad}'
                | '\u{061c}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
        )
}

/// The container id and the Kubernetes pod UID in the text of `/proc/PID/cgroup`.
///
/// Each line is `HIERARCHY:CONTROLLERS:PATH` (cgroup v1, one line per hierarchy) or
/// `0::PATH` (v2; hybrid layouts have both). Within a path the last segment that names a
/// container wins (the innermost one: `libpod-<id>.scope/container`, nested Docker); the
/// unified (`0::`) line is preferred, then the v1 lines in order. The pod UID is taken from the
/// line the container came from, else from any line. Conmon's scopes (`libpod-conmon-<id>`,
/// `crio-conmon-<id>`) are the runtime's monitor, not the container, and are skipped.
pub fn container_of_cgroup(text: &str) -> (Option<String>, Option<String>) {
    let mut lines: Vec<(Option<String>, Option<String>)> = Vec::new();
    let mut unified = None;
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(hierarchy), Some(_controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let found = of_path(path);
        if hierarchy == "0" && unified.is_none() {
            unified = Some(lines.len());
        }
        lines.push(found);
    }
    let order = unified.into_iter().chain(0..lines.len());
    let with_container = order.clone().find(|&i| lines[i].0.is_some());
    match with_container {
        Some(i) => {
            let (container, pod) = lines[i].clone();
            let pod = pod.or_else(|| order.clone().find_map(|j| lines[j].1.clone()));
            (container, pod)
        }
        None => (None, order.clone().find_map(|j| lines[j].1.clone())),
    }
}

/// The container id and pod UID of one cgroup path: of each, the last segment naming one.
fn of_path(path: &str) -> (Option<String>, Option<String>) {
    let mut container = None;
    let mut pod = None;
    for segment in path.split('/') {
        if let Some(id) = container_of_segment(segment) {
            container = Some(id);
        }
        if let Some(uid) = pod_of_segment(segment) {
            pod = Some(uid);
        }
    }
    (container, pod)
}

/// Prefixes of container scopes (systemd driver) or directories (cgroupfs driver) before the
/// container id.
const CONTAINER_PREFIXES: [&str; 5] =
    ["cri-containerd-", "crio-", "docker-", "libpod-", "nerdctl-"];

/// The container id named by one cgroup path segment: `<prefix><id>[.scope]` with a prefix of
/// [`CONTAINER_PREFIXES`] and an id of 12 to 64 hex digits, or a bare id of 64 hex digits
/// (Docker's and the kubelet's cgroupfs layouts).
fn container_of_segment(segment: &str) -> Option<String> {
    if is_hex(segment, 64..=64) {
        return Some(segment.to_ascii_lowercase());
    }
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = CONTAINER_PREFIXES
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))?;
    // `libpod-conmon-<id>`, `crio-conmon-<id>`: not hex, so not taken.
    is_hex(id, 12..=64).then(|| id.to_ascii_lowercase())
}

/// The pod UID named by one cgroup path segment: `pod<uid>` (cgroupfs driver) or
/// `kubepods[-<qos>]-pod<uid>.slice` (systemd driver, `_` for `-` in the UID).
fn pod_of_segment(segment: &str) -> Option<String> {
    let uid = match segment.strip_suffix(".slice") {
        Some(name) => name.strip_prefix("kubepods")?.rsplit_once("-pod")?.1,
        None => segment.strip_prefix("pod")?,
    };
    let uid = uid.replace('_', "-").to_ascii_lowercase();
    (is_uuid(&uid) || is_hex(&uid, 32..=32)).then_some(uid)
}

/// Whether `s` is all ASCII hex digits, of a length in `len`.
fn is_hex(s: &str, len: std::ops::RangeInclusive<usize>) -> bool {
    len.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `s` is a UUID in its `8-4-4-4-12` hex form.
fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| is_hex(g, n..=n))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f5a4f0c1e2d3b4a5968778695a4b3c2d1e0f9e8d7c6b5a4938271605f4e3d2c";
    const ID2: &str = "9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c";
    const UID: &str = "8d1e2f3a-4b5c-4d6e-8f70-1a2b3c4d5e6f";
    const UID_: &str = "8d1e2f3a_4b5c_4d6e_8f70_1a2b3c4d5e6f";

    fn parse(text: &str) -> (Option<String>, Option<String>) {
        container_of_cgroup(text)
    }

    fn some(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn podman_cgroupfs_v2_and_v1() {
        let v2 = format!("0::/libpod_parent/libpod-{ID}\n");
        assert_eq!(parse(&v2), (some(ID), None));
        let v1 = format!(
            "12:pids:/libpod_parent/libpod-{ID}\n\
             11:memory:/libpod_parent/libpod-{ID}\n\
             2:cpu,cpuacct:/libpod_parent/libpod-{ID}\n\
             1:name=systemd:/libpod_parent/libpod-{ID}\n"
        );
        assert_eq!(parse(&v1), (some(ID), None));
    }

    #[test]
    fn podman_systemd_scope_and_inner_container_cgroup() {
        assert_eq!(
            parse(&format!("0::/machine.slice/libpod-{ID}.scope\n")),
            (some(ID), None)
        );
        // Podman 4+ on cgroup v2 (rootless): the payload sits in `container` under the scope.
        let rootless = format!(
            "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container\n"
        );
        assert_eq!(parse(&rootless), (some(ID), None));
    }

    #[test]
    fn conmon_scopes_are_not_the_container() {
        assert_eq!(
            parse(&format!("0::/machine.slice/libpod-conmon-{ID}.scope\n")),
            (None, None)
        );
        assert_eq!(
            parse(&format!(
                "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-conmon-{ID}.scope\n"
            )),
            (None, None)
        );
        assert_eq!(
            parse(&format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope\n"
            )),
            (None, some(UID))
        );
    }

    #[test]
    fn docker_cgroupfs_and_systemd() {
        assert_eq!(parse(&format!("0::/docker/{ID}\n")), (some(ID), None));
        let v1 = format!(
            "13:misc:/\n\
             12:memory:/docker/{ID}\n\
             5:devices:/docker/{ID}\n\
             1:name=systemd:/docker/{ID}\n"
        );
        assert_eq!(parse(&v1), (some(ID), None));
        assert_eq!(
            parse(&format!("0::/system.slice/docker-{ID}.scope\n")),
            (some(ID), None)
        );
        // nerdctl (containerd without Kubernetes), systemd driver.
        assert_eq!(
            parse(&format!("0::/system.slice/nerdctl-{ID}.scope\n")),
            (some(ID), None)
        );
        // Docker in Docker: the innermost container.
        assert_eq!(
            parse(&format!("0::/docker/{ID}/docker/{ID2}\n")),
            (some(ID2), None)
        );
    }

    #[test]
    fn containerd_on_kubernetes_with_the_systemd_driver() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse(&text), (some(ID), some(UID)));
        let besteffort = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse(&besteffort), (some(ID), some(UID)));
        // Guaranteed pods sit right under kubepods.slice.
        let guaranteed =
            format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope\n");
        assert_eq!(parse(&guaranteed), (some(ID), some(UID)));
    }

    #[test]
    fn kubernetes_with_the_cgroupfs_driver() {
        for qos in ["burstable/", "besteffort/", ""] {
            let text = format!("0::/kubepods/{qos}pod{UID}/{ID}\n");
            assert_eq!(parse(&text), (some(ID), some(UID)), "{text}");
        }
        let v1 = format!(
            "11:memory:/kubepods/besteffort/pod{UID}/{ID}\n\
             4:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n"
        );
        assert_eq!(parse(&v1), (some(ID), some(UID)));
        // A static pod: its UID is the 32-hex config hash.
        let hash = "6b1a5e1d9f2c4b3a8e7d6c5b4a392817";
        let text = format!("0::/kubepods/burstable/pod{hash}/{ID}\n");
        assert_eq!(parse(&text), (some(ID), some(hash)));
    }

    #[test]
    fn cri_o() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope\n"
        );
        assert_eq!(parse(&text), (some(ID), some(UID)));
        // Some CRI-O versions put the payload under the scope.
        let inner =
            format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-{ID}.scope/container\n");
        assert_eq!(parse(&inner), (some(ID), some(UID)));
    }

    #[test]
    fn hybrid_layout_prefers_the_line_with_the_container() {
        // systemd hybrid: the unified hierarchy holds only the session; v1 has the container.
        let text = format!(
            "12:blkio:/kubepods/burstable/pod{UID}/{ID}\n\
             11:memory:/kubepods/burstable/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/burstable/pod{UID}/{ID}\n\
             0::/\n"
        );
        assert_eq!(parse(&text), (some(ID), some(UID)));
        // Both name one: the unified line wins.
        let text = format!("1:name=systemd:/docker/{ID2}\n0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(parse(&text), (some(ID), None));
    }

    #[test]
    fn host_processes_have_no_container() {
        for text in [
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-org.gnome.Terminal.slice/vte-spawn-1.scope\n",
            "0::/system.slice/llama-server.service\n",
            "0::/\n",
            "0::/init.scope\n",
            "12:pids:/user.slice/user-1000.slice/session-2.scope\n1:name=systemd:/user.slice/user-1000.slice/session-2.scope\n0::/user.slice/user-1000.slice/session-2.scope\n",
            // The kubelet and the runtime themselves.
            "0::/system.slice/containerd.service\n",
            "0::/system.slice/docker.service\n",
            "",
        ] {
            assert_eq!(parse(text), (None, None), "{text}");
        }
    }

    #[test]
    fn malformed_cgroup_text_gives_nothing() {
        for text in [
            "garbage\n",
            ":\n",
            "0:/docker/\n",
            // Not hex, wrong lengths.
            "0::/docker/zz5a4f0c1e2d3b4a5968778695a4b3c2d1e0f9e8d7c6b5a4938271605f4e3d2c\n",
            "0::/docker/3f5a4f0c\n",
            "0::/system.slice/docker-3f5a.scope\n",
            "0::/kubepods/burstable/podnot-a-uid/\n",
            "0::/kubepods.slice/kubepods-pod12345.slice\n",
            "0::/kubepods.slice/other-pod8d1e2f3a_4b5c_4d6e_8f70_1a2b3c4d5e6f.slice\n",
        ] {
            assert_eq!(parse(text), (None, None), "{text}");
        }
        // Upper-case hex is normalized; a path with colons is taken whole.
        let text = format!("0::/docker/{}\n", ID.to_ascii_uppercase());
        assert_eq!(parse(&text), (some(ID), None));
        assert_eq!(
            parse(&format!("0::/a:b/docker-{ID}.scope\n")),
            (some(ID), None)
        );
    }

    #[test]
    fn pod_without_a_container_segment() {
        // A process in the pod's cgroup itself (the pause sandbox with some runtimes).
        let text = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice\n"
        );
        assert_eq!(parse(&text), (None, some(UID)));
    }

    #[test]
    fn environ_values() {
        let environ = b"PATH=/bin\0OTEL_SERVICE_NAME=chat-api\0OTEL_SERVICE_NAME=second\0X=1\0";
        assert_eq!(
            env_var(environ, "OTEL_SERVICE_NAME", false).as_deref(),
            Some("chat-api")
        );
        assert_eq!(env_var(environ, "OTEL_SERVICE", false), None);
        assert_eq!(env_var(environ, "MISSING", false), None);
        assert_eq!(env_var(b"", "X", false), None);
        // The cut last entry of a truncated read is not taken.
        assert_eq!(env_var(b"A=1\0X=trunc", "X", true), None);
        assert_eq!(env_var(b"A=1\0X=trunc", "A", true).as_deref(), Some("1"));
        // Invalid UTF-8 is decoded lossily.
        assert_eq!(
            env_var(b"X=a\xffb\0", "X", false).as_deref(),
            Some("a\u{fffd}b")
        );
    }

    #[test]
    fn labels_are_sanitized() {
        assert_eq!(sanitize_label("chat\n-api\u{1b}[31m\t"), "chat-api[31m");
        assert_eq!(sanitize_label("  svc  "), "svc");
        assert_eq!(sanitize_label(&"x".repeat(1000)).len(), LABEL_MAX_CHARS);
        let wide = "é".repeat(200);
        assert_eq!(sanitize_label(&wide).chars().count(), LABEL_MAX_CHARS);
        assert_eq!(sanitize_label("\0\x07"), "");
        // Invisible formatting: a right-to-left override, zero-width spaces, a BOM.
        assert_eq!(
            sanitize_label("\u{feff}llama\u{202e}ftg.exe\u{200b}\u{2066}"),
            "llamaftg.exe"
        );
    }

    #[test]
    fn long_path_labels_keep_their_file_name() {
        assert_eq!(sanitize_path_label(" /models/a\n.gguf "), "/models/a.gguf");
        let long = format!("/{}/qwen2-7b.Q4_K_M.gguf", "d".repeat(500));
        let label = sanitize_path_label(&long);
        assert_eq!(label.chars().count(), LABEL_MAX_CHARS);
        assert!(label.starts_with("…d"), "{label}");
        assert!(label.ends_with("/qwen2-7b.Q4_K_M.gguf"), "{label}");
        assert_eq!(sanitize_path_label("\u{7}"), "");
    }

    #[test]
    fn exe_names() {
        assert_eq!(
            exe_name(Path::new("/usr/local/bin/llama-server")).as_deref(),
            Some("llama-server")
        );
        assert_eq!(
            exe_name(Path::new("/app/llama-server (deleted)")).as_deref(),
            Some("llama-server")
        );
        assert_eq!(exe_name(Path::new("/")), None);
    }

    #[test]
    fn identifies_this_process() {
        let me = identify(std::process::id());
        assert_eq!(me.pid, std::process::id());
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_string_lossy();
        assert_eq!(me.exe, sanitize_label(&name));
        match std::env::var("OTEL_SERVICE_NAME") {
            Ok(v) if !sanitize_label(&v).is_empty() => {
                assert_eq!(me.service_name, sanitize_label(&v))
            }
            _ => assert_eq!(me.service_name, me.exe),
        }
    }

    #[test]
    fn a_missing_process_has_defaults() {
        // Above the kernel's pid_max (at most 2^22).
        let gone = identify(u32::MAX);
        assert_eq!(
            gone,
            Identity {
                pid: u32::MAX,
                exe: UNKNOWN_EXE.to_string(),
                container_id: None,
                pod_uid: None,
                service_name: UNKNOWN_EXE.to_string(),
            }
        );
    }
}
