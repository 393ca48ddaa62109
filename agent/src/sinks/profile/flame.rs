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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CpuPhase, CpuSample};

    fn sample(pid: u32, requests: Vec<u64>, frames: &[&str]) -> CpuSample {
        super::super::test_sample(pid, CpuPhase::Generation, requests, frames)
    }

    /// The pprof file keeps processes and requests apart; the flame graph draws one stack.
    #[test]
    fn stacks_of_other_processes_and_requests_are_one() {
        let mut t = Tally::new(true);
        t.add(&sample(1, vec![3], &["leaf", "main"]));
        t.add(&sample(2, vec![4, 5], &["leaf", "main"]));
        t.add(&sample(2, Vec::new(), &["odd name;x", "main"]));
        assert_eq!(
            folded(&t),
            ["generation;main;leaf 2", "generation;main;odd_name_x 1"]
        );
    }
}
