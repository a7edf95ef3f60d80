"""One batched decode loop for every method (RS, BS, MOD, MAGE-{E,E-M,I,I-M}, baselines) over one base model.

Every request expands into rows (:mod:`mage_ray.guidance`); all rows of all requests run in ONE forward per
step over one copy of the base weights, each row with its own LoRA coefficient vector (DESIGN.md §2). Per
step:

    h      = decoder_body(rows)[:, -1]                 [R, H]  final normalised hidden state (KV-cached)
    logp_r = log_softmax(lm_head(h_r))                 [V]     only rows that need logits
    val_r  = sum_j e_rj (W_j h_r + b_j)                [V]     only rows with value heads (no lm_head)
    score  = log pi_base + gamma * V                   [V]     per request (Eq. 25 in log space)

Decoding modes (per request):

* greedy: y_t = argmax score (Eq. 25).
* sampling: guidance is applied BEFORE truncation: s = log pi_base / T + gamma * V; then top-k, then top-p
  (the smallest set of highest-s tokens whose softmax(s) mass reaches top_p, renormalised after top-k),
  then one draw from softmax(s) on the kept tokens with the request's own ``torch.Generator`` (seeded by
  ``Request.seed``), so a request's samples do not depend on what else is in the batch.
* beam lookahead (Table 4 / Sec 5.6.2 of mage.txt: beam width b, expansion c, lookahead interval l): a
  chunk-level beam search. At the start of each chunk every live beam expands into c candidates (its top-c
  next tokens by score; c draws without replacement when sampling; the first chunk expands the prompt into
  b*c candidates); each candidate then continues for the rest of the l-token chunk (greedy or sampled); at
  the chunk end all candidates of the request are ranked by their sequence score and the best b are kept.
  The sequence score is the log-space version of Eq. 25 for a whole sequence, log pi_base(y) + gamma * V(x, y):
  sum_t log pi_base(y_t) plus gamma * (implicit methods: sum_t V_t(y_t) = log pi*(y)/pi_ref(y), which
  Eq. 21-23 identify with V(x, y) - V(x); explicit methods: V of the last token, the value model's estimate of
  the final reward; no-guidance methods: nothing). No length normalisation. b = c = 1 is plain decoding.
  Candidates are rows too: they share the batch (and the KV cache rows are copied on expansion).

The paper does not spell the beam procedure out beyond (b, c, l); this is the chunk-level beam search of
Zhou et al. 2024 ("weak-to-strong search", W = b, K = c, L = l), which it cites for implicit values.

Requests are validated before the batch runs; an invalid request gets ``finish_reason="error"`` and the rest of
the batch runs normally. Requests that finish (EOS, stop string, max tokens) leave the batch: their rows are
pruned from the KV cache, so cost falls as rows finish. ``stream(requests, admit=...)`` also takes new requests
between steps (continuous batching): they are prefilled on their own and their KV cache is merged into the
running one (left padded to a common length; positions come from the attention mask).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mage_ray.bundle import Bundle, adapter_path, load_bundle
from mage_ray.config import DecodeConfig
from mage_ray.guidance import ADAPTER_GROUPS, AdapterLayout, Plan, PlanArgs, groups_for, make_plan
from mage_ray.lora_mix import LoraAdapter, MixedLinear, MixedLoraModel, load_adapter
from mage_ray.models import format_prompt
from mage_ray.soup import PreferenceError, validate_preference

__all__ = ["Completion", "Engine", "EngineParts", "Request", "TokenEvent", "Usage", "parts_from_bundle"]


# ----- public data -----


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
class EngineParts:
    """Everything the engine runs, already in memory (tests build these; bundles go through from_bundle)."""

    model: Any
    """HF causal LM (the base / SFT policy); wrapped in place by MixedLoraModel."""
    tokenizer: Any
    beta: float
    backbones: Sequence[LoraAdapter]
    """n backbone adapters in B(beta) column order."""
    rs_backbones: Sequence[LoraAdapter] = ()
    wrpo_backbones: Sequence[LoraAdapter] = ()
    """n WRPO-trained backbones of the same B(beta) (method bs-wrpo), or none."""
    values: Sequence[Any] = ()
    """n explicit value models (objects with .adapter, .head_weight [V, H], .head_bias [V]), objective order."""
    morlhf: Sequence[tuple[Sequence[float], LoraAdapter]] = ()
    modpo: Sequence[tuple[Sequence[float], LoraAdapter]] = ()
    ric: LoraAdapter | None = None
    ric_info: dict | None = None
    objectives: Sequence[str] | None = None
    alpha: float = 0.0
    gamma: float = 1.0
    default_method: str = "mage-e-m"
    max_context: int | None = None
    """Prompt + completion token limit (None: the model's max_position_embeddings)."""
    use_chat_template: bool = True


# ----- internal state -----


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
    hyps: list[_Hyp] = field(default_factory=list)
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


@dataclass
class _Hyp:
    """One hypothesis (a request's sequence, or one beam candidate): n_rows batch rows sharing its tokens."""

    job: _Job
    tokens: list[int] = field(default_factory=list)
    logp_sum: float = 0.0
    guide_sum: float = 0.0
    text: str = ""
    finish_reason: str | None = None
    row_start: int = -1

    @property
    def score(self) -> float:
        return self.logp_sum + self.guide_sum

    def child(self) -> _Hyp:
        return dataclasses.replace(self, tokens=list(self.tokens))


@dataclass
class _Layout:
    """Index tensors of one batch composition (rebuilt only when hypotheses join or leave).

    The combination of row outputs into per-hypothesis scores is a sparse [N, .] matrix product, with the
    value-head mixing e_j and gamma folded into the guide matrix.
    """

    C: torch.Tensor  # [R, K] coefficients of every row
    n_hyps: int
    logit_rows: torch.Tensor  # [RL] rows that need lm_head
    head_rows: list[tuple[int, torch.Tensor]]  # (head j, rows that read head j); outputs stacked as Z [RZ, V]
    # [N] logp position of each hypothesis, when every base is one row with weight 1
    base_pick: torch.Tensor | None
    # else sparse [N, RL]: log pi_base = base_mat @ logp (log_softmax again where renorm)
    base_mat: torch.Tensor | None
    renorm: torch.Tensor  # [N] bool: hypotheses whose base is a mixture (MOD)
    guide_l: torch.Tensor | None  # sparse [N, RL]: gamma * w on logp rows
    guide_z: torch.Tensor | None  # sparse [N, RZ]: gamma * w * e_j on value-head outputs


def _error(msg: str) -> Completion:
    return Completion(text="", token_ids=[], finish_reason="error", error=msg)


def _stop_hold(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


def _truncate(scores: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p on one score vector s [V]; returns (kept token ids [m], their scores [m]), best first.

    top-p keeps token j (sorted by s, descending) while the softmax mass of the tokens before it is < top_p,
    with the mass renormalised over the top-k set. Exact but cheap: the nucleus is searched in a growing top-m
    prefix (m = 256, 1024, ...) whose mass is checked against top_p.
    """
    V = scores.shape[-1]
    k = top_k if 0 < top_k < V else V
    if top_p >= 1.0:
        if k == V:
            return torch.arange(V, device=scores.device), scores
        vals, idx = torch.topk(scores, k)
        return idx, vals
    top = scores if k == V else torch.topk(scores, k).values
    lse = torch.logsumexp(top, dim=-1)  # normaliser of the top-k set
    m = min(k, 256)
    while True:
        vals, idx = torch.topk(scores, m)  # sorted descending
        probs = torch.exp(vals - lse)  # [m]
        cum = torch.cumsum(probs, -1)
        if cum[-1] >= top_p or m == k:
            break
        m = min(4 * m, k)
    keep = int(((cum - probs) < top_p).sum().clamp(min=1))
    return idx[:keep], vals[:keep]


def _merge_caches(cache_a, mask_a, cache_b, mask_b):
    """Concatenate two KV caches along the batch, left padding the shorter one (masked zeros).

    Left padding keeps every row's positions (they come from the mask) and attention ignores masked keys, so
    each row's outputs are unchanged. Needs plain full-attention cache layers (keys/values [B, H, S, D]).
    """
    from transformers.cache_utils import DynamicLayer

    if cache_a is None:
        return cache_b, mask_b
    S = max(mask_a.shape[1], mask_b.shape[1])

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = S - t.shape[dim]
        if n == 0:
            return t
        shape = list(t.shape)
        shape[dim] = n
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    for la, lb in zip(cache_a.layers, cache_b.layers, strict=True):
        if type(la) is not DynamicLayer or type(lb) is not DynamicLayer:
            raise NotImplementedError(
                f"admitting requests into a running batch needs full-attention cache layers, got {type(la).__name__}"
            )
        la.keys = torch.cat([pad(la.keys, 2), pad(lb.keys, 2)])  # [B_a + B_b, H, S, D]
        la.values = torch.cat([pad(la.values, 2), pad(lb.values, 2)])
    return cache_a, torch.cat([pad(mask_a, 1), pad(mask_b, 1)])


# ----- the engine -----


def decode_defaults(cfg, bundle: Bundle, overrides: Sequence[str] = ()) -> DecodeConfig:
    """The decode defaults for a bundle: ``cfg.decode`` with the bundle's method, gamma and alpha.

    The sweep chose the bundle's method / gamma / alpha, so they win over the YAML config; a command-line
    override (``decode.gamma=2``) wins over the bundle. Serving, grids and evaluation all decode with these.
    """
    given = {o.split("=", 1)[0].strip() for o in overrides}
    d = cfg.decode
    kw = {
        k: getattr(d, k) if f"decode.{k}" in given else v
        for k, v in (("method", bundle.default_method), ("gamma", bundle.gamma), ("alpha", bundle.alpha))
    }
    return DecodeConfig(**{**d.__dict__, **kw})


class Engine:
    """The decode engine: ``generate(requests)`` / ``stream(requests)`` over one MixedLoraModel.

    Build with :meth:`from_bundle` (serving, evaluation) or ``Engine(EngineParts(...))`` (tests). The model is
    modified in place (its adapted linears become MixedLinear). One batch runs at a time (a lock serialises
    concurrent callers).
    """

    def __init__(
        self,
        parts: EngineParts | Bundle,
        decode_cfg: DecodeConfig | None = None,
        device: str | torch.device = "cpu",
    ):
        if isinstance(parts, Bundle):
            parts = parts_from_bundle(parts, device=device)
        self.device = torch.device(device)
        self.model = parts.model.to(self.device).eval()
        self.tokenizer = parts.tokenizer
        self.use_chat_template = parts.use_chat_template
        self.defaults = decode_cfg or DecodeConfig(
            method=parts.default_method, gamma=parts.gamma, alpha=parts.alpha
        )
        n = len(parts.backbones)
        if n < 2:
            raise ValueError(f"backbones: need one adapter per objective (>= 2), got {n}")
        self.objectives = (
            list(parts.objectives) if parts.objectives is not None else [f"obj{i}" for i in range(n)]
        )
        if len(self.objectives) != n:
            raise ValueError(f"objectives has {len(self.objectives)} names but there are {n} backbones")
        for key in ("rs_backbones", "wrpo_backbones", "values"):
            if len(getattr(parts, key)) not in (0, n):
                raise ValueError(
                    f"{key}: need 0 or {n} entries (one per objective), got {len(getattr(parts, key))}"
                )

        # K adapters, one MixedLoraModel: backbones | rs | wrpo | value adapters | morlhf | modpo | ric.
        adapters: list[LoraAdapter] = []

        def add(group: str, items) -> tuple[int, ...]:
            cols = []
            for i, a in enumerate(items):
                cols.append(len(adapters))
                adapters.append(dataclasses.replace(a, name=f"{group}[{i}]"))
            return tuple(cols)

        cols_bb = add("backbones", parts.backbones)
        cols_rs = add("rs_backbones", parts.rs_backbones)
        cols_wrpo = add("wrpo_backbones", parts.wrpo_backbones)
        cols_v = add("values", [v.adapter for v in parts.values])
        cols_morlhf = add("morlhf", [a for _, a in parts.morlhf])
        cols_modpo = add("modpo", [a for _, a in parts.modpo])
        cols_ric = add("ric", [parts.ric] if parts.ric is not None else [])
        self.mixed = MixedLoraModel(self.model, adapters)
        self.layout = AdapterLayout(
            k=len(adapters),
            n=n,
            beta=float(parts.beta),
            backbones=cols_bb,
            rs_backbones=cols_rs,
            wrpo_backbones=cols_wrpo,
            values=cols_v,
            morlhf=tuple((tuple(float(x) for x in p), c) for (p, _), c in zip(parts.morlhf, cols_morlhf)),
            modpo=tuple((tuple(float(x) for x in p), c) for (p, _), c in zip(parts.modpo, cols_modpo)),
            ric=cols_ric[0] if cols_ric else None,
            ric_info=parts.ric_info,
        )

        self.lm_head = self.model.get_output_embeddings()
        if isinstance(self.lm_head, MixedLinear) or not isinstance(self.lm_head, torch.nn.Linear):
            raise ValueError(
                "the decode engine needs a plain nn.Linear lm_head (adapters may not target lm_head)"
            )
        self.body = self.model.get_decoder()
        self.vocab = self.lm_head.out_features
        hidden = self.lm_head.in_features
        heads_w, heads_b = [], []
        for i, v in enumerate(parts.values):
            W, b = v.head_weight, v.head_bias  # [V, H], [V]
            if W.dim() != 2 or W.shape[0] != self.vocab or b.shape != (W.shape[0],):
                raise ValueError(
                    f"values[{i}]: value head has vocabulary {W.shape[0]} but the policy's lm_head has {self.vocab} "
                    "(the value model must be trained on this policy's tokenizer)"
                )
            if W.shape[1] != hidden:
                raise ValueError(
                    f"values[{i}]: value head hidden size {W.shape[1]} != policy hidden size {hidden}"
                )
            dtype = self.lm_head.weight.dtype
            heads_w.append(W.to(self.device, dtype))
            heads_b.append(b.to(self.device, dtype))
        self.heads_w, self.heads_b = heads_w, heads_b

        cfg_ctx = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        self.max_context = min(parts.max_context or cfg_ctx, cfg_ctx)
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = set(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (eos[0] if eos else 0)
        self._lock = threading.Lock()
        self._cancel: Callable[[int], bool] | None = None

    # ----- construction from a bundle -----

    @classmethod
    def from_bundle(
        cls,
        path: str | Path | Bundle,
        decode_cfg: DecodeConfig | None = None,
        device: str | torch.device = "cpu",
        methods: Sequence[str] | None = None,
    ) -> Engine:
        """Load a bundle (model, adapters, value heads). ``decode_cfg=None`` takes the bundle's default_method,
        gamma and alpha; a given DecodeConfig is used as is. ``methods`` limits the adapters loaded to what those
        methods need (fewer adapters = cheaper mixing); None loads everything in the bundle."""
        bundle = path if isinstance(path, Bundle) else load_bundle(path)
        return cls(parts_from_bundle(bundle, device=device, methods=methods), decode_cfg, device)

    # ----- validation -----

    def prepare(self, r: Request, index: int = 0, tokenizer: Any = None) -> _Job:
        """The one request normaliser: validate ``r`` against this engine's defaults, build its plan (the
        method's rows) and tokenise its prompt. Returns the job the decode loop runs; raises RequestError naming
        the bad field. Serve calls it before queueing a request (and stores the job in ``r.prepared``); the
        engine calls it for every request that has no prepared job. ``tokenizer``: a copy of the engine's for
        callers on another thread (fast tokenizers are not re-entrant)."""
        d = self.defaults

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
        gamma = number("gamma", pick("gamma"), 0.0)
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
                mu = validate_preference(r.preference, self.layout.n)
            except (TypeError, ValueError) as e:
                msg = (
                    str(e)
                    if isinstance(e, PreferenceError)
                    else f"preference = {r.preference!r} is invalid: {e}"
                )
                raise RequestError("preference", msg) from e
        try:
            plan = make_plan(method, self.layout, mu, PlanArgs(alpha, r.implicit_merge, prompt), gamma)
        except (ValueError, NotImplementedError) as e:  # the method cannot serve this request on this bundle
            raise RequestError("method", str(e)) from e
        if plan.prompt is not None:
            prompt = plan.prompt
        tok = self.tokenizer if tokenizer is None else tokenizer
        templated = self.use_chat_template and bool(getattr(tok, "chat_template", None))
        text = format_prompt(tok, prompt, self.use_chat_template)
        ids = tok(text, add_special_tokens=not templated)["input_ids"]
        if not ids:
            raise RequestError("prompt", "prompt tokenises to zero tokens")
        if len(ids) + max_new > self.max_context:
            raise RequestError(
                "prompt",
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new}) exceeds the model context of "
                f"{self.max_context} tokens: shorten the prompt or lower max_new_tokens",
                {"prompt_tokens": len(ids), "max_new_tokens": max_new, "max_context": self.max_context},
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
        job.owner = id(self)
        return job

    # ----- public API -----

    @property
    def can_admit(self) -> bool:
        """Whether ``stream(admit=...)`` works with this model: every KV-cache layer is full attention (caches of
        sliding-window layers cannot be concatenated row-wise)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.model.config)
        return all(type(layer) is DynamicLayer for layer in cache.layers)

    def generate(self, requests: Iterable[Request], batch_size: int | None = None) -> list[Completion]:
        """Run requests to completion, ``batch_size`` (default: the DecodeConfig's) requests per batch.

        Returns one Completion per request, in order.
        """
        requests = list(requests)
        size = batch_size or self.defaults.batch_size
        out: list[Completion | None] = [None] * len(requests)
        for start in range(0, len(requests), size):
            for events in self.stream(requests[start : start + size]):
                for ev in events:
                    if ev.finished:
                        out[start + ev.index] = ev.completion
        return out  # type: ignore[return-value]

    def stream(
        self,
        requests: Iterable[Request],
        admit: Callable[[], Sequence[Request]] | None = None,
        cancel: Callable[[int], bool] | None = None,
    ) -> Iterator[list[TokenEvent]]:
        """Run ``requests`` as ONE batch; yield, per decode step, a TokenEvent for every request that progressed
        (invalid requests as finished error events, before anything runs).

        ``admit`` (continuous batching): called between decode steps, without blocking, from the decode loop; the
        requests it returns are validated, prefilled and join the running batch. It is called after the step's events
        were yielded (so the consumer has seen which requests finished), and the admitted requests' first tokens
        come as a list of their own. Their event indices continue
        after the initial list (len(requests), len(requests) + 1, ... in arrival order). The stream ends when no
        request is live and ``admit`` returns nothing. Close the iterator if you stop consuming early.

        ``cancel(index) -> bool`` is asked after every step for every running request; True finishes it with
        ``finish_reason="cancelled"`` (the text so far) and frees its rows.
        """
        requests = list(requests)
        jobs, errors = self._prepare_all(requests, 0)
        if errors:
            yield errors
        if not jobs and admit is None:
            return
        with self._lock, torch.inference_mode():
            self._cancel = cancel
            try:
                yield from self._run(jobs, admit, len(requests))
            finally:
                self._cancel = None
                self.mixed.set_coefficients(None)

    def _prepare_all(self, requests: Sequence[Request], first: int) -> tuple[list[_Job], list[TokenEvent]]:
        jobs: list[_Job] = []
        errors: list[TokenEvent] = []
        for i, r in enumerate(requests, start=first):
            try:
                if not isinstance(r, Request):
                    raise ValueError(f"request {i} is a {type(r).__name__}, expected mage_ray.decode.Request")
                job, r.prepared = r.prepared, None  # a job is run once
                fresh = isinstance(job, _Job) and job.owner == id(self) and not job.hyps and not job.done
                if not fresh:  # none, another engine's, or already run (a copied Request): normalise anew
                    job = self.prepare(r, i)
                job.index = i
                jobs.append(job)
            except (ValueError, NotImplementedError) as e:
                errors.append(TokenEvent(i, "", True, "error", _error(str(e))))
        return jobs, errors

    # ----- the loop -----

    def _run(self, jobs: list[_Job], admit, next_index: int) -> Iterator[list[TokenEvent]]:
        """The decode loop. ``live`` hypotheses always have their next token chosen and await a forward."""
        live: list[_Hyp] = []
        cache, mask, lay = None, None, None
        pending = jobs
        while True:
            events: list[TokenEvent] = []
            if live:
                if lay is None:
                    lay = self._layout(live)  # also sets the coefficients of this composition
                nxt = torch.tensor(
                    [[hyp.tokens[-1]] for hyp in live for _ in range(hyp.job.n_rows)], device=self.device
                )
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                pos = mask.sum(-1, keepdim=True) - 1  # [R, 1]
                h = self._forward(nxt, mask, pos, cache, lay)
                base, guide = self._scores(h, lay)
                new_live, events = self._advance(live, base, guide)
                live, cache, mask, changed = self._select(new_live, cache, mask)
                if changed:
                    lay = None
            # Before admitting: the consumer sees this step's finishes first, and running streams do not wait
            # for the prefill of new requests.
            if events:
                yield events
                events = []
            more: list[Request] = []
            if admit is not None:
                more = list(admit() or [])
                new_jobs, errors = self._prepare_all(more, next_index)
                next_index += len(more)
                events += errors
                pending = pending + new_jobs
            if pending:
                p_live, p_events, p_cache, p_mask = self._prefill(pending)
                events += p_events
                pending, lay = [], None  # the prefill set its own coefficients
                if p_live:
                    cache, mask = _merge_caches(cache, mask, p_cache, p_mask)
                    live = live + p_live
            if events:
                yield events
            if not live and not more:  # nothing running and nothing new: done
                return

    def _prefill(self, jobs: list[_Job]):
        """Prompt forward of new requests (own cache, left padded, positions from the mask) and their first
        tokens. Returns (live hypotheses, events, cache, mask)."""
        from transformers import DynamicCache

        live = []
        for job in jobs:
            root = _Hyp(job)
            job.hyps = [root]
            live.append(root)
        lay = self._layout(live)
        rows_ids = [h.job.prompt_ids for h in live for _ in range(h.job.n_rows)]
        T = max(len(x) for x in rows_ids)
        ids = torch.full((len(rows_ids), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows_ids), T), dtype=torch.long)
        for i, x in enumerate(rows_ids):
            ids[i, T - len(x) :] = torch.tensor(x)
            mask[i, T - len(x) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [R, T]
        cache = DynamicCache(config=self.model.config)
        h = self._forward(ids, mask, pos, cache, lay)
        base, guide = self._scores(h, lay)
        new_live, events = self._advance(live, base, guide)
        live, cache, mask, _ = self._select(new_live, cache, mask)
        return live, events, cache, mask

    def _select(self, new_live: list[tuple[_Hyp, int]], cache, mask):
        """Keep (and, for beam expansions, copy) the KV-cache rows of the surviving hypotheses.

        Returns (live, cache, mask, changed)."""
        live = [hyp for hyp, _ in new_live]
        select = [src + j for hyp, src in new_live for j in range(hyp.job.n_rows)]
        if select == list(range(mask.shape[0])):
            return live, cache, mask, False
        if not select:
            return live, None, None, True
        sel = torch.tensor(select, device=self.device)
        cache.batch_select_indices(sel)
        return live, cache, mask[sel], True

    def _forward(self, ids, mask, pos, cache, lay: _Layout) -> torch.Tensor:
        """Decoder body over all rows -> last-position hidden state h [R, H] (final norm applied)."""
        out = self.body(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
        )
        return out.last_hidden_state[:, -1]

    def _layout(self, live: list[_Hyp]) -> _Layout:
        """Assign row ranges to hypotheses and build the per-composition index tensors + coefficients."""
        logit_rows: list[int] = []
        head_rows: dict[int, list[int]] = {}  # head j -> global rows
        z_terms: list[tuple[int, int, int, float]] = []  # (hyp, head j, index in head_rows[j], gamma w e_j)
        base_t: list[tuple[int, int, float]] = []
        gl_t: list[tuple[int, int, float]] = []
        renorm: list[bool] = []
        start = 0
        counts: dict[int, int] = {}
        for n_h, hyp in enumerate(live):
            job, plan = hyp.job, hyp.job.plan
            hyp.row_start = start
            counts[id(job)] = counts.get(id(job), 0) + 1
            job.peak_rows = max(job.peak_rows, counts[id(job)] * job.n_rows)
            lpos = {}
            for r in range(job.n_rows):
                if plan.needs_logits(r):
                    lpos[r] = len(logit_rows)
                    logit_rows.append(start + r)
            for r, w in plan.base:
                base_t.append((n_h, lpos[r], w))
            renorm.append(len(plan.base) > 1 or plan.base[0][1] != 1.0)
            for r, kind, w in plan.guide:
                if kind == "logp":
                    gl_t.append((n_h, lpos[r], job.gamma * w))
                    continue
                for j, e in enumerate(plan.rows[r].heads):  # value = sum_j e_j (W_j h + b_j)
                    if e != 0.0:
                        rows = head_rows.setdefault(j, [])
                        z_terms.append((n_h, j, len(rows), job.gamma * w * float(e)))
                        rows.append(start + r)
            start += job.n_rows

        dev, N = self.device, len(live)
        offsets, off = {}, 0
        for j in sorted(head_rows):
            offsets[j], off = off, off + len(head_rows[j])

        def sparse(terms, width):
            if not terms:
                return None
            i = torch.tensor([[t[0] for t in terms], [t[1] for t in terms]], dtype=torch.long)
            v = torch.tensor([t[2] for t in terms], dtype=torch.float32)
            return torch.sparse_coo_tensor(i, v, (N, width), check_invariants=False).coalesce().to(dev)

        simple = not any(renorm) and [t[0] for t in base_t] == list(range(N))
        C = torch.cat([hyp.job.coeffs for hyp in live]).to(dev)  # [R, K]
        self.mixed.set_coefficients(C if bool(C.any()) else None)  # all-zero batch: skip the LoRA path
        return _Layout(
            C=C,
            n_hyps=N,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=dev),
            head_rows=[
                (j, torch.tensor(head_rows[j], dtype=torch.long, device=dev)) for j in sorted(head_rows)
            ],
            base_pick=torch.tensor([t[1] for t in base_t], dtype=torch.long, device=dev) if simple else None,
            base_mat=None if simple else sparse(base_t, len(logit_rows)),
            renorm=torch.tensor(renorm, dtype=torch.bool, device=dev),
            guide_l=sparse(gl_t, len(logit_rows)),
            guide_z=sparse([(h, offsets[j] + k, w) for h, j, k, w in z_terms], off),
        )

    def _scores(self, h: torch.Tensor, lay: _Layout) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per hypothesis: log pi_base [N, V] and gamma * V [N, V] (None when no hypothesis is guided)."""
        logp = F.log_softmax(self.lm_head(h[lay.logit_rows]).float(), dim=-1)  # [RL, V]
        if lay.base_pick is not None:
            base = logp[lay.base_pick]  # [N, V]
        else:
            base = torch.sparse.mm(lay.base_mat, logp)  # sum_r w_r logp_r: [N, V]
            base = torch.where(lay.renorm[:, None], F.log_softmax(base, dim=-1), base)  # MOD: renormalise
        guide = None
        if lay.guide_l is not None:
            guide = torch.sparse.mm(lay.guide_l, logp)  # implicit: gamma sum_r w_r logp_r
        if lay.guide_z is not None:
            # Z: W_j h + b_j of every (row, head j) pair, [RZ, V]
            Z = torch.cat(
                [F.linear(h[rows], self.heads_w[j], self.heads_b[j]).float() for j, rows in lay.head_rows]
            )
            gz = torch.sparse.mm(lay.guide_z, Z)  # explicit: gamma sum w e_j (W_j h + b_j)
            guide = gz if guide is None else guide + gz
        return base, guide

    # ----- token choice, finishing, beams -----

    def _choose(
        self, job: _Job, base: torch.Tensor, guide: torch.Tensor | None, greedy: int, k: int
    ) -> list[int]:
        """k next tokens for one hypothesis (base/guide: [V] rows); greedy uses the precomputed argmax."""
        if not job.do_sample:
            if k == 1:
                return [greedy]
            s = base if guide is None else base + guide
            return torch.topk(s, min(k, s.shape[0])).indices.tolist()
        # Guidance before truncation: s = log pi / T + gamma V.
        s = base / job.temperature if guide is None else base / job.temperature + guide
        idx, vals = _truncate(s, job.top_k, job.top_p)
        probs = torch.softmax(vals.float().cpu(), dim=-1)
        draw = torch.multinomial(probs, min(k, probs.shape[0]), replacement=False, generator=job.generator)
        return idx.cpu()[draw].tolist()

    def _finish_check(self, hyp: _Hyp) -> None:
        job = hyp.job
        tok = hyp.tokens[-1]
        if tok in self.eos_ids and not job.ignore_eos:
            hyp.finish_reason = "eos"
        shown = hyp.tokens[:-1] if hyp.finish_reason == "eos" else hyp.tokens  # EOS never shows in the text
        hyp.text = self.tokenizer.decode(shown, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if job.stop:
            cut = min((i for i in (hyp.text.find(s) for s in job.stop) if i >= 0), default=-1)
            if cut >= 0:
                hyp.text = hyp.text[:cut]
                hyp.finish_reason = "stop"
        if hyp.finish_reason is None and len(hyp.tokens) >= job.max_new:
            hyp.finish_reason = "length"
        if hyp.finish_reason is None and self._cancel is not None and self._cancel(job.index):
            hyp.finish_reason = "cancelled"

    def _complete(self, job: _Job, hyp: _Hyp) -> Completion:
        return Completion(
            text=hyp.text,
            token_ids=list(hyp.tokens),
            finish_reason=hyp.finish_reason or "length",
            usage=Usage(len(job.prompt_ids), len(hyp.tokens)),
            rows_used=job.peak_rows,
        )

    def _advance(self, live: list[_Hyp], base: torch.Tensor, guide: torch.Tensor | None):
        """Choose the next token(s) of every live hypothesis; finish, expand and prune; build the events.

        Returns (new live list of (hypothesis, source row start), events).
        """
        step = base if guide is None else base + guide  # [N, V] greedy score, Eq. 25
        greedy = step.argmax(-1).tolist()
        new_live: list[tuple[_Hyp, int]] = []
        touched: dict[int, _Job] = {}
        for i, hyp in enumerate(live):
            job = hyp.job
            touched[id(job)] = job
            g_row = None if guide is None else guide[i]
            if job.beam and job.chunk_pos == 0:
                k = job.c * (job.b if not job.expanded else 1)  # the prompt expands into b*c candidates
                toks = self._choose(job, base[i], g_row, greedy[i], k)
                children = [hyp.child() for _ in toks]
                job.hyps = [x for x in job.hyps if x is not hyp] + children
            else:
                toks = self._choose(job, base[i], g_row, greedy[i], 1)
                children = [hyp]
            for ch, t in zip(children, toks):
                ch.tokens.append(t)
                ch.logp_sum += float(base[i, t])
                if g_row is not None and job.plan.value_kind == "implicit":
                    ch.guide_sum += float(g_row[t])  # sum_t gamma * log pi*/pi_ref (Eq. 21-23)
                elif g_row is not None and job.plan.value_kind == "explicit":
                    ch.guide_sum = float(g_row[t])  # gamma * V(x, y<=t): latest estimate of the final reward
                self._finish_check(ch)
                if ch.finish_reason is None:
                    new_live.append((ch, hyp.row_start))

        events: list[TokenEvent] = []
        pruned: set[int] = set()
        for job in touched.values():
            if job.beam:
                job.expanded = True
                job.chunk_pos += 1
                if job.chunk_pos >= job.lookahead or all(x.finish_reason is not None for x in job.hyps):
                    job.hyps.sort(key=lambda x: x.score, reverse=True)  # stable: ties keep candidate order
                    pruned.update(id(x) for x in job.hyps[job.b :])
                    job.hyps = job.hyps[: job.b]
                    job.chunk_pos = 0
                if all(x.finish_reason is not None for x in job.hyps):
                    best = max(job.hyps, key=lambda x: x.score)
                    job.done = True
                    comp = self._complete(job, best)
                    events.append(TokenEvent(job.index, comp.text, True, comp.finish_reason, comp))
                else:
                    events.append(TokenEvent(job.index, ""))
                continue
            hyp = job.hyps[0]
            if hyp.finish_reason is not None:
                job.done = True
                comp = self._complete(job, hyp)
                delta = comp.text[len(job.emitted) :] if comp.text.startswith(job.emitted) else ""
                events.append(TokenEvent(job.index, delta, True, comp.finish_reason, comp))
                continue
            safe = hyp.text[: len(hyp.text) - _stop_hold(hyp.text, job.stop)]
            safe = safe.rstrip("\ufffd")  # an incomplete UTF-8 character decodes to U+FFFD
            delta = ""
            if safe.startswith(job.emitted) and len(safe) > len(job.emitted):
                delta, job.emitted = safe[len(job.emitted) :], safe
            events.append(TokenEvent(job.index, delta))
        new_live = [(h, s) for h, s in new_live if id(h) not in pruned]
        return new_live, events


# ----- bundles -----


def parts_from_bundle(
    bundle: Bundle, device: str | torch.device = "cpu", methods: Sequence[str] | None = None
) -> EngineParts:
    """Load a bundle's model, tokenizer, adapters and value heads into EngineParts.

    ``methods``: load only the adapter groups those methods use (None = all). mod / mage-i use the
    rs_backbones as experts when they are loaded, else the backbones (see mage_ray.guidance).
    """
    from mage_ray.models import load_policy
    from mage_ray.value_model import load_value_model

    groups = set(ADAPTER_GROUPS) if methods is None else groups_for(methods)
    mcfg = bundle.model_config()
    model, tok = load_policy(mcfg, device=device)

    def load(key: str, rel: str) -> LoraAdapter:
        return load_adapter(adapter_path(bundle.path(rel)), name=key)

    values = []
    if "values" in groups:
        vocab, hidden = model.get_output_embeddings().out_features, model.config.hidden_size
        values = [
            load_value_model(bundle.path(rel), vocab_size=vocab, hidden_size=hidden) for rel in bundle.values
        ]
    ric, ric_info = None, None
    if "ric" in groups and bundle.ric is not None:
        from mage_ray.manifest import read_manifest

        ric = load(bundle.ric["adapter"], bundle.ric["adapter"])
        ric_info = {**(read_manifest(bundle.path(bundle.ric["adapter"])) or {}), **bundle.ric}
    return EngineParts(
        model=model,
        tokenizer=tok,
        beta=bundle.beta,
        backbones=[load(r, r) for r in bundle.backbones],
        rs_backbones=[load(r, r) for r in bundle.rs_backbones] if "rs_backbones" in groups else [],
        wrpo_backbones=[load(r, r) for r in bundle.wrpo_backbones] if "wrpo_backbones" in groups else [],
        values=values,
        morlhf=[(e["preference"], load(e["adapter"], e["adapter"])) for e in bundle.morlhf]
        if "morlhf" in groups
        else [],
        modpo=[(e["preference"], load(e["adapter"], e["adapter"])) for e in bundle.modpo]
        if "modpo" in groups
        else [],
        ric=ric,
        ric_info=ric_info,
        objectives=bundle.objectives,
        alpha=bundle.alpha,
        gamma=bundle.gamma,
        default_method=bundle.default_method,
        max_context=mcfg.max_context,
        use_chat_template=mcfg.chat_template,
    )
