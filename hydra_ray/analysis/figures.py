"""Every figure of the report, computed from a `Source` into one JSON-ready dict (summary.json);
report.md and the advice (`advice.py`) only ever render numbers from this dict.

Design choices
- Samples are step records; NaN steps count as samples (n_samples) but are left out of every
  mean, and are flagged. Means are plain arithmetic means over the logged samples (the logging
  interval is even within a run, so no step weighting).
- Loss slope: least-squares line of loss on step within the phase (`np.polyfit`, degree 1),
  reported per 1,000 steps.
- Grad p95: `np.percentile` (linear interpolation between order statistics).
- Clipping rate = clipped samples / samples whose clipping is known (see the loaders for the rule
  of each source); None when no sample says.
- Loss jump at a boundary = first finite loss of the new phase - last finite loss of the old one,
  compared with the old phase's noise: 1.4826 * MAD of its consecutive loss differences / sqrt(2)
  (a robust per-sample sd). Every rise is flagged; the detail says whether it exceeds 2 sd and
  whether CE moved with it (a rise carried by auxiliary losses is not a quality loss).
- Grad-norm spike: a sample above median + 6 * robust sd (1.4826 * MAD, floored at 5% of the
  median so a flat stretch does not flag noise) of the previous 50 finite samples; judged only
  once 10 previous samples exist, so the large norms of the first steps are not "spikes". A
  trailing window follows the level changes of a curriculum, which one whole-run threshold would
  not.
- Utilisation per routing mode: per-expert mean of the logged fractions, x100, one decimal, and
  max/min of those means. Imbalance has one definition, `hydra_ray.utilisation.imbalance`
  (per-layer CV, pooled CV, worst layer's max/min): a record's own `imbalance` (what the training
  loop logged) when it has one, else that function of its `expert_util_by_layer`, else of its
  pooled utilisation taken as a single layer (older runs, HYDRA text logs: per-layer = pooled).
  A mode's figures are the means over its samples. Collapse = a sample in which an expert gets
  less than 0.2/E of the tokens (a fifth of its fair share); consecutive collapsed samples of one
  expert are one anomaly.
- Train/eval gap = eval loss - the train figure logged with the eval (HYDRA) or the CE of the
  train sample at (or just before) the eval step (hydra-ray: eval is CE, so CE is the like-for-
  like train figure). Positive = eval worse.
"""

from __future__ import annotations

import math

import numpy as np

from hydra_ray.analysis.model import Phase, Record, Source, finite
from hydra_ray.utilisation import imbalance

SPIKE_K = 6.0
SPIKE_WINDOW = 50
SPIKE_MIN_HISTORY = 10
COLLAPSE_SHARE = 0.2  # of the fair share 1/E
MAD_SD = 1.4826  # MAD -> sd of a normal distribution


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q * 100)) if xs else None


def _slope(pts: list[tuple[int, float]]) -> float | None:
    if len({x for x, _ in pts}) < 2:
        return None
    x, y = np.array(pts, dtype=np.float64).T
    return float(np.polyfit(x, y, 1)[0])


def _mad(xs) -> float:
    """Median absolute deviation from the median."""
    return float(np.median(np.abs(np.asarray(xs, dtype=np.float64) - np.median(xs))))


def _noise(losses: list[float]) -> float | None:
    """Robust per-sample sd of the loss: MAD_SD * MAD of its consecutive differences / sqrt(2)."""
    diffs = np.diff(losses)
    return MAD_SD * _mad(diffs) / math.sqrt(2) if len(diffs) >= 2 else None


def _phase_list(src: Source) -> list[Phase]:
    """The planned phases plus any phase name the records carry that the plan lacks."""
    out = list(src.phases)
    known = {p.name for p in out}
    for r in src.records:
        if r.phase is not None and r.phase not in known:
            known.add(r.phase)
            out.append(Phase(r.phase, max(x.step for x in src.records if x.phase == r.phase), r.routing))
    return out


# --------------------------------------------------------------------------- sections
def phase_rows(src: Source) -> list[dict]:
    rows = []
    prev_feats: list[str] = []
    for p in _phase_list(src):
        recs = [r for r in src.records if r.phase == p.name]
        smp = [r for r in recs if r.is_sample]
        pts = [(r.step, r.loss) for r in smp if r.loss is not None]
        grads = [r.grad for r in smp if r.grad is not None]
        clip_known = [r.clipped for r in smp if r.clipped is not None]
        lrs = [r.lr for r in smp if r.lr is not None]
        ce_pts = [(r.step, r.ce) for r in smp if r.ce is not None]
        ces = [y for _, y in ce_pts]
        slope = _slope(pts)
        ce_slope = _slope(ce_pts)
        on = [f for f in p.features if f not in prev_feats]
        prev_feats = p.features
        switch = next((r.switch_on for r in recs if r.switch_on), None)
        rows.append({
            "name": p.name,
            "planned_start": p.start_step, "planned_end": p.until_step,
            "first_step": smp[0].step if smp else None, "last_step": smp[-1].step if smp else None,
            "routing_mode": p.routing, "seed_locked": p.seed_locked, "mixture": p.mixture,
            "features": list(p.features), "features_switched_on": on, "lr_scale": p.lr_scale,
            "switch_on": switch,
            "n_samples": len(smp), "n_nan": sum(r.nan for r in smp),
            "loss_mean": _mean([y for _, y in pts]),
            "loss_start": pts[0][1] if pts else None, "loss_end": pts[-1][1] if pts else None,
            "loss_min": min((y for _, y in pts), default=None),
            "loss_slope_per_1k": slope * 1000 if slope is not None else None,
            "n_loss": len(pts),
            "ce_mean": _mean(ces), "ce_start": ces[0] if ces else None, "ce_end": ces[-1] if ces else None,
            "ce_slope_per_1k": ce_slope * 1000 if ce_slope is not None else None,
            "grad_mean": _mean(grads), "grad_p95": _pct(grads, 0.95), "grad_max": max(grads, default=None),
            "clip_rate": sum(clip_known) / len(clip_known) if clip_known else None,
            "n_clip_known": len(clip_known),
            "lr_mean": _mean(lrs),
            "tok_s_mean": _mean([r.tok_s for r in smp if r.tok_s is not None]),
            "mod_frac_mean": _mean([r.mod_frac for r in smp if r.mod_frac is not None]),
            "mod_capacity_mean": _mean([r.mod_capacity for r in smp if r.mod_capacity is not None]),
            "mor_depth_mean": _mean([r.mor_depth for r in smp if r.mor_depth is not None]),
            "mod_acc_mean": _mean([r.mod_acc for r in smp if r.mod_acc is not None]),
            "mor_acc_mean": _mean([r.mor_acc for r in smp if r.mor_acc is not None]),
            "agreement_mean": _mean([r.agreement for r in smp if r.agreement is not None]),
            "noise_sd": _noise([y for _, y in pts]),
            "ce_noise_sd": _noise(ces),
            "formats": sorted({r.fmt for r in smp}),
        })
    return rows


BOUNDARY_WINDOW = 5  # samples averaged on each side of a phase boundary for its windowed CE jump


def boundaries(src: Source, rows: list[dict]) -> list[dict]:
    out = []
    with_data = [r for r in rows if r["loss_start"] is not None]
    for a, b in zip(with_data, with_data[1:]):
        sa = [r for r in src.records if r.phase == a["name"] and r.is_sample and r.loss is not None]
        sb = [r for r in src.records if r.phase == b["name"] and r.is_sample and r.loss is not None]
        last, first = sa[-1], sb[0]
        jump = first.loss - last.loss
        ce_jump = first.ce - last.ce if first.ce is not None and last.ce is not None else None
        noise, ce_noise = a["noise_sd"], a["ce_noise_sd"]
        # the mean of up to BOUNDARY_WINDOW samples on each side: one sample either side is as
        # noisy as the batches are different (domain mix, document difficulty)
        ca = [r.ce for r in sa[-BOUNDARY_WINDOW:] if r.ce is not None]
        cb = [r.ce for r in sb[:BOUNDARY_WINDOW] if r.ce is not None]
        ce_win = sum(cb) / len(cb) - sum(ca) / len(ca) if ca and cb else None
        sw = b["switch_on"]
        cost = sw["ce_after"] - sw["ce_before"] if sw and finite(sw.get("ce_after")) and finite(sw.get("ce_before")) \
            else None
        out.append({
            "from": a["name"], "to": b["name"], "step_before": last.step, "step_after": first.step,
            "loss_before": last.loss, "loss_after": first.loss, "loss_jump": jump,
            "ce_before": last.ce, "ce_after": first.ce, "ce_jump": ce_jump,
            "switch_on_ce_cost": cost, "noise_sd": noise,
            "jump_in_noise_sd": jump / noise if noise else None,
            "ce_jump_in_noise_sd": ce_jump / ce_noise if ce_noise and ce_jump is not None else None,
            "ce_window_jump": ce_win,
            "ce_window_jump_in_noise_sd": ce_win / ce_noise if ce_noise and ce_win is not None else None,
            "mixture_changed": a["mixture"] != b["mixture"],
            "rise": jump > 0, "significant": bool(noise) and abs(jump) > 2 * noise,
        })
    return out


def record_imbalance(r: Record) -> dict | None:
    """The record's imbalance as the training loop defines it: its own when logged, else the same
    function of its per-layer utilisation, else of its pooled utilisation as one layer."""
    if r.imbalance is not None:
        return r.imbalance
    return imbalance(r.util_by_layer or ({"pooled": r.util} if r.util else None))


def _fig(imbs: list[dict], key: str) -> float | None:
    return _mean([x[key] for x in imbs if finite(x.get(key))])


def utilisation(src: Source) -> list[dict]:
    groups: dict[str, list[Record]] = {}
    E = src.num_experts
    for r in src.records:
        if r.util is None or (E is not None and len(r.util) != E):
            continue
        groups.setdefault(r.routing or "none", []).append(r)
    rows = []
    for mode, rs in groups.items():
        n_e = len(rs[0].util)
        means = [sum(r.util[i] for r in rs) / len(rs) for i in range(n_e)]
        imbs = [x for x in map(record_imbalance, rs) if x]
        agr = [r.agreement for r in rs if r.agreement is not None]
        rows.append({
            "routing_mode": mode, "n_samples": len(rs),
            "first_step": rs[0].step, "last_step": rs[-1].step,
            "phases": list(dict.fromkeys(r.phase for r in rs if r.phase)),
            "per_expert_pct": [round(m * 100, 1) for m in means],
            "first_pct": [round(u * 100, 1) for u in rs[0].util],
            "last_pct": [round(u * 100, 1) for u in rs[-1].util],
            "max_min_ratio": max(means) / min(means) if min(means) > 0 else None,
            "layer_cv": _fig(imbs, "layer_cv"), "pooled_cv": _fig(imbs, "pooled_cv"),
            "n_per_layer": sum(r.imbalance is not None or r.util_by_layer is not None for r in rs),  # not pooled
            "agreement_mean": _mean(agr), "agreement_n": len(agr),
            "div_mean": _mean([r.moe_div for r in rs if r.moe_div is not None]),
            "ent_mean": _mean([r.moe_ent for r in rs if r.moe_ent is not None]),
            "collapsed_samples": sum(any(u < COLLAPSE_SHARE / n_e for u in r.util) for r in rs),
        })
    return rows


def agreement(src: Source, util_rows: list[dict]) -> dict:
    xs = [r for r in src.records if r.agreement is not None]
    if not xs:
        return {"available": False, "by_routing_mode": {}, "last": None, "last_step": None,
                "domain_expert_map": src.domain_expert_map}
    return {"available": True,
            "by_routing_mode": {u["routing_mode"]: {"mean": u["agreement_mean"], "n": u["agreement_n"]}
                                for u in util_rows if u["agreement_n"]},
            "last": xs[-1].agreement, "last_step": xs[-1].step, "domain_expert_map": src.domain_expert_map}


def routing_depth(src: Source, rows: list[dict]) -> dict:
    mod = [r for r in src.records if r.mod_frac is not None]
    mor = [r for r in src.records if r.mor_depth is not None]
    return {
        "mod_available": bool(mod), "mor_available": bool(mor),
        "by_phase": [{"phase": p["name"], "mod_frac_mean": p["mod_frac_mean"],
                      "mod_capacity_mean": p["mod_capacity_mean"], "mod_acc_mean": p["mod_acc_mean"],
                      "mor_depth_mean": p["mor_depth_mean"], "mor_acc_mean": p["mor_acc_mean"]}
                     for p in rows if p["mod_frac_mean"] is not None or p["mor_depth_mean"] is not None],
        "mod_last": mod[-1].mod_frac if mod else None, "mod_capacity_last": mod[-1].mod_capacity if mod else None,
        "mor_last": mor[-1].mor_depth if mor else None,
        "mod_overall_mean": _mean([r.mod_frac for r in mod]), "mor_overall_mean": _mean([r.mor_depth for r in mor]),
    }


def _train_ref(src: Source, r: Record) -> float | None:
    if r.eval_train_loss is not None:
        return r.eval_train_loss
    prev = [x for x in src.records if x.is_sample and x.step <= r.step and (x.ce is not None or x.loss is not None)]
    if not prev:
        return None
    x = prev[-1]
    return x.ce if x.ce is not None else x.loss


def evaluation(src: Source) -> dict:
    ev = [r for r in src.records if r.eval_loss is not None or r.eval_by_domain]
    hist = []
    for r in ev:
        loss = r.eval_loss
        if loss is None and r.eval_by_domain:
            loss = sum(r.eval_by_domain.values()) / len(r.eval_by_domain)
        ref = _train_ref(src, r)
        hist.append({"step": r.step, "phase": r.phase, "loss": loss, "by_domain": r.eval_by_domain,
                     "train_ref": ref, "gap": loss - ref if loss is not None and ref is not None else None})
    if not hist:
        return {"available": False, "n": 0, "history": [], "first": None, "last": None, "best": None, "by_domain": None,
                "train_eval_gap": None, "worst_domain": None, "best_domain": None}
    last = hist[-1]
    best = min((h for h in hist if h["loss"] is not None), key=lambda h: h["loss"], default=None)
    bd = last["by_domain"] or None
    return {
        "available": True, "n": len(hist), "history": hist,
        "last": {"step": last["step"], "loss": last["loss"]},
        "best": {"step": best["step"], "loss": best["loss"]} if best else None,
        "first": {"step": hist[0]["step"], "loss": hist[0]["loss"]},
        "by_domain": bd,
        "worst_domain": max(bd, key=bd.get) if bd else None,
        "best_domain": min(bd, key=bd.get) if bd else None,
        "train_ref": last["train_ref"], "train_eval_gap": last["gap"],
        "train_ref_kind": "train_loss logged with the eval" if ev[-1].eval_train_loss is not None
        else "train CE (or loss) of the sample at the eval step",
    }


def grad_spikes(src: Source) -> list[dict]:
    out = []
    hist: list[float] = []
    for r in src.samples():
        if r.grad is None:
            continue
        if len(hist) >= SPIKE_MIN_HISTORY:
            w = hist[-SPIKE_WINDOW:]
            med = float(np.median(w))
            scale = max(MAD_SD * _mad(w), 0.05 * med)
            thr = med + SPIKE_K * scale
            if r.grad > thr:
                out.append({"kind": "grad_spike", "step": r.step, "phase": r.phase, "value": r.grad,
                            "threshold": thr,
                            "detail": f"grad norm {r.grad:.3g} > {thr:.3g} (median {med:.3g} of the previous "
                                      f"{len(w)} samples + {SPIKE_K:g} robust sd)"})
        hist.append(r.grad)
    return out


def anomalies(src: Source, bounds: list[dict]) -> list[dict]:
    out = []
    for r in src.samples():
        if r.nan:
            out.append({"kind": "nan_step", "step": r.step, "phase": r.phase, "value": None,
                        "detail": "non-finite loss (step skipped or diverged)"})
    for e in src.events:
        if e["event"] == "rolled_back":
            out.append({"kind": "rolled_back", "step": e["step"], "phase": None, "value": None, "detail": e["detail"]})
    out += grad_spikes(src)
    for b in bounds:
        if b["rise"]:
            sig = (f", {b['jump_in_noise_sd']:.1f} noise sd" if b["jump_in_noise_sd"] is not None else "")
            ce = ""
            if b["ce_jump"] is not None:
                ce = (f"; CE moved {b['ce_jump']:+.4f}" +
                      (" (the rise is mostly auxiliary losses)" if b["ce_jump"] < 0.5 * b["loss_jump"] else ""))
            out.append({"kind": "loss_rise_at_boundary", "step": b["step_after"], "phase": b["to"],
                        "value": b["loss_jump"],
                        "detail": f"{b['from']} -> {b['to']}: loss {b['loss_before']:.4f} -> {b['loss_after']:.4f} "
                                  f"({b['loss_jump']:+.4f}{sig}){ce}"})
    # utilisation collapse: runs of consecutive util samples in which one expert starves
    util = [r for r in src.records if r.util is not None]
    if util:
        E = len(util[0].util)
        thr = COLLAPSE_SHARE / E
        for e in range(E):
            run: list[Record] = []
            for r in util + [None]:
                low = r is not None and len(r.util) == E and r.util[e] < thr
                if low:
                    run.append(r)
                elif run:
                    lo = min(x.util[e] for x in run)
                    out.append({"kind": "utilisation_collapse", "step": run[0].step, "phase": run[0].phase,
                                "value": lo,
                                "detail": f"expert {e} below {thr * 100:.1f}% of tokens in {len(run)} sample(s), "
                                          f"steps {run[0].step}-{run[-1].step} (min {lo * 100:.1f}%, "
                                          f"routing {run[0].routing})"})
                    run = []
    out.sort(key=lambda a: (a["step"] if a["step"] is not None else -1, a["kind"]))
    return out


def last_status(src: Source, ev: dict) -> dict:
    smp = [r for r in src.samples()]
    if not smp:
        return {}
    r = smp[-1]
    fin = next((x for x in reversed(smp) if x.loss is not None), None)
    util = next((x for x in reversed(src.records) if x.util is not None), None)
    return {
        "step": r.step, "max_steps": src.max_steps,
        "progress": r.step / src.max_steps if src.max_steps else None,
        "phase": r.phase, "routing_mode": r.routing, "seed_locked": r.seed_locked,
        "loss": r.loss, "loss_ema": r.loss_ema, "ce": r.ce, "last_finite_loss": fin.loss if fin else None,
        "lr": r.lr, "grad_norm": r.grad, "clipped": r.clipped, "tok_s": r.tok_s,
        "tokens": r.tokens if r.tokens is not None else (r.step * src.tokens_per_step if src.tokens_per_step else None),
        "expert_util_pct": [round(u * 100, 1) for u in util.util] if util else None,
        "expert_util_step": util.step if util else None,
        "imbalance": record_imbalance(util) if util else None,
        "agreement": r.agreement, "mod_frac": r.mod_frac, "mod_capacity": r.mod_capacity, "mor_depth": r.mor_depth,
        "last_eval": ev.get("last"), "last_checkpoint": src.checkpoints[-1] if src.checkpoints else None,
    }


def _clean(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def summarize(src: Source, unparsed_cap: int = 1000) -> dict:
    """Every figure of the report (JSON-ready: non-finite numbers become None); the advice adds
    its prose to this dict (`advice.advise`)."""
    rows = phase_rows(src)
    bounds = boundaries(src, rows)
    util = utilisation(src)
    ev = evaluation(src)
    ps = src.parse
    reasons: dict[str, int] = {}
    for u in ps.unparsed:
        reasons[u.reason] = reasons.get(u.reason, 0) + 1
    smp = src.samples()
    s = {
        "source": {"kind": src.kind, "label": src.label, "paths": src.paths},
        "run": {"first_step": smp[0].step if smp else None, "last_step": smp[-1].step if smp else None,
                "max_steps": src.max_steps, "n_samples": len(smp), "n_records": len(src.records),
                "num_experts": src.num_experts, "domains": src.domains, "grad_clip": src.grad_clip,
                "data_mixture": src.data_mixture, "tokens_per_step": src.tokens_per_step},
        "phases": rows,
        "timeline": [{"step": e["step"], "event": e["event"], "detail": e["detail"]} for e in src.events],
        "boundaries": bounds,
        "utilisation": util,
        "agreement": agreement(src, util),
        "mod_mor": routing_depth(src, rows),
        "eval": ev,
        "anomalies": anomalies(src, bounds),
        "last_step": last_status(src, ev),
        "parse": {"files": ps.files, "lines_read": ps.lines_read, "lines_parsed": ps.lines_parsed,
                  "lines_blank": ps.lines_blank, "formats": ps.formats, "relogged": ps.relogged,
                  "resumes": ps.resumes, "unparsed_count": len(ps.unparsed), "unparsed_by_reason": reasons,
                  "unparsed": [vars(u) for u in ps.unparsed[:unparsed_cap]]},
    }
    return _clean(s)
