#!/usr/bin/env bash
# Writes the committed seeds of the fuzz targets that come from files (fuzz/corpus/<target>/seed-*),
# each under 64 KB. The decode_event seeds are ring-buffer records built from probe-common's
# types by a unit test of the agent:
#   LLAMAPROBE_WRITE_FUZZ_SEEDS=1 cargo test -p llamaprobe --lib fuzz_seeds
# Needs gcc, python3 and the tiny model of `cargo xtask fixtures` (LLAMAPROBE_MODEL).
# The seed-crash-* files are the inputs of crashes the targets found (each also a regression
# test beside its parser): kept as they are, never written here.
set -euo pipefail
cd "$(dirname "$0")"
corpus=corpus
model=${LLAMAPROBE_MODEL:-$HOME/.cache/llamaprobe/models/tiny.gguf}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# gguf: the metadata of the tiny model (header, key-values with its vocabulary, tensor infos;
# the reader never reads tensor data), and a small file with every value type.
mkdir -p $corpus/gguf
python3 - "$model" $corpus/gguf <<'EOF'
import struct, sys
model, out = sys.argv[1], sys.argv[2]
data = open(model, 'rb').read()
pos = 24
sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
def string():
    global pos
    n, = struct.unpack_from('<Q', data, pos); pos += 8 + n
def value(t):
    global pos
    if t in sizes: pos += sizes[t]
    elif t == 8: string()
    elif t == 9:
        et, n = struct.unpack_from('<IQ', data, pos); pos += 12
        for _ in range(n): value(et)
n_tensors, n_kv = struct.unpack_from('<QQ', data, 8)
for _ in range(n_kv):
    string(); t, = struct.unpack_from('<I', data, pos); pos += 4; value(t)
for _ in range(n_tensors):
    string(); nd, = struct.unpack_from('<I', data, pos); pos += 4 + 8 * nd + 12
assert pos < 64 << 10, pos
open(f'{out}/seed-tiny-metadata.gguf', 'wb').write(data[:pos])

def s(v): b = v.encode(); return struct.pack('<Q', len(b)) + b
kv = [
    (s('general.architecture'), 8, s('qwen2')),
    (s('general.name'), 8, s('Seed Model')),
    (s('general.file_type'), 4, struct.pack('<I', 15)),
    (s('qwen2.context_length'), 4, struct.pack('<I', 32768)),
    (s('qwen2.block_count'), 10, struct.pack('<Q', 24)),
    (s('u8'), 0, b'\x01'), (s('i8'), 1, b'\xff'), (s('u16'), 2, b'\x01\x00'),
    (s('i16'), 3, b'\xff\xff'), (s('i32'), 5, struct.pack('<i', -5)),
    (s('f32'), 6, struct.pack('<f', 1e6)), (s('bool'), 7, b'\x01'),
    (s('i64'), 11, struct.pack('<q', -1)), (s('f64'), 12, struct.pack('<d', 0.5)),
    (s('split.count'), 2, struct.pack('<H', 3)), (s('split.no'), 2, struct.pack('<H', 0)),
    (s('tokenizer.ggml.tokens'), 9, struct.pack('<IQ', 8, 3) + s('<s>') + s('</s>') + s('hi')),
    (s('tokenizer.ggml.scores'), 9, struct.pack('<IQ', 6, 2) + struct.pack('<ff', 0, -1)),
]
tensors = [('token_embd.weight', [16, 3]), ('output_norm.weight', [16]), ('blk.0.w', [2, 3, 4, 5])]
out_b = b'GGUF' + struct.pack('<IQQ', 3, len(tensors), len(kv))
for k, t, v in kv: out_b += k + struct.pack('<I', t) + v
off = 0
for name, dims in tensors:
    out_b += s(name) + struct.pack('<I', len(dims)) + b''.join(struct.pack('<q', d) for d in dims)
    out_b += struct.pack('<IQ', 0, off); off += 64
out_b += b'\0' * (-len(out_b) % 32) + b'\0' * off
open(f'{out}/seed-every-type.gguf', 'wb').write(out_b)
EOF

# elf_symbols: small shared libraries defining the functions llamaprobe probes (both decode
# generations, llama-server's, a GPU backend's init), one with a symbol table and one stripped
# to .dynsym, and a stripped dynamic executable (PT_INTERP).
mkdir -p $corpus/elf_symbols
cat > "$tmp/stub.c" <<'EOF'
#define F(name, sym) int name(void) __asm__(sym); int name(void) { return 0; }
F(f0, "llama_decode")
F(f1, "_ZN13llama_context6decodeERK15llama_batch_ext")
F(f2, "llama_model_load_from_file")
F(f3, "llama_init_from_model")
F(f4, "llama_free")
F(f5, "llama_sampler_sample")
F(f6, "llama_sampler_apply")
F(f7, "llama_synchronize")
F(f8, "llama_memory_seq_rm")
F(f9, "llama_memory_seq_cp")
F(f10, "llama_memory_clear")
F(f11, "llama_memory_seq_add")
F(f12, "llama_get_memory")
F(f13, "llama_n_rs_seq")
F(f14, "_ZN12server_queue4postEOSt6vectorI11server_taskSaIS1_EEb")
F(f15, "_ZN19server_context_impl21launch_slot_with_taskER11server_slotO11server_task")
F(f16, "_ZN11server_slot7releaseEv")
F(f17, "ggml_backend_cuda_init")
const char note[] = "llama_ ggml_";
EOF
gcc -O0 -shared -fPIC -Wl,--build-id -o "$tmp/libllama.so" "$tmp/stub.c"
cp "$tmp/libllama.so" $corpus/elf_symbols/seed-libllama-stub.so
strip --strip-all -o $corpus/elf_symbols/seed-libllama-stub-stripped.so "$tmp/libllama.so"
cat > "$tmp/main.c" <<'EOF'
int llama_decode(void) { return 0; }
int main(void) { return llama_decode(); }
EOF
gcc -O0 -o "$tmp/dynamic" "$tmp/main.c"
strip --strip-all -o $corpus/elf_symbols/seed-dynamic-exe "$tmp/dynamic"

# proc_maps: this shell's maps and a hand-written one with the cases the parser meets.
mkdir -p $corpus/proc_maps
head -c 16384 /proc/self/maps > $corpus/proc_maps/seed-self.maps
cat > $corpus/proc_maps/seed-llama-server.maps <<'EOF'
55d0c0a00000-55d0c0a1f000 r--p 00000000 fd:01 1311033                    /usr/local/bin/llama-server
55d0c0a1f000-55d0c0c00000 r-xp 0001f000 fd:01 1311033                    /usr/local/bin/llama-server
7f1e20000000-7f1e20095000 r--s 00000000 fd:01 2228301                    /models/my model.Q4_K_M.gguf
7f1e30000000-7f1e30200000 r-xp 00000000 00:2d 99                         /app/lib/libllama.so.0.5.0
7f1e40000000-7f1e40100000 r-xp 00000000 fd:01 77                         /tmp/old-libggml.so (deleted)
7f1e50000000-7f1e50021000 rw-p 00000000 00:00 0
7ffd1c9e3000-7ffd1ca04000 rw-p 00000000 00:00 0                          [stack]
7ffd1cbf8000-7ffd1cbfa000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
EOF

# cgroup: a host process's cgroup (a systemd hybrid layout, as a login session's shell has it),
# the runtimes' layouts, an environment and a command line.
mkdir -p $corpus/cgroup
cat > $corpus/cgroup/seed-host-session.cgroup <<'EOF'
12:pids:/user.slice/user-1000.slice/session-2.scope
11:memory:/user.slice/user-1000.slice/session-2.scope
10:cpu,cpuacct:/user.slice
4:devices:/user.slice
1:name=systemd:/user.slice/user-1000.slice/session-2.scope
0::/user.slice/user-1000.slice/session-2.scope
EOF
id=3f5a4f0c1e2d3b4a5968778695a4b3c2d1e0f9e8d7c6b5a4938271605f4e3d2c
uid=8d1e2f3a_4b5c_4d6e_8f70_1a2b3c4d5e6f
printf '0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice/cri-containerd-%s.scope\n' $uid $id \
    > $corpus/cgroup/seed-k8s-systemd.cgroup
printf '12:memory:/kubepods/besteffort/pod%s/%s\n1:name=systemd:/kubepods/besteffort/pod%s/%s\n0::/\n' \
    ${uid//_/-} $id ${uid//_/-} $id > $corpus/cgroup/seed-k8s-cgroupfs-hybrid.cgroup
printf '0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-%s.scope/container\n' $id \
    > $corpus/cgroup/seed-podman-rootless.cgroup
printf '0::/system.slice/docker-%s.scope\n0::/machine.slice/libpod-conmon-%s.scope\n' $id $id \
    > $corpus/cgroup/seed-docker.cgroup
printf 'PATH=/bin\0OTEL_SERVICE_NAME=chat-api\0LLAMA_ARG_MODEL=/models/x.gguf\0HOME=/root\0' \
    > $corpus/cgroup/seed-environ
printf 'llama-server\0-c\0512\0-m\0models/qwen2-7b.Q4_K_M.gguf\0--model=/m/y.gguf\0--port\0' \
    > $corpus/cgroup/seed-cmdline

# config: the sample the systemd unit installs, and one with every kind of value.
mkdir -p $corpus/config
cp ../deploy/systemd/llamaprobe.toml $corpus/config/seed-systemd.toml
cat > $corpus/config/seed-every-kind.toml <<'EOF'
rescan = 5
max_processes = 8
exclude = ["comm:llama-bench", "exe:*-test", "container:3f5a4f0c1e2d", "namespace:inference"]
include = ["pod-label:app=llm"]
metrics-addr = "127.0.0.1:9999"
log-format = "json"
series-grace = 1.5
[table]
key = true
EOF

ls -la $corpus/*/seed-*
