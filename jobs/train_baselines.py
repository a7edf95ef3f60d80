"""Train the baselines (RiC, MODPO, WRPO backbones) and the decoding-time reward models of GenARM and PARM.

All of them learn from the base policy's scored rollouts and run as Ray Train runs; complete outputs are skipped,
interrupted ones resume. The body, and what it writes, is in mage_ray/commands/train_baselines.py (also
``mage-ray train-baselines``).

    ray job submit --working-dir . -- python jobs/train_baselines.py --config configs/embedded.yaml \\
        --which all storage.storage_path=/shared/mage_runs
    python jobs/train_baselines.py --config configs/smoke.yaml --which modpo backbone.steps=2 eval.grid_step=0.5
    python jobs/train_baselines.py --config configs/smoke.yaml --which wrpo --sources tiny-random:1
"""

import sys

from mage_ray.commands import run_command, train_baselines
from mage_ray.runtime import parse_job_args


def main() -> int:
    args, cfg = parse_job_args(__doc__.splitlines()[0], train_baselines.add_arguments)
    return run_command(train_baselines, args, cfg)


if __name__ == "__main__":
    sys.exit(main())
