"""What the engine runs, in memory: :class:`EngineParts`, and :func:`parts_from_bundle` to load it from a bundle."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mage_ray.bundle import Bundle, adapter_path
from mage_ray.guidance import ADAPTER_GROUPS, groups_for
from mage_ray.lora_mix import LoraAdapter, load_adapter

__all__ = ["EngineParts", "parts_from_bundle"]


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
    arms: Sequence[LoraAdapter] = ()
    """n GenARM autoregressive reward models in objective order (genarm, genarm-m), or none."""
    parm: Sequence[LoraAdapter] = ()
    """PARM's n + 1 PBLoRA components (shared, then objective order; :func:`mage_ray.pblora.pblora_components`)."""
    method_gammas: dict[str, float] | None = None
    """Per-method default guidance strength chosen by the sweep (ARM methods: beta_r / beta); others use gamma."""
    objectives: Sequence[str] | None = None
    alpha: float = 0.0
    gamma: float = 1.0
    default_method: str = "mage-e-m"
    max_context: int | None = None
    """Prompt + completion token limit (None: the model's max_position_embeddings)."""
    use_chat_template: bool = True


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
    arms: list[LoraAdapter] = []
    if "arms" in groups:
        arms = [load(f"arms[{i}]", rel) for i, rel in enumerate(bundle.arms)]
    parm: list[LoraAdapter] = []
    if "parm" in groups and bundle.parm is not None:
        from mage_ray.pblora import pblora_components

        parm = pblora_components(bundle.path(bundle.parm) / "pblora", name="parm")
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
        arms=arms,
        parm=parm,
        method_gammas=dict(bundle.method_gammas),
        objectives=bundle.objectives,
        alpha=bundle.alpha,
        gamma=bundle.gamma,
        default_method=bundle.default_method,
        max_context=mcfg.max_context,
        use_chat_template=mcfg.chat_template,
    )
