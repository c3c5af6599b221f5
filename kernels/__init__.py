"""Triton token-dispatch kernels, each beside its plain-torch reference (installed as hydra_ray.kernels).

The kernels land with the kernels issue; until then the MoE layer dispatches with plain torch
(hydra_ray.parallel.dispatch.LocalDispatcher).
"""
