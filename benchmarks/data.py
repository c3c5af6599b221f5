"""`hydra-ray bench data`: tokens per second the data reader delivers against tokens per second
the training loop consumes, measured in one run on the same preset (target: data >= 10x training).

The data side reads the run's order from the packed shards as a one-worker run does
(`RankReader`, one global batch at a time, with its read-ahead thread); the training side times
forward + backward + AdamW steps of the preset's model with every feature on, on batches of the
same shape.
"""

from __future__ import annotations

import time

import torch

from hydra_ray.config import load_config


def run(config: str = "small", steps: int = 60, train_steps: int = 4, log=print) -> dict:
    import ray

    from hydra_ray.data.pipeline import prepare_data
    from hydra_ray.data.reader import RankReader
    from hydra_ray.models import HydraLM

    cfg = load_config(config)
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    G, L = cfg.train.batch_size, cfg.model.seq_len
    prepared = prepare_data(cfg, seq_lens=[L], log=log)
    t0 = time.perf_counter()
    reader = RankReader(prepared, cfg, G, 0, 1, 0, min(steps, cfg.curriculum.total_steps))
    n_tok = 0
    for _, batch in reader:
        n_tok += torch.from_numpy(batch["input_ids"]).numel()
    reader.close()
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
    log(f"  reader {data_tps:,.0f} tokens/s ({n_tok:,} tokens from the packed shards) vs "
        f"training {train_tps:,.0f} tokens/s -> data/train {res['data_vs_train']:.1f}x (target >= 10x)")
    return res
