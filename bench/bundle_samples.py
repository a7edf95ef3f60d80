"""Texts of a trained bundle, decoded with the engine at given settings, before its report exists.

    .venv/bin/python bench/bundle_samples.py --config configs/embedded_long.yaml --bundle /abs/runs/embedded_long/bundle \\
        --rows '{"bs": ["bs", 0.4, 1.0], "genarm": ["genarm", 0.4, 1.0]}' --prompts 3

``--rows``: label -> [method, alpha, gamma], the evaluation's settings (``mage_ray.pipeline.evaluation_rows``; read
them from the run's stage records). Decodes the first ``--prompts`` test prompts at mu = (1, 0), (0.5, 0.5), (0, 1)
in one batch with the engine the evaluation uses (its outputs do not depend on the batch's composition), and prints
a Markdown table: read the texts before believing a front that is still being evaluated. The report's own samples
(``<run>/report/samples.md``) replace these once the evaluation stage has run.
"""

from __future__ import annotations

import argparse
import json

from mage_ray.bundle import load_bundle
from mage_ray.config import load_config
from mage_ray.decode import Engine, Request, decode_defaults
from mage_ray.tasks.prompts import load_prompts

PICKS = ([1.0, 0.0], [0.5, 0.5], [0.0, 1.0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="the run's config (its task gives the test prompts)")
    ap.add_argument("--bundle", required=True, help="the run's bundle directory")
    ap.add_argument("--rows", required=True, help="JSON: label -> [method, alpha, gamma]")
    ap.add_argument("--prompts", type=int, default=3, help="how many test prompts, from the first")
    args = ap.parse_args()

    cfg = load_config(args.config)
    bundle = load_bundle(args.bundle)
    rows = json.loads(args.rows)
    prompts = load_prompts(cfg.task, "test")[: args.prompts]
    keys, reqs = [], []
    for label, (method, alpha, gamma) in rows.items():
        for p in prompts:
            for mu in PICKS:
                keys.append((label, p))
                reqs.append(Request(prompt=p, preference=mu, method=method, alpha=alpha, gamma=gamma))
    out = Engine(bundle, decode_defaults(cfg, bundle)).generate(reqs)
    names = bundle.objectives
    print(f"| prompt | row | mu = (1, 0) | mu = (0.5, 0.5) | mu = (0, 1) |  (objectives: {', '.join(names)})")
    print("|---|---|---|---|---|")
    for i in range(0, len(out), len(PICKS)):
        label, prompt = keys[i]
        texts = [f'"{o.text.strip()}"'.replace("\n", " ").replace("|", "/") for o in out[i : i + len(PICKS)]]
        print(f"| {prompt} | {label} | " + " | ".join(texts) + " |")


if __name__ == "__main__":
    main()
