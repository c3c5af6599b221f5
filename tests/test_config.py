"""hydra_ray.config: presets, validation (one-line errors that name the field), dump/load round trip.

Over 400 lines: one file per module under test; the cases are many small parametrised ones."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from hydra_ray.config import (
    CONFIG_DIR,
    ConfigError,
    HydraConfig,
    ModelConfig,
    MoRConfig,
    dump_config,
    load_config,
    preset,
)

PRESETS = ["tiny", "small", "hydra-500m"]
PHASE_NAMES = ["foundation", "mor", "mod", "moe", "forced", "teacher", "general"]
PHASE_ROUTING = ["learned", "learned", "learned", "learned", "forced", "teacher", "free"]


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def assert_one_line_error(err: ConfigError, path: Path | str | None = None) -> str:
    msg = str(err)
    assert msg.strip(), "empty ConfigError message"
    assert "\n" not in msg, f"ConfigError message spans several lines: {msg!r}"
    assert "Traceback" not in msg
    assert "pydantic" not in msg.lower()
    if path is not None:
        assert str(path) in msg, f"message does not name the file {path}: {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------
# presets


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads(name):
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert isinstance(cfg, HydraConfig)
    assert cfg.curriculum.total_steps == cfg.curriculum.phases[-1].until_step


def test_presets_dir_holds_the_known_presets():
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} >= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_names_resolve(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # resolution must not depend on the working directory
    assert preset(name) == CONFIG_DIR / f"{name}.yaml"
    assert load_config(name) == load_config(CONFIG_DIR / f"{name}.yaml")


def test_preset_leaves_real_paths_alone(tmp_path):
    p = write(tmp_path, "train: {lr: 0.01}\n")
    assert preset(str(p)) == p
    assert load_config(p).train.lr == 0.01


@pytest.mark.parametrize("name", ["tiny", "hydra-500m"])
def test_seven_phase_curriculum(name):
    phases = load_config(name).curriculum.phases
    assert [p.name for p in phases] == PHASE_NAMES
    assert [p.routing for p in phases] == PHASE_ROUTING
    # features switch on in curriculum order and stay on
    assert [p.mor for p in phases] == [False] + [True] * 6
    assert [p.mod for p in phases] == [False, False] + [True] * 5
    assert [p.moe for p in phases] == [False] * 3 + [True] * 4


def test_hydra_500m_boundaries_and_seeds():
    cfg = load_config("hydra-500m")
    phases = cfg.curriculum.phases
    assert [p.until_step for p in phases] == [20000, 30000, 52000, 57000, 60000, 70000, 90000]
    assert cfg.curriculum.total_steps == 90000
    assert phases[0].seed == 42
    assert phases[-1].seed is None
    assert cfg.curriculum.phase_at(0).name == "foundation"
    assert cfg.curriculum.phase_at(19999).name == "foundation"
    assert cfg.curriculum.phase_at(20000).name == "mor"
    assert cfg.curriculum.phase_at(89999).name == "general"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_config_file_is_an_error_not_the_defaults(tmp_path, text):
    with pytest.raises(ConfigError, match="the config is empty"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("text,hint", [
    ("train:\n  lrr: 0.1\n", "train.lrr: Extra inputs are not permitted (did you mean lr?)"),
    ("modl:\n  d_model: 64\n", "modl: Extra inputs are not permitted (did you mean model?)"),
    ("model:\n  moe:\n    num_expert: 2\n", "(did you mean num_experts?)"),
    ("curriculum:\n  phases:\n    - {name: a, until_step: 5, mooe: true}\n", "(did you mean moe?)"),
])
def test_config_typos_get_did_you_mean(tmp_path, text, hint):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert hint in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# rejections: each message is one line, names the file and the offending field

REJECT = {
    # unknown keys anywhere
    "unknown-top": ("bogus: 1\n", ["bogus"]),
    "unknown-model": ("model: {bogus: 1}\n", ["model.bogus"]),
    "unknown-moe": ("model: {moe: {bogus: 1}}\n", ["model.moe.bogus"]),
    "unknown-mod": ("model: {mod: {bogus: 1}}\n", ["model.mod.bogus"]),
    "unknown-train": ("train: {lr_typo: 1}\n", ["train.lr_typo"]),
    "unknown-phase": (
        "curriculum: {phases: [{name: a, until_step: 10, bogus: 1}]}\n",
        ["curriculum.phases.0.bogus"],
    ),
    # negative / zero sizes
    "d_model-negative": ("model: {d_model: -128}\n", ["model.d_model"]),
    "d_model-zero": ("model: {d_model: 0}\n", ["model.d_model"]),
    "n_blocks-negative": ("model: {n_blocks: -1}\n", ["model.n_blocks"]),
    "n_blocks-zero": ("model: {n_blocks: 0}\n", ["model.n_blocks"]),
    "batch_size-negative": ("train: {batch_size: -8}\n", ["train.batch_size"]),
    "batch_size-zero": ("train: {batch_size: 0}\n", ["train.batch_size"]),
    # MoE cross-field rule (top_k 3 is within the le=4 bound, so only the cross-field rule fires)
    "top_k-gt-num_experts": (
        "model: {moe: {num_experts: 2, top_k: 3, domain_expert_map: {math: 0, code: 1}}}\n",
        ["model.moe.top_k", "num_experts"],
    ),
    # attention shape
    "n_heads-not-dividing": ("model: {d_model: 128, n_heads: 3, n_kv_heads: 1}\n", ["model.n_heads"]),
    "n_kv_heads-not-dividing": ("model: {d_model: 128, n_heads: 4, n_kv_heads: 3}\n", ["model.n_kv_heads"]),
    "odd-head-size": ("model: {d_model: 96, n_heads: 32, n_kv_heads: 2}\n", ["model.n_heads", "even"]),
    # curriculum
    "phases-out-of-order": (
        "curriculum:\n  phases:\n"
        "    - {name: early, until_step: 100}\n"
        "    - {name: late, until_step: 50}\n",
        ["curriculum.phases", "early", "late"],
    ),
    "phases-equal-steps": (
        "curriculum:\n  phases:\n"
        "    - {name: first, until_step: 100}\n"
        "    - {name: second, until_step: 100}\n",
        ["curriculum.phases", "first", "second"],
    ),
    "forced-without-moe": (
        "curriculum: {phases: [{name: a, until_step: 10, moe: false, routing: forced}]}\n",
        ["curriculum.phases.0", "routing"],
    ),
    "teacher-without-moe": (
        "curriculum: {phases: [{name: a, until_step: 10, routing: teacher}]}\n",
        ["curriculum.phases.0", "routing"],
    ),
    # MoR capacity schedule
    "mor-schedule-length": (
        "model: {mor: {recursions: 3, capacity_schedule: [1.0, 0.5]}}\n",
        ["model.mor.capacity_schedule"],
    ),
    "mor-schedule-increasing": (
        "model: {mor: {recursions: 3, capacity_schedule: [1.0, 0.5, 0.75]}}\n",
        ["model.mor.capacity_schedule"],
    ),
    "mor-schedule-first-not-one": (
        "model: {mor: {recursions: 3, capacity_schedule: [0.9, 0.5, 0.25]}}\n",
        ["model.mor.capacity_schedule"],
    ),
    # block indices / domains
    "moe-block-out-of-range": ("model: {n_blocks: 2, moe: {blocks: [0, 2]}}\n", ["moe.blocks"]),
    "mod-block-out-of-range": ("model: {n_blocks: 2, mod: {blocks: [5]}}\n", ["mod.blocks"]),
    "expert-map-unknown-domain": (
        "model: {moe: {domain_expert_map: {klingon: 0}}}\n",
        ["moe.domain_expert_map", "klingon"],
    ),
    "expert-map-index-too-big": (
        "model: {moe: {num_experts: 4, domain_expert_map: {math: 4}}}\n",
        ["model.moe.domain_expert_map"],
    ),
    "phase-mixture-unknown-domain": (
        "curriculum: {phases: [{name: a, until_step: 10, mixture: {klingon: 1.0}}]}\n",
        ["curriculum.phases.0.mixture", "klingon"],
    ),
    "data-mixture-unknown-domain": ("data: {mixture: {klingon: 1.0}}\n", ["data.mixture", "klingon"]),
    "phase-seq_len-too-long": (
        "model: {seq_len: 64}\ncurriculum: {phases: [{name: a, until_step: 10, seq_len: 128}]}\n",
        ["curriculum.phases.0.seq_len", "model.seq_len"],
    ),
}


@pytest.mark.parametrize("text,fields", list(REJECT.values()), ids=list(REJECT))
def test_rejects_and_names_the_field(tmp_path, text, fields):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = assert_one_line_error(ei.value, p)
    for f in fields:
        assert f in msg, f"{f!r} not named in {msg!r}"


def test_several_errors_are_all_named_on_one_line(tmp_path):
    p = write(tmp_path, "model: {d_model: 0, n_blocks: 0}\ntrain: {batch_size: 0}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = assert_one_line_error(ei.value, p)
    for f in ("model.d_model", "model.n_blocks", "train.batch_size"):
        assert f in msg


@pytest.mark.parametrize(
    "text",
    ["model: [1, 2\n", "model:\n  d_model: 1\n bad_indent: 2\n", "a: b: c\n", "{unclosed\n"],
    ids=["unclosed-list", "bad-indent", "nested-colon", "unclosed-map"],
)
def test_invalid_yaml_syntax(tmp_path, text):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = assert_one_line_error(ei.value, p)
    assert "YAML" in msg


@pytest.mark.parametrize("text,kind", [("- 1\n- 2\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_non_mapping_top_level(tmp_path, text, kind):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = assert_one_line_error(ei.value, p)
    assert "mapping" in msg and kind in msg


def test_missing_file(tmp_path):
    p = tmp_path / "does-not-exist.yaml"
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert_one_line_error(ei.value, p)


def test_missing_bare_name_is_not_a_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as ei:
        load_config("no-such-preset")
    assert_one_line_error(ei.value, "no-such-preset")


def test_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path)
    assert_one_line_error(ei.value, tmp_path)


# Regressions: cross-field rules hold for defaulted fields too, errors stay one line with full paths.


@pytest.mark.parametrize("d_model", [130, 100], ids=["n_heads-not-dividing", "odd-head-size"])
def test_default_n_heads_is_checked_against_d_model(tmp_path, d_model):
    with pytest.raises(ConfigError, match=r"model\.n_heads"):
        load_config(write(tmp_path, f"model: {{d_model: {d_model}}}\n"))


def test_default_n_kv_heads_is_checked_against_n_heads(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads"):
        load_config(write(tmp_path, "model: {d_model: 96, n_heads: 3}\n"))


def test_default_expert_map_wraps_domains_onto_fewer_experts(tmp_path):
    cfg = load_config(write(tmp_path, "model: {moe: {num_experts: 2}}\n"))
    assert cfg.model.domain_expert_map() == {"math": 0, "code": 1, "chat": 0, "finefineweb": 1}
    with pytest.raises(ConfigError, match=r"model\.moe\.domain_expert_map"):
        load_config(write(tmp_path, "model: {moe: {num_experts: 2, domain_expert_map: {math: 3}}}\n"))


def test_yaml_reader_error_is_one_line(tmp_path):
    p = tmp_path / "ctrl.yaml"
    p.write_bytes(b"a: \x07b\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert_one_line_error(ei.value, p)


@pytest.mark.parametrize(
    "text,field",
    [
        ("model: {n_blocks: 2, moe: {blocks: [0, 2]}}\n", "model.moe.blocks"),
        ("model: {moe: {domain_expert_map: {klingon: 0}}}\n", "model.moe.domain_expert_map"),
    ],
    ids=["moe.blocks", "domain_expert_map"],
)
def test_model_level_errors_use_full_dotted_path(tmp_path, text, field):
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, text))
    assert field in str(ei.value)


@pytest.mark.parametrize(
    "text,overrides",
    [("train: {lr: 0.1}\n", {"train.lr.x": 1}), ("- 1\n", {"train.lr": 1})],
    ids=["through-scalar", "onto-list"],
)
def test_bad_override_target_is_a_config_error(tmp_path, text, overrides):
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, text), overrides=overrides)


def test_override_fills_an_empty_section(tmp_path):
    assert load_config(write(tmp_path, "model:\n"), overrides={"model.d_model": 64}).model.d_model == 64


# ---------------------------------------------------------------------------------------------
# dump / load round trip


def test_default_capacity_factor_is_dropless():
    assert math.isinf(HydraConfig().model.moe.capacity_factor)


@pytest.mark.parametrize("name", PRESETS)
def test_dump_round_trips_presets(tmp_path, name):
    cfg = load_config(name)
    text = dump_config(cfg)
    assert isinstance(yaml.safe_load(text), dict)
    back = load_config(write(tmp_path, text))
    assert back == cfg
    assert math.isinf(back.model.moe.capacity_factor)


def test_dump_round_trips_finite_capacity_and_extras(tmp_path):
    cfg = load_config(
        "tiny",
        overrides={
            "model.moe.capacity_factor": 1.25,
            "model.moe.blocks": [1],
            "model.mor.capacity_schedule": [1.0, 0.5, 0.5],
            "data.corpus": "/some/where",
        },
    )
    assert cfg.model.moe.capacity_factor == 1.25
    back = load_config(write(tmp_path, dump_config(cfg)))
    assert back == cfg
    assert back.model.moe.capacity_factor == 1.25
    assert back.model.mor.capacity_schedule == [1.0, 0.5, 0.5]


def test_dump_round_trips_defaults(tmp_path):
    cfg = HydraConfig()
    assert load_config(write(tmp_path, dump_config(cfg))) == cfg


# ---------------------------------------------------------------------------------------------
# overrides


def test_overrides_apply():
    base = load_config("tiny")
    cfg = load_config("tiny", overrides={"train.lr": 0.5, "model.moe.top_k": 2})
    assert cfg.train.lr == 0.5
    assert cfg.model.moe.top_k == 2
    # everything else untouched
    assert cfg.model.moe.num_experts == base.model.moe.num_experts
    assert cfg.train.batch_size == base.train.batch_size
    assert cfg.curriculum == base.curriculum
    # and nothing leaks into the next load
    assert load_config("tiny") == base


def test_override_creates_missing_sections(tmp_path):
    cfg = load_config(write(tmp_path, "train: {lr: 0.1}\n"), overrides={"model.mor.recursions": 2})
    assert cfg.model.mor.recursions == 2
    assert cfg.train.lr == 0.1


def test_invalid_override_names_the_field():
    with pytest.raises(ConfigError) as ei:
        load_config("tiny", overrides={"model.moe.top_k": 9})
    msg = assert_one_line_error(ei.value, CONFIG_DIR / "tiny.yaml")
    assert "model.moe.top_k" in msg


def test_unknown_override_key_is_rejected():
    with pytest.raises(ConfigError) as ei:
        load_config("tiny", overrides={"train.lrr": 0.5})
    assert "train.lrr" in assert_one_line_error(ei.value)


# ---------------------------------------------------------------------------------------------
# helpers on the models


@pytest.mark.parametrize(
    "r,expected",
    [(1, [1.0]), (2, [1.0, 0.5]), (3, [1.0, 2 / 3, 1 / 3]), (4, [1.0, 0.75, 0.5, 0.25])],
)
def test_mor_default_schedule_is_linear(r, expected):
    assert MoRConfig(recursions=r).schedule() == pytest.approx(expected)


def test_mor_explicit_schedule_is_returned_as_a_copy():
    m = MoRConfig(recursions=3, capacity_schedule=[1.0, 0.6, 0.2])
    s = m.schedule()
    assert s == [1.0, 0.6, 0.2]
    s.append(0.0)
    assert m.schedule() == [1.0, 0.6, 0.2]


@pytest.mark.parametrize("n,expected", [(2, [1]), (4, [1, 3]), (5, [1, 3]), (14, [1, 3, 5, 7, 9, 11, 13])])
def test_mod_blocks_alternate_is_odd_indices(n, expected):
    assert ModelConfig(n_blocks=n, mod={"blocks": "alternate"}).mod_blocks() == expected


def test_mod_and_moe_blocks_all_and_explicit():
    m = ModelConfig(n_blocks=3, mod={"blocks": "all"}, moe={"blocks": [2, 0]})
    assert m.mod_blocks() == [0, 1, 2]
    assert m.moe_blocks() == [0, 2]


def test_batch_split_is_checked_once_for_every_worker_count():
    from hydra_ray.config import check_batch_split

    cfg = load_config("tiny")
    cfg.train.batch_size, cfg.train.grad_accum = 12, 2
    check_batch_split(cfg, range(1, 4))  # 12 = 1x2x6 = 2x2x3 = 3x2x2
    with pytest.raises(ConfigError, match=r"batch_size 12 does not split over 4 workers x grad_accum 2 \(--workers\)"):
        check_batch_split(cfg, range(2, 6))


def test_min_max_specs():
    from hydra_ray.config import parse_min_max

    assert parse_min_max("3", "--workers") == (3, 3) and parse_min_max("1-4", "--autoscale") == (1, 4)
    for bad in ("0", "4-2", "a-b", "1-", ""):
        with pytest.raises(ConfigError, match="--workers"):
            parse_min_max(bad, "--workers")
