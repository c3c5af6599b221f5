"""`make gpu-check` where there is no GPU: a skip line and exit 0; and the whole script rehearsed on
the CPU the way the GPU image runs it: without Ray (any import of it fails), from the checkout's
package view, every step reported."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_without_a_gpu_prints_a_skip_line_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("PYTHONUNBUFFERED")]
    assert len(lines) == 1 and lines[0].startswith("gpu-check: SKIPPED, no CUDA device here"), r.stdout


@pytest.mark.slow
def test_gpu_check_rehearsed_on_cpu_runs_every_step_without_ray(tmp_path, builtin_cache):
    no_ray = tmp_path / "no_ray"
    (no_ray / "ray").mkdir(parents=True)
    (no_ray / "ray" / "__init__.py").write_text('raise ImportError("no Ray on the GPU image")\n')
    out = tmp_path / "report" / "gpu-check.md"
    env = {**os.environ, "PYTHONPATH": str(no_ray), "HYDRA_CACHE_DIR": str(builtin_cache)}
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-rehearsal", "--steps", "14", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    text = out.read_text()
    for section in ("## 1. Kernel tests", "## 2. bench dispatch", "## 3. 14 training steps", "## 4. Save, restore",
                    "## 5. bench train"):
        assert section in text
    assert "FAILED" not in text and "**all steps passed**" in text
    assert " passed" in text.split("## 1.")[1].split("## 2.")[0]  # the kernel tests ran and passed
    assert "14 steps logged of 14" in text and "expert all-to-all ran: True" in text
    assert "equal to the saved ones: True" in text
    for phase in ("foundation", "mor", "mod", "moe", "forced", "teacher", "general"):
        assert f"| {phase} |" in text
    assert "MFU" in text and "routing overhead" in text
    assert (out.parent / "gpu-check.json").exists()
