"""Device-only: the model's invariants on a GPU (benchmarks/device_check.py over every variant of the
registry), skipped where there is none. The CPU suite runs the same script on the CPU against itself
(tests/tooling/test_benchmarks.py); this is the check a GPU session runs first."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device-only test: no CUDA device on this machine")
def test_every_variant_keeps_its_invariants_on_the_gpu(tmp_path):
    output = tmp_path / "device-check.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--device", "cuda", "--output", str(output)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    result = json.loads(output.read_text())
    assert done.returncode == 0 and result["failures"] == [], done.stdout[-3000:]
