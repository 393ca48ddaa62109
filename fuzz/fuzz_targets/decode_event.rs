//! Ring-buffer records (what the probes copy out of the traced process) → `decode::decode` →
//! the assembler → request reconstruction, as the agent's pipeline runs them.
//!
//! Input: one byte choosing the request mode, then records, each a little-endian `u16` length
//! and that many bytes (the last one takes what is left).

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use llamaprobe::{
    assemble::{requests::Requests, Assembler},
    decode::{self, Event},
    model::{Mode, Observation},
};
use probe_common::ProcessChange;

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let mode = match first % 3 {
        0 => Mode::BatchView,
        1 => Mode::ServerQueue,
        _ => Mode::ServerTasks,
    };
    let mut assembler = Assembler::new();
    let mut requests = Requests::new(mode).keep_steps(first & 4 != 0);
    let mut pids = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = match rest {
            [a, b, tail @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), tail),
            _ => (rest.len(), &[][..]),
        };
        let (record, tail) = tail.split_at(len.min(tail.len()));
        rest = tail;
        let Ok(event) = decode::decode(record) else {
            continue;
        };
        let pid = event.pid();
        if let Event::Process { change, at_ns, .. } = event {
            if change == ProcessChange::Exit {
                assembler.forget(pid);
                requests.forget(pid);
            } else {
                requests.expire(at_ns);
            }
            continue;
        }
        if let Event::ModelLoad(m) = &event {
            let _ = decode::model_path(m);
        }
        if !pids.contains(&pid) {
            pids.push(pid);
        }
        if let Some(obs) = assembler.process(&event) {
            for made in requests.observe(&obs) {
                if let Observation::Request(r) = made {
                    common::assert_label(&r.model);
                }
            }
        }
        common::assert_label(&assembler.model(pid));
    }
    let _ = requests.counts_by_pid();
    let _ = requests.finish();
});
