"""Held-out pair accuracy of every learned guide of a run: value models, GenARM's ARMs, PARM.

A guide that never learned its objective makes the method it guides lose for a reason that has nothing to do with
the method. Each trainer measures its guide on pairs of held-out prompts it did not train on and keeps the result
in its manifest (``val_accuracy``, :func:`mage_ray.uncertainty.pair_accuracy`): the value models on ranking pairs
of ``value.val_fraction`` of the prompts (:mod:`mage_ray.train.values`), the ARMs and PARM on the best / worst
pairs of ``arm.val_fraction`` of the prompts (:mod:`mage_ray.train.arm`, :mod:`mage_ray.train.parm`). This module
collects them for the sweep report (:func:`mage_ray.sweep.write_sweep_report`) and flags a guide at chance.
"""

from __future__ import annotations

from mage_ray.config import Config

__all__ = ["guide_accuracy", "guides_markdown"]


def _f(x) -> str:
    return "" if x is None else f"{x:.4g}"


def guide_accuracy(cfg: Config) -> list[dict]:
    """Held-out pair accuracy of every learned guide the run has trained, from its manifest: the value models
    (ranking pairs of held-out prompts), the GenARM ARMs and PARM (pairs of the held-out prompts; PARM per
    objective at its own vertex). Each row: guide, objective, kind, accuracy
    (:func:`mage_ray.uncertainty.pair_accuracy`), reference (what to compare with). Guides not trained are
    left out; a manifest written before held-out accuracy existed gives a row without it."""
    from mage_ray.manifest import read_manifest
    from mage_ray.train.arm import arm_dir
    from mage_ray.train.parm import parm_dir
    from mage_ray.train.values import value_model_dir
    from mage_ray.uncertainty import pair_accuracy

    rows = []
    for o in cfg.task.objectives:
        m = read_manifest(value_model_dir(cfg, o))
        if m:
            acc = m.get("val_accuracy")
            if acc is None and m.get("ranking_accuracy") is not None:  # older manifest: no tie count kept
                n = int(m.get("n_val_pairs") or 0)
                acc = pair_accuracy(int(round(m["ranking_accuracy"] * n)), 0, n)
            ref = f"val MSE {_f(m.get('val_mse'))} vs {_f(m.get('val_mse_constant'))} for a constant"
            rows.append(
                {"guide": "value model", "objective": o, "kind": "value", "accuracy": acc, "reference": ref}
            )
    for o in cfg.task.objectives:
        m = read_manifest(arm_dir(cfg, o))
        if m:
            base = m.get("val_accuracy_base") or {}
            ref = "" if base.get("value") is None else f"base policy {base['value']:.3g} on the same pairs"
            rows.append(
                {
                    "guide": "ARM",
                    "objective": o,
                    "kind": "arm",
                    "accuracy": m.get("val_accuracy"),
                    "reference": ref,
                }
            )
    m = read_manifest(parm_dir(cfg))
    if m:
        other = m.get("val_accuracy_other_vertex") or {}
        for o in m.get("objectives", cfg.task.objectives):
            acc = (m.get("val_accuracy") or {}).get(o)
            ref = "" if other.get(o) is None else f"{other[o]:.3g} at the other vertex"
            rows.append(
                {
                    "guide": "PARM (own vertex)",
                    "objective": o,
                    "kind": "parm",
                    "accuracy": acc,
                    "reference": ref,
                }
            )
    return rows


def guides_markdown(rows: list[dict]) -> str:
    """The guides' held-out accuracy table; a guide at or below chance is flagged in bold."""
    out = [
        "\n## learned guides: held-out pair accuracy\n\n",
        "| guide | objective | held-out pairs | pair accuracy [interval] | verdict | reference |\n",
        "|---|---|---|---|---|---|\n",
    ]
    for r in rows:
        a = r["accuracy"]
        if a is None:
            out.append(
                f"| {r['guide']} | {r['objective']} | | not measured (trained before held-out pairs) | | |\n"
            )
            continue
        cell = "" if a["value"] is None else f"{a['value']:.3g} [{a['lo']:.3g}, {a['hi']:.3g}]"
        verdict = a["verdict"] if a["verdict"] == "above chance" else f"**{a['verdict']}**"
        out.append(
            f"| {r['guide']} | {r['objective']} | {a['n_pairs']} | {cell} | {verdict} | {r['reference']} |\n"
        )
    level = next((r["accuracy"]["confidence"] for r in rows if r["accuracy"]), 0.9)
    out.append(
        f"\nPairs of held-out prompts the guide did not train on: it should rank the better response higher. Interval:"
        f" exact (Clopper-Pearson) at {level:.0%}, ties counted wrong for the lower and right for the upper bound;"
        " **at chance** (the interval holds 0.5) or **below chance**: the guide is not shown to have learned its"
        " objective, and a method it guides that loses may just have a guide that never learned.\n"
    )
    return "".join(out)
