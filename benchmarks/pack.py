"""`hydra-ray bench pack`: packing and reading a generated corpus at two sizes, side by side.

For each size (default 0.5 and 2 GB of JSONL text over the 4 domains):
- pack throughput: MB of text per second of `prepare_data` from scratch (a fresh cache);
- reuse: the time to the first training batch when the pack is reused (fingerprint, shard
  verification, first read) against packing from scratch and then reading it;
- peak RSS of every process: sampled from /proc every 0.2 s, during packing and during a
  2-worker read of the training order (two Ray tasks, each reading its own rows with
  `RankReader`), reported as the largest process and its title. RSS here is what a process
  holds (anonymous and shared memory); the pages of memory-mapped shards are page cache, shown
  apart. The target is < 1.5 GB for every process, and no growth from the small corpus to the
  large one.
The data-vs-training throughput figure is `hydra-ray bench data`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from hydra_ray.config import parse_config

DOMAINS = ["math", "code", "chat", "finefineweb"]


def _corpus(root: Path, megabytes: float, seed: int = 0) -> int:
    """JSONL files of ~64 MB, documents of 1-6 KB of words from a per-domain vocabulary."""
    rng = np.random.default_rng(seed)
    vocab = {d: np.array([f"{d[:2]}{i:04d}" for i in range(5000)]) for d in DOMAINS}
    per_domain = int(megabytes * 1e6 / len(DOMAINS))
    total = 0
    for d in DOMAINS:
        (root / d).mkdir(parents=True, exist_ok=True)
        written, part = 0, 0
        while written < per_domain:
            with open(root / d / f"part-{part:04d}.jsonl", "w") as f:
                size = 0
                while size < 64e6 and written + size < per_domain:
                    line = json.dumps({"text": " ".join(rng.choice(vocab[d], int(rng.integers(150, 900))))}) + "\n"
                    f.write(line)
                    size += len(line)
            written += size
            part += 1
        total += written
    return total


class _PeakRSS(threading.Thread):
    """The largest resident set of every process on the machine, sampled until stopped."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.stop, self.peaks, self.files = interval, threading.Event(), {}, {}

    def run(self):
        while not self.stop.is_set():
            for p in Path("/proc").iterdir():
                if not p.name.isdigit():
                    continue
                try:
                    fields = dict(line.split(":", 1) for line in (p / "status").read_text().splitlines() if ":" in line)
                    # memory the process holds: anonymous pages plus shared memory (Ray's object
                    # store); file-backed pages (memory-mapped shards) are page cache the kernel
                    # reclaims, reported apart
                    held = (int(fields["RssAnon"].split()[0]) + int(fields["RssShmem"].split()[0])) * 1024
                    mapped = int(fields["RssFile"].split()[0]) * 1024
                    title = (p / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")[:60]
                except (OSError, KeyError, ValueError, IndexError):
                    continue
                key = (int(p.name), title)
                self.peaks[key] = max(self.peaks.get(key, 0), held)
                self.files[key] = max(self.files.get(key, 0), mapped)
            self.stop.wait(self.interval)

    def largest(self) -> tuple[float, str, float]:
        """(GB held, process title, GB of file pages mapped) of the process that held the most."""
        key, rss = max(self.peaks.items(), key=lambda kv: kv[1])
        return rss / 1e9, key[1], self.files.get(key, 0) / 1e9


def _read_two_workers(prepared, cfg, steps: int) -> float:
    import ray

    @ray.remote(num_cpus=1)
    def read(rank: int) -> int:
        from hydra_ray.data.reader import RankReader

        reader = RankReader(prepared, cfg, cfg.train.batch_size, rank, 2, 0, steps)
        n = sum(int(b["input_ids"].size) for _, b in reader)
        reader.close()
        return n

    t = time.perf_counter()
    n = sum(ray.get([read.remote(r) for r in (0, 1)]))
    return n / (time.perf_counter() - t)


def run(sizes_gb=(0.5, 2.0), workdir: str | None = None, read_steps: int = 200, log=print) -> dict:
    import ray

    from hydra_ray.data.pipeline import prepare_data

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    base = Path(workdir or tempfile.mkdtemp(prefix="hydra-bench-pack-"))
    results = []
    for gb in sizes_gb:
        root = base / f"corpus-{gb}gb"
        text = _corpus(root, gb * 1000) if not root.exists() else sum(p.stat().st_size for p in root.rglob("*.jsonl"))
        cache = base / f"cache-{gb}gb"
        shutil.rmtree(cache, ignore_errors=True)
        cfg = parse_config({"model": {"vocab_size": 264, "d_model": 64, "n_heads": 2, "n_kv_heads": 1, "n_blocks": 1,
                                      "seq_len": 512},
                            "curriculum": {"phases": [{"name": "all", "until_step": 100_000}]},
                            "train": {"batch_size": 16}, "data": {"corpus": str(root)}})
        rss = _PeakRSS()
        rss.start()
        t = time.perf_counter()
        prepared = prepare_data(cfg, cache=str(cache), log=lambda *_: None)
        first = prepared.windows("train", 512, "math", np.arange(16))
        pack_s = time.perf_counter() - t
        rss.stop.set()
        rss.join()
        pack_peak = rss.largest()
        t = time.perf_counter()
        again = prepare_data(cfg, cache=str(cache), log=lambda *_: None)
        assert np.array_equal(again.windows("train", 512, "math", np.arange(16)), first)
        reuse_s = time.perf_counter() - t
        rss = _PeakRSS()
        rss.start()
        read_tps = _read_two_workers(prepared, cfg, read_steps)
        rss.stop.set()
        rss.join()
        read_peak = rss.largest()
        shards = sum(p.stat().st_size for p in Path(prepared.root).rglob("*.bin"))
        r = {"text_gb": text / 1e9, "shards_gb": shards / 1e9, "pack_s": pack_s, "pack_mb_per_s": text / 1e6 / pack_s,
             "reuse_s": reuse_s, "reuse_vs_pack": reuse_s / pack_s, "pack_peak_rss_gb": pack_peak[0],
             "pack_peak_process": pack_peak[1], "read_peak_rss_gb": read_peak[0], "read_peak_process": read_peak[1],
             "read_peak_file_pages_gb": read_peak[2],
             "read_tokens_per_s_2_workers": read_tps}
        results.append(r)
        log(f"pack bench {r['text_gb']:.2f} GB of text -> {r['shards_gb']:.2f} GB of shards: "
            f"{r['pack_mb_per_s']:.1f} MB/s ({pack_s:.0f} s); reuse {reuse_s:.2f} s = {r['reuse_vs_pack']:.1%} of packing "
            f"(target <= 10%); peak RSS packing {pack_peak[0]:.2f} GB ({pack_peak[1]}), 2-worker read "
            f"{read_peak[0]:.2f} GB ({read_peak[1]}; plus {read_peak[2]:.2f} GB of mapped shard pages) "
            f"(target < 1.5 GB); read {read_tps:,.0f} tokens/s")
        shutil.rmtree(cache, ignore_errors=True)
    if len(results) > 1:
        growth = results[-1]["pack_peak_rss_gb"] / max(results[0]["pack_peak_rss_gb"], 1e-9)
        log(f"peak RSS growth from {results[0]['text_gb']:.1f} GB to {results[-1]['text_gb']:.1f} GB of text: "
            f"{growth:.2f}x (target: none)")
    if workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return {"sizes": results, "workdir": str(base) if workdir else None, "pid": os.getpid()}
