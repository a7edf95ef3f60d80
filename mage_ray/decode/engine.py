"""The decode engine: one batched loop for every method over one MixedLoraModel (see :mod:`mage_ray.decode`)."""

from __future__ import annotations

import dataclasses
import inspect
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mage_ray.bundle import Bundle, load_bundle
from mage_ray.config import DecodeConfig
from mage_ray.decode.batch import (
    _cache_width,
    _error,
    _Hyp,
    _Layout,
    _merge_caches,
    _stop_hold,
    _trim_cache,
    build_layout,
    choose,
    to_host,
)
from mage_ray.decode.parts import EngineParts, parts_from_bundle
from mage_ray.decode.request import Completion, Request, TokenEvent, Usage, _Job, normalise
from mage_ray.devices import place
from mage_ray.guidance import AdapterLayout
from mage_ray.lora_mix import LoraAdapter, MixedLinear, MixedLoraModel
from mage_ray.models import eos_token_ids
from mage_ray.tasks.objectives import finished

__all__ = ["Engine"]


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
        self.device = torch.device(
            place(device, "decode engine")
        )  # mage_ray.devices: a GPU this process holds
        self.model = parts.model.to(self.device).eval()
        self.tokenizer = parts.tokenizer
        self.use_chat_template = parts.use_chat_template
        self.defaults = decode_cfg or DecodeConfig(
            method=parts.default_method,
            gamma=parts.gamma,
            alpha=parts.alpha,
            method_gammas=dict(parts.method_gammas or {}),
        )
        n = len(parts.backbones)
        if n < 2:
            raise ValueError(f"backbones: need one adapter per objective (>= 2), got {n}")
        self.objectives = (
            list(parts.objectives) if parts.objectives is not None else [f"obj{i}" for i in range(n)]
        )
        if len(self.objectives) != n:
            raise ValueError(f"objectives has {len(self.objectives)} names but there are {n} backbones")
        if len(parts.parm) not in (0, n + 1):
            raise ValueError(f"parm: need 0 or {n + 1} PBLoRA components (shared + one per objective)")
        for key in ("rs_backbones", "wrpo_backbones", "values", "arms"):
            if len(getattr(parts, key)) not in (0, n):
                raise ValueError(
                    f"{key}: need 0 or {n} entries (one per objective), got {len(getattr(parts, key))}"
                )

        # K adapters, one MixedLoraModel: backbones | rs | wrpo | value adapters | morlhf | modpo | ric | arms | parm.
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
        cols_arms = add("arms", parts.arms)
        cols_parm = add("parm", parts.parm)
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
            arms=cols_arms,
            parm=cols_parm,
        )

        self.lm_head = self.model.get_output_embeddings()
        if isinstance(self.lm_head, MixedLinear) or not isinstance(self.lm_head, torch.nn.Linear):
            raise ValueError(
                "the decode engine needs a plain nn.Linear lm_head (adapters may not target lm_head)"
            )
        self.body = self.model.get_decoder()
        # The decoder's KV-cache argument: ``cache`` in recent transformers 5 releases, where ``past_key_values`` is
        # a deprecated alias (a FutureWarning per process, removed in 5.40); ``past_key_values`` before them.
        self.cache_arg = (
            "cache" if "cache" in inspect.signature(self.body.forward).parameters else "past_key_values"
        )
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
        eos = eos_token_ids(self.model, self.tokenizer)
        self.eos_ids = set(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (eos[0] if eos else 0)
        self._lock = threading.Lock()
        self._cancel: Callable[[int], bool] | None = None
        self.kv_shape: tuple[int, int] = (0, 0)
        """(rows, columns) of the running batch's KV cache after the last decode step ((0, 0) when idle): columns
        stay at the longest live prompt + generated tokens (the cache is trimmed as requests leave and join)."""

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
        """The one request normaliser (:func:`mage_ray.decode.request.normalise`) with this engine's defaults,
        adapters, tokenizer and context. Serve calls it before queueing a request (and stores the job in
        ``r.prepared``); the engine calls it for every request that has no prepared job. ``tokenizer``: a copy of
        the engine's for callers on another thread (fast tokenizers are not re-entrant)."""
        job = normalise(
            r,
            index,
            defaults=self.defaults,
            layout=self.layout,
            tokenizer=self.tokenizer if tokenizer is None else tokenizer,
            use_chat_template=self.use_chat_template,
            max_context=self.max_context,
        )
        job.owner = id(self)
        return job

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
                self.kv_shape = (0, 0)
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
                nxt = self._upload(
                    torch.tensor([[hyp.tokens[-1]] for hyp in live for _ in range(hyp.job.n_rows)])
                )
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                pos = mask.sum(-1, keepdim=True) - 1  # [R, 1]
                h = self._forward(nxt, mask, pos, cache, lay)
                self.kv_shape = tuple(mask.shape)
                base, guide = self._scores(h, lay)
                new_live, events = self._advance(live, base, guide)
                live, cache, mask, changed = self._select(new_live, cache, mask)
                if changed:  # rows left: drop the cache columns only they needed
                    lay = None
                    cache, mask = _trim_cache(cache, mask, _cache_width(live))
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
                    cache, mask = _trim_cache(cache, mask, _cache_width(live))
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
        cache, mask = _trim_cache(cache, mask, _cache_width(live))  # rows that finished at their first token
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
        sel = self._upload(torch.tensor(select))
        cache.batch_select_indices(sel)
        return live, cache, mask[sel], True

    def _upload(self, t: torch.Tensor) -> torch.Tensor:
        """A small host tensor on the engine's device without waiting for the device (pinned, non-blocking)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _forward(self, ids, mask, pos, cache, lay: _Layout) -> torch.Tensor:
        """Decoder body over all rows -> last-position hidden state h [R, H] (final norm applied)."""
        out = self.body(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{self.cache_arg: cache}
        )
        return out.last_hidden_state[:, -1]

    def _layout(self, live: list[_Hyp]) -> _Layout:
        """The composition's layout (:func:`build_layout`); sets the mixing coefficients of its rows."""
        lay = build_layout(live, self.device)
        self.mixed.set_coefficients(
            lay.C if bool(lay.C.any()) else None
        )  # all-zero batch: skip the LoRA path
        return lay

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
            hyp.finish_reason = self._at_budget(job, hyp)
        if hyp.finish_reason is None and self._cancel is not None and self._cancel(job.index):
            hyp.finish_reason = "cancelled"

    def _at_budget(self, job: _Job, hyp: _Hyp) -> str | None:
        """A hypothesis at (or past) max_new_tokens: "length", unless ``decode.finish_sentence_tokens`` lets it end
        its sentence: then "stop" once its text ends one (:func:`mage_ray.tasks.objectives.finished`, the rule
        the conciseness objective scores), None (go on) until that many extra tokens or the context are used."""
        grace = self.defaults.finish_sentence_tokens
        if grace <= 0:
            return "length"
        if finished(hyp.text):
            return "stop"
        used = len(hyp.tokens)
        if used >= job.max_new + grace or len(job.prompt_ids) + used >= self.max_context:
            return "length"
        return None

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
        greedy = step.argmax(-1)  # [N]
        # One read-back per step: the argmax and its log pi_base / gamma V for every hypothesis, and the whole score
        # rows of those that sample or expand beams (their choice needs more than the argmax).
        picked = [greedy.double(), base.gather(1, greedy[:, None])[:, 0].double()]  # [N] each (ids exact)
        if guide is not None:
            picked.append(guide.gather(1, greedy[:, None])[:, 0].double())
        full = [i for i, h in enumerate(live) if h.job.do_sample or (h.job.beam and h.job.chunk_pos == 0)]
        wanted = [torch.stack(picked)]  # [2 or 3, N]
        if full:
            sel = self._upload(torch.tensor(full))
            wanted += [base.index_select(0, sel)] + ([] if guide is None else [guide.index_select(0, sel)])
        got = to_host(*wanted)
        g_ids = got[0][0].long().tolist()
        g_base = got[0][1].tolist()
        g_guide = got[0][2].tolist() if guide is not None else None
        rows = {i: k for k, i in enumerate(full)}  # hypothesis -> its row in got[1] (base) / got[2] (guide)
        new_live: list[tuple[_Hyp, int]] = []
        touched: dict[int, _Job] = {}
        for i, hyp in enumerate(live):
            job = hyp.job
            touched[id(job)] = job
            b_row = g_row = None
            if i in rows:
                b_row = got[1][rows[i]]
                g_row = None if guide is None else got[2][rows[i]]
            if job.beam and job.chunk_pos == 0:
                k = job.c * (job.b if not job.expanded else 1)  # the prompt expands into b*c candidates
                toks = choose(job, b_row, g_row, g_ids[i], k)
                children = [hyp.child() for _ in toks]
                job.hyps = [x for x in job.hyps if x is not hyp] + children
            else:
                toks = choose(job, b_row, g_row, g_ids[i], 1)
                children = [hyp]
            for ch, t in zip(children, toks):
                ch.tokens.append(t)
                if b_row is None:  # the argmax: its values came with the read-back
                    lp, gv = g_base[i], None if g_guide is None else g_guide[i]
                else:
                    lp, gv = float(b_row[t]), None if g_row is None else float(g_row[t])
                ch.logp_sum += lp
                if gv is not None and job.plan.value_kind == "implicit":
                    ch.guide_sum += gv  # sum_t gamma * log pi*/pi_ref (Eq. 21-23)
                elif gv is not None and job.plan.value_kind == "explicit":
                    ch.guide_sum = gv  # gamma * V(x, y<=t): latest estimate of the final reward
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
