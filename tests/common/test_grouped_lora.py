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
