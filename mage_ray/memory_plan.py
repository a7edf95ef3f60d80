"""GPU memory of mage_ray's workers as plain arithmetic: model shapes, and the bytes of weights, LoRA and AdamW
state, training activations, KV caches and logits. :mod:`mage_ray.stage_plan` adds these up per pipeline stage
(``mage-ray plan``, the preflight memory check); the trainers size their chunks with :func:`fit_count`.

Notation (per worker): L layers, h hidden size, I MLP intermediate size, a attention heads, g key/value heads,
d head dimension (a d = h for Llama-2), V vocabulary, r LoRA rank, t tokens in a batch (sequences x positions).
Every term is in bytes; ``b_act`` is the bytes of the model dtype (2 for bfloat16).

**Weights.** Llama parameters: V h (embedding) [+ V h untied LM head] + L (2 h a d + 2 h g d + 3 h I + 2 h) + h.

**LoRA and AdamW** (``torch.optim.AdamW``, the optimizer of the TRL/transformers Trainer and of our offline loop):
for every trainable tensor the parameter, its gradient and the two moments ``exp_avg`` / ``exp_avg_sq`` in the
parameter's dtype, plus a 4-byte ``step`` counter per tensor. PEFT casts LoRA weights of a bf16 model to
float32 (``autocast_adapter_dtype=True``), so a LoRA parameter costs 16 bytes. The Trainer with ``bf16=True``
runs the forward under autocast and keeps no separate fp32 master copy (the trainable weights already are fp32);
the frozen base stays in bf16 and gets no gradient or optimizer state. The value head (nn.Linear [V, h] + [V])
is float32 and trainable: 16 bytes per parameter as well.

**Training activations.** Adapted from "Reducing Activation Recomputation in Large Transformer Models"
(Korthikanti et al., arXiv 2205.05198, Sec. 4.1: s b h (34 + 5 a s / h) per GPT layer) to a Llama layer with a
frozen base and LoRA, counting what autograd keeps (PyTorch saves a linear layer's input only when its weight
trains, so frozen projections keep nothing; SDPA keeps q, k, v, the output and its log-sum-exp, no s x s
scores). Per token and layer:

    2 x (4 h + 4)                    two RMSNorms: their float32 input and 1/rms
    sum_m (b_in d_in,m + b_in r)     every LoRA module m: its input copy and A x (b_in: 2 under autocast, else 4)
      [+ d_in,m                      with LoRA dropout on CUDA: its boolean mask]
    b_act (2 a d + 2 g_s d) + 4 a    SDPA: q, output, k, v (g_s = g, or a where k, v are repeated for a mask)
    3 b_act I                        SwiGLU: gate output, SiLU output, up output

The final norm keeps 4 h + 4 per token and the first layer's input norm keeps nothing (the frozen embedding's
output needs no gradient), so the stored total is L times the per-layer sum. With activation checkpointing a
layer keeps only its input (b_act h per token), plus the final norm, and the backward recomputes one layer at a
time. Both add one layer's activations as the backward's
working set (a stated allowance, not a measurement). ``tests/test_memory_plan.py`` checks the stored part against
the tensors autograd saves on a tiny Llama.

**KV cache** (``transformers.DynamicCache``): 2 x L x g x d x tokens x sequences x b_act.

Nothing here imports torch: the command line and the preflight check read a config and finish in seconds.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DTYPE_BYTES",
    "GIB",
    "KNOWN_SHAPES",
    "REWARD_MODEL_PARAMS",
    "ModelShape",
    "activation_bytes",
    "activation_bytes_per_layer_token",
    "adamw_bytes",
    "fit_count",
    "gib",
    "kv_cache_bytes",
    "kv_bytes_per_token",
    "lora_module_dims",
    "lora_params",
    "pblora_params",
    "prefill_bytes",
    "safetensors_params",
    "shape_from_config",
    "weight_bytes",
]

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of the dtypes ``model.dtype`` allows."""

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def gib(n_bytes: float) -> float:
    """Bytes -> GiB (2**30 bytes)."""
    return n_bytes / GIB


@dataclass(frozen=True)
class ModelShape:
    """What the memory terms need of a decoder: a Llama-style ``config.json`` (Llama, Mistral, SmolLM, Qwen2
    without biases)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    """The LM head shares the embedding matrix."""
    max_positions: int = 4096
    source: str = ""
    """Where the shape came from (a config.json path, or 'table: <id>')."""

    @property
    def params(self) -> int:
        """Parameter count: V h [+ V h] + L (2 h a d + 2 h g d + 3 h I + 2 h) + h."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = 2 * h * q + 2 * h * kv + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h


def shape_from_config(cfg: Mapping[str, Any], source: str = "") -> ModelShape:
    """A :class:`ModelShape` from a Llama-style HF config dict (``config.json`` or ``PretrainedConfig.to_dict()``)."""
    h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    return ModelShape(
        vocab=int(cfg["vocab_size"]),
        hidden=h,
        intermediate=int(cfg["intermediate_size"]),
        layers=int(cfg["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or h // heads),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        max_positions=int(cfg.get("max_position_embeddings") or 4096),
        source=source,
    )


KNOWN_SHAPES: dict[str, ModelShape] = {
    # config.json of the hub repositories (gated or large: not read at planning time)
    "meta-llama/Llama-2-7b-hf": ModelShape(32000, 4096, 11008, 32, 32, 32, 128, False, 4096),
    "meta-llama/Llama-2-7b-chat-hf": ModelShape(32000, 4096, 11008, 32, 32, 32, 128, False, 4096),
    "meta-llama/Llama-2-13b-hf": ModelShape(32000, 5120, 13824, 40, 40, 40, 128, False, 4096),
    # the embedded policy (HuggingFaceTB/SmolLM2-135M-Instruct) and mage_ray.models.tiny_model_config
    "embedded:smollm2-135m-instruct": ModelShape(49152, 576, 1536, 30, 9, 3, 64, True, 8192),
    "tiny-random": ModelShape(49152, 64, 128, 2, 4, 2, 16, True, 2048),
}
"""Shapes of models whose config.json is not read at planning time: hub ids that need a download (a local
directory's or the HF cache's config.json is read instead) and the built-in ``embedded:`` / ``tiny-random``."""

REWARD_MODEL_PARAMS: dict[str, tuple[int, int]] = {
    "Ray2333/gpt2-large-helpful-reward_model": (774_030_080, 1280),  # gpt2-large, 36 layers
    "Ray2333/gpt2-large-harmless-reward_model": (774_030_080, 1280),
    "mohameddhiab/humor-no-humor": (66_955_010, 768),  # distilbert-base-uncased + 2-way head
    "CogComp/bart-faithful-summary-detector": (407_343_106, 1024),  # bart-large + classification head
    "Tristan/gpt2_reward_summarization": (124_440_576, 768),  # gpt2 (its model card: fine-tuned gpt2)
}
"""(parameters, hidden size) of the paper's reward models (mage_ray.tasks.hf_rewards.PAPER_REWARD_MODELS): the
backbones' published sizes (gpt2-large 774M, distilbert 67M, bart-large 406M, gpt2 124M)."""


def safetensors_params(directory: str | Path) -> int | None:
    """Parameter count of a local checkpoint from its safetensors headers (``model.safetensors`` or the shards of
    ``model.safetensors.index.json``); None when it has no safetensors file. Reads only the JSON headers."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    total = 0
    for name in files:
        with open(d / name, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def weight_bytes(params: int, dtype_bytes: int) -> int:
    """Resident weights: params x bytes per element."""
    return params * dtype_bytes


def lora_module_dims(shape: ModelShape, module: str) -> tuple[int, int]:
    """(d_in, d_out) of a Llama projection named by its last name component (``q_proj``, ``down_proj``, ...)."""
    h, q, kv, inter = (
        shape.hidden,
        shape.heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
        shape.intermediate,
    )
    dims = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    if module not in dims:
        raise ValueError(f"lora.target_modules: {module!r} is not a Llama projection {sorted(dims)}")
    return dims[module]


def lora_params(shape: ModelShape, r: int, targets: Iterable[str]) -> int:
    """LoRA parameters: L x sum over target modules of r (d_in + d_out) (A [r, d_in], B [d_out, r])."""
    return shape.layers * sum(r * sum(lora_module_dims(shape, m)) for m in set(targets))


def pblora_params(shape: ModelShape, r1: int, r2: int, n: int, targets: Iterable[str]) -> int:
    """PARM's PBLoRA (:mod:`mage_ray.pblora`): per module A [r1+r2, d_in], B [d_out, r1+r2], W1 [r1, r1],
    W2 [n, r2 r2]."""
    per = sum((r1 + r2) * sum(lora_module_dims(shape, m)) + r1 * r1 + n * r2 * r2 for m in set(targets))
    return shape.layers * per


def adamw_bytes(params: int, tensors: int, param_bytes: int = 4) -> int:
    """Trainable tensors under AdamW: parameter + gradient + exp_avg + exp_avg_sq (param dtype) + a 4-byte step
    counter per tensor."""
    return 4 * params * param_bytes + 4 * tensors


def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """KV cache of one token of one sequence: 2 x L x g x d x bytes."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes


def kv_cache_bytes(shape: ModelShape, sequences: int, tokens: int, dtype_bytes: int) -> int:
    """A DynamicCache of ``sequences`` rows of ``tokens`` positions: 2 x L x g x d x tokens x sequences x bytes."""
    return kv_bytes_per_token(shape, dtype_bytes) * sequences * tokens


def activation_bytes_per_layer_token(
    shape: ModelShape,
    *,
    lora_r: int,
    targets: Sequence[str],
    act_bytes: int = 2,
    lora_in_bytes: int = 2,
    dropout: bool = False,
    kv_repeated: bool = True,
) -> int:
    """Bytes autograd keeps per token in one decoder layer (module docstring): norms, LoRA inputs, SDPA, SwiGLU."""
    d, a = shape.head_dim, shape.heads
    g_s = a if kv_repeated else shape.kv_heads
    norms = 2 * (4 * shape.hidden + 4)
    lora = 0
    for m in set(targets):
        d_in, _ = lora_module_dims(shape, m)
        lora += lora_in_bytes * (d_in + lora_r) + (d_in if dropout else 0)
    attention = act_bytes * (2 * a * d + 2 * g_s * d) + 4 * a
    mlp = 3 * act_bytes * shape.intermediate
    return norms + lora + attention + mlp


def activation_bytes(
    shape: ModelShape, tokens: int, *, checkpointing: bool, act_bytes: int = 2, **layer_kw: Any
) -> dict[str, int]:
    """Training activations of a batch of ``tokens`` tokens: {"stored": what the forward keeps, "peak": stored +
    the backward's working set}. Without checkpointing every layer keeps its activations; with it each layer keeps
    its input (b_act h per token) and the backward recomputes one layer at a time."""
    per_layer = tokens * activation_bytes_per_layer_token(shape, act_bytes=act_bytes, **layer_kw)
    if checkpointing:
        stored = shape.layers * tokens * act_bytes * shape.hidden + tokens * (4 * shape.hidden + 4)
        return {"stored": stored, "peak": stored + 2 * per_layer}
    stored = shape.layers * per_layer  # + the final norm, - layer 0's input norm: the same 4 h + 4
    return {"stored": stored, "peak": stored + per_layer}


def prefill_bytes(
    shape: ModelShape, sequences: int, tokens: int, act_bytes: int = 2, rank_sum: int = 0
) -> int:
    """Working set of an inference forward over ``sequences`` x ``tokens`` (no autograd): one layer's SwiGLU
    (gate, up and their product: 3 I), the residual stream and the normed input (2 h), the per-row LoRA mixing's
    x A_cat^T ([t, sum of ranks], :mod:`mage_ray.lora_mix`), and the 4-D attention mask (t x tokens bytes)."""
    t = sequences * tokens
    return t * act_bytes * (3 * shape.intermediate + 2 * shape.hidden + rank_sum) + t * tokens


def fit_count(budget: float, per_item: float, cap: int) -> int:
    """How many items of ``per_item`` bytes fit in ``budget`` bytes, between 1 and ``cap``."""
    if per_item <= 0:
        return cap
    return max(1, min(cap, int(budget // per_item)))
