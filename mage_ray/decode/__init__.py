"""One batched decode loop for every method (RS, BS, MOD, MAGE-{E,E-M,I,I-M}, baselines) over one base model.

Every request expands into rows (:mod:`mage_ray.guidance`); all rows of all requests run in ONE forward per
step over one copy of the base weights, each row with its own LoRA coefficient vector. Per
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
* beam lookahead (Table 4 / Sec 5.6.2 of MAGE (arXiv 2510.03782): beam width b, expansion c, lookahead interval l): a
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
running one (left padded to a common length; positions come from the attention mask). Whenever rows leave or join,
the cache's leading columns that every live row masks are dropped, so a batch that never empties keeps a cache as
wide as its longest live prompt + generated tokens, not one column per step since it started. Each step reads its
results back to the host once (the argmax tokens with their log pi_base and gamma V, plus the score rows of sampled
and beam hypotheses), and each forward multiplies only by the LoRA columns of adapters some row uses
(:mod:`mage_ray.lora_mix`).

Modules: :mod:`.request` (requests, results, the one normaliser), :mod:`.batch` (hypotheses, layouts,
sampling, KV-cache helpers), :mod:`.engine` (the loop), :mod:`.parts` (what the engine runs, from a bundle).
"""

from mage_ray.decode.batch import _truncate
from mage_ray.decode.engine import Engine
from mage_ray.decode.parts import EngineParts, parts_from_bundle
from mage_ray.decode.request import (
    Completion,
    Request,
    RequestError,
    TokenEvent,
    Usage,
    decode_defaults,
    normalise,
)

__all__ = [
    "Completion",
    "Engine",
    "EngineParts",
    "Request",
    "RequestError",
    "TokenEvent",
    "Usage",
    "_truncate",
    "decode_defaults",
    "normalise",
    "parts_from_bundle",
]
