//! The text of `/proc/PID/maps` (its paths are the traced process's to choose) → the mapped
//! files (`discover::parse_maps`), both ways of opening them, and the model labels of their
//! paths.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use llamaprobe::{
    discover::{self, OpenVia},
    sources::model_path,
};

fuzz_target!(|data: &[u8]| {
    for via in [OpenVia::Root, OpenVia::MapFiles] {
        let Ok(files) = discover::parse_maps(4242, data, via) else {
            return;
        };
        for f in &files {
            common::assert_label(&model_path::label(&f.path));
            let _ = f.key();
        }
    }
});
