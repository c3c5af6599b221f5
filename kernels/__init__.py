"""MoE token-dispatch ops (installed as `hydra_ray.kernels`): route, permute, combine.

Three layers, as in scattermoe / megablocks:
- kernels/triton_dispatch.py: the `@triton.jit` kernels and launchers that check their inputs;
- here: `torch.autograd.Function`s whose backward passes are themselves dispatch kernels
  (the backward of permute is an unweighted combine; the backward of combine is a scaled permute
  plus a per-slot dot product for the gates);
- the module that uses them: the MoE layer's `LocalDispatcher` (hydra_ray/parallel/dispatch.py).

Backend: Triton for CUDA tensors, the plain-torch reference (kernels/torch_dispatch.py) otherwise.
`HYDRA_KERNELS=triton|torch` overrides (`triton` on CPU tensors needs `TRITON_INTERPRET=1`).
float64 tensors always take the torch path (the kernels accumulate in float32).

Shape legend: T tokens, K top-k, A kept rows, D hidden, E experts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import torch

from hydra_ray.kernels import torch_dispatch
from hydra_ray.timing import TIMERS

BACKENDS = ("auto", "triton", "torch")


def _triton_module() -> ModuleType | None:
    try:
        from hydra_ray.kernels import triton_dispatch
    except ImportError:  # no triton on this platform: the torch path still works
        return None
    return triton_dispatch


def backend_for(t: torch.Tensor) -> str:
    choice = os.environ.get("HYDRA_KERNELS", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"HYDRA_KERNELS must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "auto":
        return "triton" if t.is_cuda and _triton_module() is not None else "torch"
    if choice == "triton" and _triton_module() is None:
        raise RuntimeError("HYDRA_KERNELS=triton but triton cannot be imported")
    return choice


def _impl(t: torch.Tensor) -> ModuleType:
    # float64 (gradient checks) always takes the torch path: the kernels accumulate in float32
    if t.dtype == torch.float64:
        return torch_dispatch
    return _triton_module() if backend_for(t) == "triton" else torch_dispatch


@dataclass
class Routing:
    """Where every top-k slot goes: `dest_TK` row in the expert-contiguous buffer (-1 dropped)."""

    counts_E: torch.Tensor
    offsets_E: torch.Tensor
    dest_TK: torch.Tensor
    num_rows: int
    slot_A: torch.Tensor | None = None  # torch path: the slot that fills each row (from route's sort)

    @property
    def counts(self) -> list[int]:
        return self.counts_E.tolist()


def route(idx_TK: torch.Tensor, num_experts: int) -> Routing:
    """Histogram, offsets and destination rows from top-k expert ids (-1 = dropped slot)."""
    impl = _impl(idx_TK)
    with TIMERS.section("dispatch"):
        if impl is torch_dispatch:
            counts, offsets, dest, slot_A = impl.route(idx_TK.contiguous(), num_experts, with_slots=True)
            return Routing(counts, offsets, dest, int(slot_A.shape[0]), slot_A)
        counts, offsets, dest = impl.route(idx_TK.contiguous(), num_experts)
        return Routing(counts, offsets, dest, int(counts.sum()))


def _slots(impl: ModuleType, routing: "Routing | None") -> dict:
    """The torch path's row -> slot map when route made it (the Triton kernels need none)."""
    return {"slot_A": routing.slot_A} if impl is torch_dispatch and routing is not None and routing.slot_A is not None \
        else {}


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, dest_TK, num_rows, impl, routing=None):
        ctx.save_for_backward(dest_TK)
        ctx.impl = impl
        return impl.permute(x_TD.contiguous(), dest_TK, num_rows, **_slots(impl, routing))

    @staticmethod
    def backward(ctx, g_AD):
        (dest_TK,) = ctx.saved_tensors
        with TIMERS.section("dispatch"):
            return ctx.impl.gather_sum(g_AD.contiguous(), dest_TK), None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_AD, w_TK, dest_TK, impl, routing=None):
        y_AD, w_TK = y_AD.contiguous(), w_TK.contiguous()
        ctx.save_for_backward(y_AD, w_TK, dest_TK)
        ctx.impl, ctx.routing = impl, routing
        return impl.gather_sum(y_AD, dest_TK, w_TK)

    @staticmethod
    def backward(ctx, g_TD):
        y_AD, w_TK, dest_TK = ctx.saved_tensors
        with TIMERS.section("dispatch"):
            g_TD = g_TD.contiguous()
            slots = _slots(ctx.impl, ctx.routing)
            if slots:  # torch path with route's row -> slot map: one gather of g serves both gradients
                gy, gw = ctx.impl.combine_backward(g_TD, y_AD, w_TK, slots["slot_A"], *ctx.needs_input_grad[:2])
                return gy, gw, None, None, None
            gy = ctx.impl.permute(g_TD, dest_TK, y_AD.shape[0], w_TK) if ctx.needs_input_grad[0] else None
            gw = ctx.impl.slot_dot(g_TD, y_AD, dest_TK, w_TK.dtype) if ctx.needs_input_grad[1] else None
        return gy, gw, None, None, None


def permute(x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Token rows -> expert-contiguous rows (each token once per kept top-k slot). Differentiable."""
    with TIMERS.section("dispatch"):
        impl = _impl(x_TD)
        if not torch.is_grad_enabled():  # generation: no autograd node to build
            return impl.permute(x_TD.contiguous(), routing.dest_TK, routing.num_rows, **_slots(impl, routing))
        return _Permute.apply(x_TD, routing.dest_TK, routing.num_rows, impl, routing)


def combine(y_AD: torch.Tensor, w_TK: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Expert rows -> token rows, weighted by the gates. Differentiable in both inputs."""
    with TIMERS.section("dispatch"):
        impl = _impl(y_AD)
        if not torch.is_grad_enabled():
            return impl.gather_sum(y_AD.contiguous(), routing.dest_TK, w_TK.contiguous())
        return _Combine.apply(y_AD, w_TK, routing.dest_TK, impl, routing)


__all__ = ["Routing", "backend_for", "combine", "permute", "route"]
