//! llamaprobe's eBPF programs.
//!
//! One module per probe family under `probes/`. Each family is an entry/return pair: the entry
//! program records the call's arguments in a per-thread map, the return program completes the
//! event and sends it to the agent through the `EVENTS` ring buffer. Nothing here ever waits:
//! a full ring buffer or a full per-thread map costs an event, counted in `LOST`, never time in
//! the traced process.
#![no_std]
#![no_main]

mod maps;
mod probes;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists to satisfy no_std.
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
