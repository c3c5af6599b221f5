"""Load a hydra-ray run into a `Source`: RUN (a local folder or a URI such as s3://bucket/runs/x)
or one metrics .jsonl file.

Design choices
- Every byte comes through `hydra_ray.storage`, and a run's metrics and events through the one
  reader, `runlog.read_lines` / `read_records`: RUN/metrics/part-*.jsonl in order (after the
  single metrics.jsonl of runs written before parts). A .jsonl file given on its own is read
  alone (config.yaml, events and checkpoints then come from its run).
- config.yaml of the run supplies the phases (features, routing, seed, mixture), the clip
  threshold and the expert/domain layout. Without it the phases are rebuilt from the records
  (name order of first appearance, features from which routing figures are logged).
- A corrupt line is skipped with a warning on stderr naming its part and line, and listed in the
  parse statistics (one row per part); it is never fatal, because a run killed mid-write leaves
  exactly that.
- The lines are read in order across parts, and a step that goes backwards supersedes the
  records at or after it: the trainer drops re-run steps on restore, but a crash between its
  rewrites (or a metrics.jsonl appended to by hand, or an old trainer) must still count each
  step once, the later write winning.
- A step is clipped when its pre-clip norm exceeds train.grad_clip (the trainer's own rule);
  without a config, when the logged post-clip norm is below the pre-clip norm.
- The events add restores, NaN skips, roll-backs and switch-on costs to the timeline.
- A record's `imbalance` is kept as the loop logged it (a null worst max/min is an infinite one:
  strict JSON has no infinity), and `expert_util_by_layer` for records logged without it.
"""

from __future__ import annotations

import json
import math
import sys

from hydra_ray import storage
from hydra_ray.analysis.model import (ParseStats, Phase, Record, Source, finite, link_phases, phase_of,
                                      phases_from_config)
from hydra_ray.config import ConfigError
from hydra_ray import runlog
from hydra_ray.utilisation import from_log


def _num(x) -> float | None:
    return float(x) if finite(x) else None


def _record(obj: dict) -> Record:
    step = obj["step"]
    if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError("step is not an integer")
    r = Record(step=step, phase=obj.get("phase"), time=_num(obj.get("time")))
    r.is_sample = "loss" in obj
    if r.is_sample:
        r.nan = bool(obj.get("nan_skipped")) or not finite(obj.get("loss"))
        r.loss = None if r.nan else float(obj["loss"])
        r.ce = _num(obj.get("ce")) if not r.nan else None
        r.lr = _num(obj.get("lr"))
        r.grad = _num(obj.get("grad_norm"))
        r.grad_post = _num(obj.get("grad_norm_clipped"))
        r.tok_s = _num(obj.get("tokens_per_s"))
        r.tokens = obj.get("tokens") if isinstance(obj.get("tokens"), int) else None
        r.routing = obj.get("routing_mode")
        r.seed_locked = obj.get("seed_locked")
        r.mod_capacity = _num(obj.get("mod_capacity"))
        util = obj.get("expert_util")
        r.util = [float(u) for u in util] if isinstance(util, list) and all(finite(u) for u in util) and util else None
        by_layer = obj.get("expert_util_by_layer")
        if isinstance(by_layer, dict) and by_layer and all(
                isinstance(u, list) and u and all(finite(x) for x in u) for u in by_layer.values()):
            r.util_by_layer = {str(k): [float(x) for x in u] for k, u in by_layer.items()}
        imb = obj.get("imbalance")
        if isinstance(imb, dict) and finite(imb.get("layer_cv")) and finite(imb.get("pooled_cv")):
            r.imbalance = from_log({"layer_cv": float(imb["layer_cv"]), "pooled_cv": float(imb["pooled_cv"]),
                                    "layer_max_min": imb.get("layer_max_min") if finite(imb.get("layer_max_min"))
                                    else None})
        r.agreement = _num(obj.get("domain_expert_agreement"))
        r.mod_frac = _num(obj.get("mod_selected_frac"))
        r.mor_depth = _num(obj.get("mor_mean_depth"))
        r.mod_acc = _num(obj.get("mod_predictor_acc"))
        r.mor_acc = _num(obj.get("mor_predictor_acc"))
        r.switch_on = obj.get("switch_on") if isinstance(obj.get("switch_on"), dict) else None
    ev = obj.get("eval")
    if isinstance(ev, dict):
        r.eval_loss = _num(ev.get("loss"))
        bd = ev.get("by_domain")
        if isinstance(bd, dict):
            r.eval_by_domain = {str(k): float(v) for k, v in bd.items() if finite(v)}
    return r


def _parse(lines, stats: ParseStats, warn) -> list[tuple[str, int, Record]]:
    """(part, line number, record) of every parseable line, with per-part statistics."""
    out = []
    files: dict[str, dict] = {}
    for loc, n, line in lines:
        info = files.get(loc)
        if info is None:
            info = files[loc] = stats.new_file(loc)
        if not stats.count(info, line):
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict) or "step" not in obj:
                raise ValueError("not an object with a step")
            out.append((loc, n, _record(obj)))
            info["parsed"] += 1
            stats.lines_parsed += 1
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            info["unparsed"] += 1
            what = "corrupt JSON" if isinstance(e, json.JSONDecodeError) else "unusable record"
            reason = f"{what} ({' '.join(str(e).split())[:80]})"
            stats.bad(loc, n, line, reason)
            warn(f"warning: {loc}:{n}: skipped, {reason}")
    return out


def _dedupe(rows: list[tuple[str, int, Record]], stats: ParseStats) -> list[Record]:
    kept: dict[int, Record] = {}
    last = None
    for loc, n, r in rows:
        if last is not None and r.step <= last:
            gone = [s for s in kept if s >= r.step]
            stats.relogged += sum(kept[s].is_sample for s in gone)
            stats.resumes.append({"file": loc, "line": n, "from_step": last, "to_step": r.step})
            for s in gone:
                del kept[s]
        kept[r.step] = r
        last = r.step
    return [kept[s] for s in sorted(kept)]


def _checkpoints(run: str) -> list[dict]:
    from hydra_ray.checkpoint import list_steps, step_dir_name

    return [{"step": step, "path": storage.join(run, "checkpoints", step_dir_name(step))} for step, _ in list_steps(run)]


def _phases_from_records(records: list[Record]) -> list[Phase]:
    order: dict[str, list[Record]] = {}
    for r in records:
        if r.phase is not None:
            order.setdefault(r.phase, []).append(r)
    out = []
    for name, rs in order.items():
        samples = [r for r in rs if r.is_sample]
        routing = next((r.routing for r in reversed(samples) if r.routing), None)
        feats = []
        if any(r.mor_depth is not None for r in samples):
            feats.append("mor")
        if any(r.mod_frac is not None for r in samples):
            feats.append("mod")
        if any(r.util is not None for r in samples) or routing:
            feats.append("moe")
        seed = next((r.seed_locked for r in samples if r.seed_locked is not None), None)
        out.append(Phase(name, max(r.step for r in rs), routing, feats, seed))
    return link_phases(out)


def load_run(loc: str, phases: list[Phase] | None, warn=None) -> Source:
    """A run (local folder or URI: all its metrics parts, merged) or one metrics .jsonl file."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    stats = ParseStats()
    if storage.is_file(loc):
        run = storage.parent(loc)
        if storage.name(run) == "metrics" and storage.name(loc).startswith("part-"):
            run = storage.parent(run)  # one part of a run: config and events are the run's
        lines = runlog.file_lines(loc)
    else:
        run, lines = loc, runlog.read_lines(loc, "metrics")
    records = _dedupe(_parse(lines, stats, warn), stats)
    if not records:
        raise ConfigError(f"{loc}: no parseable step records")
    stats.formats = {"jsonl": sum(r.is_sample for r in records)}
    src = Source(kind="hydra-ray run", label=storage.name(run), paths=[loc], records=records, phases=[],
                 parse=stats)
    cfg = None
    if storage.is_file(storage.join(run, "config.yaml")):
        from hydra_ray.config import load_config

        try:
            cfg = load_config(storage.join(run, "config.yaml"))
        except ConfigError as e:
            warn(f"warning: {e}; phases are rebuilt from the records")
    if cfg is not None:
        src.phases = phases_from_config(cfg)
        src.grad_clip = cfg.train.grad_clip
        src.num_experts = cfg.model.moe.num_experts
        src.domains = list(cfg.model.domains)
        src.domain_expert_map = cfg.model.domain_expert_map()
        src.data_mixture = dict(cfg.data.mixture)
        src.max_steps = cfg.curriculum.total_steps
        src.tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    else:
        src.phases = _phases_from_records(records)
        src.max_steps = None
    if phases is not None:  # an explicit phase file re-labels the records
        src.phases = phases
        for r in records:
            p = phase_of(phases, r.step)
            r.phase = p.name if p else None
    else:
        known = {p.name for p in src.phases}
        for r in records:
            if r.phase is None or r.phase not in known:
                p = phase_of(src.phases, r.step)
                r.phase = p.name if p else r.phase
    for r in records:
        if not r.is_sample or r.grad is None:
            continue
        if src.grad_clip is not None:
            r.clipped = r.grad > src.grad_clip
        elif r.grad_post is not None:
            r.clipped = r.grad_post < r.grad * (1 - 1e-9)
    if src.num_experts is None:
        src.num_experts = next((len(r.util) for r in records if r.util), None)
    for ev in runlog.read_records(run, "events"):
        kind = ev.get("event")
        step = ev.get("step")
        if kind == "switch_on":
            # events count step indices; the metrics record of that step is step + 1
            detail = (f"{'+'.join(ev.get('features') or [])} on; CE {ev.get('ce_before', math.nan):.4f} -> "
                      f"{ev.get('ce_after', math.nan):.4f} on the same batch")
            src.events.append({"step": step + 1 if isinstance(step, int) else None, "event": kind, "detail": detail})
        elif kind == "restored":
            src.events.append({"step": step, "event": kind, "detail": f"resumed from {ev.get('checkpoint')} "
                                                                      f"on {ev.get('world_size')} worker(s)"})
        elif kind == "started":
            src.events.append({"step": 0, "event": kind, "detail": f"started on {ev.get('world_size')} worker(s)"})
        elif kind == "nan_skipped":
            src.events.append({"step": step, "event": kind,
                               "detail": f"non-finite loss or gradient, step skipped ({ev.get('consecutive')} in a row)"})
        elif kind == "rolled_back":
            src.events.append({"step": step, "event": kind,
                               "detail": f"rolled back to step {ev.get('to_step')} after {ev.get('after_nans')} NaN steps"})
    src.checkpoints = _checkpoints(run)
    src.events += [{"step": c["step"], "event": "checkpoint", "detail": storage.name(c["path"])}
                   for c in src.checkpoints]
    src.events.sort(key=lambda e: e["step"] if e["step"] is not None else -1)
    return src
