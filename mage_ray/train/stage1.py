"""Stage 1 plan shared by the GRPO / RLOO trainer (``ray_train``) and the WRPO trainer (``wrpo``): the backbones'
reward weights, names and directories (Eq. 11-12), and the optional SFT base they all start from.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mage_ray.config import Config
from mage_ray.manifest import MANIFEST_NAME, is_complete, is_uri, join, publish_dir, read_json
from mage_ray.train.ray_shell import (
    FINAL,
    Scaling,
    report_final,
    restore_checkpoint,
    run_torch_trainer,
    storage_abs,
)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def backbone_dir(cfg: Config, beta: float, name: str) -> str:
    """``<run_dir>/backbones/beta_<beta>/<name>``."""
    return join(storage_abs(cfg.storage.run_dir), "backbones", f"beta_{_fmt(beta)}", name)


def morlhf_dir(cfg: Config, mu: Sequence[float]) -> str:
    """``<run_dir>/morlhf/mu_<mu_1>-<mu_2>-...``."""
    return join(storage_abs(cfg.storage.run_dir), "morlhf", "mu_" + "-".join(_fmt(float(x)) for x in mu))


def backbone_plan(
    cfg: Config,
    beta: float | None,
    weights: Sequence[Sequence[float]] | None,
    names: Sequence[str] | None,
    objectives: Sequence[Any] | None,
) -> tuple[float, list[np.ndarray], list[str]]:
    """(beta, reward weights, names) of the backbones to train: the columns w_i of B(beta) (Eq. 12) unless
    ``weights`` are given, named ``b0..b{n-1}`` unless ``names`` are; names must be distinct, one per w."""
    from mage_ray.soup import backbone_weights

    beta = cfg.backbone.beta if beta is None else float(beta)
    n = len(objectives) if objectives is not None else cfg.n_objectives
    ws = [np.asarray(x, dtype=float) for x in weights] if weights is not None else backbone_weights(n, beta)
    names = list(names) if names is not None else [f"b{i}" for i in range(len(ws))]
    if len(names) != len(ws) or len(set(names)) != len(names):
        raise ValueError(f"names must be {len(ws)} distinct names (one per backbone), got {names}")
    return beta, ws, names


def sft_worker(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop of the optional SFT stage (one worker): :func:`train_sft`, then report."""
    from mage_ray.train.backbone import train_sft

    work = Path(tempfile.mkdtemp(prefix="mage-sft-"))
    try:
        _, final = restore_checkpoint(work / "restored")
        if final is None:
            train_sft(config["cfg"], config["pairs"], work / "out")
            final = work / "out"
        report_final(final, {"complete": 1.0, "step": float(read_json(final / MANIFEST_NAME)["steps_done"])})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prepare_sft_base(cfg: Config, pairs: Sequence[tuple[str, str]] | None = None) -> Config:
    """Optional SFT stage: theta_sft shared by all backbones. Returns ``cfg`` with the SFT model as base.

    Runs only when ``backbone.sft_steps > 0`` and the task ships SFT pairs (else logs a skip line and
    returns ``cfg`` unchanged). The merged model lands in ``<run_dir>/sft/model`` once; later calls reuse it.
    """
    from mage_ray.train.backbone import task_sft_pairs

    if cfg.backbone.sft_steps <= 0:
        return cfg
    out = join(storage_abs(cfg.storage.run_dir), "sft")
    if is_uri(out):
        raise ValueError(
            f"storage.storage_path = {cfg.storage.storage_path!r}: the SFT stage needs a local or shared "
            "filesystem path (the merged model becomes model.name_or_path)"
        )
    if not is_complete(out):
        pairs = list(pairs) if pairs is not None else task_sft_pairs(cfg.task)
        if not pairs:
            print(
                f"[sft] task '{cfg.task.name}' has no SFT data; skipping SFT (backbone.sft_steps ignored)",
                flush=True,
            )
            return cfg
        b = cfg.backbone
        result = run_torch_trainer(
            sft_worker,
            {"cfg": cfg, "pairs": pairs},
            scaling=Scaling(1, b.use_gpu, dict(b.resources_per_worker), b.placement_strategy),
            storage_path=join(storage_abs(cfg.storage.run_dir), "ray"),
            name="sft",
            max_failures=b.max_failures,
        )
        with tempfile.TemporaryDirectory(prefix="mage-publish-") as tmp:
            result.checkpoint.to_directory(tmp)
            publish_dir(Path(tmp) / FINAL, out)
    model = dataclasses.replace(cfg.model, name_or_path=join(out, "model"))
    return dataclasses.replace(cfg, model=model)
