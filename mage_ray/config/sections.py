"""The config sections: one dataclass per concern, each validating itself in ``__post_init__`` (a
:class:`ConfigError` names the field, the bad value and what is allowed), and a doc line under every field."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mage_ray.config.arm import ArmConfig
from mage_ray.config.checks import _check_choice, _check_grid_step, _check_range, _fail
from mage_ray.guidance import method_names


@dataclass
class ModelConfig:
    """The base (SFT) policy every adapter is trained on."""

    name_or_path: str = "embedded:smollm2-135m-instruct"
    """HF hub id, local directory, ``embedded:smollm2-135m-instruct`` or ``tiny-random``."""
    dtype: str = "float32"
    """Weights dtype: float32 | bfloat16 | float16."""
    trust_remote_code: bool = False
    """Run model code from the hub. Off unless you trust the repository."""
    max_context: int = 1024
    """Prompt + completion token limit enforced by decoding and serving."""
    chat_template: bool = True
    """Wrap prompts with the tokenizer's chat template when it has one."""

    def __post_init__(self) -> None:
        if not isinstance(self.name_or_path, str) or not self.name_or_path.strip():
            _fail("model.name_or_path", self.name_or_path, "a HF id, a local path or 'embedded:<name>'")
        _check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _check_range("model.max_context", self.max_context, 16, 1_000_000)


@dataclass
class LoraConfig:
    """LoRA shape shared by backbones (value models may override ``r``)."""

    r: int = 8
    """Rank (paper: 64 on Llama-2-7B)."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (PEFT's lora_alpha): the delta is (lora_alpha / r) * B A (paper: 128). Was
    ``lora.alpha`` (still accepted, deprecated): a bare "alpha" is Bone Soup's extrapolation, decode.alpha."""
    dropout: float = 0.0
    """Dropout on the LoRA input during training."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Linear layer names to adapt (attention and/or MLP projections)."""

    def __post_init__(self) -> None:
        _check_range("lora.r", self.r, 1, 4096)
        _check_range("lora.lora_alpha", self.lora_alpha, 0, None, lo_open=True)
        _check_range("lora.dropout", self.dropout, 0, 1, hi_open=True)
        if not self.target_modules or not all(isinstance(m, str) for m in self.target_modules):
            _fail("lora.target_modules", self.target_modules, "a non-empty list of module names")


@dataclass
class TaskConfig:
    """Prompts and objectives (reward functions)."""

    name: str = "embedded"
    """Prompt source: embedded | hh_rlhf | summary | parquet (a file with a 'prompt' column)."""
    objectives: list[str] = field(default_factory=lambda: ["relevance", "readability"])
    """Objective names from the registry (see mage_ray.tasks.objectives), or 'hf:<id or path>[@index]'."""
    data_path: str | None = None
    """Dataset id or local file/dir for hh_rlhf / summary / parquet tasks (None: the task's default)."""
    n_train: int = 256
    """Training prompts used (at most)."""
    n_val: int = 16
    """Validation prompts used by sweeps (at most)."""
    n_test: int = 64
    """Test prompts used by evaluation (at most)."""
    max_prompt_tokens: int = 256
    """Prompts longer than this (in tokens) are truncated from the left."""
    reward_device: str = "cpu"
    """Device for reward models: cpu | cuda."""
    n_objectives: int | None = None
    """How many objectives this config is written for (grids, B(beta), reference point); an override of
    task.objectives with another count is refused. None: any number >= 2."""

    def __post_init__(self) -> None:
        _check_choice("task.name", self.name, ("embedded", "hh_rlhf", "summary", "parquet"))
        if not isinstance(self.objectives, list) or len(self.objectives) < 2:
            _fail("task.objectives", self.objectives, "a list of at least 2 objective names")
        if self.n_objectives is not None:
            _check_range("task.n_objectives", self.n_objectives, 2, 1000)
            if len(self.objectives) != self.n_objectives:
                _fail(
                    "task.objectives",
                    self.objectives,
                    f"{self.n_objectives} objective names (task.n_objectives = {self.n_objectives})",
                )
        if len(set(self.objectives)) != len(self.objectives):
            _fail("task.objectives", self.objectives, "distinct objective names")
        for f in ("n_train", "n_val", "n_test"):
            _check_range(f"task.{f}", getattr(self, f), 1, 10_000_000)
        _check_range("task.max_prompt_tokens", self.max_prompt_tokens, 8, 1_000_000)
        if not isinstance(self.reward_device, str) or not re.fullmatch(
            r"cpu|cuda(:\d+)?", self.reward_device
        ):
            _fail("task.reward_device", self.reward_device, "'cpu' or 'cuda'")


@dataclass
class BackboneConfig:
    """Stage 1 (Seek): n LoRA backbones, backbone i trained on h_i = w_i^T r (Eq. 11)."""

    trainer: str = "grpo"
    """grpo | rloo (online, TRL) | wrpo (offline preference optimisation)."""
    beta: float = 0.7
    """Bone Soup's beta: the dominant weight of B(beta) (Eq. 12); 1.0 = Rewarded Soups backbones. Not TRL's KL
    'beta' (that is kl_coef), nor GenARM's beta_r (arm.beta_r)."""
    steps: int = 30
    """Optimizer steps per backbone."""
    learning_rate: float = 1e-4
    """Adam learning rate of the LoRA parameters."""
    kl_coef: float = 0.05
    """KL penalty coefficient against the base policy (passed to TRL as its ``beta``; unrelated to backbone.beta)."""
    num_generations: int = 4
    """Completions sampled per prompt (the GRPO group size)."""
    prompts_per_step: int = 2
    """Prompts per optimizer step per worker."""
    max_completion_length: int = 32
    """Token limit of each sampled training completion."""
    temperature: float = 1.0
    """Sampling temperature during training rollouts."""
    per_device_train_batch_size: int = 0
    """Completions in one forward / backward micro-batch of a worker (TRL per_device_train_batch_size); 0 = all
    prompts_per_step x num_generations completions of a step at once. A smaller value must divide that product:
    the step then accumulates gradients over product / this micro-batches (TRL gradient_accumulation_steps), and
    its completions are still sampled in one generate call per step (TRL steps_per_generation = the accumulation
    steps), so the effective batch and the samples stay the same."""
    activation_checkpointing: bool | None = None
    """Recompute each decoder layer's activations in the backward instead of keeping them, for GRPO / RLOO, SFT and
    the offline trainers (RiC, MODPO, WRPO, ARMs, PARM); None = on when the worker trains on a GPU, off on CPU."""
    generation: str = "hf"
    """How GRPO / RLOO sample completions: hf (transformers generate) | vllm (TRL's vLLM path: needs the vllm
    package, `pip install 'mage-ray[gpu]'`, and backbone.use_gpu)."""
    vllm_mode: str = "colocate"
    """generation vllm: colocate (a vLLM engine inside every training worker, on its GPU, asleep with weights and
    cache released outside generation) | server (workers send prompts to one `trl vllm-serve` on other GPUs)."""
    vllm_gpu_memory_utilization: float = 0.3
    """generation vllm, colocate: share of the GPU's memory vLLM takes while it generates (weights + KV cache)."""
    vllm_server_url: str = "http://127.0.0.1:8000"
    """generation vllm, server: base URL of the `trl vllm-serve` process."""
    reward_aggregation: str = "sum_then_normalize"
    """How GRPO turns the objectives into advantages: sum_then_normalize (h = w^T r, then the group z-score,
    Eq. 11 as written) or normalize_then_sum (z-score each objective in its group, then weight by w), which
    keeps a low-variance objective from being drowned by a high-variance one (TRL multi_objective_aggregation)."""
    sft_steps: int = 0
    """Optional SFT stage before RL (tasks with SFT data only)."""
    num_workers: int = 1
    """Ray Train workers per backbone (data parallel)."""
    use_gpu: bool = False
    """Give each Ray Train worker a GPU (deployment setting; tests use logical GPUs)."""
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    """Ray resources of each training worker, e.g. {CPU: 4, GPU: 1}."""
    placement_strategy: str = "PACK"
    """PACK | SPREAD | STRICT_PACK | STRICT_SPREAD for each backbone's workers."""
    max_failures: int = 2
    """Worker failures tolerated per backbone run (resume from last checkpoint)."""
    checkpoint_every: int = 10
    """Checkpoint the adapter every this many steps."""
    morlhf: bool = False
    """Also train one MORLHF model per evaluation-grid preference (w = mu)."""
    wrpo_alpha_max: float = 0.5
    """WRPO: final fusion coefficient of the progressive schedule."""
    wrpo_sources: list[str] = field(default_factory=list)
    """WRPO: extra source models (HF ids / paths); the other backbones are always sources."""
    seed: int = 0
    """Seed of sampling, LoRA initialisation and data order."""

    def __post_init__(self) -> None:
        _check_choice("backbone.trainer", self.trainer, ("grpo", "rloo", "wrpo"))
        _check_range("backbone.beta", self.beta, 0, 1)
        _check_range("backbone.steps", self.steps, 1, 10_000_000)
        _check_range("backbone.learning_rate", self.learning_rate, 0, 1, lo_open=True)
        _check_range("backbone.kl_coef", self.kl_coef, 0, None)
        _check_range("backbone.num_generations", self.num_generations, 2, 1024)
        _check_range("backbone.prompts_per_step", self.prompts_per_step, 1, 100_000)
        _check_range("backbone.max_completion_length", self.max_completion_length, 1, 100_000)
        _check_range("backbone.temperature", self.temperature, 0, 10, lo_open=True)
        _check_choice(
            "backbone.reward_aggregation",
            self.reward_aggregation,
            ("sum_then_normalize", "normalize_then_sum"),
        )
        if self.trainer == "rloo" and self.reward_aggregation != "sum_then_normalize":
            _fail(
                "backbone.reward_aggregation", self.reward_aggregation, "sum_then_normalize with trainer rloo"
            )
        _check_range("backbone.per_device_train_batch_size", self.per_device_train_batch_size, 0, 1_000_000)
        per_step = self.prompts_per_step * self.num_generations
        if self.per_device_train_batch_size and per_step % self.per_device_train_batch_size:
            _fail(
                "backbone.per_device_train_batch_size",
                self.per_device_train_batch_size,
                f"0 or a divisor of prompts_per_step x num_generations = {per_step}",
            )
        _check_optional_bool("backbone.activation_checkpointing", self.activation_checkpointing)
        _check_choice("backbone.generation", self.generation, ("hf", "vllm"))
        _check_choice("backbone.vllm_mode", self.vllm_mode, ("colocate", "server"))
        _check_range(
            "backbone.vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization, 0, 1, lo_open=True
        )
        if self.generation == "vllm" and not self.use_gpu:
            _fail(
                "backbone.generation",
                self.generation,
                "hf unless backbone.use_gpu is true (vLLM needs a GPU)",
            )
        if self.generation == "vllm" and self.trainer not in ("grpo", "rloo"):
            _fail("backbone.generation", self.generation, "hf with trainer wrpo (it samples nothing)")
        _check_range("backbone.sft_steps", self.sft_steps, 0, 10_000_000)
        _check_range("backbone.num_workers", self.num_workers, 1, 10_000)
        _check_choice(
            "backbone.placement_strategy",
            self.placement_strategy,
            ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
        )
        _check_range("backbone.max_failures", self.max_failures, -1, 1000)
        _check_range("backbone.checkpoint_every", self.checkpoint_every, 1, 10_000_000)
        _check_range("backbone.wrpo_alpha_max", self.wrpo_alpha_max, 0, 1)
        _check_resources("backbone.resources_per_worker", self.resources_per_worker)

    @property
    def micro_batch(self) -> int:
        """Completions per forward / backward of a worker (``per_device_train_batch_size``, 0 resolved)."""
        return self.per_device_train_batch_size or self.prompts_per_step * self.num_generations

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step (TRL gradient_accumulation_steps and steps_per_generation)."""
        return self.prompts_per_step * self.num_generations // self.micro_batch


def _check_optional_bool(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        _fail(name, value, "true, false or null (null: on for GPU workers, off on CPU)")


def _check_resources(name: str, res: Any) -> None:
    if not isinstance(res, dict) or not all(isinstance(k, str) for k in res):
        _fail(name, res, "a mapping like {CPU: 1, GPU: 1}")
    for k, v in res.items():
        _check_range(f"{name}.{k}", v, 0, None)


@dataclass
class ValueConfig:
    """Stage 2 explicit value models: base + LoRA + vocab-sized head, Eq. 16."""

    rollouts_per_prompt: int = 2
    """Sampled responses per training prompt for the rollout Parquet."""
    rollout_max_tokens: int = 32
    """Token limit of each sampled rollout response."""
    rollout_batch_size: int = 16
    """Prompts sampled together when generating rollouts."""
    steps: int = 40
    """Optimizer steps per value model."""
    learning_rate: float = 2e-4
    """Adam learning rate of the value model's LoRA and head."""
    batch_size: int = 8
    """Scored responses per optimizer step."""
    lora_r: int = 8
    """LoRA rank of the value models."""
    lora_alpha: float = 16.0
    """LoRA alpha (scale alpha / r) of the value models."""
    val_fraction: float = 0.1
    """Fraction of rollouts held out for validation MSE and ranking accuracy."""
    num_workers: int = 1
    """Ray Train workers per value model (data parallel)."""
    use_gpu: bool = False
    """Give each value-model worker a GPU."""
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    """Ray resources of each value-model worker."""
    activation_checkpointing: bool | None = None
    """Recompute the value models' decoder activations in the backward; None = on for GPU workers, off on CPU. On a
    GPU a worker also splits its share of batch_size into micro-batches that fit plan.gpu_memory_gib (gradients
    accumulate, the loss is unchanged), and rollout sampling splits each rollout_batch_size prompts into generate
    calls whose KV cache fits it."""
    seed: int = 0
    """Seed of rollout sampling, initialisation and data order."""

    def __post_init__(self) -> None:
        for f in (
            "rollouts_per_prompt",
            "rollout_max_tokens",
            "rollout_batch_size",
            "steps",
            "batch_size",
            "lora_r",
            "num_workers",
        ):
            _check_range(f"value.{f}", getattr(self, f), 1, 10_000_000)
        _check_range("value.learning_rate", self.learning_rate, 0, 1, lo_open=True)
        _check_range("value.lora_alpha", self.lora_alpha, 0, None, lo_open=True)
        _check_range("value.val_fraction", self.val_fraction, 0, 1, hi_open=True)
        _check_optional_bool("value.activation_checkpointing", self.activation_checkpointing)
        _check_resources("value.resources_per_worker", self.resources_per_worker)


@dataclass
class SweepConfig:
    """Ray Tune sweep of beta (trains), then alpha and gamma (decode only), by hypervolume."""

    betas: list[float] = field(default_factory=lambda: [0.6, 0.7, 0.8])
    """Candidate beta of B(beta) (Eq. 12), one Tune trial each; the default is backbone.beta."""
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    """Candidate extrapolation alpha (Eq. 13), decode-only trials of bs; the default is decode.alpha."""
    gammas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 1.0, 3.0, 5.0])
    """Candidate guidance strengths gamma (Eq. 25), decode-only trials of gamma_method; the default is decode.gamma."""
    beta_step_fraction: float = 0.2
    """Fraction of backbone.steps used by each beta trial (paper: 20%)."""
    gamma_method: str = "mage-e-m"
    """Method whose gamma is tuned."""
    grid_step: float = 0.25
    """Preference-grid step used on validation prompts during the sweep."""
    max_concurrent_trials: int = 0
    """0 = as many as the cluster's resources hold."""
    train_full: bool = True
    """Train the chosen beta for the full backbone.steps (else keep the trial's backbones)."""
    warm_start: bool = True
    """The full backbone run continues from the chosen beta trial's adapters, for backbone.steps minus the trial's
    steps (the same total budget; the trial's steps and seconds count toward the backbones')."""

    def __post_init__(self) -> None:
        if not self.betas:
            _fail("sweep.betas", self.betas, "a non-empty list")
        for b in self.betas:
            _check_range("sweep.betas[]", b, 0, 1)
        for a in self.alphas:
            _check_range("sweep.alphas[]", a, -1, 10)
        for g in self.gammas:
            _check_range("sweep.gammas[]", g, 0, 1000)
        _check_range("sweep.beta_step_fraction", self.beta_step_fraction, 0, 1, lo_open=True)
        _check_choice("sweep.gamma_method", self.gamma_method, tuple(method_names()))
        _check_grid_step("sweep.grid_step", self.grid_step)
        _check_range("sweep.max_concurrent_trials", self.max_concurrent_trials, 0, 10_000)


@dataclass
class DecodeConfig:
    """Defaults of the decode engine (every request may override them)."""

    method: str = "mage-e-m"
    """Default decoding method of requests that name none (one of mage_ray.guidance.REGISTRY)."""
    gamma: float = 1.0
    """Guidance strength in pi_base * exp(gamma * V) (Eq. 25)."""
    alpha: float = 0.0
    """Extrapolation away from the SFT model (Eq. 13)."""
    method_gammas: dict[str, float] = field(default_factory=dict)
    """Per-method default gamma, used in place of ``gamma`` by those methods (ARM methods: beta_r / beta)."""
    max_new_tokens: int = 48
    """Default number of new tokens per response."""
    max_tokens_limit: int = 512
    """Hard upper bound on max_new_tokens a request may ask for."""
    finish_sentence_tokens: int = 0
    """Extra tokens a response that reaches max_new_tokens mid-sentence may decode to end its sentence (. ! ?):
    it then finishes with "stop", or with "length" at max_new_tokens + this. 0: stop at max_new_tokens."""
    do_sample: bool = False
    """Sample (True) or take the argmax of the guided scores (False, Eq. 25)."""
    temperature: float = 1.0
    """Sampling temperature (applied after guidance)."""
    top_k: int = 0
    """0 disables top-k."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables it."""
    beam_width: int = 1
    """Beam lookahead (Table 4): b beams..."""
    beam_expansion: int = 1
    """...each expanded into c candidates..."""
    lookahead: int = 1
    """...re-ranked every l tokens."""
    batch_size: int = 16
    """Rows decoded together by batch jobs (evaluation, grids)."""
    seed: int = 0
    """Seed of sampling (per request; requests may set their own)."""
    num_cpus: float = 1.0
    """CPUs of each batch decode worker (sweep trials, the beta trials' validation, evaluation, grid actors)."""
    num_gpus: float = 0.0
    """GPUs of each batch decode worker; > 0 puts its engine on cuda (and needs a GPU node). 0: decode on CPU."""

    def __post_init__(self) -> None:
        _check_choice("decode.method", self.method, tuple(method_names()))
        _check_range("decode.gamma", self.gamma, 0, 1000)
        _check_range("decode.alpha", self.alpha, -1, 10)
        for m, g in self.method_gammas.items():
            _check_choice("decode.method_gammas key", m, tuple(method_names()))
            _check_range(f"decode.method_gammas.{m}", g, 0, 1000)
        _check_range("decode.max_tokens_limit", self.max_tokens_limit, 1, 1_000_000)
        _check_range("decode.max_new_tokens", self.max_new_tokens, 1, self.max_tokens_limit)
        _check_range("decode.finish_sentence_tokens", self.finish_sentence_tokens, 0, 100_000)
        _check_range("decode.temperature", self.temperature, 0, 100, lo_open=True)
        _check_range("decode.top_k", self.top_k, 0, 10_000_000)
        _check_range("decode.top_p", self.top_p, 0, 1, lo_open=True)
        for f in ("beam_width", "beam_expansion", "lookahead", "batch_size"):
            _check_range(f"decode.{f}", getattr(self, f), 1, 100_000)
        _check_range("decode.num_cpus", self.num_cpus, 0, 1024)
        _check_range("decode.num_gpus", self.num_gpus, 0, 64)

    @property
    def device(self) -> str:
        """Where a batch decode worker's engine runs: ``cuda`` when it holds a GPU (``num_gpus`` > 0), else ``cpu``."""
        return "cuda" if self.num_gpus > 0 else "cpu"

    def ray_resources(self) -> dict[str, float]:
        """The Ray resources of one batch decode worker (zero entries left out)."""
        return {k: float(v) for k, v in (("CPU", self.num_cpus), ("GPU", self.num_gpus)) if v}


@dataclass
class ServeConfig:
    """Ray Serve replica pool and HTTP ingress."""

    host: str = "127.0.0.1"
    """Bind address; localhost unless you mean to expose it."""
    port: int = 8000
    """HTTP port of the Serve ingress."""
    num_replicas: int = 1
    """Replicas of the generator deployment (ignored when autoscaling is set)."""
    autoscaling: dict[str, Any] | None = None
    """Serve autoscaling_config, e.g. {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}."""
    max_batch_size: int = 16
    """Most requests decoded together by one replica (a cap beside ``max_batch_tokens``); the scheduler also starts a
    batch as soon as this many requests are queued."""
    max_batch_tokens: int = 32768
    """KV-cache budget of one replica, in rows x tokens: a request counts its rows (beam candidates included) x
    (prompt + max_tokens), and requests join a batch first come, first served while the sum fits (one larger than
    the whole budget runs alone). Bounds the KV memory at about this x 2 x layers x KV heads x head dim x dtype
    bytes; 32768 holds 16 two-row requests at a 1024-token context."""
    batch_wait_timeout_s: float = 0.01
    """How long the scheduler waits for more requests before starting a batch."""
    batching: str = "continuous"
    """continuous: queued requests join a running batch between decode steps; micro: a batch is fixed when it
    starts and later requests wait for it (docs/benchmarks.md compares them)."""
    max_ongoing_requests: int = 64
    """Requests a replica accepts at once (queued + running); more get 503 from Serve."""
    num_cpus: float = 1.0
    """CPUs reserved per replica."""
    num_gpus: float = 0.0
    """GPUs per replica (fractions share one GPU)."""
    auth_token_env: str | None = None
    """Name of an environment variable holding a bearer token; None disables auth."""
    max_body_bytes: int = 1_000_000
    """Largest accepted request body; larger ones get 413."""
    max_prompts_per_grid: int = 64
    """Most prompts in one /v1/grid request."""
    max_grid_points: int = 256
    """Most preferences in one /v1/grid request."""
    model_name: str = "mage"
    """The model id /v1/models lists and responses carry; OpenAI requests naming another model get 404."""
    methods: list[str] | None = None
    """Decoding methods this server serves; only their adapters are loaded, /v1/objectives lists them, requests for
    others get 400 naming ``method``. None: every method the bundle can serve."""
    openai_max_tokens: int = 512
    """Completion budget of an OpenAI-compatible request that sets no max_tokens (OpenAI's own runs to the context
    length), capped by decode.max_tokens_limit. /v1/generate uses decode.max_new_tokens instead."""
    api_docs: bool = False
    """Serve the OpenAPI schema at /openapi.json and Swagger UI at /docs (its scripts load from a CDN); both need
    the bearer token when serve.auth_token_env is set. Off: both are 404."""

    def __post_init__(self) -> None:
        _check_range("serve.port", self.port, 1, 65535)
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            _fail("serve.model_name", self.model_name, "a non-empty model id")
        _check_range("serve.num_replicas", self.num_replicas, 1, 10_000)
        _check_range("serve.max_batch_size", self.max_batch_size, 1, 4096)
        _check_range("serve.max_batch_tokens", self.max_batch_tokens, 1, 1 << 40)
        if self.methods is not None:
            if not isinstance(self.methods, list) or not self.methods:
                _fail("serve.methods", self.methods, "a non-empty list of method names, or null for all")
            for m in self.methods:
                _check_choice("serve.methods[]", m, tuple(method_names()))
            if len(set(self.methods)) != len(self.methods):
                _fail("serve.methods", self.methods, "a list without repeated methods")
        _check_range("serve.batch_wait_timeout_s", self.batch_wait_timeout_s, 0, 60)
        if self.batching not in ("continuous", "micro"):
            _fail("serve.batching", self.batching, "'continuous' or 'micro'")
        _check_range("serve.max_ongoing_requests", self.max_ongoing_requests, self.max_batch_size, 1_000_000)
        _check_range("serve.num_cpus", self.num_cpus, 0, 1024)
        _check_range("serve.num_gpus", self.num_gpus, 0, 64)
        _check_range("serve.max_body_bytes", self.max_body_bytes, 1024, 1 << 31)
        _check_range("serve.max_prompts_per_grid", self.max_prompts_per_grid, 1, 100_000)
        _check_range("serve.max_grid_points", self.max_grid_points, 1, 100_000)
        _check_range("serve.openai_max_tokens", self.openai_max_tokens, 1, 1_000_000)
        if self.autoscaling is not None and not isinstance(self.autoscaling, dict):
            _fail("serve.autoscaling", self.autoscaling, "a mapping (Serve autoscaling_config) or null")


@dataclass
class EvalConfig:
    """Evaluation over a preference grid."""

    methods: list[str] = field(
        default_factory=lambda: ["rs", "bs", "mod", "mage-e", "mage-e-m", "mage-i", "mage-i-m"]
    )
    """Methods the evaluation report compares (any of mage_ray.guidance.REGISTRY); the pipeline trains what they need."""
    grid_step: float = 0.1
    """Simplex-lattice step (2 objectives, 0.1 -> 11 points)."""
    ref_point: list[float] | None = None
    """Hypervolume reference point (one per objective); None = the task's recorded default."""
    min_test_prompts: int = 4
    """Refuse to evaluate on fewer test prompts than this."""
    confidence: float = 0.9
    """Level of the bootstrap intervals (over prompts, paired across methods) of every reported metric."""
    n_resamples: int = 1000
    """Bootstrap resamples per report and per sweep decision (0 turns the intervals off)."""

    def __post_init__(self) -> None:
        for m in self.methods:
            _check_choice("eval.methods[]", m, tuple(method_names()))
        _check_grid_step("eval.grid_step", self.grid_step)
        _check_range("eval.confidence", self.confidence, 0, 1, lo_open=True, hi_open=True)
        _check_range("eval.n_resamples", self.n_resamples, 0, 1_000_000)
        if self.ref_point is not None:
            for v in self.ref_point:
                _check_range("eval.ref_point[]", v)
        _check_range("eval.min_test_prompts", self.min_test_prompts, 1, 1_000_000)


@dataclass
class StorageConfig:
    """Where runs, checkpoints, bundles and reports go."""

    storage_path: str = "runs"
    """Local directory, file:// URI (= that local path) or object-store URI (s3://, gs://) for Ray Train/Tune
    storage and every artifact (mage_ray.storage)."""
    run_name: str = "default"
    """Name of this run: artifacts go to <storage_path>/<run_name>."""
    cache_dir: str = field(
        default_factory=lambda: os.environ.get("MAGE_RAY_CACHE", str(Path.home() / ".cache" / "mage_ray"))
    )
    """Converted models and other re-usable caches."""

    def __post_init__(self) -> None:
        if not self.storage_path:
            _fail("storage.storage_path", self.storage_path, "a directory or a cloud URI")
        if not self.run_name or "/" in self.run_name:
            _fail("storage.run_name", self.run_name, "a non-empty name without '/'")

    @property
    def run_dir(self) -> str:
        """Root of this run's artifacts: ``<storage_path>/<run_name>``."""
        return f"{self.storage_path.rstrip('/')}/{self.run_name}"


@dataclass
class PlanConfig:
    """GPU memory the workers may use: ``mage-ray plan``, the preflight check that refuses a config whose plan does
    not fit, and the memory-bounded rollout chunks and value-model micro-batches (mage_ray.stage_plan)."""

    gpu_memory_gib: float = 0.0
    """Memory of one GPU in GiB (80 for an 80 GB A100 / H100, 141 for an H200); 0 = not declared: nothing is
    refused before Ray starts, and a GPU worker sizes its chunks from its device's memory."""
    reserve_gib: float = 4.0
    """GiB of every GPU the plan leaves free: CUDA context, cuBLAS / NCCL workspaces, allocator fragmentation."""

    def __post_init__(self) -> None:
        _check_range("plan.gpu_memory_gib", self.gpu_memory_gib, 0, 100_000)
        _check_range("plan.reserve_gib", self.reserve_gib, 0, 100_000)
        if self.gpu_memory_gib and self.reserve_gib >= self.gpu_memory_gib:
            _fail(
                "plan.reserve_gib", self.reserve_gib, f"less than plan.gpu_memory_gib = {self.gpu_memory_gib}"
            )


@dataclass
class Config:
    """The whole job configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The base policy."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA shape of the backbones and baselines."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """Prompts and objectives."""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """Stage 1: backbone training."""
    value: ValueConfig = field(default_factory=ValueConfig)
    """Stage 2: rollouts and explicit value models."""
    arm: ArmConfig = field(default_factory=ArmConfig)
    """GenARM / PARM autoregressive reward models."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """beta / alpha / gamma sweep on validation prompts."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Decode-engine defaults."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """Ray Serve deployment."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation report on the test prompts."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Where artifacts go."""
    plan: PlanConfig = field(default_factory=PlanConfig)
    """GPU memory of the workers (mage-ray plan, the preflight memory check)."""

    @property
    def n_objectives(self) -> int:
        return len(self.task.objectives)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
