"""`mxfp4-rl`: convert, inspect and demo MXFP4 MoE checkpoints.

  mxfp4-rl quantize SRC DST [--profile P] [--format native|gpt-oss|deepseek-v4] [--max-shard-size 5GB]
  mxfp4-rl inspect CKPT [--json]
  mxfp4-rl example [--arch qwen3_moe] [--out DIR]

Other installed packages add subcommands through the entry-point group `mxfp4_rl.commands`: each entry point is a
callable `register(subparsers)` that adds its subparser and sets `func(args) -> int | None` as default. They are
loaded when the parser is built (not at import) and a broken one only prints a warning.

Every failure ends in one line `mxfp4-rl: error: ...` naming the file or tensor and exit 2 (bad input: MXFP4Error,
ValueError; the filesystem: OSError; a corrupt safetensors file); SIGTERM during `quantize` removes the staging
directory and exits 143, Ctrl-C 130; a reader that closes the pipe (`mxfp4-rl inspect X | head -1`) ends it quietly
with exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from .errors import MXFP4Error

PROG = "mxfp4-rl"
ENTRY_POINT_GROUP = "mxfp4_rl.commands"


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .checkpoint import quantize_checkpoint

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = quantize_checkpoint(args.src, args.dst, profile=args.profile, fmt=args.format,
                              max_shard_bytes=args.max_shard_size, progress=not args.quiet, device=device)
    print(f"wrote {out} (profile {args.profile}, format {args.format}, quantized on {device})")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint.inspect import format_report, inspect_checkpoint

    report = inspect_checkpoint(args.ckpt)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _verify_example(src: Path, dst: Path, profile: str) -> str:
    """Re-read every packed expert from disk and compare it bit for bit with quantize(bf16 source)."""
    from .api import quantize
    from .checkpoint import CheckpointReader, load_packed_experts
    from .checkpoint.archs import arch_spec

    spec = arch_spec(json.loads((src / "config.json").read_text()))
    packed = load_packed_experts(dst)
    with CheckpointReader(src) as reader:
        for name in reader.names():
            m = spec.match(name)
            if m is None:
                continue
            w = reader.get(name)
            if m.expert is None:  # gpt-oss fused [E, K, N], gate/up columns interleaved
                pairs = [((m.layer, e, p), w[e][:, c::2].t() if m.proj == "gate_up" else w[e].t())
                         for e in range(w.shape[0])
                         for p, c in ((("gate", 0), ("up", 1)) if m.proj == "gate_up" else (("down", 0),))]
            else:
                pairs = [((m.layer, m.expert, m.proj), w)]
            for key, ref in pairs:
                if not packed[key].equal(quantize(ref, profile=profile)):
                    raise MXFP4Error(f"expert {key} of '{name}' differs after the round trip through disk")
    return (f"verified: all {len(packed)} packed expert tensors read back from disk equal quantize(bf16 source) "
            f"bit for bit")


def _cmd_example(args: argparse.Namespace) -> int:
    from .checkpoint import quantize_checkpoint, write_tiny_checkpoint
    from .checkpoint.inspect import format_report, inspect_checkpoint

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mxfp4-rl-example-"))
    src, dst = out / f"{args.arch}-bf16", out / f"{args.arch}-mxfp4"
    for d in (src, dst):
        if d.exists() and any(d.iterdir()):
            raise ValueError(f"'{d}' exists and is not empty; pass a new --out directory")
    write_tiny_checkpoint(src, arch=args.arch, seed=args.seed)
    quantize_checkpoint(src, dst, profile=args.profile, fmt=args.format, progress=not args.quiet)
    print(f"tiny bf16 {args.arch} checkpoint: {src}\nMXFP4 checkpoint ({args.profile}, {args.format}): {dst}\n")
    print(format_report(inspect_checkpoint(dst), max_rows=args.rows))
    print(_verify_example(src, dst, args.profile))
    return 0


def _add_core_commands(sub) -> None:
    from .checkpoint.archs import FORMATS
    from .checkpoint.tiny import ARCHS
    from .profiles import DEFAULT_PROFILE, profile_names

    profiles = list(profile_names())
    q = sub.add_parser("quantize", help="convert the routed experts of a bf16 MoE checkpoint to MXFP4")
    q.add_argument("src", help="Hugging Face model directory (safetensors, single file or sharded)")
    q.add_argument("dst", help="new (or empty) output directory")
    q.add_argument("--profile", default=DEFAULT_PROFILE, choices=profiles,
                   help=f"codec profile recorded in quantization_config (default {DEFAULT_PROFILE})")
    q.add_argument("--format", default="native", choices=FORMATS, help="expert tensor layout (default native)")
    q.add_argument("--max-shard-size", default=None, help="e.g. 5GB; default: one model.safetensors")
    q.add_argument("--device", default="auto", help="where to quantize experts: auto (cuda if available), cpu, cuda")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_quantize)

    i = sub.add_parser("inspect", help="per-tensor format, shape, profile, scale histogram and audit hash")
    i.add_argument("ckpt", help="checkpoint directory")
    i.add_argument("--json", action="store_true", help="machine-readable report")
    i.set_defaults(func=_cmd_inspect)

    e = sub.add_parser("example", help="build a tiny bf16 MoE checkpoint, quantize it and inspect the result")
    e.add_argument("--arch", default="qwen3_moe", choices=ARCHS)
    e.add_argument("--out", default=None, help="directory to write into (default: a new temporary directory)")
    e.add_argument("--profile", default=DEFAULT_PROFILE, choices=profiles)
    e.add_argument("--format", default="native", choices=FORMATS)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--rows", type=int, default=12, help="expert rows shown in the report")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_example)


def _add_plugin_commands(sub) -> None:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()(sub)
        except Exception as exc:  # a broken plugin must never take the CLI down
            print(f"{PROG}: warning: skipping command plugin '{ep.name}' ({ep.value}): "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="One MXFP4 codec for the RL learner and the vLLM engine.")
    parser.add_argument("-q", "--quiet", dest="quiet_logs", action="store_true",
                        help="only warnings and errors on stderr (results still go to stdout)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_core_commands(sub)
    _add_plugin_commands(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _stdout_closed() -> None:
    """The reader went away (`| head`): send what is left of stdout to /dev/null so that the interpreter's final
    flush does not print a BrokenPipeError either (Python docs, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout replaced by an object without a file descriptor (tests)
        pass


def main(argv: list[str] | None = None) -> int:
    from safetensors import SafetensorError

    from .checkpoint.convert import Terminated
    from .log import setup_command_logging

    args = build_parser().parse_args(argv)
    # Results are printed on stdout; progress and messages go through logging on stderr (common/log.py).
    # `mxfp4-rl -q CMD` is `CMD -q` too: no progress bars either.
    args.quiet = args.quiet_logs or getattr(args, "quiet", False)
    setup_command_logging(quiet=args.quiet)
    try:
        rc = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_closed()
        return 0
    except Terminated:
        print(f"{PROG}: terminated by SIGTERM; the partial output was removed", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the partial output was removed", file=sys.stderr)
        return 130
    except (MXFP4Error, ValueError, OSError, SafetensorError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    return 0 if rc is None else int(rc)


if __name__ == "__main__":
    sys.exit(main())
