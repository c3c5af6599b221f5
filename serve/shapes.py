"""OpenAI response shapes from engine events: completion and chat logprobs, usage, and the
merging of several choices' event streams into one (so n choices stream side by side).

Logprobs report the model's own distribution at each position (log-softmax of its logits, before
temperature, penalties and bias), as vLLM does by default: the chosen token's entry is what the
model gave it, and greedy decoding always picks the top entry.
"""

from __future__ import annotations

import asyncio
import codecs
from typing import Any, AsyncIterator, Callable

import orjson
from fastapi.responses import JSONResponse


def dumps(obj: Any) -> bytes:
    """JSON bytes by orjson: 10-15x the speed of json.dumps on a routing trace (0.33 -> 0.02 ms for
    12 kB), whose encoding was an eighth of the ingress's CPU under load. Like Starlette's JSON it
    writes UTF-8 as is; a NaN or an infinity becomes null (valid JSON, where json.dumps wrote
    `-Infinity`); `Fragment`s (JSON already encoded, such as a model replica's routing trace) go in
    as they are."""
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)


class JSON(JSONResponse):
    """A JSON response encoded by `dumps`."""

    def render(self, content: Any) -> bytes:
        return dumps(content)


def sse(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + dumps(obj) + b"\n\n"


def token_text(b: bytes) -> str:
    """A token as logprobs show it: its text, or where its bytes are not whole UTF-8 characters
    (part of a character, with byte-level tokens), "bytes:" and the bytes escaped, as OpenAI's API
    writes them (so two such tokens never share a name)."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


class TextOffsets:
    """Where each token starts in decoded text, in characters, from `start`: the tokens' bytes are
    decoded in order, so a token that ends inside a character adds nothing until the token that
    completes it (both start where the character does). Keep one per text that grows (a stream)."""

    def __init__(self, token_bytes: Callable[[int], bytes], start: int = 0):
        self._bytes, self._utf8, self.at = token_bytes, codecs.getincrementaldecoder("utf-8")("replace"), start

    def of(self, token_ids: list[int]) -> list[int]:
        out = []
        for tok in token_ids:
            out.append(self.at)
            self.at += len(self._utf8.decode(self._bytes(tok)))
        return out


def completion_logprobs(entries: list, token_ids: list[int], token_bytes: Callable[[int], bytes],
                        offsets: list[int]) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset. `entries`
    are the engine's ([logprob, [[token, logprob], ...]] or None), one per token of `token_ids`,
    and `offsets` where each token starts in the returned text (TextOffsets). As in OpenAI's API,
    top_logprobs always holds the chosen token too (up to logprobs + 1 entries)."""
    tokens, lps, tops = [], [], []
    for tok, entry in zip(token_ids, entries):
        tokens.append(token_text(token_bytes(tok)))
        lps.append(None if entry is None else entry[0])
        if entry is None:
            tops.append(None)
            continue
        top = {token_text(token_bytes(t)): lp for t, lp in entry[1]}
        top.setdefault(tokens[-1], entry[0])
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": list(offsets)}


def chat_logprobs(entries: list, token_ids: list[int], token_bytes: Callable[[int], bytes]) -> dict:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]};
    `bytes` are the token's own (part of a character, with byte-level tokens)."""
    def one(tok: int, lp: float) -> dict:
        b = token_bytes(tok)
        return {"token": token_text(b), "logprob": lp, "bytes": list(b)}

    return {"content": [{**one(tok, e[0]), "top_logprobs": [one(t, lp) for t, lp in e[1]]}
                        for tok, e in zip(token_ids, entries) if e is not None]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def merged(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """(choice index, event) from every stream as each arrives; a stream's error is raised, and
    when the consumer stops early (a client that left), the other streams are cancelled.
    One stream (n = 1, the usual case) is read directly: no task and no wait per event, which
    cost the ingress's event loop two extra turns per streamed token."""
    if len(streams) == 1:
        async for ev in streams[0]:
            yield 0, ev
        return
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
