//! `cargo xtask fuzz`: the fuzz targets of `fuzz/` (cargo-fuzz, libFuzzer, nightly), built once
//! and run one after the other for a while each; also the short run of `cargo xtask test`.
//!
//! Each target starts from its committed seeds (`fuzz/corpus/<target>/`, read only) and the
//! corpus earlier runs grew (`<cache>/fuzz/corpus/<target>/`, where new inputs go). A crash
//! leaves its input in `fuzz/artifacts/<target>/` and fails the run: fix the parser, add the
//! input as a regression test beside it.

use std::{
    env,
    fs::{self, File},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::util::{self, progress};

/// The targets, in the order they run (each a `[[bin]]` of `fuzz/Cargo.toml`).
pub const TARGETS: &[&str] = &[
    "decode_event",
    "gguf",
    "elf_symbols",
    "proc_maps",
    "cgroup",
    "config",
];

/// Seconds per target of the short run inside `cargo xtask test`.
pub const SHORT_SECONDS: u64 = 5;

/// The cargo-fuzz release installed (and cached) when none is found.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Options of `cargo xtask fuzz`.
#[derive(Args, Debug, Clone)]
pub struct FuzzArgs {
    /// Run only this target (repeatable; default: every target).
    #[arg(long = "target", value_name = "TARGET", value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub targets: Vec<String>,
    /// Seconds each target runs.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub seconds: u64,
}

/// What one target's run did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outcome {
    pub target: String,
    /// libFuzzer's `stat::number_of_executed_units`.
    pub executions: u64,
    /// libFuzzer's `stat::new_units_added`.
    pub new_units: u64,
    /// libFuzzer's `stat::peak_rss_mb`.
    pub peak_rss_mb: u64,
    pub took: Duration,
}

impl Outcome {
    fn line(&self) -> String {
        let secs = self.took.as_secs_f64().max(1e-3);
        format!(
            "{:<13} {:>11} executions in {:>6.1} s ({:>7.0}/s), {} new inputs, peak RSS {} MB",
            self.target,
            self.executions,
            secs,
            self.executions as f64 / secs,
            self.new_units,
            self.peak_rss_mb
        )
    }
}

pub fn run(args: FuzzArgs) -> Result<()> {
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        TARGETS
            .iter()
            .copied()
            .filter(|t| args.targets.iter().any(|a| a == t))
            .collect()
    };
    prepare()?;
    let outcomes = run_targets(&targets, args.seconds)?;
    report(&outcomes);
    Ok(())
}

/// The short run of `cargo xtask test`: every target, [`SHORT_SECONDS`] each (after one build).
pub fn short_run() -> Result<()> {
    prepare()?;
    let outcomes = run_targets(TARGETS, SHORT_SECONDS)?;
    report(&outcomes);
    Ok(())
}

fn report(outcomes: &[Outcome]) {
    progress!("fuzz: executions per target:");
    for o in outcomes {
        progress!("  {}", o.line());
    }
}

/// Installs cargo-fuzz if needed and builds every target once.
fn prepare() -> Result<()> {
    install_cargo_fuzz()?;
    progress!("fuzz: building the targets (nightly, AddressSanitizer, debug assertions)");
    let started = Instant::now();
    util::run_inherit(&mut cargo_fuzz(&["build", "--debug-assertions"])?)?;
    progress!(
        "fuzz: built in {}",
        util::format_duration(started.elapsed())
    );
    Ok(())
}

/// `cargo +nightly fuzz ARGS…` in the workspace root, with the cache's tools on PATH (cargo-fuzz
/// itself, bpf-linker for the agent's build script) and nothing of the outer cargo's toolchain.
fn cargo_fuzz(args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly")
        .arg("fuzz")
        .args(args)
        .current_dir(util::workspace_root())
        .env("PATH", util::path_with_tools()?);
    // `cargo xtask` runs under the stable toolchain; its cargo and rustc must not leak into
    // the nightly build (`-Z sanitizer` is nightly only).
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(var);
    }
    Ok(cmd)
}

/// cargo-fuzz under the cache's `tools/`, installed there if it is not on PATH.
pub fn install_cargo_fuzz() -> Result<()> {
    let path = util::path_with_tools()?;
    let works = Command::new("cargo")
        .args(["fuzz", "--version"])
        .env("PATH", &path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    let cache = util::cache_dir()?;
    progress!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION} (a few minutes, once)");
    util::run(
        util::cargo()
            .args(["install", "cargo-fuzz", "--locked", "--version"])
            .arg(CARGO_FUZZ_VERSION)
            .arg("--root")
            .arg(cache.join("tools"))
            // `cargo xtask` runs inside the workspace: keep its settings out of the install.
            .current_dir(env::temp_dir()),
    )
    .context("installing cargo-fuzz failed; see the cargo output above")
}

/// Runs each target for `seconds`; fails if one did (a crash, a leak, a timeout), after the others ran.
fn run_targets(targets: &[&str], seconds: u64) -> Result<Vec<Outcome>> {
    let root = util::workspace_root();
    let work = util::cache_dir()?.join("fuzz/corpus");
    let logs = util::target_dir().join("fuzz");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut outcomes = Vec::new();
    let mut failed = Vec::new();
    for target in targets {
        let corpus = work.join(target);
        fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let seeds = root.join("fuzz/corpus").join(target);
        let log = logs.join(format!("{target}.log"));
        progress!("fuzz: {target} for {seconds} s (log: {})", log.display());
        let started = Instant::now();
        let status = cargo_fuzz(&["run", "--debug-assertions", target])?
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1")
            // An input that takes this long is a hang: a parser must not loop on its input.
            .arg("-timeout=10")
            .stdout(File::create(&log).with_context(|| format!("creating {}", log.display()))?)
            .stderr(File::options().append(true).open(&log)?)
            .status()
            .context("could not start `cargo fuzz run`")?;
        let took = started.elapsed();
        let text = fs::read_to_string(&log).unwrap_or_default();
        if !status.success() {
            progress!(
                "fuzz: {target} FAILED ({status}) after {}:\n{}",
                util::format_duration(took),
                crash_summary(&text)
            );
            failed.push(format!(
                "{target} (input in {}, log {})",
                root.join("fuzz/artifacts").join(target).display(),
                log.display()
            ));
            continue;
        }
        let mut outcome = parse_stats(&text);
        outcome.target = target.to_string();
        outcome.took = took;
        progress!("  {}", outcome.line());
        outcomes.push(outcome);
    }
    if !failed.is_empty() {
        report(&outcomes);
        bail!(
            "fuzz targets failed: {}; fix each parser so it returns an error, and add the input \
             as a regression test beside it",
            failed.join(", ")
        );
    }
    Ok(outcomes)
}

/// What a failed run's log says went wrong: the panic and its message, the sanitizer's
/// error, where the input was written; else the end of the log.
fn crash_summary(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.contains("panicked at") {
            out.extend(lines[i..].iter().take(2));
        } else if (line.starts_with("==") && line.contains("ERROR:"))
            || line.starts_with("SUMMARY:")
            || line.contains("Test unit written to")
        {
            out.push(line);
        }
    }
    if out.is_empty() {
        out = lines.iter().rev().take(20).rev().collect();
    }
    out.iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The final statistics libFuzzer prints with `-print_final_stats=1`.
fn parse_stats(text: &str) -> Outcome {
    let mut o = Outcome::default();
    for line in text.lines() {
        // `stat::number_of_executed_units: 123456`
        let Some((key, value)) = line.split_once(": ").filter(|_| line.starts_with("stat::"))
        else {
            continue;
        };
        let value = value.trim().parse().unwrap_or(0);
        match key {
            "stat::number_of_executed_units" => o.executions = value,
            "stat::new_units_added" => o.new_units = value,
            "stat::peak_rss_mb" => o.peak_rss_mb = value,
            _ => {}
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    /// The `[[bin]]` names of `fuzz/Cargo.toml`.
    fn declared_targets(manifest: &Path) -> Result<Vec<String>> {
        let text = fs::read_to_string(manifest)
            .with_context(|| format!("reading {}", manifest.display()))?;
        let mut out = Vec::new();
        let mut in_bin = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_bin = line == "[[bin]]";
            } else if let (true, Some(name)) = (in_bin, line.strip_prefix("name = ")) {
                out.push(name.trim_matches('"').to_string());
            }
        }
        Ok(out)
    }

    /// The seeds of a target.
    fn seeds(target: &str) -> Vec<PathBuf> {
        let dir = util::workspace_root().join("fuzz/corpus").join(target);
        let mut out: Vec<PathBuf> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        out.sort();
        out
    }

    #[test]
    fn every_target_is_declared_and_seeded() {
        let root = util::workspace_root();
        let declared = declared_targets(&root.join("fuzz/Cargo.toml")).unwrap();
        assert_eq!(declared, TARGETS);
        for target in TARGETS {
            assert!(
                root.join(format!("fuzz/fuzz_targets/{target}.rs"))
                    .is_file(),
                "{target}"
            );
            let seeds = seeds(target);
            assert!(!seeds.is_empty(), "{target} has no seed");
            for s in seeds {
                let len = fs::metadata(&s).unwrap().len();
                assert!(len <= 64 << 10, "{} is {len} bytes", s.display());
            }
        }
    }

    #[test]
    fn final_stats_are_read() {
        let text = "#1024\tpulse  cov: 10\nDone 5000 runs in 5 second(s)\n\
                    stat::number_of_executed_units: 123456\n\
                    stat::average_exec_per_sec:     24691\n\
                    stat::new_units_added:          17\n\
                    stat::slowest_unit_time_sec:    0\n\
                    stat::peak_rss_mb:              48\n";
        let o = parse_stats(text);
        assert_eq!((o.executions, o.new_units, o.peak_rss_mb), (123456, 17, 48));
        assert_eq!(parse_stats("crash\n"), Outcome::default());
    }

    #[test]
    fn a_crash_is_summed_up() {
        let log = "INFO: Seed: 1\n#2 NEW cov: 3\n\
                   thread '<unnamed>' (1) panicked at agent/src/x.rs:1:2:\n\
                   attempt to add with overflow\nstack backtrace:\n   0: x\n\
                   ==1== ERROR: libFuzzer: deadly signal\n    #0 0x1 in f\n\
                   SUMMARY: libFuzzer: deadly signal\n\
                   artifact_prefix='a/'; Test unit written to a/crash-1\n";
        let s = crash_summary(log);
        assert_eq!(s.lines().count(), 5, "{s}");
        assert!(s.contains("attempt to add with overflow") && s.contains("a/crash-1"));
        assert_eq!(crash_summary("a\nb\n"), "    a\n    b");
    }
}
