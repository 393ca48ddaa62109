//! Section 3, probe hits per generated token: for every fixture of fixtures.json built here, a
//! llama-server with `llamaprobe attach --events-out` (or, for a library-only fixture, our
//! driver under `llamaprobe run --events-out`), its events counted by kind and divided by the
//! tokens generated.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{
    proc::{Proc, Stream},
    util::{self, progress},
};

use super::{
    fixture_vars,
    llama_server::{attach, completion, detach, start_server},
    read_json, var, Env,
};

pub struct HitsRow {
    pub fixture: String,
    pub llama_cpp: String,
    pub generation: String,
    pub via: String,
    pub generated: u64,
    /// Events by kind (decode, synchronize, sample, model_load, context_create).
    pub events: BTreeMap<String, u64>,
    pub skipped: Option<String>,
}

impl HitsRow {
    pub fn count(&self, kind: &str) -> u64 {
        self.events.get(kind).copied().unwrap_or(0)
    }

    /// Probed calls while generating (every probe event but the one-off model loads and
    /// context creations), per generated token.
    pub fn events_per_token(&self) -> f64 {
        self.events
            .iter()
            .filter(|(kind, _)| !ONE_OFF_KINDS.contains(&kind.as_str()))
            .map(|(_, n)| n)
            .sum::<u64>() as f64
            / self.generated.max(1) as f64
    }
}

/// Observations of `--events-out` that come from one probed call each, once per model or
/// context; and those that come from no probe at all (requests are reconstructed from the others).
const ONE_OFF_KINDS: &[&str] = &["model_load", "context_create"];
const DERIVED_KINDS: &[&str] = &["request"];
/// Probe families with a column of their own in the table.
pub const HIT_COLUMNS: &[&str] = &["decode", "synchronize", "sample", "memory"];

/// The extra row: the newest server with `llama_synchronize` probed as well.
pub const NEWEST_SYNC_ON: &str = "newest, --sync on";

pub struct Hits {
    pub rows: Vec<HitsRow>,
    pub fixtures_json: PathBuf,
}

pub fn measure(env: &mut Env) -> Result<Hits> {
    let vars = fixture_vars(env)?;
    let model = var(&vars, "LLAMAPROBE_MODEL")?;
    let json_path = vars
        .get("LLAMAPROBE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| env.cache.join("fixtures.json"));
    let list: Vec<Value> = match read_json(&json_path) {
        Ok(Value::Array(list)) => list,
        _ => {
            // No description: the newest server alone.
            vec![serde_json::json!({
                "name": "newest",
                "server": var(&vars, "LLAMAPROBE_LLAMA_SERVER")?,
                "generation": "",
                "llama_cpp": "",
                "env": {},
            })]
        }
    };
    let help = util::output(Command::new(&env.probe_bin).args(["attach", "--help"]))?;
    let sync_option = help.contains("--sync <");
    let mut jobs: Vec<(String, Vec<String>, &Value)> = Vec::new();
    for f in &list {
        let name = f["name"].as_str().unwrap_or("?").to_string();
        let newest = name == "newest";
        jobs.push((name, Vec::new(), f));
        if newest && sync_option {
            jobs.push((NEWEST_SYNC_ON.into(), vec!["--sync".into(), "on".into()], f));
        }
    }
    let mut rows = Vec::new();
    for (name, extra_args, f) in jobs {
        let mut row = HitsRow {
            fixture: name.clone(),
            llama_cpp: f["llama_cpp"].as_str().unwrap_or("").to_string(),
            generation: f["generation"].as_str().unwrap_or("").to_string(),
            via: String::new(),
            generated: 0,
            events: BTreeMap::new(),
            skipped: None,
        };
        let fixture_env: Vec<(String, String)> = f["env"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let symbols_from = f["symbols_from"].as_str().map(PathBuf::from);
        let server = f["server"].as_str().map(PathBuf::from);
        let driver = f["driver"].as_str().map(PathBuf::from);
        let present = |p: &Option<PathBuf>| p.as_ref().is_some_and(|p| p.is_file());
        let outcome = if present(&server) {
            row.via = "llama-server".into();
            hits_server(
                env,
                &name,
                server.as_deref().unwrap_or(Path::new("")),
                &model,
                &fixture_env,
                symbols_from.as_deref(),
                &extra_args,
                &mut row,
            )
        } else if present(&driver) {
            row.via = "driver (llamaprobe run)".into();
            hits_driver(
                env,
                driver.as_deref().unwrap_or(Path::new("")),
                &model,
                &fixture_env,
                symbols_from.as_deref(),
                &mut row,
            )
        } else {
            row.skipped = Some("not built here (no llama-server or driver file)".into());
            Ok(())
        };
        if let Err(e) = outcome {
            row.skipped = Some(format!("failed: {e:#}"));
        }
        match &row.skipped {
            Some(why) => progress!("  {name}: skipped: {why}"),
            None => progress!(
                "  {name}: {} generated tokens; events {:?}: {:.2} probed calls = {:.2} probe hits per token",
                row.generated,
                row.events,
                row.events_per_token(),
                2.0 * row.events_per_token()
            ),
        }
        rows.push(row);
    }
    Ok(Hits {
        rows,
        fixtures_json: json_path,
    })
}

fn count_events(path: &Path) -> Result<BTreeMap<String, u64>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut counts = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("parsing a line of {}", path.display()))?;
        let kind = v["kind"].as_str().unwrap_or("unknown").to_string();
        if !DERIVED_KINDS.contains(&kind.as_str()) {
            *counts.entry(kind).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

#[allow(clippy::too_many_arguments)]
fn hits_server(
    env: &Env,
    name: &str,
    server_bin: &Path,
    model: &Path,
    fixture_env: &[(String, String)],
    symbols_from: Option<&Path>,
    extra_args: &[String],
    row: &mut HitsRow,
) -> Result<()> {
    let slug: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let server = start_server(env, server_bin, model, fixture_env, &format!("hits-{slug}"))?;
    completion(&server.addr).context("warm-up request")?;
    let events = env.work.join(format!("events-{slug}.jsonl"));
    let summary = env.work.join(format!("summary-hits-{slug}.json"));
    let mut extra = extra_args.to_vec();
    extra.extend(["--events-out".to_string(), events.display().to_string()]);
    if let Some(from) = symbols_from {
        extra.push("--symbols-from".into());
        extra.push(from.display().to_string());
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let p = attach(env, server.proc.pid(), &extra, &summary)?;
    for _ in 0..env.cfg.hits_requests {
        row.generated += completion(&server.addr)?.predicted_n;
    }
    detach(p, &summary)?;
    row.events = count_events(&events)?;
    Ok(())
}

fn hits_driver(
    env: &Env,
    driver: &Path,
    model: &Path,
    fixture_env: &[(String, String)],
    symbols_from: Option<&Path>,
    row: &mut HitsRow,
) -> Result<()> {
    let events = env.work.join(format!("events-{}.jsonl", row.fixture));
    let mut cmd = Command::new(&env.probe_bin);
    cmd.args(["run", "--quiet", "--metrics-addr", "off", "--events-out"])
        .arg(&events);
    if let Some(from) = symbols_from {
        cmd.arg("--symbols-from").arg(from);
    }
    cmd.arg("--")
        .arg(driver)
        .arg(model)
        .envs(fixture_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env_remove("DRIVER_WAIT_STDIN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut p = Proc::spawn("llamaprobe run (driver)", &mut cmd, libc::SIGINT)?;
    let line = p.wait_line("the driver's report", Duration::from_secs(120), |s, l| {
        s == Stream::Out && l.starts_with("driver ")
    })?;
    let status = p.wait_exit(Duration::from_secs(60))?;
    if !status.success() {
        bail!("llamaprobe run failed ({status}):\n{}", p.tail());
    }
    row.generated = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("generated="))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no generated= in the driver's line {line:?}"))?;
    row.events = count_events(&events)?;
    Ok(())
}
