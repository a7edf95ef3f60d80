"""Ray Serve deployment + FastAPI ingress over :class:`mage_ray.serve.core.Generator`.

Build the application with :func:`build_app` (the import path ``mage_ray.serve.app:build_app``, args
``{bundle: <dir>, config: <yaml or null>, overrides: [section.field=value, ...]}``), e.g. from a Serve config::

    applications:
      - name: mage
        route_prefix: /
        import_path: mage_ray.serve.app:build_app
        args: {bundle: runs/embedded/bundle, config: configs/embedded.yaml, overrides: []}

or locally with ``python jobs/serve.py --config configs/embedded.yaml --bundle runs/embedded/bundle``.
The bundle directory must be readable at the same path on every node that runs a replica.

Routes (request bodies in :mod:`mage_ray.serve.schema`, responses in :mod:`mage_ray.serve.responses`):

====================================  ========================================================================
``POST /v1/generate``                 prompt | messages, preference, method, gamma, ..., ``stream`` (SSE), ``score``
``POST /v1/chat/completions``         OpenAI-compatible (+ ``preference``, ``mage``); ``stream`` supported
``POST /v1/completions``              OpenAI-compatible (+ ``preference``, ``mage``); ``stream`` for one prompt
``POST /v1/grid``                     prompts x preference grid, optionally scored; mean rewards + front flags
``GET  /v1/objectives``               objective names, methods, defaults (method, gamma, alpha, beta), limits
``GET  /v1/models[/{id}]``            the served model ``serve.model_name`` (OpenAI list / retrieve; else 404)
``GET  /v1/stats``                    request / token / cancellation counters of this replica
``GET  /v1/front``                    the bundle's Pareto front from its evaluation report (:mod:`.playground`)
``GET  /healthz``                     200 when the engine is loaded and not stuck, else 503 (no auth)
``GET  /``, ``/playground``           the preference playground page (no auth: it holds no data)
====================================  ========================================================================

Security: Serve's HTTP proxy binds ``serve.host`` (127.0.0.1 unless configured; ``jobs/serve.py`` passes it
to ``serve.start``). With ``serve.auth_token_env`` naming a set environment variable (visible to the
replicas), every route but ``/healthz`` and the playground page (its files) needs ``Authorization: Bearer
<token>`` (401 otherwise). Bodies over ``serve.max_body_bytes`` get 413 (the Content-Length header and the bytes
actually received are both checked). ``max_tokens`` is bounded by ``decode.max_tokens_limit``. Errors are JSON
``{"error": {"message", "type", "param", "code"}}`` where ``param`` names the offending field and ``code`` is a
string or null (``unsupported_parameter``, ``model_not_found``), as OpenAI's. The OpenAI endpoints declare
OpenAI's request fields: those that change nothing here are ignored, those this server cannot honour (``n`` > 1,
``logprobs``, ``tools``, ...) are refused by name, any other key is refused by name. Streams carry usage only
with ``stream_options.include_usage``, in a last chunk with ``choices: []``. A request naming another model than
the served one gets 404 ``model_not_found``; a client that hangs up mid-body gets nothing and logs nothing.

SSE (``/v1/generate`` with ``stream: true``): one ``data: {"text": ...}`` event per token chunk, then
``data: {"text": <full text>, "finish_reason", "usage", "preference", "method"}`` (+ ``scores`` when the request
asked for them), then ``data: [DONE]``.
A client that disconnects cancels its request: the engine drops its rows at the next decode step.
"""

# No `from __future__ import annotations` here: FastAPI must see real annotation objects on the
# class-based routes Serve builds (string annotations resolve in Serve's module and fail).

import hmac
import logging
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from starlette.requests import ClientDisconnect

from mage_ray.bundle import load_bundle
from mage_ray.config import Config, config_from_dict, load_config
from mage_ray.decode import Completion, Request, TokenEvent
from mage_ray.serve import responses as R
from mage_ray.serve import schema as S
from mage_ray.serve.core import Generator, Ticket
from mage_ray.serve.playground import front_json
from mage_ray.serve.playground import router as playground_router

__all__ = ["GRACEFUL_SHUTDOWN_S", "MageServer", "api", "build_app", "deployment_options"]

log = logging.getLogger("ray.serve")

GRACEFUL_SHUTDOWN_S = 60.0
"""How long a stopping replica lets in-flight requests (streams included) finish before it is killed."""

api = FastAPI(title="mage_ray", description="Preference-conditioned guided generation (MAGE / Bone Soup)")
api.include_router(playground_router)  # the page at / and /playground (no auth: it holds no data)


@api.exception_handler(S.ApiError)
async def _api_error(_request: HttpRequest, err: S.ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(S.error_body(err), status_code=err.status, headers=headers)


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The request body, refused with 413 once the Content-Length header or the received bytes pass ``limit``."""
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.strip().isdigit():
            raise S.ApiError(400, f"Content-Length {cl!r} is not a byte count", "Content-Length")
        if int(cl) > limit:
            raise S.ApiError(
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
                raise S.ApiError(
                    413, f"request body exceeds serve.max_body_bytes = {limit}", "body", "request_too_large"
                )
    except ClientDisconnect:  # the client hung up mid-body: answer no one, log no traceback
        raise S.ApiError(400, "the client disconnected before sending the whole body", "body") from None
    return bytes(buf)


def _engine_error(c: Completion, field: str | None = None) -> S.ApiError:
    """A request the engine refused (400 naming the field its message starts with) or failed on (500/503)."""
    msg = c.error or "unknown error"
    if msg.startswith("decoding failed"):
        return S.ApiError(500, msg, None, "server_error")
    if msg.startswith("server shut down"):
        return S.ApiError(503, msg, None, "unavailable")
    m = re.match(r"[A-Za-z_][A-Za-z_0-9]*(\[\d+\])?", msg)
    return S.ApiError(400, msg, field or (m.group(0) if m else None))


async def _first(ticket: Ticket) -> TokenEvent:
    """Wait for a ticket's first event (the request's first token, or its refusal); cancel on disconnect."""
    try:
        ev = await ticket.next()
    except BaseException:
        ticket.cancel()
        raise
    if ev.finished and ev.finish_reason == "error":
        raise _engine_error(ev.completion)
    return ev


async def _events(ticket: Ticket, first: TokenEvent) -> AsyncIterator[TokenEvent]:
    """first, then the rest of a ticket's events; cancels the request if the consumer goes away early."""
    ev = first
    try:
        while True:
            yield ev
            if ev.finished:
                return
            ev = await ticket.next()
    finally:
        if not ticket.finished:
            ticket.cancel()


def _include_usage(body: S.ChatBody | S.CompletionBody) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


@serve.deployment(name="MageServer")
@serve.ingress(api)
class MageServer:
    """One replica: one :class:`Generator` (one engine, one copy of the base weights) behind the HTTP API."""

    def __init__(self, bundle: str, config: dict[str, Any], overrides: list[str] | None = None):
        cfg = config_from_dict(config)
        if cfg.serve.num_gpus == 0 and cfg.serve.num_cpus >= 1:
            import torch

            # One intra-op thread per reserved CPU: more threads than cores makes OpenMP spin-wait, which on a
            # shared node slows decoding by orders of magnitude.
            torch.set_num_threads(int(cfg.serve.num_cpus))
        self.core = Generator.from_bundle(bundle, cfg, overrides or [])
        self.bundle = bundle
        self.max_body = cfg.serve.max_body_bytes
        env = cfg.serve.auth_token_env
        self.token = os.environ.get(env) if env else None
        if env and not self.token:
            log.warning(
                "serve.auth_token_env = %r but that variable is not set on this replica: auth is OFF", env
            )

    async def check_health(self) -> None:
        ok, why = self.core.health()
        if not ok:
            raise RuntimeError(why)

    def __del__(self) -> None:
        core = getattr(self, "core", None)
        if core is not None:
            core.close()

    # ----- plumbing -----

    def _auth(self, request: HttpRequest) -> None:
        if self.token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise S.ApiError(
                401,
                "missing or wrong bearer token (Authorization: Bearer <token>)",
                "Authorization",
                "authentication_error",
            )

    async def _parse(self, request: HttpRequest, model):
        self._auth(request)
        return S.parse_body(await read_body(request, self.max_body), model)

    def _extra(self, req: Request) -> dict[str, Any]:
        d = self.core.engine.defaults
        return {
            "preference": req.preference,
            "method": req.method or d.method,
            "gamma": d.gamma if req.gamma is None else req.gamma,
            "alpha": d.alpha if req.alpha is None else req.alpha,
        }

    async def _one(self, req: Request) -> Completion:
        await self.core.check(req, "messages" if isinstance(req.prompt, list) else "prompt")
        c = await self.core.generate(req)
        if c.finish_reason == "error":
            raise _engine_error(c)
        return c

    async def _open(self, req: Request) -> tuple[Ticket, TokenEvent]:
        await self.core.check(req, "messages" if isinstance(req.prompt, list) else "prompt")
        t = self.core.submit(req)
        return t, await _first(t)

    # ----- routes -----

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        ok, why = self.core.health()
        return JSONResponse(
            {"status": "ok" if ok else "unhealthy", "detail": why}, status_code=200 if ok else 503
        )

    @api.get("/v1/objectives")
    async def objectives(self, request: HttpRequest) -> dict:
        self._auth(request)
        return self.core.info()

    @api.get("/v1/stats")
    async def stats(self, request: HttpRequest) -> dict:
        self._auth(request)
        return self.core.stats()

    @api.get("/v1/front")
    async def front(self, request: HttpRequest) -> dict:
        self._auth(request)
        return front_json(self.bundle, self.core.engine.objectives)

    def _model(self) -> dict[str, Any]:
        return {"id": self.core.name, "object": "model", "created": self.core.created, "owned_by": "mage_ray"}

    def _check_model(self, name: str | None) -> str:
        """The served model id; ApiError 404 ``model_not_found`` when a request names another model."""
        if name is not None and name != self.core.name:
            raise S.ApiError(
                404,
                f"The model {name!r} does not exist: this server serves {self.core.name!r} (serve.model_name)",
                "model",
                code="model_not_found",
            )
        return self.core.name

    @api.get("/v1/models")
    async def models(self, request: HttpRequest) -> dict:
        self._auth(request)
        return {"object": "list", "data": [self._model()]}

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: HttpRequest) -> dict:
        self._auth(request)
        self._check_model(model_id)
        return self._model()

    @api.post("/v1/generate")
    async def generate(self, request: HttpRequest):
        body = await self._parse(request, S.GenerateBody)
        req = S.to_request(body, self.core.limits)
        extra = self._extra(req)
        if body.score:
            await self.core.load_scorers()  # objectives that cannot load here: 400 before anything decodes
        if not body.stream:
            c = await self._one(req)
            out = {"text": c.text, "finish_reason": c.finish_reason, "usage": R.usage(c), **extra}
            if body.score:
                out["scores"] = await self.core.score_completion(req, c.text)
            return out
        ticket, first = await self._open(req)

        async def sse() -> AsyncIterator[bytes]:
            async for ev in _events(ticket, first):
                if ev.delta:
                    yield R.sse({"text": ev.delta})
                if ev.finished:
                    c = ev.completion
                    final = {
                        "text": c.text,
                        "finish_reason": ev.finish_reason,
                        "usage": R.usage(c),
                        "error": c.error,
                        **extra,
                    }
                    if body.score and ev.finish_reason not in ("error", "cancelled"):
                        try:
                            final["scores"] = await self.core.score_completion(req, c.text)
                        except Exception as e:  # noqa: BLE001  (the stream is open: report it in the event)
                            final["error"] = f"score: {e}"
                    yield R.sse(final)
                    yield R.sse("[DONE]")

        return StreamingResponse(sse(), media_type="text/event-stream")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: HttpRequest):
        body = await self._parse(request, S.ChatBody)
        req = S.to_request(body, self.core.limits)
        model, rid, extra = self._check_model(body.model), R.new_id("chatcmpl"), self._extra(req)
        if not body.stream:
            return R.chat_response(rid, model, await self._one(req), extra)
        ticket, first = await self._open(req)
        chunk = R.Chunks(rid, model, "chat.completion.chunk", _include_usage(body))

        async def sse() -> AsyncIterator[bytes]:
            yield R.sse(chunk.chat({"role": "assistant", "content": ""}, extra=extra))
            async for ev in _events(ticket, first):
                if ev.delta:
                    yield R.sse(chunk.chat({"content": ev.delta}))
                if ev.finished:
                    yield R.sse(chunk.chat({}, ev.finish_reason))
                    if chunk.include_usage:
                        yield R.sse(chunk.usage_only(ev.completion))
                    yield R.sse("[DONE]")

        return StreamingResponse(sse(), media_type="text/event-stream")

    @api.post("/v1/completions")
    async def completions(self, request: HttpRequest):
        body = await self._parse(request, S.CompletionBody)
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if not prompts or len(prompts) > self.core.limits.max_prompts_per_grid:
            raise S.ApiError(
                400, f"prompt: give 1 to {self.core.limits.max_prompts_per_grid} prompts", "prompt"
            )
        reqs = [S.to_request(body, self.core.limits, prompt=p) for p in prompts]
        model, rid, extra = self._check_model(body.model), R.new_id("cmpl"), self._extra(reqs[0])
        if not body.stream:
            for i, r in enumerate(reqs):
                await self.core.check(r, f"prompt[{i}]" if isinstance(body.prompt, list) else "prompt")
            comps = await self.core.generate_many(reqs, interactive=True)
            for c in comps:
                if c.finish_reason == "error":
                    raise _engine_error(c)
            return R.completion_response(rid, model, comps, extra)
        if len(reqs) != 1:
            raise S.ApiError(400, "stream: streaming takes one prompt (send a string, not a list)", "prompt")
        ticket, first = await self._open(reqs[0])
        chunk = R.Chunks(rid, model, "text_completion", _include_usage(body))

        async def sse() -> AsyncIterator[bytes]:
            async for ev in _events(ticket, first):
                if ev.delta:
                    yield R.sse(chunk.text(ev.delta))
                if ev.finished:
                    yield R.sse(chunk.text("", ev.finish_reason))
                    if chunk.include_usage:
                        yield R.sse(chunk.usage_only(ev.completion))
                    yield R.sse("[DONE]")

        return StreamingResponse(sse(), media_type="text/event-stream")

    @api.post("/v1/grid")
    async def grid(self, request: HttpRequest):
        body = await self._parse(request, S.GridBody)
        points, prompts, reqs = S.grid_requests(body, self.core.limits)
        return await self.core.grid(points, prompts, reqs, score=body.score)


def deployment_options(cfg: Config) -> dict[str, Any]:
    """Serve deployment options from ServeConfig: replicas or autoscaling, concurrency, resources, shutdown."""
    sc = cfg.serve
    opts: dict[str, Any] = {
        "max_ongoing_requests": sc.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": sc.num_cpus, "num_gpus": sc.num_gpus},
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
    }
    if sc.autoscaling:
        opts["autoscaling_config"] = dict(sc.autoscaling)
    else:
        opts["num_replicas"] = sc.num_replicas
    return opts


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder: ``{bundle: <dir>, config: <yaml path or null>, overrides: [...]}``.

    The config and the bundle are validated here (on the driver), so a bad path or field fails the deploy
    with a clear message instead of crash-looping replicas.
    """
    unknown = sorted(set(args) - {"bundle", "config", "overrides"})
    if unknown:
        raise ValueError(f"build_app: unknown args {unknown}; allowed: bundle, config, overrides")
    if not args.get("bundle"):
        raise ValueError("build_app: args.bundle (the bundle directory) is required")
    overrides = [str(o) for o in (args.get("overrides") or [])]
    cfg = load_config(args.get("config"), overrides)
    bundle = Path(str(args["bundle"])).expanduser()
    b = load_bundle(bundle)
    if len(b.objectives) < 2:  # pragma: no cover  (load_bundle already enforces it)
        raise ValueError(f"bundle {bundle}: needs >= 2 objectives")
    return MageServer.options(**deployment_options(cfg)).bind(str(b.root), cfg.to_dict(), overrides)
