"""Public grouped MXFP4 GEMMs: validate, pick a tile configuration, launch (common/grouped_gemm/_kernels.py).

Inputs are expert-sorted rows x [M, K] (bf16) with expert_offsets int32 [E+1] (rows offsets[e]:offsets[e+1]
belong to expert e; offsets[0] = 0, offsets[E] = M) and one projection of every expert in the canonical packed
layout: codes uint8 [E, N, K/2], scales uint8 [E, N, K/32] (what common.quantize returns for a [E, N, K] weight).
The weight tiles are dequantized in registers inside the K loop; nothing but the output is written.
"""

from __future__ import annotations

import functools

import torch
import triton

from .. import envs
from ..errors import DTypeError, ShapeError
from ..kernels import fast_launch, interpreting, pdl
from ..tensor import check_packed
from . import activations as A
from ._kernels import _grouped_dx_kernel as _dx_jit
from ._kernels import _grouped_fwd_kernel as _fwd_jit
from .configs import (GATED_WORDS_MAX_BUCKET, INTERPRETER_CONFIG, TileConfig, all_candidates, candidates, cdiv,
                      next_pow2, padded_rank, rows_bucket)
from .counters import tile_counters
from .interleave import ORDERS, check_order, reorder_k
from .layout import BLOCK_BYTES, is_kb_major

# Both kernels tile their K argument by BLOCK_K (the reduction of the forward, the output columns of the dx); when
# the tiles divide it, the weight loads drop their per-column mask and vectorize (_launch sets EVEN_K; under the
# autotuner this heuristic does).
_EVEN_K = {"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0}

LowRank = tuple[torch.Tensor, torch.Tensor]  # (h [M, R] already scaled, per-expert factor); see each op


def _check_device(t: torch.Tensor, what: str) -> None:
    if not t.is_cuda and not interpreting():
        raise RuntimeError(f"{what}: the grouped MXFP4 GEMM needs CUDA tensors (got {t.device}); on CPU set "
                           "TRITON_INTERPRET=1 before importing triton, or use common.grouped_gemm.reference")


def check_offsets(offsets: torch.Tensor, experts: int, rows: int, name: str = "expert_offsets") -> None:
    """offsets must be int32 [E+1], start at 0, never decrease and end at M (values checked with a host copy)."""
    if offsets.dtype != torch.int32 or offsets.dim() != 1 or offsets.numel() != experts + 1:
        raise ShapeError(f"tensor '{name}': expected int32 [{experts + 1}] (experts + 1), got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")
    o = offsets.cpu()
    if int(o[0]) != 0 or int(o[-1]) != rows or bool((o[1:] < o[:-1]).any()):
        raise ShapeError(f"tensor '{name}': must start at 0, never decrease and end at the row count {rows}; got "
                         f"{o.tolist()[:8]}{'...' if o.numel() > 8 else ''} (last {int(o[-1])})")


def weight_dims(codes: torch.Tensor, scales: torch.Tensor, kb_major_ok: bool = True) -> tuple[int, int, int]:
    """(E, N, K) of a packed expert weight: canonical codes [E, N, K/2], or kb-major [E, K/32, N, 16] (layout.py,
    the forward GEMMs only: kb_major_ok), with scales [E, N, K/32] either way."""
    if is_kb_major(codes):
        if not kb_major_ok:
            raise ShapeError(f"tensor 'weight': kb-major codes {tuple(codes.shape)} reach the forward GEMMs only; "
                             "this op reads the canonical layout [E, N, K/2] (common.grouped_gemm.layout."
                             "from_kb_major)")
        if codes.shape[3] != BLOCK_BYTES:
            raise ShapeError(f"tensor 'weight': kb-major codes must be [E, K/32, N, {BLOCK_BYTES}], got "
                             f"{tuple(codes.shape)}")
        e, kb, n, _ = codes.shape
        for label, t in (("codes", codes), ("scales", scales)):
            if t.dtype != torch.uint8:
                raise DTypeError(f"tensor 'weight': {label} must be uint8, got {t.dtype}")
        if scales.shape != (e, n, kb):
            raise ShapeError(f"tensor 'weight': kb-major codes {tuple(codes.shape)} need scales [E, N, K/32] = "
                             f"{[e, n, kb]}, got {tuple(scales.shape)}")
        return e, n, kb * 32
    check_packed(codes, scales, "weight")
    if codes.dim() != 3:
        raise ShapeError(f"tensor 'weight': codes must be [E, N, K/2] (or kb-major [E, K/32, N, 16]), got "
                         f"{tuple(codes.shape)}")
    return codes.shape[0], codes.shape[1], codes.shape[2] * 2


def _check(x: torch.Tensor, offsets: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, x_name: str,
           reduce_dim: int, validate: bool | None, rows: int | None = None) -> None:
    """Shapes/dtypes of one grouped GEMM; reduce_dim is x's column count the weight must match, rows the sorted
    row count (x's rows unless the rows are gathered)."""
    weight_dims(codes, scales)
    if x.dtype != torch.bfloat16:
        raise DTypeError(f"tensor '{x_name}': expected bfloat16 (the MMA runs bf16 x bf16), got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != reduce_dim:
        raise ShapeError(f"tensor '{x_name}': expected [M, {reduce_dim}], got {tuple(x.shape)}")
    for t, n in ((offsets, "expert_offsets"), (codes, "codes"), (scales, "scales")):
        if t.device != x.device:
            raise ValueError(f"tensor '{n}' is on {t.device} but '{x_name}' on {x.device}")
    _check_device(x, x_name)
    if validate is None:
        validate = not x.is_cuda  # a host sync would stall (and break CUDA-graph capture of) the GPU path
    if validate:
        check_offsets(offsets, codes.shape[0], x.shape[0] if rows is None else rows)
    elif offsets.dtype != torch.int32 or offsets.shape != (codes.shape[0] + 1,):
        raise ShapeError(f"tensor 'expert_offsets': expected int32 [{codes.shape[0] + 1}], got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")


def _pad_rank(lora: LowRank | None, factor_rank_dim: int, rows: int, name: str) -> tuple[torch.Tensor, ...]:
    """(h, w, R) with R padded to a power of two >= 16 (the MMA's minimum K) by zero columns; (dummy) if None."""
    if lora is None:
        return None, None, 0
    h, w = lora
    r = h.shape[1]
    if h.dim() != 2 or h.shape[0] != rows or w.dim() != 3 or w.shape[factor_rank_dim] != r:
        raise ShapeError(f"lora '{name}': h must be [M={rows}, R] and the factor's rank dim {factor_rank_dim} must "
                         f"match R; got h {tuple(h.shape)}, factor {tuple(w.shape)}")
    rp = padded_rank(r)
    h = h.to(torch.bfloat16)
    w = w.to(torch.bfloat16)
    if rp != r:
        h = torch.nn.functional.pad(h, (0, rp - r))
        pad = [0, 0] * (w.dim() - 1 - factor_rank_dim) + [0, rp - r]
        w = torch.nn.functional.pad(w, pad)
    return h.contiguous(), w.contiguous(), rp


_TUNED: dict[str, object] = {}
_FROM: dict[tuple, TileConfig] = {}  # _fields(triton.Config) -> the TileConfig it was built from


def _to_triton(cfg: TileConfig) -> "triton.Config":
    return triton.Config(cfg.meta(), num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.max_regs)


def _fields(cfg: "triton.Config") -> tuple:
    return (*sorted(cfg.kwargs.items()), cfg.num_warps, cfg.num_stages, getattr(cfg, "maxnreg", None))


def _tuned(kind: str, kernel):
    """The autotuned wrapper of a raw kernel: candidates pruned to the call's rows-per-expert bucket."""
    if kind not in _TUNED:
        def prune(configs, named_args, **kwargs):
            keep = {_to_triton(c).__str__() for c in candidates(kind, named_args["ROWS_BUCKET"])}
            return [c for c in configs if c.__str__() in keep]

        built = [(_to_triton(c), c) for c in all_candidates(kind)]
        _FROM.update((_fields(t), c) for t, c in built)
        _TUNED[kind] = triton.autotune(configs=[t for t, _ in built],
                                       key=["N", "K", "ROWS_BUCKET", "ACT", "LORA_R", "NEXT_R"],
                                       prune_configs_by={"early_config_prune": prune})(
                                           triton.heuristics(_EVEN_K)(kernel))
    return _TUNED[kind]


DECODES = {"bits": 1, "bf16x2": 2}  # the DECODE constexprs of _tiles.py


@functools.lru_cache(maxsize=None)
def _bf16x2_capable() -> bool:
    """mul.rn.bf16x2 is sm_90 PTX: Hopper and newer. Cached: decode_mode() runs on every launch."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def decode_mode() -> str:
    """The weight-tile decode of common/grouped_gemm/_tiles.py, chosen by the device, not by the user: "bf16x2"
    (bit placement in packed bf16x2 PTX) on sm_90+, "bits" (the same bit placement in fp32) under the interpreter,
    which cannot run inline PTX, and on older GPUs. Both are exact (the tests compare each with common.dequantize
    bit for bit); bf16x2 is the faster one where it runs (bench/RESULTS.md)."""
    return "bf16x2" if not interpreting() and _bf16x2_capable() else "bits"


def _decode() -> int:
    return DECODES[decode_mode()]


# The one-multiply word decode folds 2^126 into the scale factor 2^(s - 127): finite in bf16 for scale bytes s <= 128
# only (byte 128 = 2^1, weight blocks with |w| < 16), the bound a caller's max_scale_byte must meet.
ONE_MUL_MAX_SCALE_BYTE = 128

# The word decode pays at few rows per expert (measured on an H100: 9-11% faster GEMMs at dsv4 16/128 tokens);
# at large batches the byte decode was faster (dsv4 4096 tokens: 4.55 vs 5.64 ms), so it stops at this bucket,
# per kind: at dsv4 1024 tokens (192 rows per expert) the gated GEMM's best word tile beat its best byte tile by
# 11% (0.647 vs 0.726 ms) and the down GEMM's lost by 13% (bench/RESULTS.md, eighth round).
WORDS_MAX_BUCKET = {"fwd": 64, "gated": GATED_WORDS_MAX_BUCKET}


def _use_words(codes: torch.Tensor, config: TileConfig | None, bucket: int, kind: str = "fwd") -> bool:
    """Whether a forward GEMM decodes words (its own K order, interleave.py) rather than bytes. The word decode
    needs 16-byte aligned code rows (K is a multiple of 32, so only the base can be off). Kb-major codes are read by
    the word decode only (their words scatter each element's bits, layout.py): at every batch size, and a buffer
    that rules it out is an error rather than a silent byte decode of the wrong bits. Canonical codes: words with
    an explicit config and under the interpreter's fixed tile, else up to WORDS_MAX_BUCKET (measured)."""
    misaligned = codes.data_ptr() % 16
    if is_kb_major(codes):
        if misaligned:
            raise ValueError(f"kb-major codes are read by the word decode only, which a code base address "
                             f"{codes.data_ptr()} not 16-byte aligned rules out; convert them back with "
                             "common.grouped_gemm.layout.from_kb_major or pass a 16-byte aligned buffer")
        return True
    if misaligned:
        return False
    if config is not None or interpreting():
        return True
    return bucket <= WORDS_MAX_BUCKET[kind]


def _x_order(words: bool, kb_major: bool) -> str:
    """The column order a forward GEMM reduces x in: the word decode shuffles each block (interleave.py); kb-major
    codes (always read by the word decode) store each block pre-shuffled (layout.py), and the two cancel."""
    return "interleaved" if words and not kb_major else "natural"


def reduction_order(codes: torch.Tensor, rows: int) -> str:
    """The column order (interleave.ORDERS) in which an autotuned forward GEMM over `rows` sorted rows of these
    packed weights reads its x: lets a caller chaining two GEMMs (mlp.py) have the first write the intermediate
    activation in the order the second consumes (out_order), so that no copy reorders it."""
    return _x_order(_use_words(codes, None, rows_bucket(rows, codes.shape[0])), is_kb_major(codes))


def autotune_enabled() -> bool:
    """envs.GG_AUTOTUNE (MXFP4_GG_AUTOTUNE=0) replaces the autotuner by the first candidate of the bucket (fast
    start, tests)."""
    return envs.GG_AUTOTUNE.get()


# The tile the autotuner picked for a call signature: later calls with that signature launch it directly. The
# autotuner's and the heuristics' per-call Python cost about 30 us of host time per launch, on top of the JIT
# launcher's (bench/RESULTS.md, eighth round), and a decode-size learner step is bound by host time when eager.
_PICKED: dict[tuple, TileConfig] = {}


def _signature(kind: str, grid_n: int, k: int, e: int, bucket: int, args: list, kw: dict) -> tuple:
    """What the best tile depends on: the autotuner's key (sizes but the row count, which it buckets, and the
    tensors' dtypes) and the flags, so that a call the autotuner would tune anew is not served a stale pick. Not
    the launch's PDL mode (pdl.py), which changes no tile's work."""
    flags = (item for item in kw.items() if item[0] not in ("PDL", "launch_pdl"))
    return (kind, grid_n, k, e, bucket, *flags, *(a.dtype for a in args if isinstance(a, torch.Tensor)))


def _launch(kind: str, kernel, grid_n: int, m: int, e: int, k: int, config: TileConfig | None, args: list,
            kw: dict):
    """Launch with an explicit config, the interpreter's fixed config, a config picked before, or the autotuner
    (GPU default). kernel is the raw @triton.jit function; k its K argument (the EVEN_K heuristic's)."""
    bucket = rows_bucket(m, e)
    signature = None
    interp = interpreting()
    if config is None and interp:
        config = INTERPRETER_CONFIG
    elif config is None and not autotune_enabled():
        config = candidates(kind, bucket)[0]
    elif config is None:
        signature = _signature(kind, grid_n, k, e, bucket, args, kw)
        config = _PICKED.get(signature)
    tile = "BLOCK_N" if kind != "dx" else "BLOCK_K"
    if config is None:
        tuned = _tuned(kind, kernel)
        tuned[lambda meta: (cdiv(m, meta["BLOCK_M"]) + e, cdiv(grid_n, meta[tile]))](*args, **kw)
        _PICKED[signature] = _FROM[_fields(tuned.best_config)]
        return
    grid = (cdiv(m, config.block_m) + e, cdiv(grid_n, config.block_n if kind != "dx" else config.block_k))
    regs = {} if config.max_regs is None or interp else {"maxnreg": config.max_regs}
    fast_launch.launch(kernel, grid, *args, **kw, **config.meta(), EVEN_K=k % config.block_k == 0,
                       num_warps=config.num_warps, num_stages=config.num_stages, **regs)


def _e_pow2(e: int) -> int:
    return max(2, next_pow2(e))


def _check_rows(t: torch.Tensor | None, rows: int, name: str, device: torch.device) -> None:
    if t is None:
        return
    if t.dtype not in (torch.int32, torch.int64) or t.shape != (rows,) or t.device != device:
        raise ShapeError(f"tensor '{name}': expected int32/int64 [{rows}] on {device}, got {t.dtype} "
                         f"{tuple(t.shape)} on {t.device}")


@functools.lru_cache(maxsize=256)
def _project_sizes(kind: str, config: TileConfig | None, interp: bool, m: int, e: int, n: int, r: int
                   ) -> tuple[int, int]:
    """(fp32 partials, row tiles) of a fused next projection (_project_output in _kernels.py), enough for every
    tile the launch may run with: the explicit or interpreter tile, else any candidate of the bucket (the
    autotuner's pick is one of them). Cached: an eager decode step asks on every launch."""
    tiles = [config] if config is not None else [INTERPRETER_CONFIG] if interp else candidates(kind, rows_bucket(m, e))
    parts = max((cdiv(m, c.block_m) + e) * cdiv(n, c.block_n) * c.block_m * r for c in tiles)
    return parts, max(cdiv(m, c.block_m) + e for c in tiles)


def _project_buffers(kind: str, config: TileConfig | None, m: int, e: int, n: int, r: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    parts, row_tiles = _project_sizes(kind, config, interpreting(), m, e, n, r)
    return torch.empty(parts, dtype=torch.float32, device=device), tile_counters(device, row_tiles)


def _check_project(project, e: int, n: int, device: torch.device, scatter: bool):
    """(factor bf16 [E, R, n], R, scaling) of a fused next projection, R a power of two >= 16."""
    factor, scaling = project
    if scatter:
        raise ValueError("grouped_mm_mxfp4: project= fuses the next GEMM's projection of a sorted output; it "
                         "cannot go with scatter_rows")
    if factor.dim() != 3 or factor.shape[0] != e or factor.shape[2] != n or factor.device != device:
        raise ShapeError(f"tensor 'project factor': expected [E={e}, R, {n}] on {device}, got "
                         f"{tuple(factor.shape)} on {factor.device}")
    r = factor.shape[1]
    if factor.dtype != torch.bfloat16 or r != padded_rank(r) or factor.stride(2) != 1:
        raise ShapeError(f"tensor 'project factor': expected bfloat16 with unit column stride and a rank padded to "
                         f"a power of two >= 16 (configs.padded_rank), got {factor.dtype} rank {r} strides "
                         f"{factor.stride()}")
    return factor, r, float(scaling)


def _fwd(x, offsets, codes, scales, *, activation: str | None, bias, lora, save_pre, out_dtype, config, validate,
         gather_rows=None, scatter_rows=None, row_weights=None, x_order="natural", out_order="natural",
         max_scale_byte=None, gate_up="halves", limit: float | None = None, project=None):
    act, alpha, limit = A.kernel_constants(activation, limit)
    kind = "gated" if act else "fwd"
    e, n_rows, k = weight_dims(codes, scales)
    kb_major = is_kb_major(codes)
    m = x.shape[0] if gather_rows is None else gather_rows.shape[0]
    _check(x, offsets, codes, scales, "x", k, validate, rows=m)
    _check_rows(gather_rows, m, "gather_rows", x.device)
    _check_rows(scatter_rows, m, "scatter_rows", x.device)
    if (scatter_rows is None) != (row_weights is None):
        raise ValueError("grouped_mm_mxfp4: give scatter_rows and row_weights together, or neither")
    if row_weights is not None and (row_weights.shape != (m,) or not row_weights.is_floating_point()
                                    or row_weights.device != x.device):
        raise ShapeError(f"tensor 'row_weights': expected a float [{m}] on {x.device}, got {row_weights.dtype} "
                         f"{tuple(row_weights.shape)} on {row_weights.device}")
    pairs = A.check_gate_up(gate_up)
    n = n_rows // 2 if act else n_rows
    if act and n_rows % 2:
        raise ShapeError(f"tensor 'w13': a gated weight needs an even row count (gate and up rows), got {n_rows}")
    if bias is not None and bias.shape != (e, n_rows):
        raise ShapeError(f"tensor 'bias': expected [{e}, {n_rows}], got {tuple(bias.shape)}")
    codes, scales = codes.contiguous(), scales.contiguous()
    out_dtype = out_dtype or x.dtype
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    pre = torch.empty(m, 2 * n, dtype=x.dtype, device=x.device) if (act and save_pre) else None
    lh, lw, r = _pad_rank(lora, 2, m, "B")
    if lw is not None and lw.shape[:2] != (e, n_rows):
        raise ShapeError(f"lora 'B': expected [{e}, {n_rows}, R], got {tuple(lw.shape)}")
    check_order(x_order, "x_order")
    check_order(out_order, "out_order")
    if out_order != "natural" and n % 32:
        raise ShapeError(f"out_order={out_order!r} needs an output width that is a multiple of 32, got {n}")
    nf, nr, ns = _check_project(project, e, n, x.device, scatter_rows is not None) if project else (None, 0, 0.0)
    h = torch.empty(m, nr, dtype=torch.bfloat16, device=x.device) if nr else None
    if m == 0:
        return y, pre, h
    words = _use_words(codes, config, rows_bucket(m, e), kind)
    x = reorder_k(x, x_order, _x_order(words, kb_major)).contiguous()
    decode = _decode()
    one_mul = bool(words and decode == DECODES["bf16x2"] and max_scale_byte is not None
                   and max_scale_byte <= ONE_MUL_MAX_SCALE_BYTE)
    if words:
        codes = codes.view(torch.int32)  # [E, N, K/8] (kb-major [E, K/32, N, 4]) words: strides below in words
    dummy = y
    # unused pointer arguments get any tensor of the call (their loads are compiled out)
    args = [x, codes, scales, offsets, bias if bias is not None else dummy, lh if r else dummy,
            lw if r else dummy, y, pre if pre is not None else dummy,
            gather_rows if gather_rows is not None else offsets, scatter_rows if scatter_rows is not None else offsets,
            row_weights.contiguous() if row_weights is not None else dummy,
            m, n, k, e, rows_bucket(m, e),
            x.stride(0), codes.stride(0), codes.stride(1), scales.stride(0), scales.stride(1),
            bias.stride(0) if bias is not None else 0, lh.stride(0) if r else 0, lw.stride(0) if r else 0,
            lw.stride(1) if r else 0, y.stride(0), pre.stride(0) if pre is not None else 0]
    parts, counts = _project_buffers(kind, config, m, e, n, nr, x.device) if nr else (dummy, offsets)
    args += [nf if nr else dummy, parts, counts, h if nr else dummy, ns, nf.stride(0) if nr else 0,
             nf.stride(1) if nr else 0, h.stride(0) if nr else 0]
    kw = dict(ACT=act, ALPHA=alpha, LIMIT=limit, HAS_BIAS=bias is not None, LORA_R=r,
              SAVE_PRE=pre is not None, GATHER=gather_rows is not None, SCATTER=scatter_rows is not None,
              E_POW2=_e_pow2(e), F32_DOT=interpreting(), DECODE=decode, WORDS=words, ONE_MUL=one_mul,
              OUT_ORDER=ORDERS.index(out_order), KB_MAJOR=kb_major, GATE_UP_PAIRS=bool(act) and pairs,
              NEXT_R=nr, NEXT_N=next_pow2(n), **pdl.launch_options(pdl.mode(x)))
    _launch(kind, _fwd_jit, n, m, e, k, config, args, kw)
    return y, pre, h


def grouped_mm_mxfp4(x: torch.Tensor, expert_offsets: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, *,
                     out_dtype: torch.dtype | None = None, bias: torch.Tensor | None = None,
                     lora: LowRank | None = None, scatter_rows: torch.Tensor | None = None,
                     row_weights: torch.Tensor | None = None, x_order: str = "natural",
                     max_scale_byte: int | None = None, config: TileConfig | None = None,
                     validate: bool | None = None) -> torch.Tensor:
    """y [M, N] = x_e @ W_e^T (+ bias[e]) (+ lora_h @ B_e^T) for each expert's rows.

    codes [E, N, K/2], scales [E, N, K/32]; bias [E, N]; lora = (h [M, R] = scaling * x_e @ A_e^T, B [E, N, R]).
    With scatter_rows [M] (a permutation of 0..M-1) and row_weights [M], sorted row r is written to
    y[scatter_rows[r]] multiplied by row_weights[scatter_rows[r]] (the MoE un-permutation with the router weight;
    rows no sorted row maps to are left uninitialised).
    x_order: the column order x is given in (interleave.ORDERS; e.g. the gated GEMM's out_order output): the op
    reorders it, by a copy, unless it is already the order this call reduces in (reduction_order).
    max_scale_byte: an upper bound of the weight's scale bytes, if the caller knows one; <= 128 lets the bf16x2
    word decode apply scale and bias with one multiply (a wrong bound gives wrong results: only pass one that
    holds for the bytes this call reads).
    validate (default: on for CPU tensors, off for CUDA, whose check would sync) checks the offsets' values.
    """
    return _fwd(x, expert_offsets, codes, scales, activation=None, bias=bias, lora=lora, save_pre=False,
                out_dtype=out_dtype, config=config, validate=validate, scatter_rows=scatter_rows,
                row_weights=row_weights, x_order=x_order, max_scale_byte=max_scale_byte)[0]


def grouped_mm_mxfp4_gated(x: torch.Tensor, expert_offsets: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                           *, activation: str, bias: torch.Tensor | None = None, lora: LowRank | None = None,
                           save_pre: bool = False, out_dtype: torch.dtype | None = None,
                           gather_rows: torch.Tensor | None = None, x_order: str = "natural",
                           out_order: str = "natural", max_scale_byte: int | None = None,
                           gate_up: str = "halves", limit: float | None = None,
                           project: tuple[torch.Tensor, float] | None = None, config: TileConfig | None = None,
                           validate: bool | None = None) -> tuple[torch.Tensor, ...]:
    """First MoE GEMM with the gated activation in the epilogue: (act(pre) [M, I], pre [M, 2I] or None).

    codes [E, 2I, K/2] / scales [E, 2I, K/32] are w13 = [gate; up] (vLLM's order); pre = x_e @ W13_e^T
    (+ bias [E, 2I]) (+ lora_h @ B_e^T with B [E, 2I, R]) is returned in x's dtype when save_pre (the backward
    needs it); activation is "silu" (silu(gate) * up), "swiglu_oai" (gpt-oss clamp-swiglu) or "silu_clamp"
    (DeepSeek-V4: silu with gate / up clamped at `limit`, the model's swiglu_limit, which only it takes).
    With gather_rows [M], x is the unsorted [T, K] and sorted row r reads x[gather_rows[r]] (the MoE permutation
    fused into the loads); the outputs have M rows.
    out_order writes act(pre) in that column order (interleave.ORDERS; pre stays in the natural order), ready for
    grouped_mm_mxfp4(..., x_order=out_order). x_order, max_scale_byte: as grouped_mm_mxfp4.
    gate_up "interleaved": w13's rows are gpt-oss's (gate, up) pairs (row 2i gate i, row 2i + 1 up i), and bias,
    the LoRA B rows and pre's columns follow that order (activations.GATE_UP_LAYOUTS).
    project = (A [E, R, I] bf16, scaling) also returns h = scaling * act_e @ A_e^T [M, R] bf16, the down GEMM's LoRA
    down-projection, computed in this kernel's epilogue from the output tiles as stored (one launch and one read
    of act fewer than lora.project): (act, pre, h). A's columns are in out_order (lora.factor_in_order), its rank
    padded to a power of two >= 16 (configs.padded_rank). Each output tile's fp32 partial is added in tile order
    (deterministic; the bits depend on the tile, as lora.project's on split_k).
    """
    out = _fwd(x, expert_offsets, codes, scales, activation=activation, bias=bias, lora=lora,
               save_pre=save_pre, out_dtype=out_dtype, config=config, validate=validate, gather_rows=gather_rows,
               x_order=x_order, out_order=out_order, max_scale_byte=max_scale_byte, gate_up=gate_up, limit=limit,
               project=project)
    return out if project is not None else out[:2]


def grouped_mm_mxfp4_dx(dy: torch.Tensor, expert_offsets: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                        *, lora: LowRank | None = None, pre: torch.Tensor | None = None,
                        activation: str | None = None, out_dtype: torch.dtype | None = None,
                        gate_up: str = "halves", limit: float | None = None, config: TileConfig | None = None,
                        validate: bool | None = None) -> torch.Tensor:
    """dx [M, K] = dy_e @ W_e (+ lora_h @ A_e) from the same packed W [E, N, K/2] the forward used.

    lora = (h [M, R] = scaling * dy_e @ B_e, A [E, R, K]). With activation and pre [M, 2K] (the saved
    pre-activation of the gated GEMM) the result is instead d pre [M, 2K] = the activation's backward applied
    to dx, i.e. the gradient to feed the first GEMM's own dx. gate_up: the column layout of pre and d pre
    (that of the gated GEMM's w13, see grouped_mm_mxfp4_gated); limit: silu_clamp's, as in the forward.
    """
    pairs = A.check_gate_up(gate_up)
    e, n, k = weight_dims(codes, scales, kb_major_ok=False)
    _check(dy, expert_offsets, codes, scales, "dy", n, validate)
    act, alpha, limit = A.kernel_constants(activation, limit)
    m = dy.shape[0]
    if act and (pre is None or pre.shape != (m, 2 * k) or pre.dtype != dy.dtype):
        raise ShapeError(f"tensor 'pre': the activation backward needs the saved pre-activation [{m}, {2 * k}] "
                         f"{dy.dtype}, got {None if pre is None else (tuple(pre.shape), pre.dtype)}")
    dx = torch.empty(m, 2 * k if act else k, dtype=out_dtype or dy.dtype, device=dy.device)
    lh, lw, r = _pad_rank(lora, 1, m, "A")
    if lw is not None and (lw.shape[0], lw.shape[2]) != (e, k):
        raise ShapeError(f"lora 'A': expected [{e}, R, {k}], got {tuple(lw.shape)}")
    if m == 0:
        return dx
    dy, codes, scales = dy.contiguous(), codes.contiguous(), scales.contiguous()
    pre = pre.contiguous() if act else None
    args = [dy, codes, scales, expert_offsets, lh if r else dx, lw if r else dx, pre if act else dx, dx,
            m, n, k, e, rows_bucket(m, e),
            dy.stride(0), codes.stride(0), codes.stride(1), scales.stride(0), scales.stride(1),
            lh.stride(0) if r else 0, lw.stride(0) if r else 0, lw.stride(1) if r else 0,
            pre.stride(0) if act else 0, dx.stride(0)]
    kw = dict(ACT=act, ALPHA=alpha, LIMIT=limit, LORA_R=r, E_POW2=_e_pow2(e),
              F32_DOT=interpreting(), DECODE=_decode(), GATE_UP_PAIRS=bool(act) and pairs)
    _launch("dx", _dx_jit, k, m, e, k, config, args, kw)
    return dx
