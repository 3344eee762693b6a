"""Settings parsing, checkpoint claiming, plugin registration and the non-MoE delegation, without an engine."""

from __future__ import annotations

import logging
import tempfile

import pytest

from common import UnknownProfileError
from mxfp4_serve.settings import (
    ServeSettings,
    claims_checkpoint,
    settings_for_online,
    settings_from_quant_config,
)

NATIVE = {"quant_method": "mxfp4_rl", "profile": "ocp", "format": "native", "block_size": 32}


def test_checkpoint_settings_are_read_not_defaulted():
    s = settings_from_quant_config(NATIVE)
    assert (s.profile, s.fmt, s.online, s.backend) == ("ocp", "native", False, None)
    with pytest.raises(ValueError, match=r"has no 'profile'"):
        settings_from_quant_config({"quant_method": "mxfp4_rl"})


@pytest.mark.parametrize("cfg,exc,msg", [
    ({**NATIVE, "profile": "nope"}, UnknownProfileError, r"unknown MXFP4 profile 'nope'; known profiles: .*flashinfer"),
    ({**NATIVE, "format": "awq"}, ValueError, r"unknown format 'awq'; expected one of"),
    ({**NATIVE, "block_size": 16}, ValueError, r"block_size must be 32, got 16"),
    ({"quant_method": "awq"}, ValueError, r"cannot serve a checkpoint with quant_method 'awq'"),
    ({"quant_method": "fp8", "scale_fmt": "fp32"}, ValueError, r"DeepSeek-V4 .* scale_fmt 'fp32'"),
    ({**NATIVE, "delegate": {"activation_scheme": "dynamic"}}, ValueError, r"delegate .* has no 'quant_method'"),
])
def test_bad_quantization_config(cfg, exc, msg):
    with pytest.raises(exc, match=msg):
        settings_from_quant_config(cfg)


def test_online_profile_env_or_explicit_default(monkeypatch, caplog):
    monkeypatch.setenv("MXFP4_RL_PROFILE", "even")
    assert settings_for_online() == ServeSettings(profile="even", fmt="bf16")
    monkeypatch.delenv("MXFP4_RL_PROFILE")
    with caplog.at_level(logging.INFO, logger="mxfp4_serve"):
        assert settings_for_online().profile == "flashinfer"
    assert "using 'flashinfer' because --quantization mxfp4_rl was requested explicitly" in caplog.text
    monkeypatch.setenv("MXFP4_RL_PROFILE", "bogus")
    with pytest.raises(UnknownProfileError, match="'bogus'"):
        settings_for_online()


@pytest.mark.parametrize("cfg,user,model_type,claimed", [
    (NATIVE, None, "qwen3_moe", True),  # our checkpoints, with or without --quantization
    (NATIVE, "mxfp4_rl", "qwen3_moe", True),
    ({"quant_method": "mxfp4"}, None, "gpt_oss", False),  # vLLM keeps other tools' checkpoints...
    ({"quant_method": "mxfp4"}, "mxfp4_rl", "gpt_oss", True),  # ...unless the user asks for us
    ({"quant_method": "mxfp4"}, "mxfp4_rl", "llama", False),
    ({"quant_method": "fp8"}, "mxfp4_rl", "gpt_oss", False),
    (None, "mxfp4_rl", "qwen3_moe", False),  # bf16 checkpoint: vLLM builds cls() (online), no override needed
])
def test_claims(cfg, user, model_type, claimed):
    assert claims_checkpoint(cfg, user, model_type) is claimed


@pytest.mark.parametrize("method,user,model_type,expert_dtype,claimed", [
    ("fp8", "mxfp4_rl", "deepseek_v4", None, True),  # DeepSeek-V4-Flash as shipped: FP4 experts by default
    ("deepseek_v4_fp8", "mxfp4_rl", "deepseek_v4", "fp4", True),
    ("fp8", None, "deepseek_v4", None, False),  # without the request vLLM keeps its own deepseek_v4_fp8
    ("fp8", "mxfp4_rl", "deepseek_v4", "fp8", False),  # Flash-Base: FP8 experts are not MXFP4
    ("fp8", "mxfp4_rl", "deepseek_v3", None, False),  # an FP8 checkpoint of another model
])
def test_claims_deepseek_v4_as_shipped(method, user, model_type, expert_dtype, claimed):
    from common.checkpoint import deepseek_v4 as ds

    cfg = {**ds.SHIPPED_QUANT_CONFIG, "quant_method": method}
    assert claims_checkpoint(cfg, user, model_type, expert_dtype) is claimed
    from mxfp4_serve.config import MXFP4RLConfig

    hf = type("HF", (), {"model_type": model_type, "expert_dtype": expert_dtype})()
    assert MXFP4RLConfig.override_quantization_method(cfg, user, hf) == ("mxfp4_rl" if claimed else None)


def test_deepseek_v4_settings_and_fp8_delegate(tmp_path):
    """The shipped config reads as format deepseek-v4, profile deepseek_v4, vLLM's DeepSeek-V4 FP8 method for every
    non-expert layer (its block shape visible on our config, as the model code reads it); the model type is checked
    again when vLLM hands us the model, and a local checkpoint's headers are validated."""
    from common.checkpoint import deepseek_v4 as ds
    from common.checkpoint.tiny_deepseek_v4 import write_tiny_deepseek_v4
    from mxfp4_serve.config import MXFP4RLConfig

    s = settings_from_quant_config(dict(ds.SHIPPED_QUANT_CONFIG))
    assert (s.profile, s.fmt, s.delegate["quant_method"]) == ("deepseek_v4", "deepseek-v4", "deepseek_v4_fp8")
    assert {k: v for k, v in s.delegate.items() if k != "quant_method"} == {
        k: v for k, v in ds.SHIPPED_QUANT_CONFIG.items() if k != "quant_method"}
    cfg = MXFP4RLConfig.from_config(dict(ds.SHIPPED_QUANT_CONFIG))
    assert type(cfg.delegate).__name__ == "DeepseekV4FP8Config" and cfg.weight_block_size == [128, 128]
    with pytest.raises(ValueError, match=r"DeepSeek-V4's shipped layout only; .*model_type is 'qwen3_moe'"):
        cfg.maybe_update_config("some/hub-id", hf_config=type("HF", (), {"model_type": "qwen3_moe"})())
    ckpt = write_tiny_deepseek_v4(tmp_path / "ds4", seed=0)
    cfg.maybe_update_config(str(ckpt), hf_config=type("HF", (), {"model_type": "deepseek_v4"})())


def test_foreign_gpt_oss_checkpoint_is_gpt_oss_format(monkeypatch):
    monkeypatch.setenv("MXFP4_RL_PROFILE", "ocp")
    s = settings_from_quant_config({"quant_method": "mxfp4", "modules_to_not_convert": ["router"]})
    assert (s.fmt, s.profile) == ("gpt-oss", "ocp")


def test_entry_point_registers_idempotently():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "mxfp4_rl"]
    register = ep.load()
    register()
    register()
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from mxfp4_serve.config import MXFP4RLConfig

    assert QUANTIZATION_METHODS.count("mxfp4_rl") == 1
    assert get_quantization_config("mxfp4_rl") is MXFP4RLConfig
    assert MXFP4RLConfig.override_quantization_method(NATIVE, None) == "mxfp4_rl"
    assert MXFP4RLConfig.get_config_filenames() == []  # bf16 checkpoints -> vLLM calls MXFP4RLConfig() (online)


@pytest.fixture(scope="module")
def vllm_context(tmp_path_factory):
    """A VllmConfig for a tiny model and a 1-process gloo group: what vLLM layers need to be constructed."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    from common.checkpoint import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("mc"), arch="qwen3_moe")
    with set_current_vllm_config(VllmConfig(model_config=ModelConfig(model=str(path), skip_tokenizer_init=True))):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{tempfile.mktemp()}")
        initialize_model_parallel(1, 1)
        yield


def test_non_moe_layers_get_what_they_would_have_had(vllm_context):
    from vllm.model_executor.layers.linear import ReplicatedLinear, UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config, Fp8LinearMethod

    from mxfp4_serve.config import MXFP4RLConfig

    lin = ReplicatedLinear(128, 128, bias=False)
    plain = MXFP4RLConfig.from_config(NATIVE)
    assert type(plain.get_quant_method(lin, "model.layers.0.self_attn.o_proj")) is UnquantizedLinearMethod
    # DeepSeek-V4 style: the dense layers are delegated to vLLM's own FP8 block method
    fp8 = MXFP4RLConfig.from_config({**NATIVE, "delegate": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                                             "weight_block_size": [128, 128]}})
    assert isinstance(fp8.delegate, Fp8Config)
    assert isinstance(fp8.get_quant_method(lin, "model.layers.0.self_attn.o_proj"), Fp8LinearMethod)


FP8_SOURCE = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _converted_with_source_config(root, source_qc: dict):
    """`mxfp4-rl quantize` of a tiny Qwen3-MoE whose config.json carries its own quantization_config."""
    import json

    from common.checkpoint import quantize_checkpoint, write_tiny_checkpoint

    src = write_tiny_checkpoint(root / "src", arch="qwen3_moe", seed=3)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "quantization_config": source_qc}))
    dst = quantize_checkpoint(src, root / "dst", profile="ocp", progress=False)
    return json.loads((dst / "config.json").read_text())["quantization_config"]


def test_converted_checkpoint_hands_its_dense_layers_to_the_source_method(vllm_context, tmp_path):
    # The converter records the source checkpoint's method; the engine's settings must read it back as the
    # delegate, so no dense layer silently loses its method (issue: it was written under a key nobody read).
    from vllm.model_executor.layers.linear import ReplicatedLinear
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config, Fp8LinearMethod

    from mxfp4_serve.config import MXFP4RLConfig

    qc = _converted_with_source_config(tmp_path, FP8_SOURCE)
    assert settings_from_quant_config(qc).delegate == FP8_SOURCE
    config = MXFP4RLConfig.from_config(qc)
    assert isinstance(config.delegate, Fp8Config)
    lin = ReplicatedLinear(128, 128, bias=False)
    assert isinstance(config.get_quant_method(lin, "model.layers.0.self_attn.o_proj"), Fp8LinearMethod)


def test_delegate_of_checkpoints_converted_before_the_contract_module():
    legacy = {**NATIVE, "source_quantization_config": FP8_SOURCE}
    assert settings_from_quant_config(legacy).delegate == FP8_SOURCE
    with pytest.raises(ValueError, match=r"'delegate' must be a quantization_config dict, got str"):
        settings_from_quant_config({**NATIVE, "delegate": "fp8"})
