"""Offline preference grids with Ray Data: every prompt x every preference point x method, through the engine.

Writes Parquet to ``<out>/generations/`` and, with ``--score``, ``<out>/summary.json``. The body, its flags and
outputs are in mage_ray/commands/grid.py (also ``mage-ray grid``); the library code is ``mage_ray.grid``.

    ray job submit --working-dir . -- python jobs/grid.py --config configs/embedded.yaml \\
        --bundle /shared/mage_runs/embedded/bundle --score storage.storage_path=/shared/mage_runs
    python jobs/grid.py --config configs/smoke.yaml --bundle <dir> --prompts prompts.jsonl --out /tmp/g \\
        eval.grid_step=0.5
"""

import sys

from mage_ray.commands import grid, run_command
from mage_ray.runtime import parse_job_args


def main() -> int:
    args, cfg = parse_job_args(__doc__.splitlines()[0], grid.add_arguments)
    return run_command(grid, args, cfg)


if __name__ == "__main__":
    sys.exit(main())
