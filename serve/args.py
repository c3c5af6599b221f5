"""ServeArgs: every option of the Serve application, validated before anything starts.

`hydra-ray serve` maps its flags onto it, `serve run`/`serve deploy` hand it the `args` of
serve/config.yaml through the builder (hydra_ray.serve.builder:build_app); nothing is fixed in
decorators. No torch, no Ray: the command line validates with it before Ray starts.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hydra_ray.serve.store import CheckpointStore


class ServeArgs(BaseModel):
    """Everything `hydra-ray serve`, `serve run` and `serve deploy` can set."""

    model_config = ConfigDict(extra="forbid")

    run: str | None = Field(None, description="run directory or URI: its checkpoints, default = newest")
    checkpoint: str | None = Field(None, description="one checkpoint directory or URI RUN/checkpoints/step_X")
    store: str | None = Field(None, description="folder or URI (s3://bucket/runs) of runs; with default_model")
    default_model: str | None = Field(None, description="RUN or RUN@STEP inside the store")
    api_key: str | None = Field(None, description="Bearer key for /v1 (default: $HYDRA_API_KEY)")
    max_prompt_tokens: int = Field(1024, ge=1)
    max_tokens: int = Field(256, ge=1, description="largest max_tokens a request may ask for")
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_models_per_replica: int = Field(3, ge=1)
    max_batch_size: int = Field(8, ge=1, description="routing traces per batched forward")
    max_num_seqs: int = Field(16, ge=1, description="sequences generating at once per model and replica; more wait")
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    stream_interval: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        "auto", description="tokens a streamed event carries after the first (vLLM's stream_interval): fewer "
        "messages and SSE chunks per sequence; the first token and the last are sent at once. auto: every "
        "token while the replica runs up to 4 sequences of the model, one more a message for each 4 more "
        "(16 running: 4 tokens a message), at most 8")
    replicas: int = Field(1, ge=1)
    autoscale: tuple[int, int] | None = None
    num_cpus: float = Field(1.0, ge=0, description="CPUs per model replica")
    torch_threads: int | None = Field(None, ge=1)
    colocate: bool = Field(False, description="run the model in the ingress's own replicas: no hop between "
                           "two processes per request; replicas and CPUs then apply to the ingress")

    @model_validator(mode="after")
    def _one_source(self):
        given = [n for n in ("run", "checkpoint", "store") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError("give exactly one of run, checkpoint or store (+ default_model)")
        if self.store and not self.default_model:
            raise ValueError("store needs default_model")
        if self.autoscale and not 1 <= self.autoscale[0] <= self.autoscale[1]:
            raise ValueError(f"autoscale {self.autoscale}: need 1 <= min <= max")
        return self

    def locate(self) -> tuple[CheckpointStore, str]:
        """The checkpoint store and the id of the default checkpoint (EngineError if absent)."""
        if self.run:
            store, default = CheckpointStore.for_run(self.run)
        elif self.checkpoint:
            store, default = CheckpointStore.for_checkpoint(self.checkpoint)
        else:
            store, default = CheckpointStore(self.store), self.default_model
        if self.default_model and not self.store:
            default = self.default_model
        return store, store.resolve(default).model_id

    def ingress_settings(self) -> dict:
        """What the ingress needs: the key and the request limits."""
        return {"api_key": self.api_key, "max_prompt_tokens": self.max_prompt_tokens,
                "max_tokens": self.max_tokens, "max_body_bytes": self.max_body_bytes}
