"""`hydra-ray bench dispatch`: the MoE token path against its natural baselines, side by side.

(i)  permute + combine: bytes they move per second, as a ratio to a plain copy of the same bytes
     (1.0 would mean dispatch runs at memory-copy speed);
(ii) one MoE layer (E experts, top-k) forward + backward against a dense SwiGLU FFN with the same
     *active* parameters (hidden k x F), on the same tokens: the price of routing.
CUDA tensors use the Triton kernels, CPU tensors the torch path (HYDRA_KERNELS overrides).
"""

from __future__ import annotations

import torch

from hydra_ray.benchmarks.common import compare
from hydra_ray import kernels
from hydra_ray.config import MoEConfig
from hydra_ray.models.moe import MoELayer, SwiGLU


def run(tokens: int = 4096, d_model: int = 256, hidden: int = 704, experts: int = 4, top_k: int = 1,
        device: str = "cpu", dtype: str = "float32", rounds: int = 15, log=print) -> dict:
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    T, D = tokens, d_model
    x = torch.randn(T, D, device=dev, dtype=dt)
    idx = torch.stack([torch.randperm(experts)[:top_k] for _ in range(T)]).to(dev)
    w = torch.rand(T, top_k, device=dev)
    routing = kernels.route(idx, experts)
    A = routing.num_rows
    elem = x.element_size()
    # permute reads A token rows and writes A rows; combine reads A rows and writes T rows
    moved = (2 * A + A + T) * D * elem
    src = torch.randn(moved // (2 * elem), device=dev, dtype=dt)  # a copy reads and writes: 2x bytes
    dst = torch.empty_like(src)

    def dispatch():
        kernels.combine(kernels.permute(x, routing), w, routing)

    def copy():
        dst.copy_(src)

    t = compare({"dispatch": dispatch, "copy": copy}, dev, rounds)
    bw = {"dispatch": moved / t["dispatch"], "copy": 2 * src.numel() * elem / t["copy"]}

    moe = MoELayer(D, hidden, MoEConfig(num_experts=experts, top_k=top_k), list(range(experts))).to(dev, dt)
    moe.enabled = True
    dense = SwiGLU(D, top_k * hidden).to(dev, dt)
    xm = torch.randn(T, D, device=dev, dtype=dt, requires_grad=True)

    def moe_step():
        moe(xm).y_ND.sum().backward()

    def dense_step():
        dense(xm).sum().backward()

    t2 = compare({"moe": moe_step, "dense": dense_step}, dev, rounds)
    backend = kernels.backend_for(x)
    res = {
        "backend": backend, "device": device, "dtype": dtype, "tokens": T, "d_model": D, "hidden": hidden,
        "experts": experts, "top_k": top_k,
        "dispatch_GBps": bw["dispatch"] / 1e9, "copy_GBps": bw["copy"] / 1e9,
        "dispatch_vs_copy": bw["dispatch"] / bw["copy"],
        "moe_ms": t2["moe"] * 1e3, "dense_ms": t2["dense"] * 1e3,
        "moe_vs_dense_time": t2["moe"] / t2["dense"],
    }
    log(f"dispatch bench ({backend} on {device}, {dtype}): {T} tokens x d {D}, {experts} experts top-{top_k}")
    log(f"  (i)  permute+combine {res['dispatch_GBps']:.2f} GB/s vs copy {res['copy_GBps']:.2f} GB/s "
        f"-> ratio {res['dispatch_vs_copy']:.2f}")
    log(f"  (ii) MoE fwd+bwd {res['moe_ms']:.1f} ms vs dense FFN (hidden {top_k * hidden}, same active params) "
        f"{res['dense_ms']:.1f} ms -> MoE/dense time {res['moe_vs_dense_time']:.2f}")
    return res
