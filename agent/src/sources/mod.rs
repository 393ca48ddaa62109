//! Resources of the traced llama.cpp processes, outside the eBPF path: GPU metrics (NVML),
//! process memory, CPU time and threads (procfs), and the model each one runs (its file found
//! in the process, its GGUF metadata read), exposed as Prometheus series; the GPU readings are
//! also handed to the OTLP sink through a [`GpuFeed`].
//!
//! - [`gguf`]: GGUF metadata (architecture, parameters, quantization, trained context).
//! - [`procfs`]: resident memory, CPU seconds and threads of a pid.
//! - [`model_path`]: the model file of a process that loaded it before llamaprobe attached.
//! - [`nvml`]: per-GPU and per-process GPU metrics through `nvml-wrapper`.
//! - [`metrics`]: [`ResourceSampler`], which samples all of it into a `prometheus::Registry`.
//! - [`gpu_feed`]: [`GpuFeed`], the latest GPU readings handed from the sampler to other
//!   exporters (the OTLP sink).
//!
//! Nothing here refers to the rest of the agent, so the integration tests compile it on its own.

pub mod gguf;
pub mod gpu_feed;
pub mod model_path;
pub mod nvml;
pub mod procfs;

use std::path::Path;

pub use gguf::ModelInfo;
pub use gpu_feed::GpuFeed;
pub use model_path::ModelPath;

/// Errors of finding and reading the model of a process.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// The process could not be inspected.
    #[error(transparent)]
    ModelPath(#[from] model_path::ModelPathError),
    /// The model file's metadata could not be read.
    #[error("model {path}: {source}")]
    Gguf {
        path: String,
        #[source]
        source: gguf::GgufError,
    },
}

/// The model of `pid`, for a process that loaded it before llamaprobe attached: the most
/// likely model file of the process ([`model_path::find`]) and its metadata, with
/// [`ModelInfo::path`] as the process sees it. `Ok(None)` if the process has no model file.
pub fn recover_model(pid: u32) -> Result<Option<(ModelPath, ModelInfo)>, ResourceError> {
    let Some(found) = model_path::find(pid)?.into_iter().next() else {
        return Ok(None);
    };
    let mut info = gguf::read(&found.host_path).map_err(|source| ResourceError::Gguf {
        path: found.path.display().to_string(),
        source,
    })?;
    info.path = found.path.clone();
    Ok(Some((found, info)))
}

/// The metadata of the model a process reported loading (`path` as the process sees it, e.g.
/// from a model-load event; a relative path is relative to the process's working directory,
/// and [`ModelInfo::path`] is made absolute with it).
pub fn model_from_load(pid: u32, path: &Path) -> Result<ModelInfo, ResourceError> {
    let mut info =
        gguf::read(&model_path::host_path(pid, path)).map_err(|source| ResourceError::Gguf {
            path: path.display().to_string(),
            source,
        })?;
    info.path = match std::fs::read_link(format!("/proc/{pid}/cwd")) {
        Ok(cwd) if path.is_relative() => cwd.join(path),
        _ => path.to_path_buf(),
    };
    Ok(info)
}
