"""`hydra-ray bench storage --storage URI`: how long a checkpoint of a preset takes to write and to
read back (verified against its manifest) on the given storage, next to local disk, in one run.

Both sides use the trainer's own paths: `checkpoint.save_local` (a local temporary folder copied
in, manifest last) and `checkpoint.latest_valid` (every file read and its sha256 checked).
Rounds alternate between the two storages so drift hits both alike; medians are reported.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from hydra_ray import storage
from hydra_ray.config import dump_config, load_config


def run(uri: str, config: str = "small", rounds: int = 3, log=print) -> dict:
    from hydra_ray.models import HydraLM
    from hydra_ray import checkpoint as ckpt
    from hydra_ray.train.state import build_optimizer

    uri = storage.check_storage(uri, "--storage")
    cfg = load_config(config)
    model = HydraLM(cfg.model)
    model.set_features(mor=True, mod=True, moe=True, routing="learned")
    opt = build_optimizer(model, cfg)
    for p in model.parameters():  # AdamW state of the right shapes, as a real checkpoint has
        p.grad = torch.zeros_like(p)
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    parts = dict(model_state=model.state_dict(), opt_state=ckpt.optimizer_tensors(opt, names),
                 config_yaml=dump_config(cfg))
    local = tempfile.mkdtemp(prefix="hydra-bench-storage-")
    where = {"local disk": local, "storage": storage.join(uri, f"bench-{int(time.time())}")}
    times: dict[str, dict[str, list[float]]] = {k: {"write": [], "read": []} for k in where}
    size = 0
    try:
        for r in range(rounds):
            for name, run_dir in where.items():
                t0 = time.perf_counter()
                final = ckpt.save_local(run_dir, r + 1, keep=1, trainer_state={"step": r + 1}, **parts)
                times[name]["write"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                loaded = ckpt.latest_valid(run_dir)
                times[name]["read"].append(time.perf_counter() - t0)
                assert loaded is not None and loaded.step == r + 1
                size = sum(storage.info(storage.join(final, f)).size for f in storage.walk_files(final))
    finally:
        for run_dir in where.values():
            storage.delete_dir(run_dir)
    med = {k: {op: statistics.median(v) for op, v in t.items()} for k, t in times.items()}
    res = {"config": config, "checkpoint_mb": size / 1e6, "storage": uri, "seconds": med,
           "write_ratio": med["storage"]["write"] / med["local disk"]["write"],
           "read_ratio": med["storage"]["read"] / med["local disk"]["read"]}
    log(f"checkpoint of {config}: {res['checkpoint_mb']:.1f} MB (weights + AdamW state), median of {rounds} rounds")
    for k, m in med.items():
        log(f"  {k:<11} write {m['write']:6.3f} s ({size / 1e6 / m['write']:7.1f} MB/s)   "
            f"read+verify {m['read']:6.3f} s ({size / 1e6 / m['read']:7.1f} MB/s)")
    log(f"  {uri} / local disk: write {res['write_ratio']:.2f}x, read {res['read_ratio']:.2f}x the time")
    return res
