"""The request bodies of the HTTP API (pydantic, strict types): what a client may send.

The OpenAI-compatible bodies (and their extensions: `return_routing`, `top_k`, `domain`,
`use_cache`) and the routing inspector's. Limits that depend on the server's options (max_tokens,
prompt tokens) or on the model (domains, context) are checked by the ingress, not here.
"""

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _encodable(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (not valid Unicode text)") from None
    return s


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class CompletionBody(_Body):
    prompt: str | list[str]
    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63, description="same seed, same text")
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")
    return_routing: bool = False
    domain: str | None = None
    use_cache: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt must be a non-empty string (or a non-empty list of them)")
        if len(prompts) > 16:
            raise ValueError("at most 16 prompts per request")
        for p in prompts:
            _encodable(p)
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: up to 4 non-empty strings")
        return [_encodable(x) for x in stops]


class RoutingBody(_Body):
    text: str = Field(min_length=1)
    model: str | None = None
    domain: str | None = None

    @field_validator("text")
    @classmethod
    def _text(cls, v):
        return _encodable(v)
