"""Prompt datasets: the embedded prompt set and loaders for the paper's datasets.

Every loader returns plain strings (the raw user request); chat formatting happens in
``mage_ray.models.format_prompt``. Tasks (``TaskConfig.name``):

* ``embedded``: ~340 short everyday requests shipped in ``tasks/data/embedded_prompts.jsonl``
  (``{"prompt": ...}`` per line).
* ``hh_rlhf``: Anthropic/hh-rlhf (Sec 5.1.1). Rows hold ``chosen``/``rejected`` dialogues
  ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``; the prompt is everything up to and including the last
  ``"\\n\\nAssistant:"`` (a ``prompt`` column, where a copy of the data has one, is used as is). The
  prompt stays a dialogue string. To render it for a chat model use :func:`dialogue_to_messages`
  (turns -> chat messages, the trailing empty assistant turn dropped) and ``format_prompt(tok, messages)``;
  to continue it as raw text, disable the chat template. The reward models of the paper read the
  dialogue text itself (see ``objectives.hh_query``).
* ``summary``: Reddit TL;DR as used by RiC / Yang et al. 2024 (Sec 5.1.2): rows with ``info.post``
  (openai/summarize_from_feedback, config ``comparisons``), or a ``post`` or ``prompt`` column. The prompt
  is ``"Generate a one-sentence summary of this post.\\n\\n<post>"`` (newlines in the post replaced by
  spaces, as RiC does); :func:`summary_post` recovers the post.
* ``parquet``: any .parquet / .jsonl / .json file (or directory of them) with a ``prompt`` column.

``task.data_path`` is a local file or directory, or a hub dataset id ``owner/name[:config]`` loaded with
``datasets.load_dataset`` (needs hub access); a directory's files named ``train*`` / ``valid*|val*|dev*`` /
``test*`` are its splits. Splits are deterministic: a source with train, validation and test splits is used
as is; one with train and a single held-out split (hh-rlhf: train/test, summarize_from_feedback:
train/validation) splits the held-out one 1/3 validation, 2/3 test by a stable hash of the prompt text
(:func:`split_of`); any other source is pooled and split 70/10/20 by the same hash. Prompts are
de-duplicated (first occurrence kept) and capped at ``n_train`` / ``n_val`` / ``n_test``. Prompts are not
truncated here: ``max_prompt_tokens`` is applied by the decode side, which owns the tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from mage_ray.config import TaskConfig

SPLITS = ("train", "validation", "test")
SUMMARY_INSTRUCTION = "Generate a one-sentence summary of this post."
"""Prompt prefix of the Reddit summary task (MAGE (arXiv 2510.03782) Sec 5.1.2, after Yang et al. 2024b)."""
HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
DEFAULT_DATA = {"hh_rlhf": "Anthropic/hh-rlhf", "summary": "openai/summarize_from_feedback:comparisons"}
"""Hub dataset used when ``task.data_path`` is None."""
EMBEDDED_FILE = Path(__file__).with_name("data") / "embedded_prompts.jsonl"
FILE_TYPES = (".jsonl", ".json", ".parquet")
_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


class TaskDataError(ValueError):
    """A task's data cannot be found, read or parsed; the message names ``task.data_path``."""


# ---------------------------------------------------------------------------------------------
# Public API


def load_prompts(task: TaskConfig, split: str) -> list[str]:
    """Prompts of ``task`` for ``split`` (train | validation | test), at most n_train / n_val / n_test."""
    if split not in SPLITS:
        raise TaskDataError(f"split {split!r} is invalid: expected one of {list(SPLITS)}")
    limit = {"train": task.n_train, "validation": task.n_val, "test": task.n_test}[split]
    extract = _EXTRACTORS[task.name]
    return _take(_split_prompts(task, split, extract), limit)


def load_sft_pairs(task: TaskConfig, split: str = "train") -> list[tuple[str, str]] | None:
    """(prompt, preferred response) pairs for the optional SFT stage, or None for tasks without responses.

    hh_rlhf: the last assistant turn of ``chosen``. summary: the human-chosen summary
    (``summaries[choice].text``) or a ``summary`` column. Capped like :func:`load_prompts`.
    """
    if task.name not in ("hh_rlhf", "summary"):
        return None
    if split not in SPLITS:
        raise TaskDataError(f"split {split!r} is invalid: expected one of {list(SPLITS)}")
    limit = {"train": task.n_train, "validation": task.n_val, "test": task.n_test}[split]
    extract = _EXTRACTORS[task.name]
    answer = _hh_response if task.name == "hh_rlhf" else _summary_response
    pairs, seen = [], set()
    for prompt, row in _split_rows(task, split, extract):
        response = answer(row)
        if response and prompt not in seen:
            seen.add(prompt)
            pairs.append((prompt, response))
            if len(pairs) >= limit:
                break
    return pairs or None


def split_of(prompt: str, held_out_only: bool = False) -> str:
    """Deterministic split of a prompt: 70/10/20 by a SHA-256 bucket (1/3 : 2/3 val/test if held out)."""
    bucket = int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16) % 100
    if held_out_only:
        return "validation" if bucket < 33 else "test"
    return "train" if bucket < 70 else "validation" if bucket < 80 else "test"


def summary_prompt(post: str) -> str:
    """The summary task's prompt for a Reddit post (newlines replaced by spaces, as RiC does)."""
    return f"{SUMMARY_INSTRUCTION}\n\n{post.replace(chr(10), ' ').strip()}"


def summary_post(prompt: str) -> str:
    """The post inside a summary prompt (ours, or RiC's ``### Input: ... ### Response:`` format)."""
    text = prompt.strip()
    if text.startswith(SUMMARY_INSTRUCTION):
        return text[len(SUMMARY_INSTRUCTION) :].strip()
    if "### Input:" in text:
        return text.split("### Input:", 1)[1].split("### Response:", 1)[0].strip()
    return text


def dialogue_to_messages(prompt: str) -> list[dict[str, str]]:
    """Split an hh-rlhf dialogue into chat messages; a prompt without turn markers is one user message.

    ``"\\n\\nHuman: hi\\n\\nAssistant: hello\\n\\nHuman: bye\\n\\nAssistant:"`` ->
    ``[user: hi, assistant: hello, user: bye]`` (the trailing empty assistant turn is dropped).
    """
    if HUMAN not in prompt:
        return [{"role": "user", "content": prompt.strip()}]
    messages: list[dict[str, str]] = []
    for chunk in prompt.split(HUMAN)[1:]:
        human, *assistant = chunk.split(ASSISTANT)
        messages.append({"role": "user", "content": human.strip()})
        for turn in assistant:  # normally one; several if the text repeats the marker
            messages.append({"role": "assistant", "content": turn.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def last_user_turn(prompt: str) -> str:
    """The last human turn of a dialogue (the whole prompt if it is not a dialogue)."""
    users = [m["content"] for m in dialogue_to_messages(prompt) if m["role"] == "user"]
    return users[-1] if users else prompt.strip()


# ---------------------------------------------------------------------------------------------
# Row -> prompt extractors (return None to skip a row with nothing usable)


def _prompt_column(row: dict[str, Any]) -> str | None:
    value = row.get("prompt")
    return value.strip() if isinstance(value, str) and value.strip() else None


def _hh_prompt(row: dict[str, Any]) -> str | None:
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return row["prompt"]
    for key in ("chosen", "rejected"):
        text = row.get(key)
        if isinstance(text, str) and ASSISTANT in text:
            return text[: text.rindex(ASSISTANT) + len(ASSISTANT)]
    return None


def _hh_response(row: dict[str, Any]) -> str | None:
    text = row.get("chosen")
    if isinstance(text, str) and ASSISTANT in text:
        return text[text.rindex(ASSISTANT) + len(ASSISTANT) :].strip() or None
    return None


def _summary_prompt(row: dict[str, Any]) -> str | None:
    info = row.get("info")
    post = info.get("post") if isinstance(info, dict) else None
    if not isinstance(post, str):
        post = row.get("post")
    if not isinstance(post, str):
        post = row.get("prompt")
        if isinstance(post, str):
            post = summary_post(post.removesuffix("TL;DR:"))
    return summary_prompt(post) if isinstance(post, str) and post.strip() else None


def _summary_response(row: dict[str, Any]) -> str | None:
    summaries, choice = row.get("summaries"), row.get("choice")
    if isinstance(summaries, list) and isinstance(choice, int) and 0 <= choice < len(summaries):
        text = summaries[choice].get("text") if isinstance(summaries[choice], dict) else None
    else:
        text = row.get("summary")
    if not isinstance(text, str):
        return None
    return text.replace("\n", " ").strip() or None


_EXTRACTORS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "embedded": _prompt_column,
    "parquet": _prompt_column,
    "hh_rlhf": _hh_prompt,
    "summary": _summary_prompt,
}
_REQUIRED = {
    "embedded": "a 'prompt' column",
    "parquet": "a 'prompt' column",
    "hh_rlhf": "'chosen' / 'rejected' dialogues containing '\\n\\nAssistant:' (or a 'prompt' column)",
    "summary": "an 'info' object with a 'post', or a 'post' or 'prompt' column",
}


# ---------------------------------------------------------------------------------------------
# Sources and splits


def _take(prompts: Iterable[str], limit: int) -> list[str]:
    out, seen = [], set()
    for p in prompts:
        if p not in seen:
            seen.add(p)
            out.append(p)
            if len(out) >= limit:
                break
    return out


def _split_prompts(task: TaskConfig, split: str, extract) -> Iterator[str]:
    for prompt, _ in _split_rows(task, split, extract):
        yield prompt


def _split_rows(task: TaskConfig, split: str, extract) -> Iterator[tuple[str, dict[str, Any]]]:
    """(prompt, row) pairs of one split, in source order."""
    where = _where(task)
    source, held_out = _plan(_sources(task), split)
    n_rows = n_prompts = 0
    for row in source():
        n_rows += 1
        if not isinstance(row, dict):
            raise TaskDataError(f"{where}: row {n_rows - 1} is a {type(row).__name__}, expected an object")
        prompt = extract(row)
        if prompt is None:
            continue
        n_prompts += 1
        if held_out is None or split_of(prompt, held_out_only=held_out) == split:
            yield prompt, row
    if n_rows and not n_prompts:
        raise TaskDataError(
            f"{where}: no usable rows for task '{task.name}' (expected {_REQUIRED[task.name]})"
        )


def _plan(pools: dict[str, Callable[[], Iterator[dict]]], split: str):
    """(row source, hashing) for ``split``: None = the source's own split, True = 1/3 : 2/3 of the one
    held-out split, False = 70/10/20 of all rows (a source without a train + held-out structure)."""
    held = [s for s in ("validation", "test") if s in pools]
    if "train" in pools and len(held) == 2:
        return pools[split], None
    if "train" in pools and len(held) == 1:
        return (pools["train"], None) if split == "train" else (pools[held[0]], True)
    sources = list(pools.values())
    return (lambda: (row for src in sources for row in src())), False


def _where(task: TaskConfig) -> str:
    if task.data_path is None and task.name == "embedded":
        return f"embedded prompt file {str(EMBEDDED_FILE)!r}"
    return f"task.data_path = {task.data_path or DEFAULT_DATA.get(task.name)!r}"


def _sources(task: TaskConfig) -> dict[str, Callable[[], Iterator[dict[str, Any]]]]:
    """Split name (train | validation | test | all) -> a function yielding that split's rows."""
    if task.data_path is None:
        if task.name == "embedded":
            return {"all": lambda: iter(_embedded_rows())}
        if task.name == "parquet":
            raise TaskDataError(
                "task.data_path is required for task 'parquet': a .parquet/.jsonl/.json file or dir"
            )
        return _hub_or_mapped(task, DEFAULT_DATA[task.name])
    raw = str(task.data_path)
    path = Path(raw).expanduser()
    if path.exists():
        return _local_sources(task, path)
    if _local_name(raw):
        raise TaskDataError(
            f"task.data_path = {raw!r} does not exist (expected a {'/'.join(FILE_TYPES)} file, a directory "
            "of them, or a hub dataset id owner/name[:config])"
        )
    return _hub_or_mapped(task, raw)


def _hub_or_mapped(task: TaskConfig, dataset_id: str) -> dict[str, Callable[[], Iterator[dict[str, Any]]]]:
    """A hub dataset, or the local directory ``MAGE_RAY_HUB_MAP`` maps its id to (:func:`mage_ray.devices.hub_source`)."""
    from mage_ray.devices import hub_source

    local = hub_source(dataset_id)
    if local != dataset_id:
        return _local_sources(task, Path(local))
    return _hub_sources(task, dataset_id)


def _local_name(raw: str) -> bool:
    """A ``task.data_path`` that names a local file or directory (not a hub dataset id owner/name[:config])."""
    return raw.startswith((".", "/", "~")) or Path(raw).suffix.lower() in FILE_TYPES or raw.count("/") > 1


def check_data_path(task: TaskConfig) -> None:
    """Raise TaskDataError when ``task.data_path`` cannot name data: a task that needs a path has none, or a
    local file or directory is missing or holds no data files. Reads no rows and never contacts the hub (a hub
    dataset id passes)."""
    raw = task.data_path
    if raw is None and task.name != "parquet":
        return  # the embedded file, or the task's default hub dataset
    if raw is None or Path(str(raw)).expanduser().exists() or _local_name(str(raw)):
        _sources(task)  # lists local files only: raises for a missing path or a directory without data files


@functools.lru_cache(maxsize=1)
def _embedded_rows() -> tuple[dict[str, Any], ...]:
    return tuple(_read_file(EMBEDDED_FILE, f"embedded prompt file {str(EMBEDDED_FILE)!r}"))


def _local_sources(task: TaskConfig, path: Path) -> dict[str, Callable[[], Iterator[dict[str, Any]]]]:
    where = f"task.data_path = {task.data_path!r}"
    if path.is_file():
        if path.suffix.lower() not in FILE_TYPES:
            raise TaskDataError(
                f"{where}: unsupported file type {path.suffix!r}; expected one of {list(FILE_TYPES)}"
            )
        return {"all": lambda: iter(_read_file(path, where))}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_TYPES)
    if not files:
        raise TaskDataError(f"{where} is a directory without {'/'.join(FILE_TYPES)} files")
    by_split: dict[str, list[Path]] = {}
    for f in files:
        stem = f.name.lower().split(".")[0]
        for split, aliases in _SPLIT_ALIASES.items():
            if any(stem == a or stem.startswith(a + "-") or stem.startswith(a + "_") for a in aliases):
                by_split.setdefault(split, []).append(f)
    groups = by_split if by_split else {"all": files}

    def reader(paths: list[Path]) -> Callable[[], Iterator[dict[str, Any]]]:
        return lambda: (row for p in paths for row in _read_file(p, where))

    return {split: reader(paths) for split, paths in groups.items()}


def _read_file(path: Path, where: str) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        if suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (OSError, ValueError) as e:  # json.JSONDecodeError and pyarrow.ArrowInvalid are ValueErrors
        raise TaskDataError(f"{where}: cannot read {str(path)!r}: {type(e).__name__}: {e}") from None
    if isinstance(data, dict):  # {"data": [...]} or a mapping of columns
        if isinstance(data.get("data"), list):
            return data["data"]
        if data and all(isinstance(v, list) for v in data.values()):
            keys = list(data)
            return [dict(zip(keys, values)) for values in zip(*(data[k] for k in keys))]
    if isinstance(data, list):
        return data
    raise TaskDataError(f"{where}: {str(path)!r} holds no list of rows")


def _hub_sources(task: TaskConfig, dataset_id: str) -> dict[str, Callable[[], Iterator[dict[str, Any]]]]:
    """Splits of a hub dataset (needs network access to the Hugging Face hub, or a datasets cache)."""
    name, _, config = dataset_id.partition(":")
    where = f"task.data_path = {task.data_path or dataset_id!r}"
    try:
        import datasets

        dd = datasets.load_dataset(name, config or None)
    except Exception as e:  # noqa: BLE001 - any failure means the dataset is unavailable here
        raise TaskDataError(
            f"{where}: hub dataset {name!r} could not be loaded ({type(e).__name__}: {str(e)[:200]}). "
            "This machine needs access to the Hugging Face hub (or a datasets cache holding it); otherwise "
            "point task.data_path at a local .jsonl/.json/.parquet file or directory."
        ) from None
    pools: dict[str, Callable[[], Iterator[dict[str, Any]]]] = {}
    for split, aliases in _SPLIT_ALIASES.items():
        hub_split = next((a for a in aliases if a in dd), None)
        if hub_split is not None:
            pools[split] = functools.partial(iter, dd[hub_split])
    if not pools:
        pools["all"] = functools.partial(iter, dd[next(iter(dd))])
    return pools
