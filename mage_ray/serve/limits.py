"""What a request may ask of the served bundle (:class:`Limits`), how the API refuses one (:class:`ApiError`,
rendered by :func:`error_body` in OpenAI's error shape), and the ASGI middleware that enforces
``serve.max_body_bytes`` before FastAPI reads a body (:class:`BodyLimit`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

__all__ = ["ApiError", "BodyLimit", "Limits", "RefusedBody", "error_body", "json_error"]


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


class RefusedBody(HTTPException):
    """An :class:`ApiError` raised while FastAPI reads a body (a body over the limit). FastAPI lets an
    ``HTTPException`` from there through unchanged (any other error becomes its generic 400), and the app renders
    ``err`` like any ApiError."""

    def __init__(self, err: ApiError):
        super().__init__(err.status, err.message)
        self.err = err


def _refuse(err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status)


class BodyLimit:
    """ASGI middleware in front of the routes, whose bodies FastAPI parses into pydantic models.

    * Every body is read as JSON, whatever its Content-Type says (``curl -d`` sends
      ``application/x-www-form-urlencoded``; FastAPI would otherwise hand the route the raw bytes).
    * ``serve.max_body_bytes`` (the app's ``state.max_body_bytes``; no limit while unset): a Content-Length over
      it gets 413 at once, without reading; a body sent without one (chunked) is counted as it arrives and
      refused with 413 once it passes the limit (:class:`RefusedBody`). A Content-Length that is not a byte count
      is a 400.

    A client that hangs up mid-body needs nothing here: Serve's ``receive()`` then reports a disconnect
    (Starlette raises ``ClientDisconnect``) or raises ``TaskCancelledError`` (Serve cancelled the request, and with
    it the call that fetches the body from the proxy); FastAPI turns either into a 400 that no one reads, so
    nothing leaves the route for Serve to drop unread ("Future exception was never retrieved").
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        app = scope.get("app")
        limit = getattr(getattr(app, "state", None), "max_body_bytes", None)
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        scope["headers"] = [*headers, (b"content-type", b"application/json")]  # in place: the router's route
        # lands in this same scope, where the metrics middleware outside reads it
        cl = dict(headers).get(b"content-length")
        if cl is not None:
            text = cl.decode("latin-1")
            if not text.strip().isdigit():
                await _refuse(
                    ApiError(400, f"Content-Length {text!r} is not a byte count", "Content-Length")
                )(scope, receive, send)
                return
            if limit is not None and int(text) > limit:
                err = ApiError(
                    413,
                    f"request body of {int(text)} bytes exceeds serve.max_body_bytes = {limit}",
                    "body",
                    "request_too_large",
                )
                await _refuse(err)(scope, receive, send)
                return
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if limit is not None and message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RefusedBody(
                        ApiError(
                            413,
                            f"request body exceeds serve.max_body_bytes = {limit}",
                            "body",
                            "request_too_large",
                        )
                    )
            return message

        await self.app(scope, counted, send)


def json_error(doc: str | bytes, msg: str, pos: int) -> str:
    """The message ``json.loads`` gives for a JSON syntax error (``Expecting value: line 1 column 5 (char 4)``),
    rebuilt from its parts (FastAPI reports them separately)."""
    if isinstance(doc, bytes):
        doc = doc.decode("utf-8", errors="replace")
    return str(json.JSONDecodeError(msg, doc, pos))
