"""Ray Serve application for HYDRA checkpoints (installed as hydra_ray.serve).

Modules, lowest first: errors (EngineError, ApiError), store (which checkpoints exist, where),
decode (no Ray: requests, events, the continuous batch), engine (no Ray: a checkpoint ->
generation and routing traces), scheduler (a decode thread per engine, fed from asyncio),
args (ServeArgs), bodies (the HTTP request bodies), shapes (OpenAI response shapes), metrics
(Prometheus), model (the HydraModel deployment), generation (the completions and chat
endpoints), ingress (the HydraIngress deployment: HTTP), builder (build_app, the `serve run`
import path hydra_ray.serve.builder:build_app), cli (`hydra-ray serve`).
"""
