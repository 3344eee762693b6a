#!/usr/bin/env bash
# Here (not on the device): vLLM 0.25's vendored DeepGEMM, which the slim bundle (../shared/vllm_device) drops, as one
# carry-sized chunk: .devbundle/dg/deep_gemm.tar.xz (about 1.5 MB; python, headers and the cp312 extension only).
# vLLM's DeepSeek-V4 sparse-attention indexer refuses to start without it on CUDA. On the device, after the bundle
# install (calls 1-3): tar xJf .devbundle/dg/deep_gemm.tar.xz -C /tmp/site   (carry .devbundle/dg)
# Install it only for the DeepSeek-V4 probe: with it present vLLM also routes FP8 linears through DeepGEMM, and the
# refit benchmark's engine start was seen to take longer.
set -euo pipefail
cd "$(dirname "$0")/../.."
whl=$(ls .devbundle/dl/vllm-0.25.0-*.whl 2>/dev/null | head -1)
[ -n "$whl" ] || { echo "no .devbundle/dl/vllm-0.25.0-*.whl (build the bundle first: ../shared/vllm_device/make_bundle.sh)"; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m zipfile -e "$whl" "$tmp/w" >/dev/null 2>&1 || true
[ -d "$tmp/w/vllm/third_party/deep_gemm" ] || { echo "the wheel has no vllm/third_party/deep_gemm"; exit 1; }
mkdir -p "$tmp/o/vllm/third_party" .devbundle/dg
cp -r "$tmp/w/vllm/third_party/deep_gemm" "$tmp/o/vllm/third_party/"
find "$tmp/o" -name "_C.cpython-3*" ! -name "*cpython-312*" -delete
tar cJf .devbundle/dg/deep_gemm.tar.xz -C "$tmp/o" vllm
ls -la .devbundle/dg/deep_gemm.tar.xz
