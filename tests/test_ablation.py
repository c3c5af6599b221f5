"""`hydra-ray ablate`: the arms' configs (flags, identical data and schedule, dense-flops matched to
full), the FLOPs arithmetic, the compressed curriculum, validation before training, and one real
ablation of the tiny preset through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hydra_ray import ablation as A
from hydra_ray.benchmarks.train import phase_flops
from hydra_ray.config import ConfigError, dump_config, load_config, parse_config

from conftest import assert_one_line_error, run_cli, tiny_config


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny")


@pytest.fixture(scope="module")
def arms(tiny):
    return {a.name: a for a in A.arm_configs(tiny, list(A.ARMS))}


def test_each_arm_keeps_only_its_features(tiny, arms):
    for name, arm in arms.items():
        for p, q in zip(tiny.curriculum.phases, arm.cfg.curriculum.phases):
            kept = A.KEPT[name]
            assert (q.mor, q.mod, q.moe) == (p.mor and "mor" in kept, p.mod and "mod" in kept, p.moe and "moe" in kept)
            assert q.routing == (p.routing if "moe" in kept else "learned")
    assert arms["full"].cfg == tiny
    assert arms["dense"].features == [] and arms["mor"].features == ["mor"]
    assert arms["mor+mod"].features == ["mor", "mod"] and arms["full"].features == ["mor", "mod", "moe"]
    assert all(arms[n].cfg.model == tiny.model for n in ("dense", "mor", "mor+mod", "full"))


def test_arms_share_phase_boundaries_mixtures_and_data(tiny, arms):
    def schedule(cfg):
        return [(p.name, p.until_step, p.mixture, p.seed, p.seq_len, p.lr_scale) for p in cfg.curriculum.phases]

    for arm in arms.values():
        assert schedule(arm.cfg) == schedule(tiny)
        assert arm.cfg.train == tiny.train and arm.cfg.data == tiny.data
        assert A.data_fields(arm.cfg) == A.data_fields(tiny)


def test_dense_flops_is_the_closest_block_count_to_full(tiny, arms):
    d = arms["dense-flops"]
    n = d.cfg.model.n_blocks
    assert n >= 1 and d.cfg.model.ffn_width == tiny.model.ffn_width and d.features == []
    assert abs(d.ratio - 1) <= A.TOLERANCE
    full = arms["full"].flops
    for other in (n - 1, n + 1):
        if other >= 1:  # its neighbours miss full's FLOPs by more
            assert abs(A.training_flops(A.with_shape(arms["dense"].cfg, other))[0] - full) >= abs(d.flops - full)


def test_ffn_width_is_scaled_when_blocks_alone_miss(arms):
    dense = A.with_shape(arms["dense"].cfg, 1)
    one = A.training_flops(dense)[0]
    cfg, note = A.match_flops(dense, int(1.45 * one))  # 1 block: 0.69x, 2 blocks: 1.38x
    assert "ffn_hidden" in note and cfg.model.n_blocks in (1, 2)
    assert cfg.model.ffn_width % 8 == 0
    assert abs(A.training_flops(cfg)[0] / (1.45 * one) - 1) < 0.05


def test_training_flops_is_three_forwards_per_token_per_phase(tiny):
    data = tiny.model_dump(mode="python")
    data["curriculum"]["phases"][2]["seq_len"] = 64  # a shorter phase: fewer tokens, shorter attention
    cfg = parse_config(data)
    total, per_step = A.training_flops(cfg)
    want, start = 0, 0
    for p in cfg.curriculum.phases:
        L = p.seq_len or cfg.model.seq_len
        at = cfg.model_copy(deep=True)
        at.model.seq_len = L
        want += 3 * phase_flops(at, p.mor, p.mod, p.moe) * (p.until_step - start) * cfg.train.batch_size * L
        start = p.until_step
    assert total == want and len(per_step) == len(cfg.curriculum.phases)
    assert per_step[2] < per_step[3] / 2 * 1.1  # half the tokens, each a little cheaper


def test_flops_order_of_the_arms(arms):
    f = {k: a.flops for k, a in arms.items()}
    assert f["dense"] < f["mor+mod"] < f["full"] < f["mor"]  # MoD halves half the blocks; MoE adds routers
    assert arms["full"].ratio == 1.0


def test_explicit_block_lists_are_cut_to_the_new_depth():
    cfg = load_config("hydra-500m")
    assert A.with_shape(A.with_features(cfg, ()), 3).model.moe.blocks == [1]


def test_max_steps_compresses_the_curriculum(tiny):
    cfg = A.scaled(tiny, 28)
    ends = [p.until_step for p in cfg.curriculum.phases]
    assert ends[-1] == 28 and all(b > a for a, b in zip([0] + ends, ends))
    assert 1 <= cfg.train.eval_every < 28 and 1 <= cfg.train.save_every < 28
    assert A.scaled(tiny, None) is tiny
    with pytest.raises(ConfigError, match="at least one step per phase"):
        A.scaled(tiny, 6)


def test_validation_errors_are_one_line(tiny):
    with pytest.raises(ConfigError, match="unknown arm 'sparse'"):
        A.parse_arms("dense,sparse")
    with pytest.raises(ConfigError, match="once"):
        A.parse_arms("dense,dense")
    dense_only = A.with_features(tiny, ())
    with pytest.raises(ConfigError, match="no phase with moe"):
        A.arm_configs(dense_only, ["dense", "full"])
    assert [a.name for a in A.arm_configs(dense_only, ["dense", "mor"])] == ["dense", "mor"]


def test_bad_arm_is_a_one_line_cli_error(tmp_path):
    r = run_cli("ablate", "--config", "tiny", "--out", str(tmp_path / "out"), "--arms", "dense,fulll")
    assert_one_line_error(r, "fulll", "full")
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


@pytest.mark.integration
@pytest.mark.slow
def test_ablate_tiny_end_to_end(tmp_path, builtin_cache):
    cfg_path = tmp_path / "tiny.yaml"
    # 2 evals and checkpoints per arm after compression (steps 14 and 28), not 10: the test's time
    cfg_path.write_text(dump_config(tiny_config(builtin_cache, eval_every=90, save_every=90)))
    out = tmp_path / "ablation"
    # one torch thread: the tiny model's many small ops lose more to thread barriers than they gain,
    # badly so on a loaded 2-core machine (a second thread waits out the scheduler at every op)
    r = run_cli("ablate", "--config", str(cfg_path), "--out", str(out), "--max-steps", "28", "--eval-n", "2",
                env={"OMP_NUM_THREADS": "1"}, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "ablation.json").read_text())
    rows = {a["name"]: a for a in res["arms"]}
    assert list(rows) == list(A.ARMS) and res["steps"] == 28
    for a in rows.values():
        assert a["eval_step"] == 28 and math.isfinite(a["eval_loss"]) and a["wall_s"] > 0
        assert set(a["eval_by_domain"]) == set(res["domains"])
        assert all(math.isfinite(v) for v in a["eval_by_domain"].values())
        assert set(a["tasks"]) == {"math", "code", "chat"} and all(0 <= v <= 1 for v in a["tasks"].values())
        assert (Path(a["run_dir"]) / "eval" / "step_00000028.json").exists()
    f = {k: a["train_flops"] for k, a in rows.items()}
    assert f["dense"] < f["mor+mod"] < f["full"] and rows["full"]["flops_ratio"] == 1.0
    assert abs(rows["dense-flops"]["flops_ratio"] - 1) <= A.TOLERANCE
    assert rows["dense-flops"]["n_blocks"] > rows["dense"]["n_blocks"]
    md = (out / "ablation.md").read_text()
    assert all(f"| {n} |" in md for n in A.ARMS) and "Result:" in md and res["result"] in md
    assert res["result"] in r.stdout and "| dense-flops |" in r.stdout
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
