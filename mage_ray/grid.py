"""Preference grids: prompts x preference points x methods through the one decode engine, and their summary.

* :func:`point_summary` — the one per-preference summariser: from per-prompt rewards X (P, N, n) and degenerate
  flags D (P, N) to the mean reward of every point (``uncertainty.cell_means``), the share of its decoded
  responses the quality gate flags, and whether the point is on the non-dominated front of the grid
  (``metrics.pareto_mask`` over the points with a finite mean). Evaluation, Serve's ``/v1/grid`` and
  ``jobs/grid.py`` all call it.
* :class:`BatchDecoder` — a Ray Data ``map_batches`` callable holding one Engine (an actor pool of them decodes
  a grid; each call decodes its whole batch, mixed preferences and methods, as one engine batch).
* :func:`read_prompts`, :func:`run_grid`, :func:`summarise_dataset` — the offline grid job (``jobs/grid.py``):
  a Ray Dataset of prompts -> one row per (prompt, method, point) -> decoded (and scored) Parquet -> summary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from mage_ray.bundle import load_bundle
from mage_ray.config import DecodeConfig
from mage_ray.decode import Engine, Request, decode_defaults, parts_from_bundle
from mage_ray.manifest import join
from mage_ray.metrics import pareto_mask
from mage_ray.storage import is_dir
from mage_ray.uncertainty import cell_means

__all__ = [
    "BatchDecoder",
    "expand",
    "grid_points_summary",
    "point_summary",
    "read_prompts",
    "run_grid",
    "summarise_dataset",
]


def point_summary(X: np.ndarray, D: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Summarise a grid of P points x N prompts.

    ``X`` (P, N, n): rewards, NaN where a response failed or was not scored; ``D`` (P, N): 1.0 / 0.0 degenerate
    flags, NaN where decoding failed. Returns ``means`` (P, n) (NaN where no prompt has a value),
    ``degenerate`` (P,) the flagged share of the decoded responses (NaN where none decoded; None without D) and
    ``front`` (P,) bool: no other point with a finite mean dominates the point's mean.
    """
    X = np.asarray(X, dtype=np.float64)
    means = cell_means(X)  # (P, n)
    degenerate = None
    if D is not None:
        D = np.asarray(D, dtype=np.float64)
        counts = np.sum(~np.isnan(D), axis=1)
        degenerate = np.divide(
            np.nansum(D, axis=1), counts, out=np.full(len(D), np.nan), where=counts > 0
        )  # (P,)
    valid = np.isfinite(means).all(axis=1)
    front = np.zeros(len(means), dtype=bool)
    if valid.any():
        front[valid] = pareto_mask(means[valid])
    return {"means": means, "degenerate": degenerate, "front": front}


def grid_points_summary(
    points: np.ndarray, prompts: Sequence[str], comps: Sequence[Any], scores: np.ndarray | None
) -> tuple[list[dict], list[bool] | None]:
    """The per-point entries of a decoded grid (Serve's ``/v1/grid``) and its front.

    ``comps``: Completions in point-major order (request p * m + i for m prompts); ``prompts``: the prompt text
    of every completion, same order; ``scores`` (P * m, n) or None when the grid is not scored. Every text is
    checked by the quality gate; a point gets its texts, finish reasons, errors, degenerate flags (None where
    decoding failed), the flagged share and, when scored, its mean rewards; ``front`` (scored grids only) from
    :func:`point_summary`.
    """
    from mage_ray.tasks.quality import degenerate_mask

    P = len(points)
    m = len(comps) // P
    flags = degenerate_mask(list(prompts), [c.text for c in comps])
    # (P, m, n) rewards and (P, m) flags, NaN where decoding failed: the one per-point summariser
    n = 1 if scores is None else scores.shape[1]
    X = np.full((P, m, n), np.nan) if scores is None else scores.reshape(P, m, -1)
    D = np.array(
        [np.nan if c.finish_reason == "error" else float(f) for c, f in zip(comps, flags)], dtype=np.float64
    ).reshape(P, m)
    summary = point_summary(X, D)
    out_points = []
    for p in range(P):
        cs = comps[p * m : (p + 1) * m]
        frac = summary["degenerate"][p]
        entry = {
            "preference": [float(x) for x in points[p]],
            "texts": [c.text for c in cs],
            "finish_reasons": [c.finish_reason for c in cs],
            "errors": [c.error for c in cs] if any(c.error for c in cs) else None,
            "degenerate": [None if np.isnan(v) else bool(v) for v in D[p]],
            "degenerate_fraction": None if np.isnan(frac) else float(frac),
        }
        if scores is not None:
            entry["mean_rewards"] = [None if np.isnan(v) else float(v) for v in summary["means"][p]]
        out_points.append(entry)
    return out_points, ([bool(f) for f in summary["front"]] if scores is not None else None)


class BatchDecoder:
    """``map_batches`` callable holding one Engine: columns prompt, preference, method -> + text, finish_reason,
    error, completion_tokens (and ``score_<objective>`` plus ``degenerate`` (the quality gate's flag) when
    ``objectives`` are given; NaN / False where decoding failed). One call decodes its whole batch as one engine
    batch (mixed preferences and methods).

    ``decode`` is a DecodeConfig (or its dict); ``methods`` limits the adapters loaded to those the methods use.
    Scoring runs in the same actor, so a grid needs one actor pool (two pools can take every CPU of a small
    cluster and starve the read tasks).
    """

    def __init__(
        self,
        bundle_path: str,
        decode: DecodeConfig | dict | None = None,
        methods: Sequence[str] | None = None,
        device: str = "cpu",
        objectives: Sequence[str] | None = None,
        reward_device: str = "cpu",
    ):
        from mage_ray.devices import note_process

        note_process("grid decode actor")
        bundle = load_bundle(bundle_path)
        dcfg = DecodeConfig(**decode) if isinstance(decode, dict) else decode
        self.engine = Engine(parts_from_bundle(bundle, device=device, methods=methods), dcfg, device)
        self.names = list(objectives or [])
        self.objectives = None
        if self.names:
            from mage_ray.tasks.objectives import get_objective

            self.objectives = [get_objective(n, device=reward_device) for n in self.names]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        prompts = [str(p) for p in batch["prompt"]]
        prefs = [[float(x) for x in p] for p in batch["preference"]]
        methods = [str(m) for m in batch["method"]]
        comps = self.engine.generate(
            [Request(prompt=p, preference=mu, method=m) for p, mu, m in zip(prompts, prefs, methods)]
        )
        pref_col = np.empty(
            len(prefs), dtype=object
        )  # a list column in Parquet (not a tensor extension type)
        for k, mu in enumerate(prefs):
            pref_col[k] = mu
        out = {
            **batch,
            "preference": pref_col,
            "text": np.array([c.text for c in comps], dtype=object),
            "finish_reason": np.array([c.finish_reason for c in comps], dtype=object),
            "error": np.array([c.error or "" for c in comps], dtype=object),
            "completion_tokens": np.array([c.usage.completion_tokens for c in comps], dtype=np.int64),
        }
        if self.objectives:
            from mage_ray.tasks.objectives import score
            from mage_ray.tasks.quality import degenerate_mask

            ok = [k for k, c in enumerate(comps) if c.finish_reason != "error"]
            scores = np.full((len(comps), len(self.names)), np.nan)  # (B, n)
            flags = np.zeros(len(comps), dtype=bool)
            if ok:
                scores[ok] = score(self.objectives, [prompts[k] for k in ok], [comps[k].text for k in ok])
                flags[ok] = degenerate_mask([prompts[k] for k in ok], [comps[k].text for k in ok])
            out.update({f"score_{n}": scores[:, j] for j, n in enumerate(self.names)})
            out["degenerate"] = flags
        return out


def read_prompts(path: str | None, cfg, split: str):
    """A Ray Dataset with a ``prompt`` column: the file(s) at ``path`` (.parquet, a directory, or .jsonl) or the
    task's ``split``. A file without a ``prompt`` column raises ValueError naming its columns."""
    import ray.data

    if path is None:
        from mage_ray.tasks.prompts import load_prompts

        return ray.data.from_items([{"prompt": p} for p in load_prompts(cfg.task, split)])
    p = str(path)
    ds = ray.data.read_parquet(p) if p.endswith(".parquet") or is_dir(p) else ray.data.read_json(p)
    if "prompt" not in ds.columns():
        raise ValueError(f"--prompts: {p} has no 'prompt' column (columns: {ds.columns()})")
    return ds.select_columns(["prompt"])


def expand(row: dict, points: list[list[float]], methods: list[str]) -> list[dict]:
    """One prompt row -> one row per (method, preference point)."""
    return [{"prompt": row["prompt"], "preference": mu, "method": m} for m in methods for mu in points]


def run_grid(
    ds,
    cfg,
    bundle_path: str,
    points: list[list[float]],
    methods: list[str],
    out: str,
    *,
    overrides=(),
    concurrency: int = 1,
    score: bool = False,
):
    """Decode (and score) ``ds`` x points x methods with Ray Data; write Parquet to ``<out>/generations``;
    return the (materialised) dataset."""
    import ray.data

    from mage_ray.devices import note_request

    bundle = load_bundle(bundle_path)
    decode = decode_defaults(cfg, bundle, overrides).__dict__
    note_request("grid decode actor (Ray Data)", cfg.decode.ray_resources(), count=concurrency)
    ds = ds.flat_map(expand, fn_kwargs={"points": points, "methods": methods})
    ds = ds.map_batches(
        BatchDecoder,
        fn_constructor_kwargs={
            "bundle_path": bundle.location,  # a URI: each actor loads its node's local copy
            "decode": decode,
            "methods": methods,
            "device": cfg.decode.device,
            "objectives": bundle.objectives if score else None,
            "reward_device": cfg.task.reward_device,
        },
        batch_size=cfg.decode.batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cfg.decode.num_cpus,  # one batch decode worker each (decode.num_cpus / num_gpus)
        num_gpus=cfg.decode.num_gpus,
        batch_format="numpy",
    )
    ds = ds.materialize()
    ds.write_parquet(join(out, "generations"))
    return ds


def summarise_dataset(ds, objectives: list[str]) -> list[dict]:
    """Per (method, preference) of a scored grid dataset: mean rewards, degenerate fraction, and whether the
    point is on that method's non-dominated front (:func:`point_summary`); points where every response failed
    are left out."""
    df = ds.drop_columns(["text"]).to_pandas()
    df["key"] = df["preference"].map(lambda p: json.dumps([round(float(x), 6) for x in p]))
    cols = [f"score_{n}" for n in objectives]
    out = []
    for method, g in df.groupby("method"):
        keys = sorted(g["key"].unique())
        groups = [g[g["key"] == k] for k in keys]
        N = max(len(x) for x in groups)
        X = np.full((len(keys), N, len(cols)), np.nan)  # (P, N, n)
        D = np.full((len(keys), N), np.nan)  # (P, N)
        for p, x in enumerate(groups):
            X[p, : len(x)] = x[cols].to_numpy(dtype=np.float64)
            ok = x[cols].notna().all(axis=1).to_numpy()
            D[p, : len(x)] = np.where(ok, x["degenerate"].to_numpy(dtype=np.float64), np.nan)
        X[np.isnan(X).any(axis=2)] = np.nan  # a response counts for all objectives or none
        s = point_summary(X, D)
        for p, key in enumerate(keys):
            if not np.isfinite(s["means"][p]).all():
                continue
            out.append(
                {
                    "method": method,
                    "preference": json.loads(key),
                    "mean_rewards": s["means"][p].tolist(),
                    "degenerate_fraction": float(s["degenerate"][p]),
                    "front": bool(s["front"][p]),
                }
            )
    return out
