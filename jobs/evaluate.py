"""Evaluate a bundle: every method of ``eval.methods`` over the preference grid on the test prompts.

Writes generations.parquet, rewards.json, metrics.json/metrics.md, samples.md and front.png to ``--out``. The
body is mage_ray/commands/evaluate.py (also ``mage-ray evaluate``).

    python jobs/evaluate.py --config configs/embedded.yaml --bundle runs/embedded/bundle
    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/embedded.yaml \\
        --bundle /shared/mage_runs/embedded/bundle storage.storage_path=/shared/mage_runs
"""

import sys

from mage_ray.commands import evaluate, run_command
from mage_ray.runtime import parse_job_args


def main() -> int:
    args, cfg = parse_job_args(__doc__.splitlines()[0], evaluate.add_arguments)
    return run_command(evaluate, args, cfg)


if __name__ == "__main__":
    sys.exit(main())
