"""Response bodies of the HTTP API: OpenAI-shaped chat / completion objects and their stream chunks, server-sent
events. Request bodies and their validation are in :mod:`mage_ray.serve.schema`."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from mage_ray.decode import Completion

__all__ = [
    "Chunks",
    "chat_response",
    "completion_response",
    "finish_reason",
    "new_id",
    "sse",
    "usage",
]


def sse(data: Any) -> bytes:
    """One server-sent event: ``data: <json>`` (or the literal ``[DONE]``) and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def finish_reason(reason: str | None) -> str | None:
    """Engine finish reasons -> OpenAI's: eos/stop -> "stop", length -> "length", others kept."""
    return {"eos": "stop", "stop": "stop"}.get(reason, reason) if reason is not None else None


def usage(c: Completion | None) -> dict[str, int]:
    p = c.usage.prompt_tokens if c is not None else 0
    k = c.usage.completion_tokens if c is not None else 0
    return {"prompt_tokens": p, "completion_tokens": k, "total_tokens": p + k}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_response(rid: str, model: str, c: Completion, extra: dict) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": finish_reason(c.finish_reason),
                "logprobs": None,
            }
        ],
        "usage": usage(c),
        "mage": extra,
    }


def completion_response(rid: str, model: str, comps: list[Completion], extra: dict) -> dict[str, Any]:
    tot = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for c in comps:
        for k, v in usage(c).items():
            tot[k] += v
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": c.text, "finish_reason": finish_reason(c.finish_reason), "logprobs": None}
            for i, c in enumerate(comps)
        ],
        "usage": tot,
        "mage": extra,
    }


@dataclass(frozen=True)
class Chunks:
    """The chunks of one OpenAI stream (``object`` = ``chat.completion.chunk`` or ``text_completion``).

    OpenAI's usage rule: without ``stream_options.include_usage`` no chunk carries usage; with it every chunk has
    ``usage: null`` and one last chunk (:meth:`usage_only`, before ``[DONE]``) has ``choices: []`` and the usage.
    """

    rid: str
    model: str
    object: str
    include_usage: bool = False

    def _base(self, choices: list[dict]) -> dict[str, Any]:
        out = {"id": self.rid, "object": self.object, "created": int(time.time()), "model": self.model}
        out["choices"] = choices
        if self.include_usage:
            out["usage"] = None
        return out

    def chat(self, delta: dict, reason: str | None = None, extra: dict | None = None) -> dict[str, Any]:
        out = self._base(
            [{"index": 0, "delta": delta, "finish_reason": finish_reason(reason), "logprobs": None}]
        )
        if extra is not None:
            out["mage"] = extra
        return out

    def text(self, text: str, reason: str | None = None) -> dict[str, Any]:
        return self._base(
            [{"index": 0, "text": text, "finish_reason": finish_reason(reason), "logprobs": None}]
        )

    def usage_only(self, c: Completion | None) -> dict[str, Any]:
        return {**self._base([]), "usage": usage(c)}
