"""Expert utilisation figures from counts: the one definition of `imbalance` that the training
loop logs and Tune, the analysis and the serving endpoint read or compute. Plain numpy, so
readers of logs (the analysis, Tune) need no torch."""

from __future__ import annotations

import numpy as np


def imbalance(util_by_layer: dict[str, list[float]] | None) -> dict[str, float] | None:
    """How unevenly tokens spread over the experts: the one definition that training, Tune, the
    analysis and serving report. Takes each MoE layer's expert counts or fractions.
    - `layer_cv`: the coefficient of variation (std / mean) of each layer's utilisation, averaged
      over layers. 0 is perfectly balanced. Per layer, because two layers that collapse onto
      different experts look balanced once pooled;
    - `pooled_cv`: the CV of all layers' utilisation added up (what `expert_util` shows);
    - `layer_max_min`: the worst layer's max / min utilisation (inf when an expert got nothing).
    None when no MoE layer ran."""
    rows = [np.asarray(u, dtype=np.float64) for u in (util_by_layer or {}).values() if sum(u) > 0]
    if not rows:
        return None
    util = np.stack([r / r.sum() for r in rows])
    pooled = util.mean(0)
    cv = util.std(1) / util.mean(1)
    with np.errstate(divide="ignore"):
        ratio = np.where(util.min(1) > 0, util.max(1) / util.min(1), np.inf)
    return {"layer_cv": float(cv.mean()), "pooled_cv": float(pooled.std() / pooled.mean()),
            "layer_max_min": float(ratio.max())}


def from_log(logged: dict) -> dict[str, float | None]:
    """An `imbalance` as read back from a strict-JSON log or answer: an infinite worst max/min
    (an expert that got nothing) was written as null, and is inf again."""
    mm = logged.get("layer_max_min")
    return {**logged, "layer_max_min": float(mm) if mm is not None else float("inf")}
