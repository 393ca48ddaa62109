//! Symbol resolution with the `object` crate: which catalog functions a file defines, at which
//! file offset (what a uprobe attaches to), and the probe plan for a process.

pub mod dwarf;
mod error;
pub mod symbolize;

pub use error::ElfError;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};

use crate::{
    catalog::{self as targets, Generation, ProbePoint, PROBES},
    discover::MappedFile,
};

/// Symbols taken from another file (`--symbols-from`): an unstripped copy of a stripped
/// binary, or its separate debug file (`objcopy --only-keep-debug`). Addresses are translated
/// to file offsets with the stripped file's own program headers.
pub struct SymbolsFrom {
    pub path: PathBuf,
    data: memmap2::Mmap,
    build_id: Option<Vec<u8>>,
}

impl SymbolsFrom {
    pub fn load(path: &Path) -> Result<Self, ElfError> {
        let data = error::map(path)?;
        let obj = error::parse(path, &data)?;
        let build_id = obj.build_id().ok().flatten().map(<[u8]>::to_vec);
        Ok(Self {
            path: path.to_path_buf(),
            data,
            build_id,
        })
    }

    /// Whether these symbols belong to `file` (parsed as `obj`).
    fn applies_to(&self, obj: &object::File, file: &MappedFile) -> bool {
        match (&self.build_id, obj.build_id().ok().flatten()) {
            (Some(a), Some(b)) => a.as_slice() == b,
            _ => self.path.file_name() == file.path.file_name(),
        }
    }
}

/// Which symbol table a hit came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    Dynsym,
    Symtab,
    /// The `.symtab` of the `--symbols-from` file.
    SymbolsFrom,
}

/// A catalog symbol defined in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    pub vaddr: u64,
    pub file_offset: u64,
    pub table: Table,
}

/// What one file offers.
#[derive(Clone, Debug)]
pub struct FileSymbols {
    pub file: MappedFile,
    pub hits: BTreeMap<&'static str, Hit>,
    /// The file has a `.symtab` (not stripped).
    pub has_symtab: bool,
    /// The `--symbols-from` file was applied to this one.
    pub symbols_from: bool,
    /// A stripped file containing llama.cpp's or ggml's strings: llama.cpp code without
    /// symbols.
    pub looks_like_llama: bool,
    /// A ggml GPU backend's init function defined here (linked in statically).
    pub gpu_init: Option<&'static str>,
}

/// Translates a virtual address to a file offset through the loadable segments. The program
/// headers are the file's to say: nothing is added that could overflow.
fn file_offset(obj: &object::File, vaddr: u64) -> Option<u64> {
    obj.segments().find_map(|s| {
        let (off, size) = s.file_range();
        let within = vaddr.checked_sub(s.address())?;
        (within < size).then(|| off.checked_add(within)).flatten()
    })
}

/// Reads the catalog symbols a file defines (`.dynsym` and `.symtab`, or those of the
/// `--symbols-from` file when it belongs to this one).
pub fn resolve_file(
    file: &MappedFile,
    from: Option<&SymbolsFrom>,
) -> Result<FileSymbols, ElfError> {
    let data = error::map_mapped(file)?;
    resolve_bytes(file.clone(), &data, from)
}

/// [`resolve_file`] on an image already in memory (`data`, the bytes of `file`): the parsing
/// entry point, for fuzzing and tests. Any bytes give symbols or an error, never a panic.
pub fn resolve_bytes(
    file: MappedFile,
    data: &[u8],
    from: Option<&SymbolsFrom>,
) -> Result<FileSymbols, ElfError> {
    let obj = error::parse(&file.host_path, data)?;
    let mut hits = BTreeMap::new();
    let wanted: Vec<&'static str> = targets::wanted_symbols().collect();
    let from = match from {
        Some(f) if f.applies_to(&obj, &file) => Some(error::parse(&f.path, &f.data)?),
        _ => None,
    };
    let mut tables = vec![
        (Table::Dynsym, obj.dynamic_symbols().collect::<Vec<_>>()),
        (Table::Symtab, obj.symbols().collect::<Vec<_>>()),
    ];
    if let Some(f) = &from {
        tables.push((Table::SymbolsFrom, f.symbols().collect()));
    }
    let mut gpu_init = None;
    for (table, syms) in tables {
        for sym in syms {
            if !sym.is_definition() || sym.kind() != SymbolKind::Text || sym.address() == 0 {
                continue;
            }
            let Ok(name) = sym.name() else { continue };
            if gpu_init.is_none() {
                gpu_init = targets::GPU_BACKENDS
                    .iter()
                    .find(|(_, init)| *init == name)
                    .map(|(_, init)| *init);
            }
            let Some(&w) = wanted.iter().find(|w| **w == name) else {
                continue;
            };
            if hits.contains_key(w) {
                continue;
            }
            // An offset past the end of the file is no place for a uprobe.
            let offset = file_offset(&obj, sym.address()).filter(|&o| o < data.len() as u64);
            if let Some(file_offset) = offset {
                hits.insert(
                    w,
                    Hit {
                        vaddr: sym.address(),
                        file_offset,
                        table,
                    },
                );
            }
        }
    }
    let has_symtab = obj.symbols().next().is_some();
    // Only asked of files that offer nothing, to explain a stripped llama.cpp.
    let looks_like_llama = hits.is_empty()
        && !has_symtab
        && data
            .windows(6)
            .any(|w| w == b"llama_" || w.starts_with(b"ggml_"));
    Ok(FileSymbols {
        file,
        hits,
        has_symtab,
        symbols_from: from.is_some(),
        looks_like_llama,
        gpu_init,
    })
}

/// One uprobe pair to attach.
#[derive(Clone, Debug)]
pub struct PlannedProbe {
    pub point: &'static ProbePoint,
    /// File to attach to (host path).
    pub target: PathBuf,
    /// Path as the process sees it.
    pub path: PathBuf,
    pub hit: Hit,
}

/// What will be probed in one process.
#[derive(Clone, Debug)]
pub struct Plan {
    pub generation: Generation,
    pub probes: Vec<PlannedProbe>,
    /// Catalog functions of this generation found nowhere (by symbol).
    pub missing: Vec<&'static ProbePoint>,
    /// Files that define at least one catalog function.
    pub files: Vec<FileSymbols>,
    /// A GPU backend the process maps or may load (see [`gpu_backend`]).
    pub gpu_backend: Option<String>,
    /// The struct layouts of this generation and build (see `targets::layout_for`).
    pub layout: &'static crate::catalog::LayoutRow,
    /// llama-server's struct layouts (see `targets::server_layout_for`).
    pub server_layout: &'static crate::catalog::ServerLayoutRow,
}

/// A ggml GPU backend among `files` (by library name), among the libraries beside them that a
/// release build loads at run time (`libggml-cuda.so` next to libggml.so), or `linked`: a
/// backend init function found while resolving the files' symbols (a static build).
pub fn gpu_backend(files: &[MappedFile], linked: Option<String>) -> Option<String> {
    use crate::catalog::GPU_BACKENDS;
    let is_backend = |p: &Path| {
        let name = p.file_name()?.to_string_lossy().into_owned();
        GPU_BACKENDS
            .iter()
            .any(|(lib, _)| {
                name.starts_with(&format!("{lib}.")) || name.starts_with(&format!("{lib}-"))
            })
            .then_some(name)
    };
    if let Some(n) = files.iter().find_map(|f| is_backend(&f.path)) {
        return Some(n);
    }
    // Beside a ggml library: backends loaded later with dlopen.
    let dirs: std::collections::BTreeSet<PathBuf> = files
        .iter()
        .filter(|f| {
            f.path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libggml"))
        })
        .filter_map(|f| f.host_path.parent().map(Path::to_path_buf))
        .collect();
    for d in dirs {
        if let Some(n) = fs::read_dir(&d)
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|e| is_backend(&e.path()))
        {
            return Some(n);
        }
    }
    linked
}

impl Plan {
    /// The layout the probes read this process's structs with.
    pub fn process_layout(&self) -> probe_common::ProcessLayout {
        targets::process_layout(&self.layout.layout, &self.server_layout.layout)
    }

    /// Whether a function with entry program `entry` is probed.
    pub fn probes_entry(&self, entry: &str) -> bool {
        self.probes.iter().any(|p| p.point.entry == entry)
    }

    /// Families none of whose functions was found.
    pub fn unmeasured_families(&self) -> Vec<crate::catalog::Family> {
        let mut out: Vec<_> = self
            .missing
            .iter()
            .map(|m| m.family)
            .filter(|f| !self.probes.iter().any(|p| p.point.family == *f))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Builds the plan from the files of one process (or one file). Unreadable files (e.g. the
    /// vdso, deleted files) are skipped.
    pub fn build(
        files: &[MappedFile],
        what: &str,
        from: Option<&SymbolsFrom>,
    ) -> Result<Plan, ElfError> {
        let mut from_applied = false;
        let plan = Self::build_with(files, what, |f| {
            let r = resolve_file(f, from)?;
            from_applied |= r.symbols_from;
            Ok(r)
        });
        if let (Some(from), false) = (from, from_applied) {
            return Err(ElfError::SymbolsFromUnmatched {
                path: from.path.clone(),
                what: what.to_string(),
            });
        }
        plan
    }

    /// [`Plan::build`] with each file's symbols from `resolve` (the host agent reads a file
    /// once for every process that maps it).
    pub fn build_with(
        files: &[MappedFile],
        what: &str,
        mut resolve: impl FnMut(&MappedFile) -> Result<FileSymbols, ElfError>,
    ) -> Result<Plan, ElfError> {
        let mut resolved = Vec::new();
        let mut stripped = Vec::new();
        let mut linked_gpu = None;
        let mut denied = Vec::new();
        for f in files {
            match resolve(f) {
                Ok(r) => {
                    if let (None, Some(init)) = (&linked_gpu, r.gpu_init) {
                        linked_gpu = Some(format!("{init} in {}", r.file.path.display()));
                    }
                    if !r.hits.is_empty() {
                        resolved.push(r);
                    } else if !r.has_symtab && r.looks_like_llama {
                        stripped.push(r.file.path.clone());
                    }
                }
                Err(ElfError::Read { source, .. })
                    if source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    denied.push(f.path.clone());
                }
                Err(e) => tracing::debug!("skipping {}: {e}", f.host_path.display()),
            }
        }
        let has = |s: &str| resolved.iter().any(|r| r.hits.contains_key(s));
        if targets::detect_generation(has).is_none() && !denied.is_empty() {
            return Err(ElfError::FilesUnreadable {
                what: what.to_string(),
                n: denied.len(),
                example: denied[0].clone(),
            });
        }
        let Some(generation) = targets::detect_generation(has) else {
            let hint = if stripped.is_empty() {
                "Is this a llama.cpp program (llama-server, llama-cli, or a program linked with \
                 libllama)? If llama.cpp is linked statically and stripped, use an unstripped build \
                 or --symbols-from FILE."
                    .to_string()
            } else {
                format!(
                    "{} contain(s) llama.cpp code but no symbol table (stripped): none of the \
                     functions llamaprobe probes ({}) can be found. Use an unstripped build, or \
                     point --symbols-from FILE at an unstripped copy of the same build or its \
                     separate debug file.",
                    stripped
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    PROBES
                        .iter()
                        .map(|p| p.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return Err(ElfError::NotLlama {
                what: what.to_string(),
                n_files: files.len(),
                hint,
            });
        };
        let mut probes = Vec::new();
        let mut missing = Vec::new();
        for point in PROBES.iter().filter(|p| p.applies_to(generation)) {
            let mut found = false;
            for r in &resolved {
                if let Some(hit) = r.hits.get(point.symbol) {
                    found = true;
                    probes.push(PlannedProbe {
                        point,
                        target: r.file.host_path.clone(),
                        path: r.file.path.clone(),
                        hit: hit.clone(),
                    });
                }
            }
            if !found {
                missing.push(point);
            }
        }
        let layout = targets::layout_for(generation, has);
        let server_layout = targets::server_layout_for(has);
        Ok(Plan {
            generation,
            probes,
            missing,
            files: resolved,
            gpu_backend: gpu_backend(files, linked_gpu),
            layout,
            server_layout,
        })
    }
}

/// Human-readable report of a plan (`llamaprobe symbols`).
pub fn render_plan(what: &str, plan: &Plan) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{what}");
    let _ = writeln!(s, "generation: {}", plan.generation.describe());
    let _ = writeln!(s, "struct layouts: {}", plan.layout.source);
    if plan.probes_entry(targets::TASK_POST) {
        let _ = writeln!(s, "server struct layouts: {}", plan.server_layout.source);
    }
    let _ = writeln!(s, "files with llama.cpp functions:");
    for f in &plan.files {
        let _ = writeln!(
            s,
            "  {} ({} functions; symbol table: {})",
            f.file.path.display(),
            f.hits.len(),
            if f.has_symtab { "yes" } else { "no, stripped" }
        );
    }
    let _ = writeln!(s, "would probe ({} functions):", plan.probes.len());
    for p in &plan.probes {
        let _ = writeln!(
            s,
            "  {:<15} {:<60} {} +{:#x} ({:?})",
            p.point.family.name(),
            p.point
                .prototype
                .split('(')
                .next()
                .unwrap_or(p.point.symbol),
            p.path.display(),
            p.hit.file_offset,
            p.hit.table
        );
    }
    if !plan.missing.is_empty() {
        let _ = writeln!(
            s,
            "not found (other versions' names, or not measured where a family has none above):"
        );
        for m in &plan.missing {
            let _ = writeln!(s, "  {:<15} {}", m.family.name(), m.name());
        }
    }
    let unmeasured = plan.unmeasured_families();
    if !unmeasured.is_empty() {
        let _ = writeln!(
            s,
            "not measured: {}",
            unmeasured
                .iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(path: &Path) -> MappedFile {
        MappedFile {
            path: path.to_path_buf(),
            host_path: path.to_path_buf(),
            dev: 0,
            inode: 0,
        }
    }

    #[test]
    fn gpu_backends_are_found_mapped_beside_ggml_or_linked_in() {
        let dir = std::env::temp_dir().join(format!("llamaprobe-gpu-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // Mapped by name.
        let cuda = dir.join("libggml-cuda.so");
        fs::write(&cuda, b"").unwrap();
        assert_eq!(
            gpu_backend(&[mapped(&cuda)], None).as_deref(),
            Some("libggml-cuda.so")
        );
        // Not mapped, but installed beside the mapped libggml (loaded later with dlopen).
        fs::remove_file(&cuda).unwrap();
        let ggml = dir.join("libggml.so.0");
        fs::write(&ggml, b"").unwrap();
        assert_eq!(gpu_backend(&[mapped(&ggml)], None), None);
        fs::write(dir.join("libggml-vulkan.so"), b"").unwrap();
        assert_eq!(
            gpu_backend(&[mapped(&ggml)], None).as_deref(),
            Some("libggml-vulkan.so")
        );
        // Linked in: the backend's init function in a binary.
        let src = dir.join("static.c");
        fs::write(&src, "int ggml_backend_cuda_init(void) { return 1; }\nint main(void) { return ggml_backend_cuda_init(); }\n").unwrap();
        let exe = dir.join("static");
        let st = std::process::Command::new("gcc")
            .arg("-o")
            .arg(&exe)
            .arg(&src)
            .status()
            .unwrap();
        assert!(st.success());
        let r = resolve_file(&mapped(&exe), None).unwrap();
        assert_eq!(r.gpu_init, Some("ggml_backend_cuda_init"));
        // A CPU-only process has none.
        let sh = crate::discover::which("sh").unwrap();
        let files = crate::discover::planned_files(&sh).unwrap();
        assert!(files
            .iter()
            .filter_map(|f| resolve_file(f, None).ok())
            .all(|r| r.gpu_init.is_none()));
        assert_eq!(gpu_backend(&files, None), None);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_ordinary_program_is_not_llama() {
        let sh = crate::discover::which("sh").unwrap();
        let files = crate::discover::planned_files(&sh).unwrap();
        let err = Plan::build(&files, "sh", None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("defines none of llama.cpp's decode functions"),
            "{msg}"
        );
    }

    /// Found by the elf_symbols fuzz target: a loadable segment whose file size reaches past
    /// 2^64 overflowed the translation of a symbol's address to its file offset.
    #[test]
    fn huge_segments_do_not_overflow_file_offsets() {
        let seed = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus/elf_symbols/seed-libllama-stub.so");
        let mut data = fs::read(seed).unwrap();
        let u16_at = |d: &[u8], at: usize| usize::from(u16::from_le_bytes([d[at], d[at + 1]]));
        let phoff = u64::from_le_bytes(data[32..40].try_into().unwrap()) as usize;
        let (entsize, count) = (u16_at(&data, 54), u16_at(&data, 56));
        let good = resolve_bytes(mapped(Path::new("/x/libllama.so")), &data, None).unwrap();
        assert!(good.hits.contains_key("llama_decode"));
        for i in 0..count {
            let ph = phoff + i * entsize;
            if data[ph..ph + 4] == object::elf::PT_LOAD.to_le_bytes() {
                // p_filesz and p_memsz
                data[ph + 32..ph + 48]
                    .copy_from_slice(&[0x32, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff].repeat(2));
            }
        }
        let r = resolve_bytes(mapped(Path::new("/x/libllama.so")), &data, None).unwrap();
        assert!(r.hits.values().all(|h| h.file_offset < data.len() as u64));
        assert_eq!(r.hits["llama_decode"], good.hits["llama_decode"]);
    }

    #[test]
    fn file_offsets_match_the_symbol_in_libc() {
        // libc defines `getpid`; its file offset must land inside the file.
        let files = crate::discover::mapped_files(std::process::id()).unwrap();
        let libc = files
            .iter()
            .find(|f| f.path.to_string_lossy().contains("libc.so"))
            .unwrap();
        let data = fs::read(&libc.host_path).unwrap();
        let obj = object::File::parse(&*data).unwrap();
        let sym = obj
            .dynamic_symbols()
            .find(|s| s.name() == Ok("getpid"))
            .unwrap();
        let off = file_offset(&obj, sym.address()).unwrap();
        assert!(off < data.len() as u64);
    }
}
