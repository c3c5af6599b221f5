"""Observations and recommendations: prose rules over the figures of `figures.summarize`, never
over the records, so every sentence quotes numbers that summary.json also holds.

Design choices
- Each recommendation is a rule over those figures with its threshold named below, and quotes the
  numbers that triggered it; with none triggered there is one "No action indicated" line.
- Expert balance is judged on the per-layer CV (the training loop's `imbalance.layer_cv`): two
  layers that collapse onto different experts look balanced once pooled, so the pooled CV is
  quoted beside it but never decides.
"""

from __future__ import annotations

CLIP_HIGH = 0.5
CV_HIGH = 0.25  # per-layer CV of expert utilisation
GAP_HIGH = 0.1
AGREEMENT_KEEP = 0.75  # free-routing agreement below 3/4 of the guided phase's counts as fading


def advise(s: dict) -> dict:
    """{"observations": [...], "recommendations": [...]} for a summary dict."""
    return {"observations": observations(s), "recommendations": recommendations(s)}


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
        worst = max(s["utilisation"], key=lambda u: u["layer_cv"] if u["layer_cv"] is not None else -1)
        mm = f"{worst['max_min_ratio']:.2f}" if worst["max_min_ratio"] is not None else "inf"
        out.append(f"Most imbalanced routing mode: {worst['routing_mode']} (per-layer CV {_f(worst['layer_cv'], 3)}, "
                   f"pooled CV {_f(worst['pooled_cv'], 3)}, max/min of the mean shares {mm}, "
                   f"over {worst['n_samples']} samples).")
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
        if u["layer_cv"] is not None and u["layer_cv"] > CV_HIGH:
            out.append(f"Routing mode {u['routing_mode']}: experts imbalanced (per-layer CV {u['layer_cv']:.2f}, "
                       f"pooled CV {_f(u['pooled_cv'], 2)}, per-expert "
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
