"""common.grouped_gemm.combine.sum_slots: the MoE layer's per-token sum of its k expert rows.

On CPU the kernel runs under TRITON_INTERPRET=1 (set before triton is imported); with CUDA it runs natively.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common.errors import DTypeError, ShapeError  # noqa: E402
from common.grouped_gemm import combine  # noqa: E402
from common.grouped_gemm.combine import BLOCK_H, sum_slots  # noqa: E402
from common.kernels import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def _slot_order_sum(y: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The contract, spelled out: fp32, slot 0 first, one rounding at the end."""
    v = y.float().view(-1, k, y.shape[1])
    acc = torch.zeros_like(v[:, 0])
    for j in range(k):
        acc = acc + v[:, j]
    return acc.to(dtype)


@pytest.mark.parametrize("k", [1, 4, 6])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sum_slots_is_the_slot_order_fp32_sum(k, dtype):
    """Bit for bit against the fp32 slot-order sum, with adversarial rows: ties of bf16 rounding (halfway
    sums), cancellation to zero and -0, subnormals, the largest bf16, +-inf and NaN; H not a multiple of the
    program's column block (masked tail) and more than one column block. The fp32 output is the accumulation
    itself; the bf16 output adds one round-to-nearest-even."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    t, h = 5, BLOCK_H + 40
    y = (torch.randn(t * k, h, generator=g) * 3).to(dtype)
    big = torch.finfo(torch.bfloat16).max
    specials = [1.0, 2**-8, 0.0, -0.0, 2**-130, big, float("inf"), float("-inf"), float("nan")]
    if interpreting() and dtype == torch.bfloat16:
        # Triton's interpreter flushes bf16 subnormals to zero when it loads them (a GPU does not: this case runs
        # natively on the lent GPU); fp32 subnormals pass through it
        specials.remove(2**-130)
    specials = torch.tensor(specials)
    pick = torch.randint(0, specials.numel(), (t * k, specials.numel()), generator=g)
    y[:, :specials.numel()] = specials[pick].to(dtype)
    if k > 1:  # x + (-x) = +0 and 1 + 2^-8: a bf16 halfway case rounded once, at the end
        y[k:2 * k, 20] = torch.tensor([1.0, -1.0] + [0.0] * (k - 2)).to(dtype)
        y[2 * k:3 * k, 21] = torch.tensor([1.0, 2**-9, 2**-9] + [0.0] * (k - 3) if k >= 3 else [1.0, 2**-8]).to(dtype)
    want32 = _slot_order_sum(y, k, torch.float32)
    _assert_same_bits(sum_slots(y.to(DEVICE), k, torch.float32).cpu(), want32)
    got = sum_slots(y.to(DEVICE), k).cpu()
    assert got.dtype == dtype and got.shape == (t, h)
    if interpreting() and dtype == torch.bfloat16:
        return  # the interpreter's fp32 -> bf16 cast truncates; a GPU rounds to nearest even (checked natively)
    _assert_same_bits(got, want32.to(dtype))


def _assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal bit patterns (the sign of zero included); NaN where the reference has NaN, any payload."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    ints = torch.int16 if want.dtype == torch.bfloat16 else torch.int32
    assert torch.equal(got.view(ints)[~nan], want.view(ints)[~nan])


def test_sum_slots_errors_and_empty(monkeypatch):
    with pytest.raises(ShapeError, match=r"tensor 'y': expected \[T \* k, H\] with k = 4, got \(6, 8\)"):
        sum_slots(torch.zeros(6, 8, device=DEVICE), 4)
    with pytest.raises(DTypeError, match="tensor 'y': expected a float dtype, got torch.int32"):
        sum_slots(torch.zeros(4, 8, dtype=torch.int32, device=DEVICE), 2)
    assert sum_slots(torch.zeros(0, 8, device=DEVICE), 2).shape == (0, 8)
    monkeypatch.setattr(combine, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match=r"sum_slots needs a CUDA tensor \(got cpu\)"):
        combine.sum_slots(torch.zeros(4, 8), 2)
