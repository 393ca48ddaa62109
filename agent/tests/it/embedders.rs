//! Integration: programs on libllama that are not llama-server — llama-cli, and real bindings
//! from registry packages driven through their own APIs: node-llama-cpp (npm, the package
//! whose prebuilt libllama is the `npm` fixture) and gpt4all (PyPI, a 2024 llama.cpp in its
//! wheel: the `pypi2024` fixture). One request per completion, with the token counts the
//! program itself reports; start-up warm-ups are not requests.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use crate::common::{fixtures::Fixture, server::*, *};

/// Tokens each llama-cli run generates.
const CLI_TOKENS: u64 = 8;

/// llama-cli's arguments for one completion and exit: the 2025 CLI needs `-no-cnv` (a model
/// with a chat template would start a conversation), the 2026 one (a chat CLI) `--single-turn`;
/// late 2024 completes by default.
fn cli_args(cli: &std::path::Path, model: &std::path::Path) -> Vec<String> {
    let help = help(cli);
    let mut args: Vec<String> = [
        "-m",
        &model.to_string_lossy(),
        "-p",
        "a completion from llama-cli",
        "-n",
        &CLI_TOKENS.to_string(),
        "-t",
        "2",
        "--temp",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if help.contains("-no-cnv") {
        args.push("-no-cnv".into());
    } else if help.contains("--single-turn") {
        args.push("--single-turn".into());
    }
    args
}

/// `llamaprobe run -- llama-cli …` with one completion, on every fixture with a llama-cli:
/// exactly one request, of the tokens asked for; the warm-up decodes (and, in the 2026 CLI,
/// the throw-away context it sizes its parameters with) are not requests.
#[test]
fn llama_cli_one_completion_is_one_request() {
    let test = "llama_cli_one_completion_is_one_request";
    if !root_or_skip(test) {
        return;
    }
    let Some(model) = fixtures::model(test) else {
        return;
    };
    let _serial = serial();
    let clis: Vec<Fixture> = fixtures::all(test)
        .into_iter()
        .filter(|f| f.cli.is_some())
        .collect();
    if clis.is_empty() && std::env::var_os("LLAMAPROBE_REQUIRE_FIXTURES").is_some() {
        panic!("{test}: no llama-cli fixture");
    }
    for f in clis {
        eprintln!("== fixture {}", f.name);
        let cli = f.cli.clone().unwrap();
        let dir = scratch(&format!("cli-{}", f.name));
        let (sum, ev) = (dir.join("summary.json"), dir.join("events.jsonl"));
        let mut cmd = llamaprobe();
        cmd.args(["run", "--quiet", "--metrics-addr", "off", "--summary-json"])
            .arg(&sum)
            .arg("--events-out")
            .arg(&ev)
            .args(f.symbols_args())
            .arg("--")
            .arg(&cli)
            .args(cli_args(&cli, &model))
            .stdin(Stdio::null());
        f.apply(&mut cmd);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}: {}", f.name, text(&out));
        let s = json(&sum);
        assert_eq!(s["requests"], 1, "{}: {s}", f.name);
        assert!(s["warmups"].as_u64().unwrap() >= 1, "{}: {s}", f.name);
        assert_eq!(s["sampled_tokens"], CLI_TOKENS, "{}: {s}", f.name);
        let events = json_lines(&ev);
        let requests = of_kind(&events, "request");
        assert_eq!(requests[0]["generated_tokens"], CLI_TOKENS, "{}", f.name);
        assert!(requests[0]["first_token_ns"].as_u64().is_some());
        // Every main-context decode belongs to the request or to a warm-up.
        let steps = requests[0]["decode_steps"].as_u64().unwrap();
        let decodes = s["decode_calls"].as_u64().unwrap();
        assert_eq!(
            decodes - steps,
            s["warmups"].as_u64().unwrap(),
            "{}: {s}",
            f.name
        );
    }
}

/// The completions each binding script makes: their max tokens.
pub(crate) const COMPLETIONS: [u32; 3] = [12, 16, 20];

/// The Node script: loads the model through node-llama-cpp's API, prints `ready pid=N`, waits
/// for input on stdin, then makes the completions, printing `done I generated=N` with the
/// tokens its `onToken` callback received. With `WAIT_BEFORE_LOAD=1` it first prints `started
/// pid=N` and waits for input before it loads the binding (libllama is dlopen'ed then).
const NODE_SCRIPT: &str = r#"
import {getLlama, LlamaCompletion} from "node-llama-cpp";
const [modelPath, ...limits] = process.argv.slice(2);
const byte = () => new Promise((resolve) => process.stdin.once("data", resolve));
if (process.env.WAIT_BEFORE_LOAD === "1") {
  console.log(`started pid=${process.pid}`);
  await byte();
}
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: 512});
const completion = new LlamaCompletion({contextSequence: context.getSequence()});
console.log(`ready pid=${process.pid}`);
await byte();
for (const [i, n] of limits.entries()) {
  let generated = 0;
  await completion.generateCompletion(`completion number ${i} of ${limits.length}`, {
    maxTokens: Number(n), temperature: 0, onToken: (tokens) => { generated += tokens.length; },
  });
  console.log(`done ${i} generated=${generated}`);
}
await context.dispose();
await model.dispose();
"#;

/// The Python script, the same protocol through gpt4all's `GPT4All` class (greedy, prompts
/// decoded in chunks of `n_batch` 8). Its own counts: `prompt`, the tokens its prompt callback
/// received (the prompt and the end of the template it decodes after the response);
/// `n_past`, the tokens its context holds after the completion (reset before each one); so
/// `generated` = n_past - prompt, the tokens it sampled and fed back. (Its response callback
/// gets fewer: tokens that could begin a stop sequence are held back, and the last held ones
/// are never passed on.)
const GPT4ALL_SCRIPT: &str = r#"
import os, sys
if os.environ.get("WAIT_BEFORE_LOAD") == "1":
    print(f"started pid={os.getpid()}", flush=True)
    sys.stdin.readline()
from gpt4all import GPT4All
model_path, *limits = sys.argv[1:]
gpt = GPT4All(os.path.basename(model_path), model_path=os.path.dirname(model_path),
              allow_download=False, device="cpu", n_threads=2, n_ctx=512)
print(f"ready pid={os.getpid()}", flush=True)
sys.stdin.readline()
for i, n in enumerate(limits):
    counts = {"prompt": 0, "reported": 0}
    def on_prompt(token_id):
        counts["prompt"] += 1
        return True
    def on_token(token_id, text):
        counts["reported"] += 1
        return True
    gpt.model._prompt_callback = on_prompt
    gpt.generate(f"completion number {i} of {len(limits)}", max_tokens=int(n), temp=0,
                 n_batch=8, callback=on_token)
    n_past = gpt.model.context.n_past
    print(f"done {i} generated={n_past - counts['prompt']} prompt={counts['prompt']} "
          f"n_past={n_past} reported={counts['reported']}", flush=True)
gpt.close()
"#;

/// A binding from a registry package with a prebuilt llama.cpp, driven by its own API.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Binding {
    /// node-llama-cpp (npm), the 2026 classic generation.
    Node,
    /// gpt4all (PyPI), a 2024 llama.cpp: the legacy generation.
    Gpt4all,
}

impl Binding {
    pub(crate) const ALL: [Binding; 2] = [Binding::Node, Binding::Gpt4all];

    /// A short name for messages and directories.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Binding::Node => "node",
            Binding::Gpt4all => "gpt4all",
        }
    }

    /// The name of the executable its script runs in (`--include exe:NAME`): node, or the
    /// file the venv's `python` links to (`python3.11`, …).
    pub(crate) fn exe(self, f: &Fixture) -> String {
        match self {
            Binding::Node => "node".into(),
            Binding::Gpt4all => {
                let python = std::fs::canonicalize(f.python.as_ref().unwrap()).unwrap();
                python.file_name().unwrap().to_string_lossy().into_owned()
            }
        }
    }

    /// The fixture with the binding installed, or `None`: skipped (a failure when fixtures
    /// are required).
    pub(crate) fn fixture(self, test: &str) -> Option<Fixture> {
        let f = fixtures::all(test).into_iter().find(|f| match self {
            Binding::Node => f.node_app.is_some(),
            Binding::Gpt4all => f.python.is_some(),
        });
        if f.is_none() {
            assert!(
                std::env::var_os("LLAMAPROBE_REQUIRE_FIXTURES").is_none(),
                "{test}: no fixture with {self:?} installed (the npm and pypi2024 fixtures)"
            );
        }
        f
    }
}

/// What a script said about one completion, in the binding's own counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Done {
    pub generated: u64,
    /// gpt4all only.
    pub prompt: Option<u64>,
    pub n_past: Option<u64>,
}

/// A binding script ([`NODE_SCRIPT`], [`GPT4ALL_SCRIPT`]) run from `dir` on `model` with
/// [`COMPLETIONS`], `env` added; its stdout lines as they come.
pub(crate) struct BindingScript {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl BindingScript {
    pub(crate) fn start(
        binding: Binding,
        f: &Fixture,
        dir: &std::path::Path,
        model: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Self {
        let mut cmd = match binding {
            Binding::Node => {
                let modules = dir.join("node_modules");
                let _ = std::fs::remove_file(&modules);
                std::os::unix::fs::symlink(
                    f.node_app.as_ref().unwrap().join("node_modules"),
                    &modules,
                )
                .unwrap();
                let script = dir.join("completions.mjs");
                std::fs::write(&script, NODE_SCRIPT).unwrap();
                let mut cmd = Command::new("node");
                cmd.arg(script);
                cmd
            }
            Binding::Gpt4all => {
                let script = dir.join("completions.py");
                std::fs::write(&script, GPT4ALL_SCRIPT).unwrap();
                let mut cmd = Command::new(f.python.as_ref().unwrap());
                cmd.arg(script);
                cmd
            }
        };
        let mut child = cmd
            .arg(model)
            .args(COMPLETIONS.map(|n| n.to_string()))
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {binding:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let tag = binding.name();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
                let _ = tx.send(line);
            }
        });
        Self { child, lines }
    }

    /// The next line (`what` names it for the failure message).
    pub(crate) fn next(&self, what: &str) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("the script never printed {what}: {e}"))
    }

    /// The pid from its `ready pid=N` (or `started pid=N`) line.
    pub(crate) fn pid(&self, what: &str) -> u32 {
        let line = self.next(what);
        line.strip_prefix(&format!("{what} pid="))
            .unwrap_or_else(|| panic!("expected {what}: {line}"))
            .parse()
            .unwrap()
    }

    /// The `done` lines of every completion, in order.
    pub(crate) fn completions(&self) -> Vec<Done> {
        (0..COMPLETIONS.len())
            .map(|i| {
                let line = self.next("done");
                let rest = line
                    .strip_prefix(&format!("done {i} "))
                    .unwrap_or_else(|| panic!("{line}"));
                let field = |key: &str| -> Option<u64> {
                    rest.split_whitespace()
                        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                        .map(|v| v.parse().unwrap())
                };
                Done {
                    generated: field("generated").unwrap_or_else(|| panic!("{line}")),
                    prompt: field("prompt"),
                    n_past: field("n_past"),
                }
            })
            .collect()
    }

    /// Writes a line to its stdin; `last`: then closes it.
    pub(crate) fn send(&mut self, line: &[u8], last: bool) {
        self.child
            .stdin
            .as_mut()
            .expect("stdin open")
            .write_all(line)
            .unwrap();
        if last {
            drop(self.child.stdin.take());
        }
    }

    pub(crate) fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }
}

/// `llamaprobe attach --pid` on a binding script that has loaded its model; the script then
/// makes its completions. The summary and the events.
fn attach_to_completions(
    binding: Binding,
    test: &str,
) -> Option<(Vec<Done>, serde_json::Value, Vec<serde_json::Value>)> {
    if !root_or_skip(test) {
        return None;
    }
    let model = fixtures::model(test)?;
    let f = binding.fixture(test)?;
    let _serial = serial();
    let dir = scratch(test);
    let mut script = BindingScript::start(binding, &f, &dir, &model, &[]);
    let pid = script.pid("ready").to_string();
    let (sum, ev) = (dir.join("summary.json"), dir.join("events.jsonl"));
    let mut probe = Probe::spawn(llamaprobe().args([
        "attach",
        "--pid",
        &pid,
        "--quiet",
        "--metrics-addr",
        "off",
        "--summary-json",
        path(&sum),
        "--events-out",
        path(&ev),
    ]));
    probe.wait_for("probes attached");
    script.send(b"go\n", true);
    let done = script.completions();
    assert!(script.wait().success());
    // The process exited: llamaprobe ends with it.
    let (code, stdout) = probe.finish();
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("the process exited"), "{stdout}");
    Some((done, json(&sum), json_lines(&ev)))
}

/// The requests of `events`, oldest first.
fn requests_in_order(events: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    let mut requests = of_kind(events, "request");
    requests.sort_by_key(|r| r["start_ns"].as_u64());
    requests
}

/// node-llama-cpp (npm) generating three completions through its JavaScript API, attached by
/// pid (libllama is loaded by the addon, so `run` has nothing to plan before it starts): one
/// request per completion, each with the generated tokens the API reported, its time to first
/// token and time per output token. The binding applies the sampler chain itself (no sampling
/// function), so its tokens are seen at the chain's apply; before every evaluation it removes
/// "from the current end on" (which removes nothing) and reuses the common prefix of the next
/// prompt (counted as cached).
#[test]
fn node_llama_cpp_completions_are_one_request_each() {
    let test = "node_llama_cpp_completions_are_one_request_each";
    let Some((done, s, events)) = attach_to_completions(Binding::Node, test) else {
        return;
    };
    let generated: Vec<u64> = done.iter().map(|d| d.generated).collect();
    assert_eq!(s["request_mode"], "batch_view");
    assert_eq!(s["requests"], COMPLETIONS.len(), "{s}");
    assert_eq!(s["sampled_tokens"], generated.iter().sum::<u64>(), "{s}");
    let requests = requests_in_order(&events);
    let got: Vec<u64> = requests
        .iter()
        .map(|r| r["generated_tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(got, generated, "{requests:?}");
    // The prompts have the same length: the first is evaluated whole, the next ones reuse
    // its common prefix.
    let whole = requests[0]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(requests[0]["cached_tokens"], 0);
    for r in &requests[1..] {
        let cached = r["cached_tokens"].as_u64().unwrap();
        assert!(cached > 0, "{r}");
        assert_eq!(cached + r["prompt_tokens"].as_u64().unwrap(), whole, "{r}");
    }
    // Time per output token for every completion (each generated more than one).
    assert_eq!(s["time_to_first_token"]["count"], COMPLETIONS.len());
    assert_eq!(s["time_per_output_token"]["count"], COMPLETIONS.len());
}

/// gpt4all (PyPI wheel, a 2024 llama.cpp compiled into its `libllamamodel-mainline-*.so`)
/// generating three completions through its Python API, attached by pid: the legacy
/// generation, one request per completion with exactly the binding's own counts. gpt4all
/// decodes a prompt in chunks of 8 that each ask for an output, then one token per step; it
/// samples with llama_sample_token* (no index: the step's only output), and after the
/// response decodes the end of its template (counted as a warm-up, apart from the request).
#[test]
fn gpt4all_completions_are_one_request_each_with_its_own_counts() {
    let test = "gpt4all_completions_are_one_request_each_with_its_own_counts";
    let Some((done, s, events)) = attach_to_completions(Binding::Gpt4all, test) else {
        return;
    };
    let traced = &of_kind(&events, "traced")[0];
    assert_eq!(traced["generation"], "legacy", "{traced}");
    assert_eq!(s["request_mode"], "batch_view");
    assert_eq!(s["requests"], COMPLETIONS.len(), "{s}");
    let requests = requests_in_order(&events);
    let decodes = of_kind(&events, "decode");
    for (i, (r, d)) in requests.iter().zip(&done).enumerate() {
        let (prompt, n_past) = (d.prompt.unwrap(), d.n_past.unwrap());
        let generated = r["generated_tokens"].as_u64().unwrap();
        let prompt_tokens = r["prompt_tokens"].as_u64().unwrap();
        assert_eq!(generated, d.generated, "{i}: {r}");
        assert_eq!(r["cached_tokens"], 0, "{i}: {r}");
        // The template's end, decoded after the response: the prompt decodes between this
        // request's end and the next one's start.
        let (end, next) = (
            r["end_ns"].as_u64().unwrap(),
            requests
                .get(i + 1)
                .map_or(u64::MAX, |n| n["start_ns"].as_u64().unwrap()),
        );
        let tail: u64 = decodes
            .iter()
            .filter(|e| {
                let at = e["origin"]["start_ns"].as_u64().unwrap();
                at > end && at < next && e["phase"] == "prompt"
            })
            .map(|e| e["n_tokens"].as_u64().unwrap())
            .sum();
        assert_eq!(prompt_tokens + tail, prompt, "{i}: {r}");
        assert_eq!(prompt_tokens + tail + generated, n_past, "{i}: {r}");
        // Chunks of 8 for the prompt, one step per token fed back.
        assert_eq!(
            r["decode_steps"].as_u64().unwrap(),
            prompt_tokens.div_ceil(8) + generated,
            "{i}: {r}"
        );
        assert!(r["first_token_ns"].as_u64().is_some(), "{i}: {r}");
    }
    assert_eq!(s["warmups"], COMPLETIONS.len(), "{s}");
    assert_eq!(
        s["sampled_tokens"],
        done.iter().map(|d| d.generated).sum::<u64>(),
        "{s}"
    );
    assert_eq!(
        s["prompt_tokens"],
        done.iter().map(|d| d.prompt.unwrap()).sum::<u64>(),
        "{s}"
    );
    // Every sample found its row: the step's only output, on sequence 0.
    for e in of_kind(&events, "sample") {
        assert_eq!(e["seq_id"], 0, "{e}");
    }
    assert_eq!(s["time_to_first_token"]["count"], COMPLETIONS.len());
    assert_eq!(s["time_per_output_token"]["count"], COMPLETIONS.len());
}
