//! `--profile-out FILE`: the CPU profile in pprof's format (`profile.proto` of
//! github.com/google/pprof, gzipped), which `go tool pprof`, Pyroscope, Parca and Grafana read.
//!
//! Messages are the subset of profile.proto llamaprobe writes, with its field numbers (the
//! integration test decodes the file with types generated from the official profile.proto).
//! Locations are per function (llamaprobe symbolizes in the agent, so every location has its
//! function and no address); each sample has the values `samples/count` and
//! `cpu/nanoseconds` (count × the sampling period) and the labels `phase`, `pid` and, for
//! samples in a request's decode step, `request` (its id; ids `,`-joined for a step of several).

use std::{collections::HashMap, io::Write, sync::Arc};

use prost::Message;

use super::Tally;

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Label {
    #[prost(int64, tag = "1")]
    pub key: i64,
    #[prost(int64, tag = "2")]
    pub str: i64,
    #[prost(int64, tag = "3")]
    pub num: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Mapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "5")]
    pub filename: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
}

/// The string table: index 0 is "" as the format requires.
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut s = Self {
            table: Vec::new(),
            index: HashMap::new(),
        };
        s.id("");
        s
    }
    fn id(&mut self, v: &str) -> i64 {
        if let Some(&i) = self.index.get(v) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(v.to_string());
        self.index.insert(v.to_string(), i);
        i
    }
}

/// The profile of `t` (samples at `hz`), gzipped.
pub(super) fn encode(
    t: &Tally,
    hz: u32,
    time_nanos: i64,
    duration_ns: u64,
) -> anyhow::Result<Vec<u8>> {
    let p = build(t, hz, time_nanos, duration_ns);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&p.encode_to_vec())?;
    Ok(gz.finish()?)
}

fn build(t: &Tally, hz: u32, time_nanos: i64, duration_ns: u64) -> Profile {
    let period = 1_000_000_000 / i64::from(hz.max(1));
    let mut s = Strings::new();
    let vt = |s: &mut Strings, a: &str, b: &str| ValueType {
        r#type: s.id(a),
        unit: s.id(b),
    };
    let sample_type = vec![
        vt(&mut s, "samples", "count"),
        vt(&mut s, "cpu", "nanoseconds"),
    ];
    let period_type = Some(vt(&mut s, "cpu", "nanoseconds"));
    let (k_phase, k_pid, k_request) = (s.id("phase"), s.id("pid"), s.id("request"));
    let mut mappings: HashMap<Arc<str>, u64> = HashMap::new();
    let mut functions: HashMap<(Arc<str>, Arc<str>), u64> = HashMap::new();
    let mut p = Profile {
        sample_type,
        period_type,
        period,
        time_nanos,
        duration_nanos: duration_ns as i64,
        ..Default::default()
    };
    // Stable output: stacks in a fixed order.
    let mut stacks: Vec<_> = t.stacks.iter().collect();
    stacks.sort_by(|a, b| a.0.cmp(b.0));
    for ((phase, pid, requests, frames), &n) in stacks {
        let mut location_id = Vec::with_capacity(frames.len());
        for (function, module) in frames {
            let mapping_id = match module.is_empty() {
                true => 0,
                false => {
                    let next = mappings.len() as u64 + 1;
                    *mappings.entry(module.clone()).or_insert_with(|| {
                        p.mapping.push(Mapping {
                            id: next,
                            filename: s.id(module),
                            has_functions: true,
                        });
                        next
                    })
                }
            };
            let next = functions.len() as u64 + 1;
            let id = *functions
                .entry((function.clone(), module.clone()))
                .or_insert_with(|| {
                    let name = s.id(function);
                    p.function.push(Function {
                        id: next,
                        name,
                        system_name: name,
                        filename: s.id(module),
                    });
                    // One location per function, with the same id.
                    p.location.push(Location {
                        id: next,
                        mapping_id,
                        line: vec![Line { function_id: next }],
                    });
                    next
                });
            location_id.push(id);
        }
        let mut label = vec![
            Label {
                key: k_phase,
                str: s.id(phase.label()),
                num: 0,
            },
            Label {
                key: k_pid,
                str: 0,
                num: i64::from(*pid),
            },
        ];
        if !requests.is_empty() {
            label.push(Label {
                key: k_request,
                str: s.id(requests),
                num: 0,
            });
        }
        p.sample.push(Sample {
            location_id,
            value: vec![n as i64, n as i64 * period],
            label,
        });
    }
    p.comment = vec![s.id("llamaprobe --profile-cpu")];
    p.string_table = s.table;
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CpuPhase, CpuSample};

    fn sample(phase: CpuPhase, frames: &[&str]) -> CpuSample {
        let requests = match phase {
            CpuPhase::Prompt => vec![3, 4],
            _ => Vec::new(),
        };
        super::super::test_sample(42, phase, requests, frames)
    }

    #[test]
    fn samples_stacks_and_labels() {
        let mut t = Tally::new(true);
        for _ in 0..3 {
            t.add(&sample(CpuPhase::Prompt, &["leaf", "main"]));
        }
        t.add(&sample(CpuPhase::Generation, &["other", "main"]));
        let p = build(&t, 100, 1, 2);
        assert_eq!(p.period, 10_000_000);
        assert_eq!(p.sample.len(), 2);
        let total: i64 = p.sample.iter().map(|s| s.value[0]).sum();
        assert_eq!(total, 4);
        assert_eq!(p.function.len(), 3, "leaf, main, other: main shared");
        let prompt = p
            .sample
            .iter()
            .find(|s| p.string_table[s.label[0].str as usize] == "prompt")
            .unwrap();
        assert_eq!(prompt.value, vec![3, 30_000_000]);
        let label = |s: &Sample, key: &str| {
            s.label
                .iter()
                .find(|l| p.string_table[l.key as usize] == key)
                .map(|l| p.string_table[l.str as usize].clone())
        };
        assert_eq!(label(prompt, "request").as_deref(), Some("3,4"));
        let generation = p.sample.iter().find(|s| s != &prompt).unwrap();
        assert_eq!(label(generation, "request"), None, "no request, no label");
        let names: Vec<&str> = prompt
            .location_id
            .iter()
            .map(|&id| {
                let f = &p.function[id as usize - 1];
                p.string_table[f.name as usize].as_str()
            })
            .collect();
        assert_eq!(names, ["leaf", "main"]);
        assert_eq!(p.string_table[0], "");
        // It round-trips through prost and gzip.
        let gz = encode(&t, 100, 1, 2).unwrap();
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw).unwrap();
        assert_eq!(Profile::decode(&raw[..]).unwrap(), p);
    }
}
