"""Conversations as text, one template for training and serving.

The built-in chat domain writes its dialogues with `render`, and /v1/chat/completions renders a
request's messages with the template stored in the checkpoint's config
(`data.chat_template`), then lets the model continue after the assistant's prefix. A reply ends
where the model starts the next user turn (`stop_strings`) or at EOS.
"""

from __future__ import annotations

from typing import Iterable

from hydra_ray.config import ChatTemplate


def render(turns: Iterable[tuple[str, str]], template: ChatTemplate | None = None, reply: bool = False) -> str:
    """(role, content) turns as text; with `reply`, ending in the assistant's prefix for the model
    to continue. Roles: system, user, assistant."""
    t = template or ChatTemplate()
    prefix = {"system": t.system, "user": t.user, "assistant": t.assistant}
    out = []
    for role, content in turns:
        if role not in prefix:
            raise ValueError(f"unknown chat role {role!r}: system, user or assistant")
        out.append(f"{prefix[role]}{content}{t.separator}")
    if reply:
        out.append(t.assistant)
    return "".join(out)


def stop_strings(template: ChatTemplate | None = None) -> list[str]:
    """Where a reply ends: the start of the next user (or system) turn."""
    t = template or ChatTemplate()
    return [t.separator + p.rstrip() for p in (t.user, t.system) if p.strip()]
