"""common.checkpoint: tiny hub-format models, safetensors I/O, quantize_checkpoint and load_packed_experts."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common import MXFP4Error, NonFiniteError, ShapeError, quantize
from common.checkpoint import (
    CODEC_VERSION,
    CheckpointReader,
    load_packed_experts,
    quantize_checkpoint,
    save_tensors,
    write_tiny_checkpoint,
)
from common.checkpoint.safetensors_io import INDEX_NAME, parse_size

PROFILE = "flashinfer"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny bf16 source per arch, with a side file that must be copied."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in ("qwen3_moe", "gpt_oss", "deepseek_v3"):
        p = write_tiny_checkpoint(root / arch, arch=arch, seed=1)
        (p / "tokenizer.json").write_text('{"fake": "tokenizer"}')
        out[arch] = p
    return out


def _all(path: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(path) as r:
        return {n: r.get(n) for n in r.names()}


# ---------------------------------------------------------------- tiny checkpoints


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_tiny_loads_in_transformers_without_missing_or_unexpected_keys(tiny, arch):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tiny[arch], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info.get("error_msgs")
    assert model.config.model_type == arch and model.dtype == torch.bfloat16
    logits = model(torch.tensor([[3, 17, 200, 5]])).logits
    assert logits.shape == (1, 4, 256) and bool(torch.isfinite(logits).all())


def test_tiny_is_seeded_and_rejects_unknown_dims(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", seed=7)
    b = write_tiny_checkpoint(tmp_path / "b", seed=7)
    c = write_tiny_checkpoint(tmp_path / "c", seed=8)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    ta, tc = _all(a), _all(c)
    up = "model.layers.0.mlp.experts.0.up_proj.weight"
    assert not torch.equal(ta[up], tc[up])
    d = write_tiny_checkpoint(tmp_path / "d", num_experts=4, moe_intermediate_size=32)
    assert _all(d)["model.layers.1.mlp.experts.3.down_proj.weight"].shape == (128, 32)
    assert json.loads((d / "config.json").read_text())["num_experts"] == 4
    with pytest.raises(ValueError, match="unknown dim override.*'hiden_size'"):
        write_tiny_checkpoint(tmp_path / "e", hiden_size=64)
    with pytest.raises(ValueError, match="unknown tiny arch 'llama'"):
        write_tiny_checkpoint(tmp_path / "f", arch="llama")


# ---------------------------------------------------------------- safetensors I/O


def _assert_same_bytes(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


def test_streaming_writer_is_read_back_by_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(7, 33, generator=g).to(torch.bfloat16),
        "e8m0": torch.randint(0, 255, (5, 4), generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu),
        "i8": torch.randint(-128, 127, (3, 16), generator=g, dtype=torch.int8),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "f32": torch.randn(2, 3, 4, generator=g),
        "e4m3": torch.randn(64, generator=g).to(torch.float8_e4m3fn),
    }
    (tmp_path / "one").mkdir()
    files = save_tensors(tmp_path / "one", tensors)
    assert [f.name for f in files] == ["model.safetensors"]
    _assert_same_bytes(load_file(files[0]), tensors)
    (tmp_path / "many").mkdir()
    files = save_tensors(tmp_path / "many", tensors, max_shard_bytes=100)
    assert len(files) > 2 and all(f.name.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    index = json.loads((tmp_path / "many" / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    _assert_same_bytes(_all(tmp_path / "many"), tensors)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64KiB") == 65536 and parse_size("1.5MB") == 1_500_000
    assert parse_size(123) == 123 and parse_size("77") == 77 and parse_size(None) is None
    with pytest.raises(ValueError, match="cannot parse size '5 parsecs'"):
        parse_size("5 parsecs")


# ---------------------------------------------------------------- quantize_checkpoint: what it writes


def test_qwen3_native_quantizes_routed_experts_only(tiny, tmp_path):
    dst = quantize_checkpoint(tiny["qwen3_moe"], tmp_path / "q", profile=PROFILE, progress=False)
    src, out = _all(tiny["qwen3_moe"]), _all(dst)
    experts = [n for n in src if ".mlp.experts." in n]
    assert len(experts) == 2 * 8 * 3
    for name, t in src.items():
        if name in experts:
            q = quantize(t, profile=PROFILE)
            prefix = name.removesuffix(".weight")
            assert torch.equal(out[f"{prefix}.weight"], q.codes)
            assert torch.equal(out[f"{prefix}.weight_scale"], q.scales)
        else:  # router (mlp.gate), attention, norms, embeddings: byte-identical copies
            assert out[name].dtype == t.dtype and torch.equal(out[name], t), name
    assert len(out) == len(src) + len(experts)
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "mxfp4_rl", "profile": PROFILE, "format": "native",
                                             "block_size": 32, "codec_version": CODEC_VERSION}
    src_cfg = json.loads((tiny["qwen3_moe"] / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == src_cfg
    assert (dst / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    packed = load_packed_experts(dst)
    assert len(packed) == len(experts) and all(v.profile == PROFILE for v in packed.values())


def test_deepseek_v3_keeps_shared_experts_and_dense_mlp(tiny, tmp_path):
    dst = quantize_checkpoint(tiny["deepseek_v3"], tmp_path / "d", profile="ocp", progress=False)
    out = _all(dst)
    # Layer 0 is dense (first_k_dense_replace = 1); layer 1 has a shared expert and a router with a bias.
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.shared_experts.down_proj.weight",
                 "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"):
        assert out[name].dtype == torch.bfloat16, name
    assert out["model.layers.1.mlp.experts.7.down_proj.weight"].dtype == torch.uint8
    assert sorted({k[0] for k in load_packed_experts(dst)}) == [1]


def test_gpt_oss_native_and_gpt_oss_formats_hold_the_same_experts(tiny, tmp_path):
    nat = quantize_checkpoint(tiny["gpt_oss"], tmp_path / "n", profile=PROFILE, progress=False)
    oss = quantize_checkpoint(tiny["gpt_oss"], tmp_path / "o", profile=PROFILE, fmt="gpt-oss", progress=False)
    a, b = load_packed_experts(nat), load_packed_experts(oss)
    assert a.keys() == b.keys() and len(a) == 2 * 8 * 3 and all(a[k].equal(b[k]) for k in a)
    src = _all(tiny["gpt_oss"])
    gate_up = src["model.layers.1.mlp.experts.gate_up_proj"]  # [E, H, 2I], columns 2i = gate i, 2i+1 = up i
    assert a[(1, 5, "gate")].equal(quantize(gate_up[5][:, 0::2].t(), profile=PROFILE))
    assert a[(1, 5, "up")].equal(quantize(gate_up[5][:, 1::2].t(), profile=PROFILE))
    assert a[(1, 5, "down")].equal(quantize(src["model.layers.1.mlp.experts.down_proj"][5].t(), profile=PROFILE))
    out = _all(oss)
    assert out["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (8, 128, 4, 16)
    assert out["model.layers.0.mlp.experts.down_proj_scales"].shape == (8, 128, 2)
    for name in ("model.layers.0.mlp.experts.gate_up_proj_bias", "model.layers.0.mlp.router.weight",
                 "model.layers.0.self_attn.sinks"):
        assert torch.equal(out[name], src[name])
    assert "model.layers.0.mlp.experts.gate_up_proj" not in out


def _write_deepseek_v4(path: Path) -> Path:
    """A minimal DeepSeek-V4-named bf16 source (no HF model class exists for it on CPU)."""
    path.mkdir()
    g = torch.Generator().manual_seed(3)
    t = {"embed.weight": torch.randn(64, 64, generator=g).to(torch.bfloat16)}
    for e in range(4):
        for w, shape in (("w1", (32, 64)), ("w3", (32, 64)), ("w2", (64, 32))):
            t[f"layers.0.ffn.experts.{e}.{w}.weight"] = torch.randn(*shape, generator=g).to(torch.bfloat16)
    t["layers.0.ffn.shared_experts.w1.weight"] = torch.randn(32, 64, generator=g).to(torch.bfloat16)
    save_file(t, str(path / "model.safetensors"))
    fp8 = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps({"model_type": "deepseek_v4", "quantization_config": fp8}))
    return path


def test_deepseek_v4_format_is_a_view_of_native(tmp_path):
    src = _write_deepseek_v4(tmp_path / "src")
    nat = quantize_checkpoint(src, tmp_path / "n", profile="deepseek_v4", progress=False)
    v4 = quantize_checkpoint(src, tmp_path / "v", profile="deepseek_v4", fmt="deepseek-v4", progress=False)
    out_n, out_v = _all(nat), _all(v4)
    w = out_v["layers.0.ffn.experts.2.w3.weight"]
    s = out_v["layers.0.ffn.experts.2.w3.scale"]
    assert w.dtype == torch.int8 and s.dtype == torch.float8_e8m0fnu and s.shape == (32, 2)
    assert torch.equal(w.view(torch.uint8), out_n["layers.0.ffn.experts.2.w3.weight"])
    assert torch.equal(s.view(torch.uint8), out_n["layers.0.ffn.experts.2.w3.weight_scale"])
    assert out_v["layers.0.ffn.shared_experts.w1.weight"].dtype == torch.bfloat16
    a, b = load_packed_experts(nat), load_packed_experts(v4)
    assert len(a) == 12 and all(a[k].equal(b[k]) for k in a) and (0, 3, "up") in a
    qc = json.loads((v4 / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "deepseek-v4" and qc["delegate"]["quant_method"] == "fp8"


def test_sharded_source_and_output_match_single_file(tiny, tmp_path):
    src = tmp_path / "sharded_src"
    src.mkdir()
    save_tensors(src, _all(tiny["qwen3_moe"]), max_shard_bytes="100KB")
    shutil.copy(tiny["qwen3_moe"] / "config.json", src / "config.json")
    assert (src / INDEX_NAME).exists()
    dst = quantize_checkpoint(src, tmp_path / "out", profile=PROFILE, max_shard_bytes="50KB", progress=False)
    ref = quantize_checkpoint(tiny["qwen3_moe"], tmp_path / "ref", profile=PROFILE, progress=False)
    index = json.loads((dst / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 3
    a, b = _all(dst), _all(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reads_each_source_tensor_once_and_drops_it(tiny, tmp_path, monkeypatch):
    """Peak memory ~ one tensor: count how many source tensors are still alive whenever a new one is read."""
    real_get, alive, peak, reads = CheckpointReader.get, set(), [0], {}

    def spy(self, name):
        t = real_get(self, name)
        reads[name] = reads.get(name, 0) + 1
        key = id(t)
        alive.add(key)
        weakref.finalize(t, alive.discard, key)
        peak[0] = max(peak[0], len(alive))
        return t

    monkeypatch.setattr(CheckpointReader, "get", spy)
    quantize_checkpoint(tiny["gpt_oss"], tmp_path / "o", profile=PROFILE, fmt="gpt-oss", progress=False)
    src_names = set(CheckpointReader(tiny["gpt_oss"]).names())
    assert set(reads) == src_names and set(reads.values()) == {1}
    assert peak[0] <= 1


# ---------------------------------------------------------------- quantize_checkpoint: refusals


def test_refuses_missing_shard(tiny, tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    save_tensors(src, _all(tiny["qwen3_moe"]), max_shard_bytes="100KB")
    shutil.copy(tiny["qwen3_moe"] / "config.json", src / "config.json")
    sorted(src.glob("model-00002-of-*.safetensors"))[0].unlink()
    with pytest.raises(FileNotFoundError, match=r"shard 'model-00002-of-\d+\.safetensors' named by "
                                                r"model\.safetensors\.index\.json is missing"):
        quantize_checkpoint(src, tmp_path / "d", profile=PROFILE, progress=False)


def test_refuses_non_finite_weights_and_leaves_nothing(tiny, tmp_path):
    src = tmp_path / "s"
    shutil.copytree(tiny["qwen3_moe"], src)
    t = _all(src)
    name = "model.layers.1.mlp.experts.6.up_proj.weight"
    t[name][9, 70] = float("inf")
    save_file(t, str(src / "model.safetensors"))
    with pytest.raises(NonFiniteError, match=rf"'{name}'.*index \(9,\) block 2"):
        quantize_checkpoint(src, tmp_path / "d", profile=PROFILE, progress=False)
    assert not (tmp_path / "d").exists() and [p.name for p in tmp_path.iterdir()] == ["s"]


def test_refuses_k_not_multiple_of_32(tmp_path):
    src = write_tiny_checkpoint(tmp_path / "s", hidden_size=48)
    # down_proj [48, 64] has K=64 and passes; gate_proj [64, 48] of layer 0 expert 0 is the first with K=48
    with pytest.raises(ShapeError, match=r"'model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight'.*multiple of 32.*"
                                         r"K=48 in shape \(64, 48\)"):
        quantize_checkpoint(src, tmp_path / "d", profile=PROFILE, progress=False)
    assert not (tmp_path / "d").exists()


def test_refuses_bad_paths_archs_and_formats(tiny, tmp_path):
    src = tiny["qwen3_moe"]
    with pytest.raises(ValueError, match="same directory"):
        quantize_checkpoint(src, src, profile=PROFILE)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        quantize_checkpoint(src, tmp_path / "full", profile=PROFILE)
    with pytest.raises(ValueError, match="format 'gpt-oss' is not available for model_type 'qwen3_moe'"):
        quantize_checkpoint(src, tmp_path / "a", profile=PROFILE, fmt="gpt-oss")
    with pytest.raises(ValueError, match="unknown output format 'mxfp4'"):
        quantize_checkpoint(src, tmp_path / "a", profile=PROFILE, fmt="mxfp4")
    with pytest.raises(MXFP4Error, match="unknown MXFP4 profile 'nvfp4'; known profiles: .*flashinfer"):
        quantize_checkpoint(src, tmp_path / "a", profile="nvfp4")
    llama = tmp_path / "llama"
    shutil.copytree(src, llama)
    cfg = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported.*"
                                         "qwen3_moe, deepseek_v3, gpt_oss, deepseek_v4"):
        quantize_checkpoint(llama, tmp_path / "a", profile=PROFILE)
    done = quantize_checkpoint(src, tmp_path / "q", profile=PROFILE, progress=False)
    with pytest.raises(ValueError, match="already an MXFP4 checkpoint"):
        quantize_checkpoint(done, tmp_path / "qq", profile=PROFILE)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        quantize_checkpoint(tmp_path / "full", tmp_path / "b", profile=PROFILE)
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- load_packed_experts: refusals


def test_loader_names_the_bad_tensor(tiny, tmp_path):
    good = quantize_checkpoint(tiny["qwen3_moe"], tmp_path / "q", profile=PROFILE, progress=False)
    tensors = _all(good)

    def variant(label, edit):
        d = tmp_path / label
        shutil.copytree(good, d)
        t = dict(tensors)
        edit(t)
        (d / "model.safetensors").unlink()
        save_file(t, str(d / "model.safetensors"))
        return d

    n = "model.layers.1.mlp.experts.4.up_proj"
    no_scale = variant("noscale", lambda t: t.pop(f"{n}.weight_scale"))
    with pytest.raises(MXFP4Error, match=rf"'{n}\.weight' has no partner '{n}\.weight_scale'"):
        load_packed_experts(no_scale)
    bad_dtype = variant("dtype", lambda t: t.__setitem__(f"{n}.weight", t[f"{n}.weight"].to(torch.int16)))
    with pytest.raises(MXFP4Error, match=rf"'{n}\.weight': expected torch.uint8 packed codes, got torch.int16"):
        load_packed_experts(bad_dtype)
    bad_shape = variant("shape", lambda t: t.__setitem__(f"{n}.weight_scale", t[f"{n}.weight_scale"][:, :2].clone()))
    with pytest.raises(ShapeError, match=rf"'{n}\.weight_scale': expected shape \(64, 4\).*got \(64, 2\)"):
        load_packed_experts(bad_shape)
    with pytest.raises(MXFP4Error, match="quant_method must be 'mxfp4_rl', got None"):
        load_packed_experts(tiny["qwen3_moe"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch,fmt", [("qwen3_moe", "native"), ("gpt_oss", "gpt-oss")])
def test_cuda_conversion_writes_the_same_bytes_as_cpu(tiny, tmp_path, arch, fmt):
    """On CUDA the experts go through the codec's Triton kernels; the files must equal the CPU reference's."""
    cpu = quantize_checkpoint(tiny[arch], tmp_path / "cpu", profile=PROFILE, fmt=fmt, progress=False)
    gpu = quantize_checkpoint(tiny[arch], tmp_path / "gpu", profile=PROFILE, fmt=fmt, progress=False, device="cuda")
    assert (cpu / "model.safetensors").read_bytes() == (gpu / "model.safetensors").read_bytes()
