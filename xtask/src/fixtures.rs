//! `cargo xtask fixtures`: real, unmodified llama.cpp builds and a tiny GGUF model for the tests.
//!
//! llama.cpp's source comes from the `llama-cpp-python` sdist on PyPI (it vendors a llama.cpp
//! commit under `vendor/llama.cpp`), built with CMake into the cache. The model is written by
//! `assets/make_tiny_model.py` with PyPI `gguf` (llama.cpp's own writer) in a venv.
//!
//! Prints `KEY=VALUE` lines on stdout and writes them to `cache/fixtures.env`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

use crate::util::{self, progress};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Matrix {
    /// The newest llama.cpp and the tiny model.
    Default,
    /// Every llama.cpp row of the table, and the larger model too.
    Full,
}

/// One llama.cpp build made from a `llama-cpp-python` sdist.
pub struct LlamaFixture {
    /// Short name; the first row's keys have no suffix, the others get `_<NAME>`.
    pub name: &'static str,
    /// `llama-cpp-python` version whose sdist vendors the llama.cpp source.
    pub sdist_version: &'static str,
    pub sdist_sha256: &'static str,
    /// Directory under `cache/build/`.
    pub build_dir: &'static str,
    pub cmake_flags: &'static [&'static str],
    /// CMake targets: executables that land in `bin/` (libllama is built as their dependency).
    pub targets: &'static [&'static str],
    pub in_default_matrix: bool,
}

const NEWEST_FLAGS: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_CURL=OFF",
];

/// The llama.cpp builds. An older generation is one more row.
pub const LLAMA_FIXTURES: &[LlamaFixture] = &[LlamaFixture {
    name: "newest",
    sdist_version: "0.3.36",
    sdist_sha256: "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    build_dir: "newest",
    cmake_flags: NEWEST_FLAGS,
    targets: &["llama-server", "llama-cli", "llama-simple"],
    in_default_matrix: true,
}];

/// Python packages for the model generator (numpy's PCG64 stream is stable across versions).
const PYTHON_REQUIREMENTS: &[&str] = &["gguf==0.19.0", "numpy>=1.24"];

const MODEL_SCRIPT: &str = include_str!("../assets/make_tiny_model.py");

/// Prepares the fixtures, prints them as `KEY=VALUE` lines and writes `cache/fixtures.env`.
pub fn run(matrix: Matrix, large: bool) -> Result<()> {
    let vars = prepare(matrix, large)?;
    for (key, value) in &vars {
        println!("{key}={value}");
    }
    Ok(())
}

/// Prepares the fixtures and returns their `(KEY, VALUE)` pairs (also written to `fixtures.env`).
pub fn prepare(matrix: Matrix, large: bool) -> Result<Vec<(String, String)>> {
    let cache = util::cache_dir()?;
    let mut vars = Vec::new();

    for (index, fixture) in LLAMA_FIXTURES.iter().enumerate() {
        if matrix == Matrix::Default && !fixture.in_default_matrix {
            continue;
        }
        let suffix = if index == 0 {
            String::new()
        } else {
            format!("_{}", fixture.name.to_uppercase().replace('-', "_"))
        };
        let source = extract_sdist(&cache, fixture)?;
        let build = build_llama(&cache, fixture, &source)?;
        let bin = build.join("bin");
        for target in fixture.targets {
            let key = format!(
                "LLAMAPROBE_{}{suffix}",
                target.to_uppercase().replace('-', "_")
            );
            vars.push((key, path_string(&bin.join(target))));
        }
        vars.push((
            format!("LLAMAPROBE_LIBLLAMA{suffix}"),
            path_string(&find_libllama(&build)?),
        ));
    }

    let python = python_env(&cache)?;
    let models = cache.join("models");
    let tiny = make_model(&cache, &python, &models.join("tiny.gguf"), &[])?;
    vars.push(("LLAMAPROBE_MODEL".into(), path_string(&tiny)));
    if large || matrix == Matrix::Full {
        let big = make_model(
            &cache,
            &python,
            &models.join("tiny-large.gguf"),
            &["--large"],
        )?;
        vars.push(("LLAMAPROBE_MODEL_LARGE".into(), path_string(&big)));
    }

    let env_file: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    util::write_atomic(&cache.join("fixtures.env"), env_file.as_bytes())?;
    Ok(vars)
}

fn path_string(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------------------------
// llama.cpp source: the llama-cpp-python sdist

fn sdist_name(fixture: &LlamaFixture) -> String {
    format!("llama_cpp_python-{}", fixture.sdist_version)
}

fn sha256_of(path: &Path) -> Result<String> {
    let out = util::output(Command::new("sha256sum").arg(path))?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Makes sure `cache/src/llama_cpp_python-X.tar.gz` exists with the right sha256.
fn download_sdist(cache: &Path, fixture: &LlamaFixture) -> Result<PathBuf> {
    let src = cache.join("src");
    let tarball = src.join(format!("{}.tar.gz", sdist_name(fixture)));
    if tarball.is_file() {
        let sha = sha256_of(&tarball)?;
        if sha == fixture.sdist_sha256 {
            return Ok(tarball);
        }
        progress!(
            "{}: sha256 {sha} is wrong, downloading again",
            tarball.display()
        );
        fs::remove_file(&tarball)?;
    }
    fs::create_dir_all(&src)?;
    let requirement = format!("llama-cpp-python=={}", fixture.sdist_version);
    progress!("downloading the {requirement} sdist (about 77 MB)");

    // pip first; it cannot prepare this sdist's metadata without its build backend
    // (scikit-build-core) installed, so fall back to PyPI's JSON APIs and curl.
    let pip = util::run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                "llama-cpp-python",
            ])
            .args(["--no-build-isolation", "-q", "-d"])
            .arg(&src)
            .arg(&requirement),
    );
    if !tarball.is_file() {
        if let Err(err) = pip {
            progress!("pip download did not work ({err:#}); asking PyPI's JSON API instead");
        }
        let url = sdist_url(fixture)?;
        let partial = tarball.with_extension("part");
        util::run(
            Command::new("curl")
                .args(["-fL", "--retry", "3", "--progress-bar", "-o"])
                .arg(&partial)
                .arg(&url),
        )
        .with_context(|| format!("downloading {url} failed"))?;
        fs::rename(&partial, &tarball)?;
    }

    let sha = sha256_of(&tarball)?;
    if sha != fixture.sdist_sha256 {
        fs::remove_file(&tarball)?;
        bail!(
            "{} has sha256 {sha}, expected {}: removed it; run the command again",
            tarball.display(),
            fixture.sdist_sha256
        );
    }
    Ok(tarball)
}

/// The sdist's download URL, from PyPI's per-release JSON API, else the PEP 691 simple index.
fn sdist_url(fixture: &LlamaFixture) -> Result<String> {
    let filename = format!("{}.tar.gz", sdist_name(fixture));
    let release_api = format!(
        "https://pypi.org/pypi/llama-cpp-python/{}/json",
        fixture.sdist_version
    );
    if let Ok(text) = util::output(Command::new("curl").args(["-fsSL", &release_api])) {
        let json: serde_json::Value = serde_json::from_str(&text).context("PyPI JSON")?;
        let files = json["urls"].as_array().cloned().unwrap_or_default();
        if let Some(url) = files
            .iter()
            .find(|f| f["filename"] == filename.as_str())
            .and_then(|f| f["url"].as_str())
            .filter(|url| url.starts_with("https://"))
        {
            return Ok(url.to_string());
        }
    }
    let index = "https://pypi.org/simple/llama-cpp-python/";
    let text = util::output(Command::new("curl").args([
        "-fsSL",
        "-H",
        "Accept: application/vnd.pypi.simple.v1+json",
        index,
    ]))
    .with_context(|| format!("could not reach PyPI ({index}): check the network, or put {filename} into the cache's src/ by hand"))?;
    let json: serde_json::Value = serde_json::from_str(&text).context("PyPI simple index JSON")?;
    json["files"]
        .as_array()
        .and_then(|files| files.iter().find(|f| f["filename"] == filename.as_str()))
        .and_then(|f| f["url"].as_str())
        .map(str::to_string)
        .with_context(|| format!("PyPI lists no {filename}"))
}

/// Extracts the sdist to `cache/src/llama_cpp_python-X/`; returns its `vendor/llama.cpp`.
fn extract_sdist(cache: &Path, fixture: &LlamaFixture) -> Result<PathBuf> {
    let dir = cache.join("src").join(sdist_name(fixture));
    let source = dir.join("vendor/llama.cpp");
    if source.join("CMakeLists.txt").is_file() {
        return Ok(source);
    }
    let tarball = download_sdist(cache, fixture)?;
    progress!("extracting {}", tarball.display());
    // Into a scratch directory first, so an interrupted extraction is never mistaken for a good one.
    let scratch = cache
        .join("src")
        .join(format!(".extract-{}", sdist_name(fixture)));
    if scratch.exists() {
        fs::remove_dir_all(&scratch)?;
    }
    fs::create_dir_all(&scratch)?;
    util::run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&scratch),
    )?;
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::rename(scratch.join(sdist_name(fixture)), &dir).with_context(|| {
        format!(
            "{} has no top directory {}",
            tarball.display(),
            sdist_name(fixture)
        )
    })?;
    fs::remove_dir_all(&scratch)?;
    if !source.join("CMakeLists.txt").is_file() {
        bail!(
            "{} has no vendor/llama.cpp/CMakeLists.txt",
            tarball.display()
        );
    }
    Ok(source)
}

// ---------------------------------------------------------------------------------------------
// llama.cpp build

fn build_stamp(fixture: &LlamaFixture) -> String {
    format!(
        "sdist=llama-cpp-python=={} sha256={}\ncmake_flags={}\ntargets={}\n",
        fixture.sdist_version,
        fixture.sdist_sha256,
        fixture.cmake_flags.join(" "),
        fixture.targets.join(" ")
    )
}

/// Builds the fixture's targets into `cache/build/<dir>` unless a matching build is there.
fn build_llama(cache: &Path, fixture: &LlamaFixture, source: &Path) -> Result<PathBuf> {
    let build = cache.join("build").join(fixture.build_dir);
    let stamp_file = build.join(".llamaprobe-build-stamp");
    let stamp = build_stamp(fixture);

    wait_for_other_builds(&build);

    let built = fixture
        .targets
        .iter()
        .all(|t| build.join("bin").join(t).is_file());
    if built && fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(build);
    }

    let _ = fs::remove_file(&stamp_file);
    progress!(
        "building llama.cpp '{}' (llama-cpp-python {}) in {}: about 10 min on 2 cores when cold",
        fixture.name,
        fixture.sdist_version,
        build.display()
    );
    let started = Instant::now();
    util::run(
        Command::new("cmake")
            .arg("-S")
            .arg(source)
            .arg("-B")
            .arg(&build)
            .args(fixture.cmake_flags),
    )
    .context("configuring llama.cpp failed: see the CMake output above")?;
    let jobs = thread::available_parallelism().map_or(1, |n| n.get());
    util::run(
        Command::new("cmake")
            .arg("--build")
            .arg(&build)
            .arg(format!("-j{jobs}"))
            .arg("--target")
            .args(fixture.targets),
    )
    .context("building llama.cpp failed: see the compiler output above")?;
    for target in fixture.targets {
        if !build.join("bin").join(target).is_file() {
            bail!(
                "the build finished but made no bin/{target} in {}",
                build.display()
            );
        }
    }
    fs::write(&stamp_file, stamp)?;
    progress!(
        "built llama.cpp '{}' in {}",
        fixture.name,
        util::format_duration(started.elapsed())
    );
    Ok(build)
}

/// Waits while another `cmake --build <build>` (an earlier run, another terminal) is running.
fn wait_for_other_builds(build: &Path) {
    let mut announced = Instant::now() - Duration::from_secs(3600);
    loop {
        let pids = running_builds(build);
        if pids.is_empty() {
            return;
        }
        if announced.elapsed() >= Duration::from_secs(60) {
            progress!(
                "another build of {} is running (pid {}); waiting for it to finish",
                build.display(),
                pids.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            announced = Instant::now();
        }
        thread::sleep(Duration::from_secs(5));
    }
}

/// Processes whose command line is `cmake --build <build> ...`.
fn running_builds(build: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_cmake = args.first().is_some_and(|a| a.ends_with(b"cmake"));
        let builds_here = args.windows(2).any(|w| {
            w[0] == b"--build" && Path::new(std::str::from_utf8(w[1]).unwrap_or("")) == build
        });
        if is_cmake && builds_here {
            pids.push(pid);
        }
    }
    pids
}

/// The real file behind `libllama.so` in the build (`bin/libllama.so.0.0.NNNN`).
fn find_libllama(build: &Path) -> Result<PathBuf> {
    for dir in ["bin", "src", "lib"] {
        let link = build.join(dir).join("libllama.so");
        if link.exists() {
            return link
                .canonicalize()
                .with_context(|| format!("resolving {}", link.display()));
        }
    }
    bail!(
        "no libllama.so in {}/{{bin,src,lib}}: was it built with BUILD_SHARED_LIBS=ON?",
        build.display()
    )
}

// ---------------------------------------------------------------------------------------------
// Tiny model

/// A Python interpreter that can `import gguf, numpy`.
struct PythonEnv {
    python: PathBuf,
    /// Set when the packages were installed with `pip install --target` (no venv module).
    pythonpath: Option<PathBuf>,
}

impl PythonEnv {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.python);
        if let Some(dir) = &self.pythonpath {
            cmd.env("PYTHONPATH", dir);
        }
        cmd
    }

    fn has_packages(&self) -> bool {
        self.command()
            .args(["-c", "import gguf, numpy"])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

/// A venv at `cache/venv` with gguf and numpy (or `cache/pylib` via `pip --target`).
fn python_env(cache: &Path) -> Result<PythonEnv> {
    let requirements = PYTHON_REQUIREMENTS.join("\n") + "\n";
    let venv = cache.join("venv");
    let pylib = cache.join("pylib");
    let venv_env = PythonEnv {
        python: venv.join("bin/python"),
        pythonpath: None,
    };
    let target_env = PythonEnv {
        python: "python3".into(),
        pythonpath: Some(pylib.clone()),
    };

    let stamp_ok = |dir: &Path| {
        fs::read_to_string(dir.join(".llamaprobe-requirements"))
            .ok()
            .as_deref()
            == Some(requirements.as_str())
    };
    if stamp_ok(&venv) && venv_env.has_packages() {
        return Ok(venv_env);
    }
    if stamp_ok(&pylib) && target_env.has_packages() {
        return Ok(target_env);
    }

    if !venv_env.python.is_file() {
        progress!("creating a Python venv at {}", venv.display());
        let made = util::run(Command::new("python3").arg("-m").arg("venv").arg(&venv));
        if made.is_err() || !venv_env.python.is_file() {
            let _ = fs::remove_dir_all(&venv);
        }
    }
    if venv_env.python.is_file() {
        progress!(
            "installing {} into {}",
            PYTHON_REQUIREMENTS.join(" "),
            venv.display()
        );
        util::run(
            venv_env
                .command()
                .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
                .args(PYTHON_REQUIREMENTS),
        )
        .context("pip could not install the model generator's packages")?;
        fs::write(venv.join(".llamaprobe-requirements"), &requirements)?;
        return Ok(venv_env);
    }

    progress!(
        "no usable `python3 -m venv`: installing {} into {} with pip --target",
        PYTHON_REQUIREMENTS.join(" "),
        pylib.display()
    );
    fs::create_dir_all(&pylib)?;
    util::run(
        Command::new("python3")
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "--upgrade", "--target"])
            .arg(&pylib)
            .args(PYTHON_REQUIREMENTS),
    )
    .context("pip could not install the model generator's packages: install python3-venv (Debian) and retry")?;
    fs::write(pylib.join(".llamaprobe-requirements"), &requirements)?;
    Ok(target_env)
}

/// Writes `output` with the generator script unless the same script made it with the same args.
fn make_model(cache: &Path, python: &PythonEnv, output: &Path, args: &[&str]) -> Result<PathBuf> {
    let stamp_file = output.with_extension("gguf.stamp");
    let stamp = format!(
        "script={:016x}\nargs={}\n",
        util::fnv1a(MODEL_SCRIPT.as_bytes()),
        args.join(" ")
    );
    if output.is_file() && fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(output.to_path_buf());
    }

    let script = cache.join("scripts/make_tiny_model.py");
    if fs::read_to_string(&script).ok().as_deref() != Some(MODEL_SCRIPT) {
        util::write_atomic(&script, MODEL_SCRIPT.as_bytes())?;
    }
    let _ = fs::remove_file(&stamp_file);
    let partial = output.with_extension("gguf.part");
    if let Some(dir) = output.parent() {
        fs::create_dir_all(dir)?;
    }
    progress!("generating {}", output.display());
    util::run(python.command().arg(&script).args(args).arg(&partial))
        .context("generating the tiny GGUF model failed")?;
    fs::rename(&partial, output)?;
    fs::write(&stamp_file, stamp)?;
    Ok(output.to_path_buf())
}
