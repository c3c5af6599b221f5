"""Benchmarks run and report every figure they promise (their numbers are not asserted: speed
targets live in the benchmarks' output, never in timed tests)."""

import pytest
import torch


@pytest.mark.slow
@pytest.mark.integration  # spawns two worker processes with a gloo group
def test_train_benchmark_reports_every_figure():
    """`hydra-ray bench train` on the tiny preset: tokens/s, MFU, the step breakdown (with the MoE
    dispatch and, on two workers, the all-to-all), HYDRA against dense of equal depth, 1 -> 2 workers."""
    from hydra_ray.benchmarks import train

    res = train.run(config="tiny", steps=8, workers=2, rounds=2, scaling_rounds=1, log=lambda *_: None)
    assert res["phase"] == "moe" and res["tokens_per_s"] > 0 and 0 < res["mfu"] < 1
    b = res["breakdown_s"]
    assert {"data", "forward", "backward", "optimizer", "dispatch"} <= set(b)
    assert b["dispatch"] < b["forward"] + b["backward"]  # dispatch runs inside them
    assert sum(b[k] for k in ("data", "forward", "backward", "optimizer")) <= res["step_s"] * 1.05
    vs = res["hydra_vs_dense"]
    assert vs["routing_overhead"] == pytest.approx(vs["time_ratio"] / vs["flops_ratio"])
    assert 0 < vs["flops_ratio"] < 1  # MoD and MoR skip work that the dense twin does
    sel, exp = vs["by_mechanism"]["selection"], vs["by_mechanism"]["experts"]  # tiny's MoE phase has both
    assert sel["flops_ratio"] < vs["flops_ratio"]  # MoD/MoR alone: dense FFN, no MoE router
    assert 1 < exp["flops_ratio"] < 1.05  # top-1 experts of the dense FFN's size, plus the router
    for m in (sel, exp):
        assert m["routing_overhead"] == pytest.approx(m["time_ratio"] / m["flops_ratio"])
    if torch.get_num_threads() > 1:  # the same comparison at the workers' 1 thread
        w = res["hydra_vs_dense_worker_threads"]
        assert w["threads"] == 1 and w["flops_ratio"] == vs["flops_ratio"]
        assert w["routing_overhead"] == pytest.approx(w["time_ratio"] / w["flops_ratio"])
        assert set(w["by_mechanism"]) == {"selection", "experts"}
    else:
        assert res["hydra_vs_dense_worker_threads"] is None  # already measured at 1 thread
    sc = res["scaling"]
    sharded, replicated = sc["sharded"], sc["replicated"]
    assert sc["speedup"] == sharded["speedup"] == pytest.approx(sharded["tokens_per_s_n"] / sc["tokens_per_s_1"])
    assert sharded["breakdown_s_n"]["all_to_all"] > 0 and sharded["breakdown_s_n"]["all_to_all_counts"] > 0
    assert replicated["tokens_per_s_n"] > 0 and "all_to_all" not in replicated["breakdown_s_n"]  # no token travels
    ceiling = sc["independent"]  # 2 processes training half the batch each, alone: what the machine allows
    assert set(ceiling["breakdown_s_n"]) == set(sc["breakdown_s_1"]) == set(replicated["breakdown_s_n"])
    assert ceiling["tokens_per_s_n"] > 0 and ceiling["speedup"] == pytest.approx(ceiling["tokens_per_s_n"] / sc["tokens_per_s_1"])
    for p in (sharded, replicated):
        assert p["of_ceiling"] == pytest.approx(p["tokens_per_s_n"] / ceiling["tokens_per_s_n"])
        assert p["speedup_rounds"] == [pytest.approx(p["speedup"])]  # one round: its ratio is the figure


def test_train_benchmark_scaling_runs_take_turns_and_reverse_each_round():
    """The 1 -> N worker arms of `bench train` run A B C D, D C B A, A B C D: over each pair of
    rounds every arm's mean sits at the same point of a drifting machine's speed."""
    from hydra_ray.benchmarks.common import take_turns

    calls = []
    arms = {n: (lambda n=n: calls.append(n) or len(calls)) for n in ("one", "independent", "sharded", "replicated")}
    runs = take_turns(arms, 3)
    assert calls == ["one", "independent", "sharded", "replicated", "replicated", "sharded", "independent", "one",
                     "one", "independent", "sharded", "replicated"]
    assert runs == {"one": [1, 8, 9], "independent": [2, 7, 10], "sharded": [3, 6, 11], "replicated": [4, 5, 12]}
    # a speed that drifts linearly (arm value = the time it ran) gives every arm the same mean over 2 rounds
    two = take_turns({n: (lambda n=n: calls.append(n) or len(calls)) for n in arms}, 2)
    assert len({sum(v) for v in two.values()}) == 1


def test_serve_benchmark_takes_turns_one_sixteen_sixteen_one_and_pools_each_side():
    """`bench serve`'s 1 client and 16 take turns (1, 16, 16, 1, half the time each), so that a
    machine whose speed drifts moves both sides alike; each side's runs pool into one tally."""
    from hydra_ray.benchmarks.serve import Tally, _completion_summary, one_against_many

    calls = []

    def run(clients: int, seconds: float) -> Tally:
        calls.append((clients, seconds))
        k = len(calls)  # each run's own figures, to see them pooled
        return Tally([(0.01 * k, 10 * k)], k - 1, seconds, 0.001 * k, {"queue": (0.002 * k, 1.0)})

    one, many = one_against_many(run, 8.0)
    assert calls == [(1, 4.0), (16, 4.0), (16, 4.0), (1, 4.0)]
    assert one.results == [(0.01, 10), (0.04, 40)] and many.results == [(0.02, 20), (0.03, 30)]
    assert (one.errors, one.wall) == (3, 8.0) and one.parts["queue"] == pytest.approx((0.01, 2.0))
    s = _completion_summary(1, one)
    assert s["tokens_per_s"] == pytest.approx(50 / 8.0) and s["ttft_p50_ms"] == pytest.approx(25.0)
    assert s["queue_mean_ms"] == pytest.approx(5.0) and s["load_cpu_ms_per_request"] == pytest.approx(1.0)
    assert (s["completions"], s["errors"]) == (2, 3)


def test_serve_benchmark_spreads_request_lengths_evenly():
    """`bench serve`'s second completions load: lengths 16-48, every one of them once in 33 calls
    of a client, from a different point for each client; 32 on average, as the fixed load."""
    from hydra_ray.benchmarks.serve import SPREAD, request_length

    assert request_length(32, 3, 5) == 32
    for i in range(16):
        lengths = [request_length(SPREAD, i, n) for n in range(33)]
        assert sorted(lengths) == list(range(16, 49))
    assert len({request_length(SPREAD, i, 0) for i in range(16)}) == 16
