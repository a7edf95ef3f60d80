"""Shared fixtures of the offline-trainer tests (RiC, MODPO, WRPO): the smoke config they train with and
synthetic scored rollouts.

    from offline_fixtures import OBJECTIVES, offline_cfg, write_rollouts    # tests/ is on sys.path under pytest
"""

from __future__ import annotations

import numpy as np

from mage_ray.config import load_config

OBJECTIVES = ["conciseness", "readability"]


def offline_cfg(tmp_path, *extra: str):
    """The smoke config on ``OBJECTIVES`` with 2 short training steps; ``extra``: more key=value overrides."""
    return load_config(
        "configs/smoke.yaml",
        [
            f"storage.storage_path={tmp_path}",
            "task.objectives=[conciseness,readability]",
            "backbone.steps=2",
            "backbone.prompts_per_step=2",
            "backbone.num_generations=2",
            "backbone.checkpoint_every=1",
            "backbone.max_failures=1",  # a worker group slow to start on a loaded machine is retried
            "backbone.learning_rate=0.01",
            *extra,
        ],
    )


def write_rollouts(path, n_prompts: int = 6, per_prompt: int = 3, seed: int = 0) -> str:
    """Synthetic scored rollouts in the rollout schema: random 6-token responses (ids 1000..1099 + EOS) to
    real chat-formatted prompts, random scores per objective of ``OBJECTIVES``."""
    from mage_ray.models import load_tokenizer
    from mage_ray.train.rollouts import encode_prompts, rollout_table, write_shard

    tok = load_tokenizer("tiny-random")
    rng = np.random.default_rng(seed)
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(n_prompts)]
    p_ids = encode_prompts(tok, prompts)
    rows, idx = [], []
    for i, p in enumerate(prompts):
        for _ in range(per_prompt):
            ids = [int(t) for t in rng.integers(1000, 1100, size=6)] + [tok.eos_token_id]
            rows.append((p, tok.decode(ids, skip_special_tokens=True), p_ids[i], ids))
            idx.append(i)
    scores = {o: rng.uniform(0, 1, size=len(rows)) for o in OBJECTIVES}
    out = str(path / "rollouts.parquet")
    write_shard(rollout_table(idx, rows, scores), out)
    return out
