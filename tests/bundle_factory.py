"""Build a small servable bundle on a random model, for tests and benchmarks (nothing downloads).

    from tests.bundle_factory import make_tiny_bundle       # or: sys.path has tests/ -> bundle_factory
    path = make_tiny_bundle(tmp_dir)                        # n=2 backbones + 2 value models on tiny-random

The adapters are PEFT LoRAs with random ``lora_B`` (PEFT initialises B = 0, which would make every adapter a
no-op); value heads are random ``weight`` [V, H] / ``bias`` [V]. The layout follows the shared formats:
``<dir>/adapter/`` + ``manifest.json`` (+ ``value_head.safetensors`` for value models).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from mage_ray.bundle import build_bundle
from mage_ray.config import ModelConfig
from mage_ray.manifest import write_manifest
from mage_ray.models import load_policy
from mage_ray.value_model import save_value_head

DEFAULT_OBJECTIVES = ("conciseness", "readability")
"""Cheap embedded objectives (no encoder model to load), so scoring grids in tests is fast."""


def _save_lora(
    model, directory: Path, seed: int, r: int, targets: Sequence[str], std: float, manifest: dict
) -> None:
    """A PEFT LoRA with random lora_B saved as ``<directory>/adapter`` + ``manifest.json``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    pm.save_pretrained(str(directory / "adapter"))
    write_manifest(directory, {**manifest, "complete": True, "status": "complete"})


def make_tiny_bundle(
    tmp_dir: str | Path,
    n: int = 2,
    with_values: bool = True,
    *,
    model: str | ModelConfig = "tiny-random",
    objectives: Sequence[str] | None = None,
    r: int = 4,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    beta: float = 0.7,
    gamma: float = 1.0,
    default_method: str | None = None,
    max_context: int = 2048,
    lora_std: float = 0.3,
    head_std: float = 0.1,
    seed: int = 0,
    with_reward_models: bool = True,
) -> Path:
    """Write ``n`` random backbones (+ ``n`` random value models, + GenARM ARMs and a PARM PBLoRA with
    ``with_reward_models``) and a bundle; return the bundle dir.

    ``model`` is a ModelConfig or a ``name_or_path`` (default the tiny random Llama; the embedded SmolLM2 works
    for benchmarks). The bundle lands in ``<tmp_dir>/bundle``; its default method is mage-e-m with values and
    bs without.
    """
    tmp = Path(tmp_dir)
    mcfg = (
        model if isinstance(model, ModelConfig) else ModelConfig(name_or_path=model, max_context=max_context)
    )
    objectives = list(objectives or (DEFAULT_OBJECTIVES if n == 2 else [f"obj{i}" for i in range(n)]))
    if len(objectives) != n:
        raise ValueError(f"objectives has {len(objectives)} names, expected n = {n}")
    policy, _ = load_policy(mcfg)
    V, H = policy.get_output_embeddings().out_features, policy.config.hidden_size
    backbones, values = [], []
    for i in range(n):
        d = tmp / "artifacts" / f"backbone{i}"
        _save_lora(
            policy,
            d,
            seed + 10 + i,
            r,
            targets,
            lora_std,
            {"name": f"backbone{i}", "beta": beta, "base_model": mcfg.name_or_path},
        )
        backbones.append(d)
        if with_values:
            d = tmp / "artifacts" / f"value{i}"
            _save_lora(
                policy,
                d,
                seed + 30 + i,
                r,
                targets,
                lora_std,
                {
                    "objective": objectives[i],
                    "base_model": mcfg.name_or_path,
                    "vocab_size": V,
                    "hidden_size": H,
                    "reward_mean": 0.0,
                    "reward_std": 1.0,
                    "target": "zscore",
                },
            )
            g = torch.Generator().manual_seed(seed + 40 + i)
            save_value_head(
                d / "value_head.safetensors",
                torch.randn(V, H, generator=g) * head_std,
                torch.randn(V, generator=g) * head_std,
            )
            values.append(d)
    arms, parm = [], None
    if (
        with_reward_models
    ):  # GenARM: one random LoRA per objective; PARM: a PBLoRA with random B (PARM inits 0)
        from mage_ray.pblora import apply_pblora, pblora_modules, save_pblora

        for i, o in enumerate(objectives):
            d = tmp / "artifacts" / f"arm{i}"
            _save_lora(policy, d, seed + 50 + i, r, targets, lora_std, {"kind": "arm", "objective": o})
            arms.append(d)
        pb = copy.deepcopy(policy)
        torch.manual_seed(seed + 60)
        apply_pblora(pb, list(targets), r1=r, r2=r, n=n, alpha=2.0 * r)
        with torch.no_grad():
            for layer in pblora_modules(pb).values():
                layer.pblora_B.normal_(0.0, lora_std)
        parm = tmp / "artifacts" / "parm"
        save_pblora(pb, str(parm / "pblora"), objectives=objectives, base_model=mcfg.name_or_path)
        write_manifest(parm, {"kind": "parm", "objectives": list(objectives), "complete": True})
    bundle = build_bundle(
        tmp / "bundle",
        model=mcfg,
        objectives=objectives,
        beta=beta,
        backbones=backbones,
        values=values,
        arms=arms,
        parm=parm,
        gamma=gamma,
        default_method=default_method or ("mage-e-m" if with_values else "bs"),
        created_by="tests/bundle_factory.py",
    )
    return Path(bundle.root)


def cached_tiny_bundle(tmp_path_factory, name: str = "tiny_bundle", **kwargs) -> Path:
    """:func:`make_tiny_bundle` once per pytest session (shared by test modules via the session's base temp)."""
    root = tmp_path_factory.getbasetemp() / name
    if not (root / "bundle" / "bundle.json").is_file():
        make_tiny_bundle(root, **kwargs)
    return root / "bundle"


def make_tiny_reward_model(directory: str | Path) -> str:
    """A 1-layer GPT2ForSequenceClassification (2 logits) with the embedded tokenizer, saved at ``directory``.

    Use it as ``hf:<directory>@0`` / ``@1``: two objectives that give varied scores to any text, gibberish included
    (the embedded objectives give a tiny random policy's gibberish their floor, 0, so a smoke run needs these to
    have preference pairs and a non-zero hypervolume).
    """
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from mage_ray.models import embedded_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(embedded_tokenizer_dir())
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=256,
        num_labels=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    GPT2ForSequenceClassification(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)
