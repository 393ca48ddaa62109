//! Integration: programs on libllama that are not llama-server — llama-cli, and a real binding
//! from a registry package driven through its own API (node-llama-cpp, the package whose
//! prebuilt libllama is the `npm` fixture). One request per completion, with the token counts
//! the program itself reports; start-up warm-ups are not requests.

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

/// Completions of node-llama-cpp's `LlamaCompletion`: (max tokens, prompt).
pub(crate) const NODE_COMPLETIONS: [u32; 3] = [12, 16, 20];

/// The script: loads the model through the binding's API, prints `ready pid=N`, waits for a
/// byte on stdin, then makes the completions, printing `done I generated=N` with the tokens
/// its `onToken` callback received. With `WAIT_BEFORE_LOAD=1` it first prints `started
/// pid=N` and waits for a byte before it loads the binding (libllama is dlopen'ed then).
pub(crate) const NODE_SCRIPT: &str = r#"
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

/// The fixture with node-llama-cpp installed (the npm fixture), or `None`: skipped (a failure
/// when fixtures are required).
pub(crate) fn node_fixture(test: &str) -> Option<Fixture> {
    let f = fixtures::all(test)
        .into_iter()
        .find(|f| f.node_app.is_some());
    if f.is_none() {
        assert!(
            std::env::var_os("LLAMAPROBE_REQUIRE_FIXTURES").is_none(),
            "{test}: no fixture with node-llama-cpp installed (the npm fixture)"
        );
    }
    f
}

/// Node running [`NODE_SCRIPT`] from `dir` (its `node_modules` the fixture's) on `model` with
/// [`NODE_COMPLETIONS`], `env` added; its stdout lines as they come.
pub(crate) struct NodeScript {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl NodeScript {
    pub(crate) fn start(
        f: &Fixture,
        dir: &std::path::Path,
        model: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Self {
        let modules = dir.join("node_modules");
        let _ = std::fs::remove_file(&modules);
        std::os::unix::fs::symlink(f.node_app.as_ref().unwrap().join("node_modules"), &modules)
            .unwrap();
        let script = dir.join("completions.mjs");
        std::fs::write(&script, NODE_SCRIPT).unwrap();
        let mut child = Command::new("node")
            .arg(&script)
            .arg(model)
            .args(NODE_COMPLETIONS.map(|n| n.to_string()))
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("[node] {line}");
                let _ = tx.send(line);
            }
        });
        Self { child, lines }
    }

    /// The next line (`what` names it for the failure message).
    pub(crate) fn next(&self, what: &str) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("node never printed {what}: {e}"))
    }

    /// Writes `bytes` to its stdin; `last`: then closes it (node exits once the script ends).
    pub(crate) fn send(&mut self, bytes: &[u8], last: bool) {
        self.child
            .stdin
            .as_mut()
            .expect("stdin open")
            .write_all(bytes)
            .unwrap();
        if last {
            drop(self.child.stdin.take());
        }
    }

    pub(crate) fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }
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
    if !root_or_skip(test) {
        return;
    }
    let Some(model) = fixtures::model(test) else {
        return;
    };
    let Some(f) = node_fixture(test) else {
        return;
    };
    let _serial = serial();
    let dir = scratch(test);
    let mut node = NodeScript::start(&f, &dir, &model, &[]);
    let ready = node.next("ready");
    let pid = ready.strip_prefix("ready pid=").expect(&ready).to_string();
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
    node.send(b"go\n", true);
    let generated: Vec<u64> = (0..NODE_COMPLETIONS.len())
        .map(|i| {
            let line = node.next("done");
            let rest = line
                .strip_prefix(&format!("done {i} generated="))
                .unwrap_or_else(|| panic!("{line}"));
            rest.parse().unwrap()
        })
        .collect();
    assert!(node.wait().success());
    // The process exited: llamaprobe ends with it.
    let (code, stdout) = probe.finish();
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("the process exited"), "{stdout}");
    let s = json(&sum);
    assert_eq!(s["request_mode"], "batch_view");
    assert_eq!(s["requests"], NODE_COMPLETIONS.len(), "{s}");
    assert_eq!(s["sampled_tokens"], generated.iter().sum::<u64>(), "{s}");
    let events = json_lines(&ev);
    let mut requests = of_kind(&events, "request");
    requests.sort_by_key(|r| r["start_ns"].as_u64());
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
    assert_eq!(s["time_to_first_token"]["count"], NODE_COMPLETIONS.len());
    assert_eq!(s["time_per_output_token"]["count"], NODE_COMPLETIONS.len());
}
