#!/usr/bin/env bash
# Peer MoE backends for bench/peers.py on the lent GPU machine (run from the repo root there). The wheels travel in
# carried folders (.devbundle/peers/pN, git-ignored), each with a manifest.txt of sha256 lines; a wheel larger than
# one carry goes as NAME.whl.part.NN pieces (split -b 60M) spread over several folders, carried by successive calls
# to the same warm machine. They install into /tmp/peers, not /tmp/site, so the other scripts keep a vLLM without
# FlashInfer; bench/peers.py puts /tmp/peers on its path itself ($PEERS_SITE). PEERS_IN / PEERS_SITE / PEERS_MODULES
# select another set (scripts/gpu/pack_dsv4_deps.sh: DeepSeek-V4's kernels packages into /tmp/dsv4site).
#   install_peers.sh recv DIR...   copy the carried folders' files into /tmp/peers_in (accumulates across calls)
#   install_peers.sh install       join any *.part.* pieces, check every manifest line, pip install into /tmp/peers
#   install_peers.sh fi_build      start FlashInfer's fused_moe_90 JIT build detached (survives the call while the
#                                  machine stays warm); log /tmp/fi_build.log. 179 CUTLASS translation units:
#                                  expect well over 10 min on 16 cores. bench/peers.py uses it only once built.
#   install_peers.sh fi_status     the build's progress
set -uo pipefail
IN=${PEERS_IN:-/tmp/peers_in}
SITE=${PEERS_SITE:-/tmp/peers}
MODULES=${PEERS_MODULES:-flashinfer humming elftools tvm_ffi}  # imported after install, each reported
BUNDLE=${BUNDLE_SITE:-/tmp/site}
cmd=${1:-}; shift || true
case "$cmd" in
recv)
  [ $# -ge 1 ] || { echo "usage: install_peers.sh recv DIR..."; exit 1; }
  mkdir -p $IN
  for d in "$@"; do
    [ -d "$d" ] || { echo "no $d (forgot carry?)"; exit 2; }
    for f in "$d"/*; do
      b=$(basename "$f")
      if [ "$b" = manifest.txt ]; then cat "$f" >> $IN/manifest.all; else cp "$f" $IN/; fi
    done
  done
  echo "have: $(cd $IN && ls | grep -v manifest.all | tr '\n' ' ')"
  ;;
install)
  [ -f $IN/manifest.all ] || { echo "COLD: nothing received (run recv first, in this warm machine)"; exit 3; }
  cd $IN || exit 3
  for first in *.part.00; do  # NAME.part.00, NAME.part.01, ... -> NAME
    [ -e "$first" ] || break
    name=${first%.part.00}
    cat $(ls "$name".part.* | sort) > "$name" && rm -f "$name".part.*
  done
  sort -u manifest.all | while read -r sum name; do
    [ -n "$name" ] || continue
    [ -f "$name" ] || { echo "MISSING $name (a chunk folder not carried yet?)"; exit 4; }
    [ "$(sha256sum "$name" | cut -d' ' -f1)" = "$sum" ] || { echo "BAD CHECKSUM $name"; exit 4; }
  done || exit 4
  rm -rf "$SITE"; mkdir -p "$SITE"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" $IN/*.whl || exit 5
  echo "installed into $SITE: $(ls $IN/*.whl | xargs -n1 basename | tr '\n' ' ')"
  PEERS_MODULES="$MODULES" PYTHONPATH=$SITE:$BUNDLE python3 - <<'EOF'
import importlib, os, shutil
for m in os.environ["PEERS_MODULES"].split():
    try:
        mod = importlib.import_module(m)
        print(f"import {m}: ok {getattr(mod, '__version__', '')}")
    except Exception as e:  # report, do not stop: bench/peers.py reports the backend's failure itself
        print(f"import {m}: FAILED {type(e).__name__}: {e}")
print("nvcc:", shutil.which("nvcc"))
EOF
  ;;
fi_build)
  [ -d "$SITE/flashinfer" ] || { echo "flashinfer not installed in $SITE (run install first)"; exit 3; }
  MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONPATH=$SITE:$BUNDLE setsid nohup python3 -c \
    "import time; t=time.time(); from flashinfer.fused_moe.core import get_cutlass_fused_moe_module as g; \
g('90'); print('FI_BUILD_DONE %.0f s' % (time.time() - t))" > /tmp/fi_build.log 2>&1 < /dev/null &
  echo "started flashinfer fused_moe_90 build (pid $!), log /tmp/fi_build.log"
  ;;
fi_status)
  tail -3 /tmp/fi_build.log 2>/dev/null
  d=$(ls -d "$HOME"/.cache/flashinfer/*/*/cached_ops/fused_moe_90 2>/dev/null | head -1)
  [ -n "$d" ] && echo "objects: $(ls "$d" | grep -c '\.o$'), so: $(ls "$d"/*.so 2>/dev/null || echo none)"
  ;;
*) echo "usage: install_peers.sh recv DIR... | install | fi_build | fi_status"; exit 1 ;;
esac
