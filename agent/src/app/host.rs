//! The host agent's view of the node: which processes run llama.cpp, which files are probed
//! for them, and who each process is.
//!
//! Files are probed, not processes: a library or executable (by device and inode, so two
//! containers' copies are two files) is probed once, for every process that maps it, and its
//! probes are removed when its last process is gone. A process that starts from a probed file
//! is covered from its first instruction. Each file's symbols are read once (a cache by file
//! key, failures included), so a rescan of a node costs a read of each process's maps.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    path::PathBuf,
};

use probe_common::ProcessLayout;

use super::select::{Candidate, Selection};
use crate::{
    attach::{AttachError, Probes},
    catalog::Family,
    discover::{self, FileKey, MappedFile, OpenVia},
    model::{Mode, ProcessIdentity},
    resolve::{self, ElfError, FileSymbols, Plan},
    sources::{
        identity::{self, Identity},
        k8s::K8sMetadata,
    },
};

/// A llama.cpp process whose files cannot be probed is tried this many times.
const MAX_ATTACH_TRIES: u32 = 3;

/// A process has its maps read again at every look where its mapped size changed, and at
/// every this many looks whatever it is (a new mapping of exactly the size of one that went in
/// between is not missed for longer than that).
const FULL_LOOK_EVERY: u32 = 30;

/// When a process's maps were last read: its mapped size (pages) then, and the looks since
/// that found the same size and did not read them.
#[derive(Clone, Copy, Debug)]
struct Looked {
    pages: Option<u64>,
    skipped: u32,
}

impl Looked {
    fn at(pages: Option<u64>) -> Looked {
        Looked { pages, skipped: 0 }
    }

    /// Whether a look that finds `pages` mapped can leave the maps unread (counted if so).
    fn unchanged(&mut self, pages: Option<u64>) -> bool {
        let same = pages.is_some() && self.pages == pages && self.skipped + 1 < FULL_LOOK_EVERY;
        if same {
            self.skipped += 1;
        }
        same
    }
}

/// A process that is not traced, as it was last looked at.
struct Other {
    /// Its maps' signature (0: planned again at the next look, after a failed attach).
    signature: u64,
    looked: Looked,
}

/// A traced process.
pub struct HostProcess {
    pub identity: Identity,
    pub labels: ProcessIdentity,
    pub plan: Plan,
    pub mode: Mode,
    /// Its files that are probed for it.
    files: BTreeSet<FileKey>,
    /// Every file it maps (its maps' signature: unchanged maps need no new plan).
    signature: u64,
    looked: Looked,
    /// When it was first looked at and traced (monotonic ns).
    pub since_ns: u64,
    /// Files probed for it when it was traced (0: they were probed already, for other
    /// processes, so it was covered from its first instruction).
    pub newly_probed: usize,
}

/// A probed file.
struct ProbedFile {
    group: u64,
    users: HashSet<u32>,
    /// Its sampler-chain fallback probes were detached (its processes sample by function).
    apply_detached: bool,
}

/// What looking at one process gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// Newly traced, or traced already and its labels are new: its pod, not known when it
    /// was traced, is now (published again as a newly traced process is).
    Traced,
    /// Traced already; nothing new mapped.
    Unchanged,
    /// Traced already, and llama.cpp files it mapped since (a library loaded later, or the
    /// rest of a burst of them that a look fell in the middle of) are probed now: how many.
    Grew(usize),
    /// Not a llama.cpp process (or left out by the selection, or llamaprobe itself).
    Other,
    /// Gone before it could be read.
    Gone,
    /// Over `--max-processes`.
    Refused,
    /// A llama.cpp process whose probes could not be attached.
    Failed(&'static str),
}

/// The processes and files of the node.
pub struct Host {
    me: u32,
    selection: Selection,
    max_processes: usize,
    /// Probe llama_synchronize where a GPU backend is mapped (`--sync auto`), always, never.
    sync: super::cli::SyncMode,
    pub processes: HashMap<u32, HostProcess>,
    files: HashMap<FileKey, ProbedFile>,
    /// Each file's symbols (`None`: not an ELF file llamaprobe can read).
    symbols: HashMap<FileKey, Option<FileSymbols>>,
    /// Processes that are not traced, by pid (looked at again only when their maps change: a
    /// library loaded later).
    others: HashMap<u32, Other>,
    next_group: u64,
    /// Failed attempts to probe a process's files, by pid.
    failures: HashMap<u32, u32>,
    /// Processes refused over `--max-processes`.
    pub refused: u64,
    /// Attach failures by reason.
    pub attach_errors: Vec<&'static str>,
    k8s: Option<K8sMetadata>,
}

/// A hash of the files a process maps.
fn signature(files: &[MappedFile]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut keys: Vec<FileKey> = files.iter().map(MappedFile::key).collect();
    keys.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    keys.hash(&mut h);
    h.finish()
}

impl Host {
    pub fn new(
        selection: Selection,
        max_processes: usize,
        sync: super::cli::SyncMode,
        k8s: Option<K8sMetadata>,
    ) -> Self {
        Self {
            me: std::process::id(),
            selection,
            max_processes,
            sync,
            processes: HashMap::new(),
            files: HashMap::new(),
            symbols: HashMap::new(),
            others: HashMap::new(),
            next_group: 1,
            failures: HashMap::new(),
            refused: 0,
            attach_errors: Vec::new(),
            k8s,
        }
    }

    /// Files probed now.
    pub fn files_probed(&self) -> usize {
        self.files.len()
    }

    /// The pids traced now.
    pub fn pids(&self) -> Vec<u32> {
        self.processes.keys().copied().collect()
    }

    /// Every process id in /proc.
    pub fn all_pids() -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// Threads of process `pid` other than its main thread that the kernel still lists (0 when
    /// the process is gone).
    pub fn threads_left(pid: u32) -> usize {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return 0;
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&tid| tid != pid)
            .count()
    }

    /// Looks at process `pid`: traces it if it runs llama.cpp and the selection takes it
    /// (attaching what its files need), else remembers it as another process.
    pub fn consider(&mut self, pid: u32, probes: &mut Probes) -> Seen {
        if pid == self.me {
            return Seen::Other;
        }
        // Read before the maps, so that a mapping made while they are read shows next time.
        let pages = discover::mapped_pages(pid);
        if let Some(p) = self.processes.get_mut(&pid) {
            if p.looked.unchanged(pages) {
                return self.relabel(pid);
            }
        } else if let Some(o) = self.others.get_mut(&pid) {
            if o.signature != 0 && o.looked.unchanged(pages) {
                return Seen::Other;
            }
        }
        let files = match discover::mapped_files_via(pid, OpenVia::MapFiles) {
            Ok(f) => f,
            Err(_) => return Seen::Gone,
        };
        let sig = signature(&files);
        if files.is_empty() {
            // A kernel thread (or a zombie).
            self.remember_other(pid, sig, pages);
            return Seen::Other;
        }
        if let Some(p) = self.processes.get_mut(&pid) {
            p.looked = Looked::at(pages);
            if p.signature == sig {
                return self.relabel(pid);
            }
            // Something new mapped (a library loaded later): planned again below; the files
            // already probed for it stay.
        } else if self.others.get(&pid).is_some_and(|o| o.signature == sig) {
            self.remember_other(pid, sig, pages);
            return Seen::Other;
        }
        let ident = identity::identify(pid);
        if !self.selection.is_empty() {
            let pod = self.pod_of(&ident);
            let exe_path = std::fs::read_link(format!("/proc/{pid}/exe"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let candidate = Candidate {
                identity: &ident,
                exe_path: &exe_path,
                comm: &discover::comm(pid),
                pod: pod.as_ref(),
            };
            if !self.selection.takes(&candidate) {
                self.remember_other(pid, sig, pages);
                return Seen::Other;
            }
        }
        let what = format!("process {pid} ({})", ident.exe);
        let cache = &mut self.symbols;
        let plan = Plan::build_with(&files, &what, |f| cached_symbols(cache, f));
        let plan = match plan {
            Ok(p) => p,
            Err(ElfError::NotLlama { .. }) => {
                self.remember_other(pid, sig, pages);
                return Seen::Other;
            }
            Err(e) => {
                tracing::debug!("{what}: {e}");
                self.remember_other(pid, sig, pages);
                return Seen::Other;
            }
        };
        let known = self.processes.contains_key(&pid);
        if !known && self.processes.len() >= self.max_processes {
            self.refused += 1;
            if self.refused == 1 {
                tracing::warn!(
                    pid,
                    exe = %ident.exe,
                    "not traced: {} processes are traced already (--max-processes); further refusals are counted in llamaprobe_processes_refused_total",
                    self.max_processes
                );
            }
            self.remember_other(pid, sig, pages);
            return Seen::Refused;
        }
        let layout = plan.process_layout();
        let skip: &[Family] = if super::session::sync_wanted(&plan, self.sync) {
            &[]
        } else {
            &[Family::Synchronize]
        };
        let mut probed = BTreeSet::new();
        let mut newly_probed = 0;
        for (key, probes_of_file) in by_file(&files, &plan) {
            if let Some(f) = self.files.get_mut(&key) {
                f.users.insert(pid);
                probed.insert(key);
                continue;
            }
            // Attached through an open descriptor of the very file mapped: its path in the
            // process (through /proc/PID/map_files) can change while a program is still being
            // loaded, and a container's path must never be walked from the host's root.
            let (_pinned, probes_of_file) = match pin(key, &probes_of_file) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(pid, "{}: {e}", probes_of_file[0].path.display());
                    self.attach_errors.push("file_changed");
                    continue;
                }
            };
            let group = self.next_group;
            self.next_group += 1;
            match probes.attach_group(group, &probes_of_file, None, &layout, skip) {
                Ok(()) => {
                    self.files.insert(
                        key,
                        ProbedFile {
                            group,
                            users: HashSet::from([pid]),
                            apply_detached: false,
                        },
                    );
                    probed.insert(key);
                    newly_probed += 1;
                }
                Err(e) => {
                    tracing::warn!(pid, exe = %ident.exe, "cannot probe {}: {}", probes_of_file[0].path.display(), chain(&e));
                    self.attach_errors.push(e.reason());
                }
            }
        }
        if probed.is_empty() {
            // Tried again at the next looks (a file caught while it was being mapped), a few
            // times.
            let tries = self.failures.entry(pid).or_default();
            *tries += 1;
            let sig = if *tries >= MAX_ATTACH_TRIES { sig } else { 0 };
            self.remember_other(pid, sig, pages);
            return Seen::Failed(self.attach_errors.last().copied().unwrap_or("uprobe"));
        }
        self.failures.remove(&pid);
        if let Err(e) = register(probes, pid, &layout) {
            self.attach_errors.push(e.reason());
            tracing::warn!(pid, "{e:#}");
        }
        self.others.remove(&pid);
        let mode = super::session::request_mode(&plan);
        let labels = self.labels(&ident);
        let entry = self.processes.entry(pid);
        match entry {
            std::collections::hash_map::Entry::Occupied(mut o) => {
                let p = o.get_mut();
                let before = p.files.len();
                p.files.extend(probed);
                p.signature = sig;
                p.plan = plan;
                match p.files.len() - before {
                    0 => Seen::Unchanged,
                    more => Seen::Grew(more),
                }
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(HostProcess {
                    identity: ident,
                    labels,
                    plan,
                    mode,
                    files: probed,
                    signature: sig,
                    looked: Looked::at(pages),
                    since_ns: crate::model::clock::monotonic_ns(),
                    newly_probed,
                });
                Seen::Traced
            }
        }
    }

    /// Process `pid` is gone (or exec'd another program): it is no longer traced, and the
    /// files only it used are no longer probed. Returns whether it was traced.
    pub fn release(&mut self, pid: u32, probes: &mut Probes) -> Option<HostProcess> {
        self.others.remove(&pid);
        let p = self.processes.remove(&pid)?;
        for key in &p.files {
            let Some(f) = self.files.get_mut(key) else {
                continue;
            };
            f.users.remove(&pid);
            if f.users.is_empty() {
                let group = f.group;
                self.files.remove(key);
                probes.detach_group(group);
            }
        }
        probes.forget_process(pid);
        Some(p)
    }

    /// Pids traced or remembered that are not among the `live` ones (an exit the tracepoint
    /// did not report: a main thread that ended before its process).
    pub fn vanished(&self, live: &HashSet<u32>) -> (Vec<u32>, Vec<u32>) {
        let gone = |pid: &u32| !live.contains(pid);
        (
            self.processes.keys().copied().filter(gone).collect(),
            self.others.keys().copied().filter(gone).collect(),
        )
    }

    /// Process `pid` is not traced: its maps (signature `sig`, of `pages` mapped) are read
    /// again when they change.
    fn remember_other(&mut self, pid: u32, signature: u64, pages: Option<u64>) {
        self.others.insert(
            pid,
            Other {
                signature,
                looked: Looked::at(pages),
            },
        );
    }

    /// Forgets a process that was not traced.
    pub fn forget_other(&mut self, pid: u32) {
        self.others.remove(&pid);
        self.failures.remove(&pid);
    }

    /// Detaches the sampler-chain fallback of the files whose every process samples through
    /// a sampling function; returns how many links went.
    pub fn detach_unneeded_applies(
        &mut self,
        probes: &mut Probes,
        samples_by_function: impl Fn(u32) -> bool,
    ) -> u64 {
        let mut n = 0;
        for f in self.files.values_mut().filter(|f| !f.apply_detached) {
            if !f.users.is_empty() && f.users.iter().all(|p| samples_by_function(*p)) {
                n += probes.detach_programs_in(f.group, &super::session::SAMPLE_APPLY_PROGRAMS);
                f.apply_detached = true;
            }
        }
        n
    }

    fn pod_of(&self, ident: &Identity) -> Option<crate::sources::k8s::PodMeta> {
        let (k8s, uid) = (self.k8s.as_ref()?, ident.pod_uid.as_deref()?);
        k8s.lookup(uid, ident.container_id.as_deref())
    }

    /// A traced process in a pod that was not known when it was traced (the pod watch had not
    /// seen it yet): [`Seen::Traced`] with its labels made again once the pod is known, else
    /// [`Seen::Unchanged`]. A map lookup, for such processes only.
    fn relabel(&mut self, pid: u32) -> Seen {
        let Some(p) = self.processes.get(&pid) else {
            return Seen::Unchanged;
        };
        let has_pod = p.labels.labels.iter().any(|(k, _)| *k == "k8s_pod");
        if self.k8s.is_none() || p.identity.pod_uid.is_none() || has_pod {
            return Seen::Unchanged;
        }
        let labels = self.labels(&p.identity);
        if !labels.labels.iter().any(|(k, _)| *k == "k8s_pod") {
            return Seen::Unchanged;
        }
        if let Some(p) = self.processes.get_mut(&pid) {
            p.labels = labels;
        }
        Seen::Traced
    }

    /// The labels of a process's series.
    fn labels(&self, ident: &Identity) -> ProcessIdentity {
        let mut labels = vec![("exe", ident.exe.clone())];
        if let Some(c) = &ident.container_id {
            labels.push(("container_id", c.clone()));
        }
        if let Some(pod) = self.pod_of(ident) {
            labels.push(("k8s_namespace", pod.namespace));
            labels.push(("k8s_pod", pod.pod));
            if let Some(c) = pod.container {
                labels.push(("k8s_container", c));
            }
        }
        labels.retain(|(_, v)| !v.is_empty());
        ProcessIdentity {
            labels,
            service_name: ident.service_name.clone(),
        }
    }
}

/// The layout registration a kernel without attach cookies needs, and the exit watch.
fn register(probes: &mut Probes, pid: u32, layout: &ProcessLayout) -> Result<(), AttachError> {
    probes.register_process(pid, layout)?;
    probes.watch(pid)
}

/// Opens the file `probes` are in and checks it is `key`; returns it and the probes with their
/// target at its descriptor (`/proc/self/fd/N`, valid while the file is open).
fn pin(
    key: FileKey,
    probes: &[resolve::PlannedProbe],
) -> std::io::Result<(std::fs::File, Vec<resolve::PlannedProbe>)> {
    use std::os::{fd::AsRawFd, unix::fs::MetadataExt};
    let file = std::fs::File::open(&probes[0].target)?;
    let meta = file.metadata()?;
    if meta.ino() != key.inode {
        return Err(std::io::Error::other(format!(
            "inode {} is not the mapped file's {}",
            meta.ino(),
            key.inode
        )));
    }
    let at = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let probes = probes
        .iter()
        .map(|p| resolve::PlannedProbe {
            target: at.clone(),
            ..p.clone()
        })
        .collect();
    Ok((file, probes))
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

/// A file's symbols, read once per file.
pub(super) fn cached_symbols(
    cache: &mut HashMap<FileKey, Option<FileSymbols>>,
    f: &MappedFile,
) -> Result<FileSymbols, ElfError> {
    let not_usable = || ElfError::NotElf {
        path: f.host_path.clone(),
    };
    if let Some(hit) = cache.get(&f.key()) {
        return match hit {
            Some(s) => Ok(FileSymbols {
                file: f.clone(),
                ..s.clone()
            }),
            None => Err(not_usable()),
        };
    }
    match resolve::resolve_file(f, None) {
        Ok(s) => {
            cache.insert(f.key(), Some(s.clone()));
            Ok(s)
        }
        // Not an ELF file (a model, a locale): never one.
        Err(e @ (ElfError::NotElf { .. } | ElfError::Parse { .. })) => {
            cache.insert(f.key(), None);
            Err(e)
        }
        // Unreadable now (the process went): asked again next time.
        Err(e) => Err(e),
    }
}

/// A plan's probes grouped by the file they are in.
fn by_file(files: &[MappedFile], plan: &Plan) -> Vec<(FileKey, Vec<resolve::PlannedProbe>)> {
    let mut out: Vec<(FileKey, Vec<resolve::PlannedProbe>)> = Vec::new();
    for p in &plan.probes {
        let Some(f) = files.iter().find(|f| f.host_path == p.target) else {
            continue;
        };
        match out.iter_mut().find(|(k, _)| *k == f.key()) {
            Some((_, v)) => v.push(p.clone()),
            None => out.push((f.key(), vec![p.clone()])),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_read_again_when_the_mapped_size_changes_and_every_thirtieth_look() {
        let mut l = Looked::at(Some(100));
        assert!(l.unchanged(Some(100)));
        assert!(!l.unchanged(Some(101)), "a new size");
        assert!(!l.unchanged(None), "gone");
        let mut l = Looked::at(Some(100));
        let skipped = (0..100).take_while(|_| l.unchanged(Some(100))).count();
        assert_eq!(skipped as u32, FULL_LOOK_EVERY - 1);
    }

    fn mapped(dev: u64, inode: u64) -> MappedFile {
        MappedFile {
            path: format!("/f{inode}").into(),
            host_path: format!("/proc/1/map_files/{inode}").into(),
            dev,
            inode,
        }
    }

    #[test]
    fn the_same_files_in_another_order_have_one_signature() {
        let a = [mapped(1, 2), mapped(1, 3)];
        let b = [mapped(1, 3), mapped(1, 2)];
        assert_eq!(signature(&a), signature(&b));
        assert_ne!(signature(&a), signature(&[mapped(2, 2), mapped(1, 3)]));
    }

    #[test]
    fn a_files_symbols_are_read_once_and_failures_remembered() {
        let mut cache = HashMap::new();
        let me = discover::mapped_files(std::process::id()).unwrap();
        let exe = me
            .iter()
            .find(|f| f.path == std::fs::canonicalize("/proc/self/exe").unwrap())
            .unwrap()
            .clone();
        assert!(cached_symbols(&mut cache, &exe).is_ok());
        assert!(matches!(cache.get(&exe.key()), Some(Some(_))));
        // Served from the cache under another process's path.
        let other = MappedFile {
            host_path: "/nonexistent".into(),
            ..exe.clone()
        };
        assert_eq!(
            cached_symbols(&mut cache, &other).unwrap().file.host_path,
            std::path::PathBuf::from("/nonexistent")
        );
        let text = std::env::temp_dir().join(format!("llamaprobe-not-elf-{}", std::process::id()));
        std::fs::write(&text, b"not an ELF file at all").unwrap();
        let f = MappedFile {
            path: text.clone(),
            host_path: text.clone(),
            dev: 9,
            inode: std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&text).unwrap()),
        };
        assert!(cached_symbols(&mut cache, &f).is_err());
        assert!(matches!(cache.get(&f.key()), Some(None)));
        std::fs::remove_file(&text).unwrap();
    }
}
