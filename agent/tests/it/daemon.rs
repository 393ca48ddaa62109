//! `llamaprobe daemon`, the host agent: real llama-servers started before and after it, short
//! processes coming and going (the fake llama.cpp's driver, copied under a name of its own so
//! that no other test's processes are selected), and its bad input.

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::{
    daemon::{driver_copy, held_driver, Daemon},
    server::*,
    *,
};

/// A process's open file descriptors and resident memory (kB).
fn fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    (fds, rss)
}

const COUNTED: [&str; 3] = [
    "llamacpp_decode_calls_total",
    "llamacpp_tokens_total",
    "llamacpp_sample_duration_seconds_count",
];

#[test]
fn daemon_traces_servers_started_before_and_after_it() {
    let Some((f, model, _guard)) =
        first_server("daemon_traces_servers_started_before_and_after_it")
    else {
        return;
    };
    let bin = f.server.as_ref().unwrap();
    let before = Server::start(bin, &model, &f.env);
    let mut d = Daemon::start(&["--include", "exe:llama-server", "--series-grace", "1"]);
    let line = d.wait_line("traced", before.child.id());
    assert!(line.contains("exe=llama-server"), "{line}");
    let after = Server::start(bin, &model, &f.env);
    d.wait_line("traced", after.child.id());

    let servers = [&before, &after];
    let pid = |s: &Server| format!("pid=\"{}\"", s.child.id());
    let base_server: Vec<_> = servers.iter().map(|s| s.settled_metrics()).collect();
    let base = d.settled(&COUNTED, "");
    // The later one's model load was seen (its probes were live from its exec); the earlier
    // one's model is recovered from its maps.
    let loads: Vec<_> = base
        .iter()
        .filter(|(k, _)| {
            k.starts_with("llamacpp_model_load_duration_seconds_count{") && k.contains(&pid(&after))
        })
        .collect();
    assert_eq!(loads.len(), 1, "{loads:?}");
    assert!(
        loads[0].0.contains("result=\"ok\"") && *loads[0].1 == 1.0,
        "{loads:?}"
    );
    for (k, _) in base.iter().filter(|(k, _)| k.contains(&pid(&before))) {
        assert!(k.contains("exe=\"llama-server\""), "{k}");
    }

    for (s, prompts) in [(&before, 0..3), (&after, 3..5)] {
        for i in prompts {
            completion(
                s.port,
                &format!("daemon prompt {i} alpha bravo"),
                6 + i as u32,
            );
        }
    }
    let now_server: Vec<_> = servers.iter().map(|s| s.settled_metrics()).collect();
    let ours = d.settled(&COUNTED, "");
    for (n, s) in servers.iter().enumerate() {
        let delta = |k: &str| {
            now_server[n][&format!("llamacpp:{k}")] - base_server[n][&format!("llamacpp:{k}")]
        };
        // The series of this server (and of `filter`, if given).
        let ours_delta = |name: &str, filter: &str| {
            let of = |m: &HashMap<String, f64>| -> f64 {
                m.iter()
                    .filter(|(k, _)| {
                        k.starts_with(&format!("{name}{{"))
                            && k.contains(&pid(s))
                            && k.contains(filter)
                    })
                    .map(|(_, v)| v)
                    .sum()
            };
            of(&ours) - of(&base)
        };
        assert_eq!(
            ours_delta("llamacpp_decode_calls_total", ""),
            delta("n_decode_total"),
            "decode steps of server {n}"
        );
        assert_eq!(
            ours_delta("llamacpp_tokens_total", "kind=\"prompt\""),
            delta("prompt_tokens_total"),
            "prompt tokens of server {n}"
        );
        assert_eq!(
            ours_delta("llamacpp_tokens_total", "kind=\"generated\""),
            delta("tokens_predicted_total"),
            "generated tokens of server {n}"
        );
        assert!(delta("n_decode_total") > 0.0);
    }
    assert!(sum_of(&ours, "llamaprobe_processes_traced", "") >= 2.0);
    assert_eq!(sum_of(&ours, "llamaprobe_events_lost_total", ""), 0.0);

    // A server that exits is released, its series removed after the grace.
    let gone = before.child.id();
    drop(before);
    d.wait_line("released", gone);
    let t0 = Instant::now();
    while d
        .metrics()
        .keys()
        .any(|k| k.contains(&format!("pid=\"{gone}\"")))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "series of pid {gone} still there"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(d.metrics().keys().any(|k| k.contains(&pid(&after))));
    // Restarted (a new pid): traced again from its exec, its model load seen.
    let restarted = Server::start(bin, &model, &f.env);
    d.wait_line("traced", restarted.child.id());
    let m = d.settled(&["llamacpp_model_load_duration_seconds_count"], "");
    let loads: Vec<_> = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with("llamacpp_model_load_duration_seconds_count{")
                && k.contains(&pid(&restarted))
        })
        .collect();
    assert_eq!(loads.len(), 1, "{loads:?}");
    assert!(
        loads[0].0.contains("result=\"ok\"") && *loads[0].1 == 1.0,
        "{loads:?}"
    );
    // Its outputs are written first, then the probes of both servers are detached (about
    // 0.1 s each in the kernel: a stop signal's grace is not spent before the outputs).
    let attached = sum_of(&d.metrics(), "llamaprobe_probes_attached", "");
    d.probe.signal(libc::SIGTERM);
    let line = d.probe.wait_for("outputs written");
    assert!(
        line.contains(&format!("detaching {attached} probes")),
        "{line} ({attached} attached)"
    );
    let (code, _) = d.probe.finish();
    assert_eq!(code, 0);
}

#[test]
fn daemon_refuses_processes_over_max_processes_and_counts_them() {
    if !root_or_skip("daemon_refuses_processes_over_max_processes_and_counts_them") {
        return;
    }
    let _serial = serial();
    let dir = scratch("daemon-max");
    let exe = driver_copy(&dir, "max_driver");
    let mut first = start_waiting(&exe);
    let mut second = start_waiting(&exe);
    let mut d = Daemon::start(&["--include", "exe:max_driver", "--max-processes", "1"]);
    let m = d.metrics();
    assert_eq!(sum_of(&m, "llamaprobe_processes_traced", ""), 1.0);
    assert_eq!(sum_of(&m, "llamaprobe_processes_refused_total", ""), 1.0);
    assert!(
        d.probe.wait_for("--max-processes").contains("not traced"),
        "the refusal is said once"
    );
    for c in [&mut first, &mut second] {
        let _ = c.kill();
        let _ = c.wait();
    }
    let (code, _) = d.probe.terminate();
    assert_eq!(code, 0);
}

#[test]
fn daemon_follows_twenty_short_processes_and_leaves_nothing_behind() {
    if !root_or_skip("daemon_follows_twenty_short_processes_and_leaves_nothing_behind") {
        return;
    }
    let _serial = serial();
    // A copy under a name of its own: other tests run the fake's drivers too.
    let dir = scratch("daemon-churn");
    let exe = driver_copy(&dir, "churn_driver");
    let events = dir.join("events.jsonl");
    let mut d = Daemon::start(&[
        "--include",
        "exe:churn_driver",
        "--series-grace",
        "1",
        "--rescan",
        "1",
        "--sync",
        "on",
        "--events-out",
        path(&events),
    ]);
    let me = d.probe.child.id();
    let idle = d.metrics();
    assert_eq!(sum_of(&idle, "llamaprobe_files_probed", ""), 0.0);
    let run = |n: usize| -> Vec<u32> {
        let children: Vec<_> = (0..n)
            .map(|_| {
                Command::new(&exe)
                    .arg("/models/tiny-model.gguf")
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        children
            .into_iter()
            .map(|c| {
                let pid = c.id();
                let out = c.wait_with_output().unwrap();
                assert!(out.status.success(), "driver {pid} failed");
                pid
            })
            .collect()
    };
    // One first, so that what stays for good is there (each eBPF program is loaded at its
    // first use): the baseline.
    let first = run(1)[0];
    d.wait_line("released", first);
    let settle_fds = |want: Option<usize>| {
        let t0 = Instant::now();
        let mut prev = fds_and_rss(me).0;
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let cur = fds_and_rss(me).0;
            if want.map_or(cur == prev, |w| cur == w) || t0.elapsed() > Duration::from_secs(60) {
                return cur;
            }
            prev = cur;
        }
    };
    // Detached links are closed by a thread of their own (the kernel's teardown is slow).
    let fds0 = settle_fds(None);
    let rss0 = fds_and_rss(me).1;

    let mut pids = Vec::new();
    for _ in 0..5 {
        pids.extend(run(4));
    }
    for pid in &pids {
        d.wait_line("released", *pid);
    }
    // After the grace: no series of theirs, no probe, no file.
    let t0 = Instant::now();
    let m = loop {
        let m = d.metrics();
        let left = m
            .keys()
            .filter(|k| pids.iter().any(|p| k.contains(&format!("pid=\"{p}\""))))
            .count();
        if left == 0 && sum_of(&m, "llamaprobe_processes_traced", "") == 0.0 {
            break m;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let left: Vec<_> = m
                .keys()
                .filter(|k| pids.iter().any(|p| k.contains(&format!("pid=\"{p}\""))))
                .collect();
            panic!("{} series left: {left:?}", left.len());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(sum_of(&m, "llamaprobe_files_probed", ""), 0.0);
    assert_eq!(sum_of(&m, "llamaprobe_probes_attached", ""), 0.0);
    let series = |m: &HashMap<String, f64>| m.keys().filter(|k| k.starts_with("llamacpp_")).count();
    eprintln!(
        "llamacpp_ series: {} before the 20 processes, {} after them",
        series(&idle),
        series(&m)
    );
    assert_eq!(series(&m), series(&idle));
    settle_fds(Some(fds0));
    let (fds1, rss1) = fds_and_rss(me);
    eprintln!("daemon fds {fds0} -> {fds1}, RSS {rss0} kB -> {rss1} kB after 20 processes");
    assert_eq!(fds1, fds0, "file descriptors left behind");
    assert!(
        rss1 < rss0 + 16 * 1024,
        "RSS grew from {rss0} kB to {rss1} kB"
    );
    let (code, _) = d.probe.terminate();
    assert_eq!(code, 0);

    // Every one of the twenty was traced from its start: all its calls seen (the fake's
    // sequence: 15 decodes, a load through the deprecated wrapper and a failing one).
    let events = json_lines(&events);
    for pid in &pids {
        let mine = |kind: &str| {
            of_kind(&events, kind)
                .into_iter()
                .filter(|e| e["origin"]["pid"] == *pid)
                .count()
        };
        assert_eq!(mine("decode"), 15, "decodes of pid {pid}");
        assert_eq!(mine("model_load"), 2, "model loads of pid {pid}");
        assert_eq!(mine("context_create"), 1, "contexts of pid {pid}");
    }
}

/// Runs llamaprobe expecting failure; (exit code, stderr).
fn fails(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = llamaprobe()
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn daemon_config_files_with_unknown_keys_or_bad_values_are_refused() {
    let dir = scratch("daemon-config");
    for (name, body, says) in [
        (
            "unknown.toml",
            "rescan = 1\nrescna = 2\n",
            "unknown key `rescna`",
        ),
        ("bad.toml", "max-processes = \"many\"\n", "`max-processes`"),
        (
            "selector.toml",
            "exclude = [\"image:x\"]\n",
            "unknown selector kind",
        ),
        ("syntax.toml", "rescan = = 1\n", "not valid TOML"),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        let (code, err) = fails(&["daemon", "--config", path(&p)], &[]);
        assert_eq!(code, 2, "{name}: {err}");
        assert!(err.contains(says) && err.contains(name), "{name}: {err}");
    }
    let (code, err) = fails(&["daemon", "--config", "/nonexistent/llamaprobe.toml"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read the configuration file"), "{err}");
    // A good file passes the check, and --check-config says what it holds.
    let p = dir.join("good.toml");
    std::fs::write(&p, "include = [\"exe:llama-server\"]\nrescan = 0.5\n").unwrap();
    let out = llamaprobe()
        .args(["daemon", "--config", path(&p), "--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("rescan 0.5 s") && said.contains("include [exe:llama-server]"),
        "{said}"
    );
    // A flag beats the file.
    let out = llamaprobe()
        .args([
            "daemon",
            "--config",
            path(&p),
            "--rescan",
            "3",
            "--check-config",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("rescan 3 s"));
    // The command line is still judged on its own.
    let p = dir.join("good.toml");
    std::fs::write(&p, "include = [\"exe:nothing-here\"]\nrescan = 0.5\n").unwrap();
    let (code, err) = fails(&["daemon", "--config", path(&p), "--rescan", "x"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("--rescan"), "{err}");
}

#[test]
fn daemon_without_privileges_or_tracefs_says_what_to_do() {
    if !root_or_skip("daemon_without_privileges_or_tracefs_says_what_to_do") {
        return;
    }
    let bin = env!("CARGO_BIN_EXE_llamaprobe");
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin,
            "daemon",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the host agent is missing CAP_SYS_ADMIN")
            && err.contains("CAP_SYS_PTRACE")
            && err.contains("CAP_DAC_READ_SEARCH"),
        "{}",
        text(&out)
    );
    // No tracefs: /sys/kernel hidden in a mount namespace of its own (nowhere to mount it).
    let script = format!("mount -t tmpfs none /sys/kernel && exec {bin} daemon --metrics-addr off");
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tracefs is not available") && err.contains("mount -t tracefs"),
        "{}",
        text(&out)
    );
}

/// One OpenAI-style completion of `model` through a router.
fn routed_completion(port: u16, model: &str, prompt: &str, n: u32) -> serde_json::Value {
    let mut r = http()
        .post(&format!("http://127.0.0.1:{port}/v1/completions"))
        .send_json(
            serde_json::json!({"model": model, "prompt": prompt, "max_tokens": n, "seed": 1}),
        )
        .expect("routed completion");
    r.body_mut().read_json().unwrap()
}

#[test]
fn daemon_traces_the_children_of_a_router_each_with_its_model() {
    let Some((f, model, _guard)) =
        first_server("daemon_traces_the_children_of_a_router_each_with_its_model")
    else {
        return;
    };
    let bin = f.server.as_ref().unwrap();
    if !help(bin).contains("--models-dir") {
        eprintln!("SKIPPED: fixture {} has no router mode", f.name);
        return;
    }
    let dir = scratch("daemon-router");
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    for m in ["tiny-a", "tiny-b"] {
        std::fs::copy(&model, models.join(format!("{m}.gguf"))).unwrap();
    }
    let mut d = Daemon::start(&["--include", "exe:llama-server", "--series-grace", "30"]);
    let port = free_port();
    let router = Command::new(bin)
        .args(["--models-dir", path(&models), "--host", "127.0.0.1"])
        .args(["--port", &port.to_string(), "-c", "512", "-t", "2"])
        .envs(&f.env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut router = Server {
        child: router,
        port,
    };
    wait_healthy(port, &mut router.child);
    d.wait_line("traced", router.child.id());

    // Each model's first request starts its child; the child is traced from its exec, with
    // the model it loads.
    let mut usage = HashMap::new();
    for (m, n) in [("tiny-a", 5u32), ("tiny-b", 7)] {
        let r = routed_completion(port, m, &format!("router prompt for {m}"), n);
        usage.insert(m, r["usage"].clone());
    }
    // Started by one of the router's threads: the children of all its tasks.
    let children: Vec<u32> = std::fs::read_dir(format!("/proc/{}/task", router.child.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    assert_eq!(children.len(), 2, "router children: {children:?}");
    for pid in &children {
        d.wait_line("traced", *pid);
    }
    let t0 = Instant::now();
    let m = loop {
        let m = d.metrics();
        let done = ["tiny-a", "tiny-b"].iter().all(|model| {
            sum_of(
                &m,
                "llamacpp_request_generated_tokens_count",
                &format!("model=\"{model}\""),
            ) >= 1.0
        });
        if done || t0.elapsed() > Duration::from_secs(20) {
            break m;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for (model, u) in &usage {
        let of = |name: &str| sum_of(&m, name, &format!("model=\"{model}\""));
        assert_eq!(
            of("llamacpp_request_generated_tokens_count"),
            1.0,
            "{model}"
        );
        assert_eq!(
            of("llamacpp_request_generated_tokens_sum"),
            u["completion_tokens"].as_f64().unwrap(),
            "generated tokens of {model}"
        );
        assert_eq!(
            of("llamacpp_request_prompt_tokens_sum"),
            u["prompt_tokens"].as_f64().unwrap(),
            "prompt tokens of {model}"
        );
        // One child per model, and its series are its own.
        let pids: std::collections::HashSet<&str> = m
            .keys()
            .filter(|k| k.starts_with("llamacpp_request_generated_tokens_count{"))
            .filter(|k| k.contains(&format!("model=\"{model}\"")))
            .filter_map(|k| k.split("pid=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(pids.len(), 1, "{model}: {pids:?}");
        let pid: u32 = pids.into_iter().next().unwrap().parse().unwrap();
        assert!(
            children.contains(&pid),
            "{model} served by {pid}, not a child"
        );
    }
    // The router stops its children.
    for pid in &children {
        unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
    }
    drop(router);
    for pid in &children {
        d.wait_line("released", *pid);
    }
    let (code, _) = d.probe.terminate();
    assert_eq!(code, 0);
}

/// A program that loads its binding (and with it llama.cpp, by dlopen) after the daemon saw it
/// start, for both bindings: node-llama-cpp (npm, classic) and gpt4all (PyPI, the 2024
/// generation). The rescan finds the library (its model, loaded before that, is recovered
/// from the process's mappings), and the requests have the binding's own counts.
#[test]
fn daemon_finds_a_program_that_loads_libllama_after_it_started() {
    use crate::embedders::{Binding, BindingScript};
    let test = "daemon_finds_a_program_that_loads_libllama_after_it_started";
    if !root_or_skip(test) {
        return;
    }
    let Some(model) = crate::common::fixtures::model(test) else {
        return;
    };
    let _serial = serial();
    for binding in Binding::ALL {
        let Some(f) = binding.fixture(test) else {
            continue;
        };
        eprintln!("== {binding:?}");
        let dir = scratch(&format!("{test}-{}", binding.name()));
        let events = dir.join("events.jsonl");
        let include = format!("exe:{}", binding.exe(&f));
        let mut d = Daemon::start(&[
            "--include",
            &include,
            "--rescan",
            "1",
            "--events-out",
            path(&events),
        ]);
        let mut script =
            BindingScript::start(binding, &f, &dir, &model, &[("WAIT_BEFORE_LOAD", "1")]);
        let pid = script.pid("started");
        // Running, libllama not loaded: not traced. Then it loads the binding.
        assert!(!d
            .probe
            .lines
            .iter()
            .any(|l| l.contains(&format!("traced pid={pid}"))));
        script.send(b"load\n", false);
        script.pid("ready");
        d.wait_line("traced", pid);
        // gpt4all maps each of its llama.cpp builds in turn and uses one: a look in the middle
        // of that is traced with some, and the rest are probed at the next looks. The
        // completions come after a rescan that saw them all.
        d.wait_rescan();
        script.send(b"go\n", true);
        let done = script.completions();
        assert!(script.wait().success());
        d.wait_line("released", pid);
        let (code, _) = d.probe.terminate();
        assert_eq!(code, 0);
        let events = json_lines(&events);
        let mine = |kind: &str| -> Vec<&serde_json::Value> {
            of_kind(&events, kind)
                .into_iter()
                .filter(|r| r["pid"] == pid || r["origin"]["pid"] == pid)
                .collect()
        };
        let mut requests = mine("request");
        requests.sort_by_key(|r| r["start_ns"].as_u64());
        let got: Vec<u64> = requests
            .iter()
            .map(|r| r["generated_tokens"].as_u64().unwrap())
            .collect();
        let generated: Vec<u64> = done.iter().map(|d| d.generated).collect();
        assert_eq!(got, generated, "{binding:?}: {requests:?}");
        // The model was loaded before the rescan found the library: recovered from the
        // process's mappings.
        let facts = mine("model_info");
        let file = std::fs::canonicalize(&model).unwrap();
        assert!(
            facts
                .iter()
                .any(|m| m["info"]["path"] == file.to_string_lossy().as_ref()),
            "{binding:?}: {facts:?}"
        );
    }
}

/// A process traced in the middle of a burst of llama.cpp libraries (gpt4all dlopens each of
/// its builds in turn and uses one): the library it maps just after it was traced is probed by
/// the looks that follow a trace, not left to the next rescan (an hour away here), and every
/// call through it is seen.
#[test]
fn daemon_probes_a_library_mapped_just_after_the_process_was_traced() {
    use std::io::{BufRead as _, BufReader, Write as _};
    if !root_or_skip("daemon_probes_a_library_mapped_just_after_the_process_was_traced") {
        return;
    }
    let _serial = serial();
    let dir = scratch("daemon-burst");
    let exe = dir.join("burst_loader");
    std::fs::copy(fakes().join("classic/loader_burst"), &exe).unwrap();
    let libs: Vec<_> = ["a", "b"]
        .iter()
        .map(|name| {
            let lib = dir.join(name).join("libllama.so");
            std::fs::create_dir_all(lib.parent().unwrap()).unwrap();
            std::fs::copy(fakes().join("classic/libllama.so"), &lib).unwrap();
            lib
        })
        .collect();
    let events = dir.join("events.jsonl");
    let mut d = Daemon::start(&[
        "--include",
        "exe:burst_loader",
        "--rescan",
        "3600",
        "--events-out",
        path(&events),
    ]);
    const DECODES: usize = 7;
    let mut child = Command::new(&exe)
        .args([path(&libs[0]), path(&libs[1]), &DECODES.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut said = |want: &str| {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(
            line.starts_with(want),
            "the loader said {line:?}, not {want:?}"
        );
        line
    };
    let pid: u32 = said("started pid=")
        .trim()
        .strip_prefix("started pid=")
        .unwrap()
        .parse()
        .unwrap();
    stdin.write_all(b"a").unwrap();
    said("loaded a");
    // Found by the looks after its exec, with the first library only.
    d.wait_line("traced", pid);
    stdin.write_all(b"b").unwrap();
    said("loaded b");
    let added = d.wait_line("probes added", pid);
    assert!(added.contains("files=1"), "{added}");
    stdin.write_all(b"c").unwrap();
    said(&format!("done decodes={DECODES}"));
    assert!(child.wait().unwrap().success());
    d.wait_line("released", pid);
    let (code, _) = d.probe.terminate();
    assert_eq!(code, 0);
    let decodes = of_kind(&json_lines(&events), "decode")
        .into_iter()
        .filter(|e| e["origin"]["pid"] == pid)
        .count();
    assert_eq!(decodes, DECODES);
}

/// A copy of the fake driver under `name`, started and waiting on stdin (its library mapped).
fn waiting_driver(dir: &std::path::Path, name: &str) -> std::process::Child {
    start_waiting(&driver_copy(dir, name))
}

/// The fake driver `exe` started, waiting on stdin.
fn start_waiting(exe: &std::path::Path) -> std::process::Child {
    held_driver(exe).0
}

#[test]
fn ps_lists_llama_cpp_processes_without_attaching() {
    if !root_or_skip("ps_lists_llama_cpp_processes_without_attaching") {
        return;
    }
    let dir = scratch("daemon-ps");
    let mut driver = waiting_driver(&dir, "ps_driver");
    let out = llamaprobe().args(["ps", "--json"]).output().unwrap();
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let _ = driver.kill();
    let _ = driver.wait();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let mine: Vec<_> = rows.iter().filter(|r| r["pid"] == driver.id()).collect();
    assert_eq!(mine.len(), 1, "{rows:?}");
    assert_eq!(mine[0]["exe"], "ps_driver");
    assert_eq!(mine[0]["generation"], "classic");
    assert_eq!(mine[0]["container_id"], "");
    // Nothing of llamaprobe stays in the process: no uprobe was ever attached by ps.
    let table = llamaprobe().arg("ps").output().unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).starts_with("     PID  EXE"));
}

#[test]
fn daemon_json_logs_carry_each_processs_identity() {
    if !root_or_skip("daemon_json_logs_carry_each_processs_identity") {
        return;
    }
    let _serial = serial();
    let dir = scratch("daemon-json");
    let mut driver = waiting_driver(&dir, "json_driver");
    let mut d = Daemon::start(&["--include", "exe:json_driver", "--log-format", "json"]);
    let pid = driver.id();
    let traced = loop {
        let line = d.probe.wait_for("\"traced\"");
        let v: serde_json::Value = serde_json::from_str(&line).expect(&line);
        if v["pid"] == pid {
            break v;
        }
    };
    assert_eq!(traced["level"], "INFO", "{traced}");
    assert_eq!(traced["exe"], "json_driver", "{traced}");
    assert_eq!(traced["generation"], "classic", "{traced}");
    let _ = driver.kill();
    let _ = driver.wait();
    let released = loop {
        let line = d.probe.wait_for("released");
        let v: serde_json::Value = serde_json::from_str(&line).expect(&line);
        if v["pid"] == pid {
            break v;
        }
    };
    assert_eq!(released["exe"], "json_driver", "{released}");
    // Every line the daemon wrote is one JSON object.
    for l in &d.probe.lines {
        assert!(serde_json::from_str::<serde_json::Value>(l).is_ok(), "{l}");
    }
    let (code, _) = d.probe.terminate();
    assert_eq!(code, 0);
}
