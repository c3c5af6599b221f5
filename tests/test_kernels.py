"""Triton dispatch kernels (run by the interpreter on CPU) against the torch reference and naive
loops: data movement exact, weighted sums within tolerance, every gradient; GPU builds (cubin).

`HYDRA_TEST_DEVICE=cuda` runs the same tests with the kernels on a GPU (compiled, not
interpreted): `make gpu-check` does. The references always run on the CPU."""

import math
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hydra_ray import kernels
from hydra_ray.config import MoEConfig, load_config
from hydra_ray.kernels import torch_dispatch as ref
from hydra_ray.kernels import triton_dispatch as tri
from hydra_ray.models.moe import MoELayer

DEV = torch.device(os.environ.get("HYDRA_TEST_DEVICE", "cpu"))


def on(*ts):
    """The tensors on the device under test (the kernels' inputs)."""
    out = tuple(t.to(DEV) for t in ts)
    return out if len(out) > 1 else out[0]


TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _ids(T, K, E, drop=0.1, seed=0, avoid=()):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in avoid])
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(T)]) \
        if T else torch.zeros(0, K, dtype=torch.long)
    idx[torch.rand(T, K, generator=g) < drop] = -1
    return idx


def _routed(T, K, E, seed):
    """Expert ids with ~10% dropped slots, their destination rows, and the number of kept rows."""
    idx = _ids(T, K, E, seed=seed)
    _, _, dest = ref.route(idx, E)
    return idx, dest, int((idx >= 0).sum())


CASES = [  # (T, K, E, D): odd token counts, every top-k, hidden sizes that are not powers of two
    (1, 1, 4, 100),
    (100, 2, 8, 72),
    (600, 4, 8, 100),
    (37, 3, 4, 48),
    (0, 2, 4, 16),
]


@pytest.mark.parametrize("T,K,E,D", CASES)
def test_kernel_route_histogram_offsets_and_dest_are_exact(T, K, E, D):
    idx = _ids(T, K, E)
    got = [t.cpu() for t in tri.route(on(idx), E)]
    for want in (ref.route(idx, E), ref.route_loop(idx, E)):
        for a, b in zip(got, want):
            assert torch.equal(a.cpu(), b.cpu())
    assert int(got[0].sum()) == int((idx >= 0).sum())


def test_kernel_route_handles_everything_dropped_and_one_hot_expert():
    idx = torch.full((50, 2), -1)
    counts, offsets, dest = (t.cpu() for t in tri.route(on(idx), 4))
    assert counts.tolist() == [0, 0, 0, 0] and torch.all(dest == -1)
    idx = torch.full((50, 1), 3)  # a single busy expert, three idle
    counts, offsets, dest = (t.cpu() for t in tri.route(on(idx), 4))
    assert counts.tolist() == [0, 0, 0, 50] and offsets.tolist() == [0, 0, 0, 0]
    assert dest[:, 0].tolist() == list(range(50))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,K,E,D", CASES)
def test_kernel_permute_and_unweighted_combine_move_data_exactly(T, K, E, D, dtype):
    _, dest, A = _routed(T, K, E, seed=1)
    x = torch.randn(T, D).to(dtype)
    got = tri.permute(*on(x, dest), A).cpu()
    assert got.dtype == dtype
    assert torch.equal(got, ref.permute_loop(x, dest, A))
    assert torch.equal(got, ref.permute(x, dest, A))
    # unweighted combine with top-1 is pure data movement too
    if K == 1:
        y = torch.randn(A, D).to(dtype)
        assert torch.equal(tri.gather_sum(*on(y, dest)).cpu(), ref.gather_sum_loop(y, dest))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,K,E,D", CASES)
def test_kernel_weighted_combine_scaled_permute_and_slot_dot_within_tolerance(T, K, E, D, dtype):
    _, dest, A = _routed(T, K, E, seed=2)
    y = torch.randn(A, D).to(dtype)
    w = torch.rand(T, K)
    torch.testing.assert_close(tri.gather_sum(*on(y, dest, w)).cpu(), ref.gather_sum_loop(y, dest, w), **TOL[dtype])
    torch.testing.assert_close(tri.gather_sum(*on(y, dest)).cpu(), ref.gather_sum(y, dest), **TOL[dtype])
    x = torch.randn(T, D).to(dtype)
    torch.testing.assert_close(tri.permute(*on(x, dest), A, on(w)).cpu(), ref.permute_loop(x, dest, A, w),
                               **TOL[dtype])
    want = torch.tensor([[float((x[t].double() * y[dest[t, k]].double()).sum()) if dest[t, k] >= 0 else 0.0
                          for k in range(K)] for t in range(T)]).reshape(T, K)
    torch.testing.assert_close(tri.slot_dot(*on(x, y, dest), torch.float32).cpu(), want.float(),
                               atol=1e-3 if dtype == torch.float32 else 0.5, rtol=1e-4 if dtype == torch.float32 else 2e-2)


def _autograd_path(x, w, idx, E, proj):
    routing = kernels.route(idx, E)
    x_AD = kernels.permute(x, routing)
    y_AD = torch.tanh(x_AD) * 1.5  # any per-row expert function
    return (kernels.combine(y_AD, w, routing) * proj).sum()


def _loop_path(x, w, idx, E, proj):
    """Naive autograd reference: every token, every slot, one at a time."""
    out = []
    for t in range(x.shape[0]):
        acc = x[t] * 0 + (w[t] * 0).sum().to(x.dtype)  # keeps the graph when every slot is dropped
        for k in range(idx.shape[1]):
            if idx[t, k] >= 0:
                acc = acc + w[t, k].to(x.dtype) * (torch.tanh(x[t]) * 1.5)
        out.append(acc)
    return (torch.stack(out) * proj).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,K,E,D", [c for c in CASES if c[0] > 0])
def test_kernel_gradients_match_reference_and_naive_loop(monkeypatch, T, K, E, D, dtype):
    idx = _ids(T, K, E, seed=3)
    x0 = torch.randn(T, D).to(dtype)
    w0 = torch.rand(T, K)
    proj = torch.randn(T, D).to(dtype)
    grads = {}
    for backend, dev in (("triton", DEV), ("torch", torch.device("cpu"))):
        monkeypatch.setenv("HYDRA_KERNELS", backend)
        x, w = x0.to(dev).requires_grad_(), w0.to(dev).requires_grad_()
        loss = _autograd_path(x, w, idx.to(dev), E, proj.to(dev))
        grads[backend] = tuple(t.cpu() for t in (loss.detach(), *torch.autograd.grad(loss, (x, w))))
    if T <= 100:  # the one-slot-at-a-time loop is slow in bfloat16 on CPU
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = _loop_path(x, w, idx, E, proj)
        grads["loop"] = (loss.detach(), *torch.autograd.grad(loss, (x, w)))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=5e-2)
    for other in [k for k in grads if k != "triton"]:
        for a, b in zip(grads["triton"], grads[other]):
            torch.testing.assert_close(a.float(), b.float(), **tol)


def test_kernel_moe_layer_gives_the_same_result_on_both_backends(monkeypatch):
    layer = MoELayer(24, 40, MoEConfig(num_experts=4, top_k=2), [])
    layer.enabled = True
    with torch.no_grad():
        layer.router.weight.normal_()
    x0 = torch.randn(101, 24)
    results = {}
    for backend, dev in (("triton", DEV), ("torch", torch.device("cpu"))):
        monkeypatch.setenv("HYDRA_KERNELS", backend)
        layer.to(dev).zero_grad()
        x = x0.to(dev).requires_grad_()
        y = layer(x).y_ND
        y.pow(2).sum().backward()
        results[backend] = tuple(t.cpu() for t in (y.detach(), x.grad, layer.router.weight.grad,
                                                    layer.experts.w2.grad))
    tol = 1e-5 if DEV.type == "cpu" else 1e-4  # GPU matmuls sum in another order than the CPU's
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_kernel_launchers_reject_bad_inputs_clearly():
    dest = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="x_TD has dtype torch.int64"):
        tri.permute(torch.zeros(4, 8, dtype=torch.int64), dest, 8)
    with pytest.raises(ValueError, match="x_TD must have 2 dimensions"):
        tri.permute(torch.zeros(4, 8, 1), dest, 8)
    with pytest.raises(ValueError, match="contiguous"):
        tri.permute(torch.zeros(8, 4).t(), dest, 8)
    with pytest.raises(ValueError, match="dest_TK has 4 rows, x_TD has 5 tokens"):
        tri.permute(torch.zeros(5, 8), dest, 8)
    with pytest.raises(TypeError, match="dest_TK has dtype torch.int32"):
        tri.gather_sum(torch.zeros(8, 8), dest.int())
    with pytest.raises(ValueError, match="weight_TK shape"):
        tri.gather_sum(torch.zeros(8, 8), dest, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="num_experts"):
        tri.route(dest, 0)


def test_kernel_backend_choice(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("HYDRA_KERNELS", raising=False)
    assert kernels.backend_for(cpu) == "torch"  # Triton only for CUDA tensors by default
    monkeypatch.setenv("HYDRA_KERNELS", "triton")
    assert kernels.backend_for(cpu) == "triton"
    monkeypatch.setenv("HYDRA_KERNELS", "torch")
    assert kernels.backend_for(cpu) == "torch"
    monkeypatch.setenv("HYDRA_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="HYDRA_KERNELS must be one of"):
        kernels.backend_for(cpu)


def test_kernels_import_as_the_project_package():
    import hydra_ray.kernels as k

    assert k.__file__.endswith(os.path.join("kernels", "__init__.py"))
    assert hasattr(k, "route") and hasattr(k, "permute") and hasattr(k, "combine")


@pytest.mark.slow
def test_cubin_builds_every_kernel_specialisation_for_sm80_and_sm90():
    """Real GPU binaries without a GPU: every specialisation the presets' MoE layers launch
    (their expert counts, top-k 1..4, float32 and bfloat16, their hidden sizes)."""
    cfgs = [load_config(n) for n in ("tiny", "small", "hydra-500m")]
    spec = dict(
        dtypes=sorted({"float32", *(c.train.dtype for c in cfgs)}),
        top_ks=sorted({1, 2, 3, 4, *(c.model.moe.top_k for c in cfgs)}),
        num_experts=sorted({c.model.moe.num_experts for c in cfgs}),
        hidden_sizes=sorted({c.model.d_model for c in cfgs}),
    )
    script = textwrap.dedent(f"""
        import json, torch
        from hydra_ray.kernels import triton_dispatch as td
        a = json.loads({json.dumps(json.dumps(spec))})
        specs = td.specializations([getattr(torch, d) for d in a["dtypes"]], a["top_ks"],
                                   a["num_experts"], a["hidden_sizes"])
        print(json.dumps({{arch: td.compile_for(arch, specs) for arch in (80, 90)}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    built = json.loads(r.stdout.strip().splitlines()[-1])
    names = set(built["80"])
    assert names == set(built["90"])
    for kind in ("rank", "dest", "permute", "combine", "slot_dot"):
        assert any(n.startswith(kind) for n in names), kind
    assert sum(n.startswith("combine") for n in names) >= 2 * 4 * 2  # dtypes x top-k x weighted
    assert all(size > 1000 for arch in built.values() for size in arch.values())


def test_kernel_dispatch_benchmark_runs_and_reports_ratios():
    from hydra_ray.benchmarks import dispatch

    res = dispatch.run(tokens=64, d_model=32, hidden=48, experts=4, top_k=2, rounds=2, log=lambda *_: None)
    # each ratio is the quotient of the two figures it is printed beside, measured in the same run
    assert res["dispatch_vs_copy"] == pytest.approx(res["dispatch_GBps"] / res["copy_GBps"])
    assert res["moe_vs_dense_time"] == pytest.approx(res["moe_ms"] / res["dense_ms"])
    assert all(math.isfinite(res[k]) and res[k] > 0 for k in ("dispatch_GBps", "copy_GBps", "moe_ms", "dense_ms"))
    assert res["backend"] == "torch"  # CPU tensors take the torch path by default

