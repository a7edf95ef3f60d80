"""Do the embedded objectives trade off? Sample the embedded policy, score, print correlations.

    .venv/bin/python bench/objective_tradeoff.py                      # 32 test prompts x 2 samples, 48 tokens
    .venv/bin/python bench/objective_tradeoff.py --prompts 96 --split train --max-new-tokens 32

Samples ``--samples`` responses per prompt from the base policy (plain ``model.generate``, left padding,
temperature 1.0, no top-k / top-p, as in the training rollouts), scores them with every embedded
objective and prints per-objective mean / std, the mean within-prompt std (the signal a GRPO group
sees), the Pearson and Spearman correlation matrices, and how often generation hit the token limit.
A pair with a clearly negative correlation on the base policy's own samples is a real trade-off. It also prints
how many samples the quality gate flags as degenerate (``mage_ray.tasks.quality``), why, and every flagged one,
so a reader can judge whether the flag is right; correlations are printed over the samples that are not
flagged (real answers) as well as over all of them.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mage_ray.config import ModelConfig, TaskConfig
from mage_ray.models import format_prompt, load_policy
from mage_ray.tasks.objectives import count_tokens, get_objective, score
from mage_ray.tasks.prompts import load_prompts
from mage_ray.tasks.quality import quality

EMBEDDED = ("relevance", "positivity", "conciseness", "readability")


def sample(model, tok, prompts: list[str], n: int, max_new_tokens: int, batch_size: int, seed: int):
    """``n`` sampled responses per prompt: (responses, hit_limit flags), grouped prompt by prompt."""
    torch.manual_seed(seed)
    rows = [p for p in prompts for _ in range(n)]
    responses, hit_limit = [], []
    for s in range(0, len(rows), batch_size):
        texts = [format_prompt(tok, p) for p in rows[s : s + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)  # left padding
        with torch.inference_mode():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]  # (B, <= max_new_tokens)
        for row in new:
            ended = (row == tok.eos_token_id).any().item() or (row == tok.pad_token_id).any().item()
            hit_limit.append(not ended and row.shape[0] == max_new_tokens)
            responses.append(tok.decode(row, skip_special_tokens=True).strip())
    return rows, responses, np.array(hit_limit)


def spearman(x: np.ndarray) -> np.ndarray:
    ranks = np.argsort(np.argsort(x, axis=0), axis=0).astype(float)  # (N, n); ties broken by order
    return np.corrcoef(ranks, rowvar=False)


def print_matrix(title: str, names: list[str], m: np.ndarray) -> None:
    print(f"\n{title}")
    print(" " * 12 + "".join(f"{n[:11]:>12}" for n in names))
    for n, row in zip(names, m):
        print(f"{n[:11]:>12}" + "".join(f"{v:>12.3f}" for v in row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2, help="responses per prompt")
    ap.add_argument("--split", default="test", choices=["train", "validation", "test"])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--show", type=int, default=4, help="example responses to print")
    ap.add_argument("--show-flagged", type=int, default=40, help="flagged responses to print")
    ap.add_argument("--out", default=None, help="optional JSON file with every sample and score")
    args = ap.parse_args()

    t0 = time.time()
    model, tok = load_policy(ModelConfig(name_or_path=args.model))
    task = TaskConfig(n_train=args.prompts, n_val=args.prompts, n_test=args.prompts)
    prompts = load_prompts(task, args.split)
    rows, responses, hit_limit = sample(
        model, tok, prompts, args.samples, args.max_new_tokens, args.batch_size, args.seed
    )
    t_gen = time.time() - t0
    objectives = [get_objective(n) for n in EMBEDDED]
    scores = score(objectives, rows, responses)  # (N, n)
    t_all = time.time() - t0

    names = list(EMBEDDED)
    n_prompts = len(prompts)
    print(
        f"{len(responses)} responses = {n_prompts} {args.split} prompts x {args.samples} samples, "
        f"max_new_tokens={args.max_new_tokens}, T=1.0, seed={args.seed}; generation {t_gen:.0f} s, "
        f"total {t_all:.0f} s"
    )
    words = np.array(count_tokens(responses))
    print(
        f"hit the token limit: {hit_limit.mean():.0%}; MiniLM tokens per response: mean {words.mean():.1f}, "
        f"min {words.min()}, max {words.max()}"
    )
    qual = [quality(p, r) for p, r in zip(rows, responses)]
    flagged = np.array([q.degenerate for q in qual])
    reasons: dict[str, int] = {}
    for q in qual:
        if q.degenerate:
            reasons[q.reason] = reasons.get(q.reason, 0) + 1
    print(
        f"flagged degenerate: {flagged.sum()} of {len(qual)} ({flagged.mean():.1%}); by reason {reasons}; "
        f"quality q < 1 (partly gated): {np.mean([q.q < 1 for q in qual]):.1%}"
    )
    for i in np.flatnonzero(flagged)[: args.show_flagged]:
        print(f"  flagged ({qual[i].reason}, q={qual[i].q:.2f}): {responses[i][:160]!r}")
    grouped = scores.reshape(n_prompts, args.samples, len(names))  # (P, S, n)
    within = grouped.std(axis=1).mean(axis=0)  # (n,) mean over prompts of the std across a prompt's samples
    print(f"\n{'objective':>12}{'mean':>10}{'std':>10}{'within-std':>12}{'min':>10}{'max':>10}")
    for j, n in enumerate(names):
        c = scores[:, j]
        print(f"{n:>12}{c.mean():>10.3f}{c.std():>10.3f}{within[j]:>12.3f}{c.min():>10.3f}{c.max():>10.3f}")
    print_matrix("Pearson correlation", names, np.corrcoef(scores, rowvar=False))
    print_matrix("Spearman correlation", names, spearman(scores))
    if (~flagged).sum() > 2:
        print_matrix(
            "Pearson correlation, unflagged samples only", names, np.corrcoef(scores[~flagged], rowvar=False)
        )
    print(
        "\nPearson correlation with tokens per response: "
        + ", ".join(f"{n}={np.corrcoef(words, scores[:, j])[0, 1]:.3f}" for j, n in enumerate(names))
    )
    for i in range(min(args.show, len(responses))):
        print(
            f"\n[{i}] {rows[i]!r}\n -> {responses[i]!r}\n    "
            + ", ".join(f"{n}={v:.3f}" for n, v in zip(names, scores[i]))
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "objectives": names,
                    "samples": [
                        {"prompt": p, "response": r, "hit_limit": bool(h), "scores": s.tolist()}
                        for p, r, h, s in zip(rows, responses, hit_limit, scores)
                    ],
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
