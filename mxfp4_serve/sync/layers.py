"""The MoE layers a running engine serves with mxfp4_rl, seen as canonical packed weights that a sync may rewrite.

A layer is found by the `mxfp4_rl_loader` attribute our MoE method sets in create_weights; its ExpertWeightLoader
knows the geometry (TP rank, local experts) and the parameters. Reads and writes go through the backend's
`read_canonical` / `write_experts`, which translate through the layout recorded on the layer (common.moe.layouts;
a backend may refuse values it cannot serve before anything is written). Writes are in place per expert (never
`.data =` or `resize_`): storage and shape stay, so captured CUDA graphs and vLLM's layerwise reload stay valid.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from common import moe
from common.audit import block_lin, dense_hash, hash_of_lanes, mxfp4_lanes, same_bytes
from common.constants import BLOCK_SIZE
from common.moe import params as P
from common.moe.wire import lora_entry_name, shard_key
from common.tensor import MXFP4Tensor

from .. import expert_lora
from ..backends.base import MoEBackend
from ..loader import ExpertWeightLoader

WEIGHTS = moe.PACKED_WEIGHTS  # each paired with its scale_name()

# Where single blocks (a block delta's stage and commit) go through Triton kernels (common.kernels.delta_stage,
# block_write) instead of torch operations: "auto" (CUDA parameters), "always" (also under TRITON_INTERPRET=1 on a
# CPU: the tests), "never"
BLOCK_KERNELS = "auto"


@dataclasses.dataclass
class SyncedLayer:
    """One MoE layer of this rank: its loader (geometry, params), its backend and profile."""

    module: nn.Module
    loader: ExpertWeightLoader
    backend: MoEBackend | None
    # weight -> ((layer generation, loader writes), hash, fingerprint lanes): what hash() last read back. Every
    # writer of the layer's bytes in this codebase moves that key (common.moe.layouts.bump_generation, the loader's
    # count), so a cached hash is the served bytes' until the next write; `fresh` reads them again regardless (the
    # audit RPC does).
    _hashes: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.loader.geometry.layer_name

    @property
    def profile(self) -> str:
        return self.loader.settings.profile

    @property
    def has_lora(self) -> bool:
        return expert_lora.config_of(self.module) is not None

    def extra_weights(self) -> dict[str, tuple[str, str]]:
        """{entry suffix: (kind, packed weight)} of what a sync may carry besides the packed weights: the expert
        biases (gpt-oss) and the unmerged expert adapters (engine with expert_lora)."""
        out = {}
        if self.loader.has_bias:
            out.update({P.BIAS_OF[w]: ("bias", w) for w in WEIGHTS})
        if self.has_lora:
            out.update({lora_entry_name(w): ("lora", w) for w in WEIGHTS})
        return out

    # ---- shard geometry ---------------------------------------------------------------------------------------------
    def full_shape(self, weight: str) -> tuple[int, int, int]:
        """Logical shape [E_global, N, K] of the whole (all ranks) weight."""
        g = self.loader.geometry
        return (g.num_experts, 2 * g.intermediate, g.hidden) if weight == moe.params.W13 else \
            (g.num_experts, g.hidden, g.intermediate)

    def descriptor(self, weight: str) -> dict | None:
        """Which part of the full weight this rank holds: global experts, row ranges, [first, last) block; None for
        the whole tensor. w13 under TP: rows [r*i, (r+1)*i) of the gate half and of the up half; w2: blocks of K."""
        g = self.loader.geometry
        experts = [int(e) for e in self.loader.local_to_global]
        if g.tp_size == 1 and experts == list(range(g.num_experts)):
            return None
        i, r = g.intermediate_local, g.tp_rank
        if weight == moe.params.W13:
            rows = [[r * i, (r + 1) * i], [g.intermediate + r * i, g.intermediate + (r + 1) * i]]
            blocks = [0, g.hidden // BLOCK_SIZE]
        else:
            rows = [[0, g.hidden]]
            blocks = [r * i // BLOCK_SIZE, (r + 1) * i // BLOCK_SIZE]
        return {"experts": experts, "rows": rows, "blocks": blocks}

    def key(self, weight: str) -> str:
        return shard_key(self.descriptor(weight))

    def local_shape(self, weight: str) -> tuple[int, int, int]:
        codes = self.loader.params[weight]
        return (codes.shape[0], codes.shape[1], codes.shape[2] * 2)

    # ---- canonical bytes ------------------------------------------------------------------------------------------
    def _read(self, pname: str) -> torch.Tensor:
        if self.backend is None:
            return moe.read_canonical(self.module, pname)
        return self.backend.read_canonical(self.module, pname)

    def _write(self, pname: str, experts: torch.Tensor, values: torch.Tensor) -> None:
        moe.layouts.bump_generation(self.module)  # whatever the backend's own write path does
        if self.backend is None:
            moe.write_canonical(self.module, pname, experts, values)
        else:
            self.backend.write_experts(self.module, pname, experts, values)

    def read(self, weight: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scales) in the canonical layout (copies)."""
        return self._read(weight), self._read(moe.scale_name(weight))

    def write(self, weight: str, experts: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
        """Write canonical bytes of the given LOCAL experts in place (codes/scales hold those experts only)."""
        if experts.numel() == 0:
            return
        # scales first: a backend that refuses them (hopper_triton's one-multiply bound) leaves the layer unchanged
        for pname, values in ((moe.scale_name(weight), scales), (weight, codes)):
            self._write(pname, experts, values)

    def _generation(self) -> tuple[int, int]:
        return moe.layouts.generation_of(self.module), self.loader.writes

    def hash(self, weight: str, fresh: bool = False) -> str:
        """The audit hash of what the layer serves for `weight` (for hopper_triton every read converts the whole
        kb-major tensor back to canonical bytes: the last read is reused until the layer is written again)."""
        return self._audit(weight, fresh)[0]

    def lanes(self, weight: str) -> tuple[list[int], list[int]]:
        """The fingerprint lanes (codes, scales) behind hash(weight): what a block delta updates sparsely."""
        return self._audit(weight)[1]

    def _audit(self, weight: str, fresh: bool = False) -> tuple[str, tuple[list[int], list[int]]]:
        key = self._generation()
        cached = self._hashes.get(weight)
        if not fresh and cached is not None and cached[0] == key:
            return cached[1], cached[2]
        codes, scales = self.read(weight)
        q = MXFP4Tensor(codes, scales, self.profile)
        lanes = mxfp4_lanes(q)
        h = hash_of_lanes(q.shape, q.profile, *lanes, codes.numel(), scales.numel())
        self._hashes[weight] = (key, h, lanes)
        return h, lanes

    def adopt(self, weight: str, staged_hash: str, lanes: tuple[list[int], list[int]]) -> None:
        """Record the hash and lanes of bytes just written and checked byte for byte (the commit's read-back)."""
        self._hashes[weight] = (self._generation(), staged_hash, lanes)

    def serves(self, weight: str, codes: torch.Tensor, scales: torch.Tensor, staged_hash: str,
               lanes: tuple[list[int], list[int]]) -> bool:
        """Whether the layer now serves exactly these canonical bytes, read back through its layout and compared
        byte for byte. If so, `staged_hash` and its `lanes` (computed when they were staged) become the layer's
        cached audit: equal bytes have that hash, so the commit need not fingerprint them a second time."""
        live_codes, live_scales = self.read(weight)
        if not (same_bytes(live_codes, codes) and same_bytes(live_scales, scales)):
            return False
        self.adopt(weight, staged_hash, lanes)
        return True

    # ---- the served form, written directly (layout_writable layers) ------------------------------------------------
    def layout_writable(self) -> bool:
        """Whether a sync may write the served form directly (whole weights as stored_form gives them, single
        blocks): the backend's writes are its layout's (MoEBackend.layout_writes) and the layout converts each
        parameter on its own, keeping each block's 16 code bytes together and its scale byte canonical (canonical,
        kb-major)."""
        layout = moe.layout_of(self.module)
        return (self.backend is None or self.backend.layout_writes) and layout in (moe.CANONICAL, moe.KB_MAJOR)

    def stored_form(self, weight: str, codes: torch.Tensor) -> torch.Tensor:
        """Canonical codes [E, N, K/2] of all local experts as the layer stores them (its layout's stored_form:
        kb-major bytes for hopper_triton, in a tensor of the parameter's shape); scales are stored canonical."""
        return moe.layout_of(self.module).stored_form(weight, codes)

    def raw(self, weight: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The live (codes, scales) parameters as stored: no conversion, no copy."""
        return self.loader.params[weight].data, self.loader.params[moe.scale_name(weight)].data

    def write_stored(self, weight: str, experts: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                     canonical_codes: torch.Tensor | None = None) -> None:
        """Copy stored-form bytes of the given local experts into the live parameters (the backend checks the
        scales, and the canonical codes where given, first)."""
        if experts.numel() == 0:
            return
        if self.backend is not None:
            self.backend.check_values(self.module, moe.scale_name(weight), scales)
            if canonical_codes is not None:
                self.backend.check_values(self.module, weight, canonical_codes)
        moe.layouts.bump_generation(self.module)
        live_codes, live_scales = self.raw(weight)
        moe.layouts.copy_experts(live_scales, experts, scales)
        moe.layouts.copy_experts(live_codes, experts, codes)

    def serves_stored(self, weight: str, codes: torch.Tensor, scales: torch.Tensor, staged_hash: str,
                      lanes: tuple[list[int], list[int]]) -> bool:
        """serves() for stored-form bytes: the live parameters compared with them as they are, byte for byte."""
        live_codes, live_scales = self.raw(weight)
        if not (same_bytes(live_codes, codes) and same_bytes(live_scales, scales)):
            return False
        self.adopt(weight, staged_hash, lanes)
        return True

    # ---- single 32-blocks (block deltas) ---------------------------------------------------------------------------
    def _block_views(self, weight: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(codes as [E, N, KB, 16] or kb-major [E, KB, N, 16], scales [E, N, KB], kb-major?) of the live params."""
        from common.grouped_gemm.layout import BLOCK_BYTES, kb_major_view

        codes, scales = self.raw(weight)
        if moe.layout_of(self.module) is moe.KB_MAJOR:
            return kb_major_view(codes, weight), scales, True
        e, n, kh = codes.shape
        return codes.view(e, n, kh // BLOCK_BYTES, BLOCK_BYTES), scales, False

    def _flat_blocks(self, weight: str, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                           torch.Tensor, bool]:
        """(live codes as [blocks, 16], live scales flat, the blocks' code rows there, their scale positions,
        kb-major?) of the local blocks (expert, row, block) [M, 3]: single-index gathers and scatters, where the
        three-index form took half of a CPU engine's delta stage and commit (bench/RESULTS.md)."""
        codes, scales, kb = self._block_views(weight)
        n, kblocks = scales.shape[1], scales.shape[2]
        at_scale = block_lin(blocks, n, kblocks)
        # kb-major codes hold block (e, r, b) at (e, b, r) of [E, K/32, N]: the same flat index with rows and blocks
        # swapped
        at_code = block_lin(blocks[:, [0, 2, 1]], kblocks, n) if kb else at_scale
        return codes.reshape(-1, codes.shape[-1]), scales.reshape(-1), at_code, at_scale, kb

    def read_blocks(self, weight: str, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Canonical (codes [M, 16], scales [M]) of the local blocks (expert, row, block) [M, 3] (long)."""
        from common.grouped_gemm.layout import from_kb_major

        codes, scales, at_code, at_scale, kb = self._flat_blocks(weight, blocks)
        sc = scales.index_select(0, at_scale)
        got = codes.index_select(0, at_code)
        if not kb:
            return got, sc
        # a kb-major block is its canonical block transformed in place, wherever it sits (layout.py): the M blocks
        # read as one weight of M rows and a single K block
        return from_kb_major(got.reshape(1, 1, -1, 16), weight).view(-1, 16), sc

    def block_kernels(self, weight: str) -> bool:
        """Whether this weight's single blocks are staged and written by the Triton kernels (BLOCK_KERNELS)."""
        from common.kernels import block_write

        codes, scales = self.raw(weight)
        if BLOCK_KERNELS == "never" or (BLOCK_KERNELS == "auto" and not codes.is_cuda):
            return False
        return block_write.usable(codes, scales)

    def swap_blocks(self, weight: str, blocks: torch.Tensor, codes: torch.Tensor,
                    scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """write_blocks, returning the blocks' previous canonical (codes, scales) (for an undo): one launch where
        block_kernels(weight), else read_blocks then write_blocks."""
        if not self.block_kernels(weight):
            old = self.read_blocks(weight, blocks)
            self.write_blocks(weight, blocks, codes, scales)
            return old
        from common.kernels import block_write

        self._check_block_values(weight, codes, scales)
        moe.layouts.bump_generation(self.module)
        live_codes, live_scales = self.raw(weight)
        return block_write.swap_blocks(blocks, codes, scales, live_codes, live_scales,
                                       kb_major=moe.layout_of(self.module) is moe.KB_MAJOR)

    def holds_blocks(self, weight: str, blocks: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> bool:
        """Whether the blocks, read back through the layout, hold exactly these canonical bytes."""
        if not self.block_kernels(weight):
            now_codes, now_scales = self.read_blocks(weight, blocks)
            return same_bytes(now_codes, codes) and same_bytes(now_scales, scales)
        from common.kernels import block_write

        live_codes, live_scales = self.raw(weight)
        return block_write.blocks_equal(blocks, codes, scales, live_codes, live_scales,
                                        kb_major=moe.layout_of(self.module) is moe.KB_MAJOR)

    def _check_block_values(self, weight: str, codes: torch.Tensor, scales: torch.Tensor) -> None:
        if self.backend is not None:
            self.backend.check_values(self.module, moe.scale_name(weight), scales)
            self.backend.check_values(self.module, weight, codes)

    def write_blocks(self, weight: str, blocks: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
        """Set the canonical bytes of single local blocks in place (scales first; the backend may refuse them).
        Each block at most once (the stage refuses a delta naming one twice)."""
        from common.grouped_gemm.layout import to_kb_major

        self._check_block_values(weight, codes, scales)
        moe.layouts.bump_generation(self.module)
        live_codes, live_scales, at_code, at_scale, kb = self._flat_blocks(weight, blocks)
        live_scales.index_copy_(0, at_scale, scales.to(live_scales.device))
        if kb:
            codes = to_kb_major(codes.reshape(1, -1, 16), weight).view(-1, 16)
        live_codes.index_copy_(0, at_code, codes.to(live_codes.device))

    # ---- expert biases (canonical rows, through the layout like the codes) --------------------------------------
    def all_experts(self) -> torch.Tensor:
        return torch.arange(self.loader.params[moe.params.W13].shape[0])

    def read_bias(self, name: str) -> torch.Tensor:
        return self._read(name).detach().clone()

    def write_bias(self, name: str, values: torch.Tensor) -> None:
        self._write(name, self.all_experts(), values)

    def bias_hash(self, name: str) -> str:
        return dense_hash("bias", self._read(name))

    # ---- expert adapters --------------------------------------------------------------------------------------------
    def lora_hash(self, weight: str) -> str:
        return dense_hash("lora", *expert_lora.read(self.module, weight))

    def extra_hash(self, suffix: str) -> str:
        """The audit hash of one of extra_weights() (a bias, or a packed weight's adapter), read back now."""
        kind, weight = self.extra_weights()[suffix]
        return self.bias_hash(suffix) if kind == "bias" else self.lora_hash(weight)


def find_layers(model: nn.Module) -> dict[str, SyncedLayer]:
    """{layer name: SyncedLayer} for every MoE layer of the model served by mxfp4_rl (module order)."""
    out = {}
    for module in model.modules():
        loader = getattr(module, "mxfp4_rl_loader", None)
        if isinstance(loader, ExpertWeightLoader):
            method = getattr(module, "quant_method", None)
            backend = getattr(method, "backend", None)
            out[loader.geometry.layer_name] = SyncedLayer(module, loader, backend)
    return out
