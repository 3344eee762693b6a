"""common.layouts.flashinfer_trtllm: round trips, hand-computed literals, and FlashInfer's own bytes.

The goldens in tests/common/golden were produced on an H100 by scripts/gpu_flashinfer_golden.py from FlashInfer
0.7.2's helpers (`_maybe_get_cached_w3_w1_permute_indices`, `get_w2_permute_indices_with_cache`,
`block_scale_interleave`, `mxfp8_quantize`), which cannot run here; the tests recompute our side and compare bytes.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
from safetensors.torch import load_file

from common import DTypeError, ShapeError, quantize_mxfp8
from common.layouts import flashinfer_trtllm as L
from common.layouts.swizzle import swizzle_scales

GOLDEN = pathlib.Path(__file__).parent / "golden"


def _u8(*shape: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _params(e: int, i: int, h: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w13_weight": _u8(e, 2 * i, h // 2, seed=seed), "w13_weight_scale": _u8(e, 2 * i, h // 32, seed=seed + 1),
            "w2_weight": _u8(e, h, i // 2, seed=seed + 2), "w2_weight_scale": _u8(e, h, i // 32, seed=seed + 3),
            "w13_bias": torch.randn(e, 2 * i, generator=g).to(torch.bfloat16),
            "w2_bias": torch.randn(e, h, generator=g)}


# ---------------------------------------------------------------- literals and round trips


def test_shuffle_literal_block_is_transposed_8x4_grid():
    rows = torch.arange(64).reshape(64, 1)
    out = L.shuffle_rows(rows)[:, 0].tolist()
    # destination 8b + a holds source 4a + b, block by block
    assert out[:8] == [0, 4, 8, 12, 16, 20, 24, 28] and out[8:12] == [1, 5, 9, 13] and out[31] == 31
    assert out[32:40] == [32, 36, 40, 44, 48, 52, 56, 60]


def test_gate_up_literal_interleaves_up_first():
    x = torch.arange(64).reshape(64, 1)  # gate rows 0..31, up rows 32..63
    mid = L.unshuffle_rows(L.gate_up_to_kernel_rows(x))[:, 0].tolist()
    assert mid[:6] == [32, 0, 33, 1, 34, 2]  # (up_i, gate_i): TRT-LLM-gen's SwiGLU takes the second half as gate


@pytest.mark.parametrize("lead,rows,cols", [((), 32, 8), ((3,), 96, 5), ((2, 2), 256, 16)])
def test_row_permutations_round_trip(lead, rows, cols):
    x = _u8(*lead, rows, cols, seed=rows)
    assert torch.equal(L.unshuffle_rows(L.shuffle_rows(x)), x)
    assert torch.equal(L.kernel_rows_to_gate_up(L.gate_up_to_kernel_rows(x)), x)
    assert not torch.equal(L.shuffle_rows(x), x)  # a real permutation, not the identity


@pytest.mark.parametrize("e,i,h", [(2, 64, 128), (3, 128, 256), (1, 96, 64)])
def test_pair_round_trip_with_padding(e, i, h):
    p = _params(e, i, h, seed=e + i)
    c13, s13 = L.to_trtllm_w13(p["w13_weight"], p["w13_weight_scale"])
    c2, s2 = L.to_trtllm_w2(p["w2_weight"], p["w2_weight_scale"])
    assert s13.shape == (e, *L.swizzled_shape(2 * i, h // 32)) and s2.shape == (e, *L.swizzled_shape(h, i // 32))
    assert all(torch.equal(a, b) for a, b in zip(L.from_trtllm_w13(c13, s13, h // 32),
                                                 (p["w13_weight"], p["w13_weight_scale"])))
    assert all(torch.equal(a, b) for a, b in zip(L.from_trtllm_w2(c2, s2, i // 32),
                                                 (p["w2_weight"], p["w2_weight_scale"])))
    assert torch.equal(L.from_trtllm_w13_bias(L.to_trtllm_w13_bias(p["w13_bias"])), p["w13_bias"])
    assert torch.equal(L.from_trtllm_w2_bias(L.to_trtllm_w2_bias(p["w2_bias"])), p["w2_bias"])


def test_convert_experts_is_per_expert_and_in_canonical_shapes():
    p = _params(4, 128, 256, seed=5)
    full = L.convert_experts(p)
    assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in p.items()}
    assert full["w13_bias"].dtype == torch.bfloat16
    ids = [3, 1]
    part = L.convert_experts({k: v[ids] for k, v in p.items()}, ids)
    assert all(torch.equal(part[k], full[k][ids]) for k in p)
    back = L.revert_experts(full)
    assert all(torch.equal(back[k], p[k]) for k in p)


def test_errors_name_tensor_expected_and_actual():
    p = _params(1, 64, 128, seed=9)
    with pytest.raises(ShapeError, match=r"hidden % 256 == 0 .*hidden=128, intermediate=64.*"
                                         r"hidden=256, intermediate=128"):
        L.convert_experts(p)
    with pytest.raises(DTypeError, match="'w13_weight'.*uint8.*int8"):
        L.to_trtllm_w13(p["w13_weight"].view(torch.int8), p["w13_weight_scale"])
    with pytest.raises(ShapeError, match="'w2_weight'.*multiple of 32.*\\(48, 16\\)"):
        L.to_trtllm_w2(_u8(48, 16, seed=1), _u8(48, 1, seed=2))
    with pytest.raises(ShapeError, match="expert_ids lists 2 experts but the slices hold 1"):
        L.convert_experts(_params(1, 128, 256, seed=3), [0, 1])


# ---------------------------------------------------------------- FlashInfer goldens (bytes from an H100 run)


def _golden(name: str) -> dict[str, torch.Tensor]:
    path = GOLDEN / name
    assert path.exists(), f"{path} missing: regenerate with scripts/gpu_flashinfer_golden.py on a GPU"
    return load_file(str(path))


@pytest.mark.parametrize("tag", ["tiny", "aligned"])
def test_layout_matches_flashinfer_golden(tag):
    g = _golden("flashinfer_layout.safetensors")
    p = {k.split(".", 2)[2]: v for k, v in g.items() if k.startswith(f"{tag}.in.")}
    fi = {k.split(".", 2)[2]: v for k, v in g.items() if k.startswith(f"{tag}.flashinfer.")}
    assert set(p) == set(L.PARAM_NAMES) and set(fi) == {*L.PARAM_NAMES, "w13_scale_rows", "w2_scale_rows"}
    # scale rows after FlashInfer's permutation, before its swizzle kernel
    assert torch.equal(L.gate_up_to_kernel_rows(p["w13_weight_scale"]), fi["w13_scale_rows"])
    assert torch.equal(L.shuffle_rows(p["w2_weight_scale"]), fi["w2_scale_rows"])
    c13, s13 = L.to_trtllm_w13(p["w13_weight"], p["w13_weight_scale"])
    c2, s2 = L.to_trtllm_w2(p["w2_weight"], p["w2_weight_scale"])
    assert torch.equal(c13, fi["w13_weight"]) and torch.equal(c2, fi["w2_weight"])
    # FlashInfer returns the swizzled scales flat per expert (padded to rows % 128, cols % 4)
    assert torch.equal(s13.flatten(-2), fi["w13_weight_scale"]) and torch.equal(s2.flatten(-2), fi["w2_weight_scale"])
    assert torch.equal(L.to_trtllm_w13_bias(p["w13_bias"]), fi["w13_bias"])
    assert torch.equal(L.to_trtllm_w2_bias(p["w2_bias"]), fi["w2_bias"])


def test_swizzle_matches_flashinfer_block_scale_interleave_golden():
    g = _golden("flashinfer_layout.safetensors")
    tags = sorted({k.split(".")[1] for k in g if k.startswith("swizzle.")})
    assert len(tags) == 3
    for t in tags:
        assert torch.equal(swizzle_scales(g[f"swizzle.{t}.in"]).flatten(), g[f"swizzle.{t}.flashinfer"]), t


# ---------------------------------------------------------------- MXFP8 activations vs FlashInfer


def _sm100_kernel_scale_codes(amax: torch.Tensor, r448: torch.Tensor) -> torch.Tensor:
    """Scale byte of FlashInfer's SM100 `cvt_warp_fp16_to_mxfp8`, written from its source: SFValue = amax *
    rcp.approx.ftz(448) in fp32, then cvt.rp.satfinite.ue8m0 (round up to a power of two). Valid where the product
    is a normal fp32 (amax >= 448 * 2^-126); below, the kernel's flush-to-zero takes over (docs/backends.md)."""
    sf = amax.float() * r448
    bits = sf.view(torch.int32)
    return (((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).int()).clamp(max=254)


def test_mxfp8_scale_rule_matches_flashinfer_sm100_kernel():
    """The SM100 kernel cannot run on the H100; what it computes beyond the scale byte is exact (element multiplier
    rcp.approx of a normal power of two, measured exact on the GPU; saturating RNE cast as in the codec), so the
    scale rule decides parity. Checked on every normal bf16 amax and fp32 amax within 4 ulps of 448 * 2^k."""
    g = _golden("flashinfer_mxfp8.safetensors")
    r448 = g["mxfp8.rcp_out"][0]
    pows, rcp = g["mxfp8.rcp_in"][2:], g["mxfp8.rcp_out"][2:]
    normal = (pows >= 2.0**-126) & (pows <= 2.0**126)
    assert torch.equal(rcp[normal], (1.0 / pows.double()[normal]).float())  # exact reciprocals on the GPU
    bf16 = torch.arange(0x0080, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    k = torch.arange(-118, 120, dtype=torch.float64)
    ulps = torch.arange(-4, 5, dtype=torch.float64)
    base = (448.0 * torch.exp2(k)).float()
    f32 = (base.view(torch.int32).unsqueeze(1) + ulps.int()).flatten().view(torch.float32)
    for amax in (bf16.float(), f32):
        amax = amax[amax >= 448.0 * 2.0**-126]
        x = torch.zeros(amax.numel(), 32)
        x[:, 7] = amax
        _, scales = quantize_mxfp8(x, profile="flashinfer", backend="torch")
        assert torch.equal(scales[:, 0].int(), _sm100_kernel_scale_codes(amax, r448))


def test_mxfp8_matches_flashinfer_host_quantizer_golden():
    """FlashInfer's `mxfp8_quantize` on CPU tensors (TRT-LLM's C++ host reference, fp32 in) on random rows over
    2^-40..2^40 and adversarial blocks (amax on/next to 448*2^k, every e4m3 rounding midpoint, zeros, bf16
    subnormals, bf16 max): our codec's bytes equal it everywhere. (Its CUDA path returns garbage on Hopper: the
    kernel body is compiled only for SM100+, so the SM100 scale rule is checked against a model above.)"""
    g = _golden("flashinfer_mxfp8.safetensors")
    elements, scales = quantize_mxfp8(g["mxfp8.x"], profile="flashinfer", backend="torch")  # == triton on the GPU run
    assert torch.equal(elements.view(torch.uint8), g["mxfp8.host.elements"])
    assert torch.equal(scales, g["mxfp8.host.scales"])
