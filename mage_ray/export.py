"""One preference of a bundle as standalone weights: a merged PEFT adapter, or a merged HF checkpoint.

For serving a fixed preference elsewhere (plain transformers, PEFT, vLLM) without mage_ray. What gets merged is
the one policy row the method decodes with (:mod:`mage_ray.guidance`), so the exported weights are exactly
that row's:

* bs / bs-wrpo: the backbones with c = (1 + alpha) B(beta)^-1 mu (Eq. 6 + Eq. 13 on LoRA deltas);
  rs: the beta = 1 backbones with c = mu; morlhf / modpo: the adapter trained at mu (c = 1).
* mage-*: guidance by value models (Eq. 25) is a decoding rule that no weights can hold; their policy row is
  Bone Soup, so they export as bs (``export_preference`` reports ``exported_method = "bs"``).
* mod (an ensemble of n experts), ric (a rewritten prompt) and base (no adapter at all) are refused.

The adapter is the exact merged delta as one LoRA of rank sum_i r_i (:func:`mage_ray.lora_export.rank_sum_adapter`),
loadable with ``peft.PeftModel.from_pretrained(base, <out>)``; ``merged_model=True`` writes W0 + sum_i c_i dW_i
instead (:func:`mage_ray.lora_export.export_merged`, plus the tokenizer). Either way ``<out>/export.json`` says
what was exported (bundle, method, preference, alpha, coefficients).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mage_ray.bundle import Bundle, adapter_path
from mage_ray.guidance import AdapterLayout, PlanArgs, make_plan, method_spec
from mage_ray.manifest import write_json_atomic
from mage_ray.soup import PreferenceError, validate_preference
from mage_ray.storage import atomic_dir, exists, is_dir, is_file, is_uri, join, listdir, local_path

__all__ = ["EXPORT_FILE", "ExportError", "export_preference", "policy_coefficients"]

EXPORT_FILE = "export.json"


class ExportError(ValueError):
    """The method cannot be exported as one set of weights, or the bundle lacks what it needs."""


def policy_coefficients(
    bundle: Bundle, method: str, preference: Sequence[float], alpha: float | None = None
) -> tuple[str, list[tuple[str, float]]]:
    """``(exported method, [(bundle-relative adapter dir, c_i), ...])`` of the method's policy row at mu.

    Zero coefficients are dropped. ``alpha`` defaults to the bundle's (the sweep's choice).
    """
    try:
        spec = method_spec(method)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if spec.family == "arm":
        raise ExportError(
            f"method {method!r} steers the base model with reward models while decoding: it is not one set of "
            "weights and cannot be exported (serve the bundle instead)"
        )
    exported = "bs" if spec.family == "mage" else method
    try:
        mu = validate_preference(preference, bundle.n_objectives, name="preference")
    except PreferenceError as e:
        raise ExportError(str(e)) from None
    groups = {
        "backbones": list(bundle.backbones),
        "rs_backbones": list(bundle.rs_backbones),
        "wrpo_backbones": list(bundle.wrpo_backbones),
        "morlhf": [e["adapter"] for e in bundle.morlhf],
        "modpo": [e["adapter"] for e in bundle.modpo],
    }
    column = itertools.count()
    cols = {g: tuple(next(column) for _ in dirs) for g, dirs in groups.items()}
    dirs = [d for g in groups.values() for d in g]  # column order
    layout = AdapterLayout(
        k=len(dirs),
        n=bundle.n_objectives,
        beta=bundle.beta,
        backbones=cols["backbones"],
        rs_backbones=cols["rs_backbones"],
        wrpo_backbones=cols["wrpo_backbones"],
        morlhf=tuple((tuple(e["preference"]), c) for e, c in zip(bundle.morlhf, cols["morlhf"])),
        modpo=tuple((tuple(e["preference"]), c) for e, c in zip(bundle.modpo, cols["modpo"])),
    )
    a = bundle.alpha if alpha is None else float(alpha)
    try:
        plan = make_plan(exported, layout, mu, PlanArgs(alpha=a), gamma=0.0)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if len(plan.rows) != 1 or plan.prompt is not None:
        why = "rewrites the prompt" if plan.prompt is not None else f"decodes with {len(plan.rows)} rows"
        raise ExportError(f"method {method!r} {why}: it is not one set of weights and cannot be exported")
    c = plan.rows[0].coeffs  # [K]
    terms = [(dirs[i], float(c[i])) for i in np.flatnonzero(np.abs(c) > 1e-12)]  # B^-1 mu: round-off zeros
    if not terms:
        raise ExportError(
            f"method {method!r} uses no adapter: its model is the base model {bundle.base_model!r}"
        )
    return exported, terms


def export_preference(
    bundle: Bundle,
    preference: Sequence[float],
    out: str | Path,
    *,
    method: str = "bs",
    alpha: float | None = None,
    merged_model: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Write the method's policy at ``preference`` to ``out``; return the export record.

    ``out`` must be new, empty or an earlier export, which is then replaced atomically.
    """
    from mage_ray.lora_export import export_merged, rank_sum_adapter, save_adapter
    from mage_ray.lora_mix import load_adapter

    out = str(out) if is_uri(out) else local_path(out)  # a URI is written locally, then uploaded (atomic_dir)
    if exists(out) and (not is_dir(out) or listdir(out)) and not is_file(join(out, EXPORT_FILE)):
        raise ExportError(
            f"{str(out)!r} exists and is not an earlier export (no {EXPORT_FILE}): it is not replaced"
        )
    exported, terms = policy_coefficients(bundle, method, preference, alpha)
    adapters = [load_adapter(adapter_path(bundle.path(rel)), name=rel) for rel, _ in terms]
    coeffs = [c for _, c in terms]
    record = {
        "bundle": bundle.location,
        "base_model": bundle.base_model,
        "objectives": list(bundle.objectives),
        "preference": [float(x) for x in preference],
        "method": method,
        "exported_method": exported,
        "alpha": bundle.alpha if alpha is None else float(alpha),
        "beta": bundle.beta,
        "coefficients": dict(terms),
        "format": "hf-model" if merged_model else "peft-adapter",
    }
    with atomic_dir(out) as tmp:
        if merged_model:
            from mage_ray.models import load_policy

            model, tokenizer = load_policy(bundle.model_config(), device=device)
            export_merged(model, adapters, coeffs, tmp, tokenizer=tokenizer)
        else:
            merged = rank_sum_adapter(adapters, coeffs, name=f"{exported}@{record['preference']}")
            save_adapter(merged, tmp)
        write_json_atomic(Path(tmp) / EXPORT_FILE, record)
    return record
