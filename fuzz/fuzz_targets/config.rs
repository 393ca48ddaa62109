//! The daemon's configuration file (TOML) → its keys checked against the daemon's options and
//! each value by the option's own parser (`app::config::parse`).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use llamaprobe::app::config;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    let _ = config::parse(Path::new("/etc/llamaprobe/llamaprobe.toml"), body);
});
