"""Decode-engine throughput per method versus plain decoding (our engine with method 'base', and HF generate).

    .venv/bin/python bench/bench_decode.py                       # embedded SmolLM2-135M, 48 tokens, batch 1 and 16
    .venv/bin/python bench/bench_decode.py --model tiny-random --new-tokens 8 --repeats 1   # smoke run

Random LoRA adapters (r = 8 on q/k/v/o, n = 2 backbones, 2 value adapters, 2 GenARM ARMs; PARM's PBLoRA as its 3
rank-4 components) and random value heads [V, H]:
timing only, the text is meaningless, so EOS is ignored and every request generates exactly --new-tokens tokens.
Batch 16 uses 16 different preferences mu_i = (i/15, 1 - i/15) and 4 prompts of different lengths; the
homogeneous control gives all 16 requests mu = (0.5, 0.5). Measurements are paired: every configuration runs
right after the engine with method ``base`` at the same batch size, and the ratios reported are medians of
those per-pair ratios (on a shared machine the load drifts; a pair sees about the same load). Wall and process
CPU time are both recorded; with ``--threads 1`` CPU time measures the work done even on a busy machine.
Prints a markdown table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch

from mage_ray.config import DecodeConfig, ModelConfig
from mage_ray.decode import Engine, EngineParts, Request
from mage_ray.lora_mix import LoraAdapter
from mage_ray.models import format_prompt, load_policy

PROMPTS = [
    "Write a haiku about autumn.",
    "Explain how a refrigerator keeps food cold.",
    "Give me three tips for a job interview, with one sentence of reasoning for each tip.",
    "What is the capital of France?",
]
METHODS = ["base", "bs", "mod", "mage-e", "mage-e-m", "mage-i", "mage-i-m", "genarm", "genarm-m", "parm"]


def random_adapter(model, name: str, seed: int, r: int = 8, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    g = torch.Generator().manual_seed(seed)
    modules, scaling = {}, {}
    for mname, mod in model.named_modules():
        if mname.split(".")[-1] in targets and isinstance(mod, torch.nn.Linear):
            A = torch.randn(r, mod.in_features, generator=g) * 0.02  # [r, d_in]
            B = torch.randn(mod.out_features, r, generator=g) * 0.02  # [d_out, r]
            modules[mname], scaling[mname] = (A, B), 2.0
    return LoraAdapter(name=name, modules=modules, scaling=scaling)


def build_engine(model_name: str, dtype: str = "float32") -> Engine:
    model, tok = load_policy(ModelConfig(name_or_path=model_name, dtype=dtype))
    V, H = model.get_output_embeddings().out_features, model.config.hidden_size
    values = []
    for i in range(2):
        g = torch.Generator().manual_seed(100 + i)
        values.append(
            SimpleNamespace(
                adapter=random_adapter(model, f"v{i}", 10 + i),
                head_weight=torch.randn(V, H, generator=g) * 0.01,
                head_bias=torch.zeros(V),
                manifest={},
            )
        )
    parts = EngineParts(
        model=model,
        tokenizer=tok,
        beta=0.7,
        backbones=[random_adapter(model, f"b{i}", i) for i in range(2)],
        values=values,
        arms=[random_adapter(model, f"arm{i}", 20 + i) for i in range(2)],  # GenARM: one LoRA per objective
        parm=[
            random_adapter(model, f"parm{i}", 30 + i, r=4) for i in range(3)
        ],  # PBLoRA: shared + 2 (r1 = r2 = 4)
    )
    return Engine(parts, DecodeConfig(method="bs", gamma=1.0, alpha=0.0, max_tokens_limit=4096))


def requests(method: str, batch: int, new: int, hetero: bool = True, alpha: float = 0.0) -> list[Request]:
    out = []
    for i in range(batch):
        mu = [i / 15, 1 - i / 15] if hetero and batch > 1 else [0.5, 0.5]
        out.append(
            Request(
                PROMPTS[i % len(PROMPTS)],
                [round(x, 6) for x in mu],
                method=method,
                alpha=alpha,
                max_new_tokens=new,
                ignore_eos=True,
            )
        )
    return out


def time_engine(engine: Engine, reqs: list[Request]) -> tuple[float, float, int, int]:
    t0, c0 = time.perf_counter(), time.process_time()
    outs = engine.generate(reqs)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    errs = [o.error for o in outs if o.error]
    if errs:
        raise RuntimeError(errs[0])
    return dt, dc, sum(len(o.token_ids) for o in outs), max(o.rows_used for o in outs)


def time_hf(model, tok, batch: int, new: int) -> tuple[float, float, int, int]:
    texts = [format_prompt(tok, PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id
        )
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return dt, dc, (out.shape[1] - enc["input_ids"].shape[1]) * batch, 1


def _configs(args, engine, hf_model, hf_tok) -> list[tuple[str, int, object]]:
    """(label, batch, runner) for every measured configuration."""
    new = args.new_tokens
    configs = []
    for bsz in args.batch_sizes:
        configs.append(("HF generate", bsz, lambda b=bsz: time_hf(hf_model, hf_tok, b, new)))
        for m in args.methods:
            configs.append((m, bsz, lambda m=m, b=bsz: time_engine(engine, requests(m, b, new))))
            if m == "mage-i-m":
                run = lambda b=bsz: time_engine(engine, requests("mage-i-m", b, new, alpha=0.2))  # noqa: E731
                configs.append(("mage-i-m (alpha=0.2)", bsz, run))
        if bsz > 1:
            for m in ("bs", "mage-e-m"):
                run = lambda m=m, b=bsz: time_engine(engine, requests(m, b, new, hetero=False))  # noqa: E731
                configs.append((f"{m} homogeneous mu", bsz, run))
    return configs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--out", default="bench_decode.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    engine = build_engine(args.model)
    hf_model, hf_tok = load_policy(ModelConfig(name_or_path=args.model))  # a plain, unwrapped copy
    configs = _configs(args, engine, hf_model, hf_tok)
    for _, _, run in configs[:2]:  # warm-up (allocator, kernels)
        run()
    base_run = {bsz: run for label, bsz, run in configs if label == "base"}
    stats: dict[tuple[str, int], dict] = {}
    for rep in range(args.repeats):
        for label, bsz, run in configs if rep % 2 == 0 else configs[::-1]:
            if label == "base":
                continue
            # Paired: engine `base` at the same batch size right before, so both see the same machine load.
            bw, bc, btok, _ = base_run[bsz]()
            wall, cpu, ntok, rows = run()
            for key, (w, c, t, r) in (
                ((label, bsz), (wall, cpu, ntok, rows)),
                (("base", bsz), (bw, bc, btok, 1)),
            ):
                st = stats.setdefault(
                    key, {"wall": [], "cpu": [], "tokens": t, "rows": r, "x_wall": [], "x_cpu": []}
                )
                st["wall"].append(w)
                st["cpu"].append(c)
            stats[(label, bsz)]["x_wall"].append(wall / bw)
            stats[(label, bsz)]["x_cpu"].append(cpu / bc)
            print(
                f"  rep {rep} {label:24s} batch {bsz:2d}: wall {wall:7.2f} s  cpu {cpu:7.2f} s  "
                f"(base: wall {bw:6.2f} s cpu {bc:6.2f} s)  cpu x{cpu / bc:.2f}",
                flush=True,
            )

    print(
        f"\n{args.model}, {args.new_tokens} new tokens, {torch.get_num_threads()} torch threads, "
        f"{args.repeats} paired repeats\n"
    )
    print(
        "| method | batch | rows/request | tokens/s (wall, best) | tokens/CPU-s (best) | wall vs `base` | "
        "CPU vs `base` |"
    )
    print("|---|---|---|---|---|---|---|")
    results = []
    for label, bsz, _ in configs:
        st = stats[(label, bsz)]
        row = {
            "method": label,
            "batch": bsz,
            "rows_per_request": st["rows"],
            "tokens": st["tokens"],
            "wall_s": st["wall"],
            "cpu_s": st["cpu"],
            "tokens_per_s": st["tokens"] / min(st["wall"]),
            "tokens_per_cpu_s": st["tokens"] / min(st["cpu"]),
            "wall_x_base": statistics.median(st["x_wall"]) if st["x_wall"] else 1.0,
            "cpu_x_base": statistics.median(st["x_cpu"]) if st["x_cpu"] else 1.0,
        }
        results.append(row)
        rows = "-" if label == "HF generate" else st["rows"]
        print(
            f"| {label} | {bsz} | {rows} | {row['tokens_per_s']:.1f} | {row['tokens_per_cpu_s']:.1f} | "
            f"{row['wall_x_base']:.2f}x | {row['cpu_x_base']:.2f}x |"
        )
    meta = {
        "model": args.model,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(meta, f, indent=2)


if __name__ == "__main__":
    main()
