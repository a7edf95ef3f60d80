"""The authors' per-objective extrapolation on a trained bundle: does it help Bone Soup beyond prompt noise?

    .venv/bin/python bench/extrapolation_k.py --config configs/embedded.yaml --bundle runs/v4/bundle \
        --a 0,0 --a 0.2,0 --a 0.4,0 --a 0,0.2 --a 0,0.4

The bone-soups code extrapolates each objective's end by its own factor k_j = 1 / (1 - a_j) and mixes them by
the preference: theta = sum_j mu_j (k_j theta_hat + (1 - k_j) theta_sft), i.e. a scale sum_j k_j mu_j on the merged
LoRA deltas (``mage_ray.soup.extrapolation_scale``). On LoRA deltas that is Eq. 13 with an alpha that depends on
mu, alpha(mu) = k . mu - 1, so every variant is decoded by the one engine with a per-preference alpha: no new
code path. ``a = 0,0`` is plain Bone Soup (alpha = 0, the sweep's usual choice); uniform a is the alpha sweep.

Decodes ``method`` (default bs) on the validation prompts (never the test prompts: this is a tuning question)
over the evaluation grid ``eval.grid_step``, scores every response, and prints per variant HV, controllability,
inner product and the worst preference's degenerate share, HV and inner product with their paired 90% bootstrap
interval, HV with the interval of its difference to the first variant (``mage_ray.uncertainty.bootstrap_trials``),
controllability with its 90% bounds (``mage_ray.uncertainty.controllability_bounds``), then a
sample response per variant at the two ends.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mage_ray.config import load_config
from mage_ray.decode import Engine
from mage_ray.evaluate import decode_grid, flag_generations, reference_point, score_generations, summarise
from mage_ray.soup import extrapolation_scale, k_from_alpha, preference_grid
from mage_ray.tasks.objectives import load_objectives
from mage_ray.tasks.prompts import load_prompts
from mage_ray.uncertainty import bootstrap_trials, controllability_bounds


def decode_variant(engine, prompts, grid, method, a, batch_size):
    """Rows of one variant: each preference decoded with alpha(mu) = k . mu - 1, k = 1 / (1 - a)."""
    k = np.asarray(k_from_alpha(a), dtype=float).reshape(-1)
    rows = []
    for p, mu in enumerate(grid):
        alpha = extrapolation_scale(mu, k=k) - 1.0
        part = decode_grid(
            engine,
            prompts,
            grid[p : p + 1],
            [method],
            batch_size=batch_size,
            request_kwargs={"alpha": float(alpha)},
        )
        rows += [{**r, "pref_index": p} for r in part]
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--method", default="bs")
    ap.add_argument("--a", action="append", required=True, help="a_j per objective, comma-separated; repeat")
    ap.add_argument("--split", default="validation")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    variants = [tuple(float(x) for x in s.split(",")) for s in args.a]
    objectives = load_objectives(cfg.task)
    prompts = load_prompts(cfg.task, args.split)
    grid = preference_grid(cfg.n_objectives, cfg.eval.grid_step)
    ref = reference_point(objectives, cfg.eval.ref_point)
    engine = Engine.from_bundle(args.bundle, cfg.decode, methods=[args.method])
    per_prompt, results, texts = {}, {}, {}
    for a in variants:
        t0 = time.time()
        rows = decode_variant(engine, prompts, grid, args.method, a, cfg.decode.batch_size)
        scores = score_generations(rows, prompts, objectives)
        flags = flag_generations(rows, prompts)
        (res,) = summarise(rows, scores, grid, [args.method], ref, flags)
        key = ",".join(f"{x:g}" for x in a)
        per_prompt[key], results[key] = res.per_prompt, res
        texts[key] = {(r["pref_index"], r["prompt_index"]): r["text"] for r in rows}
        print(f"a = ({key}): {len(rows)} generations in {time.time() - t0:.0f} s", flush=True)
    keys = list(per_prompt)
    print(
        f"\n{args.method} on {len(prompts)} {args.split} prompts x {len(grid)} preferences; HV and inner product: "
        f"90% paired bootstrap over prompts, 'vs first' = HV(variant) - HV(a = {keys[0]}); controllability: "
        "90% bounds from paired tests per pair of preferences (mage_ray.uncertainty.controllability_bounds)\n"
    )
    print(
        "| a (per objective) | k | HV | vs first | controllability [bounds] | inner product | degenerate worst |"
    )
    print("|---|---|---|---|---|---|---|")
    boots = {
        m: bootstrap_trials(per_prompt, grid, ref, default=keys[0], metric=m) for m in ("hv", "inner_product")
    }
    for key in keys:
        k = np.asarray(k_from_alpha([float(x) for x in key.split(",")])).reshape(-1)
        t = boots["hv"]["trials"][key]
        v = t.get("vs_default") or {}
        c = controllability_bounds(per_prompt[key], grid)
        cells = [
            f"{t['value']:.4f} [{t['lo']:.4f}, {t['hi']:.4f}]",
            f"[{v.get('lo', 0):+.4f}, {v.get('hi', 0):+.4f}]" if key != keys[0] else "-",
            f"{c['value']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]",
        ]
        ip = boots["inner_product"]["trials"][key]
        deg = results[key].degenerate
        print(
            f"| {key} | {', '.join(f'{x:.3g}' for x in k)} | {' | '.join(cells)} | "
            f"{ip['value']:.4f} [{ip['lo']:.4f}, {ip['hi']:.4f}] | {np.nanmax(deg):.1%} |"
        )
    print("\nmean rewards per preference (first objective's preference: rewards):")
    for key in keys:
        R = results[key].rewards
        print(f"  a = ({key}): " + "  ".join(f"{g[0]:.1f}:({r[0]:.3f},{r[1]:.3f})" for g, r in zip(grid, R)))
    print("\nsamples, prompt 0, at the two ends:")
    for key in keys:
        for p in (0, len(grid) - 1):
            print(f"  a = ({key}) mu = {grid[p].tolist()}: {texts[key][p, 0]!r}")


if __name__ == "__main__":
    main()
