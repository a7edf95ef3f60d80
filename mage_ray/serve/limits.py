"""What a request may ask of the served bundle (:class:`Limits`) and how the API refuses one (:class:`ApiError`,
rendered by :func:`error_body` in OpenAI's error shape)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ApiError", "Limits", "error_body"]


class ApiError(ValueError):
    """A request the API refuses: HTTP ``status``, a message, and the request ``field`` at fault (or None)."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.field, self.type, self.code = status, message, field, type, code

    def __reduce__(self):
        # Rebuilt from all its fields when it crosses processes (the engine deployment raises it, the ingress
        # renders it); the default would call ApiError(message) and fail.
        return type(self), (self.status, self.message, self.field, self.type, self.code)


def error_body(err: ApiError) -> dict[str, Any]:
    """OpenAI's error JSON: ``{"error": {message, type, param, code}}``; ``code`` is a string or null
    (``model_not_found``, ``unsupported_parameter``, ...), the HTTP status is the response's."""
    return {"error": {"message": err.message, "type": err.type, "param": err.field, "code": err.code}}


@dataclass(frozen=True)
class Limits:
    """What the served bundle and config allow (the bundle-dependent half of validation)."""

    n_objectives: int
    methods: tuple[str, ...]
    """Decoding methods this bundle can run."""
    max_tokens_limit: int
    """decode.max_tokens_limit: the most tokens one request may ask for."""
    max_prompts_per_grid: int = 64
    max_grid_points: int = 256
    """Most preference points in one /v1/grid request."""
    max_stop: int = 4
    """Most stop strings per request."""
    objectives: tuple[str, ...] = field(default=())
