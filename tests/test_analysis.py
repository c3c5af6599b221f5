"""`hydra-ray analyze`: summary.json figures checked against values each test computes itself
(from the fixture generator's ground truth, or straight from a real run's metrics records), the
report and plots written through the CLI, the same figures for a run on S3 as on a local disk,
and one-line errors for user mistakes."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from hydra_ray import storage
from hydra_ray.cli import main
from hydra_ray import runlog

FIXTURES = Path(__file__).parent / "fixtures" / "hydra_logs"
LOGS = FIXTURES / "run"


def _load_generator():
    """The fixture generator (ground truth of the log files), loaded by path under its own name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hydra_log_fixture_generator", FIXTURES / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


generate = _load_generator()

# the reference run's phases, written out here independently of hydra_ray.analysis
REFERENCE = [("foundation", 20_000, None), ("mor", 30_000, None), ("mod", 52_000, None), ("moe", 57_000, "learned"),
             ("forced_routing", 60_000, "forced"), ("free_routing", 70_000, "free"), ("generalisation", None, "free")]
PNGS = ["loss.png", "grad_lr.png", "expert_util.png", "mod_mor.png", "agreement.png", "eval_by_domain.png"]


def _mean(xs):
    return sum(xs) / len(xs)


def _phase(step, phases=REFERENCE):
    for name, until, routing in phases:
        if until is None or step <= until:
            return name, routing
    return phases[-1][0], phases[-1][2]


def _analyze(tmp_path, *paths, extra=()):
    out = tmp_path / "report"
    assert main(["analyze", *map(str, paths), "--out", str(out), *extra]) == 0
    return json.loads((out / "summary.json").read_text()), out


@pytest.fixture(scope="module")
def truth():
    return generate.build()


def test_fixture_logs_match_their_generator(truth):
    texts, _ = truth
    for name, text in texts.items():
        assert (LOGS / name).read_text(encoding="utf-8") == text, f"{name}: re-run generate.py"
    assert sum(t.count("\n") for t in texts.values()) < 400


def test_hydra_logs_figures(tmp_path, truth):
    _, t = truth
    # files in non-chronological order: newest first, and the middle one last
    s, out = _analyze(tmp_path, LOGS / "hydra.log", LOGS / "hydra.log.2", LOGS / "hydra.log.1")
    steps = t["steps"]

    groups = defaultdict(list)
    for step in sorted(steps):
        groups[_phase(step)[0]].append(steps[step])
    assert [p["name"] for p in s["phases"]] == [n for n, _, _ in REFERENCE]
    for p in s["phases"]:
        rs = groups[p["name"]]
        assert rs, p["name"]
        losses = [r["loss"] for r in rs if not r["nan"]]
        grads = [r["grad"] for r in rs if r["grad"] is not None]
        new = [r for r in rs if r["fmt"] == "new" and not r["nan"]]
        assert p["n_samples"] == len(rs), p["name"]
        assert p["n_nan"] == sum(r["nan"] for r in rs)
        assert p["loss_mean"] == pytest.approx(_mean(losses), rel=1e-12)
        assert p["loss_start"] == losses[0] and p["loss_end"] == losses[-1]
        assert p["grad_mean"] == pytest.approx(_mean(grads), rel=1e-12)
        assert p["grad_max"] == max(grads)
        assert p["lr_mean"] == pytest.approx(_mean([r["lr"] for r in rs]), rel=1e-12)
        clip = [r["grad"] > r["grad_post"] for r in new]
        assert p["clip_rate"] == (pytest.approx(sum(clip) / len(clip)) if clip else None)
        xs = [(r["step"], r["loss"]) for r in rs if not r["nan"]]
        mx, my = _mean([x for x, _ in xs]), _mean([y for _, y in xs])
        slope = sum((x - mx) * (y - my) for x, y in xs) / sum((x - mx) ** 2 for x, _ in xs)
        assert p["loss_slope_per_1k"] == pytest.approx(slope * 1000, rel=1e-9)
    assert sum(p["n_samples"] for p in s["phases"]) == len(steps)  # re-logged steps counted once

    # the resumed run's values win for the re-logged range
    assert s["parse"]["relogged"] == t["relogged"] == 4
    b = next(b for b in s["boundaries"] if b["to"] == "mor")
    assert b["loss_jump"] == pytest.approx(steps[21_000]["loss"] - steps[20_000]["loss"])
    b = next(b for b in s["boundaries"] if b["to"] == "free_routing")
    assert b["loss_after"] == steps[60_500]["loss"]

    util = defaultdict(list)
    for step in sorted(t["util"]):
        util[_phase(step)[1]].append(t["util"][step])
    assert [u["routing_mode"] for u in s["utilisation"]] == list(util)
    for u in s["utilisation"]:
        us = util[u["routing_mode"]]
        assert u["n_samples"] == len(us)
        means = [sum(x[i] for x in us) / len(us) for i in range(4)]
        assert u["per_expert_pct"] == [round(m * 100, 1) for m in means]
        assert u["max_min_ratio"] == pytest.approx(max(means) / min(means))
        # text logs hold pooled shares only: each sample is one layer, so per-layer CV = pooled CV,
        # the mean over the samples of std / mean of the sample's shares
        cvs = [math.sqrt(sum((v - _mean(x)) ** 2 for v in x) / len(x)) / _mean(x) for x in us]
        assert u["layer_cv"] == pytest.approx(_mean(cvs)) and u["pooled_cv"] == pytest.approx(_mean(cvs))

    last_eval = t["eval"][max(t["eval"])]
    assert s["eval"]["last"] == {"step": max(t["eval"]), "loss": last_eval["eval_loss"]}
    assert s["eval"]["train_eval_gap"] == pytest.approx(last_eval["eval_loss"] - last_eval["train_loss"])
    assert s["eval"]["n"] == len(t["eval"])
    assert s["agreement"]["available"] is False and s["mod_mor"]["mod_available"] is False

    kinds = defaultdict(list)
    for a in s["anomalies"]:
        kinds[a["kind"]].append(a["step"])
    assert kinds["nan_step"] == [generate.NAN_STEP]
    assert kinds["grad_spike"] == [generate.SPIKE_STEP]
    assert kinds["utilisation_collapse"] == [generate.COLLAPSE_STEPS[0]]
    assert {21_000, 52_500} <= set(kinds["loss_rise_at_boundary"])

    ps = s["parse"]
    assert ps["unparsed_count"] == sum(generate.GARBAGE.values())
    assert ps["unparsed_by_reason"] == generate.GARBAGE
    assert ps["formats"] == {f: sum(r["fmt"] == f for r in steps.values()) for f in ("new", "old")}
    assert ps["lines_read"] == sum(1 for f in LOGS.iterdir() for _ in f.open(encoding="utf-8"))
    assert s["last_step"]["step"] == generate.MAX and s["last_step"]["last_checkpoint"]["step"] == generate.MAX
    assert s["run"]["tokens_per_step"] == generate.TOKENS_PER_STEP

    report = (out / "report.md").read_text()
    assert "N/A" not in report and "Appendix B: unparsed lines" in report
    assert "Traceback (most recent call last):" in report
    for name in ("loss.png", "grad_lr.png", "expert_util.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and f"]({name})" in report

    # the folder (sorted newest-first by name) and any file order give the same figures
    s2, _ = _analyze(tmp_path / "again", LOGS, extra=["--no-plots"])
    for key in ("phases", "boundaries", "utilisation", "eval", "anomalies"):
        assert s2[key] == s[key], key


def test_phase_file_for_logs(tmp_path, truth):
    _, t = truth
    phases = [("dense", 50_000, None), ("guided", 65_000, "teacher"), ("open", None, "free")]
    f = tmp_path / "phases.yaml"
    f.write_text("- {name: dense, until_step: 50000}\n- {name: guided, until_step: 65000, routing: teacher}\n"
                 "- {name: open, routing: free, seed: null}\n")
    s, _ = _analyze(tmp_path, LOGS, extra=["--phases", str(f), "--no-plots"])
    assert [p["name"] for p in s["phases"]] == ["dense", "guided", "open"]
    counts = defaultdict(int)
    for step in t["steps"]:
        counts[_phase(step, phases)[0]] += 1
    assert {p["name"]: p["n_samples"] for p in s["phases"]} == counts
    modes = defaultdict(int)
    for step in t["util"]:
        modes[_phase(step, phases)[1]] += 1
    assert {u["routing_mode"]: u["n_samples"] for u in s["utilisation"]} == modes
    assert s["phases"][2]["seed_locked"] is False and s["phases"][1]["features"] == ["moe"]


@pytest.mark.slow
def test_tiny_run_figures(tmp_path, tiny_run):
    cfg, run_dir = tiny_run
    s, out = _analyze(tmp_path, run_dir)
    recs = runlog.read_records(str(run_dir))
    samples = [r for r in recs if "loss" in r]
    by_phase = defaultdict(list)
    for r in samples:
        by_phase[r["phase"]].append(r)

    assert [p["name"] for p in s["phases"]] == [p.name for p in cfg.curriculum.phases]
    for p, planned in zip(s["phases"], cfg.curriculum.phases):
        rs = by_phase[p["name"]]
        assert rs and p["n_samples"] == len(rs), p["name"]  # no phase left empty
        losses = [r["loss"] for r in rs if r["loss"] is not None]
        grads = [r["grad_norm"] for r in rs if r["grad_norm"] is not None and math.isfinite(r["grad_norm"])]
        assert p["loss_mean"] == pytest.approx(_mean(losses), rel=1e-12)
        assert p["grad_mean"] == pytest.approx(_mean(grads), rel=1e-12)
        assert p["lr_mean"] == pytest.approx(_mean([r["lr"] for r in rs]), rel=1e-12)
        assert p["clip_rate"] == pytest.approx(sum(g > cfg.train.grad_clip for g in grads) / len(grads))
        assert p["grad_p95"] == pytest.approx(float(np.percentile(grads, 95)))
        assert p["routing_mode"] == (planned.routing if planned.moe else None)
        assert p["seed_locked"] == (planned.seed is not None)
        assert p["mixture"] == planned.mixture
        assert (p["first_step"], p["last_step"]) == (rs[0]["step"], rs[-1]["step"])
        mod = [r["mod_selected_frac"] for r in rs if r["mod_selected_frac"] is not None]
        assert p["mod_frac_mean"] == (pytest.approx(_mean(mod)) if mod else None)
        mor = [r["mor_mean_depth"] for r in rs if r["mor_mean_depth"] is not None]
        assert p["mor_depth_mean"] == (pytest.approx(_mean(mor)) if mor else None)
    assert s["phases"][1]["features_switched_on"] == ["mor"] and s["phases"][1]["switch_on"]["features"] == ["mor"]

    for b in s["boundaries"]:
        before, after = by_phase[b["from"]][-1], by_phase[b["to"]][0]
        assert b["loss_jump"] == pytest.approx(after["loss"] - before["loss"])
        assert b["ce_jump"] == pytest.approx(after["ce"] - before["ce"])

    util = defaultdict(list)
    for r in samples:
        if r["expert_util"] is not None:
            util[r["routing_mode"]].append(r)
    assert [u["routing_mode"] for u in s["utilisation"]] == ["learned", "forced", "teacher", "free"] == list(util)
    E = cfg.model.moe.num_experts
    for u in s["utilisation"]:
        rs = util[u["routing_mode"]]
        assert u["n_samples"] == len(rs)
        assert u["per_expert_pct"] == [round(sum(r["expert_util"][i] for r in rs) / len(rs) * 100, 1) for i in range(E)]
        agr = [r["domain_expert_agreement"] for r in rs if r["domain_expert_agreement"] is not None]
        assert u["agreement_mean"] == pytest.approx(_mean(agr))
        # the loop's own imbalance figures, averaged over the mode's samples
        assert all(r["imbalance"] for r in rs)
        assert u["layer_cv"] == pytest.approx(_mean([r["imbalance"]["layer_cv"] for r in rs]))
        assert u["pooled_cv"] == pytest.approx(_mean([r["imbalance"]["pooled_cv"] for r in rs]))
    assert s["agreement"]["by_routing_mode"]["forced"]["mean"] == pytest.approx(1.0)

    evals = [r for r in recs if "eval" in r]
    last = evals[-1]
    assert s["eval"]["n"] == len(evals)
    assert s["eval"]["last"] == {"step": last["step"], "loss": pytest.approx(last["eval"]["loss"])}
    assert s["eval"]["by_domain"] == pytest.approx(last["eval"]["by_domain"])
    assert s["eval"]["train_eval_gap"] == pytest.approx(last["eval"]["loss"] - last["ce"])
    assert s["last_step"]["step"] == samples[-1]["step"] == cfg.curriculum.total_steps
    assert s["last_step"]["last_checkpoint"]["step"] == cfg.curriculum.total_steps
    assert s["parse"]["unparsed_count"] == 0 and s["parse"]["lines_parsed"] == len(recs)
    assert s["recommendations"] and s["observations"]

    report = (out / "report.md").read_text()
    assert s["plots"] == PNGS
    for name in PNGS:
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and f"]({name})" in report
    for p in s["phases"]:
        assert f"| {p['name']} | {p['n_samples']} | {p['loss_mean']:.4f} |" in report
    assert "N/A" not in report
    for u in s["utilisation"]:
        assert " | ".join(f"{x:.1f}%" for x in u["per_expert_pct"]) in report


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["metrics.jsonl", "parts"])
def test_metrics_corrupt_and_relogged_lines(tmp_path, tiny_run, capsys, layout):
    """A torn line is skipped with a warning and listed; a re-logged range counts once, later wins:
    within one legacy metrics.jsonl, and across parts (the re-logged steps in a later part)."""
    _, run_dir = tiny_run
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(run_dir / "config.yaml", run / "config.yaml")
    lines = [runlog.strict_json(r) for r in runlog.read_records(str(run_dir))]
    tail = [json.loads(x) for x in lines[-3:]]
    for r in tail:
        r["loss"] += 1.0
    torn = lines[:-1] + ['{"step": 999, "loss": 3.1', ""]
    if layout == "metrics.jsonl":
        (run / "metrics.jsonl").write_text("\n".join(torn + [json.dumps(r) for r in tail]) + "\n")
        target, first = run / "metrics.jsonl", "metrics.jsonl"
    else:
        (run / "metrics").mkdir()
        first = "part-0000000000.jsonl"
        (run / "metrics" / first).write_text("\n".join(torn) + "\n")
        (run / "metrics" / f"part-{tail[0]['step']:010d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tail))
        target = run
    s, _ = _analyze(tmp_path, target, extra=["--no-plots"])
    err = capsys.readouterr().err
    assert "warning:" in err and f"{first}:{len(lines)}: skipped" in err
    assert s["parse"]["unparsed_count"] == 1 and s["parse"]["unparsed"][0]["line"] == len(lines)
    assert s["parse"]["unparsed"][0]["file"].endswith(first)
    assert len(s["parse"]["files"]) == (1 if layout == "metrics.jsonl" else 2)
    assert s["parse"]["relogged"] == 2  # the first copies of the two steps that were written again
    assert s["run"]["n_samples"] == len(lines)
    general = s["phases"][-1]
    assert general["loss_end"] == pytest.approx(tail[-1]["loss"])
    assert s["plots"] == [] and not (tmp_path / "report" / "loss.png").exists()


@pytest.mark.integration
def test_run_on_s3_gives_the_figures_of_the_same_run_on_disk(tmp_path, tiny_run, s3, monkeypatch, capsys):
    """The tiny run copied to S3 and analysed there, into an S3 --out: the summary is the local
    run's, locations aside; nothing is written to a local folder named after the scheme."""
    _, run_dir = tiny_run
    monkeypatch.chdir(tmp_path)
    run_uri, out_uri = f"{s3}/analyze/tiny", f"{s3}/reports/tiny"
    storage.upload_dir(run_dir, run_uri)
    local, _ = _analyze(tmp_path, run_dir)
    assert main(["analyze", run_uri, "--out", out_uri]) == 0
    remote = json.loads(storage.read_text(f"{out_uri}/summary.json"))
    assert remote["plots"] == PNGS and storage.read_bytes(f"{out_uri}/loss.png")[:4] == b"\x89PNG"
    assert "## 1. Training timeline by phase" in storage.read_text(f"{out_uri}/report.md")
    assert remote["source"]["paths"] == [run_uri] and remote["last_step"]["last_checkpoint"]["path"].startswith(run_uri)

    def figures(summary: dict, run: str) -> dict:
        return json.loads(json.dumps(summary).replace(run, "RUN"))

    assert figures(remote, run_uri) == figures(local, str(run_dir))
    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir())

    # a location that is not a run is one line (text logs are read from a local disk only)
    capsys.readouterr()
    assert main(["analyze", f"{s3}/analyze", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{s3}/analyze: not a hydra-ray run" in err and "local path only" in err
    assert main(["analyze", f"{s3}/nothing-here", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: {s3}/nothing-here: no such file or directory\n"
    assert not (tmp_path / "o").exists()


def test_imbalance_is_the_loops(tmp_path):
    """The analysis reports the imbalance the loop logged, and for a record without it the loop's
    one definition (`utilisation.imbalance`) of its per-layer (else pooled) utilisation; the
    balance advice follows the per-layer CV, not the pooled one."""
    from hydra_ray.utilisation import imbalance

    logged = {"layer_cv": 0.61, "pooled_cv": 0.07, "layer_max_min": None}  # null: inf in strict JSON
    opposite = {"b0r0": [0.9, 0.1], "b1r0": [0.1, 0.9]}  # two layers collapsed onto different experts
    base = {"phase": "moe", "loss": 2.0, "ce": 2.0, "routing_mode": "learned"}
    recs = [{**base, "step": 1, "expert_util": [0.5, 0.5], "imbalance": logged},
            {**base, "step": 2, "expert_util": [0.5, 0.5], "expert_util_by_layer": opposite},
            {**base, "step": 3, "expert_util": [0.7, 0.3]}]  # an older run: pooled utilisation only
    run = tmp_path / "run"
    (run / "metrics").mkdir(parents=True)
    (run / "metrics" / "part-0000000001.jsonl").write_text("".join(runlog.strict_json(r) + "\n" for r in recs))
    s, out = _analyze(tmp_path, run, extra=["--no-plots"])

    expected = [{**logged, "layer_max_min": math.inf}, imbalance(opposite), imbalance({"all": [0.7, 0.3]})]
    assert expected[1]["layer_cv"] == pytest.approx(0.8) and expected[1]["pooled_cv"] == pytest.approx(0.0)
    (u,) = s["utilisation"]
    assert u["layer_cv"] == pytest.approx(_mean([x["layer_cv"] for x in expected]))
    assert u["pooled_cv"] == pytest.approx(_mean([x["pooled_cv"] for x in expected]))
    assert u["n_per_layer"] == 2 and s["last_step"]["imbalance"] == pytest.approx(expected[2])
    assert "| Per-layer CV | Pooled CV |" in (report := (out / "report.md").read_text())
    assert f"per-layer CV {expected[2]['layer_cv']:.3f}, pooled CV {expected[2]['pooled_cv']:.3f}" in report
    advice = [r for r in s["recommendations"] if "aux_weight" in r]
    assert len(advice) == 1 and f"per-layer CV {u['layer_cv']:.2f}" in advice[0]

    # balanced when pooled, collapsed per layer: the advice follows the per-layer CV
    for name, by_layer, advised in (("again", opposite, True), ("third", {"a": [0.52, 0.48], "b": [0.48, 0.52]}, False)):
        (run / "metrics" / "part-0000000001.jsonl").write_text(
            runlog.strict_json({**recs[1], "expert_util_by_layer": by_layer}) + "\n")
        s, _ = _analyze(tmp_path / name, run, extra=["--no-plots"])
        assert s["utilisation"][0]["pooled_cv"] == pytest.approx(0.0)
        assert any("aux_weight" in r for r in s["recommendations"]) == advised


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'}: no such file or directory"

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "train.log").write_text("hello\n2024-01-01 00:00:00,000 - HYDRA - INFO - starting\n")
    assert main(["analyze", str(junk), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no HYDRA Step") and err.count("\n") == 1

    bad = tmp_path / "phases.yaml"
    bad.write_text("- {name: a, until_step: 10}\n- {name: b, until_step: 5}\n")
    assert main(["analyze", str(LOGS), "--out", str(tmp_path / "o"), "--phases", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "until_step 5 is not after" in err and err.count("\n") == 1

    bad.write_text("- {name: a, until_step: 10, routing: sideways}\n")
    assert main(["analyze", str(LOGS), "--out", str(tmp_path / "o"), "--phases", str(bad)]) == 2
    assert "routing 'sideways'" in capsys.readouterr().err

    bad.write_text("- {name: a, until_stp: 10}\n")
    assert main(["analyze", str(LOGS), "--out", str(tmp_path / "o"), "--phases", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --phases {bad}: phase 0 ('a'): unknown key 'until_stp' (did you mean until_step?)\n"

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{not json\n")
    assert main(["analyze", str(run), str(LOGS / "hydra.log"), "--out", str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["analyze", str(run), "--out", str(tmp_path / "o")]) == 2
    assert "no parseable step records" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_report_module_imports_light():
    code = ("import sys, hydra_ray.analysis.report as r; "
            "assert not {'matplotlib', 'torch', 'ray'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
