"""Explicit value models on the inference side: load a value-model directory, apply its head.

A value model (Sec 3.4.1 of MAGE (arXiv 2510.03782)) is the base policy + a LoRA adapter + a vocabulary-sized linear
head on the final normalised hidden state h_t [H] (for Llama ``model.model(...).last_hidden_state``):

    V(x, y<t) = W h_t + b                   W [V, H], b [V]  ->  a |V|-vector, one value per candidate token

so one forward scores every candidate next token. V[y] estimates the z-scored final reward
(r - reward_mean) / reward_std after emitting y (``manifest["target"] == "zscore"``); multiply by
``reward_std`` and add ``reward_mean`` for reward units. Directory layout (shared format)::

    <dir>/adapter/                  PEFT LoRA (adapter_config.json + adapter_model.safetensors)
    <dir>/value_head.safetensors    tensors "weight" [V, H] and "bias" [V]
    <dir>/manifest.json             objective, base_model, vocab_size, hidden_size, reward_mean, reward_std,
                                    target, val_mse, ranking_accuracy, steps, complete: true

Only safetensors is read (pickles can run code on load).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from mage_ray.lora_mix import LoraAdapter, load_adapter
from mage_ray.manifest import read_manifest
from mage_ray.storage import local_copy

__all__ = [
    "HEAD_FILE",
    "ValueModel",
    "ValueModelError",
    "apply_value_head",
    "load_value_model",
    "save_value_head",
    "token_values",
]

HEAD_FILE = "value_head.safetensors"
ADAPTER_DIR = "adapter"


class ValueModelError(ValueError):
    """A value-model directory is incomplete, malformed or does not fit the policy."""


@dataclass
class ValueModel:
    """One objective's explicit value model, ready to mix (adapter) and apply (head)."""

    adapter: LoraAdapter
    """LoRA on the base policy (mix it with the backbones' adapters via ``lora_mix``)."""
    head_weight: torch.Tensor
    """[V, H] float32."""
    head_bias: torch.Tensor
    """[V] float32."""
    manifest: dict[str, Any]
    path: str

    @property
    def objective(self) -> str:
        return self.manifest["objective"]

    @property
    def vocab_size(self) -> int:
        return self.head_weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.head_weight.shape[1]


def save_value_head(path: str | os.PathLike, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Write ``weight`` [V, H] and ``bias`` [V] as float32 safetensors."""
    from safetensors.torch import save_file

    if weight.dim() != 2 or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueModelError(
            f"value head: need weight [V, H] and bias [V], got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    save_file(
        {
            "weight": weight.detach().float().contiguous().cpu(),
            "bias": bias.detach().float().contiguous().cpu(),
        },
        str(path),
        metadata={"format": "pt"},
    )


def load_value_model(
    directory: str | os.PathLike, *, vocab_size: int | None = None, hidden_size: int | None = None
) -> ValueModel:
    """Load ``<directory>`` (adapter + head + manifest); check it fits a policy when sizes are given.

    ``vocab_size`` / ``hidden_size`` are the policy's (``model.config.vocab_size`` / ``hidden_size``); a
    mismatch raises :class:`ValueModelError` naming both sizes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = local_copy(directory)  # a URI: its local copy
    if not d.is_dir():
        raise FileNotFoundError(f"value model directory {str(d)!r} does not exist")
    manifest = read_manifest(d)
    if manifest is None:
        raise ValueModelError(f"value model {str(d)!r} has no manifest.json (training did not finish?)")
    if not (manifest.get("complete") is True or manifest.get("status") == "complete"):
        raise ValueModelError(f"value model {str(d)!r} is not complete (manifest has no complete: true)")
    head_file = d / HEAD_FILE
    if not head_file.is_file():
        raise ValueModelError(f"value model {str(d)!r} has no {HEAD_FILE}")
    try:
        tensors = load_file(str(head_file))
    except SafetensorError as e:
        raise ValueModelError(f"{str(head_file)!r} is not a readable safetensors file: {e}") from e
    if set(tensors) != {"weight", "bias"}:
        raise ValueModelError(
            f"{str(head_file)!r} must hold tensors 'weight' and 'bias', has {sorted(tensors)}"
        )
    weight, bias = tensors["weight"].float(), tensors["bias"].float()
    if weight.dim() != 2 or bias.shape != (weight.shape[0],):
        raise ValueModelError(
            f"{str(head_file)!r}: need weight [V, H] and bias [V], got {tuple(weight.shape)}, {tuple(bias.shape)}"
        )
    for key, actual in (("vocab_size", weight.shape[0]), ("hidden_size", weight.shape[1])):
        if key in manifest and int(manifest[key]) != actual:
            raise ValueModelError(
                f"value model {str(d)!r}: manifest {key}={manifest[key]} but the head has {actual}"
            )
    if vocab_size is not None and weight.shape[0] != vocab_size:
        raise ValueModelError(
            f"value model {str(d)} has vocabulary {weight.shape[0]} but the policy has {vocab_size}"
        )
    if hidden_size is not None and weight.shape[1] != hidden_size:
        raise ValueModelError(
            f"value model {str(d)} has hidden size {weight.shape[1]} but the policy has {hidden_size}"
        )
    adapter = load_adapter(d / ADAPTER_DIR, name=f"value:{manifest.get('objective', d.name)}")
    return ValueModel(adapter=adapter, head_weight=weight, head_bias=bias, manifest=manifest, path=str(d))


def apply_value_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """V(x, y<t) for every candidate token: hidden [..., H] -> values [..., V] (= h W^T + b)."""
    return torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias)


def token_values(
    hidden: torch.Tensor, tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """V(x, y<t)[y] for one token per position without the full |V| vector.

    hidden [..., H], tokens [...] (long) -> [...]: sum_h hidden[..., h] * W[tokens, h] + b[tokens].
    """
    w = weight[tokens]  # [..., H]
    return (hidden.to(weight.dtype) * w).sum(-1) + bias[tokens]
