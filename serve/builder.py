"""build_app: the Serve application from ServeArgs, an ingress in front of a model deployment.

`serve run` / `serve deploy` call it through `import_path: hydra_ray.serve.builder:build_app`
(serve/config.yaml), `hydra-ray serve` directly: `serve.deployment(...).bind(...)` with every
option from ServeArgs, nothing fixed in decorators. Per-deployment options of a Serve config
file (num_replicas, user_config, ...) override what it sets.
"""

from typing import Any

from ray import serve

from hydra_ray.serve.args import ServeArgs
from hydra_ray.serve.ingress import make_ingress
from hydra_ray.serve.model import HydraModel


def build_app(args: ServeArgs | dict) -> serve.Application:
    """The application: `HydraIngress` (HTTP, validation, metrics) bound to `HydraModel`
    (multiplexed checkpoints, batched forwards); the default checkpoint is the ingress's
    `user_config`, so deploying with another one hot-swaps."""
    a = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args or {})
    store, default = a.locate()
    model_opts: dict[str, Any] = {
        "name": "HydraModel",
        "ray_actor_options": {"num_cpus": a.num_cpus},
        "max_ongoing_requests": max(16, 4 * a.max_batch_size, 2 * a.max_num_seqs),
    }
    if a.autoscale:
        model_opts["autoscaling_config"] = {"min_replicas": a.autoscale[0], "max_replicas": a.autoscale[1],
                                            "target_ongoing_requests": a.max_batch_size}
    else:
        model_opts["num_replicas"] = a.replicas
    model = serve.deployment(HydraModel, **model_opts).bind(
        store.spec, a.max_models_per_replica, a.max_batch_size, a.batch_wait_timeout_s, a.torch_threads,
        a.max_num_seqs)
    ingress = serve.deployment(make_ingress(a.ingress_settings()), name="HydraIngress",
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256,
                               user_config={"default_model": default})
    return ingress.bind(model, store.spec)
