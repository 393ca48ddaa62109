//! GGUF model metadata: the header, the key-value section and the tensor infos of a `.gguf`
//! file, read as a stream and never the tensor data (model files are gigabytes).
//!
//! GGUF v2 and v3 (little endian) are read; v1 and big-endian files are refused. The file is
//! treated as hostile (it comes from a traced process, maybe a container): every count and
//! length is checked against the bytes left in the file and against fixed limits before it is
//! used, nothing is allocated from a claimed length beyond them, and at most
//! [`MAX_METADATA_BYTES`] of the file are read or skipped over (the metadata of every shard of
//! a split model together), so a malformed file, or a 100 GB sparse one claiming a 1 TiB
//! string, gives an error at once, not a huge allocation, a long read or a panic. Only regular
//! files are opened (the caller's opener decides how: a traced process's files through
//! `discover::inroot`).
//! The rules follow llama.cpp's own reader (`ggml/src/gguf.cpp`): no nested arrays, at most 4
//! dimensions per tensor, no negative dimension, no duplicate key.

use crate::{
    discover::inroot::{self, OpenError},
    model::{FileType, ModelInfo},
    sources::identity::sanitize_label,
};
use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

/// Most tensors a file may declare (real models have a few thousand).
pub const MAX_TENSORS: u64 = 1 << 20;
/// Most key-value pairs a file may declare (real models have a few dozen).
pub const MAX_KV: u64 = 1 << 20;
/// Longest string (key or value), bytes.
pub const MAX_STRING: u64 = 64 << 20;
/// Longest key, bytes.
pub const MAX_KEY: u64 = 64 << 10;
/// Most elements of one array (vocabularies and merges have up to about a million).
pub const MAX_ARRAY: u64 = 1 << 26;
/// Most string bytes kept from one file's scalar values.
pub const MAX_KEPT_BYTES: usize = 64 << 20;
/// Most dimensions of a tensor (`GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Most bytes of metadata (header, key-value section and tensor infos) read or skipped in one
/// model, every shard included: real models have a few MiB (a 256k-token vocabulary with its
/// scores and merges is under 16 MiB).
pub const MAX_METADATA_BYTES: u64 = 256 << 20;
/// Largest model file opened (the tensor data is never read; no model is this big).
pub const MAX_FILE_BYTES: u64 = 4 << 40;

/// What a model file must be before it is read: a regular file of at most
/// [`MAX_FILE_BYTES`].
pub fn expect() -> inroot::Expect {
    inroot::Expect::new("GGUF model", MAX_FILE_BYTES)
}

/// Reads below this size are skipped by reading (through the buffer), larger ones by seeking.
const SEEK_THRESHOLD: u64 = 64 << 10;

/// Errors of reading GGUF metadata.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file was not opened (not a regular file, not inside the process's root, too
    /// large).
    #[error(transparent)]
    Open(#[from] OpenError),
    /// A read failed in the middle of the file.
    #[error("read error at byte {offset}: {source}")]
    Read {
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("not a GGUF file (starts with {found:02x?}, expected \"GGUF\")")]
    BadMagic { found: Vec<u8> },
    /// A GGUF version this reader does not know.
    #[error("unsupported GGUF version {version} (v2 and v3 are read){hint}")]
    UnsupportedVersion { version: u32, hint: &'static str },
    /// The file ends before the metadata does.
    #[error("truncated GGUF: {what} at byte {offset} needs {needed} bytes, {left} left")]
    Truncated {
        what: &'static str,
        offset: u64,
        needed: u64,
        left: u64,
    },
    /// A count or length beyond the reader's limits.
    #[error("implausible GGUF: {what} is {value} (limit {limit})")]
    TooLarge {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    /// Anything else that breaks the format.
    #[error("malformed GGUF at byte {offset}: {reason}")]
    Malformed { offset: u64, reason: String },
}

/// The type of a GGUF value (`enum gguf_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, num_enum::TryFromPrimitive)]
#[repr(u32)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    /// Size of one value of a fixed-size type.
    fn fixed_size(self) -> Option<u64> {
        Some(match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
            Self::String | Self::Array => return None,
        })
    }
}

/// A metadata value. Arrays are skipped, not kept: only their element type and length are.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Array { element: ValueType, len: u64 },
}

impl Value {
    /// A non-negative integer value, whatever its width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// What the header, the key-value section and the tensor infos say.
#[derive(Clone, Debug, PartialEq)]
pub struct Metadata {
    pub version: u32,
    /// Scalar values by key; arrays as their element type and length.
    pub kv: BTreeMap<String, Value>,
    pub tensor_count: u64,
    /// Sum over the tensors of the product of their dimensions.
    pub parameters: u64,
}

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.get(key)
    }

    fn u64_of(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    fn str_of(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }
}

impl ModelInfo {
    /// The facts of a file's metadata. The architecture and the name, label values the file
    /// chooses, are [sanitized](sanitize_label): bounded in length, without control or
    /// invisible characters (`None` if nothing is left).
    pub fn from_metadata(path: PathBuf, meta: &Metadata, size_bytes: u64) -> Self {
        let label = |key: &str| {
            meta.str_of(key)
                .map(sanitize_label)
                .filter(|v| !v.is_empty())
        };
        // The file's own spelling names its keys.
        let context_length = meta
            .str_of("general.architecture")
            .and_then(|a| meta.u64_of(&format!("{a}.context_length")));
        let architecture = label("general.architecture");
        Self {
            path,
            file_type: meta
                .u64_of("general.file_type")
                .and_then(|v| u32::try_from(v).ok())
                .map(FileType),
            context_length,
            name: label("general.name"),
            parameters: meta.parameters,
            size_bytes,
            architecture,
        }
    }
}

/// Reads the metadata of a model file of this host (a path of llamaprobe's own). For the first
/// shard of a split model (`NAME-00001-of-00003.gguf` with `split.count`), the other shards'
/// tensor infos are read too and parameters and size cover the whole model; a missing shard
/// is logged, and it and the shards after it are left out.
pub fn read(path: &Path) -> Result<ModelInfo, GgufError> {
    read_with(path, |p| inroot::open_object(p, expect()).map(|o| o.file))
}

/// [`read`] with each file opened by `open` (`path` and the other shards' paths beside it are
/// names it knows, e.g. paths inside a traced process's root).
pub fn read_with(
    path: &Path,
    mut open: impl FnMut(&Path) -> Result<File, OpenError>,
) -> Result<ModelInfo, GgufError> {
    let mut budget = MAX_METADATA_BYTES;
    let (meta, size) = read_one(path, &mut open, &mut budget)?;
    let mut info = ModelInfo::from_metadata(path.to_path_buf(), &meta, size);
    let count = meta.u64_of("split.count").unwrap_or(1);
    let no = meta.u64_of("split.no").unwrap_or(0);
    if count > 1 && no == 0 {
        for shard in split_siblings(path, count) {
            match read_one(&shard, &mut open, &mut budget) {
                Ok((m, s)) => {
                    info.parameters = info.parameters.saturating_add(m.parameters);
                    info.size_bytes = info.size_bytes.saturating_add(s);
                }
                Err(e) => {
                    tracing::warn!(
                        "model shard {}: {e}; its parameters and size, and those of the shards \
                         after it, are not counted",
                        shard.display()
                    );
                    break;
                }
            }
        }
    }
    Ok(info)
}

/// One file's metadata and size, opened by `open`, within what is left of `budget` (bytes of
/// metadata), which it uses up.
fn read_one(
    path: &Path,
    open: &mut impl FnMut(&Path) -> Result<File, OpenError>,
    budget: &mut u64,
) -> Result<(Metadata, u64), GgufError> {
    let file = open(path)?;
    let size = file
        .metadata()
        .map_err(|source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let (meta, used) =
        read_metadata_within(BufReader::with_capacity(1 << 16, file), size, *budget)?;
    *budget -= used;
    Ok((meta, size))
}

/// The other shards of a split model whose first shard is `first` (llama.cpp's
/// `llama_split_path` naming: `PREFIX-%05d-of-%05d.gguf`).
fn split_siblings(first: &Path, count: u64) -> Vec<PathBuf> {
    let Some(name) = first.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let suffix = format!("-00001-of-{count:05}.gguf");
    let Some(prefix) = name.strip_suffix(&suffix) else {
        return Vec::new();
    };
    (2..=count.min(99_999))
        .map(|i| first.with_file_name(format!("{prefix}-{i:05}-of-{count:05}.gguf")))
        .collect()
}

/// Reads the metadata of one file of this host and its size.
pub fn read_file(path: &Path) -> Result<(Metadata, u64), GgufError> {
    let mut budget = MAX_METADATA_BYTES;
    read_one(
        path,
        &mut |p: &Path| inroot::open_object(p, expect()).map(|o| o.file),
        &mut budget,
    )
}

/// Reads GGUF metadata from a stream of `len` bytes positioned at the start of the file.
pub fn read_metadata<R: BufRead + Seek>(r: R, len: u64) -> Result<Metadata, GgufError> {
    read_metadata_within(r, len, MAX_METADATA_BYTES).map(|(m, _)| m)
}

/// [`read_metadata`] reading or skipping at most `budget` bytes; the metadata and the bytes
/// it took.
pub fn read_metadata_within<R: BufRead + Seek>(
    r: R,
    len: u64,
    budget: u64,
) -> Result<(Metadata, u64), GgufError> {
    Parser {
        r,
        pos: 0,
        len,
        budget,
        kept: 0,
    }
    .parse()
}

struct Parser<R> {
    r: R,
    pos: u64,
    len: u64,
    /// Bytes of metadata this file may take ([`MAX_METADATA_BYTES`] or what is left of it).
    budget: u64,
    /// String bytes kept so far.
    kept: usize,
}

impl<R: BufRead + Seek> Parser<R> {
    fn parse(mut self) -> Result<(Metadata, u64), GgufError> {
        let magic = self.bytes::<4>("magic")?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic {
                found: magic.to_vec(),
            });
        }
        let version = self.u32("version")?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(GgufError::UnsupportedVersion {
                    version,
                    hint: ": GGUF v1 files are from 2023; convert the model again",
                })
            }
            v if v.swap_bytes() <= 3 => {
                return Err(GgufError::UnsupportedVersion {
                    version,
                    hint: ": this is a big-endian GGUF file",
                })
            }
            _ => {
                return Err(GgufError::UnsupportedVersion { version, hint: "" });
            }
        }
        let tensor_count = self.count("tensor count", MAX_TENSORS, 24)?;
        let kv_count = self.count("key-value count", MAX_KV, 12)?;

        let mut kv = BTreeMap::new();
        for _ in 0..kv_count {
            let at = self.pos;
            let key = self.string("key", MAX_KEY)?;
            let ty = self.value_type()?;
            let value = self.value(ty)?;
            if kv.insert(key.clone(), value).is_some() {
                return Err(GgufError::Malformed {
                    offset: at,
                    reason: format!("duplicate key {key:?}"),
                });
            }
        }

        let mut parameters: u64 = 0;
        for _ in 0..tensor_count {
            let at = self.pos;
            self.skip_string("tensor name", MAX_KEY)?;
            let n_dims = self.u32("tensor dimension count")?;
            if n_dims > MAX_DIMS {
                return Err(GgufError::Malformed {
                    offset: at,
                    reason: format!("a tensor has {n_dims} dimensions (at most {MAX_DIMS})"),
                });
            }
            let mut elements: u64 = 1;
            for _ in 0..n_dims {
                let d = self.i64("tensor dimension")?;
                let d = u64::try_from(d).map_err(|_| GgufError::Malformed {
                    offset: at,
                    reason: format!("a tensor has a negative dimension ({d})"),
                })?;
                elements = elements.checked_mul(d).ok_or(GgufError::Malformed {
                    offset: at,
                    reason: "a tensor's element count overflows 64 bits".into(),
                })?;
            }
            self.skip(12, "tensor type and offset")?;
            parameters = parameters
                .checked_add(elements)
                .ok_or(GgufError::Malformed {
                    offset: at,
                    reason: "the parameter count overflows 64 bits".into(),
                })?;
        }
        Ok((
            Metadata {
                version,
                kv,
                tensor_count,
                parameters,
            },
            self.pos,
        ))
    }

    /// Fails unless `n` more bytes are in the file and within the metadata budget.
    fn need(&self, n: u64, what: &'static str) -> Result<(), GgufError> {
        let left = self.len.saturating_sub(self.pos);
        if n > left {
            return Err(GgufError::Truncated {
                what,
                offset: self.pos,
                needed: n,
                left,
            });
        }
        if self.pos.saturating_add(n) > self.budget {
            return Err(GgufError::TooLarge {
                what: "metadata (bytes read or skipped)",
                value: self.pos.saturating_add(n),
                limit: self.budget,
            });
        }
        Ok(())
    }

    fn read_err(&self, what: &'static str, e: io::Error) -> GgufError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            // The file is shorter than its size said (it shrank while being read).
            GgufError::Truncated {
                what,
                offset: self.pos,
                needed: 1,
                left: 0,
            }
        } else {
            GgufError::Read {
                offset: self.pos,
                source: e,
            }
        }
    }

    fn bytes<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        self.need(N as u64, what)?;
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|e| self.read_err(what, e))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, GgufError> {
        self.bytes::<8>(what).map(i64::from_le_bytes)
    }

    /// A count of items of at least `min_size` bytes each, checked against `limit` and the
    /// bytes left.
    fn count(&mut self, what: &'static str, limit: u64, min_size: u64) -> Result<u64, GgufError> {
        let n = self.u64(what)?;
        if n > limit {
            return Err(GgufError::TooLarge {
                what,
                value: n,
                limit,
            });
        }
        self.need(n.saturating_mul(min_size), what)?;
        Ok(n)
    }

    fn skip(&mut self, n: u64, what: &'static str) -> Result<(), GgufError> {
        self.need(n, what)?;
        if n < SEEK_THRESHOLD {
            let copied = io::copy(&mut (&mut self.r).take(n), &mut io::sink())
                .map_err(|e| self.read_err(what, e))?;
            if copied != n {
                return Err(self.read_err(what, io::ErrorKind::UnexpectedEof.into()));
            }
        } else {
            let to = self.pos + n;
            self.r
                .seek(SeekFrom::Start(to))
                .map_err(|e| self.read_err(what, e))?;
        }
        self.pos += n;
        Ok(())
    }

    fn string_len(&mut self, what: &'static str, limit: u64) -> Result<u64, GgufError> {
        let n = self.u64(what)?;
        if n > limit {
            return Err(GgufError::TooLarge {
                what,
                value: n,
                limit,
            });
        }
        self.need(n, what)?;
        Ok(n)
    }

    fn string(&mut self, what: &'static str, limit: u64) -> Result<String, GgufError> {
        let at = self.pos;
        let n = self.string_len(what, limit)?;
        if self.kept.saturating_add(n as usize) > MAX_KEPT_BYTES {
            return Err(GgufError::TooLarge {
                what: "kept metadata strings (bytes)",
                value: (self.kept as u64).saturating_add(n),
                limit: MAX_KEPT_BYTES as u64,
            });
        }
        // n is at most `limit` and within the file: the allocation is bounded.
        let mut buf = vec![0u8; n as usize];
        self.r
            .read_exact(&mut buf)
            .map_err(|e| self.read_err(what, e))?;
        self.pos += n;
        self.kept += buf.len();
        String::from_utf8(buf).map_err(|_| GgufError::Malformed {
            offset: at,
            reason: format!("{what} is not UTF-8"),
        })
    }

    fn skip_string(&mut self, what: &'static str, limit: u64) -> Result<(), GgufError> {
        let n = self.string_len(what, limit)?;
        self.skip(n, what)
    }

    fn value_type(&mut self) -> Result<ValueType, GgufError> {
        let at = self.pos;
        let t = self.u32("value type")?;
        ValueType::try_from(t).map_err(|_| GgufError::Malformed {
            offset: at,
            reason: format!("unknown value type {t}"),
        })
    }

    fn value(&mut self, ty: ValueType) -> Result<Value, GgufError> {
        const W: &str = "value";
        Ok(match ty {
            ValueType::U8 => Value::U8(self.bytes::<1>(W)?[0]),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.bytes::<1>(W)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.bytes::<2>(W)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.bytes::<2>(W)?)),
            ValueType::U32 => Value::U32(self.u32(W)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.bytes::<4>(W)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.bytes::<4>(W)?)),
            ValueType::Bool => Value::Bool(self.bytes::<1>(W)?[0] != 0),
            ValueType::String => Value::String(self.string("string value", MAX_STRING)?),
            ValueType::U64 => Value::U64(self.u64(W)?),
            ValueType::I64 => Value::I64(self.i64(W)?),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.bytes::<8>(W)?)),
            ValueType::Array => {
                let at = self.pos;
                let element = self.value_type()?;
                let min_size = match element {
                    ValueType::Array => {
                        return Err(GgufError::Malformed {
                            offset: at,
                            reason: "nested arrays are not valid GGUF".into(),
                        })
                    }
                    ValueType::String => 8,
                    t => t.fixed_size().unwrap_or(1),
                };
                let len = self.count("array length", MAX_ARRAY, min_size)?;
                match element.fixed_size() {
                    Some(size) => self.skip(len * size, "array")?,
                    None => {
                        for _ in 0..len {
                            self.skip_string("array string", MAX_STRING)?;
                        }
                    }
                }
                Value::Array { element, len }
            }
        })
    }
}

/// A GGUF v3 writer, for tests (here and in the integration tests): files with exactly the
/// metadata and tensor infos a test needs.
pub mod writer {

    /// Writes GGUF v3 files for tests.
    #[derive(Default)]
    pub struct Writer {
        kv: Vec<u8>,
        n_kv: u64,
        tensors: Vec<u8>,
        n_tensors: u64,
        data_len: u64,
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    impl Writer {
        pub fn new() -> Self {
            Self::default()
        }

        fn key(&mut self, key: &str, ty: u32) -> &mut Vec<u8> {
            self.n_kv += 1;
            put_str(&mut self.kv, key);
            self.kv.extend(ty.to_le_bytes());
            &mut self.kv
        }

        pub fn string(&mut self, key: &str, v: &str) -> &mut Self {
            let out = self.key(key, 8);
            put_str(out, v);
            self
        }

        pub fn u32(&mut self, key: &str, v: u32) -> &mut Self {
            self.key(key, 4).extend(v.to_le_bytes());
            self
        }

        pub fn u64(&mut self, key: &str, v: u64) -> &mut Self {
            self.key(key, 10).extend(v.to_le_bytes());
            self
        }

        pub fn f32(&mut self, key: &str, v: f32) -> &mut Self {
            self.key(key, 6).extend(v.to_le_bytes());
            self
        }

        pub fn bool(&mut self, key: &str, v: bool) -> &mut Self {
            self.key(key, 7).push(v as u8);
            self
        }

        pub fn strings(&mut self, key: &str, v: &[&str]) -> &mut Self {
            let out = self.key(key, 9);
            out.extend(8u32.to_le_bytes());
            out.extend((v.len() as u64).to_le_bytes());
            for s in v {
                put_str(out, s);
            }
            self
        }

        pub fn f32s(&mut self, key: &str, v: &[f32]) -> &mut Self {
            let out = self.key(key, 9);
            out.extend(6u32.to_le_bytes());
            out.extend((v.len() as u64).to_le_bytes());
            for x in v {
                out.extend(x.to_le_bytes());
            }
            self
        }

        /// A tensor info (type F32, data offsets consecutive).
        /// An F32 tensor of shape `dims`, placed after the previous ones in the data section
        /// (each at a 32-byte aligned offset, as llama.cpp writes them).
        pub fn tensor(&mut self, name: &str, dims: &[u64]) -> &mut Self {
            self.n_tensors += 1;
            put_str(&mut self.tensors, name);
            self.tensors.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                self.tensors.extend(d.to_le_bytes());
            }
            self.tensors.extend(0u32.to_le_bytes()); // GGML_TYPE_F32
            self.tensors.extend(self.data_len.to_le_bytes());
            let bytes = dims.iter().product::<u64>() * 4;
            self.data_len += bytes.div_ceil(32) * 32;
            self
        }

        /// Bytes of tensor data the tensors so far need.
        pub fn data_len(&self) -> usize {
            self.data_len as usize
        }

        /// Bytes of the header, the KV section and the tensor infos.
        pub fn meta_len(&self) -> usize {
            24 + self.kv.len() + self.tensors.len()
        }

        /// The file: header, KV, tensor infos, padding to 32 and `data` bytes of tensor data.
        pub fn bytes(&self, data: usize) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(3u32.to_le_bytes());
            out.extend(self.n_tensors.to_le_bytes());
            out.extend(self.n_kv.to_le_bytes());
            out.extend(&self.kv);
            out.extend(&self.tensors);
            while !out.len().is_multiple_of(32) {
                out.push(0);
            }
            out.resize(out.len() + data, 0);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{writer::Writer, *};
    use std::io::Cursor;

    fn parse(b: &[u8]) -> Result<Metadata, GgufError> {
        read_metadata(Cursor::new(b), b.len() as u64)
    }

    fn sample() -> Writer {
        let mut w = Writer::new();
        w.string("general.architecture", "qwen2")
            .string("general.name", "Test Model")
            .u32("general.file_type", 15)
            .u32("qwen2.context_length", 32768)
            .u64("qwen2.block_count", 24)
            .f32("qwen2.rope.freq_base", 1e6)
            .bool("tokenizer.ggml.add_bos_token", true)
            .strings("tokenizer.ggml.tokens", &["<s>", "</s>", "hello"])
            .f32s("tokenizer.ggml.scores", &[0.0, 0.0, -1.0])
            .tensor("token_embd.weight", &[16, 3])
            .tensor("output_norm.weight", &[16])
            .tensor("blk.0.ffn_up.weight", &[16, 32]);
        w
    }
    #[test]
    fn reads_the_metadata_of_a_file_written_here() {
        let bytes = sample().bytes(100);
        let m = parse(&bytes).unwrap();
        assert_eq!(m.version, 3);
        assert_eq!(m.tensor_count, 3);
        assert_eq!(m.parameters, 16 * 3 + 16 + 16 * 32);
        assert_eq!(m.get("qwen2.rope.freq_base"), Some(&Value::F32(1e6)));
        assert_eq!(m.get("qwen2.block_count"), Some(&Value::U64(24)));
        assert_eq!(
            m.get("tokenizer.ggml.tokens"),
            Some(&Value::Array {
                element: ValueType::String,
                len: 3
            })
        );
        let info = ModelInfo::from_metadata("m.gguf".into(), &m, bytes.len() as u64);
        assert_eq!(info.architecture.as_deref(), Some("qwen2"));
        assert_eq!(info.name.as_deref(), Some("Test Model"));
        assert_eq!(info.context_length, Some(32768));
        assert_eq!(info.file_type, Some(FileType(15)));
        assert_eq!(info.file_type.unwrap().to_string(), "Q4_K_M");
        assert_eq!(info.size_bytes, bytes.len() as u64);
    }

    /// Found by the gguf fuzz target: a NUL in the architecture reached the
    /// `llamacpp_model_info` label.
    #[test]
    fn an_architecture_with_a_nul_is_cleaned() {
        let mut w = Writer::new();
        w.string("general.architecture", "qwen\0");
        let info = ModelInfo::from_metadata("m.gguf".into(), &parse(&w.bytes(0)).unwrap(), 0);
        assert_eq!(info.architecture.as_deref(), Some("qwen"));
    }

    #[test]
    fn architecture_and_name_are_bounded_label_values() {
        let long = "x".repeat(100_000);
        let mut w = Writer::new();
        w.string("general.architecture", "\u{202e}llama\n\u{1b}[31m")
            .string("general.name", &long)
            .u32("\u{202e}llama\n\u{1b}[31m.context_length", 2048);
        let m = parse(&w.bytes(0)).unwrap();
        let info = ModelInfo::from_metadata("m.gguf".into(), &m, 0);
        assert_eq!(info.architecture.as_deref(), Some("llama[31m"));
        assert_eq!(info.context_length, Some(2048));
        let name = info.name.unwrap();
        assert_eq!(
            name.chars().count(),
            crate::sources::identity::LABEL_MAX_CHARS
        );
        // Nothing left: no value.
        let mut w = Writer::new();
        w.string("general.architecture", "\u{7}\u{200b} ");
        let m = parse(&w.bytes(0)).unwrap();
        assert_eq!(
            ModelInfo::from_metadata("m.gguf".into(), &m, 0).architecture,
            None
        );
    }

    #[test]
    fn file_type_names_follow_llama_ftype() {
        let name = |v| FileType(v).to_string();
        assert_eq!(name(0), "F32");
        assert_eq!(name(1), "F16");
        assert_eq!(name(2), "Q4_0");
        assert_eq!(name(7), "Q8_0");
        assert_eq!(name(15), "Q4_K_M");
        assert_eq!(name(18), "Q6_K");
        assert_eq!(name(32), "BF16");
        assert_eq!(name(38), "MXFP4_MOE");
        assert_eq!(name(7 | 1024), "Q8_0 (guessed)");
        assert_eq!(name(500), "unknown(500)");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let w = sample();
        let bytes = w.bytes(0);
        for cut in 0..w.meta_len() {
            let err = parse(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, GgufError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
        assert!(parse(&bytes[..w.meta_len()]).is_ok());
    }

    #[test]
    fn malformed_headers_are_errors() {
        let good = sample().bytes(0);
        let mut bad = good.clone();
        bad[..4].copy_from_slice(b"GGML");
        assert!(matches!(
            parse(&bad).unwrap_err(),
            GgufError::BadMagic { .. }
        ));

        for (version, big_endian) in [(1u32, false), (4, false), (3u32.swap_bytes(), true)] {
            let mut bad = good.clone();
            bad[4..8].copy_from_slice(&version.to_le_bytes());
            let err = parse(&bad).unwrap_err();
            assert!(matches!(err, GgufError::UnsupportedVersion { .. }), "{err}");
            assert_eq!(err.to_string().contains("big-endian"), big_endian, "{err}");
        }

        // Absurd tensor and KV counts.
        for at in [8, 16] {
            let mut bad = good.clone();
            bad[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
            assert!(matches!(
                parse(&bad).unwrap_err(),
                GgufError::TooLarge { .. }
            ));
            // Below the limit but more than the file holds.
            bad[at..at + 8].copy_from_slice(&1000u64.to_le_bytes());
            assert!(matches!(
                parse(&bad).unwrap_err(),
                GgufError::Truncated { .. }
            ));
        }

        // A huge key length.
        let mut bad = good.clone();
        bad[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        assert!(matches!(
            parse(&bad).unwrap_err(),
            GgufError::TooLarge { .. }
        ));
    }

    #[test]
    fn huge_arrays_strings_and_bad_types_are_errors() {
        let mut w = Writer::new();
        w.strings("a", &["x"]);
        let mut b = w.bytes(0);
        // header 24 + key (8 + 1) + type 4 + element type 4 = 41: the array length
        b[41..49].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(parse(&b).unwrap_err(), GgufError::TooLarge { .. }));
        b[41..49].copy_from_slice(&(1u64 << 20).to_le_bytes());
        assert!(matches!(
            parse(&b).unwrap_err(),
            GgufError::Truncated { .. }
        ));
        b[37..41].copy_from_slice(&9u32.to_le_bytes());
        assert!(matches!(
            parse(&b).unwrap_err(),
            GgufError::Malformed { .. }
        ));
        b[37..41].copy_from_slice(&77u32.to_le_bytes());
        assert!(matches!(
            parse(&b).unwrap_err(),
            GgufError::Malformed { .. }
        ));

        let mut w = Writer::new();
        w.string("s", "value");
        let mut b = w.bytes(0);
        b[37..45].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(matches!(parse(&b).unwrap_err(), GgufError::TooLarge { .. }));
        let mut b = w.bytes(0);
        b[45] = 0xff; // not UTF-8
        assert!(matches!(
            parse(&b).unwrap_err(),
            GgufError::Malformed { .. }
        ));
    }

    #[test]
    fn bad_tensor_infos_are_errors() {
        let mut w = Writer::new();
        w.tensor("t", &[2, 3]);
        let good = w.bytes(0);
        // header 24 + name (8 + 1) = 33: n_dims; dims at 37 and 45.
        let mut b = good.clone();
        b[33..37].copy_from_slice(&5u32.to_le_bytes());
        assert!(matches!(
            parse(&b).unwrap_err(),
            GgufError::Malformed { .. }
        ));
        let mut b = good.clone();
        b[37..45].copy_from_slice(&(-1i64).to_le_bytes());
        assert!(matches!(
            parse(&b).unwrap_err(),
            GgufError::Malformed { .. }
        ));
        let mut b = good.clone();
        b[37..45].copy_from_slice(&(1i64 << 40).to_le_bytes());
        b[45..53].copy_from_slice(&(1i64 << 40).to_le_bytes());
        assert!(matches!(
            parse(&b).unwrap_err(),
            GgufError::Malformed { .. }
        ));
        assert_eq!(parse(&good).unwrap().parameters, 6);
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let mut w = Writer::new();
        w.u32("k", 1).u32("k", 2);
        assert!(matches!(
            parse(&w.bytes(0)).unwrap_err(),
            GgufError::Malformed { .. }
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // Deterministic pseudo-random mutations of a valid file.
        let good = sample().bytes(64);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2000 {
            let mut b = good.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x % b.len() as u64) as usize;
                b[at] = (x >> 32) as u8;
            }
            let _ = parse(&b);
        }
    }

    #[test]
    fn split_models_count_every_shard() {
        let dir =
            std::env::temp_dir().join(format!("llamaprobe-gguf-split-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut sizes = 0;
        for i in 1..=3u32 {
            let mut w = Writer::new();
            w.u32("split.no", i - 1).u32("split.count", 3);
            if i == 1 {
                w.string("general.architecture", "llama");
            }
            w.tensor(&format!("t{i}"), &[10, u64::from(i)]);
            let b = w.bytes(8);
            sizes += b.len() as u64;
            std::fs::write(dir.join(format!("m-{i:05}-of-00003.gguf")), b).unwrap();
        }
        let info = read(&dir.join("m-00001-of-00003.gguf")).unwrap();
        assert_eq!(info.parameters, 10 + 20 + 30);
        assert_eq!(info.size_bytes, sizes);
        assert_eq!(info.architecture.as_deref(), Some("llama"));
        // A missing shard is left out, not an error; and the shards after it.
        std::fs::remove_file(dir.join("m-00003-of-00003.gguf")).unwrap();
        let info = read(&dir.join("m-00001-of-00003.gguf")).unwrap();
        assert_eq!(info.parameters, 10 + 20);
        std::fs::rename(
            dir.join("m-00002-of-00003.gguf"),
            dir.join("m-00003-of-00003.gguf"),
        )
        .unwrap();
        let info = read(&dir.join("m-00001-of-00003.gguf")).unwrap();
        assert_eq!(info.parameters, 10);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_file_is_an_open_error() {
        let err = read(Path::new("/nonexistent/model.gguf")).unwrap_err();
        assert!(matches!(err, GgufError::Open(_)), "{err}");
        assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");
    }

    #[test]
    fn only_regular_files_are_read() {
        let err = read(Path::new("/dev/zero")).unwrap_err();
        assert!(
            err.to_string()
                .contains("not a regular file (a character device)"),
            "{err}"
        );
        let err = read(Path::new("/")).unwrap_err();
        assert!(err.to_string().contains("(a directory)"), "{err}");
    }

    /// A sparse file of `len` bytes starting with `head`.
    fn sparse(name: &str, head: &[u8], len: u64) -> PathBuf {
        use std::io::Write;
        let p = std::env::temp_dir().join(format!("llamaprobe-gguf-{name}-{}", std::process::id()));
        let mut f = File::create(&p).unwrap();
        f.write_all(head).unwrap();
        f.set_len(len).unwrap();
        p
    }

    #[test]
    fn a_100_gb_sparse_file_with_huge_claims_is_refused_at_once() {
        const GB100: u64 = 100 << 30;
        // A string claiming 2^40 bytes.
        let mut w = Writer::new();
        w.string("general.architecture", "x");
        let mut b = w.bytes(0);
        // header 24 + key (8 + 20) + type 4 = 56: the value's length
        b[56..64].copy_from_slice(&(1u64 << 40).to_le_bytes());
        // An array of 2^25 u64 (256 MiB, under MAX_ARRAY): beyond the metadata budget.
        let mut w = Writer::new();
        w.strings("a", &[]);
        let mut arr = w.bytes(0);
        // header 24 + key (8 + 1) + type 4 = 37: element type; 41: the length
        arr[37..41].copy_from_slice(&10u32.to_le_bytes());
        arr[41..49].copy_from_slice(&(1u64 << 25).to_le_bytes());
        // The most tensors a file may declare, every one of them zeros: read, bounded.
        let mut tensors = Writer::new().bytes(0);
        tensors[8..16].copy_from_slice(&MAX_TENSORS.to_le_bytes());
        for (name, head, expect) in [
            (
                "string",
                &b,
                "string value is 1099511627776 (limit 67108864)",
            ),
            (
                "array",
                &arr,
                "metadata (bytes read or skipped) is 268435505",
            ),
            ("tensors", &tensors, ""),
        ] {
            let p = sparse(name, head, GB100);
            let t = std::time::Instant::now();
            let r = read_file(&p);
            let took = t.elapsed();
            std::fs::remove_file(&p).unwrap();
            match (r, expect) {
                (Err(e), expect) if !expect.is_empty() => {
                    assert!(matches!(e, GgufError::TooLarge { .. }), "{name}: {e}");
                    assert!(e.to_string().contains(expect), "{name}: {e}");
                }
                (Ok((m, size)), "") => {
                    assert_eq!(
                        (m.tensor_count, m.parameters, size),
                        (MAX_TENSORS, MAX_TENSORS, GB100)
                    );
                }
                (r, _) => panic!("{name}: {:?}", r.map(|(m, _)| m.tensor_count)),
            }
            assert!(took < std::time::Duration::from_secs(5), "{name}: {took:?}");
        }
    }

    #[test]
    fn metadata_beyond_the_budget_is_refused() {
        let b = sample().bytes(0);
        let meta = sample().meta_len() as u64;
        let (_, used) = read_metadata_within(Cursor::new(&b), b.len() as u64, meta).unwrap();
        assert_eq!(used, meta);
        let err = read_metadata_within(Cursor::new(&b), b.len() as u64, meta - 1).unwrap_err();
        assert!(
            err.to_string().contains("metadata (bytes read or skipped)"),
            "{err}"
        );
    }
}
