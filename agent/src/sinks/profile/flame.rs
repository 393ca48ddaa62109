//! `--flamegraph FILE.svg`: the samples' stacks as a flame graph (inferno), the phase as each
//! stack's root frame.

use std::io::Write;

use super::Tally;

/// The stacks in the folded format (`phase;outer;…;leaf count`), sorted.
pub(super) fn folded(t: &Tally) -> Vec<String> {
    let mut lines: Vec<String> = t
        .stacks
        .iter()
        .map(|((phase, _pid, frames), n)| {
            let mut line = phase.label().to_string();
            for (function, _) in frames.iter().rev() {
                line.push(';');
                // ';' separates frames and the last ' ' the count.
                line.push_str(&function.replace([';', ' '], "_"));
            }
            format!("{line} {n}")
        })
        .collect();
    lines.sort();
    lines
}

pub(super) fn write(t: &Tally, out: impl Write) -> anyhow::Result<()> {
    let lines = folded(t);
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = "llamaprobe CPU profile".into();
    opts.count_name = "samples".into();
    if lines.is_empty() {
        // inferno refuses an empty input: say so in the picture instead.
        return Ok(inferno::flamegraph::from_lines(
            &mut opts,
            ["no_samples 1"].iter().copied(),
            out,
        )?);
    }
    inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), out)?;
    Ok(())
}
