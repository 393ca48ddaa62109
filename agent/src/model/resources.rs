//! Readings of the resources beside the probes (GPUs, the traced processes, their models), as
//! the sources make them and the sinks export them.

use std::{fmt, path::PathBuf};

/// What does not change: a GPU's index, UUID and name ("" if NVML could not tell).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuIdentity {
    pub index: u32,
    pub uuid: String,
    pub name: String,
}

/// A process using a GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuProcess {
    pub pid: u32,
    /// GPU memory used by the process, bytes.
    pub used_memory_bytes: u64,
}

/// One reading of a GPU; `None` where NVML could not tell.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuSample {
    pub id: GpuIdentity,
    /// Share of the last sample period during which a kernel ran, 0 to 1.
    pub utilization: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_celsius: Option<f64>,
    pub power_watts: Option<f64>,
    pub sm_clock_hertz: Option<f64>,
    /// Current clock throttle reasons (`nvmlClocksThrottleReason*` bits).
    pub throttle_reasons: Option<u64>,
    /// Processes with a compute or graphics context, by pid; `None` if neither list could be
    /// read. A process in both lists is counted once (the larger figure).
    pub processes: Option<Vec<GpuProcess>>,
}

impl GpuSample {
    /// A reading of GPU `id` with no field read yet.
    pub fn unread(id: GpuIdentity) -> Self {
        Self {
            id,
            utilization: None,
            memory_used_bytes: None,
            memory_total_bytes: None,
            temperature_celsius: None,
            power_watts: None,
            sm_clock_hertz: None,
            throttle_reasons: None,
            processes: None,
        }
    }
}

/// One sample of a process's resource use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessSample {
    /// Resident set size, bytes (anonymous, file-backed and shared pages: an mmapped model's
    /// pages count once they are touched).
    pub rss_bytes: u64,
    /// CPU time used by all its threads, user + system, seconds.
    pub cpu_seconds: f64,
    /// Threads.
    pub threads: u64,
}

/// A model file type (`general.file_type`, llama.cpp's `enum llama_ftype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileType(pub u32);

impl serde::Serialize for FileType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `LLAMA_FTYPE_GUESSED`: set by llama.cpp when the type was not in the file.
use crate::catalog::FTYPE_GUESSED;

impl FileType {
    /// The name of the type as in `enum llama_ftype` without its `LLAMA_FTYPE_ALL_` or
    /// `LLAMA_FTYPE_MOSTLY_` prefix (`Q4_K_M`, `F16`, ...); `None` if unknown.
    pub fn known_name(self) -> Option<&'static str> {
        crate::catalog::file_type_name(self.0 & !FTYPE_GUESSED)
    }
}

impl fmt::Display for FileType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.known_name() {
            Some(n) if self.0 & FTYPE_GUESSED != 0 => write!(f, "{n} (guessed)"),
            Some(n) => f.write_str(n),
            None => write!(f, "unknown({})", self.0),
        }
    }
}

/// What llamaprobe reports about a model file.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelInfo {
    /// The model file (for a model seen in a process: the path as the process sees it).
    pub path: PathBuf,
    /// `general.architecture` (`llama`, `qwen2`, ...).
    pub architecture: Option<String>,
    /// Parameters: elements of all tensors (of all shards of a split model).
    pub parameters: u64,
    /// `general.file_type`: the quantization.
    pub file_type: Option<FileType>,
    /// `<architecture>.context_length`: the trained context length.
    pub context_length: Option<u64>,
    /// `general.name`.
    pub name: Option<String>,
    /// Size of the file (of all shards of a split model), bytes.
    pub size_bytes: u64,
}
