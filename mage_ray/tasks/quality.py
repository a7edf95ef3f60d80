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
words          number of words (runs of letters/digits); a closed question      1 word ... 3 words
               (:func:`short_answer_ok`) accepts a one-word answer              (closed: 0 ... 1 word)
script         fraction of letters that are ASCII a-z (English task)            0.80 ... 0.95
symbols        fraction of the non-space characters, prose punctuation after     0.40 ... 0.65
               a word left out, that are letters, digits or (in a text with
               digits) math signs
repetition     min of: distinct words / words (>= 3 words), distinct word        see ``_repetition``
               bigrams / bigrams (>= 4 bigrams), distinct sentences /
               sentences (>= 2 sentences or list items, numbering left
               out), longest run of one character
vocabulary     fraction of words that are English words (wordfreq Zipf >= 1.5,  0.60 ... 0.85
               a number of at most 4 digits, or a short token with a digit:
               ``2x``, ``H2O``, ``5km``)
echo           words left after removing word trigrams copied from the prompt  1 word ... 3 words
                                                                                (closed: 0 ... 1 word)
filler         share of filler and acknowledgement words (``uh``, ``okay``,     0.90 ... 0.60
               ``sure``, ``you know``; texts of >= 3 words)
grammar        word salad: share of word bigrams no English sentence has        0.25 ... 0.10
               (determiner or preposition followed by a preposition, a
               conjunction or a form of "be": ``the of``, ``to in``; >= 4
               bigrams); and >= 6 words with no function word and no list
               separator (``banana river quickly purple seven``) scores 0
=============  ===============================================================  ==========================

A response is **degenerate** when q < 0.5 (``DEGENERATE_BELOW``). The thresholds were first set on a fixed set of
real answers and degenerate responses (``tests/fixtures/degenerate.jsonl``) before any front was measured. A
second, harder set (``tests/fixtures/quality_hard.jsonl``: fluent non-answers, function- and content-word salad,
filler, and real short answers, numbers, formulas, lists) found what that first set could not: strings of
one-word acknowledgements, salad and filler passed with q = 1, and "Paris.", "Yes.", "2x + 3 = 7, so 2x = 4 and
x = 2.", "5 km = 3.11 mi", "2, 3, 5, 7, 11" were flagged. The checks filler and grammar, the closed-question rule
of words and echo, and the symbols / vocabulary treatment of numbers and formulas come from it; the tests assert
both sets (every real answer q = 1, every degenerate response flagged). An empty, whitespace-only or non-text
response has q = 0. Checks are lexical and need no model: the gate runs inside every GRPO reward call; they
cannot tell a fluent answer that says nothing from one that answers (the relevance objective judges that).
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
"""An answer to an open request has at least this many words for q = 1 (one word scores 0)."""
ZIPF_WORD = 1.5
"""A word is English when its wordfreq Zipf frequency is at least this (``votum`` 1.1, ``houseplant`` 2.1)."""
CHECKS = ("words", "script", "symbols", "repetition", "vocabulary", "echo", "filler", "grammar")

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")  # unicode letters/digits with inner apostrophes
_RUN = re.compile(r"(\S)\1*")
_SENTENCE_END = re.compile(r"[.!?\n]+")
_PROSE_MARK = re.compile(r"(?<=[^\W_])[.,;:!?]+(?=\s|$)|[\"'()\[\]“”‘’]")  # clause ends after a word, quotes
_MATH = set("+-=*/^%×÷<>$€£°")
_LIST_SEPARATOR = re.compile(r"[,;\n]|(?:^|\s)(?:\d+[.)]|[-*•])\s")

# a closed question: a one-word answer ("Paris.", "Yes.", "1945") is a real answer to it
_AUX = {"is", "are", "was", "were", "am", "do", "does", "did", "has", "have", "had", "can", "could", "will"}
_AUX |= {"would", "should", "shall", "may", "might", "must"}
_REQUEST = {"can", "could", "will", "would"}  # "can you suggest ...": a request, not a yes/no question
_WH_CLOSED = {"who", "whom", "whose", "when", "where", "which"}
_HOW_CLOSED = {
    "many",
    "much",
    "far",
    "long",
    "old",
    "tall",
    "big",
    "often",
    "fast",
    "heavy",
    "high",
    "deep",
    "wide",
}
_WHAT_NOUN = {"year", "time", "day", "date", "colour", "color", "number", "percentage", "unit"}
_IMPERATIVE_CLOSED = {
    "name",
    "list",
    "convert",
    "solve",
    "calculate",
    "compute",
    "spell",
    "translate",
    "count",
}

FILLER = {
    "uh",
    "uhm",
    "um",
    "umm",
    "er",
    "erm",
    "hmm",
    "hm",
    "ah",
    "oh",
    "ok",
    "okay",
    "sure",
    "fine",
    "good",
}
FILLER |= {
    "cool",
    "great",
    "nice",
    "alright",
    "yeah",
    "yep",
    "yes",
    "no",
    "nope",
    "well",
    "so",
    "like",
    "right",
}
FILLER |= {"thanks", "thank", "anyway", "whatever", "basically", "literally", "totally", "really", "just"}
"""Filler and acknowledgement words: a text made of little else answers nothing (``you know`` counts too)."""
_DET = {"the", "a", "an", "this", "these", "those", "my", "your", "his", "its", "our", "their"}
_PREP = {"of", "to", "in", "for", "on", "with", "at", "by", "from", "into", "onto", "about", "as", "than"}
_CONJ = {"and", "or", "but", "nor"}
_BE = {"is", "are", "was", "were", "am"}
_FUNCTION = _DET | _PREP | _CONJ | _BE | _AUX | {"i", "you", "he", "she", "it", "we", "they", "that", "not"}
_FUNCTION |= {"be", "been", "there", "here", "what", "which", "who", "if", "then", "so", "me", "him", "her"}


def _ramp(x: float, zero: float, one: float) -> float:
    """Clipped linear ramp: 0 at ``zero``, 1 at ``one`` (either order)."""
    return float(min(1.0, max(0.0, (x - zero) / (one - zero))))


@lru_cache(maxsize=200_000)
def is_english_word(word: str) -> bool:
    """True for a word of English (wordfreq Zipf >= ZIPF_WORD), a number of at most 4 digits, or a token of at
    most 6 characters with a digit and letters (``2x``, ``h2o``, ``5km``, ``3rd``: formulas and units)."""
    if word.isdigit():
        return len(word) <= 4
    if any(c.isdigit() for c in word):
        return len(word) <= 6
    if len(word) > 24:  # a glued token
        return False
    from wordfreq import zipf_frequency

    return zipf_frequency(word, "en") >= ZIPF_WORD


def words(text: str) -> list[str]:
    """Lower-cased words: runs of unicode letters/digits (with inner apostrophes); punctuation is not a word."""
    return [w.lower().replace("’", "'") for w in _WORD.findall(text)]


def _sentences(text: str) -> list[tuple[str, ...]]:
    """The sentences and list items of ``text`` (split at . ! ? and new lines), each as its words that are not
    numbers; items with no such word (the numbering of a list) are left out."""
    out = []
    for part in _SENTENCE_END.split(text):
        ws = tuple(w for w in words(part) if not w.isdigit())
        if ws:
            out.append(ws)
    return out


def _repetition(text: str, ws: list[str]) -> float:
    """min of four ramps: distinct words / words (0 at 0.3, 1 at 0.55; texts of >= 3 words), distinct word
    bigrams / bigrams (0 at 0.5, 1 at 0.8; >= 4 bigrams), distinct sentences / sentences (0 at 0.6, 1 at 0.85;
    >= 2 sentences or list items, their numbering left out: "1. Beach. 2. Beach. 3. Beach.", "They eat. They
    sleep. They sleep. They eat.") and the longest run of one non-space character (1 up to 3, 0 from 6:
    ``Mmmmmmmm``, ``1111111``, ``!!!!!!``). The sentence ratio was added after a front's texts showed guided
    decoding repeating list items under readability-heavy preferences ("1. Buy things. 2. Buy things. ...",
    q = 0.78 without it: the numbers make every bigram new). Distinct items that share words ("1. Put on some
    music. 2. Put on some books.") leave the sentence ratio at 1 (their shared bigrams still lower the bigram
    ratio, not below the flag)."""
    out = 1.0
    if len(ws) >= 3:
        out = min(out, _ramp(len(set(ws)) / len(ws), 0.3, 0.55))
    bigrams = list(zip(ws, ws[1:]))
    if len(bigrams) >= 4:
        out = min(out, _ramp(len(set(bigrams)) / len(bigrams), 0.5, 0.8))
    items = _sentences(text)
    if len(items) >= 2:
        out = min(out, _ramp(len(set(items)) / len(items), 0.6, 0.85))
    longest = max((len(m.group(0)) for m in _RUN.finditer(text.lower())), default=0)
    return min(out, _ramp(longest, 6, 3))


def short_answer_ok(prompt_words: list[str]) -> bool:
    """True when the prompt is a closed question that a one-word answer answers: a yes/no question (it opens
    with an auxiliary, not a request such as "can you suggest"), who / when / where / which, "how many / much /
    far / ...", "what is the ...", "what year / time / ...", "what is <number>", or an imperative such as name,
    list, convert, solve, calculate. Open requests ("how can I", "why", "explain", "what is photosynthesis?",
    "what is a good way", "give me") need MIN_WORDS."""
    w = prompt_words[:3] + [""] * (3 - len(prompt_words[:3]))
    if w[0] in _AUX:
        return not (w[0] in _REQUEST and w[1] == "you")
    if w[0] in _WH_CLOSED or w[0] in _IMPERATIVE_CLOSED:
        return True
    if w[0] == "how":
        return w[1] in _HOW_CLOSED
    if w[0] == "what's":
        return w[1] == "the" or w[1][:1].isdigit()
    if w[0] == "what":
        return w[1] in _WHAT_NOUN or (w[1] in _BE and (w[2] == "the" or w[2][:1].isdigit()))
    return False


def _echo(prompt_words: list[str], ws: list[str], need: int) -> float:
    """How much the response says beyond copying the prompt: the words left after removing every word trigram
    that also occurs in the prompt, 0 at need - 2 words left (at least 0), 1 at ``need`` (MIN_WORDS, or 1 for a
    closed question): an echo of the question scores 0; a restated question followed by a real answer passes."""
    prompt_tri = set(zip(prompt_words, prompt_words[1:], prompt_words[2:]))
    copied = [False] * len(ws)
    for i in range(len(ws) - 2):
        if (ws[i], ws[i + 1], ws[i + 2]) in prompt_tri:
            copied[i] = copied[i + 1] = copied[i + 2] = True
    return _ramp(len(ws) - sum(copied), max(need - 2, 0), need)


def _filler(ws: list[str]) -> float:
    """1 unless the text (>= 3 words) is mostly filler: the share of words in FILLER (and of ``you know``
    pairs), 1 up to 0.6, 0 from 0.9 ("Yes. Ok. Sure. Fine. Good. Cool.", "Uh uh uh okay so um well")."""
    if len(ws) < 3:
        return 1.0
    mark = [w in FILLER for w in ws]
    for i in range(len(ws) - 1):
        if ws[i] == "you" and ws[i + 1] == "know":
            mark[i] = mark[i + 1] = True
    return _ramp(sum(mark) / len(ws), 0.9, 0.6)


def _grammar(text: str, ws: list[str]) -> float:
    """Word salad. Function words: the share of word bigrams that no English sentence has (a determiner or a
    preposition followed by a preposition, a conjunction or a form of "be", or a determiner followed by a
    determiner: "the of", "to in", "a is"), 1 up to 0.10, 0 from 0.25 (>= 4 bigrams; one idiom such as "in and
    out" stays below). Content words: 6 or more words with no function word and no list separator (comma,
    semicolon, new line, numbering, bullet) score 0 ("banana river quickly purple seven tomorrow")."""
    out = 1.0
    pairs = list(zip(ws, ws[1:]))
    if len(pairs) >= 4:
        bad = sum(
            (a in _DET and (b in _DET or b in _PREP or b in _CONJ or b in _BE))
            or (a in _PREP and (b in _PREP or b in _CONJ or (b in _BE and a != "to")))
            for a, b in pairs
        )
        out = _ramp(bad / len(pairs), 0.25, 0.10)
    if len(ws) >= 6 and not any(w in _FUNCTION for w in ws) and not _LIST_SEPARATOR.search(text):
        out = 0.0
    return out


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
    prompt_words = words(as_text(prompt))
    need = 1 if short_answer_ok(prompt_words) else MIN_WORDS
    letters = [c for c in text if c.isalpha()]
    marks = [
        c for c in _PROSE_MARK.sub("", text) if not c.isspace()
    ]  # prose punctuation after a word left out
    maths = any(
        c.isdigit() for c in marks
    )  # math signs count in a text with numbers (formulas, units, money)
    content = sum(c.isalpha() or c.isdigit() or (maths and c in _MATH) for c in marks)
    checks = {
        "words": _ramp(len(ws), need - 2 if need > 1 else 0, need),
        "script": _ramp(sum(c.isascii() for c in letters) / len(letters), 0.80, 0.95) if letters else 1.0,
        "symbols": _ramp(content / max(1, len(marks)), 0.40, 0.65),
        "repetition": _repetition(text, ws),
        "vocabulary": _ramp(sum(map(is_english_word, ws)) / len(ws), 0.60, 0.85),
        "echo": _echo(prompt_words, ws, need),
        "filler": _filler(ws),
        "grammar": _grammar(text, ws),
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
    "FILLER",
    "Quality",
    "as_text",
    "degenerate_mask",
    "is_english_word",
    "quality",
    "quality_scores",
    "short_answer_ok",
    "words",
]
