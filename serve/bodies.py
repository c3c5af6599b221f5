"""The request bodies of the HTTP API (pydantic, strict types): what a client may send.

The OpenAI-compatible bodies (and their extensions: `return_routing`, `top_k`, `domain`,
`use_cache`) and the routing inspector's. Limits that depend on the server's options (max_tokens,
prompt tokens) or on the model (domains, context, vocabulary) are checked by the ingress, not here.

Every parameter is honoured or refused: the bodies forbid unknown keys, so a parameter this
server does not implement is a 400 that names it (with the reason from UNSUPPORTED when there is
one), never silently ignored.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

UNSUPPORTED: dict[str, str] = {
    "suffix": "insertion after a suffix is not supported",
    "best_of": "best_of must equal n: the server does not rank extra samples",
    "functions": "function calling is not supported", "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported", "function_call": "function calling is not supported",
    "response_format": "structured output is not supported", "audio": "audio is not supported",
    "modalities": "only text is supported", "parallel_tool_calls": "tool calling is not supported",
    "prediction": "predicted outputs are not supported", "reasoning_effort": "this model does not reason",
    "service_tier": "there are no service tiers", "store": "completions are not stored",
    "metadata": "completions are not stored", "web_search_options": "web search is not supported",
    "name": "participant names are not part of the chat template",
}


def _encodable(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (not valid Unicode text)") from None
    return s


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        """A parameter sent as null means its default, as in OpenAI's API (its Python client sends
        null for a parameter the caller passed as None). Unknown keys stay, to be refused."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """What completions and chat completions share."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63, description="same seed, same text; choice i uses seed + i")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=8, description="independent samples per prompt")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=256, description="an end-user id: logged with the request")
    return_routing: bool = False
    domain: str | None = None
    use_cache: bool = True

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: up to 4 non-empty strings")
        return [_encodable(x) for x in stops]

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > 300:
            raise ValueError("at most 300 entries")
        out = {}
        for k, b in v.items():
            if not (k.isascii() and k.isdigit() and len(k) <= 9):
                raise ValueError(f"keys are token ids (up to 9 digits), got {k[:20]!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"token {k}: bias must be within [-100, 100]")
            if str(int(k)) in out:
                raise ValueError(f"token {int(k)} is given twice")
            out[str(int(k))] = b
        return out

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def bias(self) -> dict[int, float] | None:
        return {int(k): b for k, b in self.logit_bias.items()} if self.logit_bias else None


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=8)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and v and all(isinstance(x, int) for x in v):
            prompts = [v]  # one prompt as token ids
        else:
            prompts = [v] if isinstance(v, str) else v
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompt must be non-empty: a string, token ids, or a non-empty list of either")
        if len(prompts) > 16:
            raise ValueError("at most 16 prompts per request")
        for p in prompts:
            if isinstance(p, str):
                _encodable(p)
            elif any(t < 0 for t in p):
                raise ValueError("token ids must not be negative")
        return v

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of ({self.best_of}) must equal n ({self.n}): the server does not rank extra samples")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        return [p] if p and isinstance(p[0], int) else list(p)


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        return _encodable(v)


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must be from the user or the system: the reply is the assistant's")
        return self

    @property
    def limit(self) -> int | None:
        """Tokens to generate at most; None: as many as the context and the server allow."""
        return self.max_completion_tokens or self.max_tokens


class RoutingBody(_Body):
    text: str = Field(min_length=1)
    model: str | None = None
    domain: str | None = None

    @field_validator("text")
    @classmethod
    def _text(cls, v):
        return _encodable(v)
