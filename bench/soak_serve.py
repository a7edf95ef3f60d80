"""Soak test of the Serve app on loopback: mixed traffic for a fixed time, then 5xx count and replica memory.

    .venv/bin/python bench/soak_serve.py                                  # 10 minutes, runs/v4/bundle, embedded.yaml
    .venv/bin/python bench/soak_serve.py --minutes 1 --bundle <dir> --out /tmp/soak.json
    .venv/bin/python bench/soak_serve.py --bundle <dir> --config configs/smoke.yaml serve.max_batch_size=8
    .venv/bin/python bench/soak_serve.py --sustained --minutes 20 --out /tmp/soak_sustained.json   # no gaps

Starts a local Ray and Serve (``build_app`` on ``--bundle`` with ``--config`` and any ``section.field=value``
overrides; the application is named ``soak<pid>`` so its replicas can be told from other Serve apps on the
machine), warms it up with ``--warmup-minutes`` of the same traffic, then runs client threads until ``--minutes``
have passed (bounded: every request has a timeout, and the clients stop by themselves at the deadline):

* ``stream``: ``POST /v1/generate`` with ``stream``, a random preference, method and length, read to ``[DONE]``;
* ``chat``: non-streaming ``POST /v1/chat/completions`` with a random preference;
* ``grid``: small ``POST /v1/grid`` requests (1-2 prompts x 3 preferences, some scored);
* ``disconnect``: a long ``ignore_eos`` stream that the client closes after a few events (the server must
  cancel it: the engine's ``cancelled`` counter is reported next to the number of disconnects).

``--sustained``: steady traffic with no gaps (default clients ``stream=8``, each sending its next request as soon
as the previous one ended), so the engine's batch never empties: what a continuously busy replica sees. Each
minute's sample then also holds the minute's completion tokens/s (the engine's counter), the running batch's
KV-cache width and rows (``kv_columns`` / ``kv_rows`` of /v1/stats, polled every second: mean and max), and the
machine's load (/proc/loadavg). Without ``--bundle`` (or when it has no bundle.json) a bundle of random r = 8
adapters and value heads on the embedded SmolLM2-135M is built first (tests/bundle_factory.py).

Counted per kind: responses by status class (2xx / 4xx / 5xx), transport errors, streams that ended with an
error event. The engine and ingress replicas' resident memory (psutil RSS; the engine's pid from /v1/stats) is
sampled after the warm-up, every minute, and at the end once the traffic stopped and the server went idle. Prints a summary, writes it as JSON
(``--out``), and exits with status 1 if any request got a 5xx, failed in transport, or a stream ended in error.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
KINDS = ("stream", "chat", "grid", "disconnect")
TIMEOUT_S = 300.0
"""Longest any one request may take (a stuck server fails the soak instead of hanging it)."""
PROMPTS = [
    "Tell me about the sea.",
    "How do I make bread at home?",
    "Explain photosynthesis to a child.",
    "What should I pack for a week of hiking?",
    "Why is the sky blue?",
    "Give me advice on learning a language.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _preference(rng: random.Random, n: int) -> list[float]:
    """A random point of the simplex, rounded to 3 decimals (the server renormalises within 1e-4)."""
    w = [rng.expovariate(1.0) for _ in range(n)]
    p = [round(x / sum(w), 3) for x in w]
    p[-1] = round(1.0 - sum(p[:-1]), 3)
    return p


def _rss(pid: int | None) -> int | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss if pid else None
    except psutil.Error:
        return None


def _ingress_pid(app: str) -> int | None:
    """The ingress replica's process, found by its Ray process title (``ray::ServeReplica:<app>:MageIngress``)."""
    import psutil

    mark = f"ServeReplica:{app}:MageIngress"
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(mark in c for c in p.info["cmdline"] or []):
            return p.info["pid"]
    return None


class Tally:
    """Thread-safe counters: ``<kind>.<2xx|4xx|5xx|transport|stream_error|ok>`` and disconnects."""

    def __init__(self) -> None:
        self.c: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.samples: dict[str, str] = {}
        """One example message per failure counter (the first seen)."""

    def add(self, key: str, sample: str | None = None) -> None:
        with self.lock:
            self.c[key] += 1
            if sample is not None and key not in self.samples:
                self.samples[key] = sample[:300]

    def status(self, kind: str, r: requests.Response) -> bool:
        cls = f"{r.status_code // 100}xx"
        self.add(f"{kind}.{cls}", None if cls == "2xx" else f"HTTP {r.status_code}: {r.text[:200]}")
        return r.status_code == 200


def _stream(url: str, body: dict, kind: str, tally: Tally, stop_after: int | None = None) -> None:
    """POST a streaming request; read it to [DONE] (or close it after ``stop_after`` events)."""
    with requests.post(url, json=body, stream=True, timeout=TIMEOUT_S) as r:
        if not tally.status(kind, r):
            return
        n, final = 0, None
        for line in r.iter_lines():
            if not line.startswith(b"data: "):
                continue
            n += 1
            if stop_after is not None and n >= stop_after:
                tally.add("disconnect.closed")
                return  # leaving the with block closes the connection mid-stream
            payload = line[6:]
            if payload == b"[DONE]":
                break
            ev = json.loads(payload)
            if "finish_reason" in ev:
                final = ev
        if final is None or final["finish_reason"] == "error":
            tally.add(f"{kind}.stream_error", json.dumps(final))
        else:
            tally.add(f"{kind}.ok")


def client(
    kind: str, seed: int, url: str, info: dict, deadline: float, tally: Tally, gap_s: float = 0.5
) -> None:
    """One client thread: requests of ``kind`` one after another until ``deadline``, up to ``gap_s`` apart."""
    rng = random.Random(seed)
    n = info["n_objectives"]
    methods = [m for m in ("bs", info["defaults"]["method"]) if m in info["methods"]]
    while time.monotonic() < deadline:
        prompt = rng.choice(PROMPTS)
        try:
            if kind == "stream":
                body = {
                    "prompt": prompt,
                    "preference": _preference(rng, n),
                    "method": rng.choice(methods),
                    "max_tokens": rng.randint(4, 48),
                    "stream": True,
                }
                _stream(url + "/v1/generate", body, kind, tally)
            elif kind == "disconnect":
                body = {"prompt": prompt, "max_tokens": 256, "ignore_eos": True, "stream": True}
                _stream(url + "/v1/generate", body, kind, tally, stop_after=rng.randint(2, 6))
            elif kind == "chat":
                body = {
                    "model": info["model"],
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": rng.randint(4, 32),
                    "preference": _preference(rng, n),
                }
                r = requests.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT_S)
                if tally.status(kind, r):
                    tally.add(f"{kind}.ok")
            else:  # grid
                body = {
                    "prompts": rng.sample(PROMPTS, rng.randint(1, 2)),
                    "preferences": {"n_objectives": n, "step": 0.5},
                    "max_tokens": 8,
                    "score": rng.random() < 0.3,
                }
                r = requests.post(url + "/v1/grid", json=body, timeout=TIMEOUT_S)
                if tally.status(kind, r):
                    tally.add(f"{kind}.ok")
        except (requests.RequestException, ValueError) as e:
            tally.add(f"{kind}.transport", f"{type(e).__name__}: {e}")
        time.sleep(rng.uniform(0.0, gap_s))


def _memory(engine_pid: int | None, ingress_pid: int | None, t0: float) -> dict:
    return {
        "t_s": round(time.monotonic() - t0, 1),
        "engine_rss_mb": (_rss(engine_pid) or 0) / 2**20,
        "ingress_rss_mb": (_rss(ingress_pid) or 0) / 2**20,
    }


class Load:
    """Per-minute figures of a sustained run: completion tokens/s, KV-cache width and rows, machine load."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.columns: list[int] = []
        self.rows: list[int] = []
        self.t, self.tokens = time.monotonic(), self._stats().get("tokens", 0)

    def _stats(self) -> dict:
        try:
            return requests.get(self.url + "/v1/stats", timeout=30).json()
        except (requests.RequestException, ValueError):
            return {}

    def poll(self) -> None:
        """Once a second: the running batch's KV shape (absent on servers that do not report it)."""
        s = self._stats()
        if "kv_columns" in s and s.get("kv_rows"):
            self.columns.append(s["kv_columns"])
            self.rows.append(s["kv_rows"])

    def sample(self) -> dict:
        """The minute since the last sample; starts the next one."""
        s, now = self._stats(), time.monotonic()
        tokens = s.get("tokens", self.tokens)
        out = {
            "tokens_per_s": (tokens - self.tokens) / (now - self.t),
            "kv_columns_mean": sum(self.columns) / len(self.columns) if self.columns else None,
            "kv_columns_max": max(self.columns, default=None),
            "kv_rows_mean": sum(self.rows) / len(self.rows) if self.rows else None,
            "kv_rows_max": max(self.rows, default=None),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        }
        self.t, self.tokens, self.columns, self.rows = now, tokens, [], []
        return out


def traffic(
    url: str,
    info: dict,
    clients: dict[str, int],
    seed: int,
    seconds: float,
    tally: Tally,
    memory: list[dict] | None = None,
    pids: tuple[int | None, int | None] = (None, None),
    gap_s: float = 0.5,
    load: Load | None = None,
) -> None:
    """Run the client threads for ``seconds`` (they stop by themselves); append a memory sample (and with ``load``
    the minute's tokens/s, KV-cache shape and machine load) each minute."""
    start = time.monotonic()
    deadline = start + seconds
    threads = [
        threading.Thread(
            target=client, args=(kind, seed * 1000 + 10 * j + i, url, info, deadline, tally, gap_s)
        )
        for j, kind in enumerate(KINDS)
        for i in range(clients.get(kind, 0))
    ]
    for t in threads:
        t.start()
    minute = 1
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        if load is not None:
            load.poll()
        if memory is not None and time.monotonic() >= start + 60 * minute:
            memory.append({**_memory(*pids, start), **(load.sample() if load is not None else {})})
            print(f"{memory[-1]} {dict(sorted(tally.c.items()))}", flush=True)
            minute += 1


def _idle(url: str, wait_s: float = 60.0) -> dict:
    """The engine's /v1/stats once nothing is running or queued (cancellations drained), or after ``wait_s``."""
    end = time.monotonic() + wait_s
    while True:
        stats = requests.get(url + "/v1/stats", timeout=TIMEOUT_S).json()
        if (stats["active"] == 0 and stats["queued"] == 0) or time.monotonic() > end:
            return stats
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="section.field=value config overrides")
    ap.add_argument("--bundle", default=str(REPO / "runs" / "v4" / "bundle"))
    ap.add_argument(
        "--sustained",
        action="store_true",
        help="no gaps between a client's requests (default clients stream=8): the batch never empties",
    )
    ap.add_argument("--config", default=str(REPO / "configs" / "embedded.yaml"))
    ap.add_argument("--minutes", type=float, default=10.0, help="traffic duration (the soak stops by itself)")
    ap.add_argument(
        "--warmup-minutes", type=float, default=1.0, help="the same traffic before the first sample"
    )
    ap.add_argument(
        "--clients",
        default=None,
        help="client threads per kind (stream, chat, grid, disconnect); default stream=3,chat=1,grid=1,"
        "disconnect=1, with --sustained stream=8",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "soak_serve.json"))
    args = ap.parse_args()
    if args.clients is None:
        args.clients = "stream=8" if args.sustained else "stream=3,chat=1,grid=1,disconnect=1"
    clients = {k: int(v) for k, v in (kv.split("=") for kv in args.clients.split(","))}
    gap_s = 0.0 if args.sustained else 0.5
    if not (Path(args.bundle) / "bundle.json").is_file():
        sys.path.insert(0, str(REPO / "tests"))
        from bundle_factory import make_tiny_bundle

        args.bundle = str(
            make_tiny_bundle(
                tempfile.mkdtemp(prefix="soak_serve_"),
                model="embedded:smollm2-135m-instruct",
                r=8,
                targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                lora_std=0.02,
                head_std=0.01,
                objectives=["relevance", "positivity"],
                max_context=1024,
            )
        )
        print(f"no bundle given: built random adapters on the embedded model in {args.bundle}", flush=True)
    if set(clients) - set(KINDS):
        ap.error(f"--clients: kinds are {', '.join(KINDS)}")

    import ray
    from ray import serve

    from mage_ray.serve.app import build_app

    app = f"soak{os.getpid()}"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    load0 = os.getloadavg()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.monotonic()
        serve.run(
            build_app({"bundle": args.bundle, "config": args.config, "overrides": args.overrides}),
            name=app,
            route_prefix="/",
        )
        print(f"app {app} up in {time.monotonic() - t0:.0f} s on {url}", flush=True)
        info = requests.get(url + "/v1/objectives", timeout=TIMEOUT_S).json()
        warm = Tally()  # the same traffic, so that the first memory sample is of a warm replica
        traffic(url, info, clients, args.seed + 1, 60 * args.warmup_minutes, warm, gap_s=gap_s)
        stats0 = _idle(url)
        engine_pid, ingress_pid = stats0["pid"], _ingress_pid(app)
        start = time.monotonic()
        memory = [_memory(engine_pid, ingress_pid, start)]
        print(f"warm-up: {dict(sorted(warm.c.items()))}; memory {memory[0]}", flush=True)

        tally = Tally()
        load = Load(url) if args.sustained else None
        pids = (engine_pid, ingress_pid)
        traffic(url, info, clients, args.seed, 60 * args.minutes, tally, memory, pids, gap_s, load)
        traffic_s = time.monotonic() - start
        stats1 = _idle(url)  # cancelled and queued requests drained
        memory.append(_memory(engine_pid, ingress_pid, start))
    finally:
        serve.shutdown()
        ray.shutdown()

    c = tally.c
    by_class = {cls: sum(v for k, v in c.items() if k.endswith("." + cls)) for cls in ("2xx", "4xx", "5xx")}
    bad = (".5xx", ".transport", ".stream_error")
    failures = {k: v for k, v in c.items() if k.endswith(bad)}
    failures.update({f"warmup.{k}": v for k, v in warm.c.items() if k.endswith(bad)})
    summary = {
        "args": vars(args),
        "load_average_at_start": load0,
        "load_average_at_end": os.getloadavg(),
        "traffic_s": traffic_s,
        "requests": sum(by_class.values()) + sum(v for k, v in c.items() if k.endswith(".transport")),
        "status": by_class,
        "counts": dict(sorted(c.items())),
        "failures": failures,
        "failure_samples": {**warm.samples, **tally.samples},
        "disconnects": c["disconnect.closed"],
        "engine_cancelled": stats1["cancelled"] - stats0["cancelled"],
        "engine_stats_end": stats1,
        "engine_pid": engine_pid,
        "engine_restarted": stats1["pid"] != engine_pid,
        "warmup_counts": dict(sorted(warm.c.items())),
        "memory": memory,
        "engine_rss_growth_mb": memory[-1]["engine_rss_mb"] - memory[0]["engine_rss_mb"],
        "per_minute": [
            {
                k: m.get(k)
                for k in (
                    "t_s",
                    "tokens_per_s",
                    "kv_columns_mean",
                    "kv_columns_max",
                    "kv_rows_mean",
                    "engine_rss_mb",
                    "loadavg",
                )
            }
            for m in memory[1:-1]
        ]
        if args.sustained
        else None,
        "ingress_rss_growth_mb": memory[-1]["ingress_rss_mb"] - memory[0]["ingress_rss_mb"],
    }
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(
        f"\n{summary['requests']} requests in {traffic_s / 60:.1f} min: 2xx {by_class['2xx']}, 4xx "
        f"{by_class['4xx']}, 5xx {by_class['5xx']}; failures {failures or 'none'}\n"
        f"disconnects {summary['disconnects']} (engine cancelled {summary['engine_cancelled']}); engine RSS "
        f"{memory[0]['engine_rss_mb']:.0f} -> {memory[-1]['engine_rss_mb']:.0f} MB, ingress RSS "
        f"{memory[0]['ingress_rss_mb']:.0f} -> {memory[-1]['ingress_rss_mb']:.0f} MB; written to {args.out}",
        flush=True,
    )
    sys.exit(1 if failures or summary["engine_restarted"] else 0)


if __name__ == "__main__":
    main()
