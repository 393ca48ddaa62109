//! Integration: `--profile-cpu` on the real cpu-clock perf event and eBPF sampler, against
//! tests/fake/profile_target.c, which spends known shares of its CPU time in two functions
//! inside fake prompt steps (burn_alpha 70% / burn_beta 30%) and generation steps (20% / 80%,
//! the 20% on a worker thread), and in burn_outside between them. Built with and without frame
//! pointers: the leaf is right in both, the stack only with them.

use crate::common::{server::*, *};

/// Shares are of ~600 (prompt) and ~900 (generation) samples at 999 Hz: one standard deviation
/// of a 70/30 share is under 2 points; this is more than 5.
const TOLERANCE: f64 = 0.10;

/// A burn function's share of the phase's samples in burn_alpha and burn_beta: the known
/// split is theirs. The generation step's pipe hand-off to the worker (write, read) costs
/// kernel time that grows on a busy machine (seen: 17% of the phase's samples in __write and
/// read while other tests ran), which is real but not a known quantity.
fn share(phase: &Value, function: &str) -> f64 {
    let n = |f: &str| {
        phase["top"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["function"] == f)
            .map_or(0, |x| x["samples"].as_u64().unwrap())
    };
    n(function) as f64 / (n("burn_alpha") + n("burn_beta")).max(1) as f64
}

fn names(sample: &Value) -> Vec<String> {
    sample["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["function"].as_str().unwrap().to_string())
        .collect()
}

fn profiled(build: &str, test: &str) -> (Value, Vec<Value>, std::path::PathBuf) {
    let dir = scratch(test);
    let (sum, ev, pb, svg) = (
        dir.join("summary.json"),
        dir.join("events.jsonl"),
        dir.join("profile.pb.gz"),
        dir.join("flame.svg"),
    );
    let out = llamaprobe()
        .args([
            "run",
            "--quiet",
            "--metrics-addr",
            "off",
            "--profile-cpu=999",
        ])
        .arg("--summary-json")
        .arg(&sum)
        .arg("--events-out")
        .arg(&ev)
        .arg("--profile-out")
        .arg(&pb)
        .arg("--flamegraph")
        .arg(&svg)
        .arg("--")
        .arg(fakes().join("profile").join(build))
        .arg("60")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("done decodes=240"));
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(
        svg.contains("burn_alpha") && svg.contains("prompt"),
        "flame graph"
    );
    (json(&sum), json_lines(&ev), pb)
}

/// A --profile-out file, decoded with types generated from the official profile.proto.
fn read_pprof(path: &std::path::Path) -> pprof::protos::Profile {
    use pprof::protos::Message as _;
    let mut raw = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()),
        &mut raw,
    )
    .unwrap();
    pprof::protos::Profile::parse_from_bytes(&raw).unwrap()
}

fn check(build: &str, frame_pointers: bool) {
    let test = format!("cpu_profile_{build}");
    if !root_or_skip(&test) {
        return;
    }
    let _serial = serial();
    let (sum, events, pb) = profiled(build, &test);
    let cpu = &sum["cpu_profile"];
    let (prompt, generation) = (&cpu["phases"]["prompt"], &cpu["phases"]["generation"]);
    assert!(prompt["samples"].as_u64().unwrap() >= 300, "{cpu:#}");
    assert!(generation["samples"].as_u64().unwrap() >= 450, "{cpu:#}");
    for (phase, alpha, beta) in [(prompt, 0.7, 0.3), (generation, 0.2, 0.8)] {
        assert!(
            (share(phase, "burn_alpha") - alpha).abs() < TOLERANCE,
            "{phase:#}"
        );
        assert!(
            (share(phase, "burn_beta") - beta).abs() < TOLERANCE,
            "{phase:#}"
        );
    }
    assert_eq!(
        cpu["phases"]["other"]["top"][0]["function"], "burn_outside",
        "{cpu:#}"
    );

    // Every sample inside a step names a step that exists, at a time inside it, with its
    // phase; the phases' samples add up to the samples inside steps.
    let steps: std::collections::HashMap<(u64, u64), (u64, &str)> = of_kind(&events, "decode")
        .iter()
        .map(|d| {
            let o = &d["origin"];
            (
                (o["tid"].as_u64().unwrap(), o["start_ns"].as_u64().unwrap()),
                (o["end_ns"].as_u64().unwrap(), d["phase"].as_str().unwrap()),
            )
        })
        .collect();
    let samples = of_kind(&events, "cpu_sample");
    assert_eq!(samples.len() as u64, cpu["samples"].as_u64().unwrap());
    let mut in_steps = 0;
    for s in &samples {
        let Some(step) = s["step"].as_array() else {
            assert!(
                ["other", "sampling", "model_load"].contains(&s["phase"].as_str().unwrap()),
                "{s}"
            );
            continue;
        };
        in_steps += 1;
        let key = (step[0].as_u64().unwrap(), step[1].as_u64().unwrap());
        let (end, phase) = steps.get(&key).unwrap_or_else(|| panic!("no step {key:?}"));
        let at = s["at_ns"].as_u64().unwrap();
        // On the step's own thread a sample is inside the step exactly: the return is marked
        // before its time is read (a thread preempted in the return probe, for 10 ms on a busy
        // machine, was once sampled there and joined to the step it had left). Other threads'
        // samples read the mark across CPUs: 0.1 ms of slack.
        let slack = if s["tid"].as_u64() == Some(key.0) {
            0
        } else {
            100_000
        };
        assert!(
            at >= key.1 && at <= end + slack,
            "{s} outside its step (ends at {end})"
        );
        assert_eq!(s["phase"], *phase);
    }
    assert_eq!(in_steps, cpu["in_decode_steps"].as_u64().unwrap());
    let phase_sum: u64 = ["prompt", "generation", "mixed", "decode"]
        .iter()
        .map(|p| cpu["phases"][p]["samples"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(phase_sum, in_steps);
    // The worker thread's samples joined the generation steps of the main thread.
    let pid = sum["pid"].as_u64().unwrap();
    assert!(samples
        .iter()
        .any(|s| s["phase"] == "generation" && s["tid"].as_u64() != Some(pid)));

    // Stacks: burn_beta always runs on the main thread, called by llama_decode from main.
    let beta: Vec<_> = samples
        .iter()
        .filter(|s| names(s).first().map(String::as_str) == Some("burn_beta"))
        .collect();
    let walked = beta
        .iter()
        .filter(|s| {
            let n = names(s);
            n.iter().any(|f| f == "llama_decode") && n.iter().any(|f| f == "main")
        })
        .count() as f64
        / beta.len() as f64;
    if frame_pointers {
        assert!(walked > 0.9, "stacks walked: {walked}");
    } else {
        assert!(
            walked < 0.1,
            "stacks walked without frame pointers: {walked}"
        );
    }

    // The pprof file, read with the official profile.proto: its totals are the summary's.
    let p = read_pprof(&pb);
    let st = |i: i64| p.string_table[i as usize].as_str();
    assert_eq!(st(p.sample_type[0].ty), "samples");
    assert_eq!(p.period, 1_000_000_000 / 999);
    let total: i64 = p.sample.iter().map(|s| s.value[0]).sum();
    assert_eq!(total as u64, cpu["samples"].as_u64().unwrap());
    for phase in ["prompt", "generation", "other"] {
        let n: i64 = p
            .sample
            .iter()
            .filter(|s| {
                s.label
                    .iter()
                    .any(|l| st(l.key) == "phase" && st(l.str) == phase)
            })
            .map(|s| s.value[0])
            .sum();
        assert_eq!(
            n as u64,
            cpu["phases"][phase]["samples"].as_u64().unwrap(),
            "{phase}"
        );
    }
    assert!(p.function.iter().any(|f| st(f.name) == "burn_alpha"));

    // Requests: each round's prompt and its three generation steps are one (closed by the
    // memory clear). Each request's decode time is the sum of its steps' durations, its CPU
    // samples are those of its steps (each names it), and pprof's `request` label has them.
    let requests = of_kind(&events, "request");
    assert_eq!(requests.len(), 60, "one request per round");
    let mut step_spans: Vec<(u64, u64)> = steps.iter().map(|(k, v)| (k.1, v.0)).collect();
    step_spans.sort_unstable();
    let mut counted = 0;
    for r in &requests {
        let id = r["id"].as_u64().unwrap();
        let (start, end) = (
            r["start_ns"].as_u64().unwrap(),
            r["end_ns"].as_u64().unwrap(),
        );
        let mine: Vec<_> = step_spans
            .iter()
            .filter(|(s, e)| *s >= start && *e <= end)
            .collect();
        assert_eq!(mine.len(), 4, "{r}");
        let decode_ns: u64 = mine.iter().map(|(s, e)| e - s).sum();
        assert_eq!(r["decode_ns"].as_u64(), Some(decode_ns), "{r}");
        assert_eq!(r["sampling_ns"].as_u64(), Some(0), "no sampling calls: {r}");
        let n = samples
            .iter()
            .filter(|s| {
                s["requests"]
                    .as_array()
                    .is_some_and(|ids| ids.iter().any(|i| i.as_u64() == Some(id)))
            })
            .count() as u64;
        assert_eq!(r["cpu_samples"].as_u64(), Some(n), "{r}");
        let labelled: i64 = p
            .sample
            .iter()
            .filter(|s| {
                s.label
                    .iter()
                    .any(|l| st(l.key) == "request" && st(l.str) == id.to_string())
            })
            .map(|s| s.value[0])
            .sum();
        assert_eq!(labelled as u64, n, "pprof samples of request {id}");
        counted += n;
    }
    // Every sample inside a step is one request's (a step here carries one).
    assert_eq!(counted, in_steps);
    let t = &sum["request_time"];
    assert_eq!(t["cpu_samples"].as_u64(), Some(in_steps), "{t}");
    let parts = ["decode_s", "sampling_s", "outside_s"]
        .iter()
        .map(|k| t[k].as_f64().unwrap())
        .sum::<f64>();
    assert!((parts - t["wall_s"].as_f64().unwrap()).abs() < 1e-6, "{t}");

    // The summary lists the ten longest requests, longest first, each with its own split
    // (the events' figures); no request left out is longer than the last listed.
    let wall = |r: &Value| {
        let arrival = r["queued_ns"].as_u64().or(r["start_ns"].as_u64()).unwrap();
        r["end_ns"].as_u64().unwrap() - arrival
    };
    let listed = t["longest"].as_array().unwrap();
    assert_eq!(listed.len(), 10, "{t}");
    let mut walls: Vec<u64> = requests.iter().map(|r| wall(r)).collect();
    walls.sort_unstable_by(|a, b| b.cmp(a));
    for (l, w) in listed.iter().zip(&walls) {
        let r = requests
            .iter()
            .find(|r| r["id"] == l["id"])
            .unwrap_or_else(|| panic!("listed request not in the events: {l}"));
        let secs = |ns: u64| ns as f64 / 1e9;
        assert!(
            (l["wall_s"].as_f64().unwrap() - secs(*w)).abs() < 1e-9,
            "{l} vs {r}"
        );
        assert_eq!(wall(r), *w, "{l} vs {r}");
        let decode = secs(r["decode_ns"].as_u64().unwrap());
        assert!(
            (l["decode_s"].as_f64().unwrap() - decode).abs() < 1e-9,
            "{l} vs {r}"
        );
        assert_eq!(l["cpu_samples"], r["cpu_samples"], "{l} vs {r}");
    }
}

#[test]
fn cpu_profile_shares_and_stacks_with_frame_pointers() {
    check("profile_target_fp", true);
}

#[test]
fn cpu_profile_leaf_is_right_without_frame_pointers() {
    check("profile_target_nofp", false);
}

/// A real llama-server on a model whose decode steps take at least 10 ms
/// (LLAMAPROBE_MODEL_STEP10), attached with --profile-cpu: the prompt and generation phases'
/// top functions are ggml's, the phases' samples add up to those inside steps, Prometheus has
/// the per-phase and per-function series, and the pprof file's totals are the summary's.
#[test]
fn cpu_profile_of_a_real_llama_server() {
    const TEST: &str = "cpu_profile_of_a_real_llama_server";
    let Some((f, _tiny, _guard)) = first_server(TEST) else {
        return;
    };
    let Some(model) = fixture_or_skip(TEST, "LLAMAPROBE_MODEL_STEP10") else {
        return;
    };
    let server = Server::start(f.server.as_ref().unwrap(), &model, &f.env);
    let dir = scratch(TEST);
    let (sum, pb) = (dir.join("summary.json"), dir.join("profile.pb.gz"));
    let metrics_port = free_port();
    let addr = format!("127.0.0.1:{metrics_port}");
    let probe = attach(
        &f,
        &server,
        &[
            "--profile-cpu=199",
            "--metrics-addr",
            &addr,
            "--summary-json",
            path(&sum),
            "--profile-out",
            path(&pb),
        ],
    );
    let prompt = "alpha bravo charlie delta echo fox golf hotel india ".repeat(6);
    for n in [16, 12] {
        completion(server.port, &prompt, n);
    }
    let m = wait_metrics(metrics_port, |m| {
        sum_of(
            m,
            "llamacpp_cpu_function_samples_total",
            "phase=\"generation\"",
        ) > 0.0
            && sum_of(m, "llamacpp_cpu_function_samples_total", "phase=\"prompt\"") > 0.0
    });
    assert!(sum_of(&m, "llamacpp_cpu_samples_total", "phase=\"generation\"") > 0.0);
    let (rc, out) = probe.interrupt();
    assert_eq!(rc, 0, "{out}");
    let s = json(&sum);
    let cpu = &s["cpu_profile"];
    for phase in ["prompt", "generation"] {
        // The top function that is not OpenMP's (its workers spin at ggml's barriers, most
        // on a busy machine, where a preempted thread keeps the others waiting) is one of
        // ggml's compute functions, or ggml-cpu's llamafile sgemm (`tinyBLAS<…>::gemm…`),
        // which multiplies the matrices of prompt batches.
        let top = cpu["phases"][phase]["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["function"].as_str().unwrap())
            .find(|f| !f.contains("libgomp") && !f.to_lowercase().contains("gomp_"))
            .unwrap_or_else(|| panic!("{phase}: only OpenMP ({cpu:#})"));
        assert!(
            top.starts_with("ggml_") || top.contains("tinyBLAS"),
            "{phase}: top function {top} ({cpu:#})"
        );
    }
    let phase_sum: u64 = ["prompt", "generation", "mixed", "decode"]
        .iter()
        .map(|p| cpu["phases"][p]["samples"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(phase_sum, cpu["in_decode_steps"].as_u64().unwrap());
    let p = read_pprof(&pb);
    let total: i64 = p.sample.iter().map(|s| s.value[0]).sum();
    assert_eq!(total as u64, cpu["samples"].as_u64().unwrap());

    // The two requests' time: steps, sampling and the rest add up to their wall time; the
    // samples in their steps are the pprof samples labelled with a request.
    assert_eq!(s["requests"], 2);
    let t = &s["request_time"];
    let (wall, decode, sampling) = (
        t["wall_s"].as_f64().unwrap(),
        t["decode_s"].as_f64().unwrap(),
        t["sampling_s"].as_f64().unwrap(),
    );
    assert!(
        decode > 0.0 && sampling > 0.0 && decode + sampling <= wall,
        "{t}"
    );
    let st = |i: i64| p.string_table[i as usize].as_str();
    let labelled: i64 = p
        .sample
        .iter()
        .filter(|s| s.label.iter().any(|l| st(l.key) == "request"))
        .map(|s| s.value[0])
        .sum();
    assert!(labelled > 0);
    assert_eq!(Some(labelled as u64), t["cpu_samples"].as_u64(), "{t}");
    // Both requests are listed one by one, the longer first; their figures add up to the
    // totals.
    let listed = t["longest"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{t}");
    assert!(
        listed[0]["wall_s"].as_f64() >= listed[1]["wall_s"].as_f64(),
        "{t}"
    );
    for k in ["wall_s", "decode_s", "sampling_s", "outside_s"] {
        let both: f64 = listed.iter().map(|r| r[k].as_f64().unwrap()).sum();
        assert!((both - t[k].as_f64().unwrap()).abs() < 1e-6, "{k}: {t}");
    }
    let both: u64 = listed
        .iter()
        .map(|r| r["cpu_samples"].as_u64().unwrap())
        .sum();
    assert_eq!(Some(both), t["cpu_samples"].as_u64(), "{t}");
    assert!(out.contains("by request, longest first:"), "{out}");
}

/// `llamaprobe daemon --profile-cpu`: a process the daemon finds is profiled from the moment it
/// is traced (the sampler runs from the daemon's start): its samples carry its pid, take the
/// phases of its own steps with the fake's known shares, count on its requests, and reach
/// Prometheus under its pid, where they stay for the series grace after it ended.
#[test]
fn cpu_profile_in_the_daemon() {
    use std::io::{BufRead, BufReader, Write};
    const TEST: &str = "cpu_profile_in_the_daemon";
    if !root_or_skip(TEST) {
        return;
    }
    let _serial = serial();
    let dir = scratch(TEST);
    // A name of its own, so the daemon traces this process only.
    let exe = dir.join("prof_daemon_target");
    std::fs::copy(fakes().join("profile/profile_target_fp"), &exe).unwrap();
    let (events, pb) = (dir.join("events.jsonl"), dir.join("profile.pb.gz"));
    let mut d = crate::common::daemon::Daemon::start(&[
        "--include",
        "exe:prof_daemon_target",
        "--profile-cpu=999",
        "--series-grace",
        "60",
        "--events-out",
        path(&events),
        "--profile-out",
        path(&pb),
    ]);
    let mut child = std::process::Command::new(&exe)
        .arg("60")
        .env("FAKE_WAIT_STDIN", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let pid: u32 = line
        .trim()
        .strip_prefix("ready pid=")
        .unwrap_or_else(|| panic!("target said {line:?}"))
        .parse()
        .unwrap();
    d.wait_line("traced", pid);
    child.stdin.as_mut().unwrap().write_all(b"g").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("done decodes=240"), "{line}");
    assert!(child.wait().unwrap().success());
    d.wait_line("released", pid);
    // Its series stay for the grace period: the samples it took, per phase.
    let m = d.metrics();
    let prom = sum_of(&m, "llamacpp_cpu_samples_total", &format!("pid=\"{pid}\""));
    let (code, _) = d.probe.terminate();
    assert_eq!(code, 0);

    let events = json_lines(&events);
    let samples: Vec<&Value> = of_kind(&events, "cpu_sample")
        .into_iter()
        .filter(|s| s["pid"] == pid)
        .collect();
    let in_phase = |p: &str| samples.iter().filter(|s| s["phase"] == p).count();
    let leaf = |p: &str, f: &str| {
        samples
            .iter()
            .filter(|s| s["phase"] == p && names(s).first().map(String::as_str) == Some(f))
            .count()
    };
    // Of the burn functions' samples, as in `share`.
    let leaf_share = |p: &str, f: &str| {
        leaf(p, f) as f64 / (leaf(p, "burn_alpha") + leaf(p, "burn_beta")).max(1) as f64
    };
    assert!(
        in_phase("prompt") >= 300,
        "{} prompt samples",
        in_phase("prompt")
    );
    assert!(in_phase("generation") >= 450);
    for (p, alpha, beta) in [("prompt", 0.7, 0.3), ("generation", 0.2, 0.8)] {
        let (a, b) = (leaf_share(p, "burn_alpha"), leaf_share(p, "burn_beta"));
        assert!(
            (a - alpha).abs() < TOLERANCE && (b - beta).abs() < TOLERANCE,
            "{p}: alpha {a:.3}, beta {b:.3}"
        );
    }
    assert_eq!(prom as usize, samples.len(), "Prometheus = the events");
    // The pprof file written at the daemon's stop has them under its pid.
    let p = read_pprof(&pb);
    let st = |i: i64| p.string_table[i as usize].as_str();
    let of_pid: i64 = p
        .sample
        .iter()
        .filter(|s| {
            s.label
                .iter()
                .any(|l| st(l.key) == "pid" && l.num == i64::from(pid))
        })
        .map(|s| s.value[0])
        .sum();
    assert_eq!(of_pid as usize, samples.len(), "pprof = the events");
    // Its requests' CPU samples are its in-step samples.
    let in_steps = samples.iter().filter(|s| s["step"].is_array()).count() as u64;
    let counted: u64 = of_kind(&events, "request")
        .iter()
        .filter(|r| r["pid"] == pid)
        .map(|r| r["cpu_samples"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, in_steps);
}
