//! The Prometheus rules in dashboards/prometheus: `promtool check rules` accepts them, their unit
//! tests (dashboards/prometheus/tests, `promtool test rules`) pass, every alert carries a
//! severity and annotations a person can act on, the quantile families are consistent, and
//! every alert is tested firing and not firing and every recording rule is queried by a test.
//! Also the helpers compose.rs shares: the repository, YAML files, tools that may be missing.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use crate::common::*;

/// Recording rules in llamaprobe.rules.yml: three rates, five quantile families of three
/// quantiles each, and the events-lost rate.
pub const RECORDING_RULES: usize = 3 + 5 * 3 + 1;
/// Alerts in llamaprobe.rules.yml.
pub const ALERTS: usize = 10;

/// `promtool --version`: whether promtool runs.
pub const PROMTOOL: &[&str] = &["promtool", "--version"];

const SEVERITIES: [&str; 2] = ["warning", "critical"];

/// The `promtool test rules` files.
fn test_files() -> Vec<PathBuf> {
    let dir = repo().join("dashboards/prometheus/tests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no test files in {}", dir.display());
    files
}

/// Runs `cmd`, which must succeed.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", text(&out));
    out
}

/// A YAML file as a JSON value.
pub fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text)
        .unwrap_or_else(|e| panic!("{}: does not parse as YAML: {e}", path.display()))
}

/// The elements of a sequence; none when it is absent.
pub fn seq(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// Every rule of every group.
fn rules() -> Vec<Value> {
    let doc = yaml(&rules_file());
    seq(&doc["groups"])
        .iter()
        .flat_map(|g| seq(&g["rules"]).iter().cloned())
        .collect()
}

fn of_type(rules: &[Value], key: &str) -> Vec<Value> {
    rules
        .iter()
        .filter(|r| r[key].is_string())
        .cloned()
        .collect()
}

/// The metric and rule names in a PromQL expression.
fn names(expr: &str) -> BTreeSet<&str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| !w.is_empty())
        .collect()
}

#[test]
fn rules_pass_promtool_check_with_every_rule_counted() {
    if !tool_or_skip(
        "rules_pass_promtool_check_with_every_rule_counted",
        PROMTOOL,
    ) {
        return;
    }
    let out = run_ok(
        Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(rules_file()),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected = format!("SUCCESS: {} rules found", RECORDING_RULES + ALERTS);
    assert!(stdout.contains(&expected), "{}", text(&out));
    // promtool also warns (on stderr) about what it finds dubious, e.g. labels that vary.
    assert!(out.stderr.is_empty(), "{}", text(&out));

    let rules = rules();
    assert_eq!(of_type(&rules, "record").len(), RECORDING_RULES);
    assert_eq!(of_type(&rules, "alert").len(), ALERTS);
}

#[test]
fn rules_unit_tests_pass() {
    if !tool_or_skip("rules_unit_tests_pass", PROMTOOL) {
        return;
    }
    let files = test_files();
    let out = run_ok(
        Command::new("promtool")
            .args(["test", "rules"])
            .args(&files),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // One SUCCESS per file: a file promtool skipped would not say it.
    assert_eq!(
        stdout.matches("SUCCESS").count(),
        files.len(),
        "{}",
        text(&out)
    );
    assert!(!stdout.contains("FAILED"), "{}", text(&out));
}

#[test]
fn every_alert_has_a_severity_and_annotations() {
    let alerts = of_type(&rules(), "alert");
    let mut seen = BTreeSet::new();
    for a in &alerts {
        let name = a["alert"].as_str().unwrap();
        assert!(seen.insert(name), "alert {name} is defined twice");
        let severity = a["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            SEVERITIES.contains(&severity),
            "{name}: severity {severity:?}, not one of {SEVERITIES:?}"
        );
        for key in ["summary", "description"] {
            let v = a["annotations"][key].as_str().unwrap_or_default();
            assert!(!v.trim().is_empty(), "{name}: no {key} annotation");
        }
        // The description names what fired: the target and the value or a label of it.
        let description = a["annotations"]["description"].as_str().unwrap();
        assert!(
            description.contains("{{ $labels."),
            "{name}: the description says nothing of the series: {description}"
        );
    }
}

#[test]
fn quantile_rules_come_in_families_with_their_label() {
    let mut families: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    let recording = of_type(&rules(), "record");
    for r in &recording {
        let name = r["record"].as_str().unwrap();
        let expr = r["expr"].as_str().unwrap();
        match r["labels"]["quantile"].as_str() {
            Some(q) => {
                // The label must say which quantile the expression computes.
                assert!(
                    expr.starts_with(&format!("histogram_quantile({q},")),
                    "{name}{{quantile=\"{q}\"}}: {expr}"
                );
                assert!(name.ends_with(":quantile5m"), "{name}");
                families.entry(name).or_default().push(q.to_string());
            }
            None => assert!(name.ends_with(":rate5m"), "{name}: {expr}"),
        }
        assert!(expr.contains("[5m]"), "{name}: not over 5 minutes: {expr}");
    }
    assert_eq!(families.len(), 5, "{families:?}");
    for (name, qs) in families {
        assert_eq!(qs, ["0.5", "0.9", "0.99"], "{name}");
    }
}

#[test]
fn every_alert_and_recording_rule_is_tested() {
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    let mut queried = BTreeSet::new();
    for file in test_files() {
        let doc = yaml(&file);
        // The tests are of this rules file (rule_files is relative to the test file).
        let rule_files: Vec<PathBuf> = seq(&doc["rule_files"])
            .iter()
            .map(|f| file.parent().unwrap().join(f.as_str().unwrap()))
            .collect();
        assert!(
            rule_files
                .iter()
                .any(|f| f.canonicalize().ok() == rules_file().canonicalize().ok()),
            "{}: rule_files {rule_files:?}",
            file.display()
        );
        for t in seq(&doc["tests"]) {
            for a in seq(&t["alert_rule_test"]) {
                let name = a["alertname"].as_str().unwrap().to_string();
                if seq(&a["exp_alerts"]).is_empty() {
                    quiet.insert(name);
                } else {
                    firing.insert(name);
                }
            }
            for e in seq(&t["promql_expr_test"]) {
                queried.extend(
                    names(e["expr"].as_str().unwrap())
                        .into_iter()
                        .map(String::from),
                );
            }
        }
    }
    let rules = rules();
    for a in of_type(&rules, "alert") {
        let name = a["alert"].as_str().unwrap();
        assert!(firing.contains(name), "no test has {name} firing");
        assert!(quiet.contains(name), "no test has {name} not firing");
    }
    for r in of_type(&rules, "record") {
        let name = r["record"].as_str().unwrap();
        assert!(queried.contains(name), "no promql_expr_test queries {name}");
    }
}
