"""Our `flashinfer` MXFP4 profile vs FlashInfer's `mxfp4_quantize`, from a golden written on a GPU by
scripts/gpu/flashinfer_quantize.py (issue 23 item 5).

FlashInfer's MXFP4 quantize kernel runs only on SM100+ (its body is compiled under __CUDA_ARCH__ >= 1000; on Hopper it
writes nothing) and FlashInfer has no host MXFP4 quantizer. So the golden always holds `model.*`: the SM100 kernel
modelled from its source with the fp32 steps run as real PTX on the GPU (rcp.approx.ftz, mul.ftz, ex2.approx.ftz),
and `kernel.*` (FlashInfer's own bytes) only when it was produced on an SM100+ GPU. `model.ftz_blocks` marks the
blocks (amax < 6*2^-123) where FlashInfer's flush-to-zero differs from the exact arithmetic the profile keeps
(docs/codec.md); there the profile must equal the same model without flush-to-zero.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from common import quantize

GOLDEN = pathlib.Path(__file__).parent / "golden" / "flashinfer_mxfp4_quantize.safetensors"
pytestmark = pytest.mark.skipif(
    not GOLDEN.exists(),
    reason=f"{GOLDEN.relative_to(GOLDEN.parents[3])} absent: produce it on a GPU with "
           "scripts/gpu/flashinfer_quantize.py and copy $OUT/flashinfer_mxfp4_quantize.safetensors there")


@pytest.fixture(scope="module")
def golden():
    from safetensors import safe_open

    with safe_open(str(GOLDEN), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta.get("dry_run") == "0", "the golden comes from a --cpu-dry-run, not from a GPU: regenerate it"
    q = quantize(tensors["x"], profile="flashinfer", backend="torch")
    return tensors, meta, q


def _block_view(codes: torch.Tensor) -> torch.Tensor:
    return codes.reshape(codes.shape[0], -1, 16)


def _assert_equal_where(mask: torch.Tensor, ours, theirs, what: str) -> None:
    oc, tc = _block_view(ours[0])[mask], _block_view(theirs[0])[mask]
    os_, ts = ours[1][mask], theirs[1][mask]
    if not (torch.equal(oc, tc) and torch.equal(os_, ts)):
        bad = ((oc != tc).any(-1) | (os_ != ts)).nonzero()[0].item()
        pytest.fail(f"{what}: {int(((oc != tc).any(-1) | (os_ != ts)).sum())} blocks differ; first (masked index "
                    f"{bad}): scale ours {int(os_[bad])} theirs {int(ts[bad])}, codes ours "
                    f"{oc[bad].numpy().tobytes().hex()} theirs {tc[bad].numpy().tobytes().hex()}")


def test_golden_covers_the_adversarial_classes(golden):
    tensors, meta, _ = golden
    classes = json.loads(meta["classes"])
    assert {"zeros", "neg_zero", "e2m1_ties", "scale_ties", "bf16_max", "subnormals", "mixed_signs",
            "one_huge"} <= set(classes)
    assert tensors["x"].dtype == torch.bfloat16 and tensors["x"].shape[-1] % 32 == 0
    assert int(tensors["labels"].max()) < len(classes)


def test_ftz_exception_is_confined_to_tiny_blocks(golden):
    tensors, _, _ = golden
    x, ftz = tensors["x"], tensors["model.ftz_blocks"].bool()
    amax = x.float().reshape(x.shape[0], -1, 32).abs().amax(-1)
    assert bool((amax[ftz] < 6 * 2.0**-123).all())
    assert int(ftz.sum()) < 64


def test_matches_sm100_kernel_model(golden):
    tensors, _, q = golden
    ftz = tensors["model.ftz_blocks"].bool()
    ours = (q.codes, q.scales)
    _assert_equal_where(~ftz, ours, (tensors["model.codes"], tensors["model.scales"]), "model (as built)")
    _assert_equal_where(ftz, ours, (tensors["model.exact.codes"], tensors["model.exact.scales"]), "model without ftz")


def test_matches_flashinfer_kernel_bytes(golden):
    tensors, meta, q = golden
    if "kernel.codes" not in tensors:
        pytest.skip(f"golden from {meta.get('device')} (sm {meta.get('capability')}): FlashInfer's MXFP4 quantize "
                    "kernel only runs on SM100+, so the golden holds no FlashInfer kernel bytes")
    ftz = tensors["model.ftz_blocks"].bool()
    _assert_equal_where(~ftz, (q.codes, q.scales), (tensors["kernel.codes"], tensors["kernel.scales"]),
                        "FlashInfer mxfp4_quantize")
