"""What letting answers end their sentence costs: ``decode.finish_sentence_tokens`` (and, for comparison, a larger
``decode.max_new_tokens``) on a few prompts through the decode engine, greedy, one batch per setting.

Prints per setting the share of answers that end a sentence (the rule of the conciseness objective,
``mage_ray.tasks.objectives.finished``), the mean and max new tokens, and the seconds of the batch.

    .venv/bin/python bench/sentence_finish.py --bundle runs/embedded/bundle --prompts 16
    .venv/bin/python bench/sentence_finish.py --bundle /tmp/stand_in/bundle --prompts 8 --method bs
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--config", default="embedded")
    ap.add_argument("--prompts", type=int, default=8, help="test prompts of the config's task")
    ap.add_argument("--method", default=None, help="decoding method (default: the bundle's)")
    ap.add_argument("--max-new", type=int, default=32, help="decode.max_new_tokens of the baseline")
    ap.add_argument("--graces", default="0,16,32", help="finish_sentence_tokens values to compare")
    ap.add_argument("--more", default="64", help="max_new_tokens values to compare (grace 0)")
    args = ap.parse_args()

    import torch

    from mage_ray.bundle import load_bundle
    from mage_ray.config import load_config
    from mage_ray.decode import Engine, Request, decode_defaults
    from mage_ray.tasks.objectives import finished
    from mage_ray.tasks.prompts import load_prompts

    torch.set_num_threads(1)
    cfg = load_config(args.config)
    prompts = [p["prompt"] if isinstance(p, dict) else p for p in load_prompts(cfg.task, "test")][
        : args.prompts
    ]
    bundle = load_bundle(args.bundle)
    settings = [(args.max_new, int(g)) for g in args.graces.split(",")]
    settings += [(int(m), 0) for m in args.more.split(",") if m]
    print(f"{len(prompts)} prompts, method {args.method or bundle.default_method}, greedy, batch of all")
    print("max_new_tokens  finish_sentence_tokens  ends a sentence  mean tokens  max tokens  seconds")
    for max_new, grace in settings:
        overrides = [f"decode.max_new_tokens={max_new}", f"decode.finish_sentence_tokens={grace}"]
        engine = Engine(bundle, decode_defaults(load_config(args.config, overrides), bundle, overrides))
        reqs = [Request(p, [0.5, 0.5], method=args.method, max_new_tokens=max_new) for p in prompts]
        t = time.perf_counter()
        out = engine.generate(reqs, batch_size=len(reqs))
        secs = time.perf_counter() - t
        tokens = np.array([c.usage.completion_tokens for c in out])
        ends = np.mean([finished(c.text) for c in out])
        print(
            f"{max_new:>14}  {grace:>22}  {ends:>15.0%}  {tokens.mean():>11.1f}  {tokens.max():>10}  {secs:>7.1f}"
        )


if __name__ == "__main__":
    main()
