"""The memory plan of a config: per pipeline stage, the peak memory of one worker / replica, the GPUs the stage
holds at once, and a GPU-hours estimate. ``mage-ray plan`` prints it; :func:`mage_ray.preflight.check` refuses a
config whose plan does not fit ``plan.gpu_memory_gib`` before Ray starts; the rollout sampler and the value-model
trainer size their chunks with :func:`rollout_prompts_per_call` and :func:`value_micro_batch`.

Each stage is one :class:`StageRow`: what runs there (a GRPO worker, a decode engine, ...), its memory terms
(:mod:`mage_ray.memory_plan`: weights, LoRA + AdamW, activations, KV cache, value heads, reward models), the
largest of its phases (GRPO: generation or the training micro-batch), the config field to lower when it does not
fit, and the time: steps x seconds per step. A second is measured only when given (``--step-seconds
stage=S``); otherwise it is :data:`ASSUMED`'s roofline on an H100 and the row says "assumed".

Batch decode stages (sweep trials, the beta trials' validation, evaluation) run on ``decode.num_gpus`` GPUs each and
hold the reward models when ``task.reward_device`` is cuda (they score what they decode); so does a Serve replica.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mage_ray.config import Config
from mage_ray.guidance import REGISTRY, AdapterLayout, PlanArgs, groups_for, method_spec, stages_for
from mage_ray.memory_plan import (
    DTYPE_BYTES,
    GIB,
    KNOWN_SHAPES,
    REWARD_MODEL_PARAMS,
    ModelShape,
    activation_bytes,
    adamw_bytes,
    fit_count,
    gib,
    kv_bytes_per_token,
    kv_cache_bytes,
    lora_module_dims,
    lora_params,
    pblora_params,
    prefill_bytes,
    safetensors_params,
    shape_from_config,
)
from mage_ray.soup import preference_grid
from mage_ray.tasks.hf_rewards import PAPER_REWARD_MODELS, parse_hf_name

__all__ = [
    "ASSUMED",
    "Plan",
    "StageRow",
    "Term",
    "first_misfit",
    "gpu_budget",
    "largest_fitting",
    "model_shape",
    "plan_config",
    "rollout_prompts_per_call",
    "value_micro_batch",
]

ASSUMED = {
    "gpu": "H100 SXM 80GB",
    "peak_flops": 989e12,  # dense bf16 tensor-core FLOP/s
    "mfu": 0.35,  # share of it a LoRA training step reaches
    "hbm_bytes_per_s": 3.35e12,
    "hbm_util": 0.6,  # share of the bandwidth a decode step reaches
    "hf_generate_step_s": 0.030,  # floor of one transformers generate step (kernel launches, 7B, batch <= 64)
    "engine_step_s": 0.040,  # floor of one mage_ray decode-engine step (per-row LoRA mixing, Python per token)
    "vllm_sync_s": 1.0,  # TRL pushing the merged policy into vLLM once per step
}
"""The time model when no measured step time is given: training steps at ``mfu`` of ``peak_flops`` (2 FLOP per
parameter and token forward, 2 backward for the inputs, 2 more to recompute with checkpointing, 2 for GRPO's
reference forward); a decode step reads the weights and the KV cache at ``hbm_util`` of the bandwidth, but takes
at least the launch-bound floor. Assumptions, not measurements: bench/gpu_check.py measures the engine."""

LOGITS_BYTES_GRPO = 8
"""Bytes per completion position and vocabulary entry in TRL's GRPO loss: the bf16 logits, their temperature-
scaled copy, the log-softmax output kept for the backward, and its gradient (an allowance, not measured)."""
LOGITS_BYTES_OFFLINE = 10
"""The same for :func:`mage_ray.train.offline.token_logps`: bf16 logits, their float32 copy (kept for the
backward) and its float32 gradient."""


@dataclass
class Term:
    name: str
    bytes: float
    note: str = ""


@dataclass
class StageRow:
    """One stage: the peak memory of one of its workers / replicas, its GPUs, its time."""

    stage: str
    worker: str
    """What one worker or replica is."""
    gpu: bool
    gpus_per_worker: float
    workers: int
    """Workers / replicas of the stage at once (all of its concurrent runs)."""
    resident: list[Term]
    transient: list[Term]
    """The largest phase's terms (``phase`` names it)."""
    phase: str
    knob: str
    """The config field to lower when the stage does not fit."""
    steps: float = 0.0
    step_s: float = 0.0
    time_source: str = "assumed"
    gpu_hours: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return sum(t.bytes for t in self.resident) + sum(t.bytes for t in self.transient)

    @property
    def per_gpu(self) -> float:
        """Peak on one GPU: workers of a fractional GPU share it (no sharding across GPUs: no FSDP here)."""
        share = max(1, math.floor(1 / self.gpus_per_worker + 1e-9)) if 0 < self.gpus_per_worker < 1 else 1
        return self.peak * share

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker if self.gpu else 0.0

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "worker": self.worker,
            "device": "gpu" if self.gpu else "cpu",
            "gpus_per_worker": self.gpus_per_worker,
            "workers": self.workers,
            "gpus": self.gpus,
            "peak_gib": round(gib(self.peak), 3),
            "per_gpu_gib": round(gib(self.per_gpu), 3),
            "phase": self.phase,
            "terms_gib": {t.name: round(gib(t.bytes), 3) for t in self.resident + self.transient},
            "term_notes": {t.name: t.note for t in self.resident + self.transient if t.note},
            "knob": self.knob,
            "steps": self.steps,
            "step_s": round(self.step_s, 3),
            "time_source": self.time_source,
            "gpu_hours": round(self.gpu_hours, 2),
            "notes": self.notes,
        }


@dataclass
class Plan:
    rows: list[StageRow]
    model: str
    shape: ModelShape | None
    gpu_memory_gib: float
    reserve_gib: float
    notes: list[str] = field(default_factory=list)

    def fits(self, row: StageRow) -> bool | None:
        """None when no GPU memory is declared or the row runs on CPU."""
        if not self.gpu_memory_gib or not row.gpu:
            return None
        return row.per_gpu <= (self.gpu_memory_gib - self.reserve_gib) * GIB

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "shape": None if self.shape is None else {**self.shape.__dict__, "params": self.shape.params},
            "gpu_memory_gib": self.gpu_memory_gib,
            "reserve_gib": self.reserve_gib,
            "assumed": ASSUMED,
            "stages": [{**r.to_dict(), "fits": self.fits(r)} for r in self.rows],
            "gpu_hours": round(sum(r.gpu_hours for r in self.rows), 1),
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------------------------
# Model shapes: a local config.json, the HF cache, or the table


def model_shape(name_or_path: str) -> ModelShape | None:
    """The policy's shape from a local directory's config.json, the local HF cache's, or :data:`KNOWN_SHAPES`;
    None when none of them knows it (nothing is downloaded)."""
    if name_or_path.partition(":")[0] == "tiny-random":
        return KNOWN_SHAPES["tiny-random"]
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return shape_from_config(json.loads((path / "config.json").read_text()), str(path / "config.json"))
    cached = _hub_cached(name_or_path, "config.json")
    if cached is not None:
        return shape_from_config(json.loads(Path(cached).read_text()), cached)
    known = KNOWN_SHAPES.get(name_or_path)
    return None if known is None else ModelShape(**{**known.__dict__, "source": f"table: {name_or_path}"})


def _hub_cached(repo_id: str, filename: str) -> str | None:
    if name_is_local(repo_id) or ":" in repo_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001 - not a hub id, no cache: unknown
        return None
    return hit if isinstance(hit, str) else None


def name_is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def reward_model_params(objective: str) -> tuple[str, int | None] | None:
    """(model, parameter count or None when unknown) of a reward-model objective; None for other objectives."""
    if objective.startswith("hf:"):
        model = parse_hf_name(objective).model
    elif objective in PAPER_REWARD_MODELS:
        model = PAPER_REWARD_MODELS[objective].model
    else:
        return None
    local = Path(model).expanduser()
    if local.is_dir():
        return model, safetensors_params(local)
    if model in REWARD_MODEL_PARAMS:
        return model, REWARD_MODEL_PARAMS[model][0]
    cached = _hub_cached(model, "model.safetensors")
    return model, (safetensors_params(Path(cached).parent) if cached else None)


# ---------------------------------------------------------------------------------------------
# Building blocks


def _gpus_per_worker(use_gpu: bool, resources: dict) -> float:
    return float(resources.get("GPU", 1.0)) if use_gpu else 0.0


def decode_gpus(cfg: Config) -> float:
    """GPUs of one batch decode worker (sweep trials, the beta trials' validation, evaluation): ``decode.num_gpus``."""
    return float(cfg.decode.num_gpus)


def _scoring_terms(cfg: Config, on_gpu: bool) -> list[Term]:
    """The reward models a decode worker or Serve replica loads to score (``task.reward_device`` cuda, on a GPU)."""
    return _reward_terms(cfg)[0] if on_gpu and cfg.task.reward_device.startswith("cuda") else []


def _checkpointing(setting: bool | None, gpu: bool) -> bool:
    return gpu if setting is None else setting


def _reward_terms(cfg: Config) -> tuple[list[Term], list[str]]:
    """The reward models the objectives load on ``task.reward_device`` (float32), and notes on unknown ones."""
    terms, notes = [], []
    for o in cfg.task.objectives:
        rm = reward_model_params(o)
        if rm is None:
            continue
        model, params = rm
        if params is None:
            notes.append(
                f"reward model {model!r}: size unknown here (not local, not in the HF cache or the table)"
            )
            continue
        terms.append(Term(f"reward model {o}", params * 4, f"{model}, {params / 1e6:.0f}M params, float32"))
    return terms, notes


def _decode_step_s(weights: float, kv: float, floor: float) -> float:
    return max(floor, (weights + kv) / (ASSUMED["hbm_bytes_per_s"] * ASSUMED["hbm_util"]))


def _train_s(params: int, tokens: int, flop_per_param_token: int) -> float:
    return flop_per_param_token * params * tokens / (ASSUMED["peak_flops"] * ASSUMED["mfu"])


class _Ctx:
    """What every row builder reads: the config, the policy shape, dtype sizes, token counts, the GPU budget."""

    def __init__(self, cfg: Config, shape: ModelShape, measured: dict[str, float]):
        self.cfg, self.shape, self.measured = cfg, shape, measured
        self.act = DTYPE_BYTES[cfg.model.dtype]
        self.n = cfg.n_objectives
        self.targets = list(cfg.lora.target_modules)
        self.prompt = min(cfg.task.max_prompt_tokens, cfg.model.max_context)
        self.weights = shape.params * self.act
        self.budget = (
            (cfg.plan.gpu_memory_gib - cfg.plan.reserve_gib) * GIB if cfg.plan.gpu_memory_gib else None
        )

    def lora_state(self, r: int, label: str = "LoRA + AdamW") -> Term:
        p = lora_params(self.shape, r, self.targets)
        tensors = 2 * len(set(self.targets)) * self.shape.layers
        return Term(label, adamw_bytes(p, tensors), f"{p / 1e6:.1f}M float32 params: param, grad, 2 moments")

    def timed(self, row: StageRow, steps: float, assumed_s: float, units: float) -> StageRow:
        """Fill the time fields: ``steps`` x seconds per step x ``units`` (GPUs busy per step, or 1)."""
        measured = self.measured.get(row.stage)
        row.steps, row.step_s = steps, measured if measured is not None else assumed_s
        row.time_source = "measured" if measured is not None else "assumed"
        row.gpu_hours = steps * row.step_s * units / 3600 if row.gpu else 0.0
        return row


# ---------------------------------------------------------------------------------------------
# Training rows


def _grpo_row(c: _Ctx, stage: str, runs: int, steps: float) -> StageRow:
    """One GRPO / RLOO worker: policy + LoRA state + reward models, then the larger of generation and training."""
    b = c.cfg.backbone
    gpu = b.use_gpu
    comp, per_step, micro = b.max_completion_length, b.prompts_per_step * b.num_generations, b.micro_batch
    tokens = c.prompt + comp
    rewards, notes = _reward_terms(c.cfg) if c.cfg.task.reward_device.startswith("cuda") else ([], [])
    resident = [
        Term("weights", c.weights, f"{c.shape.params / 1e9:.2f}B x {c.act} B"),
        c.lora_state(c.cfg.lora.r),
    ]
    resident += rewards
    if b.generation == "vllm" and b.vllm_mode == "colocate":
        total = c.cfg.plan.gpu_memory_gib * GIB
        gen = [
            Term("vLLM engine", b.vllm_gpu_memory_utilization * total, "colocate: utilisation x GPU memory")
        ]
        notes.append("vLLM sleeps (level 2: weights and cache released) outside generation")
        if not total:
            notes.append("vLLM's share unknown without plan.gpu_memory_gib")
        else:  # vLLM holds its own copy of the weights in its share; the rest is its KV cache (paged)
            room, need = (
                b.vllm_gpu_memory_utilization * total - c.weights,
                kv_cache_bytes(c.shape, per_step, tokens, c.act),
            )
            notes.append(
                f"vLLM's KV cache room {gib(max(room, 0)):.1f} GiB for the step's {gib(need):.1f} GiB"
                + (
                    ""
                    if room >= need
                    else ": fewer sequences at once (slower), raise backbone.vllm_gpu_memory_utilization"
                )
            )
    elif b.generation == "vllm":
        gen = []
        notes.append(f"vLLM server at {b.vllm_server_url} on its own GPUs (not counted here)")
    else:
        gen = [
            Term(
                "KV cache",
                kv_cache_bytes(c.shape, per_step, tokens, c.act),
                f"{per_step} seqs x {tokens} tokens",
            ),
            Term("prefill", prefill_bytes(c.shape, per_step, c.prompt, c.act)),
        ]
    ckpt = _checkpointing(b.activation_checkpointing, gpu)
    act = activation_bytes(
        c.shape,
        micro * tokens,
        checkpointing=ckpt,
        act_bytes=c.act,
        lora_r=c.cfg.lora.r,
        targets=c.targets,
        lora_in_bytes=c.act if gpu else 4,  # the Trainer's bf16 autocast on GPUs
        dropout=c.cfg.lora.dropout > 0,
    )
    train = [
        Term(
            "activations",
            act["peak"],
            f"{micro} seqs x {tokens} tokens, checkpointing {'on' if ckpt else 'off'}",
        ),
        Term("logits", micro * comp * c.shape.vocab * LOGITS_BYTES_GRPO),
    ]
    phase, transient = (
        ("generation", gen)
        if sum(t.bytes for t in gen) > sum(t.bytes for t in train)
        else (
            "training",
            train,
        )
    )
    knob = "backbone.per_device_train_batch_size" if phase == "training" else "backbone.prompts_per_step"
    if b.generation == "vllm" and b.vllm_mode == "colocate" and phase == "generation":
        knob = "backbone.vllm_gpu_memory_utilization"
    gpw = _gpus_per_worker(gpu, b.resources_per_worker)
    row = StageRow(
        stage, f"{b.trainer.upper()} worker", gpu, gpw, runs * b.num_workers, resident, transient, phase, knob
    )
    row.notes = notes + [f"micro-batch {micro} x {b.accumulation_steps} accumulation steps"]
    vllm = b.generation == "vllm"
    floor = 0.0 if vllm else ASSUMED["hf_generate_step_s"]
    gen_s = comp * _decode_step_s(c.weights, kv_cache_bytes(c.shape, per_step, tokens, c.act) / 2, floor)
    gen_s += ASSUMED["vllm_sync_s"] if vllm else 0.0
    k = (
        6 + (2 if ckpt else 0) + (2 if vllm else 0)
    )  # fwd, bwd, reference fwd, recompute, old log-probs (vLLM IS)
    return c.timed(
        row, steps, gen_s + _train_s(c.shape.params, per_step * tokens, k), runs * b.num_workers * gpw
    )


def _offline_row(
    c: _Ctx,
    stage: str,
    worker: str,
    *,
    runs: int,
    steps: float,
    seqs: int,
    trainable: Term,
    knob: str,
    r: int,
) -> StageRow:
    """An offline LoRA trainer's worker (:mod:`mage_ray.train.offline`: no autocast, float32 LoRA inputs):
    ``seqs`` sequences of prompt + rollout tokens per step and rank, log-probs over the response positions; ``r``:
    the adapter's rank (PBLoRA: r1 + r2)."""
    b = c.cfg.backbone
    gpu = b.use_gpu
    resp = c.cfg.value.rollout_max_tokens
    tokens = c.prompt + resp
    ckpt = _checkpointing(b.activation_checkpointing, gpu)
    act = activation_bytes(
        c.shape,
        seqs * tokens,
        checkpointing=ckpt,
        act_bytes=c.act,
        lora_r=r,
        targets=c.targets,
        lora_in_bytes=4,
        dropout=c.cfg.lora.dropout > 0,
    )
    transient = [
        Term(
            "activations",
            act["peak"],
            f"{seqs} seqs x {tokens} tokens, checkpointing {'on' if ckpt else 'off'}",
        ),
        Term("logits", seqs * resp * c.shape.vocab * LOGITS_BYTES_OFFLINE),
    ]
    gpw = _gpus_per_worker(gpu, b.resources_per_worker)
    resident = [Term("weights", c.weights), trainable]
    row = StageRow(stage, worker, gpu, gpw, runs * b.num_workers, resident, transient, "training", knob)
    k = 4 + (2 if ckpt else 0)
    return c.timed(row, steps, _train_s(c.shape.params, seqs * tokens, k), runs * b.num_workers * gpw)


def _value_row(c: _Ctx) -> StageRow:
    v = c.cfg.value
    gpu = v.use_gpu
    tokens = c.prompt + v.rollout_max_tokens
    per_rank = math.ceil(v.batch_size / v.num_workers)
    head = c.shape.vocab * c.shape.hidden + c.shape.vocab
    resident = [
        Term("weights", c.weights),
        c.lora_state(v.lora_r),
        Term("value head + AdamW", adamw_bytes(head, 2), f"[{c.shape.vocab}, {c.shape.hidden}] float32"),
    ]
    micro = value_micro_batch(c.cfg, c.shape, c.budget) if gpu else per_rank
    ckpt = _checkpointing(v.activation_checkpointing, gpu)
    act = activation_bytes(
        c.shape,
        micro * tokens,
        checkpointing=ckpt,
        act_bytes=c.act,
        lora_r=v.lora_r,
        targets=c.targets,
        lora_in_bytes=4,
        dropout=c.cfg.lora.dropout > 0,
    )
    transient = [
        Term(
            "activations",
            act["peak"],
            f"{micro} seqs x {tokens} tokens, checkpointing {'on' if ckpt else 'off'}",
        ),
        Term(
            "value gather",
            micro * tokens * c.shape.hidden * 12,
            "h in float32, W[y_t] rows and their gradient",
        ),
    ]
    gpw = _gpus_per_worker(gpu, v.resources_per_worker)
    row = StageRow(
        "values",
        "value-model worker",
        gpu,
        gpw,
        c.n * v.num_workers,
        resident,
        transient,
        "training",
        "task.max_prompt_tokens" if gpu else "value.batch_size",  # GPU: the micro-batch already shrank to fit
    )
    row.notes.append(f"{per_rank} sequences per worker and step in micro-batches of {micro}")
    k = 4 + (2 if ckpt else 0)
    return c.timed(row, v.steps, _train_s(c.shape.params, per_rank * tokens, k), c.n * v.num_workers * gpw)


# ---------------------------------------------------------------------------------------------
# Sampling and decoding rows


def _rollout_rows(c: _Ctx) -> list[StageRow]:
    v = c.cfg.value
    gpu = v.use_gpu
    tokens = c.prompt + v.rollout_max_tokens
    chunk = rollout_prompts_per_call(c.cfg, c.shape, c.budget) if gpu else v.rollout_batch_size
    seqs = chunk * v.rollouts_per_prompt
    transient = [
        Term("KV cache", kv_cache_bytes(c.shape, seqs, tokens, c.act), f"{seqs} seqs x {tokens} tokens"),
        Term("prefill", prefill_bytes(c.shape, seqs, c.prompt, c.act)),
    ]
    gpw = _gpus_per_worker(gpu, v.resources_per_worker)
    sampler = StageRow(
        "rollouts",
        "sampler actor",
        gpu,
        gpw,
        v.num_workers,
        [Term("weights", c.weights)],
        transient,
        "generation",
        "value.rollouts_per_prompt" if gpu else "value.rollout_batch_size",  # GPU: the chunk already shrank
    )
    sampler.notes.append(f"{chunk} of every {v.rollout_batch_size} prompts per generate call")
    calls = math.ceil(c.cfg.task.n_train / chunk)
    step = v.rollout_max_tokens * _decode_step_s(
        c.weights, kv_cache_bytes(c.shape, seqs, tokens, c.act) / 2, ASSUMED["hf_generate_step_s"]
    )
    rows = [c.timed(sampler, calls, step, gpw)]
    rewards, notes = _reward_terms(c.cfg)
    if rewards:
        on_gpu = c.cfg.task.reward_device.startswith("cuda")
        scorer = StageRow(
            "rollouts",
            "scorer actor",
            on_gpu,
            0.5 if on_gpu else 0.0,
            1,
            rewards,
            # float32 activations of a scoring batch: 64 texts x 1024 tokens x 12 h (an allowance)
            [Term("activations", 64 * 1024 * max(_rm_hidden(c.cfg)) * 4 * 12, "64 x 1024 tokens")],
            "scoring",
            "task.reward_device",
            notes=notes,
        )
        rows.append(scorer)
    return rows


def _rm_hidden(cfg: Config) -> list[int]:
    """Hidden sizes of the table's reward models among the objectives (0 when none)."""
    out = [0]
    for o in cfg.task.objectives:
        rm = reward_model_params(o)
        if rm is not None and rm[0] in REWARD_MODEL_PARAMS:
            out.append(REWARD_MODEL_PARAMS[rm[0]][1])
    return out


def method_rows(method: str, n: int) -> int:
    """Batch rows one request of ``method`` takes (its plan before identical rows are merged): the method's own
    registry entry built on a synthetic layout holding every adapter group, at the uniform preference."""
    mu = np.full(n, 1.0 / n)
    cols = iter(range(10_000))

    def group(k: int) -> tuple[int, ...]:
        return tuple(next(cols) for _ in range(k))

    point = ((tuple(mu), 0),)  # the grid adapters (morlhf, modpo) at this preference
    layout = AdapterLayout(
        k=10_000,
        n=n,
        beta=0.7,
        backbones=group(n),
        rs_backbones=group(n),
        wrpo_backbones=group(n),
        values=group(n),
        morlhf=point,
        modpo=point,
        ric=next(cols),
        ric_info={"objectives": [f"o{i}" for i in range(n)], "score_low": [0.0] * n, "score_high": [1.0] * n},
        arms=group(n),
        parm=group(n + 1),
    )
    return len(method_spec(method).build(layout, mu, PlanArgs(prompt="x")).rows)


def _engine_adapters(c: _Ctx, methods: list[str]) -> tuple[int, list[Term]]:
    """(rank sum per adapted module, resident terms) of an engine that loads what ``methods`` read."""
    cfg, n = c.cfg, c.n
    groups = groups_for(methods)
    grid = len(preference_grid(n, cfg.eval.grid_step))
    r, ranks = cfg.lora.r, [cfg.lora.r] * n  # the Bone Soup backbones, always loaded
    ranks += [r] * n * (("rs_backbones" in groups) + ("wrpo_backbones" in groups))
    ranks += [cfg.value.lora_r] * n if "values" in groups else []
    ranks += [r] * grid * (("morlhf" in groups) + ("modpo" in groups)) + ([r] if "ric" in groups else [])
    ranks += [cfg.arm.lora_r] * n if "arms" in groups else []
    ranks += [cfg.arm.r1] + [cfg.arm.r2] * n if "parm" in groups else []
    per_rank = c.shape.layers * sum(sum(lora_module_dims(c.shape, m)) for m in set(c.targets))
    terms = [
        Term("weights", c.weights),
        Term("adapters", sum(ranks) * per_rank * c.act, f"{len(ranks)} adapters, rank sum {sum(ranks)}"),
    ]
    if "values" in groups:
        terms.append(Term("value heads", n * c.shape.vocab * c.shape.hidden * c.act, f"{n} x [V, h]"))
    return sum(ranks), terms


def _decode_row(c: _Ctx, stage: str, methods: list[str], requests: int, prompts_x_points: int) -> StageRow:
    """A batch decode engine (sweep trials, evaluation): decode.batch_size requests, the most rows any method takes."""
    d = c.cfg.decode
    rank_sum, resident = _engine_adapters(c, methods)
    rows_per = max(method_rows(m, c.n) for m in methods) * d.beam_width * d.beam_expansion
    tokens = min(c.cfg.model.max_context, c.prompt + d.max_new_tokens)
    seqs = d.batch_size * rows_per
    transient = [
        Term(
            "KV cache",
            kv_cache_bytes(c.shape, seqs, tokens, c.act),
            f"{d.batch_size} requests x {rows_per} rows",
        ),
        Term("prefill", prefill_bytes(c.shape, seqs, c.prompt, c.act, rank_sum)),
        Term("scores", seqs * c.shape.vocab * 4 * 4, "log-softmax, guidance, value outputs in float32"),
    ]
    gpus = decode_gpus(c.cfg)
    resident = resident + _scoring_terms(c.cfg, gpus > 0)  # the worker scores what it decodes
    row = StageRow(
        stage, "decode engine", gpus > 0, gpus, 1, resident, transient, "decoding", "decode.batch_size"
    )
    row.notes.append(
        f"methods {methods}; prompts of task.max_prompt_tokens (the engine refuses > model.max_context)"
    )
    batches = math.ceil(requests / d.batch_size)
    step = _decode_step_s(
        c.weights, kv_cache_bytes(c.shape, seqs, tokens, c.act) / 2, ASSUMED["engine_step_s"]
    )
    return c.timed(row, batches, d.max_new_tokens * step, max(gpus, 0))


def _serve_row(c: _Ctx, methods: list[str]) -> StageRow:
    """A Serve engine replica: the adapters of ``serve.methods`` (None: the bundle's, i.e. the evaluated methods'),
    and a KV cache bounded by its token-budget admission: requests of up to ``serve.max_batch_size`` join while their
    rows x (prompt + max_tokens) fit ``serve.max_batch_tokens``, and one larger than that runs alone, so at most
    max(max_batch_tokens, rows x model.max_context) row-tokens, and never more than max_batch_size full requests."""
    s = c.cfg.serve
    served = list(s.methods or methods)
    rank_sum, resident = _engine_adapters(c, served)
    resident += _scoring_terms(c.cfg, s.num_gpus > 0)  # `score: true` requests load the objectives
    rows_per = max(method_rows(m, c.n) for m in served)
    ctx = c.cfg.model.max_context
    row_tokens = min(s.max_batch_size * rows_per * ctx, max(s.max_batch_tokens, rows_per * ctx))
    transient = [
        Term("KV cache", row_tokens * kv_bytes_per_token(c.shape, c.act), f"{row_tokens} row-tokens"),
        Term("prefill", prefill_bytes(c.shape, math.ceil(row_tokens / ctx), ctx, c.act, rank_sum)),
    ]
    replicas = (s.autoscaling or {}).get("max_replicas", s.num_replicas)
    knob = (
        "serve.max_batch_tokens"
        if s.max_batch_tokens < s.max_batch_size * rows_per * ctx
        else "serve.max_batch_size"
    )
    row = StageRow(
        "serve",
        "Serve engine replica",
        s.num_gpus > 0,
        s.num_gpus,
        int(replicas),
        resident,
        transient,
        "serving",
        knob,
    )
    row.notes.append(
        f"KV cache: min({s.max_batch_size} requests x {rows_per} rows x model.max_context, "
        f"max(serve.max_batch_tokens, one request)) = {row_tokens} row-tokens"
    )
    return row


# ---------------------------------------------------------------------------------------------
# The plan


def plan_config(cfg: Config, measured: dict[str, float] | None = None, also: Iterable[str] = ()) -> Plan:
    """Every stage a pipeline run of ``cfg`` goes through (and the Serve replica), in order; ``also`` adds training
    stages the evaluated methods do not need (``train-baselines --which ric``: ``also=["ric"]``)."""
    shape = model_shape(cfg.model.name_or_path)
    plan = Plan([], cfg.model.name_or_path, shape, cfg.plan.gpu_memory_gib, cfg.plan.reserve_gib)
    if shape is None:
        plan.notes.append(
            f"model.name_or_path = {cfg.model.name_or_path!r}: its config.json is neither local, in the HF cache nor "
            "in mage_ray.memory_plan.KNOWN_SHAPES; no plan"
        )
        return plan
    c = _Ctx(cfg, shape, dict(measured or {}))
    b, n, methods = cfg.backbone, c.n, list(cfg.eval.methods)
    needed = stages_for([*methods, cfg.sweep.gamma_method]) | set(also)
    short = max(1, int(round(b.steps * cfg.sweep.beta_step_fraction)))
    sweep_grid = len(preference_grid(n, cfg.sweep.grid_step))
    eval_grid = len(preference_grid(n, cfg.eval.grid_step))
    rows = plan.rows
    if b.trainer == "wrpo":
        plan.notes.append("backbone.trainer wrpo: backbones are planned as GRPO runs (upper bound)")
    if len(cfg.sweep.betas) > 1:
        rows.append(_grpo_row(c, "beta", n, short * len(cfg.sweep.betas)))
        rows.append(
            _decode_row(c, "beta (validation)", ["bs"], len(cfg.sweep.betas) * cfg.task.n_val * sweep_grid, 0)
        )
    full = b.steps - short if cfg.sweep.warm_start and len(cfg.sweep.betas) > 1 else b.steps
    rows.append(_grpo_row(c, "backbones", n, full + (b.steps if "rs_backbones" in needed else 0)))
    if "values" in needed:
        rows += _rollout_rows(c)
        rows.append(_value_row(c))
    elif needed & {"rollouts", "arms", "parm", "ric", "modpo", "wrpo"}:
        rows += _rollout_rows(c)
    rows.append(_decode_row(c, "alpha", ["bs"], len(cfg.sweep.alphas) * cfg.task.n_val * sweep_grid, 0))
    gm = cfg.sweep.gamma_method
    rows.append(_decode_row(c, "gamma", [gm], len(cfg.sweep.gammas) * cfg.task.n_val * sweep_grid, 0))
    if b.morlhf or "morlhf" in needed:
        rows.append(_grpo_row(c, "morlhf", eval_grid, b.steps))
    arm_steps = cfg.arm.steps or cfg.value.steps
    pairs = math.ceil((cfg.arm.batch_size or cfg.value.batch_size) / b.num_workers)
    per_step = math.ceil(b.prompts_per_step * b.num_generations / b.num_workers)
    p = pblora_params(shape, cfg.arm.r1, cfg.arm.r2, n, c.targets)
    pb = Term(
        "PBLoRA + AdamW", adamw_bytes(p, 4 * len(set(c.targets)) * shape.layers), f"{p / 1e6:.2f}M params"
    )
    lora, arm, r, per = (
        c.lora_state(cfg.lora.r),
        c.lora_state(cfg.arm.lora_r),
        cfg.lora.r,
        "backbone.prompts_per_step",
    )
    offline = [  # stage, worker, concurrent runs, steps, sequences per rank and step, trainable state, rank, knob
        ("ric", "RiC worker", 1, b.steps, per_step, lora, r, per),
        ("modpo", "MODPO worker", eval_grid, b.steps, 2 * per_step, lora, r, per),  # chosen, rejected
        ("wrpo", "WRPO worker", n, b.steps, 3 * per_step, lora, r, per),  # source, chosen, rejected
        ("arms", "GenARM ARM worker", n, arm_steps, 2 * pairs, arm, cfg.arm.lora_r, "arm.batch_size"),
        ("parm", "PARM worker", 1, arm_steps, 2 * n * pairs, pb, cfg.arm.r1 + cfg.arm.r2, "arm.batch_size"),
    ]
    for stage, worker, runs, steps, seqs, state, rank, knob in offline:
        if stage in needed:
            rows.append(
                _offline_row(
                    c, stage, worker, runs=runs, steps=steps, seqs=seqs, trainable=state, knob=knob, r=rank
                )
            )
    for m in methods:
        if REGISTRY[m].family == "arm":
            rows.append(
                _decode_row(c, f"gamma_{m}", [m], len(cfg.arm.gammas) * cfg.task.n_val * sweep_grid, 0)
            )
    rows.append(_decode_row(c, "evaluate", methods, len(methods) * cfg.task.n_test * eval_grid, 0))
    rows.append(_serve_row(c, methods))
    return plan


def first_misfit(plan: Plan, stages: set[str] | None = None) -> StageRow | None:
    """The first GPU row (of ``stages``, None: all) whose per-GPU peak exceeds the declared memory."""
    for row in plan.rows:
        base = row.stage.split(" ")[0]
        if (stages is None or base in stages) and plan.fits(row) is False:
            return row
    return None


# ---------------------------------------------------------------------------------------------
# Chunk sizes the workers use on a GPU


def gpu_budget(cfg: Config, device_total_bytes: int | None) -> float | None:
    """Bytes a GPU worker may fill: ``plan.gpu_memory_gib`` (else the device's memory) minus ``plan.reserve_gib``;
    None on CPU (``device_total_bytes`` None and nothing declared): no bound."""
    total = cfg.plan.gpu_memory_gib * GIB if cfg.plan.gpu_memory_gib else device_total_bytes
    return None if total is None else max(0.0, total - cfg.plan.reserve_gib * GIB)


def rollout_prompts_per_call(cfg: Config, shape: ModelShape, budget: float | None) -> int:
    """Prompts per ``generate`` call of the rollout sampler: all ``value.rollout_batch_size`` without a budget, else
    as many as fit it beside the weights (KV cache + prefill of their ``rollouts_per_prompt`` sequences)."""
    v, act = cfg.value, DTYPE_BYTES[cfg.model.dtype]
    if budget is None:
        return v.rollout_batch_size
    prompt = min(cfg.task.max_prompt_tokens, cfg.model.max_context)
    seq = kv_bytes_per_token(shape, act) * (prompt + v.rollout_max_tokens) + prefill_bytes(
        shape, 1, prompt, act
    )
    return fit_count(budget - shape.params * act, seq * v.rollouts_per_prompt, v.rollout_batch_size)


def value_micro_batch(cfg: Config, shape: ModelShape, budget: float | None) -> int:
    """Sequences per forward / backward of a value-model worker: its whole share of ``value.batch_size`` without a
    budget, else as many as fit beside the weights, the LoRA and head state (activations + the head's gather)."""
    v, act = cfg.value, DTYPE_BYTES[cfg.model.dtype]
    per_rank = math.ceil(v.batch_size / v.num_workers)
    if budget is None:
        return per_rank
    tokens = min(cfg.task.max_prompt_tokens, cfg.model.max_context) + v.rollout_max_tokens
    ckpt = _checkpointing(v.activation_checkpointing, True)
    one = activation_bytes(
        shape,
        tokens,
        checkpointing=ckpt,
        act_bytes=act,
        lora_r=v.lora_r,
        targets=cfg.lora.target_modules,
        lora_in_bytes=4,
        dropout=cfg.lora.dropout > 0,
    )["peak"]
    one += tokens * shape.hidden * 12
    head = shape.vocab * shape.hidden + shape.vocab
    fixed = shape.params * act + adamw_bytes(lora_params(shape, v.lora_r, cfg.lora.target_modules), 0)
    fixed += adamw_bytes(head, 2)
    return fit_count(budget - fixed, one, per_rank)


def largest_fitting(cfg: Config, row: StageRow) -> int | None:
    """The largest value below the current one of ``row.knob`` (an integer field) at which the stage fits, or None
    (not an integer field, or nothing fits). Values the config refuses (a micro-batch that does not divide the
    step's completions) do not fit. Up to 256 the values are tried downwards; above, by bisection (a stage's
    memory grows with each of its knobs)."""
    from mage_ray.config import ConfigError, config_from_dict

    section, _, name = row.knob.partition(".")
    current = getattr(getattr(cfg, section), name)
    if isinstance(current, bool) or not isinstance(current, int):
        return None
    if row.knob == "backbone.per_device_train_batch_size":
        current = cfg.backbone.micro_batch
    base = cfg.to_dict()

    def fits(value: int) -> bool:
        try:
            trial = config_from_dict(base, [f"{row.knob}={value}"])
        except ConfigError:
            return False
        plan = plan_config(trial)
        same = [r for r in plan.rows if r.stage == row.stage and r.worker == row.worker]
        return bool(same and plan.fits(same[0]))

    if current <= 256:
        return next((v for v in range(current - 1, 0, -1) if fits(v)), None)
    lo, hi = 0, current - 1  # fits(lo) or lo == 0; the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo or None
