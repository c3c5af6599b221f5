"""Ray Serve application for HYDRA checkpoints (installed as hydra_ray.serve).

Modules, lowest first: errors (EngineError, ApiError), store (which checkpoints exist, where),
engine (no Ray: a checkpoint -> batched generation and routing traces), args (ServeArgs),
bodies (the HTTP request bodies), metrics (Prometheus), model (the HydraModel deployment),
ingress (the HydraIngress deployment: HTTP), builder (build_app, the `serve run` import path
hydra_ray.serve.builder:build_app), cli (`hydra-ray serve`).
"""
