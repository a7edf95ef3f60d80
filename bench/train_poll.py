"""Ray Train's controller poll interval, measured side by side (docs/benchmarks.md, "Ray Train's controller poll").

    .venv/bin/python bench/train_poll.py noop                # a 1-worker run reporting 5 times, per interval
    .venv/bin/python bench/train_poll.py pipeline --rounds 2  # the kill/resume test's smoke pipeline, alternated

Each measurement runs in a fresh process with ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` set (2 s, Ray's default, and
0.25 s, what the suite and ``mage-ray rehearse`` use), alternating the two so a change in the machine's speed hits
both. Prints one line per run: the interval, wall seconds, and for ``pipeline`` the backbones stage's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INTERVALS = ("2.0", "0.25")
NOOP = """
import time, ray, ray.train
from ray.train.torch import TorchTrainer
def loop(config):
    import ray.train
    for i in range(5):
        ray.train.report({"step": i})
ray.init(num_cpus=2, include_dashboard=False)
t = time.monotonic()
TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=1),
             run_config=ray.train.RunConfig(name="noop", storage_path=%r)).fit()
print("WALL", time.monotonic() - t)
"""


def _env(interval: str) -> dict[str, str]:
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval, "RAY_ADDRESS": ""}
    env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def noop(interval: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run(
            [sys.executable, "-c", NOOP % d], env=_env(interval), capture_output=True, text=True, check=True
        ).stdout
    wall = float(next(ln for ln in out.splitlines() if ln.startswith("WALL")).split()[1])
    return f"poll {interval} s: 5-report run {wall:.1f} s"


def pipeline(interval: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        sys.path.insert(0, str(REPO / "tests"))
        from test_kill_resume import OVERRIDES  # the kill/resume test's run, not a copy of it

        cmd = [sys.executable, "jobs/pipeline.py", "--config", "configs/smoke.yaml", *OVERRIDES]
        t = time.monotonic()
        subprocess.run(
            [*cmd, f"storage.storage_path={d}"],
            cwd=REPO,
            env=_env(interval),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wall = time.monotonic() - t
        backbones = json.loads((Path(d) / "k" / "stages" / "backbones.json").read_text())["seconds"]
    return f"poll {interval} s: pipeline {wall:.1f} s, backbones stage {backbones:.1f} s"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["noop", "pipeline"])
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two intervals")
    args = ap.parse_args(argv)
    run = noop if args.what == "noop" else pipeline
    for _ in range(args.rounds):
        for interval in INTERVALS:
            print(run(interval), flush=True)


if __name__ == "__main__":
    main()
