"""Offline preference grids with Ray Data: every prompt x every preference point x method, through the engine.

Writes Parquet (prompt, preference, method, text, finish_reason, error, completion_tokens, and
``score_<objective>`` and ``degenerate`` with ``--score``) to ``<out>/generations/`` and, with ``--score``,
``<out>/summary.json``: the mean rewards per (method, preference), the fraction of responses the quality gate
flags degenerate, and whether each point is on its method's non-dominated front.

    ray job submit --working-dir . -- python jobs/grid.py --config configs/embedded.yaml \
        --bundle runs/embedded/bundle --score
    python jobs/grid.py --config configs/smoke.yaml --bundle <dir> --prompts prompts.jsonl --step 0.5 --out /tmp/g

Prompts come from ``--prompts`` (a .parquet or .jsonl file/dir with a ``prompt`` column) or else from the
task's ``--split``. Decoding runs in an actor pool (``map_batches`` with a callable class holding one Engine:
``--concurrency`` actors, each with ``serve.num_cpus`` / ``serve.num_gpus``) in batches of
``decode.batch_size`` rows, so different preferences share a batch over one copy of the base weights.
"""

import json
from pathlib import Path

import numpy as np

from mage_ray.bundle import load_bundle
from mage_ray.decode import decode_defaults
from mage_ray.manifest import join, write_json_atomic
from mage_ray.metrics import pareto_mask
from mage_ray.runtime import init_ray, parse_job_args
from mage_ray.serve.core import BatchDecoder
from mage_ray.soup import preference_grid, validate_preference


def read_prompts(path: str | None, cfg, split: str):
    """A Ray Dataset with a ``prompt`` column: the file(s) at ``path`` or the task's split."""
    import ray.data

    if path is None:
        from mage_ray.tasks.prompts import load_prompts

        return ray.data.from_items([{"prompt": p} for p in load_prompts(cfg.task, split)])
    p = str(path)
    ds = ray.data.read_parquet(p) if p.endswith(".parquet") or Path(p).is_dir() else ray.data.read_json(p)
    if "prompt" not in ds.columns():
        raise SystemExit(f"error: {p} has no 'prompt' column (columns: {ds.columns()})")
    return ds.select_columns(["prompt"])


def expand(row: dict, points: list[list[float]], methods: list[str]) -> list[dict]:
    """One prompt row -> one row per (method, preference point)."""
    return [{"prompt": row["prompt"], "preference": mu, "method": m} for m in methods for mu in points]


def run_grid(
    ds,
    cfg,
    bundle_path: str,
    points: list[list[float]],
    methods: list[str],
    out: str,
    *,
    overrides=(),
    concurrency: int = 1,
    score: bool = False,
):
    """Decode (and score) ``ds`` x points x methods with Ray Data; write Parquet to ``<out>/generations``;
    return the (materialised) dataset."""
    import ray.data

    bundle = load_bundle(bundle_path)
    decode = decode_defaults(cfg, bundle, overrides).__dict__
    ds = ds.flat_map(expand, fn_kwargs={"points": points, "methods": methods})
    ds = ds.map_batches(
        BatchDecoder,
        fn_constructor_kwargs={
            "bundle_path": str(bundle.root),
            "decode": decode,
            "methods": methods,
            "device": "cuda" if cfg.serve.num_gpus > 0 else "cpu",
            "objectives": bundle.objectives if score else None,
            "reward_device": cfg.task.reward_device,
        },
        batch_size=cfg.decode.batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cfg.serve.num_cpus,
        num_gpus=cfg.serve.num_gpus,
        batch_format="numpy",
    )
    ds = ds.materialize()
    ds.write_parquet(join(out, "generations"))
    return ds


def summarise(ds, objectives: list[str]) -> list[dict]:
    """Mean reward and degenerate fraction per (method, preference), and whether the point is on that method's
    non-dominated front."""
    df = ds.drop_columns(["text"]).to_pandas()
    df["key"] = df["preference"].map(lambda p: json.dumps([round(float(x), 6) for x in p]))
    cols = [f"score_{n}" for n in objectives]
    out = []
    for method, g in df.groupby("method"):
        means = g.groupby("key")[cols].mean()  # (P, n), NaN rows (all errors) dropped below
        means = means.dropna()
        decoded = g[g[cols].notna().all(axis=1)]
        degenerate = decoded.groupby("key")["degenerate"].mean()
        front = pareto_mask(means.to_numpy()) if len(means) else np.array([], bool)
        for (key, row), f in zip(means.iterrows(), front):
            out.append(
                {
                    "method": method,
                    "preference": json.loads(key),
                    "mean_rewards": row.tolist(),
                    "degenerate_fraction": float(degenerate[key]),
                    "front": bool(f),
                }
            )
    return out


def main() -> None:
    def extra(p):
        p.add_argument("--bundle", required=True, help="bundle directory (from jobs/sweep.py)")
        p.add_argument("--prompts", default=None, help=".parquet / .jsonl with a 'prompt' column")
        p.add_argument("--split", default="test", choices=["train", "validation", "test"])
        p.add_argument("--step", type=float, default=None, help="grid step (default eval.grid_step)")
        p.add_argument(
            "--preferences", default=None, help="explicit points as JSON, e.g. '[[0.2,0.8],[1,0]]'"
        )
        p.add_argument("--methods", default=None, help="comma-separated methods (default: the bundle's)")
        p.add_argument("--concurrency", type=int, default=1, help="decoder actors (one Engine each)")
        p.add_argument("--score", action="store_true", help="score texts with the bundle's objectives")
        p.add_argument("--out", default=None, help="output directory (default <run_dir>/grid)")

    args, cfg = parse_job_args(__doc__.splitlines()[0], extra)
    bundle = load_bundle(args.bundle)
    n = bundle.n_objectives
    if args.preferences:
        points = [
            validate_preference(p, n, name=f"--preferences[{i}]").tolist()
            for i, p in enumerate(json.loads(args.preferences))
        ]
    else:
        points = preference_grid(n, args.step or cfg.eval.grid_step).tolist()
    methods = args.methods.split(",") if args.methods else [bundle.default_method]
    out = args.out or join(cfg.storage.run_dir, "grid")
    init_ray()
    ds = run_grid(
        read_prompts(args.prompts, cfg, args.split),
        cfg,
        args.bundle,
        points,
        methods,
        out,
        overrides=args.overrides,
        concurrency=args.concurrency,
        score=args.score,
    )
    print(f"wrote {ds.count()} rows ({len(points)} points x {len(methods)} methods) to {out}")
    if args.score:
        summary = summarise(ds, bundle.objectives)
        write_json_atomic(join(out, "summary.json"), {"objectives": bundle.objectives, "points": summary})
        for s in summary:
            print(
                s["method"],
                s["preference"],
                [round(x, 3) for x in s["mean_rewards"]],
                f"degenerate {s['degenerate_fraction']:.0%}",
                "*" if s["front"] else "",
            )


if __name__ == "__main__":
    main()
