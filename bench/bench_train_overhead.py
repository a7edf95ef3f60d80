"""GRPO step time inside Ray Train versus the same TRL run in a plain process (Seek acceptance).

    .venv/bin/python bench/bench_train_overhead.py --config configs/embedded.yaml --steps 8 --pairs 2
    .venv/bin/python bench/bench_train_overhead.py --config configs/smoke.yaml --steps 3 --pairs 1  # smoke

One backbone (w = column 0 of B(backbone.beta)), same config, seed, prompts and step count, run alternately:
plain :func:`mage_ray.train.backbone.train_backbone` in this process, then :func:`train_backbone_ray` (one
Ray Train worker with ``--cpus`` CPUs; the plain run uses the same number of torch threads). Per run: the
median of TRL's own ``step_time`` over the steps after the first (model load and warm-up excluded), and the
wall time of the whole call. The ratio Ray / plain is reported per pair and as the median over pairs.
Outputs go to a temporary directory and are deleted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mage_ray.config import load_config


def step_times(run_dir: str) -> list[float]:
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [float(r["step_time"]) for r in rows if "step_time" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/embedded.yaml")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument(
        "--cpus", type=int, default=2, help="CPUs of the Ray worker = torch threads of the plain run"
    )
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="start Ray with its dashboard (Ray Train's PlacementGroupCleaner queries the State API through it)",
    )
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    import ray

    from mage_ray.soup import backbone_weights
    from mage_ray.train.backbone import train_backbone
    from mage_ray.train.ray_train import train_backbone_ray

    torch.set_num_threads(args.cpus)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=args.dashboard, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mage-overhead-") as tmp:
        cfg = load_config(
            args.config,
            [
                *args.overrides,
                f"storage.storage_path={tmp}",
                f"backbone.resources_per_worker={{CPU: {args.cpus}}}",
                f"backbone.checkpoint_every={args.steps}",
            ],
        )
        w = backbone_weights(cfg.n_objectives, cfg.backbone.beta)[0].tolist()
        for i in range(args.pairs):
            res = {}
            for kind in ("plain", "ray"):
                out = f"{tmp}/{kind}{i}"
                t0 = time.perf_counter()
                if kind == "plain":
                    train_backbone(cfg, w, out, name=f"{kind}{i}", steps=args.steps, quiet=True)
                else:
                    train_backbone_ray(
                        cfg, w, name=f"{kind}{i}", out_dir=out, steps=args.steps, progress=False
                    )
                wall = time.perf_counter() - t0
                st = step_times(out)
                res[kind] = (statistics.median(st[1:] or st), wall)
                print(f"pair {i} {kind:5s}: median step {res[kind][0]:.2f} s, wall {wall:.1f} s", flush=True)
            rows.append(res)
    ray.shutdown()
    print(f"\n{cfg.model.name_or_path}, {args.steps} steps, {args.cpus} CPUs / torch threads\n")
    print(
        "| pair | plain step (s) | Ray Train step (s) | step ratio | plain wall (s) | Ray wall (s) | wall ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        (ps, pw), (rs, rw) = r["plain"], r["ray"]
        print(f"| {i} | {ps:.2f} | {rs:.2f} | {rs / ps:.3f} | {pw:.1f} | {rw:.1f} | {rw / pw:.3f} |")
    sr = statistics.median(r["ray"][0] / r["plain"][0] for r in rows)
    wr = statistics.median(r["ray"][1] / r["plain"][1] for r in rows)
    print(f"\nmedian ratio Ray Train / plain: step {sr:.3f}, wall {wr:.3f}")


if __name__ == "__main__":
    main()
