"""PNG plots of an analysis (matplotlib, Agg backend: no display needed).

Design choices
- matplotlib is imported here, inside `write_plots`, never at report.py import time (the CLI
  imports report.py to build its parser).
- Every step-axis plot shades the phases as alternating bands named at the top, so each curve
  reads against the curriculum. Bands use the observed step range of each phase (the planned
  range of an open-ended last phase is unknown).
- A plot whose data the source does not log (e.g. MoD/MoR or eval by domain in HYDRA logs) is
  not written, and the report says so instead of showing an empty frame.
- The y-range of the loss plot ignores the first 2% of samples when later values exist, so the
  initial ~ln(vocab) loss does not flatten the rest of the curve; nothing is clipped from the data.
"""

from __future__ import annotations

from pathlib import Path

from hydra_ray.analysis.model import Source

_BAND = ["#f2f2f2", "#e3ecf7"]


def _bands(ax, spans: list[tuple[str, int, int]], label=True, shade=True) -> None:
    """Alternating shaded bands (or, over a stackplot, boundary lines) named at the top. A name
    goes on the lowest of three rows where it does not overlap the previous name on that row
    (text width estimated from the font size and the axes' width)."""
    if not spans:
        return
    lo, hi = min(a for _, a, _ in spans), max(b for _, _, b in spans)
    total = (hi - lo) or 1
    fig = ax.get_figure()
    width_px = fig.get_size_inches()[0] * fig.dpi * ax.get_position().width
    row_end = [-1.0, -1.0, -1.0]  # right edge (fraction of the axis) of the last name on each row
    for i, (name, a, b) in enumerate(spans):
        if shade:
            ax.axvspan(a, b, color=_BAND[i % 2], zorder=0, lw=0)
        elif i:
            ax.axvline(a, color="k", lw=0.8, ls="--", zorder=3)
        if not label:
            continue
        size = 8 if (b - a) / total >= 0.08 else 7
        half = len(name) * size * 0.62 * fig.dpi / 72 / width_px / 2
        mid = ((a + b) / 2 - lo) / total
        row = next((k for k, end in enumerate(row_end) if mid - half > end + 0.005), 2)
        row_end[row] = mid + half
        ax.text((a + b) / 2, 1.01 + 0.065 * row, name, transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=size, clip_on=False)


def _spans(src: Source) -> list[tuple[str, int, int]]:
    """(name, first, last) step span of each phase that has records: the planned range, cut to
    the data, so neighbouring bands touch."""
    spans = []
    last_step = max((r.step for r in src.records), default=0)
    for p in src.phases:
        steps = [r.step for r in src.records if r.phase == p.name]
        if not steps:
            continue
        a = min(p.start_step - 1, min(steps))
        b = min(p.until_step, last_step) if p.until_step is not None else last_step
        spans.append((p.name, a, max(b, max(steps))))
    return spans


def write_plots(src: Source, summary: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    spans = _spans(src)
    smp = src.samples()

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    # 1. train / eval loss
    pts = [(r.step, r.loss) for r in smp if r.loss is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(10, 4.2))
        _bands(ax, spans)
        ax.plot([x for x, _ in pts], [y for _, y in pts], lw=1.2, color="#1f77b4", label="train loss")
        ce = [(r.step, r.ce) for r in smp if r.ce is not None]
        if ce:
            ax.plot([x for x, _ in ce], [y for _, y in ce], lw=0.9, color="#2ca02c", alpha=0.8, label="train CE")
        ev = [h for h in summary["eval"]["history"] if h["loss"] is not None]
        if ev:
            ax.plot([h["step"] for h in ev], [h["loss"] for h in ev], "o-", ms=4, color="#d62728", label="eval loss")
        nan = [r.step for r in smp if r.nan]
        if nan:
            ax.plot(nan, [min(y for _, y in pts)] * len(nan), "x", color="k", label="NaN step")
        skip = max(1, len(pts) // 50) if len(pts) > 20 else 0
        ys = [y for _, y in pts[skip:]] + [h["loss"] for h in ev] + ([y for _, y in ce[skip:]] if ce else [])
        lo, hi = min(ys), max(ys)
        pad = (hi - lo) * 0.08 or 0.1
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "loss.png")

    # 2. grad norm (log) and LR
    grads = [(r.step, r.grad) for r in smp if r.grad is not None and r.grad > 0]
    lrs = [(r.step, r.lr) for r in smp if r.lr is not None]
    if grads or lrs:
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
        _bands(a1, spans)
        _bands(a2, spans, label=False)
        if grads:
            a1.plot([x for x, _ in grads], [y for _, y in grads], lw=1, color="#9467bd", label="grad norm (pre-clip)")
            post = [(r.step, r.grad_post) for r in smp if r.grad_post is not None and r.grad_post > 0]
            if post and src.kind != "hydra-ray run":
                a1.plot([x for x, _ in post], [y for _, y in post], lw=0.8, color="#8c564b", alpha=0.7,
                        label="grad norm (post-clip)")
            if src.grad_clip:
                a1.axhline(src.grad_clip, color="k", ls="--", lw=0.8, label=f"clip {src.grad_clip:g}")
            sp = [a for a in summary["anomalies"] if a["kind"] == "grad_spike"]
            if sp:
                a1.plot([a["step"] for a in sp], [a["value"] for a in sp], "v", color="#d62728", label="spike")
            a1.set_yscale("log")
            a1.legend(loc="upper right", fontsize=8)
        a1.set_ylabel("grad norm (log)")
        a1.grid(alpha=0.3, which="both")
        if lrs:
            a2.plot([x for x, _ in lrs], [y for _, y in lrs], lw=1.2, color="#ff7f0e")
        a2.set_ylabel("learning rate")
        a2.set_xlabel("step")
        a2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        a2.grid(alpha=0.3)
        save(fig, "grad_lr.png")

    # 3. expert utilisation stacked
    util = [r for r in src.records if r.util is not None]
    if util:
        E = len(util[0].util)
        util = [r for r in util if len(r.util) == E]
        fig, ax = plt.subplots(figsize=(10, 4.2))
        xs = [r.step for r in util]
        _bands(ax, [(n, max(a, xs[0]), b) for n, a, b in spans if b > xs[0]], shade=False)
        ax.stackplot(xs, *[[r.util[e] * 100 for r in util] for e in range(E)], labels=[f"expert {e}" for e in range(E)],
                     alpha=0.85)
        for k in range(1, E):
            ax.axhline(100 * k / E, color="k", lw=0.4, ls=":")
        if xs[-1] > xs[0]:
            ax.set_xlim(xs[0], xs[-1])
        ax.set_ylim(0, max(100, max(sum(r.util) * 100 for r in util)))
        ax.set_xlabel("step")
        ax.set_ylabel("share of routed tokens (%)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=min(E, 8), frameon=False)
        save(fig, "expert_util.png")

    # 4. MoD selected fraction / MoR mean depth
    mod = [(r.step, r.mod_frac) for r in src.records if r.mod_frac is not None]
    mor = [(r.step, r.mor_depth) for r in src.records if r.mor_depth is not None]
    if mod or mor:
        fig, ax = plt.subplots(figsize=(10, 4))
        _bands(ax, spans)
        lines = []
        if mod:
            lines += ax.plot([x for x, _ in mod], [y for _, y in mod], "o-", ms=3, color="#17becf",
                             label="MoD selected fraction")
            cap = [(r.step, r.mod_capacity) for r in src.records if r.mod_capacity is not None]
            if cap:
                lines += ax.plot([x for x, _ in cap], [y for _, y in cap], ls="--", lw=0.8, color="#17becf",
                                 label="MoD capacity")
        ax.set_ylabel("MoD fraction of tokens")
        ax.set_ylim(0, 1.05)
        if mor:
            a2 = ax.twinx()
            lines += a2.plot([x for x, _ in mor], [y for _, y in mor], "s-", ms=3, color="#bcbd22",
                             label="MoR mean depth")
            a2.set_ylabel("MoR mean recursions")
        ax.set_xlabel("step")
        ax.legend(lines, [ln.get_label() for ln in lines], loc="lower left", fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "mod_mor.png")

    # 5. domain -> expert agreement (forced routing is the map itself: 1.0 by construction)
    agr = [(r.step, r.agreement) for r in src.records if r.agreement is not None]
    if agr:
        fig, ax = plt.subplots(figsize=(10, 3.6))
        _bands(ax, [(n, max(a, agr[0][0]), b) for n, a, b in spans if b > agr[0][0]])
        ax.plot([x for x, _ in agr], [y for _, y in agr], "o-", ms=3, lw=1, color="#e377c2",
                label="domain -> expert agreement")
        if src.num_experts:
            ax.axhline(1 / src.num_experts, color="k", ls=":", lw=0.8, label=f"chance (1/{src.num_experts})")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("step")
        ax.set_ylabel("share of tokens on their domain's expert")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "agreement.png")

    # 6. eval loss by domain
    ev = [h for h in summary["eval"]["history"] if h["by_domain"]]
    if ev:
        doms = list(dict.fromkeys(d for h in ev for d in h["by_domain"]))
        fig, ax = plt.subplots(figsize=(10, 4))
        _bands(ax, spans)
        for d in doms:
            pts = [(h["step"], h["by_domain"][d]) for h in ev if d in h["by_domain"]]
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", ms=4, label=d)
        ax.set_xlabel("step")
        ax.set_ylabel("eval loss (CE)")
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "eval_by_domain.png")
    return written
