"""Decoding: requests, events, each sequence's state, and `Decoder`, continuous batching.

Design choices
- Iteration-level scheduling (Orca, vLLM): sequences join and leave the running batch at token
  boundaries. Each `step()` admits waiting sequences into free rows and runs one forward that
  gives every running sequence its next token. That forward is packed (vLLM's mixed batch,
  attention.KVCache.packed): the decoding sequences' newest tokens and the newcomers' whole
  prompts in one batch row, so a newcomer's prefill costs no forward of its own. (Before, each
  admission prefilled in a forward of its own: with 16 clients whose requests end at different
  steps, nearly one in three forwards was a lone prefill, and a forward costs much the same for
  one prompt as for sixteen decoding rows on this CPU.) A long generation never holds a short one
  back; a sequence that arrives during a forward joins the next one.
- At most `max_num_seqs` sequences run; the rest wait in arrival order. A cancelled sequence (a
  client that left) gives its row back at once.
- The KV cache has one row per slot, each with its own positions; a newcomer's row loses its
  previous occupant's keys when it is admitted (`KVCache.forget`). Every routing decision at
  generation is causal and per token, so a sequence does not depend on its batch-mates: the
  continuous batch gives the tokens decoding one request at a time gives (up to the float noise
  of differently shaped matmuls, which can flip a near-tie).
- Without the cache (`use_cache=False`, the reference the benchmarks compare against) each step
  recomputes the running sequences from their first token, right-padded into one batch.
- Forwards run in `torch.inference_mode`: the decode thread would otherwise record autograd
  graphs (a 16-row decode step took about a quarter longer). The KV cache is then made of
  inference tensors, so what edits it (`forget`, the forwards) runs in that mode.
- Sampling is per sequence on the host with its own seeded generator: the same seed gives the
  same text. The arithmetic is batched over the rows (`pick`); only each row's noise is its own.
  Penalties and logit bias adjust the logits before sampling; logprobs report the model's own
  log-softmax.

Shape legend: B rows, T tokens, V vocabulary.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hydra_ray.models.attention import KVCache, pack_positions, upcast
from hydra_ray.models.hydra import GREEDY_BELOW, keeps_top_k, keeps_top_p, race, sample

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

    def adjust(self, logits_RV: torch.Tensor, i: int) -> None:
        """This sequence's penalties and logit bias, in place, on row `i` of a batch's logits."""
        req = self.req
        if self.seen and (req.presence_penalty or req.frequency_penalty):
            ids = torch.tensor(list(self.seen))
            n = torch.tensor(list(self.seen.values()), dtype=logits_RV.dtype)
            logits_RV[i, ids] -= req.presence_penalty + req.frequency_penalty * n
        for t, b in (req.logit_bias or {}).items():
            if 0 <= t < logits_RV.shape[-1]:
                logits_RV[i, t] += b

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


def pick(rows: list[_Row], logits_RV: torch.Tensor) -> list[tuple[int, list | None]]:
    """Each row's next token from its logits (after its penalties and bias, and never an id that
    is no text: padding, or past the tokenizer's vocabulary), and its logprob entry, which reports
    the model's own distribution (log-softmax of the raw logits). The masks, the softmax and the
    draw run once for all rows (per row, they were a tenth of a 16-row decode step); each row
    draws from its own generator (`race`), so its tokens are those it gets alone. Rows with top-k
    or top-p sample one by one."""
    tok, V = rows[0].tok, logits_RV.shape[-1]
    adjusted = upcast(logits_RV).clone()
    adjusted[:, tok.vocab_size:] = -math.inf  # ids past the tokenizer's (a padded vocabulary) are no text
    if tok.pad_id != tok.eos_id and 0 <= tok.pad_id < V:
        adjusted[:, tok.pad_id] = -math.inf  # nor is padding
    tokens: list[int] = [0] * len(rows)
    greedy, plain = [], []
    for i, r in enumerate(rows):
        r.adjust(adjusted, i)
        req = r.req
        if req.temperature <= GREEDY_BELOW:
            greedy.append(i)
        elif not keeps_top_k(req.top_k, V) and not keeps_top_p(req.top_p):
            plain.append(i)
        else:
            tokens[i] = int(sample(adjusted[i:i + 1], req.temperature, req.top_k, req.top_p, r.gen))
    if greedy:
        for i, t in zip(greedy, adjusted[greedy].argmax(-1).tolist()):
            tokens[i] = t
    if plain:
        temps = torch.tensor([rows[i].req.temperature for i in plain], dtype=adjusted.dtype)
        probs = (adjusted[plain] / temps[:, None]).softmax(-1)
        for i, t in zip(plain, race(probs, [rows[i].gen for i in plain]).tolist()):
            tokens[i] = t
    want = [i for i, r in enumerate(rows) if r.req.logprobs is not None]
    entries: list[list | None] = [None] * len(rows)
    if want:
        lp = upcast(logits_RV[want]).log_softmax(-1)
        for j, i in enumerate(want):
            entries[i] = logprob_entry(lp[j], tokens[i], rows[i].req.logprobs)
    for r, t in zip(rows, tokens):
        r.seen[t] = r.seen.get(t, 0) + 1
    return list(zip(tokens, entries))


def logprob_entry(lp_V: torch.Tensor, token: int, top: int) -> list:
    """[logprob of `token`, [[token, logprob] of the `top` most likely]] from log-probabilities."""
    vals, ids = lp_V.topk(min(top, lp_V.shape[-1])) if top else (lp_V[:0], lp_V[:0].long())
    return [float(lp_V[token]), [[int(i), float(v)] for i, v in zip(ids.tolist(), vals.tolist())]]


class _Restart(Exception):
    """A newcomer arrived early in a forward: the forward stops and starts over with it."""


class Decoder:
    """Continuous batching over one engine: `submit`, then `step` until `busy` is False."""

    def __init__(self, engine: "Engine", max_num_seqs: int = 16, use_cache: bool = True):
        self.engine = engine
        self.slots: list[_Row | None] = [None] * max_num_seqs
        self.waiting: deque[_Row] = deque()
        self.cache = KVCache(max_num_seqs, engine.max_context) if use_cache else None

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

    def _admit(self) -> list["_Row"]:
        """Waiting sequences take free rows, in arrival order; their rows lose the previous keys."""
        new = []
        while self.waiting and None in self.slots:
            row = self.waiting.popleft()
            row.slot = self.slots.index(None)
            self.slots[row.slot] = row
            new.append(row)
        if new and self.cache is not None:  # the rows' previous occupants' keys go
            self.cache.forget([r.slot for r in new])
        return new

    @torch.inference_mode()
    def step(self, arrivals=None) -> list[tuple["_Row", GenEvent]]:
        """One iteration, one forward: waiting sequences take free rows, then every running sequence
        gets its next token. A newcomer's prompt is prefilled in that same forward (its first
        token), beside the single new tokens of the sequences already decoding.

        `arrivals()`, if given, runs before each block application of the forward and submits what
        has arrived since (it returns whether anything did). When a newcomer could take a free row
        and the forward is not yet halfway through its blocks, the forward stops and starts over
        with the newcomer packed in (at most once a step): what is thrown away is less than half a
        forward, where waiting would cost the newcomer the rest of this forward, and a forward of
        its own would cost about as much as the whole batch's (on this CPU a forward costs much
        the same for one prompt as for sixteen decoding rows)."""
        fresh: set[int] = set()
        watch = arrivals
        while True:
            fresh |= {id(r) for r in self._admit()}
            rows = [r for r in self.slots if r is not None]
            if not rows:
                return []
            t0 = time.perf_counter()
            try:
                with self.engine.between_blocks(self._watcher(watch) if watch else None):
                    events = self._packed(rows, fresh) if self.cache is not None else self._recompute(rows, fresh)
            except _Restart:  # what the stopped forward wrote goes: its rerun may skip a slot it wrote
                watch = None
                if self.cache is not None:  # (a row cancelled meanwhile has no slot: its next owner forgets it whole)
                    live = [r for r in rows if r.slot is not None]
                    self.cache.forget([r.slot for r in live], [0 if id(r) in fresh else len(r.seq) - 1 for r in live])
                continue
            break
        t1 = time.perf_counter()
        for row, ev in events:
            if id(row) in fresh:  # the first token: how long it waited, and the forward that prefilled it
                ev.queue_s, ev.prefill_s = max(0.0, t0 - row.arrived), t1 - t0
            if ev.finish_reason:  # finished sequences leave (their last event carries the finish reason)
                self._free(row)
        return events

    def _watcher(self, arrivals):
        calls, limit = 0, max(1, self.engine.block_applications // 2)

        def watch() -> None:
            nonlocal calls
            calls += 1
            if arrivals() and calls <= limit and self.waiting and None in self.slots:
                raise _Restart
        return watch

    @staticmethod
    def _emit(row: "_Row", tok: int, entry: list | None) -> GenEvent:
        ev = row.add(tok)
        ev.token_ids, ev.logprobs = [tok], None if entry is None else [entry]
        row.seq.append(tok)
        if ev.finish_reason:
            ev.expert_counts = row.counts
        return ev

    def _events(self, rows, fresh, logits_RV, counts, prompt_logits) -> list[tuple["_Row", GenEvent]]:
        """Each row's counts added and its token sampled; a newcomer's echo gets its prompt's
        logprobs from `prompt_logits(i)`, the logits over row i's prompt."""
        eng, events = self.engine, []
        live = [i for i, r in enumerate(rows) if r.slot is not None]  # the others were cancelled during the forward
        if not live:
            return events
        picks = pick([rows[i] for i in live], logits_RV[live])
        for i, (tok, entry) in zip(live, picks):
            r = rows[i]
            add_counts(r.counts, counts[i])
            prompt_lp = None
            if id(r) in fresh and r.req.prompt_logprobs:
                prompt_lp = eng._prompt_logprobs(prompt_logits(i), r.seq, r.req.logprobs or 0)
            ev = self._emit(r, tok, entry)
            ev.prompt_logprobs = prompt_lp
            events.append((r, ev))
        return events

    @staticmethod
    def _domains(rows: list["_Row"]) -> torch.Tensor | None:
        """Each row's domain id (-1: none), or None when no row names one."""
        if all(r.dom is None for r in rows):
            return None
        return torch.tensor([-1 if r.dom is None else r.dom for r in rows])

    def _packed(self, rows: list["_Row"], fresh: set[int]) -> list[tuple["_Row", GenEvent]]:
        """One packed forward (KVCache.packed): each running sequence's newest token, each
        newcomer's whole prompt, together in one batch row; the next token of every sequence."""
        eng = self.engine
        ids: list[int] = []
        slot_N: list[int] = []
        pos_N: list[int] = []
        seq_N: list[int] = []
        span: list[tuple[int, int]] = []  # each row's tokens in the packed row
        for i, r in enumerate(rows):
            start = 0 if id(r) in fresh else len(r.seq) - 1
            lo = len(ids)
            ids += r.seq[start:]
            pos_N += range(start, len(r.seq))
            slot_N += [r.slot] * (len(r.seq) - start)
            seq_N += [i] * (len(r.seq) - start)
            span.append((lo, len(ids)))
        idx = torch.tensor([ids])
        pos = pack_positions(torch.tensor(slot_N), torch.tensor(pos_N))[None]
        dom = self._domains(rows)
        dom = None if dom is None else dom[torch.tensor(seq_N)][None]
        last = torch.tensor([hi - 1 for _, hi in span])
        out, logits_RV = eng._forward(idx, dom, (torch.zeros_like(last), last), cache=self.cache.packed(), start_pos=pos)
        counts = eng._groups(out.trace, torch.tensor(seq_N), len(rows))
        return self._events(rows, fresh, logits_RV, counts, lambda i: out.logits[0, span[i][0]:span[i][1]])

    def _padded(self, rows: list["_Row"]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' sequences right-padded into one [B, T] batch, and their lengths."""
        lens = torch.tensor([len(r.seq) for r in rows])
        idx = torch.full((len(rows), int(lens.max())), self.engine.pad_id, dtype=torch.long)
        for b, r in enumerate(rows):
            idx[b, :len(r.seq)] = torch.tensor(r.seq)
        return idx, lens

    def _recompute(self, rows: list["_Row"], fresh: set[int]) -> list[tuple["_Row", GenEvent]]:
        """Without the cache: every running sequence from its first token, right-padded into one
        forward; a newcomer's counts cover its prompt, the others' their newest token only."""
        eng = self.engine
        idx, lens = self._padded(rows)
        T = idx.shape[1]
        dom = self._domains(rows)
        dom = None if dom is None else dom[:, None].expand(len(rows), T)
        out, logits_RV = eng._forward(idx, dom, (torch.arange(len(rows)), lens - 1))
        col_T = torch.arange(T)[None, :]
        new_B = torch.tensor([id(r) in fresh for r in rows])[:, None]
        counted = (col_T < lens[:, None]) & (new_B | (col_T == lens[:, None] - 1))  # each token once
        return self._events(rows, fresh, logits_RV, eng._rows(out.trace, counted), lambda i: out.logits[i])


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
