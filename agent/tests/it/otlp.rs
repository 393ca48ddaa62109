//! OpenTelemetry export end to end: a real OTLP receiver (gRPC on the official protobuf
//! definitions, and a small HTTP/protobuf one) receives what llamaprobe exports while attached
//! to a real llama-server, and the spans agree with the server's own responses.

use std::time::{Duration, Instant};

use crate::common::otlp_receiver::{grpc_receiver, http_receiver, Received, ResourceAttrs};
use crate::common::{daemon::*, fixtures::Fixture, root_or_skip, scratch, serial, server::*};
use opentelemetry_proto::tonic::{
    common::v1::{any_value::Value as Any, KeyValue},
    trace::v1::Span,
};

fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a Any> {
    s.attributes
        .iter()
        .find(|a: &&KeyValue| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn int(s: &Span, key: &str) -> i64 {
    match attr(s, key) {
        Some(Any::IntValue(v)) => *v,
        other => panic!("{}: {key} = {other:?}", s.name),
    }
}

fn double(s: &Span, key: &str) -> f64 {
    match attr(s, key) {
        Some(Any::DoubleValue(v)) => *v,
        other => panic!("{}: {key} = {other:?}", s.name),
    }
}

fn string(s: &Span, key: &str) -> Option<String> {
    match attr(s, key) {
        Some(Any::StringValue(v)) => Some(v.clone()),
        _ => None,
    }
}

fn request_spans(spans: &[Span]) -> Vec<&Span> {
    spans
        .iter()
        .filter(|s| s.name.starts_with("text_completion"))
        .collect()
}

fn prompt(i: usize) -> String {
    let words = ["alpha", "bravo", "charlie", "delta", "echo", "fox", "golf"];
    (0..4 + 3 * i)
        .map(|k| words[(i * 5 + k * 3) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
        + &format!(" question {i}")
}

/// Waits until `pred` holds on what the receiver got.
fn wait_until(got: &Received, what: &str, pred: impl Fn(&Received) -> bool) {
    let t0 = Instant::now();
    while !pred(got) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "receiver never got {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn grpc_export_agrees_with_llama_server() {
    on_every_server("grpc_export_agrees_with_llama_server", grpc_agrees);
}

fn grpc_agrees(f: &Fixture, model: &std::path::Path) {
    let port = free_port();
    let receiver = grpc_receiver(port);
    let server = Server::start(f.server.as_ref().unwrap(), model, &f.env);
    let endpoint = format!("http://127.0.0.1:{port}");
    let probe = attach(
        f,
        &server,
        &["--metrics-addr", "off", "--otlp-endpoint", &endpoint],
    );
    let sp = server.port;
    // Distinct output lengths identify the requests; the same prompt twice hits the cache.
    let mut responses = vec![
        completion(sp, &prompt(1), 8),
        completion(sp, &prompt(1), 11),
        completion_stream(sp, &prompt(2), 5),
    ];
    let handles: Vec<_> = [(3, 6u32), (4, 16), (5, 9), (6, 20)]
        .into_iter()
        .map(|(i, n)| std::thread::spawn(move || completion_stream(sp, &prompt(i), n)))
        .collect();
    responses.extend(handles.into_iter().map(|h| h.join().unwrap()));
    let (code, _) = probe.interrupt();
    assert_eq!(code, 0);

    let spans = receiver.got.spans();
    let requests = request_spans(&spans);
    assert_eq!(
        requests.len(),
        responses.len(),
        "{:#?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let mut cache_hits = 0;
    for resp in &responses {
        let predicted = resp["tokens_predicted"].as_i64().unwrap();
        let matching: Vec<&&Span> = requests
            .iter()
            .filter(|s| int(s, "gen_ai.usage.output_tokens") == predicted)
            .collect();
        assert_eq!(matching.len(), 1, "{resp}: {matching:#?}");
        let r = matching[0];
        assert_eq!(r.kind, 2, "SERVER");
        assert!(r.parent_span_id.is_empty());
        assert_eq!(
            int(r, "gen_ai.usage.input_tokens"),
            resp["tokens_evaluated"].as_i64().unwrap(),
            "{resp}"
        );
        let timings = &resp["timings"];
        if let Some(cache_n) = timings.get("cache_n").and_then(|c| c.as_i64()) {
            assert_eq!(int(r, "gen_ai.usage.cache_read.input_tokens"), cache_n);
            if cache_n > 0 {
                cache_hits += 1;
            }
        }
        assert_eq!(
            string(r, "gen_ai.operation.name").unwrap(),
            "text_completion"
        );
        assert_eq!(string(r, "gen_ai.provider.name").unwrap(), "llama.cpp");
        match string(r, "gen_ai.request.model") {
            Some(m) => assert_eq!(r.name, format!("text_completion {m}")),
            None => assert_eq!(r.name, "text_completion"),
        }
        assert_eq!(int(r, "process.pid"), server.child.id() as i64);
        int(r, "llama.seq_id");
        // Time to first token counts from acceptance by the server's task queue; less the
        // queue wait, it is the prompt's processing, which the server times too.
        let ttft_ms = double(r, "gen_ai.server.time_to_first_token") * 1e3;
        let queue_ms = double(r, "llama.request.queue_seconds") * 1e3;
        let prompt_ms = timings["prompt_ms"].as_f64().unwrap();
        assert!(
            queue_ms >= 0.0 && ttft_ms > queue_ms && ttft_ms - queue_ms <= prompt_ms + 5.0,
            "ttft {ttft_ms} ms, queue {queue_ms} ms, server prompt {prompt_ms} ms"
        );
        // Its wall time split: its decode steps, its samplings and the rest add up to the
        // span's duration; the server's own prompt and generation timings are its steps'
        // and samplings' work, so the steps take most of that. Not profiling: no samples.
        let span_s = (r.end_time_unix_nano - r.start_time_unix_nano) as f64 / 1e9;
        let (decode_s, sampling_s, outside_s) = (
            double(r, "llama.request.decode_seconds"),
            double(r, "llama.request.sampling_seconds"),
            double(r, "llama.request.outside_seconds"),
        );
        assert!(
            (decode_s + sampling_s + outside_s - span_s).abs() < 1e-5,
            "{decode_s} + {sampling_s} + {outside_s} vs {span_s}"
        );
        let server_s = (prompt_ms + timings["predicted_ms"].as_f64().unwrap()) / 1e3;
        assert!(
            decode_s > 0.0 && sampling_s > 0.0 && decode_s + sampling_s <= server_s + 0.005,
            "steps {decode_s} s + sampling {sampling_s} s vs the server's {server_s} s"
        );
        assert!(
            !r.attributes
                .iter()
                .any(|a| a.key == "llama.request.cpu_samples"),
            "no CPU samples without --profile-cpu"
        );
        // Children: queue, prompt then generation, in the same trace, inside the request.
        let children: Vec<&Span> = spans
            .iter()
            .filter(|s| s.parent_span_id == r.span_id)
            .collect();
        let names: Vec<&str> = children.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(
            names.contains(&"queue") && names.contains(&"prompt") && names.contains(&"generation")
        );
        let child = |n: &str| *children.iter().find(|c| c.name == n).unwrap();
        let (queue, prompt_span) = (child("queue"), child("prompt"));
        assert_eq!(queue.start_time_unix_nano, r.start_time_unix_nano);
        assert_eq!(queue.end_time_unix_nano, prompt_span.start_time_unix_nano);
        let queue_span_ms = (queue.end_time_unix_nano - queue.start_time_unix_nano) as f64 / 1e6;
        assert!(
            (queue_span_ms - queue_ms).abs() < 0.01,
            "{queue_span_ms} vs {queue_ms}"
        );
        for c in &children {
            assert_eq!(c.trace_id, r.trace_id);
            assert!(c.start_time_unix_nano >= r.start_time_unix_nano);
            assert!(c.end_time_unix_nano <= r.end_time_unix_nano);
        }
        // Wall-clock timestamps: within the last few minutes.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        assert!(r.end_time_unix_nano <= now && r.start_time_unix_nano > now - 600_000_000_000);
    }
    if responses[1]["timings"].get("cache_n").is_some() {
        assert!(cache_hits >= 1, "the repeated prompt did not hit the cache");
    }

    let h = receiver.got.histograms();
    let doubling: Vec<f64> = (0..14).map(|k| 0.01 * f64::powi(2.0, k)).collect();
    let expect: [(&str, &str, Vec<f64>); 3] = [
        ("gen_ai.server.request.duration", "s", doubling),
        (
            "gen_ai.server.time_to_first_token",
            "s",
            vec![
                0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0,
            ],
        ),
        (
            "gen_ai.server.time_per_output_token",
            "s",
            vec![
                0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
            ],
        ),
    ];
    for (name, unit, bounds) in expect {
        let (u, b, count) = h
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing: {:?}", h.keys()));
        assert_eq!(u, unit, "{name}");
        assert_eq!(b.len(), bounds.len(), "{name}: {b:?}");
        for (x, y) in b.iter().zip(&bounds) {
            assert!((x - y).abs() < 1e-9, "{name}: {b:?}");
        }
        assert_eq!(*count, responses.len() as u64, "{name}");
    }
    let (_, _, usage) = &h["gen_ai.client.token.usage"];
    assert_eq!(
        *usage,
        2 * responses.len() as u64,
        "input and output per request"
    );
}

#[test]
fn http_protobuf_export() {
    let Some((f, model, _serial)) = first_server("http_protobuf_export") else {
        return;
    };
    let port = free_port();
    let receiver = http_receiver(port);
    let server = Server::start(f.server.as_ref().unwrap(), &model, &f.env);
    let endpoint = format!("http://127.0.0.1:{port}");
    let probe = attach(
        &f,
        &server,
        &[
            "--metrics-addr",
            "off",
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "http",
            "--otlp-step-spans",
        ],
    );
    let responses = [
        completion(server.port, &prompt(1), 7),
        completion(server.port, &prompt(2), 10),
    ];
    let (code, _) = probe.interrupt();
    assert_eq!(code, 0);
    let spans = receiver.got.spans();
    let requests = request_spans(&spans);
    assert_eq!(requests.len(), 2);
    for resp in &responses {
        let predicted = resp["tokens_predicted"].as_i64().unwrap();
        let r = requests
            .iter()
            .find(|s| int(s, "gen_ai.usage.output_tokens") == predicted)
            .unwrap_or_else(|| panic!("no span for {resp}"));
        // Per-step spans: one per decode step carrying its tokens (the prompt chunk(s) and
        // each generated token fed back but the last).
        let steps: Vec<&Span> = spans
            .iter()
            .filter(|s| s.parent_span_id == r.span_id && s.name == "llama.decode")
            .collect();
        assert_eq!(
            steps.len() as i64,
            int(r, "llama.request.decode_steps"),
            "{:?}",
            steps
        );
        let tokens: i64 = steps
            .iter()
            .map(|s| int(s, "llama.decode.seq_tokens"))
            .sum();
        assert_eq!(
            tokens,
            int(r, "llama.request.prompt_tokens") + predicted - 1,
            "prompt tokens and the generated tokens fed back"
        );
    }
    assert!(receiver
        .got
        .histograms()
        .contains_key("gen_ai.server.request.duration"));
}

#[test]
fn receiver_absent_then_started() {
    let Some((f, model, _serial)) = first_server("receiver_absent_then_started") else {
        return;
    };
    let port = free_port();
    let metrics_port = free_port();
    let server = Server::start(f.server.as_ref().unwrap(), &model, &f.env);
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut probe = attach(
        &f,
        &server,
        &[
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
            "--interval",
            "1",
            "--otlp-endpoint",
            &endpoint,
        ],
    );
    // Nothing listens: the requests are profiled, their export fails, counted and logged.
    for (i, n) in [(1, 6), (2, 9)] {
        completion(server.port, &prompt(i), n);
    }
    probe.wait_for("OTLP export to");
    let m = parse_metrics(
        &get(&format!("http://127.0.0.1:{metrics_port}/metrics")).expect("llamaprobe /metrics"),
    );
    assert!(sum_of(&m, "llamaprobe_otlp_export_failures_total", "traces") >= 1.0);

    // The receiver comes up: export resumes.
    let receiver = grpc_receiver(port);
    let later = [
        completion(server.port, &prompt(3), 13),
        completion(server.port, &prompt(4), 17),
    ];
    // Exported while running (2 s idle close + 5 s batch delay), not only at the end.
    wait_until(&receiver.got, "the later requests", |g| {
        request_spans(&g.spans()).len() >= 2
    });
    let (code, _) = probe.interrupt();
    assert_eq!(code, 0);
    let spans = receiver.got.spans();
    for resp in &later {
        let predicted = resp["tokens_predicted"].as_i64().unwrap();
        assert_eq!(
            request_spans(&spans)
                .iter()
                .filter(|s| int(s, "gen_ai.usage.output_tokens") == predicted)
                .count(),
            1,
            "{resp}"
        );
    }
}

/// CPU time (user + system) of a process so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line (11 and 12 after the command name).
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The README's cost figures: spans per generated token and llamaprobe's CPU with OTLP off,
/// on, and on with per-step spans, over the same short run. `cargo test --test otlp --
/// --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn measure_otlp_cost() {
    let Some((f, model, _serial)) = first_server("measure_otlp_cost") else {
        return;
    };
    let server = Server::start(f.server.as_ref().unwrap(), &model, &f.env);
    for mode in ["off", "on", "steps"] {
        let port = free_port();
        let receiver = grpc_receiver(port);
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut args = vec!["--metrics-addr", "off"];
        if mode != "off" {
            args.extend(["--otlp-endpoint", &endpoint]);
        }
        if mode == "steps" {
            args.push("--otlp-step-spans");
        }
        let probe = attach(&f, &server, &args);
        let pid = probe.child.id();
        let cpu0 = cpu_seconds(pid);
        let t0 = Instant::now();
        let mut generated = 0;
        for i in 0..16 {
            let r = completion(server.port, &prompt(i), 128);
            generated += r["tokens_predicted"].as_u64().unwrap();
        }
        let cpu = cpu_seconds(pid) - cpu0;
        let wall = t0.elapsed().as_secs_f64();
        let (code, _) = probe.interrupt();
        assert_eq!(code, 0);
        let all = receiver.got.spans();
        let spans = all.len();
        eprintln!(
            "MEASURE otlp={mode}: {} requests, {generated} generated tokens in {wall:.2} s; {spans} spans ({:.3} per generated token); llamaprobe CPU {:.3} s ({:.2}% of one core, {:.1} µs per generated token)",
            request_spans(&all).len(),
            spans as f64 / generated as f64,
            cpu,
            cpu / wall * 100.0,
            cpu / generated as f64 * 1e6
        );
    }
}

/// `llamaprobe run` sees llama-server load its model and create its context: both become
/// spans with the file and the parameters the server was started with (-c 2048 -np 4).
#[test]
fn run_exports_model_load_and_context_spans() {
    let Some((f, model, _serial)) = first_server("run_exports_model_load_and_context_spans") else {
        return;
    };
    let port = free_port();
    let receiver = grpc_receiver(port);
    let server_bin = f.server.clone().unwrap();
    let server_port = free_port();
    let mut cmd = crate::common::llamaprobe();
    cmd.args(["run", "--quiet", "--metrics-addr", "off"])
        .args(["--otlp-endpoint", &format!("http://127.0.0.1:{port}")])
        .args(f.symbols_args())
        .arg("--")
        .arg(&server_bin)
        .args(server_args(&server_bin, &model, server_port));
    f.apply(&mut cmd);
    let mut probe = Probe::spawn(&mut cmd);
    probe.wait_for("probes attached");
    wait_healthy(server_port, &mut probe.child);
    // Stop the server: llamaprobe ends with it and flushes its export.
    let (_, stdout) = probe.stop_program();
    assert!(stdout.contains("the process exited"), "{stdout}");

    let spans = receiver.got.spans();
    let named = |n: &str| spans.iter().filter(|s| s.name == n).collect::<Vec<_>>();
    let loads = named("llama.model_load");
    assert_eq!(
        loads.len(),
        1,
        "one load (its deprecated wrapper counted once)"
    );
    let load = loads[0];
    assert_eq!(
        string(load, "llama.model_load.path").as_deref(),
        Some(model.to_str().unwrap())
    );
    assert_eq!(
        string(load, "llama.model_load.result").as_deref(),
        Some("ok")
    );
    assert!(load.end_time_unix_nano > load.start_time_unix_nano);
    let contexts = named("llama.context_create");
    assert!(!contexts.is_empty());
    let c = contexts.last().unwrap();
    assert_eq!(int(c, "llama.context.n_ctx"), 2048);
    assert_eq!(int(c, "llama.context.n_seq_max"), 4);
    assert_eq!(int(c, "llama.context.n_ubatch"), 512);
    assert_eq!(
        string(c, "llama.context_create.result").as_deref(),
        Some("ok")
    );
    // The context is created after the load, in the same process.
    assert!(c.start_time_unix_nano >= load.end_time_unix_nano);
    assert_eq!(int(c, "process.pid"), int(load, "process.pid"));
}

/// A resource attribute, as a string or an integer's decimal.
fn resource_attr(resource: &[(String, Any)], key: &str) -> Option<String> {
    resource
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| match v {
            Any::StringValue(s) => Some(s.clone()),
            Any::IntValue(i) => Some(i.to_string()),
            _ => None,
        })
}

/// The host agent exports each process under a resource of its own: two copies of the fake
/// driver, one naming its service in its environment, the other known by its executable.
/// Every span of a process sits under its resource (the children with their parent), none
/// under the other's, and its request histograms too.
#[test]
fn daemon_exports_each_process_under_its_own_resource() {
    if !root_or_skip("daemon_exports_each_process_under_its_own_resource") {
        return;
    }
    let _serial = serial();
    let dir = scratch("otlp-daemon-resources");
    let exe = driver_copy(&dir, "otlp_res_driver");
    let port = free_port();
    let receiver = grpc_receiver(port);
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut d = Daemon::start(&[
        "--include",
        "exe:otlp_res_driver",
        "--otlp-endpoint",
        &endpoint,
    ]);
    // Held until both are traced (the first look at a file not probed yet can take longer
    // than the driver's own start on a busy machine).
    let spawn = |service: Option<&str>| {
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("/models/tiny-model.gguf")
            .env_remove("OTEL_SERVICE_NAME")
            .env("FAKE_WAIT_STDIN", "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        if let Some(s) = service {
            cmd.env("OTEL_SERVICE_NAME", s);
        }
        cmd.spawn().unwrap()
    };
    let mut children = [spawn(Some("svc-a")), spawn(None)];
    let expect: Vec<(u32, &str)> = children
        .iter()
        .map(|c| c.id())
        .zip(["svc-a", "otlp_res_driver"])
        .collect();
    for (pid, _) in &expect {
        d.wait_line("traced", *pid);
    }
    for c in children.iter_mut() {
        use std::io::Write;
        c.stdin.take().unwrap().write_all(b"g").unwrap();
    }
    for c in children {
        let pid = c.id();
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "driver {pid} failed");
    }
    for (pid, _) in &expect {
        d.wait_line("released", *pid);
    }
    let (code, _) = d.probe.terminate();
    assert_eq!(code, 0);

    let spans = receiver.got.spans_by_resource();
    let pid_of = |resource: &[(String, Any)]| resource_attr(resource, "process.pid");
    for (pid, service) in &expect {
        let pid_s = pid.to_string();
        let mine: Vec<&(ResourceAttrs, Span)> = spans
            .iter()
            .filter(|(r, _)| pid_of(r).as_deref() == Some(pid_s.as_str()))
            .collect();
        let names: Vec<&str> = mine.iter().map(|(_, s)| s.name.as_str()).collect();
        for name in ["llama.model_load", "llama.context_create"] {
            assert!(names.contains(&name), "{pid}: {names:?}");
        }
        assert!(
            names.iter().any(|n| n.starts_with("text_completion")),
            "{pid}: {names:?}"
        );
        for (r, s) in &mine {
            let a = |k: &str| resource_attr(r, k);
            assert_eq!(a("service.name").as_deref(), Some(*service), "{r:?}");
            assert_eq!(
                a("process.executable.name").as_deref(),
                Some("otlp_res_driver")
            );
            assert_eq!(a("telemetry.distro.name").as_deref(), Some("llamaprobe"));
            assert_eq!(
                a("telemetry.distro.version").as_deref(),
                Some(env!("CARGO_PKG_VERSION"))
            );
            assert!(a("host.name").is_some(), "{r:?}");
            assert_eq!(a("service.version"), None, "{r:?}");
            // A span that names its process names this one.
            if let Some(Any::IntValue(p)) = attr(s, "process.pid") {
                assert_eq!(*p, *pid as i64, "{}", s.name);
            }
        }
    }
    // No span of a traced process under another resource: every root span names its pid,
    // and every child sits with its parent.
    for (r, s) in &spans {
        if let Some(Any::IntValue(p)) = attr(s, "process.pid") {
            assert_eq!(pid_of(r), Some(p.to_string()), "{}", s.name);
        }
        if !s.parent_span_id.is_empty() {
            let parent = spans
                .iter()
                .find(|(_, p)| p.span_id == s.parent_span_id)
                .unwrap_or_else(|| panic!("{}: no parent", s.name));
            assert_eq!(pid_of(r), pid_of(&parent.0), "{}", s.name);
        }
    }
    // The request histograms of each process, under its resource.
    let metrics = receiver.got.metrics_by_resource();
    for (pid, service) in &expect {
        let pid_s = pid.to_string();
        let theirs: Vec<&(ResourceAttrs, Vec<String>)> = metrics
            .iter()
            .filter(|(r, _)| resource_attr(r, "process.pid").as_deref() == Some(pid_s.as_str()))
            .collect();
        assert!(
            theirs
                .iter()
                .any(|(_, names)| names.iter().any(|n| n == "gen_ai.server.request.duration")),
            "{pid}: {theirs:?}"
        );
        for (r, _) in theirs {
            assert_eq!(resource_attr(r, "service.name").as_deref(), Some(*service));
        }
    }
}
