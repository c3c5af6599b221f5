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
        # first token: at this ingress (request in -> first event back), its two parts in the model
        # replica (waiting to be prefilled, then the prefill forward), and the trip between the two
        seconds = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
        self.first_token = Histogram("hydra_time_to_first_token_seconds", "request in to the first token of each choice (the first byte out), at the ingress",
                                     ["model"], buckets=seconds, registry=self.registry)
        self.queue = Histogram("hydra_queue_seconds", "a sequence's wait in the model replica before its prefill",
                               ["model"], buckets=seconds, registry=self.registry)
        self.prefill = Histogram("hydra_prefill_seconds", "the prefill step (forward, cache copy, sampling) that gave a sequence its first token",
                                 ["model"], buckets=seconds, registry=self.registry)
        self.transport = Histogram("hydra_first_token_transport_seconds",
                                   "the first token's trip between the ingress and the model replica, one per request: from the "
                                   "ingress's call until the first event is back, less the replica's own time to produce it "
                                   "(Serve's routing, gRPC both ways, the replica's event loop before the request starts)",
                                   ["model"], buckets=seconds, registry=self.registry)
        self.batch = Histogram("hydra_batch_size", "requests served by one batched forward", ["kind"],
                               buckets=(1, 2, 4, 8, 16, 32), registry=self.registry)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def failed(self, request: Request, status: int) -> None:
        # unknown paths share one label: clients must not be able to grow the label set
        self.requests.labels(ENDPOINTS.get(request.url.path, "other"), str(status)).inc()
