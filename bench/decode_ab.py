"""A/B of the grouped GEMMs' decode choices, for benches only (imported by moe.py and layer_graph.py).

Production has no switch for them: `ops.decode_mode` picks the weight-tile decode by device (bf16x2 PTX on sm_90+,
the fp32 bit placement under the interpreter and on older GPUs) and `ops._use_words` picks per call between the
word decode (up to `ops.WORDS_MAX_BUCKET` rows per expert, and always on kb-major codes) and the byte decode.
`forced` patches those choices in this process, so that a bench times the alternative on the same GPU.
The autotuner's key does not hold the decode: choose it before the first autotuned launch of a process (the word
and byte decodes differ in the codes' dtype, which the key does hold, so those two may alternate).
"""

from __future__ import annotations

import contextlib

from common.grouped_gemm import ops
from common.grouped_gemm.layout import is_kb_major

DECODES = ("auto", "bits")
WORDS = ("auto", "off")


@contextlib.contextmanager
def forced(decode: str = "auto", words: str = "auto"):
    """decode "bits": the fp32 bit-placement decode even where bf16x2 runs; words "off": canonical codes through
    the byte decode at every batch size (kb-major codes keep the word decode, the only one that reads them).
    "auto": production's choice."""
    if decode not in DECODES or words not in WORDS:
        raise ValueError(f"decode must be one of {DECODES} and words one of {WORDS}, got {decode!r}, {words!r}")
    saved = ops.decode_mode, ops._use_words
    if decode == "bits":
        ops.decode_mode = lambda: "bits"
    if words == "off":
        auto = saved[1]
        ops._use_words = lambda codes, *a, **kw: is_kb_major(codes) and auto(codes, *a, **kw)
    try:
        yield
    finally:
        ops.decode_mode, ops._use_words = saved
