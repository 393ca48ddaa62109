//! The llama.cpp fixtures `cargo xtask fixtures` prepared (`LLAMAPROBE_FIXTURES` names a JSON
//! list; see xtask/src/fixtures.rs for the one table they come from).

use std::{collections::HashMap, path::PathBuf, process::Command};

use serde_json::Value;

/// One real llama.cpp build.
#[derive(Clone, Debug)]
pub struct Fixture {
    pub name: String,
    pub generation: String,
    pub server: Option<PathBuf>,
    /// Its llama-cli, when built.
    pub cli: Option<PathBuf>,
    pub driver: Option<PathBuf>,
    pub libllama: Option<PathBuf>,
    pub env: HashMap<String, String>,
    pub symbols_from: Option<PathBuf>,
    pub dwarf: bool,
    pub stripped: bool,
    pub linkage: String,
    /// A directory whose `node_modules` holds the npm binding (the npm fixture).
    pub node_app: Option<PathBuf>,
    /// The Python of a venv with a PyPI package that embeds llama.cpp (the pypi2024 fixture).
    pub python: Option<PathBuf>,
    /// A program built with -g from the fixture's own llama.h (CMake fixtures): its structs'
    /// DWARF.
    pub layout_probe: Option<PathBuf>,
}

fn path(v: &Value) -> Option<PathBuf> {
    v.as_str().map(PathBuf::from)
}

impl Fixture {
    fn from_json(v: &Value) -> Self {
        Self {
            name: v["name"].as_str().unwrap_or("?").to_string(),
            generation: v["generation"].as_str().unwrap_or("?").to_string(),
            server: path(&v["server"]),
            cli: path(&v["cli"]),
            driver: path(&v["driver"]),
            libllama: path(&v["libllama"]),
            env: v["env"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                        .collect()
                })
                .unwrap_or_default(),
            symbols_from: path(&v["symbols_from"]),
            dwarf: v["dwarf"].as_bool().unwrap_or(false),
            stripped: v["stripped"].as_bool().unwrap_or(false),
            linkage: v["linkage"].as_str().unwrap_or("shared").to_string(),
            node_app: path(&v["node_app"]),
            python: path(&v["python"]),
            layout_probe: path(&v["layout_probe"]),
        }
    }

    /// Applies the fixture's environment (e.g. LD_LIBRARY_PATH of a stripped copy).
    pub fn apply(&self, cmd: &mut Command) {
        cmd.envs(&self.env);
    }

    /// `--symbols-from FILE` arguments, if the fixture needs them.
    pub fn symbols_args(&self) -> Vec<String> {
        match &self.symbols_from {
            Some(p) => vec!["--symbols-from".into(), p.display().to_string()],
            None => vec![],
        }
    }
}

/// Every fixture prepared, or a skip (a failure under `cargo xtask test`).
pub fn all(test: &str) -> Vec<Fixture> {
    if let Some(p) = std::env::var_os("LLAMAPROBE_FIXTURES") {
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        let list: Vec<Value> = serde_json::from_str(&text).unwrap();
        return list.iter().map(Fixture::from_json).collect();
    }
    // Only the newest server, as plain variables.
    if let Some(server) = super::fixture_or_skip(test, "LLAMAPROBE_LLAMA_SERVER") {
        return vec![Fixture {
            name: "newest".into(),
            generation: "batch_ext".into(),
            server: Some(server),
            cli: None,
            driver: None,
            libllama: None,
            env: HashMap::new(),
            symbols_from: None,
            dwarf: false,
            stripped: false,
            linkage: "shared".into(),
            node_app: None,
            python: None,
            layout_probe: None,
        }];
    }
    vec![]
}

/// The tiny model, or a skip.
pub fn model(test: &str) -> Option<PathBuf> {
    super::fixture_or_skip(test, "LLAMAPROBE_MODEL")
}
