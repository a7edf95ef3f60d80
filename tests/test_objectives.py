"""Objective registry, embedded objectives, batched scoring, first-bad-sample errors, hf: reward models."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from mage_ray.config import TaskConfig
from mage_ray.tasks import objectives as O
from mage_ray.tasks.hf_rewards import PAPER_REWARD_MODELS, RewardModelSpec, build_inputs, hh_query
from mage_ray.tasks.objectives import (
    FunctionObjective,
    ObjectiveError,
    available_objectives,
    get_objective,
    load_objectives,
    register_objective,
    register_reward_model,
    score,
)
from mage_ray.tasks.prompts import SUMMARY_INSTRUCTION, summary_prompt
from mage_ray.tasks.quality import CHECKS, quality, short_answer_ok, words

EMBEDDED = ["relevance", "positivity", "conciseness", "readability"]

PROMPTS = [
    "How do I bake bread at home?",
    "How do I bake bread at home?",
    "What is a good name for a cat?",
    "Explain why the sky is blue.",
    "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: How can I sleep better? \n\nAssistant:",
    "Write a short poem about the sea.",
    "Give me a tip for saving money.",
]
RESPONSES = [
    "Mix flour, water, yeast and salt, knead the dough, let it rise and bake it for 30 minutes.",
    "",
    "Whiskers is a lovely name for a cat.",
    "Sunlight scatters off air molecules, and blue light scatters the most, so the sky looks blue.",
    "Keep a regular schedule, avoid screens before bed and keep your bedroom dark and cool.",
    "Waves roll in, the blue sea sings.",
    "I hate this awful, terrible question.",
]


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_lists_embedded_and_paper_models():
    names = available_objectives()
    assert set(EMBEDDED) <= set(names)
    assert set(PAPER_REWARD_MODELS) == {"helpful", "harmless", "humor", "faithful", "summary"} <= set(names)


def test_unknown_objective_lists_names_and_hf_syntax():
    with pytest.raises(ObjectiveError) as e:
        get_objective("helpfulness")
    msg = str(e.value)
    assert (
        "'helpfulness'" in msg and "relevance" in msg and "hf:<hub id or local path>[@<logit index>]" in msg
    )


def test_register_custom_objective_and_duplicates():
    register_objective(
        "test_len", lambda device, cache_dir: FunctionObjective("test_len", _char_len), replace=True
    )
    obj = get_objective("test_len")
    assert obj(["a", "b"], ["xyz", ""]).tolist() == [3.0, 0.0]
    with pytest.raises(ObjectiveError, match="already registered"):
        register_objective("test_len", lambda device, cache_dir: obj)
    with pytest.raises(ObjectiveError, match="invalid"):
        register_objective("bad name", lambda device, cache_dir: obj)
    register_objective("test_fn", lambda device, cache_dir: _char_len, replace=True)  # a plain function
    assert get_objective("test_fn")(["a"], ["abcd"]).tolist() == [4.0]


def test_load_objectives_follows_task_config():
    objs = load_objectives(TaskConfig(objectives=["conciseness", "positivity"]))
    assert [o.name for o in objs] == ["conciseness", "positivity"]
    assert all(o.description for o in objs)


# ---------------------------------------------------------------------------------------------
# embedded objectives on hand-made examples


def test_positivity_vader():
    """(1 + VADER compound) / 2 under the quality gate: positive > 0.75, negative < 0.25, empty -> floor 0."""
    pos = get_objective("positivity")
    s = pos(["q", "q", "q"], ["I love this, it is wonderful!", "This is terrible and I hate it.", ""])
    assert s[0] > 0.75 and s[1] < 0.25 and s[2] == 0.0
    assert np.all((0 <= s) & (s <= 1))


def test_relevance_on_topic_beats_off_topic():
    rel = get_objective("relevance")
    p = ["How do I bake bread at home?"] * 3
    r = [
        "Knead flour, water, yeast and salt into a dough, let it rise, then bake the bread.",
        "The football match ended in a draw after extra time.",
        "   ",
    ]
    s = rel(p, r)
    assert s[0] > s[1] + 0.3 and s[2] == 0.0
    assert np.all((0 <= s) & (s <= 1))
    # a dialogue prompt is compared through its last human turn
    d = "\n\nHuman: Tell me about football.\n\nAssistant: Sure.\n\nHuman: How do I bake bread?\n\nAssistant:"
    assert np.allclose(rel([d], [r[0]]), rel(["How do I bake bread?"], [r[0]]), atol=1e-5)


def test_conciseness_values_and_monotone():
    """q * finished * 2^(-tokens/20) with MiniLM WordPiece tokens: among finished fluent answers fewer tokens score
    higher (20 tokens -> 0.5, 40 -> 0.25); a glued string is many tokens; an unfinished answer scores 0."""
    con = get_objective("conciseness")
    base = "Keep a regular bedtime and keep your room cool and dark"
    texts = [
        base + ".",
        base + ", and avoid coffee after lunch.",
        base + ", avoid coffee after lunch and read a book.",
    ]
    n = O.count_tokens(texts)
    assert n[0] < n[1] < n[2]
    s = con(["How can I sleep better?"] * 3, texts)
    assert np.allclose(s, [2.0 ** (-k / 20) for k in n]) and np.all(np.diff(s) < 0)
    assert O.conciseness_raw(20) == 0.5 and O.conciseness_raw(40) == 0.25 and O.conciseness_raw(0) == 1.0
    assert O.count_tokens(["Sleepbetterbyrelaxingandbreathingslowly"])[0] > 5
    # an answer cut off mid-sentence (by the token limit) is not concise: 0, whatever its length
    cut = con(["How can I sleep better?"] * 2, [base + " and", base])
    assert cut.tolist() == [0.0, 0.0]
    assert [O.finished(t) for t in ("Done.", "Really?", 'He said "hi."', "Great! 😊", "Wait...")] == [
        True
    ] * 5
    assert [O.finished(t) for t in ("Keep a regular", "1. Eat\n2. Sleep", "first,", "")] == [False] * 4


def test_readability_hand_computed():
    """Hand-computed: "I like to read books in the garden on sunny days." has 11 words, 1 sentence and
    13 syllables (garden 2, sunny 2, like 1 with silent e, the rest 1) -> FRE = 206.835 - 1.015*11
    - 84.6*13/11 = 95.688 -> 0.95688 (q = 1: a fluent sentence). Long words score lower; no words -> 0."""
    rd = get_objective("readability")
    simple = "I like to read books in the garden on sunny days."
    hard = "Photosynthesis transforms electromagnetic radiation into chemical potential energy."
    s = rd(["q"] * 4, [simple, hard, "", "..."])
    assert math.isclose(s[0], (206.835 - 1.015 * 11 - 84.6 * 13 / 11) / 100, rel_tol=1e-9)
    assert s[1] < s[0] and s[2] == 0.0 and s[3] == 0.0
    assert np.all((0 <= s) & (s <= 1))
    assert [O.syllables(w) for w in ("garden", "like", "table", "the", "radio", "42")] == [2, 1, 2, 1, 2, 1]


# ---------------------------------------------------------------------------------------------
# degenerate text cannot win. Two sets of real answers next to degenerate responses: the gate's thresholds were
# set on tests/fixtures/degenerate.jsonl; tests/fixtures/quality_hard.jsonl (fluent non-answers, function- and
# content-word salad, filler; real short answers, numbers, formulas, lists) is the harder second set. Its rows
# marked "issue" are the failures reported against the first gate (the checks filler and grammar and the
# closed-question rule were written from them); the rows marked "blind" were written before those changes and run
# once after them; the rows marked "front" are list items repeated under new numbers that guided decoding produced
# at the readability end of a demo front (the sentence ratio of the repetition check was written from them).

FIXTURES = Path(__file__).parent / "fixtures"
DEGENERATE = [json.loads(line) for line in (FIXTURES / "degenerate.jsonl").open()]
HARD = [json.loads(line) for line in (FIXTURES / "quality_hard.jsonl").open()]


@pytest.mark.parametrize("name", EMBEDDED)
def test_every_embedded_objective_ranks_real_answers_above_degenerate_text(name):
    """For every prompt of the first set, every real answer scores strictly above every degenerate response
    (repeated words/characters, a glued token, foreign script, punctuation runs, echoes of the prompt, empty /
    one-word non-answers, control bytes) on this objective; degenerate responses score the floor 0. On the hard
    set the degenerate responses (fluent non-answers, word salad, filler) score 0 too; its real short answers keep
    their raw score, which can itself be 0 (readability of "Shakespeare.": Flesch below 0; conciseness of
    "x = 2": no closing punctuation, so counted as cut off), so the strict ranking is not asserted there."""
    obj = get_objective(name)
    for row in HARD:  # the gate floors every degenerate response; real ones keep their raw score (q = 1)
        assert not obj([row["prompt"]] * len(row["degenerate"]), list(row["degenerate"].values())).any()
    for row in DEGENERATE:
        kinds, bad = zip(*row["degenerate"].items())
        real = obj([row["prompt"]] * len(row["real"]), row["real"])
        worse = obj([row["prompt"]] * len(bad), list(bad))
        assert np.all(np.isfinite(real)) and np.all(np.isfinite(worse))
        for k, v in zip(kinds, worse):
            assert v == 0.0, f"{name}: {k} response {row['degenerate'][k]!r} scored {v}"
            assert real.min() > v, f"{name}: {k} outranks a real answer to {row['prompt']!r}: {real} vs {v}"


@pytest.mark.parametrize("rows", [DEGENERATE, HARD], ids=["degenerate.jsonl", "quality_hard.jsonl"])
def test_quality_gate_flags_exactly_the_degenerate_responses(rows):
    """Every degenerate response of the set is flagged (q < 0.5), with a reason; no real answer is (q = 1).
    The hard set's real answers include one-word answers to closed questions ("Paris.", "Yes.", "1945."),
    formulas ("2x + 3 = 7, so 2x = 4 and x = 2.", "H2O"), units ("5 km = 3.11 mi") and lists ("2, 3, 5, 7, 11",
    "1. Red 2. Blue 3. Yellow"); its degenerate ones strings of acknowledgements, salad and filler."""
    for row in rows:
        for text in row["real"]:
            qa = quality(row["prompt"], text)
            assert qa.q == 1.0 and not qa.degenerate, (row["prompt"], text, qa)
        for kind, text in row["degenerate"].items():
            qa = quality(row["prompt"], text)
            assert qa.degenerate and qa.reason in CHECKS, (kind, text, qa)
    assert quality("q", "").reason == CHECKS[0]  # all checks 0: the first is named


def test_closed_questions_accept_one_word_answers_open_requests_do_not():
    """A one-word answer is real for a closed question and a non-answer for an open request, on the same word."""
    for prompt in (
        "Is it raining?",
        "Who painted the Mona Lisa?",
        "How many legs does a spider have?",
        "What is the capital of Peru?",
        "What year was it?",
        "What is 6 times 7?",
        "Name a colour.",
    ):
        assert short_answer_ok(words(prompt)), prompt
        assert quality(prompt, "Lima.").q == 1.0, prompt
    for prompt in (
        "How can I sleep better?",
        "Can you suggest a name for a cat?",
        "What is photosynthesis?",
        "What is a good way to cook rice?",
        "Explain why the sky is blue.",
        "Give me a recipe.",
    ):
        assert not short_answer_ok(words(prompt)), prompt
        assert quality(prompt, "Lima.").degenerate, prompt


def test_quality_checks_name_the_problem():
    """One example per check: the weakest check is the reason."""
    p = "How can I fall asleep faster at night?"
    cases = {
        "words": "Sleep.",
        "script": "Спать лучше ночью, это важно.",
        "symbols": "Go to bed ~~~ ### @@@ &&& |||",
        "repetition": "sleep sleep sleep sleep sleep sleep",
        "vocabulary": "Florp gribble zanthic wobblequeen sprock.",
        "echo": "How can I fall asleep faster at night? Yes.",
        "filler": "Okay, sure, yeah, fine, good, cool.",
        "grammar": "the of and to in is you that it he was for on are",
    }
    for check, text in cases.items():
        assert quality(p, text).reason == check, (check, quality(p, text))
    assert quality(p, "How can I fall asleep faster at night? Try counting sheep slowly.").q == 1.0


@pytest.mark.parametrize("name", EMBEDDED)
def test_empty_whitespace_and_non_text_get_the_floor(name):
    """Empty strings, whitespace, control bytes, raw bytes and non-strings score the floor (0), never NaN."""
    obj = get_objective(name)
    bad = ["", " ", "\n\t  ", "\x00\x01\x02", b"\xff\xfe\x00", None, "\ufffd\ufffd\ufffd"]
    s = obj(["How can I sleep better?"] * len(bad), bad)
    assert s.tolist() == [0.0] * len(bad)
    assert obj.bounds == (0.0, 1.0)


def test_batched_equals_unbatched_and_shapes():
    objs = [get_objective(n) for n in EMBEDDED]
    full = score(objs, PROMPTS, RESPONSES, batch_size=64)
    assert full.shape == (len(PROMPTS), len(EMBEDDED)) and full.dtype == np.float64
    assert np.allclose(score(objs, PROMPTS, RESPONSES, batch_size=3), full, atol=1e-5)
    one_by_one = np.array([[o([p], [r])[0] for o in objs] for p, r in zip(PROMPTS, RESPONSES)])
    assert np.allclose(one_by_one, full, atol=1e-5)
    assert score(objs, [], []).shape == (0, len(EMBEDDED))
    with pytest.raises(ObjectiveError, match="batch_size"):
        score(objs, PROMPTS, RESPONSES, batch_size=0)
    with pytest.raises(ObjectiveError, match="7 prompts but 6 responses"):
        score(objs, PROMPTS, RESPONSES[:-1])


def test_objectives_pickle():
    for name in EMBEDDED:
        obj = get_objective(name)
        clone = pickle.loads(pickle.dumps(obj))
        assert np.allclose(clone(PROMPTS[:3], RESPONSES[:3]), obj(PROMPTS[:3], RESPONSES[:3]), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# bad scores name the objective and the first bad sample


def _char_len(prompts, responses):
    return [float(len(r)) for r in responses]


def _nan_on_x(prompts, responses):
    return [math.nan if "x" in r else 1.0 for r in responses]


def _raise_on_boom(prompts, responses):
    if any("boom" in r for r in responses):
        raise RuntimeError("cannot score")
    return [0.0] * len(responses)


def _wrong_length(prompts, responses):
    return [0.0] * (len(responses) + 1)


def test_first_bad_sample_is_reported():
    p = [f"prompt {i}" for i in range(8)]
    r = ["ok", "ok", "ok", "ok", "ok", "has x", "boom here", "has x too"]
    with pytest.raises(ObjectiveError) as e:
        score([FunctionObjective("nanny", _nan_on_x)], p, r, batch_size=4)
    msg = str(e.value)
    assert "'nanny'" in msg and "non-finite value nan" in msg and "sample 5" in msg and "'has x'" in msg
    with pytest.raises(ObjectiveError) as e:
        score([FunctionObjective("boomer", _raise_on_boom)], p, r, batch_size=4)
    msg = str(e.value)
    assert "'boomer' raised RuntimeError: cannot score" in msg and "sample 6" in msg and "prompt 6" in msg
    with pytest.raises(ObjectiveError, match=r"'long' returned shape \(5,\) for a batch of 4.*sample 0"):
        score([FunctionObjective("long", _wrong_length)], p, r, batch_size=4)


def test_bad_sample_text_is_truncated():
    with pytest.raises(ObjectiveError) as e:
        FunctionObjective("nanny", _nan_on_x)(["p"], ["x" * 5000])
    assert "x" * 200 in str(e.value) and "x" * 201 not in str(e.value)


# ---------------------------------------------------------------------------------------------
# hf: sequence-classification reward models (tiny random local model; nothing downloads)


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> str:
    """A 1-layer GPT2ForSequenceClassification (2 labels) with the embedded tokenizer, saved locally."""
    from bundle_factory import make_tiny_reward_model

    return make_tiny_reward_model(tmp_path_factory.mktemp("tiny_rm"))


def _manual_logits(path: str, texts: list, pair: list | None = None) -> np.ndarray:
    """Unpadded, one sample at a time (as RiC scores): logits (N, num_labels)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    net = AutoModelForSequenceClassification.from_pretrained(path).eval()
    rows = []
    with torch.inference_mode():
        for i, t in enumerate(texts):
            enc = tok(t, pair[i], return_tensors="pt") if pair is not None else tok(t, return_tensors="pt")
            rows.append(net(**enc).logits[0].numpy())
    return np.array(rows)


def test_hf_local_model_pair_format_and_logit_index(tiny_rm):
    """Batched, right-padded scores equal unpadded one-by-one logits; '@1' selects the second logit."""
    p = ["How do I bake bread?", "Name a cat.", "Why is the sky blue?"]
    r = ["Knead, rise, bake for a while in a hot oven.", "Whiskers.", "Rayleigh scattering of sunlight."]
    manual = _manual_logits(tiny_rm, p, r)
    s0 = get_objective(f"hf:{tiny_rm}")(p, r)
    s1 = get_objective(f"hf:{tiny_rm}@1")(p, r)
    assert np.allclose(s0, manual[:, 0], atol=1e-5) and np.allclose(s1, manual[:, 1], atol=1e-5)
    assert score([get_objective(f"hf:{tiny_rm}@1")], p, r, batch_size=2)[:, 0] == pytest.approx(s1, abs=1e-5)
    with pytest.raises(ObjectiveError, match="has 2 output logit"):
        get_objective(f"hf:{tiny_rm}@5")
    with pytest.raises(ObjectiveError, match="must be an integer"):
        get_objective(f"hf:{tiny_rm}@one")
    obj = get_objective(f"hf:{tiny_rm}@1")
    assert np.allclose(pickle.loads(pickle.dumps(obj))(p, r), s1, atol=1e-6)


def test_hf_registered_alias_uses_its_input_format(tiny_rm):
    """An hh-format alias scores the pair (hh_query(prompt), response), i.e. the Ray2333 template."""
    register_reward_model("tiny_hh", tiny_rm, logit_index=0, input_format="hh", description="tiny test RM")
    p = ["How do I bake bread?", "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: Name a cat.\n\nAssistant:"]
    r = [" Knead and bake. ", "Whiskers."]
    manual = _manual_logits(tiny_rm, [hh_query(x) for x in p], [x.strip() for x in r])
    obj = get_objective("tiny_hh")
    assert obj.description == "tiny test RM"
    assert np.allclose(obj(p, r), manual[:, 0], atol=1e-5)


def test_input_templates(tiny_rm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_rm)
    tok.pad_token = tok.pad_token or tok.eos_token
    assert hh_query("Hi?") == "\n\nHuman: Hi? \n\nAssistant:"
    assert hh_query("\n\nHuman: Hi?\n\nAssistant:") == "\n\nHuman: Hi? \n\nAssistant:"
    post = "My cat ate my homework and I need to tell my teacher."
    prompt, resp = summary_prompt(post), "Cat ate homework."
    assert prompt.startswith(SUMMARY_INSTRUCTION)

    def text(fmt):
        enc = build_inputs(RewardModelSpec("m", 0, fmt), tok, [prompt], [resp], max_length=256)
        return tok.decode(enc["input_ids"][0])

    assert text("faithful") == resp + post  # (summary, post) pair; this tokenizer adds no separator
    assert text("summary") == f"{resp} {tok.bos_token} {post}"
    assert text("response") == resp
    assert text("hh") == hh_query(prompt) + resp
    assert PAPER_REWARD_MODELS["humor"].logit_index == 1 and PAPER_REWARD_MODELS["faithful"].logit_index == 1
    assert PAPER_REWARD_MODELS["helpful"].input_format == "hh"


def test_hf_unavailable_models_fail_clearly(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries
    with pytest.raises(ObjectiveError) as e:
        get_objective("hf:some-org/no-such-reward-model")
    msg = str(e.value)
    assert "'some-org/no-such-reward-model' could not be loaded" in msg and "hub" in msg and "local" in msg
    with pytest.raises(ObjectiveError, match="Ray2333/gpt2-large-helpful-reward_model"):
        get_objective("helpful")
    with pytest.raises(ObjectiveError, match="does not exist"):
        get_objective("hf:/nonexistent/reward_model")
    with pytest.raises(ObjectiveError, match="not of the form"):
        get_objective("hf:")
