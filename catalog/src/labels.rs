//! llama.cpp's numbers and names, as labels: decode return codes, llama-server's task types,
//! model file types, KV memory operations.

/// `llama_decode`'s return codes (llama.h): 0 ok, 1 no KV slot, 2 aborted, -1 invalid batch,
/// below -1 fatal.
pub mod return_codes {
    pub const OK: i32 = 0;
    pub const NO_KV_SLOT: i32 = 1;
    pub const ABORTED: i32 = 2;
    pub const INVALID_BATCH: i32 = -1;
}

/// What llama-server's task types are called (`enum server_task_type`: the same first five
/// values in the 2024, 2025 and 2026 sources; only these are posted through the probed
/// overload), as a label and as the GenAI `gen_ai.operation.name`.
pub const TASK_TYPES: &[(&str, &str)] = &[
    ("completion", "text_completion"),
    ("embedding", "embeddings"),
    ("rerank", "rerank"),
    ("infill", "text_completion"),
    ("cancel", "cancel"),
];

/// `enum server_task_type` of 2024 llama-server (before b3681's refactors): embeddings and
/// infills were completion tasks with a flag, and cancels, metrics and slot actions went
/// through the same single-task `post`.
pub const LEGACY_TASK_TYPES: &[(&str, &str)] = &[
    ("completion", "text_completion"),
    ("cancel", "cancel"),
    ("next_response", "next_response"),
    ("metrics", "metrics"),
    ("slot_save", "slot_save"),
    ("slot_restore", "slot_restore"),
    ("slot_erase", "slot_erase"),
    ("set_lora", "set_lora"),
];

/// Whether a task type label is work a slot runs as a request.
pub fn is_request_type(label: &str) -> bool {
    TASK_TYPES[..4].iter().any(|(l, _)| *l == label)
}

/// The label of a task type value in `table` (a server layout row's; "unknown" outside it).
pub fn task_type_in(
    table: &'static [(&'static str, &'static str)],
    value: i32,
) -> (&'static str, &'static str) {
    usize::try_from(value)
        .ok()
        .and_then(|i| table.get(i).copied())
        .unwrap_or(("unknown", "text_completion"))
}

/// The label of a task type value in the 2025+ table.
pub fn task_type(value: i32) -> (&'static str, &'static str) {
    task_type_in(TASK_TYPES, value)
}

/// `LLAMA_FTYPE_GUESSED`: set by llama.cpp when the type was not in the file.
pub const FTYPE_GUESSED: u32 = 1024;

/// The name of a model file type (`general.file_type`, llama.cpp's `enum llama_ftype`) without
/// its `LLAMA_FTYPE_ALL_` or `LLAMA_FTYPE_MOSTLY_` prefix (`Q4_K_M`, `F16`, ...); `None` if
/// unknown.
pub fn file_type_name(value: u32) -> Option<&'static str> {
    Some(match value {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        4 => "Q4_1_SOME_F16", // removed from llama.cpp
        5 => "Q4_2",          // removed
        6 => "Q4_3",          // removed
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        33 => "Q4_0_4_4", // removed: Q4_0 with runtime repacking
        34 => "Q4_0_4_8", // removed
        35 => "Q4_0_8_8", // removed
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        39 => "NVFP4",
        40 => "Q1_0",
        41 => "Q2_0",
        _ => return None,
    })
}

/// The name of a KV memory operation (`probe_common::MemoryOp` value).
pub fn memory_op_name(op: u32) -> &'static str {
    use probe_common::MemoryOp;
    match op {
        x if x == MemoryOp::SeqRm as u32 => "seq_rm",
        x if x == MemoryOp::SeqCp as u32 => "seq_cp",
        x if x == MemoryOp::SeqAdd as u32 => "seq_add",
        _ => "clear",
    }
}
