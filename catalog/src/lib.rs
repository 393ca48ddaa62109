//! Everything llamaprobe knows about llama.cpp versions, as data: the API generations, the
//! functions probed in each (symbol → eBPF programs), and the struct layouts the probes read.
//!
//! To support a new llama.cpp version, change this crate only: add its symbols to [`PROBES`]
//! (`probes.rs`) and, if a struct moved, a layout to [`LAYOUTS`] or [`SERVER_LAYOUTS`]
//! (`layouts.rs`). Each probe names the upstream prototype it relies on (see the eBPF modules
//! for the argument handling). A crate of its own, below the agent, so that xtask (which builds
//! the fixtures the tests run on) speaks of the same generations.

mod kinds;
mod labels;
mod layouts;
mod probes;

pub use kinds::*;
pub use labels::*;
pub use layouts::*;
pub use probes::*;

/// ggml GPU backends, by the library file a shared build loads (`libggml-<name>.so`) and the
/// init function a static build contains. With one of them the decode step only queues work
/// and `llama_synchronize` is where it completes; without, decode is synchronous on the CPU.
pub const GPU_BACKENDS: &[(&str, &str)] = &[
    ("libggml-cuda", "ggml_backend_cuda_init"),
    ("libggml-hip", "ggml_backend_cuda_init"),
    ("libggml-musa", "ggml_backend_cuda_init"),
    ("libggml-vulkan", "ggml_backend_vk_init"),
    ("libggml-sycl", "ggml_backend_sycl_init"),
    ("libggml-metal", "ggml_backend_metal_init"),
    ("libggml-opencl", "ggml_backend_opencl_init"),
    ("libggml-cann", "ggml_backend_cann_init"),
];

/// Every symbol llamaprobe looks for: the probed functions and the layout markers.
pub fn wanted_symbols() -> impl Iterator<Item = &'static str> {
    PROBES
        .iter()
        .map(|p| p.symbol)
        .chain(LAYOUTS.iter().filter_map(|r| r.marker))
        .chain(SERVER_LAYOUTS.iter().filter_map(|r| r.marker))
}

/// The generation implied by the symbols a process has.
pub fn detect_generation(has: impl Fn(&str) -> bool) -> Option<Generation> {
    if has(BATCH_EXT_DECODE) {
        Some(Generation::BatchExt)
    } else if has(CLASSIC_DECODE) {
        // The 2024 sampling API without the sampler chain that replaced it.
        if has(LEGACY_SAMPLE) && !has(SAMPLER_SAMPLE) {
            Some(Generation::Legacy)
        } else {
            Some(Generation::Classic)
        }
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_generation_has_a_decode_probe_and_a_layout() {
        for g in [
            Generation::BatchExt,
            Generation::Classic,
            Generation::Legacy,
        ] {
            let decodes = PROBES
                .iter()
                .filter(|p| p.family == Family::Decode && p.applies_to(g))
                .count();
            assert_eq!(decodes, 1, "{g:?} must probe exactly one decode function");
            assert_eq!(layout_for(g, |_| false).generation, g);
            assert_eq!(layout_for(g, |_| false).marker, None);
        }
    }

    #[test]
    fn a_classic_build_with_the_2026_context_parameters_gets_their_layout() {
        let row = layout_for(Generation::Classic, |s| s == CTX_PARAMS_2026_MARKER);
        assert_eq!(row.marker, Some(CTX_PARAMS_2026_MARKER));
        assert_eq!(row.layout.ctx_params.n_threads, 28);
        assert_eq!(row.layout.classic, CLASSIC_BATCH);
        assert_eq!(
            layout_for(Generation::Classic, |_| false)
                .layout
                .ctx_params
                .n_threads,
            16
        );
        // The marker is looked for like the probed functions.
        assert!(wanted_symbols().any(|s| s == CTX_PARAMS_2026_MARKER));
    }

    #[test]
    fn names_are_readable() {
        let names: Vec<&str> = PROBES.iter().map(|p| p.name()).collect();
        assert_eq!(names[0], "llama_context::decode");
        assert!(names.contains(&"llama_decode"));
        assert!(names.contains(&"common_sampler_sample"));
        assert!(names.iter().all(|n| !n.is_empty() && !n.starts_with("_Z")));
    }

    #[test]
    fn generation_detection_prefers_batch_ext() {
        let both = |s: &str| s == BATCH_EXT_DECODE || s == CLASSIC_DECODE;
        assert_eq!(detect_generation(both), Some(Generation::BatchExt));
        assert_eq!(
            detect_generation(|s| s == CLASSIC_DECODE),
            Some(Generation::Classic)
        );
        assert_eq!(detect_generation(|_| false), None);
        let legacy = |s: &str| s == CLASSIC_DECODE || s == LEGACY_SAMPLE;
        assert_eq!(detect_generation(legacy), Some(Generation::Legacy));
        // A build with both sampling APIs (b3681 kept neither; embedders may wrap) is classic.
        let both_apis = |s: &str| legacy(s) || s == SAMPLER_SAMPLE;
        assert_eq!(detect_generation(both_apis), Some(Generation::Classic));
        // Wanted, so the resolver looks for them.
        assert!(wanted_symbols().any(|s| s == LEGACY_SAMPLE));
        assert!(wanted_symbols().any(|s| s == SAMPLER_SAMPLE));
    }
}
