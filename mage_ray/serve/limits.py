"""What a request may ask of the served bundle (:class:`Limits`), how the API refuses one (:class:`ApiError`,
rendered by :func:`error_body` in OpenAI's error shape), and the body reader that enforces
``serve.max_body_bytes`` (:func:`read_body`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import TaskCancelledError
from starlette.requests import ClientDisconnect, Request

__all__ = ["ApiError", "Limits", "error_body", "read_body"]


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


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once the Content-Length header or the received bytes pass ``limit``.

    A client that hangs up mid-body gets a 400 that no one reads, and nothing is logged. Under Serve its
    disconnect reaches ``receive()`` in one of two ways: Starlette's ``ClientDisconnect`` (the proxy had already
    forgotten the request), or ``TaskCancelledError``: Serve cancels the request with ``ray.cancel``, which also
    cancels the replica's call that fetches the body from the proxy (``ASGIReceiveProxy.fetch_until_disconnect``
    in ``ray/serve/_private/http_util.py`` hands its error to ``receive()``). Let out of the route, that error can
    finish the replica's call future just before Serve cancels it, and Serve drops the future unread: "Future
    exception was never retrieved ... TaskCancelledError" in the replica's log.
    """
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.strip().isdigit():
            raise ApiError(400, f"Content-Length {cl!r} is not a byte count", "Content-Length")
        if int(cl) > limit:
            raise ApiError(
                413,
                f"request body of {int(cl)} bytes exceeds serve.max_body_bytes = {limit}",
                "body",
                "request_too_large",
            )
    buf = bytearray()
    try:
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise ApiError(
                    413, f"request body exceeds serve.max_body_bytes = {limit}", "body", "request_too_large"
                )
    except (ClientDisconnect, TaskCancelledError):  # the client hung up mid-body (docstring)
        raise ApiError(400, "the client disconnected before sending the whole body", "body") from None
    return bytes(buf)
