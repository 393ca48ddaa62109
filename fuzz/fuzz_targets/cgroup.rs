//! The texts of `/proc/PID/{cgroup,environ,cmdline}` (the traced process's or its runtime's to
//! shape) → the container id and pod UID, the service name, the model named on the command
//! line or in the environment.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use llamaprobe::sources::{identity, model_path};

fuzz_target!(|data: &[u8]| {
    let (container, pod) = identity::container_of_cgroup(&String::from_utf8_lossy(data));
    for id in [container, pod].into_iter().flatten() {
        assert!(id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'));
    }
    for truncated in [false, true] {
        if let Some(name) = identity::env_var(data, "OTEL_SERVICE_NAME", truncated) {
            common::assert_label(&identity::sanitize_label(&name));
        }
    }
    for path in [
        model_path::model_argument(data),
        model_path::model_env(data),
    ]
    .into_iter()
    .flatten()
    {
        // Opening it is the kernel's walk (openat2 with RESOLVE_IN_ROOT), not a parser's.
        common::assert_label(&model_path::label(&path));
    }
});
