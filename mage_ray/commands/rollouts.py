"""Sample and score value-model rollouts from the base policy (Ray Data); write ``<run_dir>/rollouts/``.

``value.rollouts_per_prompt`` samples (temperature 1.0, ``value.rollout_max_tokens``) per training prompt,
scored by every objective of ``task.objectives``. Resumable: shards already written are skipped.

    mage-ray rollouts --config configs/embedded.yaml
    mage-ray rollouts --config configs/smoke.yaml --no-ray            # in-process, no Ray
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    """(No import of mage_ray.train.rollouts here: it imports torch, and a bad config must fail in a second.)"""
    parser.add_argument("--out", default=None, help="output directory (default <run_dir>/rollouts)")
    parser.add_argument("--no-ray", action="store_true", help="sample in this process (small runs)")
    parser.add_argument(
        "--prompts-per-shard",
        type=int,
        default=None,
        help="resume granularity (default mage_ray.train.rollouts.DEFAULT_PROMPTS_PER_SHARD, 32)",
    )
    parser.set_defaults(plan_stages=("rollouts",))  # mage_ray.preflight's memory check


def run(args, cfg) -> None:
    from mage_ray.runtime import init_ray

    if not args.no_ray:
        init_ray()
    import numpy as np

    from mage_ray.train.rollouts import (
        BASE_COLUMNS,
        DEFAULT_PROMPTS_PER_SHARD,
        generate_rollouts,
        read_rollouts,
    )

    shard = args.prompts_per_shard or DEFAULT_PROMPTS_PER_SHARD
    out = generate_rollouts(cfg, args.out, use_ray=not args.no_ray, prompts_per_shard=shard)
    table = read_rollouts(out)
    lengths = np.array([len(r) for r in table.column("response_ids").to_pylist()])
    print(f"rollouts: {table.num_rows} rows in {out}; response tokens mean {lengths.mean():.1f}")
    for name in table.column_names:
        if name not in BASE_COLUMNS:
            r = np.asarray(table.column(name).to_pylist(), dtype=float)
            print(f"  {name}: mean {r.mean():.4f} std {r.std():.4f}")
