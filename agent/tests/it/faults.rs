//! The traced process is never hurt: llama-server's completions are byte-identical with and
//! without llamaprobe; `kill -9` of llamaprobe in the middle of a burst leaves every request
//! answered and nothing of llamaprobe in the kernel (its programs, maps and links, by the ids
//! its own file descriptors held), and a new llamaprobe counts exactly from then on; two
//! llamaprobe instances on one process both count exactly; a process killed or crashed inside
//! a probed call is reported with how it ended and the calls it was inside, and its threads'
//! entries are released.

use std::{collections::HashSet, time::Duration};

use serde_json::json;

use crate::common::{
    daemon,
    server::{
        attach, first_server, free_port, on_every_server, sum_of, wait_metrics, Probe, Server,
    },
    *,
};

/// What a fixed-seed, greedy, uncached completion of each prompt answers: (content, tokens).
fn answers(server: &Server) -> Vec<(String, u64)> {
    [
        "The capital of France is",
        "Count from one to ten:",
        "A poem about the sea",
    ]
    .iter()
    .map(|prompt| {
        let r = server.post(
            "/completion",
            &json!({"prompt": prompt, "n_predict": 24, "temperature": 0.0, "seed": 7,
                    "cache_prompt": false}),
        );
        (
            r["content"].as_str().unwrap().to_string(),
            r["tokens_predicted"].as_u64().unwrap(),
        )
    })
    .collect()
}

#[test]
fn completions_are_byte_identical_with_and_without_llamaprobe() {
    on_every_server(
        "completions_are_byte_identical_with_and_without_llamaprobe",
        |f, model| {
            let server = Server::start(f.server.as_ref().unwrap(), model, &f.env);
            let before = answers(&server);
            let probe = attach(f, &server, &[]);
            let traced = answers(&server);
            let (code, out) = probe.interrupt();
            assert_eq!(code, 0, "{out}");
            let after = answers(&server);
            let bytes: usize = before.iter().map(|(c, _)| c.len()).sum();
            eprintln!(
                "{}: {} completions, {bytes} bytes, the same before, while and after tracing",
                f.name,
                before.len()
            );
            assert!(bytes > 0);
            assert_eq!(traced, before, "traced");
            assert_eq!(after, before, "after detaching");
        },
    );
}

/// The ids of the BPF objects (programs, maps, links) a process holds file descriptors of,
/// from its `/proc/PID/fdinfo`.
fn bpf_ids(pid: u32) -> HashSet<(&'static str, u32)> {
    let mut ids = HashSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        for line in text.lines() {
            for kind in ["prog_id", "map_id", "link_id"] {
                if let Some(v) = line.strip_prefix(kind).and_then(|r| r.strip_prefix(':')) {
                    if let Ok(id) = v.trim().parse() {
                        ids.insert((kind, id));
                    }
                }
            }
        }
    }
    ids
}

/// The ids of every BPF program, map and link the kernel holds now.
fn kernel_bpf_ids() -> HashSet<(&'static str, u32)> {
    let progs = aya::programs::loaded_programs()
        .flatten()
        .map(|p| ("prog_id", p.id()));
    let maps = aya::maps::loaded_maps()
        .flatten()
        .map(|m| ("map_id", m.id()));
    let links = aya::programs::loaded_links()
        .flatten()
        .map(|l| ("link_id", l.id()));
    progs.chain(maps).chain(links).collect()
}

/// Completions sent at once, each to generate exactly `n` tokens; their token counts.
fn burst(port: u16, requests: usize, n: u32) -> Vec<std::thread::JoinHandle<u64>> {
    (0..requests)
        .map(|i| {
            std::thread::spawn(move || {
                let mut r = server::http()
                    .post(&format!("http://127.0.0.1:{port}/completion"))
                    .send_json(json!({"prompt": format!("burst {i}"), "n_predict": n,
                                      "ignore_eos": true, "seed": 1}))
                    .expect("completion during the kill");
                let v: Value = r.body_mut().read_json().unwrap();
                v["tokens_predicted"].as_u64().unwrap()
            })
        })
        .collect()
}

#[test]
fn agent_killed_mid_burst_leaves_requests_answered_and_nothing_in_the_kernel() {
    let Some((f, model, _serial)) =
        first_server("agent_killed_mid_burst_leaves_requests_answered_and_nothing_in_the_kernel")
    else {
        return;
    };
    let server = Server::start(f.server.as_ref().unwrap(), &model, &f.env);
    let port = free_port();
    let mut probe = attach(
        &f,
        &server,
        &["--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    let held = bpf_ids(probe.child.id());
    assert!(
        held.iter().any(|(k, _)| *k == "prog_id") && held.iter().any(|(k, _)| *k == "map_id"),
        "llamaprobe holds no BPF program or map: {held:?}"
    );
    let requests = burst(server.port, 8, 96);
    // In the middle of the burst: some steps were counted, others are to come.
    wait_metrics(port, |m| {
        sum_of(m, "llamacpp_decode_calls_total", "") >= 20.0
    });
    probe.child.kill().unwrap();
    probe.child.wait().unwrap();
    let tokens: Vec<u64> = requests.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(tokens, vec![96; 8], "every request answered in full");
    // The kernel frees what the agent's descriptors held once they are closed (programs and
    // maps after an RCU grace period).
    let t0 = std::time::Instant::now();
    let left = loop {
        let left: Vec<_> = held.intersection(&kernel_bpf_ids()).copied().collect();
        if left.is_empty() || t0.elapsed() > Duration::from_secs(10) {
            break left;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        left.is_empty(),
        "left in the kernel after kill -9: {left:?}"
    );
    eprintln!("{} BPF objects held, none left", held.len());

    // A new llamaprobe counts exactly from its start.
    let base = server.settled_metrics();
    let port = free_port();
    let probe = attach(
        &f,
        &server,
        &["--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    for i in 0..3 {
        server::completion(server.port, &format!("after the kill {i}"), 8);
    }
    let now = server.settled_metrics();
    let delta = |k: &str| now[&format!("llamacpp:{k}")] - base[&format!("llamacpp:{k}")];
    let ours = wait_metrics(port, |m| {
        sum_of(m, "llamacpp_decode_calls_total", "") >= delta("n_decode_total")
    });
    assert_eq!(
        sum_of(&ours, "llamacpp_decode_calls_total", ""),
        delta("n_decode_total")
    );
    assert_eq!(
        sum_of(&ours, "llamacpp_tokens_total", "kind=\"generated\""),
        delta("tokens_predicted_total")
    );
    let (code, out) = probe.interrupt();
    assert_eq!(code, 0, "{out}");
}

#[test]
fn two_instances_on_one_process_both_count_exactly() {
    let Some((f, model, _serial)) = first_server("two_instances_on_one_process_both_count_exactly")
    else {
        return;
    };
    let server = Server::start(f.server.as_ref().unwrap(), &model, &f.env);
    let ports = [free_port(), free_port()];
    let probes: Vec<_> = ports
        .iter()
        .map(|p| attach(&f, &server, &["--metrics-addr", &format!("127.0.0.1:{p}")]))
        .collect();
    let base = server.settled_metrics();
    let requests = burst(server.port, 4, 16);
    for h in requests {
        assert_eq!(h.join().unwrap(), 16);
    }
    server::completion(server.port, "one more, alone", 8);
    let now = server.settled_metrics();
    let delta = |k: &str| now[&format!("llamacpp:{k}")] - base[&format!("llamacpp:{k}")];
    for port in ports {
        let ours = wait_metrics(port, |m| {
            sum_of(m, "llamacpp_decode_calls_total", "") >= delta("n_decode_total")
        });
        assert_eq!(
            sum_of(&ours, "llamacpp_decode_calls_total", ""),
            delta("n_decode_total"),
            "decode steps seen by the instance on :{port}"
        );
        assert_eq!(
            sum_of(&ours, "llamacpp_tokens_total", "kind=\"prompt\""),
            delta("prompt_tokens_total")
        );
        assert_eq!(
            sum_of(&ours, "llamacpp_tokens_total", "kind=\"generated\""),
            delta("tokens_predicted_total")
        );
        assert_eq!(
            sum_of(&ours, "llamacpp_request_duration_seconds_count", ""),
            5.0
        );
    }
    for p in probes {
        let (code, out) = p.interrupt();
        assert_eq!(code, 0, "{out}");
    }
}

/// The storm target (agent/tests/storm/storm.c) on the benchmark's synthetic libllama.so,
/// compiled once.
fn storm_bin() -> &'static std::path::Path {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("storm");
        std::fs::create_dir_all(&out).unwrap();
        let gcc = |args: &[&std::ffi::OsStr]| {
            let st = std::process::Command::new("gcc")
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "gcc {args:?}");
        };
        let lib = root.join("../xtask/assets/bench/libllama.c");
        let so = out.join("libllama.so");
        gcc(&[
            "-O2".as_ref(),
            "-fPIC".as_ref(),
            "-shared".as_ref(),
            "-Wl,-soname,libllama.so".as_ref(),
            "-o".as_ref(),
            so.as_os_str(),
            lib.as_os_str(),
        ]);
        let bin = out.join("storm");
        let src = root.join("tests/storm/storm.c");
        gcc(&[
            "-O2".as_ref(),
            "-pthread".as_ref(),
            "-o".as_ref(),
            bin.as_os_str(),
            src.as_os_str(),
            "-L".as_ref(),
            out.as_os_str(),
            "-lllama".as_ref(),
            "-Wl,-rpath,$ORIGIN".as_ref(),
        ]);
        bin
    })
}

/// A process's CPU time (user + system) in seconds, and its peak resident memory in KiB.
fn cpu_and_peak_rss(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime), counted from 1 at the pid.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    (ticks / hz, hwm)
}

/// Two threads call a probed function as fast as they can for 10 s while llamaprobe is
/// stopped (SIGSTOP) for 4 s of it: the target is never held up (it ends its storm while the
/// agent cannot read), every call is either counted or counted as lost (ring buffer full),
/// and once the storm is over a calm 1000 calls are counted exactly with none lost. The
/// agent's CPU time and peak memory over the storm are printed (figures for BENCHMARKS.md,
/// not limits).
#[test]
fn an_event_storm_is_dropped_and_counted_and_counts_are_exact_after_it() {
    use std::io::{BufRead, BufReader, Write};
    let test = "an_event_storm_is_dropped_and_counted_and_counts_are_exact_after_it";
    if !root_or_skip(test) {
        return;
    }
    let _serial = serial();
    let mut target = std::process::Command::new(storm_bin())
        .args(["2", "10", "1000"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = target.stdin.take().unwrap();
    let mut lines = BufReader::new(target.stdout.take().unwrap()).lines();
    let mut next = || lines.next().unwrap().unwrap();
    assert_eq!(next(), "ready");
    let port = free_port();
    let mut cmd = llamaprobe();
    cmd.args(["attach", "--pid", &target.id().to_string(), "--quiet"])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")]);
    let mut probe = server::Probe::spawn(&mut cmd);
    probe.wait_for("probes attached");
    let agent = probe.child.id();
    let counted = |m: &std::collections::HashMap<String, f64>| {
        (
            sum_of(m, "llamacpp_decode_calls_total", ""),
            sum_of(m, "llamaprobe_events_lost_total", ""),
        )
    };
    let (cpu0, _) = cpu_and_peak_rss(agent);

    writeln!(input).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent as i32, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(4));
    // SAFETY: as above.
    unsafe { libc::kill(agent as i32, libc::SIGCONT) };
    let storm: f64 = next()
        .strip_prefix("storm calls=")
        .unwrap()
        .parse()
        .unwrap();
    let m = wait_metrics(port, |m| {
        let (c, l) = counted(m);
        c + l >= storm
    });
    let (storm_counted, storm_lost) = counted(&m);
    let (cpu1, peak_kib) = cpu_and_peak_rss(agent);
    eprintln!(
        "storm: {storm} calls in 10 s ({:.0}/s), {storm_counted} counted, {storm_lost} lost \
         (ring buffer full {}); llamaprobe {:.2} s CPU ({:.2} µs per call), peak RSS {} MiB",
        storm / 10.0,
        sum_of(&m, "llamaprobe_events_lost_total", "ringbuf_full"),
        cpu1 - cpu0,
        (cpu1 - cpu0) * 1e6 / storm,
        peak_kib / 1024
    );
    assert_eq!(
        storm_counted + storm_lost,
        storm,
        "every call counted or lost"
    );
    assert!(
        storm_lost > 0.0,
        "the agent was stopped for 4 s: some events must be lost"
    );
    assert_eq!(
        storm_lost,
        sum_of(&m, "llamaprobe_events_lost_total", "ringbuf_full"),
        "lost because the ring buffer was full"
    );

    writeln!(input).unwrap();
    assert_eq!(next(), "calm calls=1000");
    let m = wait_metrics(port, |m| counted(m).0 >= storm_counted + 1000.0);
    assert_eq!(
        counted(&m),
        (storm_counted + 1000.0, storm_lost),
        "the calm calls"
    );
    writeln!(input).unwrap();
    assert!(target.wait().unwrap().success());
    let (code, out) = probe.finish();
    assert_eq!(code, 0, "{out}");
}

/// The tids of `tgid`'s threads with a decode call in progress in the `DECODE_ENTRY` map of
/// the llamaprobe `agent` (found by the map ids its file descriptors hold).
fn decode_entries(agent: u32, tgid: u32) -> Vec<u32> {
    const SIZE: usize = std::mem::size_of::<probe_common::DecodeEvent>();
    let mut tids = Vec::new();
    for (kind, id) in bpf_ids(agent) {
        if kind != "map_id" {
            continue;
        }
        let Ok(info) = aya::maps::MapInfo::from_id(id) else {
            continue;
        };
        if info.name_as_str() != Some("DECODE_ENTRY") {
            continue;
        }
        let data = aya::maps::MapData::from_id(id).unwrap();
        let map: aya::maps::HashMap<_, u32, [u8; SIZE]> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
        for (tid, ev) in map.iter().flatten() {
            // EventHeader: kind, tgid, tid, …
            if u32::from_ne_bytes(ev[4..8].try_into().unwrap()) == tgid {
                tids.push(tid);
            }
        }
    }
    tids.sort_unstable();
    tids
}

/// `driver_ending MODE…` (agent/tests/fake/driver_ending.c) copied into `dir` as `name`, started
/// and held before its first call; it dumps no core (RLIMIT_CORE 0, so its status is exact).
fn ending_driver(dir: &std::path::Path, name: &str, mode: &[&str]) -> (std::process::Child, u32) {
    use std::{io::BufRead, os::unix::process::CommandExt};
    let exe = dir.join(name);
    std::fs::copy(fakes().join("classic/driver_ending"), &exe).unwrap();
    std::fs::copy(fakes().join("classic/libllama.so"), dir.join("libllama.so")).unwrap();
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(mode)
        .env("FAKE_WAIT_STDIN", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid = line
        .trim()
        .strip_prefix("ready pid=")
        .unwrap_or_else(|| panic!("driver said {line:?}"))
        .parse()
        .unwrap();
    (child, pid)
}

/// Lets a held driver go (one byte on its stdin).
fn release_driver(child: &mut std::process::Child) {
    use std::io::Write;
    child.stdin.as_mut().unwrap().write_all(b"x").unwrap();
}

/// `attach` to a program that crashes inside `llama_decode` (SIGSEGV on its main thread) and to
/// one that exits with status 3: llamaprobe ends with its summary, which says how the process
/// ended, as its parent (this test) saw it, and which call it was inside.
#[test]
fn attach_reports_how_the_process_ended_and_the_call_it_was_inside() {
    let test = "attach_reports_how_the_process_ended_and_the_call_it_was_inside";
    if !root_or_skip(test) {
        return;
    }
    let dir = scratch("ending-attach");
    for (mode, status, said, interrupted) in [
        (
            &["segv"][..],
            json!({"how": "killed", "signal": 11, "signal_name": "SIGSEGV", "core_dumped": false}),
            "the process was killed by SIGSEGV (signal 11) inside a decode call",
            json!([{"call": "decode", "threads": 1}]),
        ),
        (
            &["exit", "3"][..],
            json!({"how": "exited", "status": 3}),
            "the process exited with status 3",
            json!([]),
        ),
    ] {
        let (mut child, pid) = ending_driver(&dir, "ending_attach", mode);
        let summary = dir.join(format!("summary-{}.json", mode[0]));
        let mut probe = Probe::spawn(llamaprobe().args([
            "attach",
            "--pid",
            &pid.to_string(),
            "--quiet",
            "--metrics-addr",
            "off",
            "--summary-json",
            server::path(&summary),
        ]));
        probe.wait_for("probes attached");
        release_driver(&mut child);
        let st = child.wait().unwrap();
        let (code, out) = probe.finish();
        assert_eq!(code, 0, "{out}");
        use std::os::unix::process::ExitStatusExt;
        match mode[0] {
            "segv" => assert_eq!(st.signal(), Some(libc::SIGSEGV), "{st:?}"),
            _ => assert_eq!(st.code(), Some(3), "{st:?}"),
        }
        assert!(out.contains(said), "{out}");
        let v = json(&summary);
        assert_eq!(v["ended"]["status"], status, "{v}");
        assert_eq!(v["ended"]["interrupted"], interrupted, "{v}");
        assert_eq!(v["ended"]["pid"], pid, "{v}");
        // The step that returned is counted; the one it died in is not a step.
        assert_eq!(v["decode_calls"], 1, "{v}");
    }
}

/// The host agent, a program killed (SIGKILL) while two of its threads are inside
/// `llama_decode`: the daemon says so (log line, `llamaprobe_processes_ended_total` and
/// `llamaprobe_calls_interrupted_total`), the probes' entries of both threads are gone from the
/// kernel's map, and it goes on tracing: a next program's exit status is reported too.
#[test]
fn the_host_agent_reports_a_kill_inside_two_decode_calls_and_releases_their_entries() {
    let test = "the_host_agent_reports_a_kill_inside_two_decode_calls_and_releases_their_entries";
    if !root_or_skip(test) {
        return;
    }
    let dir = scratch("ending-daemon");
    let mut d = daemon::Daemon::start(&["--include", "exe:ending_daemon", "--series-grace", "1"]);
    let agent = d.probe.child.id();
    let (mut child, pid) = ending_driver(&dir, "ending_daemon", &["hang"]);
    d.wait_line("traced", pid);
    release_driver(&mut child);
    // Both threads are inside llama_decode (10 s each) once both entries are in the map.
    let t0 = std::time::Instant::now();
    let inside = loop {
        let tids = decode_entries(agent, pid);
        if tids.len() == 2 || t0.elapsed() > Duration::from_secs(30) {
            break tids;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        inside.len(),
        2,
        "entries of the two decoding threads: {inside:?}"
    );
    assert!(inside.contains(&pid), "{inside:?}");
    child.kill().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    let line = d.wait_line("released", pid);
    assert!(
        line.contains("was killed by SIGKILL (signal 9) inside 2 decode calls"),
        "{line}"
    );
    assert_eq!(
        decode_entries(agent, pid),
        Vec::<u32>::new(),
        "entries left"
    );
    let m = d.metrics();
    assert_eq!(
        sum_of(
            &m,
            "llamaprobe_processes_ended_total",
            "cause=\"SIGKILL\",how=\"killed\""
        ),
        1.0
    );
    assert_eq!(
        sum_of(&m, "llamaprobe_calls_interrupted_total", "call=\"decode\""),
        2.0
    );
    assert_eq!(sum_of(&m, "llamaprobe_calls_interrupted_total", ""), 2.0);

    // Still tracing: the next program's steps and its exit status.
    let (mut child, pid) = ending_driver(&dir, "ending_daemon", &["exit", "3"]);
    d.wait_line("traced", pid);
    release_driver(&mut child);
    assert_eq!(child.wait().unwrap().code(), Some(3));
    let line = d.wait_line("released", pid);
    assert!(line.contains("the process exited with status 3"), "{line}");
    let m = d.metrics();
    assert_eq!(
        sum_of(
            &m,
            "llamaprobe_processes_ended_total",
            "cause=\"3\",how=\"exited\""
        ),
        1.0
    );
    assert_eq!(sum_of(&m, "llamaprobe_processes_ended_total", ""), 2.0);
    assert_eq!(sum_of(&m, "llamaprobe_calls_interrupted_total", ""), 2.0);
    assert_eq!(
        server::get(&format!("http://127.0.0.1:{}/healthz", d.port)).as_deref(),
        Some("ok\n")
    );
    let (code, out) = d.probe.terminate();
    assert_eq!(code, 0, "{out}");
}

/// A real llama-server killed (SIGKILL) inside a decode step, in the middle of a burst, under
/// the host agent. To kill it inside a step for certain, the test waits for its decode entry in
/// the probes' map, stops the server (SIGSTOP), and kills it only if the entry is still there
/// with every thread stopped (a stopped thread cannot return from the call).
#[test]
fn a_llama_server_killed_inside_a_decode_step_is_reported_by_the_host_agent() {
    let Some((f, model, _serial)) =
        first_server("a_llama_server_killed_inside_a_decode_step_is_reported_by_the_host_agent")
    else {
        return;
    };
    let mut d = daemon::Daemon::start(&["--include", "exe:llama-server", "--series-grace", "1"]);
    let agent = d.probe.child.id();
    let mut server = Server::start(f.server.as_ref().unwrap(), &model, &f.env);
    let pid = server.child.id();
    d.wait_line("traced", pid);
    let stopped = |tid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).is_ok_and(|s| {
            s[s.rfind(')').unwrap() + 2..].starts_with('t')
                || s[s.rfind(')').unwrap() + 2..].starts_with('T')
        })
    };
    let _requests: Vec<_> = (0..4)
        .map(|i| {
            let port = server.port;
            std::thread::spawn(move || {
                // Cut off by the kill: what it answers does not matter here.
                let _ = server::http()
                    .post(&format!("http://127.0.0.1:{port}/completion"))
                    .send_json(json!({"prompt": format!("killed {i}"), "n_predict": 4096,
                                      "ignore_eos": true}));
            })
        })
        .collect();
    let t0 = std::time::Instant::now();
    let (inside, tries) = 'caught: {
        for tries in 1.. {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "never caught the server inside a decode step"
            );
            if decode_entries(agent, pid).is_empty() {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
            let tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect();
            while !tids.iter().all(|&t| stopped(t)) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let inside = decode_entries(agent, pid);
            if !inside.is_empty() {
                break 'caught (inside, tries);
            }
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        }
        unreachable!()
    };
    eprintln!("caught inside a decode step at try {tries}: threads {inside:?}");
    assert_eq!(inside.len(), 1, "one thread decodes: {inside:?}");
    server.child.kill().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(server.child.wait().unwrap().signal(), Some(libc::SIGKILL));
    let line = d.wait_line("released", pid);
    assert!(
        line.contains("was killed by SIGKILL (signal 9) inside a decode call"),
        "{line}"
    );
    assert_eq!(decode_entries(agent, pid), Vec::<u32>::new(), "entry left");
    let m = d.metrics();
    assert_eq!(
        sum_of(
            &m,
            "llamaprobe_processes_ended_total",
            "cause=\"SIGKILL\",how=\"killed\""
        ),
        1.0
    );
    assert_eq!(sum_of(&m, "llamaprobe_calls_interrupted_total", ""), 1.0);
    let (code, out) = d.probe.terminate();
    assert_eq!(code, 0, "{out}");
}
