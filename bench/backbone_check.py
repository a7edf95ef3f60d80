"""Did the backbones learn what their weights ask for? (issue: Seek acceptance)

Two checks on the n trained backbones of B(beta) (``<run_dir>/backbones/beta_<beta>/b<i>``):

1. Training curve: backbone i's own combined reward h_i = w_i^T r (TRL's logged ``reward``, Eq. 11) over
   the first vs the last 10% of its steps (mean and std over those steps).
2. Direction: greedy decoding of ``--prompts`` test prompts with each backbone alone (method ``bs`` at
   mu = w_i with alpha = 0, i.e. lambda = B^-1 w_i = e_i: backbone i's adapter exactly) and with the base
   policy, on the same prompts; every
   response scored by every objective. Backbone i should beat backbone j on objective i when w_i puts more
   weight on objective i than w_j does.

    .venv/bin/python bench/backbone_check.py --config configs/embedded.yaml --beta 0.7 --prompts 64
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from mage_ray.config import load_config


def curve(metrics_file: Path, frac: float = 0.1) -> tuple[int, tuple[float, float], tuple[float, float]]:
    """(steps, (mean, std) of h over the first frac of steps, same over the last frac)."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    h = np.array([r["reward"] for r in rows if "reward" in r], dtype=float)
    if h.size == 0:
        raise SystemExit(f"{metrics_file}: no 'reward' entries (not a GRPO/RLOO backbone log?)")
    k = max(1, math.ceil(frac * h.size))
    return h.size, (h[:k].mean(), h[:k].std()), (h[-k:].mean(), h[-k:].std())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/embedded.yaml")
    p.add_argument("--beta", type=float, default=None, help="default: backbone.beta")
    p.add_argument("--dirs", nargs="*", default=None, help="backbone dirs (default: the run's b0..b{n-1})")
    p.add_argument("--prompts", type=int, default=64, help="test prompts (at most what the task has)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: decode.max_new_tokens")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    import dataclasses

    cfg = load_config(args.config, args.overrides)
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, n_test=args.prompts))
    beta = cfg.backbone.beta if args.beta is None else args.beta
    from mage_ray.bundle import build_bundle
    from mage_ray.decode import Engine, Request
    from mage_ray.manifest import read_manifest
    from mage_ray.tasks.objectives import load_objectives, score
    from mage_ray.tasks.prompts import load_prompts
    from mage_ray.train.ray_train import backbone_dir

    n = cfg.n_objectives
    dirs = args.dirs or [backbone_dir(cfg, beta, f"b{i}") for i in range(n)]
    ws = [np.asarray(read_manifest(d)["w"], dtype=float) for d in dirs]
    names = cfg.task.objectives

    print(f"## 1. Own combined reward h_i = w_i^T r, first vs last 10% of steps (beta = {beta})\n")
    print("| backbone | w | steps | h first 10% (mean ± std) | h last 10% (mean ± std) | change |")
    print("|---|---|---|---|---|---|")
    for d, w in zip(dirs, ws):
        steps, (a, sa), (b, sb) = curve(Path(d) / "metrics.jsonl")
        w_s = "(" + ", ".join(f"{x:.2f}" for x in w) + ")"
        print(
            f"| {Path(d).name} | {w_s} | {steps} | {a:.4f} ± {sa:.4f} | {b:.4f} ± {sb:.4f} | {b - a:+.4f} |"
        )

    prompts = load_prompts(cfg.task, "test")[: args.prompts]
    objectives = load_objectives(cfg.task, cfg.storage.cache_dir)
    with tempfile.TemporaryDirectory(prefix="mage-bbcheck-") as tmp:
        bundle = build_bundle(
            Path(tmp) / "bundle",
            model=cfg.model,
            objectives=names,
            beta=beta,
            backbones=dirs,
            default_method="bs",
        )
        eng = Engine.from_bundle(bundle, methods=["bs"])
        mnt = args.max_new_tokens or cfg.decode.max_new_tokens
        rows = {}
        t0 = time.time()
        # backbone i alone = Bone Soup at mu = w_i with alpha = 0: lambda = B^-1 w_i = e_i (Eq. 12)
        for label, method, mu in [("base", "base", None)] + [
            (Path(d).name, "bs", ws[i].tolist()) for i, d in enumerate(dirs)
        ]:
            reqs = [
                Request(q, preference=mu, method=method, alpha=0.0, max_new_tokens=mnt, do_sample=False)
                for q in prompts
            ]
            outs = eng.generate(reqs, batch_size=args.batch_size)
            bad = [o.error for o in outs if o.finish_reason == "error"]
            if bad:
                raise SystemExit(f"{label}: {len(bad)} requests failed, first: {bad[0]}")
            rows[label] = score(objectives, prompts, [o.text for o in outs])  # (N, n)
        dt = time.time() - t0
    print(f"\n## 2. Greedy, {len(prompts)} test prompts, {mnt} new tokens ({dt:.0f} s): mean ± s.e.m.\n")
    print("| policy | " + " | ".join(names) + " |")
    print("|---|" + "---|" * n)
    for label, s in rows.items():
        sem = s.std(0, ddof=1) / math.sqrt(len(s))
        print(f"| {label} | " + " | ".join(f"{m:.4f} ± {e:.4f}" for m, e in zip(s.mean(0), sem)) + " |")
    print("\nOwn combined reward h_i = w_i^T r on these prompts (backbone vs base):")
    for i, d in enumerate(dirs):
        h_b, h_0 = rows[Path(d).name] @ ws[i], rows["base"] @ ws[i]
        diff = h_b - h_0
        print(
            f"  {Path(d).name}: {h_b.mean():.4f} vs base {h_0.mean():.4f}, diff {diff.mean():+.4f} "
            f"± {diff.std(ddof=1) / math.sqrt(len(diff)):.4f}"
        )
    print(
        "\nPairwise (backbone i vs j on objective i, where w_i[i] > w_j[i]): paired difference over prompts"
    )
    for i in range(n):
        for j in range(n):
            if i == j or ws[i][i] <= ws[j][i]:
                continue
            a, b = rows[Path(dirs[i]).name][:, i], rows[Path(dirs[j]).name][:, i]
            diff = a - b
            se = diff.std(ddof=1) / math.sqrt(len(diff))
            verdict = "yes" if diff.mean() > 0 else "NO"
            print(
                f"  {Path(dirs[i]).name} > {Path(dirs[j]).name} on {names[i]}: {verdict} "
                f"({a.mean():.4f} vs {b.mean():.4f}, diff {diff.mean():+.4f} ± {se:.4f})"
            )


if __name__ == "__main__":
    main()
