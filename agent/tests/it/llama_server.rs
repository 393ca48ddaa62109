//! End to end on real, unmodified llama.cpp builds (every server-bearing fixture `cargo xtask
//! fixtures` prepared: versions, static, stripped) serving a tiny generated model: llamaprobe's
//! counts must equal llama-server's own counters.

use crate::common::{fixtures::Fixture, server::*, *};
use llamaprobe::model::clock::monotonic_ns;

/// Distinct prompts (so no request is served from another's cache) of different lengths.
/// How a finished request of fixture `f` ends: at its slot's release; in the 2024 server, whose
/// release is inlined, by silence, at its slot's next request, or at the session's end.
fn ended_as_expected(f: &Fixture, closed_by: &Value) -> bool {
    let how = closed_by.as_str().unwrap_or("");
    if f.generation == "legacy" {
        matches!(how, "idle" | "next_request" | "session_end")
    } else {
        how == "slot_released"
    }
}

fn prompt(i: usize) -> String {
    let words = [
        "alpha", "bravo", "charlie", "delta", "echo", "fox", "golf", "hotel", "india",
    ];
    (0..3 + 2 * i)
        .map(|k| words[(i * 7 + k * 3) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
        + &format!(" request {i}")
}

#[test]
fn attach_counts_equal_llama_servers_own_counters() {
    on_every_server(
        "attach_counts_equal_llama_servers_own_counters",
        attach_agrees,
    );
}

fn attach_agrees(f: &Fixture, model: &std::path::Path) {
    let server = Server::start(f.server.as_ref().unwrap(), model, &f.env);
    let metrics_port = free_port();
    let dir = scratch(&format!("attach-{}", f.name));
    let summary = dir.join("summary.json");
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut probe = attach(
        f,
        &server,
        &[
            "--metrics-addr",
            &metrics_addr,
            "--summary-json",
            path(&summary),
        ],
    );
    // Warm-up decodes happened at start, before the probes: the baseline is taken now.
    let before = server.settled_metrics();

    // Three sequential completions, then four concurrent ones (4 slots) of different lengths.
    let mut responses = Vec::new();
    for (i, n) in [(0, 8), (1, 12), (2, 5)] {
        responses.push(completion(server.port, &prompt(i), n));
    }
    let port = server.port;
    let handles: Vec<_> = [(3, 6u32), (4, 16), (5, 9), (6, 20)]
        .into_iter()
        .map(|(i, n)| std::thread::spawn(move || completion(port, &prompt(i), n)))
        .collect();
    responses.extend(handles.into_iter().map(|h| h.join().unwrap()));
    // Repeats: served from the slots' or the server's prompt cache, only the last prompt
    // token is evaluated again (a one-token prompt step that must not look generated).
    for (i, n) in [(0, 4), (4, 3), (1, 5)] {
        responses.push(completion(server.port, &prompt(i), n));
    }
    let after = server.settled_metrics();
    let delta = |k: &str| after[&format!("llamacpp:{k}")] - before[&format!("llamacpp:{k}")];
    // llama-server counts its decode steps from 2025 on (`n_decode_total`); the 2024 one
    // (legacy) counts tokens only, so its steps have no ground truth here.
    let steps = after
        .contains_key("llamacpp:n_decode_total")
        .then(|| delta("n_decode_total"));
    let legacy = f.generation == "legacy";
    assert_eq!(steps.is_none(), legacy, "n_decode_total on {}", f.name);

    // Each response agrees with the server's own counters (sanity of the ground truth).
    let predicted: f64 = responses
        .iter()
        .map(|r| r["tokens_predicted"].as_f64().unwrap())
        .sum();
    assert_eq!(predicted, delta("tokens_predicted_total"));
    if let Some(steps) = steps {
        assert!(steps > 7.0);
    }

    let pid = format!("pid=\"{}\"", server.child.id());
    // llamaprobe drains its ring buffer on a short timer: wait until it has caught up.
    let ours = wait_metrics(metrics_port, |m| {
        sum_of(m, "llamacpp_decode_calls_total", "") >= steps.unwrap_or(0.0)
            && sum_of(m, "llamacpp_sample_duration_seconds_count", "")
                >= delta("tokens_predicted_total")
    });
    let our_steps = sum_of(&ours, "llamacpp_decode_calls_total", &pid);
    if let Some(steps) = steps {
        assert_eq!(our_steps, steps, "decode steps");
    }
    assert_eq!(
        sum_of(&ours, "llamacpp_decode_calls_total", "result=\"ok\""),
        our_steps
    );
    assert_eq!(
        sum_of(&ours, "llamacpp_tokens_total", "kind=\"prompt\""),
        delta("prompt_tokens_total"),
        "prompt tokens"
    );
    assert_eq!(
        sum_of(&ours, "llamacpp_tokens_total", "kind=\"generated\""),
        delta("tokens_predicted_total"),
        "generated tokens"
    );
    assert_eq!(
        sum_of(&ours, "llamacpp_sample_duration_seconds_count", &pid),
        delta("tokens_predicted_total")
    );
    // Concurrent slots share batches: some steps must be mixed or multi-sequence generation.
    let steps_by_phase = |p: &str| {
        sum_of(
            &ours,
            "llamacpp_decode_duration_seconds_count",
            &format!("phase=\"{p}\""),
        )
    };
    assert_eq!(
        steps_by_phase("prompt") + steps_by_phase("generation") + steps_by_phase("mixed"),
        our_steps
    );
    assert!(
        sum_of(&ours, "llamacpp_batch_tokens_bucket", "le=\"1\"")
            < sum_of(&ours, "llamacpp_batch_tokens_count", "")
    );
    assert_eq!(sum_of(&ours, "llamaprobe_events_lost_total", ""), 0.0);
    let attached = sum_of(&ours, "llamaprobe_probes_attached", "");
    assert!(attached >= 10.0);

    // The outputs are written before the probes are detached (which takes the kernel about
    // 0.1 s a probe): when llamaprobe says it is detaching, the summary file is complete.
    probe.signal(libc::SIGINT);
    let line = probe.wait_for("llamaprobe: detaching");
    // As many as are attached: the gauge's at most, less the sampler-chain probes detached
    // once a sampling function was seen (the gauge is updated once a second).
    let detaching: f64 = line
        .strip_prefix("llamaprobe: detaching ")
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        (10.0..=attached).contains(&detaching),
        "{line}, {attached} attached"
    );
    let s = json(&summary);
    assert_eq!(s["decode_calls"].as_f64().unwrap(), our_steps);
    let (code, stdout) = probe.finish();
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("llamaprobe summary"), "{stdout}");
    assert_eq!(
        s["prompt_tokens"].as_f64().unwrap(),
        delta("prompt_tokens_total")
    );
    assert_eq!(
        s["sampled_tokens"].as_f64().unwrap(),
        delta("tokens_predicted_total")
    );
    // Every request's last sampled token is not decoded again.
    assert_eq!(
        s["generation_tokens_decoded"].as_f64().unwrap(),
        delta("tokens_predicted_total") - responses.len() as f64
    );
    assert_eq!(s["ended_by"], "interrupted");
    // Every completion went through llama-server's task queue, once.
    assert_eq!(s["request_mode"], "server_tasks");
    assert_eq!(s["task_posts"].as_u64().unwrap(), responses.len() as u64);
    // The 2024 server inlines its slot release: none is seen there.
    let releases = if legacy { 0 } else { responses.len() as u64 };
    assert_eq!(s["slot_releases"].as_u64().unwrap(), releases);
    // Attached after the load: the model was recovered from the process, and said so (the
    // file it maps: the model path with its symlinks resolved).
    let file = std::fs::canonicalize(model).unwrap();
    let facts: Vec<&str> = s["facts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(
        facts
            .iter()
            .any(|f| f.starts_with("model: recovered from the process")
                && f.contains(&*file.to_string_lossy())),
        "{facts:?}"
    );
    let stem = model.file_stem().unwrap().to_string_lossy().into_owned();
    assert!(
        sum_of(
            &ours,
            "llamacpp_decode_calls_total",
            &format!("model=\"{stem}\"")
        ) > 0.0,
        "series carry the recovered model label"
    );
    assert_eq!(
        sum_of(&ours, "llamacpp_model_info", "architecture=\"llama\""),
        1.0
    );
    // The process keeps serving after llamaprobe detached.
    let r = completion(server.port, "after detach", 3);
    assert_eq!(r["tokens_predicted"], 3);
}

#[test]
fn run_sees_model_load_and_context_from_the_start() {
    on_every_server(
        "run_sees_model_load_and_context_from_the_start",
        run_sees_load,
    );
}

fn run_sees_load(f: &Fixture, model: &std::path::Path) {
    let server_bin = f.server.clone().unwrap();
    let port = free_port();
    let dir = scratch(&format!("run-{}", f.name));
    let summary = dir.join("summary.json");
    let metrics_port = free_port();
    let mut cmd = llamaprobe();
    cmd.args(["run", "--quiet"])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .arg("--summary-json")
        .arg(&summary)
        .args(f.symbols_args())
        .arg("--")
        .arg(&server_bin)
        .args(server_args(&server_bin, model, port));
    f.apply(&mut cmd);
    let mut probe = Probe::spawn(&mut cmd);
    probe.wait_for("probes attached");
    let sync_line = probe.wait_for("llama_synchronize");
    // Wait for the server (a child of llamaprobe) to answer, then make one request.
    wait_healthy(port, &mut probe.child);
    let r = completion(port, "hello from the run test", 6);
    assert_eq!(r["tokens_predicted"], 6);
    let prompt_n = r["tokens_evaluated"].as_u64().unwrap();
    // The request's slot holds prompt + 5 tokens (the sixth was sampled, never decoded).
    let held = (prompt_n + 5) as f64;
    let ours = wait_metrics(metrics_port, |m| {
        m.iter()
            .any(|(k, v)| k.starts_with("llamacpp_context_used_tokens{") && *v == held)
    });
    let model_stem = model.file_stem().unwrap().to_string_lossy().into_owned();
    let label = format!("model=\"{model_stem}\"");
    // The context's parameters as llama-server set them (-c 2048 -np 4 -t 2, n_ubatch 512).
    assert_eq!(
        sum_of(&ours, "llamacpp_context_size_tokens", &label),
        2048.0
    );
    // The 2024 server asks for one sequence more than its slots (sequence 0 held the system
    // prompt).
    let seq_max = if f.generation == "legacy" { 5.0 } else { 4.0 };
    assert_eq!(sum_of(&ours, "llamacpp_sequences_max", &label), seq_max);
    assert_eq!(sum_of(&ours, "llamacpp_ubatch_size_tokens", &label), 512.0);
    assert_eq!(sum_of(&ours, "llamacpp_threads", &label), 2.0);
    // That is the slot's use of its 512-token share (2048 / 4 sequences); the others hold none.
    let used: Vec<f64> = ours
        .iter()
        .filter(|(k, v)| k.starts_with("llamacpp_context_used_tokens{") && **v > 0.0)
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(used, [held]);
    let ratio: Vec<f64> = ours
        .iter()
        .filter(|(k, v)| k.starts_with("llamacpp_context_utilization_ratio{") && **v > 0.0)
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(ratio, [held / 512.0]);
    // Stop the server itself: llamaprobe reports its end and exits with its code.
    let (code, stdout) = probe.stop_program();
    // llamaprobe exits with the program's code: current llama-servers exit 0 on SIGTERM,
    // older ones die of it (128 + 15); the summary says which, as the exit probe saw it.
    let said = match code {
        0 => "the process exited with status 0",
        143 => "the process was killed by SIGTERM (signal 15)",
        _ => panic!("exit code {code}: {stdout}"),
    };
    assert!(stdout.contains(said), "{stdout}");
    let s = json(&summary);
    let loads = s["model_loads"].as_array().unwrap();
    assert_eq!(
        loads.len(),
        1,
        "one load (--fit off where it exists): {loads:?}"
    );
    assert_eq!(loads[0]["path"], model.to_string_lossy().as_ref());
    assert_eq!(loads[0]["ok"], true);
    assert!(loads[0]["duration_ms"].as_f64().unwrap() > 0.0);
    let ctxs = s["contexts"].as_array().unwrap();
    assert_eq!(ctxs.len(), 1, "{ctxs:?}");
    let c = &ctxs[0];
    assert_eq!(c["ok"], true);
    assert_eq!(c["n_ctx"], 2048);
    assert_eq!(c["n_seq_max"], seq_max as u64);
    assert_eq!(c["n_ubatch"], 512);
    assert_eq!(c["n_threads"], 2);
    assert_eq!(c["n_threads_batch"], 2);
    // From the start, the warm-up decode and the request are all seen; 6 tokens sampled.
    assert_eq!(s["sampled_tokens"], 6);
    // Start-up is not traffic: one completion is one request, the warm-up counted apart.
    assert_eq!(s["requests"], 1, "{s}");
    assert!(s["warmups"].as_u64().unwrap() >= 1, "{s}");
    // A CPU build has no GPU backend: llama_synchronize is left alone (--sync auto).
    assert_eq!(s["synchronize"]["count"], 0);
    assert!(
        sync_line.contains("not probed: no GPU backend"),
        "{sync_line}"
    );
    // Context use: the warm-up was cleared; the request's slot holds its prompt and the five
    // generated tokens fed back (the sixth was sampled, never decoded); the others hold none.
    let used = s["context_used"].as_object().unwrap();
    let held: Vec<u64> = used
        .values()
        .map(|v| v.as_u64().unwrap())
        .filter(|&v| v > 0)
        .collect();
    assert_eq!(held, [prompt_n + 5], "{used:?}");
    assert!(s["memory_changes"].as_u64().unwrap() >= 1);
    assert!(s["decode_calls"].as_u64().unwrap() >= 6);
}

/// 4 slots, 16 concurrent streaming requests of different lengths: every request is
/// reconstructed from the batches alone, none merged or split, with the server's own token
/// counts and a time to first token consistent with its timings.
#[test]
fn concurrent_streaming_requests_are_each_reconstructed() {
    on_every_server(
        "concurrent_streaming_requests_are_each_reconstructed",
        requests_reconstructed,
    );
}

fn requests_reconstructed(f: &Fixture, model: &std::path::Path) {
    let server = Server::start(f.server.as_ref().unwrap(), model, &f.env);
    let dir = scratch(&format!("requests-{}", f.name));
    let events = dir.join("events.jsonl");
    let trace = dir.join("trace.json");
    let probe = attach(
        f,
        &server,
        &[
            "--metrics-addr",
            "off",
            "--events-out",
            path(&events),
            "--trace-out",
            path(&trace),
        ],
    );
    let port = server.port;
    // Distinct lengths (3 + i tokens generated) identify each request.
    let handles: Vec<_> = (0..16u32)
        .map(|i| {
            std::thread::spawn(move || {
                let words =
                    "one two three four five six seven eight nine ten".repeat(1 + i as usize % 3);
                (
                    i,
                    completion_stream(port, &format!("request {i}: {words}"), 3 + i),
                )
            })
        })
        .collect();
    let responses: Vec<(u32, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // The server releases each slot just after its response.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (code, _) = probe.interrupt();
    assert_eq!(code, 0);
    let requests: Vec<Value> = json_lines(&events)
        .into_iter()
        .filter(|e| e["kind"] == "request")
        .collect();
    assert_eq!(
        requests.len(),
        16,
        "{} requests: {requests:?}",
        requests.len()
    );
    for (i, resp) in &responses {
        let predicted = resp["tokens_predicted"].as_u64().unwrap();
        assert_eq!(predicted, 3 + *i as u64, "the model stopped early? {resp}");
        let matching: Vec<&Value> = requests
            .iter()
            .filter(|r| r["generated_tokens"].as_u64() == Some(predicted))
            .collect();
        assert_eq!(matching.len(), 1, "request {i}: {matching:?}");
        let r = matching[0];
        assert!(ended_as_expected(f, &r["closed_by"]), "request {i}: {r}");
        let input = r["prompt_tokens"].as_u64().unwrap() + r["cached_tokens"].as_u64().unwrap();
        assert_eq!(
            input,
            resp["tokens_evaluated"].as_u64().unwrap(),
            "request {i}: {r} vs {resp}"
        );
        let timings = &resp["timings"];
        assert_eq!(
            r["prompt_tokens"], timings["prompt_n"],
            "request {i}: {r} vs {timings}"
        );
        if let Some(cache_n) = timings.get("cache_n") {
            assert_eq!(&r["cached_tokens"], cache_n, "request {i}");
        }
        // Every request was accepted by the server's queue before its prompt started.
        assert!(
            r["queued_ns"].as_u64().unwrap() <= r["start_ns"].as_u64().unwrap(),
            "request {i}: {r}"
        );
        // Time to first token less the queue wait runs from the request's first prompt step to
        // its first sample; the server's prompt_ms runs from when the slot started on the prompt (at or before
        // that step, earlier when other slots' work came first) to the same first token.
        let ttft_ms =
            (r["first_token_ns"].as_u64().unwrap() - r["start_ns"].as_u64().unwrap()) as f64 / 1e6;
        let prompt_ms = timings["prompt_ms"].as_f64().unwrap();
        assert!(
            ttft_ms > 0.0 && ttft_ms <= prompt_ms + 5.0,
            "request {i}: ttft {ttft_ms} ms, server prompt {prompt_ms} ms"
        );
    }

    // The trace file parses and holds the same story: 16 requests on sequence tracks, one
    // decode slice per decode step and one sample slice per sample on thread tracks.
    let t: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let count = |cat: &str| {
        t.iter()
            .filter(|e| e["ph"] == "X" && e["cat"] == cat)
            .count()
    };
    let all = json_lines(&events);
    assert_eq!(count("decode"), of_kind(&all, "decode").len());
    assert_eq!(count("sample"), of_kind(&all, "sample").len());
    let requests_in_trace = t
        .iter()
        .filter(|e| e["cat"] == "request" && e["name"].as_str().unwrap().starts_with("request "))
        .count();
    assert_eq!(requests_in_trace, 16);
    let tracks: Vec<&str> = t
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == "thread_name")
        .map(|e| e["args"]["name"].as_str().unwrap())
        .collect();
    // The 2024 server's slot N decodes sequence N + 1.
    let first = u32::from(f.generation == "legacy");
    for s in first..first + 4 {
        assert!(
            tracks.contains(&format!("sequence {s}").as_str()),
            "{tracks:?}"
        );
    }
    assert!(tracks.iter().any(|n| n.starts_with("thread ")));
}

/// Queue wait from llama-server's own task queue, joined by task id: six completions at once
/// on four slots, in rounds, with both cores kept busy by two other processes (a node running
/// llama.cpp is busy; the probes' threads are scheduled late). Every round: each request's
/// acceptance, start and end lie within the client's own send and receive times of that
/// request, every request has its own task's queue wait, and at least two waited for a slot as
/// long as the shortest request the server ran. 3 rounds per fixture; `cargo xtask test
/// --stress` runs 20.
#[test]
fn queue_wait_from_llama_servers_task_queue() {
    on_every_server("queue_wait_from_llama_servers_task_queue", |f, model| {
        let server = Server::start(f.server.as_ref().unwrap(), model, &f.env);
        let _load = CpuLoad::start(2);
        for round in 0..rounds(3) {
            eprintln!("== {} round {round}", f.name);
            queue_wait(f, &server, round);
        }
    });
}

/// The summary and events files of a recorded session, in a fresh scratch directory.
fn recording(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = scratch(name);
    (dir.join("summary.json"), dir.join("events.jsonl"))
}

/// `attach` with no metrics endpoint, writing the summary and every observation.
fn attach_recording(
    f: &Fixture,
    server: &Server,
    summary: &std::path::Path,
    events: &std::path::Path,
) -> Probe {
    attach(
        f,
        server,
        &[
            "--metrics-addr",
            "off",
            "--summary-json",
            path(summary),
            "--events-out",
            path(events),
        ],
    )
}

/// The completions of one round: (client sent, response, client received), monotonic ns.
type Timed = (u64, Value, u64);

fn queue_wait(f: &Fixture, server: &Server, round: usize) {
    let (summary, events) = recording(&format!("queue-{}-{round}", f.name));
    let mut probe = attach_recording(f, server, &summary, &events);
    let line = probe.wait_for("llamaprobe: requests:");
    assert!(line.contains("server tasks by id"), "{line}");

    let port = server.port;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(6));
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                let sent = monotonic_ns();
                let r = completion(port, &format!("{} round {round}", prompt(10 + i)), 48);
                (sent, r, monotonic_ns())
            })
        })
        .collect();
    let responses: Vec<Timed> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let shortest_ms = responses
        .iter()
        .map(|(_, r, _)| {
            r["timings"]["prompt_ms"].as_f64().unwrap()
                + r["timings"]["predicted_ms"].as_f64().unwrap()
        })
        .fold(f64::INFINITY, f64::min);

    // Each request closes when the server releases its slot (checked below), just after it
    // sent the response.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (code, stdout) = probe.interrupt();
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("queue wait: 6 of 6 requests"), "{stdout}");
    let s = json(&summary);
    assert_eq!(s["request_mode"], "server_tasks");
    assert_eq!(s["task_posts"], 6);
    assert_eq!(s["slot_launches"], 6);
    let releases = if f.generation == "legacy" { 0 } else { 6 };
    assert_eq!(s["slot_releases"], releases);
    assert_eq!(s["request_queue"]["count"], 6);
    assert_eq!(s["requests_by_type"]["completion"], 6, "{s}");
    assert_eq!(
        s["unserved"],
        serde_json::json!({"cancelled": 0, "rejected": 0, "unclaimed": 0})
    );

    let all = json_lines(&events);
    let requests = of_kind(&all, "request");
    assert_eq!(requests.len(), 6);
    // Each request is one posted task, each its own.
    // Work for slots (the 2024 server posts its next-response and metrics tasks alike).
    let posted: Vec<i64> = of_kind(&all, "task_post")
        .iter()
        .flat_map(|p| p["tasks"].as_array().unwrap().iter())
        .filter(|t| t["type"] == "completion")
        .map(|t| t["id"].as_i64().unwrap())
        .collect();
    let mut tasks: Vec<i64> = requests
        .iter()
        .map(|r| r["task_id"].as_i64().expect("every request has its task"))
        .collect();
    tasks.sort();
    let mut sorted = posted.clone();
    sorted.sort();
    assert_eq!(tasks, sorted, "requests' tasks are the posted ones");
    let mut waits_ms = Vec::new();
    // Prompts of different sizes tie each reconstructed request to its client call.
    for (sent, resp, received) in &responses {
        let n = resp["tokens_evaluated"].as_u64().unwrap();
        let ours: Vec<_> = requests
            .iter()
            .filter(|r| {
                r["cached_tokens"].as_u64().unwrap() + r["prompt_tokens"].as_u64().unwrap() == n
            })
            .collect();
        assert_eq!(ours.len(), 1, "one request of {n} prompt tokens: {ours:?}");
        let r = ours[0];
        let (q, start, end) = (
            r["queued_ns"].as_u64().unwrap(),
            r["start_ns"].as_u64().unwrap(),
            r["end_ns"].as_u64().unwrap(),
        );
        assert!(
            *sent <= q && q <= start && start <= end && end <= *received,
            "client sent {sent}, accepted {q}, started {start}, ended {end}, client received {received}"
        );
        assert_eq!(r["generated_tokens"], resp["tokens_predicted"]);
        assert_eq!(r["type"], "completion");
        // Ended by the server releasing its slot, not by a guess (2024: no release to see).
        assert!(ended_as_expected(f, &r["closed_by"]), "{r}");
        if let Some(slot) = resp.get("id_slot").and_then(Value::as_i64) {
            // The 2024 server's slot N decodes sequence N + 1.
            let seq = slot + i64::from(f.generation == "legacy");
            assert_eq!(r["seq_id"].as_i64(), Some(seq), "{r}");
        }
        waits_ms.push((start - q) as f64 / 1e6);
    }
    waits_ms.sort_by(f64::total_cmp);
    // Two of six found every slot taken: they waited until one request was done, i.e. about
    // the shortest request the server ran (less the few ms their posts may lag the first).
    assert!(
        waits_ms[4] >= 0.5 * shortest_ms,
        "waits {waits_ms:?} ms, shortest request {shortest_ms} ms"
    );
}

/// The demo's schedule, at a third of its pace (rows with the same start run at once on the
/// four slots): repeated prompts served from a slot's cache, a prompt that is a prefix of an
/// earlier one (one token re-evaluated), a long prompt in several chunks beside short ones.
const DEMO_SCHEDULE: &[(u64, &str, u32)] = &[
    (0, "hello world", 8),
    (0, "The quick brown fox jumps over the lazy dog.", 16),
    (500, "Once upon a time", 32),
    (1000, LONG_PROMPT, 24),
    (1000, "llama", 8),
    (1000, "What time is it now?", 48),
    (1700, "Write one word about the model server.", 16),
    (2200, LONG_PROMPT, 64),
    (2200, "people find their way", 12),
    (2700, "hello", 4),
    (
        3300,
        "a long day of work, then some time to look at the number two",
        40,
    ),
    (3300, LONG_PROMPT, 8),
];

const LONG_PROMPT: &str = "The people who write the first word of a long day can look at the \
    number of words they made, and then they will find that some of them were more than one \
    time in the other part of what was said. When we call a model server with a request, each \
    token is made from the one before it, so the time of a day of work is the time of many \
    small parts, and if you look at them you can see where the time has gone.";

/// The demo's twelve requests, sent right after the probes are attached, with both CPUs busy:
/// every request is its posted task with its queue wait (the demo once printed 11 of 12), one
/// round per fixture (`cargo xtask test --stress`: 20).
#[test]
fn the_demos_requests_each_get_their_queue_wait() {
    on_every_server(
        "the_demos_requests_each_get_their_queue_wait",
        |f, model| {
            let server = Server::start(f.server.as_ref().unwrap(), model, &f.env);
            let _load = CpuLoad::start(2);
            for round in 0..rounds(1) {
                let (summary, events) = recording(&format!("demo-{}-{round}", f.name));
                let probe = attach_recording(f, &server, &summary, &events);
                let port = server.port;
                let start = std::time::Instant::now();
                let handles: Vec<_> = DEMO_SCHEDULE
                    .iter()
                    .map(|&(at_ms, prompt, n)| {
                        std::thread::spawn(move || {
                            let at = std::time::Duration::from_millis(at_ms);
                            std::thread::sleep(at.saturating_sub(start.elapsed()));
                            completion(port, prompt, n)
                        })
                    })
                    .collect();
                for h in handles {
                    h.join().unwrap();
                }
                std::thread::sleep(std::time::Duration::from_millis(300));
                let (code, stdout) = probe.interrupt();
                assert_eq!(code, 0, "{stdout}");
                let all = json_lines(&events);
                let requests = of_kind(&all, "request");
                let without: Vec<_> = requests
                    .iter()
                    .filter(|r| r["queued_ns"].is_null() || r["task_id"].is_null())
                    .collect();
                assert!(
                requests.len() == DEMO_SCHEDULE.len() && without.is_empty(),
                "{} round {round}: {} requests, without their task or queue wait: {without:?}\n{stdout}",
                f.name,
                requests.len()
            );
                assert!(stdout.contains("queue wait: 12 of 12 requests"), "{stdout}");
            }
        },
    );
}

/// One `/completion` with an array of three prompts is one post of three tasks: three
/// requests, each with its own task and a queue wait from that one post.
#[test]
fn an_array_completion_gives_each_prompt_its_queue_wait() {
    on_every_server(
        "an_array_completion_gives_each_prompt_its_queue_wait",
        |f, model| {
            if f.generation == "legacy" {
                // It splits a prompt array into a multitask and answers once for all of them.
                eprintln!(
                    "{}: a prompt array is one multitask in 2024: skipped",
                    f.name
                );
                return;
            }
            let server = Server::start(f.server.as_ref().unwrap(), model, &f.env);
            let (summary, events) = recording(&format!("array-{}", f.name));
            let probe = attach_recording(f, &server, &summary, &events);
            let prompts: Vec<String> = (20..23).map(prompt).collect();
            let sent = monotonic_ns();
            let out = server.post(
                "/completion",
                &serde_json::json!({"prompt": prompts, "n_predict": 6, "seed": 1}),
            );
            let received = monotonic_ns();
            let results = out.as_array().expect("one result per prompt");
            assert_eq!(results.len(), 3, "{out}");
            std::thread::sleep(std::time::Duration::from_millis(300));
            let (code, stdout) = probe.interrupt();
            assert_eq!(code, 0, "{stdout}");
            assert!(stdout.contains("queue wait: 3 of 3 requests"), "{stdout}");
            let s = json(&summary);
            assert_eq!(s["task_posts"], 1, "one post");
            assert_eq!(s["slot_launches"], 3);
            let all = json_lines(&events);
            let post = of_kind(&all, "task_post");
            assert_eq!(post.len(), 1);
            assert_eq!(post[0]["n_tasks"], 3);
            let posted_at = post[0]["origin"]["start_ns"].as_u64().unwrap();
            let requests = of_kind(&all, "request");
            assert_eq!(requests.len(), 3);
            let mut tasks: Vec<i64> = requests
                .iter()
                .map(|r| r["task_id"].as_i64().unwrap())
                .collect();
            tasks.sort();
            tasks.dedup();
            assert_eq!(tasks.len(), 3, "three tasks: {requests:?}");
            for r in &requests {
                let q = r["queued_ns"].as_u64().expect("a queue wait");
                assert_eq!(q, posted_at);
                assert!(sent <= q && q <= r["start_ns"].as_u64().unwrap());
                assert!(r["end_ns"].as_u64().unwrap() <= received);
            }
            let mut generated: Vec<u64> = requests
                .iter()
                .map(|r| r["generated_tokens"].as_u64().unwrap())
                .collect();
            let mut predicted: Vec<u64> = results
                .iter()
                .map(|r| r["tokens_predicted"].as_u64().unwrap())
                .collect();
            generated.sort();
            predicted.sort();
            assert_eq!(generated, predicted);
        },
    );
}

/// Embedding and rerank requests beside completions, each on a server started with the flag
/// it needs: every request carries its task's type (a rerank of two documents is two tasks).
#[test]
fn requests_carry_their_type() {
    on_every_server("requests_carry_their_type", |f, model| {
        let bin = f.server.as_ref().unwrap();
        let help = help(bin);
        for (flags, path_, body, expect) in [
            (
                vec!["--embeddings", "--pooling", "mean"],
                "/embedding",
                serde_json::json!({"content": "an embedding of these words"}),
                ("embedding", 1),
            ),
            (
                vec!["--reranking"],
                "/rerank",
                serde_json::json!({"query": "which", "documents": ["one document", "another one here"]}),
                ("rerank", 2),
            ),
        ] {
            if !help.contains(flags[0]) {
                eprintln!("{}: no {} flag: skipped", f.name, flags[0]);
                continue;
            }
            let Some(server) = Server::try_start(bin, model, &f.env, &flags) else {
                // The tiny model is a llama with no classifier head: builds before 2026 abort
                // on it with --reranking (the newest pools its rows instead).
                eprintln!(
                    "{}: llama-server {} refuses the tiny model: {} not tested here",
                    f.name, flags[0], expect.0
                );
                assert_ne!(
                    f.name, "newest",
                    "the newest fixture must serve {}",
                    expect.0
                );
                continue;
            };
            let (summary, events) = recording(&format!("types-{}-{}", f.name, expect.0));
            let probe = attach_recording(f, &server, &summary, &events);
            server.post(path_, &body);
            // Builds before 2026 serve no completions on an embeddings server (501).
            let served = http().post(&format!("http://127.0.0.1:{}/completion", server.port))
                .send_json(serde_json::json!({"prompt": "and a completion beside it", "n_predict": 4, "seed": 1}));
            let completions = match served {
                Ok(mut r) => {
                    let c: Value = r.body_mut().read_json().unwrap();
                    assert_eq!(c["tokens_predicted"], 4);
                    1
                }
                Err(ureq::Error::StatusCode(501)) => 0,
                Err(e) => panic!("completion: {e}"),
            };
            std::thread::sleep(std::time::Duration::from_millis(300));
            let (code, stdout) = probe.interrupt();
            assert_eq!(code, 0, "{stdout}");
            let s = json(&summary);
            let (kind, n) = expect;
            let mut by_type = serde_json::json!({ kind: n });
            if completions == 1 {
                by_type["completion"] = 1.into();
            }
            assert_eq!(s["requests_by_type"], by_type, "{}: {stdout}", f.name);
            assert_eq!(s["request_queue"]["count"], n + completions);
            let all = json_lines(&events);
            for r in of_kind(&all, "request") {
                if r["type"] == kind {
                    assert_eq!(r["generated_tokens"], 0, "{r}");
                    assert_eq!(r["closed_by"], "slot_released", "{r}");
                } else {
                    assert_eq!(r["generated_tokens"], 4, "{r}");
                }
            }
        }
    });
}

/// A completion that outgrows its slot's context: llama-server shifts it (seq_rm + seq_add)
/// and logs each shift; llamaprobe counts exactly as many, and the request goes on as one.
#[test]
fn context_shifts_are_counted() {
    on_every_server("context_shifts_are_counted", |f, model| {
        let bin = f.server.as_ref().unwrap();
        let dir = scratch(&format!("shift-{}", f.name));
        let log = dir.join("server.log");
        let mut flags = vec!["-c", "128", "-np", "1"];
        if help(bin).contains("--context-shift,") {
            flags.push("--context-shift"); // off by default in the newest builds
        }
        let server = Server::start_with(bin, model, &f.env, &flags, Some(&log));
        let (summary, metrics_port) = (dir.join("summary.json"), free_port());
        let probe = attach(
            f,
            &server,
            &[
                "--metrics-addr",
                &format!("127.0.0.1:{metrics_port}"),
                "--summary-json",
                path(&summary),
            ],
        );
        let r = server.post(
            "/completion",
            &serde_json::json!({"prompt": "a long generation", "n_predict": 300, "ignore_eos": true, "seed": 1}),
        );
        let predicted = r["tokens_predicted"].as_u64().unwrap();
        let logged = std::fs::read_to_string(&log)
            .unwrap()
            .matches("context shift")
            .count();
        assert!(logged >= 1, "the server shifted: {logged}, {r}");
        let ours = wait_metrics(metrics_port, |m| {
            sum_of(m, "llamacpp_context_shifts_total", "") >= logged as f64
        });
        assert_eq!(
            sum_of(&ours, "llamacpp_context_shifts_total", ""),
            logged as f64
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
        let (code, stdout) = probe.interrupt();
        assert_eq!(code, 0, "{stdout}");
        assert!(
            stdout.contains(&format!("context shifts: {logged}")),
            "{stdout}"
        );
        let s = json(&summary);
        assert_eq!(s["requests"], 1);
        assert_eq!(s["context_shifts"], logged);
        assert_eq!(s["sampled_tokens"], predicted);
    });
}

/// Speculative decoding: llama-server with a draft model (the tiny model drafting for
/// itself, `-md`) and, where the build has them, a draft-free n-gram type. The main context's
/// decode steps, prompt and generated tokens equal the server's own counters, the draft
/// context's work is apart (labelled `context="draft"`), draft and accepted tokens equal the
/// server's (its `spec_decode_*` counters, or the acceptance lines of its log in builds that
/// have no such counters), and each completion is one request with the server's token counts.
#[test]
fn speculative_decoding_counts_equal_the_servers() {
    on_every_server(
        "speculative_decoding_counts_equal_the_servers",
        |f, model| {
            let bin = f.server.as_ref().unwrap();
            let help = help(bin);
            if f.generation == "legacy" {
                // Its -md is the speculative example's: that llama-server never drafts.
                eprintln!(
                    "{}: llama-server of 2024 has no speculative decoding: skipped",
                    f.name
                );
                return;
            }
            if !help.contains("-md,") {
                eprintln!("{}: no draft model option: skipped", f.name);
                return;
            }
            let model_s = model.to_string_lossy().into_owned();
            let mut modes: Vec<(&str, Vec<&str>)> = vec![("draft model", vec!["-md", &model_s])];
            if help.contains("draft-simple") {
                modes[0].1.extend(["--spec-type", "draft-simple"]);
            }
            if help.contains("ngram-simple") {
                modes.push(("n-gram", vec!["--spec-type", "ngram-simple"]));
            }
            for (mode, spec) in modes {
                eprintln!("== {} {mode}", f.name);
                speculative(f, model, mode, &spec);
            }
        },
    );
}

fn speculative(f: &Fixture, model: &std::path::Path, mode: &str, spec: &[&str]) {
    let bin = f.server.as_ref().unwrap();
    let dir = scratch(&format!("spec-{}-{}", f.name, mode.replace(' ', "-")));
    let log = dir.join("server.log");
    let mut flags = vec!["-np", "1"];
    flags.extend_from_slice(spec);
    let server = Server::start_with(bin, model, &f.env, &flags, Some(&log));
    let metrics_port = free_port();
    let summary = dir.join("summary.json");
    let events = dir.join("events.jsonl");
    let probe = attach(
        f,
        &server,
        &[
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
            "--summary-json",
            path(&summary),
            "--events-out",
            path(&events),
        ],
    );
    let before = server.settled_metrics();
    let logged_before = std::fs::read_to_string(&log).unwrap_or_default().len();
    let responses: Vec<Value> = (0..3)
        .map(|i| {
            server.post(
                "/completion",
                &serde_json::json!({"prompt": prompt(30 + i), "n_predict": 32, "temperature": 0, "seed": 1}),
            )
        })
        .collect();
    let after = server.settled_metrics();
    let delta = |k: &str| {
        after.get(&format!("llamacpp:{k}")).copied().unwrap_or(0.0)
            - before.get(&format!("llamacpp:{k}")).copied().unwrap_or(0.0)
    };
    // The server's draft and accepted tokens: its counters, else its log's acceptance lines
    // ("draft acceptance rate = 1.00000 (   10 accepted /    10 generated)").
    let (drafted, accepted) = if after.contains_key("llamacpp:spec_decode_num_draft_tokens_total") {
        (
            delta("spec_decode_num_draft_tokens_total"),
            delta("spec_decode_num_accepted_tokens_total"),
        )
    } else {
        let text = std::fs::read_to_string(&log).unwrap();
        let mut sums = (0.0, 0.0);
        for line in text[logged_before..].lines() {
            let Some(rest) = line.split("draft acceptance rate = ").nth(1) else {
                continue;
            };
            let nums: Vec<f64> = rest
                .split(|c: char| !c.is_ascii_digit() && c != '.')
                .filter_map(|x| x.parse().ok())
                .collect();
            // rate, accepted, generated
            sums.0 += nums[2];
            sums.1 += nums[1];
        }
        sums
    };
    let main = "context=\"main\"";
    let ours = wait_metrics(metrics_port, |m| {
        sum_of(
            m,
            "llamacpp_tokens_total",
            "context=\"main\",kind=\"generated\"",
        ) >= delta("tokens_predicted_total")
    });
    let calls = sum_of(&ours, "llamacpp_decode_calls_total", main);
    let drafts = sum_of(&ours, "llamacpp_speculative_drafts_total", "");
    if after.contains_key("llamacpp:spec_decode_num_drafts_total") {
        assert_eq!(
            calls,
            delta("n_decode_total"),
            "{mode}: main-context decode steps"
        );
        assert_eq!(
            drafts,
            delta("spec_decode_num_drafts_total"),
            "{mode}: drafts"
        );
    } else {
        // Builds before the speculative counters decode each speculative batch apart from
        // the server loop's batch (`llama_decode(ctx, slot.batch_spec)`) and leave it out of
        // n_decode_total; at a request's last token the draft may be empty (n_draft_max =
        // n_remaining - 1 = 0), a batch of the fed-back token alone, indistinguishable from a
        // generation step: with drafts of one token and 32 tokens per request, one per request.
        let empty_drafts = responses.len() as f64;
        assert_eq!(
            calls - drafts - if drafts > 0.0 { empty_drafts } else { 0.0 },
            delta("n_decode_total"),
            "{mode}: main-context decode steps ({calls}) less the verifications ({drafts})"
        );
    }
    assert_eq!(
        sum_of(
            &ours,
            "llamacpp_tokens_total",
            &format!("{main},kind=\"prompt\"")
        ),
        delta("prompt_tokens_total"),
        "{mode}: prompt tokens"
    );
    assert_eq!(
        sum_of(
            &ours,
            "llamacpp_tokens_total",
            &format!("{main},kind=\"generated\"")
        ),
        delta("tokens_predicted_total"),
        "{mode}: generated tokens"
    );
    assert_eq!(
        sum_of(&ours, "llamacpp_speculative_draft_tokens_total", ""),
        drafted,
        "{mode}: draft tokens"
    );
    assert_eq!(
        sum_of(&ours, "llamacpp_speculative_accepted_tokens_total", ""),
        accepted,
        "{mode}: accepted tokens"
    );
    if mode == "draft model" && drafted > 0.0 {
        // The draft model's own steps are there, and apart.
        assert!(sum_of(&ours, "llamacpp_decode_calls_total", "context=\"draft\"") > 0.0);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (code, stdout) = probe.interrupt();
    assert_eq!(code, 0, "{stdout}");
    let s = json(&summary);
    assert_eq!(s["requests"], 3, "{mode}: {stdout}");
    assert_eq!(s["speculative"]["draft_tokens"].as_f64(), Some(drafted));
    let _ = drafts;
    let requests: Vec<Value> = json_lines(&events)
        .into_iter()
        .filter(|e| e["kind"] == "request")
        .collect();
    for (r, resp) in requests.iter().zip(&responses) {
        assert_eq!(
            r["generated_tokens"], resp["tokens_predicted"],
            "{mode}: {r}"
        );
        let input = r["prompt_tokens"].as_u64().unwrap() + r["cached_tokens"].as_u64().unwrap();
        assert_eq!(
            input,
            resp["tokens_evaluated"].as_u64().unwrap(),
            "{mode}: {r}"
        );
    }
    eprintln!(
        "{} {mode}: {calls} main steps, {drafts} drafts of {drafted} tokens, {accepted} accepted",
        f.name
    );
}
