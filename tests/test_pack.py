"""Packing a corpus once into token shards and reusing it: the cache keyed by the corpus
fingerprint, repacking when the corpus, tokenizer or seq_len changes, two packers at once, shards
that changed since packing, `hydra-ray data pack --out` and training from `data.packed` on S3."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from hydra_ray.config import dump_config, parse_config
from hydra_ray.data.corpus import CorpusError
from hydra_ray.data.pipeline import prepare_data

from conftest import assert_one_line_error, run_cli

DOMAINS = ["math", "code", "chat", "finefineweb"]


def _corpus(root: Path, docs: int = 40) -> Path:
    for i, d in enumerate(DOMAINS):
        (root / d).mkdir(parents=True, exist_ok=True)
        for part in range(2):
            lines = [json.dumps({"text": f"{d} document {part}-{k}: " + "word " * (20 + 7 * k % 50)})
                     for k in range(docs)]
            (root / d / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _config(cache: str, corpus: Path, seq_len: int = 64, vocab: int = 264, **data):
    return parse_config({
        "model": {"vocab_size": vocab, "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "n_blocks": 1, "seq_len": seq_len},
        "curriculum": {"phases": [{"name": "all", "until_step": 20}]},
        "train": {"batch_size": 4, "log_every": 5, "save_every": 10, "eval_every": 10},
        "data": {"cache_dir": cache, "corpus": str(corpus), **data},
    })


class _Log(list):
    def __call__(self, *a):
        self.append(" ".join(map(str, a)))


@pytest.mark.integration
def test_a_pack_is_reused_until_the_corpus_tokenizer_or_seq_len_changes(tmp_path, ray_session):
    corpus, cache = _corpus(tmp_path / "corpus"), str(tmp_path / "cache")
    log = _Log()
    first = prepare_data(_config(cache, corpus), log=log)
    assert any(line.startswith("[data] packing") for line in log)
    log.clear()
    again = prepare_data(_config(cache, corpus), log=log)
    assert [line for line in log if line.startswith("[data]")] == [
        f"[data] reusing packed data {first.root} (fingerprint {first.extra['key'][:12]})"]
    assert again.root == first.root and again.counts == first.counts
    for d in DOMAINS:
        assert np.array_equal(again.windows("train", 64, d), first.windows("train", 64, d))
    # nothing but the pack itself in the cache: no temporary folders, no spilled chunks
    assert sorted(p.name for p in (tmp_path / "cache" / "packed").iterdir()) == [Path(first.root).name]
    assert not list(Path(first.root).glob("_work*"))
    # each change gives another pack (never the stale one)
    longer = prepare_data(_config(cache, corpus, seq_len=32), log=log)
    assert longer.root != first.root and longer.counts[32]["math"]["train"] > first.counts[64]["math"]["train"]
    with open(corpus / "math" / "part-1.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more math document"}) + "\n")
    changed = prepare_data(_config(cache, corpus), log=log)
    assert changed.root not in (first.root, longer.root)
    assert changed.stats["math"]["documents"] == first.stats["math"]["documents"] + 1
    from hydra_ray.data.tokenizer import train_bpe

    train_bpe((f"{d} document word " * 5 for d in DOMAINS * 50), 300, str(tmp_path / "tok" / "tokenizer.json"))
    bpe = prepare_data(_config(cache, corpus, vocab=304, tokenizer=str(tmp_path / "tok" / "tokenizer.json")), log=log)
    assert bpe.root not in (first.root, longer.root, changed.root)


@pytest.mark.integration
def test_two_runs_packing_the_same_corpus_at_once_leave_one_good_pack(tmp_path, ray_session):
    corpus, cache = _corpus(tmp_path / "corpus"), str(tmp_path / "cache")
    results, errors = [], []

    def prep():
        try:
            results.append(prepare_data(_config(cache, corpus), log=lambda *_: None))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=prep) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == [] and len(results) == 2
    assert results[0].root == results[1].root
    assert sorted(p.name for p in (tmp_path / "cache" / "packed").iterdir()) == [Path(results[0].root).name]
    reused = prepare_data(_config(cache, corpus), log=lambda *_: None)  # verifies every shard's sha256
    for d in DOMAINS:
        assert np.array_equal(reused.windows("train", 64, d), results[0].windows("train", 64, d))


def test_a_pack_that_fails_halfway_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    from hydra_ray.data import pack

    corpus, cache = _corpus(tmp_path / "corpus", docs=4), str(tmp_path / "cache")

    def fails(out, *a, **k):  # a few shards written, then the corpus turns out bad (or Ctrl-C)
        Path(out, "math").mkdir(parents=True)
        Path(out, "math", "train-L64.bin").write_bytes(b"x" * 1000)
        raise CorpusError("a file went missing while packing")

    monkeypatch.setattr(pack, "run_pack", fails)
    with pytest.raises(CorpusError, match="went missing"):
        prepare_data(_config(cache, corpus), log=lambda *_: None)
    assert list((tmp_path / "cache" / "packed").iterdir()) == []


@pytest.mark.integration
def test_a_shard_changed_or_lost_since_packing_is_a_one_line_error(tmp_path, ray_session):
    corpus, cache = _corpus(tmp_path / "corpus"), str(tmp_path / "cache")
    packed = prepare_data(_config(cache, corpus), log=lambda *_: None)
    shard = Path(packed.shard("train", 64, "code"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match=r"code/train-L64\.bin does not match the sha256"):
        prepare_data(_config(cache, corpus), log=lambda *_: None)
    shard.unlink()
    with pytest.raises(CorpusError, match=r"code/train-L64\.bin is missing"):
        prepare_data(_config(cache, corpus), log=lambda *_: None)


@pytest.mark.integration
@pytest.mark.slow
def test_data_pack_to_s3_then_train_from_data_packed(tmp_path, s3):
    """`hydra-ray data pack --out s3://...` then `hydra-ray train` with `data.packed` naming it: the
    corpus is not read again, and a shard changed in the bucket stops the next run before any step."""
    from hydra_ray import storage
    from hydra_ray.runlog import read_records

    corpus = _corpus(tmp_path / "corpus")
    cfg = _config(str(tmp_path / "cache"), corpus)
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    out = f"{s3}/packed-{os.getpid()}"
    r = run_cli("data", "pack", "--config", str(tmp_path / "c.yaml"), "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"packed {corpus} with tokenizer byte -> {out}" in r.stdout and "data: {packed: " in r.stdout
    assert "manifest.json" in [name for name, _ in storage.listdir(out)]
    again = run_cli("data", "pack", "--config", str(tmp_path / "c.yaml"), "--out", out)
    assert "[data] reusing packed data" in again.stdout + again.stderr

    packed = _config(str(tmp_path / "cache"), corpus, packed=out)
    packed.data.corpus = str(tmp_path / "gone")  # never read: the pack is all training needs
    (tmp_path / "p.yaml").write_text(dump_config(packed))
    runs = f"{s3}/runs-packed-{os.getpid()}"
    r = run_cli("train", "--config", str(tmp_path / "p.yaml"), "--workers", "2", "--storage", runs, "--name", "p",
                timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in read_records(f"{runs}/p", "metrics")][-1] == 20
    shard = f"{out}/code/train-L64.bin"
    blob = bytearray(storage.read_bytes(shard))
    blob[8] ^= 1
    storage.write_bytes(shard, bytes(blob))
    r = run_cli("train", "--config", str(tmp_path / "p.yaml"), "--workers", "1", "--storage", runs, "--name", "q")
    assert_one_line_error(r, "code/train-L64.bin", "sha256")
    assert read_records(f"{runs}/q", "metrics") == []


@pytest.mark.integration
@pytest.mark.slow
def test_a_corpus_larger_than_the_object_store_packs_and_trains(tmp_path, ray_session):
    """72 MB of text, byte-tokenised: about 300 MB of shards against the session's 256 MiB object
    store. Packing streams it (spilled chunks, then shards) and two workers train on it."""
    import ray

    from hydra_ray.train.driver import train
    from hydra_ray.runlog import read_records

    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "sigma", "omega", "theta", "kappa"])
    for d in DOMAINS:
        (tmp_path / "big" / d).mkdir(parents=True)
        for part in range(3):
            with open(tmp_path / "big" / d / f"part-{part}.jsonl", "w") as f:
                for _ in range(2000):
                    f.write(json.dumps({"text": d + " " + " ".join(rng.choice(words, 500))}) + "\n")
    text_bytes = sum(p.stat().st_size for p in (tmp_path / "big").rglob("*.jsonl"))
    cfg = _config(str(tmp_path / "cache"), tmp_path / "big")
    prep = prepare_data(cfg, log=lambda *_: None)
    packed = sum(p.stat().st_size for p in Path(prep.root).rglob("*.bin"))
    assert text_bytes > 70e6 and packed > ray.cluster_resources()["object_store_memory"]
    res = train(cfg, "big", workers="2", storage=str(tmp_path / "runs"), name="big", log=lambda *_: None)
    assert res["step"] == 20 and not res.get("error")
    metrics = read_records(str(tmp_path / "runs" / "big"), "metrics")
    assert [m["step"] for m in metrics] == [5, 10, 15, 20] and all(m["data_wait_s"] >= 0 for m in metrics)


@pytest.mark.integration
def test_pack_benchmark_reports_every_figure(tmp_path, ray_session):
    from hydra_ray.benchmarks import pack as bench

    lines = []
    res = bench.run(sizes_gb=(0.002, 0.004), workdir=str(tmp_path), read_steps=5, log=lines.append)
    assert len(res["sizes"]) == 2
    for r in res["sizes"]:
        assert r["pack_mb_per_s"] > 0 and 0 < r["reuse_vs_pack"] and r["read_tokens_per_s_2_workers"] > 0
        assert r["pack_peak_rss_gb"] > 0 and r["read_peak_rss_gb"] > 0 and r["shards_gb"] > 0
    assert "MB/s" in lines[0] and "peak RSS" in lines[0] and "growth" in lines[-1]


@pytest.mark.integration
def test_a_hugging_face_parquet_export_with_its_own_text_column(tmp_path, ray_session):
    """`datasets`' Parquet exports name the text column as the dataset does: `data.text_field`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for d in DOMAINS:
        (tmp_path / "hf" / d).mkdir(parents=True)
        rows = [f"{d} example {i}: " + "token " * (10 + i % 40) for i in range(60)]
        pq.write_table(pa.table({"id": list(range(60)), "content": rows}), tmp_path / "hf" / d / "train-00000-of-00001.parquet")
    cache = str(tmp_path / "cache")
    prep = prepare_data(_config(cache, tmp_path / "hf", text_field="content"), log=lambda *_: None)
    assert all(prep.stats[d]["documents"] == 60 and not any(prep.stats[d]["bad"].values()) for d in DOMAINS)
    with pytest.raises(CorpusError, match=r"missing_text 60"):
        prepare_data(_config(cache, tmp_path / "hf"), log=lambda *_: None)  # no `text` column
