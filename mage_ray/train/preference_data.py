"""Shared pieces of the offline baselines RiC, MODPO and WRPO: data from scored rollouts, batching, a loop.

All three train a LoRA on the base policy from *scored responses* (the rollout Parquet of
:mod:`mage_ray.train.rollouts`: columns prompt, response, prompt_ids, response_ids and one float column per
objective). This module holds what they share:

* **Data.** :func:`build_pairs` (MODPO): per prompt, the best and the worst response under a weighted score
  w^T r (MODPO uses w = one-hot(pivot objective)). :func:`build_triples` (WRPO): per prompt, the best
  *source-model* response y_ws and the best / worst *target-policy* responses y_wt / y_l, all ranked by
  h = w^T r (Eq. 11 of mage.txt). :func:`zscore_stats` gives per-objective (mean, std) for normalising.
* **Tensors.** :func:`collate_sequences` (right-padded prompt + response, mask on the positions that predict
  a response token) and :func:`sequence_logps` (sum_t log pi(y_t | x, y<t), shape [B]); the reference policy
  pi_ref is the same PEFT model with its adapter disabled (:func:`reference_logps`), so it costs no second
  copy of the weights.
* **Loop.** :func:`build_lora_policy`, :func:`fit_steps` (AdamW steps with a per-step hook, data-parallel
  slices by rank), :func:`save_policy_artifact` (``adapter/`` + ``manifest.json`` + ``metrics.jsonl``,
  published atomically) and :class:`TrainContext` (what a Ray Train worker hands a plain trainer: rank,
  world size, device, DDP wrapper, step hook, resume state).
* **Ray.** :func:`lora_worker` (per-worker loop with checkpoints + resume), :func:`run_lora_job` (one Ray
  Train run, published to its artifact dir) and :func:`run_lora_jobs` (several, concurrently as Tune trials):
  the same shell as :mod:`mage_ray.train.ray_train` around any plain trainer
  ``train_fn(cfg, out_dir, *, ctx, **kwargs) -> manifest``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mage_ray.config import Config
from mage_ray.manifest import is_complete, join, publish_dir, write_manifest
from mage_ray.train.ray_shell import (
    FINAL,
    Scaling,
    format_progress,
    report_final,
    run_and_publish,
    run_pending,
    storage_abs,
    train_run_name,
)

__all__ = [
    "PreferencePair",
    "PreferenceTriple",
    "TrainContext",
    "batch_indices",
    "build_lora_policy",
    "build_pairs",
    "build_triples",
    "collate_sequences",
    "fit_steps",
    "lora_worker",
    "objective_matrix",
    "reference_logps",
    "run_lora_job",
    "run_lora_jobs",
    "save_policy_artifact",
    "sequence_logps",
    "token_logps",
    "zscore_stats",
]

STATE_FILE = "state.pt"
"""Ray checkpoint file of an unfinished run: {"step", "trainable", "optimizer", "extra"}."""


# ---------------------------------------------------------------------------------------------
# Data: scored rollouts -> pairs / triples


def objective_matrix(table: pa.Table, objectives: Sequence[str]) -> np.ndarray:
    """Scores of ``objectives`` as an (N, n) float64 matrix; ValueError naming a missing column."""
    missing = [o for o in objectives if o not in table.column_names]
    if missing:
        raise ValueError(
            f"objectives {missing} are not columns of the scored rollouts (columns: {table.column_names}); "
            "regenerate the rollouts with these task.objectives"
        )
    cols = [np.asarray(table.column(o).to_numpy(zero_copy_only=False), dtype=np.float64) for o in objectives]
    return np.stack(cols, axis=1) if cols else np.zeros((table.num_rows, 0))  # (N, n)


def zscore_stats(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-objective mean and std (floored at 1e-6) of an (N, n) score matrix: two (n,) arrays."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty (N, n) matrix, got shape {scores.shape}")
    return scores.mean(axis=0), np.maximum(scores.std(axis=0), 1e-6)


def _rows_by_prompt(prompts: Sequence[str]) -> dict[str, list[int]]:
    """Row indices per prompt text, prompts in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    return groups


def _usable(table: pa.Table, scores: np.ndarray) -> np.ndarray:
    """Rows with a non-empty response and finite scores: (N,) bool."""
    nonempty = np.array([len(r) > 0 for r in table.column("response_ids").to_pylist()], dtype=bool)
    return nonempty & np.isfinite(scores).all(axis=1)


@dataclass
class PreferencePair:
    """One MODPO example: a prompt, its chosen and rejected responses, and their raw objective scores."""

    prompt: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_scores: np.ndarray
    """r(x, y_w), (n,) raw scores."""
    rejected_scores: np.ndarray
    """r(x, y_l), (n,) raw scores."""


def build_pairs(
    table: pa.Table, objectives: Sequence[str], weights: Sequence[float], *, min_margin: float = 0.0
) -> list[PreferencePair]:
    """Per prompt: chosen = argmax_y w^T r(x, y), rejected = argmin_y w^T r(x, y) over its responses.

    Prompts with fewer than two usable responses (non-empty, finite scores) or whose best and worst weighted
    scores differ by ``min_margin`` or less are skipped. Ties pick the first row. Prompts keep their order.
    """
    scores = objective_matrix(table, objectives)  # (N, n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(objectives),):
        raise ValueError(f"weights must have {len(objectives)} entries (one per objective), got {w.tolist()}")
    ok = _usable(table, scores)
    h = scores @ w  # (N,)
    prompts = table.column("prompt").to_pylist()
    p_ids = table.column("prompt_ids").to_pylist()
    r_ids = table.column("response_ids").to_pylist()
    pairs = []
    for p, rows in _rows_by_prompt(prompts).items():
        rows = [i for i in rows if ok[i]]
        if len(rows) < 2:
            continue
        best = rows[int(np.argmax(h[rows]))]
        worst = rows[int(np.argmin(h[rows]))]
        if h[best] - h[worst] <= min_margin:
            continue
        pairs.append(
            PreferencePair(
                p, list(p_ids[best]), list(r_ids[best]), list(r_ids[worst]), scores[best], scores[worst]
            )
        )
    return pairs


@dataclass
class PreferenceTriple:
    """One WRPO example: (x, y_ws, y_wt, y_l) with their combined rewards h = w^T r."""

    prompt: str
    prompt_ids: list[int]
    source_ids: list[int]
    """y_ws: the best response among all source models' responses to x."""
    chosen_ids: list[int]
    """y_wt: the best of the target policy's responses to x."""
    rejected_ids: list[int]
    """y_l: the worst of the target policy's responses to x."""
    source: str
    """Name of the source model y_ws came from."""
    h_source: float
    h_chosen: float
    h_rejected: float


def build_triples(
    target: pa.Table,
    sources: Mapping[str, pa.Table],
    objectives: Sequence[str],
    weights: Sequence[float],
    *,
    min_margin: float = 0.0,
) -> list[PreferenceTriple]:
    """WRPO triples: per prompt of ``target``, y_ws = argmax h over every source response to the same prompt
    text, y_wt / y_l = argmax / argmin h over the target's responses, h = w^T r.

    Prompts without a usable source response, with fewer than two usable target responses, or with
    h(y_wt) - h(y_l) <= ``min_margin`` are skipped. Source tables must hold token ids in the target
    tokenizer (their ``prompt_ids`` are not used: the target's are).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(objectives),):
        raise ValueError(f"weights must have {len(objectives)} entries (one per objective), got {w.tolist()}")
    best_source: dict[str, tuple[float, list[int], str]] = {}
    for name, table in sources.items():
        s = objective_matrix(table, objectives)
        ok = _usable(table, s)
        h = s @ w
        ids = table.column("response_ids").to_pylist()
        for i, p in enumerate(table.column("prompt").to_pylist()):
            if ok[i] and (p not in best_source or h[i] > best_source[p][0]):
                best_source[p] = (float(h[i]), list(ids[i]), name)
    t_scores = objective_matrix(target, objectives)
    ok = _usable(target, t_scores)
    h = t_scores @ w
    prompts = target.column("prompt").to_pylist()
    p_ids = target.column("prompt_ids").to_pylist()
    r_ids = target.column("response_ids").to_pylist()
    triples = []
    for p, rows in _rows_by_prompt(prompts).items():
        rows = [i for i in rows if ok[i]]
        if len(rows) < 2 or p not in best_source:
            continue
        best, worst = rows[int(np.argmax(h[rows]))], rows[int(np.argmin(h[rows]))]
        if h[best] - h[worst] <= min_margin:
            continue
        hs, ids, name = best_source[p]
        triples.append(
            PreferenceTriple(
                p,
                list(p_ids[best]),
                ids,
                list(r_ids[best]),
                list(r_ids[worst]),
                name,
                hs,
                float(h[best]),
                float(h[worst]),
            )
        )
    return triples


# ---------------------------------------------------------------------------------------------
# Tensors: batching and sequence log-probabilities


def collate_sequences(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    max_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded prompt + response batch: input_ids, attention_mask, next_ids, mask, all [B, L].

    next_ids[b, j] = input_ids[b, j + 1]; mask[b, j] = 1 where that next token is a response token, i.e.
    j in [P - 1, P + T - 2] for a prompt of P and a response of T tokens. Longer than ``max_len``: prompt
    tokens go first (from the left, at least one stays), then the response's tail.
    """
    if len(prompt_ids) != len(response_ids) or not prompt_ids:
        raise ValueError(
            f"need as many prompts as responses (> 0), got {len(prompt_ids)} and {len(response_ids)}"
        )
    seqs, spans = [], []
    for p, r in zip(prompt_ids, response_ids):
        p, r = list(p), list(r)
        if not p or not r:
            raise ValueError("every sequence needs at least one prompt token and one response token")
        if max_len is not None and len(p) + len(r) > max_len:
            keep = max(1, max_len - len(r))
            p, r = p[-keep:], r[: max_len - keep]
        seqs.append(p + r)
        spans.append((len(p), len(r)))
    B, L = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)  # [B, L]
    attention = torch.zeros((B, L), dtype=torch.long)  # [B, L]
    mask = torch.zeros((B, L), dtype=torch.float32)  # [B, L]
    for b, (s, (P, T)) in enumerate(zip(seqs, spans)):
        input_ids[b, : len(s)] = torch.tensor(s)
        attention[b, : len(s)] = 1
        mask[b, P - 1 : P + T - 1] = 1.0
    next_ids = torch.cat([input_ids[:, 1:], torch.full((B, 1), pad_id, dtype=torch.long)], dim=1)  # [B, L]
    return {"input_ids": input_ids, "attention_mask": attention, "next_ids": next_ids, "mask": mask}


def token_logps(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """log pi(next_ids[b, j] | input_ids[b, :j+1]) at every position, masked to the response: [B, L].

    The LM head and the log-softmax run only from the first position that predicts a response token
    (``logits_to_keep``): prompt positions need no [V]-sized logits, which halves the largest activation.
    """
    mask = batch["mask"]  # [B, L]
    L = mask.shape[1]
    first = int(mask.any(dim=0).nonzero()[0]) if bool(mask.any()) else 0
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=L - first
    ).logits.float()  # [B, L - first, V]
    nxt = batch["next_ids"][:, first:]  # [B, L - first]
    picked = logits.gather(-1, nxt[..., None]).squeeze(-1)  # [B, L - first]
    out = torch.zeros(mask.shape, dtype=logits.dtype, device=logits.device)  # [B, L]
    out[:, first:] = (picked - torch.logsumexp(logits, dim=-1)) * mask[:, first:]
    return out


def sequence_logps(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """log pi(y | x) = sum_t log pi(y_t | x, y<t) over the response tokens: [B]."""
    return token_logps(model, batch).sum(dim=1)


@torch.no_grad()
def reference_logps(peft_model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """log pi_ref(y | x) [B]: the same PEFT model with its adapter disabled (pi_ref = base / SFT policy)."""
    with peft_model.disable_adapter():
        return sequence_logps(peft_model, batch)


# ---------------------------------------------------------------------------------------------
# The LoRA training loop (plain, works without Ray)


@dataclass
class TrainContext:
    """What a trainer needs from its runner. The defaults are a plain single process."""

    rank: int = 0
    world_size: int = 1
    device: Any = "cpu"
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    """Wraps the trainable model for data parallelism (Ray: ``ray.train.torch.prepare_model``)."""
    on_step: Callable[[int, dict[str, float], Callable[[], dict]], None] | None = None
    """Called after every optimizer step with (step (1-based), metrics, snapshot); ``snapshot()`` returns the
    resumable state {"step", "trainable", "optimizer", "extra"}."""
    resume: dict | None = None
    """A snapshot to continue from."""
    quiet: bool = False


def build_lora_policy(cfg: Config, device: Any = "cpu"):
    """Base policy + a fresh LoRA (``cfg.lora``, as the backbones) in train mode: (PeftModel, tokenizer)."""
    from peft import LoraConfig, get_peft_model

    from mage_ray.models import load_policy

    model, tok = load_policy(cfg.model, cfg.storage.cache_dir, device=device)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    return peft_model.train(), tok


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors (the LoRA), by parameter name, detached on CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def batch_indices(
    step: int, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[int]:
    """Example indices of optimizer step ``step`` for ``rank``: the global example counter
    g = step * batch_size + k walks a fresh permutation of the n examples per epoch (seeded by (seed,
    epoch)); each rank takes its contiguous ``ceil(batch_size / world_size)`` slice of the global batch."""
    if n < 1:
        raise ValueError("no training examples")
    per_rank = max(1, math.ceil(batch_size / world_size))
    start = step * batch_size
    out = []
    for g in range(start + rank * per_rank, start + min(batch_size, (rank + 1) * per_rank)):
        epoch, pos = divmod(g, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[pos]))
    return out


StepLoss = Callable[[list[int], int], tuple[torch.Tensor, dict[str, float]]]
"""``step_loss(example indices, step (0-based)) -> (scalar loss, metrics)``."""


def fit_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    n_examples: int,
    step_loss: StepLoss,
    *,
    start_step: int,
    end_step: int,
    batch_size: int,
    seed: int,
    ctx: TrainContext,
    snapshot_extra: Callable[[], dict] | None = None,
    max_grad_norm: float = 1.0,
) -> list[dict[str, float]]:
    """Optimizer steps ``start_step .. end_step - 1`` of ``step_loss``; return the per-step metrics.

    ``model`` is the unwrapped PEFT model (its trainable tensors are what a snapshot saves); the step loss
    closes over the possibly DDP-wrapped one. Gradients are clipped to ``max_grad_norm``.
    """
    if batch_size < ctx.world_size:
        raise ValueError(f"batch_size = {batch_size} must be >= the number of workers ({ctx.world_size})")
    params = [p for p in model.parameters() if p.requires_grad]
    history = []
    for step in range(start_step, end_step):
        t0 = time.time()
        idx = batch_indices(step, n_examples, batch_size, seed, ctx.rank, ctx.world_size)
        loss, metrics = step_loss(idx, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        m = {"step": step + 1, "loss": float(loss.detach()), "grad_norm": float(grad_norm), **metrics}
        m["step_time_s"] = time.time() - t0
        history.append(m)
        if ctx.on_step is not None:

            def snapshot(step=step + 1) -> dict:
                return {
                    "step": step,
                    "trainable": trainable_state(model),
                    "optimizer": copy.deepcopy(optimizer.state_dict()),  # a copy: the live state mutates
                    "extra": snapshot_extra() if snapshot_extra is not None else {},
                }

            ctx.on_step(step + 1, m, snapshot)
        elif not ctx.quiet and ctx.rank == 0:
            print(format_progress("train", {**m, "max_steps": end_step}), flush=True)
    return history


def make_optimizer(
    model: torch.nn.Module, learning_rate: float, resume: dict | None
) -> torch.optim.Optimizer:
    """AdamW on the trainable (LoRA) tensors; restores the trainable tensors and optimizer state of
    ``resume``."""
    if resume is not None:
        model.load_state_dict(resume["trainable"], strict=False)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=learning_rate, weight_decay=0.0
    )
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
    return opt


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.generic):
        return x.item()
    return x


def save_policy_artifact(
    peft_model, out_dir: str, manifest: dict[str, Any], history: Sequence[dict[str, float]]
) -> str:
    """Write ``adapter/`` + ``manifest.json`` + ``metrics.jsonl`` to a temp dir, then publish it to
    ``out_dir``."""
    with tempfile.TemporaryDirectory(prefix=".policy-") as tmp:
        peft_model.save_pretrained(os.path.join(tmp, "adapter"), safe_serialization=True)
        Path(tmp, "metrics.jsonl").write_text(
            "".join(json.dumps({k: _jsonable(v) for k, v in h.items()}) + "\n" for h in history)
        )
        write_manifest(tmp, manifest)
        return publish_dir(tmp, out_dir)


def common_manifest(
    cfg: Config, *, kind: str, name: str, steps: int, history: Sequence[dict], t0: float, ctx: TrainContext
) -> dict[str, Any]:
    """Fields every baseline manifest carries (shared artifact format)."""
    return {
        "kind": kind,
        "name": name,
        "trainer": kind,
        "base_model": cfg.model.name_or_path,
        "steps": steps,
        "steps_done": int(history[-1]["step"]) if history else (ctx.resume or {}).get("step", 0),
        "num_processes": ctx.world_size,
        "lora": dataclasses.asdict(cfg.lora),
        "learning_rate": cfg.backbone.learning_rate,
        "final_metrics": {k: _jsonable(v) for k, v in history[-1].items()} if history else {},
        "loss_by_step": [_jsonable(h["loss"]) for h in history],
        "adapter": "adapter",
        "metrics_file": "metrics.jsonl",
        "wall_time_s": round(time.time() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "complete",
        "complete": True,
    }


# ---------------------------------------------------------------------------------------------
# Ray Train shell around any plain trainer ``train_fn(cfg, out_dir, *, ctx, **kwargs) -> manifest``


def lora_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train per-worker loop: ``train_fn`` with step reports, checkpoints every
    ``backbone.checkpoint_every`` steps and resume from ``ray.train.get_checkpoint()``.

    ``config`` keys: train_fn, cfg, kwargs, max_steps. A run that had already finished reports its artifact
    again. Every worker reports the same number of times (``ray.train.report`` is a barrier).
    """
    import ray.train
    import ray.train.torch

    from mage_ray.manifest import MANIFEST_NAME, read_json

    cfg: Config = config["cfg"]
    max_steps = int(config["max_steps"])
    every = cfg.backbone.checkpoint_every
    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    work = Path(tempfile.mkdtemp(prefix="mage-lora-"))
    try:
        resume = None
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            ckpt.to_directory(str(work / "restored"))
            final = work / "restored" / FINAL
            if (final / MANIFEST_NAME).is_file():
                report_final(final, {"finished": 1.0, "step": float(max_steps)})
                return read_json(final / MANIFEST_NAME)
            resume = torch.load(work / "restored" / STATE_FILE, weights_only=True)

        def on_step(step: int, m: dict[str, float], snapshot: Callable[[], dict]) -> None:
            if step == max_steps:  # the final report carries the artifact
                return
            metrics = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
            metrics["max_steps"] = max_steps
            if step % every == 0 and rank == 0:
                with tempfile.TemporaryDirectory(prefix="mage-lora-ckpt-") as tmp:
                    torch.save(snapshot(), os.path.join(tmp, STATE_FILE))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)

        ctx = TrainContext(
            rank=rank,
            world_size=world,
            device=ray.train.torch.get_device(),
            wrap=ray.train.torch.prepare_model if world > 1 else None,
            on_step=on_step,
            resume=resume,
            quiet=True,
        )
        out = work / "out"
        manifest = config["train_fn"](cfg, str(out), ctx=ctx, **config["kwargs"])
        if rank == 0:
            report_final(out, {"finished": 1.0, "step": float(max_steps)})
        else:
            ray.train.report({"finished": 1.0, "step": float(max_steps)})
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_lora_job(
    cfg: Config,
    train_fn: Callable[..., dict | None],
    kwargs: dict[str, Any],
    out_dir: str,
    *,
    label: str,
    kind: str,
    max_steps: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``train_fn`` as one Ray Train ``TorchTrainer`` (``backbone.num_workers`` workers with
    ``backbone.resources_per_worker``) and publish its artifact to ``out_dir``; return the manifest.

    A complete ``out_dir`` is returned as is. The Ray run is named ``<kind>--<path below run_dir>`` (stable,
    so a relaunch resumes from the last checkpoint; the kind prefix keeps it apart from a GRPO run that
    wrote the same directory).
    """
    return run_and_publish(
        lora_worker,
        {"train_fn": train_fn, "cfg": cfg, "kwargs": kwargs, "max_steps": max_steps},
        out_dir,
        cfg=cfg,
        scaling=Scaling.from_backbone(cfg.backbone),
        run_name=f"{kind}--{train_run_name(cfg, storage_abs(out_dir))}",
        label=label,
        progress=progress,
    )


def run_lora_jobs(
    cfg: Config, jobs: Sequence[dict[str, Any]], *, experiment: str, max_concurrent: int | None = None
) -> list[dict[str, Any]]:
    """Run every job (keyword arguments of :func:`run_lora_job`) whose ``out_dir`` is not complete yet, the
    pending ones concurrently as Tune trials; return all manifests in job order."""
    return run_pending(
        run_lora_job,
        jobs,
        cfg=cfg,
        scaling=Scaling.from_backbone(cfg.backbone),
        experiment=experiment,
        labels=[j["label"] for j in jobs],
        max_concurrent=max_concurrent,
    )


@dataclass
class OfflineSettings:
    """Hyper-parameters shared by the offline trainers, defaulting to the backbone section of the config."""

    steps: int
    batch_size: int
    learning_rate: float
    seed: int
    max_len: int
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(
        cls, cfg: Config, steps: int | None = None, batch_size: int | None = None
    ) -> OfflineSettings:
        """steps: ``backbone.steps``; batch: ``backbone.prompts_per_step * backbone.num_generations`` examples
        per optimizer step (as many as one GRPO step's completions); lr, seed: the backbone's."""
        b = cfg.backbone
        steps = b.steps if steps is None else int(steps)
        batch_size = b.prompts_per_step * b.num_generations if batch_size is None else int(batch_size)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return cls(steps, batch_size, b.learning_rate, b.seed, cfg.model.max_context)


def ensure_rollouts(cfg: Config, rollouts_path: str | None = None) -> str:
    """Path of the scored rollouts of the base policy. An explicit ``rollouts_path`` (a rollouts directory or
    one Parquet file) is used as is; the default ``<run_dir>/rollouts`` is generated when not complete
    (``value.rollouts_per_prompt`` samples per training prompt; Ray Data when Ray is initialised)."""
    if rollouts_path is not None:
        return rollouts_path
    from mage_ray.train.rollouts import generate_rollouts

    path = join(cfg.storage.run_dir, "rollouts")
    if not is_complete(path):
        import ray

        generate_rollouts(cfg, path, use_ray=ray.is_initialized())
    return path
