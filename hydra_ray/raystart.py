"""Starting or joining Ray, and keeping its console chatter down: what `train`, `tune`, `serve`,
`data pack` and the benchmarks share (below train/ and serve/, which both import it)."""

from __future__ import annotations

import os

_QUIET = False  # set by quiet_ray: whether Ray's console chatter is to be kept off


def quiet_ray(verbose: bool = False) -> None:
    """Keep Ray's start-up and progress chatter (auth notices, Ray Data's and Serve's INFO lines,
    deprecation warnings of Ray's own internals) off the console unless --verbose; errors still
    show, and Ray's log files under its session folder keep everything. Ray (re)configures its
    loggers when its libraries load and when Serve starts, so `ray_init` and the serve command
    apply this again after those points."""
    import logging
    import warnings

    global _QUIET
    _QUIET = not verbose
    if verbose:
        return
    logging.getLogger("ray").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    import ray.data  # noqa: F401  (configures the ray.data logger, which does not propagate)

    for name in ("ray", "ray.data", "ray.serve", "ray.train", "ray.tune"):
        for h in logging.getLogger(name).handlers:
            if not isinstance(h, logging.FileHandler):
                h.setLevel(logging.ERROR)


def requiet() -> None:
    """Apply `quiet_ray` again if it is on (after Ray reconfigured its loggers)."""
    if _QUIET:
        quiet_ray()


def ray_init(log=print, min_cpus: float = 0) -> None:
    """Join RAY_ADDRESS's cluster, else start a local Ray. Locally, declare at least `min_cpus`
    logical CPUs: Ray Data's map tasks need a CPU beside the train workers, or they wait forever."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # reports wait for the Train controller's poll: poll faster than the 2 s default (local runs)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # Serve's high-throughput mode (Ray >= 2.56; read by the controller, proxies and replicas that a
    # local Ray starts with this environment): user code on the replica's own event loop, direct
    # ingress and gRPC between deployments. On 2 cores, 16 streaming clients get 1.3-1.4x the
    # tokens/s and /v1/routing 1.4x the requests/s (`hydra-ray bench serve`). A cluster sets it
    # where `ray start` runs (cluster.yaml).
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    # ...whose proxy still sends HTTP to the ingress as actor calls (Ray 2.60 derives the proxy's
    # flag before the mode turns gRPC on): say it. /v1/routing with 16 clients 99 -> 119 req/s.
    os.environ.setdefault("RAY_SERVE_PROXY_USE_GRPC", "1")
    # ...whose ingress replicas stay up 30 s after a shutdown or delete, for a load balancer to take
    # them out: a local Ray has none (Ctrl-C on `hydra-ray serve` waited that long). A cluster's
    # replicas take theirs from where `ray start` ran.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    if ray.is_initialized():
        return
    requiet()
    if os.environ.get("RAY_ADDRESS"):  # a cluster (set by `ray job submit`, or by the user)
        ray.init(log_to_driver=False, configure_logging=False)
    else:  # an embedded local Ray: never a stale `ray start` left on this machine
        cpus = max(os.cpu_count() or 1, int(min_cpus + 0.999))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
