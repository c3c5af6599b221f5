"""`hydra-ray ablate`: HYDRA against dense at equal tokens and at equal training compute.

Arms (each a real run through the project's training path, on the same data):
- `dense`: every phase with MoR, MoD and MoE off (routing `learned`);
- `mor`: only the phases' MoR flags kept; `mor+mod`: MoE off; `full`: the config unchanged;
- `dense-flops`: `dense` with `model.n_blocks` set so its training FLOPs are closest to `full`'s.

Design choices
- An arm changes only the phases' feature flags (and, for dense-flops, the model's shape). Phase
  ends, mixtures, seeds, seq_lens and LR scales stay, so every arm reads the same batches in the
  same order under the same LR schedule; `arm_configs` checks that the training order
  (`pipeline.phase_spans`) and the fields the pack depends on are unchanged, which is why one
  `prepare_data` serves every arm.
- The model config is not touched for the feature arms: with a feature off its parameters exist
  but are unused, so the weights that are used start from the same initialisation in every arm.
- Training FLOPs are counted, not timed: per phase, 3 x forward FLOPs per token with that phase's
  features (`benchmarks.train.phase_flops`, on the meta device, at the phase's seq_len) x steps x
  batch_size x seq_len. Nominal: MoD at its target capacity from switch-on (its warm-up anneals
  from 1.0, so MoD phases cost a little more than counted); routers, predictors and evals excluded.
- dense-flops: with every feature off a dense model's FLOPs are affine in n_blocks (the shared
  blocks run once each), so the two integers around the solution are compared exactly. From
  n_blocks = 2 on, one block more or less moves FLOPs by at most 1.5x, so the closest is within
  ~22 %; only between 1 and 2 blocks (or a target below one block) can it miss +-25 %, and then
  the FFN width is scaled too (a multiple of 8, solved the same way, FLOPs being affine in it).
  Explicit `moe.blocks` / `mod.blocks` lists are cut to the new block count (unused: all off).
- `--max-steps S` is `curriculum.compressed` (phase ends and warm-ups scaled) with eval_every and
  save_every scaled alike, so the arms keep their number of evals; the loop always evaluates and
  checkpoints at its last step, whose eval is the arm's figure.
- Runs go to OUT/runs/<arm> ("mor+mod" as mor-mod: a run name is also a checkpoint id, which
  allows no "+"), so `hydra-ray analyze`, `eval` and `serve` take them like any run.
- Everything is validated (arms, config, steps, workers, --out, data) before the first arm trains.
- Wall-clock is the arm's whole run (its evals and checkpoints included; Ray start-up and data
  packing are not: they happen once, before the first arm). On a shared CPU it is noisy; FLOPs are
  the figure to compare, wall-clock the one to sanity-check them with.
- Scores: the run's final eval from its metrics (`runlog.read_records`), and the last checkpoint
  through `evaluation.evaluate` with a fixed seed, so every arm is scored on the same items; the
  result is also stored as RUN/eval/step_X.json, where `hydra-ray analyze` finds it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra_ray import runlog, storage
from hydra_ray.config import ConfigError, HydraConfig, check_batch_split, did_you_mean, dump_config, parse_config

ARMS = ("dense", "mor", "mor+mod", "full", "dense-flops")
KEPT = {"dense": (), "mor": ("mor",), "mor+mod": ("mor", "mod"), "full": ("mor", "mod", "moe"), "dense-flops": ()}
TOLERANCE = 0.25  # dense-flops: beyond this FLOPs mismatch with n_blocks alone, the FFN width is scaled too
EVAL_SEED = 0  # every arm's checkpoint is scored on the same held-out items


@dataclass
class Arm:
    name: str
    cfg: HydraConfig
    flops: int = 0  # training FLOPs of the whole run
    step_flops: list[int] = field(default_factory=list)  # training FLOPs of one step, per phase
    ratio: float = 1.0  # flops / full's
    note: str = ""

    @property
    def features(self) -> list[str]:
        return [f for f in ("mor", "mod", "moe") if any(getattr(p, f) for p in self.cfg.curriculum.phases)]


# --------------------------------------------------------------------------- arms and FLOPs
def parse_arms(text: str) -> list[str]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    for a in names:
        if a not in ARMS:
            raise ConfigError(f"--arms: unknown arm {a!r}{did_you_mean(a, ARMS)}; arms are {', '.join(ARMS)}")
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"--arms {text!r}: name each arm once (of {', '.join(ARMS)})")
    return names


def with_features(cfg: HydraConfig, keep: tuple[str, ...]) -> HydraConfig:
    """The config with each phase's flags not in `keep` switched off (routing `learned` once MoE is)."""
    out = cfg.model_copy(deep=True)
    for p in out.curriculum.phases:
        if "moe" not in keep:
            p.routing = "learned"  # first: validate_assignment checks routing against moe
            p.moe = False
        p.mor, p.mod = p.mor and "mor" in keep, p.mod and "mod" in keep
    return out


def with_shape(cfg: HydraConfig, n_blocks: int, ffn_hidden: int | None = None) -> HydraConfig:
    data = cfg.model_dump(mode="python")
    m = data["model"]
    m["n_blocks"] = n_blocks
    for k in ("moe", "mod"):
        if isinstance(m[k]["blocks"], list):
            m[k]["blocks"] = [b for b in m[k]["blocks"] if b < n_blocks]
    if ffn_hidden is not None:
        m["ffn_hidden"] = ffn_hidden
        if m["moe"]["expert_hidden"] is not None:
            m["moe"]["expert_hidden"] = ffn_hidden
    return parse_config(data, "dense-flops")


def training_flops(cfg: HydraConfig) -> tuple[int, list[int]]:
    """(total training FLOPs, FLOPs of one step of each phase): 3 x forward FLOPs per token of the
    phase's features at its seq_len x batch_size x seq_len per step."""
    from hydra_ray.benchmarks.train import phase_flops

    memo: dict[tuple, int] = {}
    per_step, total, start = [], 0, 0
    for p in cfg.curriculum.phases:
        L = p.seq_len or cfg.model.seq_len
        key = (L, p.mor, p.mod, p.moe)
        if key not in memo:
            at_len = cfg.model_copy(deep=True)
            at_len.model.seq_len = L  # attention scores cover the phase's context
            memo[key] = phase_flops(at_len, p.mor, p.mod, p.moe)
        per_step.append(3 * memo[key] * cfg.train.batch_size * L)
        total += per_step[-1] * (p.until_step - start)
        start = p.until_step
    return total, per_step


def _closest(make, lo: int, step: int, target: int) -> tuple[int, HydraConfig, int]:
    """(x, config, FLOPs) of the multiple of `step` >= lo whose config's FLOPs are closest to
    `target`, FLOPs being affine in x: solved from two points, then its neighbours compared."""
    f0, f1 = training_flops(make(lo))[0], training_flops(make(lo + step))[0]
    x = lo + step * (target - f0) / max(f1 - f0, 1)
    best = None
    for c in {max(lo, step * math.floor(x / step)), max(lo, step * math.ceil(x / step))}:
        cfg = make(c)
        f = training_flops(cfg)[0]
        if best is None or abs(f - target) < abs(best[2] - target):
            best = (c, cfg, f)
    return best


def match_flops(dense: HydraConfig, target: int) -> tuple[HydraConfig, str]:
    """The dense config reshaped to the training FLOPs closest to `target` (see the docstring)."""
    n, cfg, f = _closest(lambda b: with_shape(dense, b), 1, 1, target)
    note = f"n_blocks {n}"
    if abs(f / target - 1) > TOLERANCE:
        w, cfg, f = _closest(lambda h: with_shape(dense, n, h), 8, 8, target)
        note += f", ffn_hidden {w} (n_blocks alone missed FLOPs by more than {TOLERANCE:.0%})"
    return cfg, note


def data_fields(cfg: HydraConfig):
    """What the packed data and the training order depend on: equal for every arm."""
    from hydra_ray.data.pipeline import phase_spans

    return (cfg.data, cfg.model.seq_len, cfg.model.domains, cfg.model.vocab_size, cfg.train.batch_size,
            cfg.train.seed, phase_spans(cfg), [(p.name, p.lr_scale) for p in cfg.curriculum.phases])


def arm_configs(cfg: HydraConfig, names: list[str]) -> list[Arm]:
    """The arms' configs and FLOPs (dense-flops matched to full's, whether or not full runs)."""
    if "full" in names and not any(p.moe for p in cfg.curriculum.phases):
        raise ConfigError("--arms full: the config has no phase with moe: true, so it is not a HYDRA curriculum")
    full = Arm("full", cfg)
    full.flops, full.step_flops = training_flops(cfg)
    arms = []
    for name in names:
        arm = full if name == "full" else Arm(name, with_features(cfg, KEPT[name]))
        if name == "dense-flops":
            arm.cfg, arm.note = match_flops(arm.cfg, full.flops)
        if name != "full":
            arm.flops, arm.step_flops = training_flops(arm.cfg)
        arm.ratio = arm.flops / full.flops
        if data_fields(arm.cfg) != data_fields(cfg):
            raise AssertionError(f"arm {name} changed the data or its order")
        arms.append(arm)
    return arms


def scaled(cfg: HydraConfig, steps: int | None) -> HydraConfig:
    """The curriculum compressed into `steps` steps, evals and checkpoints scaled with it."""
    from hydra_ray.train.curriculum import compressed

    if steps is None:
        return cfg
    n = len(cfg.curriculum.phases)
    if steps < n:
        raise ConfigError(f"--max-steps {steps}: need at least one step per phase ({n})")
    out, f = compressed(cfg, steps), steps / cfg.curriculum.total_steps
    out.train.eval_every = max(1, round(cfg.train.eval_every * f))
    out.train.save_every = max(1, round(cfg.train.save_every * f))
    return out


def arm_params(arm: Arm) -> dict:
    """Parameter counts of the model as the arm trains it (the features it never uses left out)."""
    import torch

    from hydra_ray.benchmarks.train import feature_model
    from hydra_ray.models import HydraLM

    m = feature_model(arm.cfg.model, *(f in arm.features for f in ("mor", "mod", "moe")))
    with torch.device("meta"):
        return HydraLM(m).param_counts()


# --------------------------------------------------------------------------- running an arm
def train_arm(arm: Arm, run_dir: str, prepared, workers: int, config_path: str) -> float:
    """Train the arm into run_dir; returns its wall-clock seconds."""
    t0 = time.perf_counter()
    if workers == 1:
        from hydra_ray.train.loop import run_local

        storage.write_text(storage.join(run_dir, "config.yaml"), dump_config(arm.cfg))
        res = run_local(arm.cfg, run_dir, prepared)
        error = res.get("stopped")
    else:
        from hydra_ray.train.driver import train

        res = train(arm.cfg, config_path, workers=str(workers), storage=storage.parent(run_dir),
                    name=storage.name(run_dir))
        error = res.get("error")
    if error:
        raise RuntimeError(f"arm {arm.name}: training stopped: {error}")
    return time.perf_counter() - t0


def final_eval(run_dir: str, arm: Arm) -> dict:
    """The run's eval records: the last one (the run's final eval) and the curve against FLOPs."""
    evals = [r for r in runlog.read_records(run_dir) if isinstance(r.get("eval"), dict)]
    if not evals or evals[-1]["step"] != arm.cfg.curriculum.total_steps:
        raise RuntimeError(f"arm {arm.name}: no eval at the last step in {run_dir}")
    bounds = [p.until_step for p in arm.cfg.curriculum.phases]

    def flops_at(step: int) -> int:
        return sum(f * max(0, min(step, b) - a) for f, a, b in zip(arm.step_flops, [0] + bounds, bounds))

    last = evals[-1]["eval"]
    return {"eval_step": evals[-1]["step"], "eval_loss": last["loss"], "eval_by_domain": last["by_domain"],
            "eval_curve": [[r["step"], flops_at(r["step"]), r["eval"]["loss"]] for r in evals]}


def score_checkpoint(run_dir: str, n: int) -> dict:
    from hydra_ray import evaluation
    from hydra_ray.serve.engine import Engine

    path, model_id = evaluation.resolve(run_dir)
    engine = Engine.from_checkpoint(path, model_id)
    res = evaluation.evaluate(engine, n, EVAL_SEED, chance=False, log=lambda *_: None)
    storage.write_text(evaluation.result_path(run_dir, engine.step), json.dumps(res, indent=1) + "\n")
    return {"checkpoint": model_id, "tasks": {k: v["score"] for k, v in res["tasks"].items()},
            "perplexity": res["perplexity"]}


# --------------------------------------------------------------------------- outputs
def verdict(rows: list[dict]) -> str:
    by = {r["name"]: r for r in rows}
    if "full" not in by or "dense-flops" not in by:
        return "Result: run both full and dense-flops to compare HYDRA with dense at equal compute."
    f, d = by["full"]["eval_loss"], by["dense-flops"]["eval_loss"]
    ratio = by["dense-flops"]["flops_ratio"]
    if f <= d:
        return (f"Result: full HYDRA reaches eval loss {f:.4f} <= {d:.4f} of dense-flops (dense at {ratio:.2f}x "
                f"full's training FLOPs): HYDRA is at least as good at equal compute.")
    return (f"Result: full HYDRA's eval loss {f:.4f} is above dense-flops' {d:.4f} (dense at {ratio:.2f}x full's "
            f"training FLOPs): HYDRA does not beat dense at equal compute in this run.")


def table(rows: list[dict], domains: list[str]) -> list[str]:
    from hydra_ray.analysis.render import _n, _table

    head = ["arm", "features", "blocks", "params (M)", "train FLOPs", "x full", "wall s", "eval loss",
            *[f"{d} loss" for d in domains], "math EM", "code parses", "chat format", "ppl (mean)"]
    body = []
    for r in rows:
        tasks, ppl = r.get("tasks") or {}, r.get("perplexity") or {}
        body.append([r["name"], "+".join(r["features"]) or "dense", r["n_blocks"], f"{r['params_total'] / 1e6:.2f}",
                     f"{r['train_flops']:.3e}", f"{r['flops_ratio']:.3f}", f"{r['wall_s']:.1f}", _n(r["eval_loss"]),
                     *[_n(r["eval_by_domain"].get(d)) for d in domains],
                     *[_n(tasks.get(k), 2) for k in ("math", "code", "chat")],
                     _n(sum(ppl.values()) / len(ppl), 2) if ppl else "-"])
    return _table(head, body)


def plot(rows: list[dict], domains: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curve) = plt.subplots(1, 2, figsize=(13, 4.6))
    groups, width = [*domains, "mean"], 0.8 / len(rows)
    for i, r in enumerate(rows):
        vals = [r["eval_by_domain"].get(d, math.nan) for d in domains] + [r["eval_loss"]]
        bars.bar([g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))], vals, width, label=r["name"])
        pts = r["eval_curve"]
        line, = curve.plot([p[1] for p in pts], [p[2] for p in pts], lw=1.2, marker=".", label=r["name"])
        curve.plot([pts[-1][1]], [pts[-1][2]], "o", ms=8, color=line.get_color())
    lo = min(min(v for v in [*r["eval_by_domain"].values(), r["eval_loss"]]) for r in rows)
    bars.set_ylim(bottom=max(0.0, lo - 0.25))
    bars.set_xticks(range(len(groups)), groups)
    bars.set(ylabel="eval loss (CE)", title="final eval loss by domain")
    bars.legend(fontsize=8)
    curve.set(xlabel="training FLOPs", ylabel="eval loss (mean over domains)", title="eval loss against training FLOPs")
    curve.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the command
def run(args) -> int:
    from hydra_ray.checkpoint import list_steps
    from hydra_ray.config import load_config
    from hydra_ray.data.corpus import CorpusError
    from hydra_ray.data.pipeline import prepare_data
    from hydra_ray.train.driver import run_tokenizer

    names = parse_arms(args.arms)
    if not 0 <= args.eval_n <= 1000:
        raise ConfigError(f"--eval-n {args.eval_n}: must be between 0 (skip) and 1000")
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be at least 1")
    if storage.is_uri(args.out):
        raise ConfigError(f"--out {args.out}: a local folder (the runs, table and plot are written there)")
    out = Path(args.out).resolve()
    cfg = scaled(load_config(args.config), args.max_steps)
    check_batch_split(cfg, [args.workers])
    arms = arm_configs(cfg, names)
    runs = {a.name: str(out / "runs" / a.name.replace("+", "-")) for a in arms}  # a run name: no "+"
    for run_dir in runs.values():
        if list_steps(run_dir):
            raise ConfigError(f"--out {args.out}: run {run_dir} already has checkpoints; choose another --out")
    cfg, _ = run_tokenizer(cfg, args.config, str(out), resume=False)  # a tokenizer file, by absolute path
    for a in arms:
        a.cfg.data = cfg.data.model_copy(deep=True)
    if args.workers > 1:  # Ray starts before the first arm's clock does
        from hydra_ray.raystart import quiet_ray, ray_init

        quiet_ray(verbose=getattr(args, "verbose", False))
        ray_init(min_cpus=args.workers + 2)
    try:
        prepared = prepare_data(cfg, log=lambda *_: None)  # packed once: only the model differs between arms
    except CorpusError as e:
        raise ConfigError(str(e)) from None

    T = cfg.curriculum.total_steps
    print(f"[ablate] {args.config}: {len(arms)} arm(s), {T} steps x {cfg.train.batch_size} sequences each, "
          f"{args.workers} worker(s) -> {out}")
    out.mkdir(parents=True, exist_ok=True)
    rows, domains = [], list(prepared.domains)
    for a in arms:
        counts = arm_params(a)
        print(f"[ablate] {a.name:<11} {'+'.join(a.features) or 'dense'}, n_blocks {a.cfg.model.n_blocks}, "
              f"{a.flops:.3e} training FLOPs ({a.ratio:.3f}x full) {a.note}".rstrip())
        wall = train_arm(a, runs[a.name], prepared, args.workers, args.config)
        row = {"name": a.name, "features": a.features, "n_blocks": a.cfg.model.n_blocks,
               "ffn_hidden": a.cfg.model.ffn_width, "params_total": counts["total_params"],
               "params_active": counts["active_params"], "train_flops": a.flops,
               "flops_ratio": a.ratio, "step_flops": a.step_flops,
               "wall_s": wall, "run_dir": runs[a.name], "note": a.note,
               "phases": [{"name": p.name, "until_step": p.until_step, "mor": p.mor, "mod": p.mod, "moe": p.moe,
                           "routing": p.routing} for p in a.cfg.curriculum.phases],
               **final_eval(runs[a.name], a)}
        if args.eval_n:
            row.update(score_checkpoint(runs[a.name], args.eval_n))
        print(f"[ablate] {a.name:<11} done in {wall:.1f}s: eval loss {row['eval_loss']:.4f}")
        rows.append(row)
        summary = {"config": str(args.config), "steps": T, "batch_size": cfg.train.batch_size,
                   "workers": args.workers, "eval_n": args.eval_n, "eval_seed": EVAL_SEED, "domains": domains,
                   "arms": rows, "result": verdict(rows) if len(rows) == len(arms) else None}
        (out / "ablation.json").write_text(json.dumps(summary, indent=1) + "\n")  # after each arm: progress kept

    lines, result = table(rows, domains), summary["result"]
    (out / "ablation.md").write_text(f"# Ablation: {args.config}, {T} steps\n\n" + "\n".join(lines) + "\n" + result + "\n")
    plot(rows, domains, out / "ablation.png")
    print("\n".join(lines) + "\n" + result)
    print(f"[ablate] wrote {out / 'ablation.json'}, {out / 'ablation.md'}, {out / 'ablation.png'}")
    return 0

