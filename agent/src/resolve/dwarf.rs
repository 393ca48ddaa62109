//! Struct layouts from DWARF: how the layout table (`targets.rs`) is extended to a new
//! llama.cpp version. Build that version once with `-g` (e.g. `RelWithDebInfo`), run
//! `llamaprobe layout FILE`, and compare or copy the offsets; a test checks the table against
//! the DWARF of a `-g` fixture.
//!
//! The offsets are found by name, through members and base classes, so the libstdc++ internals
//! (`std::vector::_M_start`, `std::unordered_set`'s `_M_before_begin._M_nxt`, the hash node's
//! `_M_storage`) come out of the same walk as llama.cpp's own fields.

use std::{borrow::Cow, collections::HashMap, path::Path};

use super::error::ElfError;
use crate::catalog::{Generation, LlamaLayout, LAYOUTS};
use gimli::{AttributeValue, EndianSlice, RunTimeEndian, UnitOffset};
use object::{Object, ObjectSection};
use probe_common::{BatchExtLayout, ClassicBatchLayout, ContextParamsLayout};

/// The layouts found; `None` where the file's DWARF lacks the type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DwarfLayouts {
    pub classic: Option<ClassicBatchLayout>,
    pub ext: Option<BatchExtLayout>,
    pub ctx_params: Option<ContextParamsLayout>,
}

/// A struct-like type of one unit.
#[derive(Default, Debug)]
struct Node {
    name: Option<String>,
    size: Option<u64>,
    /// For typedefs, const, volatile: the type they stand for.
    target: Option<UnitOffset>,
    /// Members and base classes: (name, offset, type); base classes have no name.
    fields: Vec<(Option<String>, u64, Option<UnitOffset>)>,
    parent: Option<UnitOffset>,
    declaration: bool,
}

/// The types of one compilation unit.
struct Types {
    nodes: HashMap<UnitOffset, Node>,
}

impl Types {
    /// Follows typedefs and qualifiers.
    fn resolve(&self, mut off: UnitOffset) -> Option<&Node> {
        for _ in 0..16 {
            let n = self.nodes.get(&off)?;
            match n.target {
                Some(t) if n.fields.is_empty() && n.size.is_none() => off = t,
                _ => return Some(n),
            }
        }
        None
    }

    /// A complete struct named `name` (optionally nested in a struct named `parent`).
    fn find(&self, name: &str, parent: Option<&str>) -> Option<&Node> {
        self.nodes.values().find(|n| {
            !n.declaration
                && n.size.is_some()
                && n.name.as_deref() == Some(name)
                && match parent {
                    None => true,
                    Some(p) => {
                        n.parent
                            .and_then(|o| self.nodes.get(&o))
                            .and_then(|pn| pn.name.as_deref())
                            == Some(p)
                    }
                }
        })
    }

    /// Offset of a direct member.
    fn member(&self, n: &Node, name: &str) -> Option<(u64, Option<UnitOffset>)> {
        n.fields
            .iter()
            .find(|(m, _, _)| m.as_deref() == Some(name))
            .map(|(_, off, ty)| (*off, *ty))
    }

    /// Offset of a member found anywhere below `n` (members, base classes, recursively).
    fn deep(&self, n: &Node, name: &str, depth: u32) -> Option<u64> {
        if let Some((off, _)) = self.member(n, name) {
            return Some(off);
        }
        if depth == 0 {
            return None;
        }
        n.fields.iter().find_map(|(_, off, ty)| {
            let child = self.resolve((*ty)?)?;
            Some(off + self.deep(child, name, depth - 1)?)
        })
    }

    fn offsets<const N: usize>(&self, n: &Node, names: [&str; N]) -> Option<[u32; N]> {
        let mut out = [0u32; N];
        for (o, name) in out.iter_mut().zip(names) {
            *o = u32::try_from(self.member(n, name)?.0).ok()?;
        }
        Some(out)
    }

    fn classic(&self) -> Option<ClassicBatchLayout> {
        let b = self.find("llama_batch", None)?;
        let [n_tokens, token, pos, seq_id, logits] =
            self.offsets(b, ["n_tokens", "token", "pos", "seq_id", "logits"])?;
        Some(ClassicBatchLayout {
            n_tokens,
            token,
            pos,
            seq_id,
            logits,
        })
    }

    fn ctx_params(&self) -> Option<ContextParamsLayout> {
        let p = self.find("llama_context_params", None)?;
        let [n_ctx, n_batch, n_ubatch, n_seq_max, n_threads, n_threads_batch] = self.offsets(
            p,
            [
                "n_ctx",
                "n_batch",
                "n_ubatch",
                "n_seq_max",
                "n_threads",
                "n_threads_batch",
            ],
        )?;
        Some(ContextParamsLayout {
            n_ctx,
            n_batch,
            n_ubatch,
            n_seq_max,
            n_threads,
            n_threads_batch,
        })
    }

    /// The batch_ext layout; `node_value` comes from the hash node type, maybe in another unit.
    fn ext(&self, node_value: u32) -> Option<BatchExtLayout> {
        let b = self.find("llama_batch_ext", None)?;
        let t = self.find("token", Some("llama_batch_ext"))?;
        let (tokens, tokens_ty) = self.member(b, "tokens")?;
        let start = self.deep(self.resolve(tokens_ty?)?, "_M_start", 6)?;
        let (seq_ids, set_ty) = self.member(t, "seq_ids")?;
        let first = self.deep(self.resolve(set_ty?)?, "_M_before_begin", 6)?;
        let [id, output, pos] = self.offsets(t, ["id", "output", "pos"])?;
        Some(BatchExtLayout {
            tokens_vec: u32::try_from(tokens + start).ok()?,
            token_size: u32::try_from(t.size?).ok()?,
            token_id: id,
            token_output: output,
            // _Hash_node_base::_M_nxt is the only member of _M_before_begin.
            token_seq_first_node: u32::try_from(seq_ids + first).ok()?,
            seq_node_value: node_value,
            token_pos: pos,
        })
    }

    /// Offset of the value in a libstdc++ hash-set node of `int` (`_Hash_node<int, false>`).
    fn node_value(&self) -> Option<u32> {
        let n = self.find("_Hash_node<int, false>", None)?;
        u32::try_from(self.deep(n, "_M_storage", 4)?).ok()
    }
}

fn attr_u64(v: AttributeValue<EndianSlice<RunTimeEndian>>) -> Option<u64> {
    match v {
        AttributeValue::Udata(x) => Some(x),
        AttributeValue::Data1(x) => Some(x.into()),
        AttributeValue::Data2(x) => Some(x.into()),
        AttributeValue::Data4(x) => Some(x.into()),
        AttributeValue::Data8(x) => Some(x),
        AttributeValue::Sdata(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

/// Reads the layouts of llama.cpp's structs from a file's DWARF.
pub fn read(path: &Path) -> Result<DwarfLayouts, ElfError> {
    let p = path.to_path_buf();
    let data = super::error::map(path)?;
    let obj = super::error::parse(path, &data)?;
    if obj.section_by_name(".debug_info").is_none() {
        return Err(ElfError::NoDwarf { path: p });
    }
    let endian = if obj.is_little_endian() {
        RunTimeEndian::Little
    } else {
        RunTimeEndian::Big
    };
    let sections = gimli::DwarfSections::load(|id| -> Result<Cow<[u8]>, gimli::Error> {
        Ok(obj
            .section_by_name(id.name())
            .and_then(|s| s.uncompressed_data().ok())
            .unwrap_or(Cow::Borrowed(&[])))
    })
    .map_err(|source| ElfError::Dwarf {
        path: p.clone(),
        source,
    })?;
    let dwarf = sections.borrow(|s| EndianSlice::new(s, endian));
    let gerr = |source| ElfError::Dwarf {
        path: p.clone(),
        source,
    };

    let mut out = DwarfLayouts::default();
    let mut node_value = None;
    let mut ext_pending: Option<Types> = None;
    let mut units = dwarf.units();
    while let Some(header) = units.next().map_err(gerr)? {
        let unit = dwarf.unit(header).map_err(gerr)?;
        let types = collect(&dwarf, &unit).map_err(gerr)?;
        if out.classic.is_none() {
            out.classic = types.classic();
        }
        if out.ctx_params.is_none() {
            out.ctx_params = types.ctx_params();
        }
        if node_value.is_none() {
            node_value = types.node_value();
        }
        if out.ext.is_none()
            && ext_pending.is_none()
            && types.find("llama_batch_ext", None).is_some()
        {
            ext_pending = Some(types);
        }
        if out.classic.is_some()
            && out.ctx_params.is_some()
            && node_value.is_some()
            && ext_pending.is_some()
        {
            break;
        }
    }
    if let (Some(t), Some(v)) = (ext_pending, node_value) {
        out.ext = t.ext(v);
    }
    Ok(out)
}

/// The struct-like types of one unit, with their members.
fn collect(
    dwarf: &gimli::Dwarf<EndianSlice<RunTimeEndian>>,
    unit: &gimli::Unit<EndianSlice<RunTimeEndian>>,
) -> gimli::Result<Types> {
    use gimli::constants as dw;
    let mut nodes: HashMap<UnitOffset, Node> = HashMap::new();
    // Stack of (depth, offset) of enclosing entries that are types.
    let mut stack: Vec<(isize, UnitOffset)> = Vec::new();
    let mut depth: isize = 0;
    let mut entries = unit.entries();
    while let Some((delta, e)) = entries.next_dfs()? {
        depth += delta;
        while stack.last().is_some_and(|(d, _)| *d >= depth) {
            stack.pop();
        }
        let tag = e.tag();
        let name = || -> Option<String> {
            let v = e.attr_value(dw::DW_AT_name).ok()??;
            let s = dwarf.attr_string(unit, v).ok()?;
            Some(s.to_string_lossy().into_owned())
        };
        let type_ref = || match e.attr_value(dw::DW_AT_type).ok()? {
            Some(AttributeValue::UnitRef(o)) => Some(o),
            _ => None,
        };
        match tag {
            dw::DW_TAG_structure_type
            | dw::DW_TAG_class_type
            | dw::DW_TAG_union_type
            | dw::DW_TAG_typedef
            | dw::DW_TAG_const_type
            | dw::DW_TAG_volatile_type => {
                let node = Node {
                    name: name(),
                    size: e.attr_value(dw::DW_AT_byte_size)?.and_then(attr_u64),
                    target: type_ref(),
                    fields: Vec::new(),
                    parent: stack.last().map(|(_, o)| *o),
                    declaration: e.attr_value(dw::DW_AT_declaration)?.is_some(),
                };
                nodes.insert(e.offset(), node);
                stack.push((depth, e.offset()));
            }
            dw::DW_TAG_member | dw::DW_TAG_inheritance => {
                let Some((d, parent)) = stack.last() else {
                    continue;
                };
                if *d != depth - 1 {
                    continue;
                }
                let Some(off) = e
                    .attr_value(dw::DW_AT_data_member_location)?
                    .and_then(attr_u64)
                else {
                    continue; // static members have no location
                };
                let field = (
                    if tag == dw::DW_TAG_member {
                        name()
                    } else {
                        None
                    },
                    off,
                    type_ref(),
                );
                if let Some(n) = nodes.get_mut(parent) {
                    n.fields.push(field);
                }
            }
            _ => {}
        }
    }
    Ok(Types { nodes })
}
/// A report of DWARF-derived layouts against the table (`llamaprobe layout`).
pub fn compare_with_table(what: &str, found: &DwarfLayouts) -> String {
    use std::fmt::Write;
    let mut s = format!("{what}: struct layouts from DWARF\n");
    let mut line = |name: &str, found: Option<String>, table: Vec<(Generation, String)>| match found
    {
        None => {
            let _ = writeln!(s, "  {name}: not in this file's DWARF");
        }
        Some(f) => {
            let same: Vec<String> = table
                .iter()
                .filter(|(_, t)| *t == f)
                .map(|(g, _)| format!("{g:?}"))
                .collect();
            let verdict = if same.is_empty() {
                "differs from every table row: add a row to agent/src/catalog/layouts.rs"
                    .to_string()
            } else {
                format!("matches the table row(s) {}", same.join(", "))
            };
            let _ = writeln!(s, "  {name}: {f}\n    {verdict}");
        }
    };
    let table = |f: &dyn Fn(&LlamaLayout) -> String| {
        LAYOUTS
            .iter()
            .map(|r| (r.generation, f(&r.layout)))
            .collect::<Vec<_>>()
    };
    line(
        "llama_batch",
        found.classic.map(|l| format!("{l:?}")),
        table(&|l| format!("{:?}", l.classic)),
    );
    line(
        "llama_batch_ext",
        found.ext.map(|l| format!("{l:?}")),
        table(&|l| format!("{:?}", l.ext)),
    );
    line(
        "llama_context_params",
        found.ctx_params.map(|l| format!("{l:?}")),
        table(&|l| format!("{:?}", l.ctx_params)),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::layout_for;

    /// The batch_ext layout row against the compiler: the fake (tests/fake) defines
    /// `llama_batch_ext` field for field as llama.cpp does, and `layout_ext` prints offsetof.
    #[test]
    fn batch_ext_layout_matches_the_compiler() {
        let dir = crate::test_support::fakes();
        let printed = std::process::Command::new(dir.join("ext/layout_ext"))
            .output()
            .unwrap();
        let text = String::from_utf8(printed.stdout).unwrap();
        let get = |k: &str| -> u32 {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} missing in {text}"))
                .parse()
                .unwrap()
        };
        let l = layout_for(Generation::BatchExt, |_| false).layout.ext;
        assert_eq!(l.tokens_vec, get("tokens") + get("vec_begin"));
        assert_eq!(l.token_size, get("token_size"));
        assert_eq!(l.token_id, get("id"));
        assert_eq!(l.token_output, get("output"));
        assert_eq!(l.token_seq_first_node, get("seq_ids") + get("uset_first"));
        assert_eq!(l.seq_node_value, get("node_value"));
        assert_eq!(l.token_pos, get("pos"));
    }

    /// The same rows derived from DWARF (`llamaprobe layout`): the batch_ext row from the
    /// fake's identical `llama_batch_ext`, the classic batch and the mid-2025 context params
    /// (the fake's) from its classic library.
    #[test]
    fn layouts_derived_from_dwarf_match_the_table() {
        let dir = crate::test_support::fakes();
        let ext = read(&dir.join("ext/layout_ext_g")).unwrap();
        assert_eq!(
            ext.ext,
            Some(layout_for(Generation::BatchExt, |_| false).layout.ext)
        );
        let classic = read(&dir.join("classic/libllama_g.so")).unwrap();
        let row = layout_for(Generation::Classic, |_| false).layout;
        assert_eq!(classic.classic, Some(row.classic));
        assert_eq!(classic.ctx_params, Some(row.ctx_params));
        let report = compare_with_table("fake", &classic);
        assert!(
            report.contains("matches the table row(s) BatchExt, Classic"),
            "{report}"
        );
        let err = read(&dir.join("ext/layout_ext")).unwrap_err();
        assert!(err.to_string().contains("build llama.cpp with -g"));
    }
}
