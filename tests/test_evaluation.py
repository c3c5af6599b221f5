"""`hydra-ray eval` and the curriculum verdict: the scoring rules, a real checkpoint scored through
the CLI (result stored in the run and shown by `analyze`), and verdict rows pass / fail / no data."""

import json

import pytest

from hydra_ray.analysis.verdict import verdict
from hydra_ray.config import ChatTemplate
from hydra_ray.evaluation import chat_ok, code_ok, math_answer

from conftest import run_cli


def test_math_answer_is_the_first_answer_line_without_its_full_stop():
    assert math_answer(" 3x = 12.\nDivide: x = 4.\nAnswer: x = 4.\nProblem: next\nAnswer: 9.") == "x = 4"
    assert math_answer("Answer: 2.5.") == "2.5"
    assert math_answer("Answer: -3/4.\n") == "-3/4"
    assert math_answer("no answer here") is None


def test_code_counts_a_body_beyond_the_docstring_that_parses():
    header = 'def area(w, h):\n    """Area of a rectangle."""\n    '
    assert code_ok(header, "return w * h\n", "stop")
    assert not code_ok(header, "", "stop")  # a bare docstring parses, but is no completion
    assert not code_ok(header, "return w *\n", "stop")
    assert code_ok(header, "x = w * h\n    return x\n    if (", "length")  # cut by the limit: full lines
    method = '    def f(self):\n        """Doc."""\n        '
    assert code_ok(method, "return 1\n", "stop")  # indented headers are dedented first


def test_chat_reply_keeps_the_dialogue_format():
    t = ChatTemplate()
    assert chat_ok("It returns the sum.", "stop", t)
    assert not chat_ok("It returns the sum.", "length", t)  # ran to the limit
    assert not chat_ok("   ", "stop", t)
    assert not chat_ok("Sure.\nAssistant: again", "stop", t)


def _summary(agreement=0.9, forced=1.1, teacher=1.05, cost=0.001, ce_sd=0.5, mod=0.98, mor=0.95):
    util = lambda mode, r, pct: {"routing_mode": mode, "max_min_ratio": r, "per_expert_pct": pct}  # noqa: E731
    return {
        "agreement": {"available": True, "by_routing_mode": {"teacher": {"mean": agreement}, "free": {"mean": agreement}},
                      "domain_expert_map": {"math": 0, "code": 1, "chat": 2, "finefineweb": 3}},
        "run": {"data_mixture": {"math": 0.2, "code": 0.3, "chat": 0.2, "finefineweb": 0.3}},
        "utilisation": [util("forced", forced, [25, 25, 25, 25]), util("teacher", teacher, [25, 25, 25, 25]),
                        util("free", 1.5, [21, 29, 20, 30])],
        "boundaries": [{"to": "moe", "switch_on_ce_cost": cost * 2.0, "ce_before": 2.0, "ce_window_jump_in_noise_sd": ce_sd}],
        "phases": [{"name": "general", "mod_acc_mean": mod, "mor_acc_mean": mor, "grad_mean": 1.0, "grad_p95": 1.5,
                    "n_nan": 0, "clip_rate": 0.1, "first_step": 10, "last_step": 100, "n_samples": 10}],
        "anomalies": [{"kind": "grad_spike", "step": 20, "phase": "general"}],  # at the phase's start: no spike
        "eval": {"available": True, "train_eval_gap": 0.02, "last": {"step": 100},
                 "history": [{"phase": "general", "gap": 0.03}, {"phase": "general", "gap": 0.01}]},
        "tasks": None,
    }


def test_verdict_rows_pass_fail_and_say_why_when_there_is_no_data():
    rows = {r["claim"]: r for r in verdict(_summary())}
    assert [r["status"] for r in rows.values()].count("pass") == 9
    assert rows["held-out tasks above chance"]["status"] == "no data"
    assert "hydra-ray eval" in rows["held-out tasks above chance"]["note"]
    bad = {r["claim"]: r["status"] for r in verdict(_summary(agreement=0.5, teacher=1.4, cost=0.02, ce_sd=3.0, mod=0.9))}
    assert bad["specialisation: domain -> expert agreement"] == "fail"
    assert bad["balance: expert utilisation max/min"] == "fail"
    assert bad["lossless switch-ons: CE cost on the same batch"] == "fail"
    assert bad["no CE rise at phase boundaries"] == "fail"
    assert bad["MoD causal predictor accuracy"] == "fail"
    assert bad["MoR causal predictor accuracy"] == "pass"
    empty = _summary()
    empty["agreement"] = {"available": False}
    empty["boundaries"] = []
    rows = {r["claim"]: r for r in verdict(empty)}
    assert rows["specialisation: domain -> expert agreement"]["status"] == "no data"
    assert "no domain -> expert agreement" in rows["specialisation: domain -> expert agreement"]["note"]
    assert rows["lossless switch-ons: CE cost on the same batch"]["status"] == "no data"


@pytest.mark.integration
def test_eval_scores_a_checkpoint_stores_it_in_the_run_and_analyze_reports_it(tiny_run, tmp_path):
    _, run_dir = tiny_run
    res = run_cli("eval", f"{run_dir}@160", "--n", "4", "--json", timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["step"] == 160 and set(out["tasks"]) == {"math", "code", "chat"}
    for t in out["tasks"].values():
        assert 0 <= t["score"] <= 1 and 0 <= t["chance"] <= 1 and t["n"] == 4
        assert t["near_chance"] == (t["score"] - t["chance"] < 0.05)
    assert set(out["perplexity"]) == {"math", "code", "chat", "finefineweb"}
    # the trained model is far less perplexed than its untrained twin (byte vocabulary: ~264)
    assert all(out["perplexity"][d] < out["chance_perplexity"][d] / 2 for d in out["perplexity"])
    stored = json.loads((run_dir / "eval" / "step_00000160.json").read_text())
    assert stored["tasks"] == out["tasks"]
    res = run_cli("analyze", str(run_dir), "--out", str(tmp_path / "rep"), "--no-plots")
    assert res.returncode == 0, res.stderr
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "## Curriculum verdict" in report and "Held-out generated tasks" in report
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["tasks"]["step"] == 160
    assert next(r for r in summary["verdict"] if r["claim"] == "held-out tasks above chance")["status"] != "no data"


def test_eval_mistakes_are_one_line_errors(tmp_path):
    res = run_cli("eval", str(tmp_path / "nowhere"))
    assert res.returncode == 2 and res.stderr.startswith("error:") and "Traceback" not in res.stderr
    res = run_cli("eval", f"{tmp_path}@x")
    assert res.returncode == 2 and res.stderr.startswith("error:")
