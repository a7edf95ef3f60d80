"""Stage 1 plan shared by the GRPO / RLOO trainer (``backbone``, ``ray_train``) and the WRPO trainer (``wrpo``):
the backbones' reward weights (validated on the simplex), names and directories (Eq. 11-12), the writable
output check and precision settings, and the optional SFT stage (``train_sft``: LoRA SFT merged into the
weights -> theta_sft, for tasks that come with (prompt, response) pairs) whose model they all start from.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mage_ray.config import Config
from mage_ray.manifest import (
    MANIFEST_NAME,
    atomic_dir,
    is_complete,
    is_uri,
    join,
    read_json,
    scratch_dir,
    write_manifest,
)
from mage_ray.train.offline import checkpointing_on
from mage_ray.train.ray_shell import Scaling, report_final, restore_checkpoint, run_and_publish, storage_abs


def _fmt(x: float) -> str:
    return f"{x:.4g}"


class RewardWeightsError(ValueError):
    """The reward weight vector w of a backbone is not a point of the simplex."""


def validate_reward_weights(w: Sequence[float] | np.ndarray, n: int, tol: float = 1e-6) -> np.ndarray:
    """Check ``w`` is a length-n point of the simplex (finite, >= 0, sum 1); return it as float64 (n,)."""
    try:
        arr = np.asarray(w, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise RewardWeightsError(f"w must be a vector of {n} numbers, got {w!r}") from e
    if arr.ndim != 1 or arr.shape[0] != n:
        raise RewardWeightsError(f"w must have length {n} (one weight per objective), got shape {arr.shape}")
    for i, v in enumerate(arr):
        if not math.isfinite(v):
            raise RewardWeightsError(f"w[{i}] = {v} is not finite")
        if v < 0:
            raise RewardWeightsError(f"w[{i}] = {v:g} is negative; reward weights must be >= 0")
    if abs(arr.sum() - 1.0) > tol:
        raise RewardWeightsError(f"w sums to {arr.sum():.6g}; reward weights must sum to 1 (Eq. 11)")
    return arr


def check_writable(out_dir: str | Path, what: str = "out_dir") -> Path:
    """Create ``out_dir`` and prove a file can be written there, else raise ValueError naming it."""
    if is_uri(out_dir):
        raise ValueError(
            f"{what} = {str(out_dir)!r} is a URI; the plain trainer writes to a local directory "
            "(use mage_ray.train.ray_train for cloud storage)"
        )
    p = Path(out_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{what} = {str(p)!r} is not writable: {e.strerror or e}") from e
    return p


def precision_args() -> dict[str, Any]:
    """CPU: fp32 and no AMP (bf16 autocast on CPU is slow); GPU: bf16 where supported."""
    import torch

    if torch.cuda.is_available():
        return {"bf16": torch.cuda.is_bf16_supported(), "use_cpu": False}
    return {"bf16": False, "use_cpu": True}


def checkpointing_args(setting: bool | None) -> dict[str, Any]:
    """TrainingArguments fields for activation checkpointing (:func:`checkpointing_on`; TRL's configs default it
    on, so it is always passed). On, it is non-reentrant (no input that requires grad needed with a frozen PEFT
    base). Recent transformers 5 releases call the fields ``activation_checkpointing`` / ``..._kwargs``;
    ``gradient_checkpointing`` / ``..._kwargs`` are deprecated aliases there that warn."""
    from transformers import TrainingArguments

    renamed = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if renamed else "gradient_checkpointing"
    if not checkpointing_on(setting):
        return {name: False}
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


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


# ---------------------------------------------------------------------------------------------
# Optional SFT stage: theta_sft shared by every backbone


def task_sft_pairs(task_cfg) -> list[tuple[str, str]] | None:
    """(prompt, response) SFT pairs of the task, or None when the task ships none.

    Uses ``mage_ray.tasks.prompts.load_sft_pairs(task_cfg)`` when the tasks package provides it.
    """
    try:
        from mage_ray.tasks.prompts import load_sft_pairs
    except ImportError:
        return None
    pairs = load_sft_pairs(task_cfg)
    return list(pairs) if pairs else None


def train_sft(
    cfg: Config,
    pairs: Sequence[tuple[str, str]],
    out_dir: str | Path,
    *,
    steps: int | None = None,
    callbacks: Sequence[Any] = (),
) -> Path:
    """LoRA SFT on (prompt, response) pairs, merged into the base weights: theta_sft for every backbone.

    All backbones and the Bone Soup merge (Eq. 13) share one theta_sft, so SFT runs once per job (not per
    backbone) and its merged weights become the base model. Writes ``out_dir/model`` (full HF checkpoint +
    tokenizer, atomically) and ``out_dir/manifest.json``; returns the model directory.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from mage_ray.models import load_policy
    from mage_ray.train.offline import lora_config

    t0 = time.time()
    if not pairs:
        raise ValueError("pairs must hold at least one (prompt, response) pair for SFT")
    for i, pr in enumerate(pairs):
        if len(pr) != 2 or not all(isinstance(s, str) for s in pr):
            raise ValueError(f"pairs[{i}] must be a (prompt, response) pair of strings, got {pr!r}")
    steps = cfg.backbone.sft_steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"SFT steps must be >= 1 (backbone.sft_steps), got {steps}")
    out = check_writable(out_dir)
    model, tok = load_policy(cfg.model, cfg.storage.cache_dir)
    rows = [
        {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": r}]}
        for p, r in pairs
    ]
    args = SFTConfig(
        output_dir=str(out / "checkpoints"),
        max_steps=steps,
        learning_rate=cfg.backbone.learning_rate,
        per_device_train_batch_size=max(1, min(8, len(rows))),
        logging_steps=1,
        save_strategy="no",
        seed=cfg.backbone.seed,
        **checkpointing_args(cfg.backbone.activation_checkpointing),
        report_to="none",
        max_length=cfg.task.max_prompt_tokens + cfg.backbone.max_completion_length,
        **precision_args(),
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=lora_config(cfg.lora),
        callbacks=list(callbacks),
    )
    trainer.train()
    merged = trainer.model.merge_and_unload()
    target = out / "model"
    with atomic_dir(target) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    write_manifest(
        out,
        {
            "kind": "sft",
            "status": "complete",
            "base_model": cfg.model.name_or_path,
            "model": "model",
            "pairs": len(pairs),
            "steps_done": int(trainer.state.global_step),
            "final_loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
            "lora": dataclasses.asdict(cfg.lora),
            "wall_time_s": round(time.time() - t0, 3),
        },
    )
    return target


def sft_worker(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop of the optional SFT stage (one worker): :func:`train_sft`, then report."""
    with scratch_dir("mage-sft") as work:
        _, final = restore_checkpoint(work / "restored")
        if final is None:
            train_sft(config["cfg"], config["pairs"], work / "out")
            final = work / "out"
        report_final(final, {"complete": 1.0, "step": float(read_json(final / MANIFEST_NAME)["steps_done"])})


def prepare_sft_base(cfg: Config, pairs: Sequence[tuple[str, str]] | None = None) -> Config:
    """Optional SFT stage: theta_sft shared by all backbones. Returns ``cfg`` with the SFT model as base.

    Runs only when ``backbone.sft_steps > 0`` and the task ships SFT pairs (else logs a skip line and
    returns ``cfg`` unchanged). The merged model lands in ``<run_dir>/sft/model`` once; later calls reuse it.
    """
    if cfg.backbone.sft_steps <= 0:
        return cfg
    out = join(storage_abs(cfg.storage.run_dir), "sft")  # a URI too: workers load their node's local copy
    if not is_complete(out):
        pairs = list(pairs) if pairs is not None else task_sft_pairs(cfg.task)
        if not pairs:
            print(
                f"[sft] task '{cfg.task.name}' has no SFT data; skipping SFT (backbone.sft_steps ignored)",
                flush=True,
            )
            return cfg
        b = cfg.backbone
        run_and_publish(
            sft_worker,
            {"cfg": cfg, "pairs": pairs},
            out,
            cfg=cfg,
            scaling=Scaling(1, b.use_gpu, dict(b.resources_per_worker), b.placement_strategy),
            run_name="sft",
            label="sft",
            progress=False,
        )
    model = dataclasses.replace(cfg.model, name_or_path=join(out, "model"))
    return dataclasses.replace(cfg, model=model)
