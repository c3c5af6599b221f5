"""Expert parallelism over real gloo process groups: the all-to-all dispatcher against the local
one on the same global batch (outputs and every gradient), and parallelize() on a HydraLM."""

import copy
import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hydra_ray.config import ModelConfig
from hydra_ray.models import HydraLM
from hydra_ray.models.moe import Experts
from hydra_ray.parallel.dispatch import AllToAllDispatcher, LocalDispatcher
from hydra_ray.parallel.parallelize import gather_expert_state, parallelize, unwrap

D, F = 12, 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case(world, E, K, starve, seed):
    """Global batch, identical on every rank. `starve`: rank 1 receives no token and the last
    rank holds no token at all."""
    g = torch.Generator().manual_seed(seed)
    L = E // world
    avoid = set(range(L, 2 * L)) if starve else set()
    allowed = torch.tensor([e for e in range(E) if e not in avoid])
    sizes = [0 if (starve and r == world - 1) else 3 + 5 * r for r in range(world)]
    N = sum(sizes)
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(N)])
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.rand(N, K, generator=g, dtype=torch.float64)
    proj = torch.randn(N, D, generator=g, dtype=torch.float64)
    experts = Experts(E, D, F).double()
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return sizes, idx, x, w, proj, experts


def _run(dispatcher, experts, x, idx, w, proj, E):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    rows, counts, plan = dispatcher.dispatch(x, idx, E)
    out = dispatcher.combine(experts(rows, counts), w, plan)
    (out * proj).sum().backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in experts.named_parameters()}
    zero_if_none = lambda g, like: g if g is not None else torch.zeros_like(like)  # noqa: E731
    return out.detach(), zero_if_none(x.grad, x), zero_if_none(w.grad, w), grads, counts


def _check_dispatch(rank, world):
    for E, K, starve in itertools.product((4, 8), (1, 2), (False, True)):
        sizes, idx, x, w, proj, experts = _case(world, E, K, starve, seed=100 * E + 10 * K + starve)
        want = _run(LocalDispatcher(), experts, x, idx, w, proj, E)
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        disp = AllToAllDispatcher(E)
        L = disp.num_local_experts
        local = Experts(L, D, F).double()
        with torch.no_grad():
            for n, p in local.named_parameters():
                p.copy_(getattr(experts, n)[rank * L : (rank + 1) * L])
        got = _run(disp, local, x[lo:hi], idx[lo:hi], w[lo:hi], proj[lo:hi], E)
        tag = f"rank {rank}/{world} E={E} K={K} starve={starve}"
        torch.testing.assert_close(got[0], want[0][lo:hi], msg=tag)
        torch.testing.assert_close(got[1], want[1][lo:hi], msg=tag)
        torch.testing.assert_close(got[2], want[2][lo:hi], msg=tag)
        for n in got[3]:
            torch.testing.assert_close(got[3][n], want[3][n][rank * L : (rank + 1) * L], msg=f"{tag} d{n}")
        assert len(got[4]) == L
        if starve and rank == 1:
            assert sum(got[4]) == 0, tag  # this rank's experts received nothing
            assert all(torch.all(g == 0) for g in got[3].values())


def _check_parallelize(rank, world):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, n_blocks=2, ffn_hidden=48, seq_len=16,
                      moe=dict(num_experts=4, top_k=2), mod=dict(capacity=0.5), mor=dict(recursions=2))
    torch.manual_seed(0)
    model = HydraLM(cfg).double()
    model.set_features(mor=True, mod=True, moe=True, routing="teacher")
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    xs = torch.randint(0, 64, (world, 3, 17), generator=g)
    doms = torch.randint(0, 4, (world, 3, 16), generator=g)
    # reference: one process, the mean of the per-rank losses
    sum(ref(xs[r, :, :-1], xs[r, :, 1:], doms[r]).loss for r in range(world)).div(world).backward()
    ddp = parallelize(model)
    out = ddp(xs[rank, :, :-1], xs[rank, :, 1:], doms[rank])
    out.loss.backward()
    inner = unwrap(ddp)
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in inner.named_parameters():
        want = ref_params[name].grad
        if ".experts." in name:
            L = p.shape[0]
            want = want[rank * L : (rank + 1) * L]
            assert p.shape[0] == 4 // world
        if want is None:
            assert p.grad is None or torch.all(p.grad == 0), name
            continue
        torch.testing.assert_close(p.grad, want, msg=name, atol=1e-9, rtol=1e-7)
        checked += 1
    assert checked > 20
    full = gather_expert_state(ddp)
    for name, v in ref.state_dict().items():
        assert torch.equal(full[name], v), name


def _worker(rank, world, port, checks):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for check in checks:
            globals()[check](rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_dispatch_matches_local_dispatch(world):
    checks = ["_check_dispatch"] + (["_check_parallelize"] if world == 2 else [])
    mp.spawn(_worker, args=(world, _free_port(), checks), nprocs=world, join=True)
