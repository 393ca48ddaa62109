//! Resources beside the probes: GGUF metadata of the real tiny model, procfs sampling, finding
//! the model of a running process, and GPU metrics through a FAKE `libnvidia-ml.so` built here
//! from `tests/nvml_fake/fake_nvml.c` (no GPU or driver is needed; the `fake_gpu_` tests say
//! so in their names).
//!
//! Tests that need a changed environment (the fake NVML reads `FAKE_NVML_PID` and
//! `FAKE_NVML_FAIL`) or a process holding a mapped file run this test binary again as a child
//! process, on one `#[ignore]`d test that does nothing unless its variable is set.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use crate::common::otlp_receiver::{grpc_receiver, number_points, Point, PointValue};
use crate::common::{
    fakes, fixture_or_skip, llamaprobe, root_or_skip, serial,
    server::{free_port, Probe},
};
use llamaprobe::{
    model::{self as nvml_types, FileType, GpuSample, ModelInfo, ProcessReading, Snapshot},
    sinks::prometheus::resources::ResourceSeries,
    sources::{
        self as resources,
        gguf::{self, writer::Writer},
        model_path::{self, Source},
        nvml, procfs, Sampler,
    },
};

/// The agent's two halves of resource metrics, as a session joins them each tick: the
/// readings ([`Sampler`]) and their Prometheus series ([`ResourceSeries`]).
struct ResourceSampler {
    sampler: Sampler,
    series: ResourceSeries,
    latest: Option<std::sync::Arc<Vec<GpuSample>>>,
}

/// The readings of the latest round, as the other exporters get them.
struct Latest(std::sync::Arc<Vec<GpuSample>>);

impl Latest {
    fn latest(&self) -> std::sync::Arc<Vec<GpuSample>> {
        self.0.clone()
    }
}

impl ResourceSampler {
    fn new(registry: &Registry, nvml_lib: Option<PathBuf>) -> Self {
        Self {
            sampler: Sampler::new(nvml_lib),
            series: ResourceSeries::new(registry),
            latest: None,
        }
    }

    fn gpu_status(&self) -> &str {
        self.sampler.gpu_status()
    }

    fn set_model(&mut self, pid: u32, label: &str, info: &ModelInfo) {
        self.series.set_model(pid, label, info);
    }

    fn sample(&mut self, pids: &[u32], label: impl Fn(u32) -> String) {
        let (gpus, processes) = self.sampler.sample(pids);
        let gpus = std::sync::Arc::new(gpus);
        self.series.update(&Snapshot {
            gpus: gpus.clone(),
            processes: processes
                .into_iter()
                .map(|(pid, sample)| ProcessReading {
                    pid,
                    model: label(pid).into(),
                    sample,
                    requests_active: 0,
                    tasks_waiting: 0,
                })
                .collect(),
            ..Default::default()
        });
        self.latest = Some(gpus);
    }

    /// The latest readings, or `None` without GPUs (nothing to hand on).
    fn gpu_feed(&self) -> Option<Latest> {
        self.sampler
            .has_gpus()
            .then(|| Latest(self.latest.clone().unwrap_or_default()))
    }
}
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prometheus::{Encoder, Registry, TextEncoder};

// ---------------------------------------------------------------------------------------------
// helpers

/// A fresh scratch directory for one test, under `resources/`.
fn scratch(name: &str) -> PathBuf {
    crate::common::scratch(&format!("resources/{name}"))
}

fn render(r: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut buf).unwrap();
    String::from_utf8(buf).unwrap()
}

/// The sample lines of the text exposition (no comments).
fn samples(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with('#')).collect()
}

/// This test binary run again on one ignored test, with `envs`; its output.
fn run_child(test: &str, envs: &[(&str, &str)]) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args([
            &format!("resources::{test}"),
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_remove("FAKE_NVML_FAIL")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn check_child(out: &std::process::Output, test: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "child {test} failed ({:?})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    // The filter matched the test and the test ran (rather than nothing matching).
    assert!(
        stdout.contains("1 passed"),
        "child {test} did not run\n{stdout}"
    );
}

// ---------------------------------------------------------------------------------------------
// GGUF: the real tiny model written by xtask/assets/make_tiny_model.py

/// The vocabulary size make_tiny_model.py builds, computed from the script's own word list:
/// 3 special tokens, 256 byte tokens, then the distinct pieces "▁", printable ASCII 0x21-0x7E,
/// and every prefix of "▁word" from two characters on.
fn tiny_vocab_size() -> u64 {
    let script = include_str!("../../../xtask/assets/make_tiny_model.py");
    let words = script
        .split_once("WORDS = \"\"\"")
        .and_then(|(_, rest)| rest.split_once("\"\"\""))
        .map(|(w, _)| w)
        .expect("WORDS in make_tiny_model.py");
    let mut pieces: Vec<String> = vec!["\u{2581}".into()];
    pieces.extend((0x21u8..0x7f).map(|c| (c as char).to_string()));
    for word in words.split_whitespace() {
        let full: Vec<char> = format!("\u{2581}{word}").chars().collect();
        for i in 2..=full.len() {
            pieces.push(full[..i].iter().collect());
        }
    }
    let mut seen = std::collections::HashSet::new();
    pieces.retain(|p| seen.insert(p.clone()));
    3 + 256 + pieces.len() as u64
}

/// Parameters of make_tiny_model.py's tensors for a shape.
fn tiny_parameters(n_vocab: u64, n_layer: u64, n_embd: u64, n_ff: u64) -> u64 {
    let (n_head, n_head_kv) = (4, 2); // the script's defaults
    let n_embd_kv = n_embd / n_head * n_head_kv;
    let per_layer = n_embd // attn_norm
        + n_embd * n_embd // attn_q
        + 2 * n_embd_kv * n_embd // attn_k, attn_v
        + n_embd * n_embd // attn_output
        + n_embd // ffn_norm
        + 3 * n_ff * n_embd; // ffn_gate, ffn_up, ffn_down
    n_vocab * n_embd // token_embd
        + n_layer * per_layer
        + n_embd // output_norm
        + n_vocab * n_embd // output
}

fn check_tiny_model(path: &Path, name: &str, n_layer: u64, n_embd: u64, n_ff: u64) {
    let n_vocab = tiny_vocab_size();
    let info = gguf::read(path).unwrap();
    assert_eq!(
        info,
        ModelInfo {
            path: path.to_path_buf(),
            architecture: Some("llama".into()),
            parameters: tiny_parameters(n_vocab, n_layer, n_embd, n_ff),
            file_type: Some(FileType(0)),
            context_length: Some(512),
            name: Some(name.into()),
            size_bytes: std::fs::metadata(path).unwrap().len(),
        }
    );
    assert_eq!(info.file_type.unwrap().to_string(), "F32");
    let (meta, _) = gguf::read_file(path).unwrap();
    assert_eq!(meta.version, 3);
    assert_eq!(meta.tensor_count, 2 + 9 * n_layer + 1);
    let u = |k: &str| meta.get(k).and_then(gguf::Value::as_u64);
    assert_eq!(u("llama.vocab_size"), Some(n_vocab));
    assert_eq!(u("llama.embedding_length"), Some(n_embd));
    assert_eq!(u("llama.block_count"), Some(n_layer));
    assert_eq!(u("llama.feed_forward_length"), Some(n_ff));
    assert_eq!(
        meta.get("tokenizer.ggml.tokens"),
        Some(&gguf::Value::Array {
            element: gguf::ValueType::String,
            len: n_vocab
        })
    );
}

#[test]
fn tiny_model_metadata_is_exact() {
    let Some(path) = fixture_or_skip("tiny_model_metadata_is_exact", "LLAMAPROBE_MODEL") else {
        return;
    };
    // make_tiny_model.py's defaults: 2 layers, n_embd 64, ff 128, ctx 512, f32.
    check_tiny_model(&path, "llamaprobe-tiny", 2, 64, 128);
    assert_eq!(tiny_parameters(tiny_vocab_size(), 2, 64, 128), 149_312);
}

/// Our GGUF reader against another one (the `gguf-rs-lib` crate, a dev-dependency): the same
/// version, tensor count, parameters and the keys llamaprobe reports, on the generated tiny model
/// (written by llama.cpp's own Python writer) and on a file written by our test writer.
#[test]
fn gguf_reader_agrees_with_gguf_rs_lib() {
    let Some(tiny) = fixture_or_skip("gguf_reader_agrees_with_gguf_rs_lib", "LLAMAPROBE_MODEL")
    else {
        return;
    };
    let dir = scratch("gguf-agree");
    let written = dir.join("written.gguf");
    write_model(&written);
    for path in [tiny.as_path(), written.as_path()] {
        let other = gguf_rs_lib::reader::GGUFFileReader::new(std::fs::File::open(path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (meta, _) = gguf::read_file(path).unwrap();
        let info = gguf::read(path).unwrap();
        assert_eq!(u64::from(meta.version), u64::from(other.header().version));
        assert_eq!(meta.tensor_count, other.tensor_count() as u64);
        let elements: u64 = other.tensor_infos().iter().map(|t| t.element_count()).sum();
        assert_eq!(info.parameters, elements, "{}", path.display());
        let m = other.metadata();
        assert_eq!(
            info.architecture.as_deref(),
            m.get_string("general.architecture")
        );
        assert_eq!(info.name.as_deref(), m.get_string("general.name"));
        assert_eq!(
            info.file_type.map(|t| u64::from(t.0)),
            m.get_u64("general.file_type")
        );
        let arch = info.architecture.clone().unwrap();
        assert_eq!(
            info.context_length,
            m.get_u64(&format!("{arch}.context_length"))
        );
    }
}

#[test]
fn tiny_large_model_metadata_is_exact() {
    // Optional: `cargo xtask fixtures` writes it only for some matrices.
    let Some(path) = std::env::var_os("LLAMAPROBE_MODEL_LARGE").map(PathBuf::from) else {
        eprintln!("SKIPPED tiny_large_model_metadata_is_exact: LLAMAPROBE_MODEL_LARGE not set");
        return;
    };
    // --large: 4 layers, n_embd 256, ff 512.
    check_tiny_model(&path, "llamaprobe-tiny-large", 4, 256, 512);
}

// ---------------------------------------------------------------------------------------------
// procfs

#[test]
fn procfs_samples_this_process() {
    let me = std::process::id();
    let a = procfs::sample(me).unwrap();
    assert!(a.threads >= 1, "{a:?}");
    assert!(a.rss_bytes > 0, "{a:?}");
    // Burn CPU until the kernel's tick-granular counter moves (at most 5 s).
    let start = Instant::now();
    let mut x: u64 = 1;
    let b = loop {
        for i in 0..2_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
        let b = procfs::sample(me).unwrap();
        if b.cpu_seconds > a.cpu_seconds || start.elapsed() > Duration::from_secs(5) {
            break b;
        }
    };
    assert!(b.cpu_seconds > a.cpu_seconds, "{a:?} then {b:?}");
    assert!(matches!(
        procfs::sample(4_999_999),
        Err(procfs::ProcError::NoSuchProcess { pid: 4_999_999 })
    ));
}

// ---------------------------------------------------------------------------------------------
// model_path: the model of a process that loaded it before we looked

/// A small GGUF model file.
fn write_model(path: &Path) -> u64 {
    let mut w = Writer::new();
    w.string("general.architecture", "llama")
        .string("general.name", "written by the test")
        .u32("general.file_type", 7)
        .u32("llama.context_length", 4096)
        .tensor("token_embd.weight", &[8, 32])
        .tensor("output_norm.weight", &[8]);
    std::fs::write(path, w.bytes(w.data_len())).unwrap();
    8 * 32 + 8
}

/// Waits (at most 5 s) until `pid` runs `comm`: before its exec a child is a copy of this
/// process, with its open files.
/// Waits until `pid` runs `comm` with its arguments in place: the kernel renames the task
/// before it sets up the new program's argument area, so a `cmdline` read in between is empty.
fn wait_exec(pid: u32, comm: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let ready = || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
            && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
    };
    while !ready() {
        assert!(Instant::now() < deadline, "pid {pid} did not exec {comm}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A child process (killed on drop).
struct Kid(Child);
impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const MMAP_CHILD: &str = "LLAMAPROBE_TEST_MMAP_CHILD";
const MAPPED: &str = "llamaprobe-test-child-mapped";

/// Child: maps the file named by $LLAMAPROBE_TEST_MMAP_CHILD, closes it (only the mapping is
/// left, as llama.cpp leaves it), says "mapped" and waits for its stdin to close.
#[test]
#[ignore = "helper run by model_file_of_a_process_is_found_in_its_mappings"]
fn mmap_child() {
    let Some(path) = std::env::var_os(MMAP_CHILD) else {
        return;
    };
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(&path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a read-only private mapping of a file we opened; never unmapped or touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    drop(f);
    // On the line where libtest wrote "test mmap_child ... ".
    println!("{MAPPED}");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn model_file_of_a_process_is_found_in_its_mappings() {
    let dir = scratch("mapped");
    let model = dir.join("mapped-model.gguf");
    let params = write_model(&model);
    let mut kid = Kid(Command::new(std::env::current_exe().unwrap())
        .args([
            "resources::mmap_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(MMAP_CHILD, &model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap());
    let mut out = BufReader::new(kid.0.stdout.take().unwrap());
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 && !line.trim_end().ends_with(MAPPED) {
        line.clear();
    }
    assert!(
        line.trim_end().ends_with(MAPPED),
        "the child did not map the file"
    );
    let pid = kid.0.id();

    let found = model_path::find(pid).unwrap();
    let model = std::fs::canonicalize(&model).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].source, Source::Mapped);
    assert_eq!(found[0].path, model);
    // Read through the mapping itself, not the path.
    assert!(
        found[0]
            .object
            .as_ref()
            .is_some_and(|o| o.starts_with(format!("/proc/{pid}/map_files/"))),
        "{found:?}"
    );
    assert_eq!(
        found[0].inode,
        Some(std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(&model).unwrap()
        ))
    );
    assert_eq!(found[0].label(), "mapped-model");

    let (_, info) = resources::recover_model(pid).unwrap().unwrap();
    assert_eq!(info.path, model);
    assert_eq!(info.architecture.as_deref(), Some("llama"));
    assert_eq!(
        info.file_type.map(|t| t.to_string()).as_deref(),
        Some("Q8_0")
    );
    assert_eq!(info.context_length, Some(4096));
    assert_eq!(info.parameters, params);
}

#[test]
fn model_file_of_a_process_is_found_among_its_open_files() {
    let dir = scratch("open");
    let model = dir.join("open-model.gguf");
    write_model(&model);
    // `sleep` with the model as its stdin: open, not mapped (as with --no-mmap while loading).
    let kid = Kid(Command::new("sleep")
        .arg("30")
        .stdin(std::fs::File::open(&model).unwrap())
        .spawn()
        .unwrap());
    let pid = kid.0.id();
    wait_exec(pid, "sleep");
    let found = model_path::find(pid).unwrap();
    let model = std::fs::canonicalize(&model).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].source, Source::Open);
    assert_eq!(found[0].path, model);
    // Read through the process's descriptor (its stdin), not the path.
    assert_eq!(
        found[0].object,
        Some(PathBuf::from(format!("/proc/{pid}/fd/0")))
    );
}

#[test]
fn model_file_of_a_process_is_found_in_its_command_line() {
    let dir = scratch("argument");
    std::fs::create_dir_all(dir.join("models")).unwrap();
    write_model(&dir.join("models/arg-model.gguf"));
    // A shell waiting on a builtin, started as `llama-server -m models/arg-model.gguf` from
    // `dir`: the model is neither mapped nor open, and the path is relative.
    let kid = Kid(Command::new("sh")
        .args([
            "-c",
            "read x",
            "llama-server",
            "-m",
            "models/arg-model.gguf",
        ])
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap());
    let pid = kid.0.id();
    wait_exec(pid, "sh");
    let found = model_path::find(pid).unwrap();
    let dir = std::fs::canonicalize(&dir).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].source, Source::Argument);
    assert_eq!(found[0].path, dir.join("models/arg-model.gguf"));
    // Opened inside the process's root, from its working directory there.
    assert_eq!(found[0].object, None);
    // A model-load event's relative path is read through the process's working directory.
    let info = resources::model_from_load(pid, Path::new("models/arg-model.gguf")).unwrap();
    assert_eq!(info.name.as_deref(), Some("written by the test"));
    assert_eq!(info.path, dir.join("models/arg-model.gguf"));
}

#[test]
fn a_process_without_a_model_has_none() {
    let kid = Kid(Command::new("sleep").arg("30").spawn().unwrap());
    let pid = kid.0.id();
    wait_exec(pid, "sleep");
    assert_eq!(model_path::find(pid).unwrap(), []);
    assert!(resources::recover_model(pid).unwrap().is_none());
}

// ---------------------------------------------------------------------------------------------
// NVML through a FAKE libnvidia-ml.so (no GPU)

/// Builds the fake NVML library once per test binary.
pub fn fake_nvml_lib() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fake-nvml");
        std::fs::create_dir_all(&dir).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nvml_fake/fake_nvml.c");
        // Built under a temporary name and renamed: a concurrent test binary never loads a
        // half-written library.
        let tmp = dir.join(format!("libnvidia-ml.so.1.{}", std::process::id()));
        let lib = dir.join("libnvidia-ml.so.1");
        let out = Command::new("gcc")
            .args(["-shared", "-fPIC", "-O1", "-Wall", "-o"])
            .arg(&tmp)
            .arg(&src)
            .output()
            .expect("gcc (needed to build the fake libnvidia-ml.so)");
        assert!(
            out.status.success(),
            "building the fake NVML failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&tmp, &lib).unwrap();
        lib
    })
}

const GPU_CHILD: &str = "LLAMAPROBE_TEST_FAKE_GPU_CHILD";
const GIB: u64 = 1 << 30;

/// What fake_nvml.c reports for one GPU.
struct FakeGpu {
    name: &'static str,
    uuid: &'static str,
    utilization: &'static str,
    memory_used: u64,
    memory_total: u64,
    temperature: &'static str,
    power: &'static str,
    sm_clock: &'static str,
    throttle: &'static str,
}

const FAKE_GPUS: [FakeGpu; 2] = [
    FakeGpu {
        name: "Fake GPU 0",
        uuid: "GPU-00000000-1111-2222-3333-444444444444",
        utilization: "0.37",
        memory_used: 3 * GIB,
        memory_total: 16 * GIB,
        temperature: "61",
        power: "123.456",
        sm_clock: "1410000000",
        throttle: "5",
    },
    FakeGpu {
        name: "Fake GPU 1",
        uuid: "GPU-11111111-2222-3333-4444-555555555555",
        utilization: "0.05",
        memory_used: GIB,
        memory_total: 8 * GIB,
        temperature: "40",
        power: "35",
        sm_clock: "210000000",
        throttle: "0",
    },
];

/// Child: samples the fake GPUs (library from $LLAMAPROBE_NVML_LIB) with the traced pid
/// $FAKE_NVML_PID and checks every series against what fake_nvml.c reports, minus the fields
/// in $FAKE_NVML_FAIL.
#[test]
#[ignore = "helper run by the fake_gpu_ tests"]
fn fake_gpu_child() {
    if std::env::var_os(GPU_CHILD).is_none() {
        return;
    }
    let traced: u32 = std::env::var("FAKE_NVML_PID").unwrap().parse().unwrap();
    let fail = std::env::var("FAKE_NVML_FAIL").unwrap_or_default();
    let fails = |f: &str| fail.split(',').any(|x| x == f);

    let registry = Registry::new();
    // None: the library comes from $LLAMAPROBE_NVML_LIB.
    let mut sampler = ResourceSampler::new(&registry, None);
    let lib = std::env::var("LLAMAPROBE_NVML_LIB").unwrap();
    let (n0, n1) = if fails("name") {
        ("", "")
    } else {
        ("Fake GPU 0", "Fake GPU 1")
    };
    assert_eq!(
        sampler.gpu_status(),
        format!("GPU metrics from NVML ({lib}): 2 NVIDIA GPUs: 0 {n0}, 1 {n1}")
    );

    // The model of the traced process, as the agent would declare it.
    let dir = scratch(&format!("fake-gpu-child-{}", std::process::id()));
    let model = dir.join("tiny.gguf");
    let params = write_model(&model);
    let info = gguf::read(&model).unwrap();
    sampler.set_model(traced, "tiny", &info);

    let started = Instant::now();
    for _ in 0..3 {
        sampler.sample(&[traced], |_| "tiny".to_string());
    }
    let per_sample = started.elapsed() / 3;
    assert!(per_sample < Duration::from_millis(200), "{per_sample:?}");

    let text = render(&registry);
    println!("{text}"); // shown by the parent test if this one fails
    let lines = samples(&text);
    let mut expected = Vec::new();
    for (i, g) in FAKE_GPUS.iter().enumerate() {
        let name = if fails("name") { "" } else { g.name };
        let uuid = if fails("uuid") { "" } else { g.uuid };
        let l = format!("{{gpu=\"{i}\",name=\"{name}\",uuid=\"{uuid}\"}}");
        let series = [
            (
                "utilization",
                "llamacpp_gpu_utilization_ratio",
                g.utilization.to_string(),
            ),
            (
                "memory",
                "llamacpp_gpu_memory_used_bytes",
                g.memory_used.to_string(),
            ),
            (
                "memory",
                "llamacpp_gpu_memory_total_bytes",
                g.memory_total.to_string(),
            ),
            (
                "temperature",
                "llamacpp_gpu_temperature_celsius",
                g.temperature.to_string(),
            ),
            ("power", "llamacpp_gpu_power_watts", g.power.to_string()),
            (
                "clock",
                "llamacpp_gpu_sm_clock_hertz",
                g.sm_clock.to_string(),
            ),
            (
                "throttle",
                "llamacpp_gpu_throttle_reasons",
                g.throttle.to_string(),
            ),
        ];
        for (field, metric, value) in series {
            let line = format!("{metric}{l} {value}");
            if fails(field) {
                assert!(
                    !text.contains(&format!("{metric}{l}")),
                    "{field} fails: {metric} of GPU {i} must be absent\n{text}"
                );
            } else {
                expected.push(line);
            }
        }
    }
    let gpu0 = format!(
        "gpu=\"0\",name=\"{n0}\",pid=\"{traced}\",uuid=\"{}\"",
        if fails("uuid") { "" } else { FAKE_GPUS[0].uuid }
    );
    if !fails("processes") {
        // In both the compute and the graphics list: counted once.
        expected.push(format!(
            "llamacpp_gpu_process_memory_bytes{{{gpu0}}} {}",
            512u64 << 20
        ));
    }
    // The other process on GPU 0 is not traced.
    assert!(!text.contains("4194999"), "{text}");
    let process_lines = lines
        .iter()
        .filter(|l| l.starts_with("llamacpp_gpu_process_memory_bytes"))
        .count();
    assert_eq!(process_lines, usize::from(!fails("processes")), "{text}");

    let model_path = model.display();
    expected.push(format!(
        "llamacpp_model_info{{architecture=\"llama\",context_length=\"4096\",file_type=\"Q8_0\",\
         model=\"tiny\",parameters=\"{params}\",path=\"{model_path}\",pid=\"{traced}\"}} 1"
    ));
    expected.push(format!(
        "llamacpp_model_parameters{{model=\"tiny\",pid=\"{traced}\"}} {params}"
    ));
    expected.push(format!(
        "llamacpp_model_size_bytes{{model=\"tiny\",pid=\"{traced}\"}} {}",
        std::fs::metadata(&model).unwrap().len()
    ));
    for e in &expected {
        assert!(lines.contains(&e.as_str()), "missing: {e}\n{text}");
    }

    // The traced process's own series (values change: checked for sense, not equality).
    let proc_labels = format!("{{model=\"tiny\",pid=\"{traced}\"}}");
    let value = |metric: &str| -> f64 {
        let prefix = format!("{metric}{proc_labels} ");
        let line = lines
            .iter()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix}\n{text}"));
        line[prefix.len()..].parse().unwrap()
    };
    assert!(value("llamacpp_process_resident_memory_bytes") > 0.0);
    assert!(value("llamacpp_process_threads") >= 1.0);
    assert!(value("llamacpp_process_cpu_seconds_total") >= 0.0);

    // Nothing else: the GPU and model series above and three process series.
    let ours = lines.iter().filter(|l| l.starts_with("llamacpp_")).count();
    assert_eq!(ours, expected.len() + 3, "{text}");

    // The same round, handed to the other exporters: the traced process alone.
    let latest = sampler.gpu_feed().expect("GPUs: a feed").latest();
    assert_eq!(latest.len(), 2);
    assert_eq!(
        latest[0].processes,
        (!fails("processes")).then(|| vec![nvml_types::GpuProcess {
            pid: traced,
            used_memory_bytes: 512 << 20,
        }])
    );
    assert_eq!(latest[1].power_watts, (!fails("power")).then_some(35.0));

    // Untraced: the per-process GPU series goes, the GPU series stay.
    sampler.sample(&[], |_| String::new());
    let text = render(&registry);
    assert!(
        !text.contains("llamacpp_gpu_process_memory_bytes{"),
        "{text}"
    );
    assert!(!text.contains("llamacpp_process_threads{"), "{text}");
    if !fails("temperature") {
        assert!(text.contains("llamacpp_gpu_temperature_celsius{"), "{text}");
    }

    // The structured sample too.
    drop(sampler);
    let mut gpus = nvml::Gpus::init(std::ffi::OsStr::new(&lib)).unwrap();
    let s = gpus.sample();
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].power_watts, (!fails("power")).then_some(123.456));
    assert_eq!(
        s[0].temperature_celsius,
        (!fails("temperature")).then_some(61.0)
    );
    assert_eq!(s[1].utilization, (!fails("utilization")).then_some(0.05));
    assert_eq!(s[1].processes, (!fails("processes")).then(Vec::new));
    let _ = std::fs::remove_dir_all(&dir);
}

fn fake_gpu_run(fail: Option<&str>) {
    let lib = fake_nvml_lib().display().to_string();
    let pid = std::process::id().to_string();
    let mut envs = vec![
        (GPU_CHILD, "1"),
        ("LLAMAPROBE_NVML_LIB", lib.as_str()),
        ("FAKE_NVML_PID", pid.as_str()),
    ];
    if let Some(f) = fail {
        envs.push(("FAKE_NVML_FAIL", f));
    }
    // run_child removes FAKE_NVML_FAIL first, then sets envs.
    let out = run_child("fake_gpu_child", &envs);
    check_child(&out, "fake_gpu_child");
}

#[test]
fn fake_gpu_every_series_equals_the_fake() {
    fake_gpu_run(None);
}

#[test]
fn fake_gpu_unsupported_power_and_temperature_are_absent_alone() {
    fake_gpu_run(Some("power,temperature"));
}

#[test]
fn fake_gpu_every_field_degrades_alone() {
    fake_gpu_run(Some(
        "utilization,memory,clock,throttle,processes,name,uuid",
    ));
}

// ---------------------------------------------------------------------------------------------
// The same fake GPUs over OTLP, from the real llamaprobe binary

/// A child process (killed on drop) and its pid.
type Driver = (Kid, u32);

/// A fake llama.cpp driver (tests/fake) held before its first call: it waits for a byte on its
/// stdin, which is never sent. A traced process whose pid is known before llamaprobe starts
/// (the fake NVML lists $FAKE_NVML_PID on GPU 0).
fn held_driver() -> Driver {
    let mut kid = Kid(Command::new(fakes().join("classic/driver_classic"))
        .arg("/models/tiny-model.gguf")
        .env("FAKE_WAIT_STDIN", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    let mut line = String::new();
    BufReader::new(kid.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid = line
        .trim()
        .strip_prefix("ready pid=")
        .unwrap_or_else(|| panic!("driver said {line:?}"))
        .parse()
        .unwrap();
    (kid, pid)
}

/// `llamaprobe attach` on a held driver for 3 s with the fake NVML and `FAKE_NVML_FAIL` =
/// `fail`, exporting to a gRPC OTLP receiver every second; the GPU metrics (`hw.*` and
/// `llamacpp.gpu.*`) of every export that had any, and the traced pid.
fn otlp_gpu_exports(fail: &str) -> (Vec<HashMap<String, Vec<Point>>>, u32) {
    let (_driver, pid) = held_driver();
    let port = free_port();
    let receiver = grpc_receiver(port);
    let lib = fake_nvml_lib();
    let mut cmd = llamaprobe();
    cmd.args(["attach", "--pid", &pid.to_string(), "--quiet"])
        .args(["--metrics-addr", "off", "--duration", "3", "--nvml-lib"])
        .arg(lib)
        .args(["--otlp-endpoint", &format!("http://127.0.0.1:{port}")])
        .env("FAKE_NVML_PID", pid.to_string())
        .env("FAKE_NVML_FAIL", fail)
        .env("OTEL_METRIC_EXPORT_INTERVAL", "1000")
        .env_remove("LLAMAPROBE_NVML_LIB");
    let mut probe = Probe::spawn(&mut cmd);
    let status = probe.wait_for("GPU metrics");
    assert!(
        status.ends_with(&format!(
            "GPU metrics from NVML ({}): 2 NVIDIA GPUs: 0 Fake GPU 0, 1 Fake GPU 1",
            lib.display()
        )),
        "{status}"
    );
    let (code, _) = probe.finish();
    assert_eq!(code, 0, "llamaprobe failed (its stderr is above)");
    let exports = receiver
        .got
        .metric_exports()
        .iter()
        .map(|metrics| {
            let mut points = number_points(metrics);
            points.retain(|name, _| name.starts_with("hw.") || name.starts_with("llamacpp.gpu."));
            for list in points.values_mut() {
                normalise(list);
            }
            points
        })
        .filter(|points| !points.is_empty())
        .collect();
    (exports, pid)
}

/// Attributes by key and points by attributes: an order to compare in.
fn normalise(points: &mut [Point]) {
    for p in points.iter_mut() {
        p.attributes.sort_by(|a, b| a.0.cmp(&b.0));
    }
    points.sort_by_key(|p| format!("{:?}", p.attributes));
}

fn string(v: &str) -> Any {
    Any::StringValue(v.to_string())
}

/// What llamaprobe must export for the fake GPUs (FAKE_GPUS, as fake_nvml.c reports them), the
/// traced process `pid`, minus the fields in `fail`: metric name → points.
fn expected_otlp(pid: u32, fail: &str) -> HashMap<String, Vec<Point>> {
    let fails = |f: &str| fail.split(',').any(|x| x == f);
    let mut out: HashMap<String, Vec<Point>> = HashMap::new();
    let mut put = |field: &str, name: &str, kind, unit: &str, value, attributes| {
        if !fails(field) {
            out.entry(name.to_string()).or_default().push(Point {
                kind,
                unit: unit.to_string(),
                value,
                attributes,
            });
        }
    };
    for (i, g) in FAKE_GPUS.iter().enumerate() {
        let gpu = vec![
            ("gpu".to_string(), Any::IntValue(i as i64)),
            ("hw.id".to_string(), string(g.uuid)),
            ("hw.model".to_string(), string(g.name)),
            ("hw.name".to_string(), string(g.name)),
            ("hw.type".to_string(), string("gpu")),
            ("hw.vendor".to_string(), string("NVIDIA")),
        ];
        let with = |extra: &[(&str, Any)]| {
            let mut a = gpu.clone();
            a.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
            a
        };
        let double = |text: &str| PointValue::Double(text.parse().unwrap());
        let bytes = |b: u64| PointValue::Int(b as i64);
        put(
            "utilization",
            "hw.gpu.utilization",
            "gauge",
            "1",
            double(g.utilization),
            with(&[("hw.gpu.task", string("general"))]),
        );
        put(
            "memory",
            "hw.gpu.memory.usage",
            "updown",
            "By",
            bytes(g.memory_used),
            gpu.clone(),
        );
        put(
            "memory",
            "hw.gpu.memory.limit",
            "updown",
            "By",
            bytes(g.memory_total),
            gpu.clone(),
        );
        put(
            "memory",
            "hw.gpu.memory.utilization",
            "gauge",
            "1",
            PointValue::Double(g.memory_used as f64 / g.memory_total as f64),
            gpu.clone(),
        );
        put(
            "power",
            "hw.power",
            "gauge",
            "W",
            double(g.power),
            gpu.clone(),
        );
        put(
            "temperature",
            "hw.temperature",
            "gauge",
            "Cel",
            double(g.temperature),
            vec![
                ("gpu".to_string(), Any::IntValue(i as i64)),
                (
                    "hw.id".to_string(),
                    string(&format!("{}_temperature", g.uuid)),
                ),
                ("hw.parent".to_string(), string(g.uuid)),
                (
                    "hw.temperature.sensor_location".to_string(),
                    string("GPU_DIE"),
                ),
                ("hw.type".to_string(), string("temperature")),
            ],
        );
        put(
            "clock",
            "llamacpp.gpu.sm_clock",
            "gauge",
            "Hz",
            double(g.sm_clock),
            gpu.clone(),
        );
        put(
            "throttle",
            "llamacpp.gpu.throttle_reasons",
            "gauge",
            "",
            PointValue::Int(g.throttle.parse().unwrap()),
            gpu.clone(),
        );
        if i == 0 {
            // The traced process, in both of GPU 0's lists (counted once); the other process
            // on GPU 0 is not traced.
            put(
                "processes",
                "llamacpp.gpu.process.memory.usage",
                "updown",
                "By",
                bytes(512 << 20),
                with(&[("process.pid", Any::IntValue(pid.into()))]),
            );
        }
    }
    for list in out.values_mut() {
        normalise(list);
    }
    out
}

fn check_otlp_gpu_run(fail: &str) {
    let (exports, pid) = otlp_gpu_exports(fail);
    // Exported while running (every second), not only by the final flush.
    assert!(
        exports.len() >= 2,
        "{} exports with GPU metrics in 3 s",
        exports.len()
    );
    let want = expected_otlp(pid, fail);
    // Every export (each about a second apart, and the final one) holds exactly the fake's
    // values: no point missing, none added, none zeroed.
    for (n, got) in exports.iter().enumerate() {
        let mut names: Vec<&String> = got.keys().collect();
        names.sort();
        let mut want_names: Vec<&String> = want.keys().collect();
        want_names.sort();
        assert_eq!(names, want_names, "metrics of export {n}");
        for (name, points) in &want {
            assert_eq!(&got[name], points, "{name} in export {n}");
        }
        for (field, name) in [("power", "hw.power"), ("temperature", "hw.temperature")] {
            if fail.split(',').any(|f| f == field) {
                assert!(
                    !got.contains_key(name),
                    "{field} not supported: {name} must be absent"
                );
            }
        }
    }
}

#[test]
fn fake_gpu_otlp_metrics_equal_the_fake() {
    let test = "fake_gpu_otlp_metrics_equal_the_fake";
    if !root_or_skip(test) {
        return;
    }
    let _serial = serial();
    check_otlp_gpu_run("");
    // Power and temperature not supported: their metrics are absent, the rest unchanged.
    check_otlp_gpu_run("power,temperature");
}

const DRIVERLESS_CHILD: &str = "LLAMAPROBE_TEST_FAKE_DRIVERLESS_CHILD";

/// Child: the fake library fails nvmlInit with NVML_ERROR_DRIVER_NOT_LOADED.
#[test]
#[ignore = "helper run by fake_gpu_library_without_driver_is_one_line"]
fn fake_gpu_driverless_child() {
    if std::env::var_os(DRIVERLESS_CHILD).is_none() {
        return;
    }
    let registry = Registry::new();
    let mut sampler = ResourceSampler::new(&registry, None);
    let status = sampler.gpu_status();
    assert!(
        status.starts_with("NVIDIA driver not loaded (nvmlInit: ")
            && status.ends_with("): GPU metrics off")
            && !status.contains('\n'),
        "{status}"
    );
    for _ in 0..3 {
        sampler.sample(&[std::process::id()], |_| String::new());
    }
    assert!(!render(&registry).contains("llamacpp_gpu_"));
}

#[test]
fn fake_gpu_library_without_driver_is_one_line() {
    let lib = fake_nvml_lib().display().to_string();
    let out = run_child(
        "fake_gpu_driverless_child",
        &[
            (DRIVERLESS_CHILD, "1"),
            ("LLAMAPROBE_NVML_LIB", lib.as_str()),
            ("FAKE_NVML_FAIL", "init"),
        ],
    );
    check_child(&out, "fake_gpu_driverless_child");
}

#[test]
fn no_nvidia_library_is_one_line_and_no_gpu_series() {
    let registry = Registry::new();
    let mut sampler = ResourceSampler::new(
        &registry,
        Some(PathBuf::from("/nonexistent/libnvidia-ml.so.1")),
    );
    assert_eq!(
        sampler.gpu_status(),
        "no NVIDIA driver (/nonexistent/libnvidia-ml.so.1 not found): GPU metrics off"
    );
    for _ in 0..3 {
        sampler.sample(&[std::process::id()], |_| "m".into());
    }
    let text = render(&registry);
    assert!(!text.contains("llamacpp_gpu_"), "{text}");
    assert!(text.contains("llamacpp_process_threads{"), "{text}");
    assert!(sampler.gpu_feed().is_none(), "no GPU, nothing to hand on");

    // The default library on this machine: on one without NVIDIA's driver, the same line.
    match nvml::Gpus::init(std::ffi::OsStr::new(nvml::DEFAULT_LIB)) {
        Ok(g) => eprintln!("this machine has NVML: {}", g.describe()),
        Err(e) => {
            if matches!(e, nvml::NvmlInitError::LibraryNotFound { .. }) {
                assert_eq!(
                    e.to_string(),
                    "no NVIDIA driver (libnvidia-ml.so.1 not found): GPU metrics off"
                );
            }
        }
    }
}
