"""One record model for both sources (hydra-ray metrics.jsonl and the original HYDRA text logs),
the phase model, and the parse statistics.

Design choices
- `Record` is one logged step. Both loaders fill the same fields; a field a source does not log
  stays None, and every statistic skips None (so "not logged" is never confused with zero).
- A record is a *train sample* when it carries a train loss field (`is_sample`); NaN-skipped
  steps are samples with `nan=True` and `loss=None`. Eval-only records (an eval at a step that
  was not logged) carry only eval fields and are not samples.
- Step numbers are the trainer's logged step: hydra-ray logs the number of steps done, so the
  record of step s was trained with the plan of step index s-1. A phase with `until_step` U
  therefore owns logged steps (previous U, U] - inclusive at the top. The same rule is used for
  HYDRA logs and phase files, so one phase file means the same thing for both sources.
- `Phase.routing` is None while MoE is off; the routing mode of a utilisation sample comes from
  the record itself (hydra-ray logs it) or else from its phase (HYDRA logs do not).
- The phase file may be a YAML list of phases, a mapping with `phases:`, or a whole hydra-ray
  config (its `curriculum.phases`); anything else is a one-line ConfigError. A list is validated by
  a strict pydantic model (unknown keys are errors, as in config.py); every problem is named on
  that one line by phase index and name and by key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hydra_ray.config import ConfigError, RoutingMode, did_you_mean

FEATURES = ("mor", "mod", "moe")


@dataclass
class Record:
    step: int
    phase: str | None = None
    is_sample: bool = False
    fmt: str = "jsonl"  # jsonl | new | old (which HYDRA line format gave the train figures)
    loss: float | None = None
    ce: float | None = None
    loss_ema: float | None = None
    ce_ema: float | None = None
    lr: float | None = None
    grad: float | None = None  # pre-clip norm
    grad_post: float | None = None
    clip_pct: float | None = None  # HYDRA new format's own "clipped x%"
    clipped: bool | None = None
    tok_s: float | None = None
    nan: bool = False
    routing: str | None = None
    seed_locked: bool | None = None
    mod_capacity: float | None = None
    util: list[float] | None = None  # fractions, one per expert, all MoE layers pooled
    util_by_layer: dict[str, list[float]] | None = None  # the same per MoE layer (hydra-ray runs)
    imbalance: dict[str, float] | None = None  # as logged by the loop (`utilisation.imbalance`)
    agreement: float | None = None
    mod_frac: float | None = None
    mor_depth: float | None = None
    mod_acc: float | None = None
    mor_acc: float | None = None
    moe_div: float | None = None
    moe_ent: float | None = None
    eval_loss: float | None = None
    eval_by_domain: dict[str, float] | None = None
    eval_train_loss: float | None = None  # the train loss HYDRA logs beside an eval
    switch_on: dict | None = None
    tokens: int | None = None
    time: float | None = None


@dataclass
class Phase:
    name: str
    until_step: int | None  # inclusive top logged step; None = open-ended (last phase)
    routing: str | None = None
    features: list[str] = field(default_factory=list)
    seed_locked: bool | None = None
    mixture: dict[str, float] | None = None
    lr_scale: float | None = None
    start_step: int = 1  # filled by `link_phases`


@dataclass
class Unparsed:
    file: str
    line: int
    text: str
    reason: str


@dataclass
class ParseStats:
    files: list[dict] = field(default_factory=list)  # {path, lines, parsed, unparsed, blank}
    lines_read: int = 0
    lines_parsed: int = 0
    lines_blank: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    relogged: int = 0  # step lines superseded by a later (resumed) run
    resumes: list[dict] = field(default_factory=list)
    unparsed: list[Unparsed] = field(default_factory=list)

    def bad(self, file: str, line: int, text: str, reason: str) -> None:
        self.unparsed.append(Unparsed(file, line, text.rstrip("\n")[:300], reason))

    def new_file(self, path: str) -> dict:
        info = {"path": path, "lines": 0, "parsed": 0, "unparsed": 0, "blank": 0}
        self.files.append(info)
        return info

    def count(self, info: dict, line: str) -> bool:
        """Count a line read from `info`'s file; False for a blank one (nothing to parse)."""
        info["lines"] += 1
        self.lines_read += 1
        if not line.strip():
            info["blank"] += 1
            self.lines_blank += 1
            return False
        return True


@dataclass
class Source:
    """Everything the statistics need, whatever the input was."""

    kind: str  # "hydra-ray run" | "HYDRA logs"
    label: str
    paths: list[str]
    records: list[Record]
    phases: list[Phase]
    parse: ParseStats
    events: list[dict] = field(default_factory=list)  # {step, event, detail}
    checkpoints: list[dict] = field(default_factory=list)  # {step, path}
    grad_clip: float | None = None
    num_experts: int | None = None
    domains: list[str] | None = None
    domain_expert_map: dict[str, int] | None = None
    data_mixture: dict[str, float] | None = None
    max_steps: int | None = None
    tokens_per_step: int | None = None

    def samples(self) -> list[Record]:
        return [r for r in self.records if r.is_sample]


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------- phases
# The reference 500M HYDRA run (1-20K foundation ... 70K+ generalisation). Seeds were locked
# until generalisation; the mixtures are not known from the logs, so they stay "default".
REFERENCE_PHASES = [
    Phase("foundation", 20_000, None, [], True),
    Phase("mor", 30_000, None, ["mor"], True),
    Phase("mod", 52_000, None, ["mor", "mod"], True),
    Phase("moe", 57_000, "learned", ["mor", "mod", "moe"], True),
    Phase("forced_routing", 60_000, "forced", ["mor", "mod", "moe"], True),
    Phase("free_routing", 70_000, "free", ["mor", "mod", "moe"], True),
    Phase("generalisation", None, "free", ["mor", "mod", "moe"], False),
]


def reference_phases() -> list[Phase]:
    return link_phases([Phase(p.name, p.until_step, p.routing, list(p.features), p.seed_locked)
                        for p in REFERENCE_PHASES])


def link_phases(phases: list[Phase]) -> list[Phase]:
    prev = 0
    for p in phases:
        p.start_step = prev + 1
        prev = p.until_step if p.until_step is not None else prev
    return phases


def phase_of(phases: list[Phase], step: int) -> Phase | None:
    for p in phases:
        if p.until_step is None or step <= p.until_step:
            return p
    return phases[-1] if phases else None


def phases_from_config(cfg) -> list[Phase]:
    """hydra-ray curriculum -> phases (until_step is exclusive on step indices, i.e. inclusive
    on logged steps: the same number)."""
    out = []
    for p in cfg.curriculum.phases:
        feats = [f for f in FEATURES if getattr(p, f)]
        out.append(Phase(p.name, p.until_step, p.routing if p.moe else None, feats, p.seed is not None,
                         dict(p.mixture) if p.mixture else None, p.lr_scale))
    return link_phases(out)


class _PhaseEntry(BaseModel):
    """One phase of a phase file: the keys of a curriculum phase, plus `features` / `seed_locked`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    until_step: int | None = Field(None, ge=1, strict=True)  # strict: `true` is not step 1
    routing: RoutingMode | None = None
    features: list[Literal["mor", "mod", "moe"]] | None = None
    mor: bool = False
    mod: bool = False
    moe: bool = False
    seed: int | None = None
    seed_locked: bool | None = None
    mixture: dict[str, float] | None = None
    lr_scale: float | None = Field(None, gt=0)
    seq_len: int | None = None  # accepted (a curriculum phase has it), not used

    @field_validator("routing", mode="before")
    @classmethod
    def _off(cls, v):
        return None if v in ("none", "off", "") else v

    def phase(self) -> Phase:
        feats = self.features
        if feats is None:
            feats = [f for f in FEATURES if getattr(self, f)]
            if self.routing is not None and "moe" not in self.model_fields_set:
                feats = sorted(set(feats) | {"moe"}, key=FEATURES.index)
        seed_locked = self.seed_locked
        if seed_locked is None and "seed" in self.model_fields_set:
            seed_locked = self.seed is not None
        return Phase(self.name, self.until_step, self.routing, list(feats), seed_locked, self.mixture, self.lr_scale)


class _PhaseError(ValueError):
    """A rule across phases broken by phase `index` (so the message can name that phase)."""

    def __init__(self, index: int, msg: str):
        super().__init__(msg)
        self.index = index


class _PhaseFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    phases: list[_PhaseEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _order(self) -> "_PhaseFile":
        prev = None
        for i, p in enumerate(self.phases):
            if p.until_step is None and i < len(self.phases) - 1:
                raise _PhaseError(i, "until_step is required (only the last phase may omit it)")
            if prev is not None and p.until_step is not None and p.until_step <= prev:
                raise _PhaseError(i, f"until_step {p.until_step} is not after the previous phase's {prev}")
            prev = p.until_step
        if len({p.name for p in self.phases}) != len(self.phases):
            raise ValueError("phase names must be unique")
        return self


def _phase_errors(err: ValidationError, items: list) -> str:
    """One line: each problem after the phase it is in (index and name) and the key it is about."""
    def where(i: int) -> str:
        name = items[i].get("name") if isinstance(items[i], dict) else None
        return f"phase {i}" + (f" ({name!r})" if isinstance(name, str) and name else "")

    out = []
    for e in err.errors():
        loc, msg = list(e["loc"]), e["msg"].removeprefix("Value error, ")
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, _PhaseError):
            loc = ["phases", cause.index]
        head = [where(loc[1])] if len(loc) > 1 and isinstance(loc[1], int) else []
        key = ".".join(map(str, loc[2:]))
        if e["type"] == "model_type":
            msg = "expected a mapping with name and until_step"
        elif key and e["type"] == "extra_forbidden":
            msg = f"unknown key {key!r}" + did_you_mean(key, list(_PhaseEntry.model_fields))
        elif key:
            shown = e.get("input")
            msg = f"{key}{'' if e['type'] == 'missing' or isinstance(shown, (dict, list)) else f' {shown!r}'}: {msg}"
        out.append(": ".join(head + [msg]))
    return " ".join("; ".join(out).split())


def load_phase_file(path: str) -> list[Phase]:
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"--phases {path}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--phases {path}: not valid YAML ({' '.join(str(e).split())[:120]})") from None
    if isinstance(data, dict) and "curriculum" in data:
        from hydra_ray.config import load_config

        return phases_from_config(load_config(p))
    if isinstance(data, dict) and "phases" in data:
        data = data["phases"]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"--phases {path}: expected a non-empty YAML list of phases "
                          "({name, until_step, routing})")
    try:
        parsed = _PhaseFile.model_validate({"phases": data})
    except ValidationError as err:
        raise ConfigError(f"--phases {path}: {_phase_errors(err, data)}") from None
    return link_phases([e.phase() for e in parsed.phases])
