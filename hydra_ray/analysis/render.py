"""report.md from the summary dict: tables and bullet lists of the same numbers as summary.json.

Design choices
- The renderer computes nothing: it formats values of the summary, so report.md and
  summary.json can never disagree. Missing values print as "-" with the reason in the text
  (e.g. "not logged by this source"), never "N/A" for a phase that has data.
- Section order follows the reference analysis (timeline, loss trends, MoE utilisation,
  observations, last step, recommendations), with the extra sections (boundaries, MoD/MoR, eval,
  anomalies) after the ones they refine, and the parse statistics in appendices.
- Long lists (timeline events per phase, unparsed lines) are capped with a "... N more" line;
  summary.json keeps the full lists.
"""

from __future__ import annotations

EVENTS_PER_PHASE = 8
UNPARSED_SHOWN = 100


def _n(x, nd=4, pct=False) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if pct:
        return f"{x * 100:.1f}%"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.3e}"
    return f"{x:.{nd}f}"


def _lr(x) -> str:
    return "-" if x is None else f"{x:.3e}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return out + [""]


def _range(a, b) -> str:
    if a is None:
        return "-"
    return f"{a:,}-{b:,}" if b is not None else f"{a:,}+"


def _mix(m, default) -> str:
    if not m:
        return "default" + (" (" + ", ".join(f"{k} {v:g}" for k, v in default.items()) + ")" if default else "")
    tot = sum(m.values()) or 1
    return ", ".join(f"{k} {v / tot * 100:.0f}%" for k, v in m.items())


def render(s: dict, plots: list[str]) -> str:
    L: list[str] = []
    run, src = s["run"], s["source"]
    L += [f"# Training analysis: {src['label']}", ""]
    of = f" of {run['max_steps']:,}" if run["max_steps"] else ""
    experts = f", {run['num_experts']} experts" if run["num_experts"] else ""
    paths = ", ".join(f"`{p}`" for p in src["paths"][:6]) + (" ..." if len(src["paths"]) > 6 else "")
    L += [f"Source: {src['kind']} ({paths}). Steps {_range(run['first_step'], run['last_step'])}{of}, "
          f"{run['n_samples']:,} step samples, {len(s['phases'])} phases{experts}.", ""]
    L += ["Every figure below is computed from the logged samples; `summary.json` holds the same numbers.", ""]
    if s.get("verdict"):
        from hydra_ray.analysis.verdict import render_verdict

        L += render_verdict(s["verdict"])

    # 1. timeline
    L += ["## 1. Training timeline by phase", ""]
    rows = []
    for p in s["phases"]:
        evs = [e for e in s["timeline"] if e["step"] is not None and p["first_step"] is not None
               and _in_phase(e["step"], p)]
        ev_txt = "; ".join(f"{e['step']:,}: {e['event']} ({e['detail']})" for e in evs[:EVENTS_PER_PHASE])
        if len(evs) > EVENTS_PER_PHASE:
            ev_txt += f"; ... {len(evs) - EVENTS_PER_PHASE} more"
        on = ("+" + "+".join(p["features_switched_on"]) + " on") if p["features_switched_on"] else ""
        rows.append([p["name"], _range(p["planned_start"], p["planned_end"]), _range(p["first_step"], p["last_step"]),
                     ", ".join(p["features"]) or "dense", on or "-", p["routing_mode"] or "- (MoE off)",
                     {True: "locked", False: "unlocked", None: "-"}[p["seed_locked"]],
                     _mix(p["mixture"], run["data_mixture"]), ev_txt or "-"])
    L += _table(["Phase", "Planned steps", "Logged steps", "Features", "Switched on", "Routing", "Seed", "Mixture",
                 "Key events"], rows)

    # 2. loss trends
    L += ["## 2. Loss trends by phase", ""]
    rows = []
    for p in s["phases"]:
        rows.append([p["name"], _n(p["n_samples"]), _n(p["loss_mean"]),
                     f"{_n(p['loss_start'])} -> {_n(p['loss_end'])}", _n(p["loss_slope_per_1k"]),
                     _n(p["ce_mean"]), _n(p["grad_mean"], 3), _n(p["grad_p95"], 3), _n(p["grad_max"], 3),
                     _n(p["clip_rate"], pct=True), _lr(p["lr_mean"]), _n(p["n_nan"])])
    L += _table(["Phase", "Samples", "Avg loss", "Loss start -> end", "Slope /1K steps", "Avg CE", "Avg grad",
                 "Grad p95", "Grad max", "Clipped", "Avg LR", "NaN"], rows)
    if s["boundaries"]:
        L += ["### Phase boundaries", ""]
        rows = [[f"{b['from']} -> {b['to']}", f"{b['step_before']:,} -> {b['step_after']:,}",
                 f"{_n(b['loss_before'])} -> {_n(b['loss_after'])}", f"{b['loss_jump']:+.4f}",
                 f"{b['ce_jump']:+.4f}" if b["ce_jump"] is not None else "-",
                 f"{b['switch_on_ce_cost']:+.4f}" if b["switch_on_ce_cost"] is not None else "-",
                 _n(b["jump_in_noise_sd"], 1), "rise" if b["rise"] else "fall"]
                for b in s["boundaries"]]
        L += _table(["Boundary", "Steps", "Loss", "Loss jump", "CE jump", "Switch-on CE cost (same batch)",
                     "Jump / noise sd", "Direction"], rows)
    for name, cap in (("loss.png", "Train and eval loss, phases shaded"),
                      ("grad_lr.png", "Grad norm (log scale) and learning rate")):
        if name in plots:
            L += [f"![{cap}]({name})", ""]

    # 3. MoE utilisation
    L += ["## 3. MoE utilisation by routing mode", ""]
    if s["utilisation"]:
        E = len(s["utilisation"][0]["per_expert_pct"])
        rows = [[u["routing_mode"], ", ".join(u["phases"]), _n(u["n_samples"]),
                 *[f"{x:.1f}%" for x in u["per_expert_pct"]],
                 _n(u["max_min_ratio"], 2) if u["max_min_ratio"] is not None else "inf",
                 _n(u["layer_cv"], 3), _n(u["pooled_cv"], 3),
                 _n(u["agreement_mean"], pct=True), _n(u["collapsed_samples"])]
                for u in s["utilisation"]]
        L += _table(["Routing", "Phases", "Samples", *[f"E{e}" for e in range(E)], "Max/min", "Per-layer CV",
                     "Pooled CV", "Domain->expert agreement", "Collapsed samples"], rows)
        per_layer = sum(u["n_per_layer"] for u in s["utilisation"])
        L += ["Per-layer CV: std / mean of each MoE layer's expert shares, averaged over the layers (the "
              "training loop's `imbalance.layer_cv`); pooled CV: the same of all layers' shares added up. "
              "Both are means over the mode's samples; the advice rests on the per-layer one. "
              + ("Only pooled shares are logged here, so the two coincide." if not per_layer else
                 f"{per_layer:,} of {sum(u['n_samples'] for u in s['utilisation']):,} samples carry "
                 "per-layer figures."), ""]
        L += ["Evolution within each mode (first -> last sample):", ""]
        for u in s["utilisation"]:
            L.append(f"- {u['routing_mode']}: step {u['first_step']:,} "
                     f"[{'/'.join(f'{x:.1f}' for x in u['first_pct'])}%] -> step {u['last_step']:,} "
                     f"[{'/'.join(f'{x:.1f}' for x in u['last_pct'])}%]"
                     + (f"; div {u['div_mean']:.4f}, ent {u['ent_mean']:.4f} (means)" if u["div_mean"] is not None
                        and u["ent_mean"] is not None else ""))
        L.append("")
        ag = s["agreement"]
        if ag["available"]:
            L += [f"Domain->expert agreement at the last logged step ({ag['last_step']:,}): {_n(ag['last'], pct=True)}"
                  + (f" (map {ag['domain_expert_map']})" if ag["domain_expert_map"] else "") + ".", ""]
        else:
            L += ["Domain->expert agreement: not logged by this source.", ""]
    else:
        L += ["No expert utilisation was logged (MoE never switched on in the data).", ""]
    if "expert_util.png" in plots:
        L += ["![Expert utilisation over steps](expert_util.png)", ""]
    if "agreement.png" in plots:
        L += ["![Domain -> expert agreement over steps](agreement.png)", ""]

    # 4. MoD / MoR
    L += ["## 4. MoD and MoR", ""]
    rd = s["mod_mor"]
    if rd["by_phase"]:
        rows = [[r["phase"], _n(r["mod_frac_mean"], 3), _n(r["mod_capacity_mean"], 3), _n(r["mod_acc_mean"], 3),
                 _n(r["mor_depth_mean"], 3), _n(r["mor_acc_mean"], 3)] for r in rd["by_phase"]]
        L += _table(["Phase", "MoD selected fraction", "MoD capacity", "MoD predictor acc", "MoR mean depth",
                     "MoR predictor acc"], rows)
        L += [f"Last step: MoD selected fraction {_n(rd['mod_last'], 3)}, MoR mean depth {_n(rd['mor_last'], 3)}.", ""]
    else:
        L += ["MoD selected fraction and MoR depth are not logged by this source.", ""]
    if "mod_mor.png" in plots:
        L += ["![MoD selected fraction and MoR mean depth](mod_mor.png)", ""]

    # 5. eval
    L += ["## 5. Evaluation", ""]
    ev = s["eval"]
    if ev["available"]:
        L += [f"Last eval at step {ev['last']['step']:,}: loss {_n(ev['last']['loss'])}; best "
              f"{_n(ev['best']['loss'])} at step {ev['best']['step']:,}; train/eval gap "
              f"{_n(ev['train_eval_gap'])} (eval - {ev['train_ref_kind']}).", ""]
        if ev["by_domain"]:
            rows = [[d, _n(v)] for d, v in ev["by_domain"].items()]
            L += _table(["Domain", f"Eval loss at step {ev['last']['step']:,}"], rows)
        doms = list(dict.fromkeys(d for h in ev["history"] for d in (h["by_domain"] or {})))
        rows = [[f"{h['step']:,}", h["phase"] or "-", _n(h["loss"]), _n(h["train_ref"]), _n(h["gap"]),
                 *[_n((h["by_domain"] or {}).get(d)) for d in doms]] for h in ev["history"]]
        L += _table(["Step", "Phase", "Eval loss", "Train", "Gap", *doms], rows)
    else:
        L += ["No evaluations in the data.", ""]
    if s.get("tasks"):
        t = s["tasks"]
        L += [f"Held-out generated tasks (`hydra-ray eval`, checkpoint step {t['step']:,}, {t['n']} items each, "
              f"seed {t['seed']}); 'untrained' is the same model with re-initialised weights:", ""]
        rows = [[k, v["metric"], _n(v["score"], 3), _n(v.get("chance"), 3),
                 "near chance" if v.get("near_chance") else ("above chance" if "chance" in v else "-")]
                for k, v in t["tasks"].items()]
        rows += [[d, "perplexity", _n(p, 2), _n((t.get("chance_perplexity") or {}).get(d), 1), "-"]
                 for d, p in t["perplexity"].items()]
        L += _table(["Task", "Metric", "Score", "Untrained", "Reading"], rows)
    if "eval_by_domain.png" in plots:
        L += ["![Eval loss by domain](eval_by_domain.png)", ""]

    # 6. anomalies
    L += ["## 6. Anomalies", ""]
    if s["anomalies"]:
        rows = [[a["kind"], _n(a["step"]) if a["step"] is not None else "-", a["phase"] or "-", a["detail"]]
                for a in s["anomalies"]]
        L += _table(["Kind", "Step", "Phase", "Detail"], rows)
    else:
        L += ["None: no NaN steps, grad-norm spikes, loss rises at boundaries or utilisation collapse.", ""]

    L += ["## 7. Key observations", ""] + [f"- {o}" for o in s["observations"]] + [""]

    L += ["## 8. Status at the last step", ""]
    st = s["last_step"]
    if st:
        items = [("Step", _n(st["step"]) + (f" of {st['max_steps']:,} ({st['progress'] * 100:.1f}%)"
                                             if st["max_steps"] else "")),
                 ("Phase", st["phase"] or "-"), ("Routing", st["routing_mode"] or "-"),
                 ("Seed", {True: "locked", False: "unlocked", None: "-"}[st["seed_locked"]]),
                 ("Loss", _n(st["loss"]) + (f" (EMA {_n(st['loss_ema'])})" if st["loss_ema"] is not None else "")),
                 ("CE", _n(st["ce"])), ("LR", _lr(st["lr"])), ("Grad norm", _n(st["grad_norm"], 3)),
                 ("Tokens", _n(st["tokens"])),
                 ("Throughput (tok/s)", f"{st['tok_s']:,.0f}" if st["tok_s"] is not None else "-"),
                 ("Expert utilisation", ("/".join(f"{x:.1f}" for x in st["expert_util_pct"]) + "%"
                                         + f" (step {st['expert_util_step']:,})") if st["expert_util_pct"] else "-"),
                 ("Expert imbalance", _imb(st["imbalance"])),
                 ("Domain->expert agreement", _n(st["agreement"], pct=True)),
                 ("MoD selected fraction", _n(st["mod_frac"], 3)), ("MoR mean depth", _n(st["mor_depth"], 3)),
                 ("Last eval", f"{_n(st['last_eval']['loss'])} at step {st['last_eval']['step']:,}"
                  if st["last_eval"] else "-"),
                 ("Last checkpoint", f"step {st['last_checkpoint']['step']}: `{st['last_checkpoint']['path']}`"
                  if st["last_checkpoint"] else "-")]
        L += _table(["", "Value"], [[k, v] for k, v in items])

    L += ["## 9. Recommendations", ""] + [f"{i}. {r}" for i, r in enumerate(s["recommendations"], 1)] + [""]

    ps = s["parse"]
    L += ["## Appendix A: parse statistics", ""]
    L += [f"{ps['lines_read']:,} lines read, {ps['lines_parsed']:,} parsed, {ps['lines_blank']:,} blank, "
          f"{ps['unparsed_count']:,} unparsed; step-line formats: "
          + (", ".join(f"{k} {v:,}" for k, v in ps["formats"].items()) or "-")
          + f"; {ps['relogged']:,} re-logged step(s) superseded by a resumed run.", ""]
    L += _table(["File", "Lines", "Parsed", "Unparsed", "Blank"],
                [[f"`{f['path']}`", _n(f["lines"]), _n(f["parsed"]), _n(f["unparsed"]), _n(f["blank"])]
                 for f in ps["files"]])
    if ps["resumes"]:
        L += [f"- resume: step {r['from_step']:,} -> {r['to_step']:,} at `{r['file']}`:{r['line']}" for r in ps["resumes"]]
        L.append("")
    L += ["## Appendix B: unparsed lines", ""]
    if ps["unparsed_count"]:
        L += ["By reason: " + "; ".join(f"{k}: {v}" for k, v in ps["unparsed_by_reason"].items()) + ".", ""]
        L += _table(["File:line", "Reason", "Text"],
                    [[f"`{u['file'].rsplit('/', 1)[-1]}:{u['line']}`", u["reason"], f"`{u['text'][:160].replace('`', chr(39))}`"]
                     for u in ps["unparsed"][:UNPARSED_SHOWN]])
        if ps["unparsed_count"] > UNPARSED_SHOWN:
            L += [f"... {ps['unparsed_count'] - UNPARSED_SHOWN} more (summary.json lists up to 1000).", ""]
    else:
        L += ["None.", ""]
    return "\n".join(L)


def _imb(x: dict | None) -> str:
    if not x:
        return "-"
    mm = _n(x["layer_max_min"], 2) if x["layer_max_min"] is not None else "inf"
    return f"per-layer CV {_n(x['layer_cv'], 3)}, pooled CV {_n(x['pooled_cv'], 3)}, worst layer max/min {mm}"


def _in_phase(step: int, p: dict) -> bool:
    lo = p["planned_start"] if p["planned_start"] is not None else p["first_step"]
    hi = p["planned_end"] if p["planned_end"] is not None else float("inf")
    return lo <= step <= hi
