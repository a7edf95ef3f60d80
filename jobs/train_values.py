"""Train one explicit value model per objective (Eq. 16) on the rollouts; Ray Train runs, concurrently via Tune.

Reads ``<run_dir>/rollouts/`` (from jobs/rollouts.py), writes ``<run_dir>/values/<objective>/``. The body is
mage_ray/commands/train_values.py (also ``mage-ray train-values``).

    ray job submit --working-dir . -- python jobs/train_values.py --config configs/embedded.yaml \\
        storage.storage_path=/shared/mage_runs
    python jobs/train_values.py --config configs/smoke.yaml --no-ray        # in-process, one after another
    python jobs/train_values.py --config configs/smoke.yaml value.steps=4     # fields: key=value overrides
"""

import sys

from mage_ray.commands import run_command, train_values
from mage_ray.runtime import parse_job_args


def main() -> int:
    args, cfg = parse_job_args(__doc__.splitlines()[0], train_values.add_arguments)
    return run_command(train_values, args, cfg)


if __name__ == "__main__":
    sys.exit(main())
