//! Shared by unit tests: the fake llama.cpp of tests/fake, built once per test run.

use std::{path::PathBuf, sync::OnceLock};

/// Builds tests/fake into a temporary directory (once) and returns it.
pub fn fakes() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = std::env::temp_dir().join("llamaprobe-unit-fakes");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fake/build.sh");
        let st = std::process::Command::new("bash")
            .arg(script)
            .arg(&out)
            .status()
            .expect("run tests/fake/build.sh");
        assert!(st.success(), "building the fake llama.cpp failed");
        out
    })
}
