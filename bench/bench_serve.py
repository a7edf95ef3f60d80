"""Load benchmark of the Serve app on loopback: concurrent streaming clients, each with its own preference.

    .venv/bin/python bench/bench_serve.py                          # embedded SmolLM2-135M, clients 1,8,32
    .venv/bin/python bench/bench_serve.py --batching micro,continuous --lengths mixed   # compare batching modes
    .venv/bin/python bench/bench_serve.py --model tiny-random --clients 1,4 --max-tokens 8   # smoke run
    .venv/bin/python bench/bench_serve.py --checkouts .,/tmp/main --pairs 2 --clients 1,32 --methods default,bs \
        --no-naive --out /tmp/compare.json          # two revisions, alternated run by run, same bundle
    .venv/bin/python bench/bench_serve.py --dtype bfloat16 ...   # serve a copy of the bundle in bf16 (model.dtype)

One replica (``serve.num_cpus`` = --replica-cpus, max_batch_size = the largest client count) on a fresh local
Ray, over ``runs/embedded/bundle`` if it exists, else a bundle of random r=8 adapters (q/k/v/o) and random value
heads on the chosen model (timing does not depend on the values). Each level runs N clients at once; every
client streams ``--rounds`` requests one after another (``ignore_eos``) from ``POST /v1/generate`` with a
preference of its own: each exactly --max-tokens tokens (``--lengths fixed``), or (``mixed``) request k of
client i asks for max_tokens * (1 + (i + k) % 4) / 4 tokens, so short and long requests share batches and
finish at different steps. Each ``--batching`` mode (serve.batching) is a fresh deployment of the same bundle
measured in the same run. Reported per level: TTFT p50 / p99 (request sent -> first token event),
aggregate tokens/s (all completion tokens / wall time of the level), errors.

``--methods default,bs`` runs every client level for each method (default: the bundle's method at every level, plus
``bs`` at the largest). ``--checkouts A,B`` compares revisions: the bundle is built once, then this script runs
itself once per checkout (``PYTHONPATH=<checkout>`` and the checkout as working directory, which Ray puts first on
its workers' sys.path: the driver and the Serve replicas import that checkout's mage_ray; each run records which
one the replica ran), alternating A, B, A, B for ``--pairs`` pairs, each run a fresh Ray; the machine's load average is recorded
before every run, and the table gives per revision the median tokens/s and TTFT p99 per level and the ratio of each
level's tokens/s to the same method's single client (also run by run).

The naive alternative runs in the same process afterwards, one request at a time: per preference, materialise
the merged Bone Soup model (``lora_export.merge_weights``, a full copy of the weights) and run plain HF
``generate`` (greedy, exactly --max-tokens tokens). It has no value guidance, so the server is also measured
with method ``bs`` at the largest client count for a like-for-like row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # bundle_factory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


async def _one(session, url: str, body: dict) -> tuple[float | None, int, str | None]:
    """Stream one request; return (TTFT seconds, completion tokens, error)."""
    t0 = time.perf_counter()
    ttft, tokens, err = None, 0, None
    async with session.post(url, json=body) as r:
        if r.status != 200:
            return None, 0, f"HTTP {r.status}: {(await r.text())[:200]}"
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                break
            ev = json.loads(payload)
            if "finish_reason" in ev:
                tokens = ev["usage"]["completion_tokens"]
                if ev["finish_reason"] == "error":
                    err = ev.get("error")
            elif ttft is None:
                ttft = time.perf_counter() - t0
    return ttft, tokens, err


def _tokens(i: int, k: int, max_tokens: int, lengths: str) -> int:
    return max_tokens if lengths == "fixed" else max(1, max_tokens * (1 + (i + k) % 4) // 4)


async def run_level(
    url: str, n_clients: int, rounds: int, max_tokens: int, method: str | None, lengths: str = "fixed"
) -> dict:
    """N concurrent clients, each streaming ``rounds`` requests sequentially with its own preference."""
    import aiohttp

    prefs = [[(i + 0.5) / n_clients, 1 - (i + 0.5) / n_clients] for i in range(n_clients)]
    ttfts, tokens, errors = [], 0, []

    async def client(i: int, session) -> None:
        nonlocal tokens
        for k in range(rounds):
            body = {
                "prompt": f"Tell me something interesting about topic number {i * rounds + k}.",
                "preference": prefs[i],
                "max_tokens": _tokens(i, k, max_tokens, lengths),
                "ignore_eos": True,
                "stream": True,
            }
            if method:
                body["method"] = method
            try:
                t, n, err = await _one(session, url, body)
            except Exception as e:  # noqa: BLE001  (count transport failures as errors)
                t, n, err = None, 0, repr(e)
            tokens += n
            if err:
                errors.append(err)
            elif t is not None:
                ttfts.append(t)

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(n_clients)))
        wall = time.perf_counter() - start
    return {
        "clients": n_clients,
        "method": method or "default",
        "requests": n_clients * rounds,
        "ttft_p50_s": _pct(ttfts, 50),
        "ttft_p99_s": _pct(ttfts, 99),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "errors": len(errors),
        "error_samples": errors[:3],
    }


def run_naive(bundle_dir: Path, n_prefs: int, max_tokens: int) -> dict:
    """One request at a time: merged model per preference (merge_weights) + plain HF generate."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from mage_ray.bundle import adapter_path, load_bundle
    from mage_ray.lora_export import merge_weights
    from mage_ray.lora_mix import load_adapter
    from mage_ray.models import format_prompt, load_policy
    from mage_ray.soup import soup_coefficients

    b = load_bundle(bundle_dir)
    model, tok = load_policy(b.model_config())
    adapters = [load_adapter(adapter_path(b.path(rel)), name=rel) for rel in b.backbones]

    class FirstToken(StoppingCriteria):
        def __init__(self):
            self.t = None

        def __call__(self, input_ids, scores, **kw):
            if self.t is None:
                self.t = time.perf_counter()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ttfts, merge_s, tokens = [], [], 0
    start = time.perf_counter()
    for i in range(n_prefs):
        mu = [(i + 0.5) / n_prefs, 1 - (i + 0.5) / n_prefs]
        t0 = time.perf_counter()
        merged = merge_weights(model, adapters, soup_coefficients(mu, b.beta, b.alpha).tolist()).eval()
        merge_s.append(time.perf_counter() - t0)
        text = format_prompt(tok, f"Tell me something interesting about topic number {i}.", True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        first = FirstToken()
        with torch.inference_mode():
            out = merged.generate(
                **ids,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                stopping_criteria=StoppingCriteriaList([first]),
                pad_token_id=tok.eos_token_id,
            )
        tokens += out.shape[1] - ids["input_ids"].shape[1]
        ttfts.append(first.t - t0)
        del merged
    wall = time.perf_counter() - start
    return {
        "clients": 1,
        "method": "naive bs (merge + HF generate)",
        "requests": n_prefs,
        "ttft_p50_s": _pct(ttfts, 50),
        "ttft_p99_s": _pct(ttfts, 99),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "errors": 0,
        "merge_s_mean": statistics.mean(merge_s),
    }


def _bundle(args) -> tuple[Path, str]:
    """--bundle, else runs/embedded/bundle if it exists, else a fresh bundle of random adapters on --model."""
    bundle = Path(args.bundle) if args.bundle else REPO / "runs" / "embedded" / "bundle"
    if (bundle / "bundle.json").is_file():
        return bundle, "trained bundle" if not args.bundle else f"bundle {bundle}"
    from bundle_factory import make_tiny_bundle

    t0 = time.perf_counter()
    bundle = make_tiny_bundle(
        tempfile.mkdtemp(prefix="bench_serve_"),
        model=args.model,
        r=8,
        targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        lora_std=0.02,
        head_std=0.01,
        objectives=["relevance", "positivity"],
        max_context=1024,
    )
    return (
        bundle,
        f"random r=8 adapters + random value heads on {args.model} (built in {time.perf_counter() - t0:.0f} s)",
    )


def _with_dtype(bundle: Path, dtype: str) -> Path:
    """A copy of ``bundle`` whose base policy loads in ``dtype`` (bundle.json's ``model.dtype``)."""
    import shutil

    copy = Path(tempfile.mkdtemp(prefix="bench_serve_dtype_")) / "bundle"
    shutil.copytree(bundle, copy)
    meta = json.loads((copy / "bundle.json").read_text())
    meta.setdefault("model", {})["dtype"] = dtype
    (copy / "bundle.json").write_text(json.dumps(meta, indent=2))
    return copy


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def compare(args, bundle: Path, source: str) -> None:
    """Run this script once per checkout, alternated, ``--pairs`` times; tabulate tokens/s and x single."""
    checkouts = [str(Path(c).resolve()) for c in args.checkouts.split(",")]
    passthrough = [
        "--bundle", str(bundle), "--clients", args.clients, "--rounds", str(args.rounds),
        "--max-tokens", str(args.max_tokens), "--replica-cpus", str(args.replica_cpus),
        "--batch-wait", str(args.batch_wait), "--batching", args.batching, "--lengths", args.lengths,
        "--no-naive",
    ]  # fmt: skip
    if args.methods:
        passthrough += ["--methods", args.methods]
    runs = []
    print(f"bundle: {bundle} ({source}); checkouts {checkouts}", flush=True)
    for pair in range(args.pairs):
        for co in checkouts:
            out = Path(tempfile.mkdtemp(prefix="bench_serve_run_")) / "run.json"
            env = {**os.environ, "PYTHONPATH": co}
            load = _loadavg()
            t0 = time.perf_counter()
            for attempt in range(3):  # a busy machine can time out Ray's startup: retry the run
                # cwd = the checkout: Ray puts the driver's working directory first on its workers' sys.path
                cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--out", str(out)]
                done = subprocess.run(cmd, env=env, cwd=co)
                if done.returncode == 0:
                    break
                print(f"[{co} pair {pair}] run failed (attempt {attempt + 1}); retrying in 30 s", flush=True)
                time.sleep(30)
            else:
                raise SystemExit(f"{co}: three failed runs")
            res = json.loads(out.read_text())
            runs.append({"checkout": co, "pair": pair, "loadavg_before": load, "loadavg_after": _loadavg(),
                         "wall_s": time.perf_counter() - t0, **res})  # fmt: skip
            keys = res["results"][0].get("engine_stats_keys", [])
            print(
                f"[{co} pair {pair}] load {load} -> {runs[-1]['loadavg_after']}; driver imported "
                f"{res.get('driver_mage_ray')}, engine reports kv_rows: {'kv_rows' in keys}",
                flush=True,
            )
    print(
        f"\nmachine: {os.cpu_count()} cores; max_tokens {args.max_tokens} ({args.lengths}); bundle: {source}"
    )
    print(
        "| checkout | clients | method | tokens/s (runs) | TTFT p99 s (runs) | x single, median (runs) | errors |"
    )
    print("|---|---|---|---|---|---|---|")
    table = []
    for co in checkouts:
        mine = [r for r in runs if r["checkout"] == co]
        keys = [(x["clients"], x["method"]) for x in mine[0]["results"]]
        for clients, method in keys:
            got = [
                next(x for x in r["results"] if (x["clients"], x["method"]) == (clients, method))
                for r in mine
            ]
            single = [
                next((x for x in r["results"] if x["clients"] == 1 and x["method"] == method), None)
                for r in mine
            ]
            ratios = [g["tokens_per_s"] / s1["tokens_per_s"] for g, s1 in zip(got, single) if s1 is not None]
            row = {
                "checkout": co,
                "clients": clients,
                "method": method,
                "tokens_per_s": [g["tokens_per_s"] for g in got],
                "ttft_p99_s": [g["ttft_p99_s"] for g in got],
                "x_single": ratios,
                "errors": sum(g["errors"] for g in got),
            }
            table.append(row)
            fmt = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
            med = f"{statistics.median(ratios):.2f} ({fmt(ratios)})" if ratios else "-"
            print(
                f"| {co} | {clients} | {method} | {fmt(row['tokens_per_s'])} | {fmt(row['ttft_p99_s'])} | {med} "
                f"| {row['errors']} |"
            )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"args": vars(args), "bundle": source, "runs": runs, "table": table}, indent=1)
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--bundle", default=None, help="bundle dir (default runs/embedded/bundle if it exists)")
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="serve a copy of the bundle whose model.dtype is this (default: the bundle's own)",
    )
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--naive-prefs", type=int, default=3)
    ap.add_argument("--replica-cpus", type=float, default=2.0)
    ap.add_argument("--batch-wait", type=float, default=0.05, help="serve.batch_wait_timeout_s")
    ap.add_argument(
        "--batching", default="continuous", help="serve.batching modes to compare, e.g. micro,continuous"
    )
    ap.add_argument("--lengths", choices=["fixed", "mixed"], default="fixed", help="max_tokens per request")
    ap.add_argument("--no-naive", action="store_true", help="skip the merge-per-preference baseline")
    ap.add_argument("--methods", default=None, help="run every level for each of these, e.g. default,bs")
    ap.add_argument("--checkouts", default=None, help="compare these checkouts (comma separated), alternated")
    ap.add_argument("--pairs", type=int, default=2, help="runs per checkout with --checkouts")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    bundle, source = _bundle(args)
    if args.dtype:
        bundle, source = _with_dtype(bundle, args.dtype), f"{source}, served as {args.dtype}"
    if args.checkouts:
        compare(args, bundle, source)
        return

    import ray
    from ray import serve

    from mage_ray.serve.app import build_app

    print(f"bundle: {bundle} ({source})", flush=True)
    port = _free_port()
    ray.init(
        address="local",
        num_cpus=max(2, int(np.ceil(args.replica_cpus))),
        include_dashboard=False,
        log_to_driver=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    bs = max(levels)
    overrides = [
        f"serve.max_batch_size={bs}",
        f"serve.max_ongoing_requests={4 * bs}",
        f"serve.num_cpus={args.replica_cpus}",
        f"serve.batch_wait_timeout_s={args.batch_wait}",
        "decode.max_tokens_limit=1024",
    ]
    url = f"http://127.0.0.1:{port}/v1/generate"
    results = []
    try:
        for mode in args.batching.split(","):
            t0 = time.perf_counter()
            serve.run(
                build_app(
                    {
                        "bundle": str(bundle),
                        "config": None,
                        "overrides": [*overrides, f"serve.batching={mode}"],
                    }
                ),
                name="bench",
                route_prefix="/",
            )
            print(
                f"[{mode}] replica up in {time.perf_counter() - t0:.0f} s; overrides {overrides}", flush=True
            )
            asyncio.run(run_level(url, 1, 1, 4, None))  # warm-up
            if args.methods:
                plan = [(n, None if m == "default" else m) for m in args.methods.split(",") for n in levels]
            else:
                plan = [*((n, None) for n in levels), (bs, "bs")]
            for n, method in plan:
                rounds = args.rounds if n > 1 else max(args.rounds, 3)
                res = asyncio.run(run_level(url, n, rounds, args.max_tokens, method, args.lengths))
                res["batching"] = mode
                results.append(res)
                print(json.dumps(res), flush=True)
            import urllib.request

            with urllib.request.urlopen(url.replace("/v1/generate", "/v1/stats"), timeout=60) as r:
                stats = json.loads(r.read())
            for res in results:  # which code the replica ran (the KV-shape keys are new in /v1/stats)
                res.setdefault("engine_stats_keys", sorted(stats))
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.no_naive:
        _table(results, args, source)
        return
    import torch

    torch.set_num_threads(max(1, int(args.replica_cpus)))
    res = run_naive(bundle, args.naive_prefs, args.max_tokens)
    results.append(res)
    print(json.dumps(res), flush=True)

    _table(results, args, source)


def _table(results: list[dict], args, source: str) -> None:
    single = {r["batching"]: r["tokens_per_s"] for r in results if r["clients"] == 1 and "batching" in r}
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"max_tokens {args.max_tokens} ({args.lengths}); bundle: {source}"
    )
    print(
        "| batching | clients | method | requests | TTFT p50 (s) | TTFT p99 (s) | tokens/s | x single | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mode = r.get("batching", "-")
        ref = single.get(mode, next(iter(single.values())))
        print(
            f"| {mode} | {r['clients']} | {r['method']} | {r['requests']} | {r['ttft_p50_s']:.2f} "
            f"| {r['ttft_p99_s']:.2f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / ref:.2f} | {r['errors']} |"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "bundle": source,
                    "results": results,
                    "driver_mage_ray": str(Path(sys.modules["mage_ray"].__file__).parent),
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
