"""`hydra-ray tune`: Ray Tune sweeps of routing hyper-parameters (installed as hydra_ray.tune).

- `space`: the space file (dotted config key -> one distribution) and its checks before Ray starts;
- `trial`: one trial (the training loop in-process, or a Ray Train run of K workers) and the
  metrics it reports (eval_loss, and the loop's imbalance);
- `results`: how each trial ended, trials.csv, pareto.csv and best.yaml;
- `cli`: the command (`add_arguments`, `run`), its settings, resources and `--resume`.

Nothing heavy is imported here or at the top of any module: the CLI imports `cli` to build its parser.
"""
