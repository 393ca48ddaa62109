//! llamaprobe: a zero-instrumentation profiler for llama.cpp.
//!
//! The stages, in the order data flows (each a module with one job; see docs/ARCHITECTURE.md):
//!
//! - [`catalog`]: everything llama.cpp-specific, as data: probe points, struct layouts, return
//!   codes, labels.
//! - [`discover`]: processes, their memory maps and the files behind them.
//! - [`resolve`]: ELF symbols of those files → the probe plan of a process; DWARF layouts.
//! - [`attach`]: the eBPF programs loaded and attached to the plan.
//! - [`decode`]: ring-buffer records → typed events (the only place that reinterprets bytes).
//! - [`assemble`]: events → observations: classified decode steps, requests, context use.
//! - [`sinks`]: where observations go: Prometheus, OTLP, trace file, JSON lines, terminal,
//!   summary.
//!
//! Beside them: [`model`] (the types the stages pass on), [`sources`] (readings outside the
//! eBPF path: GGUF metadata, the model file of a process, NVML, procfs) and [`app`] (the
//! command line and the session that runs the stages).

pub mod app;
pub mod assemble;
pub mod attach;
pub mod decode;
pub mod discover;
pub mod model;
pub mod resolve;
pub mod sinks;
pub mod sources;
#[cfg(test)]
mod test_support;

/// Everything llama.cpp-specific, as data (the `llamaprobe-catalog` crate).
pub use llamaprobe_catalog as catalog;
