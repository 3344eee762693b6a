"""The LoRA kernels of the grouped MLP (common.grouped_gemm.lora) against fp32 per-expert loops.

Bound, per element (not a norm): both reduce bf16 x bf16 products, exact in fp32, in some order, then round once
(bf16 out: <= 2^-7 relative, the interpreter's cast truncates; fp32 out: no extra rounding). Each fp32 sum of n
terms, the kernel's and the reference's, is off the exact one by at most n * 2^-24 * sum|a||b|, so
|got - ref| <= 2^-7 |ref| + 2 n 2^-24 sum|a||b| holds for any inputs, large magnitudes and cancellation included.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common.errors import ShapeError  # noqa: E402
from common.grouped_gemm import counters  # noqa: E402
from common.grouped_gemm import lora as L  # noqa: E402
from common.kernels import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
# an empty expert, one row, more rows than one row tile / row chunk (16 under the interpreter), a partial tile
COUNTS = [3, 0, 1, 17, 5]


def _offsets(counts: list[int]) -> torch.Tensor:
    o = torch.zeros(len(counts) + 1, dtype=torch.int32)
    o[1:] = torch.tensor(counts).cumsum(0)
    return o.to(DEVICE)


def _rand(*shape: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def _assert_within(got: torch.Tensor, ref: torch.Tensor, abs_sum: torch.Tensor, n: int, rounding: float) -> None:
    tol = rounding * ref.abs() + 2 * n * 2.0**-24 * abs_sum + 1e-30
    err = (got.double().cpu() - ref.double()).abs()
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item():.3e}"


def _project_ref(x: torch.Tensor, factor: torch.Tensor, counts: list[int], scaling: float):
    """fp32 loop: (scaling * x_e @ factor_e^T, |scaling| * |x_e| @ |factor_e|^T) with factor rounded to bf16."""
    f = factor.to(torch.bfloat16).float().cpu()
    xs = x.float().cpu()
    out, mag, lo = [], [], 0
    for e, c in enumerate(counts):
        out.append(scaling * xs[lo:lo + c] @ f[e].T)
        mag.append(abs(scaling) * xs[lo:lo + c].abs() @ f[e].abs().T)
        lo += c
    return torch.cat(out), torch.cat(mag)


@pytest.mark.parametrize("r", [8, 16, 24])
@pytest.mark.parametrize("k", [96, 128])
@pytest.mark.parametrize("as_b", [False, True], ids=["A", "B^T"])
def test_project_matches_loop(r, k, as_b):
    e, m = len(COUNTS), sum(COUNTS)
    x = _rand(m, k, seed=1)
    x[0] = 0.0                          # a zero row
    x[4, :3] = torch.tensor([2.0**60, -(2.0**60), 3e-39])  # huge, cancelling and subnormal activations
    if as_b:  # a B factor [E, K, R] (fp32 master) read transposed
        factor = _rand(e, k, r, seed=2, dtype=torch.float32).transpose(1, 2)
    else:
        factor = _rand(e, r, k, seed=2, dtype=torch.float32)
    got = L.project(x, _offsets(COUNTS), factor, scaling=-0.75)
    assert got.dtype == torch.bfloat16 and got.shape == (m, r)
    ref, mag = _project_ref(x, factor, COUNTS, -0.75)
    _assert_within(got, ref, mag, k, 2.0**-7)
    assert torch.equal(got[0].cpu(), torch.zeros(r, dtype=torch.bfloat16))


def test_project_keeps_a_nan_in_its_row():
    x = _rand(sum(COUNTS), 64, seed=3)
    x[5, 7] = float("nan")
    x[6, 1] = float("inf")
    got = L.project(x, _offsets(COUNTS), _rand(len(COUNTS), 16, 64, seed=4)).cpu()
    assert bool(got[5].isnan().all()) and bool((~got[6].isfinite()).all())
    rest = torch.cat([got[:5], got[7:]])
    assert bool(rest.isfinite().all())  # row tiles never mix rows


@pytest.mark.parametrize("wide", ["a", "b"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [8, 16])
def test_wgrad_matches_loop(wide, out_dtype, r):
    counts, m, big = COUNTS, sum(COUNTS), 80
    p, q = (big, r) if wide == "a" else (r, big)
    a, b = _rand(m, p, seed=5), _rand(m, q, seed=6)
    a[10, 0] = 2.0**50
    got = L.grouped_wgrad(a, b, _offsets(counts), out_dtype=out_dtype)
    assert got.dtype == out_dtype and got.shape == (len(counts), p, q)
    af, bf = a.float().cpu(), b.float().cpu()
    lo = 0
    for e, c in enumerate(counts):
        ref = af[lo:lo + c].T @ bf[lo:lo + c]
        mag = af[lo:lo + c].abs().T @ bf[lo:lo + c].abs()
        _assert_within(got[e], ref, mag, c, 2.0**-7 if out_dtype == torch.bfloat16 else 0.0)
        lo += c
    assert torch.equal(got[1].cpu(), torch.zeros(p, q, dtype=out_dtype))  # no rows: exactly zero
    again = L.grouped_wgrad(a, b, _offsets(counts), out_dtype=out_dtype)
    assert torch.equal(got, again)  # no atomics: the same bits every run


def test_wgrad_keeps_a_nan_in_its_expert():
    a, b = _rand(sum(COUNTS), 32, seed=7), _rand(sum(COUNTS), 16, seed=8)
    a[20, 3] = float("nan")  # a row of expert 3 (rows 4..20)
    got = L.grouped_wgrad(a, b, _offsets(COUNTS), out_dtype=torch.float32).cpu()
    assert bool(got[3, 3].isnan().all())
    assert bool(got[[0, 1, 2, 4]].isfinite().all()) and bool(got[3, :3].isfinite().all())


def test_empty_batch_and_errors():
    offs = _offsets([0, 0])
    assert L.project(_rand(0, 64, seed=9), offs, _rand(2, 16, 64, seed=10)).shape == (0, 16)
    w = L.grouped_wgrad(_rand(0, 64, seed=9), _rand(0, 16, seed=11), offs, out_dtype=torch.float32)
    assert torch.equal(w.cpu(), torch.zeros(2, 64, 16))
    offs = _offsets(COUNTS)
    m = sum(COUNTS)
    with pytest.raises(ShapeError, match=r"x \(26, 48\).*factor \[E, R, K\] \(5, 16, 64\).*x \[M, 64\]"):
        L.project(_rand(m, 48, seed=12), offs, _rand(5, 16, 64, seed=13))
    with pytest.raises(ShapeError, match=r"'b': expected \[M=26, \.\.\.\] sorted rows, got \(25, 16\)"):
        L.grouped_wgrad(_rand(m, 64, seed=14), _rand(m - 1, 16, seed=15), offs)
    with pytest.raises(ShapeError, match="'expert_offsets': expected int32"):
        L.project(_rand(m, 64, seed=16), offs.long(), _rand(5, 16, 64, seed=17))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_project_gathers_rows_bit_exactly(index_dtype):
    """gather_rows (the engine layer's A13 projection reads the tokens in place) gives the bits of the projection of
    the gathered copy: the same values reach the same MMA. A token read by several rows, and one by none."""
    e, m, t, k = len(COUNTS), sum(COUNTS), 11, 64
    x = _rand(t, k, seed=20)
    rows = (torch.arange(m) * 7 % (t - 1)).to(index_dtype).to(DEVICE)  # token t - 1 never read
    factor = _rand(e, 16, k, seed=21)
    offs = _offsets(COUNTS)
    got = L.project(x, offs, factor, 0.5, gather_rows=rows)
    assert torch.equal(got, L.project(x.index_select(0, rows.long()), offs, factor, 0.5))
    with pytest.raises(ShapeError, match=r"'gather_rows': expected int32/int64 \[26\] on .*, got torch.float32"):
        L.project(x, offs, factor, gather_rows=rows.float())


@pytest.mark.parametrize("split_k", [2, 3, 4, 8])
def test_split_k_projection_is_one_deterministic_launch(split_k):
    """split_k > 1 (the engine layer's projections): K summed in chunks by separate programs, the chunks' fp32
    partials added in chunk order by the tile's last program. Within the loop's bound of the reference (other sum
    order), the same bits on every run, a chunk past K (k=96 in 8 chunks of 64) contributes nothing, and every tile
    counter is back at zero after the launch (the next launch relies on it)."""
    e, m, k = len(COUNTS), sum(COUNTS), 96 if split_k == 8 else 320
    x = _rand(m, k, seed=42)
    x[4, :3] = torch.tensor([2.0**60, -(2.0**60), 3e-39])
    factor = _rand(e, 16, k, seed=43, dtype=torch.float32)
    got = L.project(x, _offsets(COUNTS), factor, -0.75, split_k=split_k)
    ref, mag = _project_ref(x, factor, COUNTS, -0.75)
    _assert_within(got, ref, mag, k, 2.0**-7)
    assert torch.equal(got, L.project(x, _offsets(COUNTS), factor, -0.75, split_k=split_k))
    assert not counters.current(x.device).any()
    rows = (torch.arange(m) * 7 % 11).to(DEVICE)
    assert torch.equal(L.project(x[:11], _offsets(COUNTS), factor, 0.5, gather_rows=rows, split_k=split_k),
                       L.project(x[:11][rows], _offsets(COUNTS), factor, 0.5, split_k=split_k))
    with pytest.raises(ValueError, match="split_k must be an int in \\[1, 64\\], got 0"):
        L.project(x, _offsets(COUNTS), factor, split_k=0)


def test_factor_in_order_projects_a_reordered_activation():
    """An activation kept in the down GEMM's K order ("interleaved" for canonical codes) projected by A2 with its
    columns in that order is the same sum in another order: within the loop's bound of the natural projection;
    "natural" returns the factor itself (kb-major codes: no copy)."""
    from common.grouped_gemm.interleave import interleave_k

    e, m, k = len(COUNTS), sum(COUNTS), 96
    x, a = _rand(m, k, seed=22), _rand(e, 16, k, seed=23, dtype=torch.float32)
    assert L.factor_in_order(a, "natural") is a
    got = L.project(interleave_k(x), _offsets(COUNTS), L.factor_in_order(a, "interleaved"), 2.0)
    ref, mag = _project_ref(x, a, COUNTS, 2.0)
    _assert_within(got, ref, mag, k, 2.0**-7)


def _gated_case(kb_major: bool, i: int, seed: int):
    """Sorted rows with adversarial values, w13 quantized (kb-major or canonical), a bias, gathered token rows."""
    import common
    from common.grouped_gemm.layout import to_kb_major

    e, m, t, h = len(COUNTS), sum(COUNTS), 19, 64
    g = torch.Generator().manual_seed(seed)
    x = _rand(t, h, seed=seed + 1)
    x[2] = 0.0                                                   # a zero token
    x[3, :4] = torch.tensor([3e4, -3e4, 3e-39, -1e-40])          # large, cancelling, subnormal activations
    q = common.quantize(torch.randn(e, 2 * i, h, generator=g) * 0.2, profile="flashinfer")
    codes = to_kb_major(q.codes) if kb_major else q.codes
    rows = (torch.arange(m) * 5 % t).to(DEVICE)
    bias = (torch.randn(e, 2 * i, generator=g) * 0.1).to(torch.bfloat16).to(DEVICE)
    return x, rows, codes.to(DEVICE), q.scales.to(DEVICE), bias


@pytest.mark.parametrize("kb_major", [True, False], ids=["kb_major", "canonical"])
def test_gated_gemm_fuses_the_next_projection(kb_major, i=96):
    """grouped_mm_mxfp4_gated(project=(A2, s)) (the engine layer's A2 projection in the gated GEMM's epilogue):
    the activation's bits are those of the call without it; h = s * act_e @ A2_e^T of the activation as stored,
    within the loop's bound (each output tile's fp32 partial added in tile order: another sum order); the same
    bits on every run; every row-tile counter back at zero. i = 96: three output tiles under the interpreter, the
    last of the four power-of-two tiles empty (masked); the canonical codes give the activation in the word
    decode's order, A2's columns follow it (factor_in_order); gathered token rows, a bias and adversarial
    activations."""
    from common.grouped_gemm import grouped_mm_mxfp4_gated
    from common.grouped_gemm.ops import reduction_order

    x, rows, codes, scales, bias = _gated_case(kb_major, i, seed=60)
    offs = _offsets(COUNTS)
    order = reduction_order(codes, rows.numel())
    assert order == ("natural" if kb_major else "interleaved")
    a2 = _rand(len(COUNTS), 16, i, seed=62, dtype=torch.float32) / 4
    a2o = L.factor_in_order(a2, order).to(torch.bfloat16).contiguous()
    kw = dict(activation="silu", bias=bias, gather_rows=rows, out_order=order)
    act, pre, h = grouped_mm_mxfp4_gated(x, offs, codes, scales, project=(a2o, -0.75), **kw)
    plain, _ = grouped_mm_mxfp4_gated(x, offs, codes, scales, **kw)
    assert pre is None and h.dtype == torch.bfloat16 and h.shape == (sum(COUNTS), 16)
    assert torch.equal(act, plain)
    ref, mag = _project_ref(act, a2o, COUNTS, -0.75)  # act and A2 both in `order`: the same sum
    _assert_within(h, ref, mag, i, 2.0**-7)
    again = grouped_mm_mxfp4_gated(x, offs, codes, scales, project=(a2o, -0.75), **kw)[2]
    assert torch.equal(h, again)
    assert not counters.current(x.device).any()


def test_fused_projection_refuses_bad_factors():
    from common.grouped_gemm import grouped_mm_mxfp4_gated

    x, rows, codes, scales, _ = _gated_case(True, 64, seed=70)
    offs = _offsets(COUNTS)
    kw = dict(activation="silu", gather_rows=rows)
    good = _rand(len(COUNTS), 16, 64, seed=71)
    with pytest.raises(ShapeError, match=r"'project factor': expected \[E=5, R, 64\] on .*, got \(5, 16, 96\)"):
        grouped_mm_mxfp4_gated(x, offs, codes, scales, project=(_rand(5, 16, 96, seed=72), 1.0), **kw)
    with pytest.raises(ShapeError, match="'project factor': expected bfloat16 .* got torch.float32 rank 16"):
        grouped_mm_mxfp4_gated(x, offs, codes, scales, project=(good.float(), 1.0), **kw)
    with pytest.raises(ShapeError, match="padded to a power of two >= 16.* rank 8"):
        grouped_mm_mxfp4_gated(x, offs, codes, scales, project=(good[:, :8], 1.0), **kw)
    with pytest.raises(ShapeError, match="unit column stride"):
        grouped_mm_mxfp4_gated(x, offs, codes, scales, project=(good.transpose(1, 2).contiguous().transpose(1, 2),
                                                                 1.0), **kw)


@pytest.mark.parametrize("kb_major", [True, False], ids=["kb_major", "canonical"])
def test_engine_layer_lora_equals_the_unfused_composition(kb_major, monkeypatch):
    """moe_layer_forward(lora=...) with the engine's bf16 kernel copies (rank padded to 16) against the composition
    it replaced (token copy, fp32 factors rounded on every call, natural-order activation, the A2 projection fused
    into the gated GEMM as the layer's is at these sizes with LORA_FUSE_A2_MAX_BUCKET = 64): the same bits on
    kb-major codes (the engine's layout, whose K order is the natural one); on canonical codes the activation stays
    in the word decode's order and only the A2 projection's sum order changes (<= one bf16 step of h2). With the A2
    projection apart (LORA_FUSE_A2_MAX_BUCKET = 0, the default) h2 is summed in another order: within one bf16
    step of h2 again."""
    import common
    from common.grouped_gemm import grouped_mm_mxfp4, grouped_mm_mxfp4_gated, mlp, moe_layer_forward, route

    # on a GPU the autotuner tunes the gathering and the copying gated GEMM separately (another tile sums in another
    # order): both get the bucket's first tile here, as under the interpreter
    monkeypatch.setenv("MXFP4_GG_AUTOTUNE", "0")
    monkeypatch.setattr(mlp, "LORA_FUSE_A2_MAX_BUCKET", 64)
    from common.grouped_gemm.combine import sum_slots
    from common.grouped_gemm.layout import to_kb_major

    t, topk, e, h, i, r = 10, 2, 4, 64, 64, 8
    g = torch.Generator().manual_seed(24)
    ids = torch.stack([torch.randperm(e, generator=g)[:topk] for _ in range(t)]).to(DEVICE)
    tw = torch.softmax(torch.randn(t, topk, generator=g), -1).to(DEVICE)
    x = _rand(t, h, seed=25)
    w13, w2 = (common.quantize(torch.randn(e, n, kk, generator=g) * 0.15, profile="flashinfer")
               for n, kk in ((2 * i, h), (h, i)))
    w13, w2 = ((to_kb_major(q.codes) if kb_major else q.codes, q.scales) for q in (w13, w2))
    w13, w2 = tuple(t_.to(DEVICE) for t_ in w13), tuple(t_.to(DEVICE) for t_ in w2)
    fp32 = [_rand(e, r, h, seed=26, dtype=torch.float32) / 8, _rand(e, 2 * i, r, seed=27, dtype=torch.float32) / 4,
            _rand(e, r, i, seed=28, dtype=torch.float32) / 8, _rand(e, h, r, seed=29, dtype=torch.float32) / 4]
    kernel = []  # as mxfp4_serve.expert_lora.refresh writes them: bf16, rank padded by zero columns to 16
    for f, dim in zip(fp32, (1, 2, 1, 2)):
        pad = torch.zeros(*(16 if d == dim else s for d, s in enumerate(f.shape)), dtype=torch.bfloat16,
                          device=DEVICE)
        pad.narrow(dim, 0, r).copy_(f)
        kernel.append(pad)
    got = moe_layer_forward(x, ids, tw, w13, w2, activation="silu", lora=(*kernel, 2.0))
    # the replaced composition, step by step (the projections split K as the layer's do)
    split = mlp.LORA_SPLIT_K
    rt = route(ids, e)
    xs = x.index_select(0, rt.token.long())
    bf = [f.to(torch.bfloat16) for f in fp32]
    a2 = torch.nn.functional.pad(bf[2], (0, 0, 0, 16 - r))
    act, _, h2 = grouped_mm_mxfp4_gated(xs, rt.offsets, *w13, activation="silu",
                                        lora=(L.project(xs, rt.offsets, fp32[0], 2.0, split_k=split), bf[1]),
                                        project=(a2, 2.0))
    y = grouped_mm_mxfp4(act, rt.offsets, *w2, lora=(h2[:, :r], bf[3]),
                         scatter_rows=rt.source, row_weights=tw.reshape(-1).float())
    old = sum_slots(y, topk, x.dtype)
    fused_max = mlp.LORA_FUSE_A2_MAX_BUCKET
    monkeypatch.setattr(mlp, "LORA_FUSE_A2_MAX_BUCKET", 0)
    apart = moe_layer_forward(x, ids, tw, w13, w2, activation="silu", lora=(*kernel, 2.0))
    assert (got.float() - apart.float()).abs().max() <= 2.0**-6 * apart.float().abs().max()
    monkeypatch.setattr(mlp, "LORA_FUSE_A2_MAX_BUCKET", fused_max)
    base = moe_layer_forward(x, ids, tw, w13, w2, activation="silu")
    assert (got.float() - base.float()).abs().max() > 0.05 * base.float().abs().max()  # the adapters count
    if kb_major:
        assert torch.equal(got, old)
    else:
        assert (got.float() - old.float()).abs().max() <= 2.0**-6 * old.float().abs().max()


def test_projection_tile_fits_its_shared_memory_budget():
    """The GPU projection tile (256 x 4 stages, chosen on an H100) is used where its stages fit SMEM_BUDGET and
    falls back otherwise: a 64-row x 64-rank tile at 256 x 4 would ask 256 KB, more than an H100 block has."""
    from common.grouped_gemm import lora as L

    assert L._project_tile(16, 16) == (L.PROJECT_BLOCK_K, L.PROJECT_STAGES)
    assert L._project_tile(64, 16) == (L.PROJECT_BLOCK_K, L.PROJECT_STAGES)  # 160 KB: ran at 1024 tokens
    assert L._project_tile(64, 64) == L.FALLBACK_TILE
    bk, st = L.FALLBACK_TILE
    assert (64 + L._MAX_BLOCK_R) * bk * 2 * st <= 228 * 1024  # the fallback fits the widest rank block


_COMPILE_PROJECT_SM90 = """
from common.grouped_gemm._lora_kernels import _lora_project_kernel
from common.grouped_gemm.aot import compile_sm90

const = dict(GATHER=True, E_POW2=32, F32_DOT=False, SPLIT_K=4, PDL=2, BLOCK_M=16, BLOCK_R=16, BLOCK_K=256)
ptr = {"offsets_ptr": "*i32", "src_ptr": "*i64", "part_ptr": "*fp32", "count_ptr": "*i32"}
try:
    ptx = compile_sm90(_lora_project_kernel, const, ptr, num_warps=4, num_stages=4).asm["ptx"]
except FileNotFoundError as exc:
    print("NO-PTXAS", exc)
    raise SystemExit(0)
print("count", ptx.count("atom.global.gpu.acq_rel.add"), "reset", ptx.count("atom.global.gpu.relaxed.exch"),
      "cg", int("ld.global.cg" in ptx), "bar", int("bar.sync" in ptx), "pdl", ptx.count("griddepcontrol"))
"""


def test_split_k_projection_compiles_for_sm90():
    """The split-K fix-up's ordering (a barrier, then one acquire-release count per program, L1-bypassing reads of
    the partials, the counter's reset) only matters on a GPU, where the interpreter's one-program-at-a-time run
    cannot show it: compile for sm_90 (Triton's ptxas, no GPU) and check the PTX has each piece."""
    from tests.sm90 import compile_in_child

    out = compile_in_child(_COMPILE_PROJECT_SM90)
    assert out.split() == ["count", "1", "reset", "1", "cg", "1", "bar", "1", "pdl", "2"], out
