"""What batching can buy on this machine: 32 requests in one batch vs 1, the engine beside the bare model.

    .venv/bin/python bench/bench_batching.py                          # embedded SmolLM2-135M, fp32 and bf16
    .venv/bin/python bench/bench_batching.py --dtypes float32 --threads 2
    .venv/bin/python bench/bench_batching.py --model tiny-random --new-tokens 4   # smoke run

In one process, one torch thread by default (what a replica with ``serve.num_cpus`` 1 gets), for each dtype:

* **The bare model's ceiling.** Plain Hugging Face decoding steps (one new token on a 40-column KV cache) at
  batch 1, 2, 32 and 64: the step of one request is bound by reading the weights, the step of 32 by arithmetic,
  so ``32 x step(1) / step(32)`` is the most any server can gain from batching 32 one-row requests on this CPU
  (``32 x step(2) / step(64)`` for two-row requests such as mage-e-m), before prefill.
* **The engine.** ``Engine.generate`` of 1 and of 32 requests (random r = 8 adapters and value heads,
  bench/bench_decode.py), each run with 1 and with ``--new-tokens`` + 1 new tokens (EOS ignored): the first is
  prefill + one step, the difference the decode steps. Printed per method: prefill seconds, ms per decode step,
  and the 32 / 1 throughput ratio of the whole request and of the decode steps alone. Prefill does not batch
  (one prompt is already many rows), so its share of a short request bounds the whole request's ratio.

Wall times are medians (model) and minima (engine) of repeats: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import PROMPTS, build_engine  # noqa: E402

from mage_ray.decode import Request  # noqa: E402


def model_steps(model_name: str, dtype: str, batches: list[int], context: int = 40, repeats: int = 6) -> dict:
    """Median seconds of one plain decoding step at each batch size."""
    from mage_ray.config import ModelConfig
    from mage_ray.models import load_policy

    model, _ = load_policy(ModelConfig(name_or_path=model_name, dtype=dtype))
    model.eval()
    out = {}
    for b in batches:
        ids = torch.randint(0, 1000, (b, context))
        with torch.inference_mode():
            cache = model(input_ids=ids, use_cache=True).past_key_values
            nxt = torch.randint(0, 1000, (b, 1))
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                cache = model(input_ids=nxt, past_key_values=cache, use_cache=True).past_key_values
                ts.append(time.perf_counter() - t)
        out[b] = statistics.median(ts)
    return out


def engine_split(engine, method: str, n: int, new_tokens: int, repeats: int = 2) -> tuple[float, float]:
    """(prefill + 1 step seconds, seconds per further decode step) of ``n`` requests in one batch."""

    def reqs(k: int) -> list[Request]:
        return [
            Request(
                PROMPTS[i % len(PROMPTS)],
                [i / max(n - 1, 1), 1 - i / max(n - 1, 1)],
                method=method,
                max_new_tokens=k,
                ignore_eos=True,
            )
            for i in range(n)
        ]

    def best(k: int) -> float:
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            engine.generate(reqs(k), batch_size=n)
            ts.append(time.perf_counter() - t)
        return min(ts)

    first = best(1)
    return first, (best(new_tokens + 1) - first) / new_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--methods", default="mage-e-m,bs")
    ap.add_argument("--clients", type=int, default=32, help="requests in the batched case")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, k = args.clients, args.new_tokens
    results = []
    print(f"{args.model}, {args.threads} torch thread(s), {n} requests vs 1, {k} new tokens each")
    print("| dtype | what | 1 request | {n} requests | ratio {n} / 1 |".replace("{n}", str(n)))
    print("|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        steps = model_steps(args.model, dtype, [1, 2, n, 2 * n])
        for rows in (1, 2):
            ratio = n * steps[rows] / steps[rows * n]
            results.append(
                {"dtype": dtype, "what": f"model step, {rows} row(s)", "ratio": ratio, "steps": steps}
            )
            print(
                f"| {dtype} | bare model, decode step of {rows}-row requests | {1000 * steps[rows]:.0f} ms "
                f"| {1000 * steps[rows * n]:.0f} ms | {ratio:.2f} |",
                flush=True,
            )
        engine = build_engine(args.model, dtype)
        for method in args.methods.split(","):
            engine.generate([Request(PROMPTS[0], [0.5, 0.5], method=method, max_new_tokens=2)])  # warm-up
            p1, s1 = engine_split(engine, method, 1, k)
            pn, sn = engine_split(engine, method, n, k)
            whole = n * (p1 + (k - 1) * s1) / (pn + (k - 1) * sn)
            steps_only = n * s1 / sn
            results.append(
                {
                    "dtype": dtype,
                    "method": method,
                    "prefill_s": [p1, pn],
                    "step_s": [s1, sn],
                    "ratio": whole,
                    "ratio_steps": steps_only,
                }  # fmt: skip
            )
            print(
                f"| {dtype} | engine {method}: prefill + first step | {p1:.2f} s | {pn:.2f} s | {n * p1 / pn:.2f} |\n"
                f"| {dtype} | engine {method}: decode step | {1000 * s1:.0f} ms | {1000 * sn:.0f} ms "
                f"| {steps_only:.2f} |\n"
                f"| {dtype} | engine {method}: whole request ({k} tokens) | {p1 + (k - 1) * s1:.2f} s "
                f"| {pn + (k - 1) * sn:.2f} s | **{whole:.2f}** |",
                flush=True,
            )
        del engine
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
