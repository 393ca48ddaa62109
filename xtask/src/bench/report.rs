//! The report: every section's results as the markdown of docs/BENCHMARKS.md (goals and the
//! first reasons for missed ones, one part per section, the before/after table of what the
//! benchmark changed), and the short summary printed on stdout.

use std::{fmt::Write as _, fs, path::Path, time::Duration};

use anyhow::Result;

use crate::util::{self, progress};

use super::{
    capacity::{Capacity, CapacityRow, HOT_PATH_TEST},
    daemon::{self, DaemonResult},
    hits::{Hits, HIT_COLUMNS, NEWEST_SYNC_ON},
    large_model::STEP_TARGET_MS,
    llama_server::{Completion, N_PREDICT, PROMPT, SERVER_ARGS},
    machine::Machine,
    markdown::{problems, table, verdict},
    per_call::PerCall,
    stats::{median, mib},
    synthetic::{bpftrace_program, Case, CASES},
    throughput::{
        AgentServer, Cond, ModelResult, ServerResult, CPU_TIME_SERVER_ARGS, DISTURBED_CORES,
        MAX_REPEATS,
    },
};

/// Goals (not assertions) the report is checked against.
const GOAL_THROUGHPUT: f64 = 0.99;
/// The same goal measured where it can be resolved: the traced process's own CPU time per
/// generated token with llamaprobe ≤ 1% above without.
const GOAL_CPU_OVERHEAD: f64 = 0.01;
const GOAL_PER_CALL: f64 = 1.15;
const GOAL_RSS_MIB: f64 = 40.0;

/// ns with a sensible precision.
fn ns(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// CPU per event; the CPU times are whole clock ticks (10 ms), so a smaller total is a bound.
fn us_per_event(cpu_ms: f64, events: u64) -> String {
    let events = events.max(1) as f64;
    if cpu_ms.is_nan() {
        "–".into()
    } else if cpu_ms < 10.0 {
        format!("< {:.2} µs", 10_000.0 / events)
    } else {
        format!("{:.1} µs", cpu_ms * 1000.0 / events)
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

pub struct Report {
    pub command: String,
    pub machine: Machine,
    pub quick: bool,
    pub runs: usize,
    pub per_call: Option<Result<PerCall, String>>,
    pub capacity: Option<Result<Capacity, String>>,
    pub server: Option<Result<ServerResult, String>>,
    pub hits: Option<Result<Hits, String>>,
    pub daemon: Option<Result<DaemonResult, String>>,
    pub load_end: String,
    pub took: Duration,
}

fn ok<T>(section: &Option<Result<T, String>>) -> Option<&T> {
    section.as_ref().and_then(|r| r.as_ref().ok())
}

/// Writes a section's heading and returns its results; for a section without results, writes
/// "not run" or the error instead.
fn section<'a, T>(
    o: &mut String,
    heading: &str,
    section: &'a Option<Result<T, String>>,
) -> Option<&'a T> {
    let _ = writeln!(o, "## {heading}\n");
    match section {
        None => {
            let _ = writeln!(o, "Not measured in this run (left out with `--only`).\n");
            None
        }
        Some(Err(e)) => {
            let _ = writeln!(o, "**Failed:** `{}`\n", e.replace('`', "'"));
            None
        }
        Some(Ok(results)) => Some(results),
    }
}

/// What the benchmark led to: each change with the figures measured before and after it (by
/// the runs named; the "after" of the latest is this report). Appended by hand when a change
/// moves a number; the figures are those the named runs printed, not re-measured here.
const HISTORY: &[[&str; 4]] = &[
    [
        "memory-map ELF files instead of reading them, skip the rest (ab84332)",
        "peak RSS on attach = the model's size: 363 MiB with a 363 MiB model (bench run on 2e35077)",
        "41 MB with a 627 MB model (debug build), 34.4 MiB peak under load (run on 3b3b51e)",
        "section 5",
    ],
    [
        "`--sync auto`: `llama_synchronize` probed only with a GPU backend (20ceba5)",
        "8.06 probe hits per generated token (newest, CPU build)",
        "4.06 (the `--sync on` row of section 3 is the former default)",
        "section 3",
    ],
    [
        "ring-buffer wake-ups batched: at 256 KiB, plus a 50 ms drain timer (70e330b)",
        "per-call cost 1.56 × the empty uprobe + uretprobe pair (run on 2e35077)",
        "1.07 × (run on 3b3b51e); this report: section 1",
        "section 1",
    ],
    [
        "Prometheus series handles resolved once per process: no `pid` formatting or label \
         hashing per event (6190424, 6ed8fdf)",
        "336 ns per decode step of 4 sequences in the sink (label lookup per event, the former \
         code, timed beside the new one)",
        "125 ns (run on 8df66b9)",
        "section 4, last line",
    ],
    [
        "host agent: the 50 ms drain backs off to 1 s while no event comes (7cf4981)",
        "idle daemon, no llama.cpp process: 0.31% of one core, 36 wake-ups/s (`perf record`: \
         the timer's wake-ups were 80% of it), on 7913698",
        "0.11%, 4 wake-ups/s (same host, `--rescan 1000`: 0.24% → 0.04%)",
        "section 6, idle",
    ],
    [
        "host agent: a rescan reads a process's maps only when its mapped size changed, and \
         takes vanished pids from its own `/proc` listing (7cf4981, b94a720)",
        "19 µs per process per rescan; idle with 4 servers traced 0.133% of one core",
        "9 µs; 0.101% (measured by hand beside the bench, 70 processes)",
        "section 6, rescans",
    ],
    [
        "host agent: a traced process's 1 Hz CPU/RSS sample is one open and one read of \
         `/proc/PID/stat` (1e43e32)",
        "idle with 4 servers traced: 0.101% of one core (the procfs crate opened and statx'd \
         `/proc/PID` first)",
        "0.097% (two 30 s windows by hand: 0.099%, 0.096%)",
        "section 6, idle",
    ],
    [
        "host agent: `malloc_trim` after start-up (7cf4981)",
        "idle RSS 33.2 MiB (14 MiB of heap freed after loading the probes, kept by glibc)",
        "19.9 MiB",
        "section 6, idle",
    ],
];

/// The before/after table of [`HISTORY`].
fn render_history(o: &mut String) {
    let _ = writeln!(o, "## What the benchmark changed\n");
    let rows: Vec<Vec<String>> = HISTORY
        .iter()
        .map(|r| r.iter().map(|c| c.to_string()).collect())
        .collect();
    table(o, &["change", "before", "after", "where now"], &rows);
}

/// Writes the report to `out` (docs/BENCHMARKS.md unless `--out`, `--quick` or `--only` says
/// otherwise) and prints its summary on stdout.
pub fn write(r: &Report, out: &Path) -> Result<()> {
    util::write_atomic(out, render(r).as_bytes())?;
    progress!(
        "bench: wrote {} in {}",
        out.display(),
        util::format_duration(r.took)
    );
    print_summary(r);
    Ok(())
}

fn render(r: &Report) -> String {
    let mut o = String::new();
    let m = &r.machine;
    let _ = writeln!(o, "# llamaprobe benchmarks\n");
    let _ = writeln!(
        o,
        "<!-- Generated by `cargo xtask bench` (xtask/src/bench.rs); rerun it rather than \
         editing by hand. -->\n"
    );
    let _ = writeln!(
        o,
        "What llamaprobe costs the program it profiles, measured by `{}` on {}.{}\n",
        r.command,
        m.date,
        if r.quick {
            " **`--quick` run: fewer iterations and requests; rough numbers.**"
        } else {
            ""
        }
    );
    table(
        &mut o,
        &["", ""],
        &[
            vec![
                "machine".into(),
                format!("`nproc` {}, {}, {} RAM", m.ncpu, m.cpu_model, m.mem),
            ],
            vec!["kernel (`uname -r`)".into(), m.kernel.clone()],
            vec![
                "load average (1/5/15 min)".into(),
                format!("{} at the start, {} at the end", m.load_start, r.load_end),
            ],
            vec![
                "llamaprobe".into(),
                format!("commit {} (release build)", m.commit),
            ],
            vec!["bpftrace".into(), m.bpftrace.clone()],
            vec![
                "runs".into(),
                format!(
                    "{} interleaved runs per case (the order rotates each run); medians, with \
                     the [min–max] of the runs",
                    r.runs
                ),
            ],
            vec!["took".into(), util::format_duration(r.took)],
        ],
    );
    let _ = writeln!(
        o,
        "Everything ran on this one machine, with whatever else it was running (see the load \
         average and the [min–max] spreads): on a shared VM, differences of a few percent \
         between runs are noise. Uprobes are expensive on virtual machines: the project's \
         toolchain notes put a probed call at about 10–15 µs on this kind of VM and 1–3 µs on \
         bare metal; every number here is this machine's.\n"
    );

    render_goals(&mut o, r);
    render_per_call(&mut o, r);
    render_server(&mut o, r);
    render_hits(&mut o, r);
    render_capacity(&mut o, r);
    render_footprint(&mut o, r);
    if let Some(d) = section(&mut o, "6. The host agent at node scale", &r.daemon) {
        daemon::markdown(d, &mut o);
    }
    render_history(&mut o);
    let _ = writeln!(o, "## Not measured\n");
    let otlp_measured = ok(&r.server).is_some_and(|s| s.conds.contains(&Cond::Otlp));
    if !otlp_measured {
        let _ = writeln!(
            o,
            "- OTLP export: not measured (this llamaprobe has none, or section 2 did not run)."
        );
    } else {
        let _ = writeln!(
            o,
            "- OTLP export to a real collector over a network (only llamaprobe's side, against \
             a local stand-in, is measured), and the gRPC transport."
        );
    }
    let _ = writeln!(
        o,
        "- GPU builds: these fixtures are CPU-only. With a GPU, `--sync auto` probes \
         `llama_synchronize` (where a GPU step completes); each probed call costs about what \
         section 1 measures.\n"
    );
    o
}

/// The CPU-time goal's row from runs `m`; `how` says which runs they are.
fn cpu_goal_row(r: &Report, m: &ModelResult, how: &str) -> Vec<String> {
    let (ratio, lo, hi) = m.target_cpu_paired(Cond::Default);
    let (base, _, _) = m.target_cpu(Cond::Without);
    let expected = expected_cpu_overhead(r, m, Cond::Default)
        .map(|e| format!("; expected from the probe hits: {}", signed_pct(e)))
        .unwrap_or_default();
    let limit = 1.0 + GOAL_CPU_OVERHEAD;
    let judged = if hi <= limit {
        format!(
            "{}; resolved: every paired run is within {}",
            verdict(true),
            pct(GOAL_CPU_OVERHEAD)
        )
    } else if lo > limit {
        format!(
            "{}; resolved: every paired run is above {}",
            verdict(false),
            pct(GOAL_CPU_OVERHEAD)
        )
    } else {
        format!(
            "{} by the median; **not resolved** at {}: the paired runs straddle it",
            verdict(ratio <= limit),
            pct(GOAL_CPU_OVERHEAD)
        )
    };
    vec![
        format!(
            "the traced server's CPU time per generated token with llamaprobe ≤ {} above \
             without, on a model with a ≥ {STEP_TARGET_MS:.0} ms decode step",
            pct(GOAL_CPU_OVERHEAD)
        ),
        format!(
            "{} [{} – {}] ({how}; {base:.0} µs of CPU per token without){expected}",
            signed_pct(ratio - 1.0),
            signed_pct(lo - 1.0),
            signed_pct(hi - 1.0),
        ),
        judged,
    ]
}

fn render_goals(o: &mut String, r: &Report) {
    let _ = writeln!(o, "## Goals\n");
    let mut rows: Vec<Vec<String>> = Vec::new();
    // The cost to the traced process's CPU time, then throughput, on the ≥ 10 ms model.
    let server = ok(&r.server);
    let cpu_runs = server.and_then(|s| {
        s.cpu_time
            .as_ref()
            .map(|(m, cpu)| {
                (
                    m,
                    format!("paired runs, one-thread server on CPU {cpu}, section 2"),
                )
            })
            .or_else(|| {
                s.models
                    .get(1)
                    .map(|m| (m, "paired runs of section 2".to_string()))
            })
    });
    if let Some((m, how)) = cpu_runs {
        rows.push(cpu_goal_row(r, m, &how));
    }
    match server.and_then(|s| s.models.get(1)) {
        Some(large) => {
            let base = large.stat(Cond::Without, |c| c.predicted_per_second);
            let with = large.stat(Cond::Default, |c| c.predicted_per_second);
            let step = large.stat(Cond::Without, |c| c.predicted_per_token_ms);
            let (ratio, lo, hi) = large.paired(Cond::Default, |c| c.predicted_per_second);
            let others: Vec<String> = large
                .conds
                .iter()
                .filter(|c| !matches!(c, Cond::Without | Cond::Default))
                .map(|c| {
                    let (r, _, _) = large.paired(*c, |x| x.predicted_per_second);
                    format!(
                        "{}: {}",
                        c.label().trim_start_matches("llamaprobe "),
                        pct(r)
                    )
                })
                .collect();
            let step_note = if step < STEP_TARGET_MS {
                " — **the step was below 10 ms in these runs**"
            } else {
                ""
            };
            rows.push(vec![
                format!(
                    "generation throughput with llamaprobe ≥ {} of without, on a model with a \
                     ≥ {STEP_TARGET_MS:.0} ms decode step",
                    pct(GOAL_THROUGHPUT)
                ),
                format!(
                    "{} [{}–{}] of without (medians {with:.1} vs {base:.1} tok/s; step \
                     {step:.1} ms{step_note}); {}",
                    pct(ratio),
                    pct(lo),
                    pct(hi),
                    others.join("; ")
                ),
                if lo < GOAL_THROUGHPUT && hi >= GOAL_THROUGHPUT {
                    format!(
                        "{} by the median; within this machine's noise (the paired runs \
                         straddle {})",
                        verdict(ratio >= GOAL_THROUGHPUT),
                        pct(GOAL_THROUGHPUT)
                    )
                } else {
                    verdict(ratio >= GOAL_THROUGHPUT).to_string()
                },
            ]);
        }
        None => rows.push(vec![
            format!(
                "generation throughput ≥ {} of without",
                pct(GOAL_THROUGHPUT)
            ),
            "not measured".into(),
        ]),
    }
    match ok(&r.per_call) {
        Some(p) => {
            match p.ratio(Case::Llamaprobe) {
                Some(ratio) => rows.push(vec![
                    format!(
                        "per-call cost ≤ {GOAL_PER_CALL:.2} × the empty uprobe + uretprobe pair"
                    ),
                    format!(
                        "{ratio:.2} × ({} vs {} ns)",
                        ns(p.overhead(Case::Llamaprobe).unwrap_or(f64::NAN)),
                        ns(p.overhead(Case::Empty).unwrap_or(f64::NAN))
                    ),
                    verdict(ratio <= GOAL_PER_CALL).into(),
                ]),
                None => rows.push(vec![
                    format!("per-call cost ≤ {GOAL_PER_CALL:.2} × the empty pair"),
                    "not measured (no bpftrace)".into(),
                ]),
            }
            if let (Some(c), Some(d)) = (p.median(Case::Llamaprobe), p.median(Case::Hist)) {
                rows.push(vec![
                    "per-call cost below bpftrace's latency histogram".into(),
                    format!("{} vs {} ns/call", ns(c), ns(d)),
                    verdict(c < d).into(),
                ]);
            }
        }
        None => rows.push(vec!["per-call cost".into(), "not measured".into()]),
    }
    let hwm = ok(&r.server).and_then(|s| {
        s.models
            .iter()
            .flat_map(|m| m.agents())
            .map(|(_, a)| a.hwm_kib)
            .max()
    });
    match hwm {
        Some(hwm) => rows.push(vec![
            format!("llamaprobe RSS ≤ {GOAL_RSS_MIB:.0} MiB under load"),
            format!("peak (VmHWM) {:.1} MiB", mib(hwm)),
            verdict(mib(hwm) <= GOAL_RSS_MIB).into(),
        ]),
        None => rows.push(vec!["RSS under load".into(), "not measured".into()]),
    }
    rows.extend(daemon::goal_rows(ok(&r.daemon)));
    table(o, &["goal", "measured", ""], &rows);
    render_reasons(o, r);
}

/// The first obvious reasons for missed goals, computed from the numbers.
fn render_reasons(o: &mut String, r: &Report) {
    let mut lines = Vec::new();
    let per_call = ok(&r.per_call);
    let newest = ok(&r.hits).and_then(|h| {
        h.rows
            .iter()
            .find(|row| row.fixture == "newest" && row.skipped.is_none())
    });
    if let (Some(p), Some(large)) = (per_call, ok(&r.server).and_then(|s| s.models.get(1))) {
        let (ratio, lo, hi) = large.paired(Cond::Default, |c| c.predicted_per_second);
        let step_ms = large.stat(Cond::Without, |c| c.predicted_per_token_ms);
        let sync_on = ok(&r.hits).and_then(|h| {
            h.rows
                .iter()
                .find(|row| row.fixture == NEWEST_SYNC_ON && row.skipped.is_none())
        });
        if let (Some(over), Some(row)) = (p.overhead(Case::Llamaprobe), newest) {
            let per_token_us = row.events_per_token() * over / 1000.0;
            let expected = step_ms / (step_ms + per_token_us / 1000.0);
            let verdict_text = if ratio < expected - 0.005 {
                format!(
                    "The measured loss is larger than expected: the rest is noise (see the \
                     spreads in section 2) or contention: the server runs `-t 2` on {} CPUs, so \
                     llamaprobe's wake-ups and CPU time (section 5) take a core from a ggml \
                     worker, and ggml's threads wait for each other at every step.",
                    r.machine.ncpu
                )
            } else {
                "The measured ratio is at or above the expected one: on this model the cost is \
                 below this machine's run-to-run noise."
                    .to_string()
            };
            lines.push(format!(
                "Expected cost per generated token: {:.2} probed calls per token on the newest \
                 llama-server (section 3) × {:.1} µs per probed call (section 1, case c) = \
                 {per_token_us:.0} µs, i.e. {} of the {step_ms:.1} ms step (a throughput of \
                 about {} of without); measured: {} (median of the paired runs, [{}–{}]). \
                 {verdict_text} On the tiny model the same per-token cost is a large share of a \
                 sub-millisecond step (section 2). The number of probed calls per token (and \
                 the cost of one) is what moves this{}.",
                row.events_per_token(),
                over / 1000.0,
                pct(per_token_us / 1000.0 / step_ms),
                pct(expected),
                pct(ratio),
                pct(lo),
                pct(hi),
                sync_on
                    .map(|s| format!(
                        ": probing `llama_synchronize` too (`--sync on`) makes it {:.2} per token",
                        s.events_per_token()
                    ))
                    .unwrap_or_default(),
            ));
        }
    }
    if let Some(p) = per_call {
        if let (Some(c), Some(b), Some(ratio)) = (
            p.overhead(Case::Llamaprobe),
            p.overhead(Case::Empty),
            p.ratio(Case::Llamaprobe),
        ) {
            if ratio > GOAL_PER_CALL {
                let paused = ok(&r.capacity)
                    .and_then(|cap| cap.rows.iter().find(|row| row.level.pause_agent))
                    .map(|row| row.run.out.ns_per_call);
                let delivery = match (paused, p.median(Case::Llamaprobe)) {
                    (Some(stopped), Some(live)) if live > 1.15 * stopped => format!(
                        " Delivering the events to llamaprobe is a large part of it: with \
                         llamaprobe stopped (section 4, last row: nothing reads, nothing is \
                         woken, and once the ring buffer is full nothing is copied) the same \
                         loop under the same probes ran at {} ns/call against {} here; waking \
                         the reader less often is the first thing to try.",
                        ns(stopped),
                        ns(live)
                    ),
                    (Some(stopped), Some(live)) => format!(
                        " Delivery to llamaprobe is not the difference: with llamaprobe stopped \
                         (section 4, last row) the loop ran at {} ns/call against {} here, so \
                         the cost is in the programs themselves.",
                        ns(stopped),
                        ns(live)
                    ),
                    _ => String::new(),
                };
                lines.push(format!(
                    "Per call, llamaprobe's programs add {} ns to the empty pair's {} ns. Besides \
                     the two hits, each call does a hash-map insert (entry) and a lookup and \
                     delete (return) keyed by thread, reads the 56-byte batch with \
                     `bpf_probe_read_user`, and writes one event to the ring buffer; bpftrace's \
                     histogram (case d) also updates and deletes a map entry per call but sends \
                     nothing to user space.{delivery}",
                    ns(c - b),
                    ns(b)
                ));
            }
        }
    }
    if let Some(p) = per_call {
        if let (Some(c), Some(d), Some((c_lo, c_hi)), Some((d_lo, d_hi))) = (
            p.median(Case::Llamaprobe),
            p.median(Case::Hist),
            p.spread(Case::Llamaprobe),
            p.spread(Case::Hist),
        ) {
            if c >= d {
                let overlap = c_lo <= d_hi && d_lo <= c_hi;
                lines.push(format!(
                    "llamaprobe's probed call costs {} ns more than bpftrace's latency histogram \
                     ({} vs {} ns, {}). Both pay the two traps and a per-thread map update and \
                     delete; llamaprobe also reads the 56-byte batch from user memory and writes \
                     an event to the ring buffer on every call, where the histogram only bumps a \
                     bucket.{}",
                    ns(c - d),
                    ns(c),
                    ns(d),
                    pct(c / d - 1.0).replace('%', "% more"),
                    if overlap {
                        " The [min–max] ranges of the two cases overlap: the difference is about \
                         this machine's run-to-run noise."
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    if let Some(s) = ok(&r.server) {
        let worst = s
            .models
            .iter()
            .flat_map(|m| m.agents().map(move |(_, a)| (m, a)))
            .max_by_key(|(_, a)| a.hwm_kib);
        if let Some((m, a)) = worst.filter(|(_, a)| mib(a.hwm_kib) > GOAL_RSS_MIB) {
            let model_mib = fs::metadata(&m.path).map_or(0.0, |md| md.len() as f64 / 1048576.0);
            let above = mib(a.hwm_kib) - mib(a.rss_kib);
            let explained = model_mib > 1.0 && (above - model_mib).abs() < 0.25 * model_mib;
            lines.push(format!(
                "The peak RSS ({:.1} MiB, {} model) is {above:.0} MiB above llamaprobe's RSS at the \
                 end of the same run ({:.1} MiB){}",
                mib(a.hwm_kib),
                m.label,
                mib(a.rss_kib),
                if explained {
                    format!(
                        ", about the size of the model file ({model_mib:.0} MiB): when attaching, \
                         llamaprobe reads each file the process maps whole to find symbols \
                         (`fs::read` in `resolve_file`, agent/src/resolve/mod.rs), the mmapped GGUF \
                         model included. A multi-GiB model would make that peak (and the attach \
                         time) that large; reading only ELF files, and only their headers and \
                         symbol tables, removes it."
                    )
                } else {
                    ".".to_string()
                }
            ));
        }
    }
    if !lines.is_empty() {
        let _ = writeln!(o, "Analysis (the first reasons for what is missed):\n");
        for l in lines {
            let _ = writeln!(o, "- {l}");
        }
        let _ = writeln!(o);
    }
}

fn render_per_call(o: &mut String, r: &Report) {
    let Some(p) = section(
        o,
        "1. Cost of one probed call (synthetic target)",
        &r.per_call,
    ) else {
        return;
    };
    let root = util::workspace_root();
    let lib = p.lib.strip_prefix(&root).unwrap_or(&p.lib).display();
    let _ = writeln!(
        o,
        "`xtask/assets/bench/`: `libllama.so` (gcc -O2) exports `int32_t llama_decode(void *ctx, \
         struct llama_batch batch)` with the real 56-byte `llama_batch` passed by value (pointers \
         NULL, `n_tokens` = 1; returns 0), plus `llama_synchronize` and `llama_sampler_sample` so \
         llamaprobe accepts it as a classic-API libllama. `bench_loop N` waits for a byte on \
         stdin (so every probe is attached first), makes 1000 warm-up calls, then times N = {} \
         calls with `clock_gettime(CLOCK_MONOTONIC)`. One probed call = 2 probe hits (entry + \
         return).\n",
        p.iterations
    );
    let mut rows = Vec::new();
    for case in CASES {
        let what = match case {
            Case::NoProbe => "nothing".to_string(),
            Case::Llamaprobe => {
                "`llamaprobe attach --pid <loop> --quiet --metrics-addr off --summary-json F`"
                    .to_string()
            }
            Case::ProfileCpu | Case::ProfileCpuLow => {
                format!(
                    "(c) with `--profile-cpu={}`",
                    case.profile_hz().unwrap_or(0)
                )
            }
            _ => format!(
                "`bpftrace -e '{}'`",
                bpftrace_program(case, Path::new("LIB")).unwrap_or_default()
            ),
        };
        rows.push(match (p.median(case), p.spread(case)) {
            (Some(med), Some((lo, hi))) => {
                let (cost, ratio) = if case == Case::NoProbe {
                    ("–".to_string(), "–".to_string())
                } else {
                    (
                        ns(p.overhead(case).unwrap_or(f64::NAN)),
                        p.ratio(case).map_or("–".to_string(), |x| format!("{x:.2}")),
                    )
                };
                vec![
                    case.label().into(),
                    what,
                    format!("**{}**", ns(med)),
                    format!("{}–{}", ns(lo), ns(hi)),
                    cost,
                    ratio,
                ]
            }
            _ => vec![case.label().into(), what, "not run (no bpftrace)".into()],
        });
    }
    table(
        o,
        &[
            "case",
            "what runs",
            "ns/call (median)",
            "[min–max]",
            "probe cost (− a)",
            "÷ empty pair (b)",
        ],
        &rows,
    );
    let _ = writeln!(
        o,
        "`LIB` = `{lib}`. The bpftrace programs also have `BEGIN {{ printf(\"ready\\n\"); }}`, \
         which fires once their probes are attached: the signal to start the loop. bpftrace \
         attaches system-wide to the file, llamaprobe to the loop's pid only.\n"
    );
    if let Some(runs) = p.runs[Case::Llamaprobe.index()].as_ref() {
        let exact = runs.iter().all(|r| {
            r.agent
                .as_ref()
                .is_some_and(|a| a.decode_calls == r.out.calls)
        });
        let lost: u64 = runs
            .iter()
            .filter_map(|r| r.agent.as_ref().map(|a| a.events_lost))
            .sum();
        let _ = writeln!(
            o,
            "Check: in every llamaprobe run, `--summary-json`'s `decode_calls` {} the loop's \
             calls (N + 1000 warm-up); events lost: {lost}.{}\n",
            if exact {
                "equals"
            } else {
                "**does not always equal**"
            },
            p.agent_us_per_event()
                .map(|us| format!(
                    " llamaprobe itself used {us:.1} µs of CPU per event (median; its own CPU \
                     time, not the loop's)."
                ))
                .unwrap_or_default()
        );
    }
    let (hi, lo) = (Case::ProfileCpu, Case::ProfileCpuLow);
    if let (Some(s_hi), Some(s_lo), Some(ns_per)) = (
        p.samples_per_run(hi),
        p.samples_per_run(lo),
        p.traced_ns_per_sample(),
    ) {
        let _ = writeln!(
            o,
            "CPU samples: {s_hi:.0} per run in (e), {s_lo:.0} in (f) (medians). One sample cost \
             the loop's thread **{} ns** (the perf interrupt, the eBPF program and its \
             user-stack copy: (e) − (f) per call × {} calls ÷ (e) − (f) samples); profiling \
             cost each decode call {} ns beside its samples (the step mark: (f) − (c) less (f)'s \
             samples); llamaprobe itself used {} of CPU per sample. At the default 99 Hz the \
             samples take {:.3}% of a busy traced thread's CPU.\n",
            ns(ns_per),
            p.iterations,
            p.traced_ns_per_call_profiling().map_or("–".to_string(), ns),
            p.agent_us_per_sample()
                .map_or("–".to_string(), |us| format!("{us:.1} µs")),
            ns_per * 99.0 / 1e9 * 100.0
        );
    }
    problems(o, &p.problems);
}

fn render_server(o: &mut String, r: &Report) {
    let Some(s) = section(
        o,
        "2. llama-server throughput and time to first token",
        &r.server,
    ) else {
        return;
    };
    let _ = writeln!(
        o,
        "The newest fixture's llama-server (`{}`), started as `llama-server -m MODEL --host \
         127.0.0.1 --port P {}` (plus `--fit off` where it exists), one warm-up request, then per \
         run and condition a series of streamed `/completion` requests, one at a time: the same \
         {}-character prompt, `n_predict` {N_PREDICT}, `temperature` 0, `cache_prompt` false, \
         `ignore_eos` true. Conditions, interleaved (the order rotates each run), llamaprobe \
         attached for the run only:\n",
        s.server.display(),
        SERVER_ARGS.join(" "),
        PROMPT.len()
    );
    for cond in &s.conds {
        let what = match cond {
            Cond::Without => "no probe".to_string(),
            Cond::Default => "`llamaprobe attach --pid <server> --quiet --metrics-addr \
                              127.0.0.1:<port> --summary-json F` (its defaults: on these \
                              CPU-only builds `--sync auto` leaves `llama_synchronize` unprobed, \
                              as `--no-sync` does)"
                .to_string(),
            Cond::SyncOn => "the same with `--sync on`: `llama_synchronize` probed too (the \
                             default of earlier llamaprobe versions)"
                .to_string(),
            Cond::NoSync => "the same with `--no-sync`".to_string(),
            Cond::Otlp => "the defaults plus `--otlp-endpoint http://127.0.0.1:<port> \
                           --otlp-protocol http`: OTLP traces and metrics exported to a \
                           stand-in collector of the bench's own, which answers every request \
                           `200 OK` at once (so this is llamaprobe's side of the export only)"
                .to_string(),
            Cond::ProfileCpu => "the defaults plus `--profile-cpu` (99 Hz on every CPU, the \
                                 samples attributed, symbolized and counted)"
                .to_string(),
        };
        let _ = writeln!(o, "- **{}**: {what};", cond.label());
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "- **tok/s (server)**: `timings.predicted_per_second` of the final chunk (generation \
         only);\n- **tok/s (wall)**: generated tokens ÷ the request's wall time (prompt \
         included), by the client;\n- **TTFT**: request sent → first `data:` chunk (the first \
         generated token), by the client; **prompt ms**: `timings.prompt_ms`.\n\nEach value: \
         median over runs of the run's mean over its requests, [min–max] over runs. **Ratio**: in \
         each run, the condition's value ÷ the value without llamaprobe measured next to it in \
         the same run; median [min–max] over runs. The spread of the runs without llamaprobe is \
         the noise floor: differences inside it are not resolved here.\n"
    );
    for checks in [&s.large_checks] {
        if !checks.is_empty() {
            let _ = writeln!(o, "Choosing the ≥ {STEP_TARGET_MS:.0} ms model (ms per generated token, one request after a warm-up):\n");
            for c in checks {
                let _ = writeln!(o, "- {}: {:.1} ms", c.label, c.step_ms);
            }
            let _ = writeln!(o);
        }
    }
    for m in &s.models {
        let step = m.stat(Cond::Without, |c| c.predicted_per_token_ms);
        let _ = writeln!(
            o,
            "### {} model (`{}`): {:.1} ms per generated token, {} request(s) per run\n",
            m.label,
            m.path.file_name().unwrap_or_default().to_string_lossy(),
            step,
            m.requests
        );
        if m.repeated > 0 || m.disturbed_kept > 0 {
            let _ = writeln!(
                o,
                "{} condition run(s) were repeated because other processes kept more than \
                 {DISTURBED_CORES} of a core busy (outside the server and llamaprobe) while they \
                 ran{}.\n",
                m.repeated,
                if m.disturbed_kept > 0 {
                    format!(
                        "; {} still disturbed after {MAX_REPEATS} repeats were kept",
                        m.disturbed_kept
                    )
                } else {
                    String::new()
                }
            );
        }
        let mut rows = Vec::new();
        for &cond in &m.conds {
            let cell = |f: fn(&Completion) -> f64, digits: usize| {
                let med = m.stat(cond, f);
                let (lo, hi) = m.spread(cond, f);
                format!("**{med:.digits$}** [{lo:.digits$}–{hi:.digits$}]")
            };
            let ratio = |f: fn(&Completion) -> f64| {
                if cond == Cond::Without {
                    return "–".to_string();
                }
                let (med, lo, hi) = m.paired(cond, f);
                format!("**{}** [{}–{}]", pct(med), pct(lo), pct(hi))
            };
            rows.push(vec![
                cond.label().into(),
                cell(|c| c.predicted_per_second, 1),
                ratio(|c| c.predicted_per_second),
                cell(Completion::wall_tps, 1),
                ratio(Completion::wall_tps),
                cell(|c| c.ttft_ms, 1),
                cell(|c| c.prompt_ms, 1),
            ]);
        }
        table(
            o,
            &[
                "condition",
                "tok/s (server)",
                "ratio",
                "tok/s (wall)",
                "ratio",
                "TTFT ms",
                "prompt ms",
            ],
            &rows,
        );
        render_target_cpu(o, r, m);
    }
    if let Some((m, cpu)) = &s.cpu_time {
        let _ = writeln!(
            o,
            "### CPU time per generated token where it resolves 1%: {} model, one thread\n",
            m.label.trim_end_matches(", one thread")
        );
        let _ = writeln!(
            o,
            "With `-t 2` (above) ggml's two workers wait for each other at every operation, \
             spinning: the server's CPU time is about two cores × the wall time and as noisy. \
             Here the same model runs on a server with `{}`, pinned to CPU {cpu} (`taskset -a \
             -p`), while the bench's client and the llamaprobe it starts are pinned to CPU 0: \
             its CPU time is its own work. {} interleaved runs of {} request(s) per condition.\n",
            CPU_TIME_SERVER_ARGS.join(" "),
            m.runs_len(),
            m.requests
        );
        render_target_cpu(o, r, m);
    }
    let otlp: Vec<&AgentServer> = s
        .models
        .iter()
        .flat_map(|m| m.agents())
        .filter(|(c, _)| *c == Cond::Otlp)
        .map(|(_, a)| a)
        .collect();
    if otlp.is_empty() {
        let _ = writeln!(
            o,
            "This llamaprobe has no OTLP export (no `--otlp-endpoint`): there is no \"with OTLP\" \
             condition.\n"
        );
    } else {
        let (reqs, bytes) = otlp.iter().fold((0, 0), |(r, b), a| {
            let (r1, b1) = a.otlp.unwrap_or((0, 0));
            (r + r1, b + b1)
        });
        let generated: u64 = otlp.iter().map(|a| a.generated).sum();
        let _ = writeln!(
            o,
            "OTLP: over the runs with export on, the stand-in collector received {reqs} requests, \
             {:.1} KiB in all ({:.0} bytes per generated token; metrics are exported every 10 s \
             and at detach).\n",
            bytes as f64 / 1024.0,
            bytes as f64 / generated.max(1) as f64
        );
    }
    render_profile_cost(o, s);
    problems(o, &s.problems);
}

/// `--profile-cpu`'s cost: the server's throughput against the run with llamaprobe's defaults
/// in the same round (what the sampler adds), and llamaprobe's own CPU time beyond its
/// defaults per sample taken (pooled over the runs of each model).
fn render_profile_cost(o: &mut String, s: &ServerResult) {
    for m in &s.models {
        let of = |cond: Cond| -> Vec<&AgentServer> {
            m.agents()
                .filter(|(c, _)| *c == cond)
                .map(|(_, a)| a)
                .collect()
        };
        let (prof, base) = (of(Cond::ProfileCpu), of(Cond::Default));
        let samples: u64 = prof.iter().filter_map(|a| a.cpu_samples).sum();
        if prof.is_empty() || base.is_empty() || samples == 0 {
            continue;
        }
        let (ratio, lo, hi) = m.paired_with(Cond::ProfileCpu, Cond::Default, |r| {
            r.reqs.iter().map(|c| c.predicted_per_second).sum::<f64>() / r.reqs.len().max(1) as f64
        });
        let per_s = |v: &[&AgentServer]| {
            v.iter().map(|a| a.cpu_ms).sum::<f64>() / v.iter().map(|a| a.window_s).sum::<f64>()
        };
        let window: f64 = prof.iter().map(|a| a.window_s).sum();
        let used: f64 = prof.iter().map(|a| a.cpu_ms).sum();
        let extra_ms = (per_s(&prof) - per_s(&base)) * window;
        // CPU time comes in whole 10 ms ticks: a difference of a few is not resolved.
        let per_sample = if extra_ms >= 50.0 {
            format!(
                "{extra_ms:.0} ms more than at its defaults over the same time: {:.0} µs per sample",
                extra_ms * 1000.0 / samples as f64
            )
        } else {
            format!(
                "{extra_ms:.0} ms against its defaults over the same time, inside the 10 ms \
                 ticks' resolution: not resolved"
            )
        };
        let _ = writeln!(
            o,
            "CPU profile, {} model: the server's generation throughput with `--profile-cpu` \
             is **{}** [{}–{}] of the run with llamaprobe's defaults in the same round \
             (paired). {samples} samples in {window:.1} s of requests over the runs ({:.0} per \
             second); llamaprobe used {used:.0} ms of CPU in them, {per_sample}.\n",
            m.label,
            pct(ratio),
            pct(lo),
            pct(hi),
            samples as f64 / window,
        );
    }
}

/// The empty uprobe + uretprobe pair's cost per call (section 1, case b − a), ns.
fn empty_pair_ns(r: &Report) -> Option<f64> {
    ok(&r.per_call).and_then(|p| p.overhead(Case::Empty))
}

/// Expected overhead of a condition on a model: probed calls per token × the empty pair's
/// cost ÷ the CPU time per token without llamaprobe.
fn expected_cpu_overhead(r: &Report, m: &ModelResult, cond: Cond) -> Option<f64> {
    let pair = empty_pair_ns(r)?;
    let calls = m.calls_per_token(cond);
    let (base, _, _) = m.target_cpu(Cond::Without);
    let e = calls * pair / 1000.0 / base;
    e.is_finite().then_some(e)
}

/// The server's own CPU time per generated token, paired, next to what the probe hits
/// should cost.
fn render_target_cpu(o: &mut String, r: &Report, m: &ModelResult) {
    let _ = writeln!(
        o,
        "The server's own CPU time in the same runs (all its threads, from its CPU-time clock, \
         `clock_getcpuclockid` + `clock_gettime`: the kernel's exact run time in ns, ended \
         threads included; uprobe handling runs on the probed thread, so it is counted here), \
         per generated token (prompt, HTTP and sampling included: the same requests in every \
         condition). **Overhead**: in each run, the condition's CPU per token ÷ the one without \
         llamaprobe next to it, − 1; median [min–max] over runs. **Expected**: the probed calls \
         per token llamaprobe itself counted in the run (`--summary-json`) × the empty uprobe + \
         uretprobe pair's cost (section 1, case b − a{}) ÷ the CPU per token without.\n",
        empty_pair_ns(r)
            .map(|ns| format!(": {ns:.0} ns"))
            .unwrap_or_else(|| ", not measured in this run".into())
    );
    let mut rows = Vec::new();
    for &cond in &m.conds {
        let (med, lo, hi) = m.target_cpu(cond);
        let (overhead, calls, expected) = if cond == Cond::Without {
            ("–".to_string(), "–".to_string(), "–".to_string())
        } else {
            let (ratio, rlo, rhi) = m.target_cpu_paired(cond);
            (
                format!(
                    "**{}** [{}–{}]",
                    signed_pct(ratio - 1.0),
                    signed_pct(rlo - 1.0),
                    signed_pct(rhi - 1.0)
                ),
                format!("{:.2}", m.calls_per_token(cond)),
                expected_cpu_overhead(r, m, cond)
                    .map(signed_pct)
                    .unwrap_or_else(|| "–".into()),
            )
        };
        rows.push(vec![
            cond.label().into(),
            format!("**{med:.0}** [{lo:.0}–{hi:.0}]"),
            overhead,
            calls,
            expected,
        ]);
    }
    table(
        o,
        &[
            "condition",
            "server CPU µs / generated token",
            "overhead",
            "probed calls / token",
            "expected",
        ],
        &rows,
    );
}

/// A share with its sign, two decimals: +0.12%.
fn signed_pct(x: f64) -> String {
    format!("{:+.2}%", x * 100.0)
}

fn render_hits(o: &mut String, r: &Report) {
    let Some(h) = section(o, "3. Probe hits per generated token", &r.hits) else {
        return;
    };
    let _ = writeln!(
        o,
        "Every fixture of `{}` that is built here, on the tiny model: a llama-server (same \
         options and request as section 2, after a warm-up) with `llamaprobe attach \
         --events-out F` for the requests, or for a library-only fixture our driver under \
         `llamaprobe run --events-out F`. Each event is one probed call = 2 probe hits (entry + \
         return); a nested call of the same family (a deprecated wrapper calling its \
         replacement) would be 2 more hits for one event, which only happens at model load and \
         context creation.\n",
        h.fixtures_json.display()
    );
    let mut header = vec!["fixture", "llama.cpp", "via", "generated tokens"];
    header.extend(HIT_COLUMNS);
    header.extend(["other", "probed calls / token", "**probe hits / token**"]);
    let rows: Vec<Vec<String>> = h
        .rows
        .iter()
        .map(|row| {
            let mut cells = vec![row.fixture.clone()];
            if let Some(why) = &row.skipped {
                cells.extend([row.llama_cpp.clone(), format!("skipped: {why}")]);
                return cells;
            }
            let per = |k: &str| row.count(k) as f64 / row.generated.max(1) as f64;
            cells.extend([
                format!("{} ({})", row.llama_cpp, row.generation),
                row.via.clone(),
                row.generated.to_string(),
            ]);
            for kind in HIT_COLUMNS {
                cells.push(format!("{} ({:.2}/tok)", row.count(kind), per(kind)));
            }
            let other: Vec<String> = row
                .events
                .iter()
                .filter(|(k, _)| !HIT_COLUMNS.contains(&k.as_str()))
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            cells.extend([
                if other.is_empty() {
                    "–".to_string()
                } else {
                    other.join(", ")
                },
                format!("{:.2}", row.events_per_token()),
                format!("**{:.2}**", 2.0 * row.events_per_token()),
            ]);
            cells
        })
        .collect();
    table(o, &header, &rows);
    let _ = writeln!(
        o,
        "What each hit is for:\n\n\
         - **decode**: one decode step (one batch): `llama_context::decode(llama_batch_ext \
         const&)` on the newest API, `llama_decode` on the classic one. During generation one \
         step feeds back one sampled token per busy slot; the prompt is one step per `n_batch` \
         chunk.\n\
         - **synchronize**: `llama_synchronize`, the wait for the backend to finish a step. \
         The newest llama-server calls it after a step and again when it reads the logits to \
         sample (see the `--sync on` row, if any). A count of 0 means it is not probed \
         (llamaprobe's `--sync auto` default leaves it out when no GPU backend is mapped, as \
         on these CPU-only builds; `--no-sync` in older versions) or that the program never \
         calls the exported function.\n\
         - **sample**: `common_sampler_sample` (llama-server, libllama-common) or \
         `llama_sampler_sample` (programs using the sampler API directly): one per generated \
         token.\n\
         - **memory**: `llama_memory_seq_rm` / `seq_cp` / `clear` (KV-cache edits; llama-server \
         clears a slot's cache when a request starts): per request, not per token.\n\
         - **other**: model load and context creation (driver rows only: the servers were warmed \
         up before attaching), one-off and left out of the per-token figures.\n"
    );
}

fn render_capacity(o: &mut String, r: &Report) {
    let Some(c) = section(o, "4. Event capacity", &r.capacity) else {
        return;
    };
    let base = ok(&r.per_call).and_then(|p| p.median(Case::Llamaprobe));
    let _ = writeln!(
        o,
        "The synthetic loop as fast as it goes (`taskset`-pinned threads, each making N calls), \
         llamaprobe pinned to CPU 0 with `taskset -c 0 llamaprobe attach --pid <loop> --quiet \
         --metrics-addr off --summary-json F`. Lost events are llamaprobe's \
         `llamaprobe_events_lost_total` (its `--summary-json` `events_lost` and summary line). \
         One run per row.\n"
    );
    let rows: Vec<Vec<String>> = c
        .rows
        .iter()
        .map(|row| {
            let a = row.run.agent.as_ref();
            vec![
                row.level.label.clone(),
                row.iterations.to_string(),
                format!(
                    "{:.0}",
                    row.run.calls_per_s(row.iterations, row.level.threads)
                ),
                ns(row.run.out.ns_per_call),
                base.map_or("–".to_string(), |b| {
                    format!("{:.2} ×", row.run.out.ns_per_call / b)
                }),
                format!(
                    "{} / {}",
                    a.map_or(0, |a| a.decode_calls),
                    row.run.out.calls
                ),
                a.map_or("–".to_string(), |a| {
                    if a.events_lost == 0 {
                        "0".to_string()
                    } else {
                        a.lost_line.trim_start_matches("events lost: ").to_string()
                    }
                }),
                a.map_or("–".to_string(), |a| {
                    us_per_event(a.cpu_ms, a.decode_calls)
                }),
            ]
        })
        .collect();
    table(
        o,
        &[
            "loop",
            "N per thread",
            "calls/s",
            "loop ns/call",
            "vs case (c)",
            "counted / made",
            "events lost",
            "llamaprobe CPU per event",
        ],
        &rows,
    );
    let per_event = |row: &CapacityRow| {
        row.run
            .agent
            .as_ref()
            .map(|a| a.cpu_ms * 1000.0 / a.decode_calls.max(1) as f64)
    };
    let live: Vec<&CapacityRow> = c.rows.iter().filter(|r| !r.level.pause_agent).collect();
    let best_clean = live
        .iter()
        .filter(|row| row.run.agent.as_ref().is_some_and(|a| a.events_lost == 0))
        .max_by(|a, b| {
            a.run
                .calls_per_s(a.iterations, a.level.threads)
                .total_cmp(&b.run.calls_per_s(b.iterations, b.level.threads))
        });
    if let Some(row) = best_clean {
        let _ = writeln!(
            o,
            "- Highest rate with no event lost: **{:.0} calls/s**, {}{}.",
            row.run.calls_per_s(row.iterations, row.level.threads),
            row.level.label,
            per_event(row)
                .map(|us| format!(", llamaprobe using {us:.1} µs of CPU per event"))
                .unwrap_or_default()
        );
    }
    if live
        .iter()
        .any(|row| row.run.agent.as_ref().is_some_and(|a| a.events_lost > 0))
    {
        let _ = writeln!(
            o,
            "- Some rows with llamaprobe running lost events: its reader fell behind the probes \
             at those rates (see the rows)."
        );
    } else {
        let fastest = live
            .iter()
            .map(|row| row.run.out.ns_per_call)
            .fold(f64::INFINITY, f64::min);
        let _ = writeln!(
            o,
            "- No row with llamaprobe running lost an event: on this machine the probes slow the \
             traced threads (at best {} ns per probed call) before llamaprobe falls behind.",
            ns(fastest)
        );
    }
    if let Some(row) = c.rows.iter().find(|r| r.level.pause_agent) {
        if let Some(a) = &row.run.agent {
            let made = row.run.out.calls;
            let _ = writeln!(
                o,
                "- Past capacity (llamaprobe stopped while the loop ran): the ring buffer held \
                 {} events of {made} calls; {} were dropped and counted (`{}`). The loop ran at \
                 {} ns/call{}: probes never wait for the reader, so the target is not slowed when \
                 llamaprobe falls behind. Draining that backlog took llamaprobe {} of CPU per \
                 event (no wake-up per event when they arrive in bulk).",
                a.decode_calls,
                a.events_lost,
                a.lost_line.trim(),
                ns(row.run.out.ns_per_call),
                base.map(|b| format!(" ({:.2} × case (c))", row.run.out.ns_per_call / b))
                    .unwrap_or_default(),
                us_per_event(a.cpu_ms, a.decode_calls)
            );
        }
    }
    let _ = match &c.hot_path {
        Ok(line) => writeln!(
            o,
            "- The agent's own hot path, in process (`cargo test --release -p llamaprobe --lib -- \
             --ignored --exact {HOT_PATH_TEST} --nocapture`): {line}. Before, \
             every event formatted its `pid` and looked each series up by its labels; each \
             process's series handles are now resolved once."
        ),
        Err(e) => writeln!(o, "- The agent's hot-path measurement failed: {e}"),
    };
    let _ = writeln!(o);
}

fn render_footprint(o: &mut String, r: &Report) {
    let Some(s) = section(o, "5. llamaprobe's footprint", &r.server) else {
        return;
    };
    let _ = writeln!(
        o,
        "VmRSS and VmHWM (peak) from `/proc/PID/status`, CPU = utime + stime from \
         `/proc/PID/stat` (10 ms ticks), of the llamaprobe process attached to the llama-server \
         of section 2 (Prometheus endpoint on).\n"
    );
    let mut rows = Vec::new();
    if let Some(i) = &s.idle {
        rows.push(vec![
            format!("idle: attached, no requests, {:.0} s", i.secs),
            format!("{:.1}", mib(i.rss_kib)),
            format!("{:.1}", mib(i.hwm_kib)),
            if i.cpu_ms < 10.0 {
                "< 10 ms (below one clock tick)".to_string()
            } else {
                format!(
                    "{:.0} ms ({} of one core)",
                    i.cpu_ms,
                    pct(i.cpu_ms / 1000.0 / i.secs)
                )
            },
            "–".into(),
            "–".into(),
        ]);
    }
    for m in &s.models {
        for &cond in m.conds.iter().filter(|c| **c != Cond::Without) {
            let agents: Vec<&AgentServer> = m
                .agents()
                .filter(|(c, _)| *c == cond)
                .map(|(_, a)| a)
                .collect();
            if agents.is_empty() {
                continue;
            }
            let rss = median(&agents.iter().map(|a| mib(a.rss_kib)).collect::<Vec<_>>());
            let hwm = agents.iter().map(|a| a.hwm_kib).max().unwrap_or(0);
            let attach_s = median(&agents.iter().map(|a| a.attach_s).collect::<Vec<_>>());
            // Pooled over the runs: each window is short next to the 10 ms CPU tick.
            let cpu: f64 = agents.iter().map(|a| a.cpu_ms).sum();
            let window: f64 = agents.iter().map(|a| a.window_s).sum();
            let generated: u64 = agents.iter().map(|a| a.generated).sum();
            // Whole 10 ms ticks: below one tick only a bound is known.
            let (cpu_text, per_token) = if cpu < 10.0 {
                (
                    format!("< 10 ms in {window:.1} s (< {})", pct(0.01 / window)),
                    format!("< {:.0} µs", 10_000.0 / generated.max(1) as f64),
                )
            } else {
                (
                    format!(
                        "{cpu:.0} ms in {window:.1} s ({} of one core)",
                        pct(cpu / 1000.0 / window)
                    ),
                    format!("{:.0} µs", cpu * 1000.0 / generated.max(1) as f64),
                )
            };
            rows.push(vec![
                format!(
                    "under load: {} model, {}",
                    m.label,
                    cond.label().trim_start_matches("llamaprobe ")
                ),
                format!("{rss:.1}"),
                format!("{:.1}", mib(hwm)),
                cpu_text,
                per_token,
                format!("{attach_s:.2} s"),
            ]);
        }
    }
    table(
        o,
        &[
            "when",
            "RSS MiB",
            "peak RSS MiB",
            "CPU",
            "CPU per generated token",
            "attach took",
        ],
        &rows,
    );
    let _ = writeln!(
        o,
        "RSS: median at the end of the runs; peak: the highest VmHWM of any run; CPU: summed \
         over the runs' request windows (attach and detach excluded); attach took: `llamaprobe \
         attach` started → `probes attached` printed (median).\n"
    );
}

fn print_summary(r: &Report) {
    println!("llamaprobe bench ({}):", r.machine.date);
    if let Some(p) = ok(&r.per_call) {
        for case in CASES {
            if let Some(med) = p.median(case) {
                println!("  per-call {:<40} {:>10} ns/call", case.label(), ns(med));
            }
        }
    }
    if let Some(s) = ok(&r.server) {
        for m in &s.models {
            let base = m.stat(Cond::Without, |c| c.predicted_per_second);
            for &cond in &m.conds {
                let tps = m.stat(cond, |c| c.predicted_per_second);
                println!(
                    "  {:<28} {:<25} {:>8.1} tok/s ({})",
                    m.label,
                    cond.label(),
                    tps,
                    pct(tps / base)
                );
            }
        }
    }
    if let Some(d) = ok(&r.daemon) {
        for line in daemon::summary_lines(d) {
            println!("  {line}");
        }
    }
    if let Some(h) = ok(&r.hits) {
        for row in h.rows.iter().filter(|r| r.skipped.is_none()) {
            println!(
                "  hits/token {:<16} {:.2}",
                row.fixture,
                2.0 * row.events_per_token()
            );
        }
    }
}
