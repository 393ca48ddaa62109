//! NVIDIA GPU metrics through NVML (`nvml-wrapper`, which loads `libnvidia-ml.so.1` at run time:
//! llamaprobe has no link-time dependency on the driver).
//!
//! The library is `--nvml-lib PATH`, else `$LLAMAPROBE_NVML_LIB`, else `libnvidia-ml.so.1`.
//! Without a driver, [`Gpus::init`] returns one error whose text is the single line to print
//! ("no NVIDIA driver (libnvidia-ml.so.1 not found): GPU metrics off"); the caller then has no
//! GPU to sample and nothing more is said. Once initialised, each field of each GPU is read on
//! its own: a call that fails (`NotSupported` on consumer boards, `GpuLost`, ...) leaves only
//! that field absent, logged once at debug level.

use std::{
    collections::{HashMap, HashSet},
    ffi::{CString, OsStr, OsString},
    os::unix::ffi::OsStrExt,
    path::Path,
};

use crate::model::{GpuIdentity, GpuProcess, GpuSample};
use nvml_wrapper::{
    enum_wrappers::device::{Clock, TemperatureSensor},
    enums::device::UsedGpuMemory,
    error::NvmlError,
    struct_wrappers::device::ProcessInfo,
    Nvml,
};

/// The library loaded when none is named.
pub const DEFAULT_LIB: &str = "libnvidia-ml.so.1";
/// Environment variable naming the library (what `--nvml-lib` defaults to).
pub const LIB_ENV: &str = "LLAMAPROBE_NVML_LIB";

/// Errors of initialising NVML. Each is one line meant to be printed once.
#[derive(Debug, thiserror::Error)]
pub enum NvmlInitError {
    /// The library is not there: no NVIDIA driver on this machine.
    #[error("no NVIDIA driver ({lib} not found): GPU metrics off")]
    LibraryNotFound { lib: String },
    /// The library is there but could not be loaded.
    #[error("cannot load NVML from {lib} ({reason}): GPU metrics off")]
    LibraryLoad { lib: String, reason: String },
    /// The library loads but is not NVML.
    #[error("{lib} is not an NVML library (it has no {symbol}): GPU metrics off")]
    NotNvml { lib: String, symbol: &'static str },
    /// The library is there but the kernel driver is not running.
    #[error("NVIDIA driver not loaded (nvmlInit: {reason}): GPU metrics off")]
    DriverNotLoaded { reason: String },
    /// NVML refused us.
    #[error("no permission to use NVML (nvmlInit: {reason}): GPU metrics off")]
    NoPermission { reason: String },
    /// Any other failure of `nvmlInit` or of counting the GPUs.
    #[error("NVML initialisation failed ({reason}): GPU metrics off")]
    Init { reason: String },
    /// NVML works but sees no GPU.
    #[error("NVML sees no NVIDIA GPU: GPU metrics off")]
    NoGpu,
}

/// The NVML library to load: `explicit` (from `--nvml-lib`), else `$LLAMAPROBE_NVML_LIB`, else
/// [`DEFAULT_LIB`] (found by the dynamic loader's search path).
pub fn lib_path(explicit: Option<&Path>) -> OsString {
    match explicit {
        Some(p) => p.as_os_str().to_owned(),
        None => std::env::var_os(LIB_ENV)
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| DEFAULT_LIB.into()),
    }
}

/// Initialised NVML and the GPUs it sees.
pub struct Gpus {
    nvml: Nvml,
    devices: Vec<GpuIdentity>,
    lib: String,
    /// (GPU index, field) whose failure was logged already.
    logged: HashSet<(u32, &'static str)>,
}

impl Gpus {
    /// Loads NVML from `lib` (see [`lib_path`]), initialises it and reads the GPUs' identities.
    pub fn init(lib: &OsStr) -> Result<Self, NvmlInitError> {
        let lib_name = lib.to_string_lossy().into_owned();
        // Checked with dlopen first: nvml-wrapper would fail on a missing library just as well,
        // but it panics when dropped if the library lacks nvmlShutdown, and this gives a clearer
        // message for a wrong --nvml-lib.
        let handle = DlHandle::open(lib, &lib_name)?;
        for symbol in ["nvmlInit_v2", "nvmlShutdown"] {
            if !handle.has(symbol) {
                return Err(NvmlInitError::NotNvml {
                    lib: lib_name,
                    symbol,
                });
            }
        }
        let nvml = Nvml::builder().lib_path(lib).init().map_err(|e| match e {
            NvmlError::DriverNotLoaded => NvmlInitError::DriverNotLoaded {
                reason: e.to_string(),
            },
            NvmlError::NoPermission => NvmlInitError::NoPermission {
                reason: e.to_string(),
            },
            e => NvmlInitError::Init {
                reason: e.to_string(),
            },
        })?;
        // nvml-wrapper holds its own reference to the library now.
        drop(handle);
        let count = nvml.device_count().map_err(|e| NvmlInitError::Init {
            reason: format!("nvmlDeviceGetCount: {e}"),
        })?;
        if count == 0 {
            return Err(NvmlInitError::NoGpu);
        }
        let mut logged = HashSet::new();
        let devices = (0..count)
            .map(|index| {
                let (uuid, name) = match nvml.device_by_index(index) {
                    Ok(d) => (
                        field(&mut logged, index, "uuid", d.uuid()).unwrap_or_default(),
                        field(&mut logged, index, "name", d.name()).unwrap_or_default(),
                    ),
                    Err(e) => {
                        field::<()>(&mut logged, index, "handle", Err(e));
                        Default::default()
                    }
                };
                GpuIdentity { index, uuid, name }
            })
            .collect();
        Ok(Self {
            nvml,
            devices,
            lib: lib_name,
            logged,
        })
    }

    /// One line for the user: how many GPUs, which, through which library.
    pub fn describe(&self) -> String {
        let list: Vec<String> = self
            .devices
            .iter()
            .map(|d| format!("{} {}", d.index, d.name))
            .collect();
        format!(
            "GPU metrics from NVML ({}): {} NVIDIA GPU{}: {}",
            self.lib,
            self.devices.len(),
            if self.devices.len() == 1 { "" } else { "s" },
            list.join(", ")
        )
    }

    /// Reads every GPU. Never fails as a whole: what cannot be read is `None`.
    pub fn sample(&mut self) -> Vec<GpuSample> {
        let logged = &mut self.logged;
        self.devices
            .iter()
            .map(|id| {
                let i = id.index;
                let mut s = GpuSample::unread(id.clone());
                let d = match self.nvml.device_by_index(i) {
                    Ok(d) => d,
                    Err(e) => {
                        field::<()>(logged, i, "handle", Err(e));
                        return s;
                    }
                };
                s.utilization = field(logged, i, "utilization", d.utilization_rates())
                    .map(|u| f64::from(u.gpu.min(100)) / 100.0);
                if let Some(m) = field(logged, i, "memory", d.memory_info()) {
                    s.memory_used_bytes = Some(m.used);
                    s.memory_total_bytes = Some(m.total);
                }
                s.temperature_celsius = field(
                    logged,
                    i,
                    "temperature",
                    d.temperature(TemperatureSensor::Gpu),
                )
                .map(f64::from);
                s.power_watts =
                    field(logged, i, "power", d.power_usage()).map(|mw| f64::from(mw) / 1000.0);
                s.sm_clock_hertz = field(logged, i, "sm_clock", d.clock_info(Clock::SM))
                    .map(|mhz| f64::from(mhz) * 1e6);
                s.throttle_reasons =
                    field(logged, i, "throttle_reasons", d.current_throttle_reasons())
                        .map(|r| r.bits());
                let compute = field(
                    logged,
                    i,
                    "compute_processes",
                    d.running_compute_processes(),
                );
                let graphics = field(
                    logged,
                    i,
                    "graphics_processes",
                    d.running_graphics_processes(),
                );
                if compute.is_some() || graphics.is_some() {
                    s.processes = Some(merge_processes(
                        compute.as_deref().unwrap_or_default(),
                        graphics.as_deref().unwrap_or_default(),
                    ));
                }
                s
            })
            .collect()
    }
}

/// The value of a field, or `None` with the first failure of that field on that GPU logged.
fn field<T>(
    logged: &mut HashSet<(u32, &'static str)>,
    gpu: u32,
    name: &'static str,
    r: Result<T, NvmlError>,
) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            if logged.insert((gpu, name)) {
                tracing::debug!("GPU {gpu}: {name} not available from NVML: {e}");
            }
            None
        }
    }
}

/// One entry per pid: entries of a list are added (one per MIG instance), the two lists are
/// not (a process with both contexts is reported in both with the same memory).
fn merge_processes(compute: &[ProcessInfo], graphics: &[ProcessInfo]) -> Vec<GpuProcess> {
    let sum = |list: &[ProcessInfo]| {
        let mut m: HashMap<u32, u64> = HashMap::new();
        for p in list {
            if let UsedGpuMemory::Used(b) = p.used_gpu_memory {
                let e = m.entry(p.pid).or_default();
                *e = e.saturating_add(b);
            }
        }
        m
    };
    let mut all = sum(compute);
    for (pid, b) in sum(graphics) {
        let e = all.entry(pid).or_default();
        *e = (*e).max(b);
    }
    let mut out: Vec<GpuProcess> = all
        .into_iter()
        .map(|(pid, used_memory_bytes)| GpuProcess {
            pid,
            used_memory_bytes,
        })
        .collect();
    out.sort_by_key(|p| p.pid);
    out
}

/// A `dlopen` handle, closed on drop.
struct DlHandle(*mut libc::c_void);

impl DlHandle {
    fn open(lib: &OsStr, lib_name: &str) -> Result<Self, NvmlInitError> {
        let c = CString::new(lib.as_bytes()).map_err(|_| NvmlInitError::LibraryLoad {
            lib: lib_name.to_owned(),
            reason: "the path contains a NUL byte".into(),
        })?;
        // SAFETY: c is a valid C string. Loading runs the library's initialisers, as loading
        // it through nvml-wrapper would.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
        if !h.is_null() {
            return Ok(Self(h));
        }
        // SAFETY: dlerror returns a thread-local C string or null.
        let reason = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                String::from("unknown error")
            } else {
                std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        let explicit_missing = lib.as_bytes().contains(&b'/') && !Path::new(lib).exists();
        if explicit_missing || reason.contains("No such file or directory") {
            Err(NvmlInitError::LibraryNotFound {
                lib: lib_name.to_owned(),
            })
        } else {
            Err(NvmlInitError::LibraryLoad {
                lib: lib_name.to_owned(),
                reason,
            })
        }
    }

    fn has(&self, symbol: &str) -> bool {
        let Ok(c) = CString::new(symbol) else {
            return false;
        };
        // SAFETY: self.0 is a live handle from dlopen; c is a valid C string.
        !unsafe { libc::dlsym(self.0, c.as_ptr()) }.is_null()
    }
}

impl Drop for DlHandle {
    fn drop(&mut self) {
        // SAFETY: self.0 came from a successful dlopen and is closed once.
        unsafe {
            libc::dlclose(self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pid: u32, b: u64) -> ProcessInfo {
        ProcessInfo {
            pid,
            used_gpu_memory: UsedGpuMemory::Used(b),
            gpu_instance_id: None,
            compute_instance_id: None,
        }
    }

    #[test]
    fn processes_are_merged_per_pid() {
        let compute = [info(7, 100), info(7, 50), info(9, 10)];
        let graphics = [info(7, 120), info(11, 5)];
        assert_eq!(
            merge_processes(&compute, &graphics),
            [
                GpuProcess {
                    pid: 7,
                    used_memory_bytes: 150
                },
                GpuProcess {
                    pid: 9,
                    used_memory_bytes: 10
                },
                GpuProcess {
                    pid: 11,
                    used_memory_bytes: 5
                },
            ]
        );
        let unavailable = ProcessInfo {
            used_gpu_memory: UsedGpuMemory::Unavailable,
            ..info(3, 0)
        };
        assert!(merge_processes(&[unavailable], &[]).is_empty());
    }

    #[test]
    fn a_missing_library_is_one_clear_line() {
        let err = Gpus::init(OsStr::new("/nonexistent/libnvidia-ml.so.1"))
            .err()
            .expect("no such library");
        assert_eq!(
            err.to_string(),
            "no NVIDIA driver (/nonexistent/libnvidia-ml.so.1 not found): GPU metrics off"
        );
        let err = Gpus::init(OsStr::new("libllamaprobe-no-such-nvml.so.1"))
            .err()
            .expect("no such library");
        assert!(
            matches!(err, NvmlInitError::LibraryNotFound { .. }),
            "{err}"
        );
    }

    #[test]
    fn a_library_that_is_not_nvml_is_refused() {
        // libc is loaded already and has no NVML symbol.
        let err = Gpus::init(OsStr::new("libc.so.6")).err().expect("not NVML");
        assert!(matches!(err, NvmlInitError::NotNvml { .. }), "{err}");
    }

    #[test]
    fn the_library_comes_from_the_option_else_the_default() {
        assert_eq!(lib_path(Some(Path::new("/x/libnvml.so"))), "/x/libnvml.so");
        if std::env::var_os(LIB_ENV).is_none() {
            assert_eq!(lib_path(None), DEFAULT_LIB);
        }
    }
}
