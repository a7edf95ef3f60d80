"""Offline preference grids with Ray Data: every prompt x every preference point x method, through the engine.

Writes Parquet (prompt, preference, method, text, finish_reason, error, completion_tokens, and
``score_<objective>`` and ``degenerate`` with ``--score``) to ``<out>/generations/`` and, with ``--score``,
``<out>/summary.json``: the mean rewards per (method, preference), the fraction of responses the quality gate
flags degenerate, and whether each point is on its method's non-dominated front.

Prompts come from ``--prompts`` (a .parquet or .jsonl file/dir with a ``prompt`` column) or else from the
task's ``--split``; preferences from ``--preference`` (repeatable: ``--preference 0.2,0.8 --preference 1,0``,
spelled as ``export --preference``) or else the ``eval.grid_step`` grid (config fields are set by ``key=value``
overrides only). ``--preferences '[[0.2, 0.8], [1, 0]]'`` (JSON) still works, with a deprecation line. The library code is ``mage_ray.grid``. Decoding runs in an actor pool
(``map_batches`` with a callable class holding one Engine: ``--concurrency`` actors, each with
``decode.num_cpus`` / ``decode.num_gpus``) in batches of ``decode.batch_size`` rows, so different preferences
share a batch over one copy of the base weights.

    mage-ray grid --config configs/embedded.yaml --bundle runs/embedded/bundle --score
    mage-ray grid --config configs/smoke.yaml --bundle <dir> --prompts prompts.jsonl --out /tmp/g eval.grid_step=0.5
"""

from __future__ import annotations

import sys

from mage_ray.commands import open_bundle


def add_arguments(parser) -> None:
    parser.add_argument("--bundle", required=True, help="bundle directory (from the sweep)")
    parser.add_argument("--prompts", default=None, help=".parquet / .jsonl with a 'prompt' column")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument(
        "--preference",
        action="append",
        metavar="MU",
        help="a preference point, e.g. 0.2,0.8; repeat for more (default: the eval.grid_step grid)",
    )
    parser.add_argument(
        "--preferences", default=None, help="deprecated: points as JSON, e.g. '[[0.2,0.8],[1,0]]'"
    )
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: the bundle's)")
    parser.add_argument("--concurrency", type=int, default=1, help="decoder actors (one Engine each)")
    parser.add_argument("--score", action="store_true", help="score texts with the bundle's objectives")
    parser.add_argument("--out", default=None, help="output directory (default <run_dir>/grid)")
    parser.set_defaults(checks=("bundle", "storage", "grid", "model"))  # mage_ray.preflight


def run(args, cfg) -> None:
    from mage_ray.manifest import join, write_json_atomic
    from mage_ray.preflight import grid_preferences
    from mage_ray.runtime import data_progress, init_ray
    from mage_ray.soup import preference_grid, validate_preference

    bundle = open_bundle(args.bundle)
    n = bundle.n_objectives
    if args.preferences:
        print(
            "deprecated: --preferences JSON is now --preference MU, repeatable (--preference 0.2,0.8 ...)",
            file=sys.stderr,
        )
    explicit = grid_preferences(args)
    if explicit:
        points = [validate_preference(p, n, name=name).tolist() for name, p in explicit]
    else:
        points = preference_grid(n, cfg.eval.grid_step).tolist()
    methods = args.methods.split(",") if args.methods else [bundle.default_method]
    out = args.out or join(cfg.storage.run_dir, "grid")
    init_ray()
    data_progress()  # Ray Data's progress bars on a terminal, its log lines otherwise
    from mage_ray.grid import read_prompts, run_grid, summarise_dataset

    try:
        prompts = read_prompts(args.prompts, cfg, args.split)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    ds = run_grid(
        prompts,
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
        summary = summarise_dataset(ds, bundle.objectives)
        write_json_atomic(join(out, "summary.json"), {"objectives": bundle.objectives, "points": summary})
        for s in summary:
            print(
                s["method"],
                s["preference"],
                [round(x, 3) for x in s["mean_rewards"]],
                f"degenerate {s['degenerate_fraction']:.0%}",
                "*" if s["front"] else "",
            )
