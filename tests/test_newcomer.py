"""A newcomer's own mistakes and own files: every CLI mistake is a one-line error (exit 2) before
any work starts, a run that cannot make progress stops with a non-zero exit, and a run trained
with its own tokenizer resumes and serves from any working directory."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from conftest import assert_one_line_error, tiny_config
from conftest import run_cli as hydra_ray



def _tiny_yaml(path: Path, cache: str, train: dict | None = None, **data) -> Path:
    from hydra_ray.config import dump_config

    cfg = tiny_config(cache, **(train or {}))
    for k, v in data.items():
        setattr(cfg.data, k, v)
    path.write_text(dump_config(cfg))
    return path


# --------------------------------------------------------------------------- one-line CLI errors
@pytest.mark.integration  # the console script, in a subprocess
@pytest.mark.parametrize("case", ["max-steps-0", "resume-missing", "empty", "list", "tokenizer", "typo", "resources",
                                  "custom-resource-locally", "resize-interval", "name"])
def test_train_mistakes_are_one_line_errors_before_any_work(case, tmp_path, builtin_cache):
    cfg = _tiny_yaml(tmp_path / "tiny.yaml", builtin_cache)
    args = ["train", "--config", str(cfg), "--workers", "1", "--storage", str(tmp_path / "runs")]
    names: tuple[str, ...]
    if case == "max-steps-0":
        args += ["--max-steps", "0"]
        names = ("--max-steps 0", "at least 1")
    elif case == "name":
        args += ["--name", "a+b"]  # a run name must also be a checkpoint id (RUN@STEP) for eval and serve
        names = ("--name 'a+b'", "letters, digits")
    elif case == "resume-missing":
        args += ["--name", "nope", "--resume"]
        names = ("--resume", str(tmp_path / "runs" / "nope"), "no checkpoints")
    elif case == "empty":
        cfg.write_text("# nothing here yet\n")
        names = ("the config is empty",)
    elif case == "list":
        cfg.write_text("- model\n- train\n")
        names = ("expected a mapping", "list")
    elif case == "tokenizer":
        _tiny_yaml(cfg, builtin_cache, tokenizer="missing-tok.json")
        names = ("data.tokenizer", "missing-tok.json", "no such file")
    elif case == "resources":
        args += ["--resources-per-worker", '{"trainer": -1}']
        names = ("--resources-per-worker", "non-negative")
    elif case == "custom-resource-locally":  # no cluster declares it: it would wait forever
        args += ["--resources-per-worker", '{"trainer": 1}']
        names = ("trainer", "only a cluster whose node types declare them")
    elif case == "resize-interval":
        args += ["--resize-interval", "0"]
        names = ("--resize-interval 0", "positive")
    else:
        cfg.write_text(cfg.read_text().replace("  lr:", "  lrr:"))
        names = ("train.lrr", "did you mean lr?")
    assert_one_line_error(hydra_ray(*args), *names)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("metrics"))
    assert not any(tmp_path.glob("**/s3:*"))


def test_serve_mistakes_are_one_line_errors(tiny_run, tmp_path):
    """A busy port, a corrupt checkpoint, a missing tokenizer and a bare --store: each one line,
    exit 2, before Ray starts."""
    _, run_dir = tiny_run
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(hydra_ray("serve", "--run", str(run_dir), "--port", str(port)), f"--port {port}", "in use")
    broken = tmp_path / "broken"
    shutil.copytree(run_dir / "checkpoints" / "step_00000180", broken / "checkpoints" / "step_00000180")
    (broken / "checkpoints" / "step_00000180" / "model.safetensors").write_bytes(b"truncated")
    assert_one_line_error(hydra_ray("serve", "--run", str(broken)), "model.safetensors does not match the manifest")
    # a checkpoint whose config names a tokenizer file that is not there (manifest kept consistent)
    notok = tmp_path / "notok" / "checkpoints" / "step_00000180"
    shutil.copytree(run_dir / "checkpoints" / "step_00000180", notok)
    cfg = (notok / "config.yaml").read_text().replace("tokenizer: byte", "tokenizer: tokenizer.json")
    _rewrite(notok, "config.yaml", cfg.encode())
    assert_one_line_error(hydra_ray("serve", "--run", str(notok.parent.parent)), "tokenizer", "no such file")
    assert_one_line_error(hydra_ray("serve", "--store", str(run_dir.parent)), "--store needs --model")


def _rewrite(ckpt_dir: Path, name: str, data: bytes) -> None:
    import hashlib

    (ckpt_dir / name).write_bytes(data)
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt_dir / "manifest.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- no silent empty runs
@pytest.mark.integration
def test_a_run_of_nan_steps_with_nothing_to_roll_back_to_stops_with_an_error(tmp_path, ray_session, builtin_cache,
                                                                              capsys):
    """Every step NaN and no checkpoint yet: the run stops after max_nan_skips steps, exit 1, and
    says why; metrics.jsonl stays strict JSON (no bare NaN)."""
    from hydra_ray.cli import main

    cfg = _tiny_yaml(tmp_path / "tiny.yaml", builtin_cache, train={"log_every": 1, "inject_nan_steps": list(range(10))})
    rc = main(["train", "--config", str(cfg), "--workers", "1", "--max-steps", "10", "--storage",
               str(tmp_path), "--name", "nan"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "3 NaN/Inf steps in a row" in err and "no checkpoint to roll back to" in err
    from hydra_ray.runlog import read_lines, read_records

    events = read_records(str(tmp_path / "nan"), "events")
    assert [e["event"] for e in events].count("nan_skipped") == 3 and events[-1]["event"] == "stopped"
    lines = [line for _, _, line in read_lines(str(tmp_path / "nan"), "metrics")]
    assert len(lines) == 3
    for line in lines:
        rec = json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in the metrics"))
        assert rec["nan_skipped"] and rec["loss"] is None and rec["grad_norm"] is None


# --------------------------------------------------------------------------- portable runs
@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, ray_session, builtin_cache):
    """A run trained with its own tokenizer.json (named relatively, from the user's folder), whose
    original tokenizer file is deleted afterwards: only the run's copy remains."""
    import pyarrow.parquet as pq

    from hydra_ray.cli import main
    from hydra_ray.data.pipeline import builtin_corpus
    from hydra_ray.data.tokenizer import train_bpe

    home = tmp_path_factory.mktemp("user")
    corpus = Path(builtin_corpus(tiny_config(builtin_cache), log=lambda *_: None))
    texts = [t for f in sorted(corpus.glob("*/*.parquet"))[:8] for t in pq.read_table(f).column("text").to_pylist()]
    train_bpe(texts, 264, home / "tok.json")
    cfg = _tiny_yaml(home / "mine.yaml", builtin_cache, tokenizer="tok.json")
    cwd = os.getcwd()
    os.chdir(home)
    try:
        rc = main(["train", "--config", "mine.yaml", "--workers", "1", "--max-steps", "2", "--storage", "runs"])
    finally:
        os.chdir(cwd)
    assert rc == 0
    (home / "tok.json").rename(home / "tok.json.bak")
    return home, home / "runs" / "mine", cfg


@pytest.mark.integration
def test_the_tokenizer_travels_with_the_run_and_its_checkpoints(bpe_run):
    import yaml

    from hydra_ray.data.tokenizer import file_sha256

    home, run, _ = bpe_run
    sha = file_sha256(home / "tok.json.bak")
    assert file_sha256(run / "tokenizer.json") == sha
    data = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert (data["tokenizer"], data["tokenizer_sha256"]) == ("tokenizer.json", sha)
    step = run / "checkpoints" / "step_00000002"
    assert file_sha256(step / "tokenizer.json") == sha
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["files"]["tokenizer.json"]["sha256"] == sha
    assert yaml.safe_load((step / "config.yaml").read_text())["data"]["tokenizer"] == "tokenizer.json"


@pytest.mark.integration
def test_a_run_resumes_from_another_folder_with_its_own_tokenizer_copy(bpe_run, tmp_path, monkeypatch):
    """The user's tok.json is gone and the command runs elsewhere: --resume uses the run's copy;
    a different tokenizer file is refused."""
    from hydra_ray.cli import main

    home, run, cfg = bpe_run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc = main(["train", "--config", str(cfg), "--workers", "1", "--max-steps", "3", "--storage", str(run.parent),
               "--name", "mine", "--resume"])
    assert rc == 0 and (run / "checkpoints" / "step_00000003").is_dir()
    other = tmp_path / "tok.json"
    other.write_text((run / "tokenizer.json").read_text().replace('"<|pad|>"', '"<|padding|>"'))
    shutil.copy(cfg, tmp_path / "mine.yaml")
    r = hydra_ray("train", "--config", str(tmp_path / "mine.yaml"), "--workers", "1", "--max-steps", "4",
                  "--storage", str(run.parent), "--name", "mine", "--resume", cwd=elsewhere)
    assert_one_line_error(r, "differs from the tokenizer run", "was trained with")


@pytest.mark.integration
def test_a_run_serves_from_another_folder(bpe_run, tmp_path):
    """`hydra-ray serve --run` from an unrelated folder: one completion and one routing query over
    HTTP, with the run's tokenizer; only that run is listed, and the console has no Ray chatter."""
    _, run, _ = bpe_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = hydra_ray("serve", "--run", str(run), "--port", str(port), "--num-cpus", "0.5", "--smoke", cwd=tmp_path,
                  env={"RAY_AUTH_MODE": None})  # unset: Ray would print its token-auth notice
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[model] mine@" in r.stdout and "[routing]" in r.stdout
    assert all(f"[{d}] " in r.stdout for d in ("math", "code", "chat", "finefineweb"))  # one completion each
    chatter = [line for line in (r.stdout + r.stderr).splitlines()
               if any(w in line for w in ("INFO", "WARNING", "Token authentication", "Traceback", "failed"))]
    assert not chatter, chatter
