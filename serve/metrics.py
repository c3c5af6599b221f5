"""The ingress's Prometheus metrics: one registry per ingress replica, served at /metrics."""

from starlette.requests import Request

ENDPOINTS = {"/v1/completions": "completions", "/v1/routing": "routing", "/v1/models": "models",
             "/v1/experts/stats": "experts_stats"}  # metric labels; every other path is "other"


class Metrics:
    """One ingress replica's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("hydra_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("hydra_request_seconds", "request latency", ["endpoint"], registry=self.registry)
        self.tokens = Counter("hydra_tokens", "tokens processed", ["model", "kind"], registry=self.registry)
        self.expert = Counter("hydra_expert_tokens", "tokens routed to each expert (all MoE layers)",
                              ["model", "expert"], registry=self.registry)
        self.batch = Histogram("hydra_batch_size", "requests served by one batched forward", ["kind"],
                               buckets=(1, 2, 4, 8, 16, 32), registry=self.registry)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def failed(self, request: Request, status: int) -> None:
        # unknown paths share one label: clients must not be able to grow the label set
        self.requests.labels(ENDPOINTS.get(request.url.path, "other"), str(status)).inc()
