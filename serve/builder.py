"""build_app: the Serve application from ServeArgs, an ingress in front of a model deployment, or
(`colocate`) one deployment, the ingress, whose replicas hold the model themselves.

`ingress_urls` lists the ingress replicas' own HTTP addresses (Serve's direct ingress); `take_down`
removes an app and, where this process started Ray itself, that Ray.

`serve run` / `serve deploy` call it through `import_path: hydra_ray.serve.builder:build_app`
(serve/config.yaml), `hydra-ray serve` directly: `serve.deployment(...).bind(...)` with every
option from ServeArgs, nothing fixed in decorators. Per-deployment options of a Serve config
file (num_replicas, user_config, ...) override what it sets.
"""

import os
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
    model_args = {"store": store.spec, "max_models_per_replica": a.max_models_per_replica,
                  "max_batch_size": a.max_batch_size, "batch_wait_timeout_s": a.batch_wait_timeout_s,
                  "torch_threads": a.torch_threads, "max_num_seqs": a.max_num_seqs,
                  "stream_interval": a.stream_interval}
    ingress_opts: dict[str, Any] = {"name": "HydraIngress", "ray_actor_options": {"num_cpus": 0},
                                    "max_ongoing_requests": 256, "user_config": {"default_model": default}}
    if a.colocate:  # one deployment: the ingress's replicas hold the engines, and scale as the model's would
        ingress_opts["ray_actor_options"] = model_opts["ray_actor_options"]
        ingress_opts.update({k: v for k, v in model_opts.items() if k in ("autoscaling_config", "num_replicas")})
        model = model_args
    else:
        model = serve.deployment(HydraModel, **model_opts).bind(**model_args)
    ingress = serve.deployment(make_ingress(a.ingress_settings()), **ingress_opts)
    return ingress.bind(model, store.spec)


def ingress_urls(app_name: str, host: str) -> list[str]:
    """The HTTP addresses the app's ingress replicas serve on themselves, in Serve's
    high-throughput mode (direct ingress; a load balancer such as Serve's HAProxy mode spreads
    traffic over them), else []. A request there skips Serve's Python proxy: on 2 cores, 16
    clients on /v1/routing get 1.7-2.7x the requests/s of the proxy's port. `host`: the HTTP
    host Serve was started with; a wildcard is replaced by each replica's node address."""
    import ray

    try:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        groups = ray.get(controller.get_target_groups.remote(app_name), timeout=30)
    except Exception:  # another Ray, or no controller: only the proxy's address is known
        return []
    # proxy target groups (direct ingress off, or no replica running yet) name no ingress deployment
    return sorted({f"http://{host if host not in ('0.0.0.0', '::') else t.ip}:{t.port}"
                   for g in groups if g.protocol == "HTTP" and g.ingress_deployment_name for t in g.targets})


def take_down(app_name: str) -> None:
    """Delete the app (its replicas drain). A shared cluster (RAY_ADDRESS) keeps Serve and its other
    applications; a local Ray goes down whole, which ends the controller and the proxy with it.
    (`serve.shutdown()` would have the controller kill itself mid-call, which Ray reports as a
    failed task.)"""
    serve.delete(app_name)
    if not os.environ.get("RAY_ADDRESS"):
        import ray

        ray.shutdown()
