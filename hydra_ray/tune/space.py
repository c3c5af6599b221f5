"""The space file of a sweep: what it may say, and the checks it passes before Ray starts.

Design choices
- YAML: one entry per swept field, keyed by its dotted config path, whose value is one
  distribution: `{choice: [..]}`, `{grid: [..]}`, `{uniform: [low, high]}` or
  `{loguniform: [low, high]}` (configs/sweeps/routing.yaml). `1e-4` reads as a float (YAML 1.1
  would read a string) and a key listed twice is refused (plain YAML keeps the last silently).
- An entry is a pydantic model (`Entry`: key, kind, values), frozen and forbidding unknown
  fields like the config's models; `parse_entry` turns its validators' messages into one
  `ConfigError` line naming the file and the entry. Ranges are kept as floats.
- Everything is checked before Ray starts (`validate_space`): that the key is a real config field
  (`config.set_dotted`, with the closest real field on a typo) and not a section, that an integer
  field gets choice or grid, and that the config stays valid with every choice/grid value and
  with each range's ends and an inner point (applied through `parse_config`, so pydantic names
  the problem), alone and all together.
- Keys that would change the prepared data (data.*, domains, vocab, sequence lengths, mixtures)
  are refused: every trial shares one `prepare_data` result, passed to the trials with
  `tune.with_parameters`.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator

from hydra_ray.config import ConfigError, HydraConfig, did_you_mean, parse_config, set_dotted

Kind = Literal["choice", "grid", "uniform", "loguniform"]
DISTRIBUTIONS: tuple[str, ...] = get_args(Kind)
KEY_ERROR = "keys are dotted config paths such as model.moe.aux_weight"
FORMS = "{choice: [a, b]}, {grid: [a, b]}, {uniform: [low, high]} or {loguniform: [low, high]}"


def _dotted_key(key: Any) -> str:
    if not isinstance(key, str) or not key.strip():
        raise ValueError(KEY_ERROR)
    return key


class Entry(BaseModel):
    """One swept field. Built from a space file's item with `Entry.model_validate({"key": KEY,
    "spec": {KIND: VALUES}})` (what `parse_entry` does), or from its fields directly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str  # dotted config path, e.g. model.moe.aux_weight
    kind: Kind
    values: tuple[Any, ...]  # choice/grid: the values; uniform/loguniform: (low, high) as floats

    @model_validator(mode="before")
    @classmethod
    def _one_distribution(cls, data: Any) -> Any:
        """The space file's form, {key, spec: {kind: values}}, into the fields."""
        if not isinstance(data, dict) or "spec" not in data:
            return data
        _dotted_key(data.get("key"))  # a bad key is the first thing to say
        spec = data["spec"]
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ValueError(f"expected one distribution, {FORMS}; got {spec!r}")
        (kind, values), = spec.items()
        if kind not in DISTRIBUTIONS:
            hint = did_you_mean(kind, DISTRIBUTIONS, cutoff=0.75)
            raise ValueError(f"unknown distribution {kind!r}{hint}; use {', '.join(DISTRIBUTIONS)}")
        return {"key": data.get("key"), "kind": kind, "values": values}

    @field_validator("key", mode="before")
    @classmethod
    def _dotted(cls, key: Any) -> str:
        return _dotted_key(key)

    @field_validator("values", mode="before")
    @classmethod
    def _fit_kind(cls, values: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("kind")
        if kind in ("choice", "grid"):
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"{kind} needs a non-empty list of values, got {values!r}")
            return tuple(values)
        if kind not in ("uniform", "loguniform"):
            return values  # the kind itself is wrong: pydantic says so
        if not isinstance(values, (list, tuple)) or len(values) != 2:
            raise ValueError(f"{kind} needs [low, high], got {values!r}")
        shown = f"[{values[0]}, {values[1]}]"
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
            raise ValueError(f"{kind} needs two finite numbers [low, high], got {values!r}")
        lo, hi = float(values[0]), float(values[1])
        if not lo < hi:
            raise ValueError(f"{kind} needs low < high, got {shown}")
        if kind == "loguniform" and lo <= 0:
            raise ValueError(f"loguniform needs 0 < low, got {shown}")
        return lo, hi

    def probes(self) -> list:
        """Values the config must accept: every choice, or a range's ends and an inner point."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        lo, hi = self.values
        f = 0.382  # not the exact middle, which can be a whole number
        inner = lo * (hi / lo) ** f if self.kind == "loguniform" else lo + (hi - lo) * f
        return [lo, inner, hi]

    def tune_domain(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        return tune.loguniform(*self.values)

    def spec(self) -> dict:
        return {self.kind: list(self.values)}


def parse_entry(key: Any, spec: Any, source: str) -> Entry:
    """One item of the space file `source` as an Entry, or a one-line ConfigError naming it."""
    try:
        return Entry.model_validate({"key": key, "spec": spec})
    except ValidationError as err:
        msgs = [e["msg"].removeprefix("Value error, ") for e in err.errors()]
        where = f"entry {key!r}" if KEY_ERROR in msgs else key
        msg = KEY_ERROR if KEY_ERROR in msgs else "; ".join(msgs)
        raise ConfigError(f"{source}: {where}: {msg}") from None


# --------------------------------------------------------------------------- reading the file
class _SpaceLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; a space file is full of such numbers, so read them as floats."""


def _unique_keys(loader: yaml.SafeLoader, node: yaml.MappingNode):
    """Plain YAML keeps the last of two equal keys silently; in a space file that hides a mistake."""
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, str) and key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"{key} is listed twice", key_node.start_mark)
        seen.add(key if isinstance(key, str) else id(key_node))
    return loader.construct_mapping(node)


_SpaceLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys)
_SpaceLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_SpaceLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_space(path: str) -> list[Entry]:
    """Read and check the form of a space file (not yet against a config)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read space file ({e.strerror or e})") from None
    try:
        data = yaml.load(text, Loader=_SpaceLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{p}: not valid YAML{where}: {what}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of dotted config keys to distributions, "
                          f"got {type(data).__name__}")
    if not data:
        raise ConfigError(f"{p}: the space has no entries")
    return [parse_entry(k, v, str(p)) for k, v in data.items()]


# --------------------------------------------------------------------------- against a config
def apply_values(base: dict, values: dict[str, Any], source: str = "space") -> dict:
    """A deep copy of the config mapping `base` with the dotted keys of `values` set."""
    data = copy.deepcopy(base)
    for key, value in values.items():
        set_dotted(data, key, value, source=source)
    return data


def _data_signature(cfg: HydraConfig) -> tuple:
    """What `prepare_data` depends on: trials must agree on it to share one prepared dataset."""
    from hydra_ray.data.pipeline import required_domains  # numpy + config only

    seq_lens = sorted({p.seq_len or cfg.model.seq_len for p in cfg.curriculum.phases})
    return (json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True), tuple(cfg.model.domains),
            cfg.model.vocab_size, tuple(seq_lens), tuple(required_domains(cfg)))


def validate_space(entries: list[Entry], base: dict, source: str) -> None:
    """Every entry must name a config field, and the config must stay valid (and keep the same
    prepared data) with each probe value alone and with all entries at once."""
    seen = set()
    probe = copy.deepcopy(base)
    for e in entries:
        if e.key in seen:
            raise ConfigError(f"{source}: {e.key}: listed twice")
        seen.add(e.key)
        current = set_dotted(probe, e.key, None, source=source)  # the field's value in `base`
        if e.kind in ("uniform", "loguniform") and isinstance(current, int) and not isinstance(current, bool):
            raise ConfigError(f"{source}: {e.key}: an integer field takes choice or grid, not {e.kind}")
    signature = _data_signature(parse_config(base, source))
    for e in entries:
        for v in e.probes():
            cfg = parse_config(apply_values(base, {e.key: v}, source), f"{source}: {e.key} = {v!r} gives")
            if _data_signature(cfg) != signature:
                raise ConfigError(f"{source}: {e.key}: changes the prepared data (corpus, domains, mixture, "
                                  "tokenizer or sequence length), which all trials of a sweep share")
    for pick in (0, -1):  # the first probes together, then the last ones: cross-field rules
        combo = {e.key: e.probes()[pick] for e in entries}
        shown = ", ".join(f"{k}={v!r}" for k, v in combo.items())
        parse_config(apply_values(base, combo, source), f"{source}: the combination {shown} gives")
