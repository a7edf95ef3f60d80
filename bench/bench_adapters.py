"""Per-step decode cost of a bundle with many adapters versus one with only what the method reads.

    .venv/bin/python bench/bench_adapters.py                                   # embedded SmolLM2-135M, 75 vs 4
    .venv/bin/python bench/bench_adapters.py --model tiny-random --repeats 1   # smoke run
    PYTHONPATH=<other checkout> .venv/bin/python bench/bench_adapters.py      # the same on another revision

A full-pipeline bundle holds ~75 adapters (2 Bone Soup backbones, 2 value models and one MORLHF adapter per grid
preference, ...), but a mage-e-m row mixes 4 of them and a bs row 2. Two engines over the same model: ``small``
holds the 2 backbones + 2 value adapters, ``big`` the same 4 + ``--adapters`` - 4 MORLHF adapters (random r = 8
LoRAs on q/k/v/o, as bench/bench_decode.py). Each runs a batch of --batch requests (different preferences, 4
prompt lengths, EOS ignored) of methods mage-e-m and bs; the per-step decode cost is (time of 1 + T new tokens -
time of 1 new token) / T, i.e. the prefill is taken out. Engines alternate within every repeat; reported: the
median over repeats of the big / small ratio, from process CPU time (with --threads 1 it measures the work even
on a busy machine) and from wall time. ``morlhf`` rows: the big engine with every request on its own MORLHF
adapter (--batch different adapters in one batch), against the small engine's bs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import PROMPTS, random_adapter  # noqa: E402

from mage_ray.config import DecodeConfig, ModelConfig  # noqa: E402
from mage_ray.decode import Engine, EngineParts, Request  # noqa: E402
from mage_ray.models import load_policy  # noqa: E402


def build(model_name: str, n_morlhf: int) -> Engine:
    model, tok = load_policy(ModelConfig(name_or_path=model_name))
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
    morlhf = [
        ((i / max(1, n_morlhf - 1), 1 - i / max(1, n_morlhf - 1)), random_adapter(model, f"m{i}", 1000 + i))
        for i in range(n_morlhf)
    ]
    parts = EngineParts(
        model=model,
        tokenizer=tok,
        beta=0.7,
        backbones=[random_adapter(model, f"b{i}", i) for i in range(2)],
        values=values,
        morlhf=morlhf,
    )
    return Engine(parts, DecodeConfig(method="bs", gamma=1.0, alpha=0.0, max_tokens_limit=4096))


def requests(engine: Engine, method: str, batch: int, new: int) -> list[Request]:
    out = []
    for i in range(batch):
        if method == "morlhf":  # request i on MORLHF adapter i (of those the engine holds)
            pref, _ = engine.layout.morlhf[i * len(engine.layout.morlhf) // batch]
            mu = list(pref)
        else:
            mu = [i / max(1, batch - 1), 1 - i / max(1, batch - 1)]
        out.append(Request(PROMPTS[i % 4], mu, method=method, max_new_tokens=new, ignore_eos=True))
    return out


def timed(engine: Engine, reqs: list[Request]) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    engine.generate(reqs, batch_size=len(reqs))
    return time.process_time() - c0, time.perf_counter() - w0


def per_step(engine: Engine, method: str, batch: int, new: int) -> tuple[float, float]:
    """(CPU s, wall s) per decode step: (run of 1 + new tokens - run of 1 token) / new."""
    c1, w1 = timed(engine, requests(engine, method, batch, 1))
    cn, wn = timed(engine, requests(engine, method, batch, 1 + new))
    return (cn - c1) / new, (wn - w1) / new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--adapters", type=int, default=75, help="adapters of the big engine (4 + MORLHF ones)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import mage_ray

    small, big = build(args.model, 0), build(args.model, args.adapters - 4)
    print(
        f"mage_ray from {Path(mage_ray.__file__).parent}; adapters: small {len(small.mixed.adapters)}, "
        f"big {len(big.mixed.adapters)}; load average {open('/proc/loadavg').read().split()[:3]}",
        flush=True,
    )
    cases = [("mage-e-m", small, big), ("bs", small, big), ("morlhf", None, big)]
    for engine in (small, big):  # warm-up
        timed(engine, requests(engine, "bs", 2, 2))
    raw: dict[str, list[dict]] = {name: [] for name, _, _ in cases}
    for rep in range(args.repeats):
        for name, a, b in cases:
            ref = per_step(
                a if a is not None else small, "bs" if a is None else name, args.batch, args.new_tokens
            )
            got = per_step(b, name, args.batch, args.new_tokens)
            raw[name].append({"small": ref, "big": got})
            print(
                f"rep {rep} {name}: small {ref[0] * 1e3:.1f} ms CPU / {ref[1] * 1e3:.1f} ms wall per step, "
                f"big {got[0] * 1e3:.1f} / {got[1] * 1e3:.1f}",
                flush=True,
            )
    rows = []
    for name, _, _ in cases:
        pairs = raw[name]
        rows.append(
            {
                "method": name,
                "small_ms_cpu": statistics.median(p["small"][0] for p in pairs) * 1e3,
                "big_ms_cpu": statistics.median(p["big"][0] for p in pairs) * 1e3,
                "ratio_cpu": statistics.median(p["big"][0] / p["small"][0] for p in pairs),
                "ratio_wall": statistics.median(p["big"][1] / p["small"][1] for p in pairs),
            }
        )
    print(f"\n{args.model}, batch {args.batch}, {args.new_tokens} decode steps, {args.threads} thread(s)")
    print(
        f"| method (big engine) | small: 4 adapters, ms/step CPU | big: {args.adapters} adapters, ms/step CPU "
        "| big / small CPU | big / small wall |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        ref = "bs" if r["method"] == "morlhf" else r["method"]
        print(
            f"| {r['method']} (small: {ref}) | {r['small_ms_cpu']:.1f} | {r['big_ms_cpu']:.1f} | "
            f"{r['ratio_cpu']:.2f} | {r['ratio_wall']:.2f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "raw": raw}, indent=1))


if __name__ == "__main__":
    main()
