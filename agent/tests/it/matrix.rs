//! The llama.cpp build matrix: every fixture `cargo xtask fixtures` prepared (versions, the
//! prebuilt npm libllama under our own driver, llama-simple, static, stripped, -g) is
//! recognised with the right generation and measured exactly. The server-bearing fixtures'
//! agreement with llama-server's own counters is in llama_server.rs.
use crate::common::{fixtures, *};

fn tool(f: &fixtures::Fixture, args: &[&str]) -> std::process::Output {
    let mut cmd = llamaprobe();
    cmd.args(args);
    f.apply(&mut cmd);
    cmd.output().unwrap()
}

#[test]
fn symbols_names_the_generation_of_every_fixture() {
    let list = fixtures::all("symbols_names_the_generation_of_every_fixture");
    for f in &list {
        let target = f
            .server
            .as_ref()
            .or(f.driver.as_ref())
            .or(f.libllama.as_ref())
            .unwrap();
        let target = target.display().to_string();
        let mut args = vec!["symbols", target.as_str()];
        let from = f.symbols_args();
        if f.symbols_from.is_some() {
            // Without its symbols file, a stripped static build is explained, not guessed.
            let out = tool(f, &args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{}: {}", f.name, text(&out));
            assert!(err.contains("--symbols-from FILE"), "{}: {err}", f.name);
            args.extend(from.iter().map(String::as_str));
        }
        let out = tool(f, &args);
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}: {}", f.name, text(&out));
        assert!(
            shown.contains(&format!("generation: {} (", f.generation)),
            "{}: expected generation {}:\n{shown}",
            f.name,
            f.generation
        );
        // Every generation has its decode step, model load, sampling and synchronize.
        for family in [
            "decode ",
            "model_load ",
            "sample ",
            "synchronize ",
            "context_create ",
        ] {
            assert!(
                shown.lines().any(|l| l.trim_start().starts_with(family)),
                "{}: no {family}probe:\n{shown}",
                f.name
            );
        }
        // llama-server's task queue is found in every llama-server build (queue wait).
        let probed = shown
            .lines()
            .skip_while(|l| !l.starts_with("would probe"))
            .take_while(|l| !l.starts_with("not found"));
        assert_eq!(
            probed
                .into_iter()
                .any(|l| l.trim_start().starts_with("server ")),
            f.server.is_some(),
            "{}: server probe expected iff a llama-server:\n{shown}",
            f.name
        );
    }
}

#[test]
fn embedded_driver_on_the_prebuilt_library_is_measured_exactly() {
    let test = "embedded_driver_on_the_prebuilt_library_is_measured_exactly";
    if !root_or_skip(test) {
        return;
    }
    let _serial = serial();
    let Some(model) = fixtures::model(test) else {
        return;
    };
    for f in fixtures::all(test).iter().filter(|f| f.driver.is_some()) {
        let dir = scratch(&format!("embedded-{}", f.name));
        let sum = dir.join("summary.json");
        let mut cmd = llamaprobe();
        cmd.args(["run", "-q", "--metrics-addr", "off", "--summary-json"])
            .arg(&sum)
            .arg("--")
            .arg(f.driver.as_ref().unwrap())
            .arg(&model);
        f.apply(&mut cmd);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}: {}", f.name, text(&out));
        // The driver says what it did.
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains("driver decodes=12 prompt_tokens=9 generated=12 samples=12"),
            "{said}"
        );
        let s = json(&sum);
        assert_eq!(s["generation"], f.generation.as_str());
        assert_eq!(s["decode_calls"], 12);
        assert_eq!(s["decode_results"]["ok"], 12);
        // llama_batch_get_one batches: 9 prompt tokens at once, then 11 single tokens.
        assert_eq!(s["phases"]["prompt"]["batch_sizes"]["9"], 1);
        assert_eq!(s["phases"]["generation"]["batch_sizes"]["1"], 11);
        assert_eq!(s["prompt_tokens"], 9);
        assert_eq!(s["generation_tokens_decoded"], 11);
        assert_eq!(s["sampled_tokens"], 12);
        // Not llama-server: requests come from the batch view alone.
        assert_eq!(s["request_mode"], "batch_view");
        assert_eq!(s["requests"], 1);
        assert_eq!(s["request_queue"]["count"], 0);
        let loads = s["model_loads"].as_array().unwrap();
        assert_eq!(loads.len(), 1);
        assert_eq!(loads[0]["path"], model.to_string_lossy().as_ref());
        assert_eq!(s["contexts"][0]["n_ctx"], 512);
        assert_eq!(s["contexts"][0]["n_batch"], 64);
        // The driver asks for 1 thread (its libllama: the 2026 context parameters).
        assert_eq!(s["contexts"][0]["n_threads"], 1);
        assert_eq!(s["contexts"][0]["n_threads_batch"], 1);
    }
}

#[test]
fn llama_simple_is_measured_exactly() {
    let test = "llama_simple_is_measured_exactly";
    if !root_or_skip(test) {
        return;
    }
    let _serial = serial();
    let (Some(simple), Some(model)) = (
        fixture_or_skip(test, "LLAMAPROBE_LLAMA_SIMPLE"),
        fixtures::model(test),
    ) else {
        return;
    };
    let dir = scratch(test);
    let (sum, ev) = (dir.join("summary.json"), dir.join("events.jsonl"));
    const N: u64 = 16;
    let out = llamaprobe()
        .args(["run", "-q", "--metrics-addr", "off", "--summary-json"])
        .arg(&sum)
        .arg("--events-out")
        .arg(&ev)
        .arg("--")
        .arg(&simple)
        .arg("-m")
        .arg(&model)
        .args(["-n", &N.to_string(), "the quick brown fox"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // llama-simple prints "decoded N tokens": the sampled tokens that were not end-of-generation.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let decoded: u64 = stderr
        .split("decoded ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no 'decoded N tokens' line: {stderr}"));
    let s = json(&sum);
    let events = json_lines(&ev);
    let samples = s["sampled_tokens"].as_u64().unwrap();
    // One decode per sample (the prompt, then each kept token fed back), at most N.
    assert_eq!(s["decode_calls"].as_u64().unwrap(), samples);
    assert!(samples <= N);
    // Either all N were kept, or the last sample was end-of-generation.
    assert!(
        decoded == samples || decoded + 1 == samples,
        "{decoded} vs {samples}"
    );
    let decodes = of_kind(&events, "decode");
    let n_prompt = decodes[0]["n_tokens"].as_u64().unwrap();
    assert!(n_prompt > 1);
    assert_eq!(decodes[0]["phase"], "prompt");
    assert!(decodes[1..]
        .iter()
        .all(|d| d["n_tokens"] == 1 && d["phase"] == "generation"));
    assert_eq!(s["prompt_tokens"].as_u64().unwrap(), n_prompt);
    // llama-simple sizes its context from the prompt: n_ctx = n_prompt + n - 1, n_batch = n_prompt.
    assert_eq!(
        s["contexts"][0]["n_ctx"].as_u64().unwrap(),
        n_prompt + N - 1
    );
    assert_eq!(s["contexts"][0]["n_batch"].as_u64().unwrap(), n_prompt);
    assert_eq!(
        s["model_loads"][0]["path"],
        model.to_string_lossy().as_ref()
    );
}

/// `llamaprobe layout FILE`'s report (it must succeed).
fn layout_report(f: &fixtures::Fixture, file: &std::path::Path) -> String {
    let out = llamaprobe().arg("layout").arg(file).output().unwrap();
    assert!(out.status.success(), "{}: {}", f.name, text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The layout table's row name for a fixture's generation.
fn row_name(f: &fixtures::Fixture) -> &'static str {
    match f.generation.as_str() {
        "batch_ext" => "BatchExt",
        "classic" => "Classic",
        "legacy" => "Legacy",
        other => panic!("{}: generation {other}", f.name),
    }
}

/// The table rows a type of the layout report matches: each type is a line "  NAME: layout"
/// followed by its verdict line, "matches the table row(s) A, B".
fn matched_rows(f: &fixtures::Fixture, report: &str, ty: &str) -> Vec<String> {
    let lines: Vec<&str> = report.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.trim_start().starts_with(ty))
        .unwrap_or_else(|| panic!("{}: {ty} missing: {report}", f.name));
    let verdict = lines.get(i + 1).unwrap_or(&"");
    verdict
        .trim()
        .strip_prefix("matches the table row(s) ")
        .unwrap_or_else(|| panic!("{}: {ty} {verdict}\n{report}", f.name))
        .split(", ")
        .map(str::to_string)
        .collect()
}

/// Asserts that `ty` in the report matches the fixture's row `row`.
fn assert_matches(f: &fixtures::Fixture, report: &str, ty: &str, row: &str) {
    let rows = matched_rows(f, report, ty);
    assert!(
        rows.iter().any(|r| r == row),
        "{}: {ty} matches {rows:?}, not {row}\n{report}",
        f.name
    );
}

#[test]
fn dwarf_of_the_debug_fixture_matches_the_layout_table() {
    let list = fixtures::all("dwarf_of_the_debug_fixture_matches_the_layout_table");
    for f in list.iter().filter(|f| f.dwarf) {
        let target = f.server.as_ref().or(f.libllama.as_ref()).unwrap();
        let report = layout_report(f, target);
        for ty in ["llama_batch:", "llama_context_params:"] {
            assert_matches(f, &report, ty, row_name(f));
        }
        if f.generation == "batch_ext" {
            assert_matches(f, &report, "llama_batch_ext:", "BatchExt");
        }
    }
}

/// Every CMake fixture's own llama.h, compiled with -g into a small program (xtask's layout
/// probe): the DWARF of `llama_batch` and `llama_context_params` matches the catalog's row for
/// the fixture's generation. So the layout rows are checked against the real headers of each
/// era, the 2024 one (`seed` first, the 72-byte batch) included, without a -g build of
/// llama.cpp.
#[test]
fn dwarf_of_every_fixtures_llama_h_matches_its_layout_row() {
    let test = "dwarf_of_every_fixtures_llama_h_matches_its_layout_row";
    let list: Vec<_> = fixtures::all(test)
        .into_iter()
        .filter(|f| f.layout_probe.is_some())
        .collect();
    if list.is_empty() && std::env::var_os("LLAMAPROBE_REQUIRE_FIXTURES").is_some() {
        panic!("{test}: no fixture with a layout probe");
    }
    for f in &list {
        let report = layout_report(f, f.layout_probe.as_ref().unwrap());
        for ty in ["llama_batch:", "llama_context_params:"] {
            assert_matches(f, &report, ty, row_name(f));
        }
    }
}
