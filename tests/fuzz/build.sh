#!/usr/bin/env bash
# Builds the native core's libFuzzer harnesses (tests/fuzz/fuzz_*.c) with
# AddressSanitizer and UndefinedBehaviorSanitizer:
#
#   tests/fuzz/build.sh [OUT_DIR]        (default: tests/fuzz/build)
#
# Needs clang with libFuzzer (FUZZ_CC picks another clang); on Debian 12: apt-get install -y clang
# (which brings clang-14 and libclang-rt-14-dev, where libFuzzer lives).
# fuzz_ranges (free page reporting walker) is built only when csrc/vb_core.h
# declares vb_vq_pop_ranges.  Prints the path of each binary it built.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-$here/build}"
cc="${FUZZ_CC:-clang}"  # not $CC: a build environment often sets CC=gcc
mkdir -p "$out"

# -fno-sanitize-recover: a UBSan finding aborts, so libFuzzer keeps the input.
# Unsigned wrap-around is not undefined and the ring code relies on it (u16 indices).
flags=(-g -O1 -fno-omit-frame-pointer -std=gnu11
       -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -I"$repo/csrc" -I"$here")
core=("$repo/csrc/mem.c" "$repo/csrc/ranges.c" "$repo/csrc/vring.c" "$repo/csrc/discard.c" "$repo/csrc/track.c")

harnesses=(fuzz_ring)
if grep -q 'vb_vq_pop_ranges' "$repo/csrc/vb_core.h"; then
    harnesses+=(fuzz_ranges)
fi
for h in "${harnesses[@]}"; do
    "$cc" "${flags[@]}" "$here/$h.c" "${core[@]}" -o "$out/$h"
    echo "$out/$h"
done
