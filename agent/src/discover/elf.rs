//! Opening a process's files as ELF images, without reading them whole (a process maps
//! multi-GiB models beside its libraries).

use std::{fs, path::Path};

/// Maps a file if it is an ELF file; `None` for anything else (a mapped model, a font, a
/// locale archive). Files are mapped, never read whole: a process maps multi-GiB models.
pub fn map_elf(path: &Path) -> std::io::Result<Option<memmap2::Mmap>> {
    use std::io::Read;
    let mut f = fs::File::open(path)?;
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_err() || &magic != b"\x7fELF" {
        return Ok(None);
    }
    // SAFETY: read-only mapping; a file truncated under us can fault, as with any mapped
    // binary; llamaprobe only reads program images and libraries.
    let map = unsafe { memmap2::Mmap::map(&f)? };
    Ok(Some(map))
}

/// ELF interpreter (`PT_INTERP`) of an executable image, if dynamically linked.
pub fn interpreter(data: &[u8]) -> Result<Option<String>, object::Error> {
    use object::read::elf::{ElfFile64, ProgramHeader};
    let elf = ElfFile64::<object::Endianness>::parse(data)?;
    let endian = elf.endian();
    for ph in elf.elf_program_headers() {
        if ph.p_type(endian) == object::elf::PT_INTERP {
            if let Ok(Some(bytes)) = ph.interpreter(endian, data) {
                return Ok(Some(String::from_utf8_lossy(bytes).into_owned()));
            }
        }
    }
    Ok(None)
}
