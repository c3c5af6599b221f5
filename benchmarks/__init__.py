"""Benchmarks run by `hydra-ray bench NAME` (installed as hydra_ray.benchmarks).

Each one prints ratios measured side by side in the same run: these machines are shared and
noisy, so only ratios mean something on CPU; absolute times mean something on a GPU.
"""
