//! The kinds of things the catalog lists: API generations, probe families, probe points.

/// An API generation of llama.cpp: how a decode step enters libllama.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, strum::IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Generation {
    /// 2026+: `llama_process(ctx, type, llama_batch_ext *)` → `llama_context::decode(const
    /// llama_batch_ext &)`; `llama_decode` is a compatibility wrapper around the same method.
    BatchExt,
    /// b3681 … 2026: `llama_decode(ctx, struct llama_batch)` and the sampler chain
    /// (`llama_sampler_*`); the batch is 56 bytes from b3943 (72 before, the same first fields).
    Classic,
    /// 2023 … b3680: `llama_decode(ctx, struct llama_batch)` with the 72-byte batch
    /// (`all_pos_0`, `all_pos_1`, `all_seq_id`), sampling through `llama_sample_token*` and
    /// common's `llama_sampling_sample`, no `llama_sampler_*`.
    Legacy,
}

impl Generation {
    /// Its name in JSON and in labels (`batch_ext`, `classic`).
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    pub fn describe(self) -> &'static str {
        match self {
            Generation::BatchExt => {
                "batch_ext (llama_process / llama_context::decode(llama_batch_ext const&), 2026+)"
            }
            Generation::Classic => {
                "classic (llama_decode(ctx, struct llama_batch), llama_sampler_*; b3681+)"
            }
            Generation::Legacy => {
                "legacy (llama_decode(ctx, 72-byte llama_batch), llama_sample_token*; before b3681)"
            }
        }
    }
}

/// What a probe measures.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, strum::IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Family {
    Decode,
    ModelLoad,
    ContextCreate,
    /// Contexts freed: their state (positions, roles) goes with them.
    ContextFree,
    Sample,
    Synchronize,
    /// KV memory changes (sequence removal, copy, clear): context use.
    Memory,
    /// llama-server's task queue and slots: when a request was accepted (queue wait) and when
    /// its slot let it go.
    Server,
}

impl Family {
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// One function to probe.
#[derive(Debug)]
pub struct ProbePoint {
    pub family: Family,
    /// Symbol name as in `.dynsym`/`.symtab` (mangled for C++).
    pub symbol: &'static str,
    /// Human-readable prototype.
    pub prototype: &'static str,
    /// eBPF program run at entry.
    pub entry: &'static str,
    /// eBPF program run at return (`None`: the entry program sends the event itself).
    pub ret: Option<&'static str>,
    /// Generations in which this symbol is the one to probe (empty: all).
    pub generations: &'static [Generation],
}

impl ProbePoint {
    pub fn applies_to(&self, g: Generation) -> bool {
        self.generations.is_empty() || self.generations.contains(&g)
    }

    /// The function's name as a person writes it (C++ names unmangled).
    pub fn name(&self) -> &'static str {
        self.prototype
            .split('(')
            .next()
            .and_then(|head| head.rsplit([' ', '*']).next())
            .unwrap_or(self.symbol)
    }
}
