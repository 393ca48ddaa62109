#!/usr/bin/env bash
# build.sh OUTDIR: builds the fake llama.cpp libraries and drivers for llamaprobe's integration
# tests, with gcc/g++ only:
#   OUTDIR/classic/libllama.so      llama_classic.c + llama_common.c   (classic API, C)
#   OUTDIR/classic/driver_classic   driver_classic.c, RUNPATH $ORIGIN
#   OUTDIR/classic/driver_ending    driver_ending.c: ends inside llama_decode (SIGSEGV, SIGKILL)
#   OUTDIR/classic/loader_burst     loader_burst.c: dlopens two libllama files in turn, late
#   OUTDIR/ext/libllama.so          llama_ext.cpp + llama_common.c     (newest API, C++17)
#   OUTDIR/ext/driver_ext           driver_ext.cpp, RUNPATH $ORIGIN
#   OUTDIR/ext/layout_ext           layout_ext.cpp (prints llama_batch_ext offsets)
#   OUTDIR/ext/layout_ext_g         the same with DWARF (-g), for the DWARF layout reader
#   OUTDIR/classic/libllama_g.so    the classic lib with DWARF (-g), for the same
#   OUTDIR/static/driver_classic    driver + classic lib in one executable: the llama.cpp
#                                   functions are only in .symtab (like a static llama-server)
#   OUTDIR/static/driver_classic.stripped  strip --strip-all of it: no symbols at all
#   OUTDIR/static/driver_classic.debug     objcopy --only-keep-debug of it: a debug file
# Flags: -O1 -g0 -fPIC, default visibility (every API symbol in .dynsym), -fno-omit-frame-pointer.
# Idempotent: always rebuilds (well under a second per file); every output is written to a
# temporary name in its final directory and renamed into place, so a concurrent reader never
# sees a half-written file. Environment: CC (default gcc), CXX (default g++).
set -euo pipefail

if [ "$#" -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$1/classic" "$1/ext" "$1/static"
OUT="$(cd "$1" && pwd)"
CC="${CC:-gcc}"
CXX="${CXX:-g++}"

COMMON=(-O1 -g0 -fPIC -fno-omit-frame-pointer -Wall -Wextra -I"$SRC")
CFLAGS=("${COMMON[@]}" -std=gnu11)
CXXFLAGS=("${COMMON[@]}" -std=c++17)
RPATH=(-Wl,-rpath,'$ORIGIN')

TMP="$(mktemp -d "$OUT/.build.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# install SRC_TMP DEST: atomic replace
install_file() {
    local tmp="$2.tmp.$$"
    cp "$1" "$tmp"
    mv -f "$tmp" "$2"
}

# ---- classic ----
"$CC" "${CFLAGS[@]}" -shared -Wl,-soname,libllama.so -o "$TMP/libllama_classic.so" \
    "$SRC/llama_classic.c" "$SRC/llama_common.c"
install_file "$TMP/libllama_classic.so" "$OUT/classic/libllama.so"
"$CC" "${CFLAGS[@]}" -o "$TMP/driver_classic" "$SRC/driver_classic.c" \
    -L"$OUT/classic" -lllama "${RPATH[@]}"
install_file "$TMP/driver_classic" "$OUT/classic/driver_classic"
"$CC" "${CFLAGS[@]}" -pthread -o "$TMP/driver_ending" "$SRC/driver_ending.c" \
    -L"$OUT/classic" -lllama "${RPATH[@]}"
install_file "$TMP/driver_ending" "$OUT/classic/driver_ending"
"$CC" "${CFLAGS[@]}" -o "$TMP/loader_burst" "$SRC/loader_burst.c" -ldl
install_file "$TMP/loader_burst" "$OUT/classic/loader_burst"

# ---- ext ----
"$CC" "${CFLAGS[@]}" -c -o "$TMP/llama_common.o" "$SRC/llama_common.c"
"$CXX" "${CXXFLAGS[@]}" -shared -Wl,-soname,libllama.so -o "$TMP/libllama_ext.so" \
    "$SRC/llama_ext.cpp" "$TMP/llama_common.o"
install_file "$TMP/libllama_ext.so" "$OUT/ext/libllama.so"
"$CXX" "${CXXFLAGS[@]}" -o "$TMP/driver_ext" "$SRC/driver_ext.cpp" \
    -L"$OUT/ext" -lllama "${RPATH[@]}"
install_file "$TMP/driver_ext" "$OUT/ext/driver_ext"
"$CXX" "${CXXFLAGS[@]}" -o "$TMP/layout_ext" "$SRC/layout_ext.cpp"
install_file "$TMP/layout_ext" "$OUT/ext/layout_ext"
"$CXX" "${CXXFLAGS[@]}" -g -O0 -o "$TMP/layout_ext_g" "$SRC/layout_ext.cpp"
install_file "$TMP/layout_ext_g" "$OUT/ext/layout_ext_g"

# ---- static: everything in the executable, symbols in .symtab only ----
"$CC" "${CFLAGS[@]}" -o "$TMP/driver_static" "$SRC/driver_classic.c" "$SRC/llama_classic.c" \
    "$SRC/llama_common.c"
install_file "$TMP/driver_static" "$OUT/static/driver_classic"
strip --strip-all -o "$TMP/driver_static.stripped" "$TMP/driver_static"
install_file "$TMP/driver_static.stripped" "$OUT/static/driver_classic.stripped"
objcopy --only-keep-debug "$TMP/driver_static" "$TMP/driver_static.debug"
install_file "$TMP/driver_static.debug" "$OUT/static/driver_classic.debug"
"$CC" "${CFLAGS[@]}" -g -shared -o "$TMP/libllama_g.so" "$SRC/llama_classic.c" "$SRC/llama_common.c"
install_file "$TMP/libllama_g.so" "$OUT/classic/libllama_g.so"

# ---- profile: the --profile-cpu test program, with and without frame pointers ----
mkdir -p "$OUT/profile"
PROFILE_FLAGS=(-O1 -g0 -Wall -Wextra -Wno-unused-function -I"$SRC" -std=gnu11 -pthread)
"$CC" "${PROFILE_FLAGS[@]}" -fno-omit-frame-pointer -o "$TMP/profile_fp" \
    "$SRC/profile_target.c" "$SRC/llama_common.c"
install_file "$TMP/profile_fp" "$OUT/profile/profile_target_fp"
"$CC" "${PROFILE_FLAGS[@]}" -fomit-frame-pointer -o "$TMP/profile_nofp" \
    "$SRC/profile_target.c" "$SRC/llama_common.c"
install_file "$TMP/profile_nofp" "$OUT/profile/profile_target_nofp"
