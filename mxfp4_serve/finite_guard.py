"""Stop the engine, naming the layer, when an MXFP4 MoE layer computes a non-finite output (issue 26).

Without it a NaN/Inf that appears inside the model reaches the sampler, `LLM.generate` hands out NaN log-probs, and
vLLM's OpenAI server answers 400 "Out of range float values are not JSON compliant" (its JSON encoder's ValueError,
which vLLM maps to a client error) although the client did nothing wrong. The loaders refuse every scale byte that
decodes to Inf/NaN, so a non-finite output means something else overflowed: served in float16, large but valid
experts exceed 65504; a kernel bug; an upstream layer. The check raises `NonFiniteOutputError` in the worker: the
engine core stops with this message in its log and the server answers 500 (EngineDeadError) instead of 400, as
vLLM's own VLLM_RAISE_ON_LOGIT_NANS does for NaN logits, but naming the layer and whether its input was finite.

Cost (`MXFP4_RL_FINITE_GUARD`, common.envs): "auto" (default) checks tensors on the CPU, where one isfinite pass over
the [T, H] output is small next to the expert matmuls and there is no device to synchronise with; "1" also checks
CUDA layers run eagerly (one host sync per layer: a debugging switch); "0" never. Code being captured into a CUDA
graph is never checked (no host sync may happen there; a replay runs no Python), so the check cannot break graphs.
"""

from __future__ import annotations

import torch

from common import envs


class NonFiniteOutputError(RuntimeError):
    """A MoE layer's output holds NaN or Inf. A RuntimeError on purpose: vLLM's server maps ValueError (the codec's
    MXFP4Error) to HTTP 400, and this is the server's fault, never the client's."""


def _describe(layer_name: str, backend: str, x: torch.Tensor, out: torch.Tensor) -> str:
    bad = ~torch.isfinite(out)
    rows = bad.any(dim=-1).nonzero().flatten().tolist()
    nan, pinf, ninf = (int(v) for v in (torch.isnan(out).sum(), (out == float("inf")).sum(),
                                        (out == float("-inf")).sum()))
    x_bad = int((~torch.isfinite(x)).sum())
    if x_bad:
        cause = (f"its input already held {x_bad} non-finite value(s): the cause is upstream of this layer "
                 f"(attention, a norm or a dense layer)")
    else:
        finite = out[~bad].abs()
        top = f"; largest finite output magnitude {float(finite.max()):.4g}" if finite.numel() else ""
        cause = (f"its input was finite, so the expert weights or the backend overflowed {out.dtype} (largest "
                 f"finite value {torch.finfo(out.dtype).max:.6g}){top}")
    return (f"MoE layer '{layer_name}' (backend {backend}) computed a non-finite output: {int(bad.sum())} of "
            f"{out.numel()} values ({nan} NaN, {pinf} +Inf, {ninf} -Inf) in {len(rows)} of {out.shape[0]} token "
            f"row(s), first row {rows[0]}; {cause}. The engine stops rather than serve NaN/Inf log-probs "
            f"(MXFP4_RL_FINITE_GUARD=0 turns this check off)")


def _check(out: torch.Tensor, x: torch.Tensor, layer_name: str, backend: str) -> None:
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteOutputError(_describe(layer_name, backend, x, out))


# vLLM compiles the model unless --enforce-eager, and on the CPU it traces the MoE layer's forward (it calls its
# moe_forward directly instead of through the opaque custom op it uses on GPUs); the data-dependent `bool()` above
# would break its fullgraph trace, so under compilation the check runs as an opaque op of its own. A custom op may
# not return an alias of its input: the clone costs one [T, H] copy, in compiled CPU engines only.
@torch.library.custom_op("mxfp4_rl::finite_guard", mutates_args=())
def _finite_guard_op(out: torch.Tensor, x: torch.Tensor, layer_name: str, backend: str) -> torch.Tensor:
    _check(out, x, layer_name, backend)
    return out.clone()


@_finite_guard_op.register_fake
def _(out, x, layer_name, backend):
    return torch.empty_like(out)


def enabled_for(out: torch.Tensor) -> bool:
    """Whether this output is checked (see the module docstring for the three modes)."""
    mode = envs.FINITE_GUARD.get()
    if mode == "0":
        return False
    if out.device.type == "cuda":
        return mode == "1" and not torch.cuda.is_current_stream_capturing()
    return True


def checked(out: torch.Tensor, x: torch.Tensor, layer_name: str, backend: str) -> torch.Tensor:
    """`out`, or NonFiniteOutputError naming the layer when it holds NaN/Inf (where enabled)."""
    if not enabled_for(out):
        return out
    if torch.compiler.is_compiling():
        return _finite_guard_op(out, x, layer_name, backend)
    _check(out, x, layer_name, backend)
    return out
