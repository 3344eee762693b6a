"""common.layouts: every conversion round-trips on fresh random bytes and matches a hand-computed literal case."""

from __future__ import annotations

import pytest
import torch

from common import DTypeError, MXFP4Tensor, ShapeError, quantize
from common.layouts import deepseek_v4, gpt_oss, swizzle, torch_views, vllm_moe

PROFILE = "flashinfer"


def _random_q(*lead: int, n: int, k: int, seed: int) -> MXFP4Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (*lead, n, k // 2), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 255, (*lead, n, k // 32), generator=g, dtype=torch.uint8)  # 0..254: no NaN scale
    return MXFP4Tensor(codes, scales, PROFILE)


def _literal_q(e: int, n: int, k: int) -> MXFP4Tensor:
    """Byte value = a unique function of its position, so permutations can be checked by hand."""
    codes = torch.arange(e * n * k // 2, dtype=torch.int64).reshape(e, n, k // 2).remainder(251).to(torch.uint8)
    scales = (torch.arange(e * n * k // 32).reshape(e, n, k // 32) + 100).remainder(251).to(torch.uint8)
    return MXFP4Tensor(codes, scales, PROFILE)


# ---------------------------------------------------------------- gpt-oss


def test_gpt_oss_round_trip_random():
    gate, up = _random_q(4, n=32, k=64, seed=1), _random_q(4, n=32, k=64, seed=2)
    down = _random_q(4, n=64, k=32, seed=3)
    blocks, scales = gpt_oss.to_gpt_oss_gate_up(gate, up)
    assert blocks.shape == (4, 64, 2, 16) and scales.shape == (4, 64, 2)
    g2, u2 = gpt_oss.from_gpt_oss_gate_up(blocks, scales, PROFILE)
    assert g2.equal(gate) and u2.equal(up)
    db, ds = gpt_oss.to_gpt_oss_down(down)
    assert db.shape == (4, 64, 1, 16) and gpt_oss.from_gpt_oss_down(db, ds, PROFILE).equal(down)


def test_gpt_oss_literal_interleave_and_blocks():
    gate = MXFP4Tensor(torch.tensor([[[0x10] * 16, [0x11] * 16]], dtype=torch.uint8),
                       torch.tensor([[[120], [121]]], dtype=torch.uint8), PROFILE)
    up = MXFP4Tensor(torch.tensor([[[0x20] * 16, [0x21] * 16]], dtype=torch.uint8),
                     torch.tensor([[[130], [131]]], dtype=torch.uint8), PROFILE)
    blocks, scales = gpt_oss.to_gpt_oss_gate_up(gate, up)
    # row 2i = gate i, row 2i+1 = up i; each row is one 32-element block of 16 bytes
    assert blocks[0, :, 0, 0].tolist() == [0x10, 0x20, 0x11, 0x21]
    assert scales[0, :, 0].tolist() == [120, 130, 121, 131]
    codes = torch.arange(64, dtype=torch.uint8).reshape(1, 64)
    assert gpt_oss.codes_to_blocks(codes)[0, 1, 0].item() == 16 and gpt_oss.codes_to_blocks(codes)[0, 3, 15] == 63


def test_gpt_oss_matches_transformers_gate_up_split():
    """Quantize an interleaved [2I, H] weight as a whole == quantize gate (x[::2]) and up (x[1::2]) separately."""
    w = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    whole = quantize(w, profile=PROFILE)
    gate, up = gpt_oss.from_gpt_oss_gate_up(gpt_oss.codes_to_blocks(whole.codes), whole.scales, PROFILE)
    assert gate.equal(quantize(w[:, 0::2], profile=PROFILE)) and up.equal(quantize(w[:, 1::2], profile=PROFILE))


def test_gpt_oss_errors_name_the_tensor():
    with pytest.raises(ShapeError, match="'gate_up_proj_blocks'.*even number of rows.*\\(1, 3, 16\\)"):
        gpt_oss.from_gpt_oss_gate_up(torch.zeros(1, 3, 1, 16, dtype=torch.uint8),
                                     torch.zeros(1, 3, 1, dtype=torch.uint8), PROFILE)
    with pytest.raises(ShapeError, match="'gate_up_proj_scales': expected shape \\(1, 2, 1\\), got \\(1, 2, 2\\)"):
        gpt_oss.from_gpt_oss_gate_up(torch.zeros(1, 2, 1, 16, dtype=torch.uint8),
                                     torch.zeros(1, 2, 2, dtype=torch.uint8), PROFILE)
    with pytest.raises(DTypeError, match="'blocks': expected dtype torch.uint8, got torch.int8"):
        gpt_oss.blocks_to_codes(torch.zeros(1, 1, 16, dtype=torch.int8))
    with pytest.raises(ShapeError, match="'codes'.*multiple of 16.*\\(2, 24\\)"):
        gpt_oss.codes_to_blocks(torch.zeros(2, 24, dtype=torch.uint8))


# ---------------------------------------------------------------- DeepSeek-V4


def test_deepseek_v4_round_trip_is_a_view():
    q = _random_q(n=48, k=96, seed=5)
    w, s = deepseek_v4.to_deepseek_v4(q)
    assert w.dtype == torch.int8 and s.dtype == torch.float8_e8m0fnu and w.shape == (48, 48) and s.shape == (48, 3)
    assert w.data_ptr() == q.codes.data_ptr() and s.data_ptr() == q.scales.data_ptr()
    assert deepseek_v4.from_deepseek_v4(w, s, PROFILE).equal(q)


def test_deepseek_v4_literal_bytes_not_values():
    q = MXFP4Tensor(torch.tensor([[0xF7] + [0] * 15], dtype=torch.uint8), torch.tensor([[127]], dtype=torch.uint8),
                    PROFILE)
    w, s = deepseek_v4.to_deepseek_v4(q)
    assert w[0, 0].item() == -9  # 0xF7 as a signed byte
    assert s.to(torch.float32).item() == 1.0  # E8M0 byte 127 is the value 1.0 ...
    assert s.to(torch.uint8).item() == 1  # ... which is why a numeric .to(uint8) would be wrong
    assert deepseek_v4.from_deepseek_v4(w, s, PROFILE).scales.item() == 127
    with pytest.raises(DTypeError, match="'weight': expected dtype torch.int8, got torch.uint8"):
        deepseek_v4.from_deepseek_v4(q.codes, s, PROFILE)
    with pytest.raises(ShapeError, match="'weight scale': expected shape \\(1, 1\\), got \\(1, 2\\)"):
        deepseek_v4.from_deepseek_v4(w, torch.zeros(1, 2, dtype=torch.float8_e8m0fnu), PROFILE)


# ---------------------------------------------------------------- vLLM MoE params


def test_vllm_moe_round_trip_and_literal_order():
    gate, up = _literal_q(3, 32, 64), _random_q(3, n=32, k=64, seed=6)
    down = _random_q(3, n=64, k=32, seed=7)
    p = vllm_moe.to_vllm_moe(gate, up, down)
    assert {k: tuple(v.shape) for k, v in p.items()} == {
        "w13_weight": (3, 64, 32), "w13_weight_scale": (3, 64, 2),
        "w2_weight": (3, 64, 16), "w2_weight_scale": (3, 64, 1)}
    # [w1; w3]: row r < I is gate row r, row I + r is up row r
    assert torch.equal(p["w13_weight"][2, 5], gate.codes[2, 5]) and torch.equal(p["w13_weight"][2, 37], up.codes[2, 5])
    assert p["w13_weight"][1, 0, 0].item() == (1 * 32 * 32) % 251
    g2, u2, d2 = vllm_moe.from_vllm_moe(p, PROFILE)
    assert g2.equal(gate) and u2.equal(up) and d2.equal(down)
    with pytest.raises(ShapeError, match="'down': expected shape \\(3, 64, 16\\)"):
        vllm_moe.to_vllm_moe(gate, up, gate)
    with pytest.raises(KeyError, match="w2_weight_scale"):
        vllm_moe.from_vllm_moe({k: v for k, v in p.items() if k != "w2_weight_scale"}, PROFILE)


def test_interleaved_and_stacked_rows_round_trip():
    x = torch.arange(2 * 6 * 3, dtype=torch.uint8).reshape(2, 6, 3)  # rows g0 u0 g1 u1 g2 u2
    s = vllm_moe.stacked_from_interleaved(x)
    assert s[0, :, 0].tolist() == [0, 6, 12, 3, 9, 15]  # g0 g1 g2 u0 u1 u2
    assert torch.equal(vllm_moe.interleaved_from_stacked(s), x)
    r = torch.randint(0, 256, (4, 8, 2, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(vllm_moe.interleaved_from_stacked(vllm_moe.stacked_from_interleaved(r)), r)
    # gpt-oss blocks -> vLLM's [w1; w3] through the stacked order equals the per-projection route
    gate, up = gpt_oss.from_gpt_oss_gate_up(r, r[..., 0].clone(), PROFILE)
    assert torch.equal(vllm_moe.stacked_from_interleaved(r).flatten(-2), torch.cat((gate.codes, up.codes), 1))


# ---------------------------------------------------------------- torch views


def test_torch_views_round_trip():
    q = _random_q(2, n=8, k=64, seed=9)
    f4, e8 = torch_views.to_torch_views(q)
    assert f4.dtype == torch.float4_e2m1fn_x2 and e8.dtype == torch.float8_e8m0fnu and f4.shape == q.codes.shape
    assert torch_views.from_torch_views(f4, e8, PROFILE).equal(q)


def test_torch_views_nibble_order_matches_torch():
    """torch packs element 2j into the low nibble of a float4_e2m1fn_x2 byte (c10 Float4_e2m1fn_x2.h: "val1 : val0"
    in bits "7654 : 3210"). torch has no CPU cast for that dtype, so the executable check is torchao's to_mx, which
    emits torch.float4_e2m1fn_x2 data for torch._scaled_mm: our codes viewed as float4 must be its bytes.
    Blocks contain +-6 so the scale is 2^0 (byte 127) and every element is a grid value, exact under any rule.
    """
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    g = torch.Generator().manual_seed(10)
    x = grid[torch.randint(0, 8, (16, 64), generator=g)] * torch.where(torch.rand(16, 64, generator=g) < 0.5, -1, 1)
    x[:, ::32] = 6.0
    x = x.to(torch.bfloat16)
    q = quantize(x, profile=PROFILE)
    assert bool((q.scales == 127).all())
    their_scale, theirs = to_mx(x, torch.float4_e2m1fn_x2, 32)
    assert torch.equal(torch_views.codes_as_float4(q.codes).view(torch.uint8), theirs.view(torch.uint8))
    assert torch.equal(torch_views.scales_as_e8m0(q.scales).view(torch.uint8), their_scale.view(torch.uint8))
    # literal: [1.0, -3.0] -> codes 0x2 (val0) and 0xD (val1) -> byte 0xD2; float8_e8m0fnu byte 127 is 1.0
    lit = quantize(torch.tensor([[1.0, -3.0] + [6.0] * 30]), profile=PROFILE)
    assert lit.codes[0, 0].item() == 0xD2
    assert torch_views.scales_as_e8m0(lit.scales).to(torch.float32).item() == 1.0
    with pytest.raises(DTypeError, match="'float4 codes': expected dtype torch.float4_e2m1fn_x2, got torch.uint8"):
        torch_views.float4_as_codes(lit.codes)


# ---------------------------------------------------------------- 128x4 swizzle


@pytest.mark.parametrize("rows,cols", [(128, 4), (256, 8), (200, 6), (1, 1), (130, 9), (384, 64)])
def test_swizzle_matches_torchao_to_blocked(rows, cols):
    from torchao.prototype.mx_formats.utils import to_blocked

    s = torch.randint(0, 255, (rows, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows * cols))
    ours = swizzle.swizzle_scales(s)
    assert ours.shape == swizzle.swizzled_shape(rows, cols)
    assert torch.equal(ours.flatten(), to_blocked(s))
    assert torch.equal(swizzle.unswizzle_scales(ours, rows, cols), s)


def test_swizzle_literal_and_batched():
    s = torch.arange(128 * 4, dtype=torch.int32).reshape(128, 4)
    out = swizzle.swizzle_scales((s % 256).to(torch.uint8)).flatten().to(torch.int32)
    # byte (r, c) sits at (r % 32) * 16 + (r // 32) * 4 + c: row 33 col 2 -> 1*16 + 1*4 + 2 = 22
    assert out[22].item() == (33 * 4 + 2) % 256 and out[0].item() == 0 and out[4].item() == (32 * 4) % 256
    e = torch.randint(0, 255, (3, 150, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(11))
    b = swizzle.swizzle_scales(e)
    assert b.shape == (3, 256, 8)
    assert all(torch.equal(b[i], swizzle.swizzle_scales(e[i])) for i in range(3))
    assert torch.equal(swizzle.unswizzle_scales(b, 150, 5), e)
    with pytest.raises(ShapeError, match="expected \\[..., 256, 8\\] for 150x5 scales, got shape \\(3, 128, 8\\)"):
        swizzle.unswizzle_scales(b[:, :128], 150, 5)
