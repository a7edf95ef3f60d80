"""GPU memory knobs and the memory plan end to end: `mage-ray plan`, the preflight memory and vLLM checks, the
GRPO micro-batch / vLLM fields of the TRL config, activation checkpointing, memory-bounded rollout chunks and
value-model micro-batches. Nothing here needs a GPU: the plan is arithmetic, and the GPU-only paths are driven by
their sizing functions."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mage_ray.config import load_config
from mage_ray.memory_plan import KNOWN_SHAPES, kv_bytes_per_token, prefill_bytes
from mage_ray.preflight import PreflightError, check
from mage_ray.stage_plan import (
    largest_fitting,
    plan_config,
    rollout_prompts_per_call,
    value_micro_batch,
)

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
LLAMA7B = KNOWN_SHAPES["meta-llama/Llama-2-7b-hf"]


@pytest.fixture(scope="module")
def llama7b_dir(tmp_path_factory) -> str:
    """A local model directory with Llama-2-7B's config.json and no weights: the preflight model check and the plan
    read only the config."""
    d = tmp_path_factory.mktemp("llama7b")
    s = LLAMA7B
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "max_position_embeddings": s.max_positions,
        "tie_word_embeddings": False,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def _paper_grpo(model_dir: str, *more: str) -> list[str]:
    """The hh_rlhf backbone settings on the smoke config (embedded objectives, no hub): 64 completions of up to
    512 + 128 tokens per worker and step, on GPUs of 80 GiB."""
    return [
        f"model.name_or_path={model_dir}",
        "model.dtype=bfloat16",
        "model.max_context=2048",
        "task.max_prompt_tokens=512",
        "backbone.use_gpu=true",
        "backbone.prompts_per_step=8",
        "backbone.num_generations=8",
        "backbone.max_completion_length=128",
        "lora.r=64",
        "lora.alpha=128",
        "plan.gpu_memory_gib=80",
        *more,
    ]


def _args(plan_stages=None) -> types.SimpleNamespace:
    return types.SimpleNamespace(checks=("memory",), plan_stages=plan_stages, config="configs/x.yaml")


def test_grpo_without_checkpointing_is_refused_naming_the_micro_batch(llama7b_dir):
    """Without activation checkpointing 64 x 640 tokens of Llama-2-7B activations (~228 GiB) fit no GPU: one error
    naming backbone.per_device_train_batch_size and the largest micro-batch that fits, which does fit, while the
    next larger divisor of 64 does not."""
    cfg = load_config(SMOKE, _paper_grpo(llama7b_dir, "backbone.activation_checkpointing=false"))
    with pytest.raises(PreflightError) as e:
        check(cfg, _args())
    msg = str(e.value)
    assert "\n" not in msg and "stage 'backbones'" in msg and "activations" in msg
    assert "lower backbone.per_device_train_batch_size (<= " in msg
    best = int(msg.split("(<= ")[1].split(" ")[0])
    assert 64 % best == 0
    check(load_config(SMOKE, _paper_grpo(llama7b_dir, "backbone.activation_checkpointing=false",
                                         f"backbone.per_device_train_batch_size={best}")), _args())  # fmt: skip
    bigger = min(d for d in (1, 2, 4, 8, 16, 32, 64) if d > best)
    with pytest.raises(PreflightError, match="per_device_train_batch_size"):
        check(load_config(SMOKE, _paper_grpo(llama7b_dir, "backbone.activation_checkpointing=false",
                                             f"backbone.per_device_train_batch_size={bigger}")), _args())  # fmt: skip


def test_checkpointing_on_gpus_by_default_makes_grpo_fit(llama7b_dir):
    """The default (activation_checkpointing null = on for GPU workers) keeps a layer's input only: the same
    backbones fit 80 GiB, and the plan's activations shrink by more than 5x."""
    on = plan_config(load_config(SMOKE, _paper_grpo(llama7b_dir)))
    off = plan_config(load_config(SMOKE, _paper_grpo(llama7b_dir, "backbone.activation_checkpointing=false")))
    row_on, row_off = (next(r for r in p.rows if r.stage == "backbones") for p in (on, off))
    act = {id(r): next(t.bytes for t in r.transient if t.name == "activations") for r in (row_on, row_off)}
    assert on.fits(row_on) and not off.fits(row_off)
    assert act[id(row_off)] > 5 * act[id(row_on)]
    check(load_config(SMOKE, _paper_grpo(llama7b_dir)), _args(plan_stages=("backbones",)))


def test_cpu_configs_are_never_refused(llama7b_dir):
    """use_gpu false everywhere, Serve and decoding on CPU: the plan has no GPU row, so even 1 GiB declared passes."""
    overrides = _paper_grpo(llama7b_dir, "backbone.activation_checkpointing=false", "plan.gpu_memory_gib=1",
                            "plan.reserve_gib=0.5")  # fmt: skip
    cfg = load_config(SMOKE, [o for o in overrides if not o.startswith("backbone.use_gpu")])
    plan = plan_config(cfg)
    assert plan.rows and not any(r.gpu for r in plan.rows)
    check(cfg, _args())


def test_no_declared_gpu_memory_refuses_nothing(llama7b_dir):
    cfg = load_config(
        SMOKE, _paper_grpo(llama7b_dir, "backbone.activation_checkpointing=false", "plan.gpu_memory_gib=0")
    )
    check(cfg, _args())


def test_plan_command_prints_every_stage_and_writes_json(tmp_path, capsys):
    """`mage-ray plan` on the shipped paper config: one table row per stage, every GPU stage fits 80 GiB (exit 0),
    and the JSON holds the same stages with their terms."""
    from mage_ray.cli import main

    out = tmp_path / "plan.json"
    status = main(["plan", "--config", str(REPO / "configs" / "hh_rlhf.yaml"), "--gpu-memory", "80", "--json",
                   str(out), "--step-seconds", "backbones=12.5"])  # fmt: skip
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    stages = [s["stage"] for s in data["stages"]]
    for st in ("beta", "backbones", "rollouts", "values", "alpha", "gamma", "morlhf", "evaluate", "serve"):
        assert st in stages and f"| {st} |" in text
    assert status == 0 and all(s["fits"] in (True, None) for s in data["stages"])
    serve = next(s for s in data["stages"] if s["stage"] == "serve")
    assert 23028 / 1024 < serve["per_gpu_gib"] <= 80 - 4  # more than an A10G, within an 80 GiB GPU
    bb = next(s for s in data["stages"] if s["stage"] == "backbones")
    assert bb["time_source"] == "measured" and bb["step_s"] == 12.5
    assert bb["gpu_hours"] == pytest.approx(bb["steps"] * 12.5 * bb["gpus"] / 3600, rel=1e-3)
    assert {"weights", "LoRA + AdamW", "activations"} <= set(bb["terms_gib"])


def test_plan_command_exits_1_and_suggests_when_a_stage_does_not_fit(capsys):
    """decode.batch_size 64 with mage-i (5 rows a request) does not fit 80 GiB: exit 1, the row says what to lower,
    and the suggested batch size is the largest that fits."""
    from mage_ray.cli import main

    hh = str(REPO / "configs" / "hh_rlhf.yaml")
    assert main(["plan", "--config", hh, "--gpu-memory", "80", "decode.batch_size=64"]) == 1
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| evaluate |"))
    assert "**no**" in row and "decode.batch_size (<= " in row
    best = int(row.split("(<= ")[1].split(")")[0])
    for value, fits in ((best, True), (best + 1, False)):
        plan = plan_config(load_config(hh, ["plan.gpu_memory_gib=80", f"decode.batch_size={value}"]))
        assert plan.fits(next(r for r in plan.rows if r.stage == "evaluate")) is fits


def test_largest_fitting_skips_values_the_config_refuses(llama7b_dir):
    """Micro-batches must divide 64: the search never proposes 63 or 50."""
    cfg = load_config(SMOKE, _paper_grpo(llama7b_dir, "backbone.activation_checkpointing=false"))
    row = next(r for r in plan_config(cfg).rows if r.stage == "backbones")
    assert 64 % largest_fitting(cfg, row) == 0


# ----- vLLM -----


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_without_the_package_is_one_error_line_before_ray():
    proc = subprocess.run(
        [sys.executable, "-m", "mage_ray.cli", "train-backbones", "--config", SMOKE, "backbone.use_gpu=true",
         "backbone.generation=vllm"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: backbone.generation = 'vllm' needs the vllm package")
    assert "mage-ray[gpu]" in lines[0] and proc.stdout == ""


def test_vllm_needs_gpu_workers():
    from mage_ray.config import ConfigError

    with pytest.raises(ConfigError, match="backbone.generation"):
        load_config(SMOKE, ["backbone.generation=vllm"])


@pytest.mark.parametrize("trainer", ["grpo", "rloo"])
def test_trl_config_carries_the_vllm_fields(tmp_path, trainer):
    """The GRPOConfig / RLOOConfig the trainer builds: colocate with sleep mode and the utilisation, server with
    its URL, hf without vLLM."""
    from mage_ray.train.backbone import _trainer_args

    w = np.array([0.7, 0.3])
    base = [f"backbone.trainer={trainer}", "backbone.use_gpu=true", f"storage.storage_path={tmp_path}"]
    colo = _trainer_args(load_config(SMOKE, [*base, "backbone.generation=vllm",
                                             "backbone.vllm_gpu_memory_utilization=0.4"]), trainer, w, 2, tmp_path, True)  # fmt: skip
    assert colo.use_vllm and colo.vllm_mode == "colocate" and colo.vllm_enable_sleep_mode
    assert colo.vllm_gpu_memory_utilization == 0.4
    server = _trainer_args(load_config(SMOKE, [*base, "backbone.generation=vllm", "backbone.vllm_mode=server",
                                               "backbone.vllm_server_url=http://10.0.0.5:8000"]), trainer, w, 2, tmp_path, True)  # fmt: skip
    assert (
        server.use_vllm
        and server.vllm_mode == "server"
        and server.vllm_server_base_url == "http://10.0.0.5:8000"
    )
    hf = _trainer_args(load_config(SMOKE, base), trainer, w, 2, tmp_path, True)
    assert hf.use_vllm is False


# ----- GRPO micro-batches and checkpointing -----


def test_micro_batch_keeps_the_effective_and_generation_batch(tmp_path):
    """per_device_train_batch_size 2 of the smoke step's 4 completions: 2 accumulation steps, and TRL's generation
    batch (completions sampled per optimizer step) is the default's 4."""
    from mage_ray.train.backbone import _trainer_args

    w = np.array([0.7, 0.3])
    default = _trainer_args(
        load_config(SMOKE, [f"storage.storage_path={tmp_path}"]), "grpo", w, 2, tmp_path, True
    )
    micro = _trainer_args(load_config(SMOKE, [f"storage.storage_path={tmp_path}",
                                              "backbone.per_device_train_batch_size=2"]), "grpo", w, 2, tmp_path, True)  # fmt: skip
    assert (default.per_device_train_batch_size, default.gradient_accumulation_steps) == (4, 1)
    assert (micro.per_device_train_batch_size, micro.gradient_accumulation_steps) == (2, 2)
    assert (
        micro.steps_per_generation == 2 and micro.generation_batch_size == default.generation_batch_size == 4
    )


def test_micro_batch_must_divide_the_step(tmp_path):
    from mage_ray.config import ConfigError

    with pytest.raises(ConfigError, match="backbone.per_device_train_batch_size"):
        load_config(SMOKE, ["backbone.per_device_train_batch_size=3"])


def test_checkpointing_args_off_on_cpu_and_on_when_asked():
    from mage_ray.train.stage1 import checkpointing_args

    assert not torch.cuda.is_available()
    (name, off), = checkpointing_args(None).items()  # fmt: skip
    assert off is False and name in ("activation_checkpointing", "gradient_checkpointing")
    on = checkpointing_args(True)
    assert on[name] is True and on[f"{name}_kwargs"] == {"use_reentrant": False}


def test_offline_prepare_turns_checkpointing_on_when_asked():
    """offline.prepare with checkpointing=True: the decoder layers recompute (they keep only their inputs, so a
    forward saves far less); None on CPU leaves it off."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from mage_ray.train.offline import prepare
    from mage_ray.train.ray_shell import TrainContext

    def build(device):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj"]))
        return model.train(), types.SimpleNamespace(pad_token_id=0)

    saved = {}
    for setting in (None, True):
        t = prepare(build, seed=0, learning_rate=1e-3, ctx=TrainContext(), checkpointing=setting)
        count = [0]

        def pack(x, count=count):
            count[0] += x.numel()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            t.model(input_ids=torch.randint(0, 100, (2, 16)))
        saved[setting] = count[0]
    assert saved[True] < saved[None] / 2


# ----- memory-bounded rollout chunks and value micro-batches -----


def test_rollout_chunk_is_what_fits_the_budget():
    """With a budget of the weights + exactly k prompts' KV cache and prefill, a generate call takes k prompts; no
    budget (CPU) keeps value.rollout_batch_size."""
    cfg = load_config(SMOKE, ["value.rollout_batch_size=16", "value.rollouts_per_prompt=3", "task.max_prompt_tokens=40",
                              "value.rollout_max_tokens=8"])  # fmt: skip
    s = KNOWN_SHAPES["tiny-random"]
    per_seq = kv_bytes_per_token(s, 4) * (40 + 8) + prefill_bytes(s, 1, 40, 4)
    weights = s.params * 4
    assert rollout_prompts_per_call(cfg, s, None) == 16
    for k in (1, 5, 16):
        assert rollout_prompts_per_call(cfg, s, weights + k * 3 * per_seq + 1) == k
    assert rollout_prompts_per_call(cfg, s, weights + 100 * 3 * per_seq) == 16  # never above the batch


def test_value_micro_batch_is_what_fits_beside_the_weights_and_state():
    """Budget = weights + LoRA and head state (AdamW) + k sequences' activations and head gather -> k sequences;
    no budget (CPU) -> the worker's share of value.batch_size."""
    from mage_ray.memory_plan import activation_bytes, adamw_bytes, lora_params

    cfg = load_config(SMOKE, ["value.batch_size=8", "value.num_workers=2"])
    s = KNOWN_SHAPES["tiny-random"]
    tokens = cfg.task.max_prompt_tokens + cfg.value.rollout_max_tokens
    one = activation_bytes(s, tokens, checkpointing=True, act_bytes=4, lora_r=4, targets=["q_proj", "v_proj"],
                           lora_in_bytes=4)["peak"] + tokens * s.hidden * 12  # fmt: skip
    fixed = s.params * 4 + adamw_bytes(lora_params(s, 4, ["q_proj", "v_proj"]), 0)
    fixed += adamw_bytes(s.vocab * s.hidden + s.vocab, 2)
    assert value_micro_batch(cfg, s, None) == 4  # a worker's share of the batch, no budget
    for k in (1, 2, 3):
        assert value_micro_batch(cfg, s, fixed + k * one + 1) == k
    assert value_micro_batch(cfg, s, fixed + 10 * one) == 4


def test_fit_steps_micro_batches_give_the_one_batch_gradient():
    """Mean-over-examples loss: 3 steps with micro-batches of 2 (chunks 2, 2, 1 of 5 examples) end at the same
    weights as 3 one-batch steps; the step metrics are the example-weighted means of the chunks'."""
    from mage_ray.train.offline import OfflineSettings, Trainable, fit_steps
    from mage_ray.train.ray_shell import TrainContext

    X, y = torch.randn(20, 3, generator=torch.Generator().manual_seed(0)), torch.randn(20)

    def run(micro):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        t = Trainable(model, model, torch.optim.AdamW(model.parameters(), lr=0.1), None, 0, 0)

        def step_loss(idx, _step):
            err = (model(X[idx]).squeeze(-1) - y[idx]) ** 2
            return err.mean(), {"n": float(len(idx))}

        hist = fit_steps(t, 20, step_loss, OfflineSettings(3, 5, 0.1, 0, None), TrainContext(quiet=True),
                         micro_batch=micro)  # fmt: skip
        return model, hist

    one, h1 = run(None)
    chunked, h2 = run(2)
    for a, b in zip(one.parameters(), chunked.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert [h["loss"] for h in h1] == pytest.approx([h["loss"] for h in h2], rel=1e-5)
    assert h2[0]["n"] == pytest.approx(2 * 2 / 5 + 2 * 2 / 5 + 1 * 1 / 5)  # sum of share x chunk size
    assert math.isclose(h1[0]["n"], 5.0)


def test_vllm_is_the_gpu_extra_and_in_the_image():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("vllm") for req in extras["gpu"])
    assert "pip install --no-cache-dir -e '.[gpu]'" in (REPO / "cluster" / "Dockerfile").read_text()
