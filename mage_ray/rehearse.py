"""Rehearse a config on this machine before it meets a GPU cluster: the same stage graph, the same Ray resource
requests, on logical GPUs, with tiny stand-ins for the hub models and data, and every budget cut to a step or two.

``mage-ray rehearse --config configs/hh_rlhf.yaml`` runs, in one local Ray that declares the cluster's logical
GPUs (``--gpus``, ``--cpus``; by default enough for the config's largest single request):

1. the whole pipeline (:func:`mage_ray.pipeline.run_pipeline`: beta trials, backbones, rollouts, value models,
   alpha / gamma trials, the baselines eval.methods needs, evaluation) with the config's own Train
   ScalingConfigs, Tune trial resources, Ray Data actor options and decode-worker resources;
2. a Ray Data preference grid (:func:`mage_ray.grid.run_grid`) on the bundle;
3. the Serve application (``MageIngress`` + ``MageEngine`` with ``serve.*``'s actor options) and one request.

What changes (and only this; the report lists it): hub models and datasets are tiny twins behind the same hub ids
(:mod:`mage_ray.twins`, ``MAGE_RAY_HUB_MAP``); budgets (:func:`rehearsal_overrides`); storage goes to ``--out``;
Ray Train's process group uses gloo (NCCL needs CUDA); every process uses one thread. A model placed on ``cuda``
runs on the CPU **only in a process to which Ray assigned a GPU**; anywhere else the rehearsal fails with one line
naming the stage, the process and the model (:func:`mage_ray.devices.place`). It prints, per stage, what the code
requested from Ray, what Ray assigned, which models went on a GPU, and ends with the stages that would hold a GPU
idle (a process Ray gave a GPU that put no model on it).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from mage_ray.config import Config, config_from_dict, save_config
from mage_ray.devices import HUB_MAP_ENV, REHEARSAL_ENV, set_stage

__all__ = ["RehearsalFailed", "cluster_shape", "read_ledger", "rehearsal_overrides", "rehearse", "summarise"]


TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
"""Ray Train V2's controller poll interval (seconds); a rehearsal sets 0.25 unless the environment has one."""


class RehearsalFailed(RuntimeError):
    """The rehearsal found a defect: a model on a GPU its process does not hold, a failed stage or trial."""


# ---------------------------------------------------------------------------------------------
# The config of a rehearsal


def _two(values: list[float], default: float) -> list[float]:
    """The default and one other candidate (a sweep stage still runs as a Tune sweep of two trials)."""
    others = [float(v) for v in values if float(v) != float(default)]
    return (
        [float(default)] + others[:1]
        if float(default) in map(float, values)
        else [float(v) for v in values[:2]]
    )


def _coarse_step(n: int) -> float:
    """The coarsest simplex grid with at least 3 points: 0.5 for 2 objectives, 1 (the vertices) for more."""
    return 0.5 if n == 2 else 1.0


def rehearsal_overrides(cfg: Config, storage: str, workers: int | None = None) -> list[str]:
    """``section.field=value`` overrides that cut ``cfg``'s budgets to a step or two and put its artifacts under
    ``storage``. Resource fields (workers, resources per worker, use_gpu, decode / serve CPUs and GPUs), model
    names, objectives, dtypes, batch shapes and methods are left alone: they are what is rehearsed.

    ``workers``: also cut every Ray Train run to that many workers (``backbone.num_workers``,
    ``value.num_workers``; each still of the config's ``resources_per_worker``), the one resource request a
    rehearsal may change: a run's cost here is mostly its workers' start-up (importing torch, transformers and
    TRL), so a rehearsal with 1 worker per run takes about half the time and still places every model."""
    b, n = cfg.backbone, cfg.n_objectives
    n_train = max(8, b.prompts_per_step * b.num_workers)
    out = [
        f"storage.storage_path={storage}",
        "backbone.steps=2",
        "backbone.checkpoint_every=1",
        f"backbone.max_completion_length={min(b.max_completion_length, 4)}",
        f"backbone.sft_steps={min(b.sft_steps, 1)}",
        "value.steps=2",
        f"value.rollout_max_tokens={min(cfg.value.rollout_max_tokens, 4)}",
        f"value.rollouts_per_prompt={min(cfg.value.rollouts_per_prompt, 2)}",
        f"task.n_train={n_train}",
        "task.n_val=2",
        "task.n_test=2",
        "eval.min_test_prompts=2",
        f"eval.grid_step={_coarse_step(n)}",
        f"sweep.grid_step={_coarse_step(n)}",
        "eval.n_resamples=20",
        f"decode.max_new_tokens={min(cfg.decode.max_new_tokens, 4)}",
        "sweep.betas=[" + ",".join(f"{v:g}" for v in _two(cfg.sweep.betas, b.beta)) + "]",
        "sweep.alphas=[" + ",".join(f"{v:g}" for v in _two(cfg.sweep.alphas, cfg.decode.alpha)) + "]",
        "sweep.gammas=[" + ",".join(f"{v:g}" for v in _two(cfg.sweep.gammas, cfg.decode.gamma)) + "]",
        "arm.gammas=[" + ",".join(f"{v:g}" for v in _two(cfg.arm.gammas, 1.0)) + "]",
        "arm.steps=2",
    ]
    if workers is not None:
        out += [
            f"backbone.num_workers={min(workers, b.num_workers)}",
            f"value.num_workers={min(workers, cfg.value.num_workers)}",
        ]
    return out


def cluster_shape(cfg: Config) -> tuple[int, int]:
    """(CPUs, GPUs) of a logical node that holds the config's largest stage at once (the n backbone or value-model
    runs a stage starts together, the rollout actors, a decode worker, a Serve replica), plus a few CPUs for Ray
    Data's read tasks and the drivers. A smaller node (``--gpus``) rehearses the queueing of a smaller cluster."""
    from mage_ray.train.placement import worker_bundle

    n = cfg.n_objectives
    runs = []
    for sec in (cfg.backbone, cfg.value):
        w = worker_bundle(sec.resources_per_worker or None, sec.use_gpu)
        runs.append((n * w.get("CPU", 0) * sec.num_workers, n * w.get("GPU", 0) * sec.num_workers))
    rw = worker_bundle(cfg.value.resources_per_worker or None, cfg.value.use_gpu)
    scorer_gpu = 0.5 if cfg.task.reward_device.startswith("cuda") else 0
    runs.append(
        (rw.get("CPU", 1) * cfg.value.num_workers + 1, rw.get("GPU", 0) * cfg.value.num_workers + scorer_gpu)
    )
    runs.append((cfg.decode.num_cpus, cfg.decode.num_gpus))
    runs.append((cfg.serve.num_cpus, cfg.serve.num_gpus))
    cpus = max(c for c, _ in runs) + 4
    gpus = max(g for _, g in runs)
    return int(-(-cpus // 1)), int(-(-gpus // 1))


# ---------------------------------------------------------------------------------------------
# The ledger


def read_ledger(ledger: str | Path) -> list[dict[str, Any]]:
    """Every event the rehearsal's processes wrote (:mod:`mage_ray.devices`), in time order."""
    events = []
    for f in sorted(Path(ledger, "events").glob("*.jsonl")):
        events += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return sorted(events, key=lambda e: e["t"])


def _res(r: dict[str, float]) -> str:
    items = sorted(
        ((k, v) for k, v in r.items() if k in ("CPU", "GPU", "memory") or v), key=lambda kv: kv[0] != "GPU"
    )
    shown = [f"{k}: {v / 2**20:g} MiB" if k == "memory" else f"{k}: {v:g}" for k, v in items]
    return "{" + ", ".join(shown) + "}"


def summarise(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage: what the code requested, what Ray assigned to the processes that ran, which models went on a GPU,
    and which processes held a GPU without using it; plus every placement violation."""
    order: list[str] = []
    for e in events:
        st = e.get("stage") or "(setup)"
        if st not in order:
            order.append(st)
    stages: dict[str, dict[str, Any]] = {}
    for st in order:
        evs = [e for e in events if (e.get("stage") or "(setup)") == st]
        requested: Counter = Counter()
        details: dict[tuple, set] = defaultdict(set)
        for e in evs:
            if e["kind"] == "request":
                key = (e["who"], _res(e["resources"]))
                requested[key] += e["count"]
                details[key].add(e.get("detail") or "")
        procs: dict[int, dict[str, Any]] = {}
        for e in evs:
            if e["kind"] in ("process", "place"):
                p = procs.setdefault(
                    e["pid"], {"role": None, "assigned": e["assigned"], "gpu_ids": [], "cuda": []}
                )
                p["gpu_ids"] = p["gpu_ids"] or e.get("gpu_ids", [])
                if e["kind"] == "process":
                    p["role"] = e["role"]
                elif e["device"].startswith("cuda"):
                    p["cuda"].append(e["what"])
        got = Counter(
            (p["role"] or "(model placed in a process without a role)", _res(p["assigned"]))
            for p in procs.values()
        )
        models = Counter(
            (e["what"], "ok" if e["ok"] else f"NO GPU in {e['process']}") for e in evs if e["kind"] == "place"
        )
        idle = Counter(p["role"] or "?" for p in procs.values() if p["gpu_ids"] and not p["cuda"])
        stages[st] = {
            "requested": [
                {"who": w, "resources": r, "count": c, "of": sorted(d for d in details[(w, r)] if d)}
                for (w, r), c in requested.items()
            ],
            "got": [{"role": w, "assigned": r, "processes": c} for (w, r), c in got.items()],
            "gpu_models": [{"model": m, "status": s, "count": c} for (m, s), c in models.items()],
            "idle_gpu_processes": dict(idle),
        }
    violations = [
        f"stage {e.get('stage')!r}: {e['what']} placed on {e['device']} in {e['process']}, to which Ray assigned no GPU"
        for e in events
        if e["kind"] == "place" and not e["ok"]
    ]
    idle = [st for st, s in stages.items() if s["idle_gpu_processes"]]
    return {"stages": stages, "violations": violations, "idle_gpu_stages": idle}


def table(summary: dict[str, Any]) -> str:
    """The per-stage table (markdown) of :func:`summarise`."""
    lines = [
        "| stage | requested from Ray | assigned to the processes that ran | models on a GPU |",
        "|---|---|---|---|",
    ]
    for st, s in summary["stages"].items():
        req = (
            "<br>".join(
                f"{r['who']}: {r['count']} x {r['resources']}"
                + (f" ({len(r['of'])} runs)" if r["who"] == "Ray Train run" else "")
                for r in s["requested"]
            )
            or "-"
        )
        got = "<br>".join(f"{g['role']}: {g['processes']} x {g['assigned']}" for g in s["got"]) or "-"
        mod = (
            "<br>".join(
                f"{m['model']} x{m['count']}" + ("" if m["status"] == "ok" else f" ({m['status']})")
                for m in s["gpu_models"]
            )
            or "-"
        )
        lines.append(f"| {st} | {req} | {got} | {mod} |")
    idle = summary["idle_gpu_stages"]
    lines.append("")
    if idle:
        lines.append("Stages that would hold a GPU idle (a process Ray gave a GPU put no model on it):")
        for st in idle:
            who = ", ".join(f"{r} x{c}" for r, c in summary["stages"][st]["idle_gpu_processes"].items())
            lines.append(f"- {st}: {who}")
    else:
        lines.append("No stage would hold a GPU idle: every process Ray gave a GPU put a model on it.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The rehearsal


def _serve_once(cfg_path: str, cfg: Config, bundle: str) -> dict:
    """Deploy the Serve app from the bundle on a free local port, send one /v1/generate request, take it down."""
    import socket

    from ray import serve

    from mage_ray.serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(
            build_app({"bundle": bundle, "config": cfg_path, "overrides": []}),
            name="rehearsal",
            route_prefix="/",
        )
        body = json.dumps({"prompt": "Say hello.", "preference": [1.0 / cfg.n_objectives] * cfg.n_objectives})
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/generate",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())
    finally:
        serve.shutdown()


def _grid_once(cfg: Config, bundle: str, out: str) -> int:
    """One Ray Data preference grid over two validation prompts x the vertices, with the bundle's default method."""
    import ray.data

    from mage_ray.bundle import load_bundle
    from mage_ray.grid import run_grid
    from mage_ray.soup import preference_grid
    from mage_ray.tasks.prompts import load_prompts

    b = load_bundle(bundle)
    prompts = ray.data.from_items([{"prompt": p} for p in load_prompts(cfg.task, "validation")[:2]])
    points = preference_grid(cfg.n_objectives, 1.0).tolist()
    return run_grid(prompts, cfg, bundle, points, [b.default_method], out, score=True).count()


def _failed_trials(cfg: Config) -> list[str]:
    """Sweep trials that failed (a sweep goes on without them; a rehearsal must not)."""
    from mage_ray.stages import stage_done
    from mage_ray.storage import join, listdir

    out = []
    try:
        names = [
            n[: -len(".json")] for n in listdir(join(cfg.storage.run_dir, "stages")) if n.endswith(".json")
        ]
    except FileNotFoundError:  # no stage finished
        names = []
    for stage in names:
        rec = stage_done(cfg, stage) or {}
        out += [f"stage {stage!r}: trial {r.get('error')}" for r in rec.get("rows") or [] if r.get("error")]
    return out


def rehearse(
    config: str | None,
    overrides: list[str] | None = None,
    *,
    out: str | Path,
    cpus: int | None = None,
    gpus: int | None = None,
    serve_app: bool = True,
    grid: bool = True,
    resume: bool = False,
    storage: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Rehearse ``config`` (a YAML path, with ``overrides``) in a fresh local Ray; write ``<out>/rehearsal.md`` and
    ``rehearsal.json``; return the summary. Raises RehearsalFailed on a placement violation or a failed stage or
    trial (the report is written first).

    ``resume``: keep ``out``'s run and stand-ins, so finished stages are skipped as a resumed job skips them (the
    ledger starts afresh: the report covers the stages this invocation ran).
    ``storage``: where the run's artifacts go (default ``<out>/runs``), e.g. an object-store URI to rehearse the
    storage layer with them (the store's credentials and endpoint come from the environment, as in a real job).
    ``workers``: Ray Train workers per run (default: the config's; see :func:`rehearsal_overrides`)."""
    import ray

    from mage_ray.config import load_config
    from mage_ray.runtime import init_ray
    from mage_ray.twins import build_twins

    if ray.is_initialized():
        raise RehearsalFailed(
            "rehearse starts its own Ray with logical GPUs: call it in a process without Ray"
        )
    t0 = time.time()
    out = Path(out).resolve()
    if out.exists() and not resume:
        shutil.rmtree(out)
    ledger = out / "ledger"
    shutil.rmtree(ledger, ignore_errors=True)
    ledger.mkdir(parents=True)
    user = load_config(config, overrides)
    cuts = rehearsal_overrides(user, storage or str(out / "runs"), workers)
    cfg = config_from_dict(user.to_dict(), cuts)
    cfg_path = out / "config.yaml"
    save_config(cfg, cfg_path)
    hub_file = out / "twins" / "hub_map.json"
    if resume and hub_file.is_file():
        hub = json.loads(hub_file.read_text())
    else:
        hub = build_twins(cfg, out / "twins")
        hub_file.write_text(json.dumps(hub, indent=2) + "\n")
    shape = cluster_shape(cfg)
    cpus, gpus = cpus or shape[0], gpus if gpus is not None else shape[1]
    env = {
        REHEARSAL_ENV: str(ledger),
        HUB_MAP_ENV: json.dumps(hub),
        "OMP_NUM_THREADS": "1",  # logical CPUs far beyond the machine's: one thread per process
        "RAY_enable_worker_prestart": "0",  # else Ray starts an idle worker per logical CPU
        "RAY_prestart_worker_first_driver": "0",
        # a dozen Train workers importing torch at once on a laptop take longer than Ray Train's 60 s default
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "900",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    # Ray Train's controller polls its workers every 2 s and a worker's report waits for that poll: the stand-ins'
    # steps take a fraction of a second, so each rehearsed step would wait ~2 s and each run ~5 s at its end (a
    # real step takes longer than the poll and never waits). A value you set is kept.
    if TRAIN_POLL_ENV not in os.environ:
        env[TRAIN_POLL_ENV] = "0.25"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    print(
        f"[rehearse] {config}: {cpus} CPUs and {gpus} logical GPUs on one node; stand-ins for {sorted(hub)}\n"
        f"[rehearse] budget cuts: {' '.join(c for c in cuts if not c.startswith('storage.'))}",
        flush=True,
    )
    error: BaseException | None = None
    result: dict[str, Any] = {}
    try:
        init_ray(num_cpus=cpus, num_gpus=gpus)
        from mage_ray.pipeline import run_pipeline

        result["pipeline"] = run_pipeline(cfg)
        bundle = result["pipeline"]["bundle"]
        if grid:
            set_stage("grid")
            result["grid_rows"] = _grid_once(cfg, bundle, str(out / "grid"))
        if serve_app:
            set_stage("serve")
            reply = _serve_once(str(cfg_path), cfg, bundle)
            result["serve_reply"] = {k: reply.get(k) for k in ("text", "finish_reason", "method")}
    except BaseException as e:  # noqa: BLE001 - reported with the ledger below
        error = e
        import traceback

        (out / "error.txt").write_text("".join(traceback.format_exception(e)))
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    summary = summarise(read_ledger(ledger))
    failures = list(summary["violations"])
    failures += _failed_trials(cfg)
    if error is not None and not failures:
        failures.append(
            f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        )
    report = {
        "config": config,
        "cluster": {"CPU": cpus, "GPU": gpus, "nodes": 1},
        "cuts": cuts,
        "stand_ins": hub,
        "seconds": round(time.time() - t0, 1),
        "failures": failures,
        **summary,
        **result,
    }
    (out / "rehearsal.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = [
        f"# Rehearsal of {config}\n",
        f"{cpus} CPUs, {gpus} logical GPUs (one node); {report['seconds']:.0f} s. "
        f"Stand-ins: {', '.join(sorted(hub)) or 'none'}.\n",
        "Budget cuts: " + ", ".join(f"`{c}`" for c in cuts if not c.startswith("storage.")) + "\n",
        table(summary),
    ]
    if failures:
        md.append("\n## Failures\n\n" + "\n".join(f"- {f}" for f in failures) + "\n")
    (out / "rehearsal.md").write_text("\n".join(md))
    print("\n" + table(summary), flush=True)
    if failures:
        raise RehearsalFailed(f"rehearsal of {config} failed: {failures[0]}")
    return report


def stage_gpu_report(summary: dict[str, Any]) -> dict[str, list[str]]:
    """Per stage, the distinct GPU placements (for tests and docs): stage -> sorted model descriptions."""
    out: dict[str, list[str]] = defaultdict(list)
    for st, s in summary["stages"].items():
        out[st] = sorted({m["model"] for m in s["gpu_models"]})
    return dict(out)
