//! Opening a process's files as ELF images, without reading them whole (a process maps
//! multi-GiB models beside its libraries).

use std::path::Path;

use super::inroot;

/// Largest file taken as a program or library: it is mapped, never read whole, but nothing
/// bigger is one (a CUDA-enabled libggml with every architecture is a few GiB).
pub const MAX_ELF_BYTES: u64 = 16 << 30;

/// Maps a file if it is an ELF file; `None` for anything else (a mapped model, a font, a
/// locale archive). Files are mapped, never read whole: a process maps multi-GiB models.
/// Regular files only: anything else is not opened for reading (a FIFO would block, a device
/// has effects of its own) and is no ELF file.
pub fn map_elf(path: &Path) -> std::io::Result<Option<memmap2::Mmap>> {
    map_elf_checked(path, None)
}

/// [`map_elf`] of a file a process maps: when `inode` is given, the file opened must be the
/// one its maps name, checked before a byte of it is read (a path walked through
/// `/proc/PID/root` may lead elsewhere than to the mapped file).
pub fn map_elf_checked(path: &Path, inode: Option<u64>) -> std::io::Result<Option<memmap2::Mmap>> {
    use std::io::Read;
    let mut expect = inroot::Expect::new("program or library", MAX_ELF_BYTES);
    if let Some(inode) = inode {
        expect = expect.inode(inode);
    }
    let mut f = match inroot::open_object(path, expect) {
        Ok(o) => o.file,
        // A device, a FIFO, a directory: no program (and never opened for reading).
        Err(inroot::OpenError::NotRegular { .. }) => return Ok(None),
        Err(inroot::OpenError::Io { source, .. }) => return Err(source),
        Err(e) => return Err(std::io::Error::other(e)),
    };
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
