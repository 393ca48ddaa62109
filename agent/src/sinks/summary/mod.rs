//! The summary sink: per-phase decode latency percentiles, throughput, batch sizes, errors,
//! sampling and synchronize latency, requests, loads and contexts, aggregated from the
//! observations ([`Stats`]); shown live ([`terminal`]) and at the end (stdout and
//! `--summary-json`).

pub mod terminal;

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use super::{Sink, Snapshot};
use crate::model::{ProcessEnd, TracedProcess};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::model::{ContextParams, DecodeResult, Observation, Phase};

/// Latency distribution of one kind of call.
pub struct Latency {
    hist: Histogram<u64>,
    total_ns: u128,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            // 1 ns … 1 hour, 3 significant digits.
            hist: Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds"),
            total_ns: 0,
        }
    }
}

/// Latency figures in milliseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub total_ms: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn record(&mut self, ns: u64) {
        self.hist.saturating_record(ns.max(1));
        self.total_ns += ns as u128;
    }
    pub fn count(&self) -> u64 {
        self.hist.len()
    }
    pub fn summary(&self) -> LatencySummary {
        let ms = |ns: u64| ns as f64 / 1e6;
        let n = self.hist.len();
        if n == 0 {
            return LatencySummary::default();
        }
        LatencySummary {
            count: n,
            total_ms: self.total_ns as f64 / 1e6,
            mean_ms: self.total_ns as f64 / 1e6 / n as f64,
            p50_ms: ms(self.hist.value_at_quantile(0.50)),
            p90_ms: ms(self.hist.value_at_quantile(0.90)),
            p99_ms: ms(self.hist.value_at_quantile(0.99)),
            max_ms: ms(self.hist.max()),
        }
    }
}

#[derive(Default)]
struct PhaseStats {
    latency: Latency,
    tokens: u64,
    busy_ns: u128,
    batch_sizes: BTreeMap<u32, u64>,
}

/// One phase in the summary.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseSummary {
    #[serde(flatten)]
    pub latency: LatencySummary,
    /// Tokens in these steps (all kinds).
    pub tokens: u64,
    /// Tokens per second of decode time.
    pub tokens_per_s: f64,
    /// Exact batch sizes (tokens per step) → number of steps.
    pub batch_sizes: BTreeMap<u32, u64>,
}

/// A model load in the summary.
#[derive(Clone, Debug, Serialize)]
pub struct LoadSummary {
    pub pid: u32,
    pub path: Option<String>,
    pub ok: bool,
    pub duration_ms: f64,
}

/// A context in the summary.
#[derive(Clone, Debug, Serialize)]
pub struct ContextSummary {
    pub pid: u32,
    pub ok: bool,
    pub context: crate::model::ContextRole,
    pub duration_ms: f64,
    #[serde(flatten)]
    pub params: ContextParams,
}

/// What a speculative draft model's context did (apart from the main context's figures).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DraftContextSummary {
    pub decode_calls: u64,
    pub tokens: u64,
    pub sampled_tokens: u64,
}

/// Speculative decoding in the main context.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct SpeculativeSummary {
    /// Draft tokens verified.
    pub draft_tokens: u64,
    /// Draft tokens accepted by the sampler.
    pub accepted_tokens: u64,
    /// Drafts verified (one per sequence and verification step).
    pub drafts: u64,
}

/// Everything the summary reports; serialised by `--summary-json`.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub decode_calls: u64,
    /// Calls by result label (ok, no_kv_slot, aborted, invalid_batch, error).
    pub decode_results: BTreeMap<&'static str, u64>,
    /// Failed calls by raw return code.
    pub decode_errors_by_code: BTreeMap<i32, u64>,
    /// Decode steps by phase (all results).
    pub phases: BTreeMap<&'static str, PhaseSummary>,
    /// Decode steps whose batch could not be read.
    pub decode_unknown_phase: u64,
    /// Prompt tokens processed by successful steps.
    pub prompt_tokens: u64,
    /// Generated tokens fed back by successful steps.
    pub generation_tokens_decoded: u64,
    /// Tokens sampled (one per generated token).
    pub sampled_tokens: u64,
    pub sample: LatencySummary,
    pub synchronize: LatencySummary,
    /// Decode step start → end of the synchronize after it.
    pub compute: LatencySummary,
    pub model_loads: Vec<LoadSummary>,
    pub contexts: Vec<ContextSummary>,
    /// Wall time between the first and the last observation, seconds.
    pub span_s: f64,
    /// Tokens each sequence holds at the end (sequence id → tokens), of the last process seen.
    pub context_used: BTreeMap<i32, u32>,
    /// KV memory calls seen (seq_rm, seq_cp, clear).
    pub memory_changes: u64,
    /// Requests reconstructed (closed).
    pub requests: u64,
    /// Time to first token of the requests.
    pub time_to_first_token: LatencySummary,
    /// Mean time per output token after the first, per request.
    pub time_per_output_token: LatencySummary,
    pub request_duration: LatencySummary,
    /// Queue wait of the requests (llama-server's task queue; empty in batch-view mode).
    pub request_queue: LatencySummary,
    /// Where the requests' wall time went: all requests together, and the longest one by one.
    pub request_time: RequestTime,
    /// How requests were reconstructed.
    pub request_mode: Option<crate::model::Mode>,
    /// Tasks handed to llama-server's queue (`server_queue::post`, cancels excluded).
    pub task_posts: u64,
    /// llama-server slots released (`server_slot::release`).
    pub slot_releases: u64,
    /// Tasks llama-server's slots took (`launch_slot_with_task` returning true).
    pub slot_launches: u64,
    /// Requests by type (`completion`, `embedding`, `rerank`, `infill`, `unknown`).
    pub requests_by_type: BTreeMap<&'static str, u64>,
    /// Accepted work that never became a request, by reason.
    pub unserved: crate::model::Unserved,
    /// Warm-up decodes (start-up: a short prompt decoded and cleared without a sample, or in
    /// llama-server a decode for no task): not requests.
    pub warmups: u64,
    /// Context shifts (a generating sequence outgrew its share of the context).
    pub context_shifts: u64,
    /// A speculative draft model's context (the figures above are the main context's).
    pub draft_context: Option<DraftContextSummary>,
    pub speculative: SpeculativeSummary,
    /// How the process's facts were learnt: observed by the probes, or recovered from the
    /// process when llamaprobe attached after they happened.
    pub facts: Vec<String>,
    /// The CPU profile (`--profile-cpu`; absent without it).
    pub cpu_profile: Option<CpuProfileSummary>,
}

/// How many requests the summary lists one by one (the longest; the totals count them all).
pub const REQUESTS_LISTED: usize = 10;

/// The requests' wall time (arrival to last token), split: inside the decode steps that
/// carried their tokens, in the samplings that gave them, and outside both (queue wait, the
/// server's work between steps, other requests' steps). All requests together, and the
/// longest [`REQUESTS_LISTED`] one by one.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RequestTime {
    #[serde(flatten)]
    pub total: TimeSplit,
    /// The longest requests, longest first, each with its own split.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub longest: Vec<RequestSplit>,
}

/// Wall time split into decode steps, sampling and outside them.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct TimeSplit {
    pub wall_s: f64,
    pub decode_s: f64,
    pub sampling_s: f64,
    pub outside_s: f64,
    /// `--profile-cpu`: CPU samples inside the requests' decode steps (a step of several
    /// requests counts for each).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_samples: Option<u64>,
}

/// One request's split.
#[derive(Clone, Debug, Serialize)]
pub struct RequestSplit {
    /// llamaprobe's request id (`llama.request.id` on the span, `request` in the pprof file).
    pub id: u64,
    pub pid: u32,
    #[serde(rename = "type")]
    pub task_type: &'static str,
    #[serde(flatten)]
    pub time: TimeSplit,
}

impl TimeSplit {
    fn of(r: &crate::model::Request) -> Self {
        TimeSplit {
            wall_s: r.duration_ns() as f64 / 1e9,
            decode_s: r.decode_ns as f64 / 1e9,
            sampling_s: r.sampling_ns as f64 / 1e9,
            outside_s: r.outside_ns() as f64 / 1e9,
            cpu_samples: r.cpu_samples,
        }
    }
    fn add(&mut self, o: &TimeSplit) {
        self.wall_s += o.wall_s;
        self.decode_s += o.decode_s;
        self.sampling_s += o.sampling_s;
        self.outside_s += o.outside_s;
        if let Some(n) = o.cpu_samples {
            *self.cpu_samples.get_or_insert(0) += n;
        }
    }
    /// Shares of the wall time: (decode steps, sampling, outside).
    pub fn shares(&self) -> (f64, f64, f64) {
        if self.wall_s <= 0.0 {
            return (0.0, 0.0, 0.0);
        }
        (
            self.decode_s / self.wall_s,
            self.sampling_s / self.wall_s,
            self.outside_s / self.wall_s,
        )
    }
}

impl RequestTime {
    fn add(&mut self, r: &crate::model::Request) {
        let time = TimeSplit::of(r);
        self.total.add(&time);
        // Kept sorted longest first; the shortest of a full list makes way.
        let at = self
            .longest
            .partition_point(|o| o.time.wall_s >= time.wall_s);
        if at < REQUESTS_LISTED {
            self.longest.insert(
                at,
                RequestSplit {
                    id: r.id,
                    pid: r.pid,
                    task_type: r.task_type,
                    time,
                },
            );
            self.longest.truncate(REQUESTS_LISTED);
        }
    }
}

/// The CPU samples of the run (`--profile-cpu`).
#[derive(Clone, Debug, Serialize)]
pub struct CpuProfileSummary {
    pub hz: u32,
    pub samples: u64,
    /// Samples inside decode steps (every step phase, `decode` included).
    pub in_decode_steps: u64,
    /// Samples with a user stack beyond the leaf (frame pointers).
    pub with_stack: u64,
    /// By phase (`prompt`, `generation`, `mixed`, `decode`, `sampling`, `model_load`,
    /// `other`; those with samples).
    pub phases: BTreeMap<&'static str, CpuPhaseSummary>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CpuPhaseSummary {
    pub samples: u64,
    /// Of all samples.
    pub share: f64,
    /// The leaf functions with the most samples (at most `--profile-top`), most first.
    pub top: Vec<CpuFunction>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CpuFunction {
    pub function: String,
    pub samples: u64,
    /// Of the phase's samples.
    pub share: f64,
}

/// Aggregates observations for the summary.
#[derive(Default)]
pub struct Stats {
    decode_calls: u64,
    results: BTreeMap<&'static str, u64>,
    errors: BTreeMap<i32, u64>,
    phases: BTreeMap<Phase, PhaseStats>,
    unknown_phase: u64,
    prompt_tokens: u64,
    generation_tokens: u64,
    sample: Latency,
    sync: Latency,
    compute: Latency,
    loads: Vec<LoadSummary>,
    contexts: Vec<ContextSummary>,
    first_ns: Option<u64>,
    last_ns: u64,
    /// Latest tokens held, by (pid, sequence).
    context_used: BTreeMap<(u32, i32), u32>,
    memory_changes: u64,
    requests: u64,
    facts: Vec<String>,
    ttft: Latency,
    tpot: Latency,
    request_duration: Latency,
    request_queue: Latency,
    request_time: RequestTime,
    request_mode: Option<crate::model::Mode>,
    task_posts: u64,
    slot_releases: u64,
    slot_launches: u64,
    requests_by_type: BTreeMap<&'static str, u64>,
    unserved: crate::model::Unserved,
    warmups: u64,
    context_shifts: u64,
    draft: Option<DraftContextSummary>,
    speculative: SpeculativeSummary,
    /// `--profile-cpu`: (Hz, functions per phase shown) and the samples.
    cpu: Option<((u32, usize), crate::sinks::profile::Tally)>,
}

impl Stats {
    /// The CPU profile is on: its samples are counted and shown.
    pub fn profile_cpu(&mut self, hz: u32, top: usize) {
        self.cpu = Some(((hz, top), crate::sinks::profile::Tally::new(false)));
    }

    /// Records the work that never became a request (from the request stage).
    pub fn set_unserved(&mut self, unserved: crate::model::Unserved) {
        self.unserved = unserved;
    }

    /// Records the warm-ups the request stage left out.
    pub fn set_warmups(&mut self, n: u64) {
        self.warmups = n;
    }

    /// Records how a fact about the process was learnt (shown in the summary).
    pub fn note(&mut self, fact: String) {
        self.facts.push(fact);
    }

    /// Records how requests are reconstructed (shown in the summary).
    pub fn set_request_mode(&mut self, mode: crate::model::Mode) {
        self.request_mode = Some(mode);
    }

    pub fn observe(&mut self, obs: &Observation) {
        match obs {
            Observation::CpuSample(c) => {
                if let Some((_, t)) = &mut self.cpu {
                    t.add(c);
                }
                return;
            }
            Observation::Traced(t) => return self.set_request_mode(t.request_mode),
            Observation::ModelInfo(f) => return self.note(f.fact.clone()),
            _ => {}
        }
        // A draft model's context has its own line; every other figure is the main context's.
        match obs {
            Observation::Decode(d) if d.context == crate::model::ContextRole::Draft => {
                let n = d.n_tokens.unwrap_or(0) as u64;
                let dr = self.draft.get_or_insert_with(Default::default);
                dr.decode_calls += 1;
                dr.tokens += n;
                return;
            }
            Observation::Sample(s) if s.context == crate::model::ContextRole::Draft => {
                self.draft
                    .get_or_insert_with(Default::default)
                    .sampled_tokens += 1;
                return;
            }
            Observation::Memory(m) if m.context == Some(crate::model::ContextRole::Draft) => {
                return;
            }
            _ => {}
        }
        if let Some(origin) = obs.origin() {
            // What each sequence held last while its context lived (a program's exit frees
            // the context: that empties nothing here).
            let freed = matches!(obs, Observation::Memory(m) if m.op == "free");
            for s in obs.context_used().iter().filter(|_| !freed) {
                self.context_used.insert((origin.pid, s.seq_id), s.used);
            }
            self.first_ns.get_or_insert(origin.start_ns);
            self.last_ns = self.last_ns.max(origin.end_ns);
        }
        match obs {
            Observation::Decode(d) => {
                self.decode_calls += 1;
                if d.result == DecodeResult::Ok {
                    self.speculative.draft_tokens += d.draft_tokens as u64;
                    self.speculative.drafts += d.drafts as u64;
                }
                *self.results.entry(d.result.label()).or_default() += 1;
                if d.result != DecodeResult::Ok {
                    *self.errors.entry(d.ret).or_default() += 1;
                }
                match (d.phase, d.n_tokens) {
                    (Some(phase), Some(n)) => {
                        let p = self.phases.entry(phase).or_default();
                        p.latency.record(d.origin.duration_ns());
                        p.busy_ns += d.origin.duration_ns() as u128;
                        p.tokens += n as u64;
                        *p.batch_sizes.entry(n).or_default() += 1;
                    }
                    _ => self.unknown_phase += 1,
                }
                if d.result == DecodeResult::Ok {
                    self.prompt_tokens += d.prompt_tokens as u64;
                    self.generation_tokens += d.generated_tokens as u64;
                }
            }
            Observation::Sample(s) => {
                self.sample.record(s.origin.duration_ns());
                self.speculative.accepted_tokens += u64::from(s.accepted_draft);
            }
            Observation::Synchronize(s) => {
                self.sync.record(s.origin.duration_ns());
                if let Some(c) = s.compute_ns {
                    self.compute.record(c);
                }
            }
            Observation::Memory(_) => self.memory_changes += 1,
            // Work for a slot (the 2024 server posts its metrics and next-response tasks
            // through the same function).
            Observation::TaskPost(p) => {
                let work = |t: &str| t == "unknown" || crate::catalog::is_request_type(t);
                self.task_posts += u64::from(!p.front && p.tasks.iter().any(|t| work(t.task_type)));
            }
            Observation::SlotRelease(_) => self.slot_releases += 1,
            Observation::SlotLaunch(l) => self.slot_launches += u64::from(l.ok),
            Observation::ContextShift(_) => self.context_shifts += 1,
            Observation::Request(r) => {
                self.requests += 1;
                *self.requests_by_type.entry(r.task_type).or_default() += 1;
                if let Some(t) = r.ttft_s() {
                    self.ttft.record((t * 1e9) as u64);
                }
                if let Some(t) = r.tpot_s() {
                    self.tpot.record((t * 1e9) as u64);
                }
                self.request_duration.record(r.duration_ns());
                self.request_time.add(r);
                if let Some(t) = r.queue_s() {
                    self.request_queue.record((t * 1e9) as u64);
                }
            }
            Observation::ModelLoad(m) => self.loads.push(LoadSummary {
                pid: m.origin.pid,
                path: m.path.clone(),
                ok: m.ok,
                duration_ms: m.origin.duration_ns() as f64 / 1e6,
            }),
            Observation::Traced(_)
            | Observation::Released { .. }
            | Observation::Ended(_)
            | Observation::ModelInfo(_)
            | Observation::CpuSample(_) => {}
            Observation::ContextCreate(c) => self.contexts.push(ContextSummary {
                pid: c.origin.pid,
                ok: c.ok,
                context: c.context,
                duration_ms: c.origin.duration_ns() as f64 / 1e6,
                params: c.params.clone(),
            }),
        }
    }

    pub fn summary(&self) -> Summary {
        let phases = self
            .phases
            .iter()
            .map(|(phase, p)| {
                let secs = p.busy_ns as f64 / 1e9;
                (
                    phase.label(),
                    PhaseSummary {
                        latency: p.latency.summary(),
                        tokens: p.tokens,
                        tokens_per_s: if secs > 0.0 {
                            p.tokens as f64 / secs
                        } else {
                            0.0
                        },
                        batch_sizes: p.batch_sizes.clone(),
                    },
                )
            })
            .collect();
        Summary {
            decode_calls: self.decode_calls,
            decode_results: self.results.clone(),
            decode_errors_by_code: self.errors.clone(),
            phases,
            decode_unknown_phase: self.unknown_phase,
            prompt_tokens: self.prompt_tokens,
            generation_tokens_decoded: self.generation_tokens,
            sampled_tokens: self.sample.count(),
            sample: self.sample.summary(),
            synchronize: self.sync.summary(),
            compute: self.compute.summary(),
            model_loads: self.loads.clone(),
            contexts: self.contexts.clone(),
            context_used: self
                .context_used
                .iter()
                .map(|(&(_, seq), &used)| (seq, used))
                .collect(),
            memory_changes: self.memory_changes,
            requests: self.requests,
            time_to_first_token: self.ttft.summary(),
            time_per_output_token: self.tpot.summary(),
            request_duration: self.request_duration.summary(),
            request_queue: self.request_queue.summary(),
            request_time: self.request_time.clone(),
            request_mode: self.request_mode,
            task_posts: self.task_posts,
            slot_releases: self.slot_releases,
            slot_launches: self.slot_launches,
            requests_by_type: self.requests_by_type.clone(),
            unserved: self.unserved,
            warmups: self.warmups,
            context_shifts: self.context_shifts,
            draft_context: self.draft.clone(),
            speculative: self.speculative,
            facts: self.facts.clone(),
            cpu_profile: self.cpu.as_ref().map(|(k, t)| cpu_summary(*k, t)),
            span_s: self
                .first_ns
                .map(|f| self.last_ns.saturating_sub(f) as f64 / 1e9)
                .unwrap_or(0.0),
        }
    }
}

fn cpu_summary((hz, top): (u32, usize), t: &crate::sinks::profile::Tally) -> CpuProfileSummary {
    use crate::model::CpuPhase;
    let share = |n: u64, of: u64| if of > 0 { n as f64 / of as f64 } else { 0.0 };
    let phases = CpuPhase::ALL
        .iter()
        .filter(|&&p| t.phase(p) > 0)
        .map(|&p| {
            let n = t.phase(p);
            let top = t
                .top(p, top)
                .into_iter()
                .map(|(f, c)| CpuFunction {
                    function: f.to_string(),
                    samples: c,
                    share: share(c, n),
                })
                .collect();
            (
                p.label(),
                CpuPhaseSummary {
                    samples: n,
                    share: share(n, t.total),
                    top,
                },
            )
        })
        .collect();
    CpuProfileSummary {
        hz,
        samples: t.total,
        in_decode_steps: t.in_steps(),
        with_stack: t.with_stack,
        phases,
    }
}

/// The summary sink's options.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "summary_options")]
#[command(next_help_heading = "Summary and live view")]
pub struct Options {
    /// Seconds between one-line summaries when stdout is not a terminal.
    #[arg(
        long,
        default_value_t = 10.0,
        value_name = "SECS",
        env = "LLAMAPROBE_INTERVAL"
    )]
    pub interval: f64,
    /// Write the final summary as JSON to FILE.
    #[arg(long, value_name = "FILE", env = "LLAMAPROBE_SUMMARY_JSON")]
    pub summary_json: Option<PathBuf>,
    /// No live view or periodic lines; only the final summary.
    #[arg(long, short)]
    pub quiet: bool,
}

/// The live view and the final summary.
pub struct SummarySink {
    stats: Stats,
    options: Options,
    terminal: Option<terminal::Terminal>,
    traced: Option<TracedProcess>,
    /// How the traced process ended, where its exit probe saw it.
    ended: Option<ProcessEnd>,
}

impl SummarySink {
    pub fn new(options: Options, profile: &crate::sinks::profile::Options) -> Self {
        let mut stats = Stats::default();
        if let Some(hz) = profile.profile_cpu {
            stats.profile_cpu(hz, profile.profile_top);
        }
        Self {
            stats,
            options,
            terminal: None,
            traced: None,
            ended: None,
        }
    }
}

impl Sink for SummarySink {
    fn observe(&mut self, obs: &Observation) {
        if let Observation::Traced(t) = obs {
            self.terminal = terminal::Terminal::new(
                format!("llamaprobe — pid {} ({})", t.pid, t.name),
                Duration::from_secs_f64(self.options.interval.max(0.1)),
                self.options.quiet,
            );
            self.traced = Some(t.clone());
        }
        if let Observation::Ended(e) = obs {
            if self.traced.as_ref().is_some_and(|t| t.pid == e.pid) {
                self.ended = Some(e.clone());
            }
        }
        self.stats.observe(obs);
    }

    fn tick(&mut self, now: &Snapshot) {
        self.stats.set_unserved(now.stats.unserved);
        self.stats.set_warmups(now.stats.warmups);
        if let Some(t) = self.terminal.as_mut() {
            t.tick(&self.stats.summary(), &now.stats);
        }
    }

    fn finish(&mut self, last: &Snapshot) -> anyhow::Result<()> {
        use anyhow::Context as _;
        use std::io::Write as _;
        self.stats.set_unserved(last.stats.unserved);
        self.stats.set_warmups(last.stats.warmups);
        let summary = self.stats.summary();
        let s = &last.stats;
        let ended_by = last.ended_by.unwrap_or("ended");
        // The process's own end says more than "the process exited".
        let ended_by = match &self.ended {
            Some(e) => format!("the process {e}"),
            None => ended_by.to_string(),
        };
        let (pid, generation) = match &self.traced {
            Some(t) => (t.pid.to_string(), t.generation.describe()),
            None => ("?".into(), "?"),
        };
        // Not println!: a closed stdout (`llamaprobe attach … | head`) must not panic.
        let _ = writeln!(
            std::io::stdout(),
            "\nllamaprobe summary — pid {pid} — {generation} — {ended_by}\n{}events lost: {} (ring buffer full {}, entry map full {}), undecodable {}",
            summary.render(),
            s.lost(),
            s.lost_ringbuf,
            s.lost_entry,
            s.undecodable
        );
        if let Some(path) = &self.options.summary_json {
            let mut v = serde_json::to_value(&summary)?;
            if let Some(t) = &self.traced {
                v["pid"] = t.pid.into();
                v["generation"] = serde_json::to_value(t.generation)?;
                v["layouts_by"] = t.layouts_by.into();
            }
            v["ended_by"] = ended_by.into();
            if let Some(e) = &self.ended {
                v["ended"] = serde_json::to_value(e)?;
            }
            v["events_lost"] = s.lost().into();
            v["undecodable"] = s.undecodable.into();
            std::fs::write(path, serde_json::to_vec_pretty(&v)?)
                .with_context(|| format!("writing --summary-json {}", path.display()))?;
        }
        Ok(())
    }
}

/// Power-of-two buckets of exact batch sizes, for display: (upper bound, count).
pub fn pow2_buckets(sizes: &BTreeMap<u32, u64>) -> Vec<(u32, u64)> {
    let mut out: BTreeMap<u32, u64> = BTreeMap::new();
    for (&size, &n) in sizes {
        *out.entry(size.max(1).next_power_of_two()).or_default() += n;
    }
    out.into_iter().collect()
}

impl Summary {
    /// The human-readable final summary.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "decode steps: {} ({}) over {:.1} s",
            self.decode_calls,
            self.decode_results
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.span_s
        );
        let _ = writeln!(
            s,
            "  {:<11} {:>7} {:>9} {:>9} {:>9} {:>9} {:>11}  batch sizes (tokens≤: steps)",
            "phase", "steps", "p50 ms", "p90 ms", "p99 ms", "tokens", "tokens/s"
        );
        for phase in Phase::ALL {
            let Some(p) = self.phases.get(phase.label()) else {
                continue;
            };
            let buckets = pow2_buckets(&p.batch_sizes)
                .iter()
                .map(|(b, n)| format!("{b}:{n}"))
                .collect::<Vec<_>>()
                .join(" ");
            let _ = writeln!(
                s,
                "  {:<11} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>9} {:>11.1}  {}",
                phase.label(),
                p.latency.count,
                p.latency.p50_ms,
                p.latency.p90_ms,
                p.latency.p99_ms,
                p.tokens,
                p.tokens_per_s,
                buckets
            );
        }
        if self.decode_unknown_phase > 0 {
            let _ = writeln!(s, "  unreadable batches: {}", self.decode_unknown_phase);
        }
        if !self.decode_errors_by_code.is_empty() {
            let _ = writeln!(
                s,
                "  errors by return code: {}",
                self.decode_errors_by_code
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let _ = writeln!(
            s,
            "tokens: prompt {}, generated {} sampled ({} fed back to decode)",
            self.prompt_tokens, self.sampled_tokens, self.generation_tokens_decoded
        );
        if self.requests > 0 {
            let _ = writeln!(
                s,
                "requests: {} — time to first token p50 {:.3} ms p99 {:.3} ms; per output token p50 {:.3} ms p99 {:.3} ms; duration p50 {:.1} ms p99 {:.1} ms",
                self.requests,
                self.time_to_first_token.p50_ms,
                self.time_to_first_token.p99_ms,
                self.time_per_output_token.p50_ms,
                self.time_per_output_token.p99_ms,
                self.request_duration.p50_ms,
                self.request_duration.p99_ms
            );
            if self.requests_by_type.len() > 1
                || self.requests_by_type.keys().any(|t| *t != "completion")
            {
                let _ = writeln!(
                    s,
                    "requests by type: {}",
                    self.requests_by_type
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let t = &self.request_time.total;
            let (d, smp, out) = t.shares();
            let _ = writeln!(
                s,
                "request time: {:.1}% in their decode steps, {:.1}% sampling, {:.1}% outside them (queue, server work, other requests' steps) of {:.3} s{}",
                d * 100.0,
                smp * 100.0,
                out * 100.0,
                t.wall_s,
                t.cpu_samples
                    .map(|n| format!("; {n} CPU samples in their steps"))
                    .unwrap_or_default()
            );
            if self.requests > 1 {
                let listed = &self.request_time.longest;
                let _ = writeln!(
                    s,
                    "  {}:",
                    if listed.len() as u64 == self.requests {
                        "by request, longest first".to_string()
                    } else {
                        format!("the longest {} of {} requests", listed.len(), self.requests)
                    }
                );
                for r in listed {
                    let t = &r.time;
                    let (d, smp, out) = t.shares();
                    let _ = writeln!(
                        s,
                        "    request {} (pid {}, {}) {:.3} s: {:.1}% decode steps, {:.1}% sampling, {:.1}% outside{}",
                        r.id,
                        r.pid,
                        r.task_type,
                        t.wall_s,
                        d * 100.0,
                        smp * 100.0,
                        out * 100.0,
                        t.cpu_samples
                            .map(|n| format!("; {n} CPU samples"))
                            .unwrap_or_default()
                    );
                }
            }
            if self.request_queue.count > 0 {
                let _ = writeln!(
                    s,
                    "queue wait: {} of {} requests — p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                    self.request_queue.count,
                    self.requests,
                    self.request_queue.p50_ms,
                    self.request_queue.p99_ms,
                    self.request_queue.max_ms
                );
            }
        }
        let u = &self.unserved;
        if u.total() > 0 {
            let _ = writeln!(
                s,
                "accepted but never served: {} (cancelled before a slot took it {}, rejected by its slot {}, unclaimed {})",
                u.total(),
                u.cancelled,
                u.rejected,
                u.unclaimed
            );
        }
        if self.context_shifts > 0 {
            let _ = writeln!(s, "context shifts: {}", self.context_shifts);
        }
        if self.warmups > 0 {
            let _ = writeln!(
                s,
                "warm-ups (prompts of at most 2 tokens dropped unsampled, not requests): {}",
                self.warmups
            );
        }
        let spec = &self.speculative;
        if spec.draft_tokens > 0 {
            let _ = writeln!(
                s,
                "speculative decoding: {} draft tokens verified, {} accepted ({:.1}%)",
                spec.draft_tokens,
                spec.accepted_tokens,
                100.0 * spec.accepted_tokens as f64 / spec.draft_tokens as f64
            );
        }
        if let Some(d) = &self.draft_context {
            let _ = writeln!(
                s,
                "draft context: {} decode steps, {} tokens, {} sampled (not in the figures above)",
                d.decode_calls, d.tokens, d.sampled_tokens
            );
        }
        if let Some(m) = self.request_mode {
            let _ = writeln!(s, "requests from: {}", m.describe());
        }
        for (name, l) in [
            ("sampling", &self.sample),
            ("synchronize", &self.synchronize),
            ("compute (decode→sync end)", &self.compute),
        ] {
            if l.count > 0 {
                let _ = writeln!(
                    s,
                    "{name}: {} calls, p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms",
                    l.count, l.p50_ms, l.p90_ms, l.p99_ms
                );
            }
        }
        if !self.context_used.is_empty() {
            let _ = writeln!(
                s,
                "context used (tokens per sequence): {}",
                self.context_used
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for l in &self.model_loads {
            let _ = writeln!(
                s,
                "model load: {} {} in {:.1} ms",
                l.path.as_deref().unwrap_or("(path unreadable)"),
                if l.ok { "ok" } else { "FAILED" },
                l.duration_ms
            );
        }
        for f in &self.facts {
            let _ = writeln!(s, "{f}");
        }
        if let Some(c) = &self.cpu_profile {
            let _ = writeln!(
                s,
                "CPU samples: {} at {} Hz per CPU, {} inside decode steps, {} with a stack beyond the leaf",
                c.samples, c.hz, c.in_decode_steps, c.with_stack
            );
            for p in crate::model::CpuPhase::ALL {
                let Some(ph) = c.phases.get(p.label()) else {
                    continue;
                };
                let _ = writeln!(
                    s,
                    "  {:<11} {:>7} samples {:>6.1}%   top functions (share of the phase):",
                    p.label(),
                    ph.samples,
                    ph.share * 100.0
                );
                for f in &ph.top {
                    let _ = writeln!(s, "      {:>6.1}%  {}", f.share * 100.0, f.function);
                }
            }
        }
        let opt = |v: Option<u32>| v.map_or("?".to_string(), |v| v.to_string());
        for c in &self.contexts {
            let _ = writeln!(
                s,
                "context: {} n_ctx {} n_batch {} n_ubatch {} n_seq_max {} threads {}/{} in {:.1} ms",
                if c.ok { "created" } else { "FAILED" },
                opt(c.params.n_ctx),
                opt(c.params.n_batch),
                opt(c.params.n_ubatch),
                opt(c.params.n_seq_max),
                opt(c.params.n_threads),
                opt(c.params.n_threads_batch),
                c.duration_ms
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut l = Latency::default();
        for ms in 1..=100u64 {
            l.record(ms * 1_000_000);
        }
        let s = l.summary();
        assert_eq!(s.count, 100);
        // hdrhistogram keeps 3 significant digits.
        assert!((s.p50_ms - 50.0).abs() < 0.1, "{s:?}");
        assert!((s.p90_ms - 90.0).abs() < 0.1, "{s:?}");
        assert!((s.p99_ms - 99.0).abs() < 0.1, "{s:?}");
        assert!((s.mean_ms - 50.5).abs() < 1e-9, "{s:?}");
        assert!((s.total_ms - 5050.0).abs() < 1e-9, "{s:?}");
    }

    fn request(id: u64, wall_ms: u64, decode_ms: u64, sampling_ms: u64) -> crate::model::Request {
        crate::model::Request {
            id,
            pid: 7,
            model: "m".into(),
            ctx: 1,
            seq_id: 0,
            task_id: None,
            task_type: "completion",
            queued_ns: None,
            start_ns: 1_000_000_000,
            prompt_end_ns: None,
            first_token_ns: None,
            end_ns: 1_000_000_000 + wall_ms * 1_000_000,
            prompt_tokens: 1,
            cached_tokens: 0,
            generated_tokens: 1,
            decode_steps: 1,
            context_shifts: 0,
            closed_by: "end",
            decode_ns: decode_ms * 1_000_000,
            sampling_ns: sampling_ms * 1_000_000,
            cpu_samples: Some(id),
            steps: Vec::new(),
        }
    }

    #[test]
    fn the_longest_requests_are_listed_with_their_own_split() {
        let mut t = RequestTime::default();
        // Walls 10, 20, ..., 150 ms in a shuffled order; each half in decode steps, a tenth
        // sampling.
        for id in [3u64, 15, 1, 8, 12, 5, 14, 2, 9, 11, 4, 13, 6, 10, 7] {
            t.add(&request(id, id * 10, id * 5, id));
        }
        let ids: Vec<u64> = t.longest.iter().map(|r| r.id).collect();
        assert_eq!(ids, (6..=15).rev().collect::<Vec<_>>());
        let r = &t.longest[0].time;
        assert!((r.wall_s - 0.150).abs() < 1e-12, "{r:?}");
        assert!((r.decode_s - 0.075).abs() < 1e-12, "{r:?}");
        assert!((r.sampling_s - 0.015).abs() < 1e-12, "{r:?}");
        assert!((r.outside_s - 0.060).abs() < 1e-12, "{r:?}");
        assert_eq!(r.cpu_samples, Some(15));
        let (d, smp, out) = r.shares();
        assert!((d - 0.5).abs() < 1e-12 && (smp - 0.1).abs() < 1e-12 && (out - 0.4).abs() < 1e-12);
        // The totals count every request, listed or not: 10 + 20 + ... + 150 ms.
        assert!((t.total.wall_s - 1.2).abs() < 1e-12, "{:?}", t.total);
        assert_eq!(t.total.cpu_samples, Some(120));
        // JSON keeps the totals at the top (as before) and lists the requests.
        let j = serde_json::to_value(&t).unwrap();
        assert!((j["wall_s"].as_f64().unwrap() - 1.2).abs() < 1e-12, "{j}");
        assert_eq!(j["longest"][0]["id"], 15);
        assert_eq!(j["longest"][0]["type"], "completion");
        assert_eq!(j["longest"][9]["cpu_samples"], 6);
    }

    #[test]
    fn batch_sizes_bucket_by_power_of_two() {
        let sizes: BTreeMap<u32, u64> = [(1, 5), (3, 1), (4, 2), (12, 1), (200, 1)].into();
        assert_eq!(
            pow2_buckets(&sizes),
            vec![(1, 5), (4, 3), (16, 1), (256, 1)]
        );
    }
}
