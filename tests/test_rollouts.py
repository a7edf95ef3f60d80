"""Rollouts: sampling, Parquet schema, resumable shards, the Ray Data path (tiny random model)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from mage_ray.config import load_config
from mage_ray.models import load_policy
from mage_ray.train.rollouts import (
    BASE_COLUMNS,
    encode_prompts,
    generate_rollouts,
    read_rollouts,
    rollout_files,
    sample_responses,
)

PROMPTS = [f"Tell me something about the number {i}." for i in range(6)]


class CharCount:
    """Toy objective: number of 'e' characters in the response."""

    name = "e_count"

    def __call__(self, prompts, responses):
        return np.array([r.count("e") for r in responses], dtype=float)


class Length:
    name = "length"

    def __call__(self, prompts, responses):
        return np.array([len(r) for r in responses], dtype=float)


def _cfg(tmp_path, *extra):
    return load_config(
        "configs/smoke.yaml",
        [
            f"storage.storage_path={tmp_path}",
            "value.rollouts_per_prompt=2",
            "value.rollout_max_tokens=6",
            "value.rollout_batch_size=4",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def tiny():
    from mage_ray.config import ModelConfig

    return load_policy(ModelConfig(name_or_path="tiny-random"))


def test_sample_responses_shapes_order_and_seed(tiny):
    model, tok = tiny
    rows = sample_responses(model, tok, PROMPTS[:3], n=2, max_new_tokens=5, seed=7)
    assert len(rows) == 6
    expected_ids = encode_prompts(tok, PROMPTS[:3])
    eos = tok.eos_token_id
    for k, (prompt, text, prompt_ids, response_ids) in enumerate(rows):
        assert prompt == PROMPTS[k // 2]  # prompt-major: both samples of prompt 0 first
        assert prompt_ids == expected_ids[k // 2]
        assert 1 <= len(response_ids) <= 5
        assert eos not in response_ids[:-1]  # cut at (and including) the first EOS
        assert text == tok.decode(response_ids, skip_special_tokens=True)
    again = sample_responses(model, tok, PROMPTS[:3], n=2, max_new_tokens=5, seed=7)
    assert [r[3] for r in again] == [r[3] for r in rows]
    other = sample_responses(model, tok, PROMPTS[:3], n=2, max_new_tokens=5, seed=8)
    assert [r[3] for r in other] != [r[3] for r in rows]


def test_encode_prompts_is_chat_formatted_and_truncated_from_the_left(tiny):
    _, tok = tiny
    full = encode_prompts(tok, ["hello there"])[0]
    assert tok.decode(full).startswith("<|im_start|>")
    assert tok.decode(full).endswith("<|im_start|>assistant\n")
    short = encode_prompts(tok, ["hello there"], max_prompt_tokens=5)[0]
    assert short == full[-5:]


def test_generate_rollouts_schema_scores_and_resume(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    objs = [CharCount(), Length()]
    out = generate_rollouts(cfg, prompts=PROMPTS, objectives=objs, prompts_per_shard=2)
    assert out == f"{tmp_path}/smoke/rollouts"
    files = rollout_files(out)
    assert [os.path.basename(f) for f in files] == [f"shard-0000{i}-of-00003.parquet" for i in range(3)]
    table = read_rollouts(out)
    assert table.column_names == [*BASE_COLUMNS, "e_count", "length"]
    assert table.schema.field("prompt_ids").type == pa.list_(pa.int64())
    assert table.schema.field("response_ids").type == pa.list_(pa.int64())
    assert table.schema.field("length").type == pa.float64()
    assert table.num_rows == len(PROMPTS) * 2
    assert table.column("prompt_index").to_pylist() == [i for i in range(len(PROMPTS)) for _ in range(2)]
    responses = table.column("response").to_pylist()
    np.testing.assert_array_equal(table.column("length").to_numpy(), [len(r) for r in responses])
    np.testing.assert_array_equal(table.column("e_count").to_numpy(), [r.count("e") for r in responses])

    # Resume: drop one shard; a rerun rewrites only that one and leaves the others untouched.
    mtimes = {f: os.stat(f).st_mtime_ns for f in files}
    os.remove(files[1])
    capsys.readouterr()
    generate_rollouts(cfg, prompts=PROMPTS, objectives=objs, prompts_per_shard=2)
    log = capsys.readouterr().out
    assert "2/3 shards present" in log and "1 to do" in log
    assert os.stat(files[0]).st_mtime_ns == mtimes[files[0]]
    assert os.stat(files[2]).st_mtime_ns == mtimes[files[2]]
    assert read_rollouts(out).equals(table)  # same seeds -> the regenerated shard is identical
    generate_rollouts(cfg, prompts=PROMPTS, objectives=objs, prompts_per_shard=2)
    assert "3/3 shards present" in capsys.readouterr().out


def test_generate_rollouts_refuses_to_mix_settings(tmp_path):
    objs = [CharCount(), Length()]
    generate_rollouts(_cfg(tmp_path), prompts=PROMPTS[:2], objectives=objs, prompts_per_shard=2)
    with pytest.raises(ValueError, match="rollout_max_tokens"):
        generate_rollouts(
            _cfg(tmp_path, "value.rollout_max_tokens=7"),
            prompts=PROMPTS[:2],
            objectives=objs,
            prompts_per_shard=2,
        )


def test_objective_name_clash_is_an_error(tmp_path):
    class Bad:
        name = "response"

        def __call__(self, prompts, responses):
            return np.zeros(len(responses))

    with pytest.raises(ValueError, match="clash"):
        generate_rollouts(_cfg(tmp_path), prompts=PROMPTS[:1], objectives=[Bad()], prompts_per_shard=1)


def test_ray_data_path(tmp_path):
    """Ray Data pipeline on a local 2-CPU Ray, with registry objectives loaded inside the scoring actor."""
    import ray

    cfg = _cfg(tmp_path, "task.objectives=[conciseness,readability]")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = generate_rollouts(cfg, prompts=PROMPTS, use_ray=True, prompts_per_shard=4)
    finally:
        if started:
            ray.shutdown()
    from mage_ray.tasks.objectives import get_objective

    table = read_rollouts(out)
    assert len(rollout_files(out)) == 2
    assert table.column_names == [*BASE_COLUMNS, "conciseness", "readability"]
    assert sorted(table.column("prompt_index").to_pylist()) == [
        i for i in range(len(PROMPTS)) for _ in range(2)
    ]
    prompts, responses = table.column("prompt").to_pylist(), table.column("response").to_pylist()
    assert prompts == [PROMPTS[i] for i in table.column("prompt_index").to_pylist()]
    expected = get_objective("conciseness")(prompts, responses)
    np.testing.assert_allclose(table.column("conciseness").to_numpy(), expected)
