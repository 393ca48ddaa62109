//! `cargo xtask test`: setup, fixtures, then the workspace's tests, a short run of every fuzz
//! target, clippy and rustfmt.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::{
    fixtures::{self, Matrix},
    fuzz, setup,
    util::{self, progress},
};

pub fn run(matrix: Matrix, stress: bool, cargo_args: &[String]) -> Result<()> {
    if !util::is_root() {
        bail!("`cargo xtask test` loads eBPF programs and must run as root: run it again with sudo or as root");
    }
    let mut phases: Vec<(&str, Duration, bool)> = Vec::new();
    let result = run_phases(matrix, stress, cargo_args, &mut phases);

    eprintln!();
    progress!("phase times:");
    for (name, took, ok) in &phases {
        let status = if *ok { "ok" } else { "FAILED" };
        progress!(
            "  {name:<10} {:>12}  {status}",
            util::format_duration(*took)
        );
    }
    let total: Duration = phases.iter().map(|(_, took, _)| *took).sum();
    progress!("  {:<10} {:>12}", "total", util::format_duration(total));
    result
}

/// Rounds of the tests repeated under CPU load, with `--stress`.
const STRESS_ROUNDS: &str = "20";

fn run_phases(
    matrix: Matrix,
    stress: bool,
    cargo_args: &[String],
    phases: &mut Vec<(&'static str, Duration, bool)>,
) -> Result<()> {
    let mut phase = |name: &'static str, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        progress!("== {name}");
        let started = Instant::now();
        let result = f();
        phases.push((name, started.elapsed(), result.is_ok()));
        result
    };

    phase("setup", &mut setup::run)?;
    let mut vars = Vec::new();
    phase("fixtures", &mut || {
        vars = fixtures::prepare(matrix, false)?;
        for (key, value) in &vars {
            progress!("  {key}={value}");
        }
        Ok(())
    })?;

    let path = util::path_with_tools()?;
    let cargo = |args: &[&str]| {
        let mut cmd = util::cargo();
        cmd.args(args)
            .current_dir(util::workspace_root())
            .env("PATH", &path)
            // Under xtask a missing privilege or fixture fails the run instead of skipping.
            .env("LLAMAPROBE_REQUIRE_ROOT", "1")
            .env("LLAMAPROBE_REQUIRE_FIXTURES", "1")
            .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if stress {
            cmd.env("LLAMAPROBE_STRESS_ROUNDS", STRESS_ROUNDS);
        }
        cmd
    };

    phase("test", &mut || {
        util::run_inherit(
            cargo(&["test", "--workspace", "--exclude", "probe-ebpf"]).args(cargo_args),
        )
    })?;
    // Every fuzz target for a few seconds (one build for all): a parser that panics on what
    // a traced process or a file holds fails the run here.
    phase("fuzz", &mut fuzz::short_run)?;
    phase("clippy", &mut || {
        util::run_inherit(&mut cargo(&[
            "clippy",
            "--workspace",
            "--exclude",
            "probe-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    phase("fmt", &mut || {
        util::run_inherit(&mut cargo(&["fmt", "--all", "--", "--check"]))
            .and_then(|()| {
                // The fuzz targets are a workspace of their own.
                util::run_inherit(&mut cargo(&[
                    "fmt",
                    "--all",
                    "--manifest-path",
                    "fuzz/Cargo.toml",
                    "--",
                    "--check",
                ]))
            })
            .map_err(|e| {
                e.context(
                    "code is not formatted: run `cargo fmt --all` \
                     (and `cargo fmt --all --manifest-path fuzz/Cargo.toml`)",
                )
            })
    })?;
    Ok(())
}
