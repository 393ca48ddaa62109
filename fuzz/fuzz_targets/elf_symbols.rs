//! A mapped file's bytes as an ELF image → the symbol resolver (`resolve::resolve_bytes`: the
//! catalog functions, their file offsets through the program headers) → the probe plan and its
//! report; and the interpreter (`PT_INTERP`) `run` reads.

#![no_main]

use libfuzzer_sys::fuzz_target;
use llamaprobe::{
    discover::{elf, MappedFile},
    resolve::{self, Plan},
};

fuzz_target!(|data: &[u8]| {
    let _ = elf::interpreter(data);
    let file = MappedFile {
        path: "/usr/lib/libllama.so".into(),
        // Never opened: the bytes are given. (Not a libggml name: no directory is listed.)
        host_path: "/nonexistent/libllama.so".into(),
        dev: 0,
        inode: 1,
    };
    let Ok(symbols) = resolve::resolve_bytes(file.clone(), data, None) else {
        return;
    };
    if let Ok(plan) = Plan::build_with(&[file], "fuzz", |_| Ok(symbols.clone())) {
        let _ = resolve::render_plan("fuzz", &plan);
        let _ = plan.process_layout();
        let _ = plan.unmeasured_families();
    }
});
