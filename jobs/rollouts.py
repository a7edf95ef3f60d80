"""Sample and score value-model rollouts from the base policy (Ray Data); write ``<run_dir>/rollouts/``.

Resumable: shards already written are skipped. The body is mage_ray/commands/rollouts.py (also
``mage-ray rollouts``).

    ray job submit --working-dir . -- python jobs/rollouts.py --config configs/embedded.yaml \\
        storage.storage_path=/shared/mage_runs
    python jobs/rollouts.py --config configs/smoke.yaml --no-ray            # in-process, no Ray
"""

import sys

from mage_ray.commands import rollouts, run_command
from mage_ray.runtime import parse_job_args


def main() -> int:
    args, cfg = parse_job_args(__doc__.splitlines()[0], rollouts.add_arguments)
    return run_command(rollouts, args, cfg)


if __name__ == "__main__":
    sys.exit(main())
