"""Train one explicit value model per objective (Eq. 16) on the rollouts; Ray Train runs, concurrently via Tune.

Reads ``<run_dir>/rollouts/`` (from jobs/rollouts.py) and writes ``<run_dir>/values/<objective>/``
(adapter/, value_head.safetensors, manifest.json with val_mse and ranking_accuracy). Complete value models
are skipped; an interrupted Ray Train run resumes from its last checkpoint.

    ray job submit --working-dir . -- python jobs/train_values.py --config configs/embedded.yaml
    python jobs/train_values.py --config configs/smoke.yaml --no-ray        # in-process, one after another
    python jobs/train_values.py --config configs/smoke.yaml value.steps=4     # fields: key=value overrides
"""

from mage_ray.runtime import init_ray, parse_job_args
from mage_ray.train.values import train_value_models


def main() -> None:
    def extra(p):
        p.add_argument(
            "--rollouts", default=None, help="rollouts dir or Parquet file (default <run_dir>/rollouts)"
        )
        p.add_argument("--objectives", default=None, help="comma-separated subset (default task.objectives)")
        p.add_argument("--max-concurrent", type=int, default=None, help="value models trained at once")
        p.add_argument("--no-ray", action="store_true", help="train in this process, one after another")

    args, cfg = parse_job_args(__doc__.splitlines()[0], extra)
    if not args.no_ray:
        init_ray()
    objectives = args.objectives.split(",") if args.objectives else None
    manifests = train_value_models(
        cfg,
        args.rollouts,
        objectives,
        use_ray=not args.no_ray,
        max_concurrent=args.max_concurrent,
    )
    for m in manifests:
        print(
            f"{m['objective']}: val_mse {m['val_mse']} (constant {m['val_mse_constant']}), "
            f"ranking_accuracy {m['ranking_accuracy']} over {m['n_val_pairs']} pairs, "
            f"{m['mean_step_time_s']} s/step"
        )


if __name__ == "__main__":
    main()
