"""Every figure of the report, computed from a `Source` into one JSON-ready dict (summary.json);
report.md and the observations/recommendations only ever render numbers from this dict.

Design choices
- Samples are step records; NaN steps count as samples (n_samples) but are left out of every
  mean, and are flagged. Means are plain arithmetic means over the logged samples (the logging
  interval is even within a run, so no step weighting).
- Loss slope: least-squares line of loss on step within the phase, reported per 1,000 steps.
- Grad p95 uses linear interpolation between order statistics (numpy's default).
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
- Utilisation per routing mode: per-expert mean of the logged fractions, x100, one decimal.
  Imbalance = max/min of those means and their coefficient of variation (population sd / mean).
  Collapse = a sample in which an expert gets less than 0.2/E of the tokens (a fifth of its fair
  share); consecutive collapsed samples of one expert are one anomaly.
- Train/eval gap = eval loss - the train figure logged with the eval (HYDRA) or the CE of the
  train sample at (or just before) the eval step (hydra-ray: eval is CE, so CE is the like-for-
  like train figure). Positive = eval worse.
- Recommendations are rules over these figures with the thresholds written next to them; each one
  quotes the numbers that triggered it.
"""

from __future__ import annotations

import math
from statistics import median

from hydra_ray.analysis.model import Phase, Record, Source, finite

SPIKE_K = 6.0
SPIKE_WINDOW = 50
SPIKE_MIN_HISTORY = 10
COLLAPSE_SHARE = 0.2  # of the fair share 1/E
CLIP_HIGH = 0.5
CV_HIGH = 0.25
GAP_HIGH = 0.1
AGREEMENT_KEEP = 0.75  # free-routing agreement below 3/4 of the guided phase's counts as fading


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _slope(pts: list[tuple[int, float]]) -> float | None:
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def _robust_sd(xs: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    m = median(xs)
    return 1.4826 * median([abs(x - m) for x in xs])


def _noise(losses: list[float]) -> float | None:
    diffs = [b - a for a, b in zip(losses, losses[1:])]
    sd = _robust_sd(diffs)
    return sd / math.sqrt(2) if sd is not None else None


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
            "formats": sorted({r.fmt for r in smp}),
        })
    return rows


def boundaries(src: Source, rows: list[dict]) -> list[dict]:
    out = []
    with_data = [r for r in rows if r["loss_start"] is not None]
    for a, b in zip(with_data, with_data[1:]):
        sa = [r for r in src.records if r.phase == a["name"] and r.is_sample and r.loss is not None]
        sb = [r for r in src.records if r.phase == b["name"] and r.is_sample and r.loss is not None]
        last, first = sa[-1], sb[0]
        jump = first.loss - last.loss
        ce_jump = first.ce - last.ce if first.ce is not None and last.ce is not None else None
        noise = a["noise_sd"]
        sw = b["switch_on"]
        cost = sw["ce_after"] - sw["ce_before"] if sw and finite(sw.get("ce_after")) and finite(sw.get("ce_before")) \
            else None
        out.append({
            "from": a["name"], "to": b["name"], "step_before": last.step, "step_after": first.step,
            "loss_before": last.loss, "loss_after": first.loss, "loss_jump": jump,
            "ce_before": last.ce, "ce_after": first.ce, "ce_jump": ce_jump,
            "switch_on_ce_cost": cost, "noise_sd": noise,
            "jump_in_noise_sd": jump / noise if noise else None,
            "rise": jump > 0, "significant": bool(noise) and abs(jump) > 2 * noise,
        })
    return out


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
        mu = sum(means) / n_e
        sd = math.sqrt(sum((m - mu) ** 2 for m in means) / n_e)
        agr = [r.agreement for r in rs if r.agreement is not None]
        rows.append({
            "routing_mode": mode, "n_samples": len(rs),
            "first_step": rs[0].step, "last_step": rs[-1].step,
            "phases": list(dict.fromkeys(r.phase for r in rs if r.phase)),
            "per_expert_pct": [round(m * 100, 1) for m in means],
            "first_pct": [round(u * 100, 1) for u in rs[0].util],
            "last_pct": [round(u * 100, 1) for u in rs[-1].util],
            "max_min_ratio": max(means) / min(means) if min(means) > 0 else None,
            "cv": sd / mu if mu > 0 else None,
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
            med = median(w)
            scale = max(1.4826 * median([abs(x - med) for x in w]), 0.05 * med)
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
        "agreement": r.agreement, "mod_frac": r.mod_frac, "mod_capacity": r.mod_capacity, "mor_depth": r.mor_depth,
        "last_eval": ev.get("last"), "last_checkpoint": src.checkpoints[-1] if src.checkpoints else None,
    }


# --------------------------------------------------------------------------- prose from figures
def _f(x, nd=4):
    return "n/a" if x is None else f"{x:.{nd}f}"


def observations(s: dict) -> list[str]:
    out = []
    smp = [p for p in s["phases"] if p["loss_start"] is not None]
    if smp:
        a, b = smp[0], smp[-1]
        ch = (b["loss_end"] - a["loss_start"]) / a["loss_start"] * 100 if a["loss_start"] else None
        out.append(f"Loss went from {_f(a['loss_start'])} (step {a['first_step']}) to {_f(b['loss_end'])} "
                   f"(step {b['last_step']}), {ch:+.1f}% overall." if ch is not None else
                   f"Loss went from {_f(a['loss_start'])} to {_f(b['loss_end'])}.")
        sl = [p for p in smp if p["loss_slope_per_1k"] is not None]
        if sl:
            best = min(sl, key=lambda p: p["loss_slope_per_1k"])
            out.append(f"Steepest descent in phase {best['name']} ({best['loss_slope_per_1k']:+.4f} per 1K steps).")
            up = [p for p in sl if p["loss_slope_per_1k"] > 0 and p["n_loss"] >= 3]
            if up:
                out.append("Loss trended upwards within: " + ", ".join(
                    f"{p['name']} ({p['loss_slope_per_1k']:+.4f}/1K"
                    + (f", CE {p['ce_slope_per_1k']:+.4f}/1K" if p["ce_slope_per_1k"] is not None else "") + ")"
                    for p in up) + ".")
    if s["boundaries"]:
        big = max(s["boundaries"], key=lambda b: b["loss_jump"])
        if big["loss_jump"] > 0:
            ce = f", CE {big['ce_jump']:+.4f}" if big["ce_jump"] is not None else ""
            out.append(f"Largest loss rise at a boundary: {big['from']} -> {big['to']} at step {big['step_after']} "
                       f"({big['loss_jump']:+.4f}{ce}).")
        else:
            out.append("No phase boundary raised the loss.")
    clip = [p for p in s["phases"] if p["clip_rate"] is not None]
    if clip:
        n = sum(p["n_clip_known"] for p in clip)
        tot = sum(p["clip_rate"] * p["n_clip_known"] for p in clip) / n
        hi = max(clip, key=lambda p: p["clip_rate"])
        out.append(f"Gradients were clipped in {tot * 100:.1f}% of the samples whose clipping is known; most in "
                   f"{hi['name']} ({hi['clip_rate'] * 100:.1f}%).")
    gm = [p for p in s["phases"] if p["grad_max"] is not None]
    if gm:
        hi = max(gm, key=lambda p: p["grad_max"])
        out.append(f"Largest grad norm {hi['grad_max']:.3g} in phase {hi['name']} (phase p95 {hi['grad_p95']:.3g}).")
    if s["utilisation"]:
        worst = max(s["utilisation"], key=lambda u: u["cv"] if u["cv"] is not None else -1)
        mm = f"{worst['max_min_ratio']:.2f}" if worst["max_min_ratio"] is not None else "inf"
        out.append(f"Most imbalanced routing mode: {worst['routing_mode']} (CV {_f(worst['cv'], 3)}, "
                   f"max/min {mm}, over {worst['n_samples']} samples).")
    ag = s["agreement"]
    if ag["available"] and ag["by_routing_mode"]:
        chance = f" (chance {100 / s['run']['num_experts']:.1f}%)" if s["run"]["num_experts"] else ""
        out.append("Domain->expert agreement by routing mode: " + ", ".join(
            f"{m} {v['mean'] * 100:.1f}%" for m, v in ag["by_routing_mode"].items()) + chance + ".")
    rd = s["mod_mor"]
    if rd["mod_available"]:
        out.append(f"MoD selected fraction: {rd['mod_last']:.3f} at the last step "
                   f"(capacity {_f(rd['mod_capacity_last'], 3)}).")
    if rd["mor_available"]:
        out.append(f"MoR mean depth: {rd['mor_last']:.3f} recursions at the last step "
                   f"(run mean {rd['mor_overall_mean']:.3f}).")
    ev = s["eval"]
    if ev["available"]:
        line = f"Eval loss {_f(ev['last']['loss'])} at step {ev['last']['step']}"
        if ev["best"] and ev["best"]["step"] != ev["last"]["step"]:
            line += f" (best {_f(ev['best']['loss'])} at step {ev['best']['step']})"
        if ev["train_eval_gap"] is not None:
            line += f"; train/eval gap {ev['train_eval_gap']:+.4f}"
        if ev["worst_domain"]:
            bd = ev["by_domain"]
            line += (f"; hardest domain {ev['worst_domain']} ({bd[ev['worst_domain']]:.4f}), easiest "
                     f"{ev['best_domain']} ({bd[ev['best_domain']]:.4f})")
        out.append(line + ".")
    kinds: dict[str, int] = {}
    for a in s["anomalies"]:
        kinds[a["kind"]] = kinds.get(a["kind"], 0) + 1
    out.append("Anomalies: " + (", ".join(f"{n} {k}" for k, n in kinds.items()) if kinds else "none") + ".")
    empty = [p["name"] for p in s["phases"] if p["n_samples"] == 0]
    if empty:
        out.append("Phases without samples in the data: " + ", ".join(empty) + ".")
    ps = s["parse"]
    out.append(f"Parsed {ps['lines_parsed']} of {ps['lines_read'] - ps['lines_blank']} non-blank lines; "
               f"{ps['unparsed_count']} unparsed; {ps['relogged']} re-logged step(s) counted once.")
    return out


def recommendations(s: dict) -> list[str]:
    out = []
    nans = [a for a in s["anomalies"] if a["kind"] == "nan_step"]
    if nans:
        out.append(f"{len(nans)} NaN step(s) (first at step {nans[0]['step']}): check the batches at those "
                   "steps and the LR at that point; consider a lower lr_scale for the phase.")
    spikes = [a for a in s["anomalies"] if a["kind"] == "grad_spike"]
    if spikes:
        out.append(f"{len(spikes)} grad-norm spike(s) (largest {max(a['value'] for a in spikes):.3g} at step "
                   f"{max(spikes, key=lambda a: a['value'])['step']}): inspect those batches; if they follow a "
                   "switch-on, add a short LR re-warm-up after it.")
    hot = [p for p in s["phases"] if p["clip_rate"] is not None and p["clip_rate"] > CLIP_HIGH
           and p["n_clip_known"] >= 3]
    if hot:
        out.append("Gradients clipped in most samples of " + ", ".join(
            f"{p['name']} ({p['clip_rate'] * 100:.0f}%, mean norm {p['grad_mean']:.3g})" for p in hot)
            + ": there the clip, not the LR, sets the step size; lower those phases' lr_scale or raise "
              "train.grad_clip.")
    for b in s["boundaries"]:
        if b["rise"] and b["significant"] and (b["ce_jump"] is None or b["ce_jump"] > 0):
            out.append(f"Switching {b['from']} -> {b['to']} raised the loss by {b['loss_jump']:+.4f} "
                       f"({_f(b['jump_in_noise_sd'], 1)} noise sd): ease the switch (capacity warm-up, LR "
                       "re-warm-up, or a lower lr_scale for the first steps).")
    last = [p for p in s["phases"] if p["loss_slope_per_1k"] is not None]
    if last:
        p = last[-1]
        if p["loss_slope_per_1k"] < 0:
            out.append(f"Loss still falling in the last phase ({p['name']}, {p['loss_slope_per_1k']:+.4f} per "
                       "1K steps): more steps would help.")
        else:
            out.append(f"Loss flat or rising in the last phase ({p['name']}, {p['loss_slope_per_1k']:+.4f} per "
                       "1K steps): decay the LR or stop here.")
    for u in s["utilisation"]:
        if u["cv"] is not None and u["cv"] > CV_HIGH:
            out.append(f"Routing mode {u['routing_mode']}: experts imbalanced (CV {u['cv']:.2f}, per-expert "
                       f"{'/'.join(f'{x:.1f}' for x in u['per_expert_pct'])}%): raise moe.aux_weight or enable "
                       "moe.bias_balancing.")
    coll = [a for a in s["anomalies"] if a["kind"] == "utilisation_collapse"]
    if coll:
        out.append(f"{len(coll)} utilisation collapse(s) (first at step {coll[0]['step']}): an expert nearly "
                   "stopped receiving tokens; check the router and the balancing loss there.")
    # forced routing is 100% agreement by construction, so the learned reference is teacher routing
    ag = s["agreement"]["by_routing_mode"]
    guide = "teacher" if "teacher" in ag else "forced" if "forced" in ag else None
    if guide and "free" in ag and ag[guide]["mean"] and ag["free"]["mean"] is not None \
            and ag["free"]["mean"] < AGREEMENT_KEEP * ag[guide]["mean"]:
        out.append(f"Domain specialisation fades in free routing (agreement {ag[guide]['mean'] * 100:.1f}% "
                   f"under {guide} routing -> {ag['free']['mean'] * 100:.1f}% free): keep a small teacher "
                   "weight in the free phase or lengthen the teacher phase.")
    ev = s["eval"]
    if ev["available"] and ev["train_eval_gap"] is not None and ev["train_eval_gap"] > GAP_HIGH:
        out.append(f"Eval loss exceeds train by {ev['train_eval_gap']:.4f}: more data per step or stronger "
                   "regularisation (weight decay) before training longer.")
    if ev["available"] and ev["by_domain"]:
        bd = ev["by_domain"]
        mean = sum(bd.values()) / len(bd)
        w = ev["worst_domain"]
        if bd[w] > mean * 1.05:
            out.append(f"Domain {w} lags (eval {bd[w]:.4f} vs mean {mean:.4f}): raise its mixture weight.")
    if s["parse"]["unparsed_count"]:
        out.append(f"{s['parse']['unparsed_count']} line(s) could not be parsed (Appendix B): check they "
                   "carry no figures the analysis should read.")
    return out or ["No action indicated by these figures."]


def _clean(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def summarize(src: Source, unparsed_cap: int = 1000) -> dict:
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
    s = _clean(s)
    s["observations"] = observations(s)
    s["recommendations"] = recommendations(s)
    return s
