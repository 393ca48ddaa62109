//! The host agent's configuration file (TOML).
//!
//! Its keys are the daemon's long option names (`rescan = 5`, `metrics-addr = "0.0.0.0:9464"`,
//! `exclude = ["comm:llama-bench"]`; `_` may stand for `-`). Each key is given to the option as
//! its `LLAMAPROBE_*` variable would be, so a flag or a variable set in the environment
//! overrides the file, and the file the defaults. A key the daemon does not have, or a value
//! its option refuses, is an error that names the file and the key.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{CommandFactory, Parser};

use super::cli::Cli;

/// The file read when no `--config` is given, if it exists.
pub const DEFAULT_CONFIG: &str = "/etc/llamaprobe/llamaprobe.toml";

/// Errors of the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {path} is not valid TOML: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("configuration file {path}: unknown key `{key}` (known: {known})")]
    UnknownKey {
        path: PathBuf,
        key: String,
        known: String,
    },
    #[error("configuration file {path}: `{key}`: {message}")]
    BadValue {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The configuration file `args` (llamaprobe's command line) asks for: `daemon --config FILE`,
/// else `LLAMAPROBE_CONFIG`, else [`DEFAULT_CONFIG`] if it exists. `None` for other commands.
pub fn requested(args: &[OsString]) -> Option<PathBuf> {
    let args: Vec<String> = args
        .iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut i = 0;
    // The subcommand: the first word that is not an option (or the value of --log).
    while i < args.len() && args[i].starts_with('-') {
        i += if args[i] == "--log" { 2 } else { 1 };
    }
    if args.get(i).map(String::as_str) != Some("daemon") {
        return None;
    }
    let rest = &args[i + 1..];
    for (j, a) in rest.iter().enumerate() {
        if a == "--" {
            break;
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(v.into());
        }
        if a == "--config" {
            return rest.get(j + 1).map(PathBuf::from);
        }
    }
    if let Some(v) = std::env::var_os("LLAMAPROBE_CONFIG") {
        return Some(v.into());
    }
    Path::new(DEFAULT_CONFIG)
        .exists()
        .then(|| DEFAULT_CONFIG.into())
}

/// The daemon options a file may set: long name → variable.
fn settable() -> Vec<(String, String)> {
    let cli = Cli::command();
    let daemon = cli
        .find_subcommand("daemon")
        .expect("the daemon subcommand exists");
    daemon
        .get_arguments()
        .filter(|a| a.get_id() != "config")
        .filter_map(|a| {
            Some((
                a.get_long()?.to_string(),
                a.get_env()?.to_string_lossy().into_owned(),
            ))
        })
        .collect()
}

/// A TOML value as an option's text (an array: comma-separated, as the list options take).
fn text(v: &toml::Value) -> Option<String> {
    Some(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(a) => a.iter().map(text).collect::<Option<Vec<_>>>()?.join(","),
        _ => return None,
    })
}

/// Reads `path` and checks every key and value; returns the variables it sets.
pub fn load(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let body = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &body)
}

/// [`load`] on the text `body` of the file `path` (named in errors): the parsing entry point,
/// for fuzzing and tests. Any text gives the variables or an error, never a panic.
pub fn parse(path: &Path, body: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let table: toml::Table = body
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Toml {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
    let options = settable();
    let mut out = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some((_, var)) = options.iter().find(|(l, _)| *l == long) else {
            return Err(ConfigError::UnknownKey {
                path: path.to_path_buf(),
                key: key.clone(),
                known: options
                    .iter()
                    .map(|(l, _)| l.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let bad = |message: String| ConfigError::BadValue {
            path: path.to_path_buf(),
            key: key.clone(),
            message,
        };
        let value = text(value)
            .ok_or_else(|| bad("not a string, number, boolean or list of them".into()))?;
        // The option's own parser judges the value.
        if let Err(e) = Cli::try_parse_from(["llamaprobe", "daemon", &format!("--{long}={value}")])
        {
            let msg = e.kind().to_string();
            let detail = e
                .to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ")
                .to_string();
            return Err(bad(if detail.is_empty() { msg } else { detail }));
        }
        out.push((var.clone(), value));
    }
    Ok(out)
}

/// Applies the file `args` ask for: each of its settings becomes its variable unless the
/// environment has it already. Called first thing in `main`, before any thread exists.
pub fn apply(args: &[OsString]) -> Result<Option<PathBuf>, ConfigError> {
    let Some(path) = requested(args) else {
        return Ok(None);
    };
    for (var, value) in load(&path)? {
        if std::env::var_os(&var).is_none() {
            std::env::set_var(var, value);
        }
    }
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, body: &str) -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("llamaprobe-cfg-{}-{name}.toml", std::process::id()));
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn keys_become_the_variables_of_their_options() {
        let p = write(
            "ok",
            "rescan = 5\nmax_processes = 8\nexclude = [\"comm:llama-bench\", \"exe:*-test\"]\nmetrics-addr = \"127.0.0.1:9999\"\nlog-format = \"json\"\n",
        );
        let mut got = load(&p).unwrap();
        got.sort();
        assert_eq!(
            got,
            [
                (
                    "LLAMAPROBE_EXCLUDE".to_string(),
                    "comm:llama-bench,exe:*-test".to_string()
                ),
                ("LLAMAPROBE_LOG_FORMAT".into(), "json".into()),
                ("LLAMAPROBE_MAX_PROCESSES".into(), "8".into()),
                ("LLAMAPROBE_METRICS_ADDR".into(), "127.0.0.1:9999".into()),
                ("LLAMAPROBE_RESCAN".into(), "5".into()),
            ]
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_file_and_key() {
        let p = write("unknown", "rescan = 5\nrescna = 2\n");
        let e = load(&p).unwrap_err().to_string();
        assert!(
            e.contains("unknown key `rescna`") && e.contains("rescan"),
            "{e}"
        );
        let p = write("bad", "max-processes = \"many\"\n");
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("`max-processes`") && e.contains("many"), "{e}");
        let p = write("sel", "include = [\"image:x\"]\n");
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("unknown selector kind `image`"), "{e}");
        let p = write("toml", "rescan = = 2\n");
        assert!(matches!(load(&p), Err(ConfigError::Toml { .. })));
    }

    #[test]
    fn the_file_is_asked_for_by_the_daemon_only() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            requested(&args(&[
                "llamaprobe",
                "--log",
                "debug",
                "daemon",
                "--config",
                "/x.toml"
            ])),
            Some("/x.toml".into())
        );
        assert_eq!(
            requested(&args(&["llamaprobe", "daemon", "--config=/y.toml"])),
            Some("/y.toml".into())
        );
        assert_eq!(
            requested(&args(&[
                "llamaprobe",
                "attach",
                "--pid",
                "1",
                "--config",
                "/x"
            ])),
            None
        );
    }
}
