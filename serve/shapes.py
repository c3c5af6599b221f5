"""OpenAI response shapes from engine events: completion and chat logprobs, usage, and the
merging of several choices' event streams into one (so n choices stream side by side).

Logprobs report the model's own distribution at each position (log-softmax of its logits, before
temperature, penalties and bias), as vLLM does by default: the chosen token's entry is what the
model gave it, and greedy decoding always picks the top entry.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable


def completion_logprobs(entries: list, token_ids: list[int], piece: Callable[[int], str], offset: int) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset. `entries`
    are the engine's ([logprob, [[token, logprob], ...]] or None), one per token of `token_ids`;
    offsets count characters of the returned text, from `offset`."""
    tokens, lps, tops, offsets = [], [], [], []
    for tok, entry in zip(token_ids, entries):
        s = piece(tok)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        lps.append(None if entry is None else entry[0])
        tops.append(None if entry is None else {piece(t): lp for t, lp in entry[1]})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: list, token_ids: list[int], piece: Callable[[int], str]) -> dict:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def one(tok: int, lp: float) -> dict:
        s = piece(tok)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**one(tok, e[0]), "top_logprobs": [one(t, lp) for t, lp in e[1]]}
                        for tok, e in zip(token_ids, entries) if e is not None]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def merged(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """(choice index, event) from every stream as each arrives; a stream's error is raised, and
    when the consumer stops early (a client that left), the other streams are cancelled."""
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    ev = fut.result()
                except StopAsyncIteration:
                    continue
                yield i, ev
                pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for fut in pending:
            fut.cancel()
