//! Markdown pieces every section of the report writes: tables, problem lists, verdicts.

use std::fmt::Write as _;

/// A section's problems as a list (and the blank line after it), if there are any.
pub fn problems(o: &mut String, problems: &[String]) {
    for problem in problems {
        let _ = writeln!(o, "- **Problem:** {problem}");
    }
    if !problems.is_empty() {
        let _ = writeln!(o);
    }
}

/// A markdown table: the header, the `|---|` rule, the rows, then a blank line. A row shorter
/// than the header ends in empty cells; `|` in a cell is escaped, a line break becomes a space.
pub fn table(o: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let line = |o: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        o.push('|');
        for cell in cells.chain(std::iter::repeat("")).take(header.len()) {
            if cell.is_empty() {
                o.push_str(" |");
            } else {
                let _ = write!(o, " {} |", cell.replace('|', "\\|").replace('\n', " "));
            }
        }
        o.push('\n');
    };
    line(o, &mut header.iter().copied());
    let _ = writeln!(o, "|{}", "---|".repeat(header.len()));
    for row in rows {
        line(o, &mut row.iter().map(String::as_str));
    }
    o.push('\n');
}

pub fn verdict(met: bool) -> &'static str {
    if met {
        "**met**"
    } else {
        "**missed**"
    }
}
