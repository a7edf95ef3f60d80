"""Prompt datasets: embedded set, hh-rlhf / summary / parquet loaders on fixtures, deterministic splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mage_ray.config import TaskConfig
from mage_ray.tasks import prompts as P
from mage_ray.tasks.prompts import (
    SPLITS,
    SUMMARY_INSTRUCTION,
    TaskDataError,
    dialogue_to_messages,
    last_user_turn,
    load_prompts,
    load_sft_pairs,
    split_of,
    summary_post,
)

FIX = Path(__file__).parent / "fixtures"
BIG = dict(n_train=100_000, n_val=100_000, n_test=100_000)


def _all_splits(task: TaskConfig) -> dict[str, list[str]]:
    return {s: load_prompts(task, s) for s in SPLITS}


def _assert_disjoint(splits: dict[str, list[str]]) -> None:
    for s, items in splits.items():
        assert len(items) == len(set(items)), f"duplicates inside {s}"
    a, b, c = (set(splits[s]) for s in SPLITS)
    assert not (a & b) and not (a & c) and not (b & c)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# embedded


def test_embedded_splits_disjoint_deterministic_and_sized():
    task = TaskConfig(**BIG)
    splits = _all_splits(task)
    _assert_disjoint(splits)
    total = sum(len(v) for v in splits.values())
    rows = _jsonl(P.EMBEDDED_FILE)
    assert total == len(rows) == len({r["prompt"] for r in rows}) >= 300
    # ~70/10/20 by hash; the defaults (n_train 256 > train size is fine, n_val 16, n_test 64) are met
    assert 0.6 < len(splits["train"]) / total < 0.8
    assert len(splits["validation"]) >= 16 and len(splits["test"]) >= 64
    assert _all_splits(task) == splits  # deterministic
    assert all(isinstance(p, str) and 0 < len(p) < 200 for p in splits["train"])


def test_embedded_caps_and_order():
    full = load_prompts(TaskConfig(**BIG), "test")
    assert load_prompts(TaskConfig(n_test=5), "test") == full[:5]
    assert len(load_prompts(TaskConfig(n_val=3), "validation")) == 3


def test_bad_split_names_allowed_values():
    with pytest.raises(TaskDataError, match=r"'dev'.*train.*validation.*test"):
        load_prompts(TaskConfig(), "dev")


def test_split_of_is_a_stable_hash():
    """split_of depends only on the text; roughly 70/10/20 and 1/3 : 2/3 on many strings."""
    texts = [f"prompt number {i}" for i in range(3000)]
    counts = {s: sum(split_of(t) == s for t in texts) for s in SPLITS}
    assert abs(counts["train"] / 3000 - 0.7) < 0.04 and abs(counts["test"] / 3000 - 0.2) < 0.04
    held = sum(split_of(t, held_out_only=True) == "validation" for t in texts) / 3000
    assert abs(held - 1 / 3) < 0.04
    assert [split_of(t) for t in texts[:50]] == [split_of(t) for t in texts[:50]]


# ---------------------------------------------------------------------------------------------
# hh-rlhf


def test_hh_rlhf_directory_with_train_and_test_files():
    """train.jsonl -> train; test.jsonl -> 1/3 validation + 2/3 test by hash, disjoint, nothing lost."""
    task = TaskConfig(
        name="hh_rlhf", objectives=["helpful", "harmless"], data_path=str(FIX / "hh_rlhf"), **BIG
    )
    splits = _all_splits(task)
    _assert_disjoint(splits)
    train_rows, test_rows = _jsonl(FIX / "hh_rlhf" / "train.jsonl"), _jsonl(FIX / "hh_rlhf" / "test.jsonl")
    assert len(splits["train"]) == len(train_rows)
    assert len(splits["validation"]) + len(splits["test"]) == len(test_rows)
    first = train_rows[0]["chosen"]
    assert splits["train"][0] == first[: first.rindex("\n\nAssistant:") + len("\n\nAssistant:")]
    for p in splits["train"] + splits["test"]:
        assert p.startswith("\n\nHuman:") and p.endswith("\n\nAssistant:")
    multi = [p for p in splits["train"] if p.count("\n\nHuman:") == 2]
    assert multi and "snake plant" in multi[0] and "Yes, snake plants" not in multi[0]


def test_hh_rlhf_single_file_is_split_70_10_20(tmp_path):
    rows = _jsonl(FIX / "hh_rlhf" / "train.jsonl") + _jsonl(FIX / "hh_rlhf" / "test.jsonl")
    f = tmp_path / "hh.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = _all_splits(TaskConfig(name="hh_rlhf", data_path=str(f), **BIG))
    _assert_disjoint(splits)
    assert sum(len(v) for v in splits.values()) == len(rows)
    for s, items in splits.items():
        assert all(split_of(p) == s for p in items)


def test_hh_rlhf_sft_pairs_use_the_chosen_answer():
    task = TaskConfig(name="hh_rlhf", data_path=str(FIX / "hh_rlhf"), n_train=3)
    pairs = load_sft_pairs(task)
    assert len(pairs) == 3
    assert pairs[0] == (
        load_prompts(task, "train")[0],
        "Fold a rectangle in half, fold the corners down, then open it into a boat shape.",
    )
    assert load_sft_pairs(TaskConfig()) is None


def test_hh_rlhf_rows_without_dialogue_fail_clearly(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(TaskDataError, match=r"bad.jsonl.*chosen"):
        load_prompts(TaskConfig(name="hh_rlhf", data_path=str(f)), "train")


def test_dialogue_helpers():
    d = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: how are you?\n\nAssistant:"
    assert dialogue_to_messages(d) == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "how are you?"},
    ]
    assert last_user_turn(d) == "how are you?"
    assert dialogue_to_messages("Plain request?") == [{"role": "user", "content": "Plain request?"}]
    assert last_user_turn("  Plain request? ") == "Plain request?"


# ---------------------------------------------------------------------------------------------
# summary


def test_summary_comparisons_fixture():
    """info.post rows -> instruction + post (newlines -> spaces); the duplicated post appears once."""
    task = TaskConfig(
        name="summary",
        objectives=["faithful", "summary"],
        data_path=str(FIX / "summary_comparisons.jsonl"),
        **BIG,
    )
    splits = _all_splits(task)
    _assert_disjoint(splits)
    rows = _jsonl(FIX / "summary_comparisons.jsonl")
    posts = {r["info"]["post"].replace("\n", " ").strip() for r in rows}
    got = [p for s in SPLITS for p in splits[s]]
    assert len(got) == len(posts) == 10
    for p in got:
        assert p.startswith(SUMMARY_INSTRUCTION + "\n\n") and "\n" not in p[len(SUMMARY_INSTRUCTION) + 2 :]
        assert summary_post(p) in posts
    pairs = load_sft_pairs(task, "train")
    by_post = {
        r["info"]["post"].replace("\n", " ").strip(): r["summaries"][r["choice"]]["text"] for r in rows[:10]
    }
    assert pairs and all(resp == by_post[summary_post(prompt)] for prompt, resp in pairs)


def test_summary_post_and_prompt_columns(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(
        json.dumps(
            [
                {"post": "A post about cats and dogs living together in peace."},
                {"prompt": "SUBREDDIT: r/pets POST: My dog ate my homework. TL;DR:"},
            ]
        )
    )
    got = [p for s in SPLITS for p in load_prompts(TaskConfig(name="summary", data_path=str(f), **BIG), s)]
    assert sorted(summary_post(p) for p in got) == [
        "A post about cats and dogs living together in peace.",
        "SUBREDDIT: r/pets POST: My dog ate my homework.",
    ]


def test_summary_post_reads_ric_format():
    ric = f"### Instruction: {SUMMARY_INSTRUCTION} ### Input: my cat is great ### Response: "
    assert summary_post(ric) == "my cat is great"
    assert summary_post(P.summary_prompt("line one\nline two")) == "line one line two"


# ---------------------------------------------------------------------------------------------
# parquet / generic files, errors, hub path


def test_parquet_jsonl_and_json_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _jsonl(FIX / "prompts.jsonl")
    expected = sorted(r["prompt"] for r in rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "cols.json").write_text(json.dumps({"prompt": [r["prompt"] for r in rows]}))
    for path in (tmp_path / "p.parquet", FIX / "prompts.jsonl", tmp_path / "cols.json"):
        splits = _all_splits(TaskConfig(name="parquet", data_path=str(path), **BIG))
        _assert_disjoint(splits)
        assert sorted(p for s in SPLITS for p in splits[s]) == expected
    capped = load_prompts(
        TaskConfig(name="parquet", data_path=str(tmp_path / "p.parquet"), n_train=2), "train"
    )
    assert len(capped) == 2


def test_missing_or_wrong_data_errors(tmp_path):
    with pytest.raises(
        TaskDataError, match=r"task.data_path = '/nonexistent/prompts.parquet' does not exist"
    ):
        load_prompts(TaskConfig(name="parquet", data_path="/nonexistent/prompts.parquet"), "train")
    with pytest.raises(TaskDataError, match=r"task.data_path = 'data/missing.jsonl' does not exist"):
        load_prompts(TaskConfig(name="parquet", data_path="data/missing.jsonl"), "train")
    with pytest.raises(TaskDataError, match="task.data_path is required"):
        load_prompts(TaskConfig(name="parquet"), "train")
    no_prompt = tmp_path / "x.jsonl"
    no_prompt.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(TaskDataError, match=r"x.jsonl.*'prompt' column"):
        load_prompts(TaskConfig(name="parquet", data_path=str(no_prompt)), "train")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(TaskDataError, match="cannot read"):
        load_prompts(TaskConfig(name="parquet", data_path=str(broken)), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskDataError, match="directory without"):
        load_prompts(TaskConfig(name="parquet", data_path=str(tmp_path / "empty")), "train")


def test_hub_dataset_path(monkeypatch):
    """A hub id goes through datasets.load_dataset (patched here: no network) and its train/test splits."""
    import datasets

    calls = []
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(_jsonl(FIX / "hh_rlhf" / "train.jsonl")),
            "test": datasets.Dataset.from_list(_jsonl(FIX / "hh_rlhf" / "test.jsonl")),
        }
    )

    def fake_load(name, config=None, **kw):
        calls.append((name, config))
        return dd

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    task = TaskConfig(name="hh_rlhf", **BIG)  # data_path None -> Anthropic/hh-rlhf
    local = _all_splits(TaskConfig(name="hh_rlhf", data_path=str(FIX / "hh_rlhf"), **BIG))
    assert _all_splits(task) == local
    assert calls[0] == ("Anthropic/hh-rlhf", None)
    calls.clear()
    with pytest.raises(TaskDataError):  # hh fixture rows have no post: summary finds nothing usable
        load_prompts(TaskConfig(name="summary"), "train")
    assert calls[0] == ("openai/summarize_from_feedback", "comparisons")


def test_hub_dataset_unavailable(monkeypatch):
    import datasets

    def fail(*a, **kw):
        raise ConnectionError("Couldn't reach 'org/data' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(
        TaskDataError, match=r"task.data_path = 'org/data'.*needs access to the Hugging Face hub"
    ):
        load_prompts(TaskConfig(name="parquet", data_path="org/data"), "train")
