//! `cargo xtask compat [--write]`: the compatibility table, generated from the fixture table
//! (`fixtures::FIXTURES`), printed or written into README.md between the markers.

use std::fs;

use anyhow::{Context, Result};

use crate::{
    fixtures,
    util::{self, progress},
};

pub const START: &str = "<!-- compat:start -->";
pub const END: &str = "<!-- compat:end -->";

pub fn run(write: bool) -> Result<()> {
    let table = fixtures::compat_table();
    let path = util::workspace_root().join("README.md");
    let readme =
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    if !write {
        print!("{table}");
        if between_markers(&readme).map(str::trim) != Some(table.trim()) {
            progress!(
                "{}'s table differs: `cargo xtask compat --write` updates it",
                path.display()
            );
        }
        return Ok(());
    }
    let updated = replace_between_markers(&readme, &table).with_context(|| {
        format!(
            "{} has no {START} … {END} markers: add them where the table goes",
            path.display()
        )
    })?;
    if updated == readme {
        progress!("{}: the compatibility table is current", path.display());
    } else {
        util::write_atomic(&path, updated.as_bytes())?;
        progress!("{}: compatibility table updated", path.display());
    }
    Ok(())
}

/// The text between the markers (None without both, in order).
pub fn between_markers(text: &str) -> Option<&str> {
    let start = text.find(START)? + START.len();
    let end = start + text[start..].find(END)?;
    Some(&text[start..end])
}

/// `text` with what is between the markers replaced by `table` (on its own lines).
pub fn replace_between_markers(text: &str, table: &str) -> Option<String> {
    let start = text.find(START)? + START.len();
    let end = start + text[start..].find(END)?;
    let table = table.trim_end();
    Some(format!("{}\n{table}\n{}", &text[..start], &text[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_between_the_markers() {
        let text = format!("a\n{START}\nold\n{END}\nb\n");
        let new = replace_between_markers(&text, "| x |\n").unwrap();
        assert_eq!(new, format!("a\n{START}\n| x |\n{END}\nb\n"));
        assert_eq!(between_markers(&new).unwrap().trim(), "| x |");
        assert_eq!(replace_between_markers(&new, "| x |").unwrap(), new);
        assert!(replace_between_markers("no markers", "t").is_none());
        assert!(between_markers(&format!("{END} {START}")).is_none());
    }
}
