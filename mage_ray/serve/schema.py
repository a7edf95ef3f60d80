"""HTTP schema of the serving API: pydantic request bodies and their validation (responses: :mod:`.responses`).

Endpoints (see :mod:`mage_ray.serve.app`):

* ``POST /v1/generate``          :class:`GenerateBody`    native API (prompt or messages, preference, method, ...,
                                                          ``score``)
* ``POST /v1/chat/completions``  :class:`ChatBody`        OpenAI-compatible; extra fields ``preference``, ``mage``
* ``POST /v1/completions``       :class:`CompletionBody`  OpenAI-compatible; extra fields ``preference``, ``mage``
* ``POST /v1/grid``              :class:`GridBody`        prompts x preference grid, optionally scored

Validation happens in two steps. Pydantic checks types and fixed ranges (a NaN, a negative ``gamma``, an
unknown field); :func:`to_request` then checks what depends on the served bundle (the preference length, the
``max_tokens`` limit, the method registry) and builds a :class:`mage_ray.decode.Request`. Every failure is an
:class:`ApiError` with the HTTP status, a message and the offending ``field`` (``preference[1]``,
``mage.gamma``, ...); the app renders it as ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape,
so the ``openai`` client raises a ``BadRequestError`` carrying it).

The FastAPI routes take these models as their body parameters (so ``/openapi.json`` lists them) and
:func:`validation_error` turns FastAPI's validation errors into the same ApiError that :func:`parse_body` (the
plain-function path, JSON bytes in) gives for the same body.

Defaults: ``/v1/generate`` and ``/v1/grid`` decode as the config says (``decode.do_sample``: greedy, the paper's
guided argmax of Eq. 25, in every shipped config; ``decode.max_new_tokens``). The OpenAI endpoints follow
OpenAI's defaults: with ``temperature`` omitted they sample at temperature 1 (``temperature: 0`` is greedy, as is
``mage.do_sample: false``), and with ``max_tokens`` (or ``max_completion_tokens``) omitted a reply may run to
``serve.openai_max_tokens`` tokens (:data:`OPENAI_MAX_TOKENS` unless configured), where OpenAI's run to the
context length. A request without ``preference`` gets the uniform one (1/n each); the response echoes the
preference and method it was decoded with.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from mage_ray.decode import Request
from mage_ray.serve.limits import ApiError, Limits, error_body, json_error
from mage_ray.soup import PreferenceError, preference_grid, validate_preference

__all__ = [
    "OPENAI_MAX_TOKENS",
    "OPENAI_TEMPERATURE",
    "ApiError",
    "ChatBody",
    "ChatMessage",
    "CompletionBody",
    "GenerateBody",
    "GridBody",
    "GridSpec",
    "Limits",
    "MageParams",
    "error_body",
    "grid_points",
    "grid_requests",
    "parse_body",
    "to_request",
    "validation_error",
]

OPENAI_TEMPERATURE = 1.0
"""OpenAI's default sampling temperature, used by the OpenAI endpoints when a request sets none."""
OPENAI_MAX_TOKENS = 512
"""Default ``serve.openai_max_tokens``: the completion budget of an OpenAI request that sets no max_tokens."""

PREFERENCE_TOL = 1e-4
"""A preference may miss sum 1 by this much (JSON rounding); it is then renormalised exactly."""

Finite = Annotated[float, Field(allow_inf_nan=False)]


# ----- request bodies -----


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"] = "user"
    content: str


class _Method(_Body):
    """The decoding method and its knobs, shared by every body that decodes (unset: the bundle's defaults)."""

    method: str | None = None
    """rs | bs | mod | mage-e | mage-e-m | mage-i | mage-i-m | base | ... (default: the bundle's)."""
    gamma: Finite | None = Field(None, ge=0.0, le=1000.0)
    """Guidance strength of Eq. 25."""
    alpha: Finite | None = Field(None, gt=-1.0, le=10.0)
    """Extrapolation of Eq. 13."""
    do_sample: bool | None = None
    top_k: int | None = Field(None, ge=0)


class MageParams(_Method):
    """Decoding options beyond OpenAI's (the ``mage`` field of the OpenAI-compatible endpoints)."""

    beam_width: int | None = Field(None, ge=1, le=64)
    beam_expansion: int | None = Field(None, ge=1, le=64)
    lookahead: int | None = Field(None, ge=1, le=4096)
    implicit_merge: Literal["bone", "naive"] = "bone"
    ignore_eos: bool = False
    """Decode exactly max_tokens tokens (benchmarks)."""


class GenerateBody(_Method):
    """``POST /v1/generate``: one prompt (text or chat messages), one preference."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    preference: list[Finite] | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: Finite | None = Field(None, gt=0.0, le=100.0)
    top_p: Finite | None = Field(None, gt=0.0, le=1.0)
    beam_width: int | None = Field(None, ge=1, le=64)
    beam_expansion: int | None = Field(None, ge=1, le=64)
    lookahead: int | None = Field(None, ge=1, le=4096)
    stop: str | list[str] | None = None
    seed: int | None = None
    implicit_merge: Literal["bone", "naive"] = "bone"
    ignore_eos: bool = False
    stream: bool = False
    score: bool = False
    """Score the completion with the bundle's objectives: the response (or the stream's final event) gains
    ``scores``, one per objective in the bundle's order."""


class StreamOptions(_Body):
    """OpenAI's ``stream_options`` (only with ``stream: true``)."""

    include_usage: bool = False
    """Send a last chunk with ``choices: []`` and the request's usage (other chunks carry ``usage: null``)."""
    include_obfuscation: bool | None = None
    """Accepted and ignored (OpenAI pads chunks against side channels; this server does not)."""


_OPENAI_UNSUPPORTED = {
    "logit_bias": None,
    "top_logprobs": None,
    "tools": None,
    "tool_choice": ("none",),
    "functions": None,
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": None,
    "prediction": None,
    "reasoning_effort": None,
    "web_search_options": None,
    "verbosity": None,
    "best_of": (1,),
    "echo": (False,),
    "suffix": None,
}
"""Standard OpenAI request fields this server cannot honour, with the values that mean "not used" (besides
null): a request setting one to anything else is refused naming it (n, logprobs and the penalties likewise)."""


class _OpenAIBody(_Body):
    # The standard OpenAI request fields are declared: the ones that change nothing here (user, metadata, store,
    # service_tier, ...) are accepted and ignored, the ones that would change the result are refused by name when
    # set (n > 1, logprobs, penalties, tools, ...: _OPENAI_UNSUPPORTED); any other key is an error naming it.
    model: str | None = None
    preference: list[Finite] | None = None
    mage: MageParams = Field(default_factory=MageParams)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: Finite | None = Field(None, ge=0.0, le=100.0)
    top_p: Finite | None = Field(None, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    presence_penalty: Finite | None = None
    frequency_penalty: Finite | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    logit_bias: dict[str, Any] | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None
    verbosity: str | None = None
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class ChatBody(_OpenAIBody):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]


class CompletionBody(_OpenAIBody):
    """``POST /v1/completions`` (the prompt is still wrapped in the bundle's chat template when it has one)."""

    prompt: str | list[str]


class GridSpec(_Body):
    """A simplex lattice: all mu with entries in {0, step, ..., 1} summing to 1 (``preference_grid``)."""

    n_objectives: int = Field(ge=2, le=64)
    step: Finite = Field(gt=0.0, le=1.0)


class GridBody(_Method):
    """``POST /v1/grid``: every prompt at every preference, one method; optionally scored by the objectives."""

    prompts: list[str | list[ChatMessage]]
    preferences: Annotated[
        Annotated[list[list[Finite]], Tag("list[list[float]]")] | Annotated[GridSpec, Tag("GridSpec")],
        Discriminator(lambda v: "GridSpec" if isinstance(v, dict | GridSpec) else "list[list[float]]"),
    ]
    """Explicit points, or a lattice ``{n_objectives, step}`` (an object is read as the lattice only)."""
    max_tokens: int | None = Field(None, ge=1)
    temperature: Finite | None = Field(None, gt=0.0, le=100.0)
    top_p: Finite | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    score: bool = False


# ----- parsing and validation -----


_UNION_TAG = re.compile(r"^(str|int|float|bool|none)$|[\[\]-]|^[A-Z]")
"""Parts of a pydantic error location that name a union branch (``str``, ``list[str]``, ``GridSpec``,
``function-after[...]``), not a field: request fields are lower-case identifiers."""


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _UNION_TAG.search(str(part)):
            out += ("." if out else "") + str(part)
    return out or "body"


def _problem(err: dict) -> tuple[str, str]:
    where = _loc(err["loc"])
    if err["type"] == "extra_forbidden":
        return where, f"{where}: unknown field (not part of this API)"
    return where, f"{where}: {err['msg']}"


def _fields_error(errors: list[dict]) -> ApiError:
    """ApiError 400 naming the (first) field at fault and listing every problem (up to 4) in the message."""
    problems = list(dict.fromkeys(_problem(err) for err in errors))
    first = problems[0][0]
    more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
    return ApiError(400, "; ".join(m for _, m in problems[:4]) + more, first)


def _not_json(detail: str) -> ApiError:
    return ApiError(400, f"request body is not valid JSON: {detail}", "body")


def _not_object(data: Any) -> ApiError:
    return ApiError(400, f"request body must be a JSON object, got {type(data).__name__}", "body")


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """JSON bytes -> a validated body; malformed JSON or bad fields -> ApiError 400 naming the (first) field and
    listing every problem (up to 4) in the message."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _not_json(str(e)) from None
    if not isinstance(data, dict):
        raise _not_object(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _fields_error(e.errors(include_url=False)) from None


_NOT_A_MAPPING = ("model_type", "model_attributes_type", "dict_type")
"""pydantic's error types for a body that is not an object."""


def validation_error(errors: list[dict], body: Any = None) -> ApiError:
    """FastAPI's validation errors of a request (``RequestValidationError.errors()``, ``.body``) as the ApiError
    :func:`parse_body` gives for the same bytes: a JSON syntax error, an empty body or one that is not an object
    (location ``body``), else the fields at fault (the ``body`` prefix of their locations dropped)."""
    first = errors[0] if errors else {"loc": ("body",), "type": "missing"}
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
        return _not_json(json_error(body or "", (first.get("ctx") or {}).get("error", "invalid JSON"), pos))
    if loc == ("body",) and first.get("type") == "missing":  # no body at all
        return _not_json(json_error("", "Expecting value", 0))
    if loc == ("body",) and first.get("type") in _NOT_A_MAPPING:
        return _not_object(first.get("input"))
    cleaned = [
        {**e, "loc": tuple(e.get("loc", ()))[1:] if e.get("loc", ("",))[0] == "body" else e["loc"]}
        for e in errors
    ]
    return _fields_error(cleaned)


def check_preference(pref: list[float] | None, limits: Limits, method: str | None, name: str = "preference"):
    """The preference as a float list on the simplex (uniform when omitted); ApiError naming the entry."""
    n = limits.n_objectives
    if pref is None:
        return None if method == "base" else [1.0 / n] * n
    try:
        mu = validate_preference(pref, n, tol=PREFERENCE_TOL, name=name)
    except PreferenceError as e:
        msg = str(e)
        bad = msg.split(" ", 1)[0] if msg.startswith(f"{name}[") else name
        raise ApiError(400, f"{msg} (objectives: {list(limits.objectives) or n})", bad) from None
    return [float(x) for x in mu / mu.sum()]


def _stops(stop: str | list[str] | None, limits: Limits, name: str) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > limits.max_stop:
        raise ApiError(400, f"{name}: at most {limits.max_stop} stop strings, got {len(stops)}", name)
    if not all(stops):
        raise ApiError(400, f"{name}: stop strings must be non-empty", name)
    return stops or None


def _max_tokens(v: int | None, limits: Limits, name: str) -> int | None:
    if v is not None and v > limits.max_tokens_limit:
        raise ApiError(
            400,
            f"{name} = {v} exceeds the server limit decode.max_tokens_limit = {limits.max_tokens_limit}",
            name,
        )
    return v


def _method(m: str | None, limits: Limits, name: str) -> str | None:
    if m is not None and m not in limits.methods:
        raise ApiError(400, f"{name} = {m!r} is not available: this server runs {list(limits.methods)}", name)
    return m


def _prompt(prompt: Any, name: str) -> Any:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ApiError(400, f"{name} is empty: expected non-empty text", name)
        return prompt
    if not prompt:
        raise ApiError(400, f"{name} is empty: expected at least one chat message", name)
    msgs = [{"role": m.role, "content": m.content} for m in prompt]
    if not any(m["content"].strip() for m in msgs):
        raise ApiError(400, f"{name}: every message is empty", name)
    return msgs


_DECODING_FIELDS = (
    "gamma",
    "alpha",
    "top_k",
    "beam_width",
    "beam_expansion",
    "lookahead",
    "implicit_merge",
    "ignore_eos",
)
"""Request fields a body (or an OpenAI body's ``mage`` object) carries under the same name; a body without one
(grids have no beams) leaves the Request's default."""


def _request(decoding: BaseModel, **fields: Any) -> Request:
    """The engine Request of one prompt: ``fields`` (the ones each body spells its own way) plus the decoding
    options ``decoding`` has under the Request's names. The engine's normaliser checks the values."""
    same = {f: getattr(decoding, f) for f in _DECODING_FIELDS if f in type(decoding).model_fields}
    return Request(**fields, **same)


def _unsupported(name: str, why: str) -> ApiError:
    return ApiError(400, f"{name} is not supported: {why}", name, code="unsupported_parameter")


def _check_openai_fields(body: ChatBody | CompletionBody) -> None:
    """Refuse, by name, the standard OpenAI fields this server cannot honour when a request sets them."""
    if body.n != 1:
        raise _unsupported("n", f"n = {body.n}; this server returns one choice (n = 1)")
    if body.logprobs:
        raise _unsupported("logprobs", "this server returns no log-probabilities")
    for f in ("presence_penalty", "frequency_penalty"):
        if getattr(body, f):
            raise _unsupported(f, "use the 'mage' decoding options")
    for f, unused in _OPENAI_UNSUPPORTED.items():
        v = getattr(body, f)
        if v is not None and v not in (unused or ()):
            raise _unsupported(f, "this server generates plain text with the 'mage' decoding options")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")


def to_request(
    body: GenerateBody | ChatBody | CompletionBody,
    limits: Limits,
    prompt: Any = None,
    openai_max_tokens: int = OPENAI_MAX_TOKENS,
) -> Request:
    """Build the engine Request of one body (``prompt`` picks one prompt of a CompletionBody list).

    ``openai_max_tokens`` (``serve.openai_max_tokens``): the completion budget of an OpenAI body without max_tokens
    (at most the server's limit); the OpenAI bodies sample at :data:`OPENAI_TEMPERATURE` unless they say otherwise
    (module docstring)."""
    if isinstance(body, GenerateBody):
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of 'prompt' (text) or 'messages' (chat)", "prompt")
        p = _prompt(body.prompt, "prompt") if body.prompt is not None else _prompt(body.messages, "messages")
        method = _method(body.method, limits, "method")
        return _request(
            body,
            prompt=p,
            preference=check_preference(body.preference, limits, method),
            method=method,
            max_new_tokens=_max_tokens(body.max_tokens, limits, "max_tokens"),
            do_sample=body.do_sample if body.do_sample is not None else (True if body.temperature else None),
            temperature=body.temperature,
            top_p=body.top_p,
            stop=_stops(body.stop, limits, "stop"),
            seed=body.seed,
        )
    _check_openai_fields(body)
    if isinstance(body, ChatBody):
        p = _prompt(body.messages, "messages")
    else:
        p = _prompt(prompt if prompt is not None else body.prompt, "prompt")
    m = body.mage
    method = _method(m.method, limits, "mage.method")
    mt = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = _max_tokens(body.max_completion_tokens or body.max_tokens, limits, mt)
    if max_tokens is None:  # OpenAI's default: no limit but the context; ours: serve.openai_max_tokens
        max_tokens = min(openai_max_tokens, limits.max_tokens_limit)
    do_sample = m.do_sample
    temperature = body.temperature
    if do_sample is None:  # OpenAI samples unless temperature is 0
        do_sample = temperature is None or temperature > 0
    if temperature is None and do_sample:
        temperature = OPENAI_TEMPERATURE
    if temperature == 0 or not do_sample:
        temperature = None  # greedy; the engine only reads temperature when sampling
    return _request(
        m,
        prompt=p,
        preference=check_preference(body.preference, limits, method),
        method=method,
        max_new_tokens=max_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=body.top_p,
        stop=_stops(body.stop, limits, "stop"),
        seed=body.seed,
    )


def grid_points(body: GridBody, limits: Limits) -> np.ndarray:
    """The (P, n) preference points of a grid body, bounded by ``limits.max_grid_points``."""
    n = limits.n_objectives
    if isinstance(body.preferences, GridSpec):
        spec = body.preferences
        if spec.n_objectives != n:
            raise ApiError(
                400,
                f"preferences.n_objectives = {spec.n_objectives} but the bundle has {n} "
                f"objectives {list(limits.objectives)}",
                "preferences.n_objectives",
            )
        m = round(1.0 / spec.step)
        if abs(m * spec.step - 1.0) > 1e-9:
            raise ApiError(
                400, f"preferences.step = {spec.step} must divide 1 (1/step an integer)", "preferences.step"
            )
        count = math.comb(m + n - 1, n - 1)
        if count > limits.max_grid_points:
            raise ApiError(
                400,
                f"preferences: step {spec.step} gives {count} points, more than "
                f"serve.max_grid_points = {limits.max_grid_points}",
                "preferences.step",
            )
        return preference_grid(n, spec.step)
    if not body.preferences:
        raise ApiError(400, "preferences is empty", "preferences")
    _at_most(len(body.preferences), limits.max_grid_points, "preferences", "points", "max_grid_points")
    rows = [
        check_preference(p, limits, None, name=f"preferences[{i}]") for i, p in enumerate(body.preferences)
    ]
    return np.asarray(rows, dtype=np.float64)


def _at_most(count: int, limit: int, name: str, unit: str, setting: str) -> None:
    """ApiError 400 naming ``name`` when ``count`` exceeds the ``serve.<setting>`` limit."""
    if count > limit:
        raise ApiError(400, f"{name} has {count} {unit}, more than serve.{setting} = {limit}", name)


def grid_requests(body: GridBody, limits: Limits) -> tuple[np.ndarray, list[Any], list[Request]]:
    """(points [P, n], prompts, requests in point-major order: request p * len(prompts) + i)."""
    if not body.prompts:
        raise ApiError(400, "prompts is empty", "prompts")
    _at_most(len(body.prompts), limits.max_prompts_per_grid, "prompts", "entries", "max_prompts_per_grid")
    prompts = [_prompt(p, f"prompts[{i}]") for i, p in enumerate(body.prompts)]
    points = grid_points(body, limits)
    method = _method(body.method, limits, "method")
    max_tokens = _max_tokens(body.max_tokens, limits, "max_tokens")
    stops = _stops(body.stop, limits, "stop")
    do_sample = body.do_sample if body.do_sample is not None else (True if body.temperature else None)
    reqs = [
        _request(
            body,
            prompt=p,
            preference=[float(x) for x in mu],
            method=method,
            max_new_tokens=max_tokens,
            do_sample=do_sample,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=stops,
            seed=body.seed,
        )
        for mu in points
        for p in prompts
    ]
    return points, prompts, reqs
