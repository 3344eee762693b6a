"""common.audit: stable hashes of packed tensors and the diff report."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from common import MXFP4Tensor, ShapeError, quantize
from common.audit import audit_hashes, diff, diff_mappings, tensor_hash

PROFILE = "flashinfer"


def _rand(seed: int, *shape: int) -> MXFP4Tensor:
    g = torch.Generator().manual_seed(seed)
    *lead, n, k = shape
    return MXFP4Tensor(torch.randint(0, 256, (*lead, n, k // 2), generator=g, dtype=torch.uint8),
                       torch.randint(0, 255, (*lead, n, k // 32), generator=g, dtype=torch.uint8), PROFILE)


def _fingerprint_by_the_spec(data: bytes) -> bytes:
    """common/fingerprint.py's definition in plain Python integers (no torch, no Triton)."""
    from common.fingerprint import LANES

    m64 = (1 << 64) - 1
    padded = data + bytes((-len(data)) % 8)
    sums = [0, 0]
    for i in range(len(padded) // 8):
        w = int.from_bytes(padded[8 * i:8 * i + 8], "little")
        for lane, (a, b, m1, m2) in enumerate(LANES):
            x = (((i * a + b) & m64) ^ w) * m1 & m64
            x ^= x >> 32
            sums[lane] = (sums[lane] + (x * m2 & m64)) & m64
    return b"".join(s.to_bytes(8, "little") for s in sums) + len(data).to_bytes(8, "little")


def test_hash_follows_its_documented_definition():
    """Recompute the digest from the spec (domain, JSON header, fingerprints of codes and scales) with plain Python
    integers, without calling common.audit or common.fingerprint's code."""
    q = _rand(0, 3, 4, 64)
    header = json.dumps({"block_size": 32, "dtype": "uint8", "format": "mxfp4", "profile": PROFILE,
                         "shape": [3, 4, 64]}, sort_keys=True, separators=(",", ":")).encode()
    want = hashlib.sha256(b"mxfp4_rl/audit/v2\0" + header + _fingerprint_by_the_spec(q.codes.numpy().tobytes())
                          + _fingerprint_by_the_spec(q.scales.numpy().tobytes()))
    assert tensor_hash(q) == want.hexdigest()


@pytest.mark.parametrize("nbytes", [0, 1, 7, 8, 9, 4096 * 8 + 3])
def test_fingerprint_kernel_torch_and_spec_agree(nbytes):
    """The Triton kernel (interpreter on CPU, native on a GPU) and the torch loop give the spec's value; odd lengths
    and an unaligned start (a slice at byte offset 3) included."""
    from common.fingerprint import _lanes_torch, fingerprint, words_of
    from common.kernels.fingerprint import lanes_triton

    g = torch.Generator().manual_seed(nbytes)
    base = torch.randint(0, 256, (nbytes + 3,), generator=g, dtype=torch.uint8)
    t = base[3:]
    want = _fingerprint_by_the_spec(t.numpy().tobytes())
    assert fingerprint(t) == want
    if nbytes:
        words = words_of(t.cuda() if torch.cuda.is_available() else t)
        assert lanes_triton(words) == _lanes_torch(words.cpu())


def test_fingerprint_torch_chunks_add_up_to_the_spec(monkeypatch):
    """The torch loop works in chunks (a per-call position table, sums combined on the host): with chunks of 5 words
    and a last partial chunk, the value is still the spec's."""
    import common.fingerprint as F

    monkeypatch.setattr(F, "_CHUNK_WORDS", 5)
    g = torch.Generator().manual_seed(11)
    t = torch.randint(0, 256, (8 * 23 + 5,), generator=g, dtype=torch.uint8)
    t[:8] = 0xFF  # words whose high half has the sign bit set: the logical shift must not copy it
    assert F.fingerprint(t) == _fingerprint_by_the_spec(t.numpy().tobytes())


def test_fingerprint_sees_moved_and_flipped_words():
    from common.fingerprint import fingerprint

    t = torch.randint(0, 256, (1024,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    swapped = t.view(-1, 8).flip(0).reshape(-1)  # the same words in another order
    flipped = t.clone()
    flipped[517] ^= 0x40
    zeros = torch.zeros(1024, dtype=torch.uint8)
    prints = {fingerprint(x) for x in (t, swapped, flipped, zeros, zeros[:1016])}
    assert len(prints) == 5


def test_hash_golden_value_is_stable_across_releases():
    codes = torch.arange(32, dtype=torch.uint8).reshape(2, 16)
    q = MXFP4Tensor(codes, torch.tensor([[127], [130]], dtype=torch.uint8), "ocp")
    # Pinned: a change here breaks hash comparisons between mixed learner/engine versions (bump HASH_DOMAIN).
    assert tensor_hash(q) == "5538e7c645185f08c2b0437e04d89537a1beaec22e7623d5fe8d24f248a82e5a"


def test_hash_ignores_strides_and_sees_every_field():
    q = _rand(1, 2, 8, 64)
    wide = torch.zeros(2, 8, 64, dtype=torch.uint8)
    wide[..., :32] = q.codes
    strided = MXFP4Tensor(wide[..., :32], q.scales.transpose(0, 1).contiguous().transpose(0, 1), PROFILE)
    assert not strided.codes.is_contiguous() and not strided.scales.is_contiguous()
    assert tensor_hash(strided) == tensor_hash(q)
    flipped = q.codes.clone()
    flipped[1, 7, 31] ^= 0x10
    bumped = q.scales.clone()
    bumped[0, 0, 0] += 1
    variants = [MXFP4Tensor(flipped, q.scales, PROFILE), MXFP4Tensor(q.codes, bumped, PROFILE),
                MXFP4Tensor(q.codes, q.scales, "ocp"),
                MXFP4Tensor(q.codes.reshape(16, 32), q.scales.reshape(16, 2), PROFILE)]
    hashes = {tensor_hash(v) for v in variants} | {tensor_hash(q)}
    assert len(hashes) == 5
    assert audit_hashes({"b": q, "a": variants[0]}) == {"b": tensor_hash(q), "a": tensor_hash(variants[0])}
    assert list(audit_hashes({"b": q, "a": q})) == ["b", "a"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hash_is_device_independent():
    q = _rand(2, 4, 32, 128)
    assert tensor_hash(q.to("cuda")) == tensor_hash(q)


def test_diff_reports_flips_scale_changes_and_first_block():
    a = _rand(3, 3, 8, 128)  # 3 experts, 8 rows, 4 blocks per row
    a.scales[2, 0, 0], a.scales[1, 5, 2] = 100, 50
    codes, scales = a.codes.clone(), a.scales.clone()
    codes[1, 3, 20] ^= 0x30  # expert 1 row 3 byte 20 = block 1: one high-nibble flip
    codes[2, 7, 63] ^= 0x11  # expert 2 row 7 block 3: both nibbles
    scales[2, 0, 0], scales[1, 5, 2] = 101, 48  # exponent +1 and -2
    d = diff(a, MXFP4Tensor(codes, scales, PROFILE))
    assert d.codes_total == 3 * 8 * 128 and d.codes_flipped == 3
    assert d.code_flip_rate == pytest.approx(3 / (3 * 8 * 128))
    assert d.scale_delta_hist == {-2: 1, 1: 1} and d.scales_changed == 2
    assert d.blocks_differing == 4 and d.blocks_total == 3 * 8 * 4
    assert d.first_diff == (1, 3, 1) and not d.identical
    text = str(d)
    assert "4/96 blocks differ" in text and "code flips 3/3072" in text
    assert "first difference at expert 1, row 3, block 1" in text


def test_diff_of_equal_tensors_and_of_a_power_of_two_rescale():
    x = torch.randn(4, 16, 256, generator=torch.Generator().manual_seed(4))
    a = quantize(x, profile=PROFILE)
    same = diff(a, MXFP4Tensor(a.codes.clone(), a.scales.clone(), PROFILE))
    assert same.identical and same.first_diff is None and same.code_flip_rate == 0.0
    assert str(same) == "MXFP4 diff of shape [4, 16, 256]: identical bytes (512 blocks)"
    # x * 2 is exact in fp32: every scale exponent moves by exactly +1 and no element code changes.
    d = diff(a, quantize(x * 2, profile=PROFILE))
    assert d.codes_flipped == 0 and d.scale_delta_hist == {1: 512} and d.first_diff == (0, 0, 0)
    assert "+1: 512" in str(d)
    two_d = diff(a[0], quantize(x[0] * 4, profile=PROFILE))
    assert two_d.scale_delta_hist == {2: 128} and "first difference at row 0, block 0" in str(two_d)


def test_diff_profiles_and_errors():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    a, b = quantize(x, profile="flashinfer"), quantize(x, profile="ocp")
    d = diff(a, b)
    assert d.profiles == ("flashinfer", "ocp") and "profiles differ" in str(d) and not d.identical
    with pytest.raises(ShapeError, match=r"shapes differ, \[8, 64\] vs \[8, 32\]"):
        diff(a, quantize(x[:, :32], profile="flashinfer"))
    m = {"e0": a, "e1": a}
    assert diff_mappings(m, {"e0": a, "e1": a}) == {}
    assert list(diff_mappings(m, {"e0": a, "e1": b})) == ["e1"]
    with pytest.raises(KeyError, match="one side only: \\['e2'\\]"):
        diff_mappings(m, {**m, "e2": a})


def test_diff_separates_sign_of_zero_flips_from_value_flips():
    # byte 0x80 = (even +0, odd -0); 0x08 = (even -0, odd +0): both nibbles flip sign of zero only.
    # byte 0x21 -> 0x31: one real flip (odd nibble 2 -> 3).
    codes_a = torch.zeros(1, 16, dtype=torch.uint8)
    codes_b = codes_a.clone()
    codes_a[0, :3] = torch.tensor([0x80, 0x00, 0x21], dtype=torch.uint8)
    codes_b[0, :3] = torch.tensor([0x08, 0x88, 0x31], dtype=torch.uint8)
    scales = torch.full((1, 1), 127, dtype=torch.uint8)
    d = diff(MXFP4Tensor(codes_a, scales, "flashinfer"), MXFP4Tensor(codes_b, scales, "flashinfer"))
    assert d.codes_flipped == 5 and d.zero_sign_flips == 4
    assert d.value_flip_rate == 1 / 32 and d.code_flip_rate == 5 / 32
    assert "4 of them +0/-0 only" in str(d)


def test_same_bytes_compares_every_byte_whatever_the_alignment():
    from common.audit import same_bytes

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    a = torch.randint(0, 256, (3, 5, 24), dtype=torch.uint8, generator=gen)
    assert same_bytes(a, a.clone())
    for idx in [(0, 0, 0), (2, 4, 23), (1, 2, 7)]:  # first, last, inside a word
        b = a.clone()
        b[idx] ^= 0x80
        assert not same_bytes(a, b)
    odd = a.reshape(-1)[1:]  # unaligned, a length not a multiple of 8: the byte path
    c = odd.clone()
    assert same_bytes(odd, c)
    c[-1] ^= 1
    assert not same_bytes(odd, c)
    assert not same_bytes(a, a.view(torch.int8))  # dtype counts
    assert not same_bytes(a, a.reshape(5, 3, 24))  # shape counts
    f = torch.tensor([0.0, 1.0])
    assert not same_bytes(f, torch.tensor([-0.0, 1.0]))  # bytes, not values: -0.0 == 0.0 but differs
    assert same_bytes(torch.tensor([float("nan")]), torch.tensor([float("nan")]))  # same NaN bytes are the same


def test_lanes_update_from_the_changed_words_alone():
    """The fingerprint's lanes are modular sums of per-word terms: the lanes of a tensor after a sparse change equal
    its old lanes updated with the changed words (what an engine does for a block delta), for changes in the middle
    and in the zero-padded last word, and tensor_hash is hash_of_lanes of its lanes."""
    from common import fingerprint as F
    from common.audit import hash_of_lanes, mxfp4_lanes

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    t = torch.randint(0, 256, (1003,), dtype=torch.uint8, generator=g)  # 125 whole words and 3 bytes of padding
    words = F.words_of(t)
    assert F.lane_terms(torch.arange(words.numel()), words) == F.lanes(t)
    new = t.clone()
    at = torch.randint(0, t.numel(), (40,), generator=g)
    new[at] ^= torch.randint(1, 256, (40,), dtype=torch.uint8, generator=g)
    new[-1] ^= 0x5A  # the padded last word
    nw = F.words_of(new)
    pos = (nw != words).nonzero().squeeze(1)
    assert F.update_lanes(F.lanes(t), pos, words[pos], nw[pos]) == F.lanes(new)
    assert F.update_lanes(F.lanes(t), pos, words[pos], nw[pos]) != F.lanes(t)
    q = quantize(torch.randn(3, 8, 64, generator=g), profile="flashinfer")
    assert tensor_hash(q) == hash_of_lanes(q.shape, q.profile, *mxfp4_lanes(q), q.codes.numel(), q.scales.numel())


def test_mxfp4_lanes_after_a_block_change_equal_a_fresh_fingerprint():
    """The learner's hash of a delta: the lanes of the new weight from the old lanes and the changed blocks alone
    (codes only, scales only, two changed scale bytes in one word, the last block of the tensor, a run of 21 blocks
    over four scale words)."""
    from common.audit import mxfp4_lanes, mxfp4_lanes_after

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    old = quantize(torch.randn(3, 7, 96, generator=g), profile="flashinfer")  # 63 scale bytes: a padded last word
    new = MXFP4Tensor(old.codes.clone(), old.scales.clone(), old.profile)
    blocks = torch.tensor([[0, 0, 0], [0, 0, 1], [1, 3, 2], [2, 6, 2]])
    new.codes.view(3, 7, 3, 16)[0, 0, 0, 5] ^= 0x21  # codes only
    new.scales[0, 0, 1] += 1  # scale only, same scale word as block 0
    new.codes.view(3, 7, 3, 16)[1, 3, 2] ^= 0xFF
    new.scales[2, 6, 2] -= 1  # the last byte, in the zero-padded last word
    after = mxfp4_lanes_after(mxfp4_lanes(old), old, new, blocks)
    assert after == mxfp4_lanes(new) and after != mxfp4_lanes(old)
    # every block of expert 1 (21 in a row, over four scale words) rescaled too
    newer = MXFP4Tensor(new.codes.clone(), new.scales.clone(), new.profile)
    newer.scales[1] += 1
    run = torch.tensor([[1, r, b] for r in range(7) for b in range(3)])
    every = torch.cat((blocks[:2], run, blocks[3:]))  # ascending, each block once
    assert mxfp4_lanes_after(mxfp4_lanes(old), old, newer, every) == mxfp4_lanes(newer)


def test_lane_moves_kernel_equals_the_torch_terms():
    """The sparse rehash's kernel (interpreter on CPU, native on a GPU) moves the lanes exactly as the torch terms:
    random words, all-ones, zero, the extremes of int64, positions past 2^32, and a block straddling its BLOCK."""
    from common import fingerprint as F
    from common.kernels.fingerprint import _BLOCK, lane_moves_triton

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    n = _BLOCK + 77
    pos = torch.randperm(3 * n, generator=g)[:n].to(torch.int64)
    pos[:4] = torch.tensor([0, 2**32 + 5, 2**40 + 1, 2**62])
    old = torch.randint(-2**63, 2**63 - 1, (n,), dtype=torch.int64, generator=g)
    new = torch.randint(-2**63, 2**63 - 1, (n,), dtype=torch.int64, generator=g)
    new[:4] = torch.tensor([-1, 0, -2**63, 2**63 - 1])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    moved = lane_moves_triton(pos.to(dev), old.to(dev), new.to(dev)).tolist()
    want = [F._signed(n_ - o) for n_, o in zip(F.lane_terms(pos, new), F.lane_terms(pos, old), strict=True)]
    assert moved == want
    assert lane_moves_triton(pos[:0].to(dev), old[:0].to(dev), new[:0].to(dev)).tolist() == [0, 0]
    lanes = [123, -456]
    assert F.update_lanes_of([(lanes, pos.to(dev), old.to(dev), new.to(dev))]) == \
        [[F._signed(v + m) for v, m in zip(lanes, want, strict=True)]]
