//! The one fact the exit tracepoint needs from the running kernel's type information
//! (`/sys/kernel/btf/vmlinux`): where `task_struct.exit_code` lies. The program reads the
//! exiting task's status at that offset: CO-RE done by the agent at load time, because Rust eBPF
//! programs carry no field relocations.
//!
//! A reader of BTF's type section just deep enough to find a struct member's offset (directly,
//! or inside anonymous structs and unions, as randomized layouts put them). The input is the
//! kernel's own file, but it is still checked: every length and index is bounded, and a
//! malformed file gives an error, never a panic.

/// Where the running kernel describes its types.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
/// How deep anonymous members are followed.
const MAX_NESTING: u32 = 8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF (bad magic or header)")]
    Header,
    #[error("truncated type section")]
    Truncated,
    #[error("unknown BTF type kind {0}")]
    Kind(u32),
    #[error("no struct {0}")]
    NoStruct(String),
    #[error("struct {0} has no member {1}")]
    NoMember(String, String),
    #[error("{0}.{1} is a bitfield")]
    Bitfield(String, String),
}

/// One type of the type section: where its members start, and what it is.
#[derive(Clone, Copy)]
struct Type {
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    /// Offset of its trailing data (members) in the type section.
    data: usize,
}

struct Parsed<'a> {
    types: Vec<Type>,
    type_section: &'a [u8],
    strings: &'a [u8],
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at.checked_add(4)?)
        .map(|s| u32::from_ne_bytes(s.try_into().expect("4 bytes")))
}

fn parse(btf: &[u8]) -> Result<Parsed<'_>, BtfError> {
    let magic = btf
        .get(0..2)
        .map(|m| u16::from_ne_bytes([m[0], m[1]]))
        .ok_or(BtfError::Header)?;
    if magic != MAGIC {
        return Err(BtfError::Header);
    }
    let field = |i: usize| u32_at(btf, 4 + 4 * i).ok_or(BtfError::Header);
    let (hdr_len, type_off, type_len, str_off, str_len) =
        (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
    let section = |off: u32, len: u32| {
        let start = (hdr_len as usize).checked_add(off as usize)?;
        btf.get(start..start.checked_add(len as usize)?)
    };
    let type_section = section(type_off, type_len).ok_or(BtfError::Header)?;
    let strings = section(str_off, str_len).ok_or(BtfError::Header)?;
    // Type ids start at 1; id 0 is void.
    let mut types = vec![Type {
        name_off: 0,
        kind: 0,
        vlen: 0,
        kind_flag: false,
        data: 0,
    }];
    let mut at = 0usize;
    while at < type_section.len() {
        let name_off = u32_at(type_section, at).ok_or(BtfError::Truncated)?;
        let info = u32_at(type_section, at + 4).ok_or(BtfError::Truncated)?;
        let (kind, vlen) = ((info >> 24) & 0x1f, info & 0xffff);
        let data = at + 12;
        let extra = match kind {
            1 | 14 | 17 => 4,             // int, var, decl_tag
            3 => 12,                      // array
            4 | 5 | 15 | 19 => 12 * vlen, // struct, union, datasec, enum64
            6 | 13 => 8 * vlen,           // enum, func_proto
            2 | 7..=12 | 16 | 18 => 0,    // ptr, fwd, typedef, modifiers, func, float, type_tag
            k => return Err(BtfError::Kind(k)),
        } as usize;
        types.push(Type {
            name_off,
            kind,
            vlen,
            kind_flag: info >> 31 == 1,
            data,
        });
        at = data + extra;
    }
    if at != type_section.len() {
        return Err(BtfError::Truncated);
    }
    Ok(Parsed {
        types,
        type_section,
        strings,
    })
}

impl Parsed<'_> {
    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&c| c == 0).unwrap_or(rest.len())]
    }

    /// The byte offset of `member` in the struct or union `t`, looking through anonymous
    /// members.
    fn find(&self, t: Type, member: &str, depth: u32) -> Result<Option<u32>, BtfError> {
        for i in 0..t.vlen as usize {
            let m = t.data + 12 * i;
            let (name_off, ty, off) = (
                u32_at(self.type_section, m).ok_or(BtfError::Truncated)?,
                u32_at(self.type_section, m + 4).ok_or(BtfError::Truncated)?,
                u32_at(self.type_section, m + 8).ok_or(BtfError::Truncated)?,
            );
            let (bits, bitfield) = if t.kind_flag {
                (off & 0xff_ffff, off >> 24 != 0)
            } else {
                (off, false)
            };
            if name_off != 0 {
                if self.name(name_off) == member.as_bytes() {
                    if bitfield || !bits.is_multiple_of(8) {
                        return Err(BtfError::Bitfield(String::new(), member.into()));
                    }
                    return Ok(Some(bits / 8));
                }
            } else if depth < MAX_NESTING {
                if let Some(inner) = self.types.get(ty as usize).copied() {
                    if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                        if let Some(o) = self.find(inner, member, depth + 1)? {
                            return Ok(Some(bits / 8 + o));
                        }
                    }
                }
            }
        }
        Ok(None)
    }
}

/// The byte offset of `member` in `struct strukt`, as `btf` (a raw BTF file) describes it.
pub fn member_offset(btf: &[u8], strukt: &str, member: &str) -> Result<u32, BtfError> {
    let p = parse(btf)?;
    let t = p
        .types
        .iter()
        .find(|t| t.kind == KIND_STRUCT && t.vlen > 0 && p.name(t.name_off) == strukt.as_bytes())
        .copied()
        .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
    match p.find(t, member, 0) {
        Ok(Some(o)) => Ok(o),
        Ok(None) => Err(BtfError::NoMember(strukt.into(), member.into())),
        Err(BtfError::Bitfield(_, m)) => Err(BtfError::Bitfield(strukt.into(), m)),
        Err(e) => Err(e),
    }
}

/// Where the running kernel keeps a task's exit status (`task_struct.exit_code`).
pub fn task_exit_code_offset() -> Result<u32, String> {
    let btf = std::fs::read(VMLINUX_BTF).map_err(|e| format!("{VMLINUX_BTF}: {e}"))?;
    member_offset(&btf, "task_struct", "exit_code").map_err(|e| format!("{VMLINUX_BTF}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF file: `int`, and `struct s { int a; union { int b; struct { int c; }; }; int d:3; }`
    /// (the anonymous struct at byte 8 of the union, which is at byte 4).
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0c\0d\0";
        let name = |s: &str| {
            let pat = format!("\0{s}\0");
            strings
                .windows(pat.len())
                .position(|w| w == pat.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut t = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                t.extend_from_slice(&w.to_ne_bytes());
            }
        };
        let info = |kind: u32, vlen: u32, flag: bool| (u32::from(flag) << 31) | (kind << 24) | vlen;
        push(&[name("int"), info(1, 0, false), 4, 32]); // 1: int
        push(&[0, info(KIND_STRUCT, 1, false), 4, name("c"), 1, 0]); // 2: struct { int c; }
        push(&[0, info(KIND_UNION, 2, false), 12, name("b"), 1, 0, 0, 2, 64]); // 3: union
        push(&[
            name("s"),
            info(KIND_STRUCT, 3, true),
            20,
            name("a"),
            1,
            0,
            0,
            3,
            32,
            name("d"),
            1,
            (3 << 24) | 128,
        ]); // 4: struct s
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_ne_bytes());
        b.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            b.extend_from_slice(&w.to_ne_bytes());
        }
        b.extend_from_slice(&t);
        b.extend_from_slice(strings);
        b
    }

    #[test]
    fn members_are_found_directly_and_through_anonymous_members() {
        let b = sample();
        assert_eq!(member_offset(&b, "s", "a"), Ok(0));
        assert_eq!(member_offset(&b, "s", "b"), Ok(4));
        assert_eq!(member_offset(&b, "s", "c"), Ok(12));
        assert_eq!(
            member_offset(&b, "s", "d"),
            Err(BtfError::Bitfield("s".into(), "d".into()))
        );
        assert_eq!(
            member_offset(&b, "s", "e"),
            Err(BtfError::NoMember("s".into(), "e".into()))
        );
        assert_eq!(
            member_offset(&b, "t", "a"),
            Err(BtfError::NoStruct("t".into()))
        );
    }

    #[test]
    fn malformed_files_are_errors() {
        let b = sample();
        assert_eq!(member_offset(&b[..10], "s", "a"), Err(BtfError::Header));
        let mut bad = b.clone();
        bad[0] = 0;
        assert_eq!(member_offset(&bad, "s", "a"), Err(BtfError::Header));
        // Every truncation of the whole file: an error, never a panic.
        for n in 0..b.len() {
            assert!(member_offset(&b[..n], "s", "c").is_err(), "{n}");
        }
    }

    #[test]
    fn the_running_kernels_task_struct_has_an_exit_code() {
        match std::fs::read(VMLINUX_BTF) {
            Ok(btf) => {
                let off = member_offset(&btf, "task_struct", "exit_code").unwrap();
                // Deep inside the task (after its scheduling state, mm and more).
                assert!(off > 64 && off.is_multiple_of(4), "{off}");
            }
            Err(e) => eprintln!("skipped: {VMLINUX_BTF}: {e}"),
        }
    }
}
