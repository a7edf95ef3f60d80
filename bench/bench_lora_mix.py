"""Benchmark: per-row exact LoRA mixing vs the base model vs per-row materialised merges.

    .venv/bin/python bench/bench_lora_mix.py                       # embedded SmolLM2-135M, b=16, t=64, n=2, r=16
    .venv/bin/python bench/bench_lora_mix.py --model tiny-random --repeats 2   # smoke run

Timed, side by side in one run (warm-up, then medians of --repeats, --c-repeats for (c); (a), (b) interleaved so
that load from other processes hits both alike):

  (a) mixed   one forward of the batch, every row with its own coefficients (MixedLoraModel)
  (b) base    the plain HF model (no adapters) on the same batch
  (c) merged  per row: materialise W = W0 + sum_i c_i s_i B_i A_i in place (merge_into_ from a W0 snapshot, one
              addmm per module: the fastest honest materialisation) and run that row alone; all 16 rows

and one decode step (t = 1 with a KV cache of the prompt, batch 16) for (a), (b) and (c); for (c) the decode row
is given twice: with the per-row merge and with the merge excluded (as if 16 merged copies were kept in memory).
Adapters are random (timing does not depend on the values); coefficients come from soup.preference_grid(2)
(11 points) plus 5 random simplex points through soup_coefficients(beta=0.7, alpha=0.2), so some are negative.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time

import numpy as np
import torch
from torch import nn

from mage_ray.config import ModelConfig
from mage_ray.lora_export import merge_into_
from mage_ray.lora_mix import LoraAdapter, MixedLoraModel
from mage_ray.models import load_policy
from mage_ray.soup import preference_grid, soup_coefficients

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_adapter(model: nn.Module, name: str, r: int, alpha: float, seed: int) -> LoraAdapter:
    """A LoRA adapter of rank r on every attention + MLP projection, with random A and B."""
    g = torch.Generator().manual_seed(seed)
    modules, scaling = {}, {}
    for module_name, layer in model.named_modules():
        if isinstance(layer, nn.Linear) and module_name.rsplit(".", 1)[-1] in TARGETS:
            bound = layer.in_features**-0.5
            A = (torch.rand(r, layer.in_features, generator=g) * 2 - 1) * bound  # [r, d_in]
            B = torch.randn(layer.out_features, r, generator=g) * 0.02  # [d_out, r]
            modules[module_name], scaling[module_name] = (A, B), alpha / r
    return LoraAdapter(name=name, modules=modules, scaling=scaling, config={"r": r, "lora_alpha": alpha})


def coefficient_rows(batch: int, n: int, seed: int) -> torch.Tensor:
    """[batch, n] Bone Soup coefficients for distinct preferences: the grid, then random simplex points."""
    mus = list(preference_grid(n, 0.1))[:batch]
    rng = np.random.default_rng(seed)
    while len(mus) < batch:
        mus.append(rng.dirichlet(np.ones(n)))
    return torch.tensor(
        np.stack([soup_coefficients(mu, beta=0.7, alpha=0.2) for mu in mus]), dtype=torch.float32
    )


def timed(fn) -> np.ndarray:
    """(wall seconds, CPU seconds of this process) for one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return np.array([time.perf_counter() - wall, time.process_time() - cpu])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--n", type=int, default=2, help="number of adapters")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of (a) and (b)")
    parser.add_argument(
        "--c-repeats", type=int, default=3, help="timed repeats of (c) (16 merges + rows each)"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()[0]

    base, _ = load_policy(ModelConfig(name_or_path=args.model))
    adapters = [
        random_adapter(base, f"backbone{i}", args.rank, 2.0 * args.rank, seed=i) for i in range(args.n)
    ]
    coeffs = coefficient_rows(args.batch, args.n, seed=0)  # [b, n]
    b, t = args.batch, args.prompt_len
    ids = torch.randint(0, base.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(b, t, dtype=torch.long)
    step_ids = ids[:, -1:]  # [b, 1]
    step_mask = torch.ones(b, t + 1, dtype=torch.long)

    mixed = MixedLoraModel(copy.deepcopy(base), adapters)
    mixed.set_coefficients(coeffs)
    merged = copy.deepcopy(base)  # (c): merged in place, row after row
    targets = sorted({m for a in adapters for m in a.modules})
    originals = {m: merged.get_submodule(m).weight.detach().clone() for m in targets}  # W0 snapshot

    with torch.inference_mode():
        # KV caches of the prompt for the decode step (cropped back to the prompt after every timed step).
        cache_a = mixed.model(ids, attention_mask=mask, use_cache=True).past_key_values
        cache_b = base(ids, attention_mask=mask, use_cache=True).past_key_values
        caches_c = []
        for row in range(b):
            merge_into_(merged, adapters, coeffs[row], originals)
            caches_c.append(merged(ids[row : row + 1], use_cache=True).past_key_values)

        def fwd_a():
            mixed.model(ids, attention_mask=mask, use_cache=False)

        def fwd_b():
            base(ids, attention_mask=mask, use_cache=False)

        def step_a():
            mixed.model(step_ids, attention_mask=step_mask, past_key_values=cache_a, use_cache=True)

        def step_b():
            base(step_ids, attention_mask=step_mask, past_key_values=cache_b, use_cache=True)

        def per_row(kind: str) -> tuple[np.ndarray, np.ndarray]:
            """(c) over all rows: ((wall, cpu) merging, (wall, cpu) running rows one by one)."""
            t_merge, t_run = np.zeros(2), np.zeros(2)
            for row in range(b):
                t_merge += timed(lambda row=row: merge_into_(merged, adapters, coeffs[row], originals))
                if kind == "forward":
                    t_run += timed(lambda row=row: merged(ids[row : row + 1], use_cache=False))
                else:
                    cache = caches_c[row]
                    t_run += timed(
                        lambda row=row, cache=cache: merged(
                            step_ids[row : row + 1], past_key_values=cache, use_cache=True
                        )
                    )
                    cache.crop(-1)  # drop the step's token again
            return t_merge, t_run

        # Warm-up: (a), (b) `warmup` times each; (c) one row merged + run (its kernels are the same per row).
        for _ in range(args.warmup):
            for fn in (fwd_a, fwd_b, step_a, step_b):
                fn()
            cache_a.crop(-1)
            cache_b.crop(-1)
            merge_into_(merged, adapters, coeffs[0], originals)
            merged(ids[:1], use_cache=False)
        samples: dict[str, list[np.ndarray]] = {}
        header = (
            f"# model={args.model} batch={b} prompt_len={t} n={args.n} r={args.rank} "
            f"(R={sum(a.rank(targets[0]) for a in adapters)}) modules={len(targets)} "
            f"threads={torch.get_num_threads()} warmup={args.warmup}\n"
            f"# torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cpus, "
            f"1-min load average {load_start:.1f} at start"
        )
        for i in range(max(args.repeats, args.c_repeats)):
            if i < args.repeats:
                for k, fn in (("a_fwd", fwd_a), ("b_fwd", fwd_b), ("a_step", step_a), ("b_step", step_b)):
                    samples.setdefault(k, []).append(timed(fn))
                cache_a.crop(-1)  # back to the prompt for the next repeat
                cache_b.crop(-1)
            if i < args.c_repeats:
                for kind in ("fwd", "step"):
                    t_merge, t_run = per_row("forward" if kind == "fwd" else "step")
                    samples.setdefault(f"c_{kind}_merge", []).append(t_merge)
                    samples.setdefault(f"c_{kind}_run", []).append(t_run)
            # The table so far after every repeat, so that an interrupted run still reports what it measured.
            print(f"\n## after repeat {i + 1}, load average {os.getloadavg()[0]:.1f}", flush=True)
            print(report(header, samples), flush=True)


def report(header: str, samples: dict[str, list[np.ndarray]]) -> str:
    """Markdown table of medians: wall seconds and [CPU seconds of this process]; ratios a/b and c/a."""
    med = {k: np.median(np.stack(v), axis=0) for k, v in samples.items()}  # (wall, cpu)
    n_ab, n_c = len(samples["a_fwd"]), len(samples["c_fwd_run"])
    lines = [
        header,
        f"# medians over {n_ab} repeats of (a), (b) and {n_c} of (c): wall seconds [CPU seconds of this process]",
        "",
        "| workload | (a) mixed s | (b) base s | (c) per-row merged s (merge + run) | a/b | c/a |",
        "|---|---|---|---|---|---|",
    ]
    rows = [
        ("forward (16 x 64 tokens)", "a_fwd", "b_fwd", ("c_fwd_merge", "c_fwd_run")),
        ("decode step (t=1, KV cache)", "a_step", "b_step", ("c_step_merge", "c_step_run")),
        ("decode step, merge excluded", "a_step", "b_step", ("c_step_run",)),
    ]
    for label, ka, kb, kc in rows:
        a, b = med[ka], med[kb]
        c = sum(med[k] for k in kc)
        split = " + ".join(f"{med[k][0]:.3f}" for k in kc)
        lines.append(
            f"| {label} | {a[0]:.3f} [{a[1]:.3f}] | {b[0]:.3f} [{b[1]:.3f}] | {c[0]:.3f} [{c[1]:.3f}] ({split}) "
            f"| {a[0] / b[0]:.2f} [{a[1] / b[1]:.2f}] | {c[0] / a[0]:.1f} [{c[1] / a[1]:.1f}] |"
        )
    for k in ("a_fwd", "b_fwd", "a_step", "b_step"):
        lines.append(f"# {k} wall per repeat: {[round(float(x[0]), 4) for x in samples[k]]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
