//! `--trace-out FILE`: a Chrome / Perfetto trace (JSON array format) that opens in
//! ui.perfetto.dev and chrome://tracing. One track per thread of the traced process (decode
//! steps, sampling, synchronize, model load, context creation, KV memory changes, at their real
//! thread ids) and one track per sequence (requests, split into prompt and generation).
//!
//! Events are written as they come (nothing is kept in memory); timestamps are the probes'
//! monotonic clock in microseconds.

use std::{
    collections::HashSet,
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use serde_json::{json, Value};

use super::{Sink, Snapshot};
use crate::model::Observation;

/// Track ids of sequences sit above any thread id (pid_max is at most 2^22).
const SEQ_TRACK_BASE: u64 = 1 << 30;

/// The trace file sink's options.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "trace_file_options")]
#[command(next_help_heading = "Files")]
pub struct Options {
    /// Write a Chrome/Perfetto trace (open in ui.perfetto.dev or chrome://tracing) to FILE:
    /// a track per thread (decode steps, sampling, synchronize, loads) and per sequence
    /// (requests).
    #[arg(long, value_name = "FILE", env = "LLAMAPROBE_TRACE_OUT")]
    pub trace_out: Option<std::path::PathBuf>,
}

pub struct TraceFile {
    out: BufWriter<File>,
    first: bool,
    failed: bool,
    named: HashSet<(u32, u64)>,
}

impl TraceFile {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let f = File::create(path)
            .map_err(|e| anyhow::anyhow!("cannot create --trace-out {}: {e}", path.display()))?;
        let mut out = BufWriter::new(f);
        out.write_all(b"[\n")?;
        Ok(Self {
            out,
            first: true,
            failed: false,
            named: HashSet::new(),
        })
    }

    fn write(&mut self, v: &Value) {
        if self.failed {
            return;
        }
        let sep: &[u8] = if self.first { b"" } else { b",\n" };
        self.first = false;
        let r = self
            .out
            .write_all(sep)
            .and_then(|_| serde_json::to_writer(&mut self.out, v).map_err(std::io::Error::from));
        if let Err(e) = r {
            tracing::error!("--trace-out: write failed, no more events will be written: {e}");
            self.failed = true;
        }
    }

    /// Names a track once (thread or sequence).
    fn track(&mut self, pid: u32, tid: u64, name: impl FnOnce() -> String) {
        if self.named.insert((pid, tid)) {
            let n = name();
            self.write(&json!({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": n}}));
            if tid >= SEQ_TRACK_BASE {
                // Sequences sort after the threads.
                self.write(
                    &json!({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                    "args": {"sort_index": tid - SEQ_TRACK_BASE + 1000}}),
                );
            }
        }
    }

    /// A complete event ("X") from `start_ns` to `end_ns`.
    fn span(
        &mut self,
        (pid, tid): (u32, u64),
        name: &str,
        cat: &str,
        (start_ns, end_ns): (u64, u64),
        args: Value,
    ) {
        self.write(&json!({
            "ph": "X", "name": name, "cat": cat, "pid": pid, "tid": tid,
            "ts": start_ns as f64 / 1e3,
            "dur": end_ns.saturating_sub(start_ns) as f64 / 1e3,
            "args": args,
        }));
    }
}

impl Sink for TraceFile {
    fn observe(&mut self, obs: &Observation) {
        if let Some(o) = obs.origin() {
            let (pid, tid) = (o.pid, o.tid as u64);
            self.track(pid, tid, || format!("thread {tid}"));
            let (start, end) = (o.start_ns, o.end_ns);
            match obs {
                Observation::Decode(d) => {
                    let name = match d.phase {
                        Some(p) => {
                            format!("decode {} ({} tokens)", p.label(), d.n_tokens.unwrap_or(0))
                        }
                        None => "decode".to_string(),
                    };
                    self.span((pid, tid), &name, "decode", (start, end), json!({
                        "n_tokens": d.n_tokens, "phase": d.phase, "result": d.result,
                        "context": d.context, "draft_tokens": d.draft_tokens,
                        "prompt_tokens": d.prompt_tokens, "generated_tokens": d.generated_tokens,
                        "sequences": d.parts.iter().map(|p| json!([p.seq_id, p.n_tokens, p.kind])).collect::<Vec<_>>(),
                    }));
                }
                Observation::Sample(s) => self.span(
                    (pid, tid),
                    "sample",
                    "sample",
                    (start, end),
                    json!({"idx": s.idx}),
                ),
                Observation::Synchronize(s) => self.span(
                    (pid, tid),
                    "synchronize",
                    "sync",
                    (start, end),
                    json!({
                        "compute_ms": s.compute_ns.map(|c| c as f64 / 1e6),
                    }),
                ),
                Observation::ModelLoad(m) => self.span(
                    (pid, tid),
                    "model load",
                    "model",
                    (start, end),
                    json!({
                        "path": m.path, "ok": m.ok,
                    }),
                ),
                Observation::ContextCreate(c) => self.span(
                    (pid, tid),
                    "context create",
                    "context",
                    (start, end),
                    json!(c.params),
                ),
                Observation::Memory(m) => self.span(
                    (pid, tid),
                    &format!("memory {}", m.op),
                    "memory",
                    (start, end),
                    json!({
                        "seq_id": m.seq_id, "seq_dst": m.seq_dst, "p0": m.p0, "p1": m.p1,
                        "delta": m.delta,
                    }),
                ),
                Observation::TaskPost(p) => self.span(
                    (pid, tid),
                    "task posted",
                    "server",
                    (start, end),
                    json!({"front": p.front, "tasks_bytes": p.tasks_bytes, "tasks": p.tasks}),
                ),
                Observation::SlotLaunch(l) => self.span(
                    (pid, tid),
                    &format!("slot {} takes task {}", l.slot_id, l.task_id),
                    "server",
                    (start, end),
                    json!({"slot_id": l.slot_id, "task_id": l.task_id, "ok": l.ok}),
                ),
                Observation::SlotRelease(r) => self.span(
                    (pid, tid),
                    &format!("slot {} released", r.slot_id),
                    "server",
                    (start, end),
                    json!({"slot_id": r.slot_id, "task_id": r.task_id}),
                ),
                Observation::ContextShift(c) => self.span(
                    (pid, tid),
                    &format!(
                        "context shift (sequence {}, {} tokens)",
                        c.seq_id, c.discarded
                    ),
                    "context_shift",
                    (start, end),
                    json!({"seq_id": c.seq_id, "discarded": c.discarded, "request": c.request_id}),
                ),
                Observation::Request(_)
                | Observation::Traced(_)
                | Observation::Released { .. }
                | Observation::Ended(_)
                | Observation::ModelInfo(_)
                | Observation::CpuSample(_) => {}
            }
            return;
        }
        if let Observation::Request(r) = obs {
            let tid = SEQ_TRACK_BASE + r.seq_id.max(0) as u64;
            self.track(r.pid, tid, || format!("sequence {}", r.seq_id));
            let args = json!({
                "request": r.id, "input_tokens": r.input_tokens(), "cached_tokens": r.cached_tokens,
                "prompt_tokens": r.prompt_tokens, "generated_tokens": r.generated_tokens,
                "ttft_ms": r.ttft_s().map(|s| s * 1e3), "tpot_ms": r.tpot_s().map(|s| s * 1e3),
                "queue_ms": r.queue_s().map(|s| s * 1e3), "type": r.task_type,
                "task_id": r.task_id, "context_shifts": r.context_shifts,
            });
            self.span(
                (r.pid, tid),
                &format!("request {}", r.id),
                "request",
                (r.arrival_ns(), r.end_ns),
                args,
            );
            if let Some(q) = r.queued_ns {
                self.span((r.pid, tid), "queue", "request", (q, r.start_ns), json!({}));
            }
            let prompt_end = r.first_token_ns.or(r.prompt_end_ns).unwrap_or(r.end_ns);
            self.span(
                (r.pid, tid),
                "prompt",
                "request",
                (r.start_ns, prompt_end),
                json!({"tokens": r.prompt_tokens}),
            );
            if prompt_end < r.end_ns {
                self.span(
                    (r.pid, tid),
                    "generation",
                    "request",
                    (prompt_end, r.end_ns),
                    json!({"tokens": r.generated_tokens}),
                );
            }
        }
    }

    fn tick(&mut self, _: &Snapshot) {
        let _ = self.out.flush();
    }

    fn finish(&mut self, _: &Snapshot) -> anyhow::Result<()> {
        self.out.write_all(b"\n]\n")?;
        self.out.flush()?;
        Ok(())
    }
}
