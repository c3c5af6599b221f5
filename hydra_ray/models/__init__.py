"""HYDRA model in plain torch (no Ray, no process groups): attention, MoE, MoD, MoR, HydraLM."""

from hydra_ray.models.attention import KVCache
from hydra_ray.models.hydra import HydraLM, HydraOutput, sample
from hydra_ray.models.trace import RoutingTrace

__all__ = ["HydraLM", "HydraOutput", "KVCache", "RoutingTrace", "sample"]
