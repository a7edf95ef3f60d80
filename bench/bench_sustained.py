"""Decode engine under sustained load, in process: a batch that never empties, its KV-cache width and step time.

    .venv/bin/python bench/bench_sustained.py                                # embedded SmolLM2-135M, 400 steps
    .venv/bin/python bench/bench_sustained.py --model tiny-random --steps 100   # smoke run
    PYTHONPATH=<other checkout> .venv/bin/python bench/bench_sustained.py   # the same on another revision

``Engine.stream(admit=...)`` keeps --live requests in flight for --steps decode steps: each request asks for a
random 8-32 new tokens (EOS ignored), methods alternate bs / mage-e-m (1 and 2 rows), prompts of 4 lengths, and a
finished request is replaced by a new one at once, so the batch never empties (continuous batching in steady
state). Random r = 8 adapters and value heads (bench/bench_decode.py). Recorded at every decode step: the batch's
rows, the KV-cache width (attention-mask columns) and the decoder forward's wall and process CPU time; reported:
their means over the first and the last 50 of the --steps sustained steps (the batch drains after them). With ``--threads 1`` CPU time measures the work even on a busy
machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import PROMPTS, build_engine  # noqa: E402

from mage_ray.decode import Request  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--live", type=int, default=8, help="requests kept in flight")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import mage_ray

    engine = build_engine(args.model)
    rng = random.Random(args.seed)
    n = [0]

    def new_request() -> Request:
        k = n[0]
        n[0] += 1
        mu = rng.random()
        return Request(
            PROMPTS[k % len(PROMPTS)],
            [mu, 1 - mu],
            method=("bs", "mage-e-m")[k % 2],
            max_new_tokens=rng.randint(8, 32),
            ignore_eos=True,
        )

    steps: list[dict] = []
    orig = engine._forward

    def spy(ids, mask, *a, **k):
        if ids.shape[1] != 1:
            return orig(ids, mask, *a, **k)
        c0, w0 = time.process_time(), time.perf_counter()
        out = orig(ids, mask, *a, **k)
        steps.append(
            {
                "rows": ids.shape[0],
                "width": mask.shape[1],
                "cpu_s": time.process_time() - c0,
                "wall_s": time.perf_counter() - w0,
            }
        )
        return out

    engine._forward = spy
    replace = [0]

    def admit():
        if len(steps) >= args.steps:
            return []
        out = [new_request() for _ in range(replace[0])]
        replace[0] = 0
        return out

    t0 = time.perf_counter()
    for events in engine.stream([new_request() for _ in range(args.live)], admit=admit):
        replace[0] += sum(ev.finished for ev in events)
    wall = time.perf_counter() - t0

    def window(xs: list[dict], key: str) -> float:
        return statistics.mean(x[key] for x in xs)

    first, last = steps[:50], steps[args.steps - 50 : args.steps]  # sustained: before admission stops
    summary = {
        "mage_ray": str(Path(mage_ray.__file__).parent),
        "load_average": open("/proc/loadavg").read().split()[:3],
        "steps": len(steps),
        "requests": n[0],
        "wall_s": wall,
        "max_width": max(s["width"] for s in steps[: args.steps]),
        **{f"{w}_{k}": window(xs, k) for w, xs in (("first50", first), ("last50", last)) for k in steps[0]},
    }
    summary["cpu_last_over_first"] = summary["last50_cpu_s"] / summary["first50_cpu_s"]
    summary["width_at"] = {i: steps[i]["width"] for i in range(0, len(steps), 50)}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(
            json.dumps({"args": vars(args), "summary": summary, "steps": steps}, indent=1)
        )


if __name__ == "__main__":
    main()
