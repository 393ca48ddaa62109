//! Types shared by the eBPF programs (`probe-ebpf`) and the agent (`llamaprobe`).
//!
//! Everything here is `#[repr(C)]` and crosses the kernel/user boundary as raw bytes, so every
//! type carries a size assertion: changing a layout without changing both sides fails to build.
//! Events are header-first ([`EventHeader`]); the header's `kind` says which body follows.
#![no_std]

pub mod event;
pub mod layout;

pub use event::*;
pub use layout::*;
