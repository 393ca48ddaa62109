//! `--flamegraph FILE.svg`: the samples' stacks as a flame graph (inferno), the phase as each
//! stack's root frame.

use std::io::Write;

use super::Tally;

/// The stacks in the folded format (`phase;outer;…;leaf count`), sorted.
/// Stacks of different processes and requests are one.
pub(super) fn folded(t: &Tally) -> Vec<String> {
    let mut stacks: std::collections::BTreeMap<String, u64> = Default::default();
    for ((phase, _pid, _requests, frames), n) in &t.stacks {
        let mut line = phase.label().to_string();
        for (function, _) in frames.iter().rev() {
            line.push(';');
            // ';' separates frames and the last ' ' the count.
            line.push_str(&function.replace([';', ' '], "_"));
        }
        *stacks.entry(line).or_default() += n;
    }
    stacks
        .into_iter()
        .map(|(line, n)| format!("{line} {n}"))
        .collect()
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
