"""The `hydra-ray` console script, run as a subprocess: summary (--json), smoke, one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error
from conftest import run_cli as hydra_ray

pytestmark = pytest.mark.integration  # every test runs the console script in a subprocess

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "hydra-ray"
PHASE_NAMES = ["foundation", "mor", "mod", "moe", "forced", "teacher", "general"]


def summary_json(config: str) -> dict:
    r = hydra_ray("summary", "--config", config, "--json")
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    info = json.loads(out)  # the whole of stdout is exactly one JSON document
    assert isinstance(info, dict)
    return info


# ---------------------------------------------------------------------------------------------
# summary


def test_console_script_is_installed():
    assert SCRIPT.exists(), f"{SCRIPT} missing: is the package installed into this venv?"


def test_summary_json_hydra_500m():
    info = summary_json("configs/hydra-500m.yaml")
    for key in ("total_params", "active_params", "flops_per_token"):
        assert isinstance(info[key], int) and info[key] > 0, key
    assert abs(info["total_params"] - 500e6) <= 0.05 * 500e6, info["total_params"]
    assert info["active_params"] < info["total_params"]
    assert info["flops_per_token"] > 0
    assert info["phases"] == PHASE_NAMES


def test_summary_json_tiny_preset():
    info = summary_json("tiny")
    for key in ("total_params", "active_params", "flops_per_token"):
        assert isinstance(info[key], int) and info[key] > 0, key
    assert info["active_params"] < info["total_params"]
    assert info["total_params"] < 10e6  # a CPU demo model
    assert info["phases"] == PHASE_NAMES


@pytest.mark.parametrize(
    "text,names",
    [
        ("model: {n_heads: 3}\n", ["model.n_heads"]),
        ("model: {moe: {bogus: 1}}\n", ["model.moe.bogus"]),
        ("train: {batch_size: 0}\n", ["train.batch_size"]),
        ("model: [1, 2\n", ["YAML"]),
    ],
    ids=["n_heads", "unknown-key", "batch_size", "yaml-syntax"],
)
def test_summary_bad_config(tmp_path, text, names):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    r = hydra_ray("summary", "--config", str(p), "--json")
    assert r.stdout == ""
    assert_one_line_error(r, str(p), *names)


def test_summary_missing_file(tmp_path):
    p = tmp_path / "missing.yaml"
    r = hydra_ray("summary", "--config", str(p))
    assert r.stdout == ""
    assert_one_line_error(r, str(p))


def test_smoke_bad_config(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("curriculum: {phases: [{name: a, until_step: 10, routing: forced}]}\n")
    r = hydra_ray("smoke", "--config", str(p), "--steps", "2")
    assert_one_line_error(r, str(p), "curriculum.phases.0", "routing")


# ---------------------------------------------------------------------------------------------
# smoke: a compressed curriculum walk


@pytest.fixture(scope="module")
def smoke14() -> subprocess.CompletedProcess:
    return hydra_ray("smoke", "--config", "tiny", "--steps", "14")


def visited_phases(out: str) -> list[str]:
    return re.findall(r"\bphase (\w+)", out)


@pytest.mark.slow
def test_smoke_tiny_14_steps_runs(smoke14):
    r = smoke14
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    out = r.stdout + r.stderr
    assert "14 steps" in out
    visited = visited_phases(out)
    # phases are entered in curriculum order, each once, from the first to the last
    assert visited == [p for p in PHASE_NAMES if p in visited]
    assert visited[0] == "foundation" and visited[-1] == "general"
    # the per-phase loss summary names every phase that ran, with a finite loss
    losses = dict(re.findall(r"(\w+) (\d+\.\d+)", out.splitlines()[-1]))
    assert set(visited) <= set(losses)


@pytest.mark.slow
def test_smoke_tiny_14_steps_visits_all_seven_phases(smoke14):
    assert smoke14.returncode == 0
    assert visited_phases(smoke14.stdout + smoke14.stderr) == PHASE_NAMES
