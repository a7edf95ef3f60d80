"""Materialised merge and export of LoRA adapters: W = W0 + sum_i c_i s_i B_i A_i in the weights (Eq. 6 / 13 on
LoRA deltas), the exact merged delta as one rank-sum adapter, and PEFT / HF safetensors directories.

The per-row mixing that decoding uses, without touching W0, is :mod:`mage_ray.lora_mix`; tests check it against
:func:`merge_weights` token for token.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from mage_ray.lora_mix import (
    _PEFT_PREFIX,
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterError,
    LoraAdapter,
    _check_adapters,
    _check_coeffs,
    _jsonable,
    _target_modules,
    _unwrap_,
    _users,
)

__all__ = ["export_merged", "merge_into_", "merge_weights", "rank_sum_adapter", "save_adapter"]


def merge_into_(
    model: nn.Module,
    adapters: Sequence[LoraAdapter],
    coeffs: Sequence[float] | torch.Tensor,
    originals: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """In place: W = W0 + sum_i c_i s_i B_i A_i for every targeted module (Eq. 6 / 13 on LoRA deltas).

    W0 is ``originals[module]`` when given (a snapshot, so the model can be re-merged for another c without
    drift), else the current weight. The sum is one matmul per module: (B_cat * c s) @ A_cat, in float32.
    """
    adapters = _check_adapters(adapters)
    c = _check_coeffs(coeffs, len(adapters))
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for module in _target_modules(adapters):
            users, layer = _users(adapters, model, module)
            if owners[id(layer.weight)] > 1:
                raise AdapterError(
                    f"{module!r} shares its weight with another module (tied embeddings); merging would change both"
                )
            W = layer.weight  # [d_out, d_in]
            A_cat = torch.cat([a.modules[module][0].float() for _, a in users], dim=0)  # [R, d_in]
            B_cat = torch.cat(
                [a.modules[module][1].float() * (float(c[i]) * a.scaling[module]) for i, a in users], dim=1
            )  # [d_out, R], columns scaled by c_i s_i
            W0 = W if originals is None else originals[module]
            A_cat, B_cat = A_cat.to(W.device), B_cat.to(W.device)
            if W.dtype == torch.float32 and W0 is W:  # W += B_cat A_cat = sum_i c_i s_i B_i A_i
                W.addmm_(B_cat, A_cat)
            elif W.dtype == torch.float32:  # one pass over W: W = W0 + B_cat A_cat
                torch.addmm(W0, B_cat, A_cat, out=W)
            else:  # low precision: add in float32, round once
                W.copy_(torch.addmm(W0.float(), B_cat, A_cat).to(W.dtype))
    return model


def merge_weights(model: nn.Module, adapters: Sequence[LoraAdapter], coeffs: Sequence[float]) -> nn.Module:
    """A deep copy of ``model`` (plain HF model, MixedLinear layers removed) with W0 + sum_i c_i s_i B_i A_i."""
    merged = _unwrap_(copy.deepcopy(model))
    return merge_into_(merged, adapters, coeffs)


def rank_sum_adapter(
    adapters: Sequence[LoraAdapter], coeffs: Sequence[float], name: str = "merged"
) -> LoraAdapter:
    """The exact merged delta as one adapter of rank sum_i r_i (PEFT's "cat"): A = [c_i s_i A_i], B = [B_i].

    Scaling is folded into A, so every module has scaling 1 (saved as lora_alpha = r). PEFT's
    ``add_weighted_adapter(..., combination_type="cat")`` gives the same tensors (tests/test_lora_mix.py checks
    it); it is not used because it needs the base model loaded with every adapter attached, and this works on the
    adapter tensors alone (an export of a 7B bundle would otherwise load its base weights).
    """
    adapters = _check_adapters(adapters)
    c = _check_coeffs(coeffs, len(adapters))
    modules, scaling = {}, {}
    for module in _target_modules(adapters):
        users, _ = _users(adapters, None, module)
        A = torch.cat([a.modules[module][0].float() * (float(c[i]) * a.scaling[module]) for i, a in users])
        B = torch.cat([a.modules[module][1].float() for _, a in users], dim=1)
        modules[module], scaling[module] = (A, B), 1.0  # A [R, d_in], B [d_out, R]
    config = {k: v for k, v in adapters[0].config.items() if k not in ("rank_pattern", "alpha_pattern")}
    return LoraAdapter(name=name, modules=modules, scaling=scaling, config=config)


def save_adapter(adapter: LoraAdapter, path: str | Path) -> None:
    """Write a standard PEFT directory loadable by ``peft.PeftModel.from_pretrained``.

    r / lora_alpha / rank_pattern / alpha_pattern / target_modules are rebuilt from the tensors so the file
    always matches them: target_modules lists the exact module names, r is the most common rank, lora_alpha
    gives the most common scaling (alpha = s r), and modules that differ get rank_pattern / alpha_pattern
    entries (regex-escaped full names). Other config fields (base model, task type) are kept.
    """
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    ranks = {m: adapter.rank(m) for m in adapter.modules}
    r = Counter(ranks.values()).most_common(1)[0][0]
    s = Counter(adapter.scaling.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(m): rm for m, rm in ranks.items() if rm != r}
    alpha_pattern = {
        re.escape(m): _num(adapter.scaling[m] * ranks[m])
        for m in adapter.modules
        if adapter.scaling[m] * ranks[m] != s * r or ranks[m] != r
    }
    config = dict(adapter.config)
    config.update(
        peft_type="LORA",
        r=r,
        lora_alpha=_num(s * r),
        use_rslora=False,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=sorted(adapter.modules),
        bias="none",
        use_dora=False,
        modules_to_save=None,
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        inference_mode=True,
    )
    config.setdefault("task_type", "CAUSAL_LM")
    (path / CONFIG_NAME).write_text(json.dumps(_jsonable(config), indent=2, sort_keys=True) + "\n")
    tensors = {}
    for m, (A, B) in adapter.modules.items():
        tensors[f"{_PEFT_PREFIX}{m}.lora_A.weight"] = A.detach().contiguous().cpu()
        tensors[f"{_PEFT_PREFIX}{m}.lora_B.weight"] = B.detach().contiguous().cpu()
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def export_merged(
    model: nn.Module,
    adapters: Sequence[LoraAdapter],
    coeffs: Sequence[float],
    path: str | Path,
    tokenizer=None,
) -> Path:
    """Save the merged model W0 + sum_i c_i s_i B_i A_i as a plain HF safetensors checkpoint; return ``path``."""
    path = Path(path).expanduser()
    merged = merge_weights(model, adapters, coeffs)
    merged.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
