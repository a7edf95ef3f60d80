"""Requests and results of the decode engine, and the one request normaliser.

:func:`normalise` turns a :class:`Request` plus the engine's defaults into a validated, tokenised job with its
plan (the method's rows, :mod:`mage_ray.guidance`), or raises :class:`RequestError` naming the bad field. The
engine calls it for every request; Serve calls it (through ``Engine.prepare``) before queueing a request.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mage_ray.config import DecodeConfig
from mage_ray.guidance import AdapterLayout, Plan, PlanArgs, make_plan
from mage_ray.models import encode_prompt
from mage_ray.soup import PreferenceError, validate_preference

if TYPE_CHECKING:
    from mage_ray.bundle import Bundle

__all__ = ["Completion", "Request", "RequestError", "TokenEvent", "Usage", "decode_defaults", "normalise"]


@dataclass
class Request:
    """One generation request. ``None`` fields take the engine's defaults (its DecodeConfig)."""

    prompt: str | list[dict]
    """User prompt text or chat messages [{role, content}]; formatted with the chat template when enabled."""
    preference: Sequence[float] | None = None
    """mu on the simplex, one weight per objective (not needed for method 'base')."""
    method: str | None = None
    gamma: float | None = None
    """Guidance strength (Eq. 25), >= 0."""
    alpha: float | None = None
    """Extrapolation of the Bone Soup policy row (Eq. 13), > -1."""
    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    """0 disables top-k."""
    top_p: float | None = None
    beam_width: int | None = None
    """b of Table 4."""
    beam_expansion: int | None = None
    """c of Table 4."""
    lookahead: int | None = None
    """l of Table 4 (tokens between re-rankings)."""
    stop: list[str] | None = None
    """Stop strings: the text ends before the first occurrence of any of them."""
    seed: int | None = None
    """Seed of this request's sampling generator (default: the engine's decode seed)."""
    implicit_merge: str = "bone"
    """mage-i-m only: "bone" (MAGE-I-M, Bone Soup pi*) or "naive" (MAGE-I-M', c = mu)."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks with a fixed length)."""
    prepared: Any = field(default=None, repr=False, compare=False)
    """Set by :meth:`Engine.prepare` when a caller (Serve) normalised the request ahead of decoding: the engine
    then uses that job as is instead of validating and tokenising the request again."""


class RequestError(ValueError):
    """A request the normaliser refuses; ``field`` names the bad request field (``info``: numbers behind it)."""

    def __init__(self, field: str, message: str, info: dict[str, Any] | None = None):
        super().__init__(message)
        self.field = field
        self.info = dict(info or {})


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    """Result of one request."""

    text: str
    """Generated text (special tokens removed, cut before a stop string)."""
    token_ids: list[int]
    """Generated token ids, including a final EOS or the token that completed a stop string."""
    finish_reason: str
    """"stop" | "length" | "eos" | "error" | "cancelled"."""
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    rows_used: int = 0
    """Peak number of batch rows this request occupied (rows per hypothesis x live beam candidates)."""


@dataclass
class TokenEvent:
    """Progress of one request in one decode step (what :meth:`Engine.stream` yields, a list per step)."""

    index: int
    """Position of the request in the list given to stream()."""
    delta: str
    """New text since the previous event. Text that might be the start of a stop string (or an incomplete
    UTF-8 character) is held back until resolved; beam requests emit all their text when they finish."""
    finished: bool = False
    finish_reason: str | None = None
    completion: Completion | None = None
    """The final result, on the finishing event."""


@dataclass
class _Job:
    """A validated request and its decoding state."""

    index: int
    method: str
    plan: Plan
    prompt_ids: list[int]
    gamma: float
    max_new: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    b: int
    c: int
    lookahead: int
    stop: list[str]
    ignore_eos: bool
    generator: torch.Generator
    coeffs: torch.Tensor = None  # [R_job, K]
    hyps: list[Any] = field(default_factory=list)  # the job's live hypotheses (decode.batch._Hyp)
    chunk_pos: int = 0
    expanded: bool = False
    emitted: str = ""
    done: bool = False
    peak_rows: int = 0
    owner: int = 0  # id() of the engine that prepared the job

    @property
    def n_rows(self) -> int:
        return len(self.plan.rows)

    @property
    def beam(self) -> bool:
        return self.b * self.c > 1

    @property
    def kv_tokens(self) -> int:
        """KV-cache rows x tokens this request may hold at its peak: its rows (x b*c beam candidates) x (prompt +
        max new tokens). What Serve's token budget (``serve.max_batch_tokens``) counts."""
        return self.n_rows * (self.b * self.c if self.beam else 1) * (len(self.prompt_ids) + self.max_new)


def normalise(
    r: Request,
    index: int,
    *,
    defaults: DecodeConfig,
    layout: AdapterLayout,
    tokenizer: Any,
    use_chat_template: bool,
    max_context: int,
) -> _Job:
    """The one request normaliser: validate ``r`` against ``defaults`` (a request's None fields take them), build
    its plan on the engine's adapter ``layout`` and tokenise its prompt. Returns the job the decode loop runs;
    raises RequestError naming the bad field."""
    d = defaults

    def pick(name: str):
        v = getattr(r, name)
        return getattr(d, name) if v is None else v

    def number(
        name: str, v, lo: float, hi: float | None = None, lo_open: bool = False, integer: bool = False
    ):
        ok = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)
        if ok and integer:
            ok = float(v).is_integer()
        if ok:
            ok = (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)
        if not ok:
            rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise RequestError(
                name,
                f"{name} = {v!r} is invalid: expected {'an integer' if integer else 'a number'} {rng}",
            )
        return int(v) if integer else float(v)

    method = pick("method")
    if not isinstance(method, str):
        raise RequestError("method", f"method = {method!r} is invalid: expected a method name")
    g = r.gamma if r.gamma is not None else (d.method_gammas or {}).get(method, d.gamma)  # per-method default
    gamma = number("gamma", g, 0.0)
    alpha = number("alpha", pick("alpha"), -1.0, lo_open=True)
    max_new = number("max_new_tokens", pick("max_new_tokens"), 1, d.max_tokens_limit, integer=True)
    temperature = number("temperature", pick("temperature"), 0.0, lo_open=True)
    top_k = number("top_k", pick("top_k"), 0, integer=True)
    top_p = number("top_p", pick("top_p"), 0.0, 1.0, lo_open=True)
    b = number("beam_width", pick("beam_width"), 1, 64, integer=True)
    c = number("beam_expansion", pick("beam_expansion"), 1, 64, integer=True)
    lookahead = number("lookahead", pick("lookahead"), 1, integer=True)
    do_sample = pick("do_sample")
    if not isinstance(do_sample, (bool, np.bool_)):
        raise RequestError("do_sample", f"do_sample = {do_sample!r} is invalid: expected true or false")
    do_sample = bool(do_sample)
    seed = pick("seed")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise RequestError("seed", f"seed = {seed!r} is invalid: expected an integer")
    stop = list(r.stop or [])
    if not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop", f"stop = {r.stop!r} is invalid: expected a list of non-empty strings")
    if r.implicit_merge not in ("bone", "naive"):
        raise RequestError(
            "implicit_merge",
            f"implicit_merge = {r.implicit_merge!r} is invalid: expected 'bone' or 'naive'",
        )
    prompt = r.prompt
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RequestError(
                "prompt", "prompt is empty: expected a non-empty string or a list of chat messages"
            )
    elif isinstance(prompt, list) and prompt:
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt):
            raise RequestError(
                "prompt", "prompt: chat messages must be dicts with a string 'content' (and a 'role')"
            )
    else:
        raise RequestError(
            "prompt",
            "prompt is empty or not text: expected a non-empty string or a list of chat messages",
        )
    mu = None
    if r.preference is not None:
        try:
            mu = validate_preference(r.preference, layout.n)
        except (TypeError, ValueError) as e:
            msg = (
                str(e) if isinstance(e, PreferenceError) else f"preference = {r.preference!r} is invalid: {e}"
            )
            raise RequestError("preference", msg) from e
    try:
        plan = make_plan(method, layout, mu, PlanArgs(alpha, r.implicit_merge, prompt), gamma)
    except (ValueError, NotImplementedError) as e:  # the method cannot serve this request on this bundle
        raise RequestError("method", str(e)) from e
    if plan.prompt is not None:
        prompt = plan.prompt
    tok = tokenizer
    ids = encode_prompt(tok, prompt, use_chat_template)
    if not ids:
        raise RequestError("prompt", "prompt tokenises to zero tokens")
    if len(ids) + max_new > max_context:
        raise RequestError(
            "prompt",
            f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new}) exceeds the model context of "
            f"{max_context} tokens: shorten the prompt or lower max_new_tokens",
            {"prompt_tokens": len(ids), "max_new_tokens": max_new, "max_context": max_context},
        )
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    job = _Job(
        index,
        method,
        plan,
        ids,
        gamma,
        max_new,
        do_sample,
        temperature,
        top_k,
        top_p,
        b,
        c,
        lookahead,
        stop,
        bool(r.ignore_eos),
        gen,
    )
    coeffs = np.stack([row.coeffs for row in plan.rows])  # [R_job, K]
    job.coeffs = torch.tensor(coeffs, dtype=torch.float32)
    return job


def decode_defaults(cfg, bundle: Bundle, overrides: Sequence[str] = ()) -> DecodeConfig:
    """The decode defaults for a bundle: ``cfg.decode`` with the bundle's method, gamma, alpha, method_gammas.

    The sweep chose the bundle's method / gamma / alpha / per-method gammas, so they win over the YAML config; a
    command-line override (``decode.gamma=2``, ``decode.method_gammas={genarm: 2}``) wins over the bundle; a
    method in ``method_gammas`` keeps its own gamma whatever ``decode.gamma`` says. Serving, grids and evaluation
    all decode with these.
    """
    given = {o.split("=", 1)[0].strip() for o in overrides}
    d = cfg.decode
    kw = {
        k: getattr(d, k) if f"decode.{k}" in given else v
        for k, v in (
            ("method", bundle.default_method),
            ("gamma", bundle.gamma),
            ("alpha", bundle.alpha),
            ("method_gammas", {**d.method_gammas, **bundle.method_gammas}),
        )
    }
    return DecodeConfig(**{**d.__dict__, **kw})
