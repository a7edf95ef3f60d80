"""Language-quality gate shared by the embedded objectives, and the degenerate-text flag of every report.

RL against a lexical proxy finds degenerate text that scores well: one glued token is "one
word", an echo of the prompt is "relevant", ``"עקב עקב עקב."`` is short. Every embedded objective therefore
multiplies its raw score by a quality factor q(x, y) in [0, 1]:

    r_j(x, y) = q(x, y) * raw_j(x, y),     q = min_k check_k(x, y)

so degenerate text scores the objective's floor (0) and a fluent answer keeps its raw score. Each check is a
clipped linear ramp from 0 (surely degenerate) to 1 (normal English prose), so q is soft enough to give RL a
direction. The weakest check decides, and names the reason:

=============  ===============================================================  ==========================
check          measures                                                         0 at ... 1 at
=============  ===============================================================  ==========================
words          number of words (runs of letters/digits)                         1 word ... 3 words
script         fraction of letters that are ASCII a-z (English task)            0.80 ... 0.95
symbols        fraction of non-space characters that are letters                0.40 ... 0.65
repetition     min of: distinct words / words (>= 3 words), distinct word        see ``_repetition``
               bigrams / bigrams (>= 4 bigrams), longest run of one character
vocabulary     fraction of words that are English words (wordfreq Zipf >= 1.5,  0.60 ... 0.85
               or a number of at most 4 digits)
echo           words left after removing word trigrams copied from the prompt  1 word ... 3 words
=============  ===============================================================  ==========================

A response is **degenerate** when q < 0.5 (``DEGENERATE_BELOW``). The thresholds were set on a fixed set of
real answers and degenerate responses (``tests/fixtures/degenerate.jsonl``; the tests assert that every real
answer passes and every degenerate one is flagged) before any front was measured. An empty, whitespace-only or
non-text response has q = 0. Checks are lexical and need no model: the gate runs inside every GRPO reward call.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

DEGENERATE_BELOW = 0.5
"""A response whose quality q is below this is flagged degenerate in every report."""
MIN_WORDS = 3
"""An answer has at least this many words for q = 1 (one word scores 0)."""
ZIPF_WORD = 1.5
"""A word is English when its wordfreq Zipf frequency is at least this (``votum`` 1.1, ``houseplant`` 2.1)."""
CHECKS = ("words", "script", "symbols", "repetition", "vocabulary", "echo")

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")  # unicode letters/digits with inner apostrophes
_RUN = re.compile(r"(\S)\1*")


def _ramp(x: float, zero: float, one: float) -> float:
    """Clipped linear ramp: 0 at ``zero``, 1 at ``one`` (either order)."""
    return float(min(1.0, max(0.0, (x - zero) / (one - zero))))


@lru_cache(maxsize=200_000)
def is_english_word(word: str) -> bool:
    """True for a word of English (wordfreq Zipf >= ZIPF_WORD) or a number of at most 4 digits."""
    if word.isdigit():
        return len(word) <= 4
    if len(word) > 24:  # a glued token
        return False
    from wordfreq import zipf_frequency

    return zipf_frequency(word, "en") >= ZIPF_WORD


def words(text: str) -> list[str]:
    """Lower-cased words: runs of unicode letters/digits (with inner apostrophes); punctuation is not a word."""
    return [w.lower().replace("’", "'") for w in _WORD.findall(text)]


def _repetition(text: str, ws: list[str]) -> float:
    """min of three ramps: distinct words / words (0 at 0.3, 1 at 0.55; texts of >= 3 words), distinct word
    bigrams / bigrams (0 at 0.5, 1 at 0.8; >= 4 bigrams) and the longest run of one non-space character
    (1 up to 3, 0 from 6: ``Mmmmmmmm``, ``1111111``, ``!!!!!!``)."""
    out = 1.0
    if len(ws) >= 3:
        out = min(out, _ramp(len(set(ws)) / len(ws), 0.3, 0.55))
    bigrams = list(zip(ws, ws[1:]))
    if len(bigrams) >= 4:
        out = min(out, _ramp(len(set(bigrams)) / len(bigrams), 0.5, 0.8))
    longest = max((len(m.group(0)) for m in _RUN.finditer(text.lower())), default=0)
    return min(out, _ramp(longest, 6, 3))


def _echo(prompt_words: list[str], ws: list[str]) -> float:
    """How much the response says beyond copying the prompt: the words left after removing every word trigram
    that also occurs in the prompt, 0 at 1 word left, 1 at MIN_WORDS (an echo of the question scores 0; a
    restated question followed by a real answer passes)."""
    prompt_tri = set(zip(prompt_words, prompt_words[1:], prompt_words[2:]))
    copied = [False] * len(ws)
    for i in range(len(ws) - 2):
        if (ws[i], ws[i + 1], ws[i + 2]) in prompt_tri:
            copied[i] = copied[i + 1] = copied[i + 2] = True
    return _ramp(len(ws) - sum(copied), 1, MIN_WORDS)


@dataclass(frozen=True)
class Quality:
    """q = min of the checks (each in [0, 1]) and the check values themselves."""

    q: float
    checks: dict[str, float]

    @property
    def degenerate(self) -> bool:
        return self.q < DEGENERATE_BELOW

    @property
    def reason(self) -> str:
        """The weakest check ('' when q = 1)."""
        return "" if self.q >= 1.0 else min(self.checks, key=self.checks.get)


def as_text(x) -> str:
    """A response as text: str as is, bytes decoded (undecodable bytes become U+FFFD), anything else ''."""
    if isinstance(x, str):
        return x
    if isinstance(x, (bytes, bytearray)):
        return bytes(x).decode("utf-8", errors="replace")
    return ""


def quality(prompt: str, response) -> Quality:
    """The quality gate q(x, y) of one (prompt, response) pair; see the module docstring."""
    text = as_text(response)
    ws = words(text)
    if not ws:
        return Quality(0.0, dict.fromkeys(CHECKS, 0.0))
    letters = [c for c in text if c.isalpha()]
    non_space = sum(not c.isspace() for c in text)
    checks = {
        "words": _ramp(len(ws), 1, MIN_WORDS),
        "script": _ramp(sum(c.isascii() for c in letters) / len(letters), 0.80, 0.95) if letters else 1.0,
        "symbols": _ramp(len(letters) / max(1, non_space), 0.40, 0.65),
        "repetition": _repetition(text, ws),
        "vocabulary": _ramp(sum(map(is_english_word, ws)) / len(ws), 0.60, 0.85),
        "echo": _echo(words(as_text(prompt)), ws),
    }
    return Quality(min(checks.values()), checks)


def quality_scores(prompts: Sequence[str], responses: Sequence) -> np.ndarray:
    """q for every pair: (N,) float64 in [0, 1]."""
    return np.array([quality(p, r).q for p, r in zip(prompts, responses)], dtype=np.float64)


def degenerate_mask(prompts: Sequence[str], responses: Sequence) -> np.ndarray:
    """(N,) bool: True where the response is degenerate (q < DEGENERATE_BELOW)."""
    return quality_scores(prompts, responses) < DEGENERATE_BELOW


__all__ = [
    "CHECKS",
    "DEGENERATE_BELOW",
    "Quality",
    "as_text",
    "degenerate_mask",
    "is_english_word",
    "quality",
    "quality_scores",
    "words",
]
