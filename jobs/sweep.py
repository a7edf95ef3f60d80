"""Sweep beta, alpha and gamma against hypervolume and write a servable bundle.

Runs backbones (per-beta Tune trials, then the chosen beta in full) -> alpha/gamma Tune trials -> bundle + sweep
report under ``<storage.storage_path>/<storage.run_name>/``; rollouts and value models only when a method of
``eval.methods`` or ``sweep.gamma_method`` needs them (mage-e, mage-e-m). Rerunning the same command resumes. The body is mage_ray/commands/sweep.py (also ``mage-ray sweep``).

    python jobs/sweep.py --config configs/embedded.yaml
    ray job submit --working-dir . -- python jobs/sweep.py --config configs/embedded.yaml storage.storage_path=s3://bucket/runs
"""

import sys

from mage_ray.commands import run_command, sweep
from mage_ray.runtime import parse_job_args


def main() -> int:
    args, cfg = parse_job_args(__doc__.splitlines()[0], sweep.add_arguments)
    return run_command(sweep, args, cfg)


if __name__ == "__main__":
    sys.exit(main())
