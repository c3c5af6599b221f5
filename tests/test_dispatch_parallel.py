"""Expert parallelism over real gloo process groups: the all-to-all dispatcher against the local
one on the same global batch (outputs and every gradient), and parallelize() on a HydraLM, with
even shards, uneven ones (4 experts over 3 ranks, 3 over 2) and ranks that own no expert (4 over 6);
checkpoint state (weights, optimizer) gathered to global expert order and restored into shards."""

import copy
import itertools
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hydra_ray.config import ModelConfig
from hydra_ray.models import HydraLM
from hydra_ray.models.moe import Experts
from hydra_ray.parallel.dispatch import AllToAllDispatcher, LocalDispatcher, expert_shard
from hydra_ray.parallel.parallelize import gather_expert_state, parallelize, shard_experts, unwrap
from hydra_ray import checkpoint as ckpt
from hydra_ray.train.env import Env
from hydra_ray.train.state import _gather_optimizer, restore

D, F = 12, 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_expert_shards_are_contiguous_and_as_even_as_possible():
    assert [expert_shard(4, r, 3) for r in range(3)] == [(0, 2), (2, 1), (3, 1)]
    assert [expert_shard(3, r, 2) for r in range(2)] == [(0, 2), (2, 1)]
    assert [expert_shard(4, r, 6) for r in range(6)] == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 0), (4, 0)]
    for E, W in itertools.product(range(1, 10), range(1, 10)):
        shards = [expert_shard(E, r, W) for r in range(W)]
        assert sum(n for _, n in shards) == E and max(n for _, n in shards) - min(n for _, n in shards) <= 1
        assert all(lo == sum(n for _, n in shards[:r]) for r, (lo, _) in enumerate(shards))


def _case(world, E, K, starve, seed):
    """Global batch, identical on every rank. `starve`: rank 1 receives no token and the last
    rank holds no token at all."""
    g = torch.Generator().manual_seed(seed)
    lo, L = expert_shard(E, 1, world)
    avoid = set(range(lo, lo + L)) if starve else set()
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


def _check_dispatch(rank, world, expert_counts=(4, 8)):
    for E, K, starve in itertools.product(expert_counts, (1, 2), (False, True)):
        sizes, idx, x, w, proj, experts = _case(world, E, K, starve, seed=100 * E + 10 * K + starve)
        want = _run(LocalDispatcher(), experts, x, idx, w, proj, E)
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        disp = AllToAllDispatcher(E)
        off, L = disp.expert_offset, disp.num_local_experts
        assert (off, L) == expert_shard(E, rank, world)
        local = Experts(L, D, F).double()
        with torch.no_grad():
            for n, p in local.named_parameters():
                p.copy_(getattr(experts, n)[off : off + L])
        got = _run(disp, local, x[lo:hi], idx[lo:hi], w[lo:hi], proj[lo:hi], E)
        tag = f"rank {rank}/{world} E={E} K={K} starve={starve}"
        torch.testing.assert_close(got[0], want[0][lo:hi], msg=tag)
        torch.testing.assert_close(got[1], want[1][lo:hi], msg=tag)
        torch.testing.assert_close(got[2], want[2][lo:hi], msg=tag)
        for n in got[3]:
            torch.testing.assert_close(got[3][n], want[3][n][off : off + L], msg=f"{tag} d{n}")
        assert len(got[4]) == L
        if starve and rank == 1:
            assert sum(got[4]) == 0, tag  # this rank's experts received nothing
            assert all(torch.all(g == 0) for g in got[3].values())


def _check_parallelize(rank, world, num_experts=4, top_k=2, placement="sharded"):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, n_blocks=2, ffn_hidden=48, seq_len=16,
                      moe=dict(num_experts=num_experts, top_k=top_k), mod=dict(capacity=0.5), mor=dict(recursions=2))
    torch.manual_seed(0)
    model = HydraLM(cfg).double()
    model.set_features(mor=True, mod=True, moe=True, routing="teacher")
    fresh = copy.deepcopy(model)  # for the restore round trip below
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    xs = torch.randint(0, 64, (world, 3, 17), generator=g)
    doms = torch.randint(0, 4, (world, 3, 16), generator=g)
    # reference: one process, the mean of the per-rank losses
    sum(ref(xs[r, :, :-1], xs[r, :, 1:], doms[r]).loss for r in range(world)).div(world).backward()
    ddp = parallelize(model, experts=placement)
    out = ddp(xs[rank, :, :-1], xs[rank, :, 1:], doms[rank])
    out.loss.backward()
    inner = unwrap(ddp)
    ref_params = dict(ref.named_parameters())
    lo, L = expert_shard(num_experts, rank, world) if placement == "sharded" else (0, num_experts)
    checked = 0
    for name, p in inner.named_parameters():
        want = ref_params[name].grad
        if ".experts." in name:
            assert p.shape[0] == L, name
            want = None if want is None else want[lo : lo + L]
        if want is None:
            assert p.grad is None or torch.all(p.grad == 0), name
            continue
        torch.testing.assert_close(p.grad, want, msg=name, atol=1e-9, rtol=1e-7)
        checked += 1
    assert checked > 20
    full = gather_expert_state(ddp)
    for name, v in ref.state_dict().items():
        assert torch.equal(full[name], v), name

    # optimizer state: gathered to global expert order it is the one-process state ...
    env = Env(rank=rank, world=world)
    names = {id(p): n for n, p in ref.named_parameters()}
    ref_opt, opt = torch.optim.AdamW(ref.parameters()), torch.optim.AdamW(inner.parameters())
    ref_opt.step()
    opt.step()
    want_opt = ckpt.optimizer_tensors(ref_opt, names)
    got_opt = _gather_optimizer(inner, opt, env)
    assert sorted(got_opt) == sorted(want_opt)
    assert any(".experts." in k for k in got_opt)
    for key, v in want_opt.items():
        torch.testing.assert_close(got_opt[key], v, msg=key, atol=1e-12, rtol=1e-7)
    # ... and a fresh sharded model restored from that state gathers back to it exactly
    full = gather_expert_state(inner)
    if placement == "sharded":
        shard_experts(fresh)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    restore(fresh, fresh_opt, SimpleNamespace(model=full, optimizer=got_opt, trainer_state={}), env)
    for name, p in fresh.named_parameters():
        if ".experts." in name:
            assert p.shape[0] == L and torch.equal(p, full[name][lo : lo + L]), name
    again = gather_expert_state(fresh)
    assert all(torch.equal(again[k], v) for k, v in full.items())
    again_opt = _gather_optimizer(fresh, fresh_opt, env)
    assert sorted(again_opt) == sorted(got_opt) and all(torch.equal(again_opt[k], v) for k, v in got_opt.items())


def _worker(rank, world, port, checks):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for check, kwargs in checks:
            globals()[check](rank, world, **kwargs)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# world -> checks: even shards (4 and 8 over 2), uneven ones (3 over 2, 4 and 8 over 3), empty ones
# (4 over 6). A world of 4 shards evenly as 2 does: it is left out (7 s of the suite's 20 minutes)
CHECKS = {
    2: [("_check_dispatch", dict(expert_counts=(3, 4, 8))), ("_check_parallelize", dict(num_experts=4, top_k=2)),
        ("_check_parallelize", dict(num_experts=3, top_k=1)),
        ("_check_parallelize", dict(num_experts=4, top_k=2, placement="replicated"))],
    3: [("_check_dispatch", dict(expert_counts=(4, 8))), ("_check_parallelize", dict(num_experts=4, top_k=1)),
        ("_check_parallelize", dict(num_experts=4, top_k=2))],
    6: [("_check_dispatch", dict(expert_counts=(4,))), ("_check_parallelize", dict(num_experts=4, top_k=2))],
}


@pytest.mark.integration
@pytest.mark.parametrize("world", sorted(CHECKS))
def test_all_to_all_dispatch_matches_local_dispatch(world):
    mp.spawn(_worker, args=(world, _free_port(), CHECKS[world]), nprocs=world, join=True)
