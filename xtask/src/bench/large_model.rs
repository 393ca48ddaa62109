//! The ≥ 10 ms model of section 2: LLAMAPROBE_MODEL_LARGE if its decode step is long enough on
//! this machine, else a model generated with the fixtures' script, sized from the last step
//! measured.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::{
    server::Server,
    util::{self, progress},
};

use super::{
    llama_server::{completion, start_server},
    throughput::{undisturbed_completion, ServerResult, DISTURBED_CORES, MAX_REPEATS},
    Env,
};

/// The larger model must take at least this long per generated token.
pub const STEP_TARGET_MS: f64 = 10.0;
/// (n_layer, n_embd, n_ff) of a generated model.
type Dims = (u32, u32, u32);
/// Models that can be generated (f32, 4 heads / 2 KV heads) when LLAMAPROBE_MODEL_LARGE decodes
/// faster than STEP_TARGET_MS, smallest first: about 13, 26, 50, 93 and 156 M parameters.
const LARGE_CANDIDATES: &[Dims] = &[
    (8, 384, 1024),
    (16, 384, 1024),
    (16, 512, 1536),
    (20, 640, 1792),
    (24, 768, 2048),
];
/// A candidate is kept when its checked step is at least this; the next one is sized for
/// STEP_AIM_MS.
const STEP_ACCEPT_MS: f64 = 12.0;
const STEP_AIM_MS: f64 = 18.0;
/// make_tiny_model.py's default (LLAMAPROBE_MODEL) and `--large` preset (LLAMAPROBE_MODEL_LARGE).
const TINY_DIMS: Dims = (2, 64, 128);
const TINY_LARGE_DIMS: Dims = (4, 256, 512);

/// A candidate for the ≥ 10 ms model: what it is and its measured step.
pub struct LargeCheck {
    pub label: String,
    pub step_ms: f64,
}

/// Weights of a model the script generates, for scaling the step: attention (q, o: E²; k, v:
/// E × E/2), feed-forward 3 × E × F per layer, plus embeddings and output (vocabulary ~600).
fn params((layers, embd, ff): Dims) -> f64 {
    let (l, e, f) = (f64::from(layers), f64::from(embd), f64::from(ff));
    l * (3.0 * e * e + 3.0 * e * f) + 2.0 * 600.0 * e
}

/// The ≥ 10 ms model: LLAMAPROBE_MODEL_LARGE if its step is long enough, else the smallest
/// generated candidate whose size, scaled from the last step measured, should reach
/// STEP_AIM_MS; at most three tries.
pub fn pick_large(
    env: &Env,
    server_bin: &Path,
    tiny_large: Option<&Path>,
    tiny_step_ms: f64,
    result: &mut ServerResult,
) -> Result<(Server, PathBuf, String)> {
    // The model to try, its dims (None: LLAMAPROBE_MODEL_LARGE, the script's --large preset).
    let mut next: Option<(String, Option<Dims>, PathBuf)> = tiny_large.map(|p| {
        (
            format!(
                "{} (LLAMAPROBE_MODEL_LARGE)",
                p.file_name().unwrap_or_default().to_string_lossy()
            ),
            None,
            p.to_path_buf(),
        )
    });
    // Without it, scale from the tiny model's step.
    let mut measured = (params(TINY_DIMS), tiny_step_ms);
    if next.is_none() {
        result.problems.push(
            "LLAMAPROBE_MODEL_LARGE is not prepared (`cargo xtask fixtures --large`): the larger \
             model was chosen among generated ones from the tiny model's step"
                .into(),
        );
    }
    for attempt in 0..4 {
        let (label, dims, path) = match next.take() {
            Some(n) => n,
            None => {
                let d = candidate_after(measured)
                    .context("no larger model to generate than the last one tried")?;
                let path = generate_model(env, d)?;
                (format!("generated {}", dims_label(d)), Some(d), path)
            }
        };
        let server = start_server(env, server_bin, &path, &[], "large")?;
        completion(&server.addr).context("warm-up request")?;
        // Other load only slows a step down: keep the fastest of up to 1 + MAX_REPEATS
        // requests, stopping at the first one nothing else disturbed.
        let mut step = f64::INFINITY;
        for _ in 0..=MAX_REPEATS {
            let (c, other) = undisturbed_completion(&server)?;
            step = step.min(c.predicted_per_token_ms);
            if other <= DISTURBED_CORES {
                break;
            }
            progress!("{label}: other processes used {other:.2} cores: measuring again");
        }
        progress!("{label}: {step:.1} ms per generated token");
        result.large_checks.push(LargeCheck {
            label: label.clone(),
            step_ms: step,
        });
        measured = (params(dims.unwrap_or(TINY_LARGE_DIMS)), step);
        let last_try = attempt == 3 || candidate_after(measured).is_none();
        // A margin: the runs that follow are often a little faster than this one check.
        if step >= STEP_ACCEPT_MS || last_try {
            if step < STEP_TARGET_MS {
                result.problems.push(format!(
                    "no model tried reached a {STEP_TARGET_MS:.0} ms decode step; using {label} \
                     ({step:.1} ms)"
                ));
            }
            let short = dims.map_or_else(|| "large".to_string(), dims_label);
            return Ok((server, path, short));
        }
    }
    unreachable!("the fourth try always returns")
}

/// The smallest candidate bigger than the measured model whose size, scaled by the measured
/// step, should reach STEP_AIM_MS (else the biggest, if bigger).
fn candidate_after((measured_params, step_ms): (f64, f64)) -> Option<Dims> {
    let needed = measured_params * STEP_AIM_MS / step_ms.max(0.01);
    let bigger = || {
        LARGE_CANDIDATES
            .iter()
            .copied()
            .filter(move |d| params(*d) > measured_params)
    };
    bigger()
        .find(|d| params(*d) >= needed)
        .or_else(|| bigger().next_back())
}

fn dims_label((layers, embd, ff): Dims) -> String {
    format!("{layers} layers, n_embd {embd}, ff {ff}")
}

/// Generates `cache/models/bench-L<layers>-E<embd>-F<ff>.gguf` with the fixtures' script.
fn generate_model(env: &Env, dims: Dims) -> Result<PathBuf> {
    let (layers, embd, ff) = dims;
    let script = util::workspace_root().join("xtask/assets/make_tiny_model.py");
    let script_text = fs::read(&script).with_context(|| format!("reading {}", script.display()))?;
    let models = env.cache.join("models");
    fs::create_dir_all(&models)?;
    let path = models.join(format!("bench-L{layers}-E{embd}-F{ff}.gguf"));
    let stamp_path = path.with_extension("gguf.stamp");
    let stamp = format!("{:016x} {layers} {embd} {ff}\n", util::fnv1a(&script_text));
    if path.is_file() && fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(path);
    }
    let (python, pythonpath) = model_python(&env.cache)?;
    progress!("generating {} ({})", path.display(), dims_label(dims));
    let partial = path.with_extension("gguf.part");
    let mut cmd = Command::new(&python);
    if let Some(dir) = &pythonpath {
        cmd.env("PYTHONPATH", dir);
    }
    util::run(
        cmd.arg(&script)
            .args(["--n-layer", &layers.to_string()])
            .args(["--n-embd", &embd.to_string()])
            .args(["--n-ff", &ff.to_string()])
            .arg(&partial),
    )?;
    fs::rename(&partial, &path)?;
    fs::write(&stamp_path, stamp)?;
    Ok(path)
}

/// The Python that `cargo xtask fixtures` set up for the model script (venv, else pip --target).
fn model_python(cache: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let candidates = [
        (cache.join("venv/bin/python"), None),
        (PathBuf::from("python3"), Some(cache.join("pylib"))),
    ];
    for (python, pythonpath) in candidates {
        let mut cmd = Command::new(&python);
        if let Some(dir) = &pythonpath {
            cmd.env("PYTHONPATH", dir);
        }
        let ok = cmd
            .args(["-c", "import gguf, numpy"])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok((python, pythonpath));
        }
    }
    bail!("no Python with gguf and numpy: run `cargo xtask fixtures --large` first")
}
