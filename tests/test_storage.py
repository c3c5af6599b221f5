"""Runs on object storage, against a real S3 server (SeaweedFS, the `s3` fixture): the storage
module, the run log's parts, the storage benchmark, and one-line errors for every way a storage
URI can be wrong. (The 2-worker run on S3 with a killed worker is in test_train.py, beside the
uninterrupted run it is compared with.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hydra_ray import storage
from hydra_ray.runlog import RunLog, read_lines, read_records

from conftest import tiny_config


# --------------------------------------------------------------------------- the storage module
@pytest.mark.parametrize("where", ["local", "s3"])
def test_storage_reads_writes_lists_and_deletes_alike(where, s3, tmp_path):
    base = str(tmp_path / "store") if where == "local" else f"{s3}/unit-{os.getpid()}"
    storage.check_storage(base)
    storage.write_text(storage.join(base, "a", "b.txt"), "hello")
    storage.write_bytes(storage.join(base, "a", "c.bin"), b"\x00\x01")
    assert storage.read_text(storage.join(base, "a", "b.txt")) == "hello"
    assert storage.listdir(storage.join(base, "a")) == [("b.txt", False), ("c.bin", False)]
    assert storage.walk_files(base) == ["a/b.txt", "a/c.bin"]
    assert storage.is_file(storage.join(base, "a", "b.txt")) and storage.is_dir(storage.join(base, "a"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "nope"))
    storage.delete(storage.join(base, "a", "b.txt"))
    assert storage.listdir(storage.join(base, "a")) == [("c.bin", False)]
    assert storage.listdir(storage.join(base, "missing")) == []
    assert not list(Path.cwd().glob("s3:*")) and not list(tmp_path.glob("**/s3:*"))


def test_the_run_log_writes_parts_and_restarts_exactly_once(s3):
    """Parts end at checkpoints; a restart from step S drops what came after S; the reader
    merges parts into one record per step."""
    run = f"{s3}/runlog-{os.getpid()}"
    log = RunLog(run, flush_interval_s=0, tensorboard=False)
    log.restart(0)
    for step in range(1, 9):
        log.write({"step": step, "loss": float("nan") if step == 3 else 1.0 / step}, flush=True)
        if step in (4, 8):
            log.end_part()  # checkpoints at 4 and 8
    log.event(event="started")
    assert [n for n, _ in storage.listdir(f"{run}/metrics")] == ["part-0000000001.jsonl", "part-0000000005.jsonl"]
    again = RunLog(run, flush_interval_s=0, tensorboard=False)  # resumed from checkpoint 4
    again.restart(4)
    assert [n for n, _ in storage.listdir(f"{run}/metrics")] == ["part-0000000001.jsonl"]
    for step in range(5, 7):
        again.write({"step": step, "loss": 2.0}, flush=True)
    again.close()
    recs = read_records(run, "metrics")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[2]["loss"] is None and recs[4]["loss"] == 2.0  # strict JSON: NaN is null
    assert len(list(read_lines(run, "metrics"))) == 6  # every step once, in the raw parts too
    assert [e["event"] for e in read_records(run, "events")] == ["started"]


# --------------------------------------------------------------------------- bad storage input
@pytest.mark.parametrize("case", ["scheme", "bucket", "credentials", "endpoint", "no-bucket"])
def test_bad_storage_is_a_one_line_error_before_training(case, s3, builtin_cache, tmp_path, monkeypatch, capsys):
    from hydra_ray.cli import main
    from hydra_ray.config import dump_config

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(dump_config(tiny_config(builtin_cache)))
    uri, names = {"scheme": ("foo://bucket/runs", ["unknown storage scheme 'foo'"]),
                  "bucket": ("s3://no-such-bucket/runs", ["bucket 'no-such-bucket' does not exist"]),
                  "credentials": (f"{s3}/runs", ["access denied"]),
                  "endpoint": (f"{s3}/runs", ["cannot reach the storage endpoint"]),
                  "no-bucket": ("s3:///runs", ["Missing bucket name"])}[case]
    if case == "credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    if case == "endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--config", str(cfg), "--workers", "1", "--storage", uri, "--max-steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --storage "), err
    for n in names + [uri.rstrip("/")] * (case != "no-bucket"):
        assert n in err[0], (n, err[0])
    assert not list(tmp_path.glob("**/s3:*")) and not list(tmp_path.glob("**/foo:*"))


def test_storage_benchmark_times_checkpoints_on_s3_beside_local_disk(s3, capsys):
    from hydra_ray.benchmarks import storage as bench

    res = bench.run(f"{s3}/bench", config="tiny", rounds=1)
    out = capsys.readouterr().out
    assert res["checkpoint_mb"] > 1 and res["write_ratio"] > 0 and res["read_ratio"] > 0
    assert "local disk" in out and "read+verify" in out
    assert storage.walk_files(f"{s3}/bench") == []  # the benchmark leaves no checkpoint behind


def test_a_poller_reads_only_the_parts_that_can_hold_new_steps(s3):
    run = f"{s3}/poll-{os.getpid()}"
    log = RunLog(run, flush_interval_s=0, tensorboard=False)
    log.restart(0)
    for step in range(1, 31):
        log.write({"step": step}, flush=True)
        if step % 10 == 0:
            log.end_part()
    log.close()
    assert [r["step"] for r in read_records(run, "metrics", after=24)] == list(range(25, 31))
    assert {storage.name(p) for p, _, _ in read_lines(run, "metrics", after=24)} == {"part-0000000021.jsonl"}
    assert {storage.name(p) for p, _, _ in read_lines(run, "metrics", after=20)} == {"part-0000000021.jsonl"}
    assert len({p for p, _, _ in read_lines(run, "metrics", after=19)}) == 2
