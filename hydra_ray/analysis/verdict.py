"""The curriculum verdict: each claim of the reference HYDRA run, measured on this run, against a
target, pass or fail.

Design choices
- Computed from the summary only (figures.py), so report.md, summary.json and the verdict can
  never disagree; `hydra-ray eval` results join when the run has them.
- A row the data cannot support says so and why (status "no data"), e.g. HYDRA text logs carry no
  same-batch switch-on CE. It never passes by default.
- Targets (issue 14's proof run): agreement >= 0.85 averaged over teacher and free routing;
  utilisation max/min <= 1.15 in forced and teacher routing (uniform mixture); free-routing
  utilisation within 5 points of the mixture weight of each expert's domain; every switch-on
  < 1 % CE on the same batch; no CE rise > 2 noise sd at a boundary (mean CE of the 5 samples
  either side, against the per-sample CE noise of the phase before); MoD predictor >= 0.97, MoR
  predictor >= 0.90 in the last phase that has them; stable gradients (no non-finite step, no
  grad-norm spike inside a phase, by the report's anomaly rule); generalisation gap (eval - train
  CE, averaged over the last phase's evals) <= 0.10 nats; held-out tasks above the untrained model.
"""

from __future__ import annotations

import statistics

AGREEMENT_MIN = 0.85
BALANCE_MAX = 1.15
MIXTURE_POINTS = 5.0
SWITCH_COST_MAX = 0.01
BOUNDARY_SD_MAX = 2.0
MOD_ACC_MIN, MOR_ACC_MIN = 0.97, 0.90
SPIKE_GRACE = 3  # samples at a phase's start left out of the spike count
GAP_MAX = 0.10


def _row(claim: str, measured: str, target: str, ok: bool | None, why: str = "") -> dict:
    return {"claim": claim, "measured": measured, "target": target,
            "status": "no data" if ok is None else ("pass" if ok else "fail"), "note": why}


def _specialisation(s: dict) -> dict:
    ag = s["agreement"]
    modes = {m: v["mean"] for m, v in (ag.get("by_routing_mode") or {}).items()
             if m in ("teacher", "free") and v.get("mean") is not None}
    if not ag.get("available") or not modes:
        return _row("specialisation: domain -> expert agreement", "-", f">= {AGREEMENT_MIN}", None,
                    "no domain agreement logged in teacher or free routing" if ag.get("available")
                    else "the source logs no domain -> expert agreement")
    mean = sum(modes.values()) / len(modes)
    parts = ", ".join(f"{m} {v:.3f}" for m, v in modes.items())
    return _row("specialisation: domain -> expert agreement", f"{mean:.3f} ({parts})",
                f">= {AGREEMENT_MIN} (mean of teacher and free)", mean >= AGREEMENT_MIN)


def _balance(s: dict) -> dict:
    util = {u["routing_mode"]: u for u in s["utilisation"]}
    have = {m: util[m]["max_min_ratio"] for m in ("forced", "teacher") if m in util
            and util[m].get("max_min_ratio") is not None}
    if not have:
        return _row("balance: expert utilisation max/min", "-", f"<= {BALANCE_MAX}", None,
                    "no utilisation logged in forced or teacher routing")
    worst = max(have.values())
    return _row("balance: expert utilisation max/min", ", ".join(f"{m} {v:.2f}" for m, v in have.items()),
                f"<= {BALANCE_MAX} in forced and teacher (uniform mixture)", worst <= BALANCE_MAX)


def _free_follows_mixture(s: dict) -> dict:
    free = next((u for u in s["utilisation"] if u["routing_mode"] == "free"), None)
    dmap = s["agreement"].get("domain_expert_map") or {}
    mix = s["run"].get("data_mixture") or {}
    claim = "specialisation: free-routing utilisation follows the mixture"
    if free is None or not dmap or not mix:
        return _row(claim, "-", f"within {MIXTURE_POINTS:g} points", None,
                    "needs free-routing utilisation, the domain -> expert map and the data mixture")
    tot = sum(mix.values()) or 1
    want = [0.0] * len(free["per_expert_pct"])
    for d, e in dmap.items():
        if 0 <= e < len(want):
            want[e] += 100 * mix.get(d, 0) / tot
    got = free["per_expert_pct"]
    diff = max(abs(a - b) for a, b in zip(got, want))
    shown = " / ".join(f"{a:.1f}" for a in got) + " % vs mixture " + " / ".join(f"{b:.1f}" for b in want)
    return _row(claim, shown, f"within {MIXTURE_POINTS:g} points per expert", diff <= MIXTURE_POINTS)


def _switch_ons(s: dict) -> dict:
    costs = [(b["to"], b["switch_on_ce_cost"] / b["ce_before"]) for b in s["boundaries"]
             if b.get("switch_on_ce_cost") is not None and b.get("ce_before")]
    if not costs:
        return _row("lossless switch-ons: CE cost on the same batch", "-", f"< {SWITCH_COST_MAX:.0%}", None,
                    "no same-batch switch-on CE in the data (hydra-ray runs log it at every feature switch)")
    worst = max(c for _, c in costs)
    return _row("lossless switch-ons: CE cost on the same batch",
                ", ".join(f"{p} {100 * c:+.2f}%" for p, c in costs), f"< {SWITCH_COST_MAX:.0%} each",
                worst < SWITCH_COST_MAX)


def _boundaries(s: dict) -> dict:
    jumps = [(b["to"] + ("*" if b.get("mixture_changed") else ""), b["ce_window_jump_in_noise_sd"])
             for b in s["boundaries"] if b.get("ce_window_jump_in_noise_sd") is not None]
    if not jumps:
        return _row("no CE rise at phase boundaries", "-", f"<= {BOUNDARY_SD_MAX:g} noise sd", None,
                    "no boundary with CE on both sides and a measurable noise level")
    worst = max(j for _, j in jumps)
    star = " (* the data mixture changes there too)" if any(p.endswith("*") for p, _ in jumps) else ""
    return _row("no CE rise at phase boundaries", f"largest {worst:+.1f} sd (" +
                ", ".join(f"{p} {j:+.1f}" for p, j in jumps) + ")" + star,
                f"<= {BOUNDARY_SD_MAX:g} noise sd (mean CE of 5 samples each side)", worst <= BOUNDARY_SD_MAX)


def _predictors(s: dict) -> list[dict]:
    rows = []
    for key, name, floor in (("mod_acc_mean", "MoD", MOD_ACC_MIN), ("mor_acc_mean", "MoR", MOR_ACC_MIN)):
        have = [p for p in s["phases"] if p.get(key) is not None]
        if not have:
            rows.append(_row(f"{name} causal predictor accuracy", "-", f">= {floor}", None,
                             f"no {name} predictor accuracy in the data"))
            continue
        last = have[-1]
        rows.append(_row(f"{name} causal predictor accuracy", f"{last[key]:.3f} ({last['name']})", f">= {floor}",
                         last[key] >= floor))
    return rows


def _gradients(s: dict) -> dict:
    """No non-finite step and no grad-norm spike (the report's anomaly rule: above the median of
    the previous samples + 6 robust sd) inside a phase. A phase's first samples are left out: a
    phase that adds a loss term (the teacher loss) raises the level once, which is not a spike."""
    phases = {p["name"]: p for p in s["phases"] if p.get("grad_mean") is not None}
    nan = sum(p.get("n_nan") or 0 for p in s["phases"])
    if not phases:
        return _row("stable gradients", "-", "no non-finite step, no spike", None, "no grad norms in the data")

    def settled(a: dict) -> bool:
        p = phases.get(a.get("phase"))
        if p is None or p.get("first_step") is None or not p.get("n_samples"):
            return True
        every = (p["last_step"] - p["first_step"]) / max(1, p["n_samples"] - 1)
        return a["step"] > p["first_step"] + SPIKE_GRACE * every

    spikes = [a for a in s["anomalies"] if a["kind"] == "grad_spike" and settled(a)]
    med = statistics.median(p["grad_mean"] for p in phases.values())
    clip = [p["clip_rate"] for p in phases.values() if p.get("clip_rate") is not None]
    clipped = f"; clipped in {100 * sum(clip) / len(clip):.0f}% of samples" if clip else ""
    return _row("stable gradients", f"{nan} non-finite step(s), {len(spikes)} spike(s) inside phases "
                f"(median grad norm {med:.2f}{clipped})", "none, none", nan == 0 and not spikes)


def _gap(s: dict) -> dict:
    """Eval loss minus the train CE logged at the same step, averaged over the evals of the last
    phase that has any (one train sample is as noisy as its batch)."""
    ev = s["eval"]
    hist = [h for h in ev.get("history") or [] if h.get("gap") is not None]
    if not ev.get("available") or not hist:
        return _row("generalisation gap (eval - train CE)", "-", f"<= {GAP_MAX}", None,
                    "no eval loss beside a train CE in the data")
    last = [h for h in hist if h.get("phase") == hist[-1].get("phase")]
    g = sum(h["gap"] for h in last) / len(last)
    return _row("generalisation gap (eval - train CE)",
                f"{g:+.3f} (mean of {len(last)} eval(s) in {hist[-1].get('phase') or 'the last phase'})",
                f"<= {GAP_MAX} nats", g <= GAP_MAX)


def _tasks(s: dict) -> dict:
    res = s.get("tasks")
    if not res:
        return _row("held-out tasks above chance", "-", "every task above the untrained model", None,
                    "no `hydra-ray eval` result in the run")
    parts, ok = [], True
    for name, t in res["tasks"].items():
        parts.append(f"{name} {t['score']:.2f}" + (f" (untrained {t['chance']:.2f})" if "chance" in t else ""))
        ok = ok and not t.get("near_chance", True)
    return _row("held-out tasks above chance", f"step {res['step']:,}: " + ", ".join(parts),
                "every task above the untrained model", ok)


def verdict(s: dict) -> list[dict]:
    return [_specialisation(s), _free_follows_mixture(s), _balance(s), _switch_ons(s), _boundaries(s),
            *_predictors(s), _gradients(s), _gap(s), _tasks(s)]


def render_verdict(rows: list[dict]) -> list[str]:
    from hydra_ray.analysis.render import _table

    passed = sum(r["status"] == "pass" for r in rows)
    failed = sum(r["status"] == "fail" for r in rows)
    out = ["## Curriculum verdict", "",
           f"Each claim of the reference HYDRA run, measured on this run: {passed} pass, {failed} fail, "
           f"{len(rows) - passed - failed} without data.", ""]
    return out + _table(["Claim", "Measured", "Target", "Verdict", "Why no data"],
                        [[r["claim"], r["measured"], r["target"], r["status"].upper() if r["status"] != "no data"
                          else "no data", r["note"]] for r in rows])
