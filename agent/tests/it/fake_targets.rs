//! Integration: the real eBPF programs loaded into this kernel, attached to a fake llama.cpp
//! (tests/fake) that exports the real signatures of both API generations. The drivers make a
//! known sequence of calls (tests/fake/README.md), so every count, token number, phase and
//! result is asserted exactly, and durations against the fake's own sleeps.

use crate::common::*;

/// Runs `llamaprobe run` on a driver; returns (summary, events).
fn profile(driver: &str, test: &str) -> (Value, Vec<Value>) {
    profile_with(driver, &[], test)
}

/// The same with extra driver arguments after the model path.
fn profile_with(driver: &str, args: &[&str], test: &str) -> (Value, Vec<Value>) {
    profile_env(driver, args, &[], test)
}

/// The same with llamaprobe's environment extended by `env`.
fn profile_env(
    driver: &str,
    args: &[&str],
    env: &[(&str, &str)],
    test: &str,
) -> (Value, Vec<Value>) {
    let dir = scratch(test);
    let (sum, ev) = (dir.join("summary.json"), dir.join("events.jsonl"));
    let out = llamaprobe()
        .args(["run", "--quiet", "--metrics-addr", "off", "--summary-json"])
        .arg(&sum)
        .arg("--events-out")
        .arg(&ev)
        // The fake has no GPU backend: --sync auto would leave llama_synchronize alone.
        .args(["--sync", "on"])
        .arg("--")
        .arg(fakes().join(driver))
        .arg("/models/tiny-model.gguf")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("done decodes="),
        "driver did not finish: {}",
        text(&out)
    );
    (json(&sum), json_lines(&ev))
}

fn decode_sizes(events: &[Value]) -> Vec<u64> {
    of_kind(events, "decode")
        .iter()
        .map(|d| d["n_tokens"].as_u64().unwrap())
        .collect()
}

/// Checks shared by both drivers: loads, context, sampling, synchronize.
fn check_common(sum: &Value, events: &[Value]) {
    // One load through the deprecated wrapper (counted once) and one failing load.
    let loads = sum["model_loads"].as_array().unwrap();
    assert_eq!(loads.len(), 2, "{loads:?}");
    assert_eq!(loads[0]["path"], "/models/tiny-model.gguf");
    assert_eq!(loads[0]["ok"], true);
    assert_eq!(loads[1]["path"], "/nonexistent/missing.gguf");
    assert_eq!(loads[1]["ok"], false);
    // The fake sleeps 30 ms and 5 ms.
    let (ok_ms, fail_ms) = (
        loads[0]["duration_ms"].as_f64().unwrap(),
        loads[1]["duration_ms"].as_f64().unwrap(),
    );
    assert!((30.0..530.0).contains(&ok_ms), "{ok_ms}");
    assert!((5.0..505.0).contains(&fail_ms), "{fail_ms}");
    // After the load the model label is the file stem.
    let first_decode = of_kind(events, "decode")[0];
    assert_eq!(first_decode["origin"]["model"], "tiny-model");

    // One context through the deprecated wrapper.
    let ctxs = sum["contexts"].as_array().unwrap();
    assert_eq!(ctxs.len(), 1, "{ctxs:?}");
    let c = &ctxs[0];
    assert_eq!(c["ok"], true);
    assert_eq!(
        (
            c["n_ctx"].as_u64(),
            c["n_batch"].as_u64(),
            c["n_ubatch"].as_u64(),
            c["n_seq_max"].as_u64()
        ),
        (Some(4096), Some(512), Some(256), Some(4))
    );
    assert!(c["duration_ms"].as_f64().unwrap() >= 10.0);

    // Six samples returning 1000 + idx (idx -1 first, then 0), each sleeping 1 ms.
    let samples = of_kind(events, "sample");
    let tokens: Vec<i64> = samples
        .iter()
        .map(|s| s["token"].as_i64().unwrap())
        .collect();
    assert_eq!(tokens, [999, 1000, 1000, 1000, 1000, 1000]);
    assert!(samples.iter().all(|s| dur_ms(s) >= 1.0));
    assert_eq!(sum["sampled_tokens"], 6);

    // Six synchronize calls of 2 ms, each completing the decode step just before it.
    let syncs = of_kind(events, "synchronize");
    assert_eq!(syncs.len(), 6);
    assert!(syncs.iter().all(|s| dur_ms(s) >= 2.0));
    assert!(syncs
        .iter()
        .all(|s| s["compute_ns"].as_u64().unwrap() >= 2_000_000));
    assert_eq!(sum["compute"]["count"], 6);

    // Decode durations follow the fake's n_tokens × 200 µs.
    for d in of_kind(events, "decode") {
        let n = d["n_tokens"].as_f64().unwrap();
        assert!(dur_ms(d) >= n * 0.2, "{d}");
    }
    assert_eq!(sum["events_lost"], 0);
    assert_eq!(sum["undecodable"], 0);
}

fn results(sum: &Value) -> Vec<(String, u64)> {
    sum["decode_results"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect()
}

fn batch_sizes(sum: &Value, phase: &str) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = sum["phases"][phase]["batch_sizes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.parse().unwrap(), v.as_u64().unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn classic_api_every_call_measured_exactly() {
    if !root_or_skip("classic_api_every_call_measured_exactly") {
        return;
    }
    let _serial = serial();
    let (sum, events) = profile("classic/driver_classic", "classic");
    // This kernel has attach cookies: each link names the layout.
    assert_eq!(sum["layouts_by"], "attach_cookie");
    classic_exact(&sum, &events);
}

/// The same on the path of kernels without attach cookies (before 5.15): the layout is found
/// by the process's id.
#[test]
fn classic_api_without_attach_cookies() {
    if !root_or_skip("classic_api_without_attach_cookies") {
        return;
    }
    let _serial = serial();
    let (sum, events) = profile_env(
        "classic/driver_classic",
        &[],
        &[("LLAMAPROBE_NO_COOKIES", "1")],
        "classic-no-cookies",
    );
    assert_eq!(sum["layouts_by"], "pid");
    classic_exact(&sum, &events);
}

/// Every count, token, phase and result of the classic driver's calls.
fn classic_exact(sum: &Value, events: &[Value]) {
    assert_eq!(sum["generation"], "classic");
    assert_eq!(
        decode_sizes(events),
        [12, 1, 1, 1, 1, 1, 11, 7, 1, 1, 1, 1, 1, 200, 20]
    );
    assert_eq!(sum["decode_calls"], 15);
    assert_eq!(
        results(sum),
        [
            ("aborted".into(), 1),
            ("error".into(), 1),
            ("invalid_batch".into(), 1),
            ("no_kv_slot".into(), 1),
            ("ok".into(), 11)
        ]
    );
    let codes = sum["decode_errors_by_code"].as_object().unwrap();
    assert_eq!(codes.len(), 4);
    for c in ["1", "2", "-1", "-3"] {
        assert_eq!(codes[c], 1, "{codes:?}");
    }
    // Prompt: D1 (12), the get_one batch of 7, the four failing single tokens (ids 9001..9004,
    // never sampled), 200 tokens, twenty new one-token prompts.
    assert_eq!(
        batch_sizes(sum, "prompt"),
        [(1, 4), (7, 1), (12, 1), (20, 1), (200, 1)]
    );
    // Generation: the five sampled tokens fed back, and the single-token get_one batch (no
    // sequence ids: judged by size, as llama.cpp counts "eval").
    assert_eq!(batch_sizes(sum, "generation"), [(1, 6)]);
    assert_eq!(batch_sizes(sum, "mixed"), [(11, 1)]);
    // Prompt tokens of successful steps: 12 + (6 + 4) + 7 + 200 + 20.
    assert_eq!(sum["prompt_tokens"], 249);
    assert_eq!(sum["generation_tokens_decoded"], 7);

    let decodes = of_kind(events, "decode");
    let mixed = decodes[6];
    let parts: Vec<(i64, u64, &str)> = mixed["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["seq_id"].as_i64().unwrap(),
                p["n_tokens"].as_u64().unwrap(),
                p["kind"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        parts,
        [
            (0, 1, "generated"),
            (1, 6, "final_prompt_chunk"),
            (4, 4, "prompt_chunk")
        ]
    );
    // 200 tokens: beyond the 64-token scan window, still one final prompt chunk of seq 2.
    let big = decodes[13];
    assert_eq!(big["parts"].as_array().unwrap().len(), 1);
    assert_eq!(big["parts"][0]["seq_id"], 2);
    assert_eq!(big["parts"][0]["n_tokens"], 200);
    assert_eq!(big["parts"][0]["kind"], "final_prompt_chunk");
    assert!(dur_ms(big) >= 40.0);
    // 20 sequences: 16 runs recorded, the rest attributed to the last sequence.
    let many = decodes[14];
    let parts = many["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 17);
    assert_eq!(parts[16]["seq_id"], 19);
    assert_eq!(
        parts
            .iter()
            .map(|p| p["n_tokens"].as_u64().unwrap())
            .sum::<u64>(),
        20
    );
    assert_eq!(decodes[9]["result"], "no_kv_slot");
    assert_eq!(decodes[12]["ret"], -3);
    check_common(sum, events);
    assert_eq!(sum["contexts"][0]["n_threads"], 3);
    assert_eq!(sum["contexts"][0]["n_threads_batch"], 5);
}

#[test]
fn batch_ext_api_every_call_measured_exactly() {
    if !root_or_skip("batch_ext_api_every_call_measured_exactly") {
        return;
    }
    let _serial = serial();
    let (sum, events) = profile("ext/driver_ext", "ext");
    assert_eq!(sum["generation"], "batch_ext");
    // 15 steps through llama_process and one through the compatibility llama_decode: the
    // method both reach is probed, so each counts once.
    assert_eq!(
        decode_sizes(&events),
        [12, 1, 1, 1, 1, 1, 11, 7, 1, 1, 1, 1, 1, 200, 20, 3]
    );
    assert_eq!(sum["decode_calls"], 16);
    assert_eq!(
        results(&sum),
        [
            ("aborted".into(), 1),
            ("error".into(), 1),
            ("invalid_batch".into(), 1),
            ("no_kv_slot".into(), 1),
            ("ok".into(), 12)
        ]
    );
    // The ext batches always carry sequence ids: D9 (id 407) and the failing steps (ids
    // 9001..9004) are single tokens nobody sampled, so prompt; only the five sampled tokens
    // fed back are generation.
    assert_eq!(batch_sizes(&sum, "generation"), [(1, 5)]);
    assert_eq!(
        batch_sizes(&sum, "prompt"),
        [(1, 5), (3, 1), (7, 1), (12, 1), (20, 1), (200, 1)]
    );
    assert_eq!(batch_sizes(&sum, "mixed"), [(11, 1)]);
    assert_eq!(sum["prompt_tokens"], 12 + 10 + 7 + 1 + 200 + 20 + 3);
    assert_eq!(sum["generation_tokens_decoded"], 6);
    let last = *of_kind(&events, "decode").last().unwrap();
    assert_eq!(last["parts"][0]["seq_id"], 3);
    assert_eq!(last["parts"][0]["kind"], "final_prompt_chunk");
    check_common(&sum, &events);
    // The fake's context params follow the mid-2025 layout (n_threads at +16); the batch_ext
    // row reads +28 and +32, where the fake holds enum values: reported unknown, not wrong.
    assert!(sum["contexts"][0]["n_threads"].is_null());
}

#[test]
fn stripped_static_binary_is_explained_and_symbols_from_restores_it() {
    let dir = fakes().join("static");
    let stripped = dir.join("driver_classic.stripped");
    // No symbols at all: a clear error naming what is missing and what to do.
    let out = llamaprobe().arg("symbols").arg(&stripped).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(err.contains("no symbol table (stripped)"), "{err}");
    assert!(
        err.contains("llama_decode") && err.contains("llama_context::decode"),
        "{err}"
    );
    assert!(err.contains("--symbols-from FILE"), "{err}");
    // Symbols of another build are refused.
    let out = llamaprobe()
        .arg("symbols")
        .arg(&stripped)
        .arg("--symbols-from")
        .arg(fakes().join("classic/libllama.so"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("matches none of the files"));
    // The unstripped copy and the separate debug file both give every probe.
    for from in ["driver_classic", "driver_classic.debug"] {
        let out = llamaprobe()
            .arg("symbols")
            .arg(&stripped)
            .arg("--symbols-from")
            .arg(dir.join(from))
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", text(&out));
        assert!(shown.contains("would probe (10 functions)"), "{shown}");
        assert!(shown.contains("(SymbolsFrom)"), "{shown}");
    }
    if !root_or_skip("stripped_static_binary_is_explained_and_symbols_from_restores_it") {
        return;
    }
    let _serial = serial();
    // Profiling the stripped binary with the debug file measures exactly what the shared
    // build does.
    let scratch = scratch("static-stripped");
    let sum = scratch.join("summary.json");
    let out = llamaprobe()
        .args(["run", "-q", "--metrics-addr", "off", "--summary-json"])
        .arg(&sum)
        .arg("--symbols-from")
        .arg(dir.join("driver_classic.debug"))
        .arg("--")
        .arg(&stripped)
        .arg("/models/tiny-model.gguf")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let s = json(&sum);
    assert_eq!(s["decode_calls"], 15);
    assert_eq!(s["prompt_tokens"], 249);
    assert_eq!(s["sampled_tokens"], 6);
    assert_eq!(s["model_loads"].as_array().unwrap().len(), 2);
    assert_eq!(s["contexts"][0]["n_ctx"], 4096);
}

/// SIGTERM (systemd, Kubernetes) ends a session like Ctrl-C: probes detached, summary written,
/// exit 0, and the traced program carries on untouched.
#[test]
fn sigterm_ends_the_session_with_its_summary() {
    let test = "sigterm_ends_the_session_with_its_summary";
    if !root_or_skip(test) {
        return;
    }
    let _serial = serial();
    use std::io::{BufRead, Read, Write};
    let mut driver = std::process::Command::new(fakes().join("ext/driver_ext"))
        .arg("/models/tiny-model.gguf")
        .env("FAKE_WAIT_STDIN", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(driver.stdout.take().unwrap());
    let mut ready = String::new();
    out.read_line(&mut ready).unwrap();
    assert!(ready.starts_with("ready pid="), "{ready}");

    let sum = scratch(test).join("summary.json");
    let mut cmd = llamaprobe();
    cmd.args(["attach", "--pid", &driver.id().to_string(), "--quiet"])
        .args(["--metrics-addr", "off", "--summary-json"])
        .arg(&sum);
    let mut probe = crate::common::server::Probe::spawn(&mut cmd);
    probe.wait_for("probes attached");
    let (code, stdout) = probe.terminate();
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("llamaprobe summary"), "{stdout}");
    assert_eq!(json(&sum)["ended_by"], "terminated");

    // The program runs its whole sequence afterwards, every return value as expected.
    driver.stdin.take().unwrap().write_all(b"g").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(driver.wait().unwrap().success(), "{rest}");
    assert!(rest.contains("done decodes="), "{rest}");
}

/// A decode step that fails and is retried with the same batch (as a server does after "no KV
/// slot") is classified as the step that succeeds: a generation step stays generation, a mixed
/// one mixed, for every error code; prompt tokens count the successful steps only
/// (`driver_classic MODEL retry`, see its comment).
#[test]
fn retried_steps_keep_their_phase() {
    if !root_or_skip("retried_steps_keep_their_phase") {
        return;
    }
    let _serial = serial();
    let (sum, events) = profile_with(
        "classic/driver_classic",
        &["retry"],
        "retried_steps_keep_their_phase",
    );
    assert_eq!(sum["decode_calls"], 17);
    assert_eq!(
        results(&sum),
        [
            ("aborted".to_string(), 2),
            ("error".to_string(), 2),
            ("invalid_batch".to_string(), 2),
            ("no_kv_slot".to_string(), 2),
            ("ok".to_string(), 9)
        ]
    );
    let steps = |phase: &str| sum["phases"][phase]["count"].as_u64();
    assert_eq!(
        (steps("prompt"), steps("generation"), steps("mixed")),
        (Some(1), Some(8), Some(8))
    );
    assert_eq!(sum["prompt_tokens"], 28);
    assert_eq!(sum["generation_tokens_decoded"], 8);
    assert_eq!(sum["sampled_tokens"], 13);
    // Each failed call and its retry side by side: same phase, same parts.
    let decodes = of_kind(&events, "decode");
    for pair in decodes[1..].chunks(2) {
        let (failed, retry) = (pair[0], pair[1]);
        assert_ne!(failed["result"], "ok", "{failed}");
        assert_eq!(retry["result"], "ok", "{retry}");
        assert_eq!(failed["phase"], retry["phase"]);
        assert_eq!(failed["parts"], retry["parts"]);
        assert_eq!(retry["generated_tokens"], 1);
    }
    // Five requests: seq 0 generating throughout, and the four one-shot prompts of seqs 1-4.
    let requests = of_kind(&events, "request");
    let seq0: Vec<_> = requests.iter().filter(|r| r["seq_id"] == 0).collect();
    assert_eq!(seq0.len(), 1, "{requests:?}");
    assert_eq!(seq0[0]["generated_tokens"], 9);
    assert_eq!(seq0[0]["prompt_tokens"], 12);
}

/// A program with two contexts on two models (`driver_classic MODEL two-contexts`): the first
/// context created serves requests (`main`), the second is labelled `draft`; each one's
/// figures are exact and apart, and context use is per context.
#[test]
fn two_contexts_are_counted_apart() {
    if !root_or_skip("two_contexts_are_counted_apart") {
        return;
    }
    let _serial = serial();
    let (sum, events) = profile_with(
        "classic/driver_classic",
        &["two-contexts"],
        "two_contexts_are_counted_apart",
    );
    // The main context's figures.
    assert_eq!(sum["decode_calls"], 4);
    assert_eq!(sum["prompt_tokens"], 5);
    assert_eq!(sum["generation_tokens_decoded"], 3);
    assert_eq!(sum["sampled_tokens"], 4);
    assert_eq!(sum["requests"], 1);
    // The draft's, apart.
    assert_eq!(
        sum["draft_context"],
        serde_json::json!({"decode_calls": 3, "tokens": 5, "sampled_tokens": 3})
    );
    let ctxs = sum["contexts"].as_array().unwrap();
    let roles: Vec<&str> = ctxs
        .iter()
        .map(|c| c["context"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["main", "draft"]);
    let decodes = of_kind(&events, "decode");
    let by = |role: &str| decodes.iter().filter(|d| d["context"] == role).count();
    assert_eq!((by("main"), by("draft")), (4, 3));
    // The main context is on the first model: the label is its stem.
    assert!(decodes.iter().all(|d| d["origin"]["model"] == "tiny-model"));
    // Context use per context: sequence 0 holds 8 tokens in the main context (5 + 3 fed
    // back), 5 in the draft's (3 + 2); the summary reports the main context.
    let last_used = |role: &str| {
        decodes
            .iter()
            .rev()
            .find(|d| d["context"] == role)
            .map(|d| d["context_used"][0]["used"].as_u64().unwrap())
    };
    assert_eq!((last_used("main"), last_used("draft")), (Some(8), Some(5)));
    assert_eq!(sum["context_used"]["0"], 8);
}

/// The eval loops of programs on libllama (`driver_classic MODEL eval-loops`, see its
/// comment): a binding that truncates at its end before every step, one that trims to a common
/// prefix and continues, and two interleaved sequences with no memory calls at all give one
/// request per prompt, each with its exact prompt, cached and generated tokens; the warm-up
/// (a decode cleared without a sample) is counted apart, not as a request.
#[test]
fn eval_loops_give_one_request_per_prompt() {
    if !root_or_skip("eval_loops_give_one_request_per_prompt") {
        return;
    }
    let _serial = serial();
    let (sum, events) = profile_with(
        "classic/driver_classic",
        &["eval-loops"],
        "eval_loops_give_one_request_per_prompt",
    );
    assert_eq!(sum["decode_calls"], 16);
    assert_eq!(sum["sampled_tokens"], 15);
    assert_eq!(sum["requests"], 5, "{sum}");
    assert_eq!(sum["warmups"], 1, "{sum}");
    let memory = of_kind(&events, "memory");
    let ops: Vec<&str> = memory.iter().map(|m| m["op"].as_str().unwrap()).collect();
    assert_eq!(
        ops,
        ["clear", "seq_rm", "seq_rm", "seq_rm", "seq_rm", "seq_rm", "seq_rm"]
    );
    let mut requests: Vec<_> = of_kind(&events, "request")
        .iter()
        .map(|r| {
            (
                r["seq_id"].as_i64().unwrap(),
                r["prompt_tokens"].as_u64().unwrap(),
                r["cached_tokens"].as_u64().unwrap(),
                r["generated_tokens"].as_u64().unwrap(),
                r["decode_steps"].as_u64().unwrap(),
                r["closed_by"].as_str().unwrap().to_string(),
                r["start_ns"].as_u64().unwrap(),
            )
        })
        .collect();
    requests.sort_by_key(|r| r.6);
    let got: Vec<_> = requests
        .iter()
        .map(|r| (r.0, r.1, r.2, r.3, r.4, r.5.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (0, 6, 0, 5, 5, "memory_reused"),
            (0, 3, 4, 3, 3, "session_end"),
            (1, 4, 0, 3, 3, "next_request"),
            (2, 3, 0, 3, 3, "session_end"),
            (1, 3, 6, 1, 1, "session_end"),
        ]
    );
    // Time to first token for all five, time per output token for the four that generated
    // more than one: the fake samples in 1 ms, so a token is at least that apart.
    assert_eq!(sum["time_to_first_token"]["count"], 5, "{sum}");
    assert_eq!(sum["time_per_output_token"]["count"], 4, "{sum}");
    for r in of_kind(&events, "request") {
        let first = r["first_token_ns"].as_u64().unwrap();
        let n = r["generated_tokens"].as_u64().unwrap();
        let per_token = (r["end_ns"].as_u64().unwrap() - first) / (n - 1).max(1);
        assert!(n == 1 || per_token >= 1_000_000, "{r}");
    }
}
