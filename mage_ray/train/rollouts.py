"""Rollouts for explicit value models: sample responses from the base policy, score them, write Parquet.

The value function of Eq. 15 is an expectation over responses y ~ pi_ref, so value-model training data is
``value.rollouts_per_prompt`` plain samples (temperature 1.0, no top-k / top-p) per training prompt from
the SFT/base policy, each scored by every objective. Output: ``<run_dir>/rollouts/`` holding

* ``shard-00000-of-00004.parquet`` ... with columns ``prompt_index`` (int), ``prompt`` (str), ``response``
  (str), ``prompt_ids`` (list<int>: the chat-formatted prompt tokens), ``response_ids`` (list<int>: the
  sampled tokens, up to and including the first EOS), and one float column per objective (named after
  it);
* ``manifest.json`` with the settings the shards were made with (a rerun with other settings refuses to
  mix shards) and, once every shard exists, ``status: complete``.

Work is split into shards of ``prompts_per_shard`` prompts, each written atomically (temp file +
rename); a rerun skips shards already present. Two paths share the same functions:
``generate_rollouts(cfg, use_ray=False)`` loops in-process (tests, small runs), ``use_ray=True`` runs a
Ray Data pipeline: a sampling actor pool (policy loaded once per actor, ``value.num_workers`` actors with
``value.resources_per_worker``) feeds a scoring actor (objectives loaded once), and the driver writes each
shard as soon as all its rows have streamed in.

Sampling lives in one function, :func:`sample_responses`, so it can be switched to the project's decode
engine without touching the rest.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mage_ray.config import Config, TaskConfig
from mage_ray.manifest import read_manifest, write_manifest
from mage_ray.storage import atomic_file, is_dir, is_file, is_uri, join, listdir, local_path
from mage_ray.train.offline import pad_id

BASE_COLUMNS = ("prompt_index", "prompt", "response", "prompt_ids", "response_ids")
"""Columns every rollout shard has; objective columns follow, one float64 column per objective."""

DEFAULT_PROMPTS_PER_SHARD = 32

Rollout = tuple[str, str, list[int], list[int]]
"""(prompt, response text, prompt_ids, response_ids)."""


# ---------------------------------------------------------------------------------------------
# Sampling and scoring (plain functions)


def encode_prompts(
    tokenizer, prompts: Sequence[str], *, use_chat_template: bool = True, max_prompt_tokens: int | None = None
) -> list[list[int]]:
    """Chat-format and tokenize prompts; keep the last ``max_prompt_tokens`` tokens of longer ones."""
    from mage_ray.models import encode_prompt

    out = []
    for p in prompts:
        ids = encode_prompt(tokenizer, p, use_chat_template)
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            ids = ids[-max_prompt_tokens:]
        out.append(list(ids))
    return out


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    use_chat_template: bool = True,
    max_prompt_tokens: int | None = None,
) -> list[Rollout]:
    """Sample ``n`` responses per prompt from ``model`` (pure sampling: temperature only, no top-k/p).

    Returns ``len(prompts) * n`` tuples ``(prompt, response, prompt_ids, response_ids)``, prompt-major
    (the n samples of prompt 0 first). ``response_ids`` stop at and include the first EOS; ``response`` is
    their text without special tokens. Seeds torch's global RNG with ``seed``.
    """
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"sample_responses: n={n} and max_new_tokens={max_new_tokens} must both be >= 1")
    if not prompts:
        return []
    prompt_ids = encode_prompts(
        tokenizer, prompts, use_chat_template=use_chat_template, max_prompt_tokens=max_prompt_tokens
    )
    pad = pad_id(tokenizer)
    width = max(len(ids) for ids in prompt_ids)
    device = next(model.parameters()).device
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (B, P) left-padded
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention[i, width - len(ids) :] = 1
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=n,
        pad_token_id=pad,
    )  # (B * n, P + T), rows prompt-major
    generated = out[:, width:].tolist()
    from mage_ray.models import eos_token_ids

    eos = set(eos_token_ids(model, tokenizer))
    rows: list[Rollout] = []
    for k, gen in enumerate(generated):
        cut = next((j + 1 for j, tok in enumerate(gen) if tok in eos), len(gen))
        resp = gen[:cut]
        i = k // n
        rows.append((prompts[i], tokenizer.decode(resp, skip_special_tokens=True), prompt_ids[i], resp))
    return rows


def score_rows(objectives: Sequence[Any], prompts: list[str], responses: list[str]) -> dict[str, np.ndarray]:
    """Score every (prompt, response) with every objective: ``{objective name: (N,) float64}``."""
    out = {}
    for obj in objectives:
        r = np.asarray(obj(prompts, responses), dtype=np.float64).reshape(-1)
        if r.shape[0] != len(prompts):
            raise ValueError(
                f"objective {obj.name!r} returned {r.shape[0]} scores for {len(prompts)} responses"
            )
        out[obj.name] = r
    return out


def rollout_table(indices: list[int], rows: list[Rollout], scores: dict[str, np.ndarray]) -> pa.Table:
    """Arrow table of one shard (schema in the module docstring)."""
    clash = set(scores) & set(BASE_COLUMNS)
    if clash:
        raise ValueError(f"objective names {sorted(clash)} clash with rollout columns {list(BASE_COLUMNS)}")
    cols: dict[str, pa.Array] = {
        "prompt_index": pa.array(indices, pa.int64()),
        "prompt": pa.array([r[0] for r in rows], pa.string()),
        "response": pa.array([r[1] for r in rows], pa.string()),
        "prompt_ids": pa.array([r[2] for r in rows], pa.list_(pa.int64())),
        "response_ids": pa.array([r[3] for r in rows], pa.list_(pa.int64())),
    }
    for name, vals in scores.items():
        cols[name] = pa.array(vals, pa.float64())
    return pa.table(cols)


# ---------------------------------------------------------------------------------------------
# Shards, manifest, resume


def shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}.parquet"


def write_shard(table: pa.Table, path: str) -> None:
    """Write one shard atomically (local: temp file + ``os.replace``; object stores: one upload)."""
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)


def rollout_files(path: str) -> list[str]:
    """The shard files of a rollouts directory (sorted), or ``[path]`` for a single Parquet file: URIs or local
    paths (``file://`` stripped), what ``pyarrow.parquet`` opens."""
    path = path if is_uri(path) else str(local_path(path))
    if is_dir(path):
        files = [join(path, f) for f in listdir(path) if f.endswith(".parquet")]
    elif is_file(path):
        files = [path]
    else:
        raise FileNotFoundError(f"rollouts {path!r} do not exist (run jobs/rollouts.py)")
    if not files:
        raise FileNotFoundError(f"no .parquet shards in rollouts directory {path!r} (run jobs/rollouts.py)")
    return files


def read_rollouts(path: str, columns: list[str] | None = None) -> pa.Table:
    """All shards of a rollouts directory (or one Parquet file) as one table (the manifest is skipped)."""
    return pa.concat_tables(pq.read_table(f, columns=columns) for f in rollout_files(path))


def _settings(cfg: Config, prompts: list[str], objective_names: list[str], prompts_per_shard: int) -> dict:
    digest = hashlib.sha256("\x1f".join(prompts).encode()).hexdigest()[:16]
    return {
        "base_model": cfg.model.name_or_path,
        "chat_template": cfg.model.chat_template,
        "objectives": objective_names,
        "task": cfg.task.name,
        "n_prompts": len(prompts),
        "prompts_sha256": digest,
        "rollouts_per_prompt": cfg.value.rollouts_per_prompt,
        "rollout_max_tokens": cfg.value.rollout_max_tokens,
        "temperature": 1.0,
        "seed": cfg.value.seed,
        "prompts_per_shard": prompts_per_shard,
        "n_shards": -(-len(prompts) // prompts_per_shard),
    }


def _check_or_write_manifest(out_dir: str, settings: dict) -> None:
    old = read_manifest(out_dir)
    if old is not None:
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ValueError(
                f"rollouts in {out_dir!r} were made with other settings {diff} (old, new); "
                "delete that directory or use another storage.run_name to regenerate"
            )
        return
    write_manifest(out_dir, {**settings, "status": "running", "complete": False})


def _batch_seed(seed: int, first_prompt_index: int) -> int:
    """Seed of a sampling batch, from the config seed and its first prompt's index (same in both paths)."""
    return (seed * 1_000_003 + first_prompt_index) % (2**31)


def _default_objectives(task_cfg: TaskConfig) -> list:
    from mage_ray.tasks.objectives import load_objectives

    return load_objectives(task_cfg)


# ---------------------------------------------------------------------------------------------
# Entry point


def generate_rollouts(
    cfg: Config,
    out_dir: str | None = None,
    *,
    use_ray: bool = False,
    prompts: list[str] | None = None,
    objectives: Sequence[Any] | None = None,
    prompts_per_shard: int = DEFAULT_PROMPTS_PER_SHARD,
) -> str:
    """Sample, score and write rollouts for ``prompts`` (default: the task's train split); return ``out_dir``.

    ``out_dir`` defaults to ``<run_dir>/rollouts``. ``objectives`` defaults to ``load_objectives(cfg.task)``
    (each a callable ``obj(prompts, responses) -> (N,)`` with a ``name``; with ``use_ray`` they are pickled
    to the scoring actor). Shards already written are skipped.
    """
    t0 = time.time()
    out_dir = out_dir or join(cfg.storage.run_dir, "rollouts")
    if prompts is None:
        from mage_ray.tasks.prompts import load_prompts

        prompts = load_prompts(cfg.task, "train")
    if not prompts:
        raise ValueError("generate_rollouts: no prompts (check task.name / task.data_path / task.n_train)")
    if prompts_per_shard < 1:
        raise ValueError(f"prompts_per_shard={prompts_per_shard} must be >= 1")
    names = [o.name for o in objectives] if objectives is not None else list(cfg.task.objectives)
    settings = _settings(cfg, prompts, names, prompts_per_shard)
    n_shards = settings["n_shards"]
    _check_or_write_manifest(out_dir, settings)
    shards = {
        s: list(range(s * prompts_per_shard, min(len(prompts), (s + 1) * prompts_per_shard)))
        for s in range(n_shards)
    }
    todo = [s for s in range(n_shards) if not is_file(join(out_dir, shard_name(s, n_shards)))]
    print(f"[rollouts] {n_shards - len(todo)}/{n_shards} shards present in {out_dir}; {len(todo)} to do")
    if todo:
        run = _run_ray if use_ray else _run_local
        run(cfg, out_dir, prompts, {s: shards[s] for s in todo}, n_shards, objectives)
    missing = [s for s in range(n_shards) if not is_file(join(out_dir, shard_name(s, n_shards)))]
    if missing:
        raise RuntimeError(f"rollouts: shards {missing} of {out_dir!r} were not written")
    old = read_manifest(out_dir) or {}
    if old.get("status") != "complete":
        write_manifest(
            out_dir,
            {**settings, "status": "complete", "complete": True, "wall_time_s": round(time.time() - t0, 2)},
        )
    return out_dir


def _device(cfg: Config) -> str:
    """The samplers' device: cuda when value workers hold GPUs (``value.use_gpu``; :func:`mage_ray.devices.place`
    refuses it in a process without one), else cpu."""
    return "cuda" if cfg.value.use_gpu else "cpu"


def sample_batches(
    model,
    tok,
    cfg: Config,
    texts: Sequence[str],
    indices: Sequence[int],
    *,
    n: int,
    temperature: float,
    seed: int,
) -> list[Rollout]:
    """Sample ``n`` responses to each of ``texts`` (global prompt indices ``indices``) in generate calls of
    :func:`prompts_per_call` prompts (``value.rollout_batch_size``, fewer on a GPU whose memory would not hold their
    KV cache); each call is seeded from ``seed`` and its first prompt's index (:func:`_batch_seed`), so the
    samples do not depend on which worker or shard draws them."""
    rows: list[Rollout] = []
    bs = prompts_per_call(model, cfg, n)
    for k in range(0, len(indices), bs):
        rows += sample_responses(
            model,
            tok,
            texts[k : k + bs],
            n=n,
            max_new_tokens=cfg.value.rollout_max_tokens,
            temperature=temperature,
            seed=_batch_seed(seed, indices[k]),
            use_chat_template=cfg.model.chat_template,
            max_prompt_tokens=cfg.task.max_prompt_tokens,
        )
    return rows


def prompts_per_call(model, cfg: Config, n: int) -> int:
    """Prompts per ``generate`` call: ``value.rollout_batch_size`` on CPU; on a CUDA device as many as fit
    ``plan.gpu_memory_gib`` (else the device's memory) beside the weights, by
    :func:`mage_ray.stage_plan.rollout_prompts_per_call` with ``n`` samples per prompt."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return cfg.value.rollout_batch_size
    import dataclasses

    from mage_ray.memory_plan import shape_from_config
    from mage_ray.stage_plan import gpu_budget, rollout_prompts_per_call

    try:
        shape = shape_from_config(model.config.to_dict())
    except KeyError:  # not a Llama-style config: no plan, one call per batch
        return cfg.value.rollout_batch_size
    total = torch.cuda.get_device_properties(device).total_memory
    per_n = dataclasses.replace(cfg, value=dataclasses.replace(cfg.value, rollouts_per_prompt=n))
    return rollout_prompts_per_call(per_n, shape, gpu_budget(cfg, total))


def _sample_batches(model, tok, cfg: Config, texts: list[str], indices: list[int]) -> list[Rollout]:
    """The base policy's rollouts: ``value.rollouts_per_prompt`` samples at temperature 1, ``value.seed``."""
    return sample_batches(
        model, tok, cfg, texts, indices, n=cfg.value.rollouts_per_prompt, temperature=1.0, seed=cfg.value.seed
    )


def _run_local(cfg, out_dir, prompts, shards, n_shards, objectives) -> None:
    from mage_ray.models import load_policy

    model, tok = load_policy(cfg.model, cfg.storage.cache_dir, device=_device(cfg))
    objs = list(objectives) if objectives is not None else _default_objectives(cfg.task)
    n = cfg.value.rollouts_per_prompt
    for done, (s, indices) in enumerate(shards.items(), 1):
        t = time.time()
        rows = _sample_batches(model, tok, cfg, [prompts[i] for i in indices], indices)
        scores = score_rows(objs, [r[0] for r in rows], [r[1] for r in rows])
        table = rollout_table([i for i in indices for _ in range(n)], rows, scores)
        write_shard(table, join(out_dir, shard_name(s, n_shards)))
        print(
            f"[rollouts] shard {s} written: {len(rows)} rows in {time.time() - t:.1f}s ({done}/{len(shards)})"
        )


class _SampleActor:
    """Ray Data callable class: loads the policy once, samples each batch of prompts."""

    def __init__(self, cfg: Config):
        from mage_ray.devices import note_process
        from mage_ray.models import load_policy

        note_process("rollout sampler actor")
        self.cfg = cfg
        self.model, self.tok = load_policy(cfg.model, cfg.storage.cache_dir, device=_device(cfg))

    def __call__(self, batch: pa.Table) -> pa.Table:
        shard_of = dict(zip(batch.column("prompt_index").to_pylist(), batch.column("shard").to_pylist()))
        text_of = dict(zip(batch.column("prompt_index").to_pylist(), batch.column("prompt").to_pylist()))
        order = sorted(text_of)  # deterministic batch (and seed) whatever order the rows arrived in
        rows = _sample_batches(self.model, self.tok, self.cfg, [text_of[i] for i in order], order)
        n = self.cfg.value.rollouts_per_prompt
        table = rollout_table([i for i in order for _ in range(n)], rows, {})
        return table.append_column(
            "shard", pa.array([shard_of[i] for i in order for _ in range(n)], pa.int64())
        )


class _ScoreActor:
    """Ray Data callable class: loads the objectives once, appends one float column per objective."""

    def __init__(self, task_cfg: TaskConfig, objectives: Sequence[Any] | None):
        from mage_ray.devices import note_process

        note_process("rollout scorer actor")
        self.objectives = list(objectives) if objectives is not None else _default_objectives(task_cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        scores = score_rows(
            self.objectives, batch.column("prompt").to_pylist(), batch.column("response").to_pylist()
        )
        for name, vals in scores.items():
            batch = batch.append_column(name, pa.array(vals, pa.float64()))
        return batch


def _run_ray(cfg, out_dir, prompts, shards, n_shards, objectives) -> None:
    import ray.data

    from mage_ray.runtime import data_progress, init_ray

    init_ray()  # joins RAY_ADDRESS's cluster (ray job submit) or starts a local one; no-op when connected
    data_progress()  # Ray Data's progress bars on a terminal, its log lines otherwise
    res = dict(cfg.value.resources_per_worker)  # one sampling actor = one value worker's resources
    cpus = res.pop("CPU", 1)
    gpus = res.pop("GPU", 1) if cfg.value.use_gpu else 0
    res.pop("GPU", None)
    items = [{"prompt_index": i, "prompt": prompts[i], "shard": s} for s, idx in shards.items() for i in idx]
    from mage_ray.devices import note_request

    scorer_gpus = 0.5 if cfg.task.reward_device.startswith("cuda") else 0
    note_request("rollout sampler actor (Ray Data)", {"CPU": cpus, "GPU": gpus, **res}, cfg.value.num_workers)
    note_request("rollout scorer actor (Ray Data)", {"CPU": 1, "GPU": scorer_gpus})
    ds = ray.data.from_items(items)
    ds = ds.map_batches(
        _SampleActor,
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=cfg.value.rollout_batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.value.num_workers),
        num_cpus=cpus,
        num_gpus=gpus,
        resources=res or None,
    )
    ds = ds.map_batches(
        _ScoreActor,
        fn_constructor_kwargs={"task_cfg": cfg.task, "objectives": objectives},
        batch_size=max(64, cfg.value.rollout_batch_size * cfg.value.rollouts_per_prompt),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
        # A GPU reward model shares the device with the sampler; give the sampler <= 0.5 GPU to co-locate.
        num_gpus=scorer_gpus,
    )
    expected = {s: len(idx) * cfg.value.rollouts_per_prompt for s, idx in shards.items()}
    pending: dict[int, list[pa.Table]] = {s: [] for s in shards}
    done = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for s in set(batch.column("shard").to_pylist()):
            part = batch.filter(pc.equal(batch.column("shard"), s)).drop_columns(["shard"])
            pending[s].append(part)
            if sum(t.num_rows for t in pending[s]) == expected[s]:
                table = pa.concat_tables(pending.pop(s)).sort_by("prompt_index")
                write_shard(table, join(out_dir, shard_name(s, n_shards)))
                done += 1
                print(f"[rollouts] shard {s} written: {table.num_rows} rows ({done}/{len(shards)})")


__all__ = [
    "BASE_COLUMNS",
    "encode_prompts",
    "generate_rollouts",
    "read_rollouts",
    "rollout_files",
    "rollout_table",
    "sample_responses",
    "score_rows",
    "shard_name",
    "write_shard",
]
