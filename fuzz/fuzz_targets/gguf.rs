//! A model file's bytes → the GGUF reader (`sources::gguf::read_metadata`) → the model's facts,
//! whose architecture and name become label values.

#![no_main]

mod common;

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use llamaprobe::{model::ModelInfo, sources::gguf};

fuzz_target!(|data: &[u8]| {
    let Ok(meta) = gguf::read_metadata(Cursor::new(data), data.len() as u64) else {
        return;
    };
    let info = ModelInfo::from_metadata("/models/fuzz.gguf".into(), &meta, data.len() as u64);
    for label in [&info.architecture, &info.name].into_iter().flatten() {
        common::assert_label(label);
    }
    let _ = info.file_type.map(|t| t.to_string());
});
