"""The one offline training loop: every LoRA trainer on a fixed data set (values, RiC, MODPO, WRPO, ARMs, PARM).

A trainer is a plain function ``train_x(cfg, out_dir, *, ctx, ...) -> manifest`` driven by a
:class:`~mage_ray.train.ray_shell.TrainContext` (rank, world size, device, DDP wrapper, step hook, resume
state). It builds its data, calls :func:`prepare` (seed, model, AdamW, resume, DDP wrapper) and
:func:`fit_steps` with its own step loss, and writes its artifact on rank 0. What they share:

* **Settings.** :class:`OfflineSettings`: steps, batch size, learning rate, seed, maximum length.
* **Model.** :func:`lora_config` (the one LoRA config of policies, backbones and value models),
  :func:`build_lora_policy`, :func:`pad_id`, :func:`trainable_state` (what a snapshot and a resume hold).
* **Loop.** :func:`prepare` and :func:`fit_steps` (AdamW steps over a seeded per-epoch permutation, the
  global batch sliced by rank (:func:`batch_indices`), optional gradient clipping, a per-step hook that can
  snapshot the run); :func:`token_logps` / :func:`sequence_logps` (sum_t log pi(y_t | x, y<t), shape [B]) and
  :func:`reference_logps` (pi_ref = the same PEFT model with its adapter disabled: no second copy of the
  weights), :class:`ReferenceCache` (each example's pi_ref log-probs once, for MODPO and WRPO).
* **Saving.** :func:`save_policy_artifact` (``adapter/`` + ``manifest.json`` + ``metrics.jsonl``, published
  atomically), :func:`common_manifest`.
* **Ray.** :func:`run_lora_job` (one Ray Train run of :func:`mage_ray.train.ray_shell.step_worker`, published
  to its artifact dir) and :func:`run_lora_jobs` (several, concurrently as Tune trials).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mage_ray.config import Config
from mage_ray.config import LoraConfig as LoraSettings
from mage_ray.manifest import publish_dir, scratch_dir, write_manifest
from mage_ray.train.ray_shell import (
    Scaling,
    TrainContext,
    format_progress,
    run_and_publish,
    run_pending,
    step_worker,
    storage_abs,
    train_run_name,
)

__all__ = [
    "OfflineSettings",
    "ReferenceCache",
    "Trainable",
    "batch_indices",
    "build_lora_policy",
    "checkpointing_on",
    "common_manifest",
    "enable_checkpointing",
    "fit_steps",
    "lora_config",
    "pad_id",
    "prepare",
    "reference_logps",
    "run_lora_job",
    "run_lora_jobs",
    "save_policy_artifact",
    "sequence_logps",
    "token_logps",
    "trainable_state",
]


@dataclass
class OfflineSettings:
    """Hyper-parameters of one offline run: the backbone section of the config for the policy trainers
    (:meth:`from_config`), the value section for the value models (:meth:`from_value`)."""

    steps: int
    """Last optimizer step (exclusive): the run trains steps ``start .. steps - 1``."""
    batch_size: int
    """Examples per optimizer step, over all workers."""
    learning_rate: float
    seed: int
    """Seeds the model's initialisation and the per-epoch example order."""
    max_len: int | None
    """Longest prompt + response in tokens (``model.max_context``); longer ones are cut."""

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

    @classmethod
    def from_value(cls, cfg: Config, steps: int | None = None) -> OfflineSettings:
        """The value models' settings: ``value.steps`` (or ``steps``), batch size, lr and seed."""
        v = cfg.value
        steps = v.steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        return cls(steps, v.batch_size, v.learning_rate, v.seed, cfg.model.max_context)


# ---------------------------------------------------------------------------------------------
# Model


def lora_config(lora: LoraSettings, *, r: int | None = None, alpha: float | None = None):
    """The PEFT ``LoraConfig`` of the config's ``lora`` section (target modules, dropout; no bias, causal LM),
    with rank ``r`` and ``alpha`` in place of its own when given (the value models use ``value.lora_r`` and
    ``value.lora_alpha``)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r if r is None else r,
        lora_alpha=lora.lora_alpha if alpha is None else alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_lora_policy(cfg: Config, device: Any = "cpu"):
    """Base policy + a fresh LoRA (``cfg.lora``, as the backbones) in train mode: (PeftModel, tokenizer)."""
    from peft import get_peft_model

    from mage_ray.models import load_policy

    model, tok = load_policy(cfg.model, cfg.storage.cache_dir, device=device)
    peft_model = get_peft_model(model, lora_config(cfg.lora))
    return peft_model.train(), tok


def pad_id(tok) -> int:
    """The tokenizer's pad id, else its EOS id."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors (LoRA, and a value head), by parameter name, detached on CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# The loop (plain, works without Ray)


@dataclass
class Trainable:
    """A model ready for :func:`fit_steps`: seeded, built, resumed, wrapped, with its optimizer."""

    model: torch.nn.Module
    """The unwrapped model: its trainable tensors are what snapshots and artifacts hold."""
    forward: torch.nn.Module
    """``ctx.wrap(model)`` (DDP with several Ray workers), else ``model``: what a step loss runs."""
    optimizer: torch.optim.Optimizer
    tokenizer: Any
    pad_id: int
    start_step: int
    """The first step to run: 0, or the step of the resumed snapshot."""


def checkpointing_on(setting: bool | None) -> bool:
    """Whether a trainer in this process recomputes activations: the config's setting (``backbone`` /
    ``value.activation_checkpointing``), or with None, on where CUDA is visible (a GPU worker), off on CPU."""
    return torch.cuda.is_available() if setting is None else bool(setting)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of the HF model inside ``model`` (a PEFT model, a value net, a
    PBLoRA-adapted model): each decoder layer keeps only its input and is recomputed in the backward."""
    from transformers import PreTrainedModel

    hf = next(m for m in model.modules() if isinstance(m, PreTrainedModel))
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):  # recent transformers 5; the older name warns there
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare(
    build: Callable[[Any], tuple[torch.nn.Module, Any]],
    *,
    seed: int,
    learning_rate: float,
    ctx: TrainContext,
    checkpointing: bool | None = None,
) -> Trainable:
    """``torch.manual_seed(seed)``, ``build(ctx.device) -> (model, tokenizer)``, activation checkpointing
    (``checkpointing``: the config's ``activation_checkpointing``; None = on where CUDA is visible), AdamW on the
    trainable tensors (both restored from ``ctx.resume``), then the data-parallel wrapper ``ctx.wrap``."""
    torch.manual_seed(seed)
    model, tok = build(ctx.device)
    if checkpointing_on(checkpointing):
        enable_checkpointing(model)
    resume = ctx.resume
    if resume is not None:
        model.load_state_dict(resume["trainable"], strict=False)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=learning_rate, weight_decay=0.0
    )
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
    forward = ctx.wrap(model) if ctx.wrap is not None else model
    return Trainable(model, forward, opt, tok, pad_id(tok), int(resume["step"]) if resume is not None else 0)


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
    t: Trainable,
    n_examples: int,
    step_loss: StepLoss,
    s: OfflineSettings,
    ctx: TrainContext,
    *,
    start_step: int | None = None,
    snapshot_extra: Callable[[], dict] | None = None,
    max_grad_norm: float | None = 1.0,
    label: str = "train",
    micro_batch: int | None = None,
) -> list[dict[str, float]]:
    """Optimizer steps ``start_step`` (default ``t.start_step``) .. ``s.steps - 1`` of ``step_loss`` on batches
    of ``s.batch_size`` examples (:func:`batch_indices` with ``s.seed``); return the per-step metrics {step,
    loss, [grad_norm], **step metrics, step_time_s}.

    ``micro_batch``: a rank's examples go through ``step_loss`` in chunks of at most this many, each loss weighted
    by its share of the rank's examples and back-propagated at once (gradients accumulate; data-parallel
    gradients sync on the last chunk only). That equals the one-batch gradient for a loss that is a mean over
    examples (value models, ARMs, MODPO, WRPO); the step's metrics are the chunks' example-weighted means. None
    (or a chunk as large as the batch): one ``step_loss`` call, as without it.

    Gradients are clipped to ``max_grad_norm`` (None: not clipped). After each step ``ctx.on_step`` gets the
    metrics and a snapshot function; without one, rank 0 prints a progress line about ten times a run
    (unless ``ctx.quiet``).
    """
    if s.batch_size < ctx.world_size:
        raise ValueError(f"batch_size = {s.batch_size} must be >= the number of workers ({ctx.world_size})")
    params = [p for p in t.model.parameters() if p.requires_grad]
    every = max(1, s.steps // 10)
    history = []
    for step in range(t.start_step if start_step is None else start_step, s.steps):
        t0 = time.time()
        idx = batch_indices(step, n_examples, s.batch_size, s.seed, ctx.rank, ctx.world_size)
        if micro_batch is None or len(idx) <= micro_batch:
            loss, metrics = step_loss(idx, step)
            t.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        else:
            t.optimizer.zero_grad(set_to_none=True)
            loss, metrics = _accumulate(t, idx, step, step_loss, micro_batch)
        m: dict[str, float] = {"step": step + 1, "loss": float(loss.detach())}
        if max_grad_norm is not None:
            m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        t.optimizer.step()
        m.update(metrics)
        m["step_time_s"] = time.time() - t0
        history.append(m)
        if ctx.on_step is not None:

            def snapshot(step=step + 1) -> dict:
                return {
                    "step": step,
                    "trainable": trainable_state(t.model),
                    "optimizer": copy.deepcopy(t.optimizer.state_dict()),  # a copy: the live state mutates
                    "extra": snapshot_extra() if snapshot_extra is not None else {},
                }

            ctx.on_step(step + 1, m, snapshot)
        elif not ctx.quiet and ctx.rank == 0 and ((step + 1) % every == 0 or step + 1 == s.steps):
            print(format_progress(label, {**m, "max_steps": s.steps}), flush=True)
    return history


def _accumulate(
    t: Trainable, idx: list[int], step: int, step_loss: StepLoss, micro_batch: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """Back-propagate ``step_loss`` over ``idx`` in chunks of ``micro_batch``, each weighted by len(chunk) /
    len(idx); return the weighted loss (detached) and the example-weighted mean of the chunks' metrics."""
    chunks = [idx[k : k + micro_batch] for k in range(0, len(idx), micro_batch)]
    total = torch.zeros(())
    sums: dict[str, float] = {}
    no_sync = getattr(t.forward, "no_sync", None)  # DDP: all-reduce once, on the last chunk
    for i, chunk in enumerate(chunks):
        share = len(chunk) / len(idx)
        last = i == len(chunks) - 1
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            loss, metrics = step_loss(chunk, step)
            (loss * share).backward()
        total = total + loss.detach().cpu() * share
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * share
    return total, sums


# ---------------------------------------------------------------------------------------------
# Log-probabilities


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


class ReferenceCache:
    """log pi_ref of each example's k sequences, computed once per example (pi_ref is fixed), for the DPO-style
    trainers (MODPO: chosen, rejected; WRPO: source, chosen, rejected).

    ``batch_of(idx)`` must collate the k sequences of the examples ``idx`` in k blocks of ``len(idx)`` rows (the
    first sequence of every example, then the second, ...)."""

    def __init__(self, model, batch_of: Callable[[list[int]], Mapping[str, torch.Tensor]], k: int):
        self.model, self.batch_of, self.k = model, batch_of, k
        self._cache: dict[int, tuple[float, ...]] = {}

    def __call__(self, idx: Sequence[int], device: Any) -> torch.Tensor:
        """[len(idx), k] reference log-probs of the examples ``idx`` (float32 on ``device``)."""
        todo = [i for i in idx if i not in self._cache]
        if todo:
            ref = reference_logps(self.model, self.batch_of(todo)).cpu().reshape(self.k, len(todo))  # [k, b']
            for j, i in enumerate(todo):
                self._cache[i] = tuple(float(v) for v in ref[:, j])
        return torch.tensor([self._cache[i] for i in idx], device=device)


# ---------------------------------------------------------------------------------------------
# Saving


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.generic):
        return x.item()
    return x


def save_policy_artifact(
    peft_model,
    out_dir: str,
    manifest: dict[str, Any],
    history: Sequence[dict[str, float]],
    *,
    summary: str = "",
    quiet: bool = False,
    save_model: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Write ``adapter/`` + ``manifest.json`` + ``metrics.jsonl`` to a temp dir, then publish it to
    ``out_dir``; print ``<summary> -> <out_dir>`` unless ``quiet``; return the manifest.

    ``save_model(tmp_dir)`` writes the model instead of ``peft_model.save_pretrained(<tmp_dir>/adapter)``
    (PARM's PBLoRA, which is no PEFT model, writes ``pblora/``)."""
    with scratch_dir("mage-policy") as tmp:
        if save_model is None:
            peft_model.save_pretrained(os.path.join(tmp, "adapter"), safe_serialization=True)
        else:
            save_model(str(tmp))
        Path(tmp, "metrics.jsonl").write_text(
            "".join(json.dumps({k: _jsonable(v) for k, v in h.items()}) + "\n" for h in history)
        )
        write_manifest(tmp, manifest)
        publish_dir(tmp, out_dir)
    if summary and not quiet:
        print(f"{summary} -> {out_dir}")
    return manifest


def common_manifest(
    cfg: Config,
    s: OfflineSettings,
    *,
    kind: str,
    name: str,
    objectives: Sequence[str],
    steps: int,
    history: Sequence[dict],
    t0: float,
    ctx: TrainContext,
) -> dict[str, Any]:
    """Fields every baseline manifest carries (shared artifact format)."""
    return {
        "kind": kind,
        "name": name,
        "trainer": kind,
        "base_model": cfg.model.name_or_path,
        "objectives": list(objectives),
        "steps": steps,
        "steps_done": int(history[-1]["step"]) if history else (ctx.resume or {}).get("step", 0),
        "num_processes": ctx.world_size,
        "lora": dataclasses.asdict(cfg.lora),
        "learning_rate": s.learning_rate,
        "batch_size": s.batch_size,
        "seed": s.seed,
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
# Ray: the one step worker of ray_shell, as one run or several


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
    every = cfg.backbone.checkpoint_every
    return run_and_publish(
        step_worker,
        {
            "train_fn": train_fn,
            "cfg": cfg,
            "kwargs": kwargs,
            "max_steps": max_steps,
            "checkpoint_every": every,
        },
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
