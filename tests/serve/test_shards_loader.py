"""The MoE weight loader without an engine: TP=2 and EP=2 shard arithmetic, online quantization, bad input.

The reference for every sharded load is the TP=1/EP=1 load of the same checkpoint tensors: concatenating the TP
ranks' slices (w13 rows per half, w2 columns) or the EP ranks' experts must give it back bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from common import DTypeError, ShapeError, quantize
from mxfp4_serve.loader import ExpertWeightLoader
from mxfp4_serve.settings import ServeSettings
from mxfp4_serve.shards import ExpertGeometry, contiguous_expert_map

H, I, E = 128, 64, 4
PROFILE = "flashinfer"


def _checkpoint(seed: int = 0):
    """Per expert: bf16 weights with adversarial rows, and their packed codes/scales (gate, up, down)."""
    g = torch.Generator().manual_seed(seed)
    dense = {}
    for e in range(E):
        for shard, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
            w = torch.randn(shape, generator=g) * 0.05
            w[0, :32] = 0.0  # all-zero block
            w[1, 0] = 6.0 * 2.0**-3  # exactly on a power-of-two grid point
            w[2, :] = torch.finfo(torch.bfloat16).max / 4  # large magnitudes
            w[3, 5] = 1e-30  # subnormal-range value in a small block
            dense[e, shard] = w.to(torch.bfloat16)
    packed = {k: quantize(w, profile=PROFILE) for k, w in dense.items()}
    return dense, packed


def _layer(geom: ExpertGeometry, online: bool, to_local, local_to_global, bias: bool = False):
    params = {n: torch.zeros(s, dtype=torch.uint8 if "bias" not in n else torch.float32)
              for n, s in geom.param_shapes(with_bias=bias).items()}
    settings = ServeSettings(profile=PROFILE, fmt="bf16" if online else "native")
    return ExpertWeightLoader(geom, settings, params, to_local, local_to_global), params


def _load_all(loader, dense, packed, online: bool):
    for (e, shard), w in dense.items():
        if online:
            loader.load_expert(e, shard, "dense", w)
        else:
            loader.load_expert(e, shard, "codes", packed[e, shard].codes)
            loader.load_expert(e, shard, "scales", packed[e, shard].scales)


def _full(online: bool):
    dense, packed = _checkpoint()
    geom = ExpertGeometry("model.layers.0.mlp.experts", H, I, E, E)
    loader, params = _layer(geom, online, lambda g: g, list(range(E)))
    _load_all(loader, dense, packed, online)
    loader.check_complete()
    return params, dense, packed


@pytest.mark.parametrize("online", [False, True], ids=["packed", "online"])
def test_tp1_layout_is_w1_w3_rows(online):
    params, _, packed = _full(online)
    for e in range(E):
        assert torch.equal(params["w13_weight"][e], torch.cat([packed[e, "w1"].codes, packed[e, "w3"].codes]))
        assert torch.equal(params["w13_weight_scale"][e], torch.cat([packed[e, "w1"].scales, packed[e, "w3"].scales]))
        assert torch.equal(params["w2_weight"][e], packed[e, "w2"].codes)
        assert torch.equal(params["w2_weight_scale"][e], packed[e, "w2"].scales)


@pytest.mark.parametrize("online", [False, True], ids=["packed", "online"])
def test_tp2_shards_concatenate_to_tp1(online):
    full, dense, packed = _full(online)
    ranks = []
    for r in range(2):
        geom = ExpertGeometry("model.layers.0.mlp.experts", H, I, E, E, tp_rank=r, tp_size=2)
        loader, params = _layer(geom, online, lambda g: g, list(range(E)))
        _load_all(loader, dense, packed, online)
        loader.check_complete()
        assert params["w2_weight"].shape == (E, H, I // 4) and params["w2_weight_scale"].shape == (E, H, I // 64)
        ranks.append(params)
    half = I // 2
    for name in ("w13_weight", "w13_weight_scale"):  # column parallel: each rank holds half of w1 and half of w3
        w1 = torch.cat([p[name][:, :half] for p in ranks], dim=1)
        w3 = torch.cat([p[name][:, half:] for p in ranks], dim=1)
        assert torch.equal(torch.cat([w1, w3], dim=1), full[name])
    for name in ("w2_weight", "w2_weight_scale"):  # row parallel: K split, I/4 code bytes and I/64 scale bytes
        assert torch.equal(torch.cat([p[name] for p in ranks], dim=2), full[name])


def test_ep2_ranks_hold_contiguous_experts():
    full, dense, packed = _full(online=False)
    got = []
    for r in range(2):
        emap = contiguous_expert_map(E, r, 2)
        l2g = [g for g in range(E) if emap[g] >= 0]
        geom = ExpertGeometry("model.layers.0.mlp.experts", H, I, E, E // 2)
        loader, params = _layer(geom, False, lambda g, m=emap: m[g], l2g)
        skipped = [loader.load_expert(g, "w2", "codes", packed[g, "w2"].codes) for g in range(E)]
        assert skipped == [emap[g] >= 0 for g in range(E)]  # other ranks' experts are refused, not written
        _load_all(loader, dense, packed, False)
        loader.check_complete()
        got.append(params)
    for name in full:
        assert torch.equal(torch.cat([p[name] for p in got]), full[name])


def test_tp_split_breaking_a_block_is_refused():
    with pytest.raises(ShapeError, match=r"MoE layer 'L'.*96 / TP 2 = 48.*32-element block"):
        ExpertGeometry("L", 128, 96, 8, 8, tp_rank=0, tp_size=2)
    with pytest.raises(ShapeError, match=r"hidden size H = 48"):
        ExpertGeometry("L", 48, 64, 8, 8)
    with pytest.raises(ShapeError, match=r"moe intermediate size 48 \(the K of w2"):
        ExpertGeometry("L", 128, 48, 8, 8)


def test_bias_tp_and_deinterleave_free_layout():
    g = torch.Generator().manual_seed(3)
    b1, b3, b2 = torch.randn(I, generator=g), torch.randn(I, generator=g), torch.randn(H, generator=g)
    for r in range(2):
        geom = ExpertGeometry("L", H, I, 1, 1, tp_rank=r, tp_size=2)
        loader, params = _layer(geom, False, lambda e: e, [0], bias=True)
        for shard, b in (("w1", b1), ("w3", b3), ("w2", b2)):
            loader.load_expert(0, shard, "bias", b)
        half = I // 2
        assert torch.equal(params["w13_bias"][0], torch.cat([b1[r * half:(r + 1) * half], b3[r * half:(r + 1) * half]]))
        # only rank 0 adds the down-projection bias: the ranks' partial outputs are summed
        assert torch.equal(params["w2_bias"][0], b2 if r == 0 else torch.zeros_like(b2))


def _loader(online=False):
    geom = ExpertGeometry("model.layers.1.mlp.experts", H, I, E, E)
    return _layer(geom, online, lambda g: g, list(range(E)))[0]


def test_missing_tensor_is_named():
    dense, packed = _checkpoint()
    loader = _loader()
    _load_all(loader, dense, packed, False)
    loader.loaded[2, 1, 1] = False  # as if expert 2's up_proj scale were absent from the checkpoint
    with pytest.raises(ValueError, match=r"1 expert tensor\(s\) missing.*'model\.layers\.1\.mlp\.experts\.2\.up_proj"
                                         r"\.weight_scale'"):
        loader.check_complete()


@pytest.mark.parametrize("case,tensor,exc,msg", [
    ("scale_shape", torch.zeros(I, H // 32 - 1, dtype=torch.uint8), ShapeError,
     r"experts\.0\.gate_proj\.weight_scale'.*expected scales of shape \(64, 4\).*got \(64, 3\)"),
    ("scale_dtype", torch.zeros(I, H // 32, dtype=torch.float32), DTypeError,
     r"experts\.0\.gate_proj\.weight_scale'.*must have dtype torch\.uint8.*got torch\.float32"),
    ("nan_scale", torch.full((I, H // 32), 0xFF, dtype=torch.uint8), ValueError, r"scale byte 0xFF"),
    ("codes_shape", torch.zeros(I, H, dtype=torch.uint8), ShapeError, r"gate_proj\.weight'.*\(64, 64\).*\(64, 128\)"),
])
def test_bad_packed_tensors(case, tensor, exc, msg):
    kind = "codes" if case.startswith("codes") else "scales"
    with pytest.raises(exc, match=msg):
        _loader().load_expert(0, "w1", kind, tensor)


def test_bf16_into_packed_layout_and_packed_into_online_are_refused():
    with pytest.raises(DTypeError, match=r"bfloat16 weight, but the checkpoint's format 'native'"):
        _loader().load_expert(0, "w1", "dense", torch.zeros(I, H, dtype=torch.bfloat16))
    with pytest.raises(DTypeError, match=r"online mode"):
        _loader(online=True).load_expert(0, "w1", "codes", torch.zeros(I, H // 2, dtype=torch.uint8))


def test_online_nonfinite_weight_names_the_tensor():
    w = torch.zeros(I, H, dtype=torch.bfloat16)
    w[7, 40] = float("nan")
    with pytest.raises(ValueError, match=r"experts\.3\.gate_proj\.weight'.*NaN or Inf"):
        _loader(online=True).load_expert(3, "w1", "dense", w)


def test_vllm_call_signature_routes_by_parameter():
    """vLLM calls param.weight_loader(param=..., loaded_weight=..., weight_name=..., shard_id=..., expert_id=...,
    return_success=True); the scale parameter selects the scale path, a uint8 weight the codes path."""
    _, packed = _checkpoint()
    geom = ExpertGeometry("L", H, I, E, E)
    loader, params = _layer(geom, False, lambda g: g, list(range(E)))
    ok = loader(param=params["w13_weight_scale"], loaded_weight=packed[1, "w3"].scales,
                weight_name="L.w13_weight_scale", shard_id="w3", expert_id=1, return_success=True)
    assert ok is True and torch.equal(params["w13_weight_scale"][1, I:], packed[1, "w3"].scales)
    with pytest.raises(ValueError, match="shard id must be one of"):
        loader(param=params["w2_weight"], loaded_weight=packed[1, "w2"].codes, weight_name="L.w2_weight",
               shard_id="w4", expert_id=1)
