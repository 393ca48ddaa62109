//! Decoder: raw ring-buffer records → typed events. The only place that reinterprets bytes.

use std::mem::size_of;

use probe_common::{
    ContextEvent, ContextFreeEvent, CpuSampleEvent, CpuState, DecodeEvent, EventHeader, EventKind,
    MemoryEvent, MemoryHandleEvent, ModelLoadEvent, ProcessChange, ProcessEvent, SampleEvent,
    SlotLaunchEvent, SlotReleaseEvent, SyncEvent, TaskPostEvent, MAX_FRAMES,
};

/// One CPU sample of a traced thread (`--profile-cpu`), as the sampler took it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuSample {
    pub pid: u32,
    pub tid: u32,
    /// When (monotonic ns).
    pub at_ns: u64,
    pub state: CpuState,
    /// The decode step the process was inside: (its thread, its entry time), the key of the
    /// step's own event (`Decode` state only).
    pub step: Option<(u32, u64)>,
    /// The sample interrupted the thread in the kernel.
    pub in_kernel: bool,
    /// User instruction pointers, leaf first (empty: no user stack could be read).
    pub frames: Vec<u64>,
}

/// A decoded event.
#[derive(Clone, Debug)]
pub enum Event {
    Decode(Box<DecodeEvent>),
    ModelLoad(Box<ModelLoadEvent>),
    Context(ContextEvent),
    Sample(SampleEvent),
    Sync(SyncEvent),
    Memory(MemoryEvent),
    MemoryHandle(MemoryHandleEvent),
    TaskPost(Box<TaskPostEvent>),
    SlotLaunch(SlotLaunchEvent),
    SlotRelease(SlotReleaseEvent),
    ContextFree(ContextFreeEvent),
    CpuSample(CpuSample),
    /// An exec (the host agent's discovery), or the end of a watched process's thread (not a
    /// llama.cpp call).
    Process {
        pid: u32,
        /// The thread that exec'd or ended.
        tid: u32,
        change: ProcessChange,
        /// When (monotonic ns).
        at_ns: u64,
        /// The probed calls the ending thread was inside (`probe_common::IN_CALL` bits).
        calls: u32,
        /// Its exit status as `wait(2)` encodes it, or `probe_common::EXIT_CODE_UNKNOWN`.
        exit_code: i32,
    },
}

impl Event {
    /// The process it came from.
    pub fn pid(&self) -> u32 {
        match self {
            Event::Decode(e) => e.header.tgid,
            Event::ModelLoad(e) => e.header.tgid,
            Event::Context(e) => e.header.tgid,
            Event::Sample(e) => e.header.tgid,
            Event::Sync(e) => e.header.tgid,
            Event::Memory(e) => e.header.tgid,
            Event::MemoryHandle(e) => e.header.tgid,
            Event::TaskPost(e) => e.header.tgid,
            Event::SlotLaunch(e) => e.header.tgid,
            Event::SlotRelease(e) => e.header.tgid,
            Event::ContextFree(e) => e.header.tgid,
            Event::CpuSample(s) => s.pid,
            Event::Process { pid, .. } => *pid,
        }
    }
}

/// A record that could not be decoded (a build mismatch between agent and probes).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event record of {len} bytes is shorter than its header")]
    Short { len: usize },
    #[error("unknown event kind {kind}")]
    UnknownKind { kind: u32 },
    #[error("process event with unknown change {change}")]
    ProcessChange { change: u32 },
    #[error("CPU sample with unknown state {state}")]
    CpuState { state: u32 },
    #[error("event of kind {kind:?} has {len} bytes, expected {expected}")]
    Size {
        kind: EventKind,
        len: usize,
        expected: usize,
    },
}

fn read<T: Copy>(bytes: &[u8], kind: EventKind) -> Result<T, DecodeError> {
    if bytes.len() < size_of::<T>() {
        return Err(DecodeError::Size {
            kind,
            len: bytes.len(),
            expected: size_of::<T>(),
        });
    }
    // SAFETY: length checked; T is a #[repr(C)] plain-data event type for which any bit
    // pattern is valid; read_unaligned copes with the ring buffer's 8-byte alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() < size_of::<EventHeader>() {
        return Err(DecodeError::Short { len: bytes.len() });
    }
    let kind = u32::from_ne_bytes(bytes[0..4].try_into().expect("4 bytes"));
    let kind = EventKind::try_from(kind).map_err(|_| DecodeError::UnknownKind { kind })?;
    Ok(match kind {
        EventKind::Decode => Event::Decode(Box::new(read(bytes, kind)?)),
        EventKind::ModelLoad => Event::ModelLoad(Box::new(read(bytes, kind)?)),
        EventKind::ContextCreate => Event::Context(read(bytes, kind)?),
        EventKind::Sample => Event::Sample(read(bytes, kind)?),
        EventKind::Synchronize => Event::Sync(read(bytes, kind)?),
        EventKind::Memory => Event::Memory(read(bytes, kind)?),
        EventKind::MemoryHandle => Event::MemoryHandle(read(bytes, kind)?),
        EventKind::TaskPost => Event::TaskPost(Box::new(read(bytes, kind)?)),
        EventKind::SlotLaunch => Event::SlotLaunch(read(bytes, kind)?),
        EventKind::SlotRelease => Event::SlotRelease(read(bytes, kind)?),
        EventKind::ContextFree => Event::ContextFree(read(bytes, kind)?),
        EventKind::CpuSample => Event::CpuSample(cpu_sample(&read(bytes, kind)?)?),
        EventKind::Process => {
            let ev: ProcessEvent = read(bytes, kind)?;
            let change = match ev.change {
                c if c == ProcessChange::Exec as u32 => ProcessChange::Exec,
                c if c == ProcessChange::Exit as u32 => ProcessChange::Exit,
                c if c == ProcessChange::ThreadExit as u32 => ProcessChange::ThreadExit,
                change => return Err(DecodeError::ProcessChange { change }),
            };
            Event::Process {
                pid: ev.header.tgid,
                tid: ev.header.tid,
                change,
                at_ns: ev.header.start_ns,
                calls: ev.calls,
                exit_code: ev.exit_code,
            }
        }
    })
}

fn cpu_sample(ev: &CpuSampleEvent) -> Result<CpuSample, DecodeError> {
    let state =
        CpuState::try_from(ev.state).map_err(|_| DecodeError::CpuState { state: ev.state })?;
    let n = (ev.n_frames as usize).min(MAX_FRAMES);
    Ok(CpuSample {
        pid: ev.header.tgid,
        tid: ev.header.tid,
        at_ns: ev.header.start_ns,
        state,
        step: (state == CpuState::Decode).then_some((ev.step_tid, ev.step_start_ns)),
        in_kernel: ev.in_kernel != 0,
        // A zero is where the kernel's walk stopped.
        frames: ev.frames[..n]
            .iter()
            .copied()
            .take_while(|&a| a != 0)
            .collect(),
    })
}

/// The path in a model-load event (lossy UTF-8, without the NUL).
pub fn model_path(e: &ModelLoadEvent) -> Option<String> {
    let n = (e.path_len as usize).min(e.path.len());
    if n == 0 {
        return None;
    }
    let bytes = &e.path[..n];
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(n);
    Some(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use probe_common::{LastToken, SeqRun, MAX_RUNS, PATH_CAP};

    pub fn as_bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain-data value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    pub fn header(kind: EventKind, start: u64, end: u64) -> EventHeader {
        EventHeader {
            kind: kind as u32,
            tgid: 7,
            tid: 8,
            returning: 0,
            start_ns: start,
            end_ns: end,
        }
    }

    pub fn decode_event(n_tokens: i32, runs: &[SeqRun], ret: i32) -> DecodeEvent {
        let mut r = [SeqRun::default(); MAX_RUNS];
        r[..runs.len()].copy_from_slice(runs);
        DecodeEvent {
            header: header(EventKind::Decode, 1_000, 3_000),
            ctx: 0x1000,
            ret,
            n_tokens,
            n_scanned: runs.iter().map(|r| r.n_tokens).sum(),
            n_runs: runs.len() as u8,
            api: 1,
            flags: 0,
            _pad: [0; 3],
            last: LastToken::default(),
            runs: r,
        }
    }

    #[test]
    fn every_event_type_round_trips() {
        let d = decode_event(
            5,
            &[SeqRun {
                seq_id: 3,
                pos0: 10,
                tok0: 7,
                n_tokens: 5,
                n_outputs: 1,
                last_output: 1,
            }],
            1,
        );
        match decode(&as_bytes(&d)).unwrap() {
            Event::Decode(e) => {
                assert_eq!(e.n_tokens, 5);
                assert_eq!(e.ret, 1);
                assert_eq!(e.runs[0].seq_id, 3);
                assert_eq!(e.runs[0].pos0, 10);
                assert_eq!(e.header.end_ns - e.header.start_ns, 2_000);
            }
            other => panic!("{other:?}"),
        }
        let mut m = ModelLoadEvent {
            header: header(EventKind::ModelLoad, 0, 5),
            model: 0xdead,
            path_len: 0,
            api: 1,
            path: [0; PATH_CAP],
        };
        let p = b"/models/tiny.gguf\0";
        m.path[..p.len()].copy_from_slice(p);
        m.path_len = p.len() as u32;
        match decode(&as_bytes(&m)).unwrap() {
            Event::ModelLoad(e) => assert_eq!(model_path(&e).as_deref(), Some("/models/tiny.gguf")),
            other => panic!("{other:?}"),
        }
        let c = ContextEvent {
            header: header(EventKind::ContextCreate, 0, 1),
            n_ctx: 4096,
            ..Default::default()
        };
        assert!(matches!(decode(&as_bytes(&c)).unwrap(), Event::Context(e) if e.n_ctx == 4096));
        let s = SampleEvent {
            header: header(EventKind::Sample, 0, 1),
            token: 42,
            ..Default::default()
        };
        assert!(matches!(decode(&as_bytes(&s)).unwrap(), Event::Sample(e) if e.token == 42));
        let y = SyncEvent {
            header: header(EventKind::Synchronize, 0, 1),
            ctx: 9,
        };
        assert!(matches!(decode(&as_bytes(&y)).unwrap(), Event::Sync(e) if e.ctx == 9));
        let m = MemoryEvent {
            header: header(EventKind::Memory, 0, 1),
            seq_id: 3,
            p0: 10,
            p1: -1,
            op: probe_common::MemoryOp::SeqRm as u32,
            ret: 1,
            ..Default::default()
        };
        assert!(
            matches!(decode(&as_bytes(&m)).unwrap(), Event::Memory(e) if e.seq_id == 3 && e.p0 == 10)
        );
        let mut p = TaskPostEvent {
            header: header(EventKind::TaskPost, 0, 1),
            tasks_bytes: 960,
            front: 1,
            n_read: 2,
            ..Default::default()
        };
        p.tasks[1].id = 41;
        p.tasks[1].task_type = 1;
        assert!(
            matches!(decode(&as_bytes(&p)).unwrap(), Event::TaskPost(e) if e.tasks_bytes == 960
                && e.front == 1 && e.n_read == 2 && e.tasks[1].id == 41 && e.tasks[1].task_type == 1)
        );
        let l = SlotLaunchEvent {
            header: header(EventKind::SlotLaunch, 0, 1),
            slot_id: 2,
            task_id: 41,
            ok: 1,
            ..Default::default()
        };
        assert!(
            matches!(decode(&as_bytes(&l)).unwrap(), Event::SlotLaunch(e) if e.slot_id == 2 && e.task_id == 41 && e.ok == 1)
        );
        let r = SlotReleaseEvent {
            header: header(EventKind::SlotRelease, 0, 1),
            slot_id: 3,
            task_id: 41,
        };
        assert!(
            matches!(decode(&as_bytes(&r)).unwrap(), Event::SlotRelease(e) if e.slot_id == 3 && e.task_id == 41)
        );
    }

    #[test]
    fn malformed_records_are_errors() {
        assert_eq!(decode(&[0; 8]).unwrap_err(), DecodeError::Short { len: 8 });
        let mut h = as_bytes(&header(EventKind::Decode, 0, 0));
        assert!(matches!(decode(&h).unwrap_err(), DecodeError::Size { .. }));
        h[0] = 99;
        assert_eq!(
            decode(&h).unwrap_err(),
            DecodeError::UnknownKind { kind: 99 }
        );
    }

    /// One record as the decode_event fuzz target frames it: a little-endian `u16` length,
    /// then the record. A decode event's tail padding is zeroed (it is undefined).
    fn framed<T: 'static>(out: &mut Vec<u8>, v: &T) {
        let mut bytes = as_bytes(v);
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<DecodeEvent>() {
            let end = std::mem::offset_of!(DecodeEvent, runs) + size_of::<[SeqRun; MAX_RUNS]>();
            bytes[end..].fill(0);
        }
        out.extend((bytes.len() as u16).to_le_bytes());
        out.extend(bytes);
    }

    /// The decode_event fuzz target's seeds (`fuzz/corpus/decode_event/`): a mode byte, then
    /// the records of a llama-server session (post, launch, prompt, generation, release, exit)
    /// and of a plain program. `LLAMAPROBE_WRITE_FUZZ_SEEDS=1` writes them; otherwise the
    /// committed ones must be these (after a change of an event's layout, write them again).
    #[test]
    fn fuzz_seeds() {
        use probe_common::{decode_flags, MemoryOp, PostedTask, MAX_POST_TASKS};
        let t = |i: u64| 1_000_000 * i;
        let mut server = vec![2u8];
        let mut load = ModelLoadEvent {
            header: header(EventKind::ModelLoad, t(1), t(2)),
            model: 0xdead,
            path_len: 0,
            api: 1,
            path: [0; PATH_CAP],
        };
        let p = b"/models/qwen2-7b.Q4_K_M.gguf\0";
        load.path[..p.len()].copy_from_slice(p);
        load.path_len = p.len() as u32;
        framed(&mut server, &load);
        framed(
            &mut server,
            &ContextEvent {
                header: header(EventKind::ContextCreate, t(3), t(4)),
                model: 0xdead,
                ctx: 0x1000,
                n_ctx: 4096,
                n_batch: 2048,
                n_ubatch: 512,
                n_seq_max: 4,
                n_threads: 2,
                n_threads_batch: 2,
            },
        );
        framed(
            &mut server,
            &MemoryHandleEvent {
                header: header(EventKind::MemoryHandle, t(4), t(4)),
                ctx: 0x1000,
                mem: 0x2000,
            },
        );
        let mut tasks = [PostedTask::default(); MAX_POST_TASKS];
        tasks[0] = PostedTask {
            id: 41,
            task_type: 0,
            id_target: -1,
            _pad: 0,
        };
        framed(
            &mut server,
            &TaskPostEvent {
                header: header(EventKind::TaskPost, t(5), t(5)),
                tasks_bytes: 960,
                front: 0,
                n_read: 1,
                n_tasks: 1,
                _pad: 0,
                tasks,
            },
        );
        framed(
            &mut server,
            &SlotLaunchEvent {
                header: header(EventKind::SlotLaunch, t(6), t(6)),
                slot_id: 0,
                task_id: 41,
                ok: 1,
                _pad: 0,
                ctx: 0x1000,
                ctx_dft: 0,
            },
        );
        let mut prompt = decode_event(
            5,
            &[SeqRun {
                seq_id: 0,
                pos0: 0,
                tok0: 1,
                n_tokens: 5,
                n_outputs: 1,
                last_output: 1,
            }],
            0,
        );
        prompt.header = header(EventKind::Decode, t(7), t(9));
        framed(&mut server, &prompt);
        framed(
            &mut server,
            &SyncEvent {
                header: header(EventKind::Synchronize, t(9), t(10)),
                ctx: 0x1000,
            },
        );
        framed(
            &mut server,
            &SampleEvent {
                header: header(EventKind::Sample, t(10), t(11)),
                ctx: 0x1000,
                token: 42,
                idx: 0,
                api: 0,
                _pad: 0,
            },
        );
        let mut generated = decode_event(
            1,
            &[SeqRun {
                seq_id: 0,
                pos0: 5,
                tok0: 42,
                n_tokens: 1,
                n_outputs: 1,
                last_output: 1,
            }],
            0,
        );
        generated.header = header(EventKind::Decode, t(11), t(12));
        framed(&mut server, &generated);
        framed(
            &mut server,
            &SampleEvent {
                header: header(EventKind::Sample, t(12), t(13)),
                ctx: 0x1000,
                token: 2,
                idx: 0,
                api: 0,
                _pad: 0,
            },
        );
        framed(
            &mut server,
            &SlotReleaseEvent {
                header: header(EventKind::SlotRelease, t(13), t(13)),
                slot_id: 0,
                task_id: 41,
            },
        );
        framed(
            &mut server,
            &MemoryEvent {
                header: header(EventKind::Memory, t(14), t(14)),
                handle: 0x2000,
                seq_id: 0,
                seq_dst: -1,
                p0: 0,
                p1: -1,
                op: MemoryOp::SeqRm as u32,
                ret: 1,
                delta: 0,
                _pad: 0,
            },
        );
        framed(
            &mut server,
            &ContextFreeEvent {
                header: header(EventKind::ContextFree, t(15), t(15)),
                ctx: 0x1000,
            },
        );
        framed(
            &mut server,
            &ProcessEvent {
                header: header(EventKind::Process, t(16), t(16)),
                change: ProcessChange::Exit as u32,
                calls: 1,
                exit_code: 9,
                _pad: 0,
            },
        );

        // A program on the classic API with batches of llama_batch_get_one (no sequence ids),
        // a failed step and a KV shift.
        let mut plain = vec![0u8];
        framed(
            &mut plain,
            &ProcessEvent {
                header: header(EventKind::Process, t(1), t(1)),
                change: ProcessChange::Exec as u32,
                ..Default::default()
            },
        );
        let p = b"models/tiny.gguf\0";
        load.header = header(EventKind::ModelLoad, t(2), t(3));
        load.path = [0; PATH_CAP];
        load.path[..p.len()].copy_from_slice(p);
        load.path_len = p.len() as u32;
        framed(&mut plain, &load);
        let mut one = decode_event(8, &[], 0);
        one.flags = decode_flags::NO_SEQ_INFO;
        one.header = header(EventKind::Decode, t(4), t(6));
        framed(&mut plain, &one);
        one.n_tokens = 1;
        one.ret = 1;
        one.header = header(EventKind::Decode, t(6), t(7));
        framed(&mut plain, &one);
        framed(
            &mut plain,
            &MemoryEvent {
                header: header(EventKind::Memory, t(8), t(8)),
                handle: 0x1000,
                seq_id: 0,
                seq_dst: -1,
                p0: 4,
                p1: -1,
                op: MemoryOp::SeqAdd as u32,
                ret: 1,
                delta: -2,
                _pad: 0,
            },
        );

        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/decode_event");
        for (name, bytes) in [
            ("seed-server-session", server),
            ("seed-plain-program", plain),
        ] {
            let path = dir.join(name);
            // Every record decodes.
            let mut rest = &bytes[1..];
            while let [a, b, tail @ ..] = rest {
                let len = usize::from(u16::from_le_bytes([*a, *b]));
                decode(&tail[..len]).unwrap();
                rest = &tail[len..];
            }
            if std::env::var_os("LLAMAPROBE_WRITE_FUZZ_SEEDS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            } else {
                let committed = std::fs::read(&path).unwrap_or_default();
                assert!(
                    committed == bytes,
                    "{} is not current: run LLAMAPROBE_WRITE_FUZZ_SEEDS=1 cargo test -p \
                     llamaprobe --lib fuzz_seeds",
                    path.display()
                );
            }
        }
    }
}
