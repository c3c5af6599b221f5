"""`hydra-ray bench data`: tokens per second the Ray Data pipeline delivers against tokens per second
the training loop consumes, measured in one run on the same preset (target: data >= 10x training).

The pipeline side iterates the real training dataset (`train_dataset` + `iter_torch_batches`, one
global batch at a time, as a worker reads it); the training side times forward + backward +
AdamW steps of the preset's model with every feature on, on batches of the same shape.
"""

from __future__ import annotations

import time

import torch

from hydra_ray.config import load_config


def run(config: str = "small", steps: int = 60, train_steps: int = 4, log=print) -> dict:
    import ray

    from hydra_ray.data.pipeline import prepare_data, train_dataset
    from hydra_ray.models import HydraLM

    cfg = load_config(config)
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    G, L = cfg.train.batch_size, cfg.model.seq_len
    prepared = prepare_data(cfg, seq_lens=[L], log=log)
    ds = train_dataset(prepared, cfg, global_batch=G, start_step=0, end_step=min(steps, cfg.curriculum.total_steps))
    it = ds.iterator()
    t0 = time.perf_counter()
    n_tok = 0
    for batch in it.iter_torch_batches(batch_size=G, dtypes=torch.int64):
        n_tok += batch["input_ids"].numel()
    data_tps = n_tok / (time.perf_counter() - t0)

    model = HydraLM(cfg.model)
    model.set_features(mor=True, mod=True, moe=True, mod_capacity=cfg.model.mod.capacity)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.model.vocab_size, (G, L))
    dom = torch.randint(0, len(cfg.model.domains), (G, L))

    def step():
        out = model(x, x, dom)
        opt.zero_grad()
        out.loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(train_steps):
        step()
    train_tps = train_steps * G * L / (time.perf_counter() - t0)
    res = {"config": config, "data_tokens_per_s": data_tps, "train_tokens_per_s": train_tps,
           "data_vs_train": data_tps / train_tps, "data_tokens": n_tok}
    log(f"data bench ({config}: batch {G} x seq {L}, {torch.get_num_threads()} threads)")
    log(f"  pipeline {data_tps:,.0f} tokens/s ({n_tok:,} tokens through iter_torch_batches) vs "
        f"training {train_tps:,.0f} tokens/s -> data/train {res['data_vs_train']:.1f}x (target >= 10x)")
    return res
