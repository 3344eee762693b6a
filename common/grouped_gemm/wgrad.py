"""Per-expert full weight gradients of a grouped GEMM: dW_e = dy_e^T x_e over each expert's sorted rows (and the
bias gradient db_e = sum of dy_e's rows). Fake-QAT's straight-through backward (common/grouped_gemm/qat.py) sends
the gradient of the fake-quantized weight unchanged to its master, so this is the whole weight gradient.

Two implementations, one contract (bf16 operands, fp32 accumulation, one rounding into the output dtype):
- "torch": torch._grouped_mm in its 2d x 2d form (groups along the reduction axis; offsets = the groups' ends).
  Its output dtype must be its operands' (bf16), and it has no bias gradient: used for bf16 masters without bias.
  It runs on CUDA sm90 (cuBLAS/CUTLASS) and on CPU in torch 2.13; an expert without rows gets zeros on both.
- "triton": _wgrad_kernels._expert_wgrad_kernel, any output dtype (fp32 masters), the bias gradient fused.
"""

from __future__ import annotations

import torch
import triton

from ..errors import DTypeError, ShapeError
from ..kernels import interpreting
from ._wgrad_kernels import _expert_wgrad_kernel
from .configs import cdiv, rows_bucket

BACKENDS = ("auto", "torch", "triton")

# (BLOCK_P, BLOCK_Q, BLOCK_ROWS, warps, stages). Few rows per expert: the kernel writes E*P*Q outputs and reads
# little, so small row steps; many rows: 128x128 (or 128x256) output tiles over 64-row steps, the usual Hopper
# bf16 GEMM tiles. Not yet measured: bench/qat_step.py autotunes over them on the GPU.
_GPU_TILES = {
    "few": [(128, 128, 16, 4, 3), (128, 128, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3)],
    "many": [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
             (128, 128, 32, 4, 4)],
}
_FEW_ROWS = 32  # rows-per-expert bucket up to which the "few" tiles are tried
# Under the interpreter (~5 ms per program): few, large programs.
_INTERPRETER_TILE = (64, 64, 16)

_TUNED = None


def _tuned():
    """The autotuned kernel (GPU): keyed on the output sides and the rows-per-expert bucket, candidates pruned to
    that bucket's list."""
    global _TUNED
    if _TUNED is None:
        configs = {(*t,): triton.Config(dict(BLOCK_P=t[0], BLOCK_Q=t[1], BLOCK_ROWS=t[2]), num_warps=t[3],
                                        num_stages=t[4]) for kind in _GPU_TILES.values() for t in kind}

        def prune(cands, named_args, **kwargs):
            kind = "few" if named_args["ROWS_BUCKET"] <= _FEW_ROWS else "many"
            keep = {str(configs[tuple(t)]) for t in _GPU_TILES[kind]}
            return [c for c in cands if str(c) in keep]

        _TUNED = triton.autotune(configs=list(configs.values()), key=["P", "Q", "ROWS_BUCKET", "HAS_BIAS"],
                                 prune_configs_by={"early_config_prune": prune})(_expert_wgrad_kernel)
    return _TUNED


def _check(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, out_dtype: torch.dtype) -> int:
    for name, t in (("dy", a), ("x", b)):
        if t.dtype != torch.bfloat16:
            raise DTypeError(f"tensor '{name}': expected bfloat16 sorted rows (the GEMM's operands), got {t.dtype}")
        if t.dim() != 2 or t.shape[0] != a.shape[0]:
            raise ShapeError(f"tensor '{name}': expected [M={a.shape[0]}, ...] sorted rows, got {tuple(t.shape)}")
        if t.device != offsets.device:
            raise ValueError(f"tensor '{name}' is on {t.device} but 'expert_offsets' on {offsets.device}")
    if offsets.dtype != torch.int32 or offsets.dim() != 1 or offsets.numel() < 2:
        raise ShapeError(f"tensor 'expert_offsets': expected int32 [E+1], got {offsets.dtype} {tuple(offsets.shape)}")
    if not out_dtype.is_floating_point:
        raise DTypeError(f"expert weight gradient: out_dtype must be a float dtype (the master's), got {out_dtype}")
    return offsets.numel() - 1


def torch_available(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, bias: bool) -> bool:
    """Whether the "torch" backend can compute this call: torch._grouped_mm exists, writes bf16 only, has no bias
    gradient, and wants 16-byte row strides (P and Q multiples of 8 bf16 elements)."""
    return (hasattr(torch, "_grouped_mm") and out_dtype == torch.bfloat16 and not bias
            and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0 and (a.is_cuda or a.device.type == "cpu"))


def expert_wgrad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                 *, bias_dtype: torch.dtype | None = None, backend: str = "auto"
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dW [E, P, Q] in out_dtype, db [E, P] in bias_dtype or None): dW_e = dy_e^T x_e and db_e = the column sums of
    dy_e over expert e's sorted rows offsets[e]:offsets[e+1]; dy [M, P], x [M, Q] bf16. Zero for an expert without
    rows. bias_dtype: also compute db (the "triton" backend then runs). backend: "auto" picks "torch" where it can
    run (torch_available), else "triton" (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if backend not in BACKENDS:
        raise ValueError(f"expert_wgrad: unknown backend {backend!r}; choose one of {BACKENDS}")
    e = _check(dy, x, offsets, out_dtype)
    m, p, q = dy.shape[0], dy.shape[1], x.shape[1]
    has_bias = bias_dtype is not None
    use_torch = torch_available(dy, x, out_dtype, has_bias)
    if backend == "torch" and not use_torch:
        raise ValueError(f"expert_wgrad: the torch backend (torch._grouped_mm) cannot run out_dtype {out_dtype}, "
                         f"bias gradient {has_bias}, sides P={p}, Q={q} on {dy.device}; use backend 'triton'")
    use_torch = use_torch and backend != "triton"
    if m == 0:  # torch._grouped_mm rejects every stride of a zero-length reduction; the gradient is zero
        return (torch.zeros(e, p, q, dtype=out_dtype, device=dy.device),
                torch.zeros(e, p, dtype=bias_dtype, device=dy.device) if has_bias else None)
    dy, x = dy.contiguous(), x.contiguous()
    if use_torch:
        # dy.t() is column-major [P, M]: _grouped_mm's 2d x 2d form reduces over M in groups ending at offsets[1:]
        return torch._grouped_mm(dy.t(), x, offs=offsets[1:]), None
    if not dy.is_cuda and not interpreting():
        raise RuntimeError("expert_wgrad: the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 on CPU")
    out = torch.empty(e, p, q, dtype=out_dtype, device=dy.device)
    db = torch.empty(e, p, dtype=bias_dtype, device=dy.device) if has_bias else out
    args = [dy, x, offsets, out, db, p, q, dy.stride(0), x.stride(0), out.stride(0), out.stride(1),
            db.stride(0) if has_bias else 0, rows_bucket(m, e)]
    if interpreting():
        bp, bq, br = _INTERPRETER_TILE
        _expert_wgrad_kernel[(e * cdiv(p, bp) * cdiv(q, bq),)](*args, HAS_BIAS=has_bias, F32_DOT=True,
                                                               BLOCK_P=bp, BLOCK_Q=bq, BLOCK_ROWS=br)
    else:
        _tuned()[lambda meta: (e * cdiv(p, meta["BLOCK_P"]) * cdiv(q, meta["BLOCK_Q"]),)](
            *args, HAS_BIAS=has_bias, F32_DOT=False)
    return out, (db if has_bias else None)
