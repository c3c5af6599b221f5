"""Configuration: pydantic models for every part, YAML loading, presets. No logic beyond validation.

Design choices
- One small model per part (model, MoE, MoD, MoR, curriculum, train, data), nested in `HydraConfig`.
  Every model forbids unknown keys, so a typo in a YAML file is an error, not a silent default.
- Cross-field rules live in field validators where they can (so the error names the field, e.g.
  `model.n_heads`), and in a model validator only when they span sections.
- `load_config` turns every validation failure into one `ConfigError` whose message is a single line
  naming the file and each offending field; the CLI prints it and exits non-zero, no traceback.
- Presets are the YAML files under configs/; `preset(name)` resolves a bare name to one of them.
- One place per rule: what several commands check against a config (a dotted key set by a sweep
  or an override, `set_dotted`; N or MIN-MAX, `parse_min_max`; the batch split over workers,
  `check_batch_split`) is written here once and called by each.

Over 400 lines: the whole schema (every field, its limits and cross-field rules) and the loader
that turns its failures into one line are kept in one file, so the contract reads in one place.
"""

from __future__ import annotations

import copy
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_DOMAINS = ["math", "code", "chat", "finefineweb"]
RoutingMode = Literal["learned", "forced", "teacher", "free"]
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration is invalid; the message is one line that names the offending field(s)."""


class FieldError(ValueError):
    """Raised by a model validator about one field (dotted path relative to that model), so the
    reported location is the field itself, not the section that holds it."""

    def __init__(self, path: str, msg: str):
        super().__init__(msg)
        self.path = path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MoEConfig(_Strict):
    """Mixture-of-Experts FFN. Experts are upcycled from the block's dense FFN when MoE switches on."""

    num_experts: int = Field(4, ge=1)
    top_k: int = Field(1, ge=1, le=4)
    blocks: list[int] | Literal["all"] = "all"  # shared blocks whose FFN becomes an MoE layer
    expert_hidden: int | None = Field(None, ge=1)  # None: the model's ffn_hidden (upcycling needs equal)
    aux_weight: float = Field(0.01, ge=0)  # Switch load-balance loss weight
    z_loss: float = Field(1e-3, ge=0)  # router z-loss weight
    jitter: float = Field(0.0, ge=0, lt=1)  # multiplicative router-input noise in training
    capacity_factor: float = Field(math.inf, gt=0)  # inf = dropless
    bias_balancing: bool = False  # aux-loss-free balancing (DeepSeek-V3): per-expert selection bias
    bias_rate: float = Field(1e-3, ge=0)
    shared_expert: bool = False
    domain_expert_map: dict[str, int] | None = None  # None: the i-th domain -> expert i mod E
    teacher_weight: float = Field(0.1, ge=0)
    router_lr_scale: float = Field(1.0, gt=0)
    expert_lr_scale: float = Field(1.0, gt=0)
    upcycle_noise: float = Field(0.01, ge=0)  # relative std of the noise added to expert copies
    router_init_std: float = Field(1e-3, ge=0)  # near-uniform router at switch-on

    @model_validator(mode="after")
    def _cross(self) -> "MoEConfig":
        e = self.num_experts
        if self.top_k > e:
            raise FieldError("top_k", f"top_k ({self.top_k}) must not exceed num_experts ({e})")
        for dom, ex in (self.domain_expert_map or {}).items():
            if not 0 <= ex < e:
                raise FieldError("domain_expert_map", f"domain {dom!r} maps to expert {ex}, outside 0..{e - 1}")
        return self


class MoDConfig(_Strict):
    """Mixture-of-Depths: in MoD blocks only the top `capacity` fraction of each sequence is processed."""

    capacity: float = Field(0.5, gt=0, le=1)
    blocks: list[int] | Literal["alternate", "all"] = "alternate"  # alternate = odd-indexed blocks
    capacity_warmup_steps: int = Field(100, ge=0)  # anneal capacity 1.0 -> capacity after switch-on
    predictor_hidden: int = Field(64, ge=1)
    predictor_weight: float = Field(1.0, ge=0)  # BCE of the causal predictor (input is detached)
    router_aux_weight: float = Field(0.0, ge=0)
    # BCE of the router's own scores against its top-k (the MoD paper's auxiliary loss): scores
    # separate around 0, so the causal predictor can learn the choice; 0 = off


class MoRConfig(_Strict):
    """Mixture-of-Recursions: every shared block is applied up to `recursions` times per token."""

    recursions: int = Field(1, ge=1, le=16)
    router: Literal["expert_choice"] = "expert_choice"
    capacity_schedule: list[float] | None = None  # per recursion; None = linear (R - r) / R
    gate_init_bias: float = -4.0  # sigmoid(-4) ~ 0.018: extra recursions start near identity
    predictor_hidden: int = Field(64, ge=1)
    predictor_weight: float = Field(1.0, ge=0)
    router_aux_weight: float = Field(0.0, ge=0)  # as MoD's: the routers' own BCE against their top-k

    @model_validator(mode="after")
    def _schedule(self) -> "MoRConfig":
        v, r = self.capacity_schedule, self.recursions
        if v is None:
            return self
        problem = None
        if len(v) != r:
            problem = f"needs one capacity per recursion ({r}), got {len(v)}"
        elif any(not 0 < c <= 1 for c in v):
            problem = "capacities must lie in (0, 1]"
        elif v[0] != 1.0:
            problem = "the first recursion processes every token: capacity_schedule[0] must be 1.0"
        elif any(b > a for a, b in zip(v, v[1:])):
            problem = "capacities must not increase from one recursion to the next"
        if problem:
            raise FieldError("capacity_schedule", problem)
        return self

    def schedule(self) -> list[float]:
        if self.capacity_schedule is not None:
            return list(self.capacity_schedule)
        r = self.recursions
        return [(r - i) / r for i in range(r)]


class ModelConfig(_Strict):
    """HydraLM shape. `ffn_hidden=None` derives the SwiGLU width from d_model (8/3 d, multiple of 32)."""

    vocab_size: int = Field(264, ge=2)
    d_model: int = Field(128, ge=8)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int = Field(2, ge=1)
    n_blocks: int = Field(2, ge=1)
    ffn_hidden: int | None = Field(None, ge=1)
    seq_len: int = Field(128, ge=2)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)
    domains: list[str] = Field(default_factory=lambda: list(DEFAULT_DOMAINS), min_length=1)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    mod: MoDConfig = Field(default_factory=MoDConfig)
    mor: MoRConfig = Field(default_factory=MoRConfig)

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("domain names must be unique")
        return v

    @model_validator(mode="after")
    def _cross(self) -> "ModelConfig":
        d, h, g = self.d_model, self.n_heads, self.n_kv_heads
        if d % h:
            raise FieldError("n_heads", f"n_heads ({h}) must divide d_model ({d})")
        if (d // h) % 2:
            raise FieldError("n_heads", f"head size d_model/n_heads ({d // h}) must be even for RoPE")
        if h % g:
            raise FieldError("n_kv_heads", f"n_kv_heads ({g}) must divide n_heads ({h})")
        for name, blocks in (("moe.blocks", self.moe.blocks), ("mod.blocks", self.mod.blocks)):
            if isinstance(blocks, list):
                bad = [b for b in blocks if not 0 <= b < self.n_blocks]
                if bad:
                    raise FieldError(name, f"block(s) {bad} do not exist (n_blocks={self.n_blocks})")
                if len(set(blocks)) != len(blocks):
                    raise FieldError(name, "repeated block index")
        unknown = sorted(set(self.moe.domain_expert_map or {}) - set(self.domains))
        if unknown:
            raise FieldError("moe.domain_expert_map", f"unknown domain(s) {unknown}; domains are {self.domains}")
        if self.moe.expert_hidden is not None and self.moe.expert_hidden != self.ffn_width:
            raise FieldError(
                "moe.expert_hidden",
                f"{self.moe.expert_hidden} must equal the dense FFN width ({self.ffn_width}): "
                "experts are upcycled from the dense FFN",
            )
        return self

    def domain_expert_map(self) -> dict[str, int]:
        """The explicit map, or by default the i-th domain -> expert i mod num_experts."""
        if self.moe.domain_expert_map is not None:
            return dict(self.moe.domain_expert_map)
        return {dom: i % self.moe.num_experts for i, dom in enumerate(self.domains)}

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_width(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 32 * math.ceil(8 * self.d_model / 3 / 32)

    def moe_blocks(self) -> list[int]:
        b = self.moe.blocks
        return list(range(self.n_blocks)) if b == "all" else sorted(b)

    def mod_blocks(self) -> list[int]:
        b = self.mod.blocks
        if b == "all":
            return list(range(self.n_blocks))
        if b == "alternate":
            return [i for i in range(self.n_blocks) if i % 2 == 1] or [0]
        return sorted(b)


class PhaseConfig(_Strict):
    """One curriculum phase: it runs until `until_step` (exclusive) with these features on."""

    name: str = Field(min_length=1)
    until_step: int = Field(ge=1)
    mor: bool = False
    mod: bool = False
    moe: bool = False
    routing: RoutingMode = "learned"
    mixture: dict[str, float] | None = None  # domain -> weight; None = the data section's default
    seq_len: int | None = Field(None, ge=2)
    seed: int | None = None  # an int locks the seed; None unlocks it (drawn at phase start, checkpointed)
    lr_scale: float = Field(1.0, gt=0)
    # with model.moe.bias_balancing on: false turns balancing off for this phase (the experts'
    # selection bias is cleared and held at zero, e.g. for free routing on a non-uniform mixture
    # after balancing under a uniform one); None / true balance
    bias_balancing: bool | None = None

    @field_validator("mixture")
    @classmethod
    def _mixture(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if any(w < 0 for w in v.values()):
            raise ValueError("mixture weights must be non-negative")
        if not sum(v.values()) > 0:
            raise ValueError("mixture weights must not all be zero")
        return v

    @model_validator(mode="after")
    def _routing_needs_moe(self) -> "PhaseConfig":
        if self.routing != "learned" and not self.moe:
            raise ValueError(f"routing: {self.routing!r} needs moe: true in phase {self.name!r}")
        return self


class CurriculumConfig(_Strict):
    phases: list[PhaseConfig] = Field(
        default_factory=lambda: [PhaseConfig(name="all", until_step=1000, mor=True, mod=True, moe=True)],
        min_length=1,
    )

    @field_validator("phases")
    @classmethod
    def _ordered(cls, v: list[PhaseConfig]) -> list[PhaseConfig]:
        for i in range(1, len(v)):
            if v[i].until_step <= v[i - 1].until_step:
                raise ValueError(
                    f"phases out of order: phase {i} ({v[i].name!r}) ends at step {v[i].until_step}, "
                    f"not after phase {i - 1} ({v[i - 1].name!r}, step {v[i - 1].until_step})"
                )
        names = [p.name for p in v]
        if len(set(names)) != len(names):
            raise ValueError("phase names must be unique")
        return v

    @property
    def total_steps(self) -> int:
        return self.phases[-1].until_step

    def phase_at(self, step: int) -> PhaseConfig:
        for p in self.phases:
            if step < p.until_step:
                return p
        return self.phases[-1]


class TrainConfig(_Strict):
    batch_size: int = Field(8, ge=1)  # global batch: sequences per optimizer step over all workers
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.95], min_length=2, max_length=2)
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    grad_clip: float = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1)
    save_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    eval_batches: int = Field(4, ge=1)  # held-out batches per domain at each eval
    eval_batch_size: int = Field(8, ge=1)
    max_nan_skips: int = Field(3, ge=1)  # this many NaN/Inf steps in a row roll back to the last checkpoint
    max_failures: int = Field(3, ge=0)  # worker-group restarts Ray Train may attempt
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16 autocast is for GPUs
    expert_placement: Literal["sharded", "replicated"] = "sharded"
    # with several workers: each holds its slice of the experts and tokens travel by all-to-all
    # (expert parallel), or every worker holds all experts and DDP averages their gradients
    run_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=200)
    # default run name (--name wins; else the config file's stem): a tuned best.yaml names its sweep
    inject_nan_steps: list[int] = Field(default_factory=list)
    # fault drill: the loss of these steps (0-based) is made NaN, to rehearse skipping and roll-back


class ChatTemplate(_Strict):
    """How a conversation is written as text: the chat domain's training text and what
    /v1/chat/completions renders (hydra_ray/data/chat.py), stored in every checkpoint's config."""

    system: str = "System: "
    user: str = "User: "
    assistant: str = "Assistant: "
    separator: str = "\n"  # after every message
    domain: str | None = "chat"  # the domain a rendered conversation is routed as (when the model has it)


class DataConfig(_Strict):
    corpus: str | None = None  # folder / URI with one sub-folder per domain; None = built-in corpus
    builtin_size: Literal["tiny", "small", "full"] = "tiny"  # the built-in corpus, when corpus is None
    builtin_seed: int = 0
    cache_dir: str = "~/.cache/hydra-ray"  # where the built-in corpus is generated once
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
    tokenizer_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # set by training: the file it used
    mixture: dict[str, float] = Field(default_factory=lambda: {d: 1.0 for d in DEFAULT_DOMAINS})
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    packed: str | None = None  # a pack written by `hydra-ray data pack` (folder or URI); None = packed on use, cached
    text_field: str = Field("text", min_length=1)  # the records' text field (JSONL key or Parquet column)
    chat_template: ChatTemplate = Field(default_factory=ChatTemplate)


class HydraConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)

    @model_validator(mode="after")
    def _cross(self) -> "HydraConfig":
        domains = set(self.model.domains)
        for where, mix in [("data.mixture", self.data.mixture)] + [
            (f"curriculum.phases.{i}.mixture", p.mixture) for i, p in enumerate(self.curriculum.phases)
        ]:
            unknown = sorted(set(mix or {}) - domains)
            if unknown:
                raise ValueError(f"{where}: unknown domain(s) {unknown}; domains are {sorted(domains)}")
        for i, p in enumerate(self.curriculum.phases):
            if p.seq_len is not None and p.seq_len > self.model.seq_len:
                raise ValueError(
                    f"curriculum.phases.{i}.seq_len: {p.seq_len} exceeds model.seq_len ({self.model.seq_len})"
                )
            if p.bias_balancing is not None and not self.model.moe.bias_balancing:
                raise ValueError(f"curriculum.phases.{i}.bias_balancing: needs model.moe.bias_balancing: true "
                                 "(the phase only turns its updates on or off)")
        return self


def parse_min_max(text: str, flag: str, low: int = 1) -> tuple[int, int]:
    """`N` or `MIN-MAX` (--workers, --autoscale) as (MIN, MAX), with low <= MIN <= MAX."""
    try:
        first, sep, second = str(text).partition("-")
        lo = int(first)
        hi = int(second) if sep else lo
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected N or MIN-MAX (e.g. 2 or 1-4)") from None
    if lo < low or hi < lo:
        raise ConfigError(f"{flag} {text!r}: need {low} <= MIN <= MAX")
    return lo, hi


def check_batch_split(cfg: "HydraConfig", workers: range | list[int], flag: str = "--workers") -> None:
    """The global batch must split evenly over every worker count a run may have, times
    grad_accum (each worker takes an equal slice). ConfigError naming the first count that fails."""
    G, accum = cfg.train.batch_size, cfg.train.grad_accum
    for w in workers:
        if G % (w * accum):
            raise ConfigError(f"train.batch_size {G} does not split over {w} workers x grad_accum {accum} ({flag}); "
                              "pick a batch size divisible by every worker count")


def did_you_mean(word: str, choices, cutoff: float = 0.6) -> str:
    """' (did you mean X?)' for the closest of `choices`, or '' when none is close."""
    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=cutoff)
    return f" (did you mean {near[0]}?)" if near else ""


def _section_model(annotation) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `ModelConfig` or `list[PhaseConfig]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the section at `loc` (('model', 'moe') -> MoEConfig's fields); list indexes
    step into the item model."""
    model: type[BaseModel] | None = HydraConfig
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        model = _section_model(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _format(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc.append(cause.path)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and e["loc"]:  # a typo of a field name, most likely
            msg += did_you_mean(e["loc"][-1], _fields_at(tuple(e["loc"][:-1])))
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return " ".join("; ".join(parts).split())  # always one line


def parse_config(data: Any, source: str = "config") -> HydraConfig:
    """Validate a mapping (e.g. parsed YAML) into a HydraConfig, or raise a one-line ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return HydraConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_format(err)}") from None


def preset(name: str) -> Path:
    """A bare preset name ('tiny') resolves to configs/tiny.yaml; anything else is a path."""
    p = Path(name)
    if not p.exists() and not p.suffix and (CONFIG_DIR / f"{name}.yaml").exists():
        return CONFIG_DIR / f"{name}.yaml"
    return p


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> HydraConfig:
    """Load and validate a YAML config (a preset name, a local path or a URI such as
    s3://bucket/sweep/best.yaml). `overrides` maps dotted keys ('train.lr') to values."""
    from hydra_ray import storage  # here, not at the top: storage imports this module

    if storage.is_uri(str(path)):
        p = str(path)
        try:
            text = storage.read_text(p)  # a StorageError is already one line naming the location
        except FileNotFoundError:
            raise ConfigError(f"{p}: cannot read config (no such file)") from None
    else:
        p = preset(str(path))
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"{p}: cannot read config ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{p}: not valid YAML{where}: {what}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    if not data:  # an empty file would silently train every default: almost surely a mistake
        raise ConfigError(f"{p}: the config is empty (expected sections model, curriculum, train, data)")
    if overrides:
        data = copy.deepcopy(data)
        for key, value in overrides.items():
            set_dotted(data, key, value, create=True, source=f"{p}: override")
    return parse_config(data, str(p))


def _field_paths(node: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append(f"{prefix}{k}")
            out += _field_paths(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _field_paths(v, f"{prefix}{i}.")
    return out


def set_dotted(data: dict, key: str, value: Any, *, create: bool = False, source: str = "config") -> Any:
    """Set the dotted `key` ('train.lr', 'curriculum.phases.2.until_step': integer parts index
    lists) of the config mapping `data`, in place; returns the value it replaced. The two uses:
    - create=False (sweep spaces): every part must already be there and the key must be a field,
      not a section; a typo is a ConfigError with the closest real field;
    - create=True (load_config overrides, on its own deep copy): missing sections are created.
    """
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if isinstance(node, dict) and (part in node or (create and last)):
            container, idx = node, part
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            container, idx = node, int(part)
        elif create and isinstance(node, dict):
            node[part] = {}
            container, idx = node, part
        elif create:
            raise ConfigError(f"{source} {key}: {'.'.join(parts[:i])} is not a section")
        else:
            hint = did_you_mean(key, _field_paths(data))
            what = "not a config field" if here == key else f"{here} is not a config field"
            raise ConfigError(f"{source}: {key}: {what}{hint}")
        if last:
            break
        child = container[idx]
        if child is None and create:
            child = container[idx] = {}
        elif create and not isinstance(child, (dict, list)):
            raise ConfigError(f"{source} {key}: {here} is not a section")
        node = child
    old = container.get(idx) if isinstance(container, dict) else container[idx]
    if not create and isinstance(old, dict):
        raise ConfigError(f"{source}: {key}: is a config section, not a field")
    container[idx] = value
    return old


def dump_config(cfg: HydraConfig) -> str:
    """YAML text that `load_config` reads back to an equal config."""
    return yaml.safe_dump(cfg.model_dump(mode="python"), sort_keys=False)
