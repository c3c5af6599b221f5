"""A sweep's results: how each trial ended, the table, the Pareto set and the best config.

Outputs under STORAGE/NAME, beside Tune's own experiment files (all written through
`hydra_ray.storage`, so STORAGE may be a local path or a URI):
- trials.csv: every trial with status, last step, Tune iterations, metrics and sampled values;
- pareto.csv: the completed trials that no other completed trial beats on both the objective
  (`--metric`: eval_loss by default, or a held-out task score) and imbalance;
- best.yaml: the complete config with the best final objective (the --config file with that
  trial's values), which `hydra-ray train --config best.yaml` takes as it is;
- trial_status.jsonl: how each trial ended, written by a Tune callback (`status_callback`).
  Tune's own statuses cannot tell a trial ASHA stopped from one that an interruption stopped
  (both end TERMINATED); object stores cannot append, so the callback rewrites the file whole
  at each trial's end.
Trials stopped by ASHA or errored are listed but are neither Pareto nor best: their last eval is
from an earlier step.
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
import time

from hydra_ray import storage
from hydra_ray.config import dump_config, parse_config
from hydra_ray.tune.space import Entry, apply_values
from hydra_ray.tune.trial import METRIC, SECOND, Objective

STATUS_FILE = "trial_status.jsonl"


# --------------------------------------------------------------------------- how trials ended
def _say(msg: str) -> None:
    """`print` looked up when called: the Tune callback that uses it is pickled with the experiment,
    and a builtin captured by value fails to pickle once a library has swapped `builtins.print`
    (Ray's tqdm integration does)."""
    print(msg, flush=True)


def scheme_of(loc: str) -> str:
    """The prefix that turns a path inside Tune's filesystem back into a location: "s3://" for
    s3://bucket/..., "" for a local path (or a file:// URI, whose paths are local ones)."""
    return "" if storage.is_local(loc) else loc.partition("://")[0] + "://"


def status_callback(end_step: int, scheme: str, objective: Objective = Objective(), log=_say):
    """A Tune callback that records each trial's end (finished or stopped by the scheduler:
    "terminated"; or "error") in EXPERIMENT/trial_status.jsonl, and logs it. The file survives
    `--resume` (the callback is pickled with the experiment, so it finds the file through the
    trial's path, not through this process; that path is inside Tune's filesystem, so `scheme`,
    "s3://" or "", makes it a location again)."""
    from ray.tune import Callback

    class TrialStatus(Callback):
        def _mark(self, trial, status: str) -> None:
            m = trial.last_result or {}
            loc = scheme + posixpath.join(posixpath.dirname(trial.path.rstrip("/")), STATUS_FILE)
            try:
                text = storage.read_text(loc)
            except FileNotFoundError:
                text = ""
            # rewritten whole (object stores cannot append); Tune calls back one trial at a time
            storage.write_text(loc, text + json.dumps({"trial": trial.trial_id, "status": status,
                                                       "step": m.get("step"), "time": time.time()}) + "\n")
            step, value = m.get("step"), m.get(objective.name)
            what = "error" if status == "error" else "completed" if step is not None and step >= end_step else \
                f"stopped at step {step}"
            log(f"[tune] trial {trial.trial_id} {what}" + (f": {objective.name} {value:.4f}" if value is not None else ""))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._mark(trial, "terminated")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._mark(trial, "error")

    return TrialStatus()


def _ended(sweep_dir: str) -> dict[str, str]:
    """trial id -> its last recorded end ("terminated" or "error")."""
    out = {}
    try:
        text = storage.read_text(storage.join(sweep_dir, STATUS_FILE))
    except FileNotFoundError:
        text = ""
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[rec["trial"]] = rec["status"]
    return out


def _status(result, ended: str | None, end_step: int) -> str:
    m = result.metrics or {}
    if ended is None:
        return "unfinished"  # still running or pending when the sweep was interrupted
    if result.error is not None or ended == "error":
        return "error"
    step = m.get("step")
    return "completed" if step is not None and step >= end_step else "stopped"


# --------------------------------------------------------------------------- the table
def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def collect(grid, entries: list[Entry], end_step: int, sweep_dir: str, objective: Objective = Objective()) -> list[dict]:
    """One row per trial of Tune's ResultGrid `grid`, sorted by trial id: eval_loss, the
    objective's task scores when it has any, imbalance."""
    ended = _ended(sweep_dir)
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or posixpath.basename(result.path.rstrip("/")).removeprefix("trial_")
        cfg = result.config or {}
        rows.append({
            "trial": trial_id, "status": _status(result, ended.get(trial_id), end_step),
            "step": m.get("step"), "iters": m.get("training_iteration"),
            METRIC: _num(m.get(METRIC)), **{k: _num(m.get(k)) for k in _score_columns(objective)},
            SECOND: _num(m.get(SECOND)), "util_max_min": _num(m.get("util_max_min")),
            "values": {e.key: cfg.get(e.key) for e in entries},
            "error": " ".join(str(result.error).split())[:300] if result.error is not None else "",
            "run_dir": storage.join(sweep_dir, "runs", trial_id),
        })
    rows.sort(key=lambda r: r["trial"])
    return rows


def _score_columns(objective: Objective) -> list[str]:
    """The task columns a sweep on `objective` has (none for eval_loss)."""
    cols = [f"task_{t}" for t in objective.tasks]
    return cols + ([objective.name] if objective.name not in cols and objective.name != METRIC else [])


def _completed(rows: list[dict], objective: Objective) -> list[dict]:
    return [r for r in rows if r["status"] == "completed" and r.get(objective.name) is not None]


def pareto(rows: list[dict], objective: Objective = Objective()) -> list[dict]:
    """Completed trials not dominated on (objective, imbalance), both as costs (a task score
    counts negated); a missing imbalance (MoE never on) counts as the worst."""
    def point(r):
        imb = r[SECOND]
        return objective.as_cost(r[objective.name]), imb if imb is not None and not math.isnan(imb) else math.inf

    done = _completed(rows, objective)
    front = []
    for r in done:
        a = point(r)
        dominated = any(point(o)[0] <= a[0] and point(o)[1] <= a[1] and point(o) != a for o in done if o is not r)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: point(r))


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isinf(x) or math.isnan(x):
            return str(x)
        return f"{x:.{digits}g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return str(x)


def _short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that is unique among them (aux_weight, mod.capacity)."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            if sum(1 for o in keys if o == cand or o.endswith("." + cand)) == 1:
                out[k] = cand
                break
        else:
            out[k] = k
    return out


def table(rows: list[dict], entries: list[Entry], front_ids: set[str], best_id: str | None,
          objective: Objective = Objective()) -> str:
    short = _short_names([e.key for e in entries])
    scores = _score_columns(objective)
    head = ["trial", "status", "step", "iters", METRIC, *scores, SECOND, ""] + [short[e.key] for e in entries]
    body = []
    for r in rows:
        mark = "best" if r["trial"] == best_id else ("pareto" if r["trial"] in front_ids else "")
        body.append([r["trial"], r["status"], fmt(r["step"]), fmt(r["iters"]), fmt(r[METRIC]),
                     *(fmt(r.get(c), 3) for c in scores), fmt(r[SECOND], 3), mark]
                    + [fmt(r["values"][e.key], 3) for e in entries])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head] + body)


# --------------------------------------------------------------------------- the files
def _write_csv(loc: str, rows: list[dict], entries: list[Entry], front_ids: set[str], objective: Objective) -> None:
    fields = ["trial", "status", "step", "iters", METRIC, *_score_columns(objective), SECOND, "util_max_min", "pareto"] + \
        [e.key for e in entries] + ["run_dir", "error"]
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({**{k: r[k] for k in fields if k in r}, **r["values"], "pareto": r["trial"] in front_ids})
    storage.write_text(loc, f.getvalue())


def write_outputs(sweep_dir: str, rows: list[dict], entries: list[Entry], base: dict, settings: dict,
                  final: bool, objective: Objective = Objective()) -> dict:
    """trials.csv always; pareto.csv and best.yaml once the sweep is over."""
    front = pareto(rows, objective) if final else []
    front_ids = {r["trial"] for r in front}
    done = _completed(rows, objective)
    # ties on a task score (a share of n items) go to the lower eval loss
    best = min(done, key=lambda r: (objective.as_cost(r[objective.name]),
                                    r[METRIC] if r[METRIC] is not None else math.inf)) if final and done else None
    _write_csv(storage.join(sweep_dir, "trials.csv"), rows, entries, front_ids, objective)
    if final:
        _write_csv(storage.join(sweep_dir, "pareto.csv"), front, entries, front_ids, objective)
    if best is not None:
        cfg = parse_config(apply_values(base, best["values"]), "best config")
        # `hydra-ray train --config .../best.yaml` trains into a run named after the sweep, so
        # the best configs of two sweeps never share (and refuse to resume) one run folder
        cfg.train.run_name = f"{storage.name(sweep_dir)}-best"
        values = ", ".join(f"{k}={fmt(v, 6)}" for k, v in best["values"].items())
        name = storage.name(sweep_dir)
        header = (f"# hydra-ray tune: best of sweep {name} ({len(done)} completed trial(s)):\n"
                  f"# trial {best['trial']}, {objective.name} {fmt(best[objective.name])} at step {best['step']}, "
                  f"imbalance {fmt(best[SECOND], 3)}\n"
                  f"# base config {settings['config']} with {values}\n")
        storage.write_text(storage.join(sweep_dir, "best.yaml"), header + dump_config(cfg))
    return {"front": front, "best": best, "front_ids": front_ids}
