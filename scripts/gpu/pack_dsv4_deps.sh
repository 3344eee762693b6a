#!/usr/bin/env bash
# Here (not on the device): the kernel packages vLLM 0.25 declares and its DeepSeek-V4 model needs on Hopper, which
# the slim bundle (../shared/vllm_device) leaves out as heavy, as carry-sized folders .devbundle/dsv4/pN (<= 60 MiB
# each, under the 64 MiB a device call carries; a manifest.txt of sha256 lines; wheels over 56 MiB split into
# NAME.part.NN pieces): 223 MB in 4 folders, 4 calls.
#   tilelang 0.1.9 (+ z3-solver, torch-c-dlpack-ext): the mHC kernels, called by name (nvidia/model.py);
#   nvidia-cutlass-dsl[cu13] 4.5.2 + quack-kernels 0.3.9: the head_dim-512 KV compressor (sparse_attn_compress_cutedsl)
#   and the indexer's fused q kernel (fused_indexer_q_cutedsl). quack 0.3.10 and 0.3.11 declare cutlass-dsl >= 4.4.2
#   but import `Arch` from cutlass.base_dsl, which 4.5.2 (vLLM 0.25's pin) lacks (seen on an H100: "cannot import
#   name 'Arch' from 'cutlass.base_dsl'"); 0.3.9 imports it from cutlass.base_dsl.arch, which 4.5.2 has.
# vLLM's vendored DeepGEMM is scripts/gpu/pack_deep_gemm.sh. Pins: vLLM 0.25.0's own Requires-Dist.
# On the device (round_session.sh D): install_peers.sh recv/install with PEERS_IN=/tmp/dsv4_in
# PEERS_SITE=/tmp/dsv4site, one call per folder, then PYTHONPATH=/tmp/site:/tmp/dsv4site.
set -euo pipefail
cd "$(dirname "$0")/../.."
dl=.devbundle/dsv4_dl out=.devbundle/dsv4
mkdir -p "$dl"
plat=(--only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$dl" tilelang==0.1.9 "z3-solver>=4.13.0,<4.15.5" \
  torch-c-dlpack-ext nvidia-cutlass-dsl==4.5.2 nvidia-cutlass-dsl-libs-base==4.5.2 \
  nvidia-cutlass-dsl-libs-cu13==4.5.2 quack-kernels==0.3.9 2>&1 | grep -v "^WARNING: Location" || true
rm -rf "$out" "$dl/parts"; mkdir -p "$dl/parts"
for w in "$dl"/*.whl; do  # pieces of at most 56 MiB, whole wheels where they fit
  b=$(basename "$w")
  if [ "$(stat -c %s "$w")" -gt $((56 * 1024 * 1024)) ]; then split -b 56M -d "$w" "$dl/parts/$b.part."; else cp "$w" "$dl/parts/"; fi
done
python3 - "$dl/parts" "$out" <<'PY'  # first fit, largest first: the fewest device calls
import os, shutil, sys
src, out, limit = sys.argv[1], sys.argv[2], 60 * 1024 * 1024
bins: list[int] = []
for f in sorted(os.listdir(src), key=lambda f: -os.path.getsize(os.path.join(src, f))):
    size = os.path.getsize(os.path.join(src, f))
    i = next((i for i, used in enumerate(bins) if used + size <= limit), len(bins))
    if i == len(bins):
        bins.append(0)
    bins[i] += size
    os.makedirs(f"{out}/p{i + 1}", exist_ok=True)
    shutil.move(os.path.join(src, f), f"{out}/p{i + 1}/{f}")
PY
(cd "$dl" && sha256sum *.whl) > "$out/p1/manifest.txt"
for d in "$out"/p*; do echo "$d: $(ls "$d" | tr '\n' ' ') $(du -sh "$d" | cut -f1)"; done
