"""MoE routing (common.grouped_gemm.routing): the Triton counting sort behind route() == route_torch(), bit for bit.

On CPU the kernels run under TRITON_INTERPRET=1 (the suite's conftest sets it before triton is imported); with
CUDA they run natively. Every case draws fresh ids and compares all Routing fields with torch.equal; the block
size (entries per program) is forced small where a case must cross programs (and so run the scan kernel).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common.errors import DTypeError, ShapeError  # noqa: E402
from common.grouped_gemm import _routing_kernels as RK  # noqa: E402
from common.grouped_gemm.routing import Routing, permute, route, route_torch, unpermute  # noqa: E402
from common.kernels import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
FIELDS = ("token", "inverse", "offsets", "source")


def _ids(t: int, k: int, e: int, seed: int, dtype=torch.int64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, e, (t, k), generator=g).to(dtype).to(DEVICE)


def _assert_same(got: Routing, want: Routing) -> None:
    assert got.top_k == want.top_k
    for f in FIELDS:
        a, b = getattr(got, f), getattr(want, f)
        assert a.dtype == b.dtype and a.device == b.device, f
        assert torch.equal(a, b), f


def _assert_properties(r: Routing, ids: torch.Tensor, e: int) -> None:
    """What any stable sort by expert must satisfy, independently of the reference."""
    p = ids.numel()
    flat = ids.reshape(-1).long().cpu()
    src, off = r.source.cpu(), r.offsets.cpu().long()
    assert off.shape == (e + 1,) and int(off[0]) == 0 and int(off[-1]) == p
    assert torch.equal(r.token.cpu(), src // r.top_k)
    assert torch.equal(r.inverse.cpu()[src], torch.arange(p))
    for x in range(e):
        seg = src[off[x]:off[x + 1]]
        assert bool((flat[seg] == x).all()), x
        assert bool((seg[1:] > seg[:-1]).all()), x  # stable: flat order kept inside an expert


def _sort(ids: torch.Tensor, e: int, block: int | None = None) -> Routing:
    source, token, inverse, offsets = RK.sort_by_expert(ids, e, block=block)
    return Routing(token=token, inverse=inverse, offsets=offsets, top_k=ids.shape[1], source=source)


@pytest.mark.parametrize("k", [1, 2, 4, 6, 8])
@pytest.mark.parametrize("e", [1, 3, 32, 128, 257])
def test_route_equals_torch_random(k, e):
    for t, seed in ((1, 0), (16, 1), (61, 2)):
        ids = _ids(t, k, e, seed=100 * k + e + seed)
        r = route(ids, e)
        _assert_same(r, route_torch(ids, e))
        _assert_properties(r, ids, e)


@pytest.mark.parametrize("t,k,e,block", [
    (400, 8, 32, 1024),  # 4 programs, a ragged last one
    (333, 6, 257, 256),  # 8 programs, E not a power of two
    (200, 4, 512, 64),  # 13 programs
    (50, 2, 3, 1),  # one entry per program
])
def test_route_multi_program(t, k, e, block):
    for dtype in (torch.int32, torch.int64):
        ids = _ids(t, k, e, seed=t + e, dtype=dtype)
        r = _sort(ids, e, block)
        _assert_same(r, route_torch(ids, e))
        _assert_properties(r, ids, e)


def test_route_scan_in_several_steps():
    """More blocks than one scan tile holds: the scan carries its prefix from tile to tile."""
    t, k, e = 1200, 4, 128
    block = 16 if interpreting() else 1  # the interpreter's scan tiles are shorter: fewer of its slow programs
    ids = _ids(t, k, e, seed=3)
    assert t * k // block > RK._rows(10**9, RK._SCAN_COLS)  # 4800 or 300 blocks: at least two scan steps
    _assert_same(_sort(ids, e, block), route_torch(ids, e))


def _adversarial(t: int, k: int, e: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ends = torch.tensor([0, e - 1])[torch.randint(0, 2, (t, k), generator=g)]
    return {
        "one_expert": torch.full((t, k), e // 2),
        "first_expert": torch.zeros(t, k, dtype=torch.int64),
        "last_expert": torch.full((t, k), e - 1),
        "ends_only": ends,  # every expert in between empty
        "few_experts": torch.randint(0, 3, (t, k), generator=g) * (e // 3),  # empty experts in between
        "descending": torch.arange(t * k).flip(0).reshape(t, k) % e,
        "same_expert_twice": torch.randint(0, e, (t, 1), generator=g).expand(t, k).contiguous(),
    }


@pytest.mark.parametrize("case", list(_adversarial(2, 2, 8)))
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_route_adversarial(case, dtype):
    t, k, e = 300, 4, 40
    ids = _adversarial(t, k, e)[case].to(dtype).to(DEVICE)
    want = route_torch(ids, e)
    _assert_same(route(ids, e), want)
    _assert_same(_sort(ids, e, block=128), want)  # 10 programs: one expert's rows cross them all
    _assert_properties(want, ids, e)


@pytest.mark.parametrize("k", [1, 4])
def test_route_empty(k):
    ids = torch.empty(0, k, dtype=torch.int64, device=DEVICE)
    r = route(ids, 5)
    _assert_same(r, route_torch(ids, 5))
    assert r.token.shape == r.inverse.shape == r.source.shape == (0,)
    assert r.offsets.dtype == torch.int32 and r.offsets.tolist() == [0] * 6


def test_route_non_contiguous_ids():
    ids = _ids(64, 8, 32, seed=5)[:, ::2]  # a strided view: the kernels read a contiguous copy
    _assert_same(route(ids, 32), route_torch(ids, 32))


def test_out_of_range_ids_stay_in_bounds():
    """Unvalidated bad ids are the caller's problem, but the kernels must not write outside the outputs."""
    ids = torch.tensor([[0, 9], [-1, 2], [2, 0]], device=DEVICE)
    for block in (8, 2):
        r = _sort(ids, 3, block)
        assert r.offsets.tolist() == [0, 2, 2, 4]  # the two bad ids count for no expert
        assert r.source[:4].tolist() == [0, 5, 3, 4]


def test_permute_unpermute_round_trip():
    t, k, e, h = 37, 4, 16, 24
    g = torch.Generator().manual_seed(11)
    ids = _ids(t, k, e, seed=12)
    weights = torch.softmax(torch.randn(t, k, generator=g), -1).to(DEVICE)
    x = torch.randn(t, h, generator=g).to(DEVICE)
    r = route(ids, e)
    xs = permute(x, r)
    assert torch.equal(xs, x[r.token])
    rows = torch.repeat_interleave(torch.arange(e), torch.diff(r.offsets.cpu().long()))
    assert torch.equal(ids.reshape(-1).cpu()[r.source.cpu()], rows)  # each sorted row belongs to its expert
    back = unpermute(xs, r, weights)
    assert torch.allclose(back, x * weights.sum(1, keepdim=True), rtol=1e-6, atol=1e-6)
    assert torch.allclose(back, x, rtol=1e-5, atol=1e-5)


def test_validation_errors():
    with pytest.raises(DTypeError, match="'topk_ids'.*int32/int64.*float32"):
        route(torch.zeros(2, 2), 4)
    with pytest.raises(DTypeError, match=r"'topk_ids'.*\(4,\)"):
        route(torch.zeros(4, dtype=torch.int64), 4)
    for fn in (route, route_torch):
        with pytest.raises(ShapeError, match=r"'topk_ids'.*\[0, 4\).*\[0, 5\]"):
            fn(torch.tensor([[0, 5]]), 4)  # CPU ids: validated by default
        with pytest.raises(ShapeError, match=r"'topk_ids'.*\[-1, 2\]"):
            fn(torch.tensor([[-1, 2]]), 4, validate=True)
    with pytest.raises(ValueError, match="block must be a power of two"):
        RK.sort_by_expert(torch.zeros(2, 2, dtype=torch.int64, device=DEVICE), 4, block=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_route_cuda_graph_capture():
    """No host sync: the kernels capture into a CUDA graph and replay on new ids in place."""
    e = 128
    ids = _ids(16, 4, e, seed=20)
    for block in (None, 16):  # one launch, and three
        _sort(ids, e, block)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            r = _sort(ids, e, block)
        ids.copy_(_ids(16, 4, e, seed=21 + (block or 0)))
        graph.replay()
        _assert_same(r, route_torch(ids, e))
