"""WRPO's source models (:mod:`mage_ray.train.wrpo`): which ones, their scored responses, and the cache.

Sources, in order: every complete non-WRPO backbone under ``<run_dir>/backbones/*/`` other than the ones being
trained (:func:`discover_sources`), plus ``backbone.wrpo_sources`` (HF ids, local model directories,
``embedded:`` / ``tiny-random:<seed>`` names, or adapter directories). :func:`source_tables` has each source
answer every training prompt (:func:`sample_source_table`: the target rollouts' sampling settings, scored by
the task objectives, text re-tokenised with the target's tokenizer when the vocabularies differ) and caches
the table in ``<run_dir>/wrpo/sources/<source>.parquet`` next to the settings it was sampled with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from mage_ray.config import Config
from mage_ray.manifest import ManifestError, is_complete, read_json, read_manifest, write_json_atomic
from mage_ray.storage import is_dir, is_file, is_uri, join, listdir, local_copy, local_path
from mage_ray.train.ray_shell import storage_abs

__all__ = ["NO_SOURCES", "discover_sources", "sample_source_table", "source_tables"]

NO_SOURCES = (
    "backbone.trainer = 'wrpo' needs source models: list them in backbone.wrpo_sources (HF ids, model "
    "directories or adapter directories), or first train GRPO/RLOO backbones of another beta (or beta = 1 "
    "Rewarded-Soups backbones) under <run_dir>/backbones"
)


def _is_adapter_dir(p: str) -> str | None:
    """The PEFT directory of an artifact dir (``<p>/adapter``) or of a bare adapter dir (local or URI), else
    None."""
    if is_file(join(p, "adapter", "adapter_config.json")):
        return join(p, "adapter")
    if is_file(join(p, "adapter_config.json")):
        return p
    return None


def discover_sources(cfg: Config, exclude: Sequence[str] = ()) -> list[str]:
    """Complete non-WRPO backbones under ``<run_dir>/backbones/*/`` (not in ``exclude``, not the short
    beta-sweep trials), then ``backbone.wrpo_sources``."""

    found: list[str] = []
    root = join(storage_abs(cfg.storage.run_dir), "backbones")
    skip = {storage_abs(e).rstrip("/") for e in exclude}
    if is_dir(root):
        for beta_dir in [join(root, b) for b in listdir(root) if b.startswith("beta_")]:
            for d in [join(beta_dir, n) for n in listdir(beta_dir) if not n.startswith(".")]:
                if d in skip or not is_dir(d) or not is_complete(d):
                    continue
                try:
                    m = read_manifest(d) or {}
                except ManifestError:
                    continue
                if m.get("trainer") != "wrpo" and not m.get("sweep_trial") and _is_adapter_dir(d) is not None:
                    found.append(d)
    return found + [s for s in cfg.backbone.wrpo_sources if s not in found]


def _source_label(cfg: Config, spec: str) -> str:

    root = join(storage_abs(cfg.storage.run_dir), "backbones") + "/"
    return spec[len(root) :] if spec.startswith(root) else spec


def _slug(spec: str) -> str:
    short = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.rstrip("/").rsplit("/", 2)[-1] if "/" in spec else spec)[
        -40:
    ]
    return f"{short}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def _load_source(cfg: Config, spec: str, device: str = "cpu"):
    """(model, tokenizer) of a source: an adapter dir on its manifest's base (default the config's base), or a
    full model (HF id, path, ``embedded:`` / ``tiny-random`` name) with its own tokenizer."""
    from mage_ray.models import load_policy

    adapter = _is_adapter_dir(spec if is_uri(spec) else str(local_path(spec)))
    if adapter is None:
        return load_policy(
            dataclasses.replace(cfg.model, name_or_path=spec), cfg.storage.cache_dir, device=device
        )
    from peft import PeftModel

    manifest = read_manifest(adapter[: -len("/adapter")]) if adapter.endswith("/adapter") else None
    base = (manifest or {}).get("base_model") or cfg.model.name_or_path
    model, tok = load_policy(
        dataclasses.replace(cfg.model, name_or_path=base), cfg.storage.cache_dir, device=device
    )
    return PeftModel.from_pretrained(model, str(local_copy(adapter))).merge_and_unload().eval(), tok


def sample_source_table(
    cfg: Config,
    spec: str,
    prompts: Sequence[str],
    *,
    objectives: Sequence[Any] | None = None,
    samples_per_source: int = 1,
    device: str = "cpu",
) -> pa.Table:
    """Sample ``samples_per_source`` responses per prompt from source ``spec`` and score them: a rollout table
    (``mage_ray.train.rollouts`` schema) whose token ids are in the *target* tokenizer."""
    from mage_ray.models import load_tokenizer
    from mage_ray.tasks.objectives import load_objectives
    from mage_ray.train.rollouts import encode_prompts, rollout_table, sample_batches, score_rows

    model, tok = _load_source(cfg, spec, device)
    target_tok = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.storage.cache_dir)
    same = tok.get_vocab() == target_tok.get_vocab()
    objs = list(objectives) if objectives is not None else load_objectives(cfg.task, cfg.storage.cache_dir)
    rows = sample_batches(
        model,
        tok,
        cfg,
        list(prompts),
        range(len(prompts)),
        n=samples_per_source,
        temperature=cfg.backbone.temperature,
        seed=cfg.backbone.seed,
    )
    indices = [i for i in range(len(prompts)) for _ in range(samples_per_source)]
    if not same:  # re-tokenise the text with the target tokenizer (+ its EOS)
        eos = target_tok.eos_token_id
        p_ids = dict(
            zip(
                prompts,
                encode_prompts(
                    target_tok,
                    prompts,
                    use_chat_template=cfg.model.chat_template,
                    max_prompt_tokens=cfg.task.max_prompt_tokens,
                ),
            )
        )
        rows = [
            (p, text, p_ids[p], target_tok(text, add_special_tokens=False)["input_ids"] + [eos])
            for p, text, _, _ in rows
        ]
    scores = score_rows(objs, [r[0] for r in rows], [r[1] for r in rows])
    return rollout_table(indices, rows, scores)


def _sample_remote(
    cfg: Config, spec: str, prompts: list[str], objectives, samples_per_source: int, path: str, settings: dict
) -> str:
    """Sample + score + write one source's cache file (runs as a Ray task when Ray is up)."""
    from mage_ray.train.rollouts import write_shard

    device = "cuda" if cfg.backbone.use_gpu else "cpu"  # placed (or refused) by mage_ray.devices.place
    table = sample_source_table(
        cfg, spec, prompts, objectives=objectives, samples_per_source=samples_per_source, device=device
    )
    write_shard(table, path)
    write_json_atomic(path[: -len(".parquet")] + ".json", settings)
    return path


def source_tables(
    cfg: Config,
    specs: Sequence[str],
    prompts: Sequence[str],
    *,
    objectives: Sequence[Any] | None = None,
    samples_per_source: int = 1,
) -> dict[str, str]:
    """Scored responses of every source to ``prompts``, cached under ``<run_dir>/wrpo/sources/``:
    {source label: parquet path}. Missing ones are sampled as Ray tasks (one per source, with the backbone
    workers' resources) when Ray is initialised, else in this process."""
    import ray

    root = join(storage_abs(cfg.storage.run_dir), "wrpo", "sources")
    names = (
        [getattr(o, "name", str(o)) for o in objectives]
        if objectives is not None
        else list(cfg.task.objectives)
    )
    digest = hashlib.sha256("\x1f".join(prompts).encode()).hexdigest()[:16]
    out: dict[str, str] = {}
    todo = []
    for spec in specs:
        path = join(root, _slug(spec) + ".parquet")
        settings = {
            "source": spec,
            "target_model": cfg.model.name_or_path,
            "objectives": names,
            "prompts_sha256": digest,
            "n_prompts": len(prompts),
            "samples_per_source": samples_per_source,
            "max_new_tokens": cfg.value.rollout_max_tokens,
            "temperature": cfg.backbone.temperature,
            "seed": cfg.backbone.seed,
            "chat_template": cfg.model.chat_template,
        }
        out[_source_label(cfg, spec)] = path
        try:
            cached = read_json(path[: -len(".parquet")] + ".json") == settings
        except ManifestError:
            cached = False
        if cached:
            print(f"[wrpo] source {_source_label(cfg, spec)}: cached responses {path}", flush=True)
        else:
            todo.append((spec, path, settings))
    if todo and ray.is_initialized():
        res = dict(cfg.backbone.resources_per_worker)
        task = ray.remote(_sample_remote).options(
            num_cpus=res.pop("CPU", 1),
            num_gpus=res.pop("GPU", 1 if cfg.backbone.use_gpu else 0),
            resources=res or None,
        )
        ray.get(
            [
                task.remote(cfg, spec, list(prompts), objectives, samples_per_source, path, st)
                for spec, path, st in todo
            ]
        )
    else:
        for spec, path, st in todo:
            _sample_remote(cfg, spec, list(prompts), objectives, samples_per_source, path, st)
    for spec, path, _ in todo:
        print(
            f"[wrpo] source {_source_label(cfg, spec)}: sampled {len(prompts)} x {samples_per_source} "
            f"-> {path}",
            flush=True,
        )
    return out
