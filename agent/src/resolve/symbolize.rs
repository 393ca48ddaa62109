//! Instruction addresses of a traced process → function names, for `--profile-cpu`, with
//! blazesym (ELF symbols, DWARF where present, demangled).
//!
//! Files are opened through `/proc/PID/map_files/`: as the process maps them, inside its own
//! mount namespace (a container's files as the container sees them, never a host path of the
//! same name), and still there when the file was deleted or replaced on disk. blazesym keeps
//! each opened file (mapped, with its parsed symbols) in its symbolizer: one symbolizer per
//! process, dropped with the process, so a host agent that sees processes come and go keeps
//! neither their files open nor their symbols in memory. This cache keeps each (process,
//! address)'s answer, so a hot address costs one lookup.

use std::{collections::HashMap, ops::Range, path::Path, sync::Arc};

use blazesym::{
    normalize::{Normalizer, UserMeta},
    symbolize::{
        source::{Process, Source},
        Input, Symbolized, Symbolizer,
    },
};

use crate::{discover, model::Frame};

/// (function, file) of an address.
type Named = (Arc<str>, Arc<str>);

/// Answers kept per process; beyond it the process's cache starts over.
const MAX_CACHED: usize = 100_000;

pub struct Symbols {
    /// Per process: its files, opened and parsed once.
    symbolizers: HashMap<u32, Symbolizer>,
    /// Names the file of an address no symbol covers (`[libgomp.so.1]`), from the process's
    /// maps (no file is opened for it).
    normalizer: Normalizer,
    cache: HashMap<u32, HashMap<u64, Named>>,
    /// Per process: where its code is.
    code: HashMap<u32, Code>,
    /// Addresses looked up (cache misses), for the agent's own accounting.
    pub lookups: u64,
}

impl Default for Symbols {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbols {
    pub fn new() -> Self {
        Self {
            symbolizers: HashMap::new(),
            normalizer: Normalizer::builder().enable_build_ids(false).build(),
            cache: HashMap::new(),
            code: HashMap::new(),
            lookups: 0,
        }
    }

    /// The frames of stacks of process `pid` (leaf first each); return addresses (every frame
    /// but a stack's first) are looked up one byte back, inside their call instruction.
    pub fn frames(&mut self, pid: u32, stacks: &[&[u64]]) -> Vec<Vec<Frame>> {
        let lookup = |i: usize, a: u64| if i == 0 { a } else { a.saturating_sub(1) };
        let cache = self.cache.entry(pid).or_default();
        if cache.len() > MAX_CACHED {
            cache.clear();
        }
        let mut missing: Vec<u64> = stacks
            .iter()
            .flat_map(|s| s.iter().enumerate().map(|(i, &a)| lookup(i, a)))
            .filter(|a| !cache.contains_key(a))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            self.lookups += missing.len() as u64;
            // Only code is looked up: a frameless build's "return addresses" are often data
            // pointers (into the mapped model file, say), and blazesym fails a whole batch
            // on an address in a file that is not ELF.
            let code = self.code.entry(pid).or_default();
            code.refresh(pid);
            let (in_code, mut unnamed): (Vec<u64>, Vec<u64>) =
                missing.iter().partition(|&&a| code.contains(a));
            let symbolizer = self.symbolizers.entry(pid).or_insert_with(symbolizer);
            let src = process_source(pid);
            let found: Vec<Option<Named>> = match symbolizer
                .symbolize(&src, Input::AbsAddr(&in_code))
            {
                Ok(found) => (0..in_code.len()).map(|i| named(found.get(i))).collect(),
                // One address that cannot be looked up (a file that does not parse) spoils
                // its batch: each is then looked up alone.
                Err(e) => {
                    tracing::debug!("symbolizing {} addresses of pid {pid}: {e}", in_code.len());
                    in_code
                        .iter()
                        .map(|a| {
                            let one = symbolizer
                                .symbolize(&src, Input::AbsAddr(std::slice::from_ref(a)))
                                .ok()?;
                            named(one.first())
                        })
                        .collect()
                }
            };
            for (&addr, n) in in_code.iter().zip(found) {
                match n {
                    Some(n) => {
                        cache.insert(addr, n);
                    }
                    None => unnamed.push(addr),
                }
            }
            unnamed.sort_unstable();
            // Without a symbol: the file it is in, as the process maps it.
            let files = self
                .normalizer
                .normalize_user_addrs(pid.into(), &unnamed)
                .ok();
            for (i, &addr) in unnamed.iter().enumerate() {
                let file = files.as_ref().and_then(|o| {
                    let (_, m) = *o.outputs.get(i)?;
                    match o.meta.get(m)? {
                        UserMeta::Elf(e) => Some(e.path.to_string_lossy().into_owned()),
                        _ => None,
                    }
                });
                let n = match file {
                    Some(path) => {
                        let base = path.rsplit('/').next().unwrap_or(&path);
                        (format!("[{base}]").into(), path.as_str().into())
                    }
                    None => (unknown(), empty()),
                };
                cache.insert(addr, n);
            }
        }
        stacks
            .iter()
            .map(|s| {
                s.iter()
                    .enumerate()
                    .map(|(i, &a)| {
                        let (function, module) = cache
                            .get(&lookup(i, a))
                            .cloned()
                            .unwrap_or_else(|| (unknown(), empty()));
                        Frame {
                            addr: a,
                            function,
                            module,
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// A process is gone: its answers, files and symbols too.
    pub fn forget(&mut self, pid: u32) {
        self.cache.remove(&pid);
        self.symbolizers.remove(&pid);
        self.code.remove(&pid);
    }

    /// Processes with state kept.
    pub fn processes(&self) -> usize {
        self.cache.len().max(self.symbolizers.len())
    }
}

/// The executable ranges of a process, read again when its mapped size changed (a library
/// loaded or unloaded changes it; `/proc/PID/statm` is a few bytes, its maps are not).
#[derive(Default)]
struct Code {
    pages: Option<u64>,
    ranges: Vec<Range<u64>>,
}

impl Code {
    fn refresh(&mut self, pid: u32) {
        let pages = discover::mapped_pages(pid);
        if pages.is_some() && pages == self.pages {
            return;
        }
        self.pages = pages;
        // Gone or unreadable: nothing is code, every address is named by its file or unknown.
        self.ranges = discover::code_ranges(pid).unwrap_or_default();
    }

    fn contains(&self, addr: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.end <= addr);
        self.ranges.get(i).is_some_and(|r| r.contains(&addr))
    }
}

/// The process `pid`, its files opened through `/proc/PID/map_files/`.
fn process_source(pid: u32) -> Source<'static> {
    let mut src = Process::new(pid.into());
    src.perf_map = false; // a file at a path the process names: not opened
    src.map_files = true;
    Source::Process(src)
}

fn symbolizer() -> Symbolizer {
    Symbolizer::builder()
        .enable_code_info(false)
        .enable_inlined_fns(false)
        .enable_demangling(true)
        // Separate debug files only next to the mapped file, never from the host's debug
        // directories (a container's binary is not the host's).
        .set_debug_dirs(Some::<&[&Path]>(&[]))
        .build()
}

fn unknown() -> Arc<str> {
    "[unknown]".into()
}

fn empty() -> Arc<str> {
    "".into()
}

/// (function, module) of one answer; `None` without a symbol.
fn named(s: Option<&Symbolized<'_>>) -> Option<Named> {
    match s {
        Some(Symbolized::Sym(sym)) => Some((
            sym.name.as_ref().into(),
            sym.module
                .as_deref()
                .map(|m| m.to_string_lossy().as_ref().into())
                .unwrap_or_else(empty),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn marker_function_for_symbolize_test() -> u64 {
        marker_function_for_symbolize_test as *const () as u64
    }

    #[test]
    fn names_a_function_of_this_process() {
        let addr = std::hint::black_box(marker_function_for_symbolize_test()) + 1;
        let mut s = Symbols::new();
        let got = s.frames(std::process::id(), &[&[addr, addr + 1]]);
        assert!(
            got[0][0]
                .function
                .contains("marker_function_for_symbolize_test"),
            "{:?}",
            got[0][0]
        );
        // A return address is looked up one byte back: the same function.
        assert_eq!(got[0][1].function, got[0][0].function);
        assert_eq!(s.lookups, 1, "addr and (addr + 1) - 1 are one lookup");
        s.frames(std::process::id(), &[&[addr]]);
        assert_eq!(s.lookups, 1, "cached");
        assert_eq!(s.processes(), 1);
        // Gone: nothing of it is kept (its files closed with its symbolizer).
        // (Counted as the fds open on this test binary: other tests open other files.)
        let exe = std::env::current_exe().unwrap();
        let on_exe = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|p| *p == exe)
                .count()
        };
        let before = on_exe();
        assert!(before > 0, "blazesym holds the binary open");
        s.forget(std::process::id());
        assert_eq!(s.processes(), 0);
        assert!(on_exe() < before, "its files are closed");
    }

    /// Without frame pointers a "stack" is whatever the frame register held: often a pointer
    /// into mapped data, such as the model file llama.cpp maps. Such an address (in a file
    /// that is not ELF) is named by its file, and the real code addresses looked up beside it
    /// keep their names.
    #[test]
    fn an_address_in_a_mapped_data_file_leaves_the_rest_named() {
        let dir = std::env::temp_dir().join(format!("llamaprobe-sym-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("weights.gguf");
        std::fs::write(&data, vec![0x47u8; 1 << 16]).unwrap();
        let file = std::fs::File::open(&data).unwrap();
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let in_data = map.as_ptr() as u64 + 4096;
        // The same bytes mapped executable: not ELF either, so blazesym cannot look it up.
        // SAFETY: a file of this test's own, not changed while mapped; never run.
        let exec = unsafe { memmap2::MmapOptions::new().map_exec(&file) }.unwrap();
        let in_exec = exec.as_ptr() as u64 + 4096;
        let code = std::hint::black_box(marker_function_for_symbolize_test()) + 1;
        let mut s = Symbols::new();
        let stack = [code, in_data + 1, in_exec + 1];
        let got = s.frames(std::process::id(), &[&stack]);
        assert!(
            got[0][0]
                .function
                .contains("marker_function_for_symbolize_test"),
            "{got:?}"
        );
        assert_eq!(&*got[0][1].function, "[weights.gguf]", "{got:?}");
        assert_eq!(&*got[0][2].function, "[weights.gguf]", "{got:?}");
        // Asked again, all answers come from the cache.
        let before = s.lookups;
        s.frames(std::process::id(), &[&stack]);
        assert_eq!(s.lookups, before);
        drop((map, exec));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
