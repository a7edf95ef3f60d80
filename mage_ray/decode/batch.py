"""The batch state of the decode loop: hypotheses, the per-composition layout, sampling and KV-cache helpers.

A hypothesis (:class:`_Hyp`: a request's sequence, or one beam candidate) occupies its job's plan rows in the
batch; :func:`build_layout` assigns the rows and builds the sparse matrices that combine row outputs into
per-hypothesis scores (Eq. 25 in log space); :func:`choose` picks the next tokens (greedy, or sampled with
guidance before top-k / top-p truncation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mage_ray.decode.request import Completion, _Job

__all__ = ["build_layout", "choose"]


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

    C: torch.Tensor  # [R, K] coefficients of every row (CPU)
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


def _cache_width(live: list[_Hyp]) -> int:
    """KV-cache columns the live hypotheses need: the longest prompt + tokens fed so far (a hypothesis's last token
    is chosen but not fed yet)."""
    return max((len(h.job.prompt_ids) + len(h.tokens) - 1 for h in live), default=0)


def _trim_cache(cache, mask: torch.Tensor | None, width: int):
    """Drop the leading columns of a left-padded KV cache (and its mask [R, S]) down to ``width`` columns.

    Every row holds its tokens right-aligned (left padding, then one column per step), so the columns left of the
    longest live row are masked on every row: dropping them changes no row's attention, and positions come from
    the mask's row sums, which keep their values. Without this a batch that never empties (continuous batching)
    keeps the columns of every request that ever ran in it and grows by one column per step. Caches with other
    than full-attention layers are left as they are.
    """
    from transformers.cache_utils import DynamicLayer

    drop = 0 if mask is None else mask.shape[1] - width
    if drop <= 0 or cache is None or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return cache, mask
    for layer in cache.layers:  # views: the next step's update concatenates them into fresh tensors
        if getattr(layer, "keys", None) is None or layer.keys.dim() != 4:  # a layer that holds nothing
            continue
        layer.keys = layer.keys[:, :, drop:]  # [R, H, S - drop, D]
        layer.values = layer.values[:, :, drop:]
    return cache, mask[:, drop:]


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors on the CPU with one synchronisation for all of them (the decode loop's one read-back per step)."""
    dev = next((t.device for t in tensors if t.device.type != "cpu"), None)
    if dev is None:
        return list(tensors)
    if dev.type != "cuda":
        return [t.cpu() for t in tensors]
    out = [
        t.to("cpu", non_blocking=True) for t in tensors
    ]  # into pinned memory, queued on the current stream
    torch.cuda.current_stream(dev).synchronize()
    return out


def build_layout(live: list[_Hyp], device: torch.device) -> _Layout:
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

    dev, N = device, len(live)
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
    C = torch.cat(
        [hyp.job.coeffs for hyp in live]
    )  # [R, K], on the CPU (MixedLoraModel builds rows from it there)
    return _Layout(
        C=C,
        n_hyps=N,
        logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=dev),
        head_rows=[(j, torch.tensor(head_rows[j], dtype=torch.long, device=dev)) for j in sorted(head_rows)],
        base_pick=torch.tensor([t[1] for t in base_t], dtype=torch.long, device=dev) if simple else None,
        base_mat=None if simple else sparse(base_t, len(logit_rows)),
        renorm=torch.tensor(renorm, dtype=torch.bool, device=dev),
        guide_l=sparse(gl_t, len(logit_rows)),
        guide_z=sparse([(h, offsets[j] + k, w) for h, j, k, w in z_terms], off),
    )


def choose(job: _Job, base: torch.Tensor, guide: torch.Tensor | None, greedy: int, k: int) -> list[int]:
    """k next tokens for one hypothesis (base/guide: [V] rows, on the CPU); greedy uses the precomputed argmax."""
    if not job.do_sample:
        if k == 1:
            return [greedy]
        s = base if guide is None else base + guide
        return torch.topk(s, min(k, s.shape[0])).indices.tolist()
    # Guidance before truncation: s = log pi / T + gamma V.
    s = base / job.temperature if guide is None else base / job.temperature + guide
    idx, vals = _truncate(s, job.top_k, job.top_p)
    # Draw over the kept tokens in token-id order, not score order: two nearly tied scores (1e-5 apart, which the
    # batch's other rows can change through matmul rounding) then swap no random numbers between tokens, so a
    # request's samples do not depend on what else is in the batch.
    order = torch.argsort(idx)
    idx, vals = idx[order], vals[order]
    probs = torch.softmax(vals.float().cpu(), dim=-1)
    draw = torch.multinomial(probs, min(k, probs.shape[0]), replacement=False, generator=job.generator)
    return idx.cpu()[draw].tolist()
