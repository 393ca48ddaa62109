//! Readings of the traced llama.cpp processes outside the eBPF path: GPU metrics (NVML),
//! process memory, CPU time and threads (procfs), and the model each one runs (its file found
//! in the process, its GGUF metadata read). They become `model::Readings` in each tick's
//! snapshot, or observations (a model's facts), which every sink may export.
//!
//! - [`gguf`]: GGUF metadata (architecture, parameters, quantization, trained context).
//! - [`procfs`]: resident memory, CPU seconds and threads of a pid.
//! - [`model_path`]: the model file of a process that loaded it before llamaprobe attached.
//! - [`nvml`]: per-GPU and per-process GPU metrics through `nvml-wrapper`.
//! - [`Sampler`]: one round of GPU and process readings.

pub mod gguf;
pub mod identity;
pub mod k8s;
pub mod model_path;
pub mod nvml;
pub mod procfs;

use std::path::{Path, PathBuf};

use crate::{
    discover::inroot,
    model::{GpuSample, ModelInfo, ProcessSample},
};

pub use model_path::ModelPath;

/// Errors of finding and reading the model of a process.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// The process could not be inspected.
    #[error(transparent)]
    ModelPath(#[from] model_path::ModelPathError),
    /// The model file was not opened: not a regular file inside the process's root, or too
    /// large (the reason says which).
    #[error("model {0}")]
    Refused(crate::discover::inroot::OpenError),
    /// The model file's metadata could not be read.
    #[error("model {path}: {source}")]
    Gguf {
        path: String,
        #[source]
        source: gguf::GgufError,
    },
}

impl ResourceError {
    fn of_gguf(path: &Path, e: gguf::GgufError) -> Self {
        match e {
            gguf::GgufError::Open(e) => ResourceError::Refused(e),
            source => ResourceError::Gguf {
                path: path.display().to_string(),
                source,
            },
        }
    }
}

/// The model of `pid`, for a process that loaded it before llamaprobe attached: the most
/// likely model file of the process ([`model_path::search`]) and its metadata, with
/// [`ModelInfo::path`] as the process sees it. `Ok(None)` if the process has no model file;
/// [`ResourceError::Refused`] if the only ones it maps, holds or names are not regular files
/// inside its root.
pub fn recover_model(pid: u32) -> Result<Option<(ModelPath, ModelInfo)>, ResourceError> {
    let found = model_path::search(pid)?;
    for (path, e) in &found.refused {
        tracing::debug!("pid {pid}: model {}: {e}", path.display());
    }
    let Some(m) = found.models.into_iter().next() else {
        return match found.refused.into_iter().next() {
            Some((_, e)) => Err(ResourceError::Refused(e)),
            None => Ok(None),
        };
    };
    let mut info = gguf::read_with(&m.path, |p| {
        if p == m.path {
            m.open().map(|o| o.file)
        } else {
            // Another shard beside it: inside the process's root.
            inroot::open_in_root(pid, p, gguf::expect()).map(|o| o.file)
        }
    })
    .map_err(|e| ResourceError::of_gguf(&m.path, e))?;
    info.path = m.path.clone();
    Ok(Some((m, info)))
}

/// The metadata of the model a process reported loading (`path` as the process sees it, e.g.
/// from a model-load event; a relative path is relative to the process's working directory):
/// opened inside the process's root ([`inroot::open_in_root`]), and [`ModelInfo::path`] made
/// absolute there.
pub fn model_from_load(pid: u32, path: &Path) -> Result<ModelInfo, ResourceError> {
    let abs = inroot::absolute(pid, path).map_err(ResourceError::Refused)?;
    let mut info = gguf::read_with(&abs, |p| {
        inroot::open_in_root(pid, p, gguf::expect()).map(|o| o.file)
    })
    .map_err(|e| ResourceError::of_gguf(path, e))?;
    info.path = abs;
    Ok(info)
}

/// The GPUs (NVML, when a driver is there) and procfs, read about once a second.
pub struct Sampler {
    gpus: Option<nvml::Gpus>,
    gpu_status: String,
    /// (pid, what) whose failure was logged already.
    logged: std::collections::HashSet<u32>,
}

impl Sampler {
    /// Initialises NVML from `nvml_lib` (else `$LLAMAPROBE_NVML_LIB`, else
    /// `libnvidia-ml.so.1`). Without NVML, GPU readings are off and [`Self::gpu_status`] says
    /// why in one line; nothing else is said later.
    pub fn new(nvml_lib: Option<PathBuf>) -> Self {
        let lib = nvml::lib_path(nvml_lib.as_deref());
        let (gpus, gpu_status) = match nvml::Gpus::init(&lib) {
            Ok(g) => {
                let s = g.describe();
                (Some(g), s)
            }
            Err(e) => (None, e.to_string()),
        };
        tracing::info!("{gpu_status}");
        Self {
            gpus,
            gpu_status,
            logged: Default::default(),
        }
    }

    /// One line on GPU readings: the GPUs found, or why there are none
    /// ("no NVIDIA driver (libnvidia-ml.so.1 not found): GPU metrics off").
    pub fn gpu_status(&self) -> &str {
        &self.gpu_status
    }

    /// Whether GPUs are read.
    pub fn has_gpus(&self) -> bool {
        self.gpus.is_some()
    }

    /// The GPUs (their process lists restricted to `pids`) and the processes `pids` now: a few
    /// small /proc reads per process and a dozen NVML calls per GPU. A process that is gone
    /// has no reading.
    pub fn sample(&mut self, pids: &[u32]) -> (Vec<GpuSample>, Vec<(u32, ProcessSample)>) {
        let mut processes = Vec::new();
        for &pid in pids {
            match procfs::sample(pid) {
                Ok(s) => processes.push((pid, s)),
                Err(procfs::ProcError::NoSuchProcess { .. }) => {}
                Err(e) => {
                    if self.logged.insert(pid) {
                        tracing::debug!("process readings of pid {pid}: {e}");
                    }
                }
            }
        }
        let mut gpus = self.gpus.as_mut().map(|g| g.sample()).unwrap_or_default();
        for s in &mut gpus {
            if let Some(list) = s.processes.as_mut() {
                list.retain(|p| pids.contains(&p.pid));
            }
        }
        (gpus, processes)
    }
}
