"""GPUs that nvidia-smi shows but torch cannot use stop a stage with one line, never a silent
run on the CPU; the count follows CUDA_VISIBLE_DEVICES.

A stand-in ``nvidia-smi`` on PATH plays a machine with two GPUs and an old driver (the CPU
torch here cannot use them, exactly as a CUDA 13.0 torch cannot with driver 570).
"""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
from conftest import run_cli

from nanochat import gpus

FAKE_SMI = textwrap.dedent("""\
    #!/bin/sh
    case "$*" in
      -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"
          echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)" ;;
      *driver_version*) echo "570.86.15"; echo "570.86.15" ;;
      *) echo "NVIDIA-SMI 570.86.15" ;;
    esac
""")


@pytest.fixture
def two_gpus(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return bin_dir


def test_count_and_driver_follow_nvidia_smi_and_the_mask(two_gpus, monkeypatch):
    assert gpus.visible_gpus() == 2 and gpus.visible_ids() is None
    assert gpus.driver_version() == "570.86.15"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert (gpus.visible_gpus(), gpus.visible_ids()) == (1, ["1"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus.visible_gpus() == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,1")  # CUDA stops at the invalid entry
    assert (gpus.visible_gpus(), gpus.visible_ids()) == (1, ["0"])


def test_the_reason_names_the_driver_and_the_cuda_the_wheel_needs(two_gpus):
    line = gpus.unusable_reason("2.13.0+cu130", "13.0")
    assert "2 NVIDIA GPU(s) are visible (nvidia-smi, driver 570.86.15)" in line
    assert "built for CUDA 13.0, which needs NVIDIA driver >= 580" in line
    assert "CUDA_VISIBLE_DEVICES=''" in line and "\n" not in line


def test_a_stage_with_unusable_gpus_stops_before_any_work(two_gpus):
    """runtime.start() is where every torch stage picks its device: it exits 2 there."""
    probe = "from nanochat import runtime; runtime.start(); print('trained on the CPU')"
    result = run_cli([sys.executable, "-c", probe], env={"PATH": os.environ["PATH"]})
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: 2 NVIDIA GPU(s) are visible (nvidia-smi, driver 570.86.15)")
    assert "CPU-only build" in lines[0]


def test_cpu_on_purpose_still_runs(two_gpus):
    probe = "from nanochat import runtime; print(runtime.start().device)"
    env = {"PATH": os.environ["PATH"], "CUDA_VISIBLE_DEVICES": ""}
    result = run_cli([sys.executable, "-c", probe], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cpu"
