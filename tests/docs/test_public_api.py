"""What the docs call after a plain `import mxfp4_train` / `import common` is reachable, and importing the learner
pulls in neither vLLM nor triton (a learner process may have neither; vLLM would also set up its own logging)."""

import json
import subprocess
import sys

# Dotted names the README and docs/ use after `import mxfp4_train` (issue 25: `mxfp4_train.export.export_for_engine`
# raised AttributeError because the submodule was not imported).
DOCUMENTED = [
    "mxfp4_train.convert", "mxfp4_train.load_mxfp4_model", "mxfp4_train.save_adapters", "mxfp4_train.LoRASpec",
    "mxfp4_train.save_mxfp4_checkpoint", "mxfp4_train.export.export_for_engine", "mxfp4_train.sync.sync",
    "mxfp4_train.sync.connect", "mxfp4_train.sync.merge_lora", "mxfp4_train.parity.parity",
    "common.quantize", "common.dequantize", "common.fake_quant", "common.fake_quant_mxfp8",
]
HEAVY = ["vllm", "triton", "mxfp4_serve"]


def test_documented_names_resolve_after_a_plain_import_without_vllm_or_triton():
    code = f"""
import json, sys
import common, mxfp4_train
missing = []
for dotted in {DOCUMENTED!r}:
    obj = sys.modules[dotted.split(".")[0]]
    try:
        for part in dotted.split(".")[1:]:
            obj = getattr(obj, part)
    except AttributeError as exc:
        missing.append(f"{{dotted}}: {{exc}}")
print(json.dumps({{"missing": missing, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["missing"] == []
    assert result["heavy"] == [], f"import mxfp4_train imported {result['heavy']}"
