//! The one error type of reading ELF files and planning probes, and the two steps every reader
//! takes (map the file if it is ELF, parse it).

use std::path::{Path, PathBuf};

use crate::discover::{
    elf::{map_elf, map_elf_checked},
    MappedFile,
};

/// Errors of reading ELF files (symbols, DWARF) and of planning what to probe.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an ELF file")]
    NotElf { path: PathBuf },
    #[error("{path} is not an ELF file llamaprobe can read")]
    Parse {
        path: PathBuf,
        #[source]
        source: object::Error,
    },
    #[error("{path} has no DWARF (.debug_info): build llama.cpp with -g (CMAKE_BUILD_TYPE=RelWithDebInfo)")]
    NoDwarf { path: PathBuf },
    #[error("DWARF of {path} is unreadable")]
    Dwarf {
        path: PathBuf,
        #[source]
        source: gimli::Error,
    },
    #[error(
        "{what} defines none of llama.cpp's decode functions (llama_decode, \
         llama_context::decode(llama_batch_ext const&)); checked {n_files} file(s). {hint}"
    )]
    NotLlama {
        what: String,
        n_files: usize,
        hint: String,
    },
    #[error(
        "{what}: {n} of its files cannot be read (permission denied, e.g. {example}): reading \
         another user's files needs CAP_DAC_READ_SEARCH (or run llamaprobe as root)"
    )]
    FilesUnreadable {
        what: String,
        n: usize,
        example: PathBuf,
    },
    #[error(
        "--symbols-from {path} matches none of the files of {what} (compared GNU build ids, \
         then file names): give the unstripped copy or the debug file of the same build"
    )]
    SymbolsFromUnmatched { path: PathBuf, what: String },
}

/// Maps `path`, which must be an ELF file.
pub fn map(path: &Path) -> Result<memmap2::Mmap, ElfError> {
    map_elf(path)
        .map_err(|source| ElfError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| ElfError::NotElf {
            path: path.to_path_buf(),
        })
}

/// Maps a file a process maps, which must be ELF: the file opened is checked to be the one
/// its maps name (by inode; 0 is "not known") before anything of it is read.
pub fn map_mapped(file: &MappedFile) -> Result<memmap2::Mmap, ElfError> {
    let path = &file.host_path;
    map_elf_checked(path, (file.inode != 0).then_some(file.inode))
        .map_err(|source| ElfError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| ElfError::NotElf {
            path: path.to_path_buf(),
        })
}

/// Parses the ELF image `data` of `path`.
pub fn parse<'a>(path: &Path, data: &'a [u8]) -> Result<object::File<'a>, ElfError> {
    object::File::parse(data).map_err(|source| ElfError::Parse {
        path: path.to_path_buf(),
        source,
    })
}
