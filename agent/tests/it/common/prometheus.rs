//! A real Prometheus (Debian's `prometheus` package) started by a test: its own port and
//! storage, scraping the given targets every second and evaluating the project's rules every
//! second; queried through its HTTP API.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{
    rules_file, scratch,
    server::{free_port, get, http},
};

/// A running Prometheus, killed on drop.
pub struct Prometheus {
    child: Child,
    /// Scrape targets configured.
    targets: usize,
    pub port: u16,
    pub dir: PathBuf,
}

/// One series of a query's result: its labels and its last value.
#[derive(Debug, Clone)]
pub struct Series {
    pub labels: serde_json::Map<String, Value>,
    pub value: f64,
}

impl Series {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).and_then(Value::as_str).unwrap_or("")
    }
}

impl Prometheus {
    /// Scrapes `targets` (job name, host:port) every second and loads the project's rules.
    pub fn start(name: &str, targets: &[(&str, String)]) -> Self {
        let dir = scratch(&format!("prometheus-{name}"));
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n",
            rules_file().display()
        );
        for (job, target) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            ));
        }
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Self {
            child,
            targets: targets.len(),
            port,
            dir,
        };
        let t0 = Instant::now();
        while get(&p.url("/-/ready")).is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "prometheus not ready after 60 s: {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GET an API path with query parameters; the `data` of a successful answer.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let mut req = http().get(&self.url(path));
        for (k, v) in params {
            req = req.query(*k, *v);
        }
        let mut resp = req
            .call()
            .unwrap_or_else(|e| panic!("prometheus {path} {params:?}: {e}"));
        let body: Value = resp.body_mut().read_json().unwrap();
        assert_eq!(body["status"], "success", "{path} {params:?}: {body}");
        body["data"].clone()
    }

    /// The rules loaded whose latest evaluation failed: (name, error).
    pub fn failing_rules(&self) -> Vec<(String, String)> {
        let data = self.api("/api/v1/rules", &[]);
        data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .filter(|r| r["health"] != "ok")
            .map(|r| {
                (
                    r["name"].as_str().unwrap_or("").to_string(),
                    r["lastError"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// An instant query at `time` (Unix seconds).
    pub fn query_at(&self, expr: &str, time: f64) -> Vec<Series> {
        let data = self.api(
            "/api/v1/query",
            &[("query", expr), ("time", &format!("{time:.3}"))],
        );
        vector(&data["result"], |s| s["value"].clone())
    }

    /// A range query over [start, end] with a step of one second: each series with its last
    /// value.
    pub fn query_range(&self, expr: &str, start: f64, end: f64) -> Vec<Series> {
        let data = self.api(
            "/api/v1/query_range",
            &[
                ("query", expr),
                ("start", &format!("{start:.3}")),
                ("end", &format!("{end:.3}")),
                ("step", "1"),
            ],
        );
        vector(&data["result"], |s| {
            s["values"]
                .as_array()
                .and_then(|v| v.last())
                .cloned()
                .unwrap_or_default()
        })
    }

    /// The sum of an instant query's values at `time` (0 when it has none).
    pub fn sum_at(&self, expr: &str, time: f64) -> f64 {
        self.query_at(&format!("sum({expr})"), time)
            .first()
            .map_or(0.0, |s| s.value)
    }

    /// The values of `label` over the series that match `selector` in [start, end]: what
    /// Grafana's `label_values(selector, label)` offers.
    pub fn label_values(&self, selector: &str, label: &str, start: f64, end: f64) -> Vec<String> {
        let data = self.api(
            "/api/v1/series",
            &[
                ("match[]", selector),
                ("start", &format!("{start:.3}")),
                ("end", &format!("{end:.3}")),
            ],
        );
        let mut out: Vec<String> = data
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s[label].as_str())
            .filter(|v| !v.is_empty())
            .map(String::from)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Waits until every target has been scraped, and up, twice after now (the latest values
    /// are in); returns the time then. Prometheus spreads its targets' first scrapes over the
    /// interval: each must have answered.
    pub fn two_scrapes(&self) -> f64 {
        let since = now();
        let t0 = Instant::now();
        loop {
            let ups = self.query_at("timestamp(up)", now());
            if ups.len() == self.targets && ups.iter().all(|s| s.value > since + 1.0) {
                let down = self.query_at("up == 0", now());
                assert!(down.is_empty(), "targets down: {down:?}\n{}", self.log());
                return now();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "not every target scraped twice in 30 s: {ups:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Unix time now, in seconds.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The series of a `vector` or `matrix` result, each with the value `pick` takes.
fn vector(result: &Value, pick: impl Fn(&Value) -> Value) -> Vec<Series> {
    result
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| Series {
            labels: s["metric"].as_object().cloned().unwrap_or_default(),
            value: pick(s)[1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN),
        })
        .collect()
}
