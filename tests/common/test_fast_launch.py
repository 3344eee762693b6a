"""common.kernels.fast_launch: the launch cache's key against Triton's own argument specialization (any machine),
and cached launches against Triton's regular path, bit for bit (natively on a GPU).

A cached kernel is only valid for arguments Triton would have compiled the same kernel for: two arguments with
equal keys must get equal specializations from Triton, or a kernel compiled for 16-byte aligned pointers (or for
a stride equal to 1) would run on others.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common.grouped_gemm import TileConfig, grouped_mm_mxfp4  # noqa: E402
from common.grouped_gemm import lora as L  # noqa: E402
from common.kernels import fast_launch, interpreting  # noqa: E402

NATIVE = torch.cuda.is_available() and not interpreting()


def _triton_specialization(a):
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError as exc:  # triton moved its specializer: the property below cannot be checked
        pytest.skip(f"this triton has no native_specialize_impl ({exc})")
    kind, key = native_specialize_impl(BaseBackend, a, False, True, True)[:2]
    return kind, key


def _samples() -> list:
    base = torch.zeros(64, dtype=torch.float32)
    tensors = [base, base[1:], base[4:], base.view(torch.int32), base.view(torch.bfloat16),
               base.view(torch.bfloat16)[1:], base.view(torch.bfloat16)[8:], base.view(torch.uint8)[3:],
               base.view(torch.uint8)[16:]]
    ints = [0, 1, 2, 15, 16, 17, 32, 48, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 1, 2**32, 2**63 - 16,
            2**63, 2**64 - 16]
    return tensors + ints + [0.0, 1.0, 1.5, True, False, None]


def test_equal_keys_mean_equal_triton_specializations():
    samples = _samples()
    specs = [_triton_specialization(a) for a in samples]
    keys = [fast_launch.arg_key(a) for a in samples]
    for (ka, sa, a), (kb, sb, b) in itertools.combinations(zip(keys, specs, samples), 2):
        if ka == kb:
            assert sa == sb, f"fast_launch keys {ka} equal for {a!r} and {b!r}, Triton specializes {sa} vs {sb}"


def test_the_key_tells_apart_what_triton_tells_apart_within_a_kind():
    # not required for correctness, but a key that lumped e.g. every int together would be caught by the test
    # above only for the samples it has: these pairs must differ
    z = torch.zeros(64, dtype=torch.bfloat16)
    for a, b in ((z, z[1:]), (z, z.view(torch.int16)), (1, 2), (16, 17), (2**31 - 16, 2**31), (2**63 - 16, 2**63)):
        assert fast_launch.arg_key(a) != fast_launch.arg_key(b), (a, b)


@pytest.mark.skipif(NATIVE, reason="checks the CPU / interpreter fallback")
def test_cpu_tensors_take_the_regular_path():
    before = fast_launch.stats()
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    f = torch.randn(2, 16, 64, dtype=torch.bfloat16)
    offs = torch.tensor([0, 3, 8], dtype=torch.int32)
    out = L.project(x, offs, f, 0.5)
    ref = torch.cat([0.5 * x[:3].float() @ f[0].float().T, 0.5 * x[3:].float() @ f[1].float().T])
    assert torch.allclose(out.float(), ref, rtol=2**-7, atol=1e-2)
    assert fast_launch.stats() == before


def _packed(e: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, generator=g).cuda()
    scales = torch.randint(120, 128, (e, n, k // 32), dtype=torch.uint8, generator=g).cuda()
    return codes, scales


@pytest.mark.skipif(not NATIVE, reason="cached launches run natively on a GPU")
def test_cached_launches_equal_the_regular_path_bit_for_bit(monkeypatch):
    e, n, k = 4, 256, 256
    codes, scales = _packed(e, n, k, 0)
    counts = [5, 0, 17, 42]
    offs = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32, device="cuda")
    m = sum(counts)
    cfg = TileConfig(16, 64, 64, 4, 3, swap_ab=True)
    # an aligned x and one whose base is 2 bytes off 16 (a different specialization), same values
    store = torch.randn(m * k + 8, dtype=torch.bfloat16, device="cuda")
    aligned = store[:m * k].view(m, k)
    shifted = store[1:m * k + 1].view(m, k)
    shifted.copy_(aligned.clone())
    assert aligned.data_ptr() % 16 == 0 and shifted.data_ptr() % 16 != 0
    monkeypatch.setenv("MXFP4_FAST_LAUNCH", "0")
    slow = {name: grouped_mm_mxfp4(x, offs, codes, scales, config=cfg) for name, x in
            (("aligned", aligned.clone()), ("shifted", shifted))}
    monkeypatch.setenv("MXFP4_FAST_LAUNCH", "1")
    for name, x in (("aligned", aligned), ("shifted", shifted), ("aligned", aligned), ("shifted", shifted)):
        before = fast_launch.stats()["hits"]
        y = grouped_mm_mxfp4(x, offs, codes, scales, config=cfg)
        torch.cuda.synchronize()
        assert torch.equal(y.view(torch.int16), slow[name].view(torch.int16)), name
    assert fast_launch.stats()["hits"] > before  # the later calls came from the cache
    # the LoRA kernels through the cache, twice, bit for bit against the regular path
    f = torch.randn(e, 16, k, dtype=torch.bfloat16, device="cuda")
    monkeypatch.setenv("MXFP4_FAST_LAUNCH", "0")
    ref = L.project(aligned, offs, f, 0.25)
    monkeypatch.setenv("MXFP4_FAST_LAUNCH", "1")
    for _ in range(2):
        assert torch.equal(L.project(aligned, offs, f, 0.25).view(torch.int16), ref.view(torch.int16))


@pytest.mark.skipif(not NATIVE, reason="CUDA graphs need a GPU")
def test_cached_launches_capture_in_a_cuda_graph():
    # vLLM captures the engine layer in CUDA graphs: a cached launch must go to the capturing stream
    e, n, k = 4, 256, 256
    codes, scales = _packed(e, n, k, 1)
    offs = torch.tensor([0, 7, 7, 30, 64], dtype=torch.int32, device="cuda")
    x = torch.randn(64, k, dtype=torch.bfloat16, device="cuda")
    cfg = TileConfig(16, 64, 64, 4, 3, swap_ab=True)
    eager = grouped_mm_mxfp4(x, offs, codes, scales, config=cfg)  # fills the cache
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        grouped_mm_mxfp4(x, offs, codes, scales, config=cfg)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    hits = fast_launch.stats()["hits"]
    with torch.cuda.graph(graph):
        captured = grouped_mm_mxfp4(x, offs, codes, scales, config=cfg)
    assert fast_launch.stats()["hits"] == hits + 1
    captured.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.view(torch.int16), eager.view(torch.int16))


class _FakeCudaTensor(torch.Tensor):
    """A CPU tensor that claims to live on a GPU, so the cache logic runs on any machine."""

    @property
    def is_cuda(self):
        return True


class _FakeCompiled:
    def __init__(self, log, fail=False):
        self.log, self.fail = log, fail

    def run(self, *args):  # noqa: D401 - Triton's CompiledKernel has run(); its presence marks a usable kernel
        raise AssertionError("launches go through __getitem__")

    def __getitem__(self, grid):
        def runner(*args):
            if self.fail:
                raise TypeError("launcher takes other arguments")
            self.log.append(("cached", grid, args))
        return runner


class _FakeKernel:
    """A raw @triton.jit stand-in: parameters (x_ptr, n, A, B); kernel[grid](...) launches and returns the compiled
    kernel, as JITFunction.run does."""

    arg_names = ["x_ptr", "n", "A", "B"]

    def __init__(self, fail=False):
        self.log, self.fail = [], fail

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.log.append(("regular", grid, args, kw))
            return _FakeCompiled(self.log, self.fail)
        return run


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(fast_launch, "_CACHE", {})
    monkeypatch.setattr(fast_launch, "_BROKEN", False)
    monkeypatch.setattr(fast_launch, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("MXFP4_FAST_LAUNCH", "1")
    store = torch.zeros(64, dtype=torch.bfloat16)
    return store.as_subclass(_FakeCudaTensor), store[1:].as_subclass(_FakeCudaTensor)


def test_cache_hits_pass_every_parameter_in_order_and_misses_on_a_new_specialization(fake_gpu):
    aligned, shifted = fake_gpu
    k = _FakeKernel()
    # keywords in another order than the parameters: the cached launch must still pass (A, B) in parameter order
    fast_launch.launch(k, (3,), aligned, 32, B=7, A=5, num_warps=4)
    fast_launch.launch(k, (3,), aligned, 48, B=7, A=5, num_warps=4)  # 48: same int key as 32 (divisible by 16)
    fast_launch.launch(k, (3,), shifted, 48, B=7, A=5, num_warps=4)  # a pointer 2 bytes off 16: a new kernel
    fast_launch.launch(k, (3,), aligned, 33, B=7, A=5, num_warps=4)  # 33: not divisible by 16, a new kernel
    kinds = [entry[0] for entry in k.log]
    assert kinds == ["regular", "cached", "regular", "regular"], k.log
    _, grid, args = k.log[1]
    assert grid == (3, 1, 1) and args[1:] == (48, 5, 7) and args[0] is aligned


def test_parameters_left_to_defaults_are_never_cached(fake_gpu):
    aligned, _ = fake_gpu
    k = _FakeKernel()
    for _ in range(2):
        fast_launch.launch(k, (1, 2), aligned, 16, A=1)  # B not given: its default is Triton's business
    assert [entry[0] for entry in k.log] == ["regular", "regular"]


def test_a_launcher_that_refuses_the_arguments_turns_the_cache_off(fake_gpu):
    aligned, _ = fake_gpu
    k = _FakeKernel(fail=True)
    fast_launch.launch(k, (2,), aligned, 16, A=1, B=2)
    with pytest.warns(RuntimeWarning, match="launching through kernel\\[grid\\] from now on"):
        fast_launch.launch(k, (2,), aligned, 16, A=1, B=2)
    fast_launch.launch(k, (2,), aligned, 16, A=1, B=2)
    assert [entry[0] for entry in k.log] == ["regular", "regular", "regular"]
    assert fast_launch._BROKEN and not fast_launch._CACHE
