"""The serving engine: checkpoint -> batched generation with the KV cache, and routing traces.
No Ray here: the Serve model deployment (model.py) wraps it, tests drive it directly.

Design choices
- Loading reads safetensors and JSON/YAML only, verified against the checkpoint's manifest; the
  optimizer state is never read. The config stored in the checkpoint rebuilds the model and its
  tokenizer; the feature switches (MoR/MoD/MoE, routing mode) come back with the weights. Which
  checkpoints exist and where they lie is the store's business (store.py); weights are streamed
  into memory once (checkpoint.read_for_inference); nothing is copied to a temporary folder.
- The request rules that depend on the model (a known domain, prompt + completion within the
  context) are one function each (`check_domain`, `check_context`): the ingress calls them
  before queueing any work, the engine again for callers that skip the ingress.
- Generation is batched across requests of different lengths and sampling settings (decode.py's
  Decoder): every forward is packed, prompts and single new tokens of several sequences in one
  batch row, each token at its own position in its own cache row. Every routing decision at
  generation is causal and per token, so a sequence's tokens do not depend on the others'; each
  samples from its own seeded generator, so the same seed gives the same text. This is the one
  decoder: the model itself has none.
- Generation is a generator of per-step events, so streaming and non-streaming requests share
  one path. Stop strings are matched on the decoded text; text that could still become a stop
  string is held back from the stream until it cannot.
- Routing statistics come from the forward's RoutingTrace (hydra_ray.models.trace), the one
  source training uses too: expert load per MoE layer of every forward (prompt and generated
  tokens, routing requests) is returned with each result; the ingress keeps the running totals.
- Device: the model runs where `device` says (default: CUDA when there is one, else the CPU),
  in `dtype` if given. Token ids are built on the CPU and moved once per forward; the logits
  of the B sampled positions come back to the CPU, where each row's seeded generator samples,
  so the same seed gives the same text on either device (up to the logits' own rounding).

Shape legend: B batch, T sequence, E experts.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Iterable, Iterator

import torch

from hydra_ray import checkpoint as ckpt
from hydra_ray import storage
from hydra_ray.config import HydraConfig
from hydra_ray.data.tokenizer import load_tokenizer
from hydra_ray.models import HydraLM
from hydra_ray.serve.decode import Decoder, GenEvent, GenRequest, logprob_entry
from hydra_ray.serve.errors import EngineError
from hydra_ray.serve.store import CheckpointStore

log = logging.getLogger(__name__)


def context_of(cfg: HydraConfig) -> int:
    """Longest prompt + completion served: RoPE positions extrapolate, but quality beyond a few
    training lengths is not worth the memory of the cache."""
    return 8 * cfg.model.seq_len


# --------------------------------------------------------------------------- request rules
def check_domain(domains: Iterable[str], domain: str | None) -> int | None:
    """The index of `domain` among the model's domains (None for none); EngineError(400) if unknown."""
    if domain is None:
        return None
    domains = list(domains)
    if domain not in domains:
        raise EngineError(400, f"unknown domain {domain!r}; this model knows {domains}")
    return domains.index(domain)


def check_context(n_tokens: int, context: int, max_tokens: int | None = None) -> None:
    """`n_tokens` (a prompt, plus `max_tokens` to generate when given) must fit the model's context;
    EngineError(413) if not."""
    if max_tokens is None:
        if n_tokens > context:
            raise EngineError(413, f"{n_tokens} tokens exceed the model's context of {context}")
    elif n_tokens + max_tokens > context:
        raise EngineError(413, f"{n_tokens} prompt tokens + max_tokens {max_tokens} exceed "
                               f"the model's context of {context}")


# --------------------------------------------------------------------------- engine
class Engine:
    def __init__(self, model: HydraLM, cfg: HydraConfig, model_id: str = "model", step: int = 0,
                 max_context: int | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device, dtype).eval()
        self.cfg = cfg
        self.model_id, self.step = model_id, step
        self.tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_sha256)
        self.domains = list(cfg.model.domains)
        self.domain_expert = model.domain_to_expert
        self.num_experts = cfg.model.moe.num_experts
        self.max_context = max_context or context_of(cfg)
        self.pad_id = self.tokenizer.pad_id
        # what to run before each block application of a forward on this thread (between_blocks).
        # The hook holds the thread-local, not the engine: an engine is then in no reference cycle,
        # and one the multiplexer lets go is freed at once, frozen heap or not (serve/heap.py)
        self._between = between = threading.local()

        def before_block(module, args) -> None:
            fn = getattr(between, "fn", None)
            if fn is not None:
                fn()

        for unit in self.model.units:
            unit.block.register_forward_pre_hook(before_block)

    @property
    def block_applications(self) -> int:
        """Block applications of a forward in which every token runs every block and recursion."""
        return sum(1 + len(u.mor_routers) if u.mor_on else 1 for u in self.model.units)

    @contextlib.contextmanager
    def between_blocks(self, fn):
        """Inside this `with`, on this thread, `fn()` runs before each application of a model block
        in a forward. The continuous batch looks there for newcomers that could join the forward."""
        before, self._between.fn = getattr(self._between, "fn", None), fn
        try:
            yield
        finally:
            self._between.fn = before

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_checkpoint(cls, path: str | Path, model_id: str | None = None, **kw) -> "Engine":
        """An engine for the checkpoint at `path` (a local folder or a URI); `kw`: max_context,
        device, dtype."""
        try:
            loaded = ckpt.read_for_inference(str(path))  # streamed into memory, no temporary copy
            cfg = ckpt.inference_config(str(path), loaded.config_yaml)
            model = HydraLM(cfg.model)
            model.load_state_dict(loaded.model)  # feature switches come back with the weights
            return cls(model, cfg, model_id or storage.name(str(path)), loaded.step, **kw)
        except Exception as e:  # corrupt files, a config or weights that do not fit, a missing tokenizer
            raise EngineError(404, f"checkpoint {path} cannot be served: {e}") from None

    @staticmethod
    def check(path: str | Path) -> None:
        """What loading needs, without reading the weights or building the model: files of the
        sizes the manifest records, a config that parses, a tokenizer that loads (and matches its
        hash). The replica verifies the weights' checksums as it loads them. Raises EngineError."""
        try:
            config_yaml = ckpt.check_sizes(str(path))  # its errors name the checkpoint
        except ValueError as e:
            raise EngineError(400, str(e)) from None
        try:
            cfg = ckpt.inference_config(str(path), config_yaml)
            load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_sha256)
        except ValueError as e:  # ConfigError included
            raise EngineError(400, f"checkpoint {path} cannot be served: {e}") from None

    @classmethod
    def from_store(cls, store: CheckpointStore, model_id: str, **kw) -> "Engine":
        ref = store.resolve(model_id)
        return cls.from_checkpoint(ref.path, ref.model_id, **kw)

    @property
    def info(self) -> dict:
        return {"id": self.model_id, "step": self.step, "features": self.model.features,
                "domains": self.domains, "num_experts": self.num_experts,
                "domain_expert": dict(zip(self.domains, self.domain_expert)),
                "tokenizer": self.tokenizer.name, "max_context": self.max_context}

    # ----------------------------------------------------------------- text
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode_batch([text])[0]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def domain_id(self, domain: str | None) -> int | None:
        return check_domain(self.domains, domain)

    # ----------------------------------------------------------------- routing traces
    @staticmethod
    def _rows(trace, valid_BT: torch.Tensor) -> list[dict[str, list[int]]]:
        """Each row's tokens per expert and MoE layer, over its valid positions (the serving
        layer keeps the running totals, across replicas' answers)."""
        by_layer = trace.expert_counts_by_layer(valid_BT, by_row=True)  # layer -> [B, E]
        return _per_row({k: c_BE.tolist() for k, c_BE in by_layer.items()}, valid_BT.shape[0])

    @torch.inference_mode()
    def trace_ids(self, batch: list[list[int]], domains: list[str | None] | None = None) -> list[dict]:
        """Per-token routing of several token sequences in one forward (right-padded; causal
        routing makes every row independent of the others)."""
        domains = domains or [None] * len(batch)
        dom_ids = [self.domain_id(d) for d in domains]
        lens = [len(ids) for ids in batch]
        for n in lens:
            check_context(n, self.max_context)
        if not batch:
            return []
        B, T = len(batch), max(max(lens), 1)
        idx_BT = torch.full((B, T), self.pad_id, dtype=torch.long)
        dom_BT = torch.full((B, T), -1, dtype=torch.long)
        for b, ids in enumerate(batch):
            idx_BT[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            if dom_ids[b] is not None:
                dom_BT[b] = dom_ids[b]
        valid_BT = torch.arange(T)[None, :] < torch.tensor(lens)[:, None]
        dom = dom_BT.to(self.device) if any(d is not None for d in dom_ids) else None
        trace = self.model.trace(idx_BT.to(self.device), dom).trace
        counts = self._rows(trace, valid_BT)
        out = []
        for b in range(B):
            hits = None
            if dom_ids[b] is not None:  # this row's tokens only: the other rows have their own domain
                row_BT = valid_BT & (torch.arange(B) == b)[:, None]
                hits = trace.domain_expert_hits(dom_BT, self.domain_expert, row_BT)
            out.append(self._routing_json(trace, b, batch[b], dom_ids[b], counts[b], hits))
        return out

    def trace_text(self, text: str, domain: str | None = None) -> dict:
        return self.trace_ids([self.encode(text)], [domain])[0]

    def _routing_json(self, trace, row: int, ids: list[int], dom: int | None,
                      by_layer: dict[str, list[int]], hits: tuple[int, int] | None) -> dict:
        per_token = trace.tokens(row, len(ids)) if ids else []
        # a checkpoint with every feature off records nothing: its tokens still get (empty) records
        per_token += [{"moe": {}, "mod": {}, "mor": {}} for _ in range(len(ids) - len(per_token))]
        tokens = [{"index": i, "id": t, "text": self.piece(t), **rec} for i, (t, rec) in enumerate(zip(ids, per_token))]
        by_layer = {k: c for k, c in by_layer.items() if any(c)}  # the layers this text ran
        counts_E = torch.tensor(list(by_layer.values())).sum(0) if by_layer else torch.zeros(self.num_experts)
        total, fraction = int(counts_E.sum()), trace.fractions(counts_E)
        experts = [{"expert": e, "tokens": int(counts_E[e]), "fraction": fraction[e],
                    "domain": next((d for d, x in zip(self.domains, self.domain_expert) if x == e), None)}
                   for e in range(self.num_experts)]
        # per domain: how much of this text went to the expert that domain was trained onto
        domains = {d: {"expert": x, "fraction": fraction[x] if x >= 0 else 0.0}
                   for d, x in zip(self.domains, self.domain_expert)}
        mod = [r["selected"] for rec in tokens for r in rec["mod"].values()]
        mor = [v for rec in tokens for v in rec["mor"].values()]
        summary = {
            "tokens": len(ids),
            "experts": experts,
            "expert_tokens_by_layer": by_layer,
            "domains": domains,
            "closest_domain": max(domains, key=lambda d: domains[d]["fraction"]) if total and domains else None,
            "mod_selected_frac": sum(mod) / len(mod) if mod else None,
            "mor_mean_depth": sum(mor) / len(mor) if mor else None,
        }
        if dom is not None:
            hit, tot = hits
            summary["domain"] = self.domains[dom]
            summary["domain_expert_agreement"] = hit / tot if tot else None
        return {"model": self.model_id, "step": self.step, "features": self.model.features,
                "moe_layers": sorted(by_layer) or trace.moe_layers(), "tokens": tokens, "summary": summary}

    # ----------------------------------------------------------------- generation
    def check_request(self, req: GenRequest) -> None:
        if not req.prompt_ids:
            raise EngineError(400, "the prompt is empty")
        if req.max_tokens < 1:
            raise EngineError(400, "max_tokens must be at least 1")
        check_context(len(req.prompt_ids), self.max_context, req.max_tokens)
        self.domain_id(req.domain)

    def _forward(self, idx_BT: torch.Tensor, dom_BT: torch.Tensor | None, at: tuple[torch.Tensor, torch.Tensor],
                 cache=None, start_pos: torch.Tensor | int = 0):
        """One causal forward on the engine's device -> (its output, the logits at the positions
        `at` (batch rows, columns), on the CPU in float32: sampling and stop handling are per
        sequence, on the host)."""
        dev = self.device
        out = self.model(idx_BT.to(dev), domain_BT=None if dom_BT is None else dom_BT.to(dev), causal=True,
                         cache=cache, start_pos=start_pos, return_trace=True)
        return out, out.logits[at[0].to(dev), at[1].to(dev)].float().cpu()

    def _groups(self, trace, seq_T: torch.Tensor, n: int) -> list[dict[str, list[int]]]:
        """A packed forward's counts per sequence: tokens per expert and MoE layer of the
        positions `seq_T` assigns to each of the `n` sequences (its one batch row)."""
        by_layer = trace.expert_counts_by_group(seq_T[None, :] == torch.arange(n)[:, None])
        return _per_row({k: c_nE.tolist() for k, c_nE in by_layer.items()}, n)

    @staticmethod
    def _prompt_logprobs(logits_TV: torch.Tensor, ids: list[int], top: int) -> list[list | None]:
        """Each prompt token's entry under the model's prediction from the tokens before it."""
        n = len(ids)
        lp_TV = logits_TV[: n - 1].float().log_softmax(-1).cpu()
        return [None] + [logprob_entry(lp_TV[i], ids[i + 1], top) for i in range(n - 1)]

    def generate(self, reqs: list[GenRequest], use_cache: bool = True) -> Iterator[list[GenEvent | None]]:
        """Decode a batch of requests together (decode.Decoder, all admitted at once); yields, per
        forward (the prefill, then each decode step), one event per request (None for those that
        finished earlier). Every request ends with an event that carries its finish reason."""
        dec = Decoder(self, max(1, len(reqs)), use_cache)
        rows = [dec.submit(r) for r in reqs]
        index = {id(r): i for i, r in enumerate(rows)}
        while dec.busy:
            events = dec.step()
            if events:
                out: list[GenEvent | None] = [None] * len(rows)
                for row, ev in events:
                    out[index[id(row)]] = ev
                yield out

    def complete(self, reqs: list[GenRequest], use_cache: bool = True) -> list[dict]:
        """Run `generate` to the end: per request its text, token ids and finish reason."""
        res = [{"text": "", "token_ids": [], "finish_reason": None} for _ in reqs]
        for events in self.generate(reqs, use_cache):
            for r, ev in zip(res, events):
                if ev is not None:
                    r["text"] += ev.text
                    r["token_ids"] += ev.token_ids
                    r["finish_reason"] = ev.finish_reason or r["finish_reason"]
        return res


def _per_row(by_layer: dict[str, list[list[int]]], n: int) -> list[dict[str, list[int]]]:
    """layer -> [n][E] counts (one `tolist` per layer) as each row's layer -> [E]."""
    return [{k: c[i] for k, c in by_layer.items()} for i in range(n)]


__all__ = ["Engine", "GenEvent", "GenRequest", "check_context", "check_domain", "context_of"]
