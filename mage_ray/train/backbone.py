"""Stage 1 "Seek": train one LoRA backbone on the combined reward h = w^T r with TRL GRPO or RLOO.

Backbone i of Bone Soup maximises (Eq. 11 of MAGE (arXiv 2510.03782))

    E_{x~D, y~pi(.|x)} [ w_i^T r(x, y) - eta * log(pi(y|x) / pi_sft(y|x)) ]

where r = (r_1..r_n) are the objectives and w_i is column i of B(beta) (Eq. 12, ``mage_ray.soup``). TRL's
``reward_funcs`` + ``reward_weights`` compute exactly h = sum_j w_j r_j per completion ((B*G,) rewards from
the (B*G, n) per-objective matrix), and ``beta`` is eta (``backbone.kl_coef``). The paper trains with PPO;
TRL 1.x has no PPOTrainer, so we use GRPO (group-normalised advantages, G = ``num_generations`` samples per
prompt) or RLOO (leave-one-out baseline). With PEFT the reference policy is the base with the adapter
disabled, so pi_sft costs no second copy of the weights.

``train_backbone`` is a plain function (works in a plain process, no Ray); ``mage_ray.train.ray_train``
runs the same function inside Ray Train workers. Outputs under ``out_dir``::

    adapter/        PEFT adapter (adapter_config.json + adapter_model.safetensors), written atomically
    manifest.json   name, trainer, w, beta, objectives, base model, steps done, final metrics, wall time, LoRA
    metrics.jsonl   one line per optimizer step: rewards/<objective>/mean, reward (= w^T r), kl, loss, ...
    checkpoints/    Trainer checkpoints (adapter + optimizer + scheduler + trainer state) for resuming

The reward weights' validation and the optional SFT stage (``train_sft``) are in :mod:`mage_ray.train.stage1`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mage_ray.config import Config
from mage_ray.manifest import atomic_dir, write_manifest, write_text_atomic
from mage_ray.storage import local_copy
from mage_ray.tasks.objectives import ObjectiveError
from mage_ray.train.fail_fast import RunFailed
from mage_ray.train.offline import lora_config
from mage_ray.train.stage1 import (
    check_writable,
    checkpointing_args,
    precision_args,
    validate_reward_weights,
)

__all__ = ["ObjectiveFailure", "ObjectiveReward", "train_backbone"]

log = logging.getLogger(__name__)

ONLINE_TRAINERS = ("grpo", "rloo")


class ObjectiveFailure(RunFailed):
    """An objective raised or returned a non-finite / wrongly shaped value during training."""

    def __init__(
        self, message: str, objective: str = "", sample_index: int = -1, checkpoint: str | None = None
    ):
        super().__init__(message)
        self.objective = objective
        self.sample_index = sample_index
        self.checkpoint = checkpoint


# ---------------------------------------------------------------------------------------------
# Reward functions


def _text(x: Any) -> str:
    """Plain text of a prompt/completion: a string, or chat messages (last user / assistant content)."""
    if isinstance(x, str):
        return x
    if isinstance(x, list):
        if not x:
            return ""
        msg = x[-1]
        content = msg.get("content", "") if isinstance(msg, dict) else msg
        if isinstance(content, list):  # content parts
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    return str(x)


class ObjectiveReward:
    """TRL reward function ``f(prompts, completions, **kw) -> list[float]`` around one objective.

    The objective gets plain prompt and response strings (the user prompt, not the chat-templated text). TRL logs this function as
    ``rewards/<objective name>/mean``. A failure (exception, non-finite value, wrong shape) does not raise
    inside TRL's reward loop: the batch scores NaN and the failure is recorded, and :class:`_FailureGate`
    stops every worker together at the end of the step (raising inside one data-parallel worker would leave
    the others waiting forever in the reward all-gather). The failing step is never checkpointed.
    """

    def __init__(self, objective: Callable, name: str):
        self.objective = objective
        self.__name__ = name
        self.failure: ObjectiveFailure | None = None

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        p = [_text(x) for x in prompts]
        c = [_text(x) for x in completions]
        try:
            values = np.asarray(self.objective(p, c), dtype=np.float64)
        except ObjectiveError as e:  # a registry objective: its message already names the sample
            if self.failure is None:
                self.failure = ObjectiveFailure(str(e), objective=self.__name__)
            return [math.nan] * len(p)
        except Exception as e:  # noqa: BLE001 - any objective error is reported with its first bad sample
            i = self._first_raising(p, c)
            self._fail(i, p, c, f"raised {type(e).__name__}: {e}")
            return [math.nan] * len(p)
        if values.shape != (len(p),):
            self._fail(0, p, c, f"returned shape {values.shape}, expected ({len(p)},)")
            return [math.nan] * len(p)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            i = int(bad[0])
            self._fail(i, p, c, f"returned a non-finite value {values[i]}")
            return [math.nan] * len(p)
        return values.tolist()

    def _first_raising(self, p: list[str], c: list[str]) -> int:
        """Index of the first sample that raises on its own (0 if only the whole batch fails)."""
        for i in range(len(p)):
            try:
                self.objective([p[i]], [c[i]])
            except Exception:  # noqa: BLE001
                return i
        return 0

    def _fail(self, i: int, p: list[str], c: list[str], what: str) -> None:
        if self.failure is None:
            msg = (
                f"objective '{self.__name__}' {what} on sample {i}: prompt={p[i][:200]!r} "
                f"response={c[i][:200]!r}"
            )
            self.failure = ObjectiveFailure(msg, objective=self.__name__, sample_index=i)


def _failure_gate(rewards: list[ObjectiveReward]):
    from transformers import TrainerCallback

    class _FailureGate(TrainerCallback):
        """Raise ObjectiveFailure on every worker at the end of a step in which any objective failed."""

        def on_step_end(self, args, state, control, **kwargs):
            local = next((r.failure for r in rewards if r.failure is not None), None)
            msg = str(local) if local is not None else None
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                msgs: list[str | None] = [None] * dist.get_world_size()
                dist.all_gather_object(msgs, msg)
                msg = next((m for m in msgs if m is not None), None)
            if msg is not None:
                if local is not None:
                    raise local
                raise ObjectiveFailure(f"another worker: {msg}")

    return _FailureGate()


def _step_clock():
    from transformers import TrainerCallback

    class _StepClock(TrainerCallback):
        """Wall time of each optimizer step including its logging, checkpointing and reporting callbacks:
        the gap between consecutive ``on_step_begin`` (last step: to ``on_train_end``)."""

        def __init__(self):
            self.marks: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def seconds(self) -> list[float]:
            return [round(b - a, 4) for a, b in zip(self.marks, self.marks[1:])]

    return _StepClock()


# ---------------------------------------------------------------------------------------------
# Training


def _vllm_args(b) -> dict[str, Any]:
    """TRL's vLLM fields for ``backbone.generation = vllm``: colocate (sleep mode on, so vLLM's weights and cache
    leave the GPU outside generation) or server (``trl vllm-serve`` at ``backbone.vllm_server_url``)."""
    if b.generation != "vllm":
        return {"use_vllm": False}
    if b.vllm_mode == "server":
        return {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": b.vllm_server_url}
    return {
        "use_vllm": True,
        "vllm_mode": "colocate",
        "vllm_gpu_memory_utilization": b.vllm_gpu_memory_utilization,
        "vllm_enable_sleep_mode": True,
    }


def replay_sampler_epochs(sampler: Any, epochs: int) -> None:
    """Advance a TRL ``RepeatSampler``'s generator past ``epochs`` finished epochs.

    The sampler draws one permutation of the prompts per epoch from its own ``torch.Generator`` (seeded once, never
    reseeded by epoch), and a Trainer resumed from a checkpoint skips the batches of its current epoch but not the
    permutations of the epochs before it: without this, a run resumed after its first epoch trains on the first
    epoch's prompt order again and its adapters differ from an uninterrupted run's. Drawing the same number of
    permutations again puts the generator where the uninterrupted run had it. A sampler that does not shuffle, or
    another sampler class, is left alone."""
    import torch

    generator = getattr(sampler, "generator", None)
    if generator is None or not getattr(sampler, "shuffle", False):
        return
    for _ in range(epochs):
        torch.randperm(sampler.num_samples, generator=generator)


def _resumable(trainer_cls: type) -> type:
    """``trainer_cls`` (TRL's GRPO / RLOO trainer) whose resumed runs see the prompts of an uninterrupted run
    (:func:`replay_sampler_epochs`). An uninterrupted run is unchanged: it replays 0 epochs."""

    class Resumable(trainer_cls):
        def _get_train_sampler(self, *args, **kwargs):
            self._mage_train_sampler = super()._get_train_sampler(*args, **kwargs)
            return self._mage_train_sampler

        def _init_training_state(self, *args, **kwargs):
            epochs_trained, steps_in_epoch = super()._init_training_state(*args, **kwargs)
            replay_sampler_epochs(getattr(self, "_mage_train_sampler", None), epochs_trained)
            return epochs_trained, steps_in_epoch

    Resumable.__name__ = Resumable.__qualname__ = trainer_cls.__name__
    return Resumable


def _trainer_args(cfg: Config, trainer: str, w: np.ndarray, steps: int, output_dir: Path, quiet: bool):
    """GRPOConfig / RLOOConfig for one backbone. Completions per worker and optimizer step = prompts_per_step *
    num_generations, sampled in one generate call (TRL steps_per_generation = gradient_accumulation_steps) and
    trained in ``backbone.micro_batch``-sized micro-batches (``backbone.accumulation_steps`` of them)."""
    from trl import GRPOConfig, RLOOConfig

    b = cfg.backbone
    cls = GRPOConfig if trainer == "grpo" else RLOOConfig
    return cls(
        output_dir=str(output_dir),
        max_steps=steps,
        learning_rate=b.learning_rate,
        lr_scheduler_type="constant",
        per_device_train_batch_size=b.micro_batch,  # completions per forward / backward
        gradient_accumulation_steps=b.accumulation_steps,
        steps_per_generation=b.accumulation_steps,  # one generate call per optimizer step, as without accumulation
        num_generations=b.num_generations,
        max_completion_length=b.max_completion_length,
        temperature=b.temperature,
        beta=b.kl_coef,  # eta of Eq. 11
        reward_weights=[float(x) for x in w],  # h = w^T r (Eq. 11)
        **({"multi_objective_aggregation": b.reward_aggregation} if trainer == "grpo" else {}),
        logging_steps=1,
        save_strategy="steps",
        save_steps=b.checkpoint_every,
        save_total_limit=2,
        seed=b.seed,
        **checkpointing_args(b.activation_checkpointing),
        **_vllm_args(b),
        report_to="none",
        disable_tqdm=quiet,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # only LoRA params train, all of them in every forward
        **precision_args(),
    )


def _prompt_dataset(cfg: Config, tokenizer, prompts: Sequence[str]):
    """Prompts as chat messages (TRL applies the chat template) or, without a template, rendered text.

    A prompt longer than ``task.max_prompt_tokens`` tokens keeps its last that many tokens (TRL 1.x has no
    prompt-length limit of its own); the objectives then score against the truncated prompt.
    """
    from datasets import Dataset

    from mage_ray.models import format_prompt

    if not prompts:
        raise ValueError(
            f"task '{cfg.task.name}' has no training prompts (task.n_train = {cfg.task.n_train})"
        )
    limit = cfg.task.max_prompt_tokens
    cut = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        cut.append(p if len(ids) <= limit else tokenizer.decode(ids[-limit:]))
    prompts = cut
    if cfg.model.chat_template and getattr(tokenizer, "chat_template", None):
        rows = [{"prompt": [{"role": "user", "content": p}]} for p in prompts]
    else:
        rows = [{"prompt": format_prompt(tokenizer, p, use_chat_template=False)} for p in prompts]
    return Dataset.from_list(rows)


def _objective_names(objectives: Sequence[Callable]) -> list[str]:
    names = [
        str(getattr(o, "name", None) or getattr(o, "__name__", f"objective_{i}"))
        for i, o in enumerate(objectives)
    ]
    if len(set(names)) != len(names):
        raise ValueError(f"objective names must be distinct, got {names}")
    return names


def _step_history(log_history: list[dict]) -> list[dict]:
    """Per-step training logs (entries with a combined 'reward'), JSON-safe."""
    out = []
    for e in log_history:
        if "reward" in e and "step" in e:
            out.append(
                {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in e.items()}
            )
    return out


def _read_global_step(checkpoint: str | Path | None) -> int | None:
    if checkpoint is None:
        return None
    state = Path(checkpoint) / "trainer_state.json"
    if not state.is_file():
        raise ValueError(f"resume_checkpoint = {str(checkpoint)!r} has no trainer_state.json")
    return int(json.loads(state.read_text())["global_step"])


def train_backbone(
    cfg: Config,
    w: Sequence[float],
    out_dir: str | Path,
    *,
    name: str,
    steps: int | None = None,
    objectives: Sequence[Callable] | None = None,
    prompts: Sequence[str] | None = None,
    callbacks: Sequence[Any] = (),
    resume_checkpoint: str | Path | None = None,
    quiet: bool = False,
    extra_manifest: dict[str, Any] | None = None,
    init_adapter: str | Path | None = None,
) -> dict[str, Any]:
    """Train one LoRA backbone on h = w^T r (Eq. 11); write adapter + manifest under ``out_dir``.

    Args:
        cfg: job config (model, lora, task, backbone sections are used).
        w: reward weights, length n = number of objectives, on the simplex (column of B(beta), Eq. 12).
        out_dir: local output directory (created; must be writable).
        name: backbone name recorded in the manifest (``b0``, ``mu_0.3-0.7``, ...).
        steps: optimizer steps (default ``cfg.backbone.steps``).
        objectives: callables ``obj(prompts, responses) -> (N,)`` with ``.name``; default
            ``mage_ray.tasks.objectives.load_objectives(cfg.task)``.
        prompts: training prompts; default ``mage_ray.tasks.prompts.load_prompts(cfg.task, "train")``.
        callbacks: extra ``transformers.TrainerCallback`` objects (the Ray wrapper reports through one).
        resume_checkpoint: a Trainer checkpoint dir (adapter + optimizer + scheduler + trainer_state.json).
        quiet: no per-step console output (Ray workers report through callbacks instead).
        extra_manifest: extra manifest fields (e.g. ``{"kind": "morlhf", "mu": [...]}``).
        init_adapter: a PEFT adapter directory (same LoRA shape) whose weights the new adapter starts from (warm
            start from a short beta-sweep trial); ignored when resuming from a checkpoint, which has its own.

    Returns the manifest dict (on every worker; only the main process writes files).
    Raises RewardWeightsError (bad ``w``), ValueError (unwritable ``out_dir``, unsupported trainer) before
    any training, and ObjectiveFailure when an objective fails (checkpoints already saved are kept).
    """
    t0 = time.time()
    trainer_name = cfg.backbone.trainer
    if trainer_name not in ONLINE_TRAINERS:
        raise ValueError(
            f"backbone.trainer = {trainer_name!r}: train_backbone runs the online trainers {list(ONLINE_TRAINERS)}"
        )
    if objectives is None:
        from mage_ray.tasks.objectives import load_objectives

        objectives = load_objectives(cfg.task, cfg.storage.cache_dir)
    names = _objective_names(objectives)
    w_arr = validate_reward_weights(w, len(objectives))
    steps = cfg.backbone.steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out = check_writable(out_dir)
    resumed_from = _read_global_step(resume_checkpoint)

    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from mage_ray.models import load_policy

    if prompts is None:
        from mage_ray.tasks.prompts import load_prompts

        prompts = load_prompts(cfg.task, "train")
    model, tok = load_policy(cfg.model, cfg.storage.cache_dir)
    dataset = _prompt_dataset(cfg, tok, prompts)
    rewards = [ObjectiveReward(o, n) for o, n in zip(objectives, names)]
    clock = _step_clock()
    args = _trainer_args(cfg, trainer_name, w_arr, steps, out / "checkpoints", quiet)
    if trainer_name == "grpo":
        from trl import GRPOTrainer as TrainerCls
    else:
        from trl import RLOOTrainer as TrainerCls
    trainer = _resumable(TrainerCls)(
        model=model,
        reward_funcs=list(rewards),
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=lora_config(cfg.lora),
        callbacks=[_failure_gate(rewards), clock, *callbacks],
    )
    if quiet:
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    if init_adapter is not None and resume_checkpoint is None:
        _load_adapter_weights(trainer.model, init_adapter)
    log.info(
        "backbone %s: %s on w=%s for %d steps -> %s",
        name,
        trainer_name,
        np.round(w_arr, 4).tolist(),
        steps,
        out,
    )

    manifest: dict[str, Any] = {
        "kind": "backbone",
        "name": name,
        "trainer": trainer_name,
        "w": w_arr.tolist(),
        "beta": cfg.backbone.beta,
        "kl_coef": cfg.backbone.kl_coef,
        "objectives": names,
        "base_model": cfg.model.name_or_path,
        "steps": steps,
        "resumed_from_step": resumed_from,
        "num_processes": trainer.accelerator.num_processes,
        "lora": dataclasses.asdict(cfg.lora),
        "backbone_config": dataclasses.asdict(cfg.backbone),
        "adapter": "adapter",
        "metrics_file": "metrics.jsonl",
        "init_adapter": str(init_adapter) if init_adapter is not None else None,
        **(extra_manifest or {}),
    }
    main = trainer.is_world_process_zero()
    try:
        trainer.train(resume_from_checkpoint=str(resume_checkpoint) if resume_checkpoint else None)
    except ObjectiveFailure as e:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(out / "checkpoints")) if (out / "checkpoints").is_dir() else None
        e.checkpoint = last
        e.args = (
            f"backbone '{name}' stopped at step {trainer.state.global_step}: {e}; "
            f"last checkpoint: {last or 'none saved yet'}",
        )
        if main:
            write_manifest(
                out,
                {
                    **manifest,
                    "status": "failed",
                    "error": str(e),
                    "last_checkpoint": last,
                    "failed_at_step": trainer.state.global_step,
                    "wall_time_s": time.time() - t0,
                },
            )
        raise

    history = _step_history(trainer.state.log_history)
    summary = next((e for e in reversed(trainer.state.log_history) if "train_runtime" in e), {})
    manifest.update(
        train_runtime_s=summary.get("train_runtime"),  # trainer.train() loop incl. callbacks (this process)
        step_wall_s=clock.seconds(),  # per step run in this process, callbacks (checkpoints, reports) included
        status="complete",
        steps_done=int(trainer.state.global_step),
        final_metrics=history[-1] if history else {},
        reward_by_step=[h.get("reward") for h in history],
        wall_time_s=round(time.time() - t0, 3),
        started_at=t0,  # epoch seconds (this process; a resumed run counts from its restart)
        finished_at=time.time(),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    if main:
        with atomic_dir(out / "adapter") as tmp:
            trainer.model.save_pretrained(tmp, safe_serialization=True)
        _write_jsonl(out / "metrics.jsonl", history)
        write_manifest(out, manifest)
    return manifest


def _load_adapter_weights(model, adapter_dir: str | Path) -> None:
    """Copy a saved adapter's LoRA weights (safetensors) into the trainer's PEFT model; every key must match."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = local_copy(adapter_dir) / "adapter_model.safetensors"  # a URI (the sweep's trial): its local copy
    if not path.is_file():
        raise ValueError(f"init_adapter = {str(adapter_dir)!r} has no adapter_model.safetensors")
    try:
        result = set_peft_model_state_dict(model, load_file(str(path)))
    except RuntimeError as e:  # shape mismatch (another LoRA rank or target set)
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise ValueError(
            f"init_adapter = {str(adapter_dir)!r} does not fit this LoRA config: {first[0].strip()}"
        ) from None
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing or getattr(result, "unexpected_keys", []):
        raise ValueError(
            f"init_adapter = {str(adapter_dir)!r} does not match the LoRA config: missing {missing[:3]}, "
            f"unexpected {list(getattr(result, 'unexpected_keys', []))[:3]}"
        )


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
