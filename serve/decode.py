"""Decoding: requests, events, each sequence's state, and `Decoder`, continuous batching.

Design choices
- Iteration-level scheduling (Orca, vLLM): sequences join and leave the running batch at token
  boundaries. Each `step()` first admits waiting sequences into free rows, prefilling them
  together (one right-padded forward into a cache of their own, whose rows are then copied into
  the running cache) and emitting their first tokens, then decodes one token for every running
  sequence in one forward over the rows in use. A long generation never holds a short one back,
  and a sequence that arrives mid-generation waits for at most one block of the decode forward
  then running before its prefill (the scheduler admits it between two blocks of that forward, and
  sends first tokens before the next decode forward).
- At most `max_num_seqs` sequences run; the rest wait in arrival order. A cancelled sequence (a
  client that left) gives its row back at once.
- The KV cache has one row per running slot, each with its own positions (`KVCache.rows` views
  of the rows in use); a newcomer's row is replaced whole by its prefill. Every routing decision
  at generation is causal and per token, so a sequence does not depend on its batch-mates: the
  continuous batch gives the tokens decoding one request at a time gives (up to the float noise of
  differently shaped matmuls, which can flip a near-tie).
- Without the cache (`use_cache=False`, the reference the benchmarks compare against) each step
  recomputes the running sequences from their first token, right-padded into one batch.
- Forwards run in `torch.inference_mode`: the decode thread would otherwise record autograd
  graphs (a 16-row decode step took about a quarter longer). The KV cache is then made of
  inference tensors, so what edits it (the prefill, with `keep_prefix` and `take_rows`, and the
  decode) runs in that mode.
- Sampling is per sequence on the host with its own seeded generator: the same seed gives the
  same text. Penalties and logit bias adjust the logits before sampling; logprobs report the
  model's own log-softmax.

Shape legend: B rows, T tokens, V vocabulary.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hydra_ray.models.attention import KVCache
from hydra_ray.models.hydra import sample

if TYPE_CHECKING:
    from hydra_ray.serve.engine import Engine


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    domain: str | None = None
    logprobs: int | None = None  # None: none; N (0-5): each token's logprob and the N most likely
    prompt_logprobs: bool = False  # the prompt's tokens too (echo): on the first event
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted per earlier occurrence in the completion
    logit_bias: dict[int, float] | None = None  # added to those tokens' logits before sampling


@dataclass
class GenEvent:
    """What one row produced at one decode step: new text to emit (possibly empty while a stop
    string may be forming) and, on the last event, the finish reason."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length"
    expert_counts: dict[str, list[int]] | None = None  # on the last event: this request's expert load
    # with GenRequest.logprobs: per token of token_ids, [logprob, [[token, logprob], ...] (top N)]
    logprobs: list[list] | None = None
    # with GenRequest.prompt_logprobs, on the first event: the same per prompt token (None for the first)
    prompt_logprobs: list[list | None] | None = None
    # on the first event: seconds from submit to the start of the prefill forward (waiting for the
    # forward then running, or for a free row), and that prefill (the newcomers' forward, sampling)
    queue_s: float | None = None
    prefill_s: float | None = None


class _Row:
    """Decoding state of one sequence (request)."""

    def __init__(self, req: GenRequest, tokenizer):
        self.req, self.tok = req, tokenizer
        self.seq: list[int] = list(req.prompt_ids)  # prompt + completion: what the model has seen
        self.slot: int | None = None  # the decoder's row, while running
        self.arrived = time.perf_counter()  # Decoder.submit may set when the request really came
        self.dom: int | None = None
        self.ids: list[int] = []
        self.emitted = 0  # characters of the completion already sent
        self.done = False
        self.counts: dict[str, list[int]] = {}  # MoE layer -> tokens per expert (prompt + completion)
        self.seen: dict[int, int] = {}  # completion token -> occurrences (the penalties)
        self.gen = torch.Generator()
        if req.seed is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(req.seed % 2**63)  # any integer seeds; the same one gives the same text

    def pick(self, logits_1V: torch.Tensor) -> tuple[int, list | None]:
        """Sample the next token from the model's logits (after penalties and bias, and never an id
        that is no text: padding, or past the tokenizer's vocabulary), and its logprob entry, which
        reports the model's own distribution (log-softmax of the raw logits)."""
        req, adjusted = self.req, logits_1V.clone()
        adjusted[0, self.tok.vocab_size:] = -math.inf  # ids past the tokenizer's (a padded vocabulary) are no text
        if self.tok.pad_id != self.tok.eos_id and 0 <= self.tok.pad_id < adjusted.shape[-1]:
            adjusted[0, self.tok.pad_id] = -math.inf  # nor is padding
        if self.seen and (req.presence_penalty or req.frequency_penalty):
            ids = torch.tensor(list(self.seen))
            n = torch.tensor(list(self.seen.values()), dtype=adjusted.dtype)
            adjusted[0, ids] -= req.presence_penalty + req.frequency_penalty * n
        for t, b in (req.logit_bias or {}).items():
            if 0 <= t < adjusted.shape[-1]:
                adjusted[0, t] += b
        token = int(sample(adjusted, req.temperature, req.top_k, req.top_p, self.gen))
        self.seen[token] = self.seen.get(token, 0) + 1
        if req.logprobs is None:
            return token, None
        return token, logprob_entry(logits_1V[0].log_softmax(-1), token, req.logprobs)

    def add(self, token: int) -> GenEvent:
        if token == self.tok.eos_id:
            self.done = True
            return self._flush(self._text(), "stop")
        self.ids.append(token)
        text = self._text()
        for s in self.req.stop:
            at = text.find(s)
            if at >= 0:
                self.done = True
                return self._flush(text[:at], "stop")
        if len(self.ids) >= self.req.max_tokens:
            self.done = True
            return self._flush(text, "length")
        # hold back a tail that may be the start of a stop string, and a split UTF-8 character
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        for s in self.req.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._flush(text[:safe], None)

    def _text(self) -> str:
        return self.tok.decode(self.ids)

    def _flush(self, text: str, reason: str | None) -> GenEvent:
        new = text[self.emitted:] if len(text) > self.emitted else ""
        self.emitted = max(self.emitted, len(text))
        return GenEvent(new, [], reason)


def logprob_entry(lp_V: torch.Tensor, token: int, top: int) -> list:
    """[logprob of `token`, [[token, logprob] of the `top` most likely]] from log-probabilities."""
    vals, ids = lp_V.topk(min(top, lp_V.shape[-1])) if top else (lp_V[:0], lp_V[:0].long())
    return [float(lp_V[token]), [[int(i), float(v)] for i, v in zip(ids.tolist(), vals.tolist())]]


class Decoder:
    """Continuous batching over one engine: `submit`, then `step` until `busy` is False."""

    def __init__(self, engine: "Engine", max_num_seqs: int = 16, use_cache: bool = True):
        self.engine = engine
        self.slots: list[_Row | None] = [None] * max_num_seqs
        self.waiting: deque[_Row] = deque()
        self.cache = KVCache(max_num_seqs, engine.max_context) if use_cache else None
        # newcomers prefilled during a decode forward: (their cache, [(its row, their slot)]), moved
        # into the running cache once that forward is done with it
        self._staged: list[tuple[KVCache, list[tuple[int, int]]]] = []
        self._decoding = False  # a decode forward is running: newcomers' rows wait in _staged

    def empty(self) -> "Decoder":
        """A new decoder with this one's settings and nothing in it (a batch that starts over)."""
        return Decoder(self.engine, len(self.slots), self.cache is not None)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.slots)

    def submit(self, req: GenRequest, arrived: float | None = None) -> "_Row":
        """Queue a request; `arrived` (time.perf_counter) when it reached the caller, if earlier."""
        self.engine.check_request(req)
        row = _Row(req, self.engine.tokenizer)
        if arrived is not None:
            row.arrived = arrived
        row.dom = self.engine.domain_id(req.domain)
        self.waiting.append(row)
        return row

    def cancel(self, row: "_Row") -> None:
        row.done = True
        if row in self.waiting:
            self.waiting.remove(row)
        self._free(row)

    def _free(self, row: "_Row") -> None:
        if row.slot is not None and self.slots[row.slot] is row:
            self.slots[row.slot] = None
        row.slot = None

    def step(self) -> list[tuple["_Row", GenEvent]]:
        """One iteration: `admit` (the first token of each newly admitted sequence), then `decode`
        (a token for every running sequence)."""
        return self.admit() + self.decode()

    def admit(self) -> list[tuple["_Row", GenEvent]]:
        """Waiting sequences take free rows; their prompts are prefilled in one forward and each
        emits its first token. Newcomers go first: their first token then waits for the step that
        was running when they arrived, not for another decode of the whole batch. Called during a
        decode forward (`decode(between=...)`), it works beside it: the newcomers' rows join the
        running cache when that forward is done, and their first decode is the next step's."""
        admitted = []
        while self.waiting and None in self.slots:
            row = self.waiting.popleft()
            row.slot = self.slots.index(None)
            self.slots[row.slot] = row
            admitted.append(row)
        return self._finish(self._prefill(admitted) if admitted else [])

    def decode(self, between=None) -> list[tuple["_Row", GenEvent]]:
        """A token for every running sequence, in one forward. `between()`, if given, runs before
        each block application of that forward (Engine.between_blocks): the scheduler admits
        newcomers there, so a first token waits for one block, not for the whole step."""
        with self.engine.between_blocks(between):  # None: nothing runs between the blocks
            return self._finish(self._decode([r for r in self.slots if r is not None]))

    def _finish(self, events: list[tuple["_Row", GenEvent]]) -> list[tuple["_Row", GenEvent]]:
        for row, ev in events:  # finished sequences leave (their last event carries the finish reason)
            if ev.finish_reason:
                self._free(row)
        return events

    def _dom(self, rows: list["_Row"], T: int) -> torch.Tensor | None:
        if all(r is None or r.dom is None for r in rows):
            return None
        return torch.tensor([-1 if r is None or r.dom is None else r.dom for r in rows])[:, None].expand(len(rows), T)

    def _emit(self, row: "_Row", logits_1V: torch.Tensor) -> GenEvent:
        tok, entry = row.pick(logits_1V)
        ev = row.add(tok)
        ev.token_ids, ev.logprobs = [tok], None if entry is None else [entry]
        row.seq.append(tok)
        if ev.finish_reason:
            ev.expert_counts = row.counts
        return ev

    def _padded(self, rows: list["_Row"]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' sequences right-padded into one [B, T] batch, and their lengths."""
        lens = torch.tensor([len(r.seq) for r in rows])
        idx = torch.full((len(rows), int(lens.max())), self.engine.pad_id, dtype=torch.long)
        for b, r in enumerate(rows):
            idx[b, :len(r.seq)] = torch.tensor(r.seq)
        return idx, lens

    @torch.inference_mode()
    def _prefill(self, rows: list["_Row"]) -> list[tuple["_Row", GenEvent]]:
        """The newcomers' prompts in one right-padded forward, into a cache of their own whose
        rows then become theirs in the running cache; each emits its first token."""
        eng = self.engine
        t0 = time.perf_counter()
        idx, lens = self._padded(rows)
        staged = KVCache(len(rows), int(lens.max())) if self.cache is not None else None
        out, logits_BV = eng._forward(idx, self._dom(rows, idx.shape[1]), lens - 1, cache=staged)
        if staged is not None:
            staged.keep_prefix(lens)  # the padding's keys must not outlive the prefill
            self._staged.append((staged, [(b, r.slot) for b, r in enumerate(rows)]))
            if not self._decoding:
                self._join_staged()
        valid = torch.arange(idx.shape[1])[None, :] < lens[:, None]
        counts = eng._rows(out.trace, valid)
        events = []
        for b, r in enumerate(rows):
            add_counts(r.counts, counts[b])
            prompt_lp = eng._prompt_logprobs(out.logits[b], r.seq, r.req.logprobs or 0) if r.req.prompt_logprobs else None
            ev = self._emit(r, logits_BV[b:b + 1])
            ev.prompt_logprobs = prompt_lp
            events.append((r, ev))
        t1 = time.perf_counter()
        for r, ev in events:
            ev.queue_s, ev.prefill_s = max(0.0, t0 - r.arrived), t1 - t0
        return events

    def _join_staged(self) -> None:
        """The newcomers' rows replace theirs in the running cache, whole (a row that was free
        when a decode forward began got its padding token's keys in that forward)."""
        for staged, pairs in self._staged:
            self.cache.take_rows(staged, pairs)
        self._staged.clear()

    @torch.inference_mode()
    def _decode(self, rows: list["_Row"]) -> list[tuple["_Row", GenEvent]]:
        if not rows:
            return []
        eng = self.engine
        if self.cache is not None:  # one new token per running row, the rows [0, hi) in one forward
            hi = max(r.slot for r in rows) + 1
            by_slot: list[_Row | None] = self.slots[:hi]
            live = torch.tensor([r is not None for r in by_slot])
            nxt = torch.tensor([[r.seq[-1] if r is not None else eng.pad_id] for r in by_slot])
            pos = torch.tensor([len(r.seq) - 1 if r is not None else 0 for r in by_slot])
            order = [(r, b) for b, r in enumerate(by_slot) if r is not None]  # a row cancelled meanwhile loses its slot
            self._decoding = True
            try:
                out, logits_BV = eng._forward(nxt, self._dom(by_slot, 1), torch.zeros(hi, dtype=torch.long),
                                              cache=self.cache.rows(0, hi), start_pos=pos)
            finally:
                self._decoding = False
                self._join_staged()
            counts = eng._rows(out.trace, live[:, None])
        else:  # recompute: the running sequences from their first token, right-padded
            idx, lens = self._padded(rows)
            out, logits_BV = eng._forward(idx, self._dom(rows, idx.shape[1]), lens - 1)
            last = torch.zeros(idx.shape, dtype=torch.bool)
            last[torch.arange(len(rows)), lens - 1] = True  # count each new token once
            counts = eng._rows(out.trace, last)
            order = [(r, b) for b, r in enumerate(rows)]
        events = []
        for r, b in order:
            add_counts(r.counts, counts[b])
            events.append((r, self._emit(r, logits_BV[b:b + 1])))
        return events


def merge_events(evs: list[dict]) -> dict:
    """Consecutive events of one sequence (as dicts, the form they travel in) as one: texts, tokens
    and logprobs joined; the first's prompt logprobs and first-token timings, everything else of the last."""
    if len(evs) == 1:
        return evs[0]
    lps = [x for e in evs for x in (e["logprobs"] or [])]
    return {**evs[-1], "text": "".join(e["text"] for e in evs), "token_ids": [t for e in evs for t in e["token_ids"]],
            "logprobs": lps if any(e["logprobs"] is not None for e in evs) else None,
            "prompt_logprobs": evs[0]["prompt_logprobs"], "queue_s": evs[0]["queue_s"],
            "prefill_s": evs[0]["prefill_s"]}


def add_counts(total: dict[str, list[int]], more: dict[str, list[int]]) -> None:
    for layer, c in more.items():
        row = total.setdefault(layer, [0] * len(c))
        for i, v in enumerate(c):
            row[i] += v
