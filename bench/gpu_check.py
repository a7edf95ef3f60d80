"""GPU check: the decode engine's methods on a ~1B-parameter random Llama, their speed against plain decoding, the
per-row LoRA mixing overhead, and the peak memory of each batch against the memory plan's estimate; one JSON file.

    python bench/gpu_check.py --out $OUT/gpu_check.json                # one GPU: ~1.1B params, bf16, <= 8 min on an H100
    python bench/gpu_check.py --dry-run --out /tmp/gpu_check.json      # CPU, tiny shapes, seconds (tests/test_gpu_check.py)

Run it from the repository root (it puts the root on sys.path; mage_ray need not be installed). It needs torch,
transformers, peft, safetensors and numpy only: no Ray, TRL or PyYAML, nothing is downloaded. The model (a
TinyLlama-1.1B-shaped Llama: vocab 32000, h 2048, I 5632, 22 layers, 32 heads, 4 KV heads), its tokenizer (a word-level
vocabulary "w0".."wN"), the adapters (n = 2 backbones, value models with [V, h] heads, GenARM ARMs: LoRA r 16 on q, k,
v, o with random B, as tests/bundle_factory.py makes them) and PARM's PBLoRA (r1 = r2 = 4, random B, served as its
n + 1 LoRA components by mage_ray.pblora.pblora_components) are built in-process with random weights and run through
mage_ray.decode's Engine / EngineParts.

Measured, side by side in one process:

* ``plain``: transformers ``generate`` (greedy, fixed length) of the same model at batch 1 / 16 / 64: tokens/s.
* ``methods``: base, bs, mage-e-m, mage-i-m, genarm, parm through the engine (greedy, ``ignore_eos``, prompts of
  ``prompt_tokens`` tokens, ``new_tokens`` new ones) at the same batches: tokens/s (batch x new tokens / seconds),
  the ratio to plain decoding, ``torch.cuda.max_memory_allocated`` of the batch (from a reset after the engine is
  built) and the memory plan's estimate of the same shapes (mage_ray.stage_plan: the "evaluate" row of a config with
  this model, batch and lengths; an upper bound: it counts a method's rows before identical rows are merged).
* ``mixing``: one prefill forward and one decode step of 16 rows, each with its own coefficients over 2 adapters
  (MixedLoraModel), against the same model with the LoRA path off (bench/bench_lora_mix.py's (a) vs (b)).

``--budget-s`` (default 420) stops starting new measurements once spent; skipped ones are listed in the JSON.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repository root: mage_ray without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

METHODS = ("base", "bs", "mage-e-m", "mage-i-m", "genarm", "parm")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
N = 2  # objectives
SHAPES = {
    "gpu": dict(vocab=32000, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),
    "dry": dict(vocab=512, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2),
}
SIZES = {  # batches, prompt tokens, new tokens, LoRA rank, PBLoRA r1 = r2, timed repeats of the mixing forwards
    "gpu": dict(batches=(1, 16, 64), prompt=128, new=64, r=16, r12=4, repeats=10),
    "dry": dict(batches=(1, 2, 4), prompt=8, new=4, r=4, r12=2, repeats=1),
}


def build_model(shape: dict, dtype: torch.dtype, device: str, seed: int):
    """A random Llama of ``shape`` on ``device`` (initialised there: no CPU copy of the weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=shape["vocab"] - 1,
        pad_token_id=shape["vocab"] - 2,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def build_tokenizer(vocab: int):
    """A word-level tokenizer of ``vocab`` ids ("w0" ... , pad and EOS last): prompts "w5 w17 ..." encode one id a word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 2)}
    words.update({"<pad>": vocab - 2, "</s>": vocab - 1})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="w0")


def random_lora(model, name: str, r: int, seed: int, std: float = 0.02):
    """A LoRA on every TARGETS projection with random A and B (PEFT's B = 0 would make it a no-op)."""
    from mage_ray.lora_mix import LoraAdapter

    g = torch.Generator().manual_seed(seed)
    modules, scaling = {}, {}
    for mname, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear) and mname.rsplit(".", 1)[-1] in TARGETS:
            A = (torch.rand(r, layer.in_features, generator=g) * 2 - 1) * layer.in_features**-0.5  # [r, d_in]
            B = torch.randn(layer.out_features, r, generator=g) * std  # [d_out, r]
            modules[mname], scaling[mname] = (A, B), 2.0
    return LoraAdapter(name=name, modules=modules, scaling=scaling, config={"r": r, "lora_alpha": 2 * r})


def random_pblora(model, r12: int, seed: int):
    """PARM's PBLoRA with random A, W1, W2 and B, as n + 1 mixable LoRA components (mage_ray.pblora)."""
    from mage_ray.pblora import pblora_components

    g = torch.Generator().manual_seed(seed)
    tensors, modules = {}, []
    for mname, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear) and mname.rsplit(".", 1)[-1] in TARGETS:
            modules.append(mname)
            tensors[f"{mname}.pblora_A"] = torch.randn(2 * r12, layer.in_features, generator=g) * 0.02
            tensors[f"{mname}.pblora_B"] = torch.randn(layer.out_features, 2 * r12, generator=g) * 0.02
            tensors[f"{mname}.pblora_W1"] = torch.randn(r12, r12, generator=g)
            tensors[f"{mname}.pblora_W2"] = torch.randn(N, r12 * r12, generator=g)
    config = {
        "r1": r12, "r2": r12, "n": N, "alpha": 2.0 * r12, "scaling": 2.0, "target_modules": list(TARGETS),
        "modules": modules, "objectives": [f"o{i}" for i in range(N)], "base_model": "random",
    }  # fmt: skip
    return pblora_components((tensors, config), n=N)


def engine_for(method: str, shape, dtype, device, size, tok, max_context: int):
    """An Engine over a fresh random model with the adapter groups ``method`` reads (as Engine.from_bundle loads)."""
    from mage_ray.config import DecodeConfig
    from mage_ray.decode import Engine, EngineParts
    from mage_ray.guidance import groups_for
    from mage_ray.value_model import ValueModel

    model = build_model(shape, dtype, device, seed=0)
    groups, r = groups_for([method]), size["r"]
    parts = dict(backbones=[random_lora(model, f"b{i}", r, 10 + i) for i in range(N)])
    if "values" in groups:
        g = torch.Generator().manual_seed(40)
        V, H = shape["vocab"], shape["hidden"]
        parts["values"] = [
            ValueModel(random_lora(model, f"v{i}", r, 30 + i), torch.randn(V, H, generator=g) * 0.1,
                       torch.randn(V, generator=g) * 0.1, {"objective": f"o{i}"}, "")
            for i in range(N)
        ]  # fmt: skip
    if "arms" in groups:
        parts["arms"] = [random_lora(model, f"arm{i}", r, 50 + i) for i in range(N)]
    if "parm" in groups:
        parts["parm"] = random_pblora(model, size["r12"], 60)
    ep = EngineParts(model=model, tokenizer=tok, beta=0.7, objectives=[f"o{i}" for i in range(N)], gamma=1.0,
                     default_method=method, max_context=max_context, use_chat_template=False, **parts)  # fmt: skip
    dcfg = DecodeConfig(method=method, gamma=1.0, max_new_tokens=size["new"], max_tokens_limit=max_context,
                        batch_size=max(size["batches"]))  # fmt: skip
    return Engine(ep, dcfg, device=device)


def plan_estimate(model, method: str, batch: int, size: dict, dtype_name: str, max_context: int) -> float:
    """The memory plan's peak (bytes) of a decode engine running ``method`` at ``batch`` on this model: the
    "evaluate" row of a config naming the model's config.json (mage_ray.stage_plan)."""
    from mage_ray.config import config_from_dict
    from mage_ray.stage_plan import plan_config

    with tempfile.TemporaryDirectory() as d:
        model.config.to_json_file(os.path.join(d, "config.json"))
        cfg = config_from_dict(
            {
                "model": {"name_or_path": d, "dtype": dtype_name, "max_context": max_context},
                "lora": {"r": size["r"], "alpha": 2.0 * size["r"], "target_modules": list(TARGETS)},
                "task": {"max_prompt_tokens": size["prompt"]},
                "value": {"lora_r": size["r"]},
                "arm": {"lora_r": size["r"], "r1": size["r12"], "r2": size["r12"]},
                "decode": {"method": method, "batch_size": batch, "max_new_tokens": size["new"],
                           "max_tokens_limit": max_context, "num_gpus": 1},
                "eval": {"methods": [method]},
            }
        )  # fmt: skip
        plan = plan_config(cfg)
    return next(r for r in plan.rows if r.stage == "evaluate").peak


class Clock:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(0, vocab - 2, size=length)) for _ in range(batch)]


def plain_decoding(shape, dtype, device, size, tok, clock) -> dict:
    """transformers generate, greedy, exactly ``new`` tokens: tokens/s per batch."""
    model = build_model(shape, dtype, device, seed=0)
    out = {}
    for b in size["batches"]:
        enc = tok(prompts(b, size["prompt"], shape["vocab"], b), return_tensors="pt").to(device)
        kw = dict(max_new_tokens=size["new"], min_new_tokens=size["new"], do_sample=False,
                  pad_token_id=tok.pad_token_id)  # fmt: skip
        with torch.inference_mode():
            model.generate(**enc, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            t0 = clock()
            model.generate(**enc, **kw)
            dt = clock() - t0
        out[str(b)] = {"seconds": round(dt, 4), "tokens_per_s": round(b * size["new"] / dt, 2)}
    del model
    return out


def mixing_overhead(shape, dtype, device, size, clock) -> dict:
    """Prefill of 16 rows x prompt tokens and one decode step, each row its own coefficients over 2 adapters,
    against the LoRA path off (coefficients None) on the same model: median seconds and their ratio."""
    from mage_ray.lora_mix import MixedLoraModel
    from mage_ray.soup import preference_grid, soup_coefficients

    b, t = 16, size["prompt"]
    model = build_model(shape, dtype, device, seed=0)
    mixed = MixedLoraModel(model, [random_lora(model, f"b{i}", size["r"], 10 + i) for i in range(N)])
    mus = list(preference_grid(N, 1 / 15))[:b]
    coeffs = torch.tensor(
        np.stack([soup_coefficients(mu, beta=0.7, alpha=0.2) for mu in mus]), dtype=torch.float32
    )
    ids = torch.randint(0, shape["vocab"] - 2, (b, t), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones(b, t + 1, dtype=torch.long, device=device)

    # the KV-cache argument and output: "cache" in recent transformers 5 releases, "past_key_values" before them
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def timed(c):
        mixed.set_coefficients(c)
        prefill, step = [], []
        with torch.inference_mode():
            for _ in range(size["repeats"] + 1):  # the first is a warm-up
                t0 = clock()
                cache = model(ids, use_cache=True)[arg]
                t1 = clock()
                model(ids[:, -1:], attention_mask=mask, use_cache=True, **{arg: cache})
                t2 = clock()
                prefill.append(t1 - t0)
                step.append(t2 - t1)
        return float(np.median(prefill[1:] or prefill)), float(np.median(step[1:] or step))

    (pm, sm), (pb, sb) = timed(coeffs), timed(None)
    mixed.set_coefficients(None)  # model and mixed go with this frame
    return {
        "rows": b, "adapters": N, "rank": size["r"], "prompt_tokens": t,
        "prefill_s": {"mixed": round(pm, 5), "base": round(pb, 5), "ratio": round(pm / pb, 3)},
        "decode_step_s": {"mixed": round(sm, 5), "base": round(sb, 5), "ratio": round(sm / sb, 3)},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, seconds")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no new measurement starts after this")
    args = parser.parse_args()
    t_start = time.perf_counter()

    from mage_ray.decode import Request
    from mage_ray.memory_plan import GIB

    kind = "dry" if args.dry_run else "gpu"
    if kind == "gpu" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; run with --dry-run for the CPU smoke version")
    device = "cuda" if kind == "gpu" else "cpu"
    dtype, dtype_name = (torch.bfloat16, "bfloat16") if kind == "gpu" else (torch.float32, "float32")
    shape, size = SHAPES[kind], SIZES[kind]
    max_context = size["prompt"] + size["new"] + 8
    clock, tok = Clock(device), build_tokenizer(shape["vocab"])
    report: dict = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": {**shape, "dtype": dtype_name},
        "prompt_tokens": size["prompt"],
        "new_tokens": size["new"],
        "lora_rank": size["r"],
        "objectives": N,
        "skipped": [],
    }
    probe = build_model(shape, torch.float32, "meta", seed=0)
    report["model"]["params"] = sum(p.numel() for p in probe.parameters())

    report["plain"] = plain_decoding(shape, dtype, device, size, tok, clock)
    report["mixing"] = mixing_overhead(shape, dtype, device, size, clock)
    methods: dict = {}
    for m in METHODS:
        if time.perf_counter() - t_start > args.budget_s:
            report["skipped"] += [f"{m} (all batches)"]
            continue
        engine = engine_for(m, shape, dtype, device, size, tok, max_context)
        engine.generate([Request(prompt="w1 w2", preference=[0.5, 0.5], max_new_tokens=2, ignore_eos=True)])
        resident = torch.cuda.memory_allocated() if device == "cuda" else None
        methods[m] = {}
        for b in size["batches"]:
            if time.perf_counter() - t_start > args.budget_s:
                report["skipped"].append(f"{m} batch {b}")
                continue
            mus = [[(i % 11) / 10, 1 - (i % 11) / 10] for i in range(b)]
            reqs = [
                Request(prompt=p, preference=mu, max_new_tokens=size["new"], ignore_eos=True, do_sample=False)
                for p, mu in zip(prompts(b, size["prompt"], shape["vocab"], b), mus)
            ]
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = clock()
            done = engine.generate(reqs, batch_size=b)
            dt = clock() - t0
            new = sum(len(c.token_ids) for c in done)
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
            estimate = plan_estimate(engine.model, m, b, size, dtype_name, max_context)
            plain = report["plain"][str(b)]["tokens_per_s"]
            methods[m][str(b)] = {
                "seconds": round(dt, 4),
                "tokens_per_s": round(new / dt, 2),
                "ratio_to_plain": round(new / dt / plain, 3),
                "rows_per_request": max(c.rows_used for c in done),
                "resident_gib": None if resident is None else round(resident / GIB, 4),
                "peak_gib": None if peak is None else round(peak / GIB, 4),
                "plan_gib": round(estimate / GIB, 6),
                "peak_over_plan": None if peak is None else round(peak / estimate, 3),
                "errors": [c.error for c in done if c.finish_reason == "error"],
            }
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()
    report["methods"] = methods
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    worst = [v["peak_over_plan"] for per in methods.values() for v in per.values() if v["peak_over_plan"]]
    print(
        f"gpu_check on {report['device']}: {len(methods)} methods, {report['wall_s']} s"
        + (f", peak / plan {min(worst):.2f}..{max(worst):.2f}" if worst else "")
        + f" -> {args.out}"
    )
    if not math.isfinite(report["wall_s"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
