"""Issue 26: the engine plugin, the learner's loader and `mxfp4-rl inspect` refuse the same bad checkpoints with the
same message (one validation pass, common/checkpoint/validate.py). The engine side runs here without an engine: its
config (`from_config`, then vLLM's `maybe_update_config` hook with the model path, before any weight is loaded) and
its weight loader fed the checkpoint's own tensors; tests/e2e/test_engine_errors.py starts a real one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from common.checkpoint import load_packed_experts
from common.checkpoint.validate import read_config
from mxfp4_serve.config import MXFP4RLConfig
from mxfp4_serve.loader import ExpertWeightLoader
from mxfp4_serve.settings import settings_from_quant_config
from mxfp4_serve.shards import ExpertGeometry
from mxfp4_train.checkpoint_io import load_mxfp4_model
from tests.common.bad_checkpoints import CASES, good_checkpoint, make_case

_PROJ_SHARD = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    return root, good_checkpoint(root)


def _engine_load(path) -> None:
    """What the engine does with a checkpoint: config from its quantization_config, the path hook, then every
    expert tensor through the layer's weight loader."""
    cfg = read_config(path)
    config = MXFP4RLConfig.from_config(cfg["quantization_config"])
    config.maybe_update_config(str(path), hf_config=None)
    h, i, e = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"]
    loaders = {}
    for name, t in load_file(str(path / "model.safetensors")).items():
        parts = name.split(".")
        if "experts" not in parts or not parts[parts.index("experts") + 1].isdigit():
            continue
        layer_name = ".".join(parts[:parts.index("experts") + 1])
        if layer_name not in loaders:
            geom = ExpertGeometry(layer_name, h, i, e, e)
            params = {n: torch.zeros(s, dtype=torch.uint8)
                      for n, s in geom.param_shapes(with_bias=False).items()}
            loaders[layer_name] = ExpertWeightLoader(geom, config.settings, params, lambda g: g, list(range(e)))
        expert, proj, suffix = int(parts[-3]), parts[-2], parts[-1]
        loaders[layer_name].load_expert(expert, _PROJ_SHARD[proj], "scales" if suffix == "weight_scale" else "codes",
                                        t)
    for loader in loaders.values():
        loader.check_complete()


def test_good_checkpoint_loads_on_every_side(good):
    _, ckpt = good
    _engine_load(ckpt)
    assert len(load_packed_experts(ckpt)) == 48


@pytest.mark.parametrize("case", list(CASES))
def test_engine_learner_and_inspect_refuse_with_the_same_message(good, case):
    root, ckpt = good
    bad = make_case(ckpt, root, case)
    pattern = CASES[case][2]
    with pytest.raises(ValueError, match=pattern) as engine:
        _engine_load(bad)
    with pytest.raises(ValueError, match=pattern) as learner:
        load_mxfp4_model(bad, mode="lora", lora=None)
    with pytest.raises(ValueError, match=pattern) as inspect:
        load_packed_experts(bad)
    assert str(learner.value) == str(inspect.value)
    # the engine reads quantization_config before it knows the path: same message after the location prefix
    assert str(engine.value).split("quantization_config: ")[-1] == str(learner.value).split("quantization_config: ")[-1]


def test_settings_refuse_codec_version_with_both_versions_named():
    qc = {"quant_method": "mxfp4_rl", "profile": "flashinfer", "format": "native", "block_size": 32}
    assert settings_from_quant_config({**qc, "codec_version": 1}).profile == "flashinfer"
    with pytest.raises(ValueError, match=r"codec_version 99 is newer than this reader's codec \(version 1\)"):
        settings_from_quant_config({**qc, "codec_version": 99})


def test_hub_id_checks_what_the_config_proves(good):
    """A hub id (no local config.json to read ahead): the hook still refuses a quantization_config whose format
    contradicts the model's architecture, with the message inspect and the learner give; a consistent one passes."""
    from types import SimpleNamespace

    from common.errors import CheckpointError

    _, ckpt = good
    qc = read_config(ckpt)["quantization_config"]
    MXFP4RLConfig.from_config(qc).maybe_update_config("some-org/some-model", hf_config=SimpleNamespace(
        model_type="qwen3_moe"))
    labelled = {**qc, "format": "gpt-oss"}
    with pytest.raises(CheckpointError, match="format 'gpt-oss' is not available for model_type 'qwen3_moe'"):
        MXFP4RLConfig.from_config(labelled).maybe_update_config("some-org/some-model", hf_config=SimpleNamespace(
            model_type="qwen3_moe"))
