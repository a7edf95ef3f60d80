"""The Serve application: a FastAPI ingress deployment (:class:`MageIngress`) in front of the engine deployment
(:class:`mage_ray.serve.engine.MageEngine`, one :class:`mage_ray.serve.core.Generator` per replica).

Build the application with :func:`build_app` (the import path ``mage_ray.serve.app:build_app``, args
``{bundle: <dir>, config: <yaml or null>, overrides: [section.field=value, ...]}``), e.g. from a Serve config::

    applications:
      - name: mage
        route_prefix: /
        import_path: mage_ray.serve.app:build_app
        args: {bundle: runs/embedded/bundle, config: configs/embedded.yaml, overrides: []}

or locally with ``python jobs/serve.py --config configs/embedded.yaml --bundle runs/embedded/bundle``.
The bundle directory must be readable at the same path on every node that runs a replica. Both deployments
take their replica count (or autoscaling) and concurrency from the config's ``serve`` section; the engine its
resources too, the ingress reserves no CPU. A Serve config overrides them by deployment name, ``MageEngine``
and ``MageIngress`` (``cluster/serve.yaml``).

Model composition (why: :mod:`mage_ray.serve.engine`): the ingress does everything HTTP (routes, auth, body
limits, parsing and validation with :mod:`.schema`, SSE formatting, the playground) and calls the engine
through a ``DeploymentHandle`` once per request; ``/v1/generate`` and the OpenAI streams use
``handle.options(stream=True)``. When the engine replica dies, the ingress is still there to say so:

* an open stream ends with an error event and ``[DONE]``: on ``/v1/generate`` the final event has
  ``"finish_reason": "error"`` and ``"error"``; on the OpenAI routes the last chunk is OpenAI's mid-stream error,
  ``{"error": {"message", "type": "unavailable", ...}}`` (the ``openai`` client raises ``APIError``);
* a non-streaming request gets 503 ``{"error": {"type": "unavailable", ...}}``.

Serve starts another engine replica meanwhile; requests that arrive before it is up wait for it (measured in
docs/benchmarks.md, section "Serve survives faults").

Routes (request bodies in :mod:`mage_ray.serve.schema`, responses in :mod:`mage_ray.serve.responses`):

====================================  ========================================================================
``POST /v1/generate``                 prompt | messages, preference, method, gamma, ..., ``stream`` (SSE), ``score``
``POST /v1/chat/completions``         OpenAI-compatible (+ ``preference``, ``mage``); ``stream`` supported
``POST /v1/completions``              OpenAI-compatible (+ ``preference``, ``mage``); ``stream`` for one prompt
``POST /v1/grid``                     prompts x preference grid, optionally scored; mean rewards + front flags
``GET  /v1/objectives``               objective names, methods, defaults (method, gamma, alpha, beta), limits
``GET  /v1/models[/{id}]``            the served model ``serve.model_name`` (OpenAI list / retrieve; else 404)
``GET  /v1/stats``                    request / token / cancellation counters of an engine replica, its ``pid``
``GET  /v1/front``                    the bundle's Pareto front from its evaluation report (:mod:`.playground`)
``GET  /healthz``                     200 when an engine replica answers, loaded and not stuck, else 503 (no auth)
``GET  /``, ``/playground``           the preference playground page (no auth: it holds no data)

``GET  /openapi.json``, ``/docs``      the OpenAPI schema (typed request bodies) and Swagger UI, only with ``serve.api_docs``
====================================  ========================================================================

The request bodies are the pydantic models of :mod:`.schema`, taken by the routes as parameters, so
``/openapi.json`` (``api.openapi()``) lists them; FastAPI's validation errors are rendered as the same
``ApiError`` that :func:`mage_ray.serve.schema.parse_body` gives. Prometheus metrics: :mod:`.monitoring`.

Security: Serve's HTTP proxy binds ``serve.host`` (127.0.0.1 unless configured; ``jobs/serve.py`` passes it
to ``serve.start``). With ``serve.auth_token_env`` naming a set environment variable (visible to the
replicas), every route but ``/healthz`` and the playground page (its files) needs ``Authorization: Bearer
<token>`` (401 otherwise; FastAPI's ``HTTPBearer`` reads the header, checked before the body's fields).
``/docs`` and ``/openapi.json`` are off (404) unless ``serve.api_docs`` is true, and then behind the token too.
Bodies over ``serve.max_body_bytes`` get 413 (the Content-Length header and the bytes actually received are both
checked, before the body is parsed or the token checked: :class:`mage_ray.serve.limits.BodyLimit`).
``max_tokens`` is bounded by ``decode.max_tokens_limit``; the OpenAI routes follow OpenAI's defaults (sampling
at temperature 1, ``serve.openai_max_tokens`` when max_tokens is omitted), ``/v1/generate`` the config's (greedy). Errors are JSON
``{"error": {"message", "type", "param", "code"}}`` where ``param`` names the offending field and ``code`` is a
string or null (``unsupported_parameter``, ``model_not_found``), as OpenAI's. The OpenAI endpoints declare
OpenAI's request fields: those that change nothing here are ignored, those this server cannot honour (``n`` > 1,
``logprobs``, ``tools``, ...) are refused by name, any other key is refused by name. Streams carry usage only
with ``stream_options.include_usage``, in a last chunk with ``choices: []``. A request naming another model than
the served one gets 404 ``model_not_found``; a client that hangs up mid-body gets nothing and logs nothing.

SSE (``/v1/generate`` with ``stream: true``): one ``data: {"text": ...}`` event per token chunk, then
``data: {"text": <full text>, "finish_reason", "usage", "preference", "method"}`` (+ ``scores`` when the request
asked for them), then ``data: [DONE]``.
A client that disconnects cancels its request: the ingress cancels its engine call, and the engine drops the
request's rows at the next decode step.
"""

# No `from __future__ import annotations` here: FastAPI must see real annotation objects on the
# class-based routes Serve builds (string annotations resolve in Serve's module and fail).

import asyncio
import hmac
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve import Application
from ray.serve.exceptions import RayServeException, RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from mage_ray.bundle import load_bundle
from mage_ray.config import Config, config_from_dict, load_config
from mage_ray.decode import Completion, Request, TokenEvent
from mage_ray.serve import responses as R
from mage_ray.serve import schema as S
from mage_ray.serve.engine import EngineFacts, MageEngine, engine_options
from mage_ray.serve.limits import BodyLimit, RefusedBody
from mage_ray.serve.monitoring import IngressMetrics, RequestMetrics
from mage_ray.serve.playground import front_json
from mage_ray.serve.playground import router as playground_router
from mage_ray.serve.ticket import error_event

__all__ = ["HEALTH_TIMEOUT_S", "MageEngine", "MageIngress", "api", "build_app", "ingress_options"]

log = logging.getLogger("ray.serve")

HEALTH_TIMEOUT_S = 10.0
"""/healthz answers 503 when no engine replica reports its health within this many seconds."""

api = FastAPI(
    title="mage_ray",
    description="Preference-conditioned guided generation (MAGE / Bone Soup)",
    docs_url=None,  # /docs and /openapi.json are routes of the ingress: off unless serve.api_docs, token-checked
    redoc_url=None,
    openapi_url=None,
)
api.include_router(playground_router)  # the page at / and /playground (no auth: it holds no data)
api.add_middleware(BodyLimit)  # 413 before a body is parsed; every body read as JSON
api.add_middleware(RequestMetrics)  # added last, so outermost: it also counts BodyLimit's answers


@api.exception_handler(S.ApiError)
async def _api_error(_request: HttpRequest, err: S.ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(S.error_body(err), status_code=err.status, headers=headers)


@api.exception_handler(RefusedBody)
async def _refused_body(request: HttpRequest, err: RefusedBody) -> JSONResponse:
    return await _api_error(request, err.err)


@api.exception_handler(RequestValidationError)
async def _invalid(request: HttpRequest, err: RequestValidationError) -> JSONResponse:
    return await _api_error(request, S.validation_error(err.errors(), err.body))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: HttpRequest, err: StarletteHTTPException):
    """Errors FastAPI itself raises (no such route, a body it could not read) in OpenAI's shape under /v1/."""
    if not request.url.path.startswith("/v1/"):
        return await http_exception_handler(request, err)
    return await _api_error(request, S.ApiError(err.status_code, str(err.detail), None))


BEARER = HTTPBearer(
    auto_error=False, description="serve.auth_token_env's token, when set (every route but /healthz and /)"
)
"""FastAPI's bearer scheme: it reads ``Authorization: Bearer <token>`` (and puts the scheme in /openapi.json);
:func:`authorized` compares the token."""


async def authorized(
    request: HttpRequest, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
) -> None:
    """Route dependency: 401 unless the request carries the replica's token (``state.auth_token``; no token
    configured: every request passes). Runs before the body's fields are validated."""
    token = getattr(request.app.state, "auth_token", None)
    if token is None:
        return
    if creds is None or not hmac.compare_digest(creds.credentials.encode(), token.encode()):
        raise S.ApiError(
            401,
            "missing or wrong bearer token (Authorization: Bearer <token>)",
            "Authorization",
            "authentication_error",
        )


AUTH = [Depends(authorized)]
"""``dependencies=`` of every route behind the token."""


LOST = "the engine replica is unavailable"
"""How the message of a request whose engine replica died or could not be reached starts (503 unavailable)."""


def _engine_error(c: Completion, field: str | None = None) -> S.ApiError:
    """A request the engine refused (400 naming the field its message starts with) or failed on (500/503)."""
    msg = c.error or "unknown error"
    if msg.startswith("decoding failed"):
        return S.ApiError(500, msg, None, "server_error")
    if msg.startswith(("server shut down", LOST)):
        return S.ApiError(503, msg, None, "unavailable")
    m = re.match(r"[A-Za-z_][A-Za-z_0-9]*(\[\d+\])?", msg)
    return S.ApiError(400, msg, field or (m.group(0) if m else None))


def _lost(e: BaseException) -> S.ApiError:
    """503 for a request whose engine replica died or could not be reached (Serve is starting another)."""
    return S.ApiError(503, f"{LOST} ({type(e).__name__}): retry the request", None, "unavailable")


async def _ask(call):
    """Await one engine call (a DeploymentResponse, or a streaming response's ``__anext__()``): an ApiError the
    engine raised comes back as itself, a dead or unreachable engine replica as 503 ``unavailable``."""
    try:
        return await call
    except RequestCancelledError:
        raise
    except RayTaskError as e:
        if isinstance(e.cause, S.ApiError):
            raise e.cause from None
        raise
    except (RayActorError, RayServeException) as e:
        raise _lost(e) from None


async def _first_events(gen: DeploymentResponseGenerator) -> list[TokenEvent]:
    """The first events of an engine stream (the request's first token, or its refusal as an ApiError); the call
    is cancelled if that fails or the client goes away meanwhile."""
    try:
        first = await _ask(gen.__anext__())
    except BaseException:
        gen.cancel()
        raise
    if first[0].finished and first[0].finish_reason == "error":
        raise _engine_error(first[0].completion)
    return first


async def _events(gen: DeploymentResponseGenerator, first: list[TokenEvent]) -> AsyncIterator[TokenEvent]:
    """``first``, then the rest of an engine stream's events, up to the finishing one.

    A stream that cannot go on (the engine replica died, or the call failed) ends with an error event instead of a
    truncated body; a consumer that goes away early (the client disconnected) cancels the engine call.
    """
    batch, done = first, False
    try:
        while True:
            for ev in batch:
                yield ev
                if ev.finished:
                    done = True
                    return
            try:
                batch = await gen.__anext__()
            except RequestCancelledError:
                raise
            except Exception as e:  # noqa: BLE001  (the stream is open: report it in a last event)
                done = True
                log.warning("engine stream lost mid-request: %r", e)
                if isinstance(e, (RayActorError, RayServeException)):
                    yield error_event(0, _lost(e).message)
                else:
                    yield error_event(0, f"decoding failed: the engine call raised {type(e).__name__}: {e}")
                return
    finally:
        if not done:
            gen.cancel()


def _include_usage(body: S.ChatBody | S.CompletionBody) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _openai_error(c: Completion) -> bytes:
    """OpenAI's mid-stream error chunk ``{"error": {...}}`` for a stream that failed after it opened (the openai
    client raises it as ``APIError``)."""
    return R.sse(S.error_body(_engine_error(c)))


@serve.deployment(name="MageIngress")
@serve.ingress(api)
class MageIngress:
    """The HTTP API over the engine deployment: auth, body limits, validation, SSE; holds no model."""

    def __init__(self, engine: DeploymentHandle, bundle: str, config: dict[str, Any]):
        cfg = config_from_dict(config)
        self.engine = engine
        self.bundle = bundle
        self.api_docs = cfg.serve.api_docs
        self.openai_max_tokens = cfg.serve.openai_max_tokens
        self._facts: EngineFacts | None = None
        env = cfg.serve.auth_token_env
        token = os.environ.get(env) if env else None
        if env and not token:
            log.warning(
                "serve.auth_token_env = %r but that variable is not set on this replica: auth is OFF", env
            )
        self.metrics = IngressMetrics()
        # What the middleware and the auth dependency read (one ingress per replica process).
        api.state.auth_token = token
        api.state.max_body_bytes = cfg.serve.max_body_bytes
        api.state.metrics = self.metrics

    # ----- plumbing -----

    async def facts(self) -> EngineFacts:
        """The engine's limits and defaults (asked once; every engine replica serves the same bundle and config)."""
        if self._facts is None:
            self._facts = await _ask(self.engine.facts.remote())
        return self._facts

    def _request(self, body, facts: EngineFacts, prompt: Any = None) -> Request:
        return S.to_request(body, facts.limits, prompt=prompt, openai_max_tokens=self.openai_max_tokens)

    @staticmethod
    def _extra(facts: EngineFacts, req: Request) -> dict[str, Any]:
        d = facts.info["defaults"]
        method = req.method or d["method"]
        return {
            "preference": req.preference,
            "method": method,
            "gamma": d.get("method_gammas", {}).get(method, d["gamma"]) if req.gamma is None else req.gamma,
            "alpha": d["alpha"] if req.alpha is None else req.alpha,
        }

    @staticmethod
    def _field(req: Request) -> str:
        return "messages" if isinstance(req.prompt, list) else "prompt"

    async def _one(self, req: Request, route: str) -> Completion:
        c = await _ask(self.engine.generate.remote(req, self._field(req)))
        if c.finish_reason == "error":
            raise _engine_error(c)
        self.metrics.finished(route, c)
        return c

    async def _open(
        self, req: Request, request: HttpRequest
    ) -> tuple[DeploymentResponseGenerator, list[TokenEvent]]:
        gen = self.engine.options(stream=True).events.remote(req, self._field(req))
        first = await _first_events(gen)
        route = request.url.path
        self.metrics.first_token(route, getattr(request.state, "started", time.monotonic()))
        return gen, first

    def _streamed(self, route: str, ev: TokenEvent) -> None:
        """A stream's finishing event: count its tokens and rows."""
        self.metrics.finished(route, ev.completion)

    # ----- routes -----

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        call = self.engine.health.remote()
        try:
            ok, why = await asyncio.wait_for(_ask(call), HEALTH_TIMEOUT_S)
        except TimeoutError:
            call.cancel()
            ok, why = False, f"no engine replica answered within {HEALTH_TIMEOUT_S:.0f} s"
        except S.ApiError as e:
            ok, why = False, e.message
        return JSONResponse(
            {"status": "ok" if ok else "unhealthy", "detail": why}, status_code=200 if ok else 503
        )

    @api.get("/openapi.json", dependencies=AUTH, include_in_schema=False)
    async def openapi(self) -> dict:
        self._docs()
        return api.openapi()

    @api.get("/docs", dependencies=AUTH, include_in_schema=False)
    async def docs(self) -> HTMLResponse:
        self._docs()
        return get_swagger_ui_html(openapi_url="/openapi.json", title="mage_ray API")

    def _docs(self) -> None:
        if not self.api_docs:
            raise S.ApiError(404, "the API docs are off (serve.api_docs)", None, "not_found")

    @api.get("/v1/objectives", dependencies=AUTH)
    async def objectives(self) -> dict:
        return (await self.facts()).info

    @api.get("/v1/stats", dependencies=AUTH)
    async def stats(self) -> dict:
        return await _ask(self.engine.stats.remote())

    @api.get("/v1/front", dependencies=AUTH)
    async def front(self) -> dict:
        return front_json(self.bundle, (await self.facts()).info["objectives"])

    @staticmethod
    def _model(facts: EngineFacts) -> dict[str, Any]:
        return {"id": facts.name, "object": "model", "created": facts.created, "owned_by": "mage_ray"}

    @staticmethod
    def _check_model(facts: EngineFacts, name: str | None) -> str:
        """The served model id; ApiError 404 ``model_not_found`` when a request names another model."""
        if name is not None and name != facts.name:
            raise S.ApiError(
                404,
                f"The model {name!r} does not exist: this server serves {facts.name!r} (serve.model_name)",
                "model",
                code="model_not_found",
            )
        return facts.name

    @api.get("/v1/models", dependencies=AUTH)
    async def models(self) -> dict:
        return {"object": "list", "data": [self._model(await self.facts())]}

    @api.get("/v1/models/{model_id:path}", dependencies=AUTH)
    async def model(self, model_id: str) -> dict:
        facts = await self.facts()
        self._check_model(facts, model_id)
        return self._model(facts)

    @api.post("/v1/generate", dependencies=AUTH)
    async def generate(self, body: S.GenerateBody, request: HttpRequest):
        facts = await self.facts()
        req = self._request(body, facts)
        extra = self._extra(facts, req)
        route = request.url.path
        if body.score:  # objectives that cannot load here: 400 before anything decodes
            await _ask(self.engine.load_scorers.remote())
        if not body.stream:
            c = await self._one(req, route)
            out = {"text": c.text, "finish_reason": c.finish_reason, "usage": R.usage(c), **extra}
            if body.score:
                out["scores"] = await _ask(self.engine.score_completion.remote(req, c.text))
            return out
        gen, first = await self._open(req, request)

        async def sse() -> AsyncIterator[bytes]:
            async for ev in _events(gen, first):
                if ev.delta:
                    yield R.sse({"text": ev.delta})
                if ev.finished:
                    self._streamed(route, ev)
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
                            final["scores"] = await _ask(self.engine.score_completion.remote(req, c.text))
                        except Exception as e:  # noqa: BLE001  (the stream is open: report it in the event)
                            final["error"] = f"score: {e}"
                    yield R.sse(final)
                    yield R.sse("[DONE]")

        return StreamingResponse(sse(), media_type="text/event-stream")

    @api.post("/v1/chat/completions", dependencies=AUTH)
    async def chat_completions(self, body: S.ChatBody, request: HttpRequest):
        facts = await self.facts()
        req = self._request(body, facts)
        model, rid, extra = (
            self._check_model(facts, body.model),
            R.new_id("chatcmpl"),
            self._extra(facts, req),
        )
        route = request.url.path
        if not body.stream:
            return R.chat_response(rid, model, await self._one(req, route), extra)
        gen, first = await self._open(req, request)
        chunk = R.Chunks(rid, model, "chat.completion.chunk", _include_usage(body))

        async def sse() -> AsyncIterator[bytes]:
            yield R.sse(chunk.chat({"role": "assistant", "content": ""}, extra=extra))
            async for ev in _events(gen, first):
                if ev.delta:
                    yield R.sse(chunk.chat({"content": ev.delta}))
                if ev.finished:
                    self._streamed(route, ev)
                    if ev.finish_reason == "error":
                        yield _openai_error(ev.completion)
                    else:
                        yield R.sse(chunk.chat({}, ev.finish_reason))
                        if chunk.include_usage:
                            yield R.sse(chunk.usage_only(ev.completion))
                    yield R.sse("[DONE]")

        return StreamingResponse(sse(), media_type="text/event-stream")

    @api.post("/v1/completions", dependencies=AUTH)
    async def completions(self, body: S.CompletionBody, request: HttpRequest):
        facts = await self.facts()
        route = request.url.path
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if not prompts or len(prompts) > facts.limits.max_prompts_per_grid:
            raise S.ApiError(400, f"prompt: give 1 to {facts.limits.max_prompts_per_grid} prompts", "prompt")
        reqs = [self._request(body, facts, prompt=p) for p in prompts]
        model, rid, extra = (
            self._check_model(facts, body.model),
            R.new_id("cmpl"),
            self._extra(facts, reqs[0]),
        )
        if not body.stream:
            fields = [f"prompt[{i}]" if isinstance(body.prompt, list) else "prompt" for i in range(len(reqs))]
            comps = await _ask(self.engine.generate_many.remote(reqs, fields))
            for c in comps:
                if c.finish_reason == "error":
                    raise _engine_error(c)
            for c in comps:
                self.metrics.finished(route, c)
            return R.completion_response(rid, model, comps, extra)
        if len(reqs) != 1:
            raise S.ApiError(400, "stream: streaming takes one prompt (send a string, not a list)", "prompt")
        gen, first = await self._open(reqs[0], request)
        chunk = R.Chunks(rid, model, "text_completion", _include_usage(body))

        async def sse() -> AsyncIterator[bytes]:
            async for ev in _events(gen, first):
                if ev.delta:
                    yield R.sse(chunk.text(ev.delta))
                if ev.finished:
                    self._streamed(route, ev)
                    if ev.finish_reason == "error":
                        yield _openai_error(ev.completion)
                    else:
                        yield R.sse(chunk.text("", ev.finish_reason))
                        if chunk.include_usage:
                            yield R.sse(chunk.usage_only(ev.completion))
                    yield R.sse("[DONE]")

        return StreamingResponse(sse(), media_type="text/event-stream")

    @api.post("/v1/grid", dependencies=AUTH)
    async def grid(self, body: S.GridBody):
        points, prompts, reqs = S.grid_requests(body, (await self.facts()).limits)
        return await _ask(self.engine.grid.remote(points, prompts, reqs, body.score))


def ingress_options(cfg: Config) -> dict[str, Any]:
    """Serve options of the ingress: as many replicas as the engine (or the same autoscaling) and the same
    concurrency, no CPU reserved (it parses and formats; the engine replicas hold the cores)."""
    opts = engine_options(cfg)
    opts["ray_actor_options"] = {"num_cpus": 0}
    return opts


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder: ``{bundle: <dir>, config: <yaml path or null>, overrides: [...]}``.

    The config and the bundle are validated here (on the driver), so a bad path or field fails the deploy
    with a clear message instead of crash-looping replicas. Returns the ingress bound to the engine.
    """
    unknown = sorted(set(args) - {"bundle", "config", "overrides"})
    if unknown:
        raise ValueError(f"build_app: unknown args {unknown}; allowed: bundle, config, overrides")
    if not args.get("bundle"):
        raise ValueError("build_app: args.bundle (the bundle directory) is required")
    overrides = [str(o) for o in (args.get("overrides") or [])]
    cfg = load_config(args.get("config"), overrides)
    bundle = str(args["bundle"])  # a local path or a URI (each replica then loads its node's local copy)
    b = load_bundle(bundle)
    if len(b.objectives) < 2:  # pragma: no cover  (load_bundle already enforces it)
        raise ValueError(f"bundle {bundle}: needs >= 2 objectives")
    opts = engine_options(cfg)
    from mage_ray.devices import note_request

    replicas = (
        cfg.serve.autoscaling.get("min_replicas", 1) if cfg.serve.autoscaling else cfg.serve.num_replicas
    )
    actor = opts["ray_actor_options"]
    note_request(
        "Serve engine replica", {"CPU": actor["num_cpus"], "GPU": actor["num_gpus"]}, max(1, int(replicas))
    )
    engine = MageEngine.options(**opts).bind(b.location, cfg.to_dict(), overrides)
    return MageIngress.options(**ingress_options(cfg)).bind(engine, b.location, cfg.to_dict())
