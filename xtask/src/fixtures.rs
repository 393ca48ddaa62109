//! `cargo xtask fixtures`: a version/build matrix of real, unmodified llama.cpp builds, and a tiny
//! GGUF model, for the tests.
//!
//! Every fixture is one row of [`FIXTURES`], the one place that records what it is: where it
//! comes from, its llama.cpp build number and commit, API generation, linkage, which binaries it
//! has, and the facts the tests check against it (symbols, struct offsets). Sources:
//!
//! - `llama-cpp-python` sdists from PyPI (each vendors a llama.cpp commit under
//!   `vendor/llama.cpp`), built with CMake into `cache/build/<name>`;
//! - the prebuilt libllama of an npm package, with a small C driver of ours
//!   (`agent/tests/embedded/driver.c`) linked against it;
//! - the wheel of a PyPI package with a prebuilt llama.cpp inside (gpt4all), in a venv;
//! - `strip --strip-all` copies of other fixtures' files.
//!
//! The model is written by `assets/make_tiny_model.py` with PyPI `gguf` (llama.cpp's own writer)
//! in a venv.
//!
//! Prints `KEY=VALUE` lines on stdout (also written to `cache/fixtures.env`) and describes every
//! fixture of the chosen matrix in `cache/fixtures.json` (`LLAMAPROBE_FIXTURES`).

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Instant, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde_json::{json, Value};

use crate::util::{self, progress};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Matrix {
    /// The newest llama.cpp, a mid-2025 classic build, the npm prebuilt library with our driver,
    /// a stripped copy of the newest libllama, gpt4all's wheel (a 2024 llama.cpp inside), and
    /// the tiny model.
    Default,
    /// Every row of the fixture table (adds late and mid 2024 llama-servers, and a static -g
    /// build with a stripped copy), and the larger model too.
    Full,
}

impl Matrix {
    pub fn name(self) -> &'static str {
        match self {
            Matrix::Default => "default",
            Matrix::Full => "full",
        }
    }
}

/// How a decode step enters libllama: the catalog's generations, which the agent detects.
pub use llamaprobe_catalog::Generation;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Linkage {
    /// libllama and ggml are shared libraries.
    Shared,
    /// Everything is in the executable.
    Static,
}

impl Linkage {
    pub fn as_str(self) -> &'static str {
        match self {
            Linkage::Shared => "shared",
            Linkage::Static => "static",
        }
    }
}

/// A `llama-cpp-python` sdist on PyPI.
pub struct Sdist {
    pub version: &'static str,
    pub sha256: &'static str,
}

/// llama.cpp built with CMake from an sdist's `vendor/llama.cpp`.
pub struct CmakeBuild {
    pub sdist: Sdist,
    /// Directory under `cache/build/`.
    pub build_dir: &'static str,
    pub cmake_flags: &'static [&'static str],
    /// CMake targets: executables that land in `bin/` (libllama is built as their dependency).
    pub targets: &'static [&'static str],
}

/// A prebuilt libllama from npm, driven by our own program.
pub struct NpmPrebuilt {
    pub package: &'static str,
    pub version: &'static str,
    /// sha256 of the `npm pack` tarball (npm's own integrity: see the row).
    pub sha256: &'static str,
    /// Directory of the libraries inside the tarball.
    pub lib_dir: &'static str,
    /// The libllama file in `lib_dir` (its SONAME too).
    pub libllama: &'static str,
    /// Our driver's C source, relative to the workspace root.
    pub driver_source: &'static str,
    /// The npm binding whose prebuilt library this is, installed (same version) beside it so
    /// that the tests drive libllama through the binding's own JavaScript API.
    pub binding: &'static str,
}

/// A Python package from PyPI whose wheel carries a prebuilt llama.cpp, installed with its
/// pinned dependencies in a venv of its own so that the tests drive it through its own Python
/// API.
pub struct PypiWheel {
    pub package: &'static str,
    pub version: &'static str,
    /// The wheel's file name on PyPI.
    pub file: &'static str,
    pub sha256: &'static str,
    /// The shared library with llama.cpp inside, relative to the venv's site-packages.
    pub libllama: &'static str,
    /// Its dependencies from PyPI, pinned (installed with `--no-deps`, so nothing else comes).
    pub requirements: &'static [&'static str],
}

pub enum Source {
    Build(CmakeBuild),
    Npm(NpmPrebuilt),
    Wheel(PypiWheel),
    /// A copy of the shared-library directory of fixture `from` with `libllama.so*` stripped
    /// (`strip --strip-all`); `from`'s executables run on it with `LD_LIBRARY_PATH`.
    StripLibllama {
        from: &'static str,
    },
    /// A `strip --strip-all` copy of fixture `from`'s `llama-server` (`from` stays the unstripped
    /// copy for `--symbols-from`).
    StripServer {
        from: &'static str,
    },
}

/// One fixture: a real llama.cpp build (or a copy of one) and what is known about it.
pub struct Fixture {
    pub name: &'static str,
    pub in_default_matrix: bool,
    pub source: Source,
    /// `bNNNN (commit abcdef0)`: the build number is the commit count (`git rev-list --count`),
    /// as llama.cpp's release tags are.
    pub llama_cpp: &'static str,
    /// Year and month of that llama.cpp commit.
    pub date: &'static str,
    pub generation: Generation,
    pub linkage: Linkage,
    /// No `.symtab` left in the files that matter (libllama, or the static executable).
    pub stripped: bool,
    /// The executables carry DWARF (`-g`). Struct layouts are the catalog's (catalog/src/layouts.rs) alone: the
    /// test `dwarf_of_the_debug_fixture_matches_the_layout_table` (agent/tests/it/matrix.rs) checks
    /// them against such a fixture's DWARF with `llamaprobe layout`.
    pub dwarf: bool,
    /// Where llama-server's own code is: `"executable"` or the library's file name.
    pub server_code: Option<&'static str>,
    /// Compatibility table: the llama.cpp versions or builds this fixture stands for.
    pub covers: &'static str,
    /// Compatibility table: what llamaprobe measures on it.
    pub measured: &'static str,
}

/// llama-cpp-python 0.3.36: llama.cpp 0c1e57098bba (2026-10-01, "webgpu: fix SSM_SCAN binding
/// aliasing (#29750)"), b11312. The sdist's CHANGELOG.md says "update llama.cpp to
/// ggml-org/llama.cpp@0c1e57098", its shallow `.git/modules/vendor/llama.cpp` has the full
/// hash; the build number is from llama.cpp release references (the shallow clone cannot
/// count commits).
const SDIST_0_3_36: Sdist = Sdist {
    version: "0.3.36",
    sha256: "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
};

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

/// The newest source again, everything linked into the executables, with DWARF.
const STATIC_FLAGS: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_CURL=OFF",
];

/// 2024-2025 CMake: no LLAMA_OPENSSL / LLAMA_USE_PREBUILT_UI (the web UI is a checked-in
/// `index.html(.gz)`); HTTPS is LLAMA_SERVER_SSL (off by default; explicit here); LLAMA_CURL
/// defaults to ON in 2025 (needs libcurl headers) and OFF in 2024.
const CLASSIC_FLAGS: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_SERVER_SSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_CURL=OFF",
];

const SERVER_CLI_SIMPLE: &[&str] = &["llama-server", "llama-cli", "llama-simple"];

/// The fixtures. A fixture's `from` must come earlier, in the same or a smaller matrix.
pub const FIXTURES: &[Fixture] = &[
    Fixture {
        name: "newest",
        in_default_matrix: true,
        source: Source::Build(CmakeBuild {
            sdist: SDIST_0_3_36,
            build_dir: "newest",
            cmake_flags: NEWEST_FLAGS,
            targets: SERVER_CLI_SIMPLE,
        }),
        llama_cpp: "b11312 (commit 0c1e570)",
        date: "2026-10",
        generation: Generation::BatchExt,
        linkage: Linkage::Shared,
        stripped: false,
        dwarf: false,
        // llama-server → libllama-server-impl.so → libllama-common.so (common_sampler_sample).
        server_code: Some("libllama-server-impl.so"),
        covers: "2026+ (`llama_process`), shared libraries",
        measured: "all: decode steps, sampling (`common_sampler_sample` in libllama-common.so), \
                   synchronize, model load, context",
    },
    Fixture {
        name: "newest-stripped",
        in_default_matrix: true,
        source: Source::StripLibllama { from: "newest" },
        llama_cpp: "b11312 (commit 0c1e570)",
        date: "2026-10",
        generation: Generation::BatchExt,
        linkage: Linkage::Shared,
        stripped: true,
        dwarf: false,
        server_code: Some("libllama-server-impl.so"),
        covers: "2026+, shared libraries, libllama stripped",
        measured: "all, from `.dynsym` alone",
    },
    // llama-cpp-python 0.3.14 (PyPI 2025-07-18): llama.cpp 79e0b68c1786 (2025-07-16, "llama: add
    // LLAMA_API to deprecated llama_kv_self_seq_div (#14708)"), b5904 (commit count in a
    // full clone; Homebrew's b5900 = 10a0351a and b5910 = 6ffd4e9c bracket it). Vendored
    // llama.h: llama_decode(ctx, struct llama_batch), llama_model_load_from_file,
    // llama_init_from_model, llama_sampler_*, no llama_process; tools/server/server.cpp is
    // compiled into the llama-server executable with the static `common` library.
    Fixture {
        name: "mid2025",
        in_default_matrix: true,
        source: Source::Build(CmakeBuild {
            sdist: Sdist {
                version: "0.3.14",
                sha256: "c7ffd71685923a911206a40e972c1ec739aa21032100fdc8618316571b173507",
            },
            build_dir: "mid2025",
            cmake_flags: CLASSIC_FLAGS,
            targets: SERVER_CLI_SIMPLE,
        }),
        llama_cpp: "b5904 (commit 79e0b68)",
        date: "2025-07",
        generation: Generation::Classic,
        linkage: Linkage::Shared,
        stripped: false,
        dwarf: false,
        server_code: Some("executable"),
        covers: "b4463 … 2026 classic (`llama_model_load_from_file`, `llama_init_from_model`), \
                 shared libraries",
        measured: "all; `common_sampler_sample` from the executable's `.symtab`",
    },
    // npm @node-llama-cpp/linux-x64 3.22.1 (published 2026-09-28): llama.cpp release v0.5.0
    // (bins/linux-x64/_nlcBuildMetadata.json; the binaries' build info says b1-0ad4a86, which
    // is node-llama-cpp's own commit). Classic: llama_decode, llama_model_load_from_file,
    // llama_init_from_model, no llama_process; the CPU backend is a dlopen'ed
    // libggml-cpu-<arch>.so. npm's integrity: sha512-5uCCDNqWCNfaAm8aR/Uzxbo4HBpKgNF91kCHPepK
    // hgMgV2OAmatoefbOlMihsqCiH2Od35E/eUHQCFbfRBJuOg==.
    Fixture {
        name: "npm",
        in_default_matrix: true,
        source: Source::Npm(NpmPrebuilt {
            package: "@node-llama-cpp/linux-x64",
            version: "3.22.1",
            sha256: "0d953e1503d5ab4608d8ed5b739132308c81ac05ffeb760d2a7f30e08a9f90e0",
            lib_dir: "package/bins/linux-x64",
            libllama: "libllama.v0.5.0.so",
            driver_source: "agent/tests/embedded/driver.c",
            binding: "node-llama-cpp",
        }),
        llama_cpp: "v0.5.0 (release tag; no commit recorded)",
        date: "2026-09",
        generation: Generation::Classic,
        linkage: Linkage::Shared,
        stripped: false,
        dwarf: false,
        server_code: None,
        covers: "prebuilt libllama embedded in another program (classic, 2026)",
        measured: "all (sampling through `llama_sampler_sample`), in our driver: 12 decode steps, \
                   9 prompt tokens, 12 samples",
    },
    // PyPI gpt4all 2.8.2 (2024-08-14), manylinux1 wheel sha256 as on PyPI: its Python binding
    // dlopen's libllmodel.so, which dlopen's libllamamodel-mainline-<variant>.so, a library
    // with nomic-ai's fork of llama.cpp compiled in and llama.h exported (the CPU runs on the
    // `kompute` variant; the CUDA ones fail to load without libcudart). The wheel records no
    // llama.cpp commit; its API dates it to July 2024 (llama_lora_adapter_init is there,
    // llama_model_has_decoder and llama_model_is_recurrent are not yet): the 2024 generation
    // (llama_sample_token*, 72-byte llama_batch, llama_load_model_from_file,
    // llama_new_context_with_model). Sampling is the binding's own chain of
    // llama_sample_* calls ending in llama_sample_token or _greedy.
    Fixture {
        name: "pypi2024",
        in_default_matrix: true,
        source: Source::Wheel(PypiWheel {
            package: "gpt4all",
            version: "2.8.2",
            file: "gpt4all-2.8.2-py3-none-manylinux1_x86_64.whl",
            sha256: "c61e977afa72475c076211fd9b59a88334fc0062615be8c2f7716363a21fbafa",
            libllama: "gpt4all/llmodel_DO_NOT_MODIFY/build/libllamamodel-mainline-kompute.so",
            requirements: &[
                "certifi==2026.10.19.post1",
                "charset-normalizer==3.5.3",
                "idna==3.20",
                "requests==2.34.2",
                "tqdm==4.70.1",
                "urllib3==2.8.0",
            ],
        }),
        llama_cpp: "fork nomic-ai/llama.cpp of 2024-07 (no commit recorded)",
        date: "2024-07",
        generation: Generation::Legacy,
        linkage: Linkage::Shared,
        stripped: false,
        dwarf: false,
        server_code: None,
        covers: "a 2024 llama.cpp embedded in another program's library (gpt4all's Python \
                 binding, `libllamamodel-mainline-*.so`)",
        measured: "decode steps (prompt chunks of 8), sampling (`llama_sample_token*`, its row \
                   inferred), context use, through gpt4all's own API: one request per completion, \
                   prompt and generated tokens equal to its own counts",
    },
    // llama-cpp-python 0.3.5 (PyPI 2024-12-10): llama.cpp 26a8406ba919 (2024-12-09, "CUDA: fix
    // shared memory access condition for mmv (#10740)"), b4295 (commit count; Homebrew's
    // llama.cpp b4295 formula names the same revision). The newest sdist whose llama.h has
    // neither llama_model_load_from_file (b4424+) nor llama_init_from_model (b4463+): 0.3.6 is
    // b4447 and has the first. llama_decode takes the 56-byte batch, llama_sampler_* exist;
    // examples/server is compiled into the executable.
    Fixture {
        name: "late2024",
        in_default_matrix: false,
        source: Source::Build(CmakeBuild {
            sdist: Sdist {
                version: "0.3.5",
                sha256: "f5ce47499d53d3973e28ca5bdaf2dfe820163fa3fb67e3050f98e2e9b58d2cf6",
            },
            build_dir: "late2024",
            cmake_flags: CLASSIC_FLAGS,
            targets: SERVER_CLI_SIMPLE,
        }),
        llama_cpp: "b4295 (commit 26a8406)",
        date: "2024-12",
        generation: Generation::Classic,
        linkage: Linkage::Shared,
        stripped: false,
        dwarf: false,
        server_code: Some("executable"),
        covers: "b3943 … b4423 classic (only `llama_load_model_from_file`, \
                 `llama_new_context_with_model`), shared libraries",
        measured: "all; model load and context through those two entry points",
    },
    // llama-cpp-python 0.2.90 (PyPI 2024-08-29): llama.cpp cfac111e2b39 (its CHANGELOG.md:
    // "Update llama.cpp to ggerganov/llama.cpp@cfac111e2b3953cdb6b0126e67a2487687646971"; the
    // build's own info says commit 1d1ccce, build 1: the sdist has no git history, so no
    // bNNNN). The 2024 API: llama_sample_token* (no llama_sampler_*), llama_decode with the
    // 72-byte batch, llama_load_model_from_file / llama_new_context_with_model, seed first in
    // llama_context_params; examples/server compiled into the executable, with the single-task
    // server_queue::post(server_task) and server_slot::release inlined.
    Fixture {
        name: "mid2024",
        in_default_matrix: false,
        source: Source::Build(CmakeBuild {
            sdist: Sdist {
                version: "0.2.90",
                sha256: "419b041c62dbdb9f7e67883a6ef2f247d583d08417058776be0bff05b4ec9e3d",
            },
            build_dir: "mid2024",
            cmake_flags: CLASSIC_FLAGS,
            targets: SERVER_CLI_SIMPLE,
        }),
        llama_cpp: "commit cfac111 (no build number recorded)",
        date: "2024-08",
        generation: Generation::Legacy,
        linkage: Linkage::Shared,
        stripped: false,
        dwarf: false,
        server_code: Some("executable"),
        covers: "2024 before b3681 (`llama_sample_token*`, 72-byte `llama_batch`), shared \
                 libraries",
        measured: "decode steps, sampling (`llama_sampling_sample` in the executable), model \
                   load, context; requests by task id with queue wait, ended by silence \
                   (`server_slot::release` is inlined)",
    },
    Fixture {
        name: "static",
        in_default_matrix: false,
        source: Source::Build(CmakeBuild {
            sdist: SDIST_0_3_36,
            build_dir: "static",
            cmake_flags: STATIC_FLAGS,
            targets: &["llama-server", "llama-cli"],
        }),
        llama_cpp: "b11312 (commit 0c1e570)",
        date: "2026-10",
        generation: Generation::BatchExt,
        linkage: Linkage::Static,
        stripped: false,
        dwarf: true,
        server_code: Some("executable"),
        covers: "statically linked builds with DWARF (`-g`), here 2026+",
        measured: "all, from the executable's `.symtab`; struct layouts checkable from its DWARF",
    },
    Fixture {
        name: "static-stripped",
        in_default_matrix: false,
        source: Source::StripServer { from: "static" },
        llama_cpp: "b11312 (commit 0c1e570)",
        date: "2026-10",
        generation: Generation::BatchExt,
        linkage: Linkage::Static,
        stripped: true,
        dwarf: false,
        server_code: Some("executable"),
        covers: "statically linked and stripped builds, here 2026+",
        measured: "nothing from the file alone (no symbols); all with `--symbols-from` the \
                   unstripped `static` executable",
    },
];

impl Fixture {
    pub fn in_matrix(&self, matrix: Matrix) -> bool {
        matrix == Matrix::Full || self.in_default_matrix
    }

    /// Where it comes from, in words (`fixtures.json`'s `source`).
    pub fn source_text(&self) -> String {
        match &self.source {
            Source::Build(b) => {
                let mut text = format!("llama-cpp-python {} sdist", b.sdist.version);
                let special: Vec<&str> = b
                    .cmake_flags
                    .iter()
                    .filter(|f| {
                        ["SHARED_LIBS=OFF", "RelWithDebInfo"]
                            .iter()
                            .any(|s| f.ends_with(s))
                    })
                    .map(|f| f.trim_start_matches("-D"))
                    .collect();
                if !special.is_empty() {
                    text.push_str(&format!(" ({})", special.join(", ")));
                }
                text
            }
            Source::Npm(n) => format!("npm {}@{} prebuilt libllama", n.package, n.version),
            Source::Wheel(w) => format!(
                "PyPI {}=={} wheel, its prebuilt llama.cpp",
                w.package, w.version
            ),
            Source::StripLibllama { from } => {
                format!("{from}'s shared libraries, libllama.so* after strip --strip-all")
            }
            Source::StripServer { from } => {
                format!("{from}'s llama-server after strip --strip-all")
            }
        }
    }
}

fn fixture(name: &str) -> Result<&'static Fixture> {
    FIXTURES
        .iter()
        .find(|f| f.name == name)
        .with_context(|| format!("no fixture named {name}"))
}

/// make_tiny_model.py's arguments for the ≥ 10 ms model (LLAMAPROBE_MODEL_STEP10): 24 layers,
/// n_embd 768, ff 2048, about 156 M parameters.
const STEP10_ARGS: &[&str] = &[
    "--n-layer",
    "24",
    "--n-embd",
    "768",
    "--n-ff",
    "2048",
    "--dtype",
    "f16",
];

/// Python packages for the model generator (numpy's PCG64 stream is stable across versions).
const PYTHON_REQUIREMENTS: &[&str] = &["gguf==0.19.0", "numpy>=1.24"];

const MODEL_SCRIPT: &str = include_str!("../assets/make_tiny_model.py");

/// The C source of the layout probe (see [`Built::layout_probe`]).
const LAYOUT_PROBE: &str = include_str!("../assets/layout_probe.c");

/// What the driver must print when run on the tiny model.
const DRIVER_EXPECTED: &str = "driver decodes=12 prompt_tokens=9 generated=12 samples=12";

/// What a fixture step produced (absolute paths).
#[derive(Default, Debug)]
pub struct Built {
    pub server: Option<PathBuf>,
    pub cli: Option<PathBuf>,
    pub simple: Option<PathBuf>,
    pub driver: Option<PathBuf>,
    pub libllama: Option<PathBuf>,
    /// The directory of the shared libraries (the `bin/` of a CMake build).
    pub lib_dir: Option<PathBuf>,
    pub env: Vec<(&'static str, PathBuf)>,
    pub symbols_from: Option<PathBuf>,
    /// A directory whose `node_modules` holds the npm binding (npm fixtures).
    pub node_app: Option<PathBuf>,
    /// The Python of a venv with the package installed (PyPI wheel fixtures).
    pub python: Option<PathBuf>,
    /// A program compiled with -g from the fixture's own llama.h, declaring the structs the
    /// probes read ([`LAYOUT_PROBE`]): their DWARF, for any build (CMake fixtures).
    pub layout_probe: Option<PathBuf>,
}

/// Prepares the fixtures, prints them as `KEY=VALUE` lines and writes `cache/fixtures.env`.
pub fn run(matrix: Matrix, large: bool) -> Result<()> {
    let vars = prepare(matrix, large)?;
    for (key, value) in &vars {
        println!("{key}={value}");
    }
    Ok(())
}

/// Prepares the fixtures of the matrix and returns their `(KEY, VALUE)` pairs (also written to
/// `fixtures.env`); writes `fixtures.json`.
pub fn prepare(matrix: Matrix, large: bool) -> Result<Vec<(String, String)>> {
    let cache = util::cache_dir()?;
    let started = Instant::now();

    // The model first: the npm driver is checked against it.
    let python = python_env(&cache)?;
    let models = cache.join("models");
    let tiny = make_model(&cache, &python, &models.join("tiny.gguf"), &[])?;
    let big = if large || matrix == Matrix::Full {
        Some(make_model(
            &cache,
            &python,
            &models.join("tiny-large.gguf"),
            &["--large"],
        )?)
    } else {
        None
    };
    // The --profile-cpu test's model: decode steps of at least 10 ms with two threads on
    // these machines (about 15 ms per generated token), f16 to halve the file (310 MB).
    let step10 = make_model(&cache, &python, &models.join("step10.gguf"), STEP10_ARGS)?;

    let selected: Vec<&Fixture> = FIXTURES.iter().filter(|f| f.in_matrix(matrix)).collect();
    let mut built: Vec<(&Fixture, Built)> = Vec::new();
    let mut times = Vec::new();
    for (i, f) in selected.iter().enumerate() {
        progress!(
            "fixture {}/{} '{}' ({})",
            i + 1,
            selected.len(),
            f.name,
            f.source_text()
        );
        let t = Instant::now();
        let b = prepare_fixture(&cache, f, &built, &tiny)
            .with_context(|| format!("fixture '{}'", f.name))?;
        times.push((f.name, t.elapsed()));
        built.push((f, b));
    }

    let mut vars = Vec::new();
    for (f, b) in &built {
        // The newest build's keys have no suffix (what the tests and the demo read); other
        // CMake builds get `_<NAME>`. Everything else is in fixtures.json.
        let suffix = match (&f.source, f.name) {
            (_, "newest") => String::new(),
            (Source::Build(_), name) => format!("_{}", name.to_uppercase().replace('-', "_")),
            _ => continue,
        };
        for (key, path) in [
            ("LLAMA_SERVER", &b.server),
            ("LLAMA_CLI", &b.cli),
            ("LLAMA_SIMPLE", &b.simple),
            ("LIBLLAMA", &b.libllama),
        ] {
            if let Some(path) = path {
                vars.push((format!("LLAMAPROBE_{key}{suffix}"), path_string(path)));
            }
        }
    }
    vars.push(("LLAMAPROBE_MODEL".into(), path_string(&tiny)));
    vars.push(("LLAMAPROBE_MODEL_STEP10".into(), path_string(&step10)));
    if let Some(big) = &big {
        vars.push(("LLAMAPROBE_MODEL_LARGE".into(), path_string(big)));
    }

    let json_path = cache.join("fixtures.json");
    util::write_atomic(&json_path, fixtures_json(&built).as_bytes())?;
    vars.push(("LLAMAPROBE_FIXTURES".into(), path_string(&json_path)));

    let env_file: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    util::write_atomic(&cache.join("fixtures.env"), env_file.as_bytes())?;

    progress!(
        "fixtures ({} matrix) ready in {}:",
        matrix.name(),
        util::format_duration(started.elapsed())
    );
    for (name, took) in &times {
        progress!("  {name:<16} {:>12}", util::format_duration(*took));
    }
    Ok(vars)
}

/// Only what the demo needs: the newest llama-server and the tiny model (no matrix files).
pub fn prepare_demo() -> Result<(PathBuf, PathBuf)> {
    let cache = util::cache_dir()?;
    let python = python_env(&cache)?;
    let tiny = make_model(&cache, &python, &cache.join("models/tiny.gguf"), &[])?;
    let newest = fixture("newest")?;
    let b = prepare_fixture(&cache, newest, &[], &tiny)?;
    let server = b.server.context("the newest fixture has no llama-server")?;
    Ok((server, tiny))
}

fn prepare_fixture(
    cache: &Path,
    f: &'static Fixture,
    earlier: &[(&Fixture, Built)],
    model: &Path,
) -> Result<Built> {
    let from = |name: &str| -> Result<&Built> {
        earlier
            .iter()
            .find(|(e, _)| e.name == name)
            .map(|(_, b)| b)
            .with_context(|| format!("fixture '{name}' must be prepared first"))
    };
    match &f.source {
        Source::Build(build) => {
            let source = extract_sdist(cache, &build.sdist)?;
            let dir = build_llama(cache, f.name, build, &source)?;
            let bin = dir.join("bin");
            let exe = |name: &str| {
                build
                    .targets
                    .contains(&name)
                    .then(|| bin.join(name))
                    .filter(|p| p.is_file())
            };
            let libllama = match f.linkage {
                Linkage::Shared => Some(find_libllama(&dir)?),
                Linkage::Static => None,
            };
            if f.dwarf {
                for target in build.targets {
                    let exe = bin.join(target);
                    if !has_section(&exe, ".debug_info")? {
                        bail!("{} has no DWARF (.debug_info)", exe.display());
                    }
                }
            }
            let layout_probe = Some(build_layout_probe(&dir, &source)?);
            Ok(Built {
                server: exe("llama-server"),
                cli: exe("llama-cli"),
                simple: exe("llama-simple"),
                layout_probe,
                driver: None,
                lib_dir: libllama
                    .as_deref()
                    .and_then(Path::parent)
                    .map(Path::to_path_buf),
                libllama,
                env: Vec::new(),
                symbols_from: None,
                node_app: None,
                python: None,
            })
        }
        Source::Npm(npm) => prepare_npm(cache, npm, model),
        Source::Wheel(wheel) => prepare_wheel(cache, wheel),
        Source::StripLibllama { from: name } => strip_libllama(cache, f.name, from(name)?),
        Source::StripServer { from: name } => strip_server(cache, f.name, from(name)?),
    }
}

/// `<build dir>/layout-probe`: [`LAYOUT_PROBE`] compiled with -g against the llama.h of
/// `source` (a vendored llama.cpp), so that its DWARF says that build's struct layouts.
fn build_layout_probe(dir: &Path, source: &Path) -> Result<PathBuf> {
    let c = dir.join("layout-probe.c");
    let exe = dir.join("layout-probe");
    let header = [source.join("include/llama.h"), source.join("llama.h")]
        .into_iter()
        .find(|h| h.is_file())
        .with_context(|| format!("{} has no llama.h", source.display()))?;
    let stamp = format!(
        "probe={:016x}\nheader={}\n",
        util::fnv1a(LAYOUT_PROBE.as_bytes()),
        fingerprint(&header)?
    );
    let stamp_file = dir.join(".layout-probe-stamp");
    if exe.is_file() && fs::read_to_string(&stamp_file).ok().as_deref() == Some(&stamp) {
        return Ok(exe);
    }
    fs::write(&c, LAYOUT_PROBE)?;
    let include = header.parent().context("llama.h has no directory")?;
    util::run(
        Command::new("gcc")
            .args(["-g", "-O0", "-std=c11", "-o"])
            .arg(&exe)
            .arg(&c)
            .arg("-I")
            .arg(include)
            .arg("-I")
            .arg(source.join("ggml/include")),
    )
    .with_context(|| format!("compiling the layout probe against {}", header.display()))?;
    fs::write(&stamp_file, stamp)?;
    Ok(exe)
}

fn path_string(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------------------------
// fixtures.json

/// A JSON object with its keys in the given order (serde_json's map would sort them).
fn ordered_object(fields: &[(&str, String)], indent: &str) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(key, value)| format!("{indent}  {}: {value}", json!(key)))
        .collect();
    format!("{{\n{}\n{indent}}}", body.join(",\n"))
}

/// The JSON array describing the prepared fixtures (keys in a fixed, readable order).
fn fixtures_json(built: &[(&Fixture, Built)]) -> String {
    let path = |p: &Option<PathBuf>| match p {
        Some(p) => json!(path_string(p)).to_string(),
        None => "null".to_string(),
    };
    let objects: Vec<String> = built
        .iter()
        .map(|(f, b)| {
            let env: serde_json::Map<String, Value> = b
                .env
                .iter()
                .map(|(k, v)| (k.to_string(), json!(path_string(v))))
                .collect();
            let fields: Vec<(&str, String)> = vec![
                ("name", json!(f.name).to_string()),
                ("source", json!(f.source_text()).to_string()),
                ("llama_cpp", json!(f.llama_cpp).to_string()),
                ("date", json!(f.date).to_string()),
                ("generation", json!(f.generation.as_str()).to_string()),
                ("linkage", json!(f.linkage.as_str()).to_string()),
                ("stripped", json!(f.stripped).to_string()),
                ("dwarf", json!(f.dwarf).to_string()),
                ("server", path(&b.server)),
                ("cli", path(&b.cli)),
                ("driver", path(&b.driver)),
                ("libllama", path(&b.libllama)),
                ("env", Value::Object(env).to_string()),
                ("symbols_from", path(&b.symbols_from)),
                ("node_app", path(&b.node_app)),
                ("python", path(&b.python)),
                ("layout_probe", path(&b.layout_probe)),
                ("server_code", json!(f.server_code).to_string()),
            ];
            format!("  {}", ordered_object(&fields, "  "))
        })
        .collect();
    format!("[\n{}\n]\n", objects.join(",\n"))
}

// ---------------------------------------------------------------------------------------------
// llama.cpp source: the llama-cpp-python sdist

fn sdist_name(sdist: &Sdist) -> String {
    format!("llama_cpp_python-{}", sdist.version)
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
fn download_sdist(cache: &Path, sdist: &Sdist) -> Result<PathBuf> {
    let src = cache.join("src");
    let tarball = src.join(format!("{}.tar.gz", sdist_name(sdist)));
    if tarball.is_file() {
        let sha = sha256_of(&tarball)?;
        if sha == sdist.sha256 {
            return Ok(tarball);
        }
        progress!(
            "{}: sha256 {sha} is wrong, downloading again",
            tarball.display()
        );
        fs::remove_file(&tarball)?;
    }
    fs::create_dir_all(&src)?;
    // Not `pip download`: pip prepares an sdist's metadata before saving it, and that needs
    // this one's build backend (scikit-build-core). PyPI's JSON APIs give the file's URL.
    progress!(
        "downloading the llama-cpp-python=={} sdist (50-80 MB)",
        sdist.version
    );
    let url = sdist_url(sdist)?;
    download(&url, &tarball)?;

    check_sha256(&tarball, sdist.sha256)?;
    Ok(tarball)
}

/// Fails unless a downloaded file has the sha256 `expected`; a wrong file is removed, so that
/// the next run downloads it again.
fn check_sha256(file: &Path, expected: &str) -> Result<()> {
    let sha = sha256_of(file)?;
    if sha != expected {
        fs::remove_file(file)?;
        bail!(
            "{} has sha256 {sha}, expected {expected}: removed it; run the command again",
            file.display()
        );
    }
    Ok(())
}

/// curl to `<dest>.part`, then a rename.
fn download(url: &str, dest: &Path) -> Result<()> {
    let partial = dest.with_extension("part");
    util::run(
        Command::new("curl")
            .args(["-fL", "--retry", "3", "--progress-bar", "-o"])
            .arg(&partial)
            .arg(url),
    )
    .with_context(|| format!("downloading {url} failed"))?;
    fs::rename(&partial, dest)?;
    Ok(())
}

/// The sdist's download URL.
fn sdist_url(sdist: &Sdist) -> Result<String> {
    let filename = format!("{}.tar.gz", sdist_name(sdist));
    pypi_url("llama-cpp-python", sdist.version, &filename)
}

/// The URL of `package`'s file `filename` (of release `version`), from PyPI's per-release
/// JSON API, else the PEP 691 simple index.
fn pypi_url(package: &str, version: &str, filename: &str) -> Result<String> {
    let release_api = format!("https://pypi.org/pypi/{package}/{version}/json");
    if let Ok(text) = util::output(Command::new("curl").args(["-fsSL", &release_api])) {
        let json: serde_json::Value = serde_json::from_str(&text).context("PyPI JSON")?;
        let files = json["urls"].as_array().cloned().unwrap_or_default();
        if let Some(url) = files
            .iter()
            .find(|f| f["filename"] == filename)
            .and_then(|f| f["url"].as_str())
            .filter(|url| url.starts_with("https://"))
        {
            return Ok(url.to_string());
        }
    }
    let index = format!("https://pypi.org/simple/{package}/");
    let text = util::output(Command::new("curl").args([
        "-fsSL",
        "-H",
        "Accept: application/vnd.pypi.simple.v1+json",
        &index,
    ]))
    .with_context(|| format!("could not reach PyPI ({index}): check the network, or put {filename} into the cache's src/ by hand"))?;
    let json: serde_json::Value = serde_json::from_str(&text).context("PyPI simple index JSON")?;
    json["files"]
        .as_array()
        .and_then(|files| files.iter().find(|f| f["filename"] == filename))
        .and_then(|f| f["url"].as_str())
        .map(str::to_string)
        .with_context(|| format!("PyPI lists no {filename}"))
}

/// Extracts `tarball` into `dest` through a scratch directory, so an interrupted extraction is
/// never mistaken for a good one. `top` is the tarball's top directory.
fn extract_tarball(tarball: &Path, top: &str, dest: &Path) -> Result<()> {
    let parent = dest.parent().context("extraction target has no parent")?;
    let scratch = parent.join(format!(
        ".extract-{}",
        dest.file_name().unwrap_or_default().to_string_lossy()
    ));
    if scratch.exists() {
        fs::remove_dir_all(&scratch)?;
    }
    fs::create_dir_all(&scratch)?;
    progress!("extracting {}", tarball.display());
    util::run(
        Command::new("tar")
            .arg("-xzf")
            .arg(tarball)
            .arg("-C")
            .arg(&scratch),
    )?;
    if dest.exists() {
        fs::remove_dir_all(dest)?;
    }
    fs::rename(scratch.join(top), dest)
        .with_context(|| format!("{} has no top directory {top}", tarball.display()))?;
    fs::remove_dir_all(&scratch)?;
    Ok(())
}

/// Extracts the sdist to `cache/src/llama_cpp_python-X/`; returns its `vendor/llama.cpp`.
fn extract_sdist(cache: &Path, sdist: &Sdist) -> Result<PathBuf> {
    let dir = cache.join("src").join(sdist_name(sdist));
    let source = dir.join("vendor/llama.cpp");
    if source.join("CMakeLists.txt").is_file() {
        return Ok(source);
    }
    let tarball = download_sdist(cache, sdist)?;
    extract_tarball(&tarball, &sdist_name(sdist), &dir)?;
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

fn build_stamp(build: &CmakeBuild) -> String {
    format!(
        "sdist=llama-cpp-python=={} sha256={}\ncmake_flags={}\ntargets={}\n",
        build.sdist.version,
        build.sdist.sha256,
        build.cmake_flags.join(" "),
        build.targets.join(" ")
    )
}

/// Builds the targets into `cache/build/<dir>` unless a matching build is there. The stamp is
/// checked and the build run under the directory's lock ([`lock_build_dir`]): a run that had to
/// wait for another's build then finds it done.
fn build_llama(cache: &Path, name: &str, build: &CmakeBuild, source: &Path) -> Result<PathBuf> {
    let dir = cache.join("build").join(build.build_dir);
    let stamp_file = dir.join(".llamaprobe-build-stamp");
    let stamp = build_stamp(build);

    let _lock = lock_build_dir(&dir)?;

    let built = build
        .targets
        .iter()
        .all(|t| dir.join("bin").join(t).is_file());
    if built && fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str()) {
        progress!("  {} is built (stamp matches)", dir.display());
        return Ok(dir);
    }

    let _ = fs::remove_file(&stamp_file);
    progress!(
        "building llama.cpp '{name}' (llama-cpp-python {}, {}) in {}: about 10 min on 2 cores when cold",
        build.sdist.version,
        build.targets.join(" "),
        dir.display()
    );
    let started = Instant::now();
    util::run(
        Command::new("cmake")
            .arg("-S")
            .arg(source)
            .arg("-B")
            .arg(&dir)
            .args(build.cmake_flags),
    )
    .context("configuring llama.cpp failed: see the CMake output above")?;
    let jobs = thread::available_parallelism().map_or(1, |n| n.get());
    util::run(
        Command::new("cmake")
            .arg("--build")
            .arg(&dir)
            .arg(format!("-j{jobs}"))
            .arg("--target")
            .args(build.targets),
    )
    .context("building llama.cpp failed: see the compiler output above")?;
    for target in build.targets {
        if !dir.join("bin").join(target).is_file() {
            bail!(
                "the build finished but made no bin/{target} in {}",
                dir.display()
            );
        }
    }
    fs::write(&stamp_file, stamp)?;
    progress!(
        "built llama.cpp '{name}' in {}",
        util::format_duration(started.elapsed())
    );
    Ok(dir)
}

/// Takes the lock of a build directory: `<dir>.lock` beside it (created if missing), locked
/// for as long as the returned file is open. Two runs that prepare fixtures at once (two
/// terminals, or an earlier run still going) would otherwise run CMake in the same directory
/// together and break both builds; with the lock the second waits, then finds the first's stamp
/// and reuses its build. The kernel drops the lock when its holder exits, killed or not, so a
/// lock left by a crashed run never blocks the next one. Beside the directory rather than in it,
/// so that deleting the directory to force a rebuild cannot delete a lock someone holds.
fn lock_build_dir(dir: &Path) -> Result<fs::File> {
    let mut path = dir.as_os_str().to_owned();
    path.push(".lock");
    let path = PathBuf::from(path);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            progress!(
                "another run is building {} (it holds {}); waiting for it to finish",
                dir.display(),
                path.display()
            );
            file.lock()
                .with_context(|| format!("locking {}", path.display()))?;
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    Ok(file)
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
// Derived copies: stripped files

/// Identifies a file's content cheaply for stamps (path, size, modification time).
fn fingerprint(path: &Path) -> Result<String> {
    let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mtime = meta
        .modified()?
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    Ok(format!("{} {} {mtime}", path.display(), meta.len()))
}

/// Runs `make` into a scratch directory and renames it to `dir`, unless `dir`'s stamp says it
/// was made from the same inputs.
fn derived_dir(dir: &Path, stamp: &str, make: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let stamp_file = dir.join(".llamaprobe-stamp");
    if fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp) {
        progress!("  {} is up to date (stamp matches)", dir.display());
        return Ok(());
    }
    let scratch = dir.with_extension("tmp");
    if scratch.exists() {
        fs::remove_dir_all(&scratch)?;
    }
    fs::create_dir_all(&scratch)?;
    make(&scratch)?;
    fs::write(scratch.join(".llamaprobe-stamp"), stamp)?;
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::rename(&scratch, dir)?;
    Ok(())
}

fn strip_all(file: &Path) -> Result<()> {
    util::run(Command::new("strip").arg("--strip-all").arg(file))
        .with_context(|| format!("strip --strip-all {} failed", file.display()))
}

/// Whether an ELF file has a section of that name (`readelf -S`).
fn has_section(file: &Path, section: &str) -> Result<bool> {
    let out = util::output(Command::new("readelf").args(["-S", "-W"]).arg(file))?;
    Ok(out.contains(&format!(" {section} ")))
}

fn has_symtab(file: &Path) -> Result<bool> {
    has_section(file, ".symtab")
}

/// `cache/build/<name>/lib`: `from`'s shared libraries, with `libllama.so*` stripped; `from`'s
/// executables run on them with `LD_LIBRARY_PATH` (searched before their DT_RUNPATH).
fn strip_libllama(cache: &Path, name: &str, from: &Built) -> Result<Built> {
    let src = from
        .lib_dir
        .as_ref()
        .context("no shared-library directory")?;
    let libllama = from.libllama.as_ref().context("no libllama")?;
    let root = cache.join("build").join(name);
    let lib = root.join("lib");
    // Every library copied, so a rebuild of `from` makes a new copy.
    let mut stamp = String::from("strip-libllama v1\n");
    let mut sources: Vec<PathBuf> = fs::read_dir(src)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_shared_library(p) && p.is_file())
        .collect();
    sources.sort();
    for source in &sources {
        stamp.push_str(&format!("from={}\n", fingerprint(source)?));
    }
    fs::create_dir_all(&root)?;
    derived_dir(&lib, &stamp, |scratch| {
        let mut stripped = 0;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            let file_name = entry.file_name();
            let file = file_name.to_string_lossy();
            if !is_shared_library(&entry.path()) {
                continue;
            }
            let to = scratch.join(&file_name);
            let meta = fs::symlink_metadata(entry.path())?;
            if meta.file_type().is_symlink() {
                symlink(fs::read_link(entry.path())?, &to)?;
            } else {
                fs::copy(entry.path(), &to)?;
                if file.starts_with("libllama.so") {
                    strip_all(&to)?;
                    stripped += 1;
                }
            }
        }
        if stripped == 0 {
            bail!("no libllama.so* file in {}", src.display());
        }
        Ok(())
    })?;

    let libllama_copy = lib.join(libllama.file_name().context("libllama has no file name")?);
    if has_symtab(&libllama_copy)? {
        bail!("{} still has a .symtab", libllama_copy.display());
    }
    let server = from.server.clone();
    if let Some(server) = &server {
        check_library_path(server, &lib)?;
    }
    Ok(Built {
        server,
        cli: from.cli.clone(),
        simple: from.simple.clone(),
        driver: None,
        libllama: Some(libllama_copy),
        lib_dir: Some(lib.clone()),
        env: vec![("LD_LIBRARY_PATH", lib)],
        symbols_from: None,
        node_app: None,
        python: None,
        layout_probe: None,
    })
}

/// `libX.so` or `libX.so.N…` (a file or a symlink).
fn is_shared_library(path: &Path) -> bool {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    name.starts_with("lib") && (name.ends_with(".so") || name.contains(".so."))
}

/// Checks with `ldd` that `exe` run with `LD_LIBRARY_PATH=lib` loads libllama from `lib`.
fn check_library_path(exe: &Path, lib: &Path) -> Result<()> {
    let out = util::output(Command::new("ldd").arg(exe).env("LD_LIBRARY_PATH", lib))?;
    let line = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("libllama.so"))
        .with_context(|| format!("ldd {} lists no libllama.so:\n{out}", exe.display()))?;
    let resolved = line
        .split("=>")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default();
    if !Path::new(resolved).starts_with(lib) {
        bail!(
            "with LD_LIBRARY_PATH={} {} still loads {line}",
            lib.display(),
            exe.display()
        );
    }
    Ok(())
}

/// `cache/build/<name>/llama-server`: a `strip --strip-all` copy of `from`'s llama-server.
fn strip_server(cache: &Path, name: &str, from: &Built) -> Result<Built> {
    let server = from.server.as_ref().context("no llama-server to strip")?;
    let dir = cache.join("build").join(name);
    let stamp = format!("strip-server v1\nfrom={}\n", fingerprint(server)?);
    derived_dir(&dir, &stamp, |scratch| {
        let to = scratch.join("llama-server");
        fs::copy(server, &to)?;
        strip_all(&to)
    })?;
    let stripped = dir.join("llama-server");
    if has_symtab(&stripped)? {
        bail!("{} still has a .symtab", stripped.display());
    }
    Ok(Built {
        server: Some(stripped),
        symbols_from: Some(server.clone()),
        ..Built::default()
    })
}

// ---------------------------------------------------------------------------------------------
// npm prebuilt libllama and our driver

fn npm_name(npm: &NpmPrebuilt) -> String {
    // "@node-llama-cpp/linux-x64" 3.22.1 → "node-llama-cpp-linux-x64-3.22.1" (npm pack's name).
    format!(
        "{}-{}",
        npm.package.trim_start_matches('@').replace('/', "-"),
        npm.version
    )
}

/// `cache/npm/<name>.tgz` with the right sha256 (`npm pack`, else curl from the registry).
fn download_npm(cache: &Path, npm: &NpmPrebuilt) -> Result<PathBuf> {
    let dir = cache.join("npm");
    let tarball = dir.join(format!("{}.tgz", npm_name(npm)));
    if tarball.is_file() && sha256_of(&tarball)? == npm.sha256 {
        return Ok(tarball);
    }
    fs::create_dir_all(&dir)?;
    let spec = format!("{}@{}", npm.package, npm.version);
    progress!("downloading npm {spec} (about 11 MB)");
    let packed = if util::command_exists("npm") {
        util::run(
            Command::new("npm")
                .args(["pack", "--silent", &spec])
                .current_dir(&dir),
        )
    } else {
        Err(anyhow::anyhow!("npm is not installed"))
    };
    if let Err(err) = packed {
        // The registry's own tarball URL, what `npm pack` downloads.
        let base = npm.package.rsplit('/').next().unwrap_or(npm.package);
        let url = format!(
            "https://registry.npmjs.org/{}/-/{base}-{}.tgz",
            npm.package, npm.version
        );
        progress!("npm pack did not work ({err:#}); fetching {url}");
        download(&url, &tarball)?;
    }
    check_sha256(&tarball, npm.sha256)?;
    Ok(tarball)
}

/// The npm package extracted to `cache/npm/<name>/`, our driver built against its libllama
/// into `cache/build/npm/driver` and checked on the tiny model.
fn prepare_npm(cache: &Path, npm: &NpmPrebuilt, model: &Path) -> Result<Built> {
    let extracted = cache.join("npm").join(npm_name(npm));
    let lib_dir = extracted.join(npm.lib_dir.trim_start_matches("package/"));
    let libllama = lib_dir.join(npm.libllama);
    let stamp_file = extracted.join(".llamaprobe-stamp");
    let stamp = format!(
        "npm {}@{} sha256={}\n",
        npm.package, npm.version, npm.sha256
    );
    if !(libllama.is_file() && fs::read_to_string(&stamp_file).ok().as_deref() == Some(&stamp)) {
        let tarball = download_npm(cache, npm)?;
        extract_tarball(&tarball, "package", &extracted)?;
        if !libllama.is_file() {
            bail!(
                "{} has no {}/{}",
                tarball.display(),
                npm.lib_dir,
                npm.libllama
            );
        }
        fs::write(&stamp_file, &stamp)?;
    }

    let source_path = util::workspace_root().join(npm.driver_source);
    let source = fs::read(&source_path)
        .with_context(|| format!("reading the driver source {}", source_path.display()))?;
    let out_dir = cache.join("build/npm");
    let driver = out_dir.join("driver");
    let cc_args = [
        "-O1".to_string(),
        "-g".into(),
        "-Wall".into(),
        "-Wextra".into(),
        "-Werror".into(),
        format!("-L{}", lib_dir.display()),
        format!("-l:{}", npm.libllama),
        "-ldl".into(),
        format!("-Wl,-rpath,{}", lib_dir.display()),
    ];
    let driver_stamp = format!(
        "source={:016x}\nlib={}\ncc=gcc {}\nmodel={}\n",
        util::fnv1a(&source),
        fingerprint(&libllama)?,
        cc_args.join(" "),
        fingerprint(model)?,
    );
    let driver_stamp_file = out_dir.join(".llamaprobe-stamp");
    if driver.is_file()
        && fs::read_to_string(&driver_stamp_file).ok().as_deref() == Some(&driver_stamp)
    {
        progress!("  {} is built (stamp matches)", driver.display());
    } else {
        let _ = fs::remove_file(&driver_stamp_file);
        fs::create_dir_all(&out_dir)?;
        progress!(
            "compiling {} against {}",
            source_path.display(),
            libllama.display()
        );
        let partial = out_dir.join("driver.part");
        util::run(
            Command::new("gcc")
                .arg("-o")
                .arg(&partial)
                .arg(&source_path)
                .args(&cc_args),
        )
        .context("compiling the driver failed")?;
        fs::rename(&partial, &driver)?;
        check_driver(&driver, model)?;
        fs::write(&driver_stamp_file, driver_stamp)?;
    }
    let node_app = prepare_node_app(cache, npm)?;
    Ok(Built {
        driver: Some(driver),
        libllama: Some(libllama),
        lib_dir: Some(lib_dir),
        node_app: Some(node_app),
        ..Built::default()
    })
}

/// `cache/npm/<binding>-<version>-app/`: the binding and its prebuilt package installed with
/// the machine's npm (`--ignore-scripts`: the prebuilt binaries are used as they are, nothing
/// is built or downloaded at install), checked by loading it with node.
fn prepare_node_app(cache: &Path, npm: &NpmPrebuilt) -> Result<PathBuf> {
    let dir = cache
        .join("npm")
        .join(format!("{}-{}-app", npm.binding, npm.version));
    let specs = [
        format!("{}@{}", npm.binding, npm.version),
        format!("{}@{}", npm.package, npm.version),
    ];
    let stamp = format!("npm install -E --omit=optional {}\n", specs.join(" "));
    let stamp_file = dir.join(".llamaprobe-stamp");
    if fs::read_to_string(&stamp_file).ok().as_deref() == Some(&stamp) {
        progress!("  {} is installed (stamp matches)", dir.display());
        return Ok(dir);
    }
    for tool in ["node", "npm"] {
        if !util::command_exists(tool) {
            bail!(
                "the npm fixture drives {} through Node.js: `{tool}` is not on PATH \
                 (install Node.js 20 or newer with npm)",
                npm.binding
            );
        }
    }
    let _ = fs::remove_file(&stamp_file);
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("package.json"), "{\"private\": true}\n")?;
    progress!("installing npm {} (about 85 MB)", specs.join(" "));
    util::run(
        Command::new("npm")
            .current_dir(&dir)
            .args(["install", "--no-audit", "--no-fund", "--ignore-scripts"])
            .args(["--omit=optional", "--save-exact"])
            .args(&specs),
    )
    .with_context(|| format!("npm install {} failed", specs.join(" ")))?;
    // The binding loads and finds its prebuilt library (from a file: the binding tests its
    // binary in a child process, which an `-e` script cannot start).
    let check = dir.join("check.mjs");
    fs::write(
        &check,
        format!(
            "import {{getLlama}} from '{}';\n\
             await getLlama({{gpu: false, build: 'never', logLevel: 'error'}});\n",
            npm.binding
        ),
    )?;
    util::run(Command::new("node").current_dir(&dir).arg(&check)).with_context(|| {
        format!(
            "{} installed in {} does not load",
            npm.binding,
            dir.display()
        )
    })?;
    fs::write(&stamp_file, stamp)?;
    Ok(dir)
}

// ---------------------------------------------------------------------------------------------
// PyPI wheel with a prebuilt llama.cpp

/// `cache/src/<wheel>` with the right sha256.
fn download_wheel(cache: &Path, wheel: &PypiWheel) -> Result<PathBuf> {
    let src = cache.join("src");
    let file = src.join(wheel.file);
    if file.is_file() && sha256_of(&file)? == wheel.sha256 {
        return Ok(file);
    }
    fs::create_dir_all(&src)?;
    progress!(
        "downloading the {}=={} wheel (about 120 MB)",
        wheel.package,
        wheel.version
    );
    download(&pypi_url(wheel.package, wheel.version, wheel.file)?, &file)?;
    check_sha256(&file, wheel.sha256)?;
    Ok(file)
}

/// `cache/python/<package>-<version>/`: a venv with the wheel and its pinned dependencies,
/// checked by importing the package; its Python and the library with llama.cpp inside.
fn prepare_wheel(cache: &Path, wheel: &PypiWheel) -> Result<Built> {
    let venv = cache
        .join("python")
        .join(format!("{}-{}", wheel.package, wheel.version));
    let python = venv.join("bin/python");
    let stamp = format!(
        "{} sha256={}\n{}\n",
        wheel.file,
        wheel.sha256,
        wheel.requirements.join("\n")
    );
    let stamp_file = venv.join(".llamaprobe-stamp");
    if fs::read_to_string(&stamp_file).ok().as_deref() == Some(&stamp) {
        progress!("  {} is installed (stamp matches)", venv.display());
    } else {
        let file = download_wheel(cache, wheel)?;
        if venv.exists() {
            fs::remove_dir_all(&venv)?;
        }
        progress!("creating a Python venv at {}", venv.display());
        util::run(Command::new("python3").args(["-m", "venv"]).arg(&venv)).context(
            "`python3 -m venv` failed: install Python 3.8 or newer with venv (python3-venv on Debian)",
        )?;
        progress!(
            "installing {} and {}",
            wheel.file,
            wheel.requirements.join(" ")
        );
        util::run(
            Command::new(&python)
                .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
                .arg("--no-deps")
                .arg(&file)
                .args(wheel.requirements),
        )
        .with_context(|| format!("pip could not install {}", wheel.file))?;
        util::run(Command::new(&python).args(["-c", &format!("import {}", wheel.package)]))
            .with_context(|| {
                format!(
                    "{} installed in {} does not import",
                    wheel.package,
                    venv.display()
                )
            })?;
        fs::write(&stamp_file, stamp)?;
    }
    let site = util::output(Command::new(&python).args([
        "-c",
        "import sysconfig; print(sysconfig.get_paths()['purelib'])",
    ]))?;
    let libllama = Path::new(site.trim()).join(wheel.libllama);
    if !libllama.is_file() {
        bail!("{} has no {}", wheel.file, wheel.libllama);
    }
    Ok(Built {
        lib_dir: libllama.parent().map(Path::to_path_buf),
        libllama: Some(libllama),
        python: Some(python),
        ..Built::default()
    })
}

/// Runs the driver on the model and checks its report.
fn check_driver(driver: &Path, model: &Path) -> Result<()> {
    progress!("running {} {}", driver.display(), model.display());
    let out = Command::new(driver)
        .arg(model)
        .env_remove("DRIVER_WAIT_STDIN")
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("could not start {}", driver.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || stdout.trim_end() != DRIVER_EXPECTED {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        bail!(
            "the driver ({}) printed {:?}, expected {DRIVER_EXPECTED:?}; its stderr ends with:\n{}",
            out.status,
            stdout.trim_end(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Compatibility table (README.md, `cargo xtask compat`)

/// The markdown compatibility table generated from [`FIXTURES`].
pub fn compat_table() -> String {
    let mut s = String::from(
        "| llama.cpp versions / fixture's build | API generation | measured | tested by fixture |\n\
         |---|---|---|---|\n",
    );
    for f in FIXTURES {
        let matrix = if f.in_default_matrix {
            "default"
        } else {
            "full"
        };
        s.push_str(&format!(
            "| {} / {}, {} | {} | {} | `{}` ({matrix} matrix): {} |\n",
            f.covers,
            f.llama_cpp,
            f.date,
            f.generation.as_str(),
            f.measured,
            f.name,
            f.source_text(),
        ));
    }
    s
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_derived_fixtures_come_after_their_source() {
        for (i, f) in FIXTURES.iter().enumerate() {
            assert!(
                FIXTURES[..i].iter().all(|e| e.name != f.name),
                "{} twice",
                f.name
            );
            if let Source::StripLibllama { from } | Source::StripServer { from } = f.source {
                let source = FIXTURES[..i]
                    .iter()
                    .find(|e| e.name == from)
                    .unwrap_or_else(|| panic!("{}: {from} must come earlier", f.name));
                assert!(
                    !f.in_default_matrix || source.in_default_matrix,
                    "{}: {from} must be in every matrix {} is in",
                    f.name,
                    f.name
                );
            }
        }
        assert_eq!(
            FIXTURES[0].name, "newest",
            "the unsuffixed keys are newest's"
        );
    }

    #[test]
    fn rows_are_consistent() {
        for f in FIXTURES {
            assert!(
                ["b", "v", "commit ", "fork "]
                    .iter()
                    .any(|p| f.llama_cpp.starts_with(p)),
                "{}: a build number, a release tag, a commit or a fork",
                f.name
            );
            assert_eq!(f.date.len(), 7, "{}: date is YYYY-MM", f.name);
            if let Source::Build(b) = &f.source {
                let shared = b.cmake_flags.contains(&"-DBUILD_SHARED_LIBS=ON");
                assert_eq!(shared, f.linkage == Linkage::Shared, "{}", f.name);
                let dwarf = b.cmake_flags.contains(&"-DCMAKE_BUILD_TYPE=RelWithDebInfo");
                assert_eq!(dwarf, f.dwarf, "{}", f.name);
                assert_eq!(
                    b.targets.contains(&"llama-server"),
                    f.server_code.is_some(),
                    "{}",
                    f.name
                );
            }
            if f.dwarf {
                assert!(!f.stripped);
            }
        }
    }

    #[test]
    fn default_matrix_is_a_subset_with_newest() {
        let default: Vec<&str> = FIXTURES
            .iter()
            .filter(|f| f.in_matrix(Matrix::Default))
            .map(|f| f.name)
            .collect();
        assert_eq!(
            default,
            ["newest", "newest-stripped", "mid2025", "npm", "pypi2024"]
        );
        assert_eq!(
            FIXTURES
                .iter()
                .filter(|f| f.in_matrix(Matrix::Full))
                .count(),
            FIXTURES.len()
        );
    }

    #[test]
    fn fixtures_json_has_every_field_in_order() {
        let newest = fixture("newest").unwrap();
        let stripped = fixture("newest-stripped").unwrap();
        let built = vec![
            (
                newest,
                Built {
                    server: Some("/c/build/newest/bin/llama-server".into()),
                    libllama: Some("/c/build/newest/bin/libllama.so.0.5.0".into()),
                    ..Built::default()
                },
            ),
            (
                stripped,
                Built {
                    env: vec![("LD_LIBRARY_PATH", "/c/build/newest-stripped/lib".into())],
                    ..Built::default()
                },
            ),
        ];
        let text = fixtures_json(&built);
        let parsed: Value = serde_json::from_str(&text).unwrap();
        let first = &parsed[0];
        assert_eq!(first["name"], "newest");
        assert_eq!(first["generation"], "batch_ext");
        assert_eq!(first["server"], "/c/build/newest/bin/llama-server");
        assert_eq!(first["cli"], Value::Null);
        assert_eq!(first["env"], json!({}));
        assert_eq!(
            parsed[1]["env"]["LD_LIBRARY_PATH"],
            "/c/build/newest-stripped/lib"
        );
        let keys = [
            "name",
            "source",
            "llama_cpp",
            "date",
            "generation",
            "linkage",
            "stripped",
            "dwarf",
            "server",
            "cli",
            "driver",
            "libllama",
            "env",
            "symbols_from",
            "node_app",
            "python",
            "layout_probe",
            "server_code",
        ];
        let mut at = 0;
        for key in keys {
            let found = text[at..]
                .find(&format!("\"{key}\":"))
                .unwrap_or_else(|| panic!("{key} missing or out of order"));
            at += found;
        }
        assert_eq!(first.as_object().unwrap().len(), keys.len());
    }

    /// README.md's compatibility section is generated: it must equal the table.
    #[test]
    fn readme_compat_table_is_current() {
        let readme = fs::read_to_string(util::workspace_root().join("README.md")).unwrap();
        let current = crate::compat::between_markers(&readme)
            .expect("README.md has the compat:start / compat:end markers");
        assert_eq!(
            current.trim(),
            compat_table().trim(),
            "README.md's compatibility table is out of date: run `cargo xtask compat --write`"
        );
    }

    /// A second taker of a build directory's lock waits until the first lets go.
    #[test]
    fn build_dir_lock_makes_a_second_build_wait() {
        let root = std::env::temp_dir().join(format!("xtask-lock-test-{}", std::process::id()));
        let dir = root.join("build/newest");
        let first = lock_build_dir(&dir).unwrap();
        assert!(root.join("build/newest.lock").is_file());
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = thread::spawn(move || {
            let second = lock_build_dir(&dir).unwrap();
            tx.send(()).unwrap();
            drop(second);
        });
        let held = std::time::Duration::from_millis(300);
        assert!(
            rx.recv_timeout(held).is_err(),
            "the second took a held lock"
        );
        drop(first);
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the second got the lock once the first let go");
        waiter.join().unwrap();
        fs::remove_dir_all(&root).unwrap();
    }
}
