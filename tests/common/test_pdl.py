"""common.kernels.pdl: which launches use programmatic dependent launch, and with which kernel constexpr."""

from __future__ import annotations

import pytest
import torch

from common.kernels import pdl


def test_launch_options_per_mode():
    assert pdl.launch_options(0) == {"PDL": 0}  # no launch_pdl option at all: Triton's default launch
    assert pdl.launch_options(pdl.MODES["wait"]) == {"PDL": 1, "launch_pdl": True}
    assert pdl.launch_options(pdl.MODES["loop"]) == {"PDL": 3, "launch_pdl": True}
    # a kernel without a K loop signals at its start in mode "loop"
    assert pdl.launch_options(pdl.MODES["loop"], small=True) == {"PDL": 2, "launch_pdl": True}


def test_mode_defaults_to_loop_never_off_cuda_and_refuses_a_bad_value(monkeypatch):
    """The default ("loop": H100, seventh round of bench/RESULTS.md) on sm_90+ CUDA tensors only."""
    t = torch.zeros(1)
    monkeypatch.delenv("MXFP4_PDL", raising=False)
    assert pdl.envs.PDL.default == "loop" and pdl.mode(t) == 0  # a CPU tensor: never
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9 and pdl.AVAILABLE:
        assert pdl.mode(t.cuda()) == pdl.MODES["loop"]
    monkeypatch.setenv("MXFP4_PDL", "off")
    if torch.cuda.is_available():
        assert pdl.mode(t.cuda()) == 0
    monkeypatch.setenv("MXFP4_PDL", "early")
    assert pdl.mode(t) == 0  # a CPU tensor (the interpreter, or torch's own path): never
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9 and pdl.AVAILABLE:
        assert pdl.mode(t.cuda()) == pdl.MODES["early"]
    monkeypatch.setenv("MXFP4_PDL", "yes")
    with pytest.raises(ValueError, match=r"MXFP4_PDL must be one of \('off', 'wait', 'early', 'loop'\), got 'yes'"):
        pdl.mode(t)
